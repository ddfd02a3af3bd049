//! Exception and interrupt delivery through the guest's own IDT, done the way
//! the processor does it (Unicorn stops at the fault and leaves the rest to
//! us): gate checks, privilege change with the TSS stack or an IST stack,
//! the frame, IF for interrupt gates, nested faults into #DF and triple
//! fault. Also SYSCALL, which Unicorn reduces to a hook.
//!
//! All of it edits a stopped vCPU's `CpuState`; memory is reached through the
//! guest's page tables with the checks of an implicit supervisor access.

use crate::memory::GuestRam;
use crate::mmu::{self, PagingState, WalkError};
use crate::unicorn_gaps::*;

pub const DE: u8 = 0;
pub const DB: u8 = 1;
pub const NMI: u8 = 2;
pub const BP: u8 = 3;
pub const OF: u8 = 4;
pub const UD: u8 = 6;
pub const DF: u8 = 8;
pub const TS: u8 = 10;
pub const NP: u8 = 11;
pub const SS: u8 = 12;
pub const GP: u8 = 13;
pub const PF: u8 = 14;
pub const AC: u8 = 17;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A fault or trap raised by an instruction (or by delivery itself).
    Exception,
    /// INT n, INT3, INTO: gate DPL is checked against CPL.
    Software,
    /// An interrupt from outside the instruction stream (the upcall vector).
    External,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub vector: u8,
    pub source: Source,
    pub error_code: Option<u32>,
    /// For #PF: the faulting linear address (CR2).
    pub cr2: Option<u64>,
    /// For software interrupts: the length of the INT instruction, which the
    /// saved RIP is already past. A fault raised while delivering one points
    /// back at the instruction.
    pub insn_len: u8,
}

impl Event {
    pub fn exception(vector: u8, error_code: Option<u32>) -> Self {
        Self { vector, source: Source::Exception, error_code, cr2: None, insn_len: 0 }
    }
    pub fn page_fault(addr: u64, error_code: u32) -> Self {
        Self { vector: PF, source: Source::Exception, error_code: Some(error_code), cr2: Some(addr), insn_len: 0 }
    }
    pub fn software(vector: u8, insn_len: u8) -> Self {
        Self { vector, source: Source::Software, error_code: None, cr2: None, insn_len }
    }
    pub fn external(vector: u8) -> Self {
        Self { vector, source: Source::External, error_code: None, cr2: None, insn_len: 0 }
    }
}

/// Which exceptions push an error code.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Benign,
    Contributory,
    PageFault,
    Double,
}

fn class(vector: u8) -> Class {
    match vector {
        0 | 10..=13 => Class::Contributory,
        14 => Class::PageFault,
        8 => Class::Double,
        _ => Class::Benign,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryError {
    /// A fault during delivery of #DF: the processor shuts down.
    TripleFault { chain: Vec<u8> },
    /// A mode this vCPU does not deliver in (real mode, task gates …).
    Unsupported(String),
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeliveryError::TripleFault { chain } => write!(f, "triple fault (vectors {chain:?})"),
            DeliveryError::Unsupported(s) => write!(f, "cannot deliver: {s}"),
        }
    }
}

fn paging_of(st: &CpuState) -> PagingState {
    st.paging()
}

/// Deliver `ev`, turning faults raised on the way into the events the
/// processor would raise next (#DF, then triple fault).
pub fn deliver(st: &mut CpuState, ram: &GuestRam, ev: Event) -> Result<(), DeliveryError> {
    let mut current = ev;
    let mut chain = vec![ev.vector];
    loop {
        match deliver_once(st, ram, current) {
            Ok(()) => {
                st.end_exception();
                st.clear_interrupt_shadow();
                st.sync_hflags();
                return Ok(());
            }
            Err(Step::Fault(next)) => {
                if current.source == Source::Software {
                    // The fault belongs to the INT instruction itself.
                    st.set_rip(st.rip().wrapping_sub(current.insn_len as u64));
                }
                chain.push(next.vector);
                let (a, b) = (class(current.vector), class(next.vector));
                current = match (a, b) {
                    (Class::Double, Class::Contributory | Class::PageFault) => {
                        return Err(DeliveryError::TripleFault { chain });
                    }
                    (Class::Contributory, Class::Contributory)
                    | (Class::PageFault, Class::Contributory | Class::PageFault) => {
                        chain.push(DF);
                        Event::exception(DF, Some(0))
                    }
                    _ => next,
                };
                if chain.len() > 8 {
                    return Err(DeliveryError::TripleFault { chain });
                }
            }
            Err(Step::Unsupported(s)) => return Err(DeliveryError::Unsupported(s)),
        }
    }
}

enum Step {
    Fault(Event),
    Unsupported(String),
}

