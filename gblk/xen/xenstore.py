"""gblk's XenStore client: :class:`GeventXenStore`, ``gblk.xen.interfaces.XenStore``
for greenlets, over the wire format of ``gblk.xen.xs_wire``.

One connection per daemon, whatever the number of disks: requests are matched to
their replies by ``req_id``, so any number of greenlets may have a request, a
transaction or a watch on it at once. The connection is a Unix socket to xenstored
or the xenbus device (``/dev/xen/xenbus``: a driver domain, or dom0 with xenstored
in a stub domain), chosen as libxenstore does (``xs_wire.default_targets``). A
reader greenlet waits on it through the gevent hub (epoll): no thread, no
``select()``, no monkey-patching needed, any file descriptor number.

The safeguards listed in docs/protocol.md §9 live here and only here:

- every request has a timeout and raises ``XenStoreError`` (``errno_name``
  ``ETIMEDOUT``) instead of hanging when xenstored stops answering (the connection
  is then dropped: a late reply could not be told from a new one);
- when xenstored goes away the connection is re-established (a request retries once
  on a lost connection) and every watch is re-armed, so a ``WatchSubscription``
  survives a xenstored restart (the re-armed watch fires its initial event: readers
  re-read the current state);
- ``transaction()`` retries on EAGAIN; at most ``MAX_TRANSACTIONS`` are open at
  once on the connection (xenstored's per-connection quota is 10 by default);
- empty and binary values are sent as they are (surrogateescape round trip);
- watch events are kept per subscription as a bounded set of paths (coalescing);
  on overflow the set collapses to the watched paths themselves ("re-read all");
- every socket and protocol error becomes ``gblk.errors.XenStoreError`` whose
  ``errno_name`` is xenstored's error name (ENOENT, EACCES, EAGAIN, E2BIG...) or
  the socket errno name; ``XenUnavailable`` when no XenStore can be reached at all.

Not thread-safe: use from the hub's greenlets only.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import gevent
import gevent.event
import gevent.lock
import gevent.os
import gevent.socket
from gevent import Greenlet

from gblk.errors import XenStoreError, XenUnavailable
from gblk.xen import xs_wire as w
from gblk.xen.interfaces import WatchSubscription, XenStore, XenStoreOps

log = logging.getLogger(__name__)

#: transactions open at once on the connection (C xenstored allows 10 per connection)
MAX_TRANSACTIONS = 8
_READ_CHUNK = 64 * 1024

_NUL = b"\0"
_ENC = "utf-8"
_ENC_ERRORS = "surrogateescape"  # any bytes a guest wrote survive a read/write round trip


class _LinkDown(XenStoreError):
    """The connection failed (lost, timed out, refused), not the request."""


_LOST = object()  # what a pending request receives when its connection dies
_Reply = Tuple[int, int, bytes]  # type, tx_id, payload


def _b(text: str) -> bytes:
    return text.encode(_ENC, _ENC_ERRORS)


def _s(data: bytes) -> str:
    return data.decode(_ENC, _ENC_ERRORS)


def _errno_name(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        return errno.errorcode[code]
    return "EIO"


class _Link:
    """One connection to xenstored and the greenlet that reads it.

    Replies go to the request waiting with their ``req_id``; watch events to
    ``on_event(path, token)``. When the connection ends every waiting request gets
    ``_LOST`` and ``on_lost(self)`` runs (unless it was closed on purpose).
    """

    def __init__(self, kind: str, path: str, timeout: float,
                 on_event: Callable[[bytes, bytes], None],
                 on_lost: Callable[["_Link"], None]) -> None:
        self.path = path
        self.timeout = timeout
        self.alive = True
        self.closing = False
        self._on_event = on_event
        self._on_lost = on_lost
        self._sock: Optional[gevent.socket.socket] = None
        self._fd: Optional[int] = None
        self._pending: Dict[int, gevent.event.AsyncResult] = {}
        # our ids, wrapping in the u32 field; 0 is never used
        self._ids = itertools.count(1)
        self._send_lock = gevent.lock.Semaphore()  # one whole message at a time
        try:
            if kind == w.UNIX:
                sock = gevent.socket.socket(gevent.socket.AF_UNIX, gevent.socket.SOCK_STREAM)
                sock.settimeout(timeout)
                try:
                    sock.connect(path)
                except BaseException:
                    sock.close()
                    raise
                sock.settimeout(None)
                self._sock = sock
            else:
                # the xenbus device takes and gives whole messages and can be polled
                self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except gevent.socket.timeout as e:
            raise _LinkDown(f"connecting to {path}: timed out", "ETIMEDOUT") from e
        except OSError as e:
            raise _LinkDown(f"connecting to {path}: {e.strerror or e}", _errno_name(e)) from e
        self._reader = gevent.spawn(self._read_loop)

    def fileno(self) -> int:
        if self._sock is not None:
            return int(self._sock.fileno())
        assert self._fd is not None
        return self._fd

    # -- reading -----------------------------------------------------------------------
    def _recv(self) -> bytes:
        if self._sock is not None:
            return bytes(self._sock.recv(_READ_CHUNK))
        assert self._fd is not None
        return bytes(gevent.os.nb_read(self._fd, _READ_CHUNK))

    def _read_loop(self) -> None:
        buf = b""
        why = "closed by xenstored"
        try:
            while True:
                chunk = self._recv()
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= w.HEADER.size:
                    mtype, req_id, tx_id, size = w.unpack_header(buf[:w.HEADER.size])
                    if size > w.XENSTORE_PAYLOAD_MAX:
                        raise XenStoreError(f"message of {size} bytes from xenstored", "EIO")
                    end = w.HEADER.size + size
                    if len(buf) < end:
                        break
                    payload, buf = buf[w.HEADER.size:end], buf[end:]
                    self._dispatch(mtype, req_id, tx_id, payload)
        except (OSError, XenStoreError) as e:
            why = str(e)
        finally:
            if not self.closing:
                log.info("xenstore connection to %s lost: %s", self.path, why)
            self._fail_pending()
            self._release()
            if not self.closing:
                self._on_lost(self)

    def _dispatch(self, mtype: int, req_id: int, tx_id: int, payload: bytes) -> None:
        if mtype == w.XS_WATCH_EVENT:
            event = w.parse_watch_event(payload)
            if event is not None:
                self._on_event(*event)
            return
        waiter = self._pending.pop(req_id, None)
        if waiter is not None:  # else the answer to a request that timed out
            waiter.set((mtype, tx_id, payload))

    def _fail_pending(self) -> None:
        self.alive = False
        waiters = list(self._pending.values())
        self._pending.clear()
        for waiter in waiters:
            waiter.set(_LOST)

    def _release(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Idempotent: stops the reader, fails what waits, closes the connection."""
        if self.closing:
            return
        self.closing = True
        self.alive = False
        if self._reader is not gevent.getcurrent():
            self._reader.kill(block=True)
        self._fail_pending()
        self._release()

    # -- requests ----------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        with self._send_lock:
            if self._sock is not None:
                self._sock.sendall(data)
                return
            view = memoryview(data)
            while view:
                if self._fd is None:
                    raise OSError(errno.EBADF, "connection closed")
                view = view[gevent.os.nb_write(self._fd, view):]

    def _send_batch(self, messages: List[bytes]) -> None:
        """Several whole messages: one write on a socket; on the xenbus device one
        message per write (it takes exactly one message per write)."""
        if self._sock is not None:
            with self._send_lock:
                self._sock.sendall(b"".join(messages))
            return
        for message in messages:
            self._send(message)

    def request_many(self, requests: Sequence[Tuple[int, bytes, str]],
                     tx_id: int = 0) -> List[object]:
        """Pipelined ``request``: every (op, payload, what) is sent before the first
        reply is awaited, under one timeout. Per request, in order, the reply payload
        (bytes) or the XenStoreError of its error reply; _LinkDown as ``request``."""
        for _op, payload, what in requests:
            if len(payload) > w.XENSTORE_PAYLOAD_MAX:
                raise XenStoreError(f"{what}: request larger than {w.XENSTORE_PAYLOAD_MAX} "
                                    "bytes", "E2BIG")
        if not self.alive:
            raise _LinkDown(f"{requests[0][2]}: connection to {self.path} lost", "EIO")
        ids: List[int] = []
        waiters: List[gevent.event.AsyncResult] = []
        messages: List[bytes] = []
        for op, payload, _what in requests:
            req_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
            waiter = gevent.event.AsyncResult()
            self._pending[req_id] = waiter
            ids.append(req_id)
            waiters.append(waiter)
            messages.append(w.pack(op, req_id, tx_id, payload))
        timer = gevent.Timeout(self.timeout)
        timer.start()
        try:
            self._send_batch(messages)
            replies = [waiter.get() for waiter in waiters]
        except gevent.Timeout as e:
            if e is not timer:
                raise
            self._forget_ids(ids)
            self.close()
            raise _LinkDown(f"{requests[0][2]} (and {len(requests) - 1} more): no answer "
                            f"from xenstored ({self.path}) in {self.timeout:g} s",
                            "ETIMEDOUT") from None
        except OSError as e:
            self._forget_ids(ids)
            self.close()
            raise _LinkDown(f"{requests[0][2]}: {e}", _errno_name(e)) from e
        finally:
            timer.close()
        out: List[object] = []
        for (op, _payload, what), reply in zip(requests, replies):
            try:
                out.append(self._check(reply, op, tx_id, what))
            except _LinkDown:
                raise
            except XenStoreError as e:
                out.append(e)
        return out

    def _forget_ids(self, ids: Sequence[int]) -> None:
        for req_id in ids:
            self._pending.pop(req_id, None)

    def _check(self, reply: object, op: int, tx_id: int, what: str) -> bytes:
        """The payload of a good reply; XenStoreError for an error reply, _LinkDown
        (and the connection closed) for a lost connection or a reply of the wrong kind."""
        if reply is _LOST:
            raise _LinkDown(f"{what}: connection to {self.path} lost", "EIO")
        assert isinstance(reply, tuple)
        mtype, reply_tx, body = reply
        if mtype == w.XS_ERROR:
            name = w.error_name(body)
            raise XenStoreError(f"{what}: {name}", name)
        if mtype != op or reply_tx != tx_id:
            self.close()
            raise _LinkDown(f"{what}: unexpected reply type {mtype}", "EIO")
        return bytes(body)

    def request(self, op: int, payload: bytes, tx_id: int = 0, what: str = "") -> bytes:
        """Send one request and return the reply payload.

        XenStoreError(errno_name=<xenstored's error>) for an error reply;
        _LinkDown for a lost, broken or timed-out connection (then closed).
        """
        if len(payload) > w.XENSTORE_PAYLOAD_MAX:
            raise XenStoreError(f"{what}: request larger than {w.XENSTORE_PAYLOAD_MAX} bytes",
                                "E2BIG")
        if not self.alive:
            raise _LinkDown(f"{what}: connection to {self.path} lost", "EIO")
        req_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        waiter = gevent.event.AsyncResult()
        self._pending[req_id] = waiter
        timer = gevent.Timeout(self.timeout)
        timer.start()
        try:
            self._send(w.pack(op, req_id, tx_id, payload))
            reply = waiter.get()
        except gevent.Timeout as e:
            if e is not timer:
                raise
            self._pending.pop(req_id, None)
            self.close()
            raise _LinkDown(f"{what}: no answer from xenstored ({self.path}) in "
                            f"{self.timeout:g} s", "ETIMEDOUT") from None
        except OSError as e:
            self._pending.pop(req_id, None)
            self.close()
            raise _LinkDown(f"{what}: {e}", _errno_name(e)) from e
        finally:
            timer.close()
        return self._check(reply, op, tx_id, what)


