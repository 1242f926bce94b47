"""The simulated xenstored's rules, checked without sockets (gblk.sim.xenstored.store)."""

from __future__ import annotations

from typing import List

import pytest

from gblk.sim.xenstored import store as xs
from gblk.xen import xs_wire as w
from gblk.xen.xs_wire import XsError

DOM0 = xs.Caller(0)
DOM5 = xs.Caller(5)
DOM7 = xs.Caller(7)


def arg(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)


def write(view: xs.View, caller: xs.Caller, path: str, value: bytes = b"") -> None:
    xs.op_write(view, caller, path.encode() + b"\0" + value)


def read(view: xs.View, caller: xs.Caller, path: str) -> bytes:
    return xs.op_read(view, caller, arg(path))


def set_perms(view: xs.View, caller: xs.Caller, path: str, *perms: str) -> None:
    xs.op_set_perms(view, caller, arg(path, *perms))


def err(fn: object, *args: object) -> str:
    with pytest.raises(XsError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.name


@pytest.fixture
def store() -> xs.Store:
    return xs.Store(xs.Quotas(nodes=20, watches=4, transactions=2, entry_size=2048, perms=5))


@pytest.fixture
def fires(store: xs.Store) -> List[xs.Fire]:
    seen: List[xs.Fire] = []
    store.on_fire = seen.append
    return seen


def guest_home(store: xs.Store, domid: int) -> str:
    """What a toolstack does: /local/domain/N owned by N, readable by dom0."""
    home = f"/local/domain/{domid}"
    xs.op_mkdir(store, DOM0, arg(home))
    set_perms(store, DOM0, home, f"n{domid}", "r0")
    return home


def test_initial_tree_is_xenstoreds() -> None:
    """A fresh store has /, /tool and /tool/xenstored, owned by dom0 with no access
    for others, like C xenstored's setup_structure."""
    store = xs.Store()
    assert xs.op_directory(store, DOM0, arg("/")) == b"tool\0"
    assert xs.op_get_perms(store, DOM0, arg("/tool/xenstored")) == b"n0\0"


def test_write_creates_parents_inheriting_permissions(store: xs.Store) -> None:
    """Missing parents are created empty with their parent's permissions; when a
    guest writes, it owns what it creates (construct_node)."""
    home = guest_home(store, 5)
    set_perms(store, DOM0, home, "n5", "r0", "b7")
    write(store, DOM5, "data/a/b", b"v")
    assert read(store, DOM5, f"{home}/data/a/b") == b"v"
    assert read(store, DOM5, f"{home}/data/a") == b""
    assert xs.op_get_perms(store, DOM5, arg(f"{home}/data")) == b"n5\0r0\0b7\0"
    write(store, DOM0, "/x/y", b"1")
    assert xs.op_get_perms(store, DOM0, arg("/x/y")) == b"n0\0"


def test_guest_created_node_is_owned_by_the_guest(store: xs.Store) -> None:
    """A node a guest creates under a node writable by it is owned by the guest,
    not by the parent's owner."""
    xs.op_mkdir(store, DOM0, arg("/shared"))
    set_perms(store, DOM0, "/shared", "n0", "b5")
    write(store, DOM5, "/shared/mine", b"1")
    assert xs.op_get_perms(store, DOM0, arg("/shared/mine")) == b"n5\0b5\0"


def test_enoent_or_eacces_depends_on_the_nearest_ancestor(store: xs.Store) -> None:
    """A guest learns ENOENT only where it could read the nearest existing
    ancestor; otherwise EACCES (errno_from_parents): no probing of others' trees."""
    home = guest_home(store, 5)
    assert err(read, store, DOM5, f"{home}/missing") == w.ENOENT
    assert err(read, store, DOM5, "/local/domain/7/missing") == w.EACCES
    assert err(read, store, DOM5, "/tool/xenstored") == w.EACCES
    assert err(read, store, DOM0, "/nothing/here") == w.ENOENT


def test_guest_cannot_write_where_it_may_not(store: xs.Store) -> None:
    """Writing a node needs WRITE on it, creating one needs WRITE on the nearest
    existing ancestor."""
    guest_home(store, 5)
    write(store, DOM0, "/local/domain/5/ro", b"x")
    set_perms(store, DOM0, "/local/domain/5/ro", "n0", "r5")
    assert err(write, store, DOM5, "/local/domain/5/ro", b"y") == w.EACCES
    assert err(write, store, DOM5, "/tool/new", b"y") == w.EACCES
    assert err(write, store, DOM7, "/local/domain/5/x", b"y") == w.EACCES
    assert read(store, DOM5, "/local/domain/5/ro") == b"x"


def test_per_domain_entries_and_default_access(store: xs.Store) -> None:
    """The first entry naming the caller wins; otherwise the owner entry's default."""
    write(store, DOM0, "/p", b"v")
    set_perms(store, DOM0, "/p", "r0", "n5")
    assert err(read, store, DOM5, "/p") == w.EACCES
    assert read(store, DOM7, "/p") == b"v"


def test_set_perms_rules(store: xs.Store) -> None:
    """Only the owner or dom0 may set permissions; a guest may not give a node
    away (EPERM); malformed permissions are EINVAL; too many are ENOSPC."""
    home = guest_home(store, 5)
    write(store, DOM5, "n", b"")
    set_perms(store, DOM5, f"{home}/n", "n5", "r7")
    assert err(set_perms, store, DOM5, f"{home}/n", "n7") == w.EPERM
    assert err(set_perms, store, DOM7, f"{home}/n", "n7") == w.EACCES
    assert err(set_perms, store, DOM0, f"{home}/n", "x5") == w.EINVAL
    assert err(set_perms, store, DOM0, f"{home}/n", "r") == w.EINVAL
    assert err(xs.op_set_perms, store, DOM0, arg(f"{home}/n")) == w.EINVAL
    too_many = ["n5"] + [f"r{i}" for i in range(10, 16)]
    assert err(set_perms, store, DOM5, f"{home}/n", *too_many) == w.ENOSPC
    set_perms(store, DOM0, f"{home}/n", *too_many)  # dom0 is not limited


def test_invalid_paths_are_einval(store: xs.Store) -> None:
    """Paths xenstored refuses: trailing or double slash, bad characters, too long,
    and payloads that are not exactly one NUL-terminated string."""
    for bad in ("/a/", "/a//b", "/a b", "/a.b", "/" + "x" * 3072):
        assert err(read, store, DOM0, bad) == w.EINVAL
    assert err(xs.op_read, store, DOM0, b"/tool") == w.EINVAL
    assert err(xs.op_read, store, DOM0, b"/tool\0extra\0") == w.EINVAL
    assert err(xs.op_write, store, DOM0, b"/no-nul") == w.EINVAL
    # A guest's limit is relative to its home.
    home = guest_home(store, 5)
    assert err(write, store, DOM5, home + "/" + "y" * 2049) == w.EINVAL


def test_relative_paths_resolve_under_the_callers_home(store: xs.Store) -> None:
    """"name" from domain 5 means /local/domain/5/name."""
    guest_home(store, 5)
    write(store, DOM5, "name", b"guest")
    assert read(store, DOM0, "/local/domain/5/name") == b"guest"
    write(store, DOM0, "x", b"1")
    assert read(store, DOM0, "/local/domain/0/x") == b"1"


def test_rm_semantics(store: xs.Store) -> None:
    """rm removes a subtree; a missing node is fine when its parent exists, ENOENT
    otherwise; / cannot be removed (EINVAL)."""
    write(store, DOM0, "/a/b/c", b"1")
    xs.op_rm(store, DOM0, arg("/a/b"))
    assert xs.op_directory(store, DOM0, arg("/a")) == b""
    assert "/a/b/c" not in store.nodes
    xs.op_rm(store, DOM0, arg("/a/missing"))
    assert err(xs.op_rm, store, DOM0, arg("/nope/missing")) == w.ENOENT
    assert err(xs.op_rm, store, DOM0, arg("/")) == w.EINVAL


def test_mkdir_keeps_existing_values(store: xs.Store, fires: List[xs.Fire]) -> None:
    """mkdir of an existing node changes nothing and fires nothing."""
    write(store, DOM0, "/m", b"keep")
    fires.clear()
    xs.op_mkdir(store, DOM0, arg("/m"))
    assert read(store, DOM0, "/m") == b"keep"
    assert fires == []


def test_rm_fires_for_every_removed_node(store: xs.Store, fires: List[xs.Fire]) -> None:
    """Removing a subtree fires exactly on every removed descendant, children
    first (for watches placed on them), then on the removed node (for watches on
    it and above), as xenstored 4.17's tree walk does."""
    write(store, DOM0, "/t/a/x", b"1")
    write(store, DOM0, "/t/b", b"2")
    fires.clear()
    xs.op_rm(store, DOM0, arg("/t"))
    assert fires[-1].path == "/t" and not fires[-1].exact
    assert [(f.path, f.exact) for f in fires[:-1]] == [
        ("/t/a/x", True), ("/t/a", True), ("/t/b", True)]
    watch_on_child = xs.Watch("/t/a/x", b"tok")
    watch_above = xs.Watch("/", b"tok")
    watch_elsewhere = xs.Watch("/t2", b"tok")
    assert any(watch_on_child.matches(f) for f in fires)
    assert watch_above.matches(fires[-1])
    assert not any(watch_elsewhere.matches(f) for f in fires)


def test_watch_matching_and_relative_event_paths() -> None:
    """A watch on P fires for changes at P or below, never for a sibling sharing a
    prefix; a relative watch reports relative paths."""
    watch = xs.check_watch_path(DOM5, "device")
    assert watch.node == "/local/domain/5/device" and watch.prefix == "/local/domain/5"
    change = xs.Fire("/local/domain/5/device/vbd/51712/state", False, ())
    assert watch.matches(change)
    assert watch.event_path(change.path) == "device/vbd/51712/state"
    assert not watch.matches(xs.Fire("/local/domain/5/devices", False, ()))
    special = xs.check_watch_path(DOM0, w.RELEASE_DOMAIN)
    assert special.matches(xs.Fire(w.RELEASE_DOMAIN, False, ()))
    assert not special.matches(xs.Fire("/local", False, ()))
    assert not xs.Watch("/", b"").matches(xs.Fire(w.RELEASE_DOMAIN, False, ()))
    with pytest.raises(XsError):
        xs.check_watch_path(DOM0, "/bad//path")


def test_watch_permission_follows_the_node_or_its_parent(store: xs.Store) -> None:
    """A watcher sees a change only if it can read the node, its parent, or (for a
    permission change) the node's old permissions."""
    fire = xs.Fire("/x", False, ((xs.Perm(0, xs.PERM_NONE),),))
    assert xs.watch_permitted(DOM0, store, fire)
    assert not xs.watch_permitted(DOM5, store, fire)
    fire = xs.Fire("/x", False, ((xs.Perm(0, xs.PERM_NONE),), (xs.Perm(0, xs.PERM_READ),)))
    assert xs.watch_permitted(DOM5, store, fire)
    special = xs.Fire(w.RELEASE_DOMAIN, False, ())
    assert xs.watch_permitted(DOM0, store, special)
    assert not xs.watch_permitted(DOM5, store, special)


def test_transaction_isolation_and_commit(store: xs.Store, fires: List[xs.Fire]) -> None:
    """Changes in a transaction are visible only inside it until commit; watches
    fire on commit."""
    write(store, DOM0, "/k", b"old")
    fires.clear()
    tx = xs.Transaction(store, 1, DOM0)
    write(tx, DOM0, "/k", b"new")
    write(tx, DOM0, "/k2/deep", b"x")
    assert read(tx, DOM0, "/k") == b"new"
    assert read(store, DOM0, "/k") == b"old"
    assert err(read, store, DOM0, "/k2") == w.ENOENT
    assert fires == []
    tx.commit()
    assert read(store, DOM0, "/k") == b"new"
    assert read(store, DOM0, "/k2/deep") == b"x"
    assert {f.path for f in fires} == {"/k", "/k2/deep"}


def test_transaction_conflict_is_eagain(store: xs.Store) -> None:
    """A transaction fails with EAGAIN when a node it read changed meanwhile, even
    if it did not write that node."""
    write(store, DOM0, "/c", b"1")
    tx = xs.Transaction(store, 1, DOM0)
    read(tx, DOM0, "/c")
    write(tx, DOM0, "/other", b"x")
    write(store, DOM0, "/c", b"2")
    assert err(tx.commit) == w.EAGAIN
    assert "/other" not in store.nodes


def test_transaction_conflict_on_concurrent_creation(store: xs.Store) -> None:
    """Creating a node another writer created meanwhile conflicts too (the parent
    and the node's absence were both read)."""
    tx = xs.Transaction(store, 1, DOM0)
    write(tx, DOM0, "/new", b"tx")
    write(store, DOM0, "/new", b"outside")
    assert err(tx.commit) == w.EAGAIN
    assert read(store, DOM0, "/new") == b"outside"


def test_independent_transactions_both_commit(store: xs.Store) -> None:
    """Transactions touching different nodes do not conflict."""
    write(store, DOM0, "/p/a", b"")
    write(store, DOM0, "/p/b", b"")
    t1 = xs.Transaction(store, 1, DOM0)
    t2 = xs.Transaction(store, 2, DOM0)
    write(t1, DOM0, "/p/a", b"1")
    write(t2, DOM0, "/p/b", b"2")
    t1.commit()
    t2.commit()
    assert (read(store, DOM0, "/p/a"), read(store, DOM0, "/p/b")) == (b"1", b"2")


def test_rm_inside_a_transaction(store: xs.Store) -> None:
    """A subtree removed in a transaction is gone inside it at once and outside
    after commit."""
    write(store, DOM0, "/r/a/b", b"1")
    tx = xs.Transaction(store, 1, DOM0)
    xs.op_rm(tx, DOM0, arg("/r/a"))
    assert err(read, tx, DOM0, "/r/a/b") == w.ENOENT
    assert read(store, DOM0, "/r/a/b") == b"1"
    tx.commit()
    assert "/r/a/b" not in store.nodes and "/r/a" not in store.nodes
    assert xs.op_directory(store, DOM0, arg("/r")) == b""


def test_node_quota_for_guests(store: xs.Store) -> None:
    """A guest owning Quotas.nodes nodes gets ENOSPC for one more; dom0 is not
    limited (xenstored's quota_nb_entry_per_domain)."""
    home = guest_home(store, 5)  # owned by 5: one node counted
    for i in range(19):
        write(store, DOM5, f"{home}/n{i}", b"")
    assert store.owned(5) == 20
    assert err(write, store, DOM5, f"{home}/one-more", b"") == w.ENOSPC
    # dom0 is not limited; what it creates under the guest's home is the guest's
    # and counts against the guest, as in xenstored.
    write(store, DOM0, f"{home}/by-dom0", b"")
    assert store.owned(5) == 21
    xs.op_rm(store, DOM5, arg(f"{home}/n0"))
    xs.op_rm(store, DOM5, arg(f"{home}/n1"))
    write(store, DOM5, f"{home}/again", b"")


def test_node_quota_counts_missing_parents(store: xs.Store) -> None:
    """Implicitly created parents count: all or nothing."""
    home = guest_home(store, 5)
    for i in range(17):
        write(store, DOM5, f"{home}/n{i}", b"")
    assert err(write, store, DOM5, f"{home}/a/b/c", b"") == w.ENOSPC
    assert err(read, store, DOM5, f"{home}/a") == w.ENOENT


def test_entry_size_quota_for_guests(store: xs.Store) -> None:
    """A guest's node larger than Quotas.entry_size is refused with ENOSPC."""
    home = guest_home(store, 5)
    assert err(write, store, DOM5, f"{home}/big", b"x" * 2048) == w.ENOSPC
    write(store, DOM5, f"{home}/ok", b"x" * 1900)
    write(store, DOM0, f"{home}/big", b"x" * 3000)


def test_directory_part_chunks_large_listings(store: xs.Store) -> None:
    """DIRECTORY_PART hands out a long child list in <= 4096-byte pieces, each
    with the node's generation, the last one ending in an extra NUL."""
    names = [f"child-{i:04d}-" + "p" * 40 for i in range(200)]
    for name in names:
        write(store, DOM0, f"/big/{name}", b"")
    full = xs.op_directory(store, DOM0, arg("/big"))
    assert len(full) > w.XENSTORE_PAYLOAD_MAX
    got = b""
    offset = 0
    gens = set()
    while True:
        reply = xs.op_directory_part(store, DOM0, arg("/big", str(offset)))
        assert len(reply) <= w.XENSTORE_PAYLOAD_MAX
        gen, _, rest = reply.partition(b"\0")
        gens.add(gen)
        if rest.endswith(b"\0\0") or rest == b"\0":
            got += rest[:-1]
            break
        got += rest
        offset += len(rest)
    assert got == full and len(gens) == 1
    assert xs.op_directory_part(store, DOM0, arg("/big", "999999")).endswith(b"\0\0")


def test_special_node_permissions(store: xs.Store) -> None:
    """@releaseDomain/@introduceDomain have permissions of their own that only a
    privileged domain may change; unknown special names are EINVAL."""
    assert xs.op_get_perms(store, DOM0, arg(w.RELEASE_DOMAIN)) == b"n0\0"
    assert err(set_perms, store, DOM5, w.RELEASE_DOMAIN, "n0", "r5") == w.EACCES
    set_perms(store, DOM0, w.RELEASE_DOMAIN, "n0", "r5")
    assert xs.watch_permitted(DOM5, store, xs.Fire(w.RELEASE_DOMAIN, False, ()))
    assert err(xs.op_get_perms, store, DOM0, arg("@other")) == w.EINVAL


def test_target_domain_acts_for_its_target(store: xs.Store) -> None:
    """A domain with a target (a device model stub domain) gets its target's rights."""
    home = guest_home(store, 5)
    write(store, DOM5, "secret", b"s")
    stub = xs.Caller(9, target=5)
    assert read(store, stub, f"{home}/secret") == b"s"
    assert err(read, store, xs.Caller(9), f"{home}/secret") == w.EACCES


def test_atoi_and_perm_parsing() -> None:
    """Arguments are parsed as xenstored parses them."""
    assert xs.atoi(b"12abc") == 12 and xs.atoi(b"junk") == 0 and xs.atoi(b" -3") == -3
    assert xs.parse_perm("b12") == xs.Perm(12, xs.PERM_READ | xs.PERM_WRITE)
    assert str(xs.Perm(3, xs.PERM_WRITE)) == "w3"
    with pytest.raises(XsError):
        xs.parse_perm("q1")


def test_wire_header_layout() -> None:
    """The header is four native u32 - type, req_id, tx_id, len - then the payload."""
    import struct

    msg = w.pack(w.XS_READ, 7, 3, b"/x\0")
    assert msg == struct.pack("=IIII", 2, 7, 3, 3) + b"/x\0"
    assert w.unpack_header(msg[:16]) == (2, 7, 3, 3)
    assert w.strings(b"a\0b\0tail") == [b"a", b"b"]
    assert (w.XS_WATCH_EVENT, w.XS_ERROR, w.XS_RESET_WATCHES, w.XS_DIRECTORY_PART) == (
        15, 16, 21, 22)
