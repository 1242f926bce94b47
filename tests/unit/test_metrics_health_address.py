"""Unit tests for the metrics address parser and the default /healthz check."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from gblk.engine.stats import DaemonStats, DeviceStats
from gblk.errors import ConfigError
from gblk.metrics import (
    DEFAULT_METRICS_ADDRESS,
    MetricsServer,
    format_address,
    parse_address,
    stats_health,
)
from gblk.metrics.health import DEFAULT_STUCK_AFTER

from .unit_support import FakeClock


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:9741", ("127.0.0.1", 9741)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:9741", ("::1", 9741)),
        ("[::]:1", ("::", 1)),
        ("[fe80::1%eth0]:9741", ("fe80::1%eth0", 9741)),
    ],
)
def test_parse_address_accepts_host_port_and_bracketed_ipv6(text: str, expected: tuple) -> None:
    """--metrics-address takes HOST:PORT and [V6]:PORT; port 0 means any free port."""
    assert parse_address(text) == expected
    assert parse_address(format_address(*expected)) == expected


@pytest.mark.parametrize(
    "text",
    ["", "9741", ":9741", "127.0.0.1", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:65536",
     "::1:9741", "[::1]9741", "[::1", "[127.0.0.1]:9741", "127.0.0.1:-1", "a b:1"],
)
def test_parse_address_rejects_bad_addresses_with_config_error(text: str) -> None:
    """A bad address is a ConfigError naming the option, raised before anything binds."""
    with pytest.raises(ConfigError, match="metrics-address"):
        parse_address(text)
    with pytest.raises(ConfigError):
        MetricsServer(text, CollectorRegistry(), lambda: (True, "ok"))


def test_default_address_is_loopback() -> None:
    """The endpoint is not exposed to the network unless the operator says so."""
    host, port = parse_address(DEFAULT_METRICS_ADDRESS)
    assert host == "127.0.0.1" and port > 0


def test_health_fails_while_xenstore_is_unreachable() -> None:
    """/healthz reports XenStore loss: without it no device can come or go."""
    stats = DaemonStats(xenstore_connected=False)
    ok, reason = stats_health(stats)()
    assert not ok and "xenstore" in reason
    stats.xenstore_connected = True
    assert stats_health(stats)() == (True, "ok")


def test_health_fails_for_a_device_stuck_where_gblk_must_act() -> None:
    """A device left in Initialising/Closing/Reconfiguring past the limit is stuck in
    gblk; InitWait and Connected wait on others and stay healthy however long."""
    clock = FakeClock(1000.0)
    stats = DaemonStats(xenstore_connected=True)
    check = stats_health(stats, stuck_after=60.0, clock=clock)
    waiting = DeviceStats(domain=3, device=768, kind="vbd", state=2, state_since=1.0)
    closing = DeviceStats(domain=5, device=51712, kind="vbd", state=5, state_since=950.0)
    stats.devices[(3, "vbd", 768)] = waiting
    stats.devices[(5, "vbd", 51712)] = closing
    assert check() == (True, "ok")  # closing for 50s: not yet
    clock.now = 1010.0
    ok, reason = check()
    assert not ok and reason == "d5/vbd/51712 stuck in Closing for 60s"
    closing.state, closing.state_since = 6, 1010.0  # it got to Closed
    assert check() == (True, "ok")


def test_health_ignores_devices_with_unknown_state_time() -> None:
    """state_since == 0 means the control plane never stamped it: never 'stuck'."""
    stats = DaemonStats(xenstore_connected=True)
    stats.devices[(1, "vbd", 1)] = DeviceStats(domain=1, device=1, kind="vbd", state=1, state_since=0.0)
    assert stats_health(stats, clock=FakeClock(1e9))() == (True, "ok")
    assert DEFAULT_STUCK_AFTER > 0
