"""``gblk demo``: a simulated Xen host, the gblk daemon and guests doing verified IO.

Starts a ``gblk.sim.harness.host.SimHost`` (the simulated xenstored as a subprocess), the
daemon as a subprocess (``gblk serve --xen sim:DIR --metrics-address ...
--control-socket DIR/control.sock``), N guests each with one disk (a sparse 256 MiB
scratch image, or ``--image``), and runs ``gblk.sim.guest.workload`` on them for
``--seconds``: reads, writes, flushes, barriers, discards and large INDIRECT
requests, every byte read back checked. Shows live progress (one updating line on a
terminal, plain periodic lines otherwise), the metrics URL, the ``gblk list``
command for this daemon and a summary; with ``--json`` the last line of stdout is
one JSON object (requests, bytes, errors, mismatches, violations, iops, mib_per_s,
``guests``: each guest's disk, iops and mib_per_s, ...). ``--limit-iops N`` limits
the first guest to N IOPS through the control socket (``gblk ctl limit``), to show
a throttled guest beside unthrottled ones. Exit status 0 only if no request failed, nothing mismatched and the backend
broke no protocol rule.

A demo never destroys data: ``--image PATH`` serves a scratch copy of PATH (a
reflink where the file system can, else a sparse copy) in the host's scratch
directory, removed at the end; only ``--writable`` serves PATH itself.

Every way out is clean: Ctrl-C, SIGTERM and SIGHUP unplug the disks, stop the
daemon and xenstored, remove the scratch directory and exit 130 with no traceback
(the children run in a process group of their own, so the terminal's signals reach
only the demo, and die with it should it be SIGKILLed). A daemon that exits early
(say it cannot serve the image) fails the demo at once with its reason.

An entry point (like the cli): it monkey-patches gevent if nobody did yet. Only
talks to the daemon through the simulated host (XenStore, rings) and its control
socket, never imports it.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Union

log = logging.getLogger("gblk.demo")

MiB = 1 << 20
SCRATCH_SIZE = 256 * MiB
CONNECT_TIMEOUT = 60.0
DETACH_TIMEOUT = 10.0
EXIT_INTERRUPTED = 130
#: how often the waits check for an interrupt or a dead daemon (not a deadline)
POLL = 0.2
COPY_CHUNK = 4 * MiB
_FICLONE = 0x40049409  # linux/fs.h: reflink the whole file


class _Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP arrived: stop what is being done, tear down."""


def copy_image(src: str, dst: str, cancelled: Callable[[], bool] = lambda: False) -> str:
    """Copy ``src`` to a new file ``dst``: a reflink where the file system can (instant,
    shares blocks until written), else a sparse copy (holes stay holes). Blocking:
    meant for a worker thread; ``cancelled()`` is asked between chunks. Returns how
    it copied ("reflink" or "copy"). Raises OSError (``dst`` removed)."""
    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fout:
                try:
                    fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
                    return "reflink"
                except OSError:
                    pass
                size = os.fstat(fin.fileno()).st_size
                pos = 0
                while pos < size:
                    if cancelled():
                        raise _Interrupted()
                    try:
                        data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
                    except OSError as e:
                        if e.errno != errno.ENXIO:  # ENXIO: only a hole is left
                            raise
                        break
                    hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
                    off = data
                    while off < hole:
                        if cancelled():
                            raise _Interrupted()
                        chunk = os.pread(fin.fileno(), min(COPY_CHUNK, hole - off), off)
                        if not chunk:
                            break
                        if chunk.count(0) != len(chunk):  # all zeros: leave a hole
                            os.pwrite(fout.fileno(), chunk, off)
                        off += len(chunk)
                    pos = hole
                fout.truncate(size)
                return "copy"
        except BaseException:
            try:
                os.unlink(dst)
            except OSError:
                pass
            raise


