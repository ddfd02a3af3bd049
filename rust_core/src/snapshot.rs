//! The core's part of a save: every vCPU's architectural state and Xen's
//! state of the domain, as a versioned byte record (guest RAM goes next to
//! it, `GuestRam::write_image`). Python puts both in the save file with its
//! own records (xenstore, devices) and the checksums; docs/architecture.md
//! describes the whole file.
//!
//! The record is ours, not Unicorn's: registers are written out one by one
//! (general, segment caches with their hidden parts, descriptor tables,
//! control and debug registers, the MSRs a guest sets, x87/SSE) and a
//! restore rebuilds the engine's context from the power-on state, so a
//! file does not depend on the layout of QEMU's `CPUX86State`.
//!
//! A restored file is untrusted input like a hypercall: every count, index
//! and address is checked here or where it is used.

use crate::uc::{Engine, Reg};
use crate::unicorn_gaps::{CpuState, Segment, R_CS, R_DS, R_ES, R_FS, R_GS, R_SS};

/// Version of this record's layout; a file of another version is refused.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("the core state ends early")]
    Truncated,
    #[error("core state format {0}; this pvhvm reads format {FORMAT}")]
    Format(u32),
    #[error("core state: {0}")]
    Invalid(String),
}

pub fn invalid(what: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid(what.into())
}

/// Little-endian writer of a record.
#[derive(Default)]
pub struct Enc {
    pub buf: Vec<u8>,
}

impl Enc {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn opt_u64(&mut self, v: Option<u64>) {
        self.bool(v.is_some());
        self.u64(v.unwrap_or(0));
    }
    /// A length-prefixed byte string.
    pub fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
    }
    pub fn len(&mut self, n: usize) {
        self.u32(n as u32);
    }
    /// A tagged section, so that a restore finds each part where it
    /// expects it (and a damaged record fails at the first wrong tag).
    pub fn section(&mut self, tag: &[u8; 4], body: impl FnOnce(&mut Enc)) {
        self.buf.extend_from_slice(tag);
        let at = self.buf.len();
        self.u32(0);
        body(self);
        let len = (self.buf.len() - at - 4) as u32;
        self.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// Reader of a record; every read is bounds-checked.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(SnapshotError::Truncated)?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    pub fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }
    pub fn bool(&mut self) -> Result<bool, SnapshotError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(invalid(format!("flag byte {b}"))),
        }
    }
    pub fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn opt_u64(&mut self) -> Result<Option<u64>, SnapshotError> {
        let some = self.bool()?;
        let v = self.u64()?;
        Ok(some.then_some(v))
    }
    /// `n` bytes with no length before them.
    pub fn bytes_fixed(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        self.take(n)
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], SnapshotError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// A count of items, each at least `item_size` bytes: refused if the
    /// rest of the record could not hold them or it passes `max`.
    pub fn len(&mut self, max: usize, item_size: usize) -> Result<usize, SnapshotError> {
        let n = self.u32()? as usize;
        if n > max || n.saturating_mul(item_size) > self.buf.len() - self.pos {
            return Err(invalid(format!("{n} items where at most {max} fit")));
        }
        Ok(n)
    }
    pub fn section(&mut self, tag: &[u8; 4]) -> Result<Dec<'a>, SnapshotError> {
        let t = self.take(4)?;
        if t != tag {
            return Err(invalid(format!(
                "expected section {:?}, found {:?}",
                String::from_utf8_lossy(tag),
                String::from_utf8_lossy(t)
            )));
        }
        let n = self.u32()? as usize;
        Ok(Dec::new(self.take(n)?))
    }
    /// The section was read whole.
    pub fn finish(&self) -> Result<(), SnapshotError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(invalid(format!("{} bytes left over in a section", self.buf.len() - self.pos)))
        }
    }
}

const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_TSC_AUX: u32 = 0xc000_0103;
const MSR_PAT: u32 = 0x277;

/// The MSRs a guest sets and expects back (FS/GS base are in the segment
/// caches, EFER is kept apart, the TSC is the host's).
const SAVED_MSRS: [u32; 10] = [
    crate::cpu::MSR_STAR,
    crate::cpu::MSR_LSTAR,
    crate::cpu::MSR_CSTAR,
    crate::cpu::MSR_FMASK,
    MSR_KERNEL_GS_BASE,
    crate::cpu::MSR_SYSENTER_CS,
    crate::cpu::MSR_SYSENTER_ESP,
    crate::cpu::MSR_SYSENTER_EIP,
    MSR_PAT,
    MSR_TSC_AUX,
];

