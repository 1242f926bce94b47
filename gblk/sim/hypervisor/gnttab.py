"""The simulated host's libxengnttab: map and copy a simulated guest's granted pages.

``SimGrantTable`` implements ``gblk.xen.interfaces.GrantTable`` over the files of
``gblk.sim.hypervisor.memory`` (layout documented there). A mapping is a real ``mmap`` of the
guest's RAM file at ``frame * 4096``: a write through it lands in the guest's page
with no copy, and a read-only mapping is ``PROT_READ`` (writes fail, as they would
fault on real Xen). Grant entries are checked and pinned the way Xen's
``map_grant_ref``/``gnttab_copy`` do (xen/common/grant_table.c): the first pin checks
the guest's entry and sets GTF_reading (and GTF_writing), later pins trust the active
record, the last unpin clears the flags. Pins live in the domain's ``active`` file so
the guest, in another process, sees that its page is still in use.

Runs in gevent's threadpool: thread-safe with a native lock, never touches gevent,
never logs. Must not import the engine or anything above ``gblk.sim``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Set, Tuple

from gblk.errors import GrantError
from gblk.sim.hypervisor.memory import (
    GNTTAB_FILE,
    PAGE_SIZE,
    DomainFiles,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_type_mask,
    GTF_writing,
    domain_dir,
)
from gblk.xen.interfaces import (
    CopySegment,
    GNTST_bad_copy_arg,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_no_device_space,
    GNTST_okay,
    GrantMapping,
    GrantTable,
)
from gblk.xen.native import native_lock, new_ffi

# libc's mmap, to place guest pages at fixed addresses inside a reserved range
_ffi = new_ffi()
_libc = ctypes.CDLL(None, use_errno=True)
_libc_mmap = _libc.mmap
_libc_mmap.restype = ctypes.c_void_p
_libc_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_MAP_FIXED = 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value

#: Xen 4.17 answers both "this entry is not granted to you" and "writable map of a
#: read-only grant" with GNTST_general_error (_set_status_v1 in
#: xen/common/grant_table.c), not GNTST_permission_denied: the simulator does the same.
STATUS_NOT_GRANTED = GNTST_general_error
STATUS_READONLY = GNTST_general_error

GNTST_NAMES = {
    0: "GNTST_okay",
    -1: "GNTST_general_error",
    -2: "GNTST_bad_domain",
    -3: "GNTST_bad_gntref",
    -4: "GNTST_bad_handle",
    -5: "GNTST_bad_virt_addr",
    -6: "GNTST_bad_dev_addr",
    -7: "GNTST_no_device_space",
    -8: "GNTST_permission_denied",
    -9: "GNTST_bad_page",
    -10: "GNTST_bad_copy_arg",
    -11: "GNTST_address_too_big",
    -12: "GNTST_eagain",
}


def status_name(status: int) -> str:
    return GNTST_NAMES.get(status, f"GNTST({status})")


class _Fail(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class SimGrantMapping(GrantMapping):
    """Pages of one simulated domain mapped by ``SimGrantTable.map_grant_refs``.

    All refs share one reserved range (``contiguous``, as libxengnttab maps them),
    each run of consecutive frames placed in it by one ``mmap``; ``pages[i]`` is a
    4096-byte view of the i-th ref's page. ``unmap()`` releases every view it handed out, then closes the
    maps: if a view derived from ``pages`` is still alive the page stays mapped and
    pinned and GrantError says so (real Xen would leave a dangling pointer; here the
    engine bug is caught instead).
    """

    def __init__(
        self,
        table: SimGrantTable,
        files: DomainFiles,
        refs: List[int],
        frames: List[int],
        writable: bool,
    ) -> None:
        self.domid = files.domid
        self.refs = refs
        self.writable = writable
        self._table = table
        self._files = files
        self._maps: List[mmap.mmap] = []
        self._views: List[memoryview] = []
        self.unmapped = False
        try:
            self._map_contiguous(files.mem_fd, frames, writable)
        except BaseException:
            self.pages = []
            self._release_views()
            self._close_maps()
            raise

    def _map_contiguous(self, fd: int, frames: List[int], writable: bool) -> None:
        """Like libxengnttab: every ref in one contiguous range. An anonymous
        reservation (no file descriptor: Python's mmap of a file dups the fd, and a
        daemon with thousands of mappings would run out of select()-able fds), then
        each guest page placed over it with MAP_FIXED; closing the reservation
        unmaps them all. Read-only mappings are PROT_READ and their views read-only."""
        n = len(frames)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        region = mmap.mmap(-1, n * PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot)
        self._maps.append(region)
        anchor = _ffi.from_buffer(region)
        base_addr = int(_ffi.cast("uintptr_t", anchor))
        _ffi.release(anchor)  # no export may outlive this function: region.close() needs none
        k = 0
        while k < n:  # one mmap call per run of consecutive frames
            j = k + 1
            while j < n and frames[j] == frames[j - 1] + 1:
                j += 1
            got = _libc_mmap(base_addr + k * PAGE_SIZE, (j - k) * PAGE_SIZE, prot,
                             mmap.MAP_SHARED | _MAP_FIXED, fd, frames[k] * PAGE_SIZE)
            if got in (None, _MAP_FAILED):
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            k = j
        whole = memoryview(region)
        self._views.append(whole)
        self.contiguous = whole
        self.pages = [whole[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] for k in range(n)]

    def unmap(self) -> None:
        with self._table._lock:
            self._table._unmap_locked(self)

    def _release_views(self) -> bool:
        """Release every view we created; False if one is exported elsewhere."""
        ok = True
        for v in list(self.pages) + self._views:
            try:
                v.release()
            except BufferError:
                ok = False
        return ok

    def _close_maps(self) -> bool:
        busy: List[mmap.mmap] = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                busy.append(m)
        self._maps = busy
        return not busy


class SimGrantTable(GrantTable):
    """A grant-table handle of domain ``own_domid`` on the simulated host in ``dir``."""

    supports_copy = True

    def __init__(self, dir: str, own_domid: int = 0) -> None:
        self.dir = dir
        self.domid = own_domid
        self._lock = native_lock()
        self._domains: Dict[int, DomainFiles] = {}
        self._users: Dict[int, int] = defaultdict(int)  # id(DomainFiles) -> users
        self._stale: Dict[int, DomainFiles] = {}
        self._live: Set[SimGrantMapping] = set()
        self._pid = os.getpid()
        self._closed = False
        #: live GrantMapping objects / pages mapped through this handle (leak checks)
        self.active_mappings = 0
        self.mapped_pages = 0
        #: 0 = unlimited (xengnttab_set_max_grants)
        self.max_grants = 0

    # GrantTable ------------------------------------------------------------
    def set_max_grants(self, count: int) -> None:
        self.max_grants = max(0, int(count))

    def map_grant_refs(self, domid: int, refs: Sequence[int], writable: bool) -> GrantMapping:
        refs = [int(r) for r in refs]
        n = len(refs)
        if n == 0:
            raise GrantError(f"d{domid}: map of no grant refs", GNTST_general_error)
        with self._lock:
            self._check_open()
            if self.max_grants and self.mapped_pages + n > self.max_grants:
                raise GrantError(
                    f"d{domid}: mapping {n} more grants exceeds the limit of {self.max_grants}",
                    GNTST_no_device_space,
                )
            try:
                files = self._domain_locked(domid)
            except _Fail as e:
                raise GrantError(str(e), e.status) from None
            frames: List[int] = []
            with files.locked():
                for i, ref in enumerate(refs):
                    status, frame = self._check(files, ref, writable)
                    if status != GNTST_okay:
                        raise GrantError(
                            f"d{domid} grant ref {ref} (segment {i} of {n}): "
                            f"{status_name(status)}",
                            status,
                        )
                    frames.append(frame)
                for ref, frame in zip(refs, frames):
                    self._pin(files, ref, writable, frame)
            self._users[id(files)] += 1
            try:
                mapping = SimGrantMapping(self, files, refs, frames, writable)
            except OSError as e:
                with files.locked():
                    for ref in refs:
                        self._unpin(files, ref, writable)
                self._release_domain_locked(files)
                raise GrantError(f"d{domid}: mmap of granted pages failed: {e}") from None
            self._live.add(mapping)
            self.active_mappings += 1
            self.mapped_pages += n
            return mapping

    def grant_copy(self, segments: Sequence[CopySegment]) -> List[int]:
        statuses = [GNTST_okay] * len(segments)
        plan: List[Tuple[CopySegment, DomainFiles, memoryview, memoryview, bool]] = []
        by_domain: Dict[int, List[int]] = defaultdict(list)
        for i, seg in enumerate(segments):
            by_domain[seg.domid].append(i)
        try:
            with self._lock:
                self._check_open()
                for domid, idxs in by_domain.items():
                    try:
                        files = self._domain_locked(domid)
                    except _Fail as e:
                        for i in idxs:
                            statuses[i] = e.status
                        continue
                    mem = files.map_memory()
                    with files.locked():
                        for i in idxs:
                            seg = segments[i]
                            local = _local_bytes(seg)
                            if local is None:
                                statuses[i] = GNTST_bad_copy_arg
                                continue
                            writable = not seg.to_local  # copying into the guest's page
                            status, frame = self._check(files, seg.gref, writable)
                            if status != GNTST_okay:
                                local.release()
                                statuses[i] = status
                                continue
                            self._pin(files, seg.gref, writable, frame)
                            self._users[id(files)] += 1
                            start = frame * PAGE_SIZE + seg.offset
                            guest = mem[start : start + seg.length]
                            plan.append((seg, files, guest, local, writable))
            # the "hypervisor" copies outside the locks, like Xen with the grant pinned
            for seg, _files, guest, local, _w in plan:
                if seg.to_local:
                    local[:] = guest
                else:
                    guest[:] = local
        finally:
            with self._lock:
                for seg, files, guest, local, writable in plan:
                    guest.release()
                    local.release()
                    with files.locked():
                        self._unpin(files, seg.gref, writable)
                    self._release_domain_locked(files)
        return statuses

    def close(self) -> None:
        """Unmap everything still mapped and let go of every domain (idempotent).
        GrantError if a mapping could not be unmapped (a derived view is alive)."""
        errors: List[str] = []
        with self._lock:
            if self._closed:
                return
            for mapping in list(self._live):
                try:
                    self._unmap_locked(mapping)
                except GrantError as e:
                    errors.append(str(e))
            if not errors:
                self._closed = True
                for files in list(self._domains.values()) + list(self._stale.values()):
                    files.close()
                self._domains.clear()
                self._stale.clear()
        if errors:
            raise GrantError("; ".join(errors))

    # internals (called with self._lock held) ---------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise GrantError("grant table handle is closed", GNTST_general_error)

    def _domain_locked(self, domid: int) -> DomainFiles:
        try:
            st = os.stat(os.path.join(domain_dir(self.dir, domid), GNTTAB_FILE))
        except FileNotFoundError:
            raise _Fail(GNTST_bad_domain, f"d{domid}: no such domain: GNTST_bad_domain") from None
        files = self._domains.get(domid)
        if files is not None and files.ino == st.st_ino:
            return files
        if files is not None:  # the domain was destroyed and created again
            del self._domains[domid]
            self._stale[id(files)] = files
            self._release_domain_locked(files, drop=False)
        try:
            files = DomainFiles(self.dir, domid)
        except FileNotFoundError:
            raise _Fail(GNTST_bad_domain, f"d{domid}: no such domain: GNTST_bad_domain") from None
        except OSError as e:
            raise _Fail(GNTST_general_error, f"d{domid}: cannot open its memory: {e}") from None
        self._domains[domid] = files
        return files

    def _release_domain_locked(self, files: DomainFiles, drop: bool = True) -> None:
        """A domain's files close with their last mapping (or copy): one handle serves
        every disk of a daemon, and a guest that went must not keep its fds open."""
        key = id(files)
        if drop:
            self._users[key] -= 1
        if self._users[key] > 0:
            return
        self._users.pop(key, None)
        if self._stale.pop(key, None) is None:
            if self._domains.get(files.domid) is not files:
                return
            del self._domains[files.domid]
        files.close()

    def _check(self, files: DomainFiles, ref: int, writable: bool) -> Tuple[int, int]:
        """Xen's checks for pinning ``ref``: (GNTST status, frame). Changes nothing
        but reclaiming pins of dead processes."""
        if not 0 <= ref < files.nr_entries:
            return GNTST_bad_gntref, 0
        a = files.reap(ref)
        if a.pins and a.domid != self.domid:
            return GNTST_general_error, 0
        if not a.has_slot_for(self._pid):
            return GNTST_no_device_space, 0  # the simulator's limit: ACTIVE_SLOTS processes
        frame = a.frame
        if not a.pins or (writable and not a.wpins):
            e = files.entry(ref)
            if (e.flags & GTF_type_mask) != GTF_permit_access or e.domid != self.domid:
                return STATUS_NOT_GRANTED, 0
            if writable and e.flags & GTF_readonly:
                return STATUS_READONLY, 0
            if not a.pins:
                frame = e.frame
        if frame >= files.nr_pages:
            return GNTST_bad_page, 0
        return GNTST_okay, frame

    def _pin(self, files: DomainFiles, ref: int, writable: bool, frame: int) -> None:
        a = files.active_entry(ref)
        # Xen (_set_status) checks and marks the shared entry on the first pin and on
        # the first writable one; later pins trust the active entry
        marks = not a.pins or (writable and not a.wpins)
        files.write_active(ref, a.pinned(self._pid, writable, frame, self.domid))
        if marks:
            flags = files.entry(ref).flags | GTF_reading | (GTF_writing if writable else 0)
            files.set_flags(ref, flags)

    def _unpin(self, files: DomainFiles, ref: int, writable: bool) -> None:
        a = files.active_entry(ref).unpinned(self._pid, writable)
        files.write_active(ref, a)
        files.unpin_flags(ref, a)

    def _unmap_locked(self, mapping: SimGrantMapping) -> None:
        if mapping.unmapped:
            return
        views_ok = mapping._release_views()
        if not mapping._close_maps() or not views_ok:
            raise GrantError(
                f"d{mapping.domid}: cannot unmap grants {mapping.refs}: a view derived "
                "from the mapping is still alive (release it first)",
                GNTST_general_error,
            )
        mapping.unmapped = True
        files = mapping._files
        with files.locked():
            for ref in mapping.refs:
                self._unpin(files, ref, mapping.writable)
        self._live.discard(mapping)
        self.active_mappings -= 1
        self.mapped_pages -= len(mapping.refs)
        self._release_domain_locked(files)


def _local_bytes(seg: CopySegment) -> Optional[memoryview]:
    """The local side of a copy segment as a flat byte view, or None if the
    segment's arguments are invalid (GNTST_bad_copy_arg)."""
    if seg.offset < 0 or seg.length < 0 or seg.offset + seg.length > PAGE_SIZE:
        return None
    try:
        local = memoryview(seg.local).cast("B")
    except (TypeError, ValueError):
        return None
    if local.nbytes != seg.length or (seg.to_local and local.readonly):
        local.release()
        return None
    return local

