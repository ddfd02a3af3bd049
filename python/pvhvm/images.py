"""The default guest, prepared from Debian packages: the cloud kernel as an
uncompressed vmlinux (the PVH entry point lives in its ELF notes) and a
busybox initramfs written here as a cpio "newc" archive.

It comes in two architectures (GUEST_ARCHES): amd64, the default, with
linux-image-cloud-amd64, and i386 (a 32-bit guest) with linux-image-686-pae,
which Debian also builds with CONFIG_XEN_PVH. An i386 guest's packages are
looked up in apt lists of pvhvm's own (cache_dir()/apt/i386), so the host
needs no `dpkg --add-architecture`.

Packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x`
into cache_dir(), so nothing is installed on the host. Everything is cached:
once prepared, the default guest is reused (without asking apt anything)
until prepare_default_guest(force=True).

    >>> from pvhvm.images import prepare_default_guest
    >>> guest = prepare_default_guest()
    >>> guest.vmlinux, guest.initrd, guest.kernel_version
    >>> prepare_default_guest(arch="i386").vmlinux  # an ELF32 kernel
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .builder.bzimage import decompress_kernel
from .builder.bzimage import payload_candidates as _payload_candidates  # noqa: F401 (tests)
from .errors import BuildError

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"


@dataclass(frozen=True)
class GuestArch:
    """What differs between the default guests of two architectures."""

    name: str  # Debian's architecture name
    kernel_metapackage: str
    manifest: str  # the pinned packages, in cache_dir()
    elf_machine: int  # what the vmlinux must be: EM_X86_64 or EM_386


GUEST_ARCHES = {
    "amd64": GuestArch("amd64", KERNEL_METAPACKAGE, "default-guest.json", 62),
    # Debian's only i386 flavour with CONFIG_XEN_PVH (and PAE, which Xen's
    # 32-bit guests need); the plain 686 flavour has no Xen support.
    "i386": GuestArch("i386", "linux-image-686-pae", "default-guest-i386.json", 3),
}
DEFAULT_ARCH = "amd64"


def guest_arch(name: str) -> GuestArch:
    """The default guest's architecture called `name` (amd64 or i386)."""
    try:
        return GUEST_ARCHES[name]
    except KeyError:
        raise BuildError(f"unknown guest architecture {name!r}: use {' or '.join(GUEST_ARCHES)}") from None

# Kernel modules of the same package that every default guest carries: the
# network card's driver, and the disk drivers /init needs to mount a root=
# device (Debian builds all of them as modules): xen-blkfront for pvhvm and
# Xen, virtio_blk and virtio_pci for the same guest under QEMU.
DEFAULT_MODULES = ("xen-netfront", "xen-blkfront", "virtio_pci", "virtio_blk")

# What every /init of ours starts with: the kernel's file systems, then the
# marker that tests and benches wait for.
INIT_START = """\
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "PVHVM-INIT-OK uptime=$(cut -d' ' -f1 /proc/uptime)"
"""