class _Ops(XenStoreOps):
    """The node operations over ``_req`` (plain connection or transaction)."""

    def _req(self, op: int, payload: bytes, what: str) -> bytes:
        raise NotImplementedError

    def _req_many(self, requests: Sequence[Tuple[int, bytes, str]]) -> List[object]:
        """``_Link.request_many`` on this connection or transaction."""
        raise NotImplementedError

    def read_many(self, paths: Sequence[str]) -> List[Optional[str]]:
        """Pipelined: every read sent before the first answer is awaited."""
        if not paths:
            return []
        replies = self._req_many([(w.XS_READ, _b(p) + _NUL, f"read {p}") for p in paths])
        out: List[Optional[str]] = []
        for reply in replies:
            if isinstance(reply, XenStoreError):
                if reply.errno_name == w.ENOENT:
                    out.append(None)
                    continue
                raise reply
            assert isinstance(reply, bytes)
            out.append(_s(reply))
        return out

    def write_many(self, items: Sequence[Tuple[str, str]]) -> None:
        """Pipelined, in order (xenstored answers a connection's requests in order);
        the first error reply raises, after every write was answered."""
        if not items:
            return
        replies = self._req_many([(w.XS_WRITE, _b(p) + _NUL + _b(v), f"write {p}")
                                  for p, v in items])
        for reply in replies:
            if isinstance(reply, XenStoreError):
                raise reply

    def read(self, path: str) -> Optional[str]:
        try:
            return _s(self._req(w.XS_READ, _b(path) + _NUL, f"read {path}"))
        except _LinkDown:
            raise
        except XenStoreError as e:
            if e.errno_name == w.ENOENT:
                return None
            raise

    def write(self, path: str, value: str) -> None:
        self._req(w.XS_WRITE, _b(path) + _NUL + _b(value), f"write {path}")

    def mkdir(self, path: str) -> None:
        self._req(w.XS_MKDIR, _b(path) + _NUL, f"mkdir {path}")

    def rm(self, path: str) -> None:
        try:
            self._req(w.XS_RM, _b(path) + _NUL, f"rm {path}")
        except _LinkDown:
            raise
        except XenStoreError as e:
            if e.errno_name != w.ENOENT:
                raise

    def directory(self, path: str) -> List[str]:
        try:
            data = self._req(w.XS_DIRECTORY, _b(path) + _NUL, f"directory {path}")
        except _LinkDown:
            raise
        except XenStoreError as e:
            if e.errno_name == w.ENOENT:
                return []
            if e.errno_name != w.E2BIG:
                raise
            data = self._directory_part(path)
        return [_s(c) for c in w.strings(data)]

    def _directory_part(self, path: str) -> bytes:
        """A listing too large for one reply, fetched in parts (as libxenstore does)."""
        for _ in range(16):
            gen: Optional[bytes] = None
            chunks: List[bytes] = []
            offset = 0
            while True:
                reply = self._req(w.XS_DIRECTORY_PART, _b(path) + _NUL + str(offset).encode()
                                  + _NUL, f"directory {path}")
                this_gen, _, rest = reply.partition(_NUL)
                if gen is None:
                    gen = this_gen
                elif this_gen != gen:
                    break  # changed meanwhile: start again
                if rest in (b"", _NUL):
                    return b"".join(chunks)
                if rest.endswith(_NUL + _NUL):
                    chunks.append(rest[:-1])
                    return b"".join(chunks)
                chunks.append(rest)
                offset += len(rest)
        raise XenStoreError(f"directory {path}: kept changing while being listed", "EAGAIN")

    def set_perms(self, path: str, perms: Sequence[str]) -> None:
        payload = _b(path) + _NUL + b"".join(_b(p) + _NUL for p in perms)
        self._req(w.XS_SET_PERMS, payload, f"set_perms {path}")

    def get_perms(self, path: str) -> List[str]:
        data = self._req(w.XS_GET_PERMS, _b(path) + _NUL, f"get_perms {path}")
        return [_s(p) for p in w.strings(data)]


