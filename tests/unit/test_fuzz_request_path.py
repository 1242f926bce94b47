"""The in-process request-path fuzz target (tests/fuzz_request_path.py) for a few
seconds in the normal test run, fed by hypothesis (atheris runs it by hand, for
long, coverage-guided: docs/testing.md)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gblk.blkif.abi import X86_64, Request, Segment
from gblk.blkif.const import Op

from ..fuzz_request_path import Harness

pytestmark = pytest.mark.hostile

EXAMPLES = int(os.environ.get("GBLK_FUZZ_EXAMPLES", "100"))
_H = []


def harness() -> Harness:
    if not _H:
        _H.append(Harness())
    return _H[0]


@st.composite
def shaped(draw: st.DrawFn) -> bytes:
    """A slot close to a valid one (the checks pass often), then random page bytes."""
    h = harness()
    op = draw(st.sampled_from([int(Op.READ), int(Op.WRITE), int(Op.FLUSH_DISKCACHE),
                               int(Op.INDIRECT), int(Op.DISCARD)]))
    ref = st.one_of(st.sampled_from(h.refs), st.integers(0, 2**32 - 1))
    sect = st.integers(0, 8)
    segs = tuple(Segment(*t) for t in draw(st.lists(st.tuples(ref, sect, sect), max_size=11)))
    req = Request(op, 1, nr_segments=draw(st.integers(0, 300)) if op == Op.INDIRECT else len(segs),
                  sector_number=draw(st.integers(0, 600)), segments=segs,
                  nr_sectors=draw(st.integers(0, 600)),
                  indirect_op=draw(st.sampled_from([0, 1, 7])),
                  indirect_grefs=tuple(draw(st.lists(ref, min_size=1, max_size=8))))
    head = bytes([draw(st.integers(0, 255)) | 1])  # x86_64 layout
    pages = b"".join(
        b"".join(s.gref.to_bytes(4, "little") + bytes([s.first_sect, s.last_sect, 0, 0])
                 for s in draw(st.lists(st.tuples(ref, sect, sect).map(lambda t: Segment(*t)),
                                        max_size=64))) for _ in range(2))
    return head + X86_64.pack_request(req) + pages


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(st.binary(max_size=9000), shaped()))
def test_request_path_fuzz(data: bytes) -> None:
    harness().check_one(data)
