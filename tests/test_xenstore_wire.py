"""The xenstore wire codec and dispatcher (wire.py) and the ring transport
(ring.py), with a simulated guest driving the ring page."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvhvm.xenstore import CLOSE, XSD_ERRORS, Message, RingConnection, Store, XsType, handle
from pvhvm.xenstore import ring as R
from pvhvm.xenstore import wire

DOMU = 1
HOME = "/local/domain/1"


@pytest.fixture
def store() -> Store:
    s = Store()
    s.write(0, HOME, "")
    s.set_perms(0, HOME, [("n", 0), ("r", DOMU)])
    s.write(0, HOME + "/data", "")
    s.set_perms(0, HOME + "/data", [("n", DOMU)])
    s.write(0, HOME + "/name", "guest")
    return s


class Conn:
    """A client of the store talking through handle()."""

    def __init__(self, store: Store, domid: int) -> None:
        self.store = store
        self.domid = domid
        self.events: list[tuple[str, str]] = []
        self.id = store.connect(domid, lambda p, t: self.events.append((p, t)))
        self.req = 0

    def __call__(self, typ: int, payload: bytes, tx: int = 0) -> Message:
        self.req += 1
        replies = handle(self.store, self.id, self.domid, Message(typ, self.req, tx, payload))
        assert isinstance(replies, list) and len(replies) == 1
        reply = replies[0]
        assert reply.req_id == self.req and reply.tx_id == tx
        return reply


def err(name: str) -> Message:
    return (XsType.ERROR, name.encode() + b"\0")


def tp(m: Message) -> tuple[int, bytes]:
    return (m.type, m.payload)


# ------------------------------------------------------------------ codec


def test_header_layout():
    m = Message(XsType.WRITE, 0x11223344, 7, b"/a\0v")
    raw = m.encode()
    assert raw[:16] == struct.pack("<IIII", 11, 0x11223344, 7, 4)
    assert raw[16:] == b"/a\0v"
    assert Message.decode(raw) == m
    with pytest.raises(ValueError):
        Message.decode(raw + b"x")


def test_type_numbers():
    expected = {
        "CONTROL": 0, "DIRECTORY": 1, "READ": 2, "GET_PERMS": 3, "WATCH": 4, "UNWATCH": 5,
        "TRANSACTION_START": 6, "TRANSACTION_END": 7, "INTRODUCE": 8, "RELEASE": 9,
        "GET_DOMAIN_PATH": 10, "WRITE": 11, "MKDIR": 12, "RM": 13, "SET_PERMS": 14,
        "WATCH_EVENT": 15, "ERROR": 16, "IS_DOMAIN_INTRODUCED": 17, "RESUME": 18,
        "SET_TARGET": 19, "RESET_WATCHES": 21, "DIRECTORY_PART": 22,
    }
    for name, num in expected.items():
        assert XsType[name] == num


def test_watch_event_encoding():
    m = wire.watch_event("/a/b", "tok")
    assert m.type == XsType.WATCH_EVENT and m.req_id == 0 and m.tx_id == 0
    assert m.payload == b"/a/b\0tok\0"
    assert wire.watch_event("/a", "x" * 5000) is None


# ------------------------------------------------------------- dispatcher


def test_read_write_mkdir_rm(store):
    c = Conn(store, 0)
    assert tp(c(XsType.WRITE, b"/x/y\0val\0ue")) == (XsType.WRITE, b"OK\0")
    assert tp(c(XsType.READ, b"/x/y\0")) == (XsType.READ, b"val\0ue")  # raw, no added NUL
    assert tp(c(XsType.WRITE, b"/x/empty\0")) == (XsType.WRITE, b"OK\0")
    assert tp(c(XsType.READ, b"/x/empty\0")) == (XsType.READ, b"")
    assert tp(c(XsType.MKDIR, b"/x/d\0")) == (XsType.MKDIR, b"OK\0")
    assert tp(c(XsType.DIRECTORY, b"/x\0")) == (XsType.DIRECTORY, b"y\0empty\0d\0")
    assert tp(c(XsType.DIRECTORY, b"/x/d\0")) == (XsType.DIRECTORY, b"")
    assert tp(c(XsType.RM, b"/x\0")) == (XsType.RM, b"OK\0")
    assert tp(c(XsType.READ, b"/x/y\0")) == err("ENOENT")


def test_relative_paths_and_domain_path(store):
    c = Conn(store, DOMU)
    assert tp(c(XsType.READ, b"name\0")) == (XsType.READ, b"guest")
    assert tp(c(XsType.WRITE, b"data/k\0v")) == (XsType.WRITE, b"OK\0")
    assert store.read(0, HOME + "/data/k") == b"v"
    assert tp(c(XsType.GET_DOMAIN_PATH, b"1\0")) == (XsType.GET_DOMAIN_PATH, b"/local/domain/1\0")
    assert tp(c(XsType.GET_DOMAIN_PATH, b"7\0")) == (XsType.GET_DOMAIN_PATH, b"/local/domain/7\0")
    assert tp(c(XsType.GET_DOMAIN_PATH, b"x\0")) == err("EINVAL")


def test_errors_are_errno_names(store):
    c = Conn(store, DOMU)
    assert tp(c(XsType.READ, b"/tool\0")) == err("EACCES")
    assert tp(c(XsType.WRITE, b"name\0x")) == err("EACCES")
    assert tp(c(XsType.READ, b"nothere\0")) == err("ENOENT")
    assert tp(c(XsType.READ, b"/bad//path\0")) == err("EINVAL")


def test_permissions_strings(store):
    c = Conn(store, 0)
    assert tp(c(XsType.GET_PERMS, HOME.encode() + b"\0")) == (XsType.GET_PERMS, b"n0\0r1\0")
    assert tp(c(XsType.SET_PERMS, b"/local/domain/1/name\0b1\0r2\0")) == (XsType.SET_PERMS, b"OK\0")
    assert store.get_perms(0, HOME + "/name") == [("b", 1), ("r", 2)]
    assert tp(c(XsType.SET_PERMS, b"/local/domain/1/name\0")) == err("EINVAL")
    assert tp(c(XsType.SET_PERMS, b"/local/domain/1/name\0q1\0")) == err("EINVAL")
    assert tp(c(XsType.GET_PERMS, b"@releaseDomain\0"))[0] == XsType.GET_PERMS
    u = Conn(store, DOMU)
    assert tp(u(XsType.SET_PERMS, b"data\0n2\0")) == err("EPERM")


def test_directory_part_reply(store):
    c = Conn(store, 0)
    for n in ("a", "bb"):
        c(XsType.WRITE, b"/dp/" + n.encode() + b"\0")
    gen = store.directory_part(0, "/dp", 0)[0]
    assert tp(c(XsType.DIRECTORY_PART, b"/dp\x000\0")) == (XsType.DIRECTORY_PART, f"{gen}\0a\0bb\0\0".encode())
    assert tp(c(XsType.DIRECTORY_PART, b"/dp\x002\0")) == (XsType.DIRECTORY_PART, f"{gen}\0bb\0\0".encode())
    assert tp(c(XsType.DIRECTORY_PART, b"/dp\x0099\0")) == (XsType.DIRECTORY_PART, f"{gen}\0\0".encode())
    assert tp(c(XsType.DIRECTORY_PART, b"/dp\0")) == err("EINVAL")


def test_directory_too_big_is_e2big():
    s = Store()
    c = Conn(s, 0)
    for i in range(200):
        s.write(0, f"/big/a-rather-long-child-name-{i:05d}", "")
    assert tp(c(XsType.DIRECTORY, b"/big\0")) == err("E2BIG")
    assert c(XsType.DIRECTORY_PART, b"/big\x000\0").type == XsType.DIRECTORY_PART


def test_watch_unwatch_reset(store):
    c = Conn(store, DOMU)
    assert tp(c(XsType.WATCH, b"data\0tok\0")) == (XsType.WATCH, b"OK\0")
    assert c.events == [("data", "tok")]
    assert tp(c(XsType.WATCH, b"data\0tok\0")) == err("EEXIST")
    store.write(0, HOME + "/data/x", "1")
    assert c.events[-1] == ("data/x", "tok")
    assert tp(c(XsType.UNWATCH, b"data\0tok\0")) == (XsType.UNWATCH, b"OK\0")
    assert tp(c(XsType.UNWATCH, b"data\0tok\0")) == err("ENOENT")
    assert tp(c(XsType.WATCH, b"data\0")) == err("EINVAL")
    c(XsType.WATCH, b"data\0t2\0")
    assert tp(c(XsType.RESET_WATCHES, b"")) == (XsType.RESET_WATCHES, b"OK\0")
    assert store.watches(c.id) == []


def test_watch_ignores_tx_id(store):
    c = Conn(store, DOMU)
    assert tp(c(XsType.WATCH, b"data\0tok\0", tx=999)) == (XsType.WATCH, b"OK\0")


def test_watch_token_bytes_round_trip(store):
    c = Conn(store, DOMU)
    c(XsType.WATCH, b"data\0\xff\xfe-token\0")
    path, token = c.events[0]
    assert wire.watch_event(path, token).payload == b"data\0\xff\xfe-token\0"


def test_transactions(store):
    c = Conn(store, DOMU)
    reply = c(XsType.TRANSACTION_START, b"\0")
    assert reply.type == XsType.TRANSACTION_START and reply.payload.endswith(b"\0")
    tx = int(reply.payload[:-1].decode())
    assert tx > 0
    assert tp(c(XsType.WRITE, b"data/t\0in-tx", tx)) == (XsType.WRITE, b"OK\0")
    assert tp(c(XsType.READ, b"data/t\0")) == err("ENOENT")
    assert tp(c(XsType.READ, b"data/t\0", tx)) == (XsType.READ, b"in-tx")
    assert tp(c(XsType.TRANSACTION_START, b"\0", tx)) == err("EBUSY")
    assert tp(c(XsType.TRANSACTION_END, b"X\0", tx)) == err("EINVAL")
    assert tp(c(XsType.TRANSACTION_END, b"T\0", tx)) == (XsType.TRANSACTION_END, b"OK\0")
    assert tp(c(XsType.READ, b"data/t\0")) == (XsType.READ, b"in-tx")
    assert tp(c(XsType.READ, b"data/t\0", tx)) == err("ENOENT")
    assert tp(c(XsType.TRANSACTION_END, b"T\0")) == err("ENOENT")


def test_transaction_eagain_and_abort(store):
    c = Conn(store, DOMU)
    tx = int(c(XsType.TRANSACTION_START, b"\0").payload[:-1])
    c(XsType.READ, b"name\0", tx)
    store.write(0, HOME + "/name", "renamed")
    assert tp(c(XsType.TRANSACTION_END, b"T\0", tx)) == err("EAGAIN")
    tx = int(c(XsType.TRANSACTION_START, b"\0").payload[:-1])
    c(XsType.WRITE, b"data/gone\0x", tx)
    assert tp(c(XsType.TRANSACTION_END, b"F\0", tx)) == (XsType.TRANSACTION_END, b"OK\0")
    assert not store.exists(HOME + "/data/gone")


def test_transaction_of_other_connection(store):
    a = Conn(store, DOMU)
    b = Conn(store, DOMU)
    tx = int(a(XsType.TRANSACTION_START, b"\0").payload[:-1])
    assert tp(b(XsType.READ, b"name\0", tx)) == err("ENOENT")
    assert tp(b(XsType.TRANSACTION_END, b"T\0", tx)) == err("ENOENT")


@pytest.mark.parametrize(
    "typ, payload",
    [
        (XsType.INTRODUCE, b"2\x00100\x005\0"),
        (XsType.RELEASE, b"2\0"),
        (XsType.IS_DOMAIN_INTRODUCED, b"2\0"),
        (XsType.RESUME, b"2\0"),
        (XsType.SET_TARGET, b"2\x003\0"),
        (XsType.CONTROL, b"help\0"),
    ],
)
def test_privileged_requests_refused_to_domu(store, typ, payload):
    c = Conn(store, DOMU)
    assert tp(c(typ, payload)) == err("EACCES")


def test_privileged_requests_from_dom0(store):
    c = Conn(store, 0)
    c(XsType.WATCH, b"@introduceDomain\0i\0")
    c(XsType.WATCH, b"@releaseDomain\0r\0")
    c.events.clear()
    assert tp(c(XsType.IS_DOMAIN_INTRODUCED, b"5\0")) == (XsType.IS_DOMAIN_INTRODUCED, b"F\0")
    assert tp(c(XsType.INTRODUCE, b"5\x0012345\x003\0")) == (XsType.INTRODUCE, b"OK\0")
    assert c.events == [("@introduceDomain", "i")]
    assert tp(c(XsType.IS_DOMAIN_INTRODUCED, b"5\0")) == (XsType.IS_DOMAIN_INTRODUCED, b"T\0")
    assert tp(c(XsType.RESUME, b"5\0")) == (XsType.RESUME, b"OK\0")
    assert tp(c(XsType.SET_TARGET, b"6\x005\0")) == (XsType.SET_TARGET, b"OK\0")
    assert tp(c(XsType.RELEASE, b"5\0")) == (XsType.RELEASE, b"OK\0")
    assert c.events[-1] == ("@releaseDomain", "r")
    assert tp(c(XsType.RELEASE, b"5\0")) == err("ENOENT")
    assert tp(c(XsType.INTRODUCE, b"5\0")) == err("EINVAL")
    assert c(XsType.CONTROL, b"help\0").type == XsType.CONTROL
    assert tp(c(XsType.CONTROL, b"print\0hello\0")) == (XsType.CONTROL, b"OK\0")
    assert tp(c(XsType.CONTROL, b"bogus\0")) == err("EINVAL")


@pytest.mark.parametrize("typ", [XsType.WATCH_EVENT, XsType.ERROR, XsType.RESTRICT, 23, 99, 0xFFFF, 0xFFFFFFFF])
def test_unknown_types_enosys(store, typ):
    c = Conn(store, DOMU)
    assert tp(c(typ, b"x\0")) == err("ENOSYS")


@pytest.mark.parametrize(
    "typ, payload",
    [
        (XsType.READ, b"name"),  # no NUL
        (XsType.READ, b""),
        (XsType.READ, b"name\0extra\0"),  # two strings
        (XsType.READ, b"na\0me"),
        (XsType.WRITE, b"no-nul-at-all"),
        (XsType.READ, b"\xff\xfe\0"),  # not ASCII
        (XsType.MKDIR, b"caf\xc3\xa9\0"),
        (XsType.RM, b"\0"),
        (XsType.GET_DOMAIN_PATH, b"99999999\0"),
        (XsType.TRANSACTION_END, b"T"),
    ],
)
def test_malformed_requests_einval(store, typ, payload):
    c = Conn(store, DOMU)
    assert tp(c(typ, payload)) == err("EINVAL")


def test_oversized_payload_closes(store):
    c = Conn(store, DOMU)
    msg = Message(XsType.WRITE, 1, 0, b"data/x\0" + b"v" * 4096)
    assert handle(store, c.id, DOMU, msg) is CLOSE
    ok = Message(XsType.WRITE, 1, 0, b"data/x\0" + b"v" * (4096 - 7))
    assert handle(store, c.id, 0, ok)[0].type == XsType.WRITE


def test_payload_quota_configurable():
    s = Store(payload_max=100)
    conn = s.connect(0, lambda p, t: None)
    assert handle(s, conn, 0, Message(XsType.WRITE, 1, 0, b"/a\0" + b"v" * 98)) is CLOSE
    assert handle(s, conn, 0, Message(XsType.WRITE, 1, 0, b"/a\0" + b"v" * 97))[0].payload == b"OK\0"
    assert handle(s, conn, 0, Message(XsType.READ, 2, 0, b"/a\0"))[0].payload == b"v" * 97
    setup = Setup(s, domid=0)
    setup.guest.send(struct.pack("<IIII", XsType.READ, 1, 0, 101))
    setup.ring.service()
    assert setup.ring.broken and setup.guest.get(R.OFF_ERROR) == R.XENSTORE_ERROR_PROTO


@settings(max_examples=400, deadline=None)
@given(
    typ=st.one_of(st.integers(0, 30), st.integers(0, 0xFFFFFFFF)),
    tx=st.sampled_from([0, 1, 2, 0xFFFFFFFF]),
    payload=st.one_of(
        st.binary(max_size=64),
        st.lists(st.sampled_from([b"data", b"name", b"/", b"@releaseDomain", b"r1", b"T", b"0", b"\xff", b"a/b"]),
                 max_size=4).map(lambda xs: b"\0".join(xs) + b"\0"),
    ),
    domid=st.sampled_from([0, DOMU]),
)
def test_handle_never_raises(typ, tx, payload, domid):
    s = Store()
    s.write(0, HOME + "/data", "")
    s.set_perms(0, HOME + "/data", [("n", DOMU)])
    conn = s.connect(domid, lambda p, t: None)
    s.transaction_start(domid, conn)
    replies = handle(s, conn, domid, Message(typ, 42, tx, payload))
    assert isinstance(replies, list) and len(replies) == 1
    r = replies[0]
    assert r.req_id == 42 and r.tx_id == tx
    assert r.type in (typ, XsType.ERROR)
    if r.type == XsType.ERROR:
        assert r.payload.endswith(b"\0") and r.payload[:-1].decode() in XSD_ERRORS
    assert len(r.payload) <= 4096


# ------------------------------------------------------------------- ring


class Guest:
    """The guest side of struct xenstore_domain_interface, with free-running
    indexes, on a bytearray page."""

    def __init__(self, page: bytearray, start: int = 0) -> None:
        self.page = page
        for off in (R.OFF_REQ_CONS, R.OFF_REQ_PROD, R.OFF_RSP_CONS, R.OFF_RSP_PROD):
            self.set(off, start)
        self.inbox = bytearray()

    @classmethod
    def on(cls, page: bytearray) -> "Guest":
        """The guest side of a page as it is (a restored page keeps its indexes)."""
        g = cls.__new__(cls)
        g.page = page
        g.inbox = bytearray()
        return g

    def get(self, off: int) -> int:
        return struct.unpack_from("<I", self.page, off)[0]

    def set(self, off: int, v: int) -> None:
        struct.pack_into("<I", self.page, off, v & 0xFFFFFFFF)

    def send(self, data: bytes) -> int:
        """Write as much as fits into the request ring; returns bytes written."""
        cons, prod = self.get(R.OFF_REQ_CONS), self.get(R.OFF_REQ_PROD)
        n = min(len(data), R.RING_SIZE - ((prod - cons) & 0xFFFFFFFF))
        for i in range(n):
            self.page[R.OFF_REQ + ((prod + i) & R.RING_MASK)] = data[i]
        self.set(R.OFF_REQ_PROD, prod + n)  # data first, then the index
        return n

    def recv(self) -> bytes:
        cons, prod = self.get(R.OFF_RSP_CONS), self.get(R.OFF_RSP_PROD)
        n = (prod - cons) & 0xFFFFFFFF
        assert n <= R.RING_SIZE
        out = bytes(self.page[R.OFF_RSP + ((cons + i) & R.RING_MASK)] for i in range(n))
        self.set(R.OFF_RSP_CONS, cons + n)
        self.inbox += out
        return out

    def messages(self) -> list[Message]:
        self.recv()
        out = []
        while len(self.inbox) >= 16:
            length = struct.unpack_from("<I", self.inbox, 12)[0]
            if len(self.inbox) < 16 + length:
                break
            out.append(Message.decode(bytes(self.inbox[: 16 + length])))
            del self.inbox[: 16 + length]
        return out


class Setup:
    """A guest's ring page and the RingConnection serving it. `page`: a page
    as it was (indexes kept), `state`: the connection's saved state."""

    def __init__(self, store: Store, start: int = 0, domid: int = DOMU, page: bytearray | None = None,
                 state: dict | None = None) -> None:
        self.store = store
        self.page = bytearray(4096) if page is None else page
        self.guest = Guest(self.page, start) if page is None else Guest.on(self.page)
        self.kicks = 0
        self.ring = RingConnection(memoryview(self.page), store, domid, self.kick, state=state)

    def kick(self) -> None:
        self.kicks += 1

    def request(self, typ: int, payload: bytes, req_id: int = 1, tx: int = 0) -> list[Message]:
        assert self.guest.send(Message(typ, req_id, tx, payload).encode())
        self.ring.service()
        return self.guest.messages()


