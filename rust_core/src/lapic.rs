//! The local APIC as Xen emulates it for a PVH guest, at the registers Linux
//! touches: values are stored and read back; the ICR sends IPIs (fixed,
//! lowest priority, NMI, INIT, start-up; physical and logical destinations,
//! the self / all / all-but-self shorthands), which the vCPU's hooks route
//! to the target vCPUs; EOI is accepted. The LAPIC timer is not offered as
//! a clock source (Linux uses Xen's single-shot timer).
//!
//! APIC IDs follow Xen's HVM convention: vCPU n has APIC ID 2n (the MADT,
//! CPUID leaf 1 and this register agree).

pub const LAPIC_BASE: u64 = 0xFEE0_0000;
pub const LAPIC_SIZE: u64 = 0x1000;

const REG_ID: u64 = 0x20;
const REG_VERSION: u64 = 0x30;
const REG_TPR: u64 = 0x80;
const REG_PPR: u64 = 0xA0;
const REG_EOI: u64 = 0xB0;
const REG_LDR: u64 = 0xD0;
const REG_DFR: u64 = 0xE0;
const REG_SVR: u64 = 0xF0;
const REG_ISR0: u64 = 0x100;
const REG_IRR0: u64 = 0x200;
const REG_ESR: u64 = 0x280;
const REG_ICR_LO: u64 = 0x300;
const REG_ICR_HI: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_LVT_ERROR: u64 = 0x370;
const REG_TIMER_CCR: u64 = 0x390;

/// ESR "send illegal vector".
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;

/// The APIC ID of vCPU `vcpu` (Xen: 2 × the vCPU id).
pub fn apic_id_of(vcpu: u32) -> u32 {
    vcpu * 2
}

/// What an IPI asks of its targets (ICR delivery mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpiKind {
    Fixed(u8),
    LowestPriority(u8),
    Nmi,
    /// INIT, level asserted: the target resets and waits for a start-up IPI.
    Init,
    /// INIT level de-assert: no effect on processors since the Pentium 4.
    InitDeassert,
    /// Start-up: begin in real mode at vector << 12.
    Startup(u8),
    /// SMI and the reserved modes: not delivered.
    Ignored,
}

