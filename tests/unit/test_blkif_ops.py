"""The operations' table (gblk.blkif.ops) is what the checks, the parser and the
metric labels read: each row's promises hold through ``check_header`` and the ABI."""

from __future__ import annotations

import dataclasses

import pytest

from gblk.blkif import ops
from gblk.blkif import reasons as R
from gblk.blkif.abi import X86_32, X86_64, Request, Segment
from gblk.blkif.const import Op
from gblk.blkif.validate import DiskLimits, check_header
from gblk.engine.stats import OPS
from gblk.errors import InvalidRequest

FULL = DiskLimits(sectors=1 << 20, discard_secure=True, max_indirect_segments=256)
FIELDS = {f.name for f in dataclasses.fields(DiskLimits)}


def _request(spec: ops.OpSpec, nseg: int, inner: int = Op.WRITE) -> Request:
    segs = tuple(Segment(10 + i, 0, 7) for i in range(min(nseg, 11)))
    if spec.layout is ops.Layout.DISCARD:
        return Request(spec.code, 7, sector_number=8, nr_sectors=8)
    if spec.layout is ops.Layout.INDIRECT:
        return Request(spec.code, 7, nr_segments=nseg, sector_number=8, indirect_op=inner,
                       indirect_grefs=(1,) + (0,) * 7)
    return Request(spec.code, 7, nr_segments=nseg, sector_number=8, segments=segs)


def _reason(req: Request, lim: DiskLimits) -> str:
    try:
        check_header(req, lim)
    except InvalidRequest as e:
        return e.reason
    return "ok"


def test_every_op_of_the_header_has_a_row_and_every_label_is_a_metric_label():
    assert {s.code for s in ops.TABLE} == set(Op) - {Op.RESERVED_1}
    assert OPS == ops.LABELS and OPS[-1] == ops.UNSUPPORTED_LABEL
    assert ops.label_of(Op.INDIRECT) == ops.UNSUPPORTED_LABEL  # counted as its indirect_op
    for spec in ops.TABLE:
        assert spec.offered_by is None or spec.offered_by in FIELDS, spec


@pytest.mark.parametrize("spec", ops.TABLE, ids=lambda s: s.label)
def test_a_row_is_what_check_header_does(spec):
    nseg = max(spec.segments[0], 1) if spec.segments[1] else 0
    assert _reason(_request(spec, nseg), FULL) == "ok"
    if spec.offered_by is not None:
        off = dataclasses.replace(FULL, **{spec.offered_by: type(getattr(FULL, spec.offered_by))()})
        assert _reason(_request(spec, nseg), off) == R.UNSUPPORTED_OP
    readonly = dataclasses.replace(FULL, readonly=True)
    refused = spec.writes or spec.layout is ops.Layout.INDIRECT  # an indirect WRITE
    assert _reason(_request(spec, nseg), readonly) == (R.READ_ONLY if refused else "ok")
    if spec.layout is ops.Layout.SEGMENTS:
        assert _reason(_request(spec, spec.segments[1] + 1), FULL) == R.INVALID_SEGMENT_COUNT
        if spec.segments[0]:
            assert _reason(_request(spec, 0), FULL) == R.INVALID_SEGMENT_COUNT


def test_only_payload_ops_ride_in_an_indirect_request():
    ind = ops.BY_CODE[Op.INDIRECT]
    for code in range(256):
        inner = ops.BY_CODE.get(code)
        ok = inner is not None and inner.indirect_payload
        assert (_reason(_request(ind, 16, inner=code), FULL) == "ok") == ok, code


@pytest.mark.parametrize("abi", [X86_64, X86_32], ids=lambda a: a.name)
@pytest.mark.parametrize("spec", ops.TABLE, ids=lambda s: s.label)
def test_the_abi_parses_each_op_by_its_layout(abi, spec):
    req = _request(spec, 3 if spec.segments[1] else 0)
    assert abi.parse_request(abi.pack_request(req)) == req
