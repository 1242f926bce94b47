"""Changed-block tracking (issue 13): a dirty bitmap a backup tool can trust.

Incremental backup of running guests needs to know what changed; XenServer pairs a
64 KiB bitmap with each disk, QEMU has dirty bitmaps, an ``xl`` host had neither.
These tests run ``gblk serve`` on the simulated host, enable tracking with ``gblk ctl
cbt enable`` and write through a verifying guest: the map then lists exactly the
written extents (at its granularity; reads mark nothing), ``reset`` hands them over
and starts afresh, and after a SIGKILL in the middle of a stream of writes the
bitmap on disk marks every granule whose data reached the image (a superset: never
a change it does not know of), and a restarted daemon carries on with it.
"""

from __future__ import annotations

import os
import random
import signal
import time
from typing import List, Set

import gevent

from gblk.engine import cbt as cbtmod
from gblk.sim.harness.host import SimHost

from .backend_support import (logs_on_failure, metric, metrics_url, pattern, scrape, start_daemon,
                              wait_ready)
from .qos_support import ask, ctl, first_disk

MiB = 1 << 20
G = 64 * 1024  # the default granularity
GS = G // 512  # sectors per granule


def _toml(host: SimHost) -> str:
    return f'[cbt]\ndirectory = "{os.path.join(host.dir, "cbt")}"\n'


def _extents(granules: Set[int]) -> List[List[int]]:
    out: List[List[int]] = []
    for g in sorted(granules):
        if out and out[-1][0] + out[-1][1] == g * G:
            out[-1][1] += G
        else:
            out.append([g * G, G])
    return out


