"""Probe of gblk's real Xen bindings in dom0, with no guest: dom0 grants pages and binds
event channels to itself, and gblk's own objects map, copy and notify them.

Run by payload.py (``python3 -c`` with PYTHONPATH at the share's copy of gblk). Prints one
``PROBE <name> ok|fail <detail>`` line per check. The peer side (sharing pages, an
unbound port) uses libxengntshr/libxenevtchn through ctypes (both in libxengnttab.so.1 and libxenevtchn.so.1), so it does not depend on
the code under test.
"""

import ctypes
import importlib
import os
import select
import sys
import traceback


def report(name, ok, detail=""):
    print("PROBE %s %s %s" % (name, "ok" if ok else "fail", str(detail).replace("\n", " | ")[:800]), flush=True)


def attempt(name, fn):
    try:
        out = fn()
        report(name, True, out if out is not None else "")
        return out
    except Exception as e:  # noqa: BLE001 - every failure is a probe result
        report(name, False, "%s: %s" % (type(e).__name__, e))
        traceback.print_exc(file=sys.stdout)
        return None


# --- the peer side, through the C libraries ------------------------------------------------

gntshr = ctypes.CDLL("libxengnttab.so.1", use_errno=True)  # xengntshr_* live there too
gntshr.xengntshr_open.restype = ctypes.c_void_p
gntshr.xengntshr_open.argtypes = [ctypes.c_void_p, ctypes.c_uint]
gntshr.xengntshr_share_pages.restype = ctypes.c_void_p
gntshr.xengntshr_share_pages.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                         ctypes.POINTER(ctypes.c_uint32), ctypes.c_int]
gntshr.xengntshr_unshare.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]
evt = ctypes.CDLL("libxenevtchn.so.1", use_errno=True)
evt.xenevtchn_open.restype = ctypes.c_void_p
evt.xenevtchn_open.argtypes = [ctypes.c_void_p, ctypes.c_uint]
evt.xenevtchn_fd.argtypes = [ctypes.c_void_p]
evt.xenevtchn_bind_unbound_port.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
evt.xenevtchn_notify.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
evt.xenevtchn_pending.argtypes = [ctypes.c_void_p]
evt.xenevtchn_unmask.argtypes = [ctypes.c_void_p, ctypes.c_uint32]


