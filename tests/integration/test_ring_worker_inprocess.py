"""The ring worker (gblk.engine.ring.RingWorker), in this process, on the simulated host.

No daemon, no XenStore: a ``Dataplane`` is built the way ``gblk.device.device`` builds
one (the real grant table, event-channel handle, threadpool, control pool and a raw
image file as the store) and started on a ring that a simulated blkfront queue
(``gblk.sim.guest.ring.FrontQueue``) set up in a simulated guest's memory
(``gblk.sim.hypervisor.memory.GuestMemory``). The test plays the guest: it grants pages, writes
requests into the ring with ``gblk.blkif.abi``, pushes and notifies, and looks only at
what a guest can see: the responses in the ring (id, operation, status, in ring
order), its own pages, and the image file (which stands for the disk).

Slow IO comes from the test-only fault store (``gblk.storage.fault``: a RawStore of
the same file whose IO waits while a rule in ``<image>.faults`` says so), so a test
can hold one request in the store and look at what the ring does meanwhile.

Every test runs on all three page paths (persistent grants, a grant map per request,
grant copy) and checks at the end that the backend let go of every guest page.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import gevent
import pytest
from gevent.threadpool import ThreadPool

from gblk.blkif.abi import X86_64, Request, Segment, pack_indirect_segments
from gblk.blkif.const import (
    PAGE_SIZE,
    SECTOR_SIZE,
    SEGS_PER_INDIRECT_FRAME,
    Op,
    Status,
)
from gblk.blkif.ring import REQ_EVENT, RSP_PROD
from gblk.blkif.validate import DiskLimits
from gblk.engine import pages as page_paths
from gblk.engine.control import ControlPool
from gblk.engine.dataplane import Dataplane
from gblk.engine.handles import EventChannels
from gblk.engine.iopool import IOPool
from gblk.engine.stats import DeviceStats
from gblk.sim.hypervisor.evtchn import SimEventChannel
from gblk.sim.guest.ring import FrontQueue, Part
from gblk.sim.hypervisor.memory import GuestMemory
from gblk.sim.hypervisor.xenhost import SimXenHost
from gblk.storage import open_store
from gblk.storage import fault as faultmod
from gblk.storage.base import Store
from gblk.xen import barrier

ABI = X86_64
GUEST = 3
DEVID = 51712
GUEST_PAGES = 1024
GRANT_ENTRIES = 4096
DISK_BYTES = 8 << 20
DISK_SECTORS = DISK_BYTES // SECTOR_SIZE
#: what the disk offers for INDIRECT (more than one descriptor page's 512)
MAX_INDIRECT = 600
#: a hang guard for anything the ring must do, not a performance assertion
DEADLINE = 30.0
#: how long a test looks for something that must NOT happen (an IO a barrier holds back)
SETTLE = 0.4
#: a fault-store delay long enough never to end by itself during a test
STALL = 120.0
#: bytes the guest leaves in its pages; a read must overwrite exactly its segments
POISON = 0xEE
PATHS = [page_paths.PERSISTENT, page_paths.MAP, page_paths.COPY]

OKAY = int(Status.OKAY)
ERROR = int(Status.ERROR)
EOPNOTSUPP = int(Status.EOPNOTSUPP)


def image_bytes(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def wait_until(cond: Callable[[], bool], timeout: float = DEADLINE, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or cond}")
        gevent.sleep(0.005)


class Page:
    """One guest page granted to the backend."""

    def __init__(self, rig: "Rig", frame: int, gref: int) -> None:
        self.rig = rig
        self.frame = frame
        self.gref = gref

    @property
    def view(self) -> memoryview:
        return self.rig.memory.page(self.frame)

    def fill(self, data: bytes) -> None:
        assert len(data) == PAGE_SIZE
        self.view[:] = data

    def bytes(self) -> bytes:
        return bytes(self.view)


#: one segment of a request: (page, first_sect, last_sect)
Seg = Tuple[Page, int, int]


def seg_len(s: Seg) -> int:
    return (s[2] - s[1] + 1) * SECTOR_SIZE


def seg_data(s: Seg) -> bytes:
    page, first, last = s
    return page.bytes()[first * SECTOR_SIZE:(last + 1) * SECTOR_SIZE]


class Rig:
    """A simulated guest with one blkfront queue, and the real dataplane serving it.

    Built like ``Device._connect`` builds a connection: the backend's grant table and
    event channels come from ``SimXenHost`` (domain 0), the threadpool is shared through
    an ``IOPool``, ring maps and unmaps go through a ``ControlPool`` and the store is a
    real file. The guest side is a ``FrontQueue`` whose response greenlet records each
    response it takes, in the order it takes them.
    """

    def __init__(self, tmp_path: Path, path: str, store: Store,
                 max_indirect: int = MAX_INDIRECT) -> None:
        self.dir = str(tmp_path / "host")
        os.makedirs(self.dir, exist_ok=True)
        self.path = path
        self.store = store
        self.memory = GuestMemory.create(self.dir, GUEST, GUEST_PAGES, grant_entries=GRANT_ENTRIES)
        self.host = SimXenHost(self.dir, 0)
        self.gnttab = self.host.open_grant_table()
        self.events = EventChannels(self.host.open_event_channel)
        self.threads = ThreadPool(8)
        self.control = ControlPool(2, DEADLINE)
        self.guest_evtchn = SimEventChannel(self.dir, GUEST)
        #: (id, status) of every response, in the order the guest took them
        self.answers: List[Tuple[int, int]] = []
        self.violations: List[str] = []
        self.queue = FrontQueue(0, self.memory, 0, ABI, 0, self.guest_evtchn, barrier.fence,
                                self._on_response, self.violations.append)
        self.queue.start()
        self.pages: List[Page] = []
        #: every request put on the ring: (ring index, id, expected response op)
        self.sent: List[Tuple[int, int, int]] = []
        self._next_id = 0x5EED_0000_0000_0000
        self.guest_log: List[str] = []
        self.stats = DeviceStats(GUEST, DEVID, "vbd")
        self.limits = DiskLimits(sectors=store.size() // SECTOR_SIZE, barrier=True, flush=True,
                                 discard=False, max_indirect_segments=max_indirect)
        self.dp: Optional[Dataplane] = Dataplane(
            host=self.host, gnttab=self.gnttab, store=store, domid=GUEST, abi=ABI,
            limits=self.limits, path=path, pool=IOPool(self.threads), control=self.control,
            device_stats=self.stats,
            log=logging.LoggerAdapter(logging.getLogger("gblk.test.ring"), {}),
            guest_log=self.guest_log.append, max_persistent_grants=1056,
            persistent_grant_idle=60.0, events=self.events,
        )
        self.dp.start([(tuple(self.queue.ring_refs), self.queue.port)])
        self._closed = False

    def _on_response(self, part: Part, status: int) -> None:
        self.answers.append((part.id, status))

    # -- guest memory -------------------------------------------------------------
    def alloc(self, n: int, to_disk: bool, fill: Optional[bytes] = None) -> List[Page]:
        """``n`` granted pages. Pages the backend only reads (a WRITE's data, indirect
        descriptors) are granted read-only, as Linux's blkfront does, except on the
        persistent path, whose pool is granted read-write."""
        readonly = to_disk and self.path != page_paths.PERSISTENT
        out = []
        for i in range(n):
            frame = self.memory.alloc_page()
            p = Page(self, frame, self.memory.grant(frame, 0, readonly=readonly))
            p.fill(fill[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] if fill is not None
                   else bytes([POISON]) * PAGE_SIZE)
            out.append(p)
        self.pages.extend(out)
        return out

    # -- requests ------------------------------------------------------------------
    def new_id(self) -> int:
        self._next_id += 0x1_0000_0001
        return self._next_id

    def rw(self, op: int, sector: int, segs: Sequence[Seg], nr_segments: Optional[int] = None,
           rid: Optional[int] = None) -> Request:
        return Request(op, self.new_id() if rid is None else rid,
                       nr_segments=len(segs) if nr_segments is None else nr_segments,
                       sector_number=sector,
                       segments=tuple(Segment(p.gref, f, lst) for p, f, lst in segs))

    def indirect(self, indirect_op: int, sector: int, segs: Sequence[Seg],
                 nr_segments: Optional[int] = None,
                 descriptors: Optional[List[Page]] = None) -> Tuple[Request, List[Page]]:
        """An INDIRECT request whose descriptors lie in pages the guest grants."""
        raw = pack_indirect_segments(tuple(Segment(p.gref, f, lst) for p, f, lst in segs))
        npages = max(1, -(-len(segs) // SEGS_PER_INDIRECT_FRAME))
        if descriptors is None:
            descriptors = self.alloc(npages, to_disk=True)
        for i, d in enumerate(descriptors):
            chunk = raw[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            d.fill(chunk.ljust(PAGE_SIZE, b"\0"))
        req = Request(Op.INDIRECT, self.new_id(),
                      nr_segments=len(segs) if nr_segments is None else nr_segments,
                      sector_number=sector, indirect_op=indirect_op,
                      indirect_grefs=tuple(d.gref for d in descriptors))
        return req, descriptors

    def submit(self, reqs: Sequence[Tuple[Request, int]]) -> List[int]:
        """Put every request on the ring, then publish them all at once (one push, one
        notification if the ring asks for it). ``reqs``: (request, the operation its
        response must carry). Returns their ring indices."""
        idx = []
        for req, expect in reqs:
            part = Part(req.id, 0, "raw", req.operation, expect)
            i = self.queue.put(ABI.pack_request(req), part)
            self.sent.append((i, req.id, expect))
            idx.append(i)
        self.queue.push()
        return idx

    # -- what the guest sees -----------------------------------------------------
    def rsp_prod(self) -> int:
        return int(self.queue.ring.idx[RSP_PROD])

    def taken(self) -> int:
        """How many requests the backend has consumed, as far as the guest can tell: an
        idle backend asks to be woken by the next one (req_event = req_cons + 1)."""
        return int(self.queue.ring.idx[REQ_EVENT]) - 1

    def wait_answers(self, n: int) -> None:
        wait_until(lambda: len(self.answers) >= n, what=f"{n} responses "
                   f"(have {len(self.answers)}, rsp_prod {self.rsp_prod()})")

    def ring_response(self, index: int) -> Tuple[int, int, int]:
        """(id, op, status) of the response in the slot of ring index ``index``."""
        ring = self.queue.ring
        off = ring.offset(index)
        return ABI.parse_response(bytes(ring.buf[off:off + ABI.rsp_size]))

    def check_answers(self, expect_status: Sequence[int]) -> None:
        """Every request sent so far answered exactly once, in ring order, with its own
        id, the right operation and ``expect_status`` (one per request sent)."""
        assert len(expect_status) == len(self.sent)
        self.wait_answers(len(self.sent))
        gevent.sleep(0.05)  # a duplicate or stray response would show by now
        assert self.violations == []
        assert self.queue.outstanding == {}
        assert self.rsp_prod() == len(self.sent)
        assert [rid for rid, _ in self.answers] == [rid for _, rid, _ in self.sent]
        assert [s for _, s in self.answers] == list(expect_status)
        # the slots themselves, in ring order (nothing was put behind these requests)
        got = [self.ring_response(i) for i, _, _ in self.sent]
        want = [(rid, op & 0xFF, st) for (_, rid, op), st in zip(self.sent, expect_status)]
        assert got == want

    # -- the end -------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the dataplane and check the backend let go of every guest page."""
        if self.dp is not None:
            dp, self.dp = self.dp, None
            dp.stop(DEADLINE)
            assert self.stats.rings[0].halted is False
        assert self.gnttab.active_mappings == 0, "the backend still maps guest pages"
        for p in self.pages:
            assert self.memory.end_access(p.gref), f"gref {p.gref} still mapped"
        self.pages = []

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.dp is not None:
                self.dp.stop(5.0)
                self.dp = None
        finally:
            self.queue.release()
            self.events.close()
            self.gnttab.close()
            self.store.close()
            self.memory.destroy()
            self.threads.kill()
            self.control.close()