class _TransactionOps(_Ops):
    """Operations inside one transaction, valid only while ``fn`` runs."""

    def __init__(self, link: _Link, tx_id: int) -> None:
        self._link = link
        self.tx_id = tx_id
        self.valid = True

    def _req(self, op: int, payload: bytes, what: str) -> bytes:
        if not self.valid:
            raise XenStoreError(f"{what}: transaction {self.tx_id} is over", "EINVAL")
        return self._link.request(op, payload, self.tx_id, what)

    def _req_many(self, requests: Sequence[Tuple[int, bytes, str]]) -> List[object]:
        if not self.valid:
            raise XenStoreError(f"{requests[0][2]}: transaction {self.tx_id} is over", "EINVAL")
        return self._link.request_many(requests, self.tx_id)


class _Subscription(WatchSubscription):
    """Watches on ``paths`` under one token; pending events as a bounded set."""

    def __init__(self, store: "GeventXenStore", token: bytes, paths: Sequence[str],
                 max_pending: int) -> None:
        self._store = store
        self.token = token
        self.paths = list(paths)
        self._max = max(max_pending, len(self.paths), 1)
        self._pending: Dict[str, None] = {}
        self._ready = gevent.event.Event()
        self._closed = False
        self.link: Optional[_Link] = None

    def put(self, path: str) -> None:
        """One event (from the connection's reader)."""
        if self._closed:
            return
        if path not in self._pending and len(self._pending) >= self._max:
            # Coalesce harder: "something under each watched path changed".
            self._pending.clear()
            for p in self.paths:
                self._pending[p] = None
        self._pending[path] = None
        self._ready.set()

    def arm(self, link: _Link) -> None:
        """Register the watches on ``link``; ignores paths already registered."""
        for path in self.paths:
            try:
                link.request(w.XS_WATCH, _b(path) + _NUL + self.token + _NUL, 0,
                             f"watch {path}")
            except _LinkDown:
                raise
            except XenStoreError as e:
                if e.errno_name != w.EEXIST:
                    raise
        self.link = link

    # consumer side ----------------------------------------------------------
    def get(self, timeout: Optional[float] = None) -> Optional[str]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._pending:
                path = next(iter(self._pending))
                del self._pending[path]
                return path
            if self._closed:
                return None
            self._ready.clear()
            remaining = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
            if not self._ready.wait(remaining):
                return None

    def pending(self) -> int:
        """How many distinct paths wait to be read."""
        return len(self._pending)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._ready.set()
        self._store._forget(self)
        link, self.link = self.link, None
        if link is not None and link.alive:
            for path in self.paths:
                try:
                    link.request(w.XS_UNWATCH, _b(path) + _NUL + self.token + _NUL, 0,
                                 f"unwatch {path}")
                except XenStoreError:
                    break


