"""One ring (queue) of one device: the greenlet that serves it.

The data path of ARCHITECTURE.md: wake on the event channel, copy each new slot
once, validate, hand the IO to the threadpool (one job per request), answer on
completion, publish, notify only when the ring says so, re-arm, sleep. An INDIRECT
request's descriptor pages are read in a job of their own first, except when they
are all cached persistent grants: then the hub copies them (mapped memory, no
syscall) and the request goes straight to its data job.

Every request consumed from the ring lives in ``self.inflight`` (one table owned by
the ring, keyed by a private sequence number) until its response is written: every
consumed request is answered exactly once, whatever was wrong with it. A broken
producer index halts this ring only.

Responses are written in the order the requests were consumed (a finished request
waits in ``self._held`` for the ones before it), once per pass, right before
``rsp_prod`` is published. A response takes the slot at
``rsp_prod_pvt``, which is the slot of the oldest unanswered request: written out of
order it would overwrite a request still in flight, and a daemon killed then (SIGKILL,
a crash) would leave that request lost for good. In order, every request at or after
``rsp_prod`` is still in its slot, so a restarted gblk attaching from ``rsp_prod``
serves them all. The price: a slow request delays the responses (not the IO) of the
requests behind it on its ring.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import gevent
import gevent.event

from ..blkif.abi import Abi, Request, Segment
from ..blkif.const import Op, Status
from ..blkif.ring import BackRing
from ..blkif.validate import DiskLimits, check_header, effective_op, indirect_pages, status_for
from ..errors import GblkError, InvalidRequest, RingError
from ..storage import Store
from ..xen.interfaces import EventChannel, GrantMapping, GrantTable, XenHost
from . import jobs
from .grants import PersistentGrants
from .stats import DeviceStats, RingStats

_OP_LABEL: Dict[int, str] = {
    Op.READ: "read",
    Op.WRITE: "write",
    Op.WRITE_BARRIER: "barrier",
    Op.FLUSH_DISKCACHE: "flush",
    Op.DISCARD: "discard",
}

SWEEP_INTERVAL = 10.0
#: threadpool jobs one ring pass is split into (each runs its requests in order)
JOBS_PER_PASS = 4


class _Pending:
    """A consumed request until its response is written."""

    __slots__ = ("seq", "req", "t0", "segments", "phase", "pinned", "label")

    def __init__(self, seq: int, req: Request, t0: float) -> None:
        self.seq = seq
        self.req = req
        self.t0 = t0
        self.segments: Tuple[Segment, ...] = req.segments
        self.phase = 0  # INDIRECT: 0 = descriptors not read yet, 1 = data
        self.pinned: List[int] = []
        op = effective_op(req)
        self.label = _OP_LABEL.get(op, "unsupported")


class RingContext:
    """What the rings of one connected device share."""

    def __init__(
        self,
        host: XenHost,
        gnttab: GrantTable,
        store: Store,
        domid: int,
        abi: Abi,
        limits: DiskLimits,
        mode: str,
        pool: Any,
        device_stats: DeviceStats,
        log: logging.LoggerAdapter,
        guest_log: Callable[[str], None],
        max_persistent_grants: int,
        persistent_grant_idle: float,
    ) -> None:
        self.host = host
        self.gnttab = gnttab
        self.store = store
        self.domid = domid
        self.abi = abi
        self.limits = limits
        self.job = jobs.JobContext(gnttab, store, domid, limits, mode)
        self.mode = mode
        self.pool = pool
        self.device_stats = device_stats
        self.log = log
        self.guest_log = guest_log
        self.max_persistent_grants = max_persistent_grants
        self.persistent_grant_idle = persistent_grant_idle


class RingWorker:
    def __init__(self, ctx: RingContext, queue: int, ring_refs: Tuple[int, ...],
                 remote_port: int, stats: RingStats) -> None:
        self.ctx = ctx
        self.queue = queue
        self.ring_refs = ring_refs
        self.remote_port = remote_port
        self.stats = stats
        self.ring: Optional[BackRing] = None
        self._ring_map: Optional[GrantMapping] = None
        self.evtchn: Optional[EventChannel] = None
        self.port: Optional[int] = None
        self._io: Any = None
        self._wake = gevent.event.Event()
        self._done: Deque[Tuple[List[_Pending], Any]] = collections.deque()  # (requests, job result)
        self._queue: Deque[_Pending] = collections.deque()
        self.inflight: Dict[int, _Pending] = {}
        self._seq = 0
        #: seq -> (packed response, op label, t0) of a finished request waiting for
        #: earlier ones
        self._held: Dict[int, Tuple[bytes, str, float]] = {}
        self._next_answer = 1  # seq of the oldest request not yet written to the ring
        self._jobs = 0  # threadpool jobs running
        self._barrier = False  # a barrier job runs: dispatch nothing else
        self._stopping = False
        self._greenlet: Optional[gevent.Greenlet] = None
        self._pgrants: Optional[PersistentGrants] = None
        if ctx.mode == jobs.MODE_PERSISTENT:
            self._pgrants = PersistentGrants(ctx.max_persistent_grants, ctx.persistent_grant_idle)
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL
        self.finished = gevent.event.Event()

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        """Map the ring, bind the event channel, start serving. Raises GblkError
        (the device fails this connection); ``stop()`` cleans up after a half start."""
        ctx = self.ctx
        self._ring_map = jobs.apply(ctx.pool, ctx.gnttab.map_grant_refs, ctx.domid, list(self.ring_refs), True)
        self.stats.grant_maps += len(self.ring_refs)
        if len(self._ring_map.pages) == 1:
            buf = self._ring_map.pages[0]
        else:  # a multi-page ring must be one contiguous buffer
            buf = _contiguous(self._ring_map)
        self.ring = BackRing(buf, ctx.abi.req_size, ctx.abi.rsp_size, ctx.host.fence())
        self.stats.slots = self.ring.slots
        self.evtchn = ctx.host.open_event_channel()
        self.port = self.evtchn.bind_interdomain(ctx.domid, self.remote_port)
        hub = gevent.get_hub()
        self._io = hub.loop.io(self.evtchn.fileno(), 1)
        self._io.start(self._wake.set)
        self._greenlet = gevent.spawn(self._run)
        self._greenlet.link_exception(self._crashed)
        self._wake.set()  # requests may already be waiting (reconnect, restart)

    def stop(self, timeout: float) -> None:
        """Stop taking requests, answer every consumed one, release everything.
        Idempotent; safe after a half-finished start."""
        self._stopping = True
        self._wake.set()
        g = self._greenlet
        if g is not None and not g.dead and g is not gevent.getcurrent():
            if not self.finished.wait(timeout):
                self.ctx.log.error("queue %d: %d requests still in flight after %.0fs; abandoning them",
                                   self.queue, len(self.inflight), timeout)
            g.kill(block=True, timeout=1)
        self._release()

    def _release(self) -> None:
        if self._io is not None:
            self._io.stop()
            self._io = None
        if self._jobs == 0:  # never unmap under a running job
            if self._pgrants is not None:
                gone = self._pgrants.drain()
                self._unmap(gone, wait=True)
                self._update_pgrant_gauge()
            if self.ring is not None:
                self.ring.release()
                self.ring = None
            if self._ring_map is not None:
                self._ring_map.unmap()
                self.stats.grant_unmaps += len(self.ring_refs)
                self._ring_map = None
        if self.evtchn is not None:
            try:
                if self.port is not None:
                    self.evtchn.unbind(self.port)
            except GblkError:
                pass
            self.evtchn.close()
            self.evtchn = None

    def _crashed(self, g: gevent.Greenlet) -> None:
        self.ctx.log.error("queue %d: ring greenlet failed: %r", self.queue, g.exception)
        self.stats.halted = True
        self.finished.set()

    # -- the loop -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                self._pass()
                if self._stopping and not self.inflight:
                    break
                if self._wake.is_set():
                    gevent.sleep(0)  # more work: let other rings and devices run first
        finally:
            self.finished.set()

    def _pass(self) -> None:
        ring = self.ring
        evtchn = self.evtchn
        assert ring is not None and evtchn is not None and self.port is not None
        st = self.stats
        # drain notifications (a storm collapses into one pass: XSA-332)
        while True:
            p = evtchn.pending()
            if p is None:
                break
            st.notifications_received += 1
            evtchn.unmask(p)
        self._complete()
        if not self._stopping and not st.halted:
            try:
                room = ring.slots - ring.outstanding()
                raws = ring.take_requests(room) if room > 0 else []
            except RingError as e:
                self._halt(str(e))
                raws = []
            if raws:
                st.batches.observe(len(raws))
                now = time.monotonic()
                for raw in raws:
                    self._accept(raw, now)
        self._dispatch()
        if self._publish():
            evtchn.notify(self.port)
            st.notifications_sent += 1
        st.in_flight = len(self.inflight)
        try:
            st.ring_fill = ring.outstanding() + (0 if st.halted else ring.unconsumed())
        except RingError:
            st.ring_fill = ring.outstanding()
        if self._pgrants is not None and time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_INTERVAL
            self._unmap(self._pgrants.sweep(), wait=False)
            self._update_pgrant_gauge()
        if not self._stopping and not st.halted and not self._queue:
            try:
                if ring.final_check_for_requests() and ring.outstanding() < ring.slots:
                    self._wake.set()
            except RingError as e:
                self._halt(str(e))

    def _halt(self, why: str) -> None:
        st = self.stats
        if not st.halted:
            st.halted = True
            st.errors["ring_halted"] += 1
            self.ctx.log.error("queue %d: ring halted, frontend broke the ring: %s", self.queue, why)

    # -- requests -----------------------------------------------------------------
    def _accept(self, raw: bytes, now: float) -> None:
        req = self.ctx.abi.parse_request(raw)
        self._seq += 1
        p = _Pending(self._seq, req, now)
        self.inflight[p.seq] = p
        try:
            check_header(req, self.ctx.limits)
        except InvalidRequest as e:
            self._answer(p, status_for(e.reason), e.reason, str(e))
            return
        self._queue.append(p)

    def _dispatch(self) -> None:
        ctx = self.ctx
        q = self._queue
        batch: List[Tuple[_Pending, Callable[..., jobs.Outcome], Tuple[Any, ...]]] = []
        while q and not self._barrier:
            p = q[0]
            req = p.req
            if req.operation == Op.WRITE_BARRIER:
                if self._jobs or batch:
                    break  # everything before the barrier completes first
                self._barrier = True
            q.popleft()
            op = req.operation
            if op == Op.INDIRECT and p.phase == 0 and self._pgrants is not None:
                refs = req.indirect_grefs[:indirect_pages(req.nr_segments)]
                have = self._pgrants.acquire(refs)
                if len(have) < len(set(refs)):
                    p.pinned = list(have)
                    batch.append((p, jobs.read_indirect, (ctx.job, refs, req.nr_segments, have)))
                    continue
                # every descriptor page is a cached persistent grant: read them here
                # (a copy of mapped memory; no syscall, no thread handoff)
                try:
                    p.segments = jobs.read_descriptors(have, refs, req.nr_segments)
                finally:
                    self._pgrants.release(have)
                p.phase = 1
            if op == Op.DISCARD:
                batch.append((p, jobs.run_discard,
                              (ctx.job, req.sector_number, req.nr_sectors, bool(req.flag & 1))))
            elif op == Op.INDIRECT and p.phase == 0:
                batch.append((p, jobs.read_indirect, (ctx.job, req.indirect_grefs, req.nr_segments)))
            else:
                direction = Op.READ if effective_op(req) == Op.READ else Op.WRITE
                presync = op in (Op.FLUSH_DISKCACHE, Op.WRITE_BARRIER)
                postsync = op == Op.WRITE_BARRIER or (op == Op.FLUSH_DISKCACHE and bool(p.segments))
                cached: Dict[int, memoryview] = {}
                if self._pgrants is not None and p.segments:
                    cached = self._pgrants.acquire(s.gref for s in p.segments)
                    p.pinned = list(cached)
                batch.append((p, jobs.run_request, (ctx.job, direction, p.segments,
                                                    req.sector_number, cached, presync, postsync)))
        if batch:
            self._submit(batch)

    def _submit(self, batch: List[Tuple[_Pending, Callable[..., jobs.Outcome], Tuple[Any, ...]]]) -> None:
        """Hand a pass's requests to the threadpool in a few jobs rather than one each:
        a thread handoff costs more than a syscall on a warm cache, yet a slow store
        still sees up to JOBS_PER_PASS requests at once."""
        n = len(batch)
        self._jobs += n
        per_job = -(-n // JOBS_PER_PASS)
        done = self._done
        wake = self._wake
        for i in range(0, n, per_job):
            chunk = batch[i:i + per_job]
            res = self.ctx.pool.spawn(jobs.run_batch, [(fn, args) for _, fn, args in chunk])
            pend = [p for p, _, _ in chunk]

            def _finished(r: Any, pend: List[_Pending] = pend) -> None:
                done.append((pend, r))
                wake.set()

            res.rawlink(_finished)

    def _complete(self) -> None:
        while self._done:
            pend, res = self._done.popleft()
            try:
                outs: List[Any] = res.get(block=False)
            except Exception as e:  # noqa: BLE001 - run_batch never raises; be safe anyway
                outs = [e] * len(pend)
            for p, out in zip(pend, outs):
                self._completed(p, out)

    def _completed(self, p: _Pending, out: Any) -> None:
        st = self.stats
        self._jobs -= 1
        if p.req.operation == Op.WRITE_BARRIER:
            self._barrier = False
        if self._pgrants is not None and p.pinned:
            self._pgrants.release(p.pinned)
            p.pinned = []
        if isinstance(out, BaseException):  # a bug in a job, not the guest's doing
            self.ctx.log.error("queue %d: job failed: %r", self.queue, out)
            self._answer(p, Status.ERROR, "io_error", repr(out))
            return
        st.grant_maps += out.maps
        st.grant_unmaps += out.unmaps
        st.grant_copy_segments += out.copies
        if out.new_grants and self._pgrants is not None:
            reject = self._pgrants.adopt(out.new_grants)
            self._unmap(reject, wait=False)
            self._update_pgrant_gauge()
        if out.status != Status.OKAY:
            self._answer(p, out.status, out.reason, out.detail)
            return
        req = p.req
        if req.operation == Op.INDIRECT and p.phase == 0:
            p.phase = 1
            p.segments = out.segments
            self._queue.appendleft(p)  # keep its place: phase 2 goes next
            return
        st.bytes[p.label] += out.nbytes
        self._answer(p, Status.OKAY, "", "")

    def _answer(self, p: _Pending, status: int, reason: str, detail: str) -> None:
        """The only place a response is made: once per consumed request."""
        req = p.req
        del self.inflight[p.seq]
        st = self.stats
        st.requests[p.label] += 1
        if reason:
            st.errors[reason] += 1
            self.ctx.guest_log(
                f"queue {self.queue}: request id={req.id} op={req.operation} "
                f"sector={req.sector_number}: {detail or reason}"
            )
        # an INDIRECT request is answered with its indirect_op (as blkback does and
        # Linux's blkfront checks)
        rsp = self.ctx.abi.pack_response(req.id, effective_op(req), status)
        self._held[p.seq] = (rsp, p.label, p.t0)

    def _publish(self) -> bool:
        """Write the responses that are next in ring order, make them visible; whether
        to notify. The slots are written only here, right before ``rsp_prod`` moves:
        a response written into a slot is the end of the request that lay there, so
        between the two a killed gblk would lose it."""
        ring = self.ring
        assert ring is not None
        held = self._held
        nxt = self._next_answer
        if nxt in held:
            latency = self.stats.latency
            now = time.monotonic()
            while nxt in held:
                rsp, label, t0 = held.pop(nxt)
                ring.put_response(rsp)
                latency[label].observe(now - t0)  # taken off the ring -> published
                nxt += 1
            self._next_answer = nxt
        return ring.push_responses()

    # -- persistent grants -----------------------------------------------------------
    def _unmap(self, mappings: List[GrantMapping], wait: bool) -> None:
        if not mappings:
            return
        self.stats.grant_unmaps += len(mappings)
        if wait:
            self.ctx.pool.apply(jobs.unmap_all, (mappings,))
        else:
            self.ctx.pool.spawn(jobs.unmap_all, mappings)

    def _update_pgrant_gauge(self) -> None:
        if self._pgrants is None:
            return
        ds = self.ctx.device_stats
        prev = getattr(self, "_pg_count", 0)
        now = len(self._pgrants)
        ds.persistent_grants += now - prev
        self._pg_count = now
        ev_prev = getattr(self, "_pg_evictions", 0)
        ds.persistent_grant_evictions += self._pgrants.evictions - ev_prev
        self._pg_evictions = self._pgrants.evictions

    def set_persistent_limit(self, limit: int) -> None:
        if self._pgrants is not None:
            self._unmap(self._pgrants.shrink_to(limit), wait=False)
            self._update_pgrant_gauge()


def _contiguous(mapping: GrantMapping) -> memoryview:
    """A multi-page ring as one buffer: slots straddle page boundaries."""
    if mapping.contiguous is None:
        raise GblkError("this host cannot map a multi-page ring contiguously")
    return mapping.contiguous
