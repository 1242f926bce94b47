"""Unit tests for gblk.metrics.collector: hand-filled stats in, Prometheus samples out.

Each test builds a DaemonStats by hand, registers a GblkCollector on a fresh
CollectorRegistry, and reads values back through the registry (the same path a
scrape takes).
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import (
    generate_latest as generate_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from gblk.engine.stats import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    OPS,
    REASONS,
    DaemonStats,
    DeviceStats,
    Histogram,
    RingStats,
)
from gblk.metrics import GblkCollector, make_registry
from gblk.metrics.collector import _merge_histograms


def _registry(stats: DaemonStats) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(GblkCollector(stats, version="9.9.9"))
    return reg


def _device(domain: int = 5, device: int = 51712, kind: str = "vbd", queues: int = 1, **kw: object) -> DeviceStats:
    dev = DeviceStats(domain=domain, device=device, kind=kind, **kw)  # type: ignore[arg-type]
    for q in range(queues):
        dev.rings[q] = RingStats(queue=q, slots=32)
    return dev


def _add(stats: DaemonStats, dev: DeviceStats) -> DeviceStats:
    stats.devices[(dev.domain, dev.kind, dev.device)] = dev
    return dev


def _labels(dev: DeviceStats, **extra: str) -> Dict[str, str]:
    out = {"domain": str(dev.domain), "device": str(dev.device), "kind": dev.kind}
    out.update(extra)
    return out


def _snapshot(obj: object) -> object:
    """Plain-data copy of stats objects (Histogram has no __eq__)."""
    if isinstance(obj, Histogram):
        return ("H", obj.buckets, list(obj.counts), obj.sum, obj.count)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _snapshot(getattr(obj, k)) for k in obj.__dataclass_fields__}  # type: ignore[attr-defined]
    return copy.copy(obj)


def _value(reg: CollectorRegistry, name: str, labels: Optional[Dict[str, str]] = None) -> Optional[float]:
    return reg.get_sample_value(name, labels or {})


def test_requests_and_bytes_by_op_are_summed_over_queues() -> None:
    """Requests and bytes are per device and op, whatever queue served them (multi-queue
    disks must not report only queue 0)."""
    stats = DaemonStats()
    dev = _add(stats, _device(queues=2))
    dev.rings[0].requests["read"] += 3
    dev.rings[0].bytes["read"] += 3 * 4096
    dev.rings[1].requests["read"] += 2
    dev.rings[1].bytes["read"] += 2 * 4096
    dev.rings[1].requests["write"] += 1
    dev.rings[1].bytes["write"] += 1 << 20
    reg = _registry(stats)
    assert _value(reg, "gblk_requests_total", _labels(dev, op="read")) == 5
    assert _value(reg, "gblk_bytes_total", _labels(dev, op="read")) == 5 * 4096
    assert _value(reg, "gblk_requests_total", _labels(dev, op="write")) == 1
    assert _value(reg, "gblk_bytes_total", _labels(dev, op="write")) == 1 << 20


def test_every_op_and_reason_is_exported_from_zero() -> None:
    """Counters exist at 0 before the first event, so rate() and the alerts see the
    first increment (a series born at 1 hides it)."""
    stats = DaemonStats()
    dev = _add(stats, _device())
    reg = _registry(stats)
    for op in OPS:
        assert _value(reg, "gblk_requests_total", _labels(dev, op=op)) == 0
        assert _value(reg, "gblk_bytes_total", _labels(dev, op=op)) == 0
    for reason in REASONS:
        assert _value(reg, "gblk_errors_total", _labels(dev, reason=reason)) == 0
    for op in ("read", "write"):
        assert _value(reg, "gblk_request_duration_seconds_count", _labels(dev, op=op)) == 0
    assert _value(reg, "gblk_request_duration_seconds_count", _labels(dev, op="flush")) is None


def test_latency_histogram_buckets_are_cumulative_and_merged_over_queues() -> None:
    """gblk_request_duration_seconds has the engine's buckets, cumulative with +Inf, sum
    and count, per op, summed over the device's queues."""
    stats = DaemonStats()
    dev = _add(stats, _device(queues=2))
    dev.rings[0].latency["read"].observe(0.00005)  # exactly on the first bound: le="5e-05"
    dev.rings[0].latency["read"].observe(0.0003)
    dev.rings[1].latency["read"].observe(0.003)
    dev.rings[1].latency["read"].observe(10.0)  # beyond the last bound: only +Inf
    dev.rings[1].latency["flush"].observe(0.02)
    reg = _registry(stats)
    lab = _labels(dev, op="read")
    expected = {0.00005: 1, 0.0001: 1, 0.00025: 1, 0.0005: 2, 0.001: 2, 0.0025: 2, 0.005: 3, 5.0: 3}
    for bound, n in expected.items():
        assert _value(reg, "gblk_request_duration_seconds_bucket", dict(lab, le=str(bound))) == n, bound
    assert _value(reg, "gblk_request_duration_seconds_bucket", dict(lab, le="+Inf")) == 4
    assert _value(reg, "gblk_request_duration_seconds_count", lab) == 4
    assert _value(reg, "gblk_request_duration_seconds_sum", lab) == pytest.approx(10.00335)
    flush = _labels(dev, op="flush")
    assert _value(reg, "gblk_request_duration_seconds_bucket", dict(flush, le="0.025")) == 1
    assert _value(reg, "gblk_request_duration_seconds_bucket", dict(flush, le="0.01")) == 0
    # every engine bound is there, in order, plus +Inf
    text = generate_latest(reg).decode()
    fam = next(f for f in text_string_to_metric_families(text) if f.name == "gblk_request_duration_seconds")
    les = [s.labels["le"] for s in fam.samples if s.name.endswith("_bucket") and s.labels["op"] == "read"]
    assert [float(x) for x in les[:-1]] == list(LATENCY_BUCKETS) and les[-1] == "+Inf"


