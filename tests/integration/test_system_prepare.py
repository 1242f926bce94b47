"""What the real-Xen system suite hands to dom0, checked on this machine: a mistake here
would only show after a 20-minute boot.

- the .deb dom0 installs is built from the tree, cached on the files the build sees:
  a change to gblk builds a new one, a change to the suite does not;
- dom0 has no systemd: ``tests/system/dom0/service.py`` starts the installed unit as
  its file says; here it runs the tree's unit on a real ``gblk serve`` (simulated host);
- the ``readme_qdisk`` scenario takes README's qdisk lines as written: they must name the
  device model where the package installs it.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import time
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO
from tests.system import debpkg

DOM0 = REPO / "tests" / "system" / "dom0"


def _tree(root: Path) -> Path:
    for rel, text in (("debian/changelog", "gblk (1.2.3) unstable; urgency=medium\n"),
                      ("gblk/a.py", "x = 1\n"), ("setup.cfg", "[metadata]\n"),
                      ("tests/system/payload.py", "y = 1\n")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_deb_cache_key_follows_what_the_build_sees(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    key = debpkg.cache_key(tree)
    assert [str(p) for p in debpkg.tree_files(tree)] == ["setup.cfg", "debian/changelog", "gblk/a.py"]
    assert debpkg.deb_name(tree) == "gblk_1.2.3_all.deb"
    (tree / "tests/system/payload.py").write_text("y = 2\n")  # the suite: same package
    (tree / "gblk/__pycache__").mkdir()
    (tree / "gblk/__pycache__/a.cpython-311.pyc").write_bytes(b"\0")
    assert debpkg.cache_key(tree) == key
    (tree / "gblk/a.py").write_text("x = 2\n")  # gblk itself: a new package
    assert debpkg.cache_key(tree) != key


def _load_service() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gblk_lab_service", DOM0 / "service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_service_stand_in_runs_the_unit(tmp_path: Path, xenstored: str, gblk_cmd: list) -> None:
    """The tree's unit, with only the commands and paths this machine needs changed:
    conditions evaluated, READY=1 and STATUS= over $NOTIFY_SOCKET from the main process,
    watchdog pings, ExecReload= (check, SIGHUP: gblk logs the reload), stop with
    STOPPING=1 and exit 0; a failing ExecCondition= refuses to start."""
    xenstored_dir = Path(xenstored).parent  # sim:DIR finds DIR/xenstored.sock
    service = _load_service()
    service.NOTIFY_DIR = str(xenstored_dir / "notify")
    gblk = " ".join(gblk_cmd)
    run_dir = f"gblk-lab-test-{xenstored_dir.name}"
    unit = (REPO / "systemd" / "gblk.service").read_text()
    unit = re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={gblk} serve --xen sim:{xenstored_dir} "
                  f"--metrics-address 127.0.0.1:0 --control-socket /run/{run_dir}/control.sock", unit)
    unit = re.sub(r"(?m)^ExecReload=/usr/local/bin/gblk ", f"ExecReload={gblk} ", unit)
    unit = re.sub(r"(?m)^ExecCondition=.*$", "ExecCondition=/bin/true", unit)
    unit = re.sub(r"(?m)^ConditionPathExists=.*$", f"ConditionPathExists={xenstored_dir}", unit)
    unit = re.sub(r"(?m)^RuntimeDirectory=.*$", f"RuntimeDirectory={run_dir}", unit)
    unit = re.sub(r"(?m)^WatchdogSec=.*$", "WatchdogSec=2", unit)
    path = xenstored_dir / "gblk.service"
    path.write_text(unit)
    log = xenstored_dir / "gblk.log"
    svc = service.Service(str(log), unit=str(path))
    try:
        svc.start(30)
        assert svc.ready() and svc.status_text(), svc.messages()
        assert oct(Path(f"/run/{run_dir}").stat().st_mode & 0o777) == "0o700"
        time.sleep(2.5)
        assert [rc for _, rc in svc.reload()] == [0, 0]
        deadline = time.monotonic() + 10
        while "reloaded:" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reloaded: nothing changed" in log.read_text()
        pings, gap = svc.watchdog_gaps()
        assert pings >= 1 and gap < 2, (pings, gap)
        assert svc.foreign_senders() == []
        assert svc.stop() == 0
        assert any(f.get("STOPPING") == "1" for _, _, f in svc.messages())
    finally:
        if svc.alive():
            svc.proc.kill()
        subprocess.run(["rm", "-rf", f"/run/{run_dir}"], check=False)
    path.write_text(re.sub(r"(?m)^ExecCondition=.*$", "ExecCondition=/bin/false", unit))
    with pytest.raises(service.UnitError, match="ExecCondition=/bin/false exited 1"):
        service.Service(str(log), unit=str(path)).start(5)


def test_readme_lines_name_what_the_package_installs() -> None:
    """README's qdisk block (what readme_qdisk runs verbatim) names gblk-device-model where
    the package puts it, its phy and tap lines the hotplug script by the bare name the
    package's /etc/xen/scripts link serves, and nothing names the old stand-in."""
    text = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
              if "backendtype=qdisk" in b and "device_model_override" in b]
    assert len(blocks) == 1, blocks
    override = re.search(r'device_model_override\s*=\s*"([^"]+)"', blocks[0])
    assert override is not None and override.group(1) == "/usr/bin/gblk-device-model"
    assert "usr/bin/gblk-xl-hotplug etc/xen/scripts/gblk-xl-hotplug" in (REPO / "debian/gblk.links").read_text()
    scripts = re.findall(r"backendtype=(?:phy|tap),script=([^,]+),", text)
    assert scripts and set(scripts) == {"gblk-xl-hotplug"}, scripts
    assert "standin" not in text
