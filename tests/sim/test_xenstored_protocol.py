"""The simulated xenstored on the wire: a process of its own, driven through raw Unix
sockets with hand-built messages (header = four native u32: type, req_id, tx_id, len).
Error names, message order, transactions, domains, permissions, quotas and the
per-connection memory bound (XSA-349) are checked as a client sees them."""

from __future__ import annotations

import os
import socket
import struct
from typing import Iterator, List, Optional, Tuple

import pytest

from ..integration.xenstored_support import running_xenstored

HEADER = struct.Struct("=IIII")

XS_DIRECTORY, XS_READ, XS_GET_PERMS, XS_WATCH, XS_UNWATCH = 1, 2, 3, 4, 5
XS_TRANSACTION_START, XS_TRANSACTION_END, XS_INTRODUCE, XS_RELEASE = 6, 7, 8, 9
XS_GET_DOMAIN_PATH, XS_WRITE, XS_MKDIR, XS_RM, XS_SET_PERMS = 10, 11, 12, 13, 14
XS_WATCH_EVENT, XS_ERROR, XS_IS_DOMAIN_INTRODUCED, XS_SET_TARGET = 15, 16, 17, 19
XS_RESET_WATCHES = 21

Msg = Tuple[int, int, int, bytes]


class Raw:
    """A blocking client speaking the wire protocol; watch events that arrive
    before a reply are kept in ``events``."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)  # a hang guard, not a timing assertion
        self.sock.connect(path)
        self.events: List[Tuple[bytes, bytes]] = []

    def send(self, mtype: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> None:
        self.sock.sendall(HEADER.pack(mtype, req_id, tx_id, len(payload)) + payload)

    def recv_msg(self) -> Optional[Msg]:
        header = self._recv(HEADER.size)
        if header is None:
            return None
        mtype, req_id, tx_id, length = HEADER.unpack(header)
        payload = self._recv(length) if length else b""
        assert payload is not None
        return mtype, req_id, tx_id, payload

    def _recv(self, size: int) -> Optional[bytes]:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def call(self, mtype: int, *args: bytes, tx_id: int = 0, raw: Optional[bytes] = None,
             req_id: int = 1) -> Msg:
        payload = raw if raw is not None else b"".join(a + b"\0" for a in args)
        self.send(mtype, payload, req_id, tx_id)
        while True:
            msg = self.recv_msg()
            assert msg is not None, "connection closed"
            if msg[0] == XS_WATCH_EVENT:
                path, token = msg[3].split(b"\0")[:2]
                self.events.append((path, token))
                continue
            return msg

    def ok(self, mtype: int, *args: bytes, tx_id: int = 0) -> bytes:
        msg = self.call(mtype, *args, tx_id=tx_id)
        assert msg[0] == mtype, msg
        return msg[3]

    def error(self, mtype: int, *args: bytes, tx_id: int = 0, raw: Optional[bytes] = None) -> str:
        msg = self.call(mtype, *args, tx_id=tx_id, raw=raw)
        assert msg[0] == XS_ERROR, msg
        assert msg[3].endswith(b"\0")
        return msg[3][:-1].decode()

    def sync(self) -> None:
        """A round trip: every event sent before it is in ``events`` afterwards
        (the initial event of a WATCH follows its reply)."""
        self.ok(XS_GET_DOMAIN_PATH, b"0")

    def write(self, path: str, value: bytes, tx_id: int = 0) -> None:
        assert self.call(XS_WRITE, raw=path.encode() + b"\0" + value, tx_id=tx_id)[3] == b"OK\0"

    def read_to_eof(self) -> int:
        """Read until the server closes the connection; return the bytes read.
        (Closing with our unread request bytes in its buffer resets the socket.)"""
        total = 0
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return total
            if not chunk:
                return total
            total += len(chunk)

    def close(self) -> None:
        self.sock.close()


def perms_home(dom0: Raw, domid: int) -> str:
    """Make /local/domain/<domid> owned by the guest, as a toolstack does."""
    home = f"/local/domain/{domid}"
    dom0.ok(XS_MKDIR, home.encode())
    dom0.ok(XS_SET_PERMS, home.encode(), f"n{domid}".encode(), b"r0")
    return home


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_xenstored() as sock:
        yield sock


@pytest.fixture(scope="module")
def tight() -> Iterator[str]:
    """A server with small quotas."""
    with running_xenstored("--watch-nb", "3", "--transaction", "2", "--entry-nb", "12",
                           "--entry-size", "600", "--perm-nb", "3",
                           "--max-queued-bytes", "65536") as sock:
        yield sock


@pytest.fixture
def dom0(server: str) -> Iterator[Raw]:
    c = Raw(server)
    yield c
    c.close()


def test_replies_echo_ids_and_errors_are_named(dom0: Raw) -> None:
    """A reply carries the request's type, req_id and tx_id; errors are XS_ERROR
    with xenstored's error name, NUL-terminated."""
    msg = dom0.call(XS_READ, b"/no/such/node", req_id=0xDEADBEEF)
    assert msg == (XS_ERROR, 0xDEADBEEF, 0, b"ENOENT\0")
    assert dom0.error(XS_READ, b"/bad//path") == "EINVAL"
    assert dom0.error(XS_READ, raw=b"/tool") == "EINVAL"  # not NUL-terminated
    assert dom0.error(99, b"x") == "ENOSYS"
    assert dom0.error(XS_WATCH_EVENT, b"x", b"y") == "ENOSYS"
    assert dom0.ok(XS_GET_DOMAIN_PATH, b"7") == b"/local/domain/7\0"
    assert dom0.ok(XS_IS_DOMAIN_INTRODUCED, b"0") == b"T\0"
    dom0.write("/p1/v", b"")
    assert dom0.call(XS_READ, b"/p1/v") == (XS_READ, 1, 0, b"")
    assert dom0.ok(XS_DIRECTORY, b"/p1") == b"v\0"
    assert dom0.ok(XS_GET_PERMS, b"/p1/v") == b"n0\0"


