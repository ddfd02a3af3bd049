"""The host end of the guest console for `pvhvm boot`, as `xl console` is for
Xen: guest output (hvc0) to stdout, stdin typed into the guest.

    term = Terminal(escape=b"\\x1d")
    dom = Domain(kernel, cmdline="console=hvc0", console=term.write)
    try:
        with term.attach(dom):          # or attach_console(dom, term)
            outcome = dom.run()
    except Detached as d:               # the escape key, SIGTERM, SIGHUP
        sys.exit(d.status)

stdin a terminal
    It is put in raw mode for the session, so every key goes to the guest
    as typed: Ctrl-C, Ctrl-Z and Ctrl-D are the guest's (its shell does job
    control), arrows and the guest's cursor-position queries work. The
    escape key (by default Ctrl-], 0x1d, as in xl console) detaches: its
    reader raises `Detached` out of `Domain.run`, with status EXIT_DETACHED
    (130: stopped by the user, as for Ctrl-C elsewhere), and the domain is
    dropped. pvhvm is
    the hypervisor, so detaching ends the domain; there is nothing to
    re-attach to. The terminal's modes are restored on every way out: the
    guest ending, an exception, the escape key, KeyboardInterrupt (SIGINT
    from outside), SIGTERM (Detached, status 143) and SIGHUP (129), and at
    interpreter exit as a last resort; SIGTSTP (`kill -TSTP`) restores them
    while pvhvm is stopped and SIGCONT puts raw mode back.

    The guest learns the terminal's size (xenstore, Domain.set_console_size:
    the default guest sets hvc0's from it) at attach, on every SIGWINCH and
    on SIGCONT. When the session ends within CURSOR_REPORT_WAIT of a cursor
    query whose answer has not been read yet, that answer is awaited and
    dropped, so that the host shell does not read it as typed ("^[[24;5R").

    The terminal is left alone, and stdin counts as empty (below), when
    pvhvm is a background job of it (raw mode would stop it with SIGTTOU)
    or when neither stdout nor stderr is a terminal: nobody sees the guest,
    as under a test harness that captures the output of `pvhvm boot` run
    from a terminal, which must still end.

stdin a pipe, a file, /dev/null, or closed
    Its bytes are typed into the guest as they arrive, verbatim (the
    escape key is not special). At end of input the guest gets Ctrl-D
    (0x04), so its shell sees end of input and exits, and the default
    guest's init powers off: `pvhvm boot </dev/null` (or with stdin closed,
    as in CI) ends after the init marker with status 0.

    The Ctrl-D is timed: one that reaches a Linux tty while it is still in
    canonical mode (during boot, before the shell's line editor runs) is
    stored as an end-of-line marker that the line editor later reads as a
    NUL and ignores, and the shell never exits. So it is sent when a line
    editor waits for a line with nothing pending, which it announces by
    asking the terminal for the cursor position (ESC [ 6 n; busybox's line
    editor does it at a prompt when no input is pending): at once if that happened since the
    last input, otherwise at the next such prompt. After end of input,
    every later prompt gets a Ctrl-D too (stdin stays at end of file: a
    nested shell exits, then its parent). A guest whose programs never ask
    for the cursor position gets no Ctrl-D.

Output elsewhere than on the terminal we read (a log file, a pipe, a
terminal while stdin is a pipe) is the guest's output less its cursor
queries: nobody would answer them, and they would be garbage in a log, or
make a terminal answer into the input of the next program that reads it.
If stdout is a terminal, the guest still gets its size.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import select
import signal
import struct
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from .api import Domain

ESCAPE = b"\x1d"  # Ctrl-], as xl console
EOF_KEY = b"\x04"  # Ctrl-D
CURSOR_QUERY = b"\x1b[6n"  # DSR: "where is the cursor?", sent by line editors at a prompt
# The terminal's answer, ESC [ row ; col R, and what may be the start of one.
CURSOR_REPORT = re.compile(rb"\x1b\[[0-9]+;[0-9]+R")
_CURSOR_REPORT_START = re.compile(rb"\x1b(\[[0-9;]*)?\Z")
# How long after its last cursor query pvhvm, leaving the terminal, waits for
# the answer, so that it does not land on the host shell's prompt.
CURSOR_REPORT_WAIT = 0.5
EXIT_DETACHED = 130
EXIT_HANGUP = 128 + signal.SIGHUP
EXIT_TERMINATED = 128 + signal.SIGTERM
_SIGNAL_EXITS = {signal.SIGTERM: (EXIT_TERMINATED, "terminated (SIGTERM)"),
                 signal.SIGHUP: (EXIT_HANGUP, "hung up (SIGHUP)")}


class Detached(Exception):
    """Raised out of `Domain.run` when the console session ends pvhvm: the
    escape key, SIGTERM or SIGHUP, or the terminal going away. `status` is
    the exit status to use, `reason` says why ("detached (Ctrl-])")."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def key_name(key: bytes | None) -> str:
    """How a key is written: "Ctrl-]" for 0x1d, "~" for itself."""
    if not key:
        return "none"
    c = key[0]
    if c < 0x20:
        return f"Ctrl-{chr(c + 0x40)}"
    if c == 0x7F:
        return "Ctrl-?"
    return chr(c)


