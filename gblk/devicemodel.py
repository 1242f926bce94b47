"""``gblk-device-model``: the device model libxl starts for a PV guest whose qdisk disks
gblk serves (``device_model_override = "/usr/local/bin/gblk-device-model"`` in the xl
config).

With a ``backendtype=qdisk`` disk, libxl starts a device model (QEMU) for a PV or PVH guest
and waits for it; QEMU would then serve the qdisk disks itself. This program takes QEMU's
place: it does what libxl waits for and serves no device at all, so gblk (kind ``qdisk``,
its default) serves the disks.

The contract with libxl (Xen 4.17, ``tools/libs/light/libxl_dm.c`` and ``libxl_qmp.c``):

- libxl runs the program named by ``device_model_override`` (it must be executable) in a
  session of its own, stdin from /dev/null, stdout and stderr appended to
  ``/var/log/xen/qemu-dm-<name>.log``, and records its pid in
  ``/local/domain/<domid>/image/device-model-pid``. For a PV guest the command line is
  ``-xen-domid N -no-shutdown -chardev socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-N,
  server=on,wait=off -mon chardev=libxl-cmd,mode=control`` (the same again for
  ``libxenstat-cmd``) ``-nodefaults -no-user-config -xen-attach -name NAME -vnc none
  -display none -nographic -machine xenpv -m MIB``. Older spellings (``server,nowait``,
  ``-qmp unix:PATH,server,nowait``, ``-M xenpv``) mean the same. With ``dm_restrict``
  libxl opens the QMP socket itself and passes it as ``fd=N``, with ``-S``.
- It waits up to 60 s for ``running`` in ``/local/domain/0/device-model/<domid>/state``
  (with ``-S``: for ``query-status`` to answer ``prelaunch``), then talks QMP: a greeting
  carrying QEMU's version, ``qmp_capabilities``, ``query-chardev`` (it looks for serial
  ptys). libxl ends every message with CRLF (libxenstat sends bare JSON objects); replies
  echo the command's ``id``.
- On ``xl destroy`` (and when the guest powers off) libxl sends SIGHUP, then removes the
  sockets and ``device-model/<domid>``.

What it does: binds the QMP sockets first, then writes the state node (so libxl never
connects to a socket that is not there yet), answers ``qmp_capabilities``,
``query-status``, ``query-chardev`` (an empty list), ``query-block`` and
``query-blockstats`` (empty: libxenstat asks on its socket whenever ``xentop`` refreshes),
``query-version``, ``cont``, ``stop`` and ``quit``, and answers any other command with
QMP's ``CommandNotFound`` error (input that is not a command with ``GenericError``),
never a crash. It exits 0 on SIGHUP, SIGTERM or SIGINT, on ``quit``, and when the guest's
``/local/domain/<domid>`` directory is gone (no device model outlives its guest when libxl
could not stop it). Log lines go to stderr with a timestamp (libxl's log file has none);
each QMP command is logged once per socket, later ones at debug level. Bad arguments: one line on stderr, exit 2; no XenStore or a
socket it cannot bind: exit 1.

What it must not do: touch any disk, backend directory or image (gblk's job), or take an
HVM guest (``-machine xenfv``/``pc``: that guest's QEMU emulates its devices). It imports
neither gevent nor pyxs: libxl's 60 s include its start on a busy dom0. An entry point: it
may import the xen layer, nothing may import it.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from gblk import __version__
from gblk.errors import GblkError, XenError
from gblk.logs import setup_logging
from gblk.xen.xs_simple import SimpleXenStore

PROG = "gblk-device-model"
log = logging.getLogger("gblk.devicemodel")

#: where libxl waits for "running" (DEVICE_MODEL_XS_PATH with the toolstack domain 0)
STATE_PATH = "/local/domain/0/device-model/{domid}/state"
DOMAIN_PATH = "/local/domain/{domid}"
#: DOMID_FIRST_RESERVED (xen/include/public/xen.h): guests have smaller ids
DOMID_FIRST_RESERVED = 0x7FF0
#: the QEMU version the greeting announces: libxl picks QMP features by it; this is
#: Debian 12's QEMU, whose Xen interface libxl 4.17 is used with
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
#: seconds between checks that the guest still exists
DOMAIN_CHECK_INTERVAL = 2.0
#: a QMP message longer than this is refused and the client dropped
MAX_MESSAGE = 64 * 1024

#: QEMU options that take no argument (what libxl passes, and a few common ones);
#: any other option takes the next word as its argument unless that starts with "-"
FLAGS = frozenset({
    "-S", "-no-shutdown", "-no-reboot", "-nodefaults", "-no-user-config", "-xen-attach",
    "-xen-domid-restrict", "-nographic", "-daemonize", "-snapshot", "-enable-kvm",
})

USAGE = (f"usage: {PROG} -xen-domid DOMID -machine xenpv "
         "-chardev socket,id=ID,path=PATH|fd=N,server=on,wait=off -mon chardev=ID,mode=control "
         "[other QEMU options, ignored]  (started by libxl: device_model_override= in the "
         "xl config of a PV guest with backendtype=qdisk disks)")


class UsageError(GblkError, ValueError):
    """The command line is not one gblk-device-model can serve; the message says why."""


class DeviceModelError(GblkError):
    """Serving the command line failed (a socket, XenStore); the message says why."""


# --- the command line ------------------------------------------------------------------


def split_opts(text: str) -> List[str]:
    """QEMU's option list ``a,b=c,d``: split at commas, ``,,`` being a literal comma."""
    items: List[str] = []
    cur = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            items.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    items.append(cur)
    return items


