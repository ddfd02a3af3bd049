"""Fuzzing xenstore: random and mutated messages on a guest's ring (the
guest side of struct xenstore_domain_interface, driven on a page as a hostile
guest would: lengths that lie, indexes that run away, reconnects) and on the
host socket (many connections, disconnects mid-message, clients that never
read), against one Store (domU 1 on the ring, dom0 tools on the socket).

Messages: paths huge, deep, relative, special, malformed; permission strings
odd; payloads without NUL; transactions left open; watch storms; quota
exhaustion. After every batch: no exception or logged traceback, every
error reply an errno name of xs_wire.h (EIO only comes from a failed
handler: a finding), the store answers a valid read on both transports, the
tree is whole (no orphan, every child present, node ownership counted right),
no transaction or connection outlives its client, buffers bounded.

    python -m fuzz.xenstore --seed 1 --duration 300 --out fuzz-findings/xenstore
"""

from __future__ import annotations

import random
import socket
import struct
import tempfile
from pathlib import Path
from typing import Optional

from pvhvm.runloop import SelectorLoop
from pvhvm.xenstore import RingConnection, Store, XenstoreSocketServer
from pvhvm.xenstore import ring as R
from pvhvm.xenstore import socket as xs_socket
from pvhvm.xenstore.domu import populate_domu
from pvhvm.xenstore.store import DEFAULT_QUOTA_TRANSACTIONS, DEFAULT_QUOTA_WATCHES, XSD_ERRORS, parent_of
from pvhvm.xenstore.wire import HEADER, XsType

from .iocampaign import CaseResult, TracebackLog, case_runners, exception_detail, main

DOMID = 1
HOME = f"/local/domain/{DOMID}"
BATCH = 40  # operations between property checks
OPS_PER_CASE = 400
MAX_CLIENTS = 48
ERRNOS = frozenset(XSD_ERRORS) - {"EIO"}  # EIO is what handle() answers when it failed inside
_OUT_BOUND = xs_socket.OUT_HIGH_WATER + xs_socket.MAX_EVENT_BACKLOG + 16 * 4112
_RING_BOUND = R.MAX_OUTSTANDING * 4112 + R.MAX_EVENT_BACKLOG + 4112


class _Loop(SelectorLoop):
    """What XenstoreSocketServer.attach wants of a run loop; `xenstore` is
    the guest's ring, serviced when host clients change the store."""

    def __init__(self) -> None:
        super().__init__()
        self.services: list = []
        self.xenstore: Optional[RingConnection] = None

    def add_service(self, fn) -> None:
        self.services.append(fn)


class _Stream:
    """Replies read off a transport, split into messages and checked."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.messages = 0
        # The guest moved its own indexes: what it reads is not a stream of
        # replies any more until it reconnects (its own doing, not ours).
        self.desynced = False

    def reset(self) -> None:
        self.buf.clear()
        self.desynced = False

    def feed(self, data: bytes, where: str, result: CaseResult) -> list[tuple[int, bytes]]:
        if self.desynced:
            return []
        self.buf += data
        out = []
        while len(self.buf) >= 16:
            typ, _req, _tx, length = HEADER.unpack_from(self.buf)
            if length > 4096:
                result.find("invariant", f"{where}: a reply announces {length} payload bytes")
                self.buf.clear()
                break
            if len(self.buf) < 16 + length:
                break
            payload = bytes(self.buf[16 : 16 + length])
            del self.buf[: 16 + length]
            self.messages += 1
            if typ == XsType.ERROR:
                name = payload[:-1].decode("ascii", "replace")
                if not payload.endswith(b"\0") or name not in ERRNOS:
                    result.find("errno", f"{where}: error reply {payload[:40]!r}")
            out.append((typ, payload))
        return out


class _Guest:
    """The guest's side of the ring page, free-running u32 indexes."""

    def __init__(self, page: bytearray) -> None:
        self.page = page
        self.stream = _Stream()

    def get(self, off: int) -> int:
        return struct.unpack_from("<I", self.page, off)[0]

    def set(self, off: int, v: int) -> None:
        struct.pack_into("<I", self.page, off, v & 0xFFFFFFFF)

    def send(self, data: bytes) -> int:
        cons, prod = self.get(R.OFF_REQ_CONS), self.get(R.OFF_REQ_PROD)
        room = R.RING_SIZE - ((prod - cons) & 0xFFFFFFFF)
        n = max(0, min(len(data), room))
        for i in range(n):
            self.page[R.OFF_REQ + ((prod + i) & R.RING_MASK)] = data[i]
        self.set(R.OFF_REQ_PROD, prod + n)
        return n

    def recv(self) -> bytes:
        cons, prod = self.get(R.OFF_RSP_CONS), self.get(R.OFF_RSP_PROD)
        n = min((prod - cons) & 0xFFFFFFFF, R.RING_SIZE)  # a broken ring: take what is there
        out = bytes(self.page[R.OFF_RSP + ((cons + i) & R.RING_MASK)] for i in range(n))
        self.set(R.OFF_RSP_CONS, cons + n)
        return out


