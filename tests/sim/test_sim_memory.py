"""Guest side of the simulated host's memory: gblk.sim.hypervisor.memory.GuestMemory.

In-process and fast: a scratch directory, the domain's shared files, no backend
process (tests/sim/test_sim_grants.py maps them from another process).
"""

from __future__ import annotations

import os
import struct

import pytest

from gblk.sim.hypervisor.gnttab import SimGrantTable
from gblk.sim.hypervisor.memory import (
    ACTIVE_ENTRY,
    ACTIVE_SLOTS,
    IDLE,
    ActiveEntry,
    DEFAULT_GRANT_ENTRIES,
    GRANT_ENTRY_V1,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    PAGE_SIZE,
    GuestMemory,
    domain_dir,
)


@pytest.fixture
def guest(tmp_path):
    g = GuestMemory.create(str(tmp_path), 7, pages=16, grant_entries=64)
    yield g
    g.close()


def test_gtf_bits_are_xens():
    """The grant entry flags are the ABI values of xen/include/public/grant_table.h,
    so a reader with the header open can decode a dumped table."""
    assert (GTF_permit_access, GTF_readonly, GTF_reading, GTF_writing) == (1, 4, 8, 16)
    assert GRANT_ENTRY_V1.size == 8 and ACTIVE_ENTRY.size == 56


def test_create_lays_out_the_documented_files(tmp_path):
    """DIR/domains/<domid>/{mem,gnttab,active,alloc,lock} have the documented sizes:
    other processes (backend, toolstack) rely on that layout."""
    g = GuestMemory.create(str(tmp_path), 3, pages=5, grant_entries=32)
    d = domain_dir(str(tmp_path), 3)
    sizes = {name: os.path.getsize(os.path.join(d, name)) for name in os.listdir(d)}
    assert sizes == {"mem": 5 * PAGE_SIZE, "gnttab": 32 * 8, "active": 32 * 56,
                     "alloc": 5 + 32, "lock": 0}
    assert (g.pages, g.grant_entries, g.domid) == (5, 32, 3)
    g.close()
    assert GuestMemory.create.__defaults__ == (DEFAULT_GRANT_ENTRIES,)


def test_create_twice_and_open_missing_fail(tmp_path):
    """A domid exists once; opening a domain nobody created is an error, not an
    empty domain."""
    g = GuestMemory.create(str(tmp_path), 1, pages=1, grant_entries=16)
    with pytest.raises(FileExistsError):
        GuestMemory.create(str(tmp_path), 1, pages=1, grant_entries=16)
    with pytest.raises(FileNotFoundError):
        GuestMemory.open(str(tmp_path), 2)
    g.close()


def test_grant_writes_a_v1_entry_with_reserved_refs_skipped(guest):
    """grant() fills flags/domid/frame exactly as a Linux guest does and never
    hands out refs 0..7 (reserved, as in Linux)."""
    frame = guest.alloc_page()
    ref = guest.grant(frame, 0)
    ro = guest.grant(frame, 0, readonly=True)
    assert ref == 8 and ro == 9
    raw = open(os.path.join(domain_dir(guest.dir, 7), "gnttab"), "rb").read()
    assert raw[8 * 8 : 8 * 8 + 8] == struct.pack("<HHI", GTF_permit_access, 0, frame)
    assert raw[9 * 8 : 9 * 8 + 8] == struct.pack("<HHI", GTF_permit_access | GTF_readonly, 0, frame)
    with pytest.raises(ValueError):
        guest.end_access(3)


def test_pages_are_shared_between_openers(guest):
    """Two openers of a domain see the same RAM: the guest's memory is one file."""
    frame = guest.alloc_page()
    guest.page(frame)[10:15] = b"hello"
    other = GuestMemory.open(guest.dir, guest.domid)
    assert bytes(other.page(frame)[10:15]) == b"hello"
    # the allocator is shared too: the other opener never hands out the same frame
    assert other.alloc_page() != frame
    other.close()


