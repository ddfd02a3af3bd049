"""The xenstore database (pvhvm.xenstore.store) and the domU tree (domu.py)."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvhvm.errors import PvhvmError
from pvhvm.xenstore import (
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_REL_PATH_MAX,
    Message,
    Store,
    XenstoreError,
    XsType,
    handle,
    populate_domu,
)
from pvhvm.xenstore.store import XSD_ERRORS, Node, format_perm, parse_perm

DOMU = 1
HOME = "/local/domain/1"


def errno_of(fn, *args, **kwargs) -> str:
    with pytest.raises(XenstoreError) as exc:
        fn(*args, **kwargs)
    return exc.value.errno


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __call__(self, path: str, token: str) -> None:
        self.events.append((path, token))

    def take(self) -> list[tuple[str, str]]:
        out, self.events = self.events, []
        return out


@pytest.fixture
def store() -> Store:
    """A store with a domU home as xl makes it: owned by dom0, readable by the
    guest, with a guest-writable data/ directory."""
    s = Store()
    s.write(0, HOME, "")
    s.set_perms(0, HOME, [("n", 0), ("r", DOMU)])
    s.write(0, HOME + "/data", "")
    s.set_perms(0, HOME + "/data", [("n", DOMU)])
    return s


def watcher(store: Store, domid: int) -> tuple[int, Recorder]:
    rec = Recorder()
    return store.connect(domid, rec), rec


# ---------------------------------------------------------------- basics


def test_error_type():
    e = XenstoreError("ENOENT", "x")
    assert isinstance(e, PvhvmError) and e.errno == "ENOENT"
    assert "EPERM" in XSD_ERRORS and len(XSD_ERRORS) == 16
    with pytest.raises(ValueError):
        XenstoreError("EWHATEVER")


def test_initial_tree():
    s = Store()
    assert s.directory(0, "/") == ["tool"]
    assert s.directory(0, "/tool") == ["xenstored"]
    assert s.get_perms(0, "/") == [("n", 0)]
    assert errno_of(s.read, 1, "/tool") == "EACCES"


def test_write_read_creates_parents():
    s = Store()
    s.write(0, "/a/b/c", b"hello")
    assert s.read(0, "/a/b/c") == b"hello"
    assert s.read(0, "/a/b") == b""
    assert s.read(0, "/a") == b""
    assert s.directory(0, "/a") == ["b"]
    assert s.directory(0, "/") == ["tool", "a"]
    s.write(0, "/a/b/c", "again")
    assert s.read(0, "/a/b/c") == b"again"
    s.write(0, "/a/b/bin", b"\x00\xff\x01")
    assert s.read(0, "/a/b/bin") == b"\x00\xff\x01"
    assert s.directory(0, "/a/b") == ["c", "bin"]


def test_read_missing():
    s = Store()
    assert errno_of(s.read, 0, "/nope") == "ENOENT"
    assert errno_of(s.directory, 0, "/nope/deeper") == "ENOENT"


def test_mkdir_keeps_existing_value():
    s = Store()
    s.write(0, "/a", "v")
    s.mkdir(0, "/a")
    assert s.read(0, "/a") == b"v"
    s.mkdir(0, "/x/y/z")
    assert s.read(0, "/x/y/z") == b""
    assert s.directory(0, "/x/y") == ["z"]


def test_rm_recursive_and_rules():
    s = Store()
    s.write(0, "/a/b/c", "1")
    s.write(0, "/a/d", "2")
    s.rm(0, "/a/b")
    assert s.directory(0, "/a") == ["d"]
    assert errno_of(s.read, 0, "/a/b/c") == "ENOENT"
    s.rm(0, "/a/nothing")  # missing, parent exists: fine
    assert errno_of(s.rm, 0, "/a/nothing/deeper") == "ENOENT"
    assert errno_of(s.rm, 0, "/") == "EINVAL"
    s.rm(0, "/a")
    assert not s.exists("/a") and not s.exists("/a/d")


@pytest.mark.parametrize(
    "path",
    ["", "/a/", "//a", "/a//b", "/a b", "/a.b", "/ä", "/a\0b", "@foo", "/a/b/"],
)
def test_invalid_paths(path):
    s = Store()
    assert errno_of(s.write, 0, path, "x") == "EINVAL"
    assert errno_of(s.read, 0, path) == "EINVAL"


def test_path_chars_allowed():
    s = Store()
    s.write(0, "/Az09-_@x", "ok")
    assert s.read(0, "/Az09-_@x") == b"ok"


def test_path_length_limits(store):
    # Absolute paths: at most 3072 bytes, for everybody.
    long_abs = "/" + "a" * 3071
    store.write(0, long_abs, "x")
    assert errno_of(store.write, 0, long_abs + "b", "x") == "EINVAL"
    # A domU's paths: at most 2048 bytes below its /local/domain/<id>/.
    rel = "data" + ("/" + "b" * 99) * 20 + "/" + "b" * 43
    assert len(rel) == 2048
    store.write(DOMU, rel, "x")
    assert store.read(DOMU, HOME + "/" + rel) == b"x"
    assert errno_of(store.write, DOMU, rel + "c", "x") == "EINVAL"
    assert errno_of(store.read, DOMU, HOME + "/" + rel + "c") == "EINVAL"


def test_relative_paths_resolve_to_home(store):
    store.write(DOMU, "data/x", "1")
    assert store.read(0, HOME + "/data/x") == b"1"
    assert store.read(DOMU, "data/x") == b"1"
    assert store.directory(DOMU, "data") == ["x"]
    assert store.get_domain_path(7) == "/local/domain/7"


def test_special_paths_are_not_nodes():
    s = Store()
    assert errno_of(s.read, 0, "@introduceDomain") == "EINVAL"
    assert errno_of(s.write, 0, "@releaseDomain", "x") == "EINVAL"
    assert s.get_perms(0, "@releaseDomain")[0] == ("n", 0)


def test_perm_strings():
    assert parse_perm("r12") == ("r", 12)
    assert format_perm(("b", 3)) == "b3"
    for bad in ("", "r", "x1", "r-1", "r1a", "r99999999"):
        with pytest.raises(XenstoreError):
            parse_perm(bad)


# ------------------------------------------------------------ permissions


def test_domu_cannot_read_dom0_only_node(store):
    store.write(0, "/secret", "s")
    assert errno_of(store.read, DOMU, "/secret") == "EACCES"
    assert errno_of(store.directory, DOMU, "/") == "EACCES"
    assert errno_of(store.get_perms, DOMU, "/secret") == "EACCES"
    # A missing node under an unreadable parent is EACCES, not ENOENT.
    assert errno_of(store.read, DOMU, "/secret/missing") == "EACCES"
    # Under a readable parent, ENOENT.
    assert errno_of(store.read, DOMU, "missing") == "ENOENT"


def test_domu_reads_home_but_cannot_write_it(store):
    store.write(0, HOME + "/name", "guest")
    assert store.read(DOMU, "name") == b"guest"
    assert errno_of(store.write, DOMU, "name", "evil") == "EACCES"
    assert errno_of(store.write, DOMU, "newnode", "x") == "EACCES"
    assert errno_of(store.mkdir, DOMU, "newdir") == "EACCES"
    assert errno_of(store.rm, DOMU, "name") == "EACCES"
    assert store.read(0, HOME + "/name") == b"guest"


def test_permission_entries_and_defaults():
    s = Store()
    s.write(0, "/n", "v")
    s.set_perms(0, "/n", [("r", 0), ("w", 2), ("n", 3), ("b", 4)])
    # Not listed: the owner's entry is the default (read).
    assert s.read(5, "/n") == b"v"
    assert errno_of(s.write, 5, "/n", "x") == "EACCES"
    # Write only.
    s.write(2, "/n", "from2")
    assert errno_of(s.read, 2, "/n") == "EACCES"
    # None.
    assert errno_of(s.read, 3, "/n") == "EACCES"
    # Both.
    s.write(4, "/n", "from4")
    assert s.read(4, "/n") == b"from4"


def test_owner_has_full_access():
    s = Store()
    s.write(0, "/n", "v")
    s.set_perms(0, "/n", [("n", 6)])
    assert s.read(6, "/n") == b"v"
    s.write(6, "/n", "mine")
    s.set_perms(6, "/n", [("n", 6), ("r", 7)])
    assert s.read(7, "/n") == b"mine"


def test_inheritance_on_create(store):
    store.set_perms(0, HOME + "/data", [("n", DOMU), ("r", 5)])
    store.write(DOMU, "data/a/b", "x")
    # Created by the domU: parent's list with the domU as owner.
    assert store.get_perms(DOMU, "data/a") == [("n", DOMU), ("r", 5)]
    assert store.get_perms(DOMU, "data/a/b") == [("n", DOMU), ("r", 5)]
    # Created by dom0 under a dom0-owned node: the list is kept as is.
    store.write(0, HOME + "/byhost/x", "y")
    assert store.get_perms(0, HOME + "/byhost/x") == [("n", 0), ("r", DOMU)]
    # Created by dom0 under a domU-owned node: still the domU's.
    store.write(0, HOME + "/data/fromhost", "z")
    assert store.get_perms(0, HOME + "/data/fromhost") == [("n", DOMU), ("r", 5)]
    assert store.read(DOMU, "data/fromhost") == b"z"


def test_inheritance_owner_replaced_for_other_creator():
    s = Store()
    s.write(0, "/shared", "")
    s.set_perms(0, "/shared", [("b", 0)])  # every domain may write
    s.write(3, "/shared/by3", "x")
    assert s.get_perms(0, "/shared/by3") == [("b", 3)]
    # Another domain can still write through the default entry ...
    s.write(4, "/shared/by3", "y")
    # ... but only the owner or dom0 may change permissions.
    assert errno_of(s.set_perms, 4, "/shared/by3", [("n", 3)]) == "EACCES"
    s.set_perms(3, "/shared/by3", [("r", 3)])


def test_set_perms_rules(store):
    store.write(0, HOME + "/name", "g")
    # Non-owner, even with read access: refused.
    assert errno_of(store.set_perms, DOMU, "name", [("b", DOMU)]) == "EACCES"
    store.write(DOMU, "data/mine", "m")
    # The owner may change the list but not give the node away.
    store.set_perms(DOMU, "data/mine", [("n", DOMU), ("r", 0)])
    assert errno_of(store.set_perms, DOMU, "data/mine", [("n", 2)]) == "EPERM"
    # dom0 may.
    store.set_perms(0, HOME + "/data/mine", [("n", 2)])
    assert errno_of(store.read, DOMU, "data/mine") == "EACCES"
    assert errno_of(store.set_perms, 0, HOME + "/name", []) == "EINVAL"
    assert errno_of(store.set_perms, 0, HOME + "/name", ["x1"]) == "EINVAL"
    assert errno_of(store.set_perms, 0, HOME + "/nothere", ["n0"]) == "ENOENT"


def test_set_target_grants_target_access():
    s = Store()
    s.write(0, "/t", "v")
    s.set_perms(0, "/t", [("n", 5)])
    assert errno_of(s.read, 6, "/t") == "EACCES"
    s.set_target(6, 5)
    assert s.read(6, "/t") == b"v"


# ----------------------------------------------------------- transactions


def test_transaction_isolation_and_commit(store):
    tx = store.transaction_start(0)
    assert tx != 0
    store.write(0, "/t/a", "1", tx)
    assert store.read(0, "/t/a", tx) == b"1"
    assert errno_of(store.read, 0, "/t/a") == "ENOENT"  # not visible outside
    store.transaction_end(0, tx)
    assert store.read(0, "/t/a") == b"1"
    assert errno_of(store.transaction_end, 0, tx) == "ENOENT"


def test_transaction_keeps_what_it_read(store):
    # xenstored's per-node check: a node is recorded at its first access in
    # the transaction; later reads there see that record, and a change
    # outside since then makes the commit fail.
    store.write(0, "/s", "old")
    tx = store.transaction_start(0)
    assert store.read(0, "/s", tx) == b"old"
    store.write(0, "/s", "new")
    assert store.read(0, "/s", tx) == b"old"
    assert errno_of(store.transaction_end, 0, tx) == "EAGAIN"


def test_transaction_reads_untouched_nodes_as_they_are_now(store):
    # A node the transaction had not accessed yet is read as it is now, and
    # its change before that first access is no conflict (as in xenstored).
    store.write(0, "/s", "old")
    tx = store.transaction_start(0)
    store.write(0, "/s", "new")
    assert store.read(0, "/s", tx) == b"new"
    store.write(0, "/t", "from-tx", tx)
    store.transaction_end(0, tx)
    assert store.read(0, "/t") == b"from-tx"


def test_transaction_abort(store):
    store.write(0, "/keep", "k")
    tx = store.transaction_start(0)
    store.write(0, "/keep", "changed", tx)
    store.rm(0, "/keep", tx)
    store.write(0, "/new", "n", tx)
    store.transaction_end(0, tx, commit=False)
    assert store.read(0, "/keep") == b"k"
    assert not store.exists("/new")


@pytest.mark.parametrize("access", ["read", "write", "directory", "rm", "get_perms"])
def test_transaction_conflict_eagain(store, access):
    store.write(0, "/c/x", "0")
    store.set_perms(0, "/c/x", [("n", 0), ("r", DOMU)])
    tx = store.transaction_start(DOMU)
    if access == "read":
        store.read(DOMU, "/c/x", tx)
    elif access == "directory":
        store.directory(DOMU, "/c/x", tx)
    elif access == "get_perms":
        store.get_perms(DOMU, "/c/x", tx)
    else:
        store.transaction_end(DOMU, tx, commit=False)
        tx = store.transaction_start(0)
        if access == "write":
            store.write(0, "/c/x", "tx", tx)
        else:
            store.rm(0, "/c/x", tx)
    dom = DOMU if access in ("read", "directory", "get_perms") else 0
    store.write(0, "/c/x", "outside")
    assert errno_of(store.transaction_end, dom, tx) == "EAGAIN"
    # The transaction is over either way.
    assert errno_of(store.transaction_end, dom, tx) == "ENOENT"
    assert store.read(0, "/c/x") == b"outside"


def test_transaction_conflict_on_listed_directory(store):
    store.mkdir(0, "/dir")
    tx = store.transaction_start(0)
    store.directory(0, "/dir", tx)
    store.write(0, "/dir/new", "x")  # changes /dir's child list
    assert errno_of(store.transaction_end, 0, tx) == "EAGAIN"


def test_transaction_conflict_on_read_of_missing_node(store):
    tx = store.transaction_start(0)
    assert errno_of(store.read, 0, "/later", tx) == "ENOENT"
    store.write(0, "/later", "x")
    assert errno_of(store.transaction_end, 0, tx) == "EAGAIN"


def test_transaction_no_conflict_on_unrelated_change(store):
    store.write(0, "/u/a", "1")
    store.write(0, "/u/b", "1")
    tx = store.transaction_start(0)
    store.read(0, "/u/a", tx)
    store.write(0, "/u/a", "2", tx)
    store.write(0, "/u/b", "outside")
    store.transaction_end(0, tx)
    assert store.read(0, "/u/a") == b"2"
    assert store.read(0, "/u/b") == b"outside"


def test_two_transactions_second_fails(store):
    store.write(0, "/a", "0")
    store.write(0, "/b", "0")
    t1 = store.transaction_start(0)
    t2 = store.transaction_start(0)
    assert t1 != t2
    store.read(0, "/a", t1)
    store.read(0, "/b", t2)
    store.write(0, "/b", "1", t1)
    store.write(0, "/a", "2", t2)
    store.transaction_end(0, t1)
    assert errno_of(store.transaction_end, 0, t2) == "EAGAIN"
    assert store.read(0, "/a") == b"0" and store.read(0, "/b") == b"1"


def test_nested_rm_and_resurrect_in_transaction(store):
    store.write(0, "/r/a/b", "old-b")
    store.write(0, "/r/a/c", "old-c")
    tx = store.transaction_start(0)
    store.rm(0, "/r/a", tx)
    assert errno_of(store.read, 0, "/r/a/b", tx) == "ENOENT"
    store.write(0, "/r/a/b/deep", "new", tx)
    assert store.read(0, "/r/a/b", tx) == b""
    assert store.directory(0, "/r/a", tx) == ["b"]
    store.rm(0, "/r/a/b/deep", tx)
    store.write(0, "/r/a/b/deep", "newer", tx)
    # Outside still the old tree.
    assert store.read(0, "/r/a/b") == b"old-b"
    store.transaction_end(0, tx)
    assert store.directory(0, "/r/a") == ["b"]
    assert store.read(0, "/r/a/b") == b""
    assert store.read(0, "/r/a/b/deep") == b"newer"
    assert not store.exists("/r/a/c")


def test_transaction_ids_belong_to_domain(store):
    tx = store.transaction_start(0)
    assert errno_of(store.read, DOMU, "data", tx) == "ENOENT"
    assert errno_of(store.transaction_end, DOMU, tx) == "ENOENT"
    assert errno_of(store.read, 0, "/", 12345) == "ENOENT"
    assert store.has_transaction(0, tx) and not store.has_transaction(DOMU, tx)


def test_transaction_permissions_still_apply(store):
    tx = store.transaction_start(DOMU)
    assert errno_of(store.write, DOMU, "name", "x", tx) == "EACCES"
    store.write(DOMU, "data/t", "ok", tx)
    store.transaction_end(DOMU, tx)
    assert store.read(DOMU, "data/t") == b"ok"


# ---------------------------------------------------------------- watches


def test_watch_fires_on_registration(store):
    c, rec = watcher(store, 0)
    store.watch(c, "/nothing/here", "tok")
    assert rec.take() == [("/nothing/here", "tok")]


def test_watch_descendants_and_self(store):
    c, rec = watcher(store, 0)
    store.watch(c, "/w", "t")
    rec.take()
    store.write(0, "/w", "1")
    store.write(0, "/w/a/b", "2")
    store.mkdir(0, "/w/m")
    store.write(0, "/wx", "not a child")
    store.write(0, "/other", "no")
    assert rec.take() == [("/w", "t"), ("/w/a/b", "t"), ("/w/m", "t")]
    store.mkdir(0, "/w/m")  # exists: no event
    assert rec.take() == []


def test_watch_root_sees_everything(store):
    c, rec = watcher(store, 0)
    store.watch(c, "/", "root")
    rec.take()
    store.write(0, "/x/y", "1")
    assert rec.take() == [("/x/y", "root")]


def test_watch_relative_paths_reported_relative(store):
    c, rec = watcher(store, DOMU)
    store.watch(c, "data", "rel")
    store.watch(c, HOME + "/data", "abs")
    assert rec.take() == [("data", "rel"), (HOME + "/data", "abs")]
    store.write(DOMU, "data/k", "v")
    assert rec.take() == [("data/k", "rel"), (HOME + "/data/k", "abs")]
    assert store.watches(c) == [("data", "rel"), (HOME + "/data", "abs")]


def test_watch_rm_fires_removed_paths(store):
    store.write(0, "/r/a/b", "1")
    store.write(0, "/r/a/c", "1")
    c, rec = watcher(store, 0)
    store.watch(c, "/r", "top")
    store.watch(c, "/r/a/b", "deep")
    store.watch(c, "/r/a/b/below", "below")  # never existed
    store.watch(c, "/r/a", "self")
    rec.take()
    store.rm(0, "/r/a")
    events = rec.take()
    # Watches below the removed node fire with their own path; the removed
    # node itself is reported to watches on it and its ancestors.
    assert ("/r/a/b", "deep") in events
    assert ("/r/a", "top") in events
    assert ("/r/a", "self") in events
    assert not any(tok == "below" for _, tok in events)
    # The descendants are not reported to watches on ancestors one by one.
    assert ("/r/a/b", "top") not in events and ("/r/a/c", "top") not in events
    # Children go first.
    assert events.index(("/r/a/b", "deep")) < events.index(("/r/a", "top"))


def test_watch_set_perms_fires(store):
    store.write(0, "/p", "v")
    c, rec = watcher(store, 0)
    store.watch(c, "/p", "t")
    rec.take()
    store.set_perms(0, "/p", [("n", 0), ("r", 3)])
    assert rec.take() == [("/p", "t")]


def test_watch_needs_read_permission(store):
    store.write(0, "/hidden/deeper/x", "v")
    c, rec = watcher(store, DOMU)
    store.watch(c, "/hidden", "t")
    assert rec.take() == [("/hidden", "t")]  # registration always fires
    store.write(0, "/hidden/deeper/x", "2")
    assert rec.take() == []
    # Readable node: fires.
    store.write(0, HOME + "/name", "n")
    store.watch(c, "name", "n")
    rec.take()
    store.write(0, HOME + "/name", "m")
    assert rec.take() == [("name", "n")]


def test_watch_fires_when_permission_is_taken_away(store):
    store.write(0, "/hidden", "")
    store.write(0, "/hidden/p", "v")
    store.set_perms(0, "/hidden/p", [("n", 0), ("r", DOMU)])
    c, rec = watcher(store, DOMU)
    store.watch(c, "/hidden/p", "t")
    rec.take()
    store.set_perms(0, "/hidden/p", [("n", 0)])
    assert rec.take() == [("/hidden/p", "t")]
    store.write(0, "/hidden/p", "now hidden")
    assert rec.take() == []


def test_watch_in_transaction_fires_at_commit(store):
    c, rec = watcher(store, 0)
    store.watch(c, "/t", "t")
    rec.take()
    tx = store.transaction_start(0)
    store.write(0, "/t/a", "1", tx)
    store.write(0, "/t/a", "2", tx)
    store.write(0, "/t/b", "1", tx)
    assert rec.take() == []
    store.transaction_end(0, tx)
    assert rec.take() == [("/t/a", "t"), ("/t/b", "t")]
    tx = store.transaction_start(0)
    store.write(0, "/t/c", "1", tx)
    store.transaction_end(0, tx, commit=False)
    assert rec.take() == []


def test_watch_failed_commit_fires_nothing(store):
    store.write(0, "/f", "0")
    c, rec = watcher(store, 0)
    store.watch(c, "/f", "t")
    tx = store.transaction_start(0)
    store.read(0, "/f", tx)
    store.write(0, "/f", "1", tx)
    store.write(0, "/f", "outside")
    rec.take()
    assert errno_of(store.transaction_end, 0, tx) == "EAGAIN"
    assert rec.take() == []


def test_watch_duplicate_unwatch_reset(store):
    c, rec = watcher(store, DOMU)
    store.watch(c, "data", "t")
    assert errno_of(store.watch, c, "data", "t") == "EEXIST"
    assert errno_of(store.watch, c, HOME + "/data", "t") == "EEXIST"  # same node
    store.watch(c, "data", "t2")
    store.unwatch(c, "data", "t")
    assert errno_of(store.unwatch, c, "data", "t") == "ENOENT"
    rec.take()
    store.write(DOMU, "data/x", "1")
    assert rec.take() == [("data/x", "t2")]
    tx = store.transaction_start(DOMU, c)
    store.reset_watches(c)
    assert store.watches(c) == []
    assert not store.has_transaction(DOMU, tx)
    store.write(DOMU, "data/x", "2")
    assert rec.take() == []


def test_watch_invalid_path(store):
    c, _ = watcher(store, 0)
    assert errno_of(store.watch, c, "/bad//path", "t") == "EINVAL"
    assert errno_of(store.watch, c, "", "t") == "EINVAL"


def test_special_watches(store):
    c0, rec0 = watcher(store, 0)
    c1, rec1 = watcher(store, DOMU)
    store.watch(c0, "@introduceDomain", "intro")
    store.watch(c0, "@releaseDomain", "rel")
    store.watch(c1, "@introduceDomain", "intro")
    store.watch(c1, "@releaseDomain", "rel")
    assert rec1.take() == [("@introduceDomain", "intro"), ("@releaseDomain", "rel")]
    rec0.take()
    store.introduce_domain(5)
    assert store.is_domain_introduced(5)
    assert rec0.take() == [("@introduceDomain", "intro")]
    # @introduceDomain is for dom0 only; @releaseDomain is readable by all.
    assert rec1.take() == []
    store.release_domain(5)
    assert not store.is_domain_introduced(5)
    assert rec0.take() == [("@releaseDomain", "rel")]
    assert rec1.take() == [("@releaseDomain", "rel")]
    # Special watches see nothing of the ordinary tree.
    store.write(0, "/x", "1")
    assert rec0.take() == []


def test_release_domain_drops_orphans(store):
    store.write(DOMU, "data/mine", "m")
    store.write(0, "/shared", "s")
    store.set_perms(0, "/shared", [("n", 0), ("r", DOMU), ("r", 2)])
    c, rec = watcher(store, DOMU)
    store.watch(c, "data", "t")
    store.introduce_domain(DOMU)
    store.release_domain(DOMU)
    assert not store.exists(HOME + "/data")
    assert store.get_perms(0, "/shared") == [("n", 0), ("r", 2)]
    assert store.watches(c) == []


def test_release_domain_keep_orphans():
    s = Store(keep_orphans=True)
    s.write(0, "/d", "")
    s.set_perms(0, "/d", [("n", 3), ("r", 4)])
    s.write(3, "/d/x", "v")
    s.release_domain(3)
    assert s.get_perms(0, "/d") == [("n", 0), ("r", 4)]
    assert s.get_perms(0, "/d/x") == [("n", 0), ("r", 4)]
    assert s.read(0, "/d/x") == b"v"


def test_disconnect_drops_watches_and_transactions(store):
    c, rec = watcher(store, DOMU)
    store.watch(c, "data", "t")
    tx = store.transaction_start(DOMU, c)
    rec.take()
    store.disconnect(c)
    assert not store.has_transaction(DOMU, tx)
    store.write(DOMU, "data/x", "1")
    assert rec.take() == []
    assert errno_of(store.watch, c, "data", "t") == "EINVAL"


# ----------------------------------------------------------------- quotas


def test_quota_nodes():
    s = Store(quota_nodes=5)
    s.write(0, "/d", "")
    s.set_perms(0, "/d", [("n", 3)])
    s.write(3, "/d/a", "")
    s.write(3, "/d/b/c/d", "")  # 4 nodes now
    assert s.node_count(3) == 5  # /d (given to 3 by dom0) + 4
    assert errno_of(s.write, 3, "/d/e", "x") == "ENOSPC"
    assert errno_of(s.mkdir, 3, "/d/e") == "ENOSPC"
    assert not s.exists("/d/e")
    s.rm(3, "/d/a")
    s.write(3, "/d/e", "x")
    # dom0 is not limited.
    for i in range(20):
        s.write(0, f"/d/host{i}", "")


def test_quota_nodes_counts_all_created_parents():
    s = Store(quota_nodes=3)
    s.write(0, "/d", "")
    s.set_perms(0, "/d", [("n", 0), ("w", 3)])
    assert errno_of(s.write, 3, "/d/a/b/c/d", "x") == "ENOSPC"
    assert not s.exists("/d/a")
    s.write(3, "/d/a/b/c", "x")
    assert s.node_count(3) == 3


def test_quota_nodes_in_transaction():
    s = Store(quota_nodes=2)
    s.write(0, "/d", "")
    s.set_perms(0, "/d", [("n", 0), ("w", 3)])
    tx = s.transaction_start(3)
    s.write(3, "/d/a", "", tx)
    s.write(3, "/d/b", "", tx)
    assert errno_of(s.write, 3, "/d/c", "", tx) == "ENOSPC"
    s.transaction_end(3, tx)
    assert s.node_count(3) == 2


def test_quota_node_size():
    s = Store()
    s.write(0, "/d", "")
    s.set_perms(0, "/d", [("n", 3)])
    # 16-byte header + 8 bytes per permission + value + child names.
    fits = 2048 - 16 - 8
    s.write(3, "/d/v", b"x" * fits)
    assert errno_of(s.write, 3, "/d/v", b"x" * (fits + 1)) == "ENOSPC"
    assert s.read(3, "/d/v") == b"x" * fits
    # More permission entries make the node bigger.
    assert errno_of(s.set_perms, 3, "/d/v", ["n3", "r4"]) == "ENOSPC"
    # Child names count against the parent.
    s.write(3, "/d/v", b"x" * (fits - 2))
    assert errno_of(s.write, 3, "/d/v/ab", "") == "ENOSPC"
    s.write(3, "/d/v/a", "")
    # dom0 is not limited.
    s.write(0, "/d/v", b"y" * 4000)


def test_quota_watches():
    s = Store(quota_watches=3)
    c, _ = watcher(s, 4)
    for i in range(3):
        s.watch(c, f"/w{i}", "t")
    assert errno_of(s.watch, c, "/w3", "t") == "ENOSPC"
    s.unwatch(c, "/w0", "t")
    s.watch(c, "/w3", "t")
    c0, _ = watcher(s, 0)
    for i in range(10):
        s.watch(c0, f"/w{i}", "t")


def test_quota_watches_default_128():
    s = Store()
    c, _ = watcher(s, 4)
    for i in range(128):
        s.watch(c, f"/w{i}", "t")
    assert errno_of(s.watch, c, "/w128", "t") == "ENOSPC"


def test_quota_transactions():
    s = Store()
    c, _ = watcher(s, 4)
    txs = [s.transaction_start(4, c) for _ in range(10)]
    assert len(set(txs)) == 10 and 0 not in txs
    assert errno_of(s.transaction_start, 4, c) == "ENOSPC"
    s.transaction_end(4, txs[0], commit=False)
    s.transaction_start(4, c)
    for _ in range(20):
        s.transaction_start(0)


def test_quota_permissions_per_node():
    s = Store()
    s.write(0, "/d", "")
    s.set_perms(0, "/d", [("n", 3)])
    s.set_perms(3, "/d", [("n", 3)] + [("r", i) for i in range(10, 14)])
    assert errno_of(s.set_perms, 3, "/d", [("n", 3)] + [("r", i) for i in range(10, 15)]) == "ENOSPC"


def test_quota_configurable_path_limit():
    s = Store(quota_path=10)
    s.write(0, "/local/domain/3", "")
    s.set_perms(0, "/local/domain/3", [("n", 3)])
    s.write(3, "a" * 10, "")
    assert errno_of(s.write, 3, "a" * 11, "") == "EINVAL"


# ------------------------------------------ deep chains, transaction cost

# Deeper than Python's recursion limit (1000): every walk must be iterative.
GUEST_CHAIN = "data" + "/a" * 999  # the guest's 1000-node quota, "data" included


def test_guest_removes_the_deepest_chain_its_quota_allows(store):
    c, rec = watcher(store, DOMU)
    store.write(DOMU, GUEST_CHAIN, "bottom")
    assert store.node_count(DOMU) == 1000
    assert errno_of(store.write, DOMU, GUEST_CHAIN + "/a", "") == "ENOSPC"
    store.watch(c, "data", "w")
    rec.take()
    # Over the wire, as the guest sends it: OK, not EIO.
    msg = Message(XsType.RM, 7, 0, b"data/a\0")
    assert handle(store, c, DOMU, msg) == [Message(XsType.RM, 7, 0, b"OK\0")]
    assert not store.exists(HOME + "/data/a")
    assert store.node_count(DOMU) == 1
    assert rec.take() == [("data/a", "w")]
    # The quota is back: the chain can be built again.
    store.write(DOMU, GUEST_CHAIN, "again")


def test_deep_chain_removed_in_a_transaction(store):
    store.write(DOMU, GUEST_CHAIN, "bottom")
    tx = store.transaction_start(DOMU)
    store.rm(DOMU, "data/a", tx)
    assert store.exists(HOME + "/" + GUEST_CHAIN)
    store.transaction_end(DOMU, tx)
    assert not store.exists(HOME + "/data/a")
    assert store.node_count(DOMU) == 1


def test_release_domain_removes_a_deep_chain(store):
    store.write(DOMU, GUEST_CHAIN, "bottom")
    store.introduce_domain(DOMU)
    store.release_domain(DOMU)
    assert not store.exists(HOME + "/data")
    assert store.node_count(DOMU) == 0


def test_path_limits_bound_the_depth():
    # xs_wire.h: a guest's path is at most XENSTORE_REL_PATH_MAX (2048)
    # bytes after /local/domain/<id>/, any path at most
    # XENSTORE_ABS_PATH_MAX (3072): depth is bounded by length.
    s = Store(quota_nodes=10_000)
    s.write(0, HOME, "")
    s.set_perms(0, HOME, [("n", DOMU)])
    rel = "a" + "/a" * ((XENSTORE_REL_PATH_MAX - 1) // 2)
    assert len(rel) == XENSTORE_REL_PATH_MAX - 1
    s.write(DOMU, rel + "b", "")  # exactly 2048 bytes
    assert errno_of(s.write, DOMU, rel + "/b", "") == "EINVAL"
    deepest = "/a" * (XENSTORE_ABS_PATH_MAX // 2)
    s.write(0, deepest, "x")  # 1536 levels, 3072 bytes
    assert errno_of(s.write, 0, deepest + "/b", "") == "EINVAL"
    # A deep tree survives save and restore, and comes out as it went in.
    restored = Store()
    restored.restore_state(s.save_state())
    assert restored.paths() == s.paths()
    assert restored.read(0, deepest) == b"x"
    for store in (s, restored):
        store.rm(0, "/a")
        store.rm(0, "/local")
        assert store.paths() == ["/", "/tool", "/tool/xenstored"]


def test_open_transactions_cost_only_what_they_access():
    s = Store()
    for d in range(30):
        for i in range(100):
            s.write(0, f"/local/domain/{d}/device/vif/{i}", "x" * 20)
    assert len(s.paths()) > 3000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        txs = [s.transaction_start(0) for _ in range(300)]
        for tx in txs:
            s.read(0, "/local/domain/3/device/vif/7", tx)
            s.write(0, "/local/domain/3/device/vif/8", "y", tx)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # A copy of the store per transaction took about 60 MB here.
    assert grown < 1_000_000, grown
    # They still work: the first commits, the others conflict with it.
    s.transaction_end(0, txs[0])
    assert s.read(0, "/local/domain/3/device/vif/8") == b"y"
    assert errno_of(s.transaction_end, 0, txs[1]) == "EAGAIN"
    for tx in txs[2:]:
        s.transaction_end(0, tx, commit=False)


def test_quota_transaction_nodes():
    assert Store().quota_transaction_nodes == 1024  # xenstored's transaction-nodes
    s = Store(quota_transaction_nodes=5)
    s.write(0, "/d", "")
    s.set_perms(0, "/d", [("n", 3)])
    tx = s.transaction_start(3)
    for i in range(5):
        assert errno_of(s.read, 3, f"/d/n{i}", tx) == "ENOENT"
    assert errno_of(s.read, 3, "/d/n5", tx) == "ENOSPC"
    assert errno_of(s.read, 3, "/d/n0", tx) == "ENOENT"  # already recorded
    s.transaction_end(3, tx, commit=False)
    # A change that would record too many nodes is refused as a whole.
    tx = s.transaction_start(3)
    assert errno_of(s.write, 3, "/d/a/b/c/d/e", "x", tx) == "ENOSPC"
    s.write(3, "/d/a/b/c", "x", tx)  # /d/a/b/c, /d/a/b, /d/a, /d: 4
    s.transaction_end(3, tx)
    assert s.read(3, "/d/a/b/c") == b"x"
    # Domain 0 has no such quota.
    tx = s.transaction_start(0)
    for i in range(20):
        s.write(0, f"/d/x{i}", "", tx)
    s.transaction_end(0, tx)
    assert s.directory(0, "/d") == ["a"] + [f"x{i}" for i in range(20)]


# --------------------------------------------------------- directory_part


def test_directory_part_small(store):
    for name in ("a", "bb", "ccc"):
        store.write(0, f"/dp/{name}", "")
    gen, chunk = store.directory_part(0, "/dp", 0)
    assert chunk == b"a\0bb\0ccc\0\0"
    gen2, chunk = store.directory_part(0, "/dp", 2)
    assert gen2 == gen and chunk == b"bb\0ccc\0\0"
    assert store.directory_part(0, "/dp", 9) == (gen, b"\0")
    assert store.directory_part(0, "/dp", 1000) == (gen, b"\0")
    store.write(0, "/dp/d", "")
    assert store.directory_part(0, "/dp", 0)[0] != gen
    # An empty directory.
    assert store.directory_part(0, "/dp/a", 0)[1] == b"\0"
    assert errno_of(store.directory_part, DOMU, "/dp", 0) == "EACCES"


def test_directory_part_reassembles_long_lists():
    s = Store()
    names = [f"child-with-a-long-name-{i:04d}" for i in range(300)]
    for n in names:
        s.write(0, f"/big/{n}", "")
    blob = b"".join(n.encode() + b"\0" for n in names)
    assert len(blob) > 4096
    got = b""
    gen0 = None
    chunks = 0
    while True:
        gen, chunk = s.directory_part(0, "/big", len(got))
        gen0 = gen if gen0 is None else gen0
        assert gen == gen0
        assert len(str(gen)) + 1 + len(chunk) <= 4096
        chunks += 1
        if chunk.endswith(b"\0\0") or chunk == b"\0":
            got += chunk[:-1]
            break
        got += chunk
    assert got == blob and chunks > 1
    assert s.directory(0, "/big") == names


# -------------------------------------------------------------- populate


UUID = "d5c4a1f0-0000-4000-8000-000000000001"


def test_populate_domu_tree_and_perms():
    s = Store()
    populate_domu(s, 3, "guest", UUID, 524288, 2, 0x1234, 5, 0x5678, 6, max_vcpus=3, start_time=1700000000.25)
    home = "/local/domain/3"
    r = lambda p: s.read(0, p)  # noqa: E731
    assert r(home + "/name") == b"guest"
    assert r(home + "/domid") == b"3"
    assert r(home + "/vm") == f"/vm/{UUID}".encode()
    assert r(home + "/memory/target") == b"524288"
    assert r(home + "/memory/static-max") == b"524288"
    assert r(home + "/memory/videoram") == b"-1"
    assert r(home + "/cpu/0/availability") == b"online"
    assert r(home + "/cpu/1/availability") == b"online"
    assert r(home + "/cpu/2/availability") == b"offline"
    assert r(home + "/control/shutdown") == b""
    assert r(home + "/control/platform-feature-multiprocessor-suspend") == b"1"
    assert r(home + "/control/platform-feature-xs_reset_watches") == b"1"
    assert r(home + "/console/ring-ref") == str(0x1234).encode()
    assert r(home + "/console/port") == b"5"
    assert r(home + "/console/limit") == b"1048576"
    assert r(home + "/console/type") == b"xenconsoled"
    assert r(home + "/console/output") == b"pty"
    assert r(home + "/console/backend") == b"/local/domain/0/backend/console/3/0"
    assert r(home + "/store/ring-ref") == str(0x5678).encode()
    assert r(home + "/store/port") == b"6"
    assert r(f"/vm/{UUID}/uuid") == UUID.encode()
    assert r(f"/vm/{UUID}/name") == b"guest"
    assert r(f"/vm/{UUID}/start_time") == b"1700000000.25"
    assert r("/local/domain/0/backend/console/3/0/frontend") == (home + "/console").encode()
    assert s.is_domain_introduced(3)

    ro = [("n", 0), ("r", 3)]
    rw = [("n", 3)]
    for p in ("", "/name", "/cpu", "/memory", "/memory/target", "/control", "/device", "/console",
              "/console/ring-ref", "/control/platform-feature-xs_reset_watches"):
        assert s.get_perms(0, home + p) == ro, p
    for p in ("/control/shutdown", "/control/feature-poweroff", "/control/feature-reboot",
              "/control/feature-suspend", "/control/sysrq", "/data", "/drivers", "/feature", "/attr",
              "/error", "/device/suspend/event-channel"):
        assert s.get_perms(0, home + p) == rw, p
    assert s.get_perms(0, home + "/console/backend-id") == [("n", 3), ("r", 0)]
    assert s.get_perms(0, f"/vm/{UUID}") == ro
    assert s.get_perms(0, "/libxl/3") == [("n", 0)]


def test_populate_domu_guest_view():
    s = Store()
    populate_domu(s, 3, "guest", UUID, 262144, 1, 1, 2)
    assert not s.exists("/local/domain/3/store")
    # The guest reads its tree, writes where xl lets it, nowhere else.
    assert s.read(3, "name") == b"guest"
    assert s.read(3, "console/ring-ref") == b"1"
    assert "shutdown" in s.directory(3, "control")
    s.write(3, "control/shutdown", "")
    s.write(3, "control/feature-poweroff", "1")
    s.write(3, "data/updated", "1")
    s.write(3, "drivers/0", "Linux 6.1")
    s.write(3, "device/suspend/event-channel", "9")
    assert errno_of(s.write, 3, "name", "x") == "EACCES"
    assert errno_of(s.write, 3, "control/new", "x") == "EACCES"
    assert errno_of(s.write, 3, "memory/target", "1") == "EACCES"
    assert errno_of(s.write, 3, "console/ring-ref", "1") == "EACCES"
    assert errno_of(s.read, 3, "/libxl/3/type") == "EACCES"
    assert errno_of(s.read, 3, "/local/domain/4") == "EACCES"
    # A second populate (re-creation) starts from a clean home.
    populate_domu(s, 3, "guest2", UUID, 262144, 1, 1, 2)
    assert s.read(3, "name") == b"guest2"
    assert errno_of(s.read, 3, "data/updated") == "ENOENT"


def test_populate_domu_fires_watches_once_committed():
    s = Store()
    c, rec = watcher(s, 0)
    s.watch(c, "/local/domain/3/control/shutdown", "sd")
    s.watch(c, "@introduceDomain", "intro")
    rec.take()
    populate_domu(s, 3, "guest", UUID, 262144, 1, 1, 2)
    events = rec.take()
    assert ("/local/domain/3/control/shutdown", "sd") in events
    assert events[-1] == ("@introduceDomain", "intro")


# ---------------------------------------------------- property-based model

COMPONENTS = ["a", "b"]
paths_st = st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=3).map(lambda xs: "/t/" + "/".join(xs))
values_st = st.binary(max_size=6)
in_tx_st = st.sampled_from([True, True, False])
op_st = st.one_of(
    st.tuples(st.just("write"), paths_st, values_st, in_tx_st),
    st.tuples(st.just("mkdir"), paths_st, st.just(b""), in_tx_st),
    st.tuples(st.just("rm"), paths_st, st.just(b""), in_tx_st),
    st.tuples(st.just("read"), paths_st, st.just(b""), in_tx_st),
    st.tuples(st.just("directory"), paths_st, st.just(b""), in_tx_st),
    st.tuples(
        st.sampled_from(["start", "start", "commit", "commit", "abort"]), st.just(""), st.just(b""), st.just(True)
    ),
)


def _parent(p: str) -> str:
    return p.rsplit("/", 1)[0] or "/"


class Model:
    """A reference: path -> value, plus a version per path bumped on every
    change (value, child list, creation, removal) to predict EAGAIN."""

    def __init__(self, nodes: dict[str, bytes]) -> None:
        self.nodes = dict(nodes)
        self.children: dict[str, list[str]] = {}
        self.version: dict[str, int] = {p: 0 for p in nodes}
        self.clock = 0

    def copy(self) -> "Model":
        m = Model(self.nodes)
        m.children = {k: list(v) for k, v in self.children.items()}
        m.version = dict(self.version)
        m.clock = self.clock
        return m

    def bump(self, p: str) -> None:
        self.clock += 1
        self.version[p] = self.clock

    def write(self, p: str, v: bytes, keep: bool = False) -> set[str]:
        changed = set()
        if p not in self.nodes:
            missing = []
            q = p
            while q not in self.nodes:
                missing.append(q)
                q = _parent(q)
            for m in reversed(missing):
                self.children.setdefault(_parent(m), []).append(m.rsplit("/", 1)[1])
                changed.add(_parent(m))
                self.nodes[m] = b""
                changed.add(m)
        elif keep:
            return changed
        if not keep:
            self.nodes[p] = v
        changed.add(p)
        for c in changed:
            self.bump(c)
        return changed

    def subtree(self, p: str) -> set[str]:
        """``p`` and its descendants, found through the child lists (as the
        store walks them)."""
        if p not in self.nodes:
            return set()
        out, todo = set(), [p]
        while todo:
            q = todo.pop()
            out.add(q)
            todo.extend(c for c in (q + "/" + n for n in self.children.get(q, [])) if c in self.nodes)
        return out

    def rm(self, p: str) -> set[str]:
        if p not in self.nodes:
            return set()
        gone = self.subtree(p)
        for q in gone:
            del self.nodes[q]
            self.children.pop(q, None)
            self.version.pop(q, None)
        par = _parent(p)
        if par not in self.nodes:
            # A transaction's view: a node created outside under one the
            # transaction removed (its commit is bound to fail).
            return gone
        # (In a transaction's view the parent may be newer and not list it.)
        self.children[par] = [c for c in self.children.get(par, []) if c != p.rsplit("/", 1)[1]]
        self.bump(par)
        return gone | {par}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_st, min_size=20, max_size=80), domid=st.sampled_from([0, DOMU]))
def test_store_matches_reference_model(ops, domid):
    s = Store()
    root = "/t" if domid == 0 else HOME + "/data/t"

    def real(p: str) -> str:
        return root + p[2:]

    s.write(0, HOME, "")
    s.set_perms(0, HOME, [("n", 0), ("r", DOMU)])
    s.write(0, HOME + "/data", "")
    s.set_perms(0, HOME + "/data", [("n", DOMU)])
    s.mkdir(domid, root)
    model = Model({"/t": b""})
    tx = 0
    # The transaction as xenstored keeps it: each node it accessed, as it
    # sees it now (None: absent), and the outside version at first access.
    seen: dict[str, tuple[bytes, list[str]] | None] = {}
    first_version: dict[str, int | None] = {}
    modified: set[str] = set()

    def tx_view() -> Model:
        """The outside model overlaid with what the transaction accessed."""
        view = model.copy()
        for q, state in seen.items():
            if state is None:
                view.nodes.pop(q, None)
                view.children.pop(q, None)
            else:
                view.nodes[q], view.children[q] = state[0], list(state[1])
        return view

    def record(view: Model, accessed: set[str]) -> None:
        for q in accessed:
            if q not in first_version:
                first_version[q] = model.version.get(q)
            seen[q] = (view.nodes[q], list(view.children.get(q, []))) if q in view.nodes else None

    for kind, p, v, in_tx in ops:
        if kind == "start":
            if tx:
                continue
            tx = s.transaction_start(domid)
            seen, first_version, modified = {}, {}, set()
            continue
        if kind in ("commit", "abort"):
            if not tx:
                continue
            if kind == "abort":
                s.transaction_end(domid, tx, commit=False)
            else:
                conflict = any(model.version.get(q) != ver for q, ver in first_version.items())
                try:
                    s.transaction_end(domid, tx)
                    committed = True
                except XenstoreError as e:
                    assert e.errno == "EAGAIN"
                    committed = False
                assert committed == (not conflict)
                if committed:
                    for q in sorted(modified):
                        state = seen[q]
                        if state is not None:
                            model.nodes[q] = state[0]
                            model.children[q] = list(state[1])
                            model.bump(q)
                        elif q in model.nodes:
                            del model.nodes[q]
                            model.children.pop(q, None)
                            model.version.pop(q, None)
            tx = 0
            continue

        use_tx = tx if (in_tx and tx) else 0
        m = tx_view() if use_tx else model
        accessed = {p}
        try:
            if kind == "write":
                s.write(domid, real(p), v, use_tx)
                changed = m.write(p, v)
            elif kind == "mkdir":
                s.mkdir(domid, real(p), use_tx)
                changed = m.write(p, b"", keep=True)
            elif kind == "rm":
                gone = m.subtree(p)
                s.rm(domid, real(p), use_tx)
                if p not in m.nodes and _parent(p) not in m.nodes:
                    pytest.fail("rm of a path without parent succeeded")
                changed = m.rm(p) | gone
            elif kind == "read":
                assert s.read(domid, real(p), use_tx) == m.nodes[p]
                changed = set()
            else:
                assert s.directory(domid, real(p), use_tx) == m.children.get(p, [])
                changed = set()
        except XenstoreError as e:
            # The only failures possible here: a missing node, or rm with a
            # missing parent.
            assert e.errno == "ENOENT", e
            if kind == "rm":
                assert _parent(p) not in m.nodes
            else:
                assert p not in m.nodes
            if use_tx:
                record(m, accessed)
            continue
        if use_tx:
            record(m, accessed | changed)
            modified |= changed

        # Invariants of the store against the model (outside view).
        for q, val in model.nodes.items():
            assert s.read(domid, real(q)) == val
            assert s.directory(domid, real(q)) == model.children.get(q, [])
        real_paths = [q for q in s.paths() if q == root or q.startswith(root + "/")]
        assert len(real_paths) == len(model.nodes)
        for q in s.paths():
            if q != "/":
                assert s.exists(_parent(q)), q
                assert q.rsplit("/", 1)[1] in s.directory(0, _parent(q))


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["read", "write", "mkdir", "rm", "directory", "get_perms", "set_perms", "watch"]),
            st.text(alphabet="ab/@-_.x\0", max_size=8),
            st.sampled_from([0, 1, 2]),
        ),
        max_size=30,
    )
)
def test_store_raises_only_its_own_error(ops):
    s = Store(quota_nodes=8, quota_watches=3)
    conns = {d: s.connect(d, lambda p, t: None) for d in (0, 1, 2)}
    for kind, path, domid in ops:
        try:
            if kind == "write":
                s.write(domid, path, b"v")
            elif kind == "set_perms":
                s.set_perms(domid, path, [("n", domid), ("r", 2)])
            elif kind == "watch":
                s.watch(conns[domid], path, "tok")
            else:
                getattr(s, kind)(domid, path)
        except XenstoreError:
            pass
    for q in s.paths():
        if q != "/":
            assert s.exists(_parent(q))
            node = s._tree.nodes[q]
            assert isinstance(node, Node)
