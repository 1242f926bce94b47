"""Which requests a disk serves (gblk.blkif.validate).

The expected outcomes are written from docs/protocol.md §2 and §7 as an independent model:
for each request the set of rules it breaks. No broken rule: it must be served; some
broken: it must be refused with one of those reasons, and ``status_for`` turns
``unsupported_op`` into EOPNOTSUPP and everything else into ERROR.
"""

from __future__ import annotations

from typing import Optional, Set

import pytest

from gblk.blkif.abi import X86_32, X86_64, Abi, Request, Segment
from gblk.blkif.const import Op, Status
from gblk.blkif.validate import (
    UNSUPPORTED,
    DiskLimits,
    check_header,
    check_range,
    check_segments,
    effective_op,
    indirect_pages,
    status_for,
)
from gblk.engine.stats import REASONS
from gblk.errors import InvalidRequest

SECTORS = 1 << 20

LIMITS = {
    "rw": DiskLimits(sectors=SECTORS, max_indirect_segments=256, discard_secure=True),
    "ro": DiskLimits(sectors=SECTORS, readonly=True, max_indirect_segments=256),
    "bare": DiskLimits(sectors=SECTORS, barrier=False, flush=False, discard=False),
    "ro-bare": DiskLimits(sectors=SECTORS, readonly=True, barrier=False, flush=False,
                          discard=False),
}


def broken_rules(req: Request, lim: DiskLimits) -> Set[str]:
    """The model: every rule of docs/protocol.md §2 the header of ``req`` breaks."""
    op, n = req.operation, req.nr_segments
    out: Set[str] = set()
    if op in (Op.READ, Op.WRITE):
        if not 1 <= n <= 11:
            out.add("invalid_segment_count")
        if op == Op.WRITE and lim.readonly:
            out.add("read_only")  # XSA-142
    elif op in (Op.WRITE_BARRIER, Op.FLUSH_DISKCACHE):
        if not (lim.barrier if op == Op.WRITE_BARRIER else lim.flush):
            out.add(UNSUPPORTED)
        if n > 11:  # 0 is legal: a flush without data
            out.add("invalid_segment_count")
        if n and lim.readonly:
            out.add("read_only")  # flush with data is a write
    elif op == Op.DISCARD:
        if not lim.discard or (req.flag & 1 and not lim.discard_secure):
            out.add(UNSUPPORTED)
        if lim.readonly:
            out.add("read_only")
        end = req.sector_number + req.nr_sectors
        if end > lim.sectors:
            out.add("invalid_range")
    elif op == Op.INDIRECT:
        if not lim.max_indirect_segments:
            out.add(UNSUPPORTED)
        if req.indirect_op not in (Op.READ, Op.WRITE):
            out.add("invalid_indirect")
        if not 1 <= n <= lim.max_indirect_segments:
            out.add("invalid_segment_count")
        if req.indirect_op == Op.WRITE and lim.readonly:
            out.add("read_only")
    else:  # RESERVED_1 and every unknown code
        out.add(UNSUPPORTED)
    return out


def outcome(req: Request, lim: DiskLimits) -> Optional[str]:
    try:
        check_header(req, lim)
    except InvalidRequest as e:
        return e.reason
    return None


def assert_right_outcome(req: Request, lim: DiskLimits) -> None:
    broken = broken_rules(req, lim)
    got = outcome(req, lim)
    if not broken:
        assert got is None, f"{req!r} refused ({got}) but breaks no rule"
        return
    assert got in broken, f"{req!r}: got {got}, expected one of {broken}"
    if broken == {UNSUPPORTED}:
        assert status_for(got) == Status.EOPNOTSUPP
    elif UNSUPPORTED not in broken:
        assert status_for(got) == Status.ERROR


@pytest.mark.parametrize("lim_name", list(LIMITS))
def test_every_op_code_times_every_segment_count(lim_name: str) -> None:
    """Mirage review: every op code 0..255 with every nr_segments 0..255 gets exactly the
    right answer (served, ERROR with the right reason, or EOPNOTSUPP), and nothing but
    InvalidRequest ever comes out of the check."""
    lim = LIMITS[lim_name]
    seg = (Segment(1, 0, 7),)
    for op in range(256):
        for n in range(256):
            req = Request(op, 7, n, 0, 0, seg * min(n, 11), indirect_op=Op.READ)
            assert_right_outcome(req, lim)


@pytest.mark.parametrize("lim_name", list(LIMITS))
def test_indirect_op_times_segment_count(lim_name: str) -> None:
    """INDIRECT: indirect_op must be READ or WRITE (any other byte is ERROR), nr_segments
    1..feature-max-indirect-segments (u16 on the wire), indirect WRITE refused read-only."""
    lim = LIMITS[lim_name]
    for iop in range(256):
        for n in (0, 1, 2, 255, 256, 257, 4096, 0xFFFF):
            req = Request(Op.INDIRECT, 1, n, indirect_op=iop, indirect_grefs=(5,) * 8)
            assert_right_outcome(req, lim)


