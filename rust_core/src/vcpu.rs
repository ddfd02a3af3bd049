//! One virtual CPU on one Unicorn engine, and its KVM-like run loop.
//!
//! `run()` executes guest code until something needs the host: a shutdown,
//! console output, an idle vCPU, a triple fault or an error, returned as a
//! `VcpuExit`. Exceptions, hypercalls, CPUID, SYSCALL and port I/O are all
//! handled here in Rust without leaving the loop.
//!
//! Hooks run inside Unicorn and only record why they stopped the engine
//! (`Stop`); anything that edits hidden CPU state happens after the engine has
//! stopped, where the saved state is complete (`unicorn_gaps`).

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use unicorn_engine::{uc_engine, uc_error, HookType, X86Insn};

use crate::cpuid::{CpuidPolicy, XEN_CPUID_BASE, XEN_HYPERCALL_MSR};
use crate::hypercall::{self, XenState};
use crate::interrupts::{self, DeliveryError, Event};
use crate::lapic::{LAPIC_BASE, LAPIC_SIZE};
use crate::layout;
use crate::memory::GuestRam;
use crate::ticker::{KickFlags, Kicker, Ticker};
use crate::xen::{hvm_param, write_time_info, RUNSTATE_BLOCKED, RUNSTATE_RUNNING};
use crate::mmu::{self, PagingState};
use crate::uc::{self, Engine, Reg};
use crate::unicorn_gaps::{self, CpuState, Segment};

const MSR_EFER: u32 = 0xc000_0080;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_FMASK: u32 = 0xc000_0084;

const VMCALL: [u8; 3] = [0x0f, 0x01, 0xc1];
const VMMCALL: [u8; 3] = [0x0f, 0x01, 0xd9];

/// Why `run()` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// SCHEDOP_shutdown with this SHUTDOWN_* reason.
    Shutdown { reason: u32 },
    /// The guest wrote to the hypervisor console; drain it and run again.
    ConsoleOutput,
    /// The guest notified ports whose far end is the host (device models).
    Notify,
    /// The host asked the vCPU to stop (`Kicker`), or a time slice ended.
    Kicked,
    /// The vCPU waits for an event, until `deadline_ns` of system time if set.
    Idle { deadline_ns: Option<u64> },
    /// HLT. With interrupts disabled nothing can wake the vCPU.
    Halted { interrupts_enabled: bool },
    /// A fault while delivering #DF: the processor shut down.
    TripleFault { chain: Vec<u8> },
    /// The emulator could not go on (unmapped physical memory, a mode we do
    /// not deliver in …).
    Error { message: String },
}

/// Why a hook stopped the engine.
#[derive(Debug)]
enum Stop {
    Kicked,
    /// Xen placed pages outside RAM: map them before the guest goes on.
    Remap,
    Exception(u8),
    Syscall,
    WatchHypercallMsr,
    Exit(VcpuExit),
}

/// What the hooks can reach. Heap-allocated and reached only through a raw
/// pointer: Unicorn's callbacks write to it behind Rust's back, so no `&mut`
/// to it may be live across `uc_emu_start`.
struct HookData {
    ram: Arc<GuestRam>,
    xen: *mut XenState,
    cpuid: CpuidPolicy,
    vcpu_id: u32,
    stop: Option<Stop>,
    /// CPU state at the last CPUID of leaf base+2 (see `on_cpuid`).
    cpuid_snapshot: uc::Context,
    /// Replaying after a rewind: CPUID answers without stopping again.
    replaying: bool,
    layout: unicorn_gaps::BlobLayout,
    /// Shared with the ticker (see ticker.rs).
    kick: *const KickFlags,
}

pub struct Vcpu {
    pub id: u32,
    // Field order matters: the engine (and its hooks) goes before HookData.
    engine: Engine,
    state: CpuState,
    hooks: *mut HookData,
    pending: Option<Event>,
    /// Instructions left to watch for the hypercall-page WRMSR.
    msr_watch: u32,
    /// A hypercall page was requested at a guest-physical frame that is not RAM.
    bad_hypercall_page: bool,
    pub exceptions_delivered: u64,
    /// Translated code thrown away whole (ours, and Unicorn's after a step).
    pub code_cache_flushes: u64,
    pub interrupts_delivered: u64,
    ticker: Ticker,
    /// Unicorn's exit check after memory accesses is on (only while stepping).
    exit_checks: bool,
    /// When to look again for an interrupt window (an interrupt is pending
    /// with IF=0); kept until that kick has been taken.
    window_poll_at: Option<Instant>,
    /// Return `Kicked` at least this often so the host stays responsive.
    pub time_slice: Duration,
}

