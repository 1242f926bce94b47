"""What the real-Xen system suite hands to dom0, checked on this machine: a mistake here
would only show after a 20-minute boot.

- dom0 has no pip: the runner writes gblk's console scripts from setup.cfg as pip would,
  and libxl runs ``/usr/local/bin/gblk-device-model`` from them;
- the ``readme_qdisk`` scenario takes README's qdisk lines as written: they must name the
  shipped device model where README's install section links it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import PROCESS_DEADLINE, REPO
from tests.system import runner


def test_console_scripts_for_dom0(tmp_path: Path, child_env: dict) -> None:
    """One wrapper per console_scripts entry; each runs its entry point (here with the
    tree under test in place of dom0's /mnt/share/src)."""
    names = runner.write_console_scripts(REPO / "setup.cfg", tmp_path)
    assert {"gblk", "gblk-xl-hotplug", "gblk-device-model"} <= set(names)
    import gblk

    tree = str(Path(gblk.__file__).resolve().parent.parent)
    script = tmp_path / "gblk-device-model"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/python3\n") and '"/mnt/share/src"' in text
    script.write_text(text.replace("/mnt/share/src", tree))
    proc = subprocess.run([sys.executable, str(script), "--version"], env=child_env,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=PROCESS_DEADLINE)
    assert proc.returncode == 0 and proc.stdout.decode().startswith("gblk-device-model ")


def test_readme_qdisk_lines_name_the_installed_device_model() -> None:
    """README's qdisk block (what readme_qdisk runs verbatim) names gblk-device-model at
    the path the install section links it to, and nothing names the old stand-in."""
    text = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
              if "backendtype=qdisk" in b and "device_model_override" in b]
    assert len(blocks) == 1, blocks
    override = re.search(r'device_model_override\s*=\s*"([^"]+)"', blocks[0])
    assert override is not None and override.group(1) == "/usr/local/bin/gblk-device-model"
    assert re.search(r"^ln -sf .*/opt/gblk/bin/gblk-device-model .*/usr/local/bin/", text, re.M)
    assert "standin" not in text
