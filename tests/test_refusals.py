"""docs/hypercalls.md against the core: the refusals guest issues every
hypercall and sub-op with harmless arguments, and each row of the table must
match what the guest got (its errno for refused, n/a and missing rows; not
-ENOSYS for implemented ones)."""

from __future__ import annotations

import errno as errnos
import re
from pathlib import Path

import pytest

import pvhvm
from pvhvm import OutcomeKind, ShutdownReason

DOC = Path(__file__).resolve().parent.parent / "docs" / "hypercalls.md"
COLUMNS = ["hypercall", "sub", "name", "status", "errno", "why"]
STATUSES = {"implemented", "refused", "n/a", "missing"}


def parse_table(text: str) -> list[dict[str, str]]:
    """Every row of every `| hypercall | sub | ... |` table in the doc."""
    rows = []
    header = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "hypercall":
            assert cells == COLUMNS, f"unexpected columns: {cells}"
            header = cells
            continue
        if header is None or set(cells[0]) <= {"-"}:
            continue
        rows.append(dict(zip(header, cells)))
    return rows


def errno_value(name: str) -> int:
    m = re.fullmatch(r"-(E[A-Z0-9]+)", name)
    assert m, f"not an errno: {name!r}"
    return -getattr(errnos, m.group(1))


@pytest.fixture(scope="module")
def table() -> list[dict[str, str]]:
    return parse_table(DOC.read_text())


@pytest.fixture(scope="module")
def seen(guests) -> tuple[dict[tuple[int, str], int], set[tuple[int, str]], str]:
    dom = pvhvm.Domain(guests["refusals"], memory_mib=32)
    outcome = dom.run(timeout=120)
    out = dom.console_output.decode()
    assert outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.POWEROFF, out[-2000:]
    assert re.search(r"^VERDICT: PASS \(\d+ checks\)$", out, re.M), out[-2000:]
    results = {}
    for nr, sub, ret in re.findall(r"^R (\d+) (\S+) (-?\d+)$", out, re.M):
        results[(int(nr), sub)] = int(ret)
    skipped = {(int(nr), sub) for nr, sub in re.findall(r"^S (\d+) (\S+)$", out, re.M)}
    return results, skipped, out


def test_table_is_well_formed(table):
    assert len(table) > 250
    keys = [(r["hypercall"], r["sub"]) for r in table]
    assert len(keys) == len(set(keys)), "a row appears twice"
    for r in table:
        assert r["status"] in STATUSES, r
        if r["status"] == "implemented":
            assert r["errno"] == "-", r
        else:
            errno_value(r["errno"])


def test_every_row_matches_the_core(table, seen):
    results, skipped, out = seen
    wrong = []
    for r in table:
        key = (int(r["hypercall"]), r["sub"])
        label = f"{r['hypercall']}/{r['sub']} {r['name']} ({r['status']} {r['errno']})"
        if key in skipped:
            assert r["status"] == "implemented", f"only implemented calls may be skipped: {label}"
            continue
        assert key in results, f"the guest did not issue {label}"
        got = results[key]
        if r["status"] == "implemented":
            if got == -errnos.ENOSYS:
                wrong.append(f"{label}: got -ENOSYS")
        elif got != errno_value(r["errno"]):
            name = errnos.errorcode.get(-got, str(got)) if got < 0 else str(got)
            wrong.append(f"{label}: got {name}")
    assert wrong == [], "docs/hypercalls.md and the core disagree:\n" + "\n".join(wrong)


def test_refused_rows_are_not_enosys(table):
    # The point of the exercise: what Xen refuses is refused, not "no such call".
    for r in table:
        if r["status"] == "refused":
            assert r["errno"] != "-ENOSYS", r


def test_unlisted_numbers_are_enosys(seen):
    results, _, _ = seen
    for nr in (11, 43, 44, 45, 46, 47, 50, 55, 63):
        assert results[(nr, "-")] == -errnos.ENOSYS, nr