unsafe fn paging_of_raw(uc: *mut uc_engine) -> PagingState {
    PagingState {
        cr0: uc::raw_read(uc, Reg::CR0),
        cr3: uc::raw_read(uc, Reg::CR3),
        cr4: uc::raw_read(uc, Reg::CR4),
        efer: uc::raw_read_msr(uc, MSR_EFER),
    }
}

unsafe extern "C" fn on_interrupt(uc: *mut uc_engine, intno: u32, user: *mut c_void) {
    let h = &mut *(user as *mut HookData);
    h.stop = Some(Stop::Exception(intno as u8));
    uc::raw_stop(uc);
}

/// #UD: VMCALL/VMMCALL are hypercalls, anything else is a real #UD.
unsafe extern "C" fn on_invalid_insn(uc: *mut uc_engine, user: *mut c_void) -> bool {
    let h = &mut *(user as *mut HookData);
    let rip = uc::raw_read(uc, Reg::RIP);
    let ps = paging_of_raw(uc);
    let mut code = [0u8; 3];
    let mut m: &GuestRam = &h.ram;
    let fetched = mmu::read_linear(&mut m, &ps, rip, &mut code, false).is_ok();
    if !fetched || (code != VMCALL && code != VMMCALL) {
        h.stop = Some(Stop::Exception(interrupts::UD));
        uc::raw_stop(uc);
        return true;
    }
    let nr = uc::raw_read(uc, Reg::RAX);
    let args = [
        uc::raw_read(uc, Reg::RDI),
        uc::raw_read(uc, Reg::RSI),
        uc::raw_read(uc, Reg::RDX),
        uc::raw_read(uc, Reg::R10),
        uc::raw_read(uc, Reg::R8),
    ];
    let cpl = (uc::raw_read(uc, Reg::CS) & 3) as u8;
    let out = hypercall::dispatch(&h.ram, ps, &mut *h.xen, h.vcpu_id, cpl, nr, args);
    if out.refresh_areas {
        write_vcpu_areas(&mut *h.xen, &h.ram, &ps, h.vcpu_id);
    }
    uc::raw_write(uc, Reg::RAX, out.rax);
    uc::raw_write(uc, Reg::RIP, rip + 3);
    unicorn_gaps::forget_pc_write(uc, &h.layout);
    if let Some(exit) = out.exit {
        h.stop = Some(Stop::Exit(exit));
        uc::raw_stop(uc);
    } else if out.remap {
        h.stop = Some(Stop::Remap);
        uc::raw_stop(uc);
    } else if out.recheck {
        h.stop = Some(Stop::Kicked);
        uc::raw_stop(uc);
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
            h.stop = Some(Stop::WatchHypercallMsr);
            uc::raw_stop(uc);
        }
    }
    let r = h.cpuid.query(leaf, sub);
    uc::raw_write(uc, Reg::RAX, r.eax as u64);
    uc::raw_write(uc, Reg::RBX, r.ebx as u64);
    uc::raw_write(uc, Reg::RCX, r.ecx as u64);
    uc::raw_write(uc, Reg::RDX, r.edx as u64);
    1
}

unsafe extern "C" fn on_syscall(uc: *mut uc_engine, user: *mut c_void) {
    let h = &mut *(user as *mut HookData);
    h.stop = Some(Stop::Syscall);
    uc::raw_stop(uc);
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
    if flags.kick.load(Ordering::SeqCst) {
        let h = &mut *(user as *mut HookData);
        h.stop.get_or_insert(Stop::Kicked);
        uc::raw_stop(uc);
    }
}

unsafe extern "C" fn lapic_read(_uc: *mut uc_engine, offset: u64, _size: c_uint, user: *mut c_void) -> u64 {
    let h = &*(user as *const HookData);
    let xen = &*h.xen;
    xen.vcpus[h.vcpu_id as usize].lapic.read(offset) as u64
}

