"""gblk: a userspace Xen paravirtual block backend (blkif) on gevent."""

import os as _os
from typing import Optional as _Optional

__version__ = "0.1.0"

_revision: _Optional[str] = None


def revision() -> str:
    """The git commit gblk was built from (``gblk_build_info{revision=...}``): written
    into ``gblk/_build.py`` when a wheel or sdist is built from a git checkout
    (``setup.py``), else read from the checkout this package runs from (an editable
    install), else ``"unknown"``. Read once; no subprocess."""
    global _revision
    if _revision is None:
        _revision = _find_revision()
    return _revision


def _find_revision() -> str:
    try:
        # imported by name: the module exists only in a built package (setup.py)
        import importlib

        return str(importlib.import_module(__name__ + "._build").REVISION)
    except ImportError:
        pass
    git = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), ".git")
    return git_revision(git) or "unknown"


def git_revision(git: str) -> _Optional[str]:
    """The commit HEAD names in the git directory ``git`` (a worktree's ``.git`` file
    is followed), read from the files themselves; None if there is none."""
    try:
        if _os.path.isfile(git):  # a worktree or submodule: "gitdir: PATH"
            with open(git) as f:
                line = f.read().strip()
            if not line.startswith("gitdir:"):
                return None
            git = _os.path.join(_os.path.dirname(git), line[7:].strip())
        with open(_os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head[:40] or None
        ref = head[4:].strip()
        common = git
        if _os.path.isfile(_os.path.join(git, "commondir")):
            with open(_os.path.join(git, "commondir")) as f:
                common = _os.path.join(git, f.read().strip())
        for base in (git, common):
            path = _os.path.join(base, ref)
            if _os.path.isfile(path):
                with open(path) as f:
                    return f.read().strip()[:40] or None
        with open(_os.path.join(common, "packed-refs")) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0][:40]
    except OSError:
        return None
    return None
