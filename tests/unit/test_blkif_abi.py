"""Wire layouts of blkif requests and responses (gblk.blkif.abi), both ABIs.

The expected bytes are written out by hand from the table of docs/protocol.md §3 (never
produced by the code under test): a field at the wrong offset in either ABI shows up
here as a byte diff.
"""

from __future__ import annotations

import struct
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gblk.blkif.abi import (
    X86_32,
    X86_64,
    Abi,
    Request,
    Segment,
    abi_for_protocol,
    pack_indirect_segments,
    parse_indirect_segments,
)
from gblk.blkif.const import Op, Status
from gblk.errors import NegotiationError


def h(*parts: str) -> bytes:
    """Hex pieces (spaces allowed) to bytes."""
    return bytes.fromhex("".join(parts).replace(" ", ""))


ID = 0x1122334455667788
ID_LE = "88 77 66 55 44 33 22 11"
SECTOR = 0x12345678
SECTOR_LE = "78 56 34 12 00 00 00 00"

# struct blkif_request_segment x3: gref u32, first_sect u8, last_sect u8, 2 pad bytes
SEGS = (Segment(0xDEADBEEF, 1, 6), Segment(7, 0, 7), Segment(0x01020304, 3, 3))
SEGS_LE = (
    "ef be ad de 01 06 00 00"
    "07 00 00 00 00 07 00 00"
    "04 03 02 01 03 03 00 00"
)
UNUSED_SEGS = "00" * 8 * 8  # seg[3..10]

RW_READ_64 = h(
    "00",  # operation = READ @0
    "03",  # nr_segments @1
    "51 ca",  # handle 0xca51 @2
    "00 00 00 00",  # padding @4 (x86_64 only)
    ID_LE,  # id @8
    SECTOR_LE,  # sector_number @16
    SEGS_LE, UNUSED_SEGS,  # seg[11] @24
)
RW_READ_32 = h(
    "00", "03", "51 ca",
    ID_LE,  # id @4
    SECTOR_LE,  # sector_number @12
    SEGS_LE, UNUSED_SEGS,  # seg[11] @20
)
RW_READ_REQ = Request(Op.READ, ID, 3, 0xCA51, SECTOR, SEGS)

DISCARD_ID = 0x8000000000000001
DISCARD_64 = h(
    "05",  # operation = DISCARD
    "01",  # flag = BLKIF_DISCARD_SECURE
    "00 03",  # handle 0x0300
    "00 00 00 00",  # padding
    "01 00 00 00 00 00 00 80",  # id @8
    "10 00 00 00 00 00 00 00",  # sector_number @16
    "00 08 00 00 00 00 00 00",  # nr_sectors @24
) + bytes(112 - 32)
DISCARD_32 = h(
    "05", "01", "00 03",
    "01 00 00 00 00 00 00 80",  # id @4
    "10 00 00 00 00 00 00 00",  # sector_number @12
    "00 08 00 00 00 00 00 00",  # nr_sectors @20
) + bytes(108 - 28)
DISCARD_REQ = Request(Op.DISCARD, DISCARD_ID, 0, 0x0300, 0x10, nr_sectors=0x800, flag=1)

GREFS = tuple(range(0x100, 0x108))
GREFS_LE = "00 01 00 00 01 01 00 00 02 01 00 00 03 01 00 00 04 01 00 00 05 01 00 00 06 01 00 00 07 01 00 00"
INDIRECT_64 = h(
    "06",  # operation = INDIRECT
    "01",  # indirect_op = WRITE
    "00 01",  # nr_segments u16 = 256
    "00 00 00 00",  # padding
    "42 00 00 00 00 00 00 00",  # id @8
    "00 10 00 00 00 00 00 00",  # sector_number @16
    "51 ca",  # handle @24
    "00 00",  # padding (alignment of the grefs)
    GREFS_LE,  # indirect_grefs[8] @28
) + bytes(112 - 60)
INDIRECT_32 = h(
    "06", "01", "00 01",
    "42 00 00 00 00 00 00 00",  # id @4
    "00 10 00 00 00 00 00 00",  # sector_number @12
    "51 ca",  # handle @20
    "00 00",  # padding
    GREFS_LE,  # indirect_grefs[8] @24
) + bytes(108 - 56)
INDIRECT_REQ = Request(Op.INDIRECT, 0x42, 256, 0xCA51, 0x1000, indirect_op=Op.WRITE,
                       indirect_grefs=GREFS)

RSP_ERROR_64 = h(ID_LE, "01", "00", "ff ff", "00 00 00 00")  # id, op, pad, status, pad
RSP_ERROR_32 = h(ID_LE, "01", "00", "ff ff")

ABIS = [pytest.param(X86_64, id="x86_64-abi"), pytest.param(X86_32, id="x86_32-abi")]
# (abi, offset of id, offset of sector_number, offset of seg[0])
OFFSETS = {X86_64.name: (8, 16, 24), X86_32.name: (4, 12, 20)}


