"""Grant tables on the simulated host, across real processes and real shared memory.

The guest (gblk.sim.hypervisor.memory.GuestMemory) runs in a child process driven over a pipe;
the backend side (gblk.sim.hypervisor.gnttab.SimGrantTable) runs here, as gblk's daemon would
in its own process. A mapping is a real mmap of the guest's RAM file.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from gblk.errors import GrantError
from gblk.sim.hypervisor.evtchn import SimEventChannel
from gblk.sim.hypervisor.gnttab import STATUS_NOT_GRANTED, STATUS_READONLY, SimGrantTable
from gblk.sim.hypervisor.memory import (
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    PAGE_SIZE,
    GuestMemory,
)
from gblk.sim.hypervisor.xenhost import SimXenHost
from gblk.xen import barrier
from gblk.xen.interfaces import (
    GNTST_bad_copy_arg,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_general_error,
    GNTST_no_device_space,
    GNTST_okay,
    CopySegment,
)

from ..integration.child_support import REPLY_DEADLINE, Child, child_fixture  # noqa: F401 - a fixture

_domids = itertools.count(1)


# --- a child process that plays the guest (or a second backend) ---------------------

class Agent:
    """What the child process can be asked to do (one JSON request per line)."""

    def __init__(self) -> None:
        self.guests: Dict[int, GuestMemory] = {}
        self.table: Optional[SimGrantTable] = None
        self.mappings: List[Any] = []

    # guest role
    def create(self, dir: str, domid: int, pages: int) -> int:
        self.guests[domid] = GuestMemory.create(dir, domid, pages, grant_entries=256)
        return os.getpid()

    def alloc(self, domid: int) -> int:
        return self.guests[domid].alloc_page()

    def grant(self, domid: int, frame: int, grantee: int, readonly: bool) -> int:
        return self.guests[domid].grant(frame, grantee, readonly)

    def write(self, domid: int, frame: int, offset: int, data: str) -> None:
        raw = bytes.fromhex(data)
        self.guests[domid].page(frame)[offset : offset + len(raw)] = raw

    def read(self, domid: int, frame: int, offset: int, length: int) -> str:
        return bytes(self.guests[domid].page(frame)[offset : offset + length]).hex()

    def end_access(self, domid: int, gref: int) -> bool:
        return self.guests[domid].end_access(gref)

    def revoke(self, domid: int, gref: int) -> None:
        self.guests[domid].revoke(gref)

    def is_mapped(self, domid: int, gref: int) -> bool:
        return self.guests[domid].is_mapped(gref)

    def entry(self, domid: int, gref: int) -> List[int]:
        return list(self.guests[domid].entry(gref))

    def destroy(self, domid: int) -> None:
        self.guests.pop(domid).destroy()

    # second-backend role
    def map(self, dir: str, domid: int, refs: List[int], writable: bool) -> int:
        if self.table is None:
            self.table = SimGrantTable(dir, 0)
        self.mappings.append(self.table.map_grant_refs(domid, refs, writable))
        return os.getpid()


@pytest.fixture
def host(tmp_path: Path, child: Child) -> Iterator[Dict[str, Any]]:
    """A fresh simulated domain, created by the guest child, and a backend table here."""
    domid = next(_domids)
    child.call("create", str(tmp_path), domid, 32)
    table = SimGrantTable(str(tmp_path), 0)
    yield {"dir": str(tmp_path), "domid": domid, "table": table, "guest": child}
    table.close()
    assert table.active_mappings == 0 and table.mapped_pages == 0


def _grant_pages(h: Dict[str, Any], n: int, readonly: bool = False) -> List[List[int]]:
    """[frame, gref] for n guest pages filled with a per-page pattern."""
    out = []
    for i in range(n):
        frame = h["guest"].call("alloc", h["domid"])
        h["guest"].call("write", h["domid"], frame, 0, (bytes([i + 1]) * PAGE_SIZE).hex())
        out.append([frame, h["guest"].call("grant", h["domid"], frame, 0, readonly)])
    return out


# --- tests ---------------------------------------------------------------------------

def test_page_granted_in_one_process_is_written_through_in_another(host):
    """The core promise of the simulated host: a page the guest granted, mapped by
    another process, is the guest's page; bytes written through the mapping are what
    the guest reads, with no copy in between; the grant shows GTF_reading/writing
    while mapped and the guest cannot end access until it is unmapped."""
    g, d, t = host["guest"], host["domid"], host["table"]
    [(frame, ref)] = _grant_pages(host, 1)
    m = t.map_grant_refs(d, [ref], writable=True)
    assert bytes(m.pages[0][:4]) == b"\x01" * 4  # the guest's data, seen here
    m.pages[0][100:112] = b"from backend"
    assert bytes.fromhex(g.call("read", d, frame, 100, 12)) == b"from backend"
    g.call("write", d, frame, 200, b"from guest".hex())
    assert bytes(m.pages[0][200:210]) == b"from guest"  # and the other way round
    assert g.call("entry", d, ref)[0] == GTF_permit_access | GTF_reading | GTF_writing
    assert g.call("is_mapped", d, ref) is True
    assert g.call("end_access", d, ref) is False
    assert (t.active_mappings, t.mapped_pages) == (1, 1)
    m.unmap()
    m.unmap()  # idempotent
    with pytest.raises(ValueError):
        m.pages[0][0]  # no usable view survives the unmap
    assert g.call("entry", d, ref)[0] == GTF_permit_access
    assert g.call("end_access", d, ref) is True


def test_several_grants_map_in_order_with_contiguous_frames_merged(host):
    """pages[i] is the page of refs[i], whatever the frames' order; ``contiguous``
    holds them all adjacently (libxengnttab's one region)."""
    d, t = host["domid"], host["table"]
    pages = _grant_pages(host, 5)
    refs = [ref for _frame, ref in pages]
    order = [3, 0, 1, 2, 4]
    m = t.map_grant_refs(d, [refs[i] for i in order], writable=False)
    assert [m.pages[k][0] for k in range(5)] == [i + 1 for i in order]
    # and all of them adjacent in one buffer, as a multi-page ring needs
    assert [m.contiguous[k * PAGE_SIZE] for k in range(5)] == [i + 1 for i in order]
    assert m.contiguous.readonly
    assert all(len(p) == PAGE_SIZE for p in m.pages)
    m.unmap()


def test_readonly_grant_refused_for_writable_map_and_mapped_prot_read(host):
    """A read-only grant (how guests grant the pages of a WRITE) cannot be mapped
    writable: GrantError with Xen's status and nothing mapped (XSA-142's cousin). A
    read-only mapping is PROT_READ: writing through it fails."""
    g, d, t = host["guest"], host["domid"], host["table"]
    [(_frame, ref)] = _grant_pages(host, 1, readonly=True)
    with pytest.raises(GrantError) as e:
        t.map_grant_refs(d, [ref], writable=True)
    assert e.value.status == STATUS_READONLY == GNTST_general_error
    assert t.active_mappings == 0 and g.call("is_mapped", d, ref) is False
    m = t.map_grant_refs(d, [ref], writable=False)
    assert m.pages[0].readonly
    with pytest.raises(TypeError):
        m.pages[0][0] = 0
    assert g.call("entry", d, ref)[0] == GTF_permit_access | GTF_readonly | GTF_reading
    m.unmap()


@pytest.mark.parametrize("k", [0, 3, 7])
@pytest.mark.parametrize("bad", ["out_of_range", "not_granted", "other_domain"])
def test_bad_gref_in_segment_k_of_n_maps_nothing(host, k, bad):
    """XSA-361/362/365/371: one bad grant among n fails the whole map with that
    grant's status, and leaves nothing mapped or pinned (no leaked grants)."""
    g, d, t = host["guest"], host["domid"], host["table"]
    refs = [ref for _frame, ref in _grant_pages(host, 8)]
    frame = g.call("alloc", d)
    bogus = {
        "out_of_range": (10_000, GNTST_bad_gntref),
        "not_granted": (200, STATUS_NOT_GRANTED),
        "other_domain": (g.call("grant", d, frame, 42, False), STATUS_NOT_GRANTED),
    }[bad]
    refs[k] = bogus[0]
    with pytest.raises(GrantError) as e:
        t.map_grant_refs(d, refs, writable=True)
    assert e.value.status == bogus[1]
    assert f"segment {k} of 8" in str(e.value)
    assert (t.active_mappings, t.mapped_pages) == (0, 0)
    for ref in refs:
        if ref < 256:
            assert g.call("is_mapped", d, ref) is False


def test_map_of_a_missing_domain_is_bad_domain(tmp_path):
    """A domain that does not exist (never created, or destroyed) is GNTST_bad_domain."""
    t = SimGrantTable(str(tmp_path), 0)
    with pytest.raises(GrantError) as e:
        t.map_grant_refs(99, [8], writable=False)
    assert e.value.status == GNTST_bad_domain
    t.close()


def test_revoke_while_mapped(host):
    """XSA-396: the frontend clears a grant the backend still maps. The existing
    mapping stays valid (Xen keeps the page referenced), the guest cannot free the
    ref until it is unmapped, and a fresh map of the revoked grant fails."""
    g, d, t = host["guest"], host["domid"], host["table"]
    [(frame, ref)] = _grant_pages(host, 1)
    m = t.map_grant_refs(d, [ref], writable=True)
    g.call("revoke", d, ref)
    assert g.call("entry", d, ref)[0] == 0
    m.pages[0][0:4] = b"late"  # no crash: the page is still there
    assert bytes.fromhex(g.call("read", d, frame, 0, 4)) == b"late"
    assert g.call("end_access", d, ref) is False
    m.unmap()
    assert g.call("is_mapped", d, ref) is False
    with pytest.raises(GrantError) as e:
        t.map_grant_refs(d, [ref], writable=False)
    assert e.value.status == STATUS_NOT_GRANTED
    assert g.call("end_access", d, ref) is True


def test_grant_copy_statuses(host, tmp_path):
    """grant_copy runs every segment and answers one GNTST status per segment:
    good segments copy in both directions while bad ones (bad ref, ungranted,
    read-only target, no such domain, bad offset/length) fail alone; no pin is left."""
    g, d, t = host["guest"], host["domid"], host["table"]
    (f_rw, r_rw), (f_ro, r_ro) = _grant_pages(host, 1) + _grant_pages(host, 1, readonly=True)
    into = bytearray(16)
    out = bytearray(b"0123456789abcdef")
    segs = [
        CopySegment(d, r_rw, 8, 16, memoryview(into), True),  # guest -> local
        CopySegment(d, r_rw, 4000, 16, memoryview(out), False),  # local -> guest
        CopySegment(d, r_ro, 0, 16, memoryview(out), False),  # into a read-only grant
        CopySegment(d, r_ro, 0, 16, memoryview(bytearray(16)), True),  # reading it is fine
        CopySegment(d, 10_000, 0, 16, memoryview(bytearray(16)), True),
        CopySegment(d, 201, 0, 16, memoryview(bytearray(16)), True),  # never granted
        CopySegment(d + 1000, r_rw, 0, 16, memoryview(bytearray(16)), True),
        CopySegment(d, r_rw, 4090, 16, memoryview(bytearray(16)), True),  # crosses the page
        CopySegment(d, r_rw, 0, 16, memoryview(bytearray(8)), True),  # local too short
        CopySegment(d, r_rw, 0, 16, memoryview(bytes(16)), True),  # local read-only
    ]
    assert t.grant_copy(segs) == [
        GNTST_okay, GNTST_okay, STATUS_READONLY, GNTST_okay, GNTST_bad_gntref,
        STATUS_NOT_GRANTED, GNTST_bad_domain, GNTST_bad_copy_arg, GNTST_bad_copy_arg,
        GNTST_bad_copy_arg,
    ]
    assert bytes(into) == b"\x01" * 16
    assert bytes.fromhex(g.call("read", d, f_rw, 4000, 16)) == bytes(out)
    assert bytes.fromhex(g.call("read", d, f_ro, 0, 16)) == b"\x01" * 16
    for ref in (r_rw, r_ro):
        assert g.call("is_mapped", d, ref) is False
        assert g.call("entry", d, ref)[0] & (GTF_reading | GTF_writing) == 0
    assert t.grant_copy([]) == []


def test_pins_of_a_dead_backend_process_are_reclaimed(host, child):
    """A backend process that dies with grants mapped (kill -9) does not keep the
    guest's pages pinned forever: like the kernel unmapping a dead process's
    grants, the next look at the entry drops its pins."""
    g, d = host["guest"], host["domid"]
    refs = [ref for _frame, ref in _grant_pages(host, 2)]
    other = Child(__name__)
    try:
        pid = other.call("map", host["dir"], d, refs, True)
        assert g.call("end_access", d, refs[0]) is False
        os.kill(pid, signal.SIGKILL)
        other.proc.wait(timeout=REPLY_DEADLINE)
    finally:
        other.close()
    assert g.call("is_mapped", d, refs[0]) is False
    assert g.call("end_access", d, refs[0]) is True
    assert g.call("end_access", d, refs[1]) is True


def test_two_backend_processes_share_pins(host):
    """Pins are counted across processes: the guest's page stays mapped until the
    last mapper lets go."""
    g, d, t = host["guest"], host["domid"], host["table"]
    [(_frame, ref)] = _grant_pages(host, 1)
    other = Child(__name__)
    try:
        other.call("map", host["dir"], d, [ref], False)
        m = t.map_grant_refs(d, [ref], writable=True)
        m.unmap()
        assert g.call("is_mapped", d, ref) is True
        assert g.call("entry", d, ref)[0] == GTF_permit_access | GTF_reading
    finally:
        other.close()  # exits: its pins are reclaimed as a dead process's
    assert g.call("end_access", d, ref) is True


def test_unmap_refuses_while_a_derived_view_is_alive(host):
    """unmap() never leaves a usable view into unmapped memory: while a slice of a
    page is alive it refuses (GrantError) and keeps the page mapped and pinned."""
    g, d, t = host["guest"], host["domid"], host["table"]
    [(_frame, ref)] = _grant_pages(host, 1)
    m = t.map_grant_refs(d, [ref], writable=True)
    part = m.pages[0][10:20]
    with pytest.raises(GrantError, match="still alive"):
        m.unmap()
    assert t.active_mappings == 1 and g.call("is_mapped", d, ref) is True
    part[0] = 7  # still valid: the page is still mapped
    part.release()
    m.unmap()
    assert t.active_mappings == 0 and g.call("is_mapped", d, ref) is False


def test_destroyed_domain_keeps_existing_mappings_only(host):
    """Destroying a domain with pages mapped does not pull memory from under the
    backend (its mapping stays readable, its unmap succeeds); new maps get
    GNTST_bad_domain."""
    g, d, t = host["guest"], host["domid"], host["table"]
    [(_frame, ref)] = _grant_pages(host, 1)
    m = t.map_grant_refs(d, [ref], writable=True)
    g.call("destroy", d)
    assert m.pages[0][0] == 1
    with pytest.raises(GrantError) as e:
        t.map_grant_refs(d, [ref], writable=True)
    assert e.value.status == GNTST_bad_domain
    m.unmap()


def test_set_max_grants_limits_mapped_pages(host):
    """xengnttab_set_max_grants: maps beyond the limit fail and map nothing."""
    g, d, t = host["guest"], host["domid"], host["table"]
    refs = [ref for _frame, ref in _grant_pages(host, 3)]
    t.set_max_grants(2)
    m = t.map_grant_refs(d, refs[:2], writable=False)
    with pytest.raises(GrantError) as e:
        t.map_grant_refs(d, refs[2:], writable=False)
    assert e.value.status == GNTST_no_device_space
    assert g.call("is_mapped", d, refs[2]) is False
    m.unmap()


def test_close_unmaps_everything(host):
    """Closing a handle unmaps what it still maps, as closing /dev/xen/gntdev does."""
    g, d, t = host["guest"], host["domid"], host["table"]
    refs = [ref for _frame, ref in _grant_pages(host, 2)]
    t.map_grant_refs(d, refs, writable=True)
    t.close()
    assert t.active_mappings == 0
    assert g.call("is_mapped", d, refs[0]) is False
    with pytest.raises(GrantError):
        t.map_grant_refs(d, refs, writable=True)


def test_concurrent_maps_from_threads(host):
    """The engine maps from gevent's threadpool: concurrent map/copy/unmap from
    several threads leave every pin and counter consistent."""
    g, d, t = host["guest"], host["domid"], host["table"]
    refs = [ref for _frame, ref in _grant_pages(host, 4)]
    errors: List[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(150):
                sel = [refs[(seed + i) % 4], refs[(seed + i + 1) % 4]]
                m = t.map_grant_refs(d, sel, writable=bool(i % 2))
                buf = bytearray(8)
                assert t.grant_copy([CopySegment(d, sel[0], 0, 8, memoryview(buf), True)]) == [0]
                m.unmap()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert (t.active_mappings, t.mapped_pages) == (0, 0)
    for ref in refs:
        assert g.call("is_mapped", d, ref) is False
        assert g.call("entry", d, ref)[0] == GTF_permit_access


def test_sim_xen_host_hands_out_the_simulated_pieces(tmp_path):
    """SimXenHost(DIR) is what ``--xen sim:DIR`` uses: simulated grant table and
    event channel for its domid, the real memory fence, and the xenstored socket at
    DIR/xenstored.sock."""
    h = SimXenHost(str(tmp_path))
    gt, ec = h.open_grant_table(), h.open_event_channel()
    assert isinstance(gt, SimGrantTable) and isinstance(ec, SimEventChannel)
    assert (gt.domid, ec.domid, h.domid) == (0, 0, 0)
    assert h.fence() is barrier.fence
    assert h.xenstore_socket == os.path.join(str(tmp_path), "xenstored.sock")
    assert not h.blkback_loaded()
    gt.close()
    ec.close()