def parse_escape(spec: str) -> bytes | None:
    """An escape key from `^]`-style caret notation (`^A`..`^_`, `^?`), one
    ASCII character, or `none` (no escape key). Raises ValueError."""
    if spec.lower() == "none":
        return None
    if len(spec) == 2 and spec[0] == "^":
        c = spec[1].upper()
        if c == "?":
            return b"\x7f"
        if "@" <= c <= "_":
            return bytes([ord(c) - 0x40])
    elif len(spec) == 1 and ord(spec) < 0x80:
        return spec.encode()
    raise ValueError(f"{spec!r} is not a key: use ^X caret notation (e.g. ^]), one ASCII character, or none")


class Terminal:
    """The host console of one domain. Pass `write` as the Domain's
    `console=` callback, then run the domain inside `attach(dom)`.

    `stdin`: a file object or descriptor to read (default sys.stdin; None
    there, i.e. fd 0 closed, counts as empty input). `stdout`: a binary
    file for guest output (default sys.stdout.buffer). `escape`: the
    detach key in terminal mode, None for none."""

    def __init__(self, stdin: BinaryIO | int | None = None, stdout: BinaryIO | None = None,
                 escape: bytes | None = ESCAPE) -> None:
        if escape is not None and len(escape) != 1:
            raise ValueError("the escape key must be one byte")
        self._stdin = stdin
        self._stdout = stdout
        self.escape = escape
        self.fd: int | None = None  # the input descriptor, once attached
        self.interactive = False  # stdin is a terminal we put in raw mode
        self._dom: Domain | None = None
        self._saved_modes: list | None = None
        self._saved_handlers: dict[int, object] = {}
        self._reading = False  # registered with the domain's selector
        self._at_eof = False  # stdin ended: line editors get Ctrl-D
        self._guest_waiting = False  # a line editor asked for the cursor since our last input
        self._tail = b""  # last bytes of output, to find a query split across writes
        self._closing = False
        self._held: bytearray | None = None  # input kept from the guest until release_input()
        # Cursor queries reach the terminal only if its answers come back
        # to the guest (we read that terminal); elsewhere they are dropped.
        self._pass_queries = False
        self._partial_query = b""  # output held back: maybe the start of a query
        self._queries_unanswered = 0  # passed to the terminal, answer not read yet
        self._last_query_at = 0.0
        self._input_tail = b""  # the start of a cursor report split across reads
        self._size_fd: int | None = None  # the terminal whose size the guest gets
        self._size_sent: tuple[int, int] | None = None

    # -- guest output ------------------------------------------------------

    @property
    def eol(self) -> str:
        """The line ending for pvhvm's own messages while the session is on:
        "\\r\\n" in raw mode (no output processing), else "\\n"."""
        return "\r\n" if self._saved_modes is not None else "\n"

    def write(self, data: bytes) -> None:
        """Guest console output: to stdout as it is (the guest sends \\r\\n),
        less its cursor queries unless stdout is the terminal we read."""
        seen = self._tail + data
        self._tail = seen[-(len(CURSOR_QUERY) - 1):]
        queries = seen.count(CURSOR_QUERY)
        if self._pass_queries:
            self._output(data)
            if queries:
                self._queries_unanswered += queries
                self._last_query_at = time.monotonic()
        else:
            self._output(self._without_queries(data))
        if queries:
            self._guest_waiting = True
            if self._at_eof and self._dom is not None:
                # Not from inside the ring service that called us: next turn of the loop.
                self._dom.call_soon_threadsafe(self._send_eof)

    def _output(self, data: bytes) -> None:
        out = self._stdout if self._stdout is not None else getattr(sys.stdout, "buffer", None)
        if out is not None and data:
            out.write(data)
            out.flush()

    def _without_queries(self, data: bytes) -> bytes:
        """`data` less cursor queries: nobody would answer them, and in a log
        or on a terminal we do not read (whose answer would go to the next
        program reading it) they are garbage. A possible start of one at
        the end is held back until the next write."""
        data = self._partial_query + data
        while CURSOR_QUERY in data:
            data = data.replace(CURSOR_QUERY, b"")
        for n in range(min(len(CURSOR_QUERY) - 1, len(data)), 0, -1):
            if data.endswith(CURSOR_QUERY[:n]):
                self._partial_query = data[-n:]
                return data[:-n]
        self._partial_query = b""
        return data

    def _flush_partial_query(self) -> None:
        held, self._partial_query = self._partial_query, b""
        try:
            self._output(held)
        except OSError:  # stdout closed: nothing to keep it for either
            pass

    # -- guest input -------------------------------------------------------

    def hold_input(self) -> None:
        """Keep what stdin sends (and its end) from the guest until
        `release_input()`; the escape key and the signals still work. For
        `pvhvm boot --snapshot`, whose saved guest must not have read any
        of it."""
        if self._held is None:
            self._held = bytearray()

    def release_input(self) -> None:
        """Type the input held since `hold_input()` into the guest, and go
        on passing it through."""
        held, self._held = self._held, None
        if held:
            self._send(bytes(held))
        if self._at_eof and self._guest_waiting:
            self._send_eof()

    def nudge(self) -> None:
        """Press Enter in the guest, ahead of any held input: a shell waiting
        at its prompt prints a fresh one (after a restore, whose console
        history starts empty, or under a line of pvhvm's own)."""
        if self._held is not None:
            self._held[0:0] = b"\r"
        else:
            self._send(b"\r")

    def _send(self, data: bytes) -> None:
        if self._held is not None:
            self._held += data
            return
        if data and self._dom is not None:
            self._guest_waiting = False
            self._dom.send(data)

    def _send_eof(self) -> None:
        if self._held is not None:
            return  # release_input() sends it if the guest still waits then
        if self._dom is not None and self._guest_waiting:
            self._dom.send(EOF_KEY)
            self._guest_waiting = False

    def _end_of_input(self) -> None:
        self._stop_reading()
        self._at_eof = True
        if self._guest_waiting:
            self._send_eof()

    def _on_terminal_input(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError:  # EIO: the terminal hung up
            data = b""
        if not data:
            raise Detached("the terminal went away", EXIT_HANGUP)
        self._count_cursor_reports(data)
        if self.escape is not None and self.escape in data:
            self._send(data[: data.index(self.escape)])
            raise Detached(f"detached ({key_name(self.escape)})", EXIT_DETACHED)
        self._send(data)

    def _on_stream_input(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._send(data)
        else:
            self._end_of_input()

    def _read_in_thread(self, fd: int) -> None:
        # For what epoll cannot watch (regular files, /dev/null): a blocking
        # reader that hands each chunk to the run loop's thread (of the
        # domain attached now: a rebooted guest is another Domain).
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            dom = self._dom
            if dom is None:
                return
            if not data:
                dom.call_soon_threadsafe(self._end_of_input)
                return
            dom.call_soon_threadsafe(lambda d=data: self._send(d))

    def _count_cursor_reports(self, data: bytes) -> None:
        seen = self._input_tail + data
        reports = len(CURSOR_REPORT.findall(seen))
        self._queries_unanswered = max(0, self._queries_unanswered - reports)
        start = _CURSOR_REPORT_START.search(seen[-16:])
        self._input_tail = start.group() if start else b""

    def _swallow_cursor_reports(self) -> None:
        """Before giving the terminal back: read the answers to our last
        cursor queries still on their way (a prompt printed just before the
        session ended), so that the host shell does not get them as typed
        input. What else arrives meanwhile is dropped too: keys typed in the
        same split second, for a session that was ending."""
        deadline = self._last_query_at + CURSOR_REPORT_WAIT
        while self._queries_unanswered > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                ready, _, _ = select.select([self.fd], [], [], left)
                data = os.read(self.fd, 256) if ready else b""
            except (OSError, ValueError):
                return
            if not data and ready:
                return  # the terminal went away
            self._count_cursor_reports(data)

    # -- the terminal's size -------------------------------------------------

    def _terminal_size(self) -> tuple[int, int] | None:
        try:
            rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(self._size_fd, termios.TIOCGWINSZ, bytes(8)))
        except OSError:
            return None
        return (rows, cols) if rows and cols else None  # 0: nobody set one (a bare pty)

    def _send_size(self) -> None:
        """Give the guest the terminal's size, if it has one and it changed."""
        if self._dom is None or self._size_fd is None:
            return
        size = self._terminal_size()
        if size is not None and size != self._size_sent:
            self._size_sent = size
            self._dom.set_console_size(*size)

    def _on_winch(self, signum: int, frame) -> None:
        # A signal handler may run in the middle of the store's code: on to the loop.
        if self._dom is not None and not self._closing:
            self._dom.call_soon_threadsafe(self._send_size)

    def _stop_reading(self) -> None:
        if self._reading and self._dom is not None:
            self._reading = False
            try:
                self._dom.remove_reader(self.fd)
            except (KeyError, ValueError):
                pass

    # -- the session -------------------------------------------------------

    def _input_fd(self) -> int | None:
        stdin = sys.stdin if self._stdin is None else self._stdin
        if stdin is None:
            return None
        if isinstance(stdin, int):
            return stdin
        try:
            return stdin.fileno()
        except (OSError, ValueError):  # closed, or not backed by a descriptor
            return None

    @contextmanager
    def attach(self, dom: Domain) -> Iterator[Terminal]:
        """Connect stdin to `dom`'s console for the duration of the block
        (raw mode and the signal handlers included, if stdin is a terminal)."""
        if self._dom is not None:
            raise RuntimeError("this terminal is already attached")
        self._dom = dom
        self._closing = self._at_eof = self._guest_waiting = self.interactive = False
        self._tail = self._input_tail = b""
        self._queries_unanswered = 0
        self._size_sent = None
        try:
            self.fd = fd = self._input_fd()
            if fd is None:
                self._at_eof = True
            elif os.isatty(fd):
                if self._owns_terminal(fd) and self._output_on_terminal():
                    self._enter_raw_mode(fd)
                    self._reader = self._on_terminal_input
                    dom.add_reader(fd, self._reader)
                    self._reading = True
                else:
                    self._at_eof = True  # nobody there for us: as if stdin were empty
            else:
                try:
                    self._reader = self._on_stream_input
                    dom.add_reader(fd, self._reader)
                    self._reading = True
                except (OSError, ValueError):  # EPERM from epoll: a regular file or /dev/null
                    threading.Thread(target=self._read_in_thread, args=(fd,), daemon=True,
                                     name="pvhvm-stdin").start()
            out_fd = self._output_fd()
            self._pass_queries = self.interactive and out_fd is not None
            self._size_fd = self.fd if self.interactive else out_fd
            if self._size_fd is not None:
                self._send_size()
                if threading.current_thread() is threading.main_thread():
                    self._saved_handlers.setdefault(signal.SIGWINCH, signal.signal(signal.SIGWINCH, self._on_winch))
            yield self
        finally:
            self._closing = True
            self._stop_reading()
            if self._saved_modes is not None:
                self._swallow_cursor_reports()
            self._restore()
            self._flush_partial_query()
            self._pass_queries = False
            self._size_fd = None
            self._dom = None

    def switch_domain(self, dom: Domain) -> None:
        """Carry the attached session over to `dom` (the guest built again
        after it rebooted): raw mode and the signal handlers stay."""
        if self._reading and self._dom is not None:
            self._dom.remove_reader(self.fd)
            dom.add_reader(self.fd, self._reader)
        self._dom = dom
        self._guest_waiting = False
        self._tail = b""
        self._size_sent = None  # the rebuilt guest learns the size too
        if self._size_fd is not None:
            self._send_size()

    def _output_fd(self) -> int | None:
        """stdout's descriptor if it is a terminal."""
        try:
            out = self._stdout if self._stdout is not None else sys.stdout
            fd = out.fileno()
            return fd if os.isatty(fd) else None
        except (OSError, ValueError, AttributeError):
            return None

    def _output_on_terminal(self) -> bool:
        """Whether someone can see the session: stdout or stderr is a
        terminal. Not so under a harness that captures both (a test run from
        a terminal), where the terminal on stdin is not ours to take."""
        for stream in (self._stdout if self._stdout is not None else sys.stdout, sys.stderr):
            try:
                if stream is not None and os.isatty(stream.fileno()):
                    return True
            except (OSError, ValueError, AttributeError):
                pass
        return False

    @staticmethod
    def _owns_terminal(fd: int) -> bool:
        """False when we are a background job of that terminal (raw mode
        would stop us with SIGTTOU, reading with SIGTTIN)."""
        try:
            return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:  # not our controlling terminal: no job control applies
            return True

    def _enter_raw_mode(self, fd: int) -> None:
        self._saved_modes = termios.tcgetattr(fd)
        self.interactive = True
        atexit.register(self._restore)
        if threading.current_thread() is threading.main_thread():
            for signum in (*_SIGNAL_EXITS, signal.SIGTSTP, signal.SIGCONT):
                self._saved_handlers[signum] = signal.signal(signum, self._on_signal)
        tty.setraw(fd, termios.TCSANOW)

    def _restore(self) -> None:
        """Put the terminal and the signal handlers back (idempotent)."""
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)
        self._saved_handlers.clear()
        modes, self._saved_modes = self._saved_modes, None
        if modes is not None:
            atexit.unregister(self._restore)
            try:
                termios.tcsetattr(self.fd, termios.TCSANOW, modes)
            except (OSError, termios.error):  # the terminal is gone
                pass

    def _on_signal(self, signum: int, frame) -> None:
        if self._closing or self._saved_modes is None:
            return
        if signum == signal.SIGTSTP:
            # Stop as asked, but with the terminal as the shell expects it.
            modes = self._saved_modes
            termios.tcsetattr(self.fd, termios.TCSANOW, modes)
            signal.signal(signal.SIGTSTP, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTSTP)  # (the kernel drops it in an orphaned process group)
            signal.signal(signal.SIGTSTP, self._on_signal)
            signum = signal.SIGCONT  # continued, or never stopped: raw mode again
        if signum == signal.SIGCONT:
            try:
                tty.setraw(self.fd, termios.TCSANOW)
            except (OSError, termios.error):
                pass
            self._on_winch(signum, frame)  # the window may have changed meanwhile
            return
        status, reason = _SIGNAL_EXITS[signum]
        raise Detached(reason, status)


