"""The persistent-grant cache of one ring (gblk.engine.grants.PersistentGrants):
bounded, least recently used out first, pinned entries never out, idle sweep.

A mapping the cache hands back is the caller's to unmap; one it keeps must not be
returned twice. Time is a fake clock (no sleeping, no timed assertions).
"""

from __future__ import annotations

import types
from typing import Dict, List

import pytest

from gblk.engine import grants as grants_mod
from gblk.engine.grants import PersistentGrants
from gblk.xen.interfaces import GrantMapping

from .unit_support import FakeClock, FakeMapping


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(grants_mod, "time", types.SimpleNamespace(monotonic=c.monotonic))
    return c


def maps(*refs: int) -> Dict[int, GrantMapping]:
    return {r: FakeMapping([r]) for r in refs}


def refs_of(mappings: List[GrantMapping]) -> List[int]:
    out = []
    for m in mappings:
        assert isinstance(m, FakeMapping)
        out.append(m.refs[0])
    return out


def test_adopt_and_acquire(clock: FakeClock) -> None:
    """Adopted mappings are found again by gref, each pinned once per acquire; grefs
    not cached are simply absent (the job maps them)."""
    c = PersistentGrants(limit=8, idle_seconds=60)
    new = maps(1, 2)
    assert c.adopt(new) == []
    got = c.acquire([1, 2, 3, 1])
    assert set(got) == {1, 2}
    assert got[1] is new[1].pages[0]
    assert len(c) == 2


def test_adopt_duplicate_is_rejected(clock: FakeClock) -> None:
    """Two jobs that both mapped gref 5: the second mapping is handed back to be
    unmapped, the cached one stays (no double entry, no leak)."""
    c = PersistentGrants(limit=8, idle_seconds=60)
    first = maps(5)
    second = maps(5, 6)
    c.adopt(first)
    reject = c.adopt(second)
    assert reject == [second[5]]
    assert c.acquire([5])[5] is first[5].pages[0]
    assert len(c) == 2


def test_lru_eviction(clock: FakeClock) -> None:
    """Full cache: adopting evicts the least recently used entry (use = acquire), and
    the victim is handed back for unmapping."""
    c = PersistentGrants(limit=3, idle_seconds=60)
    ms = maps(1, 2, 3)
    c.adopt(ms)
    c.acquire([1])
    c.release([1])  # order of use now 2, 3, 1
    reject = c.adopt(maps(4))
    assert reject == [ms[2]]
    assert c.evictions == 1
    assert set(c.acquire([1, 2, 3, 4])) == {1, 3, 4}


def test_pinned_entries_are_never_evicted(clock: FakeClock) -> None:
    """An entry in use by an in-flight job is never evicted (a mapping outlives the
    threadpool job that uses it); with every entry pinned the new mapping is refused."""
    c = PersistentGrants(limit=2, idle_seconds=60)
    ms = maps(1, 2)
    c.adopt(ms)
    c.acquire([1, 2])
    new = maps(3)
    assert c.adopt(new) == [new[3]]
    assert c.evictions == 0
    c.release([1])
    assert c.adopt(maps(4)) == [ms[1]]
    assert set(c.acquire([1, 2, 4])) == {2, 4}


def test_pin_counts_nest(clock: FakeClock) -> None:
    """Two in-flight requests using the same grant: it stays pinned until both let go."""
    c = PersistentGrants(limit=1, idle_seconds=60)
    ms = maps(1)
    c.adopt(ms)
    c.acquire([1])
    c.acquire([1])
    c.release([1])
    assert c.shrink_to(0) == []
    c.release([1])
    assert c.shrink_to(0) == [ms[1]]


def test_idle_sweep(clock: FakeClock) -> None:
    """Entries unused for longer than idle_seconds go (Linux's 60 s purge); recently
    used and pinned ones stay, however old."""
    c = PersistentGrants(limit=8, idle_seconds=60)
    ms = maps(1, 2, 3)
    c.adopt(ms)
    clock.now += 30
    c.acquire([2])
    c.release([2])
    c.acquire([3])  # pinned
    clock.now += 31
    assert c.sweep() == [ms[1]]
    clock.now += 100
    assert c.sweep() == [ms[2]]
    assert len(c) == 1
    c.release([3])
    clock.now += 61
    assert c.sweep() == [ms[3]]
    assert len(c) == 0


