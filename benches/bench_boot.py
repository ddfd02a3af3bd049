#!/usr/bin/env python3
"""Boot time of the default Debian guest: pvhvm against QEMU/TCG booting the
same vmlinux and initramfs by PVH, alternated, in one run.

    .venv/bin/python benches/bench_boot.py [--runs N] [--json FILE] [--skip-qemu]

Measures, for each hypervisor, wall time from start to the first kernel line
and to the init marker ("PVHVM-INIT-OK uptime=<s>"), and the guest's own
uptime at the marker. Prints a table and writes JSON (medians and the
pvhvm/QEMU ratio). benches/run_all.py runs this as part of the whole suite,
with benches/bench_profile.py's breakdown of the pvhvm boot.

Then the phase timeline, side by side: the same boots with each side's early
console on (`earlyprintk=xen`, `earlyprintk=serial,ttyS0`), so that the
first kernel line means the same on both (pvhvm's otherwise waits for hvc0,
QEMU's comes from its serial port): first line, the switch to the guest's
clocksource, the init marker, the exit; for pvhvm also what its profile's
timeline knows (`--profile` at a low rate: first guest instruction, first
hypercall, first user-space instruction).
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

MARKER = re.compile(rb"PVHVM-INIT-OK uptime=([0-9.]+)")
FIRST_LINE = re.compile(rb"\[\s*0\.0+\] Linux version")
CLOCKSOURCE = re.compile(rb"clocksource: Switched to clocksource \S+")
QEMU = "qemu-system-x86_64"
# The model pvhvm's vCPU presents (Unicorn's default for x86-64; Linux logs
# "Intel Core Processor (Haswell)" under both), under QEMU's name. pvhvm's
# also enumerates ARCH_CAPABILITIES (no speculation flaw, see cpuid.rs),
# which QEMU 7.2's TCG refuses ("TCG doesn't support requested feature"):
# under QEMU this guest mitigates everything (bench_cpu.py measures both).
QEMU_SAME_CPU = "Haswell"
# The pvhvm boot's command line, also used in-process by bench_profile.py.
CMDLINE = "console=hvc0"
MEMORY_MIB = 256
KEYS = ("first_line_s", "marker_s", "exit_s", "guest_uptime_s")
TIMELINE_KEYS = ("first_line_s", "clocksource_s", "marker_s", "exit_s")
# Each side's early console (the timeline's boots).
EARLY_PVHVM = "console=hvc0 earlyprintk=xen"
EARLY_QEMU = "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1"
# The pvhvm profile's events the timeline reports (pvhvm.profile), by key.
PROFILE_EVENTS = {"first_instruction_s": "first guest instruction", "first_hypercall_s": "first hypercall",
                  "first_user_instruction_s": "first user-space instruction"}


def timed_run(cmd: list[str], timeout: float) -> dict:
    """Run `cmd`, watching its stdout for the first kernel line and the marker."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out = bytearray()
    first = marker = clocksource = None
    uptime = None
    os.set_blocking(p.stdout.fileno(), False)
    while True:
        chunk = p.stdout.read(65536)
        now = time.perf_counter() - t0
        if chunk:
            out += chunk
            if first is None and FIRST_LINE.search(out):
                first = now
            if clocksource is None and CLOCKSOURCE.search(out):
                clocksource = now
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
        raise RuntimeError(f"no init marker from {cmd[0]} (exit {p.returncode}):\n{tail}")
    return {"first_line_s": first, "marker_s": marker, "exit_s": time.perf_counter() - t0, "guest_uptime_s": uptime,
            "clocksource_s": clocksource}


def commands(g, vcpus: int = 1) -> dict[str, list[str]]:
    # No network card: QEMU gets none either (-nodefaults), and `--net auto`
    # would depend on whether passt is installed here.
    pvhvm_cmd = [sys.executable, "-m", "pvhvm", "boot", str(g.vmlinux), "--initrd", str(g.initrd),
                 "--memory", str(MEMORY_MIB), "--cmdline", CMDLINE, "--net", "none", "--vcpus", str(vcpus)]
    # QEMU runs its vCPUs in parallel on host threads (multi-threaded TCG)
    # where pvhvm takes turns on one: on a host with fewer cores than
    # vCPUs that is the difference to expect.
    qemu_cmd = [QEMU, "-M", "pc", "-accel", "tcg", "-m", str(MEMORY_MIB), "-smp", str(vcpus), "-kernel",
                str(g.vmlinux), "-initrd", str(g.initrd), "-append", "console=ttyS0 panic=-1", "-nographic",
                "-nodefaults", "-no-reboot", "-serial", "stdio"]
    # "qemu" presents the CPU model pvhvm does, so both guests do the same
    # work (Linux picks its mitigations and code paths by CPU model);
    # "qemu_default_cpu" is QEMU's own default model, qemu64.
    return {"pvhvm": pvhvm_cmd, "qemu": qemu_cmd + ["-cpu", QEMU_SAME_CPU], "qemu_default_cpu": qemu_cmd}


