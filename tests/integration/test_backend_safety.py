"""The backend's data-safety promises, through real processes on the simulated host:
write barriers order writes, a flush reaches the file (seen with strace), discard
punches the file and reads back zeros, and read-only and cdrom disks refuse every
operation that would change the image (XSA-142).

Every test runs ``gblk serve`` as a subprocess against the simulated xenstored, with
the Linux-like guest frontend in this process, and checks the image file itself, not
only what the guest reads back.
"""

from __future__ import annotations

import os
import signal
from typing import Iterator, List, Tuple

import gevent
import pytest

from gblk.blkif.const import VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE, Status
from gblk.sim.guest.frontend import FrontendOptions, IoResult
from gblk.sim.harness.host import BackendProcess, SimHost

from .backend_support import (
    DEADLINE,
    SECTOR,
    file_bytes,
    logs_on_failure,
    metric,
    metrics_url,
    pattern,
    scrape,
    served_host,
)
from .lifecycle_support import (
    fd_flags,
    open_paths,
    parse_strace,
    prefilled_image,
    read_file,
    start_traced_daemon,
    syncs_of,
    traced_pid,
    writes_at,
)

MiB = 1 << 20
PAGE_SECTORS = 8
DAEMON_TOML = '[daemon]\nkinds = ["qdisk"]\n'


@pytest.fixture(scope="module")
def served() -> Iterator[Tuple[SimHost, BackendProcess, str]]:
    """One simulated host and one daemon (qdisk, default settings) for the module."""
    with served_host("safety", DAEMON_TOML) as served:
        yield served


def _result(r: gevent.event.AsyncResult) -> IoResult:
    res = r.get(timeout=DEADLINE)
    assert isinstance(res, IoResult)
    return res


def _all_ok(results: List[gevent.event.AsyncResult]) -> None:
    for r in results:
        res = _result(r)
        assert res.ok, res


# -- barriers ----------------------------------------------------------------------------
def test_barrier_orders_earlier_and_later_writes(served):
    """WRITE_BARRIER (docs/protocol.md §2): every write submitted before it completes
    before it, every write after it starts after it. Per round, eight writes of the
    same 24 sectors, then a barrier with data over the first 16, then two writes
    over sectors 8..15 and 16..23, all placed on one ring and published at once
    without waiting: the result must be barrier data on 0..7 and the later writes
    on 8..23, in what the guest reads back and in the file."""
    host, daemon, _ = served
    with logs_on_failure(daemon):
        g = host.create_guest(size=16 * MiB)
        fe = g.frontend
        assert fe.disk.barrier
        for rnd in range(6):
            base = 2048 + rnd * 64
            seed = 1000 + rnd * 100
            placed = []
            for i in range(8):
                placed.append(fe.submit_write(base, pattern(seed + i, 24 * SECTOR), queue=0,
                                              push=False))
            barrier_data = pattern(seed + 50, 16 * SECTOR)
            placed.append(fe.submit_barrier(base, barrier_data, queue=0, push=False))
            late1 = pattern(seed + 60, 8 * SECTOR)
            late2 = pattern(seed + 70, 8 * SECTOR)
            placed.append(fe.submit_write(base + 8, late1, queue=0, push=False))
            placed.append(fe.submit_write(base + 16, late2, queue=0, push=False))
            fe.push(0)
            _all_ok(placed)
            expected = barrier_data[:8 * SECTOR] + late1 + late2
            assert fe.read(base, 24) == expected, f"round {rnd}: ordering broken"
            assert file_bytes(g.image, base, 24) == expected, f"round {rnd}: file"
        assert fe.stats.protocol_violations == 0, fe.stats.violations
        fe.close()
        host.destroy_guest(g)


def test_barrier_without_data_orders_writes(served):
    """A WRITE_BARRIER without segments still orders: eight writes of one page, a
    data-less barrier, then one more write of the page, published together: the
    page ends with the last write's data, every round."""
    host, daemon, _ = served
    with logs_on_failure(daemon):
        g = host.create_guest(size=16 * MiB)
        fe = g.frontend
        for rnd in range(6):
            base = 4096 + rnd * 16
            placed = [fe.submit_write(base, pattern(2000 + rnd * 10 + i, 8 * SECTOR), queue=0,
                                      push=False) for i in range(8)]
            placed.append(fe.submit_barrier(base, None, queue=0, push=False))
            last = pattern(2900 + rnd, 8 * SECTOR)
            placed.append(fe.submit_write(base, last, queue=0, push=False))
            fe.push(0)
            _all_ok(placed)
            assert fe.read(base, 8) == last, f"round {rnd}: ordering broken"
            assert file_bytes(g.image, base, 8) == last, f"round {rnd}: file"
        fe.close()
        host.destroy_guest(g)


