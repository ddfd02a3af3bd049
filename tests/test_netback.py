"""The vif backend (pvhvm.devices.netback) and its host ends (net_host).

Two halves:

* ring-level tests: a netfront written here in Python drives the netback
  through the real grant table of a tiny guest of ours (tests/guests/grants.c,
  which places a v1 grant table and then spins): the test writes grant
  entries into that table, lays the shared rings and packet buffers in free
  guest RAM, and plays the frontend's xenstore part as the guest's domid.
  Hostile frontends (bad grants, runaway indexes, zero-length, oversized and
  too-many-slot packets …) must get the vif disconnected with a reason while
  the domain runs on.
* Linux: Debian's kernel with xen-netfront, a netback on passt: eth0, DHCP,
  ping to the router, 64 MiB over TCP each way with matching checksums,
  module reload, a ring poked from outside.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

import pvhvm
from pvhvm.shell import GuestShell
from pvhvm.devices import net_host
from pvhvm.devices.net_host import PasstHost, parse_forward, ping_sockets_allowed
from pvhvm.devices.netback import (
    NETRXF_data_validated,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_extra_info,
    NETTXF_more_data,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_RSP_ERROR,
    XEN_NETIF_RSP_NULL,
    XEN_NETIF_RSP_OKAY,
    Netback,
    attach_vif,
    fill_checksum,
    normalise_mac,
)
from pvhvm.xenbus import XenbusState
from pvhvm.xenstore import XenstoreError

PAGE = 4096
GTF_permit_access = 1
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4
TX_REQ = struct.Struct("<IHHHH")
TX_RSP = struct.Struct("<Hh")
RX_REQ = struct.Struct("<HHI")
RX_RSP = struct.Struct("<HHHh")
EXTRA = struct.Struct("<BBHBBH")

# --------------------------------------------------------------------------- fake frontend


class FakeHost:
    """A host end that keeps what it is sent and hands out what it is given."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.incoming: list[bytes] = []
        self.closed = False

    def fileno(self) -> int:  # never registered with a run loop here
        return -1

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def recv(self):
        return self.incoming.pop(0) if self.incoming else None

    def close(self) -> None:
        self.closed = True


