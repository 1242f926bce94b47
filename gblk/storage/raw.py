"""Raw images: a regular file or a block device, with preadv/pwritev straight into
the caller's views (guest pages or bounce buffers; no copy in Python).

Runs in the threadpool: blocking syscalls only, except ``readv_nowait`` and
``writev_nowait``, which the hub may call: ``preadv2``/``pwritev2`` with
``RWF_NOWAIT`` answer EAGAIN instead of waiting for the disk, so a read served by
the page cache costs one syscall and no thread handoff. Never with O_DIRECT (a direct
read waits for the device even under RWF_NOWAIT); switched off for good on the first
EOPNOTSUPP (tmpfs, and buffered writes on most file systems of Linux 6.x).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import StorageError
from .base import Store

IOV_MAX = 1024
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
#: RWF_NOWAIT not available for this file (the flag, the file system or the kernel)
_NOWAIT_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# linux/fs.h
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKDISCARD = 0x1277
BLKSECDISCARD = 0x127D
BLKDISCARDZEROES = 0x127C

# the process's own symbols include libc (no find_library: it forks ldconfig)
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def _ioctl_u64(fd: int, req: int) -> int:
    return int(struct.unpack("Q", fcntl.ioctl(fd, req, b"\0" * 8))[0])


def _ioctl_int(fd: int, req: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, req, b"\0" * 4))[0])


def _transfer(
    op: Callable[[int, List[memoryview], int], int],
    fd: int,
    views: Sequence[memoryview],
    offset: int,
) -> None:
    """Run preadv/pwritev until every byte moved (short transfers resume where they
    stopped; at most IOV_MAX vectors per call). The usual case is one call and no
    per-view Python work."""
    left = sum(map(len, views))
    pending = views if len(views) <= IOV_MAX else list(views)
    # the tails sliced here are released before returning, also on error: a slice of a
    # guest page kept alive by the exception's traceback would make its unmap fail
    tails: List[memoryview] = []
    try:
        while left:
            chunk = pending if len(pending) <= IOV_MAX else pending[:IOV_MAX]
            n = op(fd, chunk, offset)  # type: ignore[arg-type]
            if n <= 0:
                raise OSError(errno.EIO, "short transfer: the backing store ended early")
            left -= n
            if not left:
                return
            offset += n
            # drop whole views done, keep the tail of a partial one
            i = 0
            while i < len(pending) and n >= len(pending[i]):
                n -= len(pending[i])
                i += 1
            rest = list(pending[i:])
            if n and rest:
                rest[0] = rest[0][n:]
                tails.append(rest[0])
            pending = rest
    finally:
        for t in tails:
            t.release()


def _nowait(op: Callable[..., int], fd: int, views: Sequence[memoryview], offset: int,
            nbytes: int) -> Optional[bool]:
    """One preadv2/pwritev2 with RWF_NOWAIT: whether all ``nbytes`` moved, or None
    when this file cannot do RWF_NOWAIT at all."""
    if len(views) > IOV_MAX:
        return False
    try:
        return bool(op(fd, views, offset, _RWF_NOWAIT) == nbytes)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in _NOWAIT_UNSUPPORTED:
            raise
        return None


def _queue_limits(rdev: int) -> Dict[str, int]:
    """Numbers from /sys/dev/block/MAJ:MIN/queue (a partition: its parent's)."""
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    out: Dict[str, int] = {}
    for qdir in (f"{base}/queue", f"{base}/../queue"):
        for name in ("discard_max_bytes", "discard_granularity", "max_secure_erase_sectors"):
            try:
                with open(f"{qdir}/{name}") as f:
                    out.setdefault(name, int(f.read().strip() or 0))
            except (OSError, ValueError):
                pass
    return out


def _kind(mode: int) -> str:
    """What a file that is neither regular nor a block device is, for the error."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "an unknown kind of file"


def _servable(path: str, mode: int) -> None:
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise StorageError(f"{path} is {_kind(mode)}: gblk serves only a regular file "
                           "or a block device")


class RawStore(Store):
    """One open regular file or block device, served as the disk's bytes as they are.

    Responsible for the syscalls of every IO on it (vectored reads and writes straight
    into the caller's views, ``fdatasync`` for a flush, a punched hole or
    ``BLKDISCARD`` for a discard) and for telling the device what the image is: its
    size (re-read on every call: it may have grown), sector sizes and discard
    limits, from the block device's queue or the file's block size.

    Lifecycle: the constructor opens the path (refusing anything but a regular file
    or a block device, before and after the open) or raises StorageError; ``close()``
    closes the descriptor (idempotent). ``open_store`` makes it for ``raw`` (and the
    fault store wraps one); the device owns it and closes it when it is released.

    Threads: the device opens, sizes and closes it in the control pool; a ring's IO
    runs in the threadpool, several jobs at once on the one descriptor (positioned
    syscalls only, no shared offset). ``readv_nowait``/``writev_nowait`` are the
    exception: the hub calls them, and they never wait for the disk.
    """

    def __init__(self, path: str, readonly: bool, direct: bool = False) -> None:
        # the type first: opening a FIFO for reading waits for a writer, for ever
        try:
            _servable(path, os.stat(path).st_mode)
        except OSError as e:
            raise StorageError(f"cannot open {path}: {e.strerror}") from None
        flags = os.O_RDONLY if readonly else os.O_RDWR
        # O_NONBLOCK: should the path become a FIFO between the stat and the open, the
        # open still returns at once (and the fstat below refuses it); cleared after
        flags |= os.O_CLOEXEC | os.O_NONBLOCK
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                raise StorageError(f"{path}: O_DIRECT not supported here ({e.strerror})") from None
            raise StorageError(f"cannot open {path}: {e.strerror}") from None
        self.path = path
        self.readonly = readonly
        self.direct = direct
        try:
            st = os.fstat(self.fd)
            _servable(path, st.st_mode)
            fcntl.fcntl(self.fd, fcntl.F_SETFL,
                        fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        self.is_block = stat.S_ISBLK(st.st_mode)
        if self.is_block:
            self.sector_size = _ioctl_int(self.fd, BLKSSZGET)
            self.physical_sector_size = _ioctl_int(self.fd, BLKPBSZGET)
            # what the device's queue says it can do (never guess: a guest told
            # discard-secure=1 would get ERROR for every secure discard)
            q = _queue_limits(st.st_rdev)
            self.supports_discard = q.get("discard_max_bytes", 0) > 0
            self.discard_granularity = max(q.get("discard_granularity", 0), self.sector_size)
            self.supports_secure_discard = q.get("max_secure_erase_sectors", 0) > 0
        else:
            self.discard_granularity = max(st.st_blksize, 512)
        nowait = not direct and _RWF_NOWAIT != 0
        self._nowait_read = nowait
        self._nowait_write = nowait and not readonly

    def size(self) -> int:
        if self.is_block:
            return _ioctl_u64(self.fd, BLKGETSIZE64)
        return os.fstat(self.fd).st_size

    def readv(self, views: Sequence[memoryview], offset: int) -> None:
        _transfer(os.preadv, self.fd, views, offset)

    def writev(self, views: Sequence[memoryview], offset: int) -> None:
        _transfer(os.pwritev, self.fd, views, offset)

    def can_nowait(self, write: bool) -> bool:
        return self._nowait_write if write else self._nowait_read

    def readv_nowait(self, views: Sequence[memoryview], offset: int, nbytes: int) -> bool:
        if not self._nowait_read:
            return False
        done = _nowait(os.preadv, self.fd, views, offset, nbytes)
        self._nowait_read = done is not None
        return bool(done)

    def writev_nowait(self, views: Sequence[memoryview], offset: int, nbytes: int) -> bool:
        if not self._nowait_write:
            return False
        done = _nowait(os.pwritev, self.fd, views, offset, nbytes)
        self._nowait_write = done is not None
        return bool(done)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int, secure: bool = False) -> None:
        if length <= 0:
            return
        if self.is_block:
            req = BLKSECDISCARD if secure else BLKDISCARD
            fcntl.ioctl(self.fd, req, struct.pack("QQ", offset, length))
            return
        # a file: punch a hole (reads back zeros, frees the blocks); secure discard of
        # a file is the same operation: the blocks are released to the filesystem
        if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
