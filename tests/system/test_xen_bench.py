"""Side-by-side benchmark on real Xen: gblk vs QEMU's qdisk vs the kernel's blkback.

The same fio jobs (4 KiB random read/write at QD1 and QD32, 1 MiB sequential read/write)
against the same image file, in the same boot, served by gblk (backendtype=phy), by
Debian's qemu-system-xen (backendtype=qdisk) and by xen-blkback through a loop device.
Under TCG the absolute figures are tiny; the ratios are the point. Printed (in the
session summary and here), not asserted: only that gblk's run produced figures.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest

from .conftest import bench_table

pytestmark = pytest.mark.xen


@pytest.mark.scenario("bench")
def test_side_by_side_benchmark(scenario: Callable[[], Dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark ran and gblk served every job (figures printed, not asserted)."""
    result = scenario()
    data = result["data"]
    with capsys.disabled():
        print("\n" + "\n".join(bench_table(data)))
    assert all(data["gblk"][job]["iops"] for job in data["gblk"]), data["gblk"]
