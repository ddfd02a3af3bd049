//! HYPERVISOR_vcpu_op (vcpu.h, hvm/hvm_vcpu.h) and set_timer_op: bringing
//! vCPUs up and down, vcpu_info placement, the runstate and time areas,
//! one-shot and periodic timers.

use super::{Call, HcResult};
use crate::abi::{errno, Width};
use crate::mmu;
use crate::unicorn_gaps::{self, Segment};
use crate::exit::ExitReason;
use crate::vcpu::{xen_deadline, Activity, Area, PeriodicTimer};
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
const SEND_NMI: u64 = 11;
const GET_PHYSID: u64 = 12;
const REGISTER_VCPU_TIME_MEMORY_AREA: u64 = 13;
const REGISTER_RUNSTATE_PHYS_AREA: u64 = 14;
const REGISTER_VCPU_TIME_PHYS_AREA: u64 = 15;

const MIN_PERIOD_NS: u64 = 1_000_000;
/// Xen's STIME_DELTA_MAX: the longest period, so that now + period cannot
/// overflow s_time_t.
pub const MAX_PERIOD_NS: u64 = u64::MAX >> 2;
/// set_timer_op: a deadline this far ahead is taken for a wrapped one (Xen's)
const SET_TIMER_OP_FAR_NS: u64 = 1 << 50;
/// and fires this long from now instead.
const SET_TIMER_OP_WRAPPED_DELAY_NS: u64 = 100_000_000;

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
            // Initialised but still down: it runs after VCPUOP_up.
            target.initialised = true;
            target.down = true;
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
                target.boosted = true;
                c.effects.woke_other = true;
            }
            Ok(0)
        }
        DOWN => {
            if c.vcpus.iter().all(|x| x.id == v || x.down) {
                // Taking the last vCPU down powers the domain off (Xen's domain_shutdown).
                c.exit_with(ExitReason::Shutdown { reason: crate::abi::schedop::SHUTDOWN_POWEROFF });
                return Ok(0);
            }
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
            // As Xen's map_guest_area: within one page, naturally aligned
            // (the guest and Xen update its words atomically), once.
            // (Aligned to the event word: 4 bytes in the 32-bit layout.)
            if offset + VCPU_INFO_SIZE > 4096 || !offset.is_multiple_of(c.dom.shinfo_width().ulong()) {
                return Err(errno::ENXIO);
            }
            let gpa = mfn.checked_mul(4096).filter(|g| c.dom.ram.is_ram(*g, 4096)).ok_or(errno::EINVAL)? + offset;
            if c.dom.ports().vcpu_info_registered(v) {
                return Err(errno::EBUSY);
            }
            let dst = c.dom.ram.slice_mut(gpa, VCPU_INFO_SIZE).map_err(|_| errno::EINVAL)?;
            // Carry over what the old location held (pending flags, time),
            // then flag every selector word and the upcall, so that nothing
            // pending is lost in the move (a spurious upcall, as with Xen).
            let old = c.dom.ports().vcpu_info(v).and_then(|o| c.dom.ram.slice(o, VCPU_INFO_SIZE).ok().map(|s| s.to_vec()));
            match old {
                Some(o) => dst.copy_from_slice(&o),
                None => dst.fill(0),
            }
            let (sel, sel_len) = c.dom.ports().layout().pending_sel();
            dst[sel as usize..(sel + sel_len) as usize].fill(0xff);
            dst[0] = 1;
            c.dom.ports().register_vcpu_info(v, gpa);
            c.dom.update_vcpu_time(v);
            c.notified(Some(v));
            Ok(0)
        }
        REGISTER_RUNSTATE_MEMORY_AREA | REGISTER_VCPU_TIME_MEMORY_AREA => {
            // union { XEN_GUEST_HANDLE h; ... uint64_t p; } addr: a 32-bit
            // caller's handle is its low 4 bytes.
            let addr = c.guest.read_handle(arg)?;
            let x = &mut c.vcpus[v as usize];
            let area = if cmd == REGISTER_RUNSTATE_MEMORY_AREA { &mut x.runstate_area } else { &mut x.time_area };
            *area = (addr != 0).then_some(Area::Virtual(addr));
            // Written now through the caller's page tables if it is the
            // caller's; another vCPU's is written when that vCPU next runs.
            c.effects.refresh_areas = own;
            Ok(0)
        }
        REGISTER_RUNSTATE_PHYS_AREA | REGISTER_VCPU_TIME_PHYS_AREA => {
            // struct vcpu_register_{runstate,time}_phys_area { uint64_t addr; }
            let addr = c.guest.read_u64(arg)?;
            let runstate_len = c.dom.shinfo_width().align(4, 8) + 40;
            let len = if cmd == REGISTER_RUNSTATE_PHYS_AREA { runstate_len } else { 32 };
            if addr % 8 != 0 || (addr & 0xfff) + len > 4096 {
                return Err(errno::ENXIO);
            }
            if addr != u64::MAX && !c.dom.ram.is_ram(addr & !0xfff, 4096) {
                return Err(errno::EINVAL);
            }
            let x = &mut c.vcpus[v as usize];
            let area = if cmd == REGISTER_RUNSTATE_PHYS_AREA { &mut x.runstate_area } else { &mut x.time_area };
            // An all-ones address unregisters.
            *area = (addr != u64::MAX).then_some(Area::Physical(addr));
            c.effects.refresh_areas = own;
            Ok(0)
        }
        GET_RUNSTATE_INFO => {
            // In the caller's layout (Xen's compat vcpu_op for a 32-bit call).
            let info = c.vcpus[v as usize].runstate.info(c.dom.system_time_ns(), c.width());
            c.guest.write(arg, &info)?;
            Ok(0)
        }
        SET_SINGLESHOT_TIMER => {
            if !own {
                return Err(errno::EINVAL);
            }
            // struct vcpu_set_singleshot_timer { uint64_t timeout_abs_ns; uint32_t flags; }
            // Xen 4.18 and later ignore the flags (VCPU_SSHOTTMR_future
            // included): a deadline in the past fires at once.
            let deadline = c.guest.read_u64(arg)?;
            c.guest.read_u32(arg + 8)?;
            c.me().timers.singleshot_ns = Some(xen_deadline(deadline));
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
            if !(MIN_PERIOD_NS..=MAX_PERIOD_NS).contains(&period_ns) {
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
        SEND_NMI => {
            if arg != 0 {
                return Err(errno::EINVAL);
            }
            c.vcpus[v as usize].nmi_pending = true;
            c.notified(Some(v));
            Ok(0)
        }
        // The physical CPU's id is for the hardware domain only.
        GET_PHYSID => Err(errno::EINVAL),
        _ => Err(errno::ENOSYS),
    }
}

