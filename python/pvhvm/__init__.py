"""pvhvm: a Xen hypervisor in user space for PVH guests, on Unicorn.

The public API is `Domain` (build and run a guest), its `Outcome`, and the
error classes. `pvhvm._core` is the Rust core and not part of the API.
"""

from ._core import CoreError
from .api import MAX_VCPUS, Domain, HypercallRecord, Outcome, OutcomeKind, ShutdownReason, self_test
from .errors import BuildError, GuestError, PvhvmError
from .shell import GuestShell
from .toolstack import DomainHandle, ToolstackError, connect, create, list_domains

__version__ = "0.1.0"

__all__ = [
    "Domain",
    "MAX_VCPUS",
    "Outcome",
    "OutcomeKind",
    "ShutdownReason",
    "HypercallRecord",
    "GuestShell",
    "connect",
    "create",
    "list_domains",
    "DomainHandle",
    "ToolstackError",
    "self_test",
    "PvhvmError",
    "BuildError",
    "GuestError",
    "CoreError",
    "__version__",
]
