//! Xen's domain-wide state, and who may touch it when.
//!
//! * `DomainState` belongs to the domain's run thread, the one thread on
//!   which all of its vCPUs run (round-robin, see domain.rs): HVM
//!   parameters, the memory map, the hypervisor console, the hypercall
//!   log, the clock. Hypercall handlers get it as `&mut` for the length of
//!   one call; Python reaches it only between runs (the `Vm`'s borrow).
//! * `SharedState` is what other threads may reach while vCPUs run: the
//!   event channels behind the port lock and the grant table behind the
//!   grant lock (QEMU's xen_evtchn.c and xen_gnttab.c keep the same two
//!   locks), guest RAM, and the waker that brings the run loop back.
//!   Neither lock is held across `uc_emu_start`, nor one while taking the
//!   other. Guest-visible bits under them (pending/mask bitmaps,
//!   selectors, grant flags) are changed with atomic operations, because
//!   the guest changes the same words with LOCK'd instructions.
//!
//! Per-vCPU state (timers, runstate, registrations, LAPIC) lives in each
//! `vcpu::Vcpu`; only the location of each vcpu_info is also kept by the
//! event channels, which need it to deliver.

pub mod evtchn;
pub mod evtchn_fifo;
pub mod gnttab;
pub mod time;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::abi::Width;
use crate::hypercall_log::HypercallLog;
use crate::memory::GuestRam;
use crate::snapshot::{Dec, Enc, SnapshotError};
use crate::waker::Waker;
use evtchn::{EventChannels, PortState, ShinfoLayout, DOMID_HOST, VI_TIME};
use gnttab::GrantTable;
use time::Clock;

/// HVM_PARAM_* (hvm/params.h) the core knows by number.
pub mod hvm_param {
    pub const CALLBACK_IRQ: usize = 0;
    pub const STORE_PFN: usize = 1;
    pub const STORE_EVTCHN: usize = 2;
    pub const CONSOLE_PFN: usize = 17;
    pub const CONSOLE_EVTCHN: usize = 18;
    pub const NR: usize = 40;
}

/// The most E820 entries a domain's memory map may have (XENMEM_set_memory_map's E820MAX).
pub const E820_MAX: usize = 128;

/// What the host's console output buffer may hold before old output is dropped.
pub const CONSOLE_OUT_CAP: usize = 1 << 20;

/// shared_info's wall clock (xen.h): wc_version, wc_sec, wc_nsec follow the
/// event arrays, whose size is the layout's; a 32-bit layout has no room
/// for wc_sec_hi there and keeps it at the end of arch_shared_info (six
/// 32-bit fields later).
fn wallclock_offsets(width: Width) -> (usize, usize) {
    match width {
        Width::Bits64 => (3072, 3084),
        Width::Bits32 => (2304, 2304 + 12 + 6 * 4),
    }
}

fn unpoison<T>(r: std::sync::LockResult<MutexGuard<'_, T>>) -> MutexGuard<'_, T> {
    r.unwrap_or_else(|e| e.into_inner())
}

/// The domain state other threads may reach while the vCPUs run.
pub struct SharedState {
    pub ram: Arc<GuestRam>,
    evtchn: Mutex<EventChannels>,
    gnttab: Mutex<GrantTable>,
    /// Host ports to raise on the run thread (see `notify_guest`).
    raises: Mutex<Vec<u32>>,
    pub waker: Waker,
}

impl SharedState {
    pub fn new(ram: Arc<GuestRam>, domid: u16, nr_vcpus: u32, waker: Waker) -> Self {
        Self {
            ram,
            evtchn: Mutex::new(EventChannels::new(domid, nr_vcpus)),
            gnttab: Mutex::new(GrantTable::new()),
            raises: Mutex::new(Vec::new()),
            waker,
        }
    }

    /// The port lock.
    pub fn ports(&self) -> MutexGuard<'_, EventChannels> {
        unpoison(self.evtchn.lock())
    }

    /// The grant lock.
    pub fn grants(&self) -> MutexGuard<'_, GrantTable> {
        unpoison(self.gnttab.lock())
    }

    /// Raise the guest's end of a host port, from any thread, and wake the
    /// run loop. False if the port does not belong to the host.
    ///
    /// The raise itself is queued and done by the run thread between
    /// slices (`raise_queued`): Unicorn emulates the guest's LOCK'd
    /// instructions as plain loads and stores (one engine, one thread), so
    /// a bit set from another thread in the middle of the guest's `xchg`
    /// on its pending selector, or `lock btr` on a pending word, would be
    /// overwritten, and the event lost for good (measured: blkback's
    /// workers, about one boot in two).
    pub fn notify_guest(&self, port: u32) -> bool {
        let ev = self.ports();
        match ev.get(port).map(|p| p.state) {
            Some(PortState::Interdomain { remote: DOMID_HOST, .. }) => {
                drop(ev);
                let mut q = unpoison(self.raises.lock());
                if !q.contains(&port) {
                    q.push(port);
                }
                drop(q);
                self.waker.wake_vcpus();
                true
            }
            _ => false,
        }
    }

    /// Raise the ports other threads notified (on the run thread, with no
    /// vCPU on the engine). Returns how many became newly pending.
    pub fn raise_queued(&self) -> usize {
        let ports = std::mem::take(&mut *unpoison(self.raises.lock()));
        if ports.is_empty() {
            return 0;
        }
        let mut ev = self.ports();
        ports
            .into_iter()
            .filter(|&port| {
                matches!(ev.get(port).map(|p| p.state), Some(PortState::Interdomain { remote: DOMID_HOST, .. }))
                    && ev.raise(&self.ram, port).is_some()
            })
            .count()
    }
}

