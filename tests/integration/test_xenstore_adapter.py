"""gblk.xen.xenstore.GeventXenStore against the simulated
xenstored running as its own process: the docs/protocol.md §9 safeguards - timeouts,
reconnection with re-armed watches, transactions on the one connection with EAGAIN
retries, empty values, bounded coalescing watch events, errors by name."""

from __future__ import annotations

from gevent import monkey

if not monkey.is_module_patched("socket"):  # tests/conftest.py normally did it already
    monkey.patch_all(queue=False)

import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator, List, Set  # noqa: E402

import pytest  # noqa: E402

from gblk.errors import XenError, XenStoreError, XenUnavailable  # noqa: E402
from gblk.sim.harness.host import child_env  # noqa: E402
from gblk.xen.interfaces import XenStoreOps  # noqa: E402
from gblk.xen.xenstore import GeventXenStore  # noqa: E402

from .xenstored_support import start_xenstored  # noqa: E402

def stop(proc: "subprocess.Popen[bytes]") -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(20)


class Server:
    """A simulated xenstored process that a test may stop, freeze and restart."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="gblk-xs-")
        self.sock = os.path.join(self.dir, "sock")
        self.proc = start_xenstored(self.sock)

    def restart(self) -> None:
        stop(self.proc)
        self.proc = start_xenstored(self.sock)

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.dir)


@pytest.fixture(scope="module")
def shared() -> Iterator[Server]:
    server = Server()
    yield server
    server.close()


@pytest.fixture
def own() -> Iterator[Server]:
    server = Server()
    yield server
    server.close()


@pytest.fixture
def xs(shared: Server) -> Iterator[GeventXenStore]:
    store = GeventXenStore(shared.sock, timeout=20)
    yield store
    store.close()


def errno_name(fn: object, *args: object) -> str:
    with pytest.raises(XenStoreError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.errno_name


def drain(sub: object) -> List[str]:
    """Every path pending in a subscription, without waiting."""
    out: List[str] = []
    while sub.pending():  # type: ignore[attr-defined]
        path = sub.get(0)  # type: ignore[attr-defined]
        assert path is not None
        out.append(path)
    return out


def test_node_operations(xs: GeventXenStore) -> None:
    """read/write/mkdir/rm/directory/perms with str paths and values; a missing
    node reads as None, lists as [], and removing it is not an error."""
    xs.write("/a1/b", "value")
    assert xs.read("/a1/b") == "value"
    assert xs.read("/a1/none") is None
    assert xs.directory("/a1") == ["b"]
    assert xs.directory("/a1/none") == []
    xs.mkdir("/a1/dir/sub")
    assert xs.read("/a1/dir/sub") == ""
    xs.set_perms("/a1/b", ["n5", "r0", "b7"])
    assert xs.get_perms("/a1/b") == ["n5", "r0", "b7"]
    xs.rm("/a1/dir")
    xs.rm("/a1/dir")
    xs.rm("/no/parent/either")
    assert xs.directory("/a1") == ["b"]
    assert xs.get_domain_path(9) == "/local/domain/9"
    assert xs.connections == 1


def test_read_many_and_write_many_pipelined(xs: GeventXenStore) -> None:
    """read_many/write_many: values in the order asked, a missing node as None, the
    same inside a transaction (on its tx_id); an error reply raises its name; a
    batch spans many requests at once on the one connection."""
    xs.write_many([(f"/a9/n{i}", str(i)) for i in range(100)] + [("/a9/e", "")])
    assert xs.read_many([f"/a9/n{i}" for i in range(99, -1, -1)]) == [
        str(i) for i in range(99, -1, -1)]
    assert xs.read_many(["/a9/n1", "/a9/none", "/a9/e"]) == ["1", None, ""]
    assert xs.read_many([]) == []
    xs.write_many([])

    def tx(t: XenStoreOps) -> List[object]:
        t.write_many([("/a9/t1", "x"), ("/a9/t2", "y")])
        return list(t.read_many(["/a9/t1", "/a9/t2", "/a9/n5", "/a9/tnone"]))
    assert xs.transaction(tx) == ["x", "y", "5", None]
    assert xs.read_many(["/a9/t1", "/a9/t2"]) == ["x", "y"]
    assert errno_name(xs.read_many, ["/a9/n1", "/bad//path"]) == "EINVAL"
    assert errno_name(xs.write_many, [("/a9/ok", "1"), ("/a9/big", "x" * 5000)]) == "E2BIG"
    assert xs.read("/a9/n2") == "2"  # the connection is still good
    assert xs.connections == 1


def test_empty_and_unusual_values(xs: GeventXenStore) -> None:
    """Empty values (pyxs 0.4.1 raised ValueError on them), newlines, non-ASCII and
    even bytes that are not UTF-8 round-trip unchanged."""
    for value in ("", "two\nlines", "h\u00e9 \u2603", "\udcff\udc80raw"):
        xs.write("/a2/v", value)
        assert xs.read("/a2/v") == value


def test_errors_carry_xenstored_names(shared: Server, xs: GeventXenStore) -> None:
    """Every failure is a XenStoreError whose errno_name is xenstored's error; a
    guest's connection gets EACCES where the permissions say so."""
    assert errno_name(xs.read, "/bad//path") == "EINVAL"
    assert errno_name(xs.write, "/a3/big", "x" * 5000) == "E2BIG"
    assert errno_name(xs.set_perms, "/tool", ["q1"]) == "EINVAL"
    xs.introduce_domain(61, 0, 1)
    assert xs.is_domain_introduced(61)
    guest = GeventXenStore(shared.sock + ".d61", timeout=20)
    try:
        assert errno_name(guest.write, "/a3/x", "1") == "EACCES"
        assert errno_name(guest.read, "/tool/xenstored") == "EACCES"
    finally:
        guest.close()
    xs.release_domain(61)
    assert not xs.is_domain_introduced(61)


