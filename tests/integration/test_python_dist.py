"""`python -m build`: the sdist and the wheel built from a copy of the tree hold the
package, its three commands, and the data README's venv install takes from the install
prefix (``<prefix>/share/gblk/``): the systemd unit, the example configuration and the
whole monitoring kit; the wheel is built from the sdist (what `build` does by default),
so the sdist is complete. Built offline on Debian's python3 with Debian's python3-build,
-setuptools and -wheel (``--no-isolation``: no download of a build environment)."""

from __future__ import annotations

import tarfile
import zipfile
from typing import List, Set

import pytest

from .packaging_support import DEBIAN_PYTHON, REPO, VERSION, copy_tree, require_debian_modules, run

#: the data files, as paths relative to the tree (and to <prefix>/share/gblk in an install)
DATA = ["systemd/gblk.service", "systemd/gblk.toml"] + sorted(
    str(p.relative_to(REPO)) for p in (REPO / "monitoring").rglob("*") if p.is_file()
)


class Dists:
    def __init__(self, sdist: List[str], wheel: List[str], entry_points: str) -> None:
        self.sdist = sdist
        self.wheel = wheel
        self.entry_points = entry_points


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    require_debian_modules(("build", "python3-build"), ("setuptools", "python3-setuptools"),
                           ("wheel", "python3-wheel"))
    work = tmp_path_factory.mktemp("dist")
    src = copy_tree(work / "gblk")
    out = work / "out"
    proc = run([DEBIAN_PYTHON, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], cwd=work)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"gblk-{VERSION}-py3-none-any.whl", f"gblk-{VERSION}.tar.gz"], names
    with tarfile.open(out / f"gblk-{VERSION}.tar.gz") as tar:
        sdist = tar.getnames()
    with zipfile.ZipFile(out / f"gblk-{VERSION}-py3-none-any.whl") as whl:
        wheel = whl.namelist()
        entry_points = whl.read(f"gblk-{VERSION}.dist-info/entry_points.txt").decode()
    return Dists(sdist, wheel, entry_points)


def _under(names: List[str], prefix: str) -> Set[str]:
    return {n[len(prefix):] for n in names if n.startswith(prefix)}


def test_data_files_are_in_the_tree_and_the_list_is_not_empty() -> None:
    assert "monitoring/rules/alerts.yml" in DATA and "monitoring/grafana/gblk.json" in DATA
    assert "monitoring/README.md" in DATA


def test_wheel_installs_the_unit_config_and_monitoring_kit(dists: Dists) -> None:
    data = _under(dists.wheel, f"gblk-{VERSION}.data/data/share/gblk/")
    assert data == set(DATA), sorted(data ^ set(DATA))
    modules = _under(dists.wheel, "gblk/")
    assert {"__init__.py", "cli.py", "daemon.py", "hotplug.py", "devicemodel.py", "manpage.py"} <= modules
    assert not [n for n in dists.wheel if n.startswith("tests/") or "__pycache__" in n]
    for line in ("gblk = gblk.cli:main", "gblk-xl-hotplug = gblk.hotplug:main",
                 "gblk-device-model = gblk.devicemodel:main"):
        assert line in dists.entry_points, dists.entry_points


def test_sdist_holds_the_same_data_and_what_builds_the_wheel(dists: Dists) -> None:
    top = f"gblk-{VERSION}/"
    files = _under(dists.sdist, top)
    assert set(DATA) <= files, sorted(set(DATA) - files)
    assert {"README.md", "LICENSE", "setup.cfg", "setup.py", "pyproject.toml", "gblk/cli.py"} <= files
    assert not [n for n in files if n.startswith(("tests/", "debian/", ".ci/")) or "__pycache__" in n]


def test_readme_points_to_the_installed_data() -> None:
    """README's venv install takes the unit and the configuration from where the wheel
    puts them, and names the monitoring kit's place."""
    readme = (REPO / "README.md").read_text()
    for path in ("/opt/gblk/share/gblk/systemd/gblk.service", "/opt/gblk/share/gblk/systemd/gblk.toml",
                 "/opt/gblk/share/gblk/monitoring"):
        assert path in readme, path
