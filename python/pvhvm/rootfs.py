"""A real Debian root file system for the default guest's kernel: Debian 12
(bookworm) with systemd on a raw ext4 disk image, built without mounting
anything.

mmdebstrap bootstraps the system into a tarball; a customize hook adds the
configuration below and the default guest kernel's modules (with depmod run
in the new root, so udev there loads xen-netfront and xen-blkfront by
themselves); the tarball is unpacked and `mke2fs -d` writes the file system
from that tree. No loop device, no mount, so it also works where mount is
not allowed.

The image boots with the default guest's initramfs, whose /init switches to
it when the kernel command line says `root=LABEL=pvhvm-root` (or
root=/dev/xvda under pvhvm and Xen, root=/dev/vda under QEMU with virtio):

    >>> from pvhvm.rootfs import prepare_debian_rootfs
    >>> image = prepare_debian_rootfs()
    >>> image.path, image.kernel_release, image.size_mib

The system in it: systemd, udev, dbus, kmod, iproute2, ping, e2fsprogs (fsck
at boot); systemd-networkd configures any eth*/en* card by DHCP; the hostname
is `pvhvm`; root has no password, and the getty on hvc0 (the Xen console)
logs root in by itself. No ssh server, no DNS resolver (nothing writes
/etc/resolv.conf: add a nameserver or install systemd-resolved).

As root, mmdebstrap runs in its `root` mode. Other users need what its
`unshare` mode needs: the uidmap package (newuidmap), subordinate id ranges
for the user in /etc/subuid and /etc/subgid (adduser creates them) and
unprivileged user namespaces (on by default in Debian 12); the final step
then runs under fakeroot so the files keep their owners in the image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError
from .images import _most_telling_line, _progress, _write_atomically, cache_dir, prepare_default_guest

SUITE = "bookworm"
DEBIAN_RELEASE = "12"
VARIANT = "minbase"  # Priority: required plus apt; Recommends are not installed
# minbase already brings coreutils, util-linux (agetty), login and apt. dbus
# is systemd's Recommends: without it systemctl poweroff says "Failed to
# connect to bus" (it asks logind first), and logind, networkctl and
# hostnamectl do not work.
PACKAGES = ("systemd", "systemd-sysv", "udev", "dbus", "kmod", "iproute2", "iputils-ping", "e2fsprogs")
LABEL = "pvhvm-root"
HOSTNAME = "pvhvm"
DEFAULT_SIZE_MIB = 1024  # about 330 MiB used; the rest is room for apt-get install
MIN_SIZE_MIB = 512

# Bump when the build changes in a way the hashed inputs below do not show.
ROOTFS_FORMAT = 1

# The suites of a release that belong in its sources.list (not backports).
SUITE_FAMILY = (SUITE, f"{SUITE}-updates", f"{SUITE}-security")
FALLBACK_SOURCES = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)

# Documentation is of no use in a test guest and is a quarter of minbase.
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)

# Units that only cost boot time in an emulated VM with no hardware and no
# persistent purpose: periodic jobs (apt, dpkg database backup, e2scrub,
# fstrim, man-db), time sync (the clock is the hypervisor's), and
# systemd-firstboot, which on an empty /etc/machine-id (every copy of this
# image boots for the first time) would stop at a locale prompt.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "systemd-timesyncd.service",
    "systemd-firstboot.service",
    # Debian's gettys on tty2-6 for systems without D-Bus: no screen here.
    "getty-static.service",
)
ENABLED_UNITS = ("systemd-networkd.service",)
# There is no screen to show tty1 on (pvhvm has none; QEMU -nographic
# neither); the consoles get serial-getty@ by the kernel's console=
# (systemd-getty-generator) and hvc0 always when it exists.
DISABLED_UNITS = ("getty@tty1.service",)

# Files written over what the packages installed, path -> content.
CONFIG_FILES = {
    # By label, so the same image is /dev/xvda under pvhvm and Xen and
    # /dev/vda under QEMU's virtio. Pass 1: fsck when /init mounted it ro.
    "etc/fstab": f"LABEL={LABEL} / ext4 rw,errors=remount-ro 0 1\n",
    "etc/hostname": f"{HOSTNAME}\n",
    "etc/hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    # mmdebstrap copies the host's; the guest's network is not the host's.
    "etc/resolv.conf": "# No resolver is configured: systemd-networkd cannot write this file\n"
    "# without systemd-resolved. Add a nameserver line by hand.\n",
    # bash 5.2 wraps every command line read on a terminal in bracketed-paste
    # escapes (ESC[?2004h ... ESC[?2004l), which get between a command's echo
    # and its output on the console that tests and scripts read.
    "etc/inputrc": "set enable-bracketed-paste off\n",
    "etc/systemd/network/50-pvhvm-dhcp.network": "[Match]\nName=eth* en*\n\n[Network]\nDHCP=yes\n",
    # The Xen console: log root in, with no password asked. agetty still
    # prints the "pvhvm login:" prompt first.
    "etc/systemd/system/serial-getty@hvc0.service.d/autologin.conf": (
        "[Service]\n"
        "ExecStart=\n"
        "ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 - $TERM\n"
    ),
}


@dataclass(frozen=True)
class RootfsImage:
    """A raw ext4 disk image holding a Debian root file system with the
    modules of kernel `kernel_release` (the default guest's kernel)."""

    path: Path
    kernel_release: str
    size_mib: int
    label: str = LABEL


# --------------------------------------------------------------------------- host apt configuration


def _sources_entries(text: str, deb822: bool) -> list[tuple[str, str, list[str], str]]:
    """(uri, suite, components, options) of each `deb` entry in a
    sources.list (one-line format) or .sources (deb822) file."""
    entries = []
    if not deb822:
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            match = re.match(r"deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line)
            if match:
                entries.append((match.group(2), match.group(3), match.group(4).split(), match.group(1) or ""))
        return entries
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1].isspace() and key:  # a continuation line (e.g. an inline key)
                fields[key] += "\n" + line.strip()
                continue
            key, sep, value = line.partition(":")
            key = key.strip().lower() if sep else None
            if key:
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        signed_by = fields.get("signed-by", "")
        options = f"signed-by={signed_by}" if signed_by.startswith("/") and "\n" not in signed_by else ""
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                entries.append((uri, suite, fields.get("components", "").split(), options))
    return entries


def debian_sources(apt_etc: Path = Path("/etc/apt")) -> list[str]:
    """sources.list lines for SUITE's main component, from the mirrors the
    host's apt uses (its own mirror or proxy is what works from here), else
    deb.debian.org. Only `main` of bookworm, -updates and -security are kept."""
    files = [(apt_etc / "sources.list", False)]
    files += [(p, False) for p in sorted((apt_etc / "sources.list.d").glob("*.list"))]
    files += [(p, True) for p in sorted((apt_etc / "sources.list.d").glob("*.sources"))]
    lines: list[str] = []
    for path, deb822 in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri, suite, components, options in _sources_entries(text, deb822):
            if suite in SUITE_FAMILY and "main" in components:
                opts = f"[{options}] " if options else ""
                lines.append(f"deb {opts}{uri} {suite} main")
    lines = list(dict.fromkeys(lines))
    if not any(f" {SUITE} main" in line for line in lines):
        return list(FALLBACK_SOURCES)
    return lines


# Host apt settings that decide whether downloads work at all here.
HOST_APT_OPTIONS = (
    "Acquire::http::Proxy",
    "Acquire::https::Proxy",
    "Acquire::Check-Valid-Until",
)


def _host_apt_options() -> list[str]:
    """The host's proxy and Valid-Until settings as mmdebstrap --aptopt
    values: mmdebstrap runs apt with a configuration of its own."""
    try:
        proc = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    options = []
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key in HOST_APT_OPTIONS and value.endswith(";"):
            options.append(f"{key} {value[:-1]}")
    return options


# --------------------------------------------------------------------------- tools


def _is_root() -> bool:
    return os.geteuid() == 0


def _apt_get(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        return subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise BuildError("mmdebstrap is not installed and there is no apt-get to install it") from None


def ensure_mmdebstrap() -> str:
    """The path of mmdebstrap, installed with apt-get if it is missing and
    we are root (scripts/setup installs it too)."""
    if shutil.which("mmdebstrap"):
        return shutil.which("mmdebstrap")
    if not _is_root():
        raise BuildError("mmdebstrap is not installed: run `sudo apt-get install mmdebstrap` (or scripts/setup)")
    _progress("installing mmdebstrap with apt-get")
    proc = _apt_get("install", "-y", "-q", "mmdebstrap")
    if proc.returncode != 0:  # fresh containers have no package lists yet
        proc = _apt_get("update", "-q")
        if proc.returncode == 0:
            proc = _apt_get("install", "-y", "-q", "mmdebstrap")
    if proc.returncode != 0 or not shutil.which("mmdebstrap"):
        why = _most_telling_line(proc.stderr + proc.stdout)
        raise BuildError(f"mmdebstrap is not installed and apt-get could not install it: {why}")
    return shutil.which("mmdebstrap")


def _require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise BuildError(f"`{tool}` not found: install the Debian package {package}")


# --------------------------------------------------------------------------- the build


def customize_script(release: str) -> str:
    """The shell commands of mmdebstrap's last customize hook, with the new
    root as $1, after the configuration files and the kernel's modules were
    copied in: give those to root (they come in with the owner and the umask
    of whoever runs the build), run depmod for the modules, empty root's
    password, enable, disable and mask units. In unshare mode this runs in
    mmdebstrap's user namespace, where chroot works without root."""
    q = shlex.quote
    modules = f'"$1/lib/modules/"{q(release)}'
    # sync-in also gives "/" itself the owner and mode of the copied directory.
    lines = ["set -e", 'chown 0:0 "$1" && chmod 755 "$1"']
    lines += [f"chown -R 0:0 {modules}", f"chmod -R u+rwX,go+rX,go-w {modules}"]
    dirs = sorted({str(parent) for rel in CONFIG_FILES for parent in Path(rel).parents if str(parent) != "."})
    for rel in dirs:
        lines.append(f'chown 0:0 "$1/"{q(rel)} && chmod 755 "$1/"{q(rel)}')
    for rel in sorted(CONFIG_FILES):
        lines.append(f'chown 0:0 "$1/"{q(rel)} && chmod 644 "$1/"{q(rel)}')
    lines += [
        # The guest's own depmod, in the new root: modules.dep and
        # modules.alias, which udev needs to load drivers by modalias.
        f'chroot "$1" depmod -a {q(release)}',
        'chroot "$1" passwd -d root >/dev/null',
        f'chroot "$1" systemctl -q enable {" ".join(ENABLED_UNITS)}',
        f'chroot "$1" systemctl -q disable {" ".join(DISABLED_UNITS)}',
        f'chroot "$1" systemctl -q mask {" ".join(MASKED_UNITS)}',
    ]
    return "\n".join(lines) + "\n"


def _special_hook_path(path: Path) -> str:
    # mmdebstrap splits its copy-in/sync-in hooks at spaces.
    if re.search(r"\s", str(path)):
        raise BuildError(f"{path}: the cache path must not contain white space (mmdebstrap cannot copy from it)")
    return str(path)


def mmdebstrap_command(
    mmdebstrap: str,
    tarball: Path,
    config_dir: Path,
    modules_root: Path,
    release: str,
    sources: Sequence[str],
    apt_options: Sequence[str] = (),
) -> list[str]:
    """The mmdebstrap command line that writes the root file system as a
    tarball (owners and device nodes kept, whatever the mode). Files come in
    through mmdebstrap's sync-in and copy-in hooks, which read them as the
    calling user, so they need not be readable from its user namespace."""
    cmd = [mmdebstrap, "--mode=auto", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}"]
    cmd += [f"--dpkgopt={opt}" for opt in DPKG_OPTIONS]
    cmd += [f"--aptopt={opt}" for opt in apt_options]
    cmd += [
        f"--customize-hook=sync-in {_special_hook_path(config_dir)} /",
        '--customize-hook=mkdir -p "$1/lib/modules"',
        f"--customize-hook=copy-in {_special_hook_path(modules_root)} /lib/modules",
        f"--customize-hook={customize_script(release)}",
        "--format=tar",
        SUITE,
        str(tarball),
    ]
    return cmd + list(sources)


def _mke2fs_command(tree: Path, image: Path, size_mib: int) -> list[str]:
    return ["mke2fs", "-q", "-F", "-t", "ext4", "-L", LABEL, "-d", str(tree), str(image), f"{size_mib}M"]


def _tar_to_ext4(tarball: Path, tree: Path, image: Path, size_mib: int) -> None:
    """Unpack the tarball and write the ext4 image from the tree. mke2fs -d
    copies owners as it sees them, so a user who is not root runs both steps
    in one fakeroot session, where the tarball's owners and device nodes
    are kept in fakeroot's books. (e2fsprogs 1.47.0, Debian 12's, cannot
    read a tarball with -d itself; 1.47.1 can.)

    Extended attributes (only ping's cap_net_raw here) are kept as root
    only: under fakeroot mke2fs fails on them. Without it ping still works,
    for root and, by ICMP sockets, for everyone in systemd's
    net.ipv4.ping_group_range."""
    q = shlex.quote
    xattrs = "--xattrs --xattrs-include='*' " if _is_root() else ""
    untar = f"tar {xattrs}--numeric-owner -xpf {q(str(tarball))} -C {q(str(tree))}"
    mke2fs = " ".join(q(a) for a in _mke2fs_command(tree, image, size_mib))
    script = f"set -e; {untar}; {mke2fs}"
    if _is_root():
        cmd = ["sh", "-c", script]
    else:
        _require("fakeroot", "fakeroot")
        cmd = ["fakeroot", "sh", "-c", script]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        output = proc.stderr + proc.stdout
        lines = [line for line in output.splitlines() if line.startswith(("mke2fs:", "tar:"))]
        raise BuildError(f"making the ext4 image failed: {lines[-1] if lines else _most_telling_line(output)}")


def _image_key(release: str, size_mib: int) -> str:
    digest = hashlib.sha256()
    inputs = [ROOTFS_FORMAT, SUITE, VARIANT, list(PACKAGES), list(DPKG_OPTIONS), release, size_mib, LABEL]
    digest.update(json.dumps(inputs).encode())
    for path, content in sorted(CONFIG_FILES.items()):
        digest.update(f"\0{path}\0{content}".encode())
    digest.update(customize_script(release).encode())
    return digest.hexdigest()[:16]


def _read_image_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mmdebstrap_failure(output: str) -> str:
    """The line that says why mmdebstrap failed: apt's E: lines, else
    mmdebstrap's own E: line, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    apt = [line for line in errors if not line.startswith("E: mmdebstrap")]
    return (apt or errors or lines or ["no output"])[0 if apt else -1]


KEEP_SUPERSEDED = 1


def _remove_superseded(root: Path, image: Path, size_mib: int) -> None:
    """Images of the same size from another format or configuration are a
    few hundred MiB each: keep only the newest KEEP_SUPERSEDED of them, so
    that two checkouts of pvhvm sharing a cache do not rebuild in turn."""
    others = []
    for manifest_path in root.glob(f"debian-{DEBIAN_RELEASE}-*.json"):
        other = manifest_path.with_suffix(".img")
        if other != image and (_read_image_manifest(manifest_path) or {}).get("size_mib") == size_mib:
            others.append((manifest_path.stat().st_mtime, other, manifest_path))
    for _, other, manifest_path in sorted(others, reverse=True)[KEEP_SUPERSEDED:]:
        _progress(f"removing the superseded {other.name}")
        other.unlink(missing_ok=True)
        manifest_path.unlink(missing_ok=True)


def prepare_debian_rootfs(force: bool = False, size_mib: int = DEFAULT_SIZE_MIB) -> RootfsImage:
    """The Debian root disk image for the default guest, built once (a minute
    or two, mostly downloads) and cached under cache_dir()/rootfs, keyed by
    the format, package list, configuration, size and kernel release; later
    calls reuse it without network. force=True builds it again.

    Boot it with the default guest's kernel and initramfs and
    `root=LABEL=pvhvm-root`. Boot a copy if the original should stay
    pristine: the guest writes to its disk.
    """
    if not isinstance(size_mib, int) or size_mib < MIN_SIZE_MIB:
        raise BuildError(f"the root image needs at least {MIN_SIZE_MIB} MiB, not {size_mib!r}")
    guest = prepare_default_guest()
    release = guest.kernel_version
    if guest.modules_root is None:
        raise BuildError(f"the default guest's kernel package ({guest.kernel_package}) has no modules")
    if guest.modules_root.name != release:
        raise BuildError(f"{guest.modules_root}: expected the modules of {release}")

    root = cache_dir() / "rootfs"
    key = _image_key(release, size_mib)
    image = root / f"debian-{DEBIAN_RELEASE}-{key}.img"
    manifest_path = image.with_suffix(".json")
    result = RootfsImage(image, release, size_mib)
    manifest = _read_image_manifest(manifest_path)
    if not force and image.is_file() and manifest and manifest.get("key") == key:
        return result

    mmdebstrap = ensure_mmdebstrap()
    _require("mke2fs", "e2fsprogs")
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as work:
        work_dir = Path(work)
        config_dir, tarball, tree = work_dir / "config", work_dir / "rootfs.tar", work_dir / "tree"
        for rel, content in CONFIG_FILES.items():
            (config_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (config_dir / rel).write_text(content)
        tree.mkdir()
        sources = debian_sources()
        cmd = mmdebstrap_command(
            mmdebstrap, tarball, config_dir, guest.modules_root, release, sources, _host_apt_options()
        )
        _progress(f"bootstrapping Debian {DEBIAN_RELEASE} ({SUITE}, {VARIANT} + {' '.join(PACKAGES)}) with mmdebstrap")
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0 or not tarball.is_file():
            raise BuildError(f"mmdebstrap failed: {_mmdebstrap_failure(proc.stderr + proc.stdout)}")
        _progress(f"writing the ext4 image ({size_mib} MiB, label {LABEL}) with mke2fs -d")
        partial = image.with_name(f"{image.name}.{os.getpid()}.part")  # two builds may race
        try:
            _tar_to_ext4(tarball, tree, partial, size_mib)
        except BuildError:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(image)
    seconds = round(time.monotonic() - started, 1)
    manifest = {
        "key": key,
        "format": ROOTFS_FORMAT,
        "suite": SUITE,
        "variant": VARIANT,
        "packages": list(PACKAGES),
        "kernel_release": release,
        "kernel_package": guest.kernel_package,
        "size_mib": size_mib,
        "label": LABEL,
        "sources": sources,
        "build_seconds": seconds,
        "mmdebstrap": cmd,
    }
    _write_atomically(manifest_path, json.dumps(manifest, indent=2).encode())
    _remove_superseded(root, image, size_mib)
    _progress(f"built {image.name} in {seconds:.0f} s")
    return result
