"""The shared ring (gblk.blkif.ring): slots, free-running u32 indices, copy-once
consumption and the notification rules of io/ring.h.

The frontend side is played by hand (``Shared``): header words and slot offsets are
computed here from docs/protocol.md §4, not taken from the code under test.
"""

from __future__ import annotations

import struct
from typing import Callable, List, Optional

import pytest

from gblk.blkif.abi import X86_32, X86_64, Abi
from gblk.blkif.ring import BackRing, FrontRing, ring_bytes, ring_slots
from gblk.errors import RingError

M = 0xFFFFFFFF
ABIS = [pytest.param(X86_64, id="x86_64-abi"), pytest.param(X86_32, id="x86_32-abi")]
REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = 0, 4, 8, 12  # byte offsets in the header


class Shared:
    """A ring page (or pages) as the frontend sees it."""

    def __init__(self, abi: Abi, order: int = 0, start: int = 0) -> None:
        self.abi = abi
        self.buf = bytearray(4096 << order)
        self.slots = 32 << order
        self.entry = abi.req_size
        for off in (REQ_PROD, RSP_PROD):
            self.put(off, start)
        for off in (REQ_EVENT, RSP_EVENT):
            self.put(off, (start + 1) & M)
        self.req_prod_pvt = start

    def get(self, off: int) -> int:
        return int(struct.unpack_from("<I", self.buf, off)[0])

    def put(self, off: int, value: int) -> None:
        struct.pack_into("<I", self.buf, off, value & M)

    def slot(self, index: int) -> int:
        return 64 + (index % self.slots) * self.entry

    def produce(self, payloads: List[bytes], publish: bool = True) -> None:
        for p in payloads:
            assert len(p) == self.entry
            off = self.slot(self.req_prod_pvt)
            self.buf[off:off + self.entry] = p
            self.req_prod_pvt = (self.req_prod_pvt + 1) & M
        if publish:
            self.put(REQ_PROD, self.req_prod_pvt)

    def response(self, index: int) -> bytes:
        off = self.slot(index)
        return bytes(self.buf[off:off + self.abi.rsp_size])


class Fence:
    """Counts calls; runs an optional hook inside the barrier (to play the frontend
    running concurrently on another CPU)."""

    def __init__(self) -> None:
        self.calls = 0
        self.hook: Optional[Callable[[int], None]] = None

    def __call__(self) -> None:
        self.calls += 1
        if self.hook is not None:
            self.hook(self.calls)


def payload(abi: Abi, n: int) -> bytes:
    """A request-sized slot whose every byte tells which request it is."""
    return bytes([n & 0xFF]) * abi.req_size


def back(sh: Shared, fence: Optional[Fence] = None) -> BackRing:
    return BackRing(memoryview(sh.buf), sh.abi.req_size, sh.abi.rsp_size, fence or Fence())


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("order, slots", [(0, 32), (1, 64), (2, 128), (3, 256), (4, 512)])
def test_ring_slots_per_order(abi: Abi, order: int, slots: int) -> None:
    """__RING_SIZE: 32, 64, 128, 256, 512 slots for ring-page-order 0..4, the same for
    both ABIs (a wrong count desynchronises every slot index with the frontend)."""
    assert ring_bytes(order) == 4096 << order
    assert ring_slots(ring_bytes(order), abi.req_size) == slots
    assert back(Shared(abi, order)).slots == slots


def test_ring_too_small() -> None:
    """A buffer without room for one entry after the 64-byte header is refused."""
    with pytest.raises(ValueError):
        ring_slots(64 + 111, 112)


def test_read_only_buffer_refused() -> None:
    """The backend writes responses and indices: a read-only mapping is a bug."""
    with pytest.raises(ValueError):
        BackRing(memoryview(bytes(4096)), 112, 16, Fence())


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("start", [0, 0xFFFFFFF0, 0xFFFFFFFF, 0x7FFFFFF8])
def test_free_running_indices_across_the_wrap(abi: Abi, start: int) -> None:
    """Indices are free-running u32: a conversation that starts near 2**32 carries on
    across the wrap with every request consumed once, in order, from the right slot,
    and every response at the right slot and index."""
    sh = Shared(abi, start=start)
    ring = back(sh)
    assert (ring.req_cons, ring.rsp_prod_pvt) == (start, start)
    seen: List[bytes] = []
    n = 0
    for batch in (5, 20, 32, 1, 17, 32):
        sh.produce([payload(abi, n + i) for i in range(batch)])
        raws = ring.take_requests(1000)
        assert len(raws) == batch
        seen.extend(raws)
        for i in range(batch):
            ring.put_response(abi.pack_response(n + i, 0, 0))
        ring.push_responses()
        rsp_prod = sh.get(RSP_PROD)
        assert rsp_prod == (start + n + batch) & M
        for i in range(batch):
            assert abi.parse_response(sh.response(start + n + i))[0] == n + i
        n += batch
        assert ring.req_cons == ring.rsp_prod_pvt == (start + n) & M
        assert 0 <= ring.req_cons <= M
    assert seen == [payload(abi, i) for i in range(n)]