class Frontend:
    """netfront's side, played by the test in the grants guest's memory.

    Pages come from guest RAM at 8 MiB and up (the guest lives at 1 MiB);
    grants are v1 entries written straight into the table the guest placed
    (refs from 32 up; the guest uses 8-11)."""

    BASE = 8 << 20

    def __init__(self, dom: pvhvm.Domain, table_gpa: int) -> None:
        self.dom = dom
        self.ops = dom.backend_ops
        self.mem = dom.memory
        self.table = table_gpa
        self._next_page = self.BASE
        self._next_ref = 32
        self.tx_prod = self.rx_prod = 0  # our req_prod_pvt
        self.tx_rsp_cons = self.rx_rsp_cons = 0
        self.tx_ref = self.rx_ref = 0
        self.tx_page = self.rx_page = 0

    # grants and pages
    def page(self) -> int:
        gpa = self._next_page
        self._next_page += PAGE
        self.mem[gpa : gpa + PAGE] = bytes(PAGE)
        return gpa

    def grant(self, gpa: int, readonly: bool = False, domid: int = 0) -> int:
        ref = self._next_ref
        self._next_ref += 1
        entry = self.table + 8 * ref
        struct.pack_into("<HHI", self.mem, entry, 0, domid, gpa // PAGE)
        flags = GTF_permit_access | (GTF_readonly if readonly else 0)
        struct.pack_into("<H", self.mem, entry, flags)
        return ref

    def grant_flags(self, ref: int) -> int:
        return struct.unpack_from("<H", self.mem, self.table + 8 * ref)[0]

    def buffer(self, data: bytes = b"", offset: int = 0, readonly: bool = True) -> int:
        gpa = self.page()
        self.mem[gpa + offset : gpa + offset + len(data)] = data
        return self.grant(gpa, readonly)

    # rings
    def setup_rings(self) -> None:
        self.tx_page, self.rx_page = self.page(), self.page()
        for gpa in (self.tx_page, self.rx_page):  # SHARED_RING_INIT
            struct.pack_into("<IIII", self.mem, gpa, 0, 1, 0, 1)
        self.tx_ref, self.rx_ref = self.grant(self.tx_page), self.grant(self.rx_page)

    def _u32(self, gpa: int, off: int) -> int:
        return struct.unpack_from("<I", self.mem, gpa + off)[0]

    def _set_u32(self, gpa: int, off: int, v: int) -> None:
        struct.pack_into("<I", self.mem, gpa + off, v & 0xFFFFFFFF)

    def tx_slot(self, idx: int) -> int:
        return self.tx_page + 64 + (idx % 256) * 12

    def rx_slot(self, idx: int) -> int:
        return self.rx_page + 64 + (idx % 256) * 8

    def post_tx(self, gref: int, offset: int, flags: int, rid: int, size: int) -> None:
        TX_REQ.pack_into(self.mem, self.tx_slot(self.tx_prod), gref, offset, flags, rid, size)
        self.tx_prod += 1

    def post_extra(self, etype: int, eflags: int = 0, gso_size: int = 0, gso_type: int = 0) -> None:
        slot = self.tx_slot(self.tx_prod)
        self.mem[slot : slot + 12] = bytes(12)
        EXTRA.pack_into(self.mem, slot, etype, eflags, gso_size, gso_type, 0, 0)
        self.tx_prod += 1

    def push_tx(self) -> None:
        self._set_u32(self.tx_page, 0, self.tx_prod)

    def post_rx(self, n: int) -> list[int]:
        refs = []
        for _ in range(n):
            ref = self.buffer(readonly=False)
            RX_REQ.pack_into(self.mem, self.rx_slot(self.rx_prod), self.rx_prod % 256, 0, ref)
            refs.append(ref)
            self.rx_prod += 1
        self._set_u32(self.rx_page, 0, self.rx_prod)
        return refs

    @property
    def tx_rsp_prod(self) -> int:
        return self._u32(self.tx_page, 8)

    @property
    def rx_rsp_prod(self) -> int:
        return self._u32(self.rx_page, 8)

    def tx_responses(self) -> list[tuple[int, int]]:
        out = []
        while self.tx_rsp_cons != self.tx_rsp_prod:
            out.append(TX_RSP.unpack_from(self.mem, self.tx_slot(self.tx_rsp_cons)))
            self.tx_rsp_cons += 1
        return out

    def rx_responses(self) -> list[tuple[int, int, int, int]]:
        out = []
        while self.rx_rsp_cons != self.rx_rsp_prod:
            out.append(RX_RSP.unpack_from(self.mem, self.rx_slot(self.rx_rsp_cons)))
            self.rx_rsp_cons += 1
        return out


@pytest.fixture
def fe_env(guests):
    """The grants guest at PHASE1 (table placed, spinning), a netback on a
    FakeHost, and the test's frontend with rings ready (not yet connected)."""
    dom = pvhvm.Domain(guests["grants"], memory_mib=32)
    m = dom.expect(rb"PHASE1 a=0x[0-9a-f]+ b=0x[0-9a-f]+ table=0x([0-9a-f]+)", 30)
    fe = Frontend(dom, int(m.group(1), 16) << 12)
    host = FakeHost()
    port = dom.backend_ops.bind_host_port()  # the guest allocates nothing: a host-bound port stands in
    nb = Netback(dom.devices, host, mac="00:16:3e:01:02:03", bind_port=lambda p: None)
    dom.devices.attach(nb)  # the watch fires once when set: frontend Initialising, backend stays in InitWait
    fe.setup_rings()
    fe.port = port
    return dom, nb, fe, host


def fe_write(dom, nb, key, value):
    dom.store.write(dom.domid, f"{nb.frontend_path}/{key}", str(value))


def connect(dom, nb, fe, *, sg=True, split=False, extra=None):
    keys = {"tx-ring-ref": fe.tx_ref, "rx-ring-ref": fe.rx_ref, "request-rx-copy": 1, "feature-rx-notify": 1,
            "feature-sg": int(sg)}
    if split:
        keys.update({"event-channel-tx": fe.port, "event-channel-rx": fe.port})
    else:
        keys["event-channel"] = fe.port
    keys.update(extra or {})
    for k, v in keys.items():
        if v is not None:
            fe_write(dom, nb, k, v)
    fe_write(dom, nb, "state", int(XenbusState.CONNECTED))
    nb.service()


def kick(dom, fe) -> None:
    """What the guest's EVTCHNOP_send on the vif's port makes the run loop do."""
    dom.devices.dispatch([fe.port])


def backend_state(dom, nb) -> int:
    return int(dom.store.read(0, f"{nb.backend_path}/state"))


def domain_keeps_running(dom) -> None:
    """The guest still runs: a short run ends by its timeout, not an outcome."""
    assert dom.run_until(lambda: False, 0.3) is False
    assert dom.outcome is None


def eth_frame(payload: bytes = b"", ethertype: int = 0x88B5, size: int = 0) -> bytes:
    """An Ethernet frame (local experimental ethertype), padded to `size`."""
    f = bytes.fromhex("02fc00000001") + bytes.fromhex("00163e010203") + ethertype.to_bytes(2, "big") + payload
    return f + bytes(max(0, size - len(f)))


# --------------------------------------------------------------------------- xenbus


def test_device_nodes_and_permissions(fe_env):
    dom, nb, fe, _ = fe_env
    st, d = dom.store, dom.domid
    front, back = f"/local/domain/{d}/device/vif/0", f"/local/domain/0/backend/vif/{d}/0"
    assert (nb.frontend_path, nb.backend_path) == (front, back)
    assert st.read(d, f"{front}/backend") == back.encode()
    assert st.read(d, f"{front}/backend-id") == b"0"
    assert st.read(d, f"{front}/state") == b"1"
    assert st.read(d, f"{front}/mac") == b"00:16:3e:01:02:03"
    assert st.get_perms(0, front) == [("n", d), ("r", 0)]
    assert st.get_perms(0, back) == [("n", 0), ("r", d)]
    for key, value in (("frontend", front), ("frontend-id", str(d)), ("online", "1"), ("state", "2"),
                       ("feature-rx-copy", "1"), ("feature-sg", "1"), ("mac", "00:16:3e:01:02:03"),
                       ("feature-split-event-channels", "1")):
        assert st.read(d, f"{back}/{key}") == value.encode(), key
    assert not st.exists(f"{back}/feature-gso-tcpv4")  # only what is implemented is offered
    # The guest writes its side, and may not touch the backend's.
    st.write(d, f"{front}/tx-ring-ref", "5")
    with pytest.raises(XenstoreError):
        st.write(d, f"{back}/state", "4")
    assert st.read(0, f"/libxl/{d}/device/vif/0/backend") == back.encode()
    assert nb.state is XenbusState.INIT_WAIT


def test_connect_close_and_reconnect(fe_env):
    dom, nb, fe, _ = fe_env
    connect(dom, nb, fe)
    assert nb.connected and backend_state(dom, nb) == XenbusState.CONNECTED
    assert nb.tx_ring_ref == fe.tx_ref and nb.tx_port == nb.rx_port == fe.port
    # Mapped writable: the guest's entries show the rings in use.
    assert fe.grant_flags(fe.tx_ref) & (GTF_reading | GTF_writing) == GTF_reading | GTF_writing

    fe_write(dom, nb, "state", int(XenbusState.CLOSING))
    nb.service()
    assert backend_state(dom, nb) == XenbusState.CLOSING and not nb.connected
    assert fe.grant_flags(fe.tx_ref) & (GTF_reading | GTF_writing) == 0  # unmapped
    fe_write(dom, nb, "state", int(XenbusState.CLOSED))
    nb.service()
    assert backend_state(dom, nb) == XenbusState.CLOSED

    # The module comes back: Initialising -> InitWait -> Connected again.
    fe.setup_rings()
    fe_write(dom, nb, "state", int(XenbusState.INITIALISING))
    nb.service()
    assert backend_state(dom, nb) == XenbusState.INIT_WAIT
    connect(dom, nb, fe, split=True)
    assert nb.connected and nb.connections == 2 and nb.failure is None
    assert [b for _, b in nb.history] == [XenbusState.INIT_WAIT, XenbusState.CONNECTED, XenbusState.CLOSING,
                                          XenbusState.CLOSED, XenbusState.INIT_WAIT, XenbusState.CONNECTED]


@pytest.mark.parametrize("missing, words", [
    ({"request-rx-copy": None}, "request-rx-copy"),
    ({"feature-rx-notify": 0}, "feature-rx-notify"),
    ({"tx-ring-ref": 999}, "cannot map the rings"),  # a ref the guest never granted
    ({"multi-queue-num-queues": 4}, "queues"),
    ({"event-channel": "seven"}, "not a number"),
])
def test_connect_refused(fe_env, missing, words):
    dom, nb, fe, _ = fe_env
    connect(dom, nb, fe, extra=missing)
    assert not nb.connected
    assert words in nb.failure
    assert backend_state(dom, nb) == XenbusState.CLOSING
    assert dom.store.read(0, nb.error_path).decode() == nb.failure
    domain_keeps_running(dom)


# --------------------------------------------------------------------------- TX


def test_tx_single_and_chained_packets(fe_env):
    dom, nb, fe, host = fe_env
    connect(dom, nb, fe)
    n0 = nb.stats["notifications"]
    small = eth_frame(b"hello", size=60)
    fe.post_tx(fe.buffer(small, offset=100), 100, 0, 7, len(small))
    # 9000 bytes over three slots, with a multicast extra-info slot after the first.
    big = eth_frame(os.urandom(9000 - 14))
    parts = [big[:1000], big[1000:5096], big[5096:]]
    refs = [fe.buffer(p, offset=o) for p, o in zip(parts, (3000, 0, 10))]
    fe.post_tx(refs[0], 3000, NETTXF_more_data | NETTXF_extra_info, 11, len(big))
    fe.post_extra(XEN_NETIF_EXTRA_TYPE_MCAST_ADD)
    fe.post_tx(refs[1], 0, NETTXF_more_data, 12, len(parts[1]))
    fe.post_tx(refs[2], 10, 0, 13, len(parts[2]))
    # A runt: answered with an error, not passed on.
    fe.post_tx(fe.buffer(b"tiny"), 0, 0, 20, 4)
    fe.push_tx()
    kick(dom, fe)
    assert host.sent == [small, big]
    assert fe.tx_responses() == [(7, XEN_NETIF_RSP_OKAY), (11, XEN_NETIF_RSP_OKAY), (0, XEN_NETIF_RSP_NULL),
                                 (12, XEN_NETIF_RSP_OKAY), (13, XEN_NETIF_RSP_OKAY), (20, XEN_NETIF_RSP_ERROR)]
    # rsp_event was 1: the frontend asked to hear of the first response.
    assert nb.stats["notifications"] == n0 + 1
    # Idle again, the backend asks to be told of the next request.
    assert fe._u32(fe.tx_page, 4) == fe.tx_prod + 1

    # The frontend does not want a notification before response 100: none sent.
    fe._set_u32(fe.tx_page, 12, 100)
    fe.post_tx(fe.buffer(small), 0, 0, 30, len(small))
    fe.push_tx()
    kick(dom, fe)
    assert fe.tx_responses() == [(30, XEN_NETIF_RSP_OKAY)]
    assert nb.stats["notifications"] == n0 + 1
    # Nothing new: service() is idle and says so.
    assert not nb.serve_rings()
    assert nb.stats["tx_packets"] == 3 and nb.stats["tx_errors"] == 1


def _checksum(data: bytes) -> int:
    """RFC 1071, the obvious way (to check the fast one)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ipv4(proto: int, l4: bytes) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                     bytes([192, 0, 2, 2]), bytes([192, 0, 2, 1]))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return eth_frame(ip + l4, ethertype=0x0800)


@pytest.mark.parametrize("proto", [6, 17])
def test_tx_blank_checksums_are_filled(fe_env, proto):
    dom, nb, fe, host = fe_env
    connect(dom, nb, fe)
    payload = os.urandom(3001)
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, 5 << 4, 0x18, 65535, 0xABCD, 0) + payload
    else:
        l4 = struct.pack("!HHHH", 40000, 5001, 8 + len(payload), 0xABCD) + payload
    frame = _ipv4(proto, l4)
    fe.post_tx(fe.buffer(frame), 0, NETTXF_csum_blank, 1, len(frame))
    fe.push_tx()
    kick(dom, fe)
    (out,) = host.sent
    seg = out[34:]
    pseudo = out[26:34] + bytes((0, proto)) + len(seg).to_bytes(2, "big")
    assert _checksum(pseudo + seg) == 0  # a filled checksum verifies
    assert out[:34] == frame[:34] and seg[20 if proto == 6 else 8:] == payload
    assert nb.stats["tx_csum_filled"] == 1

    # Frames that are not TCP/UDP over IP pass unchanged.
    arp = eth_frame(bytes(28), ethertype=0x0806, size=60)
    assert fill_checksum(arp) == arp


@pytest.mark.parametrize("data", [b"", b"\0\0", b"\xff\xff", b"\x00\x01\xff", b"\xff\xfe\x00\x01",
                                  bytes(range(256)) * 300 + b"\x07"])
def test_fast_checksum_matches_rfc1071(data):
    from pvhvm.devices.netback import ones_complement_checksum

    fast, slow = ones_complement_checksum(data), _checksum(data)
    # 0x0000 and 0xFFFF are the same number (zero) in ones' complement.
    assert fast == slow or {fast, slow} == {0, 0xFFFF}


# --------------------------------------------------------------------------- RX


def test_rx_frames_fill_granted_pages(fe_env):
    dom, nb, fe, host = fe_env
    connect(dom, nb, fe)
    refs = fe.post_rx(3)
    frames = [eth_frame(b"a" * 50, size=64), eth_frame(os.urandom(9000))]  # 1 slot, then 3
    host.incoming += frames
    n0 = nb.stats["notifications"]
    nb.poll_host()
    # The first fits; the second needs 3 slots and only 2 are left: it waits,
    # and the backend asks to be told when the 3rd is posted.
    assert fe.rx_responses() == [(0, 0, NETRXF_data_validated, 64)]
    assert fe.ops.grant_read(refs[0], 0, 64, 0) == frames[0]
    assert fe._u32(fe.rx_page, 4) == 1 + 3
    assert nb.stats["notifications"] == n0 + 1
    refs += fe.post_rx(2)
    kick(dom, fe)
    rsps = fe.rx_responses()
    assert [r[2] for r in rsps] == [NETRXF_data_validated | NETRXF_more_data, NETRXF_more_data, 0]
    assert [r[3] for r in rsps] == [4096, 4096, len(frames[1]) - 8192]
    assert [r[0] for r in rsps] == [1, 2, 3]  # ids come back with their slots
    got = b"".join(fe.ops.grant_read(ref, 0, r[3], 0) for ref, r in zip(refs[1:4], rsps))
    assert got == frames[1]
    assert nb.stats["rx_packets"] == 2 and nb.stats["rx_bytes"] == 64 + len(frames[1])


def test_rx_frames_before_connect_are_dropped(fe_env):
    dom, nb, fe, host = fe_env
    host.incoming.append(eth_frame(size=60))
    nb.poll_host()
    assert nb.stats["rx_dropped"] == 1
    connect(dom, nb, fe)
    fe.post_rx(1)
    kick(dom, fe)
    assert fe.rx_responses() == []


# --------------------------------------------------------------------------- hostile frontends


def _bad_gref(fe):
    fe.post_tx(4000, 0, 0, 1, 60)  # never granted


def _foreign_gref(fe):
    gpa = fe.page()
    fe.post_tx(fe.grant(gpa, domid=5), 0, 0, 1, 60)  # granted to someone else


def _runaway_tx(fe):
    fe.tx_prod += 300


def _zero_length(fe):
    fe.post_tx(fe.buffer(b"x" * 60), 0, 0, 1, 0)


def _zero_length_slot(fe):
    ref = fe.buffer(b"x" * 100)
    fe.post_tx(ref, 0, NETTXF_more_data, 1, 100)
    fe.post_tx(ref, 0, 0, 2, 0)


def _too_many_slots(fe):
    ref = fe.buffer(b"x" * PAGE)
    for i in range(19):
        fe.post_tx(ref, 0, NETTXF_more_data if i < 18 else 0, i, 19 * 100 if i == 0 else 100)


def _chain_past_prod(fe):
    fe.post_tx(fe.buffer(b"x" * 100), 0, NETTXF_more_data, 1, 200)


def _slots_exceed_size(fe):
    ref = fe.buffer(b"x" * 1000)
    fe.post_tx(ref, 0, NETTXF_more_data, 1, 100)
    fe.post_tx(ref, 0, 0, 2, 500)


def _crosses_page(fe):
    fe.post_tx(fe.buffer(b"x" * 100), 4000, 0, 1, 200)


def _gso_extra(fe):
    fe.post_tx(fe.buffer(b"x" * 100), 0, NETTXF_extra_info, 1, 100)
    fe.post_extra(XEN_NETIF_EXTRA_TYPE_GSO, 0, 1448, 1)


def _bad_extra(fe):
    fe.post_tx(fe.buffer(b"x" * 100), 0, NETTXF_extra_info, 1, 100)
    fe.post_extra(9)


def _endless_extras(fe):
    fe.post_tx(fe.buffer(b"x" * 100), 0, NETTXF_extra_info, 1, 100)
    for _ in range(6):
        fe.post_extra(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_FLAG_MORE)


HOSTILE_TX = {
    "bad gref": (_bad_gref, "bad grant reference 4000"),
    "gref granted to another domain": (_foreign_gref, "GNTST_permission_denied"),
    "runaway req_prod": (_runaway_tx, "runs 300 requests ahead"),
    "zero-length packet": (_zero_length, "zero-length packet"),
    "zero-length slot": (_zero_length_slot, "zero-length slot"),
    "too many slots": (_too_many_slots, "more than 18 slots"),
    "chain past req_prod": (_chain_past_prod, "continues past req_prod"),
    "slots exceed packet size": (_slots_exceed_size, "slots hold 500 bytes"),
    "slot crosses its page": (_crosses_page, "crosses its page"),
    "GSO not offered": (_gso_extra, "GSO"),
    "invalid extra type": (_bad_extra, "invalid type 9"),
    "endless extras": (_endless_extras, "too many extra info"),
}


def _assert_disconnected(dom, nb, fe, words):
    assert nb.failure is not None and words in nb.failure, nb.failure
    assert not nb.connected and nb.tx_ring is None and nb.rx_ring is None
    assert backend_state(dom, nb) == XenbusState.CLOSING
    for ref in (fe.tx_ref, fe.rx_ref):  # rings unmapped
        assert fe.grant_flags(ref) & (GTF_reading | GTF_writing) == 0
    domain_keeps_running(dom)
    # netfront answers Closing with Closed; a new frontend gets a new start.
    fe_write(dom, nb, "state", int(XenbusState.CLOSED))
    nb.service()
    assert backend_state(dom, nb) == XenbusState.CLOSED
    fe_write(dom, nb, "state", int(XenbusState.INITIALISING))
    nb.service()
    assert backend_state(dom, nb) == XenbusState.INIT_WAIT


@pytest.mark.parametrize("case", list(HOSTILE_TX))
def test_hostile_tx_disconnects_the_vif(fe_env, case, caplog):
    dom, nb, fe, host = fe_env
    connect(dom, nb, fe)
    make, words = HOSTILE_TX[case]
    make(fe)
    fe.push_tx()
    with caplog.at_level("ERROR", logger="pvhvm.xenbus"):
        kick(dom, fe)
    assert any(words in r.getMessage() for r in caplog.records), caplog.text
    assert host.sent == []
    _assert_disconnected(dom, nb, fe, words)


def test_sg_chain_without_feature_sg(fe_env):
    dom, nb, fe, host = fe_env
    connect(dom, nb, fe, sg=False)
    ref = fe.buffer(b"x" * 200)
    fe.post_tx(ref, 0, NETTXF_more_data, 1, 200)
    fe.post_tx(ref, 0, 0, 2, 100)
    fe.push_tx()
    kick(dom, fe)
    _assert_disconnected(dom, nb, fe, "without feature-sg")


def test_oversized_packet_without_sg(fe_env):
    dom, nb, fe, host = fe_env
    connect(dom, nb, fe, sg=False)
    fe.post_tx(fe.buffer(b"x" * 3000), 0, 0, 1, 3000)
    fe.push_tx()
    kick(dom, fe)
    _assert_disconnected(dom, nb, fe, "3000-byte packet without feature-sg")


def test_hostile_rx_bad_gref(fe_env):
    dom, nb, fe, host = fe_env
    connect(dom, nb, fe)
    RX_REQ.pack_into(fe.mem, fe.rx_slot(0), 0, 0, 4000)
    fe._set_u32(fe.rx_page, 0, 1)
    host.incoming.append(eth_frame(size=60))
    nb.poll_host()
    _assert_disconnected(dom, nb, fe, "RX ring: bad grant reference 4000")


def test_hostile_rx_readonly_grant(fe_env):
    dom, nb, fe, host = fe_env
    connect(dom, nb, fe)
    ref = fe.buffer(readonly=True)
    RX_REQ.pack_into(fe.mem, fe.rx_slot(0), 0, 0, ref)
    fe._set_u32(fe.rx_page, 0, 1)
    host.incoming.append(eth_frame(size=60))
    nb.poll_host()
    _assert_disconnected(dom, nb, fe, "GNTST_permission_denied")


def test_hostile_rx_runaway(fe_env):
    dom, nb, fe, host = fe_env
    connect(dom, nb, fe)
    fe._set_u32(fe.rx_page, 0, 5000)
    host.incoming.append(eth_frame(size=60))
    nb.poll_host()
    _assert_disconnected(dom, nb, fe, "RX ring: req_prod 5000 runs 5000 requests ahead")


# --------------------------------------------------------------------------- helpers


def test_mac_and_forward_parsing():
    assert normalise_mac("00:16:3E:0:a:ff") == "00:16:3e:00:0a:ff"
    with pytest.raises(ValueError):
        normalise_mac("01:00:5e:00:00:01")  # multicast
    assert parse_forward(8080) == net_host.Forward(8080, 8080)
    assert parse_forward("8080:80") == net_host.Forward(8080, 80)
    assert parse_forward("udp:5353:53") == net_host.Forward(5353, 53, "udp")
    assert parse_forward((2222, 22)).spec() == "127.0.0.1/2222:22"
    for bad in ("x", "1:2:3", 0, "70000"):
        with pytest.raises(net_host.NetHostError):
            parse_forward(bad)
    with pytest.raises(net_host.NetHostError):
        net_host.open_host("slirp")


# --------------------------------------------------------------------------- passt

needs_passt = pytest.mark.skipif(net_host.find_passt() is None, reason="passt is not installed (apt-get install passt)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> list[str]:
    """Local addresses listening on TCP `port` (from /proc/net/tcp)."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:
            out.append(socket.inet_ntoa(struct.pack("<I", int(addr, 16))))
    return out


@needs_passt
def test_passt_forwards_on_loopback_and_stops():
    port = _free_port()
    host = PasstHost([(port, 5001)])
    assert host.running and "--fd" in host.args
    deadline = time.monotonic() + 5
    while not _listening(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _listening(port) == ["127.0.0.1"]
    assert host.recv() is None  # nothing yet, and no blocking
    pid = host.pid
    host.close()
    assert not host.running and _listening(port) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@needs_passt
def test_passt_exits_when_its_socket_closes():
    """No leftovers even if nobody calls close(): passt quits on EOF."""
    host = PasstHost()
    proc = host.proc
    host._sock.close()
    proc.wait(5)
    host.close()


def _can_tap() -> bool:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return os.geteuid() == 0


@pytest.mark.skipif(not _can_tap(), reason="TAP needs root (CAP_NET_ADMIN) and /dev/net/tun")
def test_tap_host_raw_frames():
    name = f"pvt{os.getpid() % 100000}"
    tap = net_host.TapHost(name)
    try:
        sysfs = Path("/sys/class/net") / tap.name
        assert tap.name == name and sysfs.exists()
        assert int((sysfs / "flags").read_text(), 16) & 1  # IFF_UP
        rx_before = int((sysfs / "statistics/rx_packets").read_text())
        mac = bytes.fromhex("00163e010203")
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, bytes([10, 9, 8, 7]), bytes(6),
                          bytes([10, 9, 8, 1]))
        tap.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)  # raw: no packet-info header in front
        assert int((sysfs / "statistics/rx_packets").read_text()) == rx_before + 1
        # What the kernel sends (IPv6 chatter on a fresh link) comes raw too;
        # recv() never blocks.
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            frame = tap.recv()
            if frame is None:
                time.sleep(0.05)
                continue
            assert int.from_bytes(frame[12:14], "big") in (0x86DD, 0x0800, 0x0806), frame[:16].hex()
    finally:
        tap.close()
    assert not (Path("/sys/class/net") / name).exists()  # not persistent: gone with the fd