def test_ring_features_advertised(store):
    s = Setup(store)
    assert s.guest.get(R.OFF_SERVER_FEATURES) == 3  # reconnection + error field
    assert s.guest.get(R.OFF_CONNECTION) == 0 and s.guest.get(R.OFF_ERROR) == 0
    assert s.ring.service() is False and s.kicks == 0


def test_ring_basic_round_trip(store):
    s = Setup(store)
    out = s.request(XsType.WRITE, b"data/k\0hello", req_id=5)
    assert [(m.type, m.req_id, m.payload) for m in out] == [(XsType.WRITE, 5, b"OK\0")]
    out = s.request(XsType.READ, b"data/k\0", req_id=6)
    assert [(m.type, m.req_id, m.payload) for m in out] == [(XsType.READ, 6, b"hello")]
    assert s.kicks == 2
    assert s.guest.get(R.OFF_REQ_CONS) == s.guest.get(R.OFF_REQ_PROD)


def test_ring_uses_guest_memory_in_place(store):
    s = Setup(store)
    s.guest.send(Message(XsType.READ, 1, 0, b"name\0").encode())
    s.ring.service()
    # The reply is in the very bytearray the guest owns.
    assert b"guest" in bytes(s.page[R.OFF_RSP : R.OFF_RSP + 64])


