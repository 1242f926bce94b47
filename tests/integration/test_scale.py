"""Many disks on one daemon (issue 16), through real processes on the simulated host:
guests of four disks each connect all at once, a sample does verified IO while the
rest idle, then every disk is unplugged as libxl does. Every disk must reach Connected
and then Closed, no guest read may differ, an idle disk may cost at most 8 file
descriptors, and the daemon must give back every file descriptor, every guest page
mapping and every greenlet it took.

``GBLK_SCALE_DISKS`` sets the number of disks: 32 by default (about 15 s), 256 in one
tox env (``py311``, see tox.ini): a minute or more on a 2-core CI machine, too long
for all six. Figures (connect time, RSS, idle CPU) are printed by
``gblk bench --disks N``, never asserted here.
"""

from __future__ import annotations

import os
import resource

import pytest

from gblk.control.client import daemon_greenlets
from gblk.sim.harness.host import BackendProcess, SimHost, child_env
from gblk.sim.harness.scale import report, run_scale

from .backend_support import wait_until

DISKS = int(os.environ.get("GBLK_SCALE_DISKS", "32"))
#: the issue's budget of file descriptors per idle disk
MAX_FDS_PER_DISK = 8


def test_many_disks_connect_serve_and_give_everything_back() -> None:
    r = run_scale(DISKS, per_guest=4, io_sample=8, idle_seconds=1.0,
                  greenlets_of=daemon_greenlets)
    print(report(r))
    assert r.guests == (DISKS + 3) // 4
    assert r.connected == DISKS, "every disk reached Connected"
    assert r.io_checked == min(8, DISKS) and r.mismatches == 0
    assert r.closed == DISKS, "every disk reached Closed when unplugged"
    assert r.per_disk("fds") <= MAX_FDS_PER_DISK, report(r)
    # everything came back: fds, guest page mappings, greenlets
    assert r.after.fds == r.base.fds, (r.base, r.after)
    assert r.idle.maps > 0 and r.after.maps == 0, (r.idle, r.after)
    assert r.base.greenlets is not None and r.after.greenlets == r.base.greenlets, (
        r.base, r.after)


def _soft_nofile(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


def test_daemon_raises_its_fd_soft_limit_and_says_so() -> None:
    """Started with a soft limit of 256 (and a higher hard limit), the daemon raises
    its soft limit to the hard one (at most 65536) and logs the new limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard RLIMIT_NOFILE {hard}: nothing to raise to")
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    with SimHost() as host:
        argv = ["sh", "-c", 'ulimit -Sn 256 && exec "$@"', "sh", *host.backend_argv()]
        daemon = BackendProcess(argv, os.path.join(host.dir, "nofile.log"), child_env())
        try:
            wait_until(lambda: "file descriptor limit raised" in daemon.log_text(),
                       "the daemon's log line about its fd limit")
            assert f"from 256 to {want}" in daemon.log_text()
            assert _soft_nofile(daemon.pid) == want
        finally:
            daemon.stop()
