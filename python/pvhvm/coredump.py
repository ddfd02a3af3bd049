"""An ELF core file of a domain, for gdb (`Domain.dump_core`), in the form
the crash utility also takes for QEMU's dumps (untested here: crash needs a
vmlinux with debug info).

What QEMU's dump-guest-memory (with paging) and a kdump /proc/vmcore
write, in their common subset:

- ELF64, ET_CORE, EM_X86_64, whatever the guest's mode (32-bit registers
  zero-extended).
- One PT_NOTE: an NT_PRSTATUS per online vCPU (pr_pid = vCPU + 1, so gdb
  shows each vCPU as a thread; the vCPU the domain ended on first, which
  gdb takes as the current thread) and an NT_PRPSINFO.
- Guest RAM once in the file, at `RAM offset + its offset in pvhvm's host
  buffer`, sparse: pages of zeros and pages the guest gave back are holes.
- PT_LOAD segments pointing into it: one per run of guest-virtual memory
  that the page tables of the first vCPU map onto RAM (p_vaddr = virtual,
  p_paddr = guest-physical): for Linux the kernel text at
  __START_KERNEL_map, the direct map at page_offset_base, vmalloc'd stacks,
  the current process. Several segments may share file bytes. RAM that no
  page table maps gets a segment with p_vaddr 0 as in QEMU's dumps (crash
  reads memory by p_paddr); with paging off, p_vaddr = p_paddr.

The page tables are the guest's: every table read is bounds-checked
against RAM, and the walk has a budget, so looping or huge tables cost a
bounded time and give a bounded file header.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import _core

if TYPE_CHECKING:
    from .api import Domain

PAGE = 4096
ET_CORE, EM_X86_64 = 4, 62
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
NT_PRSTATUS, NT_PRPSINFO = 1, 3
PN_XNUM = 0xFFFF
SIGABRT = 6

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")
# struct elf_prstatus for x86-64 (linux/elfcore.h): elf_siginfo (signo,
# code, errno), pr_cursig, pad, pr_sigpend, pr_sighold, pid, ppid, pgrp,
# sid, four struct timeval, then pr_reg (27 longs), pr_fpvalid, pad.
PRSTATUS_HEAD = struct.Struct("<iiihxxQQiiii64x")
PRSTATUS_SIZE = 336
# user_regs_struct (sys/user.h), the order of pr_reg that gdb reads.
USER_REGS = ["r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
             "orig_rax", "rip", "cs", "rflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs"]
# struct elf_prpsinfo for x86-64: state, sname, zomb, nice, pad, flag,
# uid, gid, pid, ppid, pgrp, sid, fname[16], psargs[80].
PRPSINFO = struct.Struct("<bcbbxxxxQIIiiii16s80s")

ADDR_MASK = 0x000F_FFFF_FFFF_F000
# The walk's budget: page-table pages read (32 MiB of them; Linux maps its
# RAM with large pages and a few hundred tables), leaf entries taken, and
# PT_LOADs written. Past it the dump goes on with what was found.
MAX_TABLES = 1 << 13
MAX_LEAVES = 1 << 20
MAX_SEGMENTS = 1 << 18


class Mapping:
    __slots__ = ("va", "pa", "size")

    def __init__(self, va: int, pa: int, size: int) -> None:
        self.va, self.pa, self.size = va, pa, size


class PageWalk:
    """Every present leaf of one address space, as (va, pa, size), in
    ascending va; merged where both va and pa run on."""

    def __init__(self, read_phys: Callable[[int, int], bytes | None]) -> None:
        self._read_phys = read_phys
        self.tables = 0
        self.leaves = 0
        self.truncated = False
        self.out: list[Mapping] = []

    def _table(self, pa: int, entries: int, entry_size: int) -> tuple[int, ...] | None:
        if self.tables >= MAX_TABLES:
            self.truncated = True
            return None
        self.tables += 1
        data = self._read_phys(pa, entries * entry_size)
        if data is None:
            return None
        return struct.unpack(f"<{entries}{'Q' if entry_size == 8 else 'I'}", data)

    def _leaf(self, va: int, pa: int, size: int) -> None:
        self.leaves += 1
        last = self.out[-1] if self.out else None
        if last is not None and last.va + last.size == va and last.pa + last.size == pa:
            last.size += size
        elif len(self.out) >= MAX_SEGMENTS:
            self.truncated = True
            self.leaves = MAX_LEAVES  # stops the walk
        else:
            self.out.append(Mapping(va, pa, size))

    def long_mode(self, cr3: int, levels: int) -> None:
        """4-level (or 5-level, LA57) paging; va made canonical."""
        top_bit = 12 + 9 * levels - 1
        sign = ~((1 << (top_bit + 1)) - 1) & 0xFFFF_FFFF_FFFF_FFFF

        def walk(table_pa: int, level: int, va_base: int) -> None:
            entries = self._table(table_pa, 512, 8)
            if entries is None:
                return
            shift = 12 + 9 * (level - 1)
            for i, e in enumerate(entries):
                if not e & 1:
                    continue
                if self.leaves >= MAX_LEAVES:
                    self.truncated = True
                    return
                va = va_base | (i << shift)
                if level == levels and va >> top_bit & 1:
                    va |= sign
                if level == 1 or (level in (2, 3) and e & 0x80):
                    self._leaf(va, e & ADDR_MASK & ~((1 << shift) - 1), 1 << shift)
                else:
                    walk(e & ADDR_MASK, level - 1, va)

        walk(cr3 & ADDR_MASK, levels, 0)

    def pae(self, cr3: int) -> None:
        pdpt = self._table(cr3 & 0xFFFF_FFE0, 4, 8)
        for i, pdpte in enumerate(pdpt or ()):
            if not pdpte & 1:
                continue
            pd = self._table(pdpte & ADDR_MASK, 512, 8)
            for j, pde in enumerate(pd or ()):
                if not pde & 1:
                    continue
                va = i << 30 | j << 21
                if pde & 0x80:
                    self._leaf(va, pde & ADDR_MASK & ~0x1F_FFFF, 1 << 21)
                    continue
                pt = self._table(pde & ADDR_MASK, 512, 8)
                for k, pte in enumerate(pt or ()):
                    if pte & 1:
                        self._leaf(va | k << 12, pte & ADDR_MASK, PAGE)
                if self.leaves >= MAX_LEAVES:
                    self.truncated = True
                    return

    def two_level(self, cr3: int, pse: bool) -> None:
        pd = self._table(cr3 & 0xFFFF_F000, 1024, 4)
        for i, pde in enumerate(pd or ()):
            if not pde & 1:
                continue
            va = i << 22
            if pse and pde & 0x80:
                # PSE-36: bits 13-20 are physical address bits 32-39.
                self._leaf(va, (pde & 0xFFC0_0000) | (pde >> 13 & 0xFF) << 32, 1 << 22)
                continue
            pt = self._table(pde & 0xFFFF_F000, 1024, 4)
            for k, pte in enumerate(pt or ()):
                if pte & 1:
                    self._leaf(va | k << 12, pte & 0xFFFF_F000, PAGE)
            if self.leaves >= MAX_LEAVES:
                self.truncated = True
                return


def guest_mappings(regs: dict[str, int], read_phys: Callable[[int, int], bytes | None]) -> PageWalk | None:
    """The address space of a vCPU with these registers; None with paging off."""
    cr0, cr4, efer, cr3 = regs["cr0"], regs["cr4"], regs["efer"], regs["cr3"]
    if not cr0 & 1 << 31:
        return None
    walk = PageWalk(read_phys)
    if efer & 1 << 10:
        walk.long_mode(cr3, 5 if cr4 & 1 << 12 else 4)
    elif cr4 & 1 << 5:
        walk.pae(cr3)
    else:
        walk.two_level(cr3, bool(cr4 & 1 << 4))
    return walk


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name += b"\0"
    return (struct.pack("<III", len(name), len(desc), ntype) + name + b"\0" * (-len(name) % 4)
            + desc + b"\0" * (-len(desc) % 4))


def prstatus(vcpu: int, regs: dict[str, int], signal: int) -> bytes:
    values = dict(regs, orig_rax=0xFFFF_FFFF_FFFF_FFFF, ds=0, es=0, fs=0, gs=0)
    head = PRSTATUS_HEAD.pack(signal, 0, 0, signal, 0, 0, vcpu + 1, 0, 1, 1)
    body = head + struct.pack("<27Q", *(values[k] & 0xFFFF_FFFF_FFFF_FFFF for k in USER_REGS))
    return body + b"\0" * (PRSTATUS_SIZE - len(body))


def prpsinfo(name: str, args: str) -> bytes:
    return PRPSINFO.pack(0, b"R", 0, 0, 0, 0, 0, 1, 0, 1, 1, name.encode()[:15], args.encode()[:79])


class Ram:
    """Guest-physical RAM as pvhvm's host buffer lays it out."""

    def __init__(self, dom: Domain) -> None:
        self.vm = dom._vm
        self.regions = sorted(self.vm.ram_regions())  # (gpa, length, host offset)
        self.size = max((off + n for _, n, off in self.regions), default=0)

    def read(self, gpa: int, length: int) -> bytes | None:
        """RAM only: not the MMIO hole, not pages given back."""
        if gpa < 0 or length <= 0:
            return None
        try:
            return self.vm.read_phys(gpa, length)
        except (_core.CoreError, ValueError, OverflowError):
            return None

    def given_back(self, gpa: int) -> bool:
        return self.read(gpa, 1) is None

    def clip(self, pa: int, size: int) -> list[tuple[int, int, int]]:
        """[(pa, size, host offset)] of the parts of [pa, pa+size) in RAM."""
        out = []
        for gpa, n, off in self.regions:
            lo, hi = max(pa, gpa), min(pa + size, gpa + n)
            if lo < hi:
                out.append((lo, hi - lo, off + lo - gpa))
        return out


