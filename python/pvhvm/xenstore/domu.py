"""The xenstore tree xl/libxl writes for a PVH domU before it runs
(libxl__domain_make, libxl__build_post, the primary console device), with
the same permissions:

* ``RO``: ``[n<backend>, r<domid>]`` — owned by the toolstack, readable by
  the guest (the domain's home, cpu, memory, device, control, /vm/<uuid>,
  the console directory);
* ``RW``: ``[n<domid>]`` — owned, hence writable, by the guest
  (control/shutdown and the feature-* answers, control/sysrq, data, drivers,
  feature, attr, error, device/suspend/event-channel);
* ``FRONT``: ``[n<domid>, r<backend>]`` — a frontend node the guest owns and
  the backend reads (console/backend-id);
* ``NONE``: ``[n0]`` — toolstack private (/libxl/<domid>);
* no permission: the node inherits its parent's list (written by domain 0).

Everything is written by domain 0 in one transaction, as libxl does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from .store import PRIV_DOMID, Perms, Store, XenstoreError

RO = "ro"
RW = "rw"
FRONT = "front"
NONE = "none"

XENCONSOLE_LIMIT = 1048576  # LIBXL_XENCONSOLE_LIMIT
XENCONSOLE_PROTOCOL = "vt100"  # LIBXL_XENCONSOLE_PROTOCOL
XENBUS_STATE_INITIALISING = 1
LIBXL_MEMKB_DEFAULT = -1  # memory/videoram of a PVH guest


@dataclass(frozen=True)
class Entry:
    """One step. ``path`` is formatted with the fields of populate_domu()
    ({home}, {vm}, {libxl}, {console}, {backend}, …). ``value`` None means
    mkdir; ``perms`` None means inherit; ``rm`` removes the path first."""

    path: str
    value: Optional[str] = None
    perms: Optional[str] = None
    rm: bool = False


# libxl__domain_make()
DOMAIN_MAKE = (
    Entry("{home}", "", RO, rm=True),
    Entry("{vm}", "", RO, rm=True),
    Entry("{libxl}", "", NONE, rm=True),
    Entry("{libxl}/device", "", NONE),
    Entry("{home}/vm", "{vm}"),
    Entry("{home}/name", "{name}"),
    Entry("{home}/cpu", "", RO),
    Entry("{home}/memory", "", RO),
    Entry("{home}/device", "", RO),
    Entry("{home}/device/suspend/event-channel", "", RW),
    Entry("{home}/control", "", RO),
    Entry("{home}/control/shutdown", "", RW),
    Entry("{home}/control/feature-poweroff", "", RW),
    Entry("{home}/control/feature-reboot", "", RW),
    Entry("{home}/control/feature-suspend", "", RW),
    Entry("{home}/control/sysrq", "", RW),
    Entry("{home}/data", "", RW),
    Entry("{home}/drivers", "", RW),
    Entry("{home}/feature", "", RW),
    Entry("{home}/attr", "", RW),
    Entry("{home}/error", "", RW),
    Entry("{vm}/uuid", "{uuid}"),
    Entry("{vm}/name", "{name}"),
    Entry("{home}/control/platform-feature-multiprocessor-suspend", "1"),
    Entry("{home}/control/platform-feature-xs_reset_watches", "1"),
    Entry("{libxl}/type", "pvh"),
)

# libxl__build_post(); cpu/<n>/availability and store/* are added per call.
BUILD_POST = (
    Entry("{home}/memory/static-max", "{max_memory_kib}"),
    Entry("{home}/memory/target", "{target_kib}"),
    Entry("{home}/memory/videoram", "{videoram}"),
    Entry("{home}/domid", "{domid}"),
    Entry("{vm}/start_time", "{start_time}"),
)

STORE_ENTRIES = (
    Entry("{home}/store/port", "{store_port}"),
    Entry("{home}/store/ring-ref", "{store_ring_ref}"),
)

# libxl__device_console_add() + libxl__device_generic_add() for console 0.
CONSOLE = (
    Entry("{libxl}/device/console/0", rm=True),
    Entry("{libxl}/device/console/0/frontend", "{console}"),
    Entry("{libxl}/device/console/0/backend", "{backend}"),
    Entry("{console}", rm=True),
    Entry("{console}", None, RO),
    Entry("{console}/backend", "{backend}"),
    Entry("{console}/backend-id", "{backend_domid}", FRONT),
    Entry("{console}/limit", str(XENCONSOLE_LIMIT), RO),
    Entry("{console}/type", "xenconsoled", RO),
    Entry("{console}/output", "pty", RO),
    Entry("{console}/tty", "", RO),
    Entry("{console}/port", "{console_port}", RO),
    Entry("{console}/ring-ref", "{console_ring_ref}", RO),
    Entry("{backend}", rm=True),
    Entry("{backend}", None, RO),
    Entry("{backend}/frontend", "{console}"),
    Entry("{backend}/frontend-id", "{domid}"),
    Entry("{backend}/online", "1"),
    Entry("{backend}/state", str(XENBUS_STATE_INITIALISING)),
    Entry("{backend}/protocol", XENCONSOLE_PROTOCOL),
    Entry("{libxl}/device/console/0/frontend-id", "{domid}"),
    Entry("{libxl}/device/console/0/online", "1"),
    Entry("{libxl}/device/console/0/state", str(XENBUS_STATE_INITIALISING)),
    Entry("{libxl}/device/console/0/protocol", XENCONSOLE_PROTOCOL),
)


def _perms(kind: str, domid: int, backend_domid: int) -> Perms:
    if kind == RO:
        return (("n", backend_domid), ("r", domid))
    if kind == RW:
        return (("n", domid),)
    if kind == FRONT:
        return (("n", domid), ("r", backend_domid))
    if kind == NONE:
        return (("n", PRIV_DOMID),)
    raise ValueError(f"unknown permission kind {kind!r}")


def _run(store: Store, tx: int, entries, fields: dict, domid: int, backend_domid: int) -> None:
    for e in entries:
        path = e.path.format(**fields)
        if e.rm:
            try:
                store.rm(PRIV_DOMID, path, tx)
            except XenstoreError as err:  # libxl ignores ENOENT here
                if err.errno != "ENOENT":
                    raise
        if e.value is None and e.perms is None and e.rm:
            continue
        if e.value is None:
            store.mkdir(PRIV_DOMID, path, tx)
        else:
            store.write(PRIV_DOMID, path, e.value.format(**fields), tx)
        if e.perms is not None:
            # The home and /vm/<uuid> use the toolstack (dom0) as owner.
            backend = backend_domid if e.path.startswith(("{console}", "{backend}")) else PRIV_DOMID
            store.set_perms(PRIV_DOMID, path, _perms(e.perms, domid, backend), tx)


def populate_domu(
    store: Store,
    domid: int,
    name: str,
    uuid: str,
    memory_kib: int,
    vcpus: int,
    console_ring_ref: int,
    console_port: int,
    store_ring_ref: Optional[int] = None,
    store_port: Optional[int] = None,
    *,
    max_vcpus: Optional[int] = None,
    max_memory_kib: Optional[int] = None,
    target_kib: Optional[int] = None,
    start_time: Optional[float] = None,
    console_backend_domid: int = PRIV_DOMID,
    introduce: bool = True,
) -> None:
    """Write the xenstore entries xl writes for PVH domain ``domid``.

    ``vcpus`` are online, up to ``max_vcpus`` (default ``vcpus``) offline.
    ``store_ring_ref``/``store_port`` (the xenstore ring's frame and event
    channel) give the deprecated ~/store nodes when not None. With
    ``introduce`` the store then learns the domain (@introduceDomain), as
    xs_introduce_domain() does at the end of libxl's build."""
    if domid <= 0 or domid > 0x7FEF:
        raise ValueError(f"not a domU id: {domid}")
    max_vcpus = vcpus if max_vcpus is None else max_vcpus
    if not 0 < vcpus <= max_vcpus:
        raise ValueError("need 0 < vcpus <= max_vcpus")
    now = time.time() if start_time is None else start_time
    home = store.get_domain_path(domid)
    fields = {
        "domid": domid,
        "name": name,
        "uuid": uuid,
        "home": home,
        "vm": f"/vm/{uuid}",
        "libxl": f"/libxl/{domid}",
        "console": f"{home}/console",
        "backend": f"{store.get_domain_path(console_backend_domid)}/backend/console/{domid}/0",
        "backend_domid": console_backend_domid,
        "max_memory_kib": memory_kib if max_memory_kib is None else max_memory_kib,
        "target_kib": memory_kib if target_kib is None else target_kib,
        "videoram": LIBXL_MEMKB_DEFAULT,
        "start_time": f"{int(now)}.{int((now - int(now)) * 100):02d}",
        "console_port": console_port,
        "console_ring_ref": console_ring_ref,
        "store_port": store_port,
        "store_ring_ref": store_ring_ref,
    }
    post = list(BUILD_POST)
    if store_port is not None and store_ring_ref is not None:
        post += STORE_ENTRIES
    post += [
        Entry(f"{{home}}/cpu/{i}/availability", "online" if i < vcpus else "offline") for i in range(max_vcpus)
    ]

    def make(tx: int) -> None:
        _run(store, tx, DOMAIN_MAKE, fields, domid, console_backend_domid)

    def build_post(tx: int) -> None:
        _run(store, tx, post, fields, domid, console_backend_domid)

    def console(tx: int) -> None:
        _run(store, tx, CONSOLE, fields, domid, console_backend_domid)

    store.run_transaction(PRIV_DOMID, make)
    store.run_transaction(PRIV_DOMID, build_post)
    store.run_transaction(PRIV_DOMID, console)
    if introduce:
        store.introduce_domain(domid)
