"""Restarts, proven: the daemon SIGKILLed at random points, also exactly where it
hurts (a batch just consumed, responses journaled, responses written into the ring
and not yet published: the test-only hook of ``gblk.engine.crashpoints``), and
started again, while a guest runs verified writes, reads, flushes and discards.

No request may fail, nothing may mismatch, no response may come twice or with an
unknown id (the simulated frontend counts both as protocol violations), and every
write acknowledged before a completed flush must be in the image file. A takeover
writes nothing to the disk's XenStore directory (blkfront reads any write of
``state`` while Connected as a resize).

The 50-kill soak runs where ``GBLK_RESTART_SOAK=1`` (tox's py312 env; by hand:
``GBLK_RESTART_SOAK=1 pytest tests/integration/test_restarts.py``): every restart
costs a Python start-up (~0.5-1.5 s here), so 50 of them take about a minute, too
long for each of CI's interpreters. The short variants run everywhere.
"""

from __future__ import annotations

import os
import random
import re
import signal
import struct
import subprocess
import sys
from typing import Dict, List, Optional

import gevent
import gevent.event
import pytest

from gblk.blkif.const import XenbusState
from gblk.blkif.ring import REQ_PROD, RSP_PROD
from gblk.sim.harness.host import SimHost, child_env
from gblk.sim.harness.restarts import Restarter
from gblk.sim.guest.workload import Workload, WorkloadConfig
from gblk.xen.xenstore import GeventXenStore

from .backend_support import file_bytes, logs_on_failure, pattern
from .packaging_support import REPO

MiB = 1 << 20
SECTOR = 512
ARGS = ["--kinds", "qdisk", "--no-metrics"]
DISK = 64 * MiB
HALF = DISK // SECTOR // 2
#: a request still unanswered after this long is lost (a restart takes ~1 s)
ANSWER_WITHIN = 60.0