class Image:
    """The raw image file the disk serves, read back through its own descriptor."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = str(path)
        path.write_bytes(data)
        self.data = data

    def read(self, sector: int, nbytes: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, nbytes, sector * SECTOR_SIZE)
        finally:
            os.close(fd)

    def original(self, sector: int, nbytes: int) -> bytes:
        off = sector * SECTOR_SIZE
        return self.data[off:off + nbytes]

    # the fault store's control file (gblk.storage.fault), replaced atomically
    def faults(self, rules: List[dict]) -> None:
        tmp = self.path + ".faults.tmp"
        with open(tmp, "w") as f:
            json.dump(rules, f)
        os.replace(tmp, self.path + ".faults")


@pytest.fixture
def image(tmp_path: Path) -> Image:
    return Image(tmp_path / "disk.img", image_bytes(DISK_BYTES))


@pytest.fixture
def make_rig(tmp_path: Path, image: Image, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Rig]]:
    rigs: List[Rig] = []

    def make(path: str, fmt: str = "raw") -> Rig:
        if fmt == "fault":
            monkeypatch.setenv(faultmod.ENV, "1")
        rig = Rig(tmp_path, path, open_store(fmt, image.path, False))
        rigs.append(rig)
        return rig

    try:
        yield make
    finally:
        if os.path.exists(image.path + ".faults"):
            os.unlink(image.path + ".faults")  # a stalled IO ends
        for r in rigs:
            r.close()


def expect_read(rig: Rig, sector: int, segs: Sequence[Seg], source: Callable[[int, int], bytes]) -> None:
    """The read's data is in exactly its segments' bytes of the guest's pages."""
    pos = sector
    for page, first, last in segs:
        n = (last - first + 1) * SECTOR_SIZE
        got = page.bytes()
        assert got[first * SECTOR_SIZE:(last + 1) * SECTOR_SIZE] == source(pos, n)
        assert got[:first * SECTOR_SIZE] == bytes([POISON]) * (first * SECTOR_SIZE)
        assert got[(last + 1) * SECTOR_SIZE:] == bytes([POISON]) * ((7 - last) * SECTOR_SIZE)
        pos += n // SECTOR_SIZE


