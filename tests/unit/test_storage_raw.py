"""Raw backing stores (gblk.storage): exact vectored IO on a real temp file, hole
punching, flush, read-only refusals and the errors a misconfigured disk gets.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path
from typing import Iterator, List

import pytest

from gblk.errors import StorageError
from gblk.storage import open_store
from gblk.storage import raw as rawmod
from gblk.storage.base import SUPPORTED_FORMATS
from gblk.storage.raw import IOV_MAX, RawStore

from .unit_support import SIZE, image_fixture, pattern, views_of  # noqa: F401 - a fixture


@pytest.fixture
def store(image: str) -> Iterator[RawStore]:
    s = open_store("raw", image, readonly=False)
    assert isinstance(s, RawStore)
    yield s
    s.close()


def test_open_store_raw(store: RawStore, image: str) -> None:
    """A raw file opens with its byte size and 512-byte logical sectors."""
    assert isinstance(store, RawStore)
    assert store.size() == SIZE
    assert store.sector_size == 512 and not store.readonly


@pytest.mark.parametrize("sizes", [[4096], [512, 1024, 2560], [512] * 11, [3584, 512, 4096]])
def test_readv_exact(store: RawStore, sizes: List[int]) -> None:
    """readv fills every view, in order, from the offset on: no byte more, no less."""
    views = views_of(*sizes)
    store.readv(views, 8192)
    assert b"".join(bytes(v) for v in views) == pattern(SIZE)[8192:8192 + sum(sizes)]


def test_writev_exact(store: RawStore, image: str) -> None:
    """writev writes the views back to back from the offset; the bytes around are
    untouched."""
    data = [pattern(512, 1), pattern(1024, 2), pattern(3584, 3)]
    store.writev([memoryview(d) for d in data], 4096 + 512)
    disk = open(image, "rb").read()
    want = bytearray(pattern(SIZE))
    want[4608:4608 + 5120] = b"".join(data)
    assert disk == bytes(want)


def test_more_views_than_iov_max(store: RawStore, image: str) -> None:
    """A request with more views than IOV_MAX (a 4096-segment indirect request) is split
    into several preadv/pwritev calls, still exact."""
    n = IOV_MAX * 2 + 37
    data = [i.to_bytes(4, "little") + pattern(508, i) for i in range(n)]  # each view unique
    store.writev([memoryview(d) for d in data], 0)
    out = views_of(*[512] * n)
    store.readv(out, 0)
    assert [bytes(v) for v in out] == data
    assert open(image, "rb").read(n * 512) == b"".join(data)


def test_empty_views_are_skipped(store: RawStore) -> None:
    """Zero-length views move nothing and do not confuse the offset bookkeeping."""
    views = [memoryview(bytearray(0)), memoryview(bytearray(512)), memoryview(bytearray(0)),
             memoryview(bytearray(512))]
    store.readv(views, 512)
    assert bytes(views[1]) + bytes(views[3]) == pattern(SIZE)[512:1536]


@pytest.mark.parametrize("step", [1, 100, 511, 513, 4095])
def test_short_transfers_are_resumed(store: RawStore, image: str, monkeypatch: pytest.MonkeyPatch,
                                     step: int) -> None:
    """preadv/pwritev may move fewer bytes than asked (signals, some filesystems, block
    devices at their limits); the store resumes exactly where the kernel stopped,
    including inside a view."""
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = []

    def clip(bufs: List[memoryview]) -> List[memoryview]:
        out, left = [], step
        for b in bufs:
            if left <= 0:
                break
            out.append(memoryview(b)[:left])
            left -= len(out[-1])
        return out

    def short_preadv(fd: int, bufs: List[memoryview], off: int) -> int:
        calls.append(off)
        return real_preadv(fd, clip(bufs), off)

    def short_pwritev(fd: int, bufs: List[memoryview], off: int) -> int:
        calls.append(off)
        return real_pwritev(fd, clip(bufs), off)

    monkeypatch.setattr(rawmod.os, "preadv", short_preadv)
    monkeypatch.setattr(rawmod.os, "pwritev", short_pwritev)
    views = views_of(1024, 512, 2560)
    store.readv(views, 4096)
    assert b"".join(bytes(v) for v in views) == pattern(SIZE)[4096:4096 + 4096]
    assert len(calls) == -(-4096 // step)
    data = pattern(4096, 9)
    store.writev([memoryview(data[:1000]), memoryview(data[1000:])], 8192)
    monkeypatch.undo()
    assert open(image, "rb").read()[8192:8192 + 4096] == data


def test_read_past_the_end_is_an_io_error(store: RawStore) -> None:
    """A read the file cannot satisfy raises OSError (answered ERROR), never returns
    half-filled buffers as success."""
    views = views_of(4096)
    with pytest.raises(OSError) as ei:
        store.readv(views, SIZE - 512)
    assert ei.value.errno == errno.EIO


def test_discard_punches_a_hole(store: RawStore, image: str) -> None:
    """Discard on a file punches a hole: the range reads back zeros, the file's
    allocated blocks drop, its size stays, and the bytes around are intact."""
    with open(image, "r+b") as f:
        os.fsync(f.fileno())
    before = os.stat(image).st_blocks
    store.discard(65536, 256 * 1024)
    st = os.stat(image)
    assert st.st_size == SIZE
    assert st.st_blocks < before
    out = views_of(256 * 1024 + 1024)
    store.readv(out, 65536 - 512)
    got = bytes(out[0])
    assert got[:512] == pattern(SIZE)[65536 - 512:65536]
    assert got[512:512 + 256 * 1024] == bytes(256 * 1024)
    assert got[-512:] == pattern(SIZE)[65536 + 256 * 1024:65536 + 256 * 1024 + 512]


def test_secure_discard_on_a_file_and_empty_discard(store: RawStore) -> None:
    """Secure discard of a file is the same hole punch; a zero-length discard is a no-op."""
    store.discard(0, 4096, secure=True)
    store.discard(4096, 0)
    out = views_of(8192)
    store.readv(out, 0)
    assert bytes(out[0]) == bytes(4096) + pattern(SIZE)[4096:8192]


def test_flush(store: RawStore) -> None:
    """flush (fdatasync) succeeds on a written file."""
    store.writev([memoryview(b"x" * 512)], 0)
    store.flush()


def test_read_only_open_refuses_writes(image: str) -> None:
    """XSA-142 at the bottom layer: a store opened read-only cannot write or punch
    holes, whatever the layers above let through, and the file is unchanged."""
    s = open_store("raw", image, readonly=True)
    try:
        assert s.readonly
        with pytest.raises(OSError):
            s.writev([memoryview(b"\xff" * 512)], 0)
        with pytest.raises(OSError):
            s.discard(0, 4096)
        views = views_of(512)
        s.readv(views, 0)
        assert bytes(views[0]) == pattern(512)
    finally:
        s.close()
    assert open(image, "rb").read() == pattern(SIZE)


def test_size_follows_growth(store: RawStore, image: str) -> None:
    """size() re-reads the file: an online resize is noticed."""
    with open(image, "r+b") as f:
        f.truncate(SIZE * 2)
    assert store.size() == SIZE * 2


def test_direct_io(image: str) -> None:
    """O_DIRECT (direct-io-safe) opens on a filesystem that supports it and moves
    page-aligned buffers exactly."""
    try:
        s = open_store("raw", image, readonly=False, direct=True)
    except StorageError as e:  # tmpfs refuses O_DIRECT: the message says so
        assert "O_DIRECT" in str(e)
        return
    try:
        buf = mmap.mmap(-1, 8192)
        s.readv([memoryview(buf)], 4096)
        assert bytes(buf) == pattern(SIZE)[4096:4096 + 8192]
    finally:
        s.close()


@pytest.mark.parametrize("fmt", ["luks", "parallels", "aio", ""])
def test_unsupported_format_error(image: str, fmt: str) -> None:
    """A format gblk cannot serve is a StorageError naming the format, the path and
    what is served, so the operator sees why the disk did not connect."""
    with pytest.raises(StorageError) as ei:
        open_store(fmt, image, readonly=False)
    msg = str(ei.value)
    assert repr(fmt) in msg and image in msg
    assert all(f in msg for f in SUPPORTED_FORMATS)


def test_missing_file_error(tmp_path: Path) -> None:
    """A missing image is a StorageError naming the path and the reason."""
    path = str(tmp_path / "nope.img")
    with pytest.raises(StorageError) as ei:
        open_store("raw", path, readonly=False)
    assert path in str(ei.value) and "No such file" in str(ei.value)


@pytest.mark.parametrize("readonly", [True, False])
def test_directory_is_refused(tmp_path: Path, readonly: bool) -> None:
    """A directory is neither a file nor a block device: a StorageError that says so
    (not a crash later on the first IO)."""
    with pytest.raises(StorageError, match="is a directory: gblk serves only a regular file"):
        open_store("raw", str(tmp_path), readonly=readonly)


def _fifo_refused(path: str, readonly: bool) -> None:
    with pytest.raises(StorageError) as ei:
        open_store("raw", path, readonly=readonly)
    assert str(ei.value) == (f"{path} is a FIFO: gblk serves only a regular file or a "
                             "block device")


@pytest.mark.parametrize("readonly", [True, False])
def test_fifo_is_refused_without_opening_it(tmp_path: Path, readonly: bool) -> None:
    """Issue 10: a FIFO opened O_RDONLY waits for a writer for ever, so the type is
    checked before the open: refused at once with a StorageError that says what it
    is. Run in a thread with a deadline, so a regression fails instead of hanging."""
    import threading

    fifo = str(tmp_path / "disk.fifo")
    os.mkfifo(fifo)
    done = threading.Event()
    failure: List[BaseException] = []

    def attempt() -> None:
        try:
            _fifo_refused(fifo, readonly)
        except BaseException as e:  # noqa: BLE001 - reported below
            failure.append(e)
        done.set()

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    if not done.wait(5):
        with open(fifo, "wb"):  # a writer: the stuck open returns, the thread ends
            pass
        pytest.fail("opening a FIFO blocked")
    assert not failure, failure


@pytest.mark.parametrize("kind", ["chr", "socket"])
def test_other_special_files_are_refused(tmp_path: Path, kind: str) -> None:
    """A character device (/dev/null) or a Unix socket is refused by name too."""
    import socket

    if kind == "chr":
        path, what = "/dev/null", "a character device"
    else:
        path, what = str(tmp_path / "s.sock"), "a socket"
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
    with pytest.raises(StorageError, match=f"is {what}: gblk serves only"):
        open_store("raw", path, readonly=True)


def test_a_path_swapped_for_a_fifo_after_the_check_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stat and the open are two steps: should the path become a FIFO in between,
    O_NONBLOCK keeps the open from waiting and the fstat refuses the file; the store
    otherwise ends up with O_NONBLOCK cleared."""
    import fcntl

    fifo = str(tmp_path / "disk.fifo")
    os.mkfifo(fifo)
    real, real_stat = os.open, os.stat
    monkeypatch.setattr(rawmod.os, "stat", lambda p, *a, **k: real_stat(
        __file__ if p == fifo else p, *a, **k))
    opened: List[int] = []

    def spy(path: str, flags: int, *a: object) -> int:
        fd = real(path, flags, *a)
        opened.append(fd)
        return fd

    closed: List[int] = []
    real_close = os.close

    def close_spy(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(rawmod.os, "open", spy)
    monkeypatch.setattr(rawmod.os, "close", close_spy)
    _fifo_refused(fifo, True)
    assert len(opened) == 1 and closed == opened  # opened without waiting, closed again
    monkeypatch.undo()
    s = open_store("raw", __file__, readonly=True)
    assert isinstance(s, RawStore)
    assert not fcntl.fcntl(s.fd, fcntl.F_GETFL) & os.O_NONBLOCK
    s.close()


def test_close_is_idempotent(image: str) -> None:
    """close() twice is harmless (stop() paths may overlap)."""
    s = open_store("raw", image, readonly=True)
    s.close()
    s.close()


def test_readv_nowait_serves_cached_data(store: RawStore) -> None:
    """A read the page cache can serve is done at once (one preadv2 with RWF_NOWAIT, the
    hub's path); the data is the file's, whatever the views' sizes."""
    views = views_of(4096, 512, 1024)
    if not store.readv_nowait(views, 4096, 5632):
        pytest.skip("this file system has no RWF_NOWAIT reads (tmpfs)")
    assert b"".join(bytes(v) for v in views) == pattern(SIZE)[4096:4096 + 5632]


def test_nowait_never_with_o_direct(image: str) -> None:
    """O_DIRECT reads wait for the device even under RWF_NOWAIT: a direct store never
    claims to have served one, so the hub never blocks on the disk."""
    try:
        s = RawStore(image, readonly=False, direct=True)
    except StorageError:
        pytest.skip("O_DIRECT not supported on this file system")
    try:
        buf = mmap.mmap(-1, 4096)
        view = memoryview(buf)
        assert not s.readv_nowait([view], 0, 4096)
        assert not s.writev_nowait([view], 0, 4096)
        assert bytes(view) == bytes(4096)  # nothing was read
        view.release()
        buf.close()
    finally:
        s.close()


def test_nowait_unsupported_falls_back_for_good(store: RawStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """EOPNOTSUPP (tmpfs; buffered writes on most file systems) switches the nowait path
    off for that store: False, nothing raised, and never tried again."""
    calls: List[int] = []

    def unsupported(fd: int, views: object, offset: int, flags: int = 0) -> int:
        calls.append(flags)
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(rawmod.os, "pwritev", unsupported)
    view = memoryview(bytearray(4096))
    assert not store.writev_nowait([view], 0, 4096)
    assert not store.writev_nowait([view], 0, 4096)
    assert len(calls) == 1
