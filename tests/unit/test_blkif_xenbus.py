"""XenStore negotiation of a blkif device (gblk.blkif.xenbus), from plain dicts.

Frontend nodes are written by the guest: anything malformed must end as a
NegotiationError (that device fails cleanly), never another exception.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gblk.blkif.abi import X86_32, X86_64
from gblk.blkif.xenbus import (
    Offer,
    QueueSpec,
    backend_path,
    connect_nodes,
    early_nodes,
    frontend_path,
    parse_bool,
    parse_frontend,
    parse_params,
    parse_uint,
)
from gblk.errors import NegotiationError


def reader(nodes: Dict[str, str]) -> Callable[[str], Optional[str]]:
    return nodes.get


OFFER = Offer(max_ring_page_order=4, max_queues=4, persistent=True)


def test_single_page_ring() -> None:
    """The classic layout: ring-ref + event-channel, one queue, order 0."""
    fp = parse_frontend(reader({
        "ring-ref": "8", "event-channel": "17", "protocol": "x86_64-abi",
        "feature-persistent": "1",
    }), OFFER)
    assert fp.abi is X86_64
    assert fp.ring_page_order == 0
    assert fp.queues == (QueueSpec((8,), 17),)
    assert fp.persistent is True


def test_absent_protocol_is_x86_32() -> None:
    """No protocol node: x86_32-abi (docs/protocol.md §1.3)."""
    fp = parse_frontend(reader({"ring-ref": "8", "event-channel": "17"}), OFFER)
    assert fp.abi is X86_32
    assert fp.persistent is False


def test_persistent_needs_both_sides() -> None:
    """feature-persistent is used only when the backend offered it and the frontend
    asked for it."""
    nodes = {"ring-ref": "8", "event-channel": "17", "feature-persistent": "1"}
    assert parse_frontend(reader(nodes), Offer(persistent=False)).persistent is False
    nodes["feature-persistent"] = "0"
    assert parse_frontend(reader(nodes), OFFER).persistent is False


@pytest.mark.parametrize("order", [1, 2, 4])
def test_multi_page_ring(order: int) -> None:
    """ring-page-order N + ring-ref0..ring-ref{2^N-1}, in that order."""
    nodes = {"ring-page-order": str(order), "event-channel": "3", "protocol": "x86_32-abi"}
    for i in range(1 << order):
        nodes[f"ring-ref{i}"] = str(100 + i)
    fp = parse_frontend(reader(nodes), OFFER)
    assert fp.ring_page_order == order
    assert fp.queues == (QueueSpec(tuple(100 + i for i in range(1 << order)), 3),)


def test_order_zero_written_explicitly_uses_ring_ref0() -> None:
    """ring-page-order=0 with ring-ref0 (what Linux blkback reads in that case)."""
    fp = parse_frontend(reader({"ring-page-order": "0", "ring-ref0": "9",
                                "event-channel": "3"}), OFFER)
    assert fp.queues == (QueueSpec((9,), 3),)


def test_order_above_offer_rejected() -> None:
    """A ring order above max-ring-page-order is refused (docs/protocol.md §1.3)."""
    nodes = {"ring-page-order": "3", "event-channel": "3"}
    nodes.update({f"ring-ref{i}": str(i) for i in range(8)})
    with pytest.raises(NegotiationError, match="ring-page-order"):
        parse_frontend(reader(nodes), Offer(max_ring_page_order=2))


def test_missing_ring_ref_of_multi_page_ring() -> None:
    """One ring-refN missing from a multi-page ring fails the negotiation."""
    nodes = {"ring-page-order": "2", "event-channel": "3", "ring-ref0": "1", "ring-ref1": "2",
             "ring-ref3": "4"}
    with pytest.raises(NegotiationError, match="ring-ref2"):
        parse_frontend(reader(nodes), OFFER)


def _mq(nq: int, order: int = 0) -> Dict[str, str]:
    nodes = {"multi-queue-num-queues": str(nq), "protocol": "x86_64-abi"}
    for q in range(nq):
        if order == 0:
            nodes[f"queue-{q}/ring-ref"] = str(10 * q + 1)
        else:
            nodes[f"queue-{q}/ring-page-order"] = str(order)
            for i in range(1 << order):
                nodes[f"queue-{q}/ring-ref{i}"] = str(10 * q + i)
        nodes[f"queue-{q}/event-channel"] = str(50 + q)
    if order:
        nodes["ring-page-order"] = str(order)
    return nodes


def test_multi_queue() -> None:
    """multi-queue-num-queues + queue-N/ring-ref and queue-N/event-channel."""
    fp = parse_frontend(reader(_mq(3)), OFFER)
    assert fp.queues == (QueueSpec((1,), 50), QueueSpec((11,), 51), QueueSpec((21,), 52))


def test_multi_queue_multi_page() -> None:
    """Multi-queue with multi-page rings: queue-N/ring-refM for each queue."""
    fp = parse_frontend(reader(_mq(2, order=1)), OFFER)
    assert fp.ring_page_order == 1
    assert fp.queues == (QueueSpec((0, 1), 50), QueueSpec((10, 11), 51))


def test_one_queue_the_old_way() -> None:
    """multi-queue-num-queues=1 with the top-level ring-ref/event-channel (Linux writes
    a single queue that way)."""
    fp = parse_frontend(reader({"multi-queue-num-queues": "1", "ring-ref": "5",
                                "event-channel": "6"}), OFFER)
    assert fp.queues == (QueueSpec((5,), 6),)


@pytest.mark.parametrize("nq", [0, 5, 65535])
def test_queue_count_outside_offer(nq: int) -> None:
    """0 queues, or more than multi-queue-max-queues: refused."""
    with pytest.raises(NegotiationError, match="multi-queue-num-queues"):
        parse_frontend(reader(_mq(nq) if nq < 10 else {"multi-queue-num-queues": str(nq)}), OFFER)


def test_missing_queue_node() -> None:
    """A queue without its event channel fails the negotiation, naming the node."""
    nodes = _mq(2)
    del nodes["queue-1/event-channel"]
    with pytest.raises(NegotiationError, match="queue-1/event-channel"):
        parse_frontend(reader(nodes), OFFER)


@pytest.mark.parametrize("missing", ["ring-ref", "event-channel"])
def test_missing_single_ring_nodes(missing: str) -> None:
    """No ring-ref or no event-channel: NegotiationError (the device fails, the daemon
    carries on)."""
    nodes = {"ring-ref": "8", "event-channel": "17"}
    del nodes[missing]
    with pytest.raises(NegotiationError):
        parse_frontend(reader(nodes), OFFER)


def test_unknown_protocol() -> None:
    """An unknown protocol fails the negotiation."""
    with pytest.raises(NegotiationError):
        parse_frontend(reader({"ring-ref": "8", "event-channel": "1", "protocol": "sparc"}), OFFER)


@pytest.mark.parametrize(
    "value",
    ["", "abc", "-1", "0x10", "1.5", "4294967296", "99999999999999999999", "1 2",
     "\u00b2", "\u2460", "\U0001d7d9"],
)
def test_malformed_numbers_are_negotiation_errors(value: str) -> None:
    """Frontend-written numbers that are not plain decimal u32 (including Unicode
    digits such as '²' that str.isdigit() accepts but int() refuses) end as a
    NegotiationError, never a ValueError escaping the control plane."""
    with pytest.raises(NegotiationError):
        parse_uint(value, "ring-ref")
    with pytest.raises(NegotiationError):
        parse_frontend(reader({"ring-ref": value, "event-channel": "3"}), OFFER)


@given(nodes=st.dictionaries(
    st.sampled_from(["ring-ref", "ring-ref0", "ring-ref1", "ring-page-order", "event-channel",
                     "protocol", "multi-queue-num-queues", "queue-0/ring-ref",
                     "queue-0/event-channel", "queue-1/ring-ref", "queue-1/event-channel",
                     "feature-persistent"]),
    st.one_of(st.text(max_size=6), st.integers(0, 2**33).map(str),
              st.sampled_from(["\u00b2", "\u0661\u0662", " 7 ", "-1", "0x1f", "x86_64-abi"]))))
@settings(max_examples=200, deadline=None)
def test_parse_frontend_fails_only_with_negotiation_error(nodes: Dict[str, str]) -> None:
    """Whatever a guest writes into its frontend directory, parse_frontend returns or
    raises NegotiationError: nothing else may escape into the device's greenlet."""
    try:
        fp = parse_frontend(reader(nodes), OFFER)
    except NegotiationError:
        return
    assert 1 <= len(fp.queues) <= OFFER.max_queues
    for q in fp.queues:
        assert len(q.ring_refs) == 1 << fp.ring_page_order
        assert all(0 <= r <= 0xFFFFFFFF for r in q.ring_refs)


