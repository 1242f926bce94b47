"""The XenStore wire format, as ``xen/io/xs_wire.h`` defines it.

Message types, the 16-byte header (four native ``uint32_t``: type, req_id, tx_id,
len), the payload and path limits and the error names xenstored sends. Shared by the
simulated xenstored and its tests. Pure: no IO, no gevent.
"""

from __future__ import annotations

import struct
from typing import List, Tuple

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
