//! One virtual CPU's state: its registers while it is not on the engine,
//! its power state, Xen's per-vCPU state (timers, runstate, registered
//! areas, upcall vector) and its local APIC. The engine that runs it is the
//! domain's (`cpu.rs`), shared by all vCPUs in turn.
//!
//! Hypercall handlers reach every vCPU's state (a vCPU sets up another's
//! vcpu_info, binds its timer VIRQ, brings it up), always on the domain's
//! run thread.

use std::time::Instant;

use crate::abi::Width;
use crate::interrupts::{Event, Source};
use crate::snapshot::{invalid, Dec, Enc, SnapshotError};
use crate::lapic::{IpiKind, Lapic};
use crate::layout;
use crate::memory::GuestRam;
use crate::mmu::{self, PagingState};
use crate::unicorn_gaps::{self, CpuState, Segment};
use crate::xen::time::Clock;
use crate::xen::write_time_info;

/// RUNSTATE_* (vcpu.h).
pub const RUNSTATE_RUNNING: u32 = 0;
pub const RUNSTATE_RUNNABLE: u32 = 1;
pub const RUNSTATE_BLOCKED: u32 = 2;
pub const RUNSTATE_OFFLINE: u32 = 3;

/// What the vCPU is doing, as far as the scheduler cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activity {
    /// Executing (or ready to).
    Running,
    /// After HLT: until an interrupt it can take (or an NMI, INIT).
    Halted,
    /// SCHEDOP_block: until an event upcall is pending.
    Blocked,
    /// SCHEDOP_poll: until one of `ports` is pending, an upcall is
    /// pending, or the timeout (`Vcpu::poll_deadline`).
    Polling { ports: Vec<u32> },
    /// After INIT (and at power-on for every vCPU but 0): until a start-up IPI.
    WaitForSipi,
}

/// A guest area Xen keeps up to date: by guest-virtual address (the
/// *_memory_area calls, translated with the vCPU's page tables at each
/// update) or guest-physical (the *_phys_area calls of Xen 4.18 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    Virtual(u64),
    Physical(u64),
}

impl Area {
    fn gpa(self, ram: &GuestRam, ps: &PagingState, len: u64) -> Option<u64> {
        let mut m: &GuestRam = ram;
        let gpa = match self {
            Area::Physical(gpa) => gpa,
            Area::Virtual(va) => mmu::translate(&mut m, ps, va, mmu::Access::Write, false).ok()?,
        };
        (gpa & 0xfff <= 4096 - len).then_some(gpa)
    }
}

/// A guest's absolute deadline as Xen takes it: Xen keeps deadlines as
/// s_time_t (signed ns), so one with bit 63 set is negative, long past, and
/// fires at once. Any other is kept as it is, however far ahead.
pub fn xen_deadline(ns: u64) -> u64 {
    if ns > i64::MAX as u64 { 0 } else { ns }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeriodicTimer {
    pub period_ns: u64,
    pub next_ns: u64,
}

/// VCPUOP_set_singleshot_timer / set_timer_op and VCPUOP_set_periodic_timer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timers {
    pub singleshot_ns: Option<u64>,
    pub periodic: Option<PeriodicTimer>,
}

impl Timers {
    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        match (self.singleshot_ns, self.periodic.map(|p| p.next_ns)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Take the timers that are due at `now`; true if VIRQ_TIMER fires.
    pub fn fire(&mut self, now: u64) -> bool {
        let mut fire = false;
        if self.singleshot_ns.is_some_and(|d| d <= now) {
            self.singleshot_ns = None;
            fire = true;
        }
        if let Some(p) = self.periodic.as_mut() {
            if p.next_ns <= now {
                fire = true;
                // Saturating: a restored timer may be due in the far future.
                let missed = (now - p.next_ns) / p.period_ns + 1;
                p.next_ns = p.next_ns.saturating_add(missed.saturating_mul(p.period_ns));
            }
        }
        fire
    }
}

/// struct vcpu_runstate_info's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runstate {
    pub state: u32,
    pub entry_ns: u64,
    pub time: [u64; 4],
}

impl Runstate {
    pub fn set(&mut self, state: u32, now: u64) -> bool {
        if self.state == state {
            return false;
        }
        self.time[self.state as usize] += now.saturating_sub(self.entry_ns);
        self.state = state;
        self.entry_ns = now;
        true
    }