def test_large_directory(xs: GeventXenStore) -> None:
    """A child list larger than one 4096-byte reply is fetched with
    XS_DIRECTORY_PART."""
    names = [f"n{i:03d}-" + "x" * 60 for i in range(100)]
    for name in names:
        xs.write(f"/a4/{name}", "")
    assert xs.directory("/a4") == names


def test_no_xenstore_is_xenunavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a reachable XenStore the error says so and names what was tried."""
    missing = str(tmp_path / "nothing")
    with pytest.raises(XenUnavailable) as info:
        GeventXenStore(missing)
    assert missing in str(info.value) and "xenstored" in str(info.value)
    monkeypatch.setenv("XENSTORED_PATH", missing)
    if os.path.exists("/dev/xen/xenbus"):
        pytest.skip("this machine runs Xen: the xenbus device would answer")
    with pytest.raises(XenUnavailable) as info:
        GeventXenStore()
    assert missing in str(info.value) and "/dev/xen/xenbus" in str(info.value)


def test_default_path_follows_xenstored_path(shared: Server,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With no socket given, $XENSTORED_PATH is used (as libxenstore does)."""
    monkeypatch.setenv("XENSTORED_PATH", shared.sock)
    store = GeventXenStore()
    try:
        assert store.read("/tool/xenstored") == ""
    finally:
        store.close()


def test_transaction_retries_on_eagain(shared: Server, xs: GeventXenStore) -> None:
    """A transaction runs on its own connection (its writes are invisible outside
    until commit) and is run again when the commit conflicts (EAGAIN)."""
    xs.write("/a5/counter", "0")
    attempts: List[int] = []

    def bump(tx: XenStoreOps) -> str:
        attempts.append(1)
        value = tx.read("/a5/counter")
        assert value is not None
        tx.write("/a5/counter", str(int(value) + 1))
        assert xs.read("/a5/counter") != str(int(value) + 1)  # not visible yet
        if len(attempts) == 1:
            xs.write("/a5/counter", "10")  # a concurrent writer
        return value

    assert xs.transaction(bump) == "10"
    assert len(attempts) == 2
    assert xs.read("/a5/counter") == "11"


def test_transaction_gives_up_after_retries(xs: GeventXenStore) -> None:
    """A transaction that always conflicts ends with XenStoreError(EAGAIN) after
    1 + retries attempts."""
    xs.write("/a6/c", "0")
    attempts: List[int] = []

    def always_conflicting(tx: XenStoreOps) -> None:
        attempts.append(1)
        tx.read("/a6/c")
        tx.write("/a6/other", "x")
        xs.write("/a6/c", str(len(attempts)))

    assert errno_name(xs.transaction, always_conflicting, 2) == "EAGAIN"
    assert len(attempts) == 3
    assert xs.read("/a6/other") is None


def test_transaction_aborts_when_fn_raises(xs: GeventXenStore) -> None:
    """An exception in fn rolls the transaction back and propagates."""

    def failing(tx: XenStoreOps) -> None:
        tx.write("/a7/partial", "x")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        xs.transaction(failing)
    assert xs.read("/a7/partial") is None


