"""A whole simulated Xen host in a scratch directory, for tests, ``gblk demo`` and
the benchmarks.

``SimHost`` starts the simulated xenstored as a real subprocess
(``python -m gblk.sim.xenstored --socket DIR/xenstored.sock``), writes what
xen-init-dom0 writes for dom0, and hands out a libxl-like ``Toolstack``, guests
(a domain, a disk and a connected Linux-like ``Frontend``) and the backend daemon as
a subprocess (``python -m gblk serve --xen sim:DIR ...``). ``stop()`` tears all of
it down in order and is idempotent (also after a half-finished ``start()``).

Runs under gevent in a process that has monkey-patched (tests' conftest, the demo's
entry point): the XenStore clients are gblk.xen.xenstore. Must not import the engine, device,
daemon or cli layers: the backend is only ever a separate process here.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ...blkif import xenbus as xb
from ...xen.interfaces import XenStore
from ..hypervisor.evtchn import SimEventChannel
from ..guest.frontend import Frontend, FrontendOptions
from ..toolstack.libxl import DEFAULT_DEVID, DEFAULT_PAGES, Disk, Domain, Toolstack

log = logging.getLogger(__name__)

XENSTORED_SOCKET = "xenstored.sock"
#: a hang guard for child processes, not a performance bound
PROCESS_DEADLINE = 60.0
MiB = 1 << 20


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for the host's child processes: this very gblk importable, no
    XenStore/systemd variables leaking in."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "XENSTORED_PATH",
                        "XENSTORED_RUNDIR", "LISTEN_FDS", "LISTEN_PID")}
    import gblk

    root = os.path.dirname(os.path.dirname(os.path.abspath(gblk.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def isolate_child() -> None:
    """``preexec_fn`` for the host's children when an interactive program owns them
    (``gblk demo``): a process group of their own, so the terminal's Ctrl-C (SIGINT
    to the whole foreground group) or hang-up reaches only the parent, which then
    tears them down in order; and SIGTERM when the parent dies, so a SIGKILLed
    parent leaves no simulated xenstored or daemon behind. Runs in the child
    between fork and exec: nothing but two system calls."""
    os.setpgid(0, 0)
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


_PR_SET_PDEATHSIG = 1
try:  # loaded here, before any fork: the child only calls it
    import ctypes
    import ctypes.util

    _libc: Optional["ctypes.CDLL"] = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                                                 use_errno=True)
except (ImportError, OSError):  # pragma: no cover - no libc: no parent-death signal
    _libc = None


def _wait_proc(proc: "subprocess.Popen[bytes]", timeout: float) -> Optional[int]:
    """Wait without blocking the hub (subprocess is patched under gevent, but be sure)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)
    return proc.returncode


