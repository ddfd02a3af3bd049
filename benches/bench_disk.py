#!/usr/bin/env python3
"""Disks: block I/O measured inside the guest, and Debian booted from a disk
to its login prompt, pvhvm (xen-blkfront on pvhvm's blkback) against QEMU
TCG (virtio-blk), alternated in one run, each run on a fresh copy of the
same image.

    .venv/bin/python benches/bench_disk.py [--quick] [--runs N] [--skip-qemu] [--only io boot]

io    The default guest's kernel with an initramfs of its own (the default
      modules, plus /bin/diskbench compiled here from
      benches/tools/diskbench.c with `gcc -static -O2`); its /init loads the
      disk driver and runs diskbench on the raw device (/dev/xvda under
      pvhvm, /dev/vda under QEMU), which prints "RESULT name value" lines,
      then powers off. diskbench times itself in the guest (CLOCK_MONOTONIC):
      sequential write (1 MiB O_DIRECT writes of zeros, as `dd bs=1M
      oflag=direct`), sequential read of the same range (iflag=direct), and
      4 KiB random reads at queue depth 1 over the whole disk for a few
      seconds, then a cache flush (fdatasync, flush_ms). The disk is a copy of a raw image of random bytes, written
      and dropped from the host's page cache before each boot. QEMU opens
      it with cache=none (O_DIRECT on the host); pvhvm's blkback goes
      through the host's page cache, so its reads of what it just wrote
      come from host memory: a difference of the backends' configurations,
      included in the numbers on purpose.
boot  Debian 12 with systemd from python/pvhvm/rootfs.py's image (a copy per
      boot), booted with the default guest's kernel and initramfs and
      `root=LABEL=pvhvm-root rw` (console=hvc0 under pvhvm, console=ttyS0
      under QEMU): wall time from start until "login:" shows on the
      console, and (pvhvm, whose hvc0 getty logs root in by itself) until
      the shell prompt. Recorded as not measured when rootfs.py is missing
      or its image cannot be built here.

Runs alternate (pvhvm first, then QEMU first, ...). A run that stalls (io:
no result within IO_RUN_TIMEOUT_S; boot: a silent console for BOOT_IDLE_S)
is ended, keeps what it printed so far, and counts in "failed_runs".

benches/run_all.py runs both in its `disk` section (with bench_net.py's
pvhvm-vs-QEMU network comparison). `measure_io()` and `measure_boot()`
return plain dicts; `NotMeasured` carries the reason a part cannot run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS  # noqa: E402
from pvhvm.images import INIT_START  # noqa: E402
from bench_boot import MEMORY_MIB, QEMU, QEMU_SAME_CPU, qemu_version  # noqa: E402

TOOLS = Path(__file__).resolve().parent / "tools"
DISKBENCH_SRC = TOOLS / "diskbench.c"
GUEST_TOOL_PATH = "bin/diskbench"

# (sequential MiB, random-read seconds, image MiB) per mode. Random reads
# spread over the whole image, twice the sequential range.
SIZES = {"quick": (16, 3, 64), "full": (64, 10, 256)}

RESULT_LINE = re.compile(rb"^RESULT (\S+) ([-0-9.eE+]+)\s*$", re.M)
FIRST_LINE = re.compile(rb"\[\s*0\.0+\] Linux version")
INIT_OK = re.compile(rb"PVHVM-INIT-OK")
# agetty's prompt ("pvhvm login: "); under pvhvm it goes on with
# "root (automatic login)" and the shell's prompt.
LOGIN = re.compile(rb"login: ")
SHELL_PROMPT = re.compile(rb"root@\S+:[^\r\n]*# ")
SWITCH_ROOT = re.compile(rb"PVHVM-INIT: switching to")

IO_KEYS = ("seq_write_mbs", "seq_read_mbs", "randread_iops")
DONE = re.compile(rb"DISKBENCH-DONE")
FAIL = re.compile(rb"DISKBENCH-FAIL[^\r\n]*")
RANDREAD_DONE = re.compile(rb"^RESULT randread_s ", re.M)
# pvhvm's blkback logs why it gave up on a frontend.
BACKEND_ERROR = re.compile(rb"[^\r\n]*disconnecting the frontend[^\r\n]*")
FLUSH_GRACE_S = 30
IO_RUN_TIMEOUT_S = 60
BOOT_IDLE_S = 120

DISK_INIT = "#!/bin/sh\n# benches/bench_disk.py: run /bin/diskbench on the first disk, power off.\n" + INIT_START + """\
args="16 3"
for a in $(cat /proc/cmdline); do
    case "$a" in diskbench=*) args=$(echo "${a#diskbench=}" | tr , ' ') ;; esac