# --------------------------------------------------------------------------- Linux

GUEST_INIT = """\
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
modprobe xen-netfront
echo PVHVM-NET-READY
setsid cttyhack sh
poweroff -f
"""

XFER_BYTES = 64 << 20
GUEST_PORT = 5001


@pytest.fixture(scope="module")
def net_guest():
    from pvhvm.images import prepare_default_guest

    return prepare_default_guest(GUEST_INIT, modules=["xen-netfront"],
                                 extra_files={net_host.UDHCPC_SCRIPT_PATH: net_host.UDHCPC_SCRIPT.encode()})


def boot_linux(net_guest, host):
    dom = pvhvm.Domain(net_guest.vmlinux, initrd=net_guest.initrd, cmdline="console=hvc0 quiet",
                       memory_mib=384)
    nb = attach_vif(dom, host)
    dom.expect("PVHVM-NET-READY", 120)
    return dom, nb


@pytest.fixture(scope="module")
def linux_net(net_guest):
    if net_host.find_passt() is None:
        pytest.skip("passt is not installed (apt-get install passt)")
    fport = _free_port()
    host = PasstHost([(fport, GUEST_PORT)])
    dom, nb = boot_linux(net_guest, host)
    env = {"dom": dom, "nb": nb, "host": host, "sh": GuestShell(dom), "fport": fport}
    yield env
    nb.close()
    assert not host.running  # passt goes with the domain


