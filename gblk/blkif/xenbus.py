"""XenStore node names of a blkif device and the negotiation they carry, both halves.

The schema, as mirage-block-xen's protocol module holds it, in both directions:

- the frontend's nodes as a frontend writes them (``frontend_nodes`` for a
  ``RingSetup``; ``stale_frontend_node`` names what an earlier connection left) and as
  the backend reads them (``parse_frontend`` -> ``FrontendParams``);
- the backend's nodes as the backend writes them (``early_nodes`` for an ``Offer``
  before InitWait, ``connect_nodes`` before Connected) and as a frontend reads them
  (``parse_offer`` -> ``SeenOffer``, ``parse_disk`` -> ``DiskInfo``);
- a ``state`` node, whoever wrote it, as anyone reads it (``parse_state``).

The daemon's device (``gblk.device.device``) and the simulated guest
(``gblk.sim.guest.frontend``) both use these, so what one writes the other parses by the
same definition (tests/unit/test_blkif_xenbus.py checks the round trips).

Pure: callers pass a ``read(key) -> Optional[str]`` over one directory, so this is
testable with a dict. Names are exactly those of blkif.h (docs/protocol.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import NegotiationError
from .abi import Abi, abi_for_protocol
from .const import (
    MAX_RING_PAGE_ORDER,
    SECTOR_SIZE,
    VDISK_CDROM,
    VDISK_READONLY,
    VDISK_REMOVABLE,
    XenbusState,
)

# --- written by the toolstack into the backend directory ---------------------------
FRONTEND = "frontend"
FRONTEND_ID = "frontend-id"
ONLINE = "online"
STATE = "state"
PARAMS = "params"
MODE = "mode"
DEVICE_TYPE = "device-type"
DIRECT_IO_SAFE = "direct-io-safe"
DISCARD_ENABLE = "discard-enable"
REMOVABLE = "removable"
# --- written by the backend -----------------------------------------------------
MAX_RING_PAGE_ORDER_KEY = "max-ring-page-order"
FEATURE_MAX_INDIRECT_SEGMENTS = "feature-max-indirect-segments"
MULTI_QUEUE_MAX_QUEUES = "multi-queue-max-queues"
HOTPLUG_STATUS = "hotplug-status"
HOTPLUG_ERROR = "hotplug-error"
SECTORS = "sectors"
SECTOR_SIZE_KEY = "sector-size"
PHYSICAL_SECTOR_SIZE = "physical-sector-size"
INFO = "info"
FEATURE_FLUSH_CACHE = "feature-flush-cache"
FEATURE_BARRIER = "feature-barrier"
FEATURE_DISCARD = "feature-discard"
DISCARD_GRANULARITY = "discard-granularity"
DISCARD_ALIGNMENT = "discard-alignment"
DISCARD_SECURE = "discard-secure"
FEATURE_PERSISTENT = "feature-persistent"
# --- written by the frontend ----------------------------------------------------
RING_REF = "ring-ref"
RING_PAGE_ORDER = "ring-page-order"
EVENT_CHANNEL = "event-channel"
PROTOCOL = "protocol"
MULTI_QUEUE_NUM_QUEUES = "multi-queue-num-queues"
#: a multi-queue frontend writes each queue's nodes under ``queue-<n>/``
QUEUE_DIR = "queue-"
# --- written by the toolstack into the frontend directory ----------------------------
BACKEND = "backend"
BACKEND_ID = "backend-id"
VIRTUAL_DEVICE = "virtual-device"

Read = Callable[[str], Optional[str]]
#: many keys of one directory at once, values in the order asked (None: missing)
ReadMany = Callable[[Sequence[str]], List[Optional[str]]]


@dataclass(frozen=True)
class Offer:
    """What the backend advertised before InitWait."""

    max_ring_page_order: int = MAX_RING_PAGE_ORDER
    max_queues: int = 1
    persistent: bool = True


@dataclass(frozen=True)
class QueueSpec:
    ring_refs: Tuple[int, ...]
    event_channel: int


@dataclass(frozen=True)
class FrontendParams:
    """Everything the backend needs from the frontend to connect."""

    abi: Abi
    ring_page_order: int
    queues: Tuple[QueueSpec, ...]
    persistent: bool


def parse_uint(value: Optional[str], what: str, limit: int = 0xFFFFFFFF) -> int:
    if value is None:
        raise NegotiationError(f"{what} missing")
    v = value.strip()
    if not (v.isascii() and v.isdigit()):  # str.isdigit() also accepts '²', int() does not
        raise NegotiationError(f"{what} is not a number: {value!r}")
    n = int(v)
    if n > limit:
        raise NegotiationError(f"{what} out of range: {n}")
    return n


def parse_bool(value: Optional[str], default: bool = False) -> bool:
    if value is None:
        return default
    return value.strip() not in ("", "0")


def parse_state(value: Optional[str]) -> Optional[int]:
    """A ``state`` node as xenbus reads it: None when the node is missing, else the
    XenbusState it holds; anything that is not one (not a number, outside 0..8) is
    UNKNOWN, as Linux's xenbus_read_driver_state reads it."""
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        return XenbusState.UNKNOWN
    return n if 0 <= n <= XenbusState.RECONFIGURED else XenbusState.UNKNOWN


