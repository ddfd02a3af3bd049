"""The ACPI tables a PVH domU is given, in the spirit of Xen's libxl/libacpi:
RSDP -> XSDT -> {FADT -> DSDT, MADT}, all written contiguously into guest
memory. A PVH guest finds the RSDP through hvm_start_info.rsdp_paddr, so no
legacy BIOS-area scan is needed.

The platform is "hardware reduced" (ACPI 5.0+): no PM1/GPE/PM-timer blocks,
no SCI, no FACS. The layouts below follow the ACPI 6.3 specification
(FADT revision 6 minor 3, MADT revision 5: the revision where the Local APIC
"Online Capable" flag is defined; Linux only honours that bit when the MADT
revision is >= 5)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .. import _core
from ..errors import BuildError
from .vmgenid import COMPATIBLE_ID, DEVICE_NAME, DISPLAY_NAME, HARDWARE_ID

# --- layouts (little endian, packed) ---------------------------------------

# RSDP (ACPI 6.3 §5.2.5.3): Signature[8], Checksum, OEMID[6], Revision,
# RsdtAddress(u32), Length(u32), XsdtAddress(u64), ExtendedChecksum, Reserved[3].
RSDP = struct.Struct("<8sB6sBIIQB3s")
RSDP_V1_LEN = 20  # the ACPI 1.0 part covered by Checksum
RSDP_REVISION = 2  # ACPI 2.0+: Length/XsdtAddress/ExtendedChecksum are valid

# System description table header (§5.2.6): Signature[4], Length(u32),
# Revision, Checksum, OEMID[6], OEM Table ID[8], OEM Revision(u32),
# Creator ID[4], Creator Revision(u32).
SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")
CHECKSUM_OFFSET = 9  # within SDT_HEADER

# FADT body after the header (§5.2.9, Table 5.33). Offsets in the comments
# are from the start of the table.
GAS = struct.Struct("<BBBBQ")  # Generic Address Structure (§5.2.3.2), 12 bytes
FADT_BODY = struct.Struct(
    "<"
    "I"  # 36  FIRMWARE_CTRL (FACS, 32-bit)
    "I"  # 40  DSDT (32-bit)
    "B"  # 44  reserved (INT_MODEL in ACPI 1.0)
    "B"  # 45  Preferred_PM_Profile
    "H"  # 46  SCI_INT
    "I"  # 48  SMI_CMD
    "B"  # 52  ACPI_ENABLE
    "B"  # 53  ACPI_DISABLE
    "B"  # 54  S4BIOS_REQ
    "B"  # 55  PSTATE_CNT
    "I"  # 56  PM1a_EVT_BLK
    "I"  # 60  PM1b_EVT_BLK
    "I"  # 64  PM1a_CNT_BLK
    "I"  # 68  PM1b_CNT_BLK
    "I"  # 72  PM2_CNT_BLK
    "I"  # 76  PM_TMR_BLK
    "I"  # 80  GPE0_BLK
    "I"  # 84  GPE1_BLK
    "B"  # 88  PM1_EVT_LEN
    "B"  # 89  PM1_CNT_LEN
    "B"  # 90  PM2_CNT_LEN
    "B"  # 91  PM_TMR_LEN
    "B"  # 92  GPE0_BLK_LEN
    "B"  # 93  GPE1_BLK_LEN
    "B"  # 94  GPE1_BASE
    "B"  # 95  CST_CNT
    "H"  # 96  P_LVL2_LAT
    "H"  # 98  P_LVL3_LAT
    "H"  # 100 FLUSH_SIZE
    "H"  # 102 FLUSH_STRIDE
    "B"  # 104 DUTY_OFFSET
    "B"  # 105 DUTY_WIDTH
    "B"  # 106 DAY_ALRM
    "B"  # 107 MON_ALRM
    "B"  # 108 CENTURY
    "H"  # 109 IAPC_BOOT_ARCH
    "B"  # 111 reserved
    "I"  # 112 Flags
    "12s"  # 116 RESET_REG (GAS)
    "B"  # 128 RESET_VALUE
    "H"  # 129 ARM_BOOT_ARCH
    "B"  # 131 FADT Minor Version
    "Q"  # 132 X_FIRMWARE_CTRL
    "Q"  # 140 X_DSDT
    "12s"  # 148 X_PM1a_EVT_BLK
    "12s"  # 160 X_PM1b_EVT_BLK
    "12s"  # 172 X_PM1a_CNT_BLK
    "12s"  # 184 X_PM1b_CNT_BLK
    "12s"  # 196 X_PM2_CNT_BLK
    "12s"  # 208 X_PM_TMR_BLK
    "12s"  # 220 X_GPE0_BLK
    "12s"  # 232 X_GPE1_BLK
    "12s"  # 244 SLEEP_CONTROL_REG
    "12s"  # 256 SLEEP_STATUS_REG
    "Q"  # 268 Hypervisor Vendor Identity
)  # 276 total
FADT_REVISION = 6
FADT_MINOR_REVISION = 3  # ACPI 6.3
FADT_LEN = SDT_HEADER.size + FADT_BODY.size

# FADT Flags (Table 5.35).
FADT_WBINVD = 1 << 0
FADT_PWR_BUTTON = 1 << 4  # 1: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # 1: no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10  # RESET_REG is valid
FADT_HW_REDUCED_ACPI = 1 << 20

# IA-PC boot architecture flags (Table 5.36).
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5

# MADT (§5.2.12): header, Local Interrupt Controller Address(u32), Flags(u32),
# then interrupt controller structures.
MADT_BODY = struct.Struct("<II")
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1 << 0
LAPIC_DEFAULT_ADDR = 0xFEE00000
# Processor Local APIC structure (§5.2.12.2): Type=0, Length=8, ACPI
# Processor UID(u8), APIC ID(u8), Flags(u32).
MADT_LAPIC = struct.Struct("<BBBBI")
MADT_TYPE_LAPIC = 0
LAPIC_ENABLED = 1 << 0
LAPIC_ONLINE_CAPABLE = 1 << 1
# xAPIC IDs are 8 bits and 0xFF is the broadcast ID; vCPU n has APIC ID 2n
# (Xen's convention, which the core's LAPIC and CPUID follow), so 128 fit.
# More would need Processor Local x2APIC structures.
MAX_VCPUS = 128

XSDT_REVISION = 1
DSDT_REVISION = 2  # AML integers are 64-bit

CREATOR_ID = b"PVHV"
CREATOR_REVISION = 1
OEM_REVISION = 1

TABLE_ALIGN = 16

assert RSDP.size == 36 and SDT_HEADER.size == 36 and GAS.size == 12
assert FADT_LEN == 276 and MADT_LAPIC.size == 8


@dataclass
class AcpiTables:
    """The tables, ready to be written at ``base`` in guest memory.

    ``blob`` starts with the RSDP at ``base`` (so ``rsdp_paddr == base``);
    ``tables`` maps each system description table's signature ("XSDT",
    "FACP", "DSDT", "APIC") to its guest-physical address."""

    rsdp_paddr: int
    blob: bytes
    tables: dict[str, int] = field(default_factory=dict)


def _checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with a zero checksum field) sum to 0."""
    return -sum(data) & 0xFF