def test_ring_request_split_across_service_calls(store):
    s = Setup(store)
    raw = Message(XsType.WRITE, 9, 0, b"data/split\0value").encode()
    s.guest.send(raw[:10])  # half a header
    assert s.ring.service() is True  # consumed something
    assert s.guest.messages() == []
    s.guest.send(raw[10:20])  # rest of header, part of payload
    s.ring.service()
    assert s.guest.messages() == []
    s.guest.send(raw[20:])
    s.ring.service()
    assert [(m.type, m.req_id) for m in s.guest.messages()] == [(XsType.WRITE, 9)]
    assert store.read(0, HOME + "/data/split") == b"value"


def test_ring_several_requests_at_once(store):
    s = Setup(store)
    raw = b"".join(Message(XsType.WRITE, i, 0, f"data/n{i}\0{i}".encode()).encode() for i in range(10))
    assert s.guest.send(raw) == len(raw)
    s.ring.service()
    assert [m.req_id for m in s.guest.messages()] == list(range(10))
    assert store.directory(0, HOME + "/data") == [f"n{i}" for i in range(10)]


def test_ring_indexes_wrap_around_u32(store):
    s = Setup(store, start=0xFFFFFFF0)
    for i in range(40):
        out = s.request(XsType.WRITE, f"data/w{i}\0{'x' * 50}".encode(), req_id=i)
        assert [(m.type, m.req_id) for m in out] == [(XsType.WRITE, i)]
    assert s.guest.get(R.OFF_REQ_PROD) < 0x1000  # wrapped
    assert not s.ring.broken