def queue_dir(index: int) -> str:
    """The directory (relative to the frontend's) of queue ``index`` when there are
    several."""
    return f"{QUEUE_DIR}{index}"


def _queue(read: Read, prefix: str, order: int) -> QueueSpec:
    if order == 0 and read(prefix + RING_REF) is not None:
        refs: Tuple[int, ...] = (parse_uint(read(prefix + RING_REF), prefix + RING_REF),)
    else:
        refs = tuple(
            parse_uint(read(f"{prefix}{RING_REF}{i}"), f"{prefix}{RING_REF}{i}")
            for i in range(1 << order)
        )
    port = parse_uint(read(prefix + EVENT_CHANNEL), prefix + EVENT_CHANNEL)
    return QueueSpec(refs, port)


class _Prefetched:
    """``read`` from what ``read_many`` fetched ahead; a key not fetched is read alone."""

    def __init__(self, read: Read, read_many: Optional[ReadMany]) -> None:
        self._read = read
        self._read_many = read_many
        self._values: Dict[str, Optional[str]] = {}

    def fetch(self, keys: Sequence[str]) -> None:
        want = [k for k in keys if k not in self._values]
        if self._read_many is not None and want:
            self._values.update(zip(want, self._read_many(want)))

    def __call__(self, key: str) -> Optional[str]:
        if key not in self._values:
            self._values[key] = self._read(key)
        return self._values[key]


def _queue_keys(prefix: str, order: int) -> List[str]:
    keys = [prefix + RING_REF] if order == 0 else []
    keys += [f"{prefix}{RING_REF}{i}" for i in range(1 << order)]
    return keys + [prefix + EVENT_CHANNEL]