def test_sizes_match_the_header() -> None:
    """Request and response sizes are 112/16 (x86_64-abi) and 108/12 (x86_32-abi): the
    ring slot count and every slot offset derive from them."""
    assert (X86_64.req_size, X86_64.rsp_size) == (112, 16)
    assert (X86_32.req_size, X86_32.rsp_size) == (108, 12)


@pytest.mark.parametrize(
    "abi, raw, req",
    [
        pytest.param(X86_64, RW_READ_64, RW_READ_REQ, id="rw-x86_64"),
        pytest.param(X86_32, RW_READ_32, RW_READ_REQ, id="rw-x86_32"),
        pytest.param(X86_64, DISCARD_64, DISCARD_REQ, id="discard-x86_64"),
        pytest.param(X86_32, DISCARD_32, DISCARD_REQ, id="discard-x86_32"),
        pytest.param(X86_64, INDIRECT_64, INDIRECT_REQ, id="indirect-x86_64"),
        pytest.param(X86_32, INDIRECT_32, INDIRECT_REQ, id="indirect-x86_32"),
    ],
)
def test_request_golden_bytes(abi: Abi, raw: bytes, req: Request) -> None:
    """Golden bytes of every request layout, both ways: the frontend's packing (used by
    the simulated guest) produces exactly the hand-written bytes, and parsing them gives
    back every field."""
    assert len(raw) == abi.req_size
    assert abi.pack_request(req) == raw
    assert abi.parse_request(raw) == req


def _pairs(first: int, count: int) -> list:
    """Both pad bytes of ``count`` segment descriptors starting at ``first``."""
    return [first + 8 * i + k for i in range(count) for k in (6, 7)]


@pytest.mark.parametrize(
    "abi, raw, pad_offsets, unused_from",
    [
        pytest.param(X86_64, RW_READ_64, [4, 5, 6, 7] + _pairs(24, 3), 24 + 3 * 8, id="rw-x86_64"),
        pytest.param(X86_32, RW_READ_32, _pairs(20, 3), 20 + 3 * 8, id="rw-x86_32"),
        pytest.param(X86_64, INDIRECT_64, [4, 5, 6, 7, 26, 27], 60, id="indirect-x86_64"),
        pytest.param(X86_32, INDIRECT_32, [22, 23], 56, id="indirect-x86_32"),
        pytest.param(X86_64, DISCARD_64, [4, 5, 6, 7], 32, id="discard-x86_64"),
        pytest.param(X86_32, DISCARD_32, [], 28, id="discard-x86_32"),
    ],
)
def test_parse_ignores_padding_and_unused_space(
    abi: Abi, raw: bytes, pad_offsets: list, unused_from: int
) -> None:
    """Padding bytes, unused segment slots and the rest of the slot carry whatever the
    frontend left there; parsing must not take any of them for a field."""
    dirty = bytearray(raw)
    for off in pad_offsets:
        dirty[off] = 0xFF
    dirty[unused_from:] = b"\xee" * (len(dirty) - unused_from)
    assert abi.parse_request(bytes(dirty)) == abi.parse_request(raw)


def test_indirect_nr_segments_is_u16() -> None:
    """INDIRECT carries nr_segments as a u16 at offset 2 (up to 4096 segments); reading
    only one byte would turn 4096 into 0."""
    raw = bytearray(INDIRECT_64)
    raw[2:4] = h("00 10")  # 4096
    assert X86_64.parse_request(bytes(raw)).nr_segments == 4096
    raw32 = bytearray(INDIRECT_32)
    raw32[2:4] = h("ff ff")
    assert X86_32.parse_request(bytes(raw32)).nr_segments == 0xFFFF


@pytest.mark.parametrize("abi, raw", [(X86_64, RSP_ERROR_64), (X86_32, RSP_ERROR_32)],
                         ids=["x86_64-abi", "x86_32-abi"])
def test_response_golden_bytes(abi: Abi, raw: bytes) -> None:
    """Response layout: id u64 @0, operation u8 @8, pad @9, status s16 @10, and on
    x86_64 four more bytes of tail padding (16 vs 12 bytes)."""
    assert abi.pack_response(ID, Op.WRITE, Status.ERROR) == raw
    assert abi.parse_response(raw) == (ID, Op.WRITE, Status.ERROR)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("status, le", [(Status.OKAY, "00 00"), (Status.ERROR, "ff ff"),
                                        (Status.EOPNOTSUPP, "fe ff")])
def test_response_status_is_signed_16(abi: Abi, status: int, le: str) -> None:
    """Statuses are s16 little-endian: OKAY 0, ERROR -1 (ffff), EOPNOTSUPP -2 (feff)."""
    raw = abi.pack_response(5, Op.READ, status)
    assert raw[10:12] == h(le)
    assert raw[:8] == h("05 00 00 00 00 00 00 00")


@pytest.mark.parametrize("abi", ABIS)
@given(rid=st.integers(0, 2**64 - 1), op=st.integers(0, 255),
       status=st.sampled_from([0, -1, -2]))
