"""The real Xen bindings (cffi ABI mode) and the memory fence, without Xen.

There is no hypervisor here: these tests pin down what can be checked on any
machine (the libraries load and export what we declare, the structs have the ABI's
layout, a machine without Xen gets one clear line, the mapping object's unmap
discipline, the fence) and leave the rest to tests/system, which runs the same
bindings in a real dom0.
"""

from __future__ import annotations

import errno
import os
import threading

import cffi
import pytest

from gblk.errors import EventChannelError, GrantError, XenUnavailable
from gblk.xen import barrier
from gblk.xen import evtchn as xevtchn
from gblk.xen import gnttab as xgnttab
from gblk.xen.host import RealXenHost
from gblk.xen.interfaces import PAGE_SIZE, CopySegment, XenHost

NO_XEN = not os.path.exists("/dev/xen")
needs_no_xen = pytest.mark.skipif(
    not NO_XEN, reason="this machine runs Xen: the no-Xen error path cannot happen here"
)



def _missing(module) -> str:
    """Why ``module``'s library cannot be loaded here ("" when it loads): the bindings'
    own XenUnavailable line, which names the Debian package."""
    try:
        module.load_library()
    except XenUnavailable as e:
        return str(e)
    return ""


GNTTAB_MISSING = _missing(xgnttab)
EVTCHN_MISSING = _missing(xevtchn)
# without the library there is nothing to load, call or probe: the test cannot run here
needs_libxengnttab = pytest.mark.skipif(bool(GNTTAB_MISSING), reason=GNTTAB_MISSING)
needs_libxenevtchn = pytest.mark.skipif(bool(EVTCHN_MISSING), reason=EVTCHN_MISSING)

GNTTAB_MESSAGE = (
    "no Xen grant device (/dev/xen/gntdev): is this dom0 with xen-gntdev loaded? "
    "try: modprobe xen-gntdev"
)
EVTCHN_MESSAGE = (
    "no Xen event channel device (/dev/xen/evtchn): is this dom0 with xen-evtchn loaded? "
    "try: modprobe xen-evtchn"
)


@needs_no_xen
@needs_libxengnttab
def test_grant_table_without_xen_is_one_clear_error(capfd):
    """Without /dev/xen, libxengnttab returns NULL/ENOENT and prints nothing: gblk
    turns that into XenUnavailable with one line saying what to do."""
    with pytest.raises(XenUnavailable) as e:
        xgnttab.RealGrantTable()
    assert str(e.value) == GNTTAB_MESSAGE
    assert type(e.value) is XenUnavailable
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


@needs_no_xen
@needs_libxenevtchn
def test_event_channel_without_xen_is_one_clear_error(capfd):
    """Same for libxenevtchn and /dev/xen/evtchn."""
    with pytest.raises(XenUnavailable) as e:
        xevtchn.RealEventChannel()
    assert str(e.value) == EVTCHN_MESSAGE
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_open_error_messages_for_other_errnos():
    """Permission problems and odd errors are told apart from "no Xen at all"."""
    assert "run gblk as root" in str(xgnttab.open_error(errno.EACCES))
    assert "run gblk as root" in str(xevtchn.open_error(errno.EPERM))
    assert str(xgnttab.open_error(errno.EIO)).endswith(os.strerror(errno.EIO))


def test_missing_library_names_the_debian_package():
    """A machine without Xen's libraries gets the package to install, not a cffi
    traceback."""
    with pytest.raises(XenUnavailable) as e:
        xgnttab.RealGrantTable(library="libxengnttab-absent.so.1")
    assert str(e.value) == (
        "libxengnttab-absent.so.1 not found: install the Debian package libxengnttab1"
    )
    with pytest.raises(XenUnavailable) as e:
        xevtchn.RealEventChannel(library="libxenevtchn-absent.so.1")
    assert str(e.value) == (
        "libxenevtchn-absent.so.1 not found: install the Debian package libxenevtchn1"
    )


@needs_libxengnttab
@needs_libxenevtchn
def test_libraries_load_and_export_every_declared_function():
    """libxengnttab.so.1 and libxenevtchn.so.1 (Debian's libxengnttab1/libxenevtchn1)
    load, and every function we declared resolves (ABI mode looks symbols up lazily,
    so a typo would otherwise only fail on real Xen)."""
    g = xgnttab.load_library()
    for name in ("xengnttab_open", "xengnttab_close", "xengnttab_map_domain_grant_refs",
                 "xengnttab_unmap", "xengnttab_set_max_grants", "xengnttab_grant_copy"):
        assert getattr(g, name) is not None
    e = xevtchn.load_library()
    for name in ("xenevtchn_open", "xenevtchn_close", "xenevtchn_fd", "xenevtchn_notify",
                 "xenevtchn_bind_interdomain", "xenevtchn_unbind", "xenevtchn_pending",
                 "xenevtchn_unmask"):
        assert getattr(e, name) is not None


