"""Runs an installed systemd service the way its unit file says, for a dom0 without systemd.

The system suite's dom0 has no systemd as PID 1 (its init is the suite's own: see
init.sh and docs/testing.md), so ``systemctl start gblk`` cannot run there. This module
does what systemd would do with the *installed* unit (``/lib/systemd/system/gblk.service``)
and checks what it can of the unit's contract, so the scenarios run the package exactly as
it is started on a host:

- ``ConditionPathExists=`` and ``ExecCondition=`` are evaluated (a failed condition is an
  error here: the suite's dom0 is a control domain, so the unit must not skip itself);
- ``RuntimeDirectory=``/``RuntimeDirectoryMode=``, ``StateDirectory=`` and ``UMask=`` are
  applied, ``Environment=`` is honoured, the environment is otherwise systemd's small one
  (no ``PYTHONPATH``), the process gets a session of its own;
- ``Type=notify``: ``$NOTIFY_SOCKET`` is a datagram socket read here, with the senders'
  credentials (``NotifyAccess=main``: every message must come from the main process);
  start waits for ``READY=1``; ``WatchdogSec=`` becomes ``$WATCHDOG_USEC`` and the gaps
  between ``WATCHDOG=1`` pings are measured;
- ``ExecReload=`` lines run in order with ``$MAINPID``; stop is ``KillMode=mixed``: SIGTERM
  to the main process, ``TimeoutStopSec=``, then SIGKILL to the whole group;
- a handover (``MAINPID=`` from the main process, after SIGUSR2: the package's upgrade)
  makes the named process the main one, as systemd does; it is not our child, so its
  exit is read from ``/proc``.

Not covered (systemd itself would do it): cgroup device policy, the sandboxing options
(``ProtectSystem=``, ``SystemCallFilter=`` ...), ``Restart=``. ``systemd-analyze verify``
of the packaged unit runs on the host (tests/integration/test_debian_package.py).

Standard library only (dom0's Debian python3).
"""

import os
import shlex
import signal
import socket
import struct
import subprocess
import threading
import time

UNIT = "/lib/systemd/system/gblk.service"
#: systemd's default environment for system services (plus what the unit adds)
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
NOTIFY_DIR = "/run/gblk-lab"


class UnitError(Exception):
    """The unit could not be started, reloaded or stopped as it says."""


def parse_unit(path=UNIT):
    """{section: [(key, value), ...]} of a unit file (comments, blank lines skipped;
    a trailing backslash continues a line)."""
    sections = {}
    current = None
    pending = ""
    with open(path) as f:
        for raw in f:
            line = pending + raw.rstrip("\n")
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], [])
            elif "=" in line and current is not None:
                key, _, value = line.partition("=")
                current.append((key.strip(), value.strip()))
    return sections


def values(entries, key):
    """Every value of ``key``, an empty assignment resetting the list (as systemd does)."""
    out = []
    for k, v in entries:
        if k == key:
            out = [] if v == "" else out + [v]
    return out


def last(entries, key, default=None):
    found = values(entries, key)
    return found[-1] if found else default


def seconds(text):
    """A systemd time span in seconds ("30", "30s", "1min", "500ms")."""
    text = text.strip()
    for suffix, factor in (("ms", 0.001), ("min", 60.0), ("s", 1.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def command(line, mainpid=None):
    """argv of an Exec*= line: prefixes stripped ('-' = failure ignored), $MAINPID set."""
    ignore = False
    while line and line[0] in "-@+!:":
        ignore = ignore or line[0] == "-"
        line = line[1:]
    if mainpid is not None:
        line = line.replace("${MAINPID}", str(mainpid)).replace("$MAINPID", str(mainpid))
    return shlex.split(line), ignore


class Notifications:
    """The service's ``$NOTIFY_SOCKET``: every datagram with its time and sender pid."""

    def __init__(self, path):
        self.path = path
        self.messages = []  # (monotonic time, pid, {field: value})
        self.lock = threading.Lock()
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        cred = struct.calcsize("3i")
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(cred))
            except OSError:
                return
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:cred])[0]
            fields = {}
            for line in data.decode("utf-8", "replace").splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    fields[key] = value
            with self.lock:
                self.messages.append((time.monotonic(), pid, fields))

    def since(self, t0):
        with self.lock:
            return [m for m in self.messages if m[0] >= t0]

    def close(self):
        self.sock.close()


