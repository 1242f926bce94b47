"""The backend's lifecycle through real processes on the simulated host (docs/protocol.md
§5, issue 4): online resize, reconnect after a guest reboot, unplug (with an active
and with an inactive frontend), a backend directory removed and a guest destroyed
with IO in flight, one failing device beside a working one, and the daemon stopped
(SIGTERM) or killed (SIGKILL) with IO in flight, then restarted to take the running
guest over.

``gblk serve`` runs as a subprocess against the simulated xenstored; the guests'
Linux-like frontends run in this process and verify every byte they read back.
"""

from __future__ import annotations

import os
import signal
from typing import Iterator, List, Optional, Tuple

import gevent
import gevent.event
import pytest

from gblk.blkif.const import XenbusState, Status
from gblk.sim.guest.frontend import Frontend, FrontendError, IoResult
from gblk.sim.harness.host import BackendProcess, Guest, SimHost
from gblk.xen.xenstore import GeventXenStore

from .backend_support import (
    DEADLINE,
    SECTOR,
    file_bytes,
    logs_on_failure,
    metric,
    metrics_url,
    pattern,
    scrape,
    served_host,
    start_daemon,
    wait_until,
)
from .lifecycle_support import holds_domain, unanswered_behind_rsp_prod
from .metrics_support import device_series

MiB = 1 << 20
XVDB = 51728
XVDC = 51744
STOP_TIMEOUT = 10.0
DAEMON_TOML = f'[daemon]\nkinds = ["qdisk"]\nstop_timeout = {STOP_TIMEOUT}\n'


@pytest.fixture(scope="module")
def served() -> Iterator[Tuple[SimHost, BackendProcess, str]]:
    """One simulated host and one daemon (qdisk, default settings) for the module."""
    with served_host("lifecycle", DAEMON_TOML) as served:
        yield served


def _result(r: gevent.event.AsyncResult, timeout: float = DEADLINE) -> IoResult:
    res = r.get(timeout=timeout)
    assert isinstance(res, IoResult)
    return res


def _gone(host: SimHost, path: str) -> bool:
    return host.xs.read(path) is None and not host.xs.directory(path)


def _no_traceback(daemon: BackendProcess) -> None:
    text = daemon.log_text()
    assert "Traceback" not in text, text[-4000:]


# -- resize --------------------------------------------------------------------------------
def test_online_resize_is_seen_by_the_guest(served):
    """The image grows while the guest is connected: the backend rewrites
    ``sectors`` and then ``state`` (docs/protocol.md §1.2), the frontend re-reads the size,
    IO past the old end (and straddling it) works and lands in the file; before the
    resize the same IO was refused."""
    host, daemon, url = served
    with logs_on_failure(daemon):
        g = host.create_guest(size=8 * MiB)
        fe = g.frontend
        old = fe.disk.sectors
        assert old == 8 * MiB // SECTOR
        tail = pattern(30, 8 * SECTOR)
        fe.write(old - 8, tail)
        res = _result(fe.submit_write(old, pattern(31, 8 * SECTOR)))
        assert res.status == Status.ERROR, "IO past the end served before the resize"
        os.truncate(g.image, 16 * MiB)
        new = 16 * MiB // SECTOR
        wait_until(lambda: fe.disk.sectors == new, "the guest sees the new size")
        assert host.xs.read(f"{g.disk.backend_path}/sectors") == str(new)
        assert host.backend_state(g) == XenbusState.CONNECTED and fe.connected
        assert fe.stats.resizes == 1
        # straddling the old end, then the last MiB of the new size (INDIRECT)
        across = pattern(32, 16 * SECTOR)
        fe.write(old - 8, across)
        last = pattern(33, MiB)
        fe.write(new - 2048, last)
        assert fe.read(old - 8, 16) == across
        assert fe.read(new - 2048, 2048) == last
        assert file_bytes(g.image, old - 8, 16) == across
        assert file_bytes(g.image, new - 2048, 2048) == last
        assert fe.read(old + 8, 8) == bytes(8 * SECTOR)  # the new space reads as zeros
        samples = scrape(url)
        assert metric(samples, "gblk_device_size_bytes", domain=str(g.domid)) == 16 * MiB
        assert fe.stats.mismatches == 0 and fe.stats.protocol_violations == 0
        fe.close()
        host.destroy_guest(g)


