"""Debian's unmodified Linux 6.1 cloud kernel boots as a PVH domU to /init.

The kernel and busybox come from Debian's packages, fetched and cached by
pvhvm.images (the first run downloads about 30 MB)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

import pvhvm
from pvhvm.images import prepare_default_guest

pytestmark = pytest.mark.slow

BAD = re.compile(r"\b(BUG|WARNING|Oops|Call Trace|panic)\b")


@pytest.fixture(scope="module")
def guest():
    return prepare_default_guest()


CLOCK_SWITCH = b"clocksource: Switched to clocksource xen"


@pytest.fixture(scope="module")
def booted(guest, tmp_path_factory):
    seen: dict[str, float] = {}
    buf = bytearray()

    def console(data: bytes) -> None:
        buf.extend(data)
        now = time.monotonic()
        if CLOCK_SWITCH in buf and "switch" not in seen:
            seen["switch"] = now
        if b"PVHVM-INIT-OK" in buf and "marker" not in seen:
            seen["marker"] = now

    # Profiled as well (the profiler's Linux test below): its ticks are
    # part of what this boot must cope with.
    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0 earlyprintk=xen",
                       memory_mib=256, console=console, profile=tmp_path_factory.mktemp("profile") / "boot.folded")
    outcome = dom.run(timeout=600)
    seen["start"] = dom.started_at
    return dom, outcome, dom.console_output.decode(errors="replace"), seen


def test_reaches_init_and_powers_off(booted):
    dom, outcome, log, _ = booted
    assert "PVHVM-INIT-OK" in log, log[-3000:]
    assert outcome.kind is pvhvm.OutcomeKind.SHUTDOWN and outcome.reason is pvhvm.ShutdownReason.POWEROFF, outcome


def test_linux_sees_xen_pvh(booted):
    _, _, log, _ = booted
    assert "Booting kernel on Xen PVH" in log
    assert "Xen version: 4.19" in log
    assert "xen:events: Using FIFO-based ABI" in log
    assert "Xen HVM callback vector for event delivery is enabled" in log
    assert "clocksource: Switched to clocksource xen" in log
    assert "printk: console [hvc0] enabled" in log
    assert "Grant table initialized" in log


def test_two_level_events_when_linux_is_told_so(guest):
    """With `xen.fifo_events=0` Linux keeps the 2-level ABI and boots as well."""
    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0 xen.fifo_events=0", memory_mib=256)
    outcome = dom.run(timeout=600)
    log = dom.console_output.decode(errors="replace")
    assert "xen:events: Using 2-level ABI" in log and "FIFO" not in log, log[-3000:]
    assert "PVHVM-INIT-OK" in log and [line for line in log.splitlines() if BAD.search(line)] == []
    assert outcome.kind is pvhvm.OutcomeKind.SHUTDOWN and outcome.reason is pvhvm.ShutdownReason.POWEROFF, outcome


def test_log_is_clean(booted):
    _, _, log, _ = booted
    bad = [line for line in log.splitlines() if BAD.search(line)]
    assert bad == []


def test_guest_time_runs_at_real_speed(booted):
    """From the switch to the xen clocksource to the marker, the guest's
    uptime advances as the host's wall clock does (within 10%).

    Earlier, Linux's clock is jiffies-based and stands still while it runs
    with interrupts off before its Xen timer exists (alternatives patching):
    under emulation that window lasts a while, so uptime since boot trails
    the wall clock by a fixed amount that has nothing to do with pvclock."""
    _, _, log, seen = booted
    uptime = float(re.search(r"PVHVM-INIT-OK uptime=([0-9.]+)", log).group(1))
    switched = float(re.search(r"\[\s*([0-9.]+)\] " + CLOCK_SWITCH.decode(), log).group(1))
    guest = uptime - switched
    wall = seen["marker"] - seen["switch"]
    assert wall > 0.5  # long enough for 10% to mean something (uptime has 10 ms steps)
    assert abs(guest - wall) / wall < 0.10, (guest, wall)
    # And the whole boot: uptime trails the wall clock by the frozen window only.
    assert uptime <= seen["marker"] - seen["start"] + 0.05


def test_cli_default_guest(guest, tmp_path):
    """`pvhvm boot` with no kernel boots the default guest to its marker;
    profiled and shown as the README's profiler section does it."""
    p = subprocess.run([sys.executable, "-m", "pvhvm", "boot", "--profile", "boot.folded"], capture_output=True,
                       timeout=600, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert b"PVHVM-INIT-OK" in p.stdout
    assert b"pvhvm: profile of " in p.stderr
    p = subprocess.run([sys.executable, "-m", "pvhvm", "profile", "boot.folded", "--svg", "boot.svg"],
                       capture_output=True, timeout=120, cwd=tmp_path, text=True)
    assert p.returncode == 0, p.stderr
    assert "first guest instruction → first hypercall" in p.stdout and "clear_bss" in p.stdout, p.stdout
    assert (tmp_path / "boot.svg").read_text().startswith("<?xml")


def test_host_requests_a_clean_poweroff(guest):
    """control/shutdown from the host, as `xl shutdown` writes it, powers the
    guest off through Linux's own orderly shutdown."""
    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0 pvhvm.shell", memory_mib=256)
    dom.expect("PVHVM-INIT-OK", 120)
    dom.expect("# ", 30)
    dom.request_shutdown("poweroff")
    outcome = dom.run(timeout=60)
    assert outcome.kind is pvhvm.OutcomeKind.SHUTDOWN and outcome.reason is pvhvm.ShutdownReason.POWEROFF
    assert "reboot: Power down" in dom.console_output.decode(errors="replace")


def test_guest_panic_is_a_crash_with_a_report(guest):
    """A kernel panic reaches Xen as SHUTDOWN_crash (Linux's Xen panic
    notifier); `pvhvm boot` reports registers and the last hypercalls and
    exits 1."""
    init = "#!/bin/sh\nmount -t proc proc /proc\necho PANIC-NOW\necho c > /proc/sysrq-trigger\nsleep 60\n"
    from pvhvm.images import prepare_default_guest as prepare

    crashing = prepare(init_script=init)
    p = subprocess.run([sys.executable, "-m", "pvhvm", "boot", str(crashing.vmlinux), "--initrd", str(crashing.initrd),
                        "--cmdline", "console=hvc0"], capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    assert p.returncode == 1, err[-2000:]
    assert "PANIC-NOW" in out and "Kernel panic" in out
    assert "shutdown (crash)" in err
    assert re.search(r"rip: [0-9a-f]{16}", err) and "last hypercalls:" in err
    assert "sched_op(shutdown" in err


@pytest.mark.parametrize("reboot, status", [(False, 0), (True, 3)])
def test_cli_shutdown_through_the_xenstore_socket(guest, tmp_path, reboot, status):
    """`pvhvm shutdown SOCKET` from another process, as `xl shutdown`: the
    guest powers off (exit 0) or reboots (exit 3, not rebuilt with
    --on-reboot destroy) by itself."""
    sock = tmp_path / "xs.sock"
    boot = subprocess.Popen([sys.executable, "-m", "pvhvm", "boot", "--net", "none", "--xenstore-socket", str(sock),
                             "--on-reboot", "destroy"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        out = b""
        import os as _os

        _os.set_blocking(boot.stdout.fileno(), False)
        while b"PVHVM-INIT-OK" not in out and time.monotonic() < deadline:
            out += boot.stdout.read() or b""
            time.sleep(0.05)
        assert b"PVHVM-INIT-OK" in out
        cmd = [sys.executable, "-m", "pvhvm", "shutdown", str(sock)] + (["--reboot"] if reboot else [])
        assert subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
        assert boot.wait(60) == status
    finally:
        if boot.poll() is None:
            boot.kill()
            boot.wait()
    assert not sock.exists()


def test_cli_reboot_builds_the_guest_again(guest):
    """A guest that reboots comes back (on_reboot="restart", as xl): the
    console stays on, and the end of input then powers the new one off."""
    p = subprocess.run([sys.executable, "-m", "pvhvm", "boot", "--net", "none"], input=b"reboot -f\n",
                       capture_output=True, timeout=240)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-2000:]
    assert out.count("PVHVM-INIT-OK") == 2, out[-3000:]
    assert "pvhvm: domain pvhvm rebooted; building it again (on_reboot=restart)" in p.stderr.decode()


def test_profile_of_the_boot(booted):
    """The guest profiler on Linux: every phase of the timeline seen in
    order, the samples named by the kernel's own kallsyms (Debian ships no
    System.map), the early boot's known costs where they belong."""
    from pvhvm.profile import (END, FIRST_CONSOLE_LINE, FIRST_HYPERCALL, FIRST_INSTRUCTION, FIRST_USER_INSTRUCTION,
                               INIT, PROCESS_START, UNKNOWN, USER, XEN_CLOCKSOURCE, Profile)

    dom = booted[0]
    profile = Profile.read(dom.profile_path)
    order = [PROCESS_START, FIRST_INSTRUCTION, FIRST_HYPERCALL, FIRST_CONSOLE_LINE, XEN_CLOCKSOURCE,
             FIRST_USER_INSTRUCTION, INIT, END]
    times = [profile.events[e] for e in order]
    assert times == sorted(times), profile.events
    assert profile.meta["symbols"].startswith("kallsyms of"), profile.meta
    # Debian's kernel unwinds by ORC: RBP is no frame pointer, so no callers are made up.
    assert profile.meta["frame_pointers"] is False
    assert all(len(stack.split(";")) == 2 for stack in profile.folded), profile.folded
    # Before its first hypercall Linux clears its BSS (a third of that
    # phase's 100 ms); up to the Xen clocksource it patches its text.
    early = profile.phase(FIRST_INSTRUCTION, FIRST_HYPERCALL)
    assert "clear_bss" in early, early
    assert "text_poke_early" in profile.phase(FIRST_CONSOLE_LINE, XEN_CLOCKSOURCE)
    named = sum(n for stack, n in profile.folded.items() if stack.split(";")[-1] != UNKNOWN)
    assert named > 0.95 * profile.samples, profile.folded
    user = profile.phase(FIRST_USER_INSTRUCTION, INIT)
    assert user.get(USER, 0) > 0, user
