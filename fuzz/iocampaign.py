"""What the I/O fuzz targets (xenstore, rings, parsers) share: a finding, its
reproducer file, and the campaign command line

    python -m fuzz.<target> --seed N --duration S --out DIR
    python -m fuzz.<target> --replay DIR/<finding>.json

A target is a function ``run_case(case_seed) -> CaseResult``: one case from
its own seed, in a fresh world, that records what it did (``ops``, plain
JSON) so that a finding replays from the file alone (``replay_case(ops)``)
even after the generator changes."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional


@dataclass
class Finding:
    kind: str  # "exception", "traceback", "errno", "invariant", "unanswered", "memory"
    detail: str  # one line, stable enough to deduplicate on

    def signature(self) -> str:
        # Numbers vary between cases that hit one bug: leave them out.
        text = re.sub(r"[0-9]+", "#", f"{self.kind}:{self.detail}")
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class CaseResult:
    seed: int
    messages: int = 0
    findings: list[Finding] = field(default_factory=list)
    ops: list = field(default_factory=list)

    def find(self, kind: str, detail: str) -> None:
        self.findings.append(Finding(kind, detail.splitlines()[0][:300] if detail else kind))


def exception_detail(e: BaseException) -> str:
    """`Type: message` at the innermost frame of pvhvm's code, one line."""
    where = ""
    for frame in traceback.extract_tb(e.__traceback__):
        if "pvhvm" in frame.filename:
            where = f" at {Path(frame.filename).name}:{frame.lineno} ({frame.name})"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}{where}"


class TracebackLog(logging.Handler):
    """Catches what pvhvm logs with a traceback (log.exception: a request
    that failed inside a handler that must never raise)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.records.append(f"{record.getMessage()[:120]} -> {exception_detail(record.exc_info[1])}")

    def __enter__(self) -> "TracebackLog":
        logger = logging.getLogger("pvhvm")
        self._level = logger.level
        if logger.getEffectiveLevel() > logging.ERROR:
            logger.setLevel(logging.ERROR)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("pvhvm")
        logger.removeHandler(self)
        logger.setLevel(self._level)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def case_seeds(seed: int):
    """The case seeds of a campaign, derived from its seed."""
    rng = random.Random(seed)
    while True:
        yield rng.getrandbits(48)


def write_reproducer(out: Path, target: str, result: CaseResult, finding: Finding) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{target}-{finding.kind}-{finding.signature()}.json"
    path.write_text(json.dumps({"target": target, "case_seed": result.seed, "kind": finding.kind,
                                "detail": finding.detail, "ops": result.ops}, indent=1) + "\n")
    return path


def campaign(target: str, run_case: Callable[[int], CaseResult], *, seed: int, duration: float,
             out: Optional[Path], rss_limit: int = 256 << 20, report_every: float = 10.0) -> dict:
    """Run cases until `duration` seconds have passed; print progress; write a
    reproducer per new finding (by signature). RSS growing by more than
    `rss_limit` over the first case's is a finding too (a leak across worlds)."""
    start = last = time.monotonic()
    cases = messages = 0
    seen: dict[str, Finding] = {}
    rss0 = None
    for case_seed in case_seeds(seed):
        result = run_case(case_seed)
        cases += 1
        messages += result.messages
        rss = rss_bytes()
        if rss0 is None:
            rss0 = rss
        elif rss - rss0 > rss_limit:
            result.find("memory", f"RSS grew by more than {rss_limit >> 20} MiB over the campaign")
        for f in result.findings:
            sig = f.signature()
            if sig not in seen:
                seen[sig] = f
                where = write_reproducer(out, target, result, f) if out is not None else None
                print(f"[{target}] FINDING {f.kind}: {f.detail}" + (f" -> {where}" if where else ""), flush=True)
        now = time.monotonic()
        if now - last >= report_every or now - start >= duration:
            last = now
            rate = messages / max(now - start, 1e-9)
            print(f"[{target}] {now - start:7.1f} s  cases {cases}  messages {messages}  "
                  f"{rate:,.0f} msg/s  findings {len(seen)}  rss {rss >> 20} MiB", flush=True)
        if now - start >= duration:
            break
    elapsed = time.monotonic() - start
    return {"cases": cases, "messages": messages, "seconds": elapsed, "rate": messages / max(elapsed, 1e-9),
            "findings": list(seen.values())}


def case_runners(run: Callable[[int, Optional[list]], CaseResult]):
    """A target's `run(case_seed, ops)` (ops None: generate them from the
    seed) as its `run_case(seed)` and `replay_case(ops)`."""
    return (lambda seed: run(seed, None)), (lambda ops: run(0, ops))


def main(target: str, run_case: Callable[[int], CaseResult], replay_case: Callable[[list], CaseResult],
         argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m fuzz.{target}", description=f"pvhvm's {target} fuzz campaign")
    ap.add_argument("--seed", type=int, default=1, help="campaign seed (cases derive from it)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds to run")
    ap.add_argument("--out", type=Path, default=Path(f"fuzz-findings/{target}"),
                    help="directory for reproducer files")
    ap.add_argument("--replay", type=Path, help="run one reproducer file and print what it finds")
    args = ap.parse_args(argv)
    # Findings are reported by the campaign; pvhvm's own log stays quiet.
    logging.getLogger("pvhvm").propagate = False
    if args.replay is not None:
        data = json.loads(args.replay.read_text())
        result = replay_case(data["ops"])
        for f in result.findings:
            print(f"{f.kind}: {f.detail}")
        print(f"{len(result.findings)} finding(s) in {result.messages} messages")
        return 1 if result.findings else 0
    summary = campaign(target, run_case, seed=args.seed, duration=args.duration, out=args.out)
    print(f"[{target}] done: {summary['cases']} cases, {summary['messages']} messages in "
          f"{summary['seconds']:.0f} s ({summary['rate']:,.0f} msg/s), {len(summary['findings'])} finding(s)")
    return 1 if summary["findings"] else 0


__all__ = ["CaseResult", "Finding", "TracebackLog", "campaign", "exception_detail", "main", "rss_bytes"]
