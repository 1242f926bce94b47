"""The blocking half of the dataplane: one job per request, run in the threadpool.

A job maps (or copies) the guest pages it needs, does the IO straight into them,
unmaps, and returns an ``Outcome``. It never raises, never logs, never touches the
ring, gevent objects or stats: the hub side does the bookkeeping from the Outcome.
Invariant: every mapping a job makes is unmapped before it returns, except new
persistent-grant mappings, which it hands back to the ring's cache.
"""

from __future__ import annotations

import mmap
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..blkif.abi import Segment, parse_indirect_segments
from ..blkif.const import SECTOR_SHIFT, Op, Status
from ..blkif.validate import DiskLimits, check_segments, indirect_pages
from ..errors import GblkError, GrantError, InvalidRequest
from ..storage import Store
from ..xen.interfaces import PAGE_SIZE, CopySegment, GrantMapping, GrantTable

MODE_MAP = "map"
MODE_PERSISTENT = "persistent"
MODE_COPY = "copy"


class Outcome:
    __slots__ = ("status", "reason", "nbytes", "maps", "unmaps", "copies", "new_grants",
                 "segments", "detail")

    def __init__(self) -> None:
        self.status = int(Status.OKAY)
        self.reason = ""
        self.detail = ""
        self.nbytes = 0
        self.maps = 0
        self.unmaps = 0
        self.copies = 0
        #: persistent mode: gref -> single-page mapping made by this job, for the cache
        self.new_grants: Dict[int, GrantMapping] = {}
        #: indirect phase 1: the segments read from the indirect pages
        self.segments: Tuple[Segment, ...] = ()

    def fail(self, reason: str, detail: str = "", status: int = Status.ERROR) -> "Outcome":
        self.status = int(status)
        self.reason = reason
        self.detail = detail
        return self


class JobContext:
    """What every job of one device needs; built once per connection."""

    __slots__ = ("gnttab", "store", "domid", "limits", "mode")

    def __init__(self, gnttab: GrantTable, store: Store, domid: int, limits: DiskLimits,
                 mode: str) -> None:
        self.gnttab = gnttab
        self.store = store
        self.domid = domid
        self.limits = limits
        self.mode = mode


def read_indirect(ctx: JobContext, grefs: Sequence[int], nr_segments: int,
                  cached: Optional[Dict[int, memoryview]] = None) -> Outcome:
    """Phase 1 of INDIRECT: copy the descriptor pages once, parse and check the copy.

    With persistent grants the descriptor pages are cached like data pages (Linux's
    blkfront takes them from its persistent pool, and blkback keeps them): ``cached``
    holds those already mapped, the others are mapped here and handed back in
    ``new_grants``.
    """
    out = Outcome()
    npages = indirect_pages(nr_segments)
    refs = list(grefs[:npages])
    raw: Union[bytes, bytearray]
    try:
        if ctx.mode == MODE_COPY:
            buf = bytearray(npages * PAGE_SIZE)
            view = memoryview(buf)
            segs = [CopySegment(ctx.domid, r, 0, PAGE_SIZE, view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], True)
                    for i, r in enumerate(refs)]
            try:
                statuses = ctx.gnttab.grant_copy(segs)
            except GrantError as e:
                return out.fail("grant_copy", str(e))
            finally:
                for c in segs:
                    c.local.release()
                view.release()
            out.copies += len(segs)
            bad = [s for s in statuses if s != 0]
            if bad:
                return out.fail("grant_copy", f"indirect page copy status {bad[0]}")
            raw = buf  # private already: the guest cannot change it
        elif ctx.mode == MODE_PERSISTENT:
            mappings: List[GrantMapping] = []
            try:
                pages = _map_persistent(ctx, refs, cached or {}, False, out, mappings)
                out.segments = read_descriptors(pages, refs, nr_segments)
            except GrantError as e:
                out.fail("grant_map", str(e))
            finally:
                _release(mappings, out)
            return out
        else:
            mapping = ctx.gnttab.map_grant_refs(ctx.domid, refs, False)
            out.maps += len(refs)
            try:
                raw = b"".join(mapping.pages)  # the one read of them
            finally:
                mapping.unmap()
                out.unmaps += len(refs)
    except GrantError as e:
        return out.fail("grant_map", str(e))
    out.segments = parse_indirect_segments(raw, nr_segments)
    return out


