"""The backend side of the xenbus handshake, for any split driver.

What the toolstack and a backend driver in domain 0 do for a device of a
domU, as libxl (libxl__device_generic_add) and Linux's xenbus backend core
do it (xen/include/public/io/xenbus.h, docs/misc/xenstore-paths.pandoc):

* the frontend directory ``/local/domain/<d>/device/<type>/<id>``, owned by
  the guest and readable by the backend (``[n<d>, r<backend>]``), with
  ``backend``, ``backend-id``, ``state`` = 1 (Initialising), ``handle`` and
  the device's own keys (a vif's ``mac`` …);
* the backend directory ``/local/domain/<backend>/backend/<type>/<d>/<id>``,
  owned by the backend and readable by the guest (``[n<backend>, r<d>]``),
  with ``frontend``, ``frontend-id``, ``online`` = 1, ``state`` and the
  backend's feature keys;
* the toolstack's record ``/libxl/<d>/device/<type>/<id>`` (private).

Then a state machine watches the frontend's ``state`` and drives the
backend's, like Linux's netback/blkback frontend_changed():

    frontend Initialising  -> backend InitWait (again, after a Closed)
    frontend Initialised or Connected -> connect() then backend Connected
    frontend Closing       -> disconnect(), backend Closing
    frontend Closed / gone -> disconnect(), backend Closed

A frontend that closes and initialises again (its module unloaded and
loaded) is served again from InitWait. ``fail(reason)`` is the device's way
out when the frontend misbehaves: disconnect, note the reason (``failure``,
the log, and ``error/backend/<type>/<d>/<id>/error`` in the backend's
home, where xenbus_dev_fatal writes it) and go to Closing.

Device classes subclass `BackendDevice` and implement ``connect()`` and
``disconnect()``; everything here runs on the domain's run-loop thread.
A device is given its `DeviceManager` (devices/manager.py), which routes
the frontend's watch events to ``service()`` and the guest's notifications
of the ports the device owns to their handlers.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from typing import TYPE_CHECKING, Mapping, Optional

from .errors import PvhvmError
from .xenstore.store import PRIV_DOMID, XenstoreError

if TYPE_CHECKING:
    from .devices.manager import DeviceManager

log = logging.getLogger(__name__)


class XenbusState(enum.IntEnum):
    """enum xenbus_state (io/xenbus.h)."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


class DeviceError(PvhvmError):
    """A device cannot connect or go on: the frontend gave it something it
    cannot use (the message says what)."""


def parse_state(raw: Optional[bytes]) -> XenbusState:
    """A ``state`` node's value; missing or garbage reads as Unknown."""
    if raw is None:
        return XenbusState.UNKNOWN
    try:
        return XenbusState(int(raw.decode("ascii").strip()))
    except (ValueError, UnicodeDecodeError):
        return XenbusState.UNKNOWN


