"""The dataplane of one connected disk: its rings, its page source, its limits.

The device (``gblk.device.device``) is the only caller, through five verbs in the
manner of QEMU's xen-block dataplane: create (the constructor), ``start(queues)``,
``stop(timeout)``, ``resize(limits)`` and ``set_persistent_limit(n)``. Everything the
rings share lives here once: the store, the grant table, the ABI, the page source
(``gblk.engine.pages``: copy, map or persistent), the limits the frontend was told,
the daemon's event-channel handle (``gblk.engine.handles``), the threadpool (guests' IO), the control pool (ring maps and teardown unmaps, each with
a deadline: ``gblk.engine.control``) and the device's stats. Runs on the hub.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ..blkif.abi import Abi
from ..blkif.validate import DiskLimits
from ..storage import Store
from ..xen.interfaces import GrantTable, XenHost
from . import jobs
from .cbt import Tracker
from .control import ControlPool
from .handles import EventChannels
from .iopool import IOPool
from .pages import PageSource
from .ring import RingWorker
from .snapshot import PointInTime
from .stats import DeviceStats, RingStats
from .throttle import DiskThrottle


class Dataplane:
    """The rings of one connection of one disk.

    ``path`` is the page path (``persistent``, ``map`` or ``copy``, see
    ``gblk.engine.pages``). ``start`` raises GblkError when a ring cannot be mapped or
    bound, after stopping the rings it did start.
    """

    def __init__(
        self,
        host: XenHost,
        gnttab: GrantTable,
        store: Store,
        domid: int,
        abi: Abi,
        limits: DiskLimits,
        path: str,
        pool: Any,
        control: ControlPool,
        device_stats: DeviceStats,
        log: logging.LoggerAdapter,
        guest_log: Callable[[str], None],
        max_persistent_grants: int,
        persistent_grant_idle: float,
        journal_prefix: Optional[str] = None,
        adopt: bool = False,
        throttle: Optional[DiskThrottle] = None,
        cbt: Optional[Tracker] = None,
        cbw: Optional[PointInTime] = None,
        events: Optional[EventChannels] = None,
    ) -> None:
        self.host = host
        #: the daemon's shared event-channel handle (a handle of this disk's own if None)
        self.events = events if events is not None else EventChannels(host.open_event_channel)
        self.gnttab = gnttab
        self.store = store
        self.domid = domid
        self.abi = abi
        #: this disk's share of the IO threads (spawn never blocks: gblk.engine.iopool)
        self.pool = IOPool.of(pool).device()
        self.control = control
        self.device_stats = device_stats
        self.log = log
        self.guest_log = guest_log
        self.max_persistent_grants = max_persistent_grants
        self.persistent_grant_idle = persistent_grant_idle
        #: each ring's journal is ``<prefix>-q<queue>`` (None: no journals); ``adopt``:
        #: a takeover, so a journal a dead process left is trusted (gblk.engine.journal)
        self.journal_prefix = journal_prefix
        self.adopt = adopt
        self.job = jobs.JobContext(gnttab, store, domid, limits, path)
        self.pages: PageSource = self.job.pages
        self.rings: List[RingWorker] = []
        #: the disk's IO limits and dirty bitmap (None: none); the rings read them at
        #: each request, so a change applies at once
        self.throttle = throttle
        self.cbt = cbt
        #: the point-in-time view of an export open on the disk (None: none), asked
        #: before each write is issued (copy-before-write)
        self.cbw = cbw

    @property
    def path(self) -> str:
        return self.pages.name

    @property
    def limits(self) -> DiskLimits:
        return self.job.limits

    def start(self, queues: Sequence[Tuple[Tuple[int, ...], int]]) -> None:
        """One ring per (ring refs, remote event-channel port), queue numbers in order."""
        try:
            for i, (refs, port) in enumerate(queues):
                rs = RingStats(queue=i)
                self.device_stats.rings[i] = rs
                w = RingWorker(self, i, tuple(refs), port, rs)
                self.rings.append(w)
                w.start()
        except BaseException:
            self.stop(1.0)
            raise

    def stop(self, timeout: float) -> None:
        """Answer every consumed request (at most ``timeout`` seconds in all, however
        many rings), then release every mapping and event channel. Idempotent."""
        rings, self.rings = self.rings, []
        deadline = time.monotonic() + timeout
        for w in rings:
            w.stop(max(0.2, deadline - time.monotonic()))

    def resize(self, limits: DiskLimits) -> None:
        """New limits (the store grew or shrank): every request checked from now on
        is checked against them."""
        self.job.limits = limits

    def set_persistent_limit(self, limit: int) -> None:
        self.max_persistent_grants = limit
        for w in self.rings:
            w.set_persistent_limit(limit)
