"""One queue of the simulated guest's blkfront: its shared ring, its event channel,
the table of requests it has outstanding and the greenlet that takes responses.

Like Linux's ``struct blkfront_ring_info``: the ring lives in guest pages granted to
the backend, the event channel is allocated unbound for the backend to bind, and an
interrupt handler (here a greenlet waiting on the event-channel fd) consumes
responses with the RING_FINAL_CHECK_FOR_RESPONSES discipline. Every response is
checked: its id must be one this queue has outstanding (exactly one response per
request), its padding must be zero (XSA-216), its operation the one Linux expects
(the request's, ``indirect_op`` for INDIRECT) and its status a known one. Anything
else is counted as a protocol violation, never raised.

Runs on the hub. Must not import the engine, device, daemon or cli layers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import gevent
import gevent.event
from gevent.socket import wait_read

from ...blkif.abi import Abi
from ...blkif.const import PAGE_SIZE, Status
from ...blkif.ring import REQ_PROD, FrontRing, ring_bytes
from ...errors import RingError
from ..hypervisor.memory import GuestMemory

#: statuses a response may carry
KNOWN_STATUSES = frozenset(int(s) for s in Status)
#: how many answered ids a queue remembers to tell a duplicate from an unknown id
RECENT_IDS = 4096


class GuestEventChannel(Protocol):
    """The guest side of an event-channel handle (gblk.sim.hypervisor.evtchn.SimEventChannel)."""

    def alloc_unbound(self, remote_domid: int) -> int: ...
    def notify(self, port: int) -> None: ...
    def fileno(self) -> int: ...
    def pending(self) -> Optional[int]: ...
    def unmask(self, port: int) -> None: ...
    def unbind(self, port: int) -> None: ...
    def close(self) -> None: ...


class Part:
    """One ring request in flight (blkfront's ``struct blk_shadow``)."""

    __slots__ = (
        "id", "queue", "kind", "op", "expect_op", "sector", "nsectors", "pages",
        "indirect", "persistent", "parent", "offset", "token", "index", "result",
    )

    def __init__(self, id: int, queue: int, kind: str, op: int, expect_op: Optional[int],
                 sector: int = 0, nsectors: int = 0) -> None:
        self.id = id
        self.queue = queue
        self.kind = kind  #: read, write, flush, barrier, discard, raw
        self.op = op  #: operation byte as sent
        self.expect_op = expect_op  #: what the response must carry (None: anything)
        self.sector = sector
        self.nsectors = nsectors
        #: data pages: (frame, gref, first_sect, last_sect)
        self.pages: List[Tuple[int, int, int, int]] = []
        #: indirect descriptor pages: (frame, gref)
        self.indirect: List[Tuple[int, int]] = []
        self.persistent = False  #: grants come from (and go back to) the persistent pool
        self.parent: Any = None  #: the user operation this part belongs to
        self.offset = 0  #: byte offset of this part's data in the parent's buffer
        self.token: Any = None  #: verifier token
        self.index = 0  #: ring index of its slot
        self.result: Optional[gevent.event.AsyncResult] = None  #: raw parts only

    def grefs(self) -> List[int]:
        return [p[1] for p in self.pages]

    def indirect_grefs(self) -> List[int]:
        return [p[1] for p in self.indirect]


class FrontQueue:
    """Ring ``index`` of a frontend: pages, grants, event channel, outstanding table.

    ``on_response(part, status)`` is called for every valid response;
    ``on_violation(reason)`` for every protocol violation.
    """

    def __init__(self, index: int, memory: GuestMemory, backend_domid: int, abi: Abi,
                 order: int, evtchn: GuestEventChannel, fence: Callable[[], None],
                 on_response: Callable[[Part, int], None],
                 on_violation: Callable[[str], None]) -> None:
        self.index = index
        self.memory = memory
        self.backend_domid = backend_domid
        self.abi = abi
        self.order = order
        self.evtchn = evtchn
        self.on_response = on_response
        self.on_violation = on_violation
        self.outstanding: Dict[int, Part] = {}
        self._recent: "OrderedDict[int, None]" = OrderedDict()
        self.paused = False
        self.halted = False
        self._space = gevent.event.Event()
        self._greenlet: Optional[gevent.Greenlet] = None
        # counters
        self.events = 0
        self.spurious_events = 0
        self.notifications = 0
        self.responses = 0
        # response padding: the bytes a response with every field all-ones leaves zero
        probe = abi.rsp.pack(0xFFFFFFFFFFFFFFFF, 0xFF, -1)
        self._pad = [i for i, b in enumerate(probe) if b == 0]
        self.frames = _alloc_contiguous(memory, 1 << order)
        self.ring_refs: List[int] = []
        try:
            for f in self.frames:
                memory.page(f)[:] = bytes(PAGE_SIZE)
                self.ring_refs.append(memory.grant(f, backend_domid, readonly=False))
            self._view = pages_view(memory, self.frames[0], len(self.frames))
            self.ring = FrontRing(self._view, abi.req_size, abi.rsp_size, fence)
            self.port = evtchn.alloc_unbound(backend_domid)
        except BaseException:
            for gref in self.ring_refs:
                memory.end_access(gref)
            for f in self.frames:
                memory.free_page(f)
            raise

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop taking responses (idempotent; safe from inside the greenlet)."""
        g, self._greenlet = self._greenlet, None
        if g is not None and g is not gevent.getcurrent():
            g.kill(block=True, timeout=5)
        self._space.set()

    def release(self, end_grants: bool = True) -> List[Tuple[int, int]]:
        """Give back the ring: close the event channel and, with ``end_grants``, end
        the ring grants and free its pages. Returns (gref, frame) of ring grants the
        backend still maps (not freed: the caller retries later)."""
        self.stop()
        busy: List[Tuple[int, int]] = []
        try:
            self.evtchn.close()
        except Exception:  # noqa: BLE001 - the domain may be gone already
            pass
        self.ring.release()
        self._view.release()
        if end_grants:
            for gref, frame in zip(self.ring_refs, self.frames):
                try:
                    ended = self.memory.end_access(gref)
                except (ValueError, OSError):
                    continue
                if ended:
                    self.memory.free_page(frame)
                else:
                    busy.append((gref, frame))
        return busy

    # -- requests -----------------------------------------------------------------
    def wait_space(self, timeout: Optional[float] = None) -> bool:
        """Block until a slot is free (its response consumed). False on timeout."""
        while self.ring.free_slots() <= 0:
            self._space.clear()
            if not self._space.wait(timeout):
                return False
            if self._greenlet is None:
                return self.ring.free_slots() > 0
        return True

    def put(self, raw: bytes, part: Optional[Part] = None) -> int:
        """Place ``raw`` in the next slot (not yet published). Returns its index."""
        index = self.ring.req_prod_pvt
        self.ring.put_request(raw[: self.ring.entry_size])
        if part is not None:
            part.index = index
            if part.id in self.outstanding:
                raise ValueError(f"request id {part.id:#x} is already outstanding")
            self.outstanding[part.id] = part
        return index

    def push(self, notify: Optional[bool] = None) -> bool:
        """Publish what was put (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY) and notify when
        the ring says so (or always/never when ``notify`` says so)."""
        need = self.ring.push_requests()
        if notify is None:
            notify = need
        if notify:
            self.notify()
        return need

    def notify(self) -> None:
        self.evtchn.notify(self.port)
        self.notifications += 1

    def set_req_prod(self, value: int) -> None:
        """Hostile: publish an arbitrary producer index."""
        self.ring.idx[REQ_PROD] = value & 0xFFFFFFFF

    def write_slot(self, index: int, raw: bytes) -> None:
        """Hostile: (re)write the slot of ring index ``index``, published or not."""
        off = self.ring.offset(index)
        raw = raw[: self.ring.entry_size]
        self.ring.buf[off:off + len(raw)] = raw

    # -- responses ----------------------------------------------------------------
    def _run(self) -> None:
        fd = self.evtchn.fileno()
        while True:
            wait_read(fd)
            got = False
            while True:
                port = self.evtchn.pending()
                if port is None:
                    break
                got = True
                self.events += 1
                if not self.process():
                    self.spurious_events += 1
                self.evtchn.unmask(port)
            if not got:
                self.spurious_events += 1

    def process(self) -> bool:
        """Take every response there is (with the final check). True if any."""
        if self.paused or self.halted:
            return False
        any_rsp = False
        while True:
            try:
                raws = self.ring.take_responses()
            except RingError:
                self.halted = True
                self.on_violation("bogus_rsp_prod")
                return any_rsp
            if raws:
                any_rsp = True
                self._space.set()
                for raw in raws:
                    self._handle(raw)
            if not self.ring.final_check_for_responses():
                return any_rsp

    def _handle(self, raw: bytes) -> None:
        self.responses += 1
        rid, op, status = self.abi.parse_response(raw)
        if any(raw[i] for i in self._pad):
            self.on_violation("response_padding")
        part = self.outstanding.pop(rid, None)
        if part is None:
            self.on_violation("duplicate_response" if rid in self._recent else "unknown_id")
            return
        self._recent[rid] = None
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)
        if part.expect_op is not None and op != part.expect_op:
            self.on_violation("wrong_operation")
        if status not in KNOWN_STATUSES:
            self.on_violation("bad_status")
        self.on_response(part, status)


def pages_view(memory: GuestMemory, first_frame: int, count: int) -> memoryview:
    """One writable view of ``count`` adjacent guest frames (a multi-page ring)."""
    fn = getattr(memory, "pages_view", None)
    if fn is not None:
        view: memoryview = fn(first_frame, count)
        return view
    if count == 1:
        return memory.page(first_frame)
    mem: memoryview = memory._mem  # noqa: SLF001 - the guest's own mapping of its RAM
    return mem[first_frame * PAGE_SIZE:(first_frame + count) * PAGE_SIZE]


def _alloc_contiguous(memory: GuestMemory, count: int) -> List[int]:
    """``count`` adjacent free frames (ring pages must be virtually contiguous)."""
    run: List[int] = []
    spare: List[int] = []
    try:
        while len(run) < count:
            f = memory.alloc_page()
            if run and f != run[-1] + 1:
                spare.extend(run)
                run = []
            run.append(f)
    except BaseException:
        spare.extend(run)
        raise
    finally:
        for f in spare:
            memory.free_page(f)
    return run


def ring_pages(order: int) -> int:
    return ring_bytes(order) // PAGE_SIZE
