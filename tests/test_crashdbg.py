"""Debugging a crashed domain: `Domain.context` (what xenctx prints) and
`Domain.dump_core` (an ELF core that gdb reads), on the crash test guest
(tests/guests/crash.c: a known chain of functions with frame pointers, a
second vCPU, a page given back) and on Debian's Linux panicking by sysrq."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

import pvhvm
from pvhvm.symbols import Symbols

needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="needs gdb")

TRACE_ENTRY = re.compile(r"^  (?:([0-9a-f]+): )?\[<([0-9a-f]+)>\](?: (\? )?(\S*))?")
CHAIN = ["crash_here", "crash_level_two", "crash_level_one", "guest_main"]


def sections(text: str) -> dict[int, str]:
    """{vcpu: its part of context()'s text}."""
    parts = re.split(r"\n\n(?=vcpu\d+: )", text)
    return {int(re.match(r"vcpu(\d+): ", p).group(1)): p for p in parts}


def trace(section: str) -> list[tuple[int | None, int, bool, str]]:
    """The call trace: (stack slot or None for ip, address, guess, name)."""
    out = []
    for line in section.split("Call Trace:\n", 1)[1].splitlines():
        m = TRACE_ENTRY.match(line)
        assert m, line
        slot = int(m.group(1), 16) if m.group(1) else None
        out.append((slot, int(m.group(2), 16), bool(m.group(3)), m.group(4) or ""))
    return out


def function(name: str) -> str:
    return name.split("+")[0]


def program_headers(path) -> list[tuple[int, ...]]:
    """(p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align) of an ELF64 file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    assert (e_type, e_machine) == (4, 62)  # ET_CORE, EM_X86_64
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if phnum == 0xFFFF:  # PN_XNUM: the count is section 0's sh_info
        phnum, = struct.unpack_from("<I", data, shoff + 44)
    return [struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)]


def gdb(executable, core, *commands: str) -> str:
    """gdb's answers to `commands` on `core` (with `executable`'s symbols if given)."""
    args = ["gdb", "-batch", "-nx", "-iex", "set debuginfod enabled off"]
    args += [str(executable), str(core)] if executable else ["-c", str(core)]
    for c in commands:
        args += ["-ex", c]
    p = subprocess.run(args, capture_output=True, timeout=120, text=True)
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def crashed(guests):
    dom = pvhvm.Domain(guests["crash"], memory_mib=32, vcpus=2)
    outcome = dom.run(timeout=60)
    assert outcome.crashed, (outcome, dom.console_output)
    assert b"vCPU 1 spinning" in dom.console_output and b"gave back 1 page" in dom.console_output
    yield dom
    dom.close()


def test_context_names_the_function_and_its_callers(crashed):
    text = crashed.context()
    by_vcpu = sections(text)
    assert sorted(by_vcpu) == [0, 1]
    regs = crashed.registers(0)
    ctx = by_vcpu[0]
    assert ctx.startswith("vcpu0: running, 64-bit, cpl 0\n")
    assert re.search(rf"^rip: {regs['rip']:016x} crash_here\+0x[0-9a-f]+$", ctx, re.M), ctx
    assert re.search(rf"^rsp: {regs['rsp']:016x}$", ctx, re.M)
    assert re.search(rf"^rbp: {regs['rbp']:016x} ", ctx, re.M)
    assert f"cr3: {regs['cr3']:016x}" in ctx and "efer: 0000000000000500 lme lma" in ctx
    flags = re.search(r"^flags: ([0-9a-f]{8}) ?(.*)$", ctx, re.M)
    assert int(flags.group(1), 16) == regs["rflags"] & 0xFFFFFFFF
    assert ("i" in flags.group(2).split()) == bool(regs["rflags"] & 0x200)
    assert re.search(r"^Code: ([0-9a-f]{2} )+<[0-9a-f]{2}>", ctx, re.M)

    entries = trace(ctx)
    assert entries[0] == (None, regs["rip"], False, entries[0][3]) and function(entries[0][3]) == "crash_here"
    # The frame-pointer chain: every caller, none a guess, in order up the stack.
    sure = [(slot, addr, function(name)) for slot, addr, guess, name in entries[1:] if not guess]
    assert [f for _, _, f in sure][:3] == CHAIN[1:]
    for slot, addr, _ in sure:
        assert regs["rsp"] <= slot and int.from_bytes(crashed.read_virt(slot, 8), "little") == addr
    # The stale address in crash_here's frame is found by the scan only: a guess.
    decoys = [e for e in entries if e[3] == "crash_decoy+0x5"]
    assert len(decoys) == 1 and decoys[0][2], entries

    other = by_vcpu[1]
    assert other.startswith("vcpu1: running, 64-bit, cpl 0\n")
    # vCPU 1 may not have had a turn before vCPU 0 crashed: at its entry, or in its loop.
    assert re.search(rf"^rip: {crashed.registers(1)['rip']:016x} crash_secondary_spin(\+0x|$)", other, re.M), other


def test_context_of_one_vcpu_and_stack_depth(crashed):
    one = crashed.context(1)
    assert one.startswith("vcpu1: ") and "vcpu0" not in one
    short = crashed.context(0, stack_words=4)
    assert "Stack (4 of 4 words from" in short
    # The frame chain goes on beyond the words shown.
    assert [function(name) for _, _, guess, name in trace(short) if not guess][:4] == CHAIN
    with pytest.raises(ValueError):
        crashed.context(2)
    with pytest.raises(ValueError):
        crashed.context(-1)
    with pytest.raises(ValueError):
        crashed.context(0, stack_words=-1)


def test_context_with_a_system_map_given_later(crashed, guests, tmp_path):
    """xenctx -s: the System.map names the addresses, not the ELF's symbols."""
    symbols = Symbols.from_elf(guests["crash"])
    lines = [f"{a:016x} T mapped_{n}" for a, n in zip(symbols.addrs, symbols.names)]
    system_map = tmp_path / "System.map"
    system_map.write_text("\n".join(lines) + "\n")
    ctx = crashed.context(0, system_map=system_map)
    assert re.search(r"^rip: [0-9a-f]{16} mapped_crash_here\+0x", ctx, re.M), ctx
    names = [function(name) for _, _, guess, name in trace(ctx) if not guess]
    assert names[:4] == [f"mapped_{n}" for n in CHAIN]
    with pytest.raises(FileNotFoundError):
        crashed.context(0, system_map=tmp_path / "missing")


