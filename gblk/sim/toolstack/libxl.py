"""The simulated toolstack: creates and destroys domains, attaches and detaches disks,
writing into XenStore exactly what libxl (Xen 4.17) writes.

What libxl does, and what this module mirrors (facts from ``tools/libs/light``):

* ``libxl__domain_make``: ``/local/domain/N`` owned by dom0 with read for the guest
  (``n0 rN``); ``vm``, ``name``, ``domid``; ``cpu``, ``memory``, ``device``, ``control``
  the same; ``control/shutdown`` & co., ``data``, ``drivers``, ``feature``, ``attr``,
  ``error`` owned by the guest (``nN``); ``/vm/<uuid>`` (``n0 rN``) and ``/libxl/N``
  (``n0``, dom0 only). Then the domain is introduced to xenstored.
* ``device_disk_add`` + ``libxl__device_generic_add``, all in one transaction: the
  frontend directory ``/local/domain/N/device/vbd/<devid>`` owned by the guest with
  read for the backend domain (``nN rB``), the backend directory
  ``/local/domain/B/backend/<kind>/N/<devid>`` owned by the backend domain with read
  for the guest (``nB rN``), a copy of the backend nodes under
  ``/libxl/N/device/vbd/<devid>``. Backend nodes: ``frontend``, ``params``
  (``qdisk``/``vbd3``: ``<format>:<path>`` where libxl spells raw ``aio``; ``vbd``: the
  plain path), ``script`` (``vbd``: ``block``; ``vbd3``: ``block-tap``),
  ``frontend-id``, ``online=1``, ``removable``, ``bootable=1``, ``state=1``, ``dev``,
  ``type`` (``qdisk``, ``vbd3`` or ``phy``), ``mode``, ``device-type``,
  ``direct-io-safe`` (only when set), ``discard-enable`` (default: 1 for ``mode=w``),
  ``specification=xen``. Frontend nodes: ``backend``, ``backend-id``, ``state=1``,
  ``virtual-device``, ``device-type``, ``trusted=1`` and, for PV guests, ``protocol``
  (the guest's native ABI; its own frontend overwrites it).
* ``libxl__initiate_device_generic_remove``: ``online=0`` and, unless already Closed,
  backend ``state=5``, in one transaction; wait up to 10 s for the backend to reach
  Closed (6); then (also after the timeout: libxl forces) ``libxl__device_destroy``
  removes the frontend directory, the libxl copy and the backend directory, each with
  ``libxl__xs_path_cleanup`` (empty parents go too).
* Domain destroy: the domain's device directories and nodes are removed and
  xenstored fires ``@releaseDomain``.

Runs on the hub (gevent) through a ``gblk.xen.interfaces.XenStore`` acting as dom0;
INTRODUCE and RELEASE, which that interface does not carry, go over a short-lived
connection of their own to xenstored's socket. Must not import the engine, device,
daemon or cli layers, and never talks to a backend other than through XenStore.
"""

from __future__ import annotations

import os
import socket
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ...blkif import xenbus as xb
from ...blkif.const import XenbusState
from ...errors import XenStoreError
from ...xen.interfaces import XenStore, XenStoreOps
from ...xen import xs_wire as w
from ..hypervisor.evtchn import close_domain_ports
from ..hypervisor.memory import GuestMemory

#: the kinds a disk can be attached as, and libxl's backendtype for each
KINDS = {"qdisk": "qdisk", "vbd3": "tap", "vbd": "phy"}
#: libxl__device_disk_string_of_backend (4.17 writes "vbd3" for tap since the
#: tapback support; older releases wrote "phy")
_TYPE_NODE = {"qdisk": "qdisk", "vbd3": "vbd3", "vbd": "phy"}
#: libxl__device_disk_string_of_format
_FORMAT_STRING = {"raw": "aio", "aio": "aio", "empty": "aio", "qcow": "qcow",
                  "qcow2": "qcow2", "vhd": "vhd", "qed": "qed"}
#: libxl__xen_script_dir_path() on Debian
XEN_SCRIPT_DIR = "/etc/xen/scripts"
#: LIBXL_DESTROY_TIMEOUT
DESTROY_TIMEOUT = 10.0
DEFAULT_DEVID = 51712  # xvda
DEFAULT_PAGES = 16384  # 64 MiB of guest RAM (sparse: only what is touched costs)


