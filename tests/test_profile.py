"""The guest profiler on a test guest that spends its time in known
functions (tests/guests/profile_spin.c): the samples name them, the frame
pointers give their callers, the timeline is in order, and the CLI writes
and shows the profile. Linux's boot profile is checked in test_linux.py."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

import pvhvm
from pvhvm import _core
from pvhvm.profile import (END, FIRST_CONSOLE_LINE, FIRST_HYPERCALL, FIRST_INSTRUCTION, PROCESS_START, Profile,
                           Timeline)

HZ = 2000


@pytest.fixture(scope="module")
def spun(guests, tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "spin.folded"
    dom = pvhvm.Domain(guests["profile_spin"], profile=path, profile_hz=HZ)
    outcome = dom.run(timeout=120)
    assert b"VERDICT: PASS" in dom.console_output, dom.console_output[-2000:]
    assert outcome.kind is pvhvm.OutcomeKind.SHUTDOWN
    return dom, path


def leaf_counts(profile: Profile) -> dict[str, int]:
    counts: dict[str, int] = {}
    for stack, n in profile.folded.items():
        leaf = stack.split(";")[-1]
        counts[leaf] = counts.get(leaf, 0) + n
    return counts


def test_spinning_function_is_named(spun):
    dom, path = spun
    profile = Profile.read(path)
    leaves = leaf_counts(profile)
    # spin_inner counts four times as long as spin_other, and both dwarf the rest.
    top = max(leaves, key=leaves.get)
    assert top == "spin_inner", leaves
    assert leaves["spin_inner"] > 2 * leaves["spin_other"] > 0, leaves
    assert leaves["spin_inner"] + leaves["spin_other"] > 0.8 * profile.samples, leaves


def test_frame_pointers_give_the_callers(spun):
    _, path = spun
    profile = Profile.read(path)
    chains = {tuple(s.split(";")[1:]): n for s, n in profile.folded.items()}
    inner = sum(n for c, n in chains.items() if c[-1:] == ("spin_inner",))
    unwound = sum(n for c, n in chains.items() if c[-3:] == ("guest_main", "spin_outer", "spin_inner"))
    assert unwound > 0.9 * inner, chains


def test_samples_cover_the_wall_time_and_the_timeline_is_in_order(spun):
    dom, path = spun
    profile = Profile.read(path)
    ev = profile.events
    for name in (PROCESS_START, FIRST_INSTRUCTION, FIRST_HYPERCALL, FIRST_CONSOLE_LINE, END):
        assert name in ev, ev
    assert ev[PROCESS_START] <= ev[FIRST_INSTRUCTION] <= ev[FIRST_HYPERCALL] <= ev[END]
    # The guest prints nothing before its first hypercall (console_io).
    assert ev[FIRST_HYPERCALL] <= ev[FIRST_CONSOLE_LINE] <= ev[END]
    # Every tick from the domain's first run to its end is a sample: guest, idle or host.
    ran_s = (ev[END] - ev[FIRST_INSTRUCTION]) / 1e9
    assert profile.samples >= 0.9 * ran_s * HZ, (profile.samples, ran_s)
    assert profile.meta["hz"] == HZ and profile.meta["dropped"] == 0
    assert "symbol table" in profile.meta["symbols"]
    assert profile.meta["frame_pointers"] is True
    # The phases are named by the events around them.
    assert profile.phase(FIRST_CONSOLE_LINE, END)["spin_inner"] > 0, profile.folded


def test_report_lists_top_functions_per_phase(spun):
    _, path = spun
    report = Profile.read(path).report(top=3)
    lines = report.splitlines()
    assert lines[0].startswith("timeline")
    assert any(line.split()[-2:-1] == ["instruction"] or "first guest instruction" in line for line in lines[1:4])
    phase = next(i for i, line in enumerate(lines) if f"{FIRST_CONSOLE_LINE} → {END}:" in line)
    assert lines[phase + 1].split()[-1] == "spin_inner", report


def test_timeline_names_samples_outside_the_events():
    t = Timeline({"a": 10, "b": 20})
    assert t.phase_at(5) == "0 before a"
    assert t.phase_at(10) == t.phase_at(19) == "1 a → b"
    assert t.phase_at(25) == "2 after b"
    assert Timeline({}).phase_at(1) == "profile"


def test_profile_without_a_file_and_the_core_limits(guests):
    dom = pvhvm.Domain(guests["profile_spin"], profile=True, profile_hz=500)
    dom.run(timeout=120)
    profile = dom.stop_profile()
    assert leaf_counts(profile)["spin_inner"] > 0
    assert dom.profile_path is None
    with pytest.raises(pvhvm.GuestError):
        dom.stop_profile()
    with pytest.raises(pvhvm.BuildError):
        pvhvm.Domain(guests["hello"], profile=True, profile_hz=0)
    vm = _core.Vm(1 << 20)
    with pytest.raises(ValueError):
        vm.start_profile(20_001)
    assert vm.take_profile() == ([], 0)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pvhvm", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_cli_boot_profile_then_show_it(guests, tmp_path):
    out = tmp_path / "boot.folded"
    r = run_cli("boot", str(guests["profile_spin"]), "--net", "none", "--profile", str(out), "--profile-hz", "1000")
    assert r.returncode == 0, r.stderr
    assert "profile of" in r.stderr and str(out) in r.stderr
    # Folded stacks as flamegraph.pl reads them: "frame;frame count".
    lines = out.read_text().splitlines()
    assert lines and all(line.rsplit(" ", 1)[1].isdigit() for line in lines)
    assert json.loads((tmp_path / "boot.folded.json").read_text())["hz"] == 1000
    svg = tmp_path / "boot.svg"
    r = run_cli("profile", str(out), "--top", "2", "--svg", str(svg))
    assert r.returncode == 0, r.stderr
    assert "spin_inner" in r.stdout and "timeline" in r.stdout
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert any("spin_inner" in (t.text or "") for t in root.iter() if t.tag.endswith("title"))


@pytest.mark.parametrize("args, says", [
    (["boot", "--profile-hz", "0", "--profile", "/tmp/x"], "--profile-hz"),
    (["boot", "--profile", "/nonexistent-dir/x"], "no such directory"),
    (["profile", "/nonexistent-file"], "No such file"),
])
def test_cli_bad_input_is_one_line(args, says, guests):
    if args[0] == "boot":
        args = [args[0], str(guests["hello"]), *args[1:]]
    r = run_cli(*args, timeout=60)
    assert r.returncode == 2, r
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_profile_of_something_else(tmp_path):
    junk = tmp_path / "junk.folded"
    junk.write_text("no counts here\n")
    r = run_cli("profile", str(junk))
    assert r.returncode == 2 and "no samples" in r.stderr, r.stderr
    good = tmp_path / "ok.folded"
    good.write_text("p;f 3\n")
    (tmp_path / "ok.folded.json").write_text("[1, 2]")
    r = run_cli("profile", str(good))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    (tmp_path / "ok.folded.json").write_text("{broken")
    r = run_cli("profile", str(good))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
