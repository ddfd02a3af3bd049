#!/usr/bin/env python3
"""Save, restore and fork of the default Debian guest at its shell prompt
(issue 13's targets), with QEMU TCG restoring the same guest as the baseline.

    .venv/bin/python benches/bench_snapshot.py [--runs N] [--forks N] [--json FILE] [--skip-qemu]

One guest is booted in this process to its shell (cmdline with pvhvm.shell,
256 MiB) and saved; then, alternated:

  restore   a fresh `python -c` that imports pvhvm, Domain.restore()s the
            save file and runs `echo ok` through GuestShell: wall time from
            spawning it until the answer (target <= 150 ms, goal 50 ms), and
            inside it the interpreter's start, the import, the restore call,
            the first command and a second one (what the first costs beyond
            a warm one: the new engine translates the guest's code afresh)
  boot      the same measure for a cold boot of the same guest
  qemu      qemu-system-x86_64 -accel tcg, PVH boot of the same vmlinux and
            initramfs with as much RAM, saved once at its prompt with QMP's
            `migrate "exec:cat > FILE"`, then started with
            `-incoming "exec:cat FILE"` until its serial shell answers

Then forks of the booted guest (Domain.snapshot().spawn(), what fork()
does), each timed to spawn and to answer `echo $((1+1))`, then writing 8 MiB
in its tmpfs; this process's PSS (smaps_rollup: pages the domains share
count once), RSS and footprint (PSS with the snapshot's memfd counted whole:
its pages that no domain maps are in no PSS) before and after, against the
forks x the guest's used memory (MemTotal - MemFree in the guest). The
parent's RAM moves to the memfd at the first snapshot, so "before" is an
anonymous-RAM parent in the first round, a memfd-backed one later.

And the save file's size and allocated blocks against the same used memory.
The save file sits in the host's page cache when restored (warm, as right
after a save), and the timed processes find pvhvm's bytecode compiled (as
installed packages do, whatever PYTHONDONTWRITEBYTECODE says; child_env).

Writes JSON (medians, ratios, every sample); benches/run_all.py runs this as
its "snapshot" section.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, write_result  # noqa: E402
from bench_boot import MEMORY_MIB, QEMU, QEMU_SAME_CPU, qemu_version  # noqa: E402
from bench_cpu import PROMPT, Session  # noqa: E402

# pvhvm.cli.SHELL_FLAG: the default guest's /init gives a shell on hvc0.
CMDLINE = "console=hvc0 pvhvm.shell"
QEMU_APPEND = "console=ttyS0 panic=-1 pvhvm.shell"
TARGET_MS = 150.0  # issue 13: process start -> restored shell answering
GOAL_MS = 50.0
FORKS = 8
FORK_COMMAND = "echo $((1+1))"
FORK_WRITE_MIB = 8
FORK_WRITE = f"mkdir -p /tmp && dd if=/dev/zero of=/tmp/x bs=1M count={FORK_WRITE_MIB} 2>/dev/null && echo written"
MARKER = re.compile(rb"PVHVM-INIT-OK")
# GuestShell's protocol, for QEMU's serial console: the quotes split the
# markers so that the terminal's echo of the command never matches them.
ECHO_OK = 'echo =BE""GIN=; echo ok; echo =R""C=$?=\n'
ECHO_OK_ANSWER = re.compile(rb"=BEGIN=\r?\n(.*?)=RC=(\d+)=", re.S)
RESULT_TAG = "SNAPBENCH "

# The timed process. Its stamps are CLOCK_MONOTONIC, which is system-wide, so
# the parent places them on its own clock from the instant it spawned it.
CHILD = r"""
import time
t_main = time.monotonic()
import json, sys
import pvhvm
from pvhvm.shell import GuestShell
t_import = time.monotonic()
mode, timeout = sys.argv[1], float(sys.argv[2])
if mode == "restore":
    dom = pvhvm.Domain.restore(sys.argv[3])
else:
    dom = pvhvm.Domain(sys.argv[3], initrd=sys.argv[4], cmdline=sys.argv[5], memory_mib=int(sys.argv[6]))
t_ready = time.monotonic()
t_init = None
if mode == "boot":
    dom.expect("PVHVM-INIT-OK", timeout)
    t_init = time.monotonic()
