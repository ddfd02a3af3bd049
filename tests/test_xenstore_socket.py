"""The host side of xenstore (xenstore/socket.py): a Unix socket speaking the
wire protocol, served by a running domain's loop, against unmodified dom0
clients — Debian's xenstore-utils (libxenstore) and pyxs — and hostile ones.

The domain is a real pvhvm.Domain whose guest does `sti; hlt; jmp` forever:
it idles with no timer, so the run loop sleeps in its selector and is woken
only by the socket (and by the test's ticker, which lets run_until look at
its condition). Clients run in subprocesses or threads; the store is only
touched on the main thread, which runs the loop."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

import pvhvm
from conftest import PVH_NOTE, make_elf64
from pvhvm.errors import PvhvmError
from pvhvm.xenstore import XenstoreSocketError, XenstoreSocketServer, XsType
from pvhvm.xenstore import socket as xs_socket
from pvhvm.xenstore.wire import HEADER

DOMID = 1
HOME = f"/local/domain/{DOMID}"
ENTRY = 0x100000
IDLE_CODE = b"\xfb\xf4\xeb\xfd"  # sti; hlt; jmp hlt

XS_TOOLS = ["xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-list", "xenstore-rm", "xenstore-watch",
            "xenstore-chmod", "xenstore-exists"]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def idle_kernel(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("idle") / "idle.elf"
    path.write_bytes(make_elf64([(ENTRY, IDLE_CODE)], [(PVH_NOTE, ENTRY.to_bytes(4, "little"))]))
    return path


@pytest.fixture
def sockdir():
    # Short: AF_UNIX paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="pvhvm-xs-") as d:
        yield Path(d)


@pytest.fixture
def dom(idle_kernel):
    return pvhvm.Domain(idle_kernel, memory_mib=16, domid=DOMID, name="xs-socket-test")


@pytest.fixture
def server(dom, sockdir):
    srv = XenstoreSocketServer(dom.store, sockdir / "socket")
    srv.attach(dom)
    yield srv
    srv.close()
    assert dom.outcome is None, f"the idle guest ended: {dom.outcome}"


@pytest.fixture(scope="module")
def xs_tools() -> None:
    missing = [t for t in XS_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: install Debian's xenstore-utils "
                    "(apt-get install -y xenstore-utils; scripts/setup should)")


@pytest.fixture(scope="module")
def pyxs():
    try:
        import pyxs
    except ImportError:
        pytest.fail("pyxs is not installed: .venv/bin/pip install pyxs")
    return pyxs


def drive(dom: pvhvm.Domain, fn: Callable[[], object], timeout: float = 20.0):
    """Run `fn` (the client side) in a thread while this thread runs the
    domain's loop; return what `fn` returned or raise what it raised.

    A ticker wakes the loop every 50 ms so that run_until looks at its
    condition: the loop serves the sources it finds ready right after a
    guest exit and then goes back to sleep without checking it."""
    box: dict[str, object] = {}
    stop = threading.Event()

    def work() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            box["error"] = e
        finally:
            box["done"] = True
            dom.wake()

    def ticker() -> None:
        end = time.monotonic() + timeout
        while not stop.wait(0.05):
            if time.monotonic() > end:
                box["expired"] = True
            dom.wake()

    threads = [threading.Thread(target=work, daemon=True), threading.Thread(target=ticker, daemon=True)]
    for t in threads:
        t.start()
    try:
        dom.run_until(lambda: "done" in box or "expired" in box, timeout=timeout + 5)
    finally:
        stop.set()
        # Let them end here: the last reference to the domain must not be
        # dropped on another thread (the core's Vm belongs to this one).
        for t in threads:
            t.join(timeout=5)
    assert dom.outcome is None, f"the domain ended: {dom.outcome}"
    if "done" not in box:
        pytest.fail(f"the client did not finish within {timeout} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("result")


def loop_until(dom: pvhvm.Domain, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Run the loop until `cond()` (evaluated on this thread) holds."""
    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(0.02):
            dom.wake()

    threading.Thread(target=ticker, daemon=True).start()
    try:
        ok = dom.run_until(cond, timeout=timeout)
    finally:
        stop.set()
    assert ok, f"condition not met within {timeout} s (outcome {dom.outcome})"