def _segments(ram: Ram, walk: PageWalk | None) -> list[tuple[int, int, int, int]]:
    """[(vaddr, paddr, size, host offset)] for the PT_LOADs."""
    segs: list[tuple[int, int, int, int]] = []
    if walk is None:
        return [(gpa, gpa, n, off) for gpa, n, off in ram.regions]
    covered: list[tuple[int, int]] = []
    for m in walk.out:
        for pa, size, off in ram.clip(m.pa, m.size):
            if len(segs) < MAX_SEGMENTS:
                segs.append((m.va + pa - m.pa, pa, size, off))
                covered.append((pa, pa + size))
    # RAM no page table maps: there for crash, which reads by p_paddr.
    covered.sort()
    for gpa, n, off in ram.regions:
        at = gpa
        for lo, hi in covered:
            if hi <= at or lo >= gpa + n:
                continue
            if lo > at:
                segs.append((0, at, lo - at, off + at - gpa))
            at = max(at, hi)
        if at < gpa + n:
            segs.append((0, at, gpa + n - at, off + at - gpa))
    segs.sort(key=lambda s: (s[0], s[1]))
    return segs


def _write_ram(fd: int, ram: Ram, mem: memoryview, base: int) -> int:
    """Write RAM's non-zero pages at base + host offset; returns bytes written."""
    chunk_size = 1 << 20
    zero_chunk, zero_page = bytes(chunk_size), bytes(PAGE)
    written = 0
    for gpa, n, off in ram.regions:
        for start in range(0, n, chunk_size):
            size = min(chunk_size, n - start)
            data = bytes(mem[off + start : off + start + size])
            if data == zero_chunk[:size]:
                continue
            run_start = None
            for p in range(0, size + PAGE, PAGE):
                keep = (p < size and data[p : p + PAGE] != zero_page and not ram.given_back(gpa + start + p))
                if keep and run_start is None:
                    run_start = p
                elif not keep and run_start is not None:
                    os.pwrite(fd, data[run_start:p], base + off + start + run_start)
                    written += p - run_start
                    run_start = None
    return written