@pytest.mark.parametrize("abi", [X86_64, X86_32], ids=["x86_64-abi", "x86_32-abi"])
def test_every_slot_header_through_the_parser(abi: Abi) -> None:
    """The same grid from raw slot bytes (operation byte x byte 1) through
    parse_request: what the ring loop really does."""
    base = bytearray(abi.req_size)
    lim = LIMITS["rw"]
    for op in range(256):
        for b1 in range(0, 256, 3):
            base[0], base[1] = op, b1
            req = abi.parse_request(bytes(base))
            assert_right_outcome(req, lim)


@pytest.mark.parametrize(
    "lim_name, op, n, expected",
    [
        pytest.param("ro", Op.WRITE, 1, "read_only", id="write"),
        pytest.param("ro", Op.FLUSH_DISKCACHE, 1, "read_only", id="flush-with-data"),
        pytest.param("ro", Op.WRITE_BARRIER, 3, "read_only", id="barrier-with-data"),
        pytest.param("ro", Op.FLUSH_DISKCACHE, 0, None, id="flush-without-data-allowed"),
        pytest.param("ro", Op.READ, 11, None, id="read-allowed"),
    ],
)
def test_read_only_refusals(lim_name: str, op: int, n: int, expected: Optional[str]) -> None:
    """XSA-142: a mode=r disk refuses writes and flushes carrying data with ERROR; a
    flush without data and reads are served."""
    req = Request(op, 1, n, 0, 0, (Segment(1, 0, 7),) * n)
    assert outcome(req, LIMITS[lim_name]) == expected
    if expected:
        assert status_for(expected) == Status.ERROR


def test_read_only_refuses_discard_and_indirect_write() -> None:
    """XSA-142: discard and indirect WRITE on a read-only disk are ERROR; indirect READ
    is served."""
    ro = DiskLimits(sectors=SECTORS, readonly=True, discard=True, max_indirect_segments=256)
    assert outcome(Request(Op.DISCARD, 1, nr_sectors=8), ro) == "read_only"
    assert outcome(Request(Op.INDIRECT, 1, 20, indirect_op=Op.WRITE), ro) == "read_only"
    assert outcome(Request(Op.INDIRECT, 1, 20, indirect_op=Op.READ), ro) is None


@pytest.mark.parametrize(
    "sector, nr, expected",
    [
        pytest.param(0, 0, None, id="empty"),
        pytest.param(0, SECTORS, None, id="whole-disk"),
        pytest.param(SECTORS - 8, 8, None, id="ends-at-the-end"),
        pytest.param(SECTORS - 8, 9, "invalid_range", id="one-past-the-end"),
        pytest.param(SECTORS, 1, "invalid_range", id="starts-at-the-end"),
        pytest.param(2**64 - 1, 2, "invalid_range", id="wraps-u64"),
        pytest.param(8, 2**64 - 4, "invalid_range", id="huge-count-wraps"),
    ],
)
def test_discard_range(sector: int, nr: int, expected: Optional[str]) -> None:
    """DISCARD: nr_sectors from sector_number, checked for wrap-around and the end of
    the disk (docs/protocol.md §2)."""
    req = Request(Op.DISCARD, 1, 0, 0, sector, nr_sectors=nr)
    assert outcome(req, LIMITS["rw"]) == expected


def test_secure_discard_only_when_offered() -> None:
    """Flag bit 0 asks for a secure discard: EOPNOTSUPP unless discard-secure was
    offered; the other flag bits are ignored."""
    plain = DiskLimits(sectors=SECTORS, discard_secure=False)
    secure = DiskLimits(sectors=SECTORS, discard_secure=True)
    assert outcome(Request(Op.DISCARD, 1, nr_sectors=8, flag=1), plain) == UNSUPPORTED
    assert outcome(Request(Op.DISCARD, 1, nr_sectors=8, flag=1), secure) is None
    assert outcome(Request(Op.DISCARD, 1, nr_sectors=8, flag=0xFE), plain) is None


def test_segment_rules_exhaustive() -> None:
    """Every (first_sect, last_sect) byte pair: valid exactly when first <= last <= 7
    (eight 512-byte sectors per page); the length is last - first + 1."""
    lim = LIMITS["rw"]
    for first in range(256):
        for last in range(256):
            seg = Segment(3, first, last)
            if first <= last <= 7:
                assert check_segments(0, [seg], lim) == last - first + 1
            else:
                with pytest.raises(InvalidRequest) as ei:
                    check_segments(0, [seg], lim)
                assert ei.value.reason == "invalid_segment"


