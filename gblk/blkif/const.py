"""Constants of xen/include/public/io/blkif.h, ring.h and xenbus.h."""

from __future__ import annotations

import enum

PAGE_SIZE = 4096
SECTOR_SIZE = 512  # blkif always counts in 512-byte sectors
SECTOR_SHIFT = 9
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE  # 8: last_sect <= 7

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
SEGMENT_SIZE = 8  # struct blkif_request_segment
SEGS_PER_INDIRECT_FRAME = PAGE_SIZE // SEGMENT_SIZE  # 512
MAX_INDIRECT_SEGMENTS = SEGS_PER_INDIRECT_FRAME * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST

BLKIF_DISCARD_SECURE = 1  # flag bit 0 of a discard request

# the "info" node
VDISK_CDROM = 1
VDISK_REMOVABLE = 2
VDISK_READONLY = 4

MAX_RING_PAGE_ORDER = 4  # XENBUS_MAX_RING_GRANT_ORDER in Linux
RING_HEADER_SIZE = 64  # req_prod, req_event, rsp_prod, rsp_event, 48 bytes of pad
U32_MASK = 0xFFFFFFFF


class Op(enum.IntEnum):
    """BLKIF_OP_*"""

    READ = 0
    WRITE = 1
    WRITE_BARRIER = 2
    FLUSH_DISKCACHE = 3
    RESERVED_1 = 4
    DISCARD = 5
    INDIRECT = 6


class Status(enum.IntEnum):
    """BLKIF_RSP_*"""

    OKAY = 0
    ERROR = -1
    EOPNOTSUPP = -2


class XenbusState(enum.IntEnum):
    """enum xenbus_state (io/xenbus.h)"""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8