/// set_timer_op(timeout): a one-shot timer at absolute system time; 0 stops it.
pub fn set_timer_op(c: &mut Call, args: [u64; 5]) -> HcResult {
    // A 32-bit caller passes the 64-bit time in two arguments (low, high).
    let timeout = match c.width() {
        Width::Bits64 => args[0],
        Width::Bits32 => args[0] | args[1] << 32,
    };
    let now = c.dom.system_time_ns();
    c.me().timers.singleshot_ns = match timeout {
        0 => None,
        // As Xen does for Linux's wrapped jiffies: a deadline negative as
        // s_time_t or more than 2^50 ns (13 days) ahead fires in 100 ms.
        t if t > i64::MAX as u64 || t.saturating_sub(now) >= SET_TIMER_OP_FAR_NS => {
            Some(now + SET_TIMER_OP_WRAPPED_DELAY_NS)
        }
        t => Some(t),
    };
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

/// The segments `set_hvm_context` loads from a 32-bit context.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seg {
    Cs,
    Ds,
    Ss,
    Es,
    Tr,
}

/// A segment's attributes as Xen's check_segment accepts them (returning
/// them with the accessed bit set).
fn check_segment(ar: u16, which: Seg) -> Result<u16, i64> {
    if ar & 0xf000 != 0 {
        return Err(errno::EINVAL);
    }
    if ar == 0 {
        // Null: allowed for DS and ES only.
        return if matches!(which, Seg::Ds | Seg::Es) { Ok(0) } else { Err(errno::EINVAL) };
    }
    let (kind, s, present) = (ar & 0xf, ar & 0x10 != 0, ar & 0x80 != 0);
    if !present {
        return Err(errno::EINVAL);
    }
    if which == Seg::Tr {
        // A busy 32-bit TSS, a system segment: the only type Xen's
        // check_segment takes for TR (an available one is refused too).
        if s || kind != 0xb {
            return Err(errno::EINVAL);
        }
        return Ok(ar);
    }
    if !s {
        return Err(errno::EINVAL);
    }
    let code = kind & 0x8 != 0;
    let ok = match which {
        Seg::Cs => code,
        Seg::Ss => !code && kind & 0x2 != 0,
        // Data, or readable code (not execute-only).
        _ => !code || kind & 0x2 != 0,
    };
    if !ok {
        return Err(errno::EINVAL);
    }
    Ok(ar | 0x1)
}

