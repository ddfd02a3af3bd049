"""Scripting a guest's shell through its console: run a command, get its
output and exit status back exactly, whatever the terminal echoes."""

from __future__ import annotations

from .api import Domain


class GuestShell:
    """A busybox (or any POSIX) shell on the guest's hvc0. Each command is
    bracketed by two markers that its own echo cannot match (quotes split
    them on the command line), so output and status are read back exactly."""

    def __init__(self, dom: Domain) -> None:
        self.dom = dom
        self.status: int | None = None

    def start(self, command: str, timeout: float = 60) -> None:
        """Send `command` and wait until it has started (for background work)."""
        self.dom.send(f'echo =BE""GIN=; {command}; echo =R""C=$?=\n')
        self.dom.expect(r"=BEGIN=\r?\n", timeout)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        """Wait for the started command to end: (exit status, output not
        consumed by an `expect` since it started)."""
        begin = self.dom._expect_pos
        # A plain marker, not "(.*?)=RC=": a lazy prefix makes every search
        # quadratic in the output, and a long output is searched many times.
        m = self.dom.expect(rb"=RC=(\d+)=", timeout)
        self.status = int(m.group(1))
        # `begin` counts from the console's first byte, m from the kept output's.
        kept_from = self.dom._expect_pos - m.end()
        out = bytes(m.string[max(begin - kept_from, 0) : m.start()])
        return self.status, out.decode(errors="replace").replace("\r", "")

    def run(self, command: str, timeout: float = 60) -> str:
        """Run `command`; return what it printed (its status is in `status`)."""
        self.start(command, timeout)
        return self.finish(timeout)[1]

    def ok(self, command: str, timeout: float = 60) -> str:
        """Run `command`, which must exit 0; return what it printed."""
        out = self.run(command, timeout)
        if self.status != 0:
            raise AssertionError(f"`{command}` exited {self.status}: {out}")
        return out
