"""Wire layouts of blkif requests and responses, one struct table per ABI.

``X86_64`` (also the native layout of x86_64 and ARM, hence ``arm-abi``) and
``X86_32`` (64-bit fields at 4-byte alignment). The engine receives an ``Abi`` and
never branches on the protocol name. Parsing works on a private copy of a ring slot
(bytes); nothing here reads shared memory.
"""

from __future__ import annotations

import struct
from typing import List, NamedTuple, Optional, Tuple, Union

from ..errors import NegotiationError
from . import ops
from .const import (
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    SEGMENT_SIZE,
)

# struct blkif_request_segment: gref u32, first_sect u8, last_sect u8, 2 bytes of pad
_SEG_FMT = "IBBxx"
SEGMENT = struct.Struct("<" + _SEG_FMT)


class Segment(NamedTuple):
    gref: int
    first_sect: int
    last_sect: int


class Request:
    """A parsed request, one shape for every operation.

    ``segments`` holds what the slot carries (for INDIRECT: nothing until the engine
    has read the indirect pages). ``nr_segments`` is as the guest wrote it, unchecked.
    """

    __slots__ = (
        "operation", "id", "nr_segments", "handle", "sector_number", "segments",
        "nr_sectors", "flag", "indirect_op", "indirect_grefs",
    )

    def __init__(
        self,
        operation: int,
        id: int,
        nr_segments: int = 0,
        handle: int = 0,
        sector_number: int = 0,
        segments: Tuple[Segment, ...] = (),
        nr_sectors: int = 0,
        flag: int = 0,
        indirect_op: int = 0,
        indirect_grefs: Tuple[int, ...] = (),
    ) -> None:
        self.operation = operation
        self.id = id
        self.nr_segments = nr_segments
        self.handle = handle
        self.sector_number = sector_number
        self.segments = segments
        self.nr_sectors = nr_sectors
        self.flag = flag
        self.indirect_op = indirect_op
        self.indirect_grefs = indirect_grefs

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"Request({fields})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__
        )


