"""Shared setup of the unit tests.

Makes the source tree importable when gblk is not installed (a plain ``pytest tests/unit``
from a checkout); once the package is installed this does nothing. No monkey-patching:
the unit tests are pure and blocking.
"""

from __future__ import annotations

import os
import sys

try:
    import gblk  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the suite is started
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
