"""Prometheus collector over gblk's plain statistics objects.

``GblkCollector`` reads a :class:`gblk.engine.stats.DaemonStats` when Prometheus
scrapes and turns it into metric families. The engine and control plane never
call into this module: they bump plain ints, and nothing on the request path
waits for a scrape.

Where the stats are read: only on the hub, where the engine writes them, so no
lock is needed. Either ``collect()`` itself runs on the hub (no greenlet switch
inside it: a consistent view), or, as the exporter does it, the hub takes
``GblkRegistry.prepare_scrape()`` (a copy of the stats, about 1.5 ms for a
hundred two-queue disks) and the expensive part, building the families and
encoding some 10k samples, runs on the copy in a worker thread.

What it must not do: mutate the stats (every read of a ``defaultdict`` goes
through ``.get`` so that a scrape never creates an entry), import anything from
gblk beyond ``gblk.engine.stats`` and ``gblk.errors`` (the version string comes
from the root package, which is not a layer), or keep state between scrapes: a
device that left ``DaemonStats.devices`` has no series in the next scrape.

Label scheme (low cardinality, documented in monitoring/README.md):
``domain``, ``device`` (the devid) and ``kind`` (vbd, qdisk, vbd3) on every
per-device series; ``queue`` only on the series that describe one ring
(in-flight, pending, slots, halted, notifications); ``op`` and ``reason`` where
the metric is split that way. Request, byte, latency, error, grant and batch
figures are summed over a device's queues: an operator asks "how busy is this
disk", and per-queue splits of those would multiply the series by the queue
count for little insight.
"""

from __future__ import annotations

import copy
import platform
import threading
from contextlib import ExitStack, contextmanager
from typing import Any, ContextManager, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from prometheus_client import gc_collector, platform_collector, process_collector

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

import gblk
from gblk.engine.stats import (
    LATENCY_BUCKETS,
    OPS,
    REASONS,
    DaemonStats,
    DeviceStats,
    Histogram,
    RingStats,
)

#: XenbusState numbers (xen/include/public/io/xenbus.h)
XENBUS_STATES: Dict[int, str] = {
    0: "Unknown",
    1: "Initialising",
    2: "InitWait",
    3: "Initialised",
    4: "Connected",
    5: "Closing",
    6: "Closed",
    7: "Reconfiguring",
    8: "Reconfigured",
}
XENBUS_STATE_CONNECTED = 4

#: blkif sectors are 512 bytes, always (docs/protocol.md §1.2)
SECTOR_SIZE = 512

#: ops whose latency histogram is exported even before the first request, so that
#: dashboards and rate() see the series from the start; other ops appear once seen
ALWAYS_LATENCY_OPS = ("read", "write")

DEVICE_LABELS = ("domain", "device", "kind")
QUEUE_LABELS = DEVICE_LABELS + ("queue",)

_Buckets = List[Tuple[str, float]]


def _merge_histograms(hists: Sequence[Histogram]) -> Tuple[_Buckets, float]:
    """Sum histograms (one per ring) into cumulative Prometheus buckets.

    Rings of one device use the same bucket bounds (the constants in
    gblk.engine.stats). Should one differ, each of its counts is put into the
    first bound of the reference histogram that is >= its own upper bound, which
    keeps every bucket an upper bound on the truth.
    Returns (cumulative buckets with +Inf, sum); ``hists`` must not be empty.
    """
    ref = hists[0].buckets
    counts = [0] * (len(ref) + 1)
    total_sum = 0.0
    for h in hists:
        own = list(h.counts)
        if h.buckets == ref and len(own) == len(counts):
            for i, n in enumerate(own):
                counts[i] += n
        else:
            bounds = list(h.buckets) + [float("inf")]
            for bound, n in zip(bounds, own):
                idx = next((i for i, b in enumerate(ref) if b >= bound), len(ref))
                counts[idx] += n
        total_sum += h.sum
    out: _Buckets = []
    acc = 0
    for bound, n in zip(ref, counts):
        acc += n
        out.append((floatToGoString(bound), float(acc)))
    out.append(("+Inf", float(acc + counts[-1])))
    return out, total_sum


