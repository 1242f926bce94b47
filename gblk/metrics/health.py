"""The default ``/healthz`` check, computed from the daemon's plain stats.

``stats_health(stats)`` returns the callable that ``MetricsServer`` asks on each
``GET /healthz``. It fails when XenStore is unreachable or when a device has sat
too long in a state where gblk itself must act next (Initialising, Closing,
Reconfiguring): those states end as soon as the backend does its part, so a
device that stays there is stuck in gblk. States where gblk waits for someone
else (InitWait: the guest has not loaded blkfront yet; Connected; Closed) are
healthy however long they last, and a halted ring is the guest's fault, not
gblk's (it has its own alert).

What it must not do: block, or change the stats. ``DeviceStats.state_since``
is read as ``time.monotonic()`` seconds (0 = unknown: never stuck).
"""

from __future__ import annotations

import time
from typing import Callable, FrozenSet, Tuple

from gblk.engine.stats import DaemonStats

#: backend XenbusStates that gblk leaves on its own (xenbus.h numbers)
BACKEND_ACTS_STATES: FrozenSet[int] = frozenset({1, 5, 7})  # Initialising, Closing, Reconfiguring

#: how long a device may stay in one of those states before /healthz fails
DEFAULT_STUCK_AFTER = 60.0

_NAMES = {1: "Initialising", 5: "Closing", 7: "Reconfiguring"}


def stats_health(
    stats: DaemonStats,
    stuck_after: float = DEFAULT_STUCK_AFTER,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[], Tuple[bool, str]]:
    """A health check over ``stats``: (True, "ok") or (False, one line saying why)."""

    def check() -> Tuple[bool, str]:
        if not stats.xenstore_connected:
            return False, "xenstore unreachable"
        now = clock()
        stuck = []
        for dev in list(stats.devices.values()):
            if dev.state in BACKEND_ACTS_STATES and dev.state_since > 0:
                age = now - dev.state_since
                if age >= stuck_after:
                    stuck.append(
                        f"d{dev.domain}/{dev.kind}/{dev.device} stuck in {_NAMES[dev.state]} for {age:.0f}s")
        if stuck:
            return False, "; ".join(sorted(stuck))
        return True, "ok"

    return check
