"""The device manager: who owns which event channel port, and the xenbus
handshake of every device, between the core's exits.

A backend never polls its rings. It owns its ports (`own_port`): when the
core reports that the guest notified a port (the ``notify`` exit and
`Vm.take_notifications`), the manager calls the owner's handler for that
port and no other. Frontend state changes arrive as xenstore watch events;
a device with pending xenbus events is serviced once the store has settled
(`BackendDevice.service`). Host-side sources (a TAP, passt, a disk worker
finishing) reach the run loop through `HostLoop` and call their device
themselves.

Everything a backend may do to the domain goes through this object: the
core's `BackendOps` (ports and grants, thread-safe), the store, the host
loop. No backend reaches into the `Domain` or its `Vm`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Protocol

from .. import _core
from ..xenstore.store import Store

if TYPE_CHECKING:
    from ..runloop import HostLoop
    from ..xenbus import BackendDevice

log = logging.getLogger(__name__)


class PortHandler(Protocol):
    def __call__(self, port: int) -> None: ...


class DeviceManager:
    """The devices of one domain, and what they are given to work with."""

    def __init__(self, ops: _core.BackendOps, store: Store, domid: int, loop: "HostLoop",
                 kick_store: Callable[[], object] = lambda: None) -> None:
        self.ops = ops
        self.store = store
        self.domid = domid
        self.loop = loop
        self._kick_store = kick_store
        self._owners: dict[int, PortHandler] = {}
        self._xenbus_pending: dict[int, "BackendDevice"] = {}
        self.devices: list["BackendDevice"] = []
        self.unowned_notifications = 0  # ports the guest notified that no device owns

    # -- ports ---------------------------------------------------------------

    def own_port(self, port: int, handler: PortHandler) -> None:
        """Route the guest's notifications of `port` to `handler`."""
        if port in self._owners and self._owners[port] is not handler:
            raise ValueError(f"event channel port {port} already has an owner")
        self._owners[port] = handler

    def disown_port(self, port: int) -> None:
        self._owners.pop(port, None)

    def owner_of(self, port: int) -> PortHandler | None:
        return self._owners.get(port)

    def dispatch(self, ports: list[int]) -> bool:
        """Hand each notified port to its owner (the run loop settles xenbus
        afterwards, once per exit). True if there were any."""
        for port in ports:
            handler = self._owners.get(port)
            if handler is None:
                self.unowned_notifications += 1
                continue
            handler(port)
        return bool(ports)

    # -- xenstore ------------------------------------------------------------

    def kick_store(self) -> None:
        """Deliver the watch events the backend's store writes caused, now."""
        self._kick_store()

    def xenbus_event(self, device: "BackendDevice") -> None:
        """`device` has frontend state changes to look at (from a watch)."""
        self._xenbus_pending[id(device)] = device

    def settle(self) -> bool:
        """Service devices with pending xenbus events until none is left (a
        state change may cause further watch events). True if any ran."""
        did = False
        for _ in range(16):  # bounded: a guest flipping states waits for the next exit
            if not self._xenbus_pending:
                break
            pending = list(self._xenbus_pending.values())
            self._xenbus_pending.clear()
            for device in pending:
                did |= device.service()
        return did

    # -- devices -------------------------------------------------------------

    def attach(self, device: "BackendDevice") -> "BackendDevice":
        """Write the device's xenstore nodes and start its handshake."""
        device.create()
        self.devices.append(device)
        self.settle()
        return device

    def detach(self, device: "BackendDevice") -> None:
        """Hot-unplug: disconnect, remove its nodes, close its host end."""
        if device in self.devices:
            self.devices.remove(device)
        device.close()
        device.destroy()

    def can_wake(self) -> bool:
        """Whether a device may still raise an event by itself (a worker
        thread with work in hand): the domain is not hung while one can."""
        return any(device.can_wake() for device in self.devices)

    def close(self) -> None:
        for device in list(self.devices):
            device.close()
        self.devices.clear()


__all__ = ["DeviceManager", "PortHandler"]
