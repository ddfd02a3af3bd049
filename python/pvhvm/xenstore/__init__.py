"""A xenstore for domUs in pure Python, behaving like Xen's C xenstored.

* `Store` (store.py): the database — nodes, permissions, transactions,
  watches, quotas; no I/O.
* `wire` (wire.py): the message format and `handle()`, which answers one
  request against a Store.
* `RingConnection` (ring.py): serves a domain's xenstore ring page.
* `populate_domu` (domu.py): the tree xl writes for a PVH domU.
"""

from .domu import populate_domu
from .ring import RingConnection
from .socket import XenstoreSocketError, XenstoreSocketServer
from .store import (
    DOMID_ANY,
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    XSD_ERRORS,
    Store,
    XenstoreError,
)
from .wire import CLOSE, Message, XsType, handle

__all__ = [
    "Store",
    "XenstoreError",
    "XSD_ERRORS",
    "DOMID_ANY",
    "XENSTORE_PAYLOAD_MAX",
    "XENSTORE_ABS_PATH_MAX",
    "XENSTORE_REL_PATH_MAX",
    "Message",
    "XsType",
    "handle",
    "CLOSE",
    "RingConnection",
    "populate_domu",
    "XenstoreSocketServer",
    "XenstoreSocketError",
]