class Successor:
    """A main process that is not our child (it came by ``MAINPID=``), with the part of
    Popen's interface the suite uses: ``pid``, ``poll``, ``wait``, ``send_signal``,
    ``returncode`` (its exit code while it is a zombie: /proc/PID/stat's exit_code;
    "exited" once its new parent reaped it)."""

    def __init__(self, pid):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            try:
                with open("/proc/%d/stat" % self.pid) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                self.returncode = "exited"
            else:
                if fields[0] in ("Z", "X"):
                    status = int(fields[-1]) if len(fields) >= 50 else None
                    self.returncode = ("exited" if status is None
                                       else os.waitstatus_to_exitcode(status))
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("pid %d" % self.pid, timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig):
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


class Service:
    """One run of the unit's main process (start, reload, stop), checked against the unit."""

    def __init__(self, log_path, unit=UNIT):
        self.unit = unit
        self.log_path = log_path
        self.proc = None
        self.started_at = None
        self.notify = None
        self.logf = None
        self.stop_result = None
        self.predecessors = set()  # main processes that handed over (MAINPID=)

    def _sections(self):
        sections = parse_unit(self.unit)
        return sections.get("Unit", []), sections.get("Service", [])

    def conditions(self):
        """Evaluate ConditionPathExists= and ExecCondition=; UnitError when one fails."""
        unit, service = self._sections()
        for path in values(unit, "ConditionPathExists"):
            negate = path.startswith("!")
            exists = os.path.exists(path.lstrip("!"))
            if exists == negate:
                raise UnitError("ConditionPathExists=%s failed: the unit would be skipped" % path)
        for line in values(service, "ExecCondition"):
            argv, _ = command(line)
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
            if p.returncode != 0:
                raise UnitError("ExecCondition=%s exited %d: the unit would be skipped" % (line, p.returncode))

    def environment(self):
        _, service = self._sections()
        env = dict(BASE_ENV)
        for assignment in values(service, "Environment"):
            for word in shlex.split(assignment):
                key, sep, value = word.partition("=")
                if sep:
                    env[key] = value
        if values(service, "EnvironmentFile"):
            raise UnitError("EnvironmentFile= is not supported by this stand-in")
        return env

    def start(self, timeout):
        """Start the main process; with Type=notify wait for READY=1 (UnitError on exit,
        a notification from another process or no READY=1 within ``timeout``)."""
        unit, service = self._sections()
        self.conditions()
        argvs = values(service, "ExecStart")
        if len(argvs) != 1:
            raise UnitError("expected one ExecStart=, found %r" % argvs)
        argv, _ = command(argvs[0])
        env = self.environment()
        mode = int(last(service, "RuntimeDirectoryMode", "0755"), 8)
        for name in " ".join(values(service, "RuntimeDirectory")).split():
            os.makedirs("/run/" + name, exist_ok=True)
            os.chmod("/run/" + name, mode)
        for name in " ".join(values(service, "StateDirectory")).split():
            os.makedirs("/var/lib/" + name, mode=0o755, exist_ok=True)
        umask = int(last(service, "UMask", "0022"), 8)
        kind = last(service, "Type", "simple")
        watchdog = last(service, "WatchdogSec")
        self.watchdog_sec = seconds(watchdog) if watchdog else None
        os.makedirs(NOTIFY_DIR, exist_ok=True)
        if self.notify is None:  # one socket per Service, kept across its restarts
            name = "notify-%s.sock" % os.path.basename(self.log_path).split(".")[0]
            self.notify = Notifications(os.path.join(NOTIFY_DIR, name))
        env["NOTIFY_SOCKET"] = self.notify.path
        if self.watchdog_sec:
            env["WATCHDOG_USEC"] = str(int(self.watchdog_sec * 1e6))
        if self.logf is not None:
            self.logf.close()
        self.logf = open(self.log_path, "ab")  # systemd: the journal
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.logf,
                                     stderr=subprocess.STDOUT, env=env, cwd="/",
                                     start_new_session=True, umask=umask)
        self.pgid = self.proc.pid  # the session's: a handover's successor stays in it
        self.argv = argv
        self.env = env
        if kind != "notify":
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            if self.proc.poll() is not None:
                raise UnitError("%s exited %s before READY=1" % (" ".join(argv), self.proc.returncode))
            time.sleep(0.2)
        raise UnitError("no READY=1 on $NOTIFY_SOCKET within %ds" % timeout)

    def handover(self, timeout):
        """SIGUSR2 to the main process (what the package's upgrade sends): it starts its
        successor, hands over, sends ``MAINPID=`` and exits 0; the successor is the main
        process from then on (its READY=1 awaited). Returns (successor's pid, seconds
        from the signal to ``MAINPID=``, seconds to the old one's exit, to READY=1).
        UnitError when one of those does not come within ``timeout``."""
        old = self.proc
        t0 = time.monotonic()
        deadline = t0 + timeout
        old.send_signal(signal.SIGUSR2)
        new = None
        while new is None:
            for t, pid, fields in self.notify.since(t0):
                if pid == old.pid and fields.get("MAINPID", "").isdigit():
                    new, t_main = int(fields["MAINPID"]), t
            if new is None:
                if old.poll() is not None:
                    raise UnitError("the main process exited %s after SIGUSR2 without MAINPID="
                                    % old.returncode)
                if time.monotonic() > deadline:
                    raise UnitError("no MAINPID= within %ds of SIGUSR2" % timeout)
                time.sleep(0.05)
        try:
            rc = old.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise UnitError("the old main process %d still runs after handing over" % old.pid) from None
        t_exit = time.monotonic()
        if rc != 0:
            raise UnitError("the old main process exited %s after handing over" % rc)
        # the unit's main process from MAINPID= on; what the old one still sends then
        # (STOPPING=1) systemd drops (NotifyAccess=main), and so does foreign_senders
        self.proc = Successor(new)
        self.started_at = t_main
        self.predecessors.add(old.pid)
        while not self.ready():
            if self.proc.poll() is not None:
                raise UnitError("the successor %d exited before READY=1" % new)
            if time.monotonic() > deadline:
                raise UnitError("no READY=1 from the successor %d within %ds" % (new, timeout))
            time.sleep(0.05)
        return new, t_main - t0, t_exit - t0, time.monotonic() - t0

    def messages(self):
        return self.notify.since(self.started_at) if self.notify and self.started_at else []

    def ready(self):
        return any(f.get("READY") == "1" for _, _, f in self.messages())

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def status_text(self):
        """The last STATUS= the service sent (what `systemctl status` shows)."""
        texts = [f["STATUS"] for _, _, f in self.messages() if "STATUS" in f]
        return texts[-1] if texts else None

    def foreign_senders(self):
        """Pids other than the main process that sent notifications (NotifyAccess=main)."""
        return sorted({pid for _, pid, _ in self.messages()
                       if pid != self.proc.pid and pid not in self.predecessors})

    def watchdog_gaps(self):
        """(pings, longest gap in seconds between READY=1, the pings and now)."""
        msgs = self.messages()
        ready = [t for t, _, f in msgs if f.get("READY") == "1"]
        if not ready:
            return 0, None
        # systemd arms the watchdog once start-up is complete (READY=1)
        times = [t for t, _, f in msgs if f.get("WATCHDOG") == "1" and t >= ready[0]]
        points = [ready[0]] + times + ([time.monotonic()] if self.alive() else [])
        gaps = [b - a for a, b in zip(points, points[1:])]
        return len(times), max(gaps) if gaps else None

    def status(self):
        """A `systemctl status`-like summary."""
        state = "active (running)" if self.alive() else "inactive (exit %s)" % self.proc.returncode
        return ("gblk.service - %s\n   Loaded: %s\n   Active: %s for %.0f s\n Main PID: %s\n   Status: %r\n"
                % (last(self._sections()[0], "Description", "?"), self.unit, state,
                   time.monotonic() - self.started_at, self.proc.pid, self.status_text()))

    def reload(self):
        """Run every ExecReload= line (with $MAINPID); UnitError on the first failure."""
        _, service = self._sections()
        out = []
        for line in values(service, "ExecReload"):
            argv, ignore = command(line, self.proc.pid)
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, env=self.env)
            out.append((argv, p.returncode))
            if p.returncode != 0 and not ignore:
                raise UnitError("ExecReload=%s exited %d: %s" % (line, p.returncode,
                                                                 p.stderr.decode("utf-8", "replace")[-300:]))
        return out

    def stop(self):
        """KillMode=mixed: SIGTERM to the main process, SIGKILL to the group after
        TimeoutStopSec=. Returns the exit code or "killed after N s"."""
        if not self.alive():
            return None
        _, service = self._sections()
        limit = seconds(last(service, "TimeoutStopSec", "90"))
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(self.pgid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            rc = "killed after %.0f s" % limit
        else:
            try:  # mixed: what is left of the group gets SIGKILL
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stop_result = rc
        return rc
