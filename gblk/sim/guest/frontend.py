"""A simulated guest's block frontend that behaves like Linux's xen-blkfront.

Negotiation (``drivers/block/xen-blkfront.c``): wait for the backend's InitWait;
read ``max-ring-page-order``, ``multi-queue-max-queues``,
``feature-max-indirect-segments`` and ``feature-persistent``; pick the ring order
(``min`` with our own limit), the number of queues (at least one), indirect
segments (none unless more than 11 are offered) and persistent grants; allocate and
grant the ring pages, allocate unbound event channels; write, in one transaction,
``ring-ref`` (order 0) or ``ring-page-order`` + ``ring-ref<i>``, per queue under
``queue-<n>/`` when there are several (then ``multi-queue-num-queues``),
``event-channel``, ``protocol`` and ``feature-persistent``; switch to Initialised;
wait for Connected; read ``sectors``/``info``/``sector-size`` (required) and the
features; switch to Connected. Later backend state changes are followed as blkfront
does: Connected again means "re-read the size" (online resize), Closing means close,
Closed or a vanished backend means disconnect. ``close()``, ``reconnect()`` and
``reboot()`` (Linux's xenbus_reset_frontend: 5, 6, then back to Initialising with
new rings) drive the state machine from the guest side.

IO: READ, WRITE, FLUSH_DISKCACHE (with or without data), WRITE_BARRIER, DISCARD
(and secure) and INDIRECT, many requests in flight on every queue, each user
operation split into requests of at most 11 segments, or INDIRECT ones of up to the
negotiated maximum. Pages come from a pool of persistent grants (granted once,
read-write, never revoked while the backend may use them) when persistent grants
were negotiated, otherwise each request grants its pages afresh (read-only for the
data of a write) and ends the grants when the response arrives; a grant the backend
still maps at that point is counted (``grants_busy_after_response``) and quarantined,
never reused. Every byte read back is checked against a shadow copy
(``gblk.sim.guest.verify``); bytes of a page outside a READ's sectors are checked
untouched (XSA-403 canary). Responses are checked by ``gblk.sim.guest.ring``.

Hooks for hostile tests: ``mutate=`` on every submit (change or replace the request
before it is placed), ``put_raw``, ``push``, ``set_req_prod``, ``rewrite_slot``,
``revoke_grant``, ``notify(count=)``, ``set_state``, ``write_node``/``remove_node``,
``pause_responses``, ``outstanding_requests``.

Split over modules: ``values`` (options, results, counters, errors, all
re-exported here), ``ring`` (one queue: ring, event channel, response checks),
``verify`` (the shadow copy), ``blkio`` (the IO half: pages, requests, completions,
a mixin) and ``hooks`` (the hostile hooks, a mixin); this module negotiates, follows
the backend's state and tears down.

Runs on the gevent hub (one greenlet per queue, one watching the backend); every
XenStore access goes through a ``gblk.xen.interfaces.XenStore`` acting as the guest.
Must not import the engine, device, daemon or cli layers.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import gevent
import gevent.event
import gevent.lock

from ...blkif import xenbus as xb
from ...blkif.abi import Abi, abi_for_protocol
from ...blkif.const import (
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    SEGS_PER_INDIRECT_FRAME,
    Status,
    XenbusState,
)
from ...errors import GblkError, XenStoreError
from ...xen.interfaces import XenStore, XenStoreOps
from .blkio import CANARY, Buffer, FrontendIO, Mutate, _Budget, segments_for
from .hooks import FrontendHooks
from .ring import FrontQueue, GuestEventChannel
from .values import (
    NATIVE_PROTOCOL,
    DiskInfo,
    FrontendError,
    FrontendOptions,
    FrontendStats,
    FrontendTimeout,
    IOFailed,
    IoResult,
    NotConnected,
    Offer,
    PartInfo,
    RawResponse,
)
from .verify import Mismatch, Verifier
from ..hypervisor.memory import GuestMemory

log = logging.getLogger(__name__)

__all__ = [
    "CANARY", "NATIVE_PROTOCOL", "Buffer", "DiskInfo", "Frontend", "FrontendError",
    "FrontendOptions",
    "FrontendStats", "FrontendTimeout", "GuestEventChannel", "IOFailed", "IoResult",
    "Mismatch", "Mutate", "NotConnected", "Offer", "PartInfo", "RawResponse", "segments_for",
]


class Frontend(FrontendIO, FrontendHooks):
    """A Linux-like blkfront for device ``devid`` of guest ``domid``.

    ``xs`` is the guest's XenStore connection, ``memory`` its RAM and grant table,
    ``evtchn_factory()`` opens one guest event-channel handle (one per queue).
    """

    def __init__(self, xs: XenStore, memory: GuestMemory,
                 evtchn_factory: Callable[[], GuestEventChannel], domid: int,
                 devid: int = 51712, options: Optional[FrontendOptions] = None,
                 fence: Optional[Callable[[], None]] = None) -> None:
        if fence is None:
            from ...xen.barrier import fence as default_fence

            fence = default_fence
        self.xs = xs
        self.memory = memory
        self.evtchn_factory = evtchn_factory
        self.domid = domid
        self.devid = devid
        self.handle = devid & 0xFFFF
        self.options = options or FrontendOptions()
        self.fence = fence
        self.path = xb.frontend_path(domid, devid)
        self.backend_path = ""
        self.backend_id = 0
        self.state: int = XenbusState.INITIALISING
        self.offer = Offer()
        self.disk = DiskInfo()
        self.abi: Abi = abi_for_protocol(self.options.protocol)
        self.ring_page_order = 0
        self.nr_queues = 1
        self.persistent = False
        self._memory_gone = False
        self.max_indirect_segments = 0
        self.queues: List[FrontQueue] = []
        self.stats = FrontendStats()
        self.verifier: Optional[Verifier] = None
        self.connected = False
        #: set whenever the backend's state was looked at by the watcher
        self.changed = gevent.event.Event()
        self.closed_by_backend = gevent.event.Event()
        self._lock = gevent.lock.RLock()
        self._user_transition = False
        self._watcher: Optional[gevent.Greenlet] = None
        self._ids = itertools.count(self.options.id_base)
        self._rr = 0
        self._budget = _Budget(max(self.options.max_inflight_pages,
                                   BLKIF_MAX_SEGMENTS_PER_REQUEST))
        self._free_frames: List[int] = []
        self._pool_free: List[Tuple[int, int]] = []  # persistent (frame, gref)
        self._pool_all: List[Tuple[int, int]] = []
        self._quarantine: List[Tuple[int, int]] = []  # (gref, frame) not yet ended
        self._idle = gevent.event.Event()
        self._idle.set()
        self._inflight = 0

    def __repr__(self) -> str:
        return f"<Frontend d{self.domid}/{self.devid} state={self.state}>"

    # =====================================================================
    # XenStore helpers
    # =====================================================================
    def _read(self, key: str) -> Optional[str]:
        return self.xs.read(f"{self.path}/{key}")

    def _be_read(self, key: str) -> Optional[str]:
        """A backend node; None when it is missing. A node of a backend directory
        that was removed reads as EACCES from a guest (its parent is dom0's and not
        readable): that is "missing" too, as xenbus_read_driver_state treats it."""
        try:
            return self.xs.read(f"{self.backend_path}/{key}")
        except XenStoreError as e:
            if e.errno_name in ("EACCES", "ENOENT"):
                return None
            raise

    def _be_read_many(self, keys: Sequence[str]) -> Dict[str, Optional[str]]:
        """Backend nodes in one pipelined batch, as ``_be_read`` reads each."""
        try:
            values = self.xs.read_many([f"{self.backend_path}/{k}" for k in keys])
        except XenStoreError as e:
            if e.errno_name not in ("EACCES", "ENOENT"):
                raise
            return {k: self._be_read(k) for k in keys}  # the directory went: one by one
        return dict(zip(keys, values))

    def backend_state(self) -> Optional[int]:
        return xb.parse_state(self._be_read(xb.STATE) if self.backend_path else None)

    def _set_state(self, state: int) -> None:
        self.xs.write(f"{self.path}/{xb.STATE}", str(int(state)))
        self.state = int(state)

    def _discover_backend(self) -> None:
        be = self._read(xb.BACKEND)
        if be is None:
            raise FrontendError(f"{self.path}/backend missing: no disk attached")
        self.backend_path = be
        bid = self._read(xb.BACKEND_ID)
        self.backend_id = int(bid) if bid is not None and bid.strip().isdigit() else 0

    def _backend_error(self) -> str:
        bits = []
        for key in (xb.HOTPLUG_ERROR, xb.HOTPLUG_STATUS):
            try:
                value = self._be_read(key)
            except GblkError:
                value = None
            if value:
                bits.append(f"{key}={value!r}")
        try:
            err = self.xs.read(f"/local/domain/{self.backend_id}/error"
                               f"{self.backend_path}/error")
        except GblkError:
            err = None
        if err:
            bits.append(f"error={err!r}")
        return ("; backend says " + ", ".join(bits)) if bits else ""

    def _refused(self, state: Optional[int]) -> bool:
        """The backend gave up on the device (Closed with hotplug-status=error): Linux
        would wait forever, a test wants the reason now."""
        return state == XenbusState.CLOSED and self._be_read(xb.HOTPLUG_STATUS) == "error"

    def wait_backend(self, accept: Callable[[Optional[int]], bool], timeout: float,
                     what: str) -> Optional[int]:
        """Wait until ``accept(backend state)``; FrontendTimeout otherwise."""
        sub = self.xs.watch([f"{self.backend_path}/{xb.STATE}"])
        try:
            deadline = time.monotonic() + timeout
            while True:
                st = self.backend_state()
                if accept(st):
                    return st
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FrontendTimeout(
                        f"d{self.domid}/{self.devid}: {what}: backend state {st} after "
                        f"{timeout:g}s{self._backend_error()}")
                sub.get(timeout=left)
        finally:
            sub.close()

    # =====================================================================
    # the state machine
    # =====================================================================
    def connect(self, timeout: Optional[float] = None) -> "Frontend":
        """Negotiate and connect (the frontend must be Initialising: fresh, or after
        ``reconnect``). Returns self."""
        timeout = self.options.timeout if timeout is None else timeout
        with self._transition():
            if self.connected:
                return self
            self._discover_backend()
            if self.state != XenbusState.INITIALISING or self._read(xb.STATE) != "1":
                self._set_state(XenbusState.INITIALISING)
            if self.options.wait_initwait:
                st = self.wait_backend(lambda s: s == XenbusState.INIT_WAIT or self._refused(s),
                                       timeout, "waiting for InitWait")
                if st != XenbusState.INIT_WAIT:
                    raise FrontendError(f"d{self.domid}/{self.devid}: the backend refused the "
                                        f"device (state {st}){self._backend_error()}")
            self._read_offer()
            self._setup_rings()
            try:
                self._write_ring_nodes()
                self._set_state(XenbusState.INITIALISED)
                st = self.wait_backend(
                    lambda s: s in (XenbusState.CONNECTED, XenbusState.CLOSING,
                                    XenbusState.CLOSED, None),
                    timeout, "waiting for Connected")
                if st != XenbusState.CONNECTED:
                    raise FrontendError(
                        f"d{self.domid}/{self.devid}: backend went to state {st} instead of "
                        f"Connected{self._backend_error()}")
                self._read_disk()
            except BaseException:
                self._teardown(end_grants=True, lost=True)
                raise
            self.connected = True
            self.closed_by_backend.clear()
            self.stats.connects += 1
            self._set_state(XenbusState.CONNECTED)
            self._start_watcher()
        return self

    def _read_offer(self) -> None:
        self.offer = xb.parse_offer(self._be_read_many(xb.OFFER_NODES).get)
        self.ring_page_order = max(0, min(self.offer.max_ring_page_order,
                                          self.options.max_ring_page_order))
        self.nr_queues = max(1, min(self.offer.max_queues, self.options.max_queues))

    def _setup_rings(self) -> None:
        self.abi = abi_for_protocol(self.options.protocol)
        self.queues = []
        try:
            for i in range(self.nr_queues):
                evtchn = self.evtchn_factory()
                try:
                    q = FrontQueue(i, self.memory, self.backend_id, self.abi,
                                   self.ring_page_order, evtchn, self.fence,
                                   self._on_response, self._violation)
                except BaseException:
                    evtchn.close()
                    raise
                self.queues.append(q)
        except BaseException:
            for q in self.queues:
                self._quarantine.extend(q.release())
            self.queues = []
            raise
        for q in self.queues:
            q.start()

    def _write_ring_nodes(self) -> None:
        opts = self.options
        setup = xb.RingSetup(
            self.ring_page_order,
            tuple(xb.QueueSpec(tuple(q.ring_refs), q.port) for q in self.queues),
            opts.protocol, opts.persistent, opts.legacy_ring_ref)

        def fn(tx: XenStoreOps) -> None:
            # nodes of an earlier connection must not mislead the backend
            for name in tx.directory(self.path):
                if xb.stale_frontend_node(name):
                    tx.rm(f"{self.path}/{name}")
            if opts.protocol is None:
                tx.rm(f"{self.path}/{xb.PROTOCOL}")
            # blkfront writes these one after another in its transaction; the simulated
            # guest sends them all at once (the same nodes when it commits)
            tx.write_many([(f"{self.path}/{k}", v) for k, v in xb.frontend_nodes(setup)])

        self.xs.transaction(fn)

    def _read_disk(self) -> None:
        """blkfront_connect + blkfront_gather_backend_features."""
        got = self._be_read_many(xb.DISK_NODES)
        missing = [k for k in xb.REQUIRED_DISK_NODES if got[k] is None]
        if missing:
            raise FrontendError(f"d{self.domid}/{self.devid}: backend did not write "
                                f"{', '.join(missing)}")
        d = xb.parse_disk(got.get)
        indirect = d.max_indirect_segments
        self.disk = d
        self.persistent = self.options.persistent and d.persistent
        indirect = min(indirect, self.options.max_indirect_segments,
                       SEGS_PER_INDIRECT_FRAME * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
        self.max_indirect_segments = indirect if indirect > BLKIF_MAX_SEGMENTS_PER_REQUEST else 0
        if self.verifier is None:
            self.verifier = Verifier(d.sectors, initial_zero=self.options.initial_zero)
        else:
            self.verifier.resize(d.sectors)

    def _start_watcher(self) -> None:
        if self._watcher is None or self._watcher.dead:
            self._watcher = gevent.spawn(self._watch_backend)

    def _watch_backend(self) -> None:
        """blkfront's backend_changed while connected."""
        sub = self.xs.watch([f"{self.backend_path}/{xb.STATE}"])
        try:
            while self.connected:
                sub.get(timeout=None)
                if self._user_transition or not self.connected:
                    self.changed.set()
                    continue
                try:
                    st = self.backend_state()
                    if st == XenbusState.CONNECTED:
                        self._check_resize()
                    elif st == XenbusState.CLOSING:
                        self._backend_closing()
                    elif st in (XenbusState.CLOSED, XenbusState.UNKNOWN, None):
                        self._backend_gone()
                except GblkError as e:
                    log.warning("d%d/%d: reacting to the backend: %s", self.domid, self.devid, e)
                self.changed.set()
        finally:
            sub.close()

    def _check_resize(self) -> None:
        value = self._be_read(xb.SECTORS)
        if value is None or not value.strip().isdigit():
            return
        sectors = int(value)
        if sectors != self.disk.sectors:
            log.info("d%d/%d: disk resized from %d to %d sectors", self.domid, self.devid,
                     self.disk.sectors, sectors)
            self.disk.sectors = sectors
            if self.verifier is not None:
                self.verifier.resize(sectors)
            self.stats.resizes += 1

    def _backend_closing(self) -> None:
        """The backend (or the toolstack) closes: blkfront_closing."""
        with self._lock:
            if not self.connected:
                return
            self._stop_io()
            self.wait_idle(self.options.timeout)
            self._set_state(XenbusState.CLOSED)
            try:
                self.wait_backend(lambda s: s in (XenbusState.CLOSED, None),
                                  self.options.timeout, "waiting for the backend's Closed")
            except FrontendTimeout as e:
                log.warning("%s", e)
            self._teardown(end_grants=True, lost=True)
            self.closed_by_backend.set()

    def _backend_gone(self) -> None:
        """The backend is Closed or its directory vanished while we were connected."""
        with self._lock:
            if not self.connected:
                return
            self._stop_io()
            for q in self.queues:
                q.process()
            if self._read(xb.STATE) is not None:
                try:
                    self._set_state(XenbusState.CLOSED)
                except GblkError:
                    pass
            self._teardown(end_grants=True, lost=True)
            self.closed_by_backend.set()

    @contextlib.contextmanager
    def _transition(self) -> Iterator[None]:
        """A guest-driven transition: the watcher keeps its hands off meanwhile."""
        with self._lock:
            outer = self._user_transition
            self._user_transition = True
            try:
                yield
            finally:
                self._user_transition = outer

    def close(self, timeout: Optional[float] = None) -> None:
        """Guest-initiated close: Closing, wait for the backend's Closing (or Closed),
        let outstanding requests finish, Closed, wait for the backend's Closed, give
        the rings and grants back. Idempotent."""
        timeout = self.options.timeout if timeout is None else timeout
        with self._transition():
            if not self.connected:
                if self.queues:
                    self._teardown(end_grants=True, lost=True)
                return
            self._stop_io()
            self._set_state(XenbusState.CLOSING)
            try:
                self.wait_backend(lambda s: s in (XenbusState.CLOSING, XenbusState.CLOSED, None),
                                  timeout, "waiting for the backend's Closing")
                self.wait_idle(timeout)
                self._set_state(XenbusState.CLOSED)
                self.wait_backend(lambda s: s in (XenbusState.CLOSED, None), timeout,
                                  "waiting for the backend's Closed")
            finally:
                if self.state != XenbusState.CLOSED:
                    self._set_state(XenbusState.CLOSED)
                self._teardown(end_grants=True, lost=True)

    def reconnect(self, timeout: Optional[float] = None) -> "Frontend":
        """After a close: back to Initialising and connect again with new rings
        (what a driver reload does). The backend must be Closed and online."""
        timeout = self.options.timeout if timeout is None else timeout
        with self._transition():
            if self.connected:
                raise FrontendError("reconnect: still connected (close first)")
            if self.queues:
                self._teardown(end_grants=True, lost=True)
            self._set_state(XenbusState.INITIALISING)
        return self.connect(timeout)

    def reboot(self, timeout: Optional[float] = None) -> "Frontend":
        """The guest reboots (kexec): outstanding requests are abandoned, then, as
        Linux's xenbus_reset_frontend does when the backend is still connected,
        Closing, wait for the backend's Closing, Closed, wait for Closed; then
        Initialising and a fresh connection with new rings."""
        timeout = self.options.timeout if timeout is None else timeout
        with self._transition():
            self._stop_io()
            for q in self.queues:
                q.stop()
            self._abandon_outstanding()
            st = self.backend_state()
            if st in (XenbusState.INITIALISED, XenbusState.CONNECTED, XenbusState.CLOSING):
                self._set_state(XenbusState.CLOSING)
                self.wait_backend(lambda s: s in (XenbusState.CLOSING, XenbusState.CLOSED, None),
                                  timeout, "reset: waiting for the backend's Closing")
                self._set_state(XenbusState.CLOSED)
                self.wait_backend(lambda s: s in (XenbusState.CLOSED, None), timeout,
                                  "reset: waiting for the backend's Closed")
            self._teardown(end_grants=True, lost=True)
            self._set_state(XenbusState.INITIALISING)
        return self.connect(timeout)

    def abandon(self) -> None:
        """Stop everything without a word to XenStore or the grant table (the domain
        was destroyed under us). Idempotent."""
        with self._lock:
            self._stop_io()
            self._memory_gone = True
            self._teardown(end_grants=False, lost=True)
            self._kill_watcher()

    def stop(self) -> None:
        """Teardown for fixtures: close politely if the backend answers quickly,
        otherwise just let go."""
        try:
            if self.connected:
                self.close(timeout=min(5.0, self.options.timeout))
        except GblkError as e:
            log.debug("d%d/%d: close during stop: %s", self.domid, self.devid, e)
        finally:
            if self.queues:
                self._teardown(end_grants=True, lost=True)
            self._kill_watcher()
            if self.verifier is not None:
                self.verifier.close()
                self.verifier = None

    def _kill_watcher(self) -> None:
        w, self._watcher = self._watcher, None
        if w is not None and w is not gevent.getcurrent():
            w.kill(block=True, timeout=5)

    def _stop_io(self) -> None:
        self.connected = False

    # =====================================================================
    # teardown
    # =====================================================================
    def _abandon_outstanding(self) -> None:
        for q in self.queues:
            for part in list(q.outstanding.values()):
                q.outstanding.pop(part.id, None)
                self._finish_part(part, Status.ERROR, lost=True)

    def _teardown(self, end_grants: bool, lost: bool) -> None:
        """Give back rings, event channels and grants (the backend let go of them:
        it is Closed, or gone). Outstanding requests fail as lost."""
        self.connected = False
        for q in self.queues:
            q.stop()
        self._abandon_outstanding()
        for q in self.queues:
            busy = q.release(end_grants=end_grants)
            self._quarantine.extend(busy)
        self.queues = []
        if end_grants:
            for frame, gref in self._pool_all:
                self._end_or_quarantine(gref, frame)
            self._retry_quarantine()
            self.stats.grant_leaks = len(self._quarantine)
        self._pool_all = []
        self._pool_free = []
        self._budget = _Budget(self._budget.total)
        self._inflight = 0
        self._idle.set()
        if self._watcher is not None and self._watcher is not gevent.getcurrent():
            self._kill_watcher()

    def _end_or_quarantine(self, gref: int, frame: int) -> bool:
        try:
            ended = self.memory.end_access(gref)
        except (ValueError, OSError):
            return False
        if ended:
            self._free_frames.append(frame)
        else:
            self._quarantine.append((gref, frame))
        return ended

    def _retry_quarantine(self) -> int:
        """End the grants the backend had not let go of; how many are still held."""
        still = []
        for gref, frame in self._quarantine:
            try:
                ended = self.memory.end_access(gref)
            except (ValueError, OSError):
                continue
            if ended:
                self._free_frames.append(frame)
            else:
                still.append((gref, frame))
        self._quarantine = still
        return len(still)

    def retry_grants(self) -> int:
        """Public: retry ending quarantined grants; returns how many remain."""
        n = self._retry_quarantine()
        self.stats.grant_leaks = n
        return n

    def grants_in_use(self) -> int:
        """Grant refs this guest has in use (all devices of the domain)."""
        return self.memory.grants_in_use()