def main():
    from gevent import monkey  # before gblk imports gevent's hub users

    monkey.patch_all(queue=False)
    mods = {}
    for name in ("gblk.xen.barrier", "gblk.xen.gnttab", "gblk.xen.evtchn", "gblk.xen.xenstore", "gblk.xen.host"):
        mods[name] = attempt("import-" + name.rsplit(".", 1)[1], lambda n=name: importlib.import_module(n) and "")
    from gblk.xen import interfaces

    host = None
    hostmod = sys.modules.get("gblk.xen.host")
    if hostmod is not None:
        classes = [c for c in vars(hostmod).values()
                   if isinstance(c, type) and issubclass(c, interfaces.XenHost) and c is not interfaces.XenHost]
        report("host-class", bool(classes), [c.__name__ for c in classes])
        if classes:
            host = attempt("host-open", lambda: classes[0]())
    if host is not None:
        attempt("blkback-loaded", lambda: host.blkback_loaded())
        open_gt, open_ec, open_xs = host.open_grant_table, host.open_event_channel, host.open_xenstore
        fence = attempt("fence", lambda: host.fence())
    else:  # no host module yet: the pieces directly
        def find(modname, base):
            mod = sys.modules.get(modname)
            for c in vars(mod).values() if mod else ():
                if isinstance(c, type) and issubclass(c, base) and c is not base and c.__module__ == modname:
                    return c
            return None
        gt_cls = find("gblk.xen.gnttab", interfaces.GrantTable)
        ec_cls = find("gblk.xen.evtchn", interfaces.EventChannel)
        xs_cls = find("gblk.xen.xenstore", interfaces.XenStore)
        report("classes", True, "gnttab=%s evtchn=%s xenstore=%s" % (gt_cls, ec_cls, xs_cls))
        def missing():
            raise RuntimeError("not implemented yet")
        open_gt = gt_cls or missing
        open_ec = ec_cls or missing
        open_xs = xs_cls or missing
        fence = None
        if "gblk.xen.barrier" in sys.modules:
            fence = attempt("fence", lambda: sys.modules["gblk.xen.barrier"].make_fence())
    if fence is not None:
        attempt("fence-call", lambda: fence() or "called")

    # grant table: dom0 shares two pages with itself, gblk maps and copies them
    gt = attempt("gnttab-open", open_gt)
    if gt is not None:
        xgs = gntshr.xengntshr_open(None, 0)
        refs = (ctypes.c_uint32 * 2)()
        addr = gntshr.xengntshr_share_pages(xgs, 0, 2, refs, 1)
        report("peer-share-pages", bool(addr), "refs %s errno %d" % (list(refs), ctypes.get_errno()))
        if addr:
            ctypes.memmove(addr, b"guest-page-0" + b"\0" * 4084 + b"guest-page-1", 4096 + 12)

            def map_rw():
                m = gt.map_grant_refs(0, list(refs), True)
                assert bytes(m.pages[0][:12]) == b"guest-page-0", bytes(m.pages[0][:12])
                assert bytes(m.pages[1][:12]) == b"guest-page-1", bytes(m.pages[1][:12])
                m.pages[1][100:105] = b"gblk!"
                assert ctypes.string_at(addr + 4096 + 100, 5) == b"gblk!"
                m.unmap()
                m.unmap()
                return "read both pages, wrote one, peer saw it, unmapped twice"

            attempt("gnttab-map-rw", map_rw)

            def map_ro():
                m = gt.map_grant_refs(0, [refs[0]], False)
                data = bytes(m.pages[0][:12])
                writable = not m.pages[0].readonly
                m.unmap()
                assert data == b"guest-page-0"
                assert not writable, "a read-only mapping came back writable"
                return "ok"

            attempt("gnttab-map-ro", map_ro)

            def map_bad():
                try:
                    gt.map_grant_refs(0, [refs[0], 100000], True)
                except Exception as e:  # noqa: BLE001
                    return "%s status=%s" % (type(e).__name__, getattr(e, "status", None))
                raise AssertionError("mapping a bogus ref succeeded")

            attempt("gnttab-map-bad-ref", map_bad)
            if getattr(gt, "supports_copy", False):
                def copy():
                    buf = bytearray(12)
                    st = gt.grant_copy([interfaces.CopySegment(0, refs[0], 0, 12, memoryview(buf), True)])
                    assert st == [0], st
                    assert bytes(buf) == b"guest-page-0", bytes(buf)
                    out = bytearray(b"copied-back!")
                    st = gt.grant_copy([interfaces.CopySegment(0, refs[1], 200, 12, memoryview(out), False)])
                    assert st == [0], st
                    assert ctypes.string_at(addr + 4096 + 200, 12) == b"copied-back!"
                    st = gt.grant_copy([interfaces.CopySegment(0, 100000, 0, 12, memoryview(buf), True)])
                    return "both directions; bogus ref status %s" % st
                attempt("gnttab-copy", copy)
            gntshr.xengntshr_unshare(xgs, addr, 2)
        attempt("gnttab-close", gt.close)

    # event channels: the peer allocates an unbound port, gblk binds it and they notify
    ec = attempt("evtchn-open", open_ec)
    if ec is not None:
        xce = evt.xenevtchn_open(None, 0)
        remote = evt.xenevtchn_bind_unbound_port(xce, 0)
        report("peer-unbound-port", remote > 0, remote)

        def roundtrip():
            local = ec.bind_interdomain(0, remote)
            assert isinstance(local, int) and local > 0, local
            ec.notify(local)
            r, _, _ = select.select([evt.xenevtchn_fd(xce)], [], [], 5)
            assert r, "the peer got no event"
            got = evt.xenevtchn_pending(xce)
            assert got == remote, (got, remote)
            evt.xenevtchn_unmask(xce, remote)
            evt.xenevtchn_notify(xce, remote)
            r, _, _ = select.select([ec.fileno()], [], [], 5)
            assert r, "gblk's handle got no event"
            p = ec.pending()
            assert p == local, (p, local)
            assert ec.pending() is None
            ec.unmask(local)
            ec.unbind(local)
            return "local %d <-> remote %d both ways" % (local, remote)

        attempt("evtchn-roundtrip", roundtrip)
        attempt("evtchn-close", ec.close)

    # xenstore through gblk's own gevent client (gblk.xen.xenstore)
    def xs():
        s = open_xs()
        name = s.read("/local/domain/0/name")
        s.write("/local/domain/0/data/gblk-probe", "1")
        v = s.read("/local/domain/0/data/gblk-probe")
        s.rm("/local/domain/0/data/gblk-probe")
        path = s.get_domain_path(0)
        s.close()
        assert v == "1", v
        return "name=%s domain-path=%s" % (name, path)

    attempt("xenstore", xs)
    if host is not None:
        attempt("host-close", host.close)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
