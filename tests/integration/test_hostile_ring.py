"""Hostile guests against the shared ring: slots rewritten after publishing
(XSA-155), response padding (XSA-216), every operation code and every segment
count (the mirage-block-xen review), bogus producer indices, a ring kept full.

One simulated host and one ``gblk serve`` for the module; each test has its own
hostile guest, and a bystander guest on the same daemon must be served throughout.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Dict, Iterator, List, Tuple

import gevent
import pytest

from gblk.blkif.abi import Request, Segment
from gblk.blkif.const import PAGE_SIZE, Op

from .backend_support import file_bytes, pattern
from .hostile_support import (  # noqa: F401 - after_each: an autouse fixture
    Env,
    after_each,
    hostile_env,
    EOPNOTSUPP,
    ERROR,
    OKAY,
    SECTOR,
    WAIT,
    Bystander,
    Daemon,
    check_clean,
    close_without_leaks,
    dev_metric,
    eventually,
    expect,
    figure,
    grant_balance,
    launch,
    make_guest,
)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    yield from hostile_env("ring")


# ---------------------------------------------------------------------------------
def test_xsa155_slot_rewritten_after_publishing(env):
    """XSA-155 (double fetch): a frontend keeps rewriting a request's slot after
    publishing it (sector, segment bounds, validity). gblk copies each slot once and
    parses only the copy, so every request is answered exactly once and the data
    lands exactly where one whole version of the slot says (never a mix of two
    versions: sector of one, segment of another), with the status that version
    deserves."""
    host = env.host
    g = make_guest(host, size=8 << 20, max_ring_page_order=0, max_queues=1, persistent=False)
    fe = g.frontend
    q = fe.queue(0)
    # the guest rewrites only what lies beyond the first 16 bytes (sector_number and
    # the segments): the response gblk writes into the same slot must stay intact
    keep = fe.abi.rsp_size
    assert fe.abi.rw.unpack_from(bytes(fe.abi.req_size))[4] == 0 and keep == 16
    n = 40
    cases: List[Tuple[int, int, int, bytes, int]] = []
    served: Counter = Counter()
    for i in range(n):
        a, b, c = i * 8, 4096 + i * 8, 8192 + i * 8
        data = pattern(100 + i, PAGE_SIZE)
        r = fe.submit_write(a, data, push=False, queue=0)
        (info,) = fe.outstanding_requests()
        gref = info.grefs[0]

        def slot(sector: int, seg: Segment, info=info) -> bytes:
            return fe.pack(Request(Op.WRITE, info.id, nr_segments=1, handle=fe.handle,
                                   sector_number=sector, segments=(seg,)))[keep:]

        versions = [slot(b, Segment(gref, 0, 7)),  # B: another place
                    slot(c, Segment(gref, 2, 3)),  # C: two sectors of the page elsewhere
                    slot(a, Segment(gref, 5, 2)),  # X: invalid (first_sect > last_sect)
                    slot(a, Segment(gref, 0, 7))]  # A: what was published
        versions = versions[i % 4:] + versions[:i % 4]
        off = q.ring.offset(info.index) + keep
        # publish without a kick, flip between the versions, kick gblk half-way,
        # keep flipping while it reads the ring (~3 ms in all)
        fe.push(0, notify=False)
        t0 = time.perf_counter()
        j = 0
        kicked = False
        while time.perf_counter() - t0 < 0.003:
            v = versions[j % 4]
            q.ring.buf[off:off + len(v)] = v
            j += 1
            if not kicked and time.perf_counter() - t0 > 0.001:
                fe.notify(0)
                kicked = True
        if not kicked:  # this process lost the CPU for the whole 3 ms: kick now
            fe.notify(0)
        res = r.get(timeout=WAIT)
        assert not res.lost
        cases.append((a, b, c, data, res.status))
    zero = bytes(PAGE_SIZE)
    for a, b, c, data, status in cases:
        got = (file_bytes(g.image, a, 8), file_bytes(g.image, b, 8), file_bytes(g.image, c, 8))
        outcomes = {
            "A": ((data, zero, zero), OKAY),
            "B": ((zero, data, zero), OKAY),
            "C": ((zero, zero, data[1024:2048] + bytes(3072)), OKAY),
            "X": ((zero, zero, zero), ERROR),
        }
        match = [k for k, (image, st) in outcomes.items() if image == got and st == status]
        assert match, f"request at {a}: status {status}, data matches no single version of the slot"
        served[match[0]] += 1
    # nothing anywhere else on the disk
    with open(g.image, "rb") as f:
        whole = f.read()
    touched = set()
    for a, b, c, _, _ in cases:
        for s in (a, b, c):
            touched.update(range(s, s + 8))
    stray = [s for s in range(len(whole) // SECTOR)
             if s not in touched and any(whole[s * SECTOR:(s + 1) * SECTOR])]
    assert not stray, f"sectors written outside every version of the requests: {stray[:10]}"
    check_clean(fe)
    figure("xsa155_versions_served", f"{dict(served)} of {n} requests (A = as first published)")
    grant_balance(env.daemon, fe)
    close_without_leaks(fe)


# ---------------------------------------------------------------------------------
#: every byte non-zero: whatever of the request lies under the response's padding
#: is non-zero before gblk writes its response
LOUD_ID = 0x8182838485868700


@pytest.mark.parametrize("protocol", ["x86_64-abi", "x86_32-abi", None],
                         ids=["x86_64", "x86_32", "absent"])
def test_xsa216_response_padding_is_zero(env, protocol):
    """XSA-216: the padding bytes of every response gblk writes are zero, for both
    ABIs (x86_64: bytes 9 and 12..15 of 16; x86_32: byte 9 of 12), whatever the
    request left in the slot, for OKAY, ERROR and EOPNOTSUPP answers, checked in the
    raw response slots of the shared ring."""
    g = make_guest(env.host, protocol=protocol, max_ring_page_order=0, max_queues=1,
                   persistent=False)
    fe = g.frontend
    abi = fe.abi
    q = fe.queue(0)
    pad = [i for i, b in enumerate(abi.rsp.pack(2 ** 64 - 1, 0xFF, -1)) if b == 0]
    assert pad == ([9, 12, 13, 14, 15] if abi.rsp_size == 16 else [9])
    ids = iter(range(LOUD_ID + 1, LOUD_ID + 0x7F))
    answered: List[Tuple[int, int, int]] = []  # (ring index, id, status)

    # raw slots full of 0xff: unknown op, READ of no segment, flush and barrier
    # without data, INDIRECT of no segment
    for op, status in [(77, EOPNOTSUPP), (Op.READ, ERROR), (Op.FLUSH_DISKCACHE, OKAY),
                       (Op.WRITE_BARRIER, OKAY), (Op.INDIRECT, ERROR)]:
        rid = next(ids)
        raw = bytearray(b"\xff" * abi.req_size)
        abi.head.pack_into(raw, 0, op, 0, fe.handle, rid)
        if op == Op.INDIRECT:
            raw[2:4] = b"\0\0"  # nr_segments u16 = 0
        index = q.ring.req_prod_pvt
        rsp = fe.put_raw(bytes(raw)).get(timeout=WAIT)
        assert (rsp.id, rsp.status) == (rid, status), (op, rsp)
        answered.append((index, rid, status))

    # real IO through the frontend, with loud ids
    def loud(req: Request) -> Request:
        req.id = next(ids)
        return req

    def submit(fn, status, *args, **kw):
        r = fn(*args, mutate=loud, push=False, queue=0, **kw)
        (info,) = fe.outstanding_requests()
        fe.push(0)
        expect(r, status, fn.__name__)
        answered.append((info.index, info.id, status))

    def past_end(req: Request) -> Request:
        req = loud(req)
        req.sector_number = fe.disk.sectors
        return req

    submit(fe.submit_write, OKAY, 0, pattern(1, 4 * PAGE_SIZE))
    submit(fe.submit_read, OKAY, 0, 32)
    submit(fe.submit_discard, OKAY, 64, 8)
    r = fe.submit_read(0, 8, mutate=past_end, push=False, queue=0)
    (info,) = fe.outstanding_requests()
    fe.push(0)
    expect(r, ERROR, "read past the end")
    answered.append((info.index, info.id, ERROR))

    # one request at a time: each response went to the slot of its own request
    for index, rid, status in answered:
        off = q.ring.offset(index)
        slot = bytes(q.ring.buf[off:off + abi.rsp_size])
        got_id, _, got_status = abi.parse_response(slot)
        assert (got_id, got_status) == (rid, status), (index, slot.hex())
        assert all(slot[i] == 0 for i in pad), f"response padding not zero: {slot.hex()}"
    check_clean(fe)
    close_without_leaks(fe)


# ---------------------------------------------------------------------------------
def test_mirage_every_operation_code(env):
    """mirage-block-xen review: every operation code 0..255, in slots filled with
    zeros and with 0xff, gets exactly one response carrying its id and the right
    operation and status: EOPNOTSUPP for codes gblk does not serve, ERROR for
    invalid requests of the ones it does, OKAY for the valid ones; the daemon keeps
    serving."""
    g = make_guest(env.host, max_ring_page_order=0, max_queues=1, persistent=False)
    fe = g.frontend
    abi = fe.abi
    secure = fe.disk.discard_secure

    def expected(op: int, fill: int) -> Tuple[int, int]:
        """(response operation, status)"""
        if op in (Op.READ, Op.WRITE):
            return op, ERROR  # 0 or 255 segments
        if op in (Op.WRITE_BARRIER, Op.FLUSH_DISKCACHE):
            return op, OKAY if fill == 0 else ERROR  # no data, or 255 segments
        if op == Op.DISCARD:
            if fill == 0:
                return op, OKAY  # nothing to discard at sector 0
            return op, ERROR if secure else EOPNOTSUPP  # secure flag, range past the end
        if op == Op.INDIRECT:
            return fill, ERROR  # indirect_op = fill: READ of no segment, or op 255
        return op, EOPNOTSUPP

    q = fe.queue(0)
    todo = [(op, fill) for fill in (0x00, 0xFF) for op in range(256)]
    counts: Counter = Counter()
    while todo:
        # a batch no larger than the ring: each response slot is read back before
        # the frontend reuses it
        batch, todo = todo[:q.ring.slots], todo[q.ring.slots:]
        placed = []
        for op, fill in batch:
            rid = fe.new_id()
            raw = bytearray([fill]) * abi.req_size
            abi.head.pack_into(raw, 0, op, fill, fe.handle, rid)
            if op == Op.INDIRECT:
                raw[2:4] = bytes([fill, fill])
            placed.append((op, fill, rid, fe.put_raw(bytes(raw), push=False)))
        first = q.ring.rsp_cons
        fe.push(0)
        for op, fill, rid, r in placed:
            rsp = r.get(timeout=WAIT)
            assert rsp is not None and rsp.id == rid, (op, fill, rsp)
        # the batch's responses fill the slots from ``first`` on, in completion order
        answers: Dict[int, Tuple[int, int]] = {}
        for index in range(first, first + len(placed)):
            off = q.ring.offset(index)
            rid, rop, status = abi.parse_response(bytes(q.ring.buf[off:off + abi.rsp_size]))
            assert rid not in answers, f"two responses for id {rid:#x}"
            answers[rid] = (rop, status)
        for op, fill, rid, _ in placed:
            assert answers.get(rid) == expected(op, fill), (op, fill, answers.get(rid))
            counts[answers[rid][1]] += 1
    check_clean(fe)
    s = env.daemon.scrape()
    assert dev_metric(s, "gblk_errors_total", fe, reason="unsupported_op") == counts[EOPNOTSUPP]
    assert dev_metric(s, "gblk_ring_halted", fe) == 0
    # the disk still works
    fe.write(0, pattern(7, PAGE_SIZE))
    assert fe.read(0, 8) == pattern(7, PAGE_SIZE)
    figure("mirage_op_codes", f"{sum(counts.values())} requests: {counts[OKAY]} OKAY, "
           f"{counts[ERROR]} ERROR, {counts[EOPNOTSUPP]} EOPNOTSUPP")
    close_without_leaks(fe)


def test_mirage_every_segment_count(env):
    """mirage-block-xen review: READ, WRITE, FLUSH_DISKCACHE and WRITE_BARRIER with
    every nr_segments 0..255: 1..11 (and 0 for the flushes) are served and verified
    byte for byte, every other count is answered ERROR, exactly once each."""
    g = make_guest(env.host, size=32 << 20, max_ring_page_order=2, max_queues=1,
                   persistent=False)
    fe = g.frontend
    scratch = fe.disk.sectors - 64  # the invalid ones aim here (never written)
    pending = []
    region = 0

    def nr(n: int):
        def mutate(req: Request) -> Request:
            req.nr_segments = n
            return req
        return mutate

    for kind in ("read", "write", "flush", "barrier"):
        for n in range(256):
            valid = 1 <= n <= 11 or (n == 0 and kind in ("flush", "barrier"))
            if valid:
                sector = region * 88
                region += 1
                data = pattern(region, n * PAGE_SIZE)
                if kind == "read":
                    r = fe.submit_read(sector, n * 8)
                elif kind == "write":
                    r = fe.submit_write(sector, data)
                elif kind == "flush":
                    r = fe.submit_flush(sector, data or None)
                else:
                    r = fe.submit_barrier(sector, data or None)
            else:
                data = pattern(n, PAGE_SIZE)
                if kind == "read":
                    r = fe.submit_read(scratch, 8, mutate=nr(n))
                elif kind == "write":
                    r = fe.submit_write(scratch, data, mutate=nr(n))
                elif kind == "flush":
                    r = fe.submit_flush(scratch, data, mutate=nr(n))
                else:
                    r = fe.submit_barrier(scratch, data, mutate=nr(n))
            pending.append((kind, n, valid, r))
    bad = 0
    for kind, n, valid, r in pending:
        res = r.get(timeout=WAIT)
        assert not res.lost and res.requests == 1, (kind, n)
        assert res.status == (OKAY if valid else ERROR), (kind, n, res.status)
        bad += not valid
    check_clean(fe)
    assert file_bytes(g.image, scratch, 8) == bytes(PAGE_SIZE)
    s = env.daemon.scrape()
    assert dev_metric(s, "gblk_errors_total", fe, reason="invalid_segment_count") == bad
    figure("mirage_segment_counts", f"{len(pending)} requests, {bad} refused")
    grant_balance(env.daemon, fe)
    close_without_leaks(fe)


# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["ahead", "behind"])
def test_bogus_req_prod_halts_only_that_ring(env, how):
    """A producer index far ahead of what the ring can hold, or moved back behind
    what was already published, halts that ring only (gblk_ring_halted=1, counted
    once under reason ring_halted): requests it had consumed are still answered,
    nothing more is taken from it; the device's other queue, the other guest and
    the daemon carry on; a new connection (guest reboot) works again."""
    d = env.daemon
    g = make_guest(env.host, max_ring_page_order=0, max_queues=2, persistent=False)
    fe = g.frontend
    assert len(fe.queues) == 2
    for qi in (0, 1):
        fe.write(qi * 8, pattern(qi, PAGE_SIZE), queue=qi)
    env.bystander.start()
    q0 = fe.queue(0)
    before: List = []
    if how == "ahead":
        fe.set_req_prod(q0.ring.req_prod_pvt + 1000, queue=0)
    else:
        before = [fe.submit_write(64 + 8 * i, pattern(10 + i, 8 * PAGE_SIZE), queue=0)
                  for i in range(16)]
        fe.set_req_prod(q0.ring.req_prod_pvt - 8, queue=0)

    def halted() -> Tuple[float, float, float]:
        s = d.scrape()
        return (dev_metric(s, "gblk_ring_halted", fe, queue="0"),
                dev_metric(s, "gblk_ring_halted", fe, queue="1"),
                dev_metric(s, "gblk_errors_total", fe, reason="ring_halted"))

    assert eventually(halted, lambda v: v[0] == 1, "queue 0 halted") == (1, 0, 1)
    late = fe.submit_read(0, 8, queue=0)  # published on the halted ring: never taken
    # the other queue of the same device, and the other guest, are served
    for i in range(8):
        fe.write(128 + 8 * i, pattern(50 + i, PAGE_SIZE), queue=1)
        assert fe.read(128 + 8 * i, 8, queue=1) == pattern(50 + i, PAGE_SIZE)
    by_done = env.bystander.stop()
    assert by_done > 0
    d.assert_sane()
    answered = [r for r in before if r.ready() and not r.get().lost]
    for r in answered:
        assert r.get().status == OKAY
    fe.reboot()
    res = late.get(timeout=WAIT)
    assert res.lost, "a request published on a halted ring was answered"
    for r in before:
        assert r.get(timeout=WAIT).status in (OKAY, ERROR)
    for qi in (0, 1):
        fe.write(qi * 8, pattern(qi + 5, PAGE_SIZE), queue=qi)
        assert fe.read(qi * 8, 8, queue=qi) == pattern(qi + 5, PAGE_SIZE)
    assert eventually(halted, lambda v: v[0] == 0, "new ring not halted")[:2] == (0, 0)
    figure(f"bogus_req_prod_{how}", f"{len(answered)} of {len(before)} requests in flight "
           f"answered before the halt; bystander did {by_done} ops meanwhile")
    check_clean(fe)
    grant_balance(d, fe)
    close_without_leaks(fe)


# ---------------------------------------------------------------------------------
def test_ring_full_pressure_never_exceeds_slots(env):
    """A frontend that keeps its ring full (more requests queued than slots, and a
    phase where it stops taking responses): gblk never has more requests in flight
    than the ring has slots (gblk_requests_in_flight <= gblk_ring_slots, and so for
    the requests pending on the ring), and every request is answered once."""
    d = env.daemon
    g = make_guest(env.host, max_ring_page_order=0, max_queues=1, persistent=False)
    fe = g.frontend
    slots = fe.queue(0).ring.slots
    running = True
    done = Counter()
    failures: List[str] = []

    def lane(k: int) -> None:
        inflight: List = []
        i = 0
        while running:
            sector = k * 1024 + (i % 64) * 8
            if i % 3 == 2:
                inflight.append(fe.submit_read(sector, 8))
            else:
                inflight.append(fe.submit_write(sector, pattern(k * 7 + i, PAGE_SIZE)))
            i += 1
            if len(inflight) >= slots // 2:
                res = inflight.pop(0).get(timeout=WAIT)
                if not res.ok:
                    failures.append(repr(res))
                done["ops"] += 1
        for r in inflight:
            res = r.get(timeout=WAIT)
            if not res.ok:
                failures.append(repr(res))
            done["ops"] += 1

    lanes = [gevent.spawn(lane, k) for k in range(4)]
    peak: Dict[str, float] = Counter()
    samples = 0

    def sample() -> None:
        nonlocal samples
        s = d.scrape()
        samples += 1
        assert dev_metric(s, "gblk_ring_slots", fe) == slots
        for name in ("gblk_requests_in_flight", "gblk_ring_requests_pending"):
            v = dev_metric(s, name, fe)
            assert v <= slots, (name, v, slots)
            peak[name] = max(peak[name], v)

    t_end = time.monotonic() + 1.5
    while time.monotonic() < t_end:
        sample()
        gevent.sleep(0.01)
    # the frontend stops taking responses: the ring fills up with them
    fe.pause_responses()
    ring = fe.queue(0).ring
    eventually(lambda: ring.free_slots(), lambda v: v == 0, "ring full")
    for _ in range(10):
        sample()
        gevent.sleep(0.02)
    fe.resume_responses()
    t_end = time.monotonic() + 0.5
    while time.monotonic() < t_end:
        sample()
        gevent.sleep(0.01)
    running = False
    gevent.joinall(lanes, timeout=WAIT * 2)
    assert all(x.dead for x in lanes)
    assert not failures, failures[:3]
    check_clean(fe)
    figure("ring_full", f"{slots} slots: peak in flight {peak['gblk_requests_in_flight']:.0f}, "
           f"peak pending {peak['gblk_ring_requests_pending']:.0f} over {samples} scrapes; "
           f"{done['ops']} ops")
    grant_balance(d, fe)
    close_without_leaks(fe)
