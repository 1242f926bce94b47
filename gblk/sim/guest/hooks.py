"""Low-level hooks of the simulated frontend, for hostile tests.

A mixin of ``gblk.sim.guest.frontend.Frontend``: place arbitrary bytes in a slot
(``put_raw``), publish later (``push``) or a bogus producer index (``set_req_prod``),
rewrite a slot after publishing it (``rewrite_slot``, XSA-155), revoke a grant the
backend may be using (``revoke_grant``, XSA-396), flood notifications (``notify``,
XSA-332), write our state or any node (``set_state``, ``write_node``,
``remove_node``), hold responses back (``pause_responses``), see what is in flight
(``outstanding_requests``). Together with ``mutate=`` on every submit, enough to
build any request a broken or malicious guest could. Runs on the hub; no checks
here beyond what keeps the frontend's own bookkeeping consistent.
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import gevent.event

from ...blkif.abi import Abi, Request
from ...xen.interfaces import XenStore
from .ring import FrontQueue, Part
from .values import FrontendStats, PartInfo
from ..hypervisor.memory import GuestMemory


class FrontendHooks:
    """The hostile half of a Frontend (see the module docstring)."""

    # provided by Frontend
    queues: List[FrontQueue]
    abi: Abi
    memory: GuestMemory
    stats: FrontendStats
    xs: XenStore
    path: str
    _ids: Iterator[int]

    def _set_state(self, state: int) -> None:  # pragma: no cover - Frontend's
        raise NotImplementedError

    def queue(self, index: int = 0) -> FrontQueue:
        return self.queues[index]

    def put_raw(self, raw: bytes, queue: int = 0, push: bool = True,
                notify: Optional[bool] = None, expect_id: Optional[int] = None,
                expect_response: bool = True) -> Optional[gevent.event.AsyncResult]:
        """Place arbitrary bytes in the next slot of ``queue``. The response (its id
        is read from the bytes unless ``expect_id``) resolves the returned
        AsyncResult with a RawResponse; without ``expect_response`` nothing is
        registered (a response will count as ``unknown_id``)."""
        q = self.queues[queue]
        raw = bytes(raw).ljust(self.abi.req_size, b"\0")[: self.abi.req_size]
        result = None
        part = None
        if expect_response:
            rid = self.abi.head.unpack_from(raw)[3] if expect_id is None else expect_id
            part = Part(rid, queue, "raw", raw[0], None)
            part.result = result = gevent.event.AsyncResult()
        q.put(raw, part)
        self.stats.requests += 1
        if push:
            q.push(notify)
        return result

    def pack(self, req: Request) -> bytes:
        """The request packed for this frontend's ABI."""
        return self.abi.pack_request(req)

    def new_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFFFFFFFFFF

    def push(self, queue: int = 0, notify: Optional[bool] = None) -> bool:
        """Publish what was placed with ``push=False``."""
        return self.queues[queue].push(notify)

    def set_req_prod(self, value: int, queue: int = 0, notify: bool = True) -> None:
        """Hostile: publish a bogus producer index (and kick the backend)."""
        q = self.queues[queue]
        q.set_req_prod(value)
        if notify:
            q.notify()

    def rewrite_slot(self, index: int, raw: bytes, queue: int = 0) -> None:
        """Hostile (XSA-155): rewrite the slot of ring index ``index`` after publishing."""
        self.queues[queue].write_slot(index, raw)

    def revoke_grant(self, gref: int) -> None:
        """Hostile (XSA-396): revoke a grant the backend may be using."""
        self.memory.revoke(gref)

    def notify(self, queue: int = 0, count: int = 1) -> None:
        """Send ``count`` notifications (a storm: XSA-332)."""
        q = self.queues[queue]
        for _ in range(count):
            q.notify()

    def set_state(self, state: int) -> None:
        """Hostile: write our XenBus state node, nothing else."""
        self._set_state(state)

    def write_node(self, name: str, value: str) -> None:
        self.xs.write(f"{self.path}/{name}", value)

    def remove_node(self, name: str) -> None:
        self.xs.rm(f"{self.path}/{name}")

    def pause_responses(self, queue: Optional[int] = None) -> None:
        """Stop consuming responses (requests stay outstanding, the ring fills)."""
        for q in self._queues(queue):
            q.paused = True

    def resume_responses(self, queue: Optional[int] = None) -> None:
        for q in self._queues(queue):
            q.paused = False
            q.process()

    def poll(self, queue: Optional[int] = None) -> None:
        """Consume responses without waiting for an event."""
        for q in self._queues(queue):
            q.process()

    def _queues(self, queue: Optional[int]) -> List[FrontQueue]:
        return list(self.queues) if queue is None else [self.queues[queue]]

    def outstanding_requests(self) -> List[PartInfo]:
        out = []
        for q in self.queues:
            for p in q.outstanding.values():
                out.append(PartInfo(p.id, q.index, p.kind, p.op, p.sector, p.nsectors,
                                    p.index, p.grefs(), p.indirect_grefs()))
        return out