def test_ring_request_larger_than_ring(store):
    """A 3000-byte WRITE needs several rounds of the 1024-byte ring."""
    s = Setup(store)
    raw = Message(XsType.WRITE, 3, 0, b"data/big\0" + b"z" * 1500).encode()
    sent = 0
    rounds = 0
    while sent < len(raw):
        sent += s.guest.send(raw[sent:])
        s.ring.service()
        rounds += 1
    assert rounds >= 2
    assert [(m.type, m.req_id) for m in s.guest.messages()] == [(XsType.WRITE, 3)]
    assert store.read(0, HOME + "/data/big") == b"z" * 1500


def test_ring_full_response_ring_keeps_backlog(store):
    store.write(0, HOME + "/data/v", b"q" * 900)
    s = Setup(store)
    raw = b"".join(Message(XsType.READ, i, 0, b"data/v\0").encode() for i in range(5))
    s.guest.send(raw)
    s.ring.service()
    # Only 1024 bytes fit; the rest waits.
    assert (s.guest.get(R.OFF_RSP_PROD) - s.guest.get(R.OFF_RSP_CONS)) & 0xFFFFFFFF == 1024
    assert s.ring.backlog == 5 * (16 + 900) - 1024
    got = []
    for _ in range(10):
        got += s.guest.messages()
        s.ring.service()
    got += s.guest.messages()
    assert [m.req_id for m in got] == list(range(5))
    assert all(m.payload == b"q" * 900 for m in got)
    assert s.ring.backlog == 0


