"""The VM Generation ID: the DSDT's device decoded back from its AML (and
evaluated by ACPICA's acpiexec when acpica-tools is installed), the reserved
page the builder gives the ID, and a guest that finds the ID as an OS does
and sees each new one the host writes."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest
from conftest import PVH_NOTE, make_elf64
from test_acpi import parse

import pvhvm
from pvhvm import OutcomeKind, ShutdownReason, _core
from pvhvm.builder.acpi import build_acpi_tables
from pvhvm.builder.domain import plan_domain
from pvhvm.builder.layout import E820_RESERVED
from pvhvm.errors import BuildError

BASE = 0xFC000
S5 = _core.ACPI_SLP_TYP_S5


# --- an AML decoder (ACPI 6.3 §20) for the terms the builder emits ----------


def pkg_length(data: bytes, pos: int) -> tuple[int, int]:
    """(value, bytes) of the PkgLength at pos; the value counts those bytes."""
    lead = data[pos]
    follow = lead >> 6
    if not follow:
        return lead & 0x3F, 1
    assert not lead & 0x30, f"PkgLength lead byte {lead:#x}: bits 5-4 must be 0"
    value = lead & 0x0F
    for i in range(follow):
        value |= data[pos + 1 + i] << (4 + 8 * i)
    return value, 1 + follow


def name_string(data: bytes, pos: int) -> tuple[str, int]:
    root = data[pos] == 0x5C
    pos += root
    seg = data[pos : pos + 4].decode("ascii")
    assert re.fullmatch(r"[A-Z_][A-Z0-9_]{3}", seg), seg
    return ("\\" if root else "") + seg, pos + 4


def data_object(data: bytes, pos: int) -> tuple[object, int]:
    op = data[pos]
    if op in (0x00, 0x01):
        return op, pos + 1
    sizes = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
    if op in sizes:
        n = sizes[op]
        return int.from_bytes(data[pos + 1 : pos + 1 + n], "little"), pos + 1 + n
    if op == 0x0D:
        end = data.index(0, pos + 1)
        return data[pos + 1 : end].decode("ascii"), end + 1
    if op == 0x12:
        length, n = pkg_length(data, pos + 1)
        end = pos + 1 + length
        count, pos = data[pos + 1 + n], pos + 2 + n
        elements = []
        while pos < end:
            value, pos = data_object(data, pos)
            elements.append(value)
        assert pos == end and len(elements) == count
        return elements, pos
    raise AssertionError(f"unexpected data object opcode {op:#x} at {pos}")


def term_list(data: bytes, pos: int, end: int) -> dict[str, object]:
    """{name: value} of Name terms, {name: ("Scope"|"Device", {...})} of the rest."""
    out: dict[str, object] = {}
    while pos < end:
        if data[pos] == 0x08:
            name, pos = name_string(data, pos + 1)
            out[name], pos = data_object(data, pos)
            continue
        if data[pos] == 0x10:
            kind, start = "Scope", pos + 1
        elif data[pos : pos + 2] == b"\x5b\x82":
            kind, start = "Device", pos + 2
        else:
            raise AssertionError(f"unexpected opcode {data[pos]:#x} at {pos}")
        length, _ = pkg_length(data, start)
        body_end = start + length
        assert body_end <= end
        name, body = name_string(data, start + pkg_length(data, start)[1])
        out[name] = (kind, term_list(data, body, body_end))
        pos = body_end
    assert pos == end
    return out


def dsdt_terms(base: int, blob: bytes, rsdp: int) -> dict[str, object]:
    _, dsdt = parse(base, blob, rsdp)["dsdt"]  # headers and checksums checked there
    return term_list(dsdt, 36, len(dsdt))


def device(gen_id_paddr: int) -> tuple[str, dict]:
    return ("Device", {"_HID": "PVHV0001", "_CID": "VM_Gen_Counter", "_DDN": "VM_Gen_Counter",
                       "ADDR": [gen_id_paddr & 0xFFFFFFFF, gen_id_paddr >> 32]})


# --- the tables -----------------------------------------------------------


def test_dsdt_without_the_device():
    t = build_acpi_tables(BASE, 1)
    assert dsdt_terms(BASE, t.blob, t.rsdp_paddr) == {"\\_SB_": ("Scope", {}), "_S5_": [S5, S5]}


@pytest.mark.parametrize("gen_id_paddr", [0x7FFE000, 0xFFFFFFF8, 0x1234_5678_9000])
def test_dsdt_has_the_device(gen_id_paddr):
    t = build_acpi_tables(BASE, 4, gen_id_paddr=gen_id_paddr)
    terms = dsdt_terms(BASE, t.blob, t.rsdp_paddr)
    assert terms == {"\\_SB_": ("Scope", {"VGEN": device(gen_id_paddr)}), "_S5_": [S5, S5]}
    # The integers are DWordConsts whatever the address: one table size.
    assert len(t.blob) == len(build_acpi_tables(BASE, 4, gen_id_paddr=8).blob)


# (contents after the PkgLength, its shortest encoding's size): 6, 12, 20
# and 28 bits hold the total, which counts the PkgLength's own bytes.
@pytest.mark.parametrize("body_len, size", [(0, 1), (62, 1), (63, 2), (4093, 2), (4094, 3), ((1 << 20) - 4, 3),
                                            ((1 << 20) - 3, 4), ((1 << 28) - 5, 4)])
def test_pkg_length_round_trips(body_len, size):
    from pvhvm.builder.acpi import _pkg_length

    encoded = _pkg_length(body_len)
    assert pkg_length(encoded, 0) == (body_len + size, size)


@pytest.mark.parametrize("gen_id_paddr", [0, 0x1004, 1 << 64])
def test_rejects_bad_addresses(gen_id_paddr):
    with pytest.raises(BuildError):
        build_acpi_tables(BASE, 1, gen_id_paddr=gen_id_paddr)


@pytest.mark.skipif(shutil.which("acpiexec") is None, reason="acpiexec not on PATH (apt-get install acpica-tools)")
def test_acpiexec_evaluates_the_device(tmp_path):
    # ACPICA is the interpreter Linux runs: what it returns is what the
    # vmgenid driver matches (_CID upper-cased) and reads (ADDR).
    gen_id_paddr = 0x1_2345_6000
    t = build_acpi_tables(BASE, 2, gen_id_paddr=gen_id_paddr)
    names = []
    for sig in ("FACP", "DSDT", "APIC", "XSDT"):
        off = t.tables[sig] - BASE
        length = struct.unpack_from("<I", t.blob, off + 4)[0]
        (tmp_path / f"{sig}.dat").write_bytes(t.blob[off : off + length])
        names.append(f"{sig}.dat")
    script = "; ".join(f"Evaluate \\_SB.VGEN.{n}" for n in ("_HID", "_CID", "ADDR"))
    r = subprocess.run(["acpiexec", "-b", script, *names], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "error" not in out.lower() and "warning" not in out.lower(), out
    assert "No outstanding allocations" in out, out
    assert '[String] Length 08 = "PVHV0001"' in out, out
    assert '[String] Length 0E = "VM_GEN_COUNTER"' in out, out
    assert re.search(r"\[Package\] Contains 2 Elements:\s+\[Integer\] = 0000000023456000\s+"
                     r"\[Integer\] = 0000000000000001", out), out


# --- the builder ------------------------------------------------------------


def kernel(tmp_path):
    path = tmp_path / "k.elf"
    path.write_bytes(make_elf64([(0x100000, b"\x90" * 16)], [(PVH_NOTE, struct.pack("<I", 0x100000))]))
    return path


def test_plan_gives_the_id_a_reserved_page(tmp_path):
    plan = plan_domain(kernel(tmp_path), memory_mib=64)
    gen_id_paddr = plan.placement.generation_id
    assert gen_id_paddr % 4096 == 0
    covering = [(a, n, kind) for a, n, kind in plan.memory_map if a <= gen_id_paddr < a + n]
    assert covering == [(gen_id_paddr, 4096, E820_RESERVED)]  # no RAM, no ACPI memory
    blobs = dict(plan.blobs)
    gen_id = blobs[gen_id_paddr]
    assert len(gen_id) == 16 and any(gen_id)
    terms = dsdt_terms(plan.placement.acpi, blobs[plan.placement.acpi], plan.placement.rsdp)
    assert terms["\\_SB_"] == ("Scope", {"VGEN": device(gen_id_paddr)})
    # Each domain built gets its own ID.
    assert dict(plan_domain(kernel(tmp_path), memory_mib=64).blobs)[gen_id_paddr] != gen_id


# --- a guest ------------------------------------------------------------------

ID_LINE = rb"VMGENID ([0-9a-f]{32})\n"


def test_guest_sees_each_new_id(guests):
    dom = pvhvm.Domain(guests["vmgenid"], memory_mib=64)
    first = bytes.fromhex(dom.expect(ID_LINE, timeout=60)[1].decode())
    assert first == dom.generation_id
    seen = [first]
    for _ in range(3):
        new = dom.renew_generation_id()
        assert dom.generation_id == new != seen[-1]
        assert bytes.fromhex(dom.expect(ID_LINE, timeout=60)[1].decode()) == new
        seen.append(new)
    assert len(set(seen)) == 4
    outcome = dom.run(timeout=60)
    out = dom.console_output.decode()
    assert [line for line in out.splitlines() if line.startswith("FAIL")] == [], out
    assert re.search(r"^VERDICT: PASS \(\d+ checks\)$", out, re.M), out
    assert outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.POWEROFF, out
    assert len(re.findall(ID_LINE.decode(), out)) == 4, out
    # Between looks it slept in the core (SCHEDOP_poll), it did not spin.
    assert dom.idle_waits > 0


def test_guest_fails_on_a_zero_id(guests):
    # The guest's checks bite: an all-zero ID (no ID at all) is a FAIL line
    # and a failed verdict, though the guest still follows the new IDs.
    dom = pvhvm.Domain(guests["vmgenid"], memory_mib=64)
    gen_id_paddr = dom.placement.generation_id
    dom.memory[gen_id_paddr : gen_id_paddr + 16] = bytes(16)
    assert dom.expect(ID_LINE, timeout=60)[1] == b"0" * 32
    for _ in range(3):
        new = dom.renew_generation_id()
        assert bytes.fromhex(dom.expect(ID_LINE, timeout=60)[1].decode()) == new
    outcome = dom.run(timeout=60)
    out = dom.console_output.decode()
    assert [line for line in out.splitlines() if line.startswith("FAIL")] == ["FAIL - the ID is not all zero"], out
    assert re.search(r"^VERDICT: FAIL \(1 of \d+ checks failed\)$", out, re.M), out
    assert outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.CRASH, out
