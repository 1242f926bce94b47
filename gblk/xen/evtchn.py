"""Real event channels: libxenevtchn (Xen 4.17) through cffi in ABI mode.

``RealEventChannel`` implements ``gblk.xen.interfaces.EventChannel`` over
``libxenevtchn.so.1`` (Debian package libxenevtchn1): ``xenevtchn_open``, ``_fd``,
``_bind_interdomain``, ``_notify``, ``_pending``, ``_unmask``, ``_unbind``,
``_close``. Only those prototypes are declared (from /usr/include/xenevtchn.h).
The bind result comes back as the C return value, which is why this goes through
the library and not ``fcntl.ioctl`` (it drops ioctl return values).

Called on the gevent hub: nothing here blocks. The header warns that a
non-blocking fd may still block in ``xenevtchn_pending`` on old kernels, so
``pending()`` polls the fd with a zero timeout first. No gevent, no logging; must
not import anything from gblk but ``errors``, ``xen.interfaces`` and ``xen.native``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
from typing import Any, Optional

from gblk.errors import EventChannelError
from gblk.xen.interfaces import EventChannel
from gblk.xen.native import XenLibrary, new_ffi, original

LIBRARY = "libxenevtchn.so.1"
PACKAGE = "libxenevtchn1"
DEVICE = "/dev/xen/evtchn"

CDEF = """
typedef uint32_t evtchn_port_t;
typedef int xenevtchn_port_or_error_t;
struct xentoollog_logger;
typedef struct xenevtchn_handle xenevtchn_handle;

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags);
int xenevtchn_close(xenevtchn_handle *xce);
int xenevtchn_fd(xenevtchn_handle *xce);
int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote_port);
int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce);
int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port);
"""

ffi = new_ffi(CDEF)

_LIBRARY = XenLibrary(ffi, LIBRARY, PACKAGE, DEVICE, "event channel", "xen-evtchn")
#: dlopen libxenevtchn once; XenUnavailable naming the package if it is missing
load_library = _LIBRARY.load
#: the one-line explanation for xenevtchn_open failing with an errno
open_error = _LIBRARY.open_error


class RealEventChannel(EventChannel):
    """A handle on /dev/xen/evtchn. Opening raises XenUnavailable without Xen."""

    def __init__(self, library: str = LIBRARY, lib: Any = None) -> None:
        """``lib``: an already loaded library (tests pass a stand-in)."""
        self._lib: Any
        self._handle: Any
        self._lib, self._handle = _LIBRARY.open("xenevtchn_open", library, lib)
        self._fd = int(self._lib.xenevtchn_fd(self._handle))
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self._poll = original("select", "poll")()  # never yields to the hub
        self._poll.register(self._fd, select.POLLIN)

    def fileno(self) -> int:
        self._check_open()
        return self._fd

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        self._check_open()
        port = self._lib.xenevtchn_bind_interdomain(self._handle, domid, remote_port)
        if port < 0:
            raise self._error(f"bind to d{domid} port {remote_port}")
        return int(port)

    def notify(self, port: int) -> None:
        self._check_open()
        if self._lib.xenevtchn_notify(self._handle, port) < 0:
            raise self._error(f"notify port {port}")

    def pending(self) -> Optional[int]:
        self._check_open()
        if not self._poll.poll(0):
            return None
        port = self._lib.xenevtchn_pending(self._handle)
        if port < 0:
            err = ffi.errno
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return None
            raise EventChannelError(f"xenevtchn_pending: {os.strerror(err)}")
        return int(port)

    def unmask(self, port: int) -> None:
        self._check_open()
        if self._lib.xenevtchn_unmask(self._handle, port) < 0:
            raise self._error(f"unmask port {port}")

    def unbind(self, port: int) -> None:
        self._check_open()
        if self._lib.xenevtchn_unbind(self._handle, port) < 0:
            raise self._error(f"unbind port {port}")

    def close(self) -> None:
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        self._lib.xenevtchn_close(handle)

    def _check_open(self) -> None:
        if self._handle is None:
            raise EventChannelError("event channel handle is closed")

    def _error(self, what: str) -> EventChannelError:
        err = ffi.errno
        return EventChannelError(f"{what}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")