def parse_frontend(read: Read, offer: Offer,
                   read_many: Optional[ReadMany] = None) -> FrontendParams:
    """Read the frontend directory as blkback does at connect time. With ``read_many``
    the nodes are fetched in two batches (the layout, then every queue's ring
    references and event channel) instead of one read after another: the same
    values, as the frontend wrote them all before it went Initialised."""
    got = _Prefetched(read, read_many)
    got.fetch([PROTOCOL, RING_PAGE_ORDER, MULTI_QUEUE_NUM_QUEUES, EVENT_CHANNEL,
               FEATURE_PERSISTENT])
    read = got
    abi = abi_for_protocol(read(PROTOCOL))
    order_s = read(RING_PAGE_ORDER)
    order = 0 if order_s is None else parse_uint(order_s, RING_PAGE_ORDER, 31)
    if order > offer.max_ring_page_order:
        raise NegotiationError(
            f"ring-page-order {order} above the offered {offer.max_ring_page_order}"
        )
    nq_s = read(MULTI_QUEUE_NUM_QUEUES)
    if nq_s is None:
        got.fetch(_queue_keys("", order))
        queues: Tuple[QueueSpec, ...] = (_queue(read, "", order),)
    else:
        nq = parse_uint(nq_s, MULTI_QUEUE_NUM_QUEUES, 0xFFFF)
        if not 1 <= nq <= offer.max_queues:
            raise NegotiationError(
                f"multi-queue-num-queues {nq} outside 1..{offer.max_queues}"
            )
        if nq == 1 and read(EVENT_CHANNEL) is not None:
            got.fetch(_queue_keys("", order))
            queues = (_queue(read, "", order),)  # Linux writes one queue the old way
        else:
            got.fetch([k for i in range(nq) for k in _queue_keys(f"{queue_dir(i)}/", order)])
            queues = tuple(_queue(read, f"{queue_dir(i)}/", order) for i in range(nq))
    persistent = offer.persistent and parse_bool(read(FEATURE_PERSISTENT))
    return FrontendParams(abi, order, queues, persistent)


# --- the frontend's nodes as a frontend writes them ------------------------------------
@dataclass(frozen=True)
class RingSetup:
    """What a frontend publishes before Initialised (blkfront's talk_to_blkback)."""

    ring_page_order: int
    queues: Tuple[QueueSpec, ...]
    #: the ``protocol`` node; None: not written (the x86_32 layout)
    protocol: Optional[str]
    persistent: bool
    #: order 0 written as ``ring-ref`` (Linux), else as ``ring-page-order`` = 0 + ``ring-ref0``
    legacy_ring_ref: bool = True


def _ring_nodes(prefix: str, order: int, legacy: bool, q: QueueSpec) -> List[Tuple[str, str]]:
    if order == 0 and legacy:
        nodes = [(prefix + RING_REF, str(q.ring_refs[0]))]
    else:
        nodes = [(f"{prefix}{RING_REF}{i}", str(ref)) for i, ref in enumerate(q.ring_refs)]
    return nodes + [(prefix + EVENT_CHANNEL, str(q.event_channel))]


def frontend_nodes(setup: RingSetup) -> List[Tuple[str, str]]:
    """The (key, value) pairs a frontend writes in its transaction, keys relative to
    its directory, in blkfront's order: the ring references and event channel (one
    queue: at the top; several: ``multi-queue-num-queues`` then each queue under
    ``queue-<n>/``), ``ring-page-order`` (unless order 0 the legacy way),
    ``protocol`` (if any), ``feature-persistent``. ``parse_frontend`` reads them back."""
    order, legacy = setup.ring_page_order, setup.legacy_ring_ref
    if len(setup.queues) == 1:
        nodes = _ring_nodes("", order, legacy, setup.queues[0])
    else:
        nodes = [(MULTI_QUEUE_NUM_QUEUES, str(len(setup.queues)))]
        for i, q in enumerate(setup.queues):
            nodes += _ring_nodes(f"{queue_dir(i)}/", order, legacy, q)
    if order > 0 or not legacy:
        nodes.append((RING_PAGE_ORDER, str(order)))
    if setup.protocol is not None:
        nodes.append((PROTOCOL, setup.protocol))
    nodes.append((FEATURE_PERSISTENT, "1" if setup.persistent else "0"))
    return nodes


def stale_frontend_node(name: str) -> bool:
    """A node of the frontend directory an earlier connection wrote that must not
    mislead the backend: a frontend removes these before writing ``frontend_nodes``
    (and ``protocol`` too when it writes none)."""
    return (name.startswith(RING_REF) or name.startswith(QUEUE_DIR)
            or name in (MULTI_QUEUE_NUM_QUEUES, RING_PAGE_ORDER, EVENT_CHANNEL))


