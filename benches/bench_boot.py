#!/usr/bin/env python3
"""Boot time of the default Debian guest: pvhvm against QEMU/TCG booting the
same vmlinux and initramfs by PVH, alternated, in one run.

    .venv/bin/python benches/bench_boot.py [--runs N] [--json FILE]

Measures, for each hypervisor, wall time from start to the first kernel line
and to the init marker ("PVHVM-INIT-OK uptime=<s>"), and the guest's own
uptime at the marker. Prints a table and writes JSON (medians and the
pvhvm/QEMU ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(rb"PVHVM-INIT-OK uptime=([0-9.]+)")
FIRST_LINE = re.compile(rb"\[\s*0\.0+\] Linux version")
QEMU = "qemu-system-x86_64"


def timed_run(cmd: list[str], timeout: float) -> dict:
    """Run `cmd`, watching its stdout for the first kernel line and the marker."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out = bytearray()
    first = marker = None
    uptime = None
    os.set_blocking(p.stdout.fileno(), False)
    while True:
        chunk = p.stdout.read(65536)
        now = time.perf_counter() - t0
        if chunk:
            out += chunk
            if first is None and FIRST_LINE.search(out):
                first = now
            m = MARKER.search(out)
            if m and marker is None:
                marker, uptime = now, float(m.group(1))
        elif p.poll() is not None:
            break
        else:
            time.sleep(0.002)
        if now > timeout:
            p.kill()
            break
    p.wait()
    if marker is None:
        tail = out[-2000:].decode(errors="replace")
        raise SystemExit(f"no init marker from {cmd[0]} (exit {p.returncode}):\n{tail}")
    return {"first_line_s": first, "marker_s": marker, "exit_s": time.perf_counter() - t0, "guest_uptime_s": uptime}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "python"))
    from pvhvm.images import prepare_default_guest

    g = prepare_default_guest()
    if shutil.which(QEMU) is None:
        raise SystemExit(f"{QEMU} not found: apt-get install qemu-system-x86 (scripts/setup --bench does it)")
    pvhvm_cmd = [sys.executable, "-m", "pvhvm", "boot", str(g.vmlinux), "--initrd", str(g.initrd),
                 "--memory", "256", "--cmdline", "console=hvc0"]
    qemu_cmd = [QEMU, "-M", "pc", "-accel", "tcg", "-m", "256", "-kernel", str(g.vmlinux), "-initrd", str(g.initrd),
                "-append", "console=ttyS0 panic=-1", "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio"]
    runs: dict[str, list[dict]] = {"pvhvm": [], "qemu": []}
    for i in range(args.runs):
        for name, cmd in (("pvhvm", pvhvm_cmd), ("qemu", qemu_cmd)):
            r = timed_run(cmd, args.timeout)
            runs[name].append(r)
            print(f"run {i + 1} {name:6} first line {r['first_line_s']:.2f} s, marker {r['marker_s']:.2f} s, "
                  f"guest uptime {r['guest_uptime_s']:.2f} s", file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name] if r[key] is not None)

    summary = {
        name: {k: round(med(name, k), 3) for k in ("first_line_s", "marker_s", "exit_s", "guest_uptime_s")}
        for name in runs
    }
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "kernel": g.kernel_version,
        "qemu": subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0],
        "runs": runs,
        "median": summary,
        "ratio_marker_pvhvm_over_qemu": round(summary["pvhvm"]["marker_s"] / summary["qemu"]["marker_s"], 3),
    }
    out = args.json or ROOT / "benches" / "results" / f"boot-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'median':<28}{'pvhvm':>10}{'qemu-tcg':>10}")
    for k, label in (("first_line_s", "first kernel line (s)"), ("marker_s", "init marker (s)"),
                     ("guest_uptime_s", "guest uptime at marker (s)"), ("exit_s", "until exit (s)")):
        print(f"{label:<28}{summary['pvhvm'][k]:>10.2f}{summary['qemu'][k]:>10.2f}")
    print(f"boot to init, pvhvm / QEMU: {result['ratio_marker_pvhvm_over_qemu']:.2f}")
    print(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
