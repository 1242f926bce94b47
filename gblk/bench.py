"""``gblk bench``: gblk on the simulated host against fio on the same file, in one run.

For every job (access pattern, block size, queue depth) and every page path
(``persistent``: persistent grants; ``map``: a grant map per request; ``copy``: grant
copy), a guest keeps the job's queue depth of IOs in flight through ``gblk serve``
(ring, event channel, grants, threadpool, file) for ``--seconds``; before that, fio
runs the same pattern on the same image file with the same block size, queue depth
and O_DIRECT setting (``psync`` at depth 1; ``io_uring`` with ``--iodepth`` above,
falling back to ``libaio``, then to ``psync`` with one thread per IO in flight). The
ratio is gblk's IOPS over fio's: absolute numbers depend on the machine, the ratio
is what gblk costs. Printed, never asserted.

The guest is ``gblk.sim.guest.bench_guest``: it negotiates through the simulated blkfront
and then drives one ring directly with a fixed pool of granted pages, so that it
costs a few microseconds per request instead of more than the daemon. Per row:
IOPS and MiB/s of both sides, the daemon's CPU per request (utime+stime of its
process over exactly the timed window, from /proc), the guest's own (this
process's, getrusage, over the same window; fio never runs then), the latency the
guest saw per IO (p50/p99, submit to response) and errors. After each timed window
the guest verifies for real (reads compared byte for byte with the image file,
writes of a distinct pattern per block found in the file). Exit 1 if any request
failed or any check did; 2 on a usage error.

``--format qcow2`` (or ``raw,qcow2``: both, one after the other) serves the disk as a
qcow2 image through the qemu-nbd gblk runs (``gblk.storage.qemunbd``): the same
random data in a qcow2 preallocated in one extent (``preallocation=metadata``), so the
guest still verifies against the file (past the metadata) and fio runs on the raw file
with the same data: the ratio of a qcow2 row is what qcow2 through NBD costs against
the raw file.

The image is written with random data (no holes) and kept resident (mlock of a
mapping of it) so that both sides measure the page cache, not the disk: this kind of
machine evicts page cache within seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .sim.harness.ramdir import fs_type, ram_dir

MiB = 1 << 20
#: the daemon's log tail shown when it fails
LOG_TAIL = 20


@dataclass(frozen=True)
class Job:
    name: str
    bs: int
    qd: int
    sequential: bool
    read_fraction: float  #: 1.0 reads only, 0.0 writes only

    @property
    def fio_rw(self) -> str:
        if 0.0 < self.read_fraction < 1.0:
            return "rw" if self.sequential else "randrw"
        op = "read" if self.read_fraction >= 1.0 else "write"
        return op if self.sequential else "rand" + op

    @property
    def reads(self) -> bool:
        return self.read_fraction > 0.0

    @property
    def writes(self) -> bool:
        return self.read_fraction < 1.0


JOBS = [
    Job("randread-4k-qd1", 4096, 1, False, 1.0),
    Job("randread-4k-qd32", 4096, 32, False, 1.0),
    Job("randwrite-4k-qd32", 4096, 32, False, 0.0),
    Job("seqread-1m", MiB, 4, True, 1.0),
    Job("seqwrite-1m", MiB, 4, True, 0.0),
    Job("mixed-64k-70r", 64 * 1024, 8, False, 0.7),
]
JOB_NAMES = [j.name for j in JOBS]

#: page path -> (the daemon's backend.grant_mode, the frontend offers feature-persistent)
GRANT_PATHS: Dict[str, Tuple[str, bool]] = {
    "persistent": ("persistent", True),
    "map": ("map", False),
    "copy": ("copy", False),
}
#: image formats the bench serves
FORMATS = ("raw", "qcow2")
#: keys every JSON row carries
ROW_KEYS = (
    "job", "grant_path", "format", "bs", "qd", "qd_effective", "iops", "mib_per_s", "raw_iops",
    "raw_mib_per_s", "ratio", "fio_engine", "raw_cpu_us_per_request", "raw_lat_p50_us",
    "raw_lat_p99_us", "backend_cpu_us_per_request", "frontend_cpu_us_per_request",
    "lat_p50_us", "lat_p99_us", "requests", "ring_requests_per_io", "seconds", "errors",
    "violations", "verified", "verify_failures", "guest_limited", "py_iops", "cbt",
    "export_cbw_mib",
)
#: a guest busier than this share of one CPU is counted as the limit
GUEST_LIMIT_CORE = 0.9


class Usage(Exception):
    """A usage error: one line, exit 2."""


class Failure(Exception):
    """The bench cannot run (fio missing, the daemon died): one line, exit 1."""


def _say(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# -- arguments ---------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gblk bench", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0,
                   help="timed window per job and side (default 5)")
    p.add_argument("--size", type=int, default=256, help="image size in MiB (default 256)")
    p.add_argument("--jobs", default=",".join(JOB_NAMES),
                   help="comma-separated subset of: " + ", ".join(JOB_NAMES))
    p.add_argument("--grant-mode", default=",".join(GRANT_PATHS),
                   help="page paths, comma-separated subset of: " + ", ".join(GRANT_PATHS)
                   + " (default all)")
    p.add_argument("--format", default="raw",
                   help="image formats, comma-separated subset of: " + ", ".join(FORMATS)
                   + " (default raw; qcow2 needs qemu-utils)")
    p.add_argument("--image-dir", default=None,
                   help="directory of the image (default: a new one under the temporary directory, TMPDIR or /tmp); "
                        "a regular file system: tmpfs refuses the daemon's RWF_NOWAIT reads")
    p.add_argument("--direct", action="store_true",
                   help="O_DIRECT on both sides (daemon direct_io=always, fio --direct=1); "
                        "then the disk is measured")
    p.add_argument("--no-fio", action="store_true",
                   help="no raw side: raw figures and the ratio are null")
    p.add_argument("--py-raw", action="store_true",
                   help="also the old Python threadpool loop on the file (py_iops column)")
    p.add_argument("--cbt", type=int, default=None, metavar="BYTES",
                   help="changed-block tracking on, at this granularity (e.g. 65536), its map "
                        "reset before each job: what tracking costs (cbt column)")
    p.add_argument("--export", action="store_true",
                   help="a live NBD export open on the disk during each job (a new one per "
                        "job: each block's first write copies it first): what copy-before-write "
                        "costs (export_cbw_mib column: MiB copied in the job)")
    p.add_argument("--json", action="store_true", help="last stdout line: the rows as JSON")
    p.add_argument("--disks", default=None, metavar="N[,N...]",
                   help="the scale mode instead of the IO jobs: N idle disks (guests of four) "
                        "connected at once to one daemon; prints the time to connect them all, "
                        "RSS, file descriptors and greenlets per idle disk, and idle CPU "
                        "(e.g. --disks 1,64,256)")
    return p


def _pick(text: str, known: Sequence[str], what: str) -> List[str]:
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    if not wanted:
        raise Usage(f"no {what} given (known: {', '.join(known)})")
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise Usage(f"unknown {what} {', '.join(repr(u) for u in unknown)} "
                    f"(known: {', '.join(known)})")
    return [k for k in known if k in wanted]  # canonical order, no duplicates


def parse_args(argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, List[Job], List[str]]:
    p = _parser()
    args = p.parse_args(argv)
    names = _pick(args.jobs, JOB_NAMES, "job")
    paths = _pick(args.grant_mode, list(GRANT_PATHS), "grant mode")
    args.formats = _pick(args.format, FORMATS, "format")
    if "qcow2" in args.formats and not (shutil.which("qemu-img") and shutil.which("qemu-nbd")):
        raise Usage("--format qcow2 needs qemu-img and qemu-nbd (apt-get install qemu-utils)")
    if not args.seconds > 0:
        raise Usage(f"--seconds must be positive, not {args.seconds:g}")
    if args.cbt is not None and (args.cbt < 4096 or args.cbt & (args.cbt - 1)):
        raise Usage(f"--cbt must be a power of two of at least 4096 (bytes), not {args.cbt}")
    if args.size < 16:
        raise Usage(f"--size must be at least 16 (MiB), not {args.size}")
    if args.image_dir is not None and not os.path.isdir(args.image_dir):
        raise Usage(f"--image-dir {args.image_dir}: not a directory")
    if args.disks is not None:
        try:
            args.disks = [int(n) for n in args.disks.split(",") if n.strip()]
        except ValueError:
            raise Usage(f"--disks {args.disks!r}: comma-separated numbers of disks") from None
        if not args.disks or min(args.disks) < 1 or max(args.disks) > 4096:
            raise Usage("--disks: numbers of disks from 1 to 4096")
    return args, [j for j in JOBS if j.name in names], paths


# -- the image ----------------------------------------------------------------------------
class ResidentImage:
    """The image file, written with random data, mapped and mlocked for the run."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self._addr: Optional[int] = None
        self.locked = False
        self.lock_error = ""
        chunk = 4 * MiB
        with open(path, "wb") as f:
            left = size
            while left > 0:
                n = min(chunk, left)
                f.write(os.urandom(n))  # distinct data everywhere: a misplaced read shows
                left -= n
            f.flush()
            os.fsync(f.fileno())
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._lock()

    def _lock(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        mmap_ = libc.mmap
        mmap_.restype = ctypes.c_void_p
        mmap_.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
        prot_read, map_shared = 1, 1
        addr = mmap_(None, self.size, prot_read, map_shared, self.fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            self.lock_error = os.strerror(ctypes.get_errno())
            return
        self._addr = addr
        self._libc = libc
        libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(self.size)) != 0:
            e = ctypes.get_errno()
            self.lock_error = f"{errno.errorcode.get(e, e)}: {os.strerror(e)}"
        else:
            self.locked = True

    def close(self) -> None:
        if self._addr is not None:
            self._libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            self._libc.munmap(ctypes.c_void_p(self._addr), ctypes.c_size_t(self.size))
            self._addr = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- the raw side: fio ----------------------------------------------------------------------
@dataclass
class Raw:
    iops: float
    mib_per_s: float
    engine: str
    cpu_us_per_request: Optional[float]
    lat_p50_us: Optional[float]
    lat_p99_us: Optional[float]


def _fio_once(fio: str, image: str, job: Job, engine: str, numjobs: int, seconds: float,
              warmup: float, direct: bool) -> Tuple[Optional[Raw], str]:
    depth = job.qd if engine != "psync" else 1
    cmd = [fio, f"--name={job.name}", f"--filename={image}", f"--rw={job.fio_rw}",
           f"--bs={job.bs}", f"--ioengine={engine}", f"--iodepth={depth}",
           f"--direct={1 if direct else 0}", "--time_based",
           f"--runtime={max(1, int(seconds * 1000))}ms",
           f"--ramp_time={int(warmup * 1000)}ms", "--norandommap", "--randrepeat=0",
           "--invalidate=0", "--unified_rw_reporting=mixed", "--output-format=json"]
    if 0.0 < job.read_fraction < 1.0:
        cmd.append(f"--rwmixread={int(round(job.read_fraction * 100))}")
    if numjobs > 1:
        cmd += [f"--numjobs={numjobs}", "--thread", "--group_reporting"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 120)
    except (OSError, subprocess.SubprocessError) as e:
        return None, str(e)
    why = " ".join(p.stderr.split())[:200]
    if p.returncode != 0:
        return None, why or f"exit {p.returncode}"
    try:
        out = p.stdout
        data = json.loads(out[out.index("{"):])
        j = data["jobs"][0]
        m = j["mixed"]
        if j.get("error") or not m.get("total_ios"):
            return None, why or f"job error {j.get('error')}"
        pct = m.get("clat_ns", {}).get("percentile", {})
        cpu = None
        if numjobs == 1 and j.get("job_runtime"):
            cpu = ((j["usr_cpu"] + j["sys_cpu"]) / 100.0 * j["job_runtime"] / 1000.0
                   / m["total_ios"] * 1e6)
        p50 = pct.get("50.000000")
        p99 = pct.get("99.000000")
        label = engine if numjobs == 1 else f"{engine}x{numjobs}"
        return Raw(float(m["iops"]), float(m["bw_bytes"]) / MiB, label, cpu,
                   None if p50 is None else p50 / 1000.0,
                   None if p99 is None else p99 / 1000.0), ""
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return None, f"unreadable fio output ({e})"


def run_fio(fio: str, image: str, job: Job, seconds: float, warmup: float, direct: bool) -> Raw:
    """fio at the job's depth: psync at 1, else io_uring, libaio, psync x depth."""
    if job.qd == 1:
        tries = [("psync", 1)]
    else:
        tries = [("io_uring", 1), ("libaio", 1), ("psync", job.qd)]
    whys = []
    for engine, numjobs in tries:
        raw, why = _fio_once(fio, image, job, engine, numjobs, seconds, warmup, direct)
        if raw is not None:
            return raw
        whys.append(f"{engine}: {why}")
    raise Failure(f"fio failed for {job.name}: " + "; ".join(whys))


def run_py_raw(path: str, job: Job, size: int, seconds: float) -> float:
    """The old raw figure: preadv/pwritev from gevent's threadpool at the job's depth
    (Python's cost, not the file's: shown only as ``py_iops``)."""
    import mmap

    import gevent
    from gevent.threadpool import ThreadPool

    pool = ThreadPool(job.qd)
    fd = os.open(path, os.O_RDWR)
    rnd = random.Random(1)
    blocks = size // job.bs
    bufs = [mmap.mmap(-1, job.bs) for _ in range(job.qd)]
    state = {"done": 0, "next": 0}
    end = time.monotonic() + seconds

    def worker(i: int) -> None:
        view = memoryview(bufs[i])
        while time.monotonic() < end:
            if job.sequential:
                b = state["next"]
                state["next"] = (b + 1) % blocks
            else:
                b = rnd.randrange(blocks)
            if rnd.random() < job.read_fraction:
                pool.apply(os.preadv, (fd, [view], b * job.bs))
            else:
                pool.apply(os.pwritev, (fd, [view], b * job.bs))
            state["done"] += 1
        view.release()

    t0 = time.monotonic()
    try:
        gevent.joinall([gevent.spawn(worker, i) for i in range(job.qd)])
        return state["done"] / (time.monotonic() - t0)
    finally:
        os.close(fd)
        pool.kill()
        for b in bufs:
            b.close()


# -- the gblk side ---------------------------------------------------------------------------
def _pct(sorted_values: Sequence[float], q: float) -> Optional[float]:
    """Nearest-rank percentile of sorted seconds, in microseconds."""
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[i] * 1e6


def _round(v: Optional[float], nd: int = 1) -> Optional[float]:
    return None if v is None else round(v, nd)


class Qcow2Image(ResidentImage):
    """A qcow2 image holding the raw image's data, preallocated in one extent (its data
    starts at ``data_offset`` of the file), mapped and mlocked like the raw one."""

    def __init__(self, raw: ResidentImage, path: str) -> None:
        self.path = path
        self.size = raw.size
        self._addr = None
        self.locked = False
        self.lock_error = ""
        run = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                              "preallocation=metadata", path, str(raw.size)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise Failure(f"qemu-img create: {run.stderr.strip()}")
        out = subprocess.run(["qemu-img", "map", "--output=json", path],
                             capture_output=True, text=True, check=True).stdout
        extents = json.loads(out)
        if len(extents) != 1 or "offset" not in extents[0]:
            raise Failure(f"{path}: qemu-img did not preallocate one extent: {out[:200]}")
        self.data_offset = int(extents[0]["offset"])
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        pos = 0
        while pos < raw.size:
            chunk = os.pread(raw.fd, 4 * MiB, pos)
            os.pwrite(self.fd, chunk, self.data_offset + pos)
            pos += len(chunk)
        os.fsync(self.fd)
        self.size = os.fstat(self.fd).st_size
        self._lock()


def _write_config(dir: str, path: str, direct: bool, cbt: Optional[int] = None,
                  cbt_dir: str = "", export: bool = False) -> str:
    mode, _ = GRANT_PATHS[path]
    cfg = os.path.join(dir, f"bench-{path}.toml")
    with open(cfg, "w") as f:
        f.write("[backend]\n"
                f'grant_mode = "{mode}"\n'
                f'direct_io = "{"always" if direct else "never"}"\n')
        if cbt or export:
            # beside the image, on its file system: a bitmap on tmpfs would sync for free,
            # an export's side file would be written to memory
            f.write(f'[cbt]\ndirectory = "{cbt_dir}"\nexport_directory = "{cbt_dir}-export"\n')
            if cbt:
                f.write(f"granularity = {cbt}\n")
    return cfg


def _cbt(host: Any, guest: Any, action: str) -> None:
    _ctl(host, guest, "cbt", action=action)


def _ctl(host: Any, guest: Any, command: str, **more: Any) -> Any:
    from .control.client import request

    return request(host.control_socket, {"command": command, **more,
                                         "disk": f"d{guest.domid}/{guest.disk.devid}"})


def _check_alive(host: Any) -> None:
    if host.backend is None or not host.backend.alive():
        tail = "\n".join(host.backend.log_text().splitlines()[-LOG_TAIL:]) if host.backend else ""
        if tail:
            _say(tail)
        raise Failure("the daemon died during the bench (its log is above)")


def run_path(host: Any, path: str, image: ResidentImage, jobs: Sequence[Job],
             args: argparse.Namespace, warmup: float, raws: Dict[str, Optional[Raw]],
             py: Dict[str, Optional[float]], notes: List[str], fmt: str = "raw"
             ) -> List[Dict[str, Any]]:
    """One daemon with this page path, one guest on ``image`` in format ``fmt``, every job."""
    import gevent

    from .blkif.const import SECTOR_SIZE
    from .sim.guest.bench_guest import (
        BenchGuest,
        op_mix,
        random_sectors,
        sequential_sectors,
    )
    from .sim.guest.frontend import FrontendOptions

    mode, persistent = GRANT_PATHS[path]
    cfg = _write_config(host.dir, path, args.direct, args.cbt,
                        os.path.join(os.path.dirname(image.path), f"cbt-{os.getpid()}"),
                        export=args.export)
    host.start_backend(["--config", cfg, "--no-metrics", "--log-level", "info"])
    rows: List[Dict[str, Any]] = []
    guest = None
    bg = None
    try:
        # one queue: a one-vCPU guest's blkfront (the bench guest drives queue 0)
        guest = host.create_guest(image=image.path, format=fmt, options=FrontendOptions(
            persistent=persistent, max_queues=1, initial_zero=False))
        fe = guest.frontend
        if fe.persistent != persistent:
            raise Failure(f"{path}: persistent grants {'not ' if persistent else ''}negotiated "
                          f"(backend offered feature-persistent={int(fe.disk.persistent)})")
        connected = [ln for ln in host.backend.log_text().splitlines() if "connected:" in ln]
        if connected and f"{mode} grants" not in connected[-1]:
            notes.append(f"{path}: the daemon did not log '{mode} grants' at connect: "
                         f"{connected[-1].strip()}")
        disk_sectors = fe.disk.sectors
        bg = BenchGuest(fe, [(j.bs, j.qd) for j in jobs])
        bg.data_offset = getattr(image, "data_offset", 0)
        if args.cbt:
            _cbt(host, guest, "enable")
        pid = host.backend.pid
        for job in jobs:
            _check_alive(host)
            seed = sum(map(ord, job.name))
            if job.sequential:
                sectors = sequential_sectors(job.bs, disk_sectors)
            else:
                sectors = random_sectors(65536, job.bs, disk_sectors, seed)
            ops = op_mix(len(sectors), job.read_fraction, seed)
            if args.cbt:  # each job starts with a clean map: every first write sets a bit
                _cbt(host, guest, "reset")
            if args.export:  # a new point in time: every block's first write copies
                _ctl(host, guest, "export",
                     socket=os.path.join(host.dir, f"bench-export-{os.getpid()}.sock"))
            gevent.sleep(0)  # let the hub run what is due before the clock starts
            w = bg.run(job.bs, job.qd, ops, sectors, warmup=warmup, seconds=args.seconds,
                       backend_pid=pid)
            cbw_mib = (_ctl(host, guest, "unexport")["cbw_bytes"] / MiB) if args.export else None
            qd_eff = bg.effective_qd(job.bs, job.qd)
            # verification, untimed
            nsec = job.bs // SECTOR_SIZE
            blocks = disk_sectors // nsec
            n = min(blocks, max(8, qd_eff))
            rnd = random.Random(seed + 1)
            checked = failures = 0
            if job.writes:
                picks = [b * nsec for b in rnd.sample(range(blocks), n)]
                c, f = bg.verify_writes(image.fd, job.bs, job.qd, picks)
                checked, failures = checked + c, failures + f
                os.fsync(image.fd)  # write-back now, not in the next job's window
            if job.reads:
                picks = [b * nsec for b in rnd.sample(range(blocks), n)]
                c, f = bg.verify_reads(image.fd, job.bs, job.qd, picks)
                checked, failures = checked + c, failures + f
            _check_alive(host)
            lat = sorted(w.latencies)
            iops = w.ios / w.seconds
            be = w.backend_cpu / w.ios * 1e6 if w.ios and w.backend_cpu >= 0 else None
            fe_us = w.guest_cpu / w.ios * 1e6 if w.ios else None
            limited = bool(fe_us is not None and (
                fe_us * iops / 1e6 >= GUEST_LIMIT_CORE or (be is not None and fe_us > be)))
            raw = raws.get(job.name)
            row: Dict[str, Any] = {
                "job": job.name, "grant_path": path, "format": fmt, "bs": job.bs, "qd": job.qd,
                "qd_effective": qd_eff,
                "iops": round(iops, 1), "mib_per_s": round(iops * job.bs / MiB, 2),
                "raw_iops": None if raw is None else round(raw.iops, 1),
                "raw_mib_per_s": None if raw is None else round(raw.mib_per_s, 2),
                "ratio": None if raw is None or not raw.iops else round(iops / raw.iops, 4),
                "fio_engine": None if raw is None else raw.engine,
                "raw_cpu_us_per_request": None if raw is None else _round(raw.cpu_us_per_request, 2),
                "raw_lat_p50_us": None if raw is None else _round(raw.lat_p50_us),
                "raw_lat_p99_us": None if raw is None else _round(raw.lat_p99_us),
                "backend_cpu_us_per_request": _round(be),
                "frontend_cpu_us_per_request": _round(fe_us),
                "lat_p50_us": _round(_pct(lat, 0.50)),
                "lat_p99_us": _round(_pct(lat, 0.99)),
                "requests": w.ios,
                "ring_requests_per_io": bg.parts(job.bs),
                # whole run (warm-up and drain included): the guest's event-channel traffic
                "guest_wakeups_per_io": round(w.wakeups * bg.parts(job.bs) / max(1, w.ring_requests), 3),
                "guest_notifies_per_io": round(w.notifies * bg.parts(job.bs) / max(1, w.ring_requests), 3),
                "seconds": round(w.seconds, 3),
                "errors": w.errors + w.violations,
                "violations": w.violations,
                "verified": checked,
                "verify_failures": failures,
                "guest_limited": limited,
                "py_iops": _round(py.get(job.name)),
                "cbt": args.cbt,
                "export_cbw_mib": None if cbw_mib is None else round(cbw_mib, 1),
            }
            rows.append(row)
            _say(f"  {_label(path, fmt):<16} {job.name:<18} {iops:9.0f} IOPS  daemon {_fmt(be, 7)} us/req  "
                 f"guest {_fmt(fe_us, 7)} us/req  errors {row['errors']}  "
                 f"verified {checked - failures}/{checked}"
                 + (f"  copied before write {cbw_mib:.1f} MiB" if cbw_mib is not None else ""))
    finally:
        if guest is not None:
            try:
                guest.frontend.close(timeout=30)
            except Exception as e:  # noqa: BLE001 - teardown goes on
                notes.append(f"{path}: closing the guest: {e}")
            if bg is not None:
                busy = bg.release()
                if busy:
                    notes.append(f"{path}: {busy} grants still mapped by the daemon after the "
                                 "guest closed")
                    if rows:
                        rows[-1]["verify_failures"] += busy
            try:
                host.destroy_guest(guest)
            except Exception as e:  # noqa: BLE001
                notes.append(f"{path}: destroying the guest: {e}")
        code = host.stop_backend()
        if code not in (0, None):
            notes.append(f"{path}: the daemon exited with {code}")
            if rows:
                rows[-1]["errors"] += 1
    return rows


# -- output ------------------------------------------------------------------------------------
def _label(path: str, fmt: str) -> str:
    return path if fmt == "raw" else f"{path}/{fmt}"


def _fmt(v: Optional[float], width: int, nd: int = 1) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}.{nd}f}"


