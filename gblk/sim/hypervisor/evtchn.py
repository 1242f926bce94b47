"""The simulated host's event channels (libxenevtchn semantics, no hypervisor).

``SimEventChannel`` implements ``gblk.xen.interfaces.EventChannel`` for any domain:
the guest side allocates an unbound port (``alloc_unbound``), the backend binds to
it (``bind_interdomain``), and either end notifies the other, across processes. The
truth lives in per-domain port tables under ``DIR/evtchn`` (layout in
``gblk.sim.hypervisor.memory``), changed under flock; each handle owns a Unix datagram socket
(abstract namespace) whose fd is what callers poll. A datagram is only a wake-up:
``pending()`` drains the socket, then collects the ports marked fired in the tables,
so a dropped wake-up (full socket buffer) can never lose an event; a drain that
receives nothing skips the tables (why that is safe: ``pending``'s docstring).

The hot path (``notify``, ``pending``, ``unmask``: every ring pass of both ends pays
for them) works on the mapped records directly: one flock pair per call at most,
only the flags byte read-modify-written, no record objects, a poll(0) instead of a
recv that fails (an exception costs more than the syscall), no contextmanager.
``gblk sim evtchn_bench`` measures it.

Delivery follows Xen's 2-level ABI as the Linux evtchn driver exposes it: an event
on an unmasked port masks it and queues it for ``pending()``; an event on a masked
port is remembered once (pending bit) and delivered again by ``unmask()``. So a storm
of notifications costs one wake-up until the consumer unmasks (XSA-332 tests rely on
it). Binding sets the new local port pending once, as Xen's
``evtchn_bind_interdomain`` does ("we may have lost notifications on the remote
unbound port"): consumers must tolerate that spurious first event.

Called on the gevent hub: every call is non-blocking (sockets are unpatched and
non-blocking, flock sections are short) and never touches gevent objects. Must not
import the engine or anything above ``gblk.sim``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import mmap
import os
import select
import socket
import struct
import uuid
from typing import Any, Deque, Dict, Iterator, List, NamedTuple, Optional

from gblk.errors import EventChannelError
from gblk.sim.hypervisor.memory import EVTCHN
from gblk.xen.interfaces import EventChannel
from gblk.xen.native import native_lock, original

#: ports per domain (Xen's 2-level ABI on 64-bit guests); port 0 is never used
MAX_PORTS = 4096
#: state u8, flags u8, remote_domid u16, remote_port u32, owner u32, 4 bytes zero
PORT_RECORD = struct.Struct("<BBHII4x")
TABLE_SIZE = MAX_PORTS * PORT_RECORD.size
_RECORD_SIZE = PORT_RECORD.size
_RECORD_UNPACK = PORT_RECORD.unpack_from
#: the owner field of a record (u32 at byte 8)
_OWNER_OFFSET = 8
_OWNER_UNPACK = struct.Struct("<I").unpack_from
_flock = fcntl.flock
_LOCK_EX = fcntl.LOCK_EX
_LOCK_UN = fcntl.LOCK_UN

ECS_FREE = 0
ECS_UNBOUND = 1
ECS_INTERDOMAIN = 2

F_MASKED = 1
F_PENDING = 2  # an event arrived while masked: delivered again on unmask
F_FIRED = 4  # delivered to the owning handle, not yet returned by pending()

TOKEN_FILE = "token"
HANDLES_FILE = "handles"


class PortRecord(NamedTuple):
    state: int
    flags: int
    remote_domid: int
    remote_port: int
    owner: int


FREE = PortRecord(ECS_FREE, 0, 0, 0, 0)


def _evtchn_dir(dir: str) -> str:
    path = os.path.join(dir, EVTCHN)
    os.makedirs(path, exist_ok=True)
    return path


def _token(evdir: str) -> str:
    """The random name of this simulated host's sockets, created once, race-free."""
    path = os.path.join(evdir, TOKEN_FILE)
    try:
        with open(path) as f:
            token = f.read().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    tmp = f"{path}.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        f.write(uuid.uuid4().hex[:16])
    try:
        os.link(tmp, path)  # fails if another process won the race: use theirs
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path) as f:
        return f.read().strip()