# -- reconnect -----------------------------------------------------------------------------
def test_reconnect_after_guest_reboot(served):
    """A guest reboots (xenbus_reset_frontend: Closing, Closed, Initialising, new
    rings) with writes still in flight: the backend closes, goes back to InitWait and
    connects again; data written before is intact, IO works after, and
    ``gblk_reconnects_total`` counts one more."""
    host, daemon, url = served
    with logs_on_failure(daemon):
        g = host.create_guest(size=16 * MiB)
        fe = g.frontend
        dom = str(g.domid)
        before = pattern(40, MiB)
        fe.write(0, before)
        fe.write(4096, pattern(41, 8 * SECTOR))
        reconnects = metric(scrape(url), "gblk_reconnects_total", domain=dom)
        # abandoned by the reboot: their outcome is indeterminate, their sectors apart
        for i in range(32):
            fe.submit_write(8192 + i * 64, pattern(50 + i, 64 * SECTOR))
        fe.reboot()
        assert fe.connected and fe.stats.connects == 2
        assert host.backend_state(g) == XenbusState.CONNECTED
        assert fe.read(0, 2048) == before
        assert file_bytes(g.image, 0, 2048) == before
        after = pattern(42, 256 * SECTOR)
        fe.write(2048, after)
        assert fe.read(2048, 256) == after
        assert fe.read(4096, 8) == pattern(41, 8 * SECTOR)
        wait_until(lambda: metric(scrape(url), "gblk_reconnects_total", domain=dom)
                   == reconnects + 1, "gblk_reconnects_total counts the reconnection")
        assert fe.stats.mismatches == 0 and fe.stats.protocol_violations == 0
        fe.close()
        assert fe.retry_grants() == 0
        host.destroy_guest(g)


# -- unplug --------------------------------------------------------------------------------
def test_unplug_closes_removes_and_forgets(served):
    """``xl block-detach``: online=0 and state=5 from the toolstack; the backend goes
    Closed within libxl's 10 s window (detach_disk says so), both directories are
    removed, the daemon forgets the device (its metric series vanish, nothing of the
    guest stays mapped), and a new disk with the same devid later works."""
    host, daemon, url = served
    with logs_on_failure(daemon):
        g = host.create_guest(size=8 * MiB)
        fe = g.frontend
        devid = g.disk.devid
        fe.write(0, pattern(60, 64 * SECTOR))
        assert device_series(scrape(url), g.domid, devid)
        assert host.toolstack.detach_disk(g.domid, devid), "backend not Closed within 10 s"
        assert _gone(host, g.disk.backend_path) and _gone(host, g.disk.frontend_path)
        wait_until(lambda: not device_series(scrape(url), g.domid, devid),
                   "the unplugged disk's metric series vanish")
        wait_until(lambda: not holds_domain(daemon.pid, host, g.domid),
                   "the daemon lets go of the guest's memory")
        wait_until(lambda: fe.retry_grants() == 0, "every grant of the old disk ended")
        # the same devid again, on a fresh image
        image = host.make_image("replug.img", 8 * MiB)
        host.toolstack.attach_disk(g.domid, image, devid=devid)
        fe2 = host.frontend(g.domain, devid)
        g.extra.append(fe2)
        fe2.connect()
        data = pattern(61, 128 * SECTOR)
        fe2.write(16, data)
        assert fe2.read(16, 128) == data
        assert file_bytes(image, 16, 128) == data
        assert host.toolstack.detach_disk(g.domid, devid)
        host.destroy_guest(g)
        assert daemon.alive()