def table(rows: Sequence[Dict[str, Any]]) -> str:
    head = (f"{'job':<18} {'path':<16} {'IOPS':>9} {'MiB/s':>8} {'fio IOPS':>9} {'MiB/s':>8} "
            f"{'ratio':>6} {'daemon':>7} {'guest':>7} {'p50':>8} {'p99':>8} {'err':>4} "
            f"{'fio engine':<11}")
    unit = (f"{'':<18} {'':<16} {'':>9} {'':>8} {'':>9} {'':>8} {'':>6} {'us/req':>7} "
            f"{'us/req':>7} {'us':>8} {'us':>8}")
    py = any(r.get("py_iops") is not None for r in rows)
    if py:
        head += f" {'py IOPS':>9}"
    lines = [head, unit.rstrip(), "-" * len(head)]
    for r in rows:
        err = r["errors"] + r["verify_failures"]
        lines.append(
            f"{r['job']:<18} {_label(r['grant_path'], r.get('format', 'raw')):<16} {r['iops']:9.0f} {r['mib_per_s']:8.1f} "
            f"{_fmt(r['raw_iops'], 9, 0)} {_fmt(r['raw_mib_per_s'], 8)} {_fmt(r['ratio'], 6, 3)} "
            f"{_fmt(r['backend_cpu_us_per_request'], 7)} "
            f"{_fmt(r['frontend_cpu_us_per_request'], 7)} {_fmt(r['lat_p50_us'], 8)} "
            f"{_fmt(r['lat_p99_us'], 8)} {err:4d} {r['fio_engine'] or '-':<11}"
            + (f" {_fmt(r['py_iops'], 9, 0)}" if py else "")
            + (" guest-limited" if r["guest_limited"] else ""))
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    try:
        args, jobs, paths = parse_args(argv)
    except Usage as e:
        _say(f"gblk bench: {e}")
        return 2
    try:
        if args.disks:
            return _run_scale(args.disks, args.seconds, args.json)
        return _run(args, jobs, paths)
    except Failure as e:
        _say(f"gblk bench: {e}")
        return 1


