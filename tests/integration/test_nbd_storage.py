"""Image formats and NBD exports on the simulated host, through a real daemon: qcow2 and
vhd images served by the qemu-nbd gblk runs, and exports of a real nbdkit (memory and
file plugins, over a Unix socket and TCP). Every byte the guest reads is checked
against a raw copy of what it wrote; afterwards ``qemu-img check`` is clean and
``qemu-img compare`` of the image against that raw copy matches. A qemu-nbd killed
mid-IO and an nbdkit that goes away are survived: every request is answered, none
lost silently."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Iterator, List, Optional

import pytest

from gblk.blkif.const import VDISK_READONLY, Status, XenbusState
from gblk.sim.guest.frontend import Frontend, FrontendOptions
from gblk.sim.harness.host import BackendProcess, SimHost, child_env

from .backend_support import logs_on_failure, metric, pattern, scrape, served_host, wait_until
from .host_tools import require_tool

MiB = 1024 * 1024
SECTOR = 512
SIZE = 64 * MiB
XVDB = 51728

@pytest.fixture(autouse=True)
def _tools() -> None:
    """Skipped without them (under CI: failed; .ci/run installs both)."""
    require_tool("qemu-nbd", "qemu-utils")
    require_tool("qemu-img", "qemu-utils")
    require_tool("nbdkit", "nbdkit")


@pytest.fixture(scope="module")
def served() -> Iterator[tuple]:
    with served_host("nbd", '[daemon]\nkinds = ["qdisk"]\n') as served:
        yield served


class Shadow:
    """What the guest wrote, byte for byte: the raw copy images are compared with."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, fe: Frontend, sector: int, data: bytes) -> None:
        fe.write(sector, data)
        self.data[sector * SECTOR:sector * SECTOR + len(data)] = data

    def discard(self, fe: Frontend, sector: int, n: int) -> None:
        fe.discard(sector, n)
        self.data[sector * SECTOR:(sector + n) * SECTOR] = bytes(n * SECTOR)

    def check(self, fe: Frontend, sector: int, n: int) -> None:
        assert fe.read(sector, n) == bytes(self.data[sector * SECTOR:(sector + n) * SECTOR])

    def save(self, path: str) -> str:
        with open(path, "wb") as f:
            f.write(self.data)
        return path


def exercise(fe: Frontend, shadow: Shadow) -> None:
    """Small, large (INDIRECT), many in flight, flush, barrier, discard: each read back."""
    shadow.write(fe, 3, pattern(1, SECTOR))
    shadow.write(fe, 64, pattern(2, 11 * 4096))
    shadow.write(fe, 4096, pattern(3, 2 * MiB))
    fe.flush()
    fe.barrier(8200, pattern(5, 16 * SECTOR))
    shadow.data[8200 * SECTOR:8216 * SECTOR] = pattern(5, 16 * SECTOR)
    shadow.write(fe, 12288, pattern(6, 256 * SECTOR))
    shadow.discard(fe, 12288 + 64, 128)
    results = [fe.submit_write(16384 + i * 16, pattern(10 + i, 8 * SECTOR)) for i in range(48)]
    for i, r in enumerate(results):
        assert r.get(timeout=60).ok
        shadow.data[(16384 + i * 16) * SECTOR:(16384 + i * 16 + 8) * SECTOR] = pattern(10 + i, 8 * SECTOR)
    fe.flush()
    for sector, n in ((0, 128), (4096, 4096), (8192, 32), (12288, 256), (16384, 48 * 16)):
        shadow.check(fe, sector, n)
    assert fe.stats.mismatches == 0 and fe.stats.protocol_violations == 0


