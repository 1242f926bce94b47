"""The test-only fault-injecting store (gblk.storage.fault) on a real file: refused
unless enabled, each kind of fault does what its rule says and nothing more, short
transfers are resumed or failed (never returned short)."""

from __future__ import annotations

import errno
import json
import os
import time
from typing import Iterator, List

import pytest

from gblk.errors import StorageError
from gblk.storage import open_store
from gblk.storage.fault import ENV, FaultStore

from .unit_support import SIZE, image_fixture, pattern, views_of  # noqa: F401 - a fixture

pytestmark = pytest.mark.hostile


@pytest.fixture
def store(image: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultStore]:
    monkeypatch.setenv(ENV, "1")
    s = open_store("fault", image, readonly=False)
    assert isinstance(s, FaultStore)
    yield s
    s.close()


def rules(image: str, body: List[dict]) -> None:
    """Replace the control file atomically (a new inode: the store sees the change)."""
    tmp = image + ".faults.tmp"
    with open(tmp, "w") as f:
        json.dump(body, f)
    os.replace(tmp, image + ".faults")


def test_refused_without_the_environment_variable(image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A production gblk (no GBLK_FAULT_INJECTION=1) refuses the format, naming the switch."""
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(StorageError, match=f"test-only.*{ENV}=1"):
        open_store("fault", image, readonly=False)
    monkeypatch.setenv(ENV, "yes")  # only exactly "1"
    with pytest.raises(StorageError):
        open_store("fault", image, readonly=False)


def test_no_control_file_is_a_plain_raw_store(store: FaultStore) -> None:
    v = views_of(4096)
    store.readv(v, 8192)
    assert bytes(v[0]) == pattern(SIZE)[8192:12288]
    store.flush()


@pytest.mark.parametrize("name,code", [("EIO", errno.EIO), ("ENOSPC", errno.ENOSPC)])
def test_error_only_inside_its_sectors(store: FaultStore, image: str, name: str, code: int) -> None:
    """A write overlapping the sectors fails with the errno; one beside them does not."""
    rules(image, [{"op": "write", "sectors": [16, 24], "error": name}])
    with pytest.raises(OSError) as e:
        store.writev([memoryview(bytes(1024))], 20 * 512)
    assert e.value.errno == code
    store.writev([memoryview(pattern(4096, 3))], 24 * 512)  # just after: fine
    store.writev([memoryview(pattern(4096, 3))], 8 * 512)  # ends at sector 16: fine
    v = views_of(4096)
    store.readv(v, 16 * 512)  # reads are not covered by an op=write rule
    with open(image, "rb") as f:
        f.seek(16 * 512)
        assert f.read(4096) == pattern(SIZE)[16 * 512:16 * 512 + 4096]  # nothing written


def test_count_then_spent_and_change_clears(store: FaultStore, image: str) -> None:
    rules(image, [{"op": "flush", "error": "EIO", "count": 2}])
    for _ in range(2):
        with pytest.raises(OSError):
            store.flush()
    store.flush()
    rules(image, [{"op": "read", "error": "EIO"}])
    with pytest.raises(OSError):
        store.readv(views_of(512), 0)
    rules(image, [])
    store.readv(views_of(512), 0)


def test_short_transfers_are_resumed(store: FaultStore, image: str) -> None:
    """Every syscall moves 100 bytes: the IO still completes, byte for byte."""
    rules(image, [{"short": 100}])
    data = pattern(8192, 5)
    store.writev([memoryview(data[:3000]), memoryview(data[3000:])], 4096)
    v = views_of(512, 7680)
    store.readv(v, 4096)
    assert bytes(v[0]) + bytes(v[1]) == data


def test_truncated_transfer_fails(store: FaultStore, image: str) -> None:
    """The file ends early: the IO fails (EIO), it is never returned short."""
    rules(image, [{"op": "read", "truncate": 1000}])
    with pytest.raises(OSError) as e:
        store.readv(views_of(4096), 0)
    assert e.value.errno == errno.EIO


def test_delay_ends_when_the_rule_goes(store: FaultStore, image: str) -> None:
    """A stalled IO finishes as soon as its rule is removed from the file."""
    import threading

    rules(image, [{"op": "read", "delay": 60}])
    done = threading.Event()

    def reader() -> None:
        store.readv(views_of(512), 0)
        done.set()

    t = threading.Thread(target=reader)
    t.start()
    assert not done.wait(0.3)
    rules(image, [])
    assert done.wait(10), "the delayed read did not end when its rule went"
    t.join(10)


def test_nowait_raises_errors_and_declines_delays(store: FaultStore, image: str) -> None:
    rules(image, [{"op": "read", "sectors": [0, 8], "error": "EIO"},
                  {"op": "read", "sectors": [8, 16], "delay": 5}])
    with pytest.raises(OSError):
        store.readv_nowait(views_of(512), 0, 512)
    t0 = time.monotonic()
    assert store.readv_nowait(views_of(512), 8 * 512, 512) is False
    assert time.monotonic() - t0 < 4  # declined, not waited (a hang guard)


def test_broken_control_file_fails_io(store: FaultStore, image: str) -> None:
    """A control file that does not parse fails every IO: never silently no faults."""
    with open(image + ".faults", "w") as f:
        f.write("[{not json")
    with pytest.raises(OSError, match="fault control file"):
        store.readv(views_of(512), 0)
    rules(image, [{"op": "bogus"}])
    with pytest.raises(OSError, match="op 'bogus'"):
        store.readv(views_of(512), 0)