def expect_written(image: Image, sector: int, segs: Sequence[Seg]) -> None:
    data = b"".join(seg_data(s) for s in segs)
    assert image.read(sector, len(data)) == data


def full(pages: Sequence[Page]) -> List[Seg]:
    return [(p, 0, 7) for p in pages]


# -- 1. ordering ------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_batch_is_answered_once_each_in_ring_order(make_rig: Callable[..., Rig], image: Image,
                                                   path: str) -> None:
    """A batch of 26 requests published at once (reads, writes of 1 to 11 segments with
    partial pages, a flush, and requests the backend refuses at once on the hub) is
    answered exactly once each, in ring order, each with its id, its operation and the
    right status; written data lands in the file, read data in the guest's pages and
    nowhere else in them."""
    rig = make_rig(path)
    reqs: List[Tuple[Request, int]] = []
    expect: List[int] = []
    writes: List[Tuple[int, List[Seg]]] = []
    reads: List[Tuple[int, List[Seg]]] = []
    rng = random.Random(7)

    def write(sector: int, segs: List[Seg]) -> None:
        reqs.append((rig.rw(Op.WRITE, sector, segs), Op.WRITE))
        expect.append(OKAY)
        writes.append((sector, segs))

    def read(sector: int, segs: List[Seg]) -> None:
        reqs.append((rig.rw(Op.READ, sector, segs), Op.READ))
        expect.append(OKAY)
        reads.append((sector, segs))

    def refused(req: Request, op: int, status: int = ERROR) -> None:
        reqs.append((req, op))
        expect.append(status)

    # every data request has a region of its own (the order of IO between requests
    # in flight together is not promised; the order of their answers is)
    sector = 0
    for i in range(20):
        nseg = 1 + (i * 5) % 11
        if i % 2 == 0:
            pages = rig.alloc(nseg, to_disk=True, fill=image_bytes(nseg * PAGE_SIZE, seed=100 + i))
        else:
            pages = rig.alloc(nseg, to_disk=False)
        segs: List[Seg] = []
        for p in pages:
            first = rng.randrange(0, 8) if i % 3 == 0 else 0
            segs.append((p, first, rng.randrange(first, 8) if i % 3 == 0 else 7))
        (write if i % 2 == 0 else read)(sector, segs)
        sector += 128
        if i == 2:
            refused(rig.rw(Op.READ, DISK_SECTORS - 4, full(rig.alloc(1, False))), Op.READ)  # past the end
        if i == 5:
            refused(Request(99, rig.new_id()), 99, EOPNOTSUPP)  # no such operation
        if i == 8:
            reqs.append((Request(Op.FLUSH_DISKCACHE, rig.new_id()), Op.FLUSH_DISKCACHE))
            expect.append(OKAY)
        if i == 11:
            refused(rig.rw(Op.READ, 0, [], nr_segments=0), Op.READ)  # no segments
        if i == 14:
            p = rig.alloc(12, False)
            refused(rig.rw(Op.READ, 0, full(p[:11]), nr_segments=12), Op.READ)  # 12 > 11
        if i == 17:
            p = rig.alloc(1, True, fill=image_bytes(PAGE_SIZE, 3))
            refused(rig.rw(Op.WRITE, 0, [(p[0], 5, 2)]), Op.WRITE)  # first_sect > last_sect
    assert len(reqs) == 26 <= rig.queue.ring.slots

    rig.submit(reqs)
    rig.check_answers(expect)
    for s, segs in writes:
        expect_written(image, s, segs)
    for s, segs in reads:
        expect_read(rig, s, segs, image.original)
    # the refused write wrote nothing; the rest of the disk is as it was
    assert image.read(20 * 128, DISK_BYTES - 20 * 128 * SECTOR_SIZE) == \
        image.original(20 * 128, DISK_BYTES - 20 * 128 * SECTOR_SIZE)
    rig.shutdown()


