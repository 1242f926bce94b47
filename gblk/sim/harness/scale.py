"""Many disks on one daemon, on the simulated host: the scale scenario of issue 16.

``run_scale(disks)`` starts a simulated host and one ``gblk serve``, creates guests of
``per_guest`` disks each, connects every disk at once (timed), runs verified IO on a
sample while the others idle, measures the daemon while everything idles (file
descriptors, RSS, memory mappings, CPU), unplugs every disk as libxl does and
measures again. Used by ``gblk bench --disks N`` (prints the figures) and by the
scale test (asserts the resources came back). The daemon is measured from /proc, the
greenlets through its control socket (``status``).
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import gevent

from ..guest.frontend import Frontend, FrontendOptions
from .host import Guest, SimHost
from .ramdir import ram_dir

MiB = 1 << 20
SECTOR = 512
#: guest pages per disk (rings, indirect pages, data buffers)
DISK_PAGES = 512
DAEMON_TOML = ('[daemon]\nkinds = ["qdisk"]\nstop_timeout = 10\n'
               '[metrics]\nenabled = false\n')


@dataclass
class Sample:
    """The daemon's resources at one moment (from /proc, and its control socket)."""

    fds: int
    rss: int  #: bytes
    maps: int  #: mappings of the simulated host's files (guest pages, rings)
    cpu: float  #: utime + stime, seconds
    greenlets: Optional[int] = None


@dataclass
class ScaleResult:
    disks: int
    guests: int
    connect_s: float
    #: CPU seconds (utime + stime) spent while connecting: the daemon, the simulated
    #: xenstored (None: not a process of its own), this process (the guests' side)
    connect_cpu: Tuple[float, Optional[float], float]
    base: Sample
    idle: Sample
    after: Sample
    idle_cpu: float  #: fraction of one core while idle
    idle_s: float
    connected: int  #: disks whose backend reached Connected
    closed: int  #: disks whose backend reached Closed when unplugged
    io_checked: int
    mismatches: int

    def per_disk(self, what: str) -> float:
        return (getattr(self.idle, what) - getattr(self.base, what)) / max(self.disks, 1)