# ---------------------------------------------------------------- generation

_SEGMENTS = ["a", "b", "data", "device", "vif", "0", "1", "name", "control", "memory", "target", "x-y_z", "@",
             "ü", " ", ".", "..", "*", "backend", "console", "tool", "local", "domain"]
_SPECIAL = ["@releaseDomain", "@introduceDomain", "@", "@x", "@releaseDomain/x"]


def _path(rng: random.Random) -> bytes:
    k = rng.random()
    if k < 0.08:
        return rng.choice(_SPECIAL).encode()
    if k < 0.12:  # huge: around the path limits
        n = rng.choice([2047, 2048, 2049, 3071, 3072, 3073, 4000])
        seg = rng.choice(["a", "ab/", "x/"])
        return ("/" + (seg * n))[: n].encode()
    if k < 0.16:  # deep
        return ("/".join(["d"] * rng.randint(50, 1100))).encode()
    if k < 0.20:
        return rng.choice([b"", b"/", b"//", b"/a//b", b"a/", b"/\xff", b"data/\x01", b"/local/domain/1/",
                           b"/local/domain/65535", b"/local/domain/01/data", b"domain/../1"])
    depth = rng.randint(1, 5)
    parts = [rng.choice(_SEGMENTS) for _ in range(depth)]
    if rng.random() < 0.5:
        base = rng.choice(["data", "device", "control", "memory", "name", "console", "error"])
        return (base + "/" + "/".join(parts)).encode()
    prefix = rng.choice(["", HOME, "/local/domain/0", "/local/domain/2", "/tool", "/vm", "/libxl/1"])
    return (prefix + "/" + "/".join(parts)).encode()


def _perm(rng: random.Random) -> bytes:
    if rng.random() < 0.7:
        return (rng.choice("nrbw") + str(rng.choice([0, 1, 2, 0x7FF5, 65535, 65536]))).encode()
    return rng.choice([b"", b"n", b"x1", b"r-1", b"b99999999999999999999", b"n0x", b"\xff1", b"r 1", b"b1\n"])


def _payload(rng: random.Random, typ: int, txs: list[int]) -> bytes:
    nul = b"\0"
    if typ == XsType.WRITE:
        value = rng.choice([b"", b"1", b"v" * rng.randint(0, 4090), bytes(rng.getrandbits(8) for _ in range(8))])
        return _path(rng) + nul + value
    if typ == XsType.SET_PERMS:
        perms = [_perm(rng) for _ in range(rng.choice([0, 1, 2, 3, 6, 40]))]
        return _path(rng) + nul + b"".join(p + nul for p in perms)
    if typ in (XsType.WATCH, XsType.UNWATCH):
        token = rng.choice([b"t", b"tok", b"", b"\xfe\xff", b"x" * rng.randint(1, 4000)])
        return _path(rng) + nul + token + nul
    if typ == XsType.TRANSACTION_END:
        return rng.choice([b"T\0", b"F\0", b"T\0", b"X\0", b"T", b""])
    if typ == XsType.DIRECTORY_PART:
        return _path(rng) + nul + rng.choice([b"0", b"5", b"-1", b"4294967295", b"99999999999", b"x"]) + nul
    if typ in (XsType.GET_DOMAIN_PATH, XsType.RELEASE, XsType.IS_DOMAIN_INTRODUCED, XsType.RESUME):
        return rng.choice([b"1", b"0", b"2", b"65535", b"65536", b"-1", b"", b"x"]) + nul
    if typ == XsType.INTRODUCE:
        return rng.choice([b"1", b"2", b"0", b"9"]) + nul + b"1234" + nul + b"5" + nul
    if typ == XsType.SET_TARGET:
        return rng.choice([b"1", b"2"]) + nul + rng.choice([b"0", b"1", b"3"]) + nul
    if typ == XsType.CONTROL:
        return rng.choice([b"help\0", b"print\0hi\0", b"print\0", b"bogus\0", b""])
    if typ == XsType.TRANSACTION_START or typ == XsType.RESET_WATCHES:
        return b"\0"
    return _path(rng) + nul