const FP_REGS: [Reg; 8] = [Reg::FP0, Reg::FP1, Reg::FP2, Reg::FP3, Reg::FP4, Reg::FP5, Reg::FP6, Reg::FP7];
const XMM_REGS: [Reg; 16] = [
    Reg::XMM0,
    Reg::XMM1,
    Reg::XMM2,
    Reg::XMM3,
    Reg::XMM4,
    Reg::XMM5,
    Reg::XMM6,
    Reg::XMM7,
    Reg::XMM8,
    Reg::XMM9,
    Reg::XMM10,
    Reg::XMM11,
    Reg::XMM12,
    Reg::XMM13,
    Reg::XMM14,
    Reg::XMM15,
];
const DEBUG_REGS: [Reg; 6] = [Reg::DR0, Reg::DR1, Reg::DR2, Reg::DR3, Reg::DR6, Reg::DR7];
/// x87 control, status, tag; last instruction and operand pointers.
const FPU_CONTROL: [Reg; 8] = [Reg::FPCW, Reg::FPSW, Reg::FPTAG, Reg::FOP, Reg::FCS, Reg::FDS, Reg::FIP, Reg::FDP];

/// One vCPU's architectural state, as the processor would hold it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ArchRegs {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS (QEMU's order), with base, limit and flags.
    pub segs: [Segment; 6],
    pub ldt: Segment,
    pub tr: Segment,
    pub gdt: (u64, u32),
    pub idt: (u64, u32),
    /// CR0, CR2, CR3, CR4.
    pub cr: [u64; 4],
    pub efer: u64,
    pub xcr0: u64,
    pub interrupt_shadow: bool,
    pub dr: [u64; 6],
    pub msrs: Vec<(u32, u64)>,
    pub fpu_control: [u64; 8],
    pub fpregs: [[u8; 10]; 8],
    pub mxcsr: u32,
    pub xmm: [[u8; 16]; 16],
}

const CRS: [usize; 4] = [0, 2, 3, 4];
const SEGS: [usize; 6] = [R_ES, R_CS, R_SS, R_DS, R_FS, R_GS];

impl ArchRegs {
    /// Read `st` out: the parts the context blob's known layout holds from
    /// it, the rest through the engine's register API with `st` loaded.
    /// The engine's own state is left as `st` (the caller loads whichever
    /// vCPU runs next).
    pub fn capture(engine: &Engine, st: &CpuState) -> Self {
        let mut r = ArchRegs::default();
        for (i, g) in r.gpr.iter_mut().enumerate() {
            *g = st.reg(i);
        }
        r.rip = st.rip();
        r.rflags = st.rflags();
        for (i, &s) in SEGS.iter().enumerate() {
            r.segs[i] = st.seg(s);
        }
        r.ldt = st.ldt();
        r.tr = st.tr();
        r.gdt = st.gdt();
        r.idt = st.idt();
        for (i, &c) in CRS.iter().enumerate() {
            r.cr[i] = st.cr(c);
        }
        r.efer = st.efer();
        r.xcr0 = st.xcr0();
        r.interrupt_shadow = st.interrupt_shadow();
        let mut copy = CpuState::new(engine, st.layout()).expect("a context for a live engine");
        copy.copy_from(st);
        copy.store(engine);
        for (i, &d) in DEBUG_REGS.iter().enumerate() {
            r.dr[i] = engine.read(d);
        }
        r.msrs = SAVED_MSRS.iter().map(|&m| (m, engine.read_msr(m))).collect();
        for (i, &f) in FPU_CONTROL.iter().enumerate() {
            r.fpu_control[i] = engine.read(f);
        }
        for (i, &f) in FP_REGS.iter().enumerate() {
            let mut b = [0u8; 16];
            engine.read_bytes(f, &mut b);
            r.fpregs[i].copy_from_slice(&b[..10]);
        }
        r.mxcsr = engine.read(Reg::MXCSR) as u32;
        for (i, &x) in XMM_REGS.iter().enumerate() {
            engine.read_bytes(x, &mut r.xmm[i]);
        }
        r
    }

    /// Rebuild a context from `pristine` (the engine's power-on state) with
    /// these registers. Uses the engine to write what only its API reaches.
    pub fn rebuild(&self, engine: &Engine, pristine: &CpuState) -> Result<CpuState, String> {
        let mut st = CpuState::new(engine, pristine.layout())?;
        st.copy_from(pristine);
        for (i, &g) in self.gpr.iter().enumerate() {
            st.set_reg(i, g);
        }
        st.set_rip(self.rip);
        st.set_rflags(self.rflags);
        for (i, &s) in SEGS.iter().enumerate() {
            st.set_seg(s, self.segs[i]);
        }
        st.set_ldt(self.ldt);
        st.set_tr(self.tr);
        st.set_gdt(self.gdt.0, self.gdt.1);
        st.set_idt(self.idt.0, self.idt.1);
        for (i, &c) in CRS.iter().enumerate() {
            st.set_cr(c, self.cr[i]);
        }
        st.set_efer(self.efer);
        st.set_xcr0(self.xcr0);
        st.end_exception();
        st.clear_interrupt_shadow();
        st.sync_hflags();
        if self.interrupt_shadow {
            st.set_interrupt_shadow();
        }
        st.store(engine);
        for (i, &d) in DEBUG_REGS.iter().enumerate() {
            engine.write(d, self.dr[i]);
        }
        for &(m, v) in &self.msrs {
            engine.write_msr(m, v);
        }
        for (i, &f) in FPU_CONTROL.iter().enumerate() {
            engine.write(f, self.fpu_control[i]);
        }
        for (i, &f) in FP_REGS.iter().enumerate() {
            let mut b = [0u8; 16];
            b[..10].copy_from_slice(&self.fpregs[i]);
            engine.write_bytes(f, &b);
        }
        engine.write(Reg::MXCSR, self.mxcsr as u64);
        for (i, &x) in XMM_REGS.iter().enumerate() {
            engine.write_bytes(x, &self.xmm[i]);
        }
        st.load(engine);
        Ok(st)
    }

