"""The PV console backend (what xenconsoled does): drains the guest's
console ring (xen/include/public/io/console.h) to a sink and feeds input.

Ring page layout: in[1024] @0, out[2048] @1024, in_cons @3072,
in_prod @3076, out_cons @3080, out_prod @3084; indexes are free-running
32-bit counters."""

from __future__ import annotations

from typing import Callable

from .ring import ByteRing, RingError

IN_SIZE = 1024
OUT_SIZE = 2048
IN_OFF, OUT_OFF = 0, 1024
IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = 3072, 3076, 3080, 3084


class ConsoleHistory:
    """The newest output of a console, at least `keep` bytes of it (at most
    twice that: old output is dropped a `keep` at a time, so each byte is
    copied about once), as Xen keeps its console ring. Positions are counted
    from the domain's first byte (`base` is that of `data[0]`), so that an
    offset into the output stays valid when old output goes."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.base = 0
        self.data = bytearray()

    @property
    def end(self) -> int:
        """How many bytes were ever appended."""
        return self.base + len(self.data)

    def append(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > 2 * self.keep:
            drop = len(self.data) - self.keep
            # A new buffer, not an in-place delete: match objects taken on
            # the old one (Domain.expect's) keep the text they matched.
            self.data = self.data[drop:]
            self.base += drop

    def __bytes__(self) -> bytes:
        return bytes(self.data)


class ConsoleBackend:
    """Serves one console ring. `page` is a zero-copy view of the ring page in
    guest RAM; `notify` raises the guest's console event channel."""

    def __init__(self, page: memoryview, notify: Callable[[], object], sink: Callable[[bytes], None]) -> None:
        if len(page) != 4096:
            raise ValueError("console ring page must be 4096 bytes")
        self.page = page
        self.out = ByteRing(page, OUT_OFF, OUT_SIZE, OUT_CONS, OUT_PROD, "console out")
        self.input = ByteRing(page, IN_OFF, IN_SIZE, IN_CONS, IN_PROD, "console in")
        self.notify = notify
        self.sink = sink
        self.pending_input = bytearray()
        self.bytes_out = 0

    def service(self) -> bool:
        """Drain output and push queued input. True if the guest was notified."""
        notified = False
        try:
            out = self.out.read()
        except RingError:
            # A guest that runs its index ahead gets its ring reset, not trusted.
            self.out.reset_to_producer()
            out = b""
            notified = True
        if out:
            self.bytes_out += len(out)
            self.sink(out)
            notified = True
        if self.pending_input:
            try:
                n = self.input.write(bytes(self.pending_input))
            except RingError:
                n = 0  # the guest's consumer index is garbage: keep the input until it is sane
            if n:
                del self.pending_input[:n]
                notified = True
        if notified:
            self.notify()
        return notified

    def on_event(self, port: int) -> None:
        """The guest notified the console port."""
        self.service()

    def send_input(self, data: bytes) -> None:
        self.pending_input += data