    /// Time spent in each state up to `now` (ns), the current one included.
    pub fn times(&self, now: u64) -> [u64; 4] {
        let mut time = self.time;
        time[self.state as usize] += now.saturating_sub(self.entry_ns);
        time
    }

    /// { int state; uint64_t state_entry_time; uint64_t time[4]; } as of
    /// `now`: 48 bytes, or 44 in the 32-bit layout (uint64_t 4-aligned).
    pub fn info(&self, now: u64, width: Width) -> Vec<u8> {
        let time = self.times(now);
        let mut b = Vec::with_capacity(48);
        b.extend_from_slice(&self.state.to_le_bytes());
        b.resize(width.align(4, 8) as usize, 0);
        b.extend_from_slice(&self.entry_ns.to_le_bytes());
        for t in time {
            b.extend_from_slice(&t.to_le_bytes());
        }
        b
    }
}

pub struct Vcpu {
    pub id: u32,
    /// Registers and hidden state: valid whenever the vCPU is not running
    /// on the engine (during its slice the engine holds them).
    pub regs: CpuState,
    /// VCPUOP_initialise (or a start-up IPI, or the domain builder for
    /// vCPU 0) gave it a state.
    pub initialised: bool,
    /// Xen's _VPF_down: not to be scheduled (never brought up, VCPUOP_down).
    pub down: bool,
    pub activity: Activity,
    /// Woken from a wait (or brought up) since it last ran: the scheduler
    /// runs it first (sched.rs).
    pub boosted: bool,
    /// SCHEDOP_poll's timeout (system time).
    pub poll_deadline: Option<u64>,
    /// An exception to deliver before the vCPU goes on.
    pub pending_exception: Option<Event>,
    pub nmi_pending: bool,
    pub timers: Timers,
    /// HVMOP_set_evtchn_upcall_vector.
    pub upcall_vector: Option<u8>,
    pub runstate: Runstate,
    /// Where VCPUOP_register_{runstate,vcpu_time}_{memory,phys}_area put them.
    pub runstate_area: Option<Area>,
    pub time_area: Option<Area>,
    pub lapic: Lapic,
    /// When to look again for an interrupt window (an interrupt is pending
    /// with IF=0); kept until that kick has been taken.
    pub window_poll_at: Option<Instant>,
    pub exceptions_delivered: u64,
    pub interrupts_delivered: u64,
}

impl Vcpu {
    /// vCPU `id` at power-on: vCPU 0 ready for the builder's entry state,
    /// the others down, waiting for a start-up IPI or VCPUOP_initialise.
    pub fn new(id: u32, regs: CpuState) -> Self {
        let bsp = id == 0;
        Self {
            id,
            regs,
            initialised: bsp,
            down: !bsp,
            activity: if bsp { Activity::Running } else { Activity::WaitForSipi },
            boosted: false,
            poll_deadline: None,
            pending_exception: None,
            nmi_pending: false,
            timers: Timers::default(),
            upcall_vector: None,
            runstate: Runstate {
                state: if bsp { RUNSTATE_RUNNABLE } else { RUNSTATE_OFFLINE },
                entry_ns: 0,
                time: [0; 4],
            },
            runstate_area: None,
            time_area: None,
            lapic: Lapic::new(id),
            window_poll_at: None,
            exceptions_delivered: 0,
            interrupts_delivered: 0,
        }
    }

    /// Everything of this vCPU but its registers (`snapshot::ArchRegs`),
    /// for a save. Times are system time, which a restore continues.
    pub fn encode_state(&self, e: &mut Enc) {
        e.bool(self.initialised);
        e.bool(self.down);
        match &self.activity {
            Activity::Running => e.u8(0),
            Activity::Halted => e.u8(1),
            Activity::Blocked => e.u8(2),
            Activity::Polling { ports } => {
                e.u8(3);
                e.len(ports.len());
                for &p in ports {
                    e.u32(p);
                }
            }
            Activity::WaitForSipi => e.u8(4),
        }
        e.opt_u64(self.poll_deadline);
        match self.pending_exception {
            None => e.bool(false),
            Some(ev) => {
                e.bool(true);
                e.u8(ev.vector);
                e.u8(match ev.source {
                    Source::Exception => 0,
                    Source::Software => 1,
                    Source::External => 2,
                });
                e.opt_u64(ev.error_code.map(u64::from));
                e.opt_u64(ev.cr2);
                e.u8(ev.insn_len);
            }
        }
        e.bool(self.nmi_pending);
        e.opt_u64(self.timers.singleshot_ns);
        e.opt_u64(self.timers.periodic.map(|p| p.period_ns));
        e.u64(self.timers.periodic.map_or(0, |p| p.next_ns));
        e.opt_u64(self.upcall_vector.map(u64::from));
        e.u32(self.runstate.state);
        e.u64(self.runstate.entry_ns);
        for t in self.runstate.time {
            e.u64(t);
        }
        for area in [self.runstate_area, self.time_area] {
            match area {
                None => e.u8(0),
                Some(Area::Virtual(va)) => {
                    e.u8(1);
                    e.u64(va)
                }
                Some(Area::Physical(pa)) => {
                    e.u8(2);
                    e.u64(pa)
                }
            }
        }
        self.lapic.encode(e);
        e.u64(self.exceptions_delivered);
        e.u64(self.interrupts_delivered);
    }

