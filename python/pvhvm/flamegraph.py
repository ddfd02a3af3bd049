"""Flame graphs as standalone SVG, from folded stacks.

Folded stacks are what `pvhvm boot --profile FILE` writes and what
flamegraph.pl and speedscope read: one line per stack, frames separated by
';' root first, then a space and a sample count:

    early boot;clear_bss 240
    kernel init;[idle] 800

The picture is the classic one: a synthetic "all" frame at the bottom spans
the plot's width, each frame sits on its caller and is as wide as its share
of the samples, siblings are sorted by name so the same profile always gives
the same bytes. Bracketed pseudo-frames ("[idle]", "[user]", "[host]") get
cool colours so time outside the guest kernel stands out from the warm ones.
Everything is in the one file (no fonts, scripts or stylesheets to fetch);
hovering a frame shows its <title> in any SVG viewer.

    python -m pvhvm.flamegraph IN.folded > OUT.svg
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import math
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT_NAME = "all"

FRAME_HEIGHT = 16
FONT_SIZE = 12
# Monospace, so a label's width in pixels is predictable from its length.
CHAR_WIDTH = FONT_SIZE * 0.6
LABEL_PAD = 3
MIN_LABEL_CHARS = 3
ELLIPSIS = ".."
SIDE_PAD = 10
TITLE_SIZE = 17
SUBTITLE_SIZE = 12
BOTTOM_PAD = 10
# Narrower frames are invisible; dropping them (and so their callees) also
# bounds the output for profiles with many tiny stacks.
MIN_FRAME_PX = 0.1
MIN_WIDTH = 2 * SIDE_PAD + 10

# Characters XML 1.0 forbids, even escaped; names come from files we did not write.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def parse_folded(text: str) -> dict[tuple[str, ...], int]:
    """Stacks and their sample counts from folded-stack text.

    The count is after the last space, so frames may contain spaces; counts
    may be written as floats ("12.0", rounded to the nearest integer). Blank
    lines, lines without a count or with a negative, non-finite or zero one,
    and lines with no frame are skipped; the same stack twice is summed.
    Empty frames ("a;;b") are dropped."""
    stacks: dict[tuple[str, ...], int] = {}
    for line in text.splitlines():
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            continue
        stack_text, count_text = parts
        count = _parse_count(count_text)
        if count is None:
            continue
        frames = tuple(frame for frame in stack_text.strip().split(";") if frame)
        if not frames:
            continue
        stacks[frames] = stacks.get(frames, 0) + count
    return stacks


def _parse_count(text: str) -> int | None:
    try:
        count = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return None
        if not math.isfinite(value):
            return None
        count = round(value)
    return count if count > 0 else None


def render_svg(stacks: Mapping[tuple[str, ...], int], title: str, width: int = 1200, subtitle: str = "") -> str:
    """A standalone SVG 1.1 flame graph of `stacks` (as parse_folded gives them)."""
    if width < MIN_WIDTH:
        raise ValueError(f"a flame graph needs a width of at least {MIN_WIDTH} px, not {width}")
    header_height = _header_height(subtitle)
    total, scale, frames = _layout(stacks, width - 2 * SIDE_PAD)
    if total <= 0:
        return _render_empty(title, subtitle, width, header_height)

    max_depth = max(depth for _, depth, _, _ in frames)
    height = header_height + (max_depth + 1) * FRAME_HEIGHT + BOTTOM_PAD

    out = _open_document(title, subtitle, width, height)
    out.append('<g class="frames">\n')
    colours: dict[str, str] = {}
    for name, depth, x_samples, samples in frames:
        x = SIDE_PAD + x_samples * scale
        frame_width = samples * scale
        y = header_height + (max_depth - depth) * FRAME_HEIGHT
        colour = colours.get(name)
        if colour is None:
            colour = colours[name] = frame_colour(name)
        escaped = _xml_escape(name)
        out.append(
            f'<g><title>{escaped} ({samples} samples, {100 * samples / total:.2f}%)</title>'
            f'<rect x="{x:.2f}" y="{y}" width="{frame_width:.2f}" height="{FRAME_HEIGHT - 1}" '
            f'fill="{colour}" rx="2" ry="2"/>'
        )
        label = _fit_label(name, frame_width)
        if label:
            out.append(
                f'<text x="{x + LABEL_PAD:.2f}" y="{y + FRAME_HEIGHT - 4.5}">{_xml_escape(label)}</text>'
            )
        out.append("</g>\n")
    out.append("</g>\n</svg>\n")
    return "".join(out)


Frame = tuple[str, int, int, int]  # name, depth, x in samples, samples


def _layout(stacks: Mapping[tuple[str, ...], int], plot_width: int) -> tuple[int, float, list[Frame]]:
    """The total, pixels per sample, and (name, depth, x in samples, samples)
    for every frame at least MIN_FRAME_PX wide, "all" (depth 0) first.

    As one pass over the stacks in sorted order, like flamegraph.pl's merge:
    a frame opens where a stack first differs from the one before and closes
    where a later one does, so siblings come out by name and no tree of
    every frame is built (a profile of many small stacks has mostly frames
    too narrow to draw)."""
    ordered = sorted((stack for stack, count in stacks.items() if count > 0 and stack), key=_sort_key(stacks))
    total = sum(stacks[stack] for stack in ordered)
    if total <= 0:
        return 0, 0.0, []
    scale = plot_width / total
    min_samples = MIN_FRAME_PX / scale
    frames: list[Frame] = [(ROOT_NAME, 0, 0, total)]
    open_names: list[str] = []
    open_starts: list[int] = []
    x = 0

    def close_from(level: int) -> None:
        for depth in range(len(open_names) - 1, level - 1, -1):
            samples = x - open_starts[depth]
            if samples >= min_samples:
                frames.append((open_names[depth], depth + 1, open_starts[depth], samples))
        del open_names[level:], open_starts[level:]

    for stack in ordered:
        common = 0
        limit = min(len(open_names), len(stack))
        while common < limit and open_names[common] == stack[common]:
            common += 1
        close_from(common)
        for name in stack[common:]:
            open_names.append(name)
            open_starts.append(x)
        x += stacks[stack]
    close_from(0)
    # Frames closed children first; draw callers first, left to right.
    frames.sort(key=lambda frame: (frame[2], frame[1]))
    return total, scale, frames


def _sort_key(stacks: Mapping[tuple[str, ...], int]) -> Callable[[tuple[str, ...]], str]:
    """A string key in the order of the stacks as tuples of names: joined by a
    separator below every character, a string compare instead of a tuple
    compare (several times faster for many deep stacks). A NUL in a name is
    escaped to a pair above the separator's so the order still holds."""
    if any("\0" in "".join(stack) for stack in stacks):
        return lambda stack: "\0\1".join(name.replace("\0", "\0\2") for name in stack)
    return "\0".join


