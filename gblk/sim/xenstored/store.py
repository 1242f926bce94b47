"""The simulated xenstored's data model: the node tree, permissions, transactions,
quotas and which watches a change fires.

Follows C xenstored (``tools/xenstore``, Xen 4.17) wherever a client can observe it:
error names and when each is returned, permission checks (``perm_for_conn``: dom0
and the owner get everything, then the first entry naming the caller, then the
default in the owner entry), implicit creation of missing parents (which inherit
their parent's permissions, the owner replaced by an unprivileged writer),
``ENOENT``/``EACCES`` chosen from the nearest existing ancestor so a guest learns
nothing about nodes it cannot see, optimistic transactions that fail with ``EAGAIN``
when a node they read changed, and per-domain quotas for unprivileged domains.

Pure: no IO, no gevent, no sockets. The server (``gblk.sim.xenstored.server``) turns wire
messages into calls here and delivers the :class:`Fire` records this returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from gblk.xen import xs_wire as w
from gblk.xen.xs_wire import XsError

PERM_NONE = 0
PERM_READ = 1
PERM_WRITE = 2
PERM_OWNER = 4  # internal: what the owner (or a privileged caller) gets

_LETTER_TO_ACCESS = {"n": PERM_NONE, "r": PERM_READ, "w": PERM_WRITE, "b": PERM_READ | PERM_WRITE}
_ACCESS_TO_LETTER = {v: k for k, v in _LETTER_TO_ACCESS.items()}

_VALID_CHARS = re.compile(r"^[A-Za-z0-9/_@-]*$")
_LOCAL_DOMAIN = re.compile(r"^/local/domain/(\d{1,5})/")


class Perm(NamedTuple):
    """One permission entry: the first of a node's list is the owner and the
    default access for everyone else; later ones grant ``access`` to ``domid``."""

    domid: int
    access: int

    def __str__(self) -> str:
        return f"{_ACCESS_TO_LETTER[self.access & (PERM_READ | PERM_WRITE)]}{self.domid}"


Perms = Tuple[Perm, ...]


def parse_perm(text: str) -> Perm:
    """``r5`` -> Perm(5, READ); EINVAL for anything xenstored would refuse."""
    if len(text) < 2 or text[0] not in _LETTER_TO_ACCESS or not text[1:].isdigit():
        raise XsError(w.EINVAL)
    domid = int(text[1:])
    if domid >= 1 << 32:
        raise XsError(w.EINVAL)
    return Perm(domid, _LETTER_TO_ACCESS[text[0]])


def format_perms(perms: Perms) -> bytes:
    """The GET_PERMS reply: each entry NUL-terminated."""
    return b"".join(str(p).encode() + b"\0" for p in perms)


@dataclass(frozen=True)
class Node:
    """One node. Immutable: every change stores a new Node (transactions rely on it)."""

    value: bytes
    perms: Perms
    children: Tuple[str, ...] = ()
    gen: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    def children_bytes(self) -> bytes:
        return b"".join(c.encode() + b"\0" for c in self.children)

    def entry_size(self) -> int:
        """Size of the node's database record as xenstored computes it for its
        entry-size quota (record header, permissions, data, children)."""
        return 24 + 8 * len(self.perms) + len(self.value) + len(self.children_bytes())


@dataclass
class Quotas:
    """Per-domain limits for unprivileged domains; defaults are C xenstored's
    (``-E``, ``-W``, ``-t``, ``-S``, ``-A``). ``max_queued_bytes`` bounds what the
    server buffers for one connection that does not read (XSA-349): over it, the
    connection is dropped."""

    nodes: int = 1000
    watches: int = 128
    transactions: int = 10
    entry_size: int = 2048
    perms: int = 5
    max_queued_bytes: int = 1 << 20


@dataclass(frozen=True)
class Caller:
    """Who is asking: the domain a connection acts for (and its target, if any)."""

    domid: int
    target: Optional[int] = None

    @property
    def privileged(self) -> bool:
        return self.domid == 0

    @property
    def home(self) -> str:
        """The implicit path relative names are resolved against."""
        return f"/local/domain/{self.domid}"


@dataclass(frozen=True)
class Fire:
    """A change that may fire watches: on ``path`` (and, unless ``exact``, for
    every watch on ``path`` or one of its ancestors). A watcher sees it only if one
    of ``perm_sets`` lets it read (the node, its parent, or its old permissions)."""

    path: str
    exact: bool
    perm_sets: Tuple[Perms, ...]


def perm_for(caller: Caller, perms: Perms) -> int:
    """What ``caller`` may do on a node with ``perms`` (C xenstored's perm_for_conn)."""
    everything = PERM_READ | PERM_WRITE | PERM_OWNER
    owner = perms[0].domid
    if caller.privileged or owner == caller.domid or (
        caller.target is not None and owner == caller.target
    ):
        return everything
    for p in perms[1:]:
        if p.domid == caller.domid or (caller.target is not None and p.domid == caller.target):
            return p.access
    return perms[0].access


def parent_of(path: str) -> str:
    slash = path.rfind("/")
    return path[:slash] if slash > 0 else "/"


def basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else parent + "/" + name


def is_child(child: str, parent: str) -> bool:
    """Whether ``child`` is ``parent`` or below it ("/" is above everything)."""
    if parent == "/":
        return True
    return child == parent or child.startswith(parent + "/")


def canonicalize(caller: Caller, path: str) -> str:
    """Relative paths are relative to the caller's home; absolute and special as is."""
    if path.startswith("/") or path.startswith("@"):
        return path
    return caller.home + "/" + path


def is_valid_nodename(caller: Caller, name: str) -> bool:
    if not name.startswith("/"):
        return False
    if name.endswith("/") and name != "/":
        return False
    if "//" in name:
        return False
    if len(name) > w.XENSTORE_ABS_PATH_MAX:
        return False
    if not caller.privileged:
        m = _LOCAL_DOMAIN.match(name)
        local_off = m.end() if m else 0
        if len(name) - local_off > w.XENSTORE_REL_PATH_MAX:
            return False
    return bool(_VALID_CHARS.match(name))


def atoi(data: bytes) -> int:
    """C's atoi: leading whitespace, optional sign, digits; garbage gives 0."""
    m = re.match(rb"\s*([+-]?\d+)", data)
    return int(m.group(1)) if m else 0


def onearg(payload: bytes) -> str:
    """The single NUL-terminated argument, or EINVAL (xenstored's onearg)."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise XsError(w.EINVAL)
    return payload[:-1].decode("latin-1")


class View:
    """Where operations read and write nodes: the store itself or a transaction."""

    store: "Store"

    def get(self, path: str) -> Optional[Node]:
        raise NotImplementedError

    def put(self, path: str, node: Node) -> None:
        raise NotImplementedError

    def delete(self, path: str) -> None:
        raise NotImplementedError

    def owned(self, domid: int) -> int:
        """How many nodes ``domid`` owns, as seen by this view."""
        raise NotImplementedError

    def fire(self, fire: Fire) -> None:
        raise NotImplementedError


class Store(View):
    """The global tree. ``on_fire`` receives every change made outside a
    transaction and every change of a committed transaction."""

    def __init__(self, quotas: Optional[Quotas] = None) -> None:
        self.store = self
        self.quotas = quotas or Quotas()
        self.nodes: Dict[str, Node] = {}
        self.generation = 1
        self.owner_counts: Dict[int, int] = {}
        self.on_fire: Callable[[Fire], None] = lambda fire: None
        none0: Perms = (Perm(0, PERM_NONE),)
        self.special_perms: Dict[str, Perms] = {
            w.INTRODUCE_DOMAIN: none0,
            w.RELEASE_DOMAIN: none0,
        }
        # The tree xenstored starts with.
        self.put("/", Node(b"", none0, ("tool",)))
        self.put("/tool", Node(b"", none0, ("xenstored",)))
        self.put("/tool/xenstored", Node(b"", none0))

    def next_gen(self) -> int:
        gen = self.generation
        self.generation += 1
        return gen

    def get(self, path: str) -> Optional[Node]:
        return self.nodes.get(path)

    def put(self, path: str, node: Node) -> None:
        old = self.nodes.get(path)
        if old is not None:
            self.owner_counts[old.owner] -= 1
        node = replace(node, gen=self.next_gen())
        self.nodes[path] = node
        self.owner_counts[node.owner] = self.owner_counts.get(node.owner, 0) + 1

    def delete(self, path: str) -> None:
        old = self.nodes.pop(path, None)
        if old is not None:
            self.owner_counts[old.owner] -= 1

    def owned(self, domid: int) -> int:
        return self.owner_counts.get(domid, 0)

    def fire(self, fire: Fire) -> None:
        self.on_fire(fire)


class Transaction(View):
    """An optimistic transaction: changes go to an overlay; the generation of every
    node it looked at is remembered, and commit fails with EAGAIN if any of them
    changed meanwhile (xenstored's rule). Watches fire only on commit."""

    def __init__(self, store: Store, tx_id: int, caller: Caller) -> None:
        self.store = store
        self.tx_id = tx_id
        self.caller = caller
        self.overlay: Dict[str, Optional[Node]] = {}
        self.read_gens: Dict[str, int] = {}
        self.fires: List[Fire] = []
        #: nodes owned per domain, overlay minus store, kept up to date by _set (a
        #: quota check per created node must not walk the whole overlay)
        self._deltas: Dict[int, int] = {}

    def get(self, path: str) -> Optional[Node]:
        if path in self.overlay:
            return self.overlay[path]
        node = self.store.nodes.get(path)
        self.read_gens.setdefault(path, node.gen if node is not None else -1)
        return node

    def put(self, path: str, node: Node) -> None:
        self.get(path)
        self._set(path, replace(node, gen=self.store.next_gen()))

    def delete(self, path: str) -> None:
        self.get(path)
        self._set(path, None)

    def _set(self, path: str, node: Optional[Node]) -> None:
        deltas = self._deltas
        if path in self.overlay:
            before = self.overlay[path]
            if before is not None:
                deltas[before.owner] = deltas.get(before.owner, 0) - 1
        else:
            old = self.store.nodes.get(path)
            if old is not None:
                deltas[old.owner] = deltas.get(old.owner, 0) - 1
        if node is not None:
            deltas[node.owner] = deltas.get(node.owner, 0) + 1
        self.overlay[path] = node

    def _owner_deltas(self) -> Dict[int, int]:
        return self._deltas

    def owned(self, domid: int) -> int:
        return self.store.owned(domid) + self._owner_deltas().get(domid, 0)

    def fire(self, fire: Fire) -> None:
        self.fires.append(fire)

    def commit(self) -> None:
        """Apply the overlay to the store and fire the queued watches, or raise
        EAGAIN (a node read by the transaction changed) / ENOSPC (node quota)."""
        store = self.store
        for path, gen in self.read_gens.items():
            cur = store.nodes.get(path)
            if (cur.gen if cur is not None else -1) != gen:
                raise XsError(w.EAGAIN)
        if not self.caller.privileged:
            for domid, delta in self._owner_deltas().items():
                if delta > 0 and store.owned(domid) + delta > store.quotas.nodes:
                    raise XsError(w.ENOSPC)
        for path, node in self.overlay.items():
            if node is None:
                store.delete(path)
            else:
                store.put(path, node)
        for fire in self.fires:
            store.fire(fire)


# ---------------------------------------------------------------------------
# Operations. Each takes the view, the caller and the request payload and returns
# the reply payload; failures raise XsError with xenstored's error name.


def _ask_parents(view: View, caller: Caller, name: str) -> int:
    """The caller's access to the nearest existing ancestor of ``name``."""
    while name != "/":
        name = parent_of(name)
        node = view.get(name)
        if node is not None:
            return perm_for(caller, node.perms)
    return PERM_NONE


def get_node(view: View, caller: Caller, name: str, perm: int) -> Node:
    """The node if ``caller`` has ``perm`` on it; else EACCES, or ENOENT when it
    does not exist and the nearest ancestor would grant ``perm`` (so that a caller
    cannot probe for nodes it may not see)."""
    if not is_valid_nodename(caller, name):
        raise XsError(w.EINVAL)
    node = view.get(name)
    if node is not None:
        if perm_for(caller, node.perms) & perm == perm:
            return node
        raise XsError(w.EACCES)
    if _ask_parents(view, caller, name) & perm:
        raise XsError(w.ENOENT)
    raise XsError(w.EACCES)


def _check_entry_size(view: View, caller: Caller, node: Node) -> None:
    if not caller.privileged and node.entry_size() >= view.store.quotas.entry_size:
        raise XsError(w.ENOSPC)


def _create_node(view: View, caller: Caller, name: str, value: bytes) -> Node:
    """Create ``name`` and any missing parents; return the new node."""
    missing = [name]
    parent_name = parent_of(name)
    parent = view.get(parent_name)
    while parent is None:
        missing.append(parent_name)
        parent_name = parent_of(parent_name)
        parent = view.get(parent_name)
    # Inherit permissions; unprivileged domains own what they create.
    perms = parent.perms
    if not caller.privileged:
        perms = (Perm(caller.domid, perms[0].access),) + perms[1:]
        if view.owned(caller.domid) + len(missing) > view.store.quotas.nodes:
            raise XsError(w.ENOSPC)
    new_nodes: List[Tuple[str, Node]] = []
    for i, path in enumerate(missing):
        children: Tuple[str, ...] = (basename(missing[i - 1]),) if i > 0 else ()
        node = Node(value if i == 0 else b"", perms, children)
        _check_entry_size(view, caller, node)
        new_nodes.append((path, node))
    top = missing[-1]
    new_parent = replace(parent, children=parent.children + (basename(top),))
    _check_entry_size(view, caller, new_parent)
    view.put(parent_name, new_parent)
    for path, node in reversed(new_nodes):
        view.put(path, node)
    return new_nodes[0][1]


def op_read(view: View, caller: Caller, payload: bytes) -> bytes:
    name = canonicalize(caller, onearg(payload))
    return get_node(view, caller, name, PERM_READ).value


def op_write(view: View, caller: Caller, payload: bytes) -> bytes:
    nul = payload.find(b"\0")
    if nul < 0:
        raise XsError(w.EINVAL)
    name = canonicalize(caller, payload[:nul].decode("latin-1"))
    value = payload[nul + 1 :]
    try:
        node = get_node(view, caller, name, PERM_WRITE)
    except XsError as e:
        if e.name != w.ENOENT:
            raise
        node = _create_node(view, caller, name, value)
    else:
        node = replace(node, value=value)
        _check_entry_size(view, caller, node)
        view.put(name, node)
    _fire_change(view, name, node)
    return b"OK\0"


def op_mkdir(view: View, caller: Caller, payload: bytes) -> bytes:
    name = canonicalize(caller, onearg(payload))
    try:
        get_node(view, caller, name, PERM_WRITE)
    except XsError as e:
        if e.name != w.ENOENT:
            raise
        node = _create_node(view, caller, name, b"")
        _fire_change(view, name, node)
    return b"OK\0"


def _fire_change(view: View, name: str, node: Node, old: Optional[Perms] = None) -> None:
    parent = view.get(parent_of(name)) if name != "/" else None
    sets: List[Perms] = [node.perms]
    if parent is not None:
        sets.append(parent.perms)
    if old is not None:
        sets.append(old)
    view.fire(Fire(name, False, tuple(sets)))


def _walk_post_order(view: View, name: str, node: Node) -> Iterator[Tuple[str, Node, Node]]:
    """Every strict descendant of ``name`` as (path, node, parent), children first."""
    for child in node.children:
        path = join(name, child)
        sub = view.get(path)
        if sub is None:
            continue
        yield from _walk_post_order(view, path, sub)
        yield path, sub, node


def op_rm(view: View, caller: Caller, payload: bytes) -> bytes:
    name = canonicalize(caller, onearg(payload))
    try:
        node = get_node(view, caller, name, PERM_WRITE)
    except XsError as e:
        if e.name != w.ENOENT:
            raise
        # Didn't exist already? Fine, if the parent exists.
        if view.get(parent_of(name)) is not None:
            return b"OK\0"
        raise
    if name == "/":
        raise XsError(w.EINVAL)
    parent_name = parent_of(name)
    parent = view.get(parent_name)
    if parent is None:
        raise XsError(w.EINVAL)
    # Children first, as xenstored walks the tree: each removed descendant fires
    # for watches placed exactly on it, the node itself for watches on it or above.
    for path, sub, sub_parent in list(_walk_post_order(view, name, node)):
        view.fire(Fire(path, True, (sub.perms, sub_parent.perms)))
        view.delete(path)
    view.fire(Fire(name, False, (node.perms, parent.perms)))
    view.delete(name)
    base = basename(name)
    view.put(parent_name, replace(parent, children=tuple(c for c in parent.children if c != base)))
    return b"OK\0"


def op_directory(view: View, caller: Caller, payload: bytes) -> bytes:
    name = canonicalize(caller, onearg(payload))
    return get_node(view, caller, name, PERM_READ).children_bytes()


def op_directory_part(view: View, caller: Caller, payload: bytes) -> bytes:
    args = w.strings(payload)
    if len(args) != 2:
        raise XsError(w.EINVAL)
    name = canonicalize(caller, args[0].decode("latin-1"))
    node = get_node(view, caller, name, PERM_READ)
    offset = atoi(args[1])
    gen = str(node.gen).encode() + b"\0"
    children = node.children_bytes()
    if offset < 0 or offset >= len(children):
        return gen + b"\0"
    maxlen = w.XENSTORE_PAYLOAD_MAX - len(gen) - 1
    length = 0
    while True:
        start = offset + length
        end = children.index(b"\0", start)
        if length + (end - start) >= maxlen:
            break
        length += end - start + 1
        if offset + length == len(children):
            break
    data = gen + children[offset : offset + length]
    if offset + length == len(children):
        data += b"\0"
    return data


def op_get_perms(view: View, caller: Caller, payload: bytes) -> bytes:
    name = canonicalize(caller, onearg(payload))
    if name.startswith("@"):
        perms = view.store.special_perms.get(name)
        if perms is None:
            raise XsError(w.EINVAL)
        return format_perms(perms)
    return format_perms(get_node(view, caller, name, PERM_READ).perms)


def op_set_perms(view: View, caller: Caller, payload: bytes) -> bytes:
    args = w.strings(payload)
    if len(args) < 2:
        raise XsError(w.EINVAL)
    quotas = view.store.quotas
    if not caller.privileged and len(args) - 1 > quotas.perms:
        raise XsError(w.ENOSPC)
    perms: Perms = tuple(parse_perm(a.decode("latin-1")) for a in args[1:])
    name = canonicalize(caller, args[0].decode("latin-1"))
    if name.startswith("@"):
        old = view.store.special_perms.get(name)
        if old is None:
            raise XsError(w.EINVAL)
        if perm_for(caller, old) & (PERM_WRITE | PERM_OWNER) != PERM_WRITE | PERM_OWNER:
            raise XsError(w.EACCES)
        view.store.special_perms[name] = perms
        return b"OK\0"
    # We must own the node to do this (tools can do this too).
    node = get_node(view, caller, name, PERM_WRITE | PERM_OWNER)
    # Unprivileged domains may not change the owner.
    if not caller.privileged and perms[0].domid != node.owner:
        raise XsError(w.EPERM)
    new = replace(node, perms=perms)
    _check_entry_size(view, caller, new)
    view.put(name, new)
    _fire_change(view, name, new, old=node.perms)
    return b"OK\0"


#: operations that read or change nodes, valid inside a transaction
NODE_OPS: Dict[int, Callable[[View, Caller, bytes], bytes]] = {
    w.XS_READ: op_read,
    w.XS_WRITE: op_write,
    w.XS_MKDIR: op_mkdir,
    w.XS_RM: op_rm,
    w.XS_DIRECTORY: op_directory,
    w.XS_DIRECTORY_PART: op_directory_part,
    w.XS_GET_PERMS: op_get_perms,
    w.XS_SET_PERMS: op_set_perms,
}


# ---------------------------------------------------------------------------
# Watches


@dataclass
class Watch:
    """One registered watch: ``node`` is canonical; ``prefix`` is set for a watch
    given as a relative path (its events are reported relative too)."""

    node: str
    token: bytes
    prefix: Optional[str] = None

    def event_path(self, name: str) -> str:
        if self.prefix is None:
            return name
        rel = name[len(self.prefix) :]
        return rel[1:] if rel.startswith("/") else rel

    def matches(self, fire: Fire) -> bool:
        if fire.exact:
            return fire.path == self.node
        if fire.path.startswith("@"):
            return fire.path == self.node
        return not self.node.startswith("@") and is_child(fire.path, self.node)


def check_watch_path(caller: Caller, path: str) -> Watch:
    """The Watch for a WATCH request's path, or EINVAL."""
    if path.startswith("@"):
        if len(path) > w.XENSTORE_REL_PATH_MAX:
            raise XsError(w.EINVAL)
        return Watch(path, b"")
    relative = not path.startswith("/")
    node = canonicalize(caller, path)
    if not is_valid_nodename(caller, node):
        raise XsError(w.EINVAL)
    return Watch(node, b"", caller.home if relative else None)


def watch_permitted(caller: Caller, store: Store, fire: Fire) -> bool:
    """Whether a watch of ``caller`` may see ``fire`` (it can read the node, its
    parent, or - for a permission change - the node under its old permissions)."""
    if fire.path.startswith("@"):
        perms = store.special_perms.get(fire.path)
        return perms is not None and bool(perm_for(caller, perms) & PERM_READ)
    return any(perm_for(caller, perms) & PERM_READ for perms in fire.perm_sets)


@dataclass
class DomainAccounting:
    """Per-domain counters for the watch and transaction quotas."""

    watches: Dict[int, int] = field(default_factory=dict)
    transactions: Dict[int, int] = field(default_factory=dict)

    @staticmethod
    def _add(table: Dict[int, int], domid: int, delta: int) -> None:
        table[domid] = table.get(domid, 0) + delta
        if table[domid] <= 0:
            del table[domid]

    def add_watches(self, domid: int, delta: int) -> None:
        self._add(self.watches, domid, delta)

    def add_transactions(self, domid: int, delta: int) -> None:
        self._add(self.transactions, domid, delta)


def parse_perms_list(items: Sequence[str]) -> Perms:
    """Parse permission strings (for tools and tests)."""
    return tuple(parse_perm(i) for i in items)
