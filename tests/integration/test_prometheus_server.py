"""A real Prometheus server scrapes a live gblk exporter on loopback.

The module starts the exporter in this process over synthetic stats that grow
with wall-clock time (a stand-in for a demo workload: reads at a known rate),
then a real ``prometheus`` (Debian's package) with a temporary configuration,
a temporary TSDB, a free loopback port, a 1 s scrape interval and the kit's
rule files. The tests read rates back through Prometheus' HTTP API, check that
the recording rules and every dashboard query evaluate on a real server, and
that an unplugged disk's series go stale. Every wait is bounded; the
Prometheus process is terminated (then killed) whatever happens.

When the simulated host and ``gblk demo`` exist, the same harness
(``PrometheusServer``) can point at the demo's ``--metrics-address`` instead.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import gevent
import pytest

from .backend_support import eventually
from .host_tools import require_tool

from gblk.engine.stats import DaemonStats, DeviceStats, RingStats
from gblk.metrics import MetricsServer, make_registry, stats_health

KIT = Path(__file__).resolve().parents[2] / "monitoring"

#: about 12 s: Prometheus applies new scrape targets on a 5 s tick, then a few scrapes
pytestmark = pytest.mark.slow

#: synthetic workload: reads per second on d5/vbd/51712, 4 KiB each
READ_RATE = 200.0
READ_SIZE = 4096
#: bound on every wait for Prometheus (start-up, first scrapes, rule evaluation)
WAIT = 45.0

Response = Tuple[int, bytes]


def _fetch(url: str) -> Response:
    """GET from a real thread, so the hub keeps serving the exporter meanwhile."""

    def call() -> Response:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError:
            return 0, b""

    result: Response = gevent.get_hub().threadpool.apply(call)
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """A throw-away Prometheus on 127.0.0.1 scraping ``targets`` every second
    (or as ``scrape_configs``, YAML lines of that list, say: TLS, basic auth)."""

    def __init__(self, binary: str, workdir: Path, targets: List[str], rule_files: List[Path],
                 scrape_configs: Optional[List[str]] = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.targets = targets
        self.rule_files = rule_files
        self.scrape_configs = scrape_configs
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.log = workdir / "prometheus.log"

    def start(self) -> None:
        config = self.workdir / "prometheus.yml"
        lines = [
            "global:",
            "  scrape_interval: 1s",
            "  scrape_timeout: 1s",
            "  evaluation_interval: 1s",
            "rule_files:",
            *[f"  - {json.dumps(str(p))}" for p in self.rule_files],
            "scrape_configs:",
            *(self.scrape_configs or [
                "  - job_name: gblk",
                "    static_configs:",
                f"      - targets: {json.dumps(self.targets)}",
            ]),
        ]
        config.write_text("\n".join(lines) + "\n")
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = _free_port()
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={self.workdir / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--log.level=info",
                    ],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )
            if self._wait_ready():
                return
            if "address already in use" not in self.log_tail():
                break
        raise AssertionError("prometheus did not become ready:\n" + self.log_tail())

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            if _fetch(f"{self.url}/-/ready")[0] == 200:
                return True
            gevent.sleep(0.2)
        self.stop()
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            gevent.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns ``data`` or raises with Prometheus' error."""
        status, body = _fetch(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert status == 200, f"{path} {params}: HTTP {status}: {body[:500]!r}"
        doc = json.loads(body)
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> List[Dict[str, Any]]:
        data = self.api("query", query=expr)
        result: List[Dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [
            {"metric": {}, "value": data["result"]}]
        return result

    def eventually(self, expr: str, accept: Callable[[List[Dict[str, Any]]], bool]) -> List[Dict[str, Any]]:
        """Query until ``accept(result)``; bounded by WAIT. The failure carries the
        last result and the tail of Prometheus' log."""
        try:
            return eventually(lambda: self.query(expr), accept, expr, timeout=WAIT, interval=0.25)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- prometheus log ---\n{self.log_tail()}") from None


class Workload:
    """Synthetic stats that change over time: counters are a function of the clock,
    so Prometheus' rate() must come back close to READ_RATE."""

    def __init__(self) -> None:
        self.stats = DaemonStats(xenstore_connections=1, xenstore_connected=True)
        self.busy = self._device(5)
        self.idle = self._device(6)
        self.start = time.monotonic()
        self.done = 0
        self.greenlet: Optional[gevent.Greenlet] = None

    def _device(self, domain: int) -> DeviceStats:
        dev = DeviceStats(domain=domain, device=51712, kind="vbd", state=4, sectors=1 << 21,
                          persistent_grants_limit=1056)
        dev.rings[0] = RingStats(queue=0, slots=32)
        self.stats.devices[(domain, "vbd", 51712)] = dev
        return dev

    def tick(self) -> None:
        ring = self.busy.rings[0]
        target = int(READ_RATE * (time.monotonic() - self.start))
        new = target - self.done
        if new <= 0:
            return
        ring.requests["read"] += new
        ring.bytes["read"] += new * READ_SIZE
        ring.grant_maps += new
        ring.grant_unmaps += new
        ring.batches.observe(new)
        for _ in range(new):
            ring.latency["read"].observe(0.0004)
        ring.in_flight = new % 4
        ring.ring_fill = new % 8
        self.busy.persistent_grants = min(1056, target)
        self.stats.watch_events += 1
        self.done = target

    def run(self) -> None:
        while True:
            self.tick()
            gevent.sleep(0.02)


def _binary() -> str:
    return require_tool("prometheus", "prometheus")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[Workload, MetricsServer, PrometheusServer]]:
    binary = _binary()
    work = Workload()
    exporter = MetricsServer("127.0.0.1:0", make_registry(work.stats), stats_health(work.stats))
    prom: Optional[PrometheusServer] = None
    try:
        exporter.start()
        work.greenlet = gevent.spawn(work.run)
        prom = PrometheusServer(
            binary, tmp_path_factory.mktemp("prometheus"), [f"127.0.0.1:{exporter.port}"],
            [KIT / "rules" / "recording.yml", KIT / "rules" / "alerts.yml"])
        prom.start()
        yield work, exporter, prom
    finally:
        if prom is not None:
            prom.stop()
        if work.greenlet is not None:
            work.greenlet.kill(timeout=5)
        exporter.stop()


def _value(sample: Dict[str, Any]) -> float:
    return float(sample["value"][1])


def test_rate_read_back_through_the_http_api(lab: Tuple[Workload, MetricsServer, PrometheusServer]) -> None:
    """Prometheus scrapes gblk and rate() of requests and bytes matches the workload."""
    _, _, prom = lab
    sel = '{job="gblk", domain="5", device="51712", kind="vbd", op="read"}'
    # rate() over a window only partly covered by samples under-reads (it extrapolates
    # half a scrape interval at most): wait until the whole window has samples
    prom.eventually(f"count_over_time(gblk_requests_total{sel}[6s])", lambda r: len(r) == 1 and _value(r[0]) >= 6)
    result = prom.query(f"rate(gblk_requests_total{sel}[5s])")
    assert len(result) == 1 and 0.8 * READ_RATE < _value(result[0]) < 1.2 * READ_RATE, result
    result = prom.query(f"rate(gblk_bytes_total{sel}[5s])")
    assert len(result) == 1 and 0.8 * READ_RATE * READ_SIZE < _value(result[0]) < 1.2 * READ_RATE * READ_SIZE, result
    # the idle disk is there, at zero
    idle = prom.query('gblk_requests_total{domain="6", op="read"}')
    assert len(idle) == 1 and _value(idle[0]) == 0


def test_target_is_up_without_scrape_errors(lab: Tuple[Workload, MetricsServer, PrometheusServer]) -> None:
    """Prometheus accepts gblk's exposition (it negotiates OpenMetrics) without errors."""
    _, exporter, prom = lab
    prom.eventually('up{job="gblk"}', lambda r: len(r) == 1 and _value(r[0]) == 1)
    targets = prom.api("targets")["activeTargets"]
    assert len(targets) == 1
    assert targets[0]["health"] == "up" and targets[0]["lastError"] == "", targets[0]
    assert targets[0]["scrapeUrl"] == f"http://127.0.0.1:{exporter.port}/metrics"


def test_recording_rules_and_alerts_load_on_a_real_server(lab: Tuple[Workload, MetricsServer, PrometheusServer]) -> None:
    """The kit's rule files load into a real Prometheus, and the IOPS recording rule
    produces a value for the busy disk."""
    _, _, prom = lab
    groups = prom.api("rules")["groups"]
    names = {g["name"] for g in groups}
    assert {"gblk-recording", "gblk-alerts"} <= names
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok", rule
    result = prom.eventually('device_op:gblk_requests:rate5m{domain="5", op="read"}',
                             lambda r: len(r) == 1 and _value(r[0]) > 0)
    assert _value(result[0]) > 0


def _dashboard() -> Dict[str, Any]:
    doc: Dict[str, Any] = json.loads((KIT / "grafana" / "gblk.json").read_text())
    return doc


def _expand(expr: str) -> str:
    return (expr.replace("$__rate_interval", "5s")
            .replace("$instance", ".*").replace("$domain", ".*").replace("$device", ".*"))


def test_every_dashboard_query_runs_on_a_real_server(lab: Tuple[Workload, MetricsServer, PrometheusServer]) -> None:
    """Each panel query of grafana/gblk.json (variables filled in as "All") is valid
    PromQL, the IO panels show data for the running workload, and the host and domain
    variables find their values."""
    _, exporter, prom = lab
    prom.eventually('rate(gblk_requests_total{domain="5", op="read"}[5s])', lambda r: len(r) == 1)
    must_show = {"IOPS", "Throughput", "Request latency (all selected disks)", "Latency p50 / p99", "In flight",
                 "Requests per batch", "Disks connected", "Persistent grants", "Grant maps and unmaps", "Process"}
    dash = _dashboard()
    seen = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            result = prom.query(_expand(target["expr"]))  # raises on invalid PromQL
            if result:
                seen.add(panel["title"])
    assert must_show <= seen, must_show - seen
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for name, expected in (("instance", f"127.0.0.1:{exporter.port}"), ("domain", "5")):
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", variables[name]["definition"])
        assert m is not None, variables[name]
        values = prom.api(f"label/{m.group(2)}/values", **{"match[]": _expand(m.group(1))})
        assert expected in values, (name, values)


def test_unplugged_device_series_go_stale(lab: Tuple[Workload, MetricsServer, PrometheusServer]) -> None:
    """When a disk leaves DaemonStats its series stop at once in Prometheus too
    (staleness markers: no 5-minute ghost after unplug)."""
    work, _, prom = lab
    prom.eventually('gblk_device_state{domain="6"}', lambda r: len(r) == 1)
    del work.stats.devices[(6, "vbd", 51712)]
    prom.eventually('gblk_device_state{domain="6"}', lambda r: r == [])
    assert prom.query('gblk_requests_total{domain="6"}') == []
    assert len(prom.query('gblk_device_state{domain="5"}')) == 1
