"""The bus: watches ``/local/domain/<self>/backend/<kind>`` for every configured
kind and keeps one Device per backend directory.

Devices that already exist at start are picked up (a restarted gblk takes them
over); new ones are served as they appear. A device removes itself when its
directory goes or the toolstack unplugs it; a device that finished while its
directory still exists is not recreated until the directory goes away.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Set, Tuple

import gevent

from ..errors import XenStoreError
from ..xen.interfaces import WatchSubscription
from .device import Device, DeviceContext

log = logging.getLogger("gblk.bus")

Key = Tuple[int, str, int]


class Bus:
    """The set of devices this daemon serves, kept equal to XenStore's backend
    directories of the configured kinds.

    Responsible for noticing devices appear and go, and for nothing inside a device:
    it creates a ``Device`` per new ``<domid>/<devid>`` directory, forgets it when the
    device reports itself removed, and does not recreate one that finished while its
    directory still exists (unless the toolstack writes it anew in Initialising).

    Lifecycle: the daemon creates it with the shared ``DeviceContext``; ``start()``
    watches the kinds' roots, picks up the devices that exist now (a takeover) and
    spawns the bus greenlet; ``stop(timeout)`` kills that greenlet, closes the watch
    and stops every device in parallel, each answering its in-flight IO first.

    Threads: one greenlet on the hub (``_run``: one watch event at a time, a rescan of
    the part of the tree it names; a XenStore error is logged and the next event
    rescans). Each device runs in greenlets of its own.
    """

    def __init__(self, ctx: DeviceContext, kinds: Sequence[str]) -> None:
        self.ctx = ctx
        self.kinds = tuple(kinds)
        self.devices: Dict[Key, Device] = {}
        self._finished: Set[Key] = set()
        self._greenlet: Optional[gevent.Greenlet] = None
        self._sub: Optional[WatchSubscription] = None
        self._base = {k: f"/local/domain/{ctx.backend_domid}/backend/{k}" for k in self.kinds}

    def start(self) -> None:
        """Pick up what exists now, then follow changes."""
        self._sub = self.ctx.xs.watch(list(self._base.values()))
        for kind in self.kinds:
            self._scan_kind(kind)
        self._greenlet = gevent.spawn(self._run)

    def stop(self, timeout: float) -> None:
        """Stop every device in parallel, each answering its in-flight IO first."""
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=1)
            self._greenlet = None
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        devices = list(self.devices.values())
        self.devices.clear()
        jobs = [gevent.spawn(d.stop, timeout) for d in devices]
        gevent.joinall(jobs, timeout=timeout + 2)

    def _run(self) -> None:
        assert self._sub is not None
        while True:
            path = self._sub.get()
            if path is None:
                continue
            self.ctx.stats.watch_events += 1
            try:
                self._changed(path)
            except XenStoreError as e:
                log.warning("cannot rescan after a change of %s: %s", path, e)

    def _changed(self, path: str) -> None:
        for kind, base in self._base.items():
            if path == base or base.startswith(path + "/"):
                self._scan_kind(kind)  # the root itself (initial event) or above it
                continue
            if not path.startswith(base + "/"):
                continue
            parts = path[len(base) + 1:].split("/")
            if len(parts) < 2:
                self._scan_kind(kind)
                return
            try:
                domid, devid = int(parts[0]), int(parts[1])
            except ValueError:
                return
            if len(parts) > 2 and (domid, kind, devid) in self.devices:
                return  # a node inside a served device's directory: the device watches it
            self._scan_one(kind, domid, devid)
            return

    def _scan_kind(self, kind: str) -> None:
        base = self._base[kind]
        xs = self.ctx.xs
        seen: Set[Key] = set()
        for d in xs.directory(base):
            if not d.isdigit():
                continue
            for v in xs.directory(f"{base}/{d}"):
                if v.isdigit():
                    seen.add((int(d), kind, int(v)))
                    self._scan_one(kind, int(d), int(v))
        self._finished = {k for k in self._finished if k[1] != kind or k in seen}

    def _scan_one(self, kind: str, domid: int, devid: int) -> None:
        key = (domid, kind, devid)
        exists = bool(self.ctx.xs.directory(f"{self._base[kind]}/{domid}/{devid}"))
        if not exists:
            self._finished.discard(key)
            return
        if key in self.devices:
            return
        if key in self._finished:
            # a finished device whose directory is still there stays finished,
            # unless the toolstack has created the directory anew (state Initialising)
            state = self.ctx.xs.read(f"{self._base[kind]}/{domid}/{devid}/state")
            if (state or "").strip() != "1":
                return
            self._finished.discard(key)
        dev = Device(self.ctx, kind, domid, devid, self._removed)
        self.devices[key] = dev
        log.info("d%d/%d: new %s device", domid, devid, kind)
        dev.start()

    def _removed(self, dev: Device) -> None:
        if self.devices.get(dev.key) is dev:
            del self.devices[dev.key]
            if self.ctx.xs.directory(dev.path):
                self._finished.add(dev.key)
