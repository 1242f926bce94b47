"""Helpers of the IO limit and changed-block tracking tests: a steady load of
fixed-size, verified requests whose completions are timed, and ``gblk ctl``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gevent

from gblk.sim.guest.frontend import Frontend

from .backend_support import pattern

GBLK = [sys.executable, "-m", "gblk"]
SECTOR = 512


def ctl(socket_path: str, *args: str, check: bool = True) -> Tuple[int, Any, str]:
    """``gblk ctl ARGS --control-socket PATH``: (exit code, JSON answer or None, stderr)."""
    p = subprocess.run(GBLK + ["ctl", *args, "--control-socket", socket_path],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p.returncode, json.loads(p.stdout) if p.returncode == 0 else None, p.stderr


def ask(socket_path: str, command: str, disk: str, **more: Any) -> Any:
    """One request over the control socket from this process (what ``gblk ctl``
    sends, without a process start each time: the answer's result)."""
    from gblk.control.client import request

    return request(socket_path, {"command": command, "disk": disk, **more})


class Load:
    """``depth`` greenlets each reading and writing ``nsectors`` at a time in its own
    region (writes verified by the frontend's later reads); completion times kept."""

    def __init__(self, fe: Frontend, nsectors: int = 8, depth: int = 8,
                 span: Optional[int] = None, base: int = 0) -> None:
        self.fe = fe
        self.nsectors = nsectors
        self.depth = depth
        # requests' slots per worker: the disk shared out
        self.span = span or max(1, (fe.disk.sectors - base) // (depth * nsectors))
        self.base = base
        self.times: List[float] = []
        self.failed = 0
        self._stop = False
        self._group: List[gevent.Greenlet] = []

    def start(self) -> "Load":
        self._group = [gevent.spawn(self._worker, i) for i in range(self.depth)]
        return self

    def _worker(self, i: int) -> None:
        n = self.nsectors
        data = pattern(i, n * SECTOR)
        k = 0
        while not self._stop:
            sector = self.base + ((i * self.span + k % self.span) * n)
            k += 1
            r = (self.fe.submit_write(sector, data) if k % 2 else
                 self.fe.submit_read(sector, n)).get(timeout=60)
            if not r.ok:
                self.failed += 1
                continue  # an error is not a request done
            self.times.append(time.monotonic())

    def stop(self) -> None:
        self._stop = True
        gevent.joinall(self._group, timeout=60)

    def count(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.times if t0 <= t < t1)

    def rate(self, t0: float, t1: float) -> float:
        return self.count(t0, t1) / (t1 - t0)


def toml_rules(rules: Sequence[Dict[str, Any]], extra: str = "") -> str:
    out = [extra]
    for r in rules:
        out.append("[[limit]]")
        out += [f"{k} = {json.dumps(v)}" for k, v in r.items()]
    return "\n".join(out) + "\n"


def within(value: float, want: float, tolerance: float = 0.10) -> bool:
    return abs(value - want) <= tolerance * want


def first_disk(fe: Frontend) -> str:
    return f"d{fe.domid}/{fe.devid}"
