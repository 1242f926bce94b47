"""gblk-xl-hotplug against a simulated xenstored, run the way libxl runs it:
``SCRIPT add|remove`` with XENBUS_PATH relative to dom0, stdin from /dev/null."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from gblk.hotplug import HotplugFailed, backend_kind, backend_path, run
from gblk.xen.xenstore import GeventXenStore
from tests.conftest import PROCESS_DEADLINE

DOMID, DEVID = 5, 51712
RELATIVE = f"backend/vbd/{DOMID}/{DEVID}"
BACKEND = f"/local/domain/0/{RELATIVE}"


@pytest.fixture
def store(xenstored: str) -> Iterator[GeventXenStore]:
    xs = GeventXenStore(socket_path=xenstored, timeout=10.0)
    yield xs
    xs.close()


def make_backend(xs: GeventXenStore, state: int, **nodes: str) -> None:
    """What libxl writes for a vbd before it runs the script (abridged)."""
    xs.write(f"{BACKEND}/frontend-id", str(DOMID))
    xs.write(f"{BACKEND}/online", "1")
    xs.write(f"{BACKEND}/params", "/srv/disk.img")
    xs.write(f"{BACKEND}/state", str(state))
    for key, value in nodes.items():
        xs.write(f"{BACKEND}/{key.replace('_', '-')}", value)


def start_script(action: str, xenstored: str, child_env: dict, timeout: str = "20",
                 xenbus_path: str = RELATIVE) -> subprocess.Popen:
    env = dict(child_env, XENBUS_PATH=xenbus_path, XENSTORED_PATH=xenstored,
               GBLK_HOTPLUG_TIMEOUT=timeout, XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend")
    return subprocess.Popen(
        [sys.executable, "-m", "gblk.hotplug", action], env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen) -> Tuple[int, str]:
    _, err = proc.communicate(timeout=PROCESS_DEADLINE)
    return proc.returncode, err.decode()


# --- add ------------------------------------------------------------------------------


def test_add_succeeds_when_gblk_already_took_the_device(
    store: GeventXenStore, xenstored: str, child_env: dict
) -> None:
    """libxl runs the script after InitWait: gblk has taken the disk and said so with
    hotplug-status=connected; the script confirms with exit 0 and changes nothing."""
    make_backend(store, 2, hotplug_status="connected")
    code, err = finish(start_script("add", xenstored, child_env))
    assert code == 0, err
    assert store.read(f"{BACKEND}/hotplug-status") == "connected"
    assert store.read(f"{BACKEND}/hotplug-error") is None


def test_add_waits_until_gblk_takes_the_device(
    store: GeventXenStore, xenstored: str, child_env: dict
) -> None:
    """Started before the backend reached InitWait, the script waits for it, then
    writes hotplug-status=connected (as xen-hotplug-common.sh's success does)."""
    make_backend(store, 1)
    proc = start_script("add", xenstored, child_env)
    store.write(f"{BACKEND}/state", "2")
    code, err = finish(proc)
    assert code == 0, err
    assert store.read(f"{BACKEND}/hotplug-status") == "connected"


def test_add_times_out_and_tells_libxl_why(
    store: GeventXenStore, xenstored: str, child_env: dict
) -> None:
    """gblk not running (state stays Initialising): after GBLK_HOTPLUG_TIMEOUT the
    script writes hotplug-error (libxl logs it as "script: ...") and
    hotplug-status=error, and exits 1 so the attach fails."""
    make_backend(store, 1)
    code, err = finish(start_script("add", xenstored, child_env, timeout="0.3"))
    assert code == 1
    assert store.read(f"{BACKEND}/hotplug-status") == "error"
    error = store.read(f"{BACKEND}/hotplug-error") or ""
    assert "did not take" in error and "daemon.kinds" in error and "'vbd'" in error
    assert err.count("\n") == 1 and "did not take" in err


def test_add_relays_gblks_own_error(store: GeventXenStore, xenstored: str, child_env: dict) -> None:
    """When gblk refused the disk (hotplug-status=error with its reason), the script
    fails at once and passes gblk's reason on."""
    make_backend(store, 1, hotplug_status="error", hotplug_error="cannot open /srv/disk.img: ENOENT")
    code, err = finish(start_script("add", xenstored, child_env))
    assert code == 1
    assert "cannot open /srv/disk.img: ENOENT" in err
    assert "cannot open /srv/disk.img" in (store.read(f"{BACKEND}/hotplug-error") or "")


def test_add_fails_if_device_closed(store: GeventXenStore, xenstored: str, child_env: dict) -> None:
    """A device that went to Closed before it connected is a failed attach."""
    make_backend(store, 6)
    code, err = finish(start_script("add", xenstored, child_env))
    assert code == 1
    assert "Closed" in err
    assert store.read(f"{BACKEND}/hotplug-status") == "error"


def test_add_after_the_guest_already_closed_a_taken_device(
    store: GeventXenStore, xenstored: str, child_env: dict
) -> None:
    """On a busy dom0 the script can start after the guest connected and closed the
    disk again: gblk had taken it (hotplug-status=connected), so the attach succeeded."""
    make_backend(store, 6, hotplug_status="connected")
    code, err = finish(start_script("add", xenstored, child_env))
    assert code == 0, err
    assert store.read(f"{BACKEND}/hotplug-error") is None


def test_script_stays_light(xenstored: str, child_env: dict) -> None:
    """libxl kills the script after 40 s, and a busy dom0 needed most of that to import
    gevent and pyxs: the script talks to XenStore with neither."""
    code = ("import sys, gblk.hotplug\n"
            "heavy = sorted(m for m in ('gevent', 'pyxs', 'prometheus_client', 'cffi') if m in sys.modules)\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True,
                         text=True, timeout=PROCESS_DEADLINE)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_add_never_recreates_a_removed_directory(
    store: GeventXenStore, xenstored: str, child_env: dict
) -> None:
    """If the toolstack removed the backend directory meanwhile, the failure is not
    written back (that would recreate the directory as debris)."""
    make_backend(store, 1)
    proc = start_script("add", xenstored, child_env)
    store.rm(BACKEND)
    code, err = finish(proc)
    assert code == 1
    assert "disappeared" in err
    assert store.read(BACKEND) is None


def test_add_accepts_an_absolute_path(store: GeventXenStore, xenstored: str, child_env: dict) -> None:
    """XENBUS_PATH may also be absolute (a toolstack of one's own)."""
    make_backend(store, 4)
    code, err = finish(start_script("add", xenstored, child_env, xenbus_path=BACKEND))
    assert code == 0, err


# --- remove ---------------------------------------------------------------------------


def test_remove_waits_until_gblk_let_go(store: GeventXenStore, xenstored: str, child_env: dict) -> None:
    """On detach the script returns once gblk wrote Closed (image closed)."""
    make_backend(store, 5, online="0")
    proc = start_script("remove", xenstored, child_env)
    store.write(f"{BACKEND}/state", "6")
    code, err = finish(proc)
    assert code == 0, err


def test_remove_returns_when_the_directory_is_gone(
    store: GeventXenStore, xenstored: str, child_env: dict
) -> None:
    """A backend directory already removed means gblk let go."""
    code, err = finish(start_script("remove", xenstored, child_env))
    assert code == 0, err


def test_remove_is_bounded(store: GeventXenStore, xenstored: str, child_env: dict) -> None:
    """If gblk never lets go, remove gives up after the timeout with a message."""
    make_backend(store, 5, online="0")
    code, err = finish(start_script("remove", xenstored, child_env, timeout="0.3"))
    assert code == 1
    assert "did not release" in err


# --- usage ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,env,fragment",
    [
        ([], {"XENBUS_PATH": RELATIVE}, "usage"),
        (["attach"], {"XENBUS_PATH": RELATIVE}, "unknown action"),
        (["add"], {}, "XENBUS_PATH is not set"),
    ],
)
def test_usage_errors(child_env: dict, args: List[str], env: Dict[str, str], fragment: str) -> None:
    """Run by hand without libxl's environment, the script explains itself (exit 2)."""
    proc = subprocess.run(
        [sys.executable, "-m", "gblk.hotplug"] + args, env=dict(child_env, **env),
        stdin=subprocess.DEVNULL, capture_output=True, timeout=PROCESS_DEADLINE,
    )
    assert proc.returncode == 2
    assert fragment in proc.stderr.decode()


