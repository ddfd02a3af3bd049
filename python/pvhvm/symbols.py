"""Symbolizing guest addresses for crash reports, like xenctx -s System.map.

Sources, best first: a System.map, the ELF symbol table of vmlinux, and, for
stripped kernels such as Debian's, the kernel's own table of exported
symbols (__ksymtab, __ksymtab_gpl: 32-bit self-relative offsets on x86,
i386 and x86-64 alike),
which names the nearest exported function at least."""

from __future__ import annotations

import bisect
import struct
from pathlib import Path

SHT_SYMTAB = 2
STT_FUNC = 2


class Symbols:
    def __init__(self, entries: list[tuple[int, str]], source: str, approximate: bool = False) -> None:
        entries = sorted(e for e in entries if e[0])
        self.addrs = [a for a, _ in entries]
        self.names = [n for _, n in entries]
        self.source = source
        # Only exported symbols known: the name is the nearest exported one.
        self.approximate = approximate

    def __len__(self) -> int:
        return len(self.addrs)

    def lookup(self, addr: int) -> str | None:
        """`name+0xoff` for the nearest symbol at or below `addr`."""
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0 or addr - self.addrs[i] > 1 << 20:
            return None
        off = addr - self.addrs[i]
        name = f"{self.names[i]}+{off:#x}" if off else self.names[i]
        return f"{name} (nearest exported symbol)" if self.approximate else name

    @classmethod
    def from_system_map(cls, path: Path) -> Symbols:
        entries = []
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in "tTwW":
                try:
                    entries.append((int(parts[0], 16), parts[2]))
                except ValueError:
                    continue
        return cls(entries, f"System.map {path}")

    @classmethod
    def from_elf(cls, path: Path) -> Symbols | None:
        data = path.read_bytes()
        if data[:4] != b"\x7fELF" or data[4] not in (1, 2):
            return None
        elf32 = data[4] == 1
        # ELF32 (32-bit guests): the same section header fields, 32 bits wide.
        shoff, = struct.unpack_from("<I" if elf32 else "<Q", data, 0x20 if elf32 else 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x2E if elf32 else 0x3A)
        shdr = "<IIIIIIIIII" if elf32 else "<IIQQQQIIQQ"
        secs = [struct.unpack_from(shdr, data, shoff + i * shentsize) for i in range(shnum)]
        shstr = secs[shstrndx]

        def sec_name(s):
            off = shstr[4] + s[0]
            return data[off : data.index(b"\0", off)].decode()

        named = {sec_name(s): s for s in secs}
        sym, sym_size = ("<IIIBBH", 16) if elf32 else ("<IBBHQQ", 24)
        for s in secs:
            if s[1] == SHT_SYMTAB:
                strtab = secs[s[6]]
                out = []
                for off in range(s[4], s[4] + s[5] - sym_size + 1, sym_size):
                    if elf32:
                        st_name, st_value, _, st_info, _, _ = struct.unpack_from(sym, data, off)
                    else:
                        st_name, st_info, _, _, st_value, _ = struct.unpack_from(sym, data, off)
                    if st_info & 0xF == STT_FUNC and st_name:
                        o = strtab[4] + st_name
                        out.append((st_value, data[o : data.index(b"\0", o)].decode(errors="replace")))
                return cls(out, f"symbol table of {path}")
        return cls._from_ksymtab(data, named, path, 32 if elf32 else 64)

    @classmethod
    def _from_ksymtab(cls, data: bytes, named: dict, path: Path, bits: int) -> Symbols | None:
        strings = named.get("__ksymtab_strings")
        if strings is None:
            return None
        s_addr, s_off, s_size = strings[3], strings[4], strings[5]
        out = []
        for name in ("__ksymtab", "__ksymtab_gpl"):
            sec = named.get(name)
            if sec is None:
                continue
            addr, off, size = sec[3], sec[4], sec[5]
            for i in range(0, size - 11, 12):
                value_off, name_off = struct.unpack_from("<ii", data, off + i)
                value = (addr + i + value_off) & ((1 << bits) - 1)
                name_addr = addr + i + 4 + name_off
                if not s_addr <= name_addr < s_addr + s_size:
                    continue
                o = s_off + (name_addr - s_addr)
                out.append((value, data[o : data.index(b"\0", o)].decode(errors="replace")))
        return cls(out, f"exported symbols of {path} (stripped kernel)", approximate=True) if out else None


def load_symbols(kernel: Path, system_map: Path | None = None) -> Symbols | None:
    """The best symbol source available for `kernel`."""
    if system_map is not None:
        return Symbols.from_system_map(system_map)
    from .builder.elf import load_elf
    from .errors import PvhvmError

    try:
        # A bzImage's symbols are in the vmlinux pvhvm took out of it.
        return Symbols.from_elf(load_elf(kernel).elf_path or kernel)
    except (OSError, struct.error, ValueError, PvhvmError):
        return None