def _granules(extents: List[List[int]]) -> Set[int]:
    return {g for off, n in extents for g in range(off // G, (off + n + G - 1) // G)}


def test_the_map_lists_exactly_the_written_extents():
    """Writes of one sector to 1 MiB, across a granule boundary, a discard, a flush and
    a barrier carrying data: ``cbt show`` lists exactly their granules, merged; reads
    mark nothing. ``reset`` returns the same extents and clears the map; the next
    write alone is listed then. The metrics agree; ``disable`` removes the file."""
    with SimHost() as host:
        b = start_daemon(host, "cbt", _toml(host))
        with logs_on_failure(b):
            url = metrics_url(b)
            g = host.create_guest(size=64 * MiB)
            fe = g.frontend
            disk = first_disk(fe)
            sock = host.control_socket
            fe.write(GS * 700, pattern(1, 4096))  # before tracking: not listed
            _, got, _ = ctl(sock, "cbt", "enable", disk)
            assert got["enabled"] and got["granularity"] == G and got["bits"] == 64 * MiB // G
            assert got["dirty_bytes"] == 0 and os.path.exists(got["file"])
            want: Set[int] = set()
            fe.write(0, pattern(2, 512))
            want.add(0)
            fe.write(3 * GS + 8, pattern(3, 8192))
            want.add(3)
            fe.write(10 * GS - 8, pattern(4, 8192))  # across granules 9 and 10
            want |= {9, 10}
            fe.write(100 * GS, pattern(5, MiB))  # 1 MiB: INDIRECT, granules 100..115
            want |= set(range(100, 116))
            fe.discard(200 * GS, 2 * GS)
            want |= {200, 201}
            fe.flush(300 * GS, pattern(6, 4096))
            want.add(300)
            fe.barrier(301 * GS + 64, pattern(7, 4096))
            want.add(301)
            assert fe.read(500 * GS, 64) == bytes(64 * 512)  # a read marks nothing
            assert fe.read(100 * GS, 2048) == pattern(5, MiB)
            _, got, _ = ctl(sock, "cbt", "show", disk)
            assert got["extents"] == _extents(want)
            assert got["dirty_bytes"] == len(want) * G
            s = scrape(url)
            dom = str(g.domid)
            assert metric(s, "gblk_cbt_enabled", domain=dom) == 1
            assert metric(s, "gblk_cbt_dirty_bytes", domain=dom) == len(want) * G
            assert metric(s, "gblk_cbt_syncs_total", domain=dom) >= 1

            got = ask(sock, "cbt", disk, action="reset")
            assert got["extents"] == _extents(want)
            assert ask(sock, "cbt", disk, action="show")["extents"] == []
            fe.write(50 * GS + 16, pattern(8, 4096))
            fe.write(0, pattern(9, 512))
            assert ask(sock, "cbt", disk, action="show")["extents"] == _extents({0, 50})
            assert fe.stats.mismatches == 0 and fe.stats.protocol_violations == 0

            path = got["file"]
            got = ask(sock, "cbt", disk, action="disable")
            assert got == {"enabled": False} and not os.path.exists(path)
            assert metric(scrape(url), "gblk_cbt_enabled", domain=dom) == 0
            rc, _, err = ctl(sock, "cbt", "show", disk, check=False)
            assert rc == 1 and "not enabled" in err
            b.stop()


def test_after_sigkill_the_bitmap_covers_every_change_and_tracking_goes_on():
    """A stream of writes to fresh granules (so the bitmap is written all the time),
    SIGKILL in the middle: the bitmap file marks every granule of the image that holds
    data (a superset of what reached the disk) and of every acknowledged write. A new
    daemon takes the guest over, answers the writes left on the ring, lists a superset
    of all of them in ``cbt show``, and tracks what comes after."""
    with SimHost() as host:
        toml = _toml(host)
        first = start_daemon(host, "first", toml)
        procs = [first]
        with logs_on_failure(*procs):
            metrics_url(first)
            g = host.create_guest(size=64 * MiB)
            fe = g.frontend
            disk = first_disk(fe)
            got = ask(host.control_socket, "cbt", disk, action="enable")
            path, size = got["file"], got["size_bytes"]
            rnd = random.Random(13)
            order = list(range(size // G))
            rnd.shuffle(order)
            acked: Set[int] = set()
            results = []
            stop = [False]

            def writer(i: int) -> None:
                for k in range(i, len(order), 16):
                    if stop[0]:
                        return
                    gran = order[k]
                    r = fe.submit_write(gran * GS + 8 * (k % 8), pattern(k, 4096))
                    results.append((gran, r))
                    res = r.get(timeout=60)
                    if res.ok:
                        acked.add(gran)

            workers = [gevent.spawn(writer, i) for i in range(16)]
            deadline = time.monotonic() + 30
            while len(acked) < 200 and time.monotonic() < deadline:
                gevent.sleep(0.01)
            first.proc.send_signal(signal.SIGKILL)
            first.stop(timeout=30)
            stop[0] = True
            acked_at_kill = set(acked)
            assert len(acked_at_kill) >= 200

            loaded = cbtmod.load_file(path, size)
            assert loaded is not None
            fd, gran_bytes, bits = loaded
            os.close(fd)
            assert gran_bytes == G
            marked = {b for b in range(size // G) if bits[b >> 3] & (1 << (b & 7))}
            with open(g.image, "rb") as f:
                holding = {i for i in range(size // G) if f.read(G).count(0) != G}
            assert holding - marked == set(), "data on disk its bitmap does not know of"
            assert acked_at_kill - marked == set()
            assert holding >= acked_at_kill

            second = start_daemon(host, "second", toml)
            procs.append(second)
            wait_ready(second)
        with logs_on_failure(*procs):
            gevent.joinall(workers, timeout=60)
            for _, r in results:
                assert r.get(timeout=60).ok
            written = {gran for gran, _ in results}
            got = ask(host.control_socket, "cbt", disk, action="show")
            listed = _granules(got["extents"])
            assert written <= listed and marked <= listed
            fresh = next(i for i in order if i not in listed)
            fe.write(fresh * GS, pattern(99, 4096))
            assert fresh in _granules(ask(host.control_socket, "cbt", disk, action="show")["extents"])
            assert fe.stats.mismatches == 0 and fe.stats.lost == 0
            second.stop()
