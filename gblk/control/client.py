"""The cli's side of the control socket: ``gblk list`` and ``gblk stats``.

Plain blocking sockets: no gevent, no Xen, nothing from the daemon's layers, so the
commands start fast. Errors become one-line :class:`gblk.errors.GblkError` (exit 1).
"""

from __future__ import annotations

import errno
import json
import socket
from typing import Any, Dict, List, Optional

from ..errors import GblkError
from . import MAX_REQUEST

TIMEOUT = 10.0
MiB = 1 << 20


def request(path: str, payload: Dict[str, Any], timeout: float = TIMEOUT) -> Any:
    """Send one request, return its ``result``; GblkError with one line otherwise."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise GblkError(f"no gblk daemon answers on {path} ({e.strerror}): is it "
                                "running (systemctl status gblk)? Another socket: "
                                "--control-socket PATH or control.socket") from None
            if e.errno in (errno.EACCES, errno.EPERM):
                raise GblkError(f"{path}: permission denied: the control socket is root's; "
                                "run as root (sudo gblk ...)") from None
            raise GblkError(f"cannot reach gblk at {path}: {e.strerror or e}") from None
        sock.sendall(json.dumps(payload).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 64 * MAX_REQUEST * 16:
                raise GblkError(f"{path}: answer too long")
    except socket.timeout:
        raise GblkError(f"gblk at {path} did not answer within {timeout:g}s") from None
    except OSError as e:
        raise GblkError(f"talking to gblk at {path}: {e.strerror or e}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(buf.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise GblkError(f"{path}: not a gblk control socket (answer is not JSON)") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else None
        raise GblkError(str(error or "the daemon refused the request"))
    return reply.get("result")


def daemon_greenlets(path: str, timeout: float = TIMEOUT) -> Optional[int]:
    """The daemon's live greenlets (its ``status``), None if it cannot tell."""
    try:
        status = request(path, {"command": "status"}, timeout)
    except GblkError:
        return None
    value = status.get("greenlets") if isinstance(status, dict) else None
    return value if isinstance(value, int) else None


def _size(n: int) -> str:
    for unit, div in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def format_list(rows: List[Dict[str, Any]]) -> str:
    """A table like ``tap-ctl list``: one disk a line."""
    if not rows:
        return "no disks\n"
    head = ("DISK", "KIND", "STATE", "SIZE", "QUEUES", "PAGES", "INFLIGHT", "IMAGE")
    table = [head] + [(
        r["disk"], r["kind"], r["state_name"], _size(r["size_bytes"]) if r["size_bytes"] else "-",
        str(r["queues"]), r["page_path"] or "-", str(r["in_flight"]), r["image"] or "-",
    ) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1]
             for row in table]
    lines += [f"{r['disk']} exported read-only over NBD on {r['export']}"
              for r in rows if r.get("export")]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _avg_ms(entry: Optional[Dict[str, float]]) -> str:
    if not entry or not entry.get("count"):
        return "-"
    return f"{entry['sum'] / entry['count'] * 1000:.2f} ms"


def format_stats(disks: List[Dict[str, Any]]) -> str:
    """The counters of each disk, human-readable."""
    if not disks:
        return "no disks\n"
    out: List[str] = []
    for d in disks:
        if out:
            out.append("")
        out.append(f"{d['disk']} ({d['kind']}) {d['state_name']}, "
                   f"{_size(d['size_bytes']) if d['size_bytes'] else 'size unknown'}, "
                   f"{d['queues']} queue(s), pages: {d['page_path'] or '-'}, "
                   f"image {d['image'] or '-'}")
        out.append(f"  {'op':<12} {'requests':>12} {'bytes':>14} {'avg latency':>12}")
        for op, n in d["requests"].items():
            nbytes = d["bytes"].get(op, 0)
            lat = d["request_duration_seconds"].get(op)
            if n or nbytes or op in ("read", "write"):
                out.append(f"  {op:<12} {n:>12} {_size(nbytes):>14} {_avg_ms(lat):>12}")
        errors = {k: v for k, v in d["errors"].items() if v}
        out.append("  errors: " + (", ".join(f"{k} {v}" for k, v in sorted(errors.items()))
                                   if errors else "none"))
        out.append(f"  grants: {d['grant_maps']} mapped, {d['grant_unmaps']} unmapped, "
                   f"{d['grant_copy_segments']} copy segments; persistent "
                   f"{d['persistent_grants']}/{d['persistent_grants_limit']}, "
                   f"{d['persistent_grant_evictions']} evicted")
        out.append(f"  reconnects {d['reconnects']}")
        for r in d["ring"]:
            out.append(f"  queue {r['queue']}: {r['slots']} slots, {r['in_flight']} in flight, "
                       f"{r['pending']} pending, notifications {r['notifications_received']} in "
                       f"/ {r['notifications_sent']} out{', HALTED' if r['halted'] else ''}")
    return "\n".join(out) + "\n"
