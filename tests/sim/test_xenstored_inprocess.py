"""XenStoreServer embedded in the test process under gevent (as a test or a demo may
run it), with gblk's clients in the same process: start/stop, domains, watches."""

from __future__ import annotations

from gevent import monkey

if not monkey.is_module_patched("socket"):  # tests/conftest.py normally did it already
    monkey.patch_all(queue=False)

import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402

from gblk.errors import XenStoreError  # noqa: E402
from gblk.sim.xenstored.server import XenStoreServer  # noqa: E402
from gblk.sim.xenstored.store import Quotas  # noqa: E402
from gblk.xen.xenstore import GeventXenStore  # noqa: E402


@pytest.fixture
def sockdir() -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="gblk-xs-")
    yield tmp
    shutil.rmtree(tmp)


def test_embedded_server_serves_gblk_clients(sockdir: str) -> None:
    """start() makes the socket connectable at once; clients in the same process
    read, write and watch; stop() closes everything and removes the sockets, and is
    idempotent."""
    path = os.path.join(sockdir, "xs")
    server = XenStoreServer(path)
    server.start()
    xs = GeventXenStore(path, timeout=20)
    try:
        sub = xs.watch(["/e"])
        assert sub.get(20) == "/e"
        xs.write("/e/k", "v")
        assert sub.get(20) == "/e/k"
        assert server.store.nodes["/e/k"].value == b"v"
        assert server.connections_total == 1
    finally:
        xs.close()
        server.stop()
        server.stop()
    assert os.listdir(sockdir) == []


def test_embedded_domains(sockdir: str) -> None:
    """introduce_domain() opens the guest's socket and returns its path;
    release_domain() drops the guest's connections and removes the socket."""
    path = os.path.join(sockdir, "xs")
    with XenStoreServer(path, Quotas(watches=2)) as server:
        guest_path = server.introduce_domain(8)
        assert guest_path == path + ".d8" and server.introduced_domains() == [8]
        dom0 = GeventXenStore(path, timeout=20)
        guest = GeventXenStore(guest_path, timeout=20)
        try:
            dom0.mkdir("/local/domain/8")
            dom0.set_perms("/local/domain/8", ["n8", "r0"])
            guest.write("/local/domain/8/name", "eight")
            assert dom0.read("/local/domain/8/name") == "eight"
            guest.watch(["/local/domain/8/a"])
            guest.watch(["/local/domain/8/b"])
            with pytest.raises(XenStoreError) as info:
                guest.watch(["/local/domain/8/c"])
            assert info.value.errno_name == "E2BIG"  # watch quota of 2
            server.release_domain(8)
            assert not os.path.exists(guest_path)
            with pytest.raises(XenStoreError):
                guest.read("/local/domain/8/name")
        finally:
            guest.close()
            dom0.close()
    assert os.listdir(sockdir) == []
