"""IO limits: QEMU's leaky buckets, one budget per disk or per group of disks.

The semantics are those of QEMU's util/throttle.c (the facts, not its code): each
bucket (see ``gblk.qos.BUCKETS``) has a level that a request raises by its cost (1
for an IOPS bucket, its bytes for a bps bucket) and that leaks at the average rate.
A request may go while every bucket it counts against is at or below its size:
``avg / 10`` without a burst (short bursts stay cheap), ``max * length`` with one;
a burst bucket leaking at ``max`` then keeps the burst itself at ``max`` per
second when ``length`` > 1. Otherwise it waits until the fullest bucket has leaked
down: ``excess / rate`` seconds. Reads count against the ``*_total`` and ``*_read``
buckets, writes (and discards, one operation of no bytes: a discard moves no data)
against ``*_total`` and ``*_write``; data-less flushes and barriers count nothing
(they wait in ring order behind a throttled request all the same).

The ring (``gblk.engine.ring``) asks :meth:`Limiter.admit` before it serves a
request; a request that must wait stays in the ring's queue, in ring order, and a
timer on the hub wakes that ring when it may go: nothing blocks, other rings and
disks run on. A group's disks share one Limiter: one budget for all of them.

:class:`Throttles` is the daemon's registry: which limits each disk has (the first
matching ``[[limit]]`` rule, or what ``gblk ctl limit`` set), re-applied on SIGHUP.
Runs on the hub; no IO, no logging.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

from ..blkif import ops
from ..blkif.abi import Abi
from ..blkif.const import BLKIF_MAX_SEGMENTS_PER_REQUEST, SECTOR_SHIFT, Op
from ..qos import UNLIMITED, Bucket, DiskIdentity, Limits, Rules
from .stats import DeviceStats

_READ = int(Op.READ)
_WRITE = int(Op.WRITE)
_PAGE = 4096


class _State:
    """One bucket's setting and levels."""

    __slots__ = ("avg", "max", "length", "size", "burst_size", "level", "burst_level",
                 "iops", "reads", "writes")

    def __init__(self, name: str, b: Bucket) -> None:
        self.avg = float(b.avg)
        self.max = float(b.max)
        self.length = b.length
        if b.max:
            self.size = self.max * b.length
            self.burst_size = self.max / 10
        else:
            self.size = self.avg / 10
            self.burst_size = 0.0
        self.level = 0.0
        self.burst_level = 0.0
        self.iops = name.startswith("iops")
        self.reads = not name.endswith("_write")
        self.writes = not name.endswith("_read")

    def leak(self, dt: float) -> None:
        self.level = max(0.0, self.level - self.avg * dt)
        if self.length > 1:
            self.burst_level = max(0.0, self.burst_level - self.max * dt)

    def wait(self) -> float:
        extra = self.level - self.size
        if extra > 0:
            return extra / self.avg
        if self.length > 1:
            extra = self.burst_level - self.burst_size
            if extra > 0:
                return extra / self.max
        return 0.0


class Limiter:
    """One budget (a disk's, or a group's)."""

    def __init__(self, limits: Limits, now: float = 0.0) -> None:
        self.limits = UNLIMITED
        self._buckets: List[_State] = []
        self._then = now
        #: rings waiting for this budget: woken when the limits change
        self.waiters: Set[Callable[[], None]] = set()
        self.configure(limits)

    def configure(self, limits: Limits) -> None:
        """New limits, effective at once; buckets start empty (as QEMU's do when
        block_set_io_throttle changes them); every waiting ring looks again."""
        self.limits = limits
        self._buckets = [_State(name, b) for name, b in limits.buckets]
        self.wake_all()

    def wake_all(self) -> None:
        waiters, self.waiters = self.waiters, set()
        for wake in waiters:
            wake()

    def admit(self, write: bool, nbytes: int, now: float) -> float:
        """0.0: the request goes now and is counted; else the seconds to wait before
        asking again (nothing counted)."""
        dt = now - self._then
        self._then = now
        wait = 0.0
        for b in self._buckets:
            if dt > 0:
                b.leak(dt)
            if (b.writes if write else b.reads):
                w = b.wait()
                if w > wait:
                    wait = w
        if wait > 0:
            return wait
        for b in self._buckets:
            if b.writes if write else b.reads:
                units = 1.0 if b.iops else float(nbytes)
                b.level += units
                if b.length > 1:
                    b.burst_level += units
        return 0.0


