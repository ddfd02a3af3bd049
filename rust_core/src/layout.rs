//! Every fixed guest-physical address in one place.

use crate::memory::RamRegion;

pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_SHIFT: u32 = 12;

/// RAM above this goes above 4 GiB; the hole holds the LAPIC, IOAPIC and
/// friends, as on a PC (and as Xen lays out an HVM/PVH domain).
pub const MMIO_HOLE_START: u64 = 0xF000_0000;
pub const HIGH_RAM_START: u64 = 1 << 32;
/// A page of the MMIO hole the vCPUs' interrupt line acknowledges through
/// (`unicorn_gaps::InterruptLine`); a guest read of it gets 0x1000 and
/// changes nothing.
pub const INTERRUPT_ACK_PAGE: u64 = 0xFEF0_0000;
/// Largest guest we agree to build (the host buffer is lazily committed).
pub const MAX_RAM: u64 = 64 << 30;
/// The top of guest-physical space the engine maps (RAM, or all ones).
pub const GUEST_PHYS_END: u64 = HIGH_RAM_START + MAX_RAM;
/// The top of guest-physical space Xen's p2m can map a page at (its EPT
/// and NPT tables have four levels): Xen's pages placed by the guest
/// (grant frames) may be up to here, above GUEST_PHYS_END too.
pub const P2M_PHYS_END: u64 = 1 << 48;

/// The page the PVH entry state is built in: a GDT and a 32-bit TSS, as Xen
/// gives them (the guest must load its own GDT before relying on it).
pub const BOOT_GDT: u64 = 0x1000;
pub const BOOT_TSS: u64 = 0x1800;

/// Where the domain builder may start placing start_info, the memory map and
/// command lines (below the kernel, never in frame 0).
pub const BOOT_INFO_START: u64 = 0x2000;

/// ACPI hardware-reduced sleep registers (FADT SLEEP_CONTROL_REG and
/// SLEEP_STATUS_REG), at the I/O ports Xen uses for PM1a control and status.
/// Writing SLP_TYP=5 with SLP_EN is the guest's ACPI power-off (S5).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0xB004;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0xB000;
/// The S5 sleep type the DSDT's \_S5 package gives.
pub const ACPI_SLP_TYP_S5: u32 = 5;
/// The PC reset control register, which the FADT's RESET_REG names:
/// writing RESET_VALUE (6: reset the CPU, full reset) reboots.
pub const RESET_CONTROL_PORT: u16 = 0xCF9;
pub const RESET_VALUE: u8 = 6;

pub fn ram_regions(size: u64) -> Vec<RamRegion> {
    if size <= MMIO_HOLE_START {
        vec![RamRegion { gpa: 0, len: size, host_offset: 0 }]
    } else {
        vec![
            RamRegion { gpa: 0, len: MMIO_HOLE_START, host_offset: 0 },
            RamRegion {
                gpa: HIGH_RAM_START,
                len: size - MMIO_HOLE_START,
                host_offset: MMIO_HOLE_START,
            },
        ]
    }
}
