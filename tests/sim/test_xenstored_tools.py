"""Debian's xenstore-* tools (libxenstore, package xenstore-utils) against the
simulated xenstored, run as its own process: everything they do must behave as with
a real xenstored."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
from typing import Iterator, List, Tuple

import pytest

from ..integration.host_tools import require_tool
from ..integration.xenstored_support import running_xenstored, start_xenstored

HEADER = struct.Struct("=IIII")
XS_ERROR = 16
XS_INTRODUCE = 8
XS_SET_PERMS = 14
XS_MKDIR = 12


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tool("xenstore-write", "xenstore-utils")


class Raw:
    """A minimal blocking XenStore client speaking the wire protocol directly."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    def request(self, mtype: int, *args: bytes) -> Tuple[int, bytes]:
        payload = b"".join(a + b"\0" for a in args)
        self.sock.sendall(HEADER.pack(mtype, 1, 0, len(payload)) + payload)
        header = self._recv(HEADER.size)
        rtype, _req, _tx, length = HEADER.unpack(header)
        return rtype, self._recv(length)

    def _recv(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data

    def ok(self, mtype: int, *args: bytes) -> None:
        rtype, payload = self.request(mtype, *args)
        assert (rtype, payload) == (mtype, b"OK\0"), payload

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def xsd() -> Iterator[str]:
    with running_xenstored() as sock:
        yield sock


def xs(sock: str, *argv: str) -> "subprocess.CompletedProcess[str]":
    env = dict(os.environ, XENSTORED_PATH=sock)
    return subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=30)


def ok(sock: str, *argv: str) -> str:
    res = xs(sock, *argv)
    assert res.returncode == 0, (argv, res.stderr)
    return res.stdout


def lines(text: str) -> List[str]:
    return text.splitlines()


def test_write_read_list_exists_rm(xsd: str) -> None:
    """xenstore-write/-read/-list/-ls/-exists/-rm round trip, empty values included."""
    ok(xsd, "xenstore-write", "/t1/a", "hello world", "/t1/b/c", "")
    assert ok(xsd, "xenstore-read", "/t1/a") == "hello world\n"
    assert ok(xsd, "xenstore-read", "/t1/b/c") == "\n"
    assert lines(ok(xsd, "xenstore-list", "/t1")) == ["a", "b"]
    assert lines(ok(xsd, "xenstore-ls", "-f", "/t1")) == [
        '/t1/a = "hello world"', '/t1/b = ""', '/t1/b/c = ""']
    assert xs(xsd, "xenstore-exists", "/t1/a").returncode == 0
    assert xs(xsd, "xenstore-exists", "/t1/zz").returncode != 0
    ok(xsd, "xenstore-rm", "/t1/b")
    assert xs(xsd, "xenstore-exists", "/t1/b/c").returncode != 0
    assert lines(ok(xsd, "xenstore-list", "/t1")) == ["a"]
    missing = xs(xsd, "xenstore-read", "/t1/missing")
    assert missing.returncode != 0 and "/t1/missing" in missing.stderr


def test_rm_tidy_and_missing(xsd: str) -> None:
    """xenstore-rm -t removes emptied parents; removing a missing node is fine."""
    ok(xsd, "xenstore-write", "/t2/x/y/z", "1", "/t2/keep", "k")
    ok(xsd, "xenstore-rm", "-t", "/t2/x/y/z")
    assert lines(ok(xsd, "xenstore-list", "/t2")) == ["keep"]
    assert xs(xsd, "xenstore-rm", "/t2/never").returncode == 0


def test_chmod_and_permission_listing(xsd: str) -> None:
    """xenstore-chmod sets the permission list (owner first) that xenstore-ls -p
    shows; -r applies it to the subtree."""
    ok(xsd, "xenstore-write", "/t3/node", "v", "/t3/node/child", "c")
    ok(xsd, "xenstore-chmod", "/t3/node", "n5", "r7", "b9")
    listing = ok(xsd, "xenstore-ls", "-p", "/t3")
    assert "(n5,r7,b9)" in lines(listing)[0]
    assert "(n0)" in lines(listing)[1]
    ok(xsd, "xenstore-chmod", "-r", "/t3", "b0", "r3")
    assert all("(b0,r3)" in line for line in lines(ok(xsd, "xenstore-ls", "-p", "/t3")))


