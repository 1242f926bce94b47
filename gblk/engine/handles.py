"""The daemon's Xen handles, shared by every disk: one event-channel handle, one
grant-table handle, however many disks and rings are served.

libxenevtchn binds any number of ports on one handle (one fd), and libxengnttab maps
any domain's grants through one handle (one fd), so a disk costs no file descriptor of
its own for either (issue 16: 27 fds per idle disk with a handle per ring and per
disk). Both are opened on first use and closed when the last user lets go, so an idle
daemon with no disk holds neither.

``EventChannels`` watches its handle's fd with one hub watcher; when it is readable it
takes the pending ports (``pending()``, at most ``PENDING_PER_WAKE`` per wake-up: the
fd stays readable and the hub calls again) and wakes the ring each belongs to. The
port stays masked until that ring's greenlet unmasks it at the start of its pass, as
with a handle of its own: a storm of notifications collapses into one wake-up while
the port is masked (XSA-332). Runs on the hub; nothing here blocks.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import gevent

from ..errors import GblkError
from ..xen.interfaces import CopySegment, EventChannel, GrantMapping, GrantTable

#: pending ports taken per wake-up of the shared handle before other greenlets run
PENDING_PER_WAKE = 256


class EventChannels:
    """One event-channel handle for every ring; ``bind`` gives each ring its port."""

    def __init__(self, open_handle: Callable[[], EventChannel]) -> None:
        self._open = open_handle
        self._handle: Optional[EventChannel] = None
        self._io: Optional[object] = None
        self._wakers: Dict[int, Callable[[], None]] = {}
        #: the error that stopped the watcher, if ``pending()`` ever failed
        self.error: Optional[BaseException] = None

    @property
    def ports(self) -> int:
        """Ports bound now."""
        return len(self._wakers)

    def bind(self, domid: int, remote_port: int, wake: Callable[[], None]) -> int:
        """Bind ``remote_port`` of ``domid``; ``wake()`` runs (on the hub) whenever the
        port fires. Raises like ``EventChannel.bind_interdomain``."""
        if self._handle is None:
            handle = self._open()
            io = gevent.get_hub().loop.io(handle.fileno(), 1)
            io.start(self._readable)
            self._handle, self._io = handle, io
        try:
            port = self._handle.bind_interdomain(domid, remote_port)
        except BaseException:
            self._close_if_unused()
            raise
        self._wakers[port] = wake
        return port

    def notify(self, port: int) -> None:
        assert self._handle is not None
        self._handle.notify(port)

    def unmask(self, port: int) -> None:
        assert self._handle is not None
        self._handle.unmask(port)

    def unbind(self, port: int) -> None:
        """Idempotent; the handle closes with its last port."""
        if self._wakers.pop(port, None) is None:
            return
        try:
            if self._handle is not None:
                self._handle.unbind(port)
        finally:
            self._close_if_unused()

    def close(self) -> None:
        """Drop every binding and the handle (daemon stop)."""
        self._wakers.clear()
        self._close_if_unused()

    def _close_if_unused(self) -> None:
        if self._wakers or self._handle is None:
            return
        io, self._io = self._io, None
        if io is not None:
            io.stop()  # type: ignore[attr-defined]
        handle, self._handle = self._handle, None
        handle.close()

    def _readable(self) -> None:
        handle = self._handle
        if handle is None:
            return
        try:
            for _ in range(PENDING_PER_WAKE):
                port = handle.pending()
                if port is None:
                    return
                wake = self._wakers.get(port)
                if wake is not None:  # else unbound meanwhile: nothing to wake
                    wake()
        except GblkError as e:  # the device broke: stop watching rather than spin
            self.error = e
            if self._io is not None:
                self._io.stop()  # type: ignore[attr-defined]
            for wake in list(self._wakers.values()):
                wake()


class SharedGrantTable:
    """One grant-table handle for every disk; ``acquire`` gives each disk a lease."""

    def __init__(self, open_handle: Callable[[], GrantTable]) -> None:
        self._open = open_handle
        self._handle: Optional[GrantTable] = None
        self.users = 0

    def acquire(self) -> GrantTable:
        if self._handle is None:
            self._handle = self._open()
        self.users += 1
        return _Lease(self, self._handle)

    def _release(self) -> None:
        self.users -= 1
        if self.users <= 0 and self._handle is not None:
            handle, self._handle = self._handle, None
            self.users = 0
            handle.close()


class _Lease(GrantTable):
    """A disk's use of the shared handle: everything but ``close`` passes through."""

    def __init__(self, owner: SharedGrantTable, handle: GrantTable) -> None:
        self._owner: Optional[SharedGrantTable] = owner
        self._handle = handle
        self.supports_copy = handle.supports_copy

    def map_grant_refs(self, domid: int, refs: Sequence[int], writable: bool) -> GrantMapping:
        return self._handle.map_grant_refs(domid, refs, writable)

    def grant_copy(self, segments: Sequence[CopySegment]) -> list:
        return self._handle.grant_copy(segments)

    def close(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release()
