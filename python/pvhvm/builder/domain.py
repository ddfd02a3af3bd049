"""The pure half of making a domain: from a kernel, an initrd and a few
numbers to everything that goes into guest RAM before the first
instruction, and the xenstore tree the toolstack writes. Nothing here
touches the core: `plan_domain` returns a `DomainPlan`, and
`pvhvm.Domain` loads it (`DomainPlan.load`) into a fresh `Vm`.

The phases, as xl's domain builder has them: parse the image (its PVH
entry note), lay out guest-physical memory (kernel segments, then Xen's
own pages at the top of low RAM: console ring, xenstore ring, ACPI
tables, the VM generation ID), place the initrd, build hvm_start_info
and the E820 map.
Each failure is a `BuildError` naming the input at fault.
"""

from __future__ import annotations

import mmap
import os
import stat
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildError
from ..xenstore import Store, populate_domu
from .acpi import build_acpi_tables
from .elf import ElfImage, load_elf
from .layout import E820_ACPI, E820_RESERVED, PhysLayout
from .start_info import PlacedModule, build_start_info
from .vmgenid import new_generation_id

PAGE = 4096

# HVM_PARAM_* the toolstack sets (hvm/params.h).
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_STORE_EVTCHN = 2
HVM_PARAM_CONSOLE_PFN = 17
HVM_PARAM_CONSOLE_EVTCHN = 18


@dataclass
class Placement:
    """Where the builder put things, guest-physical."""

    kernel_range: tuple[int, int]
    initrd: PlacedModule | None = None
    start_info: int = 0
    entry: int = 0
    acpi: int = 0
    rsdp: int = 0
    console_ring: int = 0
    store_ring: int = 0
    generation_id: int = 0  # where the VM generation ID's 16 bytes are
    extra: dict = field(default_factory=dict)


