"""Timers and poll timeouts as far ahead as a guest cares to set them
(tests/guests/far_timer.c): Xen takes any 64-bit deadline, so pvhvm must
neither crash on one nor wait past its own timeout for it, through the API
or the CLI, whether the guest waits on a timer or on nothing at all."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

import pvhvm
from pvhvm import OutcomeKind, ShutdownReason

S_TIME_MAX = 2**63 - 1  # Xen's deadlines are signed: the farthest one
U64_MAX = 2**64 - 1
THIRTY_DAYS_MS = 30 * 86400 * 1000
HLT, BLOCK, POLL = 0, 1, 2


def boot(guests, cmdline: str) -> pvhvm.Domain:
    return pvhvm.Domain(guests["far_timer"], memory_mib=32, cmdline=cmdline)


def woke_after_ms(dom: pvhvm.Domain) -> int | None:
    m = re.search(rb"woke after (\d+) ms", dom.console_output)
    return None if m is None else int(m.group(1))


@pytest.mark.parametrize("cmdline", [
    f"ahead_ms=20000 wait={HLT}",
    f"ahead_ms={THIRTY_DAYS_MS} wait={BLOCK}",
    f"at={S_TIME_MAX} wait={HLT}",
    f"at={S_TIME_MAX} wait={BLOCK}",
    f"ahead_ms={THIRTY_DAYS_MS} wait={POLL}",
    f"at={S_TIME_MAX} wait={POLL}",
    f"ahead_ms=20000 via=1 wait={BLOCK}",  # set_timer_op under 2^50 ns ahead: as given
])
def test_a_far_deadline_ends_at_the_hosts_timeout(guests, cmdline):
    dom = boot(guests, cmdline)
    t0 = time.monotonic()
    outcome = dom.run(timeout=1)
    took = time.monotonic() - t0
    assert outcome.kind is OutcomeKind.TIMEOUT, (outcome, dom.console_output)
    assert b"waiting:" in dom.console_output and woke_after_ms(dom) is None, dom.console_output
    assert took < 1.5, took
    # It is still waiting, and a later run still ends on time.
    t0 = time.monotonic()
    assert not dom.run_until(lambda: False, 0.3)
    assert time.monotonic() - t0 < 0.8


@pytest.mark.parametrize("cmdline, low_ms, high_ms", [
    # In the past: at once.
    (f"at=1 wait={HLT}", 0, 50),
    (f"at=1 wait={BLOCK}", 0, 50),
    (f"at=1 wait={POLL}", 0, 50),
    # Bit 63 set: a negative s_time_t for Xen, so past too.
    (f"at={U64_MAX} wait={HLT}", 0, 50),
    (f"at={2**63} wait={BLOCK}", 0, 50),
    (f"at={U64_MAX} wait={POLL}", 0, 50),
    # set_timer_op more than 2^50 ns ahead or negative: Xen takes it for
    # Linux's wrapped jiffies and fires it in 100 ms.
    (f"ahead_ms={THIRTY_DAYS_MS} via=1 wait={HLT}", 95, 1000),
    (f"at={U64_MAX} via=1 wait={BLOCK}", 95, 1000),
])
def test_deadlines_xen_takes_for_past_or_wrapped_fire(guests, cmdline, low_ms, high_ms):
    dom = boot(guests, cmdline)
    outcome = dom.run(timeout=10)
    assert (outcome.kind, outcome.reason) == (OutcomeKind.SHUTDOWN, ShutdownReason.POWEROFF), dom.console_output
    woke = woke_after_ms(dom)
    assert woke is not None and low_ms <= woke < high_ms, dom.console_output


@pytest.mark.parametrize("wait", [HLT, BLOCK, POLL])
def test_idle_with_nothing_armed_ends_at_the_callers_deadline(guests, wait):
    """No timer at all: only a host source could wake the domain, and the
    run loop waits for one no longer than run/run_until/expect were given."""
    dom = boot(guests, f"via=2 wait={wait}")
    r, w = os.pipe()
    try:
        dom.loop.add_reader(r, lambda: os.read(r, 64))
        assert dom.run_until(lambda: b"waiting:" in dom.console_output, 10)
        for timeout in (0.2, 0.45):
            t0 = time.monotonic()
            assert not dom.run_until(lambda: False, timeout)
            assert timeout <= time.monotonic() - t0 < timeout + 0.25
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            dom.expect("never printed", timeout=0.3)
        assert time.monotonic() - t0 < 0.55
        t0 = time.monotonic()
        assert dom.run(timeout=0.3).kind is OutcomeKind.TIMEOUT
        assert time.monotonic() - t0 < 0.55
        assert dom.exit_counts.get("idle", 0) > 0, dom.exit_counts
    finally:
        dom.loop.remove_reader(r)
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("cmdline, extra", [
    (f"at={S_TIME_MAX} wait={BLOCK}", []),
    (f"ahead_ms={THIRTY_DAYS_MS} wait={POLL}", []),
    # Nothing armed, with a host source (the xenstore socket) to wait on;
    # the guest idles from half a second in (idle waits of a second from
    # there overshot the timeout by 0.6 s).
    (f"via=2 wait={HLT} spin_ms=500", ["--xenstore-socket", "{tmp}/xs.sock"]),
])
def test_cli_timeout_holds_while_the_guest_waits(guests, tmp_path, cmdline, extra):
    args = [sys.executable, "-m", "pvhvm", "boot", str(guests["far_timer"]), "--cmdline", cmdline, "--memory", "32",
            "--net", "none", "--timeout", "2", *(a.format(tmp=tmp_path) for a in extra)]
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = b""
        while b"waiting:" not in seen:
            line = p.stdout.readline()
            assert line, (seen, p.stderr.read())
            seen += line
        waiting_at = time.monotonic()
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    took = time.monotonic() - waiting_at
    err = err.decode(errors="replace")
    assert p.returncode == 8, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "pvhvm: domain timeout: no shutdown within 2.0 s", err
    # The guest's clock started shortly before the session's 2 s did (it
    # comes to about 2.2 s with the process's exit; it was 2.75 s when idle
    # waits of a second overshot the timeout).
    guest_s = int(re.search(rb"\(now (\d+)\)", seen).group(1)) / 1e9
    assert guest_s + took < 2.5, (guest_s, took)
