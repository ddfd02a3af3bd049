"""`pvhvm boot`'s console both ways (pvhvm.terminal): a shell in the default
guest driven from a pseudo-terminal, as a person at a terminal would, and
from pipes, /dev/null and a closed stdin, as scripts and CI do."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

import io

from pvhvm.terminal import CURSOR_QUERY, EXIT_DETACHED, Terminal, key_name, parse_escape

PVHVM = [sys.executable, "-m", "pvhvm"]
MARKER = re.compile(rb"PVHVM-INIT-OK uptime=[0-9.]+")
PROMPT = re.compile(rb"/ # ")
BOOT_TIMEOUT = 300  # seconds; a boot takes about 8 here, more on a loaded machine


@pytest.fixture(scope="module")
def guest():
    from pvhvm.images import prepare_default_guest

    return prepare_default_guest()


def _make_controlling_tty() -> None:
    # In the child, after setsid (start_new_session): the pty becomes the
    # session's terminal and the child its foreground job, as under a shell.
    fcntl.ioctl(0 if os.isatty(0) else 1, termios.TIOCSCTTY, 0)


class PtySession:
    """A command on a fresh pseudo-terminal (its controlling terminal),
    driven through the master end like expect(1). The slave stays open here
    too, to read the terminal's modes as the child sees them."""

    def __init__(self, args: list[str], size: tuple[int, int] = (24, 80), stdin=None) -> None:
        self.master, self.slave = os.openpty()
        self.resize(*size)
        self.modes_before = termios.tcgetattr(self.slave)
        self.output = bytearray()
        self._pos = 0
        self.proc = subprocess.Popen(args, stdin=self.slave if stdin is None else stdin, stdout=self.slave,
                                     stderr=self.slave, start_new_session=True, preexec_fn=_make_controlling_tty)

    def resize(self, rows: int, cols: int) -> None:
        """As a terminal window does: the kernel sends SIGWINCH to the
        terminal's foreground job."""
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def pending_input(self) -> bytes:
        """What the terminal holds for its next reader (the host shell after
        pvhvm), read without waiting for a line."""
        modes = termios.tcgetattr(self.slave)
        raw = list(modes)
        raw[3] &= ~termios.ICANON
        raw[6] = list(raw[6])
        raw[6][termios.VMIN], raw[6][termios.VTIME] = 0, 0
        termios.tcsetattr(self.slave, termios.TCSANOW, raw)
        try:
            return os.read(self.slave, 4096)
        finally:
            termios.tcsetattr(self.slave, termios.TCSANOW, modes)

    @property
    def modes(self) -> list:
        return termios.tcgetattr(self.slave)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:
            return False
        self.output += data
        return bool(data)

    def expect(self, pattern: re.Pattern, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.output, self._pos)
            if m:
                self._pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(min(left, 0.5)) and self.proc.poll() is not None):
                tail = bytes(self.output[-3000:]).decode(errors="replace")
                raise AssertionError(f"no {pattern.pattern!r} (exit {self.proc.poll()}); output ends:\n{tail}")

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0.05):  # what it wrote last
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running after {timeout} s:\n{bytes(self.output[-2000:]).decode(errors='replace')}")
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def pty_boot():
    sessions: list[PtySession] = []

    def start(*args: str, **kw) -> PtySession:
        s = PtySession([*PVHVM, "boot", *args], **kw)
        sessions.append(s)
        return s

    yield start
    for s in sessions:
        s.close()


def _is_raw(modes: list) -> bool:
    lflag = modes[3]
    return not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)


# --------------------------------------------------------------------------- escape key parsing


@pytest.mark.parametrize("spec, key", [("^]", b"\x1d"), ("^a", b"\x01"), ("^A", b"\x01"), ("^?", b"\x7f"),
                                       ("^@", b"\x00"), ("~", b"~"), ("^", b"^"), ("none", None), ("NONE", None)])
def test_parse_escape(spec, key):
    assert parse_escape(spec) == key


@pytest.mark.parametrize("spec", ["", "^1", "ab", "é", "^]]"])
def test_parse_escape_rejects(spec):
    with pytest.raises(ValueError):
        parse_escape(spec)