CONSOLE_SIZE_FOLLOWER = r"""# The console's size, which hvc0 cannot carry: pvhvm writes "ROWS COLS" to
# console/pvhvm-winsize in the domain's xenstore home when a terminal is
# attached or resized (api.CONSOLE_SIZE_NODE). A watch on it through
# /dev/xen/xenbus, in the xenstore wire protocol (a header of four native,
# here little-endian, u32: type, request id, transaction id, payload length;
# XS_READ=2, XS_WATCH=4, XS_WATCH_EVENT=15, XS_ERROR=16), sets hvc0's size,
# and the kernel sends SIGWINCH to the shell on it. Forks are what costs in
# an emulated guest: messages are parsed in the shell, from one dd | od per
# read of the device (which returns whole messages, as many as are queued).
WINSIZE_NODE=console/pvhvm-winsize
octal() {  # BYTE: its three octal digits, in $octal
    octal=$(($1 >> 6 & 3))$(($1 >> 3 & 7))$(($1 & 7))
}
xs_send() {  # TYPE ARG...: one request whose payload is each ARG NUL-terminated
    octal "$1"
    xs_format='\'$octal'\000\000\000\000\000\000\000\000\000\000\000'
    shift
    xs_len=0
    for arg; do xs_len=$((xs_len + ${#arg} + 1)); done
    octal $((xs_len & 255))
    xs_format=$xs_format'\'$octal
    octal $((xs_len >> 8))
    xs_format=$xs_format'\'$octal'\000\000'
    for arg; do xs_format=$xs_format'%s\000'; done
    printf "$xs_format" "$@" >&3
}
xs_take() {  # the first whole message in $xs_bytes (decimal bytes) out: xs_type,
    set -- $xs_bytes  # and xs_body with its digits (anything else a space)
    [ $# -ge 16 ] || return 1
    xs_type=$(($1 | $2 << 8 | $3 << 16 | $4 << 24))
    xs_len=$((${13} | ${14} << 8 | ${15} << 16 | ${16} << 24))
    [ $# -ge $((16 + xs_len)) ] || return 1
    shift 16
    xs_body=""
    while [ $xs_len -gt 0 ]; do
        case $1 in
        4[89]|5[0-7]) xs_body=$xs_body$(($1 - 48)) ;;
        *) xs_body="$xs_body " ;;
        esac
        shift
        xs_len=$((xs_len - 1))
    done
    xs_bytes=$*
}
winsize_follow() {  # with winsize_once set, only until the first answer to a read
    while :; do
        while xs_take; do
            case $xs_type in
            15) xs_send 2 "$WINSIZE_NODE" ;;
            2)  set -- $xs_body
                [ $# = 2 ] && stty -F /dev/hvc0 rows "$1" cols "$2"
                [ -n "$winsize_once" ] && return ;;
            16) [ -n "$winsize_once" ] && return ;;  # no size (yet)
            esac
        done
        xs_more=$(dd bs=4096 count=1 <&3 2>/dev/null | od -An -tu1 -v)
        [ -n "$xs_more" ] || return
        xs_bytes="$xs_bytes $xs_more"
    done
}
follow_console_size() {
    [ -c /dev/xen/xenbus ] && [ -c /dev/hvc0 ] || return 0
    exec 3<>/dev/xen/xenbus || return 0
    xs_bytes=""
    # A new watch fires at once: its answer gives the shell its first size.
    xs_send 4 "$WINSIZE_NODE" winsize
    winsize_once=1
    winsize_follow
    winsize_once=""
    winsize_follow &
    exec 3<&-
}
"""

