"""Debian's Linux 6.1 with four vCPUs: the CPUs come up, take their own
timers and IPIs, run pinned jobs, go offline and online again (from sysfs
and from xenstore, as `xl vcpu-set` does), and the network and the xenstore
keep working. The guest carries xenstore-utils and xen-netfront and gets a
shell on hvc0 (like tests/test_guest_xenstore.py)."""

from __future__ import annotations

import re
import time

import pytest

import pvhvm
from pvhvm.devices import net_host
from pvhvm.guest_tools import prepare_xenstore_guest
from pvhvm.shell import GuestShell

pytestmark = pytest.mark.slow

VCPUS = 4
# What a healthy SMP kernel never prints.
BAD = re.compile(r"\b(BUG|WARNING|Oops|Call Trace|panic|soft lockup|hard LOCKUP)\b|rcu.*(stall|detected stall)")


@pytest.fixture(scope="module")
def guest():
    return prepare_xenstore_guest(modules=["xen-netfront"],
                                  extra_files={net_host.UDHCPC_SCRIPT_PATH: net_host.UDHCPC_SCRIPT.encode()})


@pytest.fixture(scope="module")
def smp(guest):
    net = "passt" if net_host.find_passt() else None
    assert net, "passt is installed by scripts/setup"
    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0", memory_mib=256, vcpus=VCPUS,
                       net=net)
    dom.expect("PVHVM-XENSTORE-READY", 300)
    dom.expect("# ", 60)
    sh = GuestShell(dom)
    sh.ok("dmesg -n 1")  # kernel messages off the console: command output stays clean
    yield dom, sh
    dom.close()


@pytest.fixture(autouse=True)
def report_a_dead_domain(request):
    """If the domain ended under a test, show how: the console's last lines
    and every vCPU's registers (pytest prints them with the failure)."""
    yield
    if "smp" in request.fixturenames:
        dom, _ = request.getfixturevalue("smp")
        if dom.outcome is not None and dom.outcome.reason is not pvhvm.ShutdownReason.POWEROFF:
            print(dom.console_output.decode(errors="replace")[-5000:])
            print(dom.crash_report())


def interrupts(sh: GuestShell) -> dict[str, list[int]]:
    """/proc/interrupts as {name: [count per CPU]} (per-CPU Xen IRQs by
    their action name, e.g. timer2, and the summary rows, e.g. RES)."""
    rows: dict[str, list[int]] = {}
    lines = sh.ok("cat /proc/interrupts").splitlines()
    ncpu = len(lines[0].split())
    for line in lines[1:]:
        f = line.split()
        if len(f) < ncpu + 1 or not f[0].endswith(":"):
            continue
        counts = [int(x) for x in f[1 : ncpu + 1]]
        rows[f[-1] if f[0][:-1].isdigit() else f[0][:-1]] = counts
    return rows


def online(sh: GuestShell) -> str:
    return sh.ok("cat /sys/devices/system/cpu/online").strip()


def test_all_cpus_come_up(smp):
    dom, sh = smp
    assert sh.ok("nproc").strip() == str(VCPUS)
    assert online(sh) == f"0-{VCPUS - 1}"
    log = sh.ok("dmesg")
    assert f"smp: Brought up 1 node, {VCPUS} CPUs" in log, log
    assert "Booting SMP configuration" in log
    for v in range(VCPUS):
        s = dom.vcpu_status(v)
        assert s["online"] and s["interrupts"] > 0, (v, s)


def test_every_cpu_takes_its_timer_and_ipis(smp):
    _, sh = smp
    before = interrupts(sh)
    # Pinning a job moves it with the stopper thread of its CPU (IPIs to
    # wake it), and the jobs' exits wake their parent elsewhere.
    sh.ok("for i in 0 1 2 3; do taskset -c $i sh -c 'i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done' & done; wait",
          timeout=120)
    sh.ok("sleep 1")
    after = interrupts(sh)
    print({k: (before[k], after[k]) for k in ("RES", "CAL", "HYP")})
    for cpu in range(VCPUS):
        timer = f"timer{cpu}"
        assert after[timer][cpu] > before[timer][cpu], (cpu, before[timer], after[timer])
        ipis = sum(after[k][cpu] - before[k][cpu] for k in ("RES", "CAL"))
        assert ipis > 0, (cpu, {k: (before[k], after[k]) for k in ("RES", "CAL")})
    assert sum(after["HYP"]) > sum(before["HYP"])  # Xen's callback vector


