"""The Debian root disk image (pvhvm.rootfs) and the default initramfs
booting from a disk: the image's content read with debugfs (nothing is
mounted), fsck clean, and (slow) real boots under QEMU TCG, as pvhvm's block
backend will later do: the initramfs switching to the disk, systemd reaching
the login prompt, DHCP by systemd-networkd, a clean poweroff."""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvhvm import rootfs
from pvhvm.errors import BuildError
from pvhvm.images import DEFAULT_INIT, DEFAULT_MODULES, cache_dir
from pvhvm.rootfs import (
    CONFIG_FILES,
    LABEL,
    MASKED_UNITS,
    customize_script,
    debian_sources,
    mmdebstrap_command,
    prepare_debian_rootfs,
)

QEMU = shutil.which("qemu-system-x86_64")
needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt (Debian)")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64 (Debian's qemu-system-x86)")


# --------------------------------------------------------------------------- host apt sources


def test_sources_from_one_line_and_deb822_files(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# a comment\n"
        "deb http://mirror.example/debian bookworm main contrib\n"
        "deb-src http://mirror.example/debian bookworm main\n"
        "deb http://mirror.example/debian bookworm-backports main\n"
        "deb http://mirror.example/debian trixie main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n"
        "URIs: http://deb.debian.org/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main non-free-firmware\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://other.example/debian\n"
        "Suites: bookworm-updates\n"
        "Components: contrib\n"
        "\n"
        "Types: deb\n"
        "URIs: http://disabled.example/debian\n"
        "Suites: bookworm\n"
        "Components: main\n"
        "Enabled: no\n"
    )
    assert debian_sources(tmp_path) == [
        "deb http://mirror.example/debian bookworm main",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://deb.debian.org/debian-security bookworm-security main",
    ]


def test_sources_fall_back_to_deb_debian_org(tmp_path):
    (tmp_path / "sources.list").write_text("deb http://mirror.example/ubuntu jammy main\n")
    assert debian_sources(tmp_path) == list(rootfs.FALLBACK_SOURCES)


# --------------------------------------------------------------------------- the build's commands


def test_customize_script_runs_depmod_for_the_release_and_masks_units():
    script = customize_script("6.1.0-99-cloud-amd64")
    assert 'chroot "$1" depmod -a 6.1.0-99-cloud-amd64' in script
    assert 'chown -R 0:0 "$1/lib/modules/"6.1.0-99-cloud-amd64' in script
    assert 'chroot "$1" passwd -d root' in script
    assert "systemctl -q enable systemd-networkd.service" in script
    mask = next(line for line in script.splitlines() if "systemctl -q mask" in line)
    assert set(MASKED_UNITS) <= set(mask.split())
    for path in CONFIG_FILES:  # copied in with the builder's owner and umask: fixed up
        assert f'chown 0:0 "$1/"{path} && chmod 644' in script


def test_mmdebstrap_command_writes_a_tarball_and_copies_files_in_by_hooks(tmp_path):
    cmd = mmdebstrap_command(
        "mmdebstrap", tmp_path / "out.tar", tmp_path / "config", tmp_path / "6.1.0-9", "6.1.0-9",
        ["deb http://deb.debian.org/debian bookworm main"], ['Acquire::Check-Valid-Until "false"'],
    )
    assert cmd[:3] == ["mmdebstrap", "--mode=auto", "--variant=minbase"]
    assert "--include=systemd,systemd-sysv,udev,dbus,kmod,iproute2,iputils-ping,e2fsprogs" in cmd
    assert "--format=tar" in cmd and "openssh-server" not in " ".join(cmd)
    hooks = [a.removeprefix("--customize-hook=") for a in cmd if a.startswith("--customize-hook=")]
    assert hooks[0] == f"sync-in {tmp_path / 'config'} /"
    assert hooks[2] == f"copy-in {tmp_path / '6.1.0-9'} /lib/modules"
    assert hooks[3] == customize_script("6.1.0-9")
    assert cmd[-3:] == ["bookworm", str(tmp_path / "out.tar"), "deb http://deb.debian.org/debian bookworm main"]
    assert '--aptopt=Acquire::Check-Valid-Until "false"' in cmd


def test_white_space_in_the_cache_path_is_a_build_error(tmp_path):
    with pytest.raises(BuildError, match="white space") as info:
        mmdebstrap_command("mmdebstrap", tmp_path / "o.tar", tmp_path / "a b", tmp_path / "m", "m", [])
    assert "\n" not in str(info.value)


