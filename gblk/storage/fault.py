"""A fault-injecting store, for tests only: a raw image whose IO fails, stalls or
moves short when a control file says so.

Enabled only when gblk's environment has ``GBLK_FAULT_INJECTION=1`` (``open_store``
refuses the ``fault`` format otherwise, with that in the message); a toolstack
names it as ``params = "fault:/path/to/image"``. The rules live in
``/path/to/image.faults``, a JSON list re-read whenever the file changes (write it
atomically: a temporary file renamed over it). Absent or ``[]``: no faults. Each
rule is an object:

* ``op``: ``read``, ``write``, ``flush``, ``discard`` or ``any`` (the default)
* ``sectors``: ``[first, end)`` in 512-byte sectors; the rule matches an IO that
  overlaps it (absent: every IO; a flush has no sectors and matches only without)
* ``error``: an errno name (``EIO``, ``ENOSPC``...): the IO raises it
* ``delay``: seconds the IO waits first (in its thread; it ends early when the
  rule is gone from the file, so a test can stall IO and then clear the fault)
* ``short``: each syscall moves at most this many bytes (the store resumes it)
* ``truncate``: the first syscall moves this many bytes, the next none (the store
  then fails the IO: a backing file that ended early)
* ``count``: how many IOs the rule hits, then it is spent (absent: no limit;
  counting restarts when the file changes)

Blocking calls only, like every store; nothing is cached on the hub: faults are
checked on every call, ``*_nowait`` included (a rule that would wait makes them
answer "would block" so the IO goes to the threadpool).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from ..errors import StorageError
from .base import Store
from .raw import RawStore, _transfer

#: the environment variable that allows the ``fault`` format at all
ENV = "GBLK_FAULT_INJECTION"
OPS = ("read", "write", "flush", "discard", "any")
#: how often a delayed IO looks whether its rule is gone
POLL = 0.05


def allowed() -> bool:
    return os.environ.get(ENV) == "1"


class Rule:
    __slots__ = ("op", "first", "end", "error", "delay", "short", "truncate", "count", "hits",
                 "spent", "raw")

    def __init__(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise ValueError(f"a rule must be an object, not {raw!r}")
        unknown = set(raw) - {"op", "sectors", "error", "delay", "short", "truncate", "count"}
        if unknown:
            raise ValueError(f"unknown rule keys {sorted(unknown)}")
        self.raw = json.dumps(raw, sort_keys=True)
        self.op = raw.get("op", "any")
        if self.op not in OPS:
            raise ValueError(f"op {self.op!r} (known: {', '.join(OPS)})")
        sectors = raw.get("sectors")
        self.first: Optional[int] = None if sectors is None else int(sectors[0]) << 9
        self.end: Optional[int] = None if sectors is None else int(sectors[1]) << 9
        name = raw.get("error")
        self.error: Optional[int] = None
        if name is not None:
            code = getattr(errno, str(name), None)
            if not isinstance(code, int):
                raise ValueError(f"unknown errno name {name!r}")
            self.error = code
        self.delay = float(raw.get("delay", 0.0))
        self.short = int(raw.get("short", 0))
        self.truncate: Optional[int] = None if raw.get("truncate") is None else int(raw["truncate"])
        self.count: Optional[int] = None if raw.get("count") is None else int(raw["count"])
        self.hits: Iterator[int] = itertools.count()  # next() is atomic under the GIL
        self.spent = self.count == 0

    def matches(self, op: str, offset: Optional[int], length: int) -> bool:
        if self.op != "any" and self.op != op:
            return False
        if self.first is not None:
            if offset is None or self.end is None:
                return False
            if offset + length <= self.first or offset >= self.end:
                return False
        return True


def _parse(text: str) -> List[Rule]:
    data = json.loads(text) if text.strip() else []
    if not isinstance(data, list):
        raise ValueError("the control file must hold a JSON list of rules")
    return [Rule(r) for r in data]


def _capped(views: Sequence[memoryview], cap: int) -> Tuple[List[memoryview], List[memoryview]]:
    """The first ``cap`` bytes of ``views`` as new views, and the slices made (to release)."""
    out: List[memoryview] = []
    made: List[memoryview] = []
    for v in views:
        if cap <= 0:
            break
        if len(v) <= cap:
            out.append(v)
            cap -= len(v)
        else:
            s = v[:cap]
            made.append(s)
            out.append(s)
            cap = 0
    return out, made


class FaultStore(Store):
    """``RawStore`` of ``path`` with the faults of ``path + ".faults"``."""

    def __init__(self, path: str, readonly: bool, direct: bool = False) -> None:
        if not allowed():
            raise StorageError(
                f"format 'fault' of {path} is a test-only fault-injecting store: refused "
                f"(gblk allows it only with {ENV}=1 in its environment)")
        self.inner = RawStore(path, readonly=readonly, direct=direct)
        for name in ("sector_size", "physical_sector_size", "readonly", "discard_granularity",
                     "discard_alignment", "supports_discard", "supports_secure_discard"):
            setattr(self, name, getattr(self.inner, name))
        self.path = path
        self.control = path + ".faults"
        self._sig: Optional[Tuple[int, int, int]] = None
        self._rules: List[Rule] = []
        self._bad = ""

    # -- the rules --------------------------------------------------------------------
    def _current(self) -> List[Rule]:
        try:
            st = os.stat(self.control)
        except FileNotFoundError:
            self._sig, self._rules, self._bad = None, [], ""
            return []
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig != self._sig:
            try:
                with open(self.control) as f:
                    rules = _parse(f.read())
                self._rules, self._bad = rules, ""
            except (OSError, ValueError, TypeError, IndexError) as e:
                self._rules, self._bad = [], f"fault control file {self.control}: {e}"
            self._sig = sig
        if self._bad:  # a broken control file fails every IO: never silently no faults
            raise OSError(errno.EINVAL, self._bad)
        return self._rules

    def _rule(self, op: str, offset: Optional[int], length: int, consume: bool = True) -> Optional[Rule]:
        for r in self._current():
            if r.matches(op, offset, length):
                if r.count is not None:
                    if r.spent:
                        continue
                    if consume:
                        n = next(r.hits)
                        if n >= r.count - 1:
                            r.spent = True
                        if n >= r.count:
                            continue
                return r
        return None

    def _still(self, rule: Rule) -> bool:
        try:
            return any(r.raw == rule.raw for r in self._current())
        except OSError:
            return False

    def _apply(self, rule: Optional[Rule]) -> None:
        """The delay and the error of ``rule`` (short transfers are the caller's)."""
        if rule is None:
            return
        if rule.delay > 0:
            until = time.monotonic() + rule.delay
            while time.monotonic() < until and self._still(rule):
                time.sleep(min(POLL, max(0.0, until - time.monotonic())))
        if rule.error is not None:
            raise OSError(rule.error, f"{os.strerror(rule.error)} (injected)")

    def _io(self, op: str, syscall: Callable[..., int], views: Sequence[memoryview],
            offset: int) -> None:
        length = sum(map(len, views))
        rule = self._rule(op, offset, length)
        self._apply(rule)
        fd = self.inner.fd
        if rule is None or (not rule.short and rule.truncate is None):
            _transfer(syscall, fd, views, offset)
            return
        calls = itertools.count()

        def partial(fd: int, vs: List[memoryview], off: int) -> int:
            n = next(calls)
            assert rule is not None
            if rule.truncate is not None:
                if n > 0:
                    return 0
                cap = rule.truncate
            else:
                cap = rule.short
            part, made = _capped(vs, cap)
            try:
                return syscall(fd, part, off) if part else 0
            finally:
                for m in made:
                    m.release()

        _transfer(partial, fd, views, offset)

    # -- Store ----------------------------------------------------------------------
    def size(self) -> int:
        return self.inner.size()

    def readv(self, views: Sequence[memoryview], offset: int) -> None:
        self._io("read", os.preadv, views, offset)

    def writev(self, views: Sequence[memoryview], offset: int) -> None:
        self._io("write", os.pwritev, views, offset)

    def can_nowait(self, write: bool) -> bool:
        return self.inner.can_nowait(write)

    def _nowait(self, op: str, nbytes: int, offset: int) -> bool:
        """Whether the hub may go on; raises the rule's error when it has no delay."""
        rule = self._rule(op, offset, nbytes, consume=False)
        if rule is None:
            return True
        if rule.delay > 0 or rule.short or rule.truncate is not None:
            return False  # it would wait (or move short): the threadpool does it
        rule = self._rule(op, offset, nbytes)  # now counted
        self._apply(rule)
        return True

    def readv_nowait(self, views: Sequence[memoryview], offset: int, nbytes: int) -> bool:
        return self._nowait("read", nbytes, offset) and self.inner.readv_nowait(views, offset, nbytes)

    def writev_nowait(self, views: Sequence[memoryview], offset: int, nbytes: int) -> bool:
        return self._nowait("write", nbytes, offset) and self.inner.writev_nowait(views, offset, nbytes)

    def flush(self) -> None:
        self._apply(self._rule("flush", None, 0))
        self.inner.flush()

    def discard(self, offset: int, length: int, secure: bool = False) -> None:
        self._apply(self._rule("discard", offset, length))
        self.inner.discard(offset, length, secure)

    def close(self) -> None:
        self.inner.close()
