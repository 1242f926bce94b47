"""The shared ring (io/ring.h) over any writable buffer: index arithmetic,
copy-once consumption and the notification rules.

Indices are free-running u32 (every comparison modulo 2**32). The four header
indices are read and written through a native u32 view (one aligned 32-bit load or
store each, never torn). ``fence`` is a full memory barrier supplied by the host
layer: CPython itself orders nothing for a frontend on another CPU.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

from ..errors import RingError
from .const import PAGE_SIZE, RING_HEADER_SIZE, U32_MASK

# word offsets in the u32 view of the ring header (struct blkif_sring)
REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = 0, 1, 2, 3

Fence = Callable[[], None]


def ring_slots(ring_bytes: int, entry_size: int) -> int:
    """__RING_SIZE: largest power of two of entries that fit after the header."""
    n = (ring_bytes - RING_HEADER_SIZE) // entry_size
    if n < 1:
        raise ValueError("ring too small")
    return 1 << (n.bit_length() - 1)


def ring_bytes(order: int) -> int:
    return PAGE_SIZE << order


class _Ring:
    def __init__(self, buf: memoryview, entry_size: int, fence: Fence) -> None:
        if buf.readonly:
            raise ValueError("ring buffer must be writable")
        self.buf = buf.cast("B")
        self.idx = self.buf[:RING_HEADER_SIZE].cast("I")
        self.entry_size = entry_size
        self.slots = ring_slots(len(self.buf), entry_size)
        self.mask = self.slots - 1
        self.fence = fence

    def offset(self, index: int) -> int:
        return RING_HEADER_SIZE + (index & self.mask) * self.entry_size

    def release(self) -> None:
        """Drop the views on the buffer (before the mapping under it goes)."""
        self.idx.release()
        self.buf.release()


class BackRing(_Ring):
    """The backend's half: ``req_cons`` and ``rsp_prod_pvt`` are private.

    Attaching to a ring that is already in use (a restarted backend, a reconnect)
    starts from the ring's ``rsp_prod``; requests published but never answered are
    consumed again.
    """

    def __init__(self, buf: memoryview, req_size: int, rsp_size: int, fence: Fence) -> None:
        super().__init__(buf, max(req_size, rsp_size), fence)
        self.rsp_size = rsp_size
        rsp_prod = self.idx[RSP_PROD]
        req_prod = self.idx[REQ_PROD]
        if (req_prod - rsp_prod) & U32_MASK > self.slots:
            raise RingError(f"req_prod {req_prod} is more than {self.slots} ahead of rsp_prod {rsp_prod}")
        self.req_cons = rsp_prod
        self.rsp_prod_pvt = rsp_prod

    def outstanding(self) -> int:
        """Requests consumed and not yet answered."""
        return (self.req_cons - self.rsp_prod_pvt) & U32_MASK

    def unconsumed(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS, bounded by what may be outstanding. Raises
        RingError when the producer index is impossible (a broken or hostile frontend)."""
        req_prod = self.idx[REQ_PROD]
        ahead = (req_prod - self.rsp_prod_pvt) & U32_MASK
        if ahead > self.slots:
            raise RingError(
                f"req_prod {req_prod} is more than {self.slots} ahead of rsp_prod {self.rsp_prod_pvt}"
            )
        if ahead < self.outstanding():
            raise RingError(f"req_prod {req_prod} moved back behind req_cons {self.req_cons}")
        return (req_prod - self.req_cons) & U32_MASK

    def take_requests(self, limit: int) -> List[bytes]:
        """Copy up to ``limit`` new slots into private bytes, advancing ``req_cons``
        before anything is answered. Each slot is read exactly once (XSA-155)."""
        n = min(self.unconsumed(), limit)
        if n <= 0:
            return []
        self.fence()  # read the slots only after req_prod (rmb)
        out = []
        size = self.entry_size
        buf = self.buf
        cons = self.req_cons
        for _ in range(n):
            off = self.offset(cons)
            out.append(bytes(buf[off:off + size]))
            cons = (cons + 1) & U32_MASK
        self.req_cons = cons
        return out

    def take_block(self, limit: int) -> Tuple[bytes, int, int]:
        """Like ``take_requests``, as one private copy of the slots: (bytes holding
        ``n`` entries of ``entry_size`` back to back, ``n``, ring index of the first).
        One copy of the whole run (two pieces when it wraps), read exactly once."""
        n = min(self.unconsumed(), limit)
        start = self.req_cons
        if n <= 0:
            return b"", 0, start
        self.fence()  # read the slots only after req_prod (rmb)
        size = self.entry_size
        first = start & self.mask
        buf = self.buf
        lo = RING_HEADER_SIZE + first * size
        if first + n <= self.slots:
            block = bytes(buf[lo:lo + n * size])
        else:
            k = self.slots - first
            block = bytes(buf[lo:lo + k * size]) + bytes(
                buf[RING_HEADER_SIZE:RING_HEADER_SIZE + (n - k) * size])
        self.req_cons = (start + n) & U32_MASK
        return block, n, start

    def put_response(self, raw: bytes) -> None:
        """Write one response at rsp_prod_pvt (not yet visible to the frontend)."""
        off = self.offset(self.rsp_prod_pvt)
        self.buf[off:off + len(raw)] = raw
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & U32_MASK

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish, then say whether to notify."""
        old = self.idx[RSP_PROD]
        new = self.rsp_prod_pvt
        if old == new:
            return False
        self.fence()  # responses visible before rsp_prod (wmb)
        self.idx[RSP_PROD] = new
        self.fence()  # rsp_prod visible before we read rsp_event (mb)
        event = self.idx[RSP_EVENT]
        return (new - event) & U32_MASK < (new - old) & U32_MASK

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: before sleeping, ask to be woken by the next
        request (req_event = req_cons + 1), then look once more. True: more work."""
        if self.unconsumed():
            return True
        self.idx[REQ_EVENT] = (self.req_cons + 1) & U32_MASK
        self.fence()  # req_event visible before we re-read req_prod (mb)
        return self.unconsumed() > 0


