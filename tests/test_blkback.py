"""The vbd backend (pvhvm.devices.blkback) and its disk images (devices.disk).

Three halves:

* ring-level tests: a blkfront written here in Python drives the blkback
  through the real grant table of a tiny guest of ours (tests/guests/grants.c,
  which places a v1 grant table and then spins), as tests/test_netback.py
  does for the vif: the test writes grant entries into that table, lays the
  rings (one page or several, the pages apart from each other) and the data
  pages in free guest RAM, and plays the frontend's xenstore part as the
  guest's domid. Sector data is checked against the image file on the host.
  Hostile frontends (bad grants, too many segments, sectors past the end,
  runaway indexes, bad handshakes …) must get the vbd disconnected with a
  reason while the domain runs on.
* disk specs, virtual device numbers and opening images (pure and fast), and
  the CLI's one-line errors for bad --disk arguments.
* Linux (slow): Debian's kernel with xen-blkfront on a sparse rw image and a
  ro image: sizes, 64 MiB of random data written and read back with
  matching checksums, a refused write, discard, and two queues with two vCPUs.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pvhvm
from pvhvm import BuildError
from pvhvm.devices.blkback import (
    ABI_X86_32,
    ABI_X86_64,
    ABIS,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    VDISK_READONLY,
    Blkback,
)
from pvhvm.devices.disk import (
    DiskError,
    DiskImage,
    DiskSpec,
    assign_vdevs,
    parse_disk_spec,
    vdev_name,
    vdev_number,
)
from pvhvm.devices.ring import ring_slots as backend_ring_slots
from pvhvm.shell import GuestShell
from pvhvm.xenbus import XenbusState
from pvhvm.xenstore import XenstoreError

PAGE = 4096
SECTOR = 512
GTF_permit_access = 1
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4
IN_USE = GTF_reading | GTF_writing

# blkif.h on x86-64, written out independently of the backend's own structs.
SLOT = 112
RING_HEADER = 64
REQ_RW = struct.Struct("<BBHIQQ")  # operation, nr_segments, handle, pad, id, sector_number
SEGMENT = struct.Struct("<IBBH")  # gref, first_sect, last_sect, pad
REQ_INDIRECT = struct.Struct("<BBHIQQHH8I")  # 6, indirect_op, nr_segments, pad, id, sector, handle, pad, grefs[8]
REQ_DISCARD = struct.Struct("<BBHIQQQ")  # 5, flag, pad, pad, id, sector_number, nr_sectors
RSP = struct.Struct("<QBxh")  # id, operation, pad, status (then 4 bytes of padding)

# blkif.h for a 32-bit frontend (x86_32-abi): the same structs packed with
# 64-bit fields at 4-byte alignment, so no padding after `handle` (id at 4)
# and a 12-byte response; a slot is the rw request with 11 segments.
SLOT_32 = 108
REQ_RW_32 = struct.Struct("<BBHQQ")  # operation, nr_segments, handle, id, sector_number; segments at 20
REQ_INDIRECT_32 = struct.Struct("<BBHQQHH8IQ")  # 6, indirect_op, nr_segments, id, sector, handle, pad, grefs, pad
REQ_DISCARD_32 = struct.Struct("<BBHQQQ")  # 5, flag, pad, id, sector_number, nr_sectors
RSP_32_SIZE = 12  # id, operation, pad, status: RSP without the x86-64 tail padding

MAX_ORDER = 4  # max-ring-page-order offered
DISK_SECTORS = 8192  # 4 MiB images for the ring-level tests
XVDA = 51712


# --------------------------------------------------------------------------- the test's blkfront


def ring_slots(pages: int, slot: int = SLOT) -> int:
    """__RING_SIZE for a blkif ring of `slot`-byte slots over `pages` pages."""
    fit = (pages * PAGE - RING_HEADER) // slot
    return 1 << (fit.bit_length() - 1)


def rw_request(op: int, rid: int, sector: int, segs, *, nseg: int | None = None, handle: int = 0) -> bytes:
    raw = REQ_RW.pack(op, len(segs) if nseg is None else nseg, handle, 0, rid, sector)
    for gref, first, last in segs:
        raw += SEGMENT.pack(gref, first, last, 0)
    return raw


def indirect_request(iop: int, rid: int, sector: int, nseg: int, grefs, handle: int = 0) -> bytes:
    grefs = list(grefs) + [0] * (8 - len(grefs))
    return REQ_INDIRECT.pack(BLKIF_OP_INDIRECT, iop, nseg, 0, rid, sector, handle, 0, *grefs)


def discard_request(rid: int, sector: int, count: int, flag: int = 0) -> bytes:
    return REQ_DISCARD.pack(BLKIF_OP_DISCARD, flag, 0, 0, rid, sector, count)


def rw_request_32(op: int, rid: int, sector: int, segs, *, nseg: int | None = None, handle: int = 0) -> bytes:
    raw = REQ_RW_32.pack(op, len(segs) if nseg is None else nseg, handle, rid, sector)
    for gref, first, last in segs:
        raw += SEGMENT.pack(gref, first, last, 0)
    return raw


def indirect_request_32(iop: int, rid: int, sector: int, nseg: int, grefs, handle: int = 0) -> bytes:
    grefs = list(grefs) + [0] * (8 - len(grefs))
    return REQ_INDIRECT_32.pack(BLKIF_OP_INDIRECT, iop, nseg, rid, sector, handle, 0, *grefs, 0)


def discard_request_32(rid: int, sector: int, count: int, flag: int = 0) -> bytes:
    return REQ_DISCARD_32.pack(BLKIF_OP_DISCARD, flag, 0, rid, sector, count)


class Ring:
    """One queue's shared ring as blkfront lays it out: `pages` granted
    pages (not adjacent in guest RAM), the frontend's private indexes and
    the event channel port standing for the guest's."""

    def __init__(self, fe: "Frontend", order: int, port: int, slot: int = SLOT) -> None:
        self.fe = fe
        self.order = order
        self.slot = slot  # 112 for x86_64-abi, 108 for x86_32-abi
        self.pages = []
        for _ in range(1 << order):
            self.pages.append(fe.page())
            fe.page()  # a gap: slots that straddle pages must really be split
        self.size = ring_slots(len(self.pages), slot)
        struct.pack_into("<IIII", fe.mem, self.pages[0], 0, 1, 0, 1)  # SHARED_RING_INIT
        self.refs = [fe.grant(p) for p in self.pages]
        self.port = port
        self.req_prod = 0  # req_prod_pvt
        self.rsp_cons = 0

    def _span(self, off: int, n: int):
        while n:
            p, o = divmod(off, PAGE)
            k = min(n, PAGE - o)
            yield self.pages[p] + o, k
            off += k
            n -= k

    def _put(self, off: int, data: bytes) -> None:
        for gpa, k in self._span(off, len(data)):
            self.fe.mem[gpa : gpa + k] = data[:k]
            data = data[k:]

    def _get(self, off: int, n: int) -> bytes:
        return b"".join(bytes(self.fe.mem[gpa : gpa + k]) for gpa, k in self._span(off, n))

    def slot_offset(self, idx: int) -> int:
        return RING_HEADER + (idx % self.size) * self.slot

    def straddles(self, idx: int) -> bool:
        off = self.slot_offset(idx)
        return off // PAGE != (off + self.slot - 1) // PAGE

    def slot_bytes(self, idx: int) -> bytes:
        return self._get(self.slot_offset(idx), self.slot)

    def post(self, raw: bytes) -> int:
        """Put a request in the next slot (published by `push`); its index."""
        assert len(raw) <= self.slot
        idx = self.req_prod
        self._put(self.slot_offset(idx), raw.ljust(self.slot, b"\xee"))
        self.req_prod += 1
        return idx

    def _u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.fe.mem, self.pages[0] + off)[0]

    def push(self, req_prod: int | None = None) -> None:
        struct.pack_into("<I", self.fe.mem, self.pages[0], (self.req_prod if req_prod is None else req_prod)
                         & 0xFFFFFFFF)

    @property
    def req_event(self) -> int:
        return self._u32(4)

    @property
    def rsp_prod(self) -> int:
        return self._u32(8)

    def responses(self) -> list[tuple[int, int, int]]:
        out = []
        prod = self.rsp_prod
        while self.rsp_cons != prod:
            out.append(RSP.unpack(self._get(self.slot_offset(self.rsp_cons), RSP.size)))
            self.rsp_cons += 1
        return out