def test_shrink_to(clock: FakeClock) -> None:
    """A lower limit evicts the least recently used unpinned entries down to it (or as
    far as pins allow) and later adoptions respect it."""
    c = PersistentGrants(limit=5, idle_seconds=60)
    ms = maps(1, 2, 3, 4, 5)
    c.adopt(ms)
    c.acquire([1])  # pinned and most recent
    out = c.shrink_to(2)
    assert refs_of(out) == [2, 3, 4]
    assert len(c) == 2 and c.limit == 2
    assert refs_of(c.shrink_to(0)) == [5]
    assert len(c) == 1  # 1 is pinned
    new = maps(9)
    assert c.adopt(new) == [new[9]]


def test_limit_zero_caches_nothing(clock: FakeClock) -> None:
    """max_persistent_grants = 0: every mapping is handed straight back."""
    c = PersistentGrants(limit=0, idle_seconds=60)
    new = maps(1, 2)
    assert c.adopt(new) == [new[1], new[2]]
    assert len(c) == 0


def test_drain_returns_everything_once(clock: FakeClock) -> None:
    """Disconnect: every cached mapping comes back exactly once; the cache is empty."""
    c = PersistentGrants(limit=8, idle_seconds=60)
    ms = maps(1, 2, 3)
    c.adopt(ms)
    assert sorted(refs_of(c.drain())) == [1, 2, 3]
    assert c.drain() == [] and len(c) == 0


def test_every_mapping_accounted_for(clock: FakeClock) -> None:
    """Over a long random-ish run, each mapping ever offered to the cache is either in
    it or handed back exactly once (no leak, no double unmap) and the cache never
    exceeds its limit."""
    c = PersistentGrants(limit=16, idle_seconds=5)
    handed_back: List[GrantMapping] = []
    offered: List[GrantMapping] = []
    pinned: List[List[int]] = []
    for step in range(2000):
        clock.now += 0.1
        refs = [(step * 7 + k * 13) % 40 for k in range(3)]
        cached = c.acquire(refs)
        pinned.append(list(cached))
        new: Dict[int, GrantMapping] = {r: FakeMapping([r]) for r in refs if r not in cached}
        offered.extend(new.values())
        handed_back.extend(c.adopt(new))
        if len(pinned) > 4:
            c.release(pinned.pop(0))
        if step % 50 == 0:
            handed_back.extend(c.sweep())
        if step == 1000:
            handed_back.extend(c.shrink_to(8))
        assert len(c) <= c.limit
    for p in pinned:
        c.release(p)
    handed_back.extend(c.drain())
    assert len(handed_back) == len(offered)
    assert {id(m) for m in handed_back} == {id(m) for m in offered}


def test_views_slice_exactly_and_pin_until_unpinned(clock: FakeClock) -> None:
    """``views`` gives each segment's [first_sect, last_sect] slice of its page (no
    byte outside it: XSA-403) in one pass; pinned entries survive eviction and the
    idle sweep until unpinned, and a missing page leaves nothing sliced or pinned."""
    c = PersistentGrants(limit=2, idle_seconds=10)
    assert c.adopt(maps(1, 2)) == []
    page1 = c.acquire([1])[1]
    c.release([1])
    page1[:] = bytes(range(256)) * 16
    got = c.views([(1, 1, 2), (2, 0, 7)], pin=True)
    assert got is not None
    views, used = got
    assert [len(v) for v in views] == [1024, 4096]
    assert bytes(views[0]) == bytes(page1[512:1536])
    # both pinned: a third grant cannot get in, the idle sweep takes nothing
    clock.now += 100
    assert refs_of(c.adopt(maps(3))) == [3]
    assert c.sweep() == []
    for v in views:
        v.release()
    c.unpin(used)
    assert refs_of(c.adopt(maps(4))) == [1]  # least recently used, now unpinned
    # gref 1 is gone: no views, and gref 4's entry is not left pinned
    assert c.views([(4, 0, 7), (1, 0, 7)], pin=True) is None
    clock.now += 100
    assert c.sweep() and len(c) == 0
