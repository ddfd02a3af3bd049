"""The CLI: bad input gets one line on stderr and status 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pvhvm import BuildError, Domain

from conftest import PVH_NOTE, make_elf64

PVHVM = [sys.executable, "-m", "pvhvm"]


def pvhvm(*args, **kw):
    return subprocess.run([*PVHVM, *map(str, args)], capture_output=True, text=True, timeout=60, **kw)


def one_line_error(p, needle):
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pvhvm: ") and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_missing_kernel(tmp_path):
    one_line_error(pvhvm("boot", tmp_path / "nope"), "no such file")


def test_kernel_is_a_directory(tmp_path):
    one_line_error(pvhvm("boot", tmp_path), "is a directory")


def test_unreadable_kernel(tmp_path):
    f = tmp_path / "k"
    f.write_bytes(b"x")
    f.chmod(0)
    p = pvhvm("boot", f, preexec_fn=None)
    if p.returncode == 2 and "cannot read" in p.stderr:
        one_line_error(p, "cannot read")
    else:  # root reads anything: then it is simply not an ELF
        one_line_error(p, "not an ELF file")


def test_not_an_elf(tmp_path):
    f = tmp_path / "k"
    f.write_bytes(b"#!/bin/sh\necho hi\n")
    one_line_error(pvhvm("boot", f), "not an ELF file")


def test_elf_without_pvh_note(tmp_path):
    f = tmp_path / "k"
    f.write_bytes(make_elf64([(0x100000, b"\xf4")], [(6, b"linux\0")]))
    one_line_error(pvhvm("boot", f), "no PVH entry point")


def test_segment_outside_ram(tmp_path):
    f = tmp_path / "k"
    f.write_bytes(make_elf64([(0x7000_0000, b"\xf4" * 16)], [(PVH_NOTE, (0x7000_0000).to_bytes(4, "little"))]))
    one_line_error(pvhvm("boot", f, "--memory", "64"), "outside guest RAM")


def test_initrd_that_does_not_fit(guests, tmp_path):
    big = tmp_path / "big.img"
    big.write_bytes(b"\0" * (40 << 20))
    one_line_error(pvhvm("boot", guests["hello"], "--memory", "32", "--initrd", big), "does not fit")


def test_missing_initrd(guests, tmp_path):
    one_line_error(pvhvm("boot", guests["hello"], "--initrd", tmp_path / "none"), "no such initrd")


@pytest.mark.parametrize("mem, needle", [("0", "positive"), ("8", "too small"), ("999999", "limit")])
def test_bad_memory(guests, mem, needle):
    one_line_error(pvhvm("boot", guests["hello"], "--memory", mem), needle)


@pytest.mark.parametrize("args, needle", [(["--memory", "64", "--maxmem", "32"], "below memory"),
                                          (["--maxmem", "0"], "positive"),
                                          (["--memory", "32", "--maxmem", "999999"], "limit")])
def test_bad_maxmem(guests, args, needle):
    one_line_error(pvhvm("boot", guests["hello"], *args), needle)


def test_maxmem_gives_the_guest_maxmem_of_ram(guests):
    """hello's guest reports its memory map: maxmem of RAM, memory as the target."""
    from pvhvm import Domain
    dom = Domain(guests["hello"], memory_mib=32, maxmem_mib=48)
    assert dom.memory_bytes == 48 << 20
    ram = sum(size for _, size, kind in dom.plan.memory_map if kind == 1)
    assert 40 << 20 < ram <= 48 << 20
    assert dom.memory_status == {"target": 32 << 10, "maxmem": 48 << 10, "current": 48 << 10, "given_back": 0}
    with pytest.raises(ValueError):
        dom.set_memory_target(49)
    dom.close()


def test_non_numeric_memory(guests):
    p = pvhvm("boot", guests["hello"], "--memory", "lots")
    assert p.returncode == 2 and "Traceback" not in p.stderr


@pytest.mark.parametrize("vcpus", ["0", "-1", "65", "1000", "four", "2.5", ""])
def test_bad_vcpus(guests, vcpus):
    one_line_error(pvhvm("boot", guests["hello"], "--vcpus", vcpus), "--vcpus must be a number from 1 to 64")


