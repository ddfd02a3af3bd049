"""The PV console backend (what xenconsoled does): drains the guest's
console ring (xen/include/public/io/console.h) to a sink and feeds input.

Ring page layout: in[1024] @0, out[2048] @1024, in_cons @3072,
in_prod @3076, out_cons @3080, out_prod @3084; indexes are free-running
32-bit counters."""

from __future__ import annotations

import struct
from typing import Callable

IN_SIZE = 1024
OUT_SIZE = 2048
IN_OFF, OUT_OFF = 0, 1024
IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = 3072, 3076, 3080, 3084
U32 = struct.Struct("<I")


class ConsoleBackend:
    """Serves one console ring. `page` is a zero-copy view of the ring page in
    guest RAM; `notify` raises the guest's console event channel."""

    def __init__(self, page: memoryview, notify: Callable[[], None], sink: Callable[[bytes], None]) -> None:
        if len(page) != 4096:
            raise ValueError("console ring page must be 4096 bytes")
        self.page = page
        self.notify = notify
        self.sink = sink
        self.pending_input = bytearray()
        self.bytes_out = 0

    def _get(self, off: int) -> int:
        return U32.unpack_from(self.page, off)[0]

    def _set(self, off: int, value: int) -> None:
        U32.pack_into(self.page, off, value & 0xFFFFFFFF)

    def service(self) -> bool:
        """Drain output and push queued input. True if the guest was notified."""
        notified = False
        cons, prod = self._get(OUT_CONS), self._get(OUT_PROD)
        avail = (prod - cons) & 0xFFFFFFFF
        if avail > OUT_SIZE:
            # A guest that runs its index ahead gets its ring reset, not trusted.
            self._set(OUT_CONS, prod)
            avail = 0
            notified = True
        if avail:
            out = bytearray()
            while cons != prod:
                i = cons % OUT_SIZE
                n = min(OUT_SIZE - i, (prod - cons) & 0xFFFFFFFF)
                out += self.page[OUT_OFF + i : OUT_OFF + i + n]
                cons = (cons + n) & 0xFFFFFFFF
            self._set(OUT_CONS, cons)
            self.bytes_out += len(out)
            self.sink(bytes(out))
            notified = True
        if self.pending_input:
            icons, iprod = self._get(IN_CONS), self._get(IN_PROD)
            space = IN_SIZE - ((iprod - icons) & 0xFFFFFFFF)
            if 0 < space <= IN_SIZE:
                chunk = self.pending_input[:space]
                for b in chunk:
                    self.page[IN_OFF + iprod % IN_SIZE] = b
                    iprod = (iprod + 1) & 0xFFFFFFFF
                self._set(IN_PROD, iprod)
                del self.pending_input[: len(chunk)]
                notified = True
        if notified:
            self.notify()
        return notified

    def send_input(self, data: bytes) -> None:
        self.pending_input += data
