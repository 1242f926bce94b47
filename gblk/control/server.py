"""The daemon's side of the control socket (see ``gblk.control``).

``ControlServer(path, provider)`` listens on a Unix socket and answers each
connection in a greenlet of a small pool: it checks the peer (root or the daemon's
own uid), reads one JSON request line, asks ``provider`` (the daemon: a list of
:class:`gblk.control.views.DiskFacts`, built on the hub) and writes one JSON
answer. The socket is created mode 0600 (umask around ``bind``); a stale socket
file left by a killed daemon is replaced, a live one (another gblk answering) is
left alone and reported.

What it must not do: touch the dataplane or change the stats (it reads them through
``views``), block the hub (the only IO is this socket), or take the daemon down: a
failure here is one log line and one error reply.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import struct
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent
import gevent.pool
import gevent.socket
from gevent.server import StreamServer

from ..errors import GblkError
from . import MAX_REQUEST, REQUEST_TIMEOUT, parse_disk
from .views import DiskFacts, disk_row, disk_stats

log = logging.getLogger("gblk.control")

Provider = Callable[[], List[DiskFacts]]
Status = Callable[[], Dict[str, Any]]
#: ``handover(pid)``: release every disk for the process ``pid`` (gblk serve --takeover)
Handover = Callable[[int], Dict[str, Any]]
#: a command that changes something (``limit``, ``cbt``): (the request, its disk as
#: parse_disk gives it) -> its result; ValueError or GblkError (one line, nothing
#: changed) for a request it refuses
Command = Callable[[Dict[str, Any], Tuple[int, Optional[str], int]], Any]


class ControlError(GblkError):
    """The control socket cannot be served (the daemon logs it and goes on)."""


class ControlServer:
    """``start()``/``stop()``, idempotent; ``stop()`` removes the socket file."""

    def __init__(self, path: str, provider: Provider, status: Optional[Status] = None,
                 max_connections: int = 4, handover: Optional[Handover] = None,
                 commands: Optional[Dict[str, Command]] = None,
                 allowed_uids: Optional[Tuple[int, ...]] = None) -> None:
        self.path = path
        self._handover = handover
        self._provider = provider
        self._status = status or (lambda: {})
        self._max = max_connections
        self._server: Optional[StreamServer] = None
        self._uid = os.geteuid()
        self._commands = dict(commands or {})
        #: peers allowed (SO_PEERCRED): root and the daemon's own user
        self._allowed = allowed_uids if allowed_uids is not None else (0, self._uid)
        self._inode: Optional[int] = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self._server is not None:
            return
        listener = self._listen()
        server = StreamServer(listener, self._handle, spawn=gevent.pool.Pool(self._max))
        try:
            server.start()
        except BaseException:
            listener.close()
            raise
        self._server = server
        log.info("control: listening on %s", self.path)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        try:
            server.stop(timeout=1.0)
        finally:
            try:  # only our own socket file, not one another gblk made since
                if self._inode is not None and os.lstat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass

    def _listen(self) -> Any:
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as e:
            raise ControlError(f"control socket {self.path}: cannot create {directory}: "
                               f"{e.strerror or e}") from None
        self._remove_stale()
        sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(16)
        except OSError as e:
            sock.close()
            raise ControlError(f"control socket {self.path}: cannot listen: "
                               f"{e.strerror or e}") from None
        finally:
            os.umask(old)
        self._inode = os.lstat(self.path).st_ino
        return sock

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ControlError(f"control socket {self.path}: {e.strerror or e}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"control socket {self.path}: exists and is not a socket; "
                               "remove it or set control.socket")
        probe = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                os.unlink(self.path)  # left by a gblk that died
                return
            raise ControlError(f"control socket {self.path}: {e.strerror or e}") from None
        finally:
            probe.close()
        raise ControlError(f"control socket {self.path}: another process answers on it "
                           "(is another gblk running?)")

    # ---- one connection ----------------------------------------------------------
    def _handle(self, conn: Any, _address: Any) -> None:
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            pid, uid = _peer(conn)
            if uid not in self._allowed:
                reply = {"ok": False, "error": "permission denied: the control socket "
                         "answers root only"}
            else:
                reply = self._answer(_read_line(conn), pid)
            conn.sendall(json.dumps(reply, sort_keys=True).encode() + b"\n")
        except (OSError, ValueError) as e:
            log.debug("control: connection dropped: %s", e)
        except Exception:  # noqa: BLE001 - a bug here must not take the daemon down
            log.exception("control: request failed")
        finally:
            conn.close()

    def _answer(self, line: bytes, pid: int = 0) -> Dict[str, Any]:
        try:
            req = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {"ok": False, "error": "not a JSON request line"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "a request is a JSON object"}
        command = req.get("command")
        if command == "list":
            return {"ok": True, "result": [disk_row(f) for f in self._sorted()]}
        if command == "stats":
            disks = self._sorted()
            want = req.get("disk")
            if want is not None:
                try:
                    domid, kind, devid = parse_disk(str(want))
                except ValueError as e:
                    return {"ok": False, "error": str(e)}
                disks = [f for f in disks if f.stats.domain == domid and f.stats.device == devid
                         and (kind is None or f.stats.kind == kind)]
                if not disks:
                    return {"ok": False, "error": f"no disk {want} (gblk list shows the disks)"}
            return {"ok": True, "result": [disk_stats(f) for f in disks]}
        if command == "status":
            return {"ok": True, "result": self._status()}
        if command == "handover" and self._handover is not None:
            # a new gblk (serve --takeover) is started: release every disk to it
            return {"ok": True, "result": self._handover(pid)}
        if command == "version":
            import gblk

            return {"ok": True, "result": {"version": gblk.__version__}}
        handler = self._commands.get(command) if isinstance(command, str) else None
        if handler is not None:
            want = req.get("disk")
            if not isinstance(want, str):
                return {"ok": False, "error": f"{command}: \"disk\" is missing (d<domid>/<devid> "
                        "as gblk list shows it)"}
            try:
                return {"ok": True, "result": handler(req, parse_disk(want))}
            except (ValueError, GblkError) as e:
                return {"ok": False, "error": str(e)}
        known = ", ".join(["list", "stats", "status", "version"] + sorted(self._commands))
        return {"ok": False, "error": f"unknown command {command!r}; known: {known}"}

    def _sorted(self) -> List[DiskFacts]:
        return sorted(self._provider(),
                      key=lambda f: (f.stats.domain, f.stats.device, f.stats.kind))


def _peer(conn: Any) -> "tuple[int, int]":
    """(pid, uid) of the process at the other end."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


def _read_line(conn: Any) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too long")
    return buf.split(b"\n", 1)[0]
