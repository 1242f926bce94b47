"""``gblk bench``: the benchmark suite on the simulated host.

Each job runs twice in the same run on the same image file: once as a guest's IO
through ``gblk serve`` (ring, grants, threadpool, the file), once as the raw speed
of the file (the same access pattern, ``preadv``/``pwritev`` from a thread pool at
the same queue depth; and fio's, when fio is installed). Every figure is printed
beside its raw counterpart and as a ratio: absolute numbers depend on the machine,
the ratio is what gblk costs. Printed, never asserted.

The simulated guest is Python too and shares the CPUs with the daemon, and it
verifies every byte it reads: the ratio is a lower bound of what gblk achieves with
a real guest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import gevent
from gevent.threadpool import ThreadPool

MiB = 1 << 20


@dataclass
class Job:
    name: str
    rw: str  # read | write
    bs: int
    qd: int
    sequential: bool = False


JOBS = [
    Job("randread-4k-qd1", "read", 4096, 1),
    Job("randread-4k-qd32", "read", 4096, 32),
    Job("randwrite-4k-qd32", "write", 4096, 32),
    Job("seqread-1m-qd4", "read", MiB, 4, sequential=True),
    Job("seqwrite-1m-qd4", "write", MiB, 4, sequential=True),
]


@dataclass
class Result:
    job: str
    gblk_iops: float = 0.0
    gblk_mib_s: float = 0.0
    raw_iops: float = 0.0
    raw_mib_s: float = 0.0
    fio_iops: Optional[float] = None
    errors: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.gblk_iops / self.raw_iops if self.raw_iops else 0.0


class _Offsets:
    def __init__(self, job: Job, size: int, seed: int) -> None:
        self.job = job
        self.blocks = size // job.bs
        self.rnd = random.Random(seed)
        self.next = 0

    def __call__(self) -> int:
        if self.job.sequential:
            b = self.next
            self.next = (self.next + 1) % self.blocks
        else:
            b = self.rnd.randrange(self.blocks)
        return b * self.job.bs


def run_guest(fe: Any, job: Job, size: int, seconds: float) -> Result:
    """Keep ``qd`` requests in flight through the simulated guest for ``seconds``."""
    off = _Offsets(job, size, 1)
    data = os.urandom(job.bs)
    nsec = job.bs // 512
    errors = 0
    done = 0

    def submit() -> Any:
        o = off() // 512
        if job.rw == "read":
            return fe.submit_read(o, nsec)
        return fe.submit_write(o, data)

    inflight = [submit() for _ in range(job.qd)]
    t0 = time.monotonic()
    end = t0 + seconds
    while inflight:
        res = inflight.pop(0).get()
        done += 1
        if not res.ok:
            errors += 1
        if time.monotonic() < end:
            inflight.append(submit())
    dt = time.monotonic() - t0
    return Result(job.name, done / dt, done * job.bs / dt / MiB, errors=errors)


def run_raw(path: str, job: Job, size: int, seconds: float) -> Result:
    """The same pattern straight on the file, from a thread pool at the same depth."""
    import mmap

    pool = ThreadPool(job.qd)
    fd = os.open(path, os.O_RDWR)
    off = _Offsets(job, size, 1)
    bufs = [mmap.mmap(-1, job.bs) for _ in range(job.qd)]
    done = [0]
    end = time.monotonic() + seconds

    def worker(i: int) -> None:
        view = memoryview(bufs[i])
        while time.monotonic() < end:
            o = off()
            if job.rw == "read":
                pool.apply(os.preadv, (fd, [view], o))
            else:
                pool.apply(os.pwritev, (fd, [view], o))
            done[0] += 1
        view.release()

    t0 = time.monotonic()
    gevent.joinall([gevent.spawn(worker, i) for i in range(job.qd)])
    dt = time.monotonic() - t0
    os.close(fd)
    pool.kill()
    for b in bufs:
        b.close()
    return Result(job.name, raw_iops=done[0] / dt, raw_mib_s=done[0] * job.bs / dt / MiB)


def run_fio(path: str, job: Job, seconds: float) -> Optional[float]:
    fio = shutil.which("fio")
    if fio is None:
        return None
    rw = ("" if job.sequential else "rand") + job.rw
    cmd = [fio, "--name=raw", f"--filename={path}", f"--rw={rw}", f"--bs={job.bs}",
           "--ioengine=psync", f"--numjobs={job.qd}", "--group_reporting", "--thread",
           f"--runtime={seconds}", "--time_based", "--output-format=json"]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=seconds + 60, check=True).stdout
        data = json.loads(out)
        j = data["jobs"][0]
        return float(j[job.rw]["iops"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


def table(results: Sequence[Result]) -> str:
    head = f"{'job':<20} {'gblk IOPS':>10} {'MiB/s':>8} {'raw IOPS':>10} {'MiB/s':>8} {'gblk/raw':>9} {'fio IOPS':>10}"
    lines = [head, "-" * len(head)]
    for r in results:
        fio = f"{r.fio_iops:10.0f}" if r.fio_iops is not None else f"{'-':>10}"
        lines.append(f"{r.job:<20} {r.gblk_iops:10.0f} {r.gblk_mib_s:8.1f} {r.raw_iops:10.0f} "
                     f"{r.raw_mib_s:8.1f} {r.ratio:9.3f} {fio}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="gblk bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="per job and side (default 5)")
    p.add_argument("--size", type=int, default=256, help="image size in MiB (default 256)")
    p.add_argument("--jobs", default=",".join(j.name for j in JOBS),
                   help="comma-separated subset of: " + ", ".join(j.name for j in JOBS))
    p.add_argument("--grant-mode", default="auto", choices=["auto", "map", "copy"],
                   help="the daemon's backend.grant_mode (default auto: persistent grants)")
    p.add_argument("--json", action="store_true", help="last stdout line: the results as JSON")
    p.add_argument("--no-fio", action="store_true", help="skip fio's raw figures")
    args = p.parse_args(argv)
    wanted = [j.strip() for j in args.jobs.split(",") if j.strip()]
    jobs = [j for j in JOBS if j.name in wanted]
    unknown = set(wanted) - {j.name for j in JOBS}
    if unknown or not jobs:
        p.error(f"unknown job(s): {', '.join(sorted(unknown)) or '(none given)'}")
    from .sim.frontend import FrontendOptions
    from .sim.host import SimHost

    size = args.size * MiB
    results: List[Result] = []
    with SimHost() as host:
        cfg = os.path.join(host.dir, "bench.toml")
        with open(cfg, "w") as f:
            f.write(f'[backend]\ngrant_mode = "{args.grant_mode}"\n')
        host.start_backend(["--config", cfg, "--no-metrics", "--log-level", "warning"])
        image = host.make_image("bench.img", size)
        with open(image, "r+b") as f:  # a written image: no holes, reads hit real data
            chunk = os.urandom(MiB)
            for _ in range(args.size):
                f.write(chunk)
        print(f"gblk bench: {args.size} MiB image, {args.seconds:g} s per job and side, "
              f"grant mode {args.grant_mode}", flush=True)
        # the raw side first: its writes change the image, and the guest, which checks
        # every byte it reads against what it knows, must see the image only after them
        raws = {}
        for job in jobs:
            raw = run_raw(image, job, size, args.seconds)
            if not args.no_fio:
                raw.fio_iops = run_fio(image, job, args.seconds)
            raws[job.name] = raw
            print(f"  raw  {job.name}: {raw.raw_iops:.0f} IOPS", flush=True)
        g = host.create_guest(image=image, options=FrontendOptions(persistent=args.grant_mode == "auto"))
        fe = g.frontend
        for job in jobs:
            r = run_guest(fe, job, size, args.seconds)
            raw = raws[job.name]
            r.raw_iops, r.raw_mib_s, r.fio_iops = raw.raw_iops, raw.raw_mib_s, raw.fio_iops
            r.errors += fe.stats.mismatches
            results.append(r)
            print(f"  gblk {job.name}: {r.gblk_iops:.0f} IOPS, ratio {r.ratio:.3f}", flush=True)
        fe.close()
    print(table(results))
    errors = sum(r.errors for r in results)
    if args.json:
        print(json.dumps([dict(asdict(r), ratio=r.ratio) for r in results]))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
