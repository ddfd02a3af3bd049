"""The VM Generation ID (Microsoft's "Virtual Machine Generation ID" spec,
as Hyper-V and QEMU expose it): 16 random bytes in a guest page the OS does
not use as RAM, found through an ACPI device whose ``ADDR`` gives their
guest-physical address. A new ID tells the guest it was cloned or restored
from a snapshot (Linux's drivers/virt/vmgenid.c then reseeds its RNG).

The device's AML is in acpi.py; this module has its identifiers and the IDs."""

from __future__ import annotations

import os

GENERATION_ID_SIZE = 16

DEVICE_NAME = b"VGEN"
# The spec wants a _HID of the hypervisor vendor's own (QEMU's is
# "QEMUVGID"); ours has the form of an ACPI ID: a 4-character vendor part
# (the tables' creator ID) and 4 hex digits.
HARDWARE_ID = b"PVHV0001"
# The spec's _CID, which guests match: Windows as it is, Linux's vmgenid
# driver (drivers/virt/vmgenid.c, "VM_GEN_COUNTER" or "VMGENCTR") as
# "VM_GEN_COUNTER", since ACPICA upper-cases _HID and _CID strings when it
# evaluates them. One string, as QEMU has it: with a _CID package adding
# "VMGENCTR", ACPICA 20200925's acpiexec reports leaked objects at load.
COMPATIBLE_ID = b"VM_Gen_Counter"
DISPLAY_NAME = b"VM_Gen_Counter"  # _DDN, as the spec has it


def new_generation_id(other_than: bytes | None = None) -> bytes:
    """A random ID, never all zero (a zero ID is no ID) and never
    `other_than` (the one it replaces)."""
    while True:
        gen_id = os.urandom(GENERATION_ID_SIZE)
        if any(gen_id) and gen_id != other_than:
            return gen_id


__all__ = ["COMPATIBLE_ID", "DEVICE_NAME", "DISPLAY_NAME", "GENERATION_ID_SIZE", "HARDWARE_ID", "new_generation_id"]
