"""Guest-physical placement: which ranges are RAM, which are taken, and where
the next blob fits. The fixed addresses come from the Rust core (`layout.rs`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import _core
from ..errors import BuildError

PAGE = _core.PAGE_SIZE

# E820 / hvm_memmap_table_entry types.
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3

# The legacy VGA/BIOS window: not RAM on a PC, and Linux expects it so.
LEGACY_HOLE = (0xA0000, 0x100000)


def align_up(x: int, a: int = PAGE) -> int:
    return (x + a - 1) & ~(a - 1)


@dataclass
class PhysLayout:
    """RAM of `memory_bytes`, split around the MMIO hole like the core's.

    Pages that hold Xen's special pages (console and xenstore rings) or ACPI
    tables are carved out of the guest's memory map (`carve`), so the guest
    never takes them for free RAM."""

    memory_bytes: int
    used: list[tuple[int, int, str]] = field(default_factory=list)
    carved: list[tuple[int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or self.memory_bytes % PAGE:
            raise BuildError(f"memory size {self.memory_bytes} is not a positive multiple of 4 KiB")
        if self.memory_bytes > _core.MAX_RAM:
            raise BuildError(f"memory size {self.memory_bytes >> 20} MiB is over the {_core.MAX_RAM >> 30} GiB limit")
        if self.memory_bytes < 16 << 20:
            raise BuildError(f"memory size {self.memory_bytes >> 20} MiB is too small (16 MiB at least)")
        self.reserve(0, PAGE, "frame 0")
        self.reserve(_core.BOOT_GDT, PAGE, "boot GDT/TSS")
        self.reserve(LEGACY_HOLE[0], LEGACY_HOLE[1] - LEGACY_HOLE[0], "legacy hole")

    @property
    def ram(self) -> list[tuple[int, int]]:
        """[(start, end)] of guest-physical RAM."""
        low = min(self.memory_bytes, _core.MMIO_HOLE_START)
        out = [(0, low)]
        if self.memory_bytes > low:
            out.append((_core.HIGH_RAM_START, _core.HIGH_RAM_START + self.memory_bytes - low))
        return out

    def is_ram(self, start: int, size: int) -> bool:
        return any(s <= start and start + size <= e for s, e in self.ram)

    def overlaps(self, start: int, size: int) -> str | None:
        for s, n, what in self.used:
            if start < s + n and s < start + size:
                return what
        return None

    def reserve(self, start: int, size: int, what: str) -> None:
        if size <= 0:
            return
        if not self.is_ram(start, size):
            raise BuildError(f"{what} at {start:#x}-{start + size:#x} lies outside guest RAM")
        other = self.overlaps(start, size)
        if other:
            raise BuildError(f"{what} at {start:#x}-{start + size:#x} overlaps {other}")
        self.used.append((start, size, what))

    def free_gaps(self, below: int = 1 << 64) -> list[tuple[int, int]]:
        """[(start, end)] of RAM not yet used, in address order."""
        gaps = []
        taken = sorted((us, us + un) for us, un, _ in self.used)
        for s, e in self.ram:
            e = min(e, below)
            cur = s
            for us, ue in taken:
                if ue <= cur or us >= e:
                    continue
                if us > cur:
                    gaps.append((cur, us))
                cur = max(cur, ue)
            if cur < e:
                gaps.append((cur, e))
        return gaps

    def allocate(self, size: int, what: str, *, top_down: bool = False, below: int = 1 << 32) -> int:
        """Reserve a page-aligned free range of `size` bytes: the lowest one,
        or with `top_down` the highest one below `below`."""
        size = align_up(max(size, 1))
        gaps = self.free_gaps(below)
        for gs, ge in reversed(gaps) if top_down else gaps:
            start = (ge - size) & ~(PAGE - 1) if top_down else align_up(gs)
            if gs <= start and start + size <= ge:
                self.used.append((start, size, what))
                return start
        raise BuildError(f"{what} ({size >> 10} KiB) does not fit in guest RAM")

    def carve(self, size: int, what: str, kind: int = E820_RESERVED) -> int:
        """Take `size` bytes from the top of low RAM out of the guest's RAM:
        they appear in the memory map as `kind` (reserved, ACPI …)."""
        start = self.allocate(size, what, top_down=True)
        self.carved.append((start, align_up(size), kind))
        return start

    def memory_map(self) -> list[tuple[int, int, int]]:
        """The E820-style map the guest is given: [(addr, size, type)], sorted,
        with the legacy hole and carved pages punched out of RAM."""
        holes = sorted([(LEGACY_HOLE[0], LEGACY_HOLE[1] - LEGACY_HOLE[0], E820_RESERVED), *self.carved])
        out = []
        for s, e in self.ram:
            cur = s
            for hs, hn, kind in holes:
                if hs >= e or hs + hn <= s:
                    continue
                if hs > cur:
                    out.append((cur, hs - cur, E820_RAM))
                out.append((hs, hn, kind))
                cur = hs + hn
            if cur < e:
                out.append((cur, e - cur, E820_RAM))
        return out
