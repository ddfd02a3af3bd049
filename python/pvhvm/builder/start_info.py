"""hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h), version 1:
the one structure a PVH guest is handed in EBX, with its module list, memory
map and command lines."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..errors import BuildError
from .layout import PhysLayout

HVM_START_MAGIC = 0x336EC578
START_INFO_VERSION = 1
START_INFO = struct.Struct("<IIIIQQQQII")  # 56 bytes
MODLIST_ENTRY = struct.Struct("<QQQQ")  # paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")  # addr, size, type, reserved
assert START_INFO.size == 56 and MODLIST_ENTRY.size == 32 and MEMMAP_ENTRY.size == 24

# Linux copies at most this much of the command line (COMMAND_LINE_SIZE).
MAX_CMDLINE = 2048


@dataclass(frozen=True)
class PlacedModule:
    paddr: int
    size: int
    cmdline: str = ""


@dataclass
class BootInfo:
    """Where start_info went and the bytes to write into guest memory."""

    start_info_paddr: int
    blobs: list[tuple[int, bytes]] = field(default_factory=list)


def build_start_info(
    layout: PhysLayout,
    cmdline: str,
    modules: list[PlacedModule],
    rsdp_paddr: int = 0,
) -> BootInfo:
    raw_cmdline = cmdline.encode()
    if len(raw_cmdline) >= MAX_CMDLINE:
        raise BuildError(f"command line is {len(raw_cmdline)} bytes; the limit is {MAX_CMDLINE - 1}")
    memmap = layout.memory_map()
    strings = [raw_cmdline + b"\0"] + [m.cmdline.encode() + b"\0" for m in modules]
    fixed = 64 + MODLIST_ENTRY.size * len(modules) + MEMMAP_ENTRY.size * len(memmap)
    total = fixed + sum(len(s) for s in strings)
    base = layout.allocate(total, "start_info")

    modlist_paddr = base + 64
    memmap_paddr = modlist_paddr + MODLIST_ENTRY.size * len(modules)
    string_paddrs = []
    cursor = base + fixed
    for s in strings:
        string_paddrs.append(cursor)
        cursor += len(s)

    blob = bytearray(total)
    START_INFO.pack_into(
        blob,
        0,
        HVM_START_MAGIC,
        START_INFO_VERSION,
        0,  # flags: SIF_* are for the control domain
        len(modules),
        modlist_paddr if modules else 0,
        string_paddrs[0],
        rsdp_paddr,
        memmap_paddr,
        len(memmap),
        0,
    )
    for i, m in enumerate(modules):
        MODLIST_ENTRY.pack_into(blob, modlist_paddr - base + i * MODLIST_ENTRY.size, m.paddr, m.size, string_paddrs[1 + i], 0)
    for i, (addr, size, kind) in enumerate(memmap):
        MEMMAP_ENTRY.pack_into(blob, memmap_paddr - base + i * MEMMAP_ENTRY.size, addr, size, kind, 0)
    for paddr, s in zip(string_paddrs, strings):
        blob[paddr - base : paddr - base + len(s)] = s
    return BootInfo(base, [(base, bytes(blob))])
