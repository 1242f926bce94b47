"""The blocking half of the dataplane: what runs in the threadpool.

A job gets the guest pages it needs through the connection's page source
(``gblk.engine.pages``), does the IO straight into them, releases what it mapped and
returns an ``Outcome``. It never raises, never logs, never touches the ring, gevent
objects or stats: the hub side does the bookkeeping from the Outcome. Every check of
a request's header is made on the hub before a job exists; a job checks only what
it reads itself (INDIRECT descriptors). Invariant: every mapping a job makes is
unmapped before it returns, except new persistent-grant mappings, which it hands
back to the ring's cache.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..blkif import reasons as R
from ..blkif.abi import Segment
from ..blkif.const import SECTOR_SHIFT, Op
from ..blkif.validate import DiskLimits, check_segments, indirect_pages
from ..errors import GblkError, GrantError, InvalidRequest
from ..storage import Store
from ..xen.interfaces import GrantMapping, GrantTable
from . import pages as _pages
from .pages import Outcome, PageSource, io_failed, join_descriptors, page_source

MODE_MAP = _pages.MAP
MODE_PERSISTENT = _pages.PERSISTENT
MODE_COPY = _pages.COPY

__all__ = ["Outcome", "JobContext", "run_request", "run_indirect", "read_indirect",
           "read_descriptors", "run_views", "run_discard", "run_batch", "unmap_all", "unmap_reporting", "apply", "catching", "raised_or", "is_raised",
           "flush_only"]

#: kept for callers that parse descriptor pages themselves
read_descriptors = join_descriptors


class JobContext:
    """What every job of one connection needs; built once per connection."""

    __slots__ = ("gnttab", "store", "domid", "limits", "mode", "pages")

    def __init__(self, gnttab: GrantTable, store: Store, domid: int, limits: DiskLimits,
                 mode: str) -> None:
        self.gnttab = gnttab
        self.store = store
        self.domid = domid
        self.limits = limits
        self.mode = mode
        self.pages: PageSource = page_source(mode, gnttab, store, domid)


def read_indirect(ctx: JobContext, grefs: Sequence[int], nr_segments: int,
                  cached: Optional[Dict[int, memoryview]] = None) -> Outcome:
    """The descriptor pages of an INDIRECT request, copied once and parsed into
    ``out.segments`` (persistent: ``cached`` holds those already mapped; the others
    are mapped here and handed back in ``new_grants``)."""
    out = Outcome()
    refs = list(grefs[:indirect_pages(nr_segments)])
    _descriptors(ctx, refs, nr_segments, cached or {}, out)
    return out


def _descriptors(ctx: JobContext, refs: Sequence[int], nr_segments: int,
                 cached: Dict[int, memoryview], out: Outcome) -> bool:
    try:
        out.segments = ctx.pages.descriptors(refs, nr_segments, cached, out)
    except _pages.CopyError as e:
        out.fail(R.GRANT_COPY, str(e))
    except GrantError as e:
        out.fail(R.GRANT_MAP, str(e))
    if out.status != 0:
        _pages.release([], out)  # a failed request caches nothing
        return False
    return True


def run_indirect(ctx: JobContext, op: int, grefs: Sequence[int], nr_segments: int,
                 sector: int, cached: Dict[int, memoryview]) -> Outcome:
    """A whole INDIRECT request in one handoff: read and check its descriptors, then
    its data (``cached``: the descriptor pages already mapped, persistent only)."""
    out = Outcome()
    refs = list(grefs[:indirect_pages(nr_segments)])
    if not _descriptors(ctx, refs, nr_segments, cached, out):
        return out
    try:
        check_segments(sector, out.segments, ctx.limits)
    except InvalidRequest as e:
        out.fail(e.reason, str(e))
        _pages.release([], out)
        return out
    new = out.new_grants  # descriptor pages mapped here: the data may use them too
    data: Dict[int, memoryview] = {r: m.pages[0] for r, m in new.items()}
    try:
        ctx.pages.io(op, out.segments, sector << SECTOR_SHIFT, data, out)
    except OSError as e:
        io_failed(out, e)
    if out.status != 0:
        _pages.release([], out)
    return out


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
    grants already mapped (gref -> page view) that this job may use. The segments
    are checked again here (cheap, pure): a caller that did not check them (tests,
    INDIRECT read elsewhere) gets the same answer as the hub would give.
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
            ctx.pages.io(op, segments, sector << SECTOR_SHIFT, cached, out)
            if out.status != 0:
                return out
        if postsync:
            store.flush()
    except OSError as e:
        _pages.release([], out)
        return io_failed(out, e)
    return out


def run_views(ctx: JobContext, op: int, views: List[memoryview], offset: int,
              nbytes: int) -> Outcome:
    """READ/WRITE of checked segments whose pages the hub already sliced (every page
    a pinned persistent grant): the syscalls only. The views are released here."""
    out = Outcome()
    try:
        if op == Op.READ:
            ctx.store.readv(views, offset)
        else:
            ctx.store.writev(views, offset)
        out.nbytes = nbytes
    except OSError as e:
        io_failed(out, e)
    finally:
        for v in views:
            v.release()
    return out


def run_batch(items: Sequence[Tuple[Callable[..., Outcome], Tuple[Any, ...]]]) -> Tuple[List[Any], float]:
    """Several requests' jobs in order, in one threadpool job: the results (each an
    Outcome or, should a job ever raise (a bug), the exception: never raised here)
    and the seconds they took (the ring sizes its batches by it)."""
    out: List[Any] = []
    t0 = time.perf_counter()
    for fn, args in items:
        try:
            out.append(fn(*args))
        except Exception as e:  # noqa: BLE001 - handed to the hub, which answers ERROR
            out.append(e)
    return out, time.perf_counter() - t0


def run_discard(ctx: JobContext, sector: int, nr_sectors: int, secure: bool) -> Outcome:
    out = Outcome()
    try:
        ctx.store.discard(sector << SECTOR_SHIFT, nr_sectors << SECTOR_SHIFT, secure)
    except OSError as e:
        return io_failed(out, e)
    out.nbytes = nr_sectors << SECTOR_SHIFT  # gblk_bytes_total{op="discard"}: bytes discarded
    return out


def unmap_all(mappings: Sequence[GrantMapping]) -> int:
    """Unmap ``mappings``; how many. Raises the first GrantError (tests, teardown)."""
    n = 0
    for m in mappings:
        m.unmap()
        n += 1
    return n


def unmap_reporting(mappings: Sequence[GrantMapping]) -> List[str]:
    """Unmap cache entries (eviction, idle sweep, disconnect) in a job: the errors of
    those that would not go, for the hub to log and count (never lost, never raised
    out of the threadpool)."""
    errors: List[str] = []
    for m in mappings:
        try:
            m.unmap()
        except GrantError as e:
            errors.append(str(e))
    return errors


class _Raised:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def catching(fn: Callable[..., Any], args: Tuple[Any, ...]) -> Any:
    """In the threadpool: ``fn(*args)``, or its GblkError/OSError wrapped, for
    :func:`raised_or` to raise on the hub."""
    try:
        return fn(*args)
    except (GblkError, OSError) as e:
        return _Raised(e)


def is_raised(value: Any) -> bool:
    return isinstance(value, _Raised)


def raised_or(got: Any) -> Any:
    """On the hub: what :func:`catching` returned, its wrapped exception raised."""
    if isinstance(got, _Raised):
        raise got.error
    return got


def apply(pool: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the threadpool, its GblkError or OSError raised here, on the
    hub: gevent's threadpool would print the traceback of an exception a job raises."""
    return raised_or(pool.apply(catching, (fn, args)))


def flush_only(store: Store) -> Optional[str]:
    try:
        store.flush()
    except OSError as e:
        return e.strerror or str(e)
    return None
