"""``gblk-xl-hotplug``: the hotplug script xl/libxl runs for disks gblk serves.

Use it as ``script=gblk-xl-hotplug`` (or its full path) in an ``xl`` disk spec with
``backendtype=phy`` (kind ``vbd``) or ``backendtype=tap`` (kind ``vbd3``).

The contract with libxl (``tools/libs/light/libxl_device.c``, ``libxl_linux.c`` and the
``xen-hotplug-common.sh`` helpers, Xen 4.17):

- libxl writes the backend directory, waits up to 10 s for the backend ``state`` to
  reach InitWait (2), then runs ``SCRIPT add`` with ``XENBUS_PATH`` set to the backend
  directory relative to its own domain (``backend/vbd/<domid>/<devid>``), stdin from
  /dev/null and stderr into its log. It kills the script after 40 s.
- On success the script writes ``hotplug-status = connected`` and exits 0. On failure
  it writes ``hotplug-error = <one line>`` and ``hotplug-status = error`` and exits
  non-zero; libxl logs ``script: <hotplug-error>`` and fails the attach.
- On detach libxl writes ``online = 0`` and ``state = 5``, waits up to 10 s for
  ``state = 6`` (Closed), runs ``SCRIPT remove`` and then removes the directory
  itself. A failing ``remove`` is logged and ignored.

What this script does:

- ``add``: waits, bounded by ``$GBLK_HOTPLUG_TIMEOUT`` seconds (default 30, below
  libxl's 40), until gblk has taken the device: ``state`` is InitWait, Initialised or
  Connected. gblk writes ``hotplug-status = connected`` itself when it takes a device;
  the script writes it too if it is missing. It fails (exit 1, ``hotplug-error``
  written) when gblk reported an error on the device (``hotplug-status = error``), when
  the device went to Closing/Closed, when kind ``vbd`` is claimed by the kernel's
  ``xen-blkback`` (loaded module), or on timeout (gblk not running or not serving that
  kind).
- ``remove``: returns once gblk let go (``state`` is Closed or the directory is gone),
  bounded the same way; on timeout it exits 1 with a message on stderr.

``online``/``offline`` are accepted as synonyms of ``add``/``remove``. XenStore is
reached through :class:`gblk.xen.xenstore.GeventXenStore` (``$XENSTORED_PATH`` selects
another socket, as for Debian's ``xenstore-*`` tools). This module is an entry point:
it may import the xen layer, nothing may import it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Mapping, Optional, Sequence

from gblk.blkif.const import XenbusState
from gblk.blkif.xenbus import HOTPLUG_ERROR, HOTPLUG_STATUS, STATE, parse_state
from gblk.errors import GblkError
from gblk.xen.xs_simple import SimpleXenStore

#: hotplug-status values (xen-hotplug-common.sh)
STATUS_CONNECTED = "connected"
STATUS_ERROR = "error"
_TAKEN = (XenbusState.INIT_WAIT, XenbusState.INITIALISED, XenbusState.CONNECTED)

DEFAULT_TIMEOUT = 30.0
POLL_INTERVAL = 0.1
PROG = "gblk-xl-hotplug"

Read = Callable[[str], Optional[str]]
Write = Callable[[str, str], None]


class HotplugFailed(GblkError):
    """The device was not taken (or released) by gblk; the message says why."""


def backend_path(xenbus_path: str, backend_domid: int = 0) -> str:
    """Absolute XenStore path of the backend directory libxl named.

    libxl passes ``backend/<kind>/<domid>/<devid>``, relative to its own domain's
    home (``/local/domain/0`` in dom0).
    """
    path = xenbus_path.rstrip("/")
    if not path:
        raise HotplugFailed("XENBUS_PATH is empty")
    if path.startswith("/"):
        return path
    return f"/local/domain/{backend_domid}/{path}"


def backend_kind(path: str) -> Optional[str]:
    """``vbd`` for ``.../backend/vbd/5/51712``."""
    parts = path.split("/")
    if len(parts) >= 4 and parts[-4] == "backend":
        return parts[-3]
    return None


def blkback_loaded(sys_module: str = "/sys/module/xen_blkback") -> bool:
    return os.path.isdir(sys_module)


def _state(read: Read, path: str) -> Optional[int]:
    return parse_state(read(f"{path}/{STATE}"))


def wait_taken(
    read: Read,
    path: str,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once gblk has taken the device at ``path``; raise HotplugFailed otherwise."""
    deadline = clock() + timeout
    while True:
        if read(path) is None:
            raise HotplugFailed(f"{path} disappeared before gblk took it")
        status = read(f"{path}/{HOTPLUG_STATUS}")
        if status == STATUS_ERROR:
            error = read(f"{path}/{HOTPLUG_ERROR}") or "no details (see: journalctl -u gblk)"
            raise HotplugFailed(f"gblk could not serve this disk: {error}")
        if status == STATUS_CONNECTED:
            return  # gblk wrote it with InitWait: taken, whatever the guest did since
        state = _state(read, path)
        if state in _TAKEN:
            return
        if state in (XenbusState.CLOSING, XenbusState.CLOSED):
            name = XenbusState(state).name.title()
            raise HotplugFailed(
                f"the device went to state {state} ({name}) before it connected "
                "(see: journalctl -u gblk)"
            )
        if clock() >= deadline:
            kind = backend_kind(path) or "?"
            raise HotplugFailed(
                f"gblk did not take {path} within {timeout:g} s (state {state}): is gblk "
                f"running (systemctl status gblk) and serving kind '{kind}' (daemon.kinds)?"
            )
        sleep(POLL_INTERVAL)


