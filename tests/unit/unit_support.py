"""Fakes and helpers shared by several unit-test modules: a grant mapping, a clock,
and the scratch image and buffers of the storage tests.

Test support only: pure Python over memory and temporary files, no gevent, no
threads, no real Xen. A helper lives here once two modules need it; one module's
own fakes stay in that module.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import pytest

from gblk.errors import GrantError
from gblk.xen.interfaces import PAGE_SIZE, GrantMapping

#: bytes of the storage tests' scratch image (the ``image`` fixture)
SIZE = 1 << 20


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes that differ from their neighbours and from other seeds' (period 256)."""
    period = bytes((i * 31 + seed * 7) & 0xFF for i in range(256))
    return (period * (n // 256 + 1))[:n]


@pytest.fixture(name="image")
def image_fixture(tmp_path: Path) -> str:
    """``image``: a scratch image of SIZE bytes holding ``pattern(SIZE)``; its path.
    A module uses it by importing ``image_fixture``."""
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(SIZE))
    return str(path)


def views_of(*sizes: int) -> List[memoryview]:
    """One fresh, zeroed, writable buffer of each size, as a store's readv fills them."""
    return [memoryview(bytearray(n)) for n in sizes]


class FakeClock:
    """Time that moves only when a test moves it (``clock.now += 5``): call it, or use
    its ``monotonic`` where code reads ``time.monotonic()``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class FakeMapping(GrantMapping):
    """A grant mapping of ``refs``: ``pages`` holds one 4096-byte view per ref, of
    ``buffers`` (a fake grant table's shared mmaps of the granted frames) or, without
    them, of private zeroed memory (for code that only keeps mappings and hands them
    back, such as the persistent-grant cache).

    ``unmap()`` behaves as the real and simulated tables' does: it releases the views,
    refuses (GrantError) while a view derived from the mapping is still alive, and is
    idempotent; ``on_unmap`` (a table's bookkeeping) runs once, when it succeeds.
    """

    def __init__(self, refs: Sequence[int], buffers: Optional[List[mmap.mmap]] = None,
                 on_unmap: Optional[Callable[["FakeMapping"], None]] = None) -> None:
        self.refs = list(refs)
        self._maps = buffers if buffers is not None else [
            mmap.mmap(-1, PAGE_SIZE) for _ in self.refs]
        self.pages = [memoryview(m) for m in self._maps]
        self.on_unmap = on_unmap
        self.unmapped = False

    def unmap(self) -> None:
        if self.unmapped:
            return
        for v in self.pages:
            v.release()
        self._maps = [m for m in self._maps if not _closed(m)]
        if self._maps:
            raise GrantError("cannot unmap: a view derived from the mapping is still alive")
        self.unmapped = True
        if self.on_unmap is not None:
            self.on_unmap(self)

    def __repr__(self) -> str:
        return f"<map {' '.join(map(str, self.refs))}>"


def _closed(m: mmap.mmap) -> bool:
    """Close ``m``; False while a view of it is still exported (mmap refuses then)."""
    try:
        m.close()
    except BufferError:
        return False
    return True
