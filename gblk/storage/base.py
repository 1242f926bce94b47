"""The Store interface, and which formats gblk serves (``SUPPORTED_FORMATS``).

Every store imports this module and this module imports none of them: choosing a store
for a format is ``gblk.storage.opener.open_store``'s job."""

from __future__ import annotations

import abc
from typing import Sequence

#: formats of libxl's ``params`` that gblk serves (``aio`` is mapped to ``raw`` by blkif):
#: raw itself, the image formats through qemu-nbd, and ``nbd:<uri>`` (someone's export)
SUPPORTED_FORMATS = ("raw", "qcow2", "qcow", "vpc", "vhd", "vhdx", "vmdk", "vdi", "qed", "nbd")


class Store(abc.ABC):
    """A backing store addressed in bytes. Every method blocks."""

    #: logical block size in bytes (alignment of every IO); 512 for plain files
    sector_size: int = 512
    physical_sector_size: int = 512
    readonly: bool = False
    discard_granularity: int = 4096
    discard_alignment: int = 0
    supports_discard: bool = True
    supports_secure_discard: bool = False

    @abc.abstractmethod
    def size(self) -> int:
        """Current size in bytes (re-read: the store may have grown)."""

    @abc.abstractmethod
    def readv(self, views: Sequence[memoryview], offset: int) -> None:
        """Fill every view from ``offset`` on, completely, or raise OSError."""

    @abc.abstractmethod
    def writev(self, views: Sequence[memoryview], offset: int) -> None:
        """Write every view from ``offset`` on, completely, or raise OSError."""

    def can_nowait(self, write: bool) -> bool:
        """Whether ``writev_nowait`` (``write``) or ``readv_nowait`` can succeed at all
        for this store; False: the caller does not try (it would cost a syscall)."""
        return False

    def readv_nowait(self, views: Sequence[memoryview], offset: int, nbytes: int) -> bool:
        """Fill the views only if that cannot block (the data is in the page cache):
        True when all ``nbytes`` were read, False when nothing or part was (the caller
        reads them again with ``readv`` in the threadpool). Safe on the hub."""
        return False

    def writev_nowait(self, views: Sequence[memoryview], offset: int, nbytes: int) -> bool:
        """Write the views only if that cannot block; True when all ``nbytes`` went.
        False: nothing or a prefix was written, and ``writev`` writes them all again."""
        return False

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""

    @abc.abstractmethod
    def discard(self, offset: int, length: int, secure: bool = False) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...
