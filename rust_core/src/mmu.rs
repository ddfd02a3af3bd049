//! The guest page walk: guest-linear to guest-physical, with the checks the
//! processor makes (present, write, user, NX, reserved bits) and the
//! accessed/dirty bits it sets. Pure over `PhysMem`, so it is tested on a
//! vector with hand-built page tables.
//!
//! Modes: paging off, 32-bit 2-level (PSE 4 MiB pages), PAE 3-level, and
//! IA-32e 4-level with 2 MiB and 1 GiB pages. LA57 is not offered in CPUID.

use crate::memory::{MemError, PhysMem};

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;

const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_NX: u64 = 1 << 63;
/// Physical address width we report in CPUID 0x80000008.
pub const PHYS_ADDR_BITS: u32 = 40;
const ADDR_MASK: u64 = ((1u64 << PHYS_ADDR_BITS) - 1) & !0xfff;

/// #PF error code bits.
pub const PFEC_PRESENT: u32 = 1 << 0;
pub const PFEC_WRITE: u32 = 1 << 1;
pub const PFEC_USER: u32 = 1 << 2;
pub const PFEC_RSVD: u32 = 1 << 3;
pub const PFEC_FETCH: u32 = 1 << 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Fetch,
}

/// The control registers that decide how linear addresses translate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PagingState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl PagingState {
    pub fn long_mode(&self) -> bool {
        self.efer & EFER_LMA != 0
    }
    pub fn paging(&self) -> bool {
        self.cr0 & CR0_PG != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// Deliver #PF with this error code (CR2 = the linear address).
    PageFault { addr: u64, error_code: u32 },
    /// A non-canonical address: #GP(0) (or #SS) on hardware.
    NonCanonical(u64),
    /// A page-table entry points outside RAM.
    Phys(MemError),
}

impl From<MemError> for WalkError {
    fn from(e: MemError) -> Self {
        WalkError::Phys(e)
    }
}

pub fn is_canonical(va: u64) -> bool {
    let top = (va as i64) >> 47;
    top == 0 || top == -1
}

