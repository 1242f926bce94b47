"""End to end on the simulated host: the Linux-like guest frontend against gblk's own
daemon (``gblk serve --xen sim:DIR`` as a real subprocess).

A smoke test of the whole chain - toolstack, xenstored, negotiation, grants, event
channels, the backend's IO on a real file - with byte-exact verification. The
backend's full matrix lives in its own tests; this one guards that the simulated
host and the frontend keep working with it.
"""

from __future__ import annotations

import os

import pytest

from gblk.blkif.const import SECTOR_SIZE, XenbusState
from gblk.sim.guest.frontend import FrontendOptions
from gblk.sim.harness.host import SimHost

MiB = 1 << 20


@pytest.fixture(scope="module")
def host():
    with SimHost() as h:
        h.start_backend(["--kinds", "qdisk,vbd3", "--no-metrics"])
        yield h


def test_connect_io_close_reconnect_detach(host):
    """Connect, write and read back (small, unaligned, 1 MiB INDIRECT), flush with
    and without data, barrier, discard reading back zeros (and the file punched),
    close, reconnect, read the data again, then unplug through the toolstack."""
    g = host.create_guest(size=16 * MiB, timeout=60)
    fe = g.frontend
    assert fe.connected and host.backend_state(g) == XenbusState.CONNECTED
    assert fe.disk.sectors == 16 * MiB // SECTOR_SIZE
    small = os.urandom(3 * SECTOR_SIZE)
    fe.write(5, small)
    assert fe.read(5, 3) == small
    big = os.urandom(MiB)
    fe.write(2048, big)
    assert fe.read(2048, MiB // SECTOR_SIZE) == big
    fe.flush()
    fe.flush(8192, b"\x01" * 4096)
    if fe.disk.barrier:
        fe.barrier(8200, b"\x02" * 4096)
    with open(g.image, "rb") as f:
        f.seek(2048 * SECTOR_SIZE)
        assert f.read(MiB) == big  # it reached the file
    if fe.disk.discard:
        fe.discard(2048, 2048)
        assert fe.read(2048, 2048) == bytes(MiB)
    fe.close()
    assert host.backend_state(g) == XenbusState.CLOSED
    assert fe.grants_in_use() == 0
    fe.reconnect(timeout=60)
    assert fe.read(5, 3) == small
    assert fe.stats.mismatches == 0 and fe.stats.protocol_violations == 0
    assert fe.stats.canary_violations == 0 and fe.stats.grants_busy_after_response == 0
    assert host.toolstack.detach_disk(g.domid, g.disk.devid, timeout=10) is True
    assert fe.closed_by_backend.wait(10) and not fe.connected
    host.destroy_guest(g)


@pytest.mark.parametrize("options", [
    FrontendOptions(protocol="x86_32-abi", initial_zero=True),
    FrontendOptions(protocol=None, persistent=False, max_ring_page_order=0, max_queues=1,
                    initial_zero=True),
    FrontendOptions(max_indirect_segments=0, initial_zero=True),
], ids=["x86_32", "no-protocol-no-persistent-order0", "no-indirect"])
def test_variants(host, options):
    """A few negotiation variants carry verified IO through the real backend."""
    g = host.create_guest(size=4 * MiB, options=options, timeout=60, kind="vbd3")
    fe = g.frontend
    data = os.urandom(300 * 1024)
    fe.write(16, data)
    assert fe.read(16, len(data) // SECTOR_SIZE) == data
    assert fe.read(0, 16) == bytes(16 * SECTOR_SIZE)
    assert fe.stats.mismatches == 0 and fe.stats.protocol_violations == 0
    fe.close()
    assert fe.grants_in_use() == 0
    host.destroy_guest(g)