fn walk_fault(e: WalkError) -> Step {
    match e {
        WalkError::PageFault { addr, error_code } => Step::Fault(Event::page_fault(addr, error_code)),
        // Non-canonical stack or table: #GP(0) (#SS for the stack, close enough
        // that a guest sees a contributory fault either way).
        WalkError::NonCanonical(_) => Step::Fault(Event::exception(GP, Some(0))),
        WalkError::Phys(_) => Step::Fault(Event::exception(GP, Some(0))),
    }
}

/// Error code for a fault about an IDT entry or selector during delivery.
fn sel_error(index: u32, idt: bool, ext: bool) -> u32 {
    index | if idt { 2 } else { 0 } | ext as u32
}

fn read_bytes(ram: &GuestRam, ps: &PagingState, va: u64, buf: &mut [u8]) -> Result<(), Step> {
    let mut m = ram;
    mmu::read_linear(&mut m, ps, va, buf, false).map_err(walk_fault)
}

/// The two dwords of a GDT/LDT descriptor.
fn read_descriptor(st: &CpuState, ram: &GuestRam, ps: &PagingState, sel: u16, ext: bool) -> Result<(u32, u32), Step> {
    let index = (sel & !7) as u64;
    let (base, limit) = if sel & 4 != 0 {
        let l = st.ldt();
        (l.base, l.limit)
    } else {
        st.gdt()
    };
    if index + 7 > limit as u64 {
        return Err(Step::Fault(Event::exception(GP, Some(sel_error((sel & !3) as u32, false, ext)))));
    }
    let mut b = [0u8; 8];
    read_bytes(ram, ps, base + index, &mut b)?;
    Ok((u32::from_le_bytes(b[0..4].try_into().unwrap()), u32::from_le_bytes(b[4..8].try_into().unwrap())))
}

fn desc_base(e1: u32, e2: u32) -> u64 {
    ((e1 >> 16) | ((e2 & 0xff) << 16) | (e2 & 0xff00_0000)) as u64
}

fn desc_limit(e1: u32, e2: u32) -> u32 {
    let l = (e1 & 0xffff) | (e2 & 0x000f_0000);
    if e2 & DESC_G != 0 {
        (l << 12) | 0xfff
    } else {
        l
    }
}

