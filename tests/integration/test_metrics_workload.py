"""gblk's metrics match what a simulated guest did: a real ``gblk serve`` process
on the simulated host serves guests, and its ``/metrics`` is scraped over HTTP.

Guards issue 5's "Done when": exact request and byte counts by op for a known
sequence, latency histograms that count every answered request, an injected fault
counted under its reason (invalid_range, unsupported_op, read_only, grant_map),
persistent grants and grant maps/unmaps that balance (no leak), the device state
gauge following the XenBus states, a device's series vanishing when it is
unplugged or its guest destroyed, ``promtool check metrics`` on a real scrape,
and ``/healthz`` answering 200 while gblk serves.

One daemon (``qdisk``, default configuration) serves every guest of the module;
each test uses guests of its own and looks only at their ``domain`` label.
"""

from __future__ import annotations

import subprocess
from typing import Callable, Dict, Iterator, Tuple

import pytest

from .host_tools import require_tool

from gblk.blkif.abi import Request
from gblk.blkif.const import Op, Status
from gblk.sim.guest.frontend import Frontend, FrontendOptions, IoResult
from gblk.sim.harness.host import Guest, SimHost

from .backend_support import metric, metrics_url, pattern, scrape, served_host, start_daemon
from .metrics_support import device_series, eventually, healthz_url, http_get, wait_series_gone

SECTOR = 512
PAGE = 4096
MiB = 1 << 20
OPS = ("read", "write", "barrier", "flush", "discard", "unsupported")
REASONS = ("invalid_segment_count", "invalid_segment", "invalid_range", "invalid_indirect",
           "read_only", "unsupported_op", "io_error", "no_space", "grant_map", "grant_copy", "ring_halted")
#: the daemon's default max_persistent_grants (per ring)
PGRANT_LIMIT_PER_RING = 1056
SECOND_DISK = 51728  # xvdb


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[SimHost, str]]:
    """A simulated host and one gblk daemon serving its qdisk disks; yields the
    host and the daemon's /metrics URL. The host's directory (logs of the daemon and
    xenstored) stays with pytest's temporary directories for a post-mortem."""
    with served_host("gblk", '[daemon]\nkinds = ["qdisk"]\n',
                     dir=str(tmp_path_factory.mktemp("host"))) as (host, _daemon, url):
        yield host, url


def _done(result: object) -> IoResult:
    """The IoResult of a submit_*, which must be OKAY."""
    res = result.get(timeout=60)  # type: ignore[attr-defined]
    assert isinstance(res, IoResult) and res.ok, res
    return res


def _failed(result: object, status: int = Status.ERROR) -> IoResult:
    res = result.get(timeout=60)  # type: ignore[attr-defined]
    assert isinstance(res, IoResult) and res.status == status and not res.lost, res
    return res


def _dev(samples: Dict[str, float], name: str, g: Guest, **labels: str) -> float:
    return metric(samples, name, domain=str(g.domid), device=str(g.disk.devid), **labels)


def _state(url: str, g: Guest) -> float:
    """gblk_device_state of the guest's disk (-1 when it has no series)."""
    samples = scrape(url)
    if not device_series(samples, g.domid, g.disk.devid):
        return -1
    return _dev(samples, "gblk_device_state", g)


def _wait_state(url: str, g: Guest, state: int) -> Dict[str, float]:
    eventually(lambda: _state(url, g), lambda s: s == state, f"d{g.domid} gblk_device_state")
    return scrape(url)


def _ring_pages(fe: Frontend) -> int:
    return len(fe.queues) << fe.ring_page_order


# ----------------------------------------------------------------------------------
# counts, bytes, latency