@pytest.fixture(scope="module")
def ping_allowed():
    """passt forwards pings through ICMP "ping" sockets, which need
    net.ipv4.ping_group_range to cover its group. Root may open the range
    for the test (and puts it back)."""
    path = Path("/proc/sys/net/ipv4/ping_group_range")
    if ping_sockets_allowed():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("net.ipv4.ping_group_range excludes passt's group: "
                    "sysctl -w net.ipv4.ping_group_range='0 2147483647'")
    old = path.read_text()
    try:
        path.write_text("0 2147483647\n")
    except OSError as e:
        pytest.skip(f"cannot open net.ipv4.ping_group_range for passt's pings: {e}")
    try:
        yield
    finally:
        path.write_text(old)


@pytest.mark.slow
def test_linux_eth0_appears(linux_net):
    nb, sh = linux_net["nb"], linux_net["sh"]
    out = sh.run("ip link show eth0")
    assert "eth0" in out and nb.mac in out, out
    assert nb.connected and nb.failure is None
    assert nb.frontend_sg and nb.tx_port != nb.rx_port  # netfront took the split channels


def _dhcp(sh) -> dict:
    out = sh.run("udhcpc -i eth0 -q -n -t 5 -T 2", 120)
    m = re.search(r"DHCP-BOUND ip=(\S+) mask=(\d+) router=(\S+) mtu=(\d*)", out)
    assert m and sh.status == 0, out
    return {"ip": m.group(1), "mask": m.group(2), "router": m.group(3), "mtu": m.group(4)}


