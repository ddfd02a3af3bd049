#!/usr/bin/env python3
"""What the vCPU's speculation story costs: boot time and syscall-heavy work
of the default Debian guest with the truthful vCPU (ARCH_CAPABILITIES says
no flaw; Linux mitigates nothing costly), the old affected Haswell
(PVHVM_CPU_AFFECTED=1), each also with `mitigations=off`, against QEMU TCG
booting the same vmlinux and initramfs with -cpu Haswell (the model pvhvm's
vCPU reports) and with its default qemu64, all alternated in one run.

    .venv/bin/python benches/bench_cpu.py [--runs N] [--json FILE] [--skip-qemu]

Each run boots to the init marker (host wall time; the guest's uptime
too), then in the guest's shell times, by /proc/uptime: `dd bs=1` of
200000 bytes (400000 read/write syscalls) and 200 fork+exec of cat
(page faults, exec, exit). Writes JSON with medians and pvhvm/QEMU ratios.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import boot_bench_args, write_result  # noqa: E402
from bench_boot import MEMORY_MIB, QEMU, QEMU_SAME_CPU, qemu_version  # noqa: E402

MARKER = re.compile(rb"PVHVM-INIT-OK uptime=([0-9.]+)")
# Busybox sh asks the terminal where the cursor is right after its prompt.
PROMPT = re.compile(rb"# (?:\x1b\[6n)?")
# Quotes split the markers so that the shell's echo of the command never matches.
WORKLOADS = {
    "dd_s": "a=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/zero of=/dev/null bs=1 count=200000 2>/dev/null; "
            "b=$(cut -d' ' -f1 /proc/uptime); echo \"R\"\"ES $a $b\"",
    "exec_s": "a=$(cut -d' ' -f1 /proc/uptime); i=0; while [ $i -lt 200 ]; do cat /proc/uptime >/dev/null; "
              "i=$((i+1)); done; b=$(cut -d' ' -f1 /proc/uptime); echo \"R\"\"ES $a $b\"",
}
RESULT = re.compile(rb"RES ([0-9.]+) ([0-9.]+)")
KEYS = ("marker_s", "guest_uptime_s", *WORKLOADS)


class Session:
    """A guest booted with its console on our pipes."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None) -> None:
        self.t0 = time.perf_counter()
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=env)
        os.set_blocking(self.p.stdout.fileno(), False)
        self.out = bytearray()
        self.pos = 0

    def expect(self, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline = time.perf_counter() + timeout
        while True:
            m = pattern.search(self.out, self.pos)
            if m:
                self.pos = m.end()
                return m
            chunk = self.p.stdout.read(65536)
            if chunk:
                self.out += chunk
            elif self.p.poll() is not None or time.perf_counter() > deadline:
                tail = self.out[-1500:].decode(errors="replace")
                self.close()
                raise RuntimeError(f"no {pattern.pattern!r} (exit {self.p.returncode}):\n{tail}")
            else:
                time.sleep(0.002)

    def send(self, text: str) -> None:
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def close(self) -> None:
        try:
            self.send("poweroff -f\n")
            self.p.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
            self.p.wait()


def one_run(cmd: list[str], env: dict[str, str] | None, timeout: float) -> dict:
    s = Session(cmd, env)
    m = s.expect(MARKER, timeout)
    r = {"marker_s": time.perf_counter() - s.t0, "guest_uptime_s": float(m.group(1))}
    s.expect(PROMPT, 60)
    for key, command in WORKLOADS.items():
        s.send(command + "\n")
        m = s.expect(RESULT, timeout)
        r[key] = round(float(m.group(2)) - float(m.group(1)), 3)
        s.expect(PROMPT, 60)
    s.close()
    return r


def configs(g, skip_qemu: bool) -> dict[str, tuple[list[str], dict[str, str] | None]]:
    def pvhvm(extra: str) -> list[str]:
        return [sys.executable, "-m", "pvhvm", "boot", str(g.vmlinux), "--initrd", str(g.initrd), "--memory",
                str(MEMORY_MIB), "--net", "none", "--cmdline", f"console=hvc0 pvhvm.shell{extra}"]

    def qemu(cpu: str | None, extra: str = "") -> list[str]:
        return [QEMU, "-M", "pc", "-accel", "tcg", "-m", str(MEMORY_MIB), "-kernel", str(g.vmlinux), "-initrd",
                str(g.initrd), "-append", f"console=ttyS0 panic=-1 pvhvm.shell{extra}", "-nographic",
                "-nodefaults", "-no-reboot", "-serial", "stdio"] + (["-cpu", cpu] if cpu else [])

    env = os.environ.copy()
    env.pop("PVHVM_CPU_AFFECTED", None)
    affected = env | {"PVHVM_CPU_AFFECTED": "1"}
    c = {
        "pvhvm": (pvhvm(""), env),
        "pvhvm_affected": (pvhvm(""), affected),
        "pvhvm_mitigations_off": (pvhvm(" mitigations=off"), env),
        "pvhvm_affected_mitigations_off": (pvhvm(" mitigations=off"), affected),
    }
    if not skip_qemu:
        c["qemu_haswell"] = (qemu(QEMU_SAME_CPU), None)
        c["qemu_haswell_mitigations_off"] = (qemu(QEMU_SAME_CPU, " mitigations=off"), None)
        c["qemu64"] = (qemu(None), None)
    return c


def measure(runs: int = 3, timeout: float = 300, skip_qemu: bool = False, log=sys.stderr) -> dict:
    from pvhvm.images import prepare_default_guest

    g = prepare_default_guest()
    if not skip_qemu and shutil.which(QEMU) is None:
        raise SystemExit(f"{QEMU} not found (apt-get install qemu-system-x86), or pass --skip-qemu")
    cfgs = configs(g, skip_qemu)
    samples: dict[str, list[dict]] = {name: [] for name in cfgs}
    for i in range(runs):
        for name, (cmd, env) in cfgs.items():
            try:
                r = one_run(cmd, env, timeout)
            except RuntimeError as e:
                print(f"  cpu run {i + 1}/{runs} {name:32} FAILED: {str(e).splitlines()[0]}", file=log)
                samples[name].append({k: None for k in KEYS} | {"failed": True})
                continue
            samples[name].append(r)
            print(f"  cpu run {i + 1}/{runs} {name:32} " + ", ".join(f"{k} {r[k]:.2f}" for k in KEYS), file=log)
    median = {name: {k: (round(statistics.median(v), 3) if (v := [r[k] for r in rs if r.get(k) is not None])
                         else None) for k in KEYS} for name, rs in samples.items()}
    ratios: dict[str, dict[str, float]] = {}
    for name in median:
        if not name.startswith("pvhvm"):
            continue
        for q in ("qemu_haswell", "qemu64"):
            if q in median:
                ratios[f"{name}_over_{q}"] = {k: round(median[name][k] / median[q][k], 3) for k in KEYS
                                              if median[name][k] and median[q][k]}
        if name != "pvhvm":
            ratios[f"{name}_over_pvhvm"] = {k: round(median[name][k] / median["pvhvm"][k], 3) for k in KEYS
                                            if median[name][k] and median["pvhvm"][k]}
    return {"kernel": g.kernel_version, "qemu": None if skip_qemu else qemu_version(),
            "workloads": WORKLOADS, "runs": samples, "median": median, "ratios": ratios}


def main() -> int:
    args = boot_bench_args(__doc__)
    result, out = write_result("cpu", args.json, measure(args.runs, args.timeout, args.skip_qemu))
    print(f"{'median (s)':<34}" + "".join(f"{k:>15}" for k in KEYS))
    for name, m in result["median"].items():
        print(f"{name:<34}" + "".join(f"{m[k]:>15.2f}" if m[k] is not None else f"{'-':>15}" for k in KEYS))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
