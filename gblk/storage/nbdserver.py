"""The NBD protocol, server side, read-only: what ``gblk ctl export`` speaks.

https://github.com/NetworkBlockDevice/nbd, doc/proto.md: the fixed newstyle
handshake (NBD_OPT_EXPORT_NAME, LIST, INFO, GO, STRUCTURED_REPLY,
LIST_META_CONTEXT, SET_META_CONTEXT, ABORT), then the transmission phase
(NBD_CMD_READ, NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC; a flush is a no-op; WRITE, TRIM
and WRITE_ZEROES are refused with EPERM, a write's payload read and dropped). One
request at a time per connection, answered in order (structured replies when the
client asked for them, simple replies otherwise).

Pure protocol: :func:`serve` calls only ``conn.recv``/``conn.sendall`` and the
:class:`Export` callbacks, whatever they block on; the daemon passes a gevent
socket and callbacks that go through its threadpool (``gblk.device.export``), the
unit tests a socketpair and plain functions. The constants are
``gblk.storage.nbdwire``'s (one definition, shared with the client). A peer that
breaks the protocol (a wrong magic, an option or request too long) gets
:class:`ProtocolError` raised out of :func:`serve`: the caller closes the
connection, nothing else is touched.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import nbdwire as w
from .nbdwire import ProtocolError

#: the longest option a client may send (names and queries are short)
MAX_OPTION = 64 * 1024
#: most block-status descriptors in one reply chunk
MAX_DESCRIPTORS = 64 * 1024
#: the block sizes advertised: any offset, 4 KiB preferred, reads up to this
PREFERRED_BLOCK = 4096
MAX_BLOCK = 32 * 1024 * 1024

#: (offset, length) -> [(length, flags), ...] covering a prefix of the range, in order
StatusFn = Callable[[int, int], List[Tuple[int, int]]]


@dataclass
class Export:
    """What is served: its size, the names a client may ask for (``""`` is the
    default export), ``read(offset, length) -> bytes`` (raises OSError) and the meta
    contexts by name."""

    size: int
    names: Sequence[str]
    read: Callable[[int, int], bytes]
    contexts: Dict[str, StatusFn] = field(default_factory=dict)
    description: str = ""
    #: called with the bytes of each read served (metrics)
    on_read: Optional[Callable[[int], None]] = None


@dataclass
class _Session:
    structured: bool = False
    #: the meta contexts the client selected: id -> name (the id is its place in
    #: ``Export.contexts``)
    contexts: Dict[int, str] = field(default_factory=dict)


def _recv(conn: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ProtocolError("the client closed the connection")
        buf += chunk
    return bytes(buf)


def _opt_reply(conn: Any, opt: int, rtype: int, data: bytes = b"") -> None:
    conn.sendall(w.OPT_REPLY.pack(w.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)


def _error(conn: Any, opt: int, rtype: int, message: str) -> None:
    _opt_reply(conn, opt, rtype, message.encode())


def _name(data: bytes, at: int = 0) -> Tuple[str, int]:
    """A length-prefixed string at ``at``; (it, the offset after it). ValueError if short."""
    if len(data) < at + 4:
        raise ValueError("truncated")
    (n,) = struct.unpack_from(">I", data, at)
    end = at + 4 + n
    if len(data) < end:
        raise ValueError("truncated")
    return data[at + 4:end].decode("utf-8", "replace"), end


def _matches(contexts: Sequence[str], query: str, listing: bool) -> List[str]:
    """The contexts a query names: itself; when listing, a namespace (``base:``,
    ``qemu:dirty-bitmap:``) lists what is in it."""
    if query in contexts:
        return [query]
    if listing and query.endswith(":"):
        return [c for c in contexts if c.startswith(query)]
    return []


def handshake(conn: Any, export: Export) -> Optional[_Session]:
    """The fixed newstyle handshake; the session to serve, or None when the client
    ended it (NBD_OPT_ABORT, or a bare disconnect after a LIST)."""
    conn.sendall(struct.pack(">QQH", w.NBDMAGIC, w.IHAVEOPT,
                             w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES))
    (cflags,) = struct.unpack(">I", _recv(conn, 4))
    if cflags & ~(w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES):
        raise ProtocolError(f"unknown client flags {cflags:#x}")
    no_zeroes = bool(cflags & w.FLAG_NO_ZEROES)
    session = _Session()
    names = list(export.contexts)
    while True:
        try:
            magic, opt, length = w.OPT.unpack(_recv(conn, w.OPT.size))
        except ProtocolError:
            return None  # a client that only listed, or gave up
        if magic != w.IHAVEOPT:
            raise ProtocolError(f"not an NBD option (magic {magic:#x})")
        if length > MAX_OPTION:
            raise ProtocolError(f"an option of {length} bytes")
        data = _recv(conn, length)
        if opt == w.OPT_EXPORT_NAME:
            if data.decode("utf-8", "replace") not in export.names:
                raise ProtocolError("unknown export")  # the old way has no error reply
            conn.sendall(struct.pack(">QH", export.size, _flags())
                         + (b"" if no_zeroes else bytes(124)))
            return session
        if opt == w.OPT_ABORT:
            _opt_reply(conn, opt, w.REP_ACK)
            return None
        if opt == w.OPT_LIST:
            if data:
                _error(conn, opt, w.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                continue
            for n in export.names:
                if n:
                    raw = n.encode()
                    _opt_reply(conn, opt, w.REP_SERVER, struct.pack(">I", len(raw)) + raw)
            _opt_reply(conn, opt, w.REP_ACK)
        elif opt in (w.OPT_INFO, w.OPT_GO):
            if _info(conn, opt, data, export) and opt == w.OPT_GO:
                return session
        elif opt == w.OPT_STRUCTURED_REPLY:
            if data:
                _error(conn, opt, w.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                continue
            session.structured = True
            _opt_reply(conn, opt, w.REP_ACK)
        elif opt in (w.OPT_LIST_META_CONTEXT, w.OPT_SET_META_CONTEXT):
            _meta(conn, opt, data, export, names, session)
        elif opt == w.OPT_STARTTLS:
            _error(conn, opt, w.REP_ERR_POLICY, "TLS is not offered: the export is on a "
                   "local socket")
        else:
            _error(conn, opt, w.REP_ERR_UNSUP, f"option {opt} is not supported")


def _flags() -> int:
    return w.TF_HAS_FLAGS | w.TF_READ_ONLY | w.TF_SEND_FLUSH | w.TF_CAN_MULTI_CONN


def _info(conn: Any, opt: int, data: bytes, export: Export) -> bool:
    try:
        name, at = _name(data)
        if len(data) < at + 2:
            raise ValueError("truncated")
        (nreq,) = struct.unpack_from(">H", data, at)
        if len(data) != at + 2 + 2 * nreq:
            raise ValueError("bad length")
        wanted = struct.unpack_from(f">{nreq}H", data, at + 2)
    except ValueError:
        _error(conn, opt, w.REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO")
        return False
    if name not in export.names:
        _error(conn, opt, w.REP_ERR_UNKNOWN, f"no export {name!r} here")
        return False
    _opt_reply(conn, opt, w.REP_INFO, struct.pack(">HQH", w.INFO_EXPORT, export.size, _flags()))
    _opt_reply(conn, opt, w.REP_INFO, struct.pack(">HIII", w.INFO_BLOCK_SIZE, 1,
                                                  PREFERRED_BLOCK, MAX_BLOCK))
    if w.INFO_DESCRIPTION in wanted and export.description:
        _opt_reply(conn, opt, w.REP_INFO, struct.pack(">H", w.INFO_DESCRIPTION)
                   + export.description.encode())
    _opt_reply(conn, opt, w.REP_ACK)
    return True


def _meta(conn: Any, opt: int, data: bytes, export: Export, names: List[str],
          session: _Session) -> None:
    setting = opt == w.OPT_SET_META_CONTEXT
    if setting and not session.structured:
        _error(conn, opt, w.REP_ERR_INVALID, "negotiate structured replies first")
        return
    try:
        name, at = _name(data)
        if len(data) < at + 4:
            raise ValueError("truncated")
        (nq,) = struct.unpack_from(">I", data, at)
        at += 4
        queries = []
        for _ in range(nq):
            q, at = _name(data, at)
            queries.append(q)
        if at != len(data):
            raise ValueError("trailing bytes")
    except ValueError:
        _error(conn, opt, w.REP_ERR_INVALID, "malformed meta context option")
        return
    if name not in export.names:
        _error(conn, opt, w.REP_ERR_UNKNOWN, f"no export {name!r} here")
        return
    if not queries and not setting:
        chosen = list(names)
    else:
        chosen = []
        for q in queries:
            for c in _matches(names, q, listing=not setting):
                if c not in chosen:
                    chosen.append(c)
    if setting:
        session.contexts = {names.index(c): c for c in chosen}
    for c in chosen:
        _opt_reply(conn, opt, w.REP_META_CONTEXT,
                   struct.pack(">I", names.index(c) if setting else 0) + c.encode())
    _opt_reply(conn, opt, w.REP_ACK)


# -- transmission --------------------------------------------------------------------------
def serve(conn: Any, export: Export,
          on_transmission: Optional[Callable[[], None]] = None) -> None:
    """The whole connection: handshake, then requests until NBD_CMD_DISC or the
    client goes (``on_transmission`` is called in between: the caller's handshake
    timeout can go). Raises ProtocolError for a client breaking the protocol."""
    session = handshake(conn, export)
    if session is None:
        return
    if on_transmission is not None:
        on_transmission()
    while True:
        try:
            head = _recv(conn, w.REQ.size)
        except ProtocolError:
            return  # gone without NBD_CMD_DISC: as good as one
        magic, flags, cmd, cookie, offset, length = w.REQ.unpack(head)
        if magic != w.REQUEST_MAGIC:
            raise ProtocolError(f"not an NBD request (magic {magic:#x})")
        if cmd == w.CMD_DISC:
            return
        if cmd == w.CMD_WRITE:
            if length > MAX_BLOCK:
                raise ProtocolError(f"a write of {length} bytes")
            _recv(conn, length)  # the payload, dropped
            _fail(conn, session, cookie, w.NBD_EPERM, "the export is read-only")
        elif cmd in (w.CMD_TRIM, w.CMD_WRITE_ZEROES):
            _fail(conn, session, cookie, w.NBD_EPERM, "the export is read-only")
        elif cmd == w.CMD_FLUSH:
            _done(conn, session, cookie)
        elif cmd == w.CMD_READ:
            _read(conn, session, export, cookie, offset, length)
        elif cmd == w.CMD_BLOCK_STATUS:
            _status(conn, session, export, cookie, offset, length, flags)
        else:
            _fail(conn, session, cookie, w.NBD_EINVAL, f"command {cmd} is not supported")


def _in_range(export: Export, offset: int, length: int) -> bool:
    return length > 0 and offset + length <= export.size


def _chunk(conn: Any, cookie: int, rtype: int, payload: Sequence[bytes], flags: int) -> None:
    n = sum(len(p) for p in payload)
    conn.sendall(b"".join([w.STRUCTURED_REPLY.pack(w.STRUCTURED_REPLY_MAGIC, flags, rtype,
                                                   cookie, n), *payload]))


def _done(conn: Any, session: _Session, cookie: int) -> None:
    if session.structured:
        _chunk(conn, cookie, w.REPLY_TYPE_NONE, [], w.REPLY_FLAG_DONE)
    else:
        conn.sendall(w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, cookie))


def _fail(conn: Any, session: _Session, cookie: int, error: int, message: str) -> None:
    if session.structured:
        msg = message.encode()[:4096]
        _chunk(conn, cookie, w.REPLY_TYPE_ERROR, [struct.pack(">IH", error, len(msg)), msg],
               w.REPLY_FLAG_DONE)
    else:
        conn.sendall(w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, error, cookie))


def _read(conn: Any, session: _Session, export: Export, cookie: int, offset: int,
          length: int) -> None:
    if not _in_range(export, offset, length) or length > MAX_BLOCK:
        _fail(conn, session, cookie, w.NBD_EINVAL,
              f"read of {length} bytes at {offset}: outside the export of {export.size}")
        return
    try:
        data = export.read(offset, length)
    except OSError as e:
        _fail(conn, session, cookie, w.NBD_ERRNO.get(e.errno or errno.EIO, w.NBD_EIO),
              e.strerror or str(e))
        return
    if export.on_read is not None:
        export.on_read(length)
    if session.structured:
        _chunk(conn, cookie, w.REPLY_TYPE_OFFSET_DATA, [struct.pack(">Q", offset), data],
               w.REPLY_FLAG_DONE)
    else:
        conn.sendall(w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, cookie) + data)


def _status(conn: Any, session: _Session, export: Export, cookie: int, offset: int,
            length: int, flags: int) -> None:
    if not session.structured or not session.contexts:
        _fail(conn, session, cookie, w.NBD_EINVAL, "no meta context selected "
              "(NBD_OPT_SET_META_CONTEXT)")
        return
    if not _in_range(export, offset, length):
        _fail(conn, session, cookie, w.NBD_EINVAL,
              f"block status of {length} bytes at {offset}: outside the export")
        return
    ids = sorted(session.contexts)
    for k, cid in enumerate(ids):
        try:
            extents = export.contexts[session.contexts[cid]](offset, length)
        except OSError as e:
            _fail(conn, session, cookie, w.NBD_ERRNO.get(e.errno or errno.EIO, w.NBD_EIO),
                  e.strerror or str(e))
            return
        if flags & w.CMD_FLAG_REQ_ONE:
            extents = extents[:1]
        body = [struct.pack(">I", cid)]
        body += [struct.pack(">II", n, f) for n, f in extents[:MAX_DESCRIPTORS]]
        _chunk(conn, cookie, w.REPLY_TYPE_BLOCK_STATUS, body,
               w.REPLY_FLAG_DONE if k == len(ids) - 1 else 0)