_TYPES = ([XsType.READ, XsType.WRITE, XsType.WRITE, XsType.MKDIR, XsType.RM, XsType.DIRECTORY, XsType.DIRECTORY_PART,
           XsType.GET_PERMS, XsType.SET_PERMS, XsType.WATCH, XsType.WATCH, XsType.UNWATCH, XsType.TRANSACTION_START,
           XsType.TRANSACTION_END, XsType.GET_DOMAIN_PATH, XsType.RESET_WATCHES, XsType.INTRODUCE, XsType.RELEASE,
           XsType.IS_DOMAIN_INTRODUCED, XsType.RESUME, XsType.SET_TARGET, XsType.CONTROL])


def _message(rng: random.Random, txs: list[int]) -> bytes:
    """One request, maybe mutated: its bytes as sent."""
    k = rng.random()
    typ = int(rng.choice(_TYPES)) if k < 0.95 else rng.choice([15, 16, 20, 23, 255, 0xFFFFFFFF])
    tx = 0
    if txs and rng.random() < 0.4:
        tx = rng.choice(txs)
    elif rng.random() < 0.03:
        tx = rng.choice([1, 2, 0xFFFFFFFF])
    payload = _payload(rng, typ, txs)
    m = rng.random()
    if m < 0.05:
        payload = payload.rstrip(b"\0")  # no NUL
    elif m < 0.08:
        payload = payload[: rng.randint(0, len(payload))]
    elif m < 0.10 and payload:
        i = rng.randrange(len(payload))
        payload = payload[:i] + bytes([rng.getrandbits(8)]) + payload[i + 1 :]
    payload = payload[:4096]
    length = len(payload)
    lie = rng.random()
    if lie < 0.02:
        length = rng.choice([length + 1, length + 100, 4097, 0xFFFFFFFF, 8192])
    elif lie < 0.04 and length:
        length = rng.randint(0, length - 1)  # the rest reads as the next header
    return HEADER.pack(typ, rng.getrandbits(32), tx, length) + payload


# ------------------------------------------------------------------ the world


