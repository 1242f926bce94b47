"""The control socket's commands that change a disk: ``limit``, ``cbt``, ``export``
and ``unexport``.

``commands(devices, throttles, export_dir)`` gives the handlers the daemon hands to
``gblk.control.server.ControlServer``: each finds the disk, checks the whole request
first and changes something only when all of it is good, so a refused request (an
unknown disk, absurd limits, an unknown action) is one line and changes nothing.
Runs on the hub.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import GblkError
from ..qos import parse_limits
from . import export as exporting
from . import tracking
from .device import Device

log = logging.getLogger("gblk.control")

Disk = Tuple[int, Optional[str], int]
_CBT = {"enable": tracking.enable, "disable": tracking.disable, "reset": tracking.reset,
        "show": tracking.show}


def commands(devices: Callable[[], Dict[Any, Device]], throttles: Any,
             export_dir: str = "/run/gblk") -> Dict[str, Any]:
    """``export_dir``: where export sockets go by default (the control socket's)."""

    def find(req: Dict[str, Any], disk: Disk) -> Device:
        domid, kind, devid = disk
        for d in list(devices().values()):
            if d.domid == domid and d.devid == devid and (kind is None or d.kind == kind):
                return d
        raise ValueError(f"no disk {req.get('disk')} (gblk list shows the disks)")

    def limit(req: Dict[str, Any], disk: Disk) -> Any:
        dev = find(req, disk)
        if dev.throttle is None or throttles is None:
            raise GblkError(f"{req['disk']}: not opened yet; set its limits once it is")
        if "set" in req:
            new = req["set"]
            if not isinstance(new, dict):
                raise ValueError("limit: \"set\" must be an object of limits, e.g. "
                                 "{\"iops_total\": 500}")
            limits = parse_limits(new, "limit: ")
            throttles.set_disk(dev.key, limits)
            log.info("d%d/%d: IO limits set by gblk ctl: %s", dev.domid, dev.devid,
                     limits.as_dict() or "none")
        return dev.throttle.describe()

    def cbt(req: Dict[str, Any], disk: Disk) -> Any:
        action = req.get("action")
        fn = _CBT.get(action) if isinstance(action, str) else None
        if fn is None:
            raise ValueError(f"cbt: unknown action {action!r}; known: " + ", ".join(_CBT))
        return fn(find(req, disk))

    def export(req: Dict[str, Any], disk: Disk) -> Any:
        path, address = req.get("socket"), req.get("address")
        for key, value in (("socket", path), ("address", address)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"export: \"{key}\" must be a string")
        dev = find(req, disk)
        return exporting.start(dev, export_dir, path=path, address=address)

    def unexport(req: Dict[str, Any], disk: Disk) -> Any:
        return exporting.stop(find(req, disk))

    return {"limit": limit, "cbt": cbt, "export": export, "unexport": unexport}
