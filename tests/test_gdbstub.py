"""The GDB stub (python/pvhvm/gdbstub.py) against real gdb and over a raw
socket: breakpoints, steps, registers, memory, threads, Ctrl-C, detach,
and a client that sends garbage. The domain runs on the test's thread;
gdb is a subprocess talking to the run loop."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

import pvhvm
from pvhvm import OutcomeKind, ShutdownReason
from pvhvm.gdbstub import PACKET_SIZE, parse_address

pytestmark = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")


def gdb_batch(elf, port: int, *commands: str) -> subprocess.Popen:
    args = ["gdb", "-batch", "-nx", str(elf), "-ex", "set pagination off", "-ex", f"target remote :{port}"]
    for c in commands:
        args += ["-ex", c]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def symbol(elf, name: str) -> int:
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    m = re.search(rf"^([0-9a-f]+) \w {re.escape(name)}$", out, re.M)
    assert m, name
    return int(m.group(1), 16)


def test_addresses():
    assert parse_address(":1234") == ("127.0.0.1", 1234)
    assert parse_address("1234") == ("127.0.0.1", 1234)
    assert parse_address("0.0.0.0:0") == ("0.0.0.0", 0)
    assert parse_address("[::1]:99") == ("::1", 99)
    for bad in ("", "host:", "x:70000", "a:b"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_breakpoint_step_registers_and_verdict(guests):
    """gdb stops at `tick`, reads the counter and the argument, steps one
    instruction, reads registers and code, deletes the breakpoint and
    continues: the guest finishes with its verdict and gdb sees it exit."""
    elf = guests["debugee"]
    dom = pvhvm.Domain(elf, memory_mib=32)
    server = dom.serve_gdb(":0")
    dom.pause()  # until gdb has set its breakpoint
    gdb = gdb_batch(elf, server.port, "break tick", "continue", "continue", "print counter", "print step",
                    "stepi", "info registers rip rsp", "x/i $pc", "info threads", "delete", "continue")
    outcome = dom.run(timeout=60)
    out = gdb.communicate(timeout=30)[0]
    assert outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.POWEROFF, outcome
    assert "ok - counter 20100" in dom.console_output.decode(), dom.console_output
    tick = symbol(elf, "tick")
    # The second stop: tick(2), after tick(1) added 1.
    assert re.search(r"Breakpoint 1, tick \(step=step@entry=2\)", out), out
    assert "$1 = 1\n" in out and "$2 = 2\n" in out, out
    m = re.search(r"^rip\s+0x([0-9a-f]+)", out, re.M)
    assert m and tick < int(m.group(1), 16) < tick + 16, out
    assert re.search(r"^rsp\s+0x[0-9a-f]+", out, re.M), out
    assert re.search(r"=> 0x[0-9a-f]+ <tick\+\d+>:", out), out
    assert re.search(r"\* 1\s+Thread 1 \(vcpu0 running\)", out), out
    assert "exited normally" in out, out
    # Detached by the exit: nothing of the debugger is left in the core.
    assert dom._vm.breakpoints == [] and not server.connected
    dom.close()


def test_threads_of_an_smp_guest(guests):
    """Every vCPU is a thread, with its state in `info threads`; gdb
    switches to vCPU 1, reads its registers, and detaches: the guest runs
    on to its verdict."""
    dom = pvhvm.Domain(guests["smp"], vcpus=2, memory_mib=64)
    assert dom.run_until(lambda: dom.vcpu_status(1)["online"], 30), dom.outcome
    server = dom.serve_gdb(":0")
    dom.pause()
    gdb = gdb_batch(guests["smp"], server.port, "info threads", "thread 2", "info registers rip", "detach")
    assert dom.run_until(lambda: gdb.poll() is not None, 30)
    out = gdb.communicate(timeout=10)[0]
    assert re.search(r"1\s+Thread 1 \(vcpu0 \w+", out), out
    assert re.search(r"2\s+Thread 2 \(vcpu1 \w+", out), out
    assert "[Switching to thread 2" in out, out
    assert re.search(r"^rip\s+0x[0-9a-f]+", out, re.M), out
    assert not dom.paused
    outcome = dom.run(timeout=60)
    assert outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.POWEROFF, outcome
    assert "VERDICT: PASS" in dom.console_output.decode(), dom.console_output[-2000:]
    dom.close()


class Client:
    """The remote protocol by hand, for what gdb would never send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def packet(self, body: bytes) -> None:
        self.raw(b"$" + body + b"#" + b"%02x" % (sum(body) & 0xFF))

    def read_until(self, pred) -> bytes:
        while True:
            got = pred(self.buf)
            if got is not None:
                return got
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk

    def ack(self) -> bytes:
        def take(b: bytes):
            if b[:1] in (b"+", b"-"):
                self.buf = b[1:]
                return b[:1]
            return None
        return self.read_until(take)

    def reply(self) -> bytes:
        def take(b: bytes):
            m = re.match(rb"\+*\$([^#]*)#([0-9a-f]{2})", b)
            if m is None:
                return None
            assert int(m.group(2), 16) == sum(m.group(1)) & 0xFF
            self.buf = b[m.end():]
            self.sock.sendall(b"+")
            return m.group(1)
        return self.read_until(take)

    def ask(self, body: bytes) -> bytes:
        self.packet(body)
        return self.reply()