def _run_scale(counts: Sequence[int], seconds: float, as_json: bool) -> int:
    """``--disks``: the scale scenario of ``gblk.sim.harness.scale`` once per count."""
    from .control.client import daemon_greenlets
    from .sim.harness.scale import MiB as _MiB
    from .sim.harness.scale import report, run_scale

    rows: List[Dict[str, Any]] = []
    for n in counts:
        _say(f"-- {n} disk(s)")
        try:
            r = run_scale(n, idle_seconds=seconds, say=_say, greenlets_of=daemon_greenlets)
        except Exception as e:  # noqa: BLE001 - one line, exit 1
            raise Failure(f"{n} disks: {e}") from e
        print(report(r), flush=True)
        rows.append({
            "disks": n, "guests": r.guests, "connect_s": round(r.connect_s, 2),
            "connect_cpu_s": {"daemon": round(r.connect_cpu[0], 2),
                              "xenstored": (None if r.connect_cpu[1] is None
                                            else round(r.connect_cpu[1], 2)),
                              "guests": round(r.connect_cpu[2], 2)},
            "rss_mib_per_disk": round(r.per_disk("rss") / _MiB, 3),
            "fds_per_disk": round(r.per_disk("fds"), 2),
            "greenlets_per_disk": (None if r.idle.greenlets is None or r.base.greenlets is None
                                   else round(r.per_disk("greenlets"), 2)),
            "idle_cpu_pct": round(r.idle_cpu * 100, 3),
            "connected": r.connected, "closed": r.closed, "mismatches": r.mismatches,
            "fds_left": r.after.fds - r.base.fds, "maps_left": r.after.maps - r.base.maps,
        })
        if r.connected != n or r.mismatches or r.after.fds != r.base.fds:
            raise Failure(f"{n} disks: {r.connected} connected, {r.mismatches} mismatches, "
                          f"{r.after.fds - r.base.fds} fds not given back")
    if as_json:
        print(json.dumps(rows))
    return 0


