"""A mixed, verified disk workload for simulated guests (``gblk demo``, benchmarks).

Drives one or more connected ``gblk.sim.guest.frontend.Frontend`` objects with reads,
writes, flushes (with and without data), barriers, discards (and secure discards)
and large requests that go out as INDIRECT when the backend offers it; random and
sequential; bounded by time or by a number of operations. Each frontend verifies
every byte it reads against what it wrote; the workload only keeps requests that are
in flight at the same time from overlapping (so that every read is checkable) and
rereads recently written ranges (so that verification also works on an image whose
initial content is unknown). Only operations the backend advertises are issued, as
a well-behaved guest would.

Counts requests, bytes, errors (any status but OKAY, lost or timed-out requests),
mismatches and protocol violations. Runs on the gevent hub: ``depth`` greenlets per
frontend. Must not import the engine, device, daemon or cli layers.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import gevent
import gevent.event
import gevent.pool

from ...blkif.const import SECTOR_SIZE, Status
from ...errors import GblkError
from .frontend import Frontend, IoResult

log = logging.getLogger(__name__)

#: default weights of each operation kind
DEFAULT_MIX: Dict[str, float] = {
    "read": 40.0,
    "write": 32.0,
    "large_read": 6.0,
    "large_write": 6.0,
    "flush": 4.0,
    "flush_data": 3.0,
    "barrier": 2.0,
    "discard": 5.0,
    "secure_discard": 2.0,
}
#: bytes of random data writes are cut from
DATA_POOL = 8 << 20


@dataclass
class WorkloadConfig:
    seconds: Optional[float] = 10.0  #: stop after this long (None: only ``count``)
    count: Optional[int] = None  #: stop after this many operations in total
    depth: int = 16  #: operations in flight per frontend
    seed: Optional[int] = None
    #: sector range [start, end) each frontend works in, one per frontend (default:
    #: the whole disk)
    regions: Optional[Sequence[Tuple[int, int]]] = None
    mix: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    max_sectors: int = 64  #: small requests: up to 32 KiB
    large_sectors: int = 2048  #: large requests: up to 1 MiB (INDIRECT when offered)
    sequential: float = 0.3  #: share of IO continuing a sequential stream
    reread: float = 0.5  #: share of reads aimed at recently written ranges
    op_timeout: float = 60.0  #: an operation not answered by then counts as an error


@dataclass
class WorkloadStats:
    requests: int = 0  #: operations completed
    ring_requests: int = 0  #: ring requests they took
    bytes: int = 0  #: data bytes read and written
    read_bytes: int = 0
    write_bytes: int = 0
    errors: int = 0
    mismatches: int = 0
    violations: int = 0  #: protocol violations the frontends saw
    by_op: Dict[str, int] = field(default_factory=dict)
    errors_by_op: Dict[str, int] = field(default_factory=dict)
    latency_sum: float = 0.0
    latency_max: float = 0.0
    started: float = 0.0
    elapsed: float = 0.0

    @property
    def iops(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.elapsed / (1 << 20) if self.elapsed > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.mismatches == 0 and self.violations == 0

    def as_dict(self) -> Dict[str, Any]:
        return {
            "requests": self.requests,
            "ring_requests": self.ring_requests,
            "bytes": self.bytes,
            "read_bytes": self.read_bytes,
            "write_bytes": self.write_bytes,
            "errors": self.errors,
            "mismatches": self.mismatches,
            "violations": self.violations,
            "iops": round(self.iops, 1),
            "mib_per_s": round(self.mib_per_s, 2),
            "seconds": round(self.elapsed, 3),
            "latency_avg_ms": round(1000 * self.latency_sum / self.requests, 3)
            if self.requests else 0.0,
            "latency_max_ms": round(1000 * self.latency_max, 3),
            "by_op": dict(sorted(self.by_op.items())),
            "errors_by_op": dict(sorted(self.errors_by_op.items())),
        }


class _Target:
    """One frontend and what is in flight on it."""

    def __init__(self, fe: Frontend, region: Tuple[int, int], rnd: random.Random) -> None:
        self.fe = fe
        self.start, self.end = region
        self.rnd = rnd
        self.inflight: List[Tuple[int, int]] = []
        self.recent: Deque[Tuple[int, int]] = deque(maxlen=256)
        self.requests = 0  # operations completed on this frontend
        self.bytes = 0
        self.align = max(1, fe.disk.sector_size // SECTOR_SIZE)

    def overlaps(self, a: int, b: int) -> bool:
        return any(x < b and a < y for x, y in self.inflight)


class Workload:
    """Run ``config`` against ``frontends`` (each connected)."""

    def __init__(self, frontends: Sequence[Frontend], config: Optional[WorkloadConfig] = None) -> None:
        self.config = config or WorkloadConfig()
        seed = self.config.seed if self.config.seed is not None else random.randrange(1 << 30)
        self.seed = seed
        self.rnd = random.Random(seed)
        self.stats = WorkloadStats()
        self._pool = os.urandom(DATA_POOL)
        self._targets: List[_Target] = []
        regions = self.config.regions
        for i, fe in enumerate(frontends):
            region = regions[i] if regions is not None else (0, fe.disk.sectors)
            region = (max(0, region[0]), min(region[1], fe.disk.sectors))
            if region[1] - region[0] < 8:
                raise ValueError(f"{fe!r}: region {region} too small")
            self._targets.append(_Target(fe, region, random.Random(self.rnd.random())))
        self._group = gevent.pool.Group()
        self._stop = gevent.event.Event()
        self._started_ops = 0
        self._deadline: Optional[float] = None

    # -- control ------------------------------------------------------------------
    def start(self) -> None:
        self.stats.started = time.monotonic()
        if self.config.seconds is not None:
            self._deadline = self.stats.started + self.config.seconds
        for t in self._targets:
            for w in range(max(1, self.config.depth)):
                self._group.spawn(self._worker, t, w)

    def stop(self, timeout: float = 30.0) -> None:
        """Issue nothing more; wait (up to ``timeout``) for operations in flight."""
        self._stop.set()
        self._group.join(timeout)
        self._group.kill(block=True, timeout=5)
        self._finish()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the end (deadline or count). True when it ended."""
        done = self._group.join(timeout)
        if done:
            self._finish()
        return bool(done)

    def run(self) -> WorkloadStats:
        self.start()
        self.wait()
        return self.stats

    @property
    def running(self) -> bool:
        return len(self._group) > 0

    def elapsed(self) -> float:
        return time.monotonic() - self.stats.started if self.stats.started else 0.0

    def per_frontend(self) -> List[Dict[str, float]]:
        """Each frontend's IOPS and MiB/s over the run, in the order given."""
        secs = self.stats.elapsed or self.elapsed() or 1e-9
        return [{"requests": t.requests, "bytes": t.bytes,
                 "iops": round(t.requests / secs, 1),
                 "mib_per_s": round(t.bytes / secs / (1 << 20), 2)} for t in self._targets]

    def _finish(self) -> None:
        if self.stats.started and not self.stats.elapsed:
            self.stats.elapsed = max(1e-9, self.elapsed())
        self.stats.violations = sum(x.fe.stats.protocol_violations for x in self._targets)

    def _more(self) -> bool:
        if self._stop.is_set():
            return False
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return False
        if self.config.count is not None and self._started_ops >= self.config.count:
            return False
        return True

    # -- operations ------------------------------------------------------------------
    def _kinds(self, t: _Target) -> Tuple[List[str], List[float]]:
        d = t.fe.disk
        allowed = {"read", "large_read"}
        if not d.readonly:
            allowed |= {"write", "large_write"}
            if d.flush:
                allowed |= {"flush", "flush_data"}
            if d.barrier:
                allowed.add("barrier")
            if d.discard:
                allowed.add("discard")
                if d.discard_secure:
                    allowed.add("secure_discard")
        kinds = [k for k in self.config.mix if k in allowed and self.config.mix[k] > 0]
        return kinds, [self.config.mix[k] for k in kinds]

    def _range(self, t: _Target, n: int, sequential: Optional[List[int]], align: int) -> Tuple[int, int]:
        rnd = t.rnd
        span = t.end - t.start
        n = max(align, min(n, span) // align * align)
        if sequential is not None:
            a = sequential[0]
            if a + n > t.end:
                a = t.start
        else:
            a = t.start + rnd.randrange(max(1, span - n + 1))
        a = t.start + (a - t.start) // align * align
        if a + n > t.end:
            a = max(t.start, t.end - n) // align * align
        return a, n

    def _worker(self, t: _Target, index: int) -> None:
        kinds, weights = self._kinds(t)
        rnd = t.rnd
        seq = [t.start + (t.end - t.start) * index // max(1, self.config.depth)]
        cfg = self.config
        while self._more():
            kind = rnd.choices(kinds, weights)[0]
            use_seq = seq if rnd.random() < cfg.sequential else None
            align = t.align
            if kind in ("discard", "secure_discard"):
                gran = max(t.fe.disk.discard_granularity // SECTOR_SIZE, 1)
                align = max(align, gran)
            if kind.startswith("large"):
                n = rnd.randint(cfg.max_sectors + 1, max(cfg.large_sectors, cfg.max_sectors + 1))
            elif kind == "flush":
                n = 0
            elif kind in ("discard", "secure_discard"):
                n = rnd.randint(1, 8) * max(align, 8)
            else:
                n = rnd.randint(1, cfg.max_sectors)
            if kind == "read" and t.recent and rnd.random() < cfg.reread:
                a, n = rnd.choice(t.recent)
                if t.overlaps(a, a + n):
                    gevent.sleep(0)
                    continue
            elif n:
                for _ in range(8):
                    a, n = self._range(t, n, use_seq, align)
                    if not t.overlaps(a, a + n):
                        break
                    use_seq = None
                else:
                    gevent.sleep(0)
                    continue
            else:
                a = 0
            if use_seq is not None and n:
                seq[0] = a + n
            self._started_ops += 1
            self._one(t, kind, a, n)

    def _data(self, rnd: random.Random, nbytes: int) -> memoryview:
        off = rnd.randrange(0, len(self._pool) - nbytes + 1)
        return memoryview(self._pool)[off:off + nbytes]

    def _one(self, t: _Target, kind: str, a: int, n: int) -> None:
        fe = t.fe
        rnd = t.rnd
        entry = (a, a + n)
        if n:
            t.inflight.append(entry)
        t0 = time.monotonic()
        res: Optional[IoResult] = None
        try:
            if kind in ("read", "large_read"):
                ar = fe.submit_read(a, n)
            elif kind in ("write", "large_write"):
                ar = fe.submit_write(a, self._data(rnd, n * SECTOR_SIZE))
            elif kind == "flush":
                ar = fe.submit_flush()
            elif kind == "flush_data":
                ar = fe.submit_flush(a, self._data(rnd, n * SECTOR_SIZE))
            elif kind == "barrier":
                ar = fe.submit_barrier(a, self._data(rnd, n * SECTOR_SIZE))
            else:
                ar = fe.submit_discard(a, n, secure=kind == "secure_discard")
            res = ar.get(timeout=self.config.op_timeout)
        except gevent.Timeout:
            log.error("%r: %s of sector %d+%d not answered in %gs", fe, kind, a, n,
                      self.config.op_timeout)
        except GblkError as e:
            if not self._stop.is_set():
                log.error("%r: %s of sector %d+%d failed: %s", fe, kind, a, n, e)
        finally:
            if n:
                t.inflight.remove(entry)
        self._account(t, kind, a, n, res, time.monotonic() - t0)

    def _account(self, t: _Target, kind: str, a: int, n: int, res: Optional[IoResult],
                 latency: float) -> None:
        s = self.stats
        s.requests += 1
        s.by_op[kind] = s.by_op.get(kind, 0) + 1
        s.latency_sum += latency
        s.latency_max = max(s.latency_max, latency)
        if res is None or res.status != Status.OKAY or res.lost:
            s.errors += 1
            s.errors_by_op[kind] = s.errors_by_op.get(kind, 0) + 1
            if res is not None and s.errors_by_op[kind] <= 3:
                log.error("%r: %s of sector %d+%d: status %d%s", t.fe, kind, a, n, res.status,
                          " (lost)" if res.lost else "")
            return
        s.ring_requests += res.requests
        t.requests += 1
        if kind not in ("discard", "secure_discard"):
            t.bytes += n * SECTOR_SIZE
        if res.mismatch is not None:
            s.mismatches += 1
        nbytes = n * SECTOR_SIZE
        if kind in ("read", "large_read"):
            s.read_bytes += nbytes
            s.bytes += nbytes
        elif kind in ("write", "large_write", "flush_data", "barrier"):
            s.write_bytes += nbytes
            s.bytes += nbytes
            t.recent.append((a, n))
        elif kind in ("discard", "secure_discard"):
            t.recent.append((a, n))
        s.violations = sum(x.fe.stats.protocol_violations for x in self._targets)