class _Families:
    """The metric families of one scrape, created empty in a fixed order."""

    def __init__(self) -> None:
        d, q = list(DEVICE_LABELS), list(QUEUE_LABELS)
        self.requests = CounterMetricFamily(
            "gblk_requests", "Requests answered, by effective op (an INDIRECT request counts as its indirect_op).",
            labels=d + ["op"])
        self.bytes = CounterMetricFamily(
            "gblk_bytes", "Bytes moved by answered requests (discard: bytes discarded), by op.",
            labels=d + ["op"], unit="bytes")
        self.duration = HistogramMetricFamily(
            "gblk_request_duration_seconds",
            "Time from taking a request off the ring to publishing its response, by op.",
            labels=d + ["op"], unit="seconds")
        self.in_flight = GaugeMetricFamily(
            "gblk_requests_in_flight", "Requests taken off the ring and not yet answered.", labels=q)
        self.pending = GaugeMetricFamily(
            "gblk_ring_requests_pending",
            "Requests the frontend published and gblk has not answered yet (unconsumed plus in flight).",
            labels=q)
        self.slots = GaugeMetricFamily("gblk_ring_slots", "Request slots in the shared ring.", labels=q)
        self.halted = GaugeMetricFamily(
            "gblk_ring_halted", "1 when the ring was stopped because the frontend broke the ring protocol.",
            labels=q)
        self.errors = CounterMetricFamily(
            "gblk_errors", "Failures by reason: requests answered with an error, and device-level failures.",
            labels=d + ["reason"])
        self.grant_maps = CounterMetricFamily(
            "gblk_grant_maps", "Grant references mapped into gblk (persistent or per request).", labels=d)
        self.grant_unmaps = CounterMetricFamily("gblk_grant_unmaps", "Grant references unmapped.", labels=d)
        self.grant_copy = CounterMetricFamily(
            "gblk_grant_copy_segments", "Segments moved with grant copy.", labels=d)
        self.pgrants = GaugeMetricFamily(
            "gblk_persistent_grants", "Persistent grants currently mapped.", labels=d)
        self.pgrants_limit = GaugeMetricFamily(
            "gblk_persistent_grants_limit", "Most persistent grants the device keeps mapped (0: feature off).",
            labels=d)
        self.pgrant_evictions = CounterMetricFamily(
            "gblk_persistent_grant_evictions", "Persistent grants unmapped to make room for others.", labels=d)
        self.batches = HistogramMetricFamily(
            "gblk_batch_requests", "Requests handled per pass over the ring.", labels=d)
        self.state = GaugeMetricFamily(
            "gblk_device_state",
            "Backend XenbusState: 1 Initialising, 2 InitWait, 3 Initialised, 4 Connected, 5 Closing, 6 Closed, "
            "7 Reconfiguring, 8 Reconfigured.",
            labels=d)
        self.connected = GaugeMetricFamily(
            "gblk_device_connected", "1 when the backend is in XenbusState Connected, else 0.", labels=d)
        self.size = GaugeMetricFamily(
            "gblk_device_size_bytes", "Size of the virtual disk as advertised to the frontend.",
            labels=d, unit="bytes")
        self.reconnects = CounterMetricFamily(
            "gblk_reconnects", "Times the frontend connected again after the first connection.", labels=d)
        self.nbd_connected = GaugeMetricFamily(
            "gblk_nbd_connected",
            "NBD-served disks (image formats, nbd: exports): 1 while the NBD connection is up.",
            labels=d)
        self.nbd_reconnects = CounterMetricFamily(
            "gblk_nbd_reconnects", "NBD connections made again after one broke (a local qemu-nbd "
            "restarted first).", labels=d)
        self.nbd_errors = CounterMetricFamily(
            "gblk_nbd_connection_errors", "NBD connections lost, or reconnections that failed.",
            labels=d)
        self.nbd_lost = CounterMetricFamily(
            "gblk_nbd_unflushed_lost", "Times the NBD server went away holding acknowledged "
            "writes it had not flushed (the guest's next flush failed).", labels=d)
        self.notif_rx = CounterMetricFamily(
            "gblk_notifications_received", "Event-channel notifications received from the frontend.", labels=q)
        self.notif_tx = CounterMetricFamily(
            "gblk_notifications_sent", "Event-channel notifications sent to the frontend.", labels=q)
        self.xs_connections = CounterMetricFamily(
            "gblk_xenstore_connections", "Connections made to XenStore (the first one and every reconnection).")
        self.xs_connected = GaugeMetricFamily(
            "gblk_xenstore_connected", "1 while the XenStore connection is up.")
        self.watch_events = CounterMetricFamily(
            "gblk_watch_events", "XenStore watch events received.")
        self.throttle_wait = HistogramMetricFamily(
            "gblk_throttle_wait_seconds",
            "Seconds requests of a disk with IO limits waited for them (from taken off the ring "
            "to let go), by op (read, write).", labels=d + ["op"])
        self.io_limit = GaugeMetricFamily(
            "gblk_io_limit", "The disk's IO limits in force, by QEMU throttle key (iops_total, "
            "bps_read_max, ...): requests or bytes per second, seconds for *_max_length.",
            labels=d + ["limit"])
        self.cbt_enabled = GaugeMetricFamily(
            "gblk_cbt_enabled", "1 while changed-block tracking keeps a dirty bitmap of the disk.",
            labels=d)
        self.cbt_dirty = GaugeMetricFamily(
            "gblk_cbt_dirty_bytes", "Bytes of the disk its dirty bitmap marks as changed.", labels=d)
        self.cbt_syncs = CounterMetricFamily(
            "gblk_cbt_syncs", "Writes of the dirty bitmap to stable storage (each before the "
            "writes that set new bits were issued).", labels=d)
        self.cbt_sync_seconds = CounterMetricFamily(
            "gblk_cbt_sync_seconds", "Seconds spent writing and syncing the dirty bitmap.", labels=d)
        self.export_open = GaugeMetricFamily(
            "gblk_export_open", "1 while the disk is exported over NBD (gblk ctl export).",
            labels=d)
        self.export_read = CounterMetricFamily(
            "gblk_export_read_bytes", "Bytes NBD clients read from the disk's exports.", labels=d)
        self.export_cbw = CounterMetricFamily(
            "gblk_export_cbw_bytes", "Bytes of the disk copied into an export's side file "
            "before guest writes changed them (copy-before-write).", labels=d)
        self.export_side = GaugeMetricFamily(
            "gblk_export_side_file_bytes", "Bytes the open export's side file holds (copied "
            "blocks that were not zeros).", labels=d)
        self.build = InfoMetricFamily(
            "gblk_build", "gblk version, the git revision it was built from and the Python that runs it.",
            labels=["version", "revision", "python"])

    def all(self) -> List[Metric]:
        return [
            self.requests, self.bytes, self.duration, self.in_flight, self.pending, self.slots,
            self.halted, self.errors, self.grant_maps, self.grant_unmaps, self.grant_copy,
            self.pgrants, self.pgrants_limit, self.pgrant_evictions, self.batches, self.state,
            self.connected, self.size, self.reconnects, self.nbd_connected, self.nbd_reconnects,
            self.nbd_errors, self.nbd_lost, self.notif_rx, self.notif_tx,
            self.throttle_wait, self.io_limit, self.cbt_enabled, self.cbt_dirty, self.cbt_syncs,
            self.cbt_sync_seconds, self.export_open, self.export_read, self.export_cbw,
            self.export_side, self.xs_connections, self.xs_connected, self.watch_events,
            self.build,
        ]


