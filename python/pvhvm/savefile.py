"""The save file: one domain at one instant, as `Domain.save` writes it and
`Domain.restore` reads it (docs/architecture.md, "The save file").

    header   one page: magic, format, architecture, where each part is and
             its CRC-32, the header's own CRC-32
    RAM      from the second page, the guest's RAM as one image, pages of
             zeros left as holes (a sparse file); mapped copy-on-write on
             restore, so only the pages the guest touches are read
    core     the Rust core's record (vCPUs, event channels, grant table,
             timers, HVM params; versioned on its own)
    meta     JSON: the domain's settings, xenstore, the console and device
             backends, the RAM image's page runs and CRC

RAM comes before the records so that a truncated file loses a record first,
and every part is checked before anything starts: a short, damaged,
foreign-version or foreign-architecture file is refused with one line.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import PvhvmError

MAGIC = b"PVHVMSAV"
FORMAT = 1
ARCH = b"x86_64-pvh"
PAGE = 4096

# magic, format, arch, ram_off, ram_len, core_off, core_len, core_crc,
# meta_off, meta_len, meta_crc; then the CRC-32 of those bytes.
_HEADER = struct.Struct("<8sI16sQQQQIQQI")
_HEADER_CRC = struct.Struct("<I")


class SaveFileError(PvhvmError):
    """A save file that cannot be restored (the message says why)."""


@dataclass
class SaveImage:
    """A checked save file, open: RAM is mapped from `fd` at `ram_offset`."""

    path: Path
    fd: int
    ram_offset: int
    ram_length: int
    core: bytes
    meta: dict

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write(path: str | os.PathLike, vm, core: bytes, meta: dict) -> int:
    """Write a save of `vm` (its RAM) with the core record and `meta`;
    returns the file's size. The file is written beside `path` and renamed
    over it, so a failed save leaves no half file behind."""
    path = Path(path)
    ram_len = len(vm.memory)
    ram_off = PAGE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, ram_off + ram_len)
        runs, ram_crc = vm.write_ram_image(fd, ram_off)
        meta = dict(meta, ram={"runs": [list(r) for r in runs], "crc": ram_crc})
        blob = json.dumps(meta, separators=(",", ":")).encode()
        core_off = ram_off + ram_len
        meta_off = core_off + len(core)
        _pwrite_all(fd, core, core_off)
        _pwrite_all(fd, blob, meta_off)
        head = _HEADER.pack(MAGIC, FORMAT, ARCH, ram_off, ram_len, core_off, len(core), zlib.crc32(core),
                            meta_off, len(blob), zlib.crc32(blob))
        _pwrite_all(fd, head + _HEADER_CRC.pack(zlib.crc32(head)), 0)
        os.fsync(fd)
        size = meta_off + len(blob)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    return size


def read(path: str | os.PathLike) -> SaveImage:
    """Open and check a save file (everything but the RAM's CRC, which the
    core checks as it maps the image). SaveFileError if it cannot be used."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SaveFileError(f"{path}: {e.strerror}") from None
    try:
        return _check(path, fd)
    except BaseException:
        os.close(fd)
        raise


def _check(path: Path, fd: int) -> SaveImage:
    size = os.fstat(fd).st_size
    head = os.pread(fd, _HEADER.size + _HEADER_CRC.size, 0)
    if len(head) < 8 or head[:8] != MAGIC:
        raise SaveFileError(f"{path}: not a pvhvm save file")
    if len(head) < _HEADER.size + _HEADER_CRC.size:
        raise SaveFileError(f"{path}: truncated (the header ends early)")
    fields = _HEADER.unpack_from(head)
    (crc,) = _HEADER_CRC.unpack_from(head, _HEADER.size)
    if zlib.crc32(head[: _HEADER.size]) != crc:
        raise SaveFileError(f"{path}: damaged (the header's checksum does not match)")
    _, fmt, arch, ram_off, ram_len, core_off, core_len, core_crc, meta_off, meta_len, meta_crc = fields
    if fmt != FORMAT:
        raise SaveFileError(f"{path}: save format {fmt}; this pvhvm reads format {FORMAT}")
    if arch.rstrip(bytes(1)) != ARCH:
        raise SaveFileError(f"{path}: saved on {arch.rstrip(bytes(1)).decode('ascii', 'replace')!r}; "
                            f"this pvhvm restores {ARCH.decode()!r}")
    if ram_off % PAGE or ram_off < PAGE or ram_len % PAGE or ram_len == 0:
        raise SaveFileError(f"{path}: damaged (RAM image at {ram_off:#x}+{ram_len:#x})")
    end = max(ram_off + ram_len, core_off + core_len, meta_off + meta_len)
    if size < end:
        raise SaveFileError(f"{path}: truncated ({size} bytes of {end})")
    core = os.pread(fd, core_len, core_off)
    blob = os.pread(fd, meta_len, meta_off)
    if len(core) != core_len or zlib.crc32(core) != core_crc:
        raise SaveFileError(f"{path}: damaged (the core state's checksum does not match)")
    if len(blob) != meta_len or zlib.crc32(blob) != meta_crc:
        raise SaveFileError(f"{path}: damaged (the domain record's checksum does not match)")
    try:
        meta = json.loads(blob)
    except ValueError as e:
        raise SaveFileError(f"{path}: damaged (domain record: {e})") from None
    if not isinstance(meta, dict):
        raise SaveFileError(f"{path}: damaged (domain record is not an object)")
    return SaveImage(path, fd, ram_off, ram_len, core, meta)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


__all__ = ["SaveFileError", "SaveImage", "write", "read", "MAGIC", "FORMAT", "ARCH"]
