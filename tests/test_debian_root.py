"""A real Debian 12 on a disk: the default initramfs hands over to systemd
on /dev/xvda (pvhvm's blkback), which reaches the root autologin on hvc0,
gets the network by DHCP (systemd-networkd over netback and passt), and
powers off cleanly with `poweroff`; the file system is clean afterwards.
The image is built once by pvhvm.rootfs (mmdebstrap, mke2fs -d) and cached."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import pvhvm
from pvhvm.devices.net_host import find_passt
from pvhvm.images import prepare_default_guest
from pvhvm.rootfs import prepare_debian_rootfs

pytestmark = pytest.mark.slow

PROMPT = rb"root@pvhvm[^\r\n#]*# "
BOOT_TIMEOUT = 300


@pytest.fixture(scope="module")
def guest():
    return prepare_default_guest()


@pytest.fixture(scope="module")
def rootfs_image():
    return prepare_debian_rootfs()


@pytest.fixture
def disk(rootfs_image, tmp_path):
    """A private copy of the cached image (sparse: a copy is quick)."""
    copy = tmp_path / "debian.img"
    subprocess.run(["cp", "--sparse=always", str(rootfs_image.path), str(copy)], check=True)
    return copy


def fsck_clean(image) -> None:
    r = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(find_passt() is None, reason="passt is installed by scripts/setup")
def test_systemd_boots_from_disk_with_dhcp_and_powers_off(guest, disk):
    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0 root=LABEL=pvhvm-root rw",
                       memory_mib=512, disks=[str(disk)], net="passt")
    dom.expect(rb"PVHVM-INIT: switching to /dev/xvda", 120)
    dom.expect(rb"Welcome to .*Debian GNU/Linux 12", 60)
    dom.expect(rb"pvhvm login: root \(automatic login\)", BOOT_TIMEOUT)
    dom.expect(PROMPT, 60)
    dom.send("systemctl is-system-running --wait; ip -4 -o addr show scope global; findmnt -no SOURCE,FSTYPE /\n")
    state = dom.expect(rb"[\r\n](running|degraded)\r\n", 120).group(1)
    if state == b"degraded":
        dom.send("systemctl --failed --no-legend\n")
        dom.expect(PROMPT, 30)
        pytest.fail(f"failed units: {dom.console_output[-1500:].decode(errors='replace')}")
    # The vif got its address by DHCP from passt (a global IPv4 address).
    dom.expect(rb"\d+: \S+\s+inet \d+\.\d+\.\d+\.\d+/\d+", 30)
    dom.expect(rb"/dev/xvda ext4", 30)
    dom.expect(PROMPT, 30)
    dom.send("poweroff\n")
    outcome = dom.run(timeout=120)
    assert outcome.exit_status == 0, outcome
    out = dom.console_output.decode(errors="replace")
    assert "reboot: Power down" in out
    assert not re.search(r"\b(BUG|Oops|Call Trace)\b", out), out[-3000:]
    vbd = dom.disks[0]
    assert vbd.failure is None and vbd.stats["reads"] > 100 and vbd.stats["writes"] > 0
    dom.close()
    fsck_clean(disk)


def test_cli_boots_the_debian_disk(guest, rootfs_image, tmp_path):
    """The README's two commands: `pvhvm rootfs debian.img`, then
    `pvhvm boot --disk debian.img --root LABEL=...`: the login appears on the
    console, `poweroff` typed in ends pvhvm with status 0."""
    disk = tmp_path / "debian.img"
    made = subprocess.run([sys.executable, "-m", "pvhvm", "rootfs", str(disk)], capture_output=True, text=True)
    assert made.returncode == 0 and made.stdout.strip() == str(disk), made.stderr
    assert disk.stat().st_blocks * 512 < disk.stat().st_size  # sparse
    again = subprocess.run([sys.executable, "-m", "pvhvm", "rootfs", str(disk)], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.strip() == f"pvhvm: {disk}: already exists; not overwriting it"
    proc = subprocess.Popen([sys.executable, "-m", "pvhvm", "boot", "--net", "none", "--memory", "512",
                             "--disk", f"{disk},vdev=xvda", "--root", "LABEL=pvhvm-root"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    buf = b""
    deadline = time.monotonic() + BOOT_TIMEOUT
    os.set_blocking(proc.stdout.fileno(), False)
    try:
        sent = False
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                buf += os.read(proc.stdout.fileno(), 65536)
            except BlockingIOError:
                time.sleep(0.1)
            if not sent and re.search(PROMPT, buf):
                proc.stdin.write(b"poweroff\n")
                proc.stdin.flush()
                sent = True
        assert sent, buf[-3000:].decode(errors="replace")
        assert proc.wait(timeout=120) == 0, buf[-3000:].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"pvhvm: domain shutdown (poweroff)" in buf
    fsck_clean(disk)