DEFAULT_INIT = "#!/bin/sh\n" + INIT_START + """\
# With root=DEV (/dev/xvda, LABEL=..., UUID=...): load the disk drivers, wait
# up to ~30 s for the device, mount it as the kernel would (ro unless rw,
# rootfstype= default ext4, rootflags=) and hand over to its init (init=,
# default /sbin/init). /dev, /proc and /sys move along, as systemd expects.
# If that fails, carry on below: a shell with pvhvm.shell, else power off.
set -f
root="" rootfstype=ext4 rootflags="" rootmode=ro init=/sbin/init
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    root=*) root=${arg#root=} ;;
    rootfstype=*) rootfstype=${arg#rootfstype=} ;;
    rootflags=*) rootflags=${arg#rootflags=} ;;
    ro|rw) rootmode=$arg ;;
    init=*) init=${arg#init=} ;;
    esac
done
set +f
if [ -n "$root" ]; then
    # Xen (and pvhvm) disks are xen-blkfront, elsewhere (QEMU) virtio. Only
    # /sys/hypervisor/type tells: /sys/bus/xen exists under QEMU too.
    if [ "$(cat /sys/hypervisor/type 2>/dev/null)" = xen ]; then
        modprobe xen-blkfront
    else
        modprobe -q virtio_pci
        modprobe -q virtio_blk
    fi
    dev="" tries=0
    while [ $tries -lt 150 ]; do
        case "$root" in
        *=*) dev=$(findfs "$root" 2>/dev/null) ;;
        *) [ -b "$root" ] && dev=$root ;;
        esac
        [ -n "$dev" ] && break
        sleep 0.2
        tries=$((tries + 1))
    done
    mkdir -p /newroot
    if [ -z "$dev" ]; then
        echo "PVHVM-INIT: root device $root did not appear; block devices:"
        cat /proc/partitions
    elif ! mount -t "$rootfstype" -o "$rootmode${rootflags:+,$rootflags}" "$dev" /newroot; then
        echo "PVHVM-INIT: cannot mount $dev ($rootfstype, $rootmode) for root=$root"
    elif [ ! -e "/newroot$init" ] && [ ! -L "/newroot$init" ]; then
        echo "PVHVM-INIT: $init not found on $dev"
        umount /newroot
    else
        echo "PVHVM-INIT: switching to $dev ($rootmode), init $init"
        for fs in dev proc sys; do mount -o move /$fs /newroot/$fs; done
        exec switch_root /newroot "$init"
    fi
fi
# With pvhvm.net (`pvhvm boot` adds it when the domain has a network card):
# load xen-netfront from this kernel's package and configure eth0 by DHCP.
case " $(cat /proc/cmdline) " in
*" pvhvm.net "*) modprobe xen-netfront && udhcpc -i eth0 -q -n -t 5 -T 2 ;;
esac
""" + CONSOLE_SIZE_FOLLOWER + """\
# With pvhvm.shell on the kernel command line (`pvhvm boot` adds it for this
# guest): an interactive shell on the console, with job control (setsid and
# cttyhack make the console its controlling tty), the console's size
# following pvhvm's terminal. It ends with `exit`, Ctrl-D (pvhvm sends one
# at the end of piped input) or `poweroff -f`.
case " $(cat /proc/cmdline) " in
*" pvhvm.shell "*) follow_console_size; setsid cttyhack sh ;;
esac
poweroff -f
"""

# Used only if the downloaded busybox cannot run here to list its applets.
FALLBACK_APPLETS = (
    "sh ash mount umount poweroff reboot echo cat ls uname sleep udhcpc ip ifconfig route insmod rmmod lsmod "
    "modprobe ping wget nc dmesg cut mkdir mknod ps kill grep sed tr head tail wc cp mv rm ln chmod true false "
    "test [ printf env hostname sync stat find xargs vi"
).split()

# Bump when the initrd layout changes, so cached initrds are rebuilt.
INITRD_FORMAT = 5  # bump when build_initramfs changes what it writes


def _progress(message: str) -> None:
    print(f"pvhvm: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where prepared guests live: $PVHVM_CACHE, else $XDG_CACHE_HOME/pvhvm,
    else ~/.cache/pvhvm."""
    if os.environ.get("PVHVM_CACHE"):
        return Path(os.environ["PVHVM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pvhvm"


def _write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    # A half-written file must never look like a cached result.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


# --------------------------------------------------------------------------- Debian packages


@dataclass(frozen=True)
class DebPackage:
    """One version of one binary package, as apt names it."""

    name: str
    version: str
    arch: str

    @property
    def deb_filename(self) -> str:
        """The file name `apt-get download` gives it (the epoch's colon is %3a)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"

    @property
    def tree_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '_')}_{self.arch}"


