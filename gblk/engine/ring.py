"""One ring (queue) of one device: the greenlet that serves it.

The data path (docs/architecture.md; the ring rules it keeps: docs/protocol.md §4),
built for what each request costs:

1. Wake on the event channel (the daemon's one handle, ``gblk.engine.handles``, wakes
   the ring whose port fired) and unmask the port.
2. Copy every new slot in one piece (``BackRing.take_block``) and parse the copy with
   the ABI's precompiled structs; every check of a request is made here, on the hub,
   so a bad request is answered at once and never costs a thread handoff.
3. READ/WRITE whose grants are all in the persistent cache are served on the hub when
   the store can do so without blocking (``Store.readv_nowait``: a read served by the
   page cache is one ``preadv2(RWF_NOWAIT)``); everything else goes to the threadpool,
   one job per pass when the store is fast (a handoff costs more than the IO then),
   split into up to ``JOBS_PER_PASS`` jobs when it is slow (a disk wants several
   requests at once). An INDIRECT request is one job at most, descriptors and data.
4. Answers are recorded per ring slot (the slot index is the request's place in ring
   order: preallocated arrays, no object per request) and written into the ring in
   the order the requests were consumed, right before ``rsp_prod`` is published.

Why in order: a response takes the slot at ``rsp_prod_pvt``, the slot of the oldest
unanswered request. Written out of order it would overwrite a request still in
flight, and a daemon killed then (SIGKILL, a crash) would lose that request for good.
In order, every request at or after ``rsp_prod`` is still in its slot, so a restarted
gblk attaching from ``rsp_prod`` serves them all. The price: a slow request delays
the responses (not the IO) of the requests behind it on its ring.

Every consumed request is answered exactly once (``_finish`` is the only place that
records an answer, and a slot is published once). A broken producer index halts
this ring only.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import gevent
import gevent.event

from ..blkif import ops
from ..blkif import reasons as R
from ..blkif.abi import Segment, indirect_segment_tuples
from ..blkif.const import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    RING_HEADER_SIZE,
    SECTOR_SHIFT,
    U32_MASK,
    Op,
    Status,
)
from ..blkif.ring import BackRing
from ..blkif.validate import check_header, check_segments, indirect_pages, status_for
from ..errors import GblkError, InvalidRequest, RingError
from ..xen.interfaces import GrantMapping
from . import crashpoints, jobs, throttle
from .grants import PersistentGrants
from .journal import HEADER_SIZE as _JOURNAL_HEADER
from .journal import RingJournal, identity, recover
from .pages import Outcome, io_reason
from .stats import RingStats

if TYPE_CHECKING:  # the dataplane imports this module
    from .dataplane import Dataplane

#: metric label by op code (gblk.blkif.ops)
_OP_LABEL: Dict[int, str] = ops.LABEL
_UNSUPPORTED = ops.UNSUPPORTED_LABEL
_SPEC = ops.BY_CODE
#: ops that wait for everything before them (a barrier)
_ORDERED = frozenset(s.code for s in ops.TABLE if s.ordered)

#: seconds between two looks for idle persistent grants (at most)
SWEEP_INTERVAL = 10.0
#: passes that found more work run back to back this many times before yielding
PASSES_PER_YIELD = 4
#: most threadpool jobs one ring pass is split into when the store is slow
JOBS_PER_PASS = 4
#: seconds per request below which a store counts as fast: a whole pass in one job
FAST_JOB_SECONDS = 50e-6

_READ = int(Op.READ)
_WRITE = int(Op.WRITE)
_OKAY = int(Status.OKAY)
_MAX_SEGS = BLKIF_MAX_SEGMENTS_PER_REQUEST

#: a job item: (slot, function, arguments, pinned persistent grants)
#: (pinned: grefs for ``PersistentGrants.release``, or for ``jobs.run_views`` the
#: cache entries for ``unpin``)
_Item = Tuple[int, Callable[..., Outcome], Tuple[Any, ...], Optional[List[Any]]]


class RingWorker:
    """Serves one ring (queue) of one connected disk until stopped.

    Responsible for every request its frontend puts on this ring: taking it, checking
    it, having its IO done and answering it, once, in ring order. Owns the ring's
    mapping, its bound port on the shared event-channel handle, its ring journal and its
    persistent-grant cache; shares the store, grant table, page source, limits, IO
    limits and dirty bitmap of its ``Dataplane``, which creates it (one per queue the
    frontend announced) and is its only caller.

    Lifecycle: constructed idle; ``start()`` maps the ring (in the control pool, with a
    deadline), binds the port, opens the journal and spawns the ring greenlet; ``stop()``
    stops taking requests, waits up to ``timeout`` for the consumed ones to be answered,
    kills the greenlet and releases everything (idempotent; safe after a half-finished
    start). A frontend that breaks the ring halts this ring only (``stats.halted``);
    a failure of the greenlet itself is logged and likewise halts only this ring.

    Threads: everything here runs on the hub, in the one greenlet ``start()`` spawns
    (``_run``) and in callbacks the hub calls (the port's watcher, job completions,
    the IO-limit timer). Only the functions of ``gblk.engine.jobs`` run in the
    threadpool: they get arguments and return outcomes, and never touch this object.
    """

    def __init__(self, dp: "Dataplane", queue: int, ring_refs: Tuple[int, ...],
                 remote_port: int, stats: RingStats) -> None:
        self.dp = dp
        self.queue = queue
        self.ring_refs = ring_refs
        self.remote_port = remote_port
        self.stats = stats
        self.ring: Optional[BackRing] = None
        self._ring_map: Optional[GrantMapping] = None
        self.port: Optional[int] = None
        self._kicked = False  # the port fired (and is masked) since the last pass
        self._wake = gevent.event.Event()
        self._done: Deque[Tuple[List[_Item], Any]] = collections.deque()
        #: consumed requests waiting behind a barrier: (slot, private copy of the slot)
        self._queue: Deque[Tuple[int, bytes]] = collections.deque()
        self._jobs = 0  # requests in threadpool jobs
        self._barrier = False  # a barrier runs: dispatch nothing else
        self._job_seconds = 0.0  # per request, moving average (0: not measured yet)
        self._stopping = False
        self._greenlet: Optional[gevent.Greenlet] = None
        self._pgrants: Optional[PersistentGrants] = None
        #: what a successor needs to answer each consumed request once (gblk.engine.journal)
        self._journal: Optional[RingJournal] = None
        if dp.pages.persistent:
            self._pgrants = PersistentGrants(dp.max_persistent_grants, dp.persistent_grant_idle)
        self._pg_count = 0
        self._pg_evictions = 0
        #: how often idle persistent grants are looked for: at most SWEEP_INTERVAL,
        #: and often enough that one is unmapped within 1.5x its idle time
        self._sweep_every = min(SWEEP_INTERVAL, max(0.05, dp.persistent_grant_idle / 2))
        self._next_sweep = time.monotonic() + self._sweep_every
        self.finished = gevent.event.Event()
        # per-slot records of consumed requests (sized in start())
        self._rid: List[int] = []
        self._rop: List[int] = []
        self._status: List[Optional[int]] = []
        self._t0: List[float] = []
        self._label: List[str] = []
        #: changed-block tracking: each write's token (gblk.engine.cbt), and the bitmap
        #: generation the batch being built must see durable before it is issued
        self._tok: List[int] = []
        self._cbt_need = 0
        #: the ranges of the batch being built that an export must copy first
        #: (gblk.engine.snapshot)
        self._cbw_ranges: List[Tuple[int, int]] = []
        self._timer: Any = None  # wakes a ring whose next request waits for its IO limits
        self.jobs_submitted = 0  # requests handed to jobs so far (for cbt enable)
        self.jobs_completed = 0

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        """Map the ring, bind the event channel, start serving. Raises GblkError
        (the device fails this connection); ``stop()`` cleans up after a half start."""
        dp = self.dp
        # in the control pool, with a deadline; a mapping made after it is unmapped
        self._ring_map = dp.control.call(
            f"queue {self.queue}: mapping the ring ({len(self.ring_refs)} pages)",
            dp.gnttab.map_grant_refs, dp.domid, list(self.ring_refs), True,
            undo=_unmap_late)
        self.stats.grant_maps += len(self.ring_refs)
        if len(self._ring_map.pages) == 1:
            buf = self._ring_map.pages[0]
        else:  # a multi-page ring must be one contiguous buffer
            buf = _contiguous(self._ring_map)
        self.ring = BackRing(buf, dp.abi.req_size, dp.abi.rsp_size, dp.host.fence())
        n = self.stats.slots = self.ring.slots
        self._rid = [0] * n
        self._rop = [0] * n
        self._status = [None] * n
        self._t0 = [0.0] * n
        self._label = ["read"] * n
        self._tok = [0] * n
        self.port = dp.events.bind(dp.domid, self.remote_port, self._kick)
        self._open_journal()
        if dp.adopt:
            # the previous process may have died between publishing rsp_prod and
            # notifying: the frontend would wait for that event for good. One
            # notification on every takeover (a spurious one is harmless)
            dp.events.notify(self.port)
        self._greenlet = gevent.spawn(self._run)
        self._greenlet.link_exception(self._crashed)
        self._wake.set()  # requests may already be waiting (reconnect, restart)

    def _open_journal(self) -> None:
        """Open this ring's journal; on a takeover answer what the dead process left
        journaled and unpublished. Without a runtime directory: no journal."""
        dp = self.dp
        ring = self.ring
        assert ring is not None
        if dp.journal_prefix is None:
            return
        path = f"{dp.journal_prefix}-q{self.queue}"
        try:
            self._journal = RingJournal(path, identity(self.ring_refs, self.remote_port,
                                                       dp.abi.name),
                                        ring.slots, dp.abi.rsp_size)
        except OSError as e:
            dp.log.warning("queue %d: no ring journal (%s): a kill while publishing "
                           "responses would stall this ring", self.queue, e)
            return
        n = recover(self._journal, ring, dp.adopt)
        if n:
            dp.log.info("queue %d: published %d response(s) the previous process had "
                        "journaled", self.queue, n)

    def stop(self, timeout: float) -> None:
        """Stop taking requests, answer every consumed one, release everything.
        Idempotent; safe after a half-finished start."""
        self._stopping = True
        self._wake.set()
        g = self._greenlet
        if g is not None and not g.dead and g is not gevent.getcurrent():
            if not self.finished.wait(timeout):
                self.dp.log.error("queue %d: %d requests still in flight after %.0fs; abandoning them",
                                  self.queue, self._outstanding(), timeout)
            g.kill(block=True, timeout=1)
        self._release()

    def _outstanding(self) -> int:
        return self.ring.outstanding() if self.ring is not None else 0

    def _kick(self) -> None:
        """The port fired (from the shared handle's watcher, on the hub)."""
        self._kicked = True
        self._wake.set()

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        if self.port is not None:
            port, self.port = self.port, None
            try:
                self.dp.events.unbind(port)
            except GblkError:
                pass
        if self._jobs == 0:  # never unmap under a running job
            if self._pgrants is not None:
                self._unmap(self._pgrants.drain(), wait=True)
                self._update_pgrant_gauge()
            if self.ring is not None:
                self.ring.release()
                self.ring = None
            if self._journal is not None:  # everything consumed is published
                self._journal.close(remove=True)
                self._journal = None
            if self._ring_map is not None:
                ring_map, self._ring_map = self._ring_map, None
                try:  # with a deadline: a teardown that hangs would keep the device
                    self.dp.control.call(f"queue {self.queue}: unmapping the ring",
                                         ring_map.unmap)
                    self.stats.grant_unmaps += len(self.ring_refs)
                except GblkError as e:  # counted and logged: a leak, but the device goes
                    self.stats.errors[R.GRANT_MAP] += 1
                    self.dp.log.error("%s", e)

    def _crashed(self, g: gevent.Greenlet) -> None:
        self.dp.log.error("queue %d: ring greenlet failed: %r", self.queue, g.exception)
        self.stats.halted = True
        self.finished.set()

    # -- the loop -----------------------------------------------------------------
    def _run(self) -> None:
        wake = self._wake
        streak = 0
        try:
            while True:
                # a ring with cached grants wakes now and then even when idle: the
                # sweep unmaps what an idle guest no longer uses (Linux's purge timer)
                if self._pgrants is not None and len(self._pgrants):
                    wake.wait(max(0.0, self._next_sweep - time.monotonic()) + 0.01)
                else:
                    wake.wait()
                wake.clear()
                self._pass()
                if self._stopping and not self._outstanding():
                    break
                if wake.is_set():
                    # more work: a few passes back to back, then let the other rings,
                    # devices and the daemon's own watchers run
                    streak += 1
                    if streak >= PASSES_PER_YIELD:
                        streak = 0
                        gevent.sleep(0)
                else:
                    streak = 0
        finally:
            self.finished.set()

    def _pass(self) -> None:
        ring = self.ring
        events = self.dp.events
        assert ring is not None and self.port is not None
        st = self.stats
        # The shared handle took this port's event and woke us; the port stays masked
        # until now (a storm of notifications collapses into one wake-up: XSA-332).
        if self._kicked:
            self._kicked = False
            st.notifications_received += 1
            events.unmask(self.port)
        if self._done:
            self._complete()
        if self._queue and not self._barrier:
            self._drain_queue()
        if not self._stopping and not st.halted:
            try:
                block, n, start = ring.take_block(ring.slots - ring.outstanding())
            except RingError as e:
                self._halt(str(e))
                n = 0
            if n:
                st.batches.observe(n)
                if crashpoints.ENABLED:
                    crashpoints.hit("taken")
                self._take(block, n, start)
        if self._publish():
            events.notify(self.port)
            st.notifications_sent += 1
        st.in_flight = ring.outstanding()
        try:
            st.ring_fill = st.in_flight + (0 if st.halted else ring.unconsumed())
        except RingError:
            st.ring_fill = st.in_flight
        if self._pgrants is not None:
            now = time.monotonic()
            if now >= self._next_sweep:
                self._next_sweep = now + self._sweep_every
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
            st.errors[R.RING_HALTED] += 1
            self.dp.log.error("queue %d: ring halted, frontend broke the ring: %s", self.queue, why)

    # -- taking requests ------------------------------------------------------------
    def _take(self, block: bytes, n: int, start: int) -> None:
        """Record and serve ``n`` requests copied in ``block`` from ring index ``start``."""
        dp = self.dp
        abi = dp.abi
        size = self.ring.entry_size if self.ring is not None else abi.req_size
        mask = len(self._rid) - 1
        now = time.monotonic()
        if self._pgrants is not None:
            self._pgrants.now = now
        rid, rop, status, t0, label = self._rid, self._rop, self._status, self._t0, self._label
        head = abi.head.unpack_from
        batch: List[_Item] = []
        queue = self._queue
        for k in range(n):
            off = k * size
            slot = (start + k) & mask
            op = block[off]
            rid[slot] = head(block, off)[3]
            rop[slot] = op
            status[slot] = None
            t0[slot] = now
            label[slot] = _OP_LABEL.get(op, _UNSUPPORTED)
            if queue or self._barrier:
                queue.append((slot, block[off:off + size]))
            elif not self._serve(block, off, slot, batch):
                queue.append((slot, block[off:off + size]))
        if batch:
            self._submit(batch)

    def _drain_queue(self) -> None:
        batch: List[_Item] = []
        q = self._queue
        while q and not self._barrier:
            slot, raw = q[0]
            if not self._serve(raw, 0, slot, batch):
                break
            q.popleft()
        if batch:
            self._submit(batch)

    def _serve(self, block: bytes, off: int, slot: int, batch: List[_Item]) -> bool:
        """Serve one request: answer it, or add its job to ``batch``. False: it must
        wait (a barrier behind running jobs); nothing was done."""
        op = block[off]
        thr = self.dp.throttle
        if thr is not None and thr.limiter is not None and not self._admit(block, off, slot, batch):
            return False  # IO limits: it waits in ring order; a timer wakes the ring
        if op == _READ or op == _WRITE:
            self._rw(block, off, slot, op, batch)
            return True
        if op in _ORDERED and (self._jobs or batch):
            return False  # everything before the barrier completes first
        dp = self.dp
        req = dp.abi.parse_request(bytes(block[off:off + dp.abi.req_size]))
        if op == Op.INDIRECT:  # answered with its indirect_op, as blkback does
            self._rop[slot] = req.indirect_op
            self._label[slot] = _OP_LABEL.get(req.indirect_op, _UNSUPPORTED)
        try:
            check_header(req, dp.job.limits)
        except InvalidRequest as e:
            self._finish(slot, status_for(e.reason), e.reason, str(e))
            return True
        spec = _SPEC[op]  # check_header refused every op the table does not describe
        if spec.storage is ops.Storage.DISCARD:
            if dp.cbt is not None or dp.cbw is not None:
                self._mark_write(slot, req.sector_number, req.nr_sectors)
            batch.append((slot, jobs.run_discard,
                          (dp.job, req.sector_number, req.nr_sectors, bool(req.flag & 1)), None))
        elif spec.layout is ops.Layout.INDIRECT:
            self._indirect(slot, req.indirect_op, req.indirect_grefs, req.nr_segments,
                           req.sector_number, batch)
        else:  # Storage.WRITE_THEN_FLUSH: FLUSH_DISKCACHE, WRITE_BARRIER (validated:
            # offered, segments in range)
            segs = req.segments
            if segs:
                try:
                    check_segments(req.sector_number, segs, dp.job.limits)
                except InvalidRequest as e:
                    self._finish(slot, status_for(e.reason), e.reason, str(e))
                    return True
                if dp.cbt is not None or dp.cbw is not None:
                    self._mark_write(slot, req.sector_number,
                                     sum(g.last_sect - g.first_sect + 1 for g in segs))
            barrier = spec.ordered
            if barrier:
                self._barrier = True
            cached, pinned = self._cached(segs)
            batch.append((slot, jobs.run_request,
                          (dp.job, _WRITE, segs, req.sector_number, cached, True,
                           barrier or bool(segs)), pinned))
        return True

    def _rw(self, block: bytes, off: int, slot: int, op: int, batch: List[_Item]) -> None:
        """READ/WRITE: parse, check, then serve on the hub or hand to a job."""
        dp = self.dp
        f = dp.abi.rw.unpack_from(block, off)
        n = f[1]
        if not 1 <= n <= _MAX_SEGS:
            self._finish(slot, Status.ERROR, R.INVALID_SEGMENT_COUNT, f"{n} segments")
            return
        lim = dp.job.limits
        if op == _WRITE and lim.readonly:
            self._finish(slot, Status.ERROR, R.READ_ONLY, "write to a read-only disk")
            return
        sector = f[4]
        segs = [Segment(f[5 + 3 * i], f[6 + 3 * i], f[7 + 3 * i]) for i in range(n)]
        try:
            sectors = check_segments(sector, segs, lim)
        except InvalidRequest as e:
            self._finish(slot, Status.ERROR, e.reason, str(e))
            return
        self._data(slot, op, segs, sector, sectors, batch)

    def _data(self, slot: int, op: int, segs: Sequence[Tuple[int, int, int]], sector: int,
              sectors: int, batch: List[_Item]) -> None:
        """Checked READ/WRITE segments (``sectors`` long): on the hub when every page is
        cached and the store does it without blocking; else one job item, which gets
        the pages already sliced and pinned when every page is cached."""
        dp = self.dp
        # a write whose bits are not durable yet, or whose blocks an export has not
        # copied yet, goes in the batch, which waits for them
        held = (op == _WRITE and (dp.cbt is not None or dp.cbw is not None)
                and self._mark_write(slot, sector, sectors))
        pg = self._pgrants
        if pg is not None:
            store = dp.store
            nowait = store.can_nowait(op == _WRITE) and not held
            got = pg.views(segs, pin=not nowait)
            if got is not None:
                views, used = got
                offset = sector << SECTOR_SHIFT
                total = sectors << SECTOR_SHIFT
                if nowait:
                    try:
                        if op == _READ:
                            done = store.readv_nowait(views, offset, total)
                        else:
                            done = store.writev_nowait(views, offset, total)
                    except OSError as e:
                        done = None
                        self._finish(slot, Status.ERROR, io_reason(e), e.strerror or str(e))
                    if done is not False:
                        for v in views:
                            v.release()
                        if done:
                            self.stats.bytes[self._label[slot]] += total
                            self._finish(slot, _OKAY, "", "")
                        return
                    pg.pin(used)  # it would block: the same slices go to a job
                batch.append((slot, jobs.run_views, (dp.job, op, views, offset, total), used))
                return
        segments = [s if type(s) is Segment else Segment._make(s) for s in segs]
        cached, pinned = self._cached(segments)
        batch.append((slot, jobs.run_request,
                      (dp.job, op, segments, sector, cached, False, False), pinned))

    def _indirect(self, slot: int, op: int, grefs: Tuple[int, ...], nr_segments: int,
                  sector: int, batch: List[_Item]) -> None:
        dp = self.dp
        refs = grefs[:indirect_pages(nr_segments)]
        # a job reads the descriptors: its bits are marked for the most it can write
        job_bits = op == _WRITE and (dp.cbt is not None or dp.cbw is not None)
        pg = self._pgrants
        if pg is not None:
            have = pg.acquire(refs)
            if len(have) == len(set(refs)):
                # every descriptor page is a cached persistent grant: read them here
                # (a copy of mapped memory; no syscall, no thread handoff)
                try:
                    raw = b"".join([have[r] for r in refs])  # the one read of them
                finally:
                    pg.release(have)
                segs = indirect_segment_tuples(raw, nr_segments)
                try:
                    sectors = check_segments(sector, segs, dp.job.limits)
                except InvalidRequest as e:
                    self._finish(slot, Status.ERROR, e.reason, str(e))
                    return
                self._data(slot, op, segs, sector, sectors, batch)
                return
            if job_bits:
                self._mark_write(slot, sector, nr_segments * (4096 >> SECTOR_SHIFT))
            batch.append((slot, jobs.run_indirect, (dp.job, op, refs, nr_segments, sector, have),
                          list(have)))
            return
        if job_bits:
            self._mark_write(slot, sector, nr_segments * (4096 >> SECTOR_SHIFT))
        batch.append((slot, jobs.run_indirect, (dp.job, op, refs, nr_segments, sector, {}), None))

    def _cached(self, segs: Sequence[Segment]) -> Tuple[Dict[int, memoryview], Optional[List[int]]]:
        """The cached pages a job may use, pinned until it completes."""
        pg = self._pgrants
        if pg is None or not segs:
            return {}, None
        cached = pg.acquire(s.gref for s in segs)
        return cached, list(cached)

    # -- jobs ---------------------------------------------------------------------------
    def _submit(self, batch: List[_Item]) -> None:
        """Hand a pass's jobs to the threadpool: all in one job when the store is fast
        (a thread handoff costs more than a syscall on a warm cache), else in up to
        JOBS_PER_PASS jobs so that a slow store sees several requests at once."""
        n = len(batch)
        self._jobs += n
        self.jobs_submitted += n
        need, self._cbt_need = self._cbt_need, 0
        cbt = self.dp.cbt
        ranges = self._cbw_ranges
        if ranges:  # an export's blocks are copied before the writes to them are issued
            self._cbw_ranges = []
            cbw = self.dp.cbw
            go: Callable[[], None] = lambda: self._spawn(batch)  # noqa: E731
            if cbw is not None:
                go = lambda: cbw.after(ranges, lambda: self._spawn(batch))  # noqa: E731
            if need and cbt is not None:
                cbt.after(need, go)
            else:
                go()
        elif need and cbt is not None:  # a write's bits are durable before it is issued
            cbt.after(need, lambda: self._spawn(batch))
        else:
            self._spawn(batch)

    def _spawn(self, batch: List[_Item]) -> None:
        n = len(batch)
        fast = 0.0 < self._job_seconds < FAST_JOB_SECONDS
        per_job = n if fast else -(-n // JOBS_PER_PASS)
        done = self._done
        wake = self._wake
        pool = self.dp.pool
        for i in range(0, n, per_job):
            chunk = batch[i:i + per_job]
            res = pool.spawn(jobs.run_batch, [(fn, args) for _, fn, args, _ in chunk])

            def _finished(r: Any, chunk: List[_Item] = chunk) -> None:
                done.append((chunk, r))
                wake.set()

            res.rawlink(_finished)

    def _complete(self) -> None:
        while self._done:
            chunk, res = self._done.popleft()
            try:
                outs, seconds = res.get(block=False)
                per = seconds / len(chunk)
                avg = self._job_seconds
                self._job_seconds = per if avg == 0.0 else 0.8 * avg + 0.2 * per
            except Exception as e:  # noqa: BLE001 - run_batch never raises; be safe anyway
                outs = [e] * len(chunk)
            for item, out in zip(chunk, outs):
                self._completed(item, out)

    def _completed(self, item: _Item, out: Any) -> None:
        slot, fn, _, pinned = item
        st = self.stats
        self._jobs -= 1
        self.jobs_completed += 1
        if fn is jobs.run_request and self._rop[slot] in _ORDERED:
            self._barrier = False
        if pinned and self._pgrants is not None:
            if fn is jobs.run_views:
                self._pgrants.unpin(pinned)
            else:
                self._pgrants.release(pinned)
        if isinstance(out, BaseException):  # a bug in a job, not the guest's doing
            self.dp.log.error("queue %d: job failed: %r", self.queue, out)
            self._finish(slot, Status.ERROR, R.IO_ERROR, repr(out))
            return
        st.grant_maps += out.maps
        st.grant_unmaps += out.unmaps
        st.grant_copy_segments += out.copies
        if out.new_grants and self._pgrants is not None:
            self._unmap(self._pgrants.adopt(out.new_grants), wait=False)
            self._update_pgrant_gauge()
        if out.status != _OKAY:
            self._finish(slot, out.status, out.reason, out.detail)
            return
        st.bytes[self._label[slot]] += out.nbytes
        self._finish(slot, _OKAY, "", "")

    # -- answers ------------------------------------------------------------------------
    def _finish(self, slot: int, status: int, reason: str, detail: str) -> None:
        """The only place an answer is recorded: once per consumed request."""
        self._status[slot] = int(status)
        if self._tok[slot]:
            tok, self._tok[slot] = self._tok[slot], 0
            if self.dp.cbt is not None:
                self.dp.cbt.done(tok)
        if reason:
            st = self.stats
            st.errors[reason] += 1
            self.dp.guest_log(
                f"queue {self.queue}: request id={self._rid[slot]} op={self._rop[slot]}: "
                f"{detail or reason}"
            )

    def _publish(self) -> bool:
        """Write the answers that are next in ring order into their slots, make them
        visible; whether to notify. The slots are written only here, right before
        ``rsp_prod`` moves: a response written into a slot is the end of the request
        that lay there, so between the two a killed gblk would lose it."""
        ring = self.ring
        assert ring is not None
        status = self._status
        pvt = ring.rsp_prod_pvt
        cons = ring.req_cons
        if pvt != cons and status[pvt & ring.mask] is not None:
            rid, rop, t0, label = self._rid, self._rop, self._t0, self._label
            st = self.stats
            requests = st.requests
            latency = st.latency
            pack = self.dp.abi.rsp.pack_into
            mask = ring.mask
            j = self._journal
            if j is not None:  # first into the journal: the ring slots are the commit's
                jbuf = j.buf
                jsize = j.rsp_size
                j.begin(pvt)
                end = pvt
                while end != cons:
                    slot = end & mask
                    s = status[slot]
                    if s is None:
                        break
                    pack(jbuf, _JOURNAL_HEADER + slot * jsize, rid[slot], rop[slot] & 0xFF, s)
                    end = (end + 1) & U32_MASK
                j.commit(end)
                if crashpoints.ENABLED:
                    crashpoints.hit("journaled")
            buf = ring.buf
            size = ring.entry_size
            now = time.monotonic()
            while pvt != cons:
                slot = pvt & mask
                s = status[slot]
                if s is None:
                    break
                # every padding byte zero (XSA-216): pack_into writes them
                pack(buf, RING_HEADER_SIZE + slot * size, rid[slot], rop[slot] & 0xFF, s)
                lbl = label[slot]
                requests[lbl] += 1
                latency[lbl].observe(now - t0[slot])  # taken off the ring -> published
                pvt = (pvt + 1) & U32_MASK
            ring.rsp_prod_pvt = pvt
            if crashpoints.ENABLED:
                crashpoints.hit("written")
            notify = ring.push_responses()
            if j is not None:
                j.published(pvt)
            return notify
        return ring.push_responses()

    # -- IO limits and changed-block tracking (gblk.engine.throttle, gblk.engine.cbt) --
    def _admit(self, block: bytes, off: int, slot: int, batch: List[_Item]) -> bool:
        """May this request go now under the disk's IO limits (it is counted then)?
        Else a timer wakes the ring when it may."""
        if self._stopping or (block[off] in _ORDERED and (self._jobs or batch)):
            return True  # a drain ignores limits; a held barrier is counted when it goes
        cost = throttle.request_cost(self.dp.abi, block, off)
        lim = self.dp.throttle.limiter if self.dp.throttle is not None else None
        if cost is None or lim is None:
            return True
        now = time.monotonic()
        wait = lim.admit(cost[0], cost[1], now)
        if wait > 0:
            lim.waiters.add(self._wake.set)  # new limits: look again at once
            t = self._timer
            if t is None or not t.active:
                if t is not None:
                    t.close()
                t = self._timer = gevent.get_hub().loop.timer(wait)
                t.start(self._wake.set)
            return False
        self.stats.throttle_wait["write" if cost[0] else "read"].observe(now - self._t0[slot])
        return True

    def _mark_write(self, slot: int, sector: int, nsectors: int) -> bool:
        """A write's bits (CBT) and blocks (an export's copy-before-write); True when
        its batch must wait for either."""
        dp = self.dp
        held = dp.cbt is not None and self._cbt_mark(slot, sector, nsectors)
        cbw = dp.cbw
        if cbw is not None and cbw.need(sector << SECTOR_SHIFT, nsectors << SECTOR_SHIFT):
            self._cbw_ranges.append((sector << SECTOR_SHIFT, nsectors << SECTOR_SHIFT))
            held = True
        return held

    def _cbt_mark(self, slot: int, sector: int, nsectors: int) -> bool:
        """Mark a write's bits; True when the batch must wait for the bitmap to be synced."""
        cbt = self.dp.cbt
        assert cbt is not None
        if self._tok[slot]:  # never two marks of one request in flight
            cbt.done(self._tok[slot])
        need, self._tok[slot] = cbt.mark(sector, nsectors)
        if need > self._cbt_need:
            self._cbt_need = need
        return need > 0

    # -- persistent grants -----------------------------------------------------------
    def _unmap(self, mappings: List[GrantMapping], wait: bool) -> None:
        if not mappings:
            return
        self.stats.grant_unmaps += len(mappings)
        if wait:  # teardown: in the control pool, with a deadline
            try:
                errors = self.dp.control.call(
                    f"queue {self.queue}: unmapping {len(mappings)} persistent grants",
                    jobs.unmap_reporting, mappings)
            except GblkError as e:
                errors = [str(e)]
            self._unmapped(errors)
        else:
            self.dp.pool.spawn(jobs.unmap_reporting, mappings).rawlink(
                lambda r: self._unmapped(r.get(block=False)))

    def _unmapped(self, errors: List[str]) -> None:
        for e in errors:  # counted and logged: a grant we could not unmap is a leak
            self.stats.errors[R.GRANT_MAP] += 1
            self.dp.log.error("queue %d: unmapping a persistent grant failed: %s", self.queue, e)

    def _update_pgrant_gauge(self) -> None:
        if self._pgrants is None:
            return
        ds = self.dp.device_stats
        now = len(self._pgrants)
        ds.persistent_grants += now - self._pg_count
        self._pg_count = now
        ds.persistent_grant_evictions += self._pgrants.evictions - self._pg_evictions
        self._pg_evictions = self._pgrants.evictions

    def set_persistent_limit(self, limit: int) -> None:
        if self._pgrants is not None:
            self._unmap(self._pgrants.shrink_to(limit), wait=False)
            self._update_pgrant_gauge()


def _unmap_late(mapping: GrantMapping) -> None:
    """In the control pool: unmap a ring mapped after its deadline."""
    mapping.unmap()


def _contiguous(mapping: GrantMapping) -> memoryview:
    """A multi-page ring as one buffer: slots straddle page boundaries."""
    if mapping.contiguous is None:
        raise GblkError("this host cannot map a multi-page ring contiguously")
    return mapping.contiguous

