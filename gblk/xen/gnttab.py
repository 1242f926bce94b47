"""Real grant tables: libxengnttab (Xen 4.17) through cffi in ABI mode.

``RealGrantTable`` implements ``gblk.xen.interfaces.GrantTable`` over
``libxengnttab.so.1`` (Debian package libxengnttab1): ``xengnttab_open``,
``xengnttab_set_max_grants``, ``xengnttab_map_domain_grant_refs`` (one contiguous
region, exposed as one memoryview per page), ``xengnttab_unmap`` and
``xengnttab_grant_copy``. Only the prototypes used are declared, copied from
/usr/include/xengnttab.h. Library errors become ``gblk.errors`` here.

Runs in gevent's threadpool (mapping a paged-out grant retries inside the kernel
and blocks): no gevent, no logging. Must not import anything from gblk but
``errors``, ``xen.interfaces`` and ``xen.native``.
"""

from __future__ import annotations

import mmap
import os
import sys
from typing import Any, Callable, List, Optional, Sequence

from gblk.errors import GrantError
from gblk.xen.interfaces import (
    PAGE_SIZE,
    CopySegment,
    GNTST_general_error,
    GrantMapping,
    GrantTable,
)
from gblk.xen.native import XenLibrary, native_lock, new_ffi

LIBRARY = "libxengnttab.so.1"
PACKAGE = "libxengnttab1"
DEVICE = "/dev/xen/gntdev"

# xen/include/public/grant_table.h
GNTCOPY_source_gref = 1 << 0
GNTCOPY_dest_gref = 1 << 1

CDEF = """
typedef uint16_t domid_t;
struct xentoollog_logger;
typedef struct xengntdev_handle xengnttab_handle;

xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags);
int xengnttab_close(xengnttab_handle *xgt);
void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count,
                                      uint32_t domid, uint32_t *refs, int prot);
int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count);
int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants);

struct xengnttab_grant_copy_segment {
    union xengnttab_copy_ptr {
        void *virt;
        struct {
            uint32_t ref;
            uint16_t offset;
            uint16_t domid;
        } foreign;
    } source, dest;
    uint16_t len;
    uint16_t flags;
    int16_t status;
};
typedef struct xengnttab_grant_copy_segment xengnttab_grant_copy_segment_t;
int xengnttab_grant_copy(xengnttab_handle *xgt, uint32_t count,
                         xengnttab_grant_copy_segment_t *segs);
"""

# used from gevent's threadpool: its lock, like ours, must be a real thread lock
ffi = new_ffi(CDEF)

_LIBRARY = XenLibrary(ffi, LIBRARY, PACKAGE, DEVICE, "grant", "xen-gntdev")
#: dlopen libxengnttab once; XenUnavailable naming the package if it is missing
load_library = _LIBRARY.load
#: the one-line explanation for xengnttab_open failing with an errno
open_error = _LIBRARY.open_error


