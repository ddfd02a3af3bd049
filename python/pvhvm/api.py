"""The public Python API: build a PVH domain from a kernel image and run it.

    >>> import pvhvm
    >>> dom = pvhvm.Domain("vmlinux", cmdline="console=hvc0", memory_mib=256)
    >>> outcome = dom.run()
    >>> outcome.reason, dom.console_output
"""

from __future__ import annotations

import base64
import enum
import os
import re
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import _core, hypercalls, savefile
from .devices import ConsoleBackend, ConsoleHistory
from .devices.manager import DeviceManager
from .errors import BuildError, GuestError
from .runloop import HostLoop
from .xenstore import RingConnection, Store, XenstoreSocketServer

if TYPE_CHECKING:
    from .builder.domain import DomainPlan

# The builder and blkback are imported where a domain is built or gets a
# disk: a restore needs neither, and a restore is meant to start fast.

# The most vCPUs a domain may have.
MAX_VCPUS = _core.MAX_VCPUS

# How much console output a domain keeps for inspection (console_output,
# expect) and for `xl dmesg` (hypervisor_console), as Xen keeps a console
# ring: the newest of it; the rest went to the console sink as it came.
CONSOLE_KEEP = 4 << 20
HYPERVISOR_CONSOLE_KEEP = 1 << 20

# Where set_console_size puts "ROWS COLS", under the domain's home, for the
# guest to read (hvc0 has no resize message; the default guest's /init
# watches it). pvhvm's own name: Xen defines no such node.
CONSOLE_SIZE_NODE = "console/pvhvm-winsize"

