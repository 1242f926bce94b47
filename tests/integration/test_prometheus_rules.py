"""The monitoring/ kit passes Prometheus' own tools: `promtool check rules`,
`promtool test rules` (one unit test per alert at least) and `promtool check config`."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import List


from .host_tools import require_tool

KIT = Path(__file__).resolve().parents[2] / "monitoring"


def _promtool() -> str:
    return require_tool("promtool", "prometheus")


def _run(args: List[str]) -> str:
    proc = subprocess.run([_promtool()] + args, check=False, capture_output=True, text=True, timeout=120, cwd=KIT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def test_rules_are_valid() -> None:
    """Both rule files parse and every expression is valid PromQL."""
    out = _run(["check", "rules", "rules/recording.yml", "rules/alerts.yml"])
    assert "SUCCESS" in out and "FAILED" not in out


def test_promtool_unit_tests_pass() -> None:
    """Each alert fires when it should and stays quiet when it should not; the
    recording rules compute the values the dashboard and alerts rely on."""
    tests = sorted(str(p.relative_to(KIT)) for p in (KIT / "tests").glob("*.yml"))
    assert len(tests) >= 7
    out = _run(["test", "rules"] + tests)
    assert out.count("SUCCESS") == len(tests), out


def test_example_scrape_config_is_valid() -> None:
    """The example Prometheus configuration loads, rule files included."""
    out = _run(["check", "config", "prometheus/scrape.yml"])
    assert "is valid prometheus config file syntax" in out
