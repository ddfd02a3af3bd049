"""The guest profiler's host side: `pvhvm boot --profile FILE`,
`Domain(profile=...)` and `pvhvm profile FILE`.

The core samples where the domain's wall time goes (profile.rs): at each
tick the running vCPU's instruction pointer, CPL, code width and
frame-pointer chain, or "idle" (every vCPU waiting for a timer) or "host"
(Python between two runs). Here the samples are named (System.map, the ELF
symbols of a test guest, the kernel's own kallsyms, see symbols.py), cut
into phases by a timeline of events (the core's first guest instruction,
hypercall and user-space instruction; the first console line, Linux's
switch to the Xen clocksource and the default guest's init marker as the
consoles show them; the end), and written out:

- FILE: folded stacks, one line per stack with its sample count, the phase
  as the root frame (flamegraph.pl, speedscope and `pvhvm profile --svg`
  read it);
- FILE.json: the timeline, the rate and what named the samples.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

DEFAULT_HZ = 1000
PLACE_GUEST, PLACE_IDLE, PLACE_HOST = 0, 1, 2
IDLE, HOST, USER, UNKNOWN = "[idle]", "[host]", "[user]", "[unknown]"

# The timeline's events, in the order a Linux boot meets them.
PROCESS_START = "process start"
FIRST_INSTRUCTION = "first guest instruction"
FIRST_HYPERCALL = "first hypercall"
FIRST_CONSOLE_LINE = "first console line"
XEN_CLOCKSOURCE = "Xen clocksource"
FIRST_USER_INSTRUCTION = "first user-space instruction"
INIT = "init"
END = "end"
# The core's milestones (Vm.milestones) by event.
CORE_MILESTONES = {
    FIRST_INSTRUCTION: "first_instruction",
    FIRST_HYPERCALL: "first_hypercall",
    FIRST_USER_INSTRUCTION: "first_user_instruction",
}
# Console lines that mark an event (the default guest's /init prints the marker).
CONSOLE_EVENTS = {
    XEN_CLOCKSOURCE: b"clocksource: Switched to clocksource xen",
    INIT: b"PVHVM-INIT-OK",
}


def process_start_ns() -> int | None:
    """When this process started, on CLOCK_MONOTONIC (from /proc: to 10 ms)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        since_boot = start_ticks / os.sysconf("SC_CLK_TCK")
        # CLOCK_BOOTTIME counts from boot as /proc does; move to MONOTONIC.
        offset = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
        return int(since_boot * 1e9) - offset
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class Recorder:
    """A profile being taken of a running domain (Domain owns one when
    profiling): the core's samples as they come, and the console events."""

    def __init__(self, vm, hz: int = DEFAULT_HZ) -> None:
        self.vm = vm
        self.hz = hz
        vm.start_profile(hz)
        self.samples: list[tuple] = []
        self.dropped = 0
        self.events: dict[str, int] = {}
        start = process_start_ns()
        if start is not None:
            self.events[PROCESS_START] = start
        self._tails: dict[str, bytes] = {}
        self._stopped = False

    def on_console(self, data: bytes, source: str = "hvc0") -> None:
        """Console output as it arrives: the first line and the marked ones."""
        if all(e in self.events for e in (FIRST_CONSOLE_LINE, *CONSOLE_EVENTS)):
            return
        now = time.monotonic_ns()
        seen = self._tails.get(source, b"") + data
        if FIRST_CONSOLE_LINE not in self.events and b"\n" in seen:
            self.events[FIRST_CONSOLE_LINE] = now
        for event, line in CONSOLE_EVENTS.items():
            if event not in self.events and line in seen:
                self.events[event] = now
        self._tails[source] = seen[-max(len(x) for x in CONSOLE_EVENTS.values()):]

    def take(self) -> None:
        """Move the core's samples here (the core holds a bounded number)."""
        if self._stopped:
            return
        samples, self.dropped = self.vm.take_profile()
        self.samples += samples

    def stop(self) -> None:
        """The end of the profile: the last samples and the core's milestones."""
        if self._stopped:
            return
        samples, self.dropped = self.vm.stop_profile()
        self.samples += samples
        self._stopped = True
        for event, key in CORE_MILESTONES.items():
            t = self.vm.milestones[key]
            if t is not None:
                self.events.setdefault(event, t)
        self.events[END] = time.monotonic_ns()

    def profile(self, symbols=None, phys_to_virt: Iterable[tuple[int, int, int]] = (), unwind: bool = True,
                **meta) -> "Profile":
        """The profile so far (stop() first for the whole of it), named with
        `symbols`; with `unwind`, the callers the frame pointers give."""
        names = Namer(symbols, phys_to_virt, unwind)
        folded: dict[str, int] = {}
        timeline = Timeline(self.events)
        for t_ns, weight, place, _vcpu, cpl, _bits, ip, frames in self.samples:
            stack = [timeline.phase_at(t_ns)] + names.stack(place, cpl, ip, frames)
            key = ";".join(f.replace(";", ":") for f in stack)
            folded[key] = folded.get(key, 0) + weight
        meta = {"hz": self.hz, "dropped": self.dropped, "symbols": names.source, "frame_pointers": unwind, **meta}
        return Profile(folded, dict(self.events), meta)