class Frontend:
    """blkfront's side, in the grants guest's memory: pages from 8 MiB up
    (the guest lives at 1 MiB), v1 grant entries from ref 32 (the guest uses
    8-11) written straight into the table the guest placed."""

    BASE = 8 << 20

    def __init__(self, dom: pvhvm.Domain, table_gpa: int) -> None:
        self.dom = dom
        self.mem = dom.memory
        self.table = table_gpa
        self._next_page = self.BASE
        self._next_ref = 32

    def page(self, fill: bytes = b"\0") -> int:
        gpa = self._next_page
        self._next_page += PAGE
        self.mem[gpa : gpa + PAGE] = fill * PAGE
        return gpa

    def grant(self, gpa: int, readonly: bool = False, domid: int = 0) -> int:
        ref = self._next_ref
        self._next_ref += 1
        assert ref < PAGE // 8, "one grant frame holds 512 v1 entries"
        entry = self.table + 8 * ref
        struct.pack_into("<HHI", self.mem, entry, 0, domid, gpa // PAGE)
        struct.pack_into("<H", self.mem, entry, GTF_permit_access | (GTF_readonly if readonly else 0))
        return ref

    def grant_flags(self, ref: int) -> int:
        return struct.unpack_from("<H", self.mem, self.table + 8 * ref)[0]

    def buffer(self, data: bytes | None = None, readonly: bool = False) -> tuple[int, int]:
        """A granted page, (gpa, ref): `data` in it, else a 0xAA pattern."""
        gpa = self.page(b"\xaa")
        if data is not None:
            self.mem[gpa : gpa + len(data)] = data
        return gpa, self.grant(gpa, readonly)

    def read(self, gpa: int, start: int = 0, end: int = PAGE) -> bytes:
        return bytes(self.mem[gpa + start : gpa + end])


class PortOps:
    """dom.backend_ops for a vbd whose ports the test bound to the host
    already (the grants guest allocates no event channels): binding and
    unbinding are recorded, everything else goes to the core."""

    def __init__(self, ops) -> None:
        self._ops = ops
        self.bound: list[int] = []
        self.unbound: list[int] = []

    def bind_guest_port(self, port: int) -> None:
        self.bound.append(port)

    def unbind_port(self, port: int) -> bool:
        self.unbound.append(port)
        return True

    def __getattr__(self, name):
        return getattr(self._ops, name)


def make_image(path: Path, sectors: int = DISK_SECTORS, data: bytes | None = None) -> bytes:
    """A fully written raw image of random bytes (or `data`); its content."""
    content = os.urandom(sectors * SECTOR) if data is None else data
    path.write_bytes(content)
    return content


def file_bytes(path: Path, sector: int, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(sector * SECTOR)
        return f.read(count * SECTOR)


class Env:
    def __init__(self, dom, fe, tmp_path) -> None:
        self.dom, self.fe, self.tmp_path = dom, fe, tmp_path
        self.vbds: list[Blkback] = []

    def vbd(self, image: Path | None = None, *, readonly: bool = False, max_queues: int = 1,
            vdev: str = "xvda") -> Blkback:
        """A vbd on `image` (default: a fresh 4 MiB random image) attached
        to the domain, in InitWait."""
        if image is None:
            image = self.tmp_path / f"{vdev}.img"
            make_image(image)
        vbd = Blkback(self.dom.devices, DiskSpec(image, readonly, vdev), max_queues=max_queues)
        vbd.ops = PortOps(self.dom.backend_ops)
        self.dom.devices.attach(vbd)
        self.vbds.append(vbd)
        return vbd


@pytest.fixture
def env(guests, tmp_path):
    """The grants guest at PHASE1 (table placed, spinning) and the test's
    frontend; `env.vbd()` attaches a vbd."""
    dom = pvhvm.Domain(guests["grants"], memory_mib=32)
    m = dom.expect(rb"PHASE1 a=0x[0-9a-f]+ b=0x[0-9a-f]+ table=0x([0-9a-f]+)", 30)
    e = Env(dom, Frontend(dom, int(m.group(1), 16) << 12), tmp_path)
    yield e
    workers = [t for vbd in e.vbds for t in worker_threads(vbd)]
    dom.close()
    assert not any(t.is_alive() for t in workers)  # every worker is gone with the domain
    assert all(vbd.disk.fd == -1 for vbd in e.vbds)  # and every image closed (unlocked)


def fe_write(dom, vbd, key, value) -> None:
    dom.store.write(dom.domid, f"{vbd.frontend_path}/{key}", str(value))


def set_frontend_state(dom, vbd, state: XenbusState) -> None:
    fe_write(dom, vbd, "state", int(state))
    dom.devices.settle()


def backend_state(dom, vbd) -> int:
    return int(dom.store.read(0, f"{vbd.backend_path}/state"))


def connect(env: Env, vbd: Blkback, *, order: int = 0, queues: int = 1, persistent: bool = False,
            extra: dict | None = None, state: XenbusState = XenbusState.INITIALISED,
            protocol: str | None = "x86_64-abi") -> list[Ring]:
    """Lay the rings and write what blkfront's talk_to_blkback writes, then
    switch to `state`. `extra` overrides keys (None removes one); `protocol`
    None writes no protocol node. The rings' slots are laid out for
    `protocol` (108 bytes for x86_32-abi, else 112)."""
    dom, fe = env.dom, env.fe
    slot = SLOT_32 if protocol == "x86_32-abi" else SLOT
    rings = [Ring(fe, order, dom.backend_ops.bind_host_port(), slot) for _ in range(queues)]
    keys: dict = {}
    if order:
        keys["ring-page-order"] = order
    if queues > 1:
        keys["multi-queue-num-queues"] = queues
    for q, ring in enumerate(rings):
        prefix = f"queue-{q}/" if queues > 1 else ""
        if order:
            for i, ref in enumerate(ring.refs):
                keys[f"{prefix}ring-ref{i}"] = ref
        else:
            keys[f"{prefix}ring-ref"] = ring.refs[0]
        keys[f"{prefix}event-channel"] = ring.port
    if protocol is not None:
        keys["protocol"] = protocol
    keys["feature-persistent"] = int(persistent)
    keys.update(extra or {})
    for k, v in keys.items():
        if v is not None:
            fe_write(dom, vbd, k, v)
    set_frontend_state(dom, vbd, state)
    return rings


def kick(env: Env, ring: Ring) -> None:
    """What the guest's EVTCHNOP_send on the queue's port makes the run loop do."""
    env.dom.devices.dispatch([ring.port])


def wait_responses(ring: Ring, n: int, timeout: float = 5.0) -> list[tuple[int, int, int]]:
    """The next `n` responses, once the queue's worker has published them."""
    deadline = time.monotonic() + timeout
    while ((ring.rsp_prod - ring.rsp_cons) & 0xFFFFFFFF) < n:
        assert time.monotonic() < deadline, f"{ring.rsp_prod - ring.rsp_cons} of {n} responses within {timeout} s"
        time.sleep(0.001)
    out = ring.responses()
    assert len(out) == n, out
    return out


def roundtrip(env: Env, ring: Ring, *requests: bytes) -> list[tuple[int, int, int]]:
    for raw in requests:
        ring.post(raw)
    ring.push()
    kick(env, ring)
    return wait_responses(ring, len(requests))


def wait_failure(env: Env, vbd: Blkback, timeout: float = 5.0) -> str:
    """Run the host loop until the worker's report has failed the vbd."""
    deadline = time.monotonic() + timeout
    while vbd.failure is None:
        assert time.monotonic() < deadline, f"the vbd did not fail within {timeout} s"
        env.dom.loop.poll(0.01)
    return vbd.failure


def domain_keeps_running(dom) -> None:
    """The guest still runs: a short run ends by its timeout, not an outcome."""
    assert dom.run_until(lambda: False, 0.3) is False
    assert dom.outcome is None


def worker_threads(vbd: Blkback) -> list[threading.Thread]:
    """The live threads serving `vbd`'s queues (by what they run, not by
    name: another domain's xvda has workers of the same names)."""
    out = []
    for t in threading.enumerate():
        target = getattr(t, "_target", None)  # a live Thread's run target: Queue._run
        if getattr(getattr(target, "__self__", None), "vbd", None) is vbd:
            out.append(t)
    return out


# --------------------------------------------------------------------------- xenbus


def test_device_nodes_and_permissions(guests, tmp_path):
    """The nodes libxl and Linux's blkback write, for a rw and a ro disk of
    a Domain(disks=[...])."""
    rw, ro = tmp_path / "rw.img", tmp_path / "ro.img"
    make_image(rw, 2048)
    make_image(ro, 100)
    dom = pvhvm.Domain(guests["grants"], memory_mib=32, disks=[str(rw), f"{ro},ro"])
    try:
        st, d = dom.store, dom.domid
        assert [v.vdev for v in dom.disks] == ["xvda", "xvdb"]
        assert [v.devid for v in dom.disks] == [51712, 51728]
        assert dom.disks[0] in dom.devices.devices and dom.disks[1] in dom.devices.devices
        for vbd, image, mode in ((dom.disks[0], rw, "w"), (dom.disks[1], ro, "r")):
            front = f"/local/domain/{d}/device/vbd/{vbd.devid}"
            back = f"/local/domain/0/backend/vbd/{d}/{vbd.devid}"
            assert (vbd.frontend_path, vbd.backend_path) == (front, back)
            assert vbd.error_path == f"/local/domain/0/error/backend/vbd/{d}/{vbd.devid}/error"
            for key, value in (("backend", back), ("backend-id", "0"), ("state", "1"),
                               ("virtual-device", str(vbd.devid)), ("device-type", "disk")):
                assert st.read(d, f"{front}/{key}") == value.encode(), key
            assert st.get_perms(0, front) == [("n", d), ("r", 0)]
            assert st.get_perms(0, back) == [("n", 0), ("r", d)]
            for key, value in (("frontend", front), ("frontend-id", str(d)), ("online", "1"), ("state", "2"),
                               ("params", str(image)), ("mode", mode), ("type", "file"), ("dev", vbd.vdev),
                               ("device-type", "disk"), ("removable", "0"),
                               ("feature-persistent", "1"), ("feature-max-indirect-segments", "256"),
                               ("max-ring-page-order", "4"), ("multi-queue-max-queues", "1"),
                               ("feature-flush-cache", "1"), ("feature-barrier", "1"),
                               ("feature-discard", "1" if mode == "w" else "0"),
                               ("discard-granularity", "4096"), ("discard-alignment", "0"),
                               ("discard-secure", "0")):
                assert st.read(d, f"{back}/{key}") == value.encode(), key
            # What blkback writes at connect is not there before.
            for key in ("sectors", "info", "sector-size"):
                assert not st.exists(f"{back}/{key}"), key
            assert st.read(0, f"/libxl/{d}/device/vbd/{vbd.devid}/backend") == back.encode()
            # The guest writes its side and may not touch the backend's.
            st.write(d, f"{front}/ring-ref", "5")
            with pytest.raises(XenstoreError):
                st.write(d, f"{back}/state", "4")
            with pytest.raises(XenstoreError):
                st.write(d, f"{back}/sectors", "999999")
            assert vbd.state is XenbusState.INIT_WAIT
        # Both images are open and locked while the domain lives.
        with pytest.raises(DiskError, match="locked"):
            DiskImage(DiskSpec(rw))
    finally:
        dom.close()
    DiskImage(DiskSpec(rw)).close()  # unlocked with the domain


def test_queues_offered_follow_vcpus(guests, tmp_path):
    img = tmp_path / "a.img"
    make_image(img, 64)
    dom = pvhvm.Domain(guests["grants"], memory_mib=32, vcpus=3, disks=[f"format=raw, vdev=xvdc, target={img}"])
    try:
        (vbd,) = dom.disks
        assert vbd.vdev == "xvdc" and vbd.devid == 202 << 8 | 2 << 4
        assert dom.store.read(0, f"{vbd.backend_path}/multi-queue-max-queues") == b"3"
    finally:
        dom.close()


def test_connect_nodes_close_and_reconnect(env):
    dom, fe = env.dom, env.fe
    vbd = env.vbd()
    (ring,) = connect(env, vbd)
    assert vbd.connected and backend_state(dom, vbd) == XenbusState.CONNECTED
    back = vbd.backend_path
    for key, value in (("sectors", str(DISK_SECTORS)), ("sector-size", "512"), ("physical-sector-size", "512"),
                       ("info", "0")):
        assert dom.store.read(dom.domid, f"{back}/{key}") == value.encode(), key
    assert vbd.ops.bound == [ring.port] and dom.devices.owner_of(ring.port) is not None
    assert fe.grant_flags(ring.refs[0]) & IN_USE == IN_USE  # the ring is mapped writable
    (queue,) = vbd.queues
    assert queue.ring.size == 32 and queue._thread.is_alive()
    # Idle again after a request, the worker asks to hear of the next one.
    gpa, ref = fe.buffer()
    assert roundtrip(env, ring, rw_request(BLKIF_OP_READ, 1, 0, [(ref, 0, 7)])) == [(1, 0, 0)]
    deadline = time.monotonic() + 5
    while ring.req_event != 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert ring.req_event == 2

    set_frontend_state(dom, vbd, XenbusState.CLOSING)
    assert backend_state(dom, vbd) == XenbusState.CLOSING and not vbd.connected and vbd.queues == []
    assert fe.grant_flags(ring.refs[0]) & IN_USE == 0
    assert vbd.ops.unbound == [ring.port] and dom.devices.owner_of(ring.port) is None
    assert not queue._thread.is_alive()
    set_frontend_state(dom, vbd, XenbusState.CLOSED)
    assert backend_state(dom, vbd) == XenbusState.CLOSED

    # The module comes back, with a 4-page ring this time.
    set_frontend_state(dom, vbd, XenbusState.INITIALISING)
    assert backend_state(dom, vbd) == XenbusState.INIT_WAIT
    (ring,) = connect(env, vbd, order=2, state=XenbusState.CONNECTED)
    assert vbd.connected and vbd.connections == 2 and vbd.failure is None
    assert vbd.queues[0].ring.size == 128
    assert all(fe.grant_flags(r) & IN_USE == IN_USE for r in ring.refs)
    gpa, ref = fe.buffer()
    assert roundtrip(env, ring, rw_request(BLKIF_OP_READ, 1, 0, [(ref, 0, 7)])) == [(1, 0, 0)]
    # (The first entry: the watch fires once when set, frontend Initialising.)
    assert [b for _, b in vbd.history] == [XenbusState.INIT_WAIT, XenbusState.CONNECTED, XenbusState.CLOSING,
                                           XenbusState.CLOSED, XenbusState.INIT_WAIT, XenbusState.CONNECTED]


def test_readonly_vbd(env):
    dom, fe = env.dom, env.fe
    image = env.tmp_path / "ro.img"
    content = make_image(image)
    vbd = env.vbd(image, readonly=True)
    assert dom.store.read(0, f"{vbd.backend_path}/feature-discard") == b"0"
    assert dom.store.read(0, f"{vbd.backend_path}/mode") == b"r"
    (ring,) = connect(env, vbd)
    assert int(dom.store.read(0, f"{vbd.backend_path}/info")) & VDISK_READONLY
    gpa, ref = fe.buffer(os.urandom(PAGE))
    rsps = roundtrip(env, ring,
                     rw_request(BLKIF_OP_WRITE, 1, 8, [(ref, 0, 7)]),
                     rw_request(BLKIF_OP_WRITE_BARRIER, 2, 8, [(ref, 0, 7)]),
                     discard_request(3, 0, 64),
                     # Linux's blkback refuses every non-read operation of a
                     # read-only vbd (xen_vbd_translate), flushes included.
                     rw_request(BLKIF_OP_FLUSH_DISKCACHE, 4, 0, []),
                     rw_request(BLKIF_OP_READ, 5, 8, [(ref, 0, 7)]))
    assert rsps == [(1, BLKIF_OP_WRITE, BLKIF_RSP_ERROR), (2, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_ERROR),
                    (3, BLKIF_OP_DISCARD, BLKIF_RSP_ERROR), (4, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_ERROR),
                    (5, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    assert image.read_bytes() == content
    assert fe.read(gpa) == content[8 * SECTOR : 16 * SECTOR]
    assert vbd.connected and vbd.failure is None


# --------------------------------------------------------------------------- the ring


def write_11_segments_then_read_the_last_sector(env, ring, vbd, image, bufs, encode) -> None:
    """After an 18-sector read into `bufs`: a WRITE with the full 11
    segments, each a different window of its page, one of them a single
    sector, then a read of the disk's last sector (one more is tested with
    the hostile frontends). `encode` builds a read/write request in the
    ring's ABI."""
    fe = env.fe
    windows = [(0, 7), (3, 3), (1, 6), (7, 7), (0, 0), (2, 7), (0, 5), (4, 4), (0, 7), (5, 6), (1, 1)]
    pages = [fe.buffer(os.urandom(PAGE), readonly=True) for _ in windows]  # the backend only reads them
    expect = b"".join(fe.read(gpa, f * SECTOR, (l + 1) * SECTOR) for (gpa, _), (f, l) in zip(pages, windows))
    count = len(expect) // SECTOR
    before, after = file_bytes(image, 4999, 1), file_bytes(image, 5000 + count, 1)
    rsp = roundtrip(env, ring, encode(BLKIF_OP_WRITE, 7, 5000, [(ref, f, l) for (_, ref), (f, l) in zip(pages, windows)]))
    assert rsp == [(7, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)]
    assert file_bytes(image, 5000, count) == expect
    assert file_bytes(image, 4999, 1) == before and file_bytes(image, 5000 + count, 1) == after
    # Not persistent: each grant is unmapped once its request is answered.
    assert all(fe.grant_flags(ref) & IN_USE == 0 for _, ref in bufs + pages)
    stats = vbd.stats
    assert (stats["reads"], stats["writes"], stats["sectors_read"], stats["sectors_written"]) == (1, 1, 18, count)
    gpa, ref = fe.buffer()
    assert roundtrip(env, ring, encode(BLKIF_OP_READ, 8, DISK_SECTORS - 1, [(ref, 7, 7)])) == [(8, 0, 0)]
    assert fe.read(gpa, 7 * SECTOR) == file_bytes(image, DISK_SECTORS - 1, 1)


@pytest.mark.parametrize("order", [0, 2])
def test_read_and_write_partial_segments(env, order):
    fe = env.fe
    image = env.tmp_path / "d.img"
    make_image(image)
    vbd = env.vbd(image)
    (ring,) = connect(env, vbd, order=order)
    assert vbd.queues[0].ring.size == ring.size == (32 if order == 0 else 128)

    # READ of 18 sectors from sector 100: 6 into the end of one page, a
    # whole page, then 4 at the start of a third.
    bufs = [fe.buffer() for _ in range(3)]
    segs = [(bufs[0][1], 2, 7), (bufs[1][1], 0, 7), (bufs[2][1], 0, 3)]
    assert roundtrip(env, ring, rw_request(BLKIF_OP_READ, 0xABCDEF0123, 100, segs)) == [
        (0xABCDEF0123, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    disk = file_bytes(image, 100, 18)
    assert fe.read(bufs[0][0], 0, 1024) == b"\xaa" * 1024  # outside the segment: untouched
    assert fe.read(bufs[0][0], 1024) == disk[: 6 * SECTOR]
    assert fe.read(bufs[1][0]) == disk[6 * SECTOR : 14 * SECTOR]
    assert fe.read(bufs[2][0], 0, 4 * SECTOR) == disk[14 * SECTOR :]
    assert fe.read(bufs[2][0], 4 * SECTOR) == b"\xaa" * (4 * SECTOR)

    write_11_segments_then_read_the_last_sector(env, ring, vbd, image, bufs, rw_request)


def test_notifications_follow_rsp_event(env):
    """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: the frontend's port is raised
    only when it asked to hear of a response just published."""
    fe = env.fe
    vbd = env.vbd()
    (ring,) = connect(env, vbd)
    raised: list[int] = []
    real_notify = vbd.ops.notify

    def notify(port: int) -> bool:
        raised.append(port)
        return real_notify(port)

    vbd.ops.notify = notify  # the PortOps seam: a plain attribute
    _, ref = fe.buffer()
    read = rw_request(BLKIF_OP_READ, 1, 0, [(ref, 0, 7)])
    assert roundtrip(env, ring, read) == [(1, 0, 0)]  # rsp_event 1 (SHARED_RING_INIT): notified
    assert raised == [ring.port] and vbd.stats["notifications"] == 1
    struct.pack_into("<I", fe.mem, ring.pages[0] + 12, 100)  # not before response 100
    assert roundtrip(env, ring, read, read) == [(1, 0, 0)] * 2
    time.sleep(0.05)  # a notification would come right after the push
    assert raised == [ring.port]
    struct.pack_into("<I", fe.mem, ring.pages[0] + 12, ring.rsp_cons + 1)  # the next one, please
    assert roundtrip(env, ring, read) == [(1, 0, 0)]
    deadline = time.monotonic() + 5
    while len(raised) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert raised == [ring.port] * 2


def test_multi_page_ring_with_straddling_slots(env):
    """A 4-page ring of 128 slots, filled up twice over (indexes wrap):
    requests whose slot straddles two ring pages are read whole, responses
    are written across the boundary."""
    fe = env.fe
    image = env.tmp_path / "d.img"
    make_image(image)
    vbd = env.vbd(image)
    (ring,) = connect(env, vbd, order=2)
    assert ring.size == 128 and ring_slots(4) == 128
    straddling = [i for i in range(ring.size) if ring.straddles(i)]
    assert straddling == [72, 109]  # one starts 64 bytes before a page ends, one 16 bytes before

    small = [fe.buffer() for _ in range(16)]
    big = {i: [fe.buffer(os.urandom(PAGE)) for _ in range(11)] for i in straddling}
    big_sector = {i: 2000 + 100 * k for k, i in enumerate(straddling)}

    def fill(base: int, write_big: bool) -> None:
        for i in range(ring.size):
            rid = (base + i) | 0x5A5A << 32
            if i in big:
                op = BLKIF_OP_WRITE if write_big else BLKIF_OP_READ
                ring.post(rw_request(op, rid, big_sector[i], [(ref, 0, 7) for _, ref in big[i]]))
            else:  # one sector into page i % 16, at sector i // 16 of it
                ring.post(rw_request(BLKIF_OP_READ, rid, 3000 + i, [(small[i % 16][1], i // 16, i // 16)]))
        assert ring.req_prod == base + ring.size
        ring.push()
        kick(env, ring)
        rsps = wait_responses(ring, ring.size)
        assert [r[0] for r in rsps] == [(base + i) | 0x5A5A << 32 for i in range(ring.size)]
        assert [r[2] for r in rsps] == [BLKIF_RSP_OKAY] * ring.size
        assert [r[1] for r in rsps] == [BLKIF_OP_WRITE if i in big and write_big else BLKIF_OP_READ
                                        for i in range(ring.size)]
        for i in range(ring.size):
            if i not in big:
                gpa = small[i % 16][0]
                s = i // 16
                assert fe.read(gpa, s * SECTOR, (s + 1) * SECTOR) == file_bytes(image, 3000 + i, 1), i

    written = {i: b"".join(fe.read(gpa) for gpa, _ in big[i]) for i in straddling}
    fill(0, write_big=True)
    for i in straddling:
        assert file_bytes(image, big_sector[i], 88) == written[i]
    # Round two: slots 128..255 land where 0..127 did; read the big ones back.
    for i in straddling:
        for gpa, _ in big[i]:
            fe.mem[gpa : gpa + PAGE] = bytes(PAGE)
    fill(ring.size, write_big=False)
    for i in straddling:
        assert b"".join(fe.read(gpa) for gpa, _ in big[i]) == written[i]
    assert vbd.stats["requests"] == 2 * ring.size and vbd.stats["batches"] >= 4  # taken 64 at a time
    assert vbd.connected and vbd.failure is None


def test_flush_and_barrier_sync_the_image(env, monkeypatch):
    fe = env.fe
    image = env.tmp_path / "d.img"
    make_image(image)
    vbd = env.vbd(image)
    (ring,) = connect(env, vbd)
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    assert roundtrip(env, ring, rw_request(BLKIF_OP_FLUSH_DISKCACHE, 1, 0, [])) == [
        (1, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY)]
    assert synced == [vbd.disk.fd]
    data = [fe.buffer(os.urandom(PAGE)) for _ in range(2)]
    assert roundtrip(env, ring, rw_request(BLKIF_OP_WRITE_BARRIER, 2, 64, [(r, 0, 7) for _, r in data])) == [
        (2, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_OKAY)]
    assert synced == [vbd.disk.fd] * 3  # before and after the barrier's own write
    assert file_bytes(image, 64, 16) == fe.read(data[0][0]) + fe.read(data[1][0])
    # A flush with data is a write followed by a flush.
    gpa, ref = fe.buffer(os.urandom(PAGE))
    assert roundtrip(env, ring, rw_request(BLKIF_OP_FLUSH_DISKCACHE, 3, 200, [(ref, 0, 7)])) == [
        (3, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY)]
    assert file_bytes(image, 200, 8) == fe.read(gpa)
    assert vbd.stats["flushes"] == 3


def test_discard_punches_a_hole(env):
    fe = env.fe
    image = env.tmp_path / "d.img"
    content = make_image(image)
    vbd = env.vbd(image)
    (ring,) = connect(env, vbd)
    os.sync()
    blocks = os.stat(image).st_blocks
    with open(image, "rb") as f:  # fully written: no hole before the end
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == len(content)
    start, count = 2048, 256  # 128 KiB at 1 MiB
    assert roundtrip(env, ring, discard_request(11, start, count)) == [(11, BLKIF_OP_DISCARD, BLKIF_RSP_OKAY)]
    st = os.stat(image)
    assert st.st_size == len(content)  # the size stays
    assert st.st_blocks <= blocks - count
    with open(image, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == start * SECTOR
        assert os.lseek(f.fileno(), start * SECTOR, os.SEEK_DATA) == (start + count) * SECTOR
    data = image.read_bytes()
    assert data[start * SECTOR : (start + count) * SECTOR] == bytes(count * SECTOR)
    assert data[: start * SECTOR] == content[: start * SECTOR]
    assert data[(start + count) * SECTOR :] == content[(start + count) * SECTOR :]
    # The guest reads zeros back.
    gpa, ref = fe.buffer()
    assert roundtrip(env, ring, rw_request(BLKIF_OP_READ, 12, start + 8, [(ref, 0, 7)])) == [(12, 0, 0)]
    assert fe.read(gpa) == bytes(PAGE)
    # Secure erase is not offered (discard-secure 0); nothing is discarded.
    assert roundtrip(env, ring, discard_request(13, 0, 8, flag=1)) == [(13, BLKIF_OP_DISCARD, BLKIF_RSP_EOPNOTSUPP)]
    assert file_bytes(image, 0, 8) == content[: 8 * SECTOR]
    # Nothing to discard is fine too.
    assert roundtrip(env, ring, discard_request(14, 0, 0)) == [(14, BLKIF_OP_DISCARD, BLKIF_RSP_OKAY)]
    assert vbd.stats["discards"] == 3


def test_indirect_requests(env):
    fe = env.fe
    image = env.tmp_path / "d.img"
    make_image(image)
    vbd = env.vbd(image)
    (ring,) = connect(env, vbd)
    n = 100
    pages = [fe.buffer(os.urandom(PAGE)) for _ in range(n)]
    windows = [(k % 4, 7 - k % 3) for k in range(n)]
    table = b"".join(SEGMENT.pack(ref, f, l, 0) for (_, ref), (f, l) in zip(pages, windows))
    _, iref = fe.buffer(table, readonly=True)  # the backend only reads the segment list
    expect = b"".join(fe.read(gpa, f * SECTOR, (l + 1) * SECTOR) for (gpa, _), (f, l) in zip(pages, windows))
    count = len(expect) // SECTOR
    assert count > 11 * 8  # more than a direct request can carry
    # Answered as the operation it carries (blkfront checks that).
    assert roundtrip(env, ring, indirect_request(BLKIF_OP_WRITE, 21, 1000, n, [iref])) == [
        (21, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)]
    assert file_bytes(image, 1000, count) == expect
    for gpa, _ in pages:
        fe.mem[gpa : gpa + PAGE] = b"\xaa" * PAGE
    assert roundtrip(env, ring, indirect_request(BLKIF_OP_READ, 22, 1000, n, [iref])) == [
        (22, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    got = b""
    for (gpa, _), (f, l) in zip(pages, windows):
        assert fe.read(gpa, 0, f * SECTOR) == b"\xaa" * (f * SECTOR)
        assert fe.read(gpa, (l + 1) * SECTOR) == b"\xaa" * ((7 - l) * SECTOR)
        got += fe.read(gpa, f * SECTOR, (l + 1) * SECTOR)
    assert got == expect

    # The most offered, 256 segments (one indirect page holds 512), the data
    # pages used twice over; the indirect page's gref may come in any slot.
    segs = [(pages[k % n][1], 0, 7) for k in range(256)]
    _, iref2 = fe.buffer(b"".join(SEGMENT.pack(r, f, l, 0) for r, f, l in segs))
    assert roundtrip(env, ring, indirect_request(BLKIF_OP_READ, 23, 0, 256, [iref2, 4000])) == [
        (23, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    # Page k holds the last time it was filled: segment 200 + k for k < 56, else 100 + k.
    for k in (0, 55, 56, 99):
        seg = 200 + k if k < 56 else 100 + k
        assert fe.read(pages[k][0]) == file_bytes(image, 8 * seg, 8), k
    assert vbd.stats["indirect"] == 3 and vbd.connected


def test_persistent_grants_stay_mapped_until_disconnect(env):
    dom, fe = env.dom, env.fe
    image = env.tmp_path / "d.img"
    make_image(image)
    vbd = env.vbd(image)
    (ring,) = connect(env, vbd, persistent=True)
    assert vbd.persistent
    bufs = [fe.buffer() for _ in range(2)]
    refs = [ref for _, ref in bufs]
    rsp = roundtrip(env, ring, rw_request(BLKIF_OP_READ, 1, 0, [(refs[0], 0, 7), (refs[1], 0, 7)]))
    assert rsp == [(1, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    # Kept mapped (read-write) after the request: the guest's entries show it.
    assert [fe.grant_flags(r) & IN_USE for r in refs] == [IN_USE, IN_USE]
    assert sorted(vbd.queues[0].persistent) == refs
    # Used again for a write, through the same mappings.
    for gpa, _ in bufs:
        fe.mem[gpa : gpa + PAGE] = os.urandom(PAGE)
    rsp = roundtrip(env, ring, rw_request(BLKIF_OP_WRITE, 2, 40, [(refs[1], 0, 7), (refs[0], 4, 7)]))
    assert rsp == [(2, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)]
    assert file_bytes(image, 40, 12) == fe.read(bufs[1][0]) + fe.read(bufs[0][0], 4 * SECTOR)
    assert sorted(vbd.queues[0].persistent) == refs
    # Indirect pages and their segments are persistent grants too, in
    # blkfront; here the segment pages are.
    _, iref = fe.buffer(SEGMENT.pack(refs[0], 0, 7, 0), readonly=True)
    assert roundtrip(env, ring, indirect_request(BLKIF_OP_READ, 3, 0, 1, [iref])) == [(3, 0, 0)]
    set_frontend_state(dom, vbd, XenbusState.CLOSING)
    assert [fe.grant_flags(r) & IN_USE for r in refs + ring.refs] == [0, 0, 0]
    assert fe.grant_flags(iref) & IN_USE == 0


def test_unknown_operations_are_not_supported(env):
    fe = env.fe
    vbd = env.vbd()
    (ring,) = connect(env, vbd)
    gpa, ref = fe.buffer()
    rsps = roundtrip(env, ring,
                     rw_request(4, 0x41, 0, [(ref, 0, 7)]),  # BLKIF_OP_RESERVED_1
                     rw_request(9, 0x42, 0, []),
                     rw_request(0xFF, 0x43, 0, [(ref, 0, 7)]),
                     rw_request(BLKIF_OP_READ, 0x44, 0, [(ref, 0, 7)]))
    assert rsps == [(0x41, 4, BLKIF_RSP_EOPNOTSUPP), (0x42, 9, BLKIF_RSP_EOPNOTSUPP),
                    (0x43, 0xFF, BLKIF_RSP_EOPNOTSUPP), (0x44, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    assert vbd.connected and vbd.failure is None


def test_two_queues(env):
    dom, fe = env.dom, env.fe
    image = env.tmp_path / "d.img"
    make_image(image)
    vbd = env.vbd(image, max_queues=2)
    assert dom.store.read(0, f"{vbd.backend_path}/multi-queue-max-queues") == b"2"
    rings = connect(env, vbd, queues=2, order=1)
    assert len(vbd.queues) == 2 and [q.port for q in vbd.queues] == [r.port for r in rings]
    assert sorted(t.name for t in worker_threads(vbd)) == ["blkback-xvda-q0", "blkback-xvda-q1"]
    assert sorted(vbd.ops.bound) == sorted(r.port for r in rings)
    bufs = [fe.buffer() for _ in range(2)]
    for q, ring in enumerate(rings):
        ring.post(rw_request(BLKIF_OP_READ, 100 + q, 16 * q, [(bufs[q][1], 0, 7)]))
        ring.push()
    # Only queue 1's port is notified: only queue 1 is served.
    kick(env, rings[1])
    assert wait_responses(rings[1], 1) == [(101, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    time.sleep(0.05)
    assert rings[0].rsp_prod == 0 and vbd.queues[0].stats["requests"] == 0
    kick(env, rings[0])
    assert wait_responses(rings[0], 1) == [(100, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    for q in range(2):
        assert fe.read(bufs[q][0]) == file_bytes(image, 16 * q, 8)
    assert [q.stats["requests"] for q in vbd.queues] == [1, 1]
    # Both queues together, many requests each.
    for q, ring in enumerate(rings):
        for i in range(40):
            ring.post(rw_request(BLKIF_OP_READ, i, 8 * i, [(bufs[q][1], 0, 7)]))
        ring.push()
    dom.devices.dispatch([r.port for r in rings])
    for ring in rings:
        assert [r[2] for r in wait_responses(ring, 40)] == [BLKIF_RSP_OKAY] * 40
    set_frontend_state(dom, vbd, XenbusState.CLOSING)
    assert worker_threads(vbd) == [] and sorted(vbd.ops.unbound) == sorted(r.port for r in rings)
    assert all(fe.grant_flags(ref) & IN_USE == 0 for r in rings for ref in r.refs)


# --------------------------------------------------------------------------- x86_32-abi (32-bit frontends)


def test_x86_32_layout_and_slot_arithmetic():
    """The two ABIs' sizes, and __RING_SIZE ((ring bytes - 64) / slot,
    rounded down to a power of two) for each ring-page-order offered."""
    assert REQ_RW.size == 24 and REQ_RW_32.size == 20  # no _pad1 after handle: id at 4, sector at 12
    assert SLOT == 24 + 11 * SEGMENT.size == 112 and SLOT_32 == 20 + 11 * SEGMENT.size == 108
    assert REQ_DISCARD_32.size == 28 and REQ_INDIRECT_32.size == REQ_INDIRECT.size + 4 == 64
    assert (ABI_X86_64.slot, ABI_X86_32.slot) == (SLOT, SLOT_32)
    assert (ABI_X86_64.response.size, ABI_X86_32.response.size) == (16, RSP_32_SIZE)
    assert (ABI_X86_64.seg_offset, ABI_X86_32.seg_offset) == (24, 20)
    assert ABIS == {"x86_64-abi": ABI_X86_64, "x86_32-abi": ABI_X86_32}
    # (4096 - 64) // 108 = 37 and // 112 = 36: both 32 slots; 75 and 72 in
    # two pages: both 64. The counts agree for every order; where the slots
    # lie does not.
    fits_32 = [(PAGE * (1 << o) - RING_HEADER) // SLOT_32 for o in range(MAX_ORDER + 1)]
    assert fits_32 == [37, 75, 151, 302, 606]
    for order, n in enumerate([32, 64, 128, 256, 512]):
        pages = 1 << order
        assert ring_slots(pages, SLOT_32) == ring_slots(pages) == n
        assert backend_ring_slots(SLOT_32, pages) == backend_ring_slots(SLOT, pages) == n
    # The first slot to straddle a page in a two-page ring: 64 + 37 * 108 =
    # 4060 (x86_32) against 64 + 36 * 112 = 4096, which does not straddle.
    straddle_32 = [i for i in range(64) if (RING_HEADER + i * SLOT_32) // PAGE
                   != (RING_HEADER + (i + 1) * SLOT_32 - 1) // PAGE]
    straddle_64 = [i for i in range(64) if (RING_HEADER + i * SLOT) // PAGE
                   != (RING_HEADER + (i + 1) * SLOT - 1) // PAGE]
    assert (straddle_32, straddle_64) == ([37], [])


@pytest.mark.parametrize("order", [0, 1])
def test_x86_32_read_and_write(env, order):
    fe = env.fe
    image = env.tmp_path / "d.img"
    make_image(image)
    vbd = env.vbd(image)
    (ring,) = connect(env, vbd, order=order, protocol="x86_32-abi")
    assert vbd.abi is ABI_X86_32
    assert (vbd.queues[0].ring.slot_size, vbd.queues[0].ring.size) == (SLOT_32, ring.size)
    assert ring.size == (32 if order == 0 else 64)

    # READ of 18 sectors from sector 100 (an id using all 64 bits: read at
    # offset 8, as the x86-64 layout has it, it would not come back).
    rid = 0x0123456789ABCDEF
    bufs = [fe.buffer() for _ in range(3)]
    segs = [(bufs[0][1], 2, 7), (bufs[1][1], 0, 7), (bufs[2][1], 0, 3)]
    raw = rw_request_32(BLKIF_OP_READ, rid, 100, segs, handle=XVDA)
    idx = ring.post(raw)
    ring.push()
    kick(env, ring)
    assert wait_responses(ring, 1) == [(rid, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    # A 12-byte response: the rest of the slot still holds the request.
    assert ring.slot_bytes(idx)[RSP_32_SIZE:] == raw.ljust(SLOT_32, b"\xee")[RSP_32_SIZE:]
    disk = file_bytes(image, 100, 18)
    assert fe.read(bufs[0][0], 0, 1024) == b"\xaa" * 1024
    assert fe.read(bufs[0][0], 1024) + fe.read(bufs[1][0]) + fe.read(bufs[2][0], 0, 4 * SECTOR) == disk
    assert fe.read(bufs[2][0], 4 * SECTOR) == b"\xaa" * (4 * SECTOR)

    # All 11 segments: the last one ends at the slot's last byte.
    assert len(rw_request_32(BLKIF_OP_WRITE, 7, 5000, [(0, 0, 7)] * 11)) == SLOT_32
    write_11_segments_then_read_the_last_sector(env, ring, vbd, image, bufs, rw_request_32)
    assert vbd.connected and vbd.failure is None


def test_x86_32_full_ring_with_a_straddling_slot(env):
    """A two-page x86_32 ring of 64 slots filled twice over: slot 37 starts
    36 bytes before the first page ends; an 11-segment write there is read
    whole, and every response lands at its 108-byte slot."""
    fe = env.fe
    image = env.tmp_path / "d.img"
    make_image(image)
    vbd = env.vbd(image)
    (ring,) = connect(env, vbd, order=1, protocol="x86_32-abi")
    assert ring.size == 64 and [i for i in range(ring.size) if ring.straddles(i)] == [37]
    small = [fe.buffer() for _ in range(8)]
    big = [fe.buffer(os.urandom(PAGE)) for _ in range(11)]
    written = b"".join(fe.read(gpa) for gpa, _ in big)

    def fill(base: int, op_big: int) -> None:
        for i in range(ring.size):
            rid = (base + i) | 0x32 << 56
            if i == 37:
                ring.post(rw_request_32(op_big, rid, 6000, [(ref, 0, 7) for _, ref in big]))
            else:
                ring.post(rw_request_32(BLKIF_OP_READ, rid, 3000 + i, [(small[i % 8][1], i // 8, i // 8)]))
        ring.push()
        kick(env, ring)
        rsps = wait_responses(ring, ring.size)
        assert [r[0] for r in rsps] == [(base + i) | 0x32 << 56 for i in range(ring.size)]
        assert [r[1] for r in rsps] == [op_big if i == 37 else BLKIF_OP_READ for i in range(ring.size)]
        assert [r[2] for r in rsps] == [BLKIF_RSP_OKAY] * ring.size
        for i in range(ring.size):
            if i != 37:
                gpa, s = small[i % 8][0], i // 8
                assert fe.read(gpa, s * SECTOR, (s + 1) * SECTOR) == file_bytes(image, 3000 + i, 1), i

    fill(0, BLKIF_OP_WRITE)
    assert file_bytes(image, 6000, 88) == written
    for gpa, _ in big:
        fe.mem[gpa : gpa + PAGE] = bytes(PAGE)
    fill(ring.size, BLKIF_OP_READ)
    assert b"".join(fe.read(gpa) for gpa, _ in big) == written
    assert vbd.stats["requests"] == 2 * ring.size and vbd.connected


def test_x86_32_flush_barrier_discard_and_unknown(env):
    fe = env.fe
    image = env.tmp_path / "d.img"
    content = make_image(image)
    vbd = env.vbd(image)
    (ring,) = connect(env, vbd, protocol="x86_32-abi")
    # blkfront's flush without data: sector -1, no segments.
    assert roundtrip(env, ring, rw_request_32(BLKIF_OP_FLUSH_DISKCACHE, 0xF1F1F1F1F1F1F1F1, (1 << 64) - 1, [])) == [
        (0xF1F1F1F1F1F1F1F1, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY)]
    data = [fe.buffer(os.urandom(PAGE)) for _ in range(2)]
    assert roundtrip(env, ring, rw_request_32(BLKIF_OP_WRITE_BARRIER, 2, 64, [(r, 0, 7) for _, r in data])) == [
        (2, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_OKAY)]
    assert file_bytes(image, 64, 16) == fe.read(data[0][0]) + fe.read(data[1][0])
    assert vbd.stats["flushes"] == 2

    # Discard: nr_sectors at 20 (28 in the x86-64 layout).
    start, count = 2048, 256
    assert roundtrip(env, ring, discard_request_32(0xD15CA4D0000000D1, start, count)) == [
        (0xD15CA4D0000000D1, BLKIF_OP_DISCARD, BLKIF_RSP_OKAY)]
    with open(image, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == start * SECTOR
        assert os.lseek(f.fileno(), start * SECTOR, os.SEEK_DATA) == (start + count) * SECTOR
    after = image.read_bytes()
    assert after[start * SECTOR : (start + count) * SECTOR] == bytes(count * SECTOR)
    assert after[(start + count) * SECTOR :] == content[(start + count) * SECTOR :]
    assert roundtrip(env, ring, discard_request_32(13, 0, 8, flag=1)) == [(13, BLKIF_OP_DISCARD, BLKIF_RSP_EOPNOTSUPP)]
    assert file_bytes(image, 0, 8) == content[: 8 * SECTOR]

    # Operations we do not know: the id comes from offset 4 (request_other).
    assert roundtrip(env, ring, rw_request_32(4, 0x4142434445464748, 0, []),
                     rw_request_32(9, 0x42, 0, [])) == [
        (0x4142434445464748, 4, BLKIF_RSP_EOPNOTSUPP), (0x42, 9, BLKIF_RSP_EOPNOTSUPP)]
    assert vbd.connected and vbd.failure is None


def test_x86_32_indirect_requests(env):
    fe = env.fe
    image = env.tmp_path / "d.img"
    make_image(image)
    vbd = env.vbd(image)
    (ring,) = connect(env, vbd, protocol="x86_32-abi")
    n = 100
    pages = [fe.buffer(os.urandom(PAGE)) for _ in range(n)]
    windows = [(k % 4, 7 - k % 3) for k in range(n)]
    table = b"".join(SEGMENT.pack(ref, f, l, 0) for (_, ref), (f, l) in zip(pages, windows))
    _, iref = fe.buffer(table, readonly=True)
    expect = b"".join(fe.read(gpa, f * SECTOR, (l + 1) * SECTOR) for (gpa, _), (f, l) in zip(pages, windows))
    count = len(expect) // SECTOR
    rid = 0x7766554433221100
    assert roundtrip(env, ring, indirect_request_32(BLKIF_OP_WRITE, rid, 1000, n, [iref], handle=XVDA)) == [
        (rid, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)]
    assert file_bytes(image, 1000, count) == expect
    for gpa, _ in pages:
        fe.mem[gpa : gpa + PAGE] = b"\xaa" * PAGE
    assert roundtrip(env, ring, indirect_request_32(BLKIF_OP_READ, rid + 1, 1000, n, [iref])) == [
        (rid + 1, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    got = b""
    for (gpa, _), (f, l) in zip(pages, windows):
        assert fe.read(gpa, 0, f * SECTOR) == b"\xaa" * (f * SECTOR)
        got += fe.read(gpa, f * SECTOR, (l + 1) * SECTOR)
    assert got == expect
    # 256 segments, the indirect page's gref in the second slot of grefs[].
    segs = [(pages[k % n][1], 0, 7) for k in range(256)]
    _, iref2 = fe.buffer(b"".join(SEGMENT.pack(r, f, l, 0) for r, f, l in segs))
    _, iref3 = fe.buffer(bytes(PAGE))
    assert roundtrip(env, ring, indirect_request_32(BLKIF_OP_READ, 23, 0, 256, [iref2, iref3])) == [
        (23, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    for k in (0, 55, 56, 99):
        seg = 200 + k if k < 56 else 100 + k
        assert fe.read(pages[k][0]) == file_bytes(image, 8 * seg, 8), k
    assert vbd.stats["indirect"] == 3 and vbd.connected


def _x86_32_twelve_segments(env, ring):
    _, ref = env.fe.buffer()
    ring.post(rw_request_32(BLKIF_OP_READ, 1, 0, [(ref, 0, 7)] * 11, nseg=12))


def _x86_32_past_the_end(env, ring):
    _, ref = env.fe.buffer()
    ring.post(rw_request_32(BLKIF_OP_WRITE, 1, DISK_SECTORS - 2, [(ref, 0, 7)]))


def _x86_32_discard_past_the_end(env, ring):
    ring.post(discard_request_32(1, 8, DISK_SECTORS))


def _x86_32_indirect_257(env, ring):
    _, iref = env.fe.buffer(bytes(PAGE))
    ring.post(indirect_request_32(BLKIF_OP_READ, 1, 0, 257, [iref]))


def _x86_32_bad_indirect_gref(env, ring):
    ring.post(indirect_request_32(BLKIF_OP_WRITE, 1, 0, 20, [4001]))


def _x86_32_bad_segment(env, ring):
    _, ref = env.fe.buffer()
    ring.post(rw_request_32(BLKIF_OP_READ, 1, 0, [(ref, 6, 2)]))


HOSTILE_32 = {
    "12 direct segments": (_x86_32_twelve_segments, "12 segments"),
    "sectors past the end": (_x86_32_past_the_end, f"past the end of the disk ({DISK_SECTORS} sectors)"),
    "discard past the end": (_x86_32_discard_past_the_end, "past the end of the disk"),
    "257 indirect segments": (_x86_32_indirect_257, "257 indirect segments"),
    "bad indirect gref": (_x86_32_bad_indirect_gref, "bad indirect grant reference 4001"),
    "first_sect after last_sect": (_x86_32_bad_segment, "segment sectors 6..2 outside their page"),
}


@pytest.mark.parametrize("case", list(HOSTILE_32))
def test_x86_32_hostile_request_disconnects_the_vbd(env, case):
    fe = env.fe
    image = env.tmp_path / "d.img"
    content = make_image(image)
    vbd = env.vbd(image)
    (ring,) = connect(env, vbd, persistent=True, protocol="x86_32-abi")
    _, kept = fe.buffer()
    assert roundtrip(env, ring, rw_request_32(BLKIF_OP_READ, 99, 0, [(kept, 0, 7)])) == [(99, 0, 0)]
    make, words = HOSTILE_32[case]
    make(env, ring)
    ring.push()
    kick(env, ring)
    wait_failure(env, vbd)
    _assert_disconnected(env, vbd, [ring], words, held=[kept])
    assert image.read_bytes() == content
    # The ABI is the next connection's choice: a 64-bit frontend now.
    (ring,) = connect(env, vbd, protocol="x86_64-abi")
    assert vbd.abi is ABI_X86_64 and vbd.queues[0].ring.slot_size == SLOT
    gpa, ref = fe.buffer()
    assert roundtrip(env, ring, rw_request(BLKIF_OP_READ, 5, 8, [(ref, 0, 7)])) == [(5, 0, 0)]
    assert fe.read(gpa) == content[8 * SECTOR : 16 * SECTOR]


def test_protocol_is_read_at_each_connect(env):
    """No protocol node means the native (x86-64) ABI; the same vbd then
    serves a 32-bit frontend, then a native one again."""
    dom, fe = env.dom, env.fe
    image = env.tmp_path / "d.img"
    content = make_image(image)
    vbd = env.vbd(image)
    for protocol, request in ((None, rw_request), ("x86_32-abi", rw_request_32), (None, rw_request)):
        if protocol is None and dom.store.exists(f"{vbd.frontend_path}/protocol"):
            dom.store.rm(dom.domid, f"{vbd.frontend_path}/protocol")
        (ring,) = connect(env, vbd, protocol=protocol)
        assert vbd.abi is (ABI_X86_32 if protocol else ABI_X86_64), protocol
        gpa, ref = fe.buffer()
        rid = 0xFEDCBA9876543210
        assert roundtrip(env, ring, request(BLKIF_OP_READ, rid, 24, [(ref, 0, 7)])) == [(rid, 0, 0)], protocol
        assert fe.read(gpa) == content[24 * SECTOR : 32 * SECTOR]
        set_frontend_state(dom, vbd, XenbusState.CLOSING)
        set_frontend_state(dom, vbd, XenbusState.CLOSED)
        set_frontend_state(dom, vbd, XenbusState.INITIALISING)
        assert backend_state(dom, vbd) == XenbusState.INIT_WAIT
    assert vbd.connections == 3 and vbd.failure is None


# --------------------------------------------------------------------------- hostile frontends


def _bad_gref(env, ring):
    ring.post(rw_request(BLKIF_OP_READ, 1, 0, [(4000, 0, 7)]))


def _foreign_gref(env, ring):
    ref = env.fe.grant(env.fe.page(), domid=5)  # granted to someone else
    ring.post(rw_request(BLKIF_OP_WRITE, 1, 0, [(ref, 0, 7)]))


def _never_granted_in_table(env, ring):
    gpa, ref = env.fe.buffer()
    ring.post(rw_request(BLKIF_OP_READ, 1, 0, [(ref, 0, 7), (ref + 1, 0, 7)]))  # the next entry is empty


def _twelve_segments(env, ring):
    _, ref = env.fe.buffer()
    ring.post(rw_request(BLKIF_OP_READ, 1, 0, [(ref, 0, 7)] * 11, nseg=12))


def _no_segments(env, ring):
    ring.post(rw_request(BLKIF_OP_WRITE, 1, 0, []))


def _past_the_end(env, ring):
    _, ref = env.fe.buffer()
    ring.post(rw_request(BLKIF_OP_READ, 1, DISK_SECTORS - 2, [(ref, 0, 7)]))


def _far_past_the_end(env, ring):
    _, ref = env.fe.buffer()
    ring.post(rw_request(BLKIF_OP_WRITE, 1, (1 << 64) - 4, [(ref, 0, 7)]))


def _discard_past_the_end(env, ring):
    ring.post(discard_request(1, 8, DISK_SECTORS))


def _runaway(env, ring):
    ring.req_prod += 300


def _last_sect_8(env, ring):
    _, ref = env.fe.buffer()
    ring.post(rw_request(BLKIF_OP_READ, 1, 0, [(ref, 0, 8)]))


def _first_after_last(env, ring):
    _, ref = env.fe.buffer()
    ring.post(rw_request(BLKIF_OP_WRITE, 1, 0, [(ref, 5, 2)]))


def _bad_indirect_gref(env, ring):
    ring.post(indirect_request(BLKIF_OP_READ, 1, 0, 20, [4001]))


def _indirect_257(env, ring):
    _, iref = env.fe.buffer(bytes(PAGE))
    ring.post(indirect_request(BLKIF_OP_READ, 1, 0, 257, [iref]))


def _indirect_513(env, ring):
    iref = [env.fe.buffer(bytes(PAGE))[1] for _ in range(2)]
    ring.post(indirect_request(BLKIF_OP_WRITE, 1, 0, 513, iref))


def _indirect_flush(env, ring):
    _, iref = env.fe.buffer(bytes(PAGE))
    ring.post(indirect_request(BLKIF_OP_FLUSH_DISKCACHE, 1, 0, 1, [iref]))


def _indirect_bad_segment(env, ring):
    _, ref = env.fe.buffer()
    _, iref = env.fe.buffer(SEGMENT.pack(ref, 0, 7, 0) + SEGMENT.pack(ref, 0, 9, 0))
    ring.post(indirect_request(BLKIF_OP_READ, 1, 0, 2, [iref]))


def _indirect_bad_segment_gref(env, ring):
    _, iref = env.fe.buffer(SEGMENT.pack(4002, 0, 7, 0))
    ring.post(indirect_request(BLKIF_OP_READ, 1, 0, 1, [iref]))


HOSTILE = {
    "bad gref": (_bad_gref, "bad grant reference 4000"),
    "gref granted to another domain": (_foreign_gref, "GNTST_permission_denied"),
    "second segment not granted": (_never_granted_in_table, "bad grant reference"),
    "12 direct segments": (_twelve_segments, "12 segments"),
    "read without segments": (_no_segments, "0 segments"),
    "sectors past the end": (_past_the_end, f"past the end of the disk ({DISK_SECTORS} sectors)"),
    "sector near 2**64": (_far_past_the_end, "past the end of the disk"),
    "discard past the end": (_discard_past_the_end, "past the end of the disk"),
    "runaway req_prod": (_runaway, "runs 300 requests ahead"),
    "last_sect 8": (_last_sect_8, "segment sectors 0..8 outside their page"),
    "first_sect after last_sect": (_first_after_last, "segment sectors 5..2 outside their page"),
    "bad indirect gref": (_bad_indirect_gref, "bad indirect grant reference 4001"),
    "257 indirect segments": (_indirect_257, "257 indirect segments"),
    "513 indirect segments": (_indirect_513, "513 indirect segments"),
    "indirect flush": (_indirect_flush, "indirect operation 3"),
    "indirect segment outside its page": (_indirect_bad_segment, "segment sectors 0..9 outside their page"),
    "indirect segment with a bad gref": (_indirect_bad_segment_gref, "bad grant reference 4002"),
}


def _assert_disconnected(env, vbd, rings, words, held=()):
    dom, fe = env.dom, env.fe
    assert vbd.failure is not None and words in vbd.failure, vbd.failure
    assert dom.store.read(0, vbd.error_path).decode() == vbd.failure
    assert vbd.error_path.startswith("/local/domain/0/error/backend/vbd/")
    assert not vbd.connected and vbd.queues == []
    assert backend_state(dom, vbd) == XenbusState.CLOSING
    for ref in [r for ring in rings for r in ring.refs] + list(held):  # rings and kept grants unmapped
        assert fe.grant_flags(ref) & IN_USE == 0, ref
    for ring in rings:
        assert ring.port in vbd.ops.unbound and dom.devices.owner_of(ring.port) is None
    assert worker_threads(vbd) == []
    domain_keeps_running(dom)
    # blkfront answers Closing with Closed; a new frontend gets a new start.
    set_frontend_state(dom, vbd, XenbusState.CLOSED)
    assert backend_state(dom, vbd) == XenbusState.CLOSED
    set_frontend_state(dom, vbd, XenbusState.INITIALISING)
    assert backend_state(dom, vbd) == XenbusState.INIT_WAIT


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_request_disconnects_the_vbd(env, case, caplog):
    fe = env.fe
    image = env.tmp_path / "d.img"
    content = make_image(image)
    vbd = env.vbd(image)
    (ring,) = connect(env, vbd, persistent=True)
    # One good request first: its grant stays mapped (persistent) until the end.
    kept_gpa, kept = fe.buffer()
    assert roundtrip(env, ring, rw_request(BLKIF_OP_READ, 99, 0, [(kept, 0, 7)])) == [(99, 0, 0)]
    assert fe.grant_flags(kept) & IN_USE == IN_USE
    make, words = HOSTILE[case]
    make(env, ring)
    ring.push()
    with caplog.at_level("ERROR", logger="pvhvm.xenbus"):
        kick(env, ring)
        wait_failure(env, vbd)
    assert any(words in r.getMessage() for r in caplog.records), caplog.text
    _assert_disconnected(env, vbd, [ring], words, held=[kept])
    assert image.read_bytes() == content  # nothing was written
    # And the same vbd serves the frontend's next life.
    (ring,) = connect(env, vbd)
    gpa, ref = fe.buffer()
    assert roundtrip(env, ring, rw_request(BLKIF_OP_READ, 5, 8, [(ref, 0, 7)])) == [(5, 0, 0)]
    assert fe.read(gpa) == content[8 * SECTOR : 16 * SECTOR]
    assert vbd.connections == 2


def test_hostile_second_queue_keeps_the_first_from_serving(env):
    """A bad request on queue 1 of 2 takes the whole vbd down, queue 0's
    worker and persistent grants included."""
    fe = env.fe
    vbd = env.vbd(max_queues=2)
    rings = connect(env, vbd, queues=2, persistent=True)
    _, kept = fe.buffer()
    assert roundtrip(env, rings[0], rw_request(BLKIF_OP_READ, 1, 0, [(kept, 0, 7)])) == [(1, 0, 0)]
    _bad_gref(env, rings[1])
    rings[1].push()
    kick(env, rings[1])
    wait_failure(env, vbd)
    _assert_disconnected(env, vbd, rings, "bad grant reference 4000", held=[kept])


@pytest.mark.parametrize("kw, words", [
    ({"order": 5}, "ring-page-order 5 is over the 4 offered"),
    ({"queues": 3}, "asks for 3 queues; at most 2 offered"),
    ({"extra": {"protocol": "x86_64-abi-but-not-quite"}}, "is not served"),
    ({"extra": {"protocol": "arm-abi"}}, "frontend protocol 'arm-abi' is not served (x86_64-abi or x86_32-abi)"),
    ({"extra": {"ring-ref": 4000}}, "cannot map ring-ref [4000]"),
    ({"order": 2, "extra": {"ring-ref2": 4000}}, "cannot map ring-ref"),
    ({"queues": 2, "extra": {"queue-1/ring-ref": 4000}}, "cannot map queue-1/ring-ref"),
    ({"queues": 2, "extra": {"queue-1/event-channel": None}}, "wrote no queue-1/ring-ref or queue-1/event-channel"),
    ({"extra": {"event-channel": None}}, "wrote no ring-ref or event-channel"),
    ({"extra": {"event-channel": "seven"}}, "not a number"),
    ({"order": 1, "extra": {"ring-ref1": None}}, "wrote no ring-ref"),
    ({"extra": {"multi-queue-num-queues": 0}}, "asks for 0 queues"),
])
def test_bad_handshake_is_refused(env, kw, words):
    dom, fe = env.dom, env.fe
    vbd = env.vbd(max_queues=2)
    first_ref = fe._next_ref
    rings = connect(env, vbd, **kw)
    assert not vbd.connected and vbd.failure is not None and words in vbd.failure, vbd.failure
    assert dom.store.read(0, vbd.error_path).decode() == vbd.failure
    assert backend_state(dom, vbd) == XenbusState.CLOSING
    assert not dom.store.exists(f"{vbd.backend_path}/sectors")
    # Whatever was mapped or bound on the way is let go again.
    for ref in range(first_ref, fe._next_ref):
        assert fe.grant_flags(ref) & IN_USE == 0, ref
    assert sorted(vbd.ops.unbound) == sorted(vbd.ops.bound)
    assert all(dom.devices.owner_of(r.port) is None for r in rings)
    assert worker_threads(vbd) == []
    domain_keeps_running(dom)
    set_frontend_state(dom, vbd, XenbusState.CLOSED)
    assert backend_state(dom, vbd) == XenbusState.CLOSED


# --------------------------------------------------------------------------- disk specs


@pytest.mark.parametrize("text, path, readonly, vdev", [
    ("disk.img", "disk.img", False, None),
    ("/srv/d.img,ro", "/srv/d.img", True, None),
    ("/srv/d.img,rw", "/srv/d.img", False, None),
    ("/srv/d.img,vdev=xvdc", "/srv/d.img", False, "xvdc"),
    ("/srv/d.img, ro, vdev=xvdd", "/srv/d.img", True, "xvdd"),
    ("format=raw, vdev=xvda, access=rw, target=/srv/a,b.img", "/srv/a,b.img", False, "xvda"),
    ("vdev=xvdb,access=ro,format=RAW,target=/srv/x y.img", "/srv/x y.img", True, "xvdb"),
    ("access=r, target=/srv/t=1.img", "/srv/t=1.img", True, None),
    ("/srv/p.img,raw,xvdb,ro", "/srv/p.img", True, "xvdb"),
    ("/srv/p.img,raw,xvde", "/srv/p.img", False, "xvde"),
    ("/srv/p.img,,xvdf,w", "/srv/p.img", False, "xvdf"),
    ("  /srv/p.img  ", "/srv/p.img", False, None),
])
def test_parse_disk_spec(text, path, readonly, vdev):
    spec = parse_disk_spec(text)
    assert spec == DiskSpec(Path(path), readonly, vdev, False)


@pytest.mark.parametrize("text", ["format=raw, vdev=xvda, target=", "target=  "])
def test_parse_disk_spec_empty_target(text):
    with pytest.raises(DiskError, match="names no image"):
        parse_disk_spec(text)


def test_parse_disk_spec_objects_and_cdrom():
    spec = DiskSpec(Path("/x"), True, "xvdb")
    assert parse_disk_spec(spec) is spec
    assert parse_disk_spec(Path("/y.img")) == DiskSpec(Path("/y.img"))
    cd = parse_disk_spec("devtype=cdrom, vdev=xvdc, target=/iso/d.iso")
    assert cd.cdrom and cd.readonly and cd.vdev == "xvdc"
    assert parse_disk_spec("/iso/d.iso,cdrom") == DiskSpec(Path("/iso/d.iso"), True, None, True)
    assert parse_disk_spec("backendtype=phy, target=/dev/sdz").path == Path("/dev/sdz")


@pytest.mark.parametrize("text, words", [
    ("format=qcow2,target=x.img", "format qcow2 is not supported (raw images only)"),
    ("x.img,qcow2,xvda", "format qcow2 is not supported"),
    ("x.img,color=red", "unknown key 'color'"),
    ("x.img,vdev=sda", "bad virtual device 'sda'"),
    ("x.img,vdev=xvd", "bad virtual device 'xvd'"),
    ("x.img,vdev=xvdA", "bad virtual device"),
    ("", "empty disk spec"),
    ("   ", "empty disk spec"),
    ("vdev=xvda, access=rw", "names no image"),
    ("access=rx, target=x.img", "access must be ro or rw"),
    ("devtype=floppy, target=x.img", "devtype must be disk or cdrom"),
    ("backendtype=nbd, target=x.img", "unknown backendtype"),
    ("x.img,raw,xvdb,ro,again", "cannot make sense of 'again'"),
    ("x.img,y.img", "cannot make sense of 'y.img'"),
])
def test_parse_disk_spec_errors(text, words):
    with pytest.raises(DiskError) as e:
        parse_disk_spec(text)
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg
    assert isinstance(e.value, BuildError)  # the CLI's one-line errors


def test_vdev_numbers():
    # docs/misc/vbd-interface.txt: 202 << 8 | disk << 4 up to xvdp, then the extended form.
    assert vdev_number("xvda") == 51712
    assert vdev_number("xvdb") == 51728
    assert vdev_number("xvdp") == 202 << 8 | 15 << 4
    assert vdev_number("xvdq") == 1 << 28 | 16 << 8
    assert vdev_number("xvdz") == 1 << 28 | 25 << 8
    assert vdev_number("xvdaa") == 1 << 28 | 26 << 8
    assert [vdev_name(i) for i in (0, 1, 25, 26, 27, 701, 702)] == [
        "xvda", "xvdb", "xvdz", "xvdaa", "xvdab", "xvdzz", "xvdaaa"]
    for i in range(0, 2000, 7):
        assert vdev_number(vdev_name(i)) in (202 << 8 | i << 4, 1 << 28 | i << 8)
    for bad in ("hda", "xvd", "xvd1", "sda", "xvdA"):
        with pytest.raises(DiskError, match="bad virtual device"):
            vdev_number(bad)


def test_assign_vdevs():
    a, b, c = (DiskSpec(Path(n)) for n in "abc")
    out = assign_vdevs([a, b.with_vdev("xvda"), c])
    assert [s.vdev for s in out] == ["xvdb", "xvda", "xvdc"]
    assert [s.path for s in out] == [Path("a"), Path("b"), Path("c")]
    assert [s.vdev for s in assign_vdevs([a, b, c])] == ["xvda", "xvdb", "xvdc"]
    assert assign_vdevs([]) == []
    with pytest.raises(DiskError, match="two disks on xvdb"):
        assign_vdevs([a.with_vdev("xvdb"), b.with_vdev("xvdb")])


# --------------------------------------------------------------------------- images


def _open_error(spec: DiskSpec) -> str:
    with pytest.raises(DiskError) as e:
        DiskImage(spec)
    msg = str(e.value)
    assert "\n" not in msg and str(spec.path) in msg, msg
    return msg


def test_image_sizes_and_modes(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"x" * 4097)
    d = DiskImage(DiskSpec(img))
    assert d.sectors == 8 and not d.readonly and d.regular
    assert os.get_inheritable(d.fd) is False
    d.close()
    d.close()  # twice is fine
    sparse = tmp_path / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)
    d = DiskImage(DiskSpec(sparse, readonly=True))
    assert d.sectors == 1 << 21 and d.readonly
    with pytest.raises(OSError):
        os.write(d.fd, b"x")  # opened read-only
    d.close()
    assert os.stat(sparse).st_blocks == 0  # opening left it sparse


def test_image_errors(tmp_path):
    assert "no such disk image" in _open_error(DiskSpec(tmp_path / "missing.img"))
    d = tmp_path / "dir"
    d.mkdir()
    assert "is a directory" in _open_error(DiskSpec(d))
    assert "is a directory" in _open_error(DiskSpec(d, readonly=True))
    q = tmp_path / "q.qcow2"
    q.write_bytes(b"QFI\xfb\0\0\0\3" + bytes(1 << 16))
    msg = _open_error(DiskSpec(q, readonly=True))
    assert "a qcow2 image; only raw images are supported" in msg and "qemu-img convert" in msg
    v = tmp_path / "v.vmdk"
    v.write_bytes(b"KDMV" + bytes(4096))
    assert "a vmdk image" in _open_error(DiskSpec(v))
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 511)
    assert "smaller than one 512-byte sector" in _open_error(DiskSpec(tiny))
    assert "not a regular file or block device" in _open_error(DiskSpec(Path("/dev/null"), readonly=True))
    ro = tmp_path / "ro.img"
    ro.write_bytes(bytes(4096))
    ro.chmod(0o444)
    assert f"disk image is read-only; give it as {ro},ro" in _open_error(DiskSpec(ro))
    DiskImage(DiskSpec(ro, readonly=True)).close()  # as ro it opens


def test_image_locks(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(8192))
    # Another program holds an exclusive lock (another open file description).
    with open(img, "rb") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        assert "in use by another domain or program (locked)" in _open_error(DiskSpec(img))
        assert "in use by another writer (locked)" in _open_error(DiskSpec(img, readonly=True))
    # Read-only users share; a writer is kept off while any of them lives.
    r1 = DiskImage(DiskSpec(img, readonly=True))
    r2 = DiskImage(DiskSpec(img, readonly=True))
    assert "locked" in _open_error(DiskSpec(img))
    r1.close()
    assert "locked" in _open_error(DiskSpec(img))
    r2.close()
    w = DiskImage(DiskSpec(img))
    assert "locked" in _open_error(DiskSpec(img, readonly=True))
    w.close()
    # A lock held by another process.
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys\n"
                               f"f = open({str(img)!r}, 'rb+'); fcntl.flock(f, fcntl.LOCK_SH)\n"
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert "locked" in _open_error(DiskSpec(img))
        DiskImage(DiskSpec(img, readonly=True)).close()  # shared with a reader
    finally:
        holder.stdin.close()
        holder.wait(10)
    DiskImage(DiskSpec(img)).close()


def test_domains_lock_their_images(guests, tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, 16)
    make_image(b, 16)
    dom = pvhvm.Domain(guests["hello"], memory_mib=32, disks=[str(a), f"{b},ro"])
    try:
        with pytest.raises(BuildError, match="locked"):
            pvhvm.Domain(guests["hello"], memory_mib=32, disks=[str(a)])
        pvhvm.Domain(guests["hello"], memory_mib=32, disks=[f"{b},ro"]).close()  # ro is shared
        with pytest.raises(BuildError, match="locked"):
            pvhvm.Domain(guests["hello"], memory_mib=32, disks=[str(b)])
    finally:
        dom.close()
    # A domain that fails to build lets go of the images it opened first.
    with pytest.raises(BuildError, match="no such disk image"):
        pvhvm.Domain(guests["hello"], memory_mib=32, disks=[str(a), str(tmp_path / "missing.img")])
    DiskImage(DiskSpec(a)).close()
    # Two disks on one image: the second is refused.
    with pytest.raises(BuildError, match="locked"):
        pvhvm.Domain(guests["hello"], memory_mib=32, disks=[str(a), str(a)])
    with pytest.raises(BuildError, match="two disks on xvda"):
        pvhvm.Domain(guests["hello"], memory_mib=32, disks=[f"{a},vdev=xvda", f"{b},ro,vdev=xvda"])
    # A domain that ends lets go of its images without close().
    dom = pvhvm.Domain(guests["hello"], memory_mib=32, disks=[str(a)])
    assert dom.run(timeout=30).kind is pvhvm.OutcomeKind.SHUTDOWN
    DiskImage(DiskSpec(a)).close()
    dom.close()


# --------------------------------------------------------------------------- CLI

PVHVM = [sys.executable, "-m", "pvhvm"]


def run_pvhvm(*args):
    return subprocess.run([*PVHVM, *map(str, args)], capture_output=True, text=True, timeout=60)


def one_line_error(p, needle):
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pvhvm: ") and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_cli_bad_disks(guests, tmp_path):
    hello = guests["hello"]
    one_line_error(run_pvhvm("boot", hello, "--disk", tmp_path / "missing.img"), "no such disk image")
    (tmp_path / "dir").mkdir()
    one_line_error(run_pvhvm("boot", hello, "--disk", f"{tmp_path / 'dir'}/"), "is a directory")
    one_line_error(run_pvhvm("boot", hello, "--disk", "format=qcow2,target=x"), "format qcow2 is not supported")
    one_line_error(run_pvhvm("boot", hello, "-d", "x.img,vdev=hda"), "bad virtual device 'hda'")
    q = tmp_path / "q.img"
    q.write_bytes(b"QFI\xfb" + bytes(4096))
    one_line_error(run_pvhvm("boot", hello, "--disk", q), "only raw images")


def test_cli_boots_with_disks(guests, tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, 64)
    make_image(b, 64)
    p = run_pvhvm("boot", guests["hello"], "--memory", "32", "--net", "none", "--disk", a, "-d", f"{b},ro")
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------- Linux

MIB = 1 << 20
XFER_MIB = 64
RO_CONTENT = b"pvhvm read-only disk\n" + bytes(range(256)) * 16


@pytest.fixture(scope="module")
def blk_guest():
    from pvhvm.images import prepare_default_guest

    return prepare_default_guest(modules=["xen-blkfront"])


def boot_linux(blk_guest, disks, vcpus=1):
    dom = pvhvm.Domain(blk_guest.vmlinux, initrd=blk_guest.initrd, cmdline="console=hvc0 quiet pvhvm.shell",
                       memory_mib=384, vcpus=vcpus, disks=disks)
    dom.expect("PVHVM-INIT-OK", 180)
    sh = GuestShell(dom)
    sh.ok("dmesg -n 1")
    sh.ok("modprobe xen-blkfront && i=0; while [ ! -b /dev/xvda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done;"
          " [ -b /dev/xvda ]", 60)
    return dom, sh


@pytest.fixture(scope="module")
def linux_disks(blk_guest, tmp_path_factory):
    d = tmp_path_factory.mktemp("disks")
    rw, ro = d / "rw.img", d / "ro.img"
    with open(rw, "wb") as f:
        f.truncate(64 * MIB)  # sparse
    ro.write_bytes(RO_CONTENT.ljust(64 * 1024, b"\0"))
    dom, sh = boot_linux(blk_guest, [str(rw), f"{ro},ro"])
    sh.ok("i=0; while [ ! -b /dev/xvdb ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; [ -b /dev/xvdb ]")
    yield {"dom": dom, "sh": sh, "rw": rw, "ro": ro}
    dom.close()


@pytest.mark.slow
def test_linux_sees_both_disks(linux_disks):
    sh, dom = linux_disks["sh"], linux_disks["dom"]
    assert sh.ok("cat /sys/block/xvda/size").strip() == str(64 * MIB // SECTOR)
    assert sh.ok("cat /sys/block/xvdb/size").strip() == str(64 * 1024 // SECTOR)
    assert sh.ok("cat /sys/block/xvda/ro /sys/block/xvdb/ro").split() == ["0", "1"]
    assert all(v.connected and v.failure is None for v in dom.disks)
    assert [v.persistent for v in dom.disks] == [True, True]  # blkfront takes feature-persistent


@pytest.mark.slow
def test_linux_reads_the_ro_disk_and_cannot_write_it(linux_disks):
    sh, ro = linux_disks["sh"], linux_disks["ro"]
    n = len(RO_CONTENT)
    out = sh.ok(f"dd if=/dev/xvdb bs={n} count=1 2>/dev/null | md5sum")
    assert out.split()[0] == hashlib.md5(RO_CONTENT).hexdigest(), out
    before = ro.read_bytes()
    out = sh.run("dd if=/dev/zero of=/dev/xvdb bs=4096 count=1 oflag=direct")
    assert sh.status != 0, out
    assert ro.read_bytes() == before
    assert linux_disks["dom"].disks[1].connected  # refused, not disconnected


@pytest.mark.slow
def test_linux_writes_64mib_and_reads_it_back(linux_disks):
    sh, rw, dom = linux_disks["sh"], linux_disks["rw"], linux_disks["dom"]
    t0 = time.monotonic()
    sh.ok(f"dd if=/dev/urandom of=/tmp/r bs=1M count={XFER_MIB} 2>/dev/null", 300)
    t1 = time.monotonic()
    out = sh.ok("dd if=/tmp/r of=/dev/xvda bs=1M oflag=direct 2>&1", 300)
    t2 = time.monotonic()
    guest_md5 = sh.ok("md5sum /tmp/r", 300).split()[0]
    with open(rw, "rb") as f:
        host_md5 = hashlib.md5(f.read(XFER_MIB * MIB)).hexdigest()
    assert guest_md5 == host_md5, out
    # Read back through blkfront (no page cache: direct reads).
    t3 = time.monotonic()
    back = sh.ok(f"dd if=/dev/xvda bs=1M count={XFER_MIB} iflag=direct 2>/dev/null | md5sum", 300).split()[0]
    t4 = time.monotonic()
    assert back == host_md5
    sh.ok("rm /tmp/r")
    stats = dom.disks[0].stats
    assert stats["sectors_written"] >= XFER_MIB * MIB // SECTOR and stats["errors"] == 0
    print(f"\nurandom {t1 - t0:.1f} s; write {XFER_MIB} MiB {t2 - t1:.1f} s ({XFER_MIB / (t2 - t1):.1f} MiB/s); "
          f"read+md5 {t4 - t3:.1f} s; {stats}")


@pytest.mark.slow
def test_linux_blkdiscard(linux_disks):
    sh, rw = linux_disks["sh"], linux_disks["rw"]
    assert int(sh.ok("cat /sys/block/xvda/queue/discard_max_bytes")) > 0
    assert sh.ok("cat /sys/block/xvda/queue/discard_granularity").strip() == "4096"
    sh.ok("dd if=/dev/urandom of=/dev/xvda bs=1M count=2 seek=8 oflag=direct 2>/dev/null; sync")
    with open(rw, "rb") as f:
        f.seek(8 * MIB)
        assert f.read(2 * MIB) != bytes(2 * MIB)
    out = sh.run(f"blkdiscard -o {8 * MIB} -l {2 * MIB} /dev/xvda")
    if sh.status == 127 or "not found" in out:
        pytest.skip("the guest's busybox has no blkdiscard")
    assert sh.status == 0, out
    with open(rw, "rb") as f:
        assert os.lseek(f.fileno(), 8 * MIB, os.SEEK_HOLE) == 8 * MIB
        f.seek(8 * MIB)
        assert f.read(2 * MIB) == bytes(2 * MIB)
    out = sh.ok("dd if=/dev/xvda bs=1M count=2 skip=8 iflag=direct 2>/dev/null | md5sum")
    assert out.split()[0] == hashlib.md5(bytes(2 * MIB)).hexdigest()
    assert linux_disks["dom"].disks[0].stats["discards"] >= 1


@pytest.mark.slow
def test_linux_unload_and_hotplug(linux_disks):
    """blkfront unloaded: both vbds close cleanly (rings and persistent
    grants let go, no failure). blkfront does not start over by itself on a
    device it closed (neither under Xen), so the disks are unplugged and
    plugged again, as xl block-detach/block-attach do, and served afresh.
    Runs last of the tests on this domain."""
    from pvhvm.devices.blkback import attach_disk

    sh, dom = linux_disks["sh"], linux_disks["dom"]
    old = list(dom.disks)
    # xenbus holds a module reference while devices are bound: unbind first.
    sh.ok("for d in vbd-51712 vbd-51728; do echo $d > /sys/bus/xen/drivers/vbd/unbind; done; rmmod xen-blkfront")
    for vbd in old:
        assert not vbd.connected and vbd.state == XenbusState.CLOSED and vbd.queues == []
        assert vbd.failure is None and worker_threads(vbd) == []
    for vbd in old:
        dom.devices.detach(vbd)
        assert vbd.disk.fd == -1  # closed and unlocked
    assert sh.ok("ls /sys/bus/xen/devices/").split() == []  # the guest saw them go
    new = [attach_disk(dom, DiskSpec(linux_disks["rw"], False, "xvda")),
           attach_disk(dom, DiskSpec(linux_disks["ro"], True, "xvdb"))]
    sh.ok("modprobe xen-blkfront; i=0; while [ ! -b /dev/xvdb ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done;"
          " [ -b /dev/xvda ] && [ -b /dev/xvdb ]")
    assert all(v.connected and v.connections == 1 for v in new)
    n = len(RO_CONTENT)
    out = sh.ok(f"dd if=/dev/xvdb bs={n} count=1 iflag=direct 2>/dev/null | md5sum")
    assert out.split()[0] == hashlib.md5(RO_CONTENT).hexdigest(), out
    assert sh.ok("cat /sys/block/xvdb/ro").strip() == "1"


@pytest.mark.slow
def test_linux_two_queues(blk_guest, tmp_path):
    img = tmp_path / "mq.img"
    with open(img, "wb") as f:
        f.truncate(32 * MIB)
    dom, sh = boot_linux(blk_guest, [str(img)], vcpus=2)
    try:
        (vbd,) = dom.disks
        assert dom.store.read(0, f"{vbd.backend_path}/multi-queue-max-queues") == b"2"
        assert sh.ok("ls /sys/block/xvda/mq").split() == ["0", "1"]
        assert len(vbd.queues) == 2
        # I/O from each CPU: each goes through its own queue.
        sh.ok("dd if=/dev/urandom of=/tmp/r bs=1M count=8 2>/dev/null")
        sh.ok("taskset 1 dd if=/tmp/r of=/dev/xvda bs=1M oflag=direct 2>/dev/null; "
              "taskset 2 dd if=/tmp/r of=/dev/xvda bs=1M seek=8 oflag=direct 2>/dev/null", 120)
        md5 = sh.ok("md5sum /tmp/r").split()[0]
        data = img.read_bytes()
        assert hashlib.md5(data[: 8 * MIB]).hexdigest() == md5
        assert hashlib.md5(data[8 * MIB : 16 * MIB]).hexdigest() == md5
        back = sh.ok("taskset 2 dd if=/dev/xvda bs=1M count=16 iflag=direct 2>/dev/null | md5sum").split()[0]
        assert back == hashlib.md5(data[: 16 * MIB]).hexdigest()
        assert all(q.stats["requests"] > 0 for q in vbd.queues), [q.stats for q in vbd.queues]
        assert vbd.failure is None

        # Queue 1's producer index poked from outside to run away: the
        # worker's report fails the vbd on the run loop while the guest
        # runs; Linux closes its side and the domain goes on.
        ring = vbd.queues[1].ring
        struct.pack_into("<I", ring.pages[0], 0, (ring.req_cons + 1000) & 0xFFFFFFFF)
        vbd.queues[1].kick()
        assert "alive" in sh.ok("echo alive")
        dom.run_until(lambda: vbd.state == XenbusState.CLOSED, 20)
        assert "runs 1000 requests ahead" in vbd.failure
        assert dom.store.read(0, vbd.error_path).decode() == vbd.failure
        assert vbd.frontend_state == XenbusState.CLOSED and vbd.state == XenbusState.CLOSED
        assert not vbd.connected and worker_threads(vbd) == []
        assert sh.ok("cat /sys/block/xvda/size").strip() == "0"  # blkfront marked the disk dead
        assert dom.outcome is None
    finally:
        dom.close()
