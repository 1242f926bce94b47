"""The simulated guest's memory of what its disk holds: a shadow copy that checks
every byte read back against what was written.

One ``Verifier`` per virtual disk. It keeps a shadow image (an anonymous, lazily
allocated mapping: only sectors written cost memory) and one state byte per sector:

* ``INITIAL`` - never written through this frontend: its content is the disk's
  initial content, known to be zeros only when the verifier was told so (a fresh
  sparse scratch image); otherwise unknown and not checked;
* ``KNOWN`` - the shadow holds exactly what the disk must return;
* ``UNKNOWN`` - indeterminate: a failed or lost write, overlapping writes racing, a
  discard whose result is not defined.

Concurrency: requests overlap in time. Every request takes a sequence number when
it is submitted; writes are logged. A write W *conflicts* with a request R when
their sector ranges overlap and W was in flight at some moment while R was (W was
submitted after R, or had not completed when R was submitted). A read checks only
the sectors no conflicting write touched; a completing write stores its data only
where no conflicting write touched (elsewhere the result is indeterminate: UNKNOWN).
So many requests may be in flight, overlapping or not, and nothing is ever flagged
that the disk was allowed to do.

Pure bookkeeping: no gevent, no IO, no XenStore; thread-unsafe (the frontend calls
it from the hub only).
"""

from __future__ import annotations

import mmap
import re
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, Iterator, List, Optional, Tuple, Union

SECTOR = 512
INITIAL = 0
KNOWN = 1
UNKNOWN = 2

Buffer = Union[bytes, bytearray, memoryview]

_RUN_KNOWN = re.compile(b"\x01+")
_RUN_KNOWN_OR_ZERO = re.compile(b"[\x00\x01]+")


@dataclass
class Mismatch:
    """One read whose data differs from what was written."""

    sector: int  #: first sector that differs
    nsectors: int  #: the read's length
    read_sector: int  #: where the read started
    expected: bytes  #: 16 bytes of the expected sector (a hint, not the whole)
    got: bytes  #: 16 bytes of what came back


class _Write:
    __slots__ = ("seq", "start", "end", "done")

    def __init__(self, seq: int, start: int, end: int) -> None:
        self.seq = seq
        self.start = start
        self.end = end
        self.done: Optional[int] = None


class Token:
    """A request the verifier tracks, from submission to completion."""

    __slots__ = ("seq", "start", "end", "write")

    def __init__(self, seq: int, start: int, end: int, write: Optional[_Write]) -> None:
        self.seq = seq
        self.start = start
        self.end = end
        self.write = write