@pytest.mark.parametrize(
    "old, new, rsp_event, notify",
    [
        pytest.param(5, 8, 5, False, id="event-at-old-already-notified"),
        pytest.param(5, 8, 6, True, id="event-just-crossed"),
        pytest.param(5, 8, 8, True, id="event-at-new"),
        pytest.param(5, 8, 9, False, id="event-ahead-frontend-not-waiting"),
        pytest.param(5, 8, 2, False, id="event-behind"),
        pytest.param(0xFFFFFFFE, 2, 0xFFFFFFFF, True, id="wrap-event-before-zero"),
        pytest.param(0xFFFFFFFE, 2, 0, True, id="wrap-event-at-zero"),
        pytest.param(0xFFFFFFFE, 2, 2, True, id="wrap-event-at-new"),
        pytest.param(0xFFFFFFFE, 2, 0xFFFFFFFE, False, id="wrap-event-at-old"),
        pytest.param(0xFFFFFFFE, 2, 3, False, id="wrap-event-ahead"),
    ],
)
def test_push_responses_notify_rule(old: int, new: int, rsp_event: int, notify: bool) -> None:
    """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: notify exactly when rsp_event lies in
    (old rsp_prod, new rsp_prod], modulo 2**32. A notification too few loses a wake-up;
    one too many is the cost a frontend pays for every response."""
    sh = Shared(X86_64, start=old)
    count = (new - old) & M
    sh.produce([payload(X86_64, i) for i in range(count)])
    ring = back(sh)
    ring.take_requests(100)
    for i in range(count):
        ring.put_response(X86_64.pack_response(i, 0, 0))
    sh.put(RSP_EVENT, rsp_event)
    assert ring.push_responses() is notify
    assert sh.get(RSP_PROD) == new


def test_responses_invisible_until_pushed() -> None:
    """put_response writes the slot but not rsp_prod; push publishes (after a write
    barrier) and says nothing when nothing is new."""
    sh = Shared(X86_64)
    fence = Fence()
    ring = back(sh, fence)
    assert ring.push_responses() is False
    sh.produce([payload(X86_64, 1)])
    ring.take_requests(10)
    ring.put_response(X86_64.pack_response(77, 1, 0))
    assert sh.get(RSP_PROD) == 0
    assert X86_64.parse_response(sh.response(0)) == (77, 1, 0)

    states = []
    fence.hook = lambda n: states.append(sh.get(RSP_PROD))
    assert ring.push_responses() is True  # rsp_event starts at 1
    assert states == [0, 1], "wmb before publishing rsp_prod, mb after it"
    assert ring.push_responses() is False


def test_push_reads_rsp_event_after_publishing() -> None:
    """The frontend may re-arm rsp_event between our store of rsp_prod and our load of
    rsp_event (the store->load case that needs a full barrier): the decision uses the
    value read after the barrier, so the wake-up is not lost."""
    sh = Shared(X86_64)
    fence = Fence()
    ring = back(sh, fence)
    sh.produce([payload(X86_64, 1)])
    ring.take_requests(10)
    ring.put_response(X86_64.pack_response(1, 0, 0))
    sh.put(RSP_EVENT, 100)  # frontend is not waiting ...

    def frontend_goes_to_sleep(n: int) -> None:
        if sh.get(RSP_PROD) == 1:  # ... until just after rsp_prod was published
            sh.put(RSP_EVENT, 1)

    fence.hook = frontend_goes_to_sleep
    assert ring.push_responses() is True


@pytest.mark.parametrize("start", [0, 0xFFFFFFFF])
def test_final_check_rearms_req_event(start: int) -> None:
    """RING_FINAL_CHECK_FOR_REQUESTS: with nothing to do, set req_event = req_cons + 1
    (mod 2**32) so the next request kicks us, then look again."""
    sh = Shared(X86_64, start=start)
    sh.put(REQ_EVENT, 12345)
    ring = back(sh)
    assert ring.final_check_for_requests() is False
    assert sh.get(REQ_EVENT) == (start + 1) & M