@settings(max_examples=200, deadline=None)
def test_response_padding_is_zero(abi: Abi, rid: int, op: int, status: int) -> None:
    """XSA-216: every padding byte of a response is zero (byte 9, and 12..15 on
    x86_64-abi), whatever the id, operation and status."""
    raw = abi.pack_response(rid, op, status)
    assert len(raw) == abi.rsp_size
    assert raw[9] == 0
    assert raw[12:] == bytes(abi.rsp_size - 12)
    assert raw[:8] == rid.to_bytes(8, "little") and raw[8] == op


@pytest.mark.parametrize("abi", ABIS)
@given(data=st.data())
@settings(max_examples=300, deadline=None)
def test_parse_never_raises_and_reads_the_documented_offsets(abi: Abi, data: st.DataObject) -> None:
    """Any req_size bytes a frontend writes into a slot parse without an exception
    (mirage review: a bad slot must not kill the service), and operation/id come from
    the documented offsets for every op code."""
    op = data.draw(st.one_of(st.integers(0, 7), st.integers(0, 255)), label="op")
    body = data.draw(st.binary(min_size=abi.req_size - 1, max_size=abi.req_size - 1), label="body")
    raw = bytes([op]) + body
    req = abi.parse_request(raw)
    id_off, sec_off, seg_off = OFFSETS[abi.name]
    assert req.operation == op
    assert req.id == struct.unpack_from("<Q", raw, id_off)[0]
    if op in (Op.READ, Op.WRITE, Op.WRITE_BARRIER, Op.FLUSH_DISKCACHE):
        n = raw[1]
        assert req.nr_segments == n
        assert req.sector_number == struct.unpack_from("<Q", raw, sec_off)[0]
        assert len(req.segments) == min(n, 11)
        for i, s in enumerate(req.segments):
            gref, first, last = struct.unpack_from("<IBB", raw, seg_off + 8 * i)
            assert s == Segment(gref, first, last)
    elif op == Op.INDIRECT:
        assert req.nr_segments == struct.unpack_from("<H", raw, 2)[0]
        assert req.indirect_op == raw[1]
        assert len(req.indirect_grefs) == 8


@pytest.mark.parametrize("abi", ABIS)
@given(
    op=st.sampled_from([Op.READ, Op.WRITE, Op.WRITE_BARRIER, Op.FLUSH_DISKCACHE]),
    rid=st.integers(0, 2**64 - 1),
    handle=st.integers(0, 0xFFFF),
    sector=st.integers(0, 2**64 - 1),
    segs=st.lists(st.builds(Segment, st.integers(0, 2**32 - 1), st.integers(0, 255),
                            st.integers(0, 255)), max_size=11),
)
@settings(max_examples=200, deadline=None)
def test_rw_round_trip(abi: Abi, op: int, rid: int, handle: int, sector: int, segs: list) -> None:
    """What the simulated frontend packs, the backend parses back field for field."""
    req = Request(op, rid, len(segs), handle, sector, tuple(segs))
    raw = abi.pack_request(req)
    assert len(raw) == abi.req_size
    assert abi.parse_request(raw) == req


def test_indirect_segment_pages_round_trip() -> None:
    """Indirect descriptor pages hold 8-byte blkif_request_segment entries back to back."""
    segs = tuple(Segment(1000 + i, i % 8, 7) for i in range(600))
    raw = pack_indirect_segments(segs)
    assert len(raw) == 600 * 8
    assert raw[:8] == h("e8 03 00 00 00 07 00 00")
    assert parse_indirect_segments(raw, 600) == segs
    assert parse_indirect_segments(raw, 3) == segs[:3]


@pytest.mark.parametrize(
    "protocol, expected",
    [
        pytest.param(None, X86_32, id="absent-means-x86_32"),
        pytest.param("x86_32-abi", X86_32, id="x86_32-abi"),
        pytest.param("x86_64-abi", X86_64, id="x86_64-abi"),
        pytest.param("arm-abi", X86_64, id="arm-abi-is-the-x86_64-layout"),
    ],
)
def test_abi_for_protocol(protocol: Optional[str], expected: Abi) -> None:
    """The frontend's ``protocol`` node picks the layout; absent means x86_32 (Linux
    blkback and current QEMU; the 2017 QEMU assumed native and was wrong); arm-abi is
    the natural 64-bit layout."""
    abi = abi_for_protocol(protocol)
    assert abi is expected
    assert (abi.req_size, abi.rsp_size) == ((112, 16) if expected is X86_64 else (108, 12))


@pytest.mark.parametrize("protocol", ["ppc-abi", "x86_64", "X86_64-ABI", "native", "x86_64-abi\0"])
def test_unknown_protocol_is_a_negotiation_error(protocol: str) -> None:
    """An unknown protocol fails the negotiation (that device only) with a clear error,
    never a guess at the layout."""
    with pytest.raises(NegotiationError, match="protocol"):
        abi_for_protocol(protocol)
