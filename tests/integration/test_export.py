"""Live export (issue 13): a running guest's disk read over NBD as it was at a point in time.

``gblk ctl export`` serves the disk read-only over NBD while the guest goes on
writing (copy-before-write into a side file). These tests run ``gblk serve`` on the
simulated host and read the export with Debian's ``qemu-img``: a full copy taken
while the guest writes, discards and flushes is byte for byte the image as it was
when the export started; with changed-block tracking, the dirty extents read through
``qemu:dirty-bitmap:cbt`` and applied to the previous full copy give the disk; the
README's backup steps work as written (``docs/examples/gblk-apply-extents``); bad
requests get one clear error and leave the daemon serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
from typing import Any, Iterator, List, Tuple

import gevent
import pytest

from gblk.errors import GblkError
from gblk.sim.guest.frontend import Frontend
from gblk.sim.harness.host import SimHost
from gblk.storage import nbdwire as w

from .backend_support import logs_on_failure, metric, metrics_url, pattern, scrape, start_daemon
from .qos_support import ask, ctl, first_disk

MiB = 1 << 20
SIZE = 32 * MiB
APPLY = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "examples",
                     "gblk-apply-extents")

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None and not os.environ.get("CI"),
                                reason="needs qemu-img (qemu-utils)")


def _toml(host: SimHost) -> str:
    return (f'[cbt]\ndirectory = "{os.path.join(host.dir, "cbt")}"\n'
            f'export_directory = "{os.path.join(host.dir, "export")}"\n')


@contextlib.contextmanager
def _served(name: str) -> Iterator[Tuple[SimHost, Any, Any]]:
    """A daemon (log kept on failure, stopped at the end) serving one guest's disk."""
    with SimHost() as host:
        b = start_daemon(host, name, _toml(host))
        with logs_on_failure(b):
            yield host, b, host.create_guest(size=SIZE)
            b.stop()


def _uri(sock: str) -> str:
    return f"nbd+unix:///?socket={sock}"


def _convert(sock: str, out: str) -> None:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", _uri(sock), out],
                   check=True, capture_output=True, timeout=300)


def _dirty_map(sock: str) -> List[dict]:
    p = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts",
                        f"driver=nbd,path={sock},x-dirty-bitmap=qemu:dirty-bitmap:cbt"],
                       check=True, capture_output=True, text=True, timeout=120)
    return json.loads(p.stdout)