@pytest.mark.parametrize("path", PATHS)
def test_slow_request_holds_back_later_answers_not_their_io(make_rig: Callable[..., Rig],
                                                            image: Image, path: str) -> None:
    """While the oldest request is held in the store, the requests behind it are
    carried out (their data is in the file) and one refused at once is decided, yet
    no response is published: a response may only take the slot of the oldest
    unanswered request. Once the slow one completes, all are published, in ring order."""
    rig = make_rig(path, fmt="fault")
    image.faults([{"op": "read", "sectors": [0, 8], "delay": STALL}])
    slow_pages = rig.alloc(1, to_disk=False)
    rig.submit([(rig.rw(Op.READ, 0, full(slow_pages)), Op.READ)])
    wait_until(lambda: rig.taken() == 1, what="the slow read to be taken")

    later: List[Tuple[Request, int]] = []
    expect = [OKAY]
    writes = []
    for i in range(8):
        pages = rig.alloc(2, to_disk=True, fill=image_bytes(2 * PAGE_SIZE, seed=200 + i))
        s = 64 + 32 * i
        later.append((rig.rw(Op.WRITE, s, full(pages)), Op.WRITE))
        expect.append(OKAY)
        writes.append((s, full(pages)))
        if i == 3:  # refused on the hub, long before the slow read ends
            later.append((rig.rw(Op.WRITE, DISK_SECTORS, full(rig.alloc(1, True))), Op.WRITE))
            expect.append(ERROR)
    rig.submit(later)
    # the later writes are done: their data is in the file...
    wait_until(lambda: all(image.read(s, 2 * PAGE_SIZE) == b"".join(seg_data(x) for x in segs)
                           for s, segs in writes), what="the later writes to land")
    gevent.sleep(SETTLE)
    # ...but nothing is answered while the oldest request is in flight
    assert rig.rsp_prod() == 0
    assert rig.answers == []

    image.faults([])
    rig.check_answers(expect)
    expect_read(rig, 0, full(slow_pages), image.original)
    rig.shutdown()


