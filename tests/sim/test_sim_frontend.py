"""The simulated guest's blkfront (gblk.sim.guest.frontend) against a small in-test backend.

gblk's real backend has tests of its own on top of this frontend; here the other end
is ``FakeBackend``: just enough blkif (dom0 XenStore nodes, ring, grant maps, event
channel) to check that the frontend negotiates, submits, verifies and follows the
state machine like Linux's xen-blkfront, and that it notices a misbehaving backend.
Everything runs for real: xenstored is a subprocess, guest memory is shared files,
grants are mmaps, event channels are sockets.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional

import gevent
import pytest
from gevent.socket import wait_read

from gblk.blkif import xenbus as xb
from gblk.blkif.abi import X86_32, X86_64, Request, Segment, parse_indirect_segments
from gblk.blkif.const import PAGE_SIZE, SECTOR_SIZE, Op, Status, XenbusState
from gblk.blkif.ring import BackRing
from gblk.errors import GrantError, RingError
from gblk.sim.hypervisor.evtchn import SimEventChannel
from gblk.sim.guest.frontend import (
    Frontend,
    FrontendOptions,
    FrontendTimeout,
    IOFailed,
    NotConnected,
    segments_for,
)
from gblk.sim.hypervisor.gnttab import SimGrantTable
from gblk.sim.harness.host import Guest, SimHost
from gblk.xen.barrier import fence

MiB = 1 << 20
DISK = 4 * MiB


class FakeBackend:
    """A minimal blkif backend in the test process, acting as dom0 (not gblk's).

    ``offer`` are the nodes written before InitWait; ``features`` the connect nodes.
    Misbehaviours for the frontend's checks: ``corrupt_reads``, ``duplicate``,
    ``pad_garbage``, ``indirect_rsp_op`` (what an INDIRECT response carries).
    """

    def __init__(self, host: SimHost, domid: int, devid: int = 51712,
                 offer: Optional[Dict[str, str]] = None,
                 features: Optional[Dict[str, str]] = None, size: int = DISK) -> None:
        self.host = host
        self.xs = host.xs
        assert self.xs is not None
        self.domid = domid
        disk = host.toolstack.find_disk(domid, devid)
        self.be = disk.backend_path
        self.fe = disk.frontend_path
        self.data = bytearray(size)
        self.offer = {xb.MAX_RING_PAGE_ORDER_KEY: "4", xb.MULTI_QUEUE_MAX_QUEUES: "4",
                      xb.FEATURE_MAX_INDIRECT_SEGMENTS: "256", xb.FEATURE_PERSISTENT: "1",
                      xb.HOTPLUG_STATUS: "connected"}
        self.offer.update(offer or {})
        self.features = {xb.FEATURE_FLUSH_CACHE: "1", xb.FEATURE_BARRIER: "1",
                         xb.FEATURE_DISCARD: "1", xb.DISCARD_GRANULARITY: "4096",
                         xb.DISCARD_ALIGNMENT: "0", xb.DISCARD_SECURE: "1",
                         xb.FEATURE_PERSISTENT: self.offer.get(xb.FEATURE_PERSISTENT, "0")}
        self.features.update(features or {})
        self.gnt = SimGrantTable(host.dir, 0)
        self.rings: List[Any] = []
        self.params: Optional[xb.FrontendParams] = None
        self.connects = 0
        self.seen: List[Request] = []
        self.corrupt_reads = False
        self.duplicate = False
        self.pad_garbage = False
        self.indirect_rsp_op: Optional[int] = None  # None: indirect_op (Linux)
        self.hold = False  # consume requests but do not answer
        self.held: List[Any] = []
        self.errors: List[str] = []
        self._group = gevent.pool.Group()
        self._main = gevent.spawn(self._run)

    # -- control plane -------------------------------------------------------
    def _w(self, key: str, value: str) -> None:
        self.xs.write(f"{self.be}/{key}", value)

    def state(self) -> Optional[int]:
        v = self.xs.read(f"{self.be}/state")
        return None if v is None else int(v)

    def _fe_state(self) -> Optional[int]:
        v = self.xs.read(f"{self.fe}/state")
        return None if v is None else int(v)

    def _run(self) -> None:
        for k, v in self.offer.items():
            self._w(k, v)
        self._w("state", "2")
        sub = self.xs.watch([f"{self.fe}/state", f"{self.be}/state"])
        try:
            while True:
                sub.get(timeout=None)
                be, fe = self.state(), self._fe_state()
                if be is None:
                    self._disconnect()
                    return
                if fe in (3, 4) and be in (1, 2):
                    self._connect()
                elif fe == 5 and be == 4:
                    self._w("state", "5")
                elif fe in (6, None, 0) and be not in (6,) and be != 1:
                    self._disconnect()
                    self._w("state", "6")
                elif fe == 1 and be == 6 and self.xs.read(f"{self.be}/online") == "1":
                    for k, v in self.offer.items():
                        self._w(k, v)
                    self._w("state", "2")
        finally:
            sub.close()

    def _connect(self) -> None:
        order = int(self.offer[xb.MAX_RING_PAGE_ORDER_KEY])
        offer = xb.Offer(order, int(self.offer[xb.MULTI_QUEUE_MAX_QUEUES]),
                         self.offer.get(xb.FEATURE_PERSISTENT) == "1")
        self.params = p = xb.parse_frontend(lambda k: self.xs.read(f"{self.fe}/{k}"), offer)
        for q in p.queues:
            m = self.gnt.map_grant_refs(self.domid, q.ring_refs, True)
            buf = m.contiguous if getattr(m, "contiguous", None) is not None else m._views[0]
            ring = BackRing(buf, p.abi.req_size, p.abi.rsp_size, fence)
            ev = SimEventChannel(self.host.dir, 0)
            port = ev.bind_interdomain(self.domid, q.event_channel)
            self.rings.append((m, ring, ev, port, buf))
        self.xs.write(f"{self.be}/sectors", str(len(self.data) // SECTOR_SIZE))
        self.xs.write(f"{self.be}/sector-size", "512")
        self.xs.write(f"{self.be}/info", "0")
        for k, v in self.features.items():
            self._w(k, v)
        self.connects += 1
        self._w("state", "4")
        for r in self.rings:
            self._group.spawn(self._serve, p.abi, *r[1:4])

    def _disconnect(self) -> None:
        self._group.kill()
        for m, ring, ev, _port, buf in self.rings:
            ring.release()
            buf.release()
            m.unmap()
            ev.close()
        self.rings = []

    def stop(self) -> None:
        self._main.kill()
        self._disconnect()
        self.gnt.close()

    # -- data plane ------------------------------------------------------------
    def _serve(self, abi: Any, ring: BackRing, ev: SimEventChannel, port: int) -> None:
        while True:
            wait_read(ev.fileno())
            p = ev.pending()
            if p is None:
                continue
            while True:
                try:
                    raws = ring.take_requests(ring.slots)
                except RingError as e:
                    self.errors.append(str(e))
                    return
                for raw in raws:
                    req = abi.parse_request(raw)
                    self.seen.append(req)
                    if self.hold:
                        self.held.append((abi, ring, ev, port, req))
                        continue
                    self._answer(abi, ring, req, self._do(req))
                if ring.push_responses():
                    ev.notify(port)
                if not ring.final_check_for_requests():
                    break
            ev.unmask(p)

    def release_held(self) -> None:
        held, self.held = self.held, []
        self.hold = False
        for abi, ring, ev, port, req in held:
            self._answer(abi, ring, req, self._do(req))
            if ring.push_responses():
                ev.notify(port)

    def _answer(self, abi: Any, ring: BackRing, req: Request, status: int) -> None:
        op = req.operation
        if op == Op.INDIRECT:
            op = req.indirect_op if self.indirect_rsp_op is None else self.indirect_rsp_op
        raw = abi.pack_response(req.id, op, status)
        if self.pad_garbage:
            raw = raw[:9] + b"\xee" + raw[10:]
        ring.put_response(raw)
        if self.duplicate:
            ring.put_response(raw)

    def _do(self, req: Request) -> int:
        op = req.operation
        try:
            if op in (Op.READ, Op.WRITE, Op.FLUSH_DISKCACHE, Op.WRITE_BARRIER):
                return self._rw(op, req.sector_number, req.segments[: req.nr_segments])
            if op == Op.INDIRECT:
                n = (req.nr_segments + 511) // 512
                m = self.gnt.map_grant_refs(self.domid, req.indirect_grefs[:n], False)
                try:
                    segs = parse_indirect_segments(b"".join(bytes(pg) for pg in m.pages),
                                                   req.nr_segments)
                finally:
                    m.unmap()
                return self._rw(req.indirect_op, req.sector_number, segs)
            if op == Op.DISCARD:
                a = req.sector_number * SECTOR_SIZE
                self.data[a:a + req.nr_sectors * SECTOR_SIZE] = bytes(req.nr_sectors * SECTOR_SIZE)
                return Status.OKAY
        except GrantError:
            return Status.ERROR
        return Status.EOPNOTSUPP

    def _rw(self, op: int, sector: int, segs: Any) -> int:
        if not segs:
            return Status.OKAY
        m = self.gnt.map_grant_refs(self.domid, [s.gref for s in segs], op == Op.READ)
        try:
            pos = sector * SECTOR_SIZE
            for s, page in zip(segs, m.pages):
                lo, hi = s.first_sect * SECTOR_SIZE, (s.last_sect + 1) * SECTOR_SIZE
                if op == Op.READ:
                    chunk = bytes(self.data[pos:pos + hi - lo])
                    if self.corrupt_reads:
                        chunk = b"\xff" + chunk[1:]
                    page[lo:hi] = chunk
                else:
                    self.data[pos:pos + hi - lo] = page[lo:hi]
                pos += hi - lo
        finally:
            m.unmap()
        return Status.OKAY


# ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def host():
    with SimHost() as h:
        yield h


@pytest.fixture
def make(host: SimHost):
    """make(options=..., offer=..., features=...) -> (guest, fake backend), connected."""
    made: List[Any] = []

    def _make(options: Optional[FrontendOptions] = None, connect: bool = True,
              offer: Optional[Dict[str, str]] = None,
              features: Optional[Dict[str, str]] = None, **attach: Any):
        g = host.create_guest(size=DISK, options=options or FrontendOptions(initial_zero=True),
                              connect=False, **attach)
        be = FakeBackend(host, g.domid, offer=offer, features=features)
        made.append((g, be))
        if connect:
            g.frontend.connect(timeout=10)
        return g, be

    yield _make
    for g, be in made:
        g.frontend.stop()
        be.stop()
        host.destroy_guest(g)


def until(cond, timeout: float = 10.0) -> bool:
    """Poll ``cond`` on the hub until it holds (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.01)
    return True


def fe_nodes(host: SimHost, g: Guest) -> Dict[str, str]:
    out = {}

    def walk(path: str, rel: str) -> None:
        for name in host.xs.directory(path):
            sub = f"{path}/{name}"
            value = host.xs.read(sub)
            key = f"{rel}{name}"
            if value:
                out[key] = value
            walk(sub, key + "/")

    walk(g.disk.frontend_path, "")
    return out


# ---------------------------------------------------------------------------------
# negotiation
@pytest.mark.parametrize(
    "offer_order,max_order,offer_q,max_q,protocol",
    [
        ("0", 4, "1", 4, "x86_64-abi"),
        ("4", 4, "4", 2, "x86_64-abi"),
        ("2", 1, "8", 4, "x86_32-abi"),
        ("3", 4, "1", 4, None),
    ],
)
def test_negotiation_writes_what_blkfront_writes(make, host, offer_order, max_order, offer_q,
                                                 max_q, protocol):
    """The frontend picks min(offered, own limit) ring order and queues and writes the
    ring nodes exactly as xen-blkfront does (ring-ref for one page, ring-page-order +
    ring-refN otherwise; queue-N/ when several queues; no protocol node = x86_32)."""
    opts = FrontendOptions(protocol=protocol, max_ring_page_order=max_order, max_queues=max_q,
                           initial_zero=True)
    g, be = make(opts, offer={xb.MAX_RING_PAGE_ORDER_KEY: offer_order,
                              xb.MULTI_QUEUE_MAX_QUEUES: offer_q})
    fe = g.frontend
    order = min(int(offer_order), max_order)
    nq = min(int(offer_q), max_q)
    assert fe.ring_page_order == order and len(fe.queues) == nq
    nodes = fe_nodes(host, g)
    assert nodes["state"] == "4"
    if protocol is None:
        assert "protocol" not in nodes
    else:
        assert nodes["protocol"] == protocol
    assert nodes["feature-persistent"] == "1"
    prefixes = [""] if nq == 1 else [f"queue-{i}/" for i in range(nq)]
    if nq == 1:
        assert "multi-queue-num-queues" not in nodes
    else:
        assert nodes["multi-queue-num-queues"] == str(nq)
    for i, pre in enumerate(prefixes):
        q = fe.queues[i]
        assert nodes[pre + "event-channel"] == str(q.port)
        if order == 0:
            assert nodes[pre + "ring-ref"] == str(q.ring_refs[0])
            assert "ring-page-order" not in nodes
        else:
            assert nodes["ring-page-order"] == str(order)
            for k, ref in enumerate(q.ring_refs):
                assert nodes[f"{pre}ring-ref{k}"] == str(ref)
    # the backend read the same thing, and each queue carries IO
    assert be.params is not None
    assert be.params.abi is (X86_32 if protocol != "x86_64-abi" else X86_64)
    for i in range(nq):
        data = os.urandom(8192)
        fe.write(16 * i, data, queue=i)
        assert fe.read(16 * i, 16, queue=i) == data
    assert fe.stats.mismatches == 0 and fe.stats.protocol_violations == 0


def test_features_forced_off(make):
    """Persistent grants, indirect segments and extra queues can each be refused by
    the guest even when the backend offers them; then only BLKIF_MAX_SEGMENTS_PER_REQUEST
    segments go in a request and every grant is ended after its response."""
    opts = FrontendOptions(persistent=False, max_indirect_segments=0, max_queues=1,
                           max_ring_page_order=0, initial_zero=True)
    g, be = make(opts)
    fe = g.frontend
    assert (fe.persistent, fe.max_indirect_segments, len(fe.queues), fe.ring_page_order) == (
        False, 0, 1, 0)
    baseline = fe.grants_in_use()
    data = os.urandom(256 * 1024)
    fe.write(0, data)
    assert fe.read(0, len(data) // SECTOR_SIZE) == data
    assert all(r.operation != Op.INDIRECT and r.nr_segments <= 11 for r in be.seen)
    assert fe.grants_in_use() == baseline  # no grant outlives its request
    assert g.xs.read(f"{g.disk.frontend_path}/feature-persistent") == "0"


def test_persistent_pool_and_indirect(make):
    """With persistent grants and indirect segments, a 1 MiB request is one INDIRECT
    request of 256 segments; the pool's grants stay granted while connected and are
    all ended after close."""
    g, be = make(FrontendOptions(initial_zero=True))
    fe = g.frontend
    assert fe.persistent and fe.max_indirect_segments == 256
    before = fe.grants_in_use()
    data = os.urandom(MiB)
    fe.write(8, data)
    assert fe.read(8, MiB // SECTOR_SIZE) == data
    ind = [r for r in be.seen if r.operation == Op.INDIRECT]
    assert ind and max(r.nr_segments for r in ind) == 256
    assert {r.indirect_op for r in ind} == {Op.READ, Op.WRITE}
    assert fe.grants_in_use() > before  # the pool keeps its grants
    fe.close()
    assert fe.stats.grant_leaks == 0
    assert fe.grants_in_use() == fe.memory.grants_in_use()
    assert fe.grants_in_use() == 0


def test_all_operations_and_segment_layout(make):
    """Every operation a guest issues: unaligned reads/writes (partial first/last
    segments), flush with and without data, barrier, discard (reads back zeros) and
    secure discard; the data is verified byte for byte."""
    g, be = make()
    fe = g.frontend
    data = os.urandom(3 * SECTOR_SIZE)
    fe.write(5, data)  # sectors 5..7: one segment first_sect=5 last_sect=7
    w = [r for r in be.seen if r.operation == Op.WRITE][-1]
    assert [(s.first_sect, s.last_sect) for s in w.segments] == [(5, 7)]
    assert fe.read(5, 3) == data
    fe.write(6, os.urandom(20 * SECTOR_SIZE))  # crosses pages: 6-7, 0-7, 0-7, 0-1
    w = [r for r in be.seen if r.operation == Op.WRITE][-1]
    assert [(s.first_sect, s.last_sect) for s in w.segments] == [(6, 7), (0, 7), (0, 7), (0, 1)]
    fe.flush()
    assert be.seen[-1].operation == Op.FLUSH_DISKCACHE and be.seen[-1].nr_segments == 0
    payload = os.urandom(4096)
    fe.flush(64, payload)
    assert be.seen[-1].operation == Op.FLUSH_DISKCACHE and be.seen[-1].nr_segments == 1
    fe.barrier(72, payload)
    assert be.seen[-1].operation == Op.WRITE_BARRIER
    assert fe.read(64, 16) == payload * 2
    fe.discard(64, 16)
    assert fe.read(64, 16) == bytes(16 * SECTOR_SIZE)
    fe.discard(0, 8, secure=True)
    assert be.seen[-1].operation == Op.DISCARD and be.seen[-1].flag == 1
    assert fe.stats.mismatches == 0 and fe.stats.canary_violations == 0
    assert fe.disk.discard and fe.disk.discard_secure and fe.disk.flush and fe.disk.barrier


def test_many_in_flight_across_queues(make):
    """Hundreds of requests in flight on several queues at once (the ring fills and
    the submitters wait for space), all answered and verified."""
    g, be = make(FrontendOptions(max_ring_page_order=0, initial_zero=True))
    fe = g.frontend
    blobs = {i: os.urandom(4096) for i in range(300)}
    results = [fe.submit_write(8 * i, blobs[i]) for i in range(300)]
    for r in results:
        assert r.get(timeout=30).ok
    reads = [fe.submit_read(8 * i, 8) for i in range(300)]
    for i, r in enumerate(reads):
        res = r.get(timeout=30)
        assert res.ok and res.data == blobs[i]
    assert fe.stats.responses == fe.stats.requests


# ---------------------------------------------------------------------------------
# what the frontend notices
def test_mismatch_is_detected(make):
    """A backend returning wrong data is caught: the read's IoResult carries the
    mismatch and stats.mismatches counts it."""
    g, be = make()
    fe = g.frontend
    fe.write(0, b"\x11" * 4096)
    be.corrupt_reads = True
    res = fe.submit_read(0, 8).get(timeout=10)
    assert res.status == Status.OKAY and res.mismatch is not None and not res.ok
    assert res.mismatch.sector == 0
    assert fe.stats.mismatches == 1


def test_initial_content_checked_only_when_known(make):
    """Sectors never written are checked as zeros only on a fresh scratch image."""
    g, be = make(FrontendOptions(initial_zero=False))
    be.data[0:512] = b"\x42" * 512
    assert g.frontend.read(0, 1) == b"\x42" * 512
    assert g.frontend.stats.mismatches == 0
    g2, be2 = make(FrontendOptions(initial_zero=True))
    be2.data[0:512] = b"\x42" * 512
    g2.frontend.submit_read(0, 1).get(timeout=10)
    assert g2.frontend.stats.mismatches == 1


@pytest.mark.parametrize("misbehaviour,reason", [
    ("duplicate", "duplicate_response"),
    ("pad_garbage", "response_padding"),
])
def test_response_checks(make, misbehaviour, reason):
    """Each response must answer one outstanding request exactly once, with zero
    padding (XSA-216): anything else is counted as a protocol violation."""
    g, be = make()
    setattr(be, misbehaviour, True)
    g.frontend.write(0, bytes(4096))
    gevent.sleep(0.05)
    g.frontend.poll()
    assert g.frontend.stats.violations.get(reason, 0) >= 1


def test_indirect_response_operation(make):
    """Linux's blkfront insists that the response to an INDIRECT request carries its
    indirect_op; a backend echoing 6 is flagged (unless the frontend is told not to)."""
    g, be = make()
    be.indirect_rsp_op = Op.INDIRECT
    g.frontend.write(0, bytes(64 * 1024))
    assert g.frontend.stats.violations.get("wrong_operation") == 1
    g2, be2 = make(FrontendOptions(strict_indirect_op=False, initial_zero=True))
    be2.indirect_rsp_op = Op.INDIRECT
    g2.frontend.write(0, bytes(64 * 1024))
    assert not g2.frontend.stats.violations


# ---------------------------------------------------------------------------------
# the state machine
def test_close_and_reconnect(make, host):
    """close(): 5, the backend's 5, 6, the backend's 6, everything given back; then
    reconnect() negotiates new rings and the data written before is still there."""
    g, be = make()
    fe = g.frontend
    data = os.urandom(8192)
    fe.write(0, data)
    fe.close()
    assert fe.state == XenbusState.CLOSED and be.state() == XenbusState.CLOSED
    assert not fe.connected and fe.queues == [] and fe.grants_in_use() == 0
    with pytest.raises(NotConnected):
        fe.write(0, data)
    fe.reconnect(timeout=10)
    assert fe.connected and be.connects == 2
    assert fe.read(0, 16) == data
    assert fe.stats.connects == 2


def test_reboot_abandons_and_resets(make):
    """reboot(): requests in flight are abandoned (their sectors become unknown),
    then Linux's reset dance 5 -> 6 -> 1 and a fresh connection."""
    g, be = make()
    fe = g.frontend
    fe.write(0, b"\x01" * 4096)
    be.hold = True
    pending = fe.submit_write(0, b"\x02" * 4096)
    assert until(lambda: be.held)
    be.hold, be.held = False, []  # the old ring's request is never answered
    fe.reboot(timeout=10)
    res = pending.get(timeout=5)
    assert res.lost and fe.stats.lost == 1
    assert be.connects == 2 and fe.connected
    fe.read(0, 8)  # either content is fine: the write was abandoned
    assert fe.stats.mismatches == 0


def test_backend_initiated_close_by_detach(make, host):
    """The toolstack's unplug (online=0, backend state 5) makes the frontend close;
    the backend reaches Closed in time and both directories are removed."""
    g, be = make()
    fe = g.frontend
    fe.write(0, bytes(4096))
    assert host.toolstack.detach_disk(g.domid, g.disk.devid, timeout=10) is True
    assert fe.closed_by_backend.wait(10)
    assert not fe.connected and fe.state == XenbusState.CLOSED
    assert host.xs.read(g.disk.frontend_path + "/state") is None
    assert host.xs.read(g.disk.backend_path + "/state") is None


def test_backend_vanishes(make, host):
    """The backend directory disappearing while connected: the frontend fails what is
    in flight as lost and lets go."""
    g, be = make()
    fe = g.frontend
    be.hold = True
    pending = fe.submit_read(0, 8)
    assert until(lambda: be.held)
    host.toolstack.remove_backend_dir(g.domid, g.disk.devid)
    assert fe.closed_by_backend.wait(10)
    assert pending.get(timeout=5).lost


def test_resize_seen(make, host):
    """Online resize: the backend rewrites sectors then state (still 4); the
    frontend re-reads the size, as blkfront_connect does."""
    g, be = make()
    fe = g.frontend
    old = fe.disk.sectors
    be.data.extend(bytes(MiB))
    fe.changed.clear()
    host.xs.write(be.be + "/sectors", str(old + 2048))
    host.xs.write(be.be + "/state", "4")
    for _ in range(50):
        if fe.disk.sectors == old + 2048:
            break
        fe.changed.wait(0.2)
        fe.changed.clear()
    assert fe.disk.sectors == old + 2048 and fe.stats.resizes == 1
    fe.write(old, b"\x07" * 512)
    assert fe.read(old, 1) == b"\x07" * 512


def test_connect_times_out_with_a_clear_message(host):
    """No backend: connect() gives up after its timeout and says where it waited."""
    g = host.create_guest(size=MiB, connect=False)
    try:
        with pytest.raises(FrontendTimeout, match="InitWait"):
            g.frontend.connect(timeout=0.5)
    finally:
        host.destroy_guest(g)


# ---------------------------------------------------------------------------------
# hooks
def test_raw_slot_and_unknown_operation(make):
    """put_raw places arbitrary bytes; the response to it resolves the returned
    AsyncResult (here: an unknown op answered EOPNOTSUPP)."""
    g, be = make()
    fe = g.frontend
    rid = fe.new_id()
    raw = bytes([200, 0]) + (0).to_bytes(2, "little") + bytes(4) + rid.to_bytes(8, "little")
    res = fe.put_raw(raw)
    rsp = res.get(timeout=10)
    assert (rsp.id, rsp.operation, rsp.status) == (rid, 200, Status.EOPNOTSUPP)
    assert not fe.stats.violations


def test_mutate_bad_gref(make):
    """mutate= rewrites a request before it is placed: a bad grant ref in a segment
    comes back as ERROR, and the frontend's own grants are still all given back."""
    g, be = make(FrontendOptions(persistent=False, initial_zero=True))
    fe = g.frontend
    baseline = fe.grants_in_use()

    def bad(req: Request) -> Request:
        segs = list(req.segments)
        segs[1] = Segment(9999, segs[1].first_sect, segs[1].last_sect)
        req.segments = tuple(segs)
        return req

    with pytest.raises(IOFailed):
        fe.write(0, bytes(3 * 4096), mutate=bad)
    assert fe.stats.errors == 1 and fe.grants_in_use() == baseline


def test_push_later_rewrite_and_outstanding(make):
    """push=False keeps a request unpublished; outstanding_requests() shows it; a
    slot can be rewritten after it was published; set_req_prod publishes a bogus
    producer index (the backend sees an impossible ring)."""
    g, be = make()
    fe = g.frontend
    r = fe.submit_write(0, b"\x05" * 4096, push=False)
    (info,) = fe.outstanding_requests()
    assert info.kind == "write" and info.sector == 0 and len(info.grefs) == 1
    gevent.sleep(0.05)
    assert not r.ready() and not be.seen
    fe.push(info.queue)
    assert r.get(timeout=10).ok
    fe.rewrite_slot(info.index, b"\xff" * 112, queue=info.queue)
    assert fe.queue(info.queue).ring.buf[64] == 0xFF
    fe.set_req_prod(fe.queue(0).ring.req_prod_pvt + 1000)
    assert until(lambda: be.errors)
    assert "more than" in be.errors[0]


def test_revoke_flood_state_pause(make):
    """revoke_grant makes the backend's map fail (ERROR, nothing else breaks);
    notify(count=) sends a storm; pause_responses holds responses back;
    set_state writes our state node."""
    g, be = make(FrontendOptions(persistent=False, initial_zero=True))
    fe = g.frontend
    be.hold = True
    r = fe.submit_write(0, bytes(4096))
    assert until(lambda: be.held)
    (info,) = fe.outstanding_requests()
    fe.revoke_grant(info.grefs[0])
    be.release_held()
    assert r.get(timeout=10).status == Status.ERROR
    sent = fe.queue(0).notifications
    fe.notify(count=100)
    assert fe.queue(0).notifications == sent + 100
    fe.pause_responses()
    r = fe.submit_read(0, 8, queue=0)
    ring = fe.queue(0).ring
    assert until(lambda: ring.idx[2] != ring.rsp_cons)  # answered, not consumed
    gevent.sleep(0.05)
    assert not r.ready()
    fe.resume_responses()
    assert r.get(timeout=10).status == Status.OKAY
    fe.set_state(XenbusState.CONNECTED)
    assert g.xs.read(g.disk.frontend_path + "/state") == "4"


def test_segments_for_page_layout():
    """Helper used by the IO path: page-aligned split of a sector range."""
    assert segments_for(0, 8) == [(0, 7)]
    assert segments_for(7, 2) == [(7, 7), (0, 0)]
    assert sum(b - a + 1 for a, b in segments_for(3, 1000)) == 1000
    assert PAGE_SIZE // SECTOR_SIZE == 8


def test_frontend_is_a_frontend():
    assert Frontend.__doc__


# ---------------------------------------------------------------------------------
# the workload generator (gblk.sim.guest.workload) on top of the frontend
def test_workload_mixed_and_verified(make):
    """A bounded mixed workload (every operation the backend offers, small and large,
    random and sequential, several in flight) completes with no error and no
    mismatch, and verification really ran."""
    from gblk.sim.guest.workload import Workload, WorkloadConfig

    g, be = make()
    wl = Workload([g.frontend], WorkloadConfig(seconds=None, count=400, depth=8, seed=1,
                                               large_sectors=512))
    stats = wl.run()
    assert stats.requests == 400 and stats.ok, stats.as_dict()
    assert stats.bytes > 0 and stats.iops > 0
    assert {"read", "write", "large_write", "discard", "flush"} <= set(stats.by_op)
    assert g.frontend.verifier is not None and g.frontend.verifier.sectors_checked > 0
    assert any(r.operation == Op.INDIRECT for r in be.seen)


def test_workload_reports_corruption(make):
    """The same workload against a backend that corrupts reads reports mismatches
    (the demo's exit status depends on it)."""
    from gblk.sim.guest.workload import Workload, WorkloadConfig

    g, be = make()
    be.corrupt_reads = True
    stats = Workload([g.frontend], WorkloadConfig(seconds=None, count=200, depth=4,
                                                  seed=2)).run()
    assert stats.mismatches > 0 and not stats.ok