@pytest.mark.parametrize(
    "kind, params, expected",
    [
        pytest.param("vbd", "/dev/vg/disk", ("raw", "/dev/vg/disk"), id="vbd-plain-path"),
        pytest.param("vbd", "/img/a:b.raw", ("raw", "/img/a:b.raw"), id="vbd-path-with-colon"),
        pytest.param("qdisk", "raw:/img/d.raw", ("raw", "/img/d.raw"), id="qdisk-raw"),
        pytest.param("qdisk", "aio:/img/d.raw", ("raw", "/img/d.raw"), id="qdisk-aio-is-raw"),
        pytest.param("qdisk", "/img/d.raw", ("raw", "/img/d.raw"), id="qdisk-plain-path"),
        pytest.param("qdisk", "qcow2:/img/d.qcow2", ("qcow2", "/img/d.qcow2"), id="qdisk-qcow2-kept"),
        pytest.param("vbd3", "vhd:/img/d.vhd", ("vhd", "/img/d.vhd"), id="vbd3-vhd-kept"),
        pytest.param("vbd3", "aio:/img/d.raw", ("raw", "/img/d.raw"), id="vbd3-aio"),
        pytest.param("qdisk", " raw:/img/d.raw\n", ("raw", "/img/d.raw"), id="whitespace"),
    ],
)
def test_parse_params(kind: str, params: str, expected: tuple) -> None:
    """params as libxl writes it: a plain path for vbd, <format>:<path> for qdisk and
    vbd3 with aio meaning raw; a format gblk cannot serve is kept (open_store refuses
    it with a clear message) rather than being read as raw."""
    assert parse_params(kind, params) == expected


