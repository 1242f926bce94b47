"""Shared pieces of the hostile-guest suite (tests/integration/test_hostile_*.py).

A malicious guest must not be able to crash gblk, make it touch data outside a
request, answer a request twice or never, leak grant mappings, or grow its memory
without bound (docs/protocol.md §7). The suite drives the simulated guest's hostile hooks
(``gblk.sim.guest.frontend``: ``mutate=``, ``put_raw``, ``rewrite_slot``, ``revoke_grant``,
``set_req_prod``, ``notify(count=)``, ``set_state``...) against real ``gblk serve``
processes on a simulated host, and judges the daemon only from the outside: its
metrics endpoint, its log, ``/proc/<pid>``, the image files and the guest's own
view of its ring and grant table.

Here: a daemon handle with metrics/CPU/RSS probes (``Daemon``), a bystander guest
doing verified IO in the background (``Bystander``), grant accounting
(``grant_balance``, ``close_without_leaks``), bad grant refs of every kind
(``BadGrants``), a way to freeze an idle daemon (``frozen``) and the figures the
suite reports (``figure``). Builds on ``backend_support`` (which it must not change);
must not import gblk's engine, device, daemon or metrics layers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import gevent
import gevent.event
import pytest

from gblk.blkif.const import PAGE_SIZE, Status
from gblk.sim.guest.frontend import Frontend, FrontendOptions, IoResult
from gblk.sim.harness.host import BackendProcess, Guest, SimHost
from gblk.sim.hypervisor.memory import GTF_permit_access

from .backend_support import eventually, metric, metrics_url, pattern, scrape, start_daemon

#: bound on every wait for the daemon (a hang guard, never a performance bound)
WAIT = 30.0
MiB = 1 << 20
SECTOR = 512
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR

T = TypeVar("T")

#: log lines that mean gblk itself failed (not a guest-caused, contained error)
CRASH_MARKERS = ("Traceback", "ring greenlet failed", "job failed", "device failed")

#: figures reported by the suite (name -> text), printed as they are taken
FIGURES: Dict[str, str] = {}


def figure(name: str, text: str) -> None:
    """Record a measured figure; shown with ``pytest -s`` (no assertion on it)."""
    FIGURES[name] = text
    print(f"\nFIGURE {name}: {text}")


# ---------------------------------------------------------------------------------
# the daemon, seen from outside
@dataclass
class Daemon:
    """A running ``gblk serve`` with its metrics URL."""

    name: str
    proc: BackendProcess
    url: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def scrape(self) -> Dict[str, float]:
        return scrape(self.url)

    def log_text(self) -> str:
        return self.proc.log_text()

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        # fields after the comm: state is [0]; utime, stime are fields 14, 15 of stat
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/<pid>/status")

    def thread_states(self) -> List[str]:
        out = []
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                    out.append(f.read().rpartition(")")[2].split()[0])
            except OSError:
                pass
        return out

    def assert_sane(self, allow: Sequence[str] = ()) -> None:
        """Alive, and nothing in its log says gblk itself failed."""
        assert self.proc.alive(), f"{self.name} daemon died:\n{self.log_text()[-4000:]}"
        text = self.log_text()
        for marker in CRASH_MARKERS:
            if marker in allow:
                continue
            assert marker not in text, f"{self.name} daemon logged {marker!r}:\n{text[-6000:]}"

    def stop(self) -> None:
        self.proc.stop()


def launch(host: SimHost, name: str, toml: str, env: Optional[Dict[str, str]] = None) -> Daemon:
    """``gblk serve`` called ``name`` (``env``: extra variables for it), once it serves
    its metrics."""
    proc = start_daemon(host, name, toml, env=env)
    try:
        return Daemon(name, proc, metrics_url(proc))
    except BaseException:
        proc.stop()
        raise


@contextlib.contextmanager
def frozen(daemon: Daemon) -> Iterator[None]:
    """SIGSTOP the daemon for the body, SIGCONT after: what the guest does meanwhile
    is seen by gblk only as the current XenStore values when it wakes (the order of
    events is lost, as with coalesced watches). Only call while no IO is in flight:
    the daemon must not be frozen inside one of the simulator's flock sections, so
    wait until every thread of it sleeps."""
    deadline = time.monotonic() + WAIT
    calm = 0
    while calm < 3:
        if all(s == "S" for s in daemon.thread_states()):
            calm += 1
        else:
            calm = 0
        assert time.monotonic() < deadline, "daemon never went idle"
        gevent.sleep(0.01)
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


def dev_metric(samples: Dict[str, float], name: str, fe: Frontend, **labels: str) -> float:
    """Sum of ``name`` over the series of ``fe``'s device."""
    return metric(samples, name, domain=str(fe.domid), device=str(fe.devid), **labels)


