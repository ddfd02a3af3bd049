"""Debian's userspace tools for the default guest: the xenstore command line
tools (xenstore-read, -write, -ls, ...) with every shared library they need,
as extra files for the busybox initramfs of pvhvm.images.

The tools, their libraries and the C library all come from Debian packages
(bookworm, the same release as the guest kernel and busybox), fetched with
`apt-get download` and unpacked into pvhvm.images.cache_dir(); nothing is
taken from the host. Which libraries are needed is read from the binaries'
ELF headers (PT_INTERP and the DT_NEEDED entries, followed transitively).

    >>> from pvhvm.guest_tools import prepare_xenstore_guest
    >>> guest = prepare_xenstore_guest()  # a shell on hvc0 with the tools
    >>> dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0")

How the tools reach xenstore in the guest: libxenstore first tries xenstored's
Unix socket (absent in a domU), then the xenbus device, /dev/xen/xenbus if it
exists, else /proc/xen/xenbus ($XENSTORED_PATH overrides both). In Debian's
cloud kernel the xenbus frontend device is built in, so devtmpfs gives
/dev/xen/xenbus with nothing else to do; xenfs (/proc/xen) is a module
(CONFIG_XENFS=m, pulled in with modules=XENSTORE_MODULES) that
XENSTORE_SETUP loads and mounts too, for tools that insist on /proc/xen.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from . import images
from .errors import BuildError

# xenstore-utils ships one multi-call binary, /usr/bin/xenstore, hard-linked
# under each command name (it dispatches on argv[0]); the libraries it needs:
# libxenstore4 -> libxentoolcore1 -> libc6 (-> libgcc-s1, see below).
XENSTORE_PACKAGES = ("xenstore-utils", "libxenstore4", "libxentoolcore1", "libc6", "libgcc-s1")
# Loaded with dlopen, so in no DT_NEEDED: glibc's pthread_cancel needs the
# unwinder, and libxenstore cancels its reader thread in xs_close() once a
# watch was set (xenstore-watch -n N aborts without it).
DLOPENED_LIBRARIES = ("libgcc_s.so.1",)
XENSTORE_MULTICALL = "usr/bin/xenstore"
XENSTORE_COMMANDS = (
    "xenstore",
    "xenstore-chmod",
    "xenstore-exists",
    "xenstore-list",
    "xenstore-ls",
    "xenstore-read",
    "xenstore-rm",
    "xenstore-watch",
    "xenstore-write",
)
# xenfs (/proc/xen) is a module in Debian's cloud kernel.
XENSTORE_MODULES = ("xenfs",)

# Shell lines for the guest's init: /dev/xen/xenbus comes from devtmpfs (the
# kernel's built-in xenbus frontend device); /proc/xen/xenbus needs xenfs.
# Expects /proc and /dev mounted.
XENSTORE_SETUP = """\
export PATH=/bin:/usr/bin
modprobe xenfs
mkdir -p /proc/xen
mount -t xenfs xenfs /proc/xen
"""

XENSTORE_INIT = f"""\
#!/bin/sh
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{XENSTORE_SETUP}echo PVHVM-XENSTORE-READY
setsid cttyhack sh
poweroff -f
"""

# Where the dynamic loader looks when there is no /etc/ld.so.cache (Debian's
# multiarch dirs first), and so where libraries are placed in the guest.
LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")

MANIFEST = "xenstore-tools.json"

# --------------------------------------------------------------------------- ELF

PT_DYNAMIC = 2
PT_INTERP = 3
PT_LOAD = 1
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5


def elf_dependencies(data: bytes, what: str = "<memory>") -> tuple[str | None, list[str]]:
    """(PT_INTERP path or None, DT_NEEDED sonames) of an x86-64 ELF64 file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"{what}: not a little-endian ELF64 file")
    try:
        phoff, = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        interp = None
        dynamic = None
        loads = []
        for i in range(phnum):
            p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from(
                "<IIQQQQQQ", data, phoff + i * phentsize)
            if p_type == PT_INTERP:
                interp = data[p_offset : p_offset + p_filesz].split(b"\0")[0].decode()
            elif p_type == PT_DYNAMIC:
                dynamic = (p_offset, p_filesz)
            elif p_type == PT_LOAD:
                loads.append((p_vaddr, p_offset, p_filesz))
        if dynamic is None:
            return interp, []  # static
        needed_offsets = []
        strtab_vaddr = None
        offset, size = dynamic
        for pos in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                needed_offsets.append(value)
            elif tag == DT_STRTAB:
                strtab_vaddr = value
        if strtab_vaddr is None:
            raise BuildError(f"{what}: dynamic section without DT_STRTAB")
        strtab = next((off + strtab_vaddr - va for va, off, sz in loads if va <= strtab_vaddr < va + sz), None)
        if strtab is None:
            raise BuildError(f"{what}: DT_STRTAB outside every PT_LOAD segment")
        needed = [data[strtab + n : data.index(b"\0", strtab + n)].decode() for n in needed_offsets]
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as e:
        raise BuildError(f"{what}: malformed ELF file ({e})") from None
    return interp, needed


# --------------------------------------------------------------------------- package trees


def _inside(tree: Path, path: str, hops: int = 0) -> Path | None:
    """`path` (absolute in the package's filesystem) within the unpacked
    `tree`, following symlinks as if `tree` were the root; None if absent."""
    parts = [p for p in path.split("/") if p and p != "."]
    current: list[str] = []
    while parts:
        part = parts.pop(0)
        if part == "..":
            if current:
                current.pop()
            continue
        candidate = tree.joinpath(*current, part)
        if candidate.is_symlink():
            if hops > 40:
                return None
            target = str(candidate.readlink())
            base = [] if target.startswith("/") else current
            resolved = _inside(tree, "/".join(base + [target]), hops + 1)
            if resolved is None:
                return None
            current = list(resolved.relative_to(tree).parts)
            continue
        if not candidate.exists():
            return None
        current.append(part)
    return tree.joinpath(*current)


