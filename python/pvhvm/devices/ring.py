"""The shared rings between a guest's frontends and our backends, in one place.

Two kinds, as Xen's public headers define them:

* `ByteRing`: a byte stream in a fixed window of one page, with free-running
  u32 producer and consumer counters elsewhere in the page. The console
  (io/console.h: ``in[1024]``, ``out[2048]``) and xenstore
  (io/xs_wire.h: ``req[1024]``, ``rsp[1024]``) rings are two of these each.
* `BackRing`: the request/response rings of io/ring.h used by netif and
  blkif: a 64-byte header (``req_prod``, ``req_event``, ``rsp_prod``,
  ``rsp_event``) and then slots, each the size of the union of one request
  and one response, over one or more granted pages. The number of slots is
  derived as ``__RING_SIZE`` does: what fits after the header, rounded down
  to a power of two.

A backend may serve a ring from its own thread while the vCPUs run (blkback
does): where io/ring.h puts `xen_mb()`, between publishing an index and
reading the other side's, `BackRing` issues a real fence, else x86 lets the
load pass the store and a notification is lost.

Indexes the guest writes are never trusted: a producer running more than a
ring ahead of its consumer raises `RingError`; the caller decides what that
costs the frontend (a reset ring for the console, a broken connection for
xenstore, a failed device for netback and blkback).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .._core import memory_barrier

PAGE_SIZE = 4096
RING_HEADER = 64  # req_prod, req_event, rsp_prod, rsp_event, 48 bytes of padding
MASK32 = 0xFFFFFFFF

_U32 = struct.Struct("<I")


class RingError(Exception):
    """The other end broke the ring protocol (the message says how)."""


def _page_view(page) -> memoryview:
    mv = memoryview(page).cast("B")
    if len(mv) < PAGE_SIZE:
        raise ValueError("a ring page is 4096 bytes")
    return mv


def ring_slots(slot_size: int, pages: int = 1) -> int:
    """How many slots of `slot_size` bytes an io/ring.h ring over `pages`
    pages holds (__RING_SIZE: a power of two)."""
    fit = (pages * PAGE_SIZE - RING_HEADER) // slot_size
    if fit < 1:
        raise ValueError(f"a {slot_size}-byte slot does not fit {pages} page(s)")
    return 1 << (fit.bit_length() - 1)


class ByteRing:
    """One direction of a byte-stream ring in `page`: `size` bytes of data at
    `data_off`, the consumer counter at `cons_off`, the producer's at
    `prod_off`. We are the consumer (`read`) or the producer (`write`)."""

    def __init__(self, page, data_off: int, size: int, cons_off: int, prod_off: int, name: str) -> None:
        if size & (size - 1):
            raise ValueError("a byte ring's size is a power of two")
        self.page = _page_view(page)
        self.data_off, self.size = data_off, size
        self.cons_off, self.prod_off = cons_off, prod_off
        self.name = name

    def _get(self, off: int) -> int:
        return _U32.unpack_from(self.page, off)[0]

    def _set(self, off: int, value: int) -> None:
        _U32.pack_into(self.page, off, value & MASK32)

    @property
    def cons(self) -> int:
        return self._get(self.cons_off)

    @property
    def prod(self) -> int:
        return self._get(self.prod_off)

    def used(self) -> int:
        """Bytes in the ring; RingError if the counters are more than a ring apart."""
        n = (self.prod - self.cons) & MASK32
        if n > self.size:
            raise RingError(f"{self.name} ring: producer {self.prod} is {n} bytes ahead of consumer "
                            f"{self.cons} (the ring holds {self.size})")
        return n

    def read(self, limit: int | None = None) -> bytes:
        """Consume up to `limit` bytes (all there are by default)."""
        n = self.used()
        if limit is not None:
            n = min(n, limit)
        cons = self.cons
        out = bytearray()
        while len(out) < n:
            i = (cons + len(out)) & (self.size - 1)
            k = min(self.size - i, n - len(out))
            out += self.page[self.data_off + i : self.data_off + i + k]
        self._set(self.cons_off, cons + n)
        return bytes(out)

    def write(self, data: bytes) -> int:
        """Produce as much of `data` as fits; returns how much. The data is in
        the page before the producer counter moves."""
        prod = self.prod
        n = min(len(data), self.size - self.used())
        done = 0
        while done < n:
            i = (prod + done) & (self.size - 1)
            k = min(self.size - i, n - done)
            self.page[self.data_off + i : self.data_off + i + k] = data[done : done + k]
            done += k
        if n:
            self._set(self.prod_off, prod + n)
        return n

    def reset_to_producer(self) -> None:
        """Drop what the ring holds (for a producer that ran away)."""
        self._set(self.cons_off, self.prod)


class BackRing:
    """The backend's end of an io/ring.h ring over `pages` (writable buffers,
    e.g. memoryviews of grant mappings, in the frontend's ring-ref order):
    the shared indexes in the first page and our private ``req_cons`` and
    ``rsp_prod_pvt``. Slots may straddle pages; they are copied out and in
    whole, so a request is read from guest memory once."""

    def __init__(self, pages: Sequence, slot_size: int, name: str) -> None:
        if not pages:
            raise ValueError("a ring needs at least one page")
        self.pages = [_page_view(p) for p in pages]
        self.slot_size = slot_size
        self.size = ring_slots(slot_size, len(self.pages))
        self.name = name
        header = self.pages[0]
        self._header = header
        # BACK_RING_ATTACH: carry on from what was already answered.
        self.req_cons = self.rsp_prod_pvt = self.rsp_prod

    def release(self) -> None:
        """Let go of the page views (before the pages are unmapped)."""
        for p in self.pages:
            p.release()
        self._header.release()

    # -- the shared header -----------------------------------------------------

    @property
    def req_prod(self) -> int:
        return _U32.unpack_from(self._header, 0)[0]

    @property
    def req_event(self) -> int:
        return _U32.unpack_from(self._header, 4)[0]

    @req_event.setter
    def req_event(self, value: int) -> None:
        _U32.pack_into(self._header, 4, value & MASK32)

    @property
    def rsp_prod(self) -> int:
        return _U32.unpack_from(self._header, 8)[0]

    @property
    def rsp_event(self) -> int:
        return _U32.unpack_from(self._header, 12)[0]

    # -- slots -----------------------------------------------------------------

    def _where(self, idx: int) -> tuple[int, int]:
        off = RING_HEADER + (idx & (self.size - 1)) * self.slot_size
        return divmod(off, PAGE_SIZE)

    def read_slot(self, idx: int, length: int | None = None) -> bytes:
        """A copy of slot `idx` (its first `length` bytes)."""
        n = self.slot_size if length is None else length
        page, off = self._where(idx)
        if off + n <= PAGE_SIZE:
            return bytes(self.pages[page][off : off + n])
        first = PAGE_SIZE - off
        return bytes(self.pages[page][off:]) + bytes(self.pages[page + 1][: n - first])

    def write_slot(self, idx: int, data: bytes) -> None:
        page, off = self._where(idx)
        if off + len(data) <= PAGE_SIZE:
            self.pages[page][off : off + len(data)] = data
            return
        first = PAGE_SIZE - off
        self.pages[page][off:] = data[:first]
        self.pages[page + 1][: len(data) - first] = data[first:]

    # -- the protocol ------------------------------------------------------------

    def unconsumed(self) -> int:
        """Requests posted and not consumed; RingError if the frontend's
        producer index is more than a ring ahead."""
        prod = self.req_prod
        n = (prod - self.req_cons) & MASK32
        if n > self.size:
            raise RingError(f"{self.name} ring: req_prod {prod} runs {n} requests ahead of req_cons "
                            f"{self.req_cons} (the ring holds {self.size})")
        return n

    def take_request(self, length: int | None = None) -> bytes:
        """Copy out the next request and consume it."""
        data = self.read_slot(self.req_cons, length)
        self.req_cons = (self.req_cons + 1) & MASK32
        return data

    def put_response(self, data: bytes) -> None:
        """Write the next response (published by `push_responses`)."""
        self.write_slot(self.rsp_prod_pvt, data)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & MASK32

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: ask for a notification with the
        next request, then look once more (closes the race)."""
        if self.unconsumed():
            return True
        self.req_event = self.req_cons + 1
        memory_barrier()  # the new req_event is visible before req_prod is read again
        return self.unconsumed() > 0

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish rsp_prod_pvt; True
        if the frontend asked to be notified for a response now published."""
        old = self.rsp_prod
        new = self.rsp_prod_pvt & MASK32
        if new == old:
            return False
        memory_barrier()  # responses before the index (a compiler barrier would do on x86; this is cheap)
        _U32.pack_into(self._header, 8, new)
        memory_barrier()  # the new rsp_prod is visible before rsp_event is read
        return ((new - self.rsp_event) & MASK32) < ((new - old) & MASK32)


__all__ = ["ByteRing", "BackRing", "RingError", "ring_slots", "PAGE_SIZE", "RING_HEADER"]
