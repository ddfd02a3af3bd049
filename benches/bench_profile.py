#!/usr/bin/env python3
"""Where the pvhvm boot's time goes: the default guest booted in-process
through the Python API (same vmlinux, initrd, command line and memory as
benches/bench_boot.py), with the Domain's run loop instrumented from the
outside.

    .venv/bin/python benches/bench_profile.py

`ProfiledDomain` subclasses `pvhvm.Domain` and wraps, without changing
them, the hooks its run loop calls on every exit: `_step` (one `Vm.run()`
plus the host work after it), `_drain`, the host loop's `poll`, `_handle`,
the device manager's `dispatch` (the port owners: console, xenstore, vifs)
and the after-event services. From those it reports wall time in the core vs in Python, and per
exit kind the count, the core time of the runs that ended that way and the
Python time spent after them (split into host work and idle waits: the
`poll(timeout)` calls that sleep on host sources when the domain has no
timer armed; the waits for a timer happen in the core, which counts them
in `Domain.idle_waits`). Hypercalls
by name, exceptions and interrupts delivered come from the core's counters.
Code-cache (TB) flushes come from the core's counter (all of them: Unicorn
flushes by itself only when its 1 GiB code buffer fills, and after a
single step, which the core counts).

The wrappers cost a little themselves; the overhead is estimated by timing
the same wrapper around a no-op and reported with the results.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_boot import CMDLINE, FIRST_LINE, MARKER, MEMORY_MIB  # noqa: E402

import pvhvm  # noqa: E402

perf = time.perf_counter


class ProfiledDomain(pvhvm.Domain):
    """A Domain whose run loop is timed from outside (api.py unchanged)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kinds: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "core_s": 0.0, "python_s": 0.0,
                                                                        "wait_s": 0.0})
        self.parts: dict[str, float] = defaultdict(float)  # Python time by part of the step
        self.wrapped_calls = 0
        self.step_s = 0.0
        self._kind: str | None = None
        self._wait_in_step = 0.0
        self._after_events = [self._timed_service(s) for s in self._after_events]
        self._wrap_host_side()

    def _wrap_host_side(self) -> None:
        poll, dispatch = self.loop.poll, self.devices.dispatch

        def timed_poll(timeout):
            t0 = perf()
            r = poll(timeout)
            dt = perf() - t0
            self.wrapped_calls += 1
            if timeout == 0:
                self.parts["poll"] += dt
            else:  # sleeping until the guest's timer (or a host event)
                self.parts["idle_wait"] += dt
                self._wait_in_step += dt
            return r

        def timed_dispatch(ports):
            t0 = perf()
            try:
                return dispatch(ports)
            finally:
                self.parts["devices"] += perf() - t0
                self.wrapped_calls += 1

        self.loop.poll = timed_poll  # type: ignore[method-assign]
        self.devices.dispatch = timed_dispatch  # type: ignore[method-assign]

    def _timed_service(self, service):
        owner = getattr(service, "__self__", None)
        name = f"service.{type(owner).__name__ if owner is not None else getattr(service, '__name__', 'service')}"

        def timed() -> bool:
            t0 = perf()
            try:
                return service()
            finally:
                self.parts[name] += perf() - t0
                self.wrapped_calls += 1

        return timed

    def add_service(self, service) -> None:
        super().add_service(self._timed_service(service))

    def _step(self, deadline=None):
        core0 = self.time_in_core
        self._kind = None
        self._wait_in_step = 0.0
        t0 = perf()
        outcome = super()._step(deadline)
        dt = perf() - t0
        self.step_s += dt
        self.wrapped_calls += 1
        core = self.time_in_core - core0
        k = self.kinds[self._kind or "?"]
        k["count"] += 1
        k["core_s"] += core
        k["python_s"] += dt - core - self._wait_in_step
        k["wait_s"] += self._wait_in_step
        return outcome

    def _drain(self) -> None:
        t0 = perf()
        super()._drain()
        self.parts["drain"] += perf() - t0
        self.wrapped_calls += 1

    def _handle(self, exit, progressed, deadline=None):
        self._kind = exit.kind
        t0 = perf()
        wait0 = self._wait_in_step
        r = super()._handle(exit, progressed, deadline)
        self.parts["handle"] += perf() - t0 - (self._wait_in_step - wait0)
        self.wrapped_calls += 1
        return r


def wrapper_overhead(n: int = 200_000) -> float:
    """Seconds one timing wrapper adds to a call (a no-op wrapped as above)."""
    parts: dict[str, float] = defaultdict(float)

    def noop() -> bool:
        return False

    def timed() -> bool:
        t0 = perf()
        try:
            return noop()
        finally:
            parts["x"] += perf() - t0

    t0 = perf()
    for _ in range(n):
        noop()
    bare = perf() - t0
    t0 = perf()
    for _ in range(n):
        timed()
    return max(0.0, (perf() - t0 - bare) / n)


def measure(timeout: float = 300) -> dict:
    from pvhvm.images import prepare_default_guest

    g = prepare_default_guest()
    times: dict[str, float] = {}
    buf = bytearray()
    start = [0.0]

    def console(data: bytes) -> None:
        buf.extend(data)
        now = perf() - start[0]
        if "first_line_s" not in times and FIRST_LINE.search(buf):
            times["first_line_s"] = now
        if "marker_s" not in times:
            m = MARKER.search(buf)
            if m:
                times["marker_s"] = now
                times["guest_uptime_s"] = float(m.group(1))

    t_build = perf()
    dom = ProfiledDomain(g.vmlinux, initrd=g.initrd, cmdline=CMDLINE, memory_mib=MEMORY_MIB, console=console)
    build_s = perf() - t_build
    start[0] = perf()
    outcome = dom.run(timeout=timeout)
    wall = perf() - start[0]
    if outcome.exit_status != 0 or "marker_s" not in times:
        raise RuntimeError(f"in-process boot failed ({outcome}):\n{buf[-2000:].decode(errors='replace')}")

    parts = dict(dom.parts)
    wait = parts.get("idle_wait", 0.0)
    python_s = dom.time_in_host - wait
    named = sum(v for k, v in parts.items() if k != "idle_wait")
    overhead = wrapper_overhead() * dom.wrapped_calls
    return {
        "kernel": g.kernel_version,
        "cmdline": CMDLINE,
        "memory_mib": MEMORY_MIB,
        "outcome": str(outcome),
        "build_s": build_s,  # Domain(...) construction: ELF load, initrd copy
        "wall_s": wall,
        "first_line_s": times.get("first_line_s"),
        "marker_s": times["marker_s"],
        "guest_uptime_s": times["guest_uptime_s"],
        "core_s": dom.time_in_core,
        "python_s": python_s,  # between runs, idle waits excluded
        "idle_wait_s": wait,
        "loop_s": wall - dom.step_s,  # run_until's own loop, outside _step
        "parts_s": {**parts, "other": max(0.0, python_s - named)},  # other: take_notifications, bookkeeping
        "exits": {k: dict(v) for k, v in sorted(dom.kinds.items(), key=lambda kv: -kv[1]["count"])},
        "hypercalls": dom.hypercall_counts(),
        "exceptions_delivered": dom.exceptions_delivered,
        "interrupts_delivered": dom.interrupts_delivered,
        "core_idle_waits": dom.idle_waits,  # timer waits slept in the core
        "code_cache_flushes": dom.code_cache_flushes,
        "instrumentation_calls": dom.wrapped_calls,
        "instrumentation_overhead_s": overhead,
    }


def main() -> int:
    r = measure()
    print(json.dumps(r, indent=2, default=lambda x: round(x, 6) if isinstance(x, float) else str(x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