@dataclass
class DomainPlan:
    """A domain ready to load: what goes where in guest RAM, and the rest
    of what the toolstack hands the hypervisor."""

    image: ElfImage
    memory_bytes: int
    vcpus: int
    cmdline: str
    layout: PhysLayout
    placement: Placement
    # (guest-physical address, bytes) in load order: segments, initrd,
    # start_info and its strings, ACPI tables, the VM generation ID.
    blobs: list[tuple[int, bytes]]
    # xl's memory (the balloon's first target); memory_bytes is maxmem.
    target_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.target_bytes:
            self.target_bytes = self.memory_bytes

    @property
    def memory_map(self) -> list[tuple[int, int, int]]:
        return self.layout.memory_map()

    def load(self, vm) -> None:
        """Write the plan into a fresh core (`pvhvm._core.Vm`): RAM, the
        E820 map, vCPU 0 at the PVH entry, the rings' HVM params."""
        for paddr, blob in self.blobs:
            vm.write_phys(paddr, blob)
        vm.set_memory_map(self.memory_map)
        vm.set_pvh_entry(self.placement.entry, self.placement.start_info)
        vm.set_hvm_param(HVM_PARAM_CONSOLE_PFN, self.placement.console_ring // PAGE)
        vm.set_hvm_param(HVM_PARAM_STORE_PFN, self.placement.store_ring // PAGE)

    def populate_store(self, store: Store, *, domid: int, name: str, uuid: uuidlib.UUID, console_port: int,
                       store_port: int) -> None:
        """The xenstore tree xl writes before the domain runs."""
        populate_domu(store, domid, name, str(uuid), memory_kib=self.memory_bytes >> 10, vcpus=self.vcpus,
                      max_memory_kib=self.memory_bytes >> 10, target_kib=self.target_bytes >> 10,
                      console_ring_ref=self.placement.console_ring // PAGE, console_port=console_port,
                      store_ring_ref=self.placement.store_ring // PAGE, store_port=store_port)


def plan_domain(kernel: str | os.PathLike, initrd: str | os.PathLike | None = None, cmdline: str = "",
                memory_mib: int = 256, vcpus: int = 1, maxmem_mib: int | None = None) -> DomainPlan:
    """Lay out a PVH domain (see the module doc). Raises BuildError.

    `maxmem_mib` (xl's maxmem) above `memory_mib`: the guest's RAM and
    memory map are maxmem, and memory/target in xenstore asks its balloon
    driver to give back the rest, as xl does for an HVM guest (whose pages
    Xen populates on demand until then; here the host's are lazy anyway)."""
    for what, mib in (("memory", memory_mib), ("maxmem", memory_mib if maxmem_mib is None else maxmem_mib)):
        if isinstance(mib, bool) or not isinstance(mib, int) or mib <= 0:
            raise BuildError(f"{what} must be a positive number of MiB, not {mib!r}")
    if maxmem_mib is None:
        maxmem_mib = memory_mib
    if maxmem_mib < memory_mib:
        raise BuildError(f"maxmem ({maxmem_mib} MiB) is below memory ({memory_mib} MiB)")
    target_bytes = memory_mib << 20
    memory_mib = maxmem_mib
    image = load_elf(kernel)
    entry = image.phys32_entry
    if entry is None:
        inside = " in this bzImage's vmlinux" if image.compression else ""
        raise BuildError(f"{image.path}: no PVH entry point{inside} (ELF note XEN_ELFNOTE_PHYS32_ENTRY); "
                         "is the kernel built with CONFIG_XEN_PVH?")
    memory_bytes = memory_mib << 20
    layout = PhysLayout(memory_bytes)
    for i, seg in enumerate(image.segments):
        layout.reserve(seg.paddr, seg.memsz, f"kernel segment {i}")
    placement = Placement(image.phys_range, entry=entry)
    # Xen's pages first, at the top of low RAM and out of the guest's RAM map.
    placement.console_ring = layout.carve(PAGE, "console ring")
    placement.store_ring = layout.carve(PAGE, "xenstore ring")
    placement.acpi = layout.carve(PAGE, "ACPI tables", E820_ACPI)
    # The spec wants the ID where the OS keeps no RAM, not even ACPI
    # reclaimable memory: a reserved page of its own.
    placement.generation_id = layout.carve(PAGE, "VM generation ID", E820_RESERVED)
    acpi = build_acpi_tables(placement.acpi, nr_vcpus=vcpus, gen_id_paddr=placement.generation_id)
    placement.rsdp = acpi.rsdp_paddr

    blobs = [(seg.paddr, image.segment_bytes(seg)) for seg in image.segments if seg.filesz]
    if initrd is not None:
        data = map_input(initrd, "initrd", memory_bytes)
        if not len(data):
            raise BuildError(f"{initrd}: initrd is empty")
        paddr = layout.allocate(len(data), "initrd", top_down=True)
        placement.initrd = PlacedModule(paddr, len(data))
        blobs.append((paddr, data))
    boot = build_start_info(layout, cmdline, [placement.initrd] if placement.initrd else [], placement.rsdp)
    placement.start_info = boot.start_info_paddr
    blobs += list(boot.blobs)
    blobs.append((placement.acpi, acpi.blob))
    blobs.append((placement.generation_id, new_generation_id()))
    return DomainPlan(image, memory_bytes, vcpus, cmdline, layout, placement, blobs, target_bytes)


def map_input(path: str | os.PathLike, what: str, most: int) -> bytes | mmap.mmap:
    """An input file of at most `most` bytes, mapped (a regular file: its
    size is checked before anything is read, and only what is copied into
    guest RAM is ever read) or read (a pipe or device, up to one byte past
    `most`), or a one-line BuildError saying why not."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode):
                if st.st_size > most:
                    raise _too_big(p, what, f"{st.st_size >> 20} MiB", most)
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else b""
            data = f.read(most + 1)
            if len(data) > most:
                raise _too_big(p, what, "more", most)
            return data
    except FileNotFoundError:
        raise BuildError(f"{p}: no such {what} file") from None
    except IsADirectoryError:
        raise BuildError(f"{p}: {what} is a directory") from None
    except OSError as e:
        raise BuildError(f"{p}: cannot read {what}: {e.strerror}") from None


def _too_big(path: Path, what: str, size: str, most: int) -> BuildError:
    return BuildError(f"{path}: {what} ({size}) does not fit in guest RAM ({most >> 20} MiB)")


__all__ = ["DomainPlan", "Placement", "plan_domain", "map_input"]