@pytest.mark.parametrize("variant", ["nopaging", "pse", "pae"])
def test_context_of_a_32bit_guest(guests, variant):
    dom = pvhvm.Domain(guests[f"crash.i386-{variant}"], memory_mib=32)
    try:
        assert dom.run(timeout=60).crashed
        regs = dom.registers(0)
        ctx = dom.context()
        header = ctx.splitlines()[0]
        assert header.startswith("vcpu0: running, 32-bit, cpl 0")
        assert header.endswith("paging off") == (variant == "nopaging")
        assert re.search(rf"^eip: {regs['rip']:08x} crash_here\+0x", ctx, re.M), ctx
        assert re.search(rf"(^|   )ebp: {regs['rbp']:08x}( |$)", ctx, re.M)
        # 32-bit words: 8 of 8 digits a row, 4-byte slots in the trace.
        assert re.search(r"^  [0-9a-f]{8}:( [0-9a-f]{8}){8}$", ctx, re.M)
        entries = trace(ctx)
        assert [function(n) for _, _, guess, n in entries if not guess][:4] == CHAIN
        for slot, addr, _, _ in entries[1:]:
            assert int.from_bytes(dom.read_virt(slot, 4), "little") == addr
        assert any(name == "crash_decoy+0x5" and guess for _, _, guess, name in entries)
    finally:
        dom.close()