/// A change to what backs a guest-physical range, for the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remap {
    /// A Xen page placed outside RAM: map the host page there.
    Overlay { gpa: u64, host: usize },
    /// RAM the guest gave back: nothing behind it any more. As on Xen,
    /// where the empty p2m entry ends in the emulator's null handler, it
    /// reads as all ones and ignores writes.
    Hole { gpa: u64, len: u64 },
    /// Given-back RAM populated again: the host pages mapped back.
    Ram { gpa: u64, len: u64, host: usize },
}

impl Remap {
    /// The same changes in as few ranges as possible: runs of one kind are
    /// put in address order and adjacent pages merged (the balloon gives
    /// back hundreds of pages a call, and every engine region costs).
    /// Changes of different kinds keep their order.
    pub fn coalesce(remaps: &[Remap]) -> Vec<Remap> {
        let mut out: Vec<Remap> = Vec::with_capacity(remaps.len());
        let mut i = 0;
        while i < remaps.len() {
            let kind = std::mem::discriminant(&remaps[i]);
            let mut j = i;
            while j < remaps.len() && std::mem::discriminant(&remaps[j]) == kind {
                j += 1;
            }
            let mut run = remaps[i..j].to_vec();
            run.sort_by_key(|r| r.gpa());
            run.dedup();
            for r in run {
                match (out.last_mut(), r) {
                    (Some(Remap::Hole { gpa, len }), Remap::Hole { gpa: g, len: l }) if *gpa + *len == g => *len += l,
                    (Some(Remap::Ram { gpa, len, host }), Remap::Ram { gpa: g, len: l, host: h })
                        if *gpa + *len == g && *host + *len as usize == h =>
                    {
                        *len += l
                    }
                    _ => out.push(r),
                }
            }
            i = j;
        }
        out
    }

    fn gpa(&self) -> u64 {
        match *self {
            Remap::Overlay { gpa, .. } | Remap::Hole { gpa, .. } | Remap::Ram { gpa, .. } => gpa,
        }
    }

    /// The end of the range it changes.
    pub fn end(&self) -> u64 {
        match *self {
            Remap::Overlay { gpa, .. } => gpa + 4096,
            Remap::Hole { gpa, len } | Remap::Ram { gpa, len, .. } => gpa + len,
        }
    }
}

/// The domain state that belongs to the run thread.
pub struct DomainState {
    pub domid: u32,
    pub uuid: [u8; 16],
    pub ram: Arc<GuestRam>,
    pub clock: Clock,
    pub shared: Arc<SharedState>,
    pub console_out: Vec<u8>,
    pub console_in: VecDeque<u8>,
    pub log: HypercallLog,
    pub shutdown_code: Option<u32>,
    /// The vCPU whose SCHEDOP_shutdown(SHUTDOWN_suspend) ended the last run.
    pub suspended_vcpu: Option<u32>,
    pub hvm_params: [u64; hvm_param::NR],
    /// E820 map for XENMEM_memory_map: (addr, size, type).
    pub memory_map: Vec<(u64, u64, u32)>,
    pub vm_assist: u64,
    /// Mapping changes the engine must make before the guest goes on.
    pub pending_remaps: Vec<Remap>,
    /// The most RAM pages the domain may hold (Xen's max_pages: xl's maxmem).
    pub max_pages: u64,
    /// Pages increase_reservation allocated: counted, mapped at no frame
    /// (Xen tells only a PV guest where they are).
    pub unmapped_pages: u64,
    /// Frames populated outside RAM (host pages of their own, overlays).
    pub extra_frames: std::collections::BTreeSet<u64>,
    pub nr_vcpus: u32,
    /// The first guest instruction, hypercall and user-space block.
    pub milestones: crate::profile::Milestones,
}

