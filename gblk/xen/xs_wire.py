"""The XenStore wire format, as ``xen/io/xs_wire.h`` defines it, once for all of gblk.

Message types, the 16-byte header (four native ``uint32_t``: type, req_id, tx_id,
len), the payload and path limits, the error names xenstored sends, the payloads of
error replies and watch events, and where a client finds xenstored. Used by the
daemon's client (``gblk.xen.xenstore``), the hotplug programs' plain client
(``gblk.xen.xs_simple``) and the simulated xenstored (``gblk.sim``). Pure: no IO
(``default_targets`` only looks at the environment and what exists), no gevent.
"""

from __future__ import annotations

import os
import struct
from typing import Callable, List, Mapping, Optional, Tuple

# enum xsd_sockmsg_type (xs_wire.h)
XS_CONTROL = 0
XS_DIRECTORY = 1
XS_READ = 2
XS_GET_PERMS = 3
XS_WATCH = 4
XS_UNWATCH = 5
XS_TRANSACTION_START = 6
XS_TRANSACTION_END = 7
XS_INTRODUCE = 8
XS_RELEASE = 9
XS_GET_DOMAIN_PATH = 10
XS_WRITE = 11
XS_MKDIR = 12
XS_RM = 13
XS_SET_PERMS = 14
XS_WATCH_EVENT = 15
XS_ERROR = 16
XS_IS_DOMAIN_INTRODUCED = 17
XS_RESUME = 18
XS_SET_TARGET = 19
# XS_RESTRICT (20) has been removed
XS_RESET_WATCHES = 21  # XS_SET_TARGET + 2
XS_DIRECTORY_PART = 22
XS_TYPE_COUNT = 23
XS_INVALID = 0xFFFF

#: struct xsd_sockmsg: type, req_id, tx_id, len - native byte order and size.
HEADER = struct.Struct("=IIII")

#: "Violating this is very bad" (xs_wire.h): the largest payload of one message.
XENSTORE_PAYLOAD_MAX = 4096
#: "Violating these just gets you an error back"
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

#: domid meaning "the calling domain" (DOMID_SELF in xen.h)
DOMID_SELF = 0x7FF0
#: first domid reserved by Xen (DOMID_FIRST_RESERVED)
DOMID_FIRST_RESERVED = 0x7FF0

# Error names, exactly the strings of xsd_errors[] in xs_wire.h.
EINVAL = "EINVAL"
EACCES = "EACCES"
EEXIST = "EEXIST"
EISDIR = "EISDIR"
ENOENT = "ENOENT"
ENOMEM = "ENOMEM"
ENOSPC = "ENOSPC"
EIO = "EIO"
ENOTEMPTY = "ENOTEMPTY"
ENOSYS = "ENOSYS"
EROFS = "EROFS"
EBUSY = "EBUSY"
EAGAIN = "EAGAIN"
EISCONN = "EISCONN"
E2BIG = "E2BIG"
EPERM = "EPERM"

XSD_ERRORS = (
    EINVAL, EACCES, EEXIST, EISDIR, ENOENT, ENOMEM, ENOSPC, EIO,
    ENOTEMPTY, ENOSYS, EROFS, EBUSY, EAGAIN, EISCONN, E2BIG, EPERM,
)

# Special watch paths fired by xenstored itself.
INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"

TYPE_NAMES = {
    XS_CONTROL: "CONTROL",
    XS_DIRECTORY: "DIRECTORY",
    XS_READ: "READ",
    XS_GET_PERMS: "GET_PERMS",
    XS_WATCH: "WATCH",
    XS_UNWATCH: "UNWATCH",
    XS_TRANSACTION_START: "TRANSACTION_START",
    XS_TRANSACTION_END: "TRANSACTION_END",
    XS_INTRODUCE: "INTRODUCE",
    XS_RELEASE: "RELEASE",
    XS_GET_DOMAIN_PATH: "GET_DOMAIN_PATH",
    XS_WRITE: "WRITE",
    XS_MKDIR: "MKDIR",
    XS_RM: "RM",
    XS_SET_PERMS: "SET_PERMS",
    XS_WATCH_EVENT: "WATCH_EVENT",
    XS_ERROR: "ERROR",
    XS_IS_DOMAIN_INTRODUCED: "IS_DOMAIN_INTRODUCED",
    XS_RESUME: "RESUME",
    XS_SET_TARGET: "SET_TARGET",
    XS_RESET_WATCHES: "RESET_WATCHES",
    XS_DIRECTORY_PART: "DIRECTORY_PART",
}


