"""xenstored's end of a domain's xenstore ring page (docs/misc/xenstore-ring.txt,
struct xenstore_domain_interface in xs_wire.h).

Layout: ``req[1024]`` at 0 (guest -> server), ``rsp[1024]`` at 1024 (server
-> guest), then u32 ``req_cons`` @2048, ``req_prod`` @2052, ``rsp_cons``
@2056, ``rsp_prod`` @2060, ``server_features`` @2064, ``connection`` @2068,
``error`` @2072, ``evtchn_port`` @2076. Indexes are free-running u32 byte
counters; byte ``i`` of a stream lives at ``i & 1023``.

The server advertises ring reconnection and the error field. A guest that
lets ``prod - cons`` exceed 1024 on either ring gets error 2
(XENSTORE_ERROR_RINGIDX) and one that announces a payload over 4096 bytes
gets error 3 (XENSTORE_ERROR_PROTO), the codes xs_wire.h defines and
xenstored uses; the connection is then ignored (watches and transactions
dropped) until the guest asks for a reconnect.
"""

from __future__ import annotations

import base64
import struct
from collections import deque
from typing import Callable, Optional

from ..devices.ring import ByteRing, RingError
from . import wire
from .store import StateError, Store, state_bytes, state_get, state_int

RING_SIZE = 1024
RING_MASK = RING_SIZE - 1
PAGE_SIZE = 4096

OFF_REQ = 0
OFF_RSP = 1024
OFF_REQ_CONS = 2048
OFF_REQ_PROD = 2052
OFF_RSP_CONS = 2056
OFF_RSP_PROD = 2060
OFF_SERVER_FEATURES = 2064
OFF_CONNECTION = 2068
OFF_ERROR = 2072
OFF_EVTCHN_PORT = 2076

XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
SERVER_FEATURES = XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR

XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1

XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3

# Replies waiting for ring space before we stop taking requests (xenstored's
# "outstanding requests per domain" quota).
MAX_OUTSTANDING = 20
# Bytes of watch events held for a guest that does not drain its ring;
# later events are dropped (xenstored drops events past its memory quota).
MAX_EVENT_BACKLOG = 2 * 1024 * 1024

_U32 = struct.Struct("<I")


class _Out:
    __slots__ = ("data", "event", "sent")

    def __init__(self, data: bytes, event: bool) -> None:
        self.data = data
        self.event = event
        self.sent = 0