def _known_sequence(fe: Frontend) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Run a fixed mix of every operation; return the ring requests the frontend
    placed and the bytes moved, by op (bytes of DISCARD: the range discarded)."""
    reqs = dict.fromkeys(OPS, 0)
    nbytes = dict.fromkeys(OPS, 0)

    def count(op: str, res: IoResult, n: int) -> None:
        reqs[op] += res.requests
        nbytes[op] += n

    # a single sector in the middle of a page, 11 segments, 12 segments split into two
    # direct requests, 1 MiB in one INDIRECT request, 2 MiB in two
    for sector, nsect, indirect in ((3, 1, None), (64, 88, None), (256, 96, False),
                                    (4096, 2048, None), (8192, 4096, None)):
        data = pattern(sector, nsect * SECTOR)
        count("write", _done(fe.submit_write(sector, data, indirect=indirect)), len(data))
        res = _done(fe.submit_read(sector, nsect, indirect=indirect))
        assert res.data == data
        count("read", res, len(data))
    # flush without and with data, barrier with and without data
    count("flush", _done(fe.submit_flush()), 0)
    count("flush", _done(fe.submit_flush(16384, pattern(7, 8 * SECTOR))), 8 * SECTOR)
    count("barrier", _done(fe.submit_barrier(16392, pattern(8, 16 * SECTOR))), 16 * SECTOR)
    count("barrier", _done(fe.submit_barrier(0, None)), 0)
    # discard 64 sectors
    count("discard", _done(fe.submit_discard(20480, 64)), 64 * SECTOR)
    # 20 writes, then 20 reads, all in flight at once, spread over the queues
    results = [fe.submit_write(24576 + i * 8, pattern(20 + i, PAGE)) for i in range(20)]
    for r in results:
        count("write", _done(r), PAGE)
    results = [fe.submit_read(24576 + i * 8, 8) for i in range(20)]
    for r in results:
        count("read", _done(r), PAGE)
    assert fe.stats.mismatches == 0 and fe.stats.protocol_violations == 0, fe.stats
    return reqs, nbytes


#: what _known_sequence must place, worked out by hand from how blkfront splits IO
#: (a page per segment; at most 11 segments direct, 256 per INDIRECT request)
EXPECTED_REQUESTS = {"read": 1 + 1 + 2 + 1 + 2 + 20, "write": 1 + 1 + 2 + 1 + 2 + 20,
                     "flush": 2, "barrier": 2, "discard": 1, "unsupported": 0}
_RW_BYTES = (1 + 88 + 96 + 2048 + 4096) * SECTOR + 20 * PAGE
EXPECTED_BYTES = {"read": _RW_BYTES, "write": _RW_BYTES, "flush": 8 * SECTOR,
                  "barrier": 16 * SECTOR, "discard": 64 * SECTOR, "unsupported": 0}


@pytest.fixture(scope="module")
def sequence(served: Tuple[SimHost, str]) -> Tuple[Guest, Dict[str, float]]:
    """A guest (two queues, persistent grants) that ran _known_sequence; the scrape
    taken right after its last answer, while it is still connected."""
    host, url = served
    g = host.create_guest(size=64 * MiB, options=FrontendOptions(max_queues=2, initial_zero=True))
    assert len(g.frontend.queues) == 2 and g.frontend.persistent
    assert g.frontend.max_indirect_segments == 256
    reqs, nbytes = _known_sequence(g.frontend)
    assert reqs == EXPECTED_REQUESTS and nbytes == EXPECTED_BYTES  # the frontend agrees
    return g, scrape(url)


def test_request_counts_by_op_are_exact(sequence: Tuple[Guest, Dict[str, float]]) -> None:
    """gblk_requests_total{op} is exactly the number of ring requests the guest placed
    per op (an INDIRECT request counts once, as the op it carries)."""
    g, samples = sequence
    got = {op: _dev(samples, "gblk_requests_total", g, op=op) for op in OPS}
    assert got == EXPECTED_REQUESTS


def test_byte_counts_of_data_ops_are_exact(sequence: Tuple[Guest, Dict[str, float]]) -> None:
    """gblk_bytes_total{op} of read, write, flush and barrier is exactly the data the
    guest moved with each (flush and barrier without data move nothing)."""
    g, samples = sequence
    for op in ("read", "write", "flush", "barrier", "unsupported"):
        assert _dev(samples, "gblk_bytes_total", g, op=op) == EXPECTED_BYTES[op], op


def test_discard_bytes_are_the_range_discarded(sequence: Tuple[Guest, Dict[str, float]]) -> None:
    """monitoring/README.md: gblk_bytes_total{op="discard"} is the bytes discarded, so a
    throughput panel shows discards too (64 sectors here)."""
    g, samples = sequence
    assert _dev(samples, "gblk_bytes_total", g, op="discard") == 64 * SECTOR


def test_latency_histograms_count_every_request(sequence: Tuple[Guest, Dict[str, float]]) -> None:
    """Each op's latency histogram has exactly one observation per answered request
    (_count, and the +Inf bucket), buckets are cumulative, and time was spent."""
    g, samples = sequence
    for op, n in EXPECTED_REQUESTS.items():
        if n == 0:
            continue
        assert _dev(samples, "gblk_request_duration_seconds_count", g, op=op) == n, op
        assert _dev(samples, "gblk_request_duration_seconds_bucket", g, op=op, le="+Inf") == n, op
        assert _dev(samples, "gblk_request_duration_seconds_sum", g, op=op) > 0, op
        buckets = sorted(
            (float(le), v) for key, v in samples.items()
            if key.startswith("gblk_request_duration_seconds_bucket{")
            and f'domain="{g.domid}"' in key and f'op="{op}"' in key
            for le in [key.split('le="')[1].split('"')[0]] if le != "+Inf")
        counts = [v for _, v in buckets]
        assert len(counts) == 16 and counts == sorted(counts) and counts[-1] <= n, (op, buckets)


def test_batches_in_flight_and_errors_after_a_clean_run(sequence: Tuple[Guest, Dict[str, float]]) -> None:
    """Every request was taken off the ring in some batch (the batch histogram's sum is
    the request total), nothing is in flight or pending once the guest has its answers,
    no error of any reason was counted, and the disk shows its size and connection."""
    g, samples = sequence
    total = sum(EXPECTED_REQUESTS.values())
    assert _dev(samples, "gblk_batch_requests_sum", g) == total
    assert 1 <= _dev(samples, "gblk_batch_requests_count", g) <= total
    assert _dev(samples, "gblk_requests_in_flight", g) == 0
    assert _dev(samples, "gblk_ring_requests_pending", g) == 0
    assert _dev(samples, "gblk_ring_halted", g) == 0
    for reason in REASONS:
        assert _dev(samples, "gblk_errors_total", g, reason=reason) == 0, reason
    assert _dev(samples, "gblk_device_size_bytes", g) == 64 * MiB
    assert _dev(samples, "gblk_device_connected", g) == 1
    assert _dev(samples, "gblk_device_state", g) == 4
    # one ring series per queue, the ring's slot count as negotiated
    slots = [k for k in device_series(samples, g.domid) if k.startswith("gblk_ring_slots{")]
    assert sorted(k.split('queue="')[1].split('"')[0] for k in slots) == ["0", "1"]
    assert all(samples[k] > 0 for k in slots)
    assert _dev(samples, "gblk_notifications_received_total", g) >= 1
    assert _dev(samples, "gblk_notifications_sent_total", g) >= 1


# ----------------------------------------------------------------------------------
# injected faults


def _past_the_end(fe: Frontend) -> Callable[[Request], Request]:
    """A mutate hook moving the request so that it ends 4 sectors past the disk's end."""
    def mutate(req: Request) -> Request:
        length = req.nr_sectors if req.operation == Op.DISCARD else 8
        req.sector_number = fe.disk.sectors - length + 4
        return req
    return mutate


