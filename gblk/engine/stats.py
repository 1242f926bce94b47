"""Plain statistics objects the dataplane and control plane count into.

No locks, no gevent, no prometheus: the engine increments plain ints on the hub,
and ``gblk.metrics`` reads them at scrape time. Removing a DeviceStats from
``DaemonStats.devices`` makes its series disappear.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import DefaultDict, Dict, List, Sequence, Tuple

from ..blkif import ops, reasons

#: seconds; from a 4 KiB random read on a fast store to 1 MiB sequential on a slow one
LATENCY_BUCKETS: Tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
#: requests handled per ring pass
BATCH_BUCKETS: Tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

#: op labels (the effective op: an INDIRECT request counts as its indirect_op), from
#: the operations' table
OPS = ops.LABELS

#: error reasons (low cardinality: these and nothing else; named in gblk.blkif.reasons)
#: and the device-level ones (DeviceStats.errors)
REASONS = reasons.REASONS
DEVICE_REASONS = reasons.DEVICE_REASONS


class Histogram:
    """Cumulative-on-read histogram: ``counts[i]`` counts observations <= buckets[i]
    (non-cumulative in storage), plus +Inf at the end."""

    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts: List[int] = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def merge(self, other: "Histogram") -> None:
        """Add ``other``'s observations (same buckets) to these."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.sum += other.sum
        self.count += other.count

    def cumulative(self) -> List[Tuple[str, int]]:
        """[(le, cumulative count)] including '+Inf', as Prometheus wants it."""
        out: List[Tuple[str, int]] = []
        acc = 0
        for bound, n in zip(self.buckets, self.counts):
            acc += n
            out.append((repr(float(bound)), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


def _latency() -> Histogram:
    return Histogram(LATENCY_BUCKETS)


@dataclass
class RingStats:
    """One ring (queue) of one device."""

    queue: int = 0
    slots: int = 0
    requests: DefaultDict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: DefaultDict[str, int] = field(default_factory=lambda: defaultdict(int))
    latency: DefaultDict[str, Histogram] = field(default_factory=lambda: defaultdict(_latency))
    errors: DefaultDict[str, int] = field(default_factory=lambda: defaultdict(int))
    batches: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    in_flight: int = 0
    #: requests published by the frontend and not yet answered (unconsumed + in flight)
    ring_fill: int = 0
    grant_maps: int = 0
    grant_unmaps: int = 0
    grant_copy_segments: int = 0
    notifications_received: int = 0
    notifications_sent: int = 0
    halted: bool = False
    #: seconds each request on a disk with IO limits waited for them, by op (read, write)
    throttle_wait: DefaultDict[str, Histogram] = field(default_factory=lambda: defaultdict(_latency))

    def absorb(self, other: "RingStats") -> None:
        """Add ``other``'s counters (not its gauges) to these: a device keeps the counts
        of its stopped rings in ``DeviceStats.retired``, so its counters never go back."""
        for mine, theirs in ((self.requests, other.requests), (self.bytes, other.bytes),
                             (self.errors, other.errors)):
            for k, v in theirs.items():
                mine[k] += v
        for op, h in other.latency.items():
            self.latency[op].merge(h)
        for op, h in other.throttle_wait.items():
            self.throttle_wait[op].merge(h)
        self.batches.merge(other.batches)
        self.grant_maps += other.grant_maps
        self.grant_unmaps += other.grant_unmaps
        self.grant_copy_segments += other.grant_copy_segments
        self.notifications_received += other.notifications_received
        self.notifications_sent += other.notifications_sent


@dataclass
class DeviceStats:
    """One virtual disk (one backend directory)."""

    domain: int
    device: int
    kind: str
    state: int = 1
    reconnects: int = 0
    sectors: int = 0
    persistent_grants: int = 0
    persistent_grants_limit: int = 0
    persistent_grant_evictions: int = 0
    #: device-level failures (storage could not be opened, negotiation failed)
    errors: DefaultDict[str, int] = field(default_factory=lambda: defaultdict(int))
    rings: Dict[int, RingStats] = field(default_factory=dict)
    #: the counters of the rings of earlier connections (their gauges are gone)
    retired: RingStats = field(default_factory=RingStats)
    #: monotonic time of the last state change (for "stuck" detection in /healthz)
    state_since: float = 0.0
    #: NBD-served disks (image formats, nbd: URIs): the connection's state
    #: (connecting, connected, reconnecting, failed, closed; "" for other stores)
    nbd_state: str = ""
    nbd_reconnects: int = 0
    nbd_connection_errors: int = 0
    #: times the server went away holding acknowledged writes it had not flushed
    nbd_unflushed_lost: int = 0
    #: the IO limits in force (gblk.qos key -> value; empty: none)
    io_limits: Dict[str, int] = field(default_factory=dict)
    #: changed-block tracking: on, bytes one bit covers, bits set, bitmap syncs, their seconds
    cbt_enabled: bool = False
    cbt_granularity: int = 0
    cbt_dirty_bits: int = 0
    cbt_syncs: int = 0
    cbt_sync_seconds: float = 0.0
    #: live export (gblk.engine.snapshot): open, bytes the clients read, bytes copied
    #: before guest writes, bytes of the side file holding them (the zeros not stored)
    export_open: bool = False
    export_read_bytes: int = 0
    export_cbw_bytes: int = 0
    export_side_bytes: int = 0


@dataclass
class DaemonStats:
    """Everything the metrics exporter reads."""

    devices: Dict[Tuple[int, str, int], DeviceStats] = field(default_factory=dict)
    xenstore_connections: int = 0
    xenstore_connected: bool = False
    watch_events: int = 0
    #: wall-clock time (time.time()) the daemon started
    started: float = 0.0
