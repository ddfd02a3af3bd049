"""Save and restore on the command line: `pvhvm boot --save-on-suspend`,
SIGUSR1 with `--save-to`, `pvhvm restore` (and what it says of files it
cannot use), and `pvhvm boot --snapshot` for the default guest."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pvhvm.savefile import PAGE

PVHVM = [sys.executable, "-m", "pvhvm"]
ID_LINE = re.compile(rb"VMGENID ([0-9a-f]{32})\n")
SAVED_LINE = re.compile(r"^pvhvm: guest suspended; saved to (\S+) \(([0-9.]+) MiB on disk\); "
                        r"`pvhvm restore \1` continues it$", re.M)


def pvhvm(*args, timeout=120, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([*PVHVM, *map(str, args)], capture_output=True, timeout=timeout, **kw)


def one_line_error(p, needle):
    stderr = p.stderr.decode()
    assert p.returncode == 2, (p.stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pvhvm: ") and needle in lines[0], stderr
    assert "Traceback" not in stderr


class Running:
    """A pvhvm process whose stdout and stderr are read as they come."""

    def __init__(self, *args) -> None:
        self.proc = subprocess.Popen([*PVHVM, *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.out = {self.proc.stdout.fileno(): bytearray(), self.proc.stderr.fileno(): bytearray()}
        self.stdout, self.stderr = self.out.values()

    def expect(self, stream: bytearray, pattern: re.Pattern, timeout: float = 60, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (m := pattern.search(stream, start)):
            left = deadline - time.monotonic()
            fds = [fd for fd in self.out if fd >= 0]
            ready = select.select(fds, [], [], max(0.0, min(left, 0.5)))[0] if fds else []
            for fd in ready:
                data = os.read(fd, 65536)
                self.out[fd] += data
            if left <= 0 or (not ready and self.proc.poll() is not None):
                raise AssertionError(f"no {pattern.pattern!r} (exit {self.proc.poll()}); stdout:\n"
                                     f"{self.stdout.decode(errors='replace')[-3000:]}\nstderr:\n"
                                     f"{self.stderr.decode(errors='replace')[-3000:]}")
        return m

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.communicate(timeout=30)


# --- a guest that suspends itself ----------------------------------------------


@pytest.fixture(scope="module")
def suspended(guests, tmp_path_factory):
    """The suspend guest booted with --save-on-suspend: (the run, the file)."""
    save = tmp_path_factory.mktemp("suspend") / "guest.save"
    p = pvhvm("boot", guests["suspend"], "--memory", "32", "--save-on-suspend", save)
    return p, save


def test_boot_saves_a_suspending_guest(suspended):
    p, save = suspended
    stderr = p.stderr.decode()
    assert p.returncode == 0, (p.stdout, stderr)
    assert re.match(rb"SUSPEND-GUEST start n=\d+\n$", p.stdout), p.stdout
    m = SAVED_LINE.search(stderr)
    assert m and m[1] == str(save), stderr
    assert float(m[2]) > 0 and save.stat().st_size > 32 << 20, stderr
    assert "Traceback" not in stderr


def test_restore_continues_a_suspended_guest(suspended):
    _, save = suspended
    started = re.match(rb"SUSPEND-GUEST start n=(\d+)", suspended[0].stdout)[1].decode()
    for _ in range(2):  # the file stays as it was: restore it twice
        p = pvhvm("restore", save)
        out = p.stdout.decode()
        assert p.returncode == 0, (out, p.stderr)
        assert out.startswith("SUSPEND-GUEST resumed rc=1\n"), out
        assert f"the counter is intact (n={started}, now {started})" in out, out
        assert [line for line in out.splitlines() if line.startswith("FAIL")] == [], out
        assert re.search(r"^VERDICT: PASS \(4 checks\)$", out, re.M), out
        assert p.stderr.decode().strip().splitlines() == ["pvhvm: domain shutdown (poweroff)"], p.stderr


def test_suspend_without_a_file_saves_nothing(guests, tmp_path):
    # No network: what pvhvm says about passt's pings would be a line more.
    p = pvhvm("boot", guests["suspend"], "--memory", "32", "--net", "none", cwd=tmp_path)
    assert p.returncode == 4, p
    assert p.stderr.decode().strip().splitlines() == [
        "pvhvm: guest suspended; nothing was saved (use --save-on-suspend FILE)"], p.stderr
    assert list(tmp_path.iterdir()) == []


def test_save_paths_are_checked_before_the_guest_runs(guests, tmp_path):
    for option in ("--save-on-suspend", "--save-to"):
        one_line_error(pvhvm("boot", guests["suspend"], option, tmp_path / "none" / "x"), "no such directory")
        one_line_error(pvhvm("boot", guests["suspend"], option, tmp_path), "is a directory")
        one_line_error(pvhvm("restore", tmp_path / "x", option, tmp_path), "is a directory")


# --- files restore cannot use ------------------------------------------------------


def _corrupt(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x40]) + data[offset + 1:]


def test_restore_refuses_a_missing_file(tmp_path):
    one_line_error(pvhvm("restore", tmp_path / "gone.save"), "No such file or directory")


@pytest.mark.parametrize("make, needle", [
    (lambda d: b"#!/bin/sh\necho not a save\n", "not a pvhvm save file"),
    (lambda d: b"", "not a pvhvm save file"),
    (lambda d: d[:100], "truncated"),
    (lambda d: d[: len(d) - 1], "truncated"),
    (lambda d: _corrupt(d, 24), "damaged (the header's checksum"),
    (lambda d: _corrupt(d, len(d) - 2), "damaged (the domain record's checksum"),
], ids=["script", "empty", "header-only", "one-byte-short", "header", "domain-record"])
def test_restore_refuses_a_bad_file(suspended, tmp_path, make, needle):
    _, save = suspended
    bad = tmp_path / "bad.save"
    bad.write_bytes(make(save.read_bytes()))
    one_line_error(pvhvm("restore", bad), needle)


def test_restore_refuses_damaged_ram(suspended, tmp_path):
    # A page of RAM the guest wrote (its first page: the kernel's code), one
    # bit changed: the core's CRC of the RAM image catches it on restore.
    _, save = suspended
    data = save.read_bytes()
    first_page = PAGE + 0x100000
    assert any(data[first_page : first_page + PAGE])
    bad = tmp_path / "bad.save"
    bad.write_bytes(_corrupt(data, first_page + 16))
    one_line_error(pvhvm("restore", bad), "the RAM image is damaged")


# --- SIGUSR1 on a running guest ------------------------------------------------------


def test_sigusr1_saves_a_running_guest(guests, tmp_path):
    """The vmgenid guest keeps running until its ID has changed three times;
    saved on SIGUSR1 while it waits, it goes on, and its restore sees a new
    ID (a restored domain gets one) and says so."""
    save = tmp_path / "running.save"
    run = Running("boot", guests["vmgenid"], "--memory", "64", "--save-to", save)
    try:
        first = run.expect(run.stdout, ID_LINE)
        run.proc.send_signal(signal.SIGUSR1)
        m = run.expect(run.stderr, re.compile(rb"pvhvm: saved to (\S+) \(([0-9.]+) MiB on disk\); the guest goes on"))
        assert m[1].decode() == str(save) and save.is_file()
        time.sleep(0.3)
        assert run.proc.poll() is None, run.stderr  # the guest goes on
        assert not ID_LINE.search(run.stdout, first.end())  # with the same ID
    finally:
        run.stop()
    restored = Running("restore", save, "--timeout", "50")
    try:
        new = restored.expect(restored.stdout, ID_LINE)
        assert new[1] != first[1], restored.stdout
        # Nothing from before the save is printed again: the console history starts empty.
        assert b"VMGENID " + first[1] not in restored.stdout and b"RSDP" not in restored.stdout
    finally:
        restored.stop()
    assert b"Traceback" not in run.stderr + restored.stderr
    # --timeout bounds a restored run as it does a boot.
    p = pvhvm("restore", save, "--timeout", "1")
    assert p.returncode == 8, p
    assert p.stderr.decode().strip().splitlines()[-1] == "pvhvm: domain timeout: no shutdown within 1.0 s", p.stderr


def test_sigusr1_without_save_to_says_so(guests):
    run = Running("boot", guests["vmgenid"], "--memory", "64")
    try:
        run.expect(run.stdout, ID_LINE)
        run.proc.send_signal(signal.SIGUSR1)
        run.expect(run.stderr, re.compile(rb"pvhvm: SIGUSR1: nothing was saved \(start pvhvm with --save-to FILE"))
        time.sleep(0.3)
        assert run.proc.poll() is None, run.stderr  # the guest goes on
    finally:
        run.stop()


# --- boot --snapshot: the default guest -------------------------------------------------


@pytest.mark.slow
def test_snapshot_of_the_default_guest():
    """The first `boot --snapshot` with some settings boots and saves the
    guest at its shell prompt; the next one restores it and its shell
    answers at once. Piped input typed during the first boot reaches the
    guest only after the save (the snapshot has read none of it)."""
    from pvhvm.images import prepare_default_guest

    prepare_default_guest()
    # A command line of our own: a snapshot no other run has made.
    args = ["boot", "--snapshot", "--net", "none", "--cmdline", f"console=hvc0 pvhvm.test={uuid.uuid4().hex}"]
    saved_line = re.compile(r"^pvhvm: snapshot saved to (\S+) \(([0-9.]+) MiB on disk\)", re.M)
    snapshot = None
    try:
        t0 = time.monotonic()
        first = pvhvm(*args, input=b"echo ok\n", stdin=None, timeout=600)
        first_time = time.monotonic() - t0
        stderr = first.stderr.decode()
        m = saved_line.search(stderr)
        assert m, stderr
        snapshot = Path(m[1])
        assert snapshot.is_file() and snapshot.parent.name == "snapshots", stderr
        assert first.returncode == 0, (first.stdout[-3000:], stderr)
        assert b"PVHVM-INIT-OK" in first.stdout and re.search(rb"\nok\r?\n", first.stdout), first.stdout[-3000:]
        saved = snapshot.stat().st_mtime_ns

        t0 = time.monotonic()
        second = pvhvm(*args, input=b"echo ok\n", stdin=None, timeout=600)
        second_time = time.monotonic() - t0
        out = second.stdout
        assert second.returncode == 0, (out[-3000:], second.stderr)
        assert b"PVHVM-INIT-OK" not in out, out[-3000:]  # no boot: restored at the prompt
        assert re.search(rb"\nok\r?\n", out), out
        assert second.stderr.decode().strip().splitlines() == ["pvhvm: domain shutdown (poweroff)"], second.stderr
        assert snapshot.stat().st_mtime_ns == saved  # used, not made again
        assert second_time < first_time, (first_time, second_time)
    finally:
        if snapshot is not None:
            snapshot.unlink(missing_ok=True)
