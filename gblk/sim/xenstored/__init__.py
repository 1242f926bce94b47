"""The simulated xenstored: the node tree and its rules (``store``, pure) and the
server speaking the XenStore wire protocol on a Unix socket (``server``).

``gblk sim xenstored`` and ``python -m gblk.sim.xenstored`` run the server.
"""

from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """``gblk sim xenstored``: the server's main, imported when run (not with the store)."""
    from .server import main as server_main

    return server_main(argv)
