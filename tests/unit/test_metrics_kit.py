"""The monitoring/ kit agrees with what gblk exports.

Rules, the dashboard and the README name metrics by hand; these tests catch a
rename on either side (an alert on a metric that no longer exists never fires).
Pure file reads plus an in-memory scrape: no promtool here (see
tests/integration/test_prometheus_rules.py for that).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Set

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gblk.engine.stats import DaemonStats, DeviceStats, RingStats
from gblk.metrics import GblkCollector

KIT = Path(__file__).resolve().parents[2] / "monitoring"
#: a gblk metric name, but not the middle of a recording rule name (level:gblk_x:op)
NAME = re.compile(r"(?<![:\w])gblk_[a-z0-9_]*[a-z0-9](?![\w:])")


def _scrape(nbd: str = "connected") -> List[object]:
    """The families of one full scrape (a device with a ring, served over NBD unless
    ``nbd`` is "")."""
    stats = DaemonStats()
    dev = DeviceStats(domain=1, device=51712, kind="vbd", nbd_state=nbd)
    dev.rings[0] = RingStats()
    stats.devices[(1, "vbd", 51712)] = dev
    reg = CollectorRegistry()
    reg.register(GblkCollector(stats))
    return list(text_string_to_metric_families(generate_latest(reg).decode()))


def _exported() -> Set[str]:
    """Every family and sample name one full scrape produces."""
    names: Set[str] = set()
    for fam in _scrape():
        names.add(fam.name)  # type: ignore[attr-defined]
        names.update(s.name for s in fam.samples)  # type: ignore[attr-defined]
    return names


def _referenced(text: str) -> Set[str]:
    return set(NAME.findall(text))


def _recording_rules() -> Dict[str, str]:
    text = (KIT / "rules" / "recording.yml").read_text()
    return dict(re.findall(r"^\s*- record: (\S+)\n\s*expr: (.*)$", text, re.MULTILINE))


def _alerts() -> List[str]:
    return re.findall(r"^\s*- alert: (\w+)", (KIT / "rules" / "alerts.yml").read_text(), re.MULTILINE)


def test_rules_use_only_exported_metrics() -> None:
    """Every gblk_* metric an alert or recording rule reads is one gblk exports."""
    exported = _exported()
    for name in ("alerts.yml", "recording.yml"):
        unknown = _referenced((KIT / "rules" / name).read_text()) - exported
        assert not unknown, f"{name} uses metrics gblk does not export: {sorted(unknown)}"


def test_dashboard_uses_only_exported_metrics_and_has_the_variables() -> None:
    """The Grafana dashboard parses, its queries name exported metrics only, panel ids
    are unique, and it can be filtered by host (instance) and domain."""
    dash = json.loads((KIT / "grafana" / "gblk.json").read_text())
    exported = _exported()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    unknown = set().union(*(_referenced(e) for e in exprs)) - exported
    assert not unknown, f"dashboard uses metrics gblk does not export: {sorted(unknown)}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance", "domain"} <= variables
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("iops", "throughput", "latency", "errors", "grant", "in flight"):
        assert topic in titles, topic
    assert any(p["type"] == "heatmap" for p in dash["panels"])


def test_readme_documents_every_exported_family() -> None:
    """Each gblk metric family has a line in monitoring/README.md, and the README
    mentions no metric that does not exist."""
    readme = (KIT / "README.md").read_text()
    documented = _referenced(readme)
    families = [fam.name for fam in _scrape()]  # type: ignore[attr-defined]
    missing = [f for f in families if not {f, f + "_total", f + "_info"} & documented]
    assert not missing, f"README lacks: {missing}"
    unknown = documented - _exported()
    assert not unknown, f"README names metrics gblk does not export: {sorted(unknown)}"


def test_nbd_families_only_for_nbd_disks() -> None:
    """gblk_nbd_* series exist for a disk served over NBD (connected: 1, reconnecting:
    0) and not for a raw one."""
    def nbd_samples(state: str) -> dict:
        return {smp.name: smp.value for fam in _scrape(state)  # type: ignore[attr-defined]
                for smp in fam.samples if smp.name.startswith("gblk_nbd_")}
    assert nbd_samples("") == {}
    up = nbd_samples("connected")
    assert up["gblk_nbd_connected"] == 1 and "gblk_nbd_reconnects_total" in up
    assert nbd_samples("reconnecting")["gblk_nbd_connected"] == 0


def test_every_alert_has_a_promtool_test() -> None:
    """Each alert in rules/alerts.yml is exercised by at least one promtool unit test."""
    tests = "\n".join(p.read_text() for p in sorted((KIT / "tests").glob("*.yml")))
    tested = set(re.findall(r"alertname: (\w+)", tests))
    alerts = _alerts()
    assert alerts and len(alerts) == len(set(alerts))
    assert set(alerts) <= tested, sorted(set(alerts) - tested)
    for required in ("GblkDown", "GblkDeviceNotConnected", "GblkIOErrors", "GblkHighRequestLatency",
                     "GblkPersistentGrantThrashing", "GblkRingHalted"):
        assert required in alerts


def test_every_recording_rule_is_tested() -> None:
    """Each recording rule's output is checked in monitoring/tests/recording_test.yml."""
    tested = (KIT / "tests" / "recording_test.yml").read_text()
    for record in _recording_rules():
        assert record in tested, record


def test_dashboard_reads_the_recording_rules_it_ships() -> None:
    """Issue 15: the dashboard recomputed every rate and quantile itself and used none
    of the recording rules shipped beside it. Its IOPS, throughput, latency, ring and
    error panels now read the recorded series (cheap to query over long ranges), and
    every series it reads that way is one recording.yml defines."""
    dash = json.loads((KIT / "grafana" / "gblk.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    used = set(re.findall(r"\b[a-z_]+:gblk_[a-z_]+:[a-z0-9_]+\b", exprs))
    assert used <= set(_recording_rules()), sorted(used - set(_recording_rules()))
    for record in ("device_op:gblk_requests:rate5m", "device_op:gblk_bytes:rate5m",
                   "device_op:gblk_request_duration_seconds:p99_5m",
                   "device_reason:gblk_errors:rate5m", "queue:gblk_ring_fill:ratio"):
        assert record in used, record
    assert "rate(gblk_requests_total" not in exprs and "rate(gblk_bytes_total" not in exprs