fn dpl(ar: u16) -> u16 {
    (ar >> 5) & 3
}

/// A segment limit as the processor applies it (page granular with G).
fn scaled_limit(limit: u32, ar: u16) -> u64 {
    if ar & 0x800 != 0 {
        ((limit as u64) << 12) | 0xfff
    } else {
        limit as u64
    }
}

/// CR4 bits a guest may set here: what this vCPU's CPUID offers (no VMX,
/// SMX, LA57, PKE, CET).
const CR4_VALID: u64 = 0x7ff | (1 << 11) | (1 << 16) | (1 << 17) | (1 << 18) | (1 << 20) | (1 << 21);
const EFER_VALID: u64 = mmu::EFER_SCE | mmu::EFER_LME | mmu::EFER_LMA | mmu::EFER_NXE;
/// The architectural RFLAGS bits (CF .. ID); bit 1 always reads 1.
const RFLAGS_VALID: u64 = 0x3f_7fd5;

/// Load a `vcpu_hvm_context` (hvm_vcpu.h) into `st`, with the checks Xen's
/// arch_set_info_hvm_guest makes (-EINVAL for a nonzero pad, an unknown
/// mode, a bad segment, registers that do not describe a consistent mode).
/// What the context does not name (FS, GS, LDTR, GDTR, IDTR) is left as it
/// was.
pub fn set_hvm_context(st: &mut unicorn_gaps::CpuState, ctx: &[u8; HVM_CONTEXT_SIZE]) -> Result<(), i64> {
    let mode = u32_at(ctx, 0);
    if u32_at(ctx, 4) != 0 {
        return Err(errno::EINVAL);
    }
    let r = &ctx[8..];
    let (cr0, cr3, cr4, efer, rflags);
    match mode {
        HVM_MODE_32B => {
            // eax, ecx, edx, ebx, esp, ebp, esi, edi, eip, eflags; cr0, cr3, cr4; pad1; efer;
            // cs/ds/ss/es/tr base; the same limits; the same attributes; pad2[3].
            if u32_at(r, 52) != 0 || r[114..120].iter().any(|&b| b != 0) {
                return Err(errno::EINVAL);
            }
            let segs = [(Seg::Cs, 0usize), (Seg::Ds, 1), (Seg::Ss, 2), (Seg::Es, 3), (Seg::Tr, 4)];
            let mut loaded = [(0u32, 0u32, 0u16); 5];
            for (which, i) in segs {
                let ar = check_segment(u16_at(r, 104 + 2 * i), which)?;
                loaded[i] = (u32_at(r, 64 + 4 * i), u32_at(r, 84 + 4 * i), ar);
            }
            let [cs, ds, ss, es, tr] = loaded;
            let eip = u32_at(r, 32) as u64;
            if eip > scaled_limit(cs.1, cs.2) || dpl(ss.2) != dpl(cs.2) {
                return Err(errno::EINVAL);
            }
            if [ds, es].iter().any(|d| d.2 != 0 && dpl(d.2) > dpl(cs.2)) {
                return Err(errno::EINVAL);
            }
            for i in 0..8 {
                st.set_reg(i, u32_at(r, 4 * i) as u64);
            }
            st.set_rip(eip);
            rflags = u32_at(r, 36) as u64;
            (cr0, cr3, cr4) = (u32_at(r, 40) as u64, u32_at(r, 44) as u64, u32_at(r, 48) as u64);
            efer = u64_at(r, 56);
            if efer & mmu::EFER_LMA != 0 && efer & mmu::EFER_LME == 0 {
                return Err(errno::EINVAL);
            }
            let seg = |(base, limit, ar): (u32, u32, u16), selector: u16| Segment {
                selector: if ar == 0 { 0 } else { selector },
                base: base as u64,
                limit: scaled_limit(limit, ar) as u32,
                flags: ar_to_flags(ar),
            };
            st.set_seg(unicorn_gaps::R_CS, seg(cs, 0x08));
            st.set_seg(unicorn_gaps::R_DS, seg(ds, 0x10));
            st.set_seg(unicorn_gaps::R_SS, seg(ss, 0x10));
            st.set_seg(unicorn_gaps::R_ES, seg(es, 0x10));
            st.set_tr(seg(tr, 0x18));
        }
        HVM_MODE_64B => {
            // rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, rip, rflags, cr0, cr3, cr4, efer.
            let rip = u64_at(r, 64);
            (cr0, cr3, cr4, efer) = (u64_at(r, 80), u64_at(r, 88), u64_at(r, 96), u64_at(r, 104));
            if !mmu::is_canonical(rip) || cr0 & mmu::CR0_PG == 0 || cr4 & mmu::CR4_PAE == 0 || efer & mmu::EFER_LME == 0 {
                return Err(errno::EINVAL);
            }
            for i in 0..8 {
                st.set_reg(i, u64_at(r, 8 * i));
            }
            st.set_rip(rip);
            rflags = u64_at(r, 72);
            // Flat segments, CS a 64-bit code segment, a 64-bit busy TSS.
            st.set_seg(unicorn_gaps::R_CS, Segment { selector: 0x08, base: 0, limit: !0, flags: ar_to_flags(0xa9b) });
            for reg in [unicorn_gaps::R_DS, unicorn_gaps::R_SS, unicorn_gaps::R_ES] {
                st.set_seg(reg, Segment { selector: 0x10, base: 0, limit: !0, flags: ar_to_flags(0xc93) });
            }
            st.set_tr(Segment { selector: 0x18, base: 0, limit: 0x67, flags: ar_to_flags(0x8b) });
        }
        _ => return Err(errno::EINVAL),
    }
    if cr4 & !CR4_VALID != 0 || efer & !EFER_VALID != 0 || (cr0 & mmu::CR0_PG != 0 && cr0 & mmu::CR0_PE == 0) {
        return Err(errno::EINVAL);
    }
    // LMA follows LME, as Xen sets it.
    let efer = if efer & mmu::EFER_LME != 0 { efer | mmu::EFER_LMA } else { efer };
    st.set_rflags((rflags & RFLAGS_VALID) | 2);
    st.set_cr(0, cr0 | (1 << 4)); // ET is hard-wired
    st.set_cr(3, cr3);
    st.set_cr(4, cr4);
    st.set_efer(efer);
    st.end_exception();
    st.clear_interrupt_shadow();
    st.sync_hflags();
    Ok(())
}