class Namer:
    """Names for sampled addresses: function names, or a pseudo-frame."""

    def __init__(self, symbols, phys_to_virt: Iterable[tuple[int, int, int]] = (), unwind: bool = True) -> None:
        self.symbols = symbols
        self.unwind = unwind
        self.source = symbols.source if symbols else "none"
        # Early boot runs the kernel at its physical addresses (identity-mapped).
        self.phys_to_virt = list(phys_to_virt)
        self._cache: dict[int, str | None] = {}

    def function(self, addr: int) -> str | None:
        if addr in self._cache:
            return self._cache[addr]
        name = None
        if self.symbols:
            found = self.symbols.lookup(addr)
            if found is None:
                for paddr, size, vaddr in self.phys_to_virt:
                    if paddr <= addr < paddr + size:
                        found = self.symbols.lookup(addr - paddr + vaddr)
                        break
            if found is not None:
                # "name+0x1c": the function is the frame; "(nearest exported symbol)" stays a hint.
                name = re.sub(r"\+0x[0-9a-f]+", "", found)
        self._cache[addr] = name
        return name

    def stack(self, place: int, cpl: int, ip: int, frames: list[int]) -> list[str]:
        """Root first, as folded stacks are."""
        if place == PLACE_IDLE:
            return [IDLE]
        if place == PLACE_HOST:
            return [HOST]
        if cpl == 3:
            return [USER]
        leaf = self.function(ip) or UNKNOWN
        # Callers, as far as they are named (an unnamed one ends a chain
        # that a kernel without frame pointers made up).
        callers: list[str] = []
        for ret in frames if self.unwind else ():
            name = self.function(ret - 1)
            if name is None:
                break
            callers.append(name)
        return callers[::-1] + [leaf]


class Timeline:
    """Events in time order, and the phases between them. A phase is named
    by its number and the events around it ("2 first hypercall → first
    console line"), so that its name sorts in time order (a flame graph
    sorts frames by name)."""

    def __init__(self, events: dict[str, int]) -> None:
        self.events = sorted(events.items(), key=lambda e: e[1])
        self._times = [t for _, t in self.events]

    def phase_at(self, t_ns: int) -> str:
        if not self.events:
            return "profile"
        i = bisect.bisect_right(self._times, t_ns)
        if i == 0:
            return f"0 before {self.events[0][0]}"
        if i >= len(self.events):
            return f"{i} after {self.events[-1][0]}"
        return f"{i} {self.events[i - 1][0]} → {self.events[i][0]}"


