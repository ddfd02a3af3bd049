"""The public Python API: build a PVH domain from a kernel image and run it.

    >>> import pvhvm
    >>> dom = pvhvm.Domain("vmlinux", cmdline="console=hvc0", memory_mib=256)
    >>> outcome = dom.run()
    >>> outcome.reason, dom.console_output
"""

from __future__ import annotations

import enum
import os
import re
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import _core, hypercalls
from .builder.domain import HVM_PARAM_CONSOLE_EVTCHN, HVM_PARAM_STORE_EVTCHN, PAGE, DomainPlan, plan_domain
from .devices import ConsoleBackend
from .devices.blkback import attach_disk
from .devices.disk import assign_vdevs, parse_disk_spec
from .devices.manager import DeviceManager
from .errors import BuildError, GuestError
from .runloop import HostLoop
from .xenstore import RingConnection, Store, XenstoreSocketServer

# The most vCPUs a domain may have.
MAX_VCPUS = _core.MAX_VCPUS


class ShutdownReason(enum.IntEnum):
    """SHUTDOWN_* from xen/include/public/sched.h."""

    POWEROFF = 0
    REBOOT = 1
    SUSPEND = 2
    CRASH = 3
    WATCHDOG = 4
    SOFT_RESET = 5


class OutcomeKind(enum.Enum):
    SHUTDOWN = "shutdown"  # the guest asked (SCHEDOP_shutdown)
    TRIPLE_FAULT = "triple_fault"  # the vCPU shut down
    HUNG = "hung"  # halted or blocked with nothing that can wake it
    ERROR = "error"  # the emulator could not go on
    TIMEOUT = "timeout"  # run(timeout=) expired


# `pvhvm boot` exit statuses; 2 is reserved for bad input.
EXIT_STATUS = {
    ShutdownReason.POWEROFF: 0,
    ShutdownReason.CRASH: 1,
    ShutdownReason.REBOOT: 3,
    ShutdownReason.SUSPEND: 4,
    ShutdownReason.WATCHDOG: 5,
    ShutdownReason.SOFT_RESET: 6,
}
EXIT_CRASH = 1
EXIT_HUNG = 7
EXIT_TIMEOUT = 8


@dataclass(frozen=True)
class Outcome:
    """How a run ended."""

    kind: OutcomeKind
    reason: ShutdownReason | None = None
    message: str = ""

    @property
    def exit_status(self) -> int:
        if self.kind is OutcomeKind.SHUTDOWN and self.reason is not None:
            return EXIT_STATUS[self.reason]
        if self.kind is OutcomeKind.HUNG:
            return EXIT_HUNG
        if self.kind is OutcomeKind.TIMEOUT:
            return EXIT_TIMEOUT
        return EXIT_CRASH

    @property
    def crashed(self) -> bool:
        return self.exit_status == EXIT_CRASH

    def __str__(self) -> str:
        if self.kind is OutcomeKind.SHUTDOWN:
            return f"shutdown ({self.reason.name.lower()})" if self.reason is not None else "shutdown"
        return f"{self.kind.value}: {self.message}" if self.message else self.kind.value


@dataclass(frozen=True)
class HypercallRecord:
    vcpu: int
    nr: int
    args: tuple[int, int, int, int, int]
    result: int
    time_ns: int

    @property
    def name(self) -> str:
        return hypercalls.name(self.nr)

    def __str__(self) -> str:
        return f"[{self.time_ns / 1e9:12.6f}] vcpu{self.vcpu} {hypercalls.describe(self.nr, self.args, self.result)}"