def test_ring_stops_reading_when_replies_pile_up(store):
    s = Setup(store)
    store.write(0, HOME + "/data/v", b"q" * 200)
    raw = b"".join(Message(XsType.READ, i, 0, b"data/v\0").encode() for i in range(40))
    sent = s.guest.send(raw)
    for _ in range(3):
        s.ring.service()
    # The guest never reads: we hold at most MAX_OUTSTANDING replies.
    assert sum(1 for o in s.ring._out if not o.event) <= R.MAX_OUTSTANDING
    got = []
    for _ in range(200):
        got += s.guest.messages()
        if sent < len(raw):
            sent += s.guest.send(raw[sent:])
        s.ring.service()
    got += s.guest.messages()
    assert [m.req_id for m in got] == list(range(40))


def test_ring_watch_reply_then_event_and_async_events(store):
    s = Setup(store)
    out = s.request(XsType.WATCH, b"data\0tok\0", req_id=4)
    assert [(m.type, m.req_id, m.payload) for m in out] == [
        (XsType.WATCH, 4, b"OK\0"),
        (XsType.WATCH_EVENT, 0, b"data\0tok\0"),
    ]
    kicks = s.kicks
    # A change made by the host reaches the ring without a service() call.
    store.write(0, HOME + "/data/x", "1")
    assert s.kicks == kicks + 1
    assert [(m.type, m.payload) for m in s.guest.messages()] == [(XsType.WATCH_EVENT, b"data/x\0tok\0")]
    # A change by the guest itself: the event comes before the reply.
    out = s.request(XsType.WRITE, b"data/y\0v", req_id=8)
    assert [(m.type, m.req_id) for m in out] == [(XsType.WATCH_EVENT, 0), (XsType.WRITE, 8)]