def test_batch_histogram_counts_requests_per_ring_pass() -> None:
    """gblk_batch_requests comes from RingStats.batches (one observation per pass)."""
    stats = DaemonStats()
    dev = _add(stats, _device(queues=2))
    for n in (1, 1, 3, 32):
        dev.rings[0].batches.observe(n)
    dev.rings[1].batches.observe(600)
    reg = _registry(stats)
    lab = _labels(dev)
    assert _value(reg, "gblk_batch_requests_bucket", dict(lab, le="1.0")) == 2
    assert _value(reg, "gblk_batch_requests_bucket", dict(lab, le="4.0")) == 3
    assert _value(reg, "gblk_batch_requests_bucket", dict(lab, le="32.0")) == 4
    assert _value(reg, "gblk_batch_requests_bucket", dict(lab, le=str(float(BATCH_BUCKETS[-1])))) == 4
    assert _value(reg, "gblk_batch_requests_bucket", dict(lab, le="+Inf")) == 5
    assert _value(reg, "gblk_batch_requests_sum", lab) == 637
    assert _value(reg, "gblk_batch_requests_count", lab) == 5


def test_errors_combine_ring_and_device_reasons() -> None:
    """gblk_errors_total{reason} adds ring-level reasons and device-level failures; a
    reason the engine adds later still shows up."""
    stats = DaemonStats()
    dev = _add(stats, _device(queues=2))
    dev.rings[0].errors["invalid_segment"] += 2
    dev.rings[1].errors["invalid_segment"] += 1
    dev.rings[1].errors["io_error"] += 4
    dev.errors["io_error"] += 1
    dev.errors["storage_open"] += 1
    reg = _registry(stats)
    assert _value(reg, "gblk_errors_total", _labels(dev, reason="invalid_segment")) == 3
    assert _value(reg, "gblk_errors_total", _labels(dev, reason="io_error")) == 5
    assert _value(reg, "gblk_errors_total", _labels(dev, reason="storage_open")) == 1
    assert _value(reg, "gblk_errors_total", _labels(dev, reason="grant_map")) == 0