def _inject_invalid_range(host: SimHost, g: Guest) -> Dict[str, int]:
    fe = g.frontend
    _failed(fe.submit_read(0, 8, mutate=_past_the_end(fe)))
    _failed(fe.submit_discard(0, 16, mutate=_past_the_end(fe)))
    return {"read": 1, "discard": 1}


def _inject_unsupported_op(host: SimHost, g: Guest) -> Dict[str, int]:
    fe = g.frontend
    for op in (Op.RESERVED_1, 0x7F):
        r = fe.put_raw(fe.pack(Request(op, fe.new_id(), handle=fe.handle)))
        assert r is not None
        rsp = r.get(timeout=60)
        assert rsp is not None and rsp.status == Status.EOPNOTSUPP and rsp.operation == op, rsp
    return {"unsupported": 2}


def _inject_read_only(host: SimHost, g: Guest) -> Dict[str, int]:
    fe = g.frontend
    assert fe.disk.readonly
    _failed(fe.submit_write(0, pattern(1, PAGE)))
    _failed(fe.submit_write(0, pattern(2, 64 * PAGE)))  # INDIRECT
    _failed(fe.submit_flush(8, pattern(3, PAGE)))
    return {"write": 2, "flush": 1}


def _inject_grant_map(host: SimHost, g: Guest) -> Dict[str, int]:
    fe = g.frontend
    r = fe.submit_write(0, pattern(4, 2 * PAGE), push=False)
    (info,) = fe.outstanding_requests()
    fe.revoke_grant(info.grefs[1])
    fe.push(info.queue)
    _failed(r)
    return {"write": 1}