def test_binary_values_are_kept_exactly(dom0: Raw) -> None:
    """Values are bytes: NULs, newlines and high bytes survive."""
    value = bytes(range(256))
    dom0.write("/p2/bin", value)
    assert dom0.ok(XS_READ, b"/p2/bin") == value


def test_oversized_message_drops_the_connection(server: str, dom0: Raw) -> None:
    """A header announcing more than 4096 payload bytes gets the connection dropped
    (as xenstored does), without harming other clients."""
    bad = Raw(server)
    bad.send(XS_WRITE, b"/x\0" + b"y" * 4200)
    assert bad.read_to_eof() == 0
    bad.close()
    dom0.write("/p3/ok", b"y" * (4096 - len(b"/p3/ok\0")))  # exactly the limit
    assert len(dom0.ok(XS_READ, b"/p3/ok")) == 4096 - 7


def test_reply_over_the_payload_limit_is_e2big(dom0: Raw) -> None:
    """A reply that would exceed 4096 bytes (a long child list) is E2BIG."""
    for i in range(80):
        dom0.write(f"/p4/child-{i:03d}-" + "z" * 50, b"")
    assert dom0.error(XS_DIRECTORY, b"/p4") == "E2BIG"


def test_watch_is_acknowledged_then_fires_initially(dom0: Raw) -> None:
    """WATCH answers OK first, then sends the initial WATCH_EVENT (path, token);
    duplicates are EEXIST, unknown unwatches ENOENT."""
    dom0.send(XS_WATCH, b"/p5\0tok-1\0", req_id=5)
    assert dom0.recv_msg() == (XS_WATCH, 5, 0, b"OK\0")
    assert dom0.recv_msg() == (XS_WATCH_EVENT, 0, 0, b"/p5\0tok-1\0")
    assert dom0.error(XS_WATCH, b"/p5", b"tok-1") == "EEXIST"
    dom0.write("/p5/a", b"1")
    assert dom0.events == [(b"/p5/a", b"tok-1")]
    assert dom0.ok(XS_UNWATCH, b"/p5", b"tok-1") == b"OK\0"
    assert dom0.error(XS_UNWATCH, b"/p5", b"tok-1") == "ENOENT"
    dom0.events.clear()
    dom0.write("/p5/b", b"1")
    assert dom0.events == []


def test_relative_watch_reports_relative_paths(dom0: Raw) -> None:
    """A watch given relative to the connection's home reports relative paths."""
    dom0.ok(XS_WATCH, b"p6", b"rel")
    dom0.write("/local/domain/0/p6/x", b"1")
    assert dom0.events == [(b"p6", b"rel"), (b"p6/x", b"rel")]


def test_reset_watches_forgets_everything(dom0: Raw) -> None:
    """RESET_WATCHES drops the connection's watches and transactions."""
    dom0.ok(XS_WATCH, b"/p7", b"t")
    tx = int(dom0.ok(XS_TRANSACTION_START, b"").rstrip(b"\0"))
    assert dom0.ok(XS_RESET_WATCHES) == b"OK\0"
    dom0.events.clear()
    dom0.write("/p7/x", b"1")
    assert dom0.events == []
    assert dom0.error(XS_READ, b"/p7/x", tx_id=tx) == "ENOENT"


