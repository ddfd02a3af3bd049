"""A vCPU's context as `xenctx -s System.map` prints it: registers, the
code at RIP, the stack, and a call trace.

The call trace follows the frame-pointer chain (rbp, then [rbp] and the
return address above it) while the frames stay in the stack and go up, and
also scans the stack words for addresses in the kernel's code. As in
Linux's oops, an address only the scan found is a guess, marked `?`.

Everything read is the guest's: registers and stack words may be anything,
and every read may fail; nothing here trusts them beyond bounds checks.
"""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import _core
from .symbols import load_symbols

if TYPE_CHECKING:
    from .api import Domain

DEFAULT_STACK_WORDS = 32
# How far above RSP a frame may be: no kernel's stack is larger (Linux's
# are 16 KiB on x86-64, 8 KiB on i386), and a garbage RBP is refused.
STACK_SPAN = 64 << 10
MAX_FRAMES = 64
CODE_BEFORE, CODE_AFTER = 21, 21

EFER_LMA = 1 << 10
CR0_PG = 1 << 31
PAGE = 4096

RFLAGS_BITS = [(0, "c"), (2, "p"), (4, "a"), (6, "z"), (7, "s"), (8, "t"), (9, "i"), (10, "d"), (11, "o"),
               (14, "nt"), (16, "rf"), (17, "vm"), (18, "ac"), (19, "vif"), (20, "vip"), (21, "id")]
CR0_BITS = [(0, "pe"), (1, "mp"), (2, "em"), (3, "ts"), (4, "et"), (5, "ne"), (16, "wp"), (18, "am"),
            (29, "nw"), (30, "cd"), (31, "pg")]
CR4_BITS = [(0, "vme"), (1, "pvi"), (2, "tsd"), (3, "de"), (4, "pse"), (5, "pae"), (6, "mce"), (7, "pge"),
            (8, "pce"), (9, "osfxsr"), (10, "osxmmexcpt"), (11, "umip"), (12, "la57"), (13, "vmxe"),
            (14, "smxe"), (16, "fsgsbase"), (17, "pcide"), (18, "osxsave"), (20, "smep"), (21, "smap"),
            (22, "pke"), (23, "cet")]
EFER_BITS = [(0, "sce"), (8, "lme"), (10, "lma"), (11, "nxe"), (12, "svme"), (13, "lmsle"), (14, "ffxsr"),
             (15, "tce")]


def decode_bits(value: int, bits: list[tuple[int, str]]) -> str:
    return " ".join(name for bit, name in bits if value >> bit & 1)


def word_bits(regs: dict[str, int]) -> int:
    """64 in long mode, 32 otherwise. Unicorn's register list has no CS
    descriptor (its L bit), so a 32-bit process under a 64-bit kernel is
    recognised by Linux's __USER32_CS (0x23) at CPL 3."""
    if not regs["efer"] & EFER_LMA:
        return 32
    if regs["cpl"] == 3 and regs["cs"] == 0x23:
        return 32
    return 64