# --- the backend's nodes as a frontend reads them --------------------------------------
def scan_int(value: Optional[str], default: int) -> int:
    """A backend node as blkfront's xenbus_scanf reads it: ``default`` when it is
    missing or not a number."""
    if value is None:
        return default
    try:
        return int(value.strip())
    except ValueError:
        return default


#: what a frontend reads of the backend before it sets up its rings (``early_nodes``)
OFFER_NODES = (MAX_RING_PAGE_ORDER_KEY, MULTI_QUEUE_MAX_QUEUES,
               FEATURE_MAX_INDIRECT_SEGMENTS, FEATURE_PERSISTENT)


@dataclass(frozen=True)
class SeenOffer:
    """What the backend offered before InitWait, as a frontend read it."""

    max_ring_page_order: int = 0
    max_queues: int = 1
    max_indirect_segments: int = 0
    persistent: bool = False


def parse_offer(read: Read) -> SeenOffer:
    """The ``OFFER_NODES`` as blkfront reads them (a missing node: not offered)."""
    return SeenOffer(
        scan_int(read(MAX_RING_PAGE_ORDER_KEY), 0),
        scan_int(read(MULTI_QUEUE_MAX_QUEUES), 1),
        scan_int(read(FEATURE_MAX_INDIRECT_SEGMENTS), 0),
        scan_int(read(FEATURE_PERSISTENT), 0) != 0,
    )


#: what a frontend reads of the backend once it is Connected (``connect_nodes`` and
#: the indirect segments of ``early_nodes``), in blkfront's order
DISK_NODES = (SECTORS, INFO, SECTOR_SIZE_KEY, PHYSICAL_SECTOR_SIZE,
              FEATURE_BARRIER, FEATURE_FLUSH_CACHE, FEATURE_DISCARD,
              DISCARD_GRANULARITY, DISCARD_ALIGNMENT, DISCARD_SECURE,
              FEATURE_PERSISTENT, FEATURE_MAX_INDIRECT_SEGMENTS)
#: of those, a frontend cannot connect without these
REQUIRED_DISK_NODES = (SECTORS, INFO, SECTOR_SIZE_KEY)


@dataclass
class DiskInfo:
    """What the backend published at connect time, as a frontend read it."""

    sectors: int = 0  # ``sectors``: the size in 512-byte sectors
    sector_size: int = SECTOR_SIZE  # ``sector-size``: logical block size
    physical_sector_size: int = SECTOR_SIZE  # ``physical-sector-size``
    info: int = 0  # ``info``: VDISK_* flags
    flush: bool = False  # ``feature-flush-cache``
    barrier: bool = False  # ``feature-barrier``
    discard: bool = False  # ``feature-discard``; the next three only with it
    discard_granularity: int = 0  # ``discard-granularity``
    discard_alignment: int = 0  # ``discard-alignment``
    discard_secure: bool = False  # ``discard-secure``
    persistent: bool = False  # ``feature-persistent``
    max_indirect_segments: int = 0  # ``feature-max-indirect-segments`` (0: none)

    @property
    def readonly(self) -> bool:
        return bool(self.info & VDISK_READONLY)

    @property
    def cdrom(self) -> bool:
        return bool(self.info & VDISK_CDROM)

    @property
    def removable(self) -> bool:
        return bool(self.info & VDISK_REMOVABLE)

    @property
    def size_bytes(self) -> int:
        return self.sectors * SECTOR_SIZE