def test_final_check_with_work_leaves_req_event() -> None:
    """With unconsumed requests the answer is 'more work' at once; req_event is left
    alone (the backend will come back without sleeping)."""
    sh = Shared(X86_64)
    sh.put(REQ_EVENT, 12345)
    ring = back(sh)
    sh.produce([payload(X86_64, 0)])
    assert ring.final_check_for_requests() is True
    assert sh.get(REQ_EVENT) == 12345


def test_final_check_catches_a_request_racing_the_rearm() -> None:
    """A request published after our first look but before the frontend saw the new
    req_event sends no kick; the second look after the barrier must find it, or the
    ring stalls for good."""
    sh = Shared(X86_64)
    fence = Fence()
    ring = back(sh, fence)
    seen_event = []

    def frontend_pushes(n: int) -> None:
        seen_event.append(sh.get(REQ_EVENT))
        sh.produce([payload(X86_64, 9)])

    fence.hook = frontend_pushes
    assert ring.final_check_for_requests() is True
    assert seen_event == [1], "req_event written before the barrier"


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("start", [0, 0xFFFFFFF0])
def test_bogus_req_prod_is_a_ring_error(abi: Abi, start: int) -> None:
    """A req_prod more than 'slots' ahead of the responses is impossible: the frontend
    is broken or hostile and the ring is halted (RingError), never read."""
    sh = Shared(abi, start=start)
    ring = back(sh)
    sh.put(REQ_PROD, start + 33)
    with pytest.raises(RingError):
        ring.unconsumed()
    with pytest.raises(RingError):
        ring.take_requests(1000)
    with pytest.raises(RingError):
        ring.final_check_for_requests()
    assert ring.req_cons == start


@pytest.mark.parametrize("start", [0, 0xFFFFFFF0])
def test_full_ring_is_not_bogus(start: int) -> None:
    """Exactly 'slots' published and unanswered is a full ring, not an error."""
    sh = Shared(X86_64, start=start)
    sh.produce([payload(X86_64, i) for i in range(32)])
    ring = back(sh)
    assert len(ring.take_requests(1000)) == 32
    assert ring.outstanding() == 32
    assert ring.unconsumed() == 0


def test_bogus_req_prod_after_some_answers() -> None:
    """The bound is taken against the responses produced so far (rsp_prod_pvt)."""
    sh = Shared(X86_64)
    ring = back(sh)
    sh.produce([payload(X86_64, i) for i in range(10)])
    ring.take_requests(1000)
    for i in range(10):
        ring.put_response(X86_64.pack_response(i, 0, 0))
    ring.push_responses()
    sh.put(REQ_PROD, 10 + 32)
    assert ring.unconsumed() == 32
    sh.put(REQ_PROD, 10 + 33)
    with pytest.raises(RingError):
        ring.unconsumed()


def test_attach_rejects_bogus_ring() -> None:
    """Attaching to a ring whose req_prod is more than 'slots' ahead of rsp_prod fails."""
    sh = Shared(X86_64, start=0xFFFFFFF8)
    sh.put(REQ_PROD, 0xFFFFFFF8 + 40)
    with pytest.raises(RingError):
        back(sh)


def test_attach_to_ring_in_use_starts_from_rsp_prod() -> None:
    """Reattaching (reconnect, restarted daemon) starts at the ring's rsp_prod: the
    requests published and not answered are consumed again, the answered ones not."""
    sh = Shared(X86_64, start=1000)
    sh.produce([payload(X86_64, i) for i in range(5)])
    sh.put(RSP_PROD, 1002)  # the previous backend answered two of them
    ring = back(sh)
    assert (ring.req_cons, ring.rsp_prod_pvt) == (1002, 1002)
    assert ring.take_requests(100) == [payload(X86_64, 2), payload(X86_64, 3), payload(X86_64, 4)]


def test_take_requests_copies_once() -> None:
    """XSA-155: each slot is copied into private immutable bytes; a frontend rewriting
    the slot afterwards changes nothing already taken."""
    sh = Shared(X86_64)
    ring = back(sh)
    sh.produce([payload(X86_64, 1), payload(X86_64, 2)])
    raws = ring.take_requests(10)
    assert all(type(r) is bytes for r in raws)
    sh.buf[64:64 + 2 * 112] = b"\xff" * (2 * 112)
    assert raws == [payload(X86_64, 1), payload(X86_64, 2)]


