"""The ``gblk`` command: argument parsing, configuration, logging and exit codes.

Subcommands:

- ``gblk serve``: the daemon (``gblk.daemon.serve``) on real Xen or a simulated host;
- ``gblk demo``: a simulated host, the daemon and guests doing verified IO (``gblk.demo``);
- ``gblk sim COMPONENT ...``: one piece of the simulated host, e.g.
  ``gblk sim xenstored --socket PATH`` (``gblk.sim.<component>.main(argv)``);
- ``gblk bench ...``: the benchmarks (``gblk.bench.main(argv)``);
- ``gblk config``: check the configuration and print it as gblk would use it;
- ``gblk hash-password``: a password hash for the metrics web configuration's
  ``[basic_auth_users]`` (the password from stdin or a prompt, never argv);
- ``gblk list``, ``gblk stats [DISK]``, ``gblk status``: ask the running daemon over
  its control socket (``gblk.control.client``; plain sockets, no gevent).

Exit codes: 0 success, 1 an expected failure (a :class:`gblk.errors.GblkError`, shown
as one line ``gblk: <message>``), 2 a configuration or usage error, 130 interrupted.
Tracebacks only with ``--debug``.

This is an entry point: it monkey-patches gevent (``patch_all(queue=False)``, before
the daemon's modules are imported) for the commands that run gevent code, and imports the heavy
layers lazily so ``gblk config`` and ``--help`` stay fast and Xen-free. It must not
contain daemon logic; it only chooses and calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import gblk
from gblk.errors import ConfigError, GblkError

#: subcommands that run gevent code
_GEVENT_COMMANDS = frozenset({"serve", "demo", "sim", "bench"})
#: subcommands whose arguments belong to the module they run
_PASS_THROUGH = frozenset({"sim", "bench"})


def _patch_gevent() -> None:
    """Monkey-patch before the daemon is imported (its threadpool and subprocesses).
    ``queue=False``: the standard queue module stays a thread queue."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        with _entry_points_once():
            monkey.patch_all(queue=False)


class _entry_points_once:
    """While gevent patches: ``importlib.metadata.entry_points`` computed once, not
    once per patched module (gevent looks for plugins ~23 times, each a read of every
    installed package's metadata: 0.3-1 s of a restart on a dom0 with many packages,
    the guests' disks paused meanwhile). Nothing is installed while it patches, so
    the answer is the same."""

    def __enter__(self) -> None:
        from importlib import metadata

        self._metadata = metadata
        self._orig = orig = metadata.entry_points
        cache: Dict[Any, Any] = {}

        def once(**params: Any) -> Any:
            key = tuple(sorted(params.items()))
            if key not in cache:
                cache[key] = orig(**params)
            return cache[key]

        metadata.entry_points = once

    def __exit__(self, *exc: object) -> None:
        self._metadata.entry_points = self._orig