def _find(trees: Sequence[Path], path: str) -> bytes | None:
    for tree in trees:
        found = _inside(tree, path)
        if found is not None and found.is_file():
            return found.read_bytes()
    return None


def _read_manifest(root: Path) -> list[images.DebPackage] | None:
    try:
        pinned = [images.DebPackage(**p) for p in json.loads((root / MANIFEST).read_text())["packages"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pinned if [p.name for p in pinned] == list(XENSTORE_PACKAGES) else None


def xenstore_packages(force: bool = False) -> list[images.DebPackage]:
    """The pinned versions of XENSTORE_PACKAGES: resolved with apt once and
    kept in the cache's xenstore-tools.json (force=True resolves again)."""
    root = images.cache_dir()
    pinned = None if force else _read_manifest(root)
    if pinned:
        return pinned
    images.ensure_apt_lists(XENSTORE_PACKAGES[0])
    packages = [images.resolve_package(name) for name in XENSTORE_PACKAGES]
    manifest = {"packages": [asdict(p) for p in packages]}
    images._write_atomically(root / MANIFEST, json.dumps(manifest, indent=2).encode())
    return packages


def collect_elf_files(
    trees: Sequence[Path], paths: Iterable[str], libraries: Iterable[str] = ()
) -> dict[str, bytes]:
    """The ELF files at `paths` (absolute paths in the packages' filesystem)
    and, transitively, their dynamic loader and every DT_NEEDED library, plus
    the `libraries` (sonames: ones loaded with dlopen), looked up in `trees`
    (unpacked packages, first wins) as the loader would without an
    ld.so.cache. Returns initramfs path (no leading slash) -> content;
    symlinks are resolved, each library lands at its soname."""
    files: dict[str, bytes] = {}
    queue: list[tuple[str, bytes]] = []
    provided: set[str] = set()
    for soname in libraries:
        queue.append(_library(trees, soname, "dlopen", files, provided))
    for path in paths:
        data = _find(trees, path)
        if data is None:
            raise BuildError(f"{path}: not found in {', '.join(t.name for t in trees)}")
        files[path.strip("/")] = data
        queue.append((path, data))
    while queue:
        path, data = queue.pop(0)
        interp, needed = elf_dependencies(data, path)
        if interp and interp.strip("/") not in files:
            loader = _find(trees, interp)
            if loader is None:
                raise BuildError(f"{path}: its loader {interp} is in none of the packages")
            files[interp.strip("/")] = loader
            provided.add(interp.rpartition("/")[2])
        for soname in needed:
            if soname not in provided:  # libc.so.6 needs ld-linux-x86-64.so.2, the loader itself
                queue.append(_library(trees, soname, path, files, provided))
    return files


def _library(trees: Sequence[Path], soname: str, user: str, files: dict[str, bytes], provided: set[str]):
    """Add library `soname` to `files` from the first LIBRARY_DIRS that has it."""
    for libdir in LIBRARY_DIRS:
        lib = _find(trees, f"/{libdir}/{soname}")
        if lib is not None:
            files[f"{libdir}/{soname}"] = lib
            provided.add(soname)
            return f"/{libdir}/{soname}", lib
    raise BuildError(f"{user} needs {soname}, which none of the packages has")


def xenstore_tools_files(force: bool = False) -> dict[str, bytes]:
    """Debian's xenstore tools for the guest initramfs, as extra_files for
    pvhvm.images.prepare_default_guest: archive path -> content.

    It holds usr/bin/xenstore and a copy of it under every command name
    (xenstore-read, -write, -ls, -list, -rm, -watch, -chmod, -exists: the
    binary dispatches on its name), libxenstore.so.4, libxentoolcore.so.1,
    libc.so.6, lib64/ld-linux-x86-64.so.2 and libgcc_s.so.1 (which glibc
    loads when a thread is cancelled), at the paths Debian gives them.
    Put /usr/bin in the guest's PATH. The first call downloads
    XENSTORE_PACKAGES (about 4 MB) into the cache; later calls read the
    cache only. force=True resolves and downloads them again."""
    root = images.cache_dir()
    trees = [images.fetch_package(p, root, force) for p in xenstore_packages(force)]
    files = collect_elf_files(trees, ["/" + XENSTORE_MULTICALL], DLOPENED_LIBRARIES)
    binary = files[XENSTORE_MULTICALL]
    for name in XENSTORE_COMMANDS:
        files[f"usr/bin/{name}"] = binary
    return files


def prepare_xenstore_guest(
    init_script: str | None = None,
    modules: Sequence[str] = (),
    force: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
) -> images.GuestFiles:
    """The default guest with the xenstore tools and the xenfs module.
    The default init (XENSTORE_INIT) mounts /proc, /sys, /dev and xenfs,
    prints PVHVM-XENSTORE-READY and runs a shell on the console; poweroff
    when it exits."""
    files = xenstore_tools_files(force)
    files.update(extra_files or {})
    wanted = list(XENSTORE_MODULES) + [m for m in modules if m not in XENSTORE_MODULES]
    return images.prepare_default_guest(
        XENSTORE_INIT if init_script is None else init_script, modules=wanted, force=force, extra_files=files
    )
