#!/usr/bin/python3
"""``python3 -m gblk ARGS`` with two stack dumps on demand, for the system suite.

The payload starts gblk through this wrapper so that a scenario failing on a wedged
gblk leaves evidence of where it was stuck (the payload signals it before cleaning up):

- SIGUSR2: every OS thread's Python stack (faulthandler; works even when the gevent hub
  itself is blocked), appended to ``$GBLK_STACKS``;
- SIGUSR1: every greenlet's stack and the hub's state (``gevent.util.format_run_info``,
  run by the hub), appended to the same file.

gevent is patched exactly as ``gblk.cli`` does it (it skips patching when already done).
Changes nothing else: gblk's own signal handlers (TERM, INT, HUP) are untouched.
"""

import faulthandler
import os
import signal
import sys
import time

from gevent import monkey

monkey.patch_all(queue=False)

import gevent  # noqa: E402 - after patching, as gblk.cli does
import gevent.util  # noqa: E402

STACKS = os.environ.get("GBLK_STACKS", "/mnt/share/results/logs/gblk-stacks.txt")
_threads_file = open(STACKS, "a")  # kept open: faulthandler writes to its fd
faulthandler.register(signal.SIGUSR2, file=_threads_file, all_threads=True)


def _dump_greenlets():
    try:  # never let a diagnostic take gblk down
        text = "\n".join(gevent.util.format_run_info())
    except Exception as e:  # noqa: BLE001
        text = "format_run_info failed: %r" % e
    with open(STACKS, "a") as f:
        f.write("\n==== greenlets at %s (pid %d)\n%s\n" % (time.strftime("%H:%M:%S"), os.getpid(), text))


def main():
    gevent.signal_handler(signal.SIGUSR1, _dump_greenlets)
    from gblk.cli import main as gblk_main

    sys.argv = ["gblk"] + sys.argv[1:]
    return gblk_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
