"""blkif's XenStore schema in both directions (gblk.blkif.xenbus): what one side
writes, the other parses back to the same values, by one definition.

The frontend half: ``frontend_nodes`` (as the simulated guest writes them) ->
``parse_frontend`` (as the daemon's device reads them). The backend half:
``early_nodes`` + ``connect_nodes`` (as the device writes them) -> ``parse_offer`` +
``parse_disk`` (as the simulated guest reads them). And one ``state`` parser.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gblk.blkif.abi import abi_for_protocol
from gblk.blkif.const import MAX_RING_PAGE_ORDER, XenbusState
from gblk.blkif.xenbus import (
    DISK_NODES,
    OFFER_NODES,
    REQUIRED_DISK_NODES,
    FrontendParams,
    Offer,
    QueueSpec,
    RingSetup,
    SeenOffer,
    connect_nodes,
    early_nodes,
    frontend_nodes,
    parse_disk,
    parse_frontend,
    parse_offer,
    parse_state,
    scan_int,
    stale_frontend_node,
)
from gblk.errors import NegotiationError

PROTOCOLS = [None, "x86_64-abi", "x86_32-abi", "arm-abi"]


def _setup(order: int, nq: int, protocol: Optional[str] = "x86_64-abi",
           persistent: bool = True, legacy: bool = True) -> RingSetup:
    queues = tuple(QueueSpec(tuple(100 * q + i + 1 for i in range(1 << order)), 10 + q)
                   for q in range(nq))
    return RingSetup(order, queues, protocol, persistent, legacy)


# --- the frontend's nodes as a frontend writes them: names, values and order -------
def test_frontend_nodes_classic_layout() -> None:
    """One queue, one page: ring-ref + event-channel, no ring-page-order (Linux)."""
    assert frontend_nodes(_setup(0, 1)) == [
        ("ring-ref", "1"), ("event-channel", "10"), ("protocol", "x86_64-abi"),
        ("feature-persistent", "1"),
    ]


def test_frontend_nodes_multi_page_ring() -> None:
    """ring-ref<i> for each page, then ring-page-order after the references."""
    assert frontend_nodes(_setup(2, 1, protocol=None, persistent=False)) == [
        ("ring-ref0", "1"), ("ring-ref1", "2"), ("ring-ref2", "3"), ("ring-ref3", "4"),
        ("event-channel", "10"), ("ring-page-order", "2"), ("feature-persistent", "0"),
    ]


def test_frontend_nodes_order_zero_written_explicitly() -> None:
    """Not the legacy way: ring-page-order = 0 with ring-ref0."""
    assert frontend_nodes(_setup(0, 1, legacy=False)) == [
        ("ring-ref0", "1"), ("event-channel", "10"), ("ring-page-order", "0"),
        ("protocol", "x86_64-abi"), ("feature-persistent", "1"),
    ]


def test_frontend_nodes_multi_queue() -> None:
    """Several queues: multi-queue-num-queues first, then each under queue-<n>/."""
    assert frontend_nodes(_setup(1, 2)) == [
        ("multi-queue-num-queues", "2"),
        ("queue-0/ring-ref0", "1"), ("queue-0/ring-ref1", "2"), ("queue-0/event-channel", "10"),
        ("queue-1/ring-ref0", "101"), ("queue-1/ring-ref1", "102"),
        ("queue-1/event-channel", "11"),
        ("ring-page-order", "1"), ("protocol", "x86_64-abi"), ("feature-persistent", "1"),
    ]


@pytest.mark.parametrize("name, stale", [
    ("ring-ref", True), ("ring-ref3", True), ("queue-0", True), ("queue-12", True),
    ("event-channel", True), ("multi-queue-num-queues", True), ("ring-page-order", True),
    ("protocol", False), ("state", False), ("feature-persistent", False),
    ("backend", False), ("virtual-device", False),
])
def test_stale_frontend_nodes(name: str, stale: bool) -> None:
    """What an earlier connection left that would mislead the backend."""
    assert stale_frontend_node(name) is stale


# --- frontend writes -> backend parses the same params ------------------------------
@given(order=st.integers(0, MAX_RING_PAGE_ORDER), nq=st.integers(1, 8),
       protocol=st.sampled_from(PROTOCOLS), persistent=st.booleans(), legacy=st.booleans(),
       offered_persistent=st.booleans(), batched=st.booleans())
@settings(max_examples=200, deadline=None)
def test_frontend_round_trip(order: int, nq: int, protocol: Optional[str], persistent: bool,
                             legacy: bool, offered_persistent: bool, batched: bool) -> None:
    """Whatever layout a frontend writes within the offer, the backend reads back the
    same ring order, queues, ABI and (both sides willing) persistent grants, with or
    without ``read_many``."""
    setup = _setup(order, nq, protocol, persistent, legacy)
    nodes = dict(frontend_nodes(setup))
    offer = Offer(MAX_RING_PAGE_ORDER, 8, offered_persistent)
    read_many = (lambda keys: [nodes.get(k) for k in keys]) if batched else None
    assert parse_frontend(nodes.get, offer, read_many) == FrontendParams(
        abi_for_protocol(protocol), order, setup.queues, persistent and offered_persistent)


def test_frontend_round_trip_outside_the_offer_is_rejected() -> None:
    """The schema does not widen what the backend accepts: more queues or a larger
    ring than offered still fail negotiation."""
    with pytest.raises(NegotiationError, match="multi-queue-num-queues"):
        parse_frontend(dict(frontend_nodes(_setup(0, 3))).get, Offer(4, 2, True))
    with pytest.raises(NegotiationError, match="ring-page-order"):
        parse_frontend(dict(frontend_nodes(_setup(3, 1))).get, Offer(2, 1, True))


@pytest.mark.parametrize("key", ["ring-ref", "event-channel"])
@pytest.mark.parametrize("value", ["", "x", "-1", "4294967296", "1.5"])
def test_malformed_frontend_node_rejected(key: str, value: str) -> None:
    """A frontend node changed from what frontend_nodes wrote: a NegotiationError."""
    nodes = dict(frontend_nodes(_setup(0, 1)))
    nodes[key] = value
    with pytest.raises(NegotiationError, match=key):
        parse_frontend(nodes.get, Offer())


# --- backend writes -> frontend parses the same values ------------------------------
@given(order=st.integers(0, MAX_RING_PAGE_ORDER), queues=st.integers(1, 16),
       persistent=st.booleans(), indirect=st.sampled_from([0, 32, 256, 4096]))
@settings(max_examples=50, deadline=None)
def test_offer_round_trip(order: int, queues: int, persistent: bool, indirect: int) -> None:
    """early_nodes -> parse_offer: what the backend offered, as the frontend sees it."""
    nodes = early_nodes(Offer(order, queues, persistent), indirect)
    assert set(nodes) <= set(OFFER_NODES)
    assert parse_offer(nodes.get) == SeenOffer(order, queues, indirect, persistent)


@given(sectors=st.integers(0, 2**63), sector_size=st.sampled_from([512, 4096]),
       physical=st.sampled_from([512, 4096]), info=st.integers(0, 7),
       flush=st.booleans(), barrier=st.booleans(), persistent=st.booleans(),
       discard=st.one_of(st.none(), st.tuples(st.integers(512, 2**20), st.integers(0, 2**20),
                                                st.booleans())),
       indirect=st.sampled_from([0, 256]))
@settings(max_examples=100, deadline=None)
def test_disk_round_trip(sectors: int, sector_size: int, physical: int, info: int, flush: bool,
                         barrier: bool, persistent: bool,
                         discard: Optional[Tuple[int, int, bool]], indirect: int) -> None:
    """connect_nodes (+ the indirect segments of early_nodes) -> parse_disk."""
    nodes: Dict[str, str] = dict(early_nodes(Offer(persistent=persistent), indirect))
    nodes.update(connect_nodes(sectors, sector_size, physical, info, flush, barrier, discard,
                               persistent))
    assert set(nodes) <= set(DISK_NODES) | set(OFFER_NODES)
    assert all(k in nodes for k in REQUIRED_DISK_NODES)
    d = parse_disk(nodes.get)
    gran, align, secure = discard if discard is not None else (0, 0, False)
    assert (d.sectors, d.sector_size, d.physical_sector_size, d.info) == (
        sectors, sector_size, physical, info)
    assert (d.flush, d.barrier, d.persistent, d.max_indirect_segments) == (
        flush, barrier, persistent, indirect)
    assert (d.discard, d.discard_granularity, d.discard_alignment, d.discard_secure) == (
        discard is not None, gran, align, secure)


def test_backend_nodes_read_leniently_by_a_frontend() -> None:
    """A frontend reads a missing or malformed backend node as its default (blkfront's
    xenbus_scanf), and a sector-size of 0 as 512."""
    assert scan_int(None, 7) == 7 and scan_int("x", 7) == 7 and scan_int(" 12\n", 7) == 12
    assert parse_offer({}.get) == SeenOffer()
    bad: Dict[str, str] = {k: "garbage" for k in DISK_NODES}
    assert parse_disk(bad.get).sector_size == 512
    assert parse_disk({"sector-size": "0", "sectors": "8"}.get).sector_size == 512
    assert parse_disk({"sector-size": "4096"}.get).physical_sector_size == 4096


# --- one XenbusState parser --------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    (None, None), ("1", XenbusState.INITIALISING), (" 4\n", XenbusState.CONNECTED),
    ("6", XenbusState.CLOSED), ("8", XenbusState.RECONFIGURED), ("0", XenbusState.UNKNOWN),
    ("9", XenbusState.UNKNOWN), ("-1", XenbusState.UNKNOWN), ("", XenbusState.UNKNOWN),
    ("connected", XenbusState.UNKNOWN), ("4.0", XenbusState.UNKNOWN),
])
def test_parse_state(value: Optional[str], expected: Optional[int]) -> None:
    """Missing: None; a XenbusState: itself; anything else: Unknown (Linux's
    xenbus_read_driver_state)."""
    assert parse_state(value) == expected


def test_every_state_round_trips() -> None:
    """str(int(state)), as every writer spells a state node, parses back to it."""
    states: List[int] = [parse_state(str(int(s))) or 0 for s in XenbusState]
    assert states == [int(s) for s in XenbusState]
