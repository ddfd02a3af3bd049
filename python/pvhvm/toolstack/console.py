"""`pvhvm console NAME`: a background domain's console on this terminal.

The console arrives on the control socket (the `console` command); the
local side is `terminal.Terminal`, the same as `pvhvm boot`'s (raw mode,
the escape key, piped input and its end, signals), driven here by a small
loop standing in for the domain's own. Detaching leaves the domain running.
"""

from __future__ import annotations

import socket
from typing import Callable

from ..runloop import SelectorLoop
from ..terminal import Detached, Terminal
from .protocol import receive


class RemoteConsole(SelectorLoop):
    """What `Terminal.attach` needs of a domain, for one on a socket: the
    loop's readers and cross-thread work, typing into the socket."""

    def __init__(self, sock: socket.socket, set_size: Callable[[int, int], None] | None = None) -> None:
        super().__init__()
        self.sock = sock
        self.sock.setblocking(False)
        self._set_size = set_size
        self.ended = False

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

    def run(self, sink: Callable[[bytes], None]) -> None:
        """Until the domain process closes the console: output to `sink`."""

        def on_output() -> None:
            data = receive(self.sock)
            if data is None:
                return
            if not data:
                self.ended = True
                return
            sink(data)

        self.add_reader(self.sock, on_output)
        while not self.ended:
            self.poll(None)


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
