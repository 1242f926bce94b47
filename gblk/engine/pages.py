"""Page sources: how one connected disk reaches its guest's pages.

Three ways, one object each, chosen once per connection (``page_source``):

* ``CopyPages`` (``copy``): grant copy between the guest's pages and a private
  bounce buffer; nothing of the guest is ever mapped.
* ``MapPages`` (``map``): map the request's grants for its IO, unmap before the
  response is published (the frontend reclaims a page as soon as it sees it).
* ``PersistentPages`` (``persistent``): map each grant once, one grant per mapping,
  and keep it in the ring's cache (``gblk.engine.grants``); the hub serves requests
  whose grants are all cached without any map.

The blocking methods (``io``, ``descriptors``) run in the threadpool: syscalls and
plain Python only, no gevent, no logging, no stats. They report through an
``Outcome`` and raise only ``GrantError``/``OSError``, which ``gblk.engine.jobs``
turns into outcomes. Nothing here reads the shared ring.
"""

from __future__ import annotations

import abc
import errno
import mmap
from typing import Dict, List, Sequence, Tuple, Union

from ..blkif import reasons as R
from ..blkif.abi import Segment, parse_indirect_segments
from ..blkif.const import SECTOR_SHIFT, Op, Status
from ..errors import GrantError
from ..storage import Store
from ..xen.interfaces import PAGE_SIZE, CopySegment, GrantMapping, GrantTable

COPY = "copy"
MAP = "map"
PERSISTENT = "persistent"
PATHS = (PERSISTENT, MAP, COPY)


class Outcome:
    """What a job did for one request: its status and what the hub must count."""

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
        #: persistent: gref -> single-page mapping made by this job, for the cache
        self.new_grants: Dict[int, GrantMapping] = {}
        #: INDIRECT: the segments read from the descriptor pages
        self.segments: Tuple[Segment, ...] = ()

    def fail(self, reason: str, detail: str = "", status: int = Status.ERROR) -> "Outcome":
        self.status = int(status)
        self.reason = reason
        self.detail = detail
        return self


#: errnos of a full backing store (the operator grows it; nothing is broken)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def io_reason(e: OSError) -> str:
    """The error reason a failed store call counts under: ``no_space`` (ENOSPC,
    EDQUOT) or ``io_error`` (everything else)."""
    return R.NO_SPACE if e.errno in _NO_SPACE else R.IO_ERROR


def io_failed(out: "Outcome", e: OSError) -> "Outcome":
    """``out`` failed by the store's ``e``, under its reason."""
    return out.fail(io_reason(e), e.strerror or str(e))


def nbytes(segments: Sequence[Segment]) -> int:
    return sum((s.last_sect - s.first_sect + 1) << SECTOR_SHIFT for s in segments)


def slices(pages: Dict[int, memoryview], segments: Sequence[Segment]) -> List[memoryview]:
    """Exactly [first_sect, last_sect] of each page: nothing outside is touched (XSA-403)."""
    return [
        pages[s.gref][s.first_sect << SECTOR_SHIFT:(s.last_sect + 1) << SECTOR_SHIFT]
        for s in segments
    ]


def join_descriptors(pages: Dict[int, memoryview], refs: Sequence[int],
                     nr_segments: int) -> Tuple[Segment, ...]:
    """The segments of INDIRECT descriptor pages mapped as ``pages`` (gref -> view),
    parsed from one private copy: the guest may rewrite the pages meanwhile, the copy
    is what gets checked and used."""
    return parse_indirect_segments(b"".join([pages[r] for r in refs]), nr_segments)


def release(mappings: List[GrantMapping], out: Outcome) -> None:
    """Unmap a job's transient mappings, and its new persistent ones if it failed (the
    grants may be bogus: a failed request caches nothing). An unmap error fails the
    request and is counted; it is never lost and never raised out of a job."""
    todo = list(mappings)
    if out.status != Status.OKAY and out.new_grants:
        todo.extend(out.new_grants.values())
        out.new_grants = {}
    for m in todo:
        n = len(m.pages)
        try:
            m.unmap()
            out.unmaps += n
        except GrantError as e:
            out.fail(R.GRANT_MAP, f"unmap failed: {e}")