def readable_within(fileobj, timeout: float) -> bool:
    import select

    return bool(select.select([fileobj], [], [], timeout)[0])


def tool_env(path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XENSTORED_PATH", "XENSTORED_RUNDIR")}
    env["XENSTORED_PATH"] = str(path)
    env.update(extra)
    return env


def xs(dom, server, *argv: str, check: bool = True, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run a xenstore-utils tool against the server; the loop runs meanwhile."""

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=env or tool_env(server.path), capture_output=True, text=True,
                              timeout=15)

    r = drive(dom, run)
    if check:
        assert r.returncode == 0, f"{' '.join(argv)}: status {r.returncode}: {r.stderr.strip()}"
    return r


class Raw:
    """A hand-written client: raw wire messages over the socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.req = 100
        self.buf = b""

    def send(self, typ: int, payload: bytes, tx: int = 0, req: Optional[int] = None) -> int:
        if req is None:
            self.req += 1
            req = self.req
        self.sock.sendall(HEADER.pack(typ, req, tx, len(payload)) + payload)
        return req

    def recv(self) -> tuple[int, int, int, bytes]:
        """(type, req_id, tx_id, payload) of the next message."""
        while True:
            if len(self.buf) >= 16:
                typ, req, tx, n = HEADER.unpack_from(self.buf)
                if len(self.buf) >= 16 + n:
                    payload, self.buf = self.buf[16 : 16 + n], self.buf[16 + n :]
                    return typ, req, tx, payload
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.buf += data

    def call(self, typ: int, payload: bytes, tx: int = 0) -> tuple[int, bytes]:
        req = self.send(typ, payload, tx)
        rtyp, rreq, rtx, rpayload = self.recv()
        assert (rreq, rtx) == (req, tx)
        return rtyp, rpayload

    def closed_by_server(self) -> bool:
        """Whether the server hung up (after anything it still sent)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def read_ok(path: Path, node: str = f"{HOME}/name") -> bytes:
    """A fresh client can still read (the server still serves)."""
    c = Raw(path)
    try:
        typ, payload = c.call(XsType.READ, node.encode() + b"\0")
        assert typ == XsType.READ, payload
        return payload
    finally:
        c.close()


def store_subtree(store, top: str) -> dict[str, bytes]:
    return {p: store.read(0, p) for p in store.paths() if p == top or p.startswith(top + "/")}


# ---------------------------------------------------------- the socket file


def test_socket_file_is_0600_and_close_removes_it(dom, sockdir):
    path = sockdir / "xs.sock"
    srv = XenstoreSocketServer(dom.store, path)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    early = Raw(path)  # connected before attach(): waits in the backlog
    srv.attach(dom)
    assert drive(dom, lambda: early.call(XsType.READ, f"{HOME}/name\0".encode())) == (XsType.READ, b"xs-socket-test")
    early.close()
    srv.close()
    assert not path.exists()
    srv.close()  # idempotent


def test_socket_is_0600_even_with_a_permissive_umask(dom, sockdir):
    old = os.umask(0)
    try:
        srv = XenstoreSocketServer(dom.store, sockdir / "s")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(sockdir / "s").st_mode) == 0o600
    srv.close()


def test_stale_socket_is_replaced(dom, sockdir):
    path = sockdir / "socket"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays: a socket nobody listens on
    srv = XenstoreSocketServer(dom.store, path)
    srv.attach(dom)
    assert drive(dom, lambda: read_ok(path)) == b"xs-socket-test"
    srv.close()


@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "live-socket"])
def test_refuses_a_path_that_is_not_a_stale_socket(dom, sockdir, kind):
    path = sockdir / "socket"
    live = None
    if kind == "file":
        path.write_text("precious")
    elif kind == "dir":
        path.mkdir()
    elif kind == "symlink":
        path.symlink_to(sockdir / "elsewhere")
    else:
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        live.bind(str(path))
        live.listen(1)
    before = os.lstat(path)
    with pytest.raises(XenstoreSocketError) as info:
        XenstoreSocketServer(dom.store, path)
    assert isinstance(info.value, PvhvmError)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    if kind == "file":
        assert path.read_text() == "precious"
    if live is not None:
        live.close()


def test_missing_directory_is_a_one_line_error(dom, sockdir):
    with pytest.raises(XenstoreSocketError, match="cannot create the socket") as info:
        XenstoreSocketServer(dom.store, sockdir / "no" / "such" / "socket")
    assert "\n" not in str(info.value)


def test_close_leaves_a_file_that_replaced_the_socket(dom, sockdir):
    path = sockdir / "socket"
    srv = XenstoreSocketServer(dom.store, path)
    path.unlink()
    path.write_text("someone else's")
    srv.close()
    assert path.read_text() == "someone else's"


# ------------------------------------------------------------- the protocol


def test_partial_and_pipelined_requests(dom, server):
    def client():
        c = Raw(server.path)
        # One request a byte at a time.
        msg = HEADER.pack(XsType.READ, 7, 0, len(f"{HOME}/name") + 1) + f"{HOME}/name".encode() + b"\0"
        for i in range(len(msg)):
            c.sock.sendall(msg[i : i + 1])
            time.sleep(0.002)
        first = c.recv()
        # Three requests in one write, the last split across two writes.
        w = HEADER.pack(XsType.WRITE, 8, 0, 14) + b"/pipe/a\0hello\0"[:14]
        r = HEADER.pack(XsType.READ, 9, 0, 8) + b"/pipe/a\0"
        d = HEADER.pack(XsType.DIRECTORY, 10, 0, 6) + b"/pipe\0"
        c.sock.sendall(w + r + d[:5])
        time.sleep(0.05)
        c.sock.sendall(d[5:])
        rest = [c.recv() for _ in range(3)]
        c.close()
        return first, rest

    first, rest = drive(dom, client)
    assert first == (XsType.READ, 7, 0, b"xs-socket-test")
    assert rest == [(XsType.WRITE, 8, 0, b"OK\0"), (XsType.READ, 9, 0, b"hello\0"),
                    (XsType.DIRECTORY, 10, 0, b"a\0")]
    assert dom.store.read(0, "/pipe/a") == b"hello\0"


def test_event_order_and_errors(dom, server):
    def client():
        c = Raw(server.path)
        out = []
        c.send(XsType.WATCH, b"/w\0tok\0")
        out += [c.recv(), c.recv()]  # OK, then the watch's first event
        c.send(XsType.WRITE, b"/w/x\0" + b"1")
        out += [c.recv(), c.recv()]  # the event it causes, then OK
        out.append(c.call(XsType.READ, b"/nope\0"))
        out.append(c.call(XsType.INTRODUCE, b"5\0" + b"0\0" + b"1\0"))  # privileged: fine for dom0
        c.close()
        return out

    out = drive(dom, client)
    assert out[0][0] == XsType.WATCH and out[0][3] == b"OK\0"
    assert out[1] == (XsType.WATCH_EVENT, 0, 0, b"/w\0tok\0")
    assert out[2] == (XsType.WATCH_EVENT, 0, 0, b"/w/x\0tok\0")
    assert out[3][0] == XsType.WRITE and out[3][3] == b"OK\0"
    assert out[4] == (XsType.ERROR, b"ENOENT\0")
    assert out[5] == (XsType.INTRODUCE, b"OK\0")
    assert dom.store.is_domain_introduced(5)


def test_unprivileged_socket_clients(dom, sockdir):
    srv = XenstoreSocketServer(dom.store, sockdir / "domu", domid=DOMID)
    srv.attach(dom)
    try:
        def client():
            c = Raw(srv.path)
            res = (c.call(XsType.READ, b"name\0"),  # relative to its home
                   c.call(XsType.WRITE, b"/tool/x\0v"),
                   c.call(XsType.INTRODUCE, b"5\0" + b"0\0" + b"1\0"))
            c.close()
            return res

        home, write_tool, introduce = drive(dom, client)
        assert home == (XsType.READ, b"xs-socket-test")
        assert write_tool == (XsType.ERROR, b"EACCES\0")
        assert introduce == (XsType.ERROR, b"EACCES\0")
    finally:
        srv.close()


def test_each_client_has_its_own_transactions_and_watches(dom, server):
    state = {}

    def phase1():
        a, b = Raw(server.path), Raw(server.path)
        typ, tx = a.call(XsType.TRANSACTION_START, b"\0")
        assert typ == XsType.TRANSACTION_START
        tx = int(tx.rstrip(b"\0"))
        assert a.call(XsType.WRITE, b"/t/x\0in-tx", tx=tx) == (XsType.WRITE, b"OK\0")
        a.send(XsType.WATCH, b"/t\0a\0")
        a.recv(), a.recv()
        state["b_uses_a_tx"] = b.call(XsType.READ, b"/t/x\0", tx=tx)
        state["b_reads"] = b.call(XsType.READ, b"/t/x\0")
        state.update(a=a, b=b, tx=tx)

    drive(dom, phase1)
    assert state["b_uses_a_tx"] == (XsType.ERROR, b"ENOENT\0")
    assert state["b_reads"] == (XsType.ERROR, b"ENOENT\0")
    conns = server.connections
    assert len(conns) == 2
    watching = [c for c in conns if dom.store.watches(c)]
    assert len(watching) == 1 and dom.store.watches(watching[0]) == [("/t", "a")]
    assert dom.store.has_transaction(0, state["tx"])

    # A goes away with its transaction open and its watch set.
    def phase2():
        state["a"].close()
        time.sleep(0.2)
        return state["b"].call(XsType.READ, b"/t/x\0")

    assert drive(dom, phase2) == (XsType.ERROR, b"ENOENT\0")
    loop_until(dom, lambda: len(server.connections) == 1)
    assert not dom.store.has_transaction(0, state["tx"])
    with pytest.raises(pvhvm.xenstore.XenstoreError):
        dom.store.watches(watching[0])
    state["b"].close()


def test_socket_clients_have_a_transaction_quota(dom, server):
    # Every socket client, dom0 included, may hold quota_transactions (10)
    # open at once; the 11th is ENOSPC, and ending one makes room.
    assert server.max_transactions == dom.store.quota_transactions == 10
    state = {}

    def run():
        a, b = Raw(server.path), Raw(server.path)
        txs = []
        for _ in range(10):
            typ, payload = a.call(XsType.TRANSACTION_START, b"\0")
            assert typ == XsType.TRANSACTION_START
            txs.append(int(payload.rstrip(b"\0")))
        state["over"] = a.call(XsType.TRANSACTION_START, b"\0")
        state["other_client"] = b.call(XsType.TRANSACTION_START, b"\0")[0]
        assert a.call(XsType.TRANSACTION_END, b"F\0", tx=txs[0]) == (XsType.TRANSACTION_END, b"OK\0")
        state["after_end"] = a.call(XsType.TRANSACTION_START, b"\0")[0]
        a.close()
        b.close()

    drive(dom, run)
    assert state["over"] == (XsType.ERROR, b"ENOSPC\0")
    assert state["other_client"] == XsType.TRANSACTION_START
    assert state["after_end"] == XsType.TRANSACTION_START


def test_host_side_changes_reach_socket_watchers(dom, server):
    """A write the host makes on the loop thread (request_shutdown, as
    `xl shutdown`) is an event for socket clients without a client request."""
    c = Raw(server.path)
    c.send(XsType.WATCH, f"{HOME}/control/shutdown\0ctl\0".encode())
    drive(dom, lambda: (c.recv(), c.recv()))
    dom.request_shutdown("poweroff")
    # Sent at once, from request_shutdown's write: the loop is not running.
    assert readable_within(c.sock, 2)
    got = c.recv()
    assert got == (XsType.WATCH_EVENT, 0, 0, f"{HOME}/control/shutdown\0ctl\0".encode())
    c.close()


# ------------------------------------------------------- Debian xenstore-utils


def test_xenstore_utils_read_write_list_rm(dom, server, xs_tools):
    xs(dom, server, "xenstore-write", f"{HOME}/data/x", "hello")
    assert dom.store.read(0, f"{HOME}/data/x") == b"hello"
    assert xs(dom, server, "xenstore-read", f"{HOME}/data/x").stdout == "hello\n"
    assert xs(dom, server, "xenstore-read", f"{HOME}/name").stdout == "xs-socket-test\n"
    listed = xs(dom, server, "xenstore-list", HOME).stdout.split()
    assert listed == dom.store.directory(0, HOME)
    assert xs(dom, server, "xenstore-exists", f"{HOME}/data/x").returncode == 0
    xs(dom, server, "xenstore-rm", f"{HOME}/data/x")
    assert not dom.store.exists(f"{HOME}/data/x")
    r = xs(dom, server, "xenstore-read", f"{HOME}/data/x", check=False)
    assert r.returncode == 1 and "couldn't read path" in r.stderr
    assert xs(dom, server, "xenstore-exists", f"{HOME}/data/x", check=False).returncode == 1


def test_xenstore_write_several_uses_a_transaction(dom, server, xs_tools):
    before = server.request_counts.copy()
    xs(dom, server, "xenstore-write", "/multi/a", "1", "/multi/b", "2")
    assert server.request_counts[XsType.TRANSACTION_START] > before[XsType.TRANSACTION_START]
    assert server.request_counts[XsType.TRANSACTION_END] > before[XsType.TRANSACTION_END]
    assert (dom.store.read(0, "/multi/a"), dom.store.read(0, "/multi/b")) == (b"1", b"2")
    assert xs(dom, server, "xenstore-read", "/multi/a", "/multi/b").stdout == "1\n2\n"
    assert dom.store.paths() == sorted(dom.store.paths())  # no leftover transaction nodes
    assert not dom.store.has_transaction(0, 1)


def _parse_ls_tree(text: str, top: str) -> dict[str, str]:
    """xenstore-ls's indented tree (one space per level) as {path: value}."""
    out: dict[str, str] = {}
    stack: list[str] = []
    for line in text.splitlines():
        depth = len(line) - len(line.lstrip(" "))
        name, _, value = line.strip().partition(" = ")
        del stack[depth:]
        stack.append(name)
        assert value.startswith('"') and value.endswith('"'), line
        out[top.rstrip("/") + "/" + "/".join(stack)] = value[1:-1]
    return out


def test_xenstore_ls_matches_the_store(dom, server, xs_tools):
    dom.store.write(0, f"{HOME}/data/greeting", "hi there")
    tree = _parse_ls_tree(xs(dom, server, "xenstore-ls", HOME).stdout, HOME)
    expected = {p: v.decode() for p, v in store_subtree(dom.store, HOME).items() if p != HOME}
    assert tree == expected
    assert tree[f"{HOME}/data/greeting"] == "hi there"
    # -f: full paths, in the store's order.
    full = xs(dom, server, "xenstore-ls", "-f", "/").stdout.splitlines()
    assert [line.partition(" = ")[0] for line in full] == [p for p in _walk(dom.store, "/") if p != "/"]
    assert f'{HOME}/name = "xs-socket-test"' in full


def _walk(store, path: str) -> list[str]:
    out = [path]
    for child in store.directory(0, path):
        out += _walk(store, (path.rstrip("/") + "/" + child))
    return out


def test_xenstore_chmod(dom, server, xs_tools):
    xs(dom, server, "xenstore-write", f"{HOME}/data/p", "v")
    xs(dom, server, "xenstore-chmod", f"{HOME}/data/p", "n0", "r1", "w2")
    assert dom.store.get_perms(0, f"{HOME}/data/p") == [("n", 0), ("r", 1), ("w", 2)]
    out = xs(dom, server, "xenstore-ls", "-p", f"{HOME}/data").stdout
    assert "(n0,r1,w2)" in out
    # Domain 1 can now read it, not write it.
    assert dom.store.read(1, f"{HOME}/data/p") == b"v"
    with pytest.raises(pvhvm.xenstore.XenstoreError):
        dom.store.write(1, f"{HOME}/data/p", "x")


def test_xenstore_watch_fires_on_another_clients_write(dom, server, xs_tools):
    dom.store.write(0, "/watched", "")
    watcher = subprocess.Popen(["xenstore-watch", "-n", "2", "/watched"], env=tool_env(server.path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = drive(dom, watcher.stdout.readline)  # the event every new watch gets
        assert first == "/watched\n"
        xs(dom, server, "xenstore-write", "/watched/child", "v")
        # The event left with the write's reply: the watcher prints it while
        # the loop is not running.
        assert readable_within(watcher.stdout, 5)
        second = watcher.stdout.readline()
        assert second == "/watched/child\n"
        assert drive(dom, lambda: watcher.wait(10)) == 0
    finally:
        watcher.kill()
        watcher.wait()


def test_guest_watch_fires_on_a_host_tools_write(dom, server, xs_tools):
    """A watch the guest set through its ring sees a xenstore-write at once."""
    ring = dom.memory[dom.placement.store_ring : dom.placement.store_ring + 4096]

    def u32(off):
        return struct.unpack_from("<I", ring, off)[0]

    def guest_send(payload: bytes, typ: int, req: int) -> None:
        msg = HEADER.pack(typ, req, 0, len(payload)) + payload
        prod = u32(2052)
        for i, b in enumerate(msg):
            ring[(prod + i) & 1023] = b
        struct.pack_into("<I", ring, 2052, prod + len(msg))

    def guest_recv() -> bytes:
        cons, prod = u32(2056), u32(2060)
        data = bytes(ring[1024 + ((cons + i) & 1023)] for i in range(prod - cons))
        struct.pack_into("<I", ring, 2056, prod)
        return data

    guest_send(b"data\0gtok\0", XsType.WATCH, 1)  # relative, as Linux's xenbus may
    dom.xenstore.service()
    got = guest_recv()
    assert HEADER.pack(XsType.WATCH, 1, 0, 3) + b"OK\0" in got
    xs(dom, server, "xenstore-write", f"{HOME}/data/fromhost", "1")
    event = HEADER.pack(XsType.WATCH_EVENT, 0, 0, 19) + b"data/fromhost\0gtok\0"
    assert event in guest_recv()


def test_libxenstore_socket_lookup(dom, server, sockdir, xs_tools):
    # XENSTORED_PATH alone is enough (used for the socket and as the "device").
    assert xs(dom, server, "xenstore-read", f"{HOME}/domid").stdout == f"{DOMID}\n"
    # Without it: $XENSTORED_RUNDIR/socket.
    env = tool_env(server.path)
    del env["XENSTORED_PATH"]
    env["XENSTORED_RUNDIR"] = str(sockdir)
    assert server.path == sockdir / "socket"
    assert xs(dom, server, "xenstore-read", f"{HOME}/domid", env=env).stdout == f"{DOMID}\n"
    # A path with no socket: the tools fail cleanly.
    r = xs(dom, server, "xenstore-read", "/x", check=False, env=tool_env(sockdir / "missing"))
    assert r.returncode != 0 and "xs_open" in r.stderr


# --------------------------------------------------------------------- pyxs


def test_pyxs_basic(dom, server, pyxs):
    def client():
        with pyxs.Client(unix_socket_path=str(server.path)) as c:
            c.write(b"/py/a", b"1")
            c.mkdir(b"/py/dir")
            res = {
                "read": c.read(b"/py/a"),
                "list": sorted(c.list(b"/py")),
                "exists": (c.exists(b"/py/a"), c.exists(b"/py/nope")),
                "domain_path": c.get_domain_path(DOMID),
                "introduced": c.is_domain_introduced(0),
                "name": c[f"{HOME}/name".encode()],
            }
            c.set_perms(b"/py/a", [b"b0", b"r1"])
            res["perms"] = c.get_perms(b"/py/a")
            c.delete(b"/py/dir")
            res["after_delete"] = sorted(c.list(b"/py"))
            try:
                c.read(b"/py/nope")
            except pyxs.PyXSError as e:
                res["missing"] = e.args[0]
            return res

    res = drive(dom, client)
    assert res["read"] == b"1"
    assert res["list"] == [b"a", b"dir"]
    assert res["exists"] == (True, False)
    assert res["domain_path"] == HOME.encode()
    assert res["introduced"] is True
    assert res["name"] == b"xs-socket-test"
    assert res["perms"] == [b"b0", b"r1"]
    assert res["after_delete"] == [b"a"]
    assert res["missing"] == errno.ENOENT
    assert dom.store.get_perms(0, "/py/a") == [("b", 0), ("r", 1)]


def test_pyxs_finds_the_socket_through_xenstored_path(dom, server, pyxs, monkeypatch):
    monkeypatch.setenv("XENSTORED_PATH", str(server.path))
    monkeypatch.delenv("XENSTORED_RUNDIR", raising=False)

    def client():
        with pyxs.Client() as c:
            return c.read(f"{HOME}/name".encode())

    assert drive(dom, client) == b"xs-socket-test"


def test_pyxs_transactions(dom, server, pyxs):
    def client():
        with pyxs.Client(unix_socket_path=str(server.path)) as c, \
                pyxs.Client(unix_socket_path=str(server.path)) as other:
            c.write(b"/tx/n", b"0")
            # Commit.
            c.transaction()
            c.write(b"/tx/n", b"1")
            outside = other.read(b"/tx/n")
            ok = c.commit()
            after = other.read(b"/tx/n")
            # A conflict: the other client changes what we read.
            c.transaction()
            c.read(b"/tx/n")
            c.write(b"/tx/n", b"2")
            other.write(b"/tx/n", b"X")
            conflicted = c.commit()
            # Rollback.
            c.transaction()
            c.write(b"/tx/gone", b"1")
            c.rollback()
            return outside, ok, after, conflicted, other.exists(b"/tx/gone")

    outside, ok, after, conflicted, exists = drive(dom, client)
    assert outside == b"0" and ok is True and after == b"1"
    assert conflicted is False
    assert exists is False
    assert dom.store.read(0, "/tx/n") == b"X"


def test_pyxs_watch(dom, server, pyxs):
    def client():
        with pyxs.Client(unix_socket_path=str(server.path)) as c, \
                pyxs.Client(unix_socket_path=str(server.path)) as w:
            c.mkdir(b"/pw")
            m = w.monitor()
            m.watch(b"/pw", b"token")
            events = m.wait()
            first = next(events)
            c.write(b"/pw/child", b"v")
            second = next(events)
            c.delete(b"/pw")
            third = next(events)
            m.close()
            return first, second, third

    first, second, third = drive(dom, client)
    assert tuple(first) == (b"/pw", b"token")
    assert tuple(second) == (b"/pw/child", b"token")
    assert tuple(third) == (b"/pw", b"token")


# ---------------------------------------------------------- hostile clients


def test_garbage_closes_only_that_connection(dom, server):
    def client():
        good = Raw(server.path)
        bad = Raw(server.path)
        bad.sock.sendall(bytes(range(0xC0, 0x100)))  # length field far over 4096
        closed = bad.closed_by_server()
        bad.close()
        return closed, good.call(XsType.READ, f"{HOME}/name\0".encode())

    closed, reply = drive(dom, client)
    assert closed
    assert reply == (XsType.READ, b"xs-socket-test")
    loop_until(dom, lambda: server.connections == [])


def test_payload_length_limit(dom, server):
    def client():
        c = Raw(server.path)
        path = b"/big\0"
        value = b"v" * (4096 - len(path))
        at_limit = c.call(XsType.WRITE, path + value)  # exactly 4096: served
        c.sock.sendall(HEADER.pack(XsType.WRITE, 1, 0, 4097))  # the header alone is enough
        closed = c.closed_by_server()
        c.close()
        return at_limit, closed

    at_limit, closed = drive(dom, client)
    assert at_limit == (XsType.WRITE, b"OK\0")
    assert closed
    assert dom.store.read(0, "/big") == b"v" * 4091
    assert drive(dom, lambda: read_ok(server.path, "/big")) == b"v" * 4091


def test_unknown_types_get_enosys_and_keep_the_connection(dom, server):
    def client():
        c = Raw(server.path)
        res = [c.call(999, b"whatever"), c.call(XsType.WATCH_EVENT, b"/x\0t\0"), c.call(XsType.ERROR, b"")]
        res.append(c.call(XsType.READ, f"{HOME}/name\0".encode()))
        c.close()
        return res

    res = drive(dom, client)
    assert res[:3] == [(XsType.ERROR, b"ENOSYS\0")] * 3
    assert res[3] == (XsType.READ, b"xs-socket-test")


@pytest.mark.parametrize("cut", [5, 16, 16 + 3])
def test_client_vanishing_mid_message(dom, server, cut):
    def client():
        c = Raw(server.path)
        typ, tx = c.call(XsType.TRANSACTION_START, b"\0")
        c.send(XsType.WATCH, b"/v\0t\0")
        c.recv(), c.recv()
        msg = HEADER.pack(XsType.WRITE, 5, 0, 12) + b"/v/x\0payload"
        c.sock.sendall(msg[:cut])
        time.sleep(0.05)
        c.close()
        time.sleep(0.1)
        return int(tx.rstrip(b"\0")), read_ok(server.path)

    tx, still = drive(dom, client)
    assert still == b"xs-socket-test"
    loop_until(dom, lambda: server.connections == [])
    assert not dom.store.has_transaction(0, tx)
    assert not dom.store.exists("/v/x")


def test_reset_connection_mid_reply(dom, server):
    """A client that sends requests and resets the connection (SO_LINGER 0)
    before reading: the server's sends fail, it drops the client."""
    def client():
        c = Raw(server.path)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for _ in range(50):
            c.send(XsType.READ, f"{HOME}/name\0".encode())
        c.close()
        time.sleep(0.1)
        return read_ok(server.path)

    assert drive(dom, client) == b"xs-socket-test"
    loop_until(dom, lambda: server.connections == [])


def test_a_client_that_does_not_read_is_throttled(dom, server):
    """Requests keep coming, replies are not read: the server stops reading
    that client once OUT_HIGH_WATER bytes wait, serves the others, and
    catches up when the client reads again."""
    path = "/fat/" + "p" * 3000  # big requests, so that the sender ends up blocked too
    value = b"x" * 4000
    dom.store.write(0, path, value)
    req = HEADER.pack(XsType.READ, 1, 0, len(path) + 1) + path.encode() + b"\0"
    n = 500  # 1.5 MB of requests, 2 MB of replies
    hog = Raw(server.path)
    sent = threading.Event()

    def flood():
        hog.sock.settimeout(None)
        hog.sock.sendall(req * n)  # blocks once the server stops reading
        sent.set()

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()

    loop_until(dom, lambda: any(server.pending_output(c) >= xs_socket.OUT_HIGH_WATER for c in server.connections))

    def others():
        return [read_ok(server.path) for _ in range(20)]

    assert drive(dom, others) == [b"xs-socket-test"] * 20
    (hog_id,) = [c for c in server.connections if server.pending_output(c)]
    assert xs_socket.OUT_HIGH_WATER <= server.pending_output(hog_id) < xs_socket.OUT_HIGH_WATER + 8192
    assert not sent.is_set()

    def drain():
        got = 0
        while got < n:
            typ, _, _, payload = hog.recv()
            assert (typ, payload) == (XsType.READ, value)
            got += 1
        return got

    # The guest's timer exits (the ticker here) let the server catch up.
    assert drive(dom, drain, timeout=60) == n
    assert sent.wait(5)
    assert server.pending_output(hog_id) == 0
    hog.close()


def test_watch_events_for_a_client_that_does_not_read_are_capped(dom, server):
    server.max_event_backlog = 64 * 1024
    sleeper = Raw(server.path)
    sleeper.send(XsType.WATCH, b"/\0all\0")

    def writer():
        c = Raw(server.path)
        for i in range(8000):
            assert c.call(XsType.WRITE, b"/spam/node-%05d\0v" % i) == (XsType.WRITE, b"OK\0")
        c.close()

    drive(dom, writer, timeout=60)
    (sleeper_id,) = [c for c in server.connections if dom.store.watches(c)]
    assert server.dropped_events > 0
    assert server.pending_output(sleeper_id) <= 64 * 1024
    # It is still connected and served once it reads.
    def catch_up():
        seen = []
        sleeper.sock.settimeout(0.5)
        try:
            while True:
                seen.append(sleeper.recv()[0])
        except socket.timeout:
            pass
        sleeper.sock.settimeout(10)
        r = sleeper.send(XsType.READ, f"{HOME}/name\0".encode())
        while True:
            typ, req, _, payload = sleeper.recv()
            if typ != XsType.WATCH_EVENT:
                return seen, req == r, typ, payload

    seen, same, typ, payload = drive(dom, catch_up, timeout=30)
    assert seen.count(XsType.WATCH) == 1 and set(seen) == {XsType.WATCH, XsType.WATCH_EVENT}
    assert same and (typ, payload) == (XsType.READ, b"xs-socket-test")
    sleeper.close()