done
if [ "$(cat /sys/hypervisor/type 2>/dev/null)" = xen ]; then
    modprobe xen-blkfront; dev=/dev/xvda
else
    modprobe virtio_pci; modprobe virtio_blk; dev=/dev/vda
fi
i=0
while [ ! -b $dev ] && [ $i -lt 150 ]; do sleep 0.2; i=$((i + 1)); done
if [ -b $dev ]; then
    echo "DISKBENCH-START dev=$dev args=$args uptime=$(cut -d' ' -f1 /proc/uptime)"
    /bin/diskbench $dev $args || echo "DISKBENCH-FAIL exit status $?"
else
    echo "DISKBENCH-FAIL no $dev"; cat /proc/partitions
fi
poweroff -f
"""


class NotMeasured(Exception):
    """Why a part of this bench cannot run here."""


def log_to(log, msg: str) -> None:
    print(msg, file=log, flush=True)


# --------------------------------------------------------------------------- pure helpers


def parse_results(out: bytes) -> dict[str, float]:
    """The "RESULT name value" lines of a console output."""
    return {m[1].decode(): float(m[2]) for m in RESULT_LINE.finditer(out)}


def console_error(out: bytes) -> str | None:
    """The first line that says what went wrong: the backend's reason for
    disconnecting, or diskbench's failure."""
    for rx in (BACKEND_ERROR, FAIL):
        m = rx.search(out)
        if m:
            return m[0].decode(errors="replace").strip()
    return None


def stall_reason(r: dict) -> str:
    """Why a watched run gave no complete result: the console's own error
    line, else where the guest stopped."""
    why = console_error(r["out"])
    if why:
        return why
    last = RESULT_LINE.findall(r["out"])
    after = f"after RESULT {last[-1][0].decode()}" if last else "before any result"
    if r["timed_out"]:
        return f"the guest stopped making progress {after} (killed after {r['wall_s']:.0f} s)"
    return f"the guest ended {after} (exit {r['returncode']})"