class World:
    """A Store with domU 1's tree, the domU's ring and the dom0 socket."""

    def __init__(self, sockdir: Path, result: CaseResult) -> None:
        self.result = result
        self.store = Store()
        populate_domu(self.store, DOMID, "fuzz", "00000000-0000-0000-0000-000000000001", 65536, 1, 10, 2,
                      store_ring_ref=11, store_port=1)
        self.page = bytearray(4096)
        self.guest = _Guest(self.page)
        self.kicks = 0
        self.ring = RingConnection(memoryview(self.page), self.store, DOMID, self._kick)
        self.ring_txs: list[int] = []
        self.loop = _Loop()
        self.loop.xenstore = self.ring
        self.path = sockdir / "xs"
        self.server = XenstoreSocketServer(self.store, self.path)
        self.server.attach(self.loop)
        self.clients: list[Optional[socket.socket]] = []
        self.streams: list[_Stream] = []
        self.client_txs: list[list[int]] = []

    def _kick(self) -> None:
        self.kicks += 1

    def close(self) -> None:
        for c in self.clients:
            if c is not None:
                c.close()
        self.server.close()
        self.loop.close()

    def pump(self) -> None:
        for _ in range(64):
            if not self.loop.poll(0):
                break
        for fn in self.loop.services:
            fn()
        self.ring.service()

    # ------------------------------------------------------------------ ops

    def do(self, op: list) -> None:
        name = op[0]
        if name == "ring_send":
            self.guest.send(bytes.fromhex(op[1]))
            self.ring.service()
        elif name == "ring_drain":
            self._ring_drain()
        elif name == "ring_index":
            self.guest.set(op[1], op[2])
            self.guest.stream.desynced = True
            self.ring.service()
        elif name == "ring_reconnect":
            self.guest.set(R.OFF_CONNECTION, R.XENSTORE_RECONNECT)
            self.ring.service()
            self.guest.stream.reset()
            self.ring_txs.clear()
        elif name == "sock_open":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(self.path))
            s.setblocking(False)
            self.clients.append(s)
            self.streams.append(_Stream())
            self.client_txs.append([])
        elif name == "sock_send":
            s = self.clients[op[1]]
            if s is not None:
                try:
                    s.send(bytes.fromhex(op[2]))
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    pass  # a full socket or a client the server dropped
        elif name == "sock_drain":
            self._sock_drain(op[1])
        elif name == "sock_close":
            s = self.clients[op[1]]
            if s is not None:
                s.close()
                self.clients[op[1]] = None
        else:
            raise ValueError(f"unknown op {name!r}")
        self.pump()

    def _ring_drain(self) -> list[tuple[int, bytes]]:
        replies = self.guest.stream.feed(self.guest.recv(), "ring", self.result)
        self.ring.service()
        for typ, payload in replies:
            if typ == XsType.TRANSACTION_START and payload[:-1].isdigit():
                self.ring_txs.append(int(payload[:-1]))
        return replies

    def _sock_drain(self, i: int) -> list[tuple[int, bytes]]:
        s = self.clients[i]
        replies: list[tuple[int, bytes]] = []
        while s is not None:
            try:
                data = s.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                break
            replies += self.streams[i].feed(data, f"socket client {i}", self.result)
            self.pump()
        for typ, payload in replies:
            if typ == XsType.TRANSACTION_START and payload[:-1].isdigit():
                self.client_txs[i].append(int(payload[:-1]))
        return replies

    # ----------------------------------------------------------- properties

    def check(self) -> None:
        self._check_tree()
        self._check_connections()
        self._check_answers()

    def _check_tree(self) -> None:
        nodes = self.store._tree.nodes
        owned: dict[int, int] = {}
        for path, node in nodes.items():
            owned[node.owner] = owned.get(node.owner, 0) + 1
            if path != "/":
                parent = nodes.get(parent_of(path))
                if parent is None:
                    self.result.find("invariant", f"orphan node (no parent): depth {path.count('/')}")
                elif path.rsplit("/", 1)[1] not in parent.children:
                    self.result.find("invariant", "node missing from its parent's children")
            for child in node.children:
                if (path.rstrip("/") + "/" + child) not in nodes:
                    self.result.find("invariant", "a listed child does not exist")
        counted = {d: n for d, n in self.store._tree.owned.items() if n}
        if counted != owned:
            self.result.find("invariant", f"node ownership miscounted: {counted} != {owned}")

    def _check_connections(self) -> None:
        store, server = self.store, self.server
        live = set(server.connections) | {self.ring.conn_id}
        for conn_id in store._conns:
            if conn_id not in live:
                self.result.find("invariant", "a connection outlives its client")
        per_conn: dict[Optional[int], int] = {}
        for t in store._txs.values():
            if t.conn_id is not None and t.conn_id not in live:
                self.result.find("invariant", "a transaction outlives its connection")
            per_conn[t.conn_id] = per_conn.get(t.conn_id, 0) + 1
        for conn_id, n in per_conn.items():
            if n > DEFAULT_QUOTA_TRANSACTIONS:
                who = "the guest's ring" if conn_id == self.ring.conn_id else "a host socket connection"
                self.result.find("invariant", f"{who} holds more than {DEFAULT_QUOTA_TRANSACTIONS} transactions")
        ring_conn = store._conns.get(self.ring.conn_id)
        if ring_conn is not None and len(ring_conn.watches) > DEFAULT_QUOTA_WATCHES:
            self.result.find("invariant", "the guest holds more watches than its quota")
        if self.ring.backlog > _RING_BOUND:
            self.result.find("memory", f"ring backlog {self.ring.backlog} bytes")
        for c in server._clients.values():
            if len(c.out) > _OUT_BOUND or len(c.inbuf) > 16 + 4096 + xs_socket.RECV_SIZE:
                self.result.find("memory", f"socket client buffers {len(c.inbuf)} in, {len(c.out)} out")

    def _check_answers(self) -> None:
        # The guest: a reconnect (as a guest that lost track would ask),
        # then a request whose answer does not depend on the tree.
        self.guest.set(R.OFF_CONNECTION, R.XENSTORE_RECONNECT)
        self.ring.service()
        self.guest.stream.reset()
        self.ring_txs.clear()
        if self.guest.get(R.OFF_CONNECTION) != R.XENSTORE_CONNECTED:
            self.result.find("unanswered", "the ring did not take the reconnect")
            return
        self.guest.send(HEADER.pack(XsType.GET_DOMAIN_PATH, 7, 0, 2) + b"1\0")
        self.ring.service()
        replies = self._ring_drain()
        if (XsType.GET_DOMAIN_PATH, HOME.encode() + b"\0") not in replies:
            self.result.find("unanswered", f"the ring did not answer GET_DOMAIN_PATH: {replies[:2]}")
        # A new host client: write, read back, remove.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.path))
            s.setblocking(False)
            stream = _Stream()
            got: list[tuple[int, bytes]] = []
            for typ, payload in ((XsType.WRITE, b"/fuzz-probe\0ok"), (XsType.READ, b"/fuzz-probe\0"),
                                 (XsType.RM, b"/fuzz-probe\0")):
                s.send(HEADER.pack(typ, 1, 0, len(payload)) + payload)
                for _ in range(4):
                    self.pump()
                    try:
                        got += stream.feed(s.recv(1 << 16), "probe client", self.result)
                    except BlockingIOError:
                        continue
                    break
            if got != [(XsType.WRITE, b"OK\0"), (XsType.READ, b"ok"), (XsType.RM, b"OK\0")]:
                self.result.find("unanswered", f"a new socket client was not answered right: {got[:3]}")
        except OSError as e:
            self.result.find("unanswered", f"a new socket client failed: {e}")
        finally:
            s.close()
            self.pump()