class RealGrantMapping(GrantMapping):
    """A contiguous region of mapped grants; ``pages[i]`` views the i-th page.

    ``unmap()`` releases every view it handed out and unmaps only if nothing else
    still refers to the region (a slice of a page kept somewhere): otherwise the
    region stays mapped and GrantError says so, since using such a view after
    ``xengnttab_unmap`` would crash the process. ``unmapper(count)`` does the
    unmapping (it is what the tests replace).
    """

    def __init__(
        self,
        buffer: Any,
        count: int,
        writable: bool,
        unmapper: Callable[[], None],
        on_unmapped: Optional[Callable[[RealGrantMapping], None]] = None,
    ) -> None:
        self.count = count
        self.writable = writable
        self._buffer = buffer
        self._unmapper = unmapper
        self._on_unmapped = on_unmapped
        self._lock = native_lock()
        base = memoryview(buffer)
        if not writable:
            ro = base.toreadonly()  # the pages are PROT_READ: writing would SIGSEGV
            base.release()
            base = ro
        self._base = base
        #: the whole region: libxengnttab maps the refs adjacently (multi-page rings)
        self.contiguous: Optional[memoryview] = base
        self.pages: List[memoryview] = [
            base[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(count)
        ]
        self.unmapped = False

    def unmap(self) -> None:
        with self._lock:
            if self.unmapped:
                return
            busy = False
            for view in self.pages + [self._base]:
                try:
                    view.release()
                except BufferError:
                    busy = True
            # our attribute + getrefcount's argument: anything more is a live view
            if busy or sys.getrefcount(self._buffer) > 2:
                raise GrantError(
                    f"cannot unmap {self.count} grant page(s): a view derived from the "
                    "mapping is still alive (release it first)",
                    GNTST_general_error,
                )
            self._unmapper()
            self.unmapped = True
            self._buffer = None
        if self._on_unmapped is not None:
            self._on_unmapped(self)


class RealGrantTable(GrantTable):
    """A handle on /dev/xen/gntdev. Opening raises XenUnavailable without Xen."""

    supports_copy = True

    def __init__(self, library: str = LIBRARY, lib: Any = None) -> None:
        """``lib``: an already loaded library (tests pass a stand-in)."""
        self._lib: Any
        self._handle: Any
        self._lib, self._handle = _LIBRARY.open("xengnttab_open", library, lib)
        self._lock = native_lock()
        self._live: List[RealGrantMapping] = []
        self.active_mappings = 0
        self.mapped_pages = 0

    def set_max_grants(self, count: int) -> None:
        with self._lock:
            self._check_open()
            if self._lib.xengnttab_set_max_grants(self._handle, count) != 0:
                err = ffi.errno
                raise GrantError(f"xengnttab_set_max_grants({count}): {os.strerror(err)}")

    def map_grant_refs(self, domid: int, refs: Sequence[int], writable: bool) -> GrantMapping:
        count = len(refs)
        if count == 0:
            raise GrantError(f"d{domid}: map of no grant refs", GNTST_general_error)
        with self._lock:
            self._check_open()
            handle = self._handle
        crefs = ffi.new("uint32_t[]", [int(r) for r in refs])
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        addr = self._lib.xengnttab_map_domain_grant_refs(handle, count, domid, crefs, prot)
        if addr == ffi.NULL:
            err = ffi.errno
            # the kernel reports no per-grant status through mmap: errno only
            raise GrantError(
                f"d{domid}: mapping grant refs {list(refs)[:8]}{'...' if count > 8 else ''} "
                f"failed: {os.strerror(err)}",
                GNTST_general_error,
            )

        def unmapper() -> None:
            if self._lib.xengnttab_unmap(handle, addr, count) != 0:
                raise GrantError(f"d{domid}: xengnttab_unmap: {os.strerror(ffi.errno)}")

        mapping = RealGrantMapping(
            ffi.buffer(ffi.cast("char *", addr), count * PAGE_SIZE),
            count, writable, unmapper, self._forget,
        )
        with self._lock:
            self._live.append(mapping)
            self.active_mappings += 1
            self.mapped_pages += count
        return mapping

    def grant_copy(self, segments: Sequence[CopySegment]) -> List[int]:
        n = len(segments)
        if n == 0:
            return []
        with self._lock:
            self._check_open()
            handle = self._handle
        segs = ffi.new("xengnttab_grant_copy_segment_t[]", n)
        keep = []
        for i, seg in enumerate(segments):
            if seg.length != seg.local.nbytes:
                raise GrantError(f"grant copy segment {i}: local buffer is not {seg.length} bytes")
            local = ffi.from_buffer(seg.local, require_writable=seg.to_local)
            keep.append(local)
            s = segs[i]
            if seg.to_local:
                s.source.foreign.ref = seg.gref
                s.source.foreign.offset = seg.offset
                s.source.foreign.domid = seg.domid
                s.dest.virt = local
                s.flags = GNTCOPY_source_gref
            else:
                s.source.virt = local
                s.dest.foreign.ref = seg.gref
                s.dest.foreign.offset = seg.offset
                s.dest.foreign.domid = seg.domid
                s.flags = GNTCOPY_dest_gref
            s.len = seg.length
        if self._lib.xengnttab_grant_copy(handle, n, segs) != 0:
            raise GrantError(f"xengnttab_grant_copy of {n} segments: {os.strerror(ffi.errno)}")
        del keep
        return [int(segs[i].status) for i in range(n)]

    def close(self) -> None:
        with self._lock:
            if self._handle is None:
                return
            live = list(self._live)
        for mapping in live:
            mapping.unmap()  # raises if a view is still in use: the handle stays open
        with self._lock:
            if self._handle is not None:
                self._lib.xengnttab_close(self._handle)
                self._handle = None

    def _check_open(self) -> None:
        if self._handle is None:
            raise GrantError("grant table handle is closed", GNTST_general_error)

    def _forget(self, mapping: RealGrantMapping) -> None:
        with self._lock:
            if mapping in self._live:
                self._live.remove(mapping)
                self.active_mappings -= 1
                self.mapped_pages -= mapping.count
