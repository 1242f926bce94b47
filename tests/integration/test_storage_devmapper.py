"""Storage faults from the kernel itself: a device-mapper ``error`` target in the
middle of a disk on a loop device, served by the real daemon as a block device.

Needs root, loop devices and device-mapper (``dmsetup targets`` lists ``error``):
skipped with the reason where the kernel has no device-mapper (e.g. a Firecracker
VM or a container); ``dmsetup`` itself is installed by ``.ci/run``.
"""

from __future__ import annotations

import os
import subprocess
from typing import Iterator

import pytest

from gblk.sim.harness.host import SimHost

from .backend_support import pattern
from .host_tools import require_tool
from .hostile_support import ERROR, OKAY, WAIT, close_without_leaks, dev_metric, launch

pytestmark = pytest.mark.hostile

SECTORS = 16384  # 8 MiB
BAD = (4096, 4104)  # sectors answered EIO by the kernel


def _run(*argv: str, input: str = "") -> str:
    return subprocess.run(argv, input=input, capture_output=True, text=True, check=True,
                          timeout=60).stdout


def _devmapper_or_skip() -> None:
    require_tool("dmsetup", "dmsetup")
    require_tool("losetup", "mount")
    if os.geteuid() != 0:
        pytest.skip("device-mapper tests need root")
    try:
        targets = _run("dmsetup", "targets")
    except (subprocess.CalledProcessError, OSError) as e:
        why = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
        pytest.skip(f"no device-mapper in this kernel: dmsetup targets: {why[0] if why else e}")
    if "error" not in targets:
        pytest.skip("device-mapper has no error target")


@pytest.fixture
def dm_disk(tmp_path) -> Iterator[str]:
    _devmapper_or_skip()
    image = tmp_path / "backing.img"
    with open(image, "wb") as f:
        f.truncate(SECTORS * 512)
    loop = _run("losetup", "--find", "--show", str(image)).strip()
    name = f"gblk-test-{os.getpid()}"
    try:
        _run("dmsetup", "create", name, input=_table(loop, faulty=True))
        try:
            yield name
        finally:
            subprocess.run(["dmsetup", "remove", "--retry", name], timeout=60)
    finally:
        subprocess.run(["losetup", "-d", loop], timeout=60)


def _table(loop: str, faulty: bool) -> str:
    if not faulty:
        return f"0 {SECTORS} linear {loop} 0\n"
    a, b = BAD
    return (f"0 {a} linear {loop} 0\n{a} {b - a} error\n"
            f"{b} {SECTORS - b} linear {loop} {b}\n")


def test_dm_error_target_fails_exactly_its_sectors_and_recovers(dm_disk):
    """Reads and writes over the error target's sectors are ERROR (io_error); every
    other request is OKAY; with the error target replaced by the real sectors the same
    requests succeed."""
    loop = _run("dmsetup", "deps", "-o", "devname", dm_disk)
    with SimHost() as host:
        d = launch(host, "dm", '[daemon]\nkinds = ["qdisk"]\n')
        try:
            g = host.create_guest(image=f"/dev/mapper/{dm_disk}")
            fe = g.frontend
            results = [fe.submit_write(4096 - 16 + i * 8, pattern(i, 4096)) for i in range(5)]
            got = [r.get(timeout=WAIT).status for r in results]
            assert got == [OKAY, OKAY, ERROR, OKAY, OKAY]
            assert fe.submit_read(BAD[0], 8).get(timeout=WAIT).status == ERROR
            assert dev_metric(d.scrape(), "gblk_errors_total", fe, reason="io_error") == 2
            dev = loop.split("(")[-1].rstrip(")\n")
            _run("dmsetup", "reload", dm_disk, input=_table(f"/dev/{dev}", faulty=False))
            _run("dmsetup", "resume", dm_disk)
            fe.write(BAD[0], pattern(9, 4096))
            assert fe.read(BAD[0], 8) == pattern(9, 4096)
            close_without_leaks(fe)
            host.destroy_guest(g)
            d.assert_sane()
        finally:
            d.stop()
