"""The simulated frontend's public value types: options, what it negotiated and
read, the results of IO, its counters and its errors. What it read of the backend
(``DiskInfo``, ``Offer``) is blkif's schema (``gblk.blkif.xenbus``), re-exported.

Pure data (dataclasses): no gevent, no IO. ``gblk.sim.guest.frontend`` re-exports all of
them; import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ...blkif.const import SECTOR_SIZE, Status
from ...blkif.xenbus import DiskInfo as DiskInfo
from ...blkif.xenbus import SeenOffer
from ...errors import GblkError
from .verify import Mismatch

#: XEN_IO_PROTO_ABI_NATIVE of an x86_64 Linux guest
NATIVE_PROTOCOL = "x86_64-abi"

#: what the backend offered before InitWait, as this frontend read it
Offer = SeenOffer


class FrontendError(GblkError):
    """The simulated frontend could not do what was asked."""


class FrontendTimeout(FrontendError):
    """A state the frontend waited for did not come in time."""


class NotConnected(FrontendError):
    """IO submitted while the frontend is not connected."""


class IOFailed(FrontendError):
    """A request was answered with an error status (or lost)."""

    def __init__(self, result: "IoResult") -> None:
        super().__init__(f"{result.kind} sector {result.sector}+{result.nsectors}: "
                         f"status {result.status}{' (lost)' if result.lost else ''}")
        self.result = result


@dataclass
class FrontendOptions:
    """What the simulated guest's driver is allowed to use (module parameters)."""

    #: "x86_64-abi", "x86_32-abi", "arm-abi", or None: no protocol node (x86_32 layout)
    protocol: Optional[str] = NATIVE_PROTOCOL
    #: our ceiling on the ring order (Linux: max_ring_page_order)
    max_ring_page_order: int = 4
    #: our ceiling on queues (Linux: max_queues, default 4)
    max_queues: int = 4
    #: our ceiling on indirect segments (Linux: max_indirect_segments); 0: never INDIRECT
    max_indirect_segments: int = 256
    #: use persistent grants when the backend offers them (Linux: feature_persistent)
    persistent: bool = True
    #: INDIRECT even for requests of 11 segments or fewer
    force_indirect: bool = False
    #: order 0 written as "ring-ref" (Linux) or as "ring-page-order"=0 + "ring-ref0"
    legacy_ring_ref: bool = True
    #: wait for the backend's InitWait before writing the ring nodes (False: skip it)
    wait_initwait: bool = True
    #: pages of data (and indirect descriptors) in flight at most; bounds the pool
    max_inflight_pages: int = 4096
    #: the disk's initial content is zeros (a fresh sparse image): check it too
    initial_zero: bool = False
    #: a successful DISCARD leaves zeros (raw files: punched holes read as zeros)
    discard_zeroes: bool = True
    #: the response to an INDIRECT request must carry its indirect_op (what Linux's
    #: blkif_interrupt checks); False: accept INDIRECT (6) as well
    strict_indirect_op: bool = True
    #: first request id (ids are unique 64-bit numbers; high bits catch truncation)
    id_base: int = 0x5A5A_0000_0000_0000
    #: seconds to wait for each backend state during connect/close
    timeout: float = 30.0
    #: seconds a synchronous IO helper waits for its answer
    io_timeout: float = 60.0


@dataclass
class IoResult:
    """The answer to one user operation (possibly several ring requests)."""

    kind: str
    sector: int
    nsectors: int
    status: int  #: OKAY if every request was OKAY, else the first other status
    statuses: List[int] = field(default_factory=list)
    data: Optional[bytes] = None  #: what a read returned
    mismatch: Optional[Mismatch] = None  #: the first verification failure
    lost: bool = False  #: some request never got an answer (disconnect)
    requests: int = 0

    @property
    def ok(self) -> bool:
        return self.status == Status.OKAY and not self.lost and self.mismatch is None

    @property
    def nbytes(self) -> int:
        return self.nsectors * SECTOR_SIZE if self.kind in ("read", "write", "barrier", "flush") else 0


@dataclass
class RawResponse:
    """The answer to a request placed with ``put_raw``."""

    id: int
    operation: int
    status: int


@dataclass
class PartInfo:
    """A ring request in flight (for hostile tests)."""

    id: int
    queue: int
    kind: str
    operation: int
    sector: int
    nsectors: int
    index: int
    grefs: List[int]
    indirect_grefs: List[int]


@dataclass
class FrontendStats:
    requests: int = 0  #: ring requests placed
    responses: int = 0  #: valid responses
    ops: int = 0  #: user operations completed
    errors: int = 0  #: responses with BLKIF_RSP_ERROR (or an unknown status)
    unsupported: int = 0  #: responses with BLKIF_RSP_EOPNOTSUPP
    lost: int = 0  #: requests never answered (disconnect, reboot)
    bytes_read: int = 0
    bytes_written: int = 0
    mismatches: int = 0
    canary_violations: int = 0
    grants_busy_after_response: int = 0
    grant_leaks: int = 0  #: grants still mapped by the backend after it closed
    connects: int = 0
    resizes: int = 0
    violations: Dict[str, int] = field(default_factory=dict)

    @property
    def protocol_violations(self) -> int:
        return sum(self.violations.values())
