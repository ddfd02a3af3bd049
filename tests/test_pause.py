"""Domain.pause/unpause (xl pause): no vCPU runs while paused, host work goes on."""

from __future__ import annotations

import threading

import pvhvm
from pvhvm.api import OutcomeKind, ShutdownReason


def test_paused_domain_runs_nothing_until_unpaused(guests):
    dom = pvhvm.Domain(guests["hello"], memory_mib=32)
    dom.pause()
    assert dom.paused
    # Paused from the start: the deadline passes with the guest not started.
    assert dom.run_until(lambda: False, 0.3) is False
    assert dom.outcome is None and dom.console_output == b""
    assert dom.hypercall_counts() == {}
    # Host work handed in from another thread is served while paused.
    served = threading.Event()
    dom.call_soon_threadsafe(served.set)
    assert dom.run_until(served.is_set, 5.0) is True
    dom.unpause()
    outcome = dom.run(timeout=30)
    assert outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.POWEROFF
    assert b"hello" in dom.console_output.lower()
    dom.close()


def test_run_while_paused_times_out_without_running(guests):
    dom = pvhvm.Domain(guests["hello"], memory_mib=32)
    dom.pause()
    outcome = dom.run(timeout=0.2)
    assert outcome.kind is OutcomeKind.TIMEOUT and "paused" in outcome.message
    assert dom.console_output == b""
    dom.close()
