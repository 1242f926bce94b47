"""The simulated toolstack (gblk.sim.toolstack.libxl) writes what libxl writes.

The nodes, values and permissions a backend finds are the contract between the
toolstack and gblk (docs/protocol.md §1, §6): checked through the simulated xenstored
subprocess with gblk's own client, and read back with Debian's ``xenstore-ls -p``
(package xenstore-utils) as an independent reader.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Dict, List

import gevent
import pytest

from gblk.errors import XenStoreError
from gblk.sim.harness.host import SimHost
from gblk.sim.hypervisor.memory import domain_dir
from gblk.sim.toolstack.libxl import vdev_name


@pytest.fixture(scope="module")
def host():
    with SimHost() as h:
        yield h


def xenstore_ls(host: SimHost, path: str) -> Dict[str, str]:
    """``xenstore-ls -f -p PATH`` as {path: 'value (perms)'} - Debian's own reader."""
    out = subprocess.run(
        ["xenstore-ls", "-f", "-p", path], env=dict(os.environ, XENSTORED_PATH=host.socket_path),
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    nodes = {}
    for line in out.splitlines():
        m = re.match(r'^(\S+) = "(.*)"[ .]*\((.*)\)$', line)
        assert m, line
        nodes[m.group(1)] = f"{m.group(2)} ({m.group(3)})"
    return nodes


def test_create_domain_layout(host):
    """libxl__domain_make: /local/domain/N is dom0's with read for the guest, the
    guest owns control/shutdown, data...; /libxl/N is dom0's only; the domain is
    introduced (its XenStore socket appears)."""
    dom = host.toolstack.create_domain(name="layout")
    try:
        n = dom.domid
        xs = host.xs
        assert xs.get_perms(f"/local/domain/{n}") == ["n0", f"r{n}"]
        assert xs.read(f"/local/domain/{n}/name") == "layout"
        assert xs.read(f"/local/domain/{n}/domid") == str(n)
        assert xs.read(f"/local/domain/{n}/vm") == dom.vm_path
        assert xs.get_perms(f"/local/domain/{n}/device") == ["n0", f"r{n}"]
        for sub in ("control/shutdown", "data", "drivers", "feature", "attr", "error"):
            assert xs.get_perms(f"/local/domain/{n}/{sub}") == [f"n{n}"], sub
        assert xs.get_perms(f"/libxl/{n}") == ["n0"]
        assert host.toolstack.is_introduced(n)
        assert os.path.exists(f"{host.socket_path}.d{n}")
        ls = xenstore_ls(host, f"/local/domain/{n}")
        assert ls[f"/local/domain/{n}/name"] == f"layout (n0,r{n})"
        assert ls[f"/local/domain/{n}/control/shutdown"] == f" (n{n})"
    finally:
        host.toolstack.destroy_domain(dom.domid)


QDISK_BACK = {
    "params": "aio:{img}", "frontend-id": "{n}", "online": "1", "removable": "0",
    "bootable": "1", "state": "1", "dev": "xvda", "type": "qdisk", "mode": "w",
    "device-type": "disk", "discard-enable": "1", "specification": "xen",
    "frontend": "/local/domain/{n}/device/vbd/51712",
}
FRONT = {
    "backend": "/local/domain/0/backend/{kind}/{n}/51712", "backend-id": "0", "state": "1",
    "virtual-device": "51712", "device-type": "disk", "trusted": "1",
}


def read_dir(host: SimHost, path: str) -> Dict[str, str]:
    return {k: host.xs.read(f"{path}/{k}") or "" for k in host.xs.directory(path)}


@pytest.mark.parametrize("kind", ["qdisk", "vbd3", "vbd"])
def test_attach_disk_layout_and_perms(host, kind, tmp_path):
    """device_disk_add: both directories in one transaction, each node as libxl
    writes it (params '<format>:<path>' with raw spelled 'aio' for qdisk/vbd3, the
    plain path for vbd; type; script for vbd/vbd3); frontend owned by the guest and
    readable by the backend domain, backend owned by dom0 and readable by the guest."""
    dom = host.toolstack.create_domain()
    n = dom.domid
    img = str(tmp_path / "disk.img")
    open(img, "wb").close()
    try:
        disk = host.toolstack.attach_disk(n, img, kind=kind)
        be = f"/local/domain/0/backend/{kind}/{n}/51712"
        fe = f"/local/domain/{n}/device/vbd/51712"
        assert (disk.backend_path, disk.frontend_path) == (be, fe)
        want = {k: v.format(img=img, n=n) for k, v in QDISK_BACK.items()}
        if kind == "vbd3":
            want.update(type="vbd3", script="/etc/xen/scripts/block-tap")
        if kind == "vbd":
            want.update(type="phy", params=img, script="/etc/xen/scripts/block")
        assert read_dir(host, be) == want
        assert read_dir(host, fe) == {k: v.format(kind=kind, n=n) for k, v in FRONT.items()}
        assert host.xs.get_perms(be) == ["n0", f"r{n}"]
        assert host.xs.get_perms(be + "/state") == ["n0", f"r{n}"]
        assert host.xs.get_perms(fe) == [f"n{n}", "r0"]
        assert host.xs.get_perms(fe + "/state") == [f"n{n}", "r0"]
        # the libxl copy of the backend nodes
        assert host.xs.read(f"/libxl/{n}/device/vbd/51712/backend") == be
        assert host.xs.read(f"/libxl/{n}/device/vbd/51712/params") == want["params"]
        # Debian's xenstore-ls sees the same
        ls = xenstore_ls(host, be)
        assert ls[be + "/mode"] == f"w (n0,r{n})"
        ls = xenstore_ls(host, fe)
        assert ls[fe + "/backend"] == f"{be} (n{n},r0)"
        # what the guest may and may not do
        gxs = host.guest_xenstore(n)
        assert gxs.read(be + "/params") == want["params"]
        gxs.write(fe + "/ring-ref", "8")
        with pytest.raises(XenStoreError) as e:
            gxs.write(be + "/state", "4")
        assert e.value.errno_name == "EACCES"
        with pytest.raises(ValueError):
            host.toolstack.attach_disk(n, img, kind=kind)
    finally:
        host.toolstack.destroy_domain(n)


def test_attach_options(host, tmp_path):
    """mode=r turns discard-enable off (libxl's default), cdrom is removable,
    direct-io-safe appears only when set, formats are spelled as libxl spells them,
    another devid gets its own vdev name, a PV guest's protocol can be pre-written."""
    dom = host.toolstack.create_domain()
    n = dom.domid
    try:
        ts = host.toolstack
        d1 = ts.attach_disk(n, "/img1", mode="r", device_type="cdrom", devid=51728)
        b = read_dir(host, d1.backend_path)
        assert (b["mode"], b["device-type"], b["removable"], b["discard-enable"], b["dev"]) == (
            "r", "cdrom", "1", "0", "xvdb")
        assert "direct-io-safe" not in b
        d2 = ts.attach_disk(n, "/img2", devid=51744, direct_io_safe=True, format="qcow2",
                            discard_enable=False, protocol="x86_32-abi")
        b = read_dir(host, d2.backend_path)
        assert (b["direct-io-safe"], b["params"], b["discard-enable"]) == ("1", "qcow2:/img2", "0")
        assert host.xs.read(d2.frontend_path + "/protocol") == "x86_32-abi"
        d3 = ts.attach_disk(n, "/img3", devid=51760, params="raw:/img3")
        assert host.xs.read(d3.backend_path + "/params") == "raw:/img3"
        assert [vdev_name(x) for x in (51712, 51713, 51728, 268439552)] == [
            "xvda", "xvda1", "xvdb", "xvdq"]
    finally:
        host.toolstack.destroy_domain(n)


def test_detach_waits_for_closed_then_removes(host):
    """Unplug: online=0 and state=5 in one transaction, wait for the backend's
    Closed, then both directories (and empty parents) go; without a backend the
    wait times out and libxl removes them anyway."""
    ts = host.toolstack
    dom = ts.create_domain()
    n = dom.domid
    try:
        disk = ts.attach_disk(n, "/img")
        seen: List[str] = []

        def backend() -> None:  # a stand-in that closes when asked
            sub = host.xs.watch([disk.backend_path + "/state"])
            try:
                while True:
                    sub.get()
                    if host.xs.read(disk.backend_path + "/state") == "5":
                        seen.append(host.xs.read(disk.backend_path + "/online") or "")
                        host.xs.write(disk.backend_path + "/state", "6")
                        return
            finally:
                sub.close()

        g = gevent.spawn(backend)
        assert ts.detach_disk(n, 51712, timeout=10) is True
        g.join(5)
        assert seen == ["0"]
        assert host.xs.read(disk.backend_path + "/state") is None
        assert host.xs.directory(f"/local/domain/0/backend/qdisk/{n}") == []
        assert host.xs.read(disk.frontend_path + "/state") is None
        assert host.xs.read(f"/libxl/{n}/device/vbd/51712/backend") is None
        # nobody answers: forced after the timeout
        disk = ts.attach_disk(n, "/img")
        assert ts.detach_disk(n, 51712, timeout=0.3) is False
        assert host.xs.read(disk.backend_path + "/state") is None
    finally:
        ts.destroy_domain(n)


def test_abrupt_removals(host):
    """The abrupt variants remove exactly one directory each."""
    ts = host.toolstack
    dom = ts.create_domain()
    n = dom.domid
    try:
        disk = ts.attach_disk(n, "/img")
        ts.remove_frontend_dir(n, 51712)
        assert host.xs.read(disk.frontend_path + "/state") is None
        assert host.xs.read(disk.backend_path + "/state") == "1"
        ts.remove_backend_dir(n, 51712)
        assert host.xs.read(disk.backend_path + "/state") is None
    finally:
        ts.destroy_domain(n)


def test_destroy_domain(host):
    """xl destroy: the domain's nodes and its backend directories go, xenstored fires
    @releaseDomain and closes the domain's socket, its memory files go."""
    ts = host.toolstack
    dom = ts.create_domain()
    n = dom.domid
    ts.attach_disk(n, "/img")
    ts.attach_disk(n, "/img2", kind="vbd3", devid=51728)
    sub = host.xs.watch(["@releaseDomain"])
    try:
        while sub.get(timeout=0.2) is not None:  # the initial event
            pass
        ts.destroy_domain(n)
        assert sub.get(timeout=10) == "@releaseDomain"
    finally:
        sub.close()
    assert host.xs.read(f"/local/domain/{n}/name") is None
    assert host.xs.directory(f"/local/domain/0/backend/qdisk/{n}") == []
    assert host.xs.directory(f"/local/domain/0/backend/vbd3/{n}") == []
    assert host.xs.read(f"/libxl/{n}/type") is None
    assert not ts.is_introduced(n)
    assert not os.path.exists(f"{host.socket_path}.d{n}")
    assert not os.path.exists(domain_dir(host.dir, n))
