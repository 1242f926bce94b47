"""What ``gblk list`` and ``gblk stats`` show, built from the plain stats objects.

Pure functions over :class:`gblk.engine.stats.DeviceStats` (read-only: every read of
a ``defaultdict`` goes through ``.get``, so a request never creates an entry) plus
the few facts the stats do not hold (image, page path), which the daemon passes in.
Counters are summed over a device's rings and its retired rings exactly as
``gblk.metrics.collector`` does, so the numbers agree with ``/metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..blkif.const import XenbusState
from ..engine.stats import OPS, REASONS, DeviceStats, RingStats

SECTOR_SIZE = 512


@dataclass(frozen=True)
class DiskFacts:
    """What the daemon knows about a disk beyond its stats."""

    stats: DeviceStats
    image: Optional[str] = None  # the backing file or device
    #: how guest pages are reached: persistent, map or copy (None before Connected)
    page_path: Optional[str] = None
    backend_path: str = ""
    #: where the disk is exported over NBD (gblk ctl export; None: it is not)
    export: Optional[str] = None


_STATE_NAMES = {
    XenbusState.UNKNOWN: "Unknown", XenbusState.INITIALISING: "Initialising",
    XenbusState.INIT_WAIT: "InitWait", XenbusState.INITIALISED: "Initialised",
    XenbusState.CONNECTED: "Connected", XenbusState.CLOSING: "Closing",
    XenbusState.CLOSED: "Closed", XenbusState.RECONFIGURING: "Reconfiguring",
    XenbusState.RECONFIGURED: "Reconfigured",
}


def state_name(state: int) -> str:
    """The XenbusState name as xenbus.h spells it (``gblk_device_state``'s help too)."""
    return _STATE_NAMES.get(state, f"Unknown({state})")  # type: ignore[call-overload]


def _rings(dev: DeviceStats) -> List[RingStats]:
    return [dev.retired] + [dev.rings[k] for k in sorted(dev.rings)]


def _by_key(known: Any, maps: List[Any]) -> Dict[str, int]:
    out = {k: 0 for k in known}
    for m in maps:
        for k, v in list(m.items()):
            out[k] = out.get(k, 0) + v
    return out


def disk_row(f: DiskFacts) -> Dict[str, Any]:
    """One line of ``gblk list``."""
    dev = f.stats
    live = [dev.rings[k] for k in sorted(dev.rings)]
    return {
        "disk": f"d{dev.domain}/{dev.device}",
        "domain": dev.domain,
        "device": dev.device,
        "kind": dev.kind,
        "state": dev.state,
        "state_name": state_name(dev.state),
        "image": f.image,
        "size_bytes": dev.sectors * SECTOR_SIZE,
        "queues": len(live),
        "page_path": f.page_path,
        "in_flight": sum(r.in_flight for r in live),
        "pending": sum(r.ring_fill for r in live),
        "export": f.export,
    }


def disk_stats(f: DiskFacts) -> Dict[str, Any]:
    """Every counter of one disk (``gblk stats``), named as in ``/metrics`` without
    the ``gblk_`` prefix and the ``_total`` suffix."""
    dev = f.stats
    rings = _rings(dev)
    live = rings[1:]
    latency: Dict[str, Dict[str, float]] = {}
    for r in rings:
        for op, h in list(r.latency.items()):
            entry = latency.setdefault(op, {"count": 0, "sum": 0.0})
            entry["count"] += h.count
            entry["sum"] += h.sum
    errors = _by_key(REASONS, [r.errors for r in rings] + [dev.errors])
    out = disk_row(f)
    out.update({
        "requests": _by_key(OPS, [r.requests for r in rings]),
        "bytes": _by_key(OPS, [r.bytes for r in rings]),
        "request_duration_seconds": latency,
        "errors": errors,
        "grant_maps": sum(r.grant_maps for r in rings),
        "grant_unmaps": sum(r.grant_unmaps for r in rings),
        "grant_copy_segments": sum(r.grant_copy_segments for r in rings),
        "persistent_grants": dev.persistent_grants,
        "persistent_grants_limit": dev.persistent_grants_limit,
        "persistent_grant_evictions": dev.persistent_grant_evictions,
        "reconnects": dev.reconnects,
        "ring": [{
            "queue": r.queue,
            "slots": r.slots,
            "in_flight": r.in_flight,
            "pending": r.ring_fill,
            "halted": bool(r.halted),
            "notifications_received": r.notifications_received,
            "notifications_sent": r.notifications_sent,
        } for r in live],
    })
    return out