class FlushChecker:
    """Rounds of: writes (fresh patterns) into [start, end), each acknowledged, then a
    flush; once the flush completes, every one of those writes must be in the file."""

    def __init__(self, fe, image: str, start: int, end: int, seed: int) -> None:
        self.fe = fe
        self.image = image
        self.start = start
        self.end = end
        self.rnd = random.Random(seed)
        self.rounds = 0
        self.failures: List[str] = []
        self._stop = gevent.event.Event()
        self._g = gevent.spawn(self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            writes = []
            for _ in range(4):
                n = self.rnd.choice((8, 16, 64))
                sector = self.rnd.randrange(self.start, self.end - n) // 8 * 8
                if any(s < sector + n and sector < s + len(d) // SECTOR for s, d in writes):
                    continue
                writes.append((sector, _stamped(self.rounds, sector, n)))
            results = [self.fe.submit_write(s, d) for s, d in writes]
            for (s, _), r in zip(writes, results):
                res = _answer(r)
                if res is None:
                    self._unanswered(f"write {s}")
                    return
                if not res.ok:
                    self.failures.append(f"write {s}: {res}")
            flush = _answer(self.fe.submit_flush())
            if flush is None:
                self._unanswered("flush")
                return
            if not flush.ok:
                self.failures.append(f"flush: {flush}")
                continue
            for s, d in writes:
                if file_bytes(self.image, s, len(d) // SECTOR) != d:
                    self.failures.append(f"sectors {s}+{len(d) // SECTOR} acknowledged before "
                                         "a completed flush are not in the file")
            self.rounds += 1

    def _unanswered(self, what: str) -> None:
        """A request not answered in time: a lost one (or a stalled disk). Say which
        requests the guest still waits for, for the post-mortem, and stop."""
        waiting = [(q.index, hex(part.id), part.op, part.sector, part.index)
                   for q in self.fe.queues for part in q.outstanding.values()]
        self.failures.append(f"{what}: no answer in {ANSWER_WITHIN:.0f}s; outstanding "
                             f"(queue, id, op, sector, ring index): {waiting}; rings "
                             f"(req_prod, rsp_prod, req_prod_pvt, rsp_cons): "
                             f"{[_indices(q.ring) for q in self.fe.queues]}")

    @property
    def running(self) -> bool:
        return not self._g.dead

    def stop(self) -> None:
        self._stop.set()
        self._g.get(timeout=2 * ANSWER_WITHIN)


def _answer(r: gevent.event.AsyncResult):
    """The result, or None when nothing answered in ``ANSWER_WITHIN`` seconds."""
    return r.get() if r.wait(ANSWER_WITHIN) else None


def _indices(ring) -> tuple:
    return (ring.idx[REQ_PROD], ring.idx[RSP_PROD], ring.req_prod_pvt, ring.rsp_cons)


def _stamped(round_no: int, sector: int, n: int) -> bytes:
    """``n`` sectors, each naming its round and its sector: stale data cannot pass."""
    fill = pattern(round_no, SECTOR - 16)
    return b"".join(struct.pack("<QQ", round_no, sector + i) + fill for i in range(n))


def _run_restarts(kills: int, every: float, crash: Optional[str], seed: int) -> Dict[str, int]:
    """A guest under a verified workload (and a FlushChecker) while the daemon is
    killed ``kills`` times; asserts the guest saw nothing but pauses."""
    env = {"GBLK_TEST_CRASH": crash} if crash else None
    with SimHost() as host:
        host.start_backend(ARGS, env=env)
        g = host.create_guest(size=DISK)
        fe = g.frontend
        wl = Workload([fe], WorkloadConfig(seconds=None, count=10 ** 9, depth=12, seed=seed,
                                           regions=[(0, HALF)]))
        rs = Restarter(host, ARGS, every, lambda: wl.stats.requests, seed=seed, env=env)
        wl.start()
        checker = FlushChecker(fe, g.image, HALF, 2 * HALF, seed)
        rs.start()
        try:
            with logs_on_failure(host.backend):
                while rs.restarts < kills and rs.running and checker.running:
                    gevent.sleep(0.05)
                rs.stop()
                wl.stop(timeout=60)
                checker.stop()
                assert not checker.failures, checker.failures[:3]
                assert rs.failure is None, rs.failure
        finally:
            rs.stop()
        stats = wl.stats
        assert not checker.failures, checker.failures[:3]
        assert rs.failure is None, rs.failure
        assert rs.restarts >= kills
        assert stats.errors == 0, stats.errors_by_op
        assert stats.mismatches == 0
        assert fe.stats.protocol_violations == 0, fe.stats.violations  # duplicates, unknown ids
        assert fe.stats.lost == 0
        assert checker.rounds > 0
        assert {"write", "read", "flush", "discard"} <= {k.split("_")[-1] for k in stats.by_op}
        # after all that, the disk is still the same connection, still served
        assert fe.connected and fe.stats.connects == 1
        data = pattern(7, 64 * SECTOR)
        fe.write(HALF - 64, data)
        assert fe.read(HALF - 64, 64) == data
        return {"restarts": rs.restarts, "requests": stats.requests, "rounds": checker.rounds}


@pytest.mark.parametrize("point", ["written", "journaled"])
def test_killed_between_writing_and_publishing_responses(point):
    """The daemon dies at its first publish, every time: after packing a batch of
    responses into the ring journal (``journaled``), or after writing them into the
    ring slots, before ``rsp_prod`` moves (``written``: the window README admitted).
    Each successor publishes what its predecessor journaled, exactly once, then dies
    at its own first publish; the guest sees every request answered once, OKAY."""
    env = {"GBLK_TEST_CRASH": f"{point}=1"}
    with SimHost() as host:
        host.start_backend(ARGS)
        g = host.create_guest(size=DISK)
        fe = g.frontend
        fe.write(0, pattern(1, 64 * SECTOR))  # connected, served by a daemon without hook
        host.backend.kill()
        host.start_backend(ARGS, env=env)
        with logs_on_failure(host.backend):
            writes = [(i * 128, pattern(100 + i, 64 * SECTOR)) for i in range(3)]
            pending = [fe.submit_write(s, d) for s, d in writes]
            restarts = 0
            while not all(p.ready() for p in pending):
                if not host.backend.alive():  # it killed itself at the publish
                    assert host.backend.proc.returncode == -9
                    restarts += 1
                    assert restarts < 40, "no progress"
                    host.start_backend(ARGS, env=env)
                gevent.sleep(0.01)
            assert restarts >= 1
            for p in pending:
                assert p.get().ok, p.get()
            host.backend.kill()
            host.start_backend(ARGS)
            for s, d in writes:
                assert fe.read(s, 64) == d
                assert file_bytes(g.image, s, 64) == d
            assert fe.stats.protocol_violations == 0, fe.stats.violations
            assert fe.stats.errors == 0 and fe.stats.lost == 0
            assert fe.connected and fe.stats.connects == 1


def test_takeover_writes_nothing_a_frontend_sees():
    """A restarted daemon takes a Connected disk over without one write to its
    XenStore directory: no ``state`` rewrite (blkfront: "Setting capacity to ..."),
    no node rewritten with the value it has."""
    with SimHost() as host:
        host.start_backend(ARGS)
        g = host.create_guest(size=DISK)
        fe = g.frontend
        fe.write(0, pattern(3, 8 * SECTOR))
        host.backend.kill()
        xs = GeventXenStore(host.socket_path, host.timeout)
        sub = xs.watch([g.disk.backend_path])
        try:
            assert sub.get(timeout=5) is not None  # the watch's initial event
            while sub.get(timeout=0.3) is not None:
                pass
            host.start_backend(ARGS)
            with logs_on_failure(host.backend):
                assert fe.read(0, 8) == pattern(3, 8 * SECTOR)
                fe.write(8, pattern(4, 8 * SECTOR))
                fired = sub.get(timeout=1.0)
                assert fired is None, f"the takeover wrote {fired}"
                assert host.backend_state(g) == XenbusState.CONNECTED
        finally:
            sub.close()
            xs.close()


def test_random_kills_and_kills_at_the_crash_points():
    """Eight kills: random SIGKILLs and the daemon's own at the crash points."""
    out = _run_restarts(8, 0.8, "taken=0.002,journaled=0.002,written=0.004", seed=11)
    assert out["restarts"] >= 8


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GBLK_RESTART_SOAK") != "1",
                    reason="50 restarts take about a minute: GBLK_RESTART_SOAK=1 (tox py312)")
def test_fifty_kills_soak():
    """Fifty kills at random points and at each crash point, under verified IO."""
    out = _run_restarts(50, 1.0, "taken=0.001,journaled=0.001,written=0.002", seed=50)
    assert out["restarts"] >= 50


def test_takeover_hands_the_disks_over_under_io():
    """``gblk serve --takeover`` while a guest runs verified IO: the running gblk
    releases every disk (each consumed request answered) and exits 0, the new one
    serves on; the guest sees no error, no duplicate, no reconnect."""
    with SimHost() as host:
        host.start_backend(ARGS)
        g = host.create_guest(size=DISK)
        fe = g.frontend
        wl = Workload([fe], WorkloadConfig(seconds=None, count=10 ** 9, depth=12, seed=5))
        wl.start()
        gevent.sleep(0.5)
        old = host.backend
        host.backend = None
        new = host.start_backend(ARGS + ["--takeover"])
        with logs_on_failure(old, new):
            for _ in range(600):
                if not old.alive():
                    break
                gevent.sleep(0.05)
            assert old.stop() == 0
            assert "handover: releasing every disk" in old.log_text()
            assert "still in flight" not in old.log_text()
            before = wl.stats.requests
            gevent.sleep(0.5)
            wl.stop(timeout=60)
            assert wl.stats.requests > before  # served by the new process
            assert new.alive()
            assert "takeover: disks served again" in new.log_text()
            assert wl.stats.errors == 0 and wl.stats.mismatches == 0
            assert fe.stats.protocol_violations == 0, fe.stats.violations
            assert fe.connected and fe.stats.connects == 1
        new.stop()


def _terminate(pid: int) -> None:
    """SIGTERM to a successor (not our child: nobody waits for it), then until it is gone."""
    os.kill(pid, signal.SIGTERM)
    for _ in range(300):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        gevent.sleep(0.05)


def test_sigusr2_starts_a_successor_that_takes_over():
    """SIGUSR2 (the upgrade under systemd): the daemon starts ``gblk serve --takeover``
    as its own child, hands the disks to it and exits 0; the guest is served on."""
    with SimHost() as host:
        old = host.start_backend(ARGS)
        g = host.create_guest(size=DISK)
        fe = g.frontend
        fe.write(0, pattern(8, 64 * SECTOR))
        successor = 0
        try:
            with logs_on_failure(old):
                old.proc.send_signal(signal.SIGUSR2)
                assert old.proc.wait(timeout=120) == 0
                text = old.log_text()
                m = re.search(r"handover: releasing every disk to process (\d+)", text)
                assert m, text
                successor = int(m.group(1))
                assert fe.read(0, 64) == pattern(8, 64 * SECTOR)
                fe.write(64, pattern(9, 64 * SECTOR))
                assert file_bytes(g.image, 64, 64) == pattern(9, 64 * SECTOR)
                os.kill(successor, 0)  # still serving
                assert fe.connected and fe.stats.connects == 1 and fe.stats.errors == 0
        finally:
            if successor:
                _terminate(successor)


def test_crash_hook_refused_on_a_real_xen_host(tmp_path):
    """The kill hook is for the simulated host: with it set, ``gblk serve`` on real
    Xen refuses to start (configuration error, exit 2, one line), touching nothing."""
    env = child_env({"GBLK_TEST_CRASH": "written=1"})
    proc = subprocess.run(
        [sys.executable, "-m", "gblk", "serve", "--xen", "real", "--no-metrics",
         "--control-socket", str(tmp_path / "control.sock")],
        env=env, capture_output=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert b"GBLK_TEST_CRASH" in proc.stderr and b"refusing" in proc.stderr
    assert not (tmp_path / "control.sock").exists()


FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl for the one unit of this test: its main PID is what the unit's processes
# said with MAINPID= on NOTIFY_SOCKET (the test plays systemd's manager)
echo "$*" >> {state}/calls
case "$1" in
    is-active) kill -0 "$(cat {state}/mainpid)" 2>/dev/null ;;
    show) cat {state}/mainpid ;;
    kill) kill -USR2 "$(cat {state}/mainpid)" ;;
    restart) exit 0 ;;
    *) exit 1 ;;
