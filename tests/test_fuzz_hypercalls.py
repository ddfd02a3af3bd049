"""The hypercall fuzzer's short deterministic run (fuzz/hypercalls.py,
docs/fuzzing.md): the hcfuzz guest issues random hypercalls with hostile
arguments from every vCPU, with and without interrupts, 64-bit and in each
32-bit paging mode, and the host checks itself after every batch (alive,
xenstore and console answer, bounded RSS, only Xen errnos). Fixed seeds;
about 20 s in all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # fuzz/ lives at the top of the repository

from fuzz import hypercalls  # noqa: E402
COUNT = 6000  # calls on vCPU 0 per session: about a second each

# (seed, arch, vcpus, irq); for arch 32 the seed picks the paging mode: pae, pse, nopaging.
SESSIONS = [
    (101, 64, 2, 1),
    (102, 64, 1, 0),
    (103, 64, 4, 1),
    (104, 64, 3, 0),
    (105, 32, 2, 1),   # pse
    (106, 32, 1, 0),   # nopaging
    (108, 32, 3, 1),   # pae
    (109, 32, 2, 0),   # pse
]


def test_campaign_finding_32_bit_frame_at_4g_is_fixed(guests):
    """Seed 3024 (32-bit, 2 vCPUs, no interrupts) once placed a frame at gfn
    0xffffffff with XENMEM_add_to_physmap: accepted, then the engine could
    not map it and the domain ended with an emulator error."""
    res = hypercalls.run_session(3024, 50000, vcpus=2, arch=32, irq=0, every=4096)
    assert res.findings == [] and res.outcome == "shutdown (poweroff)", [f.message for f in res.findings]


@pytest.mark.parametrize("seed,arch,vcpus,irq", SESSIONS)
def test_hcfuzz_session_finds_nothing(guests, seed, arch, vcpus, irq):
    res = hypercalls.run_session(seed, COUNT, vcpus=vcpus, arch=arch, irq=irq, every=1024)
    assert res.findings == [], "\n\n".join(f"{f.kind}: {f.message}\n  replay: {f.replay()}\n" + "\n".join(f.window[-8:])
                                           for f in res.findings)
    assert res.outcome == "shutdown (poweroff)"
    # Every batch was checked, every vCPU took part (the 32-bit bring-up
    # included: a busy TSS in its context was once refused), and the calls
    # reached far past the first argument check.
    assert res.batches == COUNT // 1024 + 1
    assert res.calls >= COUNT and res.vcpus_seen == list(range(vcpus))
    assert res.distinct_calls > 300 and res.distinct_successes > 40, (res.distinct_calls, res.distinct_successes)


def test_a_finding_is_written_as_a_reproducer(guests, tmp_path, monkeypatch):
    """Every batch is a finding when no RSS growth is allowed: the session
    stops at the first and the reproducer has the seed, the guest's command
    line, the replay command and the calls before it."""
    monkeypatch.setattr(hypercalls, "RSS_GROWTH_LIMIT", -(1 << 40))
    res = hypercalls.run_session(7, 3000, vcpus=2, arch=64, irq=1, every=512)
    assert [f.kind for f in res.findings] == ["rss"]
    path = hypercalls.write_finding(tmp_path, res.findings[0], 1)
    rec = json.loads(path.read_text())
    assert rec["seed"] == 7 and rec["host"] is True
    assert rec["cmdline"] == "seed=7 count=3000 irq=1 every=512 mem=64"
    assert rec["replay"].startswith("python -m fuzz.hypercalls --seed 7 --sessions 1 --count 3000 --vcpus 2")
    assert len(rec["window"]) == hypercalls.WINDOW and all("vcpu" in line for line in rec["window"])


def test_campaign_command(guests, tmp_path):
    """The campaign command: sessions in child processes, calls per second, no findings, exit 0."""
    out = tmp_path / "findings"
    p = subprocess.run([sys.executable, "-m", "fuzz.hypercalls", "--seed", "21", "--sessions", "2", "--count", "3000",
                        "--vcpus", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "session seed=21 irq=1" in p.stdout and "session seed=22 irq=0" in p.stdout
    assert "HCFUZZ campaign: 2 sessions" in p.stdout and "calls/s" in p.stdout
    assert not out.exists() or list(out.iterdir()) == []
