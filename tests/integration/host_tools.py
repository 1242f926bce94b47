"""The host programs some tests drive (promtool, prometheus, xenstore-*,
systemd-analyze): skipped with the package to install on a developer's machine, a
failure under CI (``CI`` set), whose ``.ci/run`` installs every one of them."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(tool: str, package: str) -> str:
    """The path of ``tool``; skip (or, under CI, fail) naming Debian's ``package``."""
    path = shutil.which(tool)
    if path is None:
        why = f"{tool} is not installed (apt-get install {package}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path
