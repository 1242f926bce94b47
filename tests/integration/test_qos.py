"""IO limits (issue 13): QEMU's throttle settings per disk, in a real daemon.

A noisy neighbour is the reason: Linux blkback has no limits at all, and one guest
can take a host's whole disk. These tests run ``gblk serve`` on the simulated host
with ``[[limit]]`` rules, drive guests with a steady verified load and time every
answer: a limited guest keeps to its IOPS or bytes per second (within 10% over the
measurement, its burst first) while an unlimited guest on the same daemon runs on at
full speed; ``gblk ctl limit`` and SIGHUP change limits at once; and bad input to the
control socket is one clear error that changes nothing. Behaviour with a tolerance,
not a performance bound: the limits are far below what the machine does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from gblk.sim.harness.host import SimHost

from .backend_support import logs_on_failure, metric, metrics_url, scrape, start_daemon, wait_until
from .qos_support import Load, ask, ctl, first_disk, toml_rules, within

MiB = 1 << 20
#: guest A: 100 IOPS (4 KiB requests); guest B: 2 MiB/s (64 KiB requests: INDIRECT)
IOPS, BPS = 100, 2 * MiB
#: A's burst, set at runtime: 400 IOPS for 2 s (a bucket of 800 requests)
IOPS_MAX, IOPS_LEN = 400, 2
WINDOW = 10.0
#: guests D and E: one group of 200 IOPS between them
GROUP_IOPS = 200


def _rules(img_a: str, img_b: str, group: str, iops: int = IOPS) -> str:
    return toml_rules([{"image": group, "group": "pair"}],
                      f"[limit_groups.pair]\niops_total = {GROUP_IOPS}\n") + toml_rules([
        {"image": img_a, "iops_total": iops}, {"image": img_b, "bps_total": BPS}])


def test_limited_guests_keep_their_limits_beside_a_full_speed_one():
    """Over 10 s on one daemon: guest A (100 IOPS) does 100 IOPS within 10%, guest B
    (2 MiB/s) 2 MiB/s within 10%, guests D and E share the 200 IOPS of their group
    (neither starved), and guest C, unlimited, runs far above them and never waits.
    Then ``gblk ctl limit`` gives A a burst (400 IOPS for 2 s): A bursts, at no
    more than 400/s and no more than its bucket allows; halved, A follows within
    10%; a SIGHUP with a changed rule applies it (and ends the ctl change)."""
    with SimHost() as host:
        img_a = host.make_image("a.img", 64 * MiB)
        img_b = host.make_image("b.img", 64 * MiB)
        cfg = os.path.join(host.dir, "qos.toml")
        group = os.path.join(host.dir, "g*.img")
        img_d, img_e = (host.make_image(f"g{i}.img", 16 * MiB) for i in range(2))
        b = start_daemon(host, "qos", _rules(img_a, img_b, group))
        with logs_on_failure(b):
            url = metrics_url(b)
            ga = host.create_guest(image=img_a)
            gb = host.create_guest(image=img_b)
            gc = host.create_guest(size=64 * MiB)
            gd, ge = (host.create_guest(image=i) for i in (img_d, img_e))
            la = Load(ga.frontend, nsectors=8, depth=8)
            lb = Load(gb.frontend, nsectors=128, depth=4)
            lc = Load(gc.frontend, nsectors=8, depth=2)
            ld, le = (Load(g.frontend, depth=4) for g in (gd, ge))
            loads = (la, lb, lc, ld, le)
            t0 = time.monotonic()
            for load in loads:
                load.start()
            time.sleep(WINDOW)
            t1 = t0 + WINDOW

            assert within(la.rate(t0, t1), IOPS), la.rate(t0, t1)
            chunk = 128 * 512
            assert within(lb.rate(t0, t1) * chunk, BPS), lb.rate(t0, t1) * chunk / MiB
            pair = [x.rate(t0, t1) for x in (ld, le)]
            assert within(sum(pair), GROUP_IOPS) and min(pair) > GROUP_IOPS / 6, pair
            c_rate = lc.rate(t0, t1)
            assert c_rate > 3 * IOPS, c_rate  # held to nobody's limit (here: 800-3000)

            s = scrape(url)
            da, dc = str(ga.domid), str(gc.domid)
            assert metric(s, "gblk_throttle_wait_seconds_sum", domain=da) > 1.0
            assert metric(s, "gblk_throttle_wait_seconds_count", domain=da) > 0
            assert metric(s, "gblk_io_limit", domain=da, limit="iops_total") == IOPS
            assert metric(s, "gblk_io_limit", domain=str(gb.domid), limit="bps_total") == BPS
            assert not [k for k in s if k.startswith("gblk_throttle_wait_seconds") and
                        f'domain="{dc}"' in k], "the unlimited guest has no throttle series"

            # at runtime: a burst
            disk_a = first_disk(ga.frontend)
            _, got, _ = ctl(host.control_socket, "limit", disk_a, "--iops-total", str(IOPS),
                            "--iops-total-max", str(IOPS_MAX), "--iops-total-max-length",
                            str(IOPS_LEN))
            t2 = time.monotonic()
            assert got == {"group": "", "limits": {"iops_total": IOPS, "iops_total_max": IOPS_MAX,
                                                   "iops_total_max_length": IOPS_LEN},
                           "source": "control"}
            time.sleep(3.0)
            burst = la.count(t2, t2 + 3)
            bucket = IOPS_MAX * IOPS_LEN
            assert 1.5 * IOPS * 3 < burst <= 1.1 * (IOPS * 3 + bucket + IOPS_MAX / 10), burst
            peak = max(la.count(t2 + i / 4, t2 + i / 4 + 1) for i in range(9))
            assert peak <= 1.1 * 1.1 * IOPS_MAX, peak

            # halved, without a burst
            ask(host.control_socket, "limit", disk_a, set={"iops_total": IOPS // 2})
            t3 = time.monotonic() + 0.2
            time.sleep(2.7)
            assert within(la.rate(t3, t3 + 2.5), IOPS // 2), la.rate(t3, t3 + 2.5)

            # SIGHUP: the rules again, changed; the ctl change ends
            with open(cfg, "w") as f:
                f.write(_rules(img_a, img_b, group, iops=IOPS // 4))
            b.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: ask(host.control_socket, "limit", disk_a) == {
                "group": "", "limits": {"iops_total": IOPS // 4}, "source": "config"},
                "SIGHUP applies the new rule")
            got = ask(host.control_socket, "limit", first_disk(gd.frontend))
            assert got == {"group": "pair", "limits": {"iops_total": GROUP_IOPS}, "source": "config"}
            for load in loads:
                load.stop()
                assert load.failed == 0
            for g in (ga, gb, gc, gd, ge):
                assert g.frontend.stats.mismatches == 0 and g.frontend.stats.errors == 0
                assert g.frontend.stats.protocol_violations == 0
            assert "IO limits" in b.log_text()
            b.stop()


def _raw(path: str, data: bytes) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(data)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf)


def _others_may_run(path: str) -> bool:
    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts)):  # every directory on the way must be searchable
        if not os.stat("/".join(parts[:i])).st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o001)


_AS_NOBODY = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect": e.strerror})); sys.exit(0)
try:
    s.sendall(sys.argv[2].encode() + b"\n")
except BrokenPipeError:  # refused before the request was read: the answer is there
    pass
print(s.makefile().readline().strip())
"""


