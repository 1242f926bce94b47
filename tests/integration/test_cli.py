"""The ``gblk`` command as a user runs it: exit codes, one-line errors, signals."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

from tests.conftest import PROCESS_DEADLINE, stop_process


def run(cmd: List[str], env: dict, timeout: float = PROCESS_DEADLINE) -> Tuple[int, str, str]:
    proc = subprocess.run(
        cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def assert_one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("gblk: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


# --- configuration errors ---------------------------------------------------------------

CONFIG_ERRORS = [
    ("[daemon]\nkind = ['qdisk']\n", "unknown key daemon.kind"),
    ("[backend]\nmax_queues = 'four'\n", "backend.max_queues must be an integer from 1 to 64"),
    ("[backend]\nmax_ring_page_order = 9\n", "backend.max_ring_page_order must be an integer from 0 to 4"),
    ("[metrics]\naddress = 'localhost'\n", "metrics.address must be HOST:PORT"),
    ("[daemon\n", "not valid TOML"),
]


@pytest.mark.parametrize("text,fragment", CONFIG_ERRORS)
def test_serve_refuses_bad_configuration_with_exit_2(
    tmp_path: Path, gblk_cmd: List[str], child_env: dict, text: str, fragment: str
) -> None:
    """Unknown keys, bad types and out-of-range values stop `gblk serve` before it
    touches Xen: exit code 2 (the unit's RestartPreventExitStatus=), one line naming
    the file and the key, no traceback."""
    path = tmp_path / "gblk.toml"
    path.write_text(text)
    code, out, err = run(gblk_cmd + ["serve", "--config", str(path)], child_env)
    assert code == 2
    line = assert_one_line_error(err)
    assert fragment in line
    assert str(path) in line


def test_missing_config_file_is_exit_2(tmp_path: Path, gblk_cmd: List[str], child_env: dict) -> None:
    """--config naming a file that does not exist is an error, not "defaults"."""
    code, _, err = run(gblk_cmd + ["serve", "--config", str(tmp_path / "typo.toml")], child_env)
    assert code == 2
    assert "no such configuration file" in assert_one_line_error(err)


def test_bad_flag_is_exit_2(gblk_cmd: List[str], child_env: dict, tmp_path: Path) -> None:
    """A bad flag value is a configuration error too (and argparse errors exit 2)."""
    empty = tmp_path / "e.toml"
    empty.write_text("")
    code, _, err = run(gblk_cmd + ["serve", "--config", str(empty), "--kinds", "floppy"], child_env)
    assert code == 2
    assert "daemon.kinds" in assert_one_line_error(err)
    code, _, err = run(gblk_cmd + ["serve", "--no-such-flag"], child_env)
    assert code == 2
    assert "unrecognized arguments" in err


def test_config_command_prints_the_effective_configuration(
    tmp_path: Path, gblk_cmd: List[str], child_env: dict
) -> None:
    """`gblk config` shows what gblk would run with (file + flags) as TOML; --quiet only
    checks (ExecReload= runs it before sending SIGHUP)."""
    path = tmp_path / "gblk.toml"
    path.write_text("[backend]\nio_threads = 4\n")
    code, out, err = run(gblk_cmd + ["config", "--config", str(path), "--kinds", "vbd,qdisk"], child_env)
    assert code == 0, err
    assert "io_threads = 4" in out
    assert 'kinds = ["vbd", "qdisk"]' in out
    code, out, err = run(gblk_cmd + ["config", "--quiet", "--config", str(path)], child_env)
    assert (code, out, err) == (0, "", "")


# --- the no-Xen error -------------------------------------------------------------------


def have_xen() -> bool:
    return any(os.path.exists(p) for p in ("/dev/xen/gntdev", "/dev/xen/evtchn", "/proc/xen/capabilities"))


@pytest.mark.skipif(have_xen(), reason="this machine is a Xen host: the no-Xen error cannot happen")
def test_serve_without_xen_says_what_is_missing(tmp_path: Path, gblk_cmd: List[str], child_env: dict) -> None:
    """On a machine without Xen, `gblk serve` exits 1 with one line that says what is
    missing (grant device, event channels, XenStore) and no traceback."""
    empty = tmp_path / "e.toml"
    empty.write_text("")
    code, _, err = run(
        gblk_cmd + ["serve", "--config", str(empty), "--metrics-address", "127.0.0.1:0"], child_env
    )
    assert code == 1
    line = assert_one_line_error(err).lower()
    assert any(word in line for word in ("/dev/xen", "gntdev", "evtchn", "xenstore", "grant")), line
    if "xenstore" in line:  # issue 15: Debian has no xenstored.service; say what it has
        assert "systemctl status xen," in line and "/etc/init.d/xen" in line, line


@pytest.mark.skipif(have_xen(), reason="this machine is a Xen host: the no-Xen error cannot happen")
def test_debug_shows_the_traceback(tmp_path: Path, gblk_cmd: List[str], child_env: dict) -> None:
    """--debug is how a developer gets the traceback of an expected failure."""
    empty = tmp_path / "e.toml"
    empty.write_text("")
    code, _, err = run(
        gblk_cmd + ["serve", "--debug", "--config", str(empty), "--metrics-address", "127.0.0.1:0"],
        child_env,
    )
    assert code == 1
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("gblk: ")


# --- signals ----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signal(
    tmp_path: Path, xenstored: str, gblk_cmd: List[str], child_env: dict, sig: signal.Signals
) -> None:
    """SIGTERM (systemctl stop) and SIGINT (Ctrl-C) end `gblk serve` with exit code 0
    and no traceback, within a bounded time."""
    empty = tmp_path / "e.toml"
    empty.write_text("")
    notify_dir = tmp_path / "n"
    notify_dir.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_dir / "sock"))
    listener.settimeout(PROCESS_DEADLINE)
    env = dict(child_env, NOTIFY_SOCKET=str(notify_dir / "sock"))
    proc = subprocess.Popen(
        gblk_cmd + ["serve", "--config", str(empty), "--xen", f"sim:{tmp_path}",
                    "--metrics-address", "127.0.0.1:0"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        while b"READY=1" not in listener.recv(4096):  # started: signal handlers installed
            pass
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=PROCESS_DEADLINE)
        assert proc.returncode == 0, err.decode()
        assert b"Traceback" not in err
    finally:
        listener.close()
        stop_process(proc)


def test_serve_refuses_vbd_while_kernel_blkback_is_loaded(
    tmp_path: Path, xenstored: str, gblk_cmd: List[str], child_env: dict
) -> None:
    """With the kernel's xen-blkback loaded (it claims every vbd disk) `gblk serve
    --kinds vbd` refuses to start: exit 2, one line that says what to do, no
    traceback. qdisk alone still starts on the same host."""
    (tmp_path / "sys" / "module" / "xen_blkback").mkdir(parents=True)
    empty = tmp_path / "e.toml"
    empty.write_text("")
    base = gblk_cmd + ["serve", "--config", str(empty), "--xen", f"sim:{tmp_path}",
                       "--metrics-address", "127.0.0.1:0"]
    proc = subprocess.run(base + ["--kinds", "qdisk,vbd"], env=child_env, capture_output=True,
                          text=True, timeout=PROCESS_DEADLINE)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gblk: "), proc.stderr
    assert "xen-blkback" in lines[0] and "modprobe -r xen-blkback" in lines[0]
    notify_dir = tmp_path / "n"
    notify_dir.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_dir / "sock"))
    listener.settimeout(PROCESS_DEADLINE)
    served = subprocess.Popen(base + ["--kinds", "qdisk"],
                              env=dict(child_env, NOTIFY_SOCKET=str(notify_dir / "sock")),
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while b"READY=1" not in listener.recv(4096):
            pass
        served.send_signal(signal.SIGTERM)
        _, err = served.communicate(timeout=PROCESS_DEADLINE)
        assert served.returncode == 0, err.decode()
    finally:
        listener.close()
        stop_process(served)


# --- usage ------------------------------------------------------------------------------


def test_help_and_version(gblk_cmd: List[str], child_env: dict) -> None:
    """--help lists the commands; --version prints the version; both exit 0."""
    import gblk

    code, out, _ = run(gblk_cmd + ["--help"], child_env)
    assert code == 0
    for command in ("serve", "demo", "sim", "bench", "config"):
        assert command in out
    code, out, _ = run(gblk_cmd + ["--version"], child_env)
    assert (code, out.strip()) == (0, f"gblk {gblk.__version__}")
    code, _, err = run(gblk_cmd, child_env)
    assert code == 2 and "required" in err


def test_demo_argument_errors_are_usage_errors(gblk_cmd: List[str], child_env: dict) -> None:
    """Nonsense demo arguments are refused with exit 2 before anything starts."""
    for args in (["--guests", "0"], ["--seconds", "-1"], ["--metrics-address", "nope"]):
        code, _, err = run(gblk_cmd + ["demo"] + args, child_env)
        assert code == 2, args
        assert_one_line_error(err)


def test_unknown_simulator_component(gblk_cmd: List[str], child_env: dict) -> None:
    """`gblk sim NAME` for a component that does not exist is a usage error."""
    for name in ("nosuchthing", "nosuch.thing", "hypervisor.nosuchthing", "hypervisor._x",
                 "hypervisor..evtchn", "../etc", "hypervisor"):
        code, _, err = run(gblk_cmd + ["sim", name], child_env)
        assert code == 2, name
        assert name in assert_one_line_error(err)


def test_simulator_components_by_dotted_name(gblk_cmd: List[str], child_env: dict) -> None:
    """`gblk sim xenstored` and `gblk sim hypervisor.evtchn_bench` reach the components in
    the simulator's subpackages (`python -m gblk.sim.xenstored` too)."""
    for argv in (gblk_cmd + ["sim", "xenstored", "--help"],
                 gblk_cmd + ["sim", "hypervisor.evtchn_bench", "--help"],
                 [sys.executable, "-m", "gblk.sim.xenstored", "--help"]):
        code, out, err = run(argv, child_env)
        assert code == 0, (argv, err)
        assert "usage:" in out, argv


def test_main_returns_exit_codes_in_process() -> None:
    """gblk.cli.main returns codes instead of exiting (console scripts sys.exit them)."""
    from gblk.cli import main

    assert main(["--version"]) == 0
    assert main(["config", "--quiet", "--log-level", "nope"]) == 2


def test_console_scripts_are_installed() -> None:
    """`pip install .` provides the gblk, gblk-xl-hotplug and gblk-device-model commands
    (README's install section links all three into /usr/local/bin)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("gblk")
    except metadata.PackageNotFoundError:
        pytest.skip("gblk is not installed in this environment (run: pip install .)")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"gblk": "gblk.cli:main", "gblk-xl-hotplug": "gblk.hotplug:main",
                       "gblk-device-model": "gblk.devicemodel:main"}
    bindir = Path(sys.executable).parent
    if (bindir / "gblk").exists():
        assert shutil.which("gblk", path=str(bindir))
        code, out, _ = run([str(bindir / "gblk"), "--version"], dict(os.environ))
        assert code == 0 and out.startswith("gblk ")


def test_bench_and_sim_arguments_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything after `gblk bench` / `gblk sim NAME` (options included, --help too)
    reaches that module's own main(argv), on every Python version's argparse."""
    import types

    import gblk.sim

    seen: List[Tuple[str, List[str]]] = []
    bench = types.ModuleType("gblk.bench")
    bench.main = lambda argv: seen.append(("bench", argv)) or 0  # type: ignore[attr-defined]
    fake = types.ModuleType("gblk.sim.fake")
    fake.main = lambda argv: seen.append(("sim", argv)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gblk.bench", bench)
    monkeypatch.setitem(sys.modules, "gblk.sim.fake", fake)
    monkeypatch.setattr(gblk.sim, "fake", fake, raising=False)
    monkeypatch.setattr("gblk.logs.setup_logging", lambda *a, **k: None)  # keep pytest's logging
    from gblk.cli import main

    assert main(["bench", "--seconds", "1", "--json"]) == 0
    assert main(["bench", "--debug", "--help"]) == 0
    assert main(["sim", "fake", "--socket", "/x", "-E", "3"]) == 0
    assert seen == [
        ("bench", ["--seconds", "1", "--json"]),
        ("bench", ["--help"]),
        ("sim", ["--socket", "/x", "-E", "3"]),
    ]
    assert main(["serve", "--bogus"]) == 2