sh = GuestShell(dom)
first = sh.run("echo ok", timeout)
t_answer = time.monotonic()
second = sh.run("echo ok", timeout)
t_second = time.monotonic()
print("SNAPBENCH " + json.dumps({"main": t_main, "import": t_import, "ready": t_ready, "init": t_init,
                                 "answer": t_answer, "second": t_second,
                                 "answered": "ok" in first.split() and "ok" in second.split()}), flush=True)
"""


def log_to(log, msg: str) -> None:
    print(msg, file=log, flush=True)


def med(values, digits: int = 3):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


# --------------------------------------------------------------------------- host memory


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """/proc/PID/smaps_rollup in KiB: Rss, Pss (a page mapped N times counts
    1/N in each mapping, so once in all), Pss_Anon, Pss_Shmem, ..."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0])
    return fields


def memfd_allocated(prefix: str = "/memfd:pvhvm-") -> int:
    """Bytes the open snapshot memfds of this process hold: RAM that counts
    in no PSS while no domain maps it."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(prefix):
                total += os.fstat(int(fd)).st_blocks * 512
        except OSError:
            pass  # the listing's own fd, gone by now
    return total


def memory_point(domains: int) -> dict:
    """This process's memory in MiB: RSS, PSS, and the footprint: PSS with
    the snapshot memfds counted whole instead of their mapped share (a
    memfd page no domain maps is in no PSS, yet it is RAM)."""
    m = smaps_rollup()
    memfd = memfd_allocated() / 2**20
    point = {"domains": domains, "rss_mib": m["Rss"] / 1024, "pss_mib": m["Pss"] / 1024,
             "pss_anon_mib": m.get("Pss_Anon", 0) / 1024, "pss_shmem_mib": m.get("Pss_Shmem", 0) / 1024,
             "snapshot_memfd_mib": memfd, "footprint_mib": (m["Pss"] - m.get("Pss_Shmem", 0)) / 1024 + memfd}
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in point.items()}


def guest_used_kib(sh) -> dict[str, int]:
    """The guest's own view: MemTotal, MemFree and used = their difference."""
    info = {}
    for line in sh.ok("cat /proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        if name in ("MemTotal", "MemFree", "MemAvailable", "Cached"):
            info[name] = int(rest.split()[0])
    info["used"] = info["MemTotal"] - info["MemFree"]
    return info


# --------------------------------------------------------------------------- pvhvm in a fresh process


def child_env(pycache: Path) -> dict[str, str]:
    """The timed processes' environment: pvhvm's bytecode cached (in
    `pycache`, not the source tree), as an installed package has its .pyc.
    Where PYTHONDONTWRITEBYTECODE is set, every start would compile pvhvm
    from source again (~60 ms more here)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def warm_bytecode(env: dict[str, str]) -> float:
    """Import pvhvm once, untimed by the bench, so its bytecode is cached;
    returns that import's time (compiling included)."""
    code = "import time; t = time.monotonic(); import pvhvm, pvhvm.shell; print(time.monotonic() - t)"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"import pvhvm failed: {p.stderr[-2000:]}")
    return round(float(p.stdout.split()[-1]), 4)


def child_run(args: list[str], env: dict[str, str], timeout: float) -> dict:
    """Run CHILD with `args`; its phases in seconds from the spawn."""
    cmd = [sys.executable, "-c", CHILD, *args]
    t_spawn = time.monotonic()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout + 30, cwd=ROOT,
                           env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no answer within {timeout + 30} s") from None
    t_exit = time.monotonic()
    lines = [ln for ln in p.stdout.decode(errors="replace").splitlines() if ln.startswith(RESULT_TAG)]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"exit {p.returncode}: {p.stderr.decode(errors='replace')[-2000:]}")
    s = json.loads(lines[-1][len(RESULT_TAG):])
    if not s["answered"]:
        raise RuntimeError("the shell did not answer `ok`")
    r = {
        "answer_s": s["answer"] - t_spawn,
        "python_start_s": s["main"] - t_spawn,
        "import_s": s["import"] - s["main"],
        "ready_s": s["ready"] - s["import"],
        "first_command_s": s["answer"] - (s["init"] or s["ready"]),
        "second_command_s": s["second"] - s["answer"],
        "exit_s": t_exit - t_spawn,
    }
    if s["init"] is not None:
        r["init_s"] = s["init"] - t_spawn
        r["boot_s"] = s["init"] - s["ready"]
    return {k: round(v, 4) for k, v in r.items()}


