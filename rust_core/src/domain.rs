//! A domain: guest RAM, Xen's domain-wide state, the vCPUs and the engine
//! they run on, and the run loop.
//!
//! `run()` is KVM-like: it runs the vCPUs until the host is needed (a
//! shutdown, console output, a notification for a host port, host I/O,
//! an idle domain with nothing armed, an error) and returns an `Exit`
//! naming the vCPU. In between it schedules the vCPUs round-robin on this
//! thread (sched.rs), runs each one's slice (`run_slice`: interrupt
//! injection, the engine, what its hooks stopped for), and when every vCPU
//! waits it sleeps here until the earliest timer or a wake-up (waker.rs),
//! without returning to the host.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use unicorn_engine::uc_error;

use crate::cpu::{Cpu, Stop};
use crate::debug::{DebugStop, Debugger};
use crate::exit::{Exit, ExitReason};
use crate::interrupts::{self, DeliveryError, Event};
use crate::memory::{GuestRam, PhysMem};
use crate::mmu;
use crate::profile::{self, Place, Profiler, Sample};
use crate::sched::{self, Next, RoundRobin, View};
use crate::uc::{self, Reg};
use crate::unicorn_gaps::{self, RFLAGS_IF};
use crate::vcpu::{Activity, Vcpu, RUNSTATE_RUNNING};
use crate::waker::{Wait, Waker};
use crate::xen::evtchn::VIRQ_TIMER;
use crate::layout;
use crate::snapshot::{self, invalid, ArchRegs, Dec, Enc, SnapshotError};
use crate::xen::evtchn::EventChannels;
use crate::xen::gnttab::GrantTable;
use crate::xen::{DomainState, Remap, SharedState};

/// The most vCPUs a domain may have (xl's `vcpus`, within what the 2-level
/// event ABI and the MADT here describe).
pub const MAX_VCPUS: u32 = 64;

/// How a vCPU's slice ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SliceEnd {
    /// Its time is up, or another vCPU should run now.
    Preempted,
    /// It halted, blocked or went down.
    Idle,
    /// The host is needed.
    Exit(ExitReason),
}

enum Inject {
    Done,
    /// In an interrupt shadow (after STI, MOV SS).
    Shadow,
    /// IF=0.
    Masked,
    /// Real mode (a trampoline on its way up): not delivered here.
    RealMode,
}

pub struct Domain {
    // Drop order: the engine (and its hooks) before the state they point to.
    cpu: Cpu,
    pub vcpus: Vec<Vcpu>,
    pub state: DomainState,
    rr: RoundRobin,
    /// A host descriptor (Python's event loop) that ends an idle wait.
    pub host_fd: Option<RawFd>,
    /// `run()` returns at least this often, so the host stays responsive.
    pub time_slice: Duration,
    /// Times the domain slept with every vCPU idle.
    pub idle_waits: u64,
    /// Breakpoints, steps and held vCPUs a debugger asked for.
    pub debug: Debugger,
    /// The sampling profiler, while a profile is taken (profile.rs).
    pub profiler: Option<Profiler>,
}

impl Domain {
    pub fn new(memory_bytes: u64, domid: u32, uuid: [u8; 16], nr_vcpus: u32) -> Result<Self, String> {
        if !(1..=MAX_VCPUS).contains(&nr_vcpus) {
            return Err(format!("a domain has 1 to {MAX_VCPUS} vCPUs, not {nr_vcpus}"));
        }
        let ram = GuestRam::new(memory_bytes).map_err(|e| e.to_string())?;
        Self::with_ram(ram, domid, uuid, nr_vcpus)
    }

    /// A domain on RAM made elsewhere (a save file's image, a fork's).
    pub fn with_ram(ram: GuestRam, domid: u32, uuid: [u8; 16], nr_vcpus: u32) -> Result<Self, String> {
        if !(1..=MAX_VCPUS).contains(&nr_vcpus) {
            return Err(format!("a domain has 1 to {MAX_VCPUS} vCPUs, not {nr_vcpus}"));
        }
        let ram = Arc::new(ram);
        let cpu = Cpu::new(ram.clone(), domid, nr_vcpus)?;
        let waker = Waker::new().map_err(|e| format!("eventfd: {e}"))?;
        waker.set_kicker(cpu.kicker());
        let shared = Arc::new(SharedState::new(ram, domid as u16, nr_vcpus, waker));
        let state = DomainState::new(domid, uuid, shared, nr_vcpus);
        let vcpus = (0..nr_vcpus).map(|i| Ok(Vcpu::new(i, cpu.power_on_state()?))).collect::<Result<_, String>>()?;
        Ok(Self {
            cpu,
            vcpus,
            state,
            rr: RoundRobin::default(),
            host_fd: None,
            time_slice: Duration::from_millis(50),
            idle_waits: 0,
            debug: Debugger::new(nr_vcpus),
            profiler: None,
        })
    }

    /// The core's part of a save (snapshot.rs): every vCPU, Xen's state of
    /// the domain, the pages Xen placed outside RAM. Between runs only.
    pub fn save_state(&mut self) -> Vec<u8> {
        // Events device threads queued belong in the saved bitmaps.
        self.state.shared.raise_queued();
        let mut e = Enc::default();
        let now = self.state.system_time_ns();
        let guest_tsc = self.state.clock.guest_tsc();
        e.section(b"PVHC", |e| {
            e.u32(snapshot::FORMAT);
            e.u32(self.vcpus.len() as u32);
            e.u64(self.state.ram.size());
            e.u32(self.state.domid);
            e.u64(now);
            e.u64(guest_tsc);
        });
        e.section(b"DOMS", |e| self.state.encode(e));
        for v in &self.vcpus {
            e.section(b"VCPU", |e| {
                ArchRegs::capture(self.cpu.engine(), &v.regs).encode(e);
                v.encode_state(e);
            });
        }
        // The engine holds whichever vCPU was captured last.
        self.cpu.forget_loaded();
        e.section(b"OVRL", |e| {
            let pages = self.state.ram.overlay_pages();
            e.len(pages.len());
            for (gpa, bytes) in pages {
                e.u64(gpa);
                e.buf.extend_from_slice(&bytes);
            }
        });
        e.section(b"GBAK", |e| {
            let bits = self.state.ram.given_back_bitmap();
            e.len(bits.len());
            for w in bits {
                e.u64(w);
            }
        });
        // After the pages they may live in.
        e.section(b"EVTC", |e| self.state.ports().encode(e));
        e.section(b"GNTT", |e| self.state.grants().encode(e));
        e.buf
    }

