"""A test-only hook: the daemon SIGKILLs itself at named points of the data path,
so that restarts can be tested exactly where they are hardest.

``GBLK_TEST_CRASH="taken=0.02,journaled=0.05,written=0.05"``: at each point, with that
probability, the process kills itself with SIGKILL. Points: ``taken`` (a batch was
consumed from the ring, nothing served yet), ``journaled`` (a batch of responses is
in the ring journal, the ring untouched), ``written`` (the responses are in the ring
slots, ``rsp_prod`` not yet published). The daemon honours the variable only on the
simulated host; on a real Xen host it refuses to start while it is set
(``gblk.daemon``).
"""

from __future__ import annotations

import os
import random
import signal
from typing import Dict

ENV = "GBLK_TEST_CRASH"
POINTS = ("taken", "journaled", "written")

#: whether any point is armed (read on the data path before calling ``hit``)
ENABLED = False
_armed: Dict[str, float] = {}


def parse(spec: str) -> Dict[str, float]:
    """``point=probability,...`` -> {point: probability}; ValueError naming the fault."""
    out: Dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in POINTS:
            raise ValueError(f"{ENV}: {part!r}: expected POINT=PROBABILITY, POINT one of "
                             f"{', '.join(POINTS)}")
        p = float(value)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{ENV}: {part!r}: probability must be within 0..1")
        out[name.strip()] = p
    return out


def arm(points: Dict[str, float]) -> None:
    global ENABLED
    _armed.clear()
    _armed.update(points)
    ENABLED = bool(_armed)


def hit(point: str) -> None:
    p = _armed.get(point)
    if p and random.random() < p:
        os.kill(os.getpid(), signal.SIGKILL)
