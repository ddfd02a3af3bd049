"""The domain process's side of the control socket: connections, the
console hub, requests queued for the run loop.

The server has a selector of its own; the domain's run loop watches that
selector's descriptor (nested epoll), so a restarted domain only has to
watch it again. Requests are queued and carried out between runs of the
core (`DomainProcess.handle_requests`), never while a vCPU is on the engine.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import protocol

# Console output kept while no client is attached (xenconsoled keeps a
# buffer, and a pty keeps what nobody read): the newest is shown on attach.
CONSOLE_BACKLOG = 64 << 10
# Output a slow client has not taken yet; beyond it the oldest is dropped
# rather than stalling the guest.
CLIENT_OUTBUF = 1 << 20
MAX_CLIENTS = 64


class Connection:
    def __init__(self, server: "ControlServer", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.console = False  # raw console bytes instead of JSON lines
        self.closed = False
        self._writing = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self.outbuf += data
        if len(self.outbuf) > CLIENT_OUTBUF:
            del self.outbuf[: len(self.outbuf) - CLIENT_OUTBUF]
        self.flush()

    def reply(self, message: dict) -> None:
        self.send(protocol.encode(message))

    def flush(self) -> None:
        while self.outbuf and not self.closed:
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return
            del self.outbuf[:n]
        want = bool(self.outbuf) and not self.closed
        if want != self._writing:
            self._writing = want
            sel = self.server.selector
            sel.modify(self, selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0), self)

    def on_ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.flush()
        if mask & selectors.EVENT_READ and not self.closed:
            self.on_readable()

    def on_readable(self) -> None:
        data = protocol.receive(self.sock)
        if data is None:
            return
        if not data:
            self.close()
            return
        if self.console:
            self.server.hub.input(data)
            return
        self.inbuf += data
        while not self.console and not self.closed:
            nl = self.inbuf.find(b"\n")
            if nl < 0:
                if len(self.inbuf) > protocol.MAX_LINE:
                    self.reply(protocol.error(f"a line longer than {protocol.MAX_LINE} bytes"))
                    self.close()
                break
            line = bytes(self.inbuf[:nl])
            del self.inbuf[: nl + 1]
            if line.strip():
                self.server.on_line(self, line)
        if self.console and self.inbuf:
            rest, self.inbuf = bytes(self.inbuf), bytearray()
            self.server.hub.input(rest)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.server.selector.unregister(self)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.server.on_closed(self)


@dataclass
class Request:
    conn: Connection
    ident: Any
    command: str | None
    arguments: dict = field(default_factory=dict)
    # A request refused as it arrived, answered in its turn (replies keep the order of requests).
    refusal: tuple[str, str] | None = None

    def reply(self, value: Any = None) -> None:
        message: dict = {"return": {} if value is None else value}
        if self.ident is not None:
            message["id"] = self.ident
        self.conn.reply(message)

    def fail(self, desc: str, cls: str = protocol.GENERIC) -> None:
        self.conn.reply(protocol.error(desc, cls, self.ident))


class ConsoleHub:
    """The guest console seen from the control socket: one attached client
    at a time; the backlog of what nobody saw goes to the next one."""

    def __init__(self) -> None:
        self.client: Connection | None = None
        self.backlog = bytearray()
        self.to_guest: Callable[[bytes], None] | None = None

    def output(self, data: bytes) -> None:
        if self.client is not None and not self.client.closed:
            self.client.send(data)
            return
        self.backlog += data
        if len(self.backlog) > CONSOLE_BACKLOG:
            del self.backlog[: len(self.backlog) - CONSOLE_BACKLOG]

    def input(self, data: bytes) -> None:
        if self.to_guest is not None:
            self.to_guest(data)

    def attach(self, conn: Connection) -> None:
        self.client = conn
        conn.console = True
        if self.backlog:
            conn.send(bytes(self.backlog))
            self.backlog.clear()

    def detach(self, conn: Connection) -> None:
        if self.client is conn:
            self.client = None


class ControlServer:
    """Listens on `path`; JSON requests are queued for `take_requests`."""

    def __init__(self, path: Path, greeting: Callable[[], dict], commands: list[str]) -> None:
        self.path = path
        self.greeting = greeting
        self.commands = commands
        self.selector = selectors.DefaultSelector()
        self.hub = ConsoleHub()
        self.requests: deque[Request] = deque()
        self.waiters: list[Request] = []
        self.conns: set[Connection] = set()
        path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)  # the socket is the domain: its owner's only
        try:
            self.listener.bind(str(path))
        finally:
            os.umask(old)
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, None)

    def fileno(self) -> int:
        """The selector's descriptor: readable when anything here is ready."""
        return self.selector.fileno()

    @property
    def has_requests(self) -> bool:
        return bool(self.requests)

    def serve(self, timeout: float | None = 0) -> bool:
        """Accept, read and write what is ready (waiting up to `timeout`)."""
        events = self.selector.select(timeout)
        for key, mask in events:
            if key.data is None:
                self._accept()
            elif not key.data.closed:
                key.data.on_ready(mask)
        return bool(events)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                raise
            if len(self.conns) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            conn = Connection(self, sock)
            self.conns.add(conn)
            self.selector.register(conn, selectors.EVENT_READ, conn)
            conn.reply({"pvhvm": {**self.greeting(), "commands": self.commands}})

    def on_line(self, conn: Connection, line: bytes) -> None:
        try:
            message = protocol.decode(line)
        except ValueError as e:
            self.requests.append(Request(conn, None, None, refusal=(f"not a JSON object: {e}", protocol.GENERIC)))
            return
        ident = message.get("id")
        command = message.get("execute")
        arguments = message.get("arguments", {})
        refusal = None
        if not isinstance(command, str) or not isinstance(arguments, dict):
            refusal = ("expected {\"execute\": NAME, \"arguments\": {...}}", protocol.GENERIC)
        elif command not in self.commands:
            refusal = (f"no command {command!r}", protocol.COMMAND_NOT_FOUND)
        self.requests.append(Request(conn, ident, command if refusal is None else None, arguments
                                     if refusal is None else {}, refusal))

    def take_requests(self) -> list[Request]:
        taken = [r for r in self.requests if not r.conn.closed]
        self.requests.clear()
        return taken

    def on_closed(self, conn: Connection) -> None:
        self.conns.discard(conn)
        self.hub.detach(conn)
        self.waiters = [w for w in self.waiters if w.conn is not conn]

    def close(self) -> None:
        for conn in list(self.conns):
            conn.flush()
            conn.close()
        self.selector.unregister(self.listener)
        self.listener.close()
        self.selector.close()
        self.path.unlink(missing_ok=True)
