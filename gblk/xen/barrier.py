"""A real full memory barrier for Python code that shares rings with another CPU.

The blkif ring protocol needs store->load ordering in two places (publish
``rsp_prod`` then read ``rsp_event``; write ``req_event`` then re-read ``req_prod``).
x86 reorders exactly that case, and CPython offers no fence, so ``fence()`` calls
into compiled code that executes a ``lock``-prefixed instruction. cffi ABI mode
only: nothing is compiled at install time.

The choice, measured on the Debian 12 x86-64 build machine (glibc 2.36, cffi 2.0,
CPython 3.11; 1e6 calls, best of 3):

* **Chosen on x86: acquire + release of a private, real (unpatched) thread lock,
  about 145 ns per fence(), and no GIL release.** Every cffi call releases and
  retakes the GIL; with threadpool workers running, retaking it after a 20 ns fence
  cost the ring loop whole GIL hand-offs (py-spy: up to 20 % of the hub's wall time
  in ``fence_spinlock`` on 1 MiB writes). An uncontended ``Lock.acquire()`` is taken
  without releasing the GIL, and taking a lock is an atomic read-modify-write
  (glibc's ``sem_trywait`` on CPython <= 3.12, ``PyMutex``'s compare-exchange on
  3.13): on x86 every atomic read-modify-write is a ``lock``-prefixed instruction
  (or ``xchg``, locked implicitly), a full barrier by the same SDM rule as below.
  The lock is private and held for two calls only.
* Before (kind "spinlock", kept for comparison and where a C-level fence is
  wanted): pthread_spin_lock + pthread_spin_unlock on a private spinlock (libc),
  about 300 ns per fence() (457 ns measured with gevent loaded). POSIX lists both among the functions that
  "synchronize memory" (XBD 4.12), and libc is always there. On x86-64 glibc's
  ``pthread_spin_lock`` is ``lock decl (%rdi)`` (checked with objdump); a locked
  instruction is not reordered with earlier or later loads or stores (Intel SDM
  vol. 3A, 8.2.2), which is the store->load fence we need. The lock is private and
  only ever held for the two calls, so it never spins unless two threads fence at
  the same instant.
* Rejected: ``pthread_spin_trylock`` on a permanently held lock (one call, ~165 ns;
  also a ``lock cmpxchg``) - POSIX leaves memory synchronisation unspecified when the
  call fails, so its barrier would be an implementation detail.
* Used instead on non-x86 machines when present: libatomic's
  ``atomic_thread_fence(memory_order_seq_cst)`` (~170 ns; ``lock orq $0,(%rsp)`` on
  x86-64, ``dmb ish`` on arm64). glibc's spinlocks are only acquire/release on arm64,
  which does not order a store before a later load; libatomic1 is not installed on a
  minimal dom0, hence not the default where the libc fence is exact.

The Python-level stores before the call are C stores made by the interpreter before
it calls an opaque foreign function, so the compiler cannot move them across it.
This module must not import gevent, pyxs or anything from gblk but ``errors`` and
``xen.native``.
"""

from __future__ import annotations

import platform
from typing import Any, Callable, Optional

from gblk.errors import XenUnavailable
from gblk.xen.native import native_lock, new_ffi

_CDEF = """
typedef int pthread_spinlock_t;
int pthread_spin_init(pthread_spinlock_t *lock, int pshared);
int pthread_spin_lock(pthread_spinlock_t *lock);
int pthread_spin_unlock(pthread_spinlock_t *lock);
"""
_ATOMIC_CDEF = "void atomic_thread_fence(int order);"
_MEMORY_ORDER_SEQ_CST = 5  # __ATOMIC_SEQ_CST

_ffi = new_ffi(_CDEF)
_atomic_ffi = new_ffi(_ATOMIC_CDEF)

_X86 = ("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86")


def make_fence(kind: Optional[str] = None) -> Callable[[], None]:
    """Build a fence callable. ``kind``: "lock" (x86 only: see above), "spinlock" (libc), "libatomic", or None for
    the default (lock on x86, libatomic elsewhere when it can be loaded)."""
    if kind is None:
        kind = "lock" if platform.machine().lower() in _X86 else "libatomic"
        if kind == "libatomic":
            try:
                return make_fence("libatomic")
            except XenUnavailable:
                kind = "spinlock"
    if kind == "lock":
        lock = native_lock()
        acquire, release = lock.acquire, lock.release

        def fence_lock() -> None:
            acquire()
            release()

        return fence_lock
    if kind == "libatomic":
        try:
            atomic: Any = _atomic_ffi.dlopen("libatomic.so.1")
        except OSError:
            raise XenUnavailable(
                "libatomic.so.1 not found: install the Debian package libatomic1"
            ) from None
        thread_fence = atomic.atomic_thread_fence

        def fence_atomic() -> None:
            thread_fence(_MEMORY_ORDER_SEQ_CST)

        return fence_atomic
    if kind != "spinlock":
        raise ValueError(f"unknown fence kind {kind!r}")
    libc: Any = _ffi.dlopen(None)  # the C library the interpreter already links
    lock = _ffi.new("pthread_spinlock_t *")
    if libc.pthread_spin_init(lock, 0) != 0:  # pragma: no cover - cannot fail on Linux
        raise OSError("pthread_spin_init failed")
    spin_lock, spin_unlock = libc.pthread_spin_lock, libc.pthread_spin_unlock

    def fence_spinlock() -> None:
        spin_lock(lock)
        spin_unlock(lock)

    # keep the lock's memory alive as long as the callable
    fence_spinlock.__dict__["_lock"] = lock
    return fence_spinlock


#: the process-wide full barrier: call ``fence()`` between the store and the load
fence: Callable[[], None] = make_fence()
