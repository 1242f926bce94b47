"""The IO half of the simulated blkfront: pages, requests, completions.

A mixin of ``gblk.sim.guest.frontend.Frontend`` (which negotiates, follows the backend's
state and tears down; ``hooks`` is the hostile half). Every user operation is split
into ring requests of at most 11 segments, or INDIRECT ones up to the negotiated
maximum; pages come from the persistent-grant pool or are granted per request (read-only
for a write's data) and their grants ended when the response arrives (a grant the
backend still maps then is counted and quarantined, never reused). Every byte read back
is checked against the shadow copy (``verify``), and the bytes of a READ's pages outside
its sectors against the canary (XSA-403). Runs on the gevent hub.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import gevent
import gevent.event

from ...blkif.abi import Abi, Request, Segment, pack_indirect_segments
from ...blkif.const import (
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    PAGE_SIZE,
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    SEGS_PER_INDIRECT_FRAME,
    Op,
    Status,
)
from .ring import FrontQueue, Part
from .values import (
    FrontendOptions,
    FrontendStats,
    FrontendTimeout,
    IOFailed,
    IoResult,
    NotConnected,
    RawResponse,
)
from .verify import Mismatch, Verifier
from ..hypervisor.memory import GuestMemory

log = logging.getLogger(__name__)


Buffer = Union[bytes, bytearray, memoryview]
#: a hook that sees each request before it is placed: return None (keep), a Request
#: (packed instead) or bytes (placed as they are)
Mutate = Callable[[Request], Optional[Union[Request, bytes]]]

#: filled into the parts of a READ's pages the request does not cover (XSA-403)
CANARY = 0xA5
_CANARY_PAGE = bytes([CANARY]) * PAGE_SIZE


class _UserOp:
    __slots__ = ("kind", "sector", "nsectors", "data", "buf", "parts_left", "statuses",
                 "result", "mismatch", "lost", "requests", "issuing")

    def __init__(self, kind: str, sector: int, nsectors: int,
                 data: Optional[Buffer] = None, read: bool = False) -> None:
        self.kind = kind
        self.sector = sector
        self.nsectors = nsectors
        self.data = data
        self.buf = bytearray(nsectors * SECTOR_SIZE) if read else None
        self.parts_left = 0
        self.statuses: List[int] = []
        self.result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        self.mismatch: Optional[Mismatch] = None
        self.lost = False
        self.requests = 0
        self.issuing = True


class _Budget:
    """Pages in flight: a counting gate on the hub."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._event = gevent.event.Event()

    def acquire(self, n: int, timeout: Optional[float]) -> bool:
        n = min(n, self.total)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.free < n:
            self._event.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._event.wait(left)
        self.free -= n
        return True

    def release(self, n: int) -> None:
        self.free = min(self.total, self.free + min(n, self.total))
        self._event.set()


def segments_for(sector: int, nsectors: int) -> List[Tuple[int, int]]:
    """(first_sect, last_sect) of each page of [sector, sector+nsectors), each page
    aligned on the disk's 4 KiB blocks as a page cache lays data out."""
    out = []
    cur, end = sector, sector + nsectors
    while cur < end:
        first = cur % SECTORS_PER_PAGE
        last = min(SECTORS_PER_PAGE - 1, first + (end - cur) - 1)
        out.append((first, last))
        cur += last - first + 1
    return out


