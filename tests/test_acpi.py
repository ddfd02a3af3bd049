"""The ACPI tables for a PVH domU, parsed back independently of the builder
(offsets from the ACPI 6.3 specification), plus iasl/acpiexec cross-checks
when acpica-tools is installed."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from pvhvm.builder.acpi import build_acpi_tables
from pvhvm.errors import BuildError

BASE = 0xFC000


class Blob:
    """Guest-physical view of the blob written at ``base``."""

    def __init__(self, base: int, data: bytes) -> None:
        self.base, self.data = base, data

    def at(self, paddr: int, size: int) -> bytes:
        off = paddr - self.base
        assert 0 <= off and off + size <= len(self.data), f"{paddr:#x}+{size} outside the blob"
        return self.data[off : off + size]

    def u(self, paddr: int, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.at(paddr, struct.calcsize(fmt)))[0]

    def table(self, paddr: int, signature: bytes) -> bytes:
        """A whole SDT at paddr, with its header checked."""
        assert paddr % 16 == 0, f"{signature!r} at {paddr:#x} is not 16-byte aligned"
        head = self.at(paddr, 36)
        assert head[0:4] == signature
        length = struct.unpack_from("<I", head, 4)[0]
        assert length >= 36
        data = self.at(paddr, length)
        assert sum(data) % 256 == 0, f"{signature!r} checksum"
        assert data[10:16] == b"PVHVM " and data[16:24] == b"PVHVMACP"
        assert data[28:32] == b"PVHV" and struct.unpack_from("<I", data, 32)[0] == 1
        return data


def parse(base: int, blob: bytes, rsdp_paddr: int) -> dict[str, object]:
    b = Blob(base, blob)
    rsdp = b.at(rsdp_paddr, 36)
    assert rsdp_paddr % 16 == 0
    assert rsdp[0:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0, "RSDP v1 checksum"
    assert sum(rsdp) % 256 == 0, "RSDP extended checksum"
    assert rsdp[15] == 2, "RSDP revision"
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36, "RSDP length"
    xsdt_paddr = struct.unpack_from("<Q", rsdp, 24)[0]

    xsdt = b.table(xsdt_paddr, b"XSDT")
    assert (len(xsdt) - 36) % 8 == 0
    entries = [struct.unpack_from("<Q", xsdt, off)[0] for off in range(36, len(xsdt), 8)]
    by_sig = {b.at(p, 4).decode(): p for p in entries}
    assert sorted(by_sig) == ["APIC", "FACP"] and len(entries) == 2

    fadt = b.table(by_sig["FACP"], b"FACP")
    assert len(fadt) == 276 and fadt[8] == 6  # revision 6 is 276 bytes
    dsdt32 = struct.unpack_from("<I", fadt, 40)[0]
    dsdt64 = struct.unpack_from("<Q", fadt, 140)[0]
    assert dsdt32 == dsdt64 != 0
    dsdt = b.table(dsdt64, b"DSDT")
    madt = b.table(by_sig["APIC"], b"APIC")
    return {
        "xsdt": (xsdt_paddr, xsdt), "fadt": (by_sig["FACP"], fadt),
        "dsdt": (dsdt64, dsdt), "madt": (by_sig["APIC"], madt),
    }


def lapics(madt: bytes) -> list[tuple[int, int, int]]:
    """(processor UID, APIC ID, flags) of every Processor Local APIC entry;
    fails on any other interrupt controller structure."""
    out, off = [], 44
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        assert kind == 0 and length == 8, f"unexpected MADT entry type {kind} length {length}"
        uid, apic_id, flags = struct.unpack_from("<BBI", madt, off + 2)
        out.append((uid, apic_id, flags))
        off += length
    assert off == len(madt)
    return out


@pytest.mark.parametrize("nr_vcpus", [1, 4, 32])
def test_tables_parse_back(nr_vcpus):
    t = build_acpi_tables(BASE, nr_vcpus)
    assert t.rsdp_paddr == BASE
    p = parse(BASE, t.blob, t.rsdp_paddr)
    assert t.tables == {"XSDT": p["xsdt"][0], "FACP": p["fadt"][0], "DSDT": p["dsdt"][0], "APIC": p["madt"][0]}

    _, fadt = p["fadt"]
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20), "HW_REDUCED_ACPI"
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & (1 << 2) and boot_arch & (1 << 5)  # no VGA, no CMOS RTC
    assert not boot_arch & ((1 << 0) | (1 << 1) | (1 << 3))  # no legacy devs/8042; MSI allowed
    assert fadt[131] == 3  # FADT minor version (ACPI 6.3)
    assert struct.unpack_from("<H", fadt, 46)[0] == 0  # SCI_INT
    assert struct.unpack_from("<I", fadt, 76)[0] == 0 and fadt[91] == 0  # PM_TMR_BLK / LEN
    assert fadt[208:220] == bytes(12)  # X_PM_TMR_BLK
    assert struct.unpack_from("<I", fadt, 36)[0] == 0 and struct.unpack_from("<Q", fadt, 132)[0] == 0  # no FACS

    _, dsdt = p["dsdt"]
    assert dsdt[8] == 2 and len(dsdt) >= 36

    _, madt = p["madt"]
    lapic_addr, madt_flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == 0xFEE00000 and madt_flags == 0  # PCAT_COMPAT off
    assert madt[8] >= 5  # online-capable bit is defined from MADT revision 5
    assert lapics(madt) == [(i, 2 * i, 1) for i in range(nr_vcpus)]

    assert len(t.blob) < 8192


def test_sizes_for_one_and_32_vcpus():
    one = build_acpi_tables(BASE, 1)
    many = build_acpi_tables(BASE, 32)
    assert len(many.blob) - len(one.blob) == 31 * 8
    assert len(many.blob) < 8 * 1024


def test_online_capable_vcpus():
    t = build_acpi_tables(BASE, 8, online_vcpus=3)
    _, madt = parse(BASE, t.blob, t.rsdp_paddr)["madt"]
    assert lapics(madt) == [(i, 2 * i, 1) for i in range(3)] + [(i, 2 * i, 2) for i in range(3, 8)]


def test_other_base_and_oem():
    base = 0x7FFF0000
    t = build_acpi_tables(base, 2, oem_id=b"PVHVM ", oem_table_id=b"PVHVMACP")
    assert t.rsdp_paddr == base
    parse(base, t.blob, t.rsdp_paddr)
    assert all(addr % 16 == 0 and base <= addr < base + len(t.blob) for addr in t.tables.values())
    short = build_acpi_tables(BASE, 1, oem_id=b"XEN", oem_table_id=b"T")
    assert short.blob[9:15] == b"XEN   "


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": BASE + 8, "nr_vcpus": 1},
        {"base": BASE, "nr_vcpus": 0},
        {"base": BASE, "nr_vcpus": 129},
        {"base": BASE, "nr_vcpus": 4, "online_vcpus": 0},
        {"base": BASE, "nr_vcpus": 4, "online_vcpus": 5},
        {"base": (1 << 32) - 0x100, "nr_vcpus": 1},
        {"base": BASE, "nr_vcpus": 1, "oem_id": b"TOOLONGID"},
    ],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(BuildError):
        build_acpi_tables(**kwargs)


def _write_tables(tmp_path, nr_vcpus: int) -> dict[str, object]:
    t = build_acpi_tables(BASE, nr_vcpus, online_vcpus=max(1, nr_vcpus // 2))
    files = {}
    for sig, paddr in t.tables.items():
        off = paddr - BASE
        length = struct.unpack_from("<I", t.blob, off + 4)[0]
        path = tmp_path / f"{sig.lower()}.dat"
        path.write_bytes(t.blob[off : off + length])
        files[sig] = path
    return files


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl not on PATH (apt-get install acpica-tools)")
@pytest.mark.parametrize("nr_vcpus", [1, 4, 32])
def test_iasl_disassembles(tmp_path, nr_vcpus):
    # iasl -d only takes tables with a standard SDT header, so the RSDP
    # ("RSD PTR ", no length at offset 4) is checked by parse() alone.
    files = _write_tables(tmp_path, nr_vcpus)
    for sig, path in files.items():
        r = subprocess.run(["iasl", "-d", path.name], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"iasl -d {sig}:\n{out}"
        low = out.lower()
        assert "error" not in low and "warning" not in low, f"iasl -d {sig}:\n{out}"
        dsl = (tmp_path / f"{sig.lower()}.dsl").read_text()
        if sig == "DSDT":
            assert 'DefinitionBlock ("", "DSDT", 2, "PVHVM ", "PVHVMACP", 0x00000001)' in dsl
        else:
            assert f'Signature : "{sig}"' in dsl
        if sig == "FACP":
            assert "Hardware Reduced (V5) : 1" in dsl
        if sig == "APIC":
            assert dsl.count("[Processor Local APIC]") == nr_vcpus


@pytest.mark.skipif(shutil.which("acpiexec") is None, reason="acpiexec not on PATH (apt-get install acpica-tools)")
def test_acpiexec_loads(tmp_path):
    # acpiexec runs ACPICA's table manager (the code Linux uses) over the
    # tables, FADT conversion and DSDT load included.
    files = _write_tables(tmp_path, 4)
    r = subprocess.run(
        ["acpiexec", "-b", "Methods", *(files[s].name for s in ("FACP", "DSDT", "APIC", "XSDT"))],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    low = out.lower()
    assert "error" not in low and "warning" not in low, out
    assert "1 ACPI AML tables successfully acquired and loaded" in out