def qemu_version() -> str | None:
    if shutil.which(QEMU) is None:
        return None
    return subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def alternate(cmds: dict[str, list[str]], runs: int, timeout: float, log) -> dict[str, list[dict]]:
    """Boot each command `runs` times, one of each in turn."""
    samples: dict[str, list[dict]] = {name: [] for name in cmds}
    for i in range(runs):
        for name, cmd in cmds.items():
            try:
                r = timed_run(cmd, timeout)
            except RuntimeError as e:
                # One boot that never reaches its marker (QEMU with more
                # vCPUs than host cores has hung here) is recorded, not fatal.
                print(f"  boot run {i + 1}/{runs} {name:16} FAILED: {str(e).splitlines()[0]}", file=log)
                samples[name].append({k: None for k in KEYS} | {"failed": True})
                continue
            samples[name].append(r)
            first = f"{r['first_line_s']:.2f} s" if r["first_line_s"] is not None else "-"
            print(f"  boot run {i + 1}/{runs} {name:16} first line {first}, "
                  f"marker {r['marker_s']:.2f} s, guest uptime {r['guest_uptime_s']:.2f} s", file=log)
    return samples


def measure(runs: int = 3, timeout: float = 300, skip_qemu: bool = False, log=sys.stderr) -> dict:
    """Boot the default guest `runs` times under each hypervisor, alternated."""
    from pvhvm.images import prepare_default_guest

    g = prepare_default_guest()
    if not skip_qemu and shutil.which(QEMU) is None:
        raise SystemExit(f"{QEMU} not found: apt-get install qemu-system-x86 (scripts/bench does it), "
                         "or pass --skip-qemu")
    cmds = commands(g)
    if skip_qemu:
        cmds = {"pvhvm": cmds["pvhvm"]}
    samples = alternate(cmds, runs, timeout, log)

    def med(name: str, key: str) -> float | None:
        values = [r[key] for r in samples[name] if r[key] is not None]
        return round(statistics.median(values), 3) if values else None

    summary = {name: {k: med(name, k) for k in KEYS} for name in samples}
    result = {
        "kernel": g.kernel_version,
        "qemu": None if skip_qemu else qemu_version(),
        "qemu_cpu": {"qemu": QEMU_SAME_CPU, "qemu_default_cpu": "qemu64 (QEMU's default)"},
        "runs": samples,
        "median": summary,
    }
    for q, suffix in (("qemu", ""), ("qemu_default_cpu", "_default_cpu")):
        if q not in summary or not summary[q]["marker_s"] or not summary["pvhvm"]["marker_s"]:
            continue
        result[f"ratio_marker_pvhvm_over_qemu{suffix}"] = round(
            summary["pvhvm"]["marker_s"] / summary[q]["marker_s"], 3)
        if summary["pvhvm"]["first_line_s"] and summary[q]["first_line_s"]:
            result[f"ratio_first_line_pvhvm_over_qemu{suffix}"] = round(
                summary["pvhvm"]["first_line_s"] / summary[q]["first_line_s"], 3)
    return result


def measure_smp(vcpus=(1, 2, 4), runs: int = 3, timeout: float = 300, skip_qemu: bool = False,
                log=sys.stderr) -> dict:
    """Boot to the init marker with each vCPU count under pvhvm (--vcpus)
    and QEMU TCG (-smp, the same CPU model), all alternated in one run."""
    from pvhvm.images import prepare_default_guest

    g = prepare_default_guest()
    cmds = {}
    for n in vcpus:
        c = commands(g, n)
        cmds[f"pvhvm_{n}"] = c["pvhvm"]
        if not skip_qemu:
            cmds[f"qemu_{n}"] = c["qemu"]
    samples = alternate(cmds, runs, timeout, log)
    median = {name: round(statistics.median(ok), 3) for name, rs in samples.items()
              if (ok := [r["marker_s"] for r in rs if r["marker_s"] is not None])}
    ratios = {n: round(median[f"pvhvm_{n}"] / median[f"qemu_{n}"], 3) for n in vcpus
              if f"qemu_{n}" in median and f"pvhvm_{n}" in median}
    failed = {name: sum(1 for r in rs if r.get("failed")) for name, rs in samples.items()}
    return {"vcpus": list(vcpus), "runs": samples, "median_init_s": median, "ratio_pvhvm_over_qemu": ratios,
            "failed_runs": {k: v for k, v in failed.items() if v}}


