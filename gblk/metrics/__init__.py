"""gblk's Prometheus metrics: a collector over the engine's plain stats and its HTTP exporter.

Layering: ``daemon -> metrics -> engine.stats``. This package reads
``gblk.engine.stats`` (and raises ``gblk.errors``); it imports nothing else from
gblk and nothing imports it but the daemon and the tests. It never monkey-patches.

Typical use (the daemon)::

    registry = make_registry(daemon_stats)
    server = MetricsServer(config.metrics_address, registry, stats_health(daemon_stats))
    server.start()
    ...
    server.stop()

Metric names, labels and the monitoring kit are described in monitoring/README.md.
"""

from __future__ import annotations

from gblk.metrics.collector import XENBUS_STATES, GblkCollector, GblkRegistry, make_registry
from gblk.metrics.exporter import (
    DEFAULT_METRICS_ADDRESS,
    MetricsServer,
    format_address,
    parse_address,
)
from gblk.metrics.health import DEFAULT_STUCK_AFTER, stats_health

__all__ = [
    "DEFAULT_METRICS_ADDRESS",
    "DEFAULT_STUCK_AFTER",
    "XENBUS_STATES",
    "GblkCollector",
    "GblkRegistry",
    "MetricsServer",
    "format_address",
    "make_registry",
    "parse_address",
    "stats_health",
]
