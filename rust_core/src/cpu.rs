//! The engine the domain's vCPUs run on, and its hooks.
//!
//! One Unicorn engine serves every vCPU of a domain, in turn: a vCPU's
//! registers are loaded into the engine for its time slice and saved back
//! after it (`load`/`save`), as QEMU's single-threaded round-robin TCG
//! runs several CPUs. One engine rather than one per vCPU because
//! (docs/unicorn.md): LOCK'd instructions are not atomic between engines
//! on different threads, so vCPUs share one thread anyway; and an engine
//! only notices writes to code it translated when they come through
//! itself: with an engine per vCPU, code that one vCPU patches (Linux's
//! static keys, alternatives, text_poke) would stay stale in the others'
//! translation caches. One engine also translates the kernel once, not
//! once per vCPU.
//!
//! Hooks run inside Unicorn and only record why they stopped the engine
//! (`Stop`), except hypercalls, CPUID, port I/O and LAPIC accesses, which
//! are served in the hook without leaving the engine. Anything that edits
//! hidden CPU state happens after the engine has stopped, where the saved
//! state is complete (`unicorn_gaps`).

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use unicorn_engine::{uc_engine, uc_error, HookType, X86Insn};

use crate::cpuid::{CpuidPolicy, ARCH_CAPABILITIES, MSR_ARCH_CAPABILITIES, XEN_CPUID_BASE, XEN_HYPERCALL_MSR};
use crate::exit::ExitReason;
use crate::hypercall::{self, Call};
use crate::interrupts;
use crate::lapic::{self, IpiKind, LAPIC_BASE, LAPIC_SIZE};
use crate::layout;
use crate::memory::GuestRam;
use crate::mmu::{self, PagingState};
use crate::ticker::{KickFlags, Kicker, Ticker};
use crate::uc::{self, Engine, Reg};
use crate::unicorn_gaps::{self, BlobLayout, CpuState, InterruptLine, LiveMode, SoftTlb};
use crate::abi::Width;
use crate::vcpu::Vcpu;
use crate::xen::{DomainState, Remap};

pub const MSR_EFER: u32 = 0xc000_0080;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_SYSENTER_CS: u32 = 0x174;
pub const MSR_SYSENTER_ESP: u32 = 0x175;
pub const MSR_SYSENTER_EIP: u32 = 0x176;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_FMASK: u32 = 0xc000_0084;

const VMCALL: [u8; 3] = [0x0f, 0x01, 0xc1];
const RDMSR: [u8; 2] = [0x0f, 0x32];
/// Code hooks are matched one by one against every instruction Unicorn
/// translates: past this many RDMSR sites, new ones are left to Unicorn.
const MAX_RDMSR_SITES: usize = 256;

/// A translated block as Unicorn's new-block (edge) hook gives it.
#[repr(C)]
struct UcTb {
    pc: u64,
    icount: u16,
    size: u16,
}
const VMMCALL: [u8; 3] = [0x0f, 0x01, 0xd9];

/// Why a hook stopped the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Look again before going on: a kick, a timer or event changed, an
    /// interrupt for this vCPU.
    Kicked,
    /// Xen placed pages outside RAM: map them before the guest goes on.
    Remap,
    Syscall,
    /// SYSENTER: Unicorn only stepped over it (32-bit Linux's system calls).
    Sysenter,
    WatchHypercallMsr,
    /// The vCPU blocked or polls (SCHEDOP_block/poll): its slice ends.
    Block,
    /// Another vCPU was woken (an IPI, an event): end this slice so that it
    /// runs soon.
    Yield,
    Exit(ExitReason),
}

/// What the hooks reach while the engine runs, set for each `start`.
/// Raw pointers: the hooks are called behind Rust's back, and the slice
/// loop holds no reference to these while the engine runs.
struct RunCtx {
    dom: *mut DomainState,
    vcpus: *mut Vec<Vcpu>,
}

/// Heap-allocated and reached only through a raw pointer: Unicorn's
/// callbacks write to it, so no `&mut` to it may be live across `uc_emu_start`.
struct HookData {
    ram: Arc<GuestRam>,
    ctx: RunCtx,
    /// The vCPU whose registers the engine holds.
    current: u32,
    cpuid: CpuidPolicy,
    stop: Option<Stop>,
    /// An exception Unicorn raised (RIP at the faulting instruction, or
    /// after INT n). Kept apart from `stop`: with Unicorn's exit checks
    /// off, a stop requested mid-block lets the block go on, and a fault
    /// later in it must not erase the earlier reason (or the reverse).
    exception: Option<u8>,
    /// CPU state at the last CPUID of leaf base+2 (see `on_cpuid`).
    cpuid_snapshot: uc::Context,
    /// Replaying after a rewind: CPUID answers without stopping again.
    replaying: bool,
    layout: BlobLayout,
    /// The engine's state at power-on (what INIT resets a vCPU to).
    pristine: CpuState,
    /// Shared with the ticker (see ticker.rs).
    kick: *const KickFlags,
    /// The interrupt line and whether it was just acknowledged: the vCPU
    /// reached a point where it can take an interrupt (IF=1, no shadow).
    line: Option<InterruptLine>,
    window_open: bool,
    /// The engine's live mode (for the hypercall ABI).
    mode: Option<LiveMode>,
    /// RDMSR sites (linear addresses) with a code hook, and those found in
    /// new blocks whose hook is still to be added (see `on_new_block`).
    rdmsr_sites: std::collections::HashSet<u64>,
    pending_rdmsr_sites: Vec<u64>,
    /// An RDMSR of an MSR Unicorn does not know is about to run here: its
    /// result is put in EDX:EAX at the instruction after it.
    rdmsr_armed: Option<(u64, u64)>,
    /// RDMSRs answered in place of Unicorn.
    rdmsrs_answered: u64,
    /// While breakpoints are on the engine: the state at the exception
    /// that ended the run, if one did (see `Cpu::start`).
    exception_state: Option<CpuState>,
    exception_taken: bool,
    /// The engine's TLB and the pages holding translated code: stores to
    /// other pages get their fast path back (see `unicorn_gaps::SoftTlb`).
    tlb: Option<SoftTlb>,
    code_pages: CodePages,
}