class PageSource(abc.ABC):
    """One way of reaching guest pages, for one connection of one disk."""

    name = ""
    #: grants stay mapped across requests (the ring keeps a cache)
    persistent = False

    def __init__(self, gnttab: GrantTable, store: Store, domid: int) -> None:
        self.gnttab = gnttab
        self.store = store
        self.domid = domid

    @abc.abstractmethod
    def io(self, op: int, segments: Sequence[Segment], offset: int,
           cached: Dict[int, memoryview], out: Outcome) -> None:
        """Move the data of ``segments`` (already checked) between the guest and the
        store at byte ``offset``; ``op`` is Op.READ or Op.WRITE."""

    @abc.abstractmethod
    def descriptors(self, refs: Sequence[int], nr_segments: int,
                    cached: Dict[int, memoryview], out: Outcome) -> Tuple[Segment, ...]:
        """The segment descriptors of an INDIRECT request, from one private copy.
        GrantError if a page cannot be reached (``CopyError`` for a failed copy)."""

    def _transfer(self, op: int, views: List[memoryview], offset: int) -> None:
        try:
            if op == Op.READ:
                self.store.readv(views, offset)
            else:
                self.store.writev(views, offset)
        finally:
            for v in views:
                v.release()


class MapPages(PageSource):
    """Map the grants of each request (one batch map), unmap before answering."""

    name = MAP

    def io(self, op: int, segments: Sequence[Segment], offset: int,
           cached: Dict[int, memoryview], out: Outcome) -> None:
        writable = op == Op.READ
        mappings: List[GrantMapping] = []
        try:
            pages = self._pages(segments, cached, writable, out, mappings)
            self._transfer(op, slices(pages, segments), offset)
            out.nbytes = nbytes(segments)
        except GrantError as e:
            out.fail(R.GRANT_MAP, str(e))
        finally:
            # unmap before the response is published: the frontend reclaims the page
            # as soon as it sees the response
            release(mappings, out)

    def _pages(self, segments: Sequence[Segment], cached: Dict[int, memoryview],
               writable: bool, out: Outcome, mappings: List[GrantMapping]) -> Dict[int, memoryview]:
        missing: List[int] = []
        for s in segments:
            if s.gref not in cached and s.gref not in missing:
                missing.append(s.gref)
        pages = dict(cached)
        if missing:
            m = self.gnttab.map_grant_refs(self.domid, missing, writable)
            out.maps += len(missing)
            mappings.append(m)
            pages.update(zip(missing, m.pages))
        return pages

    def descriptors(self, refs: Sequence[int], nr_segments: int,
                    cached: Dict[int, memoryview], out: Outcome) -> Tuple[Segment, ...]:
        mapping = self.gnttab.map_grant_refs(self.domid, list(refs), False)
        out.maps += len(refs)
        try:
            raw = b"".join(mapping.pages)  # the one read of them
        finally:
            mapping.unmap()
            out.unmaps += len(refs)
        return parse_indirect_segments(raw, nr_segments)


