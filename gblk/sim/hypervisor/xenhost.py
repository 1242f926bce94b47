"""The simulated host behind ``gblk.xen.interfaces.XenHost`` (``--xen sim:DIR``).

``SimXenHost(dir, domid)`` hands out the simulated grant table, event channels and
a XenStore client connected to the simulated xenstored at ``DIR/xenstored.sock``,
for a process acting as domain ``domid`` (the backend: 0 by default). It only
opens handles on a host someone else started (tests, ``gblk demo``); it starts
nothing itself. The memory fence is the real one: the guest frontend runs in another
process, on another CPU, exactly as on Xen.
"""

from __future__ import annotations

import os
from typing import Callable

from gblk.sim.hypervisor.evtchn import SimEventChannel
from gblk.sim.hypervisor.gnttab import SimGrantTable
from gblk.xen import barrier
from gblk.xen.interfaces import XenHost, XenStore

XENSTORED_SOCKET = "xenstored.sock"
#: the simulated sysfs directory of the kernel's xen-blkback module
SYS_BLKBACK = os.path.join("sys", "module", "xen_blkback")


class SimXenHost(XenHost):
    """Handles on the simulated Xen host in ``dir``, acting as domain ``domid``."""

    def __init__(self, dir: str, domid: int = 0) -> None:
        self.dir = dir
        self.domid = domid

    @property
    def xenstore_socket(self) -> str:
        return os.path.join(self.dir, XENSTORED_SOCKET)

    def open_grant_table(self) -> SimGrantTable:
        return SimGrantTable(self.dir, self.domid)

    def open_event_channel(self) -> SimEventChannel:
        return SimEventChannel(self.dir, self.domid)

    def open_xenstore(self) -> XenStore:
        from gblk.xen.xenstore import GeventXenStore

        return GeventXenStore(self.xenstore_socket)

    def fence(self) -> Callable[[], None]:
        return barrier.fence

    def blkback_loaded(self) -> bool:
        """As on a real host, by the module's sysfs directory: ``DIR/sys/module/xen_blkback``
        (a test creates it to play a host where the kernel's blkback is loaded)."""
        return os.path.isdir(os.path.join(self.dir, SYS_BLKBACK))

    def __repr__(self) -> str:
        return f"SimXenHost({self.dir!r}, domid={self.domid})"
