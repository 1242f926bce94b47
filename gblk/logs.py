"""Logging for gblk: stderr for journald, a per-device prefix, rate-limited guest noise.

- :func:`setup_logging` sends every record to stderr. Under systemd (``$JOURNAL_STREAM``
  names our stderr) each line starts with a ``<N>`` syslog priority and carries no
  timestamp: journald adds both. On a terminal, lines carry a timestamp and level.
- :func:`device_logger` returns a :class:`DeviceLogger` whose lines start with
  ``d5/51712`` (frontend domid / devid), so one guest's disk can be followed with grep.
- :meth:`DeviceLogger.guest` is for messages a guest can cause (bad requests, protocol
  violations): a token bucket per device lets ``backend.guest_log_rate`` lines per
  minute through and counts the rest; when lines flow again (or the device goes away,
  :meth:`DeviceLogger.flush_suppressed`) one line says how many were dropped. A guest
  must not be able to fill the host's disk through our log.

Runs on the hub only: no locks. Must not import gevent or any other gblk layer, and
must never raise out of a logging call because of a guest.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, TYPE_CHECKING, Any, Callable, MutableMapping, Optional, Tuple

if TYPE_CHECKING:
    _AdapterBase = logging.LoggerAdapter[logging.Logger]
else:
    _AdapterBase = logging.LoggerAdapter

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: Python level -> syslog priority (sd-daemon(3): <7> debug ... <2> crit)
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)

_HANDLER_MARK = "_gblk_handler"


def syslog_priority(levelno: int) -> int:
    """The syslog priority journald should record for a Python log level."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``; every line of a multi-line record (a traceback) gets
    the prefix, because journald splits the stream at newlines."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