def has_device(samples: Dict[str, float], fe: Frontend) -> bool:
    return any(f'domain="{fe.domid}"' in k and f'device="{fe.devid}"' in k for k in samples)


# ---------------------------------------------------------------------------------
# guests
def make_guest(host: SimHost, kind: str = "qdisk", size: int = 8 * MiB,
               **opts: object) -> Guest:
    """A connected guest on a fresh zeroed scratch disk; ``opts`` go to FrontendOptions."""
    options = FrontendOptions(initial_zero=True, timeout=WAIT, io_timeout=WAIT, **opts)  # type: ignore[arg-type]
    return host.create_guest(size=size, kind=kind, options=options)


def ring_pages(fe: Frontend) -> int:
    return len(fe.queues) * (1 << fe.ring_page_order)


def wait_all(results: Sequence[gevent.event.AsyncResult], timeout: float = WAIT) -> list:
    """Every result, each within the hang guard: a request never answered fails here."""
    out = []
    for r in results:
        value = r.get(timeout=timeout)
        out.append(value)
    return out


def check_clean(fe: Frontend) -> None:
    """The guest saw no protocol violation (each response once, right id and op,
    zero padding, known status), no wrong data, no write outside a read's sectors."""
    assert fe.stats.violations == {}, fe.stats.violations
    assert fe.stats.mismatches == 0
    assert fe.stats.canary_violations == 0
    assert fe.stats.grants_busy_after_response == 0


def grant_balance(daemon: Daemon, fe: Frontend) -> Tuple[float, float, float]:
    """(maps, unmaps, persistent grants) of ``fe``'s device, once every response is
    in: maps - unmaps must be exactly the ring pages plus the persistent grants
    cached (anything more is a leaked mapping)."""
    want = ring_pages(fe)

    def take() -> Tuple[float, float, float]:
        s = daemon.scrape()
        return (dev_metric(s, "gblk_grant_maps_total", fe),
                dev_metric(s, "gblk_grant_unmaps_total", fe),
                dev_metric(s, "gblk_persistent_grants", fe))

    return eventually(take, lambda v: v[0] - v[1] == want + v[2],
                      f"grant maps - unmaps == {want} ring pages + persistent grants")


def close_without_leaks(fe: Frontend, own_grants: int = 0) -> None:
    """Close the frontend (if connected); then every grant it ever made must end:
    the backend unmapped them all. ``own_grants``: refs the test itself granted
    and has not ended yet."""
    if fe.connected:
        fe.close()
    eventually(fe.retry_grants, lambda n: n == 0, "grants still mapped by the backend after close")
    assert fe.stats.grant_leaks == 0
    assert fe.grants_in_use() == own_grants


# ---------------------------------------------------------------------------------
# a bystander: another guest's disk on the same daemon
class Bystander:
    """Verified writes and reads in a loop on another guest's disk; counts completed
    operations so a test can tell whether it was served while something else ran."""

    def __init__(self, fe: Frontend, depth: int = 4, sectors: int = 16) -> None:
        self.fe = fe
        self.depth = depth
        self.sectors = sectors
        self.done = 0
        self.failures: List[str] = []
        self._stop = False
        self._greenlets: List[gevent.Greenlet] = []
        self.stamps: List[float] = []

    def start(self) -> "Bystander":
        self._stop = False
        self._greenlets = [gevent.spawn(self._loop, i) for i in range(self.depth)]
        return self

    def _loop(self, lane: int) -> None:
        n = 0
        base = lane * 256
        while not self._stop:
            sector = base + (n % 16) * self.sectors
            data = pattern(lane * 1000 + n, self.sectors * SECTOR)
            try:
                res: IoResult = self.fe.submit_write(sector, data).get(timeout=WAIT)
                if not res.ok:
                    self.failures.append(f"write {sector}: {res.status}")
                    return
                res = self.fe.submit_read(sector, self.sectors).get(timeout=WAIT)
                if not res.ok or res.data != data:
                    self.failures.append(f"read {sector}: {res.status}")
                    return
            except gevent.Timeout:
                self.failures.append(f"IO at sector {sector} not answered within {WAIT}s")
                return
            n += 1
            self.done += 1
            self.stamps.append(time.monotonic())

    def completed_between(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.stamps if t0 <= t <= t1)

    def stop(self) -> int:
        self._stop = True
        gevent.joinall(self._greenlets, timeout=WAIT * 2)
        assert all(g.dead for g in self._greenlets), "bystander IO hung"
        assert not self.failures, self.failures
        check_clean(self.fe)
        return self.done

    def check_once(self) -> None:
        """One verified round trip now."""
        data = pattern(4242, 8 * SECTOR)
        self.fe.write(4000, data)
        assert self.fe.read(4000, 8) == data


