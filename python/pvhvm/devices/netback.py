"""The vif backend: what Xen's netback is to a domU's netfront.

Behaves toward Linux's xen-netfront as Linux's xen-netback does, with the
interface of xen/include/public/io/netif.h and io/ring.h:

* xenstore: the backend offers ``feature-rx-copy`` (the only receive mode
  netfront still speaks), ``feature-sg`` (packets over several slots, which
  lets the guest use a 64 KiB MTU), ``feature-split-event-channels``; no
  GSO, no multi-queue, no multicast control, no XDP headroom. The frontend
  writes ``tx-ring-ref``, ``rx-ring-ref``, ``event-channel`` (or
  ``event-channel-tx``/``-rx``), ``request-rx-copy`` = 1 and
  ``feature-rx-notify`` = 1 (both required), ``feature-sg`` …
* the two shared rings are mapped through the grant table (writable) and
  the frontend's unbound ports bound as their host ends.
* TX (guest -> host): each packet is a first request carrying the whole
  packet's size, optional extra-info slots (NETTXF_extra_info), then more
  requests while NETTXF_more_data is set; the data is copied out of the
  granted pages, checksums the guest left blank (NETTXF_csum_blank, IPv4
  and IPv6 TCP/UDP) are filled in, and the Ethernet frame goes to the host
  end. Every request slot gets a response (extra-info slots
  XEN_NETIF_RSP_NULL).
* RX (host -> guest): a frame takes one rx request per 4 KiB (data at
  offset 0 of each granted page); every response carries its slot's length,
  NETRXF_more_data on all but the last, NETRXF_data_validated on the first
  (frames from passt or a TAP are complete and checksummed).
* Notifications follow the ring protocol: RING_PUSH_RESPONSES_AND_CHECK_NOTIFY
  against the frontend's rsp_event, RING_FINAL_CHECK_FOR_REQUESTS (req_event)
  before going idle, and an rx req_event asking for the slots a waiting
  frame needs.

A frontend that breaks the protocol — a grant it does not give us, ring
indexes running ahead of the ring, a zero-length or oversized packet, a
packet over more than XEN_NETBK_LEGACY_SLOTS_MAX (18) slots or whose slots
add up wrong, a slot crossing its page, a chain of slots without
feature-sg, an extra-info slot of an unknown type or for GSO we did not
offer — gets its vif disconnected: the reason is logged, kept in
``failure``, the rings are unmapped and the backend goes to Closing. The
domain runs on; a frontend that initialises again gets a fresh connection.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import deque
from typing import Callable, Optional

from .. import _core
from ..xenbus import BackendDevice, DeviceError
from ..xenstore.store import PRIV_DOMID
from .manager import DeviceManager
from .net_host import NetHost
from .ring import BackRing, RingError, ring_slots

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
RING_HEADER = 64  # req_prod, req_event, rsp_prod, rsp_event, pvt, pad
RING_SIZE = 256  # __CONST_RING_SIZE(netif_tx/rx, 4096): 4032/12 and 4032/8, rounded down to a power of 2
TX_SLOT = 12  # union {netif_tx_request (12), netif_tx_response (4), netif_extra_info (8)}
RX_SLOT = 8  # union {netif_rx_request (8), netif_rx_response (8)}
MASK32 = 0xFFFFFFFF

# netif_tx_request.flags
NETTXF_csum_blank = 1 << 0
NETTXF_data_validated = 1 << 1
NETTXF_more_data = 1 << 2
NETTXF_extra_info = 1 << 3
# netif_rx_response.flags
NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3
# netif_extra_info
XEN_NETIF_EXTRA_TYPE_NONE = 0
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_TYPE_XDP = 5
XEN_NETIF_EXTRA_TYPE_MAX = 6
XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0
# response status
XEN_NETIF_RSP_DROPPED = -2
XEN_NETIF_RSP_ERROR = -1
XEN_NETIF_RSP_OKAY = 0
XEN_NETIF_RSP_NULL = 1

XEN_NETIF_MAX_TX_SIZE = 0xFFFF
XEN_NETBK_LEGACY_SLOTS_MAX = 18  # XEN_NETIF_NR_SLOTS_MIN
ETH_HLEN = 14
MAX_FRAME_NO_SG = 1514 + 4  # ETH_FRAME_LEN and a VLAN tag
RX_QUEUE_MAX = 1024  # frames from the host waiting for rx requests before we stop reading …
RX_QUEUE_BYTES = 16 << 20  # … or this many bytes of them

_U32 = struct.Struct("<I")
_TX_REQ = struct.Struct("<IHHHH")  # gref, offset, flags, id, size
_TX_RSP = struct.Struct("<Hh")  # id, status
_EXTRA = struct.Struct("<BBHBBH")  # type, flags, gso.size, gso.type, gso.pad, gso.features
_RX_REQ = struct.Struct("<HHI")  # id, pad, gref
_RX_RSP = struct.Struct("<HHHh")  # id, offset, flags, status


class Netback(BackendDevice):
    """A vif of the domain ``devices`` serves, from the host.

    ``host`` is the host end (net_host.PasstHost, TapHost, or None: frames
    from the guest are dropped); it is read from the run loop. The rings are
    served when the guest notifies the vif's ports and when the host end
    has frames. ``bind_port`` binds the host end of a frontend port
    (default ``ops.bind_guest_port``; a test seam).

    `attach_vif` sets one up on a Domain."""

    devtype = "vif"

    def __init__(
        self,
        devices: DeviceManager,
        host: Optional[NetHost] = None,
        *,
        devid: int = 0,
        mac: Optional[str] = None,
        bind_port: Optional[Callable[[int], None]] = None,
        split_event_channels: bool = True,
        backend_domid: int = PRIV_DOMID,
    ) -> None:
        super().__init__(devices, devid, backend_domid=backend_domid)
        self.host = host
        self.mac = normalise_mac(mac) if mac else random_mac()
        if bind_port is None:
            self._bind_port, self._unbind_port = self.ops.bind_guest_port, self.ops.unbind_port
        else:
            self._bind_port, self._unbind_port = bind_port, (lambda port: None)
        self.split_event_channels = split_event_channels
        self._reading = False
        self._paused = False
        self.tx_ring: Optional[BackRing] = None
        self.rx_ring: Optional[BackRing] = None
        self._maps: list = []
        self.tx_port = self.rx_port = 0
        self.tx_ring_ref = self.rx_ring_ref = None
        self.frontend_sg = False
        self._rxq: deque[bytes] = deque()
        self._rxq_bytes = 0
        self.host_lost: Optional[str] = None  # why the host end died under us, once it has
        self.stats = {
            "tx_packets": 0, "tx_bytes": 0, "tx_errors": 0, "tx_csum_filled": 0,
            "rx_packets": 0, "rx_bytes": 0, "rx_dropped": 0, "notifications": 0, "fatal_errors": 0,
        }

    # ----------------------------------------------------------------- xenstore

    def frontend_entries(self):
        return {"mac": self.mac}

    def backend_entries(self):
        entries = {
            "mac": self.mac,
            "type": "vif",
            "hotplug-status": "connected",
            "feature-sg": "1",
            "feature-rx-copy": "1",
            "feature-rx-flip": "0",
        }
        if self.split_event_channels:
            entries["feature-split-event-channels"] = "1"
        return entries

    # ----------------------------------------------------------------- set-up

    def create(self) -> None:
        super().create()
        self._start_reading()

    def resume(self, saved: dict) -> None:
        super().resume(saved)
        self._start_reading()

    def host_ports(self) -> list[int]:
        return sorted({self.tx_port, self.rx_port} - {0})

    def save_config(self) -> dict:
        # Frames queued for a full rx ring are not kept: a save drops them
        # as a switch would.
        from .net_host import PasstHost, TapHost

        host = self.host
        kind = "passt" if isinstance(host, PasstHost) else f"tap:{host.name}" if isinstance(host, TapHost) else None
        return {"mac": self.mac, "split_event_channels": self.split_event_channels, "host": kind}

    def close(self) -> None:
        """Stop serving: disconnect, stop reading and close the host end."""
        self._stop_reading()
        self._do_disconnect()
        if self.host is not None:
            self.host.close()

    def _start_reading(self) -> None:
        if self.host is not None and not self._reading and self.host.fileno() >= 0:
            self.devices.loop.add_reader(self.host, self.poll_host)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self.devices.loop.remove_reader(self.host)
        self._reading = False

    def connect(self) -> None:
        if self.host_lost is not None:
            raise DeviceError(f"{self.host_lost}; the vif has no link")
        if self.read_frontend_int("request-rx-copy", 0) != 1:
            raise DeviceError("frontend does not request-rx-copy (the only receive mode offered)")
        if self.read_frontend_int("feature-rx-notify", 0) != 1:
            raise DeviceError("frontend lacks feature-rx-notify (required)")
        queues = self.read_frontend_int("multi-queue-num-queues", 1)
        if queues != 1:
            raise DeviceError(f"frontend asks for {queues} queues; one is offered")
        self.frontend_sg = bool(self.read_frontend_int("feature-sg", 0))
        tx_ref = self.read_frontend_int("tx-ring-ref")
        rx_ref = self.read_frontend_int("rx-ring-ref")
        if tx_ref is None or rx_ref is None:
            raise DeviceError("frontend wrote no tx-ring-ref/rx-ring-ref")
        tx_port = self.read_frontend_int("event-channel-tx")
        rx_port = self.read_frontend_int("event-channel-rx")
        if tx_port is None or rx_port is None or not self.split_event_channels:
            tx_port = rx_port = self.read_frontend_int("event-channel")
            if tx_port is None:
                raise DeviceError("frontend wrote no event-channel")
        try:
            tx_map = self.ops.grant_map(tx_ref, writable=True)
            self._maps.append(tx_map)
            rx_map = self.ops.grant_map(rx_ref, writable=True)
            self._maps.append(rx_map)
        except _core.GrantError as e:
            self._unmap_all()
            raise DeviceError(f"cannot map the rings (tx-ring-ref {tx_ref}, rx-ring-ref {rx_ref}): "
                              f"{_grant_status(e)}") from None
        try:
            for port in {tx_port, rx_port}:
                self._bind_port(port)
        except _core.CoreError as e:
            self._unmap_all()
            raise DeviceError(f"cannot bind event channel: {e}") from None
        self.tx_ring = BackRing([tx_map], TX_SLOT, "TX")
        self.rx_ring = BackRing([rx_map], RX_SLOT, "RX")
        self.tx_port, self.rx_port = tx_port, rx_port
        for port in {tx_port, rx_port}:
            self.devices.own_port(port, self._on_port)
        self.tx_ring_ref, self.rx_ring_ref = tx_ref, rx_ref
        self._rxq.clear()
        self._rxq_bytes = 0
        log.info("vif%d.%d: tx-ring-ref %d rx-ring-ref %d ports %d/%d sg=%d", self.domid, self.devid, tx_ref,
                 rx_ref, tx_port, rx_port, self.frontend_sg)

    def disconnect(self) -> None:
        self._rxq.clear()
        self._rxq_bytes = 0
        self._unmap_all()
        for port in {self.tx_port, self.rx_port} - {0}:
            self.devices.disown_port(port)
            self._unbind_port(port)
        self.tx_port = self.rx_port = 0

    def _unmap_all(self) -> None:
        for ring in (self.tx_ring, self.rx_ring):
            if ring is not None:
                ring.release()
        self.tx_ring = self.rx_ring = None
        for m in self._maps:
            try:
                self.ops.grant_unmap(m)
            except _core.GrantError:
                pass
        self._maps.clear()

    # ----------------------------------------------------------------- serving

    def _on_port(self, port: int) -> None:
        """The guest notified a vif port: move packets both ways."""
        if self.connected:
            self.serve_rings()
        if self._paused and len(self._rxq) < RX_QUEUE_MAX // 2 and self._rxq_bytes < RX_QUEUE_BYTES // 2:
            self._paused = False
            self._start_reading()
            self._pull_host()

    def poll_host(self) -> None:
        """The host end is readable: take its frames (run-loop callback)."""
        self._pull_host()

    def _pull_host(self) -> bool:
        host = self.host
        if host is None:
            return False
        got = False
        while not self._rx_full():
            frame = host.recv()
            if frame is None:
                break
            got = True
            if self.connected and frame:
                self._rxq.append(frame)
                self._rxq_bytes += len(frame)
            else:
                self.stats["rx_dropped"] += 1  # no link yet: dropped as on a wire
        if getattr(host, "closed", False):
            self._stop_reading()  # the host end is gone: nothing more will come
            self._host_lost()
        elif self._rx_full():
            self._paused = True
            self._stop_reading()  # resumed by _on_port() once the guest catches up
        if got and self.connected:
            self.serve_rings()
        return got

    def _host_lost(self) -> None:
        """The host end died under a live vif (passt killed or crashed):
        the link is down for good, so the vif says so as a backend that
        lost its device does (error node, Closing; the guest's netfront
        closes and drops carrier). The domain runs on; another card can be
        attached (Domain.attach_nic)."""
        if self.host_lost is not None:
            return
        why = getattr(self.host, "why_gone", None)
        self.host_lost = why() if why is not None else "the host end of the network went away"
        self.fail(f"{self.host_lost}; the vif has no link")

    def _rx_full(self) -> bool:
        return len(self._rxq) >= RX_QUEUE_MAX or self._rxq_bytes >= RX_QUEUE_BYTES

    def serve_rings(self) -> bool:
        """Move packets both ways; True if any moved."""
        notify_tx = notify_rx = False
        try:
            did_tx, notify_tx = self._do_tx()
            did_rx, notify_rx = self._do_rx()
        except RingError as e:
            self.stats["fatal_errors"] += 1
            self.fail(str(e))
            return True
        ports = set()
        if notify_tx:
            ports.add(self.tx_port)
        if notify_rx:
            ports.add(self.rx_port)
        for port in ports:
            self.ops.notify(port)
            self.stats["notifications"] += 1
        return did_tx or did_rx

    # ---------------------------------------------------------------- TX

    def _do_tx(self) -> tuple[bool, bool]:
        ring = self.tx_ring
        assert ring is not None
        did = False
        while True:
            n = ring.unconsumed()
            if n == 0:
                if ring.final_check_for_requests():
                    continue
                break
            self._tx_packet(ring, n)
            did = True
        return did, ring.push_responses() if did else False

    def _tx_packet(self, ring: BackRing, avail: int) -> None:
        start = ring.req_cons
        # Copy each request out of the shared page once: the guest may
        # change it under us.
        first = _TX_REQ.unpack(ring.read_slot(start))
        used = 1
        extras: list[tuple[int, int, int, int]] = []
        if first[2] & NETTXF_extra_info:
            more = True
            while more:
                if used >= avail:
                    raise RingError(f"TX ring: packet at {start} announces extra info that is not on the ring")
                etype, eflags, gso_size, gso_type, _, _ = _EXTRA.unpack(ring.read_slot(start + used, _EXTRA.size))
                used += 1
                if etype == XEN_NETIF_EXTRA_TYPE_NONE or etype >= XEN_NETIF_EXTRA_TYPE_MAX:
                    raise RingError(f"TX ring: extra info of invalid type {etype}")
                if etype == XEN_NETIF_EXTRA_TYPE_GSO:
                    raise RingError(f"TX ring: GSO extra info (type {gso_type}, size {gso_size}) but "
                                    "feature-gso-tcpv4/v6 is not offered")
                extras.append((etype, eflags, gso_size, gso_type))
                if len(extras) >= XEN_NETIF_EXTRA_TYPE_MAX:
                    raise RingError("TX ring: too many extra info slots")
                more = bool(eflags & XEN_NETIF_EXTRA_FLAG_MORE)
        slots = [first]
        flags = first[2]
        while flags & NETTXF_more_data:
            if not self.frontend_sg:
                raise RingError("TX ring: a packet over several slots (NETTXF_more_data) without feature-sg")
            if len(slots) >= XEN_NETBK_LEGACY_SLOTS_MAX:
                raise RingError(f"TX ring: packet at {start} uses more than {XEN_NETBK_LEGACY_SLOTS_MAX} slots")
            if used >= avail:
                raise RingError(f"TX ring: packet at {start} continues past req_prod ({len(slots)} slots posted)")
            req = _TX_REQ.unpack(ring.read_slot(start + used))
            used += 1
            slots.append(req)
            flags = req[2]

        total = first[4]
        if total == 0:
            raise RingError(f"TX ring: zero-length packet (request id {first[3]})")
        if not self.frontend_sg and total > MAX_FRAME_NO_SG:
            raise RingError(f"TX ring: {total}-byte packet without feature-sg (at most {MAX_FRAME_NO_SG})")
        rest = 0
        for req in slots[1:]:
            if req[4] == 0:
                raise RingError(f"TX ring: zero-length slot (request id {req[3]}) in the packet at {start}")
            rest += req[4]
        if rest > total:
            raise RingError(f"TX ring: slots hold {rest} bytes past the first but the packet is {total} bytes")
        lengths = [total - rest] + [req[4] for req in slots[1:]]
        for req, length in zip(slots, lengths):
            if req[1] + length > PAGE_SIZE:
                raise RingError(f"TX ring: slot (gref {req[0]}, offset {req[1]}, {length} bytes) crosses its page")

        parts = []
        for req, length in zip(slots, lengths):
            if not length:
                continue
            try:
                parts.append(self.ops.grant_read(req[0], req[1], length))
            except _core.GrantError as e:
                raise RingError(f"TX ring: bad grant reference {req[0]} (request id {req[3]}): "
                                f"{_grant_status(e)}") from None

        status = XEN_NETIF_RSP_OKAY
        if total < ETH_HLEN:
            status = XEN_NETIF_RSP_ERROR  # a runt: dropped, as netback does
            self.stats["tx_errors"] += 1
        else:
            frame = b"".join(parts)
            if first[2] & NETTXF_csum_blank:
                frame = fill_checksum(frame, self.stats)
            self.stats["tx_packets"] += 1
            self.stats["tx_bytes"] += len(frame)
            if self.host is not None and frame is not None:
                self.host.send(frame)

        # One response per slot, in ring order: the first request, its extra
        # info slots (NULL), then the rest of the packet.
        ring.put_response(_TX_RSP.pack(first[3], status))
        for _ in extras:
            ring.put_response(_TX_RSP.pack(0, XEN_NETIF_RSP_NULL))
        for req in slots[1:]:
            ring.put_response(_TX_RSP.pack(req[3], status))
        ring.req_cons = (start + used) & MASK32

    # ---------------------------------------------------------------- RX

    def _do_rx(self) -> tuple[bool, bool]:
        ring = self.rx_ring
        assert ring is not None
        q = self._rxq
        did = False
        while q:
            frame = q[0]
            need = max(1, -(-len(frame) // PAGE_SIZE))
            if need > XEN_NETBK_LEGACY_SLOTS_MAX:
                q.popleft()
                self._rxq_bytes -= len(frame)
                self.stats["rx_dropped"] += 1
                continue
            if ring.unconsumed() < need:
                # Ask to be notified when enough requests are there, then
                # look once more.
                ring.req_event = ring.req_cons + need
                if ring.unconsumed() < need:
                    break
            q.popleft()
            self._rxq_bytes -= len(frame)
            for k in range(need):
                rid, _, gref = _RX_REQ.unpack(ring.take_request())
                chunk = frame[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
                try:
                    self.ops.grant_write(gref, 0, chunk)
                except _core.GrantError as e:
                    raise RingError(f"RX ring: bad grant reference {gref} (request id {rid}): "
                                    f"{_grant_status(e)}") from None
                flags = (NETRXF_more_data if k < need - 1 else 0) | (NETRXF_data_validated if k == 0 else 0)
                ring.put_response(_RX_RSP.pack(rid, 0, flags, len(chunk)))
            self.stats["rx_packets"] += 1
            self.stats["rx_bytes"] += len(frame)
            did = True
        return did, ring.push_responses() if did else False

    def __repr__(self) -> str:
        return (f"<Netback vif{self.domid}.{self.devid} {self.mac} {self.state.name}"
                f"{' failed: ' + self.failure if self.failure else ''}>")


# ------------------------------------------------------------------ helpers


def _grant_status(e: Exception) -> str:
    return str(e.args[0]) if e.args else str(e)


def random_mac() -> str:
    """A MAC in Xen's OUI 00:16:3e, as xl makes one up."""
    b = os.urandom(3)
    return f"00:16:3e:{b[0] & 0x7F:02x}:{b[1]:02x}:{b[2]:02x}"