fn deliver_once(st: &mut CpuState, ram: &GuestRam, ev: Event) -> Result<(), Step> {
    let ps = paging_of(st);
    if let Some(cr2) = ev.cr2 {
        st.set_cr(2, cr2);
    }
    if st.cr(0) & mmu::CR0_PE == 0 {
        return Err(Step::Unsupported(format!("vector {} in real mode", ev.vector)));
    }
    let ext = ev.source != Source::Software;
    let long_mode = ps.long_mode();
    let vec = ev.vector as u64;
    let entry_size = if long_mode { 16 } else { 8 };
    let (idt_base, idt_limit) = st.idt();
    let gate_err = || Step::Fault(Event::exception(GP, Some(sel_error((vec as u32) << 3, true, ext))));
    if vec * entry_size + entry_size - 1 > idt_limit as u64 {
        return Err(gate_err());
    }
    let mut gate = [0u8; 16];
    read_bytes(ram, &ps, idt_base + vec * entry_size, &mut gate[..entry_size as usize])?;
    let g1 = u32::from_le_bytes(gate[0..4].try_into().unwrap());
    let g2 = u32::from_le_bytes(gate[4..8].try_into().unwrap());
    let g3 = u32::from_le_bytes(gate[8..12].try_into().unwrap());
    let gtype = (g2 >> 8) & 0x1f; // includes the S bit (must be 0)
    let gate_dpl = ((g2 >> 13) & 3) as u8;
    let cpl = st.cpl();
    let is_32bit_gate = match (long_mode, gtype) {
        (true, 0x0e | 0x0f) => true,
        (false, 0x0e | 0x0f) => true,
        (false, 0x06 | 0x07) => false,
        (false, 0x05) => return Err(Step::Unsupported(format!("task gate for vector {vec}"))),
        _ => return Err(gate_err()),
    };
    if !is_32bit_gate {
        return Err(Step::Unsupported(format!("16-bit gate for vector {vec}")));
    }
    let trap_gate = gtype & 1 != 0;
    if ev.source == Source::Software && gate_dpl < cpl {
        return Err(gate_err());
    }
    if g2 & DESC_P == 0 {
        return Err(Step::Fault(Event::exception(NP, Some(sel_error((vec as u32) << 3, true, ext)))));
    }
    let selector = (g1 >> 16) as u16;
    let mut offset = ((g1 & 0xffff) | (g2 & 0xffff_0000)) as u64;
    if long_mode {
        offset |= (g3 as u64) << 32;
    }
    let ist = if long_mode { g2 & 7 } else { 0 };

    // The handler's code segment.
    if selector & !3 == 0 {
        return Err(Step::Fault(Event::exception(GP, Some(ext as u32))));
    }
    let (c1, c2) = read_descriptor(st, ram, &ps, selector, ext)?;
    let sel_fault = |v: u8| Step::Fault(Event::exception(v, Some(sel_error((selector & !3) as u32, false, ext))));
    if c2 & DESC_S == 0 || c2 & DESC_CS == 0 {
        return Err(sel_fault(GP));
    }
    let cs_dpl = ((c2 >> DESC_DPL_SHIFT) & 3) as u8;
    if cs_dpl > cpl {
        return Err(sel_fault(GP));
    }
    if c2 & DESC_P == 0 {
        return Err(sel_fault(NP));
    }
    if long_mode && (c2 & DESC_L == 0 || c2 & DESC_B != 0) {
        return Err(sel_fault(GP));
    }
    let conforming = c2 & (1 << 10) != 0;
    let new_cpl = if conforming { cpl } else { cs_dpl };

    let old_rip = st.rip();
    let old_rflags = st.rflags();
    let old_cs = st.seg(R_CS);
    let old_ss = st.seg(R_SS);
    let old_rsp = st.reg(4);
    let tr = st.tr();
    let user_stack = new_cpl == 3;

    if long_mode {
        let mut rsp = if ist != 0 || new_cpl < cpl {
            let off = if ist != 0 { 0x24 + 8 * (ist as u64 - 1) } else { 4 + 8 * new_cpl as u64 };
            if off + 7 > tr.limit as u64 {
                return Err(Step::Fault(Event::exception(TS, Some(sel_error((tr.selector & !3) as u32, false, ext)))));
            }
            let mut b = [0u8; 8];
            read_bytes(ram, &ps, tr.base + off, &mut b)?;
            u64::from_le_bytes(b)
        } else {
            old_rsp
        };
        rsp &= !0xf;
        let mut frame: Vec<u64> = vec![
            old_ss.selector as u64,
            old_rsp,
            old_rflags,
            old_cs.selector as u64,
            old_rip,
        ];
        if let Some(ec) = ev.error_code {
            frame.push(ec as u64);
        }
        let bytes: Vec<u8> = frame.iter().rev().flat_map(|w| w.to_le_bytes()).collect();
        rsp = rsp.wrapping_sub(bytes.len() as u64);
        let mut m = ram;
        mmu::write_linear(&mut m, &ps, rsp, &bytes, user_stack).map_err(walk_fault)?;
        if new_cpl != cpl {
            // Long mode loads a NULL SS with RPL = new CPL on a privilege change.
            st.set_seg(
                R_SS,
                Segment { selector: new_cpl as u16, base: 0, limit: 0, flags: (new_cpl as u32) << DESC_DPL_SHIFT },
            );
        }
        st.set_reg(4, rsp);
    } else {
        // 32-bit protected mode, 32-bit gate.
        let (mut esp, new_ss) = if new_cpl < cpl {
            let off = 4 + 8 * new_cpl as u64;
            if off + 5 > tr.limit as u64 {
                return Err(Step::Fault(Event::exception(TS, Some(sel_error((tr.selector & !3) as u32, false, ext)))));
            }
            let mut b = [0u8; 8];
            read_bytes(ram, &ps, tr.base + off, &mut b)?;
            let esp = u32::from_le_bytes(b[0..4].try_into().unwrap()) as u64;
            let ss_sel = u16::from_le_bytes(b[4..6].try_into().unwrap());
            let (s1, s2) = read_descriptor(st, ram, &ps, ss_sel, ext)?;
            let seg = Segment { selector: ss_sel, base: desc_base(s1, s2), limit: desc_limit(s1, s2), flags: s2 };
            (esp, Some(seg))
        } else {
            (old_rsp & 0xffff_ffff, None)
        };
        let mut frame: Vec<u32> = Vec::new();
        if new_ss.is_some() {
            frame.push(old_ss.selector as u32);
            frame.push(old_rsp as u32);
        }
        frame.extend([old_rflags as u32, old_cs.selector as u32, old_rip as u32]);
        if let Some(ec) = ev.error_code {
            frame.push(ec);
        }
        let bytes: Vec<u8> = frame.iter().rev().flat_map(|w| w.to_le_bytes()).collect();
        let ss_base = new_ss.map(|s| s.base).unwrap_or(old_ss.base);
        esp = esp.wrapping_sub(bytes.len() as u64) & 0xffff_ffff;
        let mut m = ram;
        mmu::write_linear(&mut m, &ps, (ss_base + esp) & 0xffff_ffff, &bytes, user_stack).map_err(walk_fault)?;
        if let Some(s) = new_ss {
            st.set_seg(R_SS, s);
        }
        st.set_reg(4, (old_rsp & !0xffff_ffff) | esp);
    }

    st.set_seg(
        R_CS,
        Segment {
            selector: (selector & !3) | new_cpl as u16,
            base: desc_base(c1, c2),
            limit: desc_limit(c1, c2),
            flags: c2,
        },
    );
    let mut rflags = old_rflags & !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM);
    if !trap_gate {
        rflags &= !RFLAGS_IF;
    }
    st.set_rflags(rflags);
    st.set_rip(offset);
    Ok(())
}

