"""Hostile guests against the control plane and the daemon's resources: read-only
disks (XSA-142), event storms and state flapping (XSA-331/332), XenStore write
floods (XSA-349), disconnects at every point of the lifecycle (XSA-350), and
garbage in the nodes read at connect time.

One simulated host and one ``gblk serve`` (qdisk) for the module, with a bystander
guest on it that must be served throughout; some tests freeze the daemon
(SIGSTOP) or start a second one late, to put the guest's moves before gblk's.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Iterator, List

import gevent
import pytest

from gblk.blkif import xenbus as xb
from gblk.blkif.const import PAGE_SIZE, XenbusState
from gblk.sim.guest.frontend import FrontendError, FrontendOptions
from gblk.sim.harness.host import SimHost

from .backend_support import pattern
from .hostile_support import (  # noqa: F401 - after_each: an autouse fixture
    Env,
    after_each,
    hostile_env,
    ERROR,
    MiB,
    OKAY,
    WAIT,
    Bystander,
    check_clean,
    close_without_leaks,
    dev_metric,
    eventually,
    expect,
    figure,
    frozen,
    grant_balance,
    has_device,
    launch,
    make_guest,
    wait_all,
)

S = XenbusState


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    yield from hostile_env("life")


def options(**kw) -> FrontendOptions:
    kw.setdefault("max_ring_page_order", 0)
    kw.setdefault("max_queues", 1)
    return FrontendOptions(timeout=WAIT, io_timeout=WAIT, **kw)


def backend_state(host: SimHost, fe) -> object:
    return host.toolstack.backend_state(fe.domid, fe.devid)


def wait_backend(host: SimHost, fe, *states: int) -> int:
    return eventually(lambda: backend_state(host, fe), lambda s: s in states,
                      f"backend of d{fe.domid}/{fe.devid} in {states}")


def verified_io(fe, seed: int) -> None:
    data = pattern(seed, 24 * PAGE_SIZE)
    fe.write(seed * 8 % 4096, data)
    assert fe.read(seed * 8 % 4096, 24 * 8) == data
    fe.write(5000, pattern(seed + 1, 300 * PAGE_SIZE))  # INDIRECT when negotiated
    assert fe.read(5000, 300 * 8) == pattern(seed + 1, 300 * PAGE_SIZE)


# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,device_type", [("r", "disk"), ("w", "cdrom")])
def test_xsa142_read_only_disk_refuses_every_write(env, mode, device_type):
    """XSA-142: on a mode=r disk (and on a cdrom, whatever its mode) every WRITE
    (direct and INDIRECT), FLUSH_DISKCACHE and WRITE_BARRIER carrying data, and
    DISCARD (plain and secure, though never offered) is answered ERROR and the image
    file is not changed by a single byte; reads and data-less flushes are served."""
    d = env.daemon
    image = os.path.join(env.host.dir, f"ro-{mode}-{device_type}.img")
    content = pattern(9, 4 * MiB)
    with open(image, "wb") as f:
        f.write(content)
    mtime = os.stat(image).st_mtime_ns
    g = env.host.create_guest(image=image, mode=mode, device_type=device_type, options=options())
    fe = g.frontend
    assert fe.disk.readonly and not fe.disk.discard
    refused = [
        ("write", fe.submit_write(0, pattern(1, PAGE_SIZE))),
        ("write 11", fe.submit_write(8, pattern(2, 11 * PAGE_SIZE))),
        ("write indirect", fe.submit_write(100, pattern(3, 64 * PAGE_SIZE))),
        ("write partial indirect", fe.submit_write(3, pattern(4, 512), indirect=True)),
        ("flush with data", fe.submit_flush(16, pattern(5, PAGE_SIZE))),
        ("barrier with data", fe.submit_barrier(24, pattern(6, 2 * PAGE_SIZE))),
        ("discard", fe.submit_discard(0, 64)),
        ("secure discard", fe.submit_discard(64, 64, secure=True)),
    ]
    for what, r in refused:
        expect(r, ERROR, what)
    fe.flush()
    fe.barrier(0, None)
    assert fe.read(0, 256) == content[:256 * 512]
    assert fe.read(8000, 16) == content[8000 * 512:8016 * 512]
    with open(image, "rb") as f:
        assert f.read() == content, "a read-only disk was written"
    assert os.stat(image).st_mtime_ns == mtime
    s = d.scrape()
    assert dev_metric(s, "gblk_errors_total", fe, reason="read_only") == len(refused)
    check_clean(fe)
    close_without_leaks(fe)


# ---------------------------------------------------------------------------------
def test_xsa331_332_event_storm_and_state_flapping(env):
    """XSA-331/332: a guest sends 100000 notifications with nothing on its ring,
    then flips its XenBus state 4<->5 three thousand times while it keeps notifying
    and doing IO. The daemon stays up, the other guest's disk on the same daemon
    keeps being served during each phase, every request of the hostile guest is
    answered once (Closing keeps serving), and afterwards the hostile guest can close
    cleanly and connect again. Daemon CPU time over the flood is reported."""
    d = env.daemon
    g = make_guest(env.host, max_ring_page_order=0, max_queues=1, persistent=False)
    fe = g.frontend
    by = env.bystander.start()
    gevent.sleep(0.2)
    cpu0, t0 = d.cpu_seconds(), time.monotonic()
    for _ in range(100):
        fe.notify(0, count=1000)
        gevent.sleep(0)
    cpu1, t1 = d.cpu_seconds(), time.monotonic()

    running = True
    hostile: List = []
    sent = Counter()

    def storm() -> None:
        while running:
            # a few per turn: this process also drives the flips, and a storm that
            # hogged its loop would only slow the test down, not the daemon
            fe.notify(0, count=10)
            sent["notify"] += 10
            gevent.sleep(0)

    def io() -> None:
        i = 0
        while running:
            sector = (i % 32) * 8
            hostile.append(fe.submit_write(sector, pattern(i, PAGE_SIZE)))
            hostile[-1].get(timeout=WAIT)
            i += 1

    workers = [gevent.spawn(storm), gevent.spawn(io)]
    flips = 3000
    with fe._transition():  # the simulated driver must not react: the test drives the state
        for i in range(flips):
            fe.set_state(S.CLOSING if i % 2 == 0 else S.CONNECTED)
    cpu2, t2 = d.cpu_seconds(), time.monotonic()
    running = False
    gevent.joinall(workers, timeout=WAIT * 2)
    assert all(w.dead for w in workers)
    for w in workers:
        w.get()
    by_flood, by_flaps = by.completed_between(t0, t1), by.completed_between(t1, t2)
    by_total = by.stop()
    assert by_flood > 0, "the other guest got no service during the notification storm"
    assert by_flaps > 0, "the other guest got no service while this one flapped its state"
    for r in hostile:
        assert r.get(timeout=WAIT).status == OKAY
    assert backend_state(env.host, fe) in (S.CONNECTED, S.CLOSING)
    samples = d.scrape()
    received = dev_metric(samples, "gblk_notifications_received_total", fe)
    d.assert_sane()
    check_clean(fe)
    fe.close()
    fe.reconnect()
    verified_io(fe, 3)
    close_without_leaks(fe)
    figure("xsa332_storm", f"100000 notifications in {t1 - t0:.2f}s: daemon CPU "
           f"{cpu1 - cpu0:.2f}s ({100 * (cpu1 - cpu0) / (t1 - t0):.0f}% of one CPU); "
           f"bystander ops meanwhile {by_flood}")
    figure("xsa331_flaps", f"{flips} state flips + {sent['notify']} notifications + "
           f"{len(hostile)} writes in {t2 - t1:.2f}s: daemon CPU {cpu2 - cpu1:.2f}s "
           f"({100 * (cpu2 - cpu1) / (t2 - t1):.0f}%); bystander ops meanwhile {by_flaps} "
           f"(total {by_total}); notifications counted by gblk {received:.0f}")
    # generous: a storm must not make the daemon spin on several CPUs
    assert cpu1 - cpu0 < 2 * (t1 - t0) + 1
    assert cpu2 - cpu1 < 2 * (t2 - t1) + 1


# ---------------------------------------------------------------------------------
def test_xsa349_node_rewrites_keep_memory_bounded(env):
    """XSA-349: a guest rewrites its XenStore nodes in a loop for a few seconds (its
    state node with the same and with harmless values, which fires gblk's watch each
    time; the nodes gblk read at connect time with garbage; nodes of its own making).
    The daemon's RSS stays bounded (< +50 MiB), it never re-reads connect-time nodes
    while connected, and the disk keeps working; a new connection works after."""
    d = env.daemon
    g = make_guest(env.host, max_ring_page_order=0, max_queues=1)
    fe = g.frontend
    writes = Counter()

    def flood(seconds: float) -> None:
        end = time.monotonic() + seconds

        def state_same() -> None:
            while time.monotonic() < end:
                fe.write_node(xb.STATE, "4")
                writes["state"] += 1

        def state_flip() -> None:
            i = 0
            while time.monotonic() < end:
                fe.write_node(xb.STATE, "3" if i % 2 else "4")
                i += 1
                writes["state"] += 1

        def garbage() -> None:
            i = 0
            while time.monotonic() < end:
                for key in (xb.RING_REF, xb.EVENT_CHANNEL, xb.PROTOCOL, xb.FEATURE_PERSISTENT):
                    fe.write_node(key, f"junk{i}")
                    writes["garbage"] += 1
                i += 1

        def own_nodes() -> None:
            i = 0
            while time.monotonic() < end:
                fe.write_node(f"junk-{i % 256}", "x" * 512)
                if i % 3 == 0:
                    fe.remove_node(f"junk-{(i * 7) % 256}")
                i += 1
                writes["own"] += 1

        gs = [gevent.spawn(f) for f in (state_same, state_same, state_flip, garbage, own_nodes)]
        gevent.joinall(gs, timeout=seconds + WAIT)
        for x in gs:
            x.get()

    flood(0.5)  # warm-up: first-use allocations are not growth
    fe.write_node(xb.STATE, "4")
    verified_io(fe, 1)
    rss0 = d.rss_bytes()
    before = dict(writes)
    flood(3.0)
    fe.write_node(xb.STATE, "4")
    verified_io(fe, 2)
    rss1 = d.rss_bytes()
    n = {k: writes[k] - before.get(k, 0) for k in writes}
    events = d.scrape().get("gblk_watch_events_total", 0.0)
    figure("xsa349_rss", f"daemon RSS {rss0 / MiB:.1f} MiB -> {rss1 / MiB:.1f} MiB "
           f"after {sum(n.values())} node writes in 3 s ({n}); bus watch events {events:.0f}")
    assert rss1 - rss0 < 50 * MiB
    assert backend_state(env.host, fe) == S.CONNECTED
    check_clean(fe)
    fe.close()
    fe.reconnect()
    verified_io(fe, 3)
    close_without_leaks(fe)


# ---------------------------------------------------------------------------------
# XSA-350: disconnect at every point of the lifecycle, twice
def test_xsa350_disconnect_before_the_backend_started(env):
    """XSA-350, before InitWait: no gblk serves the disk yet when its guest closes the
    frontend twice (one disk), or removes the frontend directory twice (another);
    then a gblk starts and finds them that way. It does not fail: the closed one goes
    to InitWait (or Closed) and connects when the guest comes back, the one without
    a frontend goes Closed, and closing twice again is harmless."""
    host = env.host
    g = host.create_guest(size=8 * MiB, kind="vbd3", options=options(), connect=False)
    fe = g.frontend
    fe2 = host.add_disk(g, 51728, size=8 * MiB, kind="vbd3", options=options(), connect=False)
    for _ in range(2):
        fe.set_state(S.CLOSED)
        host.toolstack.remove_frontend_dir(fe2.domid, fe2.devid)
    late = launch(host, "late", '[daemon]\nkinds = ["vbd3"]\n')
    try:
        wait_backend(host, fe, S.INIT_WAIT, S.CLOSED)
        wait_backend(host, fe2, S.CLOSED)
        late.assert_sane()
        try:
            fe.connect()
            retried = False
        except FrontendError:
            # gblk went InitWait then, seeing the frontend Closed, Closed: a guest
            # that took the passing InitWait for its cue is told Closed; it tries again
            retried = True
            assert not fe.connected
            fe.set_state(S.INITIALISING)
            wait_backend(host, fe, S.INIT_WAIT)
            fe.connect()
        figure("xsa350_before_initwait", "first connect " + ("failed (InitWait then Closed), "
               "second one worked" if retried else "worked"))
        verified_io(fe, 1)
        for _ in range(2):
            fe.close()
        fe.set_state(S.CLOSED)
        fe.set_state(S.CLOSED)
        wait_backend(host, fe, S.CLOSED)
        fe.reconnect()
        verified_io(fe, 2)
        close_without_leaks(fe)
        late.assert_sane()
    finally:
        late.stop()


def test_xsa350_disconnect_in_initwait(env):
    """XSA-350, in InitWait: the guest closes (twice) before ever writing its ring
    nodes, and again after coming back; gblk goes Closed, then InitWait again, and
    finally connects and serves."""
    g = env.host.create_guest(size=8 * MiB, options=options(), connect=False)
    fe = g.frontend
    for _ in range(2):
        wait_backend(env.host, fe, S.INIT_WAIT)
        fe.set_state(S.CLOSED)
        fe.set_state(S.CLOSED)
        wait_backend(env.host, fe, S.CLOSED)
        fe.set_state(S.INITIALISING)
    wait_backend(env.host, fe, S.INIT_WAIT)
    fe.connect()
    verified_io(fe, 1)
    close_without_leaks(fe)


def test_xsa350_disconnect_while_connecting(env):
    """XSA-350, during connect: the guest has granted its ring and written its nodes
    and Initialised, then closes twice before gblk looked (gblk frozen meanwhile), two
    rounds; then twice more without freezing gblk, racing its connect. gblk never
    fails, never keeps a ring mapped, and the guest connects for real afterwards."""
    d = env.daemon
    g = env.host.create_guest(size=8 * MiB, options=options(), connect=False)
    fe = g.frontend
    for rnd in range(4):
        if rnd:
            fe.set_state(S.INITIALISING)
        wait_backend(env.host, fe, S.INIT_WAIT)
        racing = rnd >= 2
        ctx = frozen(d) if not racing else _nothing()
        with ctx:
            c = gevent.spawn(fe.connect)
            eventually(lambda: fe.state, lambda s, c=c: s == S.INITIALISED or c.dead, "Initialised")
            fe.set_state(S.CLOSED)
            fe.set_state(S.CLOSED)
        try:
            c.get(timeout=WAIT)
        except FrontendError:
            pass
        if fe.connected:  # the race went gblk's way: it connected first
            fe.close()
        wait_backend(env.host, fe, S.CLOSED)
        if not racing:
            assert not fe.connected
        eventually(fe.retry_grants, lambda n: n == 0, "ring grants still mapped")
        assert fe.grants_in_use() == 0
    fe.set_state(S.INITIALISING)
    wait_backend(env.host, fe, S.INIT_WAIT)
    fe.connect()
    verified_io(fe, 1)
    close_without_leaks(fe)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_xsa350_disconnect_with_io_in_flight(env):
    """XSA-350, connected with IO in flight: the guest goes straight to Closed (no
    Closing) twice with dozens of requests outstanding, over map and then persistent
    grants, and once more through an orderly close. Every request gblk took is
    answered exactly once before it reports Closed, nothing stays mapped, and the
    guest reconnects and is served each time."""
    g = make_guest(env.host, max_ring_page_order=0, max_queues=1, persistent=False)
    fe = g.frontend
    answered = Counter()
    for rnd in range(3):
        assert fe.persistent == (rnd == 1)
        rs = []
        for i in range(24):
            rs.append(fe.submit_write(i * 16, pattern(rnd * 100 + i, 2 * PAGE_SIZE)))
            rs.append(fe.submit_read(1024 + i * 64, 64 * 8))
        if rnd < 2:
            fe.set_state(S.CLOSED)
            fe.set_state(S.CLOSED)
            for r in wait_all(rs):
                answered["lost" if r.lost else r.status] += 1
            eventually(lambda: fe.connected, lambda c: not c, "frontend saw the backend close")
        else:
            fe.close()
            for r in wait_all(rs):
                answered["lost" if r.lost else r.status] += 1
        wait_backend(env.host, fe, S.CLOSED)
        check_clean(fe)
        eventually(fe.retry_grants, lambda n: n == 0, "grants still mapped after Closed")
        fe.options.persistent = rnd == 0  # the next round over persistent grants, then map
        fe.reconnect()
        verified_io(fe, rnd + 1)
    assert answered[ERROR] == 0
    close_without_leaks(fe)
    figure("xsa350_in_flight", f"requests in flight at disconnect: {dict(answered)}")


def test_xsa350_double_close(env):
    """XSA-350, double disconnect: close, close again, and write Closed twice more
    while gblk is already Closed; twice over. Harmless: gblk stays Closed and the
    guest reconnects."""
    g = make_guest(env.host, max_ring_page_order=0, max_queues=1)
    fe = g.frontend
    for rnd in range(2):
        verified_io(fe, rnd)
        fe.close()
        fe.close()
        fe.set_state(S.CLOSED)
        fe.set_state(S.CLOSED)
        wait_backend(env.host, fe, S.CLOSED)
        close_without_leaks(fe)
        fe.reconnect()
    verified_io(fe, 9)
    close_without_leaks(fe)


@pytest.mark.parametrize("first", ["frontend", "backend"])
def test_xsa350_directories_removed_twice(env, first):
    """XSA-350, directories vanish with IO in flight: the frontend's then the
    backend's directory (or the other way round), each removed twice, two rounds on
    the same domain. gblk answers what it took, releases every mapping, drops the
    device's metric series, and serves a disk attached again under the same name."""
    d = env.daemon
    g = make_guest(env.host, max_ring_page_order=0, max_queues=1, persistent=first == "backend")
    fe = g.frontend
    ts = env.host.toolstack
    for rnd in range(2):
        rs = [fe.submit_write(i * 8, pattern(i, PAGE_SIZE)) for i in range(16)]
        rs += [fe.submit_read(512, 32 * 8) for _ in range(8)]
        order = [ts.remove_frontend_dir, ts.remove_backend_dir]
        if first == "backend":
            order.reverse()
        for rm in order:
            rm(fe.domid, fe.devid)
            rm(fe.domid, fe.devid)
        wait_all(rs)
        eventually(lambda fe=fe: fe.connected, lambda c: not c, "frontend saw the backend go")
        eventually(lambda fe=fe: has_device(d.scrape(), fe), lambda v: not v, "device series gone")
        assert fe.stats.violations == {}, fe.stats.violations
        eventually(fe.retry_grants, lambda n: n == 0, "grants still mapped after removal")
        assert fe.grants_in_use() == 0
        d.assert_sane()
        # the toolstack attaches a disk under the same name again: a fresh device
        ts.disks.pop((fe.domid, fe.devid), None)
        ts.attach_disk(fe.domid, g.image, devid=fe.devid)
        fe.stop()
        fe = env.host.frontend(g.domain, fe.devid, options(persistent=first == "backend"))
        g.extra.append(fe)
        fe.connect()
        verified_io(fe, rnd + 1)
        grant_balance(d, fe)
    close_without_leaks(fe)