@needs_gdb
def test_gdb_reads_the_core(crashed, guests, tmp_path):
    core = tmp_path / "crash.core"
    crashed.dump_core(core)
    assert [p.name for p in tmp_path.iterdir()] == ["crash.core"]  # no temporary file left
    out = gdb(guests["crash"], core, "info registers rip", "bt", "info threads", "print/x crash_marker",
              "x/4xb &crash_given_back", "thread 2", "info registers rip")
    rip0, rip1 = crashed.registers(0)["rip"], crashed.registers(1)["rip"]
    assert re.search(rf"^rip +{rip0:#x} +{rip0:#x} <crash_here\+\d+>", out, re.M), out
    frames = re.findall(r"^#(\d+) +(?:0x[0-9a-f]+ in )?(\w+) ", out, re.M)
    backtrace = frames[[n for n, _ in frames].index("1") - 1 :]  # gdb also shows frame 0 when it loads
    assert [name for _, name in backtrace[:4]] == CHAIN, out
    assert re.search(r"^\* 1 +LWP 1 ", out, re.M) and re.search(r"^  2 +LWP 2 ", out, re.M), out
    assert "$1 = 0xc0ffee000003" in out
    # The page the guest gave back is a hole: zeros, though it held 0xaa.
    assert re.search(r"<crash_given_back>:\s+0x00\s+0x00\s+0x00\s+0x00", out), out
    assert re.search(rf"^rip +{rip1:#x} +{rip1:#x} <crash_secondary_spin(\+\d+)?>", out, re.M), out

    phdrs = program_headers(core)
    assert phdrs[0][0] == 4  # PT_NOTE first
    loads = [p for p in phdrs if p[0] == 1]
    # The guest's identity map: RAM at virtual = physical, all 32 MiB of it.
    assert sum(p[5] for p in loads if p[3] == p[4]) == 32 << 20
    # Sparse: the guest touched a few hundred KiB.
    assert core.stat().st_blocks * 512 < 4 << 20


def test_dump_core_notes(crashed, tmp_path):
    """NT_PRSTATUS per vCPU (pr_pid = vCPU + 1, registers in
    user_regs_struct's order), the crashed one first, and NT_PRPSINFO."""
    core = tmp_path / "c"
    crashed.dump_core(core)
    data = core.read_bytes()
    note = program_headers(core)[0]
    blob, notes, at = data[note[2] : note[2] + note[5]], [], 0
    while at < len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, at)
        name = blob[at + 12 : at + 12 + namesz]
        desc_at = at + 12 + (namesz + 3) // 4 * 4
        notes.append((name, ntype, blob[desc_at : desc_at + descsz]))
        at = desc_at + (descsz + 3) // 4 * 4
    assert [(n, t, len(d)) for n, t, d in notes] == [(b"CORE\0", 1, 336), (b"CORE\0", 1, 336), (b"CORE\0", 3, 136)]
    for vcpu, (_, _, desc) in enumerate(notes[:2]):
        assert struct.unpack_from("<i", desc, 32)[0] == vcpu + 1
        reg = struct.unpack_from("<27Q", desc, 112)
        regs = crashed.registers(vcpu)
        assert (reg[16], reg[19], reg[4], reg[14], reg[18]) == (regs["rip"], regs["rsp"], regs["rbp"], regs["rdi"],
                                                                  regs["rflags"])
    assert notes[2][2][40:49] == b"pvhvm\0\0\0\0"


# -- Linux ---------------------------------------------------------------------

LINUX_INIT = """#!/bin/sh
mount -t proc proc /proc
echo 0 > /proc/sys/kernel/kptr_restrict
grep -w -e linux_banner -e sysrq_handle_crash -e __handle_sysrq -e write_sysrq_trigger -e panic /proc/kallsyms
echo CRASH-NOW
echo c > /proc/sysrq-trigger
sleep 60
"""


