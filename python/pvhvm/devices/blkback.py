"""The vbd backend: what Xen's blkback is to a domU's blkfront.

The protocol of xen/include/public/io/blkif.h as Linux's xen-blkfront
speaks it:

* xenstore, before the frontend starts (InitWait): ``feature-persistent``,
  ``feature-max-indirect-segments`` (256), ``max-ring-page-order`` (4: up
  to 16 ring pages), ``multi-queue-max-queues``, ``feature-flush-cache``,
  ``feature-barrier``, ``feature-discard`` with ``discard-granularity``,
  ``discard-alignment`` and ``discard-secure`` (0); at connect
  ``sectors``, ``sector-size`` (512), ``physical-sector-size`` and
  ``info`` (VDISK_READONLY, VDISK_REMOVABLE, VDISK_CDROM), as Linux's
  blkback writes them. The frontend answers with ``ring-ref`` (or
  ``ring-page-order`` and ``ring-ref0``…), ``event-channel``, per queue
  under ``queue-N/`` when ``multi-queue-num-queues`` > 1, ``protocol``
  and ``feature-persistent``.
* the ``protocol`` node picks the ring's ABI per vbd at connect, as Xen's
  blkback does: ``x86_64-abi`` (also the default with no node: our native
  ABI) lays out 112-byte slots (blkif_request, 64-bit fields 8-aligned)
  and 16-byte responses; ``x86_32-abi`` (a 32-bit frontend: i386 Linux)
  packs the 64-bit fields at 4-byte alignment, so there is no padding after
  ``handle``, every later field sits 4 bytes earlier, a slot is 108 bytes
  and a response 12. Any other protocol fails the vbd.
* each queue is an io/ring.h ring of those slots, served by its own
  worker thread: the run loop only wakes the worker when the guest
  notifies the queue's port, so disk I/O never runs on the vCPUs' thread.
  Requests are taken in batches; sector data moves with preadv/pwritev
  straight between the image and the granted pages (mapped through the
  core, zero-copy), never byte by byte through Python.
* operations: read, write, write-barrier and flush-cache (answered only
  after fdatasync on the host; a barrier's own write is synced before and
  after), discard (a hole punched in the image, which stays sparse), and
  indirect requests (up to 256 segments listed in up to 8 granted pages).
  Persistent grants (the frontend reuses the same granted pages) are kept
  mapped per queue, up to 1056 of them as Linux's blkback does; other
  grants are mapped for one request only.

A frontend that breaks the protocol — a grant it did not give us, more
segments than allowed, a segment outside its page, sectors past the end of
the disk, indexes running ahead of the ring, an unsupported ABI — gets its
vbd disconnected: the reason goes to the backend's ``error`` node and the
log, the rings are unmapped and the backend goes to Closing (then Closed
when the frontend answers). The domain keeps running. A write to a
read-only vbd is answered with BLKIF_RSP_ERROR, as blkback does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import struct
import threading
import time
from typing import Optional

from .. import _core
from ..xenbus import BackendDevice, DeviceError
from .disk import SECTOR, DiskImage, DiskSpec, vdev_number
from .manager import DeviceManager
from .ring import PAGE_SIZE, BackRing, RingError

log = logging.getLogger(__name__)

# blkif.h operations
BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6
# response status
BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0
# vdisk info bits
VDISK_CDROM = 1
VDISK_REMOVABLE = 2
VDISK_READONLY = 4

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
SEGMENTS_PER_INDIRECT_PAGE = PAGE_SIZE // 8
MAX_INDIRECT_SEGMENTS = 256  # what we offer (Linux's blkback default)
MAX_RING_PAGE_ORDER = 4  # XENBUS_MAX_RING_GRANT_ORDER
MAX_PERSISTENT_GRANTS = 1056  # per queue, Linux's xen_blkif_max_pgrants
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR
BATCH = 64  # requests taken off the ring before answering

_SEG = struct.Struct("<IBBH")  # blkif_request_segment: gref, first_sect, last_sect, pad (same in both ABIs)

# xenstore's protocol names (io/protocols.h)
XEN_IO_PROTO_ABI_X86_32 = "x86_32-abi"
XEN_IO_PROTO_ABI_X86_64 = "x86_64-abi"


class BlkifAbi:
    """One ABI's layout of blkif_request and blkif_response (io/blkif.h).
    The request structs unpack to the same fields in both ABIs, pads
    skipped: rw (op, nr_segments, handle, id, sector_number), discard (op,
    flag, id, sector_number, nr_sectors), indirect (op, indirect_op,
    nr_segments, id, sector_number, handle, grefs[8])."""

    def __init__(self, protocol: str, rw: str, discard: str, indirect: str, id_offset: int, response: str) -> None:
        self.protocol = protocol
        self.rw = struct.Struct(rw)
        self.seg_offset = self.rw.size
        self.discard = struct.Struct(discard)
        self.indirect = struct.Struct(indirect)
        self.id_offset = id_offset  # of blkif_request_other's id: for operations we do not know
        self.response = struct.Struct(response)
        # A slot holds the largest request (rw with its 11 segments) or a response.
        self.slot = max(self.seg_offset + BLKIF_MAX_SEGMENTS_PER_REQUEST * _SEG.size, self.discard.size,
                        self.indirect.size, self.response.size)


# x86-64: ``_pad1`` (u32) after ``handle`` puts ``id`` at 8; the response
# is padded to 16 (its id is 8-aligned).
ABI_X86_64 = BlkifAbi(XEN_IO_PROTO_ABI_X86_64, rw="<BBH4xQQ", discard="<BB6xQQQ", indirect="<BBH4xQQH2x8I4x",
                      id_offset=8, response="<QBxh4x")
# x86-32: packed with 64-bit fields at 4-byte alignment: no pad after
# ``handle``, ``id`` at 4; the response is 12 bytes.
ABI_X86_32 = BlkifAbi(XEN_IO_PROTO_ABI_X86_32, rw="<BBHQQ", discard="<BB2xQQQ", indirect="<BBHQQH2x8I8x",
                      id_offset=4, response="<QBxh")
# What the protocol node may say; none at all means the backend's own ABI.
ABIS = {abi.protocol: abi for abi in (ABI_X86_64, ABI_X86_32)}
NATIVE_ABI = ABI_X86_64
SLOT = NATIVE_ABI.slot  # 112

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class ProtocolError(Exception):
    """The frontend broke the protocol: the vbd is disconnected."""


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range, keeping the size (reads give zeros)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class _Segment:
    __slots__ = ("gref", "first", "last")

    def __init__(self, gref: int, first: int, last: int) -> None:
        self.gref, self.first, self.last = gref, first, last


class Queue:
    """One ring of a vbd and the worker thread that serves it."""

    def __init__(self, vbd: "Blkback", index: int, ring: BackRing, port: int, maps: list,
                 abi: BlkifAbi = NATIVE_ABI) -> None:
        self.vbd = vbd
        self.index = index
        self.ring = ring
        self.abi = abi
        self.port = port
        self.maps = maps  # the ring pages' GrantMappings
        self.persistent: dict[int, _core.GrantMapping] = {}
        self.stats = {"requests": 0, "reads": 0, "writes": 0, "flushes": 0, "discards": 0, "indirect": 0,
                      "sectors_read": 0, "sectors_written": 0, "errors": 0, "batches": 0, "notifications": 0}
        self._wake = threading.Event()
        self._serving = False  # set before the wake-up is cleared: see can_wake
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"blkback-{vbd.vdev}-q{index}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def kick(self, port: int = 0) -> None:
        """The guest notified the queue's port (run loop thread)."""
        self._wake.set()

    def can_wake(self) -> bool:
        """Work in hand: kicked and not yet served, or being served. (The
        flag is set before the kick is cleared, so there is no moment when
        both read false while a request waits.)"""
        return self._wake.is_set() or self._serving

    def stop(self) -> None:
        """Stop the worker and wait for it (its requests in flight finish)."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    # -- the worker --------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                self._wake.wait()
                self._serving = True
                self._wake.clear()
                if self._stop:
                    break
                try:
                    self._serve()
                finally:
                    self._serving = False
        except (ProtocolError, RingError) as e:
            self.vbd.report_failure(str(e))
        except Exception as e:  # a bug of ours: the vbd goes, the domain stays
            log.exception("%s queue %d: worker failed", self.vbd.backend_path, self.index)
            self.vbd.report_failure(f"backend error: {e}")

    def _serve(self) -> None:
        ring = self.ring
        while not self._stop:
            n = ring.unconsumed()
            if n == 0:
                if ring.final_check_for_requests():
                    continue
                return
            batch = [ring.take_request() for _ in range(min(n, BATCH))]
            self.stats["batches"] += 1
            for raw in batch:
                ring.put_response(self._handle(raw))
            if ring.push_responses():
                self.vbd.ops.notify(self.port)
                self.stats["notifications"] += 1

    def _handle(self, raw: bytes) -> bytes:
        abi = self.abi
        rsp = abi.response
        op = raw[0]
        self.stats["requests"] += 1
        if op in (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE):
            _, nseg, _handle, rid, sector = abi.rw.unpack_from(raw)
            limit = BLKIF_MAX_SEGMENTS_PER_REQUEST
            if nseg > limit or (nseg == 0 and op in (BLKIF_OP_READ, BLKIF_OP_WRITE)):
                raise ProtocolError(f"request {rid:#x}: {nseg} segments (a direct request carries 1 to {limit})")
            segs = [_Segment(*_SEG.unpack_from(raw, abi.seg_offset + _SEG.size * i)[:3]) for i in range(nseg)]
            return rsp.pack(rid, op, self._rw(op, rid, sector, segs))
        if op == BLKIF_OP_INDIRECT:
            _, iop, nseg, rid, sector, _handle, *grefs = abi.indirect.unpack_from(raw)
            self.stats["indirect"] += 1
            if iop not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
                raise ProtocolError(f"request {rid:#x}: indirect operation {iop} (only read and write)")
            if not 0 < nseg <= MAX_INDIRECT_SEGMENTS:
                raise ProtocolError(f"request {rid:#x}: {nseg} indirect segments (at most "
                                    f"{MAX_INDIRECT_SEGMENTS} offered)")
            segs = self._indirect_segments(rid, grefs, nseg)
            # Answered as the operation it carries, as blkback does (blkfront
            # checks the response's operation against that).
            return rsp.pack(rid, iop, self._rw(iop, rid, sector, segs))
        if op == BLKIF_OP_DISCARD:
            _, flag, rid, sector, count = abi.discard.unpack_from(raw)
            return rsp.pack(rid, op, self._discard(rid, sector, count, flag))
        rid = struct.unpack_from("<Q", raw, abi.id_offset)[0]
        self.stats["errors"] += 1
        return rsp.pack(rid, op, BLKIF_RSP_EOPNOTSUPP)

    def _indirect_segments(self, rid: int, grefs: list[int], nseg: int) -> list[_Segment]:
        pages = -(-nseg // SEGMENTS_PER_INDIRECT_PAGE)
        segs: list[_Segment] = []
        for k in range(pages):
            count = min(SEGMENTS_PER_INDIRECT_PAGE, nseg - len(segs))
            try:
                table = self.vbd.ops.grant_read(grefs[k], 0, 8 * count)
            except _core.GrantError as e:
                raise ProtocolError(f"request {rid:#x}: bad indirect grant reference {grefs[k]}: "
                                    f"{e.args[0]}") from None
            segs += [_Segment(*_SEG.unpack_from(table, 8 * i)[:3]) for i in range(count)]
        return segs

    def _check_range(self, rid: int, sector: int, count: int) -> None:
        disk = self.vbd.disk
        if sector + count > disk.sectors:
            raise ProtocolError(f"request {rid:#x}: sectors {sector}..{sector + count - 1} past the end of "
                                f"the disk ({disk.sectors} sectors)")

    def _rw(self, op: int, rid: int, sector: int, segs: list[_Segment]) -> int:
        disk = self.vbd.disk
        write = op != BLKIF_OP_READ
        count = 0
        for s in segs:
            if s.first > s.last or s.last >= SECTORS_PER_PAGE:
                raise ProtocolError(f"request {rid:#x}: segment sectors {s.first}..{s.last} outside their page")
            count += s.last - s.first + 1
        if segs:  # a flush without data carries no meaningful sector (blkfront sends -1)
            self._check_range(rid, sector, count)
        if write and disk.readonly:
            self.stats["errors"] += 1
            return BLKIF_RSP_ERROR
        try:
            if op == BLKIF_OP_WRITE_BARRIER:
                os.fdatasync(disk.fd)  # what came before is on disk first
            if segs:
                self._transfer(rid, write, sector, segs)
            if op in (BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE):
                os.fdatasync(disk.fd)
                self.stats["flushes"] += 1
        except OSError as e:
            log.error("%s: %s of sector %d failed: %s", self.vbd.backend_path, "write" if write else "read",
                      sector, e)
            self.stats["errors"] += 1
            return BLKIF_RSP_ERROR
        if segs:
            self.stats["writes" if write else "reads"] += 1
            self.stats["sectors_written" if write else "sectors_read"] += count
        return BLKIF_RSP_OKAY

    def _mapping(self, rid: int, gref: int, write_guest: bool) -> tuple[_core.GrantMapping, bool]:
        """The mapping of `gref` and whether it is kept (persistent)."""
        m = self.persistent.get(gref)
        if m is not None:
            return m, True
        keep = self.vbd.persistent and len(self.persistent) < MAX_PERSISTENT_GRANTS
        try:
            # Persistent grants are granted read-write by the frontend and
            # serve reads and writes alike.
            m = self.vbd.ops.grant_map(gref, writable=keep or write_guest)
        except _core.GrantError as e:
            raise ProtocolError(f"request {rid:#x}: bad grant reference {gref}: {e.args[0]}") from None
        if keep:
            self.persistent[gref] = m
        return m, keep

    def _transfer(self, rid: int, write: bool, sector: int, segs: list[_Segment]) -> None:
        """Move the segments' sectors between the image and the granted
        pages with one preadv/pwritev (the segments are consecutive on disk)."""
        maps: list[tuple[_core.GrantMapping, bool]] = []
        views: list[memoryview] = []
        try:
            for s in segs:
                m, kept = self._mapping(rid, s.gref, write_guest=not write)
                maps.append((m, kept))
                views.append(memoryview(m)[s.first * SECTOR : (s.last + 1) * SECTOR])
            fd, offset = self.vbd.disk.fd, sector * SECTOR
            want = sum(len(v) for v in views)
            done = os.pwritev(fd, views, offset) if write else os.preadv(fd, views, offset)
            if done != want:
                raise OSError(f"short {'write' if write else 'read'}: {done} of {want} bytes")
        finally:
            for v in views:
                v.release()
            for m, kept in maps:
                if not kept:
                    self.vbd.ops.grant_unmap(m)

    def _discard(self, rid: int, sector: int, count: int, flag: int) -> int:
        disk = self.vbd.disk
        self._check_range(rid, sector, count)
        self.stats["discards"] += 1
        if disk.readonly or flag:  # no secure erase offered
            self.stats["errors"] += 1
            return BLKIF_RSP_ERROR if disk.readonly else BLKIF_RSP_EOPNOTSUPP
        if count == 0:
            return BLKIF_RSP_OKAY
        try:
            punch_hole(disk.fd, sector * SECTOR, count * SECTOR)
        except OSError as e:
            log.warning("%s: discard of %d sectors at %d: %s", self.vbd.backend_path, count, sector, e)
            self.stats["errors"] += 1
            return BLKIF_RSP_EOPNOTSUPP
        return BLKIF_RSP_OKAY

    def release(self) -> None:
        """Unmap everything the queue holds (worker stopped)."""
        for m in self.persistent.values():
            try:
                self.vbd.ops.grant_unmap(m)
            except _core.GrantError:
                pass
        self.persistent.clear()
        self.ring.release()
        for m in self.maps:
            try:
                self.vbd.ops.grant_unmap(m)
            except _core.GrantError:
                pass
        self.maps.clear()


class Blkback(BackendDevice):
    """A vbd of the domain ``devices`` serves, backed by a raw image."""

    devtype = "vbd"

    def __init__(self, devices: DeviceManager, spec: DiskSpec, *, max_queues: int = 1) -> None:
        if spec.vdev is None:
            raise ValueError("the disk spec needs a vdev (assign_vdevs)")
        super().__init__(devices, vdev_number(spec.vdev))
        self.spec = spec
        self.vdev = spec.vdev
        self.disk = DiskImage(spec)
        self.max_queues = max(1, max_queues)
        self.queues: list[Queue] = []
        self.persistent = False
        self.abi = NATIVE_ABI  # the frontend's, from its protocol node at connect
        self.closed = False
        self._past_stats: dict[str, int] = {}  # of queues since disconnected

    # -- xenstore ------------------------------------------------------------

    def frontend_entries(self):
        return {"virtual-device": str(self.devid), "device-type": "cdrom" if self.spec.cdrom else "disk"}

    def backend_entries(self):
        return {
            "params": str(self.disk.path),
            "type": "phy" if not self.disk.regular else "file",
            "mode": "r" if self.disk.readonly else "w",
            "dev": self.vdev,
            "device-type": "cdrom" if self.spec.cdrom else "disk",
            "removable": "0",
            "bootable": "1",
            "feature-persistent": "1",
            "feature-max-indirect-segments": str(MAX_INDIRECT_SEGMENTS),
            "max-ring-page-order": str(MAX_RING_PAGE_ORDER),
            "multi-queue-max-queues": str(self.max_queues),
            "feature-flush-cache": "1",
            "feature-barrier": "1",
            "feature-discard": "0" if self.disk.readonly or not self.disk.regular else "1",
            "discard-granularity": str(PAGE_SIZE),
            "discard-alignment": "0",
            "discard-secure": "0",
        }

    @property
    def info(self) -> int:
        return ((VDISK_READONLY if self.disk.readonly else 0) | (VDISK_CDROM if self.spec.cdrom else 0))

    # -- the handshake ---------------------------------------------------------

    def connect(self) -> None:
        protocol = self.read_frontend("protocol")
        abi = NATIVE_ABI if not protocol else ABIS.get(protocol)
        if abi is None:
            raise DeviceError(f"frontend protocol {protocol!r} is not served ({' or '.join(ABIS)})")
        self.abi = abi
        nqueues = self.read_frontend_int("multi-queue-num-queues", 1)
        if not 1 <= nqueues <= self.max_queues:
            raise DeviceError(f"frontend asks for {nqueues} queues; at most {self.max_queues} offered")
        order = self.read_frontend_int("ring-page-order", 0)
        if order > MAX_RING_PAGE_ORDER:
            raise DeviceError(f"ring-page-order {order} is over the {MAX_RING_PAGE_ORDER} offered")
        self.persistent = bool(self.read_frontend_int("feature-persistent", 0))
        queues: list[Queue] = []
        try:
            for q in range(nqueues):
                queues.append(self._connect_queue(q, nqueues, order))
        except DeviceError:
            for queue in queues:
                self._drop_queue(queue)
            raise
        self.queues = queues
        self.write_backend("sectors", str(self.disk.sectors))
        self.write_backend("sector-size", str(SECTOR))
        self.write_backend("physical-sector-size", str(SECTOR))
        self.write_backend("info", str(self.info))
        for queue in queues:
            queue.start()
        log.info("%s: %s connected, %s, %d queue(s) of %d slots, persistent grants %s", self.backend_path,
                 self.vdev, self.abi.protocol, nqueues, queues[0].ring.size, "on" if self.persistent else "off")

    def _connect_queue(self, q: int, nqueues: int, order: int) -> Queue:
        prefix = f"queue-{q}/" if nqueues > 1 else ""
        if order == 0:
            refs = [self.read_frontend_int(f"{prefix}ring-ref")]
        else:
            refs = [self.read_frontend_int(f"{prefix}ring-ref{i}") for i in range(1 << order)]
        port = self.read_frontend_int(f"{prefix}event-channel")
        if any(r is None for r in refs) or port is None:
            raise DeviceError(f"frontend wrote no {prefix}ring-ref or {prefix}event-channel")
        maps = []
        try:
            for ref in refs:
                maps.append(self.ops.grant_map(ref, writable=True))
        except _core.GrantError as e:
            for m in maps:
                self.ops.grant_unmap(m)
            raise DeviceError(f"cannot map {prefix}ring-ref {refs}: {e.args[0]}") from None
        try:
            self.ops.bind_guest_port(port)
        except _core.CoreError as e:
            for m in maps:
                self.ops.grant_unmap(m)
            raise DeviceError(f"cannot bind {prefix}event-channel: {e}") from None
        queue = Queue(self, q, BackRing(maps, self.abi.slot, f"{self.vdev} queue {q}"), port, maps, self.abi)
        self.devices.own_port(port, queue.kick)
        return queue

    def _drop_queue(self, queue: Queue) -> None:
        queue.stop()
        for k, v in queue.stats.items():
            self._past_stats[k] = self._past_stats.get(k, 0) + v
        self.devices.disown_port(queue.port)
        self.ops.unbind_port(queue.port)
        queue.release()

    def disconnect(self) -> None:
        for queue in self.queues:
            self._drop_queue(queue)
        self.queues = []

    def can_wake(self) -> bool:
        return any(q.can_wake() for q in self.queues)

    def host_ports(self) -> list[int]:
        return [q.port for q in self.queues]

    def quiesce(self, timeout: float = 30.0) -> None:
        """Wait for the workers to answer what they took (a save keeps no
        request in flight: the restored rings start from their responses)."""
        deadline = time.monotonic() + timeout
        while self.can_wake():
            if time.monotonic() > deadline:
                raise DeviceError(f"{self.vdev}: requests still in flight after {timeout} s")
            time.sleep(0.001)

    def save_config(self) -> dict:
        spec = self.spec
        return {"path": str(spec.path), "readonly": spec.readonly, "vdev": spec.vdev, "cdrom": spec.cdrom}

    def report_failure(self, reason: str) -> None:
        """From a worker: the frontend broke the protocol."""
        def fail() -> None:
            if self.connected:
                self.fail(reason)

        self.devices.loop.call_soon_threadsafe(fail)

    def close(self) -> None:
        super().close()
        if not self.closed:
            self.closed = True
            self.disk.close()

    @property
    def stats(self) -> dict[str, int]:
        """Requests served, by kind, over every connection so far."""
        total = dict(self._past_stats)
        for q in self.queues:
            for k, v in q.stats.items():
                total[k] = total.get(k, 0) + v
        return total

    def __repr__(self) -> str:
        return (f"<Blkback {self.vdev} {self.disk.path} {self.state.name}"
                f"{' failed: ' + self.failure if self.failure else ''}>")


def attach_disk(dom, spec: DiskSpec, *, max_queues: Optional[int] = None) -> Blkback:
    """Give `dom` (a pvhvm.Domain) a vbd on the image `spec` names."""
    vbd = Blkback(dom.devices, spec, max_queues=max_queues if max_queues is not None else dom.vcpus)
    dom.devices.attach(vbd)
    return vbd


__all__ = ["Blkback", "Queue", "attach_disk", "BLKIF_OP_READ", "BLKIF_OP_WRITE", "BLKIF_OP_WRITE_BARRIER",
           "BLKIF_OP_FLUSH_DISKCACHE", "BLKIF_OP_DISCARD", "BLKIF_OP_INDIRECT", "BLKIF_RSP_OKAY",
           "BLKIF_RSP_ERROR", "BLKIF_RSP_EOPNOTSUPP", "VDISK_READONLY", "SLOT", "BlkifAbi", "ABI_X86_32",
           "ABI_X86_64", "ABIS", "XEN_IO_PROTO_ABI_X86_32", "XEN_IO_PROTO_ABI_X86_64"]