def measure_timeline(runs: int = 3, timeout: float = 300, skip_qemu: bool = False, log=sys.stderr) -> dict:
    """The phase timeline with each side's early console on, alternated."""
    import json
    import tempfile

    from pvhvm.images import prepare_default_guest

    g = prepare_default_guest()
    base = commands(g)
    with tempfile.TemporaryDirectory(prefix="pvhvm-timeline-") as tmp:
        profile = Path(tmp) / "boot.folded"
        pvhvm_cmd = base["pvhvm"][:]
        pvhvm_cmd[pvhvm_cmd.index("--cmdline") + 1] = EARLY_PVHVM
        # A low rate: the profile is here for its timeline, not its samples.
        cmds = {"pvhvm": pvhvm_cmd + ["--profile", str(profile), "--profile-hz", "10"]}
        if not skip_qemu:
            for name in ("qemu", "qemu_default_cpu"):
                cmd = base[name][:]
                cmd[cmd.index("-append") + 1] = EARLY_QEMU
                cmds[name] = cmd
        samples: dict[str, list[dict]] = {name: [] for name in cmds}
        for i in range(runs):
            one = alternate(cmds, 1, timeout, log)
            for name, rs in one.items():
                samples[name] += rs
            r = samples["pvhvm"][-1]
            if not r.get("failed") and profile.with_suffix(".folded.json").is_file():
                events = json.loads(profile.with_suffix(".folded.json").read_text())["events"]
                start = events.get("process start")
                for key, event in PROFILE_EVENTS.items():
                    r[key] = (events[event] - start) / 1e9 if start is not None and event in events else None

    def med(name: str, key: str) -> float | None:
        values = [r[key] for r in samples[name] if r.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    keys = {name: TIMELINE_KEYS + (tuple(PROFILE_EVENTS) if name == "pvhvm" else ()) for name in samples}
    median = {name: {k: med(name, k) for k in keys[name]} for name in samples}
    result = {"cmdline": {"pvhvm": EARLY_PVHVM, "qemu": EARLY_QEMU}, "runs": samples, "median": median}
    for q, suffix in (("qemu", ""), ("qemu_default_cpu", "_default_cpu")):
        for k in TIMELINE_KEYS:
            a, b = median["pvhvm"].get(k), median.get(q, {}).get(k)
            if a and b:
                result[f"ratio_{k.removesuffix('_s')}_pvhvm_over_qemu{suffix}"] = round(a / b, 3)
    return result


def print_timeline(t: dict) -> None:
    names = list(t["median"])
    print("timeline, early consoles on (s after start):")
    print(f"{'median':<34}" + "".join(f"{n:>18}" for n in names))
    rows = [("first_instruction_s", "first guest instruction"), ("first_hypercall_s", "first hypercall"),
            ("first_line_s", "first kernel line"), ("clocksource_s", "clocksource switch"),
            ("first_user_instruction_s", "first user-space instruction"), ("marker_s", "init marker"),
            ("exit_s", "until exit")]
    for k, label in rows:
        cells = [t["median"][n].get(k) for n in names]
        print(f"{label:<34}" + "".join(f"{c:>18.2f}" if c is not None else f"{'-':>18}" for c in cells))


def main() -> int:
    args = boot_bench_args(__doc__)
    result, out = write_result("boot", args.json, measure(args.runs, args.timeout, args.skip_qemu))
    summary = result["median"]
    names = list(summary)
    print(f"{'median':<28}" + "".join(f"{'qemu-tcg' if n == 'qemu' else n:>10}" for n in names))
    for k, label in (("first_line_s", "first kernel line (s)"), ("marker_s", "init marker (s)"),
                     ("guest_uptime_s", "guest uptime at marker (s)"), ("exit_s", "until exit (s)")):
        print(f"{label:<28}" + "".join(f"{summary[n][k]:>10.2f}" if summary[n][k] is not None else f"{'-':>10}"
                                       for n in names))
    if "ratio_marker_pvhvm_over_qemu" in result:
        print(f"boot to init, pvhvm / QEMU: {result['ratio_marker_pvhvm_over_qemu']:.2f}")
    print(f"json: {out}")
    timeline, out = write_result("boot_timeline", args.json and args.json.with_name("timeline-" + args.json.name),
                                 measure_timeline(args.runs, args.timeout, args.skip_qemu))
    print_timeline(timeline)
    print(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