# -- flush reached the file -----------------------------------------------------------
def test_flush_reaches_the_file():
    """FLUSH_DISKCACHE is fdatasync of the image (docs/protocol.md §2, issue 4): with the
    daemon under ``strace -f -y``, each guest flush answered OKAY is backed by an
    fdatasync of the image's fd that began after the pwritev of the write answered
    before the flush, and ended before the pwritev of a write submitted after the
    flush was answered. Flush with data: a sync before its data is written and one
    after. Barrier with data: the same. Barrier without data: a sync between the
    write before it and the write after it."""
    with SimHost() as host:
        trace = os.path.join(host.dir, "strace.txt")
        daemon = start_traced_daemon(host, "traced", DAEMON_TOML, trace)
        with logs_on_failure(daemon):
            metrics_url(daemon, timeout=DEADLINE * 2)
            g = host.create_guest(size=8 * MiB, timeout=DEADLINE * 2)
            fe = g.frontend
            page = 8 * SECTOR
            # sector of each write; every write is one page: one request, one pwritev
            fe.write(8, pattern(1, page))
            fe.flush()
            fe.write(16, pattern(2, page))
            fe.write(24, pattern(3, page))
            fe.flush(32, pattern(4, page))
            fe.write(40, pattern(5, page))
            fe.write(48, pattern(6, page))
            fe.barrier(56, pattern(7, page))
            fe.write(64, pattern(8, page))
            fe.write(72, pattern(9, page))
            fe.barrier(0, None)
            fe.write(80, pattern(10, page))
            fe.close()
            os.kill(traced_pid(daemon), signal.SIGTERM)
            assert daemon.stop(timeout=DEADLINE) == 0
        image = os.path.realpath(g.image)
        calls = parse_strace(trace)

        def write(sector: int):
            found = writes_at(calls, image, sector * SECTOR)
            assert len(found) == 1, (sector, found)
            return found[0]

        syncs = syncs_of(calls, image)
        assert syncs, "no fdatasync of the image at all"

        def synced_between(before, after) -> bool:
            return any(before.end < s.start and s.end < after.start for s in syncs)

        # plain flush: the write before it was synced before the next write came
        assert synced_between(write(8), write(16)), "flush: no fdatasync after the write before it"
        # flush with data: sync after the earlier write, then the data, then a sync
        assert synced_between(write(24), write(32)), "flush with data: no sync before its data"
        assert synced_between(write(32), write(40)), "flush with data: data not synced"
        # barrier with data: the same
        assert synced_between(write(48), write(56)), "barrier: no sync before its data"
        assert synced_between(write(56), write(64)), "barrier: data not synced"
        # barrier without data
        assert synced_between(write(72), write(80)), "data-less barrier: no sync"
        host.destroy_guest(g)


# -- discard ---------------------------------------------------------------------------------
def test_discard_reads_back_zeros_and_punches_the_file(served):
    """DISCARD on a raw file punches a hole (docs/protocol.md §2, issue 4): the range
    reads back as zeros (guest and file), the file's allocated blocks drop by about
    the range, the neighbouring sectors keep their data."""
    host, daemon, _ = served
    with logs_on_failure(daemon):
        g = host.create_guest(size=16 * MiB)
        fe = g.frontend
        assert fe.disk.discard and fe.disk.discard_granularity > 0
        start, n = 4096, 2048  # 1 MiB, 4 KiB aligned
        data = pattern(40, (n + 16) * SECTOR)
        fe.write(start - 8, data)
        fe.flush()  # blocks allocated on disk, not only reserved
        before = os.stat(g.image).st_blocks
        fe.discard(start, n)
        after = os.stat(g.image).st_blocks
        assert before - after >= n // 2, (before, after)
        assert fe.read(start, n) == bytes(n * SECTOR)
        assert file_bytes(g.image, start, n) == bytes(n * SECTOR)
        assert fe.read(start - 8, 8) == data[:8 * SECTOR]
        assert fe.read(start + n, 8) == data[-8 * SECTOR:]
        assert file_bytes(g.image, start + n, 8) == data[-8 * SECTOR:]
        assert fe.stats.mismatches == 0
        fe.close()
        host.destroy_guest(g)


