"""One virtual disk: reads its XenStore nodes, opens its store, owns its rings.

A greenlet per device watches the backend directory and the frontend's ``state``,
re-reads the current values on every event and applies ``state.decide`` until it
says NONE. Any failure is contained here: the device goes Closed with a clear
message in ``hotplug-error``; the daemon and every other device carry on.

Every blocking call (opening the store, its size, closing it; the rings' maps and
teardown unmaps in the dataplane) goes through the daemon's ``ControlPool``: threads
apart from the IO pool, and a deadline (``backend.control_timeout``) after which the
call raises ControlTimeout and the device fails like any other. The wait cannot be
cut short by a removal; it ends at the deadline at the latest, then the removal is
seen and served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import gevent
import gevent.lock

from ..blkif import reasons as R
from ..blkif import xenbus as xb
from ..blkif.const import SECTOR_SIZE, VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE
from ..blkif.const import XenbusState as S
from ..blkif.validate import DiskLimits
from ..config import BackendConfig
from ..engine import pages
from ..engine.control import ControlPool
from ..engine.dataplane import Dataplane
from ..engine.handles import EventChannels, SharedGrantTable
from ..engine.stats import DaemonStats, DeviceStats
from ..errors import GblkError, NegotiationError, XenStoreError
from ..logs import DeviceLogger, GuestLogRate, device_logger
from ..storage import Store, open_store
from ..xen.interfaces import GrantTable, XenHost, XenStore, XenStoreOps
from . import export, tracking
from .resize import ResizeWatcher
from .state import Action, decide

#: seconds between size checks of a connected disk whose image cannot be watched
#: (``gblk.device.resize``: inotify or uevents unavailable); watched ones are never polled
RESIZE_CHECK_INTERVAL = 2.0


@dataclass
class DeviceContext:
    """What every device of one daemon shares."""

    host: XenHost
    xs: XenStore
    pool: Any  # gevent threadpool: guests' IO only
    #: the control plane's blocking calls (open, size, ring map, teardown), each with
    #: a deadline, in threads of their own: a stuck one never takes an IO thread
    control: ControlPool
    config: BackendConfig
    stats: DaemonStats
    log_rate: GuestLogRate
    stop_timeout: float
    backend_domid: int = 0
    #: where each ring's journal lives (gblk.engine.journal); None: no journals
    journal_dir: Optional[str] = None
    #: every disk's IO limits (gblk.engine.throttle.Throttles; None: no limits)
    throttles: Any = None
    #: changed-block tracking settings (gblk.config.CbtConfig; None: not offered)
    cbt: Any = None
    #: the daemon's one event-channel and one grant-table handle (None: one per disk)
    events: Optional[EventChannels] = None
    grants: Optional[SharedGrantTable] = None
    #: tells connected disks when their image may have changed size (None: timed checks)
    resize: Optional[ResizeWatcher] = None


def _close_store(store: Store) -> None:
    """In the control pool: close a store whose open returned after its deadline."""
    store.close()


def _write_changed(t: XenStoreOps, path: str, nodes: Dict[str, str]) -> List[str]:
    """Write the nodes of ``nodes`` whose value differs (a watch fires on every
    write, changed or not); which were written."""
    keys = list(nodes)
    now = t.read_many([f"{path}/{k}" for k in keys])
    changed = [k for k, v in zip(keys, now) if v != nodes[k]]
    t.write_many([(f"{path}/{k}", nodes[k]) for k in changed])
    return changed


class Device:
    """One virtual disk: ``backend/<kind>/<domid>/<devid>`` and everything serving it.

    Responsible for the backend half of the XenBus handshake: reads the toolstack's
    and the frontend's nodes, opens the store, writes what the frontend is offered
    (sectors, features, ring limits), builds the ``Dataplane`` when the frontend
    connects and stops it when it closes or reconnects, and reports a failure as
    Closed with the reason in ``hotplug-error``. Owns the store, its grant-table handle,
    the dataplane, the disk's IO limits, dirty bitmap and NBD export, and its stats.

    Lifecycle: the ``Bus`` creates it when the directory appears and calls ``start()``,
    which registers the stats and spawns the device's greenlet. The device ends itself
    when the toolstack removes it (or its greenlet fails): it releases everything and
    tells the bus through ``on_removed``. ``stop()`` is the daemon's shutdown or
    handover: answer in-flight IO, release everything, leave XenStore as it is for the
    next gblk (idempotent).

    Threads: its control loop runs in its own greenlet (``_run``: one look at the
    current states per batch of watch events, ``state.decide`` applied until NONE);
    a resize check may run in a short-lived second one, serialised with it by
    ``_busy``. Its blocking calls (open, size, close of the store) go to the daemon's
    ``ControlPool`` threads with a deadline; its rings run as the dataplane's greenlets
    on the same hub.
    """

    def __init__(self, ctx: DeviceContext, kind: str, domid: int, devid: int,
                 on_removed: Callable[["Device"], None]) -> None:
        self.ctx = ctx
        self.kind = kind
        self.domid = domid
        self.devid = devid
        self.path = xb.backend_path(ctx.backend_domid, kind, domid, devid)
        self.key = (domid, kind, devid)
        self.stats = DeviceStats(domid, devid, kind, state_since=time.monotonic())
        self.log: DeviceLogger = device_logger(domid, devid, ctx.log_rate)
        self._on_removed = on_removed
        self.store: Optional[Store] = None
        #: the backing store's path, for error messages (set before it is opened)
        self.store_path = ""
        self.gnttab: Optional[GrantTable] = None
        self.dataplane: Optional[Dataplane] = None
        self.attached = False
        self.removed = False
        self._failed_on: Optional[tuple] = None
        self._frontend: Optional[str] = None
        self._greenlet: Optional[gevent.Greenlet] = None
        self._sub: Any = None
        self._readonly = False
        self._cdrom = False
        self._direct = False
        self._discard_enable = True
        self._connected_before = False
        #: the disk was Connected when this process found it: a takeover
        self._adopting = False
        #: the first look at the disk is done (serving, waiting or failed)
        self.settled = False
        #: IO limits (gblk.engine.throttle.DiskThrottle) and dirty bitmap (gblk.engine.cbt)
        self.throttle: Any = None
        self.cbt: Any = None
        #: the live NBD export (gblk.device.export.DiskExport; None: not exported)
        self.export: Any = None
        #: held while the control loop or a resize check changes the device
        self._busy = gevent.lock.Semaphore()
        self._resize_token: Optional[int] = None
        self._resize_polled = False  # no watch on the image: check on a timer
        self._resizer: Optional[gevent.Greenlet] = None
        self._resize_again = False

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        self.ctx.stats.devices[self.key] = self.stats
        self._greenlet = gevent.spawn(self._run)
        self._greenlet.link_exception(self._crashed)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Daemon shutdown: answer in-flight IO, release everything, leave XenStore
        as it is (a restarted gblk takes the device over). Idempotent."""
        g = self._greenlet
        if g is not None and g is not gevent.getcurrent():
            g.kill(block=True, timeout=1)
        self._release(timeout if timeout is not None else self.ctx.stop_timeout)
        self.ctx.stats.devices.pop(self.key, None)

    def _release(self, timeout: float) -> None:
        self._stop_rings(timeout)
        export.close(self)
        tracking.close(self)
        if self.ctx.throttles is not None:
            self.ctx.throttles.detach(self.key)
            self.throttle = None
        if self.store is not None:
            store, self.store = self.store, None
            try:
                self.ctx.control.call(f"closing {self.store_path}", store.close)
            except (GblkError, OSError) as e:
                self.log.warning("closing the store: %s", e)
        if self.gnttab is not None:
            g, self.gnttab = self.gnttab, None
            try:
                g.close()
            except GblkError as e:  # pages an abandoned IO job still holds go with the process
                self.log.warning("closing the grant table: %s", e)
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        r = self._resizer
        if r is not None and r is not gevent.getcurrent():
            r.kill(block=True, timeout=1)
        self.log.flush_suppressed()

    def _crashed(self, g: gevent.Greenlet) -> None:
        self.log.error("device failed: %r; releasing it", g.exception)
        self.stats.errors[R.DEVICE_FAILED] += 1
        try:
            self._release(self.ctx.stop_timeout)
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self.removed:
            self.removed = True
            self.ctx.stats.devices.pop(self.key, None)
            self._on_removed(self)

    # -- the control loop ----------------------------------------------------------
    def _run(self) -> None:
        xs = self.ctx.xs
        self._frontend = xs.read(f"{self.path}/{xb.FRONTEND}")
        paths = [self.path]
        if self._frontend:
            paths.append(f"{self._frontend}/{xb.STATE}")
        self._sub = xs.watch(paths)
        while True:
            try:
                with self._busy:
                    self._evaluate()
            finally:
                self.settled = True
            if self.removed:
                return
            # idle: nothing but XenStore (and the resize watcher) wakes a watched disk;
            # a store with no file to watch (NBD) is looked at on a timer
            poll = RESIZE_CHECK_INTERVAL if self.attached and self._resize_polled else None
            fired = self._sub.get(timeout=poll)
            # one look serves every event already queued (a commit of n nodes fires n)
            self._sub.drain()
            self._note_store()
            if fired is None and self.attached:
                with self._busy:
                    self._resize_check()

    def _resize_check(self) -> None:
        """Re-read the size (with ``_busy`` held); a store that stopped answering fails
        the device."""
        if not self.attached or self.removed:
            return
        try:
            self._check_resize()
        except (GblkError, OSError) as e:
            _, f, online = self._read_states()
            self._fail(f"checking the size of {self.store_path}: {e}", f, online)

    def _size_may_have_changed(self) -> None:
        """From the resize watcher: check once, again if it fires meanwhile."""
        if self._resizer is not None and not self._resizer.dead:
            self._resize_again = True
            return
        self._resizer = gevent.spawn(self._resize_soon)

    def _resize_soon(self) -> None:
        while True:
            self._resize_again = False
            with self._busy:
                self._resize_check()
            if not self._resize_again:
                return

    def _watch_size(self) -> None:
        watcher = self.ctx.resize
        path = getattr(self.store, "path", None)
        token = None
        if watcher is not None and isinstance(path, str) and self._resize_token is None:
            token = watcher.watch(path, self._size_may_have_changed)
        self._resize_token = token
        self._resize_polled = token is None

    def _unwatch_size(self) -> None:
        token, self._resize_token = self._resize_token, None
        if token is not None and self.ctx.resize is not None:
            self.ctx.resize.unwatch(token)
        self._resize_polled = False

    def _read_states(self) -> tuple:
        paths = [f"{self.path}/{xb.STATE}", f"{self.path}/{xb.ONLINE}"]
        if self._frontend:
            paths.append(f"{self._frontend}/{xb.STATE}")
        values = self.ctx.xs.read_many(paths)
        b = xb.parse_state(values[0])
        online = (values[1] or "0").strip() == "1"
        f = xb.parse_state(values[2]) if self._frontend else None
        return b, f, online

    def _evaluate(self) -> None:
        for _ in range(8):  # each step changes our own state; 8 is more than any path needs
            b, f, online = self._read_states()
            action = decide(b, f, online, self.attached)
            if self._failed_on is not None:
                if self._failed_on == (f, online) and action not in (Action.REMOVE, Action.CLOSE):
                    return  # failed here before: wait until the frontend or toolstack moves
                self._failed_on = None
            if action is Action.NONE:
                return
            self.log.debug("backend %s frontend %s online %s: %s", b, f, online, action.value)
            self._adopting = action is Action.CONNECT and b == S.CONNECTED
            try:
                self._apply(action)
            except (GblkError, OSError) as e:
                self._fail(str(e), f, online)
                return
            if self.removed:
                return

    def _apply(self, action: Action) -> None:
        if action is Action.REMOVE:
            self._release(self.ctx.stop_timeout)
            self.log.info("removed")
            self._finish()
        elif action is Action.INIT_WAIT:
            self._prepare()
            self._set_state(S.INIT_WAIT)
        elif action is Action.CONNECT:
            if self.store is None:
                self._prepare()
            self._connect()
        elif action is Action.CLOSING:
            self._set_state(S.CLOSING)
        elif action is Action.CLOSE:
            self._stop_rings(self.ctx.stop_timeout)
            self._set_state(S.CLOSED)
        elif action is Action.RECONNECT:
            self._stop_rings(self.ctx.stop_timeout)
            if self.store is None:
                self._prepare()
            self._set_state(S.INIT_WAIT)

    def _fail(self, message: str, f: Optional[int], online: bool) -> None:
        self.log.error("%s", message)
        self.stats.errors[R.DEVICE_FAILED] += 1
        self._failed_on = (f, online)
        self._stop_rings(self.ctx.stop_timeout)
        try:
            def tx(t: XenStoreOps) -> None:
                if t.read(f"{self.path}/{xb.STATE}") is None:
                    return
                t.write(f"{self.path}/{xb.HOTPLUG_ERROR}", message[:1024])
                t.write(f"{self.path}/{xb.HOTPLUG_STATUS}", "error")
                t.write(f"{self.path}/{xb.STATE}", str(int(S.CLOSED)))
            self.ctx.xs.transaction(tx)
            self._note_state(S.CLOSED)
        except XenStoreError as e:
            self.log.error("cannot report the failure in XenStore: %s", e)

    # -- steps ------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Open the backing store and write the nodes frontends read early."""
        xs = self.ctx.xs
        cfg = self.ctx.config
        params, mode_s, dtype_s, dio_s, discard_s = xs.read_many(
            [f"{self.path}/{k}" for k in (xb.PARAMS, xb.MODE, xb.DEVICE_TYPE,
                                          xb.DIRECT_IO_SAFE, xb.DISCARD_ENABLE)])
        if params is None:
            raise NegotiationError(f"{self.path}/params missing")
        fmt, path = xb.parse_params(self.kind, params)
        mode = (mode_s or "r").strip()
        dtype = (dtype_s or "disk").strip()
        self._cdrom = dtype == "cdrom"
        self._readonly = not mode.startswith("w") or self._cdrom
        dio_safe = xb.parse_bool(dio_s)
        self._direct = cfg.direct_io == "always" or (cfg.direct_io == "auto" and dio_safe)
        self._discard_enable = cfg.discard and xb.parse_bool(discard_s, default=True)
        if self.store is None:
            # a store that opens after its deadline (the device failed meanwhile) is
            # closed again, in the control pool
            self.store_path = path
            self.store = self.ctx.control.call(
                f"opening {path}", open_store, fmt, path, self._readonly, self._direct,
                undo=_close_store)
            # an export the server offers read-only is served read-only, whatever mode says
            self._readonly = self._readonly or self.store.readonly
        if self.ctx.throttles is not None and self.throttle is None:
            self.throttle = self.ctx.throttles.attach(self.key, tracking.identity(self, path),
                                                      self.stats)
        if self.gnttab is None:
            grants = self.ctx.grants
            self.gnttab = (grants.acquire() if grants is not None
                           else self.ctx.host.open_grant_table())
        offer = self._offer()
        nodes = xb.early_nodes(offer, cfg.max_indirect_segments)
        nodes[xb.HOTPLUG_STATUS] = "connected"

        self.ctx.xs.transaction(lambda t: _write_changed(t, self.path, nodes))
        self.log.info("opened %s (%s, %s%s)", path, fmt, "ro" if self._readonly else "rw",
                      ", O_DIRECT" if self._direct else "")
        self._note_store()

    def _offer(self) -> xb.Offer:
        cfg = self.ctx.config
        persistent = cfg.grant_mode in ("auto", "persistent") and cfg.max_persistent_grants > 0
        return xb.Offer(cfg.max_ring_page_order, cfg.max_queues, persistent)

    def _limits(self, sectors: int) -> DiskLimits:
        store = self.store
        assert store is not None
        return DiskLimits(
            sectors=sectors,
            readonly=self._readonly,
            sector_size=store.sector_size,
            barrier=True,
            flush=True,
            discard=self._discard_enable and store.supports_discard and not self._readonly,
            discard_secure=(self._discard_enable and store.supports_secure_discard
                            and not self._readonly),
            max_indirect_segments=self.ctx.config.max_indirect_segments,
        )

    def _connect(self) -> None:
        ctx = self.ctx
        cfg = ctx.config
        store = self.store
        assert store is not None and self.gnttab is not None and self._frontend
        fe = self._frontend
        params = xb.parse_frontend(lambda k: ctx.xs.read(f"{fe}/{k}"), self._offer(),
                                   read_many=lambda ks: ctx.xs.read_many([f"{fe}/{k}" for k in ks]))
        mode = self._grant_mode(params.persistent)
        size = ctx.control.call(f"reading the size of {self.store_path}", store.size)
        sectors = size // SECTOR_SIZE
        limits = self._limits(sectors)
        if not self._readonly:
            tracking.load(self, size)
        dp = Dataplane(
            host=ctx.host, gnttab=self.gnttab, store=store, domid=self.domid, abi=params.abi,
            limits=limits, path=mode, pool=ctx.pool, control=ctx.control,
            device_stats=self.stats, log=self.log,
            guest_log=self.log.guest_warning, max_persistent_grants=cfg.max_persistent_grants,
            persistent_grant_idle=cfg.persistent_grant_idle,
            journal_prefix=(f"{ctx.journal_dir}/{self.kind}-{self.domid}-{self.devid}"
                            if ctx.journal_dir else None),
            adopt=self._adopting,
            throttle=self.throttle, cbt=self.cbt, events=ctx.events,
            cbw=self.export.snapshot if self.export is not None else None,
        )
        self.stats.persistent_grants_limit = (
            cfg.max_persistent_grants * len(params.queues) if dp.pages.persistent else 0)
        self.stats.sectors = sectors
        self.dataplane = dp
        try:
            dp.start([(q.ring_refs, q.event_channel) for q in params.queues])
        except BaseException:
            self._stop_rings(ctx.stop_timeout)
            raise
        self.attached = True
        self._watch_size()
        info = (VDISK_READONLY if self._readonly else 0) | (
            VDISK_CDROM | VDISK_REMOVABLE if self._cdrom else 0)
        discard = None
        if limits.discard:
            discard = (store.discard_granularity, store.discard_alignment, limits.discard_secure)
        nodes = xb.connect_nodes(sectors, store.sector_size, store.physical_sector_size, info,
                                 flush=True, barrier=True, discard=discard,
                                 persistent=dp.pages.persistent)

        def tx(t: XenStoreOps) -> None:
            # a takeover (a restarted gblk finds the disk Connected) writes nothing
            # that has not changed: blkfront takes any write of ``state`` while
            # Connected for a resize ("Setting capacity to ...")
            state = t.read(f"{self.path}/{xb.STATE}")
            if state is None:
                raise NegotiationError("backend directory vanished while connecting")
            changed = _write_changed(t, self.path, nodes)
            if state.strip() != str(int(S.CONNECTED)) or xb.SECTORS in changed:
                t.write(f"{self.path}/{xb.STATE}", str(int(S.CONNECTED)))
        ctx.xs.transaction(tx)
        self._note_state(S.CONNECTED)
        if self._connected_before:
            self.stats.reconnects += 1
        self._connected_before = True
        self.log.info("connected: %s, ring order %d, %d queue(s), %s grants, %d sectors",
                      params.abi.name, params.ring_page_order, len(params.queues), mode, sectors)

    def _grant_mode(self, persistent: bool) -> str:
        want = self.ctx.config.grant_mode
        if want == "copy":
            assert self.gnttab is not None
            if self.gnttab.supports_copy:
                return pages.COPY
            self.log.warning("grant copy not supported on this host: mapping instead")
            return pages.MAP
        if want in ("auto", "persistent") and persistent:
            return pages.PERSISTENT
        return pages.MAP

    def _stop_rings(self, timeout: float) -> None:
        self._unwatch_size()
        dp, self.dataplane = self.dataplane, None
        if dp is not None:
            dp.stop(timeout)
            # the device's counters never go back: the stopped rings' counts live on
            for rs in self.stats.rings.values():
                self.stats.retired.absorb(rs)
            self.stats.rings.clear()
            self.stats.persistent_grants = 0
        self.attached = False

    def _set_state(self, state: int) -> None:
        path = f"{self.path}/{xb.STATE}"

        def tx(t: XenStoreOps) -> None:
            if t.read(path) is not None:  # never recreate a removed directory
                t.write(path, str(int(state)))
        self.ctx.xs.transaction(tx)
        self._note_state(state)

    def _note_state(self, state: int) -> None:
        if self.stats.state != state:
            self.stats.state = int(state)
            self.stats.state_since = time.monotonic()
            self.log.info("state %s", S(state).name.lower())

    def _note_store(self) -> None:
        """Copy an NBD store's connection state into the stats; log its changes."""
        status = getattr(self.store, "metrics", None)
        if status is None:
            return
        m = status()
        st = self.stats
        if m["state"] != st.nbd_state:
            if st.nbd_state:
                log = self.log.info if m["state"] == "connected" else self.log.error
                log("NBD connection %s -> %s%s", st.nbd_state, m["state"],
                    f" ({m['last_error']})" if m["state"] != "connected" and m["last_error"] else "")
            st.nbd_state = m["state"]
        new_errors = m["connection_errors"] - st.nbd_connection_errors
        if new_errors > 0:
            st.errors[R.NBD_CONNECTION] += new_errors
            if m["state"] == "connected":
                self.log.warning("NBD connection lost and re-established (%s)", m["last_error"])
        if m["lost_writes"] > st.nbd_unflushed_lost:
            self.log.error("the NBD server went away with acknowledged writes it had not "
                           "flushed: the guest's next flush fails")
        st.nbd_reconnects = m["reconnects"]
        st.nbd_connection_errors = m["connection_errors"]
        st.nbd_unflushed_lost = m["lost_writes"]

    def _check_resize(self) -> None:
        store = self.store
        if store is None:
            return
        sectors = self.ctx.control.call(
            f"reading the size of {self.store_path}", store.size) // SECTOR_SIZE
        if sectors == self.stats.sectors:
            return
        self.log.info("resized: %d -> %d sectors", self.stats.sectors, sectors)
        self.stats.sectors = sectors
        if self.cbt is not None:
            self.cbt.grow(sectors * SECTOR_SIZE, self.store_path)
        if self.dataplane is not None:
            self.dataplane.resize(self._limits(sectors))
        xs = self.ctx.xs
        xs.write(f"{self.path}/{xb.SECTORS}", str(sectors))
        # rewrite state with its current value so the frontend's watch fires
        cur = xs.read(f"{self.path}/{xb.STATE}")
        if cur is not None:
            xs.write(f"{self.path}/{xb.STATE}", cur)

    def set_persistent_limit(self, limit: int) -> None:
        if self.dataplane is not None:
            self.dataplane.set_persistent_limit(limit)