def dump_core(dom: Domain, path: str | os.PathLike) -> None:
    path = Path(path)
    ram = Ram(dom)
    first = dom.last_exit.vcpu if dom.last_exit is not None and dom.last_exit.vcpu is not None else 0
    order = [first] + [v for v in range(dom.vcpus) if v != first]
    vcpus = [v for v in order if v == first or dom.vcpu_status(v)["online"]]
    regs = {v: dom.registers(v) for v in vcpus}

    crashed = dom.outcome is not None and dom.outcome.crashed
    notes = b"".join(_note(b"CORE", NT_PRSTATUS, prstatus(v, regs[v], SIGABRT if crashed and v == first else 0))
                     for v in vcpus)
    notes += _note(b"CORE", NT_PRPSINFO, prpsinfo(dom.name, f"{dom.kernel_path.name} {dom.cmdline}".strip()))

    segs = _segments(ram, guest_mappings(regs[first], ram.read))
    phnum = 1 + len(segs)
    extended = phnum >= PN_XNUM
    headers_end = EHDR.size + phnum * PHDR.size + (SHDR.size if extended else 0)
    notes_off = headers_end
    ram_base = -(-(notes_off + len(notes)) // PAGE) * PAGE

    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    shoff = EHDR.size + phnum * PHDR.size if extended else 0
    ehdr = EHDR.pack(ident, ET_CORE, EM_X86_64, 1, 0, EHDR.size, shoff, 0, EHDR.size, PHDR.size,
                     PN_XNUM if extended else phnum, SHDR.size if extended else 0, 1 if extended else 0, 0)
    phdrs = [PHDR.pack(PT_NOTE, 0, notes_off, 0, 0, len(notes), 0, 4)]
    phdrs += [PHDR.pack(PT_LOAD, PF_R | PF_W | PF_X, ram_base + off, va, pa, size, size, PAGE)
              for va, pa, size, off in segs]
    # More than 65534 program headers: the count goes in section 0's sh_info.
    shdr = SHDR.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0) if extended else b""

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.ftruncate(fd, ram_base + ram.size)
            os.pwrite(fd, ehdr + b"".join(phdrs) + shdr + notes, 0)
            _write_ram(fd, ram, dom.memory, ram_base)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
