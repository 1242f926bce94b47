"""pytest glue for the real-Xen system suite: one session-scoped boot, one result per test.

The ``xen_run`` fixture builds the images (cached under ``~/.cache/gblk-system``), boots
Xen + dom0 under QEMU once and runs every scenario the selected tests need; each test then
reads its scenario's JSON and fails with the evidence (failed checks and guest steps, the
guest's console, gblk's log, the serial console) in its report.

Environment:
- ``GBLK_SYSTEM_RESULTS=DIR``: reuse the results of an earlier boot (a run directory, its
  ``share/`` or its ``share/results/``): no build, no boot (quick iteration on assertions);
- ``GBLK_SYSTEM_BENCH=0``: leave the side-by-side benchmark out of the boot;
- ``GBLK_SYSTEM_KVM=1``: boot with KVM (only on hosts whose KVM can run a hypervisor);
- ``GBLK_SYSTEM_CACHE=DIR``: where images and run directories live.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from . import lab, runner

#: the mark naming the dom0 scenario a test reads
SCENARIO_MARK = "scenario"
RESULTS_KEY = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{SCENARIO_MARK}(name): the dom0 scenario a system test reads")


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    """Report in the order dom0 runs the scenarios (the benchmark last)."""
    order = {name: i for i, name in enumerate(runner.ALL_SCENARIOS)}

    slots = [i for i, item in enumerate(items) if item.get_closest_marker(SCENARIO_MARK)]
    ours = sorted((items[i] for i in slots),
                  key=lambda item: order.get(item.get_closest_marker(SCENARIO_MARK).args[0], len(order)))
    for i, item in zip(slots, ours):
        items[i] = item


def _tail(path: Path, size: int = 6000) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    data = path.read_bytes()
    text = data[-size:].decode("utf-8", "replace")
    return ("...\n" if len(data) > size else "") + text


class XenRun:
    """The results of one boot (``share/results`` of a run directory)."""

    def __init__(self, results: Path) -> None:
        self.results = results

    @classmethod
    def locate(cls, path: Path) -> "XenRun":
        for candidate in (path / "share" / "results", path / "results", path):
            if (candidate / "run.json").exists() or (candidate / "serial.log").exists():
                return cls(candidate)
        raise pytest.UsageError(f"GBLK_SYSTEM_RESULTS={path}: no run.json or serial.log in it")

    def run_info(self) -> Dict[str, Any]:
        path = self.results / "run.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def result(self, name: str) -> Optional[Dict[str, Any]]:
        path = self.results / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def attach_logs(self, item: pytest.Item, result: Optional[Dict[str, Any]]) -> None:
        """Put the evidence into the test's report sections."""
        logs = self.results / "logs"
        if result is not None:
            for console in result.get("consoles", []):
                item.add_report_section("call", f"guest console {console}", _tail(self.results / console))
            for extra in result.get("logs", []):  # the scenario's own (a device model's, ...)
                item.add_report_section("call", f"{extra} (tail)", _tail(self.results / extra))
        item.add_report_section("call", "gblk.log (tail)", _tail(logs / "gblk.log"))
        for state in sorted(logs.glob("gblk-status-*.txt")) + sorted(logs.glob("gblk-list-*.txt")):
            item.add_report_section("call", f"{state.name} (gblk at a failed scenario)", _tail(state, 3000))
        item.add_report_section("call", "payload.log (tail)", _tail(logs / "payload.log", 4000))
        if result is None:
            item.add_report_section("call", "serial console (tail)", _tail(self.results / "serial.log"))

    def require(self, item: pytest.Item, name: str) -> Dict[str, Any]:
        """The scenario's result; fail the test with the evidence unless it passed."""
        result = self.result(name)
        if result is None:
            info = self.run_info().get("qemu", {})
            self.attach_logs(item, None)
            pytest.fail(
                f"scenario {name}: no result in {self.results} (QEMU exit {info.get('rc')}, "
                f"timed out: {info.get('timed_out')}); the serial console tail is in the report",
                pytrace=False,
            )
        if result["status"] != "pass":
            self.attach_logs(item, result)
            lines = [f"scenario {name} failed after {result['seconds']} s (results: {self.results})"]
            if result.get("error"):
                lines.append(f"  error: {result['error']}")
            for kind in ("checks", "steps"):
                for entry in result.get(kind, []):
                    if not entry["ok"]:
                        lines.append(f"  {kind[:-1]} {entry['name']} failed: {entry['detail']}")
            if not result.get("checks") and not result.get("steps"):
                lines.append("  nothing was checked")
            pytest.fail("\n".join(lines), pytrace=False)
        return result


