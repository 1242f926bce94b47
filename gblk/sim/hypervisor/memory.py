"""Simulated guest memory and grant tables: shared files a backend maps for real.

This module is the guest side (what a domain's kernel owns: its RAM and its grant
table) and the single place that defines the simulated host's on-disk layout below
``DIR/domains/`` and ``DIR/evtchn/``. ``gblk.sim.hypervisor.gnttab`` (the backend's
libxengnttab) and ``gblk.sim.hypervisor.evtchn`` (libxenevtchn) build on the layout defined here.
It must not import gevent objects, the engine or anything above ``gblk.sim``; it
never blocks except on short ``flock(2)`` critical sections.

Layout of a simulated host's scratch directory ``DIR`` (all integers little-endian)::

    DIR/xenstored.sock            the XenStore server (gblk.sim's XenStore; not here)
    DIR/domains/<domid>/          one domain, created atomically by GuestMemory.create
        mem      guest RAM, pages * 4096 bytes; frame f is bytes [f*4096, (f+1)*4096)
        gnttab   the shared grant table: grant_entries * 8 bytes of grant_entry_v1
                 (flags u16 @0, domid u16 @2, frame u32 @4) with the GTF_* bits of
                 xen/include/public/grant_table.h. Written by the guest (grant,
                 end_access, revoke); mappers only set/clear GTF_reading/GTF_writing,
                 exactly as Xen does while a grant is mapped.
        active   Xen's private "active grant table", one 56-byte record per entry,
                 written only by mappers (gblk.sim.hypervisor.gnttab): frame u32 @0 (frame pinned
                 by the first map), domid u16 @4 (mapping domain), 2 bytes zero, then
                 ACTIVE_SLOTS (4) slots of 12 bytes @8 + 12*i: pid u32, rpins u32
                 (read-only maps or copies in progress), wpins u32 (writable ones).
                 Pins are counted per process so that the pins of a process that
                 died are dropped exactly, the next time anyone looks at the entry,
                 as the kernel unmaps a dead process's grants. A fifth process
                 mapping the same grant at once is refused (GNTST_no_device_space).
        alloc    the guest's allocator: one byte per page (1 = allocated), then one
                 byte per grant entry (1 = in use by the guest; refs 0..7 reserved)
        lock     flock(2)ed exclusively around every change to gnttab/active/alloc
    DIR/evtchn/                   event channels (gblk.sim.hypervisor.evtchn)
        token    16 hex digits naming this host's sockets
        handles  u32 counter: the next event-channel handle id (flock'd)
        d<domid> the port table of a domain: MAX_PORTS * 16-byte records: state u8 @0
                 (0 free, 1 unbound, 2 interdomain), flags u8 @1 (1 masked,
                 2 pending while masked, 4 fired: delivered to its handle, not yet
                 returned by pending()), remote_domid u16 @2, remote_port u32 @4,
                 owner u32 @8 (handle id; 0 = none), 4 bytes zero. flock'd around
                 every read-modify-write; port 0 is never used.

Each event-channel handle owns a Unix datagram socket in the Linux abstract
namespace (no file, nothing left behind by a crash) named
``\\0gblk-evtchn-<token>-<handle id>``: a datagram is only a wake-up, the truth is
the port table. No daemon runs: every process works on these files under flock.
Destroying a domain is ``GuestMemory.destroy()`` plus
``gblk.sim.hypervisor.evtchn.close_domain_ports(DIR, domid)``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import shutil
import struct
import uuid
from typing import Iterator, List, NamedTuple, Optional, Tuple

from gblk.blkif.const import PAGE_SIZE as PAGE_SIZE  # re-exported for the simulated host

# the simulated host's locks work between real threads (gevent's threadpool maps grants)
from gblk.xen.native import native_lock

# grant_entry_v1 flags (xen/include/public/grant_table.h)
GTF_invalid = 0
GTF_permit_access = 1 << 0
GTF_accept_transfer = 2 << 0
GTF_transitive = 3 << 0
GTF_type_mask = 3 << 0
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4

#: grant refs 0..7 are reserved (Linux: GNTTAB_NR_RESERVED_ENTRIES)
GNTTAB_NR_RESERVED_ENTRIES = 8
#: Xen 4.17's default max_grant_frames (64) * 512 v1 entries per 4 KiB frame
DEFAULT_GRANT_ENTRIES = 64 * (PAGE_SIZE // 8)

#: struct grant_entry_v1 { uint16_t flags; domid_t domid; uint32_t frame; }
GRANT_ENTRY_V1 = struct.Struct("<HHI")
#: processes that may pin one grant entry at the same time
ACTIVE_SLOTS = 4
#: active record: frame, domid, 2 pad bytes, then ACTIVE_SLOTS * (pid, rpins, wpins)
ACTIVE_ENTRY = struct.Struct("<IHxx" + "III" * ACTIVE_SLOTS)

DOMAINS = "domains"
EVTCHN = "evtchn"
MEM_FILE = "mem"
GNTTAB_FILE = "gnttab"
ACTIVE_FILE = "active"
ALLOC_FILE = "alloc"
LOCK_FILE = "lock"


class GrantEntry(NamedTuple):
    """One grant_entry_v1 as the guest wrote it."""

    flags: int
    domid: int
    frame: int


class ActiveEntry(NamedTuple):
    """Xen's bookkeeping for a grant entry while it is mapped or being copied:
    ``slots`` holds (pid, rpins, wpins) per process, (0, 0, 0) when free."""

    frame: int
    domid: int
    slots: Tuple[Tuple[int, int, int], ...]

    @property
    def rpins(self) -> int:
        return sum(s[1] for s in self.slots)

    @property
    def wpins(self) -> int:
        return sum(s[2] for s in self.slots)

    @property
    def pins(self) -> int:
        return self.rpins + self.wpins

    def has_slot_for(self, pid: int) -> bool:
        return any(s[0] == pid or not (s[1] or s[2]) for s in self.slots)

    def pinned(self, pid: int, writable: bool, frame: int, domid: int) -> ActiveEntry:
        """This entry with one more pin by ``pid`` (has_slot_for(pid) must hold)."""
        slots = list(self.slots)
        idx = next((i for i, s in enumerate(slots) if s[0] == pid and (s[1] or s[2])), None)
        if idx is None:
            idx = next(i for i, s in enumerate(slots) if not (s[1] or s[2]))
            slots[idx] = (pid, 0, 0)
        p, r, w = slots[idx]
        slots[idx] = (p, r + (0 if writable else 1), w + (1 if writable else 0))
        if not self.pins:
            return ActiveEntry(frame, domid, tuple(slots))
        return self._replace(slots=tuple(slots))

    def unpinned(self, pid: int, writable: bool) -> ActiveEntry:
        """This entry with one pin of ``pid`` less (IDLE once nothing is pinned)."""
        slots = list(self.slots)
        for i, (p, r, w) in enumerate(slots):
            if p == pid and (w if writable else r):
                slots[i] = (p, r - (0 if writable else 1), w - (1 if writable else 0))
                if not (slots[i][1] or slots[i][2]):
                    slots[i] = (0, 0, 0)
                break
        entry = self._replace(slots=tuple(slots))
        return entry if entry.pins else IDLE

    def pack(self) -> Tuple[int, ...]:
        return (self.frame, self.domid) + tuple(v for s in self.slots for v in s)

    @classmethod
    def unpack(cls, values: Tuple[int, ...]) -> ActiveEntry:
        rest = values[2:]
        slots = tuple(
            (rest[i], rest[i + 1], rest[i + 2]) for i in range(0, 3 * ACTIVE_SLOTS, 3)
        )
        return cls(values[0], values[1], slots)


IDLE = ActiveEntry(0, 0, ((0, 0, 0),) * ACTIVE_SLOTS)


def domain_dir(dir: str, domid: int) -> str:
    return os.path.join(dir, DOMAINS, str(domid))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists (a zombie counts as alive)."""
    if pid <= 0:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DomainFiles:
    """The open files of one simulated domain, shared by the guest and its mappers.

    Not thread-safe by itself: callers serialise with their own lock and hold
    ``locked()`` (the cross-process flock) around every read-modify-write.
    """

    def __init__(self, dir: str, domid: int) -> None:
        self.domid = domid
        self.path = domain_dir(dir, domid)
        self._fds: List[int] = []
        self._maps: List[mmap.mmap] = []
        self.mem: Optional[mmap.mmap] = None
        self.mem_view: Optional[memoryview] = None
        try:
            self.lock_fd = self._open(LOCK_FILE)
            self.mem_fd = self._open(MEM_FILE)
            st = os.fstat(self.mem_fd)
            self.nr_pages = st.st_size // PAGE_SIZE
            self.gnttab = self._map(GNTTAB_FILE)
            self.nr_entries = len(self.gnttab) // GRANT_ENTRY_V1.size
            self.active = self._map(ACTIVE_FILE)
            self.ino = os.stat(os.path.join(self.path, GNTTAB_FILE)).st_ino
        except BaseException:
            self.close()
            raise

    def _open(self, name: str) -> int:
        fd = os.open(os.path.join(self.path, name), os.O_RDWR | os.O_CLOEXEC)
        self._fds.append(fd)
        return fd

    def _map(self, name: str) -> mmap.mmap:
        fd = self._open(name)
        m = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
        self._maps.append(m)
        return m

    def map_memory(self) -> memoryview:
        """A writable view of all guest RAM (the guest's own mapping / the copy path)."""
        if self.mem_view is None:
            self.mem = mmap.mmap(self.mem_fd, self.nr_pages * PAGE_SIZE, mmap.MAP_SHARED)
            self.mem_view = memoryview(self.mem)
        return self.mem_view

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    # grant entries -------------------------------------------------------
    def entry(self, ref: int) -> GrantEntry:
        return GrantEntry(*GRANT_ENTRY_V1.unpack_from(self.gnttab, ref * GRANT_ENTRY_V1.size))

    def write_entry(self, ref: int, flags: int, domid: int, frame: int) -> None:
        off = ref * GRANT_ENTRY_V1.size
        # domid and frame first, flags last: the order a guest kernel uses
        struct.pack_into("<HI", self.gnttab, off + 2, domid & 0xFFFF, frame & 0xFFFFFFFF)
        struct.pack_into("<H", self.gnttab, off, flags & 0xFFFF)

    def set_flags(self, ref: int, flags: int) -> None:
        struct.pack_into("<H", self.gnttab, ref * GRANT_ENTRY_V1.size, flags & 0xFFFF)

    # active records --------------------------------------------------------
    def active_entry(self, ref: int) -> ActiveEntry:
        return ActiveEntry.unpack(ACTIVE_ENTRY.unpack_from(self.active, ref * ACTIVE_ENTRY.size))

    def write_active(self, ref: int, a: ActiveEntry) -> None:
        ACTIVE_ENTRY.pack_into(self.active, ref * ACTIVE_ENTRY.size, *a.pack())

    def unpin_flags(self, ref: int, a: ActiveEntry) -> None:
        """Clear GTF_writing/GTF_reading as Xen does once no (writable) pin is left."""
        clear = (0 if a.wpins else GTF_writing) | (0 if a.pins else GTF_reading)
        flags = self.entry(ref).flags
        if flags & clear:
            self.set_flags(ref, flags & ~clear)

    def reap(self, ref: int) -> ActiveEntry:
        """The active record of ``ref``, after dropping the pins of dead processes."""
        a = self.active_entry(ref)
        if not a.pins:
            return a
        slots = tuple(
            s if not (s[1] or s[2]) or pid_alive(s[0]) else (0, 0, 0) for s in a.slots
        )
        if slots == a.slots:
            return a
        a = a._replace(slots=slots)
        if not a.pins:
            a = IDLE
        self.write_active(ref, a)
        self.unpin_flags(ref, a)
        return a

    def close(self) -> None:
        if self.mem_view is not None:
            self.mem_view.release()
            self.mem_view = None
        maps = list(self._maps)
        if self.mem is not None:
            maps.append(self.mem)
            self.mem = None
        for m in maps:
            with contextlib.suppress(BufferError):
                # BufferError: a caller still holds a view; the map goes with it
                m.close()
        self._maps = []
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


