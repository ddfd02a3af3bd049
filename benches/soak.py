#!/usr/bin/env python3
"""Soak: many boots in a row, and hours of mixed load, with a summary.

    .venv/bin/python benches/soak.py boots [--count 50] [--vcpus 4] [--disk]
    .venv/bin/python benches/soak.py stress [--duration 3600] [--sample 60]

Not a CI test (the suite runs each with a tiny count to keep the command
working); run them before a release or after touching the run loop.

boots: `pvhvm boot` of the default guest, COUNT times, each a process of
its own fed commands on stdin, as a user would: it must print the init
marker, run the commands (with --disk: load xen-blkfront, write 8 MiB to
/dev/xvda with O_DIRECT, read it back and compare) and power off with
status 0 when its input ends. Any other status, a missing line, or a run
longer than --timeout counts as a failure, and its output is kept in
--keep DIR.

stress: one default guest in this process with passt networking and a
disk, driven through its shell in rounds of CPU work (hashing random data),
a network transfer (the guest's nc sends 8 MiB to a host server through
passt, md5 checked) and disk writes and reads (8 MiB O_DIRECT, md5
checked), for --duration seconds. This process's RSS is sampled every
--sample seconds; the summary says how it moved after the first sample
taken once a round had run (the warm-up: caches, translated code) and
fails if it grew by more than --max-growth MiB.

Both print one line per boot or sample and a summary, and exit 1 on any
failure.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = b"PVHVM-INIT-OK"
MIB = 1 << 20
BLKFRONT_UP = ("modprobe xen-blkfront; i=0; while [ ! -b /dev/xvda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); "
               "done; [ -b /dev/xvda ]")
DISK_ROUND = ("dd if=/dev/urandom of=/tmp/w bs=1M count=8 2>/dev/null; "
              "dd if=/tmp/w of=/dev/xvda bs=1M oflag=direct 2>/dev/null; "
              "a=$(md5sum < /tmp/w); b=$(dd if=/dev/xvda bs=1M count=8 iflag=direct 2>/dev/null | md5sum); "
              "[ \"$a\" = \"$b\" ] && echo DISK-OK")
DISK_CHECK = f"{BLKFRONT_UP}; {DISK_ROUND}"


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --------------------------------------------------------------------------- boots


def one_boot(i: int, args, disk: Path | None) -> tuple[bool, float, str, bytes]:
    cmd = [sys.executable, "-m", "pvhvm", "boot", "--net", "none", "--vcpus", str(args.vcpus)]
    script = b"echo SOAK-$((20+22))\n"
    if disk is not None:
        cmd += ["--disk", str(disk)]
        script += DISK_CHECK.encode() + b"\n"
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, input=script, capture_output=True, timeout=args.timeout)
        status, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        status, out, err = None, e.stdout or b"", e.stderr or b""
    took = time.monotonic() - t0
    missing = [w for w in (MARKER, b"SOAK-42", *([b"DISK-OK"] if disk else [])) if w not in out]
    if status != 0 or missing:
        why = f"status {status}" if status != 0 else f"no {b', '.join(missing).decode()}"
        return False, took, why, out + b"\n--- stderr ---\n" + err
    return True, took, "ok", b""


def soak_boots(args) -> int:
    failures = 0
    times = []
    keep = Path(args.keep) if args.keep else None
    with tempfile.TemporaryDirectory(prefix="pvhvm-soak-") as tmp:
        disk = None
        if args.disk:
            disk = Path(tmp) / "disk.img"
            with open(disk, "wb") as f:
                f.truncate(64 * MIB)
        for i in range(1, args.count + 1):
            ok, took, why, log = one_boot(i, args, disk)
            times.append(took)
            if not ok:
                failures += 1
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    (keep / f"boot-{i}.log").write_bytes(log)
            print(f"boot {i}/{args.count}: {why} in {took:.2f} s", flush=True)
    print(f"summary: {args.count} boots (vcpus {args.vcpus}{', disk' if args.disk else ''}), {failures} failed; "
          f"time min {min(times):.2f} s, median {statistics.median(times):.2f} s, max {max(times):.2f} s")
    return 1 if failures else 0


# --------------------------------------------------------------------------- stress


class Sink:
    """A host TCP server on 127.0.0.1 that hashes what each client sends."""

    def __init__(self) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(4)
        self.port = self.srv.getsockname()[1]
        self.results: list[tuple[int, str]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            h, n = hashlib.md5(), 0
            try:
                while b := c.recv(1 << 20):
                    h.update(b)
                    n += len(b)
            except OSError as e:  # a transfer cut short is that round's failure, not the server's end
                h.update(f"cut short: {e}".encode())
            finally:
                c.close()
            self.results.append((n, h.hexdigest()))

    def close(self) -> None:
        self.srv.close()


def soak_stress(args) -> int:
    import pvhvm
    from pvhvm.images import prepare_default_guest
    from pvhvm.shell import GuestShell

    guest = prepare_default_guest()
    sink = Sink()
    failures = 0
    rounds = 0
    samples: list[float] = []
    with tempfile.TemporaryDirectory(prefix="pvhvm-stress-") as tmp:
        disk = Path(tmp) / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(64 * MIB)
        dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0 pvhvm.shell pvhvm.net",
                           memory_mib=256, vcpus=args.vcpus, net="passt", disks=[str(disk)])
        try:
            dom.expect(MARKER, 180)
            sh = GuestShell(dom)
            gateway = sh.ok("ip route | awk '/default/ {print $3}'").strip()
            sh.ok(BLKFRONT_UP, 120)
            start = time.monotonic()
            next_sample = start
            while True:
                now = time.monotonic()
                if now >= next_sample:
                    samples.append(rss_mib())
                    print(f"t={now - start:7.0f} s  rounds {rounds:5d}  failures {failures}  "
                          f"RSS {samples[-1]:.1f} MiB", flush=True)
                    next_sample += args.sample
                if now - start >= args.duration:
                    break
                rounds += 1
                try:
                    sh.ok("dd if=/dev/urandom bs=1M count=4 2>/dev/null | sha256sum >/dev/null", 120)
                    received = len(sink.results)
                    sent = sh.ok(f"dd if=/dev/urandom of=/tmp/n bs=1M count=8 2>/dev/null; md5sum < /tmp/n; "
                                 f"nc {gateway} {sink.port} < /tmp/n", 300).split()[0]
                    deadline = time.monotonic() + 30
                    while len(sink.results) <= received and time.monotonic() < deadline:
                        dom.run_until(lambda: len(sink.results) > received, 1)
                    if sink.results[received:] != [(8 * MIB, sent)]:
                        raise RuntimeError(f"network transfer: host got {sink.results[received:]}, guest sent {sent}")
                    if "DISK-OK" not in sh.run(DISK_ROUND, 300):
                        raise RuntimeError("disk write/read mismatch")
                except Exception as e:  # a failed round is counted, the soak goes on
                    failures += 1
                    print(f"round {rounds}: FAILED: {e}", flush=True)
                    if dom.outcome is not None:
                        print(f"domain ended: {dom.outcome}", flush=True)
                        break
        finally:
            dom.close()
            sink.close()
    # Growth from the first sample after a round had run (the warm-up: translated code, caches).
    base = samples[1] if len(samples) > 2 else samples[0]
    growth = samples[-1] - base
    verdict = "stable" if growth <= args.max_growth else f"grew by more than {args.max_growth} MiB"
    print(f"summary: {rounds} rounds in {args.duration:.0f} s (cpu, net 8 MiB, disk 8 MiB each), {failures} failed; "
          f"RSS at start {samples[0]:.1f} MiB, after warm-up {base:.1f} MiB, last {samples[-1]:.1f} MiB, "
          f"max {max(samples):.1f} MiB: {growth:+.1f} MiB, {verdict}")
    return 1 if failures or growth > args.max_growth else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    b = sub.add_parser("boots", help="boot the default guest COUNT times in a row")
    b.add_argument("--count", type=int, default=50)
    b.add_argument("--vcpus", type=int, default=1)
    b.add_argument("--disk", action="store_true", help="with a disk, written and read back each boot")
    b.add_argument("--timeout", type=float, default=300, help="seconds one boot may take")
    b.add_argument("--keep", metavar="DIR", help="keep the output of failed boots here")
    s = sub.add_parser("stress", help="CPU, network and disk load on one guest, RSS sampled")
    s.add_argument("--duration", type=float, default=3600)
    s.add_argument("--sample", type=float, default=60, help="seconds between RSS samples")
    s.add_argument("--vcpus", type=int, default=2)
    s.add_argument("--max-growth", type=float, default=32, help="MiB of RSS growth after the first sample")
    args = ap.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return soak_boots(args) if args.what == "boots" else soak_stress(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "python"))
    sys.exit(main())
