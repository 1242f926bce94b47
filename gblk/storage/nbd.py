"""A store served by an NBD server: a ``qemu-nbd`` gblk runs (``gblk.storage.qemunbd``)
or someone else's export (``params=nbd:<uri>``).

Where the IO runs: in the threadpool, like every store. The engine hands a job the
guest pages (mapped grants) and calls ``readv``/``writev`` there; this client sends
the request from that thread and receives the reply straight into the guest pages
(``recv_into``, no copy in Python). Measured against doing the socket IO on the hub
and against libnbd: see docs/storage-nbd.md.

Several requests in flight over one socket: every request has a cookie; the threads
waiting for replies take turns reading (leader/followers): the one holding the
reader token reads replies, whatever request they answer, into that request's
views, and wakes its thread; it gives the token up when its own reply came, waking
one still waiting to take over. The waits are on ``_queue.SimpleQueue`` (a C lock,
never gevent-patched: this runs in real threads of a monkey-patched process) and
the socket is a real ``_socket.socket`` with a timeout, so a server that stops
answering frees its threads after ``io_timeout`` seconds.

A connection lost (a crashed qemu-nbd, a remote server gone, a malformed reply) is
reconnected (the local server restarted first) and the requests in flight are sent
again: a READ or WRITE carries all its data until answered, so repeating it is safe.
Writes the server acknowledged but was not asked to flush may have died with it:
then the next FLUSH fails (EIO) and says so, once. Requests fail with EIO, never
hang, while the server cannot be reached.
"""

from __future__ import annotations

import _socket
import errno
import itertools
import time
from _queue import Empty, SimpleQueue
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import nbdwire as w
from .base import Store

_LEAD = 1
_DONE = 2
#: how many times one request is sent again over new connections
RETRIES = 3
#: after a failed reconnect, requests fail at once for this long (no connect storm)
RECONNECT_BACKOFF = 1.0
TRIM_CHUNK = 1 << 30
#: why a connection closed by gblk itself is unusable
CLOSED = "closed"
#: a remote export's size is asked on a new connection (every few seconds: the
#: device's resize check); how long that may take
PROBE_TIMEOUT = 2.0


class ReplyError(OSError):
    """The server answered the request with an error (the connection is fine)."""


