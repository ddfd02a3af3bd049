"""The domain builder on its own: ELF parsing, placement, start_info bytes."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading

import pytest

from conftest import PVH_NOTE, make_elf64
from pvhvm.builder import PhysLayout, build_start_info, load_elf
from pvhvm.builder.domain import plan_domain
from pvhvm.builder.elf import parse_elf
from pvhvm.builder.layout import E820_RAM, E820_RESERVED
from pvhvm.builder.start_info import HVM_START_MAGIC, PlacedModule
from pvhvm.errors import BuildError


def test_notes_of_a_test_guest(guests):
    img = load_elf(guests["hello"])
    assert img.elf_class == 64 and img.phys32_entry == img.entry == 0x100000
    assert [n.name for n in img.notes] == ["PHYS32_ENTRY"]
    lo, hi = img.phys_range
    assert lo == 0x100000 and hi > lo


def test_all_note_kinds_decode():
    notes = [
        (6, b"linux\0"), (7, b"2.6\0"), (5, b"xen-3.0\0"), (8, b"generic\0"), (9, b"yes\0"),
        (10, b"!writable_page_tables|pae_pgdir_above_4gb\0"), (1, struct.pack("<Q", 0xFFFFFFFF81000000)),
        (2, struct.pack("<Q", 0xFFFFFFFF81001000)), (3, struct.pack("<Q", 0xFFFFFFFF80000000)),
        (4, struct.pack("<Q", 0)), (17, struct.pack("<I", 0x801)), (PVH_NOTE, struct.pack("<I", 0x1000000)),
        (19, struct.pack("<III", 0x200000, 0x1000000, 0xFFFFFFFF)),
    ]
    img = parse_elf(make_elf64([(0x1000000, b"\x90" * 16)], notes))
    by = {n.name: n.value for n in img.notes}
    assert by["GUEST_OS"] == "linux" and by["LOADER"] == "generic"
    assert by["FEATURES"].startswith("!writable_page_tables")
    assert by["ENTRY"] == 0xFFFFFFFF81000000 and by["HYPERCALL_PAGE"] == 0xFFFFFFFF81001000
    assert by["SUPPORTED_FEATURES"] == 0x801
    assert by["PHYS32_RELOC"] == (0x200000, 0x1000000, 0xFFFFFFFF)
    assert img.phys32_entry == 0x1000000


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "not an ELF file"),
        (b"MZ" + b"\0" * 100, "not an ELF file"),
        (b"\x7fELF" + bytes([3, 1, 1]) + b"\0" * 60, "unknown ELF class"),
        (b"\x7fELF" + bytes([2, 2, 1]) + b"\0" * 60, "little-endian"),
        (make_elf64([(0x100000, b"x")])[:70], "truncated"),
    ],
)
def test_bad_images(data, message):
    with pytest.raises(BuildError, match=message):
        parse_elf(data)


def test_segment_past_file_end_is_refused():
    elf = bytearray(make_elf64([(0x100000, b"abcd")]))
    struct.pack_into("<Q", elf, 64 + 32, 1 << 20)  # p_filesz of PT_LOAD 0
    struct.pack_into("<Q", elf, 64 + 40, 1 << 20)
    with pytest.raises(BuildError, match="outside the file"):
        parse_elf(bytes(elf))


def test_layout_refuses_overlaps_and_outside_ram():
    lay = PhysLayout(32 << 20)
    lay.reserve(0x100000, 0x10000, "kernel")
    with pytest.raises(BuildError, match="overlaps kernel"):
        lay.reserve(0x108000, 0x1000, "other")
    with pytest.raises(BuildError, match="outside guest RAM"):
        lay.reserve(31 << 20, 2 << 20, "big")
    with pytest.raises(BuildError, match="legacy hole"):
        lay.reserve(0xB8000, 0x1000, "vga")


def test_allocation_never_overlaps():
    lay = PhysLayout(32 << 20)
    lay.reserve(0x100000, 0x200000, "kernel")
    a = lay.allocate(5 << 20, "initrd", top_down=True)
    b = lay.allocate(3000, "info")
    c = lay.allocate(10 << 20, "more")
    spans = sorted((s, s + n) for s, n, _ in lay.used)
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))
    assert a + (5 << 20) == 32 << 20 and b == 0x2000 and c % 4096 == 0
    with pytest.raises(BuildError, match="does not fit"):
        lay.allocate(20 << 20, "huge")


def test_memory_map_around_the_mmio_hole():
    from pvhvm import _core

    lay = PhysLayout(4 << 30)
    mm = lay.memory_map()
    assert mm[0] == (0, 0xA0000, E820_RAM) and mm[1][2] == E820_RESERVED
    assert mm[2] == (0x100000, _core.MMIO_HOLE_START - 0x100000, E820_RAM)
    assert mm[3] == (1 << 32, (4 << 30) - _core.MMIO_HOLE_START, E820_RAM)


@pytest.mark.parametrize("size, message", [(0, "positive"), (4097, "multiple"), (8 << 20, "too small"),
                                           (128 << 30, "limit")])
def test_bad_memory_sizes(size, message):
    with pytest.raises(BuildError, match=message):
        PhysLayout(size)


def test_start_info_bytes():
    lay = PhysLayout(64 << 20)
    info = build_start_info(lay, "console=hvc0", [PlacedModule(0x2000000, 1234, "initrd")])
    (paddr, blob), = info.blobs
    assert paddr == info.start_info_paddr and paddr >= 0x2000
    magic, version, flags, nr, modlist, cmdline, rsdp, memmap, entries, _ = struct.unpack_from("<IIIIQQQQII", blob)
    assert (magic, version, flags, nr, rsdp) == (HVM_START_MAGIC, 1, 0, 1, 0)
    at = lambda p, n: blob[p - paddr : p - paddr + n]  # noqa: E731
    assert at(cmdline, 13) == b"console=hvc0\0"
    mod_paddr, mod_size, mod_cmd, _ = struct.unpack("<QQQQ", at(modlist, 32))
    assert (mod_paddr, mod_size, at(mod_cmd, 7)) == (0x2000000, 1234, b"initrd\0")
    table = [struct.unpack("<QQII", at(memmap + 24 * i, 24))[:3] for i in range(entries)]
    assert table == lay.memory_map()


def test_command_line_limit():
    with pytest.raises(BuildError, match="command line"):
        build_start_info(PhysLayout(32 << 20), "x" * 5000, [])


# --------------------------------------------------------------------------- initrd


TINY_KERNEL = make_elf64([(0x100000, b"\xf4" * 16)], [(PVH_NOTE, (0x100000).to_bytes(4, "little"))])

HUGE_INITRD_PROBE = """
import resource, sys, time
from pvhvm.builder.domain import plan_domain
from pvhvm.errors import BuildError

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    plan_domain(sys.argv[1], sys.argv[2], memory_mib=256)
except BuildError as e:
    print(e)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_huge_initrd_is_refused_from_its_size_without_reading_it(tmp_path):
    """A 2 GiB initrd for a 256 MiB domain: refused in one line by its size,
    in well under a second, and the process's peak RSS does not grow (it
    used to read all 2 GiB first)."""
    kernel = tmp_path / "k"
    kernel.write_bytes(TINY_KERNEL)
    huge = tmp_path / "huge.img"
    with open(huge, "wb") as f:
        f.truncate(2 << 30)  # sparse: costs no disk
    p = subprocess.run([sys.executable, "-c", HUGE_INITRD_PROBE, str(kernel), str(huge)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    message, numbers = p.stdout.strip().splitlines()
    assert message == f"{huge}: initrd (2048 MiB) does not fit in guest RAM (256 MiB)"
    seconds, rss_growth_kib = numbers.split()
    assert float(seconds) < 0.25, seconds
    assert int(rss_growth_kib) < 16 << 10, rss_growth_kib


def test_initrd_is_mapped_and_lands_whole_in_the_plan(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(TINY_KERNEL)
    initrd = tmp_path / "initrd"
    data = os.urandom(3 << 20)
    initrd.write_bytes(data)
    plan = plan_domain(kernel, initrd, memory_mib=64)
    placed = plan.placement.initrd
    assert placed.size == len(data)
    assert bytes(dict(plan.blobs)[placed.paddr]) == data
    with pytest.raises(BuildError, match="initrd is empty"):
        initrd.write_bytes(b"")
        plan_domain(kernel, initrd, memory_mib=64)


def test_initrd_from_a_pipe_is_read_up_to_what_fits(tmp_path):
    """A pipe (`--initrd <(...)`) has no size to check first: it is read up
    to one byte past the domain's memory, then refused."""
    kernel = tmp_path / "k"
    kernel.write_bytes(TINY_KERNEL)

    def plan_from_pipe(data: bytes, memory_mib: int):
        r, w = os.pipe()
        writer = threading.Thread(target=lambda: (_write_all(w, data), os.close(w)))
        writer.start()
        try:
            return plan_domain(kernel, f"/proc/self/fd/{r}", memory_mib=memory_mib)
        finally:
            os.close(r)  # a refused pipe stops its writer (EPIPE)
            writer.join(10)

    data = os.urandom(1 << 20)
    plan = plan_from_pipe(data, 32)
    assert bytes(dict(plan.blobs)[plan.placement.initrd.paddr]) == data
    with pytest.raises(BuildError, match=r"initrd \(more\) does not fit in guest RAM \(32 MiB\)"):
        plan_from_pipe(b"\0" * (40 << 20), 32)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except BrokenPipeError:
        pass
