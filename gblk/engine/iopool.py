"""Guests' IO in the threadpool, shared fairly: no device holds every IO thread, and
handing work to the pool never blocks a ring greenlet.

gevent's ``ThreadPool.spawn`` waits for a free thread when all are busy. A disk
whose storage stalls (a hung NFS server, a failing device retrying for minutes)
would then take every IO thread, one job after another, and every other ring
greenlet of the daemon would block in ``spawn``: all guests' IO stops because one
disk is slow. So each connected disk gets a ``DeviceIO`` that starts at most
``SHARE`` of the pool's threads at once and, when it may not start a job now
(its share is used, or the pool is full), queues it and returns at once; a small
dispatcher greenlet starts queued jobs, round-robin across disks, as threads come
free. The usual case (a free thread, the share not used) is a plain ``spawn``.

Runs on the hub. One ``IOPool`` per threadpool (``IOPool.of``), shared by every
dataplane of the daemon.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Deque, Dict, Optional, Tuple

import gevent
import gevent.event

#: the part of the IO threads one disk's jobs may hold at once (at least one thread)
SHARE = 0.5

#: id(threadpool) -> its IOPool (which holds the pool: the id is never reused)
_POOLS: Dict[int, "IOPool"] = {}

_Job = Tuple[Callable[..., Any], Tuple[Any, ...], gevent.event.AsyncResult]


class IOPool:
    """Accounting over one gevent threadpool: threads busy with guests' IO."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.busy = 0
        self._waiting: Deque["DeviceIO"] = collections.deque()
        self._dispatcher: Optional[gevent.Greenlet] = None

    @classmethod
    def of(cls, pool: Any) -> "IOPool":
        """The daemon-wide accounting of ``pool`` (made on first use)."""
        if isinstance(pool, IOPool):
            return pool
        got = _POOLS.get(id(pool))
        if got is None:
            got = _POOLS[id(pool)] = cls(pool)
        return got

    def device(self) -> "DeviceIO":
        return DeviceIO(self)

    def _can_start(self, dev: "DeviceIO") -> bool:
        return self.busy < self.pool.maxsize and dev.running < dev.limit

    def _start(self, dev: "DeviceIO", fn: Callable[..., Any], args: Tuple[Any, ...],
               into: Optional[gevent.event.AsyncResult] = None) -> Any:
        self.busy += 1
        dev.running += 1
        try:
            res = self.pool.spawn(fn, *args)
        except BaseException:
            self.busy -= 1
            dev.running -= 1
            raise
        res.rawlink(lambda r: self._ended(dev, r, into))
        return res

    def _ended(self, dev: "DeviceIO", res: Any, into: Optional[gevent.event.AsyncResult]) -> None:
        self.busy -= 1
        dev.running -= 1
        if into is not None:
            try:
                into.set(res.get(block=False))
            except BaseException as e:  # noqa: BLE001 - handed on to the waiter as it was
                into.set_exception(e)
        self._kick()

    def _kick(self) -> None:
        if self._waiting and (self._dispatcher is None or self._dispatcher.dead):
            self._dispatcher = gevent.spawn(self._dispatch)

    def _dispatch(self) -> None:
        """Start queued jobs, one disk after another, while threads and shares allow
        (``spawn`` may wait here, in this greenlet, never in a ring's)."""
        progress = True
        while self._waiting and progress:
            progress = False
            for _ in range(len(self._waiting)):
                dev = self._waiting.popleft()
                if dev.queue and self._can_start(dev):
                    fn, args, into = dev.queue.popleft()
                    self._start(dev, fn, args, into)
                    progress = True
                if dev.queue:
                    self._waiting.append(dev)
                else:
                    dev.listed = False


class DeviceIO:
    """One disk's way into the shared pool: ``spawn`` never blocks."""

    def __init__(self, shared: IOPool) -> None:
        self.shared = shared
        self.running = 0
        self.queue: Deque[_Job] = collections.deque()
        self.listed = False

    @property
    def limit(self) -> int:
        return max(1, int(self.shared.pool.maxsize * SHARE))

    @property
    def maxsize(self) -> int:
        return int(self.shared.pool.maxsize)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the pool; a result with ``rawlink`` and ``get``."""
        shared = self.shared
        if not self.queue and shared._can_start(self):
            return shared._start(self, fn, args)
        into = gevent.event.AsyncResult()
        self.queue.append((fn, args, into))
        if not self.listed:
            self.listed = True
            shared._waiting.append(self)
        shared._kick()
        return into
