"""systemd/gblk.service: `systemd-analyze verify` is clean, the hardening keeps the
overall exposure at 2.5 or less, and the unit agrees with what gblk does."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import List, Tuple

import pytest

from .host_tools import require_tool

from gblk.config import Config

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "gblk.service"
INSTALLED_GBLK = "/usr/local/bin/gblk"
MAX_EXPOSURE = 2.5



@pytest.fixture
def needs_analyze() -> None:
    require_tool("systemd-analyze", "systemd")


def parse_unit(text: str) -> List[Tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys repeat in units)."""
    out: List[Tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(section: str, key: str) -> List[str]:
    return [v for s, k, v in parse_unit(UNIT.read_text()) if s == section and k == key]


def single(section: str, key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{section}.{key}: {found}"
    return found[0]


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with its command pointing at an executable that exists here: verify
    checks that ExecStart= is executable, and gblk is not installed system-wide on a
    test machine."""
    stub = tmp_path / "bin" / "gblk"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert INSTALLED_GBLK in text
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    path = unit_dir / "gblk.service"
    path.write_text(text.replace(INSTALLED_GBLK, str(stub)))
    return path


@pytest.mark.usefixtures("needs_analyze")
def test_unit_verifies_clean(unit_copy: Path) -> None:
    """`systemd-analyze verify` reports nothing: no unknown keys, no bad values, the
    commands exist, referenced units are well-formed."""
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit_copy)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


@pytest.mark.usefixtures("needs_analyze")
def test_unit_exposure_is_at_most_2_5(unit_copy: Path) -> None:
    """`systemd-analyze security --offline=true` scores the hardening; gblk needs
    root for /dev/xen and the xenstored socket, and the network for /metrics, but
    everything else is locked down: overall exposure 2.5 or less."""
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit_copy)],
        capture_output=True, text=True, timeout=120,
    )
    text = proc.stdout + proc.stderr
    match = re.search(r"Overall exposure level for gblk\.service:\s*([0-9.]+)", text)
    assert match, text
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, text


def test_unit_tells_systemd_the_truth() -> None:
    """Readiness and liveness: Type=notify with READY=1 from the main process only,
    a watchdog, restart on failure but not on configuration errors (exit code 2),
    reload by SIGHUP after checking the file, and a stop timeout above the drain
    time (daemon.stop_timeout)."""
    assert single("Service", "Type") == "notify"
    assert single("Service", "NotifyAccess") == "main"
    assert single("Service", "WatchdogSec") == "30"
    assert single("Service", "Restart") == "on-failure"
    assert single("Service", "RestartPreventExitStatus") == "2"
    assert single("Service", "ExecStart") == f"{INSTALLED_GBLK} serve"
    assert values("Service", "ExecReload") == [
        f"{INSTALLED_GBLK} config --quiet",
        "/bin/kill -HUP $MAINPID",
    ]
    stop = float(single("Service", "TimeoutStopSec"))
    assert stop > Config().daemon.stop_timeout


def test_unit_ordering_around_xen() -> None:
    """Started after XenStore (Debian's xen.service from /etc/init.d/xen, or upstream's
    xenstored.service) and before xendomains starts guests."""
    after = " ".join(values("Unit", "After")).split()
    for unit in ("xen.service", "xenstored.service", "proc-xen.mount"):
        assert unit in after
    assert "xendomains.service" in single("Unit", "Before").split()
    assert "xenstored.service" in single("Unit", "Wants").split()


def test_unit_leaves_gblk_what_it_needs() -> None:
    """Hardening must not take away what the work needs: the Xen devices, block
    devices for images, local and TCP sockets, image directories, its state dir."""
    allowed = values("Service", "DeviceAllow")
    for dev in ("/dev/xen/gntdev rw", "/dev/xen/evtchn rw", "/dev/xen/xenbus rw", "block-* rw"):
        assert dev in allowed
    families = single("Service", "RestrictAddressFamilies").split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert values("Service", "PrivateNetwork") in ([], ["no"]), "metrics need the network"
    assert single("Service", "ProtectSystem") == "strict"
    rw = " ".join(values("Service", "ReadWritePaths")).split()
    assert "-/var/lib/xen" in rw
    assert single("Service", "StateDirectory") == "gblk"
    assert values("Service", "PrivateDevices") in ([], ["no"]), "PrivateDevices hides /dev/xen"
    assert values("Service", "PrivateUsers") in ([], ["no"]), "root must own /dev/xen access"


def test_example_config_is_shipped_beside_the_unit() -> None:
    """systemd/gblk.toml exists and is installed with the package data."""
    assert (REPO / "systemd" / "gblk.toml").is_file()
    setup = (REPO / "setup.cfg").read_text()
    assert "systemd/gblk.service" in setup and "systemd/gblk.toml" in setup


def test_unit_uses_the_default_config_path() -> None:
    """The unit relies on the documented default /etc/gblk/gblk.toml, so `gblk config`
    in ExecReload= checks the same file the daemon reads."""
    assert "--config" not in single("Service", "ExecStart")


def test_unit_runs_only_in_a_xen_control_domain() -> None:
    """Issue 15: on a host without Xen the unit restart-looped. It now carries the
    conditions of Xen's own dom0 disk backend: /proc/xen/capabilities must exist
    (Condition: skipped, not failed) and say control_d (ExecCondition=: exit 1 skips
    the unit, no restart). Not ConditionVirtualization=xen, which is false in dom0."""
    assert single("Unit", "ConditionPathExists") == "/proc/xen/capabilities"
    assert single("Service", "ExecCondition") == "/bin/grep -qw control_d /proc/xen/capabilities"
    assert values("Unit", "ConditionVirtualization") == []


def test_exec_condition_tells_dom0_from_the_rest(tmp_path: Path) -> None:
    """The ExecCondition= command itself, on the contents /proc/xen/capabilities has in
    dom0 ("control_d"), in a guest or driver domain (empty) and on a host without Xen
    (no file): only dom0 passes (exit 0); the others exit 1 (no match) or 2 (no
    file), and systemd skips a unit whose ExecCondition= exits 1..254, without a
    restart."""
    argv = single("Service", "ExecCondition").split()
    cases = {"control_d\n": 0, "": 1}
    for text, want in cases.items():
        caps = tmp_path / "capabilities"
        caps.write_text(text)
        assert subprocess.run(argv[:-1] + [str(caps)]).returncode == want, repr(text)
    assert subprocess.run(argv[:-1] + [str(tmp_path / "absent")],
                          stderr=subprocess.DEVNULL).returncode != 0


def test_unit_starts_before_libvirt_like_xens_own_backend() -> None:
    """Ordered before libvirt's units as xen-qemu-dom0-disk-backend.service is, so a
    libvirt-managed guest never starts before its disk backend."""
    before = single("Unit", "Before").split()
    for unit in ("xendomains.service", "libvirtd.service", "libvirt-guests.service"):
        assert unit in before


def test_control_socket_directory_is_root_only() -> None:
    """The control socket lives in the unit's RuntimeDirectory, which only root can
    enter; the configuration's default socket path is in it."""
    assert single("Service", "RuntimeDirectory") == "gblk"
    assert single("Service", "RuntimeDirectoryMode") == "0700"
    assert Config().control.socket == "/run/gblk/control.sock"
