"""A microbenchmark of the simulated event channel's hot path
(``gblk sim hypervisor.evtchn_bench``, or ``python -m gblk.sim.hypervisor.evtchn_bench``).

What a ring pass pays on each side, measured on two handles of one scratch host in
this process (a guest domain's handle and dom0's, bound to each other). One round
is what a notification costs both ends; each step is timed on its own:

* ``notify``: the producer notifies a peer port that is unmasked (fires it, sends
  the wake-up datagram);
* ``pending_port``: the consumer's ``pending()`` that returns the port;
* ``pending_none``: the next ``pending()``, which finds nothing (every engine pass
  ends with one: "drain until None");
* ``unmask``: the consumer unmasks the port;
* ``round``: the four together;

and, looped on their own: ``notify_masked`` (a notification to a masked port: only
remembered as pending) and ``pending_idle`` (``pending()`` on a quiet handle).

Mean microseconds per call, best of ``--repeat`` runs of ``--count`` rounds (the
clock's own cost subtracted). A measuring tool only: nothing imports it, and it
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from typing import Dict, List, Optional

from .evtchn import SimEventChannel

STEPS = ("notify", "pending_port", "pending_none", "unmask")


def _clock_cost(n: int = 100000) -> float:
    clock = time.perf_counter
    t0 = clock()
    for _ in range(n):
        clock()
    return (clock() - t0) / n


def measure(count: int = 20000, repeat: int = 5) -> Dict[str, float]:
    """Microseconds per operation, best of ``repeat`` (see the module docstring)."""
    d = tempfile.mkdtemp(prefix="gblk-evtchn-bench-")
    clock = time.perf_counter
    tick = _clock_cost()
    try:
        guest = SimEventChannel(d, 1)
        back = SimEventChannel(d, 0)
        try:
            gport = guest.alloc_unbound(0)
            bport = back.bind_interdomain(1, gport)
            while back.pending() is not None:  # the bind-time event
                pass
            back.unmask(bport)
            best: Dict[str, float] = {k: float("inf") for k in STEPS + ("round",)}
            for _ in range(repeat):
                spent = dict.fromkeys(STEPS, 0.0)
                for _ in range(count):
                    t0 = clock()
                    guest.notify(gport)
                    t1 = clock()
                    p = back.pending()
                    t2 = clock()
                    q = back.pending()
                    t3 = clock()
                    back.unmask(bport)
                    t4 = clock()
                    spent["notify"] += t1 - t0
                    spent["pending_port"] += t2 - t1
                    spent["pending_none"] += t3 - t2
                    spent["unmask"] += t4 - t3
                    if p != bport or q is not None:
                        raise AssertionError(f"unexpected pending() results {p}, {q}")
                for k in STEPS:
                    best[k] = min(best[k], (spent[k] / count - tick) * 1e6)
                best["round"] = min(best["round"],
                                    sum(spent.values()) / count * 1e6 - 4 * tick * 1e6)
            # a notification storm on a masked port, and a quiet handle's pending()
            guest.notify(gport)
            if back.pending() != bport:
                raise AssertionError("no event")
            best["notify_masked"] = best["pending_idle"] = float("inf")
            for _ in range(repeat):
                t0 = clock()
                for _ in range(count):
                    guest.notify(gport)
                best["notify_masked"] = min(best["notify_masked"], (clock() - t0) / count * 1e6)
            back.unmask(bport)
            while back.pending() is not None:
                back.unmask(bport)
            for _ in range(repeat):
                t0 = clock()
                for _ in range(count):
                    back.pending()
                best["pending_idle"] = min(best["pending_idle"], (clock() - t0) / count * 1e6)
            return {k: round(v, 3) for k, v in best.items()}
        finally:
            guest.close()
            back.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="gblk sim hypervisor.evtchn_bench",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--count", type=int, default=20000, help="rounds per run (default 20000)")
    p.add_argument("--repeat", type=int, default=5, help="runs, best taken (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    res = measure(args.count, args.repeat)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:<14} {v:8.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
