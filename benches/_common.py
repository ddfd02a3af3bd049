"""Helpers the benches share: the test guests, the TSC, BENCH lines, and
the metric entries that benches/run_all.py collects."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benches" / "results"
sys.path.insert(0, str(ROOT / "tests" / "guests"))

import build as guest_build  # noqa: E402

import pvhvm  # noqa: E402
from pvhvm import _core  # noqa: E402

BENCH_LINE = re.compile(r"^BENCH (\S+) (-?\d+)$", re.M)


def guests() -> dict[str, Path]:
    """The test guests, built (incrementally) with the host gcc."""
    return guest_build.build_all()


def tsc_hz(seconds: float = 0.25) -> float:
    """The host TSC frequency, against the monotonic clock. Guests read the
    host TSC directly (Unicorn's RDTSC is not hooked), so this converts
    guest-side cycle counts too."""
    t0, c0 = time.perf_counter_ns(), _core.host_tsc()
    time.sleep(seconds)
    t1, c1 = time.perf_counter_ns(), _core.host_tsc()
    return (c1 - c0) / ((t1 - t0) / 1e9)


def run_bench_guest(elf: Path, cmdline: str = "", memory_mib: int = 32, timeout: float = 300,
                    vcpus: int = 1) -> dict[str, int]:
    """Boot a bench guest; return its "BENCH key value" lines. Fails unless
    it powered off and printed no FAIL line."""
    dom = pvhvm.Domain(elf, cmdline=cmdline, memory_mib=memory_mib, vcpus=vcpus)
    outcome = dom.run(timeout=timeout)
    out = dom.console_output.decode(errors="replace")
    if outcome.exit_status != 0 or re.search(r"^FAIL", out, re.M):
        raise RuntimeError(f"{elf.name} failed ({outcome}):\n{out[-3000:]}")
    return {m[1]: int(m[2]) for m in BENCH_LINE.finditer(out)}


def metric(value: Any, unit: str, label: str, better: str | None = None, **extra: Any) -> dict:
    """One entry of the suite's "results": `value` (a number, or None when
    not measured, with the reason in `status`), its `unit`, a readable
    `label` and which direction is `better` ("lower"/"higher"/None)."""
    if isinstance(value, float):
        value = round(value, 6 if abs(value) < 1 else 3)
    entry = {"value": value, "unit": unit, "label": label}
    if better:
        entry["better"] = better
    entry.update(extra)
    return entry


def not_measured(unit: str, label: str, reason: str, better: str | None = None) -> dict:
    return metric(None, unit, label, better, status=f"not measured: {reason}")


def boot_bench_args(doc: str):
    """The command line the QEMU-compared boot benches share."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--skip-qemu", action="store_true", help="Boot under pvhvm only.")
    return ap.parse_args()


def write_result(kind: str, json_path: Path | None, measured: dict) -> tuple[dict, Path]:
    """A bench's result with when and where it ran, written as JSON to
    `json_path` or benches/results/KIND-TIME.json."""
    import json
    import os
    import platform

    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "host": {"machine": platform.machine(), "cpus": os.cpu_count()}, **measured}
    out = json_path or RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result, out
