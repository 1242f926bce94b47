"""The Debian package (debian/): built from a copy of the tree with
``dpkg-buildpackage -us -uc -b`` as README says, then checked without installing it
(installing would change this machine): ``lintian`` is clean, the files are where
Debian puts them, the conffile and maintainer scripts are what an upgrade with running
guests needs, the unpacked commands run on Debian's own /usr/bin/python3 and its
python3-gevent etc., the man page renders and the packaged unit verifies."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict

import pytest

from .host_tools import require_tool
from .packaging_support import DEBIAN_PYTHON, IGNORE, REPO, VERSION, clean_env, run

DEB = f"gblk_{VERSION}_all.deb"
SUBCOMMANDS = ["serve", "demo", "sim", "bench", "list", "stats", "status", "config", "hash-password"]


class Built:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.deb = out / DEB
        self.changes = out / f"gblk_{VERSION}_{self.arch()}.changes"
        self.root = out / "unpacked"
        self.control = out / "control"

    @staticmethod
    def arch() -> str:
        return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip()

    def python_env(self, **extra: str) -> Dict[str, str]:
        return clean_env(PYTHONPATH=str(self.root / "usr/lib/python3/dist-packages"), **extra)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    for tool, package in (("dpkg-buildpackage", "dpkg-dev"), ("dh", "debhelper"),
                          ("pybuild", "dh-python")):
        require_tool(tool, package)
    if not Path(DEBIAN_PYTHON).exists():
        pytest.skip(f"{DEBIAN_PYTHON} is not installed")
    probe = run([DEBIAN_PYTHON, "-c", "import setuptools, wheel"])
    if probe.returncode != 0:
        why = "Debian's python3-setuptools and python3-wheel are not installed"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    out = tmp_path_factory.mktemp("deb")
    src = out / "gblk"  # dpkg-buildpackage writes the .deb next to the tree: into `out`
    shutil.copytree(REPO, src, ignore=IGNORE, symlinks=True)
    deps = run(["dpkg-checkbuilddeps"], cwd=src)  # debian/control's Build-Depends
    if deps.returncode != 0:
        why = f"{deps.stderr.strip()} (.ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    proc = run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    b = Built(out)
    assert b.deb.exists() and b.changes.exists(), sorted(p.name for p in out.iterdir())
    assert run(["dpkg-deb", "-x", str(b.deb), str(b.root)]).returncode == 0
    assert run(["dpkg-deb", "-e", str(b.deb), str(b.control)]).returncode == 0
    return b


def test_changelog_version_is_the_package_version() -> None:
    """debian/changelog gives the .deb its version: it must be gblk.__version__ (the
    version setup.cfg reads)."""
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    match = re.match(r"gblk \(([^)]+)\) ", first)
    assert match and match.group(1) == VERSION, first


def test_lintian_is_clean(built: Built) -> None:
    """No error, warning or info tag; each override is in debian/gblk.lintian-overrides
    with the reason."""
    require_tool("lintian", "lintian")
    proc = run(["lintian", "--info", "--display-info", "--pedantic",
                str(built.changes), str(built.deb)])
    tags = [line for line in proc.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    assert tags == [], proc.stdout + proc.stderr


def test_files_are_where_debian_puts_them(built: Built) -> None:
    listing = run(["dpkg", "-c", str(built.deb)]).stdout
    paths = {re.sub(r" -> .*$", "", line.split(None, 5)[5]).lstrip(".") for line in listing.splitlines()}
    for path in (
        "/usr/bin/gblk", "/usr/bin/gblk-xl-hotplug", "/usr/bin/gblk-device-model",
        "/etc/gblk/gblk.toml", "/lib/systemd/system/gblk.service",
        "/usr/share/man/man8/gblk.8.gz", "/usr/share/man/man8/gblk-xl-hotplug.8.gz",
        "/usr/share/man/man8/gblk-device-model.8.gz",
        "/etc/xen/scripts/gblk-xl-hotplug",
        "/usr/share/gblk/monitoring/README.md", "/usr/share/gblk/monitoring/rules/alerts.yml",
        "/usr/share/gblk/monitoring/grafana/gblk.json",
        "/usr/lib/python3/dist-packages/gblk/cli.py",
        "/usr/share/doc/gblk/copyright", "/usr/share/doc/gblk/README.Debian",
        "/usr/share/doc/gblk/storage-nbd.md.gz",
        # README's incremental backup runs it (the system suite's backup scenario too)
        "/usr/share/doc/gblk/examples/gblk-apply-extents",
    ):
        assert path in paths, path
    # the pip install's data files are not shipped a second time, the tests not at all
    assert not [p for p in paths if p.startswith(("/usr/share/gblk/systemd", "/usr/local"))]
    assert not [p for p in paths if "/dist-packages/tests" in p]
    hotplug = built.root / "etc/xen/scripts/gblk-xl-hotplug"
    assert os.readlink(hotplug) == "/usr/bin/gblk-xl-hotplug"
    for exe in ("gblk", "gblk-xl-hotplug", "gblk-device-model"):
        text = (built.root / "usr/bin" / exe).read_text()
        assert text.startswith(f"#!{DEBIAN_PYTHON}\n"), text.splitlines()[0]
        assert os.access(built.root / "usr/bin" / exe, os.X_OK)


def test_control_fields(built: Built) -> None:
    def field(name: str) -> str:
        return run(["dpkg-deb", "-f", str(built.deb), name]).stdout.strip()

    assert field("Architecture") == "all"
    assert field("Version") == VERSION
    depends = [d.strip() for d in field("Depends").split(",")]
    for dep in ("python3-gevent", "python3-cffi", "python3-prometheus-client",
                "libxengnttab1", "libxenevtchn1"):
        assert dep in depends, depends
    assert any(d.startswith("python3:any") for d in depends), depends
    assert "python3-pyxs" not in depends, depends  # gblk speaks XenStore itself
    assert field("Recommends") == "qemu-utils"


def test_conffile_is_the_example_configuration(built: Built) -> None:
    """/etc/gblk/gblk.toml is the only conffile (operators' edits survive upgrades),
    it is systemd/gblk.toml with the package's paths, and gblk accepts it."""
    conffiles = (built.control / "conffiles").read_text().split()
    assert conffiles == ["/etc/gblk/gblk.toml"]
    shipped = (built.root / "etc/gblk/gblk.toml").read_text()
    assert shipped == (REPO / "systemd/gblk.toml").read_text().replace("/usr/local/bin/", "/usr/bin/")
    proc = run([DEBIAN_PYTHON, str(built.root / "usr/bin/gblk"), "config", "--quiet",
                "--config", str(built.root / "etc/gblk/gblk.toml")], env=built.python_env())
    assert proc.returncode == 0, proc.stderr


def test_upgrade_hands_over_and_removal_stops_gblk(built: Built) -> None:
    """An upgrade must not take guests' disks down: prerm stops gblk only on removal;
    postinst enables it, starts it on install, restarts nothing itself and on an
    upgrade runs the handover (tests/integration/test_restarts.py runs that script
    against a real daemon), which ships executable in /usr/libexec/gblk."""
    prerm = (built.control / "prerm").read_text()
    stops = [line for line in prerm.splitlines() if "deb-systemd-invoke stop" in line]
    assert len(stops) == 1
    assert re.search(r'if .*"\$1" = remove .*\n\s*deb-systemd-invoke stop .gblk\.service', prerm), prerm
    postinst = (built.control / "postinst").read_text()
    assert "deb-systemd-helper enable 'gblk.service'" in postinst
    assert "deb-systemd-invoke start 'gblk.service'" in postinst
    code = "\n".join(line for line in postinst.splitlines() if not line.lstrip().startswith("#"))
    assert "restart" not in code and "stop" not in code
    assert re.search(r'if \[ "\$1" = configure \] && \[ -n "\$\{2:-\}" \].*/run/systemd/system.*\n'
                     r'\s*/usr/libexec/gblk/handover \|\| true\n', postinst), postinst
    script = built.root / "usr/libexec/gblk/handover"
    assert os.access(script, os.X_OK)
    assert script.read_text() == (REPO / "debian/handover").read_text()


def test_unpacked_commands_run_on_debian_python(built: Built, tmp_path: Path) -> None:
    env = built.python_env()
    bin_dir = built.root / "usr/bin"
    proc = run([DEBIAN_PYTHON, str(bin_dir / "gblk"), "--help"], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in SUBCOMMANDS:
        assert name in proc.stdout, name
    proc = run([DEBIAN_PYTHON, str(bin_dir / "gblk"), "--version"], env=env, cwd=tmp_path)
    assert proc.stdout.strip() == f"gblk {VERSION}", proc.stdout + proc.stderr
    # the package's modules, not the tree's: and they import on Debian's libraries
    proc = run([DEBIAN_PYTHON, "-c",
                "import gblk, gblk.daemon, gblk.hotplug, gblk.devicemodel, gevent; "
                "print(gblk.__file__)"], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(built.root)), proc.stdout
    proc = run([DEBIAN_PYTHON, str(bin_dir / "gblk-xl-hotplug"), "--help"], env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "gblk-xl-hotplug add|remove" in proc.stdout, proc.stderr
    proc = run([DEBIAN_PYTHON, str(bin_dir / "gblk-xl-hotplug"), "add"], env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "XENBUS_PATH is not set" in proc.stderr, proc.stderr
    proc = run([DEBIAN_PYTHON, str(bin_dir / "gblk-device-model"), "--help"], env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "-xen-domid" in proc.stdout, proc.stderr


def test_man_page_renders(built: Built) -> None:
    man = require_tool("man", "man-db")
    page = built.root / "usr/share/man/man8/gblk.8.gz"
    proc = run([man, "--warnings", "-l", str(page)], env=clean_env(MANWIDTH="100", MAN_KEEP_FORMATTING=""))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    text = proc.stdout
    assert "GBLK(8)" in text and "NAME\n       gblk, gblk-xl-hotplug, gblk-device-model - a userspace" in text
    for name in SUBCOMMANDS:
        assert f"   gblk {name}\n" in text, name
    assert "--metrics-address HOST:PORT" in text and "gblk-xl-hotplug add|remove" in text


def test_packaged_unit_verifies_and_runs_the_packaged_gblk(built: Built, tmp_path: Path) -> None:
    """The unit's commands are the package's /usr/bin/gblk, and `systemd-analyze verify`
    is clean (its commands pointed at the unpacked tree, its man page found there)."""
    require_tool("systemd-analyze", "systemd")
    unit = (built.root / "lib/systemd/system/gblk.service").read_text()
    assert "/usr/local" not in unit
    execs = re.findall(r"^Exec(?:Start|Reload)=(\S+)", unit, re.M)
    assert execs[0] == "/usr/bin/gblk" and execs.count("/usr/bin/gblk") == 2, execs
    assert (built.root / "usr/bin/gblk").is_file()
    assert "Documentation=man:gblk(8)" in unit
    copy = tmp_path / "gblk.service"
    copy.write_text(unit.replace("/usr/bin/gblk ", f"{built.root}/usr/bin/gblk "))
    proc = run(["systemd-analyze", "verify", str(copy)],
               env=clean_env(MANPATH=str(built.root / "usr/share/man")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


VENV_INSTALL = "/opt/gblk/bin/pip install --no-deps --no-build-isolation ."


def test_offline_venv_install_as_readme_says(tmp_path: Path) -> None:
    """README's venv install on Debian's packages works with no package index at all:
    a --system-site-packages venv of Debian's python3, and pip building with Debian's
    setuptools and wheel (--no-build-isolation) instead of downloading them."""
    readme = (REPO / "README.md").read_text()
    assert "python3 -m venv --system-site-packages /opt/gblk" in readme
    assert VENV_INSTALL in readme
    if not Path(DEBIAN_PYTHON).exists():
        pytest.skip(f"{DEBIAN_PYTHON} is not installed")
    for module, package in (("ensurepip", "python3-venv"), ("setuptools", "python3-setuptools"),
                            ("wheel", "python3-wheel"), ("gevent", "python3-gevent")):
        if run([DEBIAN_PYTHON, "-c", f"import {module}"]).returncode != 0:
            why = f"Debian's {package} is not installed"
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)
    src = tmp_path / "gblk"
    shutil.copytree(REPO, src, ignore=IGNORE, symlinks=True)
    venv = tmp_path / "venv"
    proc = run([DEBIAN_PYTHON, "-m", "venv", "--system-site-packages", str(venv)])
    assert proc.returncode == 0, proc.stderr
    offline = clean_env(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        offline.pop(var, None)
    cmd = VENV_INSTALL.replace("/opt/gblk", str(venv)).split()
    proc = run(cmd, cwd=src, env=offline)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = run([str(venv / "bin/gblk"), "--version"], cwd=tmp_path)
    assert proc.stdout.strip() == f"gblk {VERSION}", proc.stdout + proc.stderr
    proc = run([str(venv / "bin/python"), "-c", "import gblk.daemon, gevent; print(gblk.__file__)"],
               cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith(str(venv)), proc.stdout + proc.stderr
    for exe in ("gblk-xl-hotplug", "gblk-device-model"):
        assert os.access(venv / "bin" / exe, os.X_OK), exe
    # step 2 of README's venv install takes the unit and the configuration from here
    data = venv / "share/gblk"
    assert (data / "systemd/gblk.service").read_text() == (REPO / "systemd/gblk.service").read_text()
    assert (data / "monitoring/rules/alerts.yml").is_file() and (data / "monitoring/README.md").is_file()
    proc = run([str(venv / "bin/gblk"), "config", "--quiet", "--config", str(data / "systemd/gblk.toml")],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_readme_build_command_installs_the_build_dependencies() -> None:
    """README's apt-get line before dpkg-buildpackage names every Build-Depends of
    debian/control and build-essential (which dpkg-buildpackage requires implicitly)."""
    readme = (REPO / "README.md").read_text()
    line = next(line for line in readme.splitlines()
                if line.startswith("apt-get install") and "dh-python" in line)
    named = set(line.split()[2:])
    control = (REPO / "debian/control").read_text()
    field = re.search(r"^Build-Depends:(.*?)^\S", control, re.S | re.M)
    assert field is not None
    wanted = {re.sub(r"\s*\(.*\)", "", dep).strip() for dep in field.group(1).split(",") if dep.strip()}
    wanted = {dep for dep in wanted if not dep.startswith("debhelper-compat")} | {"debhelper", "build-essential"}
    assert wanted <= named, sorted(wanted - named)