def _fixed(value: bytes, size: int, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) > size:
        raise BuildError(f"ACPI {what} must be at most {size} bytes, got {value!r}")
    return bytes(value).ljust(size, b" ")


def _sdt(signature: bytes, revision: int, body: bytes, oem_id: bytes, oem_table_id: bytes) -> bytes:
    """A complete system description table: header + body, checksummed."""
    length = SDT_HEADER.size + len(body)
    table = bytearray(
        SDT_HEADER.pack(
            signature, length, revision, 0, oem_id, oem_table_id, OEM_REVISION, CREATOR_ID, CREATOR_REVISION
        )
        + body
    )
    table[CHECKSUM_OFFSET] = _checksum(table)
    return bytes(table)


# AML opcodes and prefixes (ACPI 6.3 §20.2), the few the DSDT uses.
AML_NAME_OP = 0x08
AML_DWORD_PREFIX = 0x0C
AML_STRING_PREFIX = 0x0D
AML_SCOPE_OP = 0x10
AML_PACKAGE_OP = 0x12
AML_EXT_OP_PREFIX = 0x5B
AML_DEVICE_OP = 0x82  # after AML_EXT_OP_PREFIX
AML_ROOT_CHAR = 0x5C  # "\\"


def _pkg_length(body_len: int) -> bytes:
    """PkgLength (§20.2.4) of a package whose contents after it are
    `body_len` bytes: it counts its own 1 to 4 bytes. One byte holds up to
    63; longer, the lead byte's bits 7-6 say how many bytes follow, its
    bits 3-0 are the low nibble and each following byte 8 more bits."""
    if body_len + 1 <= 0x3F:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([extra << 6 | total & 0x0F]) + (total >> 4).to_bytes(extra, "little")
    raise BuildError(f"AML package of {body_len} bytes is too long")


