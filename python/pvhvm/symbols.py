"""Symbolizing guest addresses for crash reports, like xenctx -s System.map.

Sources, best first: a System.map, the ELF symbol table of vmlinux, and, for
stripped kernels such as Debian's, the kernel's own complete table of
symbols (kallsyms, found by its shape in .rodata), else its table of
exported symbols (__ksymtab, __ksymtab_gpl: 32-bit self-relative offsets on
x86, i386 and x86-64 alike), which names the nearest exported function at
least."""

from __future__ import annotations

import array
import mmap
import bisect
import struct
import sys
from pathlib import Path

SHT_SYMTAB = 2
STT_FUNC = 2
PT_LOAD = 1

# kallsyms type letters of code: local and global functions, weak ones.
KALLSYMS_TEXT_TYPES = b"tTwW"


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
        """The ELF symbol table's functions; for a stripped kernel, kallsyms,
        else its exported symbols."""
        data = path.read_bytes()
        sections = _elf_sections(data)
        if sections is None:
            return None
        elf32, secs, named = sections
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
        kallsyms = cls.from_kallsyms(data, name=str(path))
        if kallsyms is not None:
            return kallsyms
        return cls._from_ksymtab(data, named, path, 32 if elf32 else 64)

    @classmethod
    def from_ksymtab(cls, path: Path) -> Symbols | None:
        """Only the exported symbols of a vmlinux (`approximate`)."""
        data = path.read_bytes()
        sections = _elf_sections(data)
        if sections is None:
            return None
        elf32, _, named = sections
        return cls._from_ksymtab(data, named, path, 32 if elf32 else 64)

    @classmethod
    def from_kallsyms(cls, image: Path | bytes, name: str | None = None, bits: int = 64) -> Symbols | None:
        """Every function of a kernel built with CONFIG_KALLSYMS, from the
        tables it carries in .rodata (kallsyms_names and friends), found by
        their shape since a stripped vmlinux does not name them. `image` is
        a vmlinux (ELF32 or ELF64) or raw bytes of one (`bits` then says
        32 or 64). None if there are no such tables or they do not hold
        together (the image is untrusted)."""
        data = image if isinstance(image, (bytes, bytearray, memoryview)) else Path(image).read_bytes()
        if name is None:
            name = "image" if isinstance(image, (bytes, bytearray, memoryview)) else str(image)
        try:
            entries = _Kallsyms(bytes(data), bits).text_symbols()
        except (struct.error, IndexError, ValueError, OverflowError):
            return None
        return cls(entries, f"kallsyms of {name}") if entries else None

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
    """The best symbol source available for `kernel`: the System.map, else
    the ELF symbol table, else kallsyms, else the exported symbols."""
    if system_map is not None:
        return Symbols.from_system_map(system_map)
    from .builder.elf import load_elf
    from .errors import PvhvmError

    try:
        # A bzImage's symbols are in the vmlinux pvhvm took out of it.
        return Symbols.from_elf(load_elf(kernel).elf_path or kernel)
    except (OSError, struct.error, ValueError, PvhvmError):
        return None


def has_frame_pointers(kernel: Path) -> bool:
    """Whether `kernel`'s code keeps frame pointers a profiler can follow:
    not if it carries ORC unwind tables (Linux's default unwinder, which
    lets the compiler use RBP for anything); an ELF without them (a test
    guest, a kernel built with the frame-pointer unwinder) is taken at its
    word."""
    from .builder.elf import load_elf
    from .errors import PvhvmError

    try:
        # The image's own bytes (an mmap, or a bzImage's vmlinux): only its
        # section headers are read.
        sections = _elf_sections(load_elf(kernel).data)
    except (OSError, struct.error, ValueError, IndexError, PvhvmError):
        return False
    return sections is not None and ".orc_unwind_ip" not in sections[2]


