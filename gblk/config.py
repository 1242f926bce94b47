"""gblk's configuration: one TOML file plus command-line overrides, validated once.

``load_config(path, overrides)`` reads the file (``/etc/gblk/gblk.toml`` when ``path``
is None; a missing default file means "all defaults", a missing file named by the
user is an error), applies ``overrides`` (dotted keys such as ``"daemon.log_level"``,
set by command-line flags, which win over the file) and returns a frozen
:class:`Config`. Every problem raises :class:`gblk.errors.ConfigError` with one line
that names the key and says what is allowed.

The table of keys below (``_SPECS``) is the single source of truth: defaults, types,
ranges, help text, and which keys SIGHUP can change in a running daemon. README's
configuration reference and ``systemd/gblk.toml`` document the same keys; a unit test
keeps all three in step.

This module must not import anything from gblk but ``gblk.errors``, must not log,
and must not touch Xen: every layer may import it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import ConfigError
from .qos import NO_RULES, Rules, parse_rules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 by tox
    import tomli as tomllib

DEFAULT_PATH = "/etc/gblk/gblk.toml"

LOG_LEVELS = ("debug", "info", "warning", "error")
KINDS = ("qdisk", "vbd", "vbd3")
GRANT_MODES = ("auto", "persistent", "map", "copy")
DIRECT_IO_MODES = ("auto", "never", "always")
#: Upper bounds of the count-like keys. Each caps what one guest can make gblk hold
#: (mappings, threads, log lines); the figures are Linux xen-blkback's where it has one.
#: blkif.h allows 8 descriptor pages of 512 segments (4096) per INDIRECT request;
#: xen-blkback offers 256 (MAX_INDIRECT_SEGMENTS). gblk allows up to 1024: 4 MiB per
#: request, so a full ring cannot pin more than slots x 1024 guest pages.
MAX_INDIRECT_SEGMENTS = 1024
#: below this an indirect request carries no more than a direct one (11 segments)
MIN_INDIRECT_SEGMENTS = 12
#: XENBUS_MAX_RING_GRANT_ORDER (Linux include/xen/xenbus.h): 16 pages per ring
MAX_RING_PAGE_ORDER = 4
#: Linux offers as many queues as dom0 has CPUs; gblk serves every ring from one event
#: loop, so more rings than that gain nothing: 64 covers any dom0 worth the name
MAX_QUEUES = 64
#: persistent grants per ring: 16 x xen-blkback's default of 1056, 64 MiB of guest
#: pages per ring (blkback has no cap at all: its module parameter takes any int)
MAX_PERSISTENT_GRANTS = 16384
MAX_IO_THREADS = 1024
#: threads for control-plane calls (open, size, ring map, teardown unmaps)
MAX_CONTROL_THREADS = 64
#: log lines per device per minute (a guest must not fill the host's disk through us)
MAX_GUEST_LOG_RATE = 6000.0
#: changed-block tracking: bits per disk at most (2^27 bits, a 16 MiB bitmap: 8 TiB at 64 KiB)
MAX_CBT_BITS = 1 << 27

#: keys a running daemon applies on SIGHUP; every other change needs a restart
LIVE_KEYS = frozenset(
    {
        "daemon.log_level",
        "metrics.web_config",
        "backend.guest_log_rate",
        "backend.max_persistent_grants",
        "backend.persistent_grant_idle",
    }
)


# --------------------------------------------------------------------------------
# Value checkers: each takes the raw TOML/flag value and returns the typed value or
# raises _Bad(what is allowed). The caller turns that into a one-line ConfigError.


class _Bad(Exception):
    """Internal: the value is not allowed; the message says what is."""


def _choice(*allowed: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise _Bad("must be one of " + ", ".join(repr(a) for a in allowed))
        return value

    return check


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad("must be true or false")
    return value


def _int_range(lo: int, hi: Optional[int] = None) -> Callable[[object], int]:
    def check(value: object) -> int:
        what = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad("must be " + what)
        if value < lo or (hi is not None and value > hi):
            raise _Bad("must be " + what)
        return value

    return check


def _float_min(lo: float, inclusive: bool, hi: Optional[float] = None) -> Callable[[object], float]:
    def check(value: object) -> float:
        what = f"a number {'>=' if inclusive else '>'} {lo:g}"
        if hi is not None:
            what += f" and <= {hi:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad("must be " + what)
        number = float(value)
        if math.isnan(number) or math.isinf(number):
            raise _Bad("must be " + what + " (finite)")
        if number < lo or (number == lo and not inclusive) or (hi is not None and number > hi):
            raise _Bad("must be " + what)
        return number

    return check


def _kinds(value: object) -> Tuple[str, ...]:
    what = "a non-empty list of distinct backend kinds from " + ", ".join(
        repr(k) for k in KINDS
    )
    if not isinstance(value, (list, tuple)) or not value:
        raise _Bad("must be " + what)
    out: List[str] = []
    for item in value:
        if not isinstance(item, str) or item not in KINDS or item in out:
            raise _Bad("must be " + what)
        out.append(item)
    return tuple(out)


def _xen(value: object) -> str:
    if isinstance(value, str) and (value == "real" or (value.startswith("sim:") and value[4:])):
        return value
    raise _Bad("must be 'real' or 'sim:DIR' (the directory of a simulated host)")


def parse_address(text: str) -> Tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) into ``(host, port)``.

    Raises ValueError with what is allowed. Port 0 means "any free port".
    """
    allowed = "must be HOST:PORT with a port from 0 to 65535 (IPv6 as [::1]:9741)"
    if not isinstance(text, str):
        raise ValueError(allowed)
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(allowed)
        host, port_text = text[1:close], text[close + 2 :]
        if ":" not in host:
            raise ValueError(allowed)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(allowed)
    if not host or not port_text.isdigit():
        raise ValueError(allowed)
    port = int(port_text)
    if port > 65535:
        raise ValueError(allowed)
    return host, port