def test_secure_discard_is_not_offered_on_a_file(served):
    """A file cannot promise secure erasure: ``discard-secure=0`` is published, a
    DISCARD with BLKIF_DISCARD_SECURE is answered EOPNOTSUPP (not ERROR, not OKAY)
    and the data stays where it was."""
    host, daemon, _ = served
    with logs_on_failure(daemon):
        g = host.create_guest(size=16 * MiB)
        fe = g.frontend
        assert host.xs.read(f"{g.disk.backend_path}/discard-secure") == "0"
        assert not fe.disk.discard_secure
        data = pattern(41, 64 * SECTOR)
        fe.write(512, data)
        res = _result(fe.submit_discard(512, 64, secure=True))
        assert res.status == Status.EOPNOTSUPP and not res.lost, res
        assert fe.read(512, 64) == data
        assert file_bytes(g.image, 512, 64) == data
        fe.close()
        host.destroy_guest(g)


# -- read-only and cdrom --------------------------------------------------------------------
def _refusals(fe) -> List[Tuple[str, IoResult]]:
    """Every operation that would change the image, each answered."""
    page = pattern(77, 8 * SECTOR)
    big = pattern(78, 1 * MiB)
    placed = [
        ("write", fe.submit_write(0, page)),
        ("write, unaligned", fe.submit_write(3, pattern(79, SECTOR))),
        ("write, 11 segments", fe.submit_write(64, pattern(80, 11 * 4096))),
        ("write, INDIRECT", fe.submit_write(2048, big, indirect=True)),
        ("flush with data", fe.submit_flush(16, page)),
        ("barrier with data", fe.submit_barrier(24, page)),
        ("discard", fe.submit_discard(0, 2048)),
        ("secure discard", fe.submit_discard(0, 8, secure=True)),
    ]
    return [(what, _result(r)) for what, r in placed]


def _check_read_only(host: SimHost, daemon: BackendProcess, url: str, device_type: str,
                     mode: str, info: int) -> None:
    size = 4 * MiB
    image = prefilled_image(host, f"ro-{device_type}-{mode}.img", size, seed=21)
    original = read_file(image)
    g = host.create_guest(image=image, mode=mode, device_type=device_type,
                          options=FrontendOptions(initial_zero=False))
    fe = g.frontend
    be = g.disk.backend_path
    assert fe.disk.info == info
    assert host.xs.read(f"{be}/feature-discard") == "0"
    assert not fe.disk.discard
    for what, res in _refusals(fe):
        assert res.status == Status.ERROR and not res.lost, (what, res)
    # reads work and return the image's bytes
    assert fe.read(0, size // SECTOR) == original
    assert fe.read(5, 3) == original[5 * SECTOR:8 * SECTOR]
    # nothing was written, byte for byte
    assert read_file(image) == original
    # the daemon holds the image open read-only
    path = os.path.realpath(image)
    fds = [fd for fd, p in open_paths(daemon.pid).items() if p == path]
    assert fds, "the daemon does not hold the image open"
    for fd in fds:
        assert fd_flags(daemon.pid, fd) & os.O_ACCMODE == os.O_RDONLY
    samples = scrape(url)
    assert metric(samples, "gblk_errors_total", domain=str(g.domid), reason="read_only") >= 8
    fe.close()
    host.destroy_guest(g)
    assert read_file(image) == original


def test_read_only_disk_refuses_every_change(served):
    """XSA-142: on a ``mode=r`` disk, WRITE (plain, 11 segments, INDIRECT), FLUSH
    with data, BARRIER with data and DISCARD are answered ERROR and the image is
    unchanged byte for byte; reads are served; ``info`` has VDISK_READONLY and
    ``feature-discard=0``; the daemon opened the image O_RDONLY."""
    host, daemon, url = served
    with logs_on_failure(daemon):
        _check_read_only(host, daemon, url, "disk", "r", VDISK_READONLY)


@pytest.mark.parametrize("mode", ["r", "w"])
def test_cdrom_refuses_every_change(served, mode):
    """A ``device-type=cdrom`` disk is read-only whatever ``mode`` says: the same
    refusals as ``mode=r``, the image unchanged, reads served, and ``info`` is
    VDISK_CDROM|VDISK_REMOVABLE|VDISK_READONLY."""
    host, daemon, url = served
    with logs_on_failure(daemon):
        _check_read_only(host, daemon, url, "cdrom", mode,
                         VDISK_CDROM | VDISK_REMOVABLE | VDISK_READONLY)
