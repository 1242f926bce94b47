"""A small blocking XenStore client for short-lived commands (``gblk-xl-hotplug``).

libxl runs the hotplug script with a 40 s limit, and on a busy dom0 importing gevent
and pyxs alone (gblk's XenStore client then) took most of it (16 s on average under emulation). This client
needs nothing but a socket: READ and WRITE over the wire protocol
(``gblk.xen.xs_wire``), to ``$XENSTORED_PATH``, ``$XENSTORED_RUNDIR/socket`` (default
``/var/run/xenstored/socket``) or the xenbus device, as libxenstore looks. Every call
has a deadline. No gevent, no threads: the daemon uses
``gblk.xen.xenstore`` instead.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from typing import List, Optional, Tuple

from gblk.errors import XenStoreError, XenUnavailable
from gblk.xen import xs_wire as w
from gblk.xen.xs_wire import NO_XENSTORE_HINT, default_targets

_ENC = "utf-8"
_ENC_ERRORS = "surrogateescape"


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
                if kind == w.UNIX:
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
            value = self._call(w.XS_READ, path.encode(_ENC, _ENC_ERRORS) + b"\0")
        except XenStoreError as e:
            if e.errno_name == "ENOENT":
                return None
            raise
        return value.decode(_ENC, _ENC_ERRORS)

    def write(self, path: str, value: str) -> None:
        self._call(w.XS_WRITE, path.encode(_ENC, _ENC_ERRORS) + b"\0" + value.encode(_ENC, _ENC_ERRORS))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the wire --------------------------------------------------------------------
    def _call(self, op: int, payload: bytes) -> bytes:
        if len(payload) > w.XENSTORE_PAYLOAD_MAX:
            raise XenStoreError(f"request of {len(payload)} bytes is over XenStore's "
                                f"{w.XENSTORE_PAYLOAD_MAX}", "E2BIG")
        self._req_id = (self._req_id + 1) & 0xFFFFFFFF
        deadline = time.monotonic() + self.timeout
        self._send(w.pack(op, self._req_id, 0, payload), deadline)
        while True:
            rtype, req_id, _tx, size = w.unpack_header(self._recv(w.HEADER.size, deadline))
            body = self._recv(size, deadline) if size else b""
            if rtype == w.XS_WATCH_EVENT or req_id != self._req_id:
                continue  # not ours (we set no watches; be safe anyway)
            if rtype == w.XS_ERROR:
                name = w.error_name(body)
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
                    poller = select.poll()  # not select(): any fd number works
                    poller.register(self._fd, select.POLLIN)
                    if not poller.poll(left * 1000):
                        raise socket.timeout("timed out")
                    chunk = os.read(self._fd, size - len(out))
            except (socket.timeout, OSError) as e:
                raise XenStoreError(f"xenstored at {self.path}: {e}", "EIO") from e
            if not chunk:
                raise XenStoreError(f"xenstored at {self.path} closed the connection",
                                    errno.errorcode[errno.ECONNRESET])
            out += chunk
        return out