def perms(owner: int, *readers: int) -> List[str]:
    """A XenStore permission list: ``n<owner>`` then ``r<reader>`` each."""
    return [f"n{owner}"] + [f"r{r}" for r in readers]


def vdev_name(devid: int) -> str:
    """The ``xvd*`` name of a devid (libxl__devid_to_vdev, for the ``dev`` node)."""

    def letters(n: int) -> str:
        out = ""
        n += 1
        while n:
            n, r = divmod(n - 1, 26)
            out = chr(ord("a") + r) + out
        return out

    if devid & (1 << 28):  # extended: 1 << 28 | disk << 8 | partition
        disk, part = (devid >> 8) & 0xFFFFF, devid & 0xFF
    elif devid >> 8 == 202:  # XEN_MAJOR: disk << 4 | partition
        disk, part = (devid >> 4) & 0xF, devid & 0xF
    else:
        return str(devid)
    return "xvd" + letters(disk) + (str(part) if part else "")


@dataclass
class Domain:
    """A simulated guest domain."""

    domid: int
    name: str
    uuid: str
    memory: GuestMemory
    path: str  #: /local/domain/<domid>
    store_frame: int = 0

    @property
    def vm_path(self) -> str:
        return f"/vm/{self.uuid}"


@dataclass
class Disk:
    """A disk attached to a domain, as written into XenStore."""

    domid: int
    devid: int
    kind: str
    backend_domid: int
    frontend_path: str
    backend_path: str
    target: str
    params: str
    mode: str
    device_type: str
    backend_nodes: Dict[str, str] = field(default_factory=dict)
    frontend_nodes: Dict[str, str] = field(default_factory=dict)

    @property
    def libxl_path(self) -> str:
        return f"/libxl/{self.domid}/device/vbd/{self.devid}"