def test_ring_duplicate_pending_events_dropped(store):
    store.write(0, HOME + "/data/v", b"q" * (1024 - 16))
    s = Setup(store)
    s.request(XsType.WATCH, b"data/x\0tok\0")
    s.guest.send(Message(XsType.READ, 1, 0, b"data/v\0").encode())
    s.ring.service()  # the READ reply fills the response ring exactly
    assert s.ring.backlog == 0
    for _ in range(5):
        store.write(0, HOME + "/data/x", "same")
    assert sum(1 for o in s.ring._out if o.event) == 1
    got = []
    for _ in range(5):
        got += s.guest.messages()
        s.ring.service()
    assert [m.type for m in got].count(XsType.WATCH_EVENT) == 1


def test_ring_runaway_request_index_breaks_connection(store):
    s = Setup(store)
    s.request(XsType.WATCH, b"data\0tok\0")
    s.guest.set(R.OFF_REQ_PROD, s.guest.get(R.OFF_REQ_CONS) + 2000)
    assert s.ring.service() is False
    assert s.ring.broken
    assert s.guest.get(R.OFF_ERROR) == R.XENSTORE_ERROR_RINGIDX
    assert store.watches(s.ring.conn_id) == []
    # Ignored from now on, without exceptions.
    s.guest.set(R.OFF_REQ_PROD, s.guest.get(R.OFF_REQ_CONS))
    s.guest.send(Message(XsType.READ, 1, 0, b"name\0").encode())
    assert s.ring.service() is False
    assert s.guest.messages() == []