def qemu_nbd_children(daemon: BackendProcess) -> List[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm == "qemu-nbd" and int(fields[1]) == daemon.proc.pid and fields[0] != "Z":
            out.append(int(pid))
    return out


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("fmt,driver", [("qcow2", "qcow2"), ("vhd", "vpc")])
def test_image_formats_serve_verified_io(served, fmt, driver):
    """A qcow2 and a vhd image: verified IO, flush and discard; the device advertises
    discard; qemu-nbd goes with the device; the image is clean and holds exactly
    what the guest wrote."""
    host, daemon, url = served
    img = os.path.join(host.dir, f"disk-{fmt}.img")
    assert qemu_img("create", "-q", "-f", driver, *(["-o", "force_size=on"] if driver == "vpc" else []),
                    img, str(SIZE)).returncode == 0
    with logs_on_failure(daemon):
        g = host.create_guest(image=img, format=fmt)
        fe = g.frontend
        assert fe.disk.sectors * SECTOR == SIZE
        assert fe.disk.discard and fe.disk.flush
        shadow = Shadow(SIZE)
        exercise(fe, shadow)
        assert len(qemu_nbd_children(daemon)) == 1
        s = scrape(url)
        assert metric(s, "gblk_nbd_connected", domain=str(g.domid)) == 1
        fe.close()
        host.destroy_guest(g)
        wait_until(lambda: not qemu_nbd_children(daemon), "qemu-nbd stopped with the device")
    if driver == "qcow2":
        chk = qemu_img("check", img)
        assert chk.returncode == 0, chk.stdout + chk.stderr
    raw = shadow.save(os.path.join(host.dir, f"shadow-{fmt}.raw"))
    cmp = qemu_img("compare", "-f", driver, "-F", "raw", img, raw)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nbdkit(*args: str) -> subprocess.Popen:
    return subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_socket(path: Optional[str] = None, port: int = 0) -> None:
    def up() -> bool:
        try:
            if path:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
            else:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    wait_until(up, "nbdkit listening", 10)


def test_nbdkit_memory_export_over_unix_socket(served):
    """``nbd:nbd+unix:///?socket=PATH`` of nbdkit's memory plugin: verified IO, flush and
    discard, the export's size as the disk's."""
    host, daemon, url = served
    sock = os.path.join(host.dir, "nbdkit-mem.sock")
    kit = _nbdkit("--unix", sock, "memory", str(SIZE))
    try:
        _wait_socket(sock)
        with logs_on_failure(daemon):
            g = host.create_guest(image=f"nbd+unix:///?socket={sock}", format="nbd",
                                  options=FrontendOptions(initial_zero=True))
            fe = g.frontend
            assert fe.disk.sectors * SECTOR == SIZE and fe.disk.discard
            exercise(fe, Shadow(SIZE))
            fe.close()
            host.destroy_guest(g)
    finally:
        kit.kill()
        kit.wait(10)


def test_nbdkit_file_export_over_tcp_readonly_and_resize(served):
    """``nbd://127.0.0.1:PORT/`` of nbdkit's file plugin: the guest's writes land in
    the file; the same export offered read-only (``-r``) is served read-only although
    mode=w; the file grown is noticed as a resize."""
    host, daemon, url = served
    path = host.make_image("nbdkit-file.raw", 16 * MiB)
    port = _free_port()
    kit = _nbdkit("--port", str(port), "--ipaddr", "127.0.0.1", "file", path)
    rport = _free_port()
    ro = _nbdkit("-r", "--port", str(rport), "--ipaddr", "127.0.0.1", "memory", str(8 * MiB))
    try:
        _wait_socket(port=port)
        _wait_socket(port=rport)
        with logs_on_failure(daemon):
            g = host.create_guest(image=f"nbd://127.0.0.1:{port}/", format="nbd",
                                  options=FrontendOptions(initial_zero=True))
            fe = g.frontend
            fe.write(2048, pattern(7, 64 * SECTOR))
            fe.flush()
            with open(path, "rb") as f:
                f.seek(2048 * SECTOR)
                assert f.read(64 * SECTOR) == pattern(7, 64 * SECTOR)
            os.truncate(path, 32 * MiB)
            wait_until(lambda: fe.disk.sectors * SECTOR == 32 * MiB, "the resize reaches the guest")
            fe.write(48 * 1024, pattern(8, 8 * SECTOR))  # beyond the old end
            assert fe.read(48 * 1024, 8) == pattern(8, 8 * SECTOR)

            fe2 = host.add_disk(g, XVDB, image=f"nbd://127.0.0.1:{rport}/", format="nbd",
                                options=FrontendOptions(initial_zero=True))
            assert fe2.disk.info & VDISK_READONLY
            r = fe2.submit_write(0, pattern(9, 8 * SECTOR)).get(timeout=30)
            assert r.status == Status.ERROR
            assert fe2.read(0, 8) == bytes(8 * SECTOR)
            fe2.close()
            fe.close()
            host.destroy_guest(g)
    finally:
        for k in (kit, ro):
            k.kill()
            k.wait(10)


def test_qemu_nbd_killed_mid_io_is_restarted(served):
    """qemu-nbd SIGKILLed with writes in flight: gblk restarts it, sends the requests
    in flight again; every request is answered; writes acknowledged but not yet
    flushed when it died are reported by the next flush failing (never lost
    silently); afterwards the data is verified and the image consistent."""
    host, daemon, url = served
    img = os.path.join(host.dir, "killed.qcow2")
    assert qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE)).returncode == 0
    with logs_on_failure(daemon):
        g = host.create_guest(image=img, format="qcow2")
        fe = g.frontend
        shadow = Shadow(SIZE)
        shadow.write(fe, 0, pattern(1, MiB))
        fe.flush()
        (pid,) = qemu_nbd_children(daemon)
        pending = [(1 + i, fe.submit_write(4096 + i * 128, pattern(20 + i, 64 * 1024)))
                   for i in range(64)]
        os.kill(pid, signal.SIGKILL)
        for i, r in pending:
            assert r.get(timeout=60).ok, i  # answered OKAY: sent again to the new server
        new = wait_until(lambda: qemu_nbd_children(daemon), "qemu-nbd restarted")
        assert new != [pid]
        flush = fe.submit_flush().get(timeout=30)
        dom = str(g.domid)
        # the metrics follow within a watch interval (2 s)
        s = wait_until(lambda: (lambda s: s if metric(s, "gblk_nbd_reconnects_total", domain=dom) >= 1
                                else None)(scrape(url)), "gblk_nbd_reconnects_total counts")
        assert metric(s, "gblk_errors_total", domain=dom, reason="nbd_connection") >= 1
        if flush.status != Status.OKAY:
            # some of them were acknowledged before the kill: their fate was reported
            assert metric(s, "gblk_nbd_unflushed_lost_total", domain=dom) >= 1
            assert "writes it had not flushed" in daemon.log_text()
        # the guest writes them again, as a file system does after a failed flush
        for i in range(64):
            shadow.write(fe, 4096 + i * 128, pattern(20 + i, 64 * 1024))
        fe.flush()
        shadow.check(fe, 0, 4096 + 64 * 128)
        fe.close()
        host.destroy_guest(g)
        wait_until(lambda: not qemu_nbd_children(daemon), "qemu-nbd stopped")
    chk = qemu_img("check", img)
    # leaked clusters (allocated by the killed server, never referenced) are harmless
    assert chk.returncode in (0, 3) and "ERROR" not in chk.stdout, chk.stdout + chk.stderr
    raw = shadow.save(os.path.join(host.dir, "killed.raw"))
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, raw)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_remote_server_gone_fails_requests_not_the_daemon(served):
    """The nbdkit serving a disk goes away: its requests are answered with ERROR
    (never hang), the connection state shows in the metrics, a raw disk beside it
    is served throughout; nbdkit back on the same socket: the disk works again."""
    host, daemon, url = served
    sock = os.path.join(host.dir, "nbdkit-gone.sock")
    kit = _nbdkit("--unix", sock, "memory", str(SIZE))
    try:
        _wait_socket(sock)
        with logs_on_failure(daemon):
            g = host.create_guest(image=f"nbd+unix:///?socket={sock}", format="nbd",
                                  options=FrontendOptions(initial_zero=True))
            fe = g.frontend
            other = host.add_disk(g, XVDB, image=host.make_image("beside.img", 8 * MiB),
                                  options=FrontendOptions(initial_zero=True))
            fe.write(0, pattern(1, 8 * SECTOR))
            kit.kill()
            kit.wait(10)
            t0 = time.monotonic()
            r = fe.submit_write(8, pattern(2, 8 * SECTOR)).get(timeout=60)
            assert r.status == Status.ERROR and time.monotonic() - t0 < 30
            other.write(0, pattern(3, 8 * SECTOR))
            assert other.read(0, 8) == pattern(3, 8 * SECTOR)
            dom = str(g.domid)
            wait_until(lambda: metric(scrape(url), "gblk_nbd_connected", domain=dom,
                                      device=str(g.disk.devid)) == 0, "gblk_nbd_connected 0")
            assert "NBD connection connected -> " in daemon.log_text()
            assert host.xs.read(f"{g.disk.backend_path}/state") == str(int(XenbusState.CONNECTED))

            os.unlink(sock)  # left by the killed nbdkit
            kit = _nbdkit("--unix", sock, "memory", str(SIZE))  # a new, empty export
            _wait_socket(sock)

            def works() -> bool:
                return fe.submit_write(0, pattern(4, 8 * SECTOR)).get(timeout=30).ok
            wait_until(works, "the disk served again")
            assert fe.read(0, 8) == pattern(4, 8 * SECTOR)
            other.close()
            fe.close()
            host.destroy_guest(g)
    finally:
        kit.kill()
        kit.wait(10)