def banner_address(guest) -> int:
    """Where the kernel's banner string ("Linux version <release> (...") is
    in its virtual memory, from vmlinux itself: i386's kallsyms lists no
    data. (vmlinux holds two copies; linux_banner is one.)"""
    from pvhvm.builder import load_elf

    image = load_elf(guest.vmlinux)
    data = guest.vmlinux.read_bytes()
    at = data.find(f"Linux version {guest.kernel_version} (".encode())
    seg = next(s for s in image.segments if s.offset <= at < s.offset + s.filesz)
    return seg.vaddr + at - seg.offset


@pytest.fixture(scope="module")
def linux_crashed():
    from pvhvm.images import prepare_default_guest

    guest = prepare_default_guest(init_script=LINUX_INIT)
    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0", memory_mib=256)
    outcome = dom.run(timeout=300)
    log = dom.console_output.decode(errors="replace")
    assert outcome.crashed and "sysrq triggered crash" in log, log[-3000:]
    kallsyms = {name: int(addr, 16) for addr, _, name in re.findall(r"^([0-9a-f]{16}) (\w) (\w+)\r?$", log, re.M)}
    assert {"linux_banner", "sysrq_handle_crash", "panic"} <= kallsyms.keys(), log[-3000:]
    yield dom, guest, kallsyms
    dom.close()


@pytest.mark.slow
def test_linux_context_after_sysrq_crash(linux_crashed, tmp_path):
    dom, _, kallsyms = linux_crashed
    regs = dom.registers(0)
    ctx = dom.context()
    assert ctx.startswith("vcpu0: running, 64-bit, cpl 0\n")
    # Named by the kernel's own kallsyms (in its stripped vmlinux), exactly.
    assert re.search(rf"^rip: {regs['rip']:016x} [\w.]+\+0x[0-9a-f]+$", ctx, re.M), ctx
    entries = trace(ctx)
    assert all(addr >= 0xFFFFFFFF80000000 for _, addr, _, _ in entries)
    assert "panic" in {function(name) for _, _, _, name in entries}, ctx
    # The handler that crashed (static, not exported) is named as Linux's
    # own oops and /proc/kallsyms name it.
    handler = [(addr, name) for _, addr, _, name in entries if function(name) == "sysrq_handle_crash"]
    assert handler and all(addr - kallsyms["sysrq_handle_crash"] < 0x100 for addr, _ in handler), ctx
    # With the symbols the guest printed from /proc/kallsyms as a System.map
    # (xenctx -s), the same.
    system_map = tmp_path / "System.map"
    system_map.write_text("".join(f"{a:016x} T {n}\n" for n, a in kallsyms.items() if n != "linux_banner"))
    mapped = trace(dom.context(system_map=system_map))
    handler = [(addr, name) for _, addr, _, name in mapped if function(name) == "sysrq_handle_crash"]
    assert handler and all(addr - kallsyms["sysrq_handle_crash"] < 0x100 for addr, _ in handler), mapped