def wait_released(
    read: Read,
    path: str,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once gblk let go of the device (Closed or gone); raise on timeout."""
    deadline = clock() + timeout
    while True:
        if read(path) is None:
            return
        state = _state(read, path)
        if state is None or state == XenbusState.CLOSED:
            return
        if clock() >= deadline:
            raise HotplugFailed(
                f"gblk did not release {path} within {timeout:g} s (state {state}); "
                "its image may still be open (see: journalctl -u gblk)"
            )
        sleep(POLL_INTERVAL)


def run(
    action: str,
    path: str,
    read: Read,
    write: Write,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    is_blkback_loaded: Callable[[], bool] = blkback_loaded,
) -> None:
    """Do ``action`` (add/online, remove/offline) for the backend directory ``path``."""
    if action in ("add", "online"):
        try:
            if backend_kind(path) == "vbd" and is_blkback_loaded():
                raise HotplugFailed(
                    "the kernel's xen-blkback is loaded and claims every 'vbd' disk: "
                    "unload it (modprobe -r xen-blkback) or use backendtype=qdisk"
                )
            wait_taken(read, path, timeout, clock, sleep)
        except HotplugFailed as exc:
            if read(path) is not None:  # never recreate a directory libxl removed
                write(f"{path}/{HOTPLUG_ERROR}", str(exc))
                write(f"{path}/{HOTPLUG_STATUS}", STATUS_ERROR)
            raise
        if read(f"{path}/{HOTPLUG_STATUS}") != STATUS_CONNECTED:
            write(f"{path}/{HOTPLUG_STATUS}", STATUS_CONNECTED)
    elif action in ("remove", "offline"):
        wait_released(read, path, timeout, clock, sleep)
    else:
        raise HotplugFailed(f"unknown action {action!r}; expected add or remove")


def _timeout(env: Mapping[str, str]) -> float:
    text = env.get("GBLK_HOTPLUG_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise HotplugFailed(f"GBLK_HOTPLUG_TIMEOUT must be a number of seconds > 0 (got {text!r})")
    return value


USAGE = f"usage: {PROG} add|remove  (run by libxl with XENBUS_PATH set)"


def main(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None) -> int:
    """Entry point of ``gblk-xl-hotplug``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if env is None else env
    if len(args) < 1 or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    action = args[0]
    if action not in ("add", "online", "remove", "offline"):
        print(f"{PROG}: unknown action {action!r}\n{USAGE}", file=sys.stderr)
        return 2
    xenbus_path = environ.get("XENBUS_PATH", "")
    if not xenbus_path:
        print(f"{PROG}: XENBUS_PATH is not set\n{USAGE}", file=sys.stderr)
        return 2
    store = None
    try:
        timeout = _timeout(environ)
        path = backend_path(xenbus_path)
        # a plain blocking client: libxl allows the script 40 s, and on a busy dom0
        # importing gevent and pyxs took most of that
        store = SimpleXenStore()
        run(action, path, store.read, store.write, timeout)
        return 0
    except GblkError as exc:
        print(f"{PROG}: {action} {xenbus_path}: {exc}", file=sys.stderr)
        return 1
    finally:
        if store is not None:
            try:
                store.close()
            except GblkError:
                pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
