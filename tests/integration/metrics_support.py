"""Helpers for the metrics tests that run a real daemon on the simulated host:
raw HTTP fetches, bounded polling of scrapes, the series of one device, and a
guest workload loop that counts what it asked for.

Builds on ``backend_support`` (daemon start-up, ``scrape``, ``metric``); must not
import gblk's engine, device, daemon or metrics layers: the daemon is only ever
reached over HTTP, XenStore and the rings, like a real operator and guest reach it.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Dict, List, Optional, Tuple, TypeVar

import gevent

from gblk.sim.guest.frontend import Frontend

from .backend_support import eventually, scrape

#: bound on every wait for the daemon to catch up (a hang guard, not a performance bound)
WAIT = 30.0

T = TypeVar("T")


def http_get(url: str, accept: Optional[str] = None) -> Tuple[int, bytes]:
    """(status, body) of a GET; HTTP errors are answers too, not exceptions."""
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def healthz_url(metrics_url: str) -> str:
    assert metrics_url.endswith("/metrics"), metrics_url
    return metrics_url[: -len("/metrics")] + "/healthz"


def labels_of(key: str) -> Dict[str, str]:
    """``name{a="1",b="x"}`` -> {"a": "1", "b": "x"} (gblk's label values are plain)."""
    _, _, rest = key.partition("{")
    out: Dict[str, str] = {}
    for part in rest.rstrip("}").split(","):
        if "=" in part:
            k, _, v = part.partition("=")
            out[k] = v.strip('"')
    return out


def device_series(samples: Dict[str, float], domain: int,
                  device: Optional[int] = None) -> List[str]:
    """Every sample of ``domain`` (and ``device``) in a scrape."""
    out = []
    for key in samples:
        lab = labels_of(key)
        if lab.get("domain") != str(domain):
            continue
        if device is not None and lab.get("device") != str(device):
            continue
        out.append(key)
    return out


def wait_series_gone(url: str, domain: int, device: Optional[int] = None) -> Dict[str, float]:
    """Scrape until no series of the device is left; returns that scrape."""
    return eventually(lambda: scrape(url), lambda s: not device_series(s, domain, device),
                      f"series of domain {domain} device {device}")


class GuestLoop:
    """A guest's disk busy with a fixed mix (write, read back, flush) in a greenlet,
    until ``stop()``; counts the ring requests and bytes it was answered for, by op.
    Every request the loop places is single-segment (one page), so one operation is
    exactly one ring request."""

    def __init__(self, fe: Frontend, span_sectors: int = 8192) -> None:
        self.fe = fe
        self.span = span_sectors
        self.requests: Dict[str, int] = {"read": 0, "write": 0, "flush": 0}
        self.bytes: Dict[str, int] = {"read": 0, "write": 0, "flush": 0}
        self.failures: List[str] = []
        self._running = True
        self._greenlet: Optional[gevent.Greenlet] = None

    def start(self) -> "GuestLoop":
        self._greenlet = gevent.spawn(self._run)
        return self

    def _run(self) -> None:
        i = 0
        while self._running:
            sector = (i * 8) % self.span
            data = bytes([(i * 37 + k) & 0xFF for k in range(256)]) * 16
            try:
                self.fe.write(sector, data)
                self._count("write", 4096)
                if self.fe.read(sector, 8) != data:
                    self.failures.append(f"read back of sector {sector} differs")
                self._count("read", 4096)
                if i % 8 == 7:
                    self.fe.flush()
                    self._count("flush", 0)
            except Exception as e:  # noqa: BLE001 - reported by stop()
                self.failures.append(repr(e))
                return
            i += 1

    def _count(self, op: str, nbytes: int) -> None:
        self.requests[op] += 1
        self.bytes[op] += nbytes

    def stop(self) -> None:
        """Let the operation in progress finish, then stop; raises on any failure."""
        self._running = False
        g, self._greenlet = self._greenlet, None
        if g is not None:
            g.join(timeout=WAIT)
            if not g.dead:
                g.kill(timeout=5)
                self.failures.append("workload did not stop")
        assert not self.failures, self.failures