def parse_disk(read: Read) -> DiskInfo:
    """The ``DISK_NODES`` as blkfront_connect and blkfront_gather_backend_features
    read them (check ``REQUIRED_DISK_NODES`` first: a missing one reads as 0 here)."""
    d = DiskInfo()
    d.sectors = scan_int(read(SECTORS), 0)
    d.info = scan_int(read(INFO), 0)
    d.sector_size = scan_int(read(SECTOR_SIZE_KEY), SECTOR_SIZE) or SECTOR_SIZE
    d.physical_sector_size = scan_int(read(PHYSICAL_SECTOR_SIZE), d.sector_size)
    d.barrier = scan_int(read(FEATURE_BARRIER), 0) != 0
    d.flush = scan_int(read(FEATURE_FLUSH_CACHE), 0) != 0
    d.discard = scan_int(read(FEATURE_DISCARD), 0) != 0
    if d.discard:
        d.discard_granularity = scan_int(read(DISCARD_GRANULARITY), 0)
        d.discard_alignment = scan_int(read(DISCARD_ALIGNMENT), 0)
        d.discard_secure = scan_int(read(DISCARD_SECURE), 0) != 0
    d.persistent = scan_int(read(FEATURE_PERSISTENT), 0) != 0
    d.max_indirect_segments = scan_int(read(FEATURE_MAX_INDIRECT_SEGMENTS), 0)
    return d


# --- the toolstack's nodes, and the backend's as it writes them ------------------------
def parse_params(kind: str, params: str) -> Tuple[str, str]:
    """``params`` as libxl writes it -> (format, path). ``vbd``: a plain path;
    ``qdisk``/``vbd3``: ``<format>:<path>`` (``aio`` means raw); a plain absolute path
    is taken as raw for every kind."""
    p = params.strip()
    if not p:
        raise NegotiationError("params is empty")
    if kind == "vbd" or p.startswith("/"):
        return "raw", p
    fmt, sep, path = p.partition(":")
    if not sep or not path:
        raise NegotiationError(f"params {params!r} is not <format>:<path>")
    fmt = fmt.lower()
    if fmt == "aio":
        fmt = "raw"
    return fmt, path


def connect_nodes(
    sectors: int,
    sector_size: int,
    physical_sector_size: int,
    info: int,
    flush: bool,
    barrier: bool,
    discard: Optional[Tuple[int, int, bool]],
    persistent: bool,
) -> Dict[str, str]:
    """The nodes written at connect time, before state=Connected. ``discard`` is
    (granularity, alignment, secure) or None; alignment is always written with it."""
    nodes = {
        SECTORS: str(sectors),
        SECTOR_SIZE_KEY: str(sector_size),
        PHYSICAL_SECTOR_SIZE: str(physical_sector_size),
        INFO: str(info),
        FEATURE_FLUSH_CACHE: "1" if flush else "0",
        FEATURE_BARRIER: "1" if barrier else "0",
        FEATURE_PERSISTENT: "1" if persistent else "0",
    }
    if discard is not None:
        gran, align, secure = discard
        nodes[FEATURE_DISCARD] = "1"
        nodes[DISCARD_GRANULARITY] = str(gran)
        nodes[DISCARD_ALIGNMENT] = str(align)
        nodes[DISCARD_SECURE] = "1" if secure else "0"
    else:
        nodes[FEATURE_DISCARD] = "0"
    return nodes


def early_nodes(offer: Offer, max_indirect_segments: int) -> Dict[str, str]:
    """Written before InitWait: frontends read these early."""
    nodes = {
        MAX_RING_PAGE_ORDER_KEY: str(offer.max_ring_page_order),
        MULTI_QUEUE_MAX_QUEUES: str(offer.max_queues),
        FEATURE_PERSISTENT: "1" if offer.persistent else "0",
    }
    if max_indirect_segments:
        nodes[FEATURE_MAX_INDIRECT_SEGMENTS] = str(max_indirect_segments)
    return nodes


def backend_path(backend_domid: int, kind: str, frontend_domid: int, devid: int) -> str:
    return f"/local/domain/{backend_domid}/backend/{kind}/{frontend_domid}/{devid}"


def frontend_path(frontend_domid: int, devid: int) -> str:
    return f"/local/domain/{frontend_domid}/device/vbd/{devid}"


