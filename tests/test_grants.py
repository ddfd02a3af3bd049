"""Grant tables from the device model's side, against a guest of our own
(tests/guests/grants.c) that grants pages to domain 0: v1 and v2 entries,
Xen's checks, mappings that hold the in-use flags."""

from __future__ import annotations

import re
import struct

import pytest

import pvhvm
from pvhvm import _core

GTF_READING = 1 << 3
GTF_WRITING = 1 << 4


def status_of(excinfo) -> str:
    return excinfo.value.args[0]


def test_grant_access_v1_and_v2(guests):
    dom = pvhvm.Domain(guests["grants"], memory_mib=32)
    vm = dom.backend_ops
    m = dom.expect(rb"PHASE1 a=0x([0-9a-f]+) b=0x([0-9a-f]+) table=0x([0-9a-f]+)", 30)
    table = int(m.group(3), 16) << 12

    assert vm.grant_read(8, 0, 13) == b"pvhvm-grant-A"
    assert vm.grant_read(9, 0, 13) == b"pvhvm-grant-B"
    with pytest.raises(_core.GrantError) as e:
        vm.grant_write(9, 0, b"nope")
    assert status_of(e) == "GNTST_permission_denied"
    for gref in (10, 11):  # granted to domain 5; not granted at all
        with pytest.raises(_core.GrantError) as e:
            vm.grant_read(gref, 0, 1)
        assert status_of(e) == "GNTST_permission_denied"
    with pytest.raises(_core.GrantError) as e:
        vm.grant_read(600, 0, 1)
    assert status_of(e) == "GNTST_bad_gntref"
    for off, n in ((4090, 10), (4096, 1), (2**63, 1)):
        with pytest.raises(_core.GrantError) as e:
            vm.grant_read(8, off, n)
        assert status_of(e) == "GNTST_bad_copy_arg"
    with pytest.raises(_core.GrantError):
        vm.grant_read(8, 0, 1, domid=3)

    # A writable mapping: the guest sees the entry in use until unmapped.
    mapping = vm.grant_map(8, writable=True)
    mv = memoryview(mapping)
    assert len(mv) == 4096 and not mv.readonly
    mv[100:104] = b"MAPD"
    flags, = struct.unpack_from("<H", dom.read_phys(table + 8 * 8, 2))
    assert flags & (GTF_READING | GTF_WRITING) == GTF_READING | GTF_WRITING
    ro = vm.grant_map(9)
    with memoryview(ro) as view:
        assert view.readonly
    vm.grant_unmap(ro)
    # A view must not outlive the mapping: unmapping is refused while one
    # (or a slice of it) is held, and the page stays mapped meanwhile.
    part = mv[8:16]
    mv.release()
    with pytest.raises(_core.GrantError, match="busy"):
        vm.grant_unmap(mapping)
    assert mapping.live and mapping.views == 1
    part.release()
    assert mapping.views == 0
    vm.grant_unmap(mapping)
    assert not mapping.live
    with pytest.raises(_core.GrantError):
        vm.grant_unmap(mapping)
    with pytest.raises(_core.GrantError):
        memoryview(mapping)
    vm.grant_write(8, 0, b"\x01")

    dom.expect(b"PHASE2", 30)
    assert vm.grant_table_info() == (2, 1, 1)
    vm.grant_write(12, 0x3F, b"x")  # last byte of the 0x40-byte window
    with pytest.raises(_core.GrantError) as e:
        vm.grant_write(12, 0x40, b"x")
    assert status_of(e) == "GNTST_bad_copy_arg"
    sub = vm.grant_map(12, writable=False)
    with memoryview(sub) as view:
        assert len(view) == 0x40
    vm.grant_unmap(sub)
    vm.grant_write(8, 0, b"\x02")

    outcome = dom.run(timeout=30)
    out = dom.console_output.decode()
    assert [line for line in out.splitlines() if line.startswith("FAIL")] == []
    assert re.search(r"^VERDICT: PASS", out, re.M), out
    assert outcome.exit_status == 0