def test_unplug_of_an_inactive_frontend(served):
    """Unplug of a disk whose frontend never connected (still Initialising): the
    backend goes straight from InitWait to Closed (docs/protocol.md §5), the directories
    are removed and the device forgotten."""
    host, daemon, url = served
    with logs_on_failure(daemon):
        g = host.create_guest(size=8 * MiB, connect=False)
        be = g.disk.backend_path
        wait_until(lambda: host.backend_state(g) == XenbusState.INIT_WAIT, "backend in InitWait")
        assert host.guest_xenstore(g.domid).read(f"{g.disk.frontend_path}/state") == "1"
        assert host.toolstack.detach_disk(g.domid, g.disk.devid), "backend not Closed within 10 s"
        assert _gone(host, be) and _gone(host, g.disk.frontend_path)
        wait_until(lambda: not device_series(scrape(url), g.domid, g.disk.devid),
                   "the unplugged disk's metric series vanish")
        wait_until(lambda: not holds_domain(daemon.pid, host, g.domid),
                   "the daemon lets go of the guest")
        host.destroy_guest(g)
        assert daemon.alive()


# -- abrupt ends -----------------------------------------------------------------------------
class Bystander:
    """Another guest's disk doing verified IO the whole time."""

    def __init__(self, host: SimHost) -> None:
        self.guest = host.create_guest(size=16 * MiB)
        self.ops = 0
        self._stop = gevent.event.Event()
        self._g = gevent.spawn(self._run)

    def _run(self) -> None:
        fe = self.guest.frontend
        i = 0
        while not self._stop.is_set():
            sector = (i % 64) * 128
            data = pattern(500 + i, 128 * SECTOR)
            fe.write(sector, data)
            assert fe.read(sector, 128) == data
            self.ops += 1
            i += 1

    def finish(self) -> Frontend:
        """Stop; re-raise what went wrong; the frontend."""
        self._stop.set()
        self._g.get(timeout=DEADLINE)
        fe = self.guest.frontend
        assert self.ops > 0
        assert fe.stats.mismatches == 0 and fe.stats.protocol_violations == 0
        assert fe.stats.errors == 0 and fe.stats.lost == 0
        return fe


def _flood(fe: Frontend, n: int = 64) -> List[gevent.event.AsyncResult]:
    """Many writes (INDIRECT, 128 KiB each) and reads, published at once."""
    placed = []
    for i in range(n):
        placed.append(fe.submit_write(i * 256, pattern(700 + i, 256 * SECTOR), push=False))
        placed.append(fe.submit_read(i * 256 + 16384, 64, push=False))
    for q in range(len(fe.queues)):
        fe.push(q)
    return placed


def _abrupt_end_settles(host: SimHost, daemon: BackendProcess, url: str, victim: Guest,
                        by: Bystander) -> None:
    wait_until(lambda: not holds_domain(daemon.pid, host, victim.domid),
               "nothing of the vanished device stays mapped or open in the daemon")
    wait_until(lambda: not device_series(scrape(url), victim.domid, victim.disk.devid),
               "the vanished device's metric series vanish")
    by.finish()
    assert daemon.alive(), daemon.log_text()[-4000:]
    _no_traceback(daemon)


def test_backend_directory_removed_with_io_in_flight(served):
    """The backend directory vanishes while the ring is full of requests (docs/protocol.md
    §5: tear down at once): the daemon survives, another guest's disk keeps working
    throughout, every request of the victim resolves (answered or lost, never
    hung), and afterwards nothing of the victim stays mapped in the daemon and every
    grant the guest gave ends."""
    host, daemon, url = served
    with logs_on_failure(daemon):
        by = Bystander(host)
        victim = host.create_guest(size=64 * MiB)
        fe = victim.frontend
        placed = _flood(fe)
        host.toolstack.remove_backend_dir(victim.domid, victim.disk.devid)
        done = gevent.wait(placed, timeout=DEADLINE)
        assert len(done) == len(placed), "requests of the victim hung"
        wait_until(lambda: not fe.connected, "the guest notices its backend vanished")
        wait_until(lambda: fe.retry_grants() == 0, "every grant of the victim ended")
        _abrupt_end_settles(host, daemon, url, victim, by)
        assert fe.stats.mismatches == 0 and fe.stats.protocol_violations == 0
        host.destroy_guest(victim)
        by.guest.frontend.close()
        host.destroy_guest(by.guest)