def parse_opts(text: str, implied: str) -> Dict[str, str]:
    """``socket,id=x,server,nowait`` -> {implied: socket, id: x, server: on, wait: off}.

    A first item without ``=`` is the value of ``implied``; a later bare ``name`` means
    ``name=on`` and ``noname`` means ``name=off`` (QEMU's legacy spellings)."""
    out: Dict[str, str] = {}
    for i, item in enumerate(split_opts(text)):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if sep:
            out[key] = value
        elif i == 0 and implied:
            out[implied] = key
        elif key.startswith("no") and len(key) > 2:
            out[key[2:]] = "off"
        else:
            out[key] = "on"
    return out


@dataclass
class Monitor:
    """One QMP socket to serve: a Unix path to bind, or a listening socket's fd."""

    name: str
    path: Optional[str] = None
    fd: Optional[int] = None


@dataclass
class Options:
    domid: int
    name: str = ""
    paused: bool = False  # -S: "prelaunch" until "cont"
    monitors: List[Monitor] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)


def _next(argv: Sequence[str], i: int, opt: str) -> str:
    if i + 1 >= len(argv):
        raise UsageError(f"{opt} needs an argument")
    return argv[i + 1]


def _chardev_monitor(name: str, opts: Dict[str, str]) -> Monitor:
    backend = opts.get("backend", "")
    if backend not in ("socket", "unix"):
        raise UsageError(f"chardev {name!r} is {backend!r}: QMP is served on Unix sockets only "
                         "(-chardev socket,id=ID,path=PATH,server=on,wait=off)")
    if opts.get("server", "off") != "on":
        raise UsageError(f"chardev {name!r} is not a server socket (server=on)")
    if "fd" in opts:
        try:
            return Monitor(name, fd=int(opts["fd"]))
        except ValueError:
            raise UsageError(f"chardev {name!r}: fd={opts['fd']!r} is not a number") from None
    if opts.get("path"):
        return Monitor(name, path=opts["path"])
    raise UsageError(f"chardev {name!r} has neither path= nor fd= (TCP is not served)")