class ConnectionLost(OSError):
    """The connection broke before the request was answered (it may be sent again).

    Exceptions are made afresh for every caller and never kept: a kept one's
    traceback would keep its frames' slices of guest pages alive (their grants then
    could not be unmapped), and one object raised in several threads at once would
    have its traceback rewritten under it."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPIPE, message)


class _Token:
    """A mutex made of a SimpleQueue (a real lock in a gevent-patched process)."""

    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: SimpleQueue = SimpleQueue()
        self._q.put(None)

    def acquire(self, blocking: bool = True) -> bool:
        try:
            self._q.get(blocking)
        except Empty:
            return False
        return True

    def release(self) -> None:
        self._q.put(None)

    def __enter__(self) -> "_Token":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Req:
    __slots__ = ("cookie", "views", "sent", "done", "error", "wake")

    def __init__(self, cookie: int, views: Optional[Sequence[memoryview]]) -> None:
        self.cookie = cookie
        self.views = views
        #: all of it went to the server: its thread waits for the reply (or reads)
        self.sent = False
        self.done = False
        #: (answered by the server, errno, message), or None
        self.error: Optional[Tuple[bool, int, str]] = None
        self.wake: SimpleQueue = SimpleQueue()


class Connection:
    """One transmission-phase connection, shared by every thread of its store."""

    def __init__(self, sock: object, export: w.Export) -> None:
        self.sock = sock
        self.export = export
        #: why the connection is unusable ("closed" after close), or None
        self.broken: Optional[str] = None
        self._send = _Token()
        self._reader = _Token()
        self._pending: Dict[int, _Req] = {}
        self._cookies = itertools.count(1)

    def call(self, cmd: int, offset: int, length: int, what: str,
             into: Optional[Sequence[memoryview]] = None,
             data: Sequence[memoryview] = (), flags: int = 0) -> None:
        req = _Req(next(self._cookies), into if cmd == w.CMD_READ else None)
        self._pending[req.cookie] = req
        if self.broken is not None:
            self._pending.pop(req.cookie, None)
            raise ConnectionLost(self.broken)
        try:
            with self._send:
                w.send_all(self.sock, [w.request(cmd, req.cookie, offset, length, flags),  # type: ignore[arg-type]
                                       *data])
        except OSError as e:
            self.fail(e)
        req.sent = True
        self._wait(req)
        if req.error is not None:
            answered, code, message = req.error
            if answered:
                raise ReplyError(code, f"{what}: {message}")
            raise ConnectionLost(message)

    def _wait(self, me: _Req) -> None:
        while not me.done:
            if self._reader.acquire(blocking=False):
                try:
                    while not me.done:
                        self._read_one()
                except OSError as e:
                    self.fail(e)
                finally:
                    self._reader.release()
                    self._hand_over()
                return
            me.wake.get()  # _DONE: answered; _LEAD: the reader left, take over

    def _hand_over(self) -> None:
        """Wake a thread whose request was sent to read next. Not one still sending:
        it may be blocked in sendmsg by a server blocked on replies nobody reads.
        (A thread that finishes sending after this scan finds the token free.)"""
        for r in list(self._pending.values()):
            if r.sent and not r.done:
                r.wake.put(_LEAD)
                return

    def _read_one(self) -> None:
        error, cookie = w.read_reply_header(self.sock)  # type: ignore[arg-type]
        req = self._pending.pop(cookie, None)
        if req is None:
            raise w.ProtocolError(f"a reply for cookie {cookie}, which is not in flight")
        if error:
            e = w.reply_error(error, "the request")
            req.error = (True, e.errno or errno.EIO, e.strerror or "failed")
        elif req.views is not None:
            try:
                w.recv_views(self.sock, req.views)  # type: ignore[arg-type]
            except OSError as e:
                req.error = (False, errno.EPIPE, _why(e))
                req.done = True
                req.wake.put(_DONE)
                raise
        req.done = True
        req.wake.put(_DONE)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait (a while) until no request is in flight here."""
        deadline = time.monotonic() + timeout
        while self._pending and self.broken is None and time.monotonic() < deadline:
            time.sleep(0.005)

    def fail(self, e: OSError) -> None:
        """The connection is dead: every request in flight fails (ConnectionLost)."""
        if self.broken is None:
            self.broken = _why(e)
            try:
                self.sock.shutdown(2)  # type: ignore[attr-defined]
            except OSError:
                pass
        for cookie in list(self._pending):
            r = self._pending.pop(cookie, None)
            if r is not None and not r.done:
                r.error = (False, errno.EPIPE, self.broken)
                r.done = True
                r.wake.put(_DONE)

    def close(self) -> None:
        if self.broken is None:
            try:
                with self._send:
                    w.send_all(self.sock, [w.request(w.CMD_DISC, 0, 0, 0)])  # type: ignore[arg-type]
            except OSError:
                pass
        self.fail(w.ProtocolError(CLOSED))
        self.sock.close()  # type: ignore[attr-defined]


def _why(e: OSError) -> str:
    return e.strerror if isinstance(e, w.ProtocolError) and e.strerror else str(e)


#: opens a new connection: (socket, export) in the transmission phase; ``fresh``:
#: the previous one broke (a local server is checked and restarted first)
Connector = Callable[[bool], Tuple[object, w.Export]]