def _run_on(host: Any, image_dir: str, args: argparse.Namespace, jobs: List[Job],
            paths: List[str], fio: Optional[str], warmup: float, size: int,
            notes: List[str]) -> List[Dict[str, Any]]:
    from .errors import GblkError

    rows: List[Dict[str, Any]] = []
    kind = fs_type(image_dir)
    if kind == "tmpfs":
        notes.append(f"the image is on tmpfs ({image_dir}): the daemon's RWF_NOWAIT reads "
                     "fail there (EOPNOTSUPP); a regular file system is the honest case")
    if fs_type(host.dir) != "tmpfs":
        notes.append(f"the simulated guest's RAM is on {fs_type(host.dir) or '?'} "
                     f"({host.dir}), not tmpfs: page-cache work on it counts as the daemon's")
    image_path = os.path.join(image_dir, f"gblk-bench-{os.getpid()}.img")
    _say(f"gblk bench: writing a {args.size} MiB image in {image_dir} ({kind or '?'})")
    image = ResidentImage(image_path, size)
    qcow: Optional[Qcow2Image] = None
    try:
        if not image.locked:
            _say(f"gblk bench: warning: could not mlock the image ({image.lock_error}): "
                 "the page cache may be evicted and figures may measure the disk")
            notes.append(f"image not mlocked ({image.lock_error}): figures may measure the disk")
        cpus = sorted(os.sched_getaffinity(0))
        print(f"gblk bench: {args.size} MiB image on {kind or '?'}"
              f"{', mlocked' if image.locked else ', NOT mlocked'}, "
              f"{'O_DIRECT' if args.direct else 'buffered'}, {args.seconds:g} s per job and "
              f"side (+{warmup:g} s warm-up), CPUs {','.join(map(str, cpus))}", flush=True)
        raws: Dict[str, Optional[Raw]] = {}
        py: Dict[str, Optional[float]] = {}
        for job in jobs:
            if fio is not None:
                raws[job.name] = r = run_fio(fio, image.path, job, args.seconds, warmup,
                                             args.direct)
                _say(f"  fio        {job.name:<18} {r.iops:9.0f} IOPS  ({r.engine})")
            else:
                raws[job.name] = None
            if args.py_raw:
                py[job.name] = run_py_raw(image.path, job, size, args.seconds)
        if fio is not None and any(j.writes for j in jobs):
            os.fsync(image.fd)
        for fmt in args.formats:
            served: ResidentImage = image
            if fmt == "qcow2":
                _say("gblk bench: copying the data into a qcow2 image")
                qcow = Qcow2Image(image, image_path + ".qcow2")
                served = qcow
            for path in paths:
                try:
                    rows += run_path(host, path, served, jobs, args, warmup, raws, py, notes, fmt)
                except GblkError as e:
                    raise Failure(f"{path}: {e}") from None
    finally:
        if qcow is not None:
            qcow.close()
            os.unlink(qcow.path)
        image.close()
        if args.image_dir:
            try:
                os.unlink(image_path)
            except OSError:
                pass
    return rows