def talk(dom, fn) -> list:
    """Run `fn` on a thread while the domain's run loop serves the stub."""
    result: list = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as err:  # noqa: BLE001 (handed back to the test)
            result.append(err)

    t = threading.Thread(target=body)
    t.start()
    dom.run_until(lambda: not t.is_alive(), 60)
    t.join(5)
    assert result and not isinstance(result[0], BaseException), result
    return result


def test_ctrl_c_and_hostile_input(guests):
    """Ctrl-C stops a running guest with SIGINT; bad checksums get `-`,
    oversized packets and noise are dropped, memory outside the mappings
    is E14, huge lengths are cut, unknown packets get an empty reply; the
    loop is ended by writing the guest's `rounds`, and the guest's verdict
    stands."""
    elf = guests["debugee"]
    rounds, counter = symbol(elf, "rounds"), symbol(elf, "counter")
    dom = pvhvm.Domain(elf, cmdline="rounds=4000000000", memory_mib=32)
    dom.expect("counting", 30)  # in long mode, with the guest's page tables
    server = dom.serve_gdb("127.0.0.1:0")
    dom.pause()

    def session() -> None:
        c = Client(server.port)
        assert c.ask(b"qSupported:multiprocess+;swbreak+").startswith(b"PacketSize=%x" % PACKET_SIZE)
        assert c.ask(b"?").startswith(b"T05thread:1;")
        # Noise and a bad checksum: `-`, and the stub goes on.
        c.raw(b"garbage\x00\xff")
        c.raw(b"$m0,1#00")
        assert c.ack() == b"-"
        # Longer than any packet we take, never terminated: dropped.
        c.raw(b"$" + b"A" * (PACKET_SIZE + 100))
        assert c.ack() == b"-"
        c.raw(b"#00")  # the stray end of that packet
        assert c.ask(b"qNoSuchThing") == b""
        assert c.ask(b"vNoSuch;1") == b""
        assert c.ask(b"m0,zz") == b"E01"
        assert c.ask(b"m" + b"f" * 40 + b",1") == b"E01"
        assert c.ask(b"mffff800000000000,10") == b"E14"  # not mapped by the guest
        assert c.ask(b"m7fffffffffff0000,10") == b"E14"
        assert c.ask(b"Mffff800000000000,1:00") == b"E14"
        assert c.ask(b"M%x,2:00" % counter) == b"E01"  # length and data disagree
        assert c.ask(b"Hg99") == b"E01"  # no such thread
        assert c.ask(b"T2") == b"E01"
        assert c.ask(b"T1") == b"OK"
        assert c.ask(b"p999") == b"E45"
        assert c.ask(b"Z2,%x,8" % counter) == b""  # watchpoints: not offered
        big = c.ask(b"m%x,ffffffff" % counter)
        assert 0 < len(big) // 2 <= PACKET_SIZE // 2
        # Run, then Ctrl-C: a SIGINT stop with the counter moving.
        c.packet(b"c")
        c.ack()
        time.sleep(0.5)
        c.raw(b"\x03")
        stop = c.reply()
        assert stop.startswith(b"T02thread:1;"), stop
        first = int.from_bytes(bytes.fromhex(c.ask(b"m%x,8" % counter).decode()), "little")
        assert first > 0
        # End the loop through memory, and let the guest finish.
        assert c.ask(b"M%x,8:%s" % (rounds, b"00" * 8)) == b"OK"
        assert c.ask(b"m%x,8" % rounds) == b"00" * 8
        c.packet(b"c")
        c.ack()
        assert c.reply() == b"W00"

    talk(dom, session)
    outcome = dom.run(timeout=30)
    assert outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.POWEROFF, outcome
    assert re.search(r"ok - counter \d+ after \d+ rounds", dom.console_output.decode()), dom.console_output
    dom.close()


