"""The test guests built for 32-bit protected mode (tests/guests/common/boot32.S:
paging off, 2-level paging with 4 MiB PSE pages, PAE) boot on the real core,
make their hypercalls by the 32-bit ABI and pass Xen's 32-bit (compat)
structures, and print their verdicts."""

from __future__ import annotations

import re

import pytest

import pvhvm
from pvhvm import OutcomeKind, ShutdownReason

VARIANTS = ["nopaging", "pse", "pae"]


def run_guest(path, memory_mib: int = 64, **kw):
    dom = pvhvm.Domain(path, memory_mib=memory_mib, **kw)
    outcome = dom.run(timeout=90)
    return dom, outcome, dom.console_output.decode(errors="replace")


def assert_passed(outcome, out: str) -> None:
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failures == [], out
    assert re.search(r"^VERDICT: PASS \(\d+ checks\)$", out, re.M), out
    assert outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.POWEROFF


@pytest.mark.parametrize("variant", VARIANTS)
def test_hello_i386(guests, variant):
    dom, outcome, out = run_guest(guests[f"hello.i386-{variant}"], memory_mib=32, cmdline="quiet answer=42")
    assert dom.image.elf_class == 32
    assert "Hello from a PVH guest on pvhvm!" in out, out
    assert "cmdline: [quiet answer=42]" in out, out
    entries = re.findall(r"memmap: (0x[0-9a-f]+) (0x[0-9a-f]+) (\d)", out)
    assert [(int(a, 16), int(s, 16), int(t)) for a, s, t in entries] == dom.layout.memory_map()
    assert outcome.kind is OutcomeKind.SHUTDOWN and outcome.exit_status == 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["hypercall_abi", "events", "memory"])
def test_i386_guest_passes(guests, name, variant):
    dom, outcome, out = run_guest(guests[f"{name}.i386-{variant}"])
    assert_passed(outcome, out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_i386_memory_guest_is_32_bit(guests, variant):
    dom, outcome, out = run_guest(guests[f"memory.i386-{variant}"])
    assert "memory: 32-bit guest" in out
    assert "selector bit 1 set in the 32-bit word at offset 4" in out, out
    assert "wc_sec at offset 2308" in out, out


@pytest.mark.parametrize("variant", VARIANTS)
def test_i386_hypercall_paths_are_counted(guests, variant):
    seen = []
    dom = pvhvm.Domain(guests[f"hypercall_abi.i386-{variant}"], memory_mib=32, trace=seen.append)
    dom.run(timeout=60)
    counts = dom.hypercall_counts()
    assert counts["hypercall_60"] == 3 and counts["hypercall_11"] == 3
    text = [str(r) for r in seen]
    # EBX, ECX, EDX: the 32-bit ABI's first arguments.
    assert any(t.endswith("hypercall_60(0x1, 0x2, 0x3) = -ENOSYS") for t in text), text[:20]
    assert any("xen_version(extraversion, 0x40000000, 0x0) = -EFAULT" in t for t in text)


@pytest.mark.parametrize("variant", VARIANTS)
def test_i386_grants(guests, variant):
    """The grants guest's two phases (as tests/test_grants.py drives the
    64-bit one): v1 entries, then v2 with a sub-page grant."""
    from pvhvm import _core

    dom = pvhvm.Domain(guests[f"grants.i386-{variant}"], memory_mib=32)
    vm = dom.backend_ops
    dom.expect(rb"PHASE1 a=0x([0-9a-f]+) b=0x([0-9a-f]+) table=0x([0-9a-f]+)", 30)
    assert vm.grant_read(8, 0, 13) == b"pvhvm-grant-A"
    assert vm.grant_read(9, 0, 13) == b"pvhvm-grant-B"
    with pytest.raises(_core.GrantError):
        vm.grant_write(9, 0, b"nope")
    mapping = vm.grant_map(8, writable=True)
    with memoryview(mapping) as mv:
        mv[100:104] = b"MAPD"
    vm.grant_unmap(mapping)
    vm.grant_write(8, 0, b"\x01")
    dom.expect(b"PHASE2", 30)
    assert vm.grant_table_info() == (2, 1, 1)
    vm.grant_write(12, 0x3F, b"x")
    with pytest.raises(_core.GrantError):
        vm.grant_write(12, 0x40, b"x")
    vm.grant_write(8, 0, b"\x02")
    outcome = dom.run(timeout=30)
    assert_passed(outcome, dom.console_output.decode(errors="replace"))