def _aml_string(text: bytes) -> bytes:
    """StringPrefix, ASCII characters, NullChar."""
    return bytes([AML_STRING_PREFIX]) + text + b"\0"


def _aml_name(seg: bytes, value: bytes) -> bytes:
    """Name (seg, value): NameOp NameSeg DataRefObject."""
    assert len(seg) == 4
    return bytes([AML_NAME_OP]) + seg + value


def _vmgenid_device_aml(gen_id_paddr: int) -> bytes:
    """``Device (VGEN)`` as the VM Generation ID spec and Linux's vmgenid
    driver want it: _HID, _CID and _DDN, and ``ADDR``, a package of two
    integers, the low and high 32 bits of the ID's guest-physical address.
    A Name will do for ADDR (the driver evaluates it, and evaluating a Name
    yields its value); Hyper-V and QEMU make it a Method because their
    firmware only learns the address at boot. The integers are DWordConsts
    whatever their value, so the table's size does not depend on it."""
    addr = bytes([AML_PACKAGE_OP]) + _pkg_length(1 + 5 + 5) + bytes([2])  # NumElements
    for half in (gen_id_paddr & 0xFFFFFFFF, gen_id_paddr >> 32):
        addr += bytes([AML_DWORD_PREFIX]) + half.to_bytes(4, "little")
    body = (
        DEVICE_NAME
        + _aml_name(b"_HID", _aml_string(HARDWARE_ID))
        + _aml_name(b"_CID", _aml_string(COMPATIBLE_ID))
        + _aml_name(b"_DDN", _aml_string(DISPLAY_NAME))
        + _aml_name(b"ADDR", addr)
    )
    return bytes([AML_EXT_OP_PREFIX, AML_DEVICE_OP]) + _pkg_length(len(body)) + body


def _dsdt_aml(gen_id_paddr: int | None = None) -> bytes:
    """A minimal AML body: ``Scope (\\_SB) {}`` and ``Name (_S5, Package
    () {5, 5})``. The guest gets its CPUs from the MADT and its devices from
    Xen PV interfaces; the one ACPI device under \\_SB is the VM Generation
    ID (when `gen_id_paddr` is given). \\_S5 lets it power off through the
    FADT's sleep control register (see `_fadt_body`)."""
    name = bytes([AML_ROOT_CHAR]) + b"_SB_"
    contents = _vmgenid_device_aml(gen_id_paddr) if gen_id_paddr is not None else b""
    scope = bytes([AML_SCOPE_OP]) + _pkg_length(len(name) + len(contents)) + name + contents
    typ = _core.ACPI_SLP_TYP_S5
    # NameOp "_S5_" PackageOp PkgLength(6) NumElements(2) BytePrefix typ BytePrefix typ
    s5 = b"\x08_S5_" + bytes([0x12, 6, 2, 0x0A, typ, 0x0A, typ])
    return scope + s5


