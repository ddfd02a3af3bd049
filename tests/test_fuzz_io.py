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
