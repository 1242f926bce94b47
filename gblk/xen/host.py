"""The real Xen host: where gblk finds grant tables, event channels and XenStore.

``RealXenHost`` implements ``gblk.xen.interfaces.XenHost`` for a backend domain
(dom0 or a driver domain). Nothing is opened until asked for, and each piece fails
on its own with a one-line ``XenUnavailable`` that names what is missing (the
library package, the /dev/xen device and its module, or xenstored), so
``gblk serve`` can say exactly which part of the host is not ready; ``probe()``
collects those lines without raising. Chosen by cli/daemon only; must not import
the engine, the device layer or ``gblk.sim``.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional

from gblk.errors import XenError, XenUnavailable
from gblk.xen import barrier
from gblk.xen.interfaces import EventChannel, GrantTable, XenHost, XenStore

#: XenStore node holding the domain's own id, relative to its home
#: (/local/domain/<domid>/domid; written by xen-init-dom0 for dom0 and by libxl)
DOMID_NODE = "domid"


class RealXenHost(XenHost):
    """The Xen host this process runs on.

    ``xenstore_path``: a xenstored socket, or None for real Xen's resolution
    ($XENSTORED_PATH, /var/run/xenstored/socket, /dev/xen/xenbus). ``sysfs``: where
    sysfs is mounted (tests point it elsewhere).
    """

    def __init__(
        self,
        xenstore_path: Optional[str] = None,
        timeout: float = 10.0,
        sysfs: str = "/sys",
    ) -> None:
        self.xenstore_path = xenstore_path
        self.timeout = timeout
        self.sysfs = sysfs
        self._domid: Optional[int] = None

    @property
    def domid(self) -> int:
        """This domain's id from XenStore's ``domid`` node (0 when absent); read once."""
        if self._domid is None:
            self._domid = self._read_domid()
        return self._domid

    @domid.setter
    def domid(self, value: int) -> None:
        self._domid = int(value)

    def _read_domid(self) -> int:
        store = self.open_xenstore()
        try:
            value = store.read(DOMID_NODE)
        finally:
            store.close()
        if value is None or not value.strip().isdigit():
            return 0
        return int(value)

    def open_grant_table(self) -> GrantTable:
        from gblk.xen.gnttab import RealGrantTable

        return RealGrantTable()

    def open_event_channel(self) -> EventChannel:
        from gblk.xen.evtchn import RealEventChannel

        return RealEventChannel()

    def open_xenstore(self) -> XenStore:
        from gblk.xen.xenstore import GeventXenStore

        return GeventXenStore(self.xenstore_path, self.timeout)

    def fence(self) -> Callable[[], None]:
        return barrier.fence

    def blkback_loaded(self) -> bool:
        return os.path.exists(os.path.join(self.sysfs, "module", "xen_blkback")) or os.path.isdir(
            os.path.join(self.sysfs, "bus", "xen-backend", "drivers", "vbd")
        )

    def probe(self, xenstore: bool = True) -> List[str]:
        """One line per missing piece (empty when the host can serve disks)."""
        problems: List[str] = []
        for opener in (self.open_grant_table, self.open_event_channel):
            try:
                opener().close()
            except XenError as e:
                problems.append(str(e))
        if xenstore:
            try:
                self.open_xenstore().close()
            except XenUnavailable as e:
                problems.append(str(e))
        return problems