def parse_args(argv: Sequence[str]) -> Options:
    """The command line libxl passes to a PV device model; UsageError when it cannot be
    served. Options gblk-device-model has no use for are kept in ``ignored``."""
    domid: Optional[int] = None
    machine: Optional[str] = None
    name = ""
    paused = False
    chardevs: Dict[str, Dict[str, str]] = {}
    control: List[str] = []  # chardev ids with a QMP monitor, in order
    qmp: List[Monitor] = []
    ignored: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        opt = "-" + arg.lstrip("-") if arg.startswith("-") else arg
        if not arg.startswith("-") or arg == "-":
            ignored.append(arg)
            i += 1
            continue
        if opt in FLAGS:
            if opt == "-S":
                paused = True
            else:
                ignored.append(opt)
            i += 1
            continue
        if opt in ("-xen-domid", "-chardev", "-mon", "-qmp", "-machine", "-M", "-name"):
            value = _next(argv, i, opt)
            i += 2
            if opt == "-xen-domid":
                try:
                    domid = int(value, 10)
                except ValueError:
                    domid = -1
                if not 0 < domid < DOMID_FIRST_RESERVED:
                    raise UsageError(f"-xen-domid: expected a guest's domain id "
                                     f"(1..{DOMID_FIRST_RESERVED - 1}), got {value!r}")
            elif opt == "-chardev":
                opts = parse_opts(value, "backend")
                cid = opts.get("id")
                if not cid:
                    raise UsageError(f"-chardev {value!r} has no id=")
                chardevs[cid] = opts
            elif opt == "-mon":
                opts = parse_opts(value, "chardev")
                if opts.get("mode", "readline") == "control" and opts.get("chardev"):
                    control.append(opts["chardev"])
                else:
                    ignored.append(f"-mon {value}")
            elif opt == "-qmp":
                spec, _, rest = value.partition(":")
                if spec != "unix" or not rest:
                    raise UsageError(f"-qmp {value!r}: QMP is served on Unix sockets only "
                                     "(-qmp unix:PATH,server=on,wait=off)")
                opts = parse_opts(rest, "path")
                opts["backend"] = "socket"
                qmp.append(_chardev_monitor(f"qmp{len(qmp)}", opts))
            elif opt in ("-machine", "-M"):
                machine = parse_opts(value, "type").get("type", "")
            else:  # -name NAME or -name guest=NAME,...
                name = parse_opts(value, "guest").get("guest", "")
            continue
        if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            ignored.append(f"{opt} {argv[i + 1]}")
            i += 2
        else:
            ignored.append(opt)
            i += 1
    if domid is None:
        raise UsageError("-xen-domid DOMID is missing: which guest is this device model for?")
    if machine is None:
        raise UsageError("-machine xenpv is missing: this is not the command line libxl "
                         "passes to a PV guest's device model")
    if machine != "xenpv":
        raise UsageError(f"-machine {machine}: gblk-device-model serves PV and PVH guests only "
                         "(-machine xenpv); an HVM guest needs QEMU, which emulates its devices")
    monitors = []
    for cid in control:
        if cid not in chardevs:
            raise UsageError(f"-mon chardev={cid}: no -chardev with id={cid}")
        monitors.append(_chardev_monitor(cid, chardevs[cid]))
    monitors += qmp
    if not monitors:
        raise UsageError("no QMP socket: libxl passes -chardev socket,id=libxl-cmd,... with "
                         "-mon chardev=libxl-cmd,mode=control (or -qmp unix:PATH,server,nowait)")
    for cid in chardevs:
        if cid not in control:
            ignored.append(f"-chardev id={cid}")
    return Options(domid=domid, name=name, paused=paused, monitors=monitors, ignored=ignored)


# --- QMP ---------------------------------------------------------------------------------