class ConsoleFormatter(logging.Formatter):
    """``2026-11-25 10:40:01.123 INFO gblk.device: message`` for terminals and files."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        )


def stream_is_journal(stream: IO[str]) -> bool:
    """Whether ``stream`` is the journald stream systemd connected us to.

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` of that stream; it is inherited
    by children whose stderr may point elsewhere, so compare rather than trust.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    dev_text, sep, ino_text = value.partition(":")
    if not sep or not dev_text.isdigit() or not ino_text.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return st.st_dev == int(dev_text) and st.st_ino == int(ino_text)


def level_number(level: str) -> int:
    """``"info"`` -> ``logging.INFO``; ValueError for anything else."""
    try:
        return LEVELS[level]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; allowed: " + ", ".join(LEVELS)
        ) from None


def setup_logging(
    level: str = "info",
    stream: Optional[IO[str]] = None,
    journal: Optional[bool] = None,
) -> logging.Handler:
    """Send all logging to ``stream`` (stderr) at ``level``; idempotent.

    ``journal`` forces the journald format on or off; by default it is used when
    ``$JOURNAL_STREAM`` names ``stream``. Returns the installed handler.
    """
    target = stream if stream is not None else sys.stderr
    use_journal = stream_is_journal(target) if journal is None else journal
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    handler = logging.StreamHandler(target)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JournalFormatter() if use_journal else ConsoleFormatter())
    root.addHandler(handler)
    set_level(level)
    logging.captureWarnings(True)
    return handler


def set_level(level: str) -> None:
    """Change the threshold of every gblk log line (SIGHUP uses this)."""
    number = level_number(level)
    logging.getLogger().setLevel(number)
    logging.getLogger("gblk").setLevel(number)


# --------------------------------------------------------------------------------
# Guest-caused messages


class GuestLogRate:
    """The configured rate (lines per device per minute), shared by every device's
    bucket so that a SIGHUP changing ``backend.guest_log_rate`` reaches all of them:
    the daemon assigns ``per_minute``; buckets read it on every call."""

    __slots__ = ("per_minute",)

    def __init__(self, per_minute: float = 10.0) -> None:
        if per_minute < 0:
            raise ValueError("per_minute must be >= 0")
        self.per_minute = float(per_minute)


class TokenBucket:
    """A token bucket: ``per_minute`` tokens per minute, at most a minute's worth
    (and at least one) saved up. ``allow()`` takes a token or counts a suppression.

    ``clock`` is injectable for tests (monotonic seconds).
    """

    def __init__(
        self,
        rate: GuestLogRate,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = self._capacity()
        self._last = clock()
        #: suppressed since the last line that got through (reported, then reset)
        self.pending_suppressed = 0
        #: monotonic time of the first suppression in the current run
        self.suppressed_since: Optional[float] = None
        #: totals for metrics
        self.allowed_total = 0
        self.suppressed_total = 0

    def _capacity(self) -> float:
        per_minute = self.rate.per_minute
        return max(1.0, per_minute) if per_minute > 0 else 0.0

    def allow(self) -> bool:
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        capacity = self._capacity()
        self._tokens = min(capacity, self._tokens + elapsed * self.rate.per_minute / 60.0)
        if capacity > 0 and self._tokens >= 1.0:
            self._tokens -= 1.0
            self.allowed_total += 1
            return True
        if self.pending_suppressed == 0:
            self.suppressed_since = now
        self.pending_suppressed += 1
        self.suppressed_total += 1
        return False

    def take_suppressed(self) -> Tuple[int, float]:
        """(count, seconds since the first of them) of the current run; resets it."""
        count = self.pending_suppressed
        since = self.suppressed_since
        self.pending_suppressed = 0
        self.suppressed_since = None
        if not count or since is None:
            return 0, 0.0
        return count, max(0.0, self._clock() - since)


class DeviceLogger(_AdapterBase):
    """A logger whose lines start with ``d<domid>/<devid>``.

    ``guest(level, msg, *args)`` logs through the device's token bucket.
    """

    def __init__(
        self,
        logger: logging.Logger,
        domid: int,
        devid: int,
        rate: Optional[GuestLogRate] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(logger, {"domid": domid, "devid": devid})
        self.domid = domid
        self.devid = devid
        self.prefix = f"d{domid}/{devid}"
        self.bucket = TokenBucket(rate if rate is not None else GuestLogRate(), clock)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> Tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return f"{self.prefix} {msg}", kwargs

    def guest(self, level: int, msg: str, *args: Any, **kwargs: Any) -> bool:
        """Log a guest-caused message unless this device is over its rate.

        Returns whether the line was written. When a line gets through after some
        were dropped, a line saying how many comes first.
        """
        if not self.isEnabledFor(level):
            return False
        if not self.bucket.allow():
            return False
        self._report_suppressed(level)
        self.log(level, msg, *args, **kwargs)
        return True

    def guest_warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        """``guest(logging.WARNING, ...)``, for callers that want a plain callable."""
        self.guest(logging.WARNING, msg, *args, **kwargs)

    def flush_suppressed(self) -> None:
        """Report suppressed lines not yet reported (call when the device goes away)."""
        self._report_suppressed(logging.WARNING)

    def _report_suppressed(self, level: int) -> None:
        count, seconds = self.bucket.take_suppressed()
        if count:
            self.log(
                max(level, logging.WARNING),
                "%d guest-caused log line%s suppressed in the last %.0f s "
                "(backend.guest_log_rate = %g per minute)",
                count,
                "" if count == 1 else "s",
                seconds,
                self.bucket.rate.per_minute,
            )


def device_logger(
    domid: int,
    devid: int,
    rate: Optional[GuestLogRate] = None,
    logger: Optional[logging.Logger] = None,
    clock: Callable[[], float] = time.monotonic,
) -> DeviceLogger:
    """A :class:`DeviceLogger` for the disk ``devid`` of domain ``domid``.

    Pass the daemon's shared :class:`GuestLogRate` as ``rate`` so SIGHUP reaches it.
    """
    return DeviceLogger(
        logger if logger is not None else logging.getLogger("gblk.device"),
        domid,
        devid,
        rate=rate,
        clock=clock,
    )
