"""``gblk demo``: a simulated Xen host, the gblk daemon and guests doing verified IO.

Starts a ``gblk.sim.host.SimHost`` (the simulated xenstored as a subprocess), the
daemon as a subprocess (``gblk serve --xen sim:DIR --metrics-address ...``), N
guests each with one disk (a sparse 256 MiB scratch image, or ``--image``), and runs
``gblk.sim.workload`` on them for ``--seconds``: reads, writes, flushes, barriers,
discards and large INDIRECT requests, every byte read back checked. Shows live
progress (one updating line on a terminal, plain periodic lines otherwise), the
metrics URL and a summary; with ``--json`` the last line of stdout is one JSON
object (requests, bytes, errors, mismatches, violations, iops, mib_per_s, ...).
Shuts down cleanly also on Ctrl-C: unplug the disks, SIGTERM the daemon, stop
xenstored. Exit status 0 only if no request failed, nothing mismatched and the
backend broke no protocol rule.

An entry point (like the cli): it monkey-patches gevent if nobody did yet. Only
talks to the daemon through the simulated host (XenStore, rings), never imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO, Union

log = logging.getLogger("gblk.demo")

MiB = 1 << 20
SCRATCH_SIZE = 256 * MiB
CONNECT_TIMEOUT = 60.0
DETACH_TIMEOUT = 10.0
EXIT_INTERRUPTED = 130


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
                   help="serve this image instead of a scratch one (the demo WRITES to it)")
    p.add_argument("--format", metavar="FMT", default=None, help="format of --image (default raw)")
    p.add_argument("--metrics-address", metavar="HOST:PORT", default=None,
                   help="serve Prometheus metrics here (default: a free loopback port)")
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

    def __init__(self, out: TextIO) -> None:
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
        self.out = out
        self.interrupted = False
        self.failure: Optional[str] = None
        self.host: Any = None
        self.workload: Any = None
        self.guests: List[Any] = []

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _interrupt(self) -> None:
        if not self.interrupted:
            self.interrupted = True
            self.say("\ninterrupted: shutting down cleanly (Ctrl-C again to force)")
            if self.workload is not None:
                import gevent

                gevent.spawn(self.workload.stop)
        else:  # second Ctrl-C: leave now, still tearing the host down
            raise KeyboardInterrupt

    def run(self) -> int:
        import gevent

        handlers = [gevent.signal_handler(sig, self._interrupt)
                    for sig in (signal.SIGINT, signal.SIGTERM)]
        summary: Dict[str, Any] = {}
        try:
            summary = self._run()
        except KeyboardInterrupt:
            self.interrupted = True
        except Exception as e:  # noqa: BLE001 - reported, then a clean shutdown
            log.debug("demo failed", exc_info=True)
            self.failure = self.failure or f"{type(e).__name__}: {e}"
        finally:
            try:
                backend_rc = self._shutdown()
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
                                 "error": self.failure or "interrupted"}))
        if self.interrupted:
            return EXIT_INTERRUPTED
        return 0 if ok else 1

    # ------------------------------------------------------------------------------
    def _run(self) -> Dict[str, Any]:
        import gevent

        from gblk.sim.frontend import FrontendOptions
        from gblk.sim.host import SimHost
        from gblk.sim.workload import Workload, WorkloadConfig

        args = self.args
        nguests = max(1, int(args.guests))
        address = args.metrics_address or f"127.0.0.1:{_free_port()}"
        self.host = host = SimHost(keep=bool(args.debug))
        host.start()
        self.say(f"gblk demo: simulated Xen host in {host.dir}")
        backend = host.start_backend(["--kinds", "qdisk", "--metrics-address", address]
                                     + (["--log-level", "debug"] if args.debug else []))
        self.say(f"metrics: {_url(address)}")

        fmt = args.format or "raw"
        specs = []
        for i in range(nguests):
            if args.image:
                image, scratch = os.path.abspath(args.image), False
            else:
                image, scratch = host.make_image(f"guest{i + 1}.img", SCRATCH_SIZE), True
            specs.append((image, scratch))
        for image, scratch in specs:
            g = host.create_guest(image=image, connect=False, format=fmt,
                                  options=FrontendOptions(initial_zero=scratch))
            self.guests.append(g)
        def connect(fe: Any) -> Optional[BaseException]:
            try:
                fe.connect(CONNECT_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - reported below
                return e
            return None

        jobs = [gevent.spawn(connect, g.frontend) for g in self.guests]
        gevent.joinall(jobs)
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

        regions = None
        if args.image and nguests > 1:  # one image shared: each guest its own slice
            total = self.guests[0].frontend.disk.sectors
            step = total // nguests // 8 * 8
            regions = [(i * step, (i + 1) * step) for i in range(nguests)]
        cfg = WorkloadConfig(seconds=float(args.seconds), regions=regions)
        self.workload = wl = Workload([g.frontend for g in self.guests], cfg)
        self.say(f"running a mixed verified workload for {args.seconds:g}s "
                 f"({cfg.depth} in flight per guest, seed {wl.seed})")
        progress = _Progress(self.out)
        wl.start()
        try:
            while not wl.wait(timeout=progress.interval):
                progress.show(wl.elapsed(), wl.stats)
                if not backend.alive():
                    self.failure = f"the daemon exited with {backend.proc.returncode} mid-run"
                    wl.stop(timeout=5)
                    break
                if self.interrupted:
                    wl.stop()
                    break
            progress.show(wl.stats.elapsed or wl.elapsed(), wl.stats, final=True)
        finally:
            progress.end()
        stats = wl.stats
        summary = stats.as_dict()
        summary.update(guests=nguests, metrics_url=_url(address), seed=wl.seed,
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
        return summary

    def _shutdown(self) -> Optional[int]:
        """Unplug every disk (the frontends close), SIGTERM the daemon, stop the host."""
        import gevent

        rc: Optional[int] = None
        host = self.host
        if host is None:
            return rc
        try:
            if self.workload is not None and self.workload.running:
                self.workload.stop(timeout=10)
            if host.running and host.backend is not None and host.backend.alive():
                jobs = [gevent.spawn(host.toolstack.detach_disk, g.domid, g.disk.devid,
                                     DETACH_TIMEOUT) for g in self.guests]
                gevent.joinall(jobs, timeout=DETACH_TIMEOUT + 5)
            for g in self.guests:
                g.frontend.stop()
            if host.backend is not None:
                rc = host.backend.stop(timeout=30)
        except Exception as e:  # noqa: BLE001 - keep tearing down
            log.warning("demo shutdown: %s", e)
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
            sys.stderr.write("--- gblk serve (last lines) ---\n" + "\n".join(lines) + "\n")

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


def _merge(dicts: Sequence[Dict[str, int]]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def main(argv: Union[None, Sequence[str], argparse.Namespace] = None) -> int:
    """``gblk demo [--guests N] [--seconds S] [--json] [--image PATH] [--format FMT]
    [--metrics-address HOST:PORT]``. Accepts argv or the cli's parsed Namespace."""
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
    for name, default in (("guests", 1), ("seconds", 20.0), ("json", False), ("image", None),
                          ("format", None), ("metrics_address", None), ("debug", False)):
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