esac
"""


def _fake_systemctl(tmp_path) -> tuple:
    """(state directory, environment whose PATH finds FAKE_SYSTEMCTL first)."""
    state = tmp_path / "state"
    state.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL.format(state=state))
    fake.chmod(0o755)
    return state, dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")


def test_package_upgrade_hands_the_disks_over_without_a_restart(tmp_path):
    """The Debian package's postinst runs ``debian/handover`` on an upgrade: the running
    gblk (a real daemon, with systemd's notify socket played by the test) gets SIGUSR2
    through ``systemctl kill``, hands its disks to the new process, which becomes the
    unit's main PID (MAINPID=); the script sees it and restarts nothing, and the guest,
    reading and writing throughout, sees no error and no reconnect."""
    import socket as socketlib

    state, env = _fake_systemctl(tmp_path)
    notify_path = str(tmp_path / "notify.sock")
    listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    listener.bind(notify_path)

    def manager() -> None:
        while True:
            for line in listener.recv(4096).decode().splitlines():
                if line.startswith("MAINPID="):
                    (state / "mainpid").write_text(line[len("MAINPID="):] + "\n")

    successor = 0
    with SimHost() as host:
        old = host.start_backend(ARGS, env={"NOTIFY_SOCKET": notify_path})
        (state / "mainpid").write_text(f"{old.pid}\n")
        g = host.create_guest(size=DISK)
        fe = g.frontend
        fe.write(0, pattern(3, 64 * SECTOR))
        m = gevent.spawn(manager)
        stop = gevent.event.Event()
        gaps: List[float] = []
        failures: List[str] = []

        def io() -> None:
            t = gevent.get_hub().loop.now()
            n = 0
            while not stop.is_set():
                try:
                    fe.write(128 + (n % 64) * 8, pattern(n, 8 * SECTOR))
                    assert fe.read(0, 64) == pattern(3, 64 * SECTOR)
                except Exception as e:  # noqa: BLE001 - every failure is the test's
                    failures.append(repr(e))
                    return
                gevent.get_hub().loop.update_now()
                now = gevent.get_hub().loop.now()
                gaps.append(now - t)
                t = now
                n += 1

        worker = gevent.spawn(io)
        try:
            with logs_on_failure(old):
                gevent.sleep(0.5)
                proc = subprocess.run(["sh", str(REPO / "debian" / "handover"), "60"],
                                      env=env, capture_output=True, text=True, timeout=120)
                assert proc.returncode == 0, proc.stderr
                assert "handed its disks over to the new version" in proc.stdout, proc.stdout
                calls = (state / "calls").read_text().splitlines()
                assert not [c for c in calls if c.startswith("restart")], calls
                successor = int((state / "mainpid").read_text())
                assert successor != old.pid
                assert old.proc.wait(timeout=60) == 0
                gevent.sleep(0.5)  # the guest goes on, served by the successor
                stop.set()
                worker.join(timeout=ANSWER_WITHIN)
                assert not failures, failures
                assert fe.connected and fe.stats.connects == 1 and fe.stats.errors == 0
                assert fe.stats.mismatches == 0 and not fe.stats.violations
                os.kill(successor, 0)
                print(f"handover: longest gap between the guest's IOs {max(gaps) * 1000:.0f} ms")
        finally:
            stop.set()
            worker.kill()
            m.kill()
            listener.close()
            if successor:
                _terminate(successor)


def test_package_upgrade_restarts_when_no_handover_comes(tmp_path):
    """A running gblk that does not hand over (here: a process ignoring SIGUSR2) is
    restarted by ``debian/handover`` once its time is up, with the reason on stderr;
    a unit that is not running is left alone."""
    state, env = _fake_systemctl(tmp_path)
    script = ["sh", str(REPO / "debian" / "handover"), "1"]
    deaf = subprocess.Popen([sys.executable, "-c",
                             "import signal, time; signal.signal(signal.SIGUSR2, signal.SIG_IGN); "
                             "print('up', flush=True); time.sleep(120)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert deaf.stdout is not None and deaf.stdout.readline() == "up\n"
        (state / "mainpid").write_text(f"{deaf.pid}\n")
        proc = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "no handover within 1s" in proc.stderr and "restarting gblk" in proc.stderr
        calls = (state / "calls").read_text().splitlines()
        assert calls[-1] == "restart gblk.service", calls
        assert any(c.startswith("kill --signal=SIGUSR2") for c in calls), calls
    finally:
        deaf.kill()
        deaf.wait()
    (state / "calls").unlink()
    proc = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == proc.stderr == ""
    assert (state / "calls").read_text().splitlines() == ["is-active --quiet gblk.service"]