def test_bad_timeout_and_no_xenstore(tmp_path: Path, child_env: dict) -> None:
    """A bad GBLK_HOTPLUG_TIMEOUT or an unreachable XenStore is one line, exit 1."""
    for timeout, fragment in (("soon", "GBLK_HOTPLUG_TIMEOUT"), ("5", "no XenStore")):
        env = dict(child_env, XENBUS_PATH=RELATIVE, GBLK_HOTPLUG_TIMEOUT=timeout,
                   XENSTORED_PATH=str(tmp_path / "none.sock"))
        proc = subprocess.run(
            [sys.executable, "-m", "gblk.hotplug", "add"], env=env,
            stdin=subprocess.DEVNULL, capture_output=True, timeout=PROCESS_DEADLINE,
        )
        err = proc.stderr.decode()
        assert proc.returncode == 1
        assert fragment in err and err.count("\n") == 1 and "Traceback" not in err


# --- the decision logic, with a dict for a XenStore ----------------------------------------


class DictStore:
    def __init__(self, nodes: Dict[str, str]) -> None:
        self.nodes = dict(nodes)

    def read(self, path: str) -> Optional[str]:
        return self.nodes.get(path)

    def write(self, path: str, value: str) -> None:
        self.nodes[path] = value


def test_vbd_refused_while_kernel_blkback_is_loaded() -> None:
    """With xen-blkback loaded the kernel claims every vbd: report that, not a timeout."""
    xs = DictStore({BACKEND: "", f"{BACKEND}/state": "2"})
    with pytest.raises(HotplugFailed, match="modprobe -r xen-blkback"):
        run("add", BACKEND, xs.read, xs.write, 1.0, is_blkback_loaded=lambda: True)
    assert xs.nodes[f"{BACKEND}/hotplug-status"] == "error"
    qdisk = BACKEND.replace("/vbd/", "/vbd3/")
    xs = DictStore({qdisk: "", f"{qdisk}/state": "2"})
    run("add", qdisk, xs.read, xs.write, 1.0, is_blkback_loaded=lambda: True)
    assert xs.nodes[f"{qdisk}/hotplug-status"] == "connected"