# -- 2. barrier -------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_barrier_waits_for_writes_before_it_and_holds_back_what_follows(
        make_rig: Callable[..., Rig], image: Image, path: str) -> None:
    """W1 (held in the store) and W2 run; a WRITE_BARRIER with data behind them, then
    W3 and a read R4 of the barrier's blocks. While W1 runs, neither the barrier's data
    nor W3 reaches the disk although W2 did. Once W1 is done the barrier runs, and
    while its flush is held, still no barrier data and no W3 (the barrier flushes
    first), with W1 and W2 answered. Then everything completes: all OKAY, in ring
    order, and R4 reads the barrier's data (it was issued after the barrier)."""
    rig = make_rig(path, fmt="fault")
    w1 = full(rig.alloc(2, True, fill=image_bytes(2 * PAGE_SIZE, seed=301)))
    w2 = full(rig.alloc(2, True, fill=image_bytes(2 * PAGE_SIZE, seed=302)))
    bw = full(rig.alloc(2, True, fill=image_bytes(2 * PAGE_SIZE, seed=303)))
    w3 = full(rig.alloc(2, True, fill=image_bytes(2 * PAGE_SIZE, seed=304)))
    r4 = full(rig.alloc(2, False))
    s1, s2, sb, s3 = 0, 64, 128, 192

    def landed(sector: int, segs: List[Seg]) -> bool:
        data = b"".join(seg_data(s) for s in segs)
        return image.read(sector, len(data)) == data

    image.faults([{"op": "write", "sectors": [s1, s1 + 16], "delay": STALL}])
    rig.submit([(rig.rw(Op.WRITE, s1, w1), Op.WRITE)])
    wait_until(lambda: rig.taken() == 1, what="W1 to be taken")
    rig.submit([
        (rig.rw(Op.WRITE, s2, w2), Op.WRITE),
        (rig.rw(Op.WRITE_BARRIER, sb, bw), Op.WRITE_BARRIER),
        (rig.rw(Op.WRITE, s3, w3), Op.WRITE),
        (rig.rw(Op.READ, sb, r4), Op.READ),
    ])
    # phase 1: W1 held in the store, W2 (before the barrier) runs beside it
    wait_until(lambda: landed(s2, w2), what="W2 to land")
    gevent.sleep(SETTLE)
    assert not landed(s1, w1)
    assert not landed(sb, bw), "the barrier's data was written before W1 completed"
    assert not landed(s3, w3), "a write behind the barrier ran before W1 completed"
    assert rig.rsp_prod() == 0

    # phase 2: W1 goes; the barrier's flush is held
    image.faults([{"op": "flush", "delay": STALL}])
    wait_until(lambda: len(rig.answers) == 2, what="W1 and W2 to be answered")
    assert landed(s1, w1)
    gevent.sleep(SETTLE)
    assert rig.rsp_prod() == 2
    assert not landed(sb, bw), "the barrier wrote its data before flushing"
    assert not landed(s3, w3), "a write behind the barrier ran before the barrier completed"

    # phase 3: everything completes
    image.faults([])
    rig.check_answers([OKAY] * 5)
    assert landed(sb, bw) and landed(s3, w3)
    expect_read(rig, sb, r4, lambda s, n: b"".join(seg_data(x) for x in bw)[
        (s - sb) * SECTOR_SIZE:(s - sb) * SECTOR_SIZE + n])
    rig.shutdown()


