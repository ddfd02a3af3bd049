"""Fuzzing the backend rings (console, netback, blkback) as a hostile
frontend: random requests, indexes and grant refs written into the rings in
a real domain's memory.

The domain runs tests/guests/grants.c, which places a v1 grant table and
spins; this module plays the frontends from the host side through the
Domain's RAM (as tests/test_netback.py and tests/test_blkback.py do): it
writes grant entries into that table, lays the shared rings in free guest
RAM, writes the frontend's xenstore keys and kicks the ports. Each case
connects a vif (on a host end that keeps frames) and a vbd (on a scratch
image), then sends mostly sane traffic mixed with hostile slots: grant refs
that are unset, out of the table, read-only where writes go, the rings' own;
segment and size fields at and past their limits; producer indexes that
jump; a device the backend gave up on is connected again.

After every batch: no exception from the run loop or a device, no traceback
logged or raised in a worker thread, the domain still runs, the console
carries bytes both ways, xenstore answers a read, and no thread died.

    python -m fuzz.rings --seed 1 --duration 300 --out fuzz-findings/rings
"""

from __future__ import annotations

import random
import struct
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import pvhvm
from pvhvm.devices.blkback import Blkback
from pvhvm.devices.console import IN_CONS, IN_OFF, IN_PROD, OUT_CONS, OUT_OFF, OUT_PROD
from pvhvm.devices.disk import DiskSpec
from pvhvm.devices.netback import Netback
from pvhvm.xenbus import XenbusState

from .iocampaign import CaseResult, TracebackLog, case_runners, exception_detail, main

PAGE = 4096
BASE = 8 << 20  # free guest RAM (the guest lives at 1 MiB)
GTF_permit_access, GTF_readonly = 1, 1 << 2
BATCH = 25
OPS_PER_CASE = 300
DISK_SECTORS = 2048
REPO = Path(__file__).resolve().parent.parent

_guest_elf: Optional[Path] = None


def grants_guest() -> Path:
    """tests/guests/grants.c, built by the suite's guest builder."""
    global _guest_elf
    if _guest_elf is None:
        sys.path.insert(0, str(REPO / "tests" / "guests"))
        try:
            import build as guest_build  # tests/guests/build.py
        finally:
            sys.path.pop(0)
        _guest_elf = guest_build.build("grants", REPO / "tests" / "guests" / "build")
    return _guest_elf


class FrameSink:
    """The vif's host end: keeps a few frames, hands out what it is given."""

    def __init__(self) -> None:
        self.sent = 0
        self.incoming: list[bytes] = []

    def fileno(self) -> int:
        return -1

    def send(self, frame: bytes) -> None:
        self.sent += 1

    def recv(self):
        return self.incoming.pop(0) if self.incoming else None

    def close(self) -> None:
        pass


class PortOps:
    """backend_ops for devices whose ports are host-bound already (the grants
    guest allocates none)."""

    def __init__(self, ops) -> None:
        self._ops = ops

    def bind_guest_port(self, port: int) -> None:
        pass

    def unbind_port(self, port: int) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self._ops, name)