def _req(typ: int, payload: bytes, tx: int = 0, req_id: int = 0) -> str:
    return (HEADER.pack(typ, req_id, tx, len(payload)) + payload).hex()


def _scenario(rng: random.Random, world: World) -> list[list]:
    """A few ops that together attack one limit."""
    live = [i for i, c in enumerate(world.clients) if c is not None]
    k = rng.randrange(5)
    if k == 0:  # a chain as deep as the path limit allows, then its removal
        if live and rng.random() < 0.5:
            i = rng.choice(live)
            n = rng.choice([900, 1000, 1500])
            return [["sock_send", i, _req(XsType.WRITE, b"/deep/" + b"/".join([b"d"] * n) + b"\0x")],
                    ["sock_send", i, _req(XsType.RM, b"/deep\0")], ["sock_drain", i]]
        n = rng.choice([500, 975, 1015])
        return [["ring_send", _req(XsType.WRITE, b"data/" + b"/".join([b"d"] * n) + b"\0x")], ["ring_drain"],
                ["ring_send", _req(XsType.RM, b"data/d\0")], ["ring_drain"]]
    if k == 1:  # transactions started and never ended
        if live and rng.random() < 0.5:
            i = rng.choice(live)
            return [["sock_send", i, _req(XsType.TRANSACTION_START, b"\0")] for _ in range(15)] + [["sock_drain", i]]
        return [x for _ in range(15) for x in (["ring_send", _req(XsType.TRANSACTION_START, b"\0")], ["ring_drain"])]
    if k == 2 and live:  # a watch storm
        i = rng.choice(live)
        ops = [["sock_send", i, _req(XsType.WATCH, b"/\0t%d\0" % j)] for j in range(40)]
        ops += [["ring_send", _req(XsType.WATCH, b"/local\0w%d\0" % j)] for j in range(10)]
        ops += [x for j in range(30) for x in (["ring_send", _req(XsType.WRITE, b"data/s%d\0v" % j)], ["ring_drain"])]
        return ops + [["sock_drain", i]]
    if k == 3:  # the node quota
        ops = []
        for j in range(0, 1100, 10):
            ops.append(["ring_send", _req(XsType.MKDIR, b"data/q%d\0" % j)])
            ops.append(["ring_drain"])
        return ops
    if live:  # the domain released and introduced again by a host tool
        i = rng.choice(live)
        return [["sock_send", i, _req(XsType.RELEASE, b"1\0")],
                ["sock_send", i, _req(XsType.INTRODUCE, b"1\0" + b"11\0" + b"1\0")], ["sock_drain", i]]
    return [["sock_open"]]


