#!/usr/bin/env python3
"""Latency benches measured inside small guests of our own:

* event channels (tests/guests/bench_events.c): a self-IPI's send-to-upcall
  latency, and one-shot timer lateness (+1 ms and +10 ms, halting with
  "sti; hlt" and spinning with interrupts on) against the pvclock;
* IPIs between two vCPUs (tests/guests/smp.c with bench=N): vCPU 0 sends
  to vCPU 1, which answers at once; vCPU 0 halts until the answer. Through
  event channels (as Linux sends its IPIs) and through the LAPIC;
* xenstore (tests/guests/xsbench.c): request/reply round trips over the
  ring page with pvhvm's built-in xenstore, polling the ring and blocking
  on the store port; ops/s.

    .venv/bin/python benches/bench_guests.py [--quick]

Guests count TSC cycles (the host TSC: RDTSC is not hooked); the host
converts them with its calibrated TSC frequency. Timer lateness is the
guest's pvclock time at the upcall minus the deadline it asked for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import guests, run_bench_guest, tsc_hz  # noqa: E402

STATS = ("min", "p50", "p99", "max")
TIMER_CASES = ("1ms_halt", "1ms_spin", "10ms_halt", "10ms_spin")


def events(hz: float, ipi: int = 2000, t1: int = 200, t10: int = 30) -> dict:
    """IPI latency in ns and timer lateness in us: {name: {stat: value}}."""
    b = run_bench_guest(guests()["bench_events"], cmdline=f"ipi={ipi} t1={t1} t10={t10}")
    out: dict = {"ipi_ns": {s: b[f"ipi_cycles_{s}"] / hz * 1e9 for s in STATS} | {"n": b["ipi_cycles_n"]}}
    for case in TIMER_CASES:
        key = f"timer_{case}_ns"
        out[f"timer_{case}_late_us"] = {s: b[f"{key}_{s}"] / 1e3 for s in STATS} | {"n": b[f"{key}_n"]}
    out["host_sleep_1ms_late_us"] = host_sleep_lateness(t1)
    # The TSC frequency the guest's pvclock implies, to cross-check `hz`.
    mul, shift = b["pvclock_mul"], b["pvclock_shift"]
    out["pvclock_tsc_mhz"] = 2**32 * 1e9 / (mul * 2.0**shift) / 1e6
    return out


def smp_ipi(hz: float, n: int = 1000) -> dict:
    """Round trips between vCPU 0 and vCPU 1 in us: {"evtchn"|"lapic": {stat: value}}."""
    b = run_bench_guest(guests()["smp"], cmdline=f"bench={n}", vcpus=2)
    return {kind: {s: b[f"ipi_rtt_{kind}_cycles_{s}"] / hz * 1e6 for s in STATS} | {"n": b[f"ipi_rtt_{kind}_cycles_n"]}
            for kind in ("evtchn", "lapic")}


def host_sleep_lateness(n: int, seconds: float = 0.001) -> dict:
    """The host's own floor for timer accuracy: how late time.sleep(1 ms)
    wakes up here (timer slack, scheduling), in us."""
    late = []
    for _ in range(n):
        t0 = time.perf_counter()
        time.sleep(seconds)
        late.append((time.perf_counter() - t0 - seconds) * 1e6)
    late.sort()
    return {"min": late[0], "p50": statistics.median_low(late), "p99": late[max(0, -(-99 * n // 100) - 1)],
            "max": late[-1], "n": n}


def xenstore(hz: float, n: int = 1000) -> dict:
    """Round trips in us ({stat: value}) and ops/s of each phase."""
    b = run_bench_guest(guests()["xsbench"], cmdline=f"n={n}")
    out: dict = {}
    for phase in ("write_poll", "read_poll", "read_block"):
        k = f"xs_{phase}"
        out[f"{phase}_us"] = {s: b[f"{k}_cycles_{s}"] / hz * 1e6 for s in STATS} | {"n": b[f"{k}_n"]}
        out[f"{phase}_ops_per_s"] = b[f"{k}_n"] / (b[f"{k}_total_cycles"] / hz)
    # Writes and reads (ring polling) together.
    total = b["xs_write_poll_total_cycles"] + b["xs_read_poll_total_cycles"]
    out["ops_per_s"] = (b["xs_write_poll_n"] + b["xs_read_poll_n"]) / (total / hz)
    out["block_sleeps"] = b["xs_block_sleeps"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Fewer samples.")
    args = ap.parse_args()
    hz = tsc_hz()
    ev = events(hz, *((300, 50, 10) if args.quick else ()))
    xs = xenstore(hz, 200 if args.quick else 1000)
    smp = smp_ipi(hz, 200 if args.quick else 1000)
    print(json.dumps({"tsc_mhz": hz / 1e6, "events": ev, "xenstore": xs, "smp_ipi_us": smp}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