def test_ring_runaway_response_index_breaks_connection(store):
    s = Setup(store)
    s.guest.set(R.OFF_RSP_CONS, 5000)
    s.guest.send(Message(XsType.READ, 1, 0, b"name\0").encode())
    s.ring.service()
    assert s.ring.broken and s.guest.get(R.OFF_ERROR) == R.XENSTORE_ERROR_RINGIDX


def test_ring_oversized_header_breaks_connection(store):
    s = Setup(store)
    s.guest.send(struct.pack("<IIII", XsType.WRITE, 1, 0, 4097) + b"data/x\0")
    s.ring.service()
    assert s.ring.broken and s.guest.get(R.OFF_ERROR) == R.XENSTORE_ERROR_PROTO
    assert s.guest.messages() == []


def test_ring_reconnect(store):
    s = Setup(store, start=1234)
    s.request(XsType.WATCH, b"data\0tok\0")
    tx_reply = s.request(XsType.TRANSACTION_START, b"\0")[0]
    tx = int(tx_reply.payload[:-1])
    # Half a request pending, and a reply the guest has not read.
    s.guest.send(Message(XsType.READ, 1, 0, b"name\0").encode())
    s.ring.service()
    s.guest.send(Message(XsType.WRITE, 2, 0, b"data/half\0v").encode()[:8])
    s.ring.service()
    kicks = s.kicks
    s.guest.set(R.OFF_CONNECTION, R.XENSTORE_RECONNECT)
    assert s.ring.service() is True
    assert s.kicks == kicks + 1
    assert s.guest.get(R.OFF_CONNECTION) == R.XENSTORE_CONNECTED
    for off in (R.OFF_REQ_CONS, R.OFF_REQ_PROD, R.OFF_RSP_CONS, R.OFF_RSP_PROD):
        assert s.guest.get(off) == 0
    assert store.watches(s.ring.conn_id) == []
    assert not store.has_transaction(DOMU, tx)
    # Works again from a clean state.
    s.guest.inbox.clear()
    out = s.request(XsType.READ, b"name\0", req_id=77)
    assert [(m.req_id, m.payload) for m in out] == [(77, b"guest")]


