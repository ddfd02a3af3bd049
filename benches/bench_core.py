#!/usr/bin/env python3
"""pvhvm core benchmarks: hypercall round trip per entry path and guest
compute speed against Unicorn with no hooks (the ceiling), in one run.

    .venv/bin/python benches/bench_core.py [--runs N] [--json FILE]

Writes JSON (default benches/results/core-<time>.json) and prints a table.
The guest times itself with RDTSC; the host calibrates the TSC against its
monotonic clock, so cycles become nanoseconds. benches/run_all.py runs this
as part of the whole suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, guests, run_bench_guest, tsc_hz  # noqa: E402

# The bench guest's compute_loop (tests/guests/bench.c), 4 instructions a turn.
LOOP_CODE = bytes.fromhex("4801f8" "4831d0" "48ffcf" "75f5" "c3")
LOOP_ITERATIONS = 50_000_000
PATHS = ("vmcall", "vmmcall", "page")


def unicorn_ceiling() -> float:
    """Guest Minsn/s of the same loop on Unicorn with no hooks at all."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RDI, UC_X86_REG_RDX

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x100000, 0x1000)
    uc.mem_write(0x100000, LOOP_CODE)
    uc.reg_write(UC_X86_REG_RDI, LOOP_ITERATIONS)
    uc.reg_write(UC_X86_REG_RAX, 0)
    uc.reg_write(UC_X86_REG_RDX, 0x1234)
    t0 = time.perf_counter()
    uc.emu_start(0x100000, 0x100000 + len(LOOP_CODE) - 1)
    dt = time.perf_counter() - t0
    return LOOP_ITERATIONS * 4 / dt / 1e6


def fast_mode(speeds: list[float]) -> float:
    """The median of the runs in the upper half of the observed range: the
    fast engines' speed when speeds are bimodal, about the median when not."""
    mid = (min(speeds) + max(speeds)) / 2
    return statistics.median(v for v in speeds if v >= mid)


def measure(runs: int = 3, hz: float | None = None) -> dict:
    """Run the bench guest and the Unicorn ceiling `runs` times each
    (alternated), each on a fresh engine.

    The loop's speed is bimodal across Unicorn engines, with and without
    pvhvm (about 3x apart with no hooks, 2x in pvhvm here): an engine is
    fast or slow for its whole life, as if set by where the host places its
    code buffer. So both the median of all runs and the median of the fast
    runs (`fast_mode`) are reported, and the speed ratio compares fast runs
    to fast runs; every sample is kept."""
    elf = guests()["bench"]
    if LOOP_CODE not in elf.read_bytes():
        raise SystemExit("bench guest's compute_loop differs from LOOP_CODE")
    hz = hz or tsc_hz()
    guest_runs, ceilings = [], []
    for _ in range(runs):
        guest_runs.append(run_bench_guest(elf))
        ceilings.append(unicorn_ceiling())

    def med(key: str) -> float:
        return statistics.median(r[key] for r in guest_runs)

    guest_speeds = [r["loop_insns"] / (r["loop_cycles"] / hz) / 1e6 for r in guest_runs]
    result = {
        "runs": runs,
        "tsc_mhz": round(hz / 1e6, 1),
        "hypercall_ns": {p: round(med(f"hypercall_cycles_{p}") / hz * 1e9, 1) for p in PATHS},
        "guest_minsn_per_s": round(statistics.median(guest_speeds), 1),
        "guest_minsn_per_s_fast": round(fast_mode(guest_speeds), 1),
        "unicorn_no_hooks_minsn_per_s": round(statistics.median(ceilings), 1),
        "unicorn_no_hooks_minsn_per_s_fast": round(fast_mode(ceilings), 1),
        "samples": {"guest_minsn_per_s": [round(v, 1) for v in guest_speeds],
                    "unicorn_no_hooks_minsn_per_s": [round(c, 1) for c in ceilings],
                    "hypercall_ns": {p: [round(r[f"hypercall_cycles_{p}"] / hz * 1e9, 1) for r in guest_runs]
                                     for p in PATHS}},
    }
    result["guest_speed_ratio"] = round(result["guest_minsn_per_s_fast"] / result["unicorn_no_hooks_minsn_per_s_fast"],
                                        3)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        **measure(args.runs),
    }
    result["host"]["tsc_mhz"] = result.pop("tsc_mhz")

    out = args.json or RESULTS / f"core-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'metric':<38}{'value':>12}")
    for p, ns in result["hypercall_ns"].items():
        print(f"{'hypercall round trip, ' + p + ' (ns)':<38}{ns:>12.1f}")
    print(f"{'guest compute, median (Minsn/s)':<38}{result['guest_minsn_per_s']:>12.1f}")
    print(f"{'guest compute, fast runs (Minsn/s)':<38}{result['guest_minsn_per_s_fast']:>12.1f}")
    print(f"{'Unicorn, no hooks, median (Minsn/s)':<38}{result['unicorn_no_hooks_minsn_per_s']:>12.1f}")
    print(f"{'Unicorn, no hooks, fast runs (Minsn/s)':<38}{result['unicorn_no_hooks_minsn_per_s_fast']:>12.1f}")
    print(f"{'guest / Unicorn, fast runs':<38}{result['guest_speed_ratio']:>12.3f}")
    print(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
