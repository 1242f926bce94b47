"""Coverage-guided fuzzing of the request path, in process (atheris, by hand).

The input is one ring slot (either ABI) and the contents of its indirect pages; it
goes through what the ring greenlet does with a slot: ``Abi.parse_request``, the
header checks (``gblk.blkif.validate``), the indirect descriptors
(``parse_indirect_segments``), ``check_segments``, then the job that serves it
(``gblk.engine.jobs.run_request`` / ``run_indirect``, every page path) against a
fake guest grant table and a real raw image. Checked for every input: nothing but
``InvalidRequest`` comes out of the checks; a job's outcome is OKAY, ERROR or
EOPNOTSUPP; no byte of a guest page outside a READ's segments is written; every
grant the job mapped is unmapped (or handed back to the persistent cache).

Run by hand (docs/testing.md), for as long as you like::

    pip install atheris
    python -m tests.fuzz_request_path -atheris_runs=200000
    python -m tests.fuzz_request_path -max_total_time=600

``check_one`` is also what ``tests/unit/test_fuzz_request_path.py`` runs for a few
seconds in the normal test run (hypothesis feeds it, where atheris is absent).
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import List, Tuple

from gblk.blkif.abi import X86_32, X86_64, indirect_segment_tuples
from gblk.blkif.const import Op, Status
from gblk.blkif.validate import DiskLimits, check_header, check_segments, indirect_pages
from gblk.engine import jobs
from gblk.errors import InvalidRequest
from gblk.storage import open_store

from .unit.test_jobs import DOMID, SENTINEL, FakeGrantTable, Guest

PAGE = 4096
NPAGES = 16
DISK_BYTES = 256 * 1024
STATUSES = (int(Status.OKAY), int(Status.ERROR), int(Status.EOPNOTSUPP))
MODES = (jobs.MODE_PERSISTENT, jobs.MODE_MAP, jobs.MODE_COPY)


class Harness:
    """One fake guest (NPAGES granted pages, refs 8..), one image, reused by every input."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="gblk-fuzz-")
        self.guest = Guest(NPAGES)
        self.gt = FakeGrantTable(self.guest)
        path = os.path.join(self.dir, "disk.img")
        with open(path, "wb") as f:
            f.truncate(DISK_BYTES)
        self.store = open_store("raw", path, readonly=False)
        self.limits = DiskLimits(sectors=DISK_BYTES // 512, max_indirect_segments=256)
        self.refs = [self.guest.grant(frame) for frame in range(NPAGES)]
        self.ctx = {m: jobs.JobContext(self.gt, self.store, DOMID, self.limits, m) for m in MODES}

    def check_one(self, data: bytes) -> None:
        if len(data) < 2:
            return
        abi = X86_64 if data[0] & 1 else X86_32
        mode = MODES[(data[0] >> 1) % len(MODES)]
        slot = data[1:1 + abi.req_size].ljust(abi.req_size, b"\0")
        rest = data[1 + abi.req_size:]
        # grant refs in the input land on the guest's pages often enough to matter
        req = abi.parse_request(slot)
        for r in self.refs:
            self.guest.fill(r, bytes([SENTINEL]) * PAGE)
        try:
            check_header(req, self.limits)
        except InvalidRequest:
            return
        op = req.operation
        ctx = self.ctx[mode]
        if op == Op.INDIRECT:
            refs = list(req.indirect_grefs[:indirect_pages(req.nr_segments)])
            for i, r in enumerate(refs):  # the descriptor pages' contents from the input
                if r in self.refs:
                    self.guest.fill(r, rest[i * PAGE:(i + 1) * PAGE].ljust(PAGE, b"\0"))
            raw = b"".join(self.guest.page(r) if r in self.refs else b"\0" * PAGE for r in refs)
            segs = indirect_segment_tuples(raw, req.nr_segments)
            try:
                check_segments(req.sector_number, segs, self.limits)
            except InvalidRequest:
                segs = []
            out = jobs.run_indirect(ctx, req.indirect_op, refs, req.nr_segments,
                                    req.sector_number, {})
            reads = segs if req.indirect_op == Op.READ else []
            skip = set(refs)
        elif op in (Op.READ, Op.WRITE, Op.FLUSH_DISKCACHE, Op.WRITE_BARRIER):
            segs = list(req.segments[:req.nr_segments])
            if segs:
                try:
                    check_segments(req.sector_number, segs, self.limits)
                except InvalidRequest:
                    return
            direction = Op.READ if op == Op.READ else Op.WRITE
            out = jobs.run_request(ctx, direction, segs, req.sector_number, {},
                                   op != Op.READ and op != Op.WRITE, False)
            reads = segs if op == Op.READ else []
            skip = set()
        elif op == Op.DISCARD:
            out = jobs.run_discard(ctx, req.sector_number, req.nr_sectors, bool(req.flag & 1))
            reads, skip = [], set()
        else:
            return
        assert out.status in STATUSES, out.status
        self._untouched(reads, skip)
        jobs.unmap_all(list(out.new_grants.values()))
        assert self.gt.live == 0, f"{self.gt.live} guest pages still mapped"

    def _untouched(self, reads: List[Tuple[int, int, int]], skip: set) -> None:
        allowed = {(g, s) for g, first, last in reads for s in range(first, last + 1)}
        for r in self.refs:
            if r in skip:
                continue
            page = self.guest.page(r)
            for s in range(8):
                if (r, s) not in allowed:
                    assert page[s * 512:(s + 1) * 512] == bytes([SENTINEL]) * 512, (r, s)


def main() -> None:
    import atheris  # type: ignore[import-not-found]

    h = Harness()
    atheris.Setup(sys.argv, h.check_one)
    atheris.Fuzz()


if __name__ == "__main__":
    import atheris  # type: ignore[import-not-found]

    atheris.instrument_all()  # gblk's modules are imported already: instrument them now
    main()