class FrontendIO:
    """Submitting, completing and checking a frontend's IO (see the module docstring)."""

    # set up by Frontend.__init__ and its negotiation
    memory: GuestMemory
    options: FrontendOptions
    stats: FrontendStats
    abi: Abi
    queues: List[FrontQueue]
    verifier: Optional[Verifier]
    domid: int
    devid: int
    handle: int
    backend_id: int
    persistent: bool
    max_indirect_segments: int
    connected: bool
    _memory_gone: bool
    _ids: Iterator[int]
    _rr: int
    _budget: _Budget
    _free_frames: List[int]
    _pool_free: List[Tuple[int, int]]
    _pool_all: List[Tuple[int, int]]
    _quarantine: List[Tuple[int, int]]
    _idle: gevent.event.Event
    _inflight: int


    # =====================================================================
    # pages and grants
    # =====================================================================
    def _new_frame(self) -> int:
        if self._free_frames:
            return self._free_frames.pop()
        return self.memory.alloc_page()

    def _take_page(self, readonly: bool) -> Tuple[int, int, bool]:
        """(frame, gref, persistent) for one page of a request."""
        if self.persistent:
            if self._pool_free:
                frame, gref = self._pool_free.pop()
            else:
                frame = self._new_frame()
                gref = self.memory.grant(frame, self.backend_id, readonly=False)
                self._pool_all.append((frame, gref))
            return frame, gref, True
        frame = self._new_frame()
        return frame, self.memory.grant(frame, self.backend_id, readonly=readonly), False

    def _give_page(self, frame: int, gref: int, persistent: bool, answered: bool = True) -> None:
        if self._memory_gone:
            return
        if persistent:
            self._pool_free.append((frame, gref))
            return
        try:
            ended = self.memory.end_access(gref)
        except ValueError:
            return  # its grant was revoked and freed by a hostile test
        if ended:
            self._free_frames.append(frame)
        else:
            # the backend must unmap before it answers: the page is not ours yet
            if answered:
                self.stats.grants_busy_after_response += 1
            self._quarantine.append((gref, frame))

    # =====================================================================
    # IO
    # =====================================================================
    def _pick_queue(self, queue: Optional[int]) -> int:
        if not self.queues:
            raise NotConnected(f"d{self.domid}/{self.devid}: not connected")
        if queue is not None:
            return queue % len(self.queues)
        self._rr += 1
        return self._rr % len(self.queues)

    def _check_connected(self) -> None:
        if not self.connected:
            raise NotConnected(f"d{self.domid}/{self.devid}: not connected")

    def submit_read(self, sector: int, nsectors: int, queue: Optional[int] = None,
                    indirect: Optional[bool] = None, mutate: Optional[Mutate] = None,
                    push: bool = True) -> gevent.event.AsyncResult:
        """Read [sector, sector+nsectors); the AsyncResult's value is an IoResult
        whose ``data`` holds the bytes (verified against the shadow)."""
        self._check_connected()
        op = _UserOp("read", sector, nsectors, read=True)
        self._issue_rw(op, Op.READ, queue, indirect, mutate, push)
        return op.result

    def submit_write(self, sector: int, data: Buffer, queue: Optional[int] = None,
                     indirect: Optional[bool] = None, mutate: Optional[Mutate] = None,
                     push: bool = True) -> gevent.event.AsyncResult:
        """Write ``data`` (a multiple of 512 bytes) at ``sector``."""
        self._check_connected()
        nsectors = _sectors_of(data)
        op = _UserOp("write", sector, nsectors, data=data)
        self._issue_rw(op, Op.WRITE, queue, indirect, mutate, push)
        return op.result

    def submit_flush(self, sector: int = 0, data: Optional[Buffer] = None,
                     queue: Optional[int] = None, mutate: Optional[Mutate] = None,
                     push: bool = True) -> gevent.event.AsyncResult:
        """FLUSH_DISKCACHE; with ``data``, flush then write it at ``sector``."""
        self._check_connected()
        if not data:
            op = _UserOp("flush", sector, 0)
            self._issue_simple(op, Op.FLUSH_DISKCACHE, queue, mutate, push)
        else:
            op = _UserOp("flush", sector, _sectors_of(data), data=data)
            self._issue_rw(op, Op.FLUSH_DISKCACHE, queue, False, mutate, push)
        return op.result

    def submit_barrier(self, sector: int, data: Optional[Buffer],
                       queue: Optional[int] = None, mutate: Optional[Mutate] = None,
                       push: bool = True) -> gevent.event.AsyncResult:
        """WRITE_BARRIER carrying ``data`` at ``sector`` (empty: no segments)."""
        self._check_connected()
        if not data:
            op = _UserOp("barrier", sector, 0)
            self._issue_simple(op, Op.WRITE_BARRIER, queue, mutate, push)
        else:
            op = _UserOp("barrier", sector, _sectors_of(data), data=data)
            self._issue_rw(op, Op.WRITE_BARRIER, queue, False, mutate, push)
        return op.result

    def submit_discard(self, sector: int, nsectors: int, secure: bool = False,
                       queue: Optional[int] = None, mutate: Optional[Mutate] = None,
                       push: bool = True) -> gevent.event.AsyncResult:
        """DISCARD [sector, sector+nsectors) (BLKIF_DISCARD_SECURE with ``secure``)."""
        self._check_connected()
        op = _UserOp("discard", sector, nsectors)
        self._issue_simple(op, Op.DISCARD, queue, mutate, push,
                           flag=BLKIF_DISCARD_SECURE if secure else 0)
        return op.result

    # -- synchronous helpers ------------------------------------------------------
    def _wait(self, result: gevent.event.AsyncResult, timeout: Optional[float]) -> IoResult:
        res: Optional[IoResult] = result.get(
            timeout=self.options.io_timeout if timeout is None else timeout)
        assert res is not None
        if res.status != Status.OKAY or res.lost:
            raise IOFailed(res)
        return res

    def read(self, sector: int, nsectors: int, timeout: Optional[float] = None, **kw: Any) -> bytes:
        """Read and verify; raises IOFailed unless OKAY. Mismatches are counted in
        ``stats.mismatches`` (and on the IoResult of ``submit_read``)."""
        res = self._wait(self.submit_read(sector, nsectors, **kw), timeout)
        assert res.data is not None
        return res.data

    def write(self, sector: int, data: Buffer, timeout: Optional[float] = None, **kw: Any) -> None:
        self._wait(self.submit_write(sector, data, **kw), timeout)

    def flush(self, sector: int = 0, data: Optional[Buffer] = None,
              timeout: Optional[float] = None, **kw: Any) -> None:
        self._wait(self.submit_flush(sector, data, **kw), timeout)

    def barrier(self, sector: int, data: Optional[Buffer], timeout: Optional[float] = None,
                **kw: Any) -> None:
        self._wait(self.submit_barrier(sector, data, **kw), timeout)

    def discard(self, sector: int, nsectors: int, secure: bool = False,
                timeout: Optional[float] = None, **kw: Any) -> None:
        self._wait(self.submit_discard(sector, nsectors, secure, **kw), timeout)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no request is outstanding. False on timeout."""
        return bool(self._idle.wait(timeout))

    # -- building requests ------------------------------------------------------
    def _issue_rw(self, op: _UserOp, opcode: int, queue: Optional[int],
                  indirect: Optional[bool], mutate: Optional[Mutate], push: bool) -> None:
        """Split a data-carrying operation into ring requests and place them."""
        qi = self._pick_queue(queue)
        segs = segments_for(op.sector, op.nsectors)
        if opcode in (Op.READ, Op.WRITE):
            max_ind = self.max_indirect_segments
            if indirect and not max_ind:
                max_ind = max(self.options.max_indirect_segments, BLKIF_MAX_SEGMENTS_PER_REQUEST)
            use_ind = bool(max_ind) and indirect is not False and (
                indirect or self.options.force_indirect or len(segs) > BLKIF_MAX_SEGMENTS_PER_REQUEST)
            per = max_ind if use_ind else BLKIF_MAX_SEGMENTS_PER_REQUEST
        else:
            use_ind, per = False, BLKIF_MAX_SEGMENTS_PER_REQUEST
        chunks = [segs[i:i + per] for i in range(0, len(segs), per)] or [[]]
        op.parts_left = len(chunks)
        self._op_started()
        sector = op.sector
        offset = 0
        try:
            for chunk in chunks:
                n = sum(last - first + 1 for first, last in chunk)
                self._issue_part(op, qi, opcode, sector, n, offset, chunk, use_ind, mutate, push)
                sector += n
                offset += n * SECTOR_SIZE
        except BaseException:
            self._op_aborted(op)
            raise
        op.issuing = False
        self._maybe_finish(op)

    def _issue_simple(self, op: _UserOp, opcode: int, queue: Optional[int],
                      mutate: Optional[Mutate], push: bool, flag: int = 0) -> None:
        qi = self._pick_queue(queue)
        op.parts_left = 1
        self._op_started()
        try:
            self._issue_part(op, qi, opcode, op.sector, op.nsectors, 0, [], False, mutate,
                             push, flag=flag)
        except BaseException:
            self._op_aborted(op)
            raise
        op.issuing = False
        self._maybe_finish(op)

    def _op_started(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def _op_aborted(self, op: _UserOp) -> None:
        """Issuing failed half-way: parts placed will still complete; the rest never."""
        op.issuing = False
        op.lost = True
        op.parts_left = op.requests - len(op.statuses)
        self._maybe_finish(op)

    def _issue_part(self, op: _UserOp, qi: int, opcode: int, sector: int, nsectors: int,
                    offset: int, chunk: Sequence[Tuple[int, int]], indirect: bool,
                    mutate: Optional[Mutate], push: bool, flag: int = 0) -> None:
        npages = len(chunk)
        nind = -(-npages // SEGS_PER_INDIRECT_FRAME) if indirect else 0
        if not self._budget.acquire(npages + nind, self.options.io_timeout):
            raise FrontendTimeout("no free pages for a request")
        q = self.queues[qi] if qi < len(self.queues) else None
        if q is None or not q.wait_space(self.options.io_timeout) or not self.connected:
            self._budget.release(npages + nind)
            raise NotConnected(f"d{self.domid}/{self.devid}: disconnected while submitting")
        q = self.queues[qi]
        is_read = opcode == Op.READ
        kind = op.kind
        expect: Optional[int] = opcode
        if indirect and not self.options.strict_indirect_op:
            expect = None
        part = Part(next(self._ids) & 0xFFFFFFFFFFFFFFFF, qi, kind,
                    Op.INDIRECT if indirect else opcode, expect, sector, nsectors)
        part.parent = op
        part.offset = offset
        src = offset
        try:
            for first, last in chunk:
                frame, gref, persistent = self._take_page(readonly=not is_read)
                part.persistent = persistent
                part.pages.append((frame, gref, first, last))
                page = self.memory.page(frame)
                lo, hi = first * SECTOR_SIZE, (last + 1) * SECTOR_SIZE
                if is_read:
                    if lo:
                        page[:lo] = _CANARY_PAGE[:lo]
                    if hi < PAGE_SIZE:
                        page[hi:] = _CANARY_PAGE[hi:]
                else:
                    assert op.data is not None
                    page[lo:hi] = op.data[src:src + (hi - lo)]
                    src += hi - lo
            segments = tuple(Segment(g, f, lst) for _, g, f, lst in part.pages)
            if indirect:
                for i in range(nind):
                    frame, gref, persistent = self._take_page(readonly=True)
                    part.indirect.append((frame, gref))
                    page = self.memory.page(frame)
                    descs = pack_indirect_segments(
                        segments[i * SEGS_PER_INDIRECT_FRAME:(i + 1) * SEGS_PER_INDIRECT_FRAME])
                    page[:len(descs)] = descs
                req = Request(Op.INDIRECT, part.id, nr_segments=npages, handle=self.handle,
                              sector_number=sector, indirect_op=opcode,
                              indirect_grefs=tuple(g for _, g in part.indirect))
            elif opcode == Op.DISCARD:
                req = Request(Op.DISCARD, part.id, handle=self.handle, sector_number=sector,
                              nr_sectors=nsectors, flag=flag)
            else:
                req = Request(opcode, part.id, nr_segments=npages, handle=self.handle,
                              sector_number=sector, segments=segments)
            raw: Optional[bytes] = None
            if mutate is not None:
                changed = mutate(req)
                if isinstance(changed, (bytes, bytearray)):
                    raw = bytes(changed)
                elif changed is not None:
                    req = changed
                    part.id = req.id
            if raw is None:
                raw = self.abi.pack_request(req)
            if self.verifier is not None and nsectors:
                part.token = self.verifier.begin(sector, nsectors, write=not is_read)
            q.put(raw, part)
        except BaseException:
            self._release_part(part, False)
            if part.token is not None and self.verifier is not None:
                self.verifier.abandon(part.token)
            raise
        op.requests += 1
        self.stats.requests += 1
        if push:
            q.push()

    # -- completion ---------------------------------------------------------------
    def _on_response(self, part: Part, status: int) -> None:
        self.stats.responses += 1
        self._finish_part(part, status, lost=False)

    def _finish_part(self, part: Part, status: int, lost: bool) -> None:
        if part.kind == "raw":
            if part.result is not None and not lost:
                part.result.set(RawResponse(part.id, part.op, status))
            elif part.result is not None:
                part.result.set(None)
            self._release_part(part, not lost)
            return
        op: _UserOp = part.parent
        ok = status == Status.OKAY and not lost
        if lost:
            self.stats.lost += 1
        elif status == Status.EOPNOTSUPP:
            self.stats.unsupported += 1
        elif status != Status.OKAY:
            self.stats.errors += 1
        v = self.verifier
        nbytes = part.nsectors * SECTOR_SIZE
        if part.kind == "read":
            assert op.buf is not None
            if ok:
                off = part.offset
                for frame, _, first, last in part.pages:
                    page = self.memory.page(frame)
                    lo, hi = first * SECTOR_SIZE, (last + 1) * SECTOR_SIZE
                    op.buf[off:off + hi - lo] = page[lo:hi]
                    off += hi - lo
                    if (lo and page[:lo] != _CANARY_PAGE[:lo]) or (
                            hi < PAGE_SIZE and page[hi:] != _CANARY_PAGE[hi:]):
                        self.stats.canary_violations += 1
                self.stats.bytes_read += nbytes
            if v is not None and part.token is not None:
                if lost:
                    v.abandon(part.token)
                else:
                    mm = v.end_read(part.token, ok,
                                    memoryview(op.buf)[part.offset:part.offset + nbytes])
                    if mm is not None:
                        self.stats.mismatches += 1
                        if op.mismatch is None:
                            op.mismatch = mm
                        log.error("d%d/%d: read of sector %d+%d returned wrong data at sector %d",
                                  self.domid, self.devid, mm.read_sector, mm.nsectors, mm.sector)
        elif v is not None and part.token is not None:
            if lost:
                v.abandon(part.token)
            elif part.kind == "discard":
                v.end_write(part.token, ok, None, zeroes=self.options.discard_zeroes)
            else:
                data = None
                if op.data is not None:
                    data = memoryview(op.data)[part.offset:part.offset + nbytes]
                v.end_write(part.token, ok, data)
            if ok and part.kind != "discard":
                self.stats.bytes_written += nbytes
        self._release_part(part, not lost)
        op.statuses.append(int(status))
        if lost:
            op.lost = True
        op.parts_left -= 1
        self._maybe_finish(op)

    def _release_part(self, part: Part, answered: bool = True) -> None:
        n = len(part.pages) + len(part.indirect)
        for frame, gref, _, _ in part.pages:
            self._give_page(frame, gref, part.persistent, answered)
        for frame, gref in part.indirect:
            self._give_page(frame, gref, part.persistent, answered)
        part.pages = []
        part.indirect = []
        if n:
            self._budget.release(n)

    def _maybe_finish(self, op: _UserOp) -> None:
        if op.issuing or op.parts_left > 0 or op.result.ready():
            return
        status = int(Status.OKAY)
        for s in op.statuses:
            if s != Status.OKAY:
                status = s
                break
        if op.lost and status == Status.OKAY:
            status = Status.ERROR
        data = bytes(op.buf) if op.buf is not None else None
        self.stats.ops += 1
        op.result.set(IoResult(op.kind, op.sector, op.nsectors, int(status), op.statuses,
                               data, op.mismatch, op.lost, op.requests))
        self._inflight -= 1
        if self._inflight <= 0:
            self._inflight = 0
            self._idle.set()

    def _violation(self, reason: str) -> None:
        v = self.stats.violations
        v[reason] = v.get(reason, 0) + 1
        if v[reason] == 1:
            log.error("d%d/%d: backend protocol violation: %s", self.domid, self.devid, reason)


def _sectors_of(data: Buffer) -> int:
    n = len(data)
    if n % SECTOR_SIZE:
        raise ValueError(f"data length {n} is not a multiple of {SECTOR_SIZE}")
    return n // SECTOR_SIZE
