"""The test guests boot on the real core and print their verdicts."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import pvhvm
from pvhvm import OutcomeKind, ShutdownReason

PVHVM = [sys.executable, "-m", "pvhvm"]


def run_guest(path, **kw):
    dom = pvhvm.Domain(path, memory_mib=kw.pop("memory_mib", 64), **kw)
    outcome = dom.run(timeout=60)
    return dom, outcome, dom.console_output.decode()


@pytest.mark.parametrize("name", ["exceptions", "hypercall_abi", "events", "memory", "fifo", "smc"])
def test_abi_guest_passes(guests, name):
    dom, outcome, out = run_guest(guests[name])
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failures == [], out
    assert re.search(r"^VERDICT: PASS \(\d+ checks\)$", out, re.M), out
    assert outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.POWEROFF


def test_exceptions_guest_really_faulted(guests):
    dom, outcome, out = run_guest(guests["exceptions"])
    # #UD, #DE, 2x #GP, 2x #PF, 5x #PF, INT3, 2x INT, #DF, 3 in ring 3: delivered by the core.
    assert dom.exceptions_delivered >= 18
    assert "a hypercall from ring 3 gives -EPERM" in out


def test_hypercall_page_and_direct_paths_are_counted(guests):
    dom, outcome, out = run_guest(guests["hypercall_abi"])
    counts = dom.hypercall_counts()
    assert counts["xen_version"] >= 9
    assert counts["hypercall_60"] == 3 and counts["hypercall_11"] == 3
    assert "console write across a page boundary" in out


def test_trace_records_every_call(guests):
    seen = []
    dom = pvhvm.Domain(guests["hypercall_abi"], memory_mib=32, trace=seen.append)
    dom.run(timeout=60)
    assert len(seen) == sum(dom.hypercall_counts().values())
    text = [str(r) for r in seen]
    assert any("xen_version(version, 0x0, 0x0) = 0x40013" in t for t in text)
    assert any(t.endswith("hypercall_60(0x1, 0x2, 0x3) = -ENOSYS") for t in text)
    assert any("xen_version(extraversion, 0x40000000, 0x0) = -EFAULT" in t for t in text)
    assert seen[-1].name == "sched_op" and seen[-1].args[0] == 2  # shutdown
    times = [r.time_ns for r in seen]
    assert times == sorted(times)


def test_hello_cli_prints_and_exits_zero(guests):
    p = subprocess.run([*PVHVM, "boot", str(guests["hello"]), "--cmdline", "quiet answer=42", "--memory", "32"],
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert "Hello from a PVH guest on pvhvm!" in out
    assert "cmdline: [quiet answer=42]" in out
    assert "poweroff" in p.stderr.decode()


def test_elf32_container_boots(guests):
    dom, outcome, out = run_guest(guests["hello32"])
    assert dom.image.elf_class == 32
    assert "Hello from a PVH guest on pvhvm!" in out
    assert outcome.exit_status == 0


def test_guest_sees_memory_map_and_initrd(guests, tmp_path):
    initrd = tmp_path / "initrd.img"
    data = bytes((i * 7 + 3) & 0xFF for i in range(300_000))
    initrd.write_bytes(data)
    dom, outcome, out = run_guest(guests["hello"], initrd=initrd, memory_mib=48)
    h = 0
    for b in data:
        h = (h * 31 + b) & (2**64 - 1)
    m = re.search(r"module 0: paddr (0x[0-9a-f]+) size (\d+) hash (0x[0-9a-f]+)", out)
    assert m, out
    paddr = int(m.group(1), 16)
    assert int(m.group(2)) == len(data) and int(m.group(3), 16) == h
    # Placed page-aligned, below the top of RAM, clear of the kernel.
    lo, hi = dom.image.phys_range
    assert paddr % 4096 == 0 and paddr + len(data) <= 48 << 20 and (paddr >= hi or paddr + len(data) <= lo)
    entries = re.findall(r"memmap: (0x[0-9a-f]+) (0x[0-9a-f]+) (\d)", out)
    assert [(int(a, 16), int(s, 16), int(t)) for a, s, t in entries] == dom.layout.memory_map()
    carved = sum(n for _, n, _ in dom.layout.carved)
    assert carved == 4 * 4096  # console ring, xenstore ring, ACPI tables, VM generation ID
    assert sum(int(s, 16) for a, s, t in entries if t == "1") == (48 << 20) - 0x60000 - carved


def test_triple_fault_is_reported(guests):
    p = subprocess.run([*PVHVM, "boot", str(guests["triple_fault"]), "--memory", "32"], capture_output=True, timeout=60)
    assert p.returncode == 1
    err = p.stderr.decode()
    assert "triple_fault: vectors 3 -> 13" in err
    assert re.search(r"rip: [0-9a-f]{16}", err)
    assert "still alive" not in p.stdout.decode()