thread_local! {
    /// The hooks of the engine running on this thread (inside `Cpu::start`),
    /// for `on_memory_lookup`, which Unicorn calls without a user pointer.
    static RUNNING: std::cell::Cell<*mut HookData> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// Unicorn's guest-physical lookup, which it makes on every slow-path
/// access: a store through a `TLB_NOTDIRTY` entry comes here first. If
/// the page holds no translated code, the entry's flag is cleared, as
/// QEMU's notdirty_write would (see `unicorn_gaps::SoftTlb`): a stream
/// of stores to a fresh page (Linux clearing its .bss) pays the slow path
/// once, not at every store until the next run.
unsafe extern "C" fn on_memory_lookup(uc: *mut uc_engine, addr: u64) -> *mut c_void {
    let region = unicorn_gaps::memory_lookup(uc, addr);
    let h = RUNNING.with(|r| r.get());
    if !h.is_null() && (*h).code_pages.complete && !(*h).code_pages.holds_code(addr) {
        if let Some(tlb) = &(*h).tlb {
            (*h).code_pages.entries_cleared += tlb.clear_page(addr);
        }
    }
    region
}

/// Guest-physical pages that translated code came from since the code
/// cache was last emptied (a superset: code Unicorn drops is not taken
/// out). Pages above RAM (grant frames and the like) always count as code.
struct CodePages {
    /// One bit per page of guest-physical space below the end of RAM.
    bits: Vec<u64>,
    /// Every block translated since the last flush was seen. Not so at
    /// first (Unicorn translates an engine's first block without the
    /// new-block hook) nor after a block whose page was not found in the
    /// TLB: then no entry is cleared until the code cache is next emptied.
    complete: bool,
    /// TLB entries whose stores were let through, and pages that got code.
    entries_cleared: u64,
    pages_protected: u64,
    missed: u64,
}

impl CodePages {
    fn new(ram_end: u64) -> Self {
        Self { bits: vec![0; ram_end.div_ceil(layout::PAGE_SIZE * 64) as usize], complete: false, entries_cleared: 0, pages_protected: 0, missed: 0 }
    }

    fn holds_code(&self, gpa: u64) -> bool {
        let page = gpa / layout::PAGE_SIZE;
        self.bits.get((page / 64) as usize).is_none_or(|w| w & (1 << (page % 64)) != 0)
    }

    /// Note code at `gpa`; returns whether its page had none before.
    fn mark(&mut self, gpa: u64) -> bool {
        let page = gpa / layout::PAGE_SIZE;
        match self.bits.get_mut((page / 64) as usize) {
            Some(w) if *w & (1 << (page % 64)) == 0 => {
                *w |= 1 << (page % 64);
                true
            }
            _ => false,
        }
    }

    /// The code cache was emptied; `hooked`: every block from now on
    /// reaches the new-block hook.
    fn reset(&mut self, hooked: bool) {
        self.bits.fill(0);
        self.complete = hooked;
    }
}

impl Stop {
    /// When two reasons meet in one run, the one that needs more of the
    /// loop wins (the others are implied by it or harmless to drop).
    fn rank(&self) -> u8 {
        match self {
            Stop::Kicked => 0,
            Stop::Yield => 1,
            Stop::Syscall | Stop::Sysenter => 2,
            Stop::WatchHypercallMsr => 3,
            Stop::Remap => 4,
            Stop::Block => 5,
            Stop::Exit(_) => 6,
        }
    }
}

impl HookData {
    /// Note the RDMSRs in `len` bytes of code at linear `pc` that have no
    /// hook yet; returns whether there were any. A match may be a false one
    /// inside another instruction: its hook then never sees an instruction
    /// start there, and does nothing.
    unsafe fn find_rdmsr_sites(&mut self, uc: *mut uc_engine, pc: u64, len: usize) -> bool {
        let mut code = vec![0u8; len];
        let ps = paging_of_raw(uc);
        let mut m: &GuestRam = &self.ram;
        if len < 2 || mmu::read_linear(&mut m, &ps, pc, &mut code, false).is_err() {
            return false;
        }
        let before = self.pending_rdmsr_sites.len();
        for (i, w) in code.windows(2).enumerate() {
            let at = pc.wrapping_add(i as u64);
            if w == RDMSR && !self.rdmsr_sites.contains(&at) && !self.pending_rdmsr_sites.contains(&at) {
                self.pending_rdmsr_sites.push(at);
            }
        }
        self.pending_rdmsr_sites.len() > before
    }

    /// Record why the engine stops.
    /// A block was just translated from `size` bytes at linear `pc`: note
    /// its pages as code, and where one had none, send stores to it through
    /// Unicorn's slow path again from every TLB entry (any virtual alias).
    unsafe fn note_code(&mut self, pc: u64, size: u16) {
        let Some(tlb) = &mut self.tlb else { return };
        let first = pc & !(layout::PAGE_SIZE - 1);
        let last = pc.wrapping_add(size.max(1) as u64 - 1) & !(layout::PAGE_SIZE - 1);
        let pages = &mut self.code_pages;
        let spans = if last == first { 1 } else { 2 };
        for &at in &[first, last][..spans] {
            let mut fresh = [0usize; 3];
            let mut nfresh = 0;
            let found = tlb.code_page(at, |gpa, host| {
                if pages.mark(gpa) && nfresh < fresh.len() {
                    fresh[nfresh] = host;
                    nfresh += 1;
                }
            });
            for &host in &fresh[..nfresh] {
                tlb.protect(host);
                pages.pages_protected += 1;
            }
            if !found {
                pages.complete = false;
                pages.missed += 1;
                // Unicorn skipped its own walk for this block (see
                // `unicorn_gaps::skip_block_walks`): make it here.
                if pc >= unicorn_gaps::NO_WALK_START {
                    tlb.protect_block(pc, size as u64);
                }
            }
        }
    }

    fn stop(&mut self, uc: *mut uc_engine, why: Stop) {
        if self.stop.as_ref().is_none_or(|s| s.rank() < why.rank()) {
            self.stop = Some(why);
        }
        unsafe { uc::raw_stop(uc) };
    }
}

pub struct Cpu {
    // Field order matters: the engine (and its hooks) goes before HookData.
    engine: Engine,
    hooks: *mut HookData,
    ticker: Ticker,
    /// Unicorn's exit check after memory accesses is on (only while stepping).
    exit_checks: bool,
    /// Translated code thrown away whole (ours, and Unicorn's after a step).
    pub code_cache_flushes: u64,
    /// Times another vCPU's registers were loaded.
    pub context_switches: u64,
    /// The engine has run: its new blocks reach `on_new_block` (Unicorn
    /// skips the hook for the very first block of an engine).
    ran: bool,
    /// A run has returned: the engine's first block is behind it.
    engine_ran: bool,
    /// The vCPU whose translations the TLB holds.
    tlb_owner: Option<u32>,
    /// Instructions left to watch for the hypercall-page WRMSR.
    pub msr_watch: u32,
    /// A hypercall page was requested at a guest-physical frame that is not RAM.
    pub bad_hypercall_page: bool,
    /// The debugger's breakpoints as the engine has them (sorted).
    breakpoints: Vec<u64>,
}

unsafe fn paging_of_raw(uc: *mut uc_engine) -> PagingState {
    PagingState {
        cr0: uc::raw_read(uc, Reg::CR0),
        cr3: uc::raw_read(uc, Reg::CR3),
        cr4: uc::raw_read(uc, Reg::CR4),
        efer: uc::raw_read_msr(uc, MSR_EFER),
    }
}

/// The linear address of the next instruction: CS base + IP in real mode,
/// RIP otherwise (every protected-mode code segment we run is flat).
unsafe fn linear_ip_raw(uc: *mut uc_engine) -> u64 {
    let rip = uc::raw_read(uc, Reg::RIP);
    if uc::raw_read(uc, Reg::CR0) & mmu::CR0_PE == 0 {
        (uc::raw_read(uc, Reg::CS) << 4) + (rip & 0xffff)
    } else {
        rip
    }
}

unsafe extern "C" fn on_interrupt(uc: *mut uc_engine, intno: u32, user: *mut c_void) {
    let h = &mut *(user as *mut HookData);
    // The #GP right after an acknowledge is QEMU giving up the delivery of
    // ACK_VECTOR, not the guest's.
    if !(intno == interrupts::GP as u32 && h.window_open) {
        h.exception = Some(intno as u8);
    }
    if let Some(st) = h.exception_state.as_mut() {
        st.load_raw(uc);
        h.exception_taken = true;
    }
    uc::raw_stop(uc);
}

/// The interrupt line's acknowledge (unicorn_gaps::InterruptLine): the
/// vCPU can take an interrupt here. Any other read of the page (the guest
/// poking at it) sees the same value and nothing else happens.
unsafe extern "C" fn ack_read(uc: *mut uc_engine, offset: u64, size: c_uint, user: *mut c_void) -> u64 {
    let h = &mut *(user as *mut HookData);
    if offset == unicorn_gaps::VMCB_INT_VECTOR && size == 4 && h.line.as_ref().is_some_and(|l| l.acknowledge()) {
        h.window_open = true;
        h.stop(uc, Stop::Kicked);
    }
    unicorn_gaps::ACK_VECTOR
}

/// The registers a hypercall's arguments are in, by the caller's ABI.
fn arg_regs(width: Width) -> [Reg; 5] {
    match width {
        Width::Bits64 => [Reg::RDI, Reg::RSI, Reg::RDX, Reg::R10, Reg::R8],
        Width::Bits32 => [Reg::RBX, Reg::RCX, Reg::RDX, Reg::RSI, Reg::RDI],
    }
}

/// #UD: VMCALL/VMMCALL are hypercalls, anything else is a real #UD.
unsafe extern "C" fn on_invalid_insn(uc: *mut uc_engine, user: *mut c_void) -> bool {
    let h = &mut *(user as *mut HookData);
    let ps = paging_of_raw(uc);
    let mut code = [0u8; 3];
    let mut m: &GuestRam = &h.ram;
    let fetched = mmu::read_linear(&mut m, &ps, linear_ip_raw(uc), &mut code, false).is_ok();
    if !fetched || (code != VMCALL && code != VMMCALL) {
        h.exception = Some(interrupts::UD);
        uc::raw_stop(uc);
        return true;
    }
    let rip = uc::raw_read(uc, Reg::RIP);
    let mode = h.mode.as_ref().expect("set at engine creation");
    let width = if mode.in_64bit_code() { Width::Bits64 } else { Width::Bits32 };
    let (nr, args) = match width {
        Width::Bits64 => (uc::raw_read(uc, Reg::RAX), arg_regs(width).map(|r| uc::raw_read(uc, r))),
        Width::Bits32 => (
            uc::raw_read(uc, Reg::RAX) & 0xffff_ffff,
            arg_regs(width).map(|r| uc::raw_read(uc, r) & 0xffff_ffff),
        ),
    };
    // Xen refuses user mode and virtual-8086 mode alike (-EPERM).
    let cpl = if mode.in_vm86() { 3 } else { mode.cpl() };
    let (dom, vcpus) = (&mut *h.ctx.dom, &mut *h.ctx.vcpus);
    dom.milestones.hypercall();
    let me = h.current;
    let mut call = Call::new(&h.ram, ps, width, dom, vcpus, &h.pristine, me, cpl);
    let rax = hypercall::dispatch(&mut call, nr, args);
    // A 32-bit caller sees EAX: -errno as a 32-bit value.
    let rax = if width == Width::Bits32 { rax & 0xffff_ffff } else { rax };
    let fx = call.effects;
    if fx.refresh_areas {
        let clock = dom.clock;
        let width = dom.shinfo_width();
        vcpus[me as usize].write_areas(&h.ram, &clock, &ps, width);
    }
    if let Some(leading) = fx.restart {
        // Continued: the guest executes the VMCALL again, as after Xen's
        // hypercall_create_continuation; pending interrupts come first.
        for (&reg, value) in arg_regs(width).iter().zip(leading) {
            uc::raw_write(uc, reg, value);
        }
        uc::raw_write(uc, Reg::RAX, nr);
        unicorn_gaps::forget_pc_write(uc, &h.layout);
        let stop = match fx.exit {
            _ if fx.remap => Stop::Remap,
            Some(exit) => Stop::Exit(exit),
            None => Stop::Kicked,
        };
        h.stop(uc, stop);
        return true;
    }
    uc::raw_write(uc, Reg::RAX, rax);
    uc::raw_write(uc, Reg::RIP, rip + 3);
    unicorn_gaps::forget_pc_write(uc, &h.layout);
    if let Some(exit) = fx.exit {
        h.stop(uc, Stop::Exit(exit));
    } else if fx.block {
        h.stop(uc, Stop::Block);
    } else if fx.remap {
        h.stop(uc, Stop::Remap);
    } else if fx.woke_other {
        h.stop(uc, Stop::Yield);
    } else if fx.recheck {
        h.stop(uc, Stop::Kicked);
    }
    true
}

unsafe extern "C" fn on_cpuid(uc: *mut uc_engine, user: *mut c_void) -> c_int {
    let h = &mut *(user as *mut HookData);
    let leaf = uc::raw_read(uc, Reg::RAX) as u32;
    let sub = uc::raw_read(uc, Reg::RCX) as u32;
    if leaf == XEN_CPUID_BASE + 2 && !h.replaying {
        // The guest is about to write the hypercall-page MSR, which Unicorn
        // neither faults nor lets us hook; and a stop requested here only lands
        // at the end of this translated block, past the WRMSR perhaps.
        // Snapshot the state before this CPUID (RIP at it, EFLAGS made whole:
        // inside a block QEMU keeps the arithmetic flags apart) so that the
        // run loop can rewind and replay the block one instruction at a time.
        if h.cpuid_snapshot.save_raw(uc).is_ok() {
            let rip = uc::raw_read(uc, Reg::RIP);
            let rflags = uc::raw_read(uc, Reg::RFLAGS);
            unicorn_gaps::patch_rip_rflags(h.cpuid_snapshot.data_mut(), rip, rflags);
            h.stop(uc, Stop::WatchHypercallMsr);
        }
    }
    let r = h.cpuid.query(leaf, sub);
    uc::raw_write(uc, Reg::RAX, r.eax as u64);
    uc::raw_write(uc, Reg::RBX, r.ebx as u64);
    uc::raw_write(uc, Reg::RCX, r.ecx as u64);
    uc::raw_write(uc, Reg::RDX, r.edx as u64);
    1
}

/// A block was just translated (Unicorn calls this before it first runs).
/// Unicorn answers RDMSR itself, with 0 for MSRs it does not know, and has
/// no RDMSR hook; so every RDMSR in kernel code gets a code hook of its own
/// (`on_rdmsr_site`). Scanning here costs once per translation, where a
/// hook on all code would cost on every instruction. A block with a new
/// site is not run: the engine stops before its first instruction, the run
/// loop adds the hook and drops the block, and it is translated again with
/// the hook in it.
unsafe extern "C" fn on_new_block(uc: *mut uc_engine, tb: *const UcTb, _prev: *const UcTb, user: *mut c_void) {
    let h = &mut *(user as *mut HookData);
    if tb.is_null() {
        return;
    }
    h.note_code((*tb).pc, (*tb).size);
    if h.rdmsr_sites.len() + h.pending_rdmsr_sites.len() >= MAX_RDMSR_SITES {
        return;
    }
    // RDMSR outside ring 0 raises #GP: nothing to answer.
    let mode = h.mode.as_ref().expect("set at engine creation");
    if mode.cpl() != 0 || mode.in_vm86() {
        return;
    }
    if h.find_rdmsr_sites(uc, (*tb).pc, (*tb).size as usize) {
        h.stop(uc, Stop::Kicked);
    }
}

/// Before the instruction at an RDMSR site and before the one after it.
/// At an RDMSR (from ring 0) of an MSR the vCPU answers and Unicorn does
/// not, arm; at the next instruction, put the answer in EDX:EAX. Unicorn's
/// RDMSR itself runs in between (it only writes EDX:EAX).
unsafe extern "C" fn on_rdmsr_site(uc: *mut uc_engine, addr: u64, _size: u32, user: *mut c_void) {
    let h = &mut *(user as *mut HookData);
    if let Some((at, value)) = h.rdmsr_armed.take() {
        if at.wrapping_add(2) == addr {
            uc::raw_write(uc, Reg::RAX, value & 0xffff_ffff);
            uc::raw_write(uc, Reg::RDX, value >> 32);
            h.rdmsrs_answered += 1;
        }
    }
    let mode = h.mode.as_ref().expect("set at engine creation");
    if mode.cpl() != 0 || mode.in_vm86() {
        return;
    }
    let Some(value) = msr_answer(uc::raw_read(uc, Reg::RCX) as u32) else { return };
    let ps = paging_of_raw(uc);
    let mut code = [0u8; 2];
    let mut m: &GuestRam = &h.ram;
    if mmu::read_linear(&mut m, &ps, addr, &mut code, false).is_ok() && code == RDMSR {
        h.rdmsr_armed = Some((addr, value));
    }
}

/// MSRs the vCPU answers that Unicorn would read as 0.
fn msr_answer(index: u32) -> Option<u64> {
    (index == MSR_ARCH_CAPABILITIES && crate::cpuid::unaffected()).then_some(ARCH_CAPABILITIES)
}

unsafe extern "C" fn on_syscall(uc: *mut uc_engine, user: *mut c_void) {
    let h = &mut *(user as *mut HookData);
    h.stop(uc, Stop::Syscall);
}

unsafe extern "C" fn on_sysenter(uc: *mut uc_engine, user: *mut c_void) {
    let h = &mut *(user as *mut HookData);
    h.stop(uc, Stop::Sysenter);
}

/// Every lower-half block (user space): note that the vCPU is there, then
/// stop if a kick is pending. Runs before any instruction of the block, so
/// the stop is exact and the block's SYSCALL, if any, is not skipped.
unsafe extern "C" fn on_user_block(uc: *mut uc_engine, _addr: u64, _size: u32, user: *mut c_void) {
    let h = &*(user as *const HookData);
    let flags = &*h.kick;
    flags.user_blocks.store(flags.user_blocks.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    if !flags.in_user_space.load(Ordering::Relaxed) {
        flags.in_user_space.store(true, Ordering::SeqCst);
    }
    let dom = h.ctx.dom;
    if !dom.is_null() && (*dom).milestones.first_user_instruction.is_none() && h.mode.as_ref().is_some_and(|m| m.cpl() == 3) {
        (*dom).milestones.user_instruction();
    }
    if flags.kick.load(Ordering::SeqCst) {
        let h = &mut *(user as *mut HookData);
        h.stop(uc, Stop::Kicked);
    }
}

unsafe extern "C" fn lapic_read(_uc: *mut uc_engine, offset: u64, _size: c_uint, user: *mut c_void) -> u64 {
    let h = &*(user as *const HookData);
    let vcpus = &*h.ctx.vcpus;
    vcpus[h.current as usize].lapic.read(offset) as u64
}

unsafe extern "C" fn lapic_write(uc: *mut uc_engine, offset: u64, _size: c_uint, value: u64, user: *mut c_void) {
    let h = &mut *(user as *mut HookData);
    let vcpus = &mut *h.ctx.vcpus;
    let me = h.current;
    let Some(ipi) = vcpus[me as usize].lapic.write(offset, value as u32) else { return };
    let mut why = None;
    for t in lapic::targets(ipi, me, vcpus.iter().map(|v| &v.lapic)) {
        if t == me {
            // INIT and start-up to oneself are not delivered (Linux never
            // sends them); an interrupt or NMI is taken at the next stop.
            if !matches!(ipi.kind, IpiKind::Init | IpiKind::Startup(_)) && vcpus[me as usize].accept_ipi(ipi.kind, &h.pristine) {
                why.get_or_insert(Stop::Kicked);
            }
        } else if vcpus[t as usize].accept_ipi(ipi.kind, &h.pristine) {
            why = Some(Stop::Yield);
        }
    }
    if let Some(w) = why {
        h.stop(uc, w);
    }
}

/// The first piece of never-populated space one engine region covers (see `Cpu::new`).
const ABSENT_PIECE: u64 = 64 << 20;

/// The rest of the MMIO hole: absent hardware reads as all ones.
unsafe extern "C" fn absent_read(_uc: *mut uc_engine, _offset: u64, _size: c_uint, _user: *mut c_void) -> u64 {
    u64::MAX
}

unsafe extern "C" fn absent_write(_uc: *mut uc_engine, _offset: u64, _size: c_uint, _value: u64, _user: *mut c_void) {}

/// Port input: no device answers yet, so all ones, as on an empty bus.
unsafe extern "C" fn on_port_in(_uc: *mut uc_engine, _port: u32, size: c_int, _user: *mut c_void) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

/// Port output: nothing listens but the ways a PC powers off or resets: the
/// ACPI sleep control register (S5 is a power-off), the reset control
/// register at 0xcf9 (the FADT's RESET_REG) and the keyboard controller's
/// pulse-reset command; a reset is a reboot, as Xen reports it.
unsafe extern "C" fn on_port_out(uc: *mut uc_engine, port: u32, _size: c_int, value: u32, user: *mut c_void) {
    const SLP_EN: u32 = 1 << 5;
    let reason = match port {
        p if p == layout::ACPI_SLEEP_CONTROL_PORT as u32
            && value & SLP_EN != 0
            && (value >> 2) & 7 == layout::ACPI_SLP_TYP_S5 =>
        {
            crate::abi::schedop::SHUTDOWN_POWEROFF
        }
        p if p == layout::RESET_CONTROL_PORT as u32 && value & 0x4 != 0 => crate::abi::schedop::SHUTDOWN_REBOOT,
        0x64 if value & 0xff == 0xfe => crate::abi::schedop::SHUTDOWN_REBOOT,
        _ => return,
    };
    let h = &mut *(user as *mut HookData);
    h.stop(uc, Stop::Exit(ExitReason::Shutdown { reason }));
}

impl Cpu {
    /// The engine with guest RAM mapped and all hooks installed.
    pub fn new(ram: Arc<GuestRam>, domid: u32, nr_vcpus: u32) -> Result<Self, String> {
        let layout = unicorn_gaps::layout()?;
        let mut engine = Engine::new_x86_64().map_err(|e| e.to_string())?;
        // Before any code is translated: see `set_exit_checks`.
        unicorn_gaps::set_exit_checks(&engine, &layout, false);
        for r in ram.regions() {
            unsafe { engine.map_ptr(r.gpa, r.len, ram.host_ptr().add(r.host_offset as usize)) }
                .map_err(|e| e.to_string())?;
        }
        let low_end = ram.regions().first().map_or(0, |r| r.gpa + r.len);
        let high_end = ram.regions().get(1).map_or(layout::HIGH_RAM_START, |r| r.gpa + r.len);
        let ram_end = ram.regions().iter().map(|r| r.gpa + r.len).max().unwrap_or(0);
        let cpuid_snapshot = uc::Context::new(&engine, layout.data_offset).map_err(|e| e.to_string())?;
        let mut pristine = CpuState::new(&engine, layout)?;
        pristine.load(&engine);
        pristine.set_vm_vmcb(layout::INTERRUPT_ACK_PAGE);
        let ticker = Ticker::new();
        let hooks = Box::into_raw(Box::new(HookData {
            ram,
            ctx: RunCtx { dom: std::ptr::null_mut(), vcpus: std::ptr::null_mut() },
            current: 0,
            cpuid: CpuidPolicy { vcpu_id: 0, domid, nr_vcpus },
            stop: None,
            exception: None,
            cpuid_snapshot,
            replaying: false,
            layout,
            pristine,
            kick: ticker.flags(),
            line: None,
            mode: None,
            window_open: false,
            rdmsr_sites: std::collections::HashSet::new(),
            pending_rdmsr_sites: Vec::new(),
            rdmsr_armed: None,
            rdmsrs_answered: 0,
            exception_state: None,
            exception_taken: false,
            tlb: None,
            code_pages: CodePages::new(ram_end),
        }));
        let user = hooks as *mut c_void;
        let hooks_ok = unsafe {
            engine.add_hook(HookType::INTR, on_interrupt as *mut c_void, user, None)
                .and_then(|_| engine.add_hook(HookType::INSN_INVALID, on_invalid_insn as *mut c_void, user, None))
                .and_then(|_| engine.add_hook(HookType::INSN, on_cpuid as *mut c_void, user, Some(X86Insn::CPUID)))
                .and_then(|_| engine.add_hook(HookType::INSN, on_syscall as *mut c_void, user, Some(X86Insn::SYSCALL)))
                .and_then(|_| engine.add_hook(HookType::INSN, on_sysenter as *mut c_void, user, Some(X86Insn::SYSENTER)))
                .and_then(|_| engine.add_hook(HookType::EDGE_GENERATED, on_new_block as *mut c_void, user, None))
                .and_then(|_| unicorn_gaps::skip_block_walks(&mut engine, unicorn_gaps::NO_WALK_START, u64::MAX))
                .and_then(|_| engine.add_hook(HookType::INSN, on_port_in as *mut c_void, user, Some(X86Insn::IN)))
                .and_then(|_| engine.add_hook(HookType::INSN, on_port_out as *mut c_void, user, Some(X86Insn::OUT)))
                .and_then(|_| {
                    engine.add_hook_range(HookType::BLOCK, on_user_block as *mut c_void, user, 0, crate::ticker::USER_SPACE_END)
                })
                .and_then(|_| {
                    engine.map_mmio(LAPIC_BASE, LAPIC_SIZE, Some(lapic_read), Some(lapic_write), user)?;
                    engine.map_mmio(
                        layout::MMIO_HOLE_START,
                        LAPIC_BASE - layout::MMIO_HOLE_START,
                        Some(absent_read),
                        Some(absent_write),
                        user,
                    )?;
                    let after = LAPIC_BASE + LAPIC_SIZE;
                    let ack = layout::INTERRUPT_ACK_PAGE;
                    engine.map_mmio(after, ack - after, Some(absent_read), Some(absent_write), user)?;
                    engine.map_mmio(ack, layout::PAGE_SIZE, Some(ack_read), Some(absent_write), user)?;
                    let rest = ack + layout::PAGE_SIZE;
                    engine.map_mmio(rest, (1u64 << 32) - rest, Some(absent_read), Some(absent_write), user)?;
                    // Frames the domain never had read as all ones and
                    // drop writes, as Xen's empty p2m entries do: up to the
                    // hole, and above RAM to the top of guest-physical space.
                    // In pieces, small near RAM and doubling away from it:
                    // placing a page there (a grant frame, usually just
                    // past RAM) splits its piece, and Unicorn's unmap walks
                    // every page of it; few pieces keep engine creation cheap.
                    let mut absent = |from: u64, to: u64| -> Result<(), crate::uc::UcError> {
                        let mut at = from;
                        while at < to {
                            let end = (at + ABSENT_PIECE.max(at - from)).min(to);
                            engine.map_mmio(at, end - at, Some(absent_read), Some(absent_write), user)?;
                            at = end;
                        }
                        Ok(())
                    };
                    absent(low_end, layout::MMIO_HOLE_START)?;
                    absent(high_end, layout::GUEST_PHYS_END).map(|_| 0)
                })
        }
        .map_err(|e| e.to_string());
        if let Err(e) = hooks_ok {
            drop(engine);
            unsafe { drop(Box::from_raw(hooks)) };
            return Err(e);
        }
        // SAFETY: the engine is initialised (RAM mapped) and of the probed build.
        unsafe {
            (*hooks).line = Some(InterruptLine::new(engine.raw(), &layout));
            (*hooks).mode = Some(LiveMode::new(engine.raw(), &layout));
            (*hooks).tlb = Some(SoftTlb::new(engine.raw(), &layout));
            unicorn_gaps::watch_memory_lookups(engine.raw(), &layout, Some(on_memory_lookup));
        }
        ticker.set_engine(engine.raw());
        Ok(Self {
            engine,
            hooks,
            ticker,
            exit_checks: false,
            code_cache_flushes: 0,
            context_switches: 0,
            ran: false,
            engine_ran: false,
            tlb_owner: None,
            msr_watch: 0,
            bad_hypercall_page: false,
            breakpoints: Vec::new(),
        })
    }

    fn hooks(&self) -> &HookData {
        unsafe { &*self.hooks }
    }

    /// A fresh register state for vCPU `id` (the engine's power-on state).
    pub fn power_on_state(&self) -> Result<CpuState, String> {
        let mut st = CpuState::new(&self.engine, self.hooks().layout)?;
        st.copy_from(&self.hooks().pristine);
        Ok(st)
    }

    pub fn pristine(&self) -> &CpuState {
        &self.hooks().pristine
    }

    pub fn layout(&self) -> BlobLayout {
        self.hooks().layout
    }

    /// Put vCPU `v`'s registers on the engine. The TLB (and Unicorn's
    /// per-CPU jump cache) hold the last vCPU's translations: flushed when
    /// another vCPU comes on. Translated code is kept: it is keyed on the
    /// physical page and the CPU mode, so all vCPUs share it.
    pub fn load(&mut self, v: &mut Vcpu) {
        v.regs.store(&self.engine);
        if self.tlb_owner != Some(v.id) {
            self.engine.flush_tlb();
            if self.tlb_owner.is_some() {
                self.context_switches += 1;
            }
            self.tlb_owner = Some(v.id);
        }
        let h = unsafe { &mut *self.hooks };
        h.current = v.id;
        h.cpuid.vcpu_id = v.id;
    }

    /// Take the running vCPU's registers back off the engine.
    pub fn save(&mut self, v: &mut Vcpu) {
        v.regs.load(&self.engine);
        if self.msr_watch > 0 {
            // A watch cannot span slices (another vCPU may run next).
            self.msr_watch = 0;
            unsafe { (*self.hooks).replaying = false };
        }
    }

    /// Every vCPU made from now on (brought up, INIT) reads its TSC `offset`
    /// past the host's, as the domain's running vCPUs do (a restored domain).
    pub fn set_guest_tsc_offset(&mut self, offset: u64) {
        unsafe { (*self.hooks).pristine.set_tsc_offset(offset) }
    }

    /// The engine's registers are nobody's (a save or restore used it):
    /// the next vCPU loaded flushes the TLB.
    pub fn forget_loaded(&mut self) {
        self.tlb_owner = None;
    }

    /// The TLB no longer matches vCPU `v`'s registers (edited outside its slice).
    pub fn forget_tlb_of(&mut self, v: u32) {
        if self.tlb_owner == Some(v) {
            self.tlb_owner = None;
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Run the loaded vCPU from `rip` (`count` > 0: single-step) with the
    /// hooks reaching `dom` and `vcpus`. Returns the engine's result and
    /// whether a kick stopped it, or `None` if a kick was already pending
    /// (take it first).
    pub fn start(&mut self, dom: &mut DomainState, vcpus: &mut Vec<Vcpu>, rip: u64, count: usize) -> Option<(uc_error, bool)> {
        // Stepping stops through Unicorn's exit checks; kicks must not
        // land in a step (with the checks on they can tear instructions).
        self.set_exit_checks(count > 0);
        if !std::mem::replace(&mut self.ran, true) {
            // The first block: scan the rest of its page by hand.
            let ip = self.linear_ip();
            let len = (layout::PAGE_SIZE - (ip & (layout::PAGE_SIZE - 1))) as usize;
            if unsafe { (*self.hooks).find_rdmsr_sites(self.engine.raw(), ip, len) } {
                self.settle_rdmsr_sites();
            }
        }
        if count == 0 {
            self.let_stores_through();
        }
        unsafe { (*self.hooks).ctx = RunCtx { dom, vcpus } };
        // With exits set, Unicorn drops the code at each exit address after
        // every run by looking `exit - 1` up through the vCPU's page
        // tables as they are then; where that faults (a kernel address
        // seen from user mode), the fault is swallowed but leaves CR2, the
        // error code and old_exception behind (the next guest #PF became
        // #DF). The exception fields are put back as they were before the
        // run, or at the exception that ended it.
        let guard = if self.breakpoints.is_empty() { None } else { self.exception_guard() };
        RUNNING.with(|r| r.set(self.hooks));
        let r = if count > 0 {
            Some((self.engine.start(rip, count), false))
        } else {
            let engine = &mut self.engine;
            self.ticker.run(rip, || engine.start(rip, 0))
        };
        RUNNING.with(|r| r.set(std::ptr::null_mut()));
        unsafe { (*self.hooks).ctx = RunCtx { dom: std::ptr::null_mut(), vcpus: std::ptr::null_mut() } };
        self.engine_ran = true;
        if let Some((before, mut now)) = guard {
            let h = unsafe { &mut *self.hooks };
            now.load(&self.engine);
            match (h.exception_taken, h.exception_state.as_ref()) {
                (true, Some(at_exception)) => now.copy_exception_fields_from(at_exception),
                _ => now.copy_exception_fields_from(&before),
            }
            now.store(&self.engine);
            h.exception_taken = false;
            h.exception_state = None;
        }
        self.settle_rdmsr_sites();
        r
    }

    /// Before a run with breakpoints: the state now, a scratch state for
    /// after, and the hook armed to take the state at an exception.
    fn exception_guard(&mut self) -> Option<(CpuState, CpuState)> {
        let before = self.save_state().ok()?;
        let after = CpuState::new(&self.engine, self.layout()).ok()?;
        let at_exception = CpuState::new(&self.engine, self.layout()).ok()?;
        let h = unsafe { &mut *self.hooks };
        h.exception_state = Some(at_exception);
        h.exception_taken = false;
        Some((before, after))
    }

    /// After a run: answer an RDMSR the engine stopped right after, and
    /// hook the RDMSR sites found in new blocks (dropping those blocks, so
    /// that they are translated again with the hook).
    fn settle_rdmsr_sites(&mut self) {
        let h = unsafe { &mut *self.hooks };
        if let Some((at, value)) = h.rdmsr_armed.take() {
            if self.engine.read(Reg::RIP) == at.wrapping_add(2) {
                self.engine.write(Reg::RAX, value & 0xffff_ffff);
                self.engine.write(Reg::RDX, value >> 32);
                h.rdmsrs_answered += 1;
            }
        }
        let user = self.hooks as *mut c_void;
        for at in std::mem::take(&mut h.pending_rdmsr_sites) {
            let added = unsafe {
                self.engine.add_hook_range(HookType::CODE, on_rdmsr_site as *mut c_void, user, at, at.wrapping_add(2))
            };
            if added.is_ok() {
                h.rdmsr_sites.insert(at);
                self.engine.remove_cache(at, at.wrapping_add(3));
            }
        }
    }

    /// Put the debugger's breakpoints on the engine, if they changed. They
    /// are Unicorn's exits: a translated instruction at one of them ends
    /// the run before it executes (RIP at it, as after a HLT), wherever it
    /// is in its block; nothing is installed while there are none, and
    /// translated code is dropped at each change (exits are compiled in).
    pub fn install_breakpoints(&mut self, wanted: &std::collections::BTreeSet<u64>) -> Result<(), String> {
        if self.breakpoints.iter().eq(wanted.iter()) {
            return Ok(());
        }
        let addrs: Vec<u64> = wanted.iter().copied().collect();
        self.engine.set_exits(&addrs).map_err(|e| format!("breakpoints: {e}"))?;
        self.breakpoints = addrs;
        self.flush_code_cache();
        Ok(())
    }

    /// Whether the engine stopped at a breakpoint (the loaded vCPU's next
    /// instruction is at one).
    pub fn at_breakpoint(&self) -> bool {
        !self.breakpoints.is_empty() && self.breakpoints.binary_search(&self.linear_ip()).is_ok()
    }

    /// For one step past the breakpoint at `ip`: the engine's exits without it.
    pub fn lift_breakpoint(&mut self, ip: u64) -> Result<(), String> {
        let others: Vec<u64> = self.breakpoints.iter().copied().filter(|&a| a != ip).collect();
        self.engine.set_exits(&others).map_err(|e| format!("breakpoints: {e}"))?;
        self.flush_code_cache();
        Ok(())
    }

    /// After `lift_breakpoint`'s step: every breakpoint back.
    pub fn restore_breakpoints(&mut self) -> Result<(), String> {
        let all = std::mem::take(&mut self.breakpoints);
        let r = self.engine.set_exits(&all).map_err(|e| format!("breakpoints: {e}"));
        self.breakpoints = all;
        self.flush_code_cache();
        r
    }

    /// RDMSR sites hooked, and RDMSRs answered there.
    pub fn rdmsr_stats(&self) -> (usize, u64) {
        let h = self.hooks();
        (h.rdmsr_sites.len(), h.rdmsrs_answered)
    }

    /// Why the engine stopped, if a hook said so, and the exception it
    /// raised, if any.
    pub fn take_stop(&mut self) -> (Option<Stop>, Option<u8>) {
        unsafe { ((*self.hooks).stop.take(), (*self.hooks).exception.take()) }
    }

    /// Raise the interrupt line: the next run stops (`window_opened`) as
    /// soon as the vCPU can take an interrupt.
    pub fn raise_line(&self) {
        if let Some(l) = &self.hooks().line {
            l.raise();
        }
    }

    /// After a run: lower the line (it must not outlive the vCPU's turn),
    /// and say whether it was acknowledged.
    pub fn window_opened(&mut self) -> bool {
        if let Some(l) = &self.hooks().line {
            l.lower();
        }
        std::mem::take(unsafe { &mut (*self.hooks).window_open })
    }

    /// Take the pending kick; returns whether there was one.
    pub fn take_kick(&self) -> bool {
        self.ticker.take()
    }

    /// Kick the engine at `when` (replacing any earlier request).
    pub fn arm(&self, when: Option<std::time::Instant>) {
        self.ticker.arm(when);
    }

    pub fn kicker(&self) -> Kicker {
        self.ticker.kicker()
    }

    /// Make the engine's mappings follow the domain's (see `Remap`).
    pub fn remap(&mut self, remaps: &[Remap]) -> Result<(), String> {
        if remaps.is_empty() {
            return Ok(());
        }
        // Unicorn's unmap invalidates translated code by looking the
        // range's guest-*physical* address up as a *virtual* one, through
        // the loaded vCPU's page tables: where that faults, the engine
        // keeps the #PF (CR2 = the physical address) and raises it on the
        // guest at the next start. With paging off for the length of the
        // remap the lookup is the identity and cannot fault; the vCPU's
        // registers are saved around it and put back as they were.
        let saved = self.save_state()?;
        self.engine.write(Reg::CR0, saved.cr(0) & !mmu::CR0_PG);
        let user = self.hooks as *mut c_void;
        let mut above_4g = false;
        let mut result = Ok(());
        for r in Remap::coalesce(remaps) {
            let done = match r {
                // Over the all-ones space of frames the domain never had;
                // above that space, over nothing (or the page's last overlay).
                Remap::Overlay { gpa, host } => {
                    let unmapped = self.engine.unmap(gpa, layout::PAGE_SIZE);
                    if gpa < layout::GUEST_PHYS_END { unmapped } else { Ok(()) }
                        .and_then(|()| unsafe { self.engine.map_ptr(gpa, layout::PAGE_SIZE, host as *mut u8) })
                }
                Remap::Hole { gpa, len } => self.engine.unmap(gpa, len).and_then(|()| unsafe {
                    self.engine.map_mmio(gpa, len, Some(absent_read), Some(absent_write), user)
                }),
                Remap::Ram { gpa, len, host } => self
                    .engine
                    .unmap(gpa, len)
                    .and_then(|()| unsafe { self.engine.map_ptr(gpa, len, host as *mut u8) }),
            };
            above_4g |= r.end() > 1 << 32;
            if let Err(e) = done {
                result = Err(format!("remapping guest-physical memory ({r:?}): {e}"));
                break;
            }
        }
        let mut saved = saved;
        saved.store(&self.engine);
        // Without paging Unicorn truncates the lookup to 32 bits, so code
        // it translated from pages above 4 GiB is dropped wholesale.
        if above_4g {
            self.flush_code_cache();
        }
        // The guest reached these frames through its own mappings too.
        self.engine.flush_tlb();
        result
    }

    /// The loaded vCPU's registers, saved from the engine.
    fn save_state(&self) -> Result<CpuState, String> {
        let mut st = CpuState::new(&self.engine, self.layout())?;
        st.load(&self.engine);
        Ok(st)
    }

    fn set_exit_checks(&mut self, on: bool) {
        if self.exit_checks != on {
            self.exit_checks = on;
            unicorn_gaps::set_exit_checks(&self.engine, &self.layout(), on);
            // (Turning them off follows a step, after which Unicorn flushes
            // anyway when it drops its counting hook: one flush, counted once.)
            self.flush_code_cache();
        }
    }

    pub fn flush_code_cache(&mut self) {
        self.engine.flush_tb();
        self.code_cache_flushes += 1;
        unsafe { (*self.hooks).code_pages.reset(self.engine_ran) };
    }

    /// Before a run: stores through TLB entries of pages without
    /// translated code take the fast path again (`unicorn_gaps::SoftTlb`).
    /// The first time the set of code pages can be made complete (after
    /// the engine's first block), the code cache is emptied to make it so.
    fn let_stores_through(&mut self) {
        if !self.hooks().code_pages.complete {
            if !self.engine_ran {
                return;
            }
            self.flush_code_cache();
        }
        let h = unsafe { &mut *self.hooks };
        if let Some(tlb) = &mut h.tlb {
            let pages = &h.code_pages;
            let cleared = unsafe { tlb.clear_not_dirty(|gpa| pages.holds_code(gpa)) };
            h.code_pages.entries_cleared += cleared;
        }
    }

    pub fn read(&self, reg: Reg) -> u64 {
        self.engine.read(reg)
    }

    pub fn write(&self, reg: Reg, v: u64) {
        self.engine.write(reg, v)
    }

    /// The loaded vCPU's paging state.
    pub fn paging(&self) -> PagingState {
        unsafe { paging_of_raw(self.engine.raw()) }
    }

    /// The loaded vCPU's CPL and code width (16, 32 or 64), as the engine
    /// holds them mid-run.
    pub fn live_mode(&self) -> (u8, u8) {
        let mode = self.hooks().mode.as_ref().expect("set at engine creation");
        (mode.cpl(), mode.code_bits())
    }

    /// The loaded vCPU's next-instruction linear address.
    pub fn linear_ip(&self) -> u64 {
        unsafe { linear_ip_raw(self.engine.raw()) }
    }

    /// Read guest-linear memory with the loaded vCPU's page tables.
    pub fn read_linear(&self, va: u64, buf: &mut [u8]) -> Result<(), mmu::WalkError> {
        let ps = self.paging();
        let mut m: &GuestRam = &self.hooks().ram;
        mmu::read_linear(&mut m, &ps, va, buf, false)
    }

    /// After a CPUID of leaf base+2: rewind to the snapshot taken at it and
    /// replay one instruction at a time, watching for the WRMSR.
    pub fn begin_msr_watch(&mut self) {
        unsafe {
            (*self.hooks).cpuid_snapshot.restore(&self.engine).ok();
            (*self.hooks).replaying = true;
        }
        self.msr_watch = 64;
    }

    /// Before single-stepping the instruction at `rip`: is it the WRMSR we
    /// wait for? Returns the step count for `start` (0 ends the watch).
    pub fn watch_step(&mut self, rip: u64) -> usize {
        self.msr_watch -= 1;
        if self.msr_watch == 0 {
            unsafe { (*self.hooks).replaying = false };
        }
        let mut b = [0u8; 1];
        if self.read_linear(rip, &mut b).is_ok() && b[0] == 0xf4 {
            self.msr_watch = 0;
            unsafe { (*self.hooks).replaying = false };
            return 0;
        }
        if self.check_wrmsr(rip) {
            self.msr_watch = 0;
        }
        1
    }

    /// If the instruction at `at` is WRMSR to Xen's MSR, fill the hypercall
    /// page it names.
    fn check_wrmsr(&mut self, at: u64) -> bool {
        let mut b = [0u8; 2];
        if self.read_linear(at, &mut b).is_err() || b != [0x0f, 0x30] {
            return false;
        }
        if self.engine.read(Reg::RCX) as u32 != XEN_HYPERCALL_MSR {
            return false;
        }
        self.msr_watch = 0;
        unsafe { (*self.hooks).replaying = false };
        let value = (self.engine.read(Reg::RDX) << 32) | (self.engine.read(Reg::RAX) & 0xffff_ffff);
        let gpa = value & !0xfff;
        let page_index = value & 0xfff;
        let ram = self.hooks().ram.clone();
        if page_index != 0 || ram.slice(gpa, 4096).is_err() {
            self.bad_hypercall_page = true;
            return true;
        }
        let amd = {
            let v = self.hooks().cpuid.query(0, 0);
            v.ebx == u32::from_le_bytes(*b"Auth")
        };
        let page = ram.slice_mut(gpa, 4096).expect("checked above");
        fill_hypercall_page(page, amd);
        // Host writes do not invalidate translated code.
        self.flush_code_cache();
        true
    }

    /// The MSRs SYSCALL reads.
    pub fn syscall_msrs(&self) -> interrupts::SyscallMsrs {
        interrupts::SyscallMsrs {
            star: self.engine.read_msr(MSR_STAR),
            lstar: self.engine.read_msr(MSR_LSTAR),
            cstar: self.engine.read_msr(MSR_CSTAR),
            fmask: self.engine.read_msr(MSR_FMASK),
        }
    }

    pub fn sysenter_msrs(&self) -> interrupts::SysenterMsrs {
        interrupts::SysenterMsrs {
            cs: self.engine.read_msr(MSR_SYSENTER_CS),
            esp: self.engine.read_msr(MSR_SYSENTER_ESP),
            eip: self.engine.read_msr(MSR_SYSENTER_EIP),
        }
    }
}

impl Drop for Cpu {
    fn drop(&mut self) {
        // No kick may reach the engine once it is closed.
        self.ticker.set_engine(std::ptr::null_mut());
        if std::env::var_os("PVHVM_DEBUG_TLB").is_some() {
            let p = &self.hooks().code_pages;
            eprintln!("pvhvm: tlb cleared {} protected {} missed {} flushes {}", p.entries_cleared, p.pages_protected, p.missed, self.code_cache_flushes);
        }
        // Close the engine first: its hooks point at HookData.
        let engine = std::mem::replace(&mut self.engine, Engine::closed());
        drop(engine);
        unsafe { drop(Box::from_raw(self.hooks)) };
    }
}

/// Xen's HVM hypercall page: 32-byte stubs `mov $nr, %eax; vmcall; ret`
/// (VMMCALL on AMD).
pub fn fill_hypercall_page(page: &mut [u8], amd: bool) {
    page.fill(0xcc);
    for nr in 0..(4096 / 32) {
        let stub = &mut page[nr * 32..nr * 32 + 9];
        stub[0] = 0xb8;
        stub[1..5].copy_from_slice(&(nr as u32).to_le_bytes());
        stub[5..8].copy_from_slice(if amd { &VMMCALL } else { &VMCALL });
        stub[8] = 0xc3;
    }
}

/// RDMSR of ARCH_CAPABILITIES against a tiny 32-bit ring-0 guest on real
/// Unicorn (the PVH entry state).
#[cfg(test)]
mod tests {
    use crate::domain::Domain;
    use crate::exit::ExitReason;

    const CODE: u64 = 0x10_0000;
    const OUT: u32 = 0x9000;

    fn run(code: &[u8]) -> (Domain, Vec<u8>) {
        run_at(&[(CODE, code)])
    }

    fn run_at(pieces: &[(u64, &[u8])]) -> (Domain, Vec<u8>) {
        let mut d = Domain::new(4 << 20, 1, [0; 16], 1).unwrap();
        for (gpa, code) in pieces {
            d.ram().slice_mut(*gpa, code.len() as u64).unwrap().copy_from_slice(code);
        }
        d.set_pvh_entry(CODE, 0x2000).unwrap();
        let e = d.run();
        assert!(matches!(e.reason, ExitReason::Hung { .. }), "{e:?}");
        let out = d.ram().slice(OUT as u64, 48).unwrap().to_vec();
        (d, out)
    }

    fn mov_ecx(msr: u32) -> Vec<u8> {
        let mut v = vec![0xb9];
        v.extend(msr.to_le_bytes());
        v
    }

    /// mov [OUT + off], eax / edx / ecx
    fn store(reg_modrm: u8, off: u32) -> Vec<u8> {
        let mut v = vec![0x89, reg_modrm];
        v.extend((OUT + off).to_le_bytes());
        v
    }

    fn rdmsr_and_store(msr: u32, off: u32) -> Vec<u8> {
        let mut v = mov_ecx(msr);
        v.extend([0x0f, 0x32]);
        v.extend(store(0x05, off)); // eax
        v.extend(store(0x15, off + 4)); // edx
        v.extend(store(0x0d, off + 8)); // ecx
        v
    }

    fn word(out: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(out[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn arch_capabilities_reads_as_the_policy_says() {
        // Twice in one block (the first run finds the sites, the block is
        // translated again with their hooks), then an MSR Unicorn knows
        // nothing of, which still reads as 0.
        let mut code = rdmsr_and_store(0x10a, 0);
        code.extend(rdmsr_and_store(0x10a, 12));
        code.extend([0xb8, 0xff, 0xff, 0xff, 0xff, 0x89, 0xc2]); // eax = edx = ~0
        code.extend(rdmsr_and_store(0x10b, 24)); // FLUSH_CMD: write-only
        code.extend([0xfa, 0xf4]); // cli; hlt
        let (d, out) = run(&code);
        let caps = crate::cpuid::ARCH_CAPABILITIES;
        for off in [0, 12] {
            assert_eq!(word(&out, off), caps as u32);
            assert_eq!(word(&out, off + 4), (caps >> 32) as u32);
            assert_eq!(word(&out, off + 8), 0x10a, "RDMSR leaves ECX alone");
        }
        assert_eq!((word(&out, 24), word(&out, 28), word(&out, 32)), (0, 0, 0x10b));
        let (sites, answered) = d.rdmsr_stats();
        assert_eq!((sites, answered), (3, 2));
    }

    #[test]
    fn code_pages_are_marked_once_and_forgotten_at_a_flush() {
        let mut p = super::CodePages::new(256 << 12);
        assert!(!p.holds_code(0x5000) && !p.complete);
        assert!(p.mark(0x5123), "first code on the page");
        assert!(!p.mark(0x5000), "the page had code already");
        assert!(p.holds_code(0x5fff) && !p.holds_code(0x6000) && !p.holds_code(0x4fff));
        assert!(p.holds_code(256 << 12) && p.holds_code(1 << 40), "past RAM: always code");
        assert!(!p.mark(1 << 40));
        p.reset(false);
        assert!(!p.holds_code(0x5000) && !p.complete, "the next block may not be seen");
        p.reset(true);
        assert!(p.complete);
    }

    #[test]
    fn a_site_in_a_later_block_is_found_when_it_is_translated() {
        // The first block jumps to another page, whose block is new to
        // the engine: found by the new-block hook, not by the first scan.
        let jmp = [0xe9, 0xfb, 0x0f, 0, 0]; // jmp CODE + 0x1000
        let mut far = rdmsr_and_store(0x10a, 0);
        far.extend([0xfa, 0xf4]);
        let (d, out) = run_at(&[(CODE, &jmp), (CODE + 0x1000, &far)]);
        assert_eq!(word(&out, 0), crate::cpuid::ARCH_CAPABILITIES as u32);
        assert_eq!(word(&out, 4), (crate::cpuid::ARCH_CAPABILITIES >> 32) as u32);
        assert_eq!(d.rdmsr_stats(), (1, 1));
    }
}
