"""The host side of the run loop: file descriptors and cross-thread work
served between the core's exits, and what wakes the core while it idles.

The core sleeps in Rust while every vCPU waits (a timer, or this loop's
selector becoming ready: `Vm.set_host_fd`). Sources registered here (the
xenstore socket, a TAP or passt, the terminal, a disk worker's completion)
are served on the run loop's thread by `poll`; other threads hand work in
with `call_soon_threadsafe`, which also kicks a running core back.
"""

from __future__ import annotations

import os
import selectors
from collections import deque
from typing import Callable

from . import _core


class SelectorLoop:
    """A selector with a self-pipe: readers and writers served on the
    loop's thread, work handed in from other threads."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, {selectors.EVENT_READ: self._drain_wakeups})
        self._soon: deque[Callable[[], None]] = deque()

    def add_reader(self, fileobj, callback: Callable[[], None]) -> None:
        """Call `callback` (on the run loop's thread) when `fileobj` is readable."""
        self._watch(fileobj, selectors.EVENT_READ, callback)

    def remove_reader(self, fileobj) -> None:
        self._unwatch(fileobj, selectors.EVENT_READ)

    def add_writer(self, fileobj, callback: Callable[[], None]) -> None:
        """Call `callback` when `fileobj` is writable (a client that had more
        output than its socket took), until `remove_writer`."""
        self._watch(fileobj, selectors.EVENT_WRITE, callback)

    def remove_writer(self, fileobj) -> None:
        self._unwatch(fileobj, selectors.EVENT_WRITE)

    def _watch(self, fileobj, event: int, callback: Callable[[], None]) -> None:
        try:
            key = self._selector.get_key(fileobj)
        except KeyError:
            self._selector.register(fileobj, event, {event: callback})
            return
        callbacks = dict(key.data)
        callbacks[event] = callback
        self._selector.modify(fileobj, key.events | event, callbacks)

    def _unwatch(self, fileobj, event: int) -> None:
        key = self._selector.get_key(fileobj)
        callbacks = {e: cb for e, cb in key.data.items() if e != event}
        if callbacks:
            self._selector.modify(fileobj, key.events & ~event, callbacks)
        else:
            self._selector.unregister(fileobj)

    def wake(self) -> None:
        """From any thread: make the loop look at its sources soon."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """From any thread: run `fn` on the run loop's thread between runs."""
        self._soon.append(fn)
        self.wake()

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._soon:
            self._soon.popleft()()

    def poll(self, timeout: float | None) -> bool:
        """Serve ready sources, waiting up to `timeout` (None: forever).
        True if any was ready."""
        events = self._selector.select(timeout)
        for key, mask in events:
            for event, callback in list(key.data.items()):
                if mask & event:
                    callback()
        return bool(events)

    def close(self) -> None:
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    @property
    def has_sources(self) -> bool:
        """Whether anything but the self-pipe is registered (else an idle
        domain can never be woken from the host)."""
        return len(self._selector.get_map()) > 1


class HostLoop(SelectorLoop):
    """The loop of one domain: its selector's descriptor is the core's host
    fd, and a wake-up also kicks the core out of a run."""

    def __init__(self, vm: _core.Vm) -> None:
        super().__init__()
        # While every vCPU idles the core sleeps itself, until a timer or
        # until one of these sources is ready (the selector's own fd).
        vm.set_host_fd(self._selector.fileno())
        self._waker = vm.waker()

    def wake(self) -> None:
        """From any thread: make the run loop look at its sources soon."""
        self._waker.wake()
        super().wake()


__all__ = ["HostLoop", "SelectorLoop"]