def test_too_small_an_image_is_a_build_error():
    with pytest.raises(BuildError, match="at least 512 MiB") as info:
        prepare_debian_rootfs(size_mib=100)
    assert "\n" not in str(info.value)


def test_missing_mmdebstrap_for_a_user_is_a_one_line_build_error(monkeypatch):
    monkeypatch.setattr(rootfs.shutil, "which", lambda name: None)
    monkeypatch.setattr(rootfs, "_is_root", lambda: False)
    with pytest.raises(BuildError, match="mmdebstrap is not installed") as info:
        rootfs.ensure_mmdebstrap()
    assert "\n" not in str(info.value)


def test_only_the_newest_superseded_image_of_a_size_is_kept(tmp_path):
    def image(key, size, age):
        (tmp_path / f"debian-12-{key}.img").write_bytes(b"")
        manifest = tmp_path / f"debian-12-{key}.json"
        manifest.write_text(f'{{"key": "{key}", "size_mib": {size}}}')
        os.utime(manifest, (time.time() - age, time.time() - age))

    image("old", 1024, 300)
    image("newer", 1024, 200)
    image("big", 2048, 400)
    image("now", 1024, 0)
    rootfs._remove_superseded(tmp_path, tmp_path / "debian-12-now.img", 1024)
    assert sorted(p.name for p in tmp_path.glob("*.img")) == [
        "debian-12-big.img", "debian-12-newer.img", "debian-12-now.img"
    ]
    assert not (tmp_path / "debian-12-old.json").exists()


def test_mmdebstrap_failure_names_apt_s_error():
    output = "I: running apt-get update...\nE: Failed to fetch http://x/InRelease  Could not resolve 'x'\n" \
             "E: mmdebstrap: apt-get update failed\n"
    assert rootfs._mmdebstrap_failure(output).startswith("E: Failed to fetch")
    assert rootfs._mmdebstrap_failure("E: mmdebstrap: no mode\n") == "E: mmdebstrap: no mode"


def test_cli_rootfs_failure_is_one_line_and_status_2(tmp_path):
    # fetch-guest --rootfs with both builders replaced: no network, no cache.
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pvhvm import images, rootfs, cli\n"
        "from pvhvm.errors import BuildError\n"
        "images.prepare_default_guest = lambda force=False, arch='amd64': images.GuestFiles("
        "Path('vmlinux'), Path('initrd'), None, '6.1.0-9', 'linux-image-6.1.0-9 1')\n"
        "def fail(force=False):\n"
        "    raise BuildError('mmdebstrap failed: E: Could not resolve deb.debian.org')\n"
        "rootfs.prepare_debian_rootfs = fail\n"
        "sys.argv = ['pvhvm', 'fetch-guest', '--rootfs']\n"
        "cli.main()\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.strip() == "pvhvm: mmdebstrap failed: E: Could not resolve deb.debian.org"
    assert "vmlinux: vmlinux" in p.stdout


# --------------------------------------------------------------------------- the default initramfs


def test_default_init_switches_root_only_with_root_on_the_command_line():
    assert {"xen-blkfront", "virtio_blk", "virtio_pci", "xen-netfront"} <= set(DEFAULT_MODULES)
    root_part = DEFAULT_INIT[DEFAULT_INIT.index("PVHVM-INIT-OK"):DEFAULT_INIT.index("pvhvm.net")]
    assert 'if [ -n "$root" ]; then' in root_part and 'exec switch_root /newroot "$init"' in root_part
    assert "findfs" in root_part and "rootfstype=ext4" in root_part and "init=/sbin/init" in root_part


# --------------------------------------------------------------------------- the real image


def debugfs(image: Path, request: str) -> str:
    proc = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def image():
    return prepare_debian_rootfs()


@pytest.fixture(scope="module")
def guest():
    from pvhvm.images import prepare_default_guest

    return prepare_default_guest()


