"""Save and restore of the xenstore: Store.save_state()/restore_state() and
RingConnection.save_state()/RingConnection(state=...), through JSON, with a
guest driving a real ring page."""

from __future__ import annotations

import base64
import json
import struct

import pytest
import test_xenstore_wire

from pvhvm.xenstore import Message, RingConnection, Store, XenstoreError, XsType
from pvhvm.xenstore import ring as R
from pvhvm.xenstore.store import StateError

DOMU = 1
HOME = "/local/domain/1"


def json_round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state))


class Domain(test_xenstore_wire.Setup):
    """A guest's ring page and its RingConnection; restored() is the same
    domain after a save/restore: a new Store and connection, the page copied
    as guest RAM would be."""

    def __init__(self, store: Store, page: bytearray | None = None, state: dict | None = None) -> None:
        super().__init__(store, domid=DOMU, page=page, state=state)

    def restored(self) -> "Domain":
        store_state = json_round_trip(self.store.save_state())
        ring_state = json_round_trip(self.ring.save_state())
        store = Store()
        store.restore_state(store_state)
        return Domain(store, bytearray(self.page), ring_state)


def one(messages: list[Message]) -> tuple[int, bytes]:
    assert len(messages) == 1, messages
    return messages[0].type, messages[0].payload


@pytest.fixture
def store() -> Store:
    s = Store(quota_watches=7)
    s.write(0, HOME, "")
    s.set_perms(0, HOME, [("n", 0), ("r", DOMU)])
    s.write(0, HOME + "/data", "")
    s.set_perms(0, HOME + "/data", [("n", DOMU)])
    s.write(0, HOME + "/name", b"guest\0\xff")  # any bytes survive
    s.write(0, "/vm", "")
    s.introduce_domain(DOMU)
    return s


def test_tree_perms_generations_and_settings_survive(store):
    d = Domain(store)
    assert one(d.request(XsType.WRITE, b"data/c\0three")) == (XsType.WRITE, b"OK\0")
    for name in ("a", "b"):
        d.request(XsType.WRITE, f"data/{name}\0x".encode())
    store.set_perms(0, HOME + "/data/b", [("n", DOMU), ("r", 2)])
    store.set_perms(0, "@releaseDomain", [("n", 0), ("r", 5)])
    r = d.restored().store

    assert r.paths() == store.paths()
    for path in store.paths():
        assert r.read(0, path) == store.read(0, path)
        assert r.get_perms(0, path) == store.get_perms(0, path)
        assert r.directory(0, path) == store.directory(0, path)  # same order
        assert r.directory_part(0, path, 0) == store.directory_part(0, path, 0)  # same generation
    assert r.read(0, HOME + "/name") == b"guest\0\xff"
    assert r.get_perms(0, "@releaseDomain") == [("n", 0), ("r", 5)]
    assert r.generation() == store.generation()
    assert r.node_count(DOMU) == store.node_count(DOMU) == 4
    assert r.is_domain_introduced(DOMU) and r.quota_watches == 7
    # Permissions still decide: the guest can read its node, not /vm.
    assert r.read(DOMU, "data/b") == b"x"
    with pytest.raises(XenstoreError, match="EACCES"):
        r.read(DOMU, "/vm")


def test_guest_watch_fires_after_restore(store):
    d = Domain(store)
    d.request(XsType.WATCH, b"data\0tok\0")  # relative, as Linux registers them
    d.request(XsType.WATCH, b"/local/domain/1/name\0\xfe\x01\0")
    state = store.save_state()
    assert [w["path"] for w in state["guest_connections"][0]["watches"]] == ["data", HOME + "/name"]

    r = d.restored()
    kicks = r.kicks
    r.store.write(0, HOME + "/data/x", "1")
    assert r.kicks == kicks + 1  # written to the ring and notified at once
    assert [(m.type, m.payload) for m in r.guest.messages()] == [(XsType.WATCH_EVENT, b"data/x\0tok\0")]
    r.store.write(0, HOME + "/name", "new")
    assert [m.payload for m in r.guest.messages()] == [HOME.encode() + b"/name\0\xfe\x01\0"]
    # The guest can remove its restored watch; it is the same one.
    assert one(r.request(XsType.UNWATCH, b"data\0tok\0")) == (XsType.UNWATCH, b"OK\0")
    r.store.write(0, HOME + "/data/y", "1")
    assert r.guest.messages() == []


def test_host_watches_are_not_saved_and_are_kept(store):
    Domain(store).request(XsType.WATCH, b"data\0tok\0")
    host_events: list[tuple[str, str]] = []
    host = store.connect(0, lambda p, t: host_events.append((p, t)))
    store.watch(host, HOME, "host")
    state = store.save_state()
    text = json.dumps(state)  # plain JSON: no callables, no bytes
    (guest,) = state["guest_connections"]
    assert guest["watches"] == [{"path": "data", "token": base64.b64encode(b"tok").decode()}]

    # A backend that registered before the restore keeps its watch.
    fresh = Store()
    kept: list[tuple[str, str]] = []
    fresh.watch(fresh.connect(0, lambda p, t: kept.append((p, t))), HOME, "backend")
    fresh.restore_state(json.loads(text))
    fresh.write(0, HOME + "/data/z", "1")
    assert kept[-1] == (HOME + "/data/z", "backend")