    /// A domain from a save: `ram` holds the guest's memory as saved,
    /// `state` is `save_state`'s record. `domid` and `uuid` may be new (a
    /// fork). System time goes on from the saved instant (timers keep the
    /// time they had left), the wall clock jumps to now.
    pub fn restore(ram: GuestRam, domid: u32, uuid: [u8; 16], state: &[u8]) -> Result<Self, SnapshotError> {
        let mut d = Dec::new(state);
        let mut h = d.section(b"PVHC")?;
        let format = h.u32()?;
        if format != snapshot::FORMAT {
            return Err(SnapshotError::Format(format));
        }
        let nr_vcpus = h.u32()?;
        let ram_size = h.u64()?;
        let old_domid = h.u32()?;
        let now = h.u64()?;
        let guest_tsc = h.u64()?;
        h.finish()?;
        if ram_size != ram.size() {
            return Err(invalid(format!("saved with {ram_size} bytes of RAM, restored into {}", ram.size())));
        }
        if !(1..=MAX_VCPUS).contains(&nr_vcpus) {
            return Err(invalid(format!("{nr_vcpus} vCPUs")));
        }
        let mut dom = Self::with_ram(ram, domid, uuid, nr_vcpus).map_err(invalid)?;
        dom.state.clock.resume_at(now, guest_tsc);
        let tsc_offset = dom.state.clock.guest_tsc_offset;
        dom.cpu.set_guest_tsc_offset(tsc_offset);
        let mut s = d.section(b"DOMS")?;
        dom.state.decode(&mut s)?;
        s.finish()?;
        for i in 0..nr_vcpus as usize {
            let mut s = d.section(b"VCPU")?;
            let regs = ArchRegs::decode(&mut s)?;
            let v = &mut dom.vcpus[i];
            v.decode_state(&mut s)?;
            s.finish()?;
            v.regs = regs.rebuild(dom.cpu.engine(), dom.cpu.pristine()).map_err(invalid)?;
        }
        dom.cpu.forget_loaded();
        let ram = dom.state.ram.clone();
        let mut remaps = Vec::new();
        let mut s = d.section(b"OVRL")?;
        for _ in 0..s.len(crate::memory::MAX_OVERLAYS, 8 + 4096)? {
            let gpa = s.u64()?;
            let bytes = s.bytes_fixed(4096)?;
            if !gpa.is_multiple_of(4096) || gpa >= layout::P2M_PHYS_END || ram.offset_of(gpa, 4096).is_some() {
                return Err(invalid(format!("a Xen page at {gpa:#x}")));
            }
            let host = ram.add_overlay(gpa).map_err(|e| invalid(e.to_string()))?;
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), host, 4096) };
            remaps.push(Remap::Overlay { gpa, host: host as usize });
        }
        s.finish()?;
        let mut s = d.section(b"GBAK")?;
        let n = s.len(usize::MAX, 8)?;
        let bits = (0..n).map(|_| s.u64()).collect::<Result<Vec<_>, _>>()?;
        s.finish()?;
        for gpa in ram.restore_given_back(&bits).map_err(|e| invalid(e.to_string()))? {
            remaps.push(Remap::Hole { gpa, len: 4096 });
        }
        let mut s = d.section(b"EVTC")?;
        *dom.state.ports() = EventChannels::decode(&ram, domid as u16, old_domid as u16, nr_vcpus, &mut s)?;
        s.finish()?;
        let mut s = d.section(b"GNTT")?;
        *dom.state.grants() = GrantTable::decode(&ram, &mut s)?;
        s.finish()?;
        d.finish()?;
        dom.cpu.remap(&remaps).map_err(invalid)?;
        // Saved when it asked to suspend: its SCHEDOP_shutdown(SHUTDOWN_suspend)
        // returns 1, "the suspend was cancelled, go on in the same domain",
        // as Xen's toolstack answers a guest it resumes (libxc's
        // modify_returncode): the guest keeps its event channels and
        // devices, which the save carried.
        if let Some(v) = dom.state.suspended_vcpu.take() {
            dom.vcpus[v as usize].regs.set_reg(0, 1);
        }
        // The guest's clocks: the wall clock moves to now, each vCPU's
        // pvclock is stamped against this host's TSC.
        let shared_info = dom.state.ports().shared_info();
        if let Some(gpa) = shared_info {
            dom.state.write_wallclock(gpa);
        }
        for v in 0..nr_vcpus {
            dom.state.update_vcpu_time(v);
        }
        Ok(dom)
    }

    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.state.ram
    }

    pub fn shared(&self) -> &Arc<SharedState> {
        &self.state.shared
    }

    /// vCPU 0 at the PVH entry (the other vCPUs wait for the guest to bring them up).
    pub fn set_pvh_entry(&mut self, entry: u64, start_info: u64) -> Result<(), String> {
        self.vcpus[0].set_pvh_entry(&self.state.ram, entry, start_info)?;
        self.cpu.forget_tlb_of(0);
        self.cpu.flush_code_cache();
        Ok(())
    }

    pub fn code_cache_flushes(&self) -> u64 {
        self.cpu.code_cache_flushes
    }

    /// RDMSR sites hooked and RDMSRs answered there (cpu.rs).
    pub fn rdmsr_stats(&self) -> (usize, u64) {
        self.cpu.rdmsr_stats()
    }

    pub fn context_switches(&self) -> u64 {
        self.cpu.context_switches
    }

    /// Run until the host is needed.
    pub fn run(&mut self) -> Exit {
        let host_end = Instant::now() + self.time_slice;
        if let Err(message) = self.cpu.install_breakpoints(&self.debug.breakpoints) {
            return Exit::domain(ExitReason::Error { message });
        }
        // The ticks since the last run were the host's.
        if let Some(p) = self.profiler.as_mut() {
            p.off_guest(Place::Host);
        }
        loop {
            let now = self.state.system_time_ns();
            self.fire_timers(now);
            self.state.shared.raise_queued();
            self.wake_idle(now);
            if let Some(exit) = self.steps_that_cannot_run() {
                return exit;
            }
            if self.state.shared.waker.take_host_attention() {
                return Exit::domain(ExitReason::Kicked);
            }
            let views: Vec<View> = self.vcpus.iter().map(|v| self.view(v)).collect();
            match self.rr.next(&views) {
                Next::Run { vcpu, alone } => {
                    let end = if alone { host_end } else { host_end.min(Instant::now() + sched::VCPU_SLICE) };
                    if let SliceEnd::Exit(reason) = self.run_slice(vcpu, end) {
                        return Exit::of(vcpu, reason);
                    }
                }
                Next::Hung => {
                    return Exit::domain(ExitReason::Hung { why: self.why_hung() });
                }
                Next::Wait { deadline } => {
                    // Nothing armed: the host's sources are all that can
                    // wake the domain; let it decide whether it is hung.
                    let Some(d) = deadline else { return Exit::domain(ExitReason::Idle) };
                    // Any u64 deadline: capped before it meets an Instant.
                    let timeout = self.state.clock.until(d).min(host_end.saturating_duration_since(Instant::now()));
                    self.idle_waits += 1;
                    let woken = self.state.shared.waker.wait(self.host_fd, Some(timeout));
                    if let Some(p) = self.profiler.as_mut() {
                        p.off_guest(Place::Idle);
                    }
                    if woken == Wait::HostReady {
                        return Exit::domain(ExitReason::HostIo);
                    }
                }
            }
            if Instant::now() >= host_end {
                return Exit::domain(ExitReason::Kicked);
            }
        }
    }

    /// A step asked of a vCPU that is halted, blocked or down is over at
    /// once (interrupts are kept from a stepping vCPU, so nothing would
    /// ever wake it): it stops where it is.
    fn steps_that_cannot_run(&mut self) -> Option<Exit> {
        if !self.debug.any_step() {
            return None;
        }
        let v = self.vcpus.iter().find(|v| self.debug.stepping(v.id as usize) && !v.is_running())?;
        let (id, address) = (v.id, linear_ip_of(&v.regs));
        self.debug.stopped(id as usize, address);
        Some(Exit::of(id, ExitReason::Debug { stop: DebugStop::Step, address }))
    }

    fn view(&self, v: &Vcpu) -> View {
        let halted_for_good = v.activity == Activity::Halted && !v.nmi_pending && v.regs.rflags() & RFLAGS_IF == 0;
        if self.debug.frozen(v.id as usize) {
            // Held by the debugger: neither run nor waited for.
            return View { runnable: false, boosted: false, deadline: None, stuck: false };
        }
        View {
            runnable: v.is_running(),
            boosted: v.boosted,
            deadline: v.deadline(),
            stuck: v.down || v.activity == Activity::WaitForSipi || halted_for_good,
        }
    }

    fn why_hung(&self) -> String {
        let halted = self.vcpus.iter().filter(|v| !v.down && v.activity == Activity::Halted).count();
        if halted > 0 {
            format!("HLT with interrupts disabled ({halted} of {} vCPUs; the rest down)", self.vcpus.len())
        } else {
            "every vCPU is down".into()
        }
    }

    /// Fire every vCPU's due timers. Returns the vCPUs whose VIRQ_TIMER was raised.
    fn fire_timers(&mut self, now: u64) -> u64 {
        let mut woken = 0u64;
        for v in self.vcpus.iter_mut() {
            if v.timers.fire(now) {
                let mut ev = self.state.shared.ports();
                if let Some(port) = ev.find_virq(VIRQ_TIMER, v.id) {
                    if let Some(t) = ev.raise(&self.state.ram, port) {
                        woken |= 1 << t;
                    }
                }
            }
        }
        woken
    }

    /// Wake the vCPUs whose wait is over. Returns the vCPUs woken.
    fn wake_idle(&mut self, now: u64) -> u64 {
        let mut woken = 0u64;
        for i in 0..self.vcpus.len() {
            if self.wait_is_over(i, now) {
                let v = &mut self.vcpus[i];
                v.activity = Activity::Running;
                v.poll_deadline = None;
                v.boosted = true;
                woken |= 1 << i;
            }
        }
        woken
    }

    /// Whether vCPU `i`, halted, blocked or polling, may go on.
    fn wait_is_over(&self, i: usize, now: u64) -> bool {
        let v = &self.vcpus[i];
        if v.down {
            return false;
        }
        let ram = &self.state.ram;
        match &v.activity {
            Activity::Running | Activity::WaitForSipi => false,
            Activity::Halted => {
                v.nmi_pending || (v.regs.rflags() & RFLAGS_IF != 0 && self.next_interrupt(i).is_some())
            }
            Activity::Blocked => v.nmi_pending || self.state.ports().upcall_pending(ram, v.id),
            Activity::Polling { ports } => {
                let ev = self.state.ports();
                v.poll_deadline.is_some_and(|d| d <= now)
                    || ev.upcall_pending(ram, v.id)
                    || ports.iter().any(|&p| ev.is_pending(ram, p))
            }
        }
    }

    /// The vector to deliver next to vCPU `i`: a LAPIC vector (an IPI) or
    /// the event channel upcall (its own vector, else the domain's callback
    /// vector), the higher of the two.
    fn next_interrupt(&self, i: usize) -> Option<u8> {
        let v = &self.vcpus[i];
        let lapic = v.lapic.highest_pending();
        let upcall = v
            .upcall_vector
            .or(self.state.callback_vector())
            .filter(|_| self.state.ports().upcall_pending(&self.state.ram, v.id));
        lapic.max(upcall)
    }

    fn set_runstate(&mut self, i: usize, state: u32) {
        let now = self.state.system_time_ns();
        let v = &mut self.vcpus[i];
        if v.runstate.set(state, now) && v.runstate_area.is_some() {
            v.write_areas(&self.state.ram, &self.state.clock, &v.regs.paging(), self.state.shinfo_width());
        }
    }

    /// Run vCPU `id` until its slice ends (`until`), it idles, or the host
    /// is needed. Its registers are on the engine for the length of the
    /// slice and back in its `Vcpu` after it.
    fn run_slice(&mut self, id: u32, until: Instant) -> SliceEnd {
        let i = id as usize;
        self.cpu.load(&mut self.vcpus[i]);
        self.vcpus[i].boosted = false;
        self.set_runstate(i, RUNSTATE_RUNNING);
        self.state.milestones.instruction();
        let mut stepped = false;
        let mut end = self.slice_loop(i, until, &mut stepped);
        if stepped && !matches!(end, SliceEnd::Exit(_)) {
            // Its one instruction halted, blocked or ended the slice.
            end = self.debug_stop(i, DebugStop::Step);
        }
        self.profile_tick(i);
        self.cpu.save(&mut self.vcpus[i]);
        let rs = self.vcpus[i].idle_runstate();
        self.set_runstate(i, rs);
        end
    }

    /// `stepped`: set once the vCPU ran the step the debugger asked for.
    fn slice_loop(&mut self, i: usize, until: Instant, stepped: &mut bool) -> SliceEnd {
        loop {
            if let Some(ev) = self.vcpus[i].pending_exception.take() {
                if let Err(e) = self.deliver(i, ev) {
                    return SliceEnd::Exit(match e {
                        DeliveryError::TripleFault { chain } => ExitReason::TripleFault { chain },
                        DeliveryError::Unsupported(s) => ExitReason::Error { message: s },
                    });
                }
                self.vcpus[i].exceptions_delivered += 1;
            }
            // A step is reported after the exception its instruction raised
            // (if any) was delivered: it stops at the handler, as on hardware.
            if *stepped {
                return self.debug_stop(i, DebugStop::Step);
            }
            let stepping = self.debug.stepping(i);
            let kicked = self.cpu.take_kick();
            if kicked {
                self.vcpus[i].window_poll_at = None;
            }
            self.profile_tick(i);
            if self.vcpus[i].down {
                return SliceEnd::Idle;
            }
            let now = self.state.system_time_ns();
            self.state.shared.raise_queued(); // the engine is stopped: no guest LOCK'd op in flight
            let others = (self.fire_timers(now) | self.wake_idle(now)) & !(1 << i);
            // At a kick: the slice is over, someone else woke up (give them
            // the engine; the round robin comes back here), or the host
            // wants the run to end (run() sees it).
            let end_slice = Instant::now() >= until
                || (others != 0 && self.vcpus.iter().any(|v| v.id as usize != i && v.is_running()))
                || self.state.shared.waker.host_wants_attention();
            if kicked && end_slice {
                return SliceEnd::Preempted;
            }

            let mut count = 0;
            let mut poll_window = false;
            let nmi = self.vcpus[i].nmi_pending;
            let wanted = if nmi { Some(Event::external(interrupts::NMI)) } else { self.next_interrupt(i).map(Event::external) };
            // A stepping vCPU takes no interrupt: while the debugger waits
            // between steps the guest's timers fire, and every step would
            // land in a handler (QEMU's gdbstub steps with IRQs off too).
            if let Some(ev) = wanted.filter(|_| !stepping) {
                match self.try_inject(i, ev) {
                    Inject::Done => {}
                    // An NMI ignores IF: step past the shadow.
                    Inject::Shadow if nmi => count = 1,
                    // IF=0 or a shadow: the interrupt line stops the vCPU
                    // the moment it can take the interrupt (after STI and
                    // the next instruction, POPF, IRET).
                    Inject::Shadow | Inject::Masked => self.cpu.raise_line(),
                    // Real mode: no line; look again soon.
                    Inject::RealMode => poll_window = true,
                }
            }
            self.arm_ticker(i, until, poll_window);

            let rip = self.cpu.read(Reg::RIP);
            if count == 0 && self.cpu.msr_watch > 0 {
                count = self.cpu.watch_step(rip);
            }
            if stepping {
                count = 1;
            }
            // Leaving a breakpoint it stopped at (or stepping one): the
            // instruction there runs once, alone, with that exit lifted.
            let over = !self.debug.breakpoints.is_empty() && self.debug.go_over(i, self.cpu.linear_ip());
            if over {
                count = 1;
                if let Err(message) = self.cpu.lift_breakpoint(self.cpu.linear_ip()) {
                    return SliceEnd::Exit(ExitReason::Error { message });
                }
            }
            let started = self.cpu.start(&mut self.state, &mut self.vcpus, rip, count);
            if over {
                if let Err(message) = self.cpu.restore_breakpoints() {
                    return SliceEnd::Exit(ExitReason::Error { message });
                }
            }
            let Some((err, kicked_in_run)) = started else {
                continue; // a kick came first: take it above
            };
            *stepped |= stepping;
            let (stop, exception) = self.cpu.take_stop();
            // Mapping changes first, whatever else stopped the engine: a
            // stronger reason in the same run (an exit, a block) replaces
            // the Remap stop, and the guest must not run on stale mappings.
            if !self.state.pending_remaps.is_empty() {
                let remaps = std::mem::take(&mut self.state.pending_remaps);
                if let Err(message) = self.cpu.remap(&remaps) {
                    return SliceEnd::Exit(ExitReason::Error { message });
                }
            }
            if self.cpu.window_opened() {
                // QEMU recorded its aborted delivery of the acknowledge as
                // an exception in flight: forget it (see InterruptLine).
                let engine = self.cpu.engine();
                let st = &mut self.vcpus[i].regs;
                st.load(engine);
                st.end_exception();
                st.store(engine);
            }
            if let Some(vector) = exception {
                if stop != Some(Stop::WatchHypercallMsr) {
                    let ev = self.exception_event(i, vector);
                    self.vcpus[i].pending_exception = Some(ev);
                }
            }
            match stop {
                Some(Stop::Exit(reason)) => return SliceEnd::Exit(reason),
                Some(Stop::Block) => {
                    let now = self.state.system_time_ns();
                    if self.vcpus[i].down || !self.wait_is_over(i, now) {
                        return SliceEnd::Idle;
                    }
                    self.vcpus[i].activity = Activity::Running;
                    self.vcpus[i].poll_deadline = None;
                }
                Some(Stop::Yield) => {
                    if self.vcpus.iter().any(|v| v.id as usize != i && v.is_running()) {
                        return SliceEnd::Preempted;
                    }
                }
                Some(Stop::Kicked) => {}
                // Done above.
                Some(Stop::Remap) => {}
                Some(Stop::Syscall) => self.syscall(i),
                Some(Stop::Sysenter) => self.sysenter(i),
                Some(Stop::WatchHypercallMsr) => self.cpu.begin_msr_watch(),
                None if exception.is_some() => {}
                // Unicorn's exit at a breakpoint looks like a HLT before it
                // (RIP at the address, no reason): the breakpoint wins (a
                // HLT just before one then wakes spuriously, which idle
                // loops allow for).
                None if err == uc_error::OK && self.cpu.at_breakpoint() && !*stepped => {
                    return self.debug_stop(i, DebugStop::Breakpoint);
                }
                // A kick: the engine stopped at the start of a block. (If it
                // halted just before the kick came, the guest resumes after its
                // HLT: a spurious wake-up, which idle loops allow for.)
                None if kicked_in_run && err == uc_error::OK => {}
                None if count > 0 && err == uc_error::OK => {
                    if self.cpu.bad_hypercall_page {
                        // WRMSR to a frame that is not RAM: Xen injects #GP.
                        self.cpu.bad_hypercall_page = false;
                        self.cpu.write(Reg::RIP, rip);
                        self.vcpus[i].pending_exception = Some(Event::exception(interrupts::GP, Some(0)));
                    }
                }
                None if err == uc_error::OK => {
                    let mut b = [0u8; 1];
                    let ip = self.cpu.linear_ip();
                    let halted = self.cpu.read_linear(ip.wrapping_sub(1), &mut b).is_ok() && b[0] == 0xf4;
                    if !halted {
                        // Unicorn's own check_exception saw a fault on top
                        // of #DF and stopped the CPU ("Triple fault"), or
                        // something stopped the engine with no reason.
                        let engine = self.cpu.engine();
                        let st = &mut self.vcpus[i].regs;
                        st.load(engine);
                        let old = st.old_exception();
                        return SliceEnd::Exit(if old >= 0 {
                            ExitReason::TripleFault { chain: vec![old as u8] }
                        } else {
                            ExitReason::Error {
                                message: format!(
                                    "the engine stopped with no reason at {:#x} (cpl {}, kicked {kicked_in_run}, rflags {:#x})",
                                    st.rip(),
                                    st.cpl(),
                                    st.rflags()
                                ),
                            }
                        });
                    }
                    // HLT: go on at once if an interrupt can be taken now,
                    // else idle until one can.
                    let now = self.state.system_time_ns();
                    self.fire_timers(now);
                    let v = &self.vcpus[i];
                    let can_take = self.cpu.read(Reg::RFLAGS) & RFLAGS_IF != 0 && self.next_interrupt(i).is_some();
                    if !(v.nmi_pending || can_take) {
                        self.vcpus[i].activity = Activity::Halted;
                        return SliceEnd::Idle;
                    }
                }
                None => {
                    // No memory hook reports the address: Unicorn keeps
                    // stores to once-executed pages on its slow path while
                    // any such hook exists (docs/unicorn.md).
                    let what = match err {
                        uc_error::READ_UNMAPPED | uc_error::WRITE_UNMAPPED | uc_error::FETCH_UNMAPPED => {
                            "guest access to unbacked guest-physical memory: "
                        }
                        // Frames the domain has no RAM at read as all ones,
                        // but code cannot run there (Xen crashes the domain).
                        uc_error::FETCH_PROT => "instruction fetch from unbacked guest-physical memory: ",
                        _ => "",
                    };
                    return SliceEnd::Exit(ExitReason::Error {
                        message: format!("{what}{} at rip {:#x}", uc::strerror(err), self.cpu.read(Reg::RIP)),
                    });
                }
            }
        }
    }

    /// The running vCPU `i` stops for the debugger where it is.
    fn debug_stop(&mut self, i: usize, stop: DebugStop) -> SliceEnd {
        let address = self.cpu.linear_ip();
        self.debug.stopped(i, address);
        SliceEnd::Exit(ExitReason::Debug { stop, address })
    }

    /// Wake the running vCPU at the end of its slice, the next timer of any
    /// vCPU (a halted one may need to run), or shortly to look for an
    /// interrupt window.
    fn arm_ticker(&mut self, i: usize, until: Instant, poll_window: bool) {
        let mut wake = until;
        if let Some(d) = self.vcpus.iter().filter(|v| !v.down).filter_map(|v| v.deadline()).min() {
            let now = Instant::now();
            wake = now + self.state.clock.until(d).min(wake.saturating_duration_since(now));
        }
        if let Some(p) = &self.profiler {
            wake = wake.min(Instant::now() + p.next_tick_in());
        }
        let v = &mut self.vcpus[i];
        if poll_window {
            // Keep the look-again time until that kick has been taken: a
            // guest that stops every few microseconds with IF=0 (SYSCALL
            // entry under FMASK) would otherwise push it back for ever and
            // never see its interrupt.
            let at = *v.window_poll_at.get_or_insert_with(|| Instant::now() + Duration::from_micros(100));
            wake = wake.min(at);
        } else {
            v.window_poll_at = None;
        }
        self.cpu.arm(Some(wake));
    }

    /// A profile's sample of the running vCPU `i`, if a tick is due.
    fn profile_tick(&mut self, i: usize) {
        let Some(p) = self.profiler.as_mut() else { return };
        let now = profile::monotonic_ns();
        let weight = p.due(now);
        if weight == 0 {
            return;
        }
        let (cpl, bits) = self.cpu.live_mode();
        let ip = self.cpu.linear_ip();
        let cpu = &self.cpu;
        let frames = profile::unwind(|va, buf| cpu.read_linear(va, buf).is_ok(), cpu.read(Reg::RBP), bits);
        p.push(Sample { t_ns: now, weight, place: Place::Guest, vcpu: i as u32, cpl, bits, ip, frames });
    }

    /// Deliver an external interrupt or NMI to the running vCPU `i` if it
    /// can take one now.
    fn try_inject(&mut self, i: usize, ev: Event) -> Inject {
        let nmi = ev.vector == interrupts::NMI && self.vcpus[i].nmi_pending;
        if !nmi && self.cpu.read(Reg::RFLAGS) & RFLAGS_IF == 0 {
            return Inject::Masked;
        }
        let engine = self.cpu.engine();
        let v = &mut self.vcpus[i];
        v.regs.load(engine);
        if v.regs.cr(0) & mmu::CR0_PE == 0 {
            return Inject::RealMode;
        }
        if v.regs.interrupt_shadow() {
            return Inject::Shadow;
        }
        match interrupts::deliver(&mut v.regs, &self.state.ram, ev) {
            Ok(()) => {
                v.regs.store(engine);
                if nmi {
                    v.nmi_pending = false;
                } else {
                    v.lapic.clear_pending(ev.vector);
                }
                v.interrupts_delivered += 1;
            }
            // A fault while delivering: the processor raises it instead.
            Err(DeliveryError::TripleFault { .. }) | Err(DeliveryError::Unsupported(_)) => {
                v.pending_exception = Some(Event::exception(interrupts::GP, Some(0)));
            }
        }
        Inject::Done
    }

    fn exception_event(&mut self, i: usize, vector: u8) -> Event {
        let engine = self.cpu.engine();
        let st = &mut self.vcpus[i].regs;
        st.load(engine);
        if st.exception_is_int() {
            // INT n is CD ib; INT3, INTO and INT1 are one byte.
            let rip = self.cpu.linear_ip();
            let mut b = [0u8; 2];
            let two = self.cpu.read_linear(rip.wrapping_sub(2), &mut b).is_ok() && b == [0xcd, vector];
            Event::software(vector, if two { 2 } else { 1 })
        } else {
            let ec = interrupts::has_error_code(vector).then(|| st.error_code());
            Event::exception(vector, ec)
        }
    }

    fn deliver(&mut self, i: usize, ev: Event) -> Result<(), DeliveryError> {
        let engine = self.cpu.engine();
        let st = &mut self.vcpus[i].regs;
        st.load(engine);
        interrupts::deliver(st, &self.state.ram, ev)?;
        st.store(engine);
        Ok(())
    }

    fn sysenter(&mut self, i: usize) {
        let msrs = self.cpu.sysenter_msrs();
        let engine = self.cpu.engine();
        let st = &mut self.vcpus[i].regs;
        st.load(engine);
        // Unicorn's SYSENTER only advanced RIP past the instruction.
        let at = st.rip().wrapping_sub(2);
        match interrupts::emulate_sysenter(st, &msrs) {
            Ok(()) => st.store(engine),
            Err(ev) => {
                self.cpu.write(Reg::RIP, at);
                self.vcpus[i].pending_exception = Some(ev);
            }
        }
    }

    fn syscall(&mut self, i: usize) {
        let msrs = self.cpu.syscall_msrs();
        let engine = self.cpu.engine();
        let st = &mut self.vcpus[i].regs;
        st.load(engine);
        // Unicorn's SYSCALL only advanced RIP past the instruction.
        let next = st.rip();
        match interrupts::emulate_syscall(st, next, &msrs) {
            Ok(()) => st.store(engine),
            Err(ev) => {
                self.cpu.write(Reg::RIP, next.wrapping_sub(2));
                self.vcpus[i].pending_exception = Some(ev);
            }
        }
    }

    /// vCPU `id`'s registers (outside `run`, where they are in its `Vcpu`).
    pub fn registers(&self, id: usize) -> Option<Vec<(&'static str, u64)>> {
        let v = self.vcpus.get(id)?;
        let st = &v.regs;
        const NAMES: [&str; 16] =
            ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];
        let mut out: Vec<(&'static str, u64)> = NAMES.iter().enumerate().map(|(i, n)| (*n, st.reg(i))).collect();
        out.extend([
            ("rip", st.rip()),
            ("rflags", st.rflags()),
            ("cs", st.seg(unicorn_gaps::R_CS).selector as u64),
            ("ss", st.seg(unicorn_gaps::R_SS).selector as u64),
            ("ds", st.seg(unicorn_gaps::R_DS).selector as u64),
            ("es", st.seg(unicorn_gaps::R_ES).selector as u64),
            ("fs", st.seg(unicorn_gaps::R_FS).selector as u64),
            ("gs", st.seg(unicorn_gaps::R_GS).selector as u64),
            ("cpl", st.cpl() as u64),
            ("cr0", st.cr(0)),
            ("cr2", st.cr(2)),
            ("cr3", st.cr(3)),
            ("cr4", st.cr(4)),
            ("efer", st.efer()),
            ("fs_base", st.seg(unicorn_gaps::R_FS).base),
            ("gs_base", st.seg(unicorn_gaps::R_GS).base),
        ]);
        Some(out)
    }

    /// Set one of vCPU `id`'s registers by the name `registers` gives it
    /// (between runs): the general registers, rip and rflags; the rest
    /// carry hidden state a plain write would not keep consistent.
    pub fn set_register(&mut self, id: usize, name: &str, value: u64) -> Result<(), String> {
        const NAMES: [&str; 16] =
            ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];
        let v = self.vcpus.get_mut(id).ok_or("no such vCPU")?;
        let st = &mut v.regs;
        match name {
            "rip" => st.set_rip(value),
            // Reserved bit 1 is kept set by set_rflags; VM and the rest of
            // the upper half cannot be set from here.
            "rflags" => st.set_rflags(value & 0x3d_7fd5),
            _ => st.set_reg(NAMES.iter().position(|n| *n == name).ok_or(format!("register {name} cannot be set"))?, value),
        }
        self.cpu.forget_tlb_of(id as u32);
        Ok(())
    }

    /// Write guest-linear memory through vCPU `id`'s page tables, as a
    /// debugger does: read-only pages are written too (kernel text), only
    /// unmapped ones refuse. Translated code from there is dropped.
    pub fn write_linear(&mut self, id: usize, va: u64, data: &[u8]) -> Result<(), String> {
        let v = self.vcpus.get(id).ok_or("no such vCPU")?;
        let ps = v.regs.paging();
        let mut m: &GuestRam = &self.state.ram;
        let mut pieces = Vec::new();
        let mut done = 0usize;
        while done < data.len() {
            let cur = va.wrapping_add(done as u64);
            let chunk = ((layout::PAGE_SIZE - (cur & (layout::PAGE_SIZE - 1))) as usize).min(data.len() - done);
            let gpa = mmu::translate(&mut m, &ps, cur, mmu::Access::Read, false).map_err(|e| format!("{e:?}"))?;
            // RAM only: not the LAPIC or the MMIO hole.
            self.state.ram.slice(gpa, chunk as u64).map_err(|e| e.to_string())?;
            pieces.push((gpa, done, chunk));
            done += chunk;
        }
        for (gpa, off, len) in pieces {
            m.write_phys(gpa, &data[off..off + len]).map_err(|e| e.to_string())?;
        }
        if !data.is_empty() {
            self.cpu.flush_code_cache();
        }
        Ok(())
    }

    /// Read guest-linear memory through vCPU `id`'s page tables.
    pub fn read_linear(&self, id: usize, va: u64, buf: &mut [u8]) -> Result<(), String> {
        let v = self.vcpus.get(id).ok_or("no such vCPU")?;
        let mut m: &GuestRam = &self.state.ram;
        mmu::read_linear(&mut m, &v.regs.paging(), va, buf, false).map_err(|e| format!("{e:?}"))
    }
}

