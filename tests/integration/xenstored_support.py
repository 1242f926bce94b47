"""The simulated xenstored as its own process, for the tests that talk to it over its
socket (raw wire protocol, pyxs, Debian's xenstore-* tools)."""

from __future__ import annotations

import os
import subprocess
import sys

from gblk.sim.host import child_env


def start_xenstored(sock: str, *extra: str) -> "subprocess.Popen[bytes]":
    """`python -m gblk.sim.xenstored --socket SOCK ...`, returned once it accepts."""
    rfd, wfd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gblk.sim.xenstored", "--socket", sock,
         "--ready-fd", str(wfd), *extra],
        pass_fds=(wfd,), env=child_env(),
    )
    os.close(wfd)
    with os.fdopen(rfd, "rb") as ready:
        status = ready.readline()  # b"" if it died first
    if not status.startswith(b"READY"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"xenstored did not start (exit {proc.returncode})")
    return proc