class GeventXenStore(_Ops, XenStore):
    """XenStore for the hub on one multiplexed connection (see the module docstring).

    ``socket_path`` None means real Xen's resolution ($XENSTORED_PATH, the rundir
    socket, then /dev/xen/xenbus). Connects at once: ``XenUnavailable`` if nothing
    answers. ``connections`` counts connections made (the first and every
    reconnection), ``watch_events`` the watch events received;
    ``on_connect``/``on_watch_event`` are called for each.
    """

    def __init__(self, socket_path: Optional[str] = None, timeout: float = 10.0, *,
                 max_pending: int = 1024,
                 on_connect: Optional[Callable[[], None]] = None,
                 on_watch_event: Optional[Callable[[], None]] = None) -> None:
        self.timeout = timeout
        self.max_pending = max_pending
        self.connections = 0
        self.watch_events = 0
        self._on_connect = on_connect
        self._on_watch_event = on_watch_event
        self._targets = [(w.UNIX, socket_path)] if socket_path else w.default_targets()
        self._link: Optional[_Link] = None
        self._lock = gevent.lock.RLock()
        self._transactions = gevent.lock.BoundedSemaphore(MAX_TRANSACTIONS)
        self._subs: Dict[bytes, _Subscription] = {}
        self._tokens = itertools.count(1)
        self._reconnector: Optional[Greenlet] = None
        self._closed = False
        self._last_errors: List[Tuple[str, str]] = []
        try:
            self._ensure()
        except _LinkDown as e:
            tried = "; ".join(f"{t} ({err})" for t, err in self._last_errors)
            raise XenUnavailable(f"{w.NO_XENSTORE_HINT}. Tried {tried}") from e

    def fileno(self) -> Optional[int]:
        """The connection's file descriptor (None while disconnected)."""
        link = self._link
        return link.fileno() if link is not None and link.alive else None

    # connections -------------------------------------------------------------

    def _open(self) -> _Link:
        errors: List[Tuple[str, str]] = []
        last: Optional[_LinkDown] = None
        for kind, path in self._targets:
            try:
                return _Link(kind, path, self.timeout, self._event, self._lost)
            except _LinkDown as e:
                errors.append((path, str(e).split(": ", 1)[-1]))
                last = e
        self._last_errors = errors
        assert last is not None
        raise _LinkDown(
            "cannot reach xenstored: " + "; ".join(f"{p}: {err}" for p, err in errors),
            last.errno_name,
        )

    def _ensure(self) -> _Link:
        link = self._link
        if link is not None and link.alive:
            return link
        with self._lock:
            link = self._link
            if link is not None and link.alive:
                return link
            if self._closed:
                raise XenStoreError("xenstore connection closed", "EBADF")
            link = self._open()
            self._link = link
            self.connections += 1
            if self._on_connect is not None:
                try:
                    self._on_connect()
                except Exception:
                    log.exception("on_connect callback failed")
            for sub in list(self._subs.values()):
                try:
                    sub.arm(link)
                except _LinkDown:
                    self._discard(link)
                    raise
                except XenStoreError as e:
                    log.warning("cannot re-arm watch %s: %s", sub.paths, e)
            return link

    def _discard(self, link: _Link) -> None:
        link.close()
        if self._link is link:
            self._link = None
            self._kick()

    def _lost(self, link: _Link) -> None:
        if self._link is link:
            self._link = None
            self._kick()

    def _kick(self) -> None:
        """Reconnect in the background when watches wait for events."""
        if self._closed or not self._subs:
            return
        if self._reconnector is not None and not self._reconnector.dead:
            return
        self._reconnector = gevent.spawn(self._reconnect_loop)

    def _reconnect_loop(self) -> None:
        delay = 0.05
        while not self._closed and self._subs:
            try:
                self._ensure()
                return
            except XenStoreError as e:
                log.debug("xenstore reconnect failed: %s", e)
            gevent.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _req(self, op: int, payload: bytes, what: str) -> bytes:
        for attempt in (0, 1):
            link = self._ensure()
            try:
                return link.request(op, payload, 0, what)
            except _LinkDown as e:
                self._discard(link)
                if attempt or e.errno_name == "ETIMEDOUT":
                    raise
        raise AssertionError("unreachable")

    def _req_many(self, requests: Sequence[Tuple[int, bytes, str]]) -> List[object]:
        # reads and writes only (idempotent): the whole batch is sent again once on a
        # lost connection, as ``_req`` does for one request
        for attempt in (0, 1):
            link = self._ensure()
            try:
                return link.request_many(requests)
            except _LinkDown as e:
                self._discard(link)
                if attempt or e.errno_name == "ETIMEDOUT":
                    raise
        raise AssertionError("unreachable")

    def _event(self, path: bytes, token: bytes) -> None:
        """A watch event from the connection's reader: must not raise."""
        self.watch_events += 1
        if self._on_watch_event is not None:
            try:
                self._on_watch_event()
            except Exception:
                log.exception("on_watch_event callback failed")
        sub = self._subs.get(token)
        if sub is not None:
            sub.put(_s(path))

    def _forget(self, sub: _Subscription) -> None:
        self._subs.pop(sub.token, None)

    # XenStore ------------------------------------------------------------------

    def transaction(self, fn: Callable[[XenStoreOps], object], retries: int = 16) -> object:
        with self._transactions:
            for _attempt in range(retries + 1):
                link = self._ensure()
                try:
                    return self._attempt(link, fn)
                except _LinkDown:
                    self._discard(link)
                    raise
                except XenStoreError as e:
                    if e.errno_name != w.EAGAIN:
                        raise
            raise XenStoreError(f"transaction still conflicting after {retries} retries",
                                "EAGAIN")

    @staticmethod
    def _attempt(link: _Link, fn: Callable[[XenStoreOps], object]) -> object:
        """One try: ``fn`` inside a transaction, committed if it returns."""
        reply = link.request(w.XS_TRANSACTION_START, _NUL, 0, "transaction start")
        try:
            tx_id = int(reply.rstrip(_NUL))
        except ValueError:
            raise XenStoreError(f"transaction start: bad id {reply!r}", "EIO") from None
        tx = _TransactionOps(link, tx_id)
        try:
            result = fn(tx)
        except BaseException:
            tx.valid = False
            if link.alive:
                try:
                    link.request(w.XS_TRANSACTION_END, b"F" + _NUL, tx_id, "transaction abort")
                except XenStoreError:
                    pass
            raise
        tx.valid = False
        link.request(w.XS_TRANSACTION_END, b"T" + _NUL, tx_id, "transaction commit")
        return result

    def watch(self, paths: Sequence[str]) -> WatchSubscription:
        token = b"gblk-%d" % next(self._tokens)
        sub = _Subscription(self, token, paths, self.max_pending)
        self._subs[token] = sub  # before XS_WATCH: its first event may precede the reply
        try:
            link = self._ensure()  # a reconnection arms ``sub`` already
            if sub.link is not link:
                sub.arm(link)
        except _LinkDown:
            self._kick()  # armed when xenstored is back
        except BaseException:
            sub.close()
            raise
        return sub

    def get_domain_path(self, domid: int) -> str:
        data = self._req(w.XS_GET_DOMAIN_PATH, str(domid).encode() + _NUL,
                         f"get_domain_path {domid}")
        return _s(data.rstrip(_NUL))

    def introduce_domain(self, domid: int, mfn: int, port: int) -> None:
        """XS_INTRODUCE (toolstack use)."""
        payload = b"".join(str(x).encode() + _NUL for x in (domid, mfn, port))
        self._req(w.XS_INTRODUCE, payload, f"introduce {domid}")

    def release_domain(self, domid: int) -> None:
        """XS_RELEASE (toolstack use): xenstored fires @releaseDomain."""
        self._req(w.XS_RELEASE, str(domid).encode() + _NUL, f"release {domid}")

    def is_domain_introduced(self, domid: int) -> bool:
        data = self._req(w.XS_IS_DOMAIN_INTRODUCED, str(domid).encode() + _NUL,
                         f"is_domain_introduced {domid}")
        return data.rstrip(_NUL) == b"T"

    def close(self) -> None:
        if self._closed:
            return
        for sub in list(self._subs.values()):
            sub.close()
        self._closed = True
        if self._reconnector is not None:
            self._reconnector.kill(block=False)
        link, self._link = self._link, None
        if link is not None:
            link.close()