def test_take_requests_honours_limit_and_advances_req_cons() -> None:
    """take_requests(limit) takes at most 'limit' slots and advances req_cons before any
    response exists; the rest stay unconsumed for the next pass."""
    sh = Shared(X86_64)
    ring = back(sh)
    sh.produce([payload(X86_64, i) for i in range(10)])
    assert ring.take_requests(0) == []
    assert len(ring.take_requests(4)) == 4
    assert (ring.req_cons, ring.outstanding(), ring.unconsumed()) == (4, 4, 6)
    assert ring.take_requests(100) == [payload(X86_64, i) for i in range(4, 10)]


def test_unpublished_requests_are_not_taken() -> None:
    """Slots written but not yet published by req_prod are not the backend's to read."""
    sh = Shared(X86_64)
    ring = back(sh)
    sh.produce([payload(X86_64, 1)], publish=False)
    assert ring.take_requests(10) == []
    sh.put(REQ_PROD, sh.req_prod_pvt)
    assert ring.take_requests(10) == [payload(X86_64, 1)]


@pytest.mark.parametrize("abi", ABIS)
def test_multi_page_slots_straddle_pages(abi: Abi) -> None:
    """In a multi-page ring a slot may straddle a page boundary (x86_32: slot 37 covers
    bytes 4060..4167); it is copied whole."""
    sh = Shared(abi, order=1)
    ring = back(sh)
    assert ring.slots == 64
    payloads = [bytes((i * 7 + j) & 0xFF for j in range(abi.req_size)) for i in range(64)]
    sh.produce(payloads)
    assert ring.take_requests(100) == payloads
    if abi is X86_32:
        assert sh.slot(37) < 4096 < sh.slot(37) + abi.req_size


def test_req_prod_moving_backwards_never_overfills_the_ring() -> None:
    """A hostile frontend that moves req_prod backwards (behind req_cons, but within
    'slots' of rsp_prod) must not make the backend consume slots that were never
    published nor have more than 'slots' requests outstanding (ring.h's
    RING_HAS_UNCONSUMED_REQUESTS is bounded by the free room; docs/protocol.md §4: 'gblk
    never has more than slots requests outstanding'). Either a RingError or no new work is
    acceptable; 4 billion unconsumed requests are not."""
    sh = Shared(X86_64)
    ring = back(sh)
    sh.produce([payload(X86_64, i) for i in range(10)])
    assert len(ring.take_requests(100)) == 10
    sh.put(REQ_PROD, 5)  # backwards
    try:
        unconsumed = ring.unconsumed()
    except RingError:
        return
    assert unconsumed <= ring.slots - ring.outstanding()
    ring.take_requests(100)
    assert ring.outstanding() <= ring.slots


def test_front_and_back_ring_talk_across_the_wrap() -> None:
    """The simulated guest's FrontRing and the BackRing agree on slots, indices and
    notifications, across the 2**32 wrap."""
    sh = Shared(X86_32, start=0xFFFFFFFC)
    front = FrontRing(memoryview(sh.buf), 108, 12, Fence(), init=False)
    ring = back(sh)
    assert front.free_slots() == 32
    for rnd in range(3):
        for i in range(6):
            front.put_request(payload(X86_32, i))
        front.push_requests()
        got = ring.take_requests(100)
        assert got == [payload(X86_32, i) for i in range(6)]
        for i in range(6):
            ring.put_response(X86_32.pack_response(rnd * 10 + i, 0, 0))
        assert ring.push_responses() is True  # the guest waits after every round
        rsps = front.take_responses()
        assert [X86_32.parse_response(r)[0] for r in rsps] == [rnd * 10 + i for i in range(6)]
        assert front.final_check_for_responses() is False
        assert ring.final_check_for_requests() is False
    assert sh.get(REQ_PROD) == (0xFFFFFFFC + 18) & M


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("start", [0, 28, 0xFFFFFFFE])
def test_take_block_is_one_private_copy_across_the_wrap(abi: Abi, start: int) -> None:
    """take_block copies the new slots once, back to back in ring order, also when they
    wrap past the last slot; rewriting the ring afterwards changes nothing taken."""
    sh = Shared(abi, start=start)
    ring = back(sh)
    sh.produce([payload(abi, i) for i in range(8)])
    block, n, first = ring.take_block(100)
    assert (n, first, ring.req_cons) == (8, start, (start + 8) & M)
    assert type(block) is bytes
    sh.buf[64:] = b"\xff" * (len(sh.buf) - 64)
    assert block == b"".join(payload(abi, i) for i in range(8))
    assert ring.take_block(100) == (b"", 0, (start + 8) & M)
