"""A guest that floods its consoles does not grow the host: the hypervisor
console (`xl dmesg`) and hvc0 keep their newest output, as Xen's console
ring does, and stream the rest to the console sink."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pvhvm
from pvhvm import OutcomeKind, ShutdownReason
from pvhvm.api import CONSOLE_KEEP, HYPERVISOR_CONSOLE_KEEP
from pvhvm.devices import ConsoleHistory

LINE = 64  # flood.c's line length

# Run in a process of its own, so that its peak RSS is the flood's alone.
FLOOD_RUN = r"""
import json, resource, sys
import pvhvm
streamed = [0]
def sink(data):
    streamed[0] += len(data)
dom = pvhvm.Domain(sys.argv[1], cmdline=sys.argv[2], memory_mib=32, console=sink)
outcome = dom.run(timeout=240)
print(json.dumps({
    "outcome": [outcome.kind.name, outcome.reason.name if outcome.reason is not None else None],
    "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "streamed": streamed[0],
    "console_len": len(dom.console_output),
    "dmesg_len": len(dom.hypervisor_console),
    "dmesg_head": dom.hypervisor_console[:200].decode(errors="replace"),
    "dmesg_tail": dom.hypervisor_console[-200:].decode(errors="replace"),
}))
"""


def flood(guest, cmdline: str) -> dict:
    p = subprocess.run([sys.executable, "-c", FLOOD_RUN, str(guest), cmdline], capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    result = json.loads(p.stdout)
    assert result["outcome"] == ["SHUTDOWN", "POWEROFF"], result
    return result


def test_hypervisor_console_flood_keeps_rss_bounded_and_dmesg_newest(guests):
    baseline = flood(guests["flood"], "hv_mib=1")
    mib = 200
    # Writes of 1 MiB: the hypervisor continues each one after 64 KiB.
    big = flood(guests["flood"], f"hv_mib={mib} piece=1048576")
    total = mib << 20
    marker = f"FLOOD hv done after {total} bytes\n"
    # All of it reached the sink (the terminal), none of it stayed.
    assert big["streamed"] == total + len(marker)
    grown_mib = (big["maxrss_kib"] - baseline["maxrss_kib"]) / 1024
    assert grown_mib < 32, f"RSS grew {grown_mib:.0f} MiB for {mib} MiB of console output"
    assert HYPERVISOR_CONSOLE_KEEP <= big["dmesg_len"] <= 2 * HYPERVISOR_CONSOLE_KEEP
    assert CONSOLE_KEEP <= big["console_len"] <= 2 * CONSOLE_KEEP
    # dmesg shows the newest output: the last line before the marker is the last one written.
    last_line = total // LINE - 1
    assert big["dmesg_tail"].endswith(f"hv {last_line:08d}".ljust(LINE - 1, ".") + "\n" + marker), big["dmesg_tail"]
    # and it begins at a line cut by the drop, followed by the lines after it, in order.
    numbers = [int(n) for n in re.findall(r"^hv (\d+)\.", big["dmesg_head"], re.M)]
    assert numbers and numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    assert numbers[0] >= last_line - big["dmesg_len"] // LINE


def test_small_console_io_writes_are_streamed_too(guests):
    # 64-byte lines one call each: many exits, each output kept only briefly.
    r = flood(guests["flood"], "hv_mib=8 piece=64")
    assert r["streamed"] == (8 << 20) + len(f"FLOOD hv done after {8 << 20} bytes\n")
    assert r["dmesg_len"] <= 2 * HYPERVISOR_CONSOLE_KEEP


def test_hvc0_flood_keeps_rss_bounded(guests):
    baseline = flood(guests["flood"], "hvc_mib=1")
    big = flood(guests["flood"], "hvc_mib=32")
    assert big["streamed"] == len("FLOOD hv done after 0 bytes\n") + (32 << 20) + len("FLOOD hvc done\n")
    grown_mib = (big["maxrss_kib"] - baseline["maxrss_kib"]) / 1024
    assert grown_mib < 20, f"RSS grew {grown_mib:.0f} MiB for 32 MiB of hvc0 output"
    assert CONSOLE_KEEP <= big["console_len"] <= 2 * CONSOLE_KEEP


def test_expect_follows_a_console_that_dropped_old_output(guests, monkeypatch):
    # A small history, so that 1 MiB of hvc0 output drops most of itself.
    keep = 64 << 10
    monkeypatch.setattr(pvhvm.api, "CONSOLE_KEEP", keep)
    dom = pvhvm.Domain(guests["flood"], cmdline="hvc_mib=1", memory_mib=32)
    try:
        assert dom.expect(rb"hvc 00000010\.+\n", timeout=60).group() == b"hvc 00000010".ljust(LINE - 1, b".") + b"\n"
        m = dom.expect(rb"hvc (\d+)\.+\nFLOOD hvc done\n", timeout=120)
        assert int(m.group(1)) == (1 << 20) // LINE - 1
        assert keep <= len(dom.console_output) <= 2 * keep
        assert b"hvc 00000010." not in dom.console_output, "the early lines are gone"
        assert dom.console_output.endswith(m.group())
        outcome = dom.run(timeout=60)
        assert outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.POWEROFF
    finally:
        dom.close()


def test_console_history_counts_positions_from_the_first_byte():
    h = ConsoleHistory(keep=10)
    for i in range(5):
        h.append(b"%02d.." % i)  # 4 bytes each
    assert (h.base, h.end, bytes(h)) == (0, 20, b"00..01..02..03..04..")
    h.append(b"05..")  # 24 bytes: more than twice 10, the newest 10 stay
    assert (h.base, h.end, bytes(h)) == (14, 24, b"..04..05..")
    before = h.data
    h.append(b"x" * 30)  # one piece larger than the history
    assert (h.base, h.end, bytes(h)) == (44, 54, b"x" * 10)
    assert before[:10] == b"..04..05..", "a buffer given out keeps its text (a match's string)"