class QmpError(Exception):
    """A command answered with QMP's ``{"error": {"class", "desc"}}``."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def take_message(buf: bytes) -> Tuple[Optional[bytes], bytes]:
    """(the first complete QMP message in ``buf``, the rest), or (None, buf) until one is
    complete. As QEMU's JSON streamer: a message is one JSON object (or array), with or
    without a line end after it (libxl ends each with CRLF, libxenstat with nothing);
    input that cannot start one is a message up to the next line end (answered with a
    parse error)."""
    start = 0
    while start < len(buf) and buf[start] in b" \t\r\n":
        start += 1
    if start == len(buf):
        return None, b""
    if buf[start] not in b"{[":
        end = buf.find(b"\n", start)
        if end < 0:
            return None, buf[start:]
        return buf[start:end].rstrip(b"\r"), buf[end + 1:]
    depth = 0
    in_string = escaped = False
    for i in range(start, len(buf)):
        c = buf[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in b"{[":
            depth += 1
        elif c in b"}]":
            depth -= 1
            if depth == 0:
                return buf[start:i + 1], buf[i + 1:]
    return None, buf[start:]


def greeting() -> Dict[str, Any]:
    return {"QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": f"{PROG} {__version__}"},
                    "capabilities": []}}


class Client:
    """One QMP connection: its bytes not yet a whole message, and whether it negotiated."""

    def __init__(self, sock: socket.socket, monitor: str) -> None:
        self.sock = sock
        self.monitor = monitor
        self.buf = b""
        self.negotiated = False


class DeviceModel:
    """The run state QEMU would have, the QMP commands, and the event loop."""

    def __init__(self, opts: Options, store: SimpleXenStore) -> None:
        self.opts = opts
        self.store = store
        self.status = "prelaunch" if opts.paused else "running"
        self.state_written = False
        self.stop_reason: Optional[str] = None
        self.listeners: Dict[socket.socket, Monitor] = {}
        self.clients: Dict[socket.socket, Client] = {}
        self.sel = selectors.DefaultSelector()
        self.domain_seen = False
        self.watch_domain = True
        self.seen: Set[Tuple[str, str]] = set()
        self.prefix = f"d{opts.domid}"

    # -- setup ---------------------------------------------------------------------
    def listen(self) -> None:
        """Bind or adopt every QMP socket; OSError/UsageError when one cannot be served."""
        for mon in self.opts.monitors:
            if mon.fd is not None:
                try:
                    sock = socket.socket(fileno=mon.fd)
                except OSError as e:
                    raise UsageError(f"chardev {mon.name!r}: fd={mon.fd} is not an open "
                                     f"socket ({e.strerror or e})") from None
                if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    sock.listen(4)
                where = f"fd {mon.fd}"
            else:
                assert mon.path is not None
                _remove_stale_socket(mon.path)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.bind(mon.path)
                    sock.listen(4)
                except OSError as e:
                    sock.close()
                    raise DeviceModelError(f"chardev {mon.name!r}: cannot listen on "
                                           f"{mon.path}: {e.strerror or e}") from None
                where = mon.path
            sock.setblocking(False)
            self.listeners[sock] = mon
            self.sel.register(sock, selectors.EVENT_READ, partial(self._accept, sock))
            log.info("%s: QMP monitor %s on %s", self.prefix, mon.name, where)

    def write_state(self) -> None:
        path = STATE_PATH.format(domid=self.opts.domid)
        self.store.write(path, "running")
        self.state_written = True
        log.info("%s: wrote running to %s", self.prefix, path)

    # -- QMP -----------------------------------------------------------------------
    def execute(self, client: Client, name: str) -> Any:
        """The ``return`` value of one command; QmpError for an error answer."""
        if not client.negotiated:
            if name != "qmp_capabilities":
                raise QmpError("CommandNotFound",
                               "Expecting capabilities negotiation with 'qmp_capabilities'")
            client.negotiated = True
            return {}
        if name == "qmp_capabilities":
            raise QmpError("CommandNotFound",
                           "Capabilities negotiation is already complete, command ignored")
        if name == "query-status":
            return {"status": self.status, "running": self.status == "running",
                    "singlestep": False}
        if name == "query-chardev":
            return []  # no serial ptys: nothing for libxl to record
        if name in ("query-block", "query-blockstats"):
            return []  # no QEMU disks (libxenstat, i.e. xentop, asks on qmp-libxenstat)
        if name == "query-version":
            return {"qemu": dict(QEMU_VERSION), "package": f"{PROG} {__version__}"}
        if name == "cont":
            if not self.state_written:
                try:
                    self.write_state()
                except XenError as e:
                    raise QmpError("GenericError", f"cannot write the state node: {e}") from None
            self.status = "running"
            return {}
        if name == "stop":
            self.status = "paused"
            return {}
        if name == "quit":
            self.stop_reason = "QMP quit"
            return {}
        raise QmpError("CommandNotFound", f"The command {name} has not been found")

    def answer(self, client: Client, msg: bytes) -> Dict[str, Any]:
        """The reply to one message of QMP input."""
        try:
            cmd = json.loads(msg.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self._note(logging.WARNING, client, "not JSON", f"{msg[:200]!r}")
            return _error("GenericError", "JSON parse error")
        if not isinstance(cmd, dict):
            return _error("GenericError", "QMP input must be a JSON object")
        name = cmd.get("execute")
        reply: Dict[str, Any]
        if not isinstance(name, str):
            reply = _error("GenericError", "QMP input lacks member 'execute'")
        else:
            try:
                reply = {"return": self.execute(client, name)}
                self._note(logging.INFO, client, name)
            except QmpError as e:
                reply = _error(e.cls, e.desc)
                self._note(logging.WARNING, client, name, e.desc)
        if "id" in cmd:
            reply["id"] = cmd["id"]
        return reply

    def _note(self, level: int, client: Client, what: str, detail: str = "") -> None:
        """Log a command the first time a monitor sees it, later ones at debug level
        (xentop asks for block statistics every few seconds)."""
        key = (client.monitor, what)
        if key in self.seen:
            level = logging.DEBUG
        self.seen.add(key)
        log.log(level, "%s: qmp %s: %s%s", self.prefix, client.monitor, what,
                f": {detail}" if detail else "")

    def _send(self, client: Client, msg: Dict[str, Any]) -> bool:
        try:
            client.sock.sendall(json.dumps(msg).encode() + b"\r\n")
            return True
        except OSError as e:
            log.warning("%s: qmp %s: client lost: %s", self.prefix, client.monitor, e)
            self._drop(client)
            return False

    def _drop(self, client: Client) -> None:
        if self.clients.pop(client.sock, None) is not None:
            self.sel.unregister(client.sock)
            client.sock.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.settimeout(5.0)  # a client that stops reading cannot wedge us
        client = Client(sock, self.listeners[listener].name)
        self.clients[sock] = client
        self.sel.register(sock, selectors.EVENT_READ, partial(self._read, client))
        self._send(client, greeting())

    def _read(self, client: Client) -> None:
        try:
            data = client.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.buf += data
        while self.stop_reason is None:
            msg, client.buf = take_message(client.buf)
            if msg is None:
                break
            if not self._send(client, self.answer(client, msg)):
                return
        if len(client.buf) > MAX_MESSAGE:
            self._send(client, _error("GenericError", f"QMP input longer than {MAX_MESSAGE} bytes"))
            self._drop(client)

    # -- the loop ------------------------------------------------------------------
    def _check_domain(self) -> None:
        """Stop once the guest's directory, seen before, is gone (libxl removes it when
        the domain is destroyed, after it would have sent SIGHUP)."""
        if not self.watch_domain:
            return
        try:
            exists = self.store.read(DOMAIN_PATH.format(domid=self.opts.domid)) is not None
        except XenError as e:
            self.watch_domain = False
            log.warning("%s: cannot check for the domain any more (%s): libxl's SIGHUP "
                        "will stop this device model", self.prefix, e)
            return
        if exists:
            self.domain_seen = True
        elif self.domain_seen:
            self.stop_reason = f"domain {self.opts.domid} is gone"

    def run(self, wakeup: socket.socket) -> str:
        """Serve until a signal (its number arrives on ``wakeup``), ``quit`` or the guest's
        end; returns why it stopped."""
        self.sel.register(wakeup, selectors.EVENT_READ, partial(self._signals, wakeup))
        next_check = 0.0
        while self.stop_reason is None:
            now = time.monotonic()
            if now >= next_check:
                self._check_domain()
                next_check = now + DOMAIN_CHECK_INTERVAL
                continue
            for key, _ in self.sel.select(next_check - now):
                if self.sel.get_map().get(key.fileobj) is key:  # not dropped meanwhile
                    key.data()  # _accept, _read or _signals
                if self.stop_reason is not None:
                    break
        return self.stop_reason

    def _signals(self, wakeup: socket.socket) -> None:
        try:
            data = wakeup.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            if signum in _STOP_SIGNALS and self.stop_reason is None:
                self.stop_reason = signal.Signals(signum).name

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        for sock, mon in self.listeners.items():
            sock.close()
            if mon.path is not None:
                try:
                    os.unlink(mon.path)
                except OSError:
                    pass
        self.listeners.clear()
        self.sel.close()


def _error(cls: str, desc: str) -> Dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


def _remove_stale_socket(path: str) -> None:
    """QEMU replaces a socket left at ``path``; anything else there is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket: not replacing it")
    os.unlink(path)


