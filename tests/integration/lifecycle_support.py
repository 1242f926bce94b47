"""Helpers for the backend's lifecycle and data-safety integration tests: a daemon
under strace, reading a daemon's mappings and open files from /proc, prefilled
images, and a parser for ``strace -f -y`` output that keeps the order in which the
traced syscalls started and ended. Waiting (``wait_until``, ``DEADLINE``) is
``backend_support``'s, a device's metric series ``metrics_support``'s.

Test support only: it runs in the test process and never imports the engine,
device or daemon layers (the backend is always a separate process here).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

from gblk.blkif.const import U32_MASK
from gblk.blkif.ring import RSP_PROD
from gblk.sim.guest.frontend import Frontend
from gblk.sim.harness.host import BackendProcess, SimHost, child_env

from .backend_support import SECTOR, pattern, wait_until

#: the syscalls the flush test traces (glibc >= 2.26 implements pwritev with the
#: pwritev2 syscall, so both are traced)
TRACED = "fdatasync,fsync,pwritev,pwritev2,pwrite64"


# -- daemons ------------------------------------------------------------------------
def start_traced_daemon(host: SimHost, name: str, toml: str, trace_path: str) -> BackendProcess:
    """``gblk serve`` under ``strace -f -y`` (fds shown with their paths), the trace
    written to ``trace_path``. The BackendProcess's pid is strace's; the daemon is
    its child (``traced_pid``)."""
    cfg = os.path.join(host.dir, f"{name}.toml")
    with open(cfg, "w") as f:
        f.write(toml)
    argv = ["strace", "-f", "-y", "-qq", "-s", "0", "-e", f"trace={TRACED}", "-e", "signal=none",
            "-o", trace_path,
            *host.backend_argv(["--config", cfg, "--metrics-address", "127.0.0.1:0"])]
    return BackendProcess(argv, os.path.join(host.dir, f"{name}.log"), child_env())


def traced_pid(proc: BackendProcess) -> int:
    """The pid of the process strace started."""

    def child() -> Optional[int]:
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                kids = f.read().split()
        except OSError:
            return None
        return int(kids[0]) if kids else None

    return wait_until(child, "strace started the daemon")


def mapped_paths(pid: int) -> List[str]:
    """The files mapped into process ``pid`` (from /proc/PID/maps)."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                out.append(parts[5].rstrip("\n"))
    return out


def open_paths(pid: int) -> Dict[int, str]:
    """fd -> what it points to, for process ``pid``."""
    out = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(f"{base}/{name}")
        except OSError:
            pass  # closed meanwhile
    return out


def fd_flags(pid: int, fd: int) -> int:
    """The open flags of ``fd`` in process ``pid`` (/proc/PID/fdinfo)."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"no flags for fd {fd} of {pid}")


def holds_domain(pid: int, host: SimHost, domid: int) -> List[str]:
    """Mappings and open files of ``pid`` that belong to domain ``domid``'s memory or
    grant table (the simulated host's ``DIR/domains/<domid>/``)."""
    marker = os.path.join(os.path.realpath(host.dir), "domains", str(domid)) + "/"
    held = [p for p in mapped_paths(pid) if p.startswith(marker)]
    held += [p for p in open_paths(pid).values() if p.startswith(marker)]
    return held


# -- rings ----------------------------------------------------------------------------------
def unanswered_behind_rsp_prod(fe: Frontend) -> List[str]:
    """Requests the guest still waits for whose slot lies before its ring's
    ``rsp_prod``: a response has overwritten that slot (request and response
    share it), so a backend attaching from ``rsp_prod`` can never see them again.
    Empty when ``rsp_prod`` is an exact boundary: everything before it answered."""
    fe.poll()  # take the responses already published
    out = []
    for q in fe.queues:
        rsp_prod = q.ring.idx[RSP_PROD]
        for part in q.outstanding.values():
            behind = (rsp_prod - part.index) & U32_MASK
            if 0 < behind <= q.ring.slots:
                out.append(f"queue {q.index}: request at ring index {part.index} unanswered, "
                           f"rsp_prod {rsp_prod}")
    return out


# -- images ---------------------------------------------------------------------------
def prefilled_image(host: SimHost, name: str, nbytes: int, seed: int) -> str:
    """An image whose every sector holds known, position-dependent bytes."""
    path = os.path.join(host.dir, name)
    with open(path, "wb") as f:
        f.write(pattern(seed, nbytes))
    return path


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def sectors(n: int) -> int:
    return n * SECTOR


# -- strace ------------------------------------------------------------------------------
@dataclass
class Call:
    """One traced syscall: ``start``/``end`` are the line numbers of its entry and
    its exit in the trace (equal when strace printed it in one line)."""

    name: str
    fd_path: str
    offset: Optional[int]
    ret: int
    start: int
    end: int


_LINE = re.compile(r"^(\d+)\s+(.*)$")
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_FD = re.compile(r"^(\d+)<([^>]*)>")
_RET = re.compile(r"\)\s+=\s+(-?\d+)")
#: pwritev/pwritev2: ..., iovcnt, offset[, flags]) = ret
_VEC_OFFSET = re.compile(r"\],\s*\d+,\s*(\d+)(?:,\s*[^)]*)?\)\s+=")
#: pwrite64: ..., count, offset) = ret
_PLAIN_OFFSET = re.compile(r",\s*\d+,\s*(\d+)\)\s+=")


def parse_strace(path: str) -> List[Call]:
    """The completed calls of an ``strace -f -y -s 0`` trace, in the order they began."""
    calls: List[Call] = []
    open_calls: Dict[str, tuple] = {}  # pid -> (name, args so far, start line)
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    for no, line in enumerate(lines):
        m = _LINE.match(line)
        if not m:
            continue
        pid, rest = m.group(1), m.group(2)
        u = _UNFINISHED.match(rest)
        if u:
            open_calls[pid] = (u.group(1), u.group(2), no)
            continue
        r = _RESUMED.match(rest)
        if r:
            began = open_calls.pop(pid, None)
            if began is None or began[0] != r.group(1):
                continue
            name, args, start = began[0], began[1] + r.group(2), began[2]
        else:
            c = re.match(r"^(\w+)\((.*)$", rest)
            if not c:
                continue
            name, args, start = c.group(1), c.group(2), no
        ret = _RET.search(args)
        fd = _FD.match(args)
        if ret is None or fd is None:
            continue
        offset = None
        o = (_VEC_OFFSET if name.startswith("pwritev") else _PLAIN_OFFSET).search(args)
        if o and name.startswith("pwrite"):
            offset = int(o.group(1))
        calls.append(Call(name, fd.group(2), offset, int(ret.group(1)), start, no))
    calls.sort(key=lambda c: c.start)
    return calls


def writes_at(calls: List[Call], path: str, offset: int) -> List[Call]:
    return [c for c in calls if c.name.startswith("pwrite") and c.fd_path == path
            and c.offset == offset and c.ret > 0]


def syncs_of(calls: List[Call], path: str) -> List[Call]:
    return [c for c in calls if c.name in ("fdatasync", "fsync") and c.fd_path == path
            and c.ret == 0]
