"""Copy-before-write (gblk.engine.snapshot) step by step: a pool whose jobs run when
the test says, an in-memory image, a real side file. Writes held until the point in
time, one copy for two writes to a block, a discard over many blocks, a copy racing
an export read, a copy that fails, close releasing every waiter."""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Callable, List, Optional, Sequence

import pytest

from gblk.engine import snapshot as snap
from gblk.engine.stats import DeviceStats
from gblk.storage.base import Store

B = snap.BLOCK
SIZE = 16 * B + 4096  # a partial last block


class Job:
    def __init__(self, fn: Callable[..., Any], args: Sequence[Any]) -> None:
        self.fn, self.args = fn, args
        self.links: List[Callable[[Any], None]] = []
        self.ran = False
        self.value: Any = None

    def run(self) -> None:
        if not self.ran:
            self.ran = True
            self.value = self.fn(*self.args)
            for cb in self.links:
                cb(self)

    def rawlink(self, cb: Callable[[Any], None]) -> None:
        self.links.append(cb)

    def get(self, block: bool = True) -> Any:
        self.run()
        return self.value


class Pool:
    def __init__(self) -> None:
        self.jobs: List[Job] = []

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Job:
        j = Job(fn, args)
        self.jobs.append(j)
        return j

    def copies(self) -> List[Job]:
        return [j for j in self.jobs if j.fn is snap.copy_range and not j.ran]

    def run_copies(self) -> int:
        n = 0
        while self.copies():
            self.copies()[0].run()
            n += 1
        return n


class Image(Store):
    def __init__(self, size: int) -> None:
        self.data = bytearray(os.urandom(size))
        self.during_read: Optional[Callable[[], None]] = None
        self.fail = False

    def size(self) -> int:
        return len(self.data)

    def readv(self, views: Sequence[memoryview], offset: int) -> None:
        if self.fail:
            raise OSError(errno.EIO, "injected")
        for v in views:
            v[:] = self.data[offset:offset + len(v)]
            offset += len(v)
        hook, self.during_read = self.during_read, None
        if hook is not None:
            hook()

    def writev(self, views: Sequence[memoryview], offset: int) -> None:
        for v in views:
            self.data[offset:offset + len(v)] = v
            offset += len(v)

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int, secure: bool = False) -> None:
        self.data[offset:offset + length] = bytes(length)

    def close(self) -> None: ...


@pytest.fixture
def view(tmp_path):
    image = Image(SIZE)
    image.data[3 * B:4 * B] = bytes(B)  # a block of zeros: copied, not stored
    pool = Pool()
    stats = DeviceStats(domain=1, device=51712, kind="qdisk")
    fd = snap.create_side_file(str(tmp_path), SIZE)
    assert os.listdir(tmp_path) == []  # nameless
    pit = snap.PointInTime(image, fd, SIZE, pool, stats, logging.getLogger("test"))
    yield pit, image, pool, stats
    pit.close()
    for j in pool.jobs:
        j.run()


def _issued(log: List[str], name: str) -> Callable[[], None]:
    return lambda: log.append(name)


def test_writes_wait_until_the_point_in_time_then_for_their_copies(view):
    pit, image, pool, stats = view
    kept = bytes(image.data)
    log: List[str] = []
    assert pit.need(0, 512)  # before open: every write waits
    pit.after([(0, 512)], _issued(log, "early"))
    assert log == [] and not pool.copies()
    pit.open()
    assert log == [] and len(pool.copies()) == 1
    pool.run_copies()
    assert log == ["early"]
    image.write(0, b"x" * 512)
    assert not pit.need(0, 512) and not pit.need(B - 512, 512)  # block 0 is copied
    assert pit.need(B - 512, 1024)  # block 1 is not
    assert pit.read(0, SIZE) == kept
    assert stats.export_cbw_bytes == B


def test_two_writes_to_one_block_wait_for_one_copy(view):
    pit, image, pool, stats = view
    pit.open()
    kept = bytes(image.data)
    log: List[str] = []
    pit.after([(B + 512, 512)], _issued(log, "a"))
    pit.after([(B + 4096, 8192)], _issued(log, "b"))
    assert len(pool.copies()) == 1 and log == []
    pool.run_copies()
    assert log == ["a", "b"]
    image.write(B + 512, b"a" * 512)
    image.write(B + 4096, b"b" * 8192)
    assert pit.read(B, B) == kept[B:2 * B]
    assert stats.export_cbw_bytes == B


