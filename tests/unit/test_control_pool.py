"""The control plane's threadpool (gblk.engine.control, issue 10): every blocking
control call has a deadline, a stuck call holds a control thread and never an IO
thread, and what an abandoned call makes after its deadline is undone."""

from __future__ import annotations

import time
from typing import Iterator, List

import gevent
import pytest
from gevent.monkey import get_original
from gevent.threadpool import ThreadPool

from gblk.engine.control import ControlPool
from gblk.errors import ControlTimeout, StorageError


#: a native Event (the test session may be monkey-patched): it blocks a pool thread
NativeEvent = get_original("threading", "Event")


@pytest.fixture
def gate() -> Iterator[object]:
    """What a stuck call waits on; set at the end so no thread outlives the test."""
    ev = NativeEvent()
    yield ev
    ev.set()


@pytest.fixture
def control() -> Iterator[ControlPool]:
    c = ControlPool(2, 0.3)
    yield c
    c.close()


def _wait_for(cond, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        gevent.sleep(0.01)


def test_results_and_errors_come_back(control: ControlPool) -> None:
    """A call's value is returned; its OSError or GblkError is raised on the hub."""
    assert control.call("adding", lambda a, b: a + b, 2, 3) == 5

    def bad() -> None:
        raise StorageError("cannot open /x: No such file or directory")

    with pytest.raises(StorageError, match="cannot open /x"):
        control.call("opening /x", bad)
    with pytest.raises(FileNotFoundError):
        control.call("opening /y", open, "/nonexistent/y")


def test_a_stuck_call_times_out_and_its_late_result_is_undone(
        control: ControlPool, gate: NativeEvent) -> None:
    """A call that does not return within the deadline raises ControlTimeout saying
    what it was and which key sets the deadline; the pool grows by the stuck thread
    and shrinks again when it returns, and ``undo`` gets what it returned late."""
    undone: List[str] = []

    def stuck() -> str:
        gate.wait()
        return "store"

    t0 = time.monotonic()
    with pytest.raises(ControlTimeout) as info:
        control.call("opening /srv/a.img", stuck, undo=undone.append)
    assert 0.25 < time.monotonic() - t0 < 2.0
    assert str(info.value).startswith("opening /srv/a.img: no answer after 0.3s "
                                      "(backend.control_timeout)")
    assert control.stuck == 1 and control.pool.maxsize == 3 and control.abandoned == 1
    # the two promised threads are still there for everyone else
    assert control.call("size", lambda: 42) == 42
    gate.set()
    _wait_for(lambda: undone == ["store"], "the late store was undone")
    assert control.stuck == 0 and control.pool.maxsize == 2


def test_a_late_failure_is_not_undone(control: ControlPool, gate: NativeEvent) -> None:
    """A call that fails after its deadline made nothing: undo is not called."""
    undone: List[object] = []

    def stuck_then_fail() -> None:
        gate.wait()
        raise OSError(5, "Input/output error")

    with pytest.raises(ControlTimeout):
        control.call("mapping the ring", stuck_then_fail, undo=undone.append)
    gate.set()
    _wait_for(lambda: control.stuck == 0, "the call returned")
    gevent.sleep(0.1)
    assert undone == []


def test_a_killed_caller_still_gets_its_result_undone(
        control: ControlPool, gate: NativeEvent) -> None:
    """A device stopped while it waits (its greenlet killed): the call runs on, and
    what it returns is undone, not leaked."""
    undone: List[str] = []

    def slowish() -> str:
        gate.wait()
        return "mapping"

    control.timeout = 30.0
    g = gevent.spawn(control.call, "mapping the ring", slowish, undo=undone.append)
    gevent.sleep(0.1)
    g.kill()
    gate.set()
    _wait_for(lambda: undone == ["mapping"], "the mapping was undone")


def test_a_full_control_pool_never_touches_the_io_pool(gate: NativeEvent) -> None:
    """More stuck calls than control threads: each times out (also those still waiting
    for a thread), while a separate IO pool of one thread keeps running jobs."""
    control = ControlPool(1, 0.3)
    io = ThreadPool(1)
    try:
        callers = [gevent.spawn(control.call, f"opening /srv/{i}.img", gate.wait)
                   for i in range(3)]
        served = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.5:
            assert io.apply(lambda: 7) == 7
            served += 1
        gevent.joinall(callers, timeout=5)
        for g in callers:
            assert isinstance(g.exception, ControlTimeout), g.exception
        assert served > 10
        assert control.stuck >= 1
    finally:
        gate.set()
        control.close()
        io.kill()
