"""sd_notify over a real datagram socket: gblk.sdnotify, and a real ``gblk serve``
telling a test "systemd" READY=1, WATCHDOG=1 and STOPPING=1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from gblk.sdnotify import Notifier, format_message, notify, socket_address, watchdog_interval
from tests.conftest import PROCESS_DEADLINE, stop_process


class NotifyListener:
    """The systemd side: a bound AF_UNIX datagram socket collecting notifications."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(address))
        self.address = address
        self.messages: List[Dict[str, str]] = []

    def receive(self, timeout: float = PROCESS_DEADLINE) -> Optional[Dict[str, str]]:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append(fields)
        return fields

    def wait_for(self, key: str, proc: Optional[subprocess.Popen] = None,
                 deadline: float = PROCESS_DEADLINE) -> Dict[str, str]:
        """Receive until a message carries ``key`` (hang guard: ``deadline`` s)."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"gblk exited ({proc.returncode}) before sending {key}")
            fields = self.receive(timeout=0.5)
            if fields is not None and key in fields:
                return fields
        raise AssertionError(f"no {key} within {deadline} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    lst = NotifyListener(str(tmp_path / "notify"))
    yield lst
    lst.close()


# --- the library ----------------------------------------------------------------------


def test_messages_reach_a_path_socket(listener: NotifyListener) -> None:
    """READY=1 with STATUS=, WATCHDOG=1 and STOPPING=1 arrive as sd_notify datagrams."""
    n = Notifier(env={"NOTIFY_SOCKET": listener.address})
    assert n.enabled
    assert n.ready(status="serving 0 disks")
    assert listener.receive() == {"READY": "1", "STATUS": "serving 0 disks"}
    assert n.watchdog()
    assert listener.receive() == {"WATCHDOG": "1"}
    assert n.stopping()
    assert listener.receive() == {"STOPPING": "1"}
    n.close()


def test_abstract_socket() -> None:
    """NOTIFY_SOCKET=@name is an abstract socket (systemd uses these in containers)."""
    name = f"@gblk-test-{os.getpid()}-{uuid.uuid4().hex}"
    lst = NotifyListener(name)
    try:
        n = Notifier(env={"NOTIFY_SOCKET": name})
        assert n.status("hello")
        assert lst.receive() == {"STATUS": "hello"}
    finally:
        lst.close()


def test_reloading_carries_monotonic_time(listener: NotifyListener) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC, as systemd's notify-reload protocol wants."""
    n = Notifier(env={"NOTIFY_SOCKET": listener.address})
    before = int(time.monotonic() * 1e6)
    assert n.reloading()
    fields = listener.receive()
    assert fields is not None and fields["RELOADING"] == "1"
    assert int(fields["MONOTONIC_USEC"]) >= before


def test_newline_in_status_cannot_inject_a_field(listener: NotifyListener) -> None:
    """A status built from a guest-controlled string cannot smuggle READY=1 or worse."""
    n = Notifier(env={"NOTIFY_SOCKET": listener.address})
    n.status("disk d5/1 failed\nREADY=1")
    assert listener.receive() == {"STATUS": "disk d5/1 failed READY=1"}
    with pytest.raises(ValueError):
        format_message(**{"A=B": 1})


def test_without_systemd_everything_is_a_no_op() -> None:
    """Run by hand (no NOTIFY_SOCKET) the notifier is off and never raises."""
    n = Notifier(env={})
    assert not n.enabled
    assert not n.ready()
    assert not n.watchdog()
    assert socket_address("vsock:2:1234") is None
    assert socket_address("") is None


def test_gone_socket_does_not_raise(tmp_path: Path) -> None:
    """If systemd's socket disappears, sending fails quietly and is counted."""
    n = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "missing")})
    assert not n.watchdog()
    assert n.failures == 1


def test_one_shot_notify(listener: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> None:
    """notify(**fields) reads $NOTIFY_SOCKET itself."""
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    assert notify(STATUS="x", READY=True)
    assert listener.receive() == {"STATUS": "x", "READY": "1"}


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "SELF"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "x"}, None),
    ],
)
def test_watchdog_interval(env: Dict[str, str], expected: Optional[float]) -> None:
    """WATCHDOG_USEC applies to us only if WATCHDOG_PID is unset or our pid
    (sd_watchdog_enabled(3))."""
    env = {k: (str(os.getpid()) if v == "SELF" else v) for k, v in env.items()}
    assert watchdog_interval(env) == expected


# --- a real daemon --------------------------------------------------------------------


def test_serve_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, xenstored: str, listener: NotifyListener, gblk_cmd: List[str], child_env: dict
) -> None:
    """`gblk serve --xen sim:DIR` under a test "systemd": READY=1 once XenStore is
    connected, WATCHDOG=1 pings from the event loop (WatchdogSec=1 here), and on
    SIGTERM STOPPING=1 and exit code 0 (what Type=notify + WatchdogSec= rely on)."""
    config = tmp_path / "empty.toml"
    config.write_text("")
    env = dict(child_env, NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="1000000")
    proc = subprocess.Popen(
        gblk_cmd + ["serve", "--config", str(config), "--xen", f"sim:{tmp_path}",
                    "--metrics-address", "127.0.0.1:0"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        ready = listener.wait_for("READY", proc)
        assert ready["READY"] == "1"
        listener.wait_for("WATCHDOG", proc)
        proc.send_signal(signal.SIGTERM)
        listener.wait_for("STOPPING")
        out, err = proc.communicate(timeout=PROCESS_DEADLINE)
        assert proc.returncode == 0, err.decode()
        assert b"Traceback" not in err
    finally:
        stop_process(proc)
