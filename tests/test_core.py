"""The Rust core through its Python face: RAM, bounds, the self-test."""

from __future__ import annotations

import pytest

import pvhvm
from pvhvm import _core


def test_self_test_reports_blob_offsets():
    offs = pvhvm.self_test()
    assert set(offs) == {"data_offset", "error_code", "exception_is_int", "old_exception", "xcr0", "tsc_offset"}
    assert offs["exception_is_int"] == offs["error_code"] + 4
    # XCR0 sits in CPUX86State before the exception bookkeeping, after the registers.
    assert 8 * 16 < offs["xcr0"] < offs["error_code"]


def test_guest_ram_is_zero_copy():
    vm = _core.Vm(32 << 20)
    mv = memoryview(vm.memory)
    assert mv.nbytes == 32 << 20 and not mv.readonly
    mv[0x5000:0x5004] = b"pvhm"
    assert vm.read_phys(0x5000, 4) == b"pvhm"
    vm.write_phys(0x6000, b"xyz")
    assert bytes(mv[0x6000:0x6003]) == b"xyz"
    assert vm.ram_regions() == [(0, 32 << 20, 0)]


def test_ram_above_the_hole():
    vm = _core.Vm(_core.MMIO_HOLE_START + (16 << 20))
    regions = vm.ram_regions()
    assert regions[1] == (_core.HIGH_RAM_START, 16 << 20, _core.MMIO_HOLE_START)
    vm.write_phys(_core.HIGH_RAM_START + 8, b"high")
    assert bytes(memoryview(vm.memory)[_core.MMIO_HOLE_START + 8 : _core.MMIO_HOLE_START + 12]) == b"high"
    with pytest.raises(_core.CoreError):
        vm.read_phys(_core.MMIO_HOLE_START, 1)


@pytest.mark.parametrize("gpa, n", [(32 << 20, 1), ((32 << 20) - 2, 4), (2**64 - 1, 2)])
def test_phys_access_is_bounds_checked(gpa, n):
    vm = _core.Vm(32 << 20)
    with pytest.raises(_core.CoreError):
        vm.read_phys(gpa, n)
    with pytest.raises((_core.CoreError, OverflowError)):
        vm.write_phys(gpa, b"x" * n)


@pytest.mark.parametrize("size", [0, 4095, 1 << 40])
def test_bad_vm_sizes(size):
    with pytest.raises(_core.CoreError):
        _core.Vm(size)


def test_registers_at_pvh_entry():
    vm = _core.Vm(32 << 20)
    vm.set_pvh_entry(0x100000, 0x2000)
    regs = vm.registers()
    assert regs["rip"] == 0x100000 and regs["rbx"] == 0x2000
    assert regs["cr0"] & 1 and not regs["cr0"] & (1 << 31)  # protected mode, paging off
    assert regs["cs"] == 0x08 and regs["cpl"] == 0 and regs["efer"] == 0
    assert regs["rflags"] == 0x2


def test_fetch_from_unbacked_memory_is_an_error_exit():
    vm = _core.Vm(32 << 20)
    vm.write_phys(0x100000, b"\xe9" + (0x7000_0000 - 0x100005).to_bytes(4, "little"))  # jmp to 1.75 GiB
    vm.set_pvh_entry(0x100000, 0x2000)
    ex = vm.run()
    assert ex.kind == "error" and "unbacked" in ex.message and "0x70000000" in ex.message


def test_type_stub_matches_the_core():
    """_core.pyi names exactly what the extension has (a poor man's stubtest:
    every stubbed class and member exists, and no public member is unstubbed)."""
    import ast
    from pathlib import Path

    from pvhvm import _core

    stub = ast.parse((Path(_core.__file__).parent / "_core.pyi").read_text())
    problems = []
    for node in stub.body:
        if not isinstance(node, ast.ClassDef) or node.name == "VcpuStatus":  # a TypedDict, stub-only
            continue
        runtime = getattr(_core, node.name, None)
        if runtime is None:
            problems.append(f"class {node.name} missing")
            continue
        stubbed = {getattr(f, "name", None) or f.target.id for f in node.body
                   if isinstance(f, (ast.FunctionDef, ast.AnnAssign))}
        problems += [f"{node.name}.{n} missing" for n in stubbed if not n.startswith("__") and not hasattr(runtime, n)]
        if not issubclass(runtime, BaseException):
            problems += [f"{node.name}.{n} not stubbed" for n in dir(runtime)
                         if not n.startswith("_") and n not in stubbed]
    assert problems == []
