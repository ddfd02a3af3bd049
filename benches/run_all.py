#!/usr/bin/env python3
"""pvhvm's benchmark suite in one command: pvhvm against QEMU on the same
work, and where pvhvm's boot time goes.

    .venv/bin/python benches/run_all.py [--quick] [--skip-qemu] [--only SECTION ...]
    .venv/bin/python benches/run_all.py --compare OLD.json            # run, then diff against OLD
    .venv/bin/python benches/run_all.py --compare OLD.json NEW.json   # diff two runs, no run

Sections (in run order):
  core      hypercall round trip per entry path (VMCALL, VMMCALL, hypercall
            page), guest compute speed vs Unicorn with no hooks (bench_core.py)
  events    event channel send-to-upcall latency (self-IPI, interrupts on) and
            one-shot timer lateness at +1 ms / +10 ms, halting and spinning
            (bench_guests.py, guest tests/guests/bench_events.c)
  xenstore  xenstore round trips from inside a guest over the ring page, and
            ops/s (bench_guests.py, guest tests/guests/xsbench.c)
  boot      the default Debian guest to its init marker under pvhvm and QEMU
            TCG (PVH boot of the same vmlinux/initrd), alternated; medians
            and ratios; then the phase timeline side by side with each
            side's early console on (bench_boot.py)
  smp       several vCPUs: the default guest to its init marker with 1, 2
            and 4 vCPUs under pvhvm (--vcpus) and QEMU TCG (-smp, same CPU
            model), alternated; IPI round trips between two vCPUs
            (bench_boot.py, bench_guests.py with tests/guests/smp.c)
  cpu       what the vCPU's speculation story costs: the default guest with
            the truthful vCPU (no flaw, so no costly mitigation), the old
            affected one (PVHVM_CPU_AFFECTED=1), each with mitigations=off,
            and QEMU TCG -cpu Haswell / qemu64, alternated: boot to init, a
            dd bs=1 syscall loop and a fork+exec loop timed in the guest
            (bench_cpu.py)
  profile   the same boot in-process: core vs Python time, exits by kind,
            hypercalls by name, exceptions and interrupts (bench_profile.py)
  memory    peak RSS of `python -m pvhvm boot --memory 256/1024` (bench_memory.py)
  snapshot  the default guest saved at its shell prompt: a new process
            restoring it until the shell answers (issue 13: <= 150 ms) vs
            a cold boot and vs QEMU TCG restoring its own migration file of
            the same guest; 8 forks of it (spawn + first command, a write,
            PSS/RSS against 8 x the guest's used memory); the save file's
            size and allocated blocks (bench_snapshot.py)
  net       ping and TCP throughput over the vif on passt (bench_net.py);
            recorded as "not measured: <reason>" when it cannot run here
  disk      pvhvm (blkfront/blkback) vs QEMU TCG (virtio-blk), alternated, on
            fresh copies of the same images: sequential write/read MB/s and
            4k random read IOPS measured in the guest (benches/tools/
            diskbench.c); Debian 12 (rootfs.py's image) booted from the disk
            to its login prompt; TCP both ways, pvhvm on passt vs QEMU's
            -netdev user (bench_disk.py, bench_net.measure_vs_qemu)

Writes benches/results/suite-<time>.json (or --json FILE) and prints a table.
The JSON (schema 1):

  {"schema": 1, "when": ISO-8601, "host": {...}, "config": {...},
   "results": {NAME: {"value": number|null, "unit": str, "label": str,
                      "better": "lower"|"higher" (if it has a direction),
                      "status": "not measured: ..." (only when value is null)}},
   "details": {SECTION: raw data (runs, samples)}, "errors": {SECTION: message}}

NAMEs are dotted and stable (e.g. "boot.pvhvm.init_s", "events.ipi_ns.p50");
--compare matches them by name. Exit status 1 if a section failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, ROOT, metric, not_measured, tsc_hz  # noqa: E402

SCHEMA = 1
SECTIONS = ("core", "events", "xenstore", "boot", "smp", "cpu", "profile", "memory", "snapshot", "net",
            "disk")
MEMORY_SIZES = (256, 1024)
TIMER_CASES = ("1ms_halt", "1ms_spin", "10ms_halt", "10ms_spin")
NET_METRICS = {
    "net.ping_rtt_ms.avg": ("ms", "ping the gateway, rtt avg", "lower"),
    "net.ping_rtt_ms.max": ("ms", "ping the gateway, rtt max", "lower"),
    "net.tcp_host_to_guest_mbit_s": ("Mbit/s", "TCP host -> guest (passt forward)", "higher"),
    "net.tcp_guest_to_host_mbit_s": ("Mbit/s", "TCP guest -> host (via the gateway)", "higher"),
}

# The disk section's metrics: (unit, label, better). Every one is present in
# a run, with a value or the reason it has none.
DISK_IO = {"seq_write_mbs": ("MB/s", "sequential write, 1 MiB O_DIRECT", "higher"),
           "seq_read_mbs": ("MB/s", "sequential read, 1 MiB O_DIRECT", "higher"),
           "randread_iops": ("IOPS", "4 KiB random reads, queue depth 1", "higher"),
           "flush_ms": ("ms", "cache flush (fdatasync) after the rest", "lower")}
BOOT_DISK = {"switch_root_s": ("s", "Debian from disk: initramfs switches to the root disk", "lower"),
             "login_s": ("s", "Debian from disk: login prompt on the console", "lower")}
NET_VS_QEMU = {"tcp_host_to_guest_mbit_s": ("Mbit/s", "TCP host -> guest (port forward)", "higher"),
               "tcp_guest_to_host_mbit_s": ("Mbit/s", "TCP guest -> host (via the gateway)", "higher")}
WHO = {"pvhvm": "pvhvm", "qemu": "QEMU TCG"}


def ratio_name(key: str) -> str:
    """seq_write_mbs -> seq_write, login_s -> login, tcp_..._mbit_s -> tcp_..."""
    for suffix in ("_mbit_s", "_mbs", "_iops", "_s"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def disk_metrics() -> dict[str, tuple[str, str, str]]:
    names = {}
    for prefix, table in (("disk", DISK_IO), ("boot_disk", BOOT_DISK), ("net_vs_qemu", NET_VS_QEMU)):
        for key, (unit, label, better) in table.items():
            for hv, who in WHO.items():
                names[f"{prefix}.{hv}.{key}"] = (unit, f"{who}: {label}", better)
            if key != "flush_ms":
                names[f"{prefix}.ratio.{ratio_name(key)}"] = ("ratio", f"{label}: pvhvm / QEMU", better)
        if prefix == "boot_disk":
            names["boot_disk.pvhvm.shell_s"] = ("s", "pvhvm: Debian from disk: autologin shell prompt (hvc0)",
                                                "lower")
        for hv, who in WHO.items():
            names[f"{prefix}.{hv}.failed_runs"] = ("count", f"{who}: runs that did not finish", "lower")
    return names


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- host


def _cmd_out(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def host_info() -> dict:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        unicorn = version("unicorn")
    except Exception:
        unicorn = None
    from bench_boot import qemu_version

    commit = _cmd_out(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(_cmd_out(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "unicorn": unicorn,
        "qemu": qemu_version(),
        "pvhvm_commit": f"{commit}{'-dirty' if dirty else ''}" if commit else None,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------- sections


def run_core(ctx: dict) -> tuple[dict, dict]:
    import bench_core

    r = bench_core.measure(ctx["core_runs"], ctx["hz"])
    res = {f"core.hypercall_ns.{p}": metric(ns, "ns", f"hypercall round trip, {p}", "lower")
           for p, ns in r["hypercall_ns"].items()}
    n = r["runs"]
    res["core.guest_minsn_per_s"] = metric(r["guest_minsn_per_s"], "Minsn/s", f"guest compute loop, median of {n}",
                                           "higher")
    res["core.guest_minsn_per_s.fast"] = metric(r["guest_minsn_per_s_fast"], "Minsn/s",
                                                f"guest compute loop, median of the fast runs of {n}", "higher")
    res["core.unicorn_no_hooks_minsn_per_s"] = metric(r["unicorn_no_hooks_minsn_per_s"], "Minsn/s",
                                                       f"same loop, Unicorn with no hooks, median of {n}", "higher")
    res["core.unicorn_no_hooks_minsn_per_s.fast"] = metric(
        r["unicorn_no_hooks_minsn_per_s_fast"], "Minsn/s", f"same loop, Unicorn with no hooks, fast runs of {n}",
        "higher")
    res["core.guest_speed_ratio"] = metric(r["guest_speed_ratio"], "ratio",
                                           "guest / Unicorn ceiling, fast runs (speed is bimodal per engine)", "higher")
    return res, r


def run_events(ctx: dict) -> tuple[dict, dict]:
    import bench_guests

    r = bench_guests.events(ctx["hz"], **ctx["events_n"])
    ctx["host"]["pvclock_tsc_mhz"] = round(r["pvclock_tsc_mhz"], 1)
    res = {}
    n = r["ipi_ns"]["n"]
    for s in ("p50", "p99", "max"):
        res[f"events.ipi_ns.{s}"] = metric(r["ipi_ns"][s], "ns", f"self-IPI send -> upcall, {s} of {n}", "lower")
    for case in TIMER_CASES:
        d = r[f"timer_{case}_late_us"]
        delta, how = case.split("_")
        how = "halting" if how == "halt" else "spinning"
        for s in ("p50", "p99", "max"):
            res[f"timer.{case}_late_us.{s}"] = metric(d[s], "us", f"timer +{delta}, {how}: late by, {s} of {d['n']}",
                                                      "lower")
        # A timer that fires before its deadline is a bug, not a good number.
        res[f"timer.{case}_late_us.min"] = metric(d["min"], "us", f"timer +{delta}, {how}: late by, min (must be >= 0)")
    h = r["host_sleep_1ms_late_us"]
    for s in ("p50", "p99"):
        res[f"timer.host_sleep_1ms_late_us.{s}"] = metric(
            h[s], "us", f"host reference: time.sleep(1 ms) late by, {s} of {h['n']}")
    return res, r


def run_xenstore(ctx: dict) -> tuple[dict, dict]:
    import bench_guests

    r = bench_guests.xenstore(ctx["hz"], ctx["xs_n"])
    res = {}
    for phase, what in (("write_poll", "write, polling the ring"), ("read_poll", "read, polling the ring"),
                        ("read_block", "read, blocked on the port")):
        d = r[f"{phase}_us"]
        for s in ("p50", "p99"):
            res[f"xenstore.{phase}_us.{s}"] = metric(d[s], "us", f"{what}: round trip, {s} of {d['n']}", "lower")
    res["xenstore.ops_per_s"] = metric(r["ops_per_s"], "ops/s", "writes + reads back to back (polling)", "higher")
    return res, r


def run_boot(ctx: dict) -> tuple[dict, dict]:
    import bench_boot

    r = bench_boot.measure(ctx["boot_runs"], ctx["timeout"], skip_qemu=ctx["skip_qemu"], log=sys.stderr)
    ctx["host"]["guest_kernel"] = r["kernel"]
    labels = {"first_line_s": "first kernel line", "marker_s": "init marker", "guest_uptime_s": "guest uptime at init",
              "exit_s": "until the process exits"}
    names = {"first_line_s": "first_line_s", "marker_s": "init_s", "guest_uptime_s": "guest_uptime_s",
             "exit_s": "exit_s"}
    res = {}
    who = {"pvhvm": "pvhvm", "qemu": f"QEMU TCG -cpu {bench_boot.QEMU_SAME_CPU} (as pvhvm)",
           "qemu_default_cpu": "QEMU TCG, its default CPU (qemu64)"}
    for hv in who:
        for k, label in labels.items():
            name = f"boot.{hv}.{names[k]}"
            text = f"{who[hv]}: {label}, median of {ctx['boot_runs']}"
            if hv in r["median"]:
                res[name] = metric(r["median"][hv][k], "s", text, "lower")
            else:
                res[name] = not_measured("s", text, "--skip-qemu", "lower")
    for k, key in (("init", "ratio_marker_pvhvm_over_qemu"), ("first_line", "ratio_first_line_pvhvm_over_qemu"),
                   ("init_vs_default_cpu", "ratio_marker_pvhvm_over_qemu_default_cpu"),
                   ("first_line_vs_default_cpu", "ratio_first_line_pvhvm_over_qemu_default_cpu")):
        text = (f"{k.split('_vs')[0].replace('_', ' ')}: pvhvm / QEMU"
                + (" with its default CPU" if k.endswith("default_cpu") else " with the same CPU model"))
        res[f"boot.ratio.{k}"] = (metric(r[key], "ratio", text, "lower") if key in r
                                  else not_measured("ratio", text, "--skip-qemu" if ctx["skip_qemu"] else "no data",
                                                    "lower"))
    # The phase timeline, each side with its early console on.
    t = bench_boot.measure_timeline(ctx["boot_runs"], ctx["timeout"], skip_qemu=ctx["skip_qemu"], log=sys.stderr)
    events = {"first_instruction_s": "first guest instruction", "first_hypercall_s": "first hypercall",
              "first_line_s": "first kernel line", "clocksource_s": "switch to its clocksource",
              "first_user_instruction_s": "first user-space instruction", "marker_s": "init marker",
              "exit_s": "until the process exits"}
    for hv in who:
        for k, label in events.items():
            if hv != "pvhvm" and k not in bench_boot.TIMELINE_KEYS:
                continue
            text = f"{who[hv]}, early console on: {label}, median of {ctx['boot_runs']}"
            value = t["median"].get(hv, {}).get(k)
            res[f"boot_timeline.{hv}.{k}"] = (metric(value, "s", text, "lower") if value is not None
                                              else not_measured("s", text, "--skip-qemu" if hv not in t["median"]
                                                                else "not seen", "lower"))
    for q, suffix in (("qemu", ""), ("qemu_default_cpu", "_vs_default_cpu")):
        for k in ("first_line", "marker"):
            key = f"ratio_{k}_pvhvm_over_qemu{suffix.replace('_vs', '')}"
            text = f"early console on, {k.replace('_', ' ')}: pvhvm / {who[q]}"
            name = f"boot_timeline.ratio.{k}{suffix}"
            res[name] = (metric(t[key], "ratio", text, "lower") if key in t
                         else not_measured("ratio", text, "--skip-qemu" if ctx["skip_qemu"] else "no data", "lower"))
    r = {**r, "timeline": t}
    return res, r


def run_smp(ctx: dict) -> tuple[dict, dict]:
    import bench_boot
    import bench_guests

    ipi = bench_guests.smp_ipi(ctx["hz"], ctx["smp_ipi_n"])
    res = {}
    for kind, how in (("evtchn", "event channel"), ("lapic", "LAPIC")):
        d = ipi[kind]
        for s in ("p50", "p99"):
            res[f"smp.ipi_rtt_us.{kind}.{s}"] = metric(
                d[s], "us", f"IPI vCPU 0 -> 1 -> 0 by {how}, {s} of {d['n']}", "lower")
    boot = bench_boot.measure_smp((1, 2, 4), ctx["boot_runs"], ctx["timeout"], skip_qemu=ctx["skip_qemu"],
                                  log=sys.stderr)
    for n in boot["vcpus"]:
        for hv, who in (("pvhvm", "pvhvm --vcpus"), ("qemu", f"QEMU TCG -cpu {bench_boot.QEMU_SAME_CPU} -smp")):
            text = f"{who} {n}: init marker, median of {ctx['boot_runs']}"
            key = f"{hv}_{n}"
            why = "--skip-qemu" if ctx["skip_qemu"] and hv == "qemu" else "every boot failed"
            res[f"smp.boot.{key}.init_s"] = (metric(boot["median_init_s"][key], "s", text, "lower")
                                             if key in boot["median_init_s"] else not_measured("s", text, why, "lower"))
        text = f"boot to init with {n} vCPUs: pvhvm / QEMU (same CPU model)"
        res[f"smp.boot.ratio.{n}"] = (metric(boot["ratio_pvhvm_over_qemu"][n], "ratio", text, "lower")
                                      if n in boot["ratio_pvhvm_over_qemu"]
                                      else not_measured("ratio", text, "--skip-qemu", "lower"))
    return res, {"ipi_us": ipi, "boot": boot}


def run_cpu(ctx: dict) -> tuple[dict, dict]:
    import bench_cpu

    r = bench_cpu.measure(ctx["boot_runs"], ctx["timeout"], skip_qemu=ctx["skip_qemu"], log=sys.stderr)
    labels = {"marker_s": "boot to the init marker", "dd_s": "dd bs=1 of 200000 bytes, in the guest",
              "exec_s": "200 fork+exec of cat, in the guest"}
    res = {}
    for name, median in r["median"].items():
        for k, label in labels.items():
            text = f"{name}: {label}, median of {ctx['boot_runs']}"
            res[f"cpu.{name}.{k}"] = (metric(median[k], "s", text, "lower") if median[k] is not None
                                      else not_measured("s", text, "every run failed", "lower"))
    for pair, ratios in r["ratios"].items():
        for k in labels:
            if k in ratios:
                res[f"cpu.ratio.{pair}.{k}"] = metric(ratios[k], "ratio", f"{labels[k]}: {pair.replace('_over_', ' / ')}",
                                                      "lower")
    return res, r


def run_profile(ctx: dict) -> tuple[dict, dict]:
    import bench_profile

    r = bench_profile.measure(ctx["timeout"])
    res = {
        "profile.build_s": metric(r["build_s"], "s", "Domain(...) construction (load kernel, initrd)", "lower"),
        "profile.first_line_s": metric(r["first_line_s"], "s", "in-process: first kernel line", "lower"),
        "profile.init_s": metric(r["marker_s"], "s", "in-process: init marker", "lower"),
        "profile.guest_uptime_s": metric(r["guest_uptime_s"], "s", "in-process: guest uptime at init", "lower"),
        "profile.wall_s": metric(r["wall_s"], "s", "in-process: run() until power-off", "lower"),
        "profile.core_s": metric(r["core_s"], "s", "time in the core (Vm.run)", "lower"),
        "profile.python_s": metric(r["python_s"], "s", "time in Python between runs (idle waits excluded)", "lower"),
        "profile.idle_wait_s": metric(r["idle_wait_s"], "s", "Python sleeping until the guest's timer"),
        "profile.loop_s": metric(r["loop_s"], "s", "run_until's own loop, outside _step", "lower"),
        "profile.python_share": metric(r["python_s"] / r["wall_s"], "fraction", "Python share of the wall time",
                                       "lower"),
    }
    for part, v in sorted(r["parts_s"].items()):
        if part != "idle_wait":
            res[f"profile.python.{part}_s"] = metric(v, "s", f"Python: {part}", "lower")
    for kind, d in r["exits"].items():
        res[f"profile.exits.{kind}.count"] = metric(d["count"], "count", f"run() returned {kind!r}")
        res[f"profile.exits.{kind}.core_s"] = metric(d["core_s"], "s", f"core time of runs ending {kind!r}")
        res[f"profile.exits.{kind}.python_s"] = metric(d["python_s"], "s", f"Python time after {kind!r} exits",
                                                       "lower")
        if d["wait_s"]:
            res[f"profile.exits.{kind}.wait_s"] = metric(d["wait_s"], "s", f"idle wait after {kind!r} exits")
    for name, n in sorted(r["hypercalls"].items(), key=lambda kv: -kv[1]):
        res[f"profile.hypercalls.{name}"] = metric(n, "count", f"hypercall {name}")
    res["profile.hypercalls.total"] = metric(sum(r["hypercalls"].values()), "count", "hypercalls, all")
    res["profile.exceptions_delivered"] = metric(r["exceptions_delivered"], "count", "exceptions delivered")
    res["profile.interrupts_delivered"] = metric(r["interrupts_delivered"], "count", "interrupts delivered")
    res["profile.code_cache_flushes"] = metric(r["code_cache_flushes"], "count",
                                               "translated code thrown away whole (core's count)", "lower")
    res["profile.instrumentation_overhead_s"] = metric(
        r["instrumentation_overhead_s"], "s",
        f"estimated cost of the timing wrappers ({r['instrumentation_calls']} calls)")
    return res, r


def run_memory(ctx: dict) -> tuple[dict, dict]:
    import statistics

    import bench_memory

    runs = ctx["memory_runs"]
    raw: dict = {str(m): [] for m in MEMORY_SIZES}
    for _ in range(runs):  # sizes alternated; the peak varies by +-15 MiB from run to run
        for m in MEMORY_SIZES:
            r = bench_memory.peak_rss(m, ctx["timeout"])
            raw[str(m)].append(r)
            log(f"  memory: --memory {m}: peak RSS {r['peak_rss_mib']:.1f} MiB")
    res = {}
    for m in MEMORY_SIZES:
        peaks = [r["peak_rss_mib"] for r in raw[str(m)]]
        res[f"memory.peak_rss_mib.{m}"] = metric(statistics.median(peaks), "MiB",
                                                 f"peak RSS, `pvhvm boot --memory {m}`, median of {runs}", "lower")
    return res, raw


def snapshot_metrics(forks: int = 8) -> dict[str, tuple[tuple[str, ...], str, str, str | None]]:
    """The snapshot section's metrics from bench_snapshot's medians: name ->
    (the keys to it in "median", unit, label, better). Values in seconds
    are reported in ms where the unit says so."""
    m = {
        "snapshot.restore.pvhvm.answer_ms": (("pvhvm_restore", "answer_s"), "ms",
                                             "pvhvm: spawn `python -c` -> restored shell answered `echo ok`", "lower"),
        "snapshot.restore.pvhvm.python_start_ms": (("pvhvm_restore", "python_start_s"), "ms",
                                                   "pvhvm restore: spawn -> the interpreter runs the script", "lower"),
        "snapshot.restore.pvhvm.import_ms": (("pvhvm_restore", "import_s"), "ms", "pvhvm restore: import pvhvm",
                                             "lower"),
        "snapshot.restore.pvhvm.import_compiling_ms": (("import_compiling_s",), "ms",
                                                       "import pvhvm with no bytecode yet (the untimed warm-up)",
                                                       "lower"),
        "snapshot.restore.pvhvm.restore_call_ms": (("pvhvm_restore", "ready_s"), "ms",
                                                   "pvhvm restore: Domain.restore(file)", "lower"),
        "snapshot.restore.pvhvm.first_command_ms": (("pvhvm_restore", "first_command_s"), "ms",
                                                    "pvhvm restore: first `echo ok` through GuestShell", "lower"),
        "snapshot.restore.pvhvm.second_command_ms": (("pvhvm_restore", "second_command_s"), "ms",
                                                     "pvhvm restore: second `echo ok` (code translated by then)",
                                                     "lower"),
        "snapshot.restore.qemu.answer_ms": (("qemu_restore", "answer_s"), "ms",
                                            "QEMU TCG: spawn with -incoming exec:cat FILE -> serial shell answered",
                                            "lower"),
        "snapshot.restore.qemu.running_ms": (("qemu_restore", "running_s"), "ms",
                                             "QEMU TCG: spawn -> guest running again (QMP RESUME)", "lower"),
        "snapshot.boot.pvhvm.answer_s": (("pvhvm_boot", "answer_s"), "s",
                                         "pvhvm: spawn `python -c` -> cold-booted shell answered `echo ok`", "lower"),
        "snapshot.boot.qemu.answer_s": (("qemu_cold_boot_answer_s",), "s",
                                        "QEMU TCG: spawn -> cold-booted serial shell answered (1 run)", "lower"),
        "snapshot.ratio.restore_over_target": (("ratio", "restore_over_target"), "ratio",
                                               "pvhvm restore answer / issue 13's 150 ms target", "lower"),
        "snapshot.ratio.restore_over_goal": (("ratio", "restore_over_goal"), "ratio",
                                             "pvhvm restore answer / issue 13's 50 ms goal", "lower"),
        "snapshot.ratio.restore_over_cold_boot": (("ratio", "restore_over_cold_boot"), "ratio",
                                                  "pvhvm: restore answer / cold boot answer", "lower"),
        "snapshot.ratio.restore_pvhvm_over_qemu": (("ratio", "restore_pvhvm_over_qemu"), "ratio",
                                                   "restore answer: pvhvm / QEMU TCG", "lower"),
        "snapshot.fork.snapshot_ms": (("fork", "snapshot_s"), "ms", "Domain.snapshot() of the booted guest", "lower"),
        "snapshot.fork.spawn_ms": (("fork", "spawn_s"), "ms", "Snapshot.spawn(), per fork", "lower"),
        "snapshot.fork.first_command_ms": (("fork", "first_command_s"), "ms",
                                           "a fork's first command (`echo $((1+1))`)", "lower"),
        "snapshot.fork.per_fork_ms": (("fork", "per_fork_s"), "ms", "per fork: spawn + first command", "lower"),
        "snapshot.fork.write_ms": (("fork", "write_s"), "ms", "a fork writing 8 MiB to its tmpfs (dd)", "lower"),
        "snapshot.fork.snapshot_memfd_mib": (("fork", "snapshot_memfd_mib"), "MiB",
                                             "the snapshot's RAM image (memfd, allocated)", "lower"),
        "snapshot.fork.guest_used_mib": (("fork", "guest_used_mib"), "MiB",
                                         "the guest's used memory (MemTotal - MemFree)", None),
        "snapshot.fork.n_x_guest_used_mib": (("fork", "n_x_guest_used_mib"), "MiB",
                                             f"{forks} x the guest's used memory", None),
    }
    for key, what in (("footprint", "PSS with snapshot memfds counted whole"), ("pss", "PSS"), ("rss", "RSS")):
        for point, when in (("before", "before forking"), ("after_write", f"after {forks} forks ran and wrote")):
            m[f"snapshot.fork.{key}_mib.{point}"] = (("fork", f"{key}_mib.{point}"), "MiB",
                                                     f"this process's {what}, {when}", "lower")
        m[f"snapshot.fork.{key}_growth_mib"] = (("fork", f"{key}_growth_mib"), "MiB",
                                                f"{what}: growth for {forks} forks", "lower")
        m[f"snapshot.fork.{key}_growth_over_n_x_used"] = (
            ("fork", f"{key}_growth_over_n_x_used"), "ratio", f"{what}: growth for {forks} forks / "
            f"{forks} x guest used", "lower")
    m.update({
        "snapshot.save.save_ms": (("save", "save_s"), "ms", "Domain.save(file) of the booted guest", "lower"),
        "snapshot.save.file_mib": (("save", "file_mib"), "MiB", "save file size (st_size; RAM is 256 MiB)", None),
        "snapshot.save.allocated_mib": (("save", "allocated_mib"), "MiB", "save file allocated (st_blocks x 512)",
                                        "lower"),
        "snapshot.save.guest_used_mib": (("save", "guest_used_mib"), "MiB",
                                         "the guest's used memory (MemTotal - MemFree)", None),
        "snapshot.save.allocated_over_used": (("save", "allocated_over_used"), "ratio",
                                              "save file allocated / the guest's used memory", "lower"),
        "snapshot.save.qemu_allocated_mib": (("save", "qemu_allocated_mib"), "MiB",
                                             "QEMU's migration file of the same guest, allocated", None),
    })
    return m


def run_snapshot(ctx: dict) -> tuple[dict, dict]:
    import bench_snapshot

    r = bench_snapshot.measure(ctx["snapshot_runs"], ctx["timeout"], skip_qemu=ctx["skip_qemu"], log=sys.stderr)
    median = r["median"]
    counts = {kind: sum(1 for s in runs if not s.get("failed")) for kind, runs in r["runs"].items()}
    res = {}
    for name, (where, unit, label, better) in snapshot_metrics(r["forks"]).items():
        value = median
        for key in where:
            value = value.get(key) if isinstance(value, dict) else None
        if where[0] in counts:
            label = f"{label}, median of {counts[where[0]]}"
        if value is None:
            why = "--skip-qemu" if ctx["skip_qemu"] and "qemu" in name else "every run failed"
            res[name] = not_measured(unit, label, why, better)
            continue
        res[name] = metric(value * 1e3 if unit == "ms" else value, unit, label, better)
    for kind in ("pvhvm_restore", "pvhvm_boot", "qemu_restore"):
        hv, what = kind.split("_")
        name, label = f"snapshot.{what}.{hv}.failed_runs", f"{hv} {what}: runs that did not finish"
        runs = r["runs"].get(kind)
        res[name] = (metric(len(runs) - counts[kind], "count", f"{label}, of {len(runs)}", "lower") if runs is not None
                     else not_measured("count", label, "--skip-qemu", "lower"))
    return res, r


def run_net(ctx: dict) -> tuple[dict, dict]:
    import bench_net

    def placeholder(reason: str) -> dict:
        return {name: not_measured(unit, label, reason, better) for name, (unit, label, better) in NET_METRICS.items()}

    if not bench_net.backend_present():
        return placeholder("network backend not present"), {}
    try:
        r = bench_net.measure(ctx["quick"], log=sys.stderr)
    except bench_net.NotMeasured as e:
        return placeholder(str(e)), {}
    except Exception as e:  # the host's network (passt, DHCP) is not the suite's business
        log(traceback.format_exc())
        return placeholder(f"the network bench failed: {type(e).__name__}: {e}"), {"error": str(e)}
    res = placeholder("no result")
    if "ping_ms" in r:
        for s in ("avg", "max"):
            unit, label, better = NET_METRICS[f"net.ping_rtt_ms.{s}"]
            res[f"net.ping_rtt_ms.{s}"] = metric(r["ping_ms"][s], unit, f"{label} of {r['ping_ms']['n']}", better)
    else:
        for s in ("avg", "max"):
            res[f"net.ping_rtt_ms.{s}"]["status"] = r.get("ping_status", "not measured")
    for key in ("tcp_host_to_guest_mbit_s", "tcp_guest_to_host_mbit_s"):
        unit, label, better = NET_METRICS[f"net.{key}"]
        if key in r:
            res[f"net.{key}"] = metric(r[key], unit, f"{label}, {r['bytes'] >> 20} MiB", better)
        else:
            res[f"net.{key}"]["status"] = r.get(key.replace("_mbit_s", "_status"), "not measured")
    return res, r


def run_disk(ctx: dict) -> tuple[dict, dict]:
    """bench_disk.py's two parts and bench_net's comparison with QEMU, each
    on its own: one failing leaves its metrics "not measured" with why."""
    import bench_disk
    import bench_net

    names = disk_metrics()
    res = {n: not_measured(u, lbl, "no result", b) for n, (u, lbl, b) in names.items()}
    raw: dict = {}
    runs, quick, skip_qemu = ctx["disk_runs"], ctx["quick"], ctx["skip_qemu"]
    parts = (
        ("disk", "io", DISK_IO, lambda: bench_disk.measure_io(quick, runs, skip_qemu, ctx["timeout"], log=sys.stderr)),
        ("boot_disk", "boot", BOOT_DISK,
         lambda: bench_disk.measure_boot(runs, skip_qemu, max(ctx["timeout"], 600), log=sys.stderr)),
        ("net_vs_qemu", "net_vs_qemu", NET_VS_QEMU,
         lambda: bench_net.measure_vs_qemu(quick, runs, skip_qemu, ctx["timeout"], log=sys.stderr)),
    )
    for prefix, part, table, fn in parts:
        t0 = time.perf_counter()
        try:
            r = fn()
        except (bench_disk.NotMeasured, bench_net.NotMeasured) as e:
            for n in res:
                if n.startswith(prefix + "."):
                    res[n]["status"] = f"not measured: {e}"
            raw[part] = {"not_measured": str(e)}
            continue
        except Exception as e:  # one part failing must not lose the others
            log(traceback.format_exc())
            for n in res:
                if n.startswith(prefix + "."):
                    res[n]["status"] = f"not measured: {part} failed: {type(e).__name__}: {e}"
            raw[part] = {"error": f"{type(e).__name__}: {e}"}
            continue
        r["section_s"] = round(time.perf_counter() - t0, 1)
        raw[part] = r
        log(f"   disk/{part}: {r['section_s']} s")
        for hv in WHO:
            med = r["median"].get(hv)
            for key in list(table) + (["shell_s"] if prefix == "boot_disk" and hv == "pvhvm" else []):
                name = f"{prefix}.{hv}.{key}"
                unit, label, better = names[name]
                value = med.get(key) if med else None
                if value is not None:
                    n = sum(1 for s in r["runs"][hv] if s.get(key) is not None)
                    of = f"median of {n}" + (f" (of {len(r['runs'][hv])} runs)" if n < len(r["runs"][hv]) else "")
                    res[name] = metric(value, unit, f"{label}, {of}", better)
                else:
                    res[name]["status"] = "not measured: " + _disk_why(r, hv, key, skip_qemu)
            name = f"{prefix}.{hv}.failed_runs"
            if hv in r["runs"]:
                unit, label, better = names[name]
                failed = sum(1 for s in r["runs"][hv] if s.get("failed"))
                res[name] = metric(failed, unit, f"{label}, of {len(r['runs'][hv])}", better)
            else:
                res[name]["status"] = "not measured: " + _disk_why(r, hv, "failed_runs", skip_qemu)
        for key, value in r.get("ratio_pvhvm_over_qemu", {}).items():
            name = f"{prefix}.ratio.{ratio_name(key)}"
            if name in names and value is not None:
                unit, label, better = names[name]
                res[name] = metric(value, unit, label, better)
        for name in res:
            if name.startswith(f"{prefix}.ratio.") and res[name]["value"] is None:
                res[name]["status"] = "not measured: " + ("--skip-qemu" if skip_qemu else "a side has no value")
    return res, raw


def _disk_why(r: dict, hv: str, key: str, skip_qemu: bool) -> str:
    """Why a disk-section value is missing, from the part's raw data."""
    if hv not in r["median"]:
        return r.get("skipped", {}).get(hv) or ("--skip-qemu" if skip_qemu and hv == "qemu" else "not run")
    for s in r["runs"][hv]:
        for k in ("flush_error", "error", f"{key.removesuffix('_mbit_s')}_error"):
            if s.get(k) and (k != "flush_error" or key == "flush_ms"):
                return str(s[k])
    if key == "shell_s":
        return "no shell prompt within 60 s of the login prompt"
    return "every run failed"