def test_ring_gauges_carry_the_queue_label() -> None:
    """In-flight, pending, slots, halted and notifications are per queue."""
    stats = DaemonStats()
    dev = _add(stats, _device(queues=2))
    r0, r1 = dev.rings[0], dev.rings[1]
    r0.in_flight, r0.ring_fill, r0.slots = 3, 7, 32
    r1.in_flight, r1.ring_fill, r1.slots, r1.halted = 0, 0, 64, True
    r0.notifications_received, r0.notifications_sent = 10, 4
    reg = _registry(stats)
    q0, q1 = _labels(dev, queue="0"), _labels(dev, queue="1")
    assert _value(reg, "gblk_requests_in_flight", q0) == 3
    assert _value(reg, "gblk_ring_requests_pending", q0) == 7
    assert _value(reg, "gblk_ring_slots", q1) == 64
    assert _value(reg, "gblk_ring_halted", q0) == 0
    assert _value(reg, "gblk_ring_halted", q1) == 1
    assert _value(reg, "gblk_notifications_received_total", q0) == 10
    assert _value(reg, "gblk_notifications_sent_total", q0) == 4
    assert _value(reg, "gblk_notifications_sent_total", q1) == 0


def test_device_level_gauges_and_counters() -> None:
    """State, connected, size in bytes (512-byte sectors), reconnects, grants."""
    stats = DaemonStats()
    dev = _add(stats, _device(state=4, sectors=2097152, reconnects=2))
    dev.persistent_grants, dev.persistent_grants_limit, dev.persistent_grant_evictions = 100, 1056, 7
    dev.rings[0].grant_maps, dev.rings[0].grant_unmaps, dev.rings[0].grant_copy_segments = 50, 40, 9
    other = _add(stats, _device(domain=6, state=2))
    reg = _registry(stats)
    lab = _labels(dev)
    assert _value(reg, "gblk_device_state", lab) == 4
    assert _value(reg, "gblk_device_connected", lab) == 1
    assert _value(reg, "gblk_device_state", _labels(other)) == 2
    assert _value(reg, "gblk_device_connected", _labels(other)) == 0
    assert _value(reg, "gblk_device_size_bytes", lab) == 2097152 * 512
    assert _value(reg, "gblk_reconnects_total", lab) == 2
    assert _value(reg, "gblk_persistent_grants", lab) == 100
    assert _value(reg, "gblk_persistent_grants_limit", lab) == 1056
    assert _value(reg, "gblk_persistent_grant_evictions_total", lab) == 7
    assert _value(reg, "gblk_grant_maps_total", lab) == 50
    assert _value(reg, "gblk_grant_unmaps_total", lab) == 40
    assert _value(reg, "gblk_grant_copy_segments_total", lab) == 9


def test_daemon_wide_metrics_and_build_info() -> None:
    """XenStore connection, watch events and build info need no device."""
    stats = DaemonStats(xenstore_connections=2, xenstore_connected=True, watch_events=17)
    reg = _registry(stats)
    assert _value(reg, "gblk_xenstore_connections_total") == 2
    assert _value(reg, "gblk_xenstore_connected") == 1
    assert _value(reg, "gblk_watch_events_total") == 17
    text = generate_latest(reg).decode()
    info = [line for line in text.splitlines() if line.startswith("gblk_build_info{")]
    assert len(info) == 1 and 'version="9.9.9"' in info[0] and 'python="' in info[0]
    import gblk

    assert f'revision="{gblk.revision()}"' in info[0]  # issue 15: which commit runs
    stats.xenstore_connected = False
    assert _value(reg, "gblk_xenstore_connected") == 0


