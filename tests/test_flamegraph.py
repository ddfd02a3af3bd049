"""pvhvm.flamegraph: folded stacks parsed, drawn as a standalone SVG flame graph."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pvhvm
from pvhvm.flamegraph import CHAR_WIDTH, FRAME_HEIGHT, SIDE_PAD, parse_folded, render_svg

SVG = "{http://www.w3.org/2000/svg}"
TITLE_RE = re.compile(r"^(.*) \((\d+) samples, (\d+\.\d\d)%\)$", re.S)


@dataclass
class DrawnFrame:
    name: str
    samples: int
    percent: float
    x: float
    y: float
    width: float
    fill: str
    label: str | None


def frames_of(svg: str) -> list[DrawnFrame]:
    """Every frame drawn, read back from the SVG as a viewer would."""
    root = ET.fromstring(svg.encode())
    assert root.tag == f"{SVG}svg"
    drawn = []
    for group in root.iter(f"{SVG}g"):
        title = group.find(f"{SVG}title")
        rect = group.find(f"{SVG}rect")
        if title is None or rect is None:
            continue
        match = TITLE_RE.match(title.text)
        assert match, title.text
        text = group.find(f"{SVG}text")
        drawn.append(DrawnFrame(
            name=match[1], samples=int(match[2]), percent=float(match[3]),
            x=float(rect.get("x")), y=float(rect.get("y")), width=float(rect.get("width")),
            fill=rect.get("fill"), label=None if text is None else text.text,
        ))
    return drawn


def by_name(frames: list[DrawnFrame]) -> dict[str, DrawnFrame]:
    named = {frame.name: frame for frame in frames}
    assert len(named) == len(frames), "a name drawn twice"
    return named


def rgb(fill: str) -> tuple[int, int, int]:
    return int(fill[1:3], 16), int(fill[3:5], 16), int(fill[5:7], 16)


def test_parse_sums_duplicates_skips_malformed_keeps_spaces() -> None:
    text = (
        "early boot;clear_bss 240\n"
        "early boot;memset 12\n"
        "\n"
        "   \n"
        "kernel init;[idle] 800\r\n"
        "early boot;memset 3.0\n"
        "user space;do sys_open (inlined) 5\n"
        "no count at all\n"
        "lonely\n"
        "42\n"
        "bad;count 12x\n"
        "negative;count -4\n"
        "zero;count 0\n"
        "nan;count nan\n"
        "inf;count inf\n"
        ";;; 9\n"
        "a;;b 2\n"
        "  indented;frame\t7  \n"
    )
    assert parse_folded(text) == {
        ("early boot", "clear_bss"): 240,
        ("early boot", "memset"): 15,
        ("kernel init", "[idle]"): 800,
        ("user space", "do sys_open (inlined)"): 5,
        ("a", "b"): 2,
        ("indented", "frame"): 7,
    }
    assert parse_folded("") == {}


def test_svg_parses_and_root_spans_the_plot() -> None:
    stacks = parse_folded("early boot;clear_bss 240\nearly boot;memset 12\nkernel init;[idle] 800\nuser space;[user] 300\n")
    svg = render_svg(stacks, "Boot profile", width=1200, subtitle="debian 12, 1 vCPU")
    root = ET.fromstring(svg.encode())
    assert root.get("version") == "1.1"
    assert (root.get("width"), root.get("viewBox")) == ("1200", f"0 0 1200 {root.get('height')}")
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert texts[:2] == ["Boot profile", "debian 12, 1 vCPU"]
    # Standalone: nothing fetched, no script needed.
    assert "href" not in svg and "<script" not in svg and "url(" not in svg

    frames = by_name(frames_of(svg))
    everything = frames["all"]
    assert (everything.x, everything.width) == (SIDE_PAD, 1200 - 2 * SIDE_PAD)
    assert (everything.samples, everything.percent) == (1352, 100.0)
    assert frames["[idle]"].samples == 800 and frames["[idle]"].percent == round(100 * 800 / 1352, 2)
    for frame in frames.values():
        assert SIDE_PAD <= frame.x and frame.x + frame.width <= 1200 - SIDE_PAD + 0.01
        assert 0 <= frame.y and frame.y + FRAME_HEIGHT <= int(root.get("height"))


def test_widths_are_proportional_and_children_sit_above() -> None:
    stacks = {("main", "hot"): 300, ("main", "cold"): 100, ("other",): 400}
    frames = by_name(frames_of(render_svg(stacks, "t")))
    main, hot, cold, everything = frames["main"], frames["hot"], frames["cold"], frames["all"]
    assert abs(hot.width - 0.75 * main.width) < 1
    assert abs(main.width - 0.5 * everything.width) < 1
    # Root at the bottom, each callee one row above its caller, inside it.
    assert everything.y - main.y == FRAME_HEIGHT and main.y - hot.y == FRAME_HEIGHT
    assert cold.y == hot.y and frames["other"].y == main.y
    for child, parent in ((hot, main), (cold, main), (main, everything)):
        assert parent.x - 0.01 <= child.x and child.x + child.width <= parent.x + parent.width + 0.01
    # Siblings by name, left to right, whatever order the stacks came in.
    assert cold.x < hot.x and main.x < frames["other"].x


def test_self_time_and_narrow_frames() -> None:
    stacks = {("busy",): 500_000, ("busy", "callee"): 500_000, ("busy", "rare"): 1, ("tiny",): 1}
    frames = by_name(frames_of(render_svg(stacks, "t")))
    assert abs(frames["busy"].width - 2 * frames["callee"].width) < 1
    # 1 sample in a million is ~0.001 px at 1200 px: not drawn at all.
    assert "rare" not in frames and "tiny" not in frames
    assert frames["all"].samples == 1_000_002


def test_labels_elided_to_fit_and_skipped_on_narrow_frames() -> None:
    long_name = "a_function_with_a_rather_long_name_indeed"
    stacks = {(long_name,): 50, ("short",): 950, ("sliver",): 2}
    frames = by_name(frames_of(render_svg(stacks, "t", width=1000)))
    assert frames["short"].label == "short"
    elided = frames[long_name]
    assert elided.label is not None and elided.label.endswith("..")
    assert long_name.startswith(elided.label[:-2]) and len(elided.label) * CHAR_WIDTH <= elided.width
    assert frames["sliver"].width < 3 * CHAR_WIDTH and frames["sliver"].label is None


def test_names_are_escaped_and_round_trip() -> None:
    nasty = "<a&b \"quoted\" 'single'> && </g>"
    stacks = {("std::vector<int>::push_back", nasty): 10, ("x&y",): 10, ("nul\0bell\x07",): 5}
    svg = render_svg(stacks, "title <&> \"'", subtitle="sub & <title>")
    root = ET.fromstring(svg.encode())
    assert [t.text for t in root.iter(f"{SVG}text")][:2] == ["title <&> \"'", "sub & <title>"]
    frames = by_name(frames_of(svg))
    assert frames[nasty].samples == 10 and frames[nasty].label is not None
    assert nasty.startswith(frames[nasty].label.rstrip("."))
    assert frames["std::vector<int>::push_back"].samples == 10 and frames["x&y"].samples == 10
    # Characters XML cannot carry at all are replaced, not passed through.
    assert frames["nul\ufffdbell\ufffd"].samples == 5


def test_nul_in_names_keeps_siblings_merged() -> None:
    stacks = {("a\0",): 1, ("a", "b"): 1, ("a", "c"): 1, ("a\0", "d"): 1, ("a",): 1}
    frames = frames_of(render_svg(stacks, "t"))
    assert [(f.name, f.samples) for f in frames if f.name in ("a", "a\ufffd")] == [("a", 3), ("a\ufffd", 2)]


def test_colours_deterministic_warm_and_pseudo_frames_cool() -> None:
    stacks = {("kernel", "[idle]"): 10, ("kernel", "schedule"): 10, ("[user]",): 10, ("[host]",): 10,
              ("kernel", "memset"): 10, ("[user]", "memset"): 10}
    drawn = frames_of(render_svg(stacks, "t"))
    fills: dict[str, set[str]] = {}
    for frame in drawn:
        fills.setdefault(frame.name, set()).add(frame.fill)
    assert all(len(colours) == 1 for colours in fills.values()), fills
    colour = {name: rgb(next(iter(colours))) for name, colours in fills.items()}
    for warm in ("kernel", "schedule", "memset"):
        red, green, blue = colour[warm]
        assert red > green >= blue and red >= 200, (warm, colour[warm])
    red, green, blue = colour["[idle]"]
    assert red == green == blue
    for cool in ("[user]", "[host]"):
        red, green, blue = colour[cool]
        assert blue > red, (cool, colour[cool])


def test_deterministic_output() -> None:
    stacks = {(f"f{i % 13}", f"g{i % 7}", f"h{i}"): 1 + i % 5 for i in range(500)}
    shuffled = list(stacks.items())
    random.Random(7).shuffle(shuffled)
    first = render_svg(stacks, "t", subtitle="s")
    assert render_svg(stacks, "t", subtitle="s") == first
    assert render_svg(dict(shuffled), "t", subtitle="s") == first


def test_empty_input_says_no_samples() -> None:
    for stacks in ({}, parse_folded("\n\nnot a stack\n"), {("zero",): 0}):
        svg = render_svg(stacks, "Empty profile", subtitle="nothing ran")
        root = ET.fromstring(svg.encode())
        texts = [t.text for t in root.iter(f"{SVG}text")]
        assert texts == ["Empty profile", "nothing ran", "no samples"]
        assert root.find(f".//{SVG}title") is None


def test_many_distinct_stacks_render_quickly() -> None:
    stacks = {}
    for i in range(100_000):
        # 1 to 10 frames from 301 names between a phase and a distinct leaf.
        middle = tuple(f"func_{(i * 7919 + depth * 104729) % 301}" for depth in range(1 + i % 10))
        stacks[(f"phase{i % 7}", *middle, f"leaf_{i}")] = 1 + (i * 31) % 500
    assert len(stacks) == 100_000
    # CPU time, not wall time: the test machine is shared.
    start = time.process_time()
    svg = render_svg(stacks, "many")
    elapsed = time.process_time() - start
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    frames = frames_of(svg)
    assert frames[0].name == "all" and frames[0].samples == sum(stacks.values())
    assert all(frame.width >= 0.1 for frame in frames)


def test_command_line(tmp_path: Path) -> None:
    folded = tmp_path / "boot.folded"
    folded.write_text("early boot;clear_bss 240\nkernel init;[idle] 800\nuser space;[user] 300\nmalformed\n")
    python_dir = str(Path(pvhvm.__file__).resolve().parent.parent)
    outputs = []
    # Different hash seeds: colours must not come from Python's hash().
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": python_dir, "PYTHONHASHSEED": seed}
        run = subprocess.run([sys.executable, "-m", "pvhvm.flamegraph", str(folded), "--title", "Boot"],
                             capture_output=True, env=env, timeout=60)
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1]
    root = ET.fromstring(outputs[0])
    assert [t.text for t in root.iter(f"{SVG}text")][:2] == ["Boot", "boot.folded: 1340 samples in 3 stacks"]
    assert by_name(frames_of(outputs[0].decode()))["[user]"].samples == 300

    missing = subprocess.run([sys.executable, "-m", "pvhvm.flamegraph", str(tmp_path / "absent.folded")],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": python_dir}, timeout=60)
    assert missing.returncode == 1 and "cannot read" in missing.stderr and missing.stdout == ""