def test_allocators_run_out_and_recycle(guest):
    """alloc_page/grant raise MemoryError when full and reuse what was freed."""
    frames = [guest.alloc_page() for _ in range(guest.pages)]
    assert sorted(frames) == list(range(guest.pages))
    with pytest.raises(MemoryError):
        guest.alloc_page()
    guest.free_page(frames[3])
    assert guest.alloc_page() == frames[3]
    with pytest.raises(ValueError):
        guest.free_page(99)
    refs = [guest.grant(0, 0) for _ in range(guest.grant_entries - 8)]
    with pytest.raises(MemoryError):
        guest.grant(0, 0)
    assert guest.end_access(refs[5]) is True
    assert guest.grant(0, 0) == refs[5]
    assert guest.grants_in_use() == guest.grant_entries - 8


def test_end_access_refuses_while_mapped_and_revoke_does_not(guest):
    """end_access is False while a backend maps the grant (the frontend must not
    reuse the page), True once unmapped; revoke clears the entry regardless
    (the hostile frontend of XSA-396) but the ref stays busy until unmapped."""
    frame = guest.alloc_page()
    ref = guest.grant(frame, 0)
    table = SimGrantTable(guest.dir, 0)
    mapping = table.map_grant_refs(guest.domid, [ref], writable=True)
    assert guest.entry(ref).flags == GTF_permit_access | GTF_reading | GTF_writing
    assert guest.is_mapped(ref)
    assert guest.end_access(ref) is False
    guest.revoke(ref)
    assert guest.entry(ref).flags == 0
    assert guest.end_access(ref) is False  # still mapped: Xen still holds the page
    mapping.unmap()
    assert not guest.is_mapped(ref)
    assert guest.end_access(ref) is True
    table.close()


def test_destroy_removes_the_domain(tmp_path):
    """destroy() removes every file of the domain; its domid can be created again."""
    g = GuestMemory.create(str(tmp_path), 4, pages=2, grant_entries=16)
    g.destroy()
    assert not os.path.exists(domain_dir(str(tmp_path), 4))
    GuestMemory.create(str(tmp_path), 4, pages=2, grant_entries=16).destroy()


def test_write_entry_is_raw(guest):
    """The hostile hook writes any entry, e.g. a grant to a frame beyond RAM."""
    ref = guest.grant(0, 0)
    guest.write_entry(ref, GTF_permit_access, 0, 10_000)
    assert tuple(guest.entry(ref)) == (GTF_permit_access, 0, 10_000)


def test_pages_view_spans_adjacent_frames(guest):
    """pages_view gives a multi-page ring one contiguous view of adjacent frames."""
    view = guest.pages_view(2, 3)
    assert len(view) == 3 * PAGE_SIZE
    view[PAGE_SIZE] = 9
    assert guest.page(3)[0] == 9
    with pytest.raises(ValueError):
        guest.pages_view(14, 3)


def test_active_entry_counts_pins_per_process():
    """Pins are kept per process (so a dead process's pins can be dropped exactly),
    up to ACTIVE_SLOTS processes at once; the frame and mapping domain are those
    of the first pin; the last unpin returns the entry to idle."""
    a = IDLE.pinned(100, True, frame=5, domid=0)
    a = a.pinned(100, False, frame=99, domid=0).pinned(200, False, frame=99, domid=0)
    assert (a.frame, a.domid, a.rpins, a.wpins) == (5, 0, 2, 1)
    assert ActiveEntry.unpack(ACTIVE_ENTRY.unpack(ACTIVE_ENTRY.pack(*a.pack()))) == a
    for pid in range(300, 300 + ACTIVE_SLOTS - 2):
        a = a.pinned(pid, False, 5, 0)
    assert not a.has_slot_for(999) and a.has_slot_for(200)
    a = a.unpinned(200, False)
    assert a.has_slot_for(999)
    a = a.unpinned(100, True)
    assert (a.rpins, a.wpins) == (ACTIVE_SLOTS - 1, 0)
    for pid in [100] + list(range(300, 300 + ACTIVE_SLOTS - 2)):
        a = a.unpinned(pid, False)
    assert a == IDLE
