"""gblk-device-model run the way libxl runs a PV guest's device model: the console script
as a real process, libxl's command line, stdin from /dev/null and stderr into a log file,
against a simulated xenstored; QMP spoken over the Unix socket as libxl's QMP client
speaks it (``libxl_qmp.c``: CRLF-terminated messages, integer ids from 0x786c7100)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from gblk.xen.xenstore import GeventXenStore
from tests.conftest import PROCESS_DEADLINE

DOMID = 7
STATE = f"/local/domain/0/device-model/{DOMID}/state"


@pytest.fixture
def dm_cmd() -> List[str]:
    """The installed console script (what device_model_override= names), or the same
    entry point through ``-m`` when gblk runs from a tree that is not installed."""
    script = Path(sys.executable).parent / "gblk-device-model"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "gblk.devicemodel"]


@pytest.fixture
def store(xenstored: str) -> Iterator[GeventXenStore]:
    xs = GeventXenStore(socket_path=xenstored, timeout=10.0)
    yield xs
    xs.close()


def libxl_argv(run: Path, domid: int = DOMID, qmp: Optional[str] = None) -> List[str]:
    """libxl 4.17's device-model command line for a PV guest (qemu-xen, no dm_restrict)."""
    return [
        "-xen-domid", str(domid), "-no-shutdown",
        "-chardev", qmp or f"socket,id=libxl-cmd,path={run}/qmp-libxl-{domid},server=on,wait=off",
        "-mon", "chardev=libxl-cmd,mode=control",
        "-chardev", f"socket,id=libxenstat-cmd,path={run}/qmp-libxenstat-{domid},server=on,wait=off",
        "-mon", "chardev=libxenstat-cmd,mode=control",
        "-nodefaults", "-no-user-config", "-xen-attach", "-name", "guest1",
        "-vnc", "none", "-display", "none", "-nographic", "-machine", "xenpv", "-m", "193",
    ]


class DM:
    """One device-model process, started as libxl starts it."""

    def __init__(self, cmd: List[str], argv: List[str], env: dict, log: Path,
                 pass_fds: tuple = ()) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd + argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, pass_fds=pass_fds, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_dm(dm_cmd: List[str], child_env: dict, xenstored: str, tmp_path: Path) -> Iterator[Any]:
    started: List[DM] = []

    def start(argv: List[str], pass_fds: tuple = ()) -> DM:
        env = dict(child_env, XENSTORED_PATH=xenstored)
        dm = DM(dm_cmd, argv, env, tmp_path / "qemu-dm-guest1.log", pass_fds)
        started.append(dm)
        return dm

    yield start
    for dm in started:
        dm.stop()


