"""Helpers of the packaging tests (the .deb, the sdist and wheel, README's venv install):
run a command on Debian's own python3 and tools, in a clean environment, from a copy of
the tree that holds none of this checkout's caches or build output."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest

import gblk

REPO = Path(__file__).resolve().parents[2]
VERSION = gblk.__version__
DEBIAN_PYTHON = "/usr/bin/python3"
# what a build must not see: tox's or a venv's interpreters ahead of Debian's
# (pybuild runs "python3.11" from PATH), caches and earlier build output
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
IGNORE = shutil.ignore_patterns(
    ".git", ".tox", ".venv", "venv", "__pycache__", "*.pyc", "build", "dist", "*.egg-info",
    ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", ".import_linter_cache",
    ".benchmarks", "_build.py", ".pybuild",
)


def clean_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PATH=CLEAN_PATH, LC_ALL="C.UTF-8")
    env.update(extra)
    return env


def run(cmd: List[str], **kw: Any) -> "subprocess.CompletedProcess[str]":
    kw.setdefault("env", clean_env())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def require_debian_modules(*modules: "tuple[str, str]") -> None:
    """Each (module, Debian package) must import on Debian's python3: skip naming the
    package on a developer's machine, fail under CI (.ci/run installs them)."""
    if not Path(DEBIAN_PYTHON).exists():
        pytest.skip(f"{DEBIAN_PYTHON} is not installed")
    for module, package in modules:
        if run([DEBIAN_PYTHON, "-c", f"import {module}"]).returncode != 0:
            why = f"Debian's {package} is not installed (.ci/run installs it)"
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)


def copy_tree(dest: Path) -> Path:
    """A copy of the checkout at ``dest`` (builds write next to or inside it)."""
    shutil.copytree(REPO, dest, ignore=IGNORE, symlinks=True)
    return dest
