"""gblk.logs: journald-friendly output, per-device prefixes, guest log rate limiting."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Iterator, List

import pytest

from gblk.logs import (
    ConsoleFormatter,
    GuestLogRate,
    JournalFormatter,
    TokenBucket,
    device_logger,
    set_level,
    setup_logging,
    stream_is_journal,
    syslog_priority,
)

from .unit_support import FakeClock


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def messages(self) -> List[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def captured() -> Iterator[ListHandler]:
    logger = logging.getLogger("gblk.test.device")
    handler = ListHandler()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


@pytest.fixture(autouse=True)
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    gblk_level = logging.getLogger("gblk").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("gblk").setLevel(gblk_level)


def record(level: int, msg: str, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("gblk.x", level, __file__, 1, msg, (), exc_info)  # type: ignore[arg-type]


# --- formats --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "level,priority",
    [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3), (logging.CRITICAL, 2)],
)
def test_syslog_priorities(level: int, priority: int) -> None:
    """journald records the right priority for each Python level (sd-daemon(3) prefixes)."""
    assert syslog_priority(level) == priority


def test_journal_format_prefixes_every_line_and_has_no_timestamp() -> None:
    """Under systemd each line carries <N> (journald splits at newlines, so a traceback's
    lines keep their priority) and no timestamp of our own (journald adds one)."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        rec = record(logging.ERROR, "device failed", sys.exc_info())
    text = JournalFormatter().format(rec)
    lines = text.split("\n")
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)
    assert lines[0] == "<3>gblk.x: device failed"


def test_console_format_has_timestamp_and_level() -> None:
    """On a terminal, lines say when and how bad."""
    text = ConsoleFormatter().format(record(logging.WARNING, "hello"))
    assert text.endswith(" WARNING gblk.x: hello")
    assert text[:4].isdigit() and text[4] == "-"