def _elf_sections(data: bytes | mmap.mmap) -> tuple[bool, list[tuple], dict[str, tuple]] | None:
    """(ELF32?, section headers, the same by name) of an ELF file."""
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
        end = data.find(b"\0", off)  # bytes or an mmap
        if end < 0:
            raise ValueError("section name runs off the image")
        return data[off:end].decode()

    return elf32, secs, {sec_name(s): s for s in secs}


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class _Kallsyms:
    """scripts/kallsyms.c's tables in a vmlinux, without their symbols.

    Each table starts at an address aligned to the pointer size. In the 6.1
    kernels: kallsyms_offsets (s32 each, base-relative) or
    kallsyms_addresses (pointers), kallsyms_relative_base (a pointer),
    kallsyms_num_syms (u32), kallsyms_names (per symbol a length, one byte or
    two if the first has bit 7 set, then token numbers; the first character
    decoded is the type letter), kallsyms_markers (u32: offset in names of
    every 256th symbol), then, in kernels that have it (6.2 on, and Debian's
    6.1 which has it backported), kallsyms_seqs_of_names (3 bytes a symbol),
    then kallsyms_token_table (256 NUL-terminated strings) and
    kallsyms_token_index (u16 offsets of the tokens). From 6.4 the offsets
    and relative base come after the token index instead (seqs_of_names last).

    Found from the token table (its single-character tokens '0'..'9'), then
    backwards: the markers, the names, their count; each step checked
    against the next so that random bytes are not taken for a table."""

    MAX_SYMS = 1 << 21  # far above any kernel's count; bounds the work on a corrupt image
    MAX_TOKEN = 128  # tokens are a few characters (at most KSYM_NAME_LEN)
    MAX_ZERO_WORDS = 4096  # zero words tried as markers[0] walking back from the token table
    MAX_CANDIDATES = 64  # (markers, count) pairs tried; the right one comes within the first few
    MIN_CHUNK, MAX_CHUNK = 256 * 2, 256 * (2 + 512)  # bytes of 256 names
    DIGIT_TOKENS = b"".join(bytes([c]) + b"\0" for c in b"0123456789")

    def __init__(self, data: bytes, bits: int) -> None:
        self.data = data
        self.bits = bits
        self.loads: list[tuple[int, int, int, int]] = []  # (offset, vaddr, filesz, memsz) of PT_LOADs
        if data[:4] == b"\x7fELF" and data[4] in (1, 2):
            self.bits = 32 if data[4] == 1 else 64
            self._read_program_headers()
        self.align = self.bits // 8  # ALGN in kallsyms.c: the pointer size
        self.skew = 0  # vaddr - offset modulo the alignment, for the tables' segment
        self.located: dict[str, int] = {}  # once found: the tables' file offsets, the symbol count

    def _read_program_headers(self) -> None:
        data = self.data
        if self.bits == 32:
            phoff, = struct.unpack_from("<I", data, 0x1C)
            phentsize, phnum = struct.unpack_from("<HH", data, 0x2A)
            fmt = "<IIIIIIII"
        else:
            phoff, = struct.unpack_from("<Q", data, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
            fmt = "<IIQQQQQQ"
        if phentsize < struct.calcsize(fmt):
            return
        for i in range(phnum):
            off = phoff + i * phentsize
            if off + phentsize > len(data):
                break
            ph = struct.unpack_from(fmt, data, off)
            if self.bits == 32:
                p_type, p_offset, p_vaddr, _, p_filesz, p_memsz = ph[:6]
            else:
                p_type, _, p_offset, p_vaddr, _, p_filesz, p_memsz = ph[:7]
            if p_type == PT_LOAD and p_filesz:
                self.loads.append((p_offset, p_vaddr, p_filesz, p_memsz))

    def _aligned(self, offset: int) -> int:
        """`offset` moved up to the next table boundary."""
        return _align_up(offset + self.skew, self.align) - self.skew

    def _is_aligned(self, offset: int) -> bool:
        return (offset + self.skew) % self.align == 0

    def _u32(self, offset: int) -> int:
        if not 0 <= offset <= len(self.data) - 4:
            raise ValueError("outside the image")
        return int.from_bytes(self.data[offset : offset + 4], "little")

    def _array(self, typecode: str, offset: int, count: int) -> array.array:
        table = array.array(typecode)
        end = offset + count * table.itemsize
        if not 0 <= offset <= end <= len(self.data):
            raise ValueError("outside the image")
        table.frombytes(self.data[offset:end])
        if sys.byteorder == "big":
            table.byteswap()
        return table

    # -- the token table ----------------------------------------------------

    def _token_table(self) -> tuple[list[bytes], int, int] | None:
        """(tokens, offset of the table, offset of the index)."""
        at = -1
        while (at := self.data.find(self.DIGIT_TOKENS, at + 1)) >= 0:
            try:
                found = self._token_table_with_digits_at(at)
            except ValueError:  # an index that would reach outside the image
                continue
            if found is not None:
                return found
        return None

    def _token_table_with_digits_at(self, digits: int) -> tuple[list[bytes], int, int] | None:
        data = self.data
        # Back over tokens 47..1 (each non-empty, NUL-terminated) to token 1.
        start = digits
        for _ in range(47):
            if start < 2 or data[start - 1] != 0:
                return None
            prev = data.rfind(b"\0", max(0, start - 2 - self.MAX_TOKEN), start - 1) + 1
            if prev == 0 or prev >= start - 1:
                return None
            start = prev
        tokens = [b""]
        end = start
        for _ in range(255):
            nul = data.find(b"\0", end, end + self.MAX_TOKEN + 1)
            if nul <= end:
                return None
            tokens.append(data[end:nul])
            end = nul + 1
        # Token 0's start is not delimited before it: the index gives it.
        self.skew = self._skew_at(start)
        index_at = self._aligned(end)
        index = self._array("H", index_at, 256)
        table_at = start - index[1]
        if index[0] != 0 or not self._is_aligned(table_at) or table_at >= start - 1 or table_at < 0:
            return None
        tokens[0] = data[table_at : start - 1]
        if 0 in tokens[0]:
            return None
        offset = 0
        for token, indexed in zip(tokens, index):
            if indexed != offset:
                return None
            offset += len(token) + 1
        return tokens, table_at, index_at

    def _skew_at(self, offset: int) -> int:
        for p_offset, p_vaddr, p_filesz, _ in self.loads:
            if p_offset <= offset < p_offset + p_filesz:
                return (p_vaddr - p_offset) % self.align
        return 0

    # -- markers, names, count ----------------------------------------------

    def _markers(self, table_at: int):
        """Candidates (offset, markers, symbol counts) for kallsyms_markers,
        which ends right before the token table or before the seqs_of_names
        (3 bytes a symbol) in front of it. Walks back over the zero words
        that could be markers[0]."""
        data = self.data
        low = max(0, table_at - 3 * self.MAX_SYMS - 4 * (self.MAX_SYMS // 256) - 2 * self.align)
        high = table_at
        tried = 0
        while tried < self.MAX_ZERO_WORDS:
            zero = data.rfind(b"\0\0\0\0", low, high)
            if zero < 0:
                return
            high = zero + 3
            if not self._is_aligned(zero):
                continue
            tried += 1
            # The run of increasing offsets from markers[0]: 256 names take
            # 2 to 2 + KSYM_NAME_LEN bytes each (a length, the tokens).
            values = [0]
            at = zero + 4
            while at + 4 <= table_at and len(values) <= self.MAX_SYMS // 256:
                value = self._u32(at)
                if not values[-1] + self.MIN_CHUNK <= value <= values[-1] + self.MAX_CHUNK:
                    break
                values.append(value)
                at += 4
            # The run may have taken a word of seqs_of_names too.
            for count in range(len(values), max(0, len(values) - 3), -1):
                for nsyms in self._counts_fitting(zero + 4 * count, table_at, count):
                    yield zero, values[:count], nsyms

    def _counts_fitting(self, markers_end: int, table_at: int, count: int) -> list[range]:
        """The symbol counts for which `count` markers ending at
        `markers_end` leave exactly the gap up to the token table."""
        fitting = range(256 * (count - 1) + 1, 256 * count + 1)
        after = self._aligned(markers_end)
        if after == table_at:
            return [fitting]
        gap = table_at - after  # seqs_of_names, padded
        near = range(max(1, (gap - self.align) // 3), gap // 3 + 1)
        counts = [n for n in near if self._aligned(after + 3 * n) == table_at]
        return [range(n, n + 1) for n in counts if n in fitting]

    def _names(self, markers_at: int, markers: list[int], nsyms: range) -> tuple[int, int] | None:
        """(offset of kallsyms_names, symbol count): the count is the word
        one table before the names, and the names from there, walked by
        their lengths, end where the markers begin and meet every marker."""
        in_last_chunk = nsyms.start - 256 * (len(markers) - 1)
        # Every name takes two bytes at least (a length, a token).
        latest = self._aligned(markers_at - markers[-1] - 2 * in_last_chunk - self.align + 1)
        earliest = latest - min(self.MAX_CHUNK, latest - self.align) // self.align * self.align
        # The count is looked for in one read of the stretch it can be in.
        words = (latest - earliest) // self.align + 1
        window = self._array("I" if self.align == 4 else "Q", earliest - self.align, words)
        for i in range(len(window) - 1, -1, -1):
            # For 64-bit tables the count's word is followed by 4 bytes of padding.
            count = window[i] & 0xFFFFFFFF
            if count in nsyms:
                names_at = earliest + i * self.align
                if self._walk_ends_at(names_at, count, markers, markers_at):
                    return names_at, count
        return None

    def _walk_ends_at(self, names_at: int, count: int, markers: list[int], markers_at: int) -> bool:
        data = self.data
        at = names_at
        for i in range(count):
            if i % 256 == 0 and at - names_at != markers[i // 256]:
                return False
            if at >= markers_at:
                return False
            length = data[at]
            if length & 0x80:
                at += 2 + ((length & 0x7F) | data[at + 1] << 7)
            else:
                at += 1 + length
        return markers_at - self.align < at <= markers_at

    # -- addresses ----------------------------------------------------------

    def _addresses(self, count_at: int, count: int, index_at: int) -> list[int] | None:
        """Every symbol's address, from whichever layout holds together:
        sorted (kallsyms.c sorts the symbols by address) and in the image."""
        ptr = self.align
        after_index = self._aligned(index_at + 2 * 256)
        before_count = count_at - ptr  # relative_base, or the end of the addresses
        layouts = (
            ("relative", before_count - _align_up(4 * count, ptr), before_count),
            ("relative", after_index, self._aligned(after_index + 4 * count)),
            ("absolute", count_at - ptr * count, None),
            ("absolute", after_index, None),
        )
        mask = (1 << self.bits) - 1
        for kind, table_at, base_at in layouts:
            try:
                if kind == "absolute":
                    addresses = list(self._array("Q" if ptr == 8 else "I", table_at, count))
                else:
                    addresses = self._relative(table_at, base_at, count, mask)
            except ValueError:
                continue
            if self._plausible(addresses):
                return addresses
        return None

    def _relative(self, offsets_at: int, base_at: int, count: int, mask: int) -> list[int]:
        offsets = self._array("i", offsets_at, count)
        base = int.from_bytes(self.data[base_at : base_at + self.align], "little") if base_at >= 0 else -1
        if base <= 0 or base_at + self.align > len(self.data):
            raise ValueError("no relative base")
        if min(offsets) < 0:
            # CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64 SMP): per-CPU symbols
            # absolute, the others base - 1 - offset.
            return [o if o >= 0 else (base - 1 - o) & mask for o in offsets]
        return [(base + o) & mask for o in offsets]

    def _plausible(self, addresses: list[int]) -> bool:
        if addresses != sorted(addresses):
            return False
        if not self.loads:
            return True
        # The last symbol (the end of the kernel image) falls inside its segments.
        return any(vaddr <= addresses[-1] <= vaddr + memsz for _, vaddr, _, memsz in self.loads)

    # -- all together -------------------------------------------------------

    def text_symbols(self) -> list[tuple[int, str]]:
        found = self._token_table()
        if found is None:
            return []
        tokens, table_at, index_at = found
        for tried, (markers_at, markers, nsyms) in enumerate(self._markers(table_at)):
            if tried == self.MAX_CANDIDATES:
                break
            try:
                names = self._names(markers_at, markers, nsyms)
            except ValueError:  # a candidate reaching outside the image
                continue
            if names is None:
                continue
            names_at, count = names
            addresses = self._addresses(names_at - self.align, count, index_at)
            if addresses is None:
                continue
            self.located = {"token_table": table_at, "token_index": index_at, "markers": markers_at,
                            "names": names_at, "num_syms": names_at - self.align, "count": count}
            return self._decode(tokens, names_at, addresses)
        return []

    def _decode(self, tokens: list[bytes], names_at: int, addresses: list[int]) -> list[tuple[int, str]]:
        data = self.data
        # Only names whose first token starts with a code type letter are
        # decoded: the others (data, with KALLSYMS_ALL) are half the table.
        wanted = [bool(token) and token[0] in KALLSYMS_TEXT_TYPES for token in tokens]
        lookup = [token.decode("latin-1") for token in tokens].__getitem__
        join = "".join
        out = []
        at = names_at
        for address in addresses:
            length = data[at]
            if length & 0x80:
                length = (length & 0x7F) | data[at + 1] << 7
                at += 2
            else:
                at += 1
            if wanted[data[at]]:
                out.append((address, join(map(lookup, data[at : at + length]))[1:]))
            at += length
        return out