RUNNERS = {"core": run_core, "events": run_events, "xenstore": run_xenstore, "boot": run_boot, "smp": run_smp, "cpu": run_cpu,
           "profile": run_profile, "memory": run_memory, "snapshot": run_snapshot, "net": run_net, "disk": run_disk}


# --------------------------------------------------------------------------- output


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    if a >= 1000:
        return f"{v:.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.4f}" if a >= 0.0001 or v == 0 else f"{v:.2e}"


def print_table(doc: dict, out=None) -> None:
    out = out or sys.stdout
    h = doc["host"]
    print(f"pvhvm bench suite, {doc['when']}  ({h.get('cpu')}, {h.get('cpus')} CPUs, pvhvm {h.get('pvhvm_commit')}, "
          f"{'quick' if doc['config']['quick'] else 'full'}; load {h.get('loadavg_start')} -> {h.get('loadavg_end')})",
          file=out)
    section = None
    width = max((len(n) for n in doc["results"]), default=20) + 2
    for name, e in doc["results"].items():
        top = name.split(".", 1)[0]
        if top != section:
            section = top
            print(f"\n[{section}]", file=out)
        note = e.get("status") if e["value"] is None else e.get("label", "")
        print(f"  {name:<{width}}{fmt(e['value']):>12} {e['unit']:<9}{note}", file=out)
    for sec, msg in doc.get("errors", {}).items():
        print(f"\nERROR in {sec}: {msg.splitlines()[-1] if msg else ''}", file=out)


