"""Control-plane calls: in a small threadpool of their own, each with a deadline.

A device connecting or going away makes blocking calls that can hang for good: opening
its store (a FIFO opened for reading waits for a writer; a hung NFS server waits for
ever), the store's size, mapping a ring, unmapping on teardown, closing the store.
Each runs here, in a pool separate from the one that runs guests' IO, so a stuck call
holds a control thread and never an IO thread; and the caller waits at most
``timeout`` seconds (``backend.control_timeout``), then gets :class:`ControlTimeout`
and fails that device. Whatever such an abandoned call returns late is undone by the
caller's ``undo`` (close the store it opened, unmap the ring it mapped), run in this
pool too. Its exceptions are dropped: nobody is waiting for them any more.

A thread cannot be killed: an abandoned call keeps its thread until it returns. The
pool grows by one thread per abandoned call still running (at most ``MAX_STUCK``
more), so the other devices keep the ``size`` threads they were promised, and shrinks
again as those calls return.

Runs on the hub. The calls themselves are plain blocking functions (threadpool rule:
syscalls only, no gevent, no logging).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import gevent
from gevent.threadpool import ThreadPool

from ..errors import ControlTimeout
from . import jobs

#: most extra threads the pool grows by for abandoned calls still running
MAX_STUCK = 64


class ControlPool:
    """``call(what, fn, *args)``: ``fn(*args)`` in the control threadpool, its result
    or its GblkError/OSError here, or ControlTimeout after ``timeout`` seconds."""

    def __init__(self, size: int, timeout: float, pool: Any = None) -> None:
        self.size = size
        self.timeout = timeout
        self.pool: Any = pool if pool is not None else ThreadPool(size)
        #: calls abandoned at their deadline and still running (each holds a thread)
        self.stuck = 0
        #: calls abandoned so far (a counter: a stuck call that returns stays counted)
        self.abandoned = 0

    def call(self, what: str, fn: Callable[..., Any], *args: Any,
             undo: Optional[Callable[[Any], Any]] = None) -> Any:
        """``what`` says what the call does, for the error ("opening /srv/a.img");
        ``undo(result)`` releases what a call that returns after its deadline (or
        after its caller was killed) made."""
        expired = ControlTimeout(
            f"{what}: no answer after {self.timeout:g}s (backend.control_timeout); "
            "the call is abandoned")
        res: Any = None
        timer = gevent.Timeout(self.timeout, expired)
        timer.start()
        try:
            # spawn itself waits while every control thread is busy: inside the deadline
            res = self.pool.spawn(jobs.catching, fn, args)
            got = res.get()
        except BaseException:
            # the deadline, or the caller killed (a device stopped mid-connect): the
            # call runs on, and whatever it makes must not leak
            if res is not None:
                self._abandon(res, undo)
            raise
        finally:
            timer.close()
        return jobs.raised_or(got)

    def _abandon(self, res: Any, undo: Optional[Callable[[Any], Any]]) -> None:
        if res.ready():
            if res.successful() and undo is not None:
                self._undo_later(undo, res.value)
            return
        self.abandoned += 1
        self.stuck += 1
        self._resize()

        def done(r: Any) -> None:  # on the hub, when the abandoned call returns
            self.stuck -= 1
            self._resize()
            if r.successful() and undo is not None:
                self._undo_later(undo, r.value)

        res.rawlink(done)

    def _undo_later(self, undo: Callable[[Any], Any], value: Any) -> None:
        if jobs.is_raised(value):
            return  # the call failed: it made nothing
        gevent.spawn(self._undo, undo, value)

    def _undo(self, undo: Callable[[Any], Any], value: Any) -> None:
        try:
            self.call("releasing what an abandoned call made", undo, value)
        except Exception:  # noqa: BLE001 - nobody waits for it: a leak at worst
            pass

    def _resize(self) -> None:
        self.pool.maxsize = self.size + min(self.stuck, MAX_STUCK)

    def close(self) -> int:
        """Stop the idle threads; return how many abandoned calls still run. With one
        still running, nothing is stopped: the threadpool's kill would wait for it, and
        a daemon stopping must not (the daemon then exits without finalizing, see
        ``gblk.daemon.serve``)."""
        if self.stuck == 0:
            self.pool.kill()
        return self.stuck