class World:
    def __init__(self, tmp: Path, rng: random.Random, result: CaseResult) -> None:
        self.result = result
        self.console_out = bytearray()
        self.dom = pvhvm.Domain(grants_guest(), memory_mib=32, console=self.console_out.extend)
        m = self.dom.expect(rb"PHASE1 a=0x[0-9a-f]+ b=0x[0-9a-f]+ table=0x([0-9a-f]+)", 30)
        self.table = int(m.group(1), 16) << 12
        self.mem = self.dom.memory
        self.next_page = BASE
        self.next_ref = 32
        self.image = tmp / "disk.img"
        self.image.write_bytes(bytes(DISK_SECTORS * 512))
        self.buffers: list[int] = []  # granted data pages (refs)
        self.readonly: list[int] = []
        self.nb: Optional[Netback] = None
        self.vbd: Optional[Blkback] = None
        self.net_host = FrameSink()
        self.reconnects = 0

    def close(self) -> None:
        self.dom.close()

    # grants and pages
    def page(self) -> int:
        if self.next_page + PAGE > (30 << 20):
            self.next_page = BASE + (64 << 12)  # reuse: the first pages hold the rings
        gpa = self.next_page
        self.next_page += PAGE
        self.mem[gpa : gpa + PAGE] = bytes(PAGE)
        return gpa

    def grant(self, gpa: int, readonly: bool = False) -> int:
        ref = self.next_ref
        self.next_ref = 32 + (self.next_ref - 31) % 480
        entry = self.table + 8 * ref
        struct.pack_into("<HHI", self.mem, entry, 0, 0, gpa // PAGE)
        struct.pack_into("<H", self.mem, entry, GTF_permit_access | (GTF_readonly if readonly else 0))
        return ref

    def u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self.mem, gpa)[0]

    def set_u32(self, gpa: int, v: int) -> None:
        struct.pack_into("<I", self.mem, gpa, v & 0xFFFFFFFF)

    def fe_write(self, dev, key: str, value) -> None:
        self.dom.store.write(self.dom.domid, f"{dev.frontend_path}/{key}", str(value))

    # devices
    def connect_net(self) -> None:
        if self.nb is not None:
            self.dom.devices.detach(self.nb)
        self.nb = Netback(self.dom.devices, self.net_host, mac="00:16:3e:01:02:03", bind_port=lambda p: None,
                          devid=self.reconnects)
        self.dom.devices.attach(self.nb)
        self.tx_page, self.rx_page = self.page(), self.page()
        for gpa in (self.tx_page, self.rx_page):
            struct.pack_into("<IIII", self.mem, gpa, 0, 1, 0, 1)
        self.net_port = self.dom.backend_ops.bind_host_port()
        self.tx_prod = self.rx_prod = 0
        keys = {"tx-ring-ref": self.grant(self.tx_page), "rx-ring-ref": self.grant(self.rx_page),
                "request-rx-copy": 1, "feature-rx-notify": 1, "feature-sg": 1, "event-channel": self.net_port}
        for k, v in keys.items():
            self.fe_write(self.nb, k, v)
        self.fe_write(self.nb, "state", int(XenbusState.CONNECTED))
        self.nb.service()

    def connect_blk(self) -> None:
        if self.vbd is not None:
            self.dom.devices.detach(self.vbd)
        vdev = f"xvd{'abcdefghij'[self.reconnects % 10]}"
        self.vbd = Blkback(self.dom.devices, DiskSpec(self.image, False, vdev), max_queues=1)
        self.vbd.ops = PortOps(self.dom.backend_ops)
        self.dom.devices.attach(self.vbd)
        self.blk_page = self.page()
        struct.pack_into("<IIII", self.mem, self.blk_page, 0, 1, 0, 1)
        self.blk_port = self.dom.backend_ops.bind_host_port()
        self.blk_prod = 0
        for k, v in {"ring-ref": self.grant(self.blk_page), "event-channel": self.blk_port,
                     "protocol": "x86_64-abi", "feature-persistent": 1}.items():
            self.fe_write(self.vbd, k, v)
        self.fe_write(self.vbd, "state", int(XenbusState.INITIALISED))
        self.dom.devices.settle()

    # ------------------------------------------------------------------ ops

    def do(self, op: list) -> None:
        name = op[0]
        if name == "grant":
            gpa = self.page()
            ref = self.grant(gpa, readonly=op[1])
            (self.readonly if op[1] else self.buffers).append(ref)
        elif name == "net_tx":  # raw slots: (gref, offset, flags, id, size)
            for slot in op[1]:
                struct.pack_into("<IHHHH", self.mem, self.tx_page + 64 + (self.tx_prod % 256) * 12, *slot)
                self.tx_prod += 1
            self.set_u32(self.tx_page, self.tx_prod if op[2] is None else op[2])
            self.dom.devices.dispatch([self.net_port])
        elif name == "net_rx":  # (id, gref) requests, then a frame from the host
            for rid, gref in op[1]:
                struct.pack_into("<HHI", self.mem, self.rx_page + 64 + (self.rx_prod % 256) * 8, rid, 0, gref)
                self.rx_prod += 1
            self.set_u32(self.rx_page, self.rx_prod if op[2] is None else op[2])
            self.net_host.incoming.append(bytes.fromhex(op[3]))
            self.nb.poll_host()
            self.dom.devices.dispatch([self.net_port])
        elif name == "blk":  # a raw request slot, then maybe a lying producer
            raw = bytes.fromhex(op[1]).ljust(112, b"\xee")
            self.mem[self.blk_page + 64 + (self.blk_prod % 32) * 112 : self.blk_page + 64 + (self.blk_prod % 32) * 112
                     + 112] = raw
            self.blk_prod += 1
            self.set_u32(self.blk_page, self.blk_prod if op[2] is None else op[2])
            self.dom.devices.dispatch([self.blk_port])
        elif name == "console":  # guest output with maybe lying indexes, then input back
            page = self.dom.placement.console_ring
            data = bytes.fromhex(op[1])
            prod = self.u32(page + OUT_PROD)
            for i, b in enumerate(data[:2048]):
                self.mem[page + OUT_OFF + ((prod + i) & 2047)] = b
            self.set_u32(page + OUT_PROD, prod + len(data[:2048]) if op[2] is None else op[2])
            if op[3] is not None:
                self.set_u32(page + IN_CONS, op[3])
            self.dom.console.service()
        elif name == "reconnect":
            self.reconnects += 1
            self.connect_net() if op[1] == "net" else self.connect_blk()
        else:
            raise ValueError(f"unknown op {name!r}")
        self.dom.loop.poll(0)
        self.dom.devices.settle()

    # ----------------------------------------------------------- properties

    def check(self) -> None:
        dom = self.dom
        if dom.run_until(lambda: False, 0.05) is not False or dom.outcome is not None:
            self.result.find("invariant", f"the domain ended: {dom.outcome}")
            return
        name = dom.store.read(0, f"/local/domain/{dom.domid}/name")
        if not name:
            self.result.find("unanswered", "xenstore read of the domain's name came back empty")
        # Console: the ring made sane again as a guest would, bytes out and in.
        page = dom.placement.console_ring
        self.set_u32(page + OUT_CONS, 0)
        self.set_u32(page + OUT_PROD, 0)
        self.set_u32(page + IN_CONS, self.u32(page + IN_PROD))
        dom.console.service()
        before = len(self.console_out)
        probe = b"ring-fuzz-probe\n"
        self.mem[page + OUT_OFF : page + OUT_OFF + len(probe)] = probe
        self.set_u32(page + OUT_PROD, len(probe))
        dom.console.service()
        if probe not in bytes(self.console_out[before:]):
            self.result.find("unanswered", "console output did not reach the host")
        dom.send_console_input(b"in")
        dom.console.service()
        cons, prod = self.u32(page + IN_CONS), self.u32(page + IN_PROD)
        got = bytes(self.mem[page + IN_OFF + (i & 1023)] for i in range(cons, prod))
        self.set_u32(page + IN_CONS, prod)
        if not got.endswith(b"in"):
            self.result.find("unanswered", f"console input did not reach the guest ({got[-8:]!r})")


