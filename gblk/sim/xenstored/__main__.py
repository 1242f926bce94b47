"""``python -m gblk.sim.xenstored``."""

import sys

from .server import main

sys.exit(main())