class BackendDevice:
    """One device (type ``devtype``, id ``devid``) of the domain that
    ``devices`` (its DeviceManager) serves, by backend domain
    ``backend_domid`` (0: us).

    Subclasses set ``devtype`` and override ``frontend_entries``,
    ``backend_entries``, ``connect``, ``disconnect`` and ``close``."""

    devtype = ""

    def __init__(self, devices: "DeviceManager", devid: int = 0, *, backend_domid: int = PRIV_DOMID) -> None:
        if not self.devtype:
            raise TypeError("a BackendDevice subclass must set devtype")
        self.devices = devices
        self.ops = devices.ops
        self.store = store = devices.store
        self.domid = domid = devices.domid
        self.devid = devid
        self.backend_domid = backend_domid
        self.frontend_path = f"{store.get_domain_path(domid)}/device/{self.devtype}/{devid}"
        self.backend_path = f"{store.get_domain_path(backend_domid)}/backend/{self.devtype}/{domid}/{devid}"
        self.libxl_path = f"/libxl/{domid}/device/{self.devtype}/{devid}"
        # xenbus_dev_fatal's place: error/<the device's node name> under the
        # backend domain's home.
        self.error_path = (f"{store.get_domain_path(backend_domid)}/error/backend/"
                           f"{self.devtype}/{domid}/{devid}/error")
        self.state = XenbusState.UNKNOWN
        self.frontend_state = XenbusState.UNKNOWN
        self.connected = False
        self.failure: Optional[str] = None  # why the device last gave up on its frontend
        self.connections = 0  # how many times connect() succeeded
        self.history: list[tuple[XenbusState, XenbusState]] = []  # (frontend, backend) after each change
        self._events: deque[str] = deque()
        self._conn_id: Optional[int] = None
        self._token = f"pvhvm-{self.devtype}-{domid}-{devid}"
        self.created = False

    # ------------------------------------------------------------ for subclasses

    def frontend_entries(self) -> Mapping[str, str]:
        """Device keys in the frontend directory besides backend/backend-id/state/handle."""
        return {}

    def backend_entries(self) -> Mapping[str, str]:
        """Device keys (features …) in the backend directory, written before InitWait."""
        return {}

    def connect(self) -> None:
        """The frontend is ready: read its keys, map its rings. Raise
        DeviceError to refuse (the backend then goes to Closing)."""

    def disconnect(self) -> None:
        """Undo connect(): unmap everything. Must be safe to call twice."""

    # -------------------------------------------------------------- store access

    def read_frontend(self, key: str) -> Optional[str]:
        try:
            return self.store.read(PRIV_DOMID, f"{self.frontend_path}/{key}").decode("ascii", "replace")
        except XenstoreError:
            return None

    def read_frontend_int(self, key: str, default: Optional[int] = None) -> Optional[int]:
        """An unsigned number the frontend wrote (as xenbus_read_unsigned);
        DeviceError if present but not a number."""
        raw = self.read_frontend(key)
        if raw is None:
            return default
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            raise DeviceError(f"{self.frontend_path}/{key}: not a number: {raw[:40]!r}") from None
        if value < 0 or value > 0xFFFFFFFF:
            raise DeviceError(f"{self.frontend_path}/{key}: out of range: {value}")
        return value

    def write_backend(self, key: str, value: str) -> None:
        self.store.write(PRIV_DOMID, f"{self.backend_path}/{key}", value)

    def _kick_store(self) -> None:
        self.devices.kick_store()

    def close(self) -> None:
        """Stop serving for good (the domain is going): release host ends.
        The default has none."""
        self._do_disconnect()

    def host_ports(self) -> list[int]:
        """The guest's event channel ports this device bound to the host."""
        return []

    def quiesce(self) -> None:
        """Finish the requests in hand, so that every request the device
        took from its rings has its response there (before a save)."""

    def save_state(self) -> dict:
        """What a restore needs to take the device over (plain JSON). The
        rings and the nodes are in guest RAM and the store; this is the
        handshake's state and what the device was built from
        (`save_config`)."""
        return {"type": self.devtype, "devid": self.devid, "state": int(self.state),
                "connected": self.connected, "ports": self.host_ports(), "config": self.save_config()}

    def save_config(self) -> dict:
        """What the device was made from (its image, its MAC …)."""
        return {}

    def resume(self, saved: dict) -> None:
        """Take over this device of a restored domain: its nodes are in the
        restored store, its rings in RAM. The handshake goes on from the
        saved backend state; a connected device connects again as it did
        (the guest's ports, still bound to the host in the saved core, are
        released first so that connect() binds them as before), and its
        rings pick up where the responses stopped (the save quiesced them)."""
        self.created = True
        self.state = XenbusState(saved["state"])
        if saved["connected"]:
            for port in saved["ports"]:
                self.ops.unbind_port(port)
            self._do_connect()
        self._conn_id = self.store.connect(PRIV_DOMID, self._on_watch)
        self.store.watch(self._conn_id, f"{self.frontend_path}/state", self._token)

    def can_wake(self) -> bool:
        """Whether the device may raise an event for the guest on its own
        (from another thread) before the guest asks it anything again."""
        return False

    # ------------------------------------------------------------------ set-up

    def create(self) -> None:
        """Write the device's nodes (one transaction, as libxl), go to
        InitWait as the backend driver does once probed, and watch the
        frontend's state."""
        if self.created:
            return
        fe, be = self.frontend_path, self.backend_path
        fe_perms = (("n", self.domid), ("r", self.backend_domid))
        be_perms = (("n", self.backend_domid), ("r", self.domid))
        front = {"backend": be, "backend-id": str(self.backend_domid), "state": str(int(XenbusState.INITIALISING)),
                 "handle": str(self.devid)}
        front.update(self.frontend_entries())
        back = {"frontend": fe, "frontend-id": str(self.domid), "online": "1",
                "state": str(int(XenbusState.INITIALISING)), "handle": str(self.devid)}
        back.update(self.backend_entries())

        def write(tx: int) -> None:
            s = self.store
            for path in (fe, be, self.libxl_path):
                try:
                    s.rm(PRIV_DOMID, path, tx)
                except XenstoreError as e:
                    if e.errno != "ENOENT":
                        raise
            s.mkdir(PRIV_DOMID, fe, tx)
            s.set_perms(PRIV_DOMID, fe, fe_perms, tx)
            s.mkdir(PRIV_DOMID, be, tx)
            s.set_perms(PRIV_DOMID, be, be_perms, tx)
            for k, v in front.items():
                s.write(PRIV_DOMID, f"{fe}/{k}", v, tx)
            for k, v in back.items():
                s.write(PRIV_DOMID, f"{be}/{k}", v, tx)
            for k, v in (("frontend", fe), ("backend", be), ("frontend-id", str(self.domid)), ("online", "1"),
                         ("state", str(int(XenbusState.INITIALISING)))):
                s.write(PRIV_DOMID, f"{self.libxl_path}/{k}", v, tx)

        self.store.run_transaction(PRIV_DOMID, write)
        self.state = XenbusState.INITIALISING
        self.created = True
        self._set_state(XenbusState.INIT_WAIT)
        self._conn_id = self.store.connect(PRIV_DOMID, self._on_watch)
        self.store.watch(self._conn_id, f"{fe}/state", self._token)
        self._kick_store()

    def destroy(self) -> None:
        """Hot-unplug as far as the store goes: disconnect, forget the
        watch, remove the nodes."""
        self._do_disconnect()
        if self._conn_id is not None:
            self.store.disconnect(self._conn_id)
            self._conn_id = None
        for path in (self.frontend_path, self.backend_path, self.libxl_path):
            try:
                self.store.rm(PRIV_DOMID, path)
            except XenstoreError:
                pass
        self.created = False
        self._kick_store()

    # ------------------------------------------------------------ state machine

    def _on_watch(self, path: str, token: str) -> None:
        # Called inside store operations: only note it.
        if token == self._token:
            self._events.append(path)
            self.devices.xenbus_event(self)

    def _set_state(self, state: XenbusState) -> None:
        if state == self.state:
            return
        log.debug("%s: backend %s -> %s", self.backend_path, self.state.name, state.name)
        self.state = state
        try:
            self.write_backend("state", str(int(state)))
            self.store.write(PRIV_DOMID, f"{self.libxl_path}/state", str(int(state)))
        except XenstoreError as e:  # the nodes were removed under us
            log.warning("%s: cannot write state: %s", self.backend_path, e)
        self._kick_store()

    def service(self) -> bool:
        """Handle frontend state changes noted since the last call. True if
        anything happened."""
        if not self._events:
            return False
        self._events.clear()
        try:
            raw = self.store.read(PRIV_DOMID, f"{self.frontend_path}/state")
        except XenstoreError:
            raw = None
        self.frontend_state = fe = parse_state(raw)
        self._frontend_changed(fe)
        self.history.append((fe, self.state))
        return True

    def _frontend_changed(self, fe: XenbusState) -> None:
        be = self.state
        if fe == XenbusState.INITIALISING:
            if be == XenbusState.CONNECTED:
                # The frontend started over without closing (a crashed or
                # kexec'd guest driver): drop the old rings first.
                self._do_disconnect()
                self._set_state(XenbusState.INIT_WAIT)
            elif be == XenbusState.CLOSED:
                log.info("%s: frontend initialising again", self.frontend_path)
                self._set_state(XenbusState.INIT_WAIT)
        elif fe in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            if be == XenbusState.INIT_WAIT:
                self._do_connect()
        elif fe == XenbusState.CLOSING:
            self._do_disconnect()
            if be != XenbusState.CLOSED:
                self._set_state(XenbusState.CLOSING)
        elif fe == XenbusState.CLOSED or fe == XenbusState.UNKNOWN:
            self._do_disconnect()
            if be != XenbusState.CLOSED and be != XenbusState.INITIALISING:
                # From InitWait straight to Closed, as netback's
                # set_backend_state walks it.
                self._set_state(XenbusState.CLOSED)

    def _do_connect(self) -> None:
        try:
            self.connect()
        except DeviceError as e:
            self.disconnect()
            self.fail(str(e))
            return
        self.connected = True
        self.connections += 1
        self._set_state(XenbusState.CONNECTED)
        log.info("%s: connected", self.backend_path)

    def _do_disconnect(self) -> None:
        if self.connected:
            self.connected = False
            self.disconnect()
            log.info("%s: disconnected", self.backend_path)

    def fail(self, reason: str) -> None:
        """Give up on the frontend: disconnect, record ``reason`` and go to
        Closing (the frontend then closes; a frontend that initialises again
        gets a fresh connection)."""
        self.failure = reason
        log.error("%s: %s; disconnecting the frontend of domain %d", self.backend_path, reason, self.domid)
        self._do_disconnect()
        try:
            self.store.write(PRIV_DOMID, self.error_path, reason[:1024])
        except XenstoreError:
            pass
        if self.state not in (XenbusState.CLOSING, XenbusState.CLOSED):
            self._set_state(XenbusState.CLOSING)


__all__ = ["XenbusState", "BackendDevice", "DeviceError", "parse_state"]
