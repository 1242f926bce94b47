"""A point-in-time view of a disk while it is exported: copy-before-write.

``gblk ctl export`` serves the disk as it was when the export started, while the
guest goes on writing. Before the first guest write (or discard, or data-carrying
flush/barrier) to a block after that point, the block's old data is copied into a
side file; the export reads a copied block from the side file, every other block
from the image. Blocks are ``BLOCK`` bytes (64 KiB, CBT's granularity), so a 4 KiB
write to a fresh block costs a 64 KiB read and write first; a block is copied once.

The side file is a sparse temporary file as large as the disk (``O_TMPFILE``, or
created and unlinked at once: it has no name, so nothing is left behind, even after
a SIGKILL), a block kept at its own offset; a block of zeros is not written (the
hole reads as zeros). It holds at most the disk's size and goes with the export.

The ring (``gblk.engine.ring``) asks :meth:`PointInTime.need` for each write it
takes, on the hub; a batch holding a write to a block not yet copied is handed to
:meth:`after`, which runs it once every block it writes is copied (one copy job per
run of blocks, in the export's share of the threadpool; two writes to one block wait
for the same copy). Everything is decided on the hub, so there is no lock: a block
is 0 (not copied), 1 (being copied: its writes wait) or 2 (copied: its writes go).

An export read (:meth:`read`, from a greenlet) reads copied blocks from the side
file and the others from the image, in the threadpool; a block that was copied while
its read from the image ran (a guest write may have landed in it then) is read again
from the side file: its copy was made before that write was issued.

Until :meth:`open` (the point in time: the writes issued before the export are
done), every write batch waits. A copy that fails (the image cannot be read, the
side file is full) gives the view up: the guest's writes go on (never held, never
failed for a backup's sake), export reads fail with EIO from then on, logged once.
:meth:`close` lets every waiting batch go.

Runs on the hub except the functions marked "blocking" (the threadpool).
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..storage import Store
from .stats import DeviceStats

BLOCK = 64 * 1024
#: most bytes one copy job moves (a discard of the whole disk is many jobs)
COPY_JOB = 4 << 20
_CHUNK = 1 << 20
NOT_COPIED, COPYING, COPIED = 0, 1, 2


# -- blocking -------------------------------------------------------------------------------
def create_side_file(directory: str, size: int) -> int:
    """Blocking: an anonymous sparse file of ``size`` bytes in ``directory`` (its fd)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        fd = os.open(directory, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
    except (OSError, AttributeError):  # a file system without O_TMPFILE
        fd, path = tempfile.mkstemp(prefix=".gblk-export-", dir=directory)
        os.unlink(path)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def close_fd(fd: int) -> None:
    os.close(fd)


def copy_range(store: Store, fd: int, offset: int, length: int) -> Tuple[int, Optional[str]]:
    """Blocking: the image's bytes at offset..offset+length into the side file at the
    same offset. (bytes that were not zeros, None) or (0, why not); never raises."""
    written = 0
    buf = bytearray(min(length, _CHUNK))
    zero = bytes(BLOCK)
    try:
        done = 0
        while done < length:
            n = min(len(buf), length - done)
            with memoryview(buf) as whole, whole[:n] as view:
                store.readv([view], offset + done)
                # the runs of blocks that are not all zeros (a hole reads as zeros)
                start = -1
                for at in [*range(0, n, BLOCK), n]:
                    data = at < n and view[at:at + BLOCK] != zero[:min(BLOCK, n - at)]
                    if data and start < 0:
                        start = at
                    elif not data and start >= 0:
                        end = min(at, n)
                        os.pwrite(fd, view[start:end], offset + done + start)
                        written += end - start
                        start = -1
            done += n
    except OSError as e:
        return 0, e.strerror or str(e)
    return written, None


def read_parts(store: Store, fd: int, offset: int, length: int,
               parts: Sequence[Tuple[int, int, bool]]) -> bytearray:
    """Blocking: ``length`` bytes at ``offset``, each part (start, end, from the side
    file) from where it is. Raises OSError."""
    buf = bytearray(length)
    view = memoryview(buf)
    try:
        for start, end, side in parts:
            v = view[start - offset:end - offset]
            if side:
                got = 0
                while got < len(v):
                    n = os.preadv(fd, [v[got:]], start + got)
                    if n <= 0:
                        raise OSError(errno.EIO, "the side file is short")
                    got += n
            else:
                store.readv([v], start)
            v.release()
    finally:
        view.release()
    return buf


# -- the hub side ---------------------------------------------------------------------------
class PointInTime:
    """The copy-before-write state of one exported disk."""

    def __init__(self, store: Store, fd: int, size: int, pool: Any, stats: DeviceStats,
                 log: Any, block: int = BLOCK) -> None:
        self.store = store
        self.fd = fd
        self.size = size
        self.block = block
        self.shift = block.bit_length() - 1
        self.nblocks = max(1, -(-size // block))
        self.state = bytearray(self.nblocks)
        self.pool = pool
        self.stats = stats
        self.log = log
        self.ready = False
        self.closed = False
        self.failed = ""
        self._held: List[Tuple[Sequence[Tuple[int, int]], Callable[[], None]]] = []
        #: block -> the waiters (a list: [blocks still to copy, fn]) of batches on it
        self._waiting: Dict[int, List[List[Any]]] = {}
        self._jobs = 0
        #: this view's bytes copied before writes, and those stored (not zeros)
        self.copied_bytes = 0
        self.stored_bytes = 0

    def _blocks(self, offset: int, length: int) -> Tuple[int, int]:
        """The first and last block of a range (b0 > b1: none, past the end)."""
        if length <= 0 or offset >= self.size:
            return 1, 0
        return offset >> self.shift, min((offset + length - 1) >> self.shift, self.nblocks - 1)

    # -- the ring's side ---------------------------------------------------------------
    def need(self, offset: int, length: int) -> bool:
        """Must a write of this range wait (a block of it is not copied yet)?"""
        if self.closed or self.failed:
            return False
        if not self.ready:
            return True
        b0, b1 = self._blocks(offset, length)
        return b0 <= b1 and self.state.count(COPIED, b0, b1 + 1) != b1 - b0 + 1

    def after(self, ranges: Sequence[Tuple[int, int]], fn: Callable[[], None]) -> None:
        """Run ``fn`` (issue a batch) once every block of ``ranges`` is copied."""
        if self.closed or self.failed:
            fn()
            return
        if not self.ready:
            self._held.append((ranges, fn))
            return
        st = self.state
        wait: List[int] = []
        fresh: List[int] = []
        for offset, length in ranges:
            b0, b1 = self._blocks(offset, length)
            if b0 > b1 or st.count(COPIED, b0, b1 + 1) == b1 - b0 + 1:
                continue
            for b in range(b0, b1 + 1):
                s = st[b]
                if s == COPIED:
                    continue
                wait.append(b)
                if s == NOT_COPIED:
                    st[b] = COPYING
                    fresh.append(b)
        if not wait:
            fn()
            return
        waiter: List[Any] = [len(set(wait)), fn]
        for b in set(wait):
            self._waiting.setdefault(b, []).append(waiter)
        self._copy(sorted(fresh))

    def _copy(self, blocks: List[int]) -> None:
        per_job = max(1, COPY_JOB // self.block)
        i = 0
        while i < len(blocks):
            j = i + 1
            while j < len(blocks) and blocks[j] == blocks[j - 1] + 1 and j - i < per_job:
                j += 1
            b0, b1 = blocks[i], blocks[j - 1]
            offset = b0 << self.shift
            length = min((b1 + 1) << self.shift, self.size) - offset
            self._jobs += 1
            self.pool.spawn(copy_range, self.store, self.fd, offset, length).rawlink(
                lambda r, b0=b0, b1=b1, n=length: self._copied(b0, b1, n, r))
            i = j

    def _copied(self, b0: int, b1: int, nbytes: int, res: Any) -> None:
        self._jobs -= 1
        try:
            written, err = res.get(block=False)
        except Exception as e:  # noqa: BLE001 - copy_range never raises; be safe
            written, err = 0, repr(e)
        if err is not None:
            self._give_up(f"copying {nbytes} bytes at {b0 << self.shift} before a write: {err}")
        else:
            self.copied_bytes += nbytes
            self.stored_bytes += written
            self.stats.export_cbw_bytes += nbytes
            self.stats.export_side_bytes += written
        st = self.state
        for b in range(b0, b1 + 1):
            st[b] = COPIED
            for waiter in self._waiting.pop(b, ()):
                waiter[0] -= 1
                if waiter[0] == 0:
                    waiter[1]()
        if self.closed and not self._jobs:
            self._close_fd()

    def _read_done(self, _res: Any) -> None:
        self._jobs -= 1
        if self.closed and not self._jobs:
            self._close_fd()

    def _give_up(self, why: str) -> None:
        if self.failed:
            return
        self.failed = why
        self.log.error("export: the point-in-time view is given up: %s; the guest's writes "
                       "go on, reads of the export fail from now on", why)
        self._release_all()

    def _release_all(self) -> None:
        waiting, self._waiting = self._waiting, {}
        held, self._held = self._held, []
        seen = set()
        for ws in waiting.values():
            for waiter in ws:
                if id(waiter) not in seen:
                    seen.add(id(waiter))
                    waiter[1]()
        for _ranges, fn in held:
            fn()

    # -- the export's side ---------------------------------------------------------------
    def open(self) -> None:
        """The point in time: the writes issued before it are done. The batches held
        since go (each through :meth:`after`)."""
        self.ready = True
        held, self._held = self._held, []
        for ranges, fn in held:
            self.after(ranges, fn)

    def read(self, offset: int, length: int) -> bytes:
        """From a greenlet: the export's bytes at offset (within the size)."""
        if self.failed or self.closed:
            raise OSError(errno.EIO, self.failed or "the export is closed")
        buf = self._read(offset, length)
        if self.failed or self.closed:
            raise OSError(errno.EIO, self.failed or "the export is closed")
        return bytes(buf)

    def _read(self, offset: int, length: int) -> bytearray:
        parts = self._parts(offset, length)
        buf = self._job(offset, length, parts)
        # a block copied while it was read from the image: its writes may have landed
        # in it since, so it is read again from the side file (copied before them)
        again = [(s, e, False) for s, e, side in parts if not side
                 and self.state.count(COPIED, s >> self.shift, ((e - 1) >> self.shift) + 1)]
        for s, e, side in self._parts_of(again):
            buf[s - offset:e - offset] = self._job(s, e - s, [(s, e, side)])
        return buf

    def _job(self, offset: int, length: int, parts: List[Tuple[int, int, bool]]) -> bytearray:
        # counted until the thread is done (not the greenlet waiting for it, which may
        # be killed): the side file stays open while a read of it may run
        self._jobs += 1
        res = self.pool.spawn(_catching, read_parts, self.store, self.fd, offset, length, parts)
        res.rawlink(self._read_done)
        got = res.get()
        if isinstance(got, OSError):
            raise got
        return got

    def _parts(self, offset: int, length: int) -> List[Tuple[int, int, bool]]:
        """The range split into runs read from the image or from the side file."""
        out: List[Tuple[int, int, bool]] = []
        end = offset + length
        pos = offset
        st = self.state
        while pos < end:
            b = pos >> self.shift
            side = st[b] == COPIED
            nxt = min(((b + 1) << self.shift), end)
            if out and out[-1][2] == side and out[-1][1] == pos:
                out[-1] = (out[-1][0], nxt, side)
            else:
                out.append((pos, nxt, side))
            pos = nxt
        return out

    def _parts_of(self, parts: List[Tuple[int, int, bool]]) -> List[Tuple[int, int, bool]]:
        """Of image-read parts, the pieces whose blocks are copied by now (side file)."""
        out: List[Tuple[int, int, bool]] = []
        for s, e, _ in parts:
            out += [p for p in self._parts(s, e - s) if p[2]]
        return out

    @property
    def busy(self) -> bool:
        """Copies or reads still run (they use the store and the side file)."""
        return self._jobs > 0

    def close(self) -> None:
        """The export ended: every waiting batch goes; the side file is closed once
        no copy runs (it has no name: closing it frees its space)."""
        if self.closed:
            return
        self.closed = True
        self._release_all()
        if not self._jobs:
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            self.stats.export_side_bytes = 0
            self.pool.spawn(close_fd, fd)


def _catching(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError as e:
        return e