def _address(value: object) -> str:
    try:
        parse_address(value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    assert isinstance(value, str)
    return value


def _optional_path(value: object) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise _Bad("must be a file path, or \"\" for none")
    return value


#: sun_path is 108 bytes with the terminating NUL
MAX_SOCKET_PATH = 107


def _socket_path(value: object) -> str:
    what = f"an absolute path of at most {MAX_SOCKET_PATH} bytes (a Unix socket)"
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise _Bad("must be " + what)
    if len(value.encode("utf-8", "surrogateescape")) > MAX_SOCKET_PATH:
        raise _Bad("must be " + what)
    return value


def _granularity(value: object) -> int:
    what = "a power of two from 4096 to 16777216 (bytes)"
    if isinstance(value, bool) or not isinstance(value, int) or not 4096 <= value <= 1 << 24 \
            or value & (value - 1):
        raise _Bad("must be " + what)
    return value


def _state_dir(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise _Bad("must be an absolute directory path")
    return value


def _indirect(value: object) -> int:
    what = (
        f"0 (no indirect requests) or an integer from {MIN_INDIRECT_SEGMENTS} "
        f"to {MAX_INDIRECT_SEGMENTS}"
    )
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad("must be " + what)
    if value != 0 and not MIN_INDIRECT_SEGMENTS <= value <= MAX_INDIRECT_SEGMENTS:
        raise _Bad("must be " + what)
    return value


@dataclass(frozen=True)
class _Spec:
    section: str
    key: str
    default: object
    check: Callable[[object], Any]
    help: str

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


_SPECS: Tuple[_Spec, ...] = (
    _Spec("daemon", "log_level", "info", _choice(*LOG_LEVELS),
          "log threshold: debug, info, warning or error (SIGHUP applies it)"),
    _Spec("daemon", "kinds", ("qdisk",), _kinds,
          "backend kinds to serve (backend/<kind> in XenStore): qdisk, vbd, vbd3"),
    _Spec("daemon", "xen", "real", _xen,
          "'real' (this machine's /dev/xen and xenstored) or 'sim:DIR' (a simulated host)"),
    _Spec("daemon", "stop_timeout", 10.0, _float_min(0.0, inclusive=False),
          "seconds SIGTERM may take to drain in-flight IO before gblk exits anyway"),
    _Spec("daemon", "watchdog", True, _bool,
          "send systemd watchdog pings from the event loop when WatchdogSec= is set"),
    _Spec("daemon", "xenstore_timeout", 10.0, _float_min(0.0, inclusive=False),
          "seconds one XenStore call may take before it counts as failed"),
    _Spec("metrics", "enabled", True, _bool,
          "serve Prometheus metrics and /healthz over HTTP"),
    _Spec("metrics", "address", "127.0.0.1:9741", _address,
          "HOST:PORT to listen on (IPv6 as [::1]:9741; port 0 picks a free port)"),
    _Spec("metrics", "web_config", "", _optional_path,
          "web configuration file (TOML): TLS and basic auth for /metrics; \"\" = plain HTTP "
          "(SIGHUP re-reads it)"),
    _Spec("control", "enabled", True, _bool,
          "serve the local control socket that gblk list and gblk stats talk to"),
    _Spec("control", "socket", "/run/gblk/control.sock", _socket_path,
          "path of the control socket (root only: mode 0600, peers checked)"),
    _Spec("backend", "max_ring_page_order", 4, _int_range(0, MAX_RING_PAGE_ORDER),
          "largest ring a frontend may use, as a power of two of pages (max-ring-page-order)"),
    _Spec("backend", "max_queues", 4, _int_range(1, MAX_QUEUES),
          "most rings per device a frontend may use (multi-queue-max-queues)"),
    _Spec("backend", "max_indirect_segments", 256, _indirect,
          "segments per indirect request offered (feature-max-indirect-segments); 0 = none"),
    _Spec("backend", "grant_mode", "auto", _choice(*GRANT_MODES),
          "how guest pages are reached: auto (persistent when the frontend offers "
          "feature-persistent, else map), persistent, map, copy"),
    _Spec("backend", "max_persistent_grants", 1056, _int_range(0, MAX_PERSISTENT_GRANTS),
          "persistent grants kept mapped per ring (queue), least recently used evicted first "
          "(SIGHUP applies it)"),
    _Spec("backend", "persistent_grant_idle", 60.0, _float_min(0.0, inclusive=False),
          "seconds an unused persistent grant stays mapped (SIGHUP applies it)"),
    _Spec("backend", "direct_io", "auto", _choice(*DIRECT_IO_MODES),
          "O_DIRECT: auto (when the toolstack wrote direct-io-safe=1), never, always"),
    _Spec("backend", "discard", True, _bool,
          "offer DISCARD (unless the toolstack wrote discard-enable=0)"),
    _Spec("backend", "io_threads", 16, _int_range(1, MAX_IO_THREADS),
          "size of gevent's threadpool that runs the blocking IO"),
    _Spec("backend", "control_threads", 4, _int_range(1, MAX_CONTROL_THREADS),
          "threads of the separate pool that runs control-plane calls (open, size, ring "
          "map, teardown unmaps), so a stuck one never takes an IO thread"),
    _Spec("backend", "control_timeout", 30.0, _float_min(0.0, inclusive=False),
          "seconds one control-plane call may take; then that device fails (hotplug-error)"),
    _Spec("backend", "guest_log_rate", 10.0, _float_min(0.0, inclusive=True, hi=MAX_GUEST_LOG_RATE),
          "log lines caused by a guest, per device per minute, before rate-limiting "
          "(0 = count them, log none; SIGHUP applies it)"),
    _Spec("cbt", "directory", "/var/lib/gblk/cbt", _state_dir,
          "where changed-block tracking keeps its bitmaps, one file per image (the unit's "
          "StateDirectory=)"),
    _Spec("cbt", "granularity", 65536, _granularity,
          "bytes one bit of a new dirty bitmap covers (a power of two, 4 KiB to 16 MiB)"),
    _Spec("cbt", "max_bits", MAX_CBT_BITS, _int_range(1, MAX_CBT_BITS),
          "most bits a dirty bitmap may have; a larger disk needs a coarser granularity"),
    _Spec("cbt", "export_directory", "/var/lib/gblk/export", _state_dir,
          "where gblk ctl export keeps the side file of its point-in-time view (nameless "
          "temporary files, at most the disk's size each; not a tmpfs)"),
)

SECTIONS = ("daemon", "metrics", "control", "backend", "cbt")
_BY_NAME: Dict[str, _Spec] = {s.name: s for s in _SPECS}


def keys() -> List[Tuple[str, object, str]]:
    """Every key as ``(dotted name, default, help)``, in documentation order."""
    return [(s.name, s.default, s.help) for s in _SPECS]


@dataclass(frozen=True)
class DaemonConfig:
    log_level: str = "info"
    kinds: Tuple[str, ...] = ("qdisk",)
    xen: str = "real"
    stop_timeout: float = 10.0
    watchdog: bool = True
    xenstore_timeout: float = 10.0

    @property
    def sim_dir(self) -> Optional[str]:
        """The simulated host's directory for ``xen = "sim:DIR"``, else None."""
        return self.xen[4:] if self.xen.startswith("sim:") else None


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    address: str = "127.0.0.1:9741"
    web_config: str = ""

    @property
    def host(self) -> str:
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]


@dataclass(frozen=True)
class ControlConfig:
    enabled: bool = True
    socket: str = "/run/gblk/control.sock"


@dataclass(frozen=True)
class BackendConfig:
    max_ring_page_order: int = 4
    max_queues: int = 4
    max_indirect_segments: int = 256
    grant_mode: str = "auto"
    max_persistent_grants: int = 1056
    persistent_grant_idle: float = 60.0
    direct_io: str = "auto"
    discard: bool = True
    io_threads: int = 16
    control_threads: int = 4
    control_timeout: float = 30.0
    guest_log_rate: float = 10.0


@dataclass(frozen=True)
class CbtConfig:
    directory: str = "/var/lib/gblk/cbt"
    granularity: int = 65536
    max_bits: int = MAX_CBT_BITS
    export_directory: str = "/var/lib/gblk/export"


@dataclass(frozen=True)
class Config:
    """The whole validated configuration.

    ``path`` is the file that was read (None when the default file was absent) and
    ``overrides`` the command-line values, so :meth:`reload` can re-read the same
    sources on SIGHUP with the flags still winning.
    """

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    cbt: CbtConfig = field(default_factory=CbtConfig)
    #: the IO limit rules ([[limit]], [limit_groups.NAME]); SIGHUP applies them
    limits: Rules = NO_RULES
    path: Optional[str] = None
    overrides: Tuple[Tuple[str, object], ...] = ()
    #: what load_config was asked to read (None = the default path)
    requested_path: Optional[str] = None

    def get(self, name: str) -> object:
        """The value of a dotted key, e.g. ``config.get("daemon.log_level")``."""
        section, _, key = name.partition(".")
        if name not in _BY_NAME:
            raise KeyError(name)
        return getattr(getattr(self, section), key)

    def as_dict(self) -> Dict[str, Dict[str, object]]:
        """``{section: {key: value}}`` with lists for tuples (TOML-shaped)."""
        out: Dict[str, Dict[str, object]] = {s: {} for s in SECTIONS}
        for spec in _SPECS:
            value = self.get(spec.name)
            out[spec.section][spec.key] = list(value) if isinstance(value, tuple) else value
        return out

    def to_toml(self) -> str:
        """The effective configuration as a TOML document (``gblk config`` prints it)."""
        lines: List[str] = []
        for section, values in self.as_dict().items():
            if lines:
                lines.append("")
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
        for name, group in self.limits.groups:
            lines += ["", f"[limit_groups.{_toml_value(name)}]"]
            lines += [f"{k} = {v}" for k, v in group.as_dict().items()]
        for rule in self.limits.rules:
            lines += ["", "[[limit]]"] + [f"{k} = {_toml_value(v)}" for k, v in rule.match]
            if rule.group:
                lines.append(f"group = {_toml_value(rule.group)}")
            lines += [f"{k} = {v}" for k, v in rule.limits.as_dict().items()]
        return "\n".join(lines) + "\n"

    def changed_keys(self, new: "Config") -> List[str]:
        """Dotted names whose value differs in ``new``, in documentation order."""
        return [s.name for s in _SPECS if self.get(s.name) != new.get(s.name)]

    def reload_diff(self, new: "Config") -> Tuple[List[str], List[str]]:
        """Split the changes in ``new`` into (applied live, need a restart).

        The daemon applies the first list on SIGHUP and logs the second one as "not
        applied; restart gblk to change ...".
        """
        changed = self.changed_keys(new)
        return ([k for k in changed if k in LIVE_KEYS], [k for k in changed if k not in LIVE_KEYS])

    def with_live_changes(self, new: "Config") -> "Config":
        """This configuration with only the live keys taken from ``new``: what the
        daemon runs with after a SIGHUP that also changed restart-only keys."""
        result = replace(self, limits=new.limits)
        for name in LIVE_KEYS:
            section, _, key = name.partition(".")
            result = replace(
                result,
                **{section: replace(getattr(result, section), **{key: new.get(name)})},
            )
        return result

    def reload(self) -> "Config":
        """Read the same file again with the same command-line overrides (SIGHUP).

        Raises ConfigError like :func:`load_config`; the caller keeps the old
        configuration then.
        """
        return load_config(self.requested_path, dict(self.overrides))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _read_file(path: Optional[str]) -> Tuple[Optional[str], Dict[str, Any]]:
    """(path actually read or None, parsed document)."""
    explicit = path is not None
    target = path if explicit else DEFAULT_PATH
    assert target is not None
    try:
        with open(target, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{target}: no such configuration file") from None
        return None, {}
    except IsADirectoryError:
        raise ConfigError(f"{target}: is a directory, not a configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{target}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{target}: not UTF-8 text (TOML files are UTF-8)") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{target}: not valid TOML: {exc}") from None
    return target, document


def load_config(path: Optional[str] = None, overrides: Optional[Mapping[str, object]] = None) -> Config:
    """Read, merge and validate the configuration.

    ``path``: the TOML file; None reads :data:`DEFAULT_PATH` if it exists.
    ``overrides``: dotted keys to values from the command line (``None`` values are
    ignored, so a cli can pass every flag whether given or not). String values for
    list keys are split at commas (``"qdisk,vbd"``).
    """
    read_path, document = _read_file(path)
    where = f"{read_path}: " if read_path else ""
    values: Dict[str, object] = {}
    limits = parse_rules(document.pop("limit", None), document.pop("limit_groups", None), where)

    for section, table in document.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{where}unknown section [{section}]; allowed: "
                + ", ".join(f"[{s}]" for s in SECTIONS) + ", [[limit]], [limit_groups.NAME]"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{where}{section} must be a table: [{section}]")
        for key, raw in table.items():
            name = f"{section}.{key}"
            spec = _BY_NAME.get(name)
            if spec is None:
                allowed = ", ".join(s.key for s in _SPECS if s.section == section)
                raise ConfigError(f"{where}unknown key {name}; [{section}] allows: {allowed}")
            values[name] = _checked(spec, raw, where)

    clean_overrides: List[Tuple[str, object]] = []
    for name, raw in (overrides or {}).items():
        if raw is None:
            continue
        spec = _BY_NAME.get(name)
        if spec is None:
            raise ConfigError(f"unknown configuration key {name}")
        if isinstance(spec.default, tuple) and isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]  # "qdisk,vbd"
        values[name] = _checked(spec, raw, "command line: ")
        clean_overrides.append((name, tuple(raw) if isinstance(raw, list) else raw))

    sections: Dict[str, Dict[str, object]] = {s: {} for s in SECTIONS}
    for name, value in values.items():
        section, _, key = name.partition(".")
        sections[section][key] = value
    return Config(
        daemon=DaemonConfig(**sections["daemon"]),  # type: ignore[arg-type]
        metrics=MetricsConfig(**sections["metrics"]),  # type: ignore[arg-type]
        control=ControlConfig(**sections["control"]),  # type: ignore[arg-type]
        backend=BackendConfig(**sections["backend"]),  # type: ignore[arg-type]
        cbt=CbtConfig(**sections["cbt"]),  # type: ignore[arg-type]
        limits=limits,
        path=read_path,
        overrides=tuple(clean_overrides),
        requested_path=path,
    )


def _checked(spec: _Spec, raw: object, where: str) -> object:
    try:
        return spec.check(raw)
    except _Bad as bad:
        raise ConfigError(f"{where}{spec.name} {bad} (got {_show(raw)})") from None


def _show(raw: object) -> str:
    if isinstance(raw, bool):
        text = "true" if raw else "false"
    elif isinstance(raw, (list, tuple)):
        text = "[" + ", ".join(_show(r) for r in raw) + "]"
    elif isinstance(raw, str):
        text = repr(raw)
    elif isinstance(raw, dict):
        text = "a table"
    else:
        text = repr(raw)
    text = text.replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def dataclass_keys() -> Sequence[str]:
    """Dotted names of every dataclass field (a test checks these match the spec table)."""
    out: List[str] = []
    for section, cls in (("daemon", DaemonConfig), ("metrics", MetricsConfig), ("control", ControlConfig),
                         ("backend", BackendConfig), ("cbt", CbtConfig)):
        out.extend(f"{section}.{f.name}" for f in fields(cls))
    return out