@pytest.mark.parametrize("path", PATHS)
def test_dataless_barrier_after_running_writes(make_rig: Callable[..., Rig], image: Image,
                                               path: str) -> None:
    """A WRITE_BARRIER without segments behind a held write is answered OKAY after it,
    and the write behind the barrier reaches the disk only after the held one did."""
    rig = make_rig(path, fmt="fault")
    w1 = full(rig.alloc(1, True, fill=image_bytes(PAGE_SIZE, seed=401)))
    w2 = full(rig.alloc(1, True, fill=image_bytes(PAGE_SIZE, seed=402)))
    image.faults([{"op": "write", "sectors": [0, 8], "delay": STALL}])
    rig.submit([(rig.rw(Op.WRITE, 0, w1), Op.WRITE),
                (Request(Op.WRITE_BARRIER, rig.new_id()), Op.WRITE_BARRIER),
                (rig.rw(Op.WRITE, 512, w2), Op.WRITE)])
    # (a ring holding requests behind a barrier does not re-arm req_event, so the guest
    # cannot see them taken: give a wrong engine the time to write W2)
    gevent.sleep(SETTLE)
    assert image.read(512, PAGE_SIZE) == image.original(512, PAGE_SIZE)
    assert rig.rsp_prod() == 0
    image.faults([])
    rig.check_answers([OKAY] * 3)
    expect_written(image, 0, w1)
    expect_written(image, 512, w2)
    rig.shutdown()