def _run(args: argparse.Namespace, jobs: List[Job], paths: List[str]) -> int:
    fio = None
    if not args.no_fio:
        fio = shutil.which("fio")
        if fio is None:
            raise Failure("fio not found: the raw side is fio on the same file "
                          "(apt-get install fio), or pass --no-fio to go without ratios")
    from .sim.harness.host import SimHost

    warmup = min(0.5, max(0.1, args.seconds * 0.2))
    size = args.size * MiB
    notes: List[str] = []
    rows: List[Dict[str, Any]] = []
    # The simulated guest's RAM is a file in the host's directory: on tmpfs it is RAM,
    # as a real guest's is; on a disk file system every page the daemon writes into
    # would be a dirty file page (page_mkwrite, writeback) and the bench would charge
    # that to the daemon. The image stays on a regular file system (RWF_NOWAIT).
    host_dir = ram_dir()
    scratch = None
    try:
        with SimHost(dir=host_dir) as host:
            if args.image_dir:
                image_dir = args.image_dir
            else:
                image_dir = scratch = tempfile.mkdtemp(prefix="gblk-bench-")
            rows += _run_on(host, image_dir, args, jobs, paths, fio, warmup, size, notes)
    finally:
        for d in (scratch, host_dir):
            if d:
                shutil.rmtree(d, ignore_errors=True)
    print(table(rows))
    print("ratio = gblk IOPS / fio IOPS, same file, same pattern, block size, depth and "
          "O_DIRECT setting, same run; daemon/guest = CPU us per request in the timed window")
    print("the bench guest drives ring 0 only (one queue negotiated, as a one-vCPU guest)")
    if not fio:
        print("note: --no-fio: no raw side, ratio is null")
    if any(r["format"] != "raw" for r in rows):
        print("note: qcow2 rows: 'daemon' is gblk's CPU only; qemu-nbd's own CPU per request "
              "comes on top (the ratio is the whole cost)")
    limited = [f"{r['grant_path']}/{r['job']}" for r in rows if r["guest_limited"]]
    if limited:
        print("note: guest-limited (the guest used >= 90% of a CPU or more CPU per request "
              "than the daemon; gblk may be faster than shown): " + ", ".join(limited))
    for n in notes:
        print(f"note: {n}")
    bad = [r for r in rows if r["errors"] or r["verify_failures"]]
    if bad:
        print("FAILED: " + ", ".join(f"{r['grant_path']}/{r['job']} (errors {r['errors']}, "
                                     f"verification failures {r['verify_failures']})" for r in bad))
    if args.json:
        print(json.dumps(rows))
    return 1 if bad else 0


if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all(queue=False)
    sys.exit(main())
