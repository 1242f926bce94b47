"""The export's NBD server protocol (gblk.storage.nbdserver) against gblk's own client
functions and hand-made options, over a socketpair, the server in a greenlet."""

from __future__ import annotations

import socket
import struct
from typing import Any, List, Tuple

import gevent
import pytest

from gblk.storage import nbdserver
from gblk.storage import nbdwire as w

SIZE = 1 << 20
DATA = bytes((i * 7 + (i >> 9)) & 0xFF for i in range(SIZE))


def _export(**kw: Any) -> nbdserver.Export:
    def read(offset: int, length: int) -> bytes:
        if offset == 4096 * 9:
            raise OSError(5, "injected")
        return DATA[offset:offset + length]

    contexts = {w.CONTEXT_BASE_ALLOCATION: lambda o, n: [(n, 0)],
                w.CONTEXT_DIRTY_BITMAP + "cbt": lambda o, n: [(min(n, 65536), 1), (n - min(n, 65536), 0)]
                if n > 65536 else [(n, 1)]}
    return nbdserver.Export(size=SIZE, names=("", "d1/51712"), read=read,
                            contexts=kw.pop("contexts", contexts), **kw)


class Pair:
    def __init__(self, export: nbdserver.Export) -> None:
        self.client, server = socket.socketpair()
        self.client.settimeout(10)
        self.error: List[BaseException] = []

        def run() -> None:
            try:
                nbdserver.serve(server, export)
            except BaseException as e:  # noqa: BLE001
                self.error.append(e)
            finally:
                server.close()

        self.g = gevent.spawn(run)

    def close(self) -> None:
        self.client.close()
        self.g.join(timeout=10)


def _opt(s: Any, opt: int, data: bytes = b"") -> None:
    s.sendall(w.OPT.pack(w.IHAVEOPT, opt, len(data)) + data)


def _replies(s: Any, opt: int) -> List[Tuple[int, bytes]]:
    out = []
    while True:
        magic, ropt, rtype, n = w.OPT_REPLY.unpack(w.recv_exact(s, w.OPT_REPLY.size))
        assert magic == w.OPT_REPLY_MAGIC and ropt == opt
        out.append((rtype, w.recv_exact(s, n)))
        if rtype == w.REP_ACK or rtype & (1 << 31):
            return out


def _greet(s: Any) -> None:
    magic, ihave, flags = struct.unpack(">QQH", w.recv_exact(s, 18))
    assert (magic, ihave) == (w.NBDMAGIC, w.IHAVEOPT) and flags & w.FLAG_FIXED_NEWSTYLE
    s.sendall(struct.pack(">I", w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES))


