"""The persistent-grant cache of one ring: map once, reuse, bounded, LRU + idle.

Hub-side bookkeeping only; the mapping and unmapping themselves happen in
threadpool jobs. An entry in use by an in-flight job is never evicted: a mapping
outlives the threadpool job that uses it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Tuple

from ..xen.interfaces import GrantMapping


class _Entry:
    __slots__ = ("mapping", "view", "users", "last_used")

    def __init__(self, mapping: GrantMapping) -> None:
        self.mapping = mapping
        self.view = mapping.pages[0]
        self.users = 0
        self.last_used = time.monotonic()


class PersistentGrants:
    """gref -> mapped page, at most ``limit`` entries (Linux: 1056 per ring)."""

    def __init__(self, limit: int, idle_seconds: float) -> None:
        self.limit = limit
        self.idle_seconds = idle_seconds
        self._entries: "OrderedDict[int, _Entry]" = OrderedDict()
        self.evictions = 0
        #: the time ``views`` stamps entries with (the ring sets it once per pass)
        self.now = time.monotonic()

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, grefs: Iterable[int]) -> Dict[int, memoryview]:
        """Pages already mapped among ``grefs``, pinned until ``release``."""
        found: Dict[int, memoryview] = {}
        entries = self._entries
        for ref in grefs:
            if ref in found:
                continue
            e = entries.get(ref)
            if e is not None:
                e.users += 1
                entries.move_to_end(ref)
                found[ref] = e.view
        return found

    def views(self, segments: Iterable[Tuple[int, int, int]],
              pin: bool = False) -> Optional[Tuple[List[memoryview], List[_Entry]]]:
        """The ``[first_sect, last_sect]`` slice of each segment's page (XSA-403) and
        the entries they come from, or None (nothing held) unless every page is
        cached. One pass, for the hot path. ``pin``: the entries are pinned (never
        evicted) until ``unpin(entries)``, for a job; else the caller uses the slices
        before it yields (``pin(entries)`` if it hands them to a job after all). The
        caller releases the slices in every case."""
        entries = self._entries
        get = entries.get
        to_end = entries.move_to_end
        now = self.now
        out: List[memoryview] = []
        used: List[_Entry] = []
        for gref, first, last in segments:
            e = get(gref)
            if e is None:
                if pin:
                    self.unpin(used)
                for v in out:
                    v.release()
                return None
            to_end(gref)
            e.last_used = now
            if pin:
                e.users += 1
            used.append(e)
            out.append(e.view[first << 9:(last + 1) << 9])
        return out, used

    @staticmethod
    def pin(used: List[_Entry]) -> None:
        for e in used:
            e.users += 1

    def unpin(self, used: List[_Entry]) -> None:
        now = self.now
        for e in used:
            e.users -= 1
            e.last_used = now

    def release(self, grefs: Iterable[int]) -> None:
        now = time.monotonic()
        for ref in grefs:
            e = self._entries.get(ref)
            if e is not None and e.users > 0:
                e.users -= 1
                e.last_used = now

    def adopt(self, new: Dict[int, GrantMapping]) -> List[GrantMapping]:
        """Take the mappings a job made; return those the cache cannot keep (already
        cached by a concurrent job, or no room even after evicting idle entries)."""
        reject: List[GrantMapping] = []
        for ref, m in new.items():
            if ref in self._entries:
                reject.append(m)
                continue
            if len(self._entries) >= self.limit:
                victim = self._evict_one()
                if victim is None:
                    reject.append(m)
                    continue
                reject.append(victim)
            self._entries[ref] = _Entry(m)
        return reject

    def _evict_one(self) -> Optional[GrantMapping]:
        for ref, e in self._entries.items():  # least recently used first
            if e.users == 0:
                del self._entries[ref]
                self.evictions += 1
                return e.mapping
        return None

    def sweep(self) -> List[GrantMapping]:
        """Entries idle longer than ``idle_seconds`` (Linux's 60 s purge)."""
        cutoff = time.monotonic() - self.idle_seconds
        out = []
        for ref in [r for r, e in self._entries.items() if e.users == 0 and e.last_used < cutoff]:
            out.append(self._entries.pop(ref).mapping)
        return out

    def shrink_to(self, limit: int) -> List[GrantMapping]:
        """A lower limit (SIGHUP): evict idle entries down to it."""
        self.limit = limit
        out = []
        while len(self._entries) > limit:
            victim = self._evict_one()
            if victim is None:
                break
            out.append(victim)
        return out

    def drain(self) -> List[GrantMapping]:
        """Everything, for disconnect (no job may be in flight)."""
        out = [e.mapping for e in self._entries.values()]
        self._entries.clear()
        return out
