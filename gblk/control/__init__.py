"""gblk's local control socket: ``gblk list`` and ``gblk stats`` talking to the daemon.

The running daemon listens on a Unix socket (``control.socket``, by default
``/run/gblk/control.sock`` in the unit's RuntimeDirectory), mode 0600, and answers
only peers whose uid (``SO_PEERCRED``) is root's or its own. The protocol is one
JSON object per line, one request per connection::

    {"command": "list"}                      -> {"ok": true, "result": [disk, ...]}
    {"command": "stats", "disk": "d5/51712"} -> {"ok": true, "result": [stats]}
    {"command": "limit", "disk": "d5/51712"} -> {"ok": true, "result": {"limits": ...}}
    {"command": "limit", "disk": "d5/51712", "set": {"iops_total": 500, ...}}
    {"command": "cbt", "disk": "d5/51712", "action": "enable|disable|reset|show"}
    {"command": "export", "disk": "d5/51712"[, "socket": PATH | "address": "HOST:PORT"]}
    {"command": "unexport", "disk": "d5/51712"}
    anything wrong                           -> {"ok": false, "error": "one line"}

``version`` and ``status`` exist too. ``limit``, ``cbt``, ``export`` and ``unexport`` change things (``gblk
ctl``): a request they refuse (unknown disk, bad limits) changes nothing. ``server`` runs
in the daemon (gevent); ``client`` is plain sockets (no gevent, no Xen) for the
cli. The views are built from the same plain stats objects ``gblk.metrics``
reads (``gblk.engine.stats``), read-only, on the hub, at request time: nothing on
the request path knows this socket exists.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

DEFAULT_SOCKET = "/run/gblk/control.sock"
#: a request line longer than this is refused (requests are tiny)
MAX_REQUEST = 64 * 1024
#: how long a peer may take to send its request line (a hang guard)
REQUEST_TIMEOUT = 5.0

_DISK = re.compile(r"^d?(\d+)/(?:(qdisk|vbd|vbd3)/)?(\d+)$")


def parse_disk(text: str) -> Tuple[int, Optional[str], int]:
    """``d5/51712`` (the log prefix), ``5/51712`` or ``d5/qdisk/51712`` ->
    (domid, kind or None, devid). Raises ValueError saying what is allowed."""
    m = _DISK.match(text.strip())
    if not m:
        raise ValueError(f"disk {text!r}: expected d<domid>/<devid> as gblk list shows it "
                         "(e.g. d5/51712, or d5/qdisk/51712)")
    return int(m.group(1)), m.group(2), int(m.group(3))


def disk_name(domid: int, devid: int) -> str:
    return f"d{domid}/{devid}"