/// Translate `va` for an access of `kind`, made with user privileges if
/// `user`. On success the A (and, for writes, D) bits are set.
pub fn translate<M: PhysMem + ?Sized>(
    mem: &mut M,
    ps: &PagingState,
    va: u64,
    kind: Access,
    user: bool,
) -> Result<u64, WalkError> {
    if !ps.paging() {
        return Ok(if ps.long_mode() { va } else { va & 0xffff_ffff });
    }
    let nxe = ps.efer & EFER_NXE != 0;
    let mut pfec = match kind {
        Access::Write => PFEC_WRITE,
        Access::Fetch if nxe => PFEC_FETCH,
        _ => 0,
    };
    if user {
        pfec |= PFEC_USER;
    }
    let fault = |extra: u32| WalkError::PageFault { addr: va, error_code: pfec | extra };

    // (entry address, entry value, is 8-byte entry) for A/D updates.
    let mut used: [(u64, u64, bool); 4] = [(0, 0, true); 4];
    let mut nused = 0;
    let (mut rw, mut us, mut nx) = (true, true, false);
    let gpa;

    if ps.long_mode() {
        if !is_canonical(va) {
            return Err(WalkError::NonCanonical(va));
        }
        let mut table = ps.cr3 & ADDR_MASK;
        let mut level = 4;
        loop {
            let shift = 12 + 9 * (level - 1);
            let idx = (va >> shift) & 0x1ff;
            let ea = table + idx * 8;
            let e = mem.read_u64(ea)?;
            if e & PTE_P == 0 {
                return Err(fault(0));
            }
            if (!nxe && e & PTE_NX != 0) || e & !(ADDR_MASK | 0xfff | PTE_NX) & ((1 << 52) - 1) != 0 {
                return Err(fault(PFEC_PRESENT | PFEC_RSVD));
            }
            rw &= e & PTE_RW != 0;
            us &= e & PTE_US != 0;
            nx |= nxe && e & PTE_NX != 0;
            used[nused] = (ea, e, true);
            nused += 1;
            let large = e & PTE_PS != 0;
            if large && level == 4 {
                return Err(fault(PFEC_PRESENT | PFEC_RSVD));
            }
            if level == 1 || large {
                let page_mask = (1u64 << shift) - 1;
                if large && (e & ADDR_MASK) & page_mask & !0x1000 != 0 {
                    // Bits between 12 and the page size must be zero (bit 12 is PAT).
                    return Err(fault(PFEC_PRESENT | PFEC_RSVD));
                }
                let base = e & ADDR_MASK & !page_mask;
                gpa = base | (va & page_mask);
                break;
            }
            table = e & ADDR_MASK;
            level -= 1;
        }
    } else if ps.cr4 & CR4_PAE != 0 {
        let va32 = va & 0xffff_ffff;
        let pdpte_addr = (ps.cr3 & 0xffff_ffe0) + ((va32 >> 30) & 3) * 8;
        let pdpte = mem.read_u64(pdpte_addr)?;
        if pdpte & PTE_P == 0 {
            return Err(fault(0));
        }
        let mut table = pdpte & ADDR_MASK;
        let mut level = 2;
        loop {
            let shift = 12 + 9 * (level - 1);
            let ea = table + ((va32 >> shift) & 0x1ff) * 8;
            let e = mem.read_u64(ea)?;
            if e & PTE_P == 0 {
                return Err(fault(0));
            }
            if !nxe && e & PTE_NX != 0 {
                return Err(fault(PFEC_PRESENT | PFEC_RSVD));
            }
            rw &= e & PTE_RW != 0;
            us &= e & PTE_US != 0;
            nx |= nxe && e & PTE_NX != 0;
            used[nused] = (ea, e, true);
            nused += 1;
            let large = level == 2 && e & PTE_PS != 0;
            if level == 1 || large {
                let page_mask = (1u64 << shift) - 1;
                gpa = (e & ADDR_MASK & !page_mask) | (va32 & page_mask);
                break;
            }
            table = e & ADDR_MASK;
            level -= 1;
        }
    } else {
        let va32 = va & 0xffff_ffff;
        let pde_addr = (ps.cr3 & 0xffff_f000) + (va32 >> 22) * 4;
        let pde = mem.read_u32(pde_addr)? as u64;
        if pde & PTE_P == 0 {
            return Err(fault(0));
        }
        rw &= pde & PTE_RW != 0;
        us &= pde & PTE_US != 0;
        used[nused] = (pde_addr, pde, false);
        nused += 1;
        if pde & PTE_PS != 0 && ps.cr4 & CR4_PSE != 0 {
            // 4 MiB page; bits 20:13 of the entry give physical bits 39:32.
            let hi = ((pde >> 13) & 0xff) << 32;
            gpa = hi | (pde & 0xffc0_0000) | (va32 & 0x3f_ffff);
        } else {
            let pte_addr = (pde & 0xffff_f000) + ((va32 >> 12) & 0x3ff) * 4;
            let pte = mem.read_u32(pte_addr)? as u64;
            if pte & PTE_P == 0 {
                return Err(fault(0));
            }
            rw &= pte & PTE_RW != 0;
            us &= pte & PTE_US != 0;
            used[nused] = (pte_addr, pte, false);
            nused += 1;
            gpa = (pte & 0xffff_f000) | (va32 & 0xfff);
        }
    }

    // Permission checks on the combined rights.
    if user && !us {
        return Err(fault(PFEC_PRESENT));
    }
    if kind == Access::Write && !rw && (user || ps.cr0 & CR0_WP != 0) {
        return Err(fault(PFEC_PRESENT));
    }
    if kind == Access::Fetch && nx {
        return Err(fault(PFEC_PRESENT));
    }

    // Accessed on every entry used, dirty on the leaf for writes.
    for (i, &(ea, e, wide)) in used[..nused].iter().enumerate() {
        let mut ne = e | PTE_A;
        if i == nused - 1 && kind == Access::Write {
            ne |= PTE_D;
        }
        if ne != e {
            if wide {
                mem.write_u64(ea, ne)?;
            } else {
                mem.write_u32(ea, ne as u32)?;
            }
        }
    }
    Ok(gpa)
}

/// Copy from guest-linear memory, page by page.
pub fn read_linear<M: PhysMem + ?Sized>(
    mem: &mut M,
    ps: &PagingState,
    va: u64,
    buf: &mut [u8],
    user: bool,
) -> Result<(), WalkError> {
    let mut done = 0usize;
    while done < buf.len() {
        let cur = va.wrapping_add(done as u64);
        let chunk = ((0x1000 - (cur & 0xfff)) as usize).min(buf.len() - done);
        let gpa = translate(mem, ps, cur, Access::Read, user)?;
        mem.read_phys(gpa, &mut buf[done..done + chunk])?;
        done += chunk;
    }
    Ok(())
}