def test_guest_destroyed_with_io_in_flight(served):
    """``xl destroy`` while the ring is full of requests: the daemon survives,
    another guest's disk keeps working throughout, and afterwards nothing of the
    destroyed guest's memory stays mapped (or open) in the daemon."""
    host, daemon, url = served
    with logs_on_failure(daemon):
        by = Bystander(host)
        victim = host.create_guest(size=64 * MiB)
        _flood(victim.frontend)
        host.destroy_guest(victim)
        _abrupt_end_settles(host, daemon, url, victim, by)
        by.guest.frontend.close()
        host.destroy_guest(by.guest)


# -- one device fails ------------------------------------------------------------------------
def test_one_failing_device_does_not_touch_the_other(served):
    """Beside a working disk, one whose image does not exist and one in a format
    gblk does not serve (qcow2): each failing device goes Closed with
    ``hotplug-status=error`` and a ``hotplug-error`` naming the problem, its guest
    driver is refused, the working disk keeps serving, and all three unplug
    cleanly."""
    host, daemon, url = served
    with logs_on_failure(daemon):
        g = host.create_guest(size=8 * MiB)
        fe = g.frontend
        missing = os.path.join(host.dir, "no-such-image.img")
        qcow = host.make_image("image.qcow2", 8 * MiB)
        bad = {
            XVDB: (host.toolstack.attach_disk(g.domid, missing, devid=XVDB), "no-such-image.img"),
            XVDC: (host.toolstack.attach_disk(g.domid, qcow, devid=XVDC, format="qcow2"),
                   "qcow2"),
        }
        for devid, (disk, needle) in bad.items():
            be = disk.backend_path
            closed = f"{be}/state"
            wait_until(lambda p=closed: host.xs.read(p) == str(int(XenbusState.CLOSED)),
                       f"device {devid} goes Closed")
            assert host.xs.read(f"{be}/hotplug-status") == "error"
            err = host.xs.read(f"{be}/hotplug-error") or ""
            assert needle in err, err
            bad_fe = host.frontend(g.domain, devid)
            with pytest.raises(FrontendError, match="refused"):
                bad_fe.connect(timeout=DEADLINE)
            assert host.xs.read(f"{be}/state") == str(int(XenbusState.CLOSED))
        data = pattern(80, MiB)
        fe.write(0, data)
        assert fe.read(0, 2048) == data
        samples = scrape(url)
        dom = str(g.domid)
        for devid in bad:
            assert metric(samples, "gblk_device_state", domain=dom, device=str(devid)) == 6
            assert metric(samples, "gblk_errors_total", domain=dom, device=str(devid),
                          reason="device_failed") >= 1
        for devid in bad:
            assert host.toolstack.detach_disk(g.domid, devid)
            wait_until(lambda d=devid: not device_series(scrape(url), g.domid, d),
                       f"device {devid} forgotten")
        assert fe.read(0, 2048) == data
        assert host.toolstack.detach_disk(g.domid, g.disk.devid)
        host.destroy_guest(g)
        assert daemon.alive()
        _no_traceback(daemon)