def test_vcpus_boot(guests):
    """A guest that knows nothing of SMP boots with several vCPUs: the
    others stay down, as on Xen."""
    p = pvhvm("boot", guests["hello"], "--memory", "32", "--vcpus", "64")
    assert p.returncode == 0, p.stderr


def test_python_api_refuses_bad_vcpus(guests):
    for bad in (0, 65, -1, True, 2.0, "2"):
        with pytest.raises(BuildError, match="vcpus must be a number from 1 to 64"):
            Domain(guests["hello"], memory_mib=32, vcpus=bad)


def test_inspect(guests):
    p = pvhvm("inspect", guests["hello"])
    assert p.returncode == 0
    assert "PVH entry:        0x100000" in p.stdout and "PHYS32_ENTRY" in p.stdout
    one_line_error(pvhvm("inspect", "/nonexistent"), "no such file")


def test_version_self_test_and_help():
    assert "presents Xen 4.19" in pvhvm("--version").stdout
    p = pvhvm("self-test")
    assert p.returncode == 0 and p.stdout.startswith("ok: this Unicorn build holds all 6 things")
    assert "XCR0, found with XSETBV and checked with XGETBV" in p.stdout
    h = pvhvm("boot", "--help").stdout
    assert "Exit status" in h and "powered off" in h


def test_every_command_says_its_exit_statuses_and_takes_dash_h():
    import typer

    from pvhvm.cli import app

    commands = typer.main.get_command(app).commands
    assert {"create", "list", "console", "shutdown", "reboot", "destroy", "pause", "unpause", "dmesg", "vcpu-list",
            "mem-set", "save", "restore", "network-attach", "network-detach", "block-attach", "block-detach", "ctx",
            "dump-core"} <= set(commands)
    for name, command in commands.items():
        if name == "list":
            continue  # it lists; it cannot fail but for a bug
        assert "Exit status" in (command.help or ""), name
    short, long = pvhvm("destroy", "-h"), pvhvm("destroy", "--help")
    assert short.returncode == 0 and short.stdout == long.stdout and "Exit status" in short.stdout


@pytest.mark.parametrize("command, options", [
    ("boot", ["--save-to", "--save-on-suspend", "--snapshot"]),
    ("restore", ["--save-to", "--save-on-suspend", "--escape-char", "--timeout", "--xenstore-socket", "--forward",
                 "--name", "--trace"]),
])
def test_save_and_restore_options_are_documented(command, options):
    import typer

    from pvhvm.cli import app

    params = {opt: param for param in typer.main.get_command(app).commands[command].params for opt in param.opts}
    for option in options:
        assert len(params[option].help or "") > 20, option
    h = pvhvm(command, "--help").stdout
    assert all(option in h for option in options), h
    assert "Exit status" in h and "4 suspend (nothing saved)" in h


def test_snapshot_is_for_the_default_guest_without_disks(guests, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    one_line_error(pvhvm("boot", "--snapshot", "--disk", disk), "--snapshot cannot go with --disk")
    one_line_error(pvhvm("boot", "--snapshot", "-d", disk, "--net", "none"), "--snapshot cannot go with --disk")
    one_line_error(pvhvm("boot", guests["hello"], "--snapshot"), "--snapshot is for the default guest")


def test_trace_flag(guests):
    p = pvhvm("boot", guests["hello"], "--memory", "32", "--trace")
    assert p.returncode == 0
    assert "trace: " in p.stderr and "console_io(write" in p.stderr and "sched_op(shutdown" in p.stderr


def test_old_snapshots_are_pruned(tmp_path):
    from pvhvm.cli import SNAPSHOTS_KEPT, _prune_snapshots

    files = []
    for i in range(SNAPSHOTS_KEPT + 3):
        p = tmp_path / f"default-guest-{i}.save"
        p.write_bytes(b"x")
        os.utime(p, (1000 + i, 1000 + i))
        files.append(p)
    (tmp_path / "other.file").write_bytes(b"kept")
    _prune_snapshots(files[-1])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f.name for f in files[-1 - SNAPSHOTS_KEPT:]] + ["other.file"])


def test_timeout_is_one_line_not_a_crash_report(guests):
    p = pvhvm("boot", guests["debugee"], "--cmdline", "rounds=100000000000", "--memory", "32", "--timeout", "1",
              "--net", "none")
    assert p.returncode == 8
    assert p.stderr.strip() == "pvhvm: domain timeout: no shutdown within 1.0 s", p.stderr
