"""The NBD protocol on the wire (https://github.com/NetworkBlockDevice/nbd, doc/proto.md):
the fixed newstyle handshake and the transmission phase's simple replies (the client,
below), and every constant of the protocol, which the export server
(``gblk.storage.nbdserver``) shares: one definition of each.

Blocking calls on a real (never gevent-patched) ``_socket.socket``: this module runs
in the threadpool like every store. Structured replies are not negotiated, so a
conforming server answers every request with a simple reply; anything else on the
wire (a wrong magic, an unknown cookie, a reply longer than asked) is a
:class:`ProtocolError` and ends the connection.
"""

from __future__ import annotations

import _socket
import errno
import struct
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import StorageError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3

# structured replies (NBD_OPT_STRUCTURED_REPLY)
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# meta contexts: base:allocation's flags, and QEMU's dirty bitmaps (a dirty extent is 1)
CONTEXT_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
CONTEXT_DIRTY_BITMAP = "qemu:dirty-bitmap:"
STATE_DIRTY = 1 << 0

# the protocol's error numbers (Linux's, for the ones it names)
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

REQ = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
OPT = struct.Struct(">QII")  # IHAVEOPT, option, length
OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length

#: the longest option reply read (an export description is short; a server sending
#: more is hostile)
MAX_OPT_REPLY = 64 * 1024
#: a request's payload is at most this (the spec's advice: servers take 32 MiB)
MAX_PAYLOAD = 32 * 1024 * 1024
DEFAULT_PORT = 10809
#: most views one recvmsg_into fills (a socket hands over less than this many pages
#: per call anyway; a longer list costs Python work per call)
RECV_IOVECS = 64
#: socket buffers asked for: a 1 MiB read or write in few system calls
SOCKET_BUFFER = 4 * 1024 * 1024


class ProtocolError(OSError):
    """The server broke the protocol or the connection: the connection is unusable."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPROTO, message)


@dataclass(frozen=True)
class Address:
    """Where an export is: a Unix socket path, or host and port; and its name."""

    export: str
    unix: Optional[str] = None
    host: str = ""
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        where = f"unix:{self.unix}" if self.unix else f"{self.host}:{self.port}"
        return f"{where} export {self.export!r}"


def parse_uri(uri: str) -> Address:
    """``nbd://host[:port]/export`` or ``nbd+unix:///export?socket=PATH``."""
    u = urlsplit(uri)
    export = unquote(u.path[1:] if u.path.startswith("/") else u.path)
    if u.scheme == "nbd":
        if not u.hostname:
            raise StorageError(f"NBD URI {uri!r} has no host (nbd://host[:port]/export)")
        try:
            port = u.port or DEFAULT_PORT
        except ValueError:
            raise StorageError(f"NBD URI {uri!r}: bad port") from None
        return Address(export, host=u.hostname, port=port)
    if u.scheme == "nbd+unix":
        sock = parse_qs(u.query).get("socket")
        if u.netloc or not sock or not sock[0]:
            raise StorageError(f"NBD URI {uri!r}: nbd+unix:///export?socket=PATH expected")
        return Address(export, unix=sock[0])
    raise StorageError(f"NBD URI {uri!r}: scheme must be nbd or nbd+unix (TLS is not supported)")


@dataclass
class Export:
    size: int
    flags: int
    min_block: int = 1
    max_block: int = MAX_PAYLOAD