class Verifier:
    """Shadow copy of a disk of ``nsectors`` 512-byte sectors."""

    def __init__(self, nsectors: int, initial_zero: bool = False,
                 max_details: int = 32) -> None:
        self.initial_zero = initial_zero
        self.nsectors = 0
        self._shadow = mmap.mmap(-1, SECTOR)
        self._state = mmap.mmap(-1, 1)
        self._seq = 0
        self._log: Deque[_Write] = deque()
        self._outstanding: Dict[int, Token] = {}  # insertion order == seq order
        self.max_details = max_details
        #: counters
        self.reads_checked = 0
        self.sectors_checked = 0
        self.mismatches = 0
        self.details: List[Mismatch] = []
        self.resize(nsectors)

    # -- geometry --------------------------------------------------------------
    def resize(self, nsectors: int) -> None:
        """The disk changed size: keep what is known about the common part."""
        if nsectors == self.nsectors:
            return
        shadow = mmap.mmap(-1, max(nsectors, 1) * SECTOR)
        state = mmap.mmap(-1, max(nsectors, 1))
        keep = min(nsectors, self.nsectors)
        if keep:
            shadow[: keep * SECTOR] = self._shadow[: keep * SECTOR]
            state[:keep] = self._state[:keep]
        self._shadow.close()
        self._state.close()
        self._shadow, self._state = shadow, state
        self.nsectors = nsectors

    def close(self) -> None:
        self._shadow.close()
        self._state.close()

    def _clip(self, start: int, end: int) -> Tuple[int, int]:
        return max(0, start), min(end, self.nsectors)

    # -- requests ----------------------------------------------------------------
    def begin(self, sector: int, nsectors: int, write: bool) -> Token:
        """A request covering [sector, sector+nsectors) is being submitted."""
        self._seq += 1
        w = None
        if write:
            w = _Write(self._seq, sector, sector + nsectors)
            self._log.append(w)
        tok = Token(self._seq, sector, sector + nsectors, w)
        self._outstanding[self._seq] = tok
        return tok

    def _conflicts(self, tok: Token) -> Iterator[Tuple[int, int]]:
        for w in self._log:
            if w is tok.write or w.end <= tok.start or w.start >= tok.end:
                continue
            if w.seq > tok.seq or w.done is None or w.done > tok.seq:
                yield max(w.start, tok.start), min(w.end, tok.end)

    def _finish(self, tok: Token) -> None:
        self._seq += 1
        if tok.write is not None:
            tok.write.done = self._seq
        self._outstanding.pop(tok.seq, None)
        oldest = next(iter(self._outstanding), self._seq + 1)
        log = self._log
        while log and log[0].done is not None and log[0].done < oldest:
            log.popleft()

    def _clean_ranges(self, tok: Token) -> List[Tuple[int, int]]:
        """[start, end) of ``tok`` minus every conflicting write, clipped to the disk."""
        start, end = self._clip(tok.start, tok.end)
        if start >= end:
            return []
        holes = sorted(self._conflicts(tok))
        out = []
        cur = start
        for a, b in holes:
            if a > cur:
                out.append((cur, min(a, end)))
            cur = max(cur, b)
            if cur >= end:
                break
        if cur < end:
            out.append((cur, end))
        return [(a, b) for a, b in out if a < b]

    def _mark(self, start: int, end: int, state: int) -> None:
        start, end = self._clip(start, end)
        if start < end:
            self._state[start:end] = bytes([state]) * (end - start)

    def end_write(self, tok: Token, ok: bool, data: Optional[Buffer] = None,
                  zeroes: bool = False) -> None:
        """A write (or barrier, flush-with-data, discard) completed. ``data`` is what
        was written from ``tok.start``; ``zeroes``: the range now reads as zeros
        (a discard on a store that zeroes); neither: the content is indeterminate."""
        try:
            if not ok or (data is None and not zeroes):
                self._mark(tok.start, tok.end, UNKNOWN)
                return
            clean = self._clean_ranges(tok)
            self._mark(tok.start, tok.end, UNKNOWN)  # conflicting parts stay unknown
            for a, b in clean:
                off, n = (a - tok.start) * SECTOR, (b - a) * SECTOR
                if data is None:
                    self._shadow[a * SECTOR:b * SECTOR] = bytes(n)
                else:
                    self._shadow[a * SECTOR:b * SECTOR] = data[off:off + n]
                self._state[a:b] = b"\x01" * (b - a)
        finally:
            self._finish(tok)

    def abandon(self, tok: Token) -> None:
        """The request will never complete (disconnect, reboot): a write's sectors
        become indeterminate."""
        if tok.write is not None:
            self._mark(tok.start, tok.end, UNKNOWN)
        self._finish(tok)

    def end_read(self, tok: Token, ok: bool, data: Optional[Buffer] = None) -> Optional[Mismatch]:
        """A read completed with ``data`` (from ``tok.start``): check every sector
        that must have a known value. Returns the first mismatch, if any."""
        try:
            if not ok or data is None:
                return None
            self.reads_checked += 1
            pattern = _RUN_KNOWN_OR_ZERO if self.initial_zero else _RUN_KNOWN
            for a, b in self._clean_ranges(tok):
                states = self._state[a:b]
                for m in pattern.finditer(states):
                    x, y = a + m.start(), a + m.end()
                    off, n = (x - tok.start) * SECTOR, (y - x) * SECTOR
                    self.sectors_checked += y - x
                    got = data[off:off + n]
                    if self._shadow[x * SECTOR:y * SECTOR] != got:
                        return self._report(tok, x, y, data)
            return None
        finally:
            self._finish(tok)

    def _report(self, tok: Token, x: int, y: int, data: Buffer) -> Mismatch:
        self.mismatches += 1
        s, exp, got = x, b"", b""
        for s in range(x, y):
            off = (s - tok.start) * SECTOR
            exp = self._shadow[s * SECTOR:(s + 1) * SECTOR]
            got = bytes(data[off:off + SECTOR])
            if exp != got:
                break
        mm = Mismatch(s, tok.end - tok.start, tok.start, exp[:16], got[:16])
        if len(self.details) < self.max_details:
            self.details.append(mm)
        return mm

    # -- inspection --------------------------------------------------------------
    def state(self, sector: int) -> int:
        return self._state[sector]

    def expected(self, sector: int, nsectors: int) -> Optional[bytes]:
        """What the disk must hold at [sector, sector+nsectors), or None when some
        sector of it is not known."""
        a, b = self._clip(sector, sector + nsectors)
        if a != sector or b != sector + nsectors:
            return None
        states = self._state[a:b]
        if b"\x02" in states or (not self.initial_zero and b"\x00" in states):
            return None
        return self._shadow[a * SECTOR:b * SECTOR]

    def outstanding(self) -> int:
        return len(self._outstanding)

    def log_length(self) -> int:
        return len(self._log)