def _gref(rng: random.Random, w: World) -> int:
    k = rng.random()
    if k < 0.7 and w.buffers:
        return rng.choice(w.buffers[-40:])
    if k < 0.8 and w.readonly:
        return rng.choice(w.readonly[-20:])
    return rng.choice([0, 1, 8, 31, 511, 512, 513, 4096, 0xFFFF, 0xFFFFFFFF, rng.getrandbits(32),
                       w.next_ref, w.next_ref - 1])


def _generate(rng: random.Random, w: World) -> list:
    k = rng.random()
    lie = None
    if rng.random() < 0.05:
        lie = rng.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, rng.getrandbits(32), 1000])
    if k < 0.1 or not w.buffers:
        return ["grant", rng.random() < 0.2]
    if k < 0.35:
        slots = []
        for i in range(rng.choice([1, 1, 1, 2, 3, 18, 19])):
            more = 4 if i + 1 < len(slots) or rng.random() < 0.1 else 0
            flags = rng.choice([0, 0, 1, 2, more, 8, 0xFFFF])
            slots.append([_gref(rng, w), rng.choice([0, 0, 14, 4000, 4095, 4096, 0xFFFF]),
                          flags, rng.getrandbits(16), rng.choice([60, 64, 1514, 0, 1, 4096, 4097, 65535, 9000])])
        return ["net_tx", slots, lie]
    if k < 0.5:
        n = rng.choice([0, 1, 2, 5])
        frame = bytes(rng.getrandbits(8) for _ in range(rng.choice([14, 60, 1514])))
        if rng.random() < 0.05:
            frame = bytes(rng.choice([0, 1, 9000, 70000]))
        return ["net_rx", [[rng.getrandbits(16), _gref(rng, w)] for _ in range(n)], lie, frame.hex()]
    if k < 0.85:
        op = rng.choice([0, 1, 1, 0, 2, 3, 4, 5, 6, 7, 255])
        nseg = rng.choice([0, 1, 2, 11, 12, 255])
        segs = b""
        for _ in range(min(nseg, 11)):
            first = rng.choice([0, 0, 3, 7, 8, 255])
            last = rng.choice([7, 7, 0, 3, 8, 255])
            segs += struct.pack("<IBBH", _gref(rng, w), first, last, 0)
        sector = rng.choice([0, 1, DISK_SECTORS - 8, DISK_SECTORS - 1, DISK_SECTORS, 2**63, 2**64 - 1])
        if op == 6:  # indirect: op, indirect_op, nseg, pad, id, sector, handle, pad, grefs[8]
            raw = struct.pack("<BBHIQQHH8I", 6, rng.choice([0, 1, 5]), rng.choice([1, 12, 256, 4096, 65535]), 0,
                              rng.getrandbits(64), sector, 0, 0, *[_gref(rng, w) for _ in range(8)])
        elif op == 5:
            raw = struct.pack("<BBHIQQQ", 5, rng.getrandbits(8), 0, 0, rng.getrandbits(64), sector,
                              rng.choice([1, 8, DISK_SECTORS, 2**64 - 1]))
        else:
            raw = struct.pack("<BBHIQQ", op, nseg, rng.choice([0, 0, 1]), 0, rng.getrandbits(64), sector) + segs
        return ["blk", raw[:112].hex(), lie]
    if k < 0.95:
        data = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 10, 100, 2048])))
        return ["console", data.hex(), lie, rng.choice([None, None, None, 0xFFFFFFFF, rng.getrandbits(32)])]
    return ["reconnect", rng.choice(["net", "blk"])]