/// The linear address of a vCPU's next instruction (CS base + IP in real
/// mode; every protected-mode code segment we run is flat).
fn linear_ip_of(st: &crate::unicorn_gaps::CpuState) -> u64 {
    if st.cr(0) & mmu::CR0_PE == 0 {
        st.seg(unicorn_gaps::R_CS).base + (st.rip() & 0xffff)
    } else {
        st.rip()
    }
}

/// The run loop against tiny guests of a few instructions (real Unicorn,
/// no kernel): each exit, named by its vCPU, and the scheduler's decisions
/// when vCPUs halt, block or start others.
#[cfg(test)]
mod tests {
    use super::*;

    const CODE: u64 = 0x10_0000;

    fn domain(vcpus: u32, code: &[(u64, &[u8])]) -> Domain {
        let mut d = Domain::new(4 << 20, 1, [0; 16], vcpus).unwrap();
        for (gpa, bytes) in code {
            d.ram().slice_mut(*gpa, bytes.len() as u64).unwrap().copy_from_slice(bytes);
        }
        d.set_pvh_entry(CODE, 0x2000).unwrap();
        d
    }

    /// 32-bit: mov dword [addr], value
    fn store32(addr: u32, value: u32) -> Vec<u8> {
        let mut v = vec![0xc7, 0x05];
        v.extend(addr.to_le_bytes());
        v.extend(value.to_le_bytes());
        v
    }