def test_bad_control_requests_are_one_error_and_change_nothing():
    """Malformed JSON, an unknown disk, absurd or contradictory limits, an unknown
    cbt action, and a client that is not root: each gets one clear error line (the
    cli exits 1 or 2 with one line), and the disk's limits stay what they were."""
    with SimHost() as host:
        img = host.make_image("a.img", 16 * MiB)
        b = start_daemon(host, "bad", toml_rules([{"image": img, "iops_total": 100}]))
        with logs_on_failure(b):
            g = host.create_guest(image=img)
            disk = first_disk(g.frontend)
            sock = host.control_socket
            before = ask(sock, "limit", disk)
            assert before["limits"] == {"iops_total": 100}

            def unchanged() -> None:
                assert ask(sock, "limit", disk) == before

            assert _raw(sock, b"{not json\n") == {"ok": False, "error": "not a JSON request line"}
            got = _raw(sock, json.dumps({"command": "limit", "disk": disk,
                                         "set": "fast"}).encode() + b"\n")
            assert got["ok"] is False and '"set" must be an object' in got["error"]
            got = _raw(sock, json.dumps({"command": "limit"}).encode() + b"\n")
            assert got["ok"] is False and '"disk" is missing' in got["error"]
            unchanged()
            for args, says in (  # through the cli: exit 1, one line
                (["d99/51712", "--iops-total", "5"], "no disk d99/51712"),
                ([disk, "--iops-total", "5", "--iops-read", "3"],
                 "iops_total and iops_read cannot be set together"),
            ):
                rc, _, err = ctl(sock, "limit", *args, check=False)
                assert rc == 1 and err.count("\n") == 1 and says in err, (args, err)
            for new, says in (
                ({"iops_total": -1}, "iops_total must be an integer from 0 to"),
                ({"bps_total": 10 ** 20}, "bps_total must be an integer from 0 to"),
                ({"bps_total": 1.5}, "bps_total must be an integer"),
                ({"iops_total": True}, "iops_total must be an integer"),
                ({"iops_total": 50, "iops_total_max": 10}, "cannot be lower than"),
                ({"iops_total": 50, "iops_total_max_length": 5}, "needs iops_total_max"),
                ({"iops_total": 50, "iops_total_max": 60, "iops_total_max_length": 10 ** 6},
                 "iops_total_max_length must be"),
                ({"iops_total": 50, "speed": "warp"}, "unknown limit 'speed'"),
            ):
                got = _raw(sock, json.dumps({"command": "limit", "disk": disk, "set": new})
                           .encode() + b"\n")
                assert got["ok"] is False and says in got["error"], (new, got)
                assert "\n" not in got["error"]
            unchanged()
            rc, _, err = ctl(sock, "limit", "xvda", "--iops-total", "5", check=False)
            assert rc == 2 and "d<domid>/<devid>" in err
            got = _raw(sock, json.dumps({"command": "cbt", "disk": disk,
                                         "action": "explode"}).encode() + b"\n")
            assert got == {"ok": False, "error": "cbt: unknown action 'explode'; known: "
                           "enable, disable, reset, show"}
            got = _raw(sock, json.dumps({"command": "cbt", "disk": disk, "action": "show"})
                       .encode() + b"\n")
            assert got["ok"] is False and "not enabled" in got["error"]

            if os.geteuid() != 0:
                pytest.skip("the non-root client part needs root (to become nobody)")
            # a Python that nobody may run (the test's own may live under /root)
            python = next((p for p in (os.path.realpath(sys.executable), "/usr/bin/python3")
                           if _others_may_run(p)), None)
            if python is None:
                pytest.skip("no Python that nobody may run")
            req = json.dumps({"command": "limit", "disk": disk, "set": {}})

            def as_nobody() -> dict:
                p = subprocess.run([python, "-I", "-c", _AS_NOBODY, sock, req],
                                   capture_output=True, text=True, timeout=30,
                                   user=65534, group=65534, extra_groups=[], cwd="/")
                assert p.returncode == 0, p.stderr
                return json.loads(p.stdout)

            # the socket's mode keeps others out; past it, SO_PEERCRED still does
            assert as_nobody() == {"connect": "Permission denied"}
            os.chmod(sock, 0o666)
            os.chmod(host.dir, os.stat(host.dir).st_mode | 0o011)
            try:
                assert as_nobody() == {"ok": False, "error": "permission denied: the control "
                                       "socket answers root only"}
            finally:
                os.chmod(sock, 0o600)
            unchanged()
            b.stop()