def _io_gas(port: int) -> bytes:
    """A one-byte register in system I/O space (GAS address space 1)."""
    return GAS.pack(1, 8, 0, 1, port)


def _fadt_body(dsdt_paddr: int) -> bytes:
    zero_gas = bytes(GAS.size)
    return FADT_BODY.pack(
        0,  # FIRMWARE_CTRL: no FACS on a hardware-reduced platform
        dsdt_paddr,  # DSDT
        0,  # reserved
        0,  # Preferred_PM_Profile: unspecified
        0,  # SCI_INT: no SCI on a hardware-reduced platform
        0, 0, 0, 0, 0,  # SMI_CMD, ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
        0, 0, 0, 0, 0, 0, 0, 0,  # PM1a/b EVT, PM1a/b CNT, PM2 CNT, PM_TMR, GPE0, GPE1 blocks
        0, 0, 0, 0, 0, 0, 0, 0,  # their lengths, GPE1_BASE, CST_CNT
        0, 0, 0, 0,  # P_LVL2_LAT, P_LVL3_LAT, FLUSH_SIZE, FLUSH_STRIDE
        0, 0, 0, 0, 0,  # DUTY_OFFSET, DUTY_WIDTH, DAY_ALRM, MON_ALRM, CENTURY
        # No VGA, no CMOS RTC; MSI stays allowed (bit 3 clear); no legacy
        # devices or 8042 (bits 0/1 clear).
        IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT,
        0,  # reserved
        FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI,
        _io_gas(_core.RESET_CONTROL_PORT),  # RESET_REG: the PC reset control register
        _core.RESET_VALUE,  # RESET_VALUE: reset the CPU (a reboot)
        0,  # ARM_BOOT_ARCH
        FADT_MINOR_REVISION,
        0,  # X_FIRMWARE_CTRL
        dsdt_paddr,  # X_DSDT (same as DSDT, so ACPICA sees no 32/64 mismatch)
        *([zero_gas] * 8),  # X_PM1a_EVT .. X_GPE1_BLK: none
        # Hardware-reduced sleep registers: S5 written here is a power-off.
        _io_gas(_core.ACPI_SLEEP_CONTROL_PORT),
        _io_gas(_core.ACPI_SLEEP_STATUS_PORT),
        0,  # Hypervisor Vendor Identity
    )


def apic_id_of(vcpu: int) -> int:
    """The APIC ID of vCPU ``vcpu``, as Xen numbers them (twice the vCPU id)."""
    return 2 * vcpu


def _madt_body(nr_vcpus: int, online_vcpus: int) -> bytes:
    # Flags 0: PCAT_COMPAT off, there is no dual 8259 PIC. No I/O APIC
    # structure either: a PVH guest has no emulated I/O APIC (its interrupts
    # arrive as Xen event channels), so only the local APICs are described.
    out = bytearray(MADT_BODY.pack(LAPIC_DEFAULT_ADDR, 0))
    for vcpu in range(nr_vcpus):
        flags = LAPIC_ENABLED if vcpu < online_vcpus else LAPIC_ONLINE_CAPABLE
        # Processor UID = vCPU id (Linux's Xen code takes its vCPU id from
        # it); APIC ID as the vCPU's LAPIC and CPUID report it.
        out += MADT_LAPIC.pack(MADT_TYPE_LAPIC, MADT_LAPIC.size, vcpu, apic_id_of(vcpu), flags)
    return bytes(out)


def _align(x: int, a: int = TABLE_ALIGN) -> int:
    return (x + a - 1) & ~(a - 1)