def test_device_that_goes_away_leaves_no_series() -> None:
    """Removing a DeviceStats from DaemonStats.devices makes every series with its
    labels disappear on the next scrape (no stale series after unplug)."""
    stats = DaemonStats()
    gone = _add(stats, _device(domain=5, queues=2))
    stay = _add(stats, _device(domain=6))
    gone.rings[0].requests["read"] += 1
    reg = _registry(stats)
    assert 'domain="5"' in generate_latest(reg).decode()
    del stats.devices[(gone.domain, gone.kind, gone.device)]
    text = generate_latest(reg).decode()
    assert 'domain="5"' not in text
    assert _value(reg, "gblk_device_state", _labels(stay)) == 1


def test_a_ring_that_goes_away_takes_its_queue_series_along() -> None:
    """A device renegotiated with fewer queues has no series for the old queue."""
    stats = DaemonStats()
    dev = _add(stats, _device(queues=4))
    reg = _registry(stats)
    assert _value(reg, "gblk_ring_slots", _labels(dev, queue="3")) == 32
    del dev.rings[3]
    assert _value(reg, "gblk_ring_slots", _labels(dev, queue="3")) is None
    assert _value(reg, "gblk_ring_slots", _labels(dev, queue="2")) == 32


def test_scrape_does_not_mutate_the_stats() -> None:
    """Reading must not create defaultdict entries (the engine owns the stats)."""
    stats = DaemonStats()
    _add(stats, _device(queues=2))
    dev = stats.devices[(5, "vbd", 51712)]
    dev.rings[0].latency["write"].observe(0.001)
    dev.rings[1].batches.observe(2)
    before = _snapshot(stats)
    reg = _registry(stats)
    generate_latest(reg)
    generate_openmetrics(reg)
    assert _snapshot(stats) == before
    del dev.rings[0].latency["write"]
    for ring in stats.devices[(5, "vbd", 51712)].rings.values():
        assert not ring.requests and not ring.bytes and not ring.latency and not ring.errors


def test_duplicate_device_labels_export_one_series() -> None:
    """Two entries describing the same disk must not make a scrape with duplicate
    samples (Prometheus rejects the whole scrape then)."""
    stats = DaemonStats()
    dev = _device()
    dev.rings[0].requests["read"] += 1
    stats.devices[(5, "vbd", 51712)] = dev
    stats.devices[(5, "vbd2", 51712)] = _device()  # a wrong key, same labels
    text = generate_latest(_registry(stats)).decode()
    lines = [ln for ln in text.splitlines() if ln.startswith('gblk_device_state{')]
    assert len(lines) == 1


def test_device_without_rings_exports_device_series_only() -> None:
    """Before the frontend connects there is no ring: device series, zero counters,
    no queue series."""
    stats = DaemonStats()
    dev = _add(stats, _device(queues=0, state=2))
    reg = _registry(stats)
    assert _value(reg, "gblk_device_state", _labels(dev)) == 2
    assert _value(reg, "gblk_requests_total", _labels(dev, op="read")) == 0
    assert _value(reg, "gblk_batch_requests_count", _labels(dev)) == 0
    assert "queue=" not in generate_latest(reg).decode()


def test_merge_rebins_foreign_buckets_into_upper_bounds() -> None:
    """Should a ring ever use other bounds, its counts land in the first reference bound
    at or above their own, so every bucket stays an upper bound on the truth."""
    ref = Histogram((1.0, 10.0))
    ref.observe(0.5)
    odd = Histogram((2.0, 20.0))
    odd.observe(1.5)  # <= 2  -> reference le=10
    odd.observe(15.0)  # <= 20 -> reference +Inf
    odd.observe(50.0)  # +Inf
    buckets, total = _merge_histograms([ref, odd])
    assert buckets == [("1.0", 1.0), ("10.0", 2.0), ("+Inf", 4.0)]
    assert total == pytest.approx(67.0)


def test_describe_names_every_family() -> None:
    """describe() lets the registry catch name clashes (e.g. with the process collector)."""
    names = {m.name for m in GblkCollector(DaemonStats()).describe()}
    assert {"gblk_requests", "gblk_request_duration_seconds", "gblk_build", "gblk_ring_halted"} <= names
    registry = make_registry(DaemonStats())  # default collectors too, without a clash
    assert registry.get_sample_value("process_cpu_seconds_total") is not None


