//! The local APIC as Xen emulates it for a PVH guest, at the registers Linux
//! touches: values are stored and read back, the ICR delivers fixed
//! interrupts to this vCPU (self-IPIs), EOI is accepted. The timer is not
//! offered as a clock source (Linux uses Xen's single-shot timer).

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

#[derive(Debug, Clone)]
pub struct Lapic {
    pub id: u32,
    regs: [u32; 64],
    /// Vectors waiting for the vCPU (IRR).
    pending: [u64; 4],
}

impl Lapic {
    pub fn new(id: u32) -> Self {
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

    pub fn write(&mut self, offset: u64, value: u32) {
        let reg = offset & 0xff0;
        match reg {
            REG_ID | REG_VERSION | REG_PPR | REG_TIMER_CCR => {}
            REG_EOI => {}
            REG_ESR => self.regs[(REG_ESR >> 4) as usize] = 0,
            REG_ICR_LO => {
                self.regs[(REG_ICR_LO >> 4) as usize] = value & !(1 << 12); // delivered at once
                self.send_ipi(value);
            }
            REG_LDR | REG_DFR | REG_SVR | REG_TPR | REG_ICR_HI => self.regs[(reg >> 4) as usize] = value,
            r if (REG_LVT_TIMER..=REG_LVT_ERROR).contains(&r) || r == 0x2F0 || r == 0x380 || r == 0x3E0 => {
                self.regs[(r >> 4) as usize] = value
            }
            _ => {}
        }
    }

    fn send_ipi(&mut self, icr_lo: u32) {
        let vector = (icr_lo & 0xff) as u8;
        let delivery_mode = (icr_lo >> 8) & 7;
        let shorthand = (icr_lo >> 18) & 3;
        let dest = self.regs[(REG_ICR_HI >> 4) as usize] >> 24;
        let to_self = match shorthand {
            1 | 2 => true,            // self, all including self
            0 => dest == self.id || dest == 0xff,
            _ => false,               // all excluding self: nobody else yet
        };
        if to_self && delivery_mode == 0 && vector >= 16 {
            self.set_pending(vector);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_self_ipi() {
        let mut l = Lapic::new(3);
        assert_eq!(l.read(REG_ID), 3 << 24);
        assert_eq!(l.read(REG_VERSION) & 0xff, 0x14);
        l.write(REG_SVR, 0x1ff);
        assert_eq!(l.read(REG_SVR), 0x1ff);
        l.write(REG_ICR_LO, (1 << 18) | 0xf6); // self, fixed, vector 0xf6
        l.write(REG_ICR_HI, 3 << 24);
        l.write(REG_ICR_LO, 0x41); // physical destination = own id
        assert_eq!(l.highest_pending(), Some(0xf6));
        assert_ne!(l.read(REG_IRR0 + 0x70) & (1 << (0xf6 - 224)), 0);
        l.clear_pending(0xf6);
        assert_eq!(l.highest_pending(), Some(0x41));
        l.clear_pending(0x41);
        assert_eq!(l.highest_pending(), None);
        l.write(REG_ICR_LO, (1 << 18) | (4 << 8) | 2); // NMI: not delivered here
        assert_eq!(l.highest_pending(), None);
    }
}
