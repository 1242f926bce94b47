"""Changed-block tracking: a persistent dirty bitmap per image, crash-consistent.

One bit per ``granularity`` bytes of the disk (64 KiB by default: 2 TiB of disk is a
4 MiB bitmap), at most ``cbt.max_bits`` bits. The bitmap lives in a file of its own
in ``cbt.directory`` (``/var/lib/gblk/cbt``), named after the image's path: not next
to the image, because an image can be a block device (``/dev/vg/lv`` has no place
for a file beside it), its directory may be read-only or shared between hosts, and
backup tools want one place to look; keyed by the image, not the domain, because a
guest's domid changes at each boot and the disk's history does not. While the file
exists the image is tracked: a restarted gblk, or the guest started again, carries
on with the same bitmap (``gblk ctl cbt disable`` removes it).

The one rule: **a write's bits are on stable storage before the write is issued.**
The ring marks the bits of each WRITE, DISCARD and data-carrying FLUSH/BARRIER when
it takes it (in memory, on the hub); when a bit was new, the batch the write is in
waits until the bitmap pages it changed are written and ``fdatasync``'d (one job in
the threadpool, shared by every ring of the disk and every request marked since the
last one: one sync per batch, not per request). A write to a region already dirty
and durable costs a few bit tests. So a SIGKILL or a power cut can leave bits set for
writes that never happened (over-report), never a write whose bit is not set: data
cannot reach the image before its bit reaches the bitmap.

``reset()`` clears the map and returns what it held, in one step on the hub (the
backup then copies those extents; writes from now on are tracked afresh), and sets
again the bits of writes still in flight. A bitmap that cannot be written any more
(EIO, ENOSPC) is given up: the file is removed, writes go on, ``show`` says the map
is lost (a full backup is needed) and the daemon logs it once; a disk's IO never
fails because of its bitmap.

Runs on the hub except the functions marked "blocking" (the threadpool: syscalls
only).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .stats import DeviceStats

MAGIC = b"GBLKCBT1"
#: magic, version, granularity, image size in bytes, bits, path length (then the path)
_HEADER = struct.Struct("<8sIQQQH")
HEADER_SIZE = 4096
PAGE = 4096
_PAGE_BITS = PAGE * 8
_RUNS = re.compile(rb"\xff+|[^\x00]")
#: write tokens, unique in the process (a token outlives a map disabled and enabled again)
_TOKENS = itertools.count(1)


class CbtError(Exception):
    """A bitmap file cannot be made or read (the message says which and why)."""


def bitmap_path(directory: str, image: str) -> str:
    """The bitmap file of ``image`` in ``directory``: readable, and unique per path."""
    real = os.path.abspath(image)
    digest = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(real))[:64] or "image"
    return os.path.join(directory, f"{base}-{digest}.cbt")


def nbits_for(size: int, granularity: int) -> int:
    return max(1, -(-size // granularity))


# -- blocking: the threadpool or the control pool ---------------------------------------
def create_file(path: str, image: str, granularity: int, size: int) -> Tuple[int, bytearray]:
    """Blocking: a new, all-clean bitmap file (written whole and synced, so later
    writes into it allocate nothing). Returns (fd, bits)."""
    nbits = nbits_for(size, granularity)
    bits = bytearray(_round_page(-(-nbits // 8)))
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".new"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, _header(image, granularity, size, nbits), 0)
        os.pwrite(fd, bytes(bits), HEADER_SIZE)
        os.fsync(fd)
        os.rename(tmp, path)
        _sync_dir(path)
    except OSError:
        os.close(fd)
        raise
    return fd, bits


def load_file(path: str, size: int) -> Optional[Tuple[int, int, bytearray]]:
    """Blocking: the bitmap file of an image, or None when there is none. Returns
    (fd, granularity, bits); an image that grew since gets its new part marked dirty
    (nothing is known about it). Raises CbtError for a file that is not a bitmap."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        head = os.pread(fd, HEADER_SIZE, 0)
        if len(head) < _HEADER.size or head[:8] != MAGIC:
            raise CbtError(f"{path}: not a gblk dirty bitmap")
        _magic, _version, gran, old_size, nbits, _n = _HEADER.unpack_from(head)
        raw = bytearray(os.pread(fd, _round_page(-(-nbits // 8)), HEADER_SIZE))
        want = nbits_for(size, gran)
        bits = bytearray(_round_page(-(-want // 8)))
        keep = min(nbits, want)
        bits[:keep // 8] = raw[:keep // 8]
        for b in range(keep // 8 * 8, keep):
            if raw[b >> 3] & (1 << (b & 7)):
                bits[b >> 3] |= 1 << (b & 7)
        for b in range(keep, want):  # grew: unknown, so dirty
            bits[b >> 3] |= 1 << (b & 7)
        if want != nbits or size != old_size:
            image = head[_HEADER.size:_HEADER.size + _n].decode("utf-8", "surrogateescape")
            os.pwrite(fd, _header(image, gran, size, want), 0)
            os.pwrite(fd, bytes(bits), HEADER_SIZE)
            os.ftruncate(fd, HEADER_SIZE + len(bits))
            os.fsync(fd)
    except (OSError, struct.error) as e:
        os.close(fd)
        if isinstance(e, OSError):
            raise CbtError(f"{path}: {e.strerror or e}") from None
        raise CbtError(f"{path}: not a gblk dirty bitmap") from None
    except CbtError:
        os.close(fd)
        raise
    return fd, gran, bits


def remove_file(fd: int, path: str) -> None:
    """Blocking: close and remove a bitmap (disable, or a map given up)."""
    try:
        os.close(fd)
    except OSError:
        pass
    try:
        os.unlink(path)
        _sync_dir(path)
    except FileNotFoundError:
        pass


def close_fd(fd: int) -> None:
    """Blocking: close a bitmap opened after its caller gave up waiting."""
    os.close(fd)


def write_pages(fd: int, pages: List[Tuple[int, bytes]]) -> Optional[str]:
    """Blocking: write the changed bitmap pages and make them durable. None, or why
    not (never raises)."""
    try:
        for offset, data in pages:
            os.pwrite(fd, data, offset)
        os.fdatasync(fd)
    except OSError as e:
        return e.strerror or str(e)
    return None


_NONZERO = re.compile(rb"[^\x00]+")
_ZEROS = re.compile(rb"\x00+")
_ONES = re.compile(rb"\xff+")


def popcount(bits: "bytes | bytearray") -> int:
    """Bits set (the zero bytes skipped at C speed: a mostly clean map costs little)."""
    return sum(bin(x).count("1") for m in _NONZERO.finditer(bits) for x in m.group())


def set_bits(bits: bytearray, b0: int, b1: int) -> None:
    """Set bits b0..b1 of ``bits`` (in memory, nothing counted)."""
    i0, i1 = b0 >> 3, b1 >> 3
    if i1 - i0 > 1:
        bits[i0 + 1:i1] = b"\xff" * (i1 - i0 - 1)
        for b in list(range(b0, (i0 << 3) + 8)) + list(range(i1 << 3, b1 + 1)):
            bits[b >> 3] |= 1 << (b & 7)
        return
    for b in range(b0, b1 + 1):
        bits[b >> 3] |= 1 << (b & 7)


def dirty_runs(bits: bytes, granularity: int, size: int, offset: int,
               length: int) -> List[Tuple[int, int]]:
    """The map over offset..offset+length as (length, dirty) runs, in order (what
    NBD's ``qemu:dirty-bitmap`` context answers). Whole clean or dirty bytes of the
    map are skipped at C speed; a granule past the map counts as dirty."""
    shift = granularity.bit_length() - 1
    end = min(offset + length, size)
    out: List[Tuple[int, int]] = []
    pos = offset
    while pos < end:
        b = pos >> shift
        i = b >> 3
        if i >= len(bits):
            dirty, nxt = 1, end
        elif b & 7 == 0 and bits[i] in (0, 255):
            m = (_ZEROS if bits[i] == 0 else _ONES).match(bits, i)
            assert m is not None
            dirty, nxt = int(bits[i] == 255), min((m.end() * 8) << shift, end)
        else:
            dirty, nxt = (bits[i] >> (b & 7)) & 1, min((b + 1) << shift, end)
        if out and out[-1][1] == dirty:
            out[-1] = (out[-1][0] + nxt - pos, dirty)
        else:
            out.append((nxt - pos, dirty))
        pos = nxt
    return out


def _header(image: str, granularity: int, size: int, nbits: int) -> bytes:
    name = image.encode("utf-8", "surrogateescape")[:HEADER_SIZE - _HEADER.size]
    head = _HEADER.pack(MAGIC, 1, granularity, size, nbits, len(name)) + name
    return head + bytes(HEADER_SIZE - len(head))


def _round_page(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _sync_dir(path: str) -> None:
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- the hub side ---------------------------------------------------------------------------
class Tracker:
    """The dirty bitmap of one disk while it is served."""

    def __init__(self, path: str, fd: int, granularity: int, size: int, bits: bytearray,
                 pool: Any, stats: DeviceStats, log: Any) -> None:
        self.path = path
        self.fd = fd
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.size = size
        self.nbits = nbits_for(size, granularity)
        self.bits = bits
        self.pool = pool
        self.stats = stats
        self.log = log
        self.failed = ""  # why the map was given up
        self.marked_gen = 0  # bumped by every mark that set a new bit
        self.synced_gen = 0  # every mark up to this one is durable
        self._unsynced: Set[int] = set()  # bitmap pages changed, not yet in a sync
        self._syncing: Set[int] = set()  # pages of the sync in progress
        self._busy = False
        self._waiters: List[Tuple[int, Callable[[], None]]] = []
        self._inflight: Dict[int, Tuple[int, int]] = {}
        self._header: Optional[bytes] = None  # a new header to write (the disk grew)
        #: while an export is open: the bits of the writes since it started (in memory;
        #: ``reset`` then clears only what the export's map shows)
        self.since: Optional[bytearray] = None
        self.closed = False
        stats.cbt_enabled = True
        stats.cbt_granularity = granularity
        stats.cbt_dirty_bits = popcount(bits)

    # -- marking -----------------------------------------------------------------------
    def mark(self, sector: int, nsectors: int) -> Tuple[int, int]:
        """The bits of a write of ``nsectors`` at ``sector``: (the generation that
        must be durable before it is issued, 0 if it is already; its token for
        :meth:`done`)."""
        if nsectors <= 0 or self.failed:
            return 0, 0
        start = sector << 9
        b0 = start >> self.shift
        if b0 >= self.nbits:
            return 0, 0
        b1 = min((start + (nsectors << 9) - 1) >> self.shift, self.nbits - 1)
        if self.since is not None:
            set_bits(self.since, b0, b1)
        new = self._set(b0, b1)
        token = next(_TOKENS)
        self._inflight[token] = (b0, b1)
        if new:
            self.marked_gen += 1
            self.stats.cbt_dirty_bits += new
            return self.marked_gen, token
        p0, p1 = b0 // _PAGE_BITS, b1 // _PAGE_BITS
        pending = self._unsynced or self._syncing
        if pending and any(p in self._unsynced or p in self._syncing for p in range(p0, p1 + 1)):
            return self.marked_gen, token
        return 0, token

    def _set(self, b0: int, b1: int) -> int:
        """Set bits b0..b1; how many were clear. Pages changed go to _unsynced."""
        bits = self.bits
        new = 0
        i0, i1 = b0 >> 3, b1 >> 3
        if i1 - i0 > 2:  # whole bytes in the middle at once
            mid = bytes(bits[i0 + 1:i1])
            if mid.count(255) != len(mid):
                new += len(mid) * 8 - sum(bin(x).count("1") for x in mid)
                bits[i0 + 1:i1] = b"\xff" * len(mid)
                self._unsynced.update(range((i0 + 1) // PAGE, (i1 - 1) // PAGE + 1))
            ranges: Tuple[Tuple[int, int], ...] = ((b0, (i0 << 3) + 7), (i1 << 3, b1))
        else:
            ranges = ((b0, b1),)
        for lo, hi in ranges:
            for b in range(lo, hi + 1):
                i = b >> 3
                m = 1 << (b & 7)
                if not bits[i] & m:
                    bits[i] |= m
                    new += 1
                    self._unsynced.add(i // PAGE)
        return new

    def done(self, token: int) -> None:
        """The write of ``token`` was answered."""
        self._inflight.pop(token, None)

    def after(self, gen: int, fn: Callable[[], None]) -> None:
        """Run ``fn`` once every mark up to ``gen`` is durable (now, if it is)."""
        if gen <= self.synced_gen or self.failed:
            fn()
            return
        self._waiters.append((gen, fn))
        if not self._busy:
            self._sync()

    def _sync(self) -> None:
        pages = sorted(self._unsynced)
        self._unsynced = set()
        self._syncing = set(pages)
        bits = self.bits
        data = [(HEADER_SIZE + p * PAGE, bytes(bits[p * PAGE:(p + 1) * PAGE])) for p in pages]
        if self._header is not None:  # after the pages: a longer map is valid only then
            data.append((0, self._header))
            self._header = None
        gen = self.marked_gen
        self._busy = True
        t0 = time.monotonic()
        self.pool.spawn(write_pages, self.fd, data).rawlink(
            lambda r: self._synced(gen, t0, r))

    def _synced(self, gen: int, t0: float, res: Any) -> None:
        self._busy = False
        self._syncing = set()
        try:
            err = res.get(block=False)
        except Exception as e:  # noqa: BLE001 - write_pages never raises; be safe
            err = repr(e)
        self.stats.cbt_syncs += 1
        self.stats.cbt_sync_seconds += time.monotonic() - t0
        if err is not None:
            self._give_up(f"writing the dirty bitmap {self.path}: {err}")
        elif gen > self.synced_gen:
            self.synced_gen = gen
        ready = [fn for g, fn in self._waiters if g <= self.synced_gen or self.failed]
        self._waiters = [(g, fn) for g, fn in self._waiters if g > self.synced_gen and not self.failed]
        for fn in ready:
            fn()
        if self.closed and not self._busy and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        elif (self._waiters or self._unsynced) and not self.failed and not self.closed:
            self._sync()

    def _give_up(self, why: str) -> None:
        if self.failed:
            return
        self.failed = why
        self.log.error("changed-block tracking given up: %s; writes go on untracked, "
                       "the bitmap is removed (a full backup is needed)", why)
        self.pool.spawn(remove_file, self.fd, self.path)
        self.fd = -1
        self.stats.cbt_enabled = False

    # -- what the control socket asks --------------------------------------------------
    def extents(self) -> List[List[int]]:
        """Dirty extents as [offset, length] in bytes, merged, within the disk."""
        out: List[List[int]] = []
        g = self.granularity
        bits = self.bits
        for m in _RUNS.finditer(bits):
            i, j = m.start(), m.end()
            if bits[i] == 255:
                spans = [(i * 8, j * 8)]
            else:
                b = bits[i]
                spans = [(i * 8 + k, i * 8 + k + 1) for k in range(8) if b & (1 << k)]
            for lo, hi in spans:
                hi = min(hi, self.nbits)
                if lo >= hi:
                    continue
                if out and out[-1][0] + out[-1][1] == lo * g:
                    out[-1][1] += (hi - lo) * g
                else:
                    out.append([lo * g, (hi - lo) * g])
        if out and out[-1][0] + out[-1][1] > self.size:
            out[-1][1] = self.size - out[-1][0]
        return out

    def describe(self) -> Dict[str, Any]:
        return {"enabled": not self.failed, "lost": self.failed or None,
                "granularity": self.granularity, "size_bytes": self.size, "bits": self.nbits,
                "dirty_bytes": min(self.stats.cbt_dirty_bits * self.granularity, self.size),
                "file": self.path}

    def reset(self) -> List[List[int]]:
        """Clear the map; what it held. Writes in flight keep their bits, and while an
        export is open so do the writes since it started (they are not in it)."""
        old = self.extents()
        self.bits[:] = bytes(len(self.bits))
        if self.since is not None:
            n = min(len(self.since), len(self.bits))
            self.bits[:n] = self.since[:n]
        self.stats.cbt_dirty_bits = popcount(self.bits)
        self._unsynced = set(range(len(self.bits) // PAGE))
        for b0, b1 in list(self._inflight.values()):
            self.stats.cbt_dirty_bits += self._set(b0, b1)
        self.marked_gen += 1
        if not self._busy and not self.failed:
            self._sync()
        return old

    def grow(self, size: int, image: str) -> None:
        """The disk grew: bits for the new part, dirty (nothing is known about it)."""
        want = nbits_for(size, self.granularity)
        self.size = max(self.size, size)
        if want <= self.nbits or self.failed:
            return
        extra = _round_page(-(-want // 8)) - len(self.bits)
        if extra > 0:
            self.bits.extend(bytes(extra))
        old, self.nbits = self.nbits, want
        self.stats.cbt_dirty_bits += self._set(old, want - 1)
        self._header = _header(image, self.granularity, size, want)
        self.marked_gen += 1
        if not self._busy:
            self._sync()

    @property
    def busy(self) -> bool:
        """A sync is in progress (disable waits for it before closing the file)."""
        return self._busy

    def close(self) -> None:
        """The disk is no longer served (the file stays: tracking goes on next time)."""
        self.closed = True
        self.stats.cbt_enabled = False
        if not self._busy and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
