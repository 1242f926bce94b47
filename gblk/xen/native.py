"""Real threads' primitives in a gevent-patched process, and cffi objects safe in them.

gblk's entry points call ``gevent.monkey.patch_all`` before they import anything,
so every ``_thread.allocate_lock()`` made afterwards is a gevent lock. Code that runs
in gevent's threadpool (grant mapping, the simulated host's grant table) must not
use those: a gevent lock contended between real threads can lose its wake-up and
hang both for good.

That includes the lock inside every ``cffi.FFI``. cffi takes ``FFI._lock`` the first
time a type string is parsed (``ffi.cast("char *", ...)``, ``ffi.new("uint32_t[]")``)
and the first time a function of a ``dlopen``-ed library is looked up, and since
cffi was imported after patching, that lock is a gevent one. On the real
hypervisor this hung a daemon: a threadpool thread mapping a ring waited forever in
``ffi.cast`` while the hub waited in the first ``lib.xengnttab_unmap`` lookup (found
by the system suite's stack dump). ``new_ffi`` gives an FFI whose lock is a real one;
every FFI in gblk is made by it.

``FFI._lock`` is cffi's private attribute (cffi 1.15 to 2.0, all read it by that name
only); ``new_ffi`` checks it is there, so a cffi that renames it fails at import
instead of hanging later. Nothing here imports gevent unless it is already loaded.

``XenLibrary``: loading one Xen library and explaining its device's open errors, the
same for libxengnttab and libxenevtchn.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from typing import Any, Tuple

import cffi

from gblk.errors import XenUnavailable


def original(module: str, name: str) -> Any:
    """``module.name`` as it was before any gevent monkey-patching."""
    if "gevent" in sys.modules:  # not loaded: nothing is patched
        monkey = importlib.import_module("gevent.monkey")
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


def native_lock() -> Any:
    """A real (unpatched) thread lock; for short, non-blocking sections only."""
    return original("_thread", "allocate_lock")()


def new_ffi(cdef: str = "") -> cffi.FFI:
    """A ``cffi.FFI`` with ``cdef`` declared whose internal lock is a real thread lock."""
    ffi = cffi.FFI()
    if not hasattr(ffi, "_lock"):  # pragma: no cover - a cffi we have not seen
        raise RuntimeError(
            f"cffi {cffi.__version__} has no FFI._lock: gblk cannot make its FFI objects "
            "safe to use from real threads under gevent"
        )
    ffi._lock = native_lock()
    if cdef:
        ffi.cdef(cdef)
    return ffi


class XenLibrary:
    """One of the Xen libraries gblk binds (libxengnttab, libxenevtchn): ``load()``
    dlopens it once, under a real thread lock (the threadpool and the hub may both be
    first); ``open_error(err)`` explains its device failing to open, in one line."""

    def __init__(self, ffi: cffi.FFI, library: str, package: str, device: str,
                 what: str, kernel_module: str) -> None:
        self.ffi = ffi
        self.library = library
        self.package = package
        self.device = device
        self.what = what  # "grant", "event channel"
        self.kernel_module = kernel_module
        self._lib: Any = None
        self._lock = native_lock()

    def load(self, name: str = "") -> Any:
        """The library (``name``: another file of it, not kept); XenUnavailable naming
        the Debian package if it is missing."""
        name = name or self.library
        with self._lock:
            if name == self.library and self._lib is not None:
                return self._lib
            try:
                lib = self.ffi.dlopen(name)
            except OSError:
                raise XenUnavailable(
                    f"{name} not found: install the Debian package {self.package}") from None
            if name == self.library:
                self._lib = lib
            return lib

    def open(self, function: str, library: str = "", lib: Any = None) -> Tuple[Any, Any]:
        """``(lib, handle)``: the library (``lib``: one already loaded; tests pass a
        stand-in) and the handle its ``function(NULL, 0)`` (``xengnttab_open``,
        ``xenevtchn_open``) returned; XenUnavailable when it returns NULL."""
        if lib is None:
            lib = self.load(library)
        handle = getattr(lib, function)(self.ffi.NULL, 0)
        if handle == self.ffi.NULL:
            raise self.open_error(self.ffi.errno)
        return lib, handle

    def open_error(self, err: int) -> XenUnavailable:
        """Why the device did not open (``err``: the errno of ``*_open``)."""
        if err == errno.ENOENT:
            return XenUnavailable(
                f"no Xen {self.what} device ({self.device}): is this dom0 with "
                f"{self.kernel_module} loaded? try: modprobe {self.kernel_module}")
        if err in (errno.EACCES, errno.EPERM):
            return XenUnavailable(f"permission denied opening {self.device}: run gblk as root")
        return XenUnavailable(
            f"cannot open the Xen {self.what} device {self.device}: {os.strerror(err)}")