def test_add_polls_until_taken_and_remove_until_closed() -> None:
    """The waiting itself, step by step: add returns on the first poll that sees
    InitWait, remove on the first that sees Closed; neither gives up early."""
    xs = DictStore({BACKEND: "", f"{BACKEND}/state": "1"})
    now = [0.0]
    polls: List[float] = []

    def sleep(seconds: float) -> None:
        polls.append(now[0])
        now[0] += seconds
        if len(polls) == 5:
            xs.write(f"{BACKEND}/state", "2" if xs.nodes[f"{BACKEND}/state"] == "1" else "6")

    run("add", BACKEND, xs.read, xs.write, 30.0, clock=lambda: now[0], sleep=sleep,
        is_blkback_loaded=lambda: False)
    assert len(polls) == 5
    assert xs.nodes[f"{BACKEND}/hotplug-status"] == "connected"
    xs.write(f"{BACKEND}/state", "5")
    polls.clear()
    run("remove", BACKEND, xs.read, xs.write, 30.0, clock=lambda: now[0], sleep=sleep)
    assert len(polls) == 5


def test_path_helpers() -> None:
    """libxl's relative XENBUS_PATH resolves under dom0's home; the kind is read off it."""
    assert backend_path(RELATIVE) == BACKEND
    assert backend_path(BACKEND + "/") == BACKEND
    assert backend_kind(BACKEND) == "vbd"
    assert backend_kind("/local/domain/0/backend/vbd3/1/2") == "vbd3"
    assert backend_kind("nonsense") is None
    with pytest.raises(HotplugFailed):
        backend_path("/")
