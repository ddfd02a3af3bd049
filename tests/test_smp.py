"""The smp guest on several vCPUs: bring-up by INIT + STARTUP and by
VCPUOP_initialise, IPIs both ways (event channels and the LAPIC), per-vCPU
timers, an event bound to vCPU 2, LOCK'd and spinlocked counters,
VCPUOP_down/up, INIT + STARTUP again. The guest checks itself; these tests
read its verdict and what the core saw of every vCPU."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

import pvhvm
from pvhvm import OutcomeKind, ShutdownReason

TIMEOUT = 40  # seconds; the guest needs about 2


def boot(path, vcpus: int, **kw):
    dom = pvhvm.Domain(path, vcpus=vcpus, memory_mib=64, **kw)
    t0 = time.monotonic()
    outcome = dom.run(timeout=TIMEOUT)
    return dom, outcome, dom.console_output.decode(), time.monotonic() - t0


def assert_passed(dom, outcome, out: str) -> int:
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failures == [], out
    m = re.search(r"^VERDICT: PASS \((\d+) checks\)$", out, re.M)
    assert m, out
    assert outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.POWEROFF, dom.crash_report()
    return int(m.group(1))


@pytest.mark.parametrize("vcpus", [2, 4, 8])
def test_smp_guest_passes(guests, vcpus):
    dom, outcome, out, took = boot(guests["smp"], vcpus)
    checks = assert_passed(dom, outcome, out)
    assert took < TIMEOUT
    assert f"bring-up: {vcpus} vCPUs" in out
    # The per-vCPU checks ran for every vCPU (the guest counted them itself).
    for k in range(1, vcpus):
        assert f"ok - vCPU {k}: CPUID 0x40000004 EBX {k}, LAPIC ID {2 * k}, CPUID 1 APIC ID {2 * k}" in out
        assert re.search(rf"^ok - vCPU {k}: its timer woke it \((HLT|SCHEDOP_block)\) on itself only", out, re.M)
    assert checks >= 40 + 8 * (vcpus - 1)
    if vcpus >= 3:
        assert "one upcall on vCPU 2" in out
    else:
        assert "needs 3" in out

    # What the core saw: every vCPU came up, took interrupts and no exception.
    for i in range(vcpus):
        st = dom.vcpu_status(i)
        assert st["online"], (i, st)
        assert st["exceptions"] == 0, (i, st)
        running, runnable, blocked, offline = st["runstate_ns"]
        assert running > 0, (i, st)
        if i == 0:
            # IPIs and events from every other vCPU, and its own timer.
            assert st["interrupts"] >= 2 * (vcpus - 1) + 1, st
            assert offline == 0, st
        else:
            # Kicks, IPIs, broadcasts, its timer: several each.
            assert st["interrupts"] >= 5, (i, st)
            assert st["activity"] == "halted", (i, st)
            assert offline > 0 and blocked > 0, (i, st)  # down until brought up; slept on its timer
    assert dom.context_switches > vcpus


def test_smp_hypercalls_come_from_every_vcpu(guests):
    seen = []
    dom, outcome, out, _ = boot(guests["smp"], 4, trace=seen.append)
    assert_passed(dom, outcome, out)
    assert {r.vcpu for r in seen} == {0, 1, 2, 3}
    vcpu_op = [r for r in seen if r.name == "vcpu_op"]
    # VCPUOP_initialise of vCPUs 2 and 3 by vCPU 0 (and the -EEXIST retries).
    inits = [(r.vcpu, r.args[1], r.result) for r in vcpu_op if r.args[0] == 0]
    assert (0, 2, 0) in inits and (0, 3, 0) in inits
    assert (0, 1, -17) in inits and (0, 0, -17) in inits
    # Each vCPU bound its own VIRQ_TIMER and set its own timer.
    timers = {r.vcpu for r in vcpu_op if r.args[0] == 8 and r.args[1] == r.vcpu and r.result == 0}
    assert timers == {0, 1, 2, 3}
    # vCPU 1 took itself down (VCPUOP_down on its own id) and was brought back.
    assert any(r.vcpu == 1 and r.args[:2] == (2, 1) for r in vcpu_op)
    assert any(r.vcpu == 0 and r.args[:2] == (1, 1) and r.result == 0 for r in vcpu_op)


def test_smp_guest_through_the_cli(guests):
    p = subprocess.run([sys.executable, "-m", "pvhvm", "boot", str(guests["smp"]), "--vcpus", "4", "--memory", "64"],
                       capture_output=True, timeout=TIMEOUT + 20)
    out = p.stdout.decode()
    assert p.returncode == 0, out + p.stderr.decode()
    assert "bring-up: 4 vCPUs" in out
    assert re.search(r"^VERDICT: PASS \(\d+ checks\)$", out, re.M), out
    assert "FAIL" not in out
    assert "poweroff" in p.stderr.decode()