impl DomainState {
    pub fn new(domid: u32, uuid: [u8; 16], shared: Arc<SharedState>, nr_vcpus: u32) -> Self {
        let ram_pages = shared.ram.size() / 4096;
        Self {
            domid,
            uuid,
            ram: shared.ram.clone(),
            clock: Clock::new(),
            shared,
            console_out: Vec::new(),
            console_in: VecDeque::new(),
            log: HypercallLog::new(nr_vcpus),
            shutdown_code: None,
            suspended_vcpu: None,
            hvm_params: [0; hvm_param::NR],
            memory_map: Vec::new(),
            vm_assist: 0,
            pending_remaps: Vec::new(),
            max_pages: ram_pages,
            unmapped_pages: 0,
            extra_frames: Default::default(),
            nr_vcpus,
            milestones: Default::default(),
        }
    }

    /// What a save keeps of this state (the clock and the domain's
    /// identity travel apart; the hypercall log starts again).
    pub fn encode(&self, e: &mut Enc) {
        for p in self.hvm_params {
            e.u64(p);
        }
        e.len(self.memory_map.len());
        for &(addr, size, kind) in &self.memory_map {
            e.u64(addr);
            e.u64(size);
            e.u32(kind);
        }
        e.u64(self.vm_assist);
        e.u64(self.max_pages);
        e.u64(self.unmapped_pages);
        e.len(self.extra_frames.len());
        for &f in &self.extra_frames {
            e.u64(f);
        }
        e.bytes(&self.console_in.iter().copied().collect::<Vec<u8>>());
        e.opt_u64(self.shutdown_code.map(u64::from));
        e.opt_u64(self.suspended_vcpu.map(u64::from));
    }

    pub fn decode(&mut self, d: &mut Dec) -> Result<(), SnapshotError> {
        for p in self.hvm_params.iter_mut() {
            *p = d.u64()?;
        }
        let n = d.len(E820_MAX, 20)?;
        self.memory_map = (0..n).map(|_| Ok((d.u64()?, d.u64()?, d.u32()?))).collect::<Result<_, SnapshotError>>()?;
        self.vm_assist = d.u64()?;
        self.max_pages = d.u64()?;
        self.unmapped_pages = d.u64()?;
        let n = d.len(crate::memory::MAX_OVERLAYS, 8)?;
        self.extra_frames = (0..n).map(|_| d.u64()).collect::<Result<_, _>>()?;
        self.console_in = d.bytes()?.iter().copied().collect();
        self.shutdown_code = d.opt_u64()?.map(|c| c as u32);
        self.suspended_vcpu = match d.opt_u64()? {
            Some(v) if v >= self.nr_vcpus as u64 => return Err(crate::snapshot::invalid(format!("suspended vCPU {v}"))),
            v => v.map(|v| v as u32),
        };
        Ok(())
    }

    /// RAM pages the domain holds (Xen's tot_pages): its RAM less what it gave back.
    pub fn populated_pages(&self) -> u64 {
        self.ram.size() / 4096 - self.ram.given_back_pages() + self.unmapped_pages + self.extra_frames.len() as u64
    }