def _fit_label(name: str, frame_width: float) -> str:
    """The name, or its start and an ellipsis, in what fits the frame; "" if too narrow."""
    fits = int((frame_width - 2 * LABEL_PAD) / CHAR_WIDTH)
    if fits < MIN_LABEL_CHARS:
        return ""
    if len(name) <= fits:
        return name
    return name[: fits - len(ELLIPSIS)] + ELLIPSIS


def frame_colour(name: str) -> str:
    """A fill for a frame, the same for the same name on every run (a digest,
    not Python's per-process hash): warm red to yellow for code, greys for
    idle, blue-greys for the host, blues for other bracketed pseudo-frames."""
    digest = hashlib.md5(name.encode("utf-8", "surrogatepass")).digest()
    a, b, c = digest[0] / 255, digest[1] / 255, digest[2] / 255
    if name.startswith("[") and name.endswith("]"):
        if name == "[idle]":
            hue, lightness, saturation = 0.0, 0.76 + 0.06 * a, 0.0
        elif name == "[host]":
            hue, lightness, saturation = 0.58 + 0.03 * a, 0.66 + 0.06 * b, 0.12 + 0.08 * c
        else:
            hue, lightness, saturation = 0.54 + 0.08 * a, 0.62 + 0.10 * b, 0.45 + 0.20 * c
    else:
        hue, lightness, saturation = 0.14 * a, 0.55 + 0.10 * b, 0.75 + 0.20 * c
    red, green, blue = colorsys.hls_to_rgb(hue, lightness, saturation)
    return f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


def _header_height(subtitle: str) -> int:
    return 30 + (SUBTITLE_SIZE + 6 if subtitle else 0) + 8


def _open_document(title: str, subtitle: str, width: int, height: int) -> list[str]:
    out = [
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n',
        f'<svg version="1.1" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">\n',
        "<style>\n"
        "text { font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; "
        f"font-size: {FONT_SIZE}px; fill: #000; }}\n"
        f".title {{ font-size: {TITLE_SIZE}px; text-anchor: middle; }}\n"
        f".subtitle {{ font-size: {SUBTITLE_SIZE}px; text-anchor: middle; fill: #555; }}\n"
        ".frames g:hover rect { stroke: #000; stroke-width: 0.5; }\n"
        "</style>\n",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#f8f8f4"/>\n',
        f'<text class="title" x="{width / 2:.1f}" y="24">{_xml_escape(title)}</text>\n',
    ]
    if subtitle:
        out.append(f'<text class="subtitle" x="{width / 2:.1f}" y="{24 + SUBTITLE_SIZE + 6}">'
                   f"{_xml_escape(subtitle)}</text>\n")
    return out


def _render_empty(title: str, subtitle: str, width: int, header_height: int) -> str:
    height = header_height + 2 * FRAME_HEIGHT + BOTTOM_PAD
    out = _open_document(title, subtitle, width, height)
    out.append(f'<text class="title" x="{width / 2:.1f}" y="{header_height + FRAME_HEIGHT}">no samples</text>\n')
    out.append("</svg>\n")
    return "".join(out)


def _xml_escape(text: str) -> str:
    """Text safe in XML content and in double- or single-quoted attributes."""
    text = _XML_INVALID.sub("\ufffd", text)
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        .replace('"', "&quot;").replace("'", "&#39;")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pvhvm.flamegraph",
        description="Render folded stacks (pvhvm boot --profile) as a flame graph SVG on standard output.",
    )
    parser.add_argument("folded", help="the folded-stacks file, or - for standard input")
    parser.add_argument("--title", default="Flame graph")
    parser.add_argument("--subtitle", default=None, help="default: the file's name and its sample count")
    parser.add_argument("--width", type=int, default=1200, help="in pixels (default 1200)")
    args = parser.parse_args(argv)
    if args.width < MIN_WIDTH:
        parser.error(f"--width must be at least {MIN_WIDTH}")

    if args.folded == "-":
        text = sys.stdin.buffer.read().decode("utf-8", "replace")
        source = "standard input"
    else:
        try:
            text = Path(args.folded).read_bytes().decode("utf-8", "replace")
        except OSError as exc:
            print(f"flamegraph: cannot read {args.folded}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        source = Path(args.folded).name
    stacks = parse_folded(text)
    subtitle = args.subtitle
    if subtitle is None:
        subtitle = f"{source}: {sum(stacks.values())} samples in {len(stacks)} stacks"
    svg = render_svg(stacks, args.title, width=args.width, subtitle=subtitle)
    sys.stdout.buffer.write(svg.encode("utf-8"))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
