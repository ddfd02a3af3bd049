#!/usr/bin/env python3
"""Peak memory (RSS) of `python -m pvhvm boot` booting the default guest to
its init marker and power-off, for several guest memory sizes.

    .venv/bin/python benches/bench_memory.py [--memory 256 1024]

The peak comes from the boot's own rusage (wait4's ru_maxrss, taken by a
small helper process, see HELPER), so it is the pvhvm process alone:
Python, the core, Unicorn's code cache and the guest RAM it touched (guest
RAM is mapped lazily). With `--net none`, so the number does not depend on
passt being installed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = re.compile(rb"PVHVM-INIT-OK uptime=([0-9.]+)")


# Linux carries the old address space's high-water mark into a process's
# maxrss across exec, so a child forked from a big process (run_all.py has
# booted guests in-process by then) reports at least its parent's RSS. The
# boot is therefore started by this small, fresh helper, and wait4() there
# gives the boot's own peak: max(the helper's ~10 MiB, the boot's).
HELPER = """
import os, subprocess, sys
out, cmd = sys.argv[1], sys.argv[2:]
p = subprocess.Popen(cmd)
pid, status, usage = os.wait4(p.pid, 0)
with open(out, "w") as f:
    f.write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def measured_run(cmd: list[str], stdout, timeout: float = 300) -> tuple[int, int]:
    """Run `cmd` through HELPER; its peak RSS (KiB) and exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "rusage")
        p = subprocess.Popen([sys.executable, "-I", "-S", "-c", HELPER, report, *cmd], stdin=subprocess.DEVNULL,
                             stdout=stdout, stderr=subprocess.STDOUT)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()  # the boot then sees its console's pipe close
            p.wait()
        try:
            maxrss_kib, status = (int(x) for x in Path(report).read_text().split())
        except (OSError, ValueError):
            return 0, p.returncode
    return maxrss_kib, status


def peak_rss(memory_mib: int, timeout: float = 300) -> dict:
    """Boot the default guest with --memory `memory_mib`; its peak RSS in MiB."""
    from pvhvm.images import prepare_default_guest

    prepare_default_guest()  # fetched and cached before timing anything
    # --net none: the same on every host (auto would depend on passt being
    # installed); the vif is measured by bench_net.py.
    cmd = [sys.executable, "-m", "pvhvm", "boot", "--memory", str(memory_mib), "--net", "none"]
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        maxrss_kib, status = measured_run(cmd, out, timeout)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    if status != 0 or not MARKER.search(text):
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {status}):\n{text[-2000:].decode(errors='replace')}")
    return {"memory_mib": memory_mib, "peak_rss_mib": maxrss_kib / 1024, "wall_s": wall,
            "command": " ".join(["python"] + cmd[1:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", type=int, nargs="+", default=[256, 1024])
    args = ap.parse_args()
    for m in args.memory:
        r = peak_rss(m)
        print(f"--memory {m:>5}: peak RSS {r['peak_rss_mib']:7.1f} MiB ({r['wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
