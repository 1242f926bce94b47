"""Kill the daemon of a simulated host now and then and start it again, while guests
run IO: what ``gblk demo --kill-daemon-every`` and the restart tests do.

``Restarter`` SIGKILLs the host's daemon at a random moment of every interval of
``every`` seconds and starts it again at once with the same arguments, then measures
the pause a guest sees: from the kill to the first request served afterwards
(``pause``), and from the new process' start to that request (``startup``). Whether a
request was served is what ``served()`` says (a count that grows: a workload's
completed operations).
"""

from __future__ import annotations

import logging
import random
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import gevent

log = logging.getLogger("gblk.sim.harness.restarts")

#: how long a restarted daemon may take to serve again before it counts as failed
SERVE_TIMEOUT = 60.0
#: the test hook of gblk.engine.crashpoints: a daemon started with it kills itself
CRASH_ENV = "GBLK_TEST_CRASH"


class Restarter:
    def __init__(self, host: Any, extra_args: Sequence[str], every: float,
                 served: Callable[[], int], seed: Optional[int] = None,
                 env: Optional[Dict[str, str]] = None) -> None:
        if every <= 0:
            raise ValueError("the interval must be > 0")
        self.host = host
        self.extra_args = list(extra_args)
        self.env = env
        self.every = every
        self.served = served
        self.rnd = random.Random(seed)
        self.restarts = 0
        self.pauses: List[float] = []  #: kill -> first request served again (s)
        self.startups: List[float] = []  #: new process started -> served again (s)
        self.failure: Optional[str] = None
        self._greenlet: Optional[gevent.Greenlet] = None
        self._busy = False

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """No more kills; a restart under way is finished first, and a daemon runs
        after. One started with the crash-point hook (``GBLK_TEST_CRASH``) would still
        kill itself with nobody left to start it again, and the guests would wait
        forever: it is replaced by one without the hook (one more restart)."""
        g, self._greenlet = self._greenlet, None
        if g is None:
            return
        while self._busy and not g.dead:
            gevent.sleep(0.01)
        g.kill(block=True, timeout=5)
        if self.failure is None and self.env and CRASH_ENV in self.env:
            self.env = {k: v for k, v in self.env.items() if k != CRASH_ENV}
            self.restart_once()

    @property
    def running(self) -> bool:
        """Kills are still coming: started, not stopped, not failed."""
        g = self._greenlet
        return g is not None and not g.dead and self.failure is None

    def _run(self) -> None:
        try:
            while self.failure is None:
                at = self.rnd.uniform(0.0, self.every)
                self._sleep_unless_dead(at)
                self.restart_once()
                self._sleep_unless_dead(max(0.0, self.every - at))
        except gevent.GreenletExit:
            raise
        except Exception as e:  # noqa: BLE001 - a failure to report, never a silent stop
            log.exception("restarter failed")
            self.failure = f"restarting the daemon failed: {e!r}"

    def _sleep_unless_dead(self, seconds: float) -> None:
        """Sleep, but not past the daemon's death (one that killed itself: the test
        hook of gblk.engine.crashpoints), which is restarted at once."""
        end = time.monotonic() + seconds
        while True:
            backend = self.host.backend
            if backend is not None and not backend.alive():
                self.restart_once()
                continue
            left = end - time.monotonic()
            if left <= 0:
                return
            gevent.sleep(min(left, 0.005))

    def restart_once(self) -> None:
        """SIGKILL the daemon, start it again, wait until a request is served."""
        self._busy = True
        try:
            backend = self.host.backend
            t_kill = time.monotonic()
            if backend is not None:
                backend.kill()
                if backend.alive():  # SIGKILLed 10 s ago, twice: not a daemon to replace
                    self.failure = f"the daemon (pid {backend.proc.pid}) did not die of SIGKILL"
                    return
            gevent.sleep(0)  # responses the dead process published reach the frontends
            before = self.served()
            t_start = time.monotonic()
            new = self.host.start_backend(self.extra_args, env=self.env)
            self.restarts += 1
            deadline = t_start + SERVE_TIMEOUT
            while self.served() == before:
                if not new.alive():
                    if new.proc.returncode != -signal.SIGKILL:
                        self.failure = f"the restarted daemon exited with {new.proc.returncode}"
                        return
                    # killed again before serving (the test hook): once more, same pause
                    new = self.host.start_backend(self.extra_args, env=self.env)
                    self.restarts += 1
                if time.monotonic() > deadline:
                    self.failure = f"nothing served {SERVE_TIMEOUT:.0f}s after a restart"
                    return
                gevent.sleep(0.001)
            now = time.monotonic()
            self.pauses.append(now - t_kill)
            self.startups.append(now - t_start)
        finally:
            self._busy = False

    def summary(self) -> Dict[str, Any]:
        def ms(values: List[float], fn: Callable[[List[float]], float]) -> float:
            return round(1000 * fn(values), 1) if values else 0.0

        return {
            "restarts": self.restarts,
            "restart_pause_ms": {"avg": ms(self.pauses, lambda v: sum(v) / len(v)),
                                 "max": ms(self.pauses, max)},
            "restart_startup_ms": {"avg": ms(self.startups, lambda v: sum(v) / len(v)),
                                   "max": ms(self.startups, max)},
        }
