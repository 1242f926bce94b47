"""``gblk demo``: the whole product on one machine (simulated host, daemon, guests).

Run as a user runs it, a real ``python -m gblk demo`` process: it must pass its own
verified workload, print the JSON summary as the last line, clean up after itself
and shut down cleanly on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DEADLINE = 120  # a hang guard, not a performance bound


def run_demo(args, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gblk", "demo", *args], env=env,
                          capture_output=True, text=True, timeout=DEADLINE, **kw)


def sim_dir(stdout: str) -> str:
    m = re.search(r"simulated Xen host in (\S+)", stdout)
    assert m, stdout
    return m.group(1)


def no_process_uses(path: str) -> bool:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if path.encode() in cmdline:
            return False
    return True


def test_demo_json_passes(child_env):
    """`gblk demo --json --seconds 3` exits 0; the last stdout line is a JSON object
    with requests, bytes, errors, mismatches, iops, mib_per_s; IO happened and was
    verified; the scratch host is gone afterwards (no files, no processes)."""
    p = run_demo(["--json", "--seconds", "3"], child_env)
    assert p.returncode == 0, p.stdout + p.stderr
    last = p.stdout.strip().splitlines()[-1]
    s = json.loads(last)
    for key in ("requests", "bytes", "errors", "mismatches", "iops", "mib_per_s"):
        assert key in s, key
    assert s["requests"] > 0 and s["bytes"] > 0 and s["iops"] > 0 and s["mib_per_s"] > 0
    assert s["errors"] == 0 and s["mismatches"] == 0 and s["violations"] == 0 and s["ok"]
    assert s["backend_exit"] == 0
    assert "http://127.0.0.1:" in p.stdout and s["metrics_url"].endswith("/metrics")
    d = sim_dir(p.stdout)
    assert not os.path.exists(d) and no_process_uses(d)


def test_demo_two_guests_on_one_image(child_env, tmp_path):
    """--guests 2 --image PATH --format raw: both guests share the image, each in its
    own region, and the demo still verifies everything it reads."""
    image = tmp_path / "shared.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    p = run_demo(["--json", "--seconds", "2", "--guests", "2", "--image", str(image),
                  "--format", "raw", "--metrics-address", "127.0.0.1:0"], child_env)
    assert p.returncode == 0, p.stdout + p.stderr
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert s["guests"] == 2 and s["errors"] == 0 and s["mismatches"] == 0
    assert p.stdout.count("guest d") == 2
    assert os.path.getsize(image) == 64 << 20


def test_demo_ctrl_c_shuts_down_cleanly(child_env):
    """SIGINT mid-run: the demo unplugs, stops the daemon and xenstored, removes its
    scratch host and exits 130 with a summary."""
    proc = subprocess.Popen([sys.executable, "-m", "gblk", "demo", "--seconds", "60", "--json"],
                            env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("running a mixed"):
                break
        out = "".join(lines)
        d = sim_dir(out)
        time.sleep(1.0)  # let IO flow
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=DEADLINE)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    assert proc.returncode == 130, out + rest + err
    s = json.loads(rest.strip().splitlines()[-1])
    assert s["interrupted"] and s["errors"] == 0 and s["mismatches"] == 0
    assert not os.path.exists(d) and no_process_uses(d)


@pytest.mark.parametrize("argv", [["--guests", "0"], ["--seconds", "-1"]])
def test_demo_rejects_bad_arguments(child_env, argv):
    """Bad arguments are refused up front, before anything is started."""
    p = run_demo(argv, child_env)
    assert p.returncode != 0


def test_demo_reports_a_refused_image(child_env, tmp_path):
    """An image in a format the daemon cannot serve: the demo fails at once (no
    60-second wait) with the backend's own reason, and still cleans up."""
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"\0" * 65536)
    started = time.monotonic()
    p = run_demo(["--json", "--seconds", "1", "--image", str(image), "--format", "qcow2"],
                 child_env)
    assert p.returncode == 1
    assert time.monotonic() - started < 50
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert not s["ok"] and "qcow2" in s["error"]
    assert not os.path.exists(sim_dir(p.stdout))
