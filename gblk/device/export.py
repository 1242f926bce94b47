"""``gblk ctl export``: one disk served read-only over NBD while its guest runs.

``start(dev, ...)`` puts a point-in-time view (``gblk.engine.snapshot``: copy-before-
write into a side file) on the disk's dataplane, waits until the writes issued
before it are done (the point in time; the writes taken meanwhile wait, a few
milliseconds), freezes the disk's dirty bitmap as it is then (when changed-block
tracking is on) and listens on a Unix socket (mode 0600, the daemon's user) or a
loopback TCP address. Each NBD connection is a greenlet speaking
``gblk.storage.nbdserver`` over a gevent socket; its reads go through the view into
the threadpool (the hub never waits for the disk). The meta contexts are
``base:allocation`` (everything reported as data) and, with CBT on,
``qemu:dirty-bitmap:cbt``: the dirty bitmap at the point in time (a dirty extent
has flag 1, as QEMU's), so ``qemu-img map`` or ``nbdinfo --map`` list what changed
since the last ``gblk ctl cbt reset``. Without CBT that context is not offered.

While an export is open the CBT map keeps apart the writes since its point in time:
``gblk ctl cbt reset`` then clears only what the export's map shows (what the backup
copied), never a write the export does not hold.

``stop(dev)`` (``gblk ctl unexport``) closes the listener and its connections, lets
the guest's writes go straight to the image again and drops the side file. The
export also ends with the disk (the guest goes, the daemon stops): the side file
has no name, so nothing is left behind; a restarted daemon serves no export (it
has to be asked again, and is a new point in time). Runs on the hub.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import gevent
import gevent.pool
import gevent.socket
from gevent.server import StreamServer

from ..engine import cbt as cbtmod
from ..engine import snapshot
from ..engine.iopool import IOPool
from ..errors import GblkError
from ..storage import nbdserver
from ..storage import nbdwire as w
from ..storage.nbdwire import ProtocolError

if TYPE_CHECKING:
    from .device import Device

#: seconds start waits for the writes issued before it (else the export is refused)
DRAIN = 30.0
#: NBD connections served at once per export
MAX_CONNECTIONS = 8
#: seconds a client has for the handshake (then it may idle: backup tools pause)
HANDSHAKE_TIMEOUT = 30.0
#: the dirty bitmap's name in the ``qemu:dirty-bitmap:`` namespace
BITMAP_NAME = "cbt"
DIRTY_CONTEXT = w.CONTEXT_DIRTY_BITMAP + BITMAP_NAME


class DiskExport:
    """One open export: its listener, its view, its frozen dirty map."""

    def __init__(self, dev: "Device", where: str, listener: Any, unix: Optional[str],
                 snap: snapshot.PointInTime, frozen: Optional[Tuple[bytes, int]]) -> None:
        self.dev = dev
        self.where = where
        self.unix = unix
        self.snapshot = snap
        self.frozen = frozen  # (bits, granularity) at the point in time, or None
        self.read_bytes = 0  # what this export's clients read
        self._inode = os.lstat(unix).st_ino if unix else None
        contexts: Dict[str, nbdserver.StatusFn] = {w.CONTEXT_BASE_ALLOCATION: self._allocation}
        if frozen is not None:
            contexts[DIRTY_CONTEXT] = self._dirty
        name = f"d{dev.domid}/{dev.devid}"
        self.spec = nbdserver.Export(size=snap.size, names=("", name), read=snap.read,
                                     contexts=contexts, description=f"gblk {name}",
                                     on_read=self._counted)
        self.server = StreamServer(listener, self._handle,
                                   spawn=gevent.pool.Pool(MAX_CONNECTIONS))

    def _allocation(self, offset: int, length: int) -> list:
        return [(length, 0)]  # all data: no hole or zero is claimed

    def _dirty(self, offset: int, length: int) -> list:
        assert self.frozen is not None
        bits, gran = self.frozen
        return [(n, w.STATE_DIRTY if d else 0)
                for n, d in cbtmod.dirty_runs(bits, gran, self.snapshot.size, offset, length)]

    def _counted(self, n: int) -> None:
        self.read_bytes += n
        self.dev.stats.export_read_bytes += n

    def _handle(self, conn: Any, _addr: Any) -> None:
        log = self.dev.log
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            nbdserver.serve(conn, self.spec, lambda: conn.settimeout(None))
        except ProtocolError as e:
            log.info("export: a client broke the NBD protocol (%s); its connection is closed",
                     e.strerror or e)
        except OSError as e:
            log.info("export: connection dropped: %s", e.strerror or e)
        except Exception:  # noqa: BLE001 - a bug here must not take the daemon down
            log.exception("export: connection failed")
        finally:
            conn.close()

    def describe(self) -> Dict[str, Any]:
        snap = self.snapshot
        out: Dict[str, Any] = {
            "exported": True, "size_bytes": snap.size,
            "contexts": list(self.spec.contexts),
            "read_bytes": self.read_bytes, "cbw_bytes": snap.copied_bytes,
            "side_file_bytes": snap.stored_bytes if snap.fd >= 0 else 0,
            "failed": snap.failed or None,
        }
        if self.unix:
            out["socket"] = self.unix
            out["uri"] = f"nbd+unix:///?socket={self.unix}"
        else:
            out["address"] = self.where
            out["uri"] = f"nbd://{self.where}/"
        if self.frozen is not None:
            out["dirty_bitmap"] = DIRTY_CONTEXT
        return out


def _name(dev: "Device") -> str:
    return f"d{dev.domid}/{dev.devid}"


def default_socket(directory: str, dev: "Device") -> str:
    return os.path.join(directory, f"export-d{dev.domid}-{dev.devid}.sock")


def _unix_listener(path: str) -> Any:
    if not os.path.isabs(path):
        raise ValueError(f"export socket {path!r}: an absolute path is needed")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise GblkError(f"export socket {path}: no directory {directory}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise GblkError(f"export socket {path}: exists and is not a socket")
        probe = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise GblkError(f"export socket {path}: {e.strerror or e}") from None
            os.unlink(path)  # left by a gblk that died
        else:
            raise GblkError(f"export socket {path}: another process answers on it")
        finally:
            probe.close()
    sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: no window where others connect
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise GblkError(f"export socket {path}: cannot listen: {e.strerror or e}") from None
    finally:
        os.umask(old)
    return sock


def parse_address(text: str) -> Tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``, a loopback host only; ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"export address {text!r}: HOST:PORT expected (e.g. 127.0.0.1:10809)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"export address {text!r}: the host must be a loopback IP "
                         "address (127.0.0.1 or ::1)") from None
    if not ip.is_loopback:
        raise ValueError(f"export address {text!r}: only loopback addresses are served (the "
                         "export has no TLS or authentication; tunnel it, e.g. with ssh)")
    return host, int(port)


def _tcp_listener(host: str, port: int) -> Tuple[Any, str]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = gevent.socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise GblkError(f"export address {host}:{port}: cannot listen: "
                        f"{e.strerror or e}") from None
    got = sock.getsockname()
    where = f"[{got[0]}]:{got[1]}" if fam == socket.AF_INET6 else f"{got[0]}:{got[1]}"
    return sock, where


def start(dev: "Device", socket_dir: str, path: Optional[str] = None,
          address: Optional[str] = None) -> Dict[str, Any]:
    """Export the disk (see the module); GblkError/ValueError, nothing changed, if not."""
    if path is not None and address is not None:
        raise ValueError("export: give a socket or an address, not both")
    if dev.export is not None:
        raise GblkError(f"{_name(dev)} is already exported ({dev.export.where}); "
                        "gblk ctl unexport it first")
    dp = dev.dataplane
    if not dev.attached or dev.store is None or dp is None:
        raise GblkError(f"{_name(dev)} is not connected: export it once the guest uses it")
    cfg = dev.ctx.cbt
    side_dir = cfg.export_directory if cfg is not None else "/var/lib/gblk/export"
    hostport = parse_address(address) if address is not None else None
    unix: Optional[str] = None
    if hostport is not None:
        listener, where = _tcp_listener(*hostport)
    else:
        unix = path if path is not None else default_socket(socket_dir, dev)
        listener, where = _unix_listener(unix), unix
    size = dev.stats.sectors * 512
    try:
        fd = dev.ctx.control.call(f"creating the export's side file in {side_dir}",
                                  snapshot.create_side_file, side_dir, size,
                                  undo=snapshot.close_fd)
    except OSError as e:
        _close_listener(listener, unix)
        raise GblkError(f"export: creating the side file in {side_dir}: "
                        f"{e.strerror or e}") from None
    except BaseException:
        _close_listener(listener, unix)
        raise
    snap = snapshot.PointInTime(dev.store, fd, size, IOPool.of(dev.ctx.pool).device(),
                                dev.stats, dev.log)
    tracker = dev.cbt if dev.cbt is not None and not dev.cbt.failed else None
    if tracker is not None:
        tracker.since = bytearray(len(tracker.bits))
    rings = list(dp.rings)
    before = [(r, r.jobs_submitted) for r in rings]
    dp.cbw = snap  # from now on every write batch waits for the view
    drained = False
    with gevent.Timeout(DRAIN, False):
        while any(r.jobs_completed < n for r, n in before):
            gevent.sleep(0.001)
        drained = True
    if not drained or dev.dataplane is not dp:
        if dev.dataplane is dp:
            dp.cbw = None
        if tracker is not None:
            tracker.since = None
        snap.close()
        _close_listener(listener, unix)
        raise GblkError(f"{_name(dev)}: the writes in flight did not finish within {DRAIN:g}s"
                        if not drained else f"{_name(dev)} disconnected meanwhile")
    # the point in time: every write issued before is done, every later one held
    frozen = (bytes(tracker.bits), tracker.granularity) if tracker is not None else None
    snap.open()
    try:
        exp = DiskExport(dev, where, listener, unix, snap, frozen)
        exp.server.start()
    except BaseException as e:
        dp.cbw = None
        if tracker is not None:
            tracker.since = None
        snap.close()
        _close_listener(listener, unix)
        if isinstance(e, OSError):
            raise GblkError(f"export on {where}: {e.strerror or e}") from None
        raise
    dev.export = exp
    dev.stats.export_open = True
    dev.log.info("exported read-only over NBD on %s (point in time now; %s)", where,
                 f"dirty bitmap as {DIRTY_CONTEXT}" if frozen else "no dirty bitmap: CBT off")
    return exp.describe()


def _close_listener(listener: Any, unix: Optional[str]) -> None:
    listener.close()
    if unix:
        try:
            os.unlink(unix)
        except OSError:
            pass


def stop(dev: "Device") -> Dict[str, Any]:
    """``gblk ctl unexport``: the export ends (the side file goes)."""
    exp = dev.export
    if exp is None:
        raise GblkError(f"{_name(dev)} is not exported (gblk ctl export DISK)")
    out = exp.describe()
    close(dev)
    out["exported"] = False
    return out


def close(dev: "Device") -> None:
    """End the export of ``dev`` if there is one (unexport, the disk going)."""
    exp, dev.export = dev.export, None
    if exp is None:
        return
    dp = dev.dataplane
    if dp is not None and dp.cbw is exp.snapshot:
        dp.cbw = None
    try:
        exp.server.stop(timeout=1.0)
    except Exception as e:  # noqa: BLE001 - the listener is gone either way
        dev.log.warning("export: stopping the listener: %r", e)
    exp.snapshot.close()
    if dev.cbt is not None:
        dev.cbt.since = None
    with gevent.Timeout(DRAIN, False):  # its reads and copies use the store
        while exp.snapshot.busy:
            gevent.sleep(0.001)
    if exp.unix:
        try:
            if os.lstat(exp.unix).st_ino == exp._inode:
                os.unlink(exp.unix)
        except OSError:
            pass
    dev.stats.export_open = False
    dev.log.info("export on %s ended", exp.where)
