"""A disk's IO limits and dirty bitmap, seen from the control plane.

What ``gblk ctl`` asks of one :class:`gblk.device.device.Device`, and what the device
does when it opens, connects and goes: read the guest's name and uuid for the limit
rules, open the image's bitmap if it is tracked (``gblk.engine.cbt``), enable,
disable, reset and show it. Blocking file work goes through the control pool (with
its deadline), like every other control-plane call. Runs on the hub.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

import gevent

from ..engine import cbt
from ..errors import GblkError
from ..qos import DiskIdentity

if TYPE_CHECKING:
    from .device import Device

#: the guest's nodes libxl writes under /local/domain/N: its name, and /vm/<uuid>
DOMAIN_NAME = "name"
DOMAIN_VM = "vm"
#: seconds ``enable`` waits for the writes issued before it (so none goes untracked)
ENABLE_DRAIN = 30.0


def identity(dev: "Device", image: str) -> DiskIdentity:
    """What the ``[[limit]]`` rules match: the guest's name and uuid, the backend
    path and the image."""
    xs = dev.ctx.xs
    dom = f"/local/domain/{dev.domid}"
    name = (xs.read(f"{dom}/{DOMAIN_NAME}") or "").strip()
    vm = (xs.read(f"{dom}/{DOMAIN_VM}") or "").strip()
    uuid = vm.rsplit("/", 1)[-1] if vm.startswith("/vm/") else ""
    return DiskIdentity(domain=name, uuid=uuid, backend=dev.path, image=image)


def load(dev: "Device", size: int) -> None:
    """At connect: the image's bitmap, if it is tracked (tracking goes on)."""
    cfg = dev.ctx.cbt
    if cfg is None or dev.cbt is not None:
        return
    path = cbt.bitmap_path(cfg.directory, dev.store_path)
    try:
        got = dev.ctx.control.call(f"reading the dirty bitmap {path}", cbt.load_file, path, size,
                                   undo=_close_loaded)
    except cbt.CbtError as e:
        raise GblkError(f"changed-block tracking: {e}") from None
    if got is not None:
        fd, gran, bits = got
        dev.cbt = cbt.Tracker(path, fd, gran, size, bits, dev.ctx.pool, dev.stats, dev.log)
        dev.log.info("changed-block tracking on (%s)", path)


def _close_loaded(got: Any) -> None:
    if got is not None:
        cbt.close_fd(got[0])


def _dataplane_rings(dev: "Device") -> list:
    return list(dev.dataplane.rings) if dev.dataplane is not None else []


def enable(dev: "Device") -> Dict[str, Any]:
    cfg = dev.ctx.cbt
    if cfg is None:
        raise GblkError("changed-block tracking is not available in this daemon")
    if dev.cbt is not None:
        return dev.cbt.describe()
    if not dev.attached or dev.store is None or dev.dataplane is None:
        raise GblkError(f"{_name(dev)} is not connected: enable tracking once the guest uses it")
    size = dev.stats.sectors * 512
    nbits = cbt.nbits_for(size, cfg.granularity)
    if nbits > cfg.max_bits:
        raise GblkError(f"{_name(dev)}: {size} bytes at cbt.granularity {cfg.granularity} need "
                        f"{nbits} bits, more than cbt.max_bits {cfg.max_bits}: set a coarser "
                        "cbt.granularity")
    path = cbt.bitmap_path(cfg.directory, dev.store_path)
    try:
        fd, bits = dev.ctx.control.call(f"creating the dirty bitmap {path}", cbt.create_file,
                                        path, dev.store_path, cfg.granularity, size,
                                        undo=lambda got: cbt.remove_file(got[0], path))
    except OSError as e:
        raise GblkError(f"creating the dirty bitmap {path}: {e.strerror or e}") from None
    t = cbt.Tracker(path, fd, cfg.granularity, size, bits, dev.ctx.pool, dev.stats, dev.log)
    rings = _dataplane_rings(dev)
    before = [(w, w.jobs_submitted) for w in rings]
    dev.cbt = t
    dev.dataplane.cbt = t
    # the writes issued before now were not marked: the answer waits until they are done,
    # so a backup started after it sees every change
    with gevent.Timeout(ENABLE_DRAIN, False):
        while any(w.jobs_completed < n for w, n in before):
            gevent.sleep(0.001)
    dev.log.info("changed-block tracking enabled (%s)", path)
    return t.describe()


def disable(dev: "Device") -> Dict[str, Any]:
    t = _tracker(dev)
    if dev.dataplane is not None:
        dev.dataplane.cbt = None
    dev.cbt = None
    while t.busy:  # the sync in progress still writes into the file
        gevent.sleep(0.001)
    fd, t.fd = t.fd, -1
    t.close()
    dev.ctx.control.call(f"removing the dirty bitmap {t.path}", cbt.remove_file, fd, t.path)
    dev.log.info("changed-block tracking disabled (%s removed)", t.path)
    return {"enabled": False}


def show(dev: "Device") -> Dict[str, Any]:
    t = _tracker(dev)
    out = t.describe()
    out["extents"] = t.extents()
    return out


def reset(dev: "Device") -> Dict[str, Any]:
    t = _tracker(dev)
    if t.failed:
        raise GblkError(f"{_name(dev)}: the dirty bitmap was lost ({t.failed}): disable and "
                        "enable tracking again, then take a full backup")
    out = t.describe()
    out["extents"] = t.reset()
    return out


def close(dev: "Device") -> None:
    t, dev.cbt = dev.cbt, None
    if t is not None:
        t.close()


def _tracker(dev: "Device") -> cbt.Tracker:
    if dev.cbt is None:
        raise GblkError(f"{_name(dev)}: changed-block tracking is not enabled "
                        "(gblk ctl cbt enable DISK)")
    return dev.cbt


def _name(dev: "Device") -> str:
    return f"d{dev.domid}/{dev.devid}"