_STOP_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


def _signal_pipe() -> Tuple[socket.socket, socket.socket]:
    """SIGHUP, SIGTERM and SIGINT, delivered as bytes on a socket the loop selects on."""
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda *_: None)  # a handler, so the wakeup byte is written
    return r, w


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``gblk-device-model``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "-help", "--help") for a in args):
        print(USAGE)
        return 0
    if any(a in ("-version", "--version") for a in args):
        print(f"{PROG} {__version__} (a stand-in for QEMU {QEMU_VERSION['major']}."
              f"{QEMU_VERSION['minor']}.{QEMU_VERSION['micro']} as a PV guest's device model)")
        return 0
    try:
        opts = parse_args(args)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)  # one line; --help shows the usage
        return 2
    setup_logging("info")
    prefix = f"d{opts.domid}"
    log.info("%s: %s %s starting for domain %d%s (pid %d): %s", prefix, PROG, __version__,
             opts.domid, f" ({opts.name})" if opts.name else "", os.getpid(), " ".join(args))
    if opts.ignored:
        log.info("%s: not used here: %s", prefix, " ".join(opts.ignored))
    r, w = _signal_pipe()
    store: Optional[SimpleXenStore] = None
    dm: Optional[DeviceModel] = None
    try:
        store = SimpleXenStore()
        dm = DeviceModel(opts, store)
        dm.listen()  # before the state node: libxl connects as soon as it reads it
        if opts.paused:
            log.info("%s: -S: prelaunch until QMP cont", prefix)
        else:
            dm.write_state()
        reason = dm.run(r)
        log.info("%s: stopping on %s", prefix, reason)
        return 0
    except UsageError as e:
        log.error("%s: %s", prefix, e)
        return 2
    except (GblkError, OSError) as e:
        log.error("%s: %s", prefix, e)
        return 1
    finally:
        if dm is not None:
            dm.close()
        if store is not None:
            store.close()
        signal.set_wakeup_fd(-1)
        r.close()
        w.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