@dataclass
class Profile:
    """Folded stacks (root = phase), the timeline's events (monotonic ns) and notes."""

    folded: dict[str, int]
    events: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(self.folded.values())

    def write(self, path: str | os.PathLike) -> None:
        path = Path(path)
        lines = [f"{stack} {n}" for stack, n in sorted(self.folded.items())]
        path.write_text("".join(line + "\n" for line in lines))
        sidecar = {"events": self.events, **self.meta}
        Path(f"{path}.json").write_text(json.dumps(sidecar, indent=2) + "\n")

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Profile":
        """A profile written by `write` (the .json beside it is optional)."""
        from .flamegraph import parse_folded

        path = Path(path)
        stacks = parse_folded(path.read_text(errors="replace"))
        folded = {";".join(s): n for s, n in stacks.items()}
        events, meta = {}, {}
        sidecar = Path(f"{path}.json")
        if sidecar.is_file():
            data = json.loads(sidecar.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"{sidecar}: not a profile's timeline")
            raw = data.pop("events", {})
            events = {str(k): int(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
            meta = data
        return cls(folded, events, meta)

    def phase(self, start: str, end: str) -> dict[str, int]:
        """{innermost function: samples} of the phase from event `start` to `end`."""
        for name, funcs in self.by_phase().items():
            if name.split(" ", 1)[-1] == f"{start} → {end}":
                return funcs
        return {}

    def by_phase(self) -> dict[str, dict[str, int]]:
        """{phase: {innermost function: samples}}."""
        out: dict[str, dict[str, int]] = {}
        for stack, n in self.folded.items():
            frames = stack.split(";")
            phase, leaf = frames[0], frames[-1]
            d = out.setdefault(phase, {})
            d[leaf] = d.get(leaf, 0) + n
        return out

    def timeline_ms(self) -> list[tuple[str, float]]:
        """Each event's time after the first one, in ms."""
        events = sorted(self.events.items(), key=lambda e: e[1])
        if not events:
            return []
        t0 = events[0][1]
        return [(name, (t - t0) / 1e6) for name, t in events]

    def report(self, top: int = 10) -> str:
        """The timeline, then the top functions of each phase."""
        hz = self.meta.get("hz")
        total = self.samples
        lines = []
        if self.events:
            first = sorted(self.events.items(), key=lambda e: e[1])[0][0]
            lines.append(f"timeline (ms after {first}):")
            previous = None
            for name, ms in self.timeline_ms():
                step = "" if previous is None else f"   (+{ms - previous:.0f})"
                lines.append(f"  {ms:9.1f}  {name}{step}")
                previous = ms
        source = self.meta.get("symbols")
        about = f"{total} samples" + (f" at {hz} Hz" if hz else "") + (f", named by {source}" if source else "")
        if self.meta.get("dropped"):
            about += f", {self.meta['dropped']} ticks dropped past the sample cap"
        lines.append(about)
        phases = self.by_phase()

        def number(phase: str) -> tuple[int, str]:
            first = phase.split(" ", 1)[0]
            return (int(first) if first.isdigit() else 1 << 30, phase)

        for phase in sorted(phases, key=number):
            funcs = phases[phase]
            n = sum(funcs.values())
            ms = f", {n * 1000 / hz:.0f} ms" if hz else ""
            lines.append("")
            lines.append(f"{phase}: {n} samples ({100 * n / total:.1f}%{ms})")
            for name, k in sorted(funcs.items(), key=lambda f: (-f[1], f[0]))[:top]:
                lines.append(f"  {100 * k / n:5.1f}%  {k:7d}  {name}")
        return "\n".join(lines)

    def svg(self, title: str | None = None) -> str:
        """A flame graph of it (flamegraph.py): phases at the bottom."""
        from .flamegraph import render_svg

        stacks = {tuple(s.split(";")): n for s, n in self.folded.items()}
        hz = self.meta.get("hz")
        kernel = self.meta.get("kernel")
        if title is None:
            title = "pvhvm: where the guest's time goes" + (f" ({Path(kernel).parent.name}/{Path(kernel).name})"
                                                            if kernel else "")
        subtitle = f"{self.samples} samples" + (f" at {hz} Hz" if hz else "")
        if self.meta.get("cmdline"):
            subtitle += f", command line \"{self.meta['cmdline']}\""
        return render_svg(stacks, title, subtitle=subtitle)
