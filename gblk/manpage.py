"""Write the manual page gblk(8) from gblk's own argument parser.

``python3 -m gblk.manpage [-o FILE]`` walks :func:`gblk.cli.build_parser`, every
subcommand and every option of each (``gblk bench`` with the options of
``gblk.bench``'s own parser, which it passes its arguments to), and prints roff for
``man``. The Debian package builds its ``gblk.8`` this way (``debian/rules``), so the
page says what the parser accepts and cannot drift from it. The two helper programs
(``gblk-xl-hotplug``, ``gblk-device-model``; the package links their man pages to this
one) have no argparse parser: their synopses are their own ``USAGE`` strings. What
argparse knows nothing of (what the helpers do, files, signals) is written here; the
exit codes are taken from the ``gblk.cli`` docstring.

``SOURCE_DATE_EPOCH`` (set by ``dpkg-buildpackage`` from ``debian/changelog``) dates
the page, so a rebuild gives the same bytes. Only the standard library and modules
that import nothing heavy are used: the package build needs no gevent.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import gblk

#: subcommands whose arguments go to a parser of their own: (module, function)
PASS_THROUGH_PARSERS: Dict[str, Tuple[str, str]] = {
    "bench": ("gblk.bench", "_parser"),
}

_WIDE = 100000  # never wrap usage lines: roff fills them


def escape(text: str) -> str:
    """Text for a roff line: backslashes and hyphens escaped, no line starting as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines() or [""]:
        line = line.strip()
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def _fill(text: str) -> str:
    """A help or description text as one roff paragraph (argparse joins whitespace too)."""
    return escape(" ".join(text.split()).replace("``", ""))


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


def _invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._format_action_invocation(action)


def _usage(prog: str, actions: Sequence[argparse.Action]) -> str:
    formatter = argparse.HelpFormatter(prog, width=_WIDE)
    formatter.add_usage(None, list(actions), [], prefix="")
    return " ".join(formatter.format_help().split())


def _visible(actions: Sequence[argparse.Action]) -> List[argparse.Action]:
    return [
        a for a in actions
        if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)
    ]


def _options(parser: argparse.ArgumentParser, actions: Sequence[argparse.Action]) -> List[str]:
    out: List[str] = []
    for action in _visible(actions):
        out.append(".TP")
        out.append("\\fB" + escape(_invocation(parser, action)) + "\\fR")
        out.append(_fill(_help_text(parser, action)) or "\\&")
    return out


def _groups(parser: argparse.ArgumentParser) -> List[Tuple[str, List[argparse.Action]]]:
    """(title, actions) of each argument group that has visible actions, in order;
    the two default groups ("positional arguments", "options") get no title."""
    defaults = {parser._positionals.title, parser._optionals.title}
    out = []
    for group in parser._action_groups:
        actions = _visible(group._group_actions)
        if actions:
            out.append(("" if group.title in defaults else (group.title or ""), actions))
    return out


def _subcommands(parser: argparse.ArgumentParser) -> List[Tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of every subcommand, in the order of ``gblk --help``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _load_parser(name: str) -> Optional[argparse.ArgumentParser]:
    spec = PASS_THROUGH_PARSERS.get(name)
    if spec is None:
        return None
    make: Callable[[], argparse.ArgumentParser] = getattr(importlib.import_module(spec[0]), spec[1])
    return make()


def _exit_status() -> List[str]:
    from gblk import cli

    doc = cli.__doc__ or ""
    para = next((p for p in doc.split("\n\n") if p.startswith("Exit codes:")), "")
    text = " ".join(para.split())[len("Exit codes:"):].strip()
    text = re.sub(r":class:`[^`]*\.([^`.]+)`", r"\1", text).replace("``", "")
    return [".SH EXIT STATUS", _fill(text) if text else "0 on success."]


def _page_date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc)
        if epoch and epoch.isdigit() else datetime.datetime.now(tz=datetime.timezone.utc)
    )
    return when.strftime("%Y-%m-%d")


_STATIC_HEAD = r"""
.SH DESCRIPTION
gblk is a userspace Xen paravirtual block backend (blkif): it runs in dom0 or a driver
domain and serves the virtual disks that guests' \fBxen\-blkfront\fR drivers use, as the
kernel's \fBxen\-blkback\fR or QEMU's qdisk would, and serves Prometheus metrics about
every disk.
\fBgblk serve\fR is the daemon, normally run by systemd as \fBgblk.service\fR.
The other subcommands check the configuration, ask the running daemon about its disks,
or run gblk on a simulated Xen host that needs no hypervisor.
.PP
Configuration flags override the configuration file; see \fBFILES\fR.
""".strip("\n")

#: what the helper programs' usage lines leave out, by program
_HELPER_TEXT = {
    "gblk-xl-hotplug": r"""
The hotplug script for \fBxl\fR disk specs with \fBbackendtype=phy\fR (kind vbd) or
\fBbackendtype=tap\fR (kind vbd3): \fBscript=gblk\-xl\-hotplug\fR (libxl finds it in
\fI/etc/xen/scripts\fR) or its absolute path. libxl runs it with \fBXENBUS_PATH\fR set; on
\fBadd\fR it waits (at most \fBGBLK_HOTPLUG_TIMEOUT\fR seconds, default 30) until gblk
has taken the disk, on \fBremove\fR until gblk let go; exit status 1 and
\fBhotplug\-error\fR written in XenStore if not.
\fBXENSTORED_PATH\fR chooses another xenstored socket.
""",
    "gblk-device-model": r"""
The device model libxl starts for a PV or PVH guest with \fBbackendtype=qdisk\fR disks,
in QEMU's place: \fBdevice_model_override = "/usr/bin/gblk\-device\-model"\fR in the
guest's configuration (libxl passes the arguments above). It serves no device; it tells
libxl it is running, answers its QMP commands and exits when libxl stops it or the guest
is gone, so gblk serves the guest's qdisk disks. It refuses an HVM guest's command line.
""",
}


