"""Ballooning with Debian's Linux 6.1: a domain with memory below maxmem
starts by giving the rest back (xl's memory/maxmem), and writing
memory/target (`Domain.set_memory_target`, as `xl mem-set`) makes the
guest's xen-balloon driver give pages back, which the host releases (its
RSS falls), or take them again."""

from __future__ import annotations

import time

import pytest

import pvhvm
from pvhvm.guest_tools import prepare_xenstore_guest
from pvhvm.shell import GuestShell

pytestmark = pytest.mark.slow

MIB = 1024


def rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def balloon():
    g = prepare_xenstore_guest()
    dom = pvhvm.Domain(g.vmlinux, initrd=g.initrd, cmdline="console=hvc0", memory_mib=256, maxmem_mib=512)
    dom.expect("PVHVM-XENSTORE-READY", 300)
    dom.expect("# ", 60)
    sh = GuestShell(dom)
    sh.ok("dmesg -n 1")
    yield dom, sh
    dom.close()


def settle(dom: pvhvm.Domain, sh: GuestShell, want_kib: int, timeout: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while dom.memory_status["current"] != want_kib:
        assert time.monotonic() < deadline, f"memory {dom.memory_status}, want {want_kib} KiB"
        sh.ok("sleep 0.2")
    return dom.memory_status


def guest_kib(sh: GuestShell, what: str) -> int:
    return int(sh.ok(f"cat /sys/devices/system/xen_memory/xen_memory0/{what}").strip())


def test_starts_at_memory_below_maxmem(balloon):
    dom, sh = balloon
    st = settle(dom, sh, 256 * MIB)
    assert st == {"target": 256 * MIB, "maxmem": 512 * MIB, "current": 256 * MIB, "given_back": 256 * MIB}
    # The driver's own view: it reached its target, below 256 MiB by what
    # the E820 map does not count as RAM (Linux's target_diff).
    current, target = guest_kib(sh, "info/current_kb"), guest_kib(sh, "target_kb")
    assert current == target and 240 * MIB < target <= 256 * MIB, (current, target)
    assert "Initial ballooning down finished" in sh.ok("dmesg | grep balloon")


def test_giving_memory_back_releases_it_on_the_host(balloon):
    dom, sh = balloon
    # Touch 150 MiB in the guest, then free it: the host holds those pages.
    sh.ok("mkdir -p /t && mount -t tmpfs -o size=300m none /t && dd if=/dev/zero of=/t/f bs=1M count=150 2>/dev/null"
          " && rm /t/f && umount /t")
    before = rss_kib()
    dom.set_memory_target(96)
    st = settle(dom, sh, 96 * MIB)
    after = rss_kib()
    assert st["given_back"] == 416 * MIB
    assert before - after > 100 * MIB, f"RSS {before} -> {after} KiB"
    assert guest_kib(sh, "info/current_kb") < 100 * MIB


def test_taking_memory_again_up_to_maxmem(balloon):
    dom, sh = balloon
    dom.set_memory_target(400)
    st = settle(dom, sh, 400 * MIB)
    assert st["current"] == 400 * MIB
    # The pages came back usable: fill most of them.
    sh.ok("mkdir -p /t && mount -t tmpfs -o size=350m none /t && dd if=/dev/zero of=/t/f bs=1M count=250 2>/dev/null"
          " && md5sum /t/f && rm /t/f && umount /t", timeout=120)
    with pytest.raises(ValueError):
        dom.set_memory_target(513)
    log = dom.console_output.decode(errors="replace")
    assert not any(w in log for w in ("BUG", "Oops", "Call Trace", "WARNING"))
