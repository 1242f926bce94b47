"""gblk's small exception tree.

Every layer raises these (or builtins); library errors (cffi, OSError from
/dev/xen) are converted into them at the ``gblk.xen`` boundary and nowhere else.
This module imports nothing from gblk, so every layer may import it.
"""

from __future__ import annotations


class GblkError(Exception):
    """Base of every error gblk raises on purpose."""


class ConfigError(GblkError, ValueError):
    """Bad configuration: the message names the key and what is allowed."""


class ProtocolError(GblkError):
    """The frontend broke the blkif or XenBus protocol."""


class InvalidRequest(ProtocolError, ValueError):
    """One ring request is invalid; it is answered with BLKIF_RSP_ERROR.

    ``reason`` is a short, low-cardinality label (metrics use it).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class RingError(ProtocolError):
    """The shared ring itself is broken (bogus producer index): halt that ring."""


class NegotiationError(ProtocolError):
    """The frontend's XenStore nodes cannot be served (bad ring order, queues...)."""


class XenError(GblkError):
    """A host interface (grant table, event channel, XenStore) failed."""


class XenUnavailable(XenError):
    """A Xen host interface is missing on this machine; the message says how to fix it."""


class GrantError(XenError):
    """A grant map or copy failed. ``status`` is the GNTST_* code when known."""

    def __init__(self, message: str, status: int = -1) -> None:
        super().__init__(message)
        self.status = status


class EventChannelError(XenError):
    """An event-channel operation failed."""


class XenStoreError(XenError):
    """A XenStore operation failed. ``errno_name`` is xenstored's error (ENOENT, EACCES, ...)."""

    def __init__(self, message: str, errno_name: str = "EIO") -> None:
        super().__init__(message)
        self.errno_name = errno_name


class StorageError(GblkError):
    """A backing store cannot be opened or used as configured."""


class ControlTimeout(GblkError):
    """A blocking control-plane call (opening a store, its size, mapping or unmapping
    a ring) did not return within ``backend.control_timeout``: the device fails."""
