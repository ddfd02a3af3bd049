"""Debian's 6.1 kernel on pvhvm's vCPU finds no speculation flaw to mitigate.

Under Unicorn a guest's mitigations protect nothing (TCG does not
speculate, and a guest's VERW or IBPB never reaches the host's buffers or
predictors), so the vCPU says what Xen says on hardware that needs none:
CPUID 7.0 EDX ARCH_CAPABILITIES with RDCL_NO, MDS_NO, TAA_NO ... in MSR
0x10a, enhanced IBRS and BHI_CTRL. The guest must then report every
/sys/devices/system/cpu/vulnerabilities entry "Not affected", except:
spectre_v1 (always mitigated unless mitigations=off) and spectre_v2, which
Linux reports "Not affected" only for CPU models on its whitelist; with
enhanced IBRS it is mitigated once at boot (a write of SPEC_CTRL), with no
retpolines, return thunks or BHB clearing loops."""

from __future__ import annotations

import re

import pytest

import pvhvm
from pvhvm.images import prepare_default_guest
from pvhvm.shell import GuestShell

pytestmark = pytest.mark.slow

VULNERABILITIES = "/sys/devices/system/cpu/vulnerabilities"
# What a mitigation that costs the guest on kernel entry or exit, or on
# every return, logs at boot (arch/x86/kernel/cpu/bugs.c, mm/pti.c).
COSTLY = re.compile(r"MDS: Mitigation|TAA: Mitigation|MMIO Stale Data: Mitigation|RFDS: Mitigation|"
                    r"GDS: Mitigation|SRBDS: Mitigation|L1TF: |Retbleed: Mitigation|ITS: Mitigation|"
                    r"page tables isolation: enabled|Retpolines|BHB clearing|Speculative Store Bypass: Mitigation|"
                    r"Vulnerable|VERW|return thunk", re.I)


@pytest.fixture(scope="module")
def shell():
    g = prepare_default_guest()
    dom = pvhvm.Domain(g.vmlinux, initrd=g.initrd, cmdline="console=hvc0 pvhvm.shell", memory_mib=256)
    dom.expect("PVHVM-INIT-OK", 600)
    dom.expect("# ", 60)
    sh = GuestShell(dom)
    yield sh
    dom.send("poweroff -f\n")
    dom.run(timeout=60)


def vulnerabilities(sh: GuestShell) -> dict[str, str]:
    out = sh.ok(f'for f in {VULNERABILITIES}/*; do echo "${{f##*/}}: $(cat $f)"; done')
    return dict(line.split(": ", 1) for line in out.strip().splitlines())


def test_every_flaw_with_a_no_bit_is_not_affected(shell):
    v = vulnerabilities(shell)
    # The entries Linux 6.1 has had since its release, and those added to
    # 6.1.y since (when this kernel has them).
    for name in ("meltdown", "spec_store_bypass", "l1tf", "mds", "tsx_async_abort", "itlb_multihit",
                 "srbds", "mmio_stale_data", "retbleed"):
        assert v.pop(name) == "Not affected", name
    assert v.pop("spectre_v1").startswith("Mitigation: usercopy/swapgs barriers")
    spectre_v2 = v.pop("spectre_v2")
    assert spectre_v2.startswith("Mitigation: Enhanced / Automatic IBRS") or spectre_v2.startswith(
        "Mitigation: Enhanced IBRS"), spectre_v2
    assert "Retpoline" not in spectre_v2 and "SW loop" not in spectre_v2, spectre_v2
    assert "PBRSB-eIBRS: Not affected" in spectre_v2
    # gather_data_sampling, spec_rstack_overflow, reg_file_data_sampling,
    # indirect_target_selection, tsa, vmscape ...
    assert v and all(state == "Not affected" for state in v.values()), v


def test_the_cpu_shows_arch_capabilities_and_enhanced_ibrs(shell):
    flags = set(shell.ok("grep -m1 '^flags' /proc/cpuinfo").split(":", 1)[1].split())
    assert {"arch_capabilities", "ibrs_enhanced", "hypervisor"} <= flags
    assert not {"pti", "retpoline", "rethunk", "md_clear"} & flags
    bugs = set(shell.ok("grep -m1 '^bugs' /proc/cpuinfo").split(":", 1)[1].split())
    assert not {"cpu_meltdown", "mds", "taa", "l1tf", "spec_store_bypass", "retbleed", "mmio_stale_data",
                "mmio_unknown", "gds", "rfds", "its", "itlb_multihit", "srbds"} & bugs, bugs


def test_boot_log_enables_no_costly_mitigation(shell):
    log = shell.ok("dmesg")
    lines = [line for line in log.splitlines() if COSTLY.search(line)]
    assert not lines, lines
    assert "Spectre V2 : Mitigation: Enhanced" in log