def connect(addr: Address, timeout: float) -> "_socket.socket":
    if addr.unix:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        target: Any = addr.unix
    else:
        infos = _socket.getaddrinfo(addr.host, addr.port, 0, _socket.SOCK_STREAM)
        if not infos:
            raise OSError(errno.EHOSTUNREACH, f"{addr.host}: no address")
        fam, typ, proto, _, target = infos[0]
        s = _socket.socket(fam, typ, proto)
    try:
        s.settimeout(timeout)
        for opt in (_socket.SO_SNDBUF, _socket.SO_RCVBUF):
            try:
                s.setsockopt(_socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass  # capped by net.core.*mem_max: what the kernel gives
        s.connect(target)
        if not addr.unix:
            s.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    except BaseException:
        s.close()
        raise
    return s


def recv_exact(s: "_socket.socket", n: int) -> bytes:
    buf = bytearray(n)
    recv_into_exact(s, memoryview(buf))
    return bytes(buf)


def recv_into_exact(s: "_socket.socket", view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = s.recv_into(view[got:] if got else view)
        if k == 0:
            raise ProtocolError("the server closed the connection")
        got += k


def recv_views(s: "_socket.socket", views: Sequence[memoryview]) -> None:
    """Fill every view, in order, with as few recvmsg_into calls as the data allows
    (one per arrival, not one per page)."""
    made: List[memoryview] = []  # views derived here: released, also on error
    pending = [_flat(v, made) for v in views]
    i = 0
    try:
        while i < len(pending):
            n = s.recvmsg_into(pending[i:i + RECV_IOVECS])[0]
            if n == 0:
                raise ProtocolError("the server closed the connection")
            while i < len(pending) and n >= len(pending[i]):
                n -= len(pending[i])
                i += 1
            if n:
                pending[i] = pending[i][n:]
                made.append(pending[i])
    finally:
        pending.clear()
        for v in made:
            v.release()


def _flat(v: memoryview, made: List[memoryview]) -> memoryview:
    """``v`` as unsigned bytes in one dimension (a derived view goes into ``made``).
    A derived view of a guest page that outlived the call (kept by a traceback)
    would keep the page's grant from being unmapped."""
    if v.format == "B" and v.ndim == 1:
        return v
    f = v.cast("B")
    made.append(f)
    return f


def send_all(s: "_socket.socket", parts: Sequence[object]) -> None:
    """sendmsg until every byte of ``parts`` went (header and data in one call)."""
    made: List[memoryview] = []
    pending: List[memoryview] = []
    for p in parts:
        if isinstance(p, memoryview):
            pending.append(_flat(p, made))
        else:
            m = memoryview(p)  # type: ignore[arg-type]
            made.append(m)
            pending.append(_flat(m, made))
    try:
        while pending:
            n = s.sendmsg(pending[:1024])
            while pending and n >= len(pending[0]):
                n -= len(pending[0])
                pending.pop(0)
            if n:
                pending[0] = pending[0][n:]
                made.append(pending[0])
    finally:
        pending.clear()
        for v in reversed(made):
            v.release()


def _option(s: "_socket.socket", opt: int, data: bytes) -> None:
    send_all(s, [OPT.pack(IHAVEOPT, opt, len(data)), data])


def _opt_reply(s: "_socket.socket", opt: int) -> Tuple[int, bytes]:
    magic, ropt, rtype, length = OPT_REPLY.unpack(recv_exact(s, OPT_REPLY.size))
    if magic != OPT_REPLY_MAGIC or ropt != opt:
        raise ProtocolError(f"bad option reply (magic {magic:#x}, option {ropt})")
    if length > MAX_OPT_REPLY:
        raise ProtocolError(f"option reply of {length} bytes")
    return rtype, recv_exact(s, length)


def handshake(s: "_socket.socket", export: str, info_only: bool = False) -> Export:
    """The fixed newstyle handshake up to the transmission phase (``info_only``: ask
    NBD_OPT_INFO and abort instead, to read the current size)."""
    magic, ihaveopt, hflags = struct.unpack(">QQH", recv_exact(s, 18))
    if magic != NBDMAGIC:
        raise ProtocolError(f"not an NBD server (magic {magic:#x})")
    if ihaveopt != IHAVEOPT or not hflags & FLAG_FIXED_NEWSTYLE:
        raise ProtocolError("the server does not speak the fixed newstyle protocol")
    no_zeroes = hflags & FLAG_NO_ZEROES
    s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | no_zeroes))
    name = export.encode()
    opt = OPT_INFO if info_only else OPT_GO
    _option(s, opt, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
    exp: Optional[Export] = None
    blocks: Optional[Tuple[int, int]] = None
    while True:
        rtype, data = _opt_reply(s, opt)
        if rtype == REP_ACK:
            break
        if rtype == REP_INFO and len(data) >= 2:
            kind = struct.unpack_from(">H", data)[0]
            if kind == INFO_EXPORT and len(data) == 12:
                size, flags = struct.unpack_from(">QH", data, 2)
                exp = Export(size, flags)
            elif kind == INFO_BLOCK_SIZE and len(data) == 14:
                mn, _pref, mx = struct.unpack_from(">III", data, 2)
                blocks = (mn, mx)
            continue
        if rtype == REP_ERR_UNSUP and not info_only:
            return _export_name(s, name, no_zeroes)
        if rtype & (1 << 31):
            msg = data.decode("utf-8", "replace").strip()
            raise StorageError(f"the NBD server refused export {export!r}"
                               f" (error {rtype & 0x7FFFFFFF}{': ' + msg if msg else ''})")
        # an unknown informational reply: ignored, as the protocol says
    if exp is None:
        raise ProtocolError("the server acknowledged the export without its size")
    if blocks is not None:
        exp.min_block = max(1, blocks[0])
        exp.max_block = max(exp.min_block, min(blocks[1], MAX_PAYLOAD))
    if info_only:
        _option(s, OPT_ABORT, b"")
    return exp


def _export_name(s: "_socket.socket", name: bytes, no_zeroes: int) -> Export:
    """The old way in, for servers without NBD_OPT_GO."""
    _option(s, OPT_EXPORT_NAME, name)
    size, flags = struct.unpack(">QH", recv_exact(s, 10))
    if not no_zeroes:
        recv_exact(s, 124)
    return Export(size, flags)


def request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQ.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def read_reply_header(s: "_socket.socket") -> Tuple[int, int]:
    """(error, cookie) of the next simple reply."""
    magic, error, cookie = SIMPLE_REPLY.unpack(recv_exact(s, SIMPLE_REPLY.size))
    if magic != SIMPLE_REPLY_MAGIC:
        what = "a structured reply (not negotiated)" if magic == STRUCTURED_REPLY_MAGIC else \
            f"magic {magic:#x}"
        raise ProtocolError(f"bad reply from the server: {what}")
    return error, cookie


#: NBD error numbers are Linux's for the ones the protocol names
_ERRORS = {NBD_EPERM: errno.EPERM, NBD_EIO: errno.EIO, NBD_ENOMEM: errno.ENOMEM,
           NBD_EINVAL: errno.EINVAL, NBD_ENOSPC: errno.ENOSPC, NBD_EOVERFLOW: errno.EOVERFLOW,
           NBD_ENOTSUP: errno.EOPNOTSUPP, NBD_ESHUTDOWN: errno.ESHUTDOWN}
#: and back: what a server answers for an OSError (EIO for the others)
NBD_ERRNO = {v: k for k, v in _ERRORS.items()}


def reply_error(error: int, what: str) -> OSError:
    code = _ERRORS.get(error, errno.EIO)
    return OSError(code, f"NBD server: {what} failed: {errno.errorcode.get(code, code)}")
