"""What a successor needs to answer a ring's requests exactly once: a small
memory-mapped file per ring (under ``<runtime dir>/rings/``).

The ring greenlet writes responses into the ring in request order, right before it
publishes them (``rsp_prod``), so every request at or after ``rsp_prod`` is still in
its slot for a restarted gblk, which serves it again (a READ or WRITE re-executed is
harmless). The one window: a process killed after writing some responses into their
slots and before publishing ``rsp_prod`` has overwritten those requests. So before a
batch of responses touches the ring, it is written here first:

1. the packed responses of slots ``[rsp_prod, new)`` into this file's copy of the
   ring's response slots;
2. ``to = new`` (one aligned 32-bit store: the commit; ``from`` already equals
   ``rsp_prod``, the end of the previous batch);
3. the responses into the ring, then ``rsp_prod = new`` (``push_responses``).

A successor (``recover``) that finds ``rsp_prod == from != to`` rewrites the
responses of ``[from, to)`` from here, byte for byte what the dead process wrote or
would have written, and publishes ``rsp_prod = to``: each of those requests answered
once, none re-executed. ``rsp_prod == to``: everything was published. Anything else
(another connection's file): ignored and reset. A file is trusted only on a takeover
(the disk was Connected when this process found it) and only when it names the same
ring (grant references, event channel, ABI); a fresh connection resets it.

The file lives in the process' page cache (MAP_SHARED): a SIGKILL loses nothing
written to it; a crash of the host takes the guests with it. Cost per response: one
``pack_into`` into this mapping; per batch, one 32-bit store.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from typing import Optional, Sequence

from ..blkif.const import U32_MASK
from ..blkif.ring import REQ_PROD, RSP_PROD, BackRing

MAGIC = 0x6B6C6267  # "gblk"
VERSION = 1
#: magic, version, identity (8 bytes), slots, rsp_size, from, to
_HEADER = struct.Struct("=II8sIIII")
HEADER_SIZE = 64
_FROM_WORD = 6  # index of ``from`` in the u32 view of the header (after the 8-byte identity)
_TO_WORD = 7
assert _HEADER.size == 4 * (_TO_WORD + 1) <= HEADER_SIZE


def identity(ring_refs: Sequence[int], remote_port: int, abi_name: str) -> bytes:
    """8 bytes naming one connection of one ring."""
    text = f"{list(ring_refs)}|{remote_port}|{abi_name}".encode()
    return hashlib.blake2b(text, digest_size=8).digest()


class RingJournal:
    """The file of one ring: ``slots`` responses of ``rsp_size`` bytes."""

    def __init__(self, path: str, ident: bytes, slots: int, rsp_size: int) -> None:
        self.path = path
        self.ident = ident
        self.slots = slots
        self.mask = slots - 1
        self.rsp_size = rsp_size
        size = HEADER_SIZE + slots * rsp_size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.buf = memoryview(self._map)
        self._words = self.buf[:HEADER_SIZE].cast("I")

    # -- the successor --------------------------------------------------------------
    def pending(self, rsp_prod: int, req_prod: int) -> Optional[range]:
        """The ring indices ``[from, to)`` whose responses a dead process journaled
        and did not publish (a range object of u32 indices, possibly empty), or None
        when this file says nothing about this ring now."""
        magic, version, ident, slots, rsp_size, frm, to = _HEADER.unpack_from(self.buf, 0)
        if (magic, version, ident, slots, rsp_size) != (MAGIC, VERSION, self.ident,
                                                        self.slots, self.rsp_size):
            return None
        n = (to - frm) & U32_MASK
        if rsp_prod == to:
            return range(0)
        if rsp_prod != frm or n > self.slots or n > ((req_prod - frm) & U32_MASK):
            return None
        return range(frm, frm + n)

    def response(self, index: int) -> memoryview:
        off = HEADER_SIZE + (index & self.mask) * self.rsp_size
        return self.buf[off:off + self.rsp_size]

    # -- the serving process ---------------------------------------------------------
    def reset(self, rsp_prod: int) -> None:
        """This connection, nothing pending."""
        _HEADER.pack_into(self.buf, 0, MAGIC, VERSION, self.ident, self.slots, self.rsp_size,
                          rsp_prod, rsp_prod)

    def begin(self, rsp_prod: int) -> None:
        """Before packing a batch: ``from`` is where it starts (normally already)."""
        w = self._words
        if w[_FROM_WORD] != rsp_prod:
            w[_TO_WORD] = w[_FROM_WORD]  # empty while ``from`` moves: never a bogus range
            w[_FROM_WORD] = rsp_prod
            w[_TO_WORD] = rsp_prod

    def commit(self, to: int) -> None:
        """The batch's responses are packed here: the ring may be written now."""
        self._words[_TO_WORD] = to

    def published(self, rsp_prod: int) -> None:
        """``rsp_prod`` is out: the next batch starts there."""
        self._words[_FROM_WORD] = rsp_prod

    def close(self, remove: bool) -> None:
        self._words.release()
        self.buf.release()
        self._map.close()
        if remove:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def recover(journal: RingJournal, ring: BackRing, adopt: bool) -> int:
    """At attach: on a takeover, answer what the dead process journaled and did not
    publish (rewritten byte for byte, then ``rsp_prod`` published, the ring's private
    indices moved past them); then start this connection's journal. Returns how many
    requests were answered from the journal (the caller notifies when > 0)."""
    rsp_prod = ring.idx[RSP_PROD]
    todo = journal.pending(rsp_prod, ring.idx[REQ_PROD]) if adopt else None
    n = len(todo) if todo is not None else 0
    if todo is not None and n:
        size = journal.rsp_size
        buf = ring.buf
        for index in todo:
            off = ring.offset(index)
            buf[off:off + size] = journal.response(index)
        end = (rsp_prod + n) & U32_MASK
        ring.req_cons = ring.rsp_prod_pvt = end
        ring.push_responses()
        journal.published(end)
    journal.reset(ring.rsp_prod_pvt)
    return n