def read_descriptors(pages: Mapping[int, memoryview], refs: Sequence[int],
                     nr_segments: int) -> Tuple[Segment, ...]:
    """The segments of INDIRECT descriptor pages mapped as ``pages`` (gref -> view),
    parsed from one private copy: the guest may rewrite the pages meanwhile, the copy
    is what gets checked and used."""
    return parse_indirect_segments(b"".join([pages[r] for r in refs]), nr_segments)


def run_request(
    ctx: JobContext,
    op: int,
    segments: Sequence[Segment],
    sector: int,
    cached: Dict[int, memoryview],
    presync: bool,
    postsync: bool,
) -> Outcome:
    """READ/WRITE (also the data part of FLUSH/BARRIER/INDIRECT) and data-less flushes.

    ``op`` is Op.READ or Op.WRITE (direction of the data), ``cached`` the persistent
    grants already mapped (gref -> page view) that this job may use.
    """
    out = Outcome()
    store = ctx.store
    if segments:
        try:
            check_segments(sector, segments, ctx.limits)
        except InvalidRequest as e:
            return out.fail(e.reason, str(e))
    try:
        if presync:
            store.flush()
        if segments:
            offset = sector << SECTOR_SHIFT
            if ctx.mode == MODE_COPY:
                _copy_io(ctx, op, segments, offset, out)
            else:
                _mapped_io(ctx, op, segments, offset, cached, out)
            if out.status != Status.OKAY:
                return out
        if postsync:
            store.flush()
    except OSError as e:
        return out.fail("io_error", e.strerror or str(e))
    return out


def _slices(pages: Dict[int, memoryview], segments: Sequence[Segment]) -> List[memoryview]:
    """Exactly [first_sect, last_sect] of each page: nothing outside is touched (XSA-403)."""
    return [
        pages[s.gref][s.first_sect << SECTOR_SHIFT:(s.last_sect + 1) << SECTOR_SHIFT]
        for s in segments
    ]


def _map_persistent(ctx: JobContext, refs: Sequence[int], cached: Dict[int, memoryview],
                    writable: bool, out: Outcome, mappings: List[GrantMapping]) -> Dict[int, memoryview]:
    """gref -> page for ``refs``: ``cached`` ones as they are, the others mapped one
    grant per mapping (so the cache can unmap them one by one) and writable whatever
    the op, into ``out.new_grants``. A read-only grant where only reading is needed
    (``writable`` False) is used but not kept: its mapping goes to ``mappings``."""
    pages: Dict[int, memoryview] = dict(cached)
    for ref in refs:
        if ref in pages:
            continue
        try:
            m = ctx.gnttab.map_grant_refs(ctx.domid, [ref], True)
            out.new_grants[ref] = m
        except GrantError:
            if writable:
                raise
            m = ctx.gnttab.map_grant_refs(ctx.domid, [ref], False)
            mappings.append(m)
        out.maps += 1
        pages[ref] = m.pages[0]
    return pages


def _release(mappings: List[GrantMapping], out: Outcome) -> None:
    """Unmap a job's transient mappings, and its new persistent ones if it failed (the
    grants may be bogus: a failed request caches nothing)."""
    release = list(mappings)
    if out.status != Status.OKAY and out.new_grants:
        release.extend(out.new_grants.values())
        out.new_grants = {}
    for m in release:
        n = len(m.pages)
        try:
            m.unmap()
            out.unmaps += n
        except GrantError as e:  # counted, reported; never raised out of a job
            out.fail("grant_map", f"unmap failed: {e}")