def _wanted_scenarios(items: List[pytest.Item]) -> List[str]:
    wanted = set()
    for item in items:
        for mark in item.iter_markers(SCENARIO_MARK):
            wanted.add(mark.args[0])
    if os.environ.get("GBLK_SYSTEM_BENCH", "1") == "0":
        wanted.discard("bench")
    return [s for s in runner.ALL_SCENARIOS if s in wanted] + sorted(wanted - set(runner.ALL_SCENARIOS))


@pytest.fixture(scope="session")
def xen_run(request: pytest.FixtureRequest) -> XenRun:
    """One boot for the whole session (or the results of an earlier one)."""
    reuse = os.environ.get("GBLK_SYSTEM_RESULTS")
    if reuse:
        run = XenRun.locate(Path(reuse))
        lab.log(f"system: reusing results in {run.results}")
        request.config.stash[RESULTS_KEY] = run.results
        return run
    scenarios = _wanted_scenarios(request.session.items)
    kvm = os.environ.get("GBLK_SYSTEM_KVM", "0") == "1"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    try:
        # progress lines (build steps, boot, QEMU's exit) go to the terminal as they happen
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            lab.log(f"system: scenarios {','.join(scenarios)}")
            result = runner.run(scenarios, kvm=kvm)
    except lab.StepError as e:
        pytest.fail(f"system suite setup failed: {e}", pytrace=False)
    request.config.stash[RESULTS_KEY] = result.results
    return XenRun(result.results)


@pytest.fixture
def scenario(request: pytest.FixtureRequest, xen_run: XenRun) -> Any:
    """``scenario()``: the result of the scenario named by the test's ``scenario`` mark;
    fails the test, with the evidence in its report, unless the scenario passed."""
    mark = request.node.get_closest_marker(SCENARIO_MARK)
    assert mark is not None, "system tests name their scenario with @pytest.mark.scenario(name)"
    return lambda: xen_run.require(request.node, mark.args[0])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Stage timings (build, boot, each scenario) and the benchmark table, after the tests."""
    results = terminalreporter.config.stash.get(RESULTS_KEY, None)
    if results is None:
        return
    run = XenRun(results)
    info = run.run_info()
    tr = terminalreporter
    tr.section("gblk system suite: timings")
    manifest = info.get("build_manifest", {})
    tr.write_line(f"results: {run.results}")
    if manifest:
        tr.write_line(f"image build (when it ran): {manifest.get('seconds')} s {manifest.get('timings')}")
    tr.write_line(f"image stage in this session: {info.get('image_stage_seconds')} s")
    tr.write_line(f"package (.deb) stage: {info.get('deb_stage_seconds')} s: {info.get('deb')}")
    qemu = info.get("qemu", {})
    tr.write_line(f"boot (QEMU start to exit): {qemu.get('seconds')} s, exit {qemu.get('rc')}")
    for stamp, t in sorted(info.get("dom0", {}).items(), key=lambda kv: kv[1]):
        tr.write_line(f"  dom0 +{t:7.1f} s  {stamp}")
    for name in runner.ALL_SCENARIOS + ("pipeline",):
        res = run.result(name)
        if res is not None:
            tr.write_line(f"  {name:14} {res['status']:5} {res['seconds']:7.1f} s  {res.get('timings', {})}")
    bench = run.result("bench")
    if bench is not None:
        tr.section("gblk system suite: benchmark (TCG: compare the ratios, not the figures)")
        for line in bench_table(bench.get("data", {})):
            tr.write_line(line)


def bench_table(data: Dict[str, Any]) -> List[str]:
    """IOPS and MiB/s per job and backend, and the ratios gblk/qdisk and gblk/blkback."""
    backends = [b for b in ("gblk", "qdisk", "blkback") if b in data]
    jobs = ["randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd1", "randwrite-4k-qd32",
            "read-1m-seq", "write-1m-seq"]
    head = f"{'job':18}" + "".join(f"{b + ' IOPS':>14}{b + ' MiB/s':>14}" for b in backends)
    head += f"{'gblk/qdisk':>12}{'gblk/blkback':>14}"
    lines = [head]
    for job in jobs:
        row = f"{job:18}"
        iops: Dict[str, float] = {}
        for b in backends:
            cell = data[b].get(job, {})
            iops[b] = float(cell.get("iops") or 0.0)
            row += f"{iops[b]:14.1f}{float(cell.get('mib_s') or 0.0):14.2f}"
        for other, width in (("qdisk", 12), ("blkback", 14)):
            if iops.get("gblk") and iops.get(other):
                row += f"{iops['gblk'] / iops[other]:>{width}.2f}"
            else:
                row += f"{'-':>{width}}"
        lines.append(row)
    for key in ("qdisk_error", "blkback_error"):
        if key in data:
            lines.append(f"{key}: {data[key]}")
    return lines
