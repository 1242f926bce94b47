"""Hostile guests against gblk's use of guest pages: bad grant refs in any segment
(XSA-361/362/365/371), grants revoked while gblk may use them (XSA-396), reads that
must not touch a page outside their sectors (XSA-403), and abused INDIRECT requests
(descriptor pages full of lies, or not mappable at all).

Every test runs for each of the three page paths: a grant mapped per request
(``map``), the persistent-grant cache (``persistent``) and grant copy (``copy``, a
daemon with ``grant_mode = "copy"``). Nothing may leak: while connected gblk holds
exactly the ring pages and its persistent grants (metrics), and after the guest
closes every grant it ever made can be ended (nothing is still mapped).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Dict, List, Tuple

import pytest

from gblk.blkif.abi import SEGMENT, Request, Segment
from gblk.blkif.const import PAGE_SIZE, Op
from gblk.sim.guest.frontend import IOFailed, NotConnected
from gblk.sim.harness.host import SimHost

from .backend_support import file_bytes, pattern
from .hostile_support import (
    ERROR,
    OKAY,
    WAIT,
    BadGrants,
    Bystander,
    check_clean,
    close_without_leaks,
    dev_metric,
    expect,
    figure,
    grant_balance,
    launch,
    make_guest,
)

#: path -> (backend kind served by the daemon for it, frontend offers persistent grants)
PATHS = {"map": ("qdisk", False), "persistent": ("qdisk", True), "copy": ("vbd3", False)}
INDIRECT_MAX = 1024  # two descriptor pages can be needed


@pytest.fixture(scope="module")
def env():
    with SimHost() as host:
        auto = launch(host, "grants-auto",
                      f'[daemon]\nkinds = ["qdisk"]\n[backend]\nmax_indirect_segments = {INDIRECT_MAX}\n')
        copy = launch(host, "grants-copy",
                      '[daemon]\nkinds = ["vbd3"]\n[backend]\ngrant_mode = "copy"\n'
                      f'max_indirect_segments = {INDIRECT_MAX}\n')
        try:
            by = make_guest(host, max_ring_page_order=0, max_queues=1)
            host.daemons = {"qdisk": auto, "vbd3": copy}
            host.bystander = Bystander(by.frontend)
            yield host
        finally:
            auto.stop()
            copy.stop()


@pytest.fixture(autouse=True)
def after_each(env):
    """After every test: both daemons alive with no failure of their own logged; the
    bystander (on the map/persistent daemon) still served."""
    marks = {k: len(d.log_text()) for k, d in env.daemons.items()}
    yield
    for k, d in env.daemons.items():
        print(f"--- {d.name}\n" + d.log_text()[marks[k]:][-6000:])
        d.assert_sane()
    env.bystander.check_once()


def guest(env, path: str, **opts):
    kind, persistent = PATHS[path]
    g = make_guest(env, kind=kind, max_ring_page_order=0, max_queues=1, persistent=persistent,
                   max_indirect_segments=INDIRECT_MAX, **opts)
    assert g.frontend.disk.persistent == (path == "persistent")
    return g, env.daemons[kind]


def with_gref(k: int, gref: int):
    """A mutate hook: segment ``k`` of the request uses ``gref`` instead."""
    def mutate(req: Request) -> Request:
        segs = list(req.segments)
        segs[k] = Segment(gref, segs[k].first_sect, segs[k].last_sect)
        req.segments = tuple(segs)
        return req
    return mutate


def grant_errors(samples: Dict[str, float], fe) -> float:
    return (dev_metric(samples, "gblk_errors_total", fe, reason="grant_map")
            + dev_metric(samples, "gblk_errors_total", fe, reason="grant_copy"))


# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
def test_xsa361_bad_gref_in_segment_k(env, path):
    """XSA-361/362/365/371: a grant ref gblk cannot use (never granted, past the end
    of the table, 0xffffffff, reserved, granted to another domain, a frame beyond the
    guest's RAM, read-only for a READ) in segment k of n, for several k and n: that
    request alone is answered ERROR (counted once under grant_map/grant_copy), the
    good requests beside it are served and verified, a failed WRITE wrote nothing, the
    page behind the bad grants is untouched, and no mapping leaks (while connected:
    exactly ring pages + persistent grants; after the guest closes: every grant ends)."""
    g, d = guest(env, path)
    fe = g.frontend
    bad = BadGrants(fe)
    shapes = [(1, 0), (2, 1), (11, 0), (11, 5), (11, 10)]
    cases: List[Tuple[str, str, int, int, int, object, object]] = []
    i = 0
    for direction in ("write", "read"):
        refs = bad.for_read() if direction == "read" else bad.for_write()
        for name, gref in refs.items():
            for n, k in shapes:
                sector, good_sector = i * 88, 8192 + i * 88
                i += 1
                if direction == "write":
                    r_bad = fe.submit_write(sector, pattern(i, n * PAGE_SIZE), mutate=with_gref(k, gref))
                    r_good = fe.submit_write(good_sector, pattern(1000 + i, n * PAGE_SIZE))
                else:
                    r_bad = fe.submit_read(sector, n * 8, mutate=with_gref(k, gref))
                    r_good = fe.submit_read(good_sector, n * 8)
                cases.append((direction, name, n, k, sector, r_bad, r_good))
    for direction, name, n, k, sector, r_bad, r_good in cases:
        expect(r_bad, ERROR, f"{direction} with a {name} gref in segment {k} of {n}")
        expect(r_good, OKAY, f"good {direction} beside it")
        if direction == "write":
            assert file_bytes(g.image, sector, n * 8) == bytes(n * PAGE_SIZE), \
                f"a refused write with a {name} gref in segment {k} of {n} wrote data"
    # the good writes really are there
    # (the frontend checks each byte it reads against what it wrote)
    for _direction, _name, n, _k, sector, _, _ in cases[:5]:
        fe.read(8192 + sector, n * 8)
    check_clean(fe)
    assert bad.untouched(), "gblk wrote into a page through a grant it must not use"
    s = d.scrape()
    assert grant_errors(s, fe) == len(cases)
    assert dev_metric(s, "gblk_ring_halted", fe) == 0
    grant_balance(d, fe)
    close_without_leaks(fe, own_grants=bad.own)
    bad.end()
    assert fe.grants_in_use() == 0
    figure(f"xsa361_{path}", f"{len(cases)} requests with a bad gref refused, "
           f"{len(cases)} good ones beside them served")


# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
def test_xsa396_grants_revoked_while_in_use(env, path):
    """XSA-396: the guest revokes grants gblk may still be using: a data grant before
    the request is published, data and descriptor grants at varying moments while
    requests are being served (also persistent grants gblk keeps cached), and the
    ring's own grant. Each request is answered once, OKAY or ERROR; the daemon never
    fails; the device keeps serving or goes Closed cleanly; nothing leaks."""
    g, d = guest(env, path)
    fe = g.frontend
    outcomes: Counter = Counter()
    # warm up: persistent grants get cached
    for i in range(4):
        fe.write(i * 88, pattern(i, 11 * PAGE_SIZE))

    # 1. revoked before the request is published
    r = fe.submit_write(2048, pattern(9, 3 * PAGE_SIZE), push=False)
    (info,) = fe.outstanding_requests()
    fe.revoke_grant(info.grefs[1])
    fe.push(info.queue)
    res = r.get(timeout=WAIT)
    outcomes[res.status] += 1
    if path != "persistent":  # a cached persistent grant stays usable, as on Xen
        assert res.status == ERROR
        assert file_bytes(g.image, 2048, 24) == bytes(3 * PAGE_SIZE)

    # 2. revoked while the request is being served, at varying moments
    for i in range(24):
        sector = 4096 + (i % 8) * 256
        if i % 2:
            r = fe.submit_read(sector, 128 * 8, indirect=True)
        else:
            r = fe.submit_write(sector, pattern(20 + i, 128 * PAGE_SIZE), indirect=True)
        (info,) = [p for p in fe.outstanding_requests() if p.sector == sector]
        delay = (i % 6) * 0.0003
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < delay:
            pass
        for gref in (info.grefs[0], info.grefs[64], info.grefs[-1], *info.indirect_grefs):
            fe.revoke_grant(gref)
        res = r.get(timeout=WAIT)
        assert not res.lost
        assert res.status in (OKAY, ERROR)
        outcomes[res.status] += 1

    # 3. the ring's own grant (gblk has it mapped; on Xen it could not be taken back)
    fe.revoke_grant(fe.queue(0).ring_refs[0])
    try:
        fe.write(0, pattern(77, PAGE_SIZE))
        assert fe.read(0, 8) == pattern(77, PAGE_SIZE) or path == "persistent"
        still_serving = True
    except (IOFailed, NotConnected):
        still_serving = False
        assert g.xs is not None and env.host.backend_state(g) in (5, 6)
    assert fe.stats.violations == {}, fe.stats.violations
    assert fe.stats.grants_busy_after_response == 0
    s = d.scrape()
    assert grant_errors(s, fe) == outcomes[ERROR] - fe.stats.lost
    if still_serving:
        grant_balance(d, fe)
    close_without_leaks(fe)
    figure(f"xsa396_{path}", f"{outcomes[OKAY]} OKAY, {outcomes[ERROR]} ERROR of "
           f"{sum(outcomes.values())} requests with revoked grants; device "
           f"{'kept serving' if still_serving else 'closed'}")


# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
def test_xsa403_read_writes_only_its_sectors(env, path):
    """XSA-403: a READ writes only [first_sect, last_sect] of each page it is given
    (the frontend fills the rest with a canary and checks it), for every partial
    segment of one page, for unaligned multi-page and INDIRECT reads; a partial
    WRITE changes only its sectors on disk. Data is verified byte for byte."""
    g, d = guest(env, path)
    fe = g.frontend
    base = 1024
    fe.write(base, pattern(3, 64 * PAGE_SIZE))
    pending = []
    for first in range(8):
        for n in range(1, 9 - first):
            pending.append(fe.submit_read(base + first, n))
    for sector, n, indirect in [(base + 5, 20, None), (base + 3, 300, None),
                                (base + 1, 6, True), (base + 7, 401, True), (base + 2, 130, False)]:
        pending.append(fe.submit_read(sector, n, indirect=indirect))
    for r in pending:
        res = r.get(timeout=WAIT)
        assert res.ok, res
    assert fe.stats.canary_violations == 0, "a READ wrote outside its sectors"
    # partial writes: only their own sectors change on disk
    wbase = 4096
    fe.write(wbase, pattern(4, 8 * PAGE_SIZE))
    before = bytearray(file_bytes(g.image, wbase, 64))
    for first, n in [(1, 1), (3, 4), (7, 1), (0, 7), (13, 10)]:
        data = pattern(50 + first, n * 512)
        fe.write(wbase + first, data)
        before[first * 512:(first + n) * 512] = data
    assert file_bytes(g.image, wbase, 64) == bytes(before)
    check_clean(fe)
    assert fe.verifier is not None and fe.verifier.sectors_checked > 0
    grant_balance(d, fe)
    close_without_leaks(fe)


# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
def test_indirect_abuse(env, path):
    """INDIRECT requests that lie: nr_segments 0, beyond what was offered, or beyond
    the descriptors actually written; an indirect_op other than READ/WRITE; descriptor
    pages holding bad grant refs, first_sect > last_sect or last_sect > 7 in
    descriptor k; indirect grant refs that cannot be mapped. Each is answered ERROR,
    exactly once, with its id (and its indirect_op); a refused WRITE wrote nothing;
    the device keeps serving and nothing leaks."""
    g, d = guest(env, path)
    fe = g.frontend
    assert fe.max_indirect_segments == INDIRECT_MAX
    bad = BadGrants(fe)
    refused = 0

    def nr(n: int):
        def mutate(req: Request) -> Request:
            assert req.operation == Op.INDIRECT
            req.nr_segments = n
            return req
        return mutate

    def first_page(gref: int):
        def mutate(req: Request) -> Request:
            req.indirect_grefs = (gref,) + tuple(req.indirect_grefs[1:])
            return req
        return mutate

    def second_page(gref: int):
        def mutate(req: Request) -> Request:
            assert len(req.indirect_grefs) == 2
            req.indirect_grefs = (req.indirect_grefs[0], gref)
            return req
        return mutate

    # header lies
    for n in (0, 65, 600, INDIRECT_MAX + 1, 4096, 4097, 65535):
        expect(fe.submit_read(0, 64 * 8, indirect=True, mutate=nr(n)), ERROR, f"nr_segments {n}")
        expect(fe.submit_write(0, pattern(n, 64 * PAGE_SIZE), indirect=True, mutate=nr(n)),
               ERROR, f"nr_segments {n}")
        refused += 2
    # indirect_op other than READ/WRITE: answered with that indirect_op
    q = fe.queue(0)
    for iop in (2, 3, 4, 5, 6, 7, 0x80, 0xFF):
        rid = fe.new_id()
        raw = fe.pack(Request(Op.INDIRECT, rid, nr_segments=1, handle=fe.handle,
                              indirect_op=iop, indirect_grefs=(bad.refs["unused"],)))
        index = q.ring.req_prod_pvt
        rsp = fe.put_raw(raw).get(timeout=WAIT)
        off = q.ring.offset(index)
        got = fe.abi.parse_response(bytes(q.ring.buf[off:off + fe.abi.rsp_size]))
        assert got == (rid, iop, ERROR), (iop, got, rsp)
        refused += 1
    # descriptor pages that lie
    lies = [("gref " + name, lambda s, gref=gref: (gref, s.first_sect, s.last_sect))
            for name, gref in bad.for_read().items() if name != "readonly"]
    lies += [("first > last", lambda s: (s.gref, 5, 2)), ("last_sect 8", lambda s: (s.gref, 0, 8)),
             ("last_sect 255", lambda s: (s.gref, 3, 255))]
    i = 0
    for what, lie in lies:
        for k in (0, 31, 63):
            for direction in ("read", "write"):
                sector = 8192 + (i % 14) * 512
                i += 1
                if direction == "read":
                    r = fe.submit_read(sector, 64 * 8, indirect=True, push=False)
                else:
                    r = fe.submit_write(sector, pattern(i, 64 * PAGE_SIZE), indirect=True, push=False)
                (info,) = fe.outstanding_requests()
                page = fe.memory.page(fe.memory.entry(info.indirect_grefs[0]).frame)
                SEGMENT.pack_into(page, k * SEGMENT.size,
                                  *lie(Segment(*SEGMENT.unpack_from(page, k * SEGMENT.size))))
                fe.push(info.queue)
                expect(r, ERROR, f"{direction}: descriptor {k} with {what}")
                refused += 1
                if direction == "write":
                    assert file_bytes(g.image, sector, 64 * 8) == bytes(64 * PAGE_SIZE), what
    # descriptor pages that cannot be mapped
    for name, gref in bad.for_read().items():
        if name == "readonly":
            continue  # gblk only reads descriptor pages: a read-only grant is right
        expect(fe.submit_read(0, 64 * 8, indirect=True, mutate=first_page(gref)), ERROR,
               f"indirect page {name}")
        expect(fe.submit_write(0, pattern(5, 600 * PAGE_SIZE), indirect=True,
                               mutate=second_page(gref)),
               ERROR, f"second indirect page {name}")
        refused += 2
    assert file_bytes(g.image, 0, 600 * 8) == bytes(600 * PAGE_SIZE)
    check_clean(fe)
    assert bad.untouched()
    # the device still serves, INDIRECT too
    fe.write(0, pattern(6, 600 * PAGE_SIZE))
    assert fe.read(0, 600 * 8) == pattern(6, 600 * PAGE_SIZE)
    s = d.scrape()
    assert dev_metric(s, "gblk_ring_halted", fe) == 0
    grant_balance(d, fe)
    close_without_leaks(fe, own_grants=bad.own)
    bad.end()
    figure(f"indirect_abuse_{path}", f"{refused} lying INDIRECT requests refused, one response each")