class NbdStore(Store):
    """The Store of one NBD export. ``describe``: what it is, for messages."""

    def __init__(self, connector: Connector, readonly: bool, describe: str,
                 probe: Optional[Callable[[], int]] = None, on_close: Optional[Callable[[], None]] = None) -> None:
        self.describe = describe
        self._connector = connector
        self._probe = probe
        self._on_close = on_close
        self._lock = _Token()
        self._conn: Optional[Connection] = None
        self._retry_at = 0.0
        self._closed = False
        #: connection state and counters, read by the metrics
        self.state = "connecting"
        self.reconnects = 0
        self.connection_errors = 0
        self.last_error = ""
        self.lost_writes = 0
        #: writes acknowledged so far and up to which of them a flush covered
        #: (``next`` on a count is atomic: the threads need no lock)
        self._gens = itertools.count(1)
        self._write_gen = 0
        self._flushed_gen = 0
        self._unflushed_lost = False
        conn = self._open(False)
        exp = conn.export
        self.readonly = readonly or bool(exp.flags & w.TF_READ_ONLY)
        self._flags = exp.flags
        self._size = exp.size
        self.max_payload = exp.max_block
        if exp.min_block in (1024, 2048, 4096):
            self.sector_size = self.physical_sector_size = exp.min_block
        self.discard_granularity = max(4096, exp.min_block)
        self.supports_discard = bool(exp.flags & (w.TF_SEND_TRIM | w.TF_SEND_WRITE_ZEROES))
        self.supports_secure_discard = False
        self.durable_flush = bool(exp.flags & w.TF_SEND_FLUSH)

    # -- connections ---------------------------------------------------------------
    def _open(self, fresh: bool) -> Connection:
        sock, exp = self._connector(fresh)
        conn = Connection(sock, exp)
        if self._conn is not None and exp.size != self._size:
            self._size = exp.size
        self._conn = conn
        self.state = "connected"
        return conn

    def _current(self, broken: Optional[Connection]) -> Connection:
        """The live connection; a new one when ``broken`` is still the current one."""
        conn = self._conn
        if conn is not None and conn is not broken and conn.broken is None:
            return conn
        with self._lock:
            conn = self._conn
            if conn is not None and conn is not broken and conn.broken is None:
                return conn
            if self._closed:
                raise OSError(errno.ESHUTDOWN, f"{self.describe}: closed")
            if time.monotonic() < self._retry_at:
                raise OSError(errno.EIO, f"{self.describe}: not connected ({self.last_error})")
            if conn is not None:
                conn.close()
                self._conn = None
                if self._write_gen > self._flushed_gen:
                    # acknowledged writes the server never flushed may have died with it
                    self._unflushed_lost = True
                    self.lost_writes += 1
            self.state = "reconnecting"
            try:
                new = self._open(True)
            except (OSError, Exception) as e:  # noqa: BLE001 - StorageError too
                self.state = "failed"
                self.connection_errors += 1
                self.last_error = str(e)
                self._retry_at = time.monotonic() + RECONNECT_BACKOFF
                raise OSError(errno.EIO, f"{self.describe}: cannot reconnect: {e}") from None
            self.reconnects += 1
            return new

    def _call(self, cmd: int, offset: int, length: int, what: str,
              into: Optional[Sequence[memoryview]] = None,
              data: Sequence[memoryview] = (), flags: int = 0) -> None:
        conn = self._current(None)
        for attempt in range(RETRIES + 1):
            try:
                conn.call(cmd, offset, length, what, into, data, flags)
                return
            except ReplyError:
                raise
            except OSError as e:
                if self._closed:
                    raise OSError(errno.ESHUTDOWN, f"{self.describe}: closed") from None
                conn.fail(e)
                if conn is not self._conn and conn.broken == CLOSED:
                    conn = self._current(conn)  # retired (a resize): not an error
                    continue
                self.connection_errors += 1
                self.last_error = conn.broken or _why(e)
                if attempt == RETRIES:
                    raise OSError(errno.EIO, f"{self.describe}: {what}: connection lost: "
                                  f"{self.last_error}") from None
                conn = self._current(conn)

    # -- the Store interface ----------------------------------------------------------
    def size(self) -> int:
        """The export's size; a remote export's is asked on a new connection (NBD
        tells a connection its size once, at the handshake)."""
        if self._probe is None:
            return self._size
        try:
            size = self._probe()
        except (TimeoutError, _socket.timeout):  # the same class from Python 3.10 on
            # it took the connection but not the handshake: a server that takes one
            # client at a time (qemu-nbd's default --shared=1); stop asking
            self._probe = None
            self.last_error = "the server takes no second connection: resizes not noticed"
            return self._size
        except OSError:
            return self._size  # the IO path reports a server gone; the size stays
        conn = self._conn
        if size != self._size and conn is not None and conn.broken is None:
            self._renew(conn)
        self._size = size
        return size

    def _renew(self, old: Connection) -> None:
        """The export changed size: new requests go over a new connection (the
        server checks them against the size it told it); the old one is closed
        once its requests in flight are answered."""
        with self._lock:
            if self._conn is not old:
                return
            try:
                self._open(False)
            except Exception:  # noqa: BLE001 - the old connection serves on
                return
        old.drain()
        old.close()

    def readv(self, views: Sequence[memoryview], offset: int) -> None:
        for chunk, off, n in self._chunks(views, offset):
            self._call(w.CMD_READ, off, n, "read", into=chunk)

    def writev(self, views: Sequence[memoryview], offset: int) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, f"{self.describe} is read-only")
        for chunk, off, n in self._chunks(views, offset):
            self._call(w.CMD_WRITE, off, n, "write", data=chunk)
        self._write_gen = next(self._gens)

    def _chunks(self, views: Sequence[memoryview], offset: int
                ) -> List[Tuple[Sequence[memoryview], int, int]]:
        total = sum(map(len, views))
        if total <= self.max_payload:
            return [(views, offset, total)]
        out: List[Tuple[Sequence[memoryview], int, int]] = []
        cur: List[memoryview] = []
        n = 0
        start = offset
        for v in views:
            if n + len(v) > self.max_payload and cur:
                out.append((cur, start, n))
                start += n
                cur, n = [], 0
            cur.append(v)
            n += len(v)
        out.append((cur, start, n))
        return out

    def flush(self) -> None:
        gen = self._write_gen
        if self._flags & w.TF_SEND_FLUSH and not self.readonly:
            self._call(w.CMD_FLUSH, 0, 0, "flush")
        if self._unflushed_lost:
            self._unflushed_lost = False
            raise OSError(errno.EIO, f"{self.describe}: the NBD server went away with writes "
                          "it had not flushed: they may be lost")
        self._flushed_gen = max(self._flushed_gen, gen)

    def discard(self, offset: int, length: int, secure: bool = False) -> None:
        if length <= 0:
            return
        if self.readonly:
            raise OSError(errno.EROFS, f"{self.describe} is read-only")
        # WRITE_ZEROES without NO_HOLE: the server may unmap, and reads give zeros
        # (as a punched hole of a raw file); else TRIM
        cmd = w.CMD_WRITE_ZEROES if self._flags & w.TF_SEND_WRITE_ZEROES else w.CMD_TRIM
        if not self._flags & (w.TF_SEND_TRIM | w.TF_SEND_WRITE_ZEROES):
            raise OSError(errno.EOPNOTSUPP, f"{self.describe}: no discard")
        end = offset + length
        while offset < end:
            n = min(TRIM_CHUNK, end - offset)
            self._call(cmd, offset, n, "discard")
            offset += n
        self._write_gen = next(self._gens)

    def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self.state = "closed"
        if self._on_close is not None:
            self._on_close()

    def metrics(self) -> Dict[str, object]:
        return {"state": self.state, "reconnects": self.reconnects,
                "connection_errors": self.connection_errors, "lost_writes": self.lost_writes,
                "last_error": self.last_error}


def remote_store(uri: str, readonly: bool, connect_timeout: float = 10.0,
                 io_timeout: float = 30.0) -> NbdStore:
    """``params=nbd:<uri>``: someone else's export."""
    addr = w.parse_uri(uri)

    def connector(fresh: bool) -> Tuple[object, w.Export]:
        return open_connection(addr, connect_timeout, io_timeout)

    def probe() -> int:
        s = w.connect(addr, PROBE_TIMEOUT)
        try:
            return w.handshake(s, addr.export, info_only=True).size
        finally:
            s.close()

    return NbdStore(connector, readonly, f"NBD {addr}", probe=probe)


def open_connection(addr: w.Address, connect_timeout: float, io_timeout: float
                    ) -> Tuple[object, w.Export]:
    s = w.connect(addr, connect_timeout)
    try:
        exp = w.handshake(s, addr.export)
        s.settimeout(io_timeout)
    except BaseException:
        s.close()
        raise
    return s, exp