class Toolstack:
    """A libxl stand-in over a dom0 XenStore connection.

    ``dir`` is the simulated host's directory (guest memory lives below it);
    ``socket_path`` the dom0 xenstored socket (default ``dir/xenstored.sock``).
    """

    def __init__(self, xs: XenStore, dir: str, socket_path: Optional[str] = None,
                 timeout: float = 10.0) -> None:
        self.xs = xs
        self.dir = dir
        self.socket_path = socket_path or os.path.join(dir, "xenstored.sock")
        self.timeout = timeout
        self.domains: Dict[int, Domain] = {}
        self.disks: Dict[Tuple[int, int], Disk] = {}

    # -- xenstored control ops (not in the XenStore interface) ----------------
    def _control(self, op: int, *args: str) -> str:
        """Send one privileged request on a connection of its own; the reply payload.
        Raises XenStoreError with xenstored's error name."""
        payload = b"".join(a.encode() + b"\0" for a in args)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
            sock.sendall(w.pack(op, 1, 0, payload))
            head = _recv_exact(sock, w.HEADER.size)
            mtype, _, _, length = w.unpack_header(head)
            body = _recv_exact(sock, length) if length else b""
        except OSError as e:
            raise XenStoreError(f"{w.TYPE_NAMES.get(op, op)}: {e}", "EIO") from e
        finally:
            sock.close()
        text = body.rstrip(b"\0").decode("latin-1")
        if mtype == w.XS_ERROR:
            raise XenStoreError(f"{w.TYPE_NAMES.get(op, op)} {' '.join(args)}: {text}", text)
        return text

    def introduce(self, domid: int, mfn: int, port: int = 1) -> None:
        self._control(w.XS_INTRODUCE, str(domid), str(mfn), str(port))

    def release(self, domid: int) -> None:
        self._control(w.XS_RELEASE, str(domid))

    def is_introduced(self, domid: int) -> bool:
        return self._control(w.XS_IS_DOMAIN_INTRODUCED, str(domid)) == "T"

    # -- domains --------------------------------------------------------------
    def _free_domid(self) -> int:
        used = set(self.domains)
        for name in self.xs.directory("/local/domain"):
            if name.isdigit():
                used.add(int(name))
        domid = 1
        while domid in used or os.path.exists(os.path.join(self.dir, "domains", str(domid))):
            domid += 1
        return domid

    def create_domain(self, domid: Optional[int] = None, name: Optional[str] = None,
                      pages: int = DEFAULT_PAGES, grant_entries: Optional[int] = None,
                      memory_kb: Optional[int] = None) -> Domain:
        """Create a domain: its memory and grant table, its XenStore nodes (as
        libxl__domain_make and libxl__build_post write them), then INTRODUCE it."""
        if domid is None:
            domid = self._free_domid()
        if domid in self.domains:
            raise ValueError(f"domain {domid} exists")
        name = name or f"guest{domid}"
        if grant_entries is None:
            memory = GuestMemory.create(self.dir, domid, pages)
        else:
            memory = GuestMemory.create(self.dir, domid, pages, grant_entries)
        try:
            dom = self._write_domain(domid, name, memory, memory_kb or pages * 4)
            self.introduce(domid, dom.store_frame, 1)
        except BaseException:
            memory.destroy()
            raise
        self.domains[domid] = dom
        return dom

    def _write_domain(self, domid: int, name: str, memory: GuestMemory,
                      memory_kb: int) -> Domain:
        uid = str(uuidlib.uuid4())
        dom_path = f"/local/domain/{domid}"
        store_frame = memory.alloc_page()  # the xenstore ring page (start_info)
        dom = Domain(domid, name, uid, memory, dom_path, store_frame)
        ro = perms(0, domid)
        rw = perms(domid)

        def fn(tx: XenStoreOps) -> None:
            def mknod(path: str, p: Sequence[str]) -> None:  # libxl__xs_mknod
                tx.mkdir(path)
                tx.set_perms(path, p)

            tx.rm(dom_path)
            mknod(dom_path, ro)
            tx.rm(dom.vm_path)
            mknod(dom.vm_path, ro)
            libxl_path = f"/libxl/{domid}"
            tx.rm(libxl_path)
            mknod(libxl_path, perms(0))
            mknod(libxl_path + "/device", perms(0))
            tx.write(libxl_path + "/type", "pv")
            tx.write(dom_path + "/vm", dom.vm_path)
            tx.write(dom_path + "/name", name)
            tx.write(dom.vm_path + "/name", name)
            tx.write(dom.vm_path + "/uuid", uid)
            for sub in ("cpu", "memory", "device", "control"):
                mknod(f"{dom_path}/{sub}", ro)
            for sub in ("control/shutdown", "control/feature-poweroff",
                        "control/feature-reboot", "control/feature-suspend",
                        "control/sysrq", "data", "drivers", "feature", "attr", "error"):
                mknod(f"{dom_path}/{sub}", rw)
            # libxl__build_post
            tx.write(dom_path + "/domid", str(domid))
            tx.write(dom_path + "/memory/static-max", str(memory_kb))
            tx.write(dom_path + "/memory/target", str(memory_kb))
            tx.write(dom_path + "/cpu/0/availability", "online")
            tx.write(dom_path + "/store/port", "1")
            tx.write(dom_path + "/store/ring-ref", str(store_frame))

        self.xs.transaction(fn)
        return dom

    def destroy_domain(self, domid: int) -> None:
        """Destroy abruptly, as after ``xl destroy``: the domain's device directories
        (frontend, backend and libxl copies) and its nodes go, xenstored is told
        (RELEASE, firing @releaseDomain), its memory files are removed (a backend that
        still maps its pages keeps them until it unmaps). IO in flight is lost."""
        dom = self.domains.pop(domid, None)
        backends = self._backend_dirs_of(domid)

        def fn(tx: XenStoreOps) -> None:
            for path in backends:
                _path_cleanup(tx, path)
            tx.rm(f"/local/domain/{domid}")
            tx.rm(f"/libxl/{domid}")
            if dom is not None:
                tx.rm(dom.vm_path)

        self.xs.transaction(fn)
        for key in [k for k in self.disks if k[0] == domid]:
            del self.disks[key]
        try:
            self.release(domid)
        except XenStoreError as e:
            if e.errno_name != "ENOENT":
                raise
        close_domain_ports(self.dir, domid)
        if dom is not None:
            dom.memory.destroy()
        else:
            try:
                GuestMemory.open(self.dir, domid).destroy()
            except FileNotFoundError:
                pass

    def _backend_dirs_of(self, domid: int) -> List[str]:
        """Every backend directory serving ``domid`` (any backend domain, any kind)."""
        out = []
        for be in self.xs.directory("/local/domain"):
            if not be.isdigit():
                continue
            base = f"/local/domain/{be}/backend"
            for kind in self.xs.directory(base):
                path = f"{base}/{kind}/{domid}"
                if self.xs.directory(path) or self.xs.read(path) is not None:
                    out.append(path)
        return out

    # -- disks ------------------------------------------------------------------
    def attach_disk(
        self,
        domid: int,
        target: str,
        kind: str = "qdisk",
        devid: int = DEFAULT_DEVID,
        mode: str = "w",
        device_type: str = "disk",
        format: str = "raw",
        backend_domid: int = 0,
        direct_io_safe: bool = False,
        discard_enable: Optional[bool] = None,
        removable: Optional[bool] = None,
        protocol: Optional[str] = None,
        params: Optional[str] = None,
        trusted: bool = True,
    ) -> Disk:
        """Write a disk's two directories as ``device_disk_add`` does, in one
        transaction. ``params`` overrides the computed node (tests of odd values);
        ``protocol`` is what libxl writes for a PV guest (None: not written, as for
        an HVM guest). Raises ValueError if the device exists."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
        if mode not in ("w", "r"):
            raise ValueError("mode must be 'w' or 'r'")
        if device_type not in ("disk", "cdrom"):
            raise ValueError("device_type must be 'disk' or 'cdrom'")
        fe = xb.frontend_path(domid, devid)
        be = xb.backend_path(backend_domid, kind, domid, devid)
        if params is None:
            if kind == "vbd":
                params = target
            else:
                params = f"{_FORMAT_STRING.get(format, format)}:{target}"
        if discard_enable is None:
            discard_enable = mode == "w"  # libxl: defaults to !!readwrite
        if removable is None:
            removable = device_type == "cdrom"  # xl: devtype=cdrom sets removable
        back: List[Tuple[str, str]] = [(xb.PARAMS, params)]
        if kind == "vbd":
            back.append(("script", f"{XEN_SCRIPT_DIR}/block"))
        elif kind == "vbd3":
            back.append(("script", f"{XEN_SCRIPT_DIR}/block-tap"))
        back += [
            (xb.FRONTEND_ID, str(domid)),
            (xb.ONLINE, "1"),
            (xb.REMOVABLE, "1" if removable else "0"),
            ("bootable", "1"),
            (xb.STATE, str(int(XenbusState.INITIALISING))),
            ("dev", vdev_name(devid)),
            ("type", _TYPE_NODE[kind]),
            (xb.MODE, mode),
            (xb.DEVICE_TYPE, device_type),
        ]
        if direct_io_safe:
            back.append((xb.DIRECT_IO_SAFE, "1"))
        back += [(xb.DISCARD_ENABLE, "1" if discard_enable else "0"), ("specification", "xen")]
        front: List[Tuple[str, str]] = [
            (xb.BACKEND_ID, str(backend_domid)),
            (xb.STATE, str(int(XenbusState.INITIALISING))),
            (xb.VIRTUAL_DEVICE, str(devid)),
            (xb.DEVICE_TYPE, device_type),
            ("trusted", "1" if trusted else "0"),
        ]
        if protocol is not None:
            front.append((xb.PROTOCOL, protocol))
        fe_perms = perms(domid, backend_domid)
        be_perms = perms(backend_domid, domid)
        libxl_path = f"/libxl/{domid}/device/vbd/{devid}"

        def fn(tx: XenStoreOps) -> None:
            if tx.read(be + "/" + xb.STATE) is not None or tx.read(fe + "/" + xb.STATE) is not None:
                raise ValueError(f"device {domid}/{devid} already exists in xenstore")
            tx.rm(libxl_path)
            tx.write(libxl_path + "/frontend", fe)
            tx.write(libxl_path + "/backend", be)
            # frontend: owned by the guest, readable by the backend domain
            tx.rm(fe)
            tx.mkdir(fe)
            tx.set_perms(fe, fe_perms)
            tx.write(fe + "/" + xb.BACKEND, be)
            for k, v in front:
                tx.write(f"{fe}/{k}", v)
                tx.set_perms(f"{fe}/{k}", fe_perms)
            # backend: owned by the backend domain, readable by the guest
            tx.rm(be)
            tx.mkdir(be)
            tx.set_perms(be, be_perms)
            tx.write(be + "/" + xb.FRONTEND, fe)
            for k, v in back:
                tx.write(f"{be}/{k}", v)
            for k, v in back:
                tx.write(f"{libxl_path}/{k}", v)

        self.xs.transaction(fn)
        disk = Disk(domid, devid, kind, backend_domid, fe, be, target, params, mode,
                    device_type, dict([(xb.FRONTEND, fe)] + back),
                    dict([(xb.BACKEND, be)] + front))
        self.disks[(domid, devid)] = disk
        return disk

    def find_disk(self, domid: int, devid: int) -> Disk:
        """The disk ``domid/devid``: the one attached here, or read back from the
        frontend's ``backend`` node."""
        disk = self.disks.get((domid, devid))
        if disk is not None:
            return disk
        fe = xb.frontend_path(domid, devid)
        be = self.xs.read(fe + "/" + xb.BACKEND)
        if be is None:
            raise KeyError(f"no disk {domid}/{devid}")
        parts = be.strip("/").split("/")  # local domain B backend KIND N DEVID
        return Disk(domid, devid, parts[4], int(parts[2]), fe, be, "", "", "", "")

    def detach_disk(self, domid: int, devid: int = DEFAULT_DEVID,
                    timeout: float = DESTROY_TIMEOUT) -> bool:
        """Unplug as libxl does: ``online=0`` and backend ``state=5`` (unless already
        Closed), wait up to ``timeout`` for the backend's Closed, then remove both
        directories anyway. True when the backend reached Closed in time."""
        disk = self.find_disk(domid, devid)
        state_path = disk.backend_path + "/" + xb.STATE

        def fn(tx: XenStoreOps) -> bool:
            state = tx.read(state_path)
            if state is None:
                return False
            tx.write(disk.backend_path + "/" + xb.ONLINE, "0")
            if state.strip() != str(int(XenbusState.CLOSED)):
                tx.write(state_path, str(int(XenbusState.CLOSING)))
            return True

        closed = False
        if self.xs.transaction(fn):
            closed = self.wait_state(state_path, (XenbusState.CLOSED,), timeout,
                                     missing_ok=True) is not None
        self.destroy_device(domid, devid)
        return closed

    def destroy_device(self, domid: int, devid: int = DEFAULT_DEVID) -> None:
        """libxl__device_destroy: remove the frontend directory, the libxl copy and
        the backend directory (empty parents too), in one transaction."""
        disk = self.find_disk(domid, devid)

        def fn(tx: XenStoreOps) -> None:
            _path_cleanup(tx, disk.frontend_path)
            _path_cleanup(tx, disk.libxl_path)
            _path_cleanup(tx, disk.backend_path)

        self.xs.transaction(fn)
        self.disks.pop((domid, devid), None)

    def remove_frontend_dir(self, domid: int, devid: int = DEFAULT_DEVID) -> None:
        """Abrupt: the frontend directory vanishes (the backend must tear down)."""
        self.xs.rm(xb.frontend_path(domid, devid))

    def remove_backend_dir(self, domid: int, devid: int = DEFAULT_DEVID) -> None:
        """Abrupt: the backend directory vanishes (the backend must tear down at once)."""
        disk = self.find_disk(domid, devid)
        self.xs.rm(disk.backend_path)

    def backend_state(self, domid: int, devid: int = DEFAULT_DEVID) -> Optional[int]:
        disk = self.find_disk(domid, devid)
        return xb.parse_state(self.xs.read(disk.backend_path + "/" + xb.STATE))

    def wait_state(self, path: str, states: Sequence[int], timeout: float,
                   missing_ok: bool = False) -> Optional[int]:
        """Wait until the node at ``path`` holds one of ``states`` (or, with
        ``missing_ok``, is gone: returns -1). None on timeout."""
        wanted = {int(s) for s in states}
        sub = self.xs.watch([path])
        try:
            deadline = time.monotonic() + timeout
            while True:
                value = xb.parse_state(self.xs.read(path))
                if value is None and missing_ok:
                    return -1
                if value in wanted:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                sub.get(timeout=left)
        finally:
            sub.close()


def _path_cleanup(tx: XenStoreOps, path: str) -> None:
    """libxl__xs_path_cleanup: remove ``path``, then each parent left empty (never
    ``/local/domain/<id>`` or above: those always hold nodes)."""
    tx.rm(path)
    parts = path.rstrip("/").split("/")
    while len(parts) > 5:
        parts.pop()
        parent = "/".join(parts)
        if tx.directory(parent):
            break
        tx.rm(parent)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise OSError("xenstored closed the connection")
        buf += chunk
    return buf