def test_transaction_conflict_is_eagain(server: str, dom0: Raw) -> None:
    """A transaction that read a node someone else changed fails with EAGAIN on
    commit and changes nothing; watches fire only for committed transactions."""
    other = Raw(server)
    try:
        dom0.write("/p8/c", b"0")
        other.ok(XS_WATCH, b"/p8", b"w")
        tx = int(dom0.ok(XS_TRANSACTION_START, b"").rstrip(b"\0"))
        assert dom0.ok(XS_READ, b"/p8/c", tx_id=tx) == b"0"
        dom0.write("/p8/from-tx", b"x", tx_id=tx)
        other.write("/p8/c", b"1")
        assert dom0.error(XS_TRANSACTION_END, b"T", tx_id=tx) == "EAGAIN"
        assert dom0.error(XS_READ, b"/p8/from-tx") == "ENOENT"

        other.events.clear()
        tx = int(dom0.ok(XS_TRANSACTION_START, b"").rstrip(b"\0"))
        dom0.write("/p8/from-tx", b"y", tx_id=tx)
        other.ok(XS_READ, b"/p8/c")
        assert other.events == []  # nothing visible before commit
        assert dom0.ok(XS_TRANSACTION_END, b"T", tx_id=tx) == b"OK\0"
        other.ok(XS_READ, b"/p8/c")
        assert other.events == [(b"/p8/from-tx", b"w")]
    finally:
        other.close()


def test_transaction_ids_belong_to_their_connection(server: str, dom0: Raw) -> None:
    """Unknown or foreign transaction ids are ENOENT, nesting is EBUSY, and
    TRANSACTION_END takes only T or F."""
    tx = int(dom0.ok(XS_TRANSACTION_START, b"").rstrip(b"\0"))
    assert tx != 0
    other = Raw(server)
    try:
        assert other.error(XS_READ, b"/tool", tx_id=tx) == "ENOENT"
    finally:
        other.close()
    assert dom0.error(XS_READ, b"/tool", tx_id=tx + 1000) == "ENOENT"
    assert dom0.error(XS_TRANSACTION_START, b"", tx_id=tx) == "EBUSY"
    assert dom0.error(XS_TRANSACTION_END, b"X", tx_id=tx) == "EINVAL"
    assert dom0.ok(XS_TRANSACTION_END, b"F", tx_id=tx) == b"OK\0"
    assert dom0.error(XS_TRANSACTION_END, b"T", tx_id=tx) == "ENOENT"


def test_guest_connection_permissions(server: str, dom0: Raw) -> None:
    """A connection on an introduced domain's socket acts as that domain: EACCES
    for other domains' and dom0's nodes and for privileged requests, EPERM for
    giving a node away; a watch only reports what the guest may read."""
    dom0.ok(XS_INTRODUCE, b"21", b"0", b"1")
    home = perms_home(dom0, 21)
    dom0.write("/p9/secret", b"s")
    guest = Raw(server + ".d21")
    try:
        assert guest.ok(XS_GET_DOMAIN_PATH, b"21") == home.encode() + b"\0"
        guest.write("name", b"g21")
        assert dom0.ok(XS_READ, f"{home}/name".encode()) == b"g21"
        assert guest.ok(XS_GET_PERMS, b"name") == b"n21\0r0\0"
        assert guest.error(XS_READ, b"/p9/secret") == "EACCES"
        assert guest.error(XS_READ, b"/p9/missing") == "EACCES"
        assert guest.error(XS_READ, b"missing") == "ENOENT"
        assert guest.error(XS_WRITE, raw=b"/p9/x\0v") == "EACCES"
        assert guest.error(XS_RM, b"/p9/secret") == "EACCES"
        assert guest.error(XS_SET_PERMS, b"name", b"n0") == "EPERM"
        assert guest.error(XS_INTRODUCE, b"22", b"0", b"1") == "EACCES"
        assert guest.error(XS_IS_DOMAIN_INTRODUCED, b"21") == "EACCES"
        guest.ok(XS_WATCH, b"/p9", b"g")
        guest.sync()
        assert guest.events == [(b"/p9", b"g")]  # the initial event always fires
        dom0.write("/p9/secret", b"changed")
        guest.ok(XS_READ, b"name")
        assert guest.events == [(b"/p9", b"g")]  # not readable: not reported
        dom0.ok(XS_SET_PERMS, b"/p9/secret", b"n0", b"r21")
        dom0.write("/p9/secret", b"visible")
        guest.ok(XS_READ, b"name")
        assert (b"/p9/secret", b"g") in guest.events
        assert guest.ok(XS_READ, b"/p9/secret") == b"visible"
    finally:
        guest.close()


def test_target_domain_gets_its_targets_rights(server: str, dom0: Raw) -> None:
    """SET_TARGET lets a device-model domain act on its target's nodes."""
    for domid in (51, 52):
        dom0.ok(XS_INTRODUCE, str(domid).encode(), b"0", b"1")
    home = perms_home(dom0, 51)
    dom0.write(f"{home}/private", b"p")
    dom0.ok(XS_SET_PERMS, f"{home}/private".encode(), b"n51")
    stub = Raw(server + ".d52")
    try:
        assert stub.error(XS_READ, f"{home}/private".encode()) == "EACCES"
        dom0.ok(XS_SET_TARGET, b"52", b"51")
        assert stub.ok(XS_READ, f"{home}/private".encode()) == b"p"
    finally:
        stub.close()