def test_journal_stream_detected_only_for_the_stream_systemd_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$JOURNAL_STREAM is inherited by children whose stderr may be a file: the journal
    format is used only when the device:inode matches our stream."""
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert stream_is_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not stream_is_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not stream_is_journal(stream)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not stream_is_journal(stream)
    assert not stream_is_journal(io.StringIO())


def test_setup_logging_picks_the_journal_format_under_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """setup_logging writes <N> lines when stderr is the journal, timestamps otherwise."""
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging("info", stream=stream)
        logging.getLogger("gblk.daemon").info("ready")
        logging.getLogger("gblk.daemon").debug("hidden")
    assert path.read_text() == "<6>gblk.daemon: ready\n"


def test_setup_logging_is_idempotent_and_levels_change_live() -> None:
    """Calling it twice leaves one handler; set_level (SIGHUP) changes the threshold."""
    out = io.StringIO()
    setup_logging("warning", stream=out, journal=True)
    setup_logging("warning", stream=out, journal=True)
    marked = [h for h in logging.getLogger().handlers if getattr(h, "_gblk_handler", False)]
    assert len(marked) == 1
    log = logging.getLogger("gblk.engine")
    log.info("one")
    set_level("info")
    log.info("two")
    assert out.getvalue() == "<6>gblk.engine: two\n"
    with pytest.raises(ValueError, match="allowed: debug, info, warning, error"):
        set_level("loud")


# --- per-device prefix ----------------------------------------------------------------


def test_device_logger_prefix(captured: ListHandler) -> None:
    """Every line of a device starts with d<domid>/<devid>, so one disk can be grepped."""
    dlog = device_logger(5, 51712, logger=logging.getLogger("gblk.test.device"))
    dlog.info("connected with %d queues", 2)
    assert captured.messages == ["d5/51712 connected with 2 queues"]
    assert captured.records[0].domid == 5  # type: ignore[attr-defined]
    assert captured.records[0].devid == 51712  # type: ignore[attr-defined]


# --- guest rate limiting --------------------------------------------------------------


def test_token_bucket_allows_a_minute_of_burst_then_the_rate() -> None:
    """10/min: ten lines at once, then one every six seconds."""
    clock = FakeClock()
    bucket = TokenBucket(GuestLogRate(10), clock)
    assert [bucket.allow() for _ in range(12)] == [True] * 10 + [False] * 2
    clock.now += 5.9
    assert not bucket.allow()
    clock.now += 0.2
    assert bucket.allow()
    assert bucket.suppressed_total == 3
    assert bucket.allowed_total == 11


def test_guest_flood_is_bounded_and_the_drop_is_reported(captured: ListHandler) -> None:
    """A guest causing 10,000 warnings in a burst gets its rate's worth of lines; when
    lines flow again, one line says how many were dropped (then the message)."""
    clock = FakeClock()
    rate = GuestLogRate(10)
    dlog = device_logger(7, 768, rate=rate, logger=logging.getLogger("gblk.test.device"), clock=clock)
    written = sum(dlog.guest(logging.WARNING, "bad request %d", i) for i in range(10_000))
    assert written == 10
    assert len(captured.records) == 10
    clock.now += 60
    assert dlog.guest(logging.WARNING, "bad request again")
    assert captured.messages[-2] == (
        "d7/768 9990 guest-caused log lines suppressed in the last 60 s "
        "(backend.guest_log_rate = 10 per minute)"
    )
    assert captured.messages[-1] == "d7/768 bad request again"
    assert dlog.bucket.suppressed_total == 9990


def test_rate_change_reaches_existing_devices(captured: ListHandler) -> None:
    """SIGHUP changes backend.guest_log_rate through the shared GuestLogRate object."""
    clock = FakeClock()
    rate = GuestLogRate(1)
    dlog = device_logger(1, 1, rate=rate, logger=logging.getLogger("gblk.test.device"), clock=clock)
    assert dlog.guest(logging.WARNING, "a")
    assert not dlog.guest(logging.WARNING, "b")
    rate.per_minute = 600  # ten per second
    clock.now += 1
    assert sum(dlog.guest(logging.WARNING, "c") for _ in range(20)) >= 10


def test_rate_zero_logs_nothing_but_counts() -> None:
    """guest_log_rate = 0: no guest-caused lines at all, still counted for metrics."""
    clock = FakeClock()
    bucket = TokenBucket(GuestLogRate(0), clock)
    clock.now += 3600
    assert not any(bucket.allow() for _ in range(5))
    assert bucket.suppressed_total == 5


def test_flush_reports_pending_suppressions(captured: ListHandler) -> None:
    """When a device goes away, suppressed lines not yet reported are reported."""
    clock = FakeClock()
    dlog = device_logger(2, 5, rate=GuestLogRate(1), logger=logging.getLogger("gblk.test.device"), clock=clock)
    for _ in range(4):
        dlog.guest_warning("x")
    clock.now += 2
    dlog.flush_suppressed()
    assert captured.messages[-1].startswith("d2/5 3 guest-caused log lines suppressed in the last 2 s")
    dlog.flush_suppressed()
    assert len(captured.records) == 2


def test_disabled_level_does_not_spend_tokens(captured: ListHandler) -> None:
    """Debug-level guest messages with debug off neither log nor use up the budget."""
    logging.getLogger("gblk.test.device").setLevel(logging.INFO)
    clock = FakeClock()
    dlog = device_logger(3, 3, rate=GuestLogRate(1), logger=logging.getLogger("gblk.test.device"), clock=clock)
    for _ in range(5):
        assert not dlog.guest(logging.DEBUG, "noise")
    assert dlog.guest(logging.WARNING, "real")
    assert captured.messages == ["d3/3 real"]


def test_negative_rate_is_refused() -> None:
    """A negative rate is a programming error (the config layer refuses it for users)."""
    with pytest.raises(ValueError):
        GuestLogRate(-1)