def test_openmetrics_exposition_is_well_formed() -> None:
    """The OpenMetrics encoding ends with # EOF and keeps _total on counters."""
    stats = DaemonStats()
    _add(stats, _device())
    text = generate_openmetrics(_registry(stats)).decode()
    assert text.endswith("# EOF\n")
    assert "# TYPE gblk_requests counter" in text
    assert 'gblk_requests_total{device="51712",domain="5",kind="vbd",op="read"} 0.0' in text
    assert "# UNIT gblk_request_duration_seconds seconds" in text


def test_a_pinned_snapshot_is_what_collect_reads() -> None:
    """prepare_scrape() copies the stats; inside the pin, collect() sees the copy even if
    the engine keeps counting, outside it sees the live stats again. This is what lets
    the exporter encode in a worker thread without touching the engine's dicts there."""
    stats = DaemonStats()
    dev = _add(stats, _device())
    dev.rings[0].requests["read"] = 1
    dev.rings[0].latency["read"].observe(0.001)
    reg = make_registry(stats, process=False)
    pin = reg.prepare_scrape()
    dev.rings[0].requests["read"] = 2
    dev.rings[0].latency["read"].observe(0.001)
    _add(stats, _device(domain=9))
    with pin:
        assert _value(reg, "gblk_requests_total", _labels(dev, op="read")) == 1
        assert _value(reg, "gblk_request_duration_seconds_count", _labels(dev, op="read")) == 1
        assert _value(reg, "gblk_device_state", {"domain": "9", "device": "51712", "kind": "vbd"}) is None
    assert _value(reg, "gblk_requests_total", _labels(dev, op="read")) == 2
    assert _value(reg, "gblk_request_duration_seconds_count", _labels(dev, op="read")) == 2


def test_snapshot_shares_no_mutable_state_with_the_stats() -> None:
    """Every dict, list and histogram in a snapshot is a copy."""
    from gblk.metrics.collector import snapshot_stats

    stats = DaemonStats()
    dev = _add(stats, _device())
    dev.rings[0].latency["read"].observe(0.5)
    snap = snapshot_stats(stats)
    sdev = snap.devices[(5, "vbd", 51712)]
    assert snap.devices is not stats.devices and sdev is not dev
    assert sdev.errors is not dev.errors and sdev.rings is not dev.rings
    ring, sring = dev.rings[0], sdev.rings[0]
    for name in ("requests", "bytes", "errors", "latency", "batches"):
        assert getattr(sring, name) is not getattr(ring, name), name
    assert sring.latency["read"] is not ring.latency["read"]
    assert sring.latency["read"].counts is not ring.latency["read"].counts
    assert _snapshot(snap) == _snapshot(stats)


def test_revision_is_read_from_git_files(tmp_path) -> None:
    """gblk_build_info's revision: the commit of HEAD, through a loose ref, a packed
    ref or a worktree's .git file; None where there is no git."""
    from gblk import git_revision

    sha = "0123456789abcdef0123456789abcdef01234567"
    main = tmp_path / "repo.git"
    (main / "refs" / "heads").mkdir(parents=True)
    (main / "HEAD").write_text("ref: refs/heads/main\n")
    (main / "refs" / "heads" / "main").write_text(sha + "\n")
    assert git_revision(str(main)) == sha
    (main / "refs" / "heads" / "main").unlink()
    (main / "packed-refs").write_text(f"# pack-refs\n{sha} refs/heads/main\n")
    assert git_revision(str(main)) == sha
    wt = main / "worktrees" / "wt"
    wt.mkdir(parents=True)
    (wt / "HEAD").write_text("ref: refs/heads/main\n")
    (wt / "commondir").write_text("../..\n")
    dotgit = tmp_path / "checkout" / ".git"
    dotgit.parent.mkdir()
    dotgit.write_text(f"gitdir: {wt}\n")
    assert git_revision(str(dotgit)) == sha
    assert git_revision(str(tmp_path / "none")) is None