# -- 3. INDIRECT ------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_indirect_read_and_write_move_the_right_bytes(make_rig: Callable[..., Rig],
                                                      image: Image, path: str) -> None:
    """INDIRECT WRITE of 20 segments (partial first and last page) and INDIRECT READ of
    520 segments (two descriptor pages), then a READ back of the written blocks and the
    same big READ again (on the persistent path: descriptors and pages now cached).
    Each is answered OKAY with its indirect_op; the bytes are where they belong."""
    rig = make_rig(path)
    wdata = rig.alloc(20, True, fill=image_bytes(20 * PAGE_SIZE, seed=501))
    wsegs = full(wdata)
    wsegs[0] = (wdata[0], 3, 7)
    wsegs[-1] = (wdata[-1], 0, 4)
    ws = 4096
    wreq, _ = rig.indirect(Op.WRITE, ws, wsegs)
    big = rig.alloc(520, False)
    bs = 8192
    breq, bdesc = rig.indirect(Op.READ, bs, full(big))
    assert len(bdesc) == 2
    rig.submit([(wreq, Op.WRITE), (breq, Op.READ)])
    rig.check_answers([OKAY, OKAY])
    expect_written(image, ws, wsegs)
    expect_read(rig, bs, full(big), image.original)

    # read back what the indirect write wrote, in 20 fresh pages with odd segments
    back = rig.alloc(20, False)
    bsegs = [(p, 0, 7) for p in back]
    bsegs[0] = (back[0], 3, 7)
    bsegs[-1] = (back[-1], 0, 4)
    rreq, _ = rig.indirect(Op.READ, ws, bsegs)
    for p in big:
        p.fill(bytes([POISON]) * PAGE_SIZE)
    breq2, _ = rig.indirect(Op.READ, bs, full(big), descriptors=bdesc)
    rig.submit([(rreq, Op.READ), (breq2, Op.READ)])
    rig.check_answers([OKAY] * 4)
    written = b"".join(seg_data(s) for s in wsegs)
    expect_read(rig, ws, bsegs, lambda s, n: written[(s - ws) * SECTOR_SIZE:(s - ws) * SECTOR_SIZE + n])
    expect_read(rig, bs, full(big), image.original)
    rig.shutdown()