@pytest.mark.slow
@needs_apt
def test_rootfs_image_content(image, guest, capfd):
    capfd.readouterr()
    assert image.path.is_file() and image.path.parent == cache_dir() / "rootfs"
    assert image.path.stat().st_size == image.size_mib << 20
    assert image.kernel_release == guest.kernel_version
    release = image.kernel_release
    header = subprocess.run(["dumpe2fs", "-h", str(image.path)], capture_output=True, text=True).stdout
    assert re.search(rf"Filesystem volume name:\s+{LABEL}$", header, re.M)

    assert debugfs(image.path, "cat /etc/fstab") == f"LABEL={LABEL} / ext4 rw,errors=remount-ro 0 1\n"
    assert debugfs(image.path, "cat /etc/hostname") == "pvhvm\n"
    autologin = "/etc/systemd/system/serial-getty@hvc0.service.d/autologin.conf"
    assert "--autologin root" in debugfs(image.path, f"cat {autologin}")
    assert "User:     0   Group:     0" in debugfs(image.path, f"stat {autologin}")
    assert re.search(r"^root::", debugfs(image.path, "cat /etc/shadow"), re.M)  # no password
    assert "DHCP=yes" in debugfs(image.path, "cat /etc/systemd/network/50-pvhvm-dhcp.network")
    assert "systemd-networkd.service" in debugfs(image.path, "ls /etc/systemd/system/multi-user.target.wants")
    assert 'Fast link dest: "/dev/null"' in debugfs(image.path, "stat /etc/systemd/system/apt-daily.timer")
    assert "sshd" not in debugfs(image.path, "ls /usr/sbin")

    modules = f"/lib/modules/{release}"
    assert "xen-blkfront.ko" in debugfs(image.path, f"ls {modules}/kernel/drivers/block")
    assert "xen-netfront.ko" in debugfs(image.path, f"ls {modules}/kernel/drivers/net")
    aliases = debugfs(image.path, f"cat {modules}/modules.alias")
    assert "alias xen:vbd xen_blkfront" in aliases and "alias xen:vif xen_netfront" in aliases  # depmod ran
    assert "kernel/drivers/block/xen-blkfront.ko:" in debugfs(image.path, f"cat {modules}/modules.dep")

    fsck = subprocess.run(["e2fsck", "-fn", str(image.path)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # Cached: the same image, nothing built.
    assert prepare_debian_rootfs() == image
    assert "pvhvm:" not in capfd.readouterr().err


@pytest.mark.slow
@needs_apt
def test_default_initrd_carries_the_disk_drivers(guest):
    from test_images import read_newc

    members = read_newc(guest.initrd.read_bytes())
    names = {name.rpartition("/")[2] for name in members}
    assert {"xen-blkfront.ko", "virtio_blk.ko", "virtio_pci.ko", "virtio.ko", "virtio_ring.ko"} <= names
    assert {"bin/switch_root", "bin/findfs"} <= set(members)
    assert members["init"]["data"] == DEFAULT_INIT.encode()


# --------------------------------------------------------------------------- booting it under QEMU


class Console:
    """QEMU's serial console on its stdio: expect a pattern, type a line."""

    def __init__(self, cmd: list[str]):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.seen = b""
        self._pos = 0

    def expect(self, pattern: bytes, timeout: float) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = rx.search(self.seen, self._pos)
            if match:
                self._pos = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen in {timeout} s; last output:\n"
                                     + self.seen[-3000:].decode(errors="replace"))
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if ready:
                data = os.read(self.proc.stdout.fileno(), 65536)
                if not data:
                    raise AssertionError(f"QEMU exited ({self.proc.wait()}) before {pattern!r}; last output:\n"
                                         + self.seen[-3000:].decode(errors="replace"))
                self.seen += data

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def wait(self, timeout: float) -> int:
        """QEMU's exit status, reading its output meanwhile (a full pipe would stall it)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
                if ready:
                    data = os.read(self.proc.stdout.fileno(), 65536)
                    if not data:
                        return self.proc.wait(max(1.0, deadline - time.monotonic()))
                    self.seen += data
            raise AssertionError("QEMU did not exit; last output:\n" + self.seen[-3000:].decode(errors="replace"))
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def qemu_command(guest, disk: str, cmdline: str, nic: str = "none") -> list[str]:
    """QEMU TCG booting the vmlinux by its PVH note (as benches/bench_boot.py
    does) with the disk on virtio: the Debian kernel has no e1000 driver, so
    the card is virtio-net too."""
    return [
        QEMU, "-M", "pc", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
        "-kernel", str(guest.vmlinux), "-initrd", str(guest.initrd), "-append", cmdline,
        "-drive", f"file={disk},if=virtio,format=raw", "-nic", nic,
    ]


@pytest.mark.slow
@needs_apt
@needs_qemu
def test_initrd_switches_to_the_disk_and_runs_its_init(image, guest):
    # init=/bin/sh (the disk's dash): the switch alone, in seconds. snapshot=on keeps the image as it is.
    console = Console(qemu_command(guest, f"{image.path},snapshot=on",
                                   "console=ttyS0 root=/dev/vda init=/bin/sh"))
    try:
        console.expect(rb"PVHVM-INIT-OK", 60)
        console.expect(rb"PVHVM-INIT: switching to /dev/vda \(ro\), init /bin/sh", 60)
        console.expect(rb"# ", 30)
        # One short line to match (a long one may be cut by kernel messages).
        console.send("set -- $(grep ' / ' /proc/mounts); echo pid=$$ host=$(cat /etc/hostname) $1 $3 "
                     "mode=${4%%,*}=; echo o >/proc/sysrq-trigger")
        match = console.expect(rb"pid=(\d+) host=(\S+) /dev/vda ext4 mode=(\w+)=", 30)
        assert match.groups() == (b"1", b"pvhvm", b"ro")
        assert console.wait(60) == 0
    finally:
        console.close()


@pytest.mark.slow
@needs_apt
@needs_qemu
def test_debian_boots_to_login_gets_dhcp_and_powers_off_under_qemu(image, guest, tmp_path):
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image.path), str(disk)], check=True)
    console = Console(qemu_command(guest, str(disk), f"console=ttyS0 root=LABEL={LABEL} rw",
                                   nic="user,model=virtio-net-pci"))
    try:
        console.expect(rb"PVHVM-INIT: switching to /dev/vda \(rw\), init /sbin/init", 60)
        console.expect(rb"Debian GNU/Linux 12", 60)
        console.expect(rb"pvhvm login: ", 240)
        boot_seconds = console.elapsed()
        console.send("root")  # no password
        console.expect(rb"root@pvhvm:~# ", 60)
        console.send("systemctl is-system-running --wait; ip -4 -o addr show scope global; echo END")
        match = console.expect(rb"(?s)\n(running|degraded)\r?\n(.*?)\nEND", 120)  # no bracketed paste
        assert match.group(1) == b"running", console.seen[-3000:].decode(errors="replace")  # no failed unit
        assert re.search(rb"inet 10\.0\.2\.15/24 .*dynamic", match.group(2)), match.group(2)  # by DHCP
        console.send("poweroff")
        assert console.wait(120) == 0
    finally:
        console.close()
    print(f"QEMU TCG: login prompt after {boot_seconds:.1f} s")
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.slow
@needs_apt
@needs_qemu
def test_hvc0_logs_root_in_by_itself(image, tmp_path):
    # Under pvhvm hvc0 is Xen's console, there from the start. Under QEMU it is
    # a virtio console: loaded in the initramfs, it is there before systemd's
    # getty generator looks, as Xen's is. Its output goes to a file; ttyS0
    # stays for logging in and powering off.
    from pvhvm.images import prepare_default_guest

    marker = 'echo "PVHVM-INIT-OK'
    init = DEFAULT_INIT.replace(marker, f"modprobe virtio_pci\nmodprobe virtio_console\n{marker}")
    guest = prepare_default_guest(init, modules=["virtio_console"])
    hvc = tmp_path / "hvc0.log"
    cmd = qemu_command(guest, f"{image.path},snapshot=on", f"console=ttyS0 console=hvc0 root=LABEL={LABEL} rw")
    cmd += ["-device", "virtio-serial-pci", "-chardev", f"file,id=hvc,path={hvc}", "-device", "virtconsole,chardev=hvc"]
    console = Console(cmd)
    try:
        console.expect(rb"pvhvm login: ", 240)
        deadline = time.monotonic() + 60
        while b"root@pvhvm:~# " not in hvc.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.5)
        out = hvc.read_bytes()
        assert b"pvhvm login: root (automatic login)" in out, out[-2000:]
        assert b"root@pvhvm:~# " in out, out[-2000:]
        console.send("root")
        console.expect(rb"root@pvhvm:~# ", 60)
        console.send("poweroff")
        assert console.wait(120) == 0
        assert b"Failed to connect to bus" not in console.seen
    finally:
        console.close()