/// SYSCALL in IA-32e mode (AMD64 / SDM): RCX = next RIP, R11 = RFLAGS,
/// RFLAGS &= ~FMASK, CS/SS from STAR[47:32], CPL 0, RIP = LSTAR (CSTAR from
/// compatibility mode). `next_rip` is the instruction after SYSCALL.
pub struct SyscallMsrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
}

pub fn emulate_syscall(st: &mut CpuState, next_rip: u64, msrs: &SyscallMsrs) -> Result<(), Event> {
    if st.efer() & mmu::EFER_SCE == 0 {
        return Err(Event::exception(UD, None));
    }
    if st.efer() & mmu::EFER_LMA == 0 {
        // Legacy-mode SYSCALL is an AMD-only path Linux does not use.
        return Err(Event::exception(UD, None));
    }
    let from_64 = st.in_64bit_code();
    let rflags = st.rflags();
    st.set_reg(1, next_rip); // RCX
    st.set_reg(11, rflags & !RFLAGS_RF); // R11
    st.set_rflags(rflags & !msrs.fmask & !RFLAGS_RF);
    let sel = ((msrs.star >> 32) & 0xfffc) as u16;
    st.set_seg(R_CS, flat_code64(sel, 0));
    st.set_seg(R_SS, flat_data(sel + 8, 0));
    st.set_rip(if from_64 { msrs.lstar } else { msrs.cstar });
    st.clear_interrupt_shadow();
    st.sync_hflags();
    Ok(())
}

/// The SYSENTER MSRs (IA32_SYSENTER_CS, _ESP, _EIP).
pub struct SysenterMsrs {
    pub cs: u64,
    pub esp: u64,
    pub eip: u64,
}

/// SYSENTER as the SDM has it (Unicorn's only steps over it): #GP(0) in
/// real mode or with a null SYSENTER_CS; else CPL 0 at SYSENTER_EIP with
/// SYSENTER_ESP, flat CS from the MSR (64-bit code in long mode) and SS
/// after it, VM, IF and RF cleared. Nothing of the caller is saved: its
/// vDSO passes the return address and stack in EDX and ECX for SYSEXIT.
pub fn emulate_sysenter(st: &mut CpuState, msrs: &SysenterMsrs) -> Result<(), Event> {
    let sel = (msrs.cs & 0xfffc) as u16;
    if st.cr(0) & mmu::CR0_PE == 0 || sel == 0 {
        return Err(Event::exception(GP, Some(0)));
    }
    let long = st.efer() & mmu::EFER_LMA != 0;
    st.set_rflags(st.rflags() & !(RFLAGS_VM | RFLAGS_IF | RFLAGS_RF));
    st.set_seg(R_CS, if long { flat_code64(sel, 0) } else { flat_code32(sel) });
    st.set_seg(R_SS, flat_data(sel + 8, 0));
    let (sp, ip) = if long { (msrs.esp, msrs.eip) } else { (msrs.esp & 0xffff_ffff, msrs.eip & 0xffff_ffff) };
    st.set_reg(4, sp);
    st.set_rip(ip);
    st.clear_interrupt_shadow();
    st.sync_hflags();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_fault_rules() {
        assert_eq!(class(GP), Class::Contributory);
        assert_eq!(class(PF), Class::PageFault);
        assert_eq!(class(BP), Class::Benign);
        assert!(has_error_code(PF) && has_error_code(DF) && !has_error_code(UD) && !has_error_code(BP));
        assert_eq!(sel_error(0x80 << 3, true, false), 0x402);
    }

    #[test]
    fn descriptor_fields() {
        // A flat 4 GiB code segment: base 0, limit 0xfffff pages.
        let (e1, e2) = (0x0000_ffffu32, 0x00af_9b00u32);
        assert_eq!(desc_base(e1, e2), 0);
        assert_eq!(desc_limit(e1, e2), 0xffff_ffff);
        assert_eq!(desc_base(0x1234_0067, 0x5600_8978), 0x5678_1234);
        assert_eq!(desc_limit(0x1234_0067, 0x5600_8978), 0x67);
    }
}