#: reason -> (how many, attach options, frontend options, injection)
FAULTS: Dict[str, Tuple[int, Dict[str, str], FrontendOptions, Callable[[SimHost, Guest], Dict[str, int]]]] = {
    "invalid_range": (2, {}, FrontendOptions(initial_zero=True), _inject_invalid_range),
    "unsupported_op": (2, {}, FrontendOptions(initial_zero=True), _inject_unsupported_op),
    "read_only": (3, {"mode": "r"}, FrontendOptions(initial_zero=True), _inject_read_only),
    "grant_map": (1, {}, FrontendOptions(persistent=False, initial_zero=True), _inject_grant_map),
}


@pytest.mark.parametrize("reason", list(FAULTS))
def test_an_injected_fault_is_counted_under_its_reason(served: Tuple[SimHost, str], reason: str) -> None:
    """A request the guest got wrong is answered with an error, counted once under its
    reason (and under no other), counted as a request of its op with its latency but
    no bytes; the disk stays connected and serves the next request."""
    host, url = served
    count, attach, options, inject = FAULTS[reason]
    g = host.create_guest(size=16 * MiB, options=options, **attach)
    fe = g.frontend
    faulty = inject(host, g)
    samples = scrape(url)
    for r in REASONS:
        assert _dev(samples, "gblk_errors_total", g, reason=r) == (count if r == reason else 0), r
    for op in OPS:
        n = faulty.get(op, 0)
        assert _dev(samples, "gblk_requests_total", g, op=op) == n, op
        assert _dev(samples, "gblk_bytes_total", g, op=op) == 0, op
        if n:
            assert _dev(samples, "gblk_request_duration_seconds_count", g, op=op) == n, op
    assert _dev(samples, "gblk_ring_halted", g) == 0
    assert _dev(samples, "gblk_device_state", g) == 4
    # the disk carries on
    assert fe.read(0, 8) == bytes(PAGE)
    samples = scrape(url)
    assert _dev(samples, "gblk_requests_total", g, op="read") == faulty.get("read", 0) + 1
    assert _dev(samples, "gblk_bytes_total", g, op="read") == PAGE
    assert fe.stats.mismatches == 0
    host.destroy_guest(g)


# ----------------------------------------------------------------------------------
# grants


def _grants(url: str, g: Guest) -> Tuple[float, float, float]:
    s = scrape(url)
    return (_dev(s, "gblk_grant_maps_total", g), _dev(s, "gblk_grant_unmaps_total", g),
            _dev(s, "gblk_persistent_grants", g))


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "map"])
def test_grants_balance_while_connected(served: Tuple[SimHost, str], persistent: bool) -> None:
    """While a disk is connected and idle, every grant gblk mapped is unmapped except
    the ring pages and the persistent grants it keeps (gauge > 0 only with persistent
    grants, within the limit, which is per ring); nothing was evicted."""
    host, url = served
    g = host.create_guest(size=16 * MiB, options=FrontendOptions(
        max_queues=2, persistent=persistent, initial_zero=True))
    fe = g.frontend
    for i in range(8):
        fe.write(i * 64, pattern(i, 40 * PAGE))
        assert fe.read(i * 64, 320) == pattern(i, 40 * PAGE)
    samples = scrape(url)
    maps, unmaps, pgrants = _grants(url, g)
    assert maps > 0
    assert maps - unmaps == _ring_pages(fe) + pgrants
    limit = _dev(samples, "gblk_persistent_grants_limit", g)
    if persistent:
        assert limit == PGRANT_LIMIT_PER_RING * len(fe.queues)
        assert 0 < pgrants <= limit
    else:
        assert limit == 0 and pgrants == 0
    assert _dev(samples, "gblk_persistent_grant_evictions_total", g) == 0
    host.destroy_guest(g)