class Abi:
    """One ABI's struct table. Offsets are in docs/protocol.md §3."""

    def __init__(self, name: str, id_pad: str, rsp_pad: str) -> None:
        self.name = name
        # blkif_request: operation u8, nr_segments u8, handle u16, [pad u32 on x86_64],
        # id u64, sector_number u64, seg[11]
        self.rw = struct.Struct("<BBH" + id_pad + "QQ" + _SEG_FMT * BLKIF_MAX_SEGMENTS_PER_REQUEST)
        self.req_size = self.rw.size
        # blkif_request_discard: operation u8, flag u8, handle u16, [pad], id u64,
        # sector_number u64, nr_sectors u64
        self.discard = struct.Struct("<BBH" + id_pad + "QQQ")
        # blkif_request_indirect: operation u8, indirect_op u8, nr_segments u16, [pad],
        # id u64, sector_number u64, handle u16, pad u16 (alignment of the grefs),
        # indirect_grefs[8] u32
        self.indirect = struct.Struct(
            "<BBH" + id_pad + "QQHxx" + "I" * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
        )
        # header shared by every layout: operation u8, u8, u16, [pad], id u64
        self.head = struct.Struct("<BBH" + id_pad + "Q")
        # blkif_response: id u64, operation u8, pad u8, status s16, [pad u32 on x86_64]
        self.rsp = struct.Struct("<QBxh" + rsp_pad)
        self.rsp_size = self.rsp.size
        # every other layout lives inside a slot of the rw request's size
        assert self.indirect.size <= self.req_size and self.discard.size <= self.req_size

    def __repr__(self) -> str:
        return f"<Abi {self.name}>"

    # -- backend side -------------------------------------------------------------
    def parse_request(self, raw: bytes) -> Request:
        """Parse one private copy of a slot. Never raises on any 'raw' of req_size."""
        op = raw[0]
        spec = ops.BY_CODE.get(op)
        layout = spec.layout if spec is not None else None
        if layout is ops.Layout.SEGMENTS:
            f = self.rw.unpack_from(raw)
            n = f[1]
            segs = tuple(
                Segment(f[5 + 3 * i], f[6 + 3 * i], f[7 + 3 * i])
                for i in range(min(n, BLKIF_MAX_SEGMENTS_PER_REQUEST))
            )
            return Request(op, f[3], n, f[2], f[4], segs)
        if layout is ops.Layout.DISCARD:
            _, flag, handle, rid, sector, nsec = self.discard.unpack_from(raw)
            return Request(op, rid, 0, handle, sector, nr_sectors=nsec, flag=flag)
        if layout is ops.Layout.INDIRECT:
            f = self.indirect.unpack_from(raw)
            return Request(
                op, f[3], f[2], f[5], f[4], indirect_op=f[1],
                indirect_grefs=tuple(f[6:6 + BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST]),
            )
        _, _, handle, rid = self.head.unpack_from(raw)
        return Request(op, rid, raw[1], handle)

    def pack_response(self, id: int, operation: int, status: int) -> bytes:
        """A response with every padding byte zero (XSA-216)."""
        return self.rsp.pack(id, operation & 0xFF, status)

    # -- frontend side (the simulated guest) ---------------------------------------
    def pack_request(self, req: Request) -> bytes:
        op = req.operation
        spec = ops.BY_CODE.get(op)
        layout = spec.layout if spec is not None else ops.Layout.SEGMENTS
        if layout is ops.Layout.DISCARD:
            raw = self.discard.pack(op, req.flag, req.handle, req.id, req.sector_number,
                                    req.nr_sectors)
        elif layout is ops.Layout.INDIRECT:
            grefs = list(req.indirect_grefs)[:BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST]
            grefs += [0] * (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(grefs))
            raw = self.indirect.pack(op, req.indirect_op, req.nr_segments, req.id,
                                     req.sector_number, req.handle, *grefs)
        else:
            flat: List[int] = []
            for i in range(BLKIF_MAX_SEGMENTS_PER_REQUEST):
                s = req.segments[i] if i < len(req.segments) else Segment(0, 0, 0)
                flat.extend(s)
            raw = self.rw.pack(op, req.nr_segments & 0xFF, req.handle, req.id,
                               req.sector_number, *flat)
        return raw.ljust(self.req_size, b"\0")

    def parse_response(self, raw: bytes) -> Tuple[int, int, int]:
        """(id, operation, status) of a response slot copy."""
        rid, op, status = self.rsp.unpack_from(raw)
        return rid, op, status


def parse_indirect_segments(pages: Union[bytes, bytearray], count: int) -> Tuple[Segment, ...]:
    """The first ``count`` segment descriptors of a private copy of the indirect pages."""
    return tuple(map(Segment._make, SEGMENT.iter_unpack(memoryview(pages)[:count * SEGMENT_SIZE])))


def indirect_segment_tuples(pages: Union[bytes, bytearray], count: int) -> List[Tuple[int, int, int]]:
    """The same as plain ``(gref, first_sect, last_sect)`` tuples: the hub's form for a
    request of up to 4096 segments, with no Python object built per segment."""
    return list(SEGMENT.iter_unpack(memoryview(pages)[:count * SEGMENT_SIZE]))


def pack_indirect_segments(segments: Tuple[Segment, ...]) -> bytes:
    return b"".join(SEGMENT.pack(*s) for s in segments)


X86_64 = Abi("x86_64-abi", id_pad="xxxx", rsp_pad="xxxx")
X86_32 = Abi("x86_32-abi", id_pad="", rsp_pad="")

ABIS = {"x86_64-abi": X86_64, "x86_32-abi": X86_32, "arm-abi": X86_64}


def abi_for_protocol(protocol: Optional[str]) -> Abi:
    """The ABI a frontend's ``protocol`` node selects. Absent means x86_32 on x86
    (what Linux blkback and current QEMU do; the 2017 QEMU assumed native and was wrong)."""
    if protocol is None or protocol == "":
        return X86_32
    try:
        return ABIS[protocol]
    except KeyError:
        raise NegotiationError(f"unknown protocol {protocol!r} (known: {', '.join(ABIS)})") from None