def _kinds_arg(text: str) -> List[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _config_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``serve`` and ``config``: each overrides one configuration key."""
    group = parser.add_argument_group("configuration (flags override the file)")
    group.add_argument(
        "--config", metavar="PATH", default=None,
        help="TOML configuration file (default: /etc/gblk/gblk.toml if it exists)",
    )
    group.add_argument(
        "--xen", metavar="real|sim:DIR", default=None,
        help="host to serve: 'real' Xen or the simulated host in DIR (daemon.xen)",
    )
    group.add_argument(
        "--kinds", metavar="KIND[,KIND]", type=_kinds_arg, action="append", default=None,
        help="backend kinds to serve: qdisk, vbd, vbd3 (daemon.kinds; repeatable)",
    )
    group.add_argument(
        "--metrics-address", metavar="HOST:PORT", default=None,
        help="where to serve /metrics and /healthz (metrics.address)",
    )
    group.add_argument(
        "--web-config-file", metavar="PATH", default=None,
        help="TLS and basic auth for /metrics: a web configuration file (metrics.web_config)",
    )
    group.add_argument(
        "--no-metrics", action="store_true", default=False,
        help="do not serve metrics (metrics.enabled = false)",
    )
    group.add_argument(
        "--control-socket", metavar="PATH", default=None,
        help="the control socket of gblk list/stats (control.socket)",
    )
    group.add_argument(
        "--log-level", metavar="LEVEL", default=None,
        help="debug, info, warning or error (daemon.log_level)",
    )


def _overrides(args: argparse.Namespace) -> Dict[str, object]:
    kinds: Optional[List[str]] = None
    if args.kinds is not None:
        kinds = [k for group in args.kinds for k in group]
    return {
        "daemon.xen": args.xen,
        "daemon.kinds": kinds,
        "metrics.address": args.metrics_address,
        "metrics.enabled": False if args.no_metrics else None,
        "metrics.web_config": args.web_config_file,
        "control.socket": args.control_socket,
        "daemon.log_level": args.log_level,
    }


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=False,
        help="debug logging and full tracebacks on errors",
    )

    parser = argparse.ArgumentParser(
        prog="gblk",
        description="gblk: a userspace Xen paravirtual block backend.",
    )
    parser.add_argument("--version", action="version", version=f"gblk {gblk.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    serve = sub.add_parser(
        "serve", parents=[common], help="run the backend daemon",
        description="Serve Xen virtual disks until SIGTERM/SIGINT; SIGHUP re-reads the "
        "configuration.",
    )
    _config_flags(serve)
    serve.add_argument(
        "--takeover", action="store_true", default=False,
        help="start fully, then ask the gblk running on the control socket to hand its "
        "disks over (an upgrade that pauses guests for milliseconds); without one, start "
        "as usual")
    serve.set_defaults(func=_cmd_serve)

    demo = sub.add_parser(
        "demo", parents=[common], help="run a simulated host, gblk and guests doing verified IO",
        description="Start a simulated Xen host, the daemon and guests that run a mixed, "
        "verified workload; exit 0 only if nothing failed or mismatched.",
    )
    demo.add_argument("--guests", type=int, default=1, metavar="N", help="number of guests (default 1)")
    demo.add_argument("--seconds", type=float, default=20.0, metavar="S", help="workload duration (default 20)")
    demo.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    demo.add_argument(
        "--image", metavar="PATH", default=None,
        help="serve a scratch copy of this image (PATH itself is not written unless --writable)")
    demo.add_argument(
        "--writable", action="store_true", default=False,
        help="with --image: serve PATH itself; the workload WRITES to it, destroying its data")
    demo.add_argument("--format", metavar="FMT", default=None, help="format of --image (default raw)")
    demo.add_argument(
        "--metrics-address", metavar="HOST:PORT", default=None,
        help="serve Prometheus metrics here while the demo runs",
    )
    demo.add_argument(
        "--kill-daemon-every", type=float, default=None, metavar="SECONDS",
        help="SIGKILL the daemon at a random moment of every SECONDS and start it again "
        "while the workload runs; the summary gains restarts and the pauses")
    demo.add_argument("--limit-iops", type=int, default=None, metavar="N",
                      help="limit the first guest to N IOPS; the others run unlimited")
    demo.set_defaults(func=_cmd_demo)

    sim = sub.add_parser(
        "sim", parents=[common], help="run one component of the simulated host",
        description="Run gblk.sim.COMPONENT, e.g. 'gblk sim xenstored --socket PATH'.",
    )
    sim.add_argument("component", metavar="COMPONENT", help="e.g. xenstored, hypervisor.evtchn_bench")
    sim.add_argument("argv", nargs=argparse.REMAINDER, help="the component's own arguments")
    sim.set_defaults(func=_cmd_sim)

    # every argument but --debug goes to gblk.bench's own parser (its --help too)
    bench = sub.add_parser(
        "bench", parents=[common], add_help=False, help="run the benchmarks on the simulated host",
    )
    bench.set_defaults(func=_cmd_bench, argv=[])

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--control-socket", metavar="PATH", default=None,
        help="the daemon's control socket (default: control.socket of the configuration, "
        "/run/gblk/control.sock)")
    client.add_argument("--config", metavar="PATH", default=None,
                        help="configuration file to take control.socket from")
    client.add_argument("--json", action="store_true", help="print JSON")
    lst = sub.add_parser(
        "list", parents=[common, client], help="list the disks the running daemon serves",
        description="Every disk of the running gblk: domain/devid, kind, state, size, "
        "queues, page path (persistent, map, copy), requests in flight, image.")
    lst.set_defaults(func=_cmd_list)
    stats = sub.add_parser(
        "stats", parents=[common, client], help="show the counters of the running daemon's disks",
        description="The counters of one disk (DISK as gblk list shows it, e.g. d5/51712) or "
        "of every disk; the same numbers /metrics serves.")
    stats.add_argument("disk", metavar="DISK", nargs="?", default=None)
    stats.set_defaults(func=_cmd_stats)
    status = sub.add_parser(
        "status", parents=[common, client], help="show the running daemon's own state",
        description="Version, kinds, disks, XenStore and metrics endpoint of the running gblk.")
    status.set_defaults(func=_cmd_status)
    from gblk.control.ctl import add_parser as _ctl_parser

    _ctl_parser(sub, [common, client], _cmd_ctl)

    config = sub.add_parser(
        "config", parents=[common], help="check the configuration and print the effective one",
        description="Validate the configuration file and flags; print the result as TOML.",
    )
    _config_flags(config)
    config.add_argument("--quiet", "-q", action="store_true", help="print nothing, only check")
    config.set_defaults(func=_cmd_config)

    hashpw = sub.add_parser(
        "hash-password", parents=[common],
        help="print a password hash for the metrics web configuration's [basic_auth_users]",
        description="Read a password (a prompt, asked twice, on a terminal; else the first line "
        "of stdin) and print its PBKDF2-SHA256 hash, for [basic_auth_users] of the file named "
        "by metrics.web_config. The password is never taken from the command line.")
    hashpw.add_argument("--user", metavar="NAME", default=None,
                        help="print a whole TOML line, NAME = \"HASH\"")
    hashpw.add_argument("--iterations", metavar="N", type=int, default=None,
                        help="PBKDF2 iterations (default 600000; each new scraper login costs this)")
    hashpw.set_defaults(func=_cmd_hash_password)
    return parser


# --------------------------------------------------------------------------------
# commands


def _cmd_config(args: argparse.Namespace) -> int:
    from gblk.config import load_config

    config = load_config(args.config, _overrides(args))
    if config.metrics.enabled and config.metrics.web_config:  # as the daemon will (and SIGHUP)
        from gblk.metrics.webconfig import load_web_config

        load_web_config(config.metrics.web_config)
    if not args.quiet:
        source = config.path or "(no file: defaults)"
        sys.stdout.write(f"# gblk {gblk.__version__} configuration from {source}\n")
        sys.stdout.write(config.to_toml())
    return 0


def _cmd_hash_password(args: argparse.Namespace) -> int:
    import getpass
    import re

    from gblk.metrics import passwords

    iterations = passwords.DEFAULT_ITERATIONS if args.iterations is None else args.iterations
    if not passwords.MIN_ITERATIONS <= iterations <= passwords.MAX_ITERATIONS:
        raise _Usage(f"--iterations must be from {passwords.MIN_ITERATIONS} to {passwords.MAX_ITERATIONS}")
    if args.user is not None and (not args.user or ":" in args.user):
        raise _Usage("--user: a basic auth user name is not empty and has no colon")
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise GblkError("the passwords differ; nothing printed")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise _Usage("empty password")
    hashed = passwords.hash_password(password, iterations)
    if args.user is None:
        sys.stdout.write(hashed + "\n")
    else:
        name = args.user if re.fullmatch(r"[A-Za-z0-9_-]+", args.user) else json.dumps(args.user)
        sys.stdout.write(f'{name} = "{hashed}"\n')
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from gblk.config import load_config
    from gblk.logs import setup_logging

    config = load_config(args.config, _overrides(args))
    setup_logging("debug" if args.debug else config.daemon.log_level)
    from gblk.daemon import serve

    if args.takeover:
        return int(serve(config, debug=args.debug, takeover=True))
    return int(serve(config, debug=args.debug))


def _cmd_demo(args: argparse.Namespace) -> int:
    from gblk.logs import setup_logging

    if args.guests < 1:
        raise _Usage("--guests must be at least 1")
    if args.seconds <= 0:
        raise _Usage("--seconds must be greater than 0")
    if args.metrics_address is not None:
        from gblk.config import parse_address

        try:
            parse_address(args.metrics_address)
        except ValueError as exc:
            raise _Usage(f"--metrics-address {exc}") from None
        from gblk.demo import check_listen

        why = check_listen(args.metrics_address)
        if why:  # at once, not after the daemon has started and given up
            raise _Usage(why)
    if args.writable and not args.image:
        raise _Usage("--writable goes with --image PATH")
    if args.kill_daemon_every is not None and not args.kill_daemon_every > 0:
        raise _Usage("--kill-daemon-every must be greater than 0")
    if args.limit_iops is not None and args.limit_iops < 1:
        raise _Usage("--limit-iops must be at least 1")
    setup_logging("debug" if args.debug else "warning")
    from gblk.demo import main as demo_main

    return int(demo_main(args))


def _control_path(args: argparse.Namespace) -> str:
    if args.control_socket:
        return str(args.control_socket)
    from gblk.config import load_config

    return load_config(args.config).control.socket


def _cmd_list(args: argparse.Namespace) -> int:
    from gblk.control.client import format_list, request

    rows = request(_control_path(args), {"command": "list"})
    sys.stdout.write(json.dumps(rows, indent=1, sort_keys=True) + "\n" if args.json
                     else format_list(rows))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from gblk.control import parse_disk
    from gblk.control.client import format_stats, request

    payload: Dict[str, object] = {"command": "stats"}
    if args.disk is not None:
        try:
            parse_disk(args.disk)
        except ValueError as exc:
            raise _Usage(str(exc)) from None
        payload["disk"] = args.disk
    disks = request(_control_path(args), payload)
    sys.stdout.write(json.dumps(disks, indent=1, sort_keys=True) + "\n" if args.json
                     else format_stats(disks))
    return 0


def _cmd_ctl(args: argparse.Namespace) -> int:
    from gblk.control import ctl

    try:
        ctl.payload(args)
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    return ctl.run(args, _control_path(args))


def _cmd_status(args: argparse.Namespace) -> int:
    from gblk.control.client import request

    st = request(_control_path(args), {"command": "status"})
    if args.json:
        sys.stdout.write(json.dumps(st, indent=1, sort_keys=True) + "\n")
    else:
        for key in sorted(st):
            value = st[key]
            shown = ", ".join(value) if isinstance(value, list) else value
            sys.stdout.write(f"{key}: {shown}\n")
    return 0


def _cmd_sim(args: argparse.Namespace) -> int:
    from gblk.logs import setup_logging

    name = args.component
    parts = name.split(".")
    if not all(part.isidentifier() and not part.startswith("_") for part in parts):
        raise _Usage(f"unknown simulator component {name!r}")
    setup_logging("debug" if args.debug else "info")
    component = _sim_component(name)
    return int(component(list(args.argv)))


def _cmd_bench(args: argparse.Namespace) -> int:
    from gblk.logs import setup_logging

    setup_logging("debug" if args.debug else "warning")
    from gblk.bench import main as bench_main

    return int(bench_main(list(args.argv)))


class _Usage(GblkError):
    """A usage error found after argparse (exit code 2)."""


def _sim_component(name: str) -> Callable[[List[str]], int]:
    """``gblk.sim.<name>.main``: the one import by name in this module, because the name
    is the user's argument (``gblk sim xenstored``, ``gblk sim hypervisor.evtchn_bench``);
    every other command imports what it runs in its own function, so the composition
    root's edges show in the code and to ``lint-imports``. A module that is not there,
    or has no ``main``, is a usage error."""
    import importlib

    import gblk.sim

    module = f"{gblk.sim.__name__}.{name}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise
        raise _Usage(f"unknown simulator component {name!r}") from None
    func = getattr(mod, "main", None)
    if not callable(func):
        raise _Usage(f"{name!r} is not a simulator component (gblk.sim.{name} has no main)")
    return func


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``gblk`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(list(argv) if argv is not None else None)
        if extra:
            # options meant for a pass-through command (gblk bench --seconds 3):
            # argparse's REMAINDER does not take them when they come first
            if not hasattr(args, "argv"):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.argv = list(extra) + list(args.argv)
    except SystemExit as exc:  # --help, --version, usage errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    debug = bool(getattr(args, "debug", False))
    if args.command in _GEVENT_COMMANDS:
        _patch_gevent()
    try:
        return int(args.func(args))
    except GblkError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"gblk: {_one_line(exc)}\n")
        sys.stderr.flush()
        return 2 if isinstance(exc, (ConfigError, _Usage)) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
