"""Image formats (``params=qcow2:/path`` and the others qemu-nbd opens): gblk runs one
``qemu-nbd`` (Debian package ``qemu-utils``) per image on a private Unix socket and
serves it as an NBD store (``gblk.storage.nbd``).

The command line, and why:

- ``--format=FMT`` always: an image is never probed (a guest-written raw image that
  looks like qcow2 with a backing file would open a host file for the guest).
- ``--cache=writeback --aio=threads`` (the host page cache, as gblk's raw store
  without O_DIRECT), or with direct IO (``direct-io-safe``/``backend.direct_io``)
  ``--cache=none --aio=native`` (O_DIRECT, Linux AIO). Both keep flushes on: an NBD
  FLUSH makes qemu write its cached image metadata (qcow2's L2 and refcount tables)
  and then ``fdatasync`` the file before it answers, so a flush acknowledged to the
  guest is on stable storage. ``unsafe`` (flushes ignored) and ``writethrough``
  (a flush after every write: slow, and not needed for the guarantee) are not used.
- ``--discard=unmap``: a guest's discard frees the image's clusters (thin images
  stay thin).
- ``--persistent --shared=0``: the server outlives a connection (gblk reconnects
  after a broken one and probes) and takes every one of them.
- ``--pid-file``: a qemu-nbd left behind by a gblk that died is found and stopped
  before the image is served again (it holds the image's lock).

Devices that serve the same image share one qemu-nbd (qemu's lock refuses a second
writer anyway). When its process dies, the next connection (see ``NbdStore``)
restarts it, at most ``MAX_RESTARTS`` times in ``RESTART_WINDOW`` seconds.

Processes are spawned and reaped with the ``posix`` module's own functions: gevent
patches ``os.posix_spawn`` and ``os.waitpid`` to watch children on the hub's loop, which
a thread of the threadpool has not. Blocking calls, run in the control threadpool (start, stop) and the IO threadpool
(a restart).
"""

from __future__ import annotations

import errno
import hashlib
import os
import posix
import shutil
import signal
import tempfile
import time
from typing import Dict, List, Tuple

from ..errors import StorageError
from . import nbdwire as w
from .nbd import NbdStore, _Token, open_connection

#: formats of ``params`` served through qemu-nbd -> qemu's driver name
FORMATS = {"qcow2": "qcow2", "qcow": "qcow", "vpc": "vpc", "vhd": "vpc", "vhdx": "vhdx",
           "vmdk": "vmdk", "vdi": "vdi", "qed": "qed"}
START_TIMEOUT = 10.0
STOP_TIMEOUT = 3.0
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
CONNECT_TIMEOUT = 5.0
IO_TIMEOUT = 30.0
#: the qemu-nbd binary (tests point it elsewhere)
QEMU_NBD = "qemu-nbd"