def test_grant_copy_segment_layout_matches_xengnttab_h():
    """xengnttab_grant_copy_segment_t is 24 bytes: source @0, dest @8 (unions of a
    pointer and {ref u32, offset u16, domid u16}), len u16 @16, flags u16 @18,
    status s16 @20 (docs/protocol.md §8)."""
    ffi = xgnttab.ffi
    seg = "xengnttab_grant_copy_segment_t"
    assert ffi.sizeof(seg) == 24
    assert [ffi.offsetof(seg, f) for f in ("source", "dest", "len", "flags", "status")] == [
        0, 8, 16, 18, 20]
    assert ffi.sizeof("union xengnttab_copy_ptr") == 8
    s = ffi.new(seg + " *")
    s.status = -3
    assert s.status == -3  # signed
    raw = bytes(ffi.buffer(s))
    assert raw[20:22] == (-3).to_bytes(2, "little", signed=True)
    s.source.foreign.ref, s.source.foreign.offset, s.source.foreign.domid = 9, 512, 5
    raw = bytes(ffi.buffer(s))
    assert raw[0:8] == (9).to_bytes(4, "little") + (512).to_bytes(2, "little") + (5).to_bytes(
        2, "little")
    assert (xgnttab.GNTCOPY_source_gref, xgnttab.GNTCOPY_dest_gref) == (1, 2)


def _fake_region(pages: int):
    """A cffi buffer standing in for a region xengnttab mapped, and its unmap calls."""
    ffi = cffi.FFI()
    raw = ffi.new("char[]", pages * PAGE_SIZE)
    calls = []
    return raw, ffi.buffer(raw, pages * PAGE_SIZE), calls


def test_real_mapping_views_and_unmap_discipline():
    """RealGrantMapping: one 4096-byte view per page of the contiguous region, read-
    only views for read-only maps (writing a PROT_READ page would crash), unmap()
    releases the views, calls xengnttab_unmap once and is idempotent."""
    raw, buf, calls = _fake_region(3)
    done = []
    m = xgnttab.RealGrantMapping(buf, 3, False, lambda: calls.append("unmap"), done.append)
    assert [len(p) for p in m.pages] == [PAGE_SIZE] * 3
    assert m.contiguous is not None and len(m.contiguous) == 3 * PAGE_SIZE
    assert m.contiguous.readonly
    assert all(p.readonly for p in m.pages)
    raw[PAGE_SIZE] = b"x"
    assert m.pages[1][0] == ord("x")
    with pytest.raises(TypeError):
        m.pages[0][0] = 1
    del buf
    m.unmap()
    m.unmap()
    assert calls == ["unmap"] and done == [m]
    with pytest.raises(ValueError):
        m.pages[0][0]


def test_real_mapping_refuses_unmap_while_a_view_is_alive():
    """A slice of a page kept past unmap() would point into unmapped memory: unmap
    refuses (GrantError) and keeps the region mapped until the slice is released."""
    _raw, buf, calls = _fake_region(2)
    m = xgnttab.RealGrantMapping(buf, 2, True, lambda: calls.append("unmap"))
    del buf
    part = m.pages[1][100:200]
    part[0] = 42
    with pytest.raises(GrantError, match="still alive"):
        m.unmap()
    assert calls == []
    part.release()
    m.unmap()
    assert calls == ["unmap"]


def test_fence_is_callable_everywhere():
    """fence() runs (a private lock on x86) from many threads at once: it is
    a barrier, never a lock anyone could be left holding."""
    assert barrier.fence() is None
    errors = []

    def hammer() -> None:
        try:
            for _ in range(5000):
                barrier.fence()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_fence_kinds():
    """Both fence implementations are buildable by name; libatomic's is used when
    libatomic1 is installed, and its absence is explained, not a traceback."""
    barrier.make_fence("spinlock")()
    barrier.make_fence("lock")()
    try:
        fence = barrier.make_fence("libatomic")
    except XenUnavailable as e:
        assert str(e) == "libatomic.so.1 not found: install the Debian package libatomic1"
    else:
        fence()
    with pytest.raises(ValueError):
        barrier.make_fence("mfence")