    /// The state `encode_state` wrote, checked: ports are checked again
    /// whenever they are used, vectors and states must be ones that exist.
    pub fn decode_state(&mut self, d: &mut Dec) -> Result<(), SnapshotError> {
        self.initialised = d.bool()?;
        self.down = d.bool()?;
        self.activity = match d.u8()? {
            0 => Activity::Running,
            1 => Activity::Halted,
            2 => Activity::Blocked,
            3 => {
                let n = d.len(crate::abi::schedop::POLL_MAX_PORTS as usize, 4)?;
                Activity::Polling { ports: (0..n).map(|_| d.u32()).collect::<Result<_, _>>()? }
            }
            4 => Activity::WaitForSipi,
            a => return Err(invalid(format!("vCPU {}: activity {a}", self.id))),
        };
        self.poll_deadline = d.opt_u64()?;
        self.pending_exception = if d.bool()? {
            let vector = d.u8()?;
            let source = match d.u8()? {
                0 => Source::Exception,
                1 => Source::Software,
                2 => Source::External,
                s => return Err(invalid(format!("vCPU {}: event source {s}", self.id))),
            };
            let error_code = d.opt_u64()?.map(|c| c as u32);
            let cr2 = d.opt_u64()?;
            let insn_len = d.u8()?;
            if insn_len > 15 {
                return Err(invalid(format!("vCPU {}: instruction length {insn_len}", self.id)));
            }
            Some(Event { vector, source, error_code, cr2, insn_len })
        } else {
            None
        };
        self.nmi_pending = d.bool()?;
        self.timers.singleshot_ns = d.opt_u64()?;
        let period = d.opt_u64()?;
        let next_ns = d.u64()?;
        self.timers.periodic = match period {
            None => None,
            Some(p) if p == 0 || p > crate::hypercall::MAX_PERIOD_NS => {
                return Err(invalid(format!("vCPU {}: a periodic timer of period {p}", self.id)))
            }
            Some(period_ns) => Some(PeriodicTimer { period_ns, next_ns }),
        };
        self.upcall_vector = d.opt_u64()?.map(|v| v as u8);
        let state = d.u32()?;
        if state > RUNSTATE_OFFLINE {
            return Err(invalid(format!("vCPU {}: runstate {state}", self.id)));
        }
        self.runstate.state = state;
        self.runstate.entry_ns = d.u64()?;
        for t in self.runstate.time.iter_mut() {
            *t = d.u64()?;
        }
        let area = |d: &mut Dec| -> Result<Option<Area>, SnapshotError> {
            Ok(match d.u8()? {
                0 => None,
                1 => Some(Area::Virtual(d.u64()?)),
                2 => Some(Area::Physical(d.u64()?)),
                k => return Err(invalid(format!("area kind {k}"))),
            })
        };
        self.runstate_area = area(d)?;
        self.time_area = area(d)?;
        self.lapic.decode(d)?;
        self.exceptions_delivered = d.u64()?;
        self.interrupts_delivered = d.u64()?;
        self.window_poll_at = None;
        self.boosted = true;
        Ok(())
    }

    /// Up, and not waiting for anything.
    pub fn is_running(&self) -> bool {
        !self.down && self.activity == Activity::Running
    }

