"""The composition root: builds everything from a Config and runs it.

Owns the top-level greenlets (bus, metrics, control socket, watchdog), handles
signals (a handler only sets a flag; the main greenlet does the work), drains in
order on stop, and talks to systemd. The only place besides the cli and the tests
that chooses between the real Xen host and the simulated one.

Disks come first: neither the metrics endpoint nor the control socket can stop
gblk from serving. A metrics address that cannot be bound yet (an interface not up
at boot, a port still taken) is logged, shown in ``systemctl status`` and the
control socket's ``status``, and retried with backoff until it binds; a control
socket that cannot be made is logged and left out.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import resource
import sys
import time
from typing import Any, List, Optional

import gevent
import gevent.event

from . import __version__
from .config import Config
from .control.views import DiskFacts
from .device.bus import Bus
from .device.device import DeviceContext
from .device.resize import ResizeWatcher
from .engine import crashpoints
from .engine.control import ControlPool
from .engine.handles import EventChannels, SharedGrantTable
from .engine.stats import DaemonStats
from .engine.throttle import Throttles
from .errors import ConfigError, GblkError
from .logs import GuestLogRate, set_level
from .sdnotify import Notifier, watchdog_interval
from .xen.interfaces import XenHost

log = logging.getLogger("gblk.daemon")

#: seconds between tries to bind the metrics address: doubling up to the last
METRICS_RETRY = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


def make_host(config: Config) -> XenHost:
    """The real Xen host, or the simulated one for ``xen = "sim:DIR"``."""
    sim_dir = config.daemon.sim_dir
    if sim_dir is not None:
        from .sim.hypervisor.xenhost import SimXenHost

        return SimXenHost(sim_dir)
    from .xen.host import RealXenHost

    return RealXenHost(timeout=config.daemon.xenstore_timeout)


#: soft RLIMIT_NOFILE the daemon asks for (capped by the hard limit): a few fds per disk
#: (its image; docs/architecture.md, "Scale") and headroom for sockets
WANTED_NOFILE = 65536


def raise_fd_limit(wanted: int = WANTED_NOFILE) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (never past the hard limit, never
    down), log what it is, and return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("file descriptor limit raised from %d to %d (hard limit %s)", soft,
                     target, "unlimited" if hard == resource.RLIM_INFINITY else hard)
            return target
        except (OSError, ValueError) as e:
            log.warning("cannot raise the file descriptor limit from %d: %s", soft, e)
    else:
        log.info("file descriptor limit %d", soft)
    return soft


class Daemon:
    """One gblk process: the host, the bus and its devices, and the services beside
    them (metrics endpoint, control socket, systemd notifications and watchdog).

    Responsible for building everything from the ``Config`` in order (disks first:
    neither metrics nor the control socket can keep a disk from being served), for
    the process-wide shares (the threadpool's size, the control pool, the one
    event-channel and grant-table handle, the IO limits), for signals and for the
    order of the drain on stop.

    Lifecycle: ``run()`` is the whole life: installs the signal handlers, ``start()``
    (XenStore opened, a grant table and an event channel opened and closed at once so
    a missing piece of Xen fails fast, a predecessor's handover on ``--takeover``, the
    bus started and its disks settled, then metrics and control), tells systemd it is
    ready, waits, and ``stop()`` (idempotent, also after a failed start). SIGHUP reloads the configuration in place; SIGUSR2
    starts a successor that takes the disks over the control socket (``handover``).

    Threads: ``run()`` is the main greenlet; a signal handler only sets a flag and
    wakes it, and it does the work (reload, stop). The daemon owns the top-level
    greenlets it spawns (housekeeping, watchdog, metrics retry) and kills them on
    stop; the bus, devices and rings own theirs. Blocking work goes to gevent's
    threadpool (guests' IO) and the ``ControlPool`` (control-plane calls).
    """

    def __init__(self, config: Config, host: Optional[XenHost] = None,
                 takeover: bool = False) -> None:
        self.config = config
        #: ``gblk serve --takeover``: a running gblk releases its disks to this one
        self.takeover = takeover
        #: this process released its disks to a successor (the control's ``handover``)
        self.handed_over = False
        self._handover_began = 0.0
        self.host = host
        self.stats = DaemonStats(started=time.time())
        self.log_rate = GuestLogRate(config.backend.guest_log_rate)
        self.notifier = Notifier()
        self.bus: Optional[Bus] = None
        self.metrics: Any = None
        #: why the metrics endpoint is not listening (None: listening, or disabled)
        self.metrics_error: Optional[str] = None
        self.control: Any = None
        self.control_error: Optional[str] = None
        self.xs: Any = None
        self.control_pool: Optional[ControlPool] = None
        #: abandoned control calls still running when the daemon stopped
        self.stuck_calls = 0
        #: guest IO jobs still running in the threadpool when the daemon stopped (their
        #: requests abandoned after stop_timeout: a store that never answers)
        self.stuck_io = 0
        self._stop = gevent.event.Event()
        self._hup = False
        self._greenlets: List[gevent.Greenlet] = []
        #: every disk's IO limits: the [[limit]] rules, SIGHUP, gblk ctl limit
        self.throttles = Throttles(config.limits, time.monotonic)

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        # a bad web configuration is a configuration error: before anything else
        web = self._web_config(cfg) if cfg.metrics.enabled else None
        _arm_crashpoints(cfg)
        if self.host is None:
            self.host = make_host(cfg)
        host = self.host
        if "vbd" in cfg.daemon.kinds and host.blkback_loaded():
            raise ConfigError(
                "daemon.kinds includes vbd, but the kernel's xen-blkback is loaded and claims "
                "every vbd: unload it (modprobe -r xen-blkback) or serve qdisk/vbd3 only")
        # fail fast, with one clear line, when a piece of Xen is missing
        self.xs = host.open_xenstore()
        host.open_grant_table().close()
        host.open_event_channel().close()
        raise_fd_limit()
        self.stats.xenstore_connected = True
        hub = gevent.get_hub()
        hub.threadpool.maxsize = cfg.backend.io_threads
        if os.environ.get("GBLK_FAULT_INJECTION") == "1":  # gblk.storage.fault
            log.warning("GBLK_FAULT_INJECTION=1: disks with params fault:PATH get injected "
                        "storage faults (a test setting; never on a production host)")
        # the control plane's blocking calls get threads of their own (and a deadline):
        # a store whose open hangs holds one of them, never one of the IO threads
        self.control_pool = ControlPool(cfg.backend.control_threads, cfg.backend.control_timeout)
        ctx = DeviceContext(
            host=host, xs=self.xs, pool=hub.threadpool, control=self.control_pool,
            config=cfg.backend, stats=self.stats,
            log_rate=self.log_rate, stop_timeout=cfg.daemon.stop_timeout,
            backend_domid=host.domid, journal_dir=_journal_dir(cfg),
            throttles=self.throttles, cbt=cfg.cbt, events=EventChannels(host.open_event_channel),
            grants=SharedGrantTable(host.open_grant_table), resize=ResizeWatcher(),
        )
        self.bus = Bus(ctx, cfg.daemon.kinds)
        predecessor = self._take_over() if self.takeover else None
        self.bus.start()
        # the disks first: after a restart their guests wait, so metrics and the
        # control socket (imports, binds) come once each disk found now is served
        self._settle(ctx.stop_timeout)
        if predecessor:  # its metrics port and control socket go with it
            log.info("takeover: disks served again %.1f ms after the handover began",
                     1000 * (time.monotonic() - self._handover_began))
            _wait_exit(predecessor, cfg.daemon.stop_timeout)
        if cfg.metrics.enabled:
            self._start_metrics(web)
        if cfg.control.enabled:
            self._start_control()
        self._greenlets.append(gevent.spawn(self._housekeeping))
        log.info("gblk %s serving %s on %s (domain %d)%s", __version__, ", ".join(cfg.daemon.kinds),
                 cfg.daemon.xen, host.domid,
                 f", metrics on {self.metrics_url()}" if self.metrics_url() else "")

    def _take_over(self) -> Optional[int]:
        """Ask the gblk answering on the control socket to release its disks (it
        answers once their rings are stopped, every consumed request answered); its
        pid, or None when no gblk runs there (then this is an ordinary start)."""
        from .control.client import request

        path = self.config.control.socket
        if not os.path.exists(path):
            log.warning("takeover: no gblk answers on %s; starting as usual", path)
            return None
        t0 = self._handover_began = time.monotonic()
        try:
            got = request(path, {"command": "handover"},
                          timeout=self.config.daemon.stop_timeout + 10)
        except GblkError as e:
            if "no gblk daemon answers" in str(e):
                log.warning("takeover: no gblk answers on %s; starting as usual", path)
                return None
            raise GblkError(f"takeover: {e}") from None
        pid = int(got.get("pid", 0)) if isinstance(got, dict) else 0
        log.info("takeover: gblk %d released %s disk(s) in %.0f ms", pid,
                 got.get("disks", "?") if isinstance(got, dict) else "?",
                 1000 * (time.monotonic() - t0))
        return pid or None

    def handover(self, pid: int) -> dict:
        """The control socket's ``handover``: release every disk (rings stopped, every
        consumed request answered, XenStore left as it is) for process ``pid``, make
        it systemd's main process, stop. Runs in the control connection's greenlet."""
        log.info("handover: releasing every disk to process %d", pid)
        n = 0
        if self.bus is not None:
            bus, self.bus = self.bus, None
            n = len(bus.devices)
            bus.stop(self.config.daemon.stop_timeout)
        if self.metrics is not None:
            m, self.metrics = self.metrics, None
            m.stop()
        self.handed_over = True
        if pid:
            self.notifier.notify(MAINPID=pid, STATUS=f"handed over to {pid}")
        self.request_stop()
        return {"pid": os.getpid(), "disks": n}

    def _settle(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until every disk the bus found has had its first
        look: taken over and serving, waiting for its frontend, or failed."""
        deadline = time.monotonic() + timeout
        bus = self.bus
        while bus is not None and time.monotonic() < deadline:
            if all(d.settled for d in list(bus.devices.values())):
                return
            gevent.sleep(0.002)

    def _start_metrics(self, web: Any) -> None:
        from .metrics.collector import make_registry
        from .metrics.exporter import MetricsServer
        from .metrics.health import stats_health

        self.metrics = MetricsServer(self.config.metrics.address, make_registry(self.stats),
                                     stats_health(self.stats), web=web)
        try:
            self.metrics.start()
        except GblkError as e:
            self.metrics_error = str(e)
            log.warning("%s; serving disks without metrics, retrying the bind", e)
            self._greenlets.append(gevent.spawn(self._retry_metrics))

    @staticmethod
    def _web_config(cfg: Config) -> Any:
        """The metrics endpoint's web configuration (TLS, basic auth), or None for
        plain HTTP. Raises ConfigError naming the file and the key."""
        if not cfg.metrics.web_config:
            return None
        from .metrics.webconfig import load_web_config

        return load_web_config(cfg.metrics.web_config)

    def _retry_metrics(self) -> None:
        tries = 0
        while self.metrics is not None and not self.metrics.running:
            gevent.sleep(METRICS_RETRY[min(tries, len(METRICS_RETRY) - 1)])
            tries += 1
            try:
                self.metrics.start()
            except GblkError as e:
                if str(e) != self.metrics_error:
                    log.warning("%s; still retrying", e)
                self.metrics_error = str(e)
                continue
            log.info("metrics: listening after %d retries", tries)
            self.metrics_error = None

    def _start_control(self) -> None:
        from .control.server import ControlServer
        from .device.commands import commands

        server = ControlServer(self.config.control.socket, self.disk_facts, self.status,
                               handover=self.handover,
                               commands=commands(self._devices, self.throttles,
                                                 os.path.dirname(self.config.control.socket)))
        try:
            server.start()
        except GblkError as e:
            self.control_error = str(e)
            log.error("%s; gblk list/stats will not work, disks are served", e)
            return
        self.control = server

    def _devices(self) -> dict:
        return self.bus.devices if self.bus is not None else {}

    def disk_facts(self) -> List[DiskFacts]:
        """What the control socket shows: each disk's plain stats, plus its image and
        page path (read from the device's public attributes, on the hub)."""
        out: List[DiskFacts] = []
        devices = list(self.bus.devices.values()) if self.bus is not None else []
        for dev in devices:
            dp = dev.dataplane
            out.append(DiskFacts(stats=dev.stats, image=getattr(dev.store, "path", None),
                                 page_path=dp.path if dp is not None else None,
                                 backend_path=dev.path,
                                 export=dev.export.where if dev.export is not None else None))
        return out

    def status(self) -> dict:
        """The daemon's own state, for the control socket's ``status``."""
        return {
            "version": __version__,
            "kinds": list(self.config.daemon.kinds),
            "xen": self.config.daemon.xen,
            "disks": len(self.bus.devices) if self.bus is not None else 0,
            "xenstore_connected": self.stats.xenstore_connected,
            "metrics": ("disabled" if not self.config.metrics.enabled else
                        self.metrics_url() if self.metrics_url()
                        else f"not listening: {self.metrics_error} (retrying)"),
            "started": self.stats.started,
            # live greenlets (a leak check for the scale test and `gblk status` readers);
            # not the dead ones still in reference cycles the collector has not reached
            # yet (a removed disk's, until the next collection: an idle daemon may not
            # run one for a long time)
            "greenlets": sum(1 for o in gc.get_objects()
                             if isinstance(o, gevent.Greenlet) and not o.dead),
        }

    def metrics_url(self) -> str:
        """``http(s)://HOST:PORT/metrics`` while listening, else ""."""
        if self.metrics is None or not self.metrics.running:
            return ""
        return f"{self.metrics.url}/metrics"

    def stop(self) -> None:
        """Drain in order: stop taking new devices, answer in-flight IO of every
        device, stop metrics, close XenStore. Idempotent."""
        for g in self._greenlets:
            g.kill(block=False)
        self._greenlets = []
        if self.control is not None:
            control, self.control = self.control, None
            control.stop()
        if self.bus is not None:
            bus, self.bus = self.bus, None
            bus.stop(self.config.daemon.stop_timeout)
            try:  # gevent's ThreadPool: tasks queued or running
                self.stuck_io = len(gevent.get_hub().threadpool)
            except TypeError:
                self.stuck_io = 0
        if self.control_pool is not None:
            pool, self.control_pool = self.control_pool, None
            self.stuck_calls = pool.close()
        if self.metrics is not None:
            m, self.metrics = self.metrics, None
            m.stop()
        if self.xs is not None:
            xs, self.xs = self.xs, None
            xs.close()
        if self.host is not None:
            self.host.close()

    def request_stop(self) -> None:
        self._stop.set()

    def request_upgrade(self) -> None:
        """SIGUSR2: start the installed gblk as ``serve --takeover`` with this process'
        arguments, as a child (so under systemd it is in the unit's cgroup); it asks
        for the disks over the control socket (``handover``), and this process then
        makes it systemd's main process and exits."""
        gevent.spawn(self._spawn_successor)

    def _spawn_successor(self) -> None:
        import subprocess

        argv = [sys.executable, "-m", "gblk", *sys.argv[1:]]
        if "--takeover" not in argv:
            argv.append("--takeover")
        log.info("SIGUSR2: starting a successor to hand the disks over to: %s", " ".join(argv))
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        except OSError as e:
            log.error("cannot start a successor: %s; serving on", e)
            return
        while not self.handed_over and child.poll() is None:
            gevent.sleep(0.1)
        if not self.handed_over:
            log.error("the successor exited with %s before taking over; serving on",
                      child.returncode)

    def request_reload(self) -> None:
        self._hup = True
        self._stop.set()  # wake the main greenlet; it tells the two apart

    # -- what runs -----------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT. Returns the exit code."""
        handlers = [
            gevent.signal_handler(signal.SIGTERM, self.request_stop),
            gevent.signal_handler(signal.SIGINT, self.request_stop),
            gevent.signal_handler(signal.SIGHUP, self.request_reload),
            gevent.signal_handler(signal.SIGUSR2, self.request_upgrade),
        ]
        try:
            try:
                self.start()
            except BaseException:
                self.stop()
                raise
            n = len(self.bus.devices) if self.bus else 0
            self.notifier.ready(status=f"serving {n} device(s)")
            interval = watchdog_interval() if self.config.daemon.watchdog else None
            if interval:
                self._greenlets.append(gevent.spawn(self._watchdog, interval))
            while True:
                self._stop.wait()
                if self._hup:
                    self._hup = False
                    self._stop.clear()
                    self._reload()
                    continue
                break
            if self.handed_over:
                log.info("stopping: the disks were handed over")
            else:
                log.info("stopping: answering in-flight requests (at most %.0fs)",
                         self.config.daemon.stop_timeout)
                self.notifier.stopping(status="stopping")
            self.stop()
            log.info("stopped")
            return 0
        finally:
            for h in handlers:
                h.cancel()
            self.notifier.close()

    def _watchdog(self, interval: float) -> None:
        # pinged from the event loop itself: a blocked loop stops the pings
        while True:
            self.notifier.watchdog()
            gevent.sleep(interval / 2)

    def _housekeeping(self) -> None:
        last = ""
        while True:
            xs = self.xs
            if xs is not None:
                self.stats.xenstore_connections = int(getattr(xs, "connections", 1))
                self.stats.xenstore_connected = bool(getattr(xs, "connected", True))
            n = len(self.bus.devices) if self.bus else 0
            text = f"serving {n} device(s)" + (
                f"; metrics not listening ({self.metrics_error}), retrying"
                if self.metrics_error else "")
            if text != last:
                self.notifier.status(text)
                last = text
            gevent.sleep(1.0)

    def _reload(self) -> None:
        self.notifier.reloading(status="reloading configuration")
        try:
            new = self.config.reload()
            # the web configuration file is read again whether its name changed or not
            # (renewed certificates, new users); a bad one fails the whole reload
            web = self._web_config(new) if self.metrics is not None else None
        except GblkError as e:
            log.error("configuration not reloaded: %s", e)
            self.notifier.ready(status="reload failed; old configuration kept")
            return
        web_changed = self.metrics is not None and _fingerprint(web) != _fingerprint(self.metrics.web)
        if web_changed:
            self.metrics.set_web_config(web)
        applied, not_applied = self.config.reload_diff(new)
        self.config = self.config.with_live_changes(new)
        cfg = self.config
        if "daemon.log_level" in applied:
            set_level(cfg.daemon.log_level)
        self.log_rate.per_minute = cfg.backend.guest_log_rate
        limits_changed = new.limits != self.throttles.rules
        self.throttles.reload(cfg.limits)  # gblk ctl limit changes end here too
        if limits_changed:
            applied.append("IO limits ([[limit]], [limit_groups])")
        if self.bus is not None:
            self.bus.ctx.config = cfg.backend
            if "backend.max_persistent_grants" in applied:
                for d in self.bus.devices.values():
                    d.set_persistent_limit(cfg.backend.max_persistent_grants)
        if applied:
            log.info("reloaded: applied %s", ", ".join(applied))
        if not_applied:
            log.warning("not applied (restart gblk to change): %s", ", ".join(not_applied))
        if not applied and not not_applied and not web_changed:
            log.info("reloaded: nothing changed")
        self.notifier.ready(status="serving")


