"""Debian's Linux 6.1 shows pvhvm in /sys/hypervisor as it shows Xen: type,
guest type, version, the domain's uuid (XENVER_guest_handle, and xenstore's
/vm/<uuid>/uuid behind it), compilation and properties, the feature submap,
and what Xen's default policy keeps from a domU (the build id). Like
test_linux.py, the first run downloads Debian packages."""

from __future__ import annotations

import uuid as uuidlib

import pytest

import pvhvm
from pvhvm.images import prepare_default_guest
from pvhvm.shell import GuestShell

pytestmark = pytest.mark.slow

UUID = uuidlib.UUID("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d")
# The XENFEAT bits Xen 4.19 gives a PVH domU: writable_page_tables,
# auto_translated_physmap, hvm_callback_vector, hvm_safe_pvclock,
# memory_op_vnode_supported, not_direct_mapped, runstate_phys_area,
# vcpu_time_phys_area, dm_msix_all_writes.
FEATURES = sum(1 << b for b in (0, 2, 8, 9, 13, 16, 18, 19, 20))


@pytest.fixture(scope="module")
def shell():
    guest = prepare_default_guest()
    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0 pvhvm.shell", memory_mib=256,
                       name="sysfs-test", uuid=UUID)
    dom.expect("PVHVM-INIT-OK", 600)
    dom.expect("# ", 60)
    sh = GuestShell(dom)
    yield dom, sh
    dom.send("poweroff -f\n")
    dom.run(timeout=60)


def read(sh: GuestShell, name: str) -> str:
    return sh.ok(f"cat /sys/hypervisor/{name}").strip()


def test_type_and_guest_type(shell):
    _, sh = shell
    assert read(sh, "type") == "xen"
    assert read(sh, "guest_type") == "PVH"


def test_version(shell):
    _, sh = shell
    assert read(sh, "version/major") == "4"
    assert read(sh, "version/minor") == "19"
    assert read(sh, "version/extra") == ".0-pvhvm"


def test_uuid_is_the_domains(shell):
    dom, sh = shell
    assert read(sh, "uuid") == str(UUID) == str(dom.uuid)
    # The same uuid in the store, where xl puts it (and Linux falls back to).
    assert dom.store.read(0, "/local/domain/1/vm") == f"/vm/{UUID}".encode()
    assert dom.store.read(0, f"/vm/{UUID}/uuid") == str(UUID).encode()
    assert dom.store.read(0, f"/vm/{UUID}/name") == b"sysfs-test"


def test_compilation(shell):
    _, sh = shell
    assert read(sh, "compilation/compiler").startswith("rustc (pvhvm ")
    assert read(sh, "compilation/compiled_by") == "pvhvm"
    sh.ok("cat /sys/hypervisor/compilation/compile_date")


def test_properties(shell):
    _, sh = shell
    assert read(sh, "properties/capabilities") == "hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64"
    assert read(sh, "properties/changeset") == "pvhvm"
    # HYPERVISOR_VIRT_START is for PV guests; an HVM guest reads 0.
    assert read(sh, "properties/virtual_start") == "0"
    assert read(sh, "properties/pagesize") == "1000"
    assert int(read(sh, "properties/features"), 16) == FEATURES


def test_build_id_is_denied(shell):
    # XENVER_build_id is -EPERM for a domU; Linux shows that as "<denied>".
    _, sh = shell
    assert read(sh, "properties/buildid") == "<denied>"