/// Copy into guest-linear memory. Every page is translated (and checked)
/// before the first byte is written, so a fault leaves memory untouched.
pub fn write_linear<M: PhysMem + ?Sized>(
    mem: &mut M,
    ps: &PagingState,
    va: u64,
    data: &[u8],
    user: bool,
) -> Result<(), WalkError> {
    let mut pieces: Vec<(u64, usize, usize)> = Vec::with_capacity(2);
    let mut done = 0usize;
    while done < data.len() {
        let cur = va.wrapping_add(done as u64);
        let chunk = ((0x1000 - (cur & 0xfff)) as usize).min(data.len() - done);
        let gpa = translate(mem, ps, cur, Access::Write, user)?;
        pieces.push((gpa, done, chunk));
        done += chunk;
    }
    for (gpa, off, len) in pieces {
        mem.write_phys(gpa, &data[off..off + len])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PTE_P;
    const W: u64 = PTE_RW;
    const U: u64 = PTE_US;

    /// 4-level tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT).
    fn long_mode_mem() -> (Vec<u8>, PagingState) {
        let mut m = vec![0u8; 0x40_0000];
        m.write_u64(0x1000, 0x2000 | P | W | U).unwrap();
        m.write_u64(0x2000, 0x3000 | P | W | U).unwrap();
        // PD[0] -> PT; PD[1] -> 2 MiB page at 0x200000, supervisor only.
        m.write_u64(0x3000, 0x4000 | P | W | U).unwrap();
        m.write_u64(0x3008, 0x20_0000 | P | W | PTE_PS).unwrap();
        // PT[5]: user RW page at 0x5000; PT[6]: user read-only; PT[7]: NX; PT[8] absent.
        m.write_u64(0x4000 + 5 * 8, 0x5000 | P | W | U).unwrap();
        m.write_u64(0x4000 + 6 * 8, 0x6000 | P | U).unwrap();
        m.write_u64(0x4000 + 7 * 8, 0x7000 | P | W | U | PTE_NX).unwrap();
        let ps = PagingState {
            cr0: CR0_PE | CR0_PG | CR0_WP,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA | EFER_NXE,
        };
        (m, ps)
    }

    #[test]
    fn paging_off_is_identity() {
        let mut m = vec![0u8; 16];
        let ps = PagingState { cr0: CR0_PE, ..Default::default() };
        assert_eq!(translate(&mut m, &ps, 0x1_2345_6789, Access::Read, false), Ok(0x2345_6789));
    }

    #[test]
    fn four_level_4k_and_2m() {
        let (mut m, ps) = long_mode_mem();
        assert_eq!(translate(&mut m, &ps, 0x5123, Access::Read, true), Ok(0x5123));
        assert_eq!(translate(&mut m, &ps, 0x20_1234, Access::Write, false), Ok(0x20_1234));
        // Accessed set on all levels, dirty on the 2 MiB leaf.
        assert_ne!(m.read_u64(0x1000).unwrap() & PTE_A, 0);
        assert_ne!(m.read_u64(0x3008).unwrap() & PTE_D, 0);
        assert_eq!(m.read_u64(0x4000 + 5 * 8).unwrap() & PTE_D, 0);
    }

    #[test]
    fn one_gib_page() {
        let (mut m, ps) = long_mode_mem();
        m.write_u64(0x2008, 0x4000_0000 | P | W | PTE_PS).unwrap();
        assert_eq!(translate(&mut m, &ps, 0x4012_3456, Access::Read, false), Ok(0x4012_3456));
        // A misaligned 1 GiB frame is a reserved-bit fault.
        m.write_u64(0x2010, 0x8020_0000 | P | W | PTE_PS).unwrap();
        assert!(matches!(
            translate(&mut m, &ps, 0x8000_0000, Access::Read, false),
            Err(WalkError::PageFault { error_code, .. }) if error_code & PFEC_RSVD != 0
        ));
    }

    #[test]
    fn fault_codes() {
        let (mut m, ps) = long_mode_mem();
        let pf = |r: Result<u64, WalkError>| match r {
            Err(WalkError::PageFault { error_code, .. }) => error_code,
            other => panic!("expected #PF, got {other:?}"),
        };
        assert_eq!(pf(translate(&mut m, &ps, 0x8000, Access::Read, false)), 0);
        assert_eq!(pf(translate(&mut m, &ps, 0x8000, Access::Write, true)), PFEC_WRITE | PFEC_USER);
        assert_eq!(
            pf(translate(&mut m, &ps, 0x6000, Access::Write, false)),
            PFEC_PRESENT | PFEC_WRITE
        );
        assert_eq!(
            pf(translate(&mut m, &ps, 0x20_0000, Access::Read, true)),
            PFEC_PRESENT | PFEC_USER
        );
        assert_eq!(
            pf(translate(&mut m, &ps, 0x7000, Access::Fetch, false)),
            PFEC_PRESENT | PFEC_FETCH
        );
        assert!(translate(&mut m, &ps, 0x7000, Access::Read, true).is_ok());
    }

    #[test]
    fn write_protect_off_lets_supervisor_write() {
        let (mut m, mut ps) = long_mode_mem();
        ps.cr0 &= !CR0_WP;
        assert_eq!(translate(&mut m, &ps, 0x6010, Access::Write, false), Ok(0x6010));
        assert!(translate(&mut m, &ps, 0x6010, Access::Write, true).is_err());
    }

    #[test]
    fn nx_bit_without_nxe_is_reserved() {
        let (mut m, mut ps) = long_mode_mem();
        ps.efer &= !EFER_NXE;
        let r = translate(&mut m, &ps, 0x7000, Access::Read, false);
        assert!(matches!(r, Err(WalkError::PageFault { error_code, .. }) if error_code & PFEC_RSVD != 0));
    }

    #[test]
    fn non_canonical_and_tables_outside_ram() {
        let (mut m, mut ps) = long_mode_mem();
        assert_eq!(
            translate(&mut m, &ps, 0x0000_8000_0000_0000, Access::Read, false),
            Err(WalkError::NonCanonical(0x0000_8000_0000_0000))
        );
        ps.cr3 = 0x10_0000_0000;
        assert!(matches!(translate(&mut m, &ps, 0, Access::Read, false), Err(WalkError::Phys(_))));
    }

    #[test]
    fn linear_copies_cross_pages_and_fail_whole() {
        let (mut m, ps) = long_mode_mem();
        // 0x5000 and 0x6000 map to themselves; 0x6000 is read-only.
        write_linear(&mut m, &ps, 0x4ffc, b"", false).unwrap();
        let mut buf = [0u8; 8];
        m.write_phys(0x5ffc, b"abcdefgh").unwrap();
        read_linear(&mut m, &ps, 0x5ffc, &mut buf, true).unwrap();
        assert_eq!(&buf, b"abcdefgh");
        // Writing across into the read-only page (WP set) fails before writing.
        let r = write_linear(&mut m, &ps, 0x5ffc, b"XXXXXXXX", false);
        assert!(matches!(r, Err(WalkError::PageFault { addr: 0x6000, .. })));
        assert_eq!(&m[0x5ffc..0x6000], b"abcd");
        // Reading across into an absent page faults at the page boundary.
        m.write_u64(0x4000 + 8 * 8, 0).unwrap();
        let r = read_linear(&mut m, &ps, 0x7ffe, &mut buf, false);
        assert!(matches!(r, Err(WalkError::PageFault { addr: 0x8000, error_code: 0 })));
    }

    #[test]
    fn legacy_32bit_and_pae() {
        let mut m = vec![0u8; 0x80_0000];
        // 2-level: PD at 0x1000, PT at 0x2000; PDE[1] is a 4 MiB page.
        m.write_u32(0x1000, 0x2000 | 7).unwrap();
        m.write_u32(0x1004, 0x40_0000 | 7 | PTE_PS as u32).unwrap();
        m.write_u32(0x2000 + 3 * 4, 0x9000 | 7).unwrap();
        let ps = PagingState { cr0: CR0_PE | CR0_PG, cr3: 0x1000, cr4: CR4_PSE, efer: 0 };
        assert_eq!(translate(&mut m, &ps, 0x3abc, Access::Read, true), Ok(0x9abc));
        assert_eq!(translate(&mut m, &ps, 0x41_2345, Access::Read, true), Ok(0x41_2345));

        // PAE: PDPT at 0x3000, PD at 0x4000, PT at 0x5000.
        m.write_u64(0x3000, 0x4000 | P).unwrap();
        m.write_u64(0x4000, 0x5000 | P | W | U).unwrap();
        m.write_u64(0x4008, 0x20_0000 | P | W | U | PTE_PS).unwrap();
        m.write_u64(0x5000 + 2 * 8, 0xa000 | P | W | U).unwrap();
        let ps = PagingState { cr0: CR0_PE | CR0_PG, cr3: 0x3000, cr4: CR4_PAE, efer: 0 };
        assert_eq!(translate(&mut m, &ps, 0x2abc, Access::Write, true), Ok(0xaabc));
        assert_eq!(translate(&mut m, &ps, 0x20_0010, Access::Read, false), Ok(0x20_0010));
    }
}