def stop_process(proc: "subprocess.Popen[bytes]", timeout: float = PROCESS_DEADLINE,
                 sig: int = signal.SIGTERM) -> Optional[int]:
    """``sig`` (SIGTERM), wait up to ``timeout``, then SIGKILL. The exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        if _wait_proc(proc, timeout) is None:
            proc.kill()
            _wait_proc(proc, 10.0)
    return proc.returncode


class BackendProcess:
    """``gblk serve --xen sim:DIR`` running as a child process; output in ``log_path``."""

    def __init__(self, argv: List[str], log_path: str, env: Dict[str, str],
                 isolate: bool = False) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")
        try:
            self.proc: "subprocess.Popen[bytes]" = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                env=env, preexec_fn=isolate_child if isolate else None)
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout: float = PROCESS_DEADLINE) -> Optional[int]:
        """SIGTERM (the daemon answers in-flight IO, then exits), SIGKILL after
        ``timeout``. Idempotent; returns the exit code."""
        try:
            return stop_process(self.proc, timeout)
        finally:
            self._log.close()

    def kill(self) -> Optional[int]:
        """SIGKILL: the daemon dies with everything in flight."""
        try:
            return stop_process(self.proc, 10.0, signal.SIGKILL)
        finally:
            self._log.close()


@dataclass
class Guest:
    """A simulated guest with one disk and its frontend."""

    domain: Domain
    disk: Disk
    frontend: Frontend
    xs: XenStore
    image: str
    scratch_image: bool = False
    extra: List[Frontend] = field(default_factory=list)

    @property
    def domid(self) -> int:
        return self.domain.domid


class SimHost:
    """A simulated Xen host in ``dir`` (a fresh temporary directory by default);
    scratch images in ``image_dir`` (by default ``dir``; the caller removes a directory
    it passed).

    ``isolate``: the children (xenstored, the daemon) get a process group of their
    own and die with this process (see :func:`isolate_child`); for interactive
    programs whose terminal signals must reach only them.

    Use as a context manager, or ``start()``/``stop()``. Attributes once started:
    ``xs`` (dom0's XenStore), ``toolstack``, ``socket_path``, ``guests``,
    ``backend`` (after ``start_backend``).
    """

    def __init__(self, dir: Optional[str] = None, timeout: float = 10.0,
                 keep: bool = False, xenstored_args: Sequence[str] = (),
                 isolate: bool = False, image_dir: Optional[str] = None) -> None:
        self._own_dir = dir is None
        #: where scratch images go (None: the host's directory)
        self.image_dir = image_dir
        self.isolate = isolate
        self.dir = dir or ""
        self.timeout = timeout
        self.keep = keep
        self.xenstored_args = list(xenstored_args)
        self.xenstored: Optional["subprocess.Popen[bytes]"] = None
        self.xs: Optional[XenStore] = None
        self._toolstack: Optional[Toolstack] = None
        self.backend: Optional[BackendProcess] = None
        self.guests: List[Guest] = []
        self._guest_xs: Dict[int, XenStore] = {}
        self._started = False
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------
    @property
    def socket_path(self) -> str:
        return os.path.join(self.dir, XENSTORED_SOCKET)

    @property
    def running(self) -> bool:
        """Started (xenstored up, toolstack ready) and not stopped."""
        return self._toolstack is not None and not self._stopped

    @property
    def toolstack(self) -> Toolstack:
        if self._toolstack is None:
            raise RuntimeError("SimHost not started")
        return self._toolstack

    def __enter__(self) -> "SimHost":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "SimHost":
        if self._started:
            return self
        self._started = True
        try:
            if self._own_dir:
                self.dir = tempfile.mkdtemp(prefix="gblk-sim-")
            else:
                os.makedirs(self.dir, exist_ok=True)
            self.xenstored = self._start_xenstored()
            from ...xen.xenstore import GeventXenStore

            self.xs = GeventXenStore(self.socket_path, self.timeout)
            self._write_dom0()
            self._toolstack = Toolstack(self.xs, self.dir, self.socket_path, self.timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_xenstored(self) -> "subprocess.Popen[bytes]":
        log_path = os.path.join(self.dir, "xenstored.log")
        read_fd, write_fd = os.pipe()
        logf = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gblk.sim.xenstored", "--socket", self.socket_path,
                 "--ready-fd", str(write_fd), *self.xenstored_args],
                env=child_env(), pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
                stdout=logf, stderr=subprocess.STDOUT,
                preexec_fn=isolate_child if self.isolate else None)
        finally:
            os.close(write_fd)
            logf.close()
        import gevent.os

        line = b""
        deadline = time.monotonic() + PROCESS_DEADLINE
        try:
            while not line.endswith(b"\n") and time.monotonic() < deadline:
                chunk = gevent.os.tp_read(read_fd, 64)  # EOF if it died first
                if not chunk:
                    break
                line += chunk
        finally:
            os.close(read_fd)
        if not line.startswith(b"READY=1"):
            stop_process(proc, 5.0)
            try:
                with open(log_path, "rb") as f:
                    why = f.read().decode("utf-8", "replace").strip()
            except OSError:
                why = ""
            raise RuntimeError(f"simulated xenstored did not start (exit {proc.returncode})"
                               + (f": {why}" if why else ""))
        return proc

    def _write_dom0(self) -> None:
        """What xen-init-dom0 writes."""
        assert self.xs is not None
        self.xs.write("/local/domain/0/name", "Domain-0")
        self.xs.write("/local/domain/0/domid", "0")

    def stop(self) -> None:
        """Stop guests' frontends, the backend (SIGTERM), xenstored; remove the
        scratch directory unless ``keep``. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for g in self.guests:
            for fe in [g.frontend] + g.extra:
                try:
                    fe.abandon()
                except Exception as e:  # noqa: BLE001 - teardown goes on
                    log.debug("abandon %r: %s", fe, e)
        if self.backend is not None:
            self.backend.stop(timeout=PROCESS_DEADLINE)
        for gxs in self._guest_xs.values():
            _close_quietly(gxs)
        self._guest_xs.clear()
        if self.xs is not None:
            _close_quietly(self.xs)
        if self.xenstored is not None:
            stop_process(self.xenstored, 10.0)
        for g in self.guests:
            try:
                g.domain.memory.close()
            except Exception:  # noqa: BLE001
                pass
        if self._own_dir and self.dir and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- the backend ------------------------------------------------------------
    @property
    def control_socket(self) -> str:
        """The daemon's control socket on this host (``gblk list --control-socket``)."""
        return os.path.join(self.dir, "control.sock")

    def backend_argv(self, extra_args: Sequence[str] = ()) -> List[str]:
        """``gblk serve --xen sim:DIR`` + ``extra_args``; the control socket in DIR
        unless ``extra_args`` chooses one."""
        control = ([] if any(a.startswith("--control-socket") for a in extra_args)
                   else ["--control-socket", self.control_socket])
        return [sys.executable, "-m", "gblk", "serve", "--xen", f"sim:{self.dir}",
                *control, *extra_args]

    def start_backend(self, extra_args: Sequence[str] = (),
                      env: Optional[Dict[str, str]] = None) -> BackendProcess:
        """Run the daemon on this host (``gblk serve --xen sim:DIR`` + ``extra_args``);
        output goes to ``DIR/backend.log``. Guests wait for its InitWait."""
        if self.backend is not None and self.backend.alive():
            raise RuntimeError("a backend is already running")
        self.backend = BackendProcess(self.backend_argv(extra_args),
                                      os.path.join(self.dir, "backend.log"), child_env(env),
                                      isolate=self.isolate)
        return self.backend

    def stop_backend(self, timeout: float = PROCESS_DEADLINE) -> Optional[int]:
        if self.backend is None:
            return None
        return self.backend.stop(timeout)

    # -- guests -------------------------------------------------------------------
    def guest_xenstore(self, domid: int) -> XenStore:
        """The XenStore connection of guest ``domid`` (``DIR/xenstored.sock.d<N>``)."""
        gxs = self._guest_xs.get(domid)
        if gxs is None:
            from ...xen.xenstore import GeventXenStore

            gxs = GeventXenStore(f"{self.socket_path}.d{domid}", self.timeout)
            self._guest_xs[domid] = gxs
        return gxs

    def make_image(self, name: str, size: int) -> str:
        """A sparse scratch image of ``size`` bytes in ``image_dir`` (by default the
        host's directory)."""
        path = os.path.join(self.image_dir or self.dir, name)
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def frontend(self, domain: Domain, devid: int = DEFAULT_DEVID,
                 options: Optional[FrontendOptions] = None) -> Frontend:
        """A frontend for an attached disk of ``domain`` (not connected yet)."""
        return Frontend(self.guest_xenstore(domain.domid), domain.memory,
                        lambda: SimEventChannel(self.dir, domain.domid), domain.domid,
                        devid, options)

    def create_guest(self, size: int = 64 * MiB, image: Optional[str] = None,
                     kind: str = "qdisk", devid: int = DEFAULT_DEVID,
                     options: Optional[FrontendOptions] = None, connect: bool = True,
                     pages: int = DEFAULT_PAGES, domid: Optional[int] = None,
                     timeout: Optional[float] = None, **attach: object) -> Guest:
        """A domain with one disk (``image``, or a fresh sparse scratch image of
        ``size`` bytes, which the frontend then knows reads as zeros) and its
        frontend, connected unless ``connect=False``. ``attach`` goes to
        ``Toolstack.attach_disk`` (mode, device_type, format, ...)."""
        ts = self.toolstack
        dom = ts.create_domain(domid=domid, pages=pages)
        scratch = image is None
        if image is None:
            image = self.make_image(f"disk-d{dom.domid}-{devid}.img", size)
        disk = ts.attach_disk(dom.domid, image, kind=kind, devid=devid, **attach)  # type: ignore[arg-type]
        if options is None:
            options = FrontendOptions(initial_zero=scratch)
        fe = self.frontend(dom, devid, options)
        guest = Guest(dom, disk, fe, self.guest_xenstore(dom.domid), image, scratch)
        self.guests.append(guest)
        if connect:
            fe.connect(timeout)
        return guest

    def add_disk(self, guest: Guest, devid: int, size: int = 64 * MiB,
                 image: Optional[str] = None, kind: str = "qdisk",
                 options: Optional[FrontendOptions] = None, connect: bool = True,
                 **attach: object) -> Frontend:
        """Attach another disk to ``guest``; its frontend lands in ``guest.extra``."""
        scratch = image is None
        if image is None:
            image = self.make_image(f"disk-d{guest.domid}-{devid}.img", size)
        self.toolstack.attach_disk(guest.domid, image, kind=kind, devid=devid, **attach)  # type: ignore[arg-type]
        fe = self.frontend(guest.domain, devid, options or FrontendOptions(initial_zero=scratch))
        guest.extra.append(fe)
        if connect:
            fe.connect()
        return fe

    def destroy_guest(self, guest: Guest) -> None:
        """``xl destroy``: the frontends stop dead, the toolstack removes everything."""
        for fe in [guest.frontend] + guest.extra:
            fe.abandon()
        gxs = self._guest_xs.pop(guest.domid, None)
        if gxs is not None:
            _close_quietly(gxs)
        self.toolstack.destroy_domain(guest.domid)
        if guest in self.guests:
            self.guests.remove(guest)

    def wait_node(self, path: str, predicate: "object" = None, timeout: float = 30.0) -> Optional[str]:
        """Wait until ``path`` exists (and, if ``predicate`` is a callable, until
        ``predicate(value)``); the value, or None on timeout."""
        assert self.xs is not None
        sub = self.xs.watch([path])
        try:
            deadline = time.monotonic() + timeout
            while True:
                value = self.xs.read(path)
                if value is not None and (predicate is None or predicate(value)):  # type: ignore[operator]
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                sub.get(timeout=left)
        finally:
            sub.close()

    def backend_state(self, guest: Guest, devid: Optional[int] = None) -> Optional[int]:
        return self.toolstack.backend_state(guest.domid, guest.disk.devid if devid is None else devid)

    def frontend_path(self, guest: Guest) -> str:
        return xb.frontend_path(guest.domid, guest.disk.devid)


def _close_quietly(xs: XenStore) -> None:
    try:
        xs.close()
    except Exception as e:  # noqa: BLE001
        log.debug("closing a XenStore client: %s", e)
