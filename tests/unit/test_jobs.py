"""The blocking per-request jobs (gblk.engine.jobs) with a small fake grant table
and a real RawStore on a temp file.

The fake maps grants the way the real and simulated tables do: guest memory is a
memfd, each mapping is its own shared mmap of the granted frame (PROT_READ for a
read-only map), ``unmap()`` refuses (GrantError) while a view derived from the
mapping is still alive, and it counts maps/unmaps so a leak shows.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import struct
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from gblk.blkif.abi import Segment
from gblk.blkif.const import Op, Status
from gblk.blkif.validate import DiskLimits
from gblk.engine import jobs
from gblk.engine.jobs import (
    MODE_COPY,
    MODE_MAP,
    MODE_PERSISTENT,
    JobContext,
    Outcome,
    read_indirect,
    run_discard,
    run_request,
)
from gblk.errors import GrantError
from gblk.storage import open_store
from gblk.storage import raw as rawmod
from gblk.storage.base import Store
from gblk.xen.interfaces import (
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_okay,
    GNTST_permission_denied,
    PAGE_SIZE,
    CopySegment,
    GrantMapping,
    GrantTable,
)

from .unit_support import FakeMapping

DOMID = 7
DISK_BYTES = 256 * 1024
SENTINEL = 0xA5
POISON = 0xEE
MODES = [MODE_MAP, MODE_PERSISTENT, MODE_COPY]


def pattern(n: int, seed: int = 0) -> bytes:
    period = bytes((i * 31 + seed * 7 + 1) & 0xFF for i in range(256))
    return (period * (n // 256 + 1))[:n]


class Guest:
    """A guest's memory (a memfd of ``npages`` frames) and its grant entries."""

    def __init__(self, npages: int = 64) -> None:
        self.fd = os.memfd_create("fake-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, npages * PAGE_SIZE)
        self.mem = mmap.mmap(self.fd, npages * PAGE_SIZE)
        self.grants: Dict[int, Tuple[int, bool]] = {}  # gref -> (frame, readonly)
        self._next = 8  # grefs 0..7 are reserved, as in Xen

    def grant(self, frame: int, readonly: bool = False) -> int:
        ref = self._next
        self._next += 1
        self.grants[ref] = (frame, readonly)
        return ref

    def page(self, ref: int) -> bytes:
        frame = self.grants[ref][0]
        return bytes(self.mem[frame * PAGE_SIZE:(frame + 1) * PAGE_SIZE])

    def fill(self, ref: int, data: bytes) -> None:
        frame = self.grants[ref][0]
        self.mem[frame * PAGE_SIZE:(frame + 1) * PAGE_SIZE] = data

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


class FakeGrantTable(GrantTable):
    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.live = 0  # pages mapped right now
        self.maps = 0
        self.unmaps = 0
        self.copies = 0
        self.map_calls: List[Tuple[Tuple[int, ...], bool]] = []
        self.mappings: List[FakeMapping] = []

    def _check(self, domid: int, ref: int, writable: bool) -> int:
        if domid != DOMID:
            return GNTST_bad_domain
        if ref not in self.guest.grants:
            return GNTST_bad_gntref
        if writable and self.guest.grants[ref][1]:
            return GNTST_permission_denied
        return GNTST_okay

    def map_grant_refs(self, domid: int, refs: Sequence[int], writable: bool) -> GrantMapping:
        refs = list(refs)
        self.map_calls.append((tuple(refs), writable))
        for r in refs:  # all or nothing
            st = self._check(domid, r, writable)
            if st != GNTST_okay:
                raise GrantError(f"d{domid} gref {r}: status {st}", st)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        frames = [mmap.mmap(self.guest.fd, PAGE_SIZE, mmap.MAP_SHARED, prot,
                            offset=self.guest.grants[r][0] * PAGE_SIZE) for r in refs]
        m = FakeMapping(refs, frames, self._unmapped)
        self.mappings.append(m)
        self.live += len(refs)
        self.maps += len(refs)
        return m

    def _unmapped(self, m: FakeMapping) -> None:
        self.live -= len(m.refs)
        self.unmaps += len(m.refs)

    def grant_copy(self, segments: Sequence[CopySegment]) -> List[int]:
        out = []
        for s in segments:
            assert 0 <= s.offset and s.offset + s.length <= PAGE_SIZE and len(s.local) == s.length
            st = self._check(s.domid, s.gref, not s.to_local)
            out.append(st)
            if st != GNTST_okay:
                continue
            base = self.guest.grants[s.gref][0] * PAGE_SIZE + s.offset
            if s.to_local:
                s.local[:] = self.guest.mem[base:base + s.length]
            else:
                self.guest.mem[base:base + s.length] = bytes(s.local)
            self.copies += 1
        return out

    def close(self) -> None:
        pass


class Rig:
    """One guest, its grant table, a raw disk image and a JobContext per mode."""

    def __init__(self, tmp_path: Path, npages: int = 64) -> None:
        self.guest = Guest(npages)
        self.gt = FakeGrantTable(self.guest)
        self.path = str(tmp_path / "disk.img")
        with open(self.path, "wb") as f:
            f.write(pattern(DISK_BYTES))
        self.store = open_store("raw", self.path, readonly=False)
        self.limits = DiskLimits(sectors=DISK_BYTES // 512)
        self.refs = [self.guest.grant(frame) for frame in range(npages)]
        for r in self.refs:
            self.guest.fill(r, bytes([SENTINEL]) * PAGE_SIZE)

    def ctx(self, mode: str, store: Optional[Store] = None) -> JobContext:
        return JobContext(self.gt, store or self.store, DOMID, self.limits, mode)

    def disk(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def finish(self, out: Outcome) -> None:
        """Unmap what a persistent job handed to the (absent) cache."""
        jobs.unmap_all(list(out.new_grants.values()))
        out.new_grants = {}

    def close(self) -> None:
        self.store.close()
        self.guest.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def seg_bytes(s: Segment) -> int:
    return (s.last_sect - s.first_sect + 1) * 512


READ_SEGS = [(0, 0, 7), (1, 2, 5), (2, 7, 7), (3, 1, 1), (4, 0, 6), (5, 3, 7)]


@pytest.mark.parametrize("mode", MODES)
def test_read_writes_only_the_segment_sectors(rig: Rig, mode: str) -> None:
    """XSA-403: a READ writes the disk data into [first_sect, last_sect] of each page
    and not one byte outside (pages start filled with a sentinel)."""
    segs = [Segment(rig.refs[i], f, la) for i, f, la in READ_SEGS]
    sector = 24
    out = run_request(rig.ctx(mode), Op.READ, segs, sector, {}, False, False)
    assert (out.status, out.reason) == (Status.OKAY, "")
    assert out.nbytes == sum(seg_bytes(s) for s in segs)
    disk = pattern(DISK_BYTES)
    pos = sector * 512
    for s in segs:
        page = rig.guest.page(s.gref)
        lo, hi = s.first_sect * 512, (s.last_sect + 1) * 512
        assert page[lo:hi] == disk[pos:pos + hi - lo]
        assert page[:lo] == bytes([SENTINEL]) * lo, "bytes before first_sect touched"
        assert page[hi:] == bytes([SENTINEL]) * (PAGE_SIZE - hi), "bytes after last_sect touched"
        pos += hi - lo
    rig.finish(out)
    assert rig.gt.live == 0


@pytest.mark.parametrize("mode", MODES)
def test_write_takes_only_the_segment_sectors(rig: Rig, mode: str) -> None:
    """XSA-403, WRITE side: only [first_sect, last_sect] of each page reaches the disk
    (the rest of each page is poison), back to back from sector_number, and nothing
    else on the disk changes."""
    segs = [Segment(rig.refs[i], f, la) for i, f, la in READ_SEGS]
    expected = b""
    for i, s in enumerate(segs):
        page = bytearray([POISON]) * PAGE_SIZE
        lo, hi = s.first_sect * 512, (s.last_sect + 1) * 512
        page[lo:hi] = pattern(hi - lo, seed=100 + i)
        rig.guest.fill(s.gref, bytes(page))
        expected += bytes(page[lo:hi])
    sector = 40
    out = run_request(rig.ctx(mode), Op.WRITE, segs, sector, {}, False, False)
    assert (out.status, out.nbytes) == (Status.OKAY, len(expected))
    want = bytearray(pattern(DISK_BYTES))
    want[sector * 512:sector * 512 + len(expected)] = expected
    assert rig.disk() == bytes(want)
    rig.finish(out)
    assert rig.gt.live == 0


def test_map_mode_least_privilege_and_one_batch(rig: Rig) -> None:
    """Map mode maps every distinct gref of a request in one batch: writable for a READ
    (the backend fills guest pages), read-only for a WRITE; two segments on one page
    map it once."""
    g0, g1 = rig.refs[0], rig.refs[1]
    segs = [Segment(g0, 0, 3), Segment(g0, 4, 7), Segment(g1, 0, 7)]
    run_request(rig.ctx(MODE_MAP), Op.READ, segs, 0, {}, False, False)
    run_request(rig.ctx(MODE_MAP), Op.WRITE, segs, 0, {}, False, False)
    assert rig.gt.map_calls == [((g0, g1), True), ((g0, g1), False)]
    assert rig.gt.live == 0 and rig.gt.maps == rig.gt.unmaps == 4


def _bad_cases() -> List[Any]:
    out = []
    for mode in MODES:
        for op in (Op.READ, Op.WRITE):
            for n in (1, 4, 11):
                for k in range(n):
                    out.append(pytest.param(mode, op, n, k, id=f"{mode}-{op.name.lower()}-{k}of{n}"))
    return out


@pytest.mark.parametrize("mode, op, n, k", _bad_cases())
def test_bad_gref_in_segment_k_of_n(rig: Rig, mode: str, op: int, n: int, k: int) -> None:
    """XSA-361/362/365: a bad gref in segment k of n fails that request with ERROR
    (grant_map, or grant_copy in copy mode), never raises, leaves nothing mapped, caches
    nothing, counts as many unmaps as maps, and a WRITE writes nothing."""
    segs = [Segment(rig.refs[i], 0, 7) for i in range(n)]
    segs[k] = Segment(99999, 0, 7)
    out = run_request(rig.ctx(mode), op, segs, 8, {}, False, False)
    assert out.status == Status.ERROR
    assert out.reason == ("grant_copy" if mode == MODE_COPY else "grant_map")
    assert out.new_grants == {}
    assert rig.gt.live == 0
    assert out.maps == out.unmaps == rig.gt.maps == rig.gt.unmaps
    if op == Op.WRITE:
        assert rig.disk() == pattern(DISK_BYTES)
    elif mode != MODE_COPY:
        for r in rig.refs[:n]:
            assert rig.guest.page(r) == bytes([SENTINEL]) * PAGE_SIZE


@pytest.mark.parametrize("mode", [MODE_MAP, MODE_PERSISTENT])
def test_read_into_read_only_grant_fails_cleanly(rig: Rig, mode: str) -> None:
    """A READ into a page the guest granted read-only cannot be served: grant_map
    ERROR, nothing mapped."""
    ro = rig.guest.grant(60, readonly=True)
    segs = [Segment(rig.refs[0], 0, 7), Segment(ro, 0, 7)]
    out = run_request(rig.ctx(mode), Op.READ, segs, 0, {}, False, False)
    assert (out.status, out.reason) == (Status.ERROR, "grant_map")
    assert rig.gt.live == 0 and out.new_grants == {}


def test_persistent_write_from_read_only_grant(rig: Rig) -> None:
    """Persistent grants are mapped writable; a WRITE whose page the guest granted
    read-only is still served, through a one-off read-only mapping that is unmapped
    before the job returns and never cached."""
    ro = rig.guest.grant(61, readonly=True)
    rig.guest.fill(ro, pattern(PAGE_SIZE, seed=5))
    segs = [Segment(rig.refs[0], 0, 7), Segment(ro, 0, 7)]
    out = run_request(rig.ctx(MODE_PERSISTENT), Op.WRITE, segs, 0, {}, False, False)
    assert out.status == Status.OKAY
    assert set(out.new_grants) == {rig.refs[0]}
    assert rig.gt.live == 1  # only the cached one
    assert rig.disk()[PAGE_SIZE:2 * PAGE_SIZE] == pattern(PAGE_SIZE, seed=5)
    rig.finish(out)
    assert rig.gt.live == 0


def test_persistent_uses_cached_pages_without_mapping(rig: Rig) -> None:
    """Grants already in the cache are used as they are: no map call for them; only
    the missing ones are mapped, one mapping per gref (so the cache can drop them one
    by one), and handed back in new_grants."""
    g0, g1 = rig.refs[0], rig.refs[1]
    cached_map = rig.gt.map_grant_refs(DOMID, [g0], True)
    calls_before = len(rig.gt.map_calls)
    segs = [Segment(g0, 0, 7), Segment(g1, 0, 7)]
    out = run_request(rig.ctx(MODE_PERSISTENT), Op.READ, segs, 0, {g0: cached_map.pages[0]},
                      False, False)
    assert out.status == Status.OKAY
    assert rig.gt.map_calls[calls_before:] == [((g1,), True)]
    assert set(out.new_grants) == {g1} and len(out.new_grants[g1].pages) == 1
    assert rig.guest.page(g0) == pattern(DISK_BYTES)[:PAGE_SIZE]
    assert rig.guest.page(g1) == pattern(DISK_BYTES)[PAGE_SIZE:2 * PAGE_SIZE]
    rig.finish(out)
    cached_map.unmap()
    assert rig.gt.live == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "segs, sector, reason",
    [
        pytest.param([(0, 0, 8)], 0, "invalid_segment", id="last-sect-8"),
        pytest.param([(0, 5, 4)], 0, "invalid_segment", id="first-after-last"),
        pytest.param([(0, 0, 7), (1, 0, 7)], DISK_BYTES // 512 - 8, "invalid_range",
                     id="past-the-end"),
        pytest.param([(0, 0, 7)], 2**64 - 4, "invalid_range", id="wraps"),
    ],
)
def test_invalid_segments_map_nothing(rig: Rig, mode: str, segs: list, sector: int,
                                      reason: str) -> None:
    """Segments are checked before any page is mapped or copied: an invalid request
    costs no grant operation and touches neither disk nor guest."""
    segments = [Segment(rig.refs[i], f, la) for i, f, la in segs]
    for op in (Op.READ, Op.WRITE):
        out = run_request(rig.ctx(mode), op, segments, sector, {}, False, False)
        assert (out.status, out.reason) == (Status.ERROR, reason)
    assert rig.gt.map_calls == [] and rig.gt.copies == 0
    assert rig.disk() == pattern(DISK_BYTES)


def _random_requests(seed: int, refs: List[int]) -> List[Tuple[int, List[Segment], int]]:
    rnd = random.Random(seed)
    reqs: List[Tuple[int, List[Segment], int]] = []
    for _ in range(40):
        n = rnd.randint(1, 11)
        segs = []
        for _ in range(n):
            first = rnd.randint(0, 7)
            segs.append(Segment(rnd.choice(refs[:16]), first, rnd.randint(first, 7)))
        total = sum(s.last_sect - s.first_sect + 1 for s in segs)
        sector = rnd.randint(0, DISK_BYTES // 512 - total)
        reqs.append((rnd.choice([Op.READ, Op.WRITE]), segs, sector))
    return reqs


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_copy_and_persistent_modes_equal_map_mode(tmp_path: Path, seed: int) -> None:
    """The three ways of reaching guest pages are interchangeable: the same request
    sequence leaves the same bytes in guest memory and on disk in map, persistent
    and copy mode."""
    results = {}
    for mode in MODES:
        d = tmp_path / mode
        d.mkdir()
        rig = Rig(d)
        try:
            for i, r in enumerate(rig.refs[:16]):
                rig.guest.fill(r, pattern(PAGE_SIZE, seed=i))
            for op, segs, sector in _random_requests(seed, rig.refs):
                out = run_request(rig.ctx(mode), op, segs, sector, {}, False, False)
                assert out.status == Status.OKAY, out.detail
                rig.finish(out)
            assert rig.gt.live == 0
            results[mode] = (rig.disk(), bytes(rig.guest.mem))
        finally:
            rig.close()
    assert results[MODE_COPY] == results[MODE_MAP]
    assert results[MODE_PERSISTENT] == results[MODE_MAP]


class RecordingStore(Store):
    """A store that records the order of calls and can fail one of them."""

    def __init__(self, fail: Optional[str] = None, fail_at: int = 1) -> None:
        self.calls: List[str] = []
        self.fail = fail
        self.fail_at = fail_at

    def _rec(self, what: str) -> None:
        self.calls.append(what)
        if what == self.fail and self.calls.count(what) == self.fail_at:
            raise OSError(errno.EIO, f"{what} failed")

    def size(self) -> int:
        return DISK_BYTES

    def readv(self, views: Sequence[memoryview], offset: int) -> None:
        self._rec("readv")

    def writev(self, views: Sequence[memoryview], offset: int) -> None:
        self._rec("writev")

    def flush(self) -> None:
        self._rec("flush")

    def discard(self, offset: int, length: int, secure: bool = False) -> None:
        self._rec("discard")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "with_data, presync, postsync, calls",
    [
        pytest.param(False, True, False, ["flush"], id="flush-without-data"),
        pytest.param(True, True, True, ["flush", "writev", "flush"], id="flush-with-data"),
        pytest.param(True, True, True, ["flush", "writev", "flush"], id="barrier"),
        pytest.param(False, True, True, ["flush", "flush"], id="barrier-without-data"),
        pytest.param(True, False, False, ["writev"], id="plain-write"),
    ],
)
def test_sync_ordering(rig: Rig, mode: str, with_data: bool, presync: bool, postsync: bool,
                       calls: List[str]) -> None:
    """FLUSH_DISKCACHE with data and WRITE_BARRIER: earlier writes made durable first
    (presync), then the data, then the data itself made durable (postsync)."""
    store = RecordingStore()
    segs = [Segment(rig.refs[0], 0, 7)] if with_data else []
    out = run_request(rig.ctx(mode, store), Op.WRITE, segs, 0, {}, presync, postsync)
    assert out.status == Status.OKAY
    assert store.calls == calls
    rig.finish(out)
    assert rig.gt.live == 0


@pytest.mark.parametrize("mode", MODES)
def test_failed_presync_writes_nothing(rig: Rig, mode: str) -> None:
    """If the flush before a barrier's data fails, the data is not written and the
    request is ERROR (io_error); no grant stays mapped."""
    store = RecordingStore(fail="flush")
    out = run_request(rig.ctx(mode, store), Op.WRITE, [Segment(rig.refs[0], 0, 7)], 0, {},
                      True, True)
    assert (out.status, out.reason) == (Status.ERROR, "io_error")
    assert store.calls == ["flush"]
    assert rig.gt.live == 0 and rig.gt.map_calls == []


@pytest.mark.parametrize("mode", MODES)
def test_failed_postsync_is_an_error(rig: Rig, mode: str) -> None:
    """A write whose closing flush fails is not durable: ERROR (io_error), nothing
    left mapped except what the cache is handed."""
    store = RecordingStore(fail="flush", fail_at=2)
    out = run_request(rig.ctx(mode, store), Op.WRITE, [Segment(rig.refs[0], 0, 7)], 0, {},
                      True, True)
    assert (out.status, out.reason) == (Status.ERROR, "io_error")
    assert store.calls == ["flush", "writev", "flush"]
    rig.finish(out)
    assert rig.gt.live == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", [Op.READ, Op.WRITE], ids=["read", "write"])
def test_io_error_is_an_outcome_and_unmaps(rig: Rig, mode: str, op: int) -> None:
    """The backing store failing (EIO) gives an io_error Outcome, never an exception,
    and every one-off mapping is gone."""
    store = RecordingStore(fail="readv" if op == Op.READ else "writev")
    segs = [Segment(rig.refs[i], 0, 7) for i in range(3)]
    out = run_request(rig.ctx(mode, store), op, segs, 0, {}, False, False)
    assert (out.status, out.reason) == (Status.ERROR, "io_error")
    rig.finish(out)
    assert rig.gt.live == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", [Op.READ, Op.WRITE], ids=["read", "write"])
def test_io_error_after_a_short_transfer(rig: Rig, monkeypatch: pytest.MonkeyPatch, mode: str,
                                         op: int) -> None:
    """A failing disk typically transfers the bytes before the bad sector (a short
    preadv/pwritev) and then returns EIO. That must still be an io_error Outcome with
    every mapping unmapped and the bounce buffer freed: the partial progress must not
    leave a view on a guest page alive (an unmap that cannot happen is a leaked grant,
    XSA-361 class, and the job would raise instead of answering)."""
    real = {"preadv": os.preadv, "pwritev": os.pwritev}
    calls = {"n": 0}

    def make(name: str) -> Callable[[int, List[memoryview], int], int]:
        def short_then_eio(fd: int, bufs: List[memoryview], off: int) -> int:
            calls["n"] += 1
            if calls["n"] > 1:
                raise OSError(errno.EIO, "Input/output error")
            first = memoryview(bufs[0])[:1000]
            try:
                return real[name](fd, [first], off)
            finally:
                first.release()
        return short_then_eio

    monkeypatch.setattr(rawmod.os, "preadv", make("preadv"))
    monkeypatch.setattr(rawmod.os, "pwritev", make("pwritev"))
    segs = [Segment(rig.refs[i], 0, 7) for i in range(3)]
    out = run_request(rig.ctx(mode), op, segs, 0, {}, False, False)
    monkeypatch.undo()
    assert (out.status, out.reason) == (Status.ERROR, "io_error")
    rig.finish(out)
    assert rig.gt.live == 0


def _descriptor_pages(rig: Rig, segs: List[Segment], first_frame: int,
                      readonly: bool = False) -> List[int]:
    """Write blkif_request_segment descriptors (gref u32, first u8, last u8, 2 pad)
    into consecutive guest pages; return their grefs."""
    raw = b"".join(struct.pack("<IBBxx", *s) for s in segs)
    pages: List[int] = []
    for i in range(0, len(raw), PAGE_SIZE):
        ref = rig.guest.grant(first_frame + len(pages), readonly=readonly)
        rig.guest.fill(ref, raw[i:i + PAGE_SIZE].ljust(PAGE_SIZE, b"\xff"))
        pages.append(ref)
    return pages


@pytest.mark.parametrize("mode", MODES)
def test_read_indirect_descriptors(rig: Rig, mode: str) -> None:
    """INDIRECT phase 1: the descriptor pages (512 per page, 600 segments = 2 pages) are
    read once and parsed from the copy. Map and copy modes keep nothing mapped; with
    persistent grants the pages are mapped one by one for the cache (as blkback does)."""
    segs = [Segment(rig.refs[i % 16], i % 8, 7) for i in range(600)]
    grefs = _descriptor_pages(rig, segs, 40)
    indirect_grefs = tuple(grefs) + (0,) * (8 - len(grefs))
    out = read_indirect(rig.ctx(mode), indirect_grefs, 600)
    assert out.status == Status.OKAY
    assert out.segments == tuple(segs)
    if mode == MODE_COPY:
        assert out.copies == 2
    elif mode == MODE_MAP:
        assert rig.gt.map_calls == [(tuple(grefs), False)]
        assert out.maps == out.unmaps == 2
    else:
        assert rig.gt.map_calls == [((grefs[0],), True), ((grefs[1],), True)]
        assert (out.maps, out.unmaps) == (2, 0) and sorted(out.new_grants) == sorted(grefs)
        assert rig.gt.live == 2
        rig.finish(out)
    assert rig.gt.live == 0


def test_read_indirect_persistent_uses_cached_pages(rig: Rig) -> None:
    """Persistent grants: descriptor pages the cache holds are read through its views
    (no map); a page granted read-only is mapped read-only for this request only."""
    segs = [Segment(rig.refs[i % 16], 0, 7) for i in range(600)]
    cached_ref = _descriptor_pages(rig, segs[:512], 40)[0]
    ro_ref = _descriptor_pages(rig, segs[512:], 41, readonly=True)[0]
    warm = read_indirect(rig.ctx(MODE_PERSISTENT), (cached_ref,) + (0,) * 7, 512)
    assert warm.status == Status.OKAY and list(warm.new_grants) == [cached_ref]
    cache = {cached_ref: warm.new_grants[cached_ref].pages[0]}
    rig.gt.map_calls.clear()
    out = read_indirect(rig.ctx(MODE_PERSISTENT), (cached_ref, ro_ref) + (0,) * 6, 600, cache)
    assert (out.status, out.reason) == (Status.OKAY, "")
    assert out.segments == tuple(segs)
    assert rig.gt.map_calls == [((ro_ref,), True), ((ro_ref,), False)]
    assert (out.maps, out.unmaps, out.new_grants) == (1, 1, {})
    assert rig.gt.live == 1  # the cached page only
    rig.finish(warm)
    assert rig.gt.live == 0


@pytest.mark.parametrize("mode", MODES)
def test_read_indirect_bad_page(rig: Rig, mode: str) -> None:
    """XSA-361 class: a bad gref among the indirect pages fails the request cleanly."""
    segs = [Segment(rig.refs[0], 0, 7)] * 600
    grefs = _descriptor_pages(rig, segs, 40)
    out = read_indirect(rig.ctx(mode), (grefs[0], 99999) + (0,) * 6, 600)
    assert out.status == Status.ERROR
    assert out.reason in ("grant_map", "grant_copy")
    assert rig.gt.live == 0 and out.segments == ()


def test_read_indirect_uses_only_the_pages_needed(rig: Rig) -> None:
    """Only ceil(nr_segments / 512) indirect grefs are used; the unused slots may hold
    anything (here: bad grefs)."""
    segs = [Segment(rig.refs[1], 0, 7)] * 10
    grefs = _descriptor_pages(rig, segs, 40)
    out = read_indirect(rig.ctx(MODE_MAP), (grefs[0],) + (99999,) * 7, 10)
    assert out.status == Status.OKAY and out.segments == tuple(segs)


def test_discard_job(rig: Rig) -> None:
    """DISCARD: nr_sectors from sector_number punched out of the image (reads zeros)."""
    out = run_discard(rig.ctx(MODE_MAP), 16, 16, False)
    assert out.status == Status.OKAY
    disk = rig.disk()
    assert disk[16 * 512:32 * 512] == bytes(16 * 512)
    assert disk[:16 * 512] == pattern(DISK_BYTES)[:16 * 512]
    assert disk[32 * 512:] == pattern(DISK_BYTES)[32 * 512:]


def test_discard_job_error_is_an_outcome(rig: Rig) -> None:
    """A discard the store refuses (read-only fd) is an io_error Outcome, not an
    exception."""
    ro = open_store("raw", rig.path, readonly=True)
    try:
        out = run_discard(rig.ctx(MODE_MAP, ro), 0, 8, False)
    finally:
        ro.close()
    assert (out.status, out.reason) == (Status.ERROR, "io_error")


def test_helpers(rig: Rig) -> None:
    """unmap_all unmaps and counts; flush_only turns an OSError into its message;
    apply runs a call in the threadpool and raises its GblkError/OSError on the hub
    (a job that raised would have gevent print a traceback)."""
    import gevent.threadpool

    m = rig.gt.map_grant_refs(DOMID, rig.refs[:2], True)
    assert jobs.unmap_all([m]) == 1 and rig.gt.live == 0
    assert jobs.flush_only(rig.store) is None
    assert jobs.flush_only(RecordingStore(fail="flush")) == "flush failed"
    pool = gevent.threadpool.ThreadPool(1)
    try:
        assert jobs.apply(pool, rig.store.size) == DISK_BYTES
        with pytest.raises(OSError, match="flush failed"):
            jobs.apply(pool, RecordingStore(fail="flush").flush)
    finally:
        pool.kill()
