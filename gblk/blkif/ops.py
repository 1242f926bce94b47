"""The blkif operations, one row each: what every other module asks about an op.

A row says how the slot is laid out (``Layout``: which struct of the ABI parses it),
which way its data goes (``Data``), whether it changes the disk (refused on a read-only
disk), which ``DiskLimits`` field offers it (None: always offered; ``gblk.blkif.xenbus``
advertises it to the frontend), how many segments the slot may carry, its metric label,
and what it becomes in storage (the ``Store`` calls that serve it).

Readers: the ABI's parser (``abi.Abi.parse_request``, by layout), the request checks
(``validate.check_header``), the metric labels (``LABELS``: ``gblk.engine.stats.OPS``
and the ring's per-request label), the IO limiter's cost (``gblk.engine.throttle``).
The ring worker's dispatch (``gblk.engine.ring``) keeps its own branches on the hot
path, one per *storage* action (``Storage``), not one per table it keeps.

Adding an operation: its code in ``const.Op``, its row here, and, when it is a new
kind of storage call, its job (``gblk.engine.jobs``) and the ``Store`` method. Nothing
else names the op: labels, checks, parsing and limits follow from the row.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .const import BLKIF_MAX_SEGMENTS_PER_REQUEST, MAX_INDIRECT_SEGMENTS, Op


class Layout(enum.Enum):
    """Which struct of an ``Abi`` a slot of this op is."""

    SEGMENTS = "segments"  # blkif_request: header, sector, seg[11]
    DISCARD = "discard"  # blkif_request_discard: flag, sector, nr_sectors
    INDIRECT = "indirect"  # blkif_request_indirect: indirect_op, grefs of descriptor pages


class Data(enum.Enum):
    """Which way an op's data moves."""

    NONE = "none"
    TO_GUEST = "to_guest"  # disk -> guest pages (READ)
    TO_DISK = "to_disk"  # guest pages -> disk (WRITE; a flush or barrier with segments)
    CARRIED = "carried"  # INDIRECT: its indirect_op's direction


class Storage(enum.Enum):
    """What the op becomes in storage (the ``Store`` calls that serve it)."""

    READ = "read"  # preadv into the request's pages
    WRITE = "write"  # pwritev from the request's pages
    WRITE_THEN_FLUSH = "write_then_flush"  # its segments written (if any), then flush()
    DISCARD = "discard"  # discard() (punch a hole / BLKDISCARD), secure: zeroes
    CARRIED = "carried"  # INDIRECT: its indirect_op's


@dataclass(frozen=True)
class OpSpec:
    code: int  #: BLKIF_OP_*
    label: str  #: metric label (``op="..."``), also in log lines
    layout: Layout
    data: Data
    writes: bool  #: changes the disk (with data, for a flush/barrier): read-only disks refuse it
    offered_by: Optional[str]  #: the ``DiskLimits`` field that offers it; None: always
    #: how many segments the request may carry (min, max); INDIRECT: also at most the
    #: disk's ``max_indirect_segments``
    segments: Tuple[int, int]
    storage: Storage
    ordered: bool = False  #: a barrier: everything before it completes first, nothing after starts
    indirect_payload: bool = False  #: may be the ``indirect_op`` of an INDIRECT request

    def offered(self, limits: object) -> bool:
        """Whether a disk with these ``DiskLimits`` offers this op."""
        return self.offered_by is None or bool(getattr(limits, self.offered_by))


_MAX = BLKIF_MAX_SEGMENTS_PER_REQUEST

#: every operation gblk serves, in the order of the metric labels
TABLE: Tuple[OpSpec, ...] = (
    OpSpec(Op.READ, "read", Layout.SEGMENTS, Data.TO_GUEST, writes=False, offered_by=None,
           segments=(1, _MAX), storage=Storage.READ, indirect_payload=True),
    OpSpec(Op.WRITE, "write", Layout.SEGMENTS, Data.TO_DISK, writes=True, offered_by=None,
           segments=(1, _MAX), storage=Storage.WRITE, indirect_payload=True),
    OpSpec(Op.WRITE_BARRIER, "barrier", Layout.SEGMENTS, Data.TO_DISK, writes=True,
           offered_by="barrier", segments=(0, _MAX),
           storage=Storage.WRITE_THEN_FLUSH, ordered=True),
    OpSpec(Op.FLUSH_DISKCACHE, "flush", Layout.SEGMENTS, Data.TO_DISK, writes=True,
           offered_by="flush", segments=(0, _MAX),
           storage=Storage.WRITE_THEN_FLUSH),
    OpSpec(Op.DISCARD, "discard", Layout.DISCARD, Data.NONE, writes=True,
           offered_by="discard", segments=(0, 0),
           storage=Storage.DISCARD),
    OpSpec(Op.INDIRECT, "indirect", Layout.INDIRECT, Data.CARRIED, writes=False,
           offered_by="max_indirect_segments",
           segments=(1, MAX_INDIRECT_SEGMENTS), storage=Storage.CARRIED),
)

BY_CODE: Dict[int, OpSpec] = {int(s.code): s for s in TABLE}

#: the label of a request nothing in the table describes (answered EOPNOTSUPP)
UNSUPPORTED_LABEL = "unsupported"

#: metric labels by op code; an INDIRECT request counts as its ``indirect_op``, so it
#: has no label of its own
LABEL: Dict[int, str] = {int(s.code): s.label for s in TABLE if s.layout is not Layout.INDIRECT}

#: every value the ``op`` label takes, in this order
LABELS: Tuple[str, ...] = tuple(LABEL.values()) + (UNSUPPORTED_LABEL,)


def label_of(code: int) -> str:
    return LABEL.get(code, UNSUPPORTED_LABEL)
