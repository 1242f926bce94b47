"""A small blocking XenStore client for short-lived commands (``gblk-xl-hotplug``).

libxl runs the hotplug script with a 40 s limit, and on a busy dom0 importing gevent
and pyxs alone took most of it (16 s on average under emulation). This client
needs nothing but a socket: READ and WRITE over the wire protocol
(``xen/io/xs_wire.h``: four native u32 - type, req_id, tx_id, len - then the
payload), to ``$XENSTORED_PATH``, ``$XENSTORED_RUNDIR/socket`` (default
``/var/run/xenstored/socket``) or the xenbus device, as libxenstore looks. Every call
has a deadline. No gevent, no pyxs, no threads: the daemon uses
``gblk.xen.xenstore`` instead.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from typing import List, Optional, Tuple

from gblk.errors import XenStoreError, XenUnavailable

XS_READ = 2
XS_WRITE = 11
XS_WATCH_EVENT = 15
XS_ERROR = 16
XENSTORE_PAYLOAD_MAX = 4096
HEADER = struct.Struct("=IIII")

DEFAULT_RUNDIR = "/var/run/xenstored"
#: what to check when no xenstored answers, in the terms of the distributions gblk
#: runs on: Debian's xen-utils-common starts xenstored from /etc/init.d/xen, i.e.
#: xen.service; upstream Xen ships xenstored.service
NO_XENSTORE_HINT = ("no XenStore: xenstored is not running, or this is not a Xen "
                    "control domain (Debian: systemctl status xen, started by "
                    "/etc/init.d/xen from xen-utils-common; upstream Xen: systemctl "
                    "status xenstored)")
XENBUS_PATHS = ("/dev/xen/xenbus", "/proc/xen/xenbus")

_ENC = "utf-8"
_ENC_ERRORS = "surrogateescape"


def default_targets() -> List[Tuple[str, str]]:
    """(kind, path) in the order libxenstore tries them."""
    sock = os.environ.get("XENSTORED_PATH") or os.path.join(
        os.environ.get("XENSTORED_RUNDIR", DEFAULT_RUNDIR), "socket")
    return [("unix", sock)] + [("xenbus", p) for p in XENBUS_PATHS if os.path.exists(p)]


class SimpleXenStore:
    """``read``/``write`` outside any transaction, one request at a time."""

    def __init__(self, timeout: float = 10.0,
                 targets: Optional[List[Tuple[str, str]]] = None) -> None:
        self.timeout = timeout
        self._sock: Optional[socket.socket] = None
        self._fd: Optional[int] = None
        self._req_id = 0
        errors: List[str] = []
        for kind, path in targets if targets is not None else default_targets():
            try:
                if kind == "unix":
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(timeout)
                    try:
                        s.connect(path)
                    except OSError:
                        s.close()
                        raise
                    self._sock = s
                else:
                    self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                self.path = path
                return
            except OSError as e:
                errors.append(f"{path} ({e.strerror or e})")
        raise XenUnavailable(f"{NO_XENSTORE_HINT}. Tried " + "; ".join(errors))

    # -- calls ---------------------------------------------------------------------
    def read(self, path: str) -> Optional[str]:
        """The value at ``path``, or None if there is no such node."""
        try:
            value = self._call(XS_READ, path.encode(_ENC, _ENC_ERRORS) + b"\0")
        except XenStoreError as e:
            if e.errno_name == "ENOENT":
                return None
            raise
        return value.decode(_ENC, _ENC_ERRORS)

    def write(self, path: str, value: str) -> None:
        self._call(XS_WRITE, path.encode(_ENC, _ENC_ERRORS) + b"\0" + value.encode(_ENC, _ENC_ERRORS))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the wire --------------------------------------------------------------------
    def _call(self, op: int, payload: bytes) -> bytes:
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            raise XenStoreError(f"request of {len(payload)} bytes is over XenStore's "
                                f"{XENSTORE_PAYLOAD_MAX}", "E2BIG")
        self._req_id = (self._req_id + 1) & 0xFFFFFFFF
        deadline = time.monotonic() + self.timeout
        self._send(HEADER.pack(op, self._req_id, 0, len(payload)) + payload, deadline)
        while True:
            rtype, req_id, _tx, size = HEADER.unpack(self._recv(HEADER.size, deadline))
            body = self._recv(size, deadline) if size else b""
            if rtype == XS_WATCH_EVENT or req_id != self._req_id:
                continue  # not ours (we set no watches; be safe anyway)
            if rtype == XS_ERROR:
                name = body.rstrip(b"\0").decode("ascii", "replace") or "EIO"
                raise XenStoreError(f"xenstored answered {name}", name)
            return body

    def _send(self, data: bytes, deadline: float) -> None:
        try:
            if self._sock is not None:
                self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
                self._sock.sendall(data)
            else:
                assert self._fd is not None
                os.write(self._fd, data)  # the xenbus device takes a message whole
        except (socket.timeout, OSError) as e:
            raise XenStoreError(f"xenstored at {self.path}: {e}", "EIO") from e

    def _recv(self, size: int, deadline: float) -> bytes:
        out = b""
        while len(out) < size:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise socket.timeout("timed out")
                if self._sock is not None:
                    self._sock.settimeout(left)
                    chunk = self._sock.recv(size - len(out))
                else:
                    assert self._fd is not None
                    if not select.select([self._fd], [], [], left)[0]:
                        raise socket.timeout("timed out")
                    chunk = os.read(self._fd, size - len(out))
            except (socket.timeout, OSError) as e:
                raise XenStoreError(f"xenstored at {self.path}: {e}", "EIO") from e
            if not chunk:
                raise XenStoreError(f"xenstored at {self.path} closed the connection",
                                    errno.errorcode[errno.ECONNRESET])
            out += chunk
        return out
