"""Debian's xenstore tools run in the guest against pvhvm's xenstore.

The default guest gets xenstore-utils with its libraries (pvhvm.guest_tools)
and the xenfs module, boots to a shell on hvc0, and the tests type xenstore
commands there while reading and writing the same store from the Python API:
values and watch events cross in both directions. Like test_linux.py, the
first run downloads Debian packages."""

from __future__ import annotations

import re
import struct

import pytest

import pvhvm
from pvhvm.shell import GuestShell
from pvhvm import guest_tools
from pvhvm.guest_tools import XENSTORE_COMMANDS, prepare_xenstore_guest

pytestmark = pytest.mark.slow

HOME = "/local/domain/1"
BAD = re.compile(r"\b(BUG|WARNING|Oops|Call Trace|panic)\b")


@pytest.fixture(scope="module")
def guest():
    return prepare_xenstore_guest()


@pytest.fixture(scope="module")
def booted(guest):
    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0", memory_mib=256)
    dom.expect("PVHVM-XENSTORE-READY", 600)
    dom.expect("# ", 60)
    return dom, GuestShell(dom)


# --------------------------------------------------------------------------- the files (no boot)


def test_tools_files_hold_the_commands_and_their_libraries():
    files = guest_tools.xenstore_tools_files()
    binary = files["usr/bin/xenstore"]
    for name in XENSTORE_COMMANDS:
        assert files[f"usr/bin/{name}"] == binary
    for path in ("usr/lib/x86_64-linux-gnu/libxenstore.so.4", "usr/lib/x86_64-linux-gnu/libxentoolcore.so.1",
                 "lib/x86_64-linux-gnu/libc.so.6", "lib64/ld-linux-x86-64.so.2",
                 "lib/x86_64-linux-gnu/libgcc_s.so.1"):  # glibc dlopens it in pthread_cancel
        assert files[path].startswith(b"\x7fELF"), path
    # Every library any of them needs is there (the loader knows itself).
    sonames = {path.rpartition("/")[2] for path in files}
    for path, data in files.items():
        interp, needed = guest_tools.elf_dependencies(data, path)
        assert interp is None or interp.strip("/") in files
        assert set(needed) <= sonames, (path, needed)


def test_elf_dependencies_of_the_binary():
    interp, needed = guest_tools.elf_dependencies(guest_tools.xenstore_tools_files()["usr/bin/xenstore"])
    assert interp == "/lib64/ld-linux-x86-64.so.2"
    assert "libxenstore.so.4" in needed and "libc.so.6" in needed


def test_elf_dependencies_rejects_other_files():
    with pytest.raises(pvhvm.BuildError):
        guest_tools.elf_dependencies(b"#!/bin/sh\n", "script")
    # A static ELF64 (no PT_DYNAMIC, no PT_INTERP) needs nothing.
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 0, 64, 0, 0)
    assert guest_tools.elf_dependencies(ehdr) == (None, [])


# --------------------------------------------------------------------------- in the guest


def test_guest_has_the_xenbus_device_and_xenfs(booted):
    _, sh = booted
    assert "xenfs" in sh.ok("lsmod")
    assert "xenbus" in sh.ok("ls /dev/xen")
    assert re.search(r"^xenfs /proc/xen xenfs ", sh.ok("cat /proc/mounts"), re.M)
    assert "xenbus" in sh.ok("ls /proc/xen")


def test_guest_reads_its_home(booted):
    _, sh = booted
    assert sh.ok("xenstore-read name").strip() == "pvhvm"
    assert sh.ok(f"xenstore-read {HOME}/domid").strip() == "1"
    # The same through xenfs, as older tools reach it.
    assert sh.ok("XENSTORED_PATH=/proc/xen/xenbus xenstore-read domid").strip() == "1"


def test_guest_write_is_seen_by_the_host(booted):
    dom, sh = booted
    sh.ok("xenstore-write data/from-guest hello-host")
    assert dom.store.read(0, f"{HOME}/data/from-guest") == b"hello-host"
    assert sh.ok("xenstore-exists data/from-guest") == ""


def test_host_write_is_seen_by_the_guest(booted):
    dom, sh = booted
    dom.store.write(0, f"{HOME}/data/from-host", "hello-guest")
    assert sh.ok("xenstore-read data/from-host").strip() == "hello-guest"


def test_guest_lists_the_domain_tree(booted):
    _, sh = booted
    names = sh.ok(f"xenstore-list {HOME}").split()
    for name in ("name", "domid", "data", "control", "memory", "console"):
        assert name in names, names
    assert sorted(sh.ok("xenstore-list data").split()) == ["from-guest", "from-host"]
    tree = sh.ok(f"xenstore-ls {HOME}")
    assert re.search(r'^name = "pvhvm"$', tree, re.M), tree
    assert re.search(r'^domid = "1"$', tree, re.M), tree
    assert re.search(r'^ from-guest = "hello-host"$', tree, re.M), tree
    # The root belongs to dom0: a domU may not list it, as under Xen.
    out = sh.run("xenstore-ls /")
    rc = sh.status
    assert rc != 0 and "Permission denied" in out


def test_guest_removes_a_key(booted):
    dom, sh = booted
    sh.ok("xenstore-write data/gone x")
    assert dom.store.exists(f"{HOME}/data/gone")
    sh.ok("xenstore-rm data/gone")
    assert not dom.store.exists(f"{HOME}/data/gone")
    sh.run("xenstore-exists data/gone")
    rc = sh.status
    assert rc != 0


def test_watch_fires_guest_to_host(booted):
    dom, sh = booted
    events: list[tuple[str, str]] = []
    conn = dom.store.connect(0, lambda path, token: events.append((path, token)))
    try:
        dom.store.watch(conn, f"{HOME}/data/w", "host-token")
        assert events == [(f"{HOME}/data/w", "host-token")]  # fires once when set
        events.clear()
        sh.ok("xenstore-write data/w from-guest")
        assert events == [(f"{HOME}/data/w", "host-token")]
        assert dom.store.read(0, f"{HOME}/data/w") == b"from-guest"
    finally:
        dom.store.disconnect(conn)


def test_watch_fires_host_to_guest(booted):
    dom, sh = booted
    # Two events: the one every new watch gets, then the host's write.
    sh.start("xenstore-watch -n 2 data/hw")
    dom.expect(r"(?m)^data/hw\r?$", 60)
    dom.store.write(0, f"{HOME}/data/hw", "from-host")
    dom.xenstore.service()
    rc, out = sh.finish(60)
    assert rc == 0, out
    assert out.split() == ["data/hw"]  # the second; the first was consumed above
    assert sh.ok("xenstore-read data/hw").strip() == "from-host"


def test_poweroff(booted):
    dom, _ = booted
    dom.send("poweroff -f\n")
    outcome = dom.run(timeout=60)
    assert outcome.kind is pvhvm.OutcomeKind.SHUTDOWN and outcome.reason is pvhvm.ShutdownReason.POWEROFF, outcome
    log = dom.console_output.decode(errors="replace")
    assert [line for line in log.splitlines() if BAD.search(line)] == []
