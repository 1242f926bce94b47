"""The metrics exporter over a real TCP socket: /metrics, /healthz, lifecycle, promtool lint.

The server runs on gevent's WSGI server in this process; the HTTP client
(urllib) runs in gevent's threadpool so the hub keeps serving while a request
waits, with or without monkey-patching.
"""

from __future__ import annotations

import gzip
import socket
import subprocess
import urllib.error
import urllib.request
from typing import Dict, Iterator, List, Optional, Tuple

import gevent
import pytest

from .host_tools import require_tool
from prometheus_client.parser import text_string_to_metric_families

from gblk.engine.stats import DaemonStats, DeviceStats, RingStats
from gblk.errors import ConfigError
from gblk.metrics import GblkCollector, GblkRegistry, MetricsServer, make_registry

Response = Tuple[int, Dict[str, str], bytes]


def _fetch(url: str, method: str = "GET", headers: Optional[Dict[str, str]] = None) -> Response:
    """One HTTP request from a real thread (never blocks the hub)."""

    def call() -> Response:
        req = urllib.request.Request(url, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()

    result: Response = gevent.get_hub().threadpool.apply(call)
    return result


def _promtool() -> str:
    return require_tool("promtool", "prometheus")


def _stats() -> DaemonStats:
    stats = DaemonStats(xenstore_connections=1, xenstore_connected=True, watch_events=3)
    for domain, queues in ((5, 1), (6, 2)):
        dev = DeviceStats(domain=domain, device=51712, kind="vbd", state=4, sectors=1 << 21)
        for q in range(queues):
            ring = RingStats(queue=q, slots=32)
            ring.requests["read"] += 10
            ring.bytes["read"] += 40960
            for _ in range(10):
                ring.latency["read"].observe(0.0004)
            ring.batches.observe(10)
            ring.errors["invalid_segment"] += 1
            dev.rings[q] = ring
        stats.devices[(domain, "vbd", 51712)] = dev
    return stats


class _Health:
    def __init__(self) -> None:
        self.answer: Tuple[bool, str] = (True, "ok")
        self.raise_: bool = False

    def __call__(self) -> Tuple[bool, str]:
        if self.raise_:
            raise RuntimeError("boom")
        return self.answer


@pytest.fixture
def served() -> Iterator[Tuple[MetricsServer, DaemonStats, _Health]]:
    stats = _stats()
    health = _Health()
    server = MetricsServer("127.0.0.1:0", make_registry(stats), health)
    server.start()
    try:
        yield server, stats, health
    finally:
        server.stop()


def test_metrics_default_to_the_classic_text_format(served: Tuple[MetricsServer, DaemonStats, _Health]) -> None:
    """Without an Accept header (curl, old Prometheus) /metrics is text format 0.0.4."""
    server, _, _ = served
    status, headers, body = _fetch(server.url + "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert "# EOF" not in text
    assert 'gblk_requests_total{device="51712",domain="6",kind="vbd",op="read"} 20.0' in text
    assert "process_cpu_seconds_total" in text


def test_metrics_speak_openmetrics_when_asked(served: Tuple[MetricsServer, DaemonStats, _Health]) -> None:
    """Prometheus' Accept header gets OpenMetrics (with # EOF and # UNIT). The version
    in the content type depends on prometheus-client (0.16 says 0.0.1, newer 1.0.0)."""
    server, _, _ = served
    accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
              "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    status, headers, body = _fetch(server.url + "/metrics", headers={"Accept": accept})
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=")
    text = body.decode()
    assert text.endswith("# EOF\n")
    assert "# UNIT gblk_request_duration_seconds seconds" in text


def test_metrics_are_read_at_scrape_time(served: Tuple[MetricsServer, DaemonStats, _Health]) -> None:
    """A scrape shows the stats as they are now; an unplugged disk's series are gone."""
    server, stats, _ = served
    stats.devices[(5, "vbd", 51712)].rings[0].requests["write"] += 7
    _, _, body = _fetch(server.url + "/metrics")
    assert 'gblk_requests_total{device="51712",domain="5",kind="vbd",op="write"} 7.0' in body.decode()
    del stats.devices[(5, "vbd", 51712)]
    _, _, body = _fetch(server.url + "/metrics")
    assert 'domain="5"' not in body.decode()
    assert 'domain="6"' in body.decode()


def test_metrics_gzip_when_accepted(served: Tuple[MetricsServer, DaemonStats, _Health]) -> None:
    """Prometheus asks for gzip; the body then is gzip and decodes to the same text."""
    server, _, _ = served
    status, headers, body = _fetch(server.url + "/metrics", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("content-encoding") == "gzip"
    assert b"gblk_build_info" in gzip.decompress(body)


def test_metrics_head_name_filter_and_methods(served: Tuple[MetricsServer, DaemonStats, _Health]) -> None:
    """HEAD answers without a body, ``name[]`` restricts the families (as
    prometheus_client's own server does), other methods get 405."""
    server, _, _ = served
    status, headers, body = _fetch(server.url + "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    _, _, body = _fetch(server.url + "/metrics?name[]=gblk_ring_slots&name[]=gblk_build_info")
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert families == {"gblk_ring_slots", "gblk_build_info"}
    assert _fetch(server.url + "/metrics", method="POST")[0] == 405


class _WatchedDict(dict):  # type: ignore[type-arg]
    """Records which OS thread reads the device map."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.threads: set = set()

    def _note(self) -> None:
        from gevent.monkey import get_original

        self.threads.add(get_original("threading", "get_ident")())

    def items(self):  # type: ignore[no-untyped-def]
        self._note()
        return super().items()

    def values(self):  # type: ignore[no-untyped-def]
        self._note()
        return super().values()


def test_scrape_reads_live_stats_only_on_the_hub() -> None:
    """A scrape snapshots the stats on the hub and collects and encodes the copy in the
    exporter's worker thread: the engine's dicts are never read from another thread,
    and the big part of a scrape (encoding) does not run on the hub."""
    from gevent.monkey import get_original

    stats = _stats()
    watched = _WatchedDict(stats.devices)
    stats.devices = watched
    registry = GblkRegistry()
    collector = GblkCollector(stats)
    registry.register(collector)
    encoded_in: set = set()
    original_collect = collector.collect

    def spy():  # type: ignore[no-untyped-def]
        encoded_in.add(get_original("threading", "get_ident")())
        return original_collect()

    collector.collect = spy  # type: ignore[method-assign]
    server = MetricsServer("127.0.0.1:0", registry, lambda: (True, "ok"))
    server.start()
    try:
        status, _, body = _fetch(server.url + "/metrics")
    finally:
        server.stop()
    hub_thread = get_original("threading", "get_ident")()
    assert status == 200 and b'domain="6"' in body
    assert watched.threads == {hub_thread}
    assert encoded_in and hub_thread not in encoded_in


def test_healthz_ok_and_unhealthy_with_reason(served: Tuple[MetricsServer, DaemonStats, _Health]) -> None:
    """/healthz: 200 "ok" while healthy, 503 with the check's reason otherwise; a check
    that raises is reported as unhealthy rather than crashing the endpoint."""
    server, _, health = served
    assert _fetch(server.url + "/healthz")[0::2] == (200, b"ok\n")
    health.answer = (False, "xenstore unreachable")
    assert _fetch(server.url + "/healthz")[0::2] == (503, b"xenstore unreachable\n")
    status, _, body = _fetch(server.url + "/healthz", method="HEAD")
    assert status == 503 and body == b""
    health.raise_ = True
    status, _, body = _fetch(server.url + "/healthz")
    assert status == 503 and b"health check failed: RuntimeError: boom" in body
    assert _fetch(server.url + "/healthz", method="POST")[0] == 405


@pytest.mark.parametrize("path", ["/", "/metricsx", "/healthz/", "/favicon.ico", "/api"])
def test_other_paths_are_404(served: Tuple[MetricsServer, DaemonStats, _Health], path: str) -> None:
    """Only /metrics and /healthz exist."""
    server, _, _ = served
    assert _fetch(server.url + path)[0] == 404


def test_promtool_check_metrics_is_clean_on_a_real_scrape(served: Tuple[MetricsServer, DaemonStats, _Health]) -> None:
    """`promtool check metrics` (Prometheus' own lint: naming, units, _total) has nothing
    to say about a scrape of gblk, default collectors included."""
    promtool = _promtool()
    server, stats, _ = served
    ring = stats.devices[(6, "vbd", 51712)].rings[1]
    ring.latency["flush"].observe(0.01)
    ring.errors["io_error"] += 1
    ring.halted = True
    stats.devices[(6, "vbd", 51712)].errors["storage_open"] += 1
    _, _, body = _fetch(server.url + "/metrics")
    proc = subprocess.run([promtool, "check", "metrics"], check=False, input=body, capture_output=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.stdout.decode() + proc.stderr.decode())
    # and the text parses back into the families we meant
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"gblk_requests", "gblk_request_duration_seconds", "gblk_batch_requests", "gblk_build_info"} <= names


def test_start_and_stop_are_idempotent_and_port_zero_is_resolved() -> None:
    """start() twice serves once, stop() twice is harmless, stop() before start() too;
    with port 0 the bound port is readable and really closed after stop()."""
    server = MetricsServer("127.0.0.1:0", make_registry(DaemonStats(), process=False), lambda: (True, "ok"))
    server.stop()
    assert not server.running
    server.start()
    server.start()
    host, port = server.address
    assert host == "127.0.0.1" and port > 0 and server.port == port
    assert _fetch(f"http://127.0.0.1:{port}/healthz")[0] == 200
    server.stop()
    server.stop()
    assert not server.running
    with pytest.raises(RuntimeError):
        _ = server.address
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_serves_on_ipv6_loopback() -> None:
    """A bracketed IPv6 address works end to end."""
    if not socket.has_ipv6:
        pytest.skip("this Python was built without IPv6")
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback on this machine: {exc}")
    server = MetricsServer("[::1]:0", make_registry(DaemonStats(), process=False), lambda: (True, "ok"))
    server.start()
    try:
        assert server.url.startswith("http://[::1]:")
        status, _, body = _fetch(server.url + "/metrics")
        assert status == 200 and b"gblk_build_info" in body
    finally:
        server.stop()


def test_address_in_use_is_a_config_error(served: Tuple[MetricsServer, DaemonStats, _Health]) -> None:
    """A second gblk on the same port fails at start with ConfigError naming the address;
    the first keeps serving."""
    first, _, _ = served
    second = MetricsServer(f"127.0.0.1:{first.port}", make_registry(DaemonStats(), process=False),
                           lambda: (True, "ok"))
    with pytest.raises(ConfigError, match="metrics-address.*in use"):
        second.start()
    assert not second.running
    second.stop()
    assert _fetch(first.url + "/healthz")[0] == 200


def test_unresolvable_host_is_a_config_error() -> None:
    """A host name that does not resolve is reported at start, not as a traceback."""
    server = MetricsServer("no-such-host.invalid:0", make_registry(DaemonStats(), process=False),
                           lambda: (True, "ok"))
    with pytest.raises(ConfigError, match="metrics-address"):
        server.start()


def test_concurrent_scrapes_are_served(served: Tuple[MetricsServer, DaemonStats, _Health]) -> None:
    """Several scrapers at once (HA Prometheus pairs) all get complete answers."""
    server, _, _ = served
    jobs: List[gevent.Greenlet] = [gevent.spawn(_fetch, server.url + "/metrics") for _ in range(6)]
    gevent.joinall(jobs, raise_error=True)
    for job in jobs:
        status, _, body = job.value
        assert status == 200 and b"gblk_build_info" in body
