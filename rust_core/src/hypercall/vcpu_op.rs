//! HYPERVISOR_vcpu_op (vcpu.h, hvm/hvm_vcpu.h) and set_timer_op: bringing
//! vCPUs up and down, vcpu_info placement, the runstate and time areas,
//! one-shot and periodic timers.

use super::{Call, HcResult};
use crate::abi::errno;
use crate::mmu;
use crate::unicorn_gaps::{self, Segment};
use crate::vcpu::{Activity, PeriodicTimer};
use crate::xen::evtchn::VCPU_INFO_SIZE;

const INITIALISE: u64 = 0;
const UP: u64 = 1;
const DOWN: u64 = 2;
const IS_UP: u64 = 3;
const GET_RUNSTATE_INFO: u64 = 4;
const REGISTER_RUNSTATE_MEMORY_AREA: u64 = 5;
const SET_PERIODIC_TIMER: u64 = 6;
const STOP_PERIODIC_TIMER: u64 = 7;
const SET_SINGLESHOT_TIMER: u64 = 8;
const STOP_SINGLESHOT_TIMER: u64 = 9;
const REGISTER_VCPU_INFO: u64 = 10;
const REGISTER_VCPU_TIME_MEMORY_AREA: u64 = 13;

/// VCPU_SSHOTTMR_future: fail with -ETIME if the deadline has passed.
const SSHOTTMR_FUTURE: u32 = 1;
const MIN_PERIOD_NS: u64 = 1_000_000;

/// struct vcpu_hvm_context: { uint32_t mode; uint32_t pad; union cpu_regs }.
const HVM_CONTEXT_SIZE: usize = 128;
const HVM_MODE_32B: u32 = 0;
const HVM_MODE_64B: u32 = 1;

pub fn call(c: &mut Call, args: [u64; 5]) -> HcResult {
    let [cmd, vcpuid, arg, ..] = args;
    if vcpuid >= c.vcpus.len() as u64 {
        return Err(errno::ENOENT);
    }
    let v = vcpuid as u32;
    let own = v == c.vcpu;
    match cmd {
        INITIALISE => {
            let mut ctx = [0u8; HVM_CONTEXT_SIZE];
            c.guest.read(arg, &mut ctx)?;
            if c.vcpus[v as usize].initialised {
                return Err(errno::EEXIST);
            }
            let pristine = c.pristine;
            let target = &mut c.vcpus[v as usize];
            target.regs.copy_from(pristine);
            set_hvm_context(&mut target.regs, &ctx)?;
            target.initialised = true;
            target.activity = Activity::Running;
            Ok(0)
        }
        UP => {
            let target = &mut c.vcpus[v as usize];
            if !target.initialised {
                return Err(errno::EINVAL);
            }
            if target.down {
                target.down = false;
                if target.activity == Activity::WaitForSipi {
                    target.activity = Activity::Running;
                }
                c.effects.woke_other = true;
            }
            Ok(0)
        }
        DOWN => {
            // The vCPU stops where it is; VCPUOP_up resumes it there.
            c.vcpus[v as usize].down = true;
            if own {
                c.effects.block = true;
            }
            Ok(0)
        }
        IS_UP => Ok(!c.vcpus[v as usize].down as i64),
        REGISTER_VCPU_INFO => {
            // struct vcpu_register_vcpu_info { uint64_t mfn; uint32_t offset; uint32_t rsvd; }
            let mfn = c.guest.read_u64(arg)?;
            let offset = c.guest.read_u32(arg + 8)? as u64;
            // Naturally aligned: the guest and Xen update its words atomically.
            if offset + VCPU_INFO_SIZE > 4096 || offset % 8 != 0 || c.dom.ports().vcpu_info_registered(v) {
                return Err(errno::EINVAL);
            }
            let gpa = mfn.checked_mul(4096).ok_or(errno::EINVAL)? + offset;
            let Ok(dst) = c.dom.ram.slice_mut(gpa, VCPU_INFO_SIZE) else { return Err(errno::EINVAL) };
            // Carry over what the old location held (pending flags, time).
            let old = c.dom.ports().vcpu_info(v).and_then(|o| c.dom.ram.slice(o, VCPU_INFO_SIZE).ok().map(|s| s.to_vec()));
            match old {
                Some(o) => dst.copy_from_slice(&o),
                None => dst.fill(0),
            }
            c.dom.ports().register_vcpu_info(v, gpa);
            c.dom.update_vcpu_time(v);
            Ok(0)
        }
        REGISTER_RUNSTATE_MEMORY_AREA | REGISTER_VCPU_TIME_MEMORY_AREA => {
            let addr = c.guest.read_u64(arg)?;
            let x = &mut c.vcpus[v as usize];
            let area = if cmd == REGISTER_RUNSTATE_MEMORY_AREA { &mut x.runstate_area } else { &mut x.time_area };
            *area = (addr != 0).then_some(addr);
            // Written now through the caller's page tables if it is the
            // caller's; another vCPU's is written when that vCPU next runs.
            c.effects.refresh_areas = own;
            Ok(0)
        }
        GET_RUNSTATE_INFO => {
            let info = c.vcpus[v as usize].runstate.info(c.dom.system_time_ns());
            c.guest.write(arg, &info)?;
            Ok(0)
        }
        SET_SINGLESHOT_TIMER => {
            if !own {
                return Err(errno::EINVAL);
            }
            // struct vcpu_set_singleshot_timer { uint64_t timeout_abs_ns; uint32_t flags; }
            let deadline = c.guest.read_u64(arg)?;
            let flags = c.guest.read_u32(arg + 8)?;
            if flags & SSHOTTMR_FUTURE != 0 && deadline < c.dom.system_time_ns() {
                return Err(errno::ETIME);
            }
            c.me().timers.singleshot_ns = Some(deadline);
            c.effects.recheck = true;
            Ok(0)
        }
        STOP_SINGLESHOT_TIMER => {
            if !own {
                return Err(errno::EINVAL);
            }
            c.me().timers.singleshot_ns = None;
            Ok(0)
        }
        SET_PERIODIC_TIMER => {
            let period_ns = c.guest.read_u64(arg)?;
            if period_ns < MIN_PERIOD_NS {
                return Err(errno::EINVAL);
            }
            let next_ns = c.dom.system_time_ns() + period_ns;
            c.vcpus[v as usize].timers.periodic = Some(PeriodicTimer { period_ns, next_ns });
            c.effects.recheck = true;
            Ok(0)
        }
        STOP_PERIODIC_TIMER => {
            c.vcpus[v as usize].timers.periodic = None;
            Ok(0)
        }
        _ => Err(errno::ENOSYS),
    }
}

