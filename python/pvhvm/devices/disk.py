"""Disk images for blkback: the `--disk` spec, the virtual device names,
and opening an image the way a toolstack must (exclusively, or refused).

Specs, as `pvhvm boot --disk` and `Domain(disks=[...])` take them:

* ours: ``PATH[,ro][,vdev=xvdb]``;
* xl's (xl-disk-configuration.pandoc): ``format=raw, vdev=xvda,
  access=rw, target=PATH``, keys in any order; ``target`` last, since it
  may contain commas. Positional xl specs (``PATH,raw,xvda,rw``) too.

Only raw images (sparse files welcome); other formats are recognised by
their magic and refused with a one-line error naming what is supported.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError

SECTOR = 512
XEN_XVD_MAJOR = 202  # Linux's major for xvd* (the vdev numbers xl writes)

# (magic at offset 0, name) of image formats that are not raw.
_FORMAT_MAGIC = (
    (b"QFI\xfb", "qcow2"),
    (b"KDMV", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vhd"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
)


class DiskError(BuildError):
    """A disk spec or image pvhvm cannot use (one line)."""


@dataclass(frozen=True)
class DiskSpec:
    path: Path
    readonly: bool = False
    vdev: str | None = None  # None: the next free xvdX
    cdrom: bool = False

    def with_vdev(self, vdev: str) -> "DiskSpec":
        return DiskSpec(self.path, self.readonly, vdev, self.cdrom)


def parse_disk_spec(spec: "str | DiskSpec | os.PathLike") -> DiskSpec:
    """A DiskSpec from one of the spellings in the module doc."""
    if isinstance(spec, DiskSpec):
        return spec
    if isinstance(spec, os.PathLike):
        return DiskSpec(Path(spec))
    text = spec.strip()
    if not text:
        raise DiskError("empty disk spec")
    target = None
    m = re.search(r"(?:^|,)\s*target\s*=\s*(.*)$", text)
    if m:  # xl: target= is last and takes the rest
        target = m.group(1).strip()
        text = text[: m.start()]
    words = [w.strip() for w in text.split(",") if w.strip()]
    readonly, vdev, cdrom, fmt = False, None, False, "raw"
    positional: list[str] = []
    for w in words:
        key, eq, value = w.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if not eq:
            if key in ("ro", "r"):
                readonly = True
            elif key in ("rw", "w"):
                readonly = False
            elif key == "cdrom":
                cdrom = readonly = True
            else:
                positional.append(w)
            continue
        if key == "vdev":
            vdev = value
        elif key in ("access", "mode"):
            if value not in ("ro", "r", "rw", "w"):
                raise DiskError(f"disk spec {spec!r}: access must be ro or rw, not {value!r}")
            readonly = value in ("ro", "r")
        elif key == "format":
            fmt = value.lower()
        elif key == "devtype":
            if value not in ("disk", "cdrom"):
                raise DiskError(f"disk spec {spec!r}: devtype must be disk or cdrom, not {value!r}")
            cdrom = value == "cdrom"
            readonly = readonly or cdrom
        elif key == "backendtype":
            if value not in ("phy", "qdisk", "tap"):
                raise DiskError(f"disk spec {spec!r}: unknown backendtype {value!r}")
        else:
            raise DiskError(f"disk spec {spec!r}: unknown key {key!r} "
                            "(use PATH[,ro][,vdev=xvdb] or xl's format=, vdev=, access=, target=)")
    if not target:
        if not positional:
            raise DiskError(f"disk spec {spec!r} names no image")
        target = positional.pop(0)
    # xl positional: target, format, vdev, access
    if positional and positional[0] in ("raw", "qcow", "qcow2", "vhd", "vmdk"):
        fmt = positional.pop(0)
    if positional and vdev is None and _VDEV.match(positional[0]):
        vdev = positional.pop(0)
    if positional:
        raise DiskError(f"disk spec {spec!r}: cannot make sense of {', '.join(positional)!r}")
    if fmt != "raw":
        raise DiskError(f"disk spec {spec!r}: format {fmt} is not supported (raw images only)")
    if vdev is not None:
        vdev_number(vdev)  # checked now, for a one-line error
    return DiskSpec(Path(target), readonly, vdev, cdrom)


_VDEV = re.compile(r"^xvd([a-z]+)$")


def vdev_index(vdev: str) -> int:
    """xvda -> 0, xvdz -> 25, xvdaa -> 26 …"""
    m = _VDEV.match(vdev)
    if not m:
        raise DiskError(f"bad virtual device {vdev!r}: expected xvda, xvdb, …")
    n = 0
    for c in m.group(1):
        n = n * 26 + (ord(c) - ord("a") + 1)
    return n - 1


def vdev_name(index: int) -> str:
    name = ""
    n = index + 1
    while n:
        n, r = divmod(n - 1, 26)
        name = chr(ord("a") + r) + name
    return "xvd" + name


def vdev_number(vdev: str) -> int:
    """The virtual-device number xl writes (docs/misc/vbd-interface.txt):
    202 << 8 | disk << 4 for xvda..xvdp, 1 << 28 | disk << 8 beyond."""
    index = vdev_index(vdev)
    if index < 16:
        return (XEN_XVD_MAJOR << 8) | (index << 4)
    if index < (1 << 20):
        return (1 << 28) | (index << 8)
    raise DiskError(f"virtual device {vdev!r} is out of range")


def assign_vdevs(specs: list[DiskSpec]) -> list[DiskSpec]:
    """Give specs without a vdev the next free xvdX, in order; refuse two
    disks on one vdev."""
    taken = {s.vdev for s in specs if s.vdev is not None}
    out = []
    nxt = 0
    for s in specs:
        if s.vdev is None:
            while vdev_name(nxt) in taken:
                nxt += 1
            s = s.with_vdev(vdev_name(nxt))
            taken.add(s.vdev)
        out.append(s)
    seen: set[str] = set()
    for s in out:
        if s.vdev in seen:
            raise DiskError(f"two disks on {s.vdev}")
        seen.add(s.vdev)
    return out


class DiskImage:
    """An open raw image: its descriptor, size in sectors, and the lock that
    keeps a second writer off it while the domain lives (xl takes one too)."""

    def __init__(self, spec: DiskSpec) -> None:
        path = spec.path
        flags = (os.O_RDONLY if spec.readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise DiskError(f"{path}: no such disk image") from None
        except IsADirectoryError:
            raise DiskError(f"{path}: disk image is a directory") from None
        except PermissionError:
            if not spec.readonly and os.access(path, os.R_OK):
                raise DiskError(f"{path}: disk image is read-only; give it as {path},ro") from None
            raise DiskError(f"{path}: permission denied") from None
        except OSError as e:
            if e.errno == errno.EROFS:
                raise DiskError(f"{path}: disk image is on a read-only file system; give it as {path},ro") from None
            raise DiskError(f"{path}: cannot open disk image: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise DiskError(f"{path}: disk image is a directory")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise DiskError(f"{path}: not a regular file or block device")
            if not spec.readonly and not st.st_mode & 0o222:
                # root may open it for writing anyway; the owner said read-only.
                raise DiskError(f"{path}: disk image is read-only; give it as {path},ro")
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if spec.readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DiskError(f"{path}: disk image is in use by another "
                                f"{'writer' if spec.readonly else 'domain or program'} (locked)") from None
            size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
            head = os.pread(fd, 64, 0)
            for magic, name in _FORMAT_MAGIC:
                if head.startswith(magic):
                    raise DiskError(f"{path}: a {name} image; only raw images are supported "
                                    f"(convert it: qemu-img convert -O raw)")
            if size < SECTOR:
                raise DiskError(f"{path}: disk image is smaller than one 512-byte sector")
        except BaseException:
            os.close(fd)
            raise
        self.spec = spec
        self.path = path
        self.fd = fd
        self.readonly = spec.readonly
        self.sectors = size // SECTOR
        self.regular = stat.S_ISREG(st.st_mode)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the lock goes with it
            self.fd = -1

    def __del__(self) -> None:
        if hasattr(self, "fd"):
            self.close()

    def __repr__(self) -> str:
        return f"<DiskImage {self.path} {self.sectors} sectors{' ro' if self.readonly else ''}>"


__all__ = ["DiskError", "DiskImage", "DiskSpec", "SECTOR", "assign_vdevs", "parse_disk_spec", "vdev_name",
           "vdev_number"]