# --------------------------------------------------------------------------- QEMU


def qemu_command(g, extra: list[str]) -> list[str]:
    """bench_boot's baseline (PVH boot by -kernel, the same CPU model), its
    console a shell on the serial port."""
    return [QEMU, "-M", "pc", "-accel", "tcg", "-cpu", QEMU_SAME_CPU, "-m", str(MEMORY_MIB), "-smp", "1",
            "-kernel", str(g.vmlinux), "-initrd", str(g.initrd), "-append", QEMU_APPEND, "-nographic",
            "-nodefaults", "-no-reboot", "-serial", "stdio", *extra]


class Qmp:
    """QEMU's QMP on a Unix socket: commands, and the events seen meanwhile."""

    def __init__(self, path: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:  # QEMU makes the socket early in its start, but not at once
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no QMP socket at {path}") from None
                time.sleep(0.001)
        self.sock.settimeout(timeout)
        self.f = self.sock.makefile("rwb")
        self.events: list[str] = []
        json.loads(self.f.readline())  # the greeting
        self.call("qmp_capabilities")

    def _message(self) -> dict:
        line = self.f.readline()
        if not line:
            raise RuntimeError("QEMU closed its QMP socket")
        msg = json.loads(line)
        if "event" in msg:
            self.events.append(msg["event"])
        return msg

    def call(self, command: str, **arguments) -> dict:
        msg = {"execute": command} | ({"arguments": arguments} if arguments else {})
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = self._message()
            if "error" in r:
                raise RuntimeError(f"QMP {command}: {r['error']}")
            if "return" in r:
                return r["return"]

    def wait_running(self) -> None:
        """Until the guest runs (after an incoming migration, QEMU starts it
        by itself and says RESUME)."""
        if self.call("query-status").get("running") or "RESUME" in self.events:
            return
        while self._message().get("event") != "RESUME":
            pass

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def qemu_answer(s: Session, t0: float, timeout: float) -> float:
    s.send(ECHO_OK)
    m = s.expect(ECHO_OK_ANSWER, timeout)
    if m.group(2) != b"0" or b"ok" not in m.group(1).split():
        raise RuntimeError(f"unexpected answer {m.group(0)!r}")
    return time.monotonic() - t0


def qemu_save(g, tmp: Path, timeout: float) -> dict:
    """Boot under QEMU to the shell, migrate it into a file, quit."""
    qmp_path = str(tmp / "qmp.sock")
    image = tmp / "qemu.mig"
    t0 = time.monotonic()
    s = Session(qemu_command(g, ["-qmp", f"unix:{qmp_path},server=on,wait=off"]), None)
    try:
        s.expect(MARKER, timeout)
        s.expect(PROMPT, 60)
        answer = qemu_answer(s, t0, 60)
        qmp = Qmp(qmp_path)
        try:
            t_mig = time.monotonic()
            qmp.call("migrate", uri=f"exec:cat > {shlex.quote(str(image))}")
            while (st := qmp.call("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
                if time.monotonic() - t_mig > timeout:
                    raise RuntimeError("QEMU's migration did not complete")
                time.sleep(0.01)
            mig_s = time.monotonic() - t_mig
            if st["status"] != "completed":
                raise RuntimeError(f"QEMU's migration {st['status']}: {st.get('error-desc')}")
            qmp.call("quit")
        finally:
            qmp.close()
        s.p.wait(30)
    finally:
        if s.p.poll() is None:
            s.p.kill()
            s.p.wait()
    st_ = image.stat()
    return {"path": image, "cold_boot_answer_s": round(answer, 3), "migrate_s": round(mig_s, 3),
            "file_bytes": st_.st_size, "allocated_bytes": st_.st_blocks * 512,
            "qemu_total_time_ms": st.get("total-time"), "qemu_ram_transferred": st.get("ram", {}).get("transferred")}


def qemu_restore(g, image: Path, tmp: Path, timeout: float) -> dict:
    """A new QEMU taking the guest from the file, until the serial shell
    answers. Typing waits for QMP's RESUME: a character that reaches the
    serial port while the migration loads is lost (the loaded UART state
    replaces it), as it would be for a user typing that early."""
    qmp_path = str(tmp / "qmp-in.sock")
    t0 = time.monotonic()
    s = Session(qemu_command(g, ["-incoming", f"exec:cat {shlex.quote(str(image))}",
                                 "-qmp", f"unix:{qmp_path},server=on,wait=off"]), None)
    try:
        qmp = Qmp(qmp_path, timeout)
        try:
            qmp.wait_running()
            running = time.monotonic() - t0
        finally:
            qmp.close()
        return {"answer_s": round(qemu_answer(s, t0, timeout), 4), "running_s": round(running, 4)}
    finally:
        s.p.kill()
        s.p.wait()
        Path(qmp_path).unlink(missing_ok=True)


# --------------------------------------------------------------------------- forks


def fork_round(parent, n: int, timeout: float, log, previous=None) -> tuple[dict, object]:
    """Snapshot `parent`, spawn `n` domains, time each to spawn and answer,
    then make each write FORK_WRITE_MIB in its tmpfs; this process's memory
    at each step. The children are dropped at the end. Returns the round
    and its snapshot: keep it open until the next round's snapshot, as the
    parent's RAM is on its memfd until then (memory_point counts open ones)."""
    from pvhvm.shell import GuestShell

    # Domains this process dropped earlier (reference cycles) still hold
    # their RAM until the cycle collector runs: not this round's memory.
    gc.collect()
    mem = {"before": memory_point(1)}
    t0 = time.monotonic()
    try:
        snap = parent.snapshot()
    finally:
        if previous is not None:
            previous.close()  # the parent has moved to the new memfd
    snapshot_s = time.monotonic() - t0
    mem["after_snapshot"] = memory_point(1)
    kids, forks = [], []
    try:
        for i in range(n):
            t0 = time.monotonic()
            kid = snap.spawn()
            t1 = time.monotonic()
            kids.append(kid)
            sh = GuestShell(kid)
            out = sh.ok(FORK_COMMAND, timeout)
            t2 = time.monotonic()
            if out.split() != ["2"]:
                raise RuntimeError(f"fork {i + 1}: `{FORK_COMMAND}` printed {out!r}")
            forks.append({"spawn_s": round(t1 - t0, 4), "first_command_s": round(t2 - t1, 4),
                          "per_fork_s": round(t2 - t0, 4)})
        mem["after_spawn_and_command"] = memory_point(1 + n)
        for i, kid in enumerate(kids):
            sh = GuestShell(kid)
            t0 = time.monotonic()
            if sh.ok(FORK_WRITE, timeout).split() != ["written"]:
                raise RuntimeError(f"fork {i + 1}: the write did not finish")
            forks[i]["write_s"] = round(time.monotonic() - t0, 4)
            if i == 0:
                forks[i]["guest_after_write_kib"] = guest_used_kib(sh)
        mem["after_write"] = memory_point(1 + n)
    except BaseException:
        snap.close()
        raise
    finally:
        for kid in kids:
            kid.close()
        kids.clear()
        gc.collect()
    mem["after_children_dropped"] = memory_point(1)
    r = {"snapshot_s": round(snapshot_s, 4), "forks": forks, "memory": mem}
    b, w = mem["before"], mem["after_write"]
    log_to(log, f"  fork round: snapshot {snapshot_s * 1e3:.0f} ms, per fork (spawn + first command) "
                f"{med([f['per_fork_s'] for f in forks]) * 1e3:.0f} ms; {n} forks: footprint "
                f"{b['footprint_mib']:.0f} -> {w['footprint_mib']:.0f} MiB, PSS {b['pss_mib']:.0f} -> "
                f"{w['pss_mib']:.0f} MiB, RSS {b['rss_mib']:.0f} -> {w['rss_mib']:.0f} MiB")
    return r, snap


# --------------------------------------------------------------------------- the whole bench


def measure(runs: int = 3, timeout: float = 300, skip_qemu: bool = False, forks: int = FORKS,
            fork_rounds: int | None = None, restore_runs: int | None = None, log=sys.stderr) -> dict:
    """Everything in the docstring: `runs` cold boots, `restore_runs`
    (default 2 x runs + 1) restores under each hypervisor, `fork_rounds`
    (default runs) of `forks` forks."""
    import pvhvm
    from pvhvm.images import prepare_default_guest
    from pvhvm.shell import GuestShell

    restore_runs = restore_runs or 2 * runs + 1
    fork_rounds = fork_rounds or runs
    g = prepare_default_guest()
    if not skip_qemu and shutil.which(QEMU) is None:
        raise SystemExit(f"{QEMU} not found (apt-get install qemu-system-x86), or pass --skip-qemu")
    result: dict = {"kernel": g.kernel_version, "qemu": None if skip_qemu else qemu_version(),
                    "memory_mib": MEMORY_MIB, "cmdline": CMDLINE, "target_ms": TARGET_MS, "goal_ms": GOAL_MS}
    with tempfile.TemporaryDirectory(prefix="pvhvm-snapbench-") as tmpdir:
        tmp = Path(tmpdir)
        # The guest every part starts from, booted here to its shell.
        t0 = time.monotonic()
        parent = pvhvm.Domain(g.vmlinux, initrd=g.initrd, cmdline=CMDLINE, memory_mib=MEMORY_MIB)
        parent.expect(MARKER, timeout)
        sh = GuestShell(parent)
        if sh.ok("echo ok", 60).split() != ["ok"]:
            raise RuntimeError("the booted guest's shell does not answer")
        result["in_process_boot_answer_s"] = round(time.monotonic() - t0, 3)
        sh.ok("dmesg -n 1")  # kernel messages would land between a command's markers
        used = guest_used_kib(sh)
        result["guest_memory_kib"] = used

        # The save file (every restore maps the same file).
        save_path = tmp / "guest.save"
        saves = []
        for _ in range(max(3, runs)):
            t0 = time.monotonic()
            parent.save(save_path)
            saves.append(round(time.monotonic() - t0, 4))
        st = save_path.stat()
        result["save"] = {"save_s": saves, "file_bytes": st.st_size, "allocated_bytes": st.st_blocks * 512,
                          "guest_used_kib": used["used"], "ram_bytes": MEMORY_MIB << 20}
        log_to(log, f"  save: {med(saves) * 1e3:.0f} ms, {st.st_size >> 20} MiB file, "
                    f"{st.st_blocks * 512 / 2**20:.1f} MiB allocated; guest uses {used['used'] / 1024:.1f} MiB")

        qemu_image = None
        if not skip_qemu:
            q = qemu_save(g, tmp, timeout)
            qemu_image = q.pop("path")
            result["qemu_save"] = q
            log_to(log, f"  qemu: boot to answer {q['cold_boot_answer_s']:.2f} s, migrate {q['migrate_s']:.2f} s, "
                        f"{q['file_bytes'] / 2**20:.1f} MiB file")

        env = child_env(tmp / "pycache")
        result["import_compiling_s"] = warm_bytecode(env)
        kinds = {
            "pvhvm_restore": lambda: child_run(["restore", str(timeout), str(save_path)], env, timeout),
            "pvhvm_boot": lambda: child_run(["boot", str(timeout), str(g.vmlinux), str(g.initrd), CMDLINE,
                                             str(MEMORY_MIB)], env, timeout),
        }
        if qemu_image is not None:
            kinds["qemu_restore"] = lambda: qemu_restore(g, qemu_image, tmp, min(timeout, 60))
        samples: dict[str, list[dict]] = {k: [] for k in kinds}
        for i in range(restore_runs):
            for kind, fn in kinds.items():
                if kind == "pvhvm_boot" and i >= runs:
                    continue  # boots are long: fewer of them
                try:
                    r = fn()
                except RuntimeError as e:
                    log_to(log, f"  run {i + 1}/{restore_runs} {kind:14} FAILED: {str(e).splitlines()[0]}")
                    samples[kind].append({"failed": True, "error": str(e)[:500]})
                    continue
                samples[kind].append(r)
                extra = "".join(f", {k.removesuffix('_s')} {v * 1e3:.0f} ms" for k, v in r.items()
                                if k not in ("answer_s", "exit_s"))
                log_to(log, f"  run {i + 1}/{restore_runs} {kind:14} answer {r['answer_s'] * 1e3:.0f} ms{extra}")
        result["runs"] = samples

        # Forks of the same booted guest (its RAM goes to a memfd from the
        # first snapshot on; the save above is already done).
        result["forks"] = forks
        result["fork_rounds"] = []
        snap = None
        try:
            for _ in range(fork_rounds):
                r, snap = fork_round(parent, forks, timeout, log, snap)
                result["fork_rounds"].append(r)
        finally:
            if snap is not None:
                snap.close()
        parent.close()

    result["median"] = summarize(result)
    return result


def summarize(result: dict) -> dict:
    """The medians and ratios run_all.py reports."""
    runs = result["runs"]

    def m(kind: str, key: str):
        return med([r.get(key) for r in runs.get(kind, []) if not r.get("failed")], 4)

    s: dict = {}
    for kind in runs:
        keys = sorted({k for r in runs[kind] if not r.get("failed") for k in r if k.endswith("_s")})
        s[kind] = {k: m(kind, k) for k in keys}
        s[kind]["failed_runs"] = sum(1 for r in runs[kind] if r.get("failed"))
    restore = s.get("pvhvm_restore", {}).get("answer_s")
    s["import_compiling_s"] = result.get("import_compiling_s")
    s["ratio"] = {
        "restore_over_target": ratio(restore, TARGET_MS / 1e3),
        "restore_over_goal": ratio(restore, GOAL_MS / 1e3),
        "restore_over_cold_boot": ratio(restore, s.get("pvhvm_boot", {}).get("answer_s")),
        "restore_pvhvm_over_qemu": ratio(restore, s.get("qemu_restore", {}).get("answer_s")),
    }
    rounds = result["fork_rounds"]
    n = result["forks"]
    every = [f for r in rounds for f in r["forks"]]
    used_mib = result["guest_memory_kib"]["used"] / 1024
    fork = {k: med([f[k] for f in every], 4) for k in ("spawn_s", "first_command_s", "per_fork_s", "write_s")}
    fork["snapshot_s"] = med([r["snapshot_s"] for r in rounds], 4)
    points = ("before", "after_snapshot", "after_spawn_and_command", "after_write", "after_children_dropped")
    for point in points:
        for k in ("footprint_mib", "pss_mib", "rss_mib"):
            fork[f"{k}.{point}"] = med([r["memory"][point][k] for r in rounds], 2)
    fork["snapshot_memfd_mib"] = med([r["memory"]["after_snapshot"]["snapshot_memfd_mib"] for r in rounds], 2)
    for k in ("footprint_mib", "pss_mib", "rss_mib"):
        growth = med([r["memory"]["after_write"][k] - r["memory"]["before"][k] for r in rounds], 2)
        fork[f"{k.removesuffix('_mib')}_growth_mib"] = growth
        fork[f"{k.removesuffix('_mib')}_growth_over_n_x_used"] = ratio(growth, n * used_mib)
    fork["guest_used_mib"] = round(used_mib, 2)
    fork["n_x_guest_used_mib"] = round(n * used_mib, 2)
    fork["guest_used_after_write_mib"] = med([r["forks"][0]["guest_after_write_kib"]["used"] / 1024
                                              for r in rounds], 2)
    s["fork"] = fork
    save = result["save"]
    s["save"] = {"save_s": med(save["save_s"], 4), "file_mib": round(save["file_bytes"] / 2**20, 2),
                 "allocated_mib": round(save["allocated_bytes"] / 2**20, 2), "guest_used_mib": round(used_mib, 2),
                 "allocated_over_used": ratio(save["allocated_bytes"] / 2**20, used_mib)}
    if "qemu_save" in result:
        q = result["qemu_save"]
        s["save"]["qemu_file_mib"] = round(q["file_bytes"] / 2**20, 2)
        s["save"]["qemu_allocated_mib"] = round(q["allocated_bytes"] / 2**20, 2)
        s["save"]["allocated_pvhvm_over_qemu"] = ratio(save["allocated_bytes"], q["allocated_bytes"])
        s["qemu_cold_boot_answer_s"] = q["cold_boot_answer_s"]
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="Cold boots and fork rounds (restores: 2 x runs + 1).")
    ap.add_argument("--forks", type=int, default=FORKS)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--skip-qemu", action="store_true", help="No QEMU baseline.")
    args = ap.parse_args()
    result, out = write_result("snapshot", args.json,
                               measure(args.runs, args.timeout, args.skip_qemu, forks=args.forks))
    print(json.dumps(result["median"], indent=2))
    print(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