def _ordered_keys(known: Sequence[str], *seen: Iterable[str]) -> List[str]:
    """``known`` first (always exported), then any other key that has been counted."""
    out = list(known)
    extra: Set[str] = set()
    for keys in seen:
        extra.update(k for k in keys if k not in known)
    out.extend(sorted(extra))
    return out


class GblkCollector:
    """Custom collector: reads ``stats`` at scrape time, keeps nothing between scrapes.

    ``collect()`` called on the hub reads the live stats. To collect and encode
    somewhere else (a worker thread, so that a large scrape does not stall the
    dataplane), take ``snapshot()`` on the hub first and ``pin()`` it in the
    thread that collects: ``collect()`` then reads the pinned copy.
    """

    def __init__(self, stats: DaemonStats, version: Optional[str] = None,
                 revision: Optional[str] = None) -> None:
        self._stats = stats
        self._version = version if version is not None else gblk.__version__
        self._revision = revision if revision is not None else gblk.revision()
        self._python = platform.python_version()
        self._pinned = threading.local()

    def describe(self) -> Iterator[Metric]:
        """The families this collector exports (no samples), for the registry's name checks."""
        return iter(_Families().all())

    def snapshot(self) -> DaemonStats:
        """A private copy of the stats (call on the hub: it reads them)."""
        return snapshot_stats(self._stats)

    @contextmanager
    def pin(self, snapshot: DaemonStats) -> Iterator[None]:
        """Make ``collect()`` in the current thread read ``snapshot``."""
        previous = getattr(self._pinned, "stats", None)
        self._pinned.stats = snapshot
        try:
            yield
        finally:
            self._pinned.stats = previous

    def collect(self) -> Iterator[Metric]:
        """Build every family from the pinned snapshot, or from the stats as they are now."""
        pinned: Optional[DaemonStats] = getattr(self._pinned, "stats", None)
        stats = pinned if pinned is not None else self._stats
        fam = _Families()
        seen: Set[Tuple[str, str, str]] = set()
        for dev in list(stats.devices.values()):
            labels = (str(dev.domain), str(dev.device), str(dev.kind))
            if labels in seen:
                continue  # one device, one set of series, whatever the dict holds
            seen.add(labels)
            self._device(fam, dev, labels)
        fam.xs_connections.add_metric([], stats.xenstore_connections)
        fam.xs_connected.add_metric([], 1 if stats.xenstore_connected else 0)
        fam.watch_events.add_metric([], stats.watch_events)
        fam.build.add_metric([self._version, self._revision, self._python], {})
        return iter(fam.all())

    @staticmethod
    def _device(fam: _Families, dev: DeviceStats, labels: Tuple[str, str, str]) -> None:
        lab = list(labels)
        live: List[RingStats] = [dev.rings[k] for k in sorted(dev.rings)]
        rings = [dev.retired] + live  # device counters: earlier connections' too

        for op in _ordered_keys(OPS, *(r.requests.keys() for r in rings), *(r.bytes.keys() for r in rings)):
            fam.requests.add_metric(lab + [op], sum(r.requests.get(op, 0) for r in rings))
            fam.bytes.add_metric(lab + [op], sum(r.bytes.get(op, 0) for r in rings))

        latency_ops = _ordered_keys(ALWAYS_LATENCY_OPS, *(r.latency.keys() for r in rings))
        for op in latency_ops:
            hists = [h for h in (r.latency.get(op) for r in rings) if h is not None]
            buckets, total = _merge_histograms(hists or [Histogram(LATENCY_BUCKETS)])
            fam.duration.add_metric(lab + [op], buckets, total)

        for reason in _ordered_keys(REASONS, dev.errors.keys(), *(r.errors.keys() for r in rings)):
            n = dev.errors.get(reason, 0) + sum(r.errors.get(reason, 0) for r in rings)
            fam.errors.add_metric(lab + [reason], n)

        fam.grant_maps.add_metric(lab, sum(r.grant_maps for r in rings))
        fam.grant_unmaps.add_metric(lab, sum(r.grant_unmaps for r in rings))
        fam.grant_copy.add_metric(lab, sum(r.grant_copy_segments for r in rings))
        fam.pgrants.add_metric(lab, dev.persistent_grants)
        fam.pgrants_limit.add_metric(lab, dev.persistent_grants_limit)
        fam.pgrant_evictions.add_metric(lab, dev.persistent_grant_evictions)

        buckets, total = _merge_histograms([r.batches for r in rings])
        fam.batches.add_metric(lab, buckets, total)

        fam.state.add_metric(lab, dev.state)
        fam.connected.add_metric(lab, 1 if dev.state == XENBUS_STATE_CONNECTED else 0)
        fam.size.add_metric(lab, dev.sectors * SECTOR_SIZE)
        fam.reconnects.add_metric(lab, dev.reconnects)
        if dev.nbd_state:
            fam.nbd_connected.add_metric(lab, 1 if dev.nbd_state == "connected" else 0)
            fam.nbd_reconnects.add_metric(lab, dev.nbd_reconnects)
            fam.nbd_errors.add_metric(lab, dev.nbd_connection_errors)
            fam.nbd_lost.add_metric(lab, dev.nbd_unflushed_lost)

        limited = bool(dev.io_limits)
        waits = _ordered_keys(ALWAYS_LATENCY_OPS if limited else (),
                              *(r.throttle_wait.keys() for r in rings))
        for op in waits:
            hists = [h for h in (r.throttle_wait.get(op) for r in rings) if h is not None]
            buckets, total = _merge_histograms(hists or [Histogram(LATENCY_BUCKETS)])
            fam.throttle_wait.add_metric(lab + [op], buckets, total)
        for key, value in sorted(dev.io_limits.items()):
            fam.io_limit.add_metric(lab + [key], value)
        fam.cbt_enabled.add_metric(lab, 1 if dev.cbt_enabled else 0)
        fam.cbt_dirty.add_metric(lab, dev.cbt_dirty_bits * dev.cbt_granularity
                                 if dev.cbt_enabled else 0)
        fam.cbt_syncs.add_metric(lab, dev.cbt_syncs)
        fam.cbt_sync_seconds.add_metric(lab, dev.cbt_sync_seconds)
        fam.export_open.add_metric(lab, 1 if dev.export_open else 0)
        fam.export_read.add_metric(lab, dev.export_read_bytes)
        fam.export_cbw.add_metric(lab, dev.export_cbw_bytes)
        fam.export_side.add_metric(lab, dev.export_side_bytes)

        for ring in live:
            qlab = lab + [str(ring.queue)]
            fam.in_flight.add_metric(qlab, ring.in_flight)
            fam.pending.add_metric(qlab, ring.ring_fill)
            fam.slots.add_metric(qlab, ring.slots)
            fam.halted.add_metric(qlab, 1 if ring.halted else 0)
            fam.notif_rx.add_metric(qlab, ring.notifications_received)
            fam.notif_tx.add_metric(qlab, ring.notifications_sent)