def test_events_before_the_ring_is_back_are_held(store):
    d = Domain(store)
    d.request(XsType.WATCH, b"data\0tok\0")
    store_state, ring_state = json_round_trip(store.save_state()), json_round_trip(d.ring.save_state())
    r = Store()
    r.restore_state(store_state)
    r.write(0, HOME + "/data/early", "1")  # no RingConnection yet
    back = Domain(r, bytearray(d.page), ring_state)
    assert back.guest.messages() == [] and back.kicks == 0  # the constructor leaves the ring alone
    assert back.ring.service() is True and back.kicks == 1
    assert [m.payload for m in back.guest.messages()] == [b"data/early\0tok\0"]
    with pytest.raises(ValueError, match="no restored ring connection"):
        RingConnection(bytearray(4096), r, DOMU, lambda: None, state=ring_state)


def test_open_transaction_is_doomed_after_restore(store):
    """The documented fate (Store.save_state): the id stays valid, requests
    in it work on the restored tree, commit is EAGAIN, abort is OK."""
    d = Domain(store)
    typ, payload = one(d.request(XsType.TRANSACTION_START, b"\0"))
    assert typ == XsType.TRANSACTION_START
    tx = int(payload.rstrip(b"\0"))
    d.request(XsType.WRITE, b"data/in-tx\0lost", tx=tx)
    typ, payload = one(d.request(XsType.TRANSACTION_START, b"\0"))
    tx2 = int(payload.rstrip(b"\0"))

    r = d.restored()
    assert one(r.request(XsType.READ, b"name\0", tx=tx)) == (XsType.READ, b"guest\0\xff")
    assert one(r.request(XsType.WRITE, b"data/again\0v", tx=tx)) == (XsType.WRITE, b"OK\0")
    assert one(r.request(XsType.TRANSACTION_END, b"T\0", tx=tx)) == (XsType.ERROR, b"EAGAIN\0")
    assert one(r.request(XsType.TRANSACTION_END, b"F\0", tx=tx2)) == (XsType.TRANSACTION_END, b"OK\0")
    assert not r.store.exists(HOME + "/data/in-tx") and not r.store.exists(HOME + "/data/again")
    # Now gone, like any ended transaction; the retry goes through.
    assert one(r.request(XsType.READ, b"name\0", tx=tx)) == (XsType.ERROR, b"ENOENT\0")
    typ, payload = one(r.request(XsType.TRANSACTION_START, b"\0"))
    new_tx = int(payload.rstrip(b"\0"))
    assert new_tx not in (tx, tx2)
    r.request(XsType.WRITE, b"data/in-tx\0kept", tx=new_tx)
    assert one(r.request(XsType.TRANSACTION_END, b"T\0", tx=new_tx)) == (XsType.TRANSACTION_END, b"OK\0")
    assert r.store.read(0, HOME + "/data/in-tx") == b"kept"


def test_partial_request_completes_after_restore(store):
    d = Domain(store)
    raw = Message(XsType.WRITE, 9, 0, b"data/split\0value").encode()
    d.guest.send(raw[:20])  # the header and part of the payload
    d.ring.service()
    assert d.guest.get(R.OFF_REQ_CONS) == 20 and d.guest.messages() == []

    r = d.restored()
    r.guest.send(raw[20:])
    r.ring.service()
    assert [(m.type, m.req_id, m.payload) for m in r.guest.messages()] == [(XsType.WRITE, 9, b"OK\0")]
    assert r.store.read(0, HOME + "/data/split") == b"value"


def test_queued_replies_are_delivered_after_restore(store):
    store.write(0, HOME + "/data/v", b"q" * 900)
    d = Domain(store)
    d.guest.send(b"".join(Message(XsType.READ, i, 0, b"data/v\0").encode() for i in range(3)))
    d.ring.service()
    assert d.ring.backlog == 3 * (16 + 900) - 1024  # the response ring is full

    r = d.restored()
    assert r.ring.backlog == d.ring.backlog
    got = []
    for _ in range(5):
        got += r.guest.messages()
        r.ring.service()
    got += r.guest.messages()
    assert [(m.req_id, m.payload) for m in got] == [(i, b"q" * 900) for i in range(3)]


def test_broken_connection_stays_broken(store):
    d = Domain(store)
    d.guest.set(R.OFF_REQ_PROD, 5000)  # more than a ring holds
    d.ring.service()
    assert d.ring.broken
    r = d.restored()
    assert r.ring.broken and r.ring.error == R.XENSTORE_ERROR_RINGIDX
    assert r.ring.service() is False


