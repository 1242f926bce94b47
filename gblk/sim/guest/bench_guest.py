"""A cheap guest for ``gblk bench``: drives one ring of a connected ``Frontend``
directly, so that the simulated guest is not what limits the benchmark.

The full ``gblk.sim.guest.frontend.Frontend`` checks every byte and every response and
builds objects for each request; that costs more CPU per request than the daemon
it measures. ``BenchGuest`` lets the Frontend negotiate and connect (XenStore,
rings, event channels, feature-persistent, indirect segments, exactly as blkfront),
then stops its response greenlet and takes over **queue 0** (the bench connects
with one queue, as a one-vCPU Linux guest does; other queues, if any, stay idle):

* a fixed pool of guest pages, granted once to the backend and reused by every
  request (with persistent grants the backend maps each once and keeps it, which
  is exactly what Linux blkfront's persistent-grant pool gets from it; in map and
  copy mode the backend maps or copies them per request anyway). Each of the up to
  ``qd`` IOs in flight owns its pages ("slot"); INDIRECT descriptor pages come from
  the pool too and are written once per job, since a slot's pages never change;
* requests packed with a precompiled ``struct.Struct.pack_into`` per request shape
  straight into the ring slots; a batch published with one
  RING_PUSH_REQUESTS_AND_CHECK_NOTIFY and at most one notify
  (``gblk.blkif.ring.FrontRing``);
* responses taken in batches straight from the slots (``unpack_from``), with the
  RING_FINAL_CHECK_FOR_RESPONSES discipline before sleeping on the event channel;
  per-slot preallocated tables (submit time, parts outstanding, operation) instead
  of per-request objects; an IO whose request shape needs more than one ring
  request (1 MiB when the backend offers fewer than 256 indirect segments) is split
  as Linux splits it and completes with its last part;
* no byte verification while the clock runs. Correctness is checked afterwards,
  cheaply but for real: ``verify_reads`` (pages filled with a canary, read through
  the ring, compared byte for byte with ``os.pread`` of the image) and
  ``verify_writes`` (a distinct random pattern per block written through the ring,
  then read back from the file and compared).

Each response is still checked for what costs nothing: its id must be one of ours
and outstanding, its operation the request's (``indirect_op`` for INDIRECT), its
status OKAY; anything else is counted, never raised.

Waiting blocks the whole process in ``poll(2)`` on the event-channel fd (the
unpatched one: the hub does not run while the bench guest drives the ring, which
is the point). Must not import the engine, device, daemon or cli layers.
"""

from __future__ import annotations

import os
import random
import resource
import struct
import time
from array import array
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from ...blkif.abi import SEGMENT
from ...blkif.const import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    PAGE_SIZE,
    RING_HEADER_SIZE,
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    SEGS_PER_INDIRECT_FRAME,
    U32_MASK,
    Op,
)
from ...blkif.ring import RSP_PROD, FrontRing
from ...errors import GblkError
from ...xen.native import original
from .frontend import Frontend

#: high bits of every request id (a backend that truncates ids is caught)
ID_BASE = 0xB3E7 << 48
#: a page filled with this before a verification read: the backend must overwrite it
CANARY = 0x5A
_CANARY_PAGE = bytes([CANARY]) * PAGE_SIZE
_POLLIN = 1


class BenchError(GblkError):
    """The bench guest could not drive the ring (no answer, ring broken)."""


class Shape(NamedTuple):
    """How an IO of ``bs`` bytes goes on the ring."""

    bs: int
    pages: int  #: data pages per IO
    parts: int  #: ring requests per IO
    indirect: bool
    desc_pages: int  #: INDIRECT descriptor pages per IO


