"""The default guest's preparation: the cpio writer, the initramfs layout,
kernel modules, bzImage payload decompression, and (slow) the real thing
from Debian packages."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import pvhvm
from conftest import PVH_NOTE, make_elf64
from pvhvm.builder import load_elf
from pvhvm.errors import BuildError
from pvhvm.images import (
    DEFAULT_INIT,
    CpioEntry,
    DebPackage,
    Initramfs,
    build_initramfs,
    cache_dir,
    collect_modules,
    extract_vmlinux,
    GUEST_ARCHES,
    apt_options,
    fetch_package,
    guest_arch,
    has_symbols,
    prepare_default_guest,
    resolve_package,
    write_newc,
)
from pvhvm.images import _payload_candidates

needs = {tool: pytest.mark.skipif(shutil.which(tool) is None, reason=f"no {tool}") for tool in ("lz4", "zstd", "xz")}


# --------------------------------------------------------------------------- a tiny newc reader


def read_newc(archive: bytes) -> dict[str, dict]:
    """Parse a newc archive independently of the writer: name -> fields."""
    members, off = {}, 0
    while True:
        assert off % 4 == 0
        assert archive[off : off + 6] == b"070701", f"bad magic at {off}"
        fields = [int(archive[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, _ = fields
        name_end = off + 110 + namesize
        assert archive[name_end - 1] == 0, "name is not NUL-terminated"
        name = archive[off + 110 : name_end - 1].decode()
        data_start = name_end + (-name_end % 4)
        data = archive[data_start : data_start + size]
        off = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            assert off == len(archive)
            return members
        assert name not in members
        members[name] = dict(ino=ino, mode=mode, uid=uid, gid=gid, nlink=nlink, mtime=mtime, data=data,
                             rdev=(rmaj, rmin))


def fake_busybox(tmp_path: Path, applets: list[str]) -> Path:
    """A script standing in for busybox: answers --list like the real one."""
    path = tmp_path / "busybox"
    path.write_text("#!/bin/sh\n" + "".join(f"echo '{a}'\n" for a in applets))
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------- cpio


def test_newc_round_trip_keeps_types_modes_and_data():
    fs = Initramfs()
    fs.add_file("etc/motd", b"hello\n")  # parent added on the fly
    fs.add_file("/bin/tool", b"\x7fELF....", 0o755)
    fs.add_symlink("bin/sh", "busybox")
    fs.add_char_device("dev/console", 5, 1)
    fs.add_dir("tmp", 0o1777)
    members = read_newc(fs.to_bytes())

    assert list(members) == ["etc", "etc/motd", "bin", "bin/tool", "bin/sh", "dev", "dev/console", "tmp"]
    assert members["etc/motd"]["mode"] == stat.S_IFREG | 0o644 and members["etc/motd"]["data"] == b"hello\n"
    assert members["bin/tool"]["mode"] == stat.S_IFREG | 0o755
    assert members["bin/sh"]["mode"] == stat.S_IFLNK | 0o777 and members["bin/sh"]["data"] == b"busybox"
    assert stat.S_ISCHR(members["dev/console"]["mode"]) and members["dev/console"]["rdev"] == (5, 1)
    assert members["tmp"]["mode"] == stat.S_IFDIR | 0o1777
    assert all(m["uid"] == m["gid"] == m["mtime"] == 0 for m in members.values())
    assert [m["nlink"] for m in members.values()] == [2, 1, 2, 1, 1, 2, 1, 2]
    assert len({m["ino"] for m in members.values()}) == len(members)


@pytest.mark.parametrize("name_len", range(1, 9))
@pytest.mark.parametrize("data_len", [0, 1, 2, 3, 4, 5])
def test_newc_padding_for_every_name_and_data_length(name_len, data_len):
    entry = CpioEntry("n" * name_len, stat.S_IFREG | 0o600, b"d" * data_len)
    archive = write_newc([entry])
    assert len(archive) % 4 == 0
    assert read_newc(archive)["n" * name_len]["data"] == b"d" * data_len


def test_initramfs_replaces_a_path_in_place_and_rejects_escapes():
    fs = Initramfs()
    fs.add_file("init", b"one")
    fs.add_file("etc/x", b"")
    fs.add_file("init", b"two", 0o755)
    members = read_newc(fs.to_bytes())
    assert list(members) == ["init", "etc", "etc/x"] and members["init"]["data"] == b"two"
    for bad in ("", "/", "a/../../etc"):
        with pytest.raises(BuildError):
            fs.add_file(bad, b"")


def test_compressed_initramfs_is_gzip_of_the_same_archive():
    fs = Initramfs()
    fs.add_file("init", b"#!/bin/sh\n", 0o755)
    assert gzip.decompress(fs.to_bytes(compress=True)) == fs.to_bytes()
    assert fs.to_bytes(compress=True) == fs.to_bytes(compress=True)  # reproducible


@pytest.mark.skipif(not (shutil.which("cpio") or shutil.which("bsdcpio")), reason="no cpio or bsdcpio")
def test_system_cpio_lists_our_archive(tmp_path):
    out = build_initramfs(tmp_path / "i.cpio", fake_busybox(tmp_path, ["sh", "ls"]))
    listing = subprocess.run([shutil.which("cpio") or shutil.which("bsdcpio"), "-t"], input=out.read_bytes(),
                             capture_output=True, check=True).stdout.decode().split()
    assert {"init", "bin/busybox", "bin/sh", "dev/console"} <= set(listing)


# --------------------------------------------------------------------------- initramfs layout


def test_build_initramfs_layout(tmp_path):
    busybox = fake_busybox(tmp_path, ["[", "sh", "mount", "poweroff", "busybox", "udhcpc"])
    extra = {"etc/hostname": b"guest\n", "/bin/hello": b"#!/bin/sh\necho hi\n"}
    out = build_initramfs(tmp_path / "initrd.cpio", busybox, "echo marker\npoweroff -f\n", extra_files=extra)
    m = read_newc(out.read_bytes())

    # "busybox" is in its own applet list but must stay the binary, not a self-link.
    assert m["bin/busybox"]["data"] == busybox.read_bytes() and m["bin/busybox"]["mode"] == stat.S_IFREG | 0o755
    for applet in ("[", "sh", "mount", "poweroff", "udhcpc"):
        assert m[f"bin/{applet}"]["mode"] == stat.S_IFLNK | 0o777 and m[f"bin/{applet}"]["data"] == b"busybox"
    for d in ("proc", "sys", "dev", "tmp", "etc", "root", "bin"):
        assert stat.S_ISDIR(m[d]["mode"])
    assert m["dev/console"]["mode"] == stat.S_IFCHR | 0o600 and m["dev/console"]["rdev"] == (5, 1)
    assert m["dev/null"]["mode"] == stat.S_IFCHR | 0o666 and m["dev/null"]["rdev"] == (1, 3)
    assert m["init"]["mode"] == stat.S_IFREG | 0o755
    assert m["init"]["data"] == b"#!/bin/sh\necho marker\npoweroff -f\n"  # shebang added
    assert m["etc/hostname"]["mode"] == stat.S_IFREG | 0o644
    assert m["bin/hello"]["mode"] == stat.S_IFREG | 0o755


def test_default_init_prints_the_marker_and_powers_off(tmp_path):
    out = build_initramfs(tmp_path / "initrd.cpio", fake_busybox(tmp_path, ["sh"]))
    init = read_newc(out.read_bytes())["init"]["data"].decode()
    assert init == DEFAULT_INIT and init.startswith("#!/bin/sh\n")
    assert 'PVHVM-INIT-OK uptime=$(cut -d\' \' -f1 /proc/uptime)' in init
    assert "mount -t devtmpfs" in init and init.rstrip().endswith("poweroff -f")


# --------------------------------------------------------------------------- kernel modules


def fake_module(name: str, depends: str) -> bytes:
    return b"\x7fELF" + b"\0" * 60 + b"license=GPL\0depends=" + depends.encode() + b"\0name=" + name.encode() + b"\0"


@pytest.fixture
def module_tree(tmp_path) -> Path:
    root = tmp_path / "lib/modules/6.1.0-test"
    (root / "kernel/net").mkdir(parents=True)
    (root / "kernel/lib").mkdir(parents=True)
    (root / "kernel/net/net-top.ko").write_bytes(fake_module("net_top", "mid,base"))
    (root / "kernel/lib/mid.ko.xz").write_bytes(lzma.compress(fake_module("mid", "base")))
    (root / "kernel/lib/base.ko").write_bytes(fake_module("base", ""))
    (root / "kernel/lib/lonely.ko").write_bytes(fake_module("lonely", ""))
    (root / "modules.builtin").write_text("kernel/lib/builtin.ko\n")
    return root


def test_modules_come_with_their_dependencies_in_load_order(module_tree):
    modules = collect_modules(module_tree, ["net-top"])
    assert [m.name for m in modules] == ["base", "mid", "net_top"]
    assert [m.relpath for m in modules] == ["kernel/lib/base.ko", "kernel/lib/mid.ko", "kernel/net/net-top.ko"]
    assert all(m.data.startswith(b"\x7fELF") for m in modules)  # the .xz one decompressed
    with pytest.raises(BuildError, match="nosuch"):
        collect_modules(module_tree, ["nosuch"])


@needs["zstd"]
def test_zstd_module_is_decompressed(module_tree):
    plain = module_tree / "kernel/lib/lonely.ko"
    subprocess.run(["zstd", "-q", "--rm", str(plain)], check=True)
    module = collect_modules(module_tree, ["lonely.ko"])[0]
    assert module.relpath == "kernel/lib/lonely.ko" and module.data == fake_module("lonely", "")


def test_initramfs_modules_and_modules_dep(tmp_path, module_tree):
    out = build_initramfs(tmp_path / "i.cpio", fake_busybox(tmp_path, ["sh"]), modules=["net_top", "lonely"],
                          modules_root=module_tree)
    m = read_newc(out.read_bytes())
    base = "lib/modules/6.1.0-test"
    assert m[f"{base}/kernel/lib/mid.ko"]["data"] == fake_module("mid", "base")
    # busybox modprobe loads a line's dependencies from the last one back.
    assert m[f"{base}/modules.dep"]["data"].decode().splitlines() == [
        "kernel/lib/base.ko:",
        "kernel/lib/mid.ko: kernel/lib/base.ko",
        "kernel/net/net-top.ko: kernel/lib/mid.ko kernel/lib/base.ko",
        "kernel/lib/lonely.ko:",
    ]
    assert m[f"{base}/modules.builtin"]["data"] == b"kernel/lib/builtin.ko\n"
    with pytest.raises(BuildError, match="modules"):
        build_initramfs(tmp_path / "j.cpio", fake_busybox(tmp_path, ["sh"]), modules=["lonely"])


# --------------------------------------------------------------------------- vmlinux extraction


TINY_ELF = make_elf64([(0x1000000, b"\x90" * 4096)], [(PVH_NOTE, struct.pack("<I", 0x1000000))], entry=0x1000000)


def compress(fmt: str, data: bytes) -> bytes:
    if fmt == "gzip":
        return gzip.compress(data)
    cmd = {"lz4": ["lz4", "-l", "-c"], "xz": ["xz", "-c", "--check=crc32"], "zstd": ["zstd", "-c", "-q"]}[fmt]
    return subprocess.run(cmd, input=data, capture_output=True, check=True).stdout


def noise(n: int) -> bytes:
    """Random bytes that cannot start a magic number (or "HdrS")."""
    return os.urandom(n).translate(bytes(0 if b in b"\x02\xfd\x1f\x28H" else b for b in range(256)))


def fake_bzimage(payload: bytes, uncompressed_len: int, with_header: bool) -> bytes:
    """Random setup code, then the payload followed by the uncompressed size
    (as the kernel build appends it), then more random bytes."""
    prefix = bytearray(noise(4 * 512))
    blob = payload + struct.pack("<I", uncompressed_len)
    if with_header:
        prefix[0x1F1] = 3  # setup sectors: the protected-mode part starts at 4 * 512
        prefix[0x1FE:0x200] = b"\x55\xaa"  # the boot sector's signature
        prefix[0x202:0x208] = b"HdrS" + struct.pack("<H", 0x20F)
        prefix[0x248:0x250] = struct.pack("<II", 0x40, len(blob))
        prefix += noise(0x40)
    return bytes(prefix) + blob + noise(300)


@pytest.mark.parametrize("with_header", [False, True], ids=["scan", "header"])
@pytest.mark.parametrize(
    "fmt", ["gzip", pytest.param("lz4", marks=needs["lz4"]), pytest.param("xz", marks=needs["xz"]),
            pytest.param("zstd", marks=needs["zstd"])]
)
def test_extract_vmlinux_finds_and_decompresses_the_payload(tmp_path, fmt, with_header):
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(fake_bzimage(compress(fmt, TINY_ELF), len(TINY_ELF), with_header))
    out = tmp_path / "out" / "vmlinux"
    assert extract_vmlinux(vmlinuz, out) == fmt
    assert out.read_bytes() == TINY_ELF
    assert load_elf(out).phys32_entry == 0x1000000
    assert not list(out.parent.glob("*.part"))


def test_the_boot_protocol_header_payload_is_tried_first(tmp_path):
    image = fake_bzimage(gzip.compress(TINY_ELF), len(TINY_ELF), with_header=True)
    decoy = gzip.compress(b"decoy")
    image = image[:0x300] + decoy + image[0x300 + len(decoy):]  # a payload magic before the real one
    fmt, start, end = _payload_candidates(image)[0]
    assert (fmt.name, start) == ("gzip", 4 * 512 + 0x40) and end == start + len(gzip.compress(TINY_ELF)) + 4


def test_extract_vmlinux_skips_a_payload_that_is_not_an_elf(tmp_path):
    decoy = gzip.compress(b"not a kernel" * 100)
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(noise(64) + decoy + gzip.compress(TINY_ELF) + b"\0" * 4)
    assert extract_vmlinux(vmlinuz, tmp_path / "vmlinux") == "gzip"
    assert (tmp_path / "vmlinux").read_bytes() == TINY_ELF


def test_extract_vmlinux_without_payload_is_a_build_error(tmp_path):
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(b"\0" * 8192)
    with pytest.raises(BuildError, match="no compressed kernel payload found"):
        extract_vmlinux(vmlinuz, tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()
    with pytest.raises(BuildError, match="cannot read"):
        extract_vmlinux(tmp_path / "missing", tmp_path / "vmlinux")


# --------------------------------------------------------------------------- a bzImage as the kernel


def pvhvm_cli(*args, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PVHVM_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "pvhvm", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def one_line_error(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pvhvm: ") and needle in lines[0], p.stderr


def test_a_bzimage_boots_as_its_vmlinux_and_is_cached_by_hash(guests, tmp_path, monkeypatch):
    """The hello guest wrapped as a bzImage (gzip payload) boots to its
    marker; the vmlinux taken out goes to the cache, named by the bzImage's
    hash, and the next load maps it from there."""
    monkeypatch.setenv("PVHVM_CACHE", str(tmp_path / "cache"))
    elf = guests["hello"].read_bytes()
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(fake_bzimage(gzip.compress(elf), len(elf), with_header=True))

    image = load_elf(bz)
    assert image.path == bz and image.compression == "gzip" and image.phys32_entry == 0x100000
    cached = list((tmp_path / "cache" / "bzimage").iterdir())
    assert cached == [image.elf_path] and cached[0].read_bytes() == elf
    assert load_elf(bz).elf_path == image.elf_path  # found again by the hash, not decompressed

    dom = pvhvm.Domain(bz, cmdline="answer=42", memory_mib=32)
    outcome = dom.run(timeout=60)
    assert outcome.exit_status == 0, outcome
    assert b"Hello from a PVH guest on pvhvm!" in dom.console_output

    p = pvhvm_cli("inspect", bz, cache=tmp_path / "cache")
    assert p.returncode == 0, p.stderr
    assert f"{bz}: ELF64 x86-64 (in a bzImage, gzip payload)" in p.stdout
    assert "PVH entry:        0x100000" in p.stdout


def test_bzimage_cache_keeps_the_most_recent(tmp_path, monkeypatch):
    from pvhvm.builder import bzimage

    monkeypatch.setenv("PVHVM_CACHE", str(tmp_path))
    paths = []
    for i in range(bzimage.CACHE_KEPT + 2):
        bz = tmp_path / f"vmlinuz-{i}"
        bz.write_bytes(fake_bzimage(gzip.compress(TINY_ELF), len(TINY_ELF), with_header=True))  # noise differs
        paths.append(load_elf(bz).elf_path)
    assert sorted((tmp_path / "bzimage").iterdir()) == sorted(paths[-bzimage.CACHE_KEPT:])


def test_bzimage_errors_are_one_line(tmp_path):
    """What can be wrong with a bzImage given as the kernel: each one line on
    stderr and status 2, from boot and from inspect."""
    no_pvh = make_elf64([(0x1000000, b"\xf4")], [(6, b"linux\0")])
    cases = {
        "no-pvh": (gzip.compress(no_pvh), len(no_pvh), "no PVH entry point in this bzImage's vmlinux"),
        "not-elf": (gzip.compress(b"not a kernel" * 64), 768, "no kernel ELF in its compressed payload (tried gzip)"),
        "bzip2": (b"BZh91AY&SY" + noise(200), 4096, "its compression (bzip2) is not one pvhvm decompresses"),
        "unknown": (b"\x01\x02\x03\x04" + noise(200), 4096, "(unknown, magic 01 02 03 04)"),
    }
    for name, (payload, size, needle) in cases.items():
        bz = tmp_path / f"vmlinuz-{name}"
        bz.write_bytes(fake_bzimage(payload, size, with_header=True))
        one_line_error(pvhvm_cli("boot", bz, "--memory", "32", "--net", "none", cache=tmp_path / "cache"), needle)
        if name != "no-pvh":  # inspect shows a kernel without PVH entry rather than refusing it
            one_line_error(pvhvm_cli("inspect", bz, cache=tmp_path / "cache"), needle)


# --------------------------------------------------------------------------- cache, apt, System.map


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("PVHVM_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "pvhvm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pvhvm"
    monkeypatch.setenv("PVHVM_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_debian_system_map_placeholder_is_not_symbols(tmp_path):
    placeholder = tmp_path / "placeholder"
    placeholder.write_text("ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")
    real = tmp_path / "real"
    real.write_text("ffffffff81000000 T _stext\nffffffff81000000 T startup_64\n")
    assert not has_symbols(placeholder) and has_symbols(real) and not has_symbols(tmp_path / "missing")


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="no apt")
def test_unknown_package_is_a_one_line_build_error():
    with pytest.raises(BuildError) as info:
        resolve_package("pvhvm-no-such-package")
    assert "\n" not in str(info.value)



@pytest.mark.skipif(shutil.which("apt-get") is None, reason="no apt")
def test_download_failure_is_a_one_line_build_error(tmp_path):
    with pytest.raises(BuildError, match="downloading busybox-static failed") as info:
        fetch_package(DebPackage("busybox-static", "0.0-pvhvm-none", "amd64"), tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "packages").exists()


# --------------------------------------------------------------------------- architectures


def test_the_two_architectures_and_their_kernels():
    assert guest_arch("amd64").kernel_metapackage == "linux-image-cloud-amd64"
    assert guest_arch("amd64").manifest == "default-guest.json"  # the cache paths of before
    assert (guest_arch("i386").kernel_metapackage, guest_arch("i386").elf_machine) == ("linux-image-686-pae", 3)
    assert len({a.manifest for a in GUEST_ARCHES.values()}) == len(GUEST_ARCHES)


def test_unknown_arch_is_a_one_line_build_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PVHVM_CACHE", str(tmp_path))
    with pytest.raises(BuildError, match="unknown guest architecture 'arm64': use amd64 or i386") as info:
        prepare_default_guest(arch="arm64")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing fetched, nothing written


host_is_amd64 = pytest.mark.skipif(
    shutil.which("dpkg") is None
    or subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip() != "amd64",
    reason="needs an amd64 Debian host",
)


@host_is_amd64
def test_apt_options_keep_a_foreign_arch_in_lists_of_our_own(tmp_path):
    assert apt_options("amd64", tmp_path) == []  # the host's own: its apt as configured
    options = apt_options("i386", tmp_path)
    settings = dict(o.split("=", 1) for o in options[1::2])
    assert options[::2] == ["-o"] * len(settings)
    assert settings == {
        "APT::Architecture": "i386",
        "APT::Architectures::": "i386",
        "Dir::State::Lists": str(tmp_path / "apt" / "i386" / "lists"),
        "Dir::Cache": str(tmp_path / "apt" / "i386" / "cache"),
    }
    # apt wants the partial/ directories to exist before it downloads.
    assert (tmp_path / "apt/i386/lists/partial").is_dir() and (tmp_path / "apt/i386/cache/archives/partial").is_dir()


@pytest.mark.parametrize("args", [["fetch-guest", "--arch", "arm64"], ["boot", "--arch", "x86"]])
def test_cli_bad_arch_is_one_line_and_status_2(args, tmp_path):
    env = {**os.environ, "PVHVM_CACHE": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "pvhvm", *args], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.splitlines() == [f"pvhvm: --arch must be amd64 or i386, not {args[-1]!r}"]
    assert list(tmp_path.iterdir()) == []


def test_cli_arch_is_for_the_default_guest_only(tmp_path):
    env = {**os.environ, "PVHVM_CACHE": str(tmp_path)}
    for args in (["boot", str(tmp_path / "vmlinux"), "--arch", "i386"], ["fetch-guest", "--arch", "i386", "--rootfs"]):
        p = subprocess.run([sys.executable, "-m", "pvhvm", *args], capture_output=True, text=True, timeout=60, env=env)
        assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the real default guest


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt (Debian)")
def test_prepare_default_guest_for_real(capfd):
    guest = prepare_default_guest()
    capfd.readouterr()

    image = load_elf(guest.vmlinux)
    assert (image.elf_class, image.machine) == (64, 62)
    assert image.phys32_entry is not None  # XEN_ELFNOTE_PHYS32_ENTRY: bootable as PVH
    assert guest.kernel_package.startswith(f"linux-image-{guest.kernel_version} ")
    assert guest.system_map is None or has_symbols(guest.system_map)
    members = read_newc(guest.initrd.read_bytes())
    assert members["init"]["data"] == DEFAULT_INIT.encode()
    assert members["bin/busybox"]["data"].startswith(b"\x7fELF")
    assert {"sh", "mount", "poweroff", "udhcpc", "insmod", "modprobe", "wget"} <= {
        name.removeprefix("bin/") for name, m in members.items() if stat.S_ISLNK(m["mode"])
    }

    # Cached: the same files, nothing downloaded or rebuilt.
    assert prepare_default_guest() == guest
    assert "pvhvm:" not in capfd.readouterr().err

    # A different init script or module list gets its own initrd.
    other = prepare_default_guest("echo other\npoweroff -f\n", modules=["xen-netfront"])
    assert other.initrd != guest.initrd and other.vmlinux == guest.vmlinux
    members = read_newc(other.initrd.read_bytes())
    assert any(name.endswith("/xen-netfront.ko") for name in members)
    assert f"lib/modules/{guest.kernel_version}/modules.dep" in members


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt (Debian)")
def test_debian_vmlinuz_boots_as_given(tmp_path, monkeypatch):
    """Debian's own /boot/vmlinuz (a bzImage, lz4 payload) given as the
    kernel boots to the default init's marker, as `pvhvm boot vmlinuz` would."""
    guest = prepare_default_guest()
    vmlinuz = guest.modules_root.parents[2] / "boot" / f"vmlinuz-{guest.kernel_version}"
    assert vmlinuz.read_bytes()[:4] != b"\x7fELF"
    monkeypatch.setenv("PVHVM_CACHE", str(tmp_path))  # the vmlinux taken out goes here, not in the real cache

    dom = pvhvm.Domain(vmlinuz, initrd=guest.initrd, cmdline="console=hvc0", memory_mib=256)
    assert dom.image.compression == guest.payload_compression == "lz4"
    assert dom.image.elf_path.read_bytes() == guest.vmlinux.read_bytes()
    outcome = dom.run(timeout=600)
    assert b"PVHVM-INIT-OK" in dom.console_output, dom.console_output[-2000:]
    assert outcome.exit_status == 0, outcome
    # Crash reports name addresses from the kallsyms of the vmlinux taken out.
    from pvhvm.symbols import load_symbols

    symbols = load_symbols(vmlinuz)
    assert len(symbols) > 20_000 and symbols.source.startswith("kallsyms of ")
