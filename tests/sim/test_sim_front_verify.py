"""The simulated guest's shadow copy (gblk.sim.guest.verify.Verifier).

It is what makes every integration test byte-exact: it must catch a wrong byte, and
it must never blame a backend for something the protocol allowed (overlapping
requests in flight complete in any order).
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from gblk.sim.guest.verify import INITIAL, KNOWN, UNKNOWN, Verifier
from gblk.sim.guest.frontend import segments_for

S = 512


def sec(byte: int, n: int = 1) -> bytes:
    return bytes([byte]) * (S * n)


def test_write_then_read_back():
    """A completed write is what a later read must return, byte for byte."""
    v = Verifier(64)
    t = v.begin(4, 2, write=True)
    v.end_write(t, True, sec(1, 2))
    t = v.begin(0, 8, write=False)
    assert v.end_read(t, True, bytes(4 * S) + sec(1, 2) + bytes(2 * S)) is None
    assert v.sectors_checked == 2  # not initial_zero: the rest is unknown content
    t = v.begin(4, 2, write=False)
    mm = v.end_read(t, True, sec(1) + sec(9))
    assert mm is not None and mm.sector == 5 and v.mismatches == 1
    assert mm.expected == sec(1)[:16] and mm.got == sec(9)[:16]


def test_initial_zero_checks_unwritten_sectors():
    """On a fresh scratch image unwritten sectors must read as zeros."""
    v = Verifier(16, initial_zero=True)
    t = v.begin(0, 16, write=False)
    assert v.end_read(t, True, bytes(16 * S)) is None
    t = v.begin(3, 1, write=False)
    assert v.end_read(t, True, sec(7)) is not None


def test_failed_write_and_discard():
    """A failed write leaves its sectors indeterminate; a discard on a zeroing store
    leaves zeros; a discard without that promise leaves them unknown."""
    v = Verifier(16, initial_zero=True)
    t = v.begin(0, 4, write=True)
    v.end_write(t, False, sec(3, 4))
    assert [v.state(i) for i in range(5)] == [UNKNOWN] * 4 + [INITIAL]
    t = v.begin(0, 2, write=False)
    assert v.end_read(t, True, sec(0x55, 2)) is None  # anything goes
    t = v.begin(0, 4, write=True)
    v.end_write(t, True, None, zeroes=True)
    assert v.expected(0, 4) == bytes(4 * S) and v.state(0) == KNOWN
    t = v.begin(8, 4, write=True)
    v.end_write(t, True, None)
    assert v.expected(8, 4) is None


def test_concurrent_overlapping_writes_become_unknown():
    """Two overlapping writes in flight at the same time may land in either order:
    the overlap is not checked, the rest is."""
    v = Verifier(16)
    a = v.begin(0, 4, write=True)
    b = v.begin(2, 4, write=True)
    v.end_write(b, True, sec(2, 4))
    v.end_write(a, True, sec(1, 4))
    assert [v.state(i) for i in range(6)] == [KNOWN, KNOWN, UNKNOWN, UNKNOWN, KNOWN, KNOWN]
    t = v.begin(0, 6, write=False)
    got = sec(1, 2) + sec(7, 2) + sec(2, 2)
    assert v.end_read(t, True, got) is None


def test_read_racing_a_write_is_not_checked_there():
    """A read in flight while a write to the same sectors is in flight may see
    either content."""
    v = Verifier(8)
    w = v.begin(0, 1, write=True)
    v.end_write(w, True, sec(1))
    r = v.begin(0, 2, write=False)
    w2 = v.begin(0, 1, write=True)
    v.end_write(w2, True, sec(2))
    assert v.end_read(r, True, sec(1) + bytes(S)) is None
    r = v.begin(0, 1, write=False)
    assert v.end_read(r, True, sec(1)) is not None  # now only sec(2) is right


def test_abandon_and_resize_and_log_is_bounded():
    """Abandoned writes make their sectors unknown; resize keeps what is known; the
    write log never grows beyond what is in flight."""
    v = Verifier(8, initial_zero=True)
    t = v.begin(0, 1, write=True)
    v.abandon(t)
    assert v.state(0) == UNKNOWN
    t = v.begin(1, 1, write=True)
    v.end_write(t, True, sec(4))
    v.resize(32)
    assert v.expected(1, 1) == sec(4) and v.expected(20, 1) == bytes(S)
    for i in range(1000):
        t = v.begin(i % 32, 1, write=True)
        v.end_write(t, True, sec(i % 256))
    assert v.log_length() <= 1 and v.outstanding() == 0


def test_segments_for():
    """Sector ranges split on 4 KiB pages the way a page cache lays them out."""
    assert segments_for(0, 16) == [(0, 7), (0, 7)]
    assert segments_for(5, 3) == [(5, 7)]
    assert segments_for(6, 4) == [(6, 7), (0, 1)]
    assert segments_for(0, 0) == []


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=2, max_value=40))
def test_never_blames_a_correct_disk(seed, nops):
    """Random overlapping reads and writes, in flight together, completed in random
    order against a disk that applies each at some moment while it is in flight
    (any linearisation): the verifier never reports a mismatch."""
    rnd = random.Random(seed)
    size = 16
    disk = bytearray(size * S)
    v = Verifier(size, initial_zero=True)
    pending = []  # [token, kind, start, n, data, applied/result]
    counter = 0
    for _ in range(nops):
        start = rnd.randrange(size)
        n = rnd.randint(1, size - start)
        if rnd.random() < 0.5:
            counter += 1
            data = bytes([counter % 251 + 1]) * (n * S)
            pending.append([v.begin(start, n, write=True), "w", start, n, data, False])
        else:
            pending.append([v.begin(start, n, write=False), "r", start, n, None, None])
        # let some in-flight requests take effect, and some complete
        for p in list(pending):
            if rnd.random() < 0.4:
                if p[1] == "w" and not p[5]:
                    disk[p[2] * S:(p[2] + p[3]) * S] = p[4]
                    p[5] = True
                elif p[1] == "r" and p[5] is None:
                    p[5] = bytes(disk[p[2] * S:(p[2] + p[3]) * S])
            if rnd.random() < 0.3 and (p[5] is not None and p[5] is not False):
                pending.remove(p)
                if p[1] == "w":
                    v.end_write(p[0], True, p[4])
                else:
                    assert v.end_read(p[0], True, p[5]) is None
    for p in pending:
        if p[1] == "w":
            if not p[5]:
                disk[p[2] * S:(p[2] + p[3]) * S] = p[4]
            v.end_write(p[0], True, p[4])
        else:
            data = p[5] if p[5] is not None else bytes(disk[p[2] * S:(p[2] + p[3]) * S])
            assert v.end_read(p[0], True, data) is None
    t = v.begin(0, size, write=False)
    assert v.end_read(t, True, bytes(disk)) is None
    assert v.mismatches == 0