def shape_for(bs: int, max_indirect_segments: int) -> Shape:
    """Direct up to 11 pages; else INDIRECT requests of up to the negotiated
    segments; else (no indirect) split into direct requests of 11 pages."""
    if bs <= 0 or bs % PAGE_SIZE:
        raise ValueError(f"block size {bs} is not a multiple of {PAGE_SIZE}")
    pages = bs // PAGE_SIZE
    if pages <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
        return Shape(bs, pages, 1, False, 0)
    if max_indirect_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST:
        per = max_indirect_segments
        parts = -(-pages // per)
        desc = sum(-(-min(per, pages - i * per) // SEGS_PER_INDIRECT_FRAME) for i in range(parts))
        return Shape(bs, pages, parts, True, desc)
    return Shape(bs, pages, -(-pages // BLKIF_MAX_SEGMENTS_PER_REQUEST), False, 0)


class Window(NamedTuple):
    """What one ``run`` measured between its window's start and end."""

    ios: int  #: IOs completed inside the window
    seconds: float
    guest_cpu: float  #: seconds of this process's CPU (utime+stime) in the window
    backend_cpu: float  #: seconds of the daemon's CPU in the window (-1: unknown)
    latencies: "array[float]"  #: seconds, submit -> response seen, per IO in the window
    errors: int  #: responses with a status other than OKAY (whole run)
    violations: int  #: unknown/duplicate ids, wrong operation (whole run)
    ring_requests: int  #: ring requests answered (whole run)
    notifies: int  #: notifications sent (whole run)
    wakeups: int  #: sleeps on the event channel (whole run)


def process_cpu(pid: Optional[int]) -> float:
    """utime+stime of process ``pid`` in seconds (/proc/<pid>/stat, all its threads),
    -1.0 when it cannot be read."""
    if pid is None:
        return -1.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return -1.0
    fields = raw[raw.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Plan:
    """One job's layout: slots, their pages, the packers of each ring request."""

    def __init__(self, guest: "BenchGuest", bs: int, qd: int) -> None:
        shape = shape_for(bs, guest.max_indirect_segments)
        self.shape = shape
        self.qd = max(1, min(qd, guest.ring.slots // shape.parts))
        self.parts = shape.parts
        need = self.qd * (shape.pages + shape.desc_pages)
        if need > len(guest.pool):
            raise ValueError(f"{bs}-byte IOs at depth {qd} need {need} pool pages, "
                             f"the pool has {len(guest.pool)}")
        pool = guest.pool
        abi = guest.abi
        head = abi.head.format  # operation, u8, u16, [pad], id
        #: per ring request (slot * parts + part): (pack_into, indirect, nr_segments,
        #: extra args, sector offset inside the IO)
        self.packs: List[Tuple[Callable[..., None], bool, int, Tuple[int, ...], int]] = []
        #: frames of each slot's data pages, in order
        self.frames: List[List[int]] = []
        desc_next = self.qd * shape.pages
        per = (guest.max_indirect_segments if shape.indirect
               else BLKIF_MAX_SEGMENTS_PER_REQUEST)
        for slot in range(self.qd):
            data = pool[slot * shape.pages:(slot + 1) * shape.pages]
            self.frames.append([f for f, _ in data])
            for part in range(shape.parts):
                segs = data[part * per:(part + 1) * per]
                soff = part * per * SECTORS_PER_PAGE
                if shape.indirect:
                    ndesc = -(-len(segs) // SEGS_PER_INDIRECT_FRAME)
                    descs = pool[desc_next:desc_next + ndesc]
                    desc_next += ndesc
                    for i, (frame, _) in enumerate(descs):
                        chunk = segs[i * SEGS_PER_INDIRECT_FRAME:(i + 1) * SEGS_PER_INDIRECT_FRAME]
                        raw = b"".join(SEGMENT.pack(g, 0, SECTORS_PER_PAGE - 1) for _, g in chunk)
                        page = guest.memory.page(frame)
                        page[:len(raw)] = raw
                        page[len(raw):] = bytes(PAGE_SIZE - len(raw))
                    # blkif_request_indirect: ..., sector_number, handle, pad, grefs
                    st = struct.Struct(head + "QHxx" + "I" * ndesc)
                    self.packs.append((st.pack_into, True, len(segs),
                                       tuple(g for _, g in descs), soff))
                else:
                    # blkif_request: ..., sector_number, seg[n]
                    st = struct.Struct(head + "Q" + SEGMENT.format.lstrip("<@=!>") * len(segs))
                    extra: List[int] = []
                    for _, g in segs:
                        extra += (g, 0, SECTORS_PER_PAGE - 1)
                    self.packs.append((st.pack_into, False, len(segs), tuple(extra), soff))
        n = self.qd * self.parts
        self.outstanding = bytearray(n)
        self.slot_of = [pid // self.parts for pid in range(n)]


class BenchGuest:
    """Queue 0 of ``frontend`` (connected), driven directly; ``shapes`` lists every
    (block size, queue depth) a job will use, so that the pool is big enough."""

    def __init__(self, frontend: Frontend, shapes: Sequence[Tuple[int, int]],
                 io_timeout: float = 30.0) -> None:
        if not frontend.connected or not frontend.queues:
            raise BenchError("the frontend is not connected")
        self.fe = frontend
        #: where the disk's first byte is in the image file verify_* read (a qcow2
        #: image preallocated in one extent: past its metadata)
        self.data_offset = 0
        self.queue = frontend.queues[0]
        self.queue.stop()  # its greenlet no longer takes responses: we do
        self.ring: FrontRing = self.queue.ring
        self.evtchn = self.queue.evtchn
        self.port = self.queue.port
        self.memory = frontend.memory
        self.abi = frontend.abi
        self.handle = frontend.handle
        self.backend = frontend.backend_id
        self.max_indirect_segments = frontend.max_indirect_segments
        self.sectors = frontend.disk.sectors
        self.io_timeout = io_timeout
        self._poll = original("select", "poll")()
        self._poll.register(self.evtchn.fileno(), _POLLIN)
        need = 0
        for bs, qd in shapes:
            s = shape_for(bs, self.max_indirect_segments)
            q = max(1, min(qd, self.ring.slots // s.parts))
            need = max(need, q * (s.pages + s.desc_pages))
        #: (frame, gref), granted read-write once for the whole run
        self.pool: List[Tuple[int, int]] = []
        try:
            for _ in range(need):
                frame = self.memory.alloc_page()
                try:
                    gref = self.memory.grant(frame, self.backend, readonly=False)
                except BaseException:
                    self.memory.free_page(frame)
                    raise
                self.pool.append((frame, gref))
        except BaseException:
            self.release()
            raise
        self._plans: Dict[Tuple[int, int], _Plan] = {}

    def plan(self, bs: int, qd: int) -> _Plan:
        key = (bs, qd)
        p = self._plans.get(key)
        if p is None:
            self._plans.clear()  # descriptor pages are rewritten per layout
            p = self._plans[key] = _Plan(self, bs, qd)
        return p

    def effective_qd(self, bs: int, qd: int) -> int:
        return self.plan(bs, qd).qd

    def parts(self, bs: int) -> int:
        return shape_for(bs, self.max_indirect_segments).parts

    # -- the loop ---------------------------------------------------------------------
    def run(self, bs: int, qd: int, ops: Sequence[int], sectors: Sequence[int],
            limit: Optional[int] = None, warmup: float = 0.0,
            seconds: Optional[float] = None, backend_pid: Optional[int] = None) -> Window:
        """Keep ``qd`` IOs of ``bs`` bytes in flight. IO number k is operation
        ``ops[k % len]`` (Op.READ or Op.WRITE) at sector ``sectors[k % len]``.

        Timed (``seconds`` given): after ``warmup`` seconds the window opens (CPU
        snapshots of this process and of ``backend_pid``), ``seconds`` later it
        closes; IOs whose response is seen inside it are counted. Untimed: exactly
        ``limit`` IOs, all counted. Returns once nothing is outstanding."""
        plan = self.plan(bs, qd)
        qd = plan.qd
        parts = plan.parts
        packs = plan.packs
        outstanding = plan.outstanding
        slot_of = plan.slot_of
        npids = len(packs)
        ring = self.ring
        buf = ring.buf
        idx = ring.idx
        mask = ring.mask
        esize = ring.entry_size
        nslots = ring.slots
        fence = ring.fence
        rsp_unpack = self.abi.rsp.unpack_from
        handle = self.handle
        evtchn = self.evtchn
        port = self.port
        poll = self._poll.poll
        clock = time.perf_counter
        lat = array("d")
        lat_append = lat.append
        nops = len(ops)
        if nops == 0 or len(sectors) != nops:
            raise ValueError("ops and sectors must be non-empty and of one length")
        OP_INDIRECT = int(Op.INDIRECT)

        left = bytearray(qd)  # ring requests outstanding per slot
        slot_op = bytearray(qd)  # the operation each slot's IO carries
        t_sub = [0.0] * qd
        prod = ring.req_prod_pvt
        cons = ring.rsp_cons
        k = 0  # IOs submitted
        inflight = 0
        errors = violations = answered = notifies = wakeups = 0
        timed = seconds is not None
        counting = not timed
        submitting = True
        done = 0
        t_open = clock() + warmup
        t_close = t_open + (seconds or 0.0)
        t0 = t1 = clock()
        cpu0 = cpu1 = (0.0, 0.0)
        todo: List[int] = list(range(qd))
        if limit is not None and limit < qd:
            todo = todo[:max(0, limit)]
        last_progress = clock()

        while True:
            if todo:
                if submitting:
                    now = clock()
                    k_before = k
                    for slot in todo:
                        if limit is not None and k >= limit:
                            break
                        i = k % nops
                        op = ops[i]
                        sector = sectors[i]
                        k += 1
                        slot_op[slot] = op
                        t_sub[slot] = now
                        pid = slot * parts
                        for _ in range(parts):
                            pack, indirect, nseg, extra, soff = packs[pid]
                            off = RING_HEADER_SIZE + (prod & mask) * esize
                            if indirect:
                                pack(buf, off, OP_INDIRECT, op, nseg, ID_BASE + pid,
                                     sector + soff, handle, *extra)
                            else:
                                pack(buf, off, op, nseg, handle, ID_BASE + pid,
                                     sector + soff, *extra)
                            outstanding[pid] = 1
                            prod = (prod + 1) & U32_MASK
                            pid += 1
                        left[slot] = parts
                        inflight += 1
                    ring.req_prod_pvt = prod
                    if k != k_before and ring.push_requests():  # RING_PUSH_REQUESTS_AND_CHECK_NOTIFY
                        evtchn.notify(port)
                        notifies += 1
                todo = []
            rsp_prod = idx[RSP_PROD]
            n = (rsp_prod - cons) & U32_MASK
            if n:
                if n > nslots:
                    raise BenchError(f"rsp_prod {rsp_prod} is more than {nslots} ahead of "
                                     f"rsp_cons {cons}")
                fence()  # read the responses only after rsp_prod (rmb)
                now = clock()
                last_progress = now
                if timed:
                    if counting and now >= t_close:
                        cpu1 = (self_cpu(), process_cpu(backend_pid))
                        t1 = clock()
                        counting = False
                        submitting = False
                        timed = False  # the window is closed: drain
                    elif not counting and submitting and now >= t_open:
                        cpu0 = (self_cpu(), process_cpu(backend_pid))
                        t0 = clock()
                        t_close = t0 + (seconds or 0.0)
                        counting = True  # from the next batch on
                        now = -1.0  # this batch was seen before t0
                for _ in range(n):
                    rid, rop, status = rsp_unpack(buf, RING_HEADER_SIZE + (cons & mask) * esize)
                    cons = (cons + 1) & U32_MASK
                    pid = rid - ID_BASE
                    if pid < 0 or pid >= npids or not outstanding[pid]:
                        violations += 1
                        continue
                    outstanding[pid] = 0
                    answered += 1
                    slot = slot_of[pid]
                    if rop != slot_op[slot]:
                        violations += 1
                    if status:
                        errors += 1
                    remaining = left[slot] - 1
                    left[slot] = remaining
                    if not remaining:
                        inflight -= 1
                        if counting and now >= 0.0:
                            done += 1
                            lat_append(now - t_sub[slot])
                        todo.append(slot)
                ring.rsp_cons = cons
                if not submitting:
                    todo = []
                continue
            if not inflight and not (todo and submitting):
                break
            if ring.final_check_for_responses():  # rsp_event = rsp_cons + 1, look again
                continue
            # sleep on the event channel; unmask before looking at the ring again
            wakeups += 1
            if not poll(1000) or clock() - last_progress > self.io_timeout:
                if clock() - last_progress > self.io_timeout:
                    raise BenchError(f"no response for {self.io_timeout:g}s with {inflight} "
                                     "IOs outstanding")
                continue
            p = evtchn.pending()  # one port on this handle: one call drains it
            if p is not None:
                evtchn.unmask(p)

        if not timed and seconds is None:
            t1 = clock()
        elif seconds is not None and cpu1 == (0.0, 0.0):  # the window never closed
            cpu1 = (self_cpu(), process_cpu(backend_pid))
            t1 = clock()
        backend_cpu = -1.0
        if cpu0[1] >= 0 and cpu1[1] >= 0:
            backend_cpu = cpu1[1] - cpu0[1]
        return Window(done, max(t1 - t0, 1e-9), cpu1[0] - cpu0[0], backend_cpu, lat,
                      errors, violations, answered, notifies, wakeups)

    # -- verification ------------------------------------------------------------------
    def verify_reads(self, image_fd: int, bs: int, qd: int, sectors: Sequence[int]) -> Tuple[int, int]:
        """Read each of ``sectors`` (``bs`` bytes) through the ring into pages filled
        with a canary and compare every byte with the image file. (IOs checked,
        failures: mismatches, errors and protocol violations)."""
        plan = self.plan(bs, qd)
        failures = 0
        checked = 0
        for start in range(0, len(sectors), plan.qd):
            batch = list(sectors[start:start + plan.qd])
            for slot in range(len(batch)):
                for frame in plan.frames[slot]:
                    self.memory.page(frame)[:] = _CANARY_PAGE
            w = self.run(bs, qd, [int(Op.READ)] * len(batch), batch, limit=len(batch))
            failures += w.errors + w.violations
            for slot, sector in enumerate(batch):
                want = os.pread(image_fd, bs, self.data_offset + sector * SECTOR_SIZE)
                got = b"".join(bytes(self.memory.page(f)) for f in plan.frames[slot])
                if got != want:
                    failures += 1
                checked += 1
        return checked, failures

    def verify_writes(self, image_fd: int, bs: int, qd: int, sectors: Sequence[int]) -> Tuple[int, int]:
        """Write a distinct random pattern to each of ``sectors`` (``bs`` bytes,
        ranges must not overlap) through the ring, then compare the image file with
        it, then read them back through the ring. (IOs checked, failures)."""
        plan = self.plan(bs, qd)
        failures = 0
        checked = 0
        for start in range(0, len(sectors), plan.qd):
            batch = list(sectors[start:start + plan.qd])
            patterns = []
            for slot in range(len(batch)):
                data = os.urandom(bs)
                patterns.append(data)
                for i, frame in enumerate(plan.frames[slot]):
                    self.memory.page(frame)[:] = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            w = self.run(bs, qd, [int(Op.WRITE)] * len(batch), batch, limit=len(batch))
            failures += w.errors + w.violations
            for sector, data in zip(batch, patterns):
                if os.pread(image_fd, bs, self.data_offset + sector * SECTOR_SIZE) != data:
                    failures += 1
                checked += 1
        c, f = self.verify_reads(image_fd, bs, qd, sectors)
        return checked + c, failures + f

    # -- teardown ---------------------------------------------------------------------
    def release(self, wait: float = 5.0) -> int:
        """End the pool's grants (after the frontend closed: the backend let go of
        them) and free the pages. Returns how many grants the backend still maps
        after ``wait`` seconds (left allocated)."""
        deadline = time.monotonic() + wait
        pending = list(self.pool)
        while True:
            busy = []
            for frame, gref in pending:
                try:
                    ended = self.memory.end_access(gref)
                except (ValueError, OSError):
                    continue
                if ended:
                    self.memory.free_page(frame)
                else:
                    busy.append((frame, gref))
            pending = busy
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.pool = pending
        return len(pending)


def random_sectors(count: int, bs: int, disk_sectors: int, seed: int) -> "array[int]":
    """``count`` uniformly random ``bs``-aligned IO start sectors on the disk."""
    nsec = bs // SECTOR_SIZE
    blocks = disk_sectors // nsec
    if blocks < 1:
        raise ValueError("the disk is smaller than one block")
    rnd = random.Random(seed)
    return array("q", (rnd.randrange(blocks) * nsec for _ in range(count)))


def sequential_sectors(bs: int, disk_sectors: int) -> "array[int]":
    """Every ``bs`` block of the disk in order (the IO sequence cycles over it)."""
    nsec = bs // SECTOR_SIZE
    return array("q", range(0, (disk_sectors // nsec) * nsec, nsec))


def op_mix(count: int, read_fraction: float, seed: int) -> bytes:
    """``count`` operations, Op.READ with probability ``read_fraction``, else Op.WRITE."""
    if read_fraction >= 1.0:
        return bytes([Op.READ]) * count
    if read_fraction <= 0.0:
        return bytes([Op.WRITE]) * count
    rnd = random.Random(seed)
    return bytes(Op.READ if rnd.random() < read_fraction else Op.WRITE for _ in range(count))