def _run(cmd: Sequence[str], what: str, cwd: Path | None = None) -> str:
    """Run a command and return its stdout; failures become a one-line BuildError."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError(f"{what}: `{cmd[0]}` not found (a Debian-based host is needed)") from None
    if proc.returncode != 0:
        raise BuildError(f"{what} failed: {_most_telling_line(proc.stderr + proc.stdout)}")
    return proc.stdout


def _most_telling_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["no output"])[-1]


def _host_arch() -> str:
    return _run(["dpkg", "--print-architecture"], "dpkg --print-architecture").strip()


def apt_options(arch: str, root: Path) -> list[str]:
    """apt-get/apt-cache options that make apt see `arch`'s packages: none
    for the host's own architecture; for another, that architecture alone
    with package lists and caches of our own under root/apt/<arch>, so the
    host's apt configuration and lists are left as they are."""
    if arch == _host_arch():
        return []
    own = root / "apt" / arch
    for d in (own / "lists" / "partial", own / "cache" / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    settings = {
        "APT::Architecture": arch,
        "APT::Architectures::": arch,  # "::" replaces the list rather than appending
        "Dir::State::Lists": str(own / "lists"),
        "Dir::Cache": str(own / "cache"),
    }
    return [opt for key, value in settings.items() for opt in ("-o", f"{key}={value}")]


def _apt_has_candidate(package: str, options: Sequence[str] = ()) -> bool:
    policy = _run(["apt-cache", *options, "policy", package], f"apt-cache policy {package}")
    match = re.search(r"Candidate:\s*(\S+)", policy)
    return bool(match) and match.group(1) != "(none)"


def ensure_apt_lists(package: str = KERNEL_METAPACKAGE, options: Sequence[str] = (), arch: str = "amd64") -> None:
    """Run `apt-get update` once if apt does not know `package` yet (fresh
    containers ship without package lists, and an architecture with lists of
    our own starts without any). An update that fails for some index (a
    mirror in mid-sync) is good enough if the package is known after it."""
    if _apt_has_candidate(package, options):
        return
    _progress(f"apt knows no {package} yet: running apt-get update")
    try:
        _run(["apt-get", *options, "update"], "apt-get update")
    except BuildError as e:
        if not _apt_has_candidate(package, options):
            raise
        _progress(f"{e} (carrying on: apt has {package})")
    if not _apt_has_candidate(package, options):
        raise BuildError(f"apt has no installable candidate for {package} (needs Debian main for {arch})")


def resolve_package(name: str, options: Sequence[str] = ()) -> DebPackage:
    """The candidate version apt would install for `name`."""
    fields = dict(re.findall(r"^(Package|Version|Architecture): (\S+)$", _apt_show(name, options), re.M))
    if not {"Package", "Version", "Architecture"} <= fields.keys():
        raise BuildError(f"apt-cache show {name}: no Package/Version/Architecture fields")
    return DebPackage(fields["Package"], fields["Version"], fields["Architecture"])


def _apt_show(name: str, options: Sequence[str] = ()) -> str:
    return _run(["apt-cache", *options, "show", "--no-all-versions", name], f"apt-cache show {name}")


def resolve_kernel_package(metapackage: str = KERNEL_METAPACKAGE, options: Sequence[str] = ()) -> DebPackage:
    """The versioned kernel image package (linux-image-<release>) that the
    metapackage's candidate depends on."""
    depends = re.search(r"^Depends: (.*)$", _apt_show(metapackage, options), re.M)
    names = re.findall(r"(linux-image-[\w.+-]+)", depends.group(1)) if depends else []
    if not names:
        raise BuildError(f"{metapackage} does not depend on a linux-image package")
    return resolve_package(names[0], options)


def fetch_package(package: DebPackage, root: Path, force: bool = False, options: Sequence[str] = ()) -> Path:
    """Download (apt-get download, no root needed) and unpack (dpkg-deb -x)
    one package under `root`; returns the unpacked tree. Both steps are
    skipped when their result is already there. `options` are apt's
    (apt_options() for a foreign architecture)."""
    debs, trees = root / "debs", root / "packages"
    deb, tree = debs / package.deb_filename, trees / package.tree_name
    if tree.is_dir() and not force:
        return tree
    if force or not deb.is_file():
        debs.mkdir(parents=True, exist_ok=True)
        _progress(f"downloading {package.name} {package.version}")
        spec = f"{package.name}={package.version}"
        if options and package.arch != "all":
            spec = f"{package.name}:{package.arch}={package.version}"
        _run(["apt-get", *options, "download", spec], f"downloading {package.name}", cwd=debs)
        if not deb.is_file():
            raise BuildError(f"apt-get download left no {deb.name} in {debs}")
    _progress(f"unpacking {deb.name}")
    unpacking = trees / (package.tree_name + ".part")
    shutil.rmtree(unpacking, ignore_errors=True)
    unpacking.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(unpacking)], f"unpacking {deb.name}")
    shutil.rmtree(tree, ignore_errors=True)
    unpacking.rename(tree)
    return tree


