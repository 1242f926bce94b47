"""gblk's XenStore client: :class:`PyxsXenStore`, ``gblk.xen.interfaces.XenStore``
over pyxs 0.4.1, for greenlets.

The safeguards listed in docs/protocol.md §9 live here and only here:

- every request has a timeout (``gevent.Timeout``) and raises ``XenStoreError``
  (``errno_name`` ``ETIMEDOUT``) instead of hanging when xenstored stops answering;
- when xenstored goes away the connection is re-established (a request retries once
  on a lost connection) and every watch is re-armed, so a ``WatchSubscription``
  survives a xenstored restart (the re-armed watch fires its initial event: readers
  re-read the current state);
- each ``transaction()`` runs on a connection of its own and is retried on EAGAIN;
- empty values, and values pyxs 0.4.1 would refuse, are sent as raw packets through
  pyxs's router (``Client.write`` raises ValueError on them);
- watch events are kept per subscription as a bounded set of paths (coalescing);
  on overflow the set collapses to the watched paths themselves ("re-read all");
- every pyxs, socket and protocol error becomes ``gblk.errors.XenStoreError`` whose
  ``errno_name`` is xenstored's error name (ENOENT, EACCES, EAGAIN, E2BIG...) or
  the socket errno name; ``XenUnavailable`` when no XenStore can be reached at all.

pyxs runs its router in a "thread": the process must have run
``gevent.monkey.patch_all(queue=False)`` (entry points do; this module never
patches) so that the router is a greenlet. pyxs is imported lazily, on first use,
for the same reason. Not thread-safe: use from the hub's greenlets only.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gevent
import gevent.event
import gevent.lock
from gevent import Greenlet

from gblk.errors import XenError, XenStoreError, XenUnavailable
from gblk.xen.interfaces import WatchSubscription, XenStore, XenStoreOps
from gblk.xen.xs_simple import (  # the wire constants and where xenstored lives: one place
    NO_XENSTORE_HINT,
    DEFAULT_RUNDIR,
    XENBUS_PATHS,
    XENSTORE_PAYLOAD_MAX,
    XS_ERROR,
    XS_READ,
    XS_WRITE,
)

log = logging.getLogger(__name__)

# Message types (xen/io/xs_wire.h)
XS_DIRECTORY = 1
XS_GET_PERMS = 3
XS_WATCH = 4
XS_UNWATCH = 5
XS_TRANSACTION_START = 6
XS_TRANSACTION_END = 7
XS_INTRODUCE = 8
XS_RELEASE = 9
XS_GET_DOMAIN_PATH = 10
XS_MKDIR = 12
XS_RM = 13
XS_SET_PERMS = 14
XS_IS_DOMAIN_INTRODUCED = 17
XS_DIRECTORY_PART = 22

_NUL = b"\0"
_ENC = "utf-8"
_ENC_ERRORS = "surrogateescape"  # any bytes a guest wrote survive a read/write round trip



class _LinkDown(XenStoreError):
    """The connection failed (lost, timed out, refused), not the request."""


_LOST = object()  # what a pending request receives when its connection dies


def _b(text: str) -> bytes:
    return text.encode(_ENC, _ENC_ERRORS)


def _s(data: bytes) -> str:
    return data.decode(_ENC, _ENC_ERRORS)


def _errno_name(exc: BaseException) -> str:
    """The errno name of ``exc`` or of the OSError that caused it (pyxs wraps them)."""
    seen: Optional[BaseException] = exc
    while seen is not None:
        code = getattr(seen, "errno", None)
        if isinstance(code, int) and code in errno.errorcode:
            return errno.errorcode[code]
        if isinstance(seen, OSError) and seen.args and isinstance(seen.args[0], int):
            return errno.errorcode.get(seen.args[0], "EIO")
        seen = seen.__cause__ or seen.__context__
    return "EIO"


def _describe(exc: BaseException) -> str:
    """A short reason: the strerror of the OSError behind ``exc`` if there is one."""
    seen: Optional[BaseException] = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(exc)


def _require_gevent_patching() -> None:
    from gevent import monkey

    missing = [m for m in ("socket", "select", "threading") if not monkey.is_module_patched(m)]
    if missing:
        raise XenError(
            "PyxsXenStore needs gevent.monkey.patch_all(queue=False) at the start of the "
            f"process, before pyxs is imported (not patched: {', '.join(missing)})"
        )


def _pyxs() -> Any:
    import pyxs  # noqa: F401 - imported lazily: only after monkey-patching
    import pyxs._internal
    import pyxs.connection

    return pyxs


def _any_type_connection(base: Any) -> Any:
    """``base`` (a pyxs connection class) receiving messages of any type.

    pyxs 0.4.1 builds every incoming message with ``Packet(...)``, which rejects
    types newer than pyxs (XS_DIRECTORY_PART's reply): its router would die.
    """
    pyxs = _pyxs()
    packet = pyxs._internal.Packet

    class AnyTypeConnection(base):
        def recv(self) -> Any:
            if not self.is_connected:
                raise pyxs.ConnectionError("not connected")
            try:
                header = self.transport.recv(packet._struct.size)
                op, rq_id, tx_id, size = packet._struct.unpack(header)
                # A zero-length read would block on the xenbus device.
                payload = self.transport.recv(size) if size else b""
            except OSError as e:
                self.close()
                raise pyxs.ConnectionError(f"error while reading from {self.path!r}: {e}") from e
            return packet._make((op, rq_id, tx_id, size, payload))

    return AnyTypeConnection


class _Target:
    """Where to reach xenstored: a Unix socket or the xenbus device."""

    def __init__(self, kind: str, path: str) -> None:
        self.kind = kind
        self.path = path

    def connection(self) -> Any:
        conn = _pyxs().connection
        base = conn.UnixSocketConnection if self.kind == "unix" else conn.XenBusConnection
        return _any_type_connection(base)(self.path)

    def __str__(self) -> str:
        return self.path


def default_targets() -> List[_Target]:
    """Where libxenstore looks: $XENSTORED_PATH or $XENSTORED_RUNDIR/socket (default
    /var/run/xenstored/socket), then the xenbus device."""
    sock = os.environ.get("XENSTORED_PATH") or os.path.join(
        os.environ.get("XENSTORED_RUNDIR", DEFAULT_RUNDIR), "socket"
    )
    targets = [_Target("unix", sock)]
    for path in XENBUS_PATHS:
        if os.path.exists(path) or path == XENBUS_PATHS[0]:
            targets.append(_Target("xenbus", path))
    return targets


class _Link:
    """One xenstored connection: a pyxs Router whose reader runs in a greenlet we
    own, so that its death is noticed (pending requests fail at once)."""

    def __init__(self, target: _Target, timeout: float,
                 on_lost: Optional[Callable[["_Link"], None]] = None) -> None:
        pyxs = _pyxs()
        self.target = target
        self.timeout = timeout
        self.alive = True
        self.closing = False
        self._on_lost = on_lost
        self._packet = pyxs._internal.Packet
        # Our own ids: pyxs's global counter outgrows the u32 req_id field.
        self._rq_ids = itertools.count(1)
        self.router = pyxs.Router(target.connection())
        # Replace pyxs's router thread by one whose end we see (monkey-patched:
        # a greenlet).
        self.router.thread = threading.Thread(target=self._run, daemon=True)
        try:
            with gevent.Timeout(timeout):
                self.router.start()
        except gevent.Timeout as e:
            self._dispose()
            raise _LinkDown(f"connecting to {target}: timed out", "ETIMEDOUT") from e
        except (pyxs.PyXSError, OSError) as e:
            self._dispose()
            raise _LinkDown(f"connecting to {target}: {e}", _errno_name(e)) from e

    def _dispose(self) -> None:
        self.alive = False
        for s in (self.router.r_terminator, self.router.w_terminator):
            s.close()
        try:
            self.router.connection.close()
        except Exception:  # noqa: BLE001 - best effort on a failed connect
            pass

    def _run(self) -> None:
        try:
            self.router()
        except Exception as e:  # noqa: BLE001 - pyxs raises ConnectionError & co.
            if not self.closing:
                log.info("xenstore connection to %s lost: %s", self.target, e)
        finally:
            self._fail_pending()
            if not self.closing and self._on_lost is not None:
                self._on_lost(self)

    def _fail_pending(self) -> None:
        self.alive = False
        rvars = list(self.router.rvars.values())
        self.router.rvars.clear()
        for rvar in rvars:
            rvar.set(_LOST)

    def close(self) -> None:
        """Idempotent; wakes a router blocked mid-message by shutting the socket."""
        if self.closing:
            return
        self.closing = True
        transport = getattr(self.router.connection, "transport", None)
        sock = getattr(transport, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            with gevent.Timeout(1.0, False):
                self.router.terminate()
        except Exception:  # noqa: BLE001 - the connection is going anyway
            pass
        self._fail_pending()

    def request(self, op: int, payload: bytes, tx_id: int = 0, what: str = "") -> bytes:
        """Send one request and return the reply payload.

        XenStoreError(errno_name=<xenstored's error>) for an error reply;
        _LinkDown for a lost, broken or timed-out connection (then closed).
        """
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            raise XenStoreError(f"{what}: request larger than {XENSTORE_PAYLOAD_MAX} bytes",
                                "E2BIG")
        if not self.alive or self.closing:
            raise _LinkDown(f"{what}: connection to {self.target} lost", "EIO")
        rq_id = next(self._rq_ids) & 0xFFFFFFFF
        # _make skips pyxs's checks (7-bit payloads, known ops): payloads may be
        # empty or binary, and XS_DIRECTORY_PART is newer than pyxs.
        packet = self._packet._make((op, rq_id, tx_id, len(payload), payload))
        timer = gevent.Timeout(self.timeout)
        timer.start()
        try:
            rvar = self.router.send(packet)
            reply = rvar.get()
        except gevent.Timeout as e:
            if e is not timer:
                raise
            self.router.rvars.pop(rq_id, None)
            self.close()
            raise _LinkDown(f"{what}: no answer from xenstored ({self.target}) in "
                            f"{self.timeout:g} s", "ETIMEDOUT") from None
        except Exception as e:  # noqa: BLE001 - pyxs ConnectionError, OSError
            self.close()
            raise _LinkDown(f"{what}: {e}", _errno_name(e)) from e
        finally:
            timer.close()
        if reply is _LOST:
            raise _LinkDown(f"{what}: connection to {self.target} lost", "EIO")
        if reply.op == XS_ERROR:
            name = reply.payload.split(_NUL, 1)[0].decode("ascii", "replace") or "EIO"
            raise XenStoreError(f"{what}: {name}", name)
        if reply.op != op or reply.tx_id != tx_id:
            self.close()
            raise _LinkDown(f"{what}: unexpected reply type {reply.op}", "EIO")
        payload_out: bytes = reply.payload
        return payload_out


class _Ops(XenStoreOps):
    """The node operations over ``_req`` (plain connection or transaction)."""

    def _req(self, op: int, payload: bytes, what: str) -> bytes:
        raise NotImplementedError

    def read(self, path: str) -> Optional[str]:
        try:
            return _s(self._req(XS_READ, _b(path) + _NUL, f"read {path}"))
        except _LinkDown:
            raise
        except XenStoreError as e:
            if e.errno_name == "ENOENT":
                return None
            raise

    def write(self, path: str, value: str) -> None:
        self._req(XS_WRITE, _b(path) + _NUL + _b(value), f"write {path}")

    def mkdir(self, path: str) -> None:
        self._req(XS_MKDIR, _b(path) + _NUL, f"mkdir {path}")

    def rm(self, path: str) -> None:
        try:
            self._req(XS_RM, _b(path) + _NUL, f"rm {path}")
        except _LinkDown:
            raise
        except XenStoreError as e:
            if e.errno_name != "ENOENT":
                raise

    def directory(self, path: str) -> List[str]:
        try:
            data = self._req(XS_DIRECTORY, _b(path) + _NUL, f"directory {path}")
        except _LinkDown:
            raise
        except XenStoreError as e:
            if e.errno_name == "ENOENT":
                return []
            if e.errno_name != "E2BIG":
                raise
            data = self._directory_part(path)
        return [_s(c) for c in data.split(_NUL)[:-1]]

    def _directory_part(self, path: str) -> bytes:
        """A listing too large for one reply, fetched in parts (as libxenstore does)."""
        for _ in range(16):
            gen: Optional[bytes] = None
            chunks: List[bytes] = []
            offset = 0
            while True:
                reply = self._req(XS_DIRECTORY_PART, _b(path) + _NUL + str(offset).encode()
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
        self._req(XS_SET_PERMS, payload, f"set_perms {path}")

    def get_perms(self, path: str) -> List[str]:
        data = self._req(XS_GET_PERMS, _b(path) + _NUL, f"get_perms {path}")
        return [_s(p) for p in data.split(_NUL)[:-1]]


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


class _Subscription(WatchSubscription):
    """Watches on ``paths`` under one token; pending events as a bounded set."""

    def __init__(self, store: "PyxsXenStore", token: bytes, paths: Sequence[str],
                 max_pending: int) -> None:
        self._store = store
        self.token = token
        self.paths = list(paths)
        self._max = max(max_pending, len(self.paths), 1)
        self._pending: Dict[str, None] = {}
        self._ready = gevent.event.Event()
        self._closed = False
        self.link: Optional[_Link] = None
        self.events = self  # pyxs's Router calls monitor.events.put(event)

    # pyxs Router side -------------------------------------------------------
    def put(self, event: Any) -> None:
        if self._closed:
            return
        self._store._count_event()
        path = _s(event.path)
        if path not in self._pending and len(self._pending) >= self._max:
            # Coalesce harder: "something under each watched path changed".
            self._pending.clear()
            for p in self.paths:
                self._pending[p] = None
        self._pending[path] = None
        self._ready.set()

    def arm(self, link: _Link) -> None:
        """Register the watches on ``link``; ignores paths already registered."""
        link.router.subscribe(self.token, self)
        try:
            for path in self.paths:
                try:
                    link.request(XS_WATCH, _b(path) + _NUL + self.token + _NUL, 0,
                                 f"watch {path}")
                except _LinkDown:
                    raise
                except XenStoreError as e:
                    if e.errno_name != "EEXIST":
                        raise
        except BaseException:
            self._unsubscribe(link)
            raise
        self.link = link

    def _unsubscribe(self, link: _Link) -> None:
        try:
            link.router.unsubscribe(self.token, self)
        except ValueError:
            pass

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
        link = self.link
        self.link = None
        if link is not None and link.alive:
            for path in self.paths:
                try:
                    link.request(XS_UNWATCH, _b(path) + _NUL + self.token + _NUL, 0,
                                 f"unwatch {path}")
                except XenStoreError:
                    break
            self._unsubscribe(link)


class PyxsXenStore(_Ops, XenStore):
    """XenStore over pyxs for the hub (see the module docstring for the safeguards).

    ``socket_path`` None means real Xen's resolution ($XENSTORED_PATH, the rundir
    socket, then /dev/xen/xenbus). Connects at once: ``XenUnavailable`` if nothing
    answers. ``connections`` counts connections made (the first and every
    reconnection; transactions' own connections are not counted), ``watch_events``
    the watch events received; ``on_connect``/``on_watch_event`` are called for each.
    """

    def __init__(self, socket_path: Optional[str] = None, timeout: float = 10.0, *,
                 max_pending: int = 1024,
                 on_connect: Optional[Callable[[], None]] = None,
                 on_watch_event: Optional[Callable[[], None]] = None) -> None:
        _require_gevent_patching()
        self.timeout = timeout
        self.max_pending = max_pending
        self.connections = 0
        self.watch_events = 0
        self._on_connect = on_connect
        self._on_watch_event = on_watch_event
        self._targets = [_Target("unix", socket_path)] if socket_path else default_targets()
        self._link: Optional[_Link] = None
        self._lock = gevent.lock.RLock()
        self._subs: Dict[bytes, _Subscription] = {}
        self._tokens = itertools.count(1)
        self._reconnector: Optional[Greenlet] = None
        self._closed = False
        self._last_errors: List[Tuple[str, str]] = []
        try:
            self._ensure()
        except _LinkDown as e:
            tried = "; ".join(f"{t} ({err})" for t, err in self._last_errors)
            raise XenUnavailable(
                f"{NO_XENSTORE_HINT}. Tried {tried}"
            ) from e

    # connections -------------------------------------------------------------

    def _open(self, on_lost: Optional[Callable[[_Link], None]]) -> _Link:
        errors: List[Tuple[str, str]] = []
        last: Optional[_LinkDown] = None
        for target in self._targets:
            try:
                return _Link(target, self.timeout, on_lost)
            except _LinkDown as e:
                errors.append((target.path, _describe(e)))
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
            link = self._open(self._lost)
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

    def _count_event(self) -> None:
        self.watch_events += 1
        if self._on_watch_event is not None:
            try:
                self._on_watch_event()
            except Exception:  # runs in pyxs's router: must not kill it
                log.exception("on_watch_event callback failed")

    def _forget(self, sub: _Subscription) -> None:
        self._subs.pop(sub.token, None)

    # XenStore ------------------------------------------------------------------

    def transaction(self, fn: Callable[[XenStoreOps], object], retries: int = 16) -> object:
        link = self._open(None)
        try:
            for _attempt in range(retries + 1):
                reply = link.request(XS_TRANSACTION_START, _NUL, 0, "transaction start")
                try:
                    tx_id = int(reply.rstrip(_NUL))
                except ValueError:
                    raise XenStoreError(f"transaction start: bad id {reply!r}", "EIO") from None
                tx = _TransactionOps(link, tx_id)
                try:
                    result = fn(tx)
                except BaseException as e:
                    tx.valid = False
                    if link.alive:
                        try:
                            link.request(XS_TRANSACTION_END, b"F" + _NUL, tx_id,
                                         "transaction abort")
                        except XenStoreError:
                            pass
                    if (isinstance(e, XenStoreError) and not isinstance(e, _LinkDown)
                            and e.errno_name == "EAGAIN"):
                        continue
                    raise
                tx.valid = False
                try:
                    link.request(XS_TRANSACTION_END, b"T" + _NUL, tx_id, "transaction commit")
                except _LinkDown:
                    raise
                except XenStoreError as e:
                    if e.errno_name == "EAGAIN":
                        continue
                    raise
                return result
            raise XenStoreError(f"transaction still conflicting after {retries} retries",
                                "EAGAIN")
        finally:
            link.close()

    def watch(self, paths: Sequence[str]) -> WatchSubscription:
        token = b"gblk-%d" % next(self._tokens)
        sub = _Subscription(self, token, paths, self.max_pending)
        self._subs[token] = sub
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
        data = self._req(XS_GET_DOMAIN_PATH, str(domid).encode() + _NUL,
                         f"get_domain_path {domid}")
        return _s(data.rstrip(_NUL))

    def introduce_domain(self, domid: int, mfn: int, port: int) -> None:
        """XS_INTRODUCE (toolstack use)."""
        payload = b"".join(str(x).encode() + _NUL for x in (domid, mfn, port))
        self._req(XS_INTRODUCE, payload, f"introduce {domid}")

    def release_domain(self, domid: int) -> None:
        """XS_RELEASE (toolstack use): xenstored fires @releaseDomain."""
        self._req(XS_RELEASE, str(domid).encode() + _NUL, f"release {domid}")

    def is_domain_introduced(self, domid: int) -> bool:
        data = self._req(XS_IS_DOMAIN_INTRODUCED, str(domid).encode() + _NUL,
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
