"""Fuzzing the request path through the real daemon (hypothesis): arbitrary ring
slots (every op code, segment counts, sectors, grant refs good and bad, sector
bounds), arbitrary INDIRECT descriptor pages, in batches, against a real ``gblk
serve`` on the simulated host.

For every batch: each request is answered exactly once (the simulated frontend
counts duplicates, unknown ids, nonzero padding) with OKAY, ERROR or EOPNOTSUPP;
nothing outside the requests is touched (the guest's pages keep their canary bytes
except inside the sectors of READ segments, and the part of the disk no request can
reach stays zero); the daemon keeps serving and logs no failure of its own.

The CI run is short (``FUZZ_EXAMPLES`` batches, a few seconds); a long run by hand:
``GBLK_FUZZ_EXAMPLES=5000 pytest tests/integration/test_fuzz_requests.py -m hostile``
(docs/testing.md). The in-process, coverage-guided target of the same path is
``python -m tests.fuzz_request_path`` (atheris).
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, List, Set, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gblk.blkif.abi import Request, Segment, pack_indirect_segments, parse_indirect_segments
from gblk.blkif.const import PAGE_SIZE, Op, Status
from gblk.sim.harness.host import SimHost

from .backend_support import file_bytes
from .hostile_support import WAIT, Daemon, check_clean, launch, make_guest

pytestmark = pytest.mark.hostile

FUZZ_EXAMPLES = int(os.environ.get("GBLK_FUZZ_EXAMPLES", "25"))
CANARY = 0xC5
DATA_PAGES = 12
IND_PAGES = 2
MiB = 1 << 20
DISK = 8 * MiB
#: requests reach at most sector 4096 + 4096 segments * 8: past this the disk stays zero
UNTOUCHED_FROM = 6 * MiB // 512
STATUSES = {int(Status.OKAY), int(Status.ERROR), int(Status.EOPNOTSUPP)}


class Rig:
    def __init__(self, host: SimHost, daemon: Daemon) -> None:
        self.host = host
        self.daemon = daemon
        self.guest = make_guest(host, size=DISK, max_ring_page_order=0, max_queues=1)
        fe = self.fe = self.guest.frontend
        mem = fe.memory
        self.frames: Dict[int, int] = {}  # gref -> frame
        for _ in range(DATA_PAGES + IND_PAGES):
            frame = mem.alloc_page()
            self.frames[mem.grant(frame, fe.backend_id)] = frame
        refs = list(self.frames)
        self.data_refs = refs[:DATA_PAGES]
        self.ind_refs = refs[DATA_PAGES:]
        UNGRANTED[:] = [mem.grant_entries]


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with SimHost() as host:
        d = launch(host, "fuzz", '[daemon]\nkinds = ["qdisk"]\n')
        try:
            yield Rig(host, d)
        finally:
            d.stop()


# -- strategies ----------------------------------------------------------------------
OPS = st.one_of(st.sampled_from([int(o) for o in (Op.READ, Op.WRITE, Op.WRITE_BARRIER,
                                                   Op.FLUSH_DISKCACHE, Op.DISCARD, Op.INDIRECT)]),
                st.integers(0, 255))
#: in reach, or past the end of the disk (never in the part that must stay zero)
SECTORS = st.one_of(st.integers(0, 4095), st.integers(DISK // 512, 2**64 - 1),
                    st.sampled_from([2**63, 2**64 - 1, DISK // 512, 2**64 - 8]))
SECT = st.one_of(st.integers(0, 7), st.integers(0, 255))


#: grant refs the guest has not granted (set from the guest's grant table size)
UNGRANTED: List[int] = []


def grefs(rig_refs: List[int]) -> st.SearchStrategy[int]:
    """The test's own grants, or refs nobody granted (ref 0, past the table): never a
    grant of the simulated frontend itself (its ring, its own data pages)."""
    return st.one_of(st.sampled_from(rig_refs), st.just(0),
                     st.integers(UNGRANTED[0], 2**32 - 1))


@st.composite
def request(draw: st.DrawFn, data_refs: List[int], ind_refs: List[int]) -> Tuple[int, Dict]:
    op = draw(OPS)
    spec: Dict = {"op": op, "sector": draw(SECTORS)}
    if op == Op.INDIRECT:
        spec["indirect_op"] = draw(st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 255)))
        spec["nr"] = draw(st.one_of(st.integers(0, 40), st.integers(0, 0xFFFF)))
        spec["pages"] = draw(st.lists(grefs(ind_refs), min_size=1, max_size=8))
        spec["descriptors"] = draw(st.lists(st.tuples(grefs(data_refs), SECT, SECT),
                                            min_size=0, max_size=40))
        if draw(st.booleans()):  # well formed: the descriptors valid, nr matching
            spec["descriptors"] = [(draw(st.sampled_from(data_refs)), 0, 7)
                                   for _ in range(draw(st.integers(1, 40)))]
            spec["nr"] = len(spec["descriptors"])
            spec["indirect_op"] = draw(st.sampled_from([int(Op.READ), int(Op.WRITE)]))
            spec["pages"] = [ind_refs[0]]
            spec["junk"] = b""
        spec["junk"] = draw(st.binary(max_size=64))
    elif op == Op.DISCARD:
        spec["nr_sectors"] = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1)))
        spec["flag"] = draw(st.integers(0, 255))
    elif draw(st.booleans()):  # well formed: mostly served, so a stray write would show
        segs = draw(st.lists(st.tuples(st.sampled_from(data_refs), st.integers(0, 7),
                                       st.integers(0, 7)).map(
            lambda t: (t[0], min(t[1], t[2]), max(t[1], t[2]))), min_size=1, max_size=11))
        spec.update(op=draw(st.sampled_from([int(Op.READ), int(Op.WRITE)])), nr=len(segs),
                    segments=segs, sector=draw(st.integers(0, 4095)))
    else:
        spec["nr"] = draw(st.one_of(st.integers(0, 11), st.integers(0, 255)))
        spec["segments"] = draw(st.lists(st.tuples(grefs(data_refs), SECT, SECT),
                                         min_size=0, max_size=11))
    return spec["op"], spec


# -- the property ----------------------------------------------------------------------
def _place(rig: Rig, spec: Dict, touched: Set[Tuple[int, int]]):
    """The raw slot for ``spec``; adds (gref, sector in page) a READ may write to ``touched``
    (an INDIRECT READ's: by the caller, once every request of the batch is placed)."""
    fe = rig.fe
    abi = fe.abi
    rid = fe.new_id()
    op = spec["op"]
    if op == Op.INDIRECT:
        segs = tuple(Segment(g, f, la) for g, f, la in spec["descriptors"])
        raw = pack_indirect_segments(segs) + spec["junk"]
        # the descriptors go into the first of the request's indirect pages that the
        # guest owns; arbitrary bytes after them
        mine = [g for g in spec["pages"] if g in rig.ind_refs]
        for i, g in enumerate(dict.fromkeys(mine)):
            page = fe.memory.page(rig.frames[g])
            page[:] = raw[i * PAGE_SIZE:(i + 1) * PAGE_SIZE].ljust(PAGE_SIZE, b"\0")
        req = Request(op, rid, nr_segments=spec["nr"] & 0xFFFF, handle=fe.handle,
                      sector_number=spec["sector"], indirect_op=spec["indirect_op"],
                      indirect_grefs=tuple(spec["pages"]))
    elif op == Op.DISCARD:
        req = Request(op, rid, handle=fe.handle, sector_number=spec["sector"],
                      nr_sectors=spec["nr_sectors"], flag=spec["flag"])
    else:
        segs = tuple(Segment(g, f, la) for g, f, la in spec["segments"])
        req = Request(op, rid, nr_segments=spec["nr"], handle=fe.handle,
                      sector_number=spec["sector"], segments=segs)
        if op == Op.READ:
            for s in segs[:spec["nr"]]:
                _touch(touched, s)
    raw = abi.pack_request(req)
    return rid, fe.put_raw(raw, push=False, expect_id=rid)


def _touch(touched: Set[Tuple[int, int]], s: Segment) -> None:
    if s.first_sect <= s.last_sect <= 7:
        for sect in range(s.first_sect, s.last_sect + 1):
            touched.add((s.gref, sect))


def _batches(draw_refs):
    return st.lists(request(*draw_refs), min_size=1, max_size=8)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_batches_are_answered_once_and_touch_nothing_else(rig: Rig, data: st.DataObject) -> None:
    fe = rig.fe
    batch = data.draw(_batches((rig.data_refs, rig.ind_refs)))
    for g in rig.data_refs:
        fe.memory.page(rig.frames[g])[:] = bytes([CANARY]) * PAGE_SIZE
    touched: Set[Tuple[int, int]] = set()
    placed = [_place(rig, spec, touched) for _, spec in batch]
    # an INDIRECT READ's descriptors as the daemon will find them: a later request of the
    # batch may have rewritten the same indirect page (the guest's right: it is read
    # when the request is served)
    for _, spec in batch:
        if spec["op"] == Op.INDIRECT and spec["indirect_op"] == Op.READ:
            joined = b"".join(bytes(fe.memory.page(rig.frames[g])) if g in rig.ind_refs
                              else b"\0" * PAGE_SIZE for g in spec["pages"])
            for seg in parse_indirect_segments(joined, min(spec["nr"], len(joined) // 8)):
                _touch(touched, seg)
    fe.push(0)
    for (_op, spec), (rid, result) in zip(batch, placed):
        rsp = result.get(timeout=WAIT)
        assert rsp is not None, f"request {spec} never answered"
        assert rsp.id == rid
        assert rsp.status in STATUSES, (spec, rsp)
    check_clean(fe)  # each response once, known ids, zero padding
    for g in rig.data_refs:
        page = bytes(fe.memory.page(rig.frames[g]))
        for sect in range(8):
            if (g, sect) in touched:
                continue
            assert page[sect * 512:(sect + 1) * 512] == bytes([CANARY]) * 512, \
                f"gref {g} sector {sect} written outside every READ segment: {batch}"
    assert file_bytes(rig.guest.image, UNTOUCHED_FROM, 64) == bytes(64 * 512)
    rig.daemon.assert_sane()


def test_after_fuzzing_the_disk_still_works(rig: Rig) -> None:
    """Run after the fuzzing (same module daemon): verified IO, nothing halted."""
    from .backend_support import pattern

    fe = rig.fe
    fe.write(2048, pattern(3, 16 * 512))
    assert fe.read(2048, 16) == pattern(3, 16 * 512)
    rig.daemon.assert_sane()