def test_watch_events_coalesce_into_a_bounded_set(shared: Server) -> None:
    """A node rewritten in a loop is one pending event; many distinct paths never
    hold more than max_pending entries and collapse to the watched path (XSA-349:
    the backend cannot be made to grow by a busy frontend)."""
    xs = GeventXenStore(shared.sock, timeout=20, max_pending=8)
    try:
        sub = xs.watch(["/a8"])
        assert sub.get(20) == "/a8"
        for i in range(300):
            xs.write("/a8/state", str(i))
        assert drain(sub) == ["/a8/state"]
        for i in range(200):
            xs.write(f"/a8/n{i}", "")
        assert sub.pending() <= 8  # type: ignore[attr-defined]
        paths = drain(sub)
        assert "/a8" in paths and len(paths) <= 8
        assert xs.watch_events == 1 + 300 + 200
        sub.close()
        assert sub.get(0) is None
    finally:
        xs.close()


def test_watch_sees_other_writers_and_special_paths(shared: Server, xs: GeventXenStore) -> None:
    """Events caused by another connection reach the subscription's greenlet;
    @releaseDomain fires when a domain is released."""
    other = GeventXenStore(shared.sock, timeout=20)
    try:
        sub = xs.watch(["/a9", "@releaseDomain"])
        assert {sub.get(20), sub.get(20)} == {"/a9", "@releaseDomain"}
        other.write("/a9/x", "1")
        assert sub.get(20) == "/a9/x"
        other.introduce_domain(62, 0, 1)
        other.release_domain(62)
        assert sub.get(20) == "@releaseDomain"
        sub.close()
    finally:
        other.close()


def test_reconnect_after_xenstored_restart(own: Server) -> None:
    """When xenstored restarts, requests go to the new one and every watch is
    re-armed: the subscription gets the initial event again, then new changes."""
    xs = GeventXenStore(own.sock, timeout=20)
    try:
        sub = xs.watch(["/r"])
        assert sub.get(20) == "/r"
        xs.write("/r/before", "1")
        assert sub.get(20) == "/r/before"
        own.restart()
        assert sub.get(30) == "/r"  # re-armed on the new xenstored
        assert xs.connections == 2
        assert xs.read("/r/before") is None  # a new, empty store
        writer = GeventXenStore(own.sock, timeout=20)
        try:
            writer.write("/r/after", "2")
        finally:
            writer.close()
        seen: Set[str] = set()
        while "/r/after" not in seen:
            path = sub.get(20)
            assert path is not None
            seen.add(path)
        own.restart()
        xs.write("/r/plain-call", "3")  # a request alone also reconnects
        assert xs.read("/r/plain-call") == "3"
        sub.close()
    finally:
        xs.close()


def test_timeout_when_xenstored_stops_answering(own: Server) -> None:
    """A frozen xenstored (SIGSTOP) makes requests fail with ETIMEDOUT instead of
    hanging; once it answers again, requests work."""
    xs = GeventXenStore(own.sock, timeout=0.5)
    try:
        xs.write("/s/x", "1")
        os.kill(own.proc.pid, signal.SIGSTOP)
        try:
            assert errno_name(xs.read, "/s/x") == "ETIMEDOUT"
            assert errno_name(xs.transaction, lambda tx: tx.read("/s/x")) == "ETIMEDOUT"
        finally:
            os.kill(own.proc.pid, signal.SIGCONT)
        assert xs.read("/s/x") == "1"
    finally:
        xs.close()


_ONE_CONNECTION = """
import os, resource, sys
import gevent
from gblk.xen.xenstore import GeventXenStore
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # push fds past 1024
gevent.sleep(0)  # the hub's own fds exist from here on
before = len(os.listdir("/proc/self/fd"))
xs = GeventXenStore(sys.argv[1], timeout=20)
for i in range(64):  # the nodes exist: the transactions below do not conflict
    xs.write(f"/many/{i}", "")
sub = xs.watch(["/many"])
assert sub.get(20) == "/many"
def one(i):
    xs.transaction(lambda tx: tx.write(f"/many/{i}", str(i)))
    return xs.read(f"/many/{i}")
jobs = [gevent.spawn(one, i) for i in range(64)]
gevent.joinall(jobs, raise_error=True)
seen = set()
while len(seen) < 64:
    seen.add(sub.get(20))
print(xs.fileno(), len(os.listdir("/proc/self/fd")) - before, xs.connections,
      sorted(int(j.value) for j in jobs) == list(range(64)))
"""


def test_one_connection_any_fd_no_patching(shared: Server) -> None:
    """The client needs no monkey-patching and works on a descriptor past 1024 (no
    select()): 64 greenlets' transactions, reads and a watch all run at once on ONE
    connection (one more fd), every answer reaching its own caller."""
    out = subprocess.run([sys.executable, "-c", _ONE_CONNECTION, shared.sock], env=child_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    fd, extra_fds, connections, answers_right = out.stdout.split()
    assert int(fd) > 1024
    assert int(extra_fds) == 1 and int(connections) == 1
    assert answers_right == "True"
    assert issubclass(XenUnavailable, XenError)