@needs_libxengnttab
@needs_libxenevtchn
def test_real_host_is_lazy_and_reports_missing_pieces(tmp_path):
    """RealXenHost opens nothing at construction; probe() lists one line per missing
    piece (here: no /dev/xen); blkback_loaded() looks at sysfs."""
    host = RealXenHost(sysfs=str(tmp_path))
    assert isinstance(host, XenHost)
    assert host.fence() is barrier.fence
    assert host.blkback_loaded() is False
    (tmp_path / "bus" / "xen-backend" / "drivers" / "vbd").mkdir(parents=True)
    assert host.blkback_loaded() is True
    if NO_XEN:
        assert host.probe(xenstore=False) == [GNTTAB_MESSAGE, EVTCHN_MESSAGE]
    (tmp_path / "module" / "xen_blkback").mkdir(parents=True)
    assert RealXenHost(sysfs=str(tmp_path)).blkback_loaded() is True


class _FakeStore:
    def __init__(self, value):
        self.value = value
        self.closed = False

    def read(self, path):
        assert path == "domid"
        return self.value

    def close(self):
        self.closed = True


@pytest.mark.parametrize("value,expected", [("0", 0), ("3", 3), (None, 0), ("junk", 0)])
def test_real_host_domid_from_xenstore(monkeypatch, value, expected):
    """The backend's domid is XenStore's ``domid`` node (relative: the domain's own),
    0 when absent (dom0 on hosts where nobody wrote it); read once, connection closed."""
    store = _FakeStore(value)
    host = RealXenHost()
    monkeypatch.setattr(host, "open_xenstore", lambda: store)
    assert host.domid == expected
    assert store.closed
    store.value = "9"
    assert host.domid == expected


# --- the binding code driven through stand-ins for the C libraries --------------------

class FakeGnttab:
    """Stands in for libxengnttab: grants are pages of a pretend guest (domid 5)."""

    def __init__(self, grants):
        self.ffi = xgnttab.ffi
        self.handle = self.ffi.new("char[]", 1)
        self.grants = {ref: bytearray(page) for ref, page in grants.items()}
        self.readonly = set()
        self.regions = {}
        self.unmapped = []
        self.closed = False

    def xengnttab_open(self, logger, flags):
        return self.handle

    def xengnttab_map_domain_grant_refs(self, handle, count, domid, refs, prot):
        refs = [refs[i] for i in range(count)]
        if domid != 5 or any(r not in self.grants for r in refs):
            self.ffi.errno = errno.EINVAL
            return self.ffi.NULL
        region = self.ffi.new("char[]", count * PAGE_SIZE)
        for i, r in enumerate(refs):
            self.ffi.buffer(region + i * PAGE_SIZE, PAGE_SIZE)[:] = bytes(self.grants[r])
        self.regions[int(self.ffi.cast("uintptr_t", region))] = (region, refs, prot)
        return region

    def xengnttab_unmap(self, handle, addr, count):
        self.unmapped.append((int(self.ffi.cast("uintptr_t", addr)), count))
        return 0

    def xengnttab_set_max_grants(self, handle, count):
        return 0

    def xengnttab_grant_copy(self, handle, count, segs):
        ffi = self.ffi
        for i in range(count):
            s = segs[i]
            if s.flags == xgnttab.GNTCOPY_source_gref:
                ref, off, dom = s.source.foreign.ref, s.source.foreign.offset, s.source.foreign.domid
                if dom != 5 or ref not in self.grants:
                    s.status = -3
                    continue
                ffi.buffer(ffi.cast("char *", s.dest.virt), s.len)[:] = bytes(
                    self.grants[ref][off : off + s.len])
            elif s.flags == xgnttab.GNTCOPY_dest_gref:
                ref, off = s.dest.foreign.ref, s.dest.foreign.offset
                if ref in self.readonly:
                    s.status = -1
                    continue
                self.grants[ref][off : off + s.len] = ffi.buffer(
                    ffi.cast("char *", s.source.virt), s.len)[:]
            else:
                s.status = -10
                continue
            s.status = 0
        return 0

    def xengnttab_close(self, handle):
        self.closed = True
        return 0