def test_a_discard_over_many_blocks_copies_each_once_and_goes_after_all(view, monkeypatch):
    pit, image, pool, stats = view
    monkeypatch.setattr(snap, "COPY_JOB", 4 * B)
    pit.open()
    kept = bytes(image.data)
    log: List[str] = []
    pit.after([(2 * B, 512)], _issued(log, "small"))  # block 2: being copied
    pit.after([(0, SIZE)], _issued(log, "discard"))  # every block, the last partial
    assert len(pool.copies()) == 1 + 4 + 1  # block 2; 0-1, 3-6, 7-10, 11-14; 15-16
    pool.copies()[0].run()
    assert log == ["small"]
    pool.run_copies()
    assert log == ["small", "discard"]
    image.discard(0, SIZE)
    assert pit.read(0, SIZE) == kept
    assert stats.export_cbw_bytes == SIZE
    assert stats.export_side_bytes == SIZE - B  # the zero block is a hole
    done: List[str] = []
    pit.after([(0, SIZE)], _issued(done, "again"))  # all copied: at once
    assert done == ["again"] and not pool.copies()


def test_a_block_copied_while_the_export_reads_it_is_read_from_the_side_file(view):
    pit, image, pool, stats = view
    pit.open()
    kept = bytes(image.data)

    def guest_write_meanwhile() -> None:
        # the export's read of the image ran; now a guest write comes, its block
        # is copied and the write lands before the read is looked at again
        pit.after([(5 * B, 4096)], lambda: image.write(5 * B, b"w" * 4096))
        pool.run_copies()

    image.during_read = guest_write_meanwhile
    assert pit.read(4 * B, 2 * B) == kept[4 * B:6 * B]
    assert image.data[5 * B:5 * B + 4096] == b"w" * 4096


def test_a_copy_that_fails_gives_the_view_up_and_lets_the_writes_go(view):
    pit, image, pool, stats = view
    pit.open()
    log: List[str] = []
    pit.after([(0, 512)], _issued(log, "a"))
    pit.after([(B, 512), (0, 512)], _issued(log, "b"))
    image.fail = True
    pool.copies()[0].run()
    assert pit.failed and "injected" in pit.failed
    assert sorted(log) == ["a", "b"]  # each exactly once
    pool.run_copies()
    assert sorted(log) == ["a", "b"]
    assert not pit.need(0, 512)
    image.fail = False
    with pytest.raises(OSError) as e:
        pit.read(0, 512)
    assert e.value.errno == errno.EIO


def test_close_releases_every_held_and_waiting_batch_once(view):
    pit, image, pool, stats = view
    log: List[str] = []
    pit.after([(0, 512)], _issued(log, "held"))
    pit.open()
    pit.after([(B, 512)], _issued(log, "waiting"))
    pit.close()
    assert sorted(log) == ["held", "waiting"]
    pool.run_copies()
    assert sorted(log) == ["held", "waiting"]
    assert not pit.need(0, 512)
    late: List[str] = []
    pit.after([(0, 512)], _issued(late, "late"))
    assert late == ["late"]


def _runs_slowly(bits: bytes, g: int, size: int, off: int, n: int) -> List[tuple]:
    out: List[tuple] = []
    pos, end = off, min(off + n, size)
    while pos < end:
        b = pos // g
        d = (bits[b >> 3] >> (b & 7)) & 1 if (b >> 3) < len(bits) else 1
        nxt = min((b + 1) * g, end)
        if out and out[-1][1] == d:
            out[-1] = (out[-1][0] + nxt - pos, d)
        else:
            out.append((nxt - pos, d))
        pos = nxt
    return out


def test_the_dirty_map_as_nbd_runs_and_the_bits_since_an_export():
    """What ``qemu:dirty-bitmap:cbt`` answers: the map's runs over any range, granule by
    granule (whole bytes skipped), the same as a slow walk; set_bits/popcount."""
    import random

    from gblk.engine.cbt import dirty_runs, popcount, set_bits

    bits = bytearray(4)
    set_bits(bits, 3, 20)
    assert popcount(bits) == 18 and bits[1] == 255 and bits[2] == 0b11111
    assert dirty_runs(bytes(bits), 4096, 32 * 4096, 0, 32 * 4096) == [
        (3 * 4096, 0), (18 * 4096, 1), (11 * 4096, 0)]
    assert dirty_runs(bytes(bits), 4096, 32 * 4096, 4096 * 3 + 100, 512) == [(512, 1)]
    rnd = random.Random(7)
    for _ in range(500):
        n = rnd.randint(1, 24)
        raw = bytes(rnd.choice([0, 255, rnd.randrange(256)]) for _ in range(n))
        g = rnd.choice([512, 65536])
        size = rnd.randint(1, (n * 8 + 2) * g)
        off = rnd.randrange(size)
        ln = rnd.randint(1, size - off + 3)
        assert dirty_runs(raw, g, size, off, ln) == _runs_slowly(raw, g, size, off, ln)