@pytest.mark.parametrize("segments", [32, 256], ids=["32-segments", "256-segments"])
def test_warm_indirect_requests_map_no_grants(served: Tuple[SimHost, str], segments: int) -> None:
    """With persistent grants, INDIRECT requests stop mapping grants once warm: the
    descriptor pages are cached like the data pages (Linux's blkfront takes both
    from its persistent pool and blkback keeps both), so a warm request costs no
    grant map, no unmap and, for the descriptors, no thread handoff."""
    host, url = served
    g = host.create_guest(size=16 * MiB, options=FrontendOptions(
        initial_zero=True, force_indirect=True, max_indirect_segments=segments, max_queues=1))
    fe = g.frontend  # one queue: the cache is per ring, as in blkback
    assert fe.max_indirect_segments == segments
    fe.write(0, pattern(0, segments * PAGE))  # warm-up: maps the pool's pages once
    warm = _grants(url, g)
    assert warm[2] == segments + -(-segments // 512)  # data pages + descriptor pages
    for i in range(1, 6):
        fe.write(i * 8 * segments, pattern(i, segments * PAGE))
        assert fe.read(i * 8 * segments, 8 * segments) == pattern(i, segments * PAGE)
    samples = scrape(url)
    assert _dev(samples, "gblk_requests_total", g, op="write") == 6
    assert _dev(samples, "gblk_requests_total", g, op="read") == 5
    assert _grants(url, g) == warm
    assert fe.stats.mismatches == 0
    host.destroy_guest(g)


def test_persistent_grants_drop_to_zero_after_disconnect(served: Tuple[SimHost, str]) -> None:
    """When the guest disconnects, gblk unmaps its persistent grants: the gauge goes
    back to 0 and the guest can end every grant it gave."""
    host, url = served
    g = host.create_guest(size=16 * MiB, options=FrontendOptions(initial_zero=True))
    fe = g.frontend
    fe.write(0, pattern(1, 32 * PAGE))
    assert _grants(url, g)[2] > 0
    fe.close()
    _wait_state(url, g, 6)
    assert _grants(url, g)[2] == 0
    assert fe.stats.grant_leaks == 0
    host.destroy_guest(g)


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "map"])
def test_grant_maps_equal_unmaps_after_disconnect(served: Tuple[SimHost, str], persistent: bool) -> None:
    """After the guest disconnects, the disk (still plugged, Closed) shows as many grant
    unmaps as maps, and the maps of its connection are still counted: counters of a
    disk whose series stay do not go back, and a leak would show as maps > unmaps."""
    host, url = served
    g = host.create_guest(size=16 * MiB, options=FrontendOptions(persistent=persistent, initial_zero=True))
    fe = g.frontend
    fe.write(0, pattern(1, 32 * PAGE))
    assert fe.read(0, 256) == pattern(1, 32 * PAGE)
    maps_connected = _grants(url, g)[0]
    assert maps_connected > 0
    fe.close()
    samples = _wait_state(url, g, 6)
    maps, unmaps = _dev(samples, "gblk_grant_maps_total", g), _dev(samples, "gblk_grant_unmaps_total", g)
    assert fe.stats.grant_leaks == 0
    assert maps == unmaps and maps >= maps_connected, (maps, unmaps, maps_connected)
    host.destroy_guest(g)


# ----------------------------------------------------------------------------------
# device state and series lifetime


def test_device_state_follows_the_xenbus_states(served: Tuple[SimHost, str]) -> None:
    """gblk_device_state is InitWait (2) before the guest connects, Connected (4) once
    it has, Closed (6) after the guest closes, Connected again after it reconnects
    (gblk_reconnects_total 1); gblk_device_connected follows."""
    host, url = served
    g = host.create_guest(size=16 * MiB, connect=False)
    fe = g.frontend
    samples = _wait_state(url, g, 2)
    assert _dev(samples, "gblk_device_connected", g) == 0
    fe.connect()
    samples = _wait_state(url, g, 4)
    assert _dev(samples, "gblk_device_connected", g) == 1
    assert _dev(samples, "gblk_reconnects_total", g) == 0
    fe.close()
    samples = _wait_state(url, g, 6)
    assert _dev(samples, "gblk_device_connected", g) == 0
    fe.reconnect()
    samples = _wait_state(url, g, 4)
    assert _dev(samples, "gblk_device_connected", g) == 1
    assert _dev(samples, "gblk_reconnects_total", g) == 1
    host.destroy_guest(g)