@pytest.mark.parametrize("params", ["", "   ", "garbage", "raw:", "qcow2"])
def test_parse_params_garbage(params: str) -> None:
    """Unusable params: a NegotiationError naming the problem."""
    with pytest.raises(NegotiationError, match="params"):
        parse_params("qdisk", params)


def test_connect_nodes_with_discard() -> None:
    """Connect-time nodes: sectors (512-byte units), sector sizes, info, features; with
    discard, granularity, alignment and secure always come along."""
    nodes = connect_nodes(2048, 512, 4096, 4, flush=True, barrier=False,
                          discard=(4096, 0, False), persistent=True)
    assert nodes == {
        "sectors": "2048", "sector-size": "512", "physical-sector-size": "4096", "info": "4",
        "feature-flush-cache": "1", "feature-barrier": "0", "feature-persistent": "1",
        "feature-discard": "1", "discard-granularity": "4096", "discard-alignment": "0",
        "discard-secure": "0",
    }


def test_connect_nodes_without_discard() -> None:
    """No discard: feature-discard=0 and no discard parameters."""
    nodes = connect_nodes(8, 512, 512, 0, True, True, None, False)
    assert nodes["feature-discard"] == "0"
    assert "discard-granularity" not in nodes and "discard-alignment" not in nodes


@given(
    sectors=st.integers(0, 2**63), gran=st.integers(512, 2**20), align=st.integers(0, 2**20),
    secure=st.booleans(), discard=st.booleans(), flags=st.tuples(st.booleans(), st.booleans(),
                                                                  st.booleans()),
)
@settings(max_examples=100, deadline=None)
def test_discard_alignment_always_with_feature_discard(
    sectors: int, gran: int, align: int, secure: bool, discard: bool, flags: tuple
) -> None:
    """Whenever feature-discard=1 is written, discard-alignment (omitting it broke Linux
    frontends for years) and discard-granularity are written with it."""
    nodes = connect_nodes(sectors, 512, 512, 0, flags[0], flags[1],
                          (gran, align, secure) if discard else None, flags[2])
    if nodes.get("feature-discard") == "1":
        assert nodes["discard-alignment"] == str(align)
        assert nodes["discard-granularity"] == str(gran)
    assert all(isinstance(v, str) and v for v in nodes.values())


def test_early_nodes() -> None:
    """Before InitWait: max-ring-page-order and queues always; indirect only if offered."""
    nodes = early_nodes(Offer(3, 2, True), 256)
    assert nodes["max-ring-page-order"] == "3"
    assert nodes["multi-queue-max-queues"] == "2"
    assert nodes["feature-max-indirect-segments"] == "256"
    assert "feature-max-indirect-segments" not in early_nodes(OFFER, 0)


def test_paths() -> None:
    """Backend and frontend directories as libxl lays them out."""
    assert backend_path(0, "qdisk", 5, 51712) == "/local/domain/0/backend/qdisk/5/51712"
    assert frontend_path(5, 51712) == "/local/domain/5/device/vbd/51712"


@pytest.mark.parametrize("value, expected", [(None, False), ("1", True), ("0", False),
                                             ("", False), (" 1\n", True)])
def test_parse_bool(value: Optional[str], expected: bool) -> None:
    """XenStore booleans: absent = default, '0' or empty = false."""
    assert parse_bool(value) is expected


@pytest.mark.parametrize("nodes", [
    {"ring-ref": "8", "event-channel": "17", "protocol": "x86_64-abi",
     "feature-persistent": "1"},
    {"multi-queue-num-queues": "1", "ring-ref": "5", "event-channel": "6"},
    _mq(3),
    _mq(4, order=4),
], ids=["classic", "one-queue-old-way", "mq3", "mq4-order4"])
def test_read_many_fetches_in_two_batches_with_the_same_result(nodes: Dict[str, str]) -> None:
    """With ``read_many`` the layout comes in one batch and every queue's nodes in a
    second (two round trips instead of one per node), and nothing is read alone;
    the result is what one read after another gives."""
    batches: List[List[str]] = []
    single: List[str] = []

    def read_many(keys: Sequence[str]) -> List[Optional[str]]:
        batches.append(list(keys))
        return [nodes.get(k) for k in keys]

    def read(key: str) -> Optional[str]:
        single.append(key)
        return nodes.get(key)

    assert parse_frontend(read, OFFER, read_many=read_many) == parse_frontend(
        reader(nodes), OFFER)
    assert len(batches) == 2 and not single
    assert set(batches[1]) >= {k for k in nodes if "ring-ref" in k or "event-channel" in k
                               } - set(batches[0])