/// set_timer_op(timeout): a one-shot timer at absolute system time; 0 stops it.
pub fn set_timer_op(c: &mut Call, args: [u64; 5]) -> HcResult {
    c.me().timers.singleshot_ns = (args[0] != 0).then_some(args[0]);
    c.effects.recheck = true;
    Ok(0)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// QEMU's segment-cache flags from Xen's segment attributes (type, S, DPL,
/// P in bits 0-7; AVL, L, D/B, G in bits 8-11): the descriptor's high dword.
fn ar_to_flags(ar: u16) -> u32 {
    let ar = ar as u32;
    ((ar & 0xff) << 8) | ((ar & 0xf00) << 12)
}

/// A segment as Xen's arch_set_info_hvm_guest accepts it: present, a code
/// segment for CS, a writable data segment for SS, a data or readable code
/// segment (or null) for DS/ES; byte-granular limits below 1 MiB, page
/// granular ones ending in 0xfff.
fn check_segment(ar: u16, limit: u32, which: usize) -> Result<(), i64> {
    let (kind, s, present, g) = (ar & 0xf, ar & 0x10 != 0, ar & 0x80 != 0, ar & 0x800 != 0);
    if ar & 0xf000 != 0 {
        return Err(errno::EINVAL);
    }
    if which != unicorn_gaps::R_CS && which != unicorn_gaps::R_SS && ar == 0 {
        return Ok(()); // a null data segment
    }
    if !present || !s {
        return Err(errno::EINVAL);
    }
    let code = kind & 0x8 != 0;
    let ok = match which {
        unicorn_gaps::R_CS => code,
        unicorn_gaps::R_SS => !code && kind & 0x2 != 0,
        _ => !code || kind & 0x2 != 0,
    };
    if !ok || (g && limit & 0xfff != 0xfff) || (!g && limit > 0xfffff) {
        return Err(errno::EINVAL);
    }
    Ok(())
}

/// Load a `vcpu_hvm_context` (hvm_vcpu.h) into `st`, with the checks Xen
/// makes (-EINVAL for an unknown mode, a bad segment, or control
/// registers that do not describe a consistent mode).
pub fn set_hvm_context(st: &mut unicorn_gaps::CpuState, ctx: &[u8; HVM_CONTEXT_SIZE]) -> Result<(), i64> {
    let mode = u32_at(ctx, 0);
    let r = &ctx[8..];
    let (cr0, cr3, cr4, efer);
    match mode {
        HVM_MODE_32B => {
            // eax, ecx, edx, ebx, esp, ebp, esi, edi, eip, eflags; cr0, cr3, cr4; pad; efer;
            // cs/ds/ss/es/tr base; the same limits; the same attributes.
            for i in 0..8 {
                st.set_reg(i, u32_at(r, 4 * i) as u64);
            }
            st.set_rip(u32_at(r, 32) as u64);
            st.set_rflags(u32_at(r, 36) as u64);
            (cr0, cr3, cr4) = (u32_at(r, 40) as u64, u32_at(r, 44) as u64, u32_at(r, 48) as u64);
            efer = u64_at(r, 56);
            let segs = [
                (unicorn_gaps::R_CS, 0usize),
                (unicorn_gaps::R_DS, 1),
                (unicorn_gaps::R_SS, 2),
                (unicorn_gaps::R_ES, 3),
            ];
            for (reg, i) in segs {
                let (base, limit, ar) = (u32_at(r, 64 + 4 * i), u32_at(r, 84 + 4 * i), u16_at(r, 104 + 2 * i));
                check_segment(ar, limit, reg)?;
                let selector = if ar == 0 { 0 } else { (8 * (i + 1)) as u16 };
                st.set_seg(reg, Segment { selector, base: base as u64, limit, flags: ar_to_flags(ar) });
            }
            for reg in [unicorn_gaps::R_FS, unicorn_gaps::R_GS] {
                st.set_seg(reg, Segment::default());
            }
            let (tr_base, tr_limit, tr_ar) = (u32_at(r, 80), u32_at(r, 100), u16_at(r, 112));
            let tr_ar = if tr_ar == 0 { 0x8b } else { tr_ar };
            st.set_tr(Segment { selector: 0, base: tr_base as u64, limit: tr_limit, flags: ar_to_flags(tr_ar) });
        }
        HVM_MODE_64B => {
            // rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, rip, rflags, cr0, cr3, cr4, efer.
            for i in 0..8 {
                st.set_reg(i, u64_at(r, 8 * i));
            }
            st.set_rip(u64_at(r, 64));
            st.set_rflags(u64_at(r, 72));
            (cr0, cr3, cr4, efer) = (u64_at(r, 80), u64_at(r, 88), u64_at(r, 96), u64_at(r, 104));
            // Flat segments, CS a 64-bit code segment, a 64-bit TSS.
            st.set_seg(unicorn_gaps::R_CS, Segment { selector: 0x08, base: 0, limit: !0, flags: ar_to_flags(0xa9b) });
            for reg in [unicorn_gaps::R_DS, unicorn_gaps::R_SS, unicorn_gaps::R_ES] {
                st.set_seg(reg, Segment { selector: 0x10, base: 0, limit: !0, flags: ar_to_flags(0xc93) });
            }
            for reg in [unicorn_gaps::R_FS, unicorn_gaps::R_GS] {
                st.set_seg(reg, Segment::default());
            }
            st.set_tr(Segment { selector: 0x18, base: 0, limit: 0x67, flags: ar_to_flags(0x8b) });
            let long = cr0 & mmu::CR0_PG != 0 && cr0 & mmu::CR0_PE != 0 && cr4 & mmu::CR4_PAE != 0;
            if !long || efer & mmu::EFER_LME == 0 {
                return Err(errno::EINVAL);
            }
        }
        _ => return Err(errno::EINVAL),
    }
    // Paging needs protection; long mode needs PAE and LME.
    if cr0 & mmu::CR0_PG != 0 && cr0 & mmu::CR0_PE == 0 {
        return Err(errno::EINVAL);
    }
    let mut efer = efer & !mmu::EFER_LMA;
    if cr0 & mmu::CR0_PG != 0 && efer & mmu::EFER_LME != 0 {
        if cr4 & mmu::CR4_PAE == 0 {
            return Err(errno::EINVAL);
        }
        efer |= mmu::EFER_LMA;
    }
    st.set_cr(0, cr0 | (1 << 4)); // ET is hard-wired
    st.set_cr(2, 0);
    st.set_cr(3, cr3);
    st.set_cr(4, cr4);
    st.set_efer(efer);
    st.set_gdt(0, 0);
    st.set_idt(0, 0);
    st.end_exception();
    st.clear_interrupt_shadow();
    st.sync_hflags();
    Ok(())
}