/// Where an IPI goes (ICR destination shorthand, mode and field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    ToSelf,
    AllIncludingSelf,
    AllExcludingSelf,
    Physical(u8),
    Logical(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipi {
    pub kind: IpiKind,
    pub dest: Dest,
}

impl Ipi {
    /// Decode an ICR write (low dword; `icr_hi` holds the destination).
    pub fn decode(icr_lo: u32, icr_hi: u32) -> Self {
        let vector = icr_lo as u8;
        let level_assert = icr_lo & (1 << 14) != 0;
        let kind = match (icr_lo >> 8) & 7 {
            0 => IpiKind::Fixed(vector),
            1 => IpiKind::LowestPriority(vector),
            4 => IpiKind::Nmi,
            5 if level_assert => IpiKind::Init,
            5 => IpiKind::InitDeassert,
            6 => IpiKind::Startup(vector),
            _ => IpiKind::Ignored,
        };
        let field = (icr_hi >> 24) as u8;
        let dest = match (icr_lo >> 18) & 3 {
            1 => Dest::ToSelf,
            2 => Dest::AllIncludingSelf,
            3 => Dest::AllExcludingSelf,
            _ if icr_lo & (1 << 11) != 0 => Dest::Logical(field),
            _ => Dest::Physical(field),
        };
        Self { kind, dest }
    }
}

#[derive(Debug, Clone)]
pub struct Lapic {
    pub id: u32,
    regs: [u32; 64],
    /// Vectors waiting for the vCPU (IRR).
    pending: [u64; 4],
}

impl Lapic {
    pub fn new(vcpu: u32) -> Self {
        let id = apic_id_of(vcpu);
        let mut regs = [0u32; 64];
        regs[(REG_ID >> 4) as usize] = id << 24;
        // Version 0x14 (integrated xAPIC), 6 LVT entries.
        regs[(REG_VERSION >> 4) as usize] = 0x0005_0014;
        regs[(REG_DFR >> 4) as usize] = 0xffff_ffff;
        regs[(REG_SVR >> 4) as usize] = 0xff;
        for lvt in (0x320..=0x370).step_by(0x10) {
            regs[lvt >> 4] = 1 << 16; // masked
        }
        Self { id, regs, pending: [0; 4] }
    }

    pub fn encode(&self, e: &mut crate::snapshot::Enc) {
        for r in self.regs {
            e.u32(r);
        }
        for p in self.pending {
            e.u64(p);
        }
    }

    /// The registers and pending vectors of a save, on this vCPU's APIC
    /// (its ID is the vCPU's, whatever the file says).
    pub fn decode(&mut self, d: &mut crate::snapshot::Dec) -> Result<(), crate::snapshot::SnapshotError> {
        for r in self.regs.iter_mut() {
            *r = d.u32()?;
        }
        for p in self.pending.iter_mut() {
            *p = d.u64()?;
        }
        self.regs[(REG_ID >> 4) as usize] = self.id << 24;
        Ok(())
    }

    pub fn read(&self, offset: u64) -> u32 {
        let reg = offset & 0xff0;
        match reg {
            REG_PPR => self.regs[(REG_TPR >> 4) as usize] & 0xf0,
            REG_TIMER_CCR => 0,
            r if (REG_IRR0..REG_IRR0 + 0x80).contains(&r) => {
                let i = ((r - REG_IRR0) >> 4) as usize;
                (self.pending[i / 2] >> (32 * (i % 2))) as u32
            }
            r if (REG_ISR0..REG_ISR0 + 0x80).contains(&r) => 0,
            _ => self.regs[(reg >> 4) as usize],
        }
    }

    /// A register write. An ICR write returns the IPI it sends, for the
    /// caller to route (`targets`).
    pub fn write(&mut self, offset: u64, value: u32) -> Option<Ipi> {
        let reg = offset & 0xff0;
        match reg {
            REG_ID | REG_VERSION | REG_PPR | REG_TIMER_CCR => {}
            REG_EOI => {}
            REG_ESR => self.regs[(REG_ESR >> 4) as usize] = 0,
            REG_ICR_LO => {
                self.regs[(REG_ICR_LO >> 4) as usize] = value & !(1 << 12); // delivered at once
                let ipi = Ipi::decode(value, self.regs[(REG_ICR_HI >> 4) as usize]);
                if let IpiKind::Fixed(v) | IpiKind::LowestPriority(v) = ipi.kind {
                    if v < 16 {
                        self.regs[(REG_ESR >> 4) as usize] |= ESR_SEND_ILLEGAL_VECTOR;
                        return None;
                    }
                }
                return Some(ipi);
            }
            REG_LDR | REG_DFR | REG_SVR | REG_TPR | REG_ICR_HI => self.regs[(reg >> 4) as usize] = value,
            r if (REG_LVT_TIMER..=REG_LVT_ERROR).contains(&r) || r == 0x2F0 || r == 0x380 || r == 0x3E0 => {
                self.regs[(r >> 4) as usize] = value
            }
            _ => {}
        }
        None
    }

    /// Software-enabled (SVR bit 8): only then does it accept interrupts.
    pub fn enabled(&self) -> bool {
        self.regs[(REG_SVR >> 4) as usize] & (1 << 8) != 0
    }

    /// Whether this APIC is a target of `dest` (a destination field, not a
    /// shorthand): physical by APIC ID, logical by LDR in the flat or
    /// cluster model; 0xff is everyone.
    pub fn accepts(&self, dest: Dest) -> bool {
        match dest {
            Dest::Physical(id) => id == 0xff || id as u32 == self.id,
            Dest::Logical(mda) => {
                let ldr = (self.regs[(REG_LDR >> 4) as usize] >> 24) as u8;
                if mda == 0xff {
                    return true;
                }
                if self.regs[(REG_DFR >> 4) as usize] >> 28 == 0xf {
                    ldr & mda != 0
                } else {
                    // Cluster model: high nibble the cluster, low nibble a mask.
                    ldr >> 4 == mda >> 4 && ldr & mda & 0xf != 0
                }
            }
            _ => false,
        }
    }

    pub fn set_pending(&mut self, vector: u8) {
        self.pending[(vector / 64) as usize] |= 1 << (vector % 64);
    }

    /// The highest pending vector, if any.
    pub fn highest_pending(&self) -> Option<u8> {
        (0..4).rev().find(|&i| self.pending[i] != 0).map(|i| (i as u32 * 64 + 63 - self.pending[i].leading_zeros()) as u8)
    }

    pub fn clear_pending(&mut self, vector: u8) {
        self.pending[(vector / 64) as usize] &= !(1 << (vector % 64));
    }

    /// Back to the power-on state (INIT), keeping the APIC ID.
    pub fn reset(&mut self, vcpu: u32) {
        *self = Lapic::new(vcpu);
    }
}

/// The vCPUs an IPI from `sender` reaches, in order. A lowest-priority
/// interrupt goes to one of them (the first), as Xen's vlapic picks one.
pub fn targets<'a>(ipi: Ipi, sender: u32, lapics: impl Iterator<Item = &'a Lapic>) -> Vec<u32> {
    let mut out: Vec<u32> = lapics
        .enumerate()
        .filter(|&(i, l)| match ipi.dest {
            Dest::ToSelf => i as u32 == sender,
            Dest::AllIncludingSelf => true,
            Dest::AllExcludingSelf => i as u32 != sender,
            d => l.accepts(d),
        })
        .map(|(i, _)| i as u32)
        .collect();
    if matches!(ipi.kind, IpiKind::LowestPriority(_)) {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_self_ipi() {
        let mut l = Lapic::new(3);
        assert_eq!(l.read(REG_ID), 6 << 24);
        assert_eq!(l.read(REG_VERSION) & 0xff, 0x14);
        l.write(REG_SVR, 0x1ff);
        assert_eq!(l.read(REG_SVR), 0x1ff);
        let ipi = l.write(REG_ICR_LO, (1 << 18) | 0xf6).unwrap(); // self, fixed, vector 0xf6
        assert_eq!(ipi, Ipi { kind: IpiKind::Fixed(0xf6), dest: Dest::ToSelf });
        l.set_pending(0xf6);
        l.set_pending(0x41);
        assert_eq!(l.highest_pending(), Some(0xf6));
        assert_ne!(l.read(REG_IRR0 + 0x70) & (1 << (0xf6 - 224)), 0);
        l.clear_pending(0xf6);
        assert_eq!(l.highest_pending(), Some(0x41));
        l.clear_pending(0x41);
        assert_eq!(l.highest_pending(), None);
        // An illegal vector is refused and noted in the ESR.
        assert_eq!(l.write(REG_ICR_LO, 0x05), None);
        assert_ne!(l.read(REG_ESR) & ESR_SEND_ILLEGAL_VECTOR, 0);
    }

    #[test]
    fn decodes_what_linux_sends() {
        // wakeup_secondary_cpu_via_init: INIT assert, INIT de-assert, 2 x STARTUP (vector 0x9a).
        assert_eq!(Ipi::decode(0xc500, 4 << 24), Ipi { kind: IpiKind::Init, dest: Dest::Physical(4) });
        assert_eq!(Ipi::decode(0x8500, 4 << 24).kind, IpiKind::InitDeassert);
        assert_eq!(Ipi::decode(0x069a, 4 << 24), Ipi { kind: IpiKind::Startup(0x9a), dest: Dest::Physical(4) });
        // native_stop_other_cpus: REBOOT_VECTOR to all but self; then NMI.
        assert_eq!(Ipi::decode(0xc00f8, 0), Ipi { kind: IpiKind::Fixed(0xf8), dest: Dest::AllExcludingSelf });
        assert_eq!(Ipi::decode(0xc0400, 0).kind, IpiKind::Nmi);
        // Logical flat destination, lowest priority.
        assert_eq!(Ipi::decode(0x0931, 0x0300_0000), Ipi { kind: IpiKind::LowestPriority(0x31), dest: Dest::Logical(3) });
    }

    #[test]
    fn routes_physical_logical_and_shorthands() {
        let mut ls: Vec<Lapic> = (0..4).map(Lapic::new).collect();
        for (i, l) in ls.iter_mut().enumerate() {
            l.write(REG_LDR, (1 << i) << 24); // flat model, as Linux's flat_init_apic_ldr
        }
        let t = |kind, dest, sender| targets(Ipi { kind, dest }, sender, ls.iter());
        let fixed = IpiKind::Fixed(0x40);
        assert_eq!(t(fixed, Dest::Physical(4), 0), vec![2]);
        assert_eq!(t(fixed, Dest::Physical(5), 0), Vec::<u32>::new());
        assert_eq!(t(fixed, Dest::Physical(0xff), 1), vec![0, 1, 2, 3]);
        assert_eq!(t(fixed, Dest::Logical(0b1010), 0), vec![1, 3]);
        assert_eq!(t(IpiKind::LowestPriority(0x40), Dest::Logical(0b1010), 0), vec![1]);
        assert_eq!(t(fixed, Dest::ToSelf, 2), vec![2]);
        assert_eq!(t(fixed, Dest::AllExcludingSelf, 2), vec![0, 1, 3]);
        assert_eq!(t(IpiKind::Nmi, Dest::AllIncludingSelf, 2), vec![0, 1, 2, 3]);
        // Cluster model: cluster 1, members 0 and 1.
        let mut c = Lapic::new(0);
        c.write(REG_DFR, 0x0fff_ffff);
        c.write(REG_LDR, 0x12 << 24);
        assert!(c.accepts(Dest::Logical(0x13)));
        assert!(!c.accepts(Dest::Logical(0x23)));
        assert!(!c.accepts(Dest::Logical(0x11)));
    }
}