def test_segments_total_and_range() -> None:
    """The request covers sum(last-first+1) sectors from sector_number; a request
    ending at the last sector is served, one sector further is refused, and a sector
    number near 2**64 does not wrap into range."""
    lim = DiskLimits(sectors=100)
    segs = [Segment(1, 0, 7), Segment(2, 2, 3), Segment(3, 7, 7)]  # 8 + 2 + 1 = 11
    assert check_segments(0, segs, lim) == 11
    assert check_segments(89, segs, lim) == 11
    for sector in (90, 100, 2**64 - 5, 2**64 - 1):
        with pytest.raises(InvalidRequest) as ei:
            check_segments(sector, segs, lim)
        assert ei.value.reason == "invalid_range"


def test_bad_segment_anywhere_in_the_list() -> None:
    """One bad descriptor among many (an indirect request) refuses the whole request."""
    lim = LIMITS["rw"]
    good = [Segment(i, 0, 7) for i in range(300)]
    for k in (0, 150, 299):
        segs = list(good)
        segs[k] = Segment(k, 5, 4)
        with pytest.raises(InvalidRequest, match="sectors 5..4"):
            check_segments(0, segs, lim)


@pytest.mark.parametrize(
    "sector_size, sector, segs, ok",
    [
        pytest.param(4096, 0, [(0, 7)], True, id="4k-full-page"),
        pytest.param(4096, 8, [(0, 7), (0, 7)], True, id="4k-two-pages"),
        pytest.param(4096, 0, [(0, 3)], False, id="4k-half-page"),
        pytest.param(4096, 0, [(4, 7)], False, id="4k-second-half"),
        pytest.param(4096, 4, [(0, 7)], False, id="4k-misaligned-sector"),
        pytest.param(1024, 2, [(2, 5)], True, id="1k-aligned"),
        pytest.param(1024, 2, [(1, 4)], False, id="1k-odd-first"),
        pytest.param(1024, 2, [(2, 4)], False, id="1k-odd-length"),
        pytest.param(1024, 1, [(0, 1)], False, id="1k-odd-sector"),
        pytest.param(512, 1, [(3, 3)], True, id="512-anything"),
    ],
)
def test_sector_size_alignment(sector_size: int, sector: int, segs: list, ok: bool) -> None:
    """sector-size above 512 constrains alignment only: every segment and the request's
    start and length must be multiples of it (counts stay in 512-byte units)."""
    lim = DiskLimits(sectors=SECTORS, sector_size=sector_size)
    segments = [Segment(9, f, la) for f, la in segs]
    if ok:
        assert check_segments(sector, segments, lim) == sum(la - f + 1 for f, la in segs)
    else:
        with pytest.raises(InvalidRequest) as ei:
            check_segments(sector, segments, lim)
        assert ei.value.reason in ("invalid_segment", "invalid_range")


def test_discard_alignment_on_4k_disk() -> None:
    """A discard on a 4096-byte-sector disk must start and end on 8-sector boundaries."""
    lim = DiskLimits(sectors=SECTORS, sector_size=4096)
    check_range(8, 16, lim)
    for sector, count in ((4, 8), (8, 4), (1, 7)):
        with pytest.raises(InvalidRequest) as ei:
            check_range(sector, count, lim)
        assert ei.value.reason == "invalid_range"


def test_reasons_are_the_metric_labels() -> None:
    """Every reason the checks produce is one of the low-cardinality labels metrics
    export (gblk.engine.stats.REASONS)."""
    seen = set()
    for lim in LIMITS.values():
        for op in range(8):
            for n in (0, 1, 12, 300):
                for iop in (0, 1, 2):
                    for flag in (0, 1):
                        req = Request(op, 1, n, 0, SECTORS * 2, nr_sectors=8, flag=flag,
                                      indirect_op=iop)
                        r = outcome(req, lim)
                        if r:
                            seen.add(r)
    seen.add("invalid_segment")
    assert seen <= set(REASONS)
    assert {"invalid_segment_count", "read_only", UNSUPPORTED, "invalid_range",
            "invalid_indirect"} <= seen


@pytest.mark.parametrize(
    "n, pages",
    [(1, 1), (512, 1), (513, 2), (1024, 2), (4095, 8), (4096, 8), (9000, 8)],
)
def test_indirect_pages(n: int, pages: int) -> None:
    """512 descriptors per indirect page, at most 8 pages."""
    assert indirect_pages(n) == pages


def test_effective_op() -> None:
    """An INDIRECT request moves data in the direction of its indirect_op."""
    assert effective_op(Request(Op.INDIRECT, 1, 5, indirect_op=Op.WRITE)) == Op.WRITE
    assert effective_op(Request(Op.FLUSH_DISKCACHE, 1)) == Op.FLUSH_DISKCACHE