def steal(sh: GuestShell) -> int:
    """Steal time of all CPUs (/proc/stat, USER_HZ ticks)."""
    return int(sh.ok("head -1 /proc/stat").split()[8])


def test_pinned_jobs_all_finish_on_their_cpus(smp):
    _, sh = smp
    stolen = steal(sh)
    out = sh.ok("for i in 0 1 2 3; do taskset -c $i sh -c "
                "'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo job=$i cpu=$(cut -d\" \" -f39 /proc/self/stat)'"
                " & done; wait", timeout=300)
    jobs = re.findall(r"job=(\d+) cpu=(\d+)", out)
    assert sorted(int(c) for _, c in jobs) == list(range(VCPUS)), out
    assert all(n == "20000" for n, _ in jobs), out
    # Four busy vCPUs on one host thread: each waits for its turn, and
    # Linux reads that from the runstate area as steal time, as on Xen.
    assert steal(sh) > stolen


def test_cpu3_goes_offline_and_back_from_sysfs(smp):
    dom, sh = smp
    sh.ok("echo 0 > /sys/devices/system/cpu/cpu3/online")
    assert online(sh) == "0-2"
    assert sh.ok("nproc").strip() == "3"
    # The dead CPU parks in HLT with interrupts off, as on Xen.
    assert dom.vcpu_status(3)["activity"] == "halted"
    sh.ok("echo 1 > /sys/devices/system/cpu/cpu3/online")
    assert online(sh) == "0-3"
    out = sh.ok("taskset -c 3 cut -d' ' -f39 /proc/self/stat")
    assert out.strip() == "3"


def test_xl_vcpu_set_through_xenstore(smp):
    """Linux's Xen CPU hotplug driver watches cpu/N/availability: "offline"
    takes the CPU offline and out of the present set; "online" makes it
    present again, and then (a udev rule in a full distribution) writing
    its sysfs online file brings it up, as on Xen."""
    dom, sh = smp

    def wait_online(want: str) -> None:
        deadline = time.monotonic() + 60
        while online(sh) != want:
            assert time.monotonic() < deadline, f"CPUs online: {online(sh)}, want {want}"
            sh.ok("sleep 0.2")

    dom.set_online_vcpus(2)
    wait_online("0-1")
    assert sh.ok("cat /sys/devices/system/cpu/present").strip() == "0-1"
    dom.set_online_vcpus(VCPUS)
    deadline = time.monotonic() + 60
    while sh.ok("cat /sys/devices/system/cpu/present").strip() != f"0-{VCPUS - 1}":
        assert time.monotonic() < deadline
        sh.ok("sleep 0.2")
    sh.ok("for c in 2 3; do echo 1 > /sys/devices/system/cpu/cpu$c/online; done")
    wait_online(f"0-{VCPUS - 1}")


def test_network_and_xenstore_keep_working(smp):
    _, sh = smp
    out = sh.run("modprobe xen-netfront; udhcpc -i eth0 -q -n -t 5 -T 2", 120)
    m = re.search(r"DHCP-BOUND ip=(\S+) mask=(\d+) router=(\S+)", out)
    assert m and sh.status == 0, out
    assert sh.ok("xenstore-read name").strip() == "pvhvm"
    # netfront asks for a queue per vCPU up to what the backend offers;
    # netback offers no multi-queue-max-queues, so one queue pair it serves.
    irqs = sh.ok("cat /proc/interrupts")
    assert "vif0-q0-tx" in irqs and "vif0-q1" not in irqs, irqs
    assert sh.ok("xenstore-read cpu/3/availability").strip() == "online"
    if net_host.ping_sockets_allowed():
        out = sh.run(f"ping -c 5 -i 0.2 {m.group(3)}", 60)
        assert "5 packets transmitted, 5 packets received, 0% packet loss" in out, out


def test_log_is_clean_and_poweroff(smp):
    dom, sh = smp
    log = sh.ok("dmesg")
    assert [line for line in log.splitlines() if BAD.search(line)] == []
    assert "xen:events: Using FIFO-based ABI" in log  # a control block per vCPU
    dom.send("poweroff -f\n")
    outcome = dom.run(timeout=120)
    assert outcome.kind is pvhvm.OutcomeKind.SHUTDOWN and outcome.reason is pvhvm.ShutdownReason.POWEROFF, outcome