class PersistentPages(MapPages):
    """Map each grant once (one grant per mapping, so the cache can unmap them one by
    one) and hand the new mappings back to the ring's cache in ``out.new_grants``."""

    name = PERSISTENT
    persistent = True

    def _pages(self, segments: Sequence[Segment], cached: Dict[int, memoryview],
               writable: bool, out: Outcome, mappings: List[GrantMapping]) -> Dict[int, memoryview]:
        return self._map(list(dict.fromkeys(s.gref for s in segments)), cached, writable, out,
                         mappings)

    def _map(self, refs: Sequence[int], cached: Dict[int, memoryview], writable: bool,
             out: Outcome, mappings: List[GrantMapping]) -> Dict[int, memoryview]:
        """gref -> page for ``refs``: ``cached`` ones as they are, the others mapped
        writable whatever the op, into ``out.new_grants``. A read-only grant where only
        reading is needed (``writable`` False) is used but not kept: its mapping goes
        to ``mappings`` (Linux's blkfront grants a WRITE's pages read-only unless they
        come from its persistent pool)."""
        pages: Dict[int, memoryview] = dict(cached)
        for ref in refs:
            if ref in pages:
                continue
            try:
                m = self.gnttab.map_grant_refs(self.domid, [ref], True)
                out.new_grants[ref] = m
            except GrantError:
                if writable:
                    raise
                m = self.gnttab.map_grant_refs(self.domid, [ref], False)
                mappings.append(m)
            out.maps += 1
            pages[ref] = m.pages[0]
        return pages

    def descriptors(self, refs: Sequence[int], nr_segments: int,
                    cached: Dict[int, memoryview], out: Outcome) -> Tuple[Segment, ...]:
        # descriptor pages are persistent grants too (Linux's blkfront takes them from
        # its persistent pool, and blkback keeps them)
        mappings: List[GrantMapping] = []
        try:
            pages = self._map(refs, cached, False, out, mappings)
            return join_descriptors(pages, refs, nr_segments)
        finally:
            for m in mappings:  # read-only descriptor pages: this request only
                m.unmap()
                out.unmaps += len(m.pages)


class CopyPages(PageSource):
    """Grant copy through a private, page-aligned bounce buffer (O_DIRECT wants
    aligned memory): the guest's pages are never mapped."""

    name = COPY

    def io(self, op: int, segments: Sequence[Segment], offset: int,
           cached: Dict[int, memoryview], out: Outcome) -> None:
        total = nbytes(segments)
        bounce = mmap.mmap(-1, max(total, PAGE_SIZE))
        view = memoryview(bounce)
        copies: List[CopySegment] = []
        try:
            pos = 0
            for s in segments:
                length = (s.last_sect - s.first_sect + 1) << SECTOR_SHIFT
                copies.append(CopySegment(self.domid, s.gref, s.first_sect << SECTOR_SHIFT,
                                          length, view[pos:pos + length], op != Op.READ))
                pos += length
            try:
                if op == Op.READ:
                    self._transfer(op, [view[:total]], offset)
                    statuses = self.gnttab.grant_copy(copies)
                else:
                    statuses = self.gnttab.grant_copy(copies)
                    if not any(statuses):
                        self._transfer(op, [view[:total]], offset)
                out.copies += len(copies)
                bad = [st for st in statuses if st]
                if bad:
                    out.fail(R.GRANT_COPY, f"grant copy status {bad[0]}")
                else:
                    out.nbytes = total
            except GrantError as e:
                out.fail(R.GRANT_COPY, str(e))
        finally:
            for c in copies:
                c.local.release()
            view.release()
            bounce.close()

    def descriptors(self, refs: Sequence[int], nr_segments: int,
                    cached: Dict[int, memoryview], out: Outcome) -> Tuple[Segment, ...]:
        npages = len(refs)
        buf = bytearray(npages * PAGE_SIZE)
        view = memoryview(buf)
        segs = [CopySegment(self.domid, r, 0, PAGE_SIZE, view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], True)
                for i, r in enumerate(refs)]
        try:
            try:
                statuses = self.gnttab.grant_copy(segs)
            except GrantError as e:
                raise CopyError(str(e)) from None
        finally:
            for c in segs:
                c.local.release()
            view.release()
        out.copies += len(segs)
        bad = [s for s in statuses if s != 0]
        if bad:
            raise CopyError(f"indirect page copy status {bad[0]}")
        raw: Union[bytes, bytearray] = buf  # private already: the guest cannot change it
        return parse_indirect_segments(raw, nr_segments)


class CopyError(GrantError):
    """A grant copy of descriptor pages failed (counted as grant_copy, not grant_map)."""


def page_source(path: str, gnttab: GrantTable, store: Store, domid: int) -> PageSource:
    """The page source named ``path`` (``persistent``, ``map`` or ``copy``)."""
    cls = {PERSISTENT: PersistentPages, MAP: MapPages, COPY: CopyPages}.get(path)
    if cls is None:
        raise ValueError(f"unknown page path {path!r} (known: {', '.join(PATHS)})")
    return cls(gnttab, store, domid)