def sample(pid: int, greenlets: Optional[Callable[[], Optional[int]]] = None,
           under: str = "/") -> Sample:
    """``maps`` counts the mappings of files under ``under`` (the simulated host's
    directory: guests' pages the daemon has mapped)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / tick
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for line in f if f" {under}" in line)
    return Sample(len(os.listdir(f"/proc/{pid}/fd")), rss, maps, cpu,
                  greenlets() if greenlets is not None else None)


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        gevent.sleep(0.05)


def run_scale(disks: int, per_guest: int = 4, size: int = MiB, io_sample: int = 8,
              idle_seconds: float = 3.0, timeout: float = 120.0,
              say: Callable[[str], None] = lambda _m: None,
              extra_args: Tuple[str, ...] = (),
              greenlets_of: Optional[Callable[[str], Optional[int]]] = None) -> ScaleResult:
    """The whole scenario; raises if a disk fails to connect or a check fails.

    ``greenlets_of(control_socket)``: the daemon's live greenlets (the caller asks its
    control socket; None when it cannot tell)."""
    _raise_nofile(4 * disks + 256)  # this process holds the guests' side of every disk
    # the host's files (guest RAM, sockets, the daemon's ring journals) on tmpfs as on a
    # real host (gblk.sim.harness.ramdir); the images on a regular file system
    host_dir = ram_dir()
    image_dir = tempfile.mkdtemp(prefix="gblk-scale-") if host_dir else None
    try:
        return _run_scale(host_dir, image_dir, disks, per_guest, size, io_sample,
                          idle_seconds, timeout, say, extra_args, greenlets_of)
    finally:
        for d in (host_dir, image_dir):
            if d:
                shutil.rmtree(d, ignore_errors=True)


def _run_scale(host_dir: Optional[str], image_dir: Optional[str], disks: int, per_guest: int,
               size: int, io_sample: int, idle_seconds: float, timeout: float,
               say: Callable[[str], None], extra_args: Tuple[str, ...],
               greenlets_of: Optional[Callable[[str], Optional[int]]]) -> ScaleResult:
    guests_n = (disks + per_guest - 1) // per_guest
    with SimHost(dir=host_dir, image_dir=image_dir) as host:
        cfg = os.path.join(host.dir, "scale.toml")
        with open(cfg, "w") as f:
            f.write(DAEMON_TOML)
        daemon = host.start_backend(["--config", cfg, *extra_args])
        greenlets = None if greenlets_of is None else (lambda: greenlets_of(host.control_socket))
        _wait(lambda: os.path.exists(host.control_socket), 30, "the daemon's control socket")
        base = sample(daemon.pid, greenlets, host.dir)
        guests: List[Guest] = []
        fronts: List[Frontend] = []
        left = disks
        for _ in range(guests_n):
            n = min(per_guest, left)
            left -= n
            g = host.create_guest(size=size, connect=False, pages=DISK_PAGES * n,
                                  options=FrontendOptions(initial_zero=True, timeout=timeout))
            guests.append(g)
            fronts.append(g.frontend)
            for i in range(1, n):
                fronts.append(host.add_disk(g, g.disk.devid + 16 * i, size=size, connect=False,
                                            options=FrontendOptions(initial_zero=True,
                                                                    timeout=timeout)))
        say(f"{disks} disks on {len(guests)} guests attached; connecting all at once")
        xs_pid = host.xenstored.pid if host.xenstored is not None else None
        cpu0 = _cpus(daemon.pid, xs_pid)
        t0 = time.monotonic()
        jobs = [gevent.spawn(fe.connect) for fe in fronts]
        gevent.joinall(jobs, raise_error=True)
        connect_s = time.monotonic() - t0
        cpu1 = _cpus(daemon.pid, xs_pid)
        connect_cpu = (cpu1[0] - cpu0[0],
                       None if cpu1[1] is None or cpu0[1] is None else cpu1[1] - cpu0[1],
                       cpu1[2] - cpu0[2])
        say(f"  cpu while connecting: daemon {connect_cpu[0]:.2f} s, xenstored "
            f"{'-' if connect_cpu[1] is None else f'{connect_cpu[1]:.2f} s'}, "
            f"guests (this process) {connect_cpu[2]:.2f} s")
        connected = sum(1 for fe in fronts if fe.connected)
        say(f"connected {connected} disks in {connect_s:.2f} s")
        # verified IO on a sample while the rest idle
        step = max(1, len(fronts) // max(io_sample, 1))
        checked = fronts[::step][:io_sample]
        for k, fe in enumerate(checked):
            data = bytes([(k * 7 + j) & 0xFF for j in range(256)]) * (8 * SECTOR // 256)
            fe.write(16, data)
            if fe.read(16, 8) != data:
                raise AssertionError(f"d{fe.domid}/{fe.devid}: read back differs")
        for fe in checked:
            fe.wait_idle(timeout)
        gevent.sleep(0.5)  # let persistent-grant sweeps and watch events settle
        c0 = sample(daemon.pid, None, host.dir).cpu
        t1 = time.monotonic()
        gevent.sleep(idle_seconds)
        idle_s = time.monotonic() - t1
        idle = sample(daemon.pid, greenlets, host.dir)
        idle_cpu = (idle.cpu - c0) / idle_s
        say(f"idle: {idle.fds} fds, {idle.rss / MiB:.1f} MiB RSS, {idle_cpu * 100:.2f}% CPU")
        mismatches = sum(fe.stats.mismatches + fe.stats.protocol_violations for fe in fronts)
        # unplug everything as libxl does (frontends close when told to)
        ts = host.toolstack
        closed_flags = []
        for batch in range(0, len(fronts), 64):
            part = fronts[batch:batch + 64]
            unplug = [gevent.spawn(ts.detach_disk, fe.domid, fe.devid, timeout) for fe in part]
            gevent.joinall(unplug, raise_error=True)
            closed_flags += [bool(j.value) for j in unplug]
        for fe in fronts:
            fe.abandon()
        for g in list(guests):
            host.destroy_guest(g)
        try:
            _wait(lambda: _quiet(daemon.pid, base, host.dir), 30,
                  "the daemon to let go of every disk")
        except TimeoutError:
            pass  # the caller sees it in ``after``
        after = sample(daemon.pid, greenlets, host.dir)
        host.stop_backend()
        return ScaleResult(
            disks=disks, guests=len(guests), connect_s=connect_s, connect_cpu=connect_cpu,
            base=base, idle=idle,
            after=after, idle_cpu=idle_cpu, idle_s=idle_s, connected=connected,
            closed=sum(closed_flags), io_checked=len(checked), mismatches=mismatches)


def _cpus(daemon: int, xenstored: Optional[int]) -> Tuple[float, Optional[float], float]:
    """CPU seconds so far of the daemon, the simulated xenstored and this process."""
    return (sample(daemon).cpu, None if xenstored is None else sample(xenstored).cpu,
            sum(os.times()[:2]))


def _quiet(pid: int, base: Sample, under: str) -> bool:
    now = sample(pid, None, under)
    return now.fds <= base.fds and now.maps <= base.maps


def report(r: ScaleResult) -> str:
    """The bench's lines for one run."""
    g = ("-" if r.idle.greenlets is None or r.base.greenlets is None
         else f"{(r.idle.greenlets - r.base.greenlets) / max(r.disks, 1):.1f}")
    return (f"{r.disks:5d} disks {r.guests:4d} guests  connect {r.connect_s:6.2f} s "
            f"(daemon CPU {r.connect_cpu[0]:5.2f} s)  "
            f"per idle disk: {r.per_disk('rss') / MiB:5.2f} MiB RSS, "
            f"{r.per_disk('fds'):5.1f} fds, {r.per_disk('maps'):5.1f} maps, {g} greenlets  "
            f"idle CPU {r.idle_cpu * 100:5.2f}% of a core  "
            f"after unplug: fds {r.after.fds - r.base.fds:+d}, maps {r.after.maps - r.base.maps:+d}")
