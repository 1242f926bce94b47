"""Which requests a disk serves: the checks every backend must make before IO.

Raises ``InvalidRequest`` with a reason from ``gblk.blkif.reasons.REASONS``; the
reason ``unsupported_op`` is answered EOPNOTSUPP, every other one ERROR.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

from ..errors import InvalidRequest
from . import ops
from . import reasons as R
from .abi import Request
from .const import (
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
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
    """Everything decidable from the slot alone, by the op's row in ``ops.TABLE``. For
    INDIRECT the segments come later (``check_segments`` once the indirect pages have
    been copied)."""
    op = req.operation
    spec = ops.BY_CODE.get(op)
    if spec is None:
        raise InvalidRequest(UNSUPPORTED, f"op {op}")
    n = req.nr_segments
    layout = spec.layout
    if layout is ops.Layout.SEGMENTS:
        if not spec.offered(lim):
            raise InvalidRequest(UNSUPPORTED, f"op {op} not offered")
        lo, hi = spec.segments
        if not lo <= n <= hi:
            raise InvalidRequest(R.INVALID_SEGMENT_COUNT, f"{n} segments")
        if spec.writes and lim.readonly and n:
            raise InvalidRequest(R.READ_ONLY, f"{spec.label}{'' if lo else ' with data'} "
                                              "to a read-only disk")
    elif layout is ops.Layout.DISCARD:
        if spec.writes and lim.readonly:  # refused as an error even though never offered (XSA-142)
            raise InvalidRequest(R.READ_ONLY, f"{spec.label} on a read-only disk")
        if not spec.offered(lim) or (req.flag & BLKIF_DISCARD_SECURE and not lim.discard_secure):
            raise InvalidRequest(UNSUPPORTED, f"{spec.label} not offered")
        check_range(req.sector_number, req.nr_sectors, lim)
    else:  # Layout.INDIRECT
        if not spec.offered(lim):
            raise InvalidRequest(UNSUPPORTED, "indirect not offered")
        inner = ops.BY_CODE.get(req.indirect_op)
        if inner is None or not inner.indirect_payload:
            raise InvalidRequest(R.INVALID_INDIRECT, f"indirect_op {req.indirect_op}")
        if not spec.segments[0] <= n <= min(lim.max_indirect_segments, spec.segments[1]):
            raise InvalidRequest(R.INVALID_SEGMENT_COUNT, f"{n} indirect segments")
        if inner.writes and lim.readonly:
            raise InvalidRequest(R.READ_ONLY, f"{inner.label} to a read-only disk")


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