    /// The earliest time something of its own wakes it (timers, poll timeout).
    pub fn deadline(&self) -> Option<u64> {
        let t = self.timers.next_deadline();
        match (t, self.poll_deadline.filter(|_| matches!(self.activity, Activity::Polling { .. }))) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The runstate the scheduler's view implies (RUNNING is set while on the engine).
    pub fn idle_runstate(&self) -> u32 {
        if self.down {
            RUNSTATE_OFFLINE
        } else if self.activity == Activity::Running {
            RUNSTATE_RUNNABLE
        } else {
            RUNSTATE_BLOCKED
        }
    }

    /// Write the registered runstate and time areas (guest-virtual, so
    /// through the page tables `ps`). A bad address is the guest's problem:
    /// it simply sees nothing, as with Xen.
    pub fn write_areas(&self, ram: &GuestRam, clock: &Clock, ps: &PagingState, width: Width) {
        let mut m: &GuestRam = ram;
        let info = self.runstate.info(clock.now_ns(), width);
        match self.runstate_area {
            // A virtual area may cross a page: copy through the page tables.
            Some(Area::Virtual(va)) => {
                let _ = mmu::write_linear(&mut m, ps, va, &info, false);
            }
            Some(a @ Area::Physical(_)) => {
                if let Some(s) = a.gpa(ram, ps, info.len() as u64).and_then(|g| ram.slice_mut(g, info.len() as u64).ok()) {
                    s.copy_from_slice(&info);
                }
            }
            None => {}
        }
        if let Some(gpa) = self.time_area.and_then(|a| a.gpa(ram, ps, 32)) {
            write_time_info(ram, gpa, &clock.time_info());
        }
    }

    /// An IPI arrived (`pristine`: the engine's power-on state, for INIT).
    /// Returns whether it may change what the vCPU does next.
    /// As Xen's vlapic_accept_irq and vlapic_init_sipi_one do.
    pub fn accept_ipi(&mut self, kind: IpiKind, pristine: &CpuState) -> bool {
        match kind {
            // Only into an enabled LAPIC.
            IpiKind::Fixed(v) | IpiKind::LowestPriority(v) if self.lapic.enabled() => {
                self.lapic.set_pending(v);
                true
            }
            IpiKind::Nmi => {
                self.nmi_pending = true;
                // An NMI wakes an initialised vCPU that is down.
                if self.initialised && self.down {
                    self.down = false;
                    self.boosted = true;
                }
                true
            }
            // INIT to a vCPU never started does nothing.
            IpiKind::Init if self.initialised => {
                self.init(pristine);
                true
            }
            // A start-up IPI starts only a vCPU that is not initialised:
            // the second of Linux's two is harmless.
            IpiKind::Startup(vector) if !self.initialised => {
                self.start_real_mode(vector);
                true
            }
            _ => false,
        }
    }

    /// INIT: registers and LAPIC back to power-on (the APIC ID kept), down
    /// until a start-up IPI. Xen's per-vCPU registrations (vcpu_info,
    /// runstate area, timers) survive, as in Xen's vcpu_reset.
    fn init(&mut self, pristine: &CpuState) {
        self.regs.copy_from(pristine);
        self.lapic.reset(self.id);
        self.activity = Activity::WaitForSipi;
        self.initialised = false;
        self.down = true;
        self.poll_deadline = None;
        self.pending_exception = None;
        self.nmi_pending = false;
        self.window_poll_at = None;
    }

    /// A start-up IPI: real mode at `vector` << 12, as Xen's
    /// hvm_vcpu_reset_state sets a vCPU up for its trampoline.
    fn start_real_mode(&mut self, vector: u8) {
        let st = &mut self.regs;
        for r in 0..16 {
            st.set_reg(r, 0);
        }
        st.set_rip(0);
        st.set_rflags(0x2);
        st.set_cr(0, 1 << 4); // ET
        st.set_cr(2, 0);
        st.set_cr(3, 0);
        st.set_cr(4, 0);
        st.set_efer(0);
        let data = Segment { selector: 0, base: 0, limit: 0xffff, flags: real_mode_flags(0x93) };
        for s in [unicorn_gaps::R_DS, unicorn_gaps::R_ES, unicorn_gaps::R_SS, unicorn_gaps::R_FS, unicorn_gaps::R_GS] {
            st.set_seg(s, data);
        }
        let cs = (vector as u16) << 8;
        st.set_seg(unicorn_gaps::R_CS, Segment { selector: cs, base: (cs as u64) << 4, limit: 0xffff, flags: real_mode_flags(0x9b) });
        st.set_tr(Segment { selector: 0, base: 0, limit: 0xffff, flags: real_mode_flags(0x8b) });
        st.set_ldt(Segment { selector: 0, base: 0, limit: 0xffff, flags: real_mode_flags(0x82) });
        st.set_gdt(0, 0xffff);
        st.set_idt(0, 0xffff);
        st.end_exception();
        st.clear_interrupt_shadow();
        st.sync_hflags();
        self.initialised = true;
        self.down = false;
        self.boosted = true;
        self.activity = Activity::Running;
    }

    /// The PVH entry state (docs/misc/pvh.pandoc): 32-bit flat protected
    /// mode, paging off, EBX = start_info. The GDT and TSS the selectors
    /// name are written at `layout::BOOT_GDT`.
    pub fn set_pvh_entry(&mut self, ram: &GuestRam, entry: u64, start_info: u64) -> Result<(), String> {
        let tss = layout::BOOT_TSS;
        let tss_lo = (((tss & 0xffff) << 16) | 0x67) as u32;
        let tss_hi = (((tss >> 16) & 0xff) | (0x8b << 8) | (tss & 0xff00_0000)) as u32;
        let gdt: [u64; 4] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff, ((tss_hi as u64) << 32) | tss_lo as u64];
        let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
        ram.slice_mut(layout::BOOT_GDT, bytes.len() as u64).map_err(|e| e.to_string())?.copy_from_slice(&bytes);
        ram.slice_mut(tss, 0x68).map_err(|e| e.to_string())?.fill(0);

        let st = &mut self.regs;
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
        Ok(())
    }
}