def test_a_client_that_goes_away_leaves_the_domain_running(guests):
    """A second client is turned away while one is attached; the first one
    vanishing mid-session (breakpoint set, domain stopped) releases the
    domain, and a later gdb may attach again."""
    elf = guests["debugee"]
    dom = pvhvm.Domain(elf, memory_mib=32)
    server = dom.serve_gdb(":0")
    dom.pause()

    def session() -> None:
        c = Client(server.port)
        assert c.ask(b"Z0,%x,1" % symbol(elf, "tick")) == b"OK"
        other = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        assert other.recv(10) == b""  # closed: one debugger at a time
        other.close()
        c.sock.close()

    talk(dom, session)
    dom.run_until(lambda: not dom.paused, 10)
    assert not server.connected and dom._vm.breakpoints == []
    outcome = dom.run(timeout=30)
    assert outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.POWEROFF, outcome
    dom.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2)


@pytest.mark.slow
def test_linux_hardware_breakpoint_on_a_system_call():
    """The default guest at its shell: gdb puts a hardware breakpoint on
    the sync system call (address from the guest's /proc/kallsyms), the
    shell's `sync` stops there with RIP at it, gdb reads linux_banner, and
    detaches: the guest goes on to its prompt."""
    from pvhvm.images import prepare_default_guest
    from pvhvm.shell import GuestShell

    guest = prepare_default_guest()
    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0 pvhvm.shell", memory_mib=256)
    dom.expect("PVHVM-INIT-OK", 120)
    dom.expect("# ", 30)
    shell = GuestShell(dom)
    syms = shell.ok(r"grep -E ' (__x64_sys_sync|linux_banner)$' /proc/kallsyms")
    addr = {line.split()[2]: int(line.split()[0], 16) for line in syms.splitlines() if line.strip()}
    sync, banner = addr["__x64_sys_sync"], addr["linux_banner"]
    assert sync >> 63 and banner >> 63, syms  # real addresses, not hidden zeros
    server = dom.serve_gdb(":0")
    gdb = gdb_batch(guest.vmlinux, server.port, f"hbreak *{sync:#x}", "continue", "info registers rip",
                    f"x/s {banner:#x}", "delete", "detach")
    # gdb connects (the domain stops), sets the breakpoint and continues.
    assert dom.run_until(lambda: dom._vm.breakpoints == [sync] and not dom.paused, 30)
    shell.start("sync")
    assert dom.run_until(lambda: gdb.poll() is not None, 30)
    out = gdb.communicate(timeout=10)[0]
    assert re.search(rf"^rip\s+0x{sync:x}\b", out, re.M), out
    assert re.search(r'0x[0-9a-f]+:\s+"Linux version ', out), out
    status, _ = shell.finish(30)
    assert status == 0
    assert shell.ok("echo still-here").strip() == "still-here"
    dom.close()


def test_boot_with_gdb_wait_from_the_cli(guests):
    """`pvhvm boot --gdb :0 --gdb-wait`: the guest waits at its first
    instruction until gdb, told where by pvhvm, continues it to a breakpoint."""
    import os
    import sys

    elf = guests["debugee"]
    boot = subprocess.Popen([sys.executable, "-m", "pvhvm", "boot", str(elf), "--gdb", "127.0.0.1:0", "--gdb-wait",
                             "--memory", "32"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = boot.stderr.readline()
        m = re.search(r"gdb stub on 127\.0\.0\.1:(\d+), the guest waits for it \(gdb \S+ -ex 'target remote "
                      r"127\.0\.0\.1:\d+'\)", line)
        assert m, line
        gdb = gdb_batch(elf, int(m.group(1)), "break tick", "continue", "print counter", "delete", "continue")
        out = gdb.communicate(timeout=60)[0]
        assert re.search(r"Breakpoint 1, tick \(step=step@entry=1\)", out), out
        assert "$1 = 0\n" in out and "exited normally" in out, out
        assert boot.wait(60) == 0
        assert "ok - counter 20100" in boot.stdout.read()
    finally:
        if boot.poll() is None:
            boot.kill()
            boot.wait()
    p = subprocess.run([sys.executable, "-m", "pvhvm", "boot", str(elf), "--gdb", "nowhere:x"], capture_output=True,
                       text=True, timeout=30, env={**os.environ})
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--gdb nowhere:x" in p.stderr
