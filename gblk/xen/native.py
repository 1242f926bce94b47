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
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import cffi


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