def _helpers() -> List[Tuple[str, str]]:
    """(program, its arguments) from the helper programs' own usage strings."""
    from gblk import devicemodel, hotplug

    out = []
    for module in (hotplug, devicemodel):
        usage = module.USAGE.split("  (", 1)[0]  # the note after two spaces is for a terminal
        args = " ".join(usage.split()).split(f"usage: {module.PROG} ", 1)[-1]
        out.append((module.PROG, args))
    return out


_STATIC_TAIL = r"""
.SH SIGNALS
\fBgblk serve\fR stops on SIGTERM and SIGINT: it takes no new requests, answers every
request in flight (bounded by \fBdaemon.stop_timeout\fR) and exits.
SIGHUP re-reads the configuration file (\fBsystemctl reload gblk\fR); keys that cannot
change while running are logged as needing a restart.
gblk leaves its disks connected when it stops: a gblk started again takes the running
guests over where the last one stopped.
.SH FILES
.TP
\fI/etc/gblk/gblk.toml\fR
The configuration file (TOML); every key is listed there with its default.
\fBgblk config\fR prints the configuration gblk would use.
.TP
\fI/run/gblk/control.sock\fR
The control socket of \fBgblk list\fR, \fBgblk stats\fR and \fBgblk status\fR
(\fBcontrol.socket\fR); only root may use it.
.TP
\fIgblk.service\fR
The systemd unit: \fBsystemctl status gblk\fR, \fBjournalctl \-u gblk\fR.
.TP
\fI/usr/share/gblk/monitoring\fR
Prometheus alert and recording rules, a scrape configuration and a Grafana dashboard
for the metrics at \fIhttp://127.0.0.1:9741/metrics\fR (\fBmetrics.address\fR).
.SH SEE ALSO
\fBxl\fR(1), \fBxl.cfg\fR(5), \fBxl\-disk\-configuration\fR(5), \fBsystemctl\fR(1),
\fBjournalctl\fR(1); \fI/usr/share/doc/gblk/README.md.gz\fR.
""".strip("\n")


def render(parser: Optional[argparse.ArgumentParser] = None, date: Optional[str] = None) -> str:
    """The whole page, roff source ending in a newline."""
    if parser is None:
        from gblk.cli import build_parser

        parser = build_parser()
    prog = parser.prog
    subs = _subcommands(parser)
    helpers = _helpers()
    out: List[str] = [
        '.\\" Generated by gblk.manpage from gblk\'s argument parser; do not edit.',
        f'.TH {prog.upper()} 8 "{date or _page_date()}" "gblk {gblk.__version__}" "System Administration"',
        ".nh",  # no hyphenation: option names must stay whole
        ".ad l",
        ".SH NAME",
        ", ".join(escape(p) for p in [prog] + [h for h, _ in helpers])
        + f" \\- {escape(_oneline(parser.description or ''))}",
        ".SH SYNOPSIS",
    ]
    out.append(f"\\fB{escape(prog)}\\fR " + escape(_usage("", parser._actions)))
    for name, _help, sub in subs:
        actions = list(sub._actions)
        extra = _load_parser(name)
        if extra is not None:
            actions += [a for a in extra._actions if not isinstance(a, argparse._HelpAction)]
        out.append(".br")
        out.append(f"\\fB{escape(prog)} {escape(name)}\\fR " + escape(_usage("", actions)))
    for helper, args in helpers:
        out.append(".br")
        out.append(f"\\fB{escape(helper)}\\fR {escape(args)}")
    out.append(_STATIC_HEAD)
    out.append(".SH OPTIONS")
    out += _options(parser, parser._actions)
    out.append(".SH COMMANDS")
    for name, summary, sub in subs:
        extra = _load_parser(name)
        out.append(f'.SS "{escape(prog)} {escape(name)}"')
        description = sub.description or (extra.description if extra is not None else None) or summary
        out.append(_fill(description))
        sections = _groups(sub)
        if extra is not None:
            sections += [(t, [a for a in acts if not isinstance(a, argparse._HelpAction)])
                         for t, acts in _groups(extra)]
        for title, actions in sections:
            if not actions:
                continue
            if title:
                out.append(".PP")
                out.append("\\fI" + _fill(title) + "\\fR")
            out += _options(extra if extra is not None and actions[0] in extra._actions else sub,
                            actions)
    out += _exit_status()
    out.append(".SH HELPER PROGRAMS")
    for helper, args in helpers:
        out.append(".TP")
        out.append(f"\\fB{escape(helper)}\\fR {escape(args)}")
        out.append(_HELPER_TEXT.get(helper, "").strip("\n") or "\\&")
    out.append(_STATIC_TAIL)
    return "\n".join(out) + "\n"


def _oneline(text: str) -> str:
    """The NAME line's description: the parser's description without "gblk: " and the dot."""
    text = " ".join(text.split())
    if ":" in text:
        text = text.split(":", 1)[1].strip()
    return text.rstrip(".")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m gblk.manpage", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("-o", "--output", metavar="FILE", default=None, help="write here (default: stdout)")
    args = p.parse_args(argv)
    page = render()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
