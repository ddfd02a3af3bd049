"""The 32-bit default guest: Debian's i386 linux-image-686-pae (built with
CONFIG_XEN_PVH) and busybox-static:i386, prepared by pvhvm.images with
arch="i386" (about 55 MB downloaded on the first run, apt lists of its own).

The artifacts are proven under QEMU TCG, which boots the vmlinux by its PVH
note as pvhvm does, to the /init marker with the i386 modules loading; then
`pvhvm boot --arch i386` boots them to /init with hvc0, xenstore and
netfront (eth0 by DHCP through passt), and its xen-blkfront, which speaks
the x86_32 blkif ABI, reads and writes disks that blkback serves."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

import pvhvm
from pvhvm.builder import load_elf
from pvhvm.devices.blkback import ABI_X86_32
from pvhvm.devices.net_host import find_passt
from pvhvm.images import DEFAULT_INIT, DEFAULT_MODULES, prepare_default_guest
from pvhvm.shell import GuestShell

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt (Debian)")]

EM_386 = 3
QEMU = shutil.which("qemu-system-i386")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-i386 (Debian's qemu-system-x86)")


@pytest.fixture(scope="module")
def guest():
    return prepare_default_guest(arch="i386")


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF"
    return int.from_bytes(data[18:20], "little")


def newc_names(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of an uncompressed newc archive."""
    members, off = {}, 0
    while True:
        fields = [int(archive[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = off + 110 + namesize
        name = archive[off + 110 : name_end - 1].decode()
        start = name_end + (-name_end % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, archive[start : start + size])
        off = start + size + (-size % 4)


def test_the_kernel_is_debians_686_pae_with_pvh(guest):
    assert guest.arch == "i386"
    assert guest.kernel_version.endswith("-686-pae")
    assert guest.kernel_package.startswith(f"linux-image-{guest.kernel_version} ")
    config = (guest.modules_root.parents[2] / "boot" / f"config-{guest.kernel_version}").read_text()
    assert "\nCONFIG_XEN_PVH=y\n" in config and "\nCONFIG_X86_32=y\n" in config
    # The payload's compression is what the config says (xz for this flavour).
    assert f"\nCONFIG_KERNEL_{guest.payload_compression.upper()}=y\n" in config
    image = load_elf(guest.vmlinux)
    assert (image.elf_class, image.machine) == (32, EM_386)
    assert image.phys32_entry is not None  # XEN_ELFNOTE_PHYS32_ENTRY: bootable as PVH


def test_the_initrd_is_all_i386(guest):
    members = newc_names(guest.initrd.read_bytes())
    assert members["init"][1] == DEFAULT_INIT.encode()
    assert elf_machine(members["bin/busybox"][1]) == EM_386
    applets = {name.removeprefix("bin/") for name, (mode, _) in members.items() if stat.S_ISLNK(mode)}
    assert {"sh", "modprobe", "udhcpc", "findfs", "switch_root", "cttyhack", "setsid"} <= applets
    modules = {name.rpartition("/")[2]: data for name, (_, data) in members.items() if name.endswith(".ko")}
    for name in DEFAULT_MODULES:
        assert elf_machine(modules[f"{name}.ko"]) == EM_386, name
    assert f"lib/modules/{guest.kernel_version}/modules.dep" in members


def test_cached_and_apart_from_the_amd64_guest(guest, capfd):
    capfd.readouterr()
    assert prepare_default_guest(arch="i386") == guest
    assert "pvhvm:" not in capfd.readouterr().err  # nothing downloaded or rebuilt
    manifest = guest.initrd.parents[1] / "default-guest-i386.json"
    assert '"arch": "i386"' in manifest.read_text()


def test_cli_fetch_guest_prints_the_cached_i386_guest(guest):
    p = subprocess.run([sys.executable, "-m", "pvhvm", "fetch-guest", "--arch", "i386"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"vmlinux: {guest.vmlinux}\n" in p.stdout and f"initrd:  {guest.initrd}\n" in p.stdout
    assert f"({guest.kernel_package}, i386)" in p.stdout


@needs_qemu
def test_boots_to_init_under_qemu_and_loads_its_modules(guest, tmp_path):
    # root=/dev/vda on a blank virtio disk: /init must modprobe virtio_pci and
    # virtio_blk from the i386 package for /dev/vda to appear, then finds no
    # file system on it, says so and powers off (QEMU exits, -no-reboot).
    blank = tmp_path / "blank.img"
    with blank.open("wb") as f:
        f.truncate(1 << 20)
    cmd = [
        QEMU, "-M", "pc", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(guest.vmlinux), "-initrd", str(guest.initrd), "-append", "console=ttyS0 root=/dev/vda",
        "-drive", f"file={blank},if=virtio,format=raw",
    ]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    log = p.stdout.decode(errors="replace").replace("\r", "")
    assert p.returncode == 0, log[-3000:]
    assert "Linux version " + guest.kernel_version in log
    assert "PVHVM-INIT-OK uptime=" in log, log[-3000:]
    assert "PVHVM-INIT: cannot mount /dev/vda (ext4, ro) for root=/dev/vda" in log, log[-3000:]
    assert "reboot: Power down" in log


# --------------------------------------------------------------------------- under pvhvm

BAD = re.compile(r"\b(BUG|WARNING|Oops|Call Trace|panic|segfault)\b")


# What this needed of the core beyond the 32-bit hypercall ABI: the i386
# kernel (no CONFIG_XEN_UNPOPULATED_ALLOC) gives 64 RAM pages back for its
# grant frames and places them there (decrease_reservation, then
# add_to_physmap), and its vDSO enters the kernel by SYSENTER (CPUID's SEP).
@pytest.mark.skipif(find_passt() is None, reason="needs passt for the network card (apt-get install passt)")
def test_pvhvm_boots_it_to_init_with_hvc0_xenstore_and_netfront(guest):
    cmd = [sys.executable, "-m", "pvhvm", "boot", "--arch", "i386", "--net", "passt", "--timeout", "300"]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=400)
    log, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    assert p.returncode == 0, (log[-3000:], err[-3000:])
    for line in ("Booting kernel on Xen PVH", "printk: console [hvc0] enabled", "Grant table initialized",
                 "clocksource: Switched to clocksource xen", "PVHVM-INIT-OK uptime=",
                 "xen_netfront: Initialising Xen virtual ethernet driver", "reboot: Power down"):
        assert line in log, (line, log[-3000:])
    # xenstore: netfront found its vif there, connected, and eth0 got a lease.
    assert re.search(r"udhcpc: lease of [0-9.]+ obtained", log), log[-3000:]
    assert [line for line in log.splitlines() if BAD.search(line)] == []


# --------------------------------------------------------------------------- disks (x86_32-abi)

MIB = 1 << 20
SECTOR = 512
WAIT_XVDA = "i=0; while [ ! -b /dev/xvda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done"


def test_pvhvm_boot_i386_with_a_disk_reads_and_writes_it(guest, tmp_path):
    """`pvhvm boot --arch i386 --disk IMG` with commands piped in: the
    686-pae kernel's blkfront (protocol x86_32-abi) gets /dev/xvda of the
    image's size, reads what the host put there, writes a pattern through
    the page cache, syncs, and the host finds it in the image."""
    img = tmp_path / "disk.img"
    host_data = os.urandom(MIB)
    with img.open("wb") as f:
        f.write(host_data)
        f.truncate(16 * MIB)
    # Results between = signs: the console's echo of a command line (where
    # "$(" follows the name) cannot match the patterns below.
    script = "\n".join([
        f"modprobe xen-blkfront; {WAIT_XVDA}",
        'echo "=SIZE=$(cat /sys/block/xvda/size)="',
        'echo "=HOST=$(dd if=/dev/xvda bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -c1-32)="',
        "dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null",
        'echo "=PATTERN=$(md5sum < /tmp/p | cut -c1-32)="',
        'dd if=/tmp/p of=/dev/xvda bs=1M seek=2 2>/dev/null && sync && echo "=SYNCED=$?="',
        'echo "=BACK=$(dd if=/dev/xvda bs=1M skip=2 count=4 iflag=direct 2>/dev/null | md5sum | cut -c1-32)="',
        "",
    ])
    cmd = [sys.executable, "-m", "pvhvm", "boot", "--arch", "i386", "--net", "none", "--disk", str(img),
           "--timeout", "300"]
    p = subprocess.run(cmd, input=script.encode(), capture_output=True, timeout=400)
    log, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    assert p.returncode == 0, (log[-3000:], err[-3000:])

    def result(name: str, pattern: str = r"[0-9a-f]{32}") -> str:
        m = re.search(rf"={name}=({pattern})=", log)
        assert m, (name, log[-3000:])
        return m.group(1)

    assert result("SIZE", r"\d+") == str(16 * MIB // SECTOR)
    assert result("HOST") == hashlib.md5(host_data).hexdigest()
    assert result("SYNCED", r"\d+") == "0"
    written = img.read_bytes()[2 * MIB : 6 * MIB]
    assert hashlib.md5(written).hexdigest() == result("PATTERN") == result("BACK")
    assert img.read_bytes()[:MIB] == host_data  # untouched around the write
    assert "reboot: Power down" in log
    assert [line for line in log.splitlines() if BAD.search(line)] == []


def test_i386_blkfront_gets_the_x86_32_ring(guest, tmp_path):
    """The same through the API, to look at blkback's side: both vbds
    connected with the x86_32 layout (108-byte slots), direct I/O large
    enough for indirect requests, a flush from fsync, discard punching a
    hole, and a read-only disk that reads and refuses writes."""
    rw, ro = tmp_path / "rw.img", tmp_path / "ro.img"
    with rw.open("wb") as f:
        f.truncate(32 * MIB)
    ro_content = os.urandom(64 * 1024)
    ro.write_bytes(ro_content)
    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0 quiet pvhvm.shell",
                       memory_mib=256, disks=[str(rw), f"{ro},ro"])
    try:
        dom.expect("PVHVM-INIT-OK", 180)
        sh = GuestShell(dom)
        sh.ok("dmesg -n 1")
        sh.ok(f"modprobe xen-blkfront && {WAIT_XVDA}; while [ ! -b /dev/xvdb ] && [ $i -lt 200 ]; do sleep 0.1;"
              " i=$((i+1)); done; [ -b /dev/xvda ] && [ -b /dev/xvdb ]", 60)
        for vbd in dom.disks:
            assert dom.store.read(0, f"{vbd.frontend_path}/protocol") == b"x86_32-abi"
            assert vbd.connected and vbd.abi is ABI_X86_32, vbd
            assert [q.ring.slot_size for q in vbd.queues] == [108]
        vbd = dom.disks[0]
        assert sh.ok("cat /sys/block/xvda/size /sys/block/xvdb/size").split() == [
            str(32 * MIB // SECTOR), str(64 * 1024 // SECTOR)]

        sh.ok("dd if=/dev/urandom of=/tmp/r bs=1M count=16 2>/dev/null")
        sh.ok("dd if=/tmp/r of=/dev/xvda bs=1M oflag=direct 2>/dev/null", 120)
        md5 = sh.ok("md5sum /tmp/r").split()[0]
        assert hashlib.md5(rw.read_bytes()[: 16 * MIB]).hexdigest() == md5
        back = sh.ok("dd if=/dev/xvda bs=1M count=16 iflag=direct 2>/dev/null | md5sum", 120).split()[0]
        assert back == md5
        stats = vbd.stats
        assert stats["indirect"] > 0 and stats["sectors_written"] >= 16 * MIB // SECTOR, stats
        assert stats["errors"] == 0, stats

        # fsync on the block device makes blkfront send a flush (sync alone
        # only writes the pages back).
        flushes = stats["flushes"]
        sh.ok("dd if=/dev/urandom of=/dev/xvda bs=4096 count=4 seek=5000 conv=fsync 2>/dev/null")
        assert vbd.stats["flushes"] > flushes

        sh.ok("dd if=/dev/urandom of=/dev/xvda bs=1M count=2 seek=20 oflag=direct 2>/dev/null")
        sh.ok(f"blkdiscard -o {20 * MIB} -l {2 * MIB} /dev/xvda")
        with rw.open("rb") as f:
            assert os.lseek(f.fileno(), 20 * MIB, os.SEEK_HOLE) == 20 * MIB
            f.seek(20 * MIB)
            assert f.read(2 * MIB) == bytes(2 * MIB)
        assert vbd.stats["discards"] >= 1

        out = sh.ok(f"dd if=/dev/xvdb bs={len(ro_content)} count=1 iflag=direct 2>/dev/null | md5sum")
        assert out.split()[0] == hashlib.md5(ro_content).hexdigest()
        out = sh.run("dd if=/dev/zero of=/dev/xvdb bs=4096 count=1 oflag=direct")
        assert sh.status != 0, out
        assert ro.read_bytes() == ro_content
        assert all(v.connected and v.failure is None for v in dom.disks)
        assert dom.outcome is None
    finally:
        dom.close()
