"""The error reasons: the low-cardinality labels a failure is counted under.

Every failed request counts under one of ``REASONS`` (``RingStats.errors``, the
``gblk_errors{reason=...}`` metric, ``gblk-ctl stats``), every device-level failure
under one of ``DEVICE_REASONS`` (``DeviceStats.errors``): these and nothing else.
The names are spelled here only; ``gblk.engine.stats`` re-exports both tuples.
"""

from __future__ import annotations

from typing import Tuple

# --- a request answered with an error ----------------------------------------------
INVALID_SEGMENT_COUNT = "invalid_segment_count"  # nr_segments out of range
INVALID_SEGMENT = "invalid_segment"  # first_sect > last_sect, last_sect > 7
INVALID_RANGE = "invalid_range"  # wrap-around or past the end of the disk
INVALID_INDIRECT = "invalid_indirect"  # bad indirect_op / indirect page contents
READ_ONLY = "read_only"  # write/flush-with-data/discard on mode=r or cdrom
UNSUPPORTED_OP = "unsupported_op"  # answered EOPNOTSUPP
IO_ERROR = "io_error"  # the backing store failed
NO_SPACE = "no_space"  # the backing store is full (ENOSPC, EDQUOT)
GRANT_MAP = "grant_map"  # a grant could not be mapped
GRANT_COPY = "grant_copy"  # a grant copy segment failed
RING_HALTED = "ring_halted"  # bogus producer index: ring stopped

#: request error reasons, in the order metrics and stats list them
REASONS: Tuple[str, ...] = (
    INVALID_SEGMENT_COUNT, INVALID_SEGMENT, INVALID_RANGE, INVALID_INDIRECT, READ_ONLY,
    UNSUPPORTED_OP, IO_ERROR, NO_SPACE, GRANT_MAP, GRANT_COPY, RING_HALTED,
)

# --- a device-level failure ---------------------------------------------------------
DEVICE_FAILED = "device_failed"  # storage could not be opened, negotiation failed, a ring failed
NBD_CONNECTION = "nbd_connection"  # an NBD-served disk lost its connection (or could not reconnect)

#: device-level error reasons (DeviceStats.errors)
DEVICE_REASONS: Tuple[str, ...] = (DEVICE_FAILED, NBD_CONNECTION)
