"""Hypercall fuzzing: the hcfuzz guest (tests/guests/hcfuzz.c) issues random
hypercalls with hostile arguments from every vCPU; the host checks itself
after every batch of them (docs/fuzzing.md).

    python -m fuzz.hypercalls --seed N --duration S [--vcpus N] [--arch 32|64] [--out DIR]

A campaign runs sessions (one domain each, seeds N, N+1, ...) in child
processes, so that a host crash or hang is seen and recorded rather than
ending the campaign. Every finding is written to DIR as a JSON reproducer:
the session's seed, the guest's command line, the command that replays it
and the last hypercalls before it.

Host failures (any is a finding): a Python exception or Rust panic in the
host, the host process dying or hanging, xenstore not answering a read,
the console not answering a PING, RSS growing past a bound, a hypercall
result that is neither a value nor one of Xen's errnos. What the guest does
to itself (a crash, a stall) is recorded too, marked as the guest's.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = ROOT / "tests" / "guests"
# Xen's errno values (xen/include/public/errno.h).
XEN_ERRNOS = frozenset({
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19, 21, 22, 23, 24, 28, 30, 31, 33, 34, 35,
    36, 37, 38, 39, 61, 62, 74, 75, 84, 85, 88, 90, 95, 98, 99, 105, 106, 107, 110, 111,
})
I386_VARIANTS = ("pae", "pse", "nopaging")
MEMORY_MIB = 64
DOMID = 1
NAME = "hcfuzz"
WINDOW = 64              # hypercalls kept for a reproducer
RSS_GROWTH_LIMIT = 64 << 20  # bytes past the first batch, console output not counted
PING_MISSES = 3          # unanswered console PINGs in a row that make a finding
HOST_KINDS = {"host-exception", "host-died", "host-hang", "xenstore", "console", "rss", "errno", "host-error"}


@dataclass
class Finding:
    kind: str            # one of HOST_KINDS, or "guest-crash", "guest-stall"
    message: str
    seed: int
    arch: int
    vcpus: int
    irq: int
    count: int
    cmdline: str = ""
    window: list[str] = field(default_factory=list)

    @property
    def host(self) -> bool:
        return self.kind in HOST_KINDS

    def replay(self) -> str:
        return (f"python -m fuzz.hypercalls --seed {self.seed} --sessions 1 --count {self.count} "
                f"--vcpus {self.vcpus} --arch {self.arch} --irq {self.irq}")


@dataclass
class SessionResult:
    seed: int
    calls: int = 0
    seconds: float = 0.0
    batches: int = 0
    outcome: str = ""
    findings: list[Finding] = field(default_factory=list)
    vcpus_seen: list[int] = field(default_factory=list)
    # (hypercall, sub-op) pairs called, and those that succeeded at least once
    distinct_calls: int = 0
    distinct_successes: int = 0


def build_guest(arch: int = 64, seed: int = 0) -> Path:
    """The hcfuzz ELF: 64-bit, or 32-bit in a paging mode chosen by the seed."""
    spec = importlib.util.spec_from_file_location("guest_build", GUEST_DIR / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    variant = None if arch == 64 else I386_VARIANTS[seed % len(I386_VARIANTS)]
    return mod.build("hcfuzz", GUEST_DIR / "build", variant)


def guest_cmdline(seed: int, count: int, irq: int, every: int) -> str:
    return f"seed={seed} count={count} irq={irq} every={every} mem={MEMORY_MIB}"


class ConsoleLines:
    """The guest's console as it arrives: progress lines, PONGs, the verdict
    (whole lines only; random output between them is skipped)."""

    def __init__(self) -> None:
        self.partial = b""
        self.received = 0
        self.batches = 0
        self.pongs: set[int] = set()
        self.bad_results = 0
        self.passed = False
        self.last: collections.deque = collections.deque(maxlen=12)

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        self.partial = self.partial[-4096:]
        for line in lines:
            if line.startswith(b"HCFUZZ n=") or line.startswith(b"HCFUZZ done"):
                self.batches += 1
            elif line.startswith(b"PONG ") and line[5:].isdigit():
                self.pongs.add(int(line[5:]))
            elif line.startswith(b"HCFUZZ bad-result"):
                self.bad_results += 1
            elif line.startswith(b"VERDICT: PASS"):
                self.passed = True
            if line.startswith((b"HCFUZZ", b"VERDICT", b"FAIL", b"ok -")):
                self.last.append(line.decode(errors="replace"))
            elif b"EXCEPTION" in line:  # common/boot32.S's report may follow random output
                self.last.append(line[line.index(b"EXCEPTION"):].decode(errors="replace"))

    def tail(self) -> str:
        return "\n".join(self.last)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_session(seed: int, count: int, *, vcpus: int = 2, arch: int = 64, irq: int = 1, every: int = 2048,
                stall_s: float = 20.0) -> SessionResult:
    """One domain in this process: `count` calls on vCPU 0, the host's
    properties checked after every progress line of the guest."""
    import pvhvm
    from pvhvm import OutcomeKind, ShutdownReason

    res = SessionResult(seed)
    cmdline = guest_cmdline(seed, count, irq, every)
    recent: collections.deque = collections.deque(maxlen=WINDOW)
    bad_results: dict[tuple, str] = {}
    called: set[tuple] = set()
    succeeded: set[tuple] = set()
    vcpus_seen: set[int] = set()

    def finding(kind: str, message: str) -> None:
        res.findings.append(Finding(kind, message, seed, arch, vcpus, irq, count, cmdline, [str(r) for r in recent]))

    def on_call(rec) -> None:
        recent.append(rec)
        res.calls += 1
        r = rec.result
        call = (rec.nr, rec.args[0] & 0xFFFFFFFF if rec.name != "set_timer_op" else 0)
        if len(called) < 4096:
            called.add(call)
        if r >= 0:
            succeeded.add(call)
        vcpus_seen.add(rec.vcpu)
        if (r < 0 and -r not in XEN_ERRNOS) or (arch == 32 and r > 0xFFFFFFFF):
            key = (*call, r)
            if key not in bad_results and len(bad_results) < 20:
                bad_results[key] = str(rec)
                finding("errno", f"result neither a value nor a Xen errno: {rec}")

    t0 = time.monotonic()
    dom = None
    console = ConsoleLines()
    try:
        kept = [0]  # what the Domain keeps of console output (hvc0 and the hypervisor console)

        class FuzzDomain(pvhvm.Domain):
            # The guest prints with console_io: its lines come from the
            # hypervisor console even once garbage in the hvc0 ring makes
            # hvc0 speak (from then on `console` sinks see hvc0 only).
            def _on_hv_console(self, data: bytes) -> None:
                console.feed(data)
                super()._on_hv_console(data)

        def on_console(data: bytes) -> None:
            kept[0] += len(data)

        dom = FuzzDomain(build_guest(arch, seed), cmdline=cmdline, memory_mib=MEMORY_MIB, vcpus=vcpus, domid=DOMID,
                         name=NAME, trace=on_call, console=on_console)
        rss0 = None
        pings_sent, ping_misses = 0, 0
        while dom.outcome is None:
            batches = console.batches
            if not dom.run_until(lambda: console.batches > batches, timeout=stall_s):
                if dom.outcome is not None:
                    break
                # No progress line for stall_s: the host must still answer.
                if dom.store.read(0, f"/local/domain/{DOMID}/name") != NAME.encode():
                    finding("host-hang", "no progress and xenstore does not answer")
                else:
                    states = [dom.vcpu_status(i).get("activity") for i in range(vcpus)]
                    last = list(recent)[-8:]
                    # A call continued again and again (a huge memory_op) is
                    # slow, not stuck: the guest's own doing.
                    long_call = len(last) == 8 and len({(r.vcpu, r.nr, r.args[0] & 0x3F) for r in last}) == 1
                    finding("guest-long-call" if long_call else "guest-stall",
                            f"no progress line for {stall_s} s; vCPUs {states}")
                break
            res.batches += 1
            # xenstore answers a read of the domain's own node.
            try:
                name = dom.store.read(0, f"/local/domain/{DOMID}/name")
            except Exception as err:  # noqa: BLE001 - any failure here is the finding
                name = repr(err).encode()
            if name != NAME.encode():
                finding("xenstore", f"/local/domain/{DOMID}/name reads {name!r}")
            # The console: the guest answers a PING at its next progress
            # line (its own console reads may eat one now and then).
            if pings_sent:
                if pings_sent in console.pongs:
                    ping_misses = 0
                else:
                    ping_misses += 1
                    if ping_misses == PING_MISSES:
                        finding("console", f"{PING_MISSES} console PINGs in a row unanswered")
            pings_sent += 1
            dom.send_console_input(f"PING {pings_sent}\n".encode())
            # Memory: bounded once running, what the guest printed aside
            # (the Domain keeps its console output, twice).
            rss = _rss() - console.received - kept[0]
            if rss0 is None:
                rss0 = rss
            elif rss - rss0 > RSS_GROWTH_LIMIT:
                finding("rss", f"RSS grew by {(rss - rss0) >> 20} MiB in {res.batches} batches")
                break
        outcome = dom.outcome
        if outcome is not None:
            res.outcome = str(outcome)
            if outcome.kind is OutcomeKind.ERROR:
                finding("host-error", f"the core ended the domain: {outcome}")
            elif not (outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.POWEROFF):
                finding("guest-crash", f"{outcome}; console: {console.tail()!r}")
            elif not console.passed:
                finding("errno" if console.bad_results else "guest-crash", f"guest verdict not PASS: {console.tail()!r}")
        else:
            res.outcome = "stopped"
    except Exception:  # noqa: BLE001 - a host exception or a Rust panic is the finding
        finding("host-exception", traceback.format_exc())
    finally:
        res.seconds = time.monotonic() - t0
        res.vcpus_seen = sorted(vcpus_seen)
        res.distinct_calls, res.distinct_successes = len(called), len(succeeded)
        if dom is not None:
            try:
                dom.close()
            except Exception:  # noqa: BLE001
                finding("host-exception", "close: " + traceback.format_exc())
    return res


def _session_child(args) -> int:
    res = run_session(args.seed, args.count, vcpus=args.vcpus, arch=args.arch, irq=args.irq, every=args.every)
    print("RESULT " + json.dumps(asdict(res)), flush=True)
    return 0


def _run_child(seed: int, count: int, vcpus: int, arch: int, irq: int, every: int, timeout: float) -> SessionResult:
    """A session in a child process: its death or hang is a finding too."""
    cmd = [sys.executable, "-m", "fuzz.hypercalls", "--session", "--seed", str(seed), "--count", str(count),
           "--vcpus", str(vcpus), "--arch", str(arch), "--irq", str(irq), "--every", str(every)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "python"), str(ROOT),
                                                                        os.environ.get("PYTHONPATH")])))
    t0 = time.monotonic()
    mk = lambda kind, msg: Finding(kind, msg, seed, arch, vcpus, irq, count,  # noqa: E731
                                   guest_cmdline(seed, count, irq, every))
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as err:
        res = SessionResult(seed, seconds=time.monotonic() - t0, outcome="timeout")
        tail = (err.stderr or b"")[-2000:].decode(errors="replace")
        res.findings.append(mk("host-hang", f"session did not end within {timeout:.0f} s; stderr: {tail}"))
        return res
    for line in p.stdout.decode(errors="replace").splitlines():
        if line.startswith("RESULT "):
            d = json.loads(line[7:])
            d["findings"] = [Finding(**f) for f in d["findings"]]
            res = SessionResult(**d)
            if p.returncode != 0 or b"Traceback" in p.stderr or b"panicked" in p.stderr:
                res.findings.append(mk("host-exception", p.stderr[-4000:].decode(errors="replace")))
            return res
    res = SessionResult(seed, seconds=time.monotonic() - t0, outcome=f"exit {p.returncode}")
    res.findings.append(mk("host-died", f"exit status {p.returncode}; stderr: {p.stderr[-4000:].decode(errors='replace')}"))
    return res


def write_finding(out: Path, f: Finding, n: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{f.kind}-seed{f.seed}-{n}.json"
    d = asdict(f)
    d["host"] = f.host
    d["replay"] = f.replay()
    path.write_text(json.dumps(d, indent=2) + "\n")
    return path


def campaign(seed: int, duration: float, *, vcpus: int, arch: int, out: Path, count: int, irq: int | None,
             every: int, sessions: int | None = None) -> int:
    """Sessions with seeds `seed`, `seed`+1, ... until `duration` seconds
    (or `sessions` of them) have passed; returns the host findings' count.
    `irq` None alternates with and without interrupts."""
    t0 = time.monotonic()
    total_calls = total_secs = 0.0
    host = guest = 0
    n = 0
    s = seed
    while (sessions is None and time.monotonic() - t0 < duration) or (sessions is not None and n < sessions):
        this_irq = irq if irq is not None else s % 2
        res = _run_child(s, count, vcpus, arch, this_irq, every, timeout=max(120.0, count / 200))
        n += 1
        total_calls += res.calls
        total_secs += res.seconds
        for f in res.findings:
            path = write_finding(out, f, n)
            host += f.host
            guest += not f.host
            print(f"  finding ({'host' if f.host else 'guest'}): {f.kind}: {f.message.splitlines()[0][:200]} -> {path}",
                  flush=True)
        rate = res.calls / res.seconds if res.seconds else 0
        print(f"session seed={s} irq={this_irq} calls={res.calls} {rate:.0f} calls/s outcome={res.outcome}; "
              f"total {total_calls:.0f} calls in {time.monotonic() - t0:.0f} s, host findings {host}, guest {guest}",
              flush=True)
        s += 1
    secs = time.monotonic() - t0
    print(f"HCFUZZ campaign: {n} sessions, {total_calls:.0f} calls in {secs:.0f} s "
          f"({total_calls / max(total_secs, 1e-9):.0f} calls/s in sessions), host findings {host}, guest findings {guest}",
          flush=True)
    return host


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz.hypercalls", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of campaign")
    ap.add_argument("--sessions", type=int, default=None, help="run this many sessions instead of a duration")
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument("--arch", type=int, choices=(32, 64), default=64)
    ap.add_argument("--irq", type=int, choices=(0, 1), default=None, help="interrupts on or off (default: alternate)")
    ap.add_argument("--count", type=int, default=50000, help="calls on vCPU 0 per session")
    ap.add_argument("--every", type=int, default=2048, help="calls on vCPU 0 per batch (host checks)")
    ap.add_argument("--out", type=Path, default=Path("fuzz-findings"))
    ap.add_argument("--session", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.session:
        return _session_child(args)
    host = campaign(args.seed, args.duration, vcpus=args.vcpus, arch=args.arch, out=args.out, count=args.count,
                    irq=args.irq, every=args.every, sessions=args.sessions)
    return 1 if host else 0


if __name__ == "__main__":
    sys.exit(main())
