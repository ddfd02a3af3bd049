"""ELF kernel images: ELF64 and ELF32 containers (an x86-64 kernel may be an
ELF32 file), PT_LOAD segments at their physical addresses, and every Xen ELF
note (xen/include/public/elfnote.h)."""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildError

# XEN_ELFNOTE_* types and how their descriptors read.
NOTE_NAMES = {
    0: "INFO",
    1: "ENTRY",
    2: "HYPERCALL_PAGE",
    3: "VIRT_BASE",
    4: "PADDR_OFFSET",
    5: "XEN_VERSION",
    6: "GUEST_OS",
    7: "GUEST_VERSION",
    8: "LOADER",
    9: "PAE_MODE",
    10: "FEATURES",
    11: "BSD_SYMTAB",
    12: "HV_START_LOW",
    13: "L1_MFN_VALID",
    14: "SUSPEND_CANCEL",
    15: "INIT_P2M",
    16: "MOD_START_PFN",
    17: "SUPPORTED_FEATURES",
    18: "PHYS32_ENTRY",
    19: "PHYS32_RELOC",
}
STRING_NOTES = {"XEN_VERSION", "GUEST_OS", "GUEST_VERSION", "LOADER", "PAE_MODE", "FEATURES", "BSD_SYMTAB"}
XEN_ELFNOTE_PHYS32_ENTRY = 18

PT_LOAD = 1
PT_NOTE = 4
SHT_NOTE = 7
EM_386 = 3
EM_X86_64 = 62


@dataclass(frozen=True)
class Segment:
    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int


@dataclass(frozen=True)
class XenNote:
    type: int
    name: str
    raw: bytes
    value: object  # int, str, tuple of ints or bytes

    def describe(self) -> str:
        v = self.value
        if isinstance(v, int):
            return f"{v:#x}"
        if isinstance(v, tuple):
            return " ".join(f"{x:#x}" for x in v)
        return str(v)


@dataclass
class ElfImage:
    path: Path
    data: bytes | mmap.mmap
    elf_class: int  # 32 or 64
    machine: int
    entry: int
    segments: list[Segment] = field(default_factory=list)
    notes: list[XenNote] = field(default_factory=list)
    # The file the ELF itself is in: `path`, or for a bzImage the vmlinux
    # pvhvm's cache keeps (None: only in memory).
    elf_path: Path | None = None
    # For a bzImage: how its payload was compressed ("lz4", "xz" …).
    compression: str | None = None

    @property
    def phys32_entry(self) -> int | None:
        for n in self.notes:
            if n.type == XEN_ELFNOTE_PHYS32_ENTRY:
                return n.value  # type: ignore[return-value]
        return None

    def note(self, name: str) -> XenNote | None:
        return next((n for n in self.notes if n.name == name), None)

    @property
    def phys_range(self) -> tuple[int, int]:
        loads = [s for s in self.segments if s.memsz]
        return min(s.paddr for s in loads), max(s.paddr + s.memsz for s in loads)

    def segment_bytes(self, seg: Segment) -> memoryview:
        """The segment's file bytes, without copying them."""
        return memoryview(self.data)[seg.offset : seg.offset + seg.filesz]


def _decode_note(ntype: int, desc: bytes) -> object:
    name = NOTE_NAMES.get(ntype, f"UNKNOWN_{ntype}")
    if name in STRING_NOTES:
        return desc.split(b"\0", 1)[0].decode("ascii", "replace")
    if name == "PHYS32_RELOC" and len(desc) % 4 == 0:
        return struct.unpack(f"<{len(desc) // 4}I", desc)  # align, min, max
    if name == "L1_MFN_VALID" and len(desc) % 8 == 0 and len(desc) > 8:
        return struct.unpack(f"<{len(desc) // 8}Q", desc)  # mask, value
    if len(desc) in (1, 2, 4, 8):
        return int.from_bytes(desc, "little")
    return desc