@pytest.mark.slow
@needs_gdb
def test_linux_core_in_gdb(linux_crashed, tmp_path):
    dom, guest, kallsyms = linux_crashed
    core = tmp_path / "linux.core"
    dom.dump_core(core)
    banner = kallsyms["linux_banner"]
    regs = dom.registers(0)
    out = gdb(guest.vmlinux, core, "info registers", "p/x $gs_base", f"x/s {banner:#x}", "x/gx $rsp")
    assert re.search(rf"^rip +{regs['rip']:#x} ", out, re.M) and re.search(rf"^rsp +{regs['rsp']:#x} ", out, re.M), out
    assert f"$1 = {regs['gs_base']:#x}\n" in out, out  # the per-CPU area
    assert re.search(rf'^{banner:#x}(?: <[^>]*>)?:\s+"Linux version {re.escape(guest.kernel_version)}', out, re.M), out
    # The kernel stack (vmalloc'd) is read by its virtual address.
    top = int.from_bytes(dom.read_virt(regs["rsp"], 8), "little")
    assert re.search(rf"^{regs['rsp']:#x}:\s+{top:#018x}$", out, re.M), out

    loads = [p for p in program_headers(core) if p[0] == 1]
    # The kernel text mapping: __START_KERNEL_map + physical (no KASLR under PVH).
    text = [p for p in loads if p[3] <= banner < p[3] + p[6]]
    assert text and text[0][4] + banner - text[0][3] == banner - 0xFFFFFFFF80000000
    # The direct map covers the RAM too.
    assert any(p[3] >> 40 == 0xFFFF88 and p[6] >= 64 << 20 for p in loads)
    assert core.stat().st_blocks * 512 < core.stat().st_size


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="the i386 guest needs apt (Debian)")
def test_linux_i386_context_and_core(tmp_path):
    """Debian's 686-pae kernel keeps frame pointers: its chain up to panic
    is followed (no guesses), in 32-bit words; its core reads by virtual
    address through the PAE page tables."""
    from pvhvm.images import prepare_default_guest

    # No kallsyms here: reading it takes the emulated i386 half a minute.
    init = "#!/bin/sh\nmount -t proc proc /proc\necho c > /proc/sysrq-trigger\nsleep 60\n"
    guest = prepare_default_guest(init_script=init, arch="i386")
    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0", memory_mib=256)
    try:
        assert dom.run(timeout=300).crashed
        log = dom.console_output.decode(errors="replace")
        assert "sysrq triggered crash" in log, log[-3000:]
        banner = banner_address(guest)
        regs = dom.registers(0)
        ctx = dom.context()
        assert ctx.startswith("vcpu0: running, 32-bit, cpl 0\n"), ctx
        assert re.search(rf"^eip: {regs['rip']:08x} [\w.]+\+0x[0-9a-f]+$", ctx, re.M), ctx
        entries = trace(ctx)
        assert all(slot is None or slot < 1 << 32 for slot, _, _, _ in entries)
        # The chain, named by the kernel's kallsyms, from panic back to the sysrq write.
        chain = [function(name) for _, _, guess, name in entries if not guess]
        called = ["panic", "sysrq_handle_crash", "write_sysrq_trigger"]
        assert [f for f in chain if f in called] == called, ctx
        for slot, addr, _, _ in entries[1:]:
            assert int.from_bytes(dom.read_virt(slot, 4), "little") == addr

        core = tmp_path / "linux32.core"
        dom.dump_core(core)
        if shutil.which("gdb"):
            out = gdb("", core, f"x/s {banner:#x}", "info registers rip")
            assert re.search(rf'^{banner:#x}:\s+"Linux version {re.escape(guest.kernel_version)}', out, re.M), out
            assert re.search(rf"^rip +{regs['rip']:#x} ", out, re.M), out
    finally:
        dom.close()



def test_dump_core_of_hostile_page_tables(guests, tmp_path):
    """A guest whose PML4 entries all point at the PML4 itself (every level
    the same page again, 512^4 paths): the walk stops at its budget, the
    dump goes on, and its 262k program headers use the PN_XNUM extension."""
    import time

    from pvhvm.coredump import MAX_SEGMENTS

    dom = pvhvm.Domain(guests["crash"], memory_mib=32)
    try:
        assert dom.run(timeout=60).crashed
        cr3, rip = dom.registers(0)["cr3"], dom.registers(0)["rip"]
        dom._vm.write_phys(cr3, struct.pack("<512Q", *([cr3 | 0x3] * 512)))
        core = tmp_path / "core"
        start = time.monotonic()
        dom.dump_core(core)
        assert time.monotonic() - start < 60
    finally:
        dom.close()
    phdrs = program_headers(core)
    loads = [p for p in phdrs if p[0] == 1]
    assert len(phdrs) > 0xFFFF and len(loads) <= MAX_SEGMENTS + 8
    # What the walk found is real: the table's page, at every address that maps it.
    assert all(p[4] == cr3 and p[5] == 4096 for p in loads if p[3] != 0)
    if shutil.which("gdb"):
        assert re.search(rf"^rip +{rip:#x} ", gdb("", core, "info registers rip"), re.M)