# --------------------------------------------------------------------------- vmlinux


def _elf_machine(path: Path) -> int:
    """e_machine of an ELF file (little-endian x86: at offset 18 for both classes)."""
    with path.open("rb") as f:
        header = f.read(20)
    return struct.unpack_from("<H", header, 18)[0] if len(header) == 20 else -1


def extract_vmlinux(vmlinuz: Path, out: Path) -> str:
    """Decompress the kernel ELF out of a bzImage into `out`; returns the
    payload's compression ("lz4", "xz", "gzip" or "zstd"). See builder.bzimage."""
    try:
        data = Path(vmlinuz).read_bytes()
    except OSError as e:
        raise BuildError(f"{vmlinuz}: cannot read: {e.strerror}") from None
    elf, compression = decompress_kernel(data, vmlinuz)
    _write_atomically(Path(out), elf)
    return compression


def kernel_release(kernel_tree: Path) -> str:
    """The kernel release (`uname -r`) of an unpacked linux-image package."""
    releases = [p.name.removeprefix("vmlinuz-") for p in (kernel_tree / "boot").glob("vmlinuz-*")]
    if len(releases) != 1:
        raise BuildError(f"{kernel_tree}/boot: expected one vmlinuz-*, found {len(releases)}")
    return releases[0]


def has_symbols(system_map: Path) -> bool:
    """Whether a System.map file lists symbols. Debian ships a one-line
    placeholder pointing at the -dbg package instead, which is no use."""
    try:
        with system_map.open("rb") as f:
            head = f.read(4096).splitlines()
    except OSError:
        return False
    return sum(bool(re.fullmatch(rb"[0-9a-fA-F]+ [A-Za-z] \S+", line)) for line in head) >= 2


def modules_dir(kernel_tree: Path, release: str) -> Path | None:
    """lib/modules/<release> of an unpacked kernel package, if it has one."""
    for base in ("lib/modules", "usr/lib/modules"):
        if (kernel_tree / base / release).is_dir():
            return kernel_tree / base / release
    return None


