"""Every cffi FFI in gblk is safe to use from gevent's threadpool in a patched process.

The daemon monkey-patches before it imports gblk, so an FFI's internal lock would be
a gevent lock; contended between real threads it loses wake-ups and hangs (seen on
the real hypervisor: a ring map stuck in ``ffi.cast`` in the threadpool, the hub
stuck in the first ``lib.xengnttab_unmap`` lookup). This starts a process the way
the daemon starts (patch, then import every gblk module), finds every ``cffi.FFI``
in gblk's modules, and makes each one parse fresh types from the threadpool and the
hub at once: the cffi work that takes that lock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all(queue=False)

    import importlib, json, pkgutil, sys
    import cffi, gevent
    from gevent.threadpool import ThreadPool
    import gblk

    for info in pkgutil.walk_packages(gblk.__path__, "gblk."):
        if info.name.endswith(".__main__"):  # a program (python -m): importing runs it
            continue
        importlib.import_module(info.name)
    ffis = {}
    for name, module in sorted(sys.modules.items()):
        if name == "gblk" or name.startswith("gblk."):
            for attr, value in vars(module).items():
                if isinstance(value, cffi.FFI):
                    ffis.setdefault(id(value), (f"{name}.{attr}", value))

    pool = ThreadPool(4)

    def parse(ffi, base, n):
        for j in range(n):
            ffi.cast(f"uint{8 << (j % 4)}_t *", 0)
            ffi.typeof(f"char[{base + j}]")
        return n

    def hub_side(ffi):
        for j in range(600):
            ffi.typeof(f"short[{j}]")
            if j % 50 == 0:
                gevent.sleep(0)

    report = {}
    for label, ffi in ffis.values():
        jobs = [pool.spawn(parse, ffi, 1000 * i, 60) for i in range(16)]
        jobs.append(gevent.spawn(hub_side, ffi))
        done = gevent.joinall(jobs, timeout=30)  # a hang guard: 2 s is plenty
        report[label] = {"jobs": len(jobs), "done": len(done),
                         "lock": type(ffi._lock).__module__ + "." + type(ffi._lock).__name__}
    print(json.dumps(report))
    sys.stdout.flush()
    import os
    os._exit(0)  # a hung worker thread must not keep the process alive
    """
)


def test_every_ffi_works_from_threadpool_and_hub_at_once() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # the modules that bind libxengnttab, libxenevtchn, libc (fence) and the sim
    for expected in ("gblk.xen.gnttab.ffi", "gblk.xen.evtchn.ffi", "gblk.xen.barrier._ffi",
                     "gblk.sim.hypervisor.gnttab._ffi"):
        assert expected in report, sorted(report)
    hung = {label: r for label, r in report.items() if r["done"] != r["jobs"]}
    assert not hung, f"cffi work never finished (a lock lost its wake-up): {hung}"
    for label, r in report.items():
        assert not r["lock"].startswith("gevent"), f"{label} has a gevent lock: {r['lock']}"
