"""Short deterministic runs of the I/O fuzzers in fuzz/ (xenstore on the ring
and the host socket, the backend rings as a hostile frontend, the file
parsers): fixed case seeds, each case in a fresh world; any finding fails
with its reproducer's first line. The campaigns (python -m fuzz.<target>)
run the same cases from a campaign seed for as long as asked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's fuzz/ package

from fuzz import parsers, rings, xenstore  # noqa: E402
from fuzz.iocampaign import case_seeds  # noqa: E402


def run_cases(target, campaign_seed: int, n: int) -> int:
    messages = 0
    for seed, _ in zip(case_seeds(campaign_seed), range(n)):
        result = target.run_case(seed)
        assert not result.findings, f"case {seed}: {result.findings[0].kind}: {result.findings[0].detail}"
        messages += result.messages
    return messages


def test_xenstore_ring_and_socket():
    assert run_cases(xenstore, 15, 60) > 10000


def test_xenstore_replays_its_ops():
    first = xenstore.run_case(99)
    again = xenstore.replay_case(first.ops)
    assert (first.messages, first.findings) == (again.messages, again.findings)


@pytest.mark.slow
def test_backend_rings(guests):
    assert run_cases(rings, 15, 4) > 500


@pytest.mark.slow
def test_parsers():
    assert run_cases(parsers, 15, 3) >= 100


@pytest.mark.parametrize("target", ["xenstore", "parsers", "rings"])
def test_campaign_commands_as_the_readme_gives_them(target, guests, tmp_path):
    """`python -m fuzz.TARGET --seed N --duration S --out DIR` and `--replay FILE`."""
    import json
    import re
    import subprocess

    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", f"fuzz.{target}", "--seed", "3", "--duration", "2", "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=root)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(rf"^\[{target}\] done: [1-9]\d* cases, \d+ messages in \d+ s \([\d,]+ msg/s\), 0 finding\(s\)$",
                     p.stdout, re.M), p.stdout
    if target == "xenstore":
        case = tmp_path / "case.json"
        case.write_text(json.dumps({"ops": xenstore.run_case(99).ops}))
        p = subprocess.run([sys.executable, "-m", "fuzz.xenstore", "--replay", str(case)], capture_output=True,
                           text=True, timeout=120, cwd=root)
        assert p.returncode == 0 and re.search(r"^0 finding\(s\) in \d+ messages$", p.stdout, re.M), p.stdout