def test_real_grant_table_drives_libxengnttab_correctly():
    """RealGrantTable's calls, checked against a stand-in library: the refs array,
    PROT_READ for read-only maps, one view per page of the region, xengnttab_unmap
    with the region's address and page count, a failed map -> GrantError with errno."""
    lib = FakeGnttab({8: b"a" * PAGE_SIZE, 9: b"b" * PAGE_SIZE})
    t = xgnttab.RealGrantTable(lib=lib)
    m = t.map_grant_refs(5, [9, 8], writable=False)
    (addr, (_region, refs, prot)), = lib.regions.items()
    assert refs == [9, 8] and prot == 1  # PROT_READ only
    assert bytes(m.pages[0][:2]) == b"bb" and bytes(m.pages[1][:2]) == b"aa"
    assert m.pages[0].readonly and (t.active_mappings, t.mapped_pages) == (1, 2)
    w = t.map_grant_refs(5, [8], writable=True)
    assert list(lib.regions.values())[1][2] == 3  # PROT_READ|PROT_WRITE
    assert not w.pages[0].readonly
    m.unmap()
    assert lib.unmapped == [(addr, 2)] and (t.active_mappings, t.mapped_pages) == (1, 1)
    with pytest.raises(GrantError) as e:
        t.map_grant_refs(5, [8, 77], writable=True)
    assert os.strerror(errno.EINVAL) in str(e.value)
    t.close()  # unmaps what is left, then closes the handle
    assert len(lib.unmapped) == 2 and lib.closed
    with pytest.raises(GrantError):
        t.map_grant_refs(5, [8], writable=True)


def test_real_grant_copy_fills_segments_both_ways():
    """grant_copy builds xengnttab segments with the right direction flag and
    pointers, and returns each segment's status."""
    lib = FakeGnttab({8: bytes(range(256)) * 16, 9: bytes(PAGE_SIZE)})
    lib.readonly.add(8)
    t = xgnttab.RealGrantTable(lib=lib)
    into = bytearray(16)
    out = bytearray(b"written by gblk!")
    st = t.grant_copy([
        CopySegment(5, 8, 16, 16, memoryview(into), True),
        CopySegment(5, 9, 100, 16, memoryview(out), False),
        CopySegment(5, 8, 0, 16, memoryview(out), False),
        CopySegment(5, 1234, 0, 16, memoryview(bytearray(16)), True),
    ])
    assert st == [0, 0, -1, -3]
    assert bytes(into) == bytes(range(16, 32))
    assert bytes(lib.grants[9][100:116]) == b"written by gblk!"
    assert t.grant_copy([]) == []
    t.close()


class FakeEvtchn:
    """Stands in for libxenevtchn: the fd is a pipe carrying pending port numbers."""

    def __init__(self):
        self.ffi = xevtchn.ffi
        self.handle = self.ffi.new("char[]", 1)
        self.r, self.w = os.pipe()
        self.calls = []

    def xenevtchn_open(self, logger, flags):
        return self.handle

    def xenevtchn_fd(self, handle):
        return self.r

    def xenevtchn_bind_interdomain(self, handle, domid, port):
        if port == 99:
            self.ffi.errno = errno.EINVAL
            return -1
        return 5

    def xenevtchn_pending(self, handle):
        try:
            return int.from_bytes(os.read(self.r, 4), "little")
        except BlockingIOError:
            self.ffi.errno = errno.EAGAIN
            return -1

    def xenevtchn_notify(self, handle, port):
        self.calls.append(("notify", port))
        return 0

    def xenevtchn_unmask(self, handle, port):
        self.calls.append(("unmask", port))
        return 0

    def xenevtchn_unbind(self, handle, port):
        self.ffi.errno = errno.ENOTCONN
        return -1

    def xenevtchn_close(self, handle):
        self.calls.append(("close",))
        os.close(self.r)
        os.close(self.w)
        return 0


def test_real_event_channel_drives_libxenevtchn_correctly():
    """RealEventChannel: the library's fd is the pollable fd, pending() is None
    (without blocking) when nothing fired, ports come back as ints, errors carry the
    errno name, close is idempotent."""
    lib = FakeEvtchn()
    ch = xevtchn.RealEventChannel(lib=lib)
    assert ch.fileno() == lib.r
    assert ch.pending() is None
    assert ch.bind_interdomain(3, 7) == 5
    with pytest.raises(EventChannelError) as e:
        ch.bind_interdomain(3, 99)
    assert "EINVAL" in str(e.value)
    os.write(lib.w, (5).to_bytes(4, "little"))
    assert ch.pending() == 5
    assert ch.pending() is None
    ch.notify(5)
    ch.unmask(5)
    with pytest.raises(EventChannelError, match="ENOTCONN"):
        ch.unbind(5)
    ch.close()
    ch.close()
    assert lib.calls == [("notify", 5), ("unmask", 5), ("close",)]
    with pytest.raises(EventChannelError, match="closed"):
        ch.pending()