def test_refused_images_fail_only_their_device(served, tmp_path):
    """An image qemu-nbd refuses and an NBD URI that cannot work: each device Closed
    with a hotplug-error saying why; the daemon serves on."""
    host, daemon, url = served
    bad = host.make_image("not-really.qcow2", MiB)
    with open(bad, "r+b") as f:
        f.write(b"QFI\xfb" + b"\xff" * 100)  # qcow2 magic, nonsense header
    with logs_on_failure(daemon):
        g = host.create_guest(size=8 * MiB)
        cases = {
            XVDB: (bad, "qcow2", "qemu-nbd refused"),
            XVDB + 16: ("nbd+unix:///?socket=/nonexistent/sock", "nbd", "cannot serve nbd:"),
            XVDB + 32: ("ftp://example/x", "nbd", "scheme must be nbd"),
        }
        for devid, (target, fmt, needle) in cases.items():
            disk = host.toolstack.attach_disk(g.domid, target, devid=devid, format=fmt)
            be = disk.backend_path
            wait_until(lambda p=be: host.xs.read(f"{p}/state") == str(int(XenbusState.CLOSED)),
                       f"{devid} goes Closed")
            assert host.xs.read(f"{be}/hotplug-status") == "error"
            err = host.xs.read(f"{be}/hotplug-error") or ""
            assert needle in err, err
        g.frontend.write(0, pattern(1, 8 * SECTOR))
        assert g.frontend.read(0, 8) == pattern(1, 8 * SECTOR)
        g.frontend.close()
        host.destroy_guest(g)


def test_qemu_nbd_missing(tmp_path):
    """No qemu-nbd on PATH: the qcow2 disk fails with a hotplug-error naming the
    package to install."""
    with SimHost() as h:
        env_bin = tmp_path / "bin"
        env_bin.mkdir()
        argv = h.backend_argv(["--metrics-address", "127.0.0.1:0", "--kinds", "qdisk"])
        d = BackendProcess(argv, os.path.join(h.dir, "noqemu2.log"),
                           child_env({"PATH": str(env_bin)}))
        try:
            img = os.path.join(h.dir, "x.qcow2")
            assert qemu_img("create", "-q", "-f", "qcow2", img, "8M").returncode == 0
            dom = h.toolstack.create_domain()
            disk = h.toolstack.attach_disk(dom.domid, img, format="qcow2")
            be = disk.backend_path
            wait_until(lambda: h.xs.read(f"{be}/state") == str(int(XenbusState.CLOSED)), "Closed")
            err = h.xs.read(f"{be}/hotplug-error") or ""
            assert "qemu-nbd not found" in err and "qemu-utils" in err, err
        finally:
            d.stop()