# ---------------------------------------------------------------------------------
# bad grant refs
@dataclass
class BadGrants:
    """Grant refs a backend must fail to use, each failing differently:
    ``unused`` never granted, ``past_end`` one past the grant table, ``huge``
    0xffffffff, ``reserved`` ref 0, ``foreign`` granted to another domain,
    ``bad_frame`` a grant of a frame beyond the guest's RAM, and ``readonly`` (only
    bad for a READ: the backend must write into it). ``ended()`` gives back the
    ones the test granted."""

    fe: Frontend
    refs: Dict[str, int] = field(default_factory=dict)
    _mine: List[Tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        mem = self.fe.memory
        unused = mem.grant_entries - 1
        assert mem.entry(unused).flags == 0, "the last grant ref is in use"
        self.refs = {"unused": unused, "past_end": mem.grant_entries, "huge": 0xFFFFFFFF,
                     "reserved": 0}
        frame = mem.alloc_page()
        self._frames = [frame]
        foreign = mem.grant(frame, 5)  # domain 5 is not the backend
        readonly = mem.grant(frame, self.fe.backend_id, readonly=True)
        bad_frame = mem.grant(frame, self.fe.backend_id)
        mem.write_entry(bad_frame, GTF_permit_access, self.fe.backend_id, mem.pages + 1000)
        self._mine = [(foreign, frame), (readonly, frame), (bad_frame, frame)]
        self.refs.update(foreign=foreign, readonly=readonly, bad_frame=bad_frame)
        mem.page(frame)[:] = bytes([0xEE]) * PAGE_SIZE

    @property
    def own(self) -> int:
        return len(self._mine)

    def for_read(self) -> Dict[str, int]:
        return dict(self.refs)

    def for_write(self) -> Dict[str, int]:
        return {k: v for k, v in self.refs.items() if k != "readonly"}

    def untouched(self) -> bool:
        """The page behind the test's own grants was never written by the backend."""
        return bytes(self.fe.memory.page(self._frames[0])) == bytes([0xEE]) * PAGE_SIZE

    def end(self) -> None:
        mem = self.fe.memory
        for gref, _frame in self._mine:
            assert mem.end_access(gref), f"grant {gref} is still mapped by the backend"
        self._mine = []
        for f in self._frames:
            mem.free_page(f)
        self._frames = []


def expect(result: gevent.event.AsyncResult, status: int, what: str) -> IoResult:
    res: IoResult = result.get(timeout=WAIT)
    assert res is not None and not res.lost, f"{what}: lost"
    assert res.status == status, f"{what}: status {res.status}, expected {status}"
    return res


OKAY = int(Status.OKAY)
ERROR = int(Status.ERROR)
EOPNOTSUPP = int(Status.EOPNOTSUPP)


# ---------------------------------------------------------------------------------
# the fixtures of the hostile suites (imported by each test module)
class Env:
    """One simulated host, one daemon, and a bystander guest whose disk must keep
    working whatever the hostile guest of a test does."""

    def __init__(self, host: SimHost, daemon: Daemon, bystander: "Bystander") -> None:
        self.host = host
        self.daemon = daemon
        self.bystander = bystander


def hostile_env(name: str, env: Optional[Dict[str, str]] = None) -> Iterator[Env]:
    """The body of a module's ``env`` fixture: a daemon called ``name`` serving qdisk
    (``env``: extra variables for it)."""
    with SimHost() as host:
        d = launch(host, name, '[daemon]\nkinds = ["qdisk"]\n', env)
        try:
            by = make_guest(host, max_ring_page_order=0, max_queues=1)
            yield Env(host, d, Bystander(by.frontend))
        finally:
            d.stop()


@pytest.fixture(autouse=True)
def after_each(env: Env) -> Iterator[None]:
    """After every test: the daemon is alive, logged no failure of its own, and the
    bystander's disk still works. Its log is printed when a test fails."""
    start = len(env.daemon.log_text())
    yield
    print(env.daemon.log_text()[start:][-8000:])
    env.daemon.assert_sane()
    env.bystander.check_once()
