#!/usr/bin/python3
"""A stand-in for QEMU as a PV guest's device model (xl's ``device_model_override=``).

For a PV guest with ``backendtype=qdisk`` disks libxl starts a device model that would
serve those disks itself. This stand-in keeps QEMU off them so gblk serves them, while
looking enough like QEMU for libxl: it writes ``device-model/<domid>/state = running``,
answers QMP on every socket chardev libxl passes (``path=`` or a pre-opened ``fd=``):
greeting, ``qmp_capabilities``, ``query-chardev`` (empty) and an empty success for
anything else, and exits cleanly on SIGHUP/SIGTERM (how libxl stops it).

Runs in dom0 with Python's standard library only. Must not touch any disk or the
backend directories: that is gblk's job.
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

LOG = "/mnt/share/results/logs/dm-standin.log"


def log(msg):
    try:
        with open(LOG, "a") as f:
            f.write("%.3f pid=%d %s\n" % (time.time(), os.getpid(), msg))
    except OSError:
        pass


def parse(argv):
    domid = None
    listeners = []
    for i, arg in enumerate(argv):
        if arg == "-xen-domid":
            domid = int(argv[i + 1])
        if arg == "-chardev" and argv[i + 1].startswith("socket"):
            opts = dict(kv.split("=", 1) for kv in argv[i + 1].split(",")[1:] if "=" in kv)
            if "fd" in opts:
                listeners.append(socket.socket(fileno=int(opts["fd"])))
            elif "path" in opts:
                path = opts["path"]
                if os.path.exists(path):
                    os.unlink(path)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(path)
                s.listen(4)
                listeners.append(s)
    return domid, listeners


GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "gblk-dm-standin"},
        "capabilities": ["oob"],
    }
}


def answer(cmd):
    name = cmd.get("execute", "")
    ret = [] if name.startswith("query-") and name != "query-status" else {}
    if name == "query-status":
        ret = {"status": "running", "singlestep": False, "running": True}
    out = {"return": ret}
    if "id" in cmd:
        out["id"] = cmd["id"]
    return out


def main():
    domid, listeners = parse(sys.argv[1:])
    log("start domid=%s argv=%s" % (domid, " ".join(sys.argv[1:])))
    stop = []
    signal.signal(signal.SIGHUP, lambda *_: stop.append("SIGHUP"))
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: stop.append("SIGINT"))
    if domid is not None:
        subprocess.call(["xenstore-write", "/local/domain/0/device-model/%d/state" % domid, "running"])
    clients = {}
    while not stop:
        try:
            ready, _, _ = select.select(listeners + list(clients), [], [], 1.0)
        except InterruptedError:
            continue
        for s in ready:
            if s in listeners:
                conn, _ = s.accept()
                clients[conn] = b""
                conn.sendall((json.dumps(GREETING) + "\r\n").encode())
                continue
            data = s.recv(65536)
            if not data:
                clients.pop(s).close()
                continue
            buf = clients[s] + data
            dec = json.JSONDecoder()
            text = buf.decode("utf-8", "replace")
            pos = 0
            while True:
                while pos < len(text) and text[pos] in " \r\n\t":
                    pos += 1
                try:
                    cmd, end = dec.raw_decode(text, pos)
                except ValueError:
                    break
                pos = end
                log("qmp %s" % json.dumps(cmd))
                s.sendall((json.dumps(answer(cmd)) + "\r\n").encode())
            clients[s] = text[pos:].encode()
    log("exit on %s" % stop[0])


if __name__ == "__main__":
    main()
