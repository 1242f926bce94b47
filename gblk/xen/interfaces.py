"""What gblk needs from a Xen host, as small abstract interfaces.

Implemented twice: for real Xen (``gblk.xen.gnttab``, ``gblk.xen.evtchn``,
``gblk.xen.xenstore``, ``gblk.xen.host``) and for the simulated host
(``gblk.sim``). The engine and the control plane only see these types.

Threading rule: ``GrantTable.map_grant_refs``/``grant_copy``/``GrantMapping.unmap``
may block (a paged-out grant retries inside the kernel), so the engine calls them in
gevent's threadpool; implementations must therefore be thread-safe and must not
touch gevent objects. EventChannel and XenStore methods are called on the hub.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from ..blkif.const import PAGE_SIZE as PAGE_SIZE  # one page of a grant (defined once there)

# GNTST_* status codes (xen/include/public/grant_table.h)
GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_bad_virt_addr = -5
GNTST_bad_dev_addr = -6
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_address_too_big = -11
GNTST_eagain = -12


class GrantMapping(abc.ABC):
    """Guest pages mapped into this process, one 4096-byte memoryview per grant ref.

    ``pages[i]`` is writable only if the mapping was made writable. A mapping
    outlives every threadpool job that uses its views; ``unmap()`` releases the
    views first, then unmaps. ``unmap()`` is idempotent.
    """

    pages: Sequence[memoryview]
    #: all pages as one buffer, when the implementation maps them adjacently
    #: (libxengnttab does; needed for multi-page rings, whose slots straddle pages)
    contiguous: Optional[memoryview] = None

    @abc.abstractmethod
    def unmap(self) -> None: ...


@dataclass
class CopySegment:
    """One grant-copy segment between a guest grant and a local buffer.

    ``to_local=True`` copies guest[gref][offset:offset+length] into ``local``
    (WRITE data); ``False`` copies ``local`` into the guest page (READ data).
    ``offset + length <= PAGE_SIZE``; ``len(local) == length``.
    """

    domid: int
    gref: int
    offset: int
    length: int
    local: memoryview
    to_local: bool


class GrantTable(abc.ABC):
    """A handle on the grant-table device (xengnttab_handle)."""

    #: whether grant_copy is available on this host
    supports_copy: bool = True

    @abc.abstractmethod
    def map_grant_refs(self, domid: int, refs: Sequence[int], writable: bool) -> GrantMapping:
        """Map all ``refs`` of ``domid`` or nothing: raise GrantError (with the GNTST
        status of the first failing ref) and leave nothing mapped on failure."""

    @abc.abstractmethod
    def grant_copy(self, segments: Sequence[CopySegment]) -> List[int]:
        """Run every segment; return one GNTST_* status per segment. Raises
        GrantError only if the operation as a whole could not be issued."""

    def set_max_grants(self, count: int) -> None:  # noqa: B027 - optional
        """Limit how many grants this handle may map at once (xengnttab_set_max_grants)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class EventChannel(abc.ABC):
    """A handle on the event-channel device (xenevtchn_handle).

    Semantics follow libxenevtchn: ``fileno()`` is pollable and becomes readable
    when a port fired; ``pending()`` returns one fired port (now masked) or None;
    events on a masked port are remembered and re-delivered by ``unmask()``.
    """

    @abc.abstractmethod
    def fileno(self) -> int: ...

    @abc.abstractmethod
    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Bind to ``remote_port`` of ``domid``; return the local port."""

    @abc.abstractmethod
    def notify(self, port: int) -> None: ...

    @abc.abstractmethod
    def pending(self) -> Optional[int]:
        """Non-blocking: one port that fired, or None if nothing is pending."""

    @abc.abstractmethod
    def unmask(self, port: int) -> None: ...

    @abc.abstractmethod
    def unbind(self, port: int) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class WatchSubscription(abc.ABC):
    """Watch events for one or more XenStore paths, delivered to greenlets.

    Bounded by design (XSA-349): pending events are kept as a *set* of paths, so a
    frontend rewriting nodes in a loop cannot grow memory; consumers re-read the
    current values anyway.
    """

    @abc.abstractmethod
    def get(self, timeout: Optional[float] = None) -> Optional[str]:
        """Block (the greenlet) until a path fired; None on timeout."""

    def drain(self) -> int:
        """Forget the events already pending (a consumer about to re-read every value
        it watches needs none of them); how many there were."""
        n = 0
        while self.get(timeout=0) is not None:
            n += 1
        return n

    @abc.abstractmethod
    def close(self) -> None: ...


class XenStoreOps(abc.ABC):
    """Operations valid both directly and inside a transaction. Paths and values are str."""

    @abc.abstractmethod
    def read(self, path: str) -> Optional[str]:
        """The value, or None when the node does not exist."""

    def read_many(self, paths: Sequence[str]) -> List[Optional[str]]:
        """``read`` of every path, in order. A client may send them all before the
        first answer (pipelined: one round trip instead of one per path)."""
        return [self.read(p) for p in paths]

    @abc.abstractmethod
    def write(self, path: str, value: str) -> None: ...

    def write_many(self, items: Sequence[Tuple[str, str]]) -> None:
        """``write`` of every (path, value), in order (xenstored applies a connection's
        requests in the order sent, so pipelining keeps it)."""
        for path, value in items:
            self.write(path, value)

    @abc.abstractmethod
    def mkdir(self, path: str) -> None: ...

    @abc.abstractmethod
    def rm(self, path: str) -> None:
        """Remove a subtree; a missing node is not an error."""

    @abc.abstractmethod
    def directory(self, path: str) -> List[str]:
        """Child names; [] when the node does not exist."""

    @abc.abstractmethod
    def set_perms(self, path: str, perms: Sequence[str]) -> None:
        """Permissions as xenstore strings: first the owner (``n0``), then ``r5``, ``b5``..."""

    @abc.abstractmethod
    def get_perms(self, path: str) -> List[str]: ...


class XenStore(XenStoreOps):
    """A XenStore connection for the hub: every call has a timeout, the connection is
    re-established if xenstored restarts and watches are re-armed."""

    @abc.abstractmethod
    def transaction(self, fn: Callable[[XenStoreOps], object], retries: int = 16) -> object:
        """Run ``fn(tx)`` in a transaction on a client of its own, retrying on EAGAIN;
        return what ``fn`` returned."""

    @abc.abstractmethod
    def watch(self, paths: Sequence[str]) -> WatchSubscription:
        """Subscribe to changes under each path (the initial event fires too)."""

    @abc.abstractmethod
    def get_domain_path(self, domid: int) -> str: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class XenHost(abc.ABC):
    """Factory for one host's interfaces; chosen by cli/daemon (real or ``sim:DIR``)."""

    #: the domid gblk runs in (the backend domain)
    domid: int = 0

    @abc.abstractmethod
    def open_grant_table(self) -> GrantTable: ...

    @abc.abstractmethod
    def open_event_channel(self) -> EventChannel: ...

    @abc.abstractmethod
    def open_xenstore(self) -> XenStore: ...

    @abc.abstractmethod
    def fence(self) -> Callable[[], None]:
        """A full memory barrier callable (store->load ordering) for shared rings."""

    def blkback_loaded(self) -> bool:
        """Whether the kernel's xen-blkback is loaded (it claims every ``vbd``)."""
        return False

    def close(self) -> None:  # noqa: B027 - optional
        pass


