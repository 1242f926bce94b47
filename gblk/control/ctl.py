"""``gblk ctl``: change a running daemon's disks over the control socket.

``gblk ctl limit DISK [--iops-total N ...] [--none]`` sets a disk's IO limits (the
flags are the keys of ``gblk.qos``: every bucket, its ``-max`` and ``-max-length``;
the flags given replace the disk's limits as a whole, ``--none`` removes them, no
flag shows them); ``gblk ctl cbt enable|disable|reset|show DISK`` drives its
changed-block tracking; ``gblk ctl export DISK [--socket PATH | --address HOST:PORT]``
serves it read-only over NBD as it is now (a point in time, its dirty bitmap as
``qemu:dirty-bitmap:cbt``) and ``gblk ctl unexport DISK`` ends that. The answers are JSON. Plain sockets (``gblk.control.client``):
no gevent, no Xen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Dict

from ..qos import LIMIT_KEYS
from . import parse_disk
from .client import request

CBT_ACTIONS = ("enable", "disable", "reset", "show")


def add_parser(sub: Any, parents: list, run: Callable[[argparse.Namespace], int]) -> None:
    ctl = sub.add_parser(
        "ctl", help="change the running daemon's disks (IO limits, CBT, NBD export)",
        description="Set a disk's IO limits or drive its changed-block tracking, at once, "
        "through the control socket. DISK as gblk list shows it (d5/51712).")
    what = ctl.add_subparsers(dest="ctl_command", metavar="WHAT")
    what.required = True
    limit = what.add_parser(
        "limit", parents=parents, help="show or set a disk's IO limits (QEMU's throttle settings)",
        description="With no limit flag: show the disk's limits. Otherwise the flags given "
        "become the disk's limits (the others are unset) until the next SIGHUP, which "
        "applies the configuration's [[limit]] rules again. 0 or absent: no limit.")
    limit.add_argument("disk", metavar="DISK")
    for key in LIMIT_KEYS:
        unit = "seconds" if key.endswith("_length") else (
            "bytes/s" if key.startswith("bps") else "requests/s")
        limit.add_argument("--" + key.replace("_", "-"), dest=key, type=int, default=None,
                           metavar="N", help=f"{key} ({unit})")
    limit.add_argument("--none", action="store_true", help="remove every limit of the disk")
    limit.set_defaults(func=run)
    cbt = what.add_parser(
        "cbt", parents=parents, help="changed-block tracking of a disk: enable, disable, reset, show",
        description="enable: start tracking (a bitmap in cbt.directory, kept across restarts); "
        "disable: stop and remove the bitmap; show: the dirty extents as JSON; reset: "
        "clear the map and print the extents it held (one step: copy those, then the "
        "next reset gives what changed since).")
    cbt.add_argument("action", choices=CBT_ACTIONS)
    cbt.add_argument("disk", metavar="DISK")
    cbt.set_defaults(func=run)
    exp = what.add_parser(
        "export", parents=parents, help="serve a disk read-only over NBD, as it is now",
        description="Serve the disk read-only over NBD (qemu-img, nbdcopy, nbdinfo) as it is "
        "now while the guest goes on writing (copy-before-write into a side file in "
        "cbt.export_directory). With changed-block tracking on, the dirty bitmap is the "
        "meta context qemu:dirty-bitmap:cbt; cbt reset then clears only what the export "
        "shows. Default socket: export-d<domid>-<devid>.sock beside the control socket.")
    exp.add_argument("disk", metavar="DISK")
    where = exp.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="the Unix socket to listen on (0600)")
    where.add_argument("--address", metavar="HOST:PORT",
                       help="a loopback TCP address instead (127.0.0.1:10809; port 0: any)")
    exp.set_defaults(func=run)
    unexp = what.add_parser("unexport", parents=parents, help="end a disk's NBD export",
                            description="Close the export's socket and connections and drop "
                            "its side file; the guest's writes go straight to the image again.")
    unexp.add_argument("disk", metavar="DISK")
    unexp.set_defaults(func=run)


def payload(args: argparse.Namespace) -> Dict[str, Any]:
    """The request for ``args``; ValueError (a usage error) for a bad disk name."""
    parse_disk(args.disk)
    if args.ctl_command == "limit":
        given = {k: getattr(args, k) for k in LIMIT_KEYS if getattr(args, k) is not None}
        if args.none and given:
            raise ValueError("--none removes every limit: give it alone")
        req: Dict[str, Any] = {"command": "limit", "disk": args.disk}
        if given or args.none:
            req["set"] = given
        return req
    if args.ctl_command == "export":
        req = {"command": "export", "disk": args.disk}
        if args.socket:
            req["socket"] = os.path.abspath(args.socket)
        if args.address:
            req["address"] = args.address
        return req
    if args.ctl_command == "unexport":
        return {"command": "unexport", "disk": args.disk}
    return {"command": "cbt", "disk": args.disk, "action": args.action}


def run(args: argparse.Namespace, path: str) -> int:
    result = request(path, payload(args))
    sys.stdout.write(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0