def _next_handle_id(evdir: str) -> int:
    fd = os.open(os.path.join(evdir, HANDLES_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 4, 0)
        last = struct.unpack("<I", raw)[0] if len(raw) == 4 else 0
        os.pwrite(fd, struct.pack("<I", last + 1), 0)
        return last + 1
    finally:
        os.close(fd)


def _address(token: str, handle_id: int) -> bytes:
    return b"\0gblk-evtchn-%s-%d" % (token.encode(), handle_id)


class _PortTable:
    """One domain's port table file, mapped. Callers hold ``locked()`` around reads
    and read-modify-writes and serialise threads themselves."""

    def __init__(self, evdir: str, domid: int) -> None:
        self.domid = domid
        self._fd = os.open(
            os.path.join(evdir, f"d{domid}"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            with self.locked():
                if os.fstat(self._fd).st_size < TABLE_SIZE:
                    os.ftruncate(self._fd, TABLE_SIZE)
            self._map = mmap.mmap(self._fd, TABLE_SIZE, mmap.MAP_SHARED)
        except BaseException:
            os.close(self._fd)
            raise

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def get(self, port: int) -> PortRecord:
        return PortRecord(*PORT_RECORD.unpack_from(self._map, port * PORT_RECORD.size))

    def put(self, port: int, rec: PortRecord) -> None:
        PORT_RECORD.pack_into(self._map, port * PORT_RECORD.size, *rec)

    def alloc(self) -> int:
        """The lowest free port (>= 1); EventChannelError when all are used."""
        for port in range(1, MAX_PORTS):
            if self._map[port * PORT_RECORD.size] == ECS_FREE:
                return port
        raise EventChannelError(f"d{self.domid}: all {MAX_PORTS - 1} event channel ports in use")

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


@contextlib.contextmanager
def _locked_tables(*tables: _PortTable) -> Iterator[None]:
    """Lock several port tables in domid order (no deadlock between processes)."""
    unique = {t.domid: t for t in tables}
    with contextlib.ExitStack() as stack:
        for domid in sorted(unique):
            stack.enter_context(unique[domid].locked())
        yield


def _valid_port(port: int) -> bool:
    return 0 < port < MAX_PORTS


class SimEventChannel(EventChannel):
    """An event-channel handle of domain ``domid`` on the simulated host in ``dir``."""

    def __init__(self, dir: str, domid: int = 0) -> None:
        self.dir = dir
        self.domid = domid
        self._evdir = _evtchn_dir(dir)
        self._token = _token(self._evdir)
        self.handle_id = _next_handle_id(self._evdir)
        self._lock = native_lock()
        sock_cls: Any = original("socket", "socket")
        self._sock: socket.socket = sock_cls(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.setblocking(False)
            self._sock.bind(_address(self._token, self.handle_id))
            self._tables: Dict[int, _PortTable] = {}
            self._own = self._table(domid)
            self._own_map = self._own._map
            # unpatched: called on the hub, never blocks (timeout 0)
            self._poll = original("select", "poll")()
            self._poll.register(self._sock.fileno(), select.POLLIN)
        except BaseException:
            for table in self._tables.values():
                table.close()
            self._sock.close()
            raise
        self._ports: Dict[int, None] = {}  # local ports bound through this handle
        #: local port -> the domain at its other end (interdomain binds): a remote
        #: domain's port table stays open only while a port of this handle uses it
        self._remote: Dict[int, int] = {}
        self._ready: Deque[int] = collections.deque()
        self._addrs: Dict[int, bytes] = {}  # handle id -> socket address
        self._closed = False
        #: counters for tests and metrics
        self.notifications_sent = 0
        self.wakeups_sent = 0

    # EventChannel ------------------------------------------------------------
    def fileno(self) -> int:
        return self._sock.fileno()

    def alloc_unbound(self, remote_domid: int) -> int:
        """Guest side: a new port of this domain that ``remote_domid`` may bind to."""
        with self._lock:
            self._check_open()
            with self._own.locked():
                port = self._own.alloc()
                self._own.put(port, PortRecord(ECS_UNBOUND, 0, remote_domid, 0, self.handle_id))
            self._ports[port] = None
            return port

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        with self._lock:
            self._check_open()
            if not _valid_port(remote_port):
                raise EventChannelError(f"bind to d{domid} port {remote_port}: no such port")
            remote = self._table(domid)
            with _locked_tables(self._own, remote):
                rrec = remote.get(remote_port)
                if rrec.state == ECS_INTERDOMAIN and rrec.remote_domid == self.domid:
                    rrec = self._reap_dead_binding(remote, remote_port, rrec)
                if rrec.state != ECS_UNBOUND:
                    raise EventChannelError(
                        f"bind to d{domid} port {remote_port}: port is not unbound (EINVAL)"
                    )
                if rrec.remote_domid != self.domid:
                    raise EventChannelError(
                        f"bind to d{domid} port {remote_port}: port is reserved for "
                        f"d{rrec.remote_domid}, not d{self.domid} (EINVAL)"
                    )
                local = self._own.alloc()
                if domid == self.domid and local == remote_port:  # pragma: no cover
                    raise EventChannelError("cannot bind a port to itself")
                remote.put(
                    remote_port,
                    rrec._replace(state=ECS_INTERDOMAIN, remote_domid=self.domid, remote_port=local),
                )
                # An event the remote end was given and never woken for: a notifier
                # killed between marking the port fired and sending the wake-up (Xen
                # delivers in one hypercall; here they are two steps). Every later
                # notify sees "fired" and sends nothing, so the remote end would sleep
                # on its responses for good: the binding that replaces the dead one
                # sends that wake-up.
                lost_wake = rrec.owner if rrec.flags & F_FIRED else 0
                # Xen sets the new local port pending: a notification may have been lost
                # while the remote port was unbound. Delivered at once: masked + fired.
                self._own.put(
                    local,
                    PortRecord(ECS_INTERDOMAIN, F_MASKED | F_FIRED, domid, remote_port, self.handle_id),
                )
            self._ports[local] = None
            self._remote[local] = domid
            self._wake(self.handle_id)
            if lost_wake:
                self._wake(lost_wake)
            return local

    def notify(self, port: int) -> None:
        """Send an event to the other end of ``port``.

        The fast path reads this handle's own record without its table lock. Of a
        port bound through this handle, others only ever change the flags byte
        (their notifications) or make or end the binding (bind, unbind, domain
        destroy), always holding our lock. A read that shows the binding as ours
        and interdomain is the record as it was at some instant: what the locked
        read would have seen a moment earlier, and the locked version let go of the
        lock before it took the peer's anyway. Any other read (not ours, not
        interdomain, a peer table not open yet, a port out of range: also what a
        torn read would look like) takes the locked path, which decides exactly as
        before. Whether the event is delivered is decided under the peer's table
        lock only: the peer's record must point back at this port, and interdomain
        bindings are made and ended with both tables locked, one to one, so a
        record from any instant can only ever reach the right peer port or none."""
        with self._lock:
            if self._closed:
                raise EventChannelError("event channel handle is closed")
            if port not in self._ports:
                raise EventChannelError(f"d{self.domid} port {port}: not bound by this handle")
            state, _, remote_domid, remote_port, owner = _RECORD_UNPACK(
                self._own_map, port * _RECORD_SIZE)
            peer = self._tables.get(remote_domid)
            if (owner != self.handle_id or state != ECS_INTERDOMAIN or peer is None
                    or not 0 < remote_port < MAX_PORTS):
                with self._own.locked():
                    rec = self._own.get(port)
                if rec.owner != self.handle_id:
                    raise EventChannelError(f"d{self.domid} port {port}: not bound by this handle")
                if rec.state != ECS_INTERDOMAIN:
                    return  # Xen drops notifications on an unbound port silently
                remote_domid, remote_port = rec.remote_domid, rec.remote_port
                peer = self._table(remote_domid)
            pmap = peer._map
            poff = remote_port * _RECORD_SIZE
            wake = 0
            _flock(peer._fd, _LOCK_EX)
            try:
                pstate, pflags, pdom, pport, powner = _RECORD_UNPACK(pmap, poff)
                if pstate == ECS_INTERDOMAIN and pdom == self.domid and pport == port:
                    # an event arrives: deliver (mask + fired) or, masked, remember (pending)
                    if pflags & F_MASKED:
                        new = pflags | F_PENDING
                    else:
                        new = pflags | F_MASKED | F_FIRED
                    if new != pflags:
                        pmap[poff + 1] = new  # the flags byte only: nothing else changes
                    if new & F_FIRED and not pflags & F_FIRED:
                        wake = powner
            finally:
                _flock(peer._fd, _LOCK_UN)
            self.notifications_sent += 1
            if wake:
                self._wake(wake)

    def pending(self) -> Optional[int]:
        """The next port that fired, or None.

        The port tables are looked at only when the socket had a wake-up datagram
        in it (or ports collected earlier remain). That loses nothing, because
        everything that sets F_FIRED on a port of this handle sends this handle a
        datagram after setting it: ``notify`` (``wake`` above: the flag went from
        clear to set), ``unmask`` (a pending event re-delivered) and
        ``bind_interdomain`` (the bind-time event); nothing else sets it. If that
        send finds the socket full, the datagrams already queued are still there,
        and the drain that takes them ends after the flag was set. Every drain that
        received something is followed by a collect, under this handle's lock; so a
        flag set and not yet collected always has a datagram at or after it that no
        drain has taken yet, and the drain that takes it is followed by the collect
        that finds the flag. A drain that receives nothing proves no flag of ours is
        waiting, and the flock pass is skipped (it is the call that ends every
        engine pass: "drain until None")."""
        with self._lock:
            if self._closed:
                raise EventChannelError("event channel handle is closed")
            ready = self._ready
            if not ready:
                # drain before collecting: no wake-up can be lost
                if not self._drain():
                    return None
                self._collect()
                if not ready:
                    return None
            port = ready.popleft()
            if ready:
                self._wake(self.handle_id)  # keep the fd readable while ports remain
            return port

    def unmask(self, port: int) -> None:
        with self._lock:
            if self._closed:
                raise EventChannelError("event channel handle is closed")
            if port not in self._ports:
                raise EventChannelError(f"d{self.domid} port {port}: not bound by this handle")
            m = self._own_map
            off = port * _RECORD_SIZE
            wake = False
            fd = self._own._fd
            _flock(fd, _LOCK_EX)
            try:
                state, flags, _, _, owner = _RECORD_UNPACK(m, off)
                if owner != self.handle_id or state == ECS_FREE:
                    raise EventChannelError(f"d{self.domid} port {port}: not bound by this handle")
                new = flags & ~F_MASKED
                if new & F_PENDING:
                    new = (new & ~F_PENDING) | F_MASKED | F_FIRED
                    wake = True
                if new != flags:
                    m[off + 1] = new  # the flags byte only: nothing else changes
            finally:
                _flock(fd, _LOCK_UN)
            if wake:
                self._wake(self.handle_id)

    def unbind(self, port: int) -> None:
        with self._lock:
            self._check_mine(port)
            try:
                self._unbind_locked(port)
            finally:
                self._forget_remote(port)

    def _forget_remote(self, port: int) -> None:
        """Close the remote domain's port table once no port of this handle uses it (a
        handle shared by every disk of a daemon would otherwise keep two files of every
        guest that ever connected)."""
        domid = self._remote.pop(port, None)
        if domid is None or domid == self.domid or domid in self._remote.values():
            return
        table = self._tables.pop(domid, None)
        if table is not None:
            table.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                for port in list(self._ports):
                    self._unbind_locked(port)
            finally:
                self._closed = True
                self._sock.close()
                for table in self._tables.values():
                    table.close()
                self._tables.clear()

    # inspection ----------------------------------------------------------------
    def bound_ports(self) -> List[int]:
        """Local ports bound (or allocated unbound) through this handle."""
        with self._lock:
            return list(self._ports)

    # internals (self._lock held) ---------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise EventChannelError("event channel handle is closed")

    def _check_mine(self, port: int) -> None:
        self._check_open()
        if port not in self._ports:
            raise EventChannelError(f"d{self.domid} port {port}: not bound by this handle")

    def _table(self, domid: int) -> _PortTable:
        table = self._tables.get(domid)
        if table is None:
            table = self._tables[domid] = _PortTable(self._evdir, domid)
        return table

    def _unbind_locked(self, port: int) -> None:
        del self._ports[port]
        with contextlib.suppress(ValueError):
            self._ready.remove(port)
        with self._own.locked():
            rec = self._own.get(port)
        if rec.owner != self.handle_id or rec.state == ECS_FREE:
            return  # already closed underneath us (its domain was destroyed)
        tables = [self._own]
        if rec.state == ECS_INTERDOMAIN:
            tables.append(self._table(rec.remote_domid))
        with _locked_tables(*tables):
            rec = self._own.get(port)
            if rec.owner != self.handle_id or rec.state == ECS_FREE:
                return
            if rec.state == ECS_INTERDOMAIN:
                peer = self._table(rec.remote_domid)
                prec = peer.get(rec.remote_port)
                if (
                    prec.state == ECS_INTERDOMAIN
                    and prec.remote_domid == self.domid
                    and prec.remote_port == port
                ):
                    # Xen's evtchn_close: the other end goes back to unbound, reserved
                    # for us, so the same peer can bind to it again (reconnect)
                    peer.put(
                        rec.remote_port,
                        prec._replace(state=ECS_UNBOUND, remote_domid=self.domid, remote_port=0),
                    )
            self._own.put(port, FREE)

    def _reap_dead_binding(self, remote: _PortTable, remote_port: int, rrec: PortRecord) -> PortRecord:
        """``remote_port`` is bound to a port of our domain: if the handle that bound it
        belongs to a process that died (SIGKILL), close that binding as the kernel's
        evtchn driver does when the dead process's fd is released, so a restarted
        backend can bind again. Both tables locked."""
        lrec = self._own.get(rrec.remote_port)
        if (lrec.state != ECS_INTERDOMAIN or lrec.remote_port != remote_port
                or lrec.owner == self.handle_id or self._handle_alive(lrec.owner)):
            return rrec
        self._own.put(rrec.remote_port, FREE)
        unbound = rrec._replace(state=ECS_UNBOUND, remote_domid=self.domid, remote_port=0)
        remote.put(remote_port, unbound)
        return unbound

    def _handle_alive(self, handle_id: int) -> bool:
        """Whether the handle's socket still exists (it goes with its process)."""
        probe: socket.socket = original("socket", "socket")(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(_address(self._token, handle_id))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        finally:
            probe.close()
        return True

    def _collect(self) -> None:
        """Move the ports of this handle marked fired to ``_ready`` (one flock pass;
        the flags byte is the only thing read-modify-written)."""
        if not self._ports:
            return
        m = self._own_map
        hid = self.handle_id
        fd = self._own._fd
        _flock(fd, _LOCK_EX)
        try:
            for port in self._ports:
                off = port * _RECORD_SIZE
                flags = m[off + 1]
                if flags & F_FIRED and _OWNER_UNPACK(m, off + _OWNER_OFFSET)[0] == hid:
                    m[off + 1] = flags & ~F_FIRED
                    self._ready.append(port)
        finally:
            _flock(fd, _LOCK_UN)

    def _drain(self) -> bool:
        """Empty the socket; whether any wake-up datagram was in it. Polls before
        each recv: a recv that fails with EAGAIN costs an exception, a poll does not."""
        got = False
        poll = self._poll.poll
        recv = self._sock.recv
        while poll(0):
            try:
                recv(64)
            except (BlockingIOError, InterruptedError):
                break
            got = True
        return got

    def _wake(self, handle_id: int) -> None:
        try:
            addr = self._addrs.get(handle_id)
            if addr is None:
                addr = self._addrs[handle_id] = _address(self._token, handle_id)
            self._sock.sendto(b"\x01", socket.MSG_DONTWAIT, addr)
        except BlockingIOError:
            pass  # its queue is full: it is readable already and will collect
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # that handle is gone (its process died): like an event to a dead domain
        else:
            self.wakeups_sent += 1


def read_port(dir: str, domid: int, port: int) -> PortRecord:
    """The current record of ``port`` of ``domid`` (tests and diagnostics)."""
    if not _valid_port(port):
        raise EventChannelError(f"d{domid} port {port}: no such port")
    table = _PortTable(_evtchn_dir(dir), domid)
    try:
        with table.locked():
            return table.get(port)
    finally:
        table.close()


def close_domain_ports(dir: str, domid: int) -> None:
    """Close every port of a destroyed domain, as Xen does in domain_kill: the other
    end of each interdomain channel goes back to unbound (reserved for ``domid``).
    Handles of that domain still open find their ports gone."""
    evdir = _evtchn_dir(dir)
    own = _PortTable(evdir, domid)
    peers: Dict[int, _PortTable] = {}
    try:
        with own.locked():
            records = [(p, own.get(p)) for p in range(1, MAX_PORTS)]
        for port, rec in records:
            if rec.state != ECS_INTERDOMAIN or rec.remote_domid == domid:
                continue
            if rec.remote_domid not in peers:
                peers[rec.remote_domid] = _PortTable(evdir, rec.remote_domid)
            peer = peers[rec.remote_domid]
            with _locked_tables(own, peer):
                cur = own.get(port)
                if cur != rec:
                    continue
                prec = peer.get(rec.remote_port)
                if (
                    prec.state == ECS_INTERDOMAIN
                    and prec.remote_domid == domid
                    and prec.remote_port == port
                ):
                    peer.put(
                        rec.remote_port,
                        prec._replace(state=ECS_UNBOUND, remote_domid=domid, remote_port=0),
                    )
        with own.locked():
            for port in range(1, MAX_PORTS):
                own.put(port, FREE)
    finally:
        own.close()
        for table in peers.values():
            table.close()

