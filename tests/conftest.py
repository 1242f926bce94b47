"""Test-session setup shared by every layer of tests.

The test process is an entry point like ``gblk`` itself: gevent is monkey-patched
here, first, before any test module is imported (``queue=False``, as ``gblk`` does).
Library code never patches.

Fixtures here are small and generic: how to run ``gblk`` as a real process, and a
simulated xenstored on a real Unix socket.
"""

from __future__ import annotations

from gevent import monkey

if not monkey.is_module_patched("socket"):
    monkey.patch_all(queue=False)

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator, List  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

#: generous bound for a child process to do something it must do (a hang guard,
#: not a performance assertion)
PROCESS_DEADLINE = 60.0


@pytest.fixture
def gblk_cmd() -> List[str]:
    """argv prefix that runs the ``gblk`` command of the gblk under test."""
    return [sys.executable, "-m", "gblk"]


@pytest.fixture
def child_env(tmp_path: Path) -> dict:
    """An environment for child processes: no systemd or XenStore variables leaking
    in from the test runner's own environment, and the gblk under test importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
                     "XENSTORED_PATH", "XENSTORED_RUNDIR", "LISTEN_FDS", "LISTEN_PID")
    }
    # the same gblk the test process imports (source tree or installed package)
    import gblk

    pkg_parent = str(Path(gblk.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [pkg_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=PROCESS_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def xenstored(tmp_path: Path, child_env: dict) -> Iterator[str]:
    """A simulated xenstored (real wire protocol) on ``tmp_path/xenstored.sock``,
    the socket path a ``sim:DIR`` host uses. Yields the socket path."""
    from .integration.xenstored_support import start_xenstored  # the one way to start it

    path = str(tmp_path / "xenstored.sock")
    proc = start_xenstored(path, env=child_env)
    try:
        yield path
    finally:
        stop_process(proc)


#: modules of the hostile suite (``pytest -m hostile``, docs/testing.md): hostile
#: guests, protocol conformance, request validation, storage faults. New modules of
#: the suite mark themselves (``pytestmark = pytest.mark.hostile``).
HOSTILE_MODULES = frozenset({
    "test_hostile_grants", "test_hostile_lifecycle", "test_hostile_ring",
    "test_backend_safety", "test_backend_matrix",
    "test_blkif_validate", "test_blkif_abi", "test_blkif_ring",
})


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        name = getattr(module, "__name__", "").rpartition(".")[2]
        if name in HOSTILE_MODULES:
            item.add_marker(pytest.mark.hostile)