def _run(seed: int, ops: Optional[list]) -> CaseResult:
    result = CaseResult(seed)
    rng = random.Random(seed)
    todo = list(ops) if ops is not None else None
    thread_errors: list[str] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda a: thread_errors.append(f"in thread {a.thread.name if a.thread else '?'}: "
                                                          + exception_detail(a.exc_value))
    w: Optional[World] = None
    try:
        with tempfile.TemporaryDirectory(prefix="pvhvm-ringfuzz-") as d, TracebackLog() as tracebacks:
            try:
                w = World(Path(d), rng, result)
                pending = [["reconnect", "net"], ["reconnect", "blk"]]
                n = 0
                while True:
                    if todo is not None:
                        if not todo:
                            break
                        op = todo.pop(0)
                    else:
                        if n >= OPS_PER_CASE + 2:
                            break
                        op = pending.pop(0) if pending else _generate(rng, w)
                    result.ops.append(op)
                    n += 1
                    if op[0] in ("net_tx", "net_rx", "blk", "console"):
                        result.messages += 1
                    try:
                        if op[0] == "check":
                            w.check()
                        else:
                            w.do(op)
                            if todo is None and n % BATCH == 0:
                                result.ops.append(["check"])
                                w.check()
                    except Exception as e:  # noqa: BLE001 - the finding
                        result.find("exception", exception_detail(e))
                        break
                    for t in tracebacks.records + thread_errors:
                        result.find("traceback", t)
                    tracebacks.records.clear()
                    thread_errors.clear()
                    if result.findings:
                        break
                if not result.findings and todo is None:
                    result.ops.append(["check"])
                    w.check()
            except Exception as e:  # noqa: BLE001
                result.find("exception", exception_detail(e))
            finally:
                if w is not None:
                    w.close()
    finally:
        threading.excepthook = old_hook
    for t in thread_errors:
        result.find("traceback", t)
    return result


run_case, replay_case = case_runners(_run)


if __name__ == "__main__":
    raise SystemExit(main("rings", run_case, replay_case))
