"""``gblk bench`` through the real CLI, as a user runs it.

A short smoke run (two jobs, two page paths, half a second each) must finish with
exit 0 and a JSON list as the last stdout line whose rows carry every documented key
with sane types, no errors and every verification passed; a usage error must be one
clear line and exit 2. Nothing here asserts a speed: the figures depend on the
machine, the test only checks that they are there and well-formed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .host_tools import require_tool

#: a hang guard, not a performance bound
DEADLINE = 120

REQUIRED = {
    "job": str, "grant_path": str, "iops": float, "mib_per_s": float,
    "raw_iops": float, "raw_mib_per_s": float, "ratio": float,
    "backend_cpu_us_per_request": float, "frontend_cpu_us_per_request": float,
    "lat_p50_us": float, "lat_p99_us": float, "errors": int, "verify_failures": int,
    "verified": int, "requests": int, "guest_limited": bool, "fio_engine": str,
}


def run_bench(args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gblk", "bench", *args], env=env,
                          capture_output=True, text=True, timeout=DEADLINE)


def test_bench_smoke_json(child_env):
    """Two jobs (4 KiB random reads at depth 1, 1 MiB sequential writes at depth 4:
    direct and INDIRECT requests) on the persistent and the copy path: exit 0, one
    row per job and path with every required key, numbers where numbers belong,
    no error, every verification done and passed."""
    require_tool("fio", "fio")
    p = run_bench(["--seconds", "0.5", "--size", "32", "--jobs", "randread-4k-qd1,seqwrite-1m",
                   "--grant-mode", "persistent,copy", "--json"], child_env)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    assert isinstance(rows, list)
    assert [(r["grant_path"], r["job"]) for r in rows] == [
        ("persistent", "randread-4k-qd1"), ("persistent", "seqwrite-1m"),
        ("copy", "randread-4k-qd1"), ("copy", "seqwrite-1m")]
    for r in rows:
        for key, kind in REQUIRED.items():
            assert key in r, key
            value = r[key]
            if kind is float:
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
                assert value >= 0, (key, value)
            else:
                assert isinstance(value, kind), (key, value)
        assert r["errors"] == 0 and r["verify_failures"] == 0, r
        assert r["requests"] > 0 and r["verified"] > 0
        assert r["lat_p50_us"] <= r["lat_p99_us"]
    by_job = {r["job"]: r for r in rows if r["grant_path"] == "persistent"}
    assert by_job["randread-4k-qd1"]["fio_engine"] == "psync"
    assert by_job["seqwrite-1m"]["ring_requests_per_io"] == 1  # one INDIRECT request
    assert "ratio = gblk IOPS / fio IOPS" in p.stdout


@pytest.mark.parametrize("args, what", [
    (["--jobs", "randread-4k-qd1,no-such-job"], "unknown job 'no-such-job'"),
    (["--grant-mode", "persistent,sideways"], "unknown grant mode 'sideways'"),
])
def test_bench_usage_error_is_one_line(child_env, args, what):
    """A job or page path that does not exist: exit 2 before anything starts, and one
    line on stderr that names it and lists what exists."""
    p = run_bench(args, child_env)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and what in lines[0] and "known:" in lines[0], p.stderr
    assert p.stdout == ""


def test_bench_without_fio_says_how_to_get_it(child_env):
    """The raw side is not optional: with no fio on PATH the bench refuses in one
    line that says how to install it (and about --no-fio)."""
    env = dict(child_env, PATH="/nonexistent")
    p = run_bench(["--seconds", "0.5", "--jobs", "randread-4k-qd1"], env)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "apt-get install fio" in lines[0] and "--no-fio" in lines[0]


def test_bench_qcow2_beside_raw(child_env):
    """``--format raw,qcow2``: the same job on the raw image and on a qcow2 image with
    the same data through qemu-nbd, each verified, each beside fio on the raw file."""
    require_tool("fio", "fio")
    require_tool("qemu-nbd", "qemu-utils")
    p = run_bench(["--seconds", "0.3", "--size", "16", "--jobs", "randwrite-4k-qd32",
                   "--grant-mode", "persistent", "--format", "raw,qcow2", "--json"], child_env)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    assert [(r["format"], r["job"]) for r in rows] == [("raw", "randwrite-4k-qd32"),
                                                      ("qcow2", "randwrite-4k-qd32")]
    for r in rows:
        assert r["errors"] == 0 and r["verify_failures"] == 0 and r["verified"] > 0, r
        assert r["raw_iops"] > 0 and r["iops"] > 0
    assert "persistent/qcow2" in p.stdout