def build_acpi_tables(
    base: int,
    nr_vcpus: int,
    online_vcpus: int | None = None,
    oem_id: bytes = b"PVHVM ",
    oem_table_id: bytes = b"PVHVMACP",
    gen_id_paddr: int | None = None,
) -> AcpiTables:
    """Lay out RSDP, XSDT, FADT, DSDT and MADT contiguously from ``base``
    (guest-physical, 16-byte aligned, the whole blob below 4 GiB).

    vCPUs ``0 .. online_vcpus-1`` (default: all) are marked enabled in the
    MADT; the rest are marked online capable, i.e. hot-pluggable. With
    `gen_id_paddr`, the DSDT has the VM Generation ID device, its ID at
    that guest-physical address (8-byte aligned, as the spec asks)."""
    if base < 0 or base % TABLE_ALIGN:
        raise BuildError(f"ACPI tables base {base:#x} is not {TABLE_ALIGN}-byte aligned")
    if not 1 <= nr_vcpus <= MAX_VCPUS:
        raise BuildError(f"ACPI MADT supports 1..{MAX_VCPUS} vCPUs, not {nr_vcpus}")
    if online_vcpus is None:
        online_vcpus = nr_vcpus
    if not 1 <= online_vcpus <= nr_vcpus:
        raise BuildError(f"online vCPUs must be 1..{nr_vcpus}, not {online_vcpus}")
    if gen_id_paddr is not None and (not 0 < gen_id_paddr < 1 << 64 or gen_id_paddr % 8):
        raise BuildError(f"VM generation ID address {gen_id_paddr:#x} is not a nonzero, 8-byte aligned address")
    oem_id = _fixed(oem_id, 6, "OEM ID")
    oem_table_id = _fixed(oem_table_id, 8, "OEM table ID")

    # Sizes are known up front, so addresses can be assigned in one pass.
    dsdt_body = _dsdt_aml(gen_id_paddr)
    madt_body = _madt_body(nr_vcpus, online_vcpus)
    sizes = {
        "RSDP": RSDP.size,
        "XSDT": SDT_HEADER.size + 8 * 2,  # entries: FACP, APIC
        "FACP": FADT_LEN,
        "DSDT": SDT_HEADER.size + len(dsdt_body),
        "APIC": SDT_HEADER.size + len(madt_body),
    }
    addrs: dict[str, int] = {}
    cursor = base
    for name, size in sizes.items():
        addrs[name] = cursor
        cursor = _align(cursor + size)
    end = addrs["APIC"] + sizes["APIC"]
    if end > 1 << 32:
        raise BuildError(f"ACPI tables at {base:#x} would end above 4 GiB ({end:#x})")

    tables = {
        "XSDT": _sdt(b"XSDT", XSDT_REVISION, struct.pack("<QQ", addrs["FACP"], addrs["APIC"]), oem_id, oem_table_id),
        "FACP": _sdt(b"FACP", FADT_REVISION, _fadt_body(addrs["DSDT"]), oem_id, oem_table_id),
        "DSDT": _sdt(b"DSDT", DSDT_REVISION, dsdt_body, oem_id, oem_table_id),
        "APIC": _sdt(b"APIC", MADT_REVISION, madt_body, oem_id, oem_table_id),
    }

    rsdp = bytearray(
        RSDP.pack(b"RSD PTR ", 0, oem_id, RSDP_REVISION, 0, RSDP.size, addrs["XSDT"], 0, bytes(3))
    )  # RsdtAddress 0: there is only an XSDT
    rsdp[8] = _checksum(rsdp[:RSDP_V1_LEN])
    rsdp[32] = _checksum(rsdp)

    blob = bytearray(end - base)
    blob[0 : RSDP.size] = rsdp
    for name, data in tables.items():
        assert len(data) == sizes[name]
        off = addrs[name] - base
        blob[off : off + len(data)] = data
    return AcpiTables(rsdp_paddr=addrs["RSDP"], blob=bytes(blob), tables={k: addrs[k] for k in tables})