def _image(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _fill(fe: Frontend, seed: int, chunks: int = 16) -> None:
    rnd = random.Random(seed)
    for i in range(chunks):
        n = rnd.choice([8, 64, 256, 2048])
        fe.write(rnd.randrange(0, SIZE // 512 - n), pattern(seed * 100 + i, n * 512))
    fe.flush()


class Writer:
    """Writes, discards and flushes all over the disk until stopped (verified by
    the frontend: its reads must see its own writes)."""

    def __init__(self, fe: Frontend, seed: int) -> None:
        self.fe = fe
        self.rnd = random.Random(seed)
        self.done = 0
        self.failed = 0
        self._stop = False
        self._g = [gevent.spawn(self._run, i) for i in range(4)]

    def _run(self, i: int) -> None:
        fe, rnd = self.fe, self.rnd
        k = 0
        while not self._stop:
            k += 1
            n = rnd.choice([1, 8, 64, 512, 2048])
            sector = rnd.randrange(0, SIZE // 512 - n)
            if k % 11 == 0:
                r = fe.submit_discard(sector, n).get(timeout=60)
            elif k % 7 == 0:
                r = fe.submit_flush().get(timeout=60)
            else:
                r = fe.submit_write(sector, pattern(i * 1000 + k, n * 512)).get(timeout=60)
            if r.ok:
                self.done += 1
            else:
                self.failed += 1

    def stop(self) -> None:
        self._stop = True
        gevent.joinall(self._g, timeout=60)


def test_an_export_read_while_the_guest_writes_is_the_point_in_time_image():
    """Data written and flushed, the image's bytes kept, then ``gblk ctl export``: the
    guest rewrites every block (each copied before its write) and goes on writing,
    discarding and flushing while ``qemu-img convert`` reads the export: the copy is
    the kept image byte for byte, the guest reads its own new data, and after
    ``unexport`` the side file is gone and the image is the guest's. The metrics
    show the export and the bytes copied."""
    with _served("export") as (host, b, g):
        url = metrics_url(b)
        fe = g.frontend
        disk = first_disk(fe)
        _fill(fe, 1)
        kept = _image(g.image)
        sock = os.path.join(host.dir, "exp.sock")
        _, got, _ = ctl(host.control_socket, "export", disk, "--socket", sock)
        assert got["exported"] and got["socket"] == sock and got["size_bytes"] == SIZE
        assert "dirty_bitmap" not in got  # CBT is off: no dirty-bitmap context
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        rows = ask(host.control_socket, "list", disk)
        assert [r["export"] for r in rows if r["disk"] == disk] == [sock]
        listed = subprocess.run([sys.executable, "-m", "gblk", "list", "--control-socket",
                                 host.control_socket], capture_output=True, text=True,
                                check=True, timeout=60).stdout
        assert f"{disk} exported read-only over NBD on {sock}" in listed
        # every block rewritten after the point in time (a 1 MiB write at a time),
        # then writes go on while the export is read
        for sector in range(0, SIZE // 512, 2048):
            fe.write(sector, pattern(sector, MiB))
        writer = Writer(fe, 2)
        out = os.path.join(host.dir, "copy.raw")
        _convert(sock, out)
        gevent.sleep(0.2)
        writer.stop()
        assert writer.done > 0 and writer.failed == 0
        assert _image(out) == kept
        s = scrape(url)
        dom = str(g.domid)
        assert metric(s, "gblk_export_open", domain=dom) == 1
        assert metric(s, "gblk_export_read_bytes_total", domain=dom) >= SIZE
        assert metric(s, "gblk_export_cbw_bytes_total", domain=dom) == SIZE
        assert 0 < metric(s, "gblk_export_side_file_bytes", domain=dom) <= SIZE
        _, got, _ = ctl(host.control_socket, "unexport", disk)
        assert got["exported"] is False and got["cbw_bytes"] == SIZE
        assert not os.path.exists(sock)
        assert os.listdir(os.path.join(host.dir, "export")) == []
        assert metric(scrape(url), "gblk_export_open", domain=dom) == 0
        assert fe.read(0, SIZE // 512) == _image(g.image)
        assert fe.stats.mismatches == 0 and fe.stats.protocol_violations == 0


def test_an_incremental_copy_of_the_dirty_extents_gives_the_disk():
    """The README's backup: ``cbt enable``, export, full copy with ``qemu-img
    convert``, ``cbt reset``, unexport; the guest writes (also while the next export
    is read); export again: the dirty extents ``qemu-img map`` reports through
    ``qemu:dirty-bitmap:cbt``, copied into the full copy by
    ``docs/examples/gblk-apply-extents``, give the image at the second point in
    time, and the copy holds only what changed. Writes made while an export is
    open stay in the map after ``cbt reset``."""
    with _served("incr") as (host, b, g):
        fe = g.frontend
        disk = first_disk(fe)
        cs = host.control_socket
        ctl(cs, "cbt", "enable", disk)
        _fill(fe, 3)
        _, got, _ = ctl(cs, "export", disk)
        sock = got["socket"]
        assert got["dirty_bitmap"] == "qemu:dirty-bitmap:cbt"
        assert os.path.dirname(sock) == os.path.dirname(cs)
        backup = os.path.join(host.dir, "backup.raw")
        _convert(sock, backup)
        fe.write(5 * 128, pattern(77, 4096))  # after the point in time: block 5
        _, reset, _ = ctl(cs, "cbt", "reset", disk)
        assert reset["extents"]
        # the write since the export is still marked: the next backup copies it
        assert ask(cs, "cbt", disk, action="show")["extents"] == [[5 * 64 * 1024, 64 * 1024]]
        ctl(cs, "unexport", disk)

        _fill(fe, 4, chunks=6)
        fe.discard(20 * 2048, 2048)
        fe.flush()
        kept = _image(g.image)
        _, got, _ = ctl(cs, "export", disk)
        # the map at the point in time: what changed since the reset (and block 5)
        changed = ask(cs, "cbt", disk, action="show")["extents"]
        assert [5 * 64 * 1024, 64 * 1024] in changed
        writer = Writer(fe, 5)  # the guest goes on: the export does not move
        extents = _dirty_map(sock)
        dirty = [e for e in extents if not e["data"]]
        assert sum(e["length"] for e in extents) == SIZE
        assert [[e["start"], e["length"]] for e in dirty] == changed
        if shutil.which("nbdinfo") or os.environ.get("CI"):  # libnbd-bin: the same map
            p = subprocess.run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:cbt",
                                _uri(sock)], check=True, capture_output=True, text=True,
                               timeout=120)
            got = [[m["offset"], m["length"]] for m in json.loads(p.stdout)
                   if m["type"] & w.STATE_DIRTY]
            assert got == [[e["start"], e["length"]] for e in dirty]
            nbdcopy = os.path.join(host.dir, "nbdcopy.raw")
            subprocess.run(["nbdcopy", _uri(sock), nbdcopy], check=True, timeout=300,
                           capture_output=True)
            assert _image(nbdcopy) == kept
        subprocess.run([sys.executable, APPLY, _uri(sock), backup],
                       input=json.dumps(extents), text=True, check=True, timeout=300,
                       capture_output=True)
        writer.stop()
        assert writer.failed == 0
        assert _image(backup) == kept
        assert sum(e["length"] for e in dirty) < SIZE
        _, reset, _ = ctl(cs, "cbt", "reset", disk)
        assert reset["extents"]
        # the writer's writes came after the point in time: still marked
        assert ask(cs, "cbt", disk, action="show")["dirty_bytes"] > 0
        ctl(cs, "unexport", disk)
        assert fe.stats.mismatches == 0


def _connect(sock: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sock)
    return s


def _garbage(sock: str) -> bytes:
    """Connect, read the greeting, send nonsense; what the server said after it."""
    s = _connect(sock)
    try:
        assert len(s.recv(18)) == 18
        s.sendall(b"\x00\x00\x00\x03" + b"GET / HTTP/1.0\r\n\r\n" * 4)
        out = b""
        while True:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:  # closed with the garbage unread
                return out
            if not chunk:
                return out
            out += chunk
    finally:
        s.close()


def _write_attempt(sock: str) -> int:
    """Handshake (simple replies), NBD_CMD_WRITE of 4 KiB: the reply's error."""
    s = _connect(sock)
    try:
        exp = w.handshake(s, "")
        assert exp.flags & w.TF_READ_ONLY
        s.sendall(w.request(w.CMD_WRITE, 7, 0, 4096) + bytes(4096))
        error, cookie = w.read_reply_header(s)
        assert cookie == 7
        s.sendall(w.request(w.CMD_READ, 8, 0, 512))
        ok, cookie = w.read_reply_header(s)
        assert (ok, cookie) == (0, 8)
        data = w.recv_exact(s, 512)
        s.sendall(w.request(w.CMD_DISC, 9, 0, 0))
        assert data == pattern(9, 512)
        return error
    finally:
        s.close()


def test_bad_requests_get_one_clear_error_and_the_daemon_serves_on():
    """Unknown disk, a second export, a bad address, unexport of a disk not exported,
    a client sending garbage, an NBD write: each is refused with one line (or an
    EPERM reply), the export and the guest's IO go on."""
    with _served("bad") as (host, b, g):
        fe = g.frontend
        disk = first_disk(fe)
        cs = host.control_socket
        fe.write(0, pattern(9, 4096))
        for args, words in [
            (("export", "d99/51712"), "no disk d99/51712"),
            (("unexport", disk), "is not exported"),
            (("export", disk, "--address", "10.1.2.3:10809"), "only loopback"),
            (("export", disk, "--address", "nonsense"), "HOST:PORT expected"),
            (("export", disk, "--socket", os.path.join(host.dir, "no", "such", "x.sock")),
             "no directory"),
        ]:
            rc, _, err = ctl(cs, *args, check=False)
            assert rc == 1 and words in err, (args, err)
            assert len(err.strip().splitlines()) == 1, err
        for more, words in [({"socket": 5}, "must be a string"),
                            ({"socket": "/tmp/a.sock", "address": "127.0.0.1:0"}, "not both"),
                            ({"socket": "relative.sock"}, "absolute path")]:
            with pytest.raises(GblkError, match=words):
                ask(cs, "export", disk, **more)
        _, got, _ = ctl(cs, "export", disk)
        sock = got["socket"]
        rc, _, err = ctl(cs, "export", disk, "--socket", os.path.join(host.dir, "y.sock"),
                         check=False)
        assert rc == 1 and "already exported" in err
        assert _garbage(sock) == b""  # the connection is closed, nothing else
        assert _write_attempt(sock) == w.NBD_EPERM
        tcp = ask(cs, "unexport", disk) and ask(cs, "export", disk, address="127.0.0.1:0")
        host_, port = tcp["address"].rsplit(":", 1)
        s = socket.create_connection((host_, int(port)), timeout=10)
        try:
            assert w.handshake(s, "").size == SIZE
        finally:
            s.close()
        _convert_tcp = subprocess.run(
            ["qemu-img", "info", "--output=json", f"nbd://{tcp['address']}/"],
            capture_output=True, text=True, timeout=60)
        assert json.loads(_convert_tcp.stdout)["virtual-size"] == SIZE
        ask(cs, "unexport", disk)
        fe.write(8, pattern(10, 4096))
        assert fe.read(8, 8) == pattern(10, 4096)
        assert fe.stats.mismatches == 0
        assert "Traceback" not in b.log_text()


def test_the_side_file_has_no_name_and_a_daemon_stop_ends_the_export():
    """The export's side file is nameless (nothing to clean up after a crash); a
    stopped daemon leaves no socket or side file, and a restarted one serves no
    export."""
    with SimHost() as host:
        toml = _toml(host)
        b = start_daemon(host, "stop", toml)
        with logs_on_failure(b):
            g = host.create_guest(size=SIZE)
            fe = g.frontend
            disk = first_disk(fe)
            _, got, _ = ctl(host.control_socket, "export", disk)
            fe.write(0, pattern(1, MiB))
            assert os.listdir(os.path.join(host.dir, "export")) == []
            b.stop()
            assert not os.path.exists(got["socket"])
        b2 = start_daemon(host, "stop2", toml)
        with logs_on_failure(b2):
            from .backend_support import wait_ready

            wait_ready(b2)
            rows = ask(host.control_socket, "list", disk)
            assert all(r["export"] is None for r in rows)
            b2.stop()


def test_writes_in_flight_when_the_export_starts_are_wholly_in_it_or_wholly_not():
    """Guests write fresh slots (each once, across block boundaries) while ``export``
    is asked: a write acknowledged before the request went is in the export, one
    submitted after the answer came is not, and one in flight meanwhile is there
    whole or not at all (never torn); every request is answered once, all succeed."""
    with _served("inflight") as (host, b, g):
        fe = g.frontend
        disk = first_disk(fe)
        slot = 136  # sectors: 68 KiB, so slots straddle the 64 KiB blocks
        slots = SIZE // 512 // slot
        times: dict = {}  # slot -> (submitted, acknowledged)
        clock = [0]
        state = {"stop": False, "next": 0}

        def worker() -> None:
            while not state["stop"] and state["next"] < slots:
                i = state["next"]
                state["next"] += 1
                clock[0] += 1
                t0 = clock[0]
                r = fe.submit_write(i * slot, pattern(i + 1, slot * 512)).get(timeout=60)
                assert r.ok
                clock[0] += 1
                times[i] = (t0, clock[0])

        workers = [gevent.spawn(worker) for _ in range(8)]
        while state["next"] < slots // 4:
            gevent.sleep(0.001)
        clock[0] += 1
        asked = clock[0]
        got = ask(host.control_socket, "export", disk)
        clock[0] += 1
        answered = clock[0]
        while state["next"] < slots // 2:
            gevent.sleep(0.001)
        state["stop"] = True
        gevent.joinall(workers, timeout=60)
        assert all(w.successful() for w in workers)
        out = os.path.join(host.dir, "inflight.raw")
        _convert(got["socket"], out)
        image = _image(out)
        before = after = either = 0
        for i, (t0, t1) in times.items():
            data = image[i * slot * 512:(i + 1) * slot * 512]
            new = pattern(i + 1, slot * 512)
            if t1 < asked:
                assert data == new, i
                before += 1
            elif t0 > answered:
                assert data == bytes(len(data)), i
                after += 1
            else:
                assert data in (new, bytes(len(data))), i
                either += 1
        assert before and after
        ask(host.control_socket, "unexport", disk)
        assert fe.stats.mismatches == 0 and fe.stats.protocol_violations == 0