def runtime_dir() -> str:
    """Where the sockets live: systemd's ``$RUNTIME_DIRECTORY`` (the unit's
    RuntimeDirectory=gblk), else /run/gblk, else a directory of the temp dir."""
    for base in (os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0], "/run/gblk"):
        if base and os.access(os.path.dirname(base.rstrip("/")) or "/", os.W_OK | os.X_OK):
            d = os.path.join(base, "nbd")
            try:
                os.makedirs(d, mode=0o700, exist_ok=True)
                return d
            except OSError:
                continue
    d = os.path.join(tempfile.gettempdir(), f"gblk-nbd-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


class QemuNbd:
    """One supervised qemu-nbd process serving one image."""

    def __init__(self, fmt: str, path: str, readonly: bool, direct: bool) -> None:
        self.fmt = FORMATS[fmt]
        self.path = path
        self.readonly = readonly
        self.direct = direct
        d = runtime_dir()
        key = hashlib.sha256(f"{path}\0{self.fmt}\0{readonly}".encode()).hexdigest()[:20]
        self.socket = os.path.join(d, f"{key}.sock")
        self.pidfile = os.path.join(d, f"{key}.pid")
        self.logfile = os.path.join(d, f"{key}.log")
        self.pid = 0
        self._pidfd = -1
        self.restarts: List[float] = []
        self.last_exit = ""
        self.users = 0
        #: held while checking and restarting (devices sharing the server race there)
        self.lock = _Token()

    def argv(self, binary: str) -> List[str]:
        cache = ["--cache=none", "--aio=native"] if self.direct else \
            ["--cache=writeback", "--aio=threads"]
        return [binary, f"--format={self.fmt}", f"--socket={self.socket}", "--persistent",
                "--shared=0", "--discard=unmap", *cache, f"--pid-file={self.pidfile}",
                *(["--read-only"] if self.readonly else []), self.path]

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        binary = shutil.which(QEMU_NBD)
        if binary is None:
            raise StorageError(f"cannot serve {self.fmt} image {self.path}: {QEMU_NBD} not found "
                               "(install qemu-utils)")
        if not os.path.exists(self.path):
            raise StorageError(f"cannot open {self.path}: no such file")
        self._stop_stale()
        for p in (self.socket, self.pidfile):
            _unlink(p)
        fa = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
              (os.POSIX_SPAWN_OPEN, 1, self.logfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
              (os.POSIX_SPAWN_DUP2, 1, 2)]
        try:
            self.pid = posix.posix_spawn(binary, self.argv(binary), dict(os.environ, LC_ALL="C"),
                                      file_actions=fa, setsid=True)
        except OSError as e:
            raise StorageError(f"cannot start {binary}: {e.strerror}") from None
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (OSError, AttributeError):
            self._pidfd = -1
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not self.alive():
                why = self.output() or self.last_exit
                self.stop()  # its socket, pid file and log go
                raise StorageError(f"qemu-nbd refused {self.fmt} image {self.path}: {why}")
            if os.path.exists(self.socket):
                try:
                    s, _ = self.connect()
                    s.close()  # type: ignore[attr-defined]
                    return
                except (OSError, StorageError):
                    pass
            if time.monotonic() > deadline:
                why = self.output()
                self.stop()
                raise StorageError(f"qemu-nbd did not start serving {self.path} within "
                                   f"{START_TIMEOUT:g}s: {why}")
            time.sleep(0.02)

    def connect(self) -> Tuple[object, w.Export]:
        return open_connection(w.Address("", unix=self.socket), CONNECT_TIMEOUT, IO_TIMEOUT)

    def alive(self) -> bool:
        if self.pid <= 0:
            return False
        try:
            pid, status = posix.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere (gevent's SIGCHLD handling)
            pid, status = self.pid, -1
        if pid == 0:
            return True
        self.last_exit = _status(status)
        self._forget()
        return False

    def wait_exit(self, timeout: float) -> bool:
        """Whether the server is (or within ``timeout`` seconds became) dead."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def ensure(self) -> None:
        """Before a new connection after a broken one: restart a dead server."""
        if self.alive():
            return
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
        if len(self.restarts) > MAX_RESTARTS:
            raise StorageError(f"qemu-nbd for {self.path} died {MAX_RESTARTS} times in "
                               f"{RESTART_WINDOW:g}s ({self.last_exit}); not restarted")
        self.start()

    def output(self) -> str:
        """The last lines qemu-nbd wrote (its error)."""
        try:
            with open(self.logfile, errors="replace") as f:
                lines = [ln.strip() for ln in f.read()[-2000:].splitlines() if ln.strip()]
        except OSError:
            return ""
        return "; ".join(lines[-3:])

    def stop(self) -> None:
        if self.pid > 0:
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.pid > 0:
                self._signal(signal.SIGKILL)
                while self.alive() and time.monotonic() < deadline + STOP_TIMEOUT:
                    time.sleep(0.02)
        for p in (self.socket, self.pidfile, self.logfile):
            _unlink(p)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Tests: make the server crash."""
        self._signal(sig)

    def _signal(self, sig: int) -> None:
        try:
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, sig)
            elif self.pid > 0:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def _forget(self) -> None:
        self.pid = 0
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def _stop_stale(self) -> None:
        """A qemu-nbd of a gblk that died still serving this image: stop it."""
        try:
            with open(self.pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except (OSError, ValueError):
            return
        if f"--socket={self.socket}".encode() not in cmd:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)


def _status(status: int) -> str:
    if status < 0:
        return "exited"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


#: the servers running, by image: devices of one image share one
_servers: Dict[Tuple[str, str, bool], QemuNbd] = {}
_servers_lock = _Token()


def _acquire(fmt: str, path: str, readonly: bool, direct: bool) -> QemuNbd:
    key = (os.path.realpath(path), FORMATS[fmt], readonly)
    with _servers_lock:
        srv = _servers.get(key)
        if srv is None:
            srv = QemuNbd(fmt, key[0], readonly, direct)
            srv.start()
            _servers[key] = srv
        srv.users += 1
        return srv


def _release(srv: QemuNbd) -> None:
    with _servers_lock:
        srv.users -= 1
        if srv.users > 0:
            return
        for k, v in list(_servers.items()):
            if v is srv:
                del _servers[k]
        srv.stop()


def servers() -> List[QemuNbd]:
    """The qemu-nbd processes running (tests)."""
    return list(_servers.values())


def image_store(fmt: str, path: str, readonly: bool, direct: bool = False) -> NbdStore:
    srv = _acquire(fmt, path, readonly, direct)
    def connector(fresh: bool) -> Tuple[object, w.Export]:
        if not fresh:
            return srv.connect()
        with srv.lock:
            srv.ensure()
            try:
                return srv.connect()
            except OSError:
                # the connection broke as it died: it may not be reaped yet
                if not srv.wait_exit(STOP_TIMEOUT):
                    raise
                srv.ensure()
                return srv.connect()

    try:
        store = NbdStore(connector, readonly, f"{fmt} image {path} (qemu-nbd)",
                         on_close=lambda: _release(srv))
    except BaseException:
        _release(srv)
        raise
    store.server = srv  # type: ignore[attr-defined]
    return store