@functools.lru_cache(maxsize=8)
def _exec_ranges(path: str, mtime_ns: int) -> tuple[tuple[int, int], ...]:
    """Where the kernel's code is: its executable sections (SHF_EXECINSTR),
    or its executable PT_LOAD segments if it has no section headers."""
    del mtime_ns  # part of the cache key only
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 52 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2):
            return ()
        if ident[4] == 2:
            phoff, shoff = struct.unpack_from("<QQ", ident, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", ident, 0x36)
            shdr, sh_flags_addr_size = "<IIQQQQIIQQ", (2, 3, 5)
            phdr, ph_type_flags_vaddr_memsz = "<IIQQQQQQ", (0, 1, 3, 6)
        else:
            phoff, shoff = struct.unpack_from("<II", ident, 0x1C)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", ident, 0x2A)
            shdr, sh_flags_addr_size = "<IIIIIIIIII", (2, 3, 5)
            phdr, ph_type_flags_vaddr_memsz = "<IIIIIIII", (0, 6, 2, 5)
        ranges = []
        if shnum and shentsize >= struct.calcsize(shdr) and shnum < 1 << 16:
            f.seek(shoff)
            table = f.read(shnum * shentsize)
            for i in range(len(table) // shentsize):
                s = struct.unpack_from(shdr, table, i * shentsize)
                flags, addr, size = (s[k] for k in sh_flags_addr_size)
                if flags & 0x6 == 0x6 and size:  # SHF_ALLOC | SHF_EXECINSTR
                    ranges.append((addr, addr + size))
        if not ranges and phnum and phentsize >= struct.calcsize(phdr):
            f.seek(phoff)
            table = f.read(phnum * phentsize)
            for i in range(len(table) // phentsize):
                p = struct.unpack_from(phdr, table, i * phentsize)
                ptype, pflags, vaddr, memsz = (p[k] for k in ph_type_flags_vaddr_memsz)
                if ptype == 1 and pflags & 1 and memsz:  # PT_LOAD, PF_X
                    ranges.append((vaddr, vaddr + memsz))
    return tuple(sorted(ranges))


def exec_ranges(kernel: Path) -> tuple[tuple[int, int], ...]:
    try:
        return _exec_ranges(str(kernel), os.stat(kernel).st_mtime_ns)
    except (OSError, struct.error):
        return ()


class Reader:
    """Guest-virtual reads through one vCPU's page tables; None where they fail."""

    def __init__(self, dom: Domain, vcpu: int, width: int) -> None:
        self.dom, self.vcpu, self.width = dom, vcpu, width
        self.mask = (1 << (8 * width)) - 1

    def read(self, va: int, length: int) -> bytes | None:
        if va < 0 or length <= 0 or va + length > 1 << 64:
            return None
        try:
            return self.dom.read_virt(va, length, self.vcpu)
        except (_core.CoreError, ValueError, OverflowError):
            return None

    def read_prefix(self, va: int, length: int) -> bytes:
        """As much of [va, va+length) as reads, page by page from the start."""
        out = b""
        while len(out) < length:
            at = va + len(out)
            chunk = min(length - len(out), PAGE - at % PAGE)
            data = self.read(at, chunk)
            if data is None:
                break
            out += data
        return out

    def word(self, va: int) -> int | None:
        data = self.read(va, self.width)
        return int.from_bytes(data, "little") if data is not None else None

    def words(self, va: int, count: int) -> list[tuple[int, int]]:
        data = self.read_prefix(va, count * self.width)
        w = self.width
        return [(va + i, int.from_bytes(data[i : i + w], "little")) for i in range(0, len(data) - w + 1, w)]


class Namer:
    """Names code addresses, and tells code addresses from the rest."""

    def __init__(self, lookup: Callable[[int], str | None], text: tuple[tuple[int, int], ...]) -> None:
        self._lookup = lookup
        self._text = text

    def name(self, addr: int) -> str | None:
        return self._lookup(addr)

    def name_return(self, addr: int) -> str | None:
        """A return address's function: a call that never returns may be
        the last instruction of its function, so its return address is the
        start of the next one; Linux names addr - 1 for that reason."""
        n = self._lookup(addr)
        if n is not None and "+" not in n.split(" ")[0]:
            before = self._lookup(addr - 1)
            if before is not None:
                base, plus, off = before.partition("+")
                if plus:
                    head, _, tail = off.partition(" ")
                    try:
                        return f"{base}+{int(head, 16) + 1:#x}" + (f" {tail}" if tail else "")
                    except ValueError:
                        return n
        return n

    def is_code(self, addr: int) -> bool:
        if self._text:
            if not any(lo <= addr < hi for lo, hi in self._text):
                return False
        return self._lookup(addr) is not None or bool(self._text)

    def is_return(self, addr: int) -> bool:
        """Whether `addr` may be a return address: the call before it is code."""
        return addr > 0 and self.is_code(addr - 1)


def make_namer(dom: Domain, system_map: str | os.PathLike | None = None) -> Namer:
    if system_map is not None:
        path = Path(system_map)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such System.map")
        symbols = load_symbols(dom.kernel_path, path)
        lookup = symbols.lookup if symbols else (lambda addr: None)
    else:
        lookup = dom.symbolize
    return Namer(lookup, exec_ranges(dom.kernel_path))


def frame_chain(reader: Reader, namer: Namer, bp: int, sp: int) -> dict[int, int]:
    """{stack slot: return address} along the frame-pointer chain: each
    frame above the last and below sp + STACK_SPAN, each return address
    in code."""
    w = reader.width
    found: dict[int, int] = {}
    while len(found) < MAX_FRAMES and sp <= bp and bp + 2 * w <= sp + STACK_SPAN and bp % w == 0:
        next_bp, ret = reader.word(bp), reader.word(bp + w)
        if next_bp is None or ret is None or not namer.is_return(ret):
            break
        found[bp + w] = ret
        if next_bp <= bp:
            break
        bp = next_bp
    return found


def call_trace(reader: Reader, namer: Namer, regs: dict[str, int], width_bits: int,
               stack_words: int) -> list[str]:
    mask = reader.mask
    ip, sp, bp = regs["rip"] & mask, regs["rsp"] & mask, regs["rbp"] & mask
    digits = width_bits // 4
    lines = [f"  [<{ip:0{digits}x}>] {namer.name(ip) or '?'} <-- ip"]
    reliable = frame_chain(reader, namer, bp, sp)
    slots = {slot: (ret, True) for slot, ret in reliable.items()}
    for slot, value in reader.words(sp, stack_words):
        if slot not in slots and namer.is_return(value):
            slots[slot] = (value, False)
    for slot in sorted(slots):
        ret, sure = slots[slot]
        guess = "" if sure else "? "
        lines.append(f"  {slot:0{digits}x}: [<{ret:0{digits}x}>] {guess}{namer.name_return(ret) or ''}".rstrip())
    return lines


def code_bytes(reader: Reader, ip: int) -> str:
    """Linux's oops `Code:` line: the bytes around ip, <ip's byte>."""
    before = b""
    # The bytes before ip may start on an unmapped page: take what reads.
    for start in range(ip - CODE_BEFORE, ip + 1):
        if start < 0:
            continue
        before = reader.read_prefix(start, ip - start)
        if len(before) == ip - start:
            break
        before = b""
    after = reader.read_prefix(ip, CODE_AFTER)
    if not after:
        return f"Code: unreadable at {ip:#x}"
    return "Code: " + " ".join([*(f"{b:02x}" for b in before), f"<{after[0]:02x}>",
                                *(f"{b:02x}" for b in after[1:])])


def vcpu_context(dom: Domain, vcpu: int, namer: Namer, stack_words: int = DEFAULT_STACK_WORDS) -> str:
    regs = dom.registers(vcpu)
    status = dom.vcpu_status(vcpu)
    bits = word_bits(regs)
    width = bits // 8
    reader = Reader(dom, vcpu, width)
    state = status["activity"] if status["online"] else "offline"
    lines = [f"vcpu{vcpu}: {state}, {bits}-bit, cpl {regs['cpl']}"
             + ("" if regs["cr0"] & CR0_PG else ", paging off")]
    if bits == 64:
        sym = namer.name(regs["rip"])
        lines.append(f"rip: {regs['rip']:016x}" + (f" {sym}" if sym else ""))
        lines.append(f"flags: {regs['rflags']:08x} {_flags(regs['rflags'])}".rstrip())
        lines.append(f"rsp: {regs['rsp']:016x}")
        names = ["rax", "rcx", "rdx", "rbx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
                 "r15"]
        for i in range(0, len(names), 3):
            lines.append("   ".join(f"{n:>3}: {regs[n]:016x}" for n in names[i : i + 3]))
    else:
        m = 0xFFFFFFFF
        sym = namer.name(regs["rip"] & m)
        lines.append(f"eip: {regs['rip'] & m:08x}" + (f" {sym}" if sym else ""))
        lines.append(f"flags: {regs['rflags'] & m:08x} {_flags(regs['rflags'])}".rstrip())
        lines.append(f"esp: {regs['rsp'] & m:08x}")
        names = ["rax", "rcx", "rdx", "rbx", "rsi", "rdi", "rbp"]
        for i in range(0, len(names), 4):
            lines.append("   ".join(f"e{n[1:]}: {regs[n] & m:08x}" for n in names[i : i + 4]))
    lines.append(f" cs: {regs['cs']:04x}    ss: {regs['ss']:04x}")
    lines.append(f" fs base: {regs['fs_base']:016x}")
    lines.append(f" gs base: {regs['gs_base']:016x}")
    lines.append(f"cr0: {regs['cr0']:08x} {decode_bits(regs['cr0'], CR0_BITS)}".rstrip())
    lines.append(f"cr2: {regs['cr2']:0{2 * width}x}")
    lines.append(f"cr3: {regs['cr3']:0{2 * width}x}")
    lines.append(f"cr4: {regs['cr4']:08x} {decode_bits(regs['cr4'], CR4_BITS)}".rstrip())
    lines.append(f"efer: {regs['efer']:016x} {decode_bits(regs['efer'], EFER_BITS)}".rstrip())
    lines.append("")
    lines.append(code_bytes(reader, regs["rip"] & reader.mask))
    lines.append("")
    sp = regs["rsp"] & reader.mask
    stack = reader.words(sp, stack_words)
    lines.append(f"Stack ({len(stack)} of {stack_words} words from {sp:#x}):")
    per_line = 4 if width == 8 else 8
    for i in range(0, len(stack), per_line):
        row = stack[i : i + per_line]
        lines.append(f"  {row[0][0]:0{2 * width}x}: " + " ".join(f"{v:0{2 * width}x}" for _, v in row))
    lines.append("")
    lines.append("Call Trace:")
    lines += call_trace(reader, namer, regs, bits, stack_words)
    return "\n".join(lines)


def _flags(value: int) -> str:
    text = decode_bits(value, RFLAGS_BITS)
    iopl = value >> 12 & 3
    return f"{text} iopl={iopl}" if iopl else text


def context(dom: Domain, vcpu: int | None = None, *, system_map: str | os.PathLike | None = None,
            stack_words: int = DEFAULT_STACK_WORDS) -> str:
    """`vcpu`'s context, or every online vCPU's (None)."""
    if isinstance(stack_words, bool) or not isinstance(stack_words, int) or not 0 <= stack_words <= 1 << 16:
        raise ValueError(f"stack_words must be 0 to 65536, not {stack_words!r}")
    namer = make_namer(dom, system_map)
    if vcpu is not None:
        if isinstance(vcpu, bool) or not isinstance(vcpu, int) or not 0 <= vcpu < dom.vcpus:
            raise ValueError(f"vcpu must be 0 to {dom.vcpus - 1}, not {vcpu!r}")
        return vcpu_context(dom, vcpu, namer, stack_words)
    online = [v for v in range(dom.vcpus) if dom.vcpu_status(v)["online"]]
    return "\n\n".join(vcpu_context(dom, v, namer, stack_words) for v in online)
