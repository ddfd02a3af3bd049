"""Background domains and the xl-like commands, with real processes: `pvhvm
create` from config files, list, console through a pty, reboot, shutdown,
destroy, the control protocol, hot-plug, nothing left behind."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pvhvm
from pvhvm.toolstack import runtime

from test_terminal import MARKER, PtySession

PVHVM = [sys.executable, "-m", "pvhvm"]
PROMPT = re.compile(rb"/ # ")


@pytest.fixture
def rt(tmp_path, monkeypatch):
    """A runtime and log directory of the test's own, for this process and the domain processes."""
    root = tmp_path / "rt"
    monkeypatch.setenv("PVHVM_RUNTIME_DIR", str(root))
    monkeypatch.setenv("PVHVM_LOG_DIR", str(tmp_path / "log"))
    yield root
    # Whatever a failed test left running goes now.
    for lock in root.glob("*.lock"):
        pid = runtime.read_record(runtime.Paths(root, lock.stem)).get("pid")
        if pid and runtime.is_held(lock):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def run(*args, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*PVHVM, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def write_cfg(path: Path, **keys) -> Path:
    lines = []
    for k, v in keys.items():
        if isinstance(v, list):
            lines.append(f"{k} = [ " + ", ".join(json.dumps(x) for x in v) + " ]")
        elif isinstance(v, int):
            lines.append(f"{k} = {v}")
        else:
            lines.append(f"{k} = {json.dumps(str(v))}")
    path.write_text("\n".join(lines) + "\n")
    return path


def hello_cfg(tmp_path: Path, guests, name: str, **extra) -> Path:
    """The hello guest powers off at once: with on_poweroff="preserve" it stays, shut down."""
    return write_cfg(tmp_path / f"{name}.cfg", name=name, type="pvh", kernel=guests["hello"], memory=32,
                     on_poweroff="preserve", **extra)


def nothing_left(root: Path) -> None:
    assert sorted(p.name for p in root.iterdir()) == ["lock", "next-domid"]
    # The process may still be on its way out after letting go of its name.
    deadline = time.monotonic() + 10
    while ours := _domain_processes(root):
        assert time.monotonic() < deadline, f"domain processes {ours} still run"
        time.sleep(0.05)


def _domain_processes(root: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-f", "pvhvm.toolstack.daemon"], capture_output=True, text=True).stdout
    ours = []
    for pid in out.split():
        try:
            if str(root).encode() in Path(f"/proc/{pid}/environ").read_bytes():
                ours.append(pid)
        except OSError:
            pass  # gone meanwhile
    return ours


# --------------------------------------------------------------------------- small guests, the protocol


def test_create_list_destroy_with_a_test_guest(guests, tmp_path, rt):
    cfg = hello_cfg(tmp_path, guests, "hi")
    p = run("create", cfg)
    assert p.returncode == 0, p.stderr
    assert re.search(r"domain hi created \(domid \d+, pid \d+\)", p.stderr)
    with pvhvm.connect("hi") as dom:
        dom.wait(10)  # it powered off; preserved
        info = dom.info()
    assert info["state"] == "---s--" and info["outcome"] == "shutdown (poweroff)"
    listing = run("list").stdout.splitlines()
    assert listing[0].split() == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
    assert listing[1].split()[0] == "hi" and listing[1].split()[4] == "---s--"
    assert "Hello" in run("dmesg", "hi").stdout or "hello" in run("dmesg", "hi").stdout.lower()
    # A second domain of that name is refused; a second name gets a higher id.
    p = run("create", cfg)
    assert p.returncode == 2 and p.stderr.strip() == "pvhvm: a domain named 'hi' already exists"
    assert run("create", cfg, "--name", "hi2").returncode == 0
    ids = {d["name"]: d["domid"] for d in pvhvm.list_domains()}
    assert ids["hi2"] > ids["hi"]
    for name in ("hi", "hi2"):
        assert run("destroy", name).returncode == 0
    assert pvhvm.list_domains() == []
    nothing_left(rt)
    p = run("destroy", "hi")
    assert p.returncode == 2 and p.stderr.strip() == "pvhvm: no domain named 'hi' (`pvhvm list` shows the domains)"


def test_a_domain_process_killed_leaves_nothing(guests, tmp_path, rt):
    assert run("create", hello_cfg(tmp_path, guests, "victim")).returncode == 0
    pid = pvhvm.connect("victim").pid
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run("list").stdout.splitlines()[1:] == []
    nothing_left(rt)


def test_bad_configs_are_one_line(guests, tmp_path, rt):
    bad = write_cfg(tmp_path / "bad.cfg", name="x", type="pvh", kernel=guests["hello"], memory="lots")
    p = run("create", bad)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"pvhvm: {bad}:4:"), p.stderr
    p = run("create", tmp_path / "missing.cfg")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "missing.cfg" in p.stderr
    unknown = hello_cfg(tmp_path, guests, "warned", colour="blue")
    p = run("create", unknown)
    assert p.returncode == 0 and "unknown key 'colour'" in p.stderr, p.stderr
    assert run("destroy", "warned").returncode == 0
    # A kernel that is no kernel: the domain process says why, in one line.
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an elf")
    p = run("create", write_cfg(tmp_path / "junk.cfg", name="junk", type="pvh", kernel=junk))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    nothing_left(rt)


def _raw(root: Path, name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(root / f"{name}.sock"))
    return s


def _lines(s: socket.socket, n: int) -> list[dict]:
    buf = b""
    while buf.count(b"\n") < n:
        chunk = s.recv(65536)
        assert chunk, buf
        buf += chunk
    return [json.loads(line) for line in buf.split(b"\n")[:n]]


def test_control_protocol_on_the_wire(guests, tmp_path, rt):
    assert run("create", hello_cfg(tmp_path, guests, "wire")).returncode == 0
    s = _raw(rt, "wire")
    (greeting,) = _lines(s, 1)
    assert greeting["pvhvm"]["name"] == "wire" and "query-domain" in greeting["pvhvm"]["commands"]
    s.sendall(b'{"execute": "query-domain", "id": 7}\n'
              b'not json\n'
              b'{"execute": "no-such", "id": 8}\n'
              b'{"execute": "mem-set", "arguments": {"mib": "x"}, "id": 9}\n'
              b'{"execute": "pause", "id": 10}\n'
              b'[1, 2]\n')
    replies = _lines(s, 6)
    assert replies[0]["id"] == 7 and replies[0]["return"]["name"] == "wire"
    assert replies[1]["error"]["class"] == "GenericError"
    assert replies[2] == {"error": {"class": "CommandNotFound", "desc": "no command 'no-such'"}, "id": 8}
    assert replies[3]["error"]["class"] in ("InvalidArgument", "DomainState") and replies[3]["id"] == 9
    # The guest powered off (preserved): pausing it is refused, and says why.
    assert replies[4]["error"]["class"] == "DomainState" and "pvhvm destroy wire" in replies[4]["error"]["desc"]
    assert "error" in replies[5]
    # A line without end is cut off: the process holds no unbounded input.
    try:
        s.sendall(b"x" * (2 << 20))
    except BrokenPipeError:
        pass  # closed on us once past the limit
    (cut,) = _lines(s, 1)
    assert "longer than" in cut["error"]["desc"]
    s.close()
    with pvhvm.connect("wire") as dom:
        assert dom.info()["name"] == "wire"  # still serving
        dom.destroy()
    nothing_left(rt)


def test_pause_unpause_and_hotplug_with_a_running_guest(guests, tmp_path, rt):
    """The grants guest spins waiting for its host, long enough to be
    paused, listed, inspected, given a disk and a card, and destroyed."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    cfg = write_cfg(tmp_path / "ev.cfg", name="ev", type="pvh", kernel=guests["grants"], memory=32)
    assert run("create", cfg).returncode == 0
    with pvhvm.connect("ev") as dom:
        dom.pause()
        assert dom.info()["state"][2] == "p"
        assert "paused" not in run("list").stdout  # a letter, as xl shows it
        assert run("list").stdout.splitlines()[1].split()[4][2] == "p"
        ctx = run("ctx", "ev")
        assert ctx.returncode == 0 and "rip" in ctx.stdout.lower(), ctx.stderr
        assert run("block-attach", "ev", f"{disk},ro").stdout.strip() == "xvda"
        assert run("network-attach", "ev", "host=none").stdout.strip() == "0"
        assert run("block-detach", "ev", "xvda").returncode == 0
        assert run("network-detach", "ev", "0").returncode == 0
        p = run("block-detach", "ev", "xvdz")
        assert p.returncode == 1 and "no disk 'xvdz'" in p.stderr
        assert run("unpause", "ev").returncode == 0
        assert dom.info()["state"][2] == "-"
        assert run("mem-set", "ev", "lots").returncode == 2
        dom.destroy()
    nothing_left(rt)


# --------------------------------------------------------------------------- Linux


@pytest.fixture(scope="module")
def default_guest():
    from pvhvm.images import prepare_default_guest

    return prepare_default_guest()


def linux_cfg(tmp_path: Path, guest, name: str, **extra) -> Path:
    return write_cfg(tmp_path / f"{name}.cfg", name=name, type="pvh", kernel=guest.vmlinux, ramdisk=guest.initrd,
                     extra="console=hvc0 pvhvm.shell", memory=128, **extra)


@pytest.mark.slow
def test_two_linux_domains_console_reboot_shutdown_destroy(default_guest, tmp_path, rt):
    """The acceptance run: two domains from config files, listed; a console
    attached and detached through a pty, twice; one rebooted (it comes
    back, console still attached), shut down and waited for; the other
    destroyed; nothing left running or on disk."""
    for name in ("one", "two"):
        p = run("create", linux_cfg(tmp_path, default_guest, name))
        assert p.returncode == 0, p.stderr
    names = [d["name"] for d in pvhvm.list_domains()]
    assert names == ["one", "two"]

    s = PtySession([*PVHVM, "console", "one"], size=(40, 132))
    try:
        s.expect(MARKER, 120)
        s.send(b"\r")
        s.expect(PROMPT, 30)
        s.send(b"echo sum-$((40+2))\r")
        s.expect(re.compile(rb"sum-42"), 30)
        # The terminal's size reaches the guest's shell through the control socket.
        s.send(b"stty size\r")
        s.expect(re.compile(rb"\r\n40 132\r\n"), 30)
        s.send(b"\x1d")
        assert s.wait(10) == 0
        assert b"domain one goes on running" in s.output
    finally:
        s.close()
    # Attached again: the same shell, and a reboot with the console on.
    s = PtySession([*PVHVM, "console", "one"])
    try:
        s.send(b"\r")
        s.expect(PROMPT, 30)
        before = pvhvm.connect("one").domid
        assert run("reboot", "one").returncode == 0
        s.expect(re.compile(rb"Linux version"), 60)  # the console stays attached over the reboot
        s.expect(MARKER, 120)
        s.send(b"\x1d")
        assert s.wait(10) == 0
    finally:
        s.close()
    info = pvhvm.connect("one").info()
    assert info["domid"] > before and info["restarts"] == 1 and info["last_outcome"] == "shutdown (reboot)"

    p = run("shutdown", "-w", "one", timeout=120)
    assert p.returncode == 0 and "shutdown (poweroff); destroy" in p.stderr, p.stderr
    assert [d["name"] for d in pvhvm.list_domains()] == ["two"]
    assert run("destroy", "two").returncode == 0
    assert pvhvm.list_domains() == []
    nothing_left(rt)


# --------------------------------------------------------------------------- crashes


def test_crash_preserved_for_ctx_and_a_core_file_gdb_reads(guests, tmp_path, rt):
    """on_crash="preserve": the crashed domain stays (state c) for `pvhvm
    ctx` and `pvhvm dump-core`, and gdb reads the core's registers."""
    cfg = write_cfg(tmp_path / "boom.cfg", name="boom", type="pvh", kernel=guests["crash"], memory=32,
                    on_crash="preserve")
    assert run("create", cfg).returncode == 0
    with pvhvm.connect("boom") as dom:
        ended = dom.wait(30)
        assert ended["action"] == "preserve" and "crash" in ended["outcome"], ended
        assert dom.info()["state"] == "----c-"
    ctx = run("ctx", "boom")
    assert ctx.returncode == 0, ctx.stderr
    assert "crash_here" in ctx.stdout, ctx.stdout  # RIP named with the guest's symbols
    core = tmp_path / "boom.core"
    p = run("dump-core", "boom", core)
    assert p.returncode == 0 and core.stat().st_size > 0, p.stderr
    gdb = subprocess.run(["gdb", "-batch", "-nx", str(guests["crash"]), str(core), "-ex", "info registers rip"],
                         capture_output=True, text=True, timeout=60)
    assert re.search(r"rip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <crash_here", gdb.stdout), gdb.stdout + gdb.stderr
    assert run("destroy", "boom").returncode == 0
    nothing_left(rt)


def test_coredump_destroy_writes_a_core_and_ends(guests, tmp_path, rt, monkeypatch):
    dumps = tmp_path / "dumps"
    monkeypatch.setenv("PVHVM_DUMP_DIR", str(dumps))
    cfg = write_cfg(tmp_path / "cd.cfg", name="cd", type="pvh", kernel=guests["crash"], memory=32,
                    on_crash="coredump-destroy")
    assert run("create", cfg).returncode == 0
    deadline = time.monotonic() + 30  # it crashes at once, is dumped and goes
    while pvhvm.list_domains() and time.monotonic() < deadline:
        time.sleep(0.05)
    (core,) = dumps.glob("cd-*.core")
    assert core.read_bytes()[:4] == b"\x7fELF"
    nothing_left(rt)


def test_gdb_in_the_config(guests, tmp_path, rt):
    """gdb = "127.0.0.1:0" in a config: the background domain serves the GDB
    protocol where `query-domain` says; gdb stops it at a breakpoint, reads
    a variable, and detaches, and the domain goes on."""
    elf = guests["debugee"]
    cfg = write_cfg(tmp_path / "dbg.cfg", name="dbg", type="pvh", kernel=elf, memory=32,
                    cmdline="rounds=100000000", gdb="127.0.0.1:0")
    assert run("create", cfg).returncode == 0
    with pvhvm.connect("dbg") as dom:
        where = dom.info()["gdb"]
        assert re.fullmatch(r"127\.0\.0\.1:\d+", where), where
        gdb = subprocess.run(["gdb", "-batch", "-nx", str(elf), "-ex", f"target remote {where}", "-ex", "break tick",
                              "-ex", "continue", "-ex", "print counter > 0", "-ex", "detach"],
                             capture_output=True, text=True, timeout=60)
        assert "Breakpoint 1, tick" in gdb.stdout and "$1 = 1" in gdb.stdout, gdb.stdout + gdb.stderr
        info = dom.info()
        assert info["outcome"] is None and not info["paused"]
        dom.destroy()
    nothing_left(rt)


def test_passt_goes_with_a_killed_domain_process(guests, tmp_path, rt):
    cfg = write_cfg(tmp_path / "net.cfg", name="net", type="pvh", kernel=guests["grants"], memory=32,
                    vif=["host=passt"])
    assert run("create", cfg).returncode == 0
    pid = pvhvm.connect("net").pid
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    passt = [c for c in children if Path(f"/proc/{c}/comm").read_text().startswith("passt")]
    assert len(passt) == 1, children
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{passt[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # passt ends when the socket it serves closes (or it is a zombie of init's, reaped soon).
    assert not Path(f"/proc/{passt[0]}").exists() or "Z" in Path(f"/proc/{passt[0]}/stat").read_text().split()[2]
    assert run("list").stdout.splitlines()[1:] == []
    nothing_left(rt)


def test_save_then_restore_in_the_background(guests, tmp_path, rt):
    """`pvhvm save NAME FILE` (the domain goes, as xl save), then `pvhvm
    restore FILE --background`: the same domain runs again, by name."""
    cfg = write_cfg(tmp_path / "sv.cfg", name="sv", type="pvh", kernel=guests["grants"], memory=32)
    assert run("create", cfg).returncode == 0
    uuid = pvhvm.connect("sv").info()["uuid"]
    saved = tmp_path / "sv.save"
    p = run("save", "sv", saved)
    assert p.returncode == 0 and "sv saved to" in p.stderr, p.stderr
    assert pvhvm.list_domains() == []
    p = run("restore", saved, "--background")
    assert p.returncode == 0 and re.search(r"domain sv restored \(domid \d+", p.stderr), p.stderr
    with pvhvm.connect("sv") as dom:
        info = dom.info()
        assert info["uuid"] == uuid and info["outcome"] is None
        # The restored domain keeps its config: a second save and restore by checkpoint works too.
        assert dom.save(tmp_path / "again.save", keep_running=True) > 0
        assert dom.info()["outcome"] is None
        dom.destroy()
    p = run("restore", tmp_path / "nothing.save", "--background")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    nothing_left(rt)