def _copy_histogram(h: Histogram) -> Histogram:
    c = Histogram(h.buckets)
    c.counts = list(h.counts)
    c.sum = h.sum
    c.count = h.count
    return c


def _copy_ring(r: RingStats) -> RingStats:
    c = copy.copy(r)  # the scalars
    c.requests = r.requests.copy()
    c.bytes = r.bytes.copy()
    c.errors = r.errors.copy()
    latency = r.latency.copy()
    for op, h in list(latency.items()):
        latency[op] = _copy_histogram(h)
    c.latency = latency
    c.batches = _copy_histogram(r.batches)
    c.throttle_wait = r.throttle_wait.copy()
    for op, h in list(c.throttle_wait.items()):
        c.throttle_wait[op] = _copy_histogram(h)
    return c


def snapshot_stats(stats: DaemonStats) -> DaemonStats:
    """Copy what the collector reads out of ``stats``: a few microseconds per ring, on
    the hub; the copy can then be collected and encoded in another thread."""
    out = copy.copy(stats)
    devices = {}
    for key, dev in list(stats.devices.items()):
        d = copy.copy(dev)
        d.errors = dev.errors.copy()
        d.io_limits = dict(dev.io_limits)
        d.rings = {q: _copy_ring(r) for q, r in list(dev.rings.items())}
        d.retired = _copy_ring(dev.retired)
        devices[key] = d
    out.devices = devices
    return out