def median_of(samples: list[dict], key: str) -> float | None:
    values = [s[key] for s in samples if s.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def run_order(names: list[str], i: int) -> list[str]:
    """The order of run i: reversed every other run, so neither side always
    goes first (ABBA)."""
    return list(names) if i % 2 == 0 else list(reversed(names))


# --------------------------------------------------------------------------- running a VM


def watch(cmd: list[str], patterns: dict[str, re.Pattern], stop: tuple[str, ...] = (), timeout: float = 300,
          grace: dict[str, float] | None = None, on_match=None, idle_timeout: float | None = None) -> dict:
    """Run `cmd` with its console on a pipe; the wall time (s since start) at
    which each pattern first matched. Ends the process (SIGTERM, then
    SIGKILL) once every pattern named in `stop` has matched, or when a
    pattern's `grace` seconds after its own match ran out; else waits for it
    to exit, up to `timeout`, or until the console has been silent for
    `idle_timeout` s. `on_match(name, match, t)` is called as each pattern
    matches."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out = bytearray()
    times: dict[str, float] = {}
    timed_out = ended = idle = False
    last_output = 0.0
    os.set_blocking(p.stdout.fileno(), False)
    try:
        while True:
            chunk = p.stdout.read(65536)
            now = time.perf_counter() - t0
            if chunk:
                out += chunk
                last_output = now
                for name, rx in patterns.items():
                    if name not in times:
                        m = rx.search(out)
                        if m:
                            times[name] = now
                            if on_match:
                                on_match(name, m, now)
            elif p.poll() is not None:
                break
            else:
                time.sleep(0.002)
            if stop and all(s in times for s in stop):
                ended = True
                break
            if grace and any(n in times and now - times[n] > g for n, g in grace.items()):
                ended = True
                break
            if now > timeout or (idle_timeout is not None and now - last_output > idle_timeout):
                timed_out = True
                idle = now <= timeout
                break
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        p.wait()
        try:
            out += p.stdout.read() or b""
        except (OSError, ValueError):
            pass
        p.stdout.close()
    return {"times": times, "out": bytes(out), "returncode": p.returncode, "ended_by_us": ended,
            "timed_out": timed_out, "idle": idle, "wall_s": time.perf_counter() - t0}


def pvhvm_cmd(vmlinux: Path, initrd: Path, cmdline: str, disk: Path, memory_mib: int = MEMORY_MIB) -> list[str]:
    return [sys.executable, "-m", "pvhvm", "boot", str(vmlinux), "--initrd", str(initrd), "--memory",
            str(memory_mib), "--cmdline", f"console=hvc0 {cmdline}".strip(), "--net", "none", "--disk", str(disk)]


def qemu_cmd(vmlinux: Path, initrd: Path, cmdline: str, disk: Path, memory_mib: int = MEMORY_MIB,
             cache: str = "none") -> list[str]:
    """QEMU TCG with the CPU model pvhvm presents (as bench_boot's "qemu"),
    the disk on virtio-blk."""
    return [QEMU, "-M", "pc", "-accel", "tcg", "-cpu", QEMU_SAME_CPU, "-m", str(memory_mib), "-kernel", str(vmlinux),
            "-initrd", str(initrd), "-append", f"console=ttyS0 panic=-1 {cmdline}".strip(), "-nographic",
            "-nodefaults", "-no-reboot", "-serial", "stdio",
            "-drive", f"file={disk},if=virtio,format=raw,cache={cache}"]


# --------------------------------------------------------------------------- files


def work_dir() -> Path:
    from pvhvm.images import cache_dir

    d = cache_dir() / "bench-disk"
    d.mkdir(parents=True, exist_ok=True)
    return d


def build_diskbench(log=sys.stderr) -> Path:
    """diskbench, compiled static (cached by the source and gcc's version)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise NotMeasured("gcc is not installed (needed to build benches/tools/diskbench.c)")
    src = DISKBENCH_SRC.read_bytes()
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    key = hashlib.sha256(src + version.encode()).hexdigest()[:12]
    out = work_dir() / f"diskbench-{key}"
    if not out.is_file():
        log_to(log, f"  disk: compiling {DISKBENCH_SRC.name} (gcc -static -O2)")
        tmp = out.with_name(out.name + ".part")
        p = subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(tmp), str(DISKBENCH_SRC)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise NotMeasured(f"gcc -static failed (libc6-dev has libc.a): {(p.stderr or p.stdout).strip()[-300:]}")
        tmp.replace(out)
    return out


def base_image(mib: int) -> Path:
    """A raw image of `mib` MiB of random bytes (no holes: every read is
    real), made once."""
    path = work_dir() / f"base-{mib}m.img"
    if not path.is_file() or path.stat().st_size != mib << 20:
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        tmp.replace(path)
    return path


def fresh_copy(src: Path, dst: Path) -> Path:
    """A copy of `src`, on disk and out of the host's page cache, so every
    boot starts from the same state whichever hypervisor went before.
    Sparse source files (the Debian image) stay sparse."""
    dst.unlink(missing_ok=True)
    subprocess.run(["cp", "--sparse=always", "--reflink=never", str(src), str(dst)], check=True)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return dst


def disk_guest():
    """The default guest's kernel with DISK_INIT and diskbench in its initrd."""
    from pvhvm.images import prepare_default_guest

    tool = build_diskbench()
    return prepare_default_guest(init_script=DISK_INIT, extra_files={GUEST_TOOL_PATH: tool.read_bytes()})


# --------------------------------------------------------------------------- io


def measure_io(quick: bool = False, runs: int = 1, skip_qemu: bool = False, timeout: float = 300,
               qemu_cache: str = "none", log=sys.stderr) -> dict:
    """diskbench in the guest under pvhvm and QEMU, alternated `runs` times;
    medians per hypervisor and the pvhvm/QEMU ratios."""
    if not skip_qemu and shutil.which(QEMU) is None:
        raise NotMeasured(f"{QEMU} not found (pass --skip-qemu)")
    seq_mib, rand_s, image_mib = SIZES["quick" if quick else "full"]
    g = disk_guest()
    base = base_image(image_mib)
    cmdline = f"diskbench={seq_mib},{rand_s}"
    names = ["pvhvm"] + ([] if skip_qemu else ["qemu"])
    samples: dict[str, list[dict]] = {n: [] for n in names}
    # A run takes 10-20 s; one that stalls is given up well before `timeout`.
    run_timeout = min(timeout, IO_RUN_TIMEOUT_S + rand_s)
    with tempfile.TemporaryDirectory(prefix="run-", dir=work_dir()) as tmp:
        copy = Path(tmp) / "disk.img"
        for i in range(runs):
            for name in run_order(names, i):
                fresh_copy(base, copy)
                cmd = (pvhvm_cmd(g.vmlinux, g.initrd, cmdline, copy) if name == "pvhvm"
                       else qemu_cmd(g.vmlinux, g.initrd, cmdline, copy, cache=qemu_cache))
                # The flush comes last; give it FLUSH_GRACE_S, so a backend
                # that never answers it costs that number only.
                r = watch(cmd, {"init": INIT_OK, "done": DONE, "fail": FAIL, "randread": RANDREAD_DONE,
                                "backend_error": BACKEND_ERROR}, stop=("done",), timeout=run_timeout,
                          grace={"randread": FLUSH_GRACE_S, "fail": 5, "backend_error": FLUSH_GRACE_S})
                # What the guest printed counts even if it stopped later on.
                res = parse_results(r["out"])
                res["wall_s"] = round(r["wall_s"], 3)
                if not all(k in res for k in IO_KEYS):
                    res.update(failed=True, returncode=r["returncode"], error=stall_reason(r))
                    tail = r["out"][-1500:].decode(errors="replace")
                    log_to(log, f"  disk io run {i + 1}/{runs} {name:6} FAILED: {res['error']}\n{tail}")
                elif "flush_ms" not in res:
                    res["flush_error"] = console_error(r["out"]) or f"no answer in {FLUSH_GRACE_S} s"
                samples[name].append(res)
                if res.get("failed"):
                    continue
                flush = f"{res['flush_ms']:.1f} ms" if "flush_ms" in res else f"FAILED ({res['flush_error']})"
                log_to(log, f"  disk io run {i + 1}/{runs} {name:6} seq write {res['seq_write_mbs']:7.1f} MB/s, "
                       f"seq read {res['seq_read_mbs']:7.1f} MB/s, 4k randread {res['randread_iops']:7.0f} IOPS "
                       f"({res['randread_reads']:.0f} reads), flush {flush}, wall {r['wall_s']:.1f} s")
    keys = IO_KEYS + ("flush_ms",)
    median = {n: {k: median_of(s, k) for k in keys} for n, s in samples.items()}
    ratios = {k: ratio(median["pvhvm"][k], median["qemu"][k]) for k in IO_KEYS} if "qemu" in median else {}
    return {"seq_mib": seq_mib, "randread_s": rand_s, "image_mib": image_mib, "qemu_cache": qemu_cache,
            "runs": samples, "median": median, "ratio_pvhvm_over_qemu": ratios,
            "failed_runs": {n: sum(1 for s in ss if s.get("failed")) for n, ss in samples.items()}}


# --------------------------------------------------------------------------- boot from disk


def debian_image(log=sys.stderr):
    """rootfs.py's image, or NotMeasured with the reason."""
    try:
        from pvhvm import rootfs
    except ImportError as e:
        raise NotMeasured(f"python/pvhvm/rootfs.py is not there yet ({e})") from None
    from pvhvm.errors import BuildError

    try:
        t = time.perf_counter()
        img = rootfs.prepare_debian_rootfs()
        if time.perf_counter() - t > 5:
            log_to(log, f"  boot_disk: built the Debian image in {time.perf_counter() - t:.0f} s")
        return img
    except BuildError as e:
        raise NotMeasured(f"the Debian root image cannot be built here: {e}") from None


def measure_boot(runs: int = 1, skip_qemu: bool = False, timeout: float = 600, log=sys.stderr) -> dict:
    """Debian from a disk to its login prompt under pvhvm and QEMU, alternated."""
    if not skip_qemu and shutil.which(QEMU) is None:
        raise NotMeasured(f"{QEMU} not found (pass --skip-qemu)")
    img = debian_image(log)
    from pvhvm.images import prepare_default_guest

    g = prepare_default_guest()
    label = getattr(img, "label", "pvhvm-root")
    cmdline = f"root=LABEL={label} rw"
    names = ["pvhvm"] + ([] if skip_qemu else ["qemu"])
    samples: dict[str, list[dict]] = {n: [] for n in names}
    patterns = {"first_line": FIRST_LINE, "init": INIT_OK, "switch_root": SWITCH_ROOT, "login": LOGIN,
                "shell": SHELL_PROMPT, "backend_error": BACKEND_ERROR}
    # A disk the backend gave up on never comes back: stop soon after. A
    # boot that prints nothing for BOOT_IDLE_S has stalled.
    with tempfile.TemporaryDirectory(prefix="run-", dir=work_dir()) as tmp:
        copy = Path(tmp) / "root.img"
        for i in range(runs):
            for name in run_order(names, i):
                fresh_copy(img.path, copy)
                if name == "pvhvm":
                    # hvc0 logs root in: wait a little for the shell too.
                    r = watch(pvhvm_cmd(g.vmlinux, g.initrd, cmdline, copy), patterns, stop=("login", "shell"),
                              timeout=timeout, grace={"backend_error": 20, "login": 60}, idle_timeout=BOOT_IDLE_S)
                else:
                    r = watch(qemu_cmd(g.vmlinux, g.initrd, cmdline, copy), patterns, stop=("login",),
                              timeout=timeout, grace={"backend_error": 20}, idle_timeout=BOOT_IDLE_S)
                t = r["times"]
                if "login" not in t:
                    why = console_error(r["out"]) or (
                        f"the console went silent for {BOOT_IDLE_S} s (killed after {r['wall_s']:.0f} s)" if r["idle"]
                        else f"no login prompt within {r['wall_s']:.0f} s" if r["timed_out"]
                        else f"exit {r['returncode']}")
                    tail = r["out"][-2500:].decode(errors="replace")
                    log_to(log, f"  boot_disk run {i + 1}/{runs} {name:6} FAILED: no login prompt after "
                           f"{r['wall_s']:.0f} s: {why}\n{tail}")
                    samples[name].append({"failed": True, "error": why, "returncode": r["returncode"],
                                          **{f"{k}_s": round(v, 3) for k, v in t.items()}})
                    continue
                s = {f"{k}_s": round(v, 3) for k, v in t.items()}
                s["failed_units"] = len(re.findall(rb"\[FAILED\]", r["out"]))
                samples[name].append(s)
                log_to(log, f"  boot_disk run {i + 1}/{runs} {name:6} init {t.get('init', 0):6.1f} s, "
                       f"switch_root {t.get('switch_root', 0):6.1f} s, login {t['login']:6.1f} s"
                       + (f", shell {t['shell']:6.1f} s" if "shell" in t else "")
                       + (f", {s['failed_units']} units FAILED" if s["failed_units"] else ""))
    keys = ("first_line_s", "init_s", "switch_root_s", "login_s", "shell_s")
    median = {n: {k: median_of(s, k) for k in keys} for n, s in samples.items()}
    ratios = ({k: ratio(median["pvhvm"][k], median["qemu"][k]) for k in ("switch_root_s", "login_s")}
              if "qemu" in median else {})
    return {"image": str(img.path), "kernel": g.kernel_version, "cmdline": cmdline, "runs": samples,
            "median": median, "ratio_pvhvm_over_qemu": ratios,
            "failed_runs": {n: sum(1 for s in ss if s.get("failed")) for n, ss in samples.items()}}


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"Smaller sizes: {SIZES['quick']} vs {SIZES['full']}.")
    ap.add_argument("--runs", type=int, help="Runs per hypervisor (default 3, 1 with --quick).")
    ap.add_argument("--skip-qemu", action="store_true")
    ap.add_argument("--qemu-cache", default="none", help="QEMU's -drive cache= mode (default none).")
    ap.add_argument("--only", nargs="+", choices=("io", "boot"), default=("io", "boot"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    result: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "qemu": qemu_version()}
    for part, fn in (("io", lambda: measure_io(args.quick, runs, args.skip_qemu, qemu_cache=args.qemu_cache)),
                     ("boot", lambda: measure_boot(runs, args.skip_qemu))):
        if part in args.only:
            t = time.perf_counter()
            try:
                result[part] = fn()
            except NotMeasured as e:
                result[part] = {"not_measured": str(e)}
            result[part]["section_s"] = round(time.perf_counter() - t, 1)
            print(json.dumps({k: v for k, v in result[part].items() if k != "runs"}, indent=2))
    out = args.json or RESULTS / f"disk-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