unsafe extern "C" fn lapic_write(_uc: *mut uc_engine, offset: u64, _size: c_uint, value: u64, user: *mut c_void) {
    let h = &mut *(user as *mut HookData);
    let xen = &mut *h.xen;
    let lapic = &mut xen.vcpus[h.vcpu_id as usize].lapic;
    lapic.write(offset, value as u32);
    if lapic.highest_pending().is_some() {
        // A self-IPI: let the run loop deliver it.
        h.stop.get_or_insert(Stop::Kicked);
        uc::raw_stop(_uc);
    }
}

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
    h.stop = Some(Stop::Exit(VcpuExit::Shutdown { reason }));
    uc::raw_stop(uc);
}

impl Vcpu {
    /// A vCPU with guest RAM mapped and all hooks installed. `xen` must
    /// outlive the vCPU (the domain owns both).
    pub fn new(id: u32, ram: Arc<GuestRam>, xen: *mut XenState, domid: u32) -> Result<Self, String> {
        let layout = unicorn_gaps::layout()?;
        let mut engine = Engine::new_x86_64().map_err(|e| e.to_string())?;
        // Before any code is translated: see `set_exit_checks`.
        unicorn_gaps::set_exit_checks(&engine, &layout, false);
        for r in ram.regions() {
            unsafe { engine.map_ptr(r.gpa, r.len, ram.host_ptr().add(r.host_offset as usize)) }
                .map_err(|e| e.to_string())?;
        }
        let cpuid_snapshot = uc::Context::new(&engine, layout.data_offset).map_err(|e| e.to_string())?;
        let ticker = Ticker::new();
        let hooks = Box::into_raw(Box::new(HookData {
            ram,
            xen,
            cpuid: CpuidPolicy { vcpu_id: id, domid },
            vcpu_id: id,
            stop: None,
            cpuid_snapshot,
            replaying: false,
            layout,
            kick: ticker.flags(),
        }));
        let user = hooks as *mut c_void;
        let hooks_ok = unsafe {
            engine.add_hook(HookType::INTR, on_interrupt as *mut c_void, user, None)
                .and_then(|_| engine.add_hook(HookType::INSN_INVALID, on_invalid_insn as *mut c_void, user, None))
                .and_then(|_| engine.add_hook(HookType::INSN, on_cpuid as *mut c_void, user, Some(X86Insn::CPUID)))
                .and_then(|_| engine.add_hook(HookType::INSN, on_syscall as *mut c_void, user, Some(X86Insn::SYSCALL)))
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
                    engine.map_mmio(after, (1u64 << 32) - after, Some(absent_read), Some(absent_write), user)
                        .map(|_| 0)
                })
        }
        .map_err(|e| e.to_string());
        if let Err(e) = hooks_ok {
            drop(engine);
            unsafe { drop(Box::from_raw(hooks)) };
            return Err(e);
        }
        let state = CpuState::new(&engine, layout)?;
        ticker.set_engine(engine.raw());
        Ok(Self {
            id,
            engine,
            state,
            hooks,
            pending: None,
            msr_watch: 0,
            bad_hypercall_page: false,
            exceptions_delivered: 0,
            code_cache_flushes: 0,
            interrupts_delivered: 0,
            ticker,
            exit_checks: false,
            window_poll_at: None,
            time_slice: Duration::from_millis(50),
        })
    }

    /// The PVH entry state (docs/misc/pvh.pandoc): 32-bit flat protected
    /// mode, paging off, EBX = start_info. The GDT and TSS the selectors name
    /// are written at `layout::BOOT_GDT`.
    pub fn set_pvh_entry(&mut self, entry: u64, start_info: u64) -> Result<(), String> {
        let ram = unsafe { &(*self.hooks).ram };
        let tss = layout::BOOT_TSS;
        let tss_lo = (((tss & 0xffff) << 16) | 0x67) as u32;
        let tss_hi = (((tss >> 16) & 0xff) | (0x8b << 8) | (tss & 0xff00_0000)) as u32;
        let gdt: [u64; 4] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff, ((tss_hi as u64) << 32) | tss_lo as u64];
        let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
        ram.slice_mut(layout::BOOT_GDT, bytes.len() as u64).map_err(|e| e.to_string())?.copy_from_slice(&bytes);
        ram.slice_mut(tss, 0x68).map_err(|e| e.to_string())?.fill(0);

        let st = &mut self.state;
        st.load(&self.engine);
        for r in 0..16 {
            st.set_reg(r, 0);
        }
        st.set_reg(3, start_info); // RBX
        st.set_rip(entry);
        st.set_rflags(0x2);
        st.set_cr(0, mmu::CR0_PE | (1 << 4)); // PE, ET
        st.set_cr(3, 0);
        st.set_cr(4, 0);
        st.set_efer(0);
        st.set_gdt(layout::BOOT_GDT, (bytes.len() - 1) as u32);
        st.set_seg(unicorn_gaps::R_CS, unicorn_gaps::flat_code32(0x08));
        for s in [unicorn_gaps::R_DS, unicorn_gaps::R_ES, unicorn_gaps::R_SS, unicorn_gaps::R_FS, unicorn_gaps::R_GS] {
            st.set_seg(s, unicorn_gaps::flat_data(0x10, 0));
        }
        st.set_tr(Segment { selector: 0x18, base: tss, limit: 0x67, flags: unicorn_gaps::DESC_P | (0xb << 8) });
        st.end_exception();
        st.clear_interrupt_shadow();
        st.sync_hflags();
        st.store(&self.engine);
        self.engine.flush_tlb();
        self.flush_code_cache();
        Ok(())
    }

    fn hooks(&self) -> &HookData {
        unsafe { &*self.hooks }
    }

    /// Why the engine stopped, if a hook said so.
    fn take_stop(&mut self) -> Option<Stop> {
        unsafe { (*self.hooks).stop.take() }
    }

    fn ram(&self) -> &GuestRam {
        &self.hooks().ram
    }

    fn xen(&mut self) -> &mut XenState {
        unsafe { &mut *(*self.hooks).xen }
    }

    fn paging(&self) -> PagingState {
        PagingState {
            cr0: self.engine.read(Reg::CR0),
            cr3: self.engine.read(Reg::CR3),
            cr4: self.engine.read(Reg::CR4),
            efer: self.engine.read_msr(MSR_EFER),
        }
    }

    /// Read guest-linear memory with the vCPU's current page tables.
    pub fn read_linear(&self, va: u64, buf: &mut [u8]) -> Result<(), mmu::WalkError> {
        let ps = self.paging();
        let mut m: &GuestRam = self.ram();
        mmu::read_linear(&mut m, &ps, va, buf, false)
    }

    /// A handle that stops this vCPU at its next block, from any thread.
    pub fn kicker(&self) -> Kicker {
        self.ticker.kicker()
    }

    /// Run until the host is needed.
    pub fn run(&mut self) -> VcpuExit {
        let slice_end = Instant::now() + self.time_slice;
        self.set_runstate(RUNSTATE_RUNNING);
        loop {
            if let Some(ev) = self.pending.take() {
                if let Err(e) = self.deliver(ev) {
                    return match e {
                        DeliveryError::TripleFault { chain } => VcpuExit::TripleFault { chain },
                        DeliveryError::Unsupported(s) => VcpuExit::Error { message: s },
                    };
                }
            }
            let kicked = self.ticker.take();
            if kicked {
                self.window_poll_at = None;
            }
            let id = self.id;
            let now = self.xen().clock.now_ns();
            self.xen().fire_timers(id, now);

            let mut count = 0;
            let mut poll_window = false;
            if let Some(vector) = self.next_interrupt() {
                match self.try_inject(vector) {
                    Inject::Done => {}
                    // Step past the STI / MOV SS shadow, then try again.
                    Inject::Shadow => count = 1,
                    // IF=0: no hook sees STI, POPF or IRET, so look again soon.
                    Inject::Masked => poll_window = true,
                }
            }
            if kicked && Instant::now() >= slice_end {
                return VcpuExit::Kicked;
            }
            self.arm_ticker(slice_end, poll_window);

            let rip = self.engine.read(Reg::RIP);
            if count == 0 && self.msr_watch > 0 {
                count = self.watch_step(rip);
            }
            // Stepping stops through Unicorn's exit checks; kicks must not
            // land in a step (with the checks on they can tear instructions).
            self.set_exit_checks(count > 0);
            let (err, kicked_in_run) = if count > 0 {
                (self.engine.start(rip, count), false)
            } else {
                let engine = &mut self.engine;
                match self.ticker.run(rip, || engine.start(rip, 0)) {
                    Some(r) => r,
                    None => continue, // a kick came first: take it above
                }
            };
            match self.take_stop() {
                Some(Stop::Exit(exit)) => {
                    if let VcpuExit::Idle { .. } = exit {
                        // SCHEDOP_block / poll: the host waits, unless an
                        // interrupt is already deliverable.
                        if self.next_interrupt().is_some() {
                            continue;
                        }
                        self.set_runstate(RUNSTATE_BLOCKED);
                    }
                    return exit;
                }
                Some(Stop::Kicked) => {}
                Some(Stop::Remap) => {
                    if let Err(e) = self.map_overlays() {
                        return VcpuExit::Error { message: e };
                    }
                }
                Some(Stop::Exception(vector)) => self.pending = Some(self.exception_event(vector)),
                Some(Stop::Syscall) => self.syscall(),
                Some(Stop::WatchHypercallMsr) => {
                    // The rest of the CPUID's translated block has run, WRMSR
                    // included perhaps. Rewind to the snapshot taken at the CPUID
                    // and replay instruction by instruction, watching for it.
                    unsafe {
                        (*self.hooks).cpuid_snapshot.restore(&self.engine).ok();
                        (*self.hooks).replaying = true;
                    }
                    self.msr_watch = 64;
                }
                // A kick: the engine stopped at the start of a block. (If it
                // halted just before the kick came, the guest resumes after its
                // HLT: a spurious wake-up, which idle loops allow for.)
                None if kicked_in_run && err == uc_error::OK => {}
                None if count > 0 && err == uc_error::OK => {
                    if self.bad_hypercall_page {
                        // WRMSR to a frame that is not RAM: Xen injects #GP.
                        self.bad_hypercall_page = false;
                        self.engine.write(Reg::RIP, rip);
                        self.pending = Some(Event::exception(interrupts::GP, Some(0)));
                    }
                }
                None if err == uc_error::OK => {
                    let rip = self.engine.read(Reg::RIP);
                    let mut b = [0u8; 1];
                    let halted = self.read_linear(rip.wrapping_sub(1), &mut b).is_ok() && b[0] == 0xf4;
                    if !halted {
                        return VcpuExit::TripleFault { chain: vec![] };
                    }
                    let rflags = self.engine.read(Reg::RFLAGS);
                    if rflags & unicorn_gaps::RFLAGS_IF == 0 {
                        return VcpuExit::Halted { interrupts_enabled: false };
                    }
                    // HLT with interrupts on: wake at once if one is due,
                    // else let the host sleep until the next timer.
                    let now = self.xen().clock.now_ns();
                    self.xen().fire_timers(id, now);
                    if self.next_interrupt().is_none() {
                        self.set_runstate(RUNSTATE_BLOCKED);
                        let deadline_ns = self.xen().vcpus[id as usize].next_deadline();
                        return VcpuExit::Idle { deadline_ns };
                    }
                }
                None => {
                    // No memory hook reports the address: Unicorn keeps
                    // stores to once-executed pages on its slow path while
                    // any such hook exists (see unicorn_gaps.rs).
                    let what = match err {
                        uc_error::READ_UNMAPPED | uc_error::WRITE_UNMAPPED | uc_error::FETCH_UNMAPPED => {
                            "guest access to unbacked guest-physical memory: "
                        }
                        _ => "",
                    };
                    return VcpuExit::Error {
                        message: format!("{what}{} at rip {:#x}", uc::strerror(err), self.engine.read(Reg::RIP)),
                    };
                }
            }
        }
    }

    fn map_overlays(&mut self) -> Result<(), String> {
        let maps = std::mem::take(&mut self.xen().pending_maps);
        for (gpa, host) in maps {
            unsafe { self.engine.map_ptr(gpa, layout::PAGE_SIZE, host as *mut u8) }
                .map_err(|e| format!("mapping a Xen page at {gpa:#x}: {e}"))?;
        }
        Ok(())
    }

    fn set_exit_checks(&mut self, on: bool) {
        if self.exit_checks != on {
            self.exit_checks = on;
            unicorn_gaps::set_exit_checks(&self.engine, &self.state.layout(), on);
            // (Turning them off follows a step, after which Unicorn flushes
            // anyway when it drops its counting hook: one flush, counted once.)
            self.flush_code_cache();
        }
    }

    fn flush_code_cache(&mut self) {
        self.engine.flush_tb();
        self.code_cache_flushes += 1;
    }

    /// Wake the vCPU loop at the next timer deadline, the end of the time
    /// slice, or shortly (to look for an interrupt window) if asked.
    fn arm_ticker(&mut self, slice_end: Instant, poll_window: bool) {
        let id = self.id as usize;
        let mut wake = slice_end;
        if let Some(d) = self.xen().vcpus[id].next_deadline() {
            wake = wake.min(Instant::now() + self.xen().clock.until(d));
        }
        if poll_window {
            // Keep the look-again time until that kick has been taken: a
            // guest that stops every few microseconds with IF=0 (SYSCALL
            // entry under FMASK) would otherwise push it back for ever and
            // never see its interrupt.
            let at = *self.window_poll_at.get_or_insert_with(|| Instant::now() + Duration::from_micros(100));
            wake = wake.min(at);
        } else {
            self.window_poll_at = None;
        }
        self.ticker.arm(Some(wake));
    }

    /// The vector to deliver next: a LAPIC vector (self-IPI) or the event
    /// channel upcall (per-vCPU vector, else the HVM callback vector).
    fn next_interrupt(&mut self) -> Option<u8> {
        let id = self.id;
        let xen = self.xen();
        let x = &xen.vcpus[id as usize];
        let lapic = x.lapic.highest_pending();
        let callback = xen.hvm_params[hvm_param::CALLBACK_IRQ];
        let global = (callback >> 56 == 2).then_some(callback as u8);
        let upcall = x
            .upcall_vector
            .or(global)
            .filter(|_| xen.vcpu_info_gpa(id).is_some_and(|vi| crate::xen::evtchn::upcall_pending(&xen.ram, vi)));
        lapic.max(upcall)
    }

    fn try_inject(&mut self, vector: u8) -> Inject {
        if self.engine.read(Reg::RFLAGS) & unicorn_gaps::RFLAGS_IF == 0 {
            return Inject::Masked;
        }
        self.state.load(&self.engine);
        if self.state.interrupt_shadow() {
            return Inject::Shadow;
        }
        let ram = unsafe { &(*self.hooks).ram };
        match interrupts::deliver(&mut self.state, ram, Event::external(vector)) {
            Ok(()) => {
                self.state.store(&self.engine);
                let id = self.id as usize;
                self.xen().vcpus[id].lapic.clear_pending(vector);
                self.interrupts_delivered += 1;
            }
            // A fault while delivering: the processor raises it instead.
            Err(DeliveryError::TripleFault { .. }) | Err(DeliveryError::Unsupported(_)) => {
                self.pending = Some(Event::exception(interrupts::GP, Some(0)));
            }
        }
        Inject::Done
    }

    fn set_runstate(&mut self, state: u32) {
        let id = self.id;
        let xen = self.xen();
        let now = xen.clock.now_ns();
        let x = &mut xen.vcpus[id as usize];
        if x.runstate == state {
            return;
        }
        x.runstate_time[x.runstate as usize] += now.saturating_sub(x.runstate_entry_ns);
        x.runstate = state;
        x.runstate_entry_ns = now;
        if x.runstate_area.is_some() {
            let ps = self.paging();
            let ram = unsafe { &(*self.hooks).ram };
            write_vcpu_areas(self.xen(), ram, &ps, id);
        }
    }

    fn exception_event(&mut self, vector: u8) -> Event {
        self.state.load(&self.engine);
        let soft = self.state.exception_is_int();
        if soft {
            // INT n is CD ib; INT3, INTO and INT1 are one byte.
            let rip = self.state.rip();
            let mut b = [0u8; 2];
            let two = self.read_linear(rip.wrapping_sub(2), &mut b).is_ok() && b == [0xcd, vector];
            Event::software(vector, if two { 2 } else { 1 })
        } else {
            let ec = interrupts::has_error_code(vector).then(|| self.state.error_code());
            Event::exception(vector, ec)
        }
    }

    fn deliver(&mut self, ev: Event) -> Result<(), DeliveryError> {
        self.state.load(&self.engine);
        let ram = unsafe { &(*self.hooks).ram };
        interrupts::deliver(&mut self.state, ram, ev)?;
        self.state.store(&self.engine);
        self.exceptions_delivered += 1;
        Ok(())
    }

    fn syscall(&mut self) {
        let msrs = interrupts::SyscallMsrs {
            star: self.engine.read_msr(MSR_STAR),
            lstar: self.engine.read_msr(MSR_LSTAR),
            cstar: self.engine.read_msr(MSR_CSTAR),
            fmask: self.engine.read_msr(MSR_FMASK),
        };
        self.state.load(&self.engine);
        // Unicorn's SYSCALL only advanced RIP past the instruction.
        let next = self.state.rip();
        match interrupts::emulate_syscall(&mut self.state, next, &msrs) {
            Ok(()) => self.state.store(&self.engine),
            Err(ev) => {
                self.engine.write(Reg::RIP, next.wrapping_sub(2));
                self.pending = Some(ev);
            }
        }
    }

    /// Before single-stepping the instruction at `rip`: is it the WRMSR we
    /// wait for? Returns the step count for `start` (0 ends the watch).
    fn watch_step(&mut self, rip: u64) -> usize {
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
        if page_index != 0 || self.ram().slice(gpa, 4096).is_err() {
            self.bad_hypercall_page = true;
            return true;
        }
        let amd = {
            let v = self.hooks().cpuid.query(0, 0);
            v.ebx == u32::from_le_bytes(*b"Auth")
        };
        let page = self.ram().slice_mut(gpa, 4096).expect("checked above");
        fill_hypercall_page(page, amd);
        // Host writes do not invalidate translated code.
        self.flush_code_cache();
        true
    }

    pub fn registers(&mut self) -> Vec<(&'static str, u64)> {
        self.state.load(&self.engine);
        let st = &self.state;
        const NAMES: [&str; 16] =
            ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];
        let mut v: Vec<(&'static str, u64)> = NAMES.iter().enumerate().map(|(i, n)| (*n, st.reg(i))).collect();
        v.extend([
            ("rip", st.rip()),
            ("rflags", st.rflags()),
            ("cs", st.seg(unicorn_gaps::R_CS).selector as u64),
            ("ss", st.seg(unicorn_gaps::R_SS).selector as u64),
            ("cpl", st.cpl() as u64),
            ("cr0", st.cr(0)),
            ("cr2", st.cr(2)),
            ("cr3", st.cr(3)),
            ("cr4", st.cr(4)),
            ("efer", st.efer()),
            ("fs_base", self.engine.read(Reg::FS_BASE)),
            ("gs_base", self.engine.read(Reg::GS_BASE)),
        ]);
        v
    }

    pub fn xen_state(&mut self) -> &mut XenState {
        self.xen()
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        // No kick may reach the engine once it is closed.
        self.ticker.set_engine(std::ptr::null_mut());
        // Close the engine first: its hooks point at HookData.
        let engine = std::mem::replace(&mut self.engine, Engine::closed());
        drop(engine);
        unsafe { drop(Box::from_raw(self.hooks)) };
    }
}

enum Inject {
    Done,
    Shadow,
    Masked,
}

/// Write vCPU `v`'s registered runstate and time areas (guest-virtual, so
/// through the page tables `ps`). A bad address is the guest's problem: it
/// simply sees nothing, as with Xen.
fn write_vcpu_areas(xen: &mut crate::xen::XenState, ram: &GuestRam, ps: &PagingState, v: u32) {
    let mut m: &GuestRam = ram;
    let x = &xen.vcpus[v as usize];
    if let Some(va) = x.runstate_area {
        let b = x.runstate_info(xen.clock.now_ns());
        let _ = mmu::write_linear(&mut m, ps, va, &b, false);
    }
    if let Some(va) = x.time_area {
        if let Ok(gpa) = mmu::translate(&mut m, ps, va, mmu::Access::Write, false) {
            if gpa & 0xfff <= 4096 - 32 {
                write_time_info(ram, gpa, &xen.clock.time_info());
            }
        }
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