class XsError(Exception):
    """A request failed; ``name`` is the error string xenstored sends (ENOENT...)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


# -- where xenstored lives ----------------------------------------------------------------
DEFAULT_RUNDIR = "/var/run/xenstored"
#: the xenbus device (dom0 or a driver domain without a xenstored socket), as libxenstore
#: tries it: /dev/xen/xenbus, then the old /proc path
XENBUS_PATHS = ("/dev/xen/xenbus", "/proc/xen/xenbus")
#: what to check when no xenstored answers, in the terms of the distributions gblk
#: runs on: Debian's xen-utils-common starts xenstored from /etc/init.d/xen, i.e.
#: xen.service; upstream Xen ships xenstored.service
NO_XENSTORE_HINT = ("no XenStore: xenstored is not running, or this is not a Xen "
                    "control domain (Debian: systemctl status xen, started by "
                    "/etc/init.d/xen from xen-utils-common; upstream Xen: systemctl "
                    "status xenstored)")

UNIX = "unix"
XENBUS = "xenbus"


def default_targets(environ: Optional[Mapping[str, str]] = None,
                    exists: Callable[[str], bool] = os.path.exists) -> List[Tuple[str, str]]:
    """(kind, path) in the order libxenstore tries them: ``$XENSTORED_PATH`` or
    ``$XENSTORED_RUNDIR/socket`` (default /var/run/xenstored/socket), then the xenbus
    device (the first always, so that an error names it; the old one if it exists)."""
    env = os.environ if environ is None else environ
    sock = env.get("XENSTORED_PATH") or os.path.join(
        env.get("XENSTORED_RUNDIR", DEFAULT_RUNDIR), "socket")
    return [(UNIX, sock)] + [(XENBUS, p) for p in XENBUS_PATHS
                             if p == XENBUS_PATHS[0] or exists(p)]


# -- framing -------------------------------------------------------------------------------
def pack(msg_type: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """One message: header then payload (no size check: the caller enforces it)."""
    return HEADER.pack(msg_type, req_id, tx_id, len(payload)) + payload


def unpack_header(data: bytes) -> Tuple[int, int, int, int]:
    """(type, req_id, tx_id, len) of a 16-byte header."""
    msg_type, req_id, tx_id, length = HEADER.unpack(data)
    return msg_type, req_id, tx_id, length


def strings(payload: bytes) -> List[bytes]:
    """The NUL-terminated strings at the start of ``payload``.

    Like xenstored's ``get_strings``: bytes after the last NUL are not a string.
    """
    parts = payload.split(b"\0")
    return parts[:-1]


def error_payload(name: str) -> bytes:
    """The payload of an XS_ERROR reply."""
    return name.encode("ascii") + b"\0"


def error_name(payload: bytes) -> str:
    """The error name of an XS_ERROR reply's payload (EIO when it is empty)."""
    return payload.split(b"\0", 1)[0].decode("ascii", "replace") or EIO


def watch_event_payload(path: bytes, token: bytes) -> bytes:
    """The payload of an XS_WATCH_EVENT: the path that fired, then the token."""
    return path + b"\0" + token + b"\0"


def parse_watch_event(payload: bytes) -> Optional[Tuple[bytes, bytes]]:
    """(path, token) of an XS_WATCH_EVENT payload, or None if it is malformed."""
    parts = strings(payload)
    if len(parts) < 2:
        return None
    return parts[0], parts[1]