class Domain:
    """A PVH domain: the kernel loaded, start_info built, vCPU 0 at the PVH entry.

    `console` receives guest console output as it arrives (bytes); `trace`,
    when given, receives every hypercall as a `HypercallRecord`.
    """

    def __init__(
        self,
        kernel: str | os.PathLike,
        initrd: str | os.PathLike | None = None,
        cmdline: str = "",
        memory_mib: int = 256,
        *,
        maxmem_mib: int | None = None,
        domid: int = 1,
        name: str = "pvhvm",
        console: Callable[[bytes], None] | None = None,
        trace: Callable[[HypercallRecord], None] | None = None,
        system_map: str | os.PathLike | None = None,
        xenstore_socket: str | os.PathLike | None = None,
        net=None,
        net_forwards=(),
        mac: str | None = None,
        vcpus: int = 1,
        disks=(),
        uuid: uuidlib.UUID | str | None = None,
    ) -> None:
        """`net`: the vif's host side: "passt" (user-mode networking, no
        root), "tap:NAME" (root), a NetHost object, or None/"none" for no
        network card. `net_forwards`: host ports that reach the guest with
        passt ("8080:80", (2222, 22), "udp:5353:53"). `vcpus`: 1 to
        MAX_VCPUS virtual CPUs (xl's `vcpus`); vCPU 0 starts at the kernel's
        entry, the guest brings up the others. `disks`: raw images the guest
        sees as xvda, xvdb, … (paths, "PATH[,ro][,vdev=xvdb]" or xl's
        "format=raw, vdev=xvda, access=rw, target=PATH"), served by blkback.
        `maxmem_mib` (xl's maxmem, default `memory_mib`): the guest's RAM is
        this much and its balloon driver starts by giving back the part
        above `memory_mib`; `set_memory_target` moves the target later.
        `uuid`: the domain's handle (xl's `uuid`), a UUID or its string;
        a random one when None. The guest reads it as XENVER_guest_handle
        and in xenstore at /vm/<uuid>/uuid (Linux's /sys/hypervisor/uuid)."""
        if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= MAX_VCPUS:
            raise BuildError(f"vcpus must be a number from 1 to {MAX_VCPUS}, not {vcpus!r}")
        if isinstance(disks, (str, os.PathLike)):
            disks = [disks]
        disk_specs = assign_vdevs([parse_disk_spec(d) for d in disks])
        self.system_map = Path(system_map) if system_map is not None else None
        if self.system_map is not None and not self.system_map.is_file():
            raise BuildError(f"{self.system_map}: no such System.map")
        # 1. The builder: pure, everything decided before the core exists.
        plan = plan_domain(kernel, initrd, cmdline, memory_mib, vcpus, maxmem_mib)
        self.plan: DomainPlan = plan
        self.image = plan.image
        self.layout = plan.layout
        self.placement = plan.placement
        self.cmdline = cmdline
        self.memory_bytes = plan.memory_bytes
        self.vcpus = vcpus
        self.name = name
        self.domid = domid
        try:
            self.uuid: uuidlib.UUID = uuidlib.uuid4() if uuid is None else (
                uuid if isinstance(uuid, uuidlib.UUID) else uuidlib.UUID(str(uuid)))
        except ValueError as err:
            raise BuildError(f"uuid: {err}: {uuid!r}") from None
        self._symbols = None

        self._vm = _core.Vm(self.memory_bytes, domid, self.uuid.bytes, vcpus)
        plan.load(self._vm)
        self._vm.tracing = trace is not None
        self._console_sink = console
        self._trace_sink = trace
        self._console = bytearray()
        self._expect_pos = 0
        self._hv_console = bytearray()
        self.outcome: Outcome | None = None
        # How often run() returned, by exit kind, and the wall time spent in
        # the core vs in Python between runs (for benches/ and profiling).
        self.exit_counts: dict[str, int] = {}
        self.last_exit: _core.Exit | None = None
        self.time_in_core = 0.0
        self.time_in_host = 0.0
        self.started_at: float | None = None  # time.monotonic() of the first run()

        # 2. The run loop's host side, and the device manager on it.
        self.loop = HostLoop(self._vm)
        self.backend_ops = self._vm.backend_ops()
        self.store = Store()
        self.devices = DeviceManager(self.backend_ops, self.store, domid, self.loop,
                                     kick_store=lambda: self.xenstore.service())
        # The PV console (hvc0) and the xenstore ring, as xl sets them up:
        # ports bound to the host before the guest runs, owned by their backends.
        ops = self.backend_ops
        self.console_port = ops.bind_host_port()
        self.store_port = ops.bind_host_port()
        self._vm.set_hvm_param(HVM_PARAM_CONSOLE_EVTCHN, self.console_port)
        self._vm.set_hvm_param(HVM_PARAM_STORE_EVTCHN, self.store_port)
        console_port, store_port = self.console_port, self.store_port
        self.console = ConsoleBackend(self._page(plan.placement.console_ring),
                                      notify=lambda: ops.notify(console_port), sink=self._on_console)
        plan.populate_store(self.store, domid=domid, name=name, uuid=self.uuid, console_port=console_port,
                            store_port=store_port)
        self.xenstore = RingConnection(self._page(plan.placement.store_ring), self.store, domid,
                                       notify=lambda: ops.notify(store_port))
        self.devices.own_port(console_port, self.console.on_event)
        self.devices.own_port(store_port, self.xenstore.on_event)
        # Called after the guest's notifications were handled (hosts of the
        # store that must see its changes: the xenstore socket).
        self._after_events: list[Callable[[], bool]] = []
        # The store for host tools, as xenstored's socket (XENSTORED_PATH).
        self.xenstore_socket: XenstoreSocketServer | None = None
        if xenstore_socket is not None:
            self.xenstore_socket = XenstoreSocketServer(self.store, xenstore_socket)
            self.xenstore_socket.attach(self)
        # Disks (vbd), served by blkback from raw images; opened (and
        # locked) now, so a bad image is a BuildError before anything runs.
        self.disks: list = []
        self.vifs: list = []
        try:
            for spec in disk_specs:
                self.disks.append(attach_disk(self, spec))
        except BaseException:
            self.close()
            raise
        # Network cards (vif), served by netback on passt or a TAP device.
        if net is not None and net != "none":
            from .devices.net_host import open_host
            from .devices.netback import attach_vif

            host = open_host(net, net_forwards) if isinstance(net, str) else net
            self.vifs.append(attach_vif(self, host, mac=mac))

    # -- running ---------------------------------------------------------

    # -- host event sources ---------------------------------------------------

    def add_reader(self, fileobj, callback: Callable[[], None]) -> None:
        """Call `callback` (on the run loop's thread) when `fileobj` is readable."""
        self.loop.add_reader(fileobj, callback)

    def remove_reader(self, fileobj) -> None:
        self.loop.remove_reader(fileobj)

    def add_service(self, service: Callable[[], bool]) -> None:
        """Call `service` after the guest's notifications or host events were
        handled (for hosts of the store, like the xenstore socket)."""
        self._after_events.append(service)

    def wake(self) -> None:
        """From any thread: make the run loop look at its event sources soon."""
        self.loop.wake()

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """From any thread: run `fn` on the run loop's thread between runs
        (the store, the rings and the core are only touched there)."""
        self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        """Remove host-side endpoints: the xenstore socket, the devices
        (rings unmapped, disk workers stopped and images unlocked, passt
        stopped)."""
        if self.xenstore_socket is not None:
            self.xenstore_socket.close()
            self.xenstore_socket = None
        self.devices.close()
        self.vifs.clear()
        self.disks.clear()

    def _page(self, gpa: int) -> memoryview:
        """A zero-copy view of one page of low guest RAM."""
        return memoryview(self._vm.memory)[gpa : gpa + PAGE]

    def _on_console(self, data: bytes) -> None:
        self._console += data
        if self._console_sink is not None:
            self._console_sink(data)

    def _on_hv_console(self, data: bytes) -> None:
        self._hv_console += data
        # Once hvc0 speaks, earlyprintk's copies on the hypervisor console
        # would only repeat it: they stay in `hypervisor_console` (xl dmesg).
        if self.console.bytes_out == 0:
            self._on_console(data)

    def run(self, timeout: float | None = None) -> Outcome:
        """Run until the guest shuts down, dies or hangs, or until `timeout`
        seconds of wall time have passed."""
        self.run_until(None, timeout)
        assert self.outcome is not None
        return self.outcome

    def run_until(self, condition: Callable[[], bool] | None, timeout: float | None = None) -> bool:
        """Run until `condition()` holds (checked after every exit; True is
        returned and the domain stays alive), or the domain ends or `timeout`
        passes (False; see `outcome`)."""
        if self.outcome is not None:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.started_at is None:
            self.started_at = time.monotonic()
        while True:
            outcome = self._step()
            if outcome is None and deadline is not None and time.monotonic() > deadline:
                if condition is not None:
                    return False
                outcome = Outcome(OutcomeKind.TIMEOUT, message=f"no shutdown within {timeout} s")
            if outcome is not None:
                self.console.service()
                self.outcome = outcome
                # The domain is gone, as after xl destroy: its images are
                # synced, unlocked and free for the next user.
                for disk in self.disks:
                    disk.close()
                return False
            if condition is not None and condition():
                return True

    def _step(self) -> Outcome | None:
        """One run of the vCPU and the host work that follows it."""
        t0 = time.perf_counter()
        exit = self._vm.run()
        t1 = time.perf_counter()
        self.last_exit = exit
        self.time_in_core += t1 - t0
        self.exit_counts[exit.kind] = self.exit_counts.get(exit.kind, 0) + 1
        self._drain()
        # The guest's notifications go to the devices owning the ports;
        # host sources served here count as progress too (the guest may have
        # something new to see, and a run_until condition must be re-checked).
        progressed = self.devices.dispatch(self._vm.take_notifications())
        progressed |= self.loop.poll(0)
        if progressed:
            progressed |= self.devices.settle()
            for service in self._after_events:
                progressed |= service()
        outcome = self._handle(exit, progressed)
        self.time_in_host += time.perf_counter() - t1
        return outcome

    def expect(self, pattern: str | bytes | re.Pattern, timeout: float = 60.0) -> re.Match:
        """Run until the console output (after what earlier `expect` calls
        consumed) matches `pattern`; return the match. Raises GuestError if
        the domain ends first, TimeoutError after `timeout` seconds."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        rx = re.compile(pattern) if isinstance(pattern, bytes) else pattern
        found: list[re.Match] = []
        searched = [-1]  # console length at the last search

        def matched() -> bool:
            if len(self._console) == searched[0]:
                return False  # nothing new: most exits print nothing
            searched[0] = len(self._console)
            m = rx.search(self._console, self._expect_pos)
            if m:
                found.append(m)
            return m is not None

        if matched() or self.run_until(matched, timeout):
            self._expect_pos = found[0].end()
            return found[0]
        if self.outcome is not None:
            raise GuestError(f"domain ended ({self.outcome}) before the console showed {rx.pattern!r}")
        raise TimeoutError(f"console did not show {rx.pattern!r} within {timeout} s")

    def send(self, text: str | bytes) -> None:
        """Type `text` into the guest console (hvc0)."""
        self.send_console_input(text.encode() if isinstance(text, str) else text)

    def _handle(self, exit: _core.Exit, progressed: bool) -> Outcome | None:
        kind = exit.kind
        if kind in ("console", "notify", "kicked", "host_io"):
            return None
        if kind == "shutdown":
            return Outcome(OutcomeKind.SHUTDOWN, ShutdownReason(exit.reason))
        if kind == "idle":
            # Every vCPU waits with no timer armed: only a host source
            # (console, xenstore socket, network) or a device's worker
            # thread (a disk answering) can wake the domain. The core waits
            # for both (Python's selector would not see a worker's event),
            # a second at most, so run(timeout=) is honoured.
            if progressed:
                return None
            if self.loop.has_sources or self.devices.can_wake():
                self._vm.wait_for_events(1.0)
                return None
            return Outcome(OutcomeKind.HUNG, message="blocked waiting for an event that nothing can send")
        if kind == "hung":
            return Outcome(OutcomeKind.HUNG, message=exit.message or "nothing can wake the domain")
        where = f"vcpu{exit.vcpu}: " if exit.vcpu is not None and self.vcpus > 1 else ""
        if kind == "triple_fault":
            chain = " -> ".join(str(v) for v in exit.chain)
            return Outcome(OutcomeKind.TRIPLE_FAULT, message=where + (f"vectors {chain}" if chain else "unexpected stop"))
        return Outcome(OutcomeKind.ERROR, message=where + (exit.message or "unknown"))

    def _drain(self) -> None:
        out = self._vm.take_console_output()
        if out:
            self._on_hv_console(out)
        if self._trace_sink is not None:
            for rec in self._vm.take_trace():
                self._trace_sink(_record(rec))

    # -- inspection --------------------------------------------------------

    @property
    def console_output(self) -> bytes:
        """Everything the guest wrote to its consoles so far (hvc0 and the
        hypervisor console), in arrival order."""
        return bytes(self._console)

    @property
    def hypervisor_console(self) -> bytes:
        """What the guest wrote with console_io only (`xl dmesg`)."""
        return bytes(self._hv_console)

    def request_shutdown(self, action: str = "poweroff") -> None:
        """Ask the guest to shut down cleanly, as `xl shutdown` does: write
        `action` (poweroff, reboot, suspend, halt) to its control/shutdown.
        Call it on the run loop's thread, or through call_soon_threadsafe."""
        if action not in ("poweroff", "reboot", "suspend", "halt"):
            raise ValueError(f"unknown shutdown action {action!r}")
        self.store.write(0, f"/local/domain/{self.domid}/control/shutdown", action)
        self.xenstore.service()

    def set_memory_target(self, mib: int) -> None:
        """As `xl mem-set`: write memory/target; the guest's balloon driver
        gives pages back (released on the host) or takes them again, up to
        maxmem. Call it on the run loop's thread, or through
        call_soon_threadsafe."""
        if isinstance(mib, bool) or not isinstance(mib, int) or not 1 <= mib << 20 <= self.memory_bytes:
            raise ValueError(f"memory target must be 1 to {self.memory_bytes >> 20} MiB (maxmem), not {mib!r}")
        self.store.write(0, f"/local/domain/{self.domid}/memory/target", str(mib << 10))
        self.xenstore.service()

    @property
    def memory_status(self) -> dict[str, int]:
        """The domain's memory as `xl list` sees it, in KiB: `target`
        (memory/target), `maxmem` (its RAM), `current` (the pages it holds:
        RAM less what it gave back) and `given_back`."""
        target = self.store.read(0, f"/local/domain/{self.domid}/memory/target")
        current = self._vm.populated_pages * 4
        return {"target": int(target), "maxmem": self.memory_bytes >> 10, "current": current,
                "given_back": (self.memory_bytes >> 10) - current}

    @property
    def generation_id(self) -> bytes:
        """The VM generation ID (16 bytes) as the guest reads it now, from
        the reserved page its ACPI device \\_SB.VGEN points at."""
        from .builder.vmgenid import GENERATION_ID_SIZE

        return self._vm.read_phys(self.placement.generation_id, GENERATION_ID_SIZE)

    def renew_generation_id(self) -> bytes:
        """Give the domain a new random VM generation ID, as after a restore
        or a fork, and return it. No ACPI notification goes with it (a PVH
        domU has no interrupt to carry one): the guest sees the new ID when
        it next reads it. Call it on the run loop's thread, between runs."""
        from .builder.vmgenid import new_generation_id

        new_id = new_generation_id(other_than=self.generation_id)
        self._vm.write_phys(self.placement.generation_id, new_id)
        return new_id

    def set_online_vcpus(self, n: int) -> None:
        """As `xl vcpu-set`: mark vCPUs 0..n-1 available and the rest not in
        the domain's xenstore (cpu/N/availability); the guest's Xen CPU
        hotplug driver then takes them online or offline itself. Call it on
        the run loop's thread, or through call_soon_threadsafe."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.vcpus:
            raise ValueError(f"online vCPUs must be 1 to {self.vcpus}, not {n!r}")
        home = f"/local/domain/{self.domid}"
        for v in range(self.vcpus):
            self.store.write(0, f"{home}/cpu/{v}/availability", "online" if v < n else "offline")
        self.xenstore.service()

    def send_console_input(self, data: bytes) -> None:
        """Type into hvc0 (and the hypervisor console's read side)."""
        self.console.send_input(data)
        self._vm.push_console_input(data)
        self.console.service()

    @property
    def memory(self) -> memoryview:
        """Guest RAM, zero-copy (offsets are guest-physical below the MMIO hole)."""
        return memoryview(self._vm.memory)

    def read_phys(self, gpa: int, length: int) -> bytes:
        return self._vm.read_phys(gpa, length)

    def read_virt(self, va: int, length: int, vcpu: int = 0) -> bytes:
        return self._vm.read_linear(va, length, vcpu)

    def registers(self, vcpu: int = 0) -> dict[str, int]:
        """vCPU `vcpu`'s registers (between runs)."""
        return dict(self._vm.registers(vcpu))

    def vcpu_status(self, vcpu: int = 0) -> dict:
        """vCPU `vcpu`'s state: online, activity (running, halted, blocked,
        polling, wait_for_sipi), runstate and the time spent in each
        (running, runnable, blocked, offline, ns), exceptions and interrupts
        delivered."""
        return dict(self._vm.vcpu_status(vcpu))

    def hypercall_counts(self) -> dict[str, int]:
        return {hypercalls.name(nr): n for nr, n in sorted(self._vm.hypercall_counts().items())}

    def recent_hypercalls(self) -> list[HypercallRecord]:
        return [_record(r) for r in self._vm.recent_hypercalls()]

    @property
    def exceptions_delivered(self) -> int:
        return self._vm.exceptions_delivered

    @property
    def interrupts_delivered(self) -> int:
        return self._vm.interrupts_delivered

    @property
    def idle_waits(self) -> int:
        """Times the core slept with every vCPU idle (until a timer or a
        host source), without coming back to Python."""
        return self._vm.idle_waits

    @property
    def context_switches(self) -> int:
        """Times the engine went from one vCPU's registers to another's."""
        return self._vm.context_switches

    @property
    def code_cache_flushes(self) -> int:
        """Times the core threw all translated code away (each one is paid
        again in translation)."""
        return self._vm.code_cache_flushes

    @property
    def rdmsr_stats(self) -> tuple[int, int]:
        """(RDMSR sites the core hooks, reads it answered there): MSRs such
        as ARCH_CAPABILITIES that Unicorn alone would read as 0."""
        return self._vm.rdmsr_stats

    def symbolize(self, addr: int) -> str | None:
        """`function+offset` for a guest kernel address, from System.map or vmlinux."""
        if self._symbols is None:
            from .symbols import load_symbols

            self._symbols = load_symbols(self.image.path, self.system_map) or False
        return self._symbols.lookup(addr) if self._symbols else None

    def crash_report(self) -> str:
        """Every vCPU's registers and the last hypercalls, as xenctx and
        `xl dmesg` would show them. The vCPU the domain ended on comes first."""
        first = self.last_exit.vcpu if self.last_exit is not None and self.last_exit.vcpu is not None else 0
        lines = [f"domain {self.name} (domid {self.domid}): {self.outcome}"]
        order = ["rip", "rflags", "cs", "ss", "cpl", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "cr0", "cr2", "cr3", "cr4", "efer",
                 "fs_base", "gs_base"]
        for v in [first] + [v for v in range(self.vcpus) if v != first]:
            status = self.vcpu_status(v)
            if self.vcpus > 1:
                if v != first and not status["online"]:
                    lines.append(f"vcpu{v}: offline")
                    continue
                lines.append(f"vcpu{v}: {status['activity']}")
            regs = self.registers(v)
            sym = self.symbolize(regs["rip"])
            if sym:
                lines.append(f"  rip is at {sym}")
            for i in range(0, len(order), 4):
                lines.append("  " + "  ".join(f"{k:>7}: {regs[k]:016x}" for k in order[i : i + 4]))
        recent = self.recent_hypercalls()
        if recent:
            lines.append("last hypercalls:")
            lines += [f"  {r}" for r in recent[-10:]]
        return "\n".join(lines)


def _record(t: tuple) -> HypercallRecord:
    vcpu, nr, args, result, time_ns = t
    return HypercallRecord(vcpu, nr, tuple(args), result, time_ns)


def self_test() -> dict[str, int]:
    """Run the Unicorn workaround self-test (raises CoreError if it fails)."""
    return dict(_core.self_test())


__all__ = ["MAX_VCPUS", "Domain", "Outcome", "OutcomeKind", "ShutdownReason", "HypercallRecord", "self_test", "EXIT_STATUS"]
