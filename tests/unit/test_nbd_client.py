"""gblk's NBD client (gblk.storage.nbd, nbdwire, qemunbd) against real servers: nbdkit
and qemu-nbd. The handshake and the export's flags, many requests in flight from
threads over one socket, requests longer than the server takes, read-only exports,
a server restarted under the client; and a tiny hostile server for what a real one
never sends (malformed replies, silence): the request fails with an error, nothing
hangs."""

from __future__ import annotations

import _socket
import errno
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
from gevent.monkey import get_original
from gevent.threadpool import ThreadPool

from gblk.errors import StorageError
from gblk.storage import nbdwire as w
from gblk.storage import open_store, qemunbd
from gblk.storage.nbd import NbdStore, remote_store

MiB = 1 << 20
#: the hostile servers run in real threads: real sockets (the session is monkey-patched)
RealSocket = get_original("socket", "socket")
# skipped where the tools are missing, but never under CI (.ci/run installs both: a
# missing one there is a broken install step, and the tests then fail)
_CI = bool(os.environ.get("CI"))
needs_nbdkit = pytest.mark.skipif(shutil.which("nbdkit") is None and not _CI, reason="needs nbdkit")
needs_qemu = pytest.mark.skipif(shutil.which("qemu-nbd") is None and not _CI, reason="needs qemu-utils")


