"""The simulated xenstored as its own process, for the tests that talk to it over its
socket (raw wire protocol, gblk's client, Debian's xenstore-* tools)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, Iterator, Optional

from gblk.sim.harness.host import child_env


def start_xenstored(sock: str, *extra: str,
                    env: Optional[Dict[str, str]] = None) -> "subprocess.Popen[bytes]":
    """``python -m gblk.sim.xenstored --socket SOCK ...``, returned once it accepts
    connections (it writes READY=1 to a pipe). ``env``: the whole environment of
    the child (default: the simulated host's, this very gblk importable)."""
    rfd, wfd = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gblk.sim.xenstored", "--socket", sock,
             "--ready-fd", str(wfd), *extra],
            pass_fds=(wfd,), env=child_env() if env is None else env, stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(wfd)
    with os.fdopen(rfd, "rb") as ready:
        status = ready.readline()  # b"" if it died first
    if not status.startswith(b"READY=1"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"simulated xenstored did not start (exit {proc.returncode})")
    return proc


@contextlib.contextmanager
def running_xenstored(*extra: str) -> Iterator[str]:
    """A simulated xenstored on a socket in a fresh directory; yields the socket path.
    Stopped with SIGTERM at the end, which it must survive cleanly (exit 0)."""
    tmp = tempfile.mkdtemp(prefix="gblk-xs-")
    sock = os.path.join(tmp, "sock")
    proc = start_xenstored(sock, *extra)
    try:
        yield sock
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        shutil.rmtree(tmp)