class _SignalExits:
    """SIGTERM and SIGHUP as `Detached`, for the whole of a session."""

    def __init__(self) -> None:
        self.raised = False  # only the first signal raises: a second must not cut the clean-up short
        self.held = 0

    def on_signal(self, signum: int, frame) -> None:
        if self.raised or self.held:
            return
        self.raised = True
        status, reason = _SIGNAL_EXITS[signum]
        raise Detached(reason, status)


_signal_exits: _SignalExits | None = None


def end_on_signals() -> None:
    """From now on, for the rest of this process (`pvhvm boot`, `pvhvm
    restore`): SIGTERM and SIGHUP raise `Detached` (143, 129) on the main
    thread, as they do while a terminal is attached in raw mode, so that a
    session without one (piped input, building, saving) unwinds too:
    domain closed, passt stopped, the xenstore socket and half-written save
    files removed. SIGINT stays KeyboardInterrupt."""
    global _signal_exits
    if threading.current_thread() is not threading.main_thread():
        return
    if _signal_exits is None:
        _signal_exits = _SignalExits()
    for signum in _SIGNAL_EXITS:
        signal.signal(signum, _signal_exits.on_signal)


@contextmanager
def signals_held() -> Iterator[None]:
    """No `Detached` from SIGTERM or SIGHUP inside the block (the clean-up
    at the end of a session, which must not stop half way); they are
    ignored, the session is ending anyway."""
    exits = _signal_exits
    if exits is None:
        yield
        return
    exits.held += 1
    try:
        yield
    finally:
        exits.held -= 1


def attach_console(dom: Domain, terminal: Terminal):
    """`terminal.attach(dom)`: a context manager; see Terminal."""
    return terminal.attach(dom)


__all__ = ["Terminal", "Detached", "attach_console", "end_on_signals", "signals_held", "parse_escape", "key_name",
           "ESCAPE", "EXIT_DETACHED", "EXIT_HANGUP", "EXIT_TERMINATED"]