class RingConnection:
    """Serves one domain's xenstore ring against a Store.

    ``page`` is a writable 4096-byte buffer (a zero-copy view of guest RAM);
    ``notify`` signals the domain's xenstore event channel. Call service()
    whenever the guest kicks the channel (or on every exit): it consumes
    requests, answers them and pushes pending watch events. Watch events
    caused by other clients are written to the ring as they happen when
    there is room (with notify()), else on the next service().

    ``state``: what save_state() returned, to carry on a connection after
    the store's restore_state() and the restore of guest RAM (the ring
    indexes live in the page); the store's restored ring connection of
    ``domid`` is taken over, with its watches and transactions. Call
    service() once the event channel works again: it writes what was
    waiting and answers what the guest sent meanwhile."""

    def __init__(self, page, store: Store, domid: int, notify: Callable[[], None], *,
                 state: Optional[dict] = None) -> None:
        mv = memoryview(page)
        if mv.readonly:
            raise ValueError("the ring page must be writable")
        mv = mv.cast("B")
        if len(mv) < PAGE_SIZE:
            raise ValueError("the ring page must be 4096 bytes")
        self._page = mv[:PAGE_SIZE]
        self._req = ByteRing(self._page, OFF_REQ, RING_SIZE, OFF_REQ_CONS, OFF_REQ_PROD, "xenstore request")
        self._rsp = ByteRing(self._page, OFF_RSP, RING_SIZE, OFF_RSP_CONS, OFF_RSP_PROD, "xenstore response")
        self.store = store
        self.domid = domid
        self._notify = notify
        self._inbuf = bytearray()
        self._out: deque[_Out] = deque()
        self._event_bytes = 0
        self._capture: Optional[list[bytes]] = None
        self._in_service = False
        self.broken = False
        self.error = XENSTORE_ERROR_NONE
        if state is None:
            self.conn_id = store.connect(domid, self._on_event, guest_ring=True)
        else:
            self._load_state(state)
            # The events the store held for the connection are queued, not
            # written: the ring is touched by service() only.
            self._in_service = True
            try:
                self.conn_id = store.reattach(domid, self._on_event)
            finally:
                self._in_service = False
        # Advertise before consuming or producing anything.
        self._set(OFF_SERVER_FEATURES, self._get(OFF_SERVER_FEATURES) | SERVER_FEATURES)

    # ------------------------------------------------------------ page access

    def _get(self, off: int) -> int:
        return _U32.unpack_from(self._page, off)[0]

    def _set(self, off: int, value: int) -> None:
        _U32.pack_into(self._page, off, value & 0xFFFFFFFF)

    # ------------------------------------------------------------------ state

    @property
    def backlog(self) -> int:
        """Bytes waiting for room in the response ring."""
        return sum(len(o.data) - o.sent for o in self._out)

    def close(self) -> None:
        """Drop the connection from the store (the domain is gone)."""
        self.store.disconnect(self.conn_id)
        self.broken = True
        self._inbuf.clear()
        self._out.clear()
        self._event_bytes = 0

    def _break(self, err: int) -> None:
        self.broken = True
        self.error = err
        self._set(OFF_ERROR, err)
        self.store.reset_watches(self.conn_id)
        self._inbuf.clear()
        self._out.clear()
        self._event_bytes = 0

    def _reconnect(self) -> None:
        self.store.reset_watches(self.conn_id)
        self._inbuf.clear()
        self._out.clear()
        self._event_bytes = 0
        for off in (OFF_REQ_CONS, OFF_REQ_PROD, OFF_RSP_CONS, OFF_RSP_PROD):
            self._set(off, 0)
        self.broken = False
        self.error = XENSTORE_ERROR_NONE
        self._set(OFF_ERROR, XENSTORE_ERROR_NONE)
        # Indexes first, then the state the guest waits on.
        self._set(OFF_CONNECTION, XENSTORE_CONNECTED)

    def save_state(self) -> dict:
        """What this connection keeps outside guest memory, as plain JSON
        types: a request read in part, the replies and watch events still
        waiting for room in the response ring, and whether the connection
        is broken. Its watches and transactions are in Store.save_state()."""
        return {
            "domid": self.domid,
            "partial_request": base64.b64encode(bytes(self._inbuf)).decode("ascii"),
            "pending": [{"data": base64.b64encode(o.data).decode("ascii"), "event": o.event, "sent": o.sent}
                        for o in self._out],
            "broken": self.broken,
            "error": self.error,
        }

    def _load_state(self, state: dict) -> None:
        """Take save_state()'s dict, checked as untrusted: StateError (a
        ValueError) if malformed."""
        w = "ring"
        if state_int(state, "domid", w, 0, 0xFFFF) != self.domid:
            raise StateError(f"xenstore state: ring.domid is not {self.domid}")
        inbuf = state_bytes(state, "partial_request", w)
        # Only a request still incomplete can wait here: a complete one
        # would have been answered before the save.
        if len(inbuf) >= wire.HEADER_SIZE:
            length = _U32.unpack_from(inbuf, 12)[0]
            if length > self.store.payload_max or len(inbuf) >= wire.HEADER_SIZE + length:
                raise StateError("xenstore state: ring.partial_request is not part of one request")
        out: deque[_Out] = deque()
        event_bytes = 0
        for i, item in enumerate(state_get(state, "pending", list, w)):
            where = f"ring.pending[{i}]"
            data = state_bytes(item, "data", where)
            if not wire.HEADER_SIZE <= len(data) <= wire.HEADER_SIZE + self.store.payload_max:
                raise StateError(f"xenstore state: {where}.data is not one message")
            o = _Out(data, state_get(item, "event", bool, where))
            # Only the first message can have been written in part.
            o.sent = state_int(item, "sent", where, 0, len(data) - 1 if i == 0 else 0)
            event_bytes += len(data) if o.event else 0
            out.append(o)
        if sum(1 for o in out if not o.event) > MAX_OUTSTANDING or event_bytes > MAX_EVENT_BACKLOG:
            raise StateError("xenstore state: ring.pending holds more than a connection may queue")
        broken = state_get(state, "broken", bool, w)
        error = state_int(state, "error", w, XENSTORE_ERROR_NONE, XENSTORE_ERROR_PROTO)
        self._inbuf = bytearray(inbuf)
        self._out = out
        self._event_bytes = event_bytes
        self.broken = broken
        self.error = error

    # --------------------------------------------------------------- events

    def _on_event(self, path: str, token: str) -> None:
        if self.broken:
            return
        msg = wire.watch_event(path, token)
        if msg is None:
            return
        data = msg.encode()
        if self._capture is not None:
            self._capture.append(data)
            return
        self._queue_event(data)
        if not self._in_service and not self.broken:
            if self._flush():
                self._notify()

    def _queue_event(self, data: bytes) -> None:
        # Like xenstored, drop an event identical to one still waiting
        # (special @ events excepted) and cap what a stuck guest can pile up.
        if not data[wire.HEADER_SIZE :].startswith(b"@"):
            for o in self._out:
                if o.event and o.sent == 0 and o.data == data:
                    return
        if self._event_bytes + len(data) > MAX_EVENT_BACKLOG:
            return
        self._event_bytes += len(data)
        self._out.append(_Out(data, True))

    # -------------------------------------------------------------- service

    def service(self) -> bool:
        """Move data both ways. Returns True if anything was consumed or
        produced (notify() has then been called)."""
        if self._in_service:
            return False
        self._in_service = True
        try:
            return self._service()
        finally:
            self._in_service = False

    def _service(self) -> bool:
        if self._get(OFF_CONNECTION) == XENSTORE_RECONNECT:
            self._reconnect()
            self._notify()
            return True
        if self.broken:
            return False
        progress = self._flush()
        while not self.broken:
            consumed = self._read_requests()
            progress |= consumed
            progress |= self._flush()
            if not consumed:
                break
        if progress:
            self._notify()
        return progress

    def _outstanding(self) -> int:
        return sum(1 for o in self._out if not o.event)

    def _read_requests(self) -> bool:
        """Consume what the request ring holds and process complete messages.
        Returns whether anything was consumed."""
        consumed = False
        while not self.broken and self._outstanding() < MAX_OUTSTANDING:
            # Take no more than the message being assembled still needs, so
            # a guest never sees us consume past what we can hold.
            try:
                data = self._req.read(self._bytes_wanted())
            except RingError:
                self._break(XENSTORE_ERROR_RINGIDX)
                return consumed
            if not data:
                break
            self._inbuf += data
            consumed = True
            self._process_input()
        return consumed

    def _bytes_wanted(self) -> int:
        if len(self._inbuf) < wire.HEADER_SIZE:
            return wire.HEADER_SIZE - len(self._inbuf)
        length = _U32.unpack_from(self._inbuf, 12)[0]
        return wire.HEADER_SIZE + length - len(self._inbuf)

    def _process_input(self) -> None:
        while len(self._inbuf) >= wire.HEADER_SIZE and not self.broken:
            typ, req_id, tx_id, length = wire.HEADER.unpack_from(self._inbuf)
            if length > self.store.payload_max:
                self._break(XENSTORE_ERROR_PROTO)
                return
            end = wire.HEADER_SIZE + length
            if len(self._inbuf) < end:
                return
            msg = wire.Message(typ, req_id, tx_id, bytes(self._inbuf[wire.HEADER_SIZE : end]))
            del self._inbuf[:end]
            self._dispatch(msg)

    def _dispatch(self, msg: wire.Message) -> None:
        self._capture = []
        try:
            replies = wire.handle(self.store, self.conn_id, self.domid, msg)
        finally:
            events, self._capture = self._capture, None
        if replies is wire.CLOSE:
            self._break(XENSTORE_ERROR_PROTO)
            return
        out = [_Out(r.encode(), False) for r in replies]
        # xenstored queues the events a request causes before its reply,
        # except WATCH, whose first event follows the OK.
        if msg.type == wire.XsType.WATCH:
            self._out.extend(out)
            for e in events:
                self._queue_event(e)
        else:
            for e in events:
                self._queue_event(e)
            self._out.extend(out)

    def _flush(self) -> bool:
        """Write as much of the backlog as fits; True if anything was written."""
        wrote = False
        while self._out and not self.broken:
            o = self._out[0]
            try:
                n = self._rsp.write(o.data[o.sent :])
            except RingError:
                self._break(XENSTORE_ERROR_RINGIDX)
                return wrote
            if n == 0:
                break
            # Data before the producer index (program order is the guest's
            # order here: the emulated CPU does not run concurrently).
            o.sent += n
            wrote = True
            if o.sent == len(o.data):
                self._out.popleft()
                if o.event:
                    self._event_bytes -= len(o.data)
        return wrote

    def on_event(self, port: int) -> None:
        """The guest notified the xenstore port."""
        self.service()
