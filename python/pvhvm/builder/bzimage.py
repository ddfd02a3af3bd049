"""The kernel ELF inside a bzImage (a distribution's /boot/vmlinuz-*).

A bzImage is real-mode setup code, then a compressed payload that
decompresses to vmlinux, the ELF whose notes carry the PVH entry point
(Linux's Documentation/arch/x86/boot.rst: the "HdrS" header at 0x202,
version 2.08+ names the payload's offset and length at 0x248). The payload
is found by that header or by its compression's magic, and decompressed with
the matching command line tool; the first output that is a whole x86 ELF
wins. A tool's exit status is not trusted: the kernel appends the
uncompressed size after the payload, and e.g. lz4 exits 1 on it.

`kernel_of_bzimage` keeps what it decompressed in pvhvm's cache, named by
the bzImage's hash: decompressing Debian's amd64 kernel (lz4) takes 0.2 s and
gives 50 MiB, its i386 one (xz) 0.45 s, so a later boot maps the cached
vmlinux (clean page cache, shared, not 50 MiB of private RSS per domain)
after hashing the bzImage in tens of milliseconds.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError


@dataclass(frozen=True)
class PayloadFormat:
    name: str
    magic: bytes
    decompress: tuple[str, ...]  # reads stdin, writes stdout
    package: str  # the Debian package with that tool


# The compressions a bzImage payload can use that have a CLI on Debian.
PAYLOAD_FORMATS = (
    PayloadFormat("lz4", b"\x02\x21\x4c\x18", ("lz4", "-d", "-c"), "lz4"),  # legacy frames
    PayloadFormat("xz", b"\xfd7zXZ\x00", ("xz", "-d", "-c", "--single-stream"), "xz-utils"),
    PayloadFormat("gzip", b"\x1f\x8b\x08", ("gzip", "-d", "-c"), "gzip"),
    PayloadFormat("zstd", b"\x28\xb5\x2f\xfd", ("zstd", "-d", "-c"), "zstd"),
)
# Kernel payload compressions (CONFIG_KERNEL_*) pvhvm does not undo, named in its error.
OTHER_COMPRESSIONS = ((b"BZh", "bzip2"), (b"\x5d\x00\x00", "lzma"), (b"\x89LZO", "lzo"))
MAX_PAYLOAD_ATTEMPTS = 16  # a 3-byte magic also occurs by chance
CACHE_KEPT = 4  # bzImages whose vmlinux stays in the cache (each tens of MiB)


def is_bzimage(data) -> bool:
    """The boot sector's signature and the setup header's "HdrS"."""
    return len(data) >= 0x206 and data[0x1FE:0x200] == b"\x55\xaa" and data[0x202:0x206] == b"HdrS"


def header_payload(data) -> tuple[int, int] | None:
    """(offset, length) of the compressed payload per the boot protocol header
    (version 2.08+), or None if this is not such a bzImage."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", data, 0x206)[0] < 0x208:
        return None
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    return (start, payload_length) if start + payload_length <= len(data) else None


def payload_candidates(data) -> list[tuple[PayloadFormat, int, int]]:
    """(format, start, end) to try: the header's payload first, then every
    place a known magic occurs, in file order."""
    candidates = []
    header = header_payload(data)
    if header:
        start, length = header
        for fmt in PAYLOAD_FORMATS:
            if data[start : start + len(fmt.magic)] == fmt.magic:
                candidates.append((fmt, start, start + length))
    found = []
    for fmt in PAYLOAD_FORMATS:
        at = data.find(fmt.magic)
        while at >= 0:
            found.append((at, fmt))
            at = data.find(fmt.magic, at + 1)
    for at, fmt in sorted(found, key=lambda hit: hit[0]):
        if not any(at == start for _, start, _ in candidates):
            candidates.append((fmt, at, len(data)))
    return candidates[:MAX_PAYLOAD_ATTEMPTS]


def _is_x86_elf(data: bytes) -> bool:
    from .elf import parse_elf

    if data[:4] != b"\x7fELF":
        return False
    try:
        parse_elf(data)  # also catches a truncated image
    except BuildError:
        return False
    return True


def decompress_kernel(data, source: Path) -> tuple[bytes, str]:
    """The kernel ELF in bzImage `data` and its payload's compression ("lz4",
    "xz", "gzip" or "zstd"), or a one-line BuildError about `source`."""
    missing = {}
    tried = []
    for fmt, start, end in payload_candidates(data):
        if shutil.which(fmt.decompress[0]) is None:
            missing[fmt.decompress[0]] = fmt.package
            continue
        out = subprocess.run(fmt.decompress, input=data[start:end], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL).stdout
        if _is_x86_elf(out):
            return out, fmt.name
        tried.append(fmt.name)
    if missing:
        tools = ", ".join(sorted(missing))
        raise BuildError(f"{source}: no kernel ELF decompressed; missing tools: {tools} "
                         f"(Debian: apt-get install {' '.join(sorted(set(missing.values())))})")
    if tried:
        raise BuildError(f"{source}: no kernel ELF in its compressed payload (tried {', '.join(dict.fromkeys(tried))})")
    header = header_payload(data)
    if header:
        head = bytes(data[header[0] : header[0] + 4])
        name = next((n for magic, n in OTHER_COMPRESSIONS if head.startswith(magic)), None)
        what = name or f"unknown, magic {head.hex(' ')}"
        known = ", ".join(f.name for f in PAYLOAD_FORMATS)
        raise BuildError(f"{source}: no compressed kernel payload found: its compression ({what}) "
                         f"is not one pvhvm decompresses ({known})")
    raise BuildError(f"{source}: no compressed kernel payload found")


def kernel_of_bzimage(path: Path, data) -> tuple[Path | None, bytes | mmap.mmap, str]:
    """(the file holding the kernel ELF, its bytes, the payload's compression)
    for the bzImage `data` read from `path`: the cached vmlinux, mapped, or
    decompressed now and cached. With no writable cache the ELF stays in
    memory and the file is None."""
    from ..images import cache_dir

    key = hashlib.sha256(data).hexdigest()[:32]
    where = cache_dir() / "bzimage"
    for cached in where.glob(f"{key}.*.vmlinux"):
        try:
            with open(cached, "rb") as f:
                elf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            continue
        try:
            os.utime(cached)  # recently used: kept by the pruning below
        except OSError:
            pass  # a read-only cache still serves
        return cached, elf, cached.name.split(".")[1]
    elf, compression = decompress_kernel(data, path)
    target = where / f"{key}.{compression}.vmlinux"
    try:
        where.mkdir(parents=True, exist_ok=True)
        # A unique name, then a rename: another process may be writing the same one.
        fd, tmp = tempfile.mkstemp(dir=where, prefix=f".{key}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(elf)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        _prune(where, target)
        with open(target, "rb") as f:
            return target, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), compression
    except OSError:
        return None, elf, compression


def _prune(where: Path, newest: Path) -> None:
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    others = sorted((p for p in where.glob("*.vmlinux") if p != newest), key=mtime, reverse=True)
    for old in others[CACHE_KEPT - 1 :]:
        old.unlink(missing_ok=True)


__all__ = ["PAYLOAD_FORMATS", "PayloadFormat", "decompress_kernel", "header_payload", "is_bzimage",
           "kernel_of_bzimage", "payload_candidates"]