def _create_file(path: str, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


class GuestMemory:
    """A simulated domain's RAM and grant table, seen from inside the guest.

    What a frontend driver needs: allocate pages, write them, grant them to the
    backend domain, end the grant once the backend let go. Hostile hooks for the
    security tests: ``revoke`` (XSA-396) and ``write_entry``. Thread-safe; works
    from several processes at once on the same domain.
    """

    def __init__(self, files: DomainFiles, dir: str) -> None:
        self._files = files
        self.dir = dir
        self.domid = files.domid
        self.pages = files.nr_pages
        self.grant_entries = files.nr_entries
        self._lock = native_lock()
        fd = os.open(os.path.join(files.path, ALLOC_FILE), os.O_RDWR | os.O_CLOEXEC)
        try:
            self._alloc = mmap.mmap(fd, self.pages + self.grant_entries, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._mem = files.map_memory()
        self._page_cursor = 0
        self._gref_cursor = GNTTAB_NR_RESERVED_ENTRIES
        self._closed = False

    # lifecycle -----------------------------------------------------------
    @classmethod
    def create(
        cls, dir: str, domid: int, pages: int, grant_entries: int = DEFAULT_GRANT_ENTRIES
    ) -> GuestMemory:
        """Create domain ``domid``'s memory under ``dir`` (FileExistsError if it exists)."""
        if not 0 <= domid < 0x7FF0:
            raise ValueError(f"domid {domid} out of range")
        if pages < 1 or grant_entries <= GNTTAB_NR_RESERVED_ENTRIES:
            raise ValueError("need at least one page and more than 8 grant entries")
        parent = os.path.join(dir, DOMAINS)
        os.makedirs(parent, exist_ok=True)
        final = domain_dir(dir, domid)
        if os.path.exists(final):
            raise FileExistsError(errno.EEXIST, "domain already exists", final)
        tmp = os.path.join(parent, f".new-{domid}-{uuid.uuid4().hex}")
        os.mkdir(tmp, 0o700)
        try:
            _create_file(os.path.join(tmp, MEM_FILE), pages * PAGE_SIZE)
            _create_file(os.path.join(tmp, GNTTAB_FILE), grant_entries * GRANT_ENTRY_V1.size)
            _create_file(os.path.join(tmp, ACTIVE_FILE), grant_entries * ACTIVE_ENTRY.size)
            _create_file(os.path.join(tmp, ALLOC_FILE), pages + grant_entries)
            _create_file(os.path.join(tmp, LOCK_FILE), 0)
            try:
                # rename(2) onto an existing non-empty directory fails: creation is atomic
                os.rename(tmp, final)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FileExistsError(errno.EEXIST, "domain already exists", final) from None
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(dir, domid)

    @classmethod
    def open(cls, dir: str, domid: int) -> GuestMemory:
        """Open an existing domain's memory (FileNotFoundError if there is none)."""
        return cls(DomainFiles(dir, domid), dir)

    def close(self) -> None:
        """Let go of this process's view of the domain (the domain lives on)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(BufferError):
                self._alloc.close()
            self._files.close()

    def destroy(self) -> None:
        """Remove the domain's files. Backends that still map its pages keep them
        (as Xen keeps a dying domain's granted pages until they are unmapped); new
        maps fail with GNTST_bad_domain."""
        self.close()
        shutil.rmtree(self._files.path, ignore_errors=True)

    # pages ---------------------------------------------------------------
    def alloc_page(self) -> int:
        """Allocate one guest page; return its frame number. MemoryError when full."""
        with self._lock, self._files.locked():
            frame = self._find_free(0, self.pages, self._page_cursor)
            if frame < 0:
                raise MemoryError(f"d{self.domid}: all {self.pages} pages allocated")
            self._alloc[frame] = 1
            self._page_cursor = frame + 1
            return frame

    def free_page(self, frame: int) -> None:
        self._check_frame(frame)
        with self._lock, self._files.locked():
            if not self._alloc[frame]:
                raise ValueError(f"d{self.domid}: frame {frame} is not allocated")
            self._alloc[frame] = 0

    def page(self, frame: int) -> memoryview:
        """A writable view of guest frame ``frame`` (the guest's own mapping)."""
        self._check_frame(frame)
        off = frame * PAGE_SIZE
        return self._mem[off : off + PAGE_SIZE]

    def pages_view(self, first_frame: int, count: int) -> memoryview:
        """One writable view of ``count`` adjacent frames (a multi-page ring)."""
        if count < 1:
            raise ValueError("count must be at least 1")
        self._check_frame(first_frame)
        self._check_frame(first_frame + count - 1)
        return self._mem[first_frame * PAGE_SIZE : (first_frame + count) * PAGE_SIZE]

    def allocated_pages(self) -> int:
        return self._alloc[: self.pages].count(1)

    # grants --------------------------------------------------------------
    def grant(self, frame: int, grantee_domid: int, readonly: bool = False) -> int:
        """Grant ``frame`` to ``grantee_domid``; return the grant ref (>= 8)."""
        self._check_frame(frame)
        flags = GTF_permit_access | (GTF_readonly if readonly else 0)
        with self._lock, self._files.locked():
            base = self.pages
            idx = self._find_free(
                base + GNTTAB_NR_RESERVED_ENTRIES, base + self.grant_entries,
                base + self._gref_cursor,
            )
            if idx < 0:
                raise MemoryError(f"d{self.domid}: all {self.grant_entries} grant entries in use")
            ref = idx - base
            self._alloc[idx] = 1
            self._gref_cursor = ref + 1
            self._files.write_entry(ref, flags, grantee_domid, frame)
            return ref

    def end_access(self, gref: int) -> bool:
        """Stop granting ``gref`` and free it. False (and nothing changes) while a
        backend still has it mapped: the frontend must not reuse the page or the ref
        yet, and calls again later (Linux defers such grants)."""
        self._check_gref(gref)
        with self._lock, self._files.locked():
            if not self._alloc[self.pages + gref]:
                raise ValueError(f"d{self.domid}: grant ref {gref} is not in use")
            if self._mapped_locked(gref):
                return False
            self._files.set_flags(gref, GTF_invalid)
            self._alloc[self.pages + gref] = 0
            return True

    def revoke(self, gref: int) -> None:
        """Hostile (XSA-396): clear the entry even while the backend maps it. The ref
        stays allocated; ``end_access`` frees it once the backend let go."""
        self._check_gref(gref)
        with self._lock, self._files.locked():
            self._files.set_flags(gref, 0)

    def is_mapped(self, gref: int) -> bool:
        """Whether a backend maps (or is copying) ``gref`` right now."""
        self._check_gref(gref)
        with self._lock, self._files.locked():
            return self._mapped_locked(gref)

    def entry(self, gref: int) -> GrantEntry:
        self._check_gref(gref)
        with self._lock, self._files.locked():
            return self._files.entry(gref)

    def write_entry(self, gref: int, flags: int, domid: int, frame: int) -> None:
        """Hostile hook: write a raw grant entry (any flags, any frame)."""
        self._check_gref(gref)
        with self._lock, self._files.locked():
            self._files.write_entry(gref, flags, domid, frame)

    def grants_in_use(self) -> int:
        return self._alloc[self.pages :].count(1)

    # helpers -------------------------------------------------------------
    def _mapped_locked(self, gref: int) -> bool:
        a = self._files.reap(gref)
        return bool(a.pins or self._files.entry(gref).flags & (GTF_reading | GTF_writing))

    def _find_free(self, start: int, end: int, cursor: int) -> int:
        if not start <= cursor < end:
            cursor = start
        idx = self._alloc.find(b"\x00", cursor, end)
        if idx < 0:
            idx = self._alloc.find(b"\x00", start, cursor)
        return idx

    def _check_frame(self, frame: int) -> None:
        if not 0 <= frame < self.pages:
            raise ValueError(f"d{self.domid}: frame {frame} outside 0..{self.pages - 1}")

    def _check_gref(self, gref: int) -> None:
        if not GNTTAB_NR_RESERVED_ENTRIES <= gref < self.grant_entries:
            raise ValueError(f"d{self.domid}: grant ref {gref} outside 8..{self.grant_entries - 1}")