    pub fn encode(&self, e: &mut Enc) {
        for g in self.gpr {
            e.u64(g);
        }
        e.u64(self.rip);
        e.u64(self.rflags);
        for s in self.segs.iter().chain([&self.ldt, &self.tr]) {
            e.u16(s.selector);
            e.u64(s.base);
            e.u32(s.limit);
            e.u32(s.flags);
        }
        for (base, limit) in [self.gdt, self.idt] {
            e.u64(base);
            e.u32(limit);
        }
        for c in self.cr {
            e.u64(c);
        }
        e.u64(self.efer);
        e.u64(self.xcr0);
        e.bool(self.interrupt_shadow);
        for d in self.dr {
            e.u64(d);
        }
        e.len(self.msrs.len());
        for &(m, v) in &self.msrs {
            e.u32(m);
            e.u64(v);
        }
        for f in self.fpu_control {
            e.u64(f);
        }
        for f in &self.fpregs {
            e.buf.extend_from_slice(f);
        }
        e.u32(self.mxcsr);
        for x in &self.xmm {
            e.buf.extend_from_slice(x);
        }
    }

    pub fn decode(d: &mut Dec) -> Result<Self, SnapshotError> {
        let mut r = ArchRegs::default();
        for g in r.gpr.iter_mut() {
            *g = d.u64()?;
        }
        r.rip = d.u64()?;
        r.rflags = d.u64()?;
        let seg = |d: &mut Dec| -> Result<Segment, SnapshotError> {
            Ok(Segment { selector: d.u16()?, base: d.u64()?, limit: d.u32()?, flags: d.u32()? })
        };
        for s in r.segs.iter_mut() {
            *s = seg(d)?;
        }
        r.ldt = seg(d)?;
        r.tr = seg(d)?;
        r.gdt = (d.u64()?, d.u32()?);
        r.idt = (d.u64()?, d.u32()?);
        for c in r.cr.iter_mut() {
            *c = d.u64()?;
        }
        r.efer = d.u64()?;
        r.xcr0 = d.u64()?;
        // x87 must stay on; only x87 and SSE exist on this vCPU.
        if r.xcr0 & 1 == 0 || r.xcr0 & !3 != 0 {
            return Err(invalid(format!("XCR0 {:#x}", r.xcr0)));
        }
        r.interrupt_shadow = d.bool()?;
        for x in r.dr.iter_mut() {
            *x = d.u64()?;
        }
        let n = d.len(SAVED_MSRS.len(), 12)?;
        for _ in 0..n {
            let (m, v) = (d.u32()?, d.u64()?);
            // Only MSRs this record may carry: a file must not reach the
            // TSC, the APIC base or anything else through helper_wrmsr.
            if !SAVED_MSRS.contains(&m) {
                return Err(invalid(format!("MSR {m:#x} is not one a save holds")));
            }
            r.msrs.push((m, v));
        }
        for f in r.fpu_control.iter_mut() {
            *f = d.u64()?;
        }
        for f in r.fpregs.iter_mut() {
            f.copy_from_slice(d.take(10)?);
        }
        r.mxcsr = d.u32()?;
        for x in r.xmm.iter_mut() {
            x.copy_from_slice(d.take(16)?);
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_damage() {
        let mut e = Enc::default();
        e.section(b"TEST", |e| {
            e.u32(7);
            e.opt_u64(Some(9));
            e.bytes(b"abc");
        });
        let mut d = Dec::new(&e.buf);
        let mut s = d.section(b"TEST").unwrap();
        assert_eq!((s.u32(), s.opt_u64(), s.bytes()), (Ok(7), Ok(Some(9)), Ok(&b"abc"[..])));
        s.finish().unwrap();
        // A truncated record or the wrong section is an error, never a panic.
        for cut in 0..e.buf.len() {
            let mut d = Dec::new(&e.buf[..cut]);
            let r = d.section(b"TEST").and_then(|mut s| {
                s.u32()?;
                s.opt_u64()?;
                s.bytes()?;
                s.finish()
            });
            assert!(r.is_err(), "cut at {cut}");
        }
        assert!(Dec::new(&e.buf).section(b"XXXX").is_err());
        // A count that cannot fit is refused before anything is allocated.
        let mut e = Enc::default();
        e.u32(u32::MAX);
        assert!(Dec::new(&e.buf).len(usize::MAX, 8).is_err());
    }
}