def test_watch_reports_initial_and_later_events(xsd: str) -> None:
    """xenstore-watch gets the initial event, then one per change at or below the
    watched path (not for a sibling sharing its prefix); removing a subtree fires
    for the removed node and, for a watch placed on a removed child, for the child."""
    env = dict(os.environ, XENSTORED_PATH=xsd)
    ok(xsd, "xenstore-write", "/t4/x", "0")
    on_node = subprocess.Popen(["xenstore-watch", "-n", "3", "/t4"], env=env,
                               stdout=subprocess.PIPE, text=True)
    on_child = subprocess.Popen(["xenstore-watch", "-n", "3", "/t4/x"], env=env,
                                stdout=subprocess.PIPE, text=True)
    try:
        assert on_node.stdout is not None and on_child.stdout is not None
        assert on_node.stdout.readline().strip() == "/t4"  # registered
        assert on_child.stdout.readline().strip() == "/t4/x"
        ok(xsd, "xenstore-write", "/t4-sibling", "not watched")
        ok(xsd, "xenstore-write", "/t4/x", "1")
        ok(xsd, "xenstore-rm", "/t4")
        assert lines(on_node.stdout.read()) == ["/t4/x", "/t4"]
        assert lines(on_child.stdout.read()) == ["/t4/x", "/t4/x"]
        assert on_node.wait(20) == 0 and on_child.wait(20) == 0
    finally:
        on_node.kill()
        on_child.kill()


def test_relative_paths_are_under_dom0s_home(xsd: str) -> None:
    """A relative path from a dom0 socket connection means /local/domain/0/..."""
    ok(xsd, "xenstore-write", "relname", "r")
    assert ok(xsd, "xenstore-read", "/local/domain/0/relname") == "r\n"


def test_guest_socket_is_confined_by_permissions(xsd: str) -> None:
    """Tools connected to an introduced guest's socket act as that guest: they work
    in its home and fail (EACCES) where the permissions say so."""
    dom0 = Raw(xsd)
    try:
        dom0.ok(XS_INTRODUCE, b"12", b"0", b"1")
        dom0.ok(XS_MKDIR, b"/local/domain/12")
        dom0.ok(XS_SET_PERMS, b"/local/domain/12", b"n12", b"r0")
    finally:
        dom0.close()
    guest = xsd + ".d12"
    ok(guest, "xenstore-write", "name", "guest12", "device/vbd/51712/state", "1")
    assert ok(xsd, "xenstore-read", "/local/domain/12/name") == "guest12\n"
    assert "(n12,r0)" in ok(guest, "xenstore-ls", "-p", "/local/domain/12").splitlines()[0]
    assert xs(guest, "xenstore-read", "/tool/xenstored").returncode != 0
    assert xs(guest, "xenstore-write", "/elsewhere", "x").returncode != 0
    assert xs(xsd, "xenstore-exists", "/elsewhere").returncode != 0
    ok(xsd, "xenstore-write", "/local/domain/12/ro", "dom0's")
    ok(xsd, "xenstore-chmod", "/local/domain/12/ro", "n0", "r12")
    assert ok(guest, "xenstore-read", "ro") == "dom0's\n"
    assert xs(guest, "xenstore-write", "ro", "mine").returncode != 0
    assert xs(guest, "xenstore-chmod", "ro", "n12").returncode != 0


def test_large_directory_is_listed_in_parts(xsd: str) -> None:
    """A child list longer than one 4096-byte reply (E2BIG) is still listed in
    full: libxenstore falls back to XS_DIRECTORY_PART."""
    names = [f"c{i:03d}-" + "n" * 60 for i in range(120)]
    args: List[str] = []
    for name in names:
        args += [f"/t6/{name}", ""]
    ok(xsd, "xenstore-write", *args)
    assert lines(ok(xsd, "xenstore-list", "/t6")) == names


def test_socket_files_removed_on_sigterm() -> None:
    """SIGTERM stops the server with status 0 and removes its sockets, the
    introduced domains' ones included."""
    tmp = tempfile.mkdtemp(prefix="gblk-xs-")
    try:
        sock = os.path.join(tmp, "s")
        proc = start_xenstored(sock)
        raw = Raw(sock)
        raw.ok(XS_INTRODUCE, b"3", b"0", b"1")
        raw.close()
        assert os.path.exists(sock) and os.path.exists(sock + ".d3")
        proc.terminate()
        assert proc.wait(10) == 0
        assert os.listdir(tmp) == []
    finally:
        shutil.rmtree(tmp)