def compare(old: dict, new: dict, out=None, threshold: float = 0.05) -> None:
    """Side by side by metric name, with new/old ratios. A change past
    `threshold` in the metric's `better` direction is marked better/worse."""
    out = out or sys.stdout
    for doc, tag in ((old, "old"), (new, "new")):
        h = doc.get("host", {})
        print(f"{tag}: {doc.get('when')}  {h.get('cpu')}  pvhvm {h.get('pvhvm_commit')}  "
              f"{'quick' if doc.get('config', {}).get('quick') else 'full'}  load {h.get('loadavg_start')}", file=out)
    if old.get("host", {}).get("cpu") != new.get("host", {}).get("cpu"):
        print("note: different CPUs; ratios compare machines as much as code", file=out)
    names = list(new["results"]) + [n for n in old["results"] if n not in new["results"]]
    width = max((len(n) for n in names), default=20) + 2
    print(f"\n  {'metric':<{width}}{'old':>12}{'new':>12}{'new/old':>10}  unit", file=out)
    for name in names:
        o = old["results"].get(name, {}).get("value")
        e = new["results"].get(name) or old["results"][name]
        n = new["results"].get(name, {}).get("value")
        ratio = n / o if isinstance(o, (int, float)) and isinstance(n, (int, float)) and o else None
        mark = ""
        if name not in old["results"]:
            mark = "new metric"
        elif name not in new["results"]:
            mark = "gone"
        elif ratio is not None and e.get("better") and abs(ratio - 1) >= threshold:
            improved = ratio < 1 if e["better"] == "lower" else ratio > 1
            mark = "better" if improved else "WORSE"
        rs = f"{ratio:.3f}" if ratio is not None else "-"
        print(f"  {name:<{width}}{fmt(o):>12}{fmt(n):>12}{rs:>10}  {e.get('unit', ''):<9}{mark}", file=out)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    head, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(description=" ".join(head.split()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    ap.add_argument("--quick", action="store_true", help="Fewer runs and samples (CI smoke).")
    ap.add_argument("--skip-qemu", action="store_true", help="Do not boot under QEMU (its entries: not measured).")
    ap.add_argument("--runs", type=int, help="Boot and core runs (default 5 and 9; 1 and 3 with --quick).")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION", help=f"Run only these: {SECTIONS}.")
    ap.add_argument("--skip", nargs="+", choices=SECTIONS, metavar="SECTION", default=[], help="Leave these out.")
    ap.add_argument("--json", type=Path, help="Write here (default benches/results/suite-<time>.json).")
    ap.add_argument("--compare", type=Path, nargs="+", metavar="JSON",
                    help="OLD.json: run, then diff against it. OLD.json NEW.json: diff the two, no run.")
    ap.add_argument("--timeout", type=float, default=300, help="Per boot (s).")
    args = ap.parse_args(argv)

    if args.compare and len(args.compare) > 2:
        ap.error("--compare takes OLD.json or OLD.json NEW.json")
    old = json.loads(args.compare[0].read_text()) if args.compare else None
    if old is not None and old.get("schema") != SCHEMA:
        ap.error(f"{args.compare[0]}: schema {old.get('schema')!r}, not {SCHEMA}")
    if args.compare and len(args.compare) == 2:
        new = json.loads(args.compare[1].read_text())
        compare(old, new)
        return 0

    sections = [s for s in (args.only or SECTIONS) if s not in args.skip]
    quick = args.quick
    ctx = {
        "quick": quick,
        "skip_qemu": args.skip_qemu,
        "timeout": args.timeout,
        "core_runs": args.runs or (3 if quick else 9),
        "boot_runs": args.runs or (1 if quick else 5),
        "events_n": {"ipi": 300, "t1": 50, "t10": 10} if quick else {"ipi": 2000, "t1": 200, "t10": 30},
        "xs_n": 200 if quick else 1000,
        "smp_ipi_n": 200 if quick else 1000,
        "memory_runs": 1 if quick else 3,
        "snapshot_runs": args.runs or (1 if quick else 3),
        "disk_runs": args.runs or (1 if quick else 3),
    }
    started = time.time()
    ctx["host"] = host_info()
    if any(s in sections for s in ("boot", "smp", "profile", "memory", "snapshot", "net", "disk")):
        from pvhvm.images import prepare_default_guest

        log("== preparing the default guest (downloads on first use)")
        ctx["host"]["guest_kernel"] = prepare_default_guest().kernel_version
    ctx["hz"] = tsc_hz()
    ctx["host"]["tsc_mhz"] = round(ctx["hz"] / 1e6, 1)

    results: dict = {}
    details: dict = {}
    errors: dict = {}
    for sec in sections:
        log(f"== {sec}")
        t0 = time.perf_counter()
        try:
            res, raw = RUNNERS[sec](ctx)
            results.update(res)
            details[sec] = raw
        except Exception as e:  # one section failing must not lose the others
            errors[sec] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
        log(f"   {sec}: {time.perf_counter() - t0:.1f} s")
    ctx["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    doc = {
        "schema": SCHEMA,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "host": ctx["host"],
        "config": {"quick": quick, "skip_qemu": args.skip_qemu, "sections": sections,
                   "boot_runs": ctx["boot_runs"], "core_runs": ctx["core_runs"], "events_n": ctx["events_n"],
                   "xenstore_n": ctx["xs_n"], "memory_runs": ctx["memory_runs"],
                   "snapshot_runs": ctx["snapshot_runs"], "disk_runs": ctx["disk_runs"],
                   "duration_s": round(time.time() - started, 1)},
        "results": results,
        "details": details,
        "errors": errors,
    }
    out = args.json or RESULTS / f"suite-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    print_table(doc)
    if old is not None:
        print()
        compare(old, doc)
    print(f"\njson: {out}")
    return 1 if errors else 0


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    return repr(x)


if __name__ == "__main__":
    sys.exit(main())