def normalise_mac(mac: str) -> str:
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) in (1, 2) for p in parts):
        raise ValueError(f"bad MAC address {mac!r}")
    try:
        octets = [int(p, 16) for p in parts]
    except ValueError:
        raise ValueError(f"bad MAC address {mac!r}") from None
    if octets[0] & 1:
        raise ValueError(f"{mac} is a multicast address")
    return ":".join(f"{o:02x}" for o in octets)


def ones_complement_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`, as stored in a header."""
    if len(data) & 1:
        data += b"\0"
    # Big-endian 16-bit words summed in ones' complement = the number mod
    # 0xFFFF (2**16 = 1 mod 0xFFFF); 0 there means a sum of 0xFFFF.
    s = int.from_bytes(data, "big") % 0xFFFF
    return 0xFFFF - (s or 0xFFFF)


def fill_checksum(frame: bytes, stats: Optional[dict] = None) -> bytes:
    """Fill in the TCP or UDP checksum of an IPv4 or IPv6 packet whose
    checksum the guest left to us (NETTXF_csum_blank). Other packets pass
    unchanged."""
    off = ETH_HLEN
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == 0x8100 and len(frame) >= 18:
        ethertype = int.from_bytes(frame[16:18], "big")
        off = 18
    if ethertype == 0x0800:
        if len(frame) < off + 20:
            return frame
        ihl = (frame[off] & 0x0F) * 4
        total = int.from_bytes(frame[off + 2 : off + 4], "big")
        frag = int.from_bytes(frame[off + 6 : off + 8], "big")
        proto = frame[off + 9]
        if ihl < 20 or frag & 0x3FFF or total < ihl:
            return frame  # fragments carry no whole L4 header to fill
        l4 = off + ihl
        end = min(off + total, len(frame))
        pseudo = frame[off + 12 : off + 20] + bytes((0, proto)) + (end - l4).to_bytes(2, "big")
    elif ethertype == 0x86DD:
        if len(frame) < off + 40:
            return frame
        proto = frame[off + 6]
        l4 = off + 40
        end = min(l4 + int.from_bytes(frame[off + 4 : off + 6], "big"), len(frame))
        pseudo = frame[off + 8 : off + 40] + (end - l4).to_bytes(4, "big") + bytes((0, 0, 0, proto))
    else:
        return frame
    if proto == 6:
        field = l4 + 16
    elif proto == 17:
        field = l4 + 6
    else:
        return frame
    if field + 2 > end:
        return frame
    buf = bytearray(frame)
    buf[field : field + 2] = b"\0\0"
    csum = ones_complement_checksum(pseudo + bytes(buf[l4:end]))
    if proto == 17 and csum == 0:
        csum = 0xFFFF
    buf[field : field + 2] = csum.to_bytes(2, "big")
    if stats is not None:
        stats["tx_csum_filled"] = stats.get("tx_csum_filled", 0) + 1
    return bytes(buf)


def attach_vif(dom, host: Optional[NetHost], *, devid: int = 0, mac: Optional[str] = None,
               split_event_channels: bool = True) -> Netback:
    """Give `dom` (a pvhvm.Domain, before or while it runs) a vif served by
    a Netback on `host`: the xenstore nodes, the handshake, the host end in
    the run loop."""
    nb = Netback(dom.devices, host, devid=devid, mac=mac, split_event_channels=split_event_channels)
    dom.devices.attach(nb)
    return nb


__all__ = ["Netback", "BackRing", "RingError", "attach_vif", "fill_checksum", "ones_complement_checksum",
           "random_mac", "normalise_mac"]