# The longest the run loop sleeps in one idle wait (no timer armed) before
# it looks at its conditions again (seconds).
IDLE_WAIT_MAX = 1.0


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
        nics=(),
        profile: str | os.PathLike | bool | None = None,
        profile_hz: int = 1000,
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
        and in xenstore at /vm/<uuid>/uuid (Linux's /sys/hypervisor/uuid).
        `nics`: network cards after `net`'s (xl's vif list), each with
        `host` ("passt", "tap:NAME"), `mac` (or None) and `forwards`
        (pvhvm.config.VifSpec); they get devids 0, 1, … in order.
        `profile`: sample where the guest's time goes, `profile_hz` times a
        second (profile.py); a path gets the folded stacks (and PATH.json,
        the phase timeline) when the domain ends, True only keeps them for
        `stop_profile()`."""
        from .builder.domain import HVM_PARAM_CONSOLE_EVTCHN, HVM_PARAM_STORE_EVTCHN, plan_domain
        from .devices.blkback import attach_disk
        from .devices.disk import assign_vdevs, parse_disk_spec

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
        self.kernel_path = Path(plan.image.path)

        vm = _core.Vm(self.memory_bytes, domid, self.uuid.bytes, vcpus)
        plan.load(vm)
        self._init_host_side(vm, console=console, trace=trace)
        if profile is not None and profile is not False:
            self.start_profile(None if profile is True else profile, profile_hz)
        # The PV console (hvc0) and the xenstore ring, as xl sets them up:
        # ports bound to the host before the guest runs, owned by their backends.
        ops = self.backend_ops
        console_port, store_port = ops.bind_host_port(), ops.bind_host_port()
        vm.set_hvm_param(HVM_PARAM_CONSOLE_EVTCHN, console_port)
        vm.set_hvm_param(HVM_PARAM_STORE_EVTCHN, store_port)
        plan.populate_store(self.store, domid=domid, name=name, uuid=self.uuid, console_port=console_port,
                            store_port=store_port)
        self._init_rings(console_port, store_port)
        self._net = net
        self._net_forwards = tuple(net_forwards)
        self._init_endpoints(xenstore_socket)
        try:
            # Disks (vbd), served by blkback from raw images; opened (and
            # locked) now, so a bad image is a BuildError before anything runs.
            for spec in disk_specs:
                self.disks.append(attach_disk(self, spec))
            # Network cards (vif), served by netback on passt or a TAP device.
            if net is not None and net != "none":
                from .devices.net_host import open_host
                from .devices.netback import attach_vif

                host = open_host(net, net_forwards) if isinstance(net, str) else net
                self.vifs.append(attach_vif(self, host, mac=mac))
            for nic in nics:
                if not self.vifs:  # the first card's forwards are the ones a save keeps
                    self._net, self._net_forwards = nic.host, tuple(_forward_text(f) for f in nic.forwards)
                self.attach_nic(nic.host, mac=nic.mac, forwards=nic.forwards)
        except BaseException:
            self.close()
            raise

    def _init_host_side(self, vm: _core.Vm, *, console, trace) -> None:
        """What every domain has on the host, built or restored: the core,
        the console and trace sinks, the run loop and the device manager."""
        self._symbols = None
        self._vm = vm
        self._vm.tracing = trace is not None
        self._console_sink = console
        self._trace_sink = trace
        self._console = ConsoleHistory(CONSOLE_KEEP)
        self._expect_pos = 0  # a position in _console (counted from its first byte ever)
        self._hv_console = ConsoleHistory(HYPERVISOR_CONSOLE_KEEP)
        self.outcome: Outcome | None = None
        # How often run() returned, by exit kind, and the wall time spent in
        # the core vs in Python between runs (for benches/ and profiling).
        self.exit_counts: dict[str, int] = {}
        self.last_exit: _core.Exit | None = None
        self.time_in_core = 0.0
        self.time_in_host = 0.0
        self.started_at: float | None = None  # time.monotonic() of the first run()
        # The SCHEDOP_shutdown(suspend) exit's vCPU, while the guest waits to be saved.
        self._suspended_vcpu: int | None = None
        # Paused (xl pause, a debugger's stop): no vCPU runs, host sources are still served.
        self._paused = False
        # The xl-style config the domain was made from (pvhvm.config), kept in
        # its saves so that a restored domain can be rebuilt on reboot.
        self.config_text: str | None = None
        # The GDB stub (serve_gdb), if any.
        self._gdb = None
        # The guest profiler (start_profile), and where its profile goes.
        self._profiler = None
        self.profile_path: Path | None = None
        self.last_profile = None  # the last profile stop_profile() returned
        self._steps = 0

        # The run loop's host side, and the device manager on it.
        self.loop = HostLoop(self._vm)
        self.backend_ops = self._vm.backend_ops()
        self.store = Store()
        self.devices = DeviceManager(self.backend_ops, self.store, self.domid, self.loop,
                                     kick_store=lambda: self.xenstore.service())
        # Called after the guest's notifications were handled (hosts of the
        # store that must see its changes: the xenstore socket).
        self._after_events: list[Callable[[], bool]] = []
        self.disks: list = []
        self.vifs: list = []

    def _init_rings(self, console_port: int, store_port: int, *, console_state: dict | None = None,
                    ring_state: dict | None = None) -> None:
        """The console and xenstore backends on their ring pages and ports."""
        ops = self.backend_ops
        self.console_port, self.store_port = console_port, store_port
        self.console = ConsoleBackend(self._page(self.placement.console_ring),
                                      notify=lambda: ops.notify(console_port), sink=self._on_console)
        if console_state is not None:
            self.console.pending_input = bytearray(base64.b64decode(console_state["pending_input"]))
            self.console.bytes_out = int(console_state["bytes_out"])
        self.xenstore = RingConnection(self._page(self.placement.store_ring), self.store, self.domid,
                                       notify=lambda: ops.notify(store_port), state=ring_state)
        self.devices.own_port(console_port, self.console.on_event)
        self.devices.own_port(store_port, self.xenstore.on_event)

    def _init_endpoints(self, xenstore_socket) -> None:
        # The store for host tools, as xenstored's socket (XENSTORED_PATH).
        self.xenstore_socket: XenstoreSocketServer | None = None
        if xenstore_socket is not None:
            self.xenstore_socket = XenstoreSocketServer(self.store, xenstore_socket)
            self.xenstore_socket.attach(self)

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

    def serve_gdb(self, address: str):
        """Serve the GDB remote protocol on `address` ("HOST:PORT", "PORT"
        or ":PORT" on 127.0.0.1; port 0 picks a free one, the server's
        `port` says which), from the run loop: `gdb vmlinux -ex 'target
        remote :PORT'`. The domain pauses when gdb connects and goes on
        when it detaches. Returns the `gdbstub.GdbServer`."""
        from .gdbstub import GdbServer

        if self._gdb is not None:
            raise ValueError(f"already serving gdb on port {self._gdb.port}")
        self._gdb = GdbServer(self, address)
        return self._gdb

    def close(self) -> None:
        """Remove host-side endpoints: the xenstore socket, the devices
        (rings unmapped, disk workers stopped and images unlocked, passt
        stopped), the GDB stub."""
        if self._gdb is not None:
            self._gdb.close()
            self._gdb = None
        self._end_profile()
        if self.xenstore_socket is not None:
            self.xenstore_socket.close()
            self.xenstore_socket = None
        self.devices.close()
        self.vifs.clear()
        self.disks.clear()

    def _page(self, gpa: int) -> memoryview:
        """A zero-copy view of one page of low guest RAM."""
        return memoryview(self._vm.memory)[gpa : gpa + savefile.PAGE]

    def _on_console(self, data: bytes) -> None:
        """hvc0's output (the console backend's sink)."""
        if self._profiler is not None:
            self._profiler.on_console(data)
        self._show_console(data)

    def _show_console(self, data: bytes) -> None:
        self._console.append(data)
        if self._console_sink is not None:
            self._console_sink(data)

    def _on_hv_console(self, data: bytes) -> None:
        if self._profiler is not None:
            self._profiler.on_console(data, "xen")
        self._hv_console.append(data)
        # Once hvc0 speaks, earlyprintk's copies on the hypervisor console
        # would only repeat it: they stay in `hypervisor_console` (xl dmesg).
        if self.console.bytes_out == 0:
            self._show_console(data)

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
            if self._paused:
                if self._wait_paused(condition, deadline):
                    return True
                if self._paused:  # the deadline passed while paused
                    if condition is None:
                        self.outcome = Outcome(OutcomeKind.TIMEOUT, message=f"paused for {timeout} s")
                    return False
                continue
            outcome = self._step(deadline)
            if outcome is None and deadline is not None and time.monotonic() > deadline:
                if condition is not None:
                    return False
                outcome = Outcome(OutcomeKind.TIMEOUT, message=f"no shutdown within {timeout} s")
            if outcome is not None:
                self.console.service()
                self.outcome = outcome
                self._end_profile()
                if self._gdb is not None:
                    self._gdb.on_domain_ended(outcome)
                # The domain is gone, as after xl destroy: its images are
                # synced, unlocked and free for the next user. A domain that
                # suspended is not gone: it waits to be saved, its devices
                # as they were (close() lets them go).
                if self._suspended_vcpu is None:
                    for disk in self.disks:
                        disk.close()
                return False
            if condition is not None and condition():
                return True

    @property
    def paused(self) -> bool:
        """Whether the domain is paused (`pause()`)."""
        return self._paused

    def pause(self) -> None:
        """As `xl pause`: no vCPU runs until `unpause()`. Host sources (the
        xenstore socket, a control socket, a debugger) are still served by
        `run_until`, which goes on waiting on them; guest time goes on, as
        under Xen. Call it on the run loop's thread, or through
        call_soon_threadsafe."""
        self._paused = True

    def unpause(self) -> None:
        self._paused = False
        self.wake()

    def _wait_paused(self, condition: Callable[[], bool] | None, deadline: float | None) -> bool:
        """While paused: serve host sources until `condition()` holds (True),
        the domain is unpaused, or `deadline` passes (False)."""
        while self._paused:
            if condition is not None and condition():
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if self.loop.poll(left if left is not None else None):
                for service in self._after_events:
                    service()
        return False

    def _step(self, deadline: float | None = None) -> Outcome | None:
        """One run of the vCPU and the host work that follows it; an idle
        wait ends by `deadline` (time.monotonic()) at the latest."""
        t0 = time.perf_counter()
        exit = self._vm.run()
        t1 = time.perf_counter()
        self.last_exit = exit
        self.time_in_core += t1 - t0
        self._steps += 1
        if self._profiler is not None and self._steps % 256 == 0:
            self._profiler.take()
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
        outcome = self._handle(exit, progressed, deadline)
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
        searched = [-1]  # console end at the last search

        def matched() -> bool:
            log = self._console
            if log.end == searched[0]:
                return False  # nothing new: most exits print nothing
            searched[0] = log.end
            # Output older than the history keeps is gone unsearched.
            m = rx.search(log.data, max(self._expect_pos - log.base, 0))
            if m:
                found.append(m)
                self._expect_pos = log.base + m.end()
            return m is not None

        if matched() or self.run_until(matched, timeout):
            return found[0]
        if self.outcome is not None:
            raise GuestError(f"domain ended ({self.outcome}) before the console showed {rx.pattern!r}")
        raise TimeoutError(f"console did not show {rx.pattern!r} within {timeout} s")

    def send(self, text: str | bytes) -> None:
        """Type `text` into the guest console (hvc0)."""
        self.send_console_input(text.encode() if isinstance(text, str) else text)

    def _handle(self, exit: _core.Exit, progressed: bool, deadline: float | None = None) -> Outcome | None:
        kind = exit.kind
        if kind in ("console", "notify", "kicked", "host_io"):
            return None
        if kind == "debug":
            # A breakpoint or a finished step: the stub pauses the domain.
            if self._gdb is not None:
                self._gdb.on_debug_exit(exit)
            return None
        if kind == "shutdown":
            if exit.reason == ShutdownReason.SUSPEND:
                self._suspended_vcpu = exit.vcpu if exit.vcpu is not None else 0
            return Outcome(OutcomeKind.SHUTDOWN, ShutdownReason(exit.reason))
        if kind == "idle":
            # Every vCPU waits with no timer armed: only a host source
            # (console, xenstore socket, network) or a device's worker
            # thread (a disk answering) can wake the domain. The core waits
            # for both (Python's selector would not see a worker's event),
            # a second at most and no later than the caller's deadline, so
            # run(timeout=) is honoured.
            if progressed:
                return None
            if self.loop.has_sources or self.devices.can_wake():
                wait = IDLE_WAIT_MAX if deadline is None else min(IDLE_WAIT_MAX, deadline - time.monotonic())
                if wait > 0:
                    self._vm.wait_for_events(wait)
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
        """What the guest wrote to its consoles (hvc0 and the hypervisor
        console), in arrival order: all of it, or the newest CONSOLE_KEEP
        bytes at least once there was more (the console sink saw it all)."""
        return bytes(self._console)

    @property
    def hypervisor_console(self) -> bytes:
        """What the guest wrote with console_io only (`xl dmesg`): the newest
        HYPERVISOR_CONSOLE_KEEP bytes at least, as Xen's console ring."""
        return bytes(self._hv_console)

    def request_shutdown(self, action: str = "poweroff") -> None:
        """Ask the guest to shut down cleanly, as `xl shutdown` does: write
        `action` (poweroff, reboot, suspend, halt) to its control/shutdown.
        Call it on the run loop's thread, or through call_soon_threadsafe."""
        if action not in ("poweroff", "reboot", "suspend", "halt"):
            raise ValueError(f"unknown shutdown action {action!r}")
        self.store.write(0, f"/local/domain/{self.domid}/control/shutdown", action)
        self.xenstore.service()

    # -- save, restore, fork ------------------------------------------------

    def save(self, path: str | os.PathLike) -> int:
        """Save the domain to `path` as it is now, between runs (xl save
        without the pause: the domain may go on running). Device requests
        in flight are finished first. Returns the file's size. A guest that
        asked to suspend (SHUTDOWN_suspend) is saved as it asked, and is
        told on restore that its suspend was cancelled, as Xen's toolstack
        tells a guest it resumes (so it keeps its devices and channels)."""
        if self.outcome is not None and self._suspended_vcpu is None:
            raise GuestError(f"domain ended ({self.outcome}): nothing left to save")
        core, meta = self._capture()
        return savefile.write(path, self._vm, core, meta)

    @classmethod
    def restore(cls, path: str | os.PathLike, *, console: Callable[[bytes], None] | None = None,
                trace: Callable[[HypercallRecord], None] | None = None, name: str | None = None,
                domid: int | None = None, xenstore_socket: str | os.PathLike | None = None,
                net_forwards=None) -> "Domain":
        """A domain from a save file, ready to run on from where it was
        saved: guest RAM mapped copy-on-write from the file, vCPUs, event
        channels, grants, xenstore and devices as they were. Disks are
        opened again (the saved domain must have let them go); the network's
        host side is started afresh (passt: the guest's open connections
        are gone, its address stays). The guest's system time goes on from
        the saved instant, its wall clock is now's, and it gets a new VM
        generation ID. SaveFileError (one line) if the file cannot be used."""
        image = savefile.read(path)
        try:
            return cls._from_image(image.fd, image.ram_offset, image.core, image.meta, source=str(path),
                                   console=console, trace=trace, name=name, domid=domid,
                                   xenstore_socket=xenstore_socket, net_forwards=net_forwards, checked=True)
        finally:
            image.close()  # the mapping keeps what it needs of the file

    def snapshot(self) -> "Snapshot":
        """The domain as it is now, in memory: its RAM in a memfd that
        this domain (from now on) and every domain made from the
        snapshot share copy-on-write. `Snapshot.spawn()` makes domains."""
        core, meta = self._capture()
        fd = os.memfd_create(f"pvhvm-{self.name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, len(self._vm.memory))
            runs, crc = self._vm.write_ram_image(fd, 0)
            meta["ram"] = {"runs": [list(r) for r in runs], "crc": crc}
            # This domain's pages become the memfd's too: a fork costs no
            # copy of RAM the parent does not write again.
            self._vm.rebase_ram(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return Snapshot(fd, core, meta)

    def fork(self, n: int = 1, **kw) -> "list[Domain]":
        """`n` new domains from this one as it is now (the parent goes on):
        RAM shared copy-on-write, each with its own domain id, name,
        xenstore, console, network host side and a new VM generation ID.
        `kw` goes to each child (console=, trace=). Disks are refused unless
        read-only: two domains writing one image would corrupt it."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"fork count must be a positive number, not {n!r}")
        rw = [d.vdev for d in self.disks if not d.spec.readonly]
        if rw:
            raise BuildError(f"cannot fork a domain with writable disks ({', '.join(rw)}): "
                             "its children would write one image")
        snap = self.snapshot()
        try:
            return [snap.spawn(**kw) for _ in range(n)]
        finally:
            snap.close()

    def _capture(self) -> tuple[bytes, dict]:
        """The core's record and the host side's, between runs."""
        for device in self.devices.devices:
            device.quiesce()
        self._drain()
        self.console.service()
        meta = {
            "pvhvm": _version(),
            "domain": {"name": self.name, "domid": self.domid, "uuid": str(self.uuid), "vcpus": self.vcpus,
                       "memory_bytes": self.memory_bytes, "cmdline": self.cmdline,
                       "kernel": str(self.kernel_path),
                       "system_map": str(self.system_map) if self.system_map is not None else None},
            "placement": {"console_ring": self.placement.console_ring, "store_ring": self.placement.store_ring,
                          "generation_id": self.placement.generation_id},
            "ports": {"console": self.console_port, "store": self.store_port},
            "console": {"pending_input": base64.b64encode(bytes(self.console.pending_input)).decode(),
                        "bytes_out": self.console.bytes_out},
            "xenstore": self.store.save_state(),
            "xenstore_ring": self.xenstore.save_state(),
            "devices": [d.save_state() for d in self.devices.devices],
            "net": self._net if isinstance(self._net, str) else None,
            "net_forwards": [list(f) if isinstance(f, tuple) else f for f in self._net_forwards],
            "suspended_vcpu": self._suspended_vcpu,
            "config": self.config_text,
        }
        return self._vm.save_state(), meta

    @classmethod
    def _from_image(cls, fd: int, ram_offset: int, core: bytes, meta: dict, *, source: str, console, trace,
                    name: str | None, domid: int | None, xenstore_socket, net_forwards, checked: bool,
                    uuid: uuidlib.UUID | None = None) -> "Domain":
        try:
            saved = _SavedDomain.parse(meta)
        except (KeyError, TypeError, ValueError) as e:
            raise savefile.SaveFileError(f"{source}: damaged (domain record: {e})") from None
        if domid is not None and (isinstance(domid, bool) or not isinstance(domid, int) or not 1 <= domid < 0x7FF0):
            raise ValueError(f"domid must be 1 to {0x7FEF} (DOMID_FIRST_RESERVED - 1), not {domid!r}")
        self = cls.__new__(cls)
        self.name = name or saved.name
        self.domid = domid if domid is not None else saved.domid
        self.uuid = uuid or saved.uuid
        self.vcpus = saved.vcpus
        self.memory_bytes = saved.memory_bytes
        self.cmdline = saved.cmdline
        self.kernel_path = Path(saved.kernel)
        self.system_map = Path(saved.system_map) if saved.system_map else None
        self.plan = self.image = self.layout = None
        from .builder.domain import Placement

        self.placement = Placement((0, 0), console_ring=saved.console_ring, store_ring=saved.store_ring,
                                   generation_id=saved.generation_id)
        runs = saved.ram_runs if checked else None
        crc = saved.ram_crc if checked else None
        try:
            vm = _core.Vm.restore(fd, ram_offset, saved.memory_bytes, self.domid, self.uuid.bytes, core, runs, crc)
            # The pages the host side reads must be RAM (a record may lie about them).
            for what, gpa, size in (("console ring", saved.console_ring, savefile.PAGE),
                                    ("xenstore ring", saved.store_ring, savefile.PAGE),
                                    ("generation ID", saved.generation_id, 16)):
                if gpa % 8 or gpa + size > len(vm.memory):
                    raise savefile.SaveFileError(f"{source}: damaged (the {what} at {gpa:#x} is not in RAM)")
                vm.read_phys(gpa, size)
        except (_core.CoreError, OverflowError) as e:
            raise savefile.SaveFileError(f"{source}: {e}") from None
        self._init_host_side(vm, console=console, trace=trace)
        config = meta.get("config")
        self.config_text = config if isinstance(config, str) else None
        store_state, ring_state = meta["xenstore"], meta["xenstore_ring"]
        try:
            if self.domid != saved.domid or self.name != saved.name or self.uuid != saved.uuid:
                store_state, ring_state = _renamed_store(store_state, ring_state, saved, self)
            self.store.restore_state(store_state)
            self._init_rings(saved.console_port, saved.store_port, console_state=meta["console"],
                             ring_state=ring_state)
        except (KeyError, TypeError, ValueError) as e:
            raise savefile.SaveFileError(f"{source}: damaged (xenstore: {e})") from None
        self._net = saved.net
        self._net_forwards = tuple(net_forwards if net_forwards is not None else saved.net_forwards)
        self._init_endpoints(xenstore_socket)
        try:
            self._resume_devices(meta["devices"])
        except (KeyError, TypeError, ValueError) as e:
            self.close()
            raise savefile.SaveFileError(f"{source}: damaged (device record: {e!r})") from None
        except BaseException:
            self.close()
            raise
        self.renew_generation_id()
        # The guest's side of the store's changes (watches that fired while
        # restoring) and the console's queued input.
        self.xenstore.service()
        self.console.service()
        return self

    def _resume_devices(self, saved_devices: list) -> None:
        for saved in saved_devices:
            config = saved["config"]
            if saved["type"] == "vbd":
                from .devices.blkback import Blkback
                from .devices.disk import DiskSpec

                spec = DiskSpec(Path(config["path"]), bool(config["readonly"]), config["vdev"],
                                bool(config["cdrom"]))
                device = Blkback(self.devices, spec, max_queues=self.vcpus)
                self.disks.append(device)
            elif saved["type"] == "vif":
                from .devices.net_host import open_host
                from .devices.netback import Netback

                # The host side starts afresh: a new passt (the guest keeps
                # its address, its open connections are gone) or the TAP.
                kind = config.get("host")
                host = open_host(kind, self._net_forwards) if isinstance(kind, str) else None
                device = Netback(self.devices, host, devid=int(saved["devid"]), mac=config["mac"],
                                 split_event_channels=bool(config["split_event_channels"]))
                self.vifs.append(device)
            else:
                raise savefile.SaveFileError(f"a saved device of unknown type {saved['type']!r}")
            device.resume(saved)
            self.devices.devices.append(device)
        self.devices.settle()

    # -- hot-plug (xl network-attach/-detach, block-attach/-detach) ---------

    def attach_disk(self, spec):
        """As `xl block-attach`: a vbd on a raw image (a path, "PATH[,ro][,vdev=xvdb]"
        or xl's disk spec), before or while the domain runs; the guest's
        blkfront sees it appear. The next free vdev when the spec names none.
        Call it on the run loop's thread. Returns the Blkback."""
        from .devices.blkback import attach_disk
        from .devices.disk import assign_vdevs, parse_disk_spec

        spec = parse_disk_spec(spec) if isinstance(spec, (str, os.PathLike)) else spec
        spec = assign_vdevs([d.spec for d in self.disks] + [spec])[-1]  # refuses a vdev taken
        disk = attach_disk(self, spec)
        self.disks.append(disk)
        return disk

    def detach_disk(self, vdev: str) -> None:
        """As `xl block-detach`: unplug the vbd `vdev` (xvdb, 51728): its
        nodes go, its image is synced and unlocked."""
        for disk in self.disks:
            if vdev in (disk.vdev, str(disk.devid)):
                self.devices.detach(disk)
                self.disks.remove(disk)
                return
        raise BuildError(f"no disk {vdev!r} (the domain has {', '.join(d.vdev for d in self.disks) or 'none'})")

    def attach_nic(self, host="passt", *, mac: str | None = None, forwards=()):
        """As `xl network-attach`: a vif on `host` ("passt", "tap:NAME" or a
        NetHost), with the next free devid. Returns the Netback."""
        from .devices.net_host import open_host
        from .devices.netback import attach_vif

        devid = max((v.devid for v in self.vifs), default=-1) + 1
        # "none" opens nothing: a card with no link.
        end = open_host(host, forwards) if isinstance(host, str) else host
        try:
            vif = attach_vif(self, end, devid=devid, mac=mac)
        except BaseException:
            if end is not None:
                end.close()
            raise
        self.vifs.append(vif)
        return vif

    def detach_nic(self, devid: int) -> None:
        """As `xl network-detach`: unplug vif `devid`; its host end is closed."""
        for vif in self.vifs:
            if vif.devid == devid:
                self.devices.detach(vif)
                self.vifs.remove(vif)
                return
        raise BuildError(f"no network card {devid} (the domain has {', '.join(str(v.devid) for v in self.vifs) or 'none'})")

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

    def set_console_size(self, rows: int, cols: int) -> None:
        """Tell the guest the size of the terminal its console is shown on,
        as xenstore node CONSOLE_SIZE_NODE ("ROWS COLS", readable by the
        guest): the default guest's /init sets hvc0's size from it (stty,
        SIGWINCH included). Call it on the run loop's thread, or through
        call_soon_threadsafe."""
        for name, n in (("rows", rows), ("cols", cols)):
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 0xFFFF:
                raise ValueError(f"console {name} must be 1 to 65535, not {n!r}")  # struct winsize's u16
        self.store.write(0, f"/local/domain/{self.domid}/{CONSOLE_SIZE_NODE}", f"{rows} {cols}")
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
        symbols = self._kernel_symbols()
        return symbols.lookup(addr) if symbols else None

    def _kernel_symbols(self):
        if self._symbols is None:
            from .symbols import load_symbols

            self._symbols = load_symbols(self.kernel_path, self.system_map) or False
        return self._symbols or None

    # -- the guest profiler -------------------------------------------------

    def start_profile(self, path: str | os.PathLike | None = None, hz: int = 1000) -> None:
        """Sample where the guest's time goes, `hz` times a second, from now
        (profile.py). With `path`, the profile is written there when the
        domain ends; `stop_profile()` returns it at any time."""
        from .profile import Recorder

        if isinstance(hz, bool) or not isinstance(hz, int) or not 1 <= hz <= 20_000:
            raise BuildError(f"profile_hz must be a number from 1 to 20000, not {hz!r}")
        self._profiler = Recorder(self._vm, hz)
        self.profile_path = Path(path) if path is not None else None

    def stop_profile(self):
        """End the profile: a `pvhvm.profile.Profile` (folded stacks by phase,
        the timeline), written to the `start_profile` path if there was one."""
        recorder = self._profiler
        if recorder is None:
            raise GuestError("no profile is being taken")
        recorder.stop()
        self._profiler = None
        img = self.image
        segments = [(s.paddr, s.memsz, s.vaddr) for s in (img.segments if img else []) if s.memsz and s.vaddr != s.paddr]
        from .symbols import has_frame_pointers

        profile = recorder.profile(self._kernel_symbols(), segments, has_frame_pointers(self.kernel_path),
                                   kernel=str(self.kernel_path),
                                   cmdline=self.cmdline, vcpus=self.vcpus,
                                   outcome=str(self.outcome) if self.outcome else None)
        if self.profile_path is not None:
            profile.write(self.profile_path)
        self.last_profile = profile
        return profile

    def _end_profile(self) -> None:
        if self._profiler is not None and self.profile_path is not None:
            self.stop_profile()

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

    def context(self, vcpu: int | None = None, *, system_map: str | os.PathLike | None = None,
                stack_words: int = 32) -> str:
        """As `xenctx -s System.map`: registers, code, stack and call trace
        of `vcpu` (every online vCPU when None); `system_map` names
        addresses instead of the domain's own symbols (xenctx.py)."""
        from .xenctx import context

        return context(self, vcpu, system_map=system_map, stack_words=stack_words)

    def dump_core(self, path: str | os.PathLike) -> None:
        """Write an ELF core of the domain (vCPUs as threads, RAM at its
        physical and kernel-virtual addresses) that gdb reads (coredump.py).
        Between runs."""
        from .coredump import dump_core

        dump_core(self, path)


class Snapshot:
    """A domain at one instant, in memory (`Domain.snapshot()`): RAM in a
    memfd shared copy-on-write by every domain spawned from it."""

    def __init__(self, fd: int, core: bytes, meta: dict) -> None:
        self._fd = fd
        self._core = core
        self._meta = meta
        self._spawned = 0

    def spawn(self, *, name: str | None = None, domid: int | None = None, **kw) -> Domain:
        """A new domain from the snapshot, with its own domain id (the
        parent's + 1, 2, …) and name (parent-1, …), a new uuid and VM
        generation ID, its own store, console and network host side."""
        if self._fd < 0:
            raise ValueError("the snapshot is closed")
        self._spawned += 1
        base = self._meta["domain"]
        return Domain._from_image(self._fd, 0, self._core, self._meta, source="snapshot", checked=False,
                                  name=name or f"{base['name']}-{self._spawned}",
                                  domid=domid if domid is not None else int(base["domid"]) + self._spawned,
                                  uuid=uuidlib.uuid4(), console=kw.pop("console", None),
                                  trace=kw.pop("trace", None), xenstore_socket=kw.pop("xenstore_socket", None),
                                  net_forwards=kw.pop("net_forwards", None), **kw)

    def close(self) -> None:
        """Let the memfd go (the domains made from it keep their mappings)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class _SavedDomain:
    """The settings part of a save's domain record, checked."""

    name: str
    domid: int
    uuid: uuidlib.UUID
    vcpus: int
    memory_bytes: int
    cmdline: str
    kernel: str
    system_map: str | None
    console_ring: int
    store_ring: int
    generation_id: int
    console_port: int
    store_port: int
    net: str | None
    net_forwards: tuple
    suspended_vcpu: int | None
    ram_runs: list  # (first page, pages) of the RAM image that hold data
    ram_crc: int | None

    @classmethod
    def parse(cls, meta: dict) -> "_SavedDomain":
        d, p, ports = meta["domain"], meta["placement"], meta["ports"]

        def num(x, lo: int = 0, hi: int = 1 << 64) -> int:
            if isinstance(x, bool) or not isinstance(x, int) or not lo <= x < hi:
                raise ValueError(f"{x!r} is not a number in range")
            return x

        def text(x) -> str:
            if not isinstance(x, str):
                raise ValueError(f"{x!r} is not text")
            return x

        vcpus = num(d["vcpus"], 1, MAX_VCPUS + 1)
        susp = meta.get("suspended_vcpu")
        net = meta.get("net")
        if not isinstance(meta.get("ram"), dict) or not isinstance(meta["ram"].get("runs"), list):
            raise ValueError("no RAM runs")
        runs = []
        for run in meta["ram"]["runs"]:
            if not isinstance(run, list) or len(run) != 2:
                raise ValueError(f"RAM run {run!r} is not a pair")
            runs.append((num(run[0], 0, 1 << 52), num(run[1], 0, 1 << 52)))
        crc = meta["ram"].get("crc")
        for key in ("xenstore", "xenstore_ring", "console"):
            if not isinstance(meta.get(key), dict):
                raise ValueError(f"no {key}")
        if not isinstance(meta.get("devices"), list) or not all(isinstance(x, dict) for x in meta["devices"]):
            raise ValueError("devices is not a list of records")
        return cls(
            name=text(d["name"]), domid=num(d["domid"], 1, 0x7FF0), uuid=uuidlib.UUID(text(d["uuid"])),
            vcpus=vcpus, memory_bytes=num(d["memory_bytes"], 4096), cmdline=text(d["cmdline"]),
            kernel=text(d["kernel"]), system_map=None if d.get("system_map") is None else text(d["system_map"]),
            console_ring=num(p["console_ring"]), store_ring=num(p["store_ring"]),
            generation_id=num(p["generation_id"]), console_port=num(ports["console"], 1, 1 << 17),
            store_port=num(ports["store"], 1, 1 << 17), net=None if net is None else text(net),
            net_forwards=tuple(tuple(f) if isinstance(f, list) else text(f) for f in meta.get("net_forwards", [])),
            suspended_vcpu=None if susp is None else num(susp, 0, vcpus),
            ram_runs=runs, ram_crc=None if crc is None else num(crc, 0, 1 << 32),
        )


def _renamed_store(state: dict, ring: dict, old: _SavedDomain, new: Domain) -> tuple[dict, dict]:
    """The saved store and ring for a domain restored or forked under
    another id, name or uuid: its home moves with the id (the guest's
    relative paths follow), permissions and the nodes that name it say so;
    backends keep their directories, whose paths the guest has cached."""
    o, n = old.domid, new.domid
    old_home, new_home = f"/local/domain/{o}", f"/local/domain/{n}"
    old_vm, new_vm = f"/vm/{old.uuid}", f"/vm/{new.uuid}"

    def move(path: str) -> str:
        for a, b in ((old_home, new_home), (old_vm, new_vm)):
            if path == a or path.startswith(a + "/"):
                return b + path[len(a):]
        return path

    def perm(p: str) -> str:
        return p[0] + str(n) if p[1:] == str(o) else p

    def text(b64: str) -> str:
        return base64.b64decode(b64).decode("utf-8", "replace")

    def b64(value: str) -> str:
        return base64.b64encode(value.encode()).decode()

    nodes = []
    for node in state["nodes"]:
        path = move(node["path"])
        value = node["value"]
        leaf = path.rsplit("/", 1)[-1]
        if leaf in ("frontend-id", "domid") and text(value) == str(o):
            value = b64(str(n))
        elif leaf == "name" and path == f"{new_home}/name":
            value = b64(new.name)
        elif leaf in ("frontend", "vm", "uuid") and value:
            v = text(value)
            value = b64(str(new.uuid)) if leaf == "uuid" and v == str(old.uuid) else b64(move(v))
        nodes.append(dict(node, path=path, value=value, perms=[perm(p) for p in node["perms"]]))
    conns = [dict(c, domid=n if c["domid"] == o else c["domid"]) for c in state["guest_connections"]]
    introduced = [n if d == o else d for d in state["introduced"]]
    return dict(state, nodes=nodes, guest_connections=conns, introduced=introduced), dict(ring, domid=n)


def _forward_text(f) -> str | tuple:
    """A port forward as a save's domain record keeps it (JSON)."""
    from .devices.net_host import Forward

    return f"{f.proto}:{f.host_port}:{f.guest_port}" if isinstance(f, Forward) else f


def _version() -> str:
    from . import __version__

    return __version__


def _record(t: tuple) -> HypercallRecord:
    vcpu, nr, args, result, time_ns = t
    return HypercallRecord(vcpu, nr, tuple(args), result, time_ns)


def self_test() -> dict[str, int]:
    """Run the Unicorn workaround self-test (raises CoreError if it fails)."""
    return dict(_core.self_test())


__all__ = ["MAX_VCPUS", "Domain", "Snapshot", "Outcome", "OutcomeKind", "ShutdownReason", "HypercallRecord", "self_test", "EXIT_STATUS"]
