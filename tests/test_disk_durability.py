"""Nothing the guest synced is lost: an ext4 file system on a vbd, written
by Debian's kernel through xen-blkfront and pvhvm's blkback, survives a
SIGKILL of pvhvm right after `sync` (the journal replays at the next
mount), matches byte for byte on the host, and `e2fsck -fn` finds it
clean after a clean power-off."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import pvhvm
from pvhvm.images import prepare_default_guest
from pvhvm.shell import GuestShell

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mke2fs") is None, reason="e2fsprogs is installed by scripts/setup"),
]

MiB = 1 << 20
# blkfront probes asynchronously (xenbus): wait for the device node.
ATTACH = "modprobe xen-blkfront && for i in $(seq 100); do [ -b /dev/xvda ] && break; sleep 0.1; done && mkdir -p /mnt"


@pytest.fixture(scope="module")
def guest():
    return prepare_default_guest()


def make_ext4(path, size_mib: int = 160) -> None:
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "pvhvm-data", str(path)], check=True)


def e2fsck(path) -> subprocess.CompletedProcess:
    return subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True)


def mounted_shell(guest, image, **kw) -> tuple[pvhvm.Domain, GuestShell]:
    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0 quiet pvhvm.shell",
                       memory_mib=320, disks=[str(image)], **kw)
    dom.expect("PVHVM-INIT-OK", 120)
    sh = GuestShell(dom)
    sh.ok(f"{ATTACH} && mount -t ext4 /dev/xvda /mnt")
    return dom, sh


def read_until(proc: subprocess.Popen, pattern: bytes, timeout: float) -> bytes:
    """Read the child's stdout until `pattern` shows (or fail)."""
    buf = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    while re.search(pattern, buf) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} within {timeout} s; got:\n{buf[-2000:].decode(errors='replace')}")
        if proc.poll() is not None:
            raise AssertionError(f"pvhvm ended ({proc.returncode}) before {pattern!r}:\n"
                                 f"{buf[-2000:].decode(errors='replace')}")
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.05)
            continue
        buf += chunk
    return buf


def test_sigkill_after_sync_loses_nothing(guest, tmp_path):
    image = tmp_path / "data.img"
    make_ext4(image)
    # pvhvm as a user runs it, killed with SIGKILL once the guest says synced.
    proc = subprocess.Popen([sys.executable, "-m", "pvhvm", "boot", "--net", "none", "--memory", "320",
                             "--disk", str(image), "--cmdline", "console=hvc0 quiet"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        read_until(proc, rb"PVHVM-INIT-OK", 120)
        script = (f"{ATTACH} && mount -t ext4 /dev/xvda /mnt && "
                  "dd if=/dev/urandom of=/mnt/payload bs=1M count=64 2>/dev/null && "
                  "echo SUM=$(md5sum /mnt/payload) && sync && echo SYN''CED\n")
        proc.stdin.write(script.encode())
        proc.stdin.flush()
        out = read_until(proc, rb"SYNCED", 180)
    finally:
        proc.kill()  # SIGKILL: no chance to flush anything else
        proc.wait()
    assert proc.returncode == -9
    guest_sum = re.search(rb"SUM=([0-9a-f]{32})", out).group(1).decode()

    # The journal replays at the next mount; the file is whole.
    dom, sh = mounted_shell(guest, image)
    assert sh.ok("md5sum /mnt/payload").split()[0] == guest_sum
    sh.ok("umount /mnt")
    sh.start("poweroff -f")
    assert dom.run(timeout=60).exit_status == 0
    dom.close()

    fsck = e2fsck(image)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # And the host reads the same 64 MiB out of the image.
    dump = tmp_path / "payload"
    subprocess.run(["debugfs", "-R", f"dump /payload {dump}", str(image)], check=True, capture_output=True)
    assert hashlib.md5(dump.read_bytes()).hexdigest() == guest_sum
    assert dump.stat().st_size == 64 * MiB


def test_clean_poweroff_leaves_a_clean_file_system(guest, tmp_path):
    image = tmp_path / "data.img"
    make_ext4(image, 64)
    dom, sh = mounted_shell(guest, image, vcpus=2)
    sh.ok("mkdir /mnt/d && for i in 1 2 3 4 5 6 7 8; do echo file $i > /mnt/d/f$i; done && "
          "dd if=/dev/zero of=/mnt/zeros bs=1M count=8 2>/dev/null && rm /mnt/d/f3")
    sh.ok("umount /mnt")
    sh.start("poweroff -f")
    assert dom.run(timeout=60).exit_status == 0
    assert dom.disks[0].stats["writes"] > 0 and dom.disks[0].failure is None
    dom.close()
    fsck = e2fsck(image)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listing = subprocess.run(["debugfs", "-R", "ls /d", str(image)], capture_output=True, text=True).stdout
    assert "f1" in listing and "f8" in listing and "f3" not in listing
