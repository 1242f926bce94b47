"""A simulated xenstored: the real XenStore wire protocol on Unix sockets, on gevent.

Clients cannot tell it from C xenstored for what a backend uses: gblk's clients, Debian's
``xenstore-*`` tools (``XENSTORED_PATH=<socket>``) and libxenstore talk to it
unchanged. A connection on the main socket ``PATH`` acts as dom0 (privileged).
``INTRODUCE(domid, mfn, port)`` opens ``PATH + ".d<domid>"``, whose connections act
as that domain (how simulated guests connect: there are no shared rings here);
``RELEASE`` closes it, drops its connections and fires ``@releaseDomain``.

Memory per connection is bounded (XSA-349): what the server has queued for a client
that does not read is capped (``Quotas.max_queued_bytes``) and the connection is
dropped past the cap. A message announcing more than 4096 payload bytes also drops
the connection, as xenstored does.

Run it with ``gblk sim xenstored --socket PATH`` or ``python -m gblk.sim.xenstored``
(foreground until SIGTERM/SIGINT; the socket file appears only once it accepts
connections), or in-process with :class:`XenStoreServer` under gevent.

The node tree and its rules live in :mod:`gblk.sim.xenstored.store`; this module only does
sockets, connections, watch delivery and domains. It never monkey-patches.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import socket
import sys
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import gevent
import gevent.event
import gevent.socket
from gevent.pool import Group

from gblk.sim.xenstored import store as xs
from gblk.xen import xs_wire as w
from gblk.xen.xs_wire import XsError

log = logging.getLogger(__name__)

#: requests only a privileged domain may make (XS_FLAG_PRIV in xenstored)
_PRIVILEGED_OPS = frozenset(
    {w.XS_CONTROL, w.XS_INTRODUCE, w.XS_RELEASE, w.XS_IS_DOMAIN_INTRODUCED,
     w.XS_RESUME, w.XS_SET_TARGET}
)
#: requests whose tx_id is ignored (XS_FLAG_NOTID)
_NO_TRANSACTION_OPS = frozenset({w.XS_WATCH, w.XS_UNWATCH})

_OK = b"OK\0"
_WRITE_BATCH = 64 * 1024
_READ_CHUNK = 64 * 1024


def _event_message(path: str, token: bytes) -> Optional[bytes]:
    payload = w.watch_event_payload(path.encode("latin-1"), token)
    if len(payload) > w.XENSTORE_PAYLOAD_MAX:
        return None  # xenstored does not send over-long events either
    return w.pack(w.XS_WATCH_EVENT, 0, 0, payload)


class _Connection:
    """One client connection, acting for ``domid``."""

    def __init__(self, conn_id: int, sock: socket.socket, domid: int) -> None:
        self.id = conn_id
        self.sock = sock
        self.domid = domid
        self.out: Deque[bytes] = deque()
        #: bytes queued or being written: bounded by Quotas.max_queued_bytes
        self.queued = 0
        self.ready = gevent.event.Event()
        self.watches: Dict[Tuple[str, bytes], xs.Watch] = {}
        self.transactions: Dict[int, xs.Transaction] = {}
        self.next_tx = 1
        self.closed = False


class _Listener:
    def __init__(self, sock: socket.socket, path: str, ident: Tuple[int, int]) -> None:
        self.sock = sock
        self.path = path
        self.ident = ident


class XenStoreServer:
    """A XenStore server on ``path`` (dom0) plus one socket per introduced domain.

    ``start()`` returns once ``path`` accepts connections; ``stop()`` closes every
    socket, removes the socket files and is idempotent. Must run under gevent (the
    calling greenlet's hub). Counters: ``connections_total``, ``dropped_total``
    (connections dropped for exceeding the queue bound).
    """

    def __init__(self, path: str, quotas: Optional[xs.Quotas] = None) -> None:
        self.path = path
        self.quotas = quotas or xs.Quotas()
        self.store = xs.Store(self.quotas)
        self.store.on_fire = self._deliver
        self.connections_total = 0
        self.dropped_total = 0
        self._conns: Dict[int, _Connection] = {}
        #: every connection's watches by node, then by connection id: a change looks up
        #: its path and ancestors instead of visiting every connection and watch
        self._by_node: Dict[str, Dict[int, List[xs.Watch]]] = {}
        self._listeners: Dict[int, _Listener] = {}
        self._introduced: Dict[int, Tuple[int, int]] = {}
        self._targets: Dict[int, int] = {}
        self._accounting = xs.DomainAccounting()
        self._group = Group()
        self._ids = itertools.count(1)
        self._tmp_ids = itertools.count(1)
        self._stopped = False

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Listen on ``path`` (replacing a stale socket file)."""
        self._listen(0, self.path)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for domid in list(self._listeners):
            self._close_listener(domid)
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._group.kill(timeout=2)

    def __enter__(self) -> "XenStoreServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def domain_socket_path(self, domid: int) -> str:
        """Where connections acting as ``domid`` connect once it is introduced."""
        return f"{self.path}.d{domid}"

    def introduced_domains(self) -> List[int]:
        return sorted(self._introduced)

    # -- domains (also callable in-process) ---------------------------------

    def introduce_domain(self, domid: int, mfn: int = 0, port: int = 1) -> str:
        """Introduce ``domid`` (opening its socket and firing @introduceDomain the
        first time); returns its socket path. XsError EINVAL for a bad domid/port."""
        if port <= 0 or domid <= 0 or domid >= w.DOMID_FIRST_RESERVED:
            raise XsError(w.EINVAL)
        if domid not in self._introduced:
            try:
                self._listen(domid, self.domain_socket_path(domid))
            except OSError as e:
                log.error("cannot listen for domain %d: %s", domid, e)
                raise XsError(w.EIO) from e
            self._introduced[domid] = (mfn, port)
            self.store.fire(xs.Fire(w.INTRODUCE_DOMAIN, False, ()))
        else:
            self._introduced[domid] = (mfn, port)
        # xenstored resets the domain's connection on every introduction.
        for conn in list(self._conns.values()):
            if conn.domid == domid:
                self._reset_watches(conn)
        return self.domain_socket_path(domid)

    def release_domain(self, domid: int) -> None:
        """Forget ``domid``: close its socket and connections, fire @releaseDomain."""
        if domid == 0:
            raise XsError(w.EINVAL)
        if domid not in self._introduced:
            raise XsError(w.ENOENT)
        del self._introduced[domid]
        self._targets.pop(domid, None)
        self._close_listener(domid)
        for conn in list(self._conns.values()):
            if conn.domid == domid:
                self._drop(conn)
        self.store.fire(xs.Fire(w.RELEASE_DOMAIN, False, ()))

    # -- sockets ------------------------------------------------------------

    def _listen(self, domid: int, path: str) -> None:
        # Bind under a temporary name and rename into place once listening, so
        # that "the socket file exists" means "connections are accepted".
        directory = os.path.dirname(path) or "."
        tmp = os.path.join(directory, f".xs{os.getpid()}-{next(self._tmp_ids)}")
        sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            sock.listen(128)
            os.rename(tmp, path)
            st = os.stat(path)
        except OSError:
            sock.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._listeners[domid] = _Listener(sock, path, (st.st_dev, st.st_ino))
        self._group.spawn(self._accept_loop, sock, domid)

    def _close_listener(self, domid: int) -> None:
        listener = self._listeners.pop(domid, None)
        if listener is None:
            return
        listener.sock.close()
        try:
            st = os.stat(listener.path)
            if (st.st_dev, st.st_ino) == listener.ident:
                os.unlink(listener.path)
        except OSError:
            pass

    def _accept_loop(self, lsock: socket.socket, domid: int) -> None:
        while True:
            try:
                csock, _ = lsock.accept()
            except OSError:
                return  # listener closed
            conn = _Connection(next(self._ids), csock, domid)
            self._conns[conn.id] = conn
            self.connections_total += 1
            self._group.spawn(self._reader, conn)
            self._group.spawn(self._writer, conn)

    def _reader(self, conn: _Connection) -> None:
        # whatever the socket has, then every whole message in it, one after another
        # (a client may send many before reading an answer)
        head = w.HEADER.size
        buf = b""
        try:
            while not conn.closed:
                chunk = conn.sock.recv(_READ_CHUNK)
                if not chunk:
                    return
                buf = buf + chunk if buf else chunk
                start = 0
                while len(buf) - start >= head and not conn.closed:
                    mtype, req_id, tx_id, length = w.unpack_header(buf[start:start + head])
                    if length > w.XENSTORE_PAYLOAD_MAX:
                        return  # xenstored drops a client that feeds it more
                    end = start + head + length
                    if len(buf) < end:
                        break
                    payload = buf[start + head:end]
                    start = end
                    self._handle(conn, mtype, req_id, tx_id, payload)
                buf = buf[start:]
        except OSError:
            return
        finally:
            self._drop(conn)

    def _writer(self, conn: _Connection) -> None:
        try:
            while True:
                conn.ready.wait()
                if conn.closed:
                    return
                batch: List[bytes] = []
                size = 0
                while conn.out and size < _WRITE_BATCH:
                    msg = conn.out.popleft()
                    batch.append(msg)
                    size += len(msg)
                if not conn.out:
                    conn.ready.clear()
                if batch:
                    conn.sock.sendall(b"".join(batch))
                    conn.queued -= size
        except OSError:
            return
        finally:
            self._drop(conn)

    def _send(self, conn: _Connection, data: bytes) -> None:
        if conn.closed:
            return
        if conn.queued + len(data) > self.quotas.max_queued_bytes:
            # A client that does not read must not grow the server (XSA-349).
            self.dropped_total += 1
            self._drop(conn)
            return
        conn.out.append(data)
        conn.queued += len(data)
        conn.ready.set()

    def _drop(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.id, None)
        self._reset_watches(conn)
        conn.out.clear()
        conn.ready.set()
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.sock.close()

    def _reset_watches(self, conn: _Connection) -> None:
        """Forget the connection's watches and transactions (RESET_WATCHES)."""
        self._accounting.add_watches(conn.domid, -len(conn.watches))
        for watch in conn.watches.values():
            self._unindex(conn, watch)
        conn.watches.clear()
        self._accounting.add_transactions(conn.domid, -len(conn.transactions))
        conn.transactions.clear()

    # -- requests -----------------------------------------------------------

    def _caller(self, conn: _Connection) -> xs.Caller:
        return xs.Caller(conn.domid, self._targets.get(conn.domid))

    def _handle(self, conn: _Connection, mtype: int, req_id: int, tx_id: int,
                payload: bytes) -> None:
        after: List[bytes] = []
        try:
            rtype, body = mtype, self._dispatch(conn, mtype, tx_id, payload, after)
        except XsError as e:
            rtype, body = w.XS_ERROR, w.error_payload(e.name)
        except Exception:  # a bug here must not take the server down
            log.exception("internal error handling %s", w.TYPE_NAMES.get(mtype, mtype))
            rtype, body = w.XS_ERROR, w.error_payload(w.EIO)
        if len(body) > w.XENSTORE_PAYLOAD_MAX:
            rtype, body = w.XS_ERROR, w.error_payload(w.E2BIG)
        self._send(conn, w.pack(rtype, req_id, tx_id, body))
        for msg in after:
            self._send(conn, msg)

    def _dispatch(self, conn: _Connection, mtype: int, tx_id: int, payload: bytes,
                  after: List[bytes]) -> bytes:
        caller = self._caller(conn)
        if mtype not in _HANDLED:
            raise XsError(w.ENOSYS)
        if mtype in _PRIVILEGED_OPS and not caller.privileged:
            raise XsError(w.EACCES)
        trans: Optional[xs.Transaction] = None
        if mtype not in _NO_TRANSACTION_OPS and tx_id != 0:
            trans = conn.transactions.get(tx_id)
            if trans is None:
                raise XsError(w.ENOENT)
        node_op = xs.NODE_OPS.get(mtype)
        if node_op is not None:
            view: xs.View = trans if trans is not None else self.store
            return node_op(view, caller, payload)
        if mtype == w.XS_WATCH:
            return self._watch(conn, caller, payload, after)
        if mtype == w.XS_UNWATCH:
            return self._unwatch(conn, caller, payload)
        if mtype == w.XS_TRANSACTION_START:
            return self._transaction_start(conn, caller, trans)
        if mtype == w.XS_TRANSACTION_END:
            return self._transaction_end(conn, trans, tx_id, payload)
        if mtype == w.XS_GET_DOMAIN_PATH:
            domid = xs.atoi(xs.onearg(payload).encode("latin-1")) & 0xFFFFFFFF
            return f"/local/domain/{domid}".encode() + b"\0"
        if mtype == w.XS_RESET_WATCHES:
            self._reset_watches(conn)
            return _OK
        if mtype == w.XS_INTRODUCE:
            args = w.strings(payload)
            if len(args) < 3:
                raise XsError(w.EINVAL)
            self.introduce_domain(xs.atoi(args[0]), xs.atoi(args[1]), xs.atoi(args[2]))
            return _OK
        if mtype == w.XS_RELEASE:
            self.release_domain(self._domid_arg(payload))
            return _OK
        if mtype == w.XS_RESUME:
            if self._domid_arg(payload) not in self._introduced:
                raise XsError(w.ENOENT)
            return _OK
        if mtype == w.XS_IS_DOMAIN_INTRODUCED:
            domid = xs.atoi(xs.onearg(payload).encode("latin-1"))
            known = domid in (0, w.DOMID_SELF) or domid in self._introduced
            return b"T\0" if known else b"F\0"
        if mtype == w.XS_SET_TARGET:
            args = w.strings(payload)
            if len(args) < 2:
                raise XsError(w.EINVAL)
            domid, target = xs.atoi(args[0]), xs.atoi(args[1])
            if domid not in self._introduced or target not in self._introduced:
                raise XsError(w.ENOENT)
            self._targets[domid] = target
            return _OK
        # XS_CONTROL: no debug commands are simulated.
        raise XsError(w.EINVAL)

    @staticmethod
    def _domid_arg(payload: bytes) -> int:
        domid = xs.atoi(xs.onearg(payload).encode("latin-1"))
        if domid == 0:
            raise XsError(w.EINVAL)
        return domid

    def _watch(self, conn: _Connection, caller: xs.Caller, payload: bytes,
               after: List[bytes]) -> bytes:
        args = w.strings(payload)
        if len(args) != 2:
            raise XsError(w.EINVAL)
        watch = xs.check_watch_path(caller, args[0].decode("latin-1"))
        watch.token = args[1]
        key = (watch.node, watch.token)
        if key in conn.watches:
            raise XsError(w.EEXIST)
        if not caller.privileged and (
            self._accounting.watches.get(caller.domid, 0) >= self.quotas.watches
        ):
            raise XsError(w.E2BIG)
        conn.watches[key] = watch
        self._by_node.setdefault(watch.node, {}).setdefault(conn.id, []).append(watch)
        self._accounting.add_watches(caller.domid, 1)
        # "We fire once up front: simplifies clients and restart."
        msg = _event_message(watch.event_path(watch.node), watch.token)
        if msg is not None:
            after.append(msg)
        return _OK

    def _unwatch(self, conn: _Connection, caller: xs.Caller, payload: bytes) -> bytes:
        args = w.strings(payload)
        if len(args) != 2:
            raise XsError(w.EINVAL)
        node = xs.canonicalize(caller, args[0].decode("latin-1"))
        watch = conn.watches.pop((node, args[1]), None)
        if watch is None:
            raise XsError(w.ENOENT)
        self._unindex(conn, watch)
        self._accounting.add_watches(caller.domid, -1)
        return _OK

    def _transaction_start(self, conn: _Connection, caller: xs.Caller,
                           trans: Optional[xs.Transaction]) -> bytes:
        if trans is not None:
            raise XsError(w.EBUSY)  # no nested transactions
        if not caller.privileged and (
            self._accounting.transactions.get(caller.domid, 0) >= self.quotas.transactions
        ):
            raise XsError(w.ENOSPC)
        tx_id = conn.next_tx
        while tx_id == 0 or tx_id in conn.transactions:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.next_tx = (tx_id + 1) & 0xFFFFFFFF
        conn.transactions[tx_id] = xs.Transaction(self.store, tx_id, caller)
        self._accounting.add_transactions(caller.domid, 1)
        return str(tx_id).encode() + b"\0"

    def _transaction_end(self, conn: _Connection, trans: Optional[xs.Transaction],
                         tx_id: int, payload: bytes) -> bytes:
        arg = xs.onearg(payload)
        if arg not in ("T", "F"):
            raise XsError(w.EINVAL)
        if trans is None:
            raise XsError(w.ENOENT)
        del conn.transactions[tx_id]
        self._accounting.add_transactions(conn.domid, -1)
        if arg == "T":
            trans.commit()
        return _OK

    # -- watches ------------------------------------------------------------

    def _unindex(self, conn: _Connection, watch: xs.Watch) -> None:
        by_conn = self._by_node.get(watch.node)
        if by_conn is None:
            return
        watches = by_conn.get(conn.id)
        if watches is not None:
            for i, wt in enumerate(watches):
                if wt is watch:
                    del watches[i]
                    break
            if not watches:
                del by_conn[conn.id]
        if not by_conn:
            del self._by_node[watch.node]

    def _deliver(self, fire: xs.Fire) -> None:
        hits: Dict[int, List[xs.Watch]] = {}
        for node in _watched_nodes(fire):
            by_conn = self._by_node.get(node)
            if by_conn:
                for conn_id, watches in by_conn.items():
                    hits.setdefault(conn_id, []).extend(watches)
        for conn_id in sorted(hits):  # connections in the order they came, as before
            conn = self._conns.get(conn_id)
            if conn is None or conn.closed:
                continue
            if not xs.watch_permitted(self._caller(conn), self.store, fire):
                continue
            for watch in hits[conn_id]:
                if not watch.matches(fire):
                    continue
                msg = _event_message(watch.event_path(fire.path), watch.token)
                if msg is not None:
                    self._send(conn, msg)
                if conn.closed:
                    break


def _watched_nodes(fire: xs.Fire) -> List[str]:
    """The watch nodes ``fire`` may match: its path and (unless exact or special)
    every ancestor up to "/"."""
    path = fire.path
    if fire.exact or path.startswith("@"):
        return [path]
    nodes = [path]
    while path not in ("/", ""):
        path = path.rsplit("/", 1)[0] or "/"
        nodes.append(path)
    return nodes


_HANDLED = frozenset(xs.NODE_OPS) | frozenset(
    {w.XS_WATCH, w.XS_UNWATCH, w.XS_TRANSACTION_START, w.XS_TRANSACTION_END,
     w.XS_GET_DOMAIN_PATH, w.XS_RESET_WATCHES, w.XS_INTRODUCE, w.XS_RELEASE,
     w.XS_RESUME, w.XS_IS_DOMAIN_INTRODUCED, w.XS_SET_TARGET, w.XS_CONTROL}
)


def _parser() -> argparse.ArgumentParser:
    q = xs.Quotas()
    p = argparse.ArgumentParser(
        prog="gblk sim xenstored",
        description="A simulated xenstored on a Unix socket (foreground until "
        "SIGTERM/SIGINT). Connections on PATH act as dom0; an introduced domain N "
        "gets PATH.dN.",
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="dom0 socket path")
    p.add_argument("--ready-fd", type=int, metavar="N",
                   help="write 'READY=1' to this fd and close it once listening")
    p.add_argument("-E", "--entry-nb", type=int, default=q.nodes,
                   help="nodes per unprivileged domain (default %(default)s)")
    p.add_argument("-S", "--entry-size", type=int, default=q.entry_size,
                   help="node size limit for unprivileged domains (default %(default)s)")
    p.add_argument("-W", "--watch-nb", type=int, default=q.watches,
                   help="watches per unprivileged domain (default %(default)s)")
    p.add_argument("-t", "--transaction", type=int, default=q.transactions,
                   help="open transactions per unprivileged domain (default %(default)s)")
    p.add_argument("-A", "--perm-nb", type=int, default=q.perms,
                   help="permissions per node for unprivileged domains (default %(default)s)")
    p.add_argument("--max-queued-bytes", type=int, default=q.max_queued_bytes,
                   help="bytes queued to a connection that does not read before it "
                   "is dropped (default %(default)s)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``gblk sim xenstored --socket PATH``: serve until SIGTERM/SIGINT."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="gblk sim xenstored: %(message)s")
    quotas = xs.Quotas(
        nodes=args.entry_nb, watches=args.watch_nb, transactions=args.transaction,
        entry_size=args.entry_size, perms=args.perm_nb,
        max_queued_bytes=args.max_queued_bytes,
    )
    server = XenStoreServer(args.socket, quotas)
    try:
        server.start()
    except OSError as e:
        print(f"gblk sim xenstored: cannot listen on {args.socket}: {e}", file=sys.stderr)
        return 1
    done = gevent.event.Event()
    handlers = [gevent.signal_handler(sig, done.set) for sig in (signal.SIGTERM, signal.SIGINT)]
    try:
        if args.ready_fd is not None:
            try:
                os.write(args.ready_fd, b"READY=1\n")
                os.close(args.ready_fd)
            except OSError as e:
                print(f"gblk sim xenstored: --ready-fd {args.ready_fd}: {e}", file=sys.stderr)
        done.wait()
    finally:
        for h in handlers:
            h.cancel()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
