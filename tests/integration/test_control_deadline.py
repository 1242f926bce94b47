"""No control-plane call can hang a device, or the daemon (issue 10, item 1), through
``gblk serve`` on the simulated host.

A disk whose ``params`` names a FIFO used to block ``open(O_RDONLY)`` for ever inside
an IO thread: the device sat in state 1 with no log line and no ``hotplug-error``,
ignored its removal, and one IO thread was lost. Now the type is checked before the
open, so it fails at once; and every blocking call the control plane makes runs in a
control threadpool of its own with a deadline (``backend.control_timeout``), so an open
that really never returns (a hung NFS server; here a daemon whose open of ``*.hang``
waits for a go file) fails its device with a clear error, never takes an IO thread,
and is cleaned up when it returns at last. Meanwhile another guest on the same daemon
does verified IO the whole time.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterator, List, Tuple

import pytest

from gblk.blkif.const import XenbusState
from gblk.sim.harness.host import BackendProcess, SimHost, child_env

from .backend_support import (
    logs_on_failure,
    metric,
    metrics_url,
    scrape,
    start_daemon,
    wait_until,
)
from .hostile_support import Bystander, check_clean
from .lifecycle_support import open_paths
from .metrics_support import device_series

MiB = 1 << 20
XVDB, XVDC, XVDD = 51728, 51744, 51760
CONTROL_TIMEOUT = 2.0
CLOSED = str(int(XenbusState.CLOSED))

#: the real daemon, with one change: opening an image whose name ends in ".hang" does
#: not return until a file named like it plus ".go" exists (an open that hangs, as on
#: a dead NFS server; gblk's own FIFO check leaves no local way to make one)
HANGING_OPEN = r"""
import os, sys, time
import gblk.storage.raw as raw
_init = raw.RawStore.__init__
def _hanging_init(self, path, *args, **kwargs):
    while path.endswith(".hang") and not os.path.exists(path + ".go"):
        time.sleep(0.05)
    _init(self, path, *args, **kwargs)
raw.RawStore.__init__ = _hanging_init
from gblk.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _toml(io_threads: int, control_threads: int) -> str:
    return (f'[daemon]\nkinds = ["qdisk"]\nstop_timeout = 5.0\n[backend]\n'
            f"io_threads = {io_threads}\ncontrol_threads = {control_threads}\n"
            f"control_timeout = {CONTROL_TIMEOUT}\n")


def _hanging_daemon(host: SimHost, toml: str) -> BackendProcess:
    cfg = os.path.join(host.dir, "hanging.toml")
    with open(cfg, "w") as f:
        f.write(toml)
    argv = host.backend_argv(["--config", cfg, "--metrics-address", "127.0.0.1:0"])
    assert argv[1:4] == ["-m", "gblk", "serve"]
    return BackendProcess([sys.executable, "-c", HANGING_OPEN, *argv[3:]],
                          os.path.join(host.dir, "hanging.log"), child_env())


@pytest.fixture
def host() -> Iterator[SimHost]:
    with SimHost() as h:
        yield h


def _failed_closed(host: SimHost, be: str, needle: str) -> str:
    """Wait for the device to go Closed with hotplug-status=error; its hotplug-error."""
    wait_until(lambda: host.xs.read(f"{be}/state") == CLOSED, f"{be} goes Closed")
    assert host.xs.read(f"{be}/hotplug-status") == "error"
    err = host.xs.read(f"{be}/hotplug-error") or ""
    assert needle in err, err
    return err


def _detach_all(host: SimHost, url: str, domid: int, devids: List[int]) -> None:
    """Each failed disk unplugs: the toolstack sees Closed, the daemon forgets it."""
    for devid in devids:
        assert host.toolstack.detach_disk(domid, devid), f"{devid} did not unplug"
    for devid in devids:
        wait_until(lambda d=devid: not device_series(scrape(url), domid, d),
                   f"device {devid} forgotten")