# -- the daemon stops or dies ----------------------------------------------------------------
class StateRecorder:
    """Every value a XenStore node takes (as a watcher sees it), on its own
    connection."""

    def __init__(self, host: SimHost, path: str) -> None:
        self.path = path
        self.values: List[Optional[str]] = []
        self._xs = GeventXenStore(host.socket_path, host.timeout)
        self._stop = gevent.event.Event()
        self._sub = self._xs.watch([path])
        self._g = gevent.spawn(self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.values.append(self._xs.read(self.path))
            self._sub.get(timeout=0.2)

    def stop(self) -> List[Optional[str]]:
        """Stop recording (idempotent); what was seen."""
        if not self._stop.is_set():
            self._stop.set()
            try:
                self._g.get(timeout=DEADLINE)
            finally:
                self._sub.close()
                self._xs.close()
        return self.values


REGION = 128  # sectors per write: 64 KiB, 16 segments (INDIRECT)


def _wave(fe: Frontend, first: int, n: int, seed: int) -> List[gevent.event.AsyncResult]:
    """``n`` writes of distinct regions starting at region ``first``, placed on every
    queue and published at once."""
    placed = [fe.submit_write((first + i) * REGION, pattern(seed + i, REGION * SECTOR),
                              push=False) for i in range(n)]
    for q in range(len(fe.queues)):
        fe.push(q)
    return placed


def _check_regions(fe: Frontend, image: str, first: int, n: int, seed: int) -> None:
    for i in range(n):
        want = pattern(seed + i, REGION * SECTOR)
        sector = (first + i) * REGION
        assert fe.read(sector, REGION) == want, f"region {first + i}"
        assert file_bytes(image, sector, REGION) == want, f"region {first + i} in the file"


def _takeover(host: SimHost, how: int) -> None:
    first = start_daemon(host, "first", DAEMON_TOML)
    second: Optional[BackendProcess] = None
    procs = [first]
    rec: Optional[StateRecorder] = None
    try:
        with logs_on_failure(*procs):
            metrics_url(first)
            g = host.create_guest(size=64 * MiB)
            fe = g.frontend
            rec = StateRecorder(host, f"{g.disk.backend_path}/state")
            fe.write(0, pattern(90, REGION * SECTOR))
            wave1 = _wave(fe, 1, 160, 1000)
            gevent.wait(wave1, count=1, timeout=DEADLINE)  # the daemon is serving them
            in_flight = sum(1 for r in wave1 if not r.ready())
            first.proc.send_signal(how)
            rc = first.stop(timeout=STOP_TIMEOUT + 10)
            assert in_flight > 0, "nothing was in flight when the signal came"
            if how == signal.SIGTERM:
                assert rc == 0, f"exit code {rc}"
                assert "still in flight" not in first.log_text()
            # rsp_prod must be an exact boundary: every request before it answered,
            # every unanswered one still in its slot for the next daemon
            behind = unanswered_behind_rsp_prod(fe)
            assert not behind, f"{len(behind)} unanswered requests lost from the ring: {behind[:4]}"
            answered = [_result(r, 0) for r in wave1 if r.ready()]
            assert all(res.ok for res in answered), [r for r in answered if not r.ok][:3]
            assert fe.stats.lost == 0
            # published while no backend runs: the next daemon finds them on the ring
            wave2 = _wave(fe, 201, 32, 3000)
            second = start_daemon(host, "second", DAEMON_TOML)
            procs.append(second)
        with logs_on_failure(*procs):
            for r in wave1 + wave2:
                res = _result(r)
                assert res.ok, res
            values = rec.stop()
            assert set(values) == {str(int(XenbusState.CONNECTED))}, values
            assert fe.connected and fe.stats.connects == 1
            assert fe.stats.protocol_violations == 0, fe.stats.violations
            assert fe.stats.lost == 0 and fe.stats.errors == 0
            _check_regions(fe, g.image, 1, 160, 1000)
            _check_regions(fe, g.image, 201, 32, 3000)
            assert fe.read(0, REGION) == pattern(90, REGION * SECTOR)
            fe.write(250 * REGION, pattern(91, REGION * SECTOR))
            assert fe.read(250 * REGION, REGION) == pattern(91, REGION * SECTOR)
            assert fe.stats.mismatches == 0
            fe.close()
            assert fe.retry_grants() == 0
            host.destroy_guest(g)
            assert second.alive()
    finally:
        if rec is not None:
            rec.stop()
        for p in procs:
            p.stop()


def test_sigterm_answers_in_flight_then_restart_takes_over():
    """SIGTERM with the rings full: every request the daemon consumed is answered
    before it exits (the guest sees none lost, all OKAY), it exits 0 without
    abandoning anything to its stop_timeout; requests published meanwhile stay on
    the ring. A restarted daemon takes the still-Connected guest over (the backend
    state never leaves Connected, the guest never reconnects), re-attaches the ring
    from rsp_prod and serves them, with every byte intact."""
    with SimHost() as host:
        _takeover(host, signal.SIGTERM)


def test_sigkill_then_restart_serves_unanswered_requests():
    """SIGKILL with the rings full: the requests the dead daemon consumed and never
    answered are consumed again by the restarted daemon (from rsp_prod) and answered
    OKAY, together with those published while no daemon ran; the guest never
    reconnects, and every byte is intact."""
    with SimHost() as host:
        _takeover(host, signal.SIGKILL)
