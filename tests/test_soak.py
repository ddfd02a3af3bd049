"""benches/soak.py keeps working: one boot with a disk and two vCPUs, and a
short stress run (the real soaks are long commands, documented in the
README, not CI tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "benches" / "soak.py"
pytestmark = pytest.mark.slow


def test_soak_boots_command():
    p = subprocess.run([sys.executable, str(SOAK), "boots", "--count", "1", "--vcpus", "2", "--disk"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"^boot 1/1: ok in [0-9.]+ s$", p.stdout, re.M), p.stdout
    assert re.search(r"^summary: 1 boots \(vcpus 2, disk\), 0 failed; time min", p.stdout, re.M), p.stdout


def test_soak_stress_command():
    from pvhvm.devices.net_host import find_passt

    assert find_passt(), "passt is installed by scripts/setup"
    p = subprocess.run([sys.executable, str(SOAK), "stress", "--duration", "15", "--sample", "5", "--vcpus", "1"],
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"^summary: (\d+) rounds in 15 s \(cpu, net 8 MiB, disk 8 MiB each\), 0 failed; .*: [+-][0-9.]+ MiB, "
                  r"stable$", p.stdout, re.M)
    assert m and int(m.group(1)) >= 1, p.stdout