def _saved(store: Store) -> tuple[dict, dict]:
    d = Domain(store)
    d.request(XsType.WATCH, b"data\0tok\0")
    d.request(XsType.TRANSACTION_START, b"\0")
    d.guest.send(Message(XsType.WRITE, 1, 0, b"data/x\0v").encode()[:10])
    d.ring.service()
    return json_round_trip(store.save_state()), json_round_trip(d.ring.save_state())


BAD_STORE_STATES = [
    lambda s: s.pop("nodes"),
    lambda s: s.update(nodes={}),
    lambda s: s.update(nodes=[]),
    lambda s: s.update(format=2),
    lambda s: s.update(generation=True),
    lambda s: s.update(generation=-1),
    lambda s: s["quotas"].pop("watches"),
    lambda s: s["quotas"].update(nodes="1000"),
    lambda s: s["nodes"].append(s["nodes"][1]),  # listed twice
    lambda s: s["nodes"].reverse(),  # root not first
    lambda s: s["nodes"].append({"path": "/no/parent", "value": "", "perms": ["n0"], "gen": 1}),
    lambda s: s["nodes"][1].update(path="relative"),
    lambda s: s["nodes"][1].update(path="/a//b"),
    lambda s: s["nodes"][1].update(path="@releaseDomain"),
    lambda s: s["nodes"][1].update(value="not base64!"),
    lambda s: s["nodes"][1].update(perms=[]),
    lambda s: s["nodes"][1].update(perms=["x1"]),
    lambda s: s["nodes"][1].update(perms=[["r", 1]]),
    lambda s: s["nodes"][1].update(gen=s["generation"] + 1),
    lambda s: s["nodes"].__setitem__(1, "a node"),
    lambda s: s["specials"].pop("@introduceDomain"),
    lambda s: s.update(introduced=[70000]),
    lambda s: s.update(targets=[{"domid": 1}]),
    lambda s: s["guest_connections"].append(s["guest_connections"][0]),  # two rings of one domain
    lambda s: s["guest_connections"][0].update(domid="1"),
    lambda s: s["guest_connections"][0]["watches"][0].update(path="bad path"),
    lambda s: s["guest_connections"][0]["watches"][0].update(token=5),
    lambda s: s["guest_connections"][0]["watches"].append(s["guest_connections"][0]["watches"][0]),
    lambda s: s["guest_connections"][0]["watches"].extend(
        {"path": f"w{i}", "token": ""} for i in range(10)),  # over the watch quota
    lambda s: s["guest_connections"][0].update(transactions=[0]),
    lambda s: s["guest_connections"][0]["transactions"].append(s["guest_connections"][0]["transactions"][0]),
    lambda s: s.clear(),
]

BAD_RING_STATES = [
    lambda s: s.pop("pending"),
    lambda s: s.update(domid=2),
    lambda s: s.update(broken=0),
    lambda s: s.update(error=9),
    lambda s: s.update(partial_request="%%%"),
    # A complete request cannot be waiting: it would have been answered.
    lambda s: s.update(partial_request=base64.b64encode(Message(XsType.READ, 1, 0, b"ab").encode()).decode()),
    lambda s: s.update(pending=[{"data": "AAAA", "event": False, "sent": 0}]),  # shorter than a header
    lambda s: s.update(pending=[{"data": "A" * 24, "event": True, "sent": 18}]),  # sent past the end
    lambda s: s.update(pending=[{"data": "A" * 24, "event": True, "sent": 0}] * 2 +
                       [{"data": "A" * 24, "event": True, "sent": 1}]),  # only the first one in part
    lambda s: s.update(pending=[{"data": "A" * 24, "event": False, "sent": 0}] * (R.MAX_OUTSTANDING + 1)),
]


@pytest.mark.parametrize("damage", BAD_STORE_STATES)
def test_malformed_store_state_is_value_error(store, damage):
    state, _ = _saved(store)
    damage(state)
    fresh = Store()
    before = fresh.save_state()
    with pytest.raises(ValueError) as info:
        fresh.restore_state(state)
    assert isinstance(info.value, StateError)
    message = str(info.value)
    assert message.startswith("xenstore state: ") and "\n" not in message
    assert fresh.save_state() == before  # nothing changed


@pytest.mark.parametrize("damage", BAD_RING_STATES)
def test_malformed_ring_state_is_value_error(store, damage):
    state, ring_state = _saved(store)
    fresh = Store()
    fresh.restore_state(state)
    damage(ring_state)
    with pytest.raises(ValueError) as info:
        RingConnection(bytearray(4096), fresh, DOMU, lambda: None, state=ring_state)
    assert str(info.value).startswith("xenstore state: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("state", [None, 5, "x", [], {}])
def test_not_a_dict_is_value_error(state):
    with pytest.raises(ValueError, match="xenstore state"):
        Store().restore_state(state)
    with pytest.raises(ValueError, match="xenstore state"):
        Store().reattach(DOMU, lambda p, t: None)


def test_restore_needs_a_fresh_store(store):
    state, _ = _saved(store)
    with pytest.raises(ValueError, match="fresh store"):
        store.restore_state(state)
