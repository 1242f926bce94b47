"""By hand: NBD client cost, three ways, against one qemu-nbd (4 KiB random reads or
writes, a queue depth, a few seconds each). Not a test; prints figures.

    python tests/nbd_client_bench.py [--seconds 3] [--qd 16] [--write]
        gblk's client (gblk.storage.nbd) from a gevent threadpool, as the engine
        calls it; and a prototype of the same protocol on the hub (gevent sockets,
        one reader greenlet, no thread handoff)
    /usr/bin/python3 tests/nbd_client_bench.py --libnbd [...]
        Debian's python3-libnbd (aio_pread/aio_pwrite, poll loop), where it exists

Figures: requests per second and CPU microseconds per request of this process
(qemu-nbd's CPU is not counted: the same for all three).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _server(tmp: str, size: int) -> tuple:
    img = os.path.join(tmp, "bench.raw")
    with open(img, "wb") as f:
        f.write(os.urandom(size))
    sock = os.path.join(tmp, "bench.sock")
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", sock, "-t", "-e", "0",
                          "--cache=writeback", img], stderr=subprocess.DEVNULL)
    for _ in range(500):
        if os.path.exists(sock):
            break
        time.sleep(0.01)
    time.sleep(0.1)
    return p, sock


def _report(name: str, n: int, secs: float, cpu: float) -> None:
    print(f"{name:<28} {n / secs:9.0f} req/s  {cpu / n * 1e6:7.1f} us CPU/req", flush=True)


def run_threads(sock: str, args: argparse.Namespace, size: int) -> None:
    from gevent.threadpool import ThreadPool

    from gblk.storage import open_store

    s = open_store("nbd", f"nbd+unix:///?socket={sock}", readonly=False)
    pool = ThreadPool(args.qd)
    stop = time.monotonic() + args.seconds
    blocks = size // 4096

    def worker(seed: int) -> int:
        rnd = random.Random(seed)
        buf = memoryview(bytearray(4096))
        n = 0
        while time.monotonic() < stop:
            off = rnd.randrange(blocks) * 4096
            if args.write:
                s.writev([buf], off)
            else:
                s.readv([buf], off)
            n += 1
        return n

    t0, c0 = time.monotonic(), _cpu()
    n = sum(r.get() for r in [pool.spawn(worker, i) for i in range(args.qd)])
    _report(f"gblk client, {args.qd} threads", n, time.monotonic() - t0, _cpu() - c0)
    pool.kill()
    s.close()


def run_hub(sock: str, args: argparse.Namespace, size: int) -> None:
    """The same protocol on the hub: gevent socket, one reader greenlet, AsyncResults."""
    import socket as gsocket

    import gevent
    from gevent.event import AsyncResult

    from gblk.storage import nbdwire as w

    s = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
    s.connect(sock)
    w.handshake(s, "")  # type: ignore[arg-type]
    waiting: dict = {}
    cookies = iter(range(1, 1 << 62))

    def reader() -> None:
        while True:
            err, cookie = w.read_reply_header(s)  # type: ignore[arg-type]
            res, view = waiting.pop(cookie)
            if view is not None and not err:
                w.recv_views(s, [view])  # type: ignore[arg-type]
            res.set(err)

    rd = gevent.spawn(reader)
    stop = time.monotonic() + args.seconds
    blocks = size // 4096

    def worker(seed: int) -> int:
        rnd = random.Random(seed)
        buf = memoryview(bytearray(4096))
        n = 0
        while time.monotonic() < stop:
            off = rnd.randrange(blocks) * 4096
            c = next(cookies)
            res = AsyncResult()
            if args.write:
                waiting[c] = (res, None)
                w.send_all(s, [w.request(w.CMD_WRITE, c, off, 4096), buf])  # type: ignore[arg-type]
            else:
                waiting[c] = (res, buf)
                s.sendall(w.request(w.CMD_READ, c, off, 4096))
            assert res.get() == 0
            n += 1
        return n

    t0, c0 = time.monotonic(), _cpu()
    gs = [gevent.spawn(worker, i) for i in range(args.qd)]
    n = sum(g.get() for g in gs)
    _report(f"hub prototype, {args.qd} greenlets", n, time.monotonic() - t0, _cpu() - c0)
    rd.kill()
    s.close()


def run_libnbd(sock: str, args: argparse.Namespace, size: int) -> None:
    import nbd  # python3-libnbd

    h = nbd.NBD()
    h.connect_unix(sock)
    blocks = size // 4096
    rnd = random.Random(1)
    bufs = [nbd.Buffer(4096) for _ in range(args.qd)]
    stop = time.monotonic() + args.seconds
    n = 0
    t0, c0 = time.monotonic(), _cpu()
    inflight = 0
    done_count = [0]

    def done(*_a: object) -> int:
        done_count[0] += 1
        return 1

    while time.monotonic() < stop:
        while inflight - done_count[0] < args.qd:
            off = rnd.randrange(blocks) * 4096
            b = bufs[inflight % args.qd]
            if args.write:
                h.aio_pwrite(b, off, completion=done)
            else:
                h.aio_pread(b, off, completion=done)
            inflight += 1
        h.poll(-1)
    while done_count[0] < inflight:
        h.poll(-1)
    n = done_count[0]
    _report(f"libnbd aio, depth {args.qd}", n, time.monotonic() - t0, _cpu() - c0)
    h.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--qd", type=int, default=16)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--libnbd", action="store_true")
    args = ap.parse_args()
    if shutil.which("qemu-nbd") is None:
        sys.exit("needs qemu-nbd (qemu-utils)")
    size = 64 << 20
    with tempfile.TemporaryDirectory() as tmp:
        p, sock = _server(tmp, size)
        try:
            if args.libnbd:
                run_libnbd(sock, args, size)
            else:
                run_threads(sock, args, size)
                run_hub(sock, args, size)
        finally:
            p.kill()
            p.wait()


if __name__ == "__main__":
    if "--libnbd" not in sys.argv:
        from gevent import monkey

        monkey.patch_all(queue=False)
    main()