def test_fifo_disk_fails_at_once_and_can_be_removed(host: SimHost) -> None:
    """A FIFO as a read-only and as a writable disk: each goes Closed long before any
    deadline, with ``hotplug-error`` saying it is a FIFO and a log line; the guest's
    driver is refused, both unplug, the daemon serves on, and the bystander's verified
    IO never stopped. With one IO thread, a FIFO stuck in the IO pool would stop it."""
    daemon = start_daemon(host, "fifo", _toml(io_threads=1, control_threads=1).replace(
        f"control_timeout = {CONTROL_TIMEOUT}", "control_timeout = 30.0"))
    try:
        with logs_on_failure(daemon):
            url = metrics_url(daemon)
            g = host.create_guest(size=16 * MiB)
            by = Bystander(g.frontend).start()
            fifo = os.path.join(host.dir, "disk.fifo")
            os.mkfifo(fifo)
            t0 = time.monotonic()
            disks = {XVDB: host.toolstack.attach_disk(g.domid, fifo, devid=XVDB, mode="r"),
                     XVDC: host.toolstack.attach_disk(g.domid, fifo, devid=XVDC, mode="w")}
            for disk in disks.values():
                _failed_closed(host, disk.backend_path, f"{fifo} is a FIFO")
            took = time.monotonic() - t0
            assert took < 10.0, f"a FIFO took {took:.1f}s to fail"
            assert daemon.log_text().count(f"{fifo} is a FIFO") >= 2
            samples = scrape(url)
            for devid in disks:
                assert metric(samples, "gblk_errors_total", domain=str(g.domid),
                              device=str(devid), reason="device_failed") >= 1
            _detach_all(host, url, g.domid, list(disks))
            t1 = time.monotonic()
            assert by.completed_between(t0, t1) > 0, "the bystander was not served"
            by.stop()
            check_clean(g.frontend)
            assert daemon.alive()
            assert "Traceback" not in daemon.log_text()
    finally:
        daemon.stop()


def test_an_open_that_never_returns_fails_its_device_not_the_daemon(host: SimHost) -> None:
    """Three disks whose open never returns, on a daemon with one control thread and
    two IO threads: each fails after ``control_timeout`` with a log line and a
    ``hotplug-error`` naming the call and the key, and unplugs; the bystander's verified
    IO carries on throughout (a stuck open holds a control thread, never an IO
    thread); a new disk still connects and serves (the pool grew past the stuck
    threads); when the opens return at last, the stores they opened are closed; and
    SIGTERM stops the daemon at once even while an open is still stuck."""
    daemon = _hanging_daemon(host, _toml(io_threads=2, control_threads=1))
    try:
        with logs_on_failure(daemon):
            url = metrics_url(daemon)
            g = host.create_guest(size=16 * MiB)
            by = Bystander(g.frontend).start()
            images = {d: host.make_image(f"disk{d}.hang", 4 * MiB) for d in (XVDB, XVDC, XVDD)}
            t0 = time.monotonic()
            disks = {d: host.toolstack.attach_disk(g.domid, img, devid=d)
                     for d, img in images.items()}
            for d, disk in disks.items():
                err = _failed_closed(host, disk.backend_path, f"opening {images[d]}: no answer "
                                     f"after {CONTROL_TIMEOUT:g}s (backend.control_timeout)")
                assert "abandoned" in err
            took = time.monotonic() - t0
            assert took < 4 * CONTROL_TIMEOUT + 10, f"failing took {took:.1f}s"
            assert daemon.log_text().count("(backend.control_timeout)") >= 3
            mid = time.monotonic()
            assert by.completed_between(t0, mid) > 0, "the bystander was not served"
            # a healthy disk still gets a control thread
            other = host.create_guest(size=8 * MiB)
            data = bytes(range(256)) * 64
            other.frontend.write(8, data)
            assert other.frontend.read(8, len(data) // 512) == data
            _detach_all(host, url, g.domid, list(disks))
            assert by.completed_between(mid, time.monotonic()) > 0
            # the opens return at last: what they opened is closed again, not leaked
            for img in images.values():
                open(img + ".go", "w").close()

            def held() -> List[Tuple[int, str]]:
                return [(fd, p) for fd, p in open_paths(daemon.pid).items()
                        if p.endswith(".hang")]

            wait_until(lambda: not held(), "the late stores are closed", timeout=10)
            by.stop()
            check_clean(g.frontend)
            other.frontend.close()
            # one more that stays stuck: SIGTERM is not held up by its thread
            stuck = host.make_image("stuck.hang", 4 * MiB)
            disk = host.toolstack.attach_disk(g.domid, stuck, devid=XVDB)
            _failed_closed(host, disk.backend_path, f"opening {stuck}: no answer")
            assert daemon.alive()
            assert "Traceback" not in daemon.log_text()
            t0 = time.monotonic()
            assert daemon.stop() == 0  # a clean exit, not a crash in shutdown (SIGSEGV on 3.9)
            assert time.monotonic() - t0 < 10.0
            assert "exiting with 1 control call(s) still stuck" in daemon.log_text()
    finally:
        daemon.stop()