# --------------------------------------------------------------------------- cpio newc


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. `mode` includes the file type bits; `data` is the
    content of a file or the target of a symlink."""

    path: str  # relative, no leading slash
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _newc_member(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int], nlink: int) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)  # uid/gid root, mtime 0: reproducible
    return header + encoded + _pad4(len(header) + len(encoded)) + data + _pad4(len(data))


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """An uncompressed cpio archive in the "newc" format the kernel unpacks
    into its rootfs. Parents must come before their contents."""
    members = []
    for ino, e in enumerate(entries, start=1):
        # nlink 1 for files: the kernel treats nlink >= 2 as a hard link set.
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        members.append(_newc_member(ino, e.path.lstrip("/"), e.mode, e.data, e.rdev, nlink))
    members.append(_newc_member(0, "TRAILER!!!", 0, b"", (0, 0), 1))
    return b"".join(members)


class Initramfs:
    """An initramfs being assembled. Paths are absolute or relative to /;
    missing parent directories are added first; adding a path again replaces
    it in place."""

    def __init__(self) -> None:
        self._entries: dict[str, CpioEntry] = {}

    def __contains__(self, path: str) -> bool:
        return path.strip("/") in self._entries

    def _add(self, path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        path = path.strip("/")
        if not path or ".." in path.split("/"):
            raise BuildError(f"initramfs: bad path {path!r}")
        parent = path.rpartition("/")[0]
        if parent and parent not in self._entries:
            self.add_dir(parent)
        self._entries[path] = CpioEntry(path, mode, data, rdev)

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        self._add(path, stat.S_IFDIR | perm)

    def add_file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self._add(path, stat.S_IFREG | perm, data)

    def add_symlink(self, path: str, target: str) -> None:
        self._add(path, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._add(path, stat.S_IFCHR | perm, rdev=(major, minor))

    def to_bytes(self, compress: bool = False) -> bytes:
        archive = write_newc(self._entries.values())
        return gzip.compress(archive, mtime=0) if compress else archive


# --------------------------------------------------------------------------- kernel modules


@dataclass(frozen=True)
class KernelModule:
    name: str  # as the kernel knows it: dashes become underscores
    relpath: str  # under lib/modules/<release>, always ending in .ko
    data: bytes  # uncompressed, loadable by busybox insmod
    depends: tuple[str, ...]


MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def _module_name(filename: str) -> str:
    base = filename.rpartition("/")[2]
    for suffix in MODULE_SUFFIXES:
        base = base.removesuffix(suffix)
    return base.replace("-", "_")


def _decompress_module(path: Path) -> bytes:
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        try:
            proc = subprocess.run(["zstd", "-d", "-c", str(path)], capture_output=True)
        except FileNotFoundError:
            raise BuildError(f"{path.name}: `zstd` is needed to decompress it") from None
        if proc.returncode != 0:
            raise BuildError(f"{path.name}: zstd failed: {_most_telling_line(proc.stderr.decode(errors='replace'))}")
        return proc.stdout
    return path.read_bytes()


def _module_depends(data: bytes) -> tuple[str, ...]:
    # .modinfo holds NUL-separated key=value strings; depends= is comma-separated.
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    return tuple(d.decode().replace("-", "_") for d in match.group(1).split(b",") if d) if match else ()


def collect_modules(modules_root: Path, names: Iterable[str]) -> list[KernelModule]:
    """The named modules and everything they depend on (from their .modinfo),
    decompressed, in load order: dependencies first. Names may be module
    names (virtio_net, virtio-net, virtio_net.ko) or paths under modules_root."""
    index: dict[str, Path] = {}
    for path in sorted(modules_root.rglob("*.ko*")):
        if path.name.endswith(MODULE_SUFFIXES):
            index.setdefault(_module_name(path.name), path)
    ordered: list[KernelModule] = []
    seen: set[str] = set()  # also stops a (never loadable) dependency cycle

    def visit(name: str) -> None:
        if name in seen:
            return
        if name not in index:
            raise BuildError(f"kernel module {name} not found under {modules_root}")
        seen.add(name)
        path = index[name]
        data = _decompress_module(path)
        deps = _module_depends(data)
        for dep in deps:
            visit(dep)
        relpath = str(path.relative_to(modules_root))
        relpath = relpath[: relpath.rindex(".ko")] + ".ko"
        ordered.append(KernelModule(name, relpath, data, deps))

    for name in names:
        visit(_module_name(name))
    return ordered


def _modules_dep(modules: Sequence[KernelModule]) -> str:
    """modules.dep as depmod writes it: each module's transitive dependencies,
    the one to load first listed last (busybox modprobe loads them in reverse)."""
    position = {m.name: i for i, m in enumerate(modules)}
    by_name = {m.name: m for m in modules}
    lines = []
    for m in modules:
        needed: set[str] = set()
        stack = list(m.depends)
        while stack:
            dep = stack.pop()
            if dep not in needed:
                needed.add(dep)
                stack.extend(by_name[dep].depends)
        deps = sorted(needed, key=position.__getitem__, reverse=True)
        lines.append(f"{m.relpath}: {' '.join(by_name[d].relpath for d in deps)}".rstrip())
    return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------- initramfs


def busybox_applets(busybox: Path) -> list[str]:
    """The applets this busybox binary provides (`busybox --list`)."""
    try:
        proc = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, timeout=30)
    except OSError:
        return list(FALLBACK_APPLETS)  # e.g. not an x86-64 host
    applets = [a for a in proc.stdout.split() if a != "busybox" and "/" not in a]
    return applets if proc.returncode == 0 and applets else list(FALLBACK_APPLETS)


def _extra_file_perm(data: bytes) -> int:
    return 0o755 if data.startswith((b"#!", b"\x7fELF")) else 0o644


def build_initramfs(
    out: Path,
    busybox: Path,
    init_script: str = DEFAULT_INIT,
    *,
    extra_files: Mapping[str, bytes] | None = None,
    modules: Sequence[str] = (),
    modules_root: Path | None = None,
    compress: bool = False,
) -> Path:
    """Write a busybox initramfs to `out` and return `out`.

    It holds /bin/busybox with every applet linked in /bin, the usual empty
    directories, /dev/console and /dev/null, and `init_script` as /init
    ("#!/bin/sh" is prepended if it has no #! line). `modules` are copied from
    `modules_root` (lib/modules/<release> of the kernel package) with their
    dependencies, decompressed, plus a modules.dep for busybox modprobe.
    `extra_files` (archive path -> content) are added last and may replace
    anything; scripts and ELF files among them are made executable.
    Uncompressed by default: the guest runs emulated, and gunzip would cost it
    more than copying the larger archive costs us.
    """
    fs = Initramfs()
    for d in ("bin", "dev", "etc", "proc", "root", "sys"):
        fs.add_dir(d)
    fs.add_dir("tmp", 0o1777)
    fs.add_char_device("dev/console", 5, 1)
    fs.add_char_device("dev/null", 1, 3, 0o666)
    try:
        fs.add_file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    except OSError as e:
        raise BuildError(f"{busybox}: cannot read: {e.strerror}") from None
    for applet in busybox_applets(busybox):
        fs.add_symlink(f"bin/{applet}", "busybox")
    if not init_script.startswith("#!"):
        init_script = "#!/bin/sh\n" + init_script
    fs.add_file("init", init_script.encode(), 0o755)
    # Linux's orderly power-off (a host's `xl shutdown` reaches it through
    # control/shutdown) runs /sbin/poweroff; busybox's would signal an init
    # that is a plain script here, so do what init would do.
    fs.add_file("sbin/poweroff", b"#!/bin/sh\nexec /bin/busybox poweroff -f\n", 0o755)
    fs.add_file("sbin/reboot", b"#!/bin/sh\nexec /bin/busybox reboot -f\n", 0o755)
    if modules:
        if modules_root is None:
            raise BuildError("kernel modules were asked for but the kernel package has none")
        release_dir = f"lib/modules/{modules_root.name}"
        collected = collect_modules(modules_root, modules)
        for module in collected:
            fs.add_file(f"{release_dir}/{module.relpath}", module.data)
        fs.add_file(f"{release_dir}/modules.dep", _modules_dep(collected).encode())
        builtin = modules_root / "modules.builtin"
        if builtin.is_file():  # lets modprobe say "builtin" rather than "not found"
            fs.add_file(f"{release_dir}/modules.builtin", builtin.read_bytes())
    for path, data in (extra_files or {}).items():
        fs.add_file(path, data, _extra_file_perm(data))
    _write_atomically(Path(out), fs.to_bytes(compress))
    return Path(out)


# --------------------------------------------------------------------------- the default guest


@dataclass(frozen=True)
class GuestFiles:
    """A prepared guest: boot `vmlinux` with `initrd` as its module."""

    vmlinux: Path
    initrd: Path
    system_map: Path | None
    kernel_version: str  # the release, as `uname -r` prints it
    kernel_package: str = ""  # "<name> <version>" of the Debian package
    payload_compression: str = ""  # how the bzImage payload was compressed
    modules_root: Path | None = None  # lib/modules/<release> of the unpacked kernel package
    arch: str = DEFAULT_ARCH  # Debian's name: amd64 or i386


MANIFEST = GUEST_ARCHES[DEFAULT_ARCH].manifest


def _read_manifest(root: Path, name: str = MANIFEST) -> dict | None:
    try:
        manifest = json.loads((root / name).read_text())
        manifest["kernel"] = DebPackage(**manifest["kernel"])
        manifest["busybox"] = DebPackage(**manifest["busybox"])
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _initrd_key(init_script: str, modules: Sequence[str], extra_files: Mapping[str, bytes], inputs: dict) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([INITRD_FORMAT, inputs, init_script, list(modules)]).encode())
    for path, data in sorted(extra_files.items()):
        digest.update(f"\0{path}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()[:16]


def prepare_default_guest(
    init_script: str | None = None,
    modules: Sequence[str] = (),
    force: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
    arch: str = DEFAULT_ARCH,
) -> GuestFiles:
    """The default guest: Debian's cloud kernel and a busybox initramfs
    running `init_script` (default: DEFAULT_INIT, which prints
    "PVHVM-INIT-OK uptime=..." and powers off).

    The first call downloads linux-image-<release>-cloud-amd64 and
    busybox-static and pins them in the cache; later calls reuse them without
    network or apt. force=True resolves, downloads and rebuilds everything
    again. An initrd is built once per distinct init script, module list and
    extra files (their hash is in its file name).

    arch="i386" prepares the 32-bit guest the same way from
    linux-image-<release>-686-pae and busybox-static:i386, pinned in its own
    manifest (default-guest-i386.json); the amd64 guest's files are untouched.
    """
    target = guest_arch(arch)
    root = cache_dir()
    pinned = None if force else _read_manifest(root, target.manifest)
    if pinned:
        kernel_pkg, busybox_pkg = pinned["kernel"], pinned["busybox"]
        # A cached guest asks nothing of apt or dpkg.
        unpacked = all((root / "packages" / p.tree_name).is_dir() for p in (kernel_pkg, busybox_pkg))
        options = [] if unpacked else apt_options(target.name, root)
    else:
        options = apt_options(target.name, root)
        ensure_apt_lists(target.kernel_metapackage, options, target.name)
        kernel_pkg = resolve_kernel_package(target.kernel_metapackage, options)
        busybox_pkg = resolve_package(BUSYBOX_PACKAGE, options)
    kernel_tree = fetch_package(kernel_pkg, root, force, options)
    busybox_tree = fetch_package(busybox_pkg, root, force, options)

    release = kernel_release(kernel_tree)
    kernel_dir = root / "kernels" / release
    vmlinux = kernel_dir / "vmlinux"
    compression = pinned.get("compression", "") if pinned else ""
    if force or not vmlinux.is_file() or not compression:
        _progress(f"decompressing vmlinuz-{release}")
        compression = extract_vmlinux(kernel_tree / "boot" / f"vmlinuz-{release}", vmlinux)
    machine = _elf_machine(vmlinux)
    if machine != target.elf_machine:
        raise BuildError(f"{vmlinux}: ELF machine {machine}, not {target.elf_machine} as an {target.name} kernel's")
    system_map = None
    map_source = kernel_tree / "boot" / f"System.map-{release}"
    if has_symbols(map_source):
        system_map = kernel_dir / "System.map"
        if force or not system_map.is_file():
            shutil.copyfile(map_source, system_map)

    manifest = {"kernel": asdict(kernel_pkg), "busybox": asdict(busybox_pkg), "release": release}
    manifest["compression"] = compression
    _write_atomically(root / target.manifest, json.dumps(manifest, indent=2).encode())

    from .devices.net_host import UDHCPC_SCRIPT, UDHCPC_SCRIPT_PATH

    init_script = DEFAULT_INIT if init_script is None else init_script
    # Every default guest carries its network card's driver and a DHCP
    # script, so `pvhvm boot --net ...` needs no other image.
    modules = list(dict.fromkeys([*DEFAULT_MODULES, *modules]))
    extra_files = {UDHCPC_SCRIPT_PATH: UDHCPC_SCRIPT.encode(), **dict(extra_files or {})}
    inputs = {"kernel": asdict(kernel_pkg), "busybox": asdict(busybox_pkg)}
    initrd = root / "initrds" / f"initrd-{_initrd_key(init_script, modules, extra_files, inputs)}.cpio"
    if force or not initrd.is_file():
        _progress(f"building {initrd.name}")
        build_initramfs(
            initrd,
            busybox_tree / "bin" / "busybox",
            init_script,
            extra_files=extra_files,
            modules=modules,
            modules_root=modules_dir(kernel_tree, release),
        )
    return GuestFiles(
        vmlinux,
        initrd,
        system_map,
        release,
        f"{kernel_pkg.name} {kernel_pkg.version}",
        compression,
        modules_dir(kernel_tree, release),
        target.name,
    )