def _generate(rng: random.Random, world: World) -> list:
    k = rng.random()
    if k < 0.40:
        return ["ring_send", _message(rng, world.ring_txs).hex()]
    if k < 0.50:
        return ["ring_drain"]
    if k < 0.53:
        off = rng.choice([R.OFF_REQ_CONS, R.OFF_REQ_PROD, R.OFF_RSP_CONS, R.OFF_RSP_PROD, R.OFF_CONNECTION,
                          R.OFF_ERROR, R.OFF_SERVER_FEATURES])
        return ["ring_index", off, rng.choice([0, 1, 1023, 1024, 1025, 2048, 0x7FFFFFFF, 0xFFFFFFFF,
                                               rng.getrandbits(32), world.guest.get(off) + rng.randint(-2, 2)])]
    if k < 0.55:
        return ["ring_reconnect"]
    live = [i for i, c in enumerate(world.clients) if c is not None]
    if k < 0.60 or not live:
        if len(world.clients) < MAX_CLIENTS:
            return ["sock_open"]
        return ["ring_drain"]
    i = rng.choice(live)
    if k < 0.88:
        data = _message(rng, world.client_txs[i])
        if rng.random() < 0.05:
            data = data[: rng.randint(1, len(data))]  # part of a message: maybe closed next
        return ["sock_send", i, data.hex()]
    if k < 0.97:
        return ["sock_drain", i]
    return ["sock_close", i]


def _run(seed: int, ops: Optional[list]) -> CaseResult:
    result = CaseResult(seed)
    rng = random.Random(seed)
    todo = list(ops) if ops is not None else None
    with tempfile.TemporaryDirectory(prefix="pvhvm-xsfuzz-") as d, TracebackLog() as tracebacks:
        world = World(Path(d), result)
        queued: list = []
        try:
            n = 0
            while True:
                if todo is not None:
                    if not todo:
                        break
                    op = todo.pop(0)
                else:
                    if n >= OPS_PER_CASE:
                        break
                    if not queued:
                        queued = _scenario(rng, world) if rng.random() < 0.01 else [_generate(rng, world)]
                    op = queued.pop(0)
                result.ops.append(op)
                n += 1
                if op[0] in ("ring_send", "sock_send"):
                    result.messages += 1
                try:
                    if op[0] == "check":
                        world.check()
                    else:
                        world.do(op)
                        if todo is None and n % BATCH == 0:
                            result.ops.append(["check"])
                            world.check()
                except Exception as e:  # noqa: BLE001 - the finding
                    result.find("exception", exception_detail(e))
                    break
                for t in tracebacks.records:
                    result.find("traceback", t)
                tracebacks.records.clear()
                if result.findings:
                    break
            if not result.findings and ops is None:
                result.ops.append(["check"])
                world.check()
        except Exception as e:  # noqa: BLE001
            result.find("exception", exception_detail(e))
        finally:
            world.close()
    return result


run_case, replay_case = case_runners(_run)


if __name__ == "__main__":
    raise SystemExit(main("xenstore", run_case, replay_case))