def pattern(n: int, seed: int) -> bytes:
    block = bytes((seed * 131 + i * 7 + (i >> 9)) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def wait_socket(path: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise AssertionError(f"nothing listens on {path}")


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start nbdkit with arguments; the URI of its export."""
    procs: List[subprocess.Popen] = []

    def start(*args: str, sock: str = "") -> str:
        sock = sock or str(tmp_path / f"kit{len(procs)}.sock")
        procs.append(subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "--unix",
                                       sock, *args], stderr=subprocess.DEVNULL))
        wait_socket(sock)
        return f"nbd+unix:///?socket={sock}"

    start.procs = procs  # type: ignore[attr-defined]
    yield start
    for p in procs:
        p.kill()
        p.wait()


def rw(store: NbdStore, offset: int, data: bytes) -> bytes:
    store.writev([memoryview(data)], offset)
    out = bytearray(len(data))
    store.readv([memoryview(out)], offset)
    return bytes(out)


@needs_nbdkit
def test_export_size_flags_and_verified_io(nbdkit) -> None:
    """The export's size, discard offered (nbdkit memory trims and zeroes), IO across
    several views, discard reads back zeros, flush."""
    s = remote_store(nbdkit("memory", "16M"), readonly=False)
    try:
        assert s.size() == 16 * MiB and s.supports_discard and not s.readonly
        a, b = bytearray(pattern(4096, 1)), bytearray(pattern(8192, 2))
        s.writev([memoryview(a), memoryview(b)], 512)
        out1, out2 = bytearray(1000), bytearray(12288 - 1000)
        s.readv([memoryview(out1), memoryview(out2)], 512)
        assert bytes(out1 + out2) == bytes(a + b)
        s.flush()
        s.discard(4096, 8192)
        out = bytearray(12288)
        s.readv([memoryview(out)], 0)
        assert out[:512] == bytes(512) and out[512:4096] == a[:3584] and out[4096:] == bytes(8192)
        assert s.metrics()["state"] == "connected"
    finally:
        s.close()
    assert s.metrics()["state"] == "closed"


@needs_nbdkit
def test_many_requests_in_flight_from_threads(nbdkit) -> None:
    """16 threads, 40 write+read pairs each, over the one socket: each reply reaches
    the request it answers (a reply read into the wrong thread's pages would show)."""
    s = remote_store(nbdkit("memory", "64M"), readonly=False)
    pool = ThreadPool(16)

    def worker(k: int) -> int:
        for j in range(40):
            off = (k * 40 + j) * 16384
            assert rw(s, off, pattern(16384, k * 40 + j)) == pattern(16384, k * 40 + j)
        return k

    try:
        assert sorted(pool.spawn(worker, k).get() for k in range(16)) == list(range(16))
        out = bytearray(16384)
        s.readv([memoryview(out)], (5 * 40 + 7) * 16384)
        assert bytes(out) == pattern(16384, 5 * 40 + 7)
    finally:
        pool.kill()
        s.close()


@needs_nbdkit
def test_large_requests_both_ways_do_not_deadlock(nbdkit) -> None:
    """16 threads of 1 MiB writes and reads at once: more than the socket buffers hold
    both ways, so a thread blocked sending must never be the only one meant to read
    (the server stops reading while its replies wait)."""
    s = remote_store(nbdkit("memory", "64M"), readonly=False)
    pool = ThreadPool(16)

    def worker(k: int) -> bool:
        data = pattern(MiB, k)
        for j in range(4):
            off = (k * 4 + j) * MiB  # 15 threads x 4: 60 distinct MiB
            s.writev([memoryview(data)], off)
            out = bytearray(MiB)
            s.readv([memoryview(out)], off)
            assert bytes(out) == data
        return True

    try:
        assert all(pool.spawn(worker, k).get(timeout=60) for k in range(15))
        assert s.connection_errors == 0  # a stall would have ended in the IO timeout
    finally:
        pool.kill()
        s.close()


@needs_nbdkit
def test_request_longer_than_the_server_takes(nbdkit) -> None:
    """A request over the export's maximum payload goes as several."""
    s = remote_store(nbdkit("memory", "16M"), readonly=False)
    try:
        s.max_payload = 64 * 1024
        views = [memoryview(bytearray(pattern(4096, i))) for i in range(100)]
        s.writev(views, 8192)
        out = bytearray(100 * 4096)
        s.readv([memoryview(out)], 8192)
        assert bytes(out) == b"".join(bytes(v) for v in views)
    finally:
        s.close()


@needs_nbdkit
def test_read_only_export(nbdkit) -> None:
    """nbdkit -r: the store is read-only whatever was asked, writes refused (EROFS)."""
    s = remote_store(nbdkit("-r", "memory", "1M"), readonly=False)
    try:
        assert s.readonly and not s.supports_discard or s.readonly
        with pytest.raises(OSError) as ei:
            s.writev([memoryview(bytearray(512))], 0)
        assert ei.value.errno == errno.EROFS
    finally:
        s.close()


@needs_nbdkit
def test_server_restarted_under_the_client(nbdkit, tmp_path: Path) -> None:
    """The server goes away and comes back: requests meanwhile fail with EIO (no
    hang); afterwards the store reconnects; a write acknowledged but not flushed
    before the loss makes the next flush fail, once."""
    sock = str(tmp_path / "restart.sock")
    s = remote_store(nbdkit("memory", "4M", sock=sock), readonly=False)
    try:
        rw(s, 0, pattern(4096, 1))
        nbdkit.procs[-1].kill()
        nbdkit.procs[-1].wait()
        with pytest.raises(OSError) as ei:
            s.readv([memoryview(bytearray(512))], 0)
        assert ei.value.errno == errno.EIO
        os.unlink(sock)
        nbdkit("memory", "4M", sock=sock)
        time.sleep(1.1)  # the reconnect backoff
        assert rw(s, 0, pattern(4096, 2)) == pattern(4096, 2)
        assert s.reconnects == 1 and s.lost_writes == 1
        with pytest.raises(OSError, match="had not flushed"):
            s.flush()
        s.flush()
    finally:
        s.close()


@needs_qemu
def test_unknown_export_name_and_bad_uris(tmp_path: Path) -> None:
    """An export the server does not have, and URIs gblk cannot use: one clear
    StorageError each."""
    img = tmp_path / "x.raw"
    img.write_bytes(bytes(MiB))
    sock = str(tmp_path / "q.sock")
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-x", "there", "-k", sock, "-t", str(img)],
                         stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock)
        with pytest.raises(StorageError, match="refused export 'elsewhere'"):
            open_store("nbd", f"nbd+unix:///elsewhere?socket={sock}", readonly=False)
        s = open_store("nbd", f"nbd+unix:///there?socket={sock}", readonly=False)
        # qemu-nbd's default takes one client: the size probe gives up (once) and the
        # size stays what the handshake said
        assert s.size() == MiB
        t0 = time.monotonic()
        assert s.size() == MiB and time.monotonic() - t0 < 0.5
        assert rw(s, 0, pattern(4096, 5)) == pattern(4096, 5)  # type: ignore[arg-type]
        s.close()
    finally:
        p.kill()
        p.wait()
    for uri, needle in (("nbds://h/x", "scheme"), ("nbd:///x", "no host"),
                        ("nbd+unix:///x", "socket=PATH"), ("nbd://h:99999/x", "bad port")):
        with pytest.raises(StorageError, match=needle):
            open_store("nbd", uri, readonly=False)
    assert w.parse_uri("nbd://host:1234/a%20b") == w.Address("a b", host="host", port=1234)


@needs_qemu
def test_qemu_nbd_image_and_its_command_line(tmp_path: Path) -> None:
    """A qcow2 image through the qemu-nbd gblk starts: writeback cache with flushes
    on (never unsafe), the format given (never probed); the server stops with the
    store, and a refused image says qemu-nbd's reason."""
    img = str(tmp_path / "a.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"], check=True)
    s = open_store("qcow2", img, readonly=False)
    srv = s.server  # type: ignore[attr-defined]
    try:
        argv = srv.argv("qemu-nbd")
        assert "--format=qcow2" in argv and "--cache=writeback" in argv
        assert not any("unsafe" in a for a in argv)
        assert rw(s, 4096, pattern(65536, 3)) == pattern(65536, 3)  # type: ignore[arg-type]
        s.flush()
    finally:
        s.close()
    assert not srv.alive() and not os.path.exists(srv.socket)
    assert subprocess.run(["qemu-img", "check", "-q", img]).returncode == 0
    with pytest.raises(StorageError, match="qemu-nbd refused"):
        open_store("vmdk", img, readonly=False)  # a qcow2 file is not a vmdk
    assert not qemunbd.servers()


# -- a hostile server ---------------------------------------------------------------------
def _serve_once(listener: "_socket.socket", misbehave: Callable[["_socket.socket", bytes], None]) -> None:
    """One connection: an honest handshake, then ``misbehave`` with the first request."""
    c, _ = listener.accept()
    try:
        c.sendall(struct.pack(">QQH", w.NBDMAGIC, w.IHAVEOPT, 3))
        w.recv_exact(c, 4)
        _magic, _opt, n = struct.unpack(">QII", w.recv_exact(c, 16))
        w.recv_exact(c, n)
        info = struct.pack(">HQH", w.INFO_EXPORT, MiB, w.TF_HAS_FLAGS | w.TF_SEND_FLUSH)
        c.sendall(struct.pack(">QIII", w.OPT_REPLY_MAGIC, w.OPT_GO, w.REP_INFO, len(info)) + info)
        c.sendall(struct.pack(">QIII", w.OPT_REPLY_MAGIC, w.OPT_GO, w.REP_ACK, 0))
        req = w.recv_exact(c, 28)
        misbehave(c, req)
        time.sleep(0.7)
    except OSError:
        pass
    finally:
        c.close()


def _cookie(req: bytes) -> int:
    return int(struct.unpack_from(">Q", req, 8)[0])


HOSTILE = {
    "bad magic": lambda c, r: c.sendall(struct.pack(">IIQ", 0x12345678, 0, _cookie(r))),
    "unknown cookie": lambda c, r: c.sendall(struct.pack(">IIQ", w.SIMPLE_REPLY_MAGIC, 0, 999)),
    "structured reply": lambda c, r: c.sendall(struct.pack(">IHHQI", w.STRUCTURED_REPLY_MAGIC, 0, 0,
                                                           _cookie(r), 0)),
    "closed mid-payload": lambda c, r: c.sendall(struct.pack(">IIQ", w.SIMPLE_REPLY_MAGIC, 0,
                                                             _cookie(r)) + b"x" * 100),
    "silence": lambda c, r: None,
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_server_replies_fail_the_request(tmp_path: Path, kind: str) -> None:
    """Each malformed reply (or none at all, past the IO timeout) fails the read with
    EIO once the reconnects are refused too; the caller never hangs."""
    sock = str(tmp_path / "hostile.sock")
    lst = RealSocket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    lst.bind(sock)
    lst.listen(4)
    pool = ThreadPool(1)
    served = pool.spawn(_serve_once, lst, HOSTILE[kind])
    addr = w.Address("", unix=sock)
    from gblk.storage import nbd as nbdmod

    store = NbdStore(lambda fresh: nbdmod.open_connection(addr, 2.0, 0.5), False, "hostile")
    try:
        served.get(timeout=0) if served.ready() else None
        lst.close()  # no second connection: the reconnect fails
        os.unlink(sock)
        t0 = time.monotonic()
        with pytest.raises(OSError) as ei:
            store.readv([memoryview(bytearray(4096))], 0)
        assert ei.value.errno == errno.EIO
        assert time.monotonic() - t0 < 5
        assert store.connection_errors >= 1
    finally:
        store.close()
        served.get(timeout=10)
        pool.kill()


def test_not_an_nbd_server(tmp_path: Path) -> None:
    """Something else on the socket: a clear error at open."""
    sock = str(tmp_path / "other.sock")
    lst = RealSocket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    lst.bind(sock)
    lst.listen(1)
    pool = ThreadPool(1)

    def talk() -> None:
        c, _ = lst.accept()
        c.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(32))
        time.sleep(0.5)
        c.close()

    job = pool.spawn(talk)
    try:
        with pytest.raises(StorageError, match="not an NBD server"):
            open_store("nbd", f"nbd+unix:///?socket={sock}", readonly=False)
    finally:
        job.get(timeout=10)
        lst.close()
        pool.kill()