class FrontRing(_Ring):
    """The frontend's half, for the simulated guest: ``req_prod_pvt``, ``rsp_cons``."""

    def __init__(self, buf: memoryview, req_size: int, rsp_size: int, fence: Fence,
                 init: bool = True) -> None:
        super().__init__(buf, max(req_size, rsp_size), fence)
        self.rsp_size = rsp_size
        if init:  # SHARED_RING_INIT + FRONT_RING_INIT
            self.idx[REQ_PROD] = 0
            self.idx[RSP_PROD] = 0
            self.idx[REQ_EVENT] = 1
            self.idx[RSP_EVENT] = 1
        self.req_prod_pvt = self.idx[REQ_PROD]
        self.rsp_cons = self.idx[RSP_PROD]

    def free_slots(self) -> int:
        return self.slots - ((self.req_prod_pvt - self.rsp_cons) & U32_MASK)

    def put_request(self, raw: bytes) -> None:
        if self.free_slots() <= 0:
            raise RingError("ring full")
        off = self.offset(self.req_prod_pvt)
        self.buf[off:off + len(raw)] = raw
        self.req_prod_pvt = (self.req_prod_pvt + 1) & U32_MASK

    def push_requests(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY."""
        old = self.idx[REQ_PROD]
        new = self.req_prod_pvt
        self.fence()
        self.idx[REQ_PROD] = new
        self.fence()
        event = self.idx[REQ_EVENT]
        return (new - event) & U32_MASK < (new - old) & U32_MASK

    def take_responses(self) -> List[bytes]:
        rsp_prod = self.idx[RSP_PROD]
        n = (rsp_prod - self.rsp_cons) & U32_MASK
        if n > self.slots:
            raise RingError(f"rsp_prod {rsp_prod} is more than {self.slots} ahead of rsp_cons")
        if not n:
            return []
        self.fence()
        out = []
        for _ in range(n):
            off = self.offset(self.rsp_cons)
            out.append(bytes(self.buf[off:off + self.rsp_size]))
            self.rsp_cons = (self.rsp_cons + 1) & U32_MASK
        return out

    def final_check_for_responses(self) -> bool:
        if (self.idx[RSP_PROD] - self.rsp_cons) & U32_MASK:
            return True
        self.idx[RSP_EVENT] = (self.rsp_cons + 1) & U32_MASK
        self.fence()
        return (self.idx[RSP_PROD] - self.rsp_cons) & U32_MASK > 0
