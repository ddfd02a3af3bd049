#!/usr/bin/env python3
"""pvhvm core benchmarks: hypercall round trip per entry path and guest
compute speed against Unicorn with no hooks (the ceiling), in one run.

    .venv/bin/python benches/bench_core.py [--runs N] [--json FILE]

Writes JSON (default benches/results/core-<time>.json) and prints a table.
The guest times itself with RDTSC; the host calibrates the TSC against its
monotonic clock, so cycles become nanoseconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "guests"))

import build as guest_build  # noqa: E402

import pvhvm  # noqa: E402
from pvhvm import _core  # noqa: E402

# The bench guest's compute_loop (tests/guests/bench.c), 4 instructions a turn.
LOOP_CODE = bytes.fromhex("4801f8" "4831d0" "48ffcf" "75f5" "c3")
LOOP_ITERATIONS = 50_000_000


def tsc_hz() -> float:
    t0, c0 = time.perf_counter_ns(), _core.host_tsc()
    time.sleep(0.25)
    t1, c1 = time.perf_counter_ns(), _core.host_tsc()
    return (c1 - c0) / ((t1 - t0) / 1e9)


def run_guest(elf: Path) -> dict[str, int]:
    dom = pvhvm.Domain(elf, memory_mib=32)
    outcome = dom.run(timeout=300)
    if outcome.exit_status != 0:
        raise SystemExit(f"bench guest failed: {outcome}")
    return {m[1]: int(m[2]) for m in re.finditer(r"^BENCH (\S+) (\d+)$", dom.console_output.decode(), re.M)}


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    elf = guest_build.build_all()["bench"]
    if LOOP_CODE not in elf.read_bytes():
        raise SystemExit("bench guest's compute_loop differs from LOOP_CODE")
    hz = tsc_hz()
    runs = [run_guest(elf) for _ in range(args.runs)]
    ceilings = [unicorn_ceiling() for _ in range(args.runs)]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "tsc_mhz": round(hz / 1e6, 1)},
        "runs": args.runs,
        "hypercall_ns": {p: round(med(f"hypercall_cycles_{p}") / hz * 1e9, 1) for p in ("vmcall", "vmmcall", "page")},
        "guest_minsn_per_s": round(med("loop_insns") / (med("loop_cycles") / hz) / 1e6, 1),
        "unicorn_no_hooks_minsn_per_s": round(statistics.median(ceilings), 1),
    }
    result["guest_speed_ratio"] = round(result["guest_minsn_per_s"] / result["unicorn_no_hooks_minsn_per_s"], 3)

    out = args.json or ROOT / "benches" / "results" / f"core-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'metric':<38}{'value':>12}")
    for p, ns in result["hypercall_ns"].items():
        print(f"{'hypercall round trip, ' + p + ' (ns)':<38}{ns:>12.1f}")
    print(f"{'guest compute (Minsn/s)':<38}{result['guest_minsn_per_s']:>12.1f}")
    print(f"{'Unicorn, no hooks (Minsn/s)':<38}{result['unicorn_no_hooks_minsn_per_s']:>12.1f}")
    print(f"{'guest speed / Unicorn ceiling':<38}{result['guest_speed_ratio']:>12.3f}")
    print(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