class _Out:
    """stdout that survives a vanished terminal: after SIGHUP a write can fail with
    EIO (or EPIPE); then the demo stays quiet and carries on shutting down."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.dead = False
        try:
            self.tty = out.isatty()
        except (OSError, ValueError):
            self.tty = False

    def write(self, text: str) -> None:
        if self.dead:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            self.dead = True

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


def check_listen(address: str) -> Optional[str]:
    """None if ``HOST:PORT`` can be listened on here, else why not (one line). Done
    before anything starts, so that a bad ``--metrics-address`` fails at once."""
    host, _, port_s = address.strip().rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port_s), 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        family, socktype, proto, _, sockaddr = infos[0]
        s = socket.socket(family, socktype, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
        finally:
            s.close()
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
        if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
            why = "already in use"
        return f"--metrics-address {address}: cannot listen: {why}"
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gblk demo",
        description="Start a simulated Xen host, the gblk daemon and guests that run a "
        "mixed, verified workload; show progress and a summary.")
    p.add_argument("--guests", type=int, default=1, metavar="N", help="number of guests (default 1)")
    p.add_argument("--seconds", type=float, default=20.0, metavar="S",
                   help="workload duration (default 20)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary as the last line of stdout")
    p.add_argument("--image", metavar="PATH", default=None,
                   help="serve a scratch copy of this image instead of an empty one (PATH "
                   "itself is never written unless --writable)")
    p.add_argument("--writable", action="store_true", default=False,
                   help="with --image: serve PATH itself; the demo's workload WRITES to it")
    p.add_argument("--format", metavar="FMT", default=None, help="format of --image (default raw)")
    p.add_argument("--metrics-address", metavar="HOST:PORT", default=None,
                   help="serve Prometheus metrics here (default: a free loopback port)")
    p.add_argument("--kill-daemon-every", type=float, default=None, metavar="SECONDS",
                   help="SIGKILL the daemon at a random moment of every SECONDS and start it "
                   "again while the workload runs (the guests must not notice but a pause)")
    p.add_argument("--limit-iops", type=int, default=None, metavar="N",
                   help="limit the first guest to N IOPS (gblk ctl limit), the others run free")
    p.add_argument("--debug", action="store_true", default=False, help="debug logging")
    return p


def _free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
    finally:
        s.close()


def _url(address: str) -> str:
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "[::1]"
    return f"http://{host}:{port}/metrics"


class _Progress:
    """One updating line on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.tty = out.isatty()
        self.interval = 0.5 if self.tty else 2.0
        self._last = (0.0, 0, 0)
        self._open = False

    def show(self, elapsed: float, stats: Any, final: bool = False) -> None:
        """IOPS and MiB/s since the last line (over the whole run when ``final``)."""
        t0, r0, b0 = (0.0, 0, 0) if final else self._last
        dt = max(elapsed - t0, 1e-6)
        iops = (stats.requests - r0) / dt
        mibs = (stats.bytes - b0) / dt / MiB
        self._last = (elapsed, stats.requests, stats.bytes)
        line = (f"[{elapsed:6.1f}s] {iops:9.0f} IOPS {mibs:9.2f} MiB/s  "
                f"requests {stats.requests}  errors {stats.errors}  "
                f"mismatches {stats.mismatches}")
        if self.tty:
            self.out.write("\r\x1b[K" + line)
            self._open = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def end(self) -> None:
        if self._open:
            self.out.write("\n")
            self.out.flush()
            self._open = False


