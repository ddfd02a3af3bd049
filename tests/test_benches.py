"""The benchmark suite (benches/): its guests measure sane numbers, the boot
profiler's accounting adds up, and run_all.py writes valid schema-1 JSON
and compares two runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))

import _common  # noqa: E402
import bench_guests  # noqa: E402
import bench_memory  # noqa: E402
import bench_net  # noqa: E402
import bench_profile  # noqa: E402
import bench_snapshot  # noqa: E402
import run_all  # noqa: E402

STATS = ("min", "p50", "p99", "max")


@pytest.fixture(scope="module")
def hz() -> float:
    return _common.tsc_hz(0.1)


def _ordered(d: dict) -> bool:
    return d["min"] <= d["p50"] <= d["p99"] <= d["max"]


def test_bench_events_guest(hz):
    r = bench_guests.events(hz, ipi=50, t1=5, t10=2)
    ipi = r["ipi_ns"]
    assert ipi["n"] == 50 and _ordered(ipi)
    # A self-IPI costs at least a hypercall, and arrives on return from it.
    assert 10 < ipi["p50"] < 1_000_000, ipi
    for case in bench_guests.TIMER_CASES:
        late = r[f"timer_{case}_late_us"]
        assert late["n"] == (5 if case.startswith("1ms") else 2) and _ordered(late), (case, late)
        assert late["min"] > -5, f"{case}: a timer fired {-late['min']:.1f} us before its deadline"
        assert late["p50"] < 50_000, (case, late)
    # The guest's pvclock and the host's calibration agree on the TSC.
    assert abs(r["pvclock_tsc_mhz"] / (hz / 1e6) - 1) < 0.02, (r["pvclock_tsc_mhz"], hz / 1e6)
    host = r["host_sleep_1ms_late_us"]
    assert host["n"] == 5 and _ordered(host)


def test_xsbench_guest(hz):
    r = bench_guests.xenstore(hz, n=50)  # the guest checks every reply and the value read back
    for phase in ("write_poll", "read_poll", "read_block"):
        d = r[f"{phase}_us"]
        assert d["n"] == 50 and _ordered(d) and 0 < d["p50"] < 100_000, (phase, d)
        # A phase's rate cannot beat its fastest round trip, nor lose to its slowest.
        assert 1e6 / d["max"] * 0.95 <= r[f"{phase}_ops_per_s"] <= 1e6 / d["min"] * 1.01, (phase, d, r)
    assert 0 < r["ops_per_s"]
    assert r["block_sleeps"] >= 0


def test_bench_guest_hypercalls(hz):
    b = _common.run_bench_guest(_common.guests()["bench"])
    for path in ("vmcall", "vmmcall", "page"):
        ns = b[f"hypercall_cycles_{path}"] / hz * 1e9
        assert 10 < ns < 100_000, (path, ns)
    assert b["loop_insns"] == 200_000_000 and b["loop_cycles"] > 0


def test_smp_ipi_round_trips(hz):
    """IPIs between two vCPUs of the smp guest, both ways, both mechanisms."""
    r = bench_guests.smp_ipi(hz, 100)
    for kind in ("evtchn", "lapic"):
        d = r[kind]
        assert d["n"] == 100 and 0 < d["min"] <= d["p50"] <= d["p99"] <= d["max"] < 1e6, (kind, d)


def test_profiled_domain_accounts_for_every_exit(guests):
    """The profiler's wrappers on a small guest that halts until timers
    (slept in the core, not in Python) and takes IPIs: every exit is
    counted once, and core + Python + waits make up the time spent in _step."""
    dom = bench_profile.ProfiledDomain(guests["bench_events"], cmdline="ipi=20 t1=3 t10=1", memory_mib=32)
    outcome = dom.run(timeout=60)
    assert outcome.exit_status == 0, dom.console_output.decode()
    assert {k: int(v["count"]) for k, v in dom.kinds.items()} == dom.exit_counts
    assert dom.idle_waits >= 4  # the halting timer waits, in the core
    assert dom.exit_counts.get("idle", 0) == 0, "no timer wait comes back to Python"
    total = sum(v["core_s"] + v["python_s"] + v["wait_s"] for v in dom.kinds.values())
    assert total == pytest.approx(dom.step_s, rel=1e-6)
    assert sum(v["core_s"] for v in dom.kinds.values()) == pytest.approx(dom.time_in_core, rel=1e-6)
    assert all(v >= 0 for v in dom.parts.values())
    assert dom.parts["devices"] > 0  # the port owners, called on every exit
    assert 0 < bench_profile.wrapper_overhead(2000) < 1e-3


def test_peak_rss_is_the_childs_own(tmp_path):
    """Linux carries a process's RSS high-water mark across exec, so a child
    forked from a big process would report the parent's RSS; bench_memory
    measures through a small helper so it does not."""
    ballast = bytearray(300 << 20)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touched: resident
    with open(tmp_path / "out", "wb") as out:
        kib, status = bench_memory.measured_run([sys.executable, "-c", "x = bytearray(64 << 20); x[::4096] = "
                                                 "b'1' * len(range(0, len(x), 4096))"], out, 60)
    assert status == 0
    assert 64 << 10 < kib < 200 << 10, kib  # the child's 64 MiB and Python, not our 300
    del ballast


@pytest.mark.slow
def test_snapshot_bench_restores_forks_and_sizes(monkeypatch):
    """bench_snapshot at its smallest, without QEMU: every restore and boot
    answers, its phases add up to the answer, forks cost at least what they
    wrote, and run_all reports every snapshot metric (QEMU's with why not)."""
    r = bench_snapshot.measure(runs=1, timeout=300, skip_qemu=True, forks=2, log=sys.stderr)
    assert set(r["runs"]) == {"pvhvm_restore", "pvhvm_boot"} and len(r["runs"]["pvhvm_restore"]) == 3
    for kind, runs in r["runs"].items():
        for s in runs:
            assert not s.get("failed"), (kind, s)
            # Contiguous phases, from the spawn to the shell's answer.
            parts = s["python_start_s"] + s["import_s"] + s["ready_s"] + s.get("boot_s", 0) + s["first_command_s"]
            assert parts == pytest.approx(s["answer_s"], abs=1e-3), (kind, s)
            assert 0 < s["python_start_s"] < s["answer_s"] < s["exit_s"], (kind, s)
    m = r["median"]
    assert m["pvhvm_restore"]["answer_s"] < m["pvhvm_boot"]["init_s"] < m["pvhvm_boot"]["answer_s"]
    assert m["ratio"]["restore_pvhvm_over_qemu"] is None

    used = r["guest_memory_kib"]
    assert 0 < used["used"] < used["MemTotal"] <= bench_snapshot.MEMORY_MIB << 10, used
    for f in (f for rnd in r["fork_rounds"] for f in rnd["forks"]):
        assert f["per_fork_s"] == pytest.approx(f["spawn_s"] + f["first_command_s"], abs=1e-3) and f["write_s"] > 0
    fork = m["fork"]
    # Each fork's 8 MiB in its tmpfs is its own: the guest sees it, and so
    # does the host's footprint (at least, with the new engines on top).
    assert fork["guest_used_after_write_mib"] >= fork["guest_used_mib"] + bench_snapshot.FORK_WRITE_MIB - 1, fork
    assert fork["footprint_growth_mib"] >= 2 * bench_snapshot.FORK_WRITE_MIB, fork
    assert fork["footprint_mib.after_children_dropped"] < fork["footprint_mib.after_write"], fork
    # The save file: RAM's length with its zero pages as holes; the
    # snapshot's memfd holds the same pages (the parent did not run between).
    save = m["save"]
    assert save["file_mib"] > bench_snapshot.MEMORY_MIB and 0 < save["allocated_mib"] < save["file_mib"], save
    assert fork["snapshot_memfd_mib"] == pytest.approx(save["allocated_mib"], abs=2), (fork, save)

    monkeypatch.setattr(bench_snapshot, "measure", lambda *a, **k: r)
    res, raw = run_all.run_snapshot({"snapshot_runs": 1, "timeout": 300, "skip_qemu": True})
    assert raw is r and set(run_all.snapshot_metrics(2)) <= set(res)
    for name, e in res.items():
        if "qemu" in name:
            assert e["value"] is None and e["status"] == "not measured: --skip-qemu", (name, e)
        else:
            assert isinstance(e["value"], (int, float)), (name, e)
    assert res["snapshot.restore.pvhvm.answer_ms"]["value"] == pytest.approx(m["pvhvm_restore"]["answer_s"] * 1e3)
    assert res["snapshot.restore.pvhvm.failed_runs"]["value"] == 0


def test_network_placeholder_without_backend(monkeypatch):
    monkeypatch.setattr(bench_net, "backend_present", lambda: False)
    res, raw = run_all.run_net({"quick": True})
    assert raw == {} and set(res) == set(run_all.NET_METRICS)
    for e in res.values():
        assert e["value"] is None and e["status"] == "not measured: network backend not present"


def _doc(results: dict, quick=True) -> dict:
    return {"schema": 1, "when": "t", "host": {"cpu": "x"}, "config": {"quick": quick}, "results": results}


def test_table_and_compare_format(capsys):
    m = _common.metric
    old = _doc({"a.x_ns": m(100.0, "ns", "x", "lower"), "a.y": m(10, "ops/s", "y", "higher"),
                "a.gone": m(1, "count", "g")})
    new = _doc({"a.x_ns": m(150.0, "ns", "x", "lower"), "a.y": m(12, "ops/s", "y", "higher"),
                "b.net": _common.not_measured("ms", "n", "network backend not present")})
    run_all.compare(old, new)
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  a.") or ln.startswith("  b.")}
    assert "1.500" in lines["a.x_ns"] and "WORSE" in lines["a.x_ns"]
    assert "1.200" in lines["a.y"] and "better" in lines["a.y"]
    assert "gone" in lines["a.gone"] and "new metric" in lines["b.net"]
    new["host"]["loadavg_start"] = new["host"]["loadavg_end"] = [0, 0, 0]
    run_all.print_table(new)
    out = capsys.readouterr().out
    assert "[a]" in out and "[b]" in out and "not measured: network backend not present" in out


@pytest.mark.slow
def test_run_all_quick_writes_schema_1(tmp_path):
    out = tmp_path / "suite.json"
    p = subprocess.run([sys.executable, str(ROOT / "benches" / "run_all.py"), "--quick", "--skip-qemu",
                        "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["errors"] == {}
    assert {"when", "host", "config", "results", "details"} <= set(doc)
    assert doc["host"]["tsc_mhz"] > 0 and doc["config"]["quick"] is True
    res = doc["results"]
    for name, e in res.items():
        assert {"value", "unit", "label"} <= set(e), name
        if e["value"] is None:
            assert e["status"].startswith("not measured: "), name
        else:
            assert isinstance(e["value"], (int, float)), name
        assert e.get("better") in (None, "lower", "higher"), name
    for name in ("core.hypercall_ns.vmcall", "core.hypercall_ns.vmmcall", "core.hypercall_ns.page",
                 "core.guest_minsn_per_s", "core.unicorn_no_hooks_minsn_per_s", "events.ipi_ns.p50",
                 "events.ipi_ns.p99", "timer.1ms_halt_late_us.p50", "timer.10ms_spin_late_us.max",
                 "xenstore.read_poll_us.p50", "xenstore.ops_per_s", "boot.pvhvm.first_line_s", "boot.pvhvm.init_s",
                 "boot.pvhvm.guest_uptime_s", "profile.core_s", "profile.python_s", "profile.exits.notify.count",
                 "profile.hypercalls.total", "profile.exceptions_delivered", "profile.interrupts_delivered",
                 "memory.peak_rss_mib.256", "memory.peak_rss_mib.1024", "smp.ipi_rtt_us.evtchn.p50",
                 "smp.ipi_rtt_us.lapic.p50", "smp.boot.pvhvm_1.init_s", "smp.boot.pvhvm_4.init_s",
                 "cpu.pvhvm.marker_s", "cpu.pvhvm.dd_s", "cpu.pvhvm_affected.dd_s",
                 "snapshot.restore.pvhvm.answer_ms", "snapshot.restore.pvhvm.import_ms", "snapshot.fork.per_fork_ms",
                 "snapshot.fork.footprint_growth_mib", "snapshot.save.allocated_mib",
                 "boot_timeline.pvhvm.first_instruction_s", "boot_timeline.pvhvm.first_hypercall_s",
                 "boot_timeline.pvhvm.first_line_s", "boot_timeline.pvhvm.clocksource_s",
                 "boot_timeline.pvhvm.first_user_instruction_s", "boot_timeline.pvhvm.marker_s"):
        assert isinstance(res[name]["value"], (int, float)) and res[name]["value"] > 0, name
    assert res["boot.qemu.init_s"]["status"] == "not measured: --skip-qemu"
    assert res["boot.qemu_default_cpu.init_s"]["status"] == "not measured: --skip-qemu"
    assert res["boot.ratio.init"]["value"] is None
    assert res["smp.boot.qemu_2.init_s"]["status"] == "not measured: --skip-qemu"
    assert res["snapshot.restore.qemu.answer_ms"]["status"] == "not measured: --skip-qemu"
    # At least the one at the vCPU's reset; Linux never needs single steps.
    assert res["profile.code_cache_flushes"]["value"] >= 1
    for name in run_all.NET_METRICS:  # measured, or a reason why not
        assert name in res
    # Orderings that must hold whatever the machine's load.
    boot = {k: res[f"boot.pvhvm.{k}"]["value"] for k in ("first_line_s", "init_s", "exit_s")}
    assert boot["first_line_s"] < boot["init_s"] <= boot["exit_s"], boot
    # The timeline in the order a boot meets it: the profile's events (from
    # the process's start, to 10 ms) and the console's (from the spawn).
    t = {k: res[f"boot_timeline.pvhvm.{k}_s"]["value"] for k in (
        "first_instruction", "first_hypercall", "first_line", "clocksource", "first_user_instruction", "marker",
        "exit")}
    assert t["first_instruction"] < t["first_hypercall"] < t["first_user_instruction"] < t["marker"], t
    assert t["first_line"] < t["clocksource"] < t["first_user_instruction"] < t["marker"] <= t["exit"], t
    assert res["boot_timeline.qemu.first_line_s"]["status"] == "not measured: --skip-qemu"
    assert res["profile.core_s"]["value"] + res["profile.python_s"]["value"] <= res["profile.wall_s"]["value"] * 1.01
    assert res["events.ipi_ns.p50"]["value"] <= res["events.ipi_ns.p99"]["value"]
    assert res["memory.peak_rss_mib.256"]["value"] > 20
    assert "[boot]" in p.stdout and "json: " in p.stdout

    # Comparing the run with itself: every measured ratio is 1.
    p = subprocess.run([sys.executable, str(ROOT / "benches" / "run_all.py"), "--compare", str(out), str(out)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("  core.hypercall_ns")]
    assert rows and all(r[3] == "1.000" for r in rows), p.stdout


def test_disk_bench_helpers():
    import bench_disk

    out = b"noise\r\nRESULT seq_write_mbs 123.5\r\nRESULT randread_iops 1.5e3\nRESULT bad x\nDISKBENCH-DONE\n"
    assert bench_disk.parse_results(out) == {"seq_write_mbs": 123.5, "randread_iops": 1500.0}
    assert bench_disk.run_order(["pvhvm", "qemu"], 0) == ["pvhvm", "qemu"]
    assert bench_disk.run_order(["pvhvm", "qemu"], 1) == ["qemu", "pvhvm"]
    assert bench_disk.ratio(3.0, 2.0) == 1.5 and bench_disk.ratio(None, 2.0) is None and bench_disk.ratio(1, 0) is None
    assert bench_disk.median_of([{"a": 1}, {"a": 3}, {"failed": True}, {"a": 2}], "a") == 2
    err = b"x\r\n/local/domain/0/backend/vbd/1/51712: request 0x1: bad; disconnecting the frontend of domain 1\r\n"
    assert bench_disk.console_error(err).endswith("disconnecting the frontend of domain 1")
    assert bench_disk.LOGIN.search(b"\r\nDebian GNU/Linux 12 pvhvm hvc0\r\n\r\npvhvm login: root (automatic login)")
    assert bench_disk.SHELL_PROMPT.search(b"\x1b[?2004hroot@pvhvm:~# ")


def test_disk_section_records_why_parts_are_missing(monkeypatch):
    """Every disk-section metric is there, with the reason when a part
    cannot run, and the parts fail independently."""
    import bench_disk

    def no_rootfs(*a, **k):
        raise bench_disk.NotMeasured("python/pvhvm/rootfs.py is not there yet")

    def io(quick, runs, skip_qemu, timeout, log):
        run = {"seq_write_mbs": 100.0, "seq_read_mbs": 200.0, "randread_iops": 1000.0}
        return {"runs": {"pvhvm": [{**run, "flush_error": "no answer in 30 s"}]},
                "median": {"pvhvm": {**run, "flush_ms": None}}, "ratio_pvhvm_over_qemu": {}}

    def net(*a, **k):
        raise OSError("boom")

    monkeypatch.setattr(bench_disk, "measure_io", io)
    monkeypatch.setattr(bench_disk, "measure_boot", no_rootfs)
    monkeypatch.setattr(bench_net, "measure_vs_qemu", net)
    res, raw = run_all.run_disk({"quick": True, "disk_runs": 1, "skip_qemu": True, "timeout": 60})
    assert set(res) == set(run_all.disk_metrics())
    assert res["disk.pvhvm.seq_write_mbs"]["value"] == 100.0
    assert res["disk.pvhvm.flush_ms"]["status"] == "not measured: no answer in 30 s"
    assert res["disk.qemu.randread_iops"]["status"] == "not measured: --skip-qemu"
    assert res["disk.ratio.randread"]["status"] == "not measured: --skip-qemu"
    assert res["boot_disk.pvhvm.login_s"]["status"] == "not measured: python/pvhvm/rootfs.py is not there yet"
    assert res["net_vs_qemu.ratio.tcp_guest_to_host"]["status"].startswith("not measured: net_vs_qemu failed: OSError")
    for name, e in res.items():
        assert e["value"] is not None or e["status"].startswith("not measured: "), name
    assert {"boot_disk.ratio.login", "disk.ratio.seq_write", "net_vs_qemu.ratio.tcp_host_to_guest"} <= set(res)
    assert res["disk.pvhvm.failed_runs"]["value"] == 0
    assert res["disk.qemu.failed_runs"]["status"] == "not measured: --skip-qemu"


def test_diskbench_tool_on_a_host_file(tmp_path):
    """benches/tools/diskbench.c builds as the bench builds it, and measures
    a file on the host the way it measures a guest's disk."""
    import shutil as _shutil

    import bench_disk

    if _shutil.which("gcc") is None:
        pytest.skip("no gcc")
    exe = tmp_path / "diskbench"
    p = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(exe), str(bench_disk.DISKBENCH_SRC)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4 << 20))
    p = subprocess.run([str(exe), str(img), "2", "0.2"], capture_output=True, timeout=60)
    if b"open: Invalid argument" in p.stdout:
        pytest.skip("no O_DIRECT on this file system")
    assert p.returncode == 0 and p.stdout.endswith(b"DISKBENCH-DONE\n"), p.stdout
    r = bench_disk.parse_results(p.stdout)
    assert r["device_mib"] == 4 and r["randread_reads"] > 0 and r["flush_ms"] >= 0
    assert all(r[k] > 0 for k in bench_disk.IO_KEYS), r