def wait_for(what: str, check: Any, dm: DM, timeout: float = PROCESS_DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if dm.proc.poll() is not None:
            pytest.fail(f"device model exited ({dm.proc.returncode}) before {what}:\n{dm.text()}")
        time.sleep(0.05)
    pytest.fail(f"no {what} within {timeout} s:\n{dm.text()}")


class QmpClient:
    """What libxl's QMP client does on the socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(PROCESS_DEADLINE)
        self.sock.connect(path)
        self.buf = b""
        self.next_id = 0x786C7100  # "xlq\0", as libxl starts
        self.greeting = self.receive()

    def receive(self) -> Dict[str, Any]:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(4096)
            assert data, "the device model closed the QMP connection"
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return json.loads(line)

    def send_raw(self, data: bytes) -> Dict[str, Any]:
        self.sock.sendall(data)
        return self.receive()

    def execute(self, name: str) -> Dict[str, Any]:
        self.next_id += 1
        reply = self.send_raw(json.dumps({"execute": name, "id": self.next_id}).encode() + b"\r\n")
        assert reply.get("id") == self.next_id, reply
        return reply

    def close(self) -> None:
        self.sock.close()


def wait_exit(dm: DM) -> int:
    try:
        return dm.proc.wait(timeout=PROCESS_DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"device model did not exit:\n{dm.text()}")


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_serves_libxl_like_qemu(start_dm: Any, store: GeventXenStore, tmp_path: Path,
                                sig: signal.Signals) -> None:
    """libxl's wait and its QMP conversation succeed: the state node says running once
    the sockets exist, the greeting carries a QEMU version, qmp_capabilities, an empty
    query-chardev and a running query-status are answered, anything else (an unknown
    command, a line that is not JSON) gets a QMP error and the device model carries on;
    SIGHUP (xl destroy) or SIGTERM ends it with exit 0, its sockets removed, and the log
    libxl keeps in /var/log/xen/qemu-dm-NAME.log says what happened."""
    store.write(f"/local/domain/{DOMID}/name", "guest1")
    qmp_path = str(tmp_path / f"qmp-libxl-{DOMID}")
    dm = start_dm(libxl_argv(tmp_path))
    assert wait_for("state node", lambda: store.read(STATE), dm) == "running"
    assert os.path.exists(qmp_path)  # bound before the state node was written

    qmp = QmpClient(qmp_path)
    version = qmp.greeting["QMP"]["version"]["qemu"]
    assert isinstance(version["major"], int) and isinstance(version["minor"], int)
    assert qmp.execute("qmp_capabilities")["return"] == {}
    assert qmp.execute("query-chardev")["return"] == []
    status = qmp.execute("query-status")["return"]
    assert status["status"] == "running" and status["running"] is True
    unknown = qmp.execute("query-vnc")
    assert unknown["error"]["class"] == "CommandNotFound" and "query-vnc" in unknown["error"]["desc"]
    assert qmp.send_raw(b"this is not json\r\n")["error"]["class"] == "GenericError"
    assert qmp.execute("query-status")["return"]["status"] == "running"  # still serving

    # the second monitor, as libxenstat (xentop) uses it: bare objects, no line end
    stat = QmpClient(str(tmp_path / f"qmp-libxenstat-{DOMID}"))
    assert stat.send_raw(b'{ "execute": "qmp_capabilities" }') == {"return": {}}
    assert stat.send_raw(b'{ "execute": "query-blockstats" }') == {"return": []}
    stat.close()

    assert dm.proc.poll() is None
    dm.proc.send_signal(sig)
    assert wait_exit(dm) == 0
    qmp.close()
    log = dm.text()
    assert "Traceback" not in log
    assert f"stopping on {sig.name}" in log
    assert "qmp libxl-cmd: query-chardev" in log and "query-vnc" in log
    assert not os.path.exists(qmp_path)


def test_preopened_socket_and_prelaunch(start_dm: Any, store: GeventXenStore, tmp_path: Path) -> None:
    """With dm_restrict libxl listens itself, passes the socket as fd=N with -S and asks
    query-status for "prelaunch" (no state node yet, as QEMU); cont makes it running and
    writes the node."""
    path = str(tmp_path / f"qmp-libxl-{DOMID}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    argv = libxl_argv(tmp_path, qmp=f"socket,id=libxl-cmd,fd={fd},server=on,wait=off") + ["-S"]
    dm = start_dm(argv, pass_fds=(fd,))
    listener.close()
    qmp = QmpClient(path)  # connect() succeeds at once: the socket was listening already
    qmp.execute("qmp_capabilities")
    status = qmp.execute("query-status")["return"]
    assert (status["status"], status["running"]) == ("prelaunch", False)
    assert store.read(STATE) is None
    assert qmp.execute("cont")["return"] == {}
    assert qmp.execute("query-status")["return"]["status"] == "running"
    assert store.read(STATE) == "running"
    assert qmp.execute("quit")["return"] == {}
    assert wait_exit(dm) == 0
    assert "stopping on QMP quit" in dm.text()


def test_exits_when_its_domain_is_gone(start_dm: Any, store: GeventXenStore, tmp_path: Path) -> None:
    """A guest destroyed without libxl stopping its device model (xl killed, a crash)
    leaves no device model behind: once /local/domain/<domid> is gone it exits 0."""
    store.write(f"/local/domain/{DOMID}/name", "guest1")
    dm = start_dm(libxl_argv(tmp_path))
    wait_for("state node", lambda: store.read(STATE), dm)
    time.sleep(0.5)  # it has looked at the domain once
    store.rm(f"/local/domain/{DOMID}")
    assert wait_exit(dm) == 0
    assert f"stopping on domain {DOMID} is gone" in dm.text()


BAD_ARGS = [
    (["-machine", "xenpv"], "-xen-domid DOMID is missing"),
    (["-xen-domid", "7", "-machine", "xenfv", "-chardev", "socket,id=c,path=/x,server=on",
      "-mon", "chardev=c,mode=control"], "HVM guest needs QEMU"),
    (["-xen-domid", "seven"], "expected a guest's domain id"),
]


@pytest.mark.parametrize("argv,fragment", BAD_ARGS, ids=["no-domid", "hvm", "bad-domid"])
def test_bad_arguments_exit_2_with_one_line(dm_cmd: List[str], child_env: dict, argv: List[str],
                                            fragment: str) -> None:
    """A command line it cannot serve: exit 2 at once, one line saying why, before
    touching XenStore (none is reachable here), no traceback."""
    env = dict(child_env, XENSTORED_PATH="/nonexistent/socket")
    proc = subprocess.run(dm_cmd + argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=PROCESS_DEADLINE)
    err = proc.stderr.decode()
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gblk-device-model: "), err
    assert fragment in lines[0]


def test_no_xenstore_is_exit_1(dm_cmd: List[str], child_env: dict, tmp_path: Path) -> None:
    """No XenStore to write the state node to: exit 1 naming what is missing (libxl
    then reports the device model's early exit instead of waiting 60 s)."""
    env = dict(child_env, XENSTORED_PATH=str(tmp_path / "none.sock"))
    proc = subprocess.run(dm_cmd + libxl_argv(tmp_path), env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=PROCESS_DEADLINE)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "no XenStore" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / f"qmp-libxl-{DOMID}")


def test_help_and_version(dm_cmd: List[str], child_env: dict) -> None:
    """--help and -version (QEMU's spelling) answer on stdout with exit 0."""
    for flag, text in (("--help", "usage: gblk-device-model"), ("-version", "gblk-device-model ")):
        proc = subprocess.run(dm_cmd + [flag], env=child_env, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=PROCESS_DEADLINE)
        assert proc.returncode == 0 and proc.stdout.decode().startswith(text)
