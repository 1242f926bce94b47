"""``python -m gblk``: the same as the ``gblk`` command (see gblk.cli)."""

from __future__ import annotations

import sys

from gblk.cli import main

if __name__ == "__main__":
    sys.exit(main())