    /// Xen system time in ns.
    pub fn system_time_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    pub fn ports(&self) -> MutexGuard<'_, EventChannels> {
        self.shared.ports()
    }

    pub fn grants(&self) -> MutexGuard<'_, GrantTable> {
        self.shared.grants()
    }

    /// Refresh the pvclock in vCPU `v`'s vcpu_info (version odd while writing).
    pub fn update_vcpu_time(&self, v: u32) {
        if let Some(vi) = self.ports().vcpu_info(v) {
            write_time_info(&self.ram, vi + VI_TIME, &self.clock.time_info());
        }
    }

    /// The layout of shared_info, vcpu_info and the runstate areas.
    pub fn shinfo_width(&self) -> Width {
        self.ports().layout().width
    }

    /// Latch the shared_info layout from the mode of the vCPU that sets the
    /// domain up (Xen's `hvm_latch_shinfo_size`: at placing shared_info and
    /// at HVM_PARAM_CALLBACK_IRQ). The wall clock moves with it.
    pub fn latch_shinfo_width(&mut self, width: Width) {
        let changed = self.ports().set_layout(ShinfoLayout { width });
        if changed {
            if let Some(gpa) = self.ports().shared_info() {
                self.write_wallclock(gpa);
            }
        }
    }

    /// Put shared_info at guest-physical `gpa` (a RAM page), with the wall clock.
    pub fn place_shared_info(&mut self, gpa: u64) -> bool {
        let Ok(page) = self.ram.slice_mut(gpa, 4096) else { return false };
        let old = self.ports().shared_info();
        match old {
            Some(old) if old != gpa => {
                // Move the live contents, as the page is Xen's, not the frame's.
                if let Ok(o) = self.ram.slice(old, 4096) {
                    let copy = o.to_vec();
                    page.copy_from_slice(&copy);
                }
            }
            Some(_) => {}
            // A fresh shared_info is a cleared page (Xen's arch_domain_create;
            // only a PV guest's toolstack masks its ports, libxc's
            // shared_info hook, which HVM and PVH do not have).
            None => page.fill(0),
        }
        self.ports().set_shared_info(Some(gpa));
        self.write_wallclock(gpa);
        for v in 0..self.nr_vcpus {
            self.update_vcpu_time(v);
        }
        true
    }

    pub fn write_wallclock(&self, gpa: u64) {
        let Ok(p) = self.ram.slice_mut(gpa, 4096) else { return };
        let (version, sec_hi) = wallclock_offsets(self.shinfo_width());
        let wall = self.clock.boot_wall;
        let sec = wall.as_secs();
        let field = |off: usize| off..off + 4;
        let ver = u32::from_le_bytes(p[field(version)].try_into().unwrap()).wrapping_add(1) | 1;
        p[field(version)].copy_from_slice(&ver.to_le_bytes());
        p[field(version + 4)].copy_from_slice(&(sec as u32).to_le_bytes());
        p[field(version + 8)].copy_from_slice(&wall.subsec_nanos().to_le_bytes());
        p[field(sec_hi)].copy_from_slice(&((sec >> 32) as u32).to_le_bytes());
        p[field(version)].copy_from_slice(&ver.wrapping_add(1).to_le_bytes());
    }

    /// Output for the host, which takes it after every write; should it
    /// not, the newest CONSOLE_OUT_CAP bytes are kept, as in Xen's ring.
    pub fn console_write(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(CONSOLE_OUT_CAP)..];
        let excess = (self.console_out.len() + data.len()).saturating_sub(CONSOLE_OUT_CAP);
        self.console_out.drain(..excess);
        self.console_out.extend_from_slice(data);
    }

    /// The event upcall vector of the domain (HVM_PARAM_CALLBACK_IRQ of
    /// type 2), used by vCPUs without a vector of their own.
    pub fn callback_vector(&self) -> Option<u8> {
        let callback = self.hvm_params[hvm_param::CALLBACK_IRQ];
        (callback >> 56 == 2).then_some(callback as u8)
    }
}

/// Write a vcpu_time_info body at `gpa` with the version protocol.
pub fn write_time_info(ram: &GuestRam, gpa: u64, body: &[u8; 32]) {
    let Ok(t) = ram.slice_mut(gpa, 32) else { return };
    let ver = u32::from_le_bytes(t[0..4].try_into().unwrap());
    let odd = ver.wrapping_add(1) | 1;
    t[0..4].copy_from_slice(&odd.to_le_bytes());
    t[4..32].copy_from_slice(&body[4..32]);
    t[0..4].copy_from_slice(&odd.wrapping_add(1).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::Remap;

    #[test]
    fn remaps_coalesce_by_kind_in_order() {
        let p = 4096;
        let hole = |n: u64| Remap::Hole { gpa: n * p, len: p };
        let ram = |n: u64| Remap::Ram { gpa: n * p, len: p, host: 0x1000_0000 + (n * p) as usize };
        // Shuffled and repeated pages of one call merge; a later Ram run stays after them.
        let r = Remap::coalesce(&[hole(5), hole(4), hole(7), hole(6), hole(6), hole(9), ram(5), ram(6)]);
        assert_eq!(
            r,
            vec![
                Remap::Hole { gpa: 4 * p, len: 4 * p },
                hole(9),
                Remap::Ram { gpa: 5 * p, len: 2 * p, host: 0x1000_0000 + 5 * p as usize },
            ]
        );
        // Host addresses that do not follow each other are not merged.
        let odd = Remap::Ram { gpa: 6 * p, len: p, host: 0x2000_0000 };
        assert_eq!(Remap::coalesce(&[ram(5), odd]).len(), 2);
    }
}