/// QEMU's segment-cache flags for a descriptor with access byte `access`
/// (byte-granular, 16-bit: real mode).
fn real_mode_flags(access: u32) -> u32 {
    access << 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_once_and_periodic_catches_up() {
        let mut t = Timers { singleshot_ns: Some(100), periodic: Some(PeriodicTimer { period_ns: 10, next_ns: 50 }) };
        assert_eq!(t.next_deadline(), Some(50));
        assert!(!t.fire(49));
        assert!(t.fire(75));
        assert_eq!(t.periodic.unwrap().next_ns, 80, "missed ticks are skipped, not replayed");
        assert!(t.fire(100));
        assert_eq!(t.singleshot_ns, None);
        assert_eq!(t.next_deadline(), Some(110));

        // The largest period a save file may hold does not wrap.
        let mut t = Timers { singleshot_ns: None, periodic: Some(PeriodicTimer { period_ns: u64::MAX, next_ns: 50 }) };
        assert!(t.fire(60));
        assert_eq!(t.next_deadline(), Some(u64::MAX));
        assert!(!t.fire(u64::MAX - 1));
    }

    #[test]
    fn deadlines_past_the_signed_range_are_past_as_in_xen() {
        assert_eq!(xen_deadline(0), 0);
        assert_eq!(xen_deadline(123), 123);
        assert_eq!(xen_deadline(i64::MAX as u64), i64::MAX as u64, "2^63-1 ns: never, but valid");
        assert_eq!(xen_deadline(1 << 63), 0);
        assert_eq!(xen_deadline(u64::MAX), 0);
    }

    #[test]
    fn runstate_accounts_time_per_state() {
        let mut r = Runstate { state: RUNSTATE_RUNNABLE, entry_ns: 0, time: [0; 4] };
        assert!(r.set(RUNSTATE_RUNNING, 10));
        assert!(!r.set(RUNSTATE_RUNNING, 15));
        assert!(r.set(RUNSTATE_BLOCKED, 40));
        let b = r.info(50, Width::Bits64);
        let word = |i: usize| u64::from_le_bytes(b[16 + 8 * i..24 + 8 * i].try_into().unwrap());
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), RUNSTATE_BLOCKED);
        assert_eq!((word(0), word(1), word(2), word(3)), (30, 10, 10, 0));
        // The 32-bit layout packs uint64_t at 4-byte alignment: 44 bytes.
        let c = r.info(50, Width::Bits32);
        assert_eq!(c.len(), 44);
        assert_eq!(u64::from_le_bytes(c[4..12].try_into().unwrap()), 40, "state_entry_time at 4");
        assert_eq!(c[12..], b[16..], "time[4] at 12");
    }
}
