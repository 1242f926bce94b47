"""Shared helpers for the backend's integration tests: daemons on a simulated host,
metrics scraping, a verified exercise, and waiting on a condition with a hang guard
(``eventually``, ``wait_until``)."""

from __future__ import annotations

import contextlib
import os
import re
import time
import urllib.request
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, TypeVar

import gevent

from gblk.sim.guest.frontend import Frontend
from gblk.sim.harness.host import BackendProcess, SimHost, child_env

SECTOR = 512


def start_daemon(host: SimHost, name: str, toml: str, extra: Sequence[str] = (),
                 env: Optional[Dict[str, str]] = None) -> BackendProcess:
    """A ``gblk serve --xen sim:DIR`` process with its own config file and log;
    ``env``: variables set for it on top of the usual child environment."""
    cfg = os.path.join(host.dir, f"{name}.toml")
    with open(cfg, "w") as f:
        f.write(toml)
    argv = host.backend_argv(["--config", cfg, "--metrics-address", "127.0.0.1:0", *extra])
    return BackendProcess(argv, os.path.join(host.dir, f"{name}.log"), child_env(env))


@contextlib.contextmanager
def served_host(name: str, toml: str,
                dir: Optional[str] = None) -> Iterator[Tuple[SimHost, BackendProcess, str]]:
    """One simulated host (in ``dir``, else a fresh directory) and one daemon called
    ``name`` with config ``toml``: yields (host, daemon, its /metrics URL); the
    daemon is stopped at the end. The body of a module's ``served`` fixture."""
    with SimHost(dir=dir) as host:
        daemon = start_daemon(host, name, toml)
        try:
            yield host, daemon, metrics_url(daemon)
        finally:
            daemon.stop()


@contextlib.contextmanager
def logs_on_failure(*procs: BackendProcess) -> Iterator[None]:
    """Re-raise a failure with the tail of each daemon's log attached."""
    try:
        yield
    except BaseException as e:
        for p in procs:  # the whole logs, for the post-mortem
            with open(os.path.join("/tmp", "gblk-failed-" + os.path.basename(p.log_path)), "w") as f:
                f.write(p.log_text())
        tails = "\n".join(f"--- {p.log_path}\n{p.log_text()[-4000:]}" for p in procs)
        raise AssertionError(f"{e!r}\n{tails}") from e


def metrics_url(proc: BackendProcess, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"serving on (http://\S+/metrics)", proc.log_text())
        if m:
            return m.group(1)
        if not proc.alive():
            raise AssertionError("daemon died:\n" + proc.log_text())
        time.sleep(0.05)
    raise AssertionError("daemon never served metrics:\n" + proc.log_text())


def wait_ready(proc: BackendProcess, timeout: float = 30.0) -> None:
    """Until the daemon logs that it serves: its disks taken over, then its metrics and
    control socket up (a restarted gblk opens its sockets after the disks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(r"gblk \S+ serving ", proc.log_text()):
            return
        if not proc.alive():
            raise AssertionError("daemon died:\n" + proc.log_text())
        time.sleep(0.05)
    raise AssertionError("daemon never said it serves:\n" + proc.log_text())


def scrape(url: str) -> Dict[str, float]:
    """Sample name with labels -> value (classic text format)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: Dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(samples: Dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def pattern(seed: int, nbytes: int) -> bytes:
    """Distinct, position-dependent bytes: a misplaced sector cannot pass."""
    block = bytes((seed * 131 + i * 7 + (i >> 9)) & 0xFF for i in range(4096))
    reps = nbytes // 4096 + 1
    return (block * reps)[:nbytes]


def file_bytes(path: str, sector: int, nsectors: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(sector * SECTOR)
        return f.read(nsectors * SECTOR)


def exercise(fe: Frontend, image: str, big_sectors: Optional[int] = None) -> None:
    """Every operation, verified byte for byte by the frontend and in the image file."""
    # a single sector in the middle of a page, then one request of 11 segments
    fe.write(3, pattern(1, SECTOR))
    assert fe.read(3, 1) == pattern(1, SECTOR)
    fe.write(64, pattern(2, 11 * 4096))
    assert fe.read(64, 88) == pattern(2, 11 * 4096)
    # a large request: INDIRECT when negotiated, split into 11-segment requests otherwise
    big = big_sectors or 2048  # 1 MiB
    fe.write(4096, pattern(3, big * SECTOR))
    assert fe.read(4096, big) == pattern(3, big * SECTOR)
    # flush without and with data, barrier without and with data
    fe.flush()
    fe.flush(8192, pattern(4, 8 * SECTOR))
    fe.barrier(8200, pattern(5, 16 * SECTOR))
    fe.barrier(0, None)
    assert fe.read(8192, 24) == pattern(4, 8 * SECTOR) + pattern(5, 16 * SECTOR)
    # discard reads back zeros
    fe.write(12288, pattern(6, 64 * SECTOR))
    fe.discard(12288, 64)
    assert fe.read(12288, 64) == bytes(64 * SECTOR)
    # many in flight at once, on every queue
    results = []
    for i in range(48):
        results.append(fe.submit_write(16384 + i * 16, pattern(10 + i, 8 * SECTOR)))
    for r in results:
        assert r.get(timeout=60).ok
    results = [fe.submit_read(16384 + i * 16, 8) for i in range(48)]
    for i, r in enumerate(results):
        res = r.get(timeout=60)
        assert res.ok and res.data == pattern(10 + i, 8 * SECTOR)
    # the bytes really are in the file, where the guest put them
    assert file_bytes(image, 3, 1) == pattern(1, SECTOR)
    assert file_bytes(image, 4096, big) == pattern(3, big * SECTOR)
    assert file_bytes(image, 16384 + 47 * 16, 8) == pattern(57, 8 * SECTOR)
    assert fe.stats.mismatches == 0
    assert fe.stats.protocol_violations == 0, fe.stats.violations
    assert fe.stats.canary_violations == 0


T = TypeVar("T")

#: a hang guard for what the backend (or a helper process) must do, never a
#: performance bound
DEADLINE = 30.0


def eventually(fn: Callable[[], T], accept: Callable[[T], bool], what: str,
               timeout: float = DEADLINE, interval: float = 0.02) -> T:
    """Call ``fn`` until ``accept(result)``; the last result is in the failure.
    The integration tests' polling loop (``wait_until`` and
    ``PrometheusServer.eventually`` are built on it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if accept(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: still {value!r} after {timeout:g}s")
        gevent.sleep(interval)


def wait_until(fn: Callable[[], T], what: str, timeout: float = DEADLINE) -> T:
    """Poll ``fn`` until it returns something true, and return that; AssertionError
    naming ``what`` when the hang guard runs out."""
    return eventually(fn, bool, what, timeout, interval=0.05)
