"""`pvhvm console NAME`: a background domain's console on this terminal.

The console arrives on the control socket (the `console` command); the
local side is `terminal.Terminal`, the same as `pvhvm boot`'s (raw mode,
the escape key, piped input and its end, signals), driven here by a small
loop standing in for the domain's own. Detaching leaves the domain running.
"""

from __future__ import annotations

import os
import selectors
import socket
from collections import deque
from typing import Callable

from ..terminal import Detached, Terminal


class RemoteConsole:
    """What `Terminal.attach` needs of a domain, for one on a socket."""

    def __init__(self, sock: socket.socket, set_size: Callable[[int, int], None] | None = None) -> None:
        self.sock = sock
        self._set_size = set_size
        self.sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._run_soon)
        self._soon: deque[Callable[[], None]] = deque()
        self.ended = False

    # -- what Terminal calls -------------------------------------------------

    def add_reader(self, fileobj, callback: Callable[[], None]) -> None:
        self._selector.register(fileobj, selectors.EVENT_READ, callback)

    def remove_reader(self, fileobj) -> None:
        self._selector.unregister(fileobj)

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        self._soon.append(fn)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def set_console_size(self, rows: int, cols: int) -> None:
        # Not on the console's own connection (raw bytes): a command on another.
        if self._set_size is not None:
            self._set_size(rows, cols)

    def send(self, data: bytes) -> None:
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        except OSError:
            self.ended = True
        finally:
            self.sock.setblocking(False)

    # -- the loop ------------------------------------------------------------

    def _run_soon(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._soon:
            self._soon.popleft()()

    def run(self, sink: Callable[[bytes], None]) -> None:
        """Until the domain process closes the console: output to `sink`."""

        def on_output() -> None:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.ended = True
                return
            sink(data)

        self._selector.register(self.sock, selectors.EVENT_READ, on_output)
        while not self.ended:
            for key, _ in self._selector.select():
                key.data()

    def close(self) -> None:
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class ConsoleTerminal(Terminal):
    """`pvhvm console`'s terminal: the end of piped input only ends the
    input. (`pvhvm boot` then types Ctrl-D at the guest's next prompt so
    that the default guest powers off; a background domain must not end
    because a script's input did.)"""

    def _send_eof(self) -> None:
        pass


def attach(sock: socket.socket, term: Terminal, set_size: Callable[[int, int], None] | None = None) -> str:
    """Run the console session; why it ended, in words. Detached (the
    escape key, SIGTERM, SIGHUP) propagates to the caller. `set_size`
    passes the terminal's size on to the guest."""
    remote = RemoteConsole(sock, set_size)
    try:
        with term.attach(remote):  # type: ignore[arg-type]
            remote.run(term.write)
        return "the domain's console closed"
    finally:
        remote.close()


__all__ = ["ConsoleTerminal", "RemoteConsole", "attach", "Detached"]