@pytest.fixture(scope="module")
def lease(linux_net):
    """eth0 configured by busybox udhcpc from passt's DHCP."""
    return _dhcp(linux_net["sh"])


@pytest.mark.slow
def test_linux_dhcp(linux_net, lease):
    sh = linux_net["sh"]
    addr = sh.run("ip -4 addr show eth0; ip route")
    assert f"inet {lease['ip']}/{lease['mask']}" in addr and f"default via {lease['router']}" in addr, addr
    assert lease["mtu"] == "65520" and "mtu 65520" in sh.run("ip link show eth0")  # passt's MTU, via feature-sg


@pytest.mark.slow
def test_linux_pings_the_router(linux_net, lease, ping_allowed):
    sh, router = linux_net["sh"], lease["router"]
    out = sh.run(f"ping -c 20 -i 0.2 {router}", 120)
    assert "20 packets transmitted, 20 packets received, 0% packet loss" in out, out
    rtt = re.search(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    print(f"\nping {router}: rtt min/avg/max {rtt.group(1)}/{rtt.group(2)}/{rtt.group(3)} ms")


@pytest.mark.slow
def test_linux_tcp_64mib_both_ways(linux_net, lease):
    sh, nb, router = linux_net["sh"], linux_net["nb"], lease["router"]
    data = os.urandom(XFER_BYTES)
    md5 = hashlib.md5(data).hexdigest()

    # host -> guest: a host client on 127.0.0.1:fport, which passt forwards
    # to the guest's nc -l (listening before the host connects: passt
    # connects through to the guest straight away). nc's stdin is a FIFO no
    # one writes: on the console, a background job reading the tty is
    # stopped by SIGTTIN when the next command line arrives (and `wait`
    # returns); /dev/null would make nc half-close the connection at once.
    out = sh.run(f"mkfifo /tmp/nc-in; nc -l -p {GUEST_PORT} <>/tmp/nc-in >/tmp/in & sleep 0.2; netstat -ltn")
    assert f":{GUEST_PORT} " in out, out
    result: dict = {}

    def send() -> None:
        c = socket.create_connection(("127.0.0.1", linux_net["fport"]), timeout=600)
        t = time.monotonic()
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        c.recv(1)  # until the guest's nc closes
        result["h2g_s"] = time.monotonic() - t
        c.close()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    t0 = time.monotonic()
    out = sh.run("wait; md5sum /tmp/in", 600)
    t1 = time.monotonic()
    sender.join(30)
    assert f"{md5}  /tmp/in" in out, out
    assert "h2g_s" in result

    # guest -> host: the guest connects to the router's address, which passt
    # maps to the host's loopback, where a server counts and hashes.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got: dict = {}

    def receive() -> None:
        c, _ = srv.accept()
        h, n = hashlib.md5(), 0
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            h.update(b)
            n += len(b)
        got.update(md5=h.hexdigest(), n=n)
        c.close()

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    t2 = time.monotonic()
    sh.run(f"nc {router} {srv.getsockname()[1]} < /tmp/in", 600)
    t3 = time.monotonic()
    receiver.join(30)
    srv.close()
    assert got.get("n") == XFER_BYTES and got.get("md5") == md5, got
    mb = XFER_BYTES / 1e6
    print(f"\nhost->guest {mb / result['h2g_s']:.1f} MB/s ({result['h2g_s']:.1f} s; with md5sum {t1 - t0:.1f} s), "
          f"guest->host {mb / (t3 - t2):.1f} MB/s ({t3 - t2:.1f} s); {nb.stats}")
    sh.run("rm /tmp/in")


@pytest.mark.slow
def test_linux_module_reload_reconnects(linux_net):
    sh, nb = linux_net["sh"], linux_net["nb"]
    before = nb.connections
    # xenbus holds a module reference while the device is bound: unbind first.
    sh.run("echo vif-0 > /sys/bus/xen/drivers/vif/unbind; rmmod xen-netfront")
    assert sh.status == 0
    assert not nb.connected and nb.state == XenbusState.CLOSED
    sh.run("modprobe xen-netfront; sleep 1")
    assert nb.connected and nb.connections == before + 1
    assert _dhcp(sh)["router"]  # the new eth0 gets its lease


@pytest.mark.slow
def test_linux_hostile_ring_disconnects_only_the_vif(net_guest, caplog):
    """A frontend whose TX producer index runs away (poked from outside the
    guest) loses its vif; Linux closes its side and the domain runs on."""
    dom, nb = boot_linux(net_guest, None)
    sh = GuestShell(dom)
    assert nb.connected
    ring = nb.tx_ring
    struct.pack_into("<I", ring.pages[0], 0, (ring.req_cons + 1000) & 0xFFFFFFFF)
    with caplog.at_level("ERROR", logger="pvhvm.xenbus"):
        nb.serve_rings()
    assert "runs 1000 requests ahead" in nb.failure
    assert "runs 1000 requests ahead" in caplog.text
    assert not nb.connected and nb.tx_ring is None
    assert "alive" in sh.run("echo alive")
    dom.run_until(lambda: nb.state == XenbusState.CLOSED, 10)
    assert nb.frontend_state == XenbusState.CLOSED and nb.state == XenbusState.CLOSED
    assert dom.outcome is None
