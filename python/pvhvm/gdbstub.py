"""A GDB remote stub for a domain (`Domain.serve_gdb`): the remote serial
protocol over TCP, so that `gdb vmlinux -ex 'target remote :1234'` debugs
the guest kernel.

Threads are vCPUs (thread N+1 is vCPU N). The listening socket and the
connection are sources of the domain's run loop (`Domain.add_reader`): the
stub runs on the run loop's thread, between the core's runs, and never
touches the core while it runs. When gdb connects the domain pauses
(`Domain.pause`, under which `run_until` still serves the stub); `c`
unpauses it, Ctrl-C pauses it again. Breakpoints (Z0 and Z1 alike) are
exact code-address stops in the core (`Vm.set_breakpoints`): no int3 is
written into the guest, so its own text patching cannot break them. A
step executes one instruction of one vCPU with no interrupt delivered to
it. Memory goes through the page tables of the selected vCPU.

Registers are the i386:x86-64 layout gdb assumes without a target
description: 16 general registers, rip, eflags, the six selectors; the x87
and SSE registers are sent as unavailable. Every packet from the client is
bounds-checked: garbage, bad checksums and oversized packets get `-` or an
error reply, never an exception on the run loop.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from . import _core

if TYPE_CHECKING:
    from .api import Domain, Outcome

# The largest packet we take (and advertise): hex of a 8 KiB read fits.
PACKET_SIZE = 0x4000
# The most bytes one m/M/X moves (gdb splits larger ones by PacketSize).
MAX_MEMORY_CHUNK = (PACKET_SIZE - 32) // 2
SIGINT, SIGTRAP = 2, 5
# gdb's amd64 register numbers: the general registers in its order, then
# rip, eflags and the selectors; x87 (10-byte st0-7, then 8 control
# words), SSE (16-byte xmm0-15) and mxcsr follow and are not sent.
GENERAL = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
           "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
LAYOUT: list[tuple[str | None, int]] = (
    [(r, 8) for r in GENERAL] + [("rip", 8), ("rflags", 4)]
    + [(s, 4) for s in ("cs", "ss", "ds", "es", "fs", "gs")]
    + [(None, 10)] * 8 + [(None, 4)] * 8 + [(None, 16)] * 16 + [(None, 4)]
)
WRITABLE = set(GENERAL) | {"rip", "rflags"}


def parse_address(address: str) -> tuple[str, int]:
    """"HOST:PORT", "PORT" or ":PORT" (no host: 127.0.0.1; [v6] allowed)."""
    host, sep, port = str(address).rpartition(":")
    if not sep:
        host = ""
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"gdb address {address!r}: the port is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"gdb address {address!r}: port out of range")
    return host, number


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in b"#$}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                break
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


class ProtocolError(Exception):
    """A packet we cannot make sense of: answered with an error reply."""


def _hex_int(text: bytes) -> int:
    if not text or len(text) > 16:
        raise ProtocolError(text)
    try:
        return int(text, 16)
    except ValueError:
        raise ProtocolError(text) from None


class GdbServer:
    """Listens on `address` for one gdb at a time; see the module docstring."""

    def __init__(self, dom: "Domain", address: str) -> None:
        self.dom = dom
        self._vm: _core.Vm = dom._vm
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(1)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        dom.add_reader(self._listener, self._accept)
        self._conn: socket.socket | None = None
        self._reset_session()

    def _reset_session(self) -> None:
        self._buf = bytearray()
        self._no_ack = False
        self._last_reply = b""
        self._sw_breaks: set[int] = set()
        self._hw_breaks: set[int] = set()
        # vCPU for register and memory access (Hg), and the one to report.
        self._g_vcpu = 0
        self._stop_vcpu = 0
        self._stop_signal = SIGTRAP
        self._stop_kind = ""
        # gdb waits for a stop reply (after c, s, vCont).
        self._running = False

    # -- connection ------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if self._conn is not None:
            conn.close()  # one debugger at a time
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Reads only when readable; a client that stops reading our
        # replies for this long is dropped rather than stalling the loop.
        conn.settimeout(5.0)
        self._conn = conn
        self._reset_session()
        self.dom.add_reader(conn, self._readable)
        self._stop_here(SIGTRAP, self._current_vcpu())

    def _current_vcpu(self) -> int:
        last = self.dom.last_exit
        if last is not None and last.vcpu is not None and last.vcpu < self._vm.vcpus:
            return last.vcpu
        return 0

    def _readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return
        except OSError:
            data = b""
        if not data:
            self._disconnect()
            return
        self._buf += data
        self._process()

    def _send_raw(self, data: bytes) -> None:
        if self._conn is None:
            return
        try:
            self._conn.sendall(data)
        except OSError:
            self._disconnect()

    def _send(self, payload: bytes | str) -> None:
        if isinstance(payload, str):
            payload = payload.encode()
        body = escape(payload)
        packet = b"$" + body + b"#" + b"%02x" % checksum(body)
        self._last_reply = packet
        self._send_raw(packet)

    def _disconnect(self) -> None:
        """The client went away or detached: the domain goes on, as it was
        before gdb came."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                self.dom.remove_reader(conn)
            except (KeyError, ValueError):
                pass
            conn.close()
        self._release_domain()
        self._reset_session()

    def _release_domain(self) -> None:
        self._vm.set_breakpoints([])
        self._vm.set_frozen_vcpus([])
        for v in range(self._vm.vcpus):
            self._vm.single_step(v, False)
        if self.dom.outcome is None:
            self.dom.unpause()

    def close(self) -> None:
        if self._conn is not None:
            self._disconnect()
        if self._listener.fileno() >= 0:
            try:
                self.dom.remove_reader(self._listener)
            except (KeyError, ValueError):
                pass
            self._listener.close()

    # -- framing ---------------------------------------------------------

    def _process(self) -> None:
        buf = self._buf
        while buf and self._conn is not None:
            c = buf[0]
            if c == 0x03:  # Ctrl-C
                del buf[0]
                self._interrupt()
            elif c == ord("+"):
                del buf[0]
            elif c == ord("-"):
                del buf[0]
                if self._last_reply:
                    self._send_raw(self._last_reply)
            elif c == ord("$"):
                end = buf.find(b"#")
                if end < 0:
                    if len(buf) > PACKET_SIZE + 4:
                        # Never ends within what we take: drop it.
                        buf.clear()
                        self._send_raw(b"-")
                    return
                if len(buf) < end + 3:
                    return
                body = bytes(buf[1:end])
                sent = bytes(buf[end + 1:end + 3])
                del buf[:end + 3]
                try:
                    good = int(sent, 16) == checksum(body)
                except ValueError:
                    good = False
                if len(body) > PACKET_SIZE:
                    good = False
                if not self._no_ack:
                    self._send_raw(b"+" if good else b"-")
                if good:
                    self._dispatch(unescape(body))
            else:
                del buf[0]  # noise between packets

    def _dispatch(self, packet: bytes) -> None:
        try:
            reply = self._handle(packet)
        except ProtocolError:
            reply = "E01"
        except (_core.CoreError, ValueError, OverflowError):
            reply = "E14"
        if reply is not None:
            self._send(reply)

    # -- stops -----------------------------------------------------------

    def _stop_here(self, signal: int, vcpu: int, kind: str = "") -> None:
        self.dom.pause()
        self._vm.set_frozen_vcpus([])
        self._stop_signal, self._stop_vcpu, self._stop_kind = signal, vcpu, kind
        self._g_vcpu = vcpu

    def _stop_reply(self) -> str:
        extra = f"{self._stop_kind}:;" if self._stop_kind else ""
        return f"T{self._stop_signal:02x}thread:{self._stop_vcpu + 1:x};{extra}"

    def _interrupt(self) -> None:
        if self._running:
            self._running = False
            self._stop_here(SIGINT, self._current_vcpu())
            self._send(self._stop_reply())

    def on_debug_exit(self, exit: _core.Exit) -> None:
        """The core stopped a vCPU at a breakpoint or after a step."""
        if self._conn is None:
            return
        vcpu = exit.vcpu if exit.vcpu is not None else 0
        kind = ""
        if exit.message == "breakpoint":
            kind = "hwbreak" if exit.address in self._hw_breaks and exit.address not in self._sw_breaks else "swbreak"
        self._stop_here(SIGTRAP, vcpu, kind)
        if self._running:
            self._running = False
            self._send(self._stop_reply())

    def on_domain_ended(self, outcome: "Outcome") -> None:
        """The domain is over: gdb's inferior exited (W) or died (X)."""
        if self._conn is None:
            return
        if self._running:
            from .api import OutcomeKind

            if outcome.kind is OutcomeKind.SHUTDOWN:
                self._send(f"W{outcome.exit_status & 0xFF:02x}")
            else:
                self._send("X09")
        self._disconnect()

    # -- packets ---------------------------------------------------------

    def _vcpu_of_thread(self, text: bytes, *, allow_all: bool) -> int | None:
        """A thread id as gdb sends it (hex, -1 all, 0 any; `p1.N` forms)."""
        if text.startswith(b"p"):
            text = text.partition(b".")[2] or b"-1"
        if text == b"-1":
            if not allow_all:
                raise ProtocolError(text)
            return None
        tid = _hex_int(text)
        if tid == 0:
            return self._g_vcpu
        if not 1 <= tid <= self._vm.vcpus:
            raise ProtocolError(text)
        return tid - 1

    def _handle(self, p: bytes) -> str | None:
        if not p:
            return ""
        head = p[:1]
        if p == b"?":
            return self._stop_reply()
        if p.startswith(b"qSupported"):
            return (f"PacketSize={PACKET_SIZE:x};QStartNoAckMode+;vContSupported+;"
                    "swbreak+;hwbreak+")
        if p == b"QStartNoAckMode":
            self._send("OK")
            self._no_ack = True
            return None
        if head == b"g":
            return self._read_registers(self._g_vcpu)
        if head == b"G":
            return self._write_registers(self._g_vcpu, p[1:])
        if head == b"p":
            return self._read_register(self._g_vcpu, _hex_int(p[1:]))
        if head == b"P":
            num, _, value = p[1:].partition(b"=")
            return self._write_register(self._g_vcpu, _hex_int(num), value)
        if head == b"m":
            addr, _, length = p[1:].partition(b",")
            return self._read_memory(_hex_int(addr), _hex_int(length))
        if head in (b"M", b"X"):
            spec, sep, data = p[1:].partition(b":")
            addr, _, length = spec.partition(b",")
            if not sep:
                raise ProtocolError(p)
            if head == b"M":
                if len(data) % 2:
                    raise ProtocolError(p)
                try:
                    data = bytes.fromhex(data.decode("ascii"))
                except (UnicodeDecodeError, ValueError):
                    raise ProtocolError(p) from None
            return self._write_memory(_hex_int(addr), _hex_int(length), data)
        if head in (b"Z", b"z"):
            return self._breakpoint(head == b"Z", p[1:])
        if head == b"H":
            vcpu = self._vcpu_of_thread(p[2:], allow_all=True)
            if p[1:2] == b"g":
                self._g_vcpu = vcpu if vcpu is not None else self._g_vcpu
            elif p[1:2] != b"c":
                raise ProtocolError(p)
            return "OK"
        if head == b"T":
            self._vcpu_of_thread(p[1:], allow_all=False)
            return "OK"
        if p == b"qfThreadInfo":
            return "m" + ",".join(f"{v + 1:x}" for v in range(self._vm.vcpus))
        if p == b"qsThreadInfo":
            return "l"
        if p == b"qC":
            return f"QC{self._g_vcpu + 1:x}"
        if p.startswith(b"qThreadExtraInfo,"):
            vcpu = self._vcpu_of_thread(p[len(b"qThreadExtraInfo,"):], allow_all=False)
            assert vcpu is not None
            return self._thread_info(vcpu).encode().hex()
        if p == b"qAttached" or p.startswith(b"qAttached:"):
            return "1"  # attached to a running domain: quitting detaches
        if p == b"vCont?":
            return "vCont;c;C;s;S"
        if p.startswith(b"vCont;"):
            return self._vcont(p[len(b"vCont;"):])
        if head in (b"c", b"C"):
            self._resume(step=None)
            return None
        if head in (b"s", b"S"):
            self._resume(step=self._g_vcpu, others_run=True)
            return None
        if head == b"D":
            self._send("OK")
            self._disconnect()
            return None
        if head == b"k" or p.startswith(b"vKill"):
            # Kill means detach here: the domain is not gdb's to end.
            if head != b"k":
                self._send("OK")
            self._disconnect()
            return None
        return ""  # anything else: not supported

    def _thread_info(self, vcpu: int) -> str:
        st = self._vm.vcpu_status(vcpu)
        what = st["activity"] if st["online"] else "down"
        return f"vcpu{vcpu} {what.replace('_', ' ')}"

    def _registers(self, vcpu: int) -> dict[str, int]:
        return dict(self._vm.registers(vcpu))

    def _read_registers(self, vcpu: int) -> str:
        regs = self._registers(vcpu)
        out = []
        for name, size in LAYOUT:
            if name is None:
                out.append("xx" * size)
            else:
                out.append((regs[name] & ((1 << (8 * size)) - 1)).to_bytes(size, "little").hex())
        return "".join(out)

    def _read_register(self, vcpu: int, num: int) -> str:
        if not 0 <= num < len(LAYOUT):
            return "E45"
        name, size = LAYOUT[num]
        if name is None:
            return "xx" * size
        value = self._registers(vcpu)[name] & ((1 << (8 * size)) - 1)
        return value.to_bytes(size, "little").hex()

    def _write_register(self, vcpu: int, num: int, value_hex: bytes) -> str:
        if not 0 <= num < len(LAYOUT):
            return "E45"
        name, size = LAYOUT[num]
        try:
            raw = bytes.fromhex(value_hex.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError(value_hex) from None
        if len(raw) != size:
            raise ProtocolError(value_hex)
        if name is None or name not in WRITABLE:
            return "E45"
        self._vm.set_register(vcpu, name, int.from_bytes(raw, "little"))
        return "OK"

    def _write_registers(self, vcpu: int, data_hex: bytes) -> str:
        """G: the general registers, rip and eflags are taken; the rest of
        the block (selectors, x87, SSE) is left as it is."""
        try:
            raw = bytes.fromhex(data_hex.decode("ascii").replace("x", "0"))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError(b"G") from None
        offset = 0
        updates = []
        for name, size in LAYOUT:
            if offset + size > len(raw):
                break
            if name in WRITABLE:
                updates.append((name, int.from_bytes(raw[offset:offset + size], "little")))
            offset += size
        if len(updates) < len(WRITABLE):
            raise ProtocolError(b"G")
        for name, value in updates:
            self._vm.set_register(vcpu, name, value)
        return "OK"

    def _read_memory(self, addr: int, length: int) -> str:
        length = min(length, MAX_MEMORY_CHUNK)
        if length == 0:
            return ""
        try:
            return self._vm.read_linear(addr, length, self._g_vcpu).hex()
        except (_core.CoreError, OverflowError):
            pass
        # Partly mapped: as much as reads, up to the first hole.
        got = b""
        while len(got) < length:
            at = addr + len(got)
            piece = min(length - len(got), 0x1000 - (at & 0xFFF))
            try:
                got += self._vm.read_linear(at & ((1 << 64) - 1), piece, self._g_vcpu)
            except (_core.CoreError, OverflowError):
                break
        return got.hex() if got else "E14"

    def _write_memory(self, addr: int, length: int, data: bytes) -> str:
        if length != len(data) or length > MAX_MEMORY_CHUNK:
            raise ProtocolError(b"M")
        if length == 0:
            return "OK"  # gdb's probe for X support
        try:
            self._vm.write_linear(addr, data, self._g_vcpu)
        except (_core.CoreError, OverflowError):
            return "E14"
        return "OK"

    def _breakpoint(self, insert: bool, spec: bytes) -> str:
        parts = spec.split(b",")
        if len(parts) < 3:
            raise ProtocolError(spec)
        kind, addr = parts[0], _hex_int(parts[1])
        if kind == b"0":
            table = self._sw_breaks
        elif kind == b"1":
            table = self._hw_breaks
        else:
            return ""  # watchpoints: not supported
        if insert:
            if len(self._sw_breaks | self._hw_breaks | {addr}) > 4096:
                return "E28"
            table.add(addr)
        else:
            table.discard(addr)
        self._vm.set_breakpoints(sorted(self._sw_breaks | self._hw_breaks))
        return "OK"

    def _vcont(self, actions: bytes) -> str | None:
        """vCont;ACTION[:TID];…: the first action that names a vCPU wins
        for it, one without a thread applies to the rest. Only a step of
        one vCPU is offered (gdb's usual `s:N;c` or `s:N`)."""
        step: int | None = None
        others_run = False
        for action in actions.split(b";"):
            verb, _, thread = action.partition(b":")
            if not verb or verb[:1] not in (b"c", b"C", b"s", b"S"):
                raise ProtocolError(action)
            vcpu = self._vcpu_of_thread(thread, allow_all=True) if thread else None
            if verb[:1] in (b"s", b"S"):
                if step is None:
                    step = vcpu if vcpu is not None else self._g_vcpu
            elif vcpu is None:
                others_run = True
            elif step is None or vcpu != step:
                others_run = True
        self._resume(step=step, others_run=others_run or step is None)
        return None

    def _resume(self, step: int | None, others_run: bool = True) -> None:
        if step is not None:
            self._vm.single_step(step, True)
            frozen = [] if others_run else [v for v in range(self._vm.vcpus) if v != step]
            self._vm.set_frozen_vcpus(frozen)
        else:
            self._vm.set_frozen_vcpus([])
        self._running = True
        self.dom.unpause()


__all__ = ["GdbServer", "parse_address", "PACKET_SIZE"]