class GblkRegistry(CollectorRegistry):
    """A CollectorRegistry that can split a scrape: ``prepare_scrape()`` on the hub
    snapshots every GblkCollector and returns a context manager; inside it, in any
    thread, collecting (and encoding) reads the snapshots, not the live stats."""

    def __init__(self) -> None:
        super().__init__()
        self._gblk: List[GblkCollector] = []

    def register(self, collector: Any) -> None:
        super().register(collector)
        if isinstance(collector, GblkCollector):
            self._gblk.append(collector)

    def unregister(self, collector: Any) -> None:
        super().unregister(collector)
        if collector in self._gblk:
            self._gblk.remove(collector)

    def prepare_scrape(self) -> ContextManager[None]:
        """Call on the hub. Returns the pin to enter in the collecting thread."""
        pins = [(c, c.snapshot()) for c in list(self._gblk)]
        stack = ExitStack()

        @contextmanager
        def pinned() -> Iterator[None]:
            with stack:
                for collector, snap in pins:
                    stack.enter_context(collector.pin(snap))
                yield

        return pinned()


def make_registry(stats: DaemonStats, process: bool = True) -> GblkRegistry:
    """A fresh registry holding gblk's collector and (``process``) the default
    process, platform and GC collectors. One per daemon; tests make their own."""
    registry = GblkRegistry()
    registry.register(GblkCollector(stats))
    if process:
        process_collector.ProcessCollector(registry=registry)
        platform_collector.PlatformCollector(registry=registry)
        gc_collector.GCCollector(registry=registry)
    return registry