class Demo:
    def __init__(self, args: argparse.Namespace, out: TextIO = sys.stdout) -> None:
        self.args = args
        self.out = _Out(out)
        self.interrupted = False
        self.failure: Optional[str] = None
        self.host: Any = None
        self.workload: Any = None
        self.guests: List[Any] = []
        self._forcing = False
        self._main: Any = None
        self.restarter: Any = None

    def say(self, text: str) -> None:
        self.out.write(text + "\n")

    def _interrupt(self) -> None:
        """The signal handler (runs in a greenlet of its own): never raises there,
        where gevent would print the traceback; the main greenlet does the work."""
        if not self.interrupted:
            self.interrupted = True
            self.say("\ninterrupted: shutting down cleanly (Ctrl-C again to force)")
            if self.workload is not None:
                _spawn_quiet(self.workload.stop)
        elif not self._forcing and self._main is not None:
            # a second one: leave what is being waited for now, still tearing down
            self._forcing = True
            import gevent

            gevent.get_hub().loop.run_callback(self._main.throw, KeyboardInterrupt)

    def _check(self) -> None:
        if self.interrupted:
            raise _Interrupted()

    def run(self) -> int:
        import gevent

        self._main = gevent.getcurrent()
        handlers = [gevent.signal_handler(sig, self._interrupt)
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
        summary: Dict[str, Any] = {}
        backend_rc: Optional[int] = None
        try:
            try:
                summary = self._run()
            except (KeyboardInterrupt, _Interrupted):
                self.interrupted = True
            except Exception as e:  # noqa: BLE001 - reported, then a clean shutdown
                log.debug("demo failed", exc_info=True)
                self.failure = self.failure or f"{type(e).__name__}: {e}"
            finally:
                backend_rc = self._shutdown()
        except KeyboardInterrupt:  # a second Ctrl-C during the shutdown: it still finished
            self.interrupted = True
        finally:
            for h in handlers:
                h.cancel()
        if summary:
            summary["backend_exit"] = backend_rc
        if self.failure:
            self.say(f"gblk demo: FAILED: {self.failure}")
            self._backend_tail()
        ok = bool(summary) and summary.get("ok", False) and not self.failure
        if summary:
            summary["ok"] = bool(ok and not self.interrupted)
            summary["interrupted"] = self.interrupted
            self._print_summary(summary)
        elif self.args.json:
            self.say(json.dumps({"ok": False, "requests": 0, "bytes": 0, "errors": 0,
                                 "mismatches": 0, "iops": 0.0, "mib_per_s": 0.0,
                                 "interrupted": self.interrupted,
                                 "error": self.failure or "interrupted"}))
        if self.interrupted:
            return EXIT_INTERRUPTED
        return 0 if ok else 1

    # ------------------------------------------------------------------------------
    def _wait_all(self, jobs: List[Any], backend: Any) -> None:
        """Wait for ``jobs``, but not past an interrupt or the daemon's exit."""
        import gevent

        while not all(j.ready() for j in jobs):
            gevent.joinall(jobs, timeout=POLL)
            if self.interrupted:
                gevent.killall(jobs, block=False)
                raise _Interrupted()
            if not backend.alive():
                gevent.killall(jobs, block=True, timeout=5)
                self.failure = f"the daemon exited with {backend.proc.returncode}"
                raise RuntimeError(self.failure)

    def _image(self, host: Any) -> str:
        """The image every guest serves with --image: PATH itself with --writable,
        else a scratch copy of it in the host's directory."""
        args = self.args
        path = os.path.abspath(args.image)
        if not os.path.isfile(path) and not os.path.exists(path):
            self.failure = f"--image {args.image}: no such file"
            raise RuntimeError(self.failure)
        if args.writable:
            self.say(f"serving {path} itself (--writable): the workload writes to it")
            return path
        if not os.path.isfile(path):
            self.failure = (f"--image {args.image}: not a regular file; a block device is "
                            "served only with --writable")
            raise RuntimeError(self.failure)
        import gevent

        dst = os.path.join(host.dir, "image-copy" + os.path.splitext(path)[1])
        pool = gevent.get_hub().threadpool
        try:
            how = pool.apply(copy_image, (path, dst, lambda: self.interrupted))
        except _Interrupted:
            raise
        except OSError as e:
            self.failure = (f"--image {args.image}: cannot make a scratch copy in {host.dir}: "
                            f"{e.strerror or e}; use --writable to serve the file itself")
            raise RuntimeError(self.failure) from None
        self._check()
        self.say(f"serving a scratch copy of {path} ({how}; {path} is not written; "
                 "--writable serves it itself)")
        return dst

    def _run(self) -> Dict[str, Any]:
        import gevent

        from gblk.sim.guest.frontend import FrontendOptions
        from gblk.sim.harness.host import SimHost
        from gblk.sim.guest.workload import Workload, WorkloadConfig

        args = self.args
        nguests = max(1, int(args.guests))
        address = args.metrics_address or f"127.0.0.1:{_free_port()}"
        self.host = host = SimHost(keep=bool(args.debug), isolate=True)
        host.start()
        self._check()
        self.say(f"gblk demo: simulated Xen host in {host.dir}")
        image: Optional[str] = self._image(host) if args.image else None
        control = host.control_socket
        backend_args = (["--kinds", "qdisk", "--metrics-address", address,
                         "--control-socket", control]
                        + (["--log-level", "debug"] if args.debug else []))
        backend = host.start_backend(backend_args)
        self.say(f"metrics: {_url(address)}")
        self.say(f"disks: gblk list --control-socket {control}")

        fmt = args.format or "raw"
        for i in range(nguests):
            scratch = image is None
            path = image if image is not None else host.make_image(f"guest{i + 1}.img",
                                                                   SCRATCH_SIZE)
            g = host.create_guest(image=path, connect=False, format=fmt,
                                  options=FrontendOptions(initial_zero=scratch))
            self.guests.append(g)

        def connect(fe: Any) -> Optional[BaseException]:
            try:
                fe.connect(CONNECT_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - reported below
                return e
            return None

        jobs = [gevent.spawn(connect, g.frontend) for g in self.guests]
        self._wait_all(jobs, backend)
        for g, job in zip(self.guests, jobs):
            if job.value is not None:
                alive = "" if backend.alive() else f" (the daemon exited with {backend.proc.returncode})"
                self.failure = f"guest d{g.domid} could not connect{alive}: {job.value}"
                raise RuntimeError(self.failure)
        for g in self.guests:
            fe = g.frontend
            d = fe.disk
            feats = [f for f, on in (("flush", d.flush), ("barrier", d.barrier),
                                     ("discard", d.discard), ("secure discard", d.discard_secure))
                     if on]
            self.say(f"guest d{g.domid}: {g.disk.backend_nodes.get('dev', g.disk.devid)} "
                     f"{d.sectors * 512 / MiB:.0f} MiB ({g.disk.kind}, {fmt}); ring order "
                     f"{fe.ring_page_order}, {len(fe.queues)} queue(s), indirect "
                     f"{fe.max_indirect_segments or 'off'}, persistent grants "
                     f"{'on' if fe.persistent else 'off'}, {fe.abi.name}; "
                     f"{', '.join(feats) or 'no flush/discard'}")
        self._check()

        limit = getattr(args, "limit_iops", None)
        if limit:
            from gblk.control.client import request

            first = self.guests[0]
            request(control, {"command": "limit", "disk": f"d{first.domid}/{first.disk.devid}",
                              "set": {"iops_total": int(limit)}})
            self.say(f"guest d{first.domid}: limited to {limit} IOPS "
                     f"(gblk ctl limit d{first.domid}/{first.disk.devid} --iops-total {limit})")
        regions = None
        if image is not None and nguests > 1:  # one image shared: each guest its own slice
            total = self.guests[0].frontend.disk.sectors
            step = total // nguests // 8 * 8
            regions = [(i * step, (i + 1) * step) for i in range(nguests)]
        cfg = WorkloadConfig(seconds=float(args.seconds), regions=regions)
        self.workload = wl = Workload([g.frontend for g in self.guests], cfg)
        self.say(f"running a mixed verified workload for {args.seconds:g}s "
                 f"({cfg.depth} in flight per guest, seed {wl.seed})")
        progress = _Progress(self.out)
        wl.start()
        every = args.kill_daemon_every
        if every:
            from gblk.sim.harness.restarts import Restarter

            self.restarter = Restarter(host, backend_args, float(every),
                                       lambda: wl.stats.requests, seed=wl.seed)
            self.say(f"killing the daemon (SIGKILL) at a random moment of every {every:g}s "
                     "and starting it again")
            self.restarter.start()
        try:
            while not wl.wait(timeout=progress.interval):
                progress.show(wl.elapsed(), wl.stats)
                backend = host.backend or backend
                if self.restarter is not None and self.restarter.failure:
                    self.failure = self.restarter.failure
                    wl.stop(timeout=5)
                    break
                if self.restarter is None and not backend.alive():
                    self.failure = f"the daemon exited with {backend.proc.returncode} mid-run"
                    wl.stop(timeout=5)
                    break
                if self.interrupted:
                    wl.stop()
                    break
            if self.restarter is not None:
                self.restarter.stop()
            progress.show(wl.stats.elapsed or wl.elapsed(), wl.stats, final=True)
        finally:
            progress.end()
        stats = wl.stats
        summary = stats.as_dict()
        guests = [dict(disk=f"d{g.domid}/{g.disk.devid}", limit_iops=limit if i == 0 else None,
                       **per) for i, (g, per) in enumerate(zip(self.guests, wl.per_frontend()))]
        summary.update(guests=guests, metrics_url=_url(address), seed=wl.seed,
                       ok=stats.ok, frontend={
                           "lost": sum(g.frontend.stats.lost for g in self.guests),
                           "grants_busy_after_response": sum(
                               g.frontend.stats.grants_busy_after_response for g in self.guests),
                           "canary_violations": sum(
                               g.frontend.stats.canary_violations for g in self.guests),
                           "violations": _merge([g.frontend.stats.violations for g in self.guests]),
                       })
        if any(g.frontend.stats.canary_violations for g in self.guests):
            summary["ok"] = False
        if self.restarter is not None:
            summary.update(self.restarter.summary())
            if self.restarter.failure:
                summary["ok"] = False
        return summary

    def _shutdown(self) -> Optional[int]:
        """Unplug every disk (the frontends close), SIGTERM the daemon, stop the host
        and remove its directory. Also after a half-finished start; never raises but
        a second Ctrl-C's KeyboardInterrupt, and even then the host is stopped."""
        import gevent

        rc: Optional[int] = None
        host = self.host
        if host is None:
            return rc
        try:
            if self.restarter is not None:
                self.restarter.stop()
            if self.workload is not None and self.workload.running:
                self.workload.stop(timeout=10)
            if host.running and host.backend is not None and host.backend.alive():
                jobs = [_spawn_quiet(host.toolstack.detach_disk, g.domid, g.disk.devid,
                                     DETACH_TIMEOUT) for g in self.guests]
                gevent.joinall(jobs, timeout=DETACH_TIMEOUT + 5)
            for g in self.guests:
                try:
                    g.frontend.stop()
                except Exception as e:  # noqa: BLE001 - keep tearing down
                    log.debug("stopping the frontend of d%d: %s", g.domid, e)
            if host.backend is not None:
                rc = host.backend.stop(timeout=30)
        except Exception as e:  # noqa: BLE001 - keep tearing down
            log.debug("demo shutdown: %s", e, exc_info=True)
        finally:
            if self.failure and host.backend is not None:
                self._backend_tail()
                self._tail_printed = True
            host.stop()
        return rc

    _tail_printed = False

    def _backend_tail(self) -> None:
        if self._tail_printed or self.host is None or self.host.backend is None:
            return
        self._tail_printed = True
        text = self.host.backend.log_text().strip()
        if text:
            lines = text.splitlines()[-25:]
            try:
                sys.stderr.write("--- gblk serve (last lines) ---\n" + "\n".join(lines) + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def _print_summary(self, s: Dict[str, Any]) -> None:
        self.say(
            f"summary: {s['requests']} requests ({s['ring_requests']} ring requests), "
            f"{s['bytes'] / MiB:.1f} MiB in {s['seconds']:.1f}s: {s['iops']:.0f} IOPS, "
            f"{s['mib_per_s']:.2f} MiB/s; latency avg {s['latency_avg_ms']:.2f} ms, "
            f"max {s['latency_max_ms']:.1f} ms")
        self.say(f"errors {s['errors']}, mismatches {s['mismatches']}, protocol violations "
                 f"{s['violations']}: {'OK' if s['ok'] else 'FAILED'}")
        if self.args.json:
            self.say(json.dumps(s, sort_keys=True))


def _spawn_quiet(fn: Callable[..., Any], *args: Any) -> Any:
    """A greenlet whose failure is logged at debug level, not printed by gevent as a
    traceback (teardown work: the XenStore link may be going down under it)."""
    import gevent

    def run() -> Any:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - teardown goes on
            log.debug("%s: %s", getattr(fn, "__name__", fn), e, exc_info=True)
            return None

    return gevent.spawn(run)


def _merge(dicts: Sequence[Dict[str, int]]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def main(argv: Union[None, Sequence[str], argparse.Namespace] = None) -> int:
    """``gblk demo [--guests N] [--seconds S] [--json] [--image PATH [--writable]]
    [--format FMT] [--metrics-address HOST:PORT] [--kill-daemon-every SECONDS]``. Accepts argv or the cli's parsed Namespace."""
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
    for name, default in (("guests", 1), ("seconds", 20.0), ("json", False), ("image", None),
                          ("writable", False), ("format", None), ("metrics_address", None),
                          ("debug", False), ("kill_daemon_every", None),
                          ("limit_iops", None)):
        if not hasattr(args, name):
            setattr(args, name, default)
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all(queue=False)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                            format="gblk demo: %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
    started = time.monotonic()
    rc = Demo(args).run()
    log.debug("demo finished in %.1fs with %d", time.monotonic() - started, rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