def _meta(name: str, queries: List[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def _chunks(s: Any) -> List[Tuple[int, int, int, bytes]]:
    """Structured reply chunks up to the one flagged DONE: (flags, type, cookie, payload)."""
    out = []
    while True:
        magic, flags, rtype, cookie, n = w.STRUCTURED_REPLY.unpack(
            w.recv_exact(s, w.STRUCTURED_REPLY.size))
        assert magic == w.STRUCTURED_REPLY_MAGIC
        out.append((flags, rtype, cookie, w.recv_exact(s, n)))
        if flags & w.REPLY_FLAG_DONE:
            return out


def test_simple_replies_read_and_refuse_writes():
    p = Pair(_export())
    try:
        s = p.client
        exp = w.handshake(s, "d1/51712")
        assert exp.size == SIZE and exp.flags & w.TF_READ_ONLY and exp.max_block >= 1 << 20
        s.sendall(w.request(w.CMD_READ, 1, 4096, 8192))
        assert w.read_reply_header(s) == (0, 1)
        assert w.recv_exact(s, 8192) == DATA[4096:4096 + 8192]
        s.sendall(w.request(w.CMD_WRITE, 2, 0, 512) + bytes(512))
        assert w.read_reply_header(s) == (w.NBD_EPERM, 2)
        for cmd in (w.CMD_TRIM, w.CMD_WRITE_ZEROES):
            s.sendall(w.request(cmd, 3, 0, 512))
            assert w.read_reply_header(s) == (w.NBD_EPERM, 3)
        s.sendall(w.request(w.CMD_READ, 4, SIZE - 512, 1024))  # past the end
        assert w.read_reply_header(s) == (w.NBD_EINVAL, 4)
        s.sendall(w.request(w.CMD_READ, 5, 4096 * 9, 512))  # the store fails
        assert w.read_reply_header(s) == (w.NBD_EIO, 5)
        s.sendall(w.request(w.CMD_BLOCK_STATUS, 6, 0, 512))  # no context: refused
        assert w.read_reply_header(s) == (w.NBD_EINVAL, 6)
        s.sendall(w.request(w.CMD_FLUSH, 7, 0, 0))
        assert w.read_reply_header(s) == (0, 7)
        s.sendall(w.request(w.CMD_DISC, 8, 0, 0))
        p.g.join(timeout=10)
        assert p.g.dead and not p.error
    finally:
        p.close()


def test_structured_replies_meta_contexts_and_block_status():
    p = Pair(_export())
    try:
        s = p.client
        _greet(s)
        _opt(s, w.OPT_SET_META_CONTEXT, _meta("", [w.CONTEXT_BASE_ALLOCATION]))
        assert _replies(s, w.OPT_SET_META_CONTEXT)[-1][0] == w.REP_ERR_INVALID  # not yet
        _opt(s, w.OPT_STRUCTURED_REPLY)
        assert _replies(s, w.OPT_STRUCTURED_REPLY) == [(w.REP_ACK, b"")]
        _opt(s, w.OPT_LIST_META_CONTEXT, _meta("", []))
        listed = _replies(s, w.OPT_LIST_META_CONTEXT)
        assert [d[4:].decode() for t, d in listed if t == w.REP_META_CONTEXT] == [
            "base:allocation", "qemu:dirty-bitmap:cbt"]
        _opt(s, w.OPT_LIST_META_CONTEXT, _meta("", ["qemu:"]))
        listed = _replies(s, w.OPT_LIST_META_CONTEXT)
        assert [d[4:].decode() for t, d in listed if t == w.REP_META_CONTEXT] == [
            "qemu:dirty-bitmap:cbt"]
        _opt(s, w.OPT_SET_META_CONTEXT, _meta("nope", ["base:allocation"]))
        assert _replies(s, w.OPT_SET_META_CONTEXT)[-1][0] == w.REP_ERR_UNKNOWN
        _opt(s, w.OPT_SET_META_CONTEXT,
             _meta("", ["base:allocation", "qemu:dirty-bitmap:cbt", "qemu:dirty-bitmap:x"]))
        chosen = {struct.unpack(">I", d[:4])[0]: d[4:].decode()
                  for t, d in _replies(s, w.OPT_SET_META_CONTEXT) if t == w.REP_META_CONTEXT}
        assert sorted(chosen.values()) == ["base:allocation", "qemu:dirty-bitmap:cbt"]
        name = b"d1/51712"
        _opt(s, w.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        got = _replies(s, w.OPT_GO)
        assert got[-1][0] == w.REP_ACK
        info = [d for t, d in got if t == w.REP_INFO and d[:2] == b"\x00\x00"][0]
        assert struct.unpack(">HQH", info)[1] == SIZE

        s.sendall(w.request(w.CMD_READ, 1, 512, 4096))
        [(flags, rtype, cookie, payload)] = _chunks(s)
        assert (rtype, cookie) == (w.REPLY_TYPE_OFFSET_DATA, 1)
        assert struct.unpack(">Q", payload[:8])[0] == 512 and payload[8:] == DATA[512:4608]

        s.sendall(w.request(w.CMD_BLOCK_STATUS, 2, 0, 3 * 65536))
        chunks = _chunks(s)
        assert len(chunks) == 2 and all(c[1] == w.REPLY_TYPE_BLOCK_STATUS for c in chunks)
        by_name = {}
        for _flags, _t, _c, payload in chunks:
            cid = struct.unpack(">I", payload[:4])[0]
            body = payload[4:]
            by_name[chosen[cid]] = [struct.unpack(">II", body[i:i + 8])
                                    for i in range(0, len(body), 8)]
        assert by_name["base:allocation"] == [(3 * 65536, 0)]
        assert by_name["qemu:dirty-bitmap:cbt"] == [(65536, 1), (2 * 65536, 0)]
        s.sendall(w.request(w.CMD_BLOCK_STATUS, 3, 0, 3 * 65536, w.CMD_FLAG_REQ_ONE))
        one = _chunks(s)
        assert all(len(c[3]) == 4 + 8 for c in one)

        s.sendall(w.request(w.CMD_WRITE, 4, 0, 512) + bytes(512))
        [(flags, rtype, cookie, payload)] = _chunks(s)
        assert rtype == w.REPLY_TYPE_ERROR and struct.unpack(">I", payload[:4])[0] == w.NBD_EPERM
        s.sendall(w.request(w.CMD_DISC, 5, 0, 0))
        p.g.join(timeout=10)
        assert not p.error
    finally:
        p.close()


def test_list_abort_and_the_old_way_in():
    p = Pair(_export())
    try:
        s = p.client
        _greet(s)
        _opt(s, w.OPT_LIST)
        got = _replies(s, w.OPT_LIST)
        assert [d[4:] for t, d in got if t == w.REP_SERVER] == [b"d1/51712"]
        _opt(s, 99)
        assert _replies(s, 99)[-1][0] == w.REP_ERR_UNSUP
        _opt(s, w.OPT_STARTTLS)
        assert _replies(s, w.OPT_STARTTLS)[-1][0] == w.REP_ERR_POLICY
        _opt(s, w.OPT_EXPORT_NAME, b"")
        size, flags = struct.unpack(">QH", w.recv_exact(s, 10))
        assert size == SIZE and flags & w.TF_READ_ONLY
        s.sendall(w.request(w.CMD_READ, 1, 0, 512))
        assert w.read_reply_header(s) == (0, 1) and w.recv_exact(s, 512) == DATA[:512]
    finally:
        p.close()
    assert not p.error
    p = Pair(_export())
    try:
        _greet(p.client)
        _opt(p.client, w.OPT_ABORT)
        assert _replies(p.client, w.OPT_ABORT) == [(w.REP_ACK, b"")]
        p.g.join(timeout=10)
        assert p.g.dead and not p.error
    finally:
        p.close()


@pytest.mark.parametrize("garbage", [
    b"\x00\x00\x00\x03" + b"GET / HTTP/1.1\r\n\r\n",  # not an option
    b"\x00\x00\x00\x03" + w.OPT.pack(w.IHAVEOPT, w.OPT_GO, 1 << 30),  # an option too long
    b"\xff\xff\xff\xff",  # unknown client flags
])
def test_garbage_ends_the_connection_with_a_protocol_error(garbage):
    p = Pair(_export())
    try:
        w.recv_exact(p.client, 18)
        p.client.sendall(garbage)
        p.g.join(timeout=10)
        assert p.g.dead
        assert len(p.error) == 1 and isinstance(p.error[0], w.ProtocolError)
    finally:
        p.close()


def test_a_bad_request_magic_in_transmission_is_a_protocol_error():
    p = Pair(_export())
    try:
        w.handshake(p.client, "")
        p.client.sendall(b"\x00" * w.REQ.size)
        p.g.join(timeout=10)
        assert len(p.error) == 1 and isinstance(p.error[0], w.ProtocolError)
    finally:
        p.close()