def _wait_exit(pid: int, timeout: float) -> None:
    """Wait (at most ``timeout``) for process ``pid`` to end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        gevent.sleep(0.01)
    log.warning("takeover: process %d still runs after %.0fs", pid, timeout)


def _arm_crashpoints(cfg: Config) -> None:
    """The test-only kill hook (gblk.engine.crashpoints): on the simulated host only."""
    spec = os.environ.get(crashpoints.ENV)
    if not spec:
        return
    if cfg.daemon.sim_dir is None:
        raise ConfigError(f"{crashpoints.ENV} is set: a test hook that kills gblk on purpose; "
                          "refusing to serve a real Xen host with it (unset it)")
    try:
        crashpoints.arm(crashpoints.parse(spec))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    log.warning("test hook %s=%s armed: this process kills itself on purpose",
                crashpoints.ENV, spec)


def _journal_dir(cfg: Config) -> Optional[str]:
    """``rings/`` beside the control socket (``/run/gblk/rings``): the ring journals
    (gblk.engine.journal). None, with a warning, when it cannot be made."""
    path = os.path.join(os.path.dirname(cfg.control.socket), "rings")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        log.warning("no ring journals in %s (%s): a gblk killed while publishing responses "
                    "stalls those rings until the guest reconnects", path, e.strerror or e)
        return None
    return path


def _fingerprint(web: Any) -> bytes:
    return b"" if web is None else bytes(web.fingerprint)


def serve(config: Config, debug: bool = False, takeover: bool = False) -> int:
    """``gblk serve``: run the daemon until SIGTERM/SIGINT.

    A control call abandoned at its deadline (an open that never returns) still holds
    a thread when the daemon has stopped. Interpreter shutdown with such a thread can
    crash (SIGSEGV seen on CPython 3.9 and Debian 12's 3.11 with gevent 22.10), so then
    the process ends with ``os._exit`` once everything else is closed and the logs are
    flushed: nothing is left to finalize but that thread. The same for guest IO abandoned
    after ``stop_timeout`` (a store that never answers): its thread still holds guest pages."""
    daemon = Daemon(config, takeover=takeover)
    rc = daemon.run()
    if daemon.stuck_calls or daemon.stuck_io:
        if daemon.stuck_calls:
            log.warning("exiting with %d control call(s) still stuck (abandoned at their "
                        "deadline)", daemon.stuck_calls)
        if daemon.stuck_io:
            log.warning("exiting with %d IO job(s) still stuck (their requests abandoned "
                        "after stop_timeout)", daemon.stuck_io)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc
