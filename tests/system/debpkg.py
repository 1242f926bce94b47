"""Builds (and caches) the gblk .deb the system suite installs in dom0: host side only.

As README's install section says: ``dpkg-buildpackage -us -uc -b`` in a copy of the tree
(the repository itself is never written), with Debian's own python3 and build tools
(debian/control's Build-Depends; ``.ci/run`` installs them). dom0 then installs the .deb
with ``apt-get install ./gblk_<version>_all.deb`` and no network (``dom0/payload.py``).

The result is cached in ``~/.cache/gblk-system/deb-<key>/`` where ``key`` hashes every
file that goes into the build (the tree without ``tests/``, caches and build output), so
a change to gblk, ``debian/`` or ``setup.cfg`` builds a new package and a change to the
suite does not. The dom0 image does not depend on it (it is installed at boot), so a
code change never rebuilds the image.

Imports nothing from gblk (the version comes from ``debian/changelog``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

try:  # run from the package or as a script's sibling
    from . import lab
except ImportError:  # pragma: no cover - script mode
    import lab  # type: ignore[no-redef]

#: what the build must not see: the suite itself, caches and earlier build output
EXCLUDE = (
    ".git", ".tox", ".venv", "venv", "__pycache__", "*.pyc", "build", "dist", "*.egg-info",
    ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", ".import_linter_cache",
    ".benchmarks", "_build.py", ".pybuild", "tests",
)
#: the build sees Debian's interpreters only (pybuild runs "python3.11" from PATH)
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
T_BUILD = 600


def _excluded(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDE)


def tree_files(tree: Path) -> Iterator[Path]:
    """Every file of ``tree`` the build gets, in a stable order (paths relative to it)."""
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = sorted(d for d in dirnames if not _excluded(d))
        for name in sorted(filenames):
            if not _excluded(name):
                yield (Path(dirpath) / name).relative_to(tree)


def cache_key(tree: Path) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    for rel in tree_files(tree):
        path = tree / rel
        h.update(str(rel).encode() + b"\0")
        h.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def version(tree: Path) -> str:
    first = (tree / "debian" / "changelog").read_text().splitlines()[0]
    match = re.match(r"gblk \(([^)]+)\) ", first)
    if not match:
        raise lab.StepError(f"{tree}/debian/changelog: no version in {first!r}")
    return match.group(1)


def deb_name(tree: Path) -> str:
    return f"gblk_{version(tree)}_all.deb"


def ensure_deb(tree: Optional[Path] = None) -> Path:
    """The .deb built from ``tree`` (default: this checkout), built if not cached."""
    tree = (tree or lab.REPO).resolve()
    key = cache_key(tree)
    root = lab.CACHE_ROOT
    final = root / f"deb-{key}"
    deb = final / deb_name(tree)
    if deb.exists():
        lab.log(f"deb: cached {deb}")
        return deb
    for tool, package in (("dpkg-buildpackage", "dpkg-dev"), ("dh", "debhelper"), ("pybuild", "dh-python")):
        if shutil.which(tool, path=CLEAN_PATH) is None:
            raise lab.StepError(f"deb: {tool} missing: apt-get install {package} (debian/control's Build-Depends)")
    work = root / f".tmp-deb-{key}-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    src = work / "gblk"  # dpkg-buildpackage writes the .deb next to the tree
    src.mkdir(parents=True)
    for rel in tree_files(tree):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree / rel, src / rel, follow_symlinks=False)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PATH=CLEAN_PATH, LC_ALL="C.UTF-8", DEB_BUILD_OPTIONS="nocheck")
    t0 = time.monotonic()
    lab.log(f"deb: dpkg-buildpackage -us -uc -b in {src}")
    logfile = work / "build.log"
    lab.run(["dpkg-checkbuilddeps"], timeout=60, step="deb dpkg-checkbuilddeps", cwd=src, env=env,
            logfile=logfile)
    lab.run(["dpkg-buildpackage", "-us", "-uc", "-b"], timeout=T_BUILD, step="deb dpkg-buildpackage",
            cwd=src, env=env, logfile=logfile)
    built = work / deb.name
    if not built.exists():
        raise lab.StepError(f"deb: dpkg-buildpackage wrote no {built.name} (log: {logfile})")
    out = work / "out"
    out.mkdir()
    os.replace(built, out / deb.name)
    shutil.copy(logfile, out / "build.log")
    for other in root.glob("deb-*"):  # one package is kept: the current one
        shutil.rmtree(other, ignore_errors=True)
    os.replace(out, final)
    shutil.rmtree(work, ignore_errors=True)
    lab.log(f"deb: built {deb} in {time.monotonic() - t0:.0f} s")
    return deb