def _parse_notes(blob: bytes, out: list[XenNote]) -> None:
    off = 0
    while off + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, off)
        off += 12
        name = blob[off : off + namesz]
        off += (namesz + 3) & ~3
        desc = blob[off : off + descsz]
        off += (descsz + 3) & ~3
        if len(desc) != descsz or len(name) != namesz:
            raise BuildError("truncated ELF note")
        if name.rstrip(b"\0") == b"Xen":
            out.append(XenNote(ntype, NOTE_NAMES.get(ntype, f"UNKNOWN_{ntype}"), desc, _decode_note(ntype, desc)))


def parse_elf(data: bytes | mmap.mmap, path: Path = Path("<memory>")) -> ElfImage:
    if len(data) < 52 or data[:4] != b"\x7fELF":
        raise BuildError(f"{path}: not an ELF file")
    ei_class, ei_data = data[4], data[5]
    if ei_data != 1:
        raise BuildError(f"{path}: not a little-endian ELF file")
    try:
        if ei_class == 2:
            (_, machine, _, entry, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _) = struct.unpack_from(
                "<HHIQQQIHHHHHH", data, 16
            )
            ph_fmt, sh_fmt = "<IIQQQQQQ", "<IIQQQQIIQQ"
        elif ei_class == 1:
            (_, machine, _, entry, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _) = struct.unpack_from(
                "<HHIIIIIHHHHHH", data, 16
            )
            ph_fmt, sh_fmt = "<IIIIIIII", "<IIIIIIIIII"
        else:
            raise BuildError(f"{path}: unknown ELF class {ei_class}")
        if machine not in (EM_X86_64, EM_386):
            raise BuildError(f"{path}: not an x86 ELF file (machine {machine})")
        img = ElfImage(path, data, 64 if ei_class == 2 else 32, machine, entry)
        note_blobs = []
        for i in range(phnum):
            f = struct.unpack_from(ph_fmt, data, phoff + i * phentsize)
            if ei_class == 2:
                p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _ = f
            else:
                p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, _ = f
            if p_type == PT_LOAD:
                if p_offset + p_filesz > len(data) or p_filesz > p_memsz:
                    raise BuildError(f"{path}: PT_LOAD segment {i} lies outside the file")
                img.segments.append(Segment(p_paddr, p_vaddr, p_offset, p_filesz, p_memsz, p_flags))
            elif p_type == PT_NOTE:
                note_blobs.append(data[p_offset : p_offset + p_filesz])
        if not note_blobs and shoff:
            for i in range(shnum):
                f = struct.unpack_from(sh_fmt, data, shoff + i * shentsize)
                sh_type, sh_offset, sh_size = f[1], f[4], f[5]
                if sh_type == SHT_NOTE:
                    note_blobs.append(data[sh_offset : sh_offset + sh_size])
        for blob in note_blobs:
            _parse_notes(blob, img.notes)
    except struct.error:
        raise BuildError(f"{path}: truncated ELF file") from None
    if not img.segments:
        raise BuildError(f"{path}: no loadable segments")
    return img


def load_elf(path: str | Path) -> ElfImage:
    """The kernel at `path`: an ELF (vmlinux), or a bzImage (vmlinuz) whose
    payload is one. Raises a one-line BuildError."""
    p = Path(path)
    try:
        # Mapped, not read: a distribution vmlinux is tens of MB, and only its
        # headers are parsed here; the segments are copied once, into RAM.
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except FileNotFoundError:
        raise BuildError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise BuildError(f"{p}: is a directory") from None
    except OSError as e:
        raise BuildError(f"{p}: cannot read: {e.strerror}") from None
    if data[:4] != b"\x7fELF":
        from .bzimage import is_bzimage, kernel_of_bzimage

        if is_bzimage(data):
            # A distribution's vmlinuz: the ELF is its compressed payload.
            elf_path, elf, compression = kernel_of_bzimage(p, data)
            img = parse_elf(elf, p)
            img.elf_path, img.compression = elf_path, compression
            return img
    img = parse_elf(data, p)
    img.elf_path = p
    return img