def request_cost(abi: Abi, block: bytes, off: int) -> Optional[Tuple[bool, int]]:
    """(is a write, bytes) of the request at ``block[off:]``, or None when the limiter
    does not count it (a data-less flush or barrier; a malformed request, which is
    answered at once). INDIRECT requests count their segments as whole pages: their
    descriptors are read later, off the hub."""
    op = block[off]
    if op == _READ or op == _WRITE:
        f = abi.rw.unpack_from(block, off)
        n = f[1]
        if not 1 <= n <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            return None
        sectors = sum(max(0, f[7 + 3 * i] - f[6 + 3 * i] + 1) for i in range(n))
        return op == _WRITE, sectors << SECTOR_SHIFT
    spec = ops.BY_CODE.get(op)
    if spec is None:
        return None
    if spec.layout is ops.Layout.DISCARD:
        return spec.writes, 0
    req = abi.parse_request(bytes(block[off:off + abi.req_size]))
    if spec.layout is ops.Layout.INDIRECT:
        inner = ops.BY_CODE.get(req.indirect_op)
        if inner is None or not inner.indirect_payload:
            return None
        return inner.writes, req.nr_segments * _PAGE
    segs = req.segments  # a flush or barrier: counted when it carries data
    if not segs:
        return None
    return spec.writes, sum(max(0, s.last_sect - s.first_sect + 1) for s in segs) << SECTOR_SHIFT


class DiskThrottle:
    """What the rings of one disk consult: its Limiter, or None (no limits)."""

    def __init__(self, identity: DiskIdentity, stats: DeviceStats) -> None:
        self.identity = identity
        self.stats = stats
        self.limiter: Optional[Limiter] = None
        #: "" (its own budget) or the group it shares
        self.group = ""
        #: "config" (a rule) or "control" (gblk ctl limit, until the next SIGHUP)
        self.source = "config"

    def describe(self) -> Dict[str, object]:
        lim = self.limiter.limits if self.limiter is not None else UNLIMITED
        return {"limits": lim.as_dict(), "group": self.group, "source": self.source}


class Throttles:
    """Every disk's limits: from the rules, or set at runtime."""

    def __init__(self, rules: Rules, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.rules = rules
        self.groups: Dict[str, Limiter] = {}
        self.disks: Dict[object, DiskThrottle] = {}
        self._sync_groups()

    def _sync_groups(self) -> None:
        want = self.rules.group_limits()
        for name in list(self.groups):
            if name not in want:
                del self.groups[name]
        for name, limits in want.items():
            g = self.groups.get(name)
            if g is None:
                self.groups[name] = Limiter(limits, self._clock())
            elif g.limits != limits:
                g.configure(limits)

    def attach(self, key: object, identity: DiskIdentity, stats: DeviceStats) -> DiskThrottle:
        """A disk appears (or its identity is known again): its limits from the rules."""
        t = self.disks.get(key)
        if t is None:
            t = self.disks[key] = DiskThrottle(identity, stats)
        t.identity = identity
        t.stats = stats
        self._from_rules(t)
        return t

    def detach(self, key: object) -> None:
        self.disks.pop(key, None)

    def _from_rules(self, t: DiskThrottle) -> None:
        group, limits = self.rules.find(t.identity)
        t.source = "config"
        if group:
            t.group = group
            self._set(t, self.groups[group])
        else:
            t.group = ""
            self._own(t, limits)

    def _own(self, t: DiskThrottle, limits: Limits) -> None:
        if limits.unlimited:
            self._set(t, None)
        elif t.limiter is not None and not t.group and t.limiter not in self.groups.values():
            if t.limiter.limits != limits:
                t.limiter.configure(limits)
        else:
            self._set(t, Limiter(limits, self._clock()))

    def _set(self, t: DiskThrottle, limiter: Optional[Limiter]) -> None:
        old, t.limiter = t.limiter, limiter
        if old is not None and old is not limiter:
            old.wake_all()  # its waiting rings look at the new budget
        t.stats.io_limits = dict((limiter.limits if limiter else UNLIMITED).as_dict())

    def set_disk(self, key: object, limits: Limits) -> DiskThrottle:
        """``gblk ctl limit``: the disk's own budget from now on (out of its group)."""
        t = self.disks[key]
        if t.group:
            t.group = ""
            t.limiter = None
        self._own(t, limits)
        t.source = "control"
        return t

    def reload(self, rules: Rules) -> None:
        """SIGHUP: the new rules apply to every disk (runtime changes end here)."""
        self.rules = rules
        self._sync_groups()
        for t in self.disks.values():
            self._from_rules(t)
