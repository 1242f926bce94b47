"""Which requests a disk serves: the checks every backend must make before IO.

Raises ``InvalidRequest`` with a reason from ``gblk.blkif.reasons.REASONS``; the
reason ``unsupported_op`` is answered EOPNOTSUPP, every other one ERROR.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

from ..errors import InvalidRequest
from . import reasons as R
from .abi import Request
from .const import (
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    MAX_INDIRECT_SEGMENTS,
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    SEGS_PER_INDIRECT_FRAME,
    Op,
    Status,
)

UNSUPPORTED = R.UNSUPPORTED_OP  # answered EOPNOTSUPP, every other reason ERROR


@dataclass(frozen=True)
class DiskLimits:
    """What one connected disk offers; the frontend saw exactly this in XenStore."""

    sectors: int  # size in 512-byte sectors
    readonly: bool = False
    sector_size: int = SECTOR_SIZE  # logical block size: alignment of every request
    barrier: bool = True
    flush: bool = True
    discard: bool = True
    discard_secure: bool = False
    max_indirect_segments: int = 0  # 0: INDIRECT not offered


def status_for(reason: str) -> int:
    return Status.EOPNOTSUPP if reason == UNSUPPORTED else Status.ERROR


def effective_op(req: Request) -> int:
    """The data direction an INDIRECT request carries, else its own op."""
    return req.indirect_op if req.operation == Op.INDIRECT else req.operation


def check_header(req: Request, lim: DiskLimits) -> None:
    """Everything decidable from the slot alone. For INDIRECT the segments come later
    (``check_segments`` once the indirect pages have been copied)."""
    op = req.operation
    n = req.nr_segments
    if op == Op.READ or op == Op.WRITE:
        if not 1 <= n <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise InvalidRequest(R.INVALID_SEGMENT_COUNT, f"{n} segments")
        if op == Op.WRITE and lim.readonly:
            raise InvalidRequest(R.READ_ONLY, "write to a read-only disk")
    elif op == Op.WRITE_BARRIER or op == Op.FLUSH_DISKCACHE:
        if (op == Op.WRITE_BARRIER and not lim.barrier) or (
            op == Op.FLUSH_DISKCACHE and not lim.flush
        ):
            raise InvalidRequest(UNSUPPORTED, f"op {op} not offered")
        if n > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise InvalidRequest(R.INVALID_SEGMENT_COUNT, f"{n} segments")
        if n and lim.readonly:
            raise InvalidRequest(R.READ_ONLY, "flush with data to a read-only disk")
    elif op == Op.DISCARD:
        if lim.readonly:  # refused as an error even though never offered (XSA-142)
            raise InvalidRequest(R.READ_ONLY, "discard on a read-only disk")
        if not lim.discard or (req.flag & 1 and not lim.discard_secure):
            raise InvalidRequest(UNSUPPORTED, "discard not offered")
        check_range(req.sector_number, req.nr_sectors, lim)
    elif op == Op.INDIRECT:
        if not lim.max_indirect_segments:
            raise InvalidRequest(UNSUPPORTED, "indirect not offered")
        if req.indirect_op not in (Op.READ, Op.WRITE):
            raise InvalidRequest(R.INVALID_INDIRECT, f"indirect_op {req.indirect_op}")
        if not 1 <= n <= min(lim.max_indirect_segments, MAX_INDIRECT_SEGMENTS):
            raise InvalidRequest(R.INVALID_SEGMENT_COUNT, f"{n} indirect segments")
        if req.indirect_op == Op.WRITE and lim.readonly:
            raise InvalidRequest(R.READ_ONLY, "write to a read-only disk")
    else:
        raise InvalidRequest(UNSUPPORTED, f"op {op}")


def indirect_pages(nr_segments: int) -> int:
    """How many indirect pages hold ``nr_segments`` descriptors."""
    return min(
        (nr_segments + SEGS_PER_INDIRECT_FRAME - 1) // SEGS_PER_INDIRECT_FRAME,
        BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    )


def check_segments(sector: int, segments: Sequence[Tuple[int, int, int]], lim: DiskLimits) -> int:
    """Check each segment (a ``Segment`` or a plain ``(gref, first_sect, last_sect)``)
    and the whole range; return the request's length in sectors."""
    total = 0
    align = lim.sector_size // SECTOR_SIZE - 1  # in 512-byte sectors
    for _, first, last in segments:
        if first > last or last >= SECTORS_PER_PAGE:
            raise InvalidRequest(R.INVALID_SEGMENT, f"sectors {first}..{last}")
        if align and (first & align or (last + 1) & align):
            raise InvalidRequest(R.INVALID_SEGMENT, "segment not aligned to sector-size")
        total += last - first + 1
    check_range(sector, total, lim)
    return total


def check_range(sector: int, count: int, lim: DiskLimits) -> None:
    """Reject wrap-around, misalignment and anything past the end of the disk."""
    align = lim.sector_size // SECTOR_SIZE - 1
    if sector + count > lim.sectors or sector + count < sector:
        raise InvalidRequest(R.INVALID_RANGE, f"sectors {sector}+{count} of {lim.sectors}")
    if align and (sector & align or count & align):
        raise InvalidRequest(R.INVALID_RANGE, "range not aligned to sector-size")