# ---------------------------------------------------------------------------------
GARBAGE = {
    "ring-ref not a number": (xb.RING_REF, "12abc"),
    "ring-ref not granted": (xb.RING_REF, "32767"),
    "ring-ref past the table": (xb.RING_REF, "4294967295"),
    "event-channel not a number": (xb.EVENT_CHANNEL, "-1"),
    "event-channel not bound": (xb.EVENT_CHANNEL, "4000"),
    "ring-page-order too big": (xb.RING_PAGE_ORDER, "9"),
    "num-queues 0": (xb.MULTI_QUEUE_NUM_QUEUES, "0"),
    "num-queues too many": (xb.MULTI_QUEUE_NUM_QUEUES, "65"),
    "protocol unknown": (xb.PROTOCOL, "sparc-abi"),
}


def test_garbage_connect_nodes_fail_only_that_connection(env):
    """A guest writes garbage into the nodes gblk reads at connect time (ring-ref,
    event-channel, ring-page-order, multi-queue-num-queues, protocol), each in turn
    on the same disk: that connection fails cleanly (Closed, hotplug-status=error,
    nothing mapped or bound), the daemon carries on, and the guest connects properly
    afterwards."""
    d = env.daemon
    g = env.host.create_guest(size=8 * MiB, options=options(), connect=False)
    fe = g.frontend
    failed = 0
    for what, (key, value) in GARBAGE.items():
        if fe.state != S.INITIALISING:
            fe.set_state(S.INITIALISING)
        wait_backend(env.host, fe, S.INIT_WAIT)
        with frozen(d):
            c = gevent.spawn(fe.connect)
            eventually(lambda: fe.state, lambda s, c=c: s == S.INITIALISED or c.dead, "Initialised")
            fe.write_node(key, value)
        with pytest.raises(FrontendError):
            c.get(timeout=WAIT)
        wait_backend(env.host, fe, S.CLOSED)
        assert env.host.xs.read(g.disk.backend_path + "/hotplug-status") == "error", what
        failed += 1
        eventually(fe.retry_grants, lambda n: n == 0, f"{what}: ring still mapped")
        assert fe.grants_in_use() == 0, what
        fe.remove_node(key)
    fe.set_state(S.INITIALISING)
    wait_backend(env.host, fe, S.INIT_WAIT)
    fe.connect()
    verified_io(fe, 1)
    s = d.scrape()
    assert dev_metric(s, "gblk_errors_total", fe, reason="device_failed") == failed
    close_without_leaks(fe)