def _mapped_io(ctx: JobContext, op: int, segments: Sequence[Segment], offset: int,
               cached: Dict[int, memoryview], out: Outcome) -> None:
    writable = op == Op.READ
    mappings: List[GrantMapping] = []
    try:
        if ctx.mode == MODE_PERSISTENT:
            pages = _map_persistent(ctx, [s.gref for s in segments], cached, writable, out,
                                    mappings)
        else:
            missing: List[int] = []
            for s in segments:
                if s.gref not in cached and s.gref not in missing:
                    missing.append(s.gref)
            pages = dict(cached)
            if missing:
                m = ctx.gnttab.map_grant_refs(ctx.domid, missing, writable)
                out.maps += len(missing)
                mappings.append(m)
                pages.update(zip(missing, m.pages))
        views = _slices(pages, segments)
        try:
            if op == Op.READ:
                ctx.store.readv(views, offset)
            else:
                ctx.store.writev(views, offset)
        finally:
            for v in views:
                v.release()
        out.nbytes = _nbytes(segments)
    except GrantError as e:
        out.fail("grant_map", str(e))
    finally:
        # unmap before the response is published: the frontend reclaims the page
        # as soon as it sees the response
        _release(mappings, out)


def _nbytes(segments: Sequence[Segment]) -> int:
    return sum((s.last_sect - s.first_sect + 1) << SECTOR_SHIFT for s in segments)


def _copy_io(ctx: JobContext, op: int, segments: Sequence[Segment], offset: int,
             out: Outcome) -> None:
    total = _nbytes(segments)
    # page-aligned bounce buffer (O_DIRECT wants aligned memory)
    bounce = mmap.mmap(-1, max(total, PAGE_SIZE))
    view = memoryview(bounce)
    try:
        copies = []
        pos = 0
        for s in segments:
            length = (s.last_sect - s.first_sect + 1) << SECTOR_SHIFT
            copies.append(CopySegment(ctx.domid, s.gref, s.first_sect << SECTOR_SHIFT, length,
                                      view[pos:pos + length], op != Op.READ))
            pos += length
        data = [view[:total]]
        try:
            if op == Op.READ:
                ctx.store.readv(data, offset)
                statuses = ctx.gnttab.grant_copy(copies)
            else:
                statuses = ctx.gnttab.grant_copy(copies)
                bad = [st for st in statuses if st]
                if not bad:
                    ctx.store.writev(data, offset)
            out.copies += len(copies)
            bad = [st for st in statuses if st]
            if bad:
                out.fail("grant_copy", f"grant copy status {bad[0]}")
            else:
                out.nbytes = total
        except GrantError as e:
            out.fail("grant_copy", str(e))
        finally:
            for c in copies:
                c.local.release()
            for d in data:
                d.release()
    finally:
        view.release()
        bounce.close()


def run_batch(items: Sequence[Tuple[Callable[..., Outcome], Tuple[Any, ...]]]) -> List[Any]:
    """Several requests' jobs in order, in one threadpool job. Each result is an
    Outcome or, should a job ever raise (a bug), the exception: never raised here."""
    out: List[Any] = []
    for fn, args in items:
        try:
            out.append(fn(*args))
        except Exception as e:  # noqa: BLE001 - handed to the hub, which answers ERROR
            out.append(e)
    return out


def run_discard(ctx: JobContext, sector: int, nr_sectors: int, secure: bool) -> Outcome:
    out = Outcome()
    try:
        ctx.store.discard(sector << SECTOR_SHIFT, nr_sectors << SECTOR_SHIFT, secure)
    except OSError as e:
        return out.fail("io_error", e.strerror or str(e))
    out.nbytes = nr_sectors << SECTOR_SHIFT  # gblk_bytes_total{op="discard"}: bytes discarded
    return out


def unmap_all(mappings: Sequence[GrantMapping]) -> int:
    """Unmap cache entries (eviction, idle sweep, disconnect). Returns how many."""
    n = 0
    for m in mappings:
        m.unmap()
        n += 1
    return n


class _Raised:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _catching(fn: Callable[..., Any], args: Tuple[Any, ...]) -> Any:
    try:
        return fn(*args)
    except (GblkError, OSError) as e:
        return _Raised(e)


def apply(pool: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the threadpool, its GblkError or OSError raised here, on the
    hub: gevent's threadpool would print the traceback of an exception a job raises."""
    got = pool.apply(_catching, (fn, args))
    if isinstance(got, _Raised):
        raise got.error
    return got


def flush_only(store: Store) -> Optional[str]:
    try:
        store.flush()
    except OSError as e:
        return e.strerror or str(e)
    return None