def test_series_of_an_unplugged_disk_vanish(served: Tuple[SimHost, str]) -> None:
    """Unplugging one disk of a guest (libxl's detach: online=0, Closing, then the
    directories go) removes every series of that disk from the next scrapes, and
    only of that disk."""
    host, url = served
    g = host.create_guest(size=16 * MiB)
    second = host.add_disk(g, SECOND_DISK, size=16 * MiB)
    g.frontend.write(0, pattern(1, PAGE))
    second.write(0, pattern(2, PAGE))
    samples = scrape(url)
    assert len(device_series(samples, g.domid, SECOND_DISK)) > 20
    assert metric(samples, "gblk_requests_total", domain=str(g.domid), device=str(SECOND_DISK),
                  op="write") == 1
    assert host.toolstack.detach_disk(g.domid, SECOND_DISK)
    samples = wait_series_gone(url, g.domid, SECOND_DISK)
    assert _dev(samples, "gblk_requests_total", g, op="write") == 1
    assert _dev(samples, "gblk_device_state", g) == 4
    # and the last one
    assert host.toolstack.detach_disk(g.domid, g.disk.devid)
    wait_series_gone(url, g.domid)
    host.destroy_guest(g)


def test_series_of_a_destroyed_guest_vanish(served: Tuple[SimHost, str]) -> None:
    """``xl destroy`` of a guest with two disks and IO just done removes every series
    of that guest; another guest's series stay."""
    host, url = served
    g = host.create_guest(size=16 * MiB)
    other = host.create_guest(size=16 * MiB)
    second = host.add_disk(g, SECOND_DISK, size=16 * MiB)
    for fe in (g.frontend, second, other.frontend):
        fe.write(0, pattern(1, PAGE))
    assert len(device_series(scrape(url), g.domid)) > 40
    host.destroy_guest(g)
    samples = wait_series_gone(url, g.domid)
    assert _dev(samples, "gblk_requests_total", other, op="write") == 1
    host.destroy_guest(other)


# ----------------------------------------------------------------------------------
# the endpoint


def _promtool() -> str:
    return require_tool("promtool", "prometheus")


def test_promtool_is_clean_and_healthz_ok_while_serving(served: Tuple[SimHost, str]) -> None:
    """A scrape of the daemon while it serves a guest that did every op and a fault
    passes `promtool check metrics`, the OpenMetrics answer is complete, and /healthz
    says 200 ok."""
    promtool = _promtool()
    host, url = served
    g = host.create_guest(size=16 * MiB, options=FrontendOptions(initial_zero=True))
    fe = g.frontend
    fe.write(0, pattern(1, 64 * PAGE))
    fe.flush()
    fe.barrier(0, None)
    fe.discard(0, 8)
    _failed(fe.submit_read(0, 8, mutate=_past_the_end(fe)))
    status, body = http_get(url)
    assert status == 200
    proc = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                          timeout=60, check=False)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.stdout.decode() + proc.stderr.decode())
    text = body.decode()
    assert f'gblk_errors_total{{device="51712",domain="{g.domid}",kind="qdisk",reason="invalid_range"}} 1.0' in text
    # what Prometheus itself asks for (promtool lints the classic format only)
    status, body = http_get(url, "application/openmetrics-text; version=1.0.0")
    assert status == 200 and body.decode().endswith("# EOF\n")
    status, body = http_get(healthz_url(url))
    assert (status, body.strip()) == (200, b"ok")
    host.destroy_guest(g)


def test_idle_guest_persistent_grants_are_unmapped(tmp_path) -> None:
    """A guest that goes quiet gets its persistent grants unmapped after
    ``backend.persistent_grant_idle`` (Linux's blkback purges unused ones on a timer):
    nothing wakes an idle ring but its own sweep timer. The disk still serves
    afterwards (the grants are mapped again), and maps and unmaps balance."""
    with SimHost(dir=str(tmp_path)) as host:
        daemon = start_daemon(host, "idle", '[daemon]\nkinds = ["qdisk"]\n'
                                            '[backend]\npersistent_grant_idle = 0.5\n')
        try:
            url = metrics_url(daemon)
            g = host.create_guest(size=16 * MiB, options=FrontendOptions(
                initial_zero=True, max_queues=1))
            fe = g.frontend
            fe.write(0, pattern(1, 32 * PAGE))
            assert _grants(url, g)[2] > 0
            # no request from here on: only the ring's own timer can unmap them
            maps, unmaps, _ = eventually(lambda: _grants(url, g), lambda m: m[2] == 0,
                                         "gblk_persistent_grants of an idle guest", timeout=10)
            assert maps - unmaps == _ring_pages(fe)
            assert fe.read(0, 256) == pattern(1, 32 * PAGE)
            assert _grants(url, g)[2] > 0
            assert fe.stats.mismatches == 0
            host.destroy_guest(g)
        finally:
            daemon.stop()