def test_key_names():
    assert key_name(b"\x1d") == "Ctrl-]" and key_name(b"\x01") == "Ctrl-A" and key_name(b"~") == "~"


def test_bad_escape_char_is_bad_input():
    p = subprocess.run([*PVHVM, "boot", "--escape-char", "^1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "not a key" in p.stderr


def test_help_documents_the_console():
    p = subprocess.run([*PVHVM, "boot", "--help"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0
    assert "--escape-char" in p.stdout and "Ctrl-]" in p.stdout and "detached" in p.stdout
    assert "/dev/null" in p.stdout and "130" in p.stdout


# --------------------------------------------------------------------------- cursor queries, no guest


def test_cursor_queries_are_dropped_from_output_not_on_a_terminal():
    out = io.BytesIO()
    term = Terminal(stdout=out)
    for chunk in (b"/ # \x1b[6n", b"ls\r\n\x1b[1;32mbin\x1b[0m\r\n/ # \x1b", b"[6", b"n", b"x \x1b[",
                  b"1m bold\x1b[6\x1b[6nn"):
        term.write(chunk)
    assert out.getvalue() == b"/ # ls\r\n\x1b[1;32mbin\x1b[0m\r\n/ # x \x1b[1m bold"
    # What might have begun a query is passed on once it is clearly not one.
    term.write(b"\x1b[6")
    assert out.getvalue().endswith(b"bold")
    term.write(b"m!")
    assert out.getvalue().endswith(b"bold\x1b[6m!")


# --------------------------------------------------------------------------- a terminal


@pytest.mark.slow
def test_interactive_shell_on_a_terminal(guest, pty_boot):
    s = pty_boot()
    s.expect(MARKER, BOOT_TIMEOUT)
    s.expect(PROMPT)
    during = s.modes
    assert _is_raw(during), "pvhvm did not put its terminal in raw mode"

    s.send(b"echo $((6*7))\r")  # Enter sends CR, as a terminal in raw mode does
    s.expect(re.compile(rb"\r\n42\r\n"))
    s.expect(PROMPT)
    s.send(b"uname -r\r")
    s.expect(re.compile(rb"\r\n" + re.escape(guest.kernel_version.encode()) + rb"\r\n"))
    assert guest.kernel_version.startswith("6.1.")
    s.expect(PROMPT)
    # Ctrl-C goes to the guest, not to pvhvm: the console is the shell's
    # controlling terminal, so it interrupts the foreground job.
    s.send(b"sleep 30\r")
    s.expect(re.compile(rb"sleep 30\r\n"))
    time.sleep(1)
    t0 = time.monotonic()
    s.send(b"\x03")
    s.expect(PROMPT, 20)
    assert time.monotonic() - t0 < 20
    s.send(b"echo rc=$?\r")
    s.expect(re.compile(rb"\r\nrc=130\r\n"))
    s.expect(PROMPT)
    s.send(b"poweroff -f\r")

    assert s.wait(60) == 0
    out = bytes(s.output)
    assert b"job control turned off" not in out and b"can't access tty" not in out
    assert b"pvhvm: domain shutdown (poweroff)" in out
    assert s.modes == s.modes_before, "terminal modes not restored"
    assert not _is_raw(s.modes)


SIZE_LINE = re.compile(rb"\r\n(\d+) (\d+)\r\n")


def _guest_tty_size(s: PtySession, want: tuple[int, int], timeout: float = 30) -> tuple[int, int]:
    """`stty size` in the guest's shell until it says `want` (a resize
    reaches the guest a moment after the terminal's), or the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        s.send(b"stty size\r")
        m = s.expect(SIZE_LINE)
        s.expect(PROMPT)
        size = (int(m.group(1)), int(m.group(2)))
        if size == want or time.monotonic() > deadline:
            return size
        time.sleep(0.5)


@pytest.mark.slow
def test_the_guest_shell_gets_the_terminal_size(guest, pty_boot):
    s = pty_boot(size=(40, 132))
    s.expect(MARKER, BOOT_TIMEOUT)
    s.expect(PROMPT)
    # Set before the shell started: its first answer is already right.
    s.send(b"stty size\r")
    assert s.expect(SIZE_LINE).group(1, 2) == (b"40", b"132")
    s.expect(PROMPT)
    s.resize(50, 100)
    assert _guest_tty_size(s, (50, 100)) == (50, 100)
    # The guest's foreground job is told, as on a real terminal (SIGWINCH).
    s.send(b"sh -c 'trap \"echo WINCH \\$(stty size)\" WINCH; echo READY; while :; do sleep 0.1; done'\r")
    s.expect(re.compile(rb"\r\nREADY\r\n"))
    s.resize(30, 90)
    s.expect(re.compile(rb"WINCH 30 90\r\n"))
    s.send(b"\x03")
    s.expect(PROMPT)
    s.send(b"poweroff -f\r")
    assert s.wait(60) == 0


@pytest.mark.slow
def test_a_late_cursor_report_does_not_reach_the_host_shell(guest, pty_boot):
    """The session ends (here Ctrl-]) just after the guest's prompt asked
    for the cursor position, and the terminal answers a moment later:
    pvhvm reads the answer rather than leave it to the host shell."""
    s = pty_boot()
    s.expect(MARKER, BOOT_TIMEOUT)
    s.expect(PROMPT)
    s.send(b"echo hi\r")
    s.expect(re.compile(rb"\r\nhi\r\n"))
    s.expect(re.compile(re.escape(CURSOR_QUERY)))
    s.send(b"\x1d")
    time.sleep(0.1)
    s.send(b"\x1b[12;5R")
    assert s.wait(15) == EXIT_DETACHED
    assert s.modes == s.modes_before
    assert s.pending_input() == b""


@pytest.mark.slow
def test_piped_input_on_a_terminal(guest):
    """stdin a pipe, stdout a terminal: no cursor query reaches the
    terminal (we would not read its answer: the host shell would), and the
    guest gets the terminal's size."""
    s = PtySession([*PVHVM, "boot"], size=(33, 111), stdin=subprocess.PIPE)
    try:
        s.proc.stdin.write(b"stty size\n")
        s.proc.stdin.close()
        assert s.wait(BOOT_TIMEOUT) == 0
        out = bytes(s.output)
        assert MARKER.search(out)
        assert b"\n33 111\r" in out  # (not raw: the terminal turns \n into \r\n)
        assert CURSOR_QUERY not in out
        assert s.pending_input() == b""
    finally:
        s.close()


@pytest.mark.slow
def test_escape_key_detaches(guest, pty_boot):
    s = pty_boot()
    s.expect(MARKER, BOOT_TIMEOUT)
    s.expect(PROMPT)
    assert _is_raw(s.modes)
    t0 = time.monotonic()
    s.send(b"\x1d")
    assert s.wait(15) == EXIT_DETACHED == 130
    assert time.monotonic() - t0 < 5
    assert b"pvhvm: detached (Ctrl-])" in s.output
    assert s.modes == s.modes_before, "terminal modes not restored"


@pytest.mark.slow
def test_other_escape_char_and_ctrl_bracket_goes_to_guest(guest, pty_boot):
    s = pty_boot("--escape-char", "^B")
    s.expect(MARKER, BOOT_TIMEOUT)
    s.expect(PROMPT)
    s.send(b"\x1d")  # no longer special: the guest's line editor gets it
    s.send(b"echo still-$((2+3))\r")
    s.expect(re.compile(rb"\r\nstill-5\r\n"))
    s.expect(PROMPT)
    s.send(b"\x02")
    assert s.wait(15) == 130
    assert b"pvhvm: detached (Ctrl-B)" in s.output
    assert s.modes == s.modes_before


@pytest.mark.slow
@pytest.mark.parametrize("signum, status, message", [
    (signal.SIGTERM, 143, b"pvhvm: terminated (SIGTERM)"),
    (signal.SIGHUP, 129, b"pvhvm: hung up (SIGHUP)"),
    (signal.SIGINT, 130, b"pvhvm: interrupted"),
])
def test_signals_restore_the_terminal(guest, pty_boot, signum, status, message):
    """Signals from outside (in raw mode the keys do not make them) end
    pvhvm during the boot with the terminal put back."""
    s = pty_boot()
    s.expect(re.compile(rb"Linux version"), BOOT_TIMEOUT)
    assert _is_raw(s.modes)
    s.proc.send_signal(signum)
    assert s.wait(15) == status
    assert message in s.output
    assert s.modes == s.modes_before, "terminal modes not restored"


@pytest.mark.slow
def test_terminal_on_stdin_with_output_captured(guest):
    """Run from a terminal by a harness that captures stdout and stderr (a
    test run from a shell): the terminal is not taken over, stdin counts as
    empty and the default guest powers off after the marker."""
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        p = subprocess.Popen([*PVHVM, "boot"], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, preexec_fn=_make_controlling_tty)
        out, err = p.communicate(timeout=BOOT_TIMEOUT)
        assert p.returncode == 0, err.decode()[-2000:]
        assert MARKER.search(out)
        assert termios.tcgetattr(slave) == before
        os.set_blocking(master, False)
        with pytest.raises(BlockingIOError):  # nothing was written to the terminal
            os.read(master, 1024)
    finally:
        os.close(master)
        os.close(slave)


# --------------------------------------------------------------------------- no terminal


@pytest.mark.slow
def test_piped_commands(guest):
    p = subprocess.run([*PVHVM, "boot"], input=b"echo piped-$((1+1))\n", capture_output=True,
                       timeout=BOOT_TIMEOUT)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert MARKER.search(p.stdout)
    assert b"\r\npiped-2\r\n" in p.stdout  # the echoed command line says piped-$((1+1))
    assert CURSOR_QUERY not in p.stdout  # unanswerable, and garbage in a log
    assert p.stdout.index(b"piped-2") > MARKER.search(p.stdout).end()
    assert b"pvhvm: domain shutdown (poweroff)" in p.stderr


@pytest.mark.slow
def test_stdin_from_dev_null(guest):
    p = subprocess.run([*PVHVM, "boot"], stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert MARKER.search(p.stdout)


@pytest.mark.slow
def test_stdin_closed(guest):
    # As in CI jobs that run with no stdin at all (fd 0 closed).
    p = subprocess.run(["sh", "-c", 'exec "$@" <&-', "sh", *PVHVM, "boot"], capture_output=True,
                       timeout=BOOT_TIMEOUT)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert MARKER.search(p.stdout)


# --------------------------------------------------------------------------- the API


@pytest.mark.slow
def test_console_size_through_the_api(guest, tmp_path):
    """Domain.set_console_size before the boot, while the shell runs, and
    after a restore (whose guest was saved waiting for the next size)."""
    import pvhvm
    from pvhvm.api import CONSOLE_SIZE_NODE
    from pvhvm.shell import GuestShell
    from pvhvm.xenstore.store import format_perm

    def size_reaches(dom: pvhvm.Domain, sh: GuestShell, want: str) -> str:
        deadline = time.monotonic() + 30
        while (got := sh.ok("stty size").strip()) != want and time.monotonic() < deadline:
            dom.run_until(lambda: False, 0.2)
        return got

    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0 pvhvm.shell", memory_mib=256)
    for bad in ((0, 80), (24, 65536), (24, "80"), (True, 80)):
        with pytest.raises(ValueError):
            dom.set_console_size(*bad)
    dom.set_console_size(40, 132)
    home = f"/local/domain/{dom.domid}"
    assert dom.store.read(0, f"{home}/{CONSOLE_SIZE_NODE}") == b"40 132"
    # The guest may read it, not write it (dom0 wrote it in the console's directory).
    assert [format_perm(p) for p in dom.store.get_perms(0, f"{home}/{CONSOLE_SIZE_NODE}")] == ["n0", f"r{dom.domid}"]
    dom.expect("PVHVM-INIT-OK", BOOT_TIMEOUT)
    dom.expect("# ", 60)
    sh = GuestShell(dom)
    assert sh.ok("stty size").strip() == "40 132"
    dom.set_console_size(50, 100)
    assert size_reaches(dom, sh, "50 100") == "50 100"

    dom.save(tmp_path / "shell.sav")
    dom.close()
    r = pvhvm.Domain.restore(tmp_path / "shell.sav")
    try:
        r.set_console_size(33, 77)
        assert size_reaches(r, GuestShell(r), "33 77") == "33 77"
    finally:
        r.close()