def test_introduce_and_release_domains(server: str, dom0: Raw) -> None:
    """INTRODUCE opens PATH.d<domid> and fires @introduceDomain; RELEASE closes it
    and the guest's connections and fires @releaseDomain (for dom0's watches)."""
    dom0.ok(XS_WATCH, b"@introduceDomain", b"in")
    dom0.ok(XS_WATCH, b"@releaseDomain", b"out")
    dom0.sync()
    assert dom0.events == [(b"@introduceDomain", b"in"), (b"@releaseDomain", b"out")]
    dom0.events.clear()
    assert dom0.error(XS_INTRODUCE, b"31", b"0", b"0") == "EINVAL"  # port must be > 0
    assert dom0.ok(XS_IS_DOMAIN_INTRODUCED, b"31") == b"F\0"
    dom0.ok(XS_INTRODUCE, b"31", b"1234", b"7")
    assert dom0.events == [(b"@introduceDomain", b"in")]
    assert dom0.ok(XS_IS_DOMAIN_INTRODUCED, b"31") == b"T\0"
    guest = Raw(server + ".d31")
    guest.ok(XS_GET_DOMAIN_PATH, b"31")
    dom0.events.clear()
    dom0.ok(XS_RELEASE, b"31")
    assert dom0.events == [(b"@releaseDomain", b"out")]
    assert guest.read_to_eof() == 0
    guest.close()
    assert not os.path.exists(server + ".d31")
    assert dom0.ok(XS_IS_DOMAIN_INTRODUCED, b"31") == b"F\0"
    assert dom0.error(XS_RELEASE, b"31") == "ENOENT"
    assert dom0.error(XS_RELEASE, b"0") == "EINVAL"


def test_guest_quotas(tight: str) -> None:
    """Unprivileged domains are held to the configured quotas with xenstored's
    errors: watches E2BIG, transactions ENOSPC, nodes ENOSPC, node size ENOSPC,
    permissions per node ENOSPC. dom0 is not limited."""
    dom0 = Raw(tight)
    dom0.ok(XS_INTRODUCE, b"41", b"0", b"1")
    home = perms_home(dom0, 41)
    guest = Raw(tight + ".d41")
    try:
        for i in range(3):
            guest.ok(XS_WATCH, f"w{i}".encode(), b"t")
        assert guest.error(XS_WATCH, b"w3", b"t") == "E2BIG"
        guest.ok(XS_UNWATCH, b"w0", b"t")
        guest.ok(XS_WATCH, b"w3", b"t")
        for i in range(4):
            dom0.ok(XS_WATCH, f"/d{i}".encode(), b"t")

        t1 = int(guest.ok(XS_TRANSACTION_START, b"").rstrip(b"\0"))
        guest.ok(XS_TRANSACTION_START, b"")
        assert guest.error(XS_TRANSACTION_START, b"") == "ENOSPC"
        guest.ok(XS_TRANSACTION_END, b"F", tx_id=t1)
        guest.ok(XS_TRANSACTION_START, b"")

        assert guest.error(XS_WRITE, raw=b"big\0" + b"x" * 600) == "ENOSPC"
        guest.write("small", b"x" * 100)
        assert guest.error(XS_SET_PERMS, b"small", b"n41", b"r1", b"r2", b"r3") == "ENOSPC"
        guest.ok(XS_SET_PERMS, b"small", b"n41", b"r1", b"r2")

        written = 0
        while True:
            msg = guest.call(XS_WRITE, raw=f"n{written}\0".encode())
            if msg[0] == XS_ERROR:
                assert msg[3] == b"ENOSPC\0"
                break
            written += 1
            assert written < 100
        assert written == 12 - 2  # the home and "small" count too
        dom0.write(f"{home}/by-dom0", b"")
    finally:
        guest.close()
        dom0.close()


def test_client_that_never_reads_is_dropped(tight: str) -> None:
    """XSA-349: a client watching a busy subtree without reading its events must not
    grow the server without bound. Past the queue bound it is disconnected; the
    server keeps serving everyone else."""
    lazy = Raw(tight)
    writer = Raw(tight)
    try:
        lazy.ok(XS_WATCH, b"/flood", b"T" * 2000)  # ~2 KiB per event
        for i in range(600):
            writer.write("/flood/k", str(i).encode())
        # What the kernel buffered arrives, then the end of the connection.
        assert lazy.read_to_eof() < 600 * 2000
        assert writer.ok(XS_READ, b"/flood/k") == b"599"
    finally:
        lazy.close()
        writer.close()