def test_ring_reconnect_revives_broken_connection(store):
    s = Setup(store)
    s.guest.set(R.OFF_REQ_PROD, 3000)
    s.ring.service()
    assert s.ring.broken
    s.guest.set(R.OFF_CONNECTION, R.XENSTORE_RECONNECT)
    s.ring.service()
    assert not s.ring.broken and s.guest.get(R.OFF_ERROR) == 0
    assert [m.payload for m in s.request(XsType.READ, b"name\0")] == [b"guest"]


def test_ring_transactions_and_errors_through_ring(store):
    s = Setup(store)
    tx = int(s.request(XsType.TRANSACTION_START, b"\0")[0].payload[:-1])
    assert s.request(XsType.WRITE, b"data/t\0x", tx=tx)[0].payload == b"OK\0"
    out = s.request(XsType.TRANSACTION_END, b"T\0", tx=tx)
    assert (out[0].type, out[0].tx_id, out[0].payload) == (XsType.TRANSACTION_END, tx, b"OK\0")
    out = s.request(XsType.READ, b"/tool\0")
    assert (out[0].type, out[0].payload) == (XsType.ERROR, b"EACCES\0")


def test_ring_close(store):
    s = Setup(store)
    s.request(XsType.WATCH, b"data\0tok\0")
    s.ring.close()
    store.write(0, HOME + "/data/x", "1")
    assert s.ring.service() is False


def test_ring_rejects_bad_pages(store):
    with pytest.raises(ValueError):
        RingConnection(bytes(4096), store, DOMU, lambda: None)
    with pytest.raises(ValueError):
        RingConnection(bytearray(100), store, DOMU, lambda: None)


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=12),
    start=st.sampled_from([0, 1000, 0xFFFFFF00]),
    valid_prefix=st.booleans(),
)
def test_ring_garbage_never_raises(chunks, start, valid_prefix):
    s = Store()
    setup = Setup(s, start=start)
    if valid_prefix:
        setup.guest.send(Message(XsType.WATCH, 1, 0, b"/\0t\0").encode())
    for chunk in chunks:
        setup.guest.send(chunk)
        setup.ring.service()
        setup.guest.messages()
    err_code = setup.guest.get(R.OFF_ERROR)
    assert err_code in (0, R.XENSTORE_ERROR_PROTO)
    assert setup.ring.broken == (err_code != 0)


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_ring_any_split_gives_same_replies(cuts):
    s = Store()
    s.write(0, HOME + "/data", "")
    s.set_perms(0, HOME + "/data", [("n", DOMU)])
    setup = Setup(s)
    raw = b"".join(Message(XsType.WRITE, i, 0, f"data/k{i}\0v{i}".encode()).encode() for i in range(6))
    raw += Message(XsType.DIRECTORY, 99, 0, b"data\0").encode()
    pos = 0
    got: list[Message] = []
    i = 0
    while pos < len(raw):
        n = cuts[i % len(cuts)]
        i += 1
        pos += setup.guest.send(raw[pos : pos + n])
        setup.ring.service()
        got += setup.guest.messages()
    setup.ring.service()
    got += setup.guest.messages()
    assert [m.req_id for m in got] == list(range(6)) + [99]
    assert got[-1].payload == b"".join(f"k{i}\0".encode() for i in range(6))
