"""The systemd notification protocol (sd_notify(3)) without libsystemd.

A notification is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket). gblk sends
``READY=1`` once XenStore is connected and existing devices are picked up, ``STATUS=``
lines as things change, ``WATCHDOG=1`` from its event loop, ``RELOADING=1`` around a
SIGHUP and ``STOPPING=1`` on shutdown. :func:`watchdog_interval` reads
``$WATCHDOG_USEC``/``$WATCHDOG_PID`` the way sd_watchdog_enabled(3) does.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a cheap no-op. Sending never
raises: a lost notification is logged by the caller's choice (the return value), never
fatal. Must not import gevent (works with or without monkey-patching) or other layers.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Dict, Mapping, Optional

#: how long one send may wait when systemd's socket buffer is full
SEND_TIMEOUT = 1.0


def socket_address(value: Optional[str]) -> Optional[str]:
    """The address to ``sendto`` for a ``$NOTIFY_SOCKET`` value, or None if unusable.

    ``/run/systemd/notify`` stays as is; ``@name`` becomes the abstract ``\\0name``.
    Other schemes (``vsock:``, systemd 254+) are not supported.
    """
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _line_value(value: object) -> str:
    text = str(value)
    # one KEY=VALUE per line: a newline inside a value would start a new assignment
    return text.replace("\r", " ").replace("\n", " ")


def format_message(**fields: object) -> bytes:
    """``format_message(READY=1, STATUS="x")`` -> ``b"READY=1\\nSTATUS=x\\n"``.

    Booleans become 1/0; keys are used as given (systemd's are upper case).
    """
    lines = []
    for key, value in fields.items():
        if not key or "=" in key or "\n" in key:
            raise ValueError(f"bad sd_notify key {key!r}")
        if isinstance(value, bool):
            value = int(value)
        lines.append(f"{key}={_line_value(value)}\n")
    return "".join(lines).encode("utf-8")


class Notifier:
    """Talks to systemd's notification socket; a no-op when there is none.

    ``address`` defaults to ``$NOTIFY_SOCKET`` read at construction.
    """

    def __init__(self, address: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> None:
        environ = os.environ if env is None else env
        raw = address if address is not None else environ.get("NOTIFY_SOCKET")
        self.address = socket_address(raw)
        self._sock: Optional[socket.socket] = None
        #: datagrams that could not be delivered
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """Send one datagram with ``fields``; True if systemd's socket took it."""
        if self.address is None or not fields:
            return False
        data = format_message(**fields)
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.settimeout(SEND_TIMEOUT)
                self._sock = sock
            self._sock.sendto(data, self.address)
            return True
        except OSError:
            self.failures += 1
            self.close()
            return False

    def ready(self, status: Optional[str] = None) -> bool:
        """READY=1 (with a STATUS= line if given)."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1: send from the event loop itself, every watchdog_interval()/2."""
        return self.notify(WATCHDOG=1)

    def reloading(self, status: Optional[str] = None) -> bool:
        """RELOADING=1 before re-reading the configuration; send ready() after it."""
        fields: Dict[str, object] = {
            "RELOADING": 1,
            "MONOTONIC_USEC": int(time.monotonic() * 1_000_000),
        }
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)

    def stopping(self, status: Optional[str] = None) -> bool:
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for more time to start or stop (a long drain)."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def notify(**fields: object) -> bool:
    """One-shot ``sd_notify``: ``notify(READY=1, STATUS="serving 3 disks")``."""
    notifier = Notifier()
    try:
        return notifier.notify(**fields)
    finally:
        notifier.close()


def watchdog_interval(env: Optional[Mapping[str, str]] = None, pid: Optional[int] = None) -> Optional[float]:
    """The watchdog timeout in seconds if systemd expects pings from this process.

    None when ``$WATCHDOG_USEC`` is unset or invalid, or ``$WATCHDOG_PID`` names another
    process. Ping at half of it (sd_watchdog_enabled(3)).
    """
    environ = os.environ if env is None else env
    usec_text = environ.get("WATCHDOG_USEC", "")
    if not usec_text.isdigit() or int(usec_text) <= 0:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text:
        if not pid_text.isdigit():
            return None
        if int(pid_text) != (os.getpid() if pid is None else pid):
            return None
    return int(usec_text) / 1_000_000