@pytest.mark.parametrize("path", PATHS)
def test_bad_indirect_requests_are_refused_and_the_ring_serves_on(
        make_rig: Callable[..., Rig], image: Image, path: str) -> None:
    """INDIRECT requests with an indirect_op that carries no data (FLUSH, BARRIER,
    DISCARD, INDIRECT itself, an unknown one), with 0 segments, more segments than the
    disk offers (601 > 600, and 65535), or a bad descriptor (last_sect 8) are each
    answered ERROR with their indirect_op, and write nothing; the requests around
    them, and a batch published afterwards, are served normally."""
    rig = make_rig(path)
    data = rig.alloc(12, True, fill=image_bytes(12 * PAGE_SIZE, seed=601))
    many = rig.alloc(601, False)
    reqs: List[Tuple[Request, int]] = []
    expect: List[int] = []

    def add(req: Request, op: int, status: int) -> None:
        reqs.append((req, op))
        expect.append(status)

    before = rig.alloc(3, False)
    add(rig.rw(Op.READ, 40, full(before)), Op.READ, OKAY)
    for bad_op in (Op.FLUSH_DISKCACHE, Op.WRITE_BARRIER, Op.DISCARD, Op.INDIRECT, 99, 0xFF):
        add(rig.indirect(bad_op, 1024, full(data))[0], bad_op, ERROR)
    add(rig.indirect(Op.WRITE, 1024, full(data), nr_segments=0)[0], Op.WRITE, ERROR)
    add(rig.indirect(Op.READ, 2048, full(many))[0], Op.READ, ERROR)  # 601 segments
    add(rig.indirect(Op.WRITE, 1024, full(data), nr_segments=65535)[0], Op.WRITE, ERROR)
    bad_desc = full(data)
    bad_desc[5] = (data[5], 0, 8)
    add(rig.indirect(Op.WRITE, 1024, bad_desc)[0], Op.WRITE, ERROR)
    past_end = rig.indirect(Op.WRITE, DISK_SECTORS - 8, full(data))[0]
    add(past_end, Op.WRITE, ERROR)
    good_w, _ = rig.indirect(Op.WRITE, 3072, full(data))
    add(good_w, Op.WRITE, OKAY)
    rig.submit(reqs)
    rig.check_answers(expect)
    expect_read(rig, 40, full(before), image.original)
    expect_written(image, 3072, full(data))
    # none of the refused writes wrote anything
    assert image.read(1024, 12 * PAGE_SIZE) == image.original(1024, 12 * PAGE_SIZE)
    assert image.read(DISK_SECTORS - 8, PAGE_SIZE) == image.original(DISK_SECTORS - 8, PAGE_SIZE)
    assert len(rig.guest_log) >= 11  # each refusal is logged (rate-limited) for the operator

    # the ring goes on serving: a plain read and an indirect read of 12 segments
    after = rig.alloc(2, False)
    ind = rig.alloc(12, False)
    more = [(rig.rw(Op.READ, 3072, full(after)), Op.READ),
            (rig.indirect(Op.READ, 3072, full(ind))[0], Op.READ)]
    rig.submit(more)
    rig.check_answers(expect + [OKAY, OKAY])
    written = b"".join(seg_data(s) for s in full(data))
    expect_read(rig, 3072, full(after), lambda s, n: written[(s - 3072) * SECTOR_SIZE:][:n])
    expect_read(rig, 3072, full(ind), lambda s, n: written[(s - 3072) * SECTOR_SIZE:][:n])
    rig.shutdown()