    #[test]
    fn hlt_with_interrupts_off_is_hung() {
        let mut d = domain(1, &[(CODE, &[0xfa, 0xf4])]); // cli; hlt
        let e = d.run();
        assert!(matches!(e.reason, ExitReason::Hung { ref why } if why.contains("HLT with interrupts disabled")), "{e:?}");
        assert_eq!(d.vcpus[0].activity, Activity::Halted);
    }

    #[test]
    fn blocked_with_nothing_armed_is_idle_for_the_host() {
        // 32-bit ABI: mov eax, 29 (sched_op); mov ebx, 1 (block); vmcall; hlt
        let code = [0xb8, 29, 0, 0, 0, 0xbb, 1, 0, 0, 0, 0x0f, 0x01, 0xc1, 0xf4];
        let mut d = domain(1, &[(CODE, &code)]);
        assert_eq!(d.run(), Exit::domain(ExitReason::Idle));
        assert_eq!(d.vcpus[0].activity, Activity::Blocked);
        assert_eq!(d.vcpus[0].idle_runstate(), crate::vcpu::RUNSTATE_BLOCKED);
    }

    #[test]
    fn blocked_on_a_far_timer_comes_back_within_the_slice() {
        // sched_op(block), as above, then a timer or a poll timeout as far
        // as a u64 goes: the idle wait still ends with the slice.
        let code = [0xb8, 29, 0, 0, 0, 0xbb, 1, 0, 0, 0, 0x0f, 0x01, 0xc1, 0xf4];
        let mut d = domain(1, &[(CODE, &code)]);
        d.time_slice = Duration::from_millis(20);
        assert_eq!(d.run(), Exit::domain(ExitReason::Idle));
        for far in [d.state.system_time_ns() + (30 << 40), i64::MAX as u64, u64::MAX - 1, u64::MAX] {
            d.vcpus[0].timers.singleshot_ns = Some(far);
            let t0 = Instant::now();
            assert_eq!(d.run(), Exit::domain(ExitReason::Kicked), "{far:#x}");
            assert!(t0.elapsed() < Duration::from_millis(500), "{far:#x}: {:?}", t0.elapsed());
            assert_eq!(d.vcpus[0].activity, Activity::Blocked);
        }
        d.vcpus[0].timers.singleshot_ns = None;
        d.vcpus[0].activity = Activity::Polling { ports: vec![] };
        d.vcpus[0].poll_deadline = Some(u64::MAX);
        let t0 = Instant::now();
        assert_eq!(d.run(), Exit::domain(ExitReason::Kicked));
        assert!(t0.elapsed() < Duration::from_millis(500), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_fault_with_no_idt_is_a_triple_fault_of_its_vcpu() {
        let mut d = domain(1, &[(CODE, &[0x0f, 0x0b])]); // ud2
        let e = d.run();
        assert_eq!(e.vcpu, Some(0));
        assert!(matches!(e.reason, ExitReason::TripleFault { ref chain } if chain[0] == 6), "{e:?}");
    }

    #[test]
    fn init_and_startup_ipis_start_an_ap_in_real_mode() {
        // vCPU 0 (32-bit, paging off): INIT and STARTUP (vector 8: 0x8000)
        // to APIC ID 2, then halts with interrupts off for good.
        let mut bsp = Vec::new();
        bsp.extend(store32(0xfee0_0310, 2 << 24));
        bsp.extend(store32(0xfee0_0300, 0xc500));
        bsp.extend(store32(0xfee0_0300, 0x0608));
        bsp.extend([0xfa, 0xf4]);
        // vCPU 1 (16-bit real mode at 0x800:0): SCHEDOP_shutdown(soft_reset)
        // with its argument at 0x9100: a hypercall from real mode, which
        // Xen takes in the 32-bit ABI.
        let ap = [
            0x66, 0xb8, 29, 0, 0, 0, // mov eax, 29
            0x66, 0xbb, 2, 0, 0, 0, // mov ebx, 2 (SCHEDOP_shutdown)
            0x66, 0xb9, 0x00, 0x91, 0, 0, // mov ecx, 0x9100
            0x0f, 0x01, 0xc1, // vmcall
            0xf4,
        ];
        let mut d = domain(2, &[(CODE, &bsp), (0x8000, &ap), (0x9100, &5u32.to_le_bytes())]);
        assert!(d.vcpus[1].down && !d.vcpus[1].initialised);
        let e = d.run();
        assert_eq!(e, Exit::of(1, ExitReason::Shutdown { reason: 5 }));
        let st = &d.vcpus[1].regs;
        assert_eq!(st.seg(crate::unicorn_gaps::R_CS).base, 0x8000);
        assert_eq!(st.cr(0) & 1, 0, "still in real mode");
        assert!(d.vcpus[1].initialised && !d.vcpus[1].down);
        // The start-up IPI ended vCPU 0's slice before its HLT (the woken
        // vCPU runs first).
        assert_eq!(d.vcpus[0].activity, Activity::Running);
        assert!(d.context_switches() >= 1);
    }

    #[test]
    fn a_breakpoint_stops_before_its_instruction_and_is_gone_past_once() {
        // inc eax (x4, one byte each, in one translated block); cli; hlt
        let mut d = domain(1, &[(CODE, &[0x40, 0x40, 0x40, 0x40, 0xfa, 0xf4])]);
        d.vcpus[0].regs.set_reg(0, 0);
        d.debug.set_breakpoints(&[CODE + 2]).unwrap();
        let e = d.run();
        assert_eq!(e, Exit::of(0, ExitReason::Debug { stop: DebugStop::Breakpoint, address: CODE + 2 }));
        assert_eq!((d.vcpus[0].regs.rip(), d.vcpus[0].regs.reg(0)), (CODE + 2, 2));
        // A step executes the instruction at the breakpoint, and only it.
        d.debug.request_step(0, true);
        let e = d.run();
        assert_eq!(e, Exit::of(0, ExitReason::Debug { stop: DebugStop::Step, address: CODE + 3 }));
        assert_eq!(d.vcpus[0].regs.reg(0), 3);
        // Back to the loop's start: it stops there again, then goes past.
        d.vcpus[0].regs.set_rip(CODE);
        let e = d.run();
        assert_eq!(e.reason, ExitReason::Debug { stop: DebugStop::Breakpoint, address: CODE + 2 });
        assert_eq!(d.vcpus[0].regs.reg(0), 5);
        assert!(matches!(d.run().reason, ExitReason::Hung { .. }));
        assert_eq!(d.vcpus[0].regs.reg(0), 7);
        // No breakpoints: none on the engine, the guest runs through.
        d.debug.set_breakpoints(&[]).unwrap();
        d.vcpus[0].regs.set_rip(CODE);
        d.vcpus[0].activity = Activity::Running;
        assert!(matches!(d.run().reason, ExitReason::Hung { .. }));
        assert_eq!(d.vcpus[0].regs.reg(0), 11);
    }

    #[test]
    fn a_step_takes_no_interrupt_and_a_halted_vcpu_steps_at_once() {
        // cli; hlt: halted with interrupts off, a step reports where it is.
        let mut d = domain(1, &[(CODE, &[0xfa, 0xf4])]);
        assert!(matches!(d.run().reason, ExitReason::Hung { .. }));
        d.debug.request_step(0, true);
        assert_eq!(d.run(), Exit::of(0, ExitReason::Debug { stop: DebugStop::Step, address: CODE + 2 }));
        assert!(!d.debug.stepping(0));
    }

    /// A domain saved, restored from its image and saved again gives the
    /// same record (but the instant): nothing is lost or made up on the way.
    #[test]
    fn save_restore_save_is_the_same_record() {
        use crate::xen::evtchn::{PortState, DOMID_HOST};
        // xor eax, eax; inc eax; jmp $-2 (runs until preempted)
        let mut d = domain(2, &[(CODE, &[0x31, 0xc0, 0xff, 0xc0, 0xeb, 0xfc])]);
        d.time_slice = Duration::from_millis(5);
        let _ = d.run();
        {
            let mut ev = d.state.ports();
            ev.alloc(PortState::Interdomain { remote: DOMID_HOST, remote_port: 1 }, 1).unwrap();
            ev.alloc(PortState::Virq(0), 0).unwrap();
        }
        d.state.place_shared_info(0x5000);
        d.vcpus[1].timers.singleshot_ns = Some(123_456_789);
        d.vcpus[0].regs.set_reg(9, 0x1122_3344_5566_7788);
        let default_xcr0 = d.vcpus[1].regs.xcr0();
        let xcr0 = if default_xcr0 == 3 { 1 } else { 3 };
        d.vcpus[0].regs.set_xcr0(xcr0);
        d.state.hvm_params[crate::xen::hvm_param::STORE_PFN] = 0x77;
        let first = d.save_state();

        let fd = unsafe { libc::memfd_create(c"pvhvm-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        assert_eq!(unsafe { libc::ftruncate(fd, d.ram().size() as i64) }, 0);
        let (runs, crc) = d.ram().write_image(fd, 0).unwrap();
        let ram = GuestRam::from_file(fd, 0, d.ram().size()).unwrap();
        assert_eq!(ram.crc_of(&runs), Some(crc));
        let mut r = Domain::restore(ram, 1, [0; 16], &first).unwrap();
        unsafe { libc::close(fd) };
        let second = r.save_state();
        // The PVHC section's last 16 bytes are the instant of the save:
        // system time and the guest's TSC, both gone on since.
        let at = 8 + 4 + 4 + 8 + 4;
        let word = |r: &[u8], i: usize| u64::from_le_bytes(r[at + 8 * i..at + 8 * i + 8].try_into().unwrap());
        assert_eq!(first[..at], second[..at]);
        assert_eq!(first[at + 16..], second[at + 16..]);
        assert!(word(&second, 0) >= word(&first, 0) && word(&second, 1) >= word(&first, 1));
        // The guest's TSC went on from the saved one, not from the host's.
        assert!(word(&second, 1) - word(&first, 1) < r.state.clock.hz, "the TSC jumped");
        assert_eq!(r.vcpus[1].regs.tsc_offset(), r.state.clock.guest_tsc_offset);
        assert_eq!(r.cpu.pristine().tsc_offset(), r.state.clock.guest_tsc_offset);
        // And it runs on from where it was.
        assert_eq!(r.vcpus[0].regs.reg(9), 0x1122_3344_5566_7788);
        assert_eq!((r.vcpus[0].regs.xcr0(), r.vcpus[1].regs.xcr0()), (xcr0, default_xcr0));
        let _ = r.run();
        assert!(r.vcpus[0].regs.reg(0) > 0);
        // A record cut anywhere is refused, never a panic.
        for cut in (0..first.len()).step_by(97) {
            let ram = GuestRam::new(4 << 20).unwrap();
            assert!(Domain::restore(ram, 1, [0; 16], &first[..cut]).is_err(), "cut at {cut}");
        }
    }
}
