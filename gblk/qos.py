"""IO limit settings and the rules that give them to disks: pure values, no IO.

The settings are QEMU's throttle settings (``-drive throttling.*``, the
``block_set_io_throttle`` QMP command): six leaky buckets, IOPS and bytes per second
for reads, writes and both (``iops_total``, ``iops_read``, ``iops_write``, ``bps_total``,
``bps_read``, ``bps_write``). Each bucket has an average rate, an optional burst rate
``<name>_max`` and the burst's length in seconds ``<name>_max_length`` (default 1). The
rules are QEMU's too: a total and its read/write pair cannot both be set, a burst needs
its average and cannot be below it, a burst length above 1 needs a burst. 0 means no
limit. gblk's own bounds: every rate at most ``MAX_VALUE`` (QEMU's THROTTLE_VALUE_MAX),
a burst at most ``MAX_BURST_LENGTH`` seconds.

Which disk gets which limits: ``[[limit]]`` rules in the configuration, the first
whose every given match key matches the disk wins (``domain`` and ``uuid`` of the
guest, ``backend`` the disk's backend path in XenStore, ``image`` its image path; shell
globs). A rule names limits of its own, or ``group``, one of the
``[limit_groups.NAME]`` tables: every disk in a group shares that one budget.

Imported by the configuration, the engine and the control socket; imports nothing
from gblk but ``gblk.errors``. No logging, no IO.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

from .errors import ConfigError

#: the six buckets, in QEMU's order
BUCKETS = ("bps_total", "bps_read", "bps_write", "iops_total", "iops_read", "iops_write")
#: QEMU's THROTTLE_VALUE_MAX: the largest rate or burst it accepts
MAX_VALUE = 1_000_000_000_000_000
#: seconds: a burst longer than a day is a mistake, not a setting
MAX_BURST_LENGTH = 86400
#: every key a limit table may have (bucket, bucket_max, bucket_max_length)
LIMIT_KEYS: Tuple[str, ...] = tuple(k for b in BUCKETS for k in (b, b + "_max", b + "_max_length"))
MATCH_KEYS = ("domain", "uuid", "backend", "image")


@dataclass(frozen=True)
class Bucket:
    """One bucket's setting: ``avg`` units per second, bursts of ``max`` per second for
    ``length`` seconds (``max`` 0: no burst)."""

    avg: int = 0
    max: int = 0
    length: int = 1


@dataclass(frozen=True)
class Limits:
    """Validated limits: the buckets that are set (name -> Bucket)."""

    buckets: Tuple[Tuple[str, Bucket], ...] = ()

    @property
    def unlimited(self) -> bool:
        return not self.buckets

    def as_dict(self) -> Dict[str, int]:
        """The TOML/JSON form: only the keys that are set."""
        out: Dict[str, int] = {}
        for name, b in self.buckets:
            out[name] = b.avg
            if b.max:
                out[name + "_max"] = b.max
            if b.length != 1:
                out[name + "_max_length"] = b.length
        return out


UNLIMITED = Limits()


def parse_limits(table: Mapping[str, Any], where: str = "") -> Limits:
    """A table of limit keys (TOML, JSON, the flags of ``gblk ctl limit``) to Limits.
    Raises ValueError with one line naming the key and what is allowed."""
    for key in table:
        if key not in LIMIT_KEYS:
            raise ValueError(f"{where}unknown limit {key!r}; allowed: " + ", ".join(LIMIT_KEYS))
    values: Dict[str, int] = {}
    for key, raw in table.items():
        hi = MAX_BURST_LENGTH if key.endswith("_length") else MAX_VALUE
        lo = 1 if key.endswith("_length") else 0
        ok = (isinstance(raw, int) and not isinstance(raw, bool)) or (
            isinstance(raw, float) and math.isfinite(raw) and raw == int(raw))
        if not ok or not lo <= int(raw) <= hi:
            raise ValueError(f"{where}{key} must be an integer from {lo} to {hi} (got {raw!r})")
        values[key] = int(raw)
    buckets: List[Tuple[str, Bucket]] = []
    for name in BUCKETS:
        avg = values.get(name, 0)
        mx = values.get(name + "_max", 0)
        length = values.get(name + "_max_length", 1)
        if mx and not avg:
            raise ValueError(f"{where}{name}_max needs {name}")
        if mx and mx < avg:
            raise ValueError(f"{where}{name}_max ({mx}) cannot be lower than {name} ({avg})")
        if length > 1 and not mx:
            raise ValueError(f"{where}{name}_max_length needs {name}_max")
        if avg:
            buckets.append((name, Bucket(avg, mx, length)))
    names = {n for n, _ in buckets}
    for kind in ("bps", "iops"):
        both = [n for n in (f"{kind}_read", f"{kind}_write") if n in names]
        if f"{kind}_total" in names and both:
            raise ValueError(f"{where}{kind}_total and {both[0]} cannot be set together")
    return Limits(tuple(buckets))


@dataclass(frozen=True)
class DiskIdentity:
    """What a rule can match a disk by."""

    domain: str = ""  # the guest's name (/local/domain/N/name)
    uuid: str = ""  # the guest's uuid (/vm/UUID)
    backend: str = ""  # the backend path, /local/domain/0/backend/qdisk/5/51712
    image: str = ""  # the image path (params)


@dataclass(frozen=True)
class Rule:
    match: Tuple[Tuple[str, str], ...]
    limits: Limits = UNLIMITED
    group: str = ""

    def matches(self, disk: DiskIdentity) -> bool:
        return all(fnmatch.fnmatchcase(getattr(disk, k), pattern) for k, pattern in self.match)


@dataclass(frozen=True)
class Rules:
    """The ``[[limit]]`` rules and ``[limit_groups]`` of one configuration."""

    rules: Tuple[Rule, ...] = ()
    groups: Tuple[Tuple[str, Limits], ...] = ()

    def find(self, disk: DiskIdentity) -> Tuple[str, Limits]:
        """(group name or "", limits) of the first rule that matches; ("", UNLIMITED)."""
        groups = dict(self.groups)
        for r in self.rules:
            if r.matches(disk):
                return (r.group, groups[r.group]) if r.group else ("", r.limits)
        return "", UNLIMITED

    def group_limits(self) -> Dict[str, Limits]:
        return dict(self.groups)


NO_RULES = Rules()


@dataclass
class _Parsed:
    rules: List[Rule] = field(default_factory=list)
    groups: Dict[str, Limits] = field(default_factory=dict)


def parse_rules(rules: Any, groups: Any, where: str = "") -> Rules:
    """The ``limit`` array of tables and the ``limit_groups`` table of a TOML document.
    Raises ConfigError with one line."""
    out = _Parsed()
    if groups is not None:
        if not isinstance(groups, dict):
            raise ConfigError(f"{where}limit_groups must be a table of tables: [limit_groups.NAME]")
        for name, table in groups.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{where}limit_groups.{name} must be a table")
            try:
                out.groups[name] = parse_limits(table, f"limit_groups.{name}: ")
            except ValueError as e:
                raise ConfigError(f"{where}{e}") from None
    if rules is None:
        return Rules((), tuple(out.groups.items()))
    if not isinstance(rules, list):
        raise ConfigError(f"{where}limit must be an array of tables: [[limit]]")
    for i, table in enumerate(rules):
        at = f"limit #{i + 1}: "
        if not isinstance(table, dict):
            raise ConfigError(f"{where}{at}must be a table")
        match = [(k, table[k]) for k in MATCH_KEYS if k in table]
        for k, v in match:
            if not isinstance(v, str) or not v:
                raise ConfigError(f"{where}{at}{k} must be a non-empty string (a shell glob)")
        if not match:
            raise ConfigError(f"{where}{at}needs at least one of " + ", ".join(MATCH_KEYS))
        rest = {k: v for k, v in table.items() if k not in MATCH_KEYS and k != "group"}
        group = table.get("group", "")
        if group:
            if not isinstance(group, str) or group not in out.groups:
                raise ConfigError(f"{where}{at}group {group!r} is not a [limit_groups] table")
            if rest:
                raise ConfigError(f"{where}{at}a rule with a group takes its limits from the "
                                  f"group; remove " + ", ".join(sorted(rest)))
            out.rules.append(Rule(tuple(match), UNLIMITED, group))
            continue
        try:
            limits = parse_limits(rest, at)
        except ValueError as e:
            raise ConfigError(f"{where}{e}") from None
        out.rules.append(Rule(tuple(match), limits))
    return Rules(tuple(out.rules), tuple(out.groups.items()))
