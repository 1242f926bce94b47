"""Where the simulated host keeps its files: on tmpfs when it can.

A real host's guest RAM is memory and its ``/run`` (the daemon's control socket and
ring journals) is tmpfs. On a disk file system a simulated guest's RAM becomes dirty
file pages the daemon pays for, and on this kind of machine creating a file there
costs almost a millisecond (a ring journal each, 1024 for 256 disks) where tmpfs takes
microseconds: either would charge the simulated host's disk to the daemon.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

SHM = "/dev/shm"


def fs_type(path: str) -> str:
    """The file system type of the mount ``path`` is on ("" if unknown)."""
    path = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mnt = fields[4].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, right.split()[0]
    except OSError:
        return ""
    return kind


def ram_dir(prefix: str = "gblk-sim-") -> Optional[str]:
    """A fresh directory on tmpfs (/dev/shm) for a simulated host, or None when there is
    none to use (the simulated host then makes its own under the temporary directory).
    The caller removes it."""
    if fs_type(SHM) != "tmpfs" or not os.access(SHM, os.W_OK):
        return None
    return tempfile.mkdtemp(prefix=prefix, dir=SHM)
