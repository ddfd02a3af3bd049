"""The xenstore database: nodes, permissions, transactions, watches, quotas.

No I/O here: callers (the wire codec, the host) call methods with the domain
id of the client, and watch events leave through a per-connection callback.

Behaviour follows Xen's docs/misc/xenstore.txt and the C xenstored where the
doc is silent:

* Paths: ASCII alphanumerics and ``-/_@`` only, no ``//``, no trailing ``/``
  except the root, not empty; absolute paths longer than 3072 bytes
  (XENSTORE_ABS_PATH_MAX) are refused, and an unprivileged domain's path may
  not be longer than 2048 bytes (XENSTORE_REL_PATH_MAX) once a leading
  ``/local/domain/<n>/`` is stripped. All of these are EINVAL.
* Permissions: a list of (perm, domid), perm one of ``r w b n``. The first
  entry names the owner, who has full access, and gives the access of every
  domain not listed later. Domain 0 has full access everywhere. A node created
  by an unprivileged domain inherits its parent's list with the owner changed
  to the creator; a node created by domain 0 inherits the list unchanged (as
  xenstored does: "unpriv domains own what they create").
* Errors hide what the caller may not see: a missing or forbidden node is
  ENOENT only if its closest existing ancestor grants the access asked for,
  EACCES otherwise.
* Transactions keep only the nodes they access (xenstored's per-node
  generation check, not a copy of the store): a node is recorded as it is
  when the transaction first reads, lists, writes, creates or removes it
  (parents whose child lists it changes included), and later requests in
  the transaction see that record or the transaction's own change. Nodes it
  has not accessed yet are read from the store as it is now. Commit fails
  with EAGAIN when any recorded node was changed outside since the
  transaction first accessed it; the transaction is then gone, as in
  xenstored. An unprivileged transaction may access at most 1024 nodes
  (xenstored's transaction-nodes quota); one more is ENOSPC.
* Watch events go to a connection only if it can read the changed node or
  its parent (or could read it before a permission change).
* Quota overruns are ENOSPC, which is what xenstored returns today for every
  quota (nodes, node size, watches, transactions, permissions per node; older
  versions said E2BIG for watches). A limit N allows N: N + 1 is refused.
  Domain 0 has no quotas, except that a connection may be given its own
  transaction limit (connect(transaction_quota=...)), which host socket
  clients get.
* Tree walks (removal, release, save) are iterative: a node chain is as deep
  as the path limits above allow (about 1,500 levels for domain 0), deeper
  than Python's recursion limit.
* Save/restore (Store.save_state()) keeps the tree and the guest rings'
  watches; their open transactions come back doomed to EAGAIN.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Optional, Union

from ..errors import PvhvmError

# The errno names that go over the wire, in xs_wire.h's order (xsd_errors).
XSD_ERRORS = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)

XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

DOMID_ANY = 0x7FF5  # xen.h: matches every domain in a permission entry
PRIV_DOMID = 0

SPECIAL_INTRODUCE = "@introduceDomain"
SPECIAL_RELEASE = "@releaseDomain"

# xenstored's default quotas (tools/xenstored/domain.c).
DEFAULT_QUOTA_NODES = 1000
DEFAULT_QUOTA_NODE_SIZE = 2048
DEFAULT_QUOTA_WATCHES = 128
DEFAULT_QUOTA_TRANSACTIONS = 10
DEFAULT_QUOTA_TRANSACTION_NODES = 1024
DEFAULT_QUOTA_PERMS = 5

# Node size as xenstored accounts it: a 16-byte header (generation u64,
# num_perms u16, datalen u16, childlen u32), 8 bytes per permission entry,
# the value and the NUL-terminated child names.
NODE_HEADER_SIZE = 16
PERM_ENTRY_SIZE = 8

_R, _W, _O = 1, 2, 4
_PERM_BITS = {"n": 0, "r": _R, "w": _W, "b": _R | _W}

_VALID_PATH = re.compile(r"[A-Za-z0-9\-/_@]+\Z")
_LOCAL_DOMAIN = re.compile(r"/local/domain/[0-9]{1,5}/")

Perm = tuple[str, int]
Perms = tuple[Perm, ...]
Deliver = Callable[[str, str], None]


class XenstoreError(PvhvmError):
    """A request failed; ``errno`` is the xsd_errors name (``"ENOENT"`` …)
    sent back to the client in an ERROR reply."""

    def __init__(self, errno: str, detail: str = "") -> None:
        if errno not in XSD_ERRORS:
            raise ValueError(f"not a xenstore errno name: {errno!r}")
        self.errno = errno
        super().__init__(f"{errno}: {detail}" if detail else errno)


class StateError(PvhvmError, ValueError):
    """A state given to Store.restore_state() or RingConnection(state=...)
    is malformed."""


def parse_perm(text: str) -> Perm:
    """``"r5"`` -> ``("r", 5)``; EINVAL if malformed."""
    if (
        not isinstance(text, str)
        or len(text) < 2
        or text[0] not in _PERM_BITS
        or not text[1:].isdigit()
        or not text[1:].isascii()
        or len(text) > 11
    ):
        raise XenstoreError("EINVAL", f"bad permission {text!r}")
    domid = int(text[1:])
    if domid > 0xFFFF:
        raise XenstoreError("EINVAL", f"bad permission {text!r}")
    return (text[0], domid)


def format_perm(perm: Perm) -> str:
    return f"{perm[0]}{perm[1]}"


def _as_perms(perms: Iterable[Union[str, Perm]]) -> Perms:
    out = []
    for p in perms:
        if isinstance(p, str):
            out.append(parse_perm(p))
        else:
            try:
                kind, domid = p
            except (TypeError, ValueError):
                raise XenstoreError("EINVAL", f"bad permission {p!r}") from None
            if kind not in _PERM_BITS or not isinstance(domid, int) or not 0 <= domid <= 0xFFFF:
                raise XenstoreError("EINVAL", f"bad permission {p!r}")
            out.append((kind, domid))
    if not out:
        raise XenstoreError("EINVAL", "empty permission list")
    return tuple(out)


def _as_value(value: Union[bytes, bytearray, memoryview, str]) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise XenstoreError("EINVAL", "value must be bytes or str")


def parent_of(path: str) -> str:
    """Parent of an absolute path ("/" for top-level nodes and specials)."""
    cut = path.rfind("/", 1)
    return path[:cut] if cut > 0 else "/"


def _basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def _join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else f"{parent}/{name}"


def _canonical(domid: int, path: str, allow_special: bool, quota_path: int) -> str:
    if not isinstance(path, str) or not _VALID_PATH.match(path):
        raise XenstoreError("EINVAL", f"invalid path {path!r}")
    if path[0] == "@" and not allow_special:
        raise XenstoreError("EINVAL", f"special path {path!r} not allowed here")
    name = path if path[0] in "/@" else f"{Store.get_domain_path(domid)}/{path}"
    if (name.endswith("/") and name != "/") or "//" in name:
        raise XenstoreError("EINVAL", f"invalid path {path!r}")
    if len(name) > XENSTORE_ABS_PATH_MAX:
        raise XenstoreError("EINVAL", "path too long")
    if domid != PRIV_DOMID:
        m = _LOCAL_DOMAIN.match(name)
        if len(name) - (m.end() if m else 0) > quota_path:
            raise XenstoreError("EINVAL", "path too long")
    return name


class Node(NamedTuple):
    """One node; immutable (changes make a new Node), so a transaction can
    keep the version it saw by reference."""

    value: bytes
    perms: Perms
    children: tuple[str, ...]
    gen: int

    @property
    def owner(self) -> int:
        return self.perms[0][1]

    def size(self) -> int:
        return (
            NODE_HEADER_SIZE
            + PERM_ENTRY_SIZE * len(self.perms)
            + len(self.value)
            + sum(len(c) + 1 for c in self.children)
        )


class _Tree:
    """A path -> Node map plus the node count per owning domain."""

    __slots__ = ("nodes", "owned")

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.owned: dict[int, int] = {}

    def get(self, path: str) -> Optional[Node]:
        return self.nodes.get(path)

    peek = get  # outside a transaction nothing is recorded

    def __contains__(self, path: str) -> bool:
        return path in self.nodes

    def owned_by(self, domid: int) -> int:
        return self.owned.get(domid, 0)

    def reserve(self, paths: Iterable[str]) -> None:
        """Nothing to check outside a transaction (see _TxView.reserve)."""

    def put(self, path: str, node: Node) -> None:
        old = self.nodes.get(path)
        if old is not None:
            self.owned[old.owner] -= 1
        self.nodes[path] = node
        self.owned[node.owner] = self.owned.get(node.owner, 0) + 1

    def delete(self, path: str) -> None:
        old = self.nodes.pop(path)
        self.owned[old.owner] -= 1


class _TxView:
    """What a transaction sees: the store's tree overlaid with the nodes the
    transaction accessed, each as it was at first access or as the
    transaction changed it (None: absent). Costs one entry per accessed
    node, not a copy of the store.

    ``get`` records the node (it joins the set checked at commit); ``peek``
    does not, for lookups that only pick an errno or a watch event's
    permissions (closest ancestor, parent of a changed node), as the old
    whole-store snapshot did not check those either."""

    __slots__ = ("tree", "nodes", "first_gen", "modified", "owned_delta", "limit")

    def __init__(self, tree: _Tree, limit: Optional[int]) -> None:
        self.tree = tree
        self.nodes: dict[str, Optional[Node]] = {}
        self.first_gen: dict[str, Optional[int]] = {}  # at first access; None: absent then
        self.modified: set[str] = set()
        self.owned_delta: dict[int, int] = {}
        self.limit = limit  # most nodes it may access (None: no limit)

    def reserve(self, paths: Iterable[str]) -> None:
        """ENOSPC if recording ``paths`` would pass the transaction-nodes
        quota; checked before a change so that it is all or nothing."""
        if self.limit is None:
            return
        new = sum(1 for p in set(paths) if p not in self.nodes)
        if len(self.nodes) + new > self.limit:
            raise XenstoreError("ENOSPC", "transaction node quota")

    def _record(self, path: str) -> Optional[Node]:
        if path in self.nodes:
            return self.nodes[path]
        self.reserve((path,))
        node = self.tree.nodes.get(path)
        self.nodes[path] = node
        self.first_gen[path] = node.gen if node is not None else None
        return node

    def get(self, path: str) -> Optional[Node]:
        return self._record(path)

    def peek(self, path: str) -> Optional[Node]:
        return self.nodes[path] if path in self.nodes else self.tree.nodes.get(path)

    def __contains__(self, path: str) -> bool:
        return self.peek(path) is not None

    def owned_by(self, domid: int) -> int:
        return self.tree.owned.get(domid, 0) + self.owned_delta.get(domid, 0)

    def _set(self, path: str, node: Optional[Node]) -> None:
        old = self._record(path)
        if old is not None:
            self.owned_delta[old.owner] = self.owned_delta.get(old.owner, 0) - 1
        if node is not None:
            self.owned_delta[node.owner] = self.owned_delta.get(node.owner, 0) + 1
        self.nodes[path] = node
        self.modified.add(path)

    def put(self, path: str, node: Node) -> None:
        self._set(path, node)

    def delete(self, path: str) -> None:
        self._set(path, None)


@dataclass
class _Event:
    """A change to report to watchers. ``subtree``: also matches watches on
    ancestors (writes, the root of a removal); otherwise only a watch on this
    exact path (descendants removed along with an ancestor). The permissions
    are captured when the change happens, for the read check."""

    path: str
    subtree: bool
    perms: Optional[Perms]
    parent_perms: Optional[Perms]
    old_perms: Optional[Perms] = None


@dataclass
class _Watch:
    path: str  # canonical: absolute or special
    token: str
    prefix_len: int  # chars to strip when reporting (relative watches)


def _new_watch(domid: int, path: str, token: str, quota_path: int) -> _Watch:
    if not isinstance(token, str) or "\0" in token:
        raise XenstoreError("EINVAL", "bad token")
    relative = isinstance(path, str) and path[:1] not in ("/", "@")
    name = _canonical(domid, path, True, quota_path)
    prefix = len(Store.get_domain_path(domid)) + 1 if relative else 0
    return _Watch(name, token, prefix)


def _check_watch_addable(domid: int, watches: list[_Watch], w: _Watch, quota_watches: int) -> None:
    if any(x.path == w.path and x.token == w.token for x in watches):
        raise XenstoreError("EEXIST", "watch exists")
    if domid != PRIV_DOMID and len(watches) >= quota_watches:
        raise XenstoreError("ENOSPC", "watch quota")


@dataclass
class _Conn:
    id: int
    domid: int
    deliver: Deliver
    watches: list[_Watch] = field(default_factory=list)
    guest_ring: bool = False  # a domain's ring: save_state() keeps it
    # Open transactions allowed on this connection even for domain 0.
    transaction_quota: Optional[int] = None
    # Events for a restored ring whose RingConnection is not back yet.
    held: Optional[list[tuple[str, str]]] = None


@dataclass
class _Transaction:
    id: int
    domid: int
    conn_id: Optional[int]
    view: _TxView  # the nodes it accessed, over the store's tree
    events: list[_Event] = field(default_factory=list)
    created: bool = False
    doomed: bool = False  # lost in a save/restore: committing it is EAGAIN


class Store:
    """The xenstore of one host.

    Every operation takes the calling domain id (0 is the privileged host)
    and, where transactions apply, ``tx`` (0 = none). Relative paths are
    taken relative to ``/local/domain/<domid>``. Failures raise
    XenstoreError with the errno name the wire protocol sends.
    """

    def __init__(
        self,
        *,
        quota_nodes: int = DEFAULT_QUOTA_NODES,
        quota_node_size: int = DEFAULT_QUOTA_NODE_SIZE,
        quota_watches: int = DEFAULT_QUOTA_WATCHES,
        quota_transactions: int = DEFAULT_QUOTA_TRANSACTIONS,
        quota_transaction_nodes: int = DEFAULT_QUOTA_TRANSACTION_NODES,
        quota_perms: int = DEFAULT_QUOTA_PERMS,
        quota_path: int = XENSTORE_REL_PATH_MAX,
        payload_max: int = XENSTORE_PAYLOAD_MAX,
        keep_orphans: bool = False,
    ) -> None:
        self.quota_nodes = quota_nodes
        self.quota_node_size = quota_node_size
        self.quota_watches = quota_watches
        self.quota_transactions = quota_transactions
        self.quota_transaction_nodes = quota_transaction_nodes
        self.quota_perms = quota_perms
        self.quota_path = quota_path
        self.payload_max = payload_max
        # xenstored -K: on release, give a dead domain's nodes to domain 0
        # instead of removing them.
        self.keep_orphans = keep_orphans

        self._gen = 0
        self._tree = _Tree()
        none0: Perms = (("n", PRIV_DOMID),)
        # The tree xenstored starts with.
        self._tree.put("/", Node(b"", none0, ("tool",), self._next_gen()))
        self._tree.put("/tool", Node(b"", none0, ("xenstored",), self._next_gen()))
        self._tree.put("/tool/xenstored", Node(b"", none0, (), self._next_gen()))
        # Special watch paths are not nodes but carry permissions that decide
        # who gets their events: @releaseDomain is readable by every domain,
        # @introduceDomain by domain 0 only (xenstored's setup_structure()).
        self._special: dict[str, Node] = {
            SPECIAL_RELEASE: Node(b"", (("n", PRIV_DOMID), ("r", DOMID_ANY)), (), self._next_gen()),
            SPECIAL_INTRODUCE: Node(b"", none0, (), self._next_gen()),
        }

        self._conns: dict[int, _Conn] = {}
        self._next_conn = 1
        self._txs: dict[int, _Transaction] = {}
        self._next_tx = 1
        self._introduced: set[int] = set()
        self._targets: dict[int, int] = {}

    # ------------------------------------------------------------------ misc

    def _next_gen(self) -> int:
        self._gen += 1
        return self._gen

    @staticmethod
    def is_privileged(domid: int) -> bool:
        return domid == PRIV_DOMID

    @staticmethod
    def get_domain_path(domid: int) -> str:
        return f"/local/domain/{domid}"

    def generation(self) -> int:
        """The global generation counter (grows with every change)."""
        return self._gen

    def _access(self, domid: int, perms: Perms) -> int:
        if self.is_privileged(domid):
            return _R | _W | _O
        target = self._targets.get(domid)

        def matches(d: int) -> bool:
            return d == domid or d == DOMID_ANY or (target is not None and d == target)

        if matches(perms[0][1]):
            return _R | _W | _O
        for kind, d in perms[1:]:
            if matches(d):
                return _PERM_BITS[kind]
        return _PERM_BITS[perms[0][0]]

    def canonical(self, domid: int, path: str, allow_special: bool = False) -> str:
        """The absolute form of ``path`` for ``domid``; EINVAL if invalid."""
        return _canonical(domid, path, allow_special, self.quota_path)

    def _tx(self, domid: int, tx: int) -> Optional[_Transaction]:
        if not tx:
            return None
        t = self._txs.get(tx)
        if t is None or t.domid != domid:
            raise XenstoreError("ENOENT", f"no transaction {tx}")
        return t

    def _operand(
        self, domid: int, path: str, tx: int, allow_special: bool = False
    ) -> tuple[Optional[_Transaction], str, Union[_Tree, _TxView]]:
        """The transaction, canonical name and tree (or transaction view) an
        operation on `path` works on."""
        t = self._tx(domid, tx)
        name = self.canonical(domid, path, allow_special=allow_special)
        return t, name, self._tree_for(t)

    def has_transaction(self, domid: int, tx: int, conn_id: Optional[int] = None) -> bool:
        """Whether ``tx`` is an open transaction of ``domid`` (and, if given,
        of connection ``conn_id``)."""
        t = self._txs.get(tx)
        return (
            t is not None
            and t.domid == domid
            and (conn_id is None or t.conn_id is None or t.conn_id == conn_id)
        )

    def _tree_for(self, t: Optional[_Transaction]) -> Union[_Tree, _TxView]:
        return t.view if t is not None else self._tree

    def _closest_ancestor(self, tree: Union[_Tree, _TxView], name: str) -> Node:
        p = name
        while True:
            p = parent_of(p)
            node = tree.peek(p)
            if node is not None:
                return node
            if p == "/":  # cannot happen: the root is never removed
                raise XenstoreError("EIO", "no root node")

    def _get(self, tree: Union[_Tree, _TxView], domid: int, name: str, need: int) -> Node:
        """The node if ``domid`` has ``need`` on it; else ENOENT/EACCES as
        xenstored reports them (ENOENT only if the closest existing ancestor
        grants some of ``need``). In a transaction the node (or its absence)
        is recorded either way."""
        if name[0] == "@":
            node = self._special.get(name)
        else:
            node = tree.get(name)
        if node is not None and self._access(domid, node.perms) & need == need:
            return node
        errno = "EACCES" if node is not None else "ENOENT"
        anc = self._tree.nodes["/"] if name[0] == "@" else self._closest_ancestor(tree, name)
        if self._access(domid, anc.perms) & need:
            raise XenstoreError(errno, name)
        raise XenstoreError("EACCES", name)

    def _check_size(self, domid: int, node: Node) -> None:
        if not self.is_privileged(domid) and node.size() > self.quota_node_size:
            raise XenstoreError("ENOSPC", "node too large")

    def _apply(self, tree: Union[_Tree, _TxView], updates: dict[str, Optional[Node]]) -> None:
        """Write (Node) or delete (None) paths, giving written nodes fresh
        generation counts; in a transaction all of them or (ENOSPC) none."""
        tree.reserve(updates)
        for path, node in updates.items():
            if node is None:
                if path in tree:
                    tree.delete(path)
            else:
                tree.put(path, node._replace(gen=self._next_gen()))

    def _emit(self, t: Optional[_Transaction], events: list[_Event]) -> None:
        if t is not None:
            t.events.extend(events)
        else:
            self._fire(events)

    # ------------------------------------------------------------ operations

    def read(self, domid: int, path: str, tx: int = 0) -> bytes:
        _, name, tree = self._operand(domid, path, tx)
        return self._get(tree, domid, name, _R).value

    def directory(self, domid: int, path: str, tx: int = 0) -> list[str]:
        _, name, tree = self._operand(domid, path, tx)
        return list(self._get(tree, domid, name, _R).children)

    def directory_part(self, domid: int, path: str, offset: int, tx: int = 0) -> tuple[int, bytes]:
        """xenstored's DIRECTORY_PART: (generation of the node, chunk), where
        chunk is the NUL-terminated child names starting at byte ``offset``
        of the full list, as many whole names as fit in one reply next to the
        generation, plus one more NUL once the end of the list is reached
        (an offset past the end gives just that NUL)."""
        _, name, tree = self._operand(domid, path, tx)
        node = self._get(tree, domid, name, _R)
        blob = b"".join(c.encode() + b"\0" for c in node.children)
        offset = max(0, offset)
        if offset >= len(blob):
            return node.gen, b"\0"
        maxlen = self.payload_max - (len(str(node.gen)) + 1) - 1
        length = 0
        pos = offset
        while True:
            slen = blob.index(b"\0", pos) - pos
            if length + slen >= maxlen:
                break
            length += slen + 1
            pos += slen + 1
            if offset + length == len(blob):
                break
        chunk = blob[offset : offset + length]
        if offset + length == len(blob):
            chunk += b"\0"
        return node.gen, chunk

    def write(self, domid: int, path: str, value: Union[bytes, str], tx: int = 0) -> None:
        t = self._tx(domid, tx)
        name = self.canonical(domid, path)
        data = _as_value(value)
        tree = self._tree_for(t)
        try:
            node = self._get(tree, domid, name, _W)
        except XenstoreError as e:
            if e.errno != "ENOENT":
                raise
            node = self._create(tree, t, domid, name, data)
        else:
            node = node._replace(value=data)
            self._check_size(domid, node)
            self._apply(tree, {name: node})
        self._emit(t, [self._event(tree, name, True, node.perms)])

    def mkdir(self, domid: int, path: str, tx: int = 0) -> None:
        t, name, tree = self._operand(domid, path, tx)
        try:
            self._get(tree, domid, name, _W)
        except XenstoreError as e:
            if e.errno != "ENOENT":
                raise
            node = self._create(tree, t, domid, name, b"")
            self._emit(t, [self._event(tree, name, True, node.perms)])

    def _create(self, tree: Union[_Tree, _TxView], t: Optional[_Transaction], domid: int, name: str,
                value: bytes) -> Node:
        """Create ``name`` and any missing parents (the caller checked that
        the closest existing ancestor is writable)."""
        missing = []
        p = name
        while p not in tree:
            missing.append(p)
            p = parent_of(p)
        unpriv = not self.is_privileged(domid)
        if unpriv and tree.owned_by(domid) + len(missing) > self.quota_nodes:
            raise XenstoreError("ENOSPC", "node quota")
        updates: dict[str, Optional[Node]] = {}
        parent_path, parent = p, tree.peek(p)
        assert parent is not None
        for path in reversed(missing):
            parent = parent._replace(children=parent.children + (_basename(path),))
            updates[parent_path] = parent
            perms = parent.perms
            if unpriv:
                perms = ((perms[0][0], domid),) + perms[1:]
            node = Node(b"", perms, (), 0)
            updates[path] = node
            parent_path, parent = path, node
        updates[name] = updates[name]._replace(value=value)  # type: ignore[union-attr]
        for node in updates.values():
            self._check_size(domid, node)  # type: ignore[arg-type]
        self._apply(tree, updates)
        if t is not None:
            t.created = True
        node = tree.peek(name)
        assert node is not None
        return node

    def rm(self, domid: int, path: str, tx: int = 0) -> None:
        t, name, tree = self._operand(domid, path, tx)
        try:
            node = self._get(tree, domid, name, _W)
        except XenstoreError as e:
            # Removing a missing node is fine if its parent exists.
            if e.errno == "ENOENT" and parent_of(name) in tree:
                return
            raise
        if name == "/":
            raise XenstoreError("EINVAL", "cannot remove the root")
        updates, events = self._removal(tree, name, node)
        self._apply(tree, updates)
        self._emit(t, events)

    def _removal(
        self, tree: Union[_Tree, _TxView], name: str, node: Node
    ) -> tuple[dict[str, Optional[Node]], list[_Event]]:
        """Updates and events for removing ``name`` and everything below it:
        the nodes go children first (depth first, in child order), each one
        reported to watches on exactly its path, and ``name`` last, reported
        like a write (to watches on it and on its ancestors). An explicit
        stack, not recursion: a chain may be deeper than Python's recursion
        limit."""
        updates: dict[str, Optional[Node]] = {}
        events: list[_Event] = []
        pname = parent_of(name)
        # No parent only in a transaction that sees a node created outside
        # under one it removed: its commit fails anyway (the parent changed).
        parent = tree.peek(pname)
        # (path, node, parent's perms, children already pushed)
        stack: list[tuple[str, Node, Optional[Perms], bool]] = [
            (name, node, parent.perms if parent is not None else None, False)
        ]
        while stack:
            path, n, parent_perms, expanded = stack.pop()
            if expanded:
                updates[path] = None
                events.append(_Event(path, path == name, n.perms, parent_perms))
                continue
            stack.append((path, n, parent_perms, True))
            for child in reversed(n.children):
                cpath = _join(path, child)
                cnode = tree.peek(cpath)
                if cnode is not None:
                    stack.append((cpath, cnode, n.perms, False))
        if parent is not None:
            base = _basename(name)
            updates[pname] = parent._replace(children=tuple(c for c in parent.children if c != base))
        return updates, events

    def get_perms(self, domid: int, path: str, tx: int = 0) -> list[Perm]:
        _, name, tree = self._operand(domid, path, tx, allow_special=True)
        return list(self._get(tree, domid, name, _R).perms)

    def set_perms(self, domid: int, path: str, perms: Iterable[Union[str, Perm]], tx: int = 0) -> None:
        t = self._tx(domid, tx)
        perms = list(perms)
        if not perms:
            raise XenstoreError("EINVAL", "empty permission list")
        if not self.is_privileged(domid) and len(perms) > self.quota_perms:
            raise XenstoreError("ENOSPC", "too many permissions")
        new_perms = _as_perms(perms)
        name = self.canonical(domid, path, allow_special=True)
        if name[0] == "@":
            node = self._get(self._tree, domid, name, _W | _O)
            self._special[name] = node._replace(perms=new_perms, gen=self._next_gen())
            return
        tree = self._tree_for(t)
        node = self._get(tree, domid, name, _W | _O)
        if not self.is_privileged(domid) and new_perms[0][1] != node.owner:
            raise XenstoreError("EPERM", "only domain 0 may change the owner")
        new = node._replace(perms=new_perms)
        self._check_size(domid, new)
        self._apply(tree, {name: new})
        event = self._event(tree, name, True, new_perms)
        event.old_perms = node.perms
        self._emit(t, [event])

    def _event(self, tree: Union[_Tree, _TxView], name: str, subtree: bool, perms: Perms) -> _Event:
        parent = tree.peek(parent_of(name)) if name != "/" else None
        return _Event(name, subtree, perms, parent.perms if parent is not None else None)

    # ---------------------------------------------------------- transactions

    def transaction_start(self, domid: int, conn_id: Optional[int] = None) -> int:
        """Open a transaction for ``domid`` (on connection ``conn_id``, whose
        quota it counts against; without one, against the domain's)."""
        conn = None
        if conn_id is not None:
            conn = self._conns.get(conn_id)
            if conn is None:
                raise XenstoreError("EINVAL", f"no connection {conn_id}")
        limits = [] if self.is_privileged(domid) else [self.quota_transactions]
        if conn is not None and conn.transaction_quota is not None:
            limits.append(conn.transaction_quota)
        if limits:
            if conn_id is not None:
                open_ = sum(1 for x in self._txs.values() if x.conn_id == conn_id)
            else:
                open_ = sum(1 for x in self._txs.values() if x.conn_id is None and x.domid == domid)
            if open_ >= min(limits):
                raise XenstoreError("ENOSPC", "transaction quota")
        tx_id = self._next_tx
        while tx_id == 0 or tx_id in self._txs:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        self._next_tx = (tx_id + 1) & 0xFFFFFFFF
        self._txs[tx_id] = _Transaction(tx_id, domid, conn_id, self._new_view(domid))
        return tx_id

    def _new_view(self, domid: int) -> _TxView:
        limit = None if self.is_privileged(domid) else self.quota_transaction_nodes
        return _TxView(self._tree, limit)

    def run_transaction(self, domid: int, fn) -> None:
        """Run ``fn(tx)`` in a transaction of ``domid``, retrying on EAGAIN as
        libxl does; abort it if ``fn`` raises."""
        while True:
            tx = self.transaction_start(domid)
            try:
                fn(tx)
            except BaseException:
                self.transaction_end(domid, tx, commit=False)
                raise
            try:
                self.transaction_end(domid, tx)
                return
            except XenstoreError as e:
                if e.errno != "EAGAIN":
                    raise

    def transaction_end(self, domid: int, tx: int, commit: bool = True) -> None:
        """Commit (or with ``commit=False`` abort) a transaction. The
        transaction is finished whatever happens; a conflicting commit raises
        XenstoreError("EAGAIN") and the caller has to start over."""
        t = self._tx(domid, tx)
        if t is None:
            raise XenstoreError("ENOENT", "no transaction")
        del self._txs[tx]
        if not commit:
            return
        if t.doomed:
            raise XenstoreError("EAGAIN", "transaction lost in a save/restore")
        glob = self._tree.nodes
        view = t.view
        for path, gen in view.first_gen.items():
            now = glob.get(path)
            if gen != (now.gen if now is not None else None):
                raise XenstoreError("EAGAIN", f"{path} changed")
        if t.created and not self.is_privileged(domid):
            owned = self._tree.owned_by(domid)
            for path in view.modified:
                old, new = glob.get(path), view.nodes[path]
                owned += (new is not None and new.owner == domid) - (old is not None and old.owner == domid)
            if owned > self.quota_nodes:
                raise XenstoreError("ENOSPC", "node quota")
        self._apply(self._tree, {p: view.nodes[p] for p in sorted(view.modified)})
        # One event per path, in order of first change; a subtree event wins.
        merged: dict[str, _Event] = {}
        for ev in t.events:
            seen = merged.get(ev.path)
            if seen is None:
                merged[ev.path] = _Event(ev.path, ev.subtree, ev.perms, ev.parent_perms, ev.old_perms)
            else:
                seen.subtree = seen.subtree or ev.subtree
                if seen.old_perms is None:
                    seen.old_perms = seen.perms
                seen.perms, seen.parent_perms = ev.perms, ev.parent_perms
        self._fire(list(merged.values()))

    def _drop_transactions(self, pred: Callable[[_Transaction], bool]) -> None:
        for tx_id in [i for i, x in self._txs.items() if pred(x)]:
            del self._txs[tx_id]

    # --------------------------------------------------- connections, watches

    def connect(self, domid: int, deliver: Deliver, *, guest_ring: bool = False,
                transaction_quota: Optional[int] = None) -> int:
        """Register a client of ``domid``; its watch events are passed to
        ``deliver(path, token)``. Returns the connection id. ``guest_ring``:
        the domain's own ring, whose watches and transactions save_state()
        keeps (host clients register theirs again after a restore).
        ``transaction_quota``: most transactions open at once on this
        connection, also for domain 0 (an unprivileged one has the store's
        quota anyway)."""
        conn_id = self._next_conn
        self._next_conn += 1
        self._conns[conn_id] = _Conn(conn_id, domid, deliver, guest_ring=guest_ring,
                                     transaction_quota=transaction_quota)
        return conn_id

    def disconnect(self, conn_id: int) -> None:
        """Forget a connection with its watches and transactions."""
        self._conns.pop(conn_id, None)
        self._drop_transactions(lambda x: x.conn_id == conn_id)

    def _conn(self, conn_id: int) -> _Conn:
        conn = self._conns.get(conn_id)
        if conn is None:
            raise XenstoreError("EINVAL", f"no connection {conn_id}")
        return conn

    def connection_domid(self, conn_id: int) -> int:
        return self._conn(conn_id).domid

    def watch(self, conn_id: int, path: str, token: str) -> None:
        """Add a watch; it fires once straight away with the path as given."""
        conn = self._conn(conn_id)
        w = _new_watch(conn.domid, path, token, self.quota_path)
        _check_watch_addable(conn.domid, conn.watches, w, self.quota_watches)
        conn.watches.append(w)
        conn.deliver(w.path[w.prefix_len :], token)

    def unwatch(self, conn_id: int, path: str, token: str) -> None:
        conn = self._conn(conn_id)
        name = self.canonical(conn.domid, path, allow_special=True)
        for i, w in enumerate(conn.watches):
            if w.path == name and w.token == token:
                del conn.watches[i]
                return
        raise XenstoreError("ENOENT", "no such watch")

    def reset_watches(self, conn_id: int) -> None:
        """RESET_WATCHES: drop all watches and transactions of a connection."""
        conn = self._conn(conn_id)
        conn.watches.clear()
        self._drop_transactions(lambda x: x.conn_id == conn_id)

    def watches(self, conn_id: int) -> list[tuple[str, str]]:
        """(path as registered, token) of each watch of a connection."""
        conn = self._conn(conn_id)
        return [(w.path[w.prefix_len :], w.token) for w in conn.watches]

    def _readable(self, domid: int, perms: Optional[Perms]) -> bool:
        return perms is not None and bool(self._access(domid, perms) & _R)

    def _fire(self, events: list[_Event]) -> None:
        for ev in events:
            special = ev.path[0] == "@"
            for conn in list(self._conns.values()):
                if not (
                    self._readable(conn.domid, ev.old_perms)
                    or self._readable(conn.domid, ev.perms)
                    or self._readable(conn.domid, ev.parent_perms)
                ):
                    continue
                for w in list(conn.watches):
                    if w.path == ev.path:
                        hit = True
                    elif special or not ev.subtree:
                        hit = False
                    elif w.path == "/":
                        hit = ev.path[0] == "/"
                    else:
                        hit = ev.path.startswith(w.path + "/")
                    if hit:
                        conn.deliver(ev.path[w.prefix_len :], w.token)

    # ------------------------------------------------------- domain handling

    def introduce_domain(self, domid: int) -> None:
        """The toolstack introduced a domain: fire @introduceDomain."""
        self._introduced.add(domid)
        self._fire_special(SPECIAL_INTRODUCE)

    def release_domain(self, domid: int) -> None:
        """The domain is gone: as xenstored does, remove the nodes it owns
        (or with ``keep_orphans`` give them to domain 0), drop it from other
        nodes' permission lists, drop the watches and transactions of its
        connections, and fire @releaseDomain."""
        self._introduced.discard(domid)
        self._targets.pop(domid, None)
        for conn in self._conns.values():
            if conn.domid == domid:
                conn.watches.clear()
        self._drop_transactions(lambda x: x.domid == domid)
        if domid != PRIV_DOMID:
            tree = self._tree
            for path in sorted(tree.nodes):
                node = tree.nodes.get(path)
                if node is None or path == "/":
                    continue
                if node.owner == domid and self.keep_orphans:
                    perms = ((node.perms[0][0], PRIV_DOMID),) + tuple(p for p in node.perms[1:] if p[1] != domid)
                    self._apply(tree, {path: node._replace(perms=perms)})
                elif node.owner == domid:
                    updates, events = self._removal(tree, path, node)
                    self._apply(tree, updates)
                    self._fire(events)
                elif any(d == domid for _, d in node.perms[1:]):
                    kept = (node.perms[0],) + tuple(p for p in node.perms[1:] if p[1] != domid)
                    self._apply(tree, {path: node._replace(perms=kept)})
        self._fire_special(SPECIAL_RELEASE)

    def _fire_special(self, name: str) -> None:
        self._fire([_Event(name, False, self._special[name].perms, self._tree.nodes["/"].perms)])

    def is_domain_introduced(self, domid: int) -> bool:
        return domid == PRIV_DOMID or domid in self._introduced

    def resume_domain(self, domid: int) -> None:
        """RESUME: nothing to re-arm here (@releaseDomain is fired by
        release_domain() each time)."""

    def set_target(self, domid: int, target: int) -> None:
        """SET_TARGET: ``domid`` gets ``target``'s access everywhere."""
        self._targets[domid] = target

    # ---------------------------------------------------------- inspection

    def exists(self, path: str) -> bool:
        """Whether an absolute path exists (no permission check)."""
        return path in self._tree.nodes

    def node_count(self, domid: int) -> int:
        """Nodes owned by ``domid`` (what the node quota counts)."""
        return self._tree.owned.get(domid, 0)

    def paths(self) -> list[str]:
        """Every existing path, sorted (no permission check)."""
        return sorted(self._tree.nodes)

    # ------------------------------------------------------ save and restore

    def save_state(self) -> dict:
        """The store as plain JSON types, for restore_state() on a fresh Store.

        Kept: every node (value, permissions, generation) in tree order, so
        directories list their children as before and DIRECTORY_PART's
        generations stay valid; the special paths' permissions; the
        generation and transaction counters; the quotas; introduced domains
        and SET_TARGET links; and for each guest ring connection
        (``connect(guest_ring=True)``) its watches and the ids of its open
        transactions -- what the NODE_DATA, WATCH_DATA and TRANSACTION_DATA
        records of xen.git docs/designs/xenstore-migration.md carry. Host
        clients (xenbus backends, the xenstore socket) are not saved, nor
        their transactions: they connect and watch again after the restore.

        Open transactions come back doomed, under the same id: requests in
        them still work (on the restored tree, as in a new transaction), an abort
        succeeds, and a commit fails with EAGAIN, the answer
        docs/misc/xenstore.txt gives when other writes intervened and on
        which Linux's xenbus users (xenbus_switch_state() and the drivers'
        ``again:`` loops) start the transaction over. Their changes are
        lost, as in Xen: the design above only names the transactions, the C
        xenstored ignores TRANSACTION_DATA on restore (tools/xenstored/lu.c,
        "ignore transaction record") and oxenstored refuses to dump a
        connection with open transactions. We keep the id alive rather than
        answer ENOENT, as xenstored would for an unknown id, because a guest
        saved without its knowledge cannot have quiesced its transactions as
        Linux's xs_suspend() does before a cooperative save, and ENOENT would
        make its drivers fail where EAGAIN makes them retry.
        """
        nodes = []
        stack = ["/"]
        while stack:
            path = stack.pop()
            node = self._tree.nodes.get(path)
            if node is None:
                continue
            nodes.append({"path": path, "value": _b64(node.value), "perms": [format_perm(p) for p in node.perms],
                          "gen": node.gen})
            stack.extend(reversed([_join(path, c) for c in node.children]))
        connections = []
        for conn in self._conns.values():
            if not conn.guest_ring:
                continue
            connections.append({
                "domid": conn.domid,
                "watches": [{"path": w.path[w.prefix_len :], "token": _b64(w.token.encode("utf-8", "surrogateescape"))}
                            for w in conn.watches],
                "transactions": sorted(t.id for t in self._txs.values() if t.conn_id == conn.id),
            })
        return {
            "format": STATE_FORMAT,
            "quotas": {name: getattr(self, "quota_" + name) for name in _QUOTA_NAMES + _OPTIONAL_QUOTA_NAMES}
            | {"payload_max": self.payload_max},
            "keep_orphans": self.keep_orphans,
            "generation": self._gen,
            "next_transaction": self._next_tx,
            "nodes": nodes,
            "specials": {name: {"perms": [format_perm(p) for p in n.perms], "gen": n.gen}
                         for name, n in self._special.items()},
            "introduced": sorted(self._introduced),
            "targets": [{"domid": d, "target": t} for d, t in sorted(self._targets.items())],
            "guest_connections": connections,
        }

    def restore_state(self, state: dict) -> None:
        """Replace this store's contents with what save_state() returned.

        Call it on a fresh Store, before the guest's RingConnection is made
        and before host clients add their watches: restoring fires no
        events, and a watch fires once when it is added, so an owner that
        watches afterwards sees the restored tree. Host connections that
        exist already are kept with their watches. Each saved guest ring
        connection comes back detached, holding the events for it until
        ``RingConnection(..., state=...)`` takes it over (reattach()).
        A malformed ``state`` raises StateError (a ValueError) with a
        one-line message and changes nothing."""
        if self._txs or any(c.guest_ring for c in self._conns.values()):
            raise StateError("xenstore state: restore_state needs a fresh store (no ring connection or transaction)")
        w = "state"
        if state_get(state, "format", int, w) != STATE_FORMAT:
            raise StateError(f"xenstore state: format {state['format']} is not {STATE_FORMAT}")
        q = state_get(state, "quotas", dict, w)
        quotas = {name: state_int(q, name, "state.quotas", 0, 0xFFFFFFFF) for name in _QUOTA_NAMES}
        for name in _OPTIONAL_QUOTA_NAMES:
            if name in q:
                quotas[name] = state_int(q, name, "state.quotas", 0, 0xFFFFFFFF)
        payload_max = state_int(q, "payload_max", "state.quotas", 1, 0xFFFFFFFF)
        keep_orphans = state_get(state, "keep_orphans", bool, w)
        generation = state_int(state, "generation", w, 0, 2**63)
        next_tx = state_int(state, "next_transaction", w, 0, 0xFFFFFFFF)
        tree = _restore_tree(state_get(state, "nodes", list, w), generation)

        specials_in = state_get(state, "specials", dict, w)
        if set(specials_in) != set(self._special):
            raise StateError(f"xenstore state: state.specials must name exactly {sorted(self._special)}")
        special = {}
        for name in self._special:
            where = f"state.specials.{name}"
            special[name] = Node(b"", _state_perms(specials_in[name], where), (),
                                 state_int(specials_in[name], "gen", where, 0, generation))

        introduced = set()
        for i, domid in enumerate(state_get(state, "introduced", list, w)):
            if type(domid) is not int or not 0 <= domid <= 0xFFFF:
                raise StateError(f"xenstore state: state.introduced[{i}] is not a domain id")
            introduced.add(domid)
        targets = {}
        for i, item in enumerate(state_get(state, "targets", list, w)):
            where = f"state.targets[{i}]"
            targets[state_int(item, "domid", where, 0, 0xFFFF)] = state_int(item, "target", where, 0, 0xFFFF)

        guests: list[tuple[int, list[_Watch], list[int]]] = []
        tx_ids: set[int] = set()
        for i, item in enumerate(state_get(state, "guest_connections", list, w)):
            where = f"state.guest_connections[{i}]"
            domid = state_int(item, "domid", where, 0, 0xFFFF)
            if any(g[0] == domid for g in guests):
                raise StateError(f"xenstore state: {where}: a second ring connection of domain {domid}")
            watches: list[_Watch] = []
            for j, saved in enumerate(state_get(item, "watches", list, where)):
                wwhere = f"{where}.watches[{j}]"
                path = state_get(saved, "path", str, wwhere)
                token = state_bytes(saved, "token", wwhere).decode("utf-8", "surrogateescape")
                try:
                    watch = _new_watch(domid, path, token, quotas["path"])
                    _check_watch_addable(domid, watches, watch, quotas["watches"])
                except XenstoreError as e:
                    raise StateError(f"xenstore state: {wwhere}: {e}") from None
                watches.append(watch)
            txs = []
            for j, tx_id in enumerate(state_get(item, "transactions", list, where)):
                if type(tx_id) is not int or not 1 <= tx_id <= 0xFFFFFFFF or tx_id in tx_ids:
                    raise StateError(f"xenstore state: {where}.transactions[{j}] is not a new transaction id")
                tx_ids.add(tx_id)
                txs.append(tx_id)
            guests.append((domid, watches, txs))

        # Everything checked: now change the store.
        for name, value in quotas.items():
            setattr(self, "quota_" + name, value)
        self.payload_max = payload_max
        self.keep_orphans = keep_orphans
        self._gen = generation
        self._next_tx = next_tx
        self._tree = tree
        self._special = special
        self._introduced = introduced
        self._targets = targets
        for domid, watches, txs in guests:
            held: list[tuple[str, str]] = []
            conn_id = self._next_conn
            self._next_conn += 1
            self._conns[conn_id] = _Conn(conn_id, domid, lambda path, token, held=held: held.append((path, token)),
                                         watches, guest_ring=True, held=held)
            for tx_id in txs:
                self._txs[tx_id] = _Transaction(tx_id, domid, conn_id, self._new_view(domid), doomed=True)

    def reattach(self, domid: int, deliver: Deliver) -> int:
        """Hand the restored ring connection of ``domid`` to a new owner:
        its watch events now go to ``deliver``, starting with those held
        since restore_state(). Returns its connection id; StateError if the
        restored state had no ring connection of ``domid`` (or it was taken)."""
        for conn in self._conns.values():
            if conn.guest_ring and conn.domid == domid and conn.held is not None:
                held, conn.held = conn.held, None
                conn.deliver = deliver
                for path, token in held:
                    deliver(path, token)
                return conn.id
        raise StateError(f"xenstore state: no restored ring connection of domain {domid}")


# ------------------------------------------------------------ saved state

STATE_FORMAT = 1
_QUOTA_NAMES = ("nodes", "node_size", "watches", "transactions", "perms", "path")
# Added later: a state saved without them keeps the store's own.
_OPTIONAL_QUOTA_NAMES = ("transaction_nodes",)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def state_get(d: object, key: str, kind: type, where: str):
    """``d[key]`` of exactly type ``kind`` (as JSON loads it: a bool is not
    an int), else StateError; ``where`` names ``d`` in the message."""
    if type(d) is not dict:
        raise StateError(f"xenstore state: {where} is not an object")
    if key not in d:
        raise StateError(f"xenstore state: {where}.{key} is missing")
    value = d[key]
    if type(value) is not kind:
        raise StateError(f"xenstore state: {where}.{key} is not {kind.__name__}")
    return value


def state_int(d: object, key: str, where: str, lo: int, hi: int) -> int:
    value = state_get(d, key, int, where)
    if not lo <= value <= hi:
        raise StateError(f"xenstore state: {where}.{key} is out of range [{lo}, {hi}]")
    return value


def state_bytes(d: object, key: str, where: str) -> bytes:
    """A base64 field."""
    text = state_get(d, key, str, where)
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise StateError(f"xenstore state: {where}.{key} is not base64") from None


def _state_perms(d: object, where: str) -> Perms:
    raw = state_get(d, "perms", list, where)
    if not all(type(p) is str for p in raw):
        raise StateError(f"xenstore state: {where}.perms is not a list of strings")
    try:
        return _as_perms(raw)
    except XenstoreError as e:
        raise StateError(f"xenstore state: {where}.perms: {e}") from None


def _restore_tree(items: list, generation: int) -> _Tree:
    """The tree from save_state()'s node list: the root first, every other
    node after its parent, children in the order they are listed."""
    if not items:
        raise StateError("xenstore state: state.nodes is empty (no root)")
    children: dict[str, list[str]] = {}
    nodes: list[tuple[str, Node]] = []
    for i, item in enumerate(items):
        where = f"state.nodes[{i}]"
        path = state_get(item, "path", str, where)
        try:
            valid = path[:1] == "/" and _canonical(PRIV_DOMID, path, False, XENSTORE_REL_PATH_MAX) == path
        except XenstoreError:
            valid = False
        if not valid:
            raise StateError(f"xenstore state: {where}.path {path[:80]!r} is not an absolute path")
        if (i == 0) != (path == "/"):
            raise StateError(f"xenstore state: {where}: the root must come first, and once")
        if path in children:
            raise StateError(f"xenstore state: {where}: {path[:80]!r} is listed twice")
        if i:
            parent = parent_of(path)
            if parent not in children:
                raise StateError(f"xenstore state: {where}: {path[:80]!r} comes before its parent")
            children[parent].append(_basename(path))
        children[path] = []
        node = Node(state_bytes(item, "value", where), _state_perms(item, where), (),
                    state_int(item, "gen", where, 0, generation))
        nodes.append((path, node))
    tree = _Tree()
    for path, node in nodes:
        tree.put(path, node._replace(children=tuple(children[path])))
    return tree
