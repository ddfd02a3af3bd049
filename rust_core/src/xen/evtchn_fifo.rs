//! Event channels, FIFO ABI (event_channel.h's EVTCHN_FIFO_*): per-vCPU
//! control blocks with 16 priority queues, an event array of 32-bit words
//! in pages the guest gives us, and the queue links inside those words.
//!
//! Each port's word: PENDING (bit 31), MASKED (30), LINKED (29), BUSY (28)
//! and a 17-bit LINK to the next port of its queue. The guest consumes a
//! queue from HEAD (the control block's head[prio], or its own copy) and
//! clears LINKED with cmpxchg; Xen appends at the tail it remembers. Xen
//! only ever links onto a tail that is still LINKED, and sets BUSY on that
//! tail while it retries, so the guest cannot unmask it (Linux's unmask
//! refuses a BUSY word) in between.
//!
//! As with the 2-level bits, every word is changed here with atomic
//! operations, and only on the run thread with no vCPU on the engine
//! (hypercalls, timers, `SharedState::raise_queued`): Unicorn's LOCK'd
//! instructions are not atomic against other host threads.
//!
//! The queue state Xen keeps (each queue's tail, each port's priority and
//! the queue it was last linked on) lives here, behind the port lock with
//! the rest of `EventChannels`.

use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;

use super::evtchn::EventChannels;
use crate::memory::GuestRam;
use crate::snapshot::{invalid, Dec, Enc, SnapshotError};

/// Ports the FIFO ABI can name (1 << EVTCHN_FIFO_LINK_BITS).
pub const NR_CHANNELS: u32 = 1 << LINK_BITS;
pub const LINK_BITS: u32 = 17;
pub const PRIORITY_DEFAULT: u8 = 7;
/// The lowest priority (the largest number); 0 is the highest.
pub const PRIORITY_MIN: u8 = 15;
pub const NR_QUEUES: usize = PRIORITY_MIN as usize + 1;

pub const PENDING: u32 = 1 << 31;
pub const MASKED: u32 = 1 << 30;
pub const LINKED: u32 = 1 << 29;
pub const BUSY: u32 = 1 << 28;
pub const LINK_MASK: u32 = (1 << LINK_BITS) - 1;

const PAGE_SIZE: u64 = 4096;
pub const WORDS_PER_PAGE: u32 = (PAGE_SIZE / 4) as u32;
pub const MAX_ARRAY_PAGES: usize = (NR_CHANNELS / WORDS_PER_PAGE) as usize;

/// struct evtchn_fifo_control_block: ready (u32), _rsvd (u32), head[16] (u32).
pub const CONTROL_BLOCK_SIZE: u64 = 8 + 4 * NR_QUEUES as u64;
const CB_READY: u64 = 0;
const CB_HEAD: u64 = 8;
/// The control block's alignment (its widest member is a u32): Xen 4.16+
/// refuses other offsets with -ENXIO.
const CONTROL_BLOCK_ALIGN: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FifoError {
    /// -ENOENT: no such vCPU.
    NoVcpu,
    /// -EINVAL: a bad frame or offset, or the vCPU already has a block.
    Invalid,
    /// -ENXIO: a misaligned control block.
    Misaligned,
    /// -ENOSPC: the event array is full.
    Full,
    /// The 2-level ABI is active (set_priority: -ENOSYS, expand_array:
    /// -EOPNOTSUPP).
    NotActive,
    /// -EINVAL: no such port.
    NoPort,
}

/// One vCPU's side: where its control block is, and each queue's tail
/// (0: none; HEAD itself is only in the guest's control block).
#[derive(Debug, Clone, Default)]
struct VcpuQueues {
    control_block: Option<u64>,
    tails: [u32; NR_QUEUES],
}

/// Xen's per-port FIFO state.
#[derive(Debug, Clone, Copy)]
struct PortFifo {
    priority: u8,
    /// The queue (vCPU, priority) the port was last linked on: if it is
    /// still that queue's tail when the port is linked elsewhere, the old
    /// queue is empty and its tail must be forgotten.
    last_queue: (u32, u8),
    /// Raised while its array page did not exist yet: raised again when
    /// the page comes (expand_array).
    saved_pending: bool,
}

impl Default for PortFifo {
    fn default() -> Self {
        Self { priority: PRIORITY_DEFAULT, last_queue: (0, PRIORITY_DEFAULT), saved_pending: false }
    }
}

/// What a `set_pending` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Raised {
    /// PENDING was clear before (pollers of the port must look).
    pub newly_pending: bool,
    /// The vCPU's upcall flag went from 0 to 1 (it needs an interrupt).
    pub upcall: bool,
}

pub struct Fifo {
    /// The guest's RAM, where the control blocks and array pages are.
    ram: Arc<GuestRam>,
    vcpus: Vec<VcpuQueues>,
    /// Guest-physical address of each event array page, in port order.
    array: Vec<u64>,
    ports: Vec<PortFifo>,
}

impl std::fmt::Debug for Fifo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fifo").field("vcpus", &self.vcpus).field("array", &self.array).finish_non_exhaustive()
    }
}

/// A whole guest frame of RAM: its address, or None.
fn frame_gpa(ram: &GuestRam, gfn: u64, len: u64) -> Option<u64> {
    let gpa = gfn.checked_mul(PAGE_SIZE)?;
    ram.is_ram(gpa, len).then_some(gpa)
}

impl Fifo {
    pub fn new(ram: Arc<GuestRam>, nr_vcpus: u32) -> Self {
        Self { ram, vcpus: vec![VcpuQueues::default(); nr_vcpus as usize], array: Vec::new(), ports: Vec::new() }
    }

    /// EVTCHNOP_init_control for vCPU `vcpu`: its control block at
    /// `offset` in frame `gfn`. Checked in Xen's order.
    pub fn init_control(&mut self, vcpu: u32, gfn: u64, offset: u32) -> Result<(), FifoError> {
        let already = self.vcpus.get(vcpu as usize).ok_or(FifoError::NoVcpu)?.control_block.is_some();
        if offset as u64 > PAGE_SIZE - CONTROL_BLOCK_SIZE {
            return Err(FifoError::Invalid);
        }
        if !offset.is_multiple_of(CONTROL_BLOCK_ALIGN) {
            return Err(FifoError::Misaligned);
        }
        if already {
            return Err(FifoError::Invalid);
        }
        let page = frame_gpa(&self.ram, gfn, PAGE_SIZE).ok_or(FifoError::Invalid)?;
        self.vcpus[vcpu as usize].control_block = Some(page + offset as u64);
        Ok(())
    }

    pub fn encode(&self, e: &mut Enc) {
        e.len(self.vcpus.len());
        for v in &self.vcpus {
            e.opt_u64(v.control_block);
            for t in v.tails {
                e.u32(t);
            }
        }
        e.len(self.array.len());
        for &a in &self.array {
            e.u64(a);
        }
        e.len(self.ports.len());
        for p in &self.ports {
            e.u8(p.priority);
            e.u32(p.last_queue.0);
            e.u8(p.last_queue.1);
            e.bool(p.saved_pending);
        }
    }

    /// A save's FIFO state, every address and index checked as the
    /// hypercalls that set them check them.
    pub fn decode(ram: Arc<GuestRam>, nr_vcpus: u32, d: &mut Dec) -> Result<Self, SnapshotError> {
        let mut f = Fifo::new(ram, nr_vcpus);
        if d.len(nr_vcpus as usize, 9)? != nr_vcpus as usize {
            return Err(invalid("FIFO state for another number of vCPUs"));
        }
        for v in f.vcpus.iter_mut() {
            v.control_block = d.opt_u64()?;
            if let Some(cb) = v.control_block {
                let page = cb & !(PAGE_SIZE - 1);
                if frame_gpa(&f.ram, page / PAGE_SIZE, PAGE_SIZE).is_none()
                    || cb - page > PAGE_SIZE - CONTROL_BLOCK_SIZE
                    || !(cb - page).is_multiple_of(CONTROL_BLOCK_ALIGN as u64)
                {
                    return Err(invalid(format!("a FIFO control block at {cb:#x}")));
                }
            }
            for t in v.tails.iter_mut() {
                *t = d.u32()?;
                if *t >= NR_CHANNELS {
                    return Err(invalid(format!("a FIFO queue tail {t}")));
                }
            }
        }
        for _ in 0..d.len(MAX_ARRAY_PAGES, 8)? {
            let gpa = d.u64()?;
            if !gpa.is_multiple_of(PAGE_SIZE) || frame_gpa(&f.ram, gpa / PAGE_SIZE, PAGE_SIZE).is_none() {
                return Err(invalid(format!("a FIFO event array page at {gpa:#x}")));
            }
            f.array.push(gpa);
        }
        for _ in 0..d.len(NR_CHANNELS as usize, 7)? {
            let priority = d.u8()?;
            let last_queue = (d.u32()?, d.u8()?);
            let saved_pending = d.bool()?;
            if priority > PRIORITY_MIN || last_queue.1 > PRIORITY_MIN || last_queue.0 >= nr_vcpus {
                return Err(invalid("a FIFO port on a queue that does not exist"));
            }
            f.ports.push(PortFifo { priority, last_queue, saved_pending });
        }
        Ok(f)
    }

    pub fn has_control_block(&self, vcpu: u32) -> bool {
        self.vcpus.get(vcpu as usize).is_some_and(|v| v.control_block.is_some())
    }

    /// Ports the event array covers now.
    pub fn nr_words(&self) -> u32 {
        self.array.len() as u32 * WORDS_PER_PAGE
    }

    /// EVTCHNOP_expand_array: the next page of event words. Returns the
    /// range of ports it covers; the caller raises again the ones raised
    /// while it was missing (`take_saved_pending`).
    pub fn add_array_page(&mut self, gfn: u64) -> Result<std::ops::Range<u32>, FifoError> {
        if self.array.len() >= MAX_ARRAY_PAGES {
            return Err(FifoError::Full);
        }
        let page = frame_gpa(&self.ram, gfn, PAGE_SIZE).ok_or(FifoError::Invalid)?;
        let first = self.nr_words();
        self.array.push(page);
        Ok(first..self.nr_words())
    }

    fn port(&mut self, port: u32) -> &mut PortFifo {
        let i = port as usize;
        if i >= self.ports.len() {
            self.ports.resize(i + 1, PortFifo::default());
        }
        &mut self.ports[i]
    }

    /// A port (re)allocated: default priority, no saved event. Its last
    /// queue is kept: the port may still be that queue's tail.
    pub fn init_port(&mut self, port: u32) {
        let p = self.port(port);
        p.priority = PRIORITY_DEFAULT;
        p.saved_pending = false;
    }

    /// Carry over a port bound under the 2-level ABI: its pending bit.
    pub fn save_pending(&mut self, port: u32) {
        self.port(port).saved_pending = true;
    }

    pub fn take_saved_pending(&mut self, port: u32) -> bool {
        std::mem::take(&mut self.port(port).saved_pending)
    }

    /// EVTCHNOP_set_priority: for the port's next link; an event already
    /// queued stays where it is.
    pub fn set_priority(&mut self, port: u32, priority: u32) -> Result<(), FifoError> {
        if priority > PRIORITY_MIN as u32 {
            return Err(FifoError::Invalid);
        }
        self.port(port).priority = priority as u8;
        Ok(())
    }

    pub fn priority(&self, port: u32) -> u8 {
        self.ports.get(port as usize).map_or(PRIORITY_DEFAULT, |p| p.priority)
    }

    /// The event word of `port`, if its array page exists.
    pub fn word(&self, port: u32) -> Option<&AtomicU32> {
        if port >= self.nr_words() {
            return None;
        }
        let page = self.array[(port / WORDS_PER_PAGE) as usize];
        self.ram.atomic_u32(page + 4 * (port % WORDS_PER_PAGE) as u64).ok()
    }

    pub fn is_pending(&self, port: u32) -> bool {
        self.word(port).is_some_and(|w| w.load(SeqCst) & PENDING != 0)
    }

    /// A port with no word yet counts as masked, as in Xen.
    pub fn is_masked(&self, port: u32) -> bool {
        self.word(port).is_none_or(|w| w.load(SeqCst) & MASKED != 0)
    }

    /// Still on a queue: a closed port in this state is not reused yet.
    pub fn is_linked(&self, port: u32) -> bool {
        self.word(port).is_some_and(|w| w.load(SeqCst) & LINKED != 0)
    }

    /// Close: clear PENDING only; the guest unlinks the event and skips it.
    pub fn clear_pending(&mut self, port: u32) {
        if let Some(w) = self.word(port) {
            w.fetch_and(!PENDING, SeqCst);
        }
        self.port(port).saved_pending = false;
    }

    /// Raise `port` for vCPU `vcpu` (Xen's evtchn_fifo_set_pending): set
    /// PENDING; if unmasked and not linked, append it to the queue of its
    /// priority on that vCPU (link the tail to it, or make it HEAD of an
    /// empty queue) and, for a queue that was empty, set its READY bit
    /// and then the upcall flag in `vcpu_info` (evtchn_upcall_pending).
    pub fn set_pending(&mut self, port: u32, vcpu: u32, vcpu_info: Option<u64>) -> Raised {
        let Some(word) = self.word(port) else {
            self.port(port).saved_pending = true;
            return Raised::default();
        };
        let newly_pending = word.fetch_or(PENDING, SeqCst) & PENDING == 0;
        let Some(cb) = self.vcpus.get(vcpu as usize).and_then(|v| v.control_block) else {
            // No control block: the guest may not unmask before it has one,
            // so the event just stays pending (Xen drops the link too).
            return Raised { newly_pending, upcall: false };
        };
        let prio = self.priority(port);
        let mut joined_a_queue = false;
        if word.load(SeqCst) & MASKED == 0 && word.fetch_or(LINKED, SeqCst) & LINKED == 0 {
            let (old_vcpu, old_prio) = self.port(port).last_queue;
            if let Some(old) = self.vcpus.get_mut(old_vcpu as usize) {
                if old.tails[old_prio as usize] == port {
                    old.tails[old_prio as usize] = 0;
                }
            }
            self.port(port).last_queue = (vcpu, prio);
            let tail = self.vcpus[vcpu as usize].tails[prio as usize];
            let linked = tail != 0 && self.word(tail).is_some_and(|tw| set_link(tw, port));
            if !linked {
                // The queue was empty (or its tail consumed): port is HEAD.
                if let Ok(head) = self.ram.atomic_u32(cb + CB_HEAD + 4 * prio as u64) {
                    head.store(port, SeqCst);
                }
                joined_a_queue = true;
            }
            self.vcpus[vcpu as usize].tails[prio as usize] = port;
        }
        let mut upcall = false;
        if joined_a_queue {
            let bit = 1u32 << prio;
            let ready_was_clear = self.ram.atomic_u32(cb + CB_READY).is_ok_and(|r| r.fetch_or(bit, SeqCst) & bit == 0);
            if ready_was_clear {
                upcall = vcpu_info
                    .and_then(|vi| self.ram.atomic_u8(vi + super::evtchn::VI_UPCALL_PENDING).ok())
                    .is_some_and(|u| u.swap(1, SeqCst) == 0);
            }
        }
        Raised { newly_pending, upcall }
    }

    /// EVTCHNOP_unmask (Xen's evtchn_fifo_unmask): clear MASKED and, if the
    /// event is pending, link it now. Returns whether the upcall became due.
    pub fn unmask(&mut self, port: u32, vcpu: u32, vcpu_info: Option<u64>) -> bool {
        let Some(word) = self.word(port) else { return false };
        word.fetch_and(!MASKED, SeqCst);
        word.load(SeqCst) & PENDING != 0 && self.set_pending(port, vcpu, vcpu_info).upcall
    }
}

/// Point the LINK of `tail` at `port` if `tail` is still LINKED (the guest
/// has not consumed it). The guest may meanwhile set or clear MASKED,
/// clear PENDING, or clear LINKED (and LINK), each with cmpxchg; BUSY
/// keeps it from unmasking while we retry, so a few tries always settle.
/// Returns whether `port` is now linked behind `tail`.
fn set_link(tail: &AtomicU32, port: u32) -> bool {
    let try_link = |seen: &mut u32| -> Option<bool> {
        if *seen & LINKED == 0 {
            return Some(false);
        }
        let new = (*seen & !(BUSY | LINK_MASK)) | port;
        match tail.compare_exchange(*seen, new, SeqCst, SeqCst) {
            Ok(_) => Some(true),
            Err(now) => {
                *seen = now;
                None
            }
        }
    };
    let mut seen = tail.load(SeqCst);
    if let Some(linked) = try_link(&mut seen) {
        return linked;
    }
    tail.fetch_or(BUSY, SeqCst);
    seen = tail.load(SeqCst);
    for _ in 0..4 {
        if let Some(linked) = try_link(&mut seen) {
            if !linked {
                tail.fetch_and(!BUSY, SeqCst);
            }
            return linked;
        }
    }
    // The guest broke the protocol (more changes than it may make): give
    // up as Xen does; the event may be lost, to this guest only.
    tail.fetch_and(!BUSY, SeqCst);
    true
}

/// The FIFO operations of the domain's event channels (under the port lock).
impl EventChannels {
    pub fn fifo_active(&self) -> bool {
        self.fifo.is_some()
    }

    /// EVTCHNOP_init_control. The first one switches the domain to the
    /// FIFO ABI: the ports already bound get the default priority and
    /// keep a pending event, delivered once their array page exists.
    pub fn fifo_init_control(
        &mut self,
        ram: &Arc<GuestRam>,
        vcpu: u32,
        gfn: u64,
        offset: u32,
    ) -> Result<(), FifoError> {
        if let Some(fifo) = &mut self.fifo {
            return fifo.init_control(vcpu, gfn, offset);
        }
        let mut fifo = Fifo::new(ram.clone(), self.nr_vcpus());
        fifo.init_control(vcpu, gfn, offset)?;
        for port in 1..self.max_ports() {
            if self.get(port).is_some() {
                fifo.init_port(port);
                if self.is_pending(ram, port) {
                    fifo.save_pending(port);
                }
            }
        }
        self.fifo = Some(fifo);
        Ok(())
    }

    /// EVTCHNOP_expand_array. Returns the vCPUs of the events that were
    /// waiting for this page and are now raised.
    pub fn fifo_expand_array(&mut self, ram: &GuestRam, gfn: u64) -> Result<Vec<u32>, FifoError> {
        let fifo = self.fifo.as_mut().ok_or(FifoError::NotActive)?;
        let added = fifo.add_array_page(gfn)?;
        let mut woken = Vec::new();
        for port in added {
            if self.get(port).is_none() {
                continue;
            }
            let saved = self.fifo.as_mut().is_some_and(|f| f.take_saved_pending(port));
            if saved {
                woken.extend(self.raise(ram, port));
            }
        }
        Ok(woken)
    }

    /// EVTCHNOP_set_priority, checked in Xen's order.
    pub fn fifo_set_priority(&mut self, port: u32, priority: u32) -> Result<(), FifoError> {
        self.get(port).ok_or(FifoError::NoPort)?;
        self.fifo.as_mut().ok_or(FifoError::NotActive)?.set_priority(port, priority)
    }

    /// The priority `port` is linked at next (FIFO only).
    pub fn fifo_priority(&self, port: u32) -> Option<u8> {
        self.fifo.as_ref().map(|f| f.priority(port))
    }

    /// EVTCHNOP_reset: close every port and go back to the 2-level ABI.
    pub fn reset(&mut self, ram: &GuestRam) {
        for port in 1..self.max_ports() {
            if self.get(port).is_some() {
                let _ = self.close(ram, port);
            }
        }
        self.fifo = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::evtchn::{PortState, VI_UPCALL_PENDING};

    const SI: u64 = 0x10000;
    const CB0: u64 = 0x20000; // vCPU 0's control block (offset 0 of its page)
    const CB1: u64 = 0x21040; // vCPU 1's, at offset 0x40
    const ARRAY: u64 = 0x30000; // event array pages from here

    fn setup() -> (Arc<GuestRam>, EventChannels) {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mut ev = EventChannels::new(1, 2);
        ev.set_shared_info(Some(SI));
        (ram, ev)
    }

    fn fifo_on(ram: &Arc<GuestRam>, ev: &mut EventChannels) {
        ev.fifo_init_control(ram, 0, CB0 >> 12, 0).unwrap();
        ev.fifo_init_control(ram, 1, CB1 >> 12, (CB1 & 0xfff) as u32).unwrap();
        assert_eq!(ev.fifo_expand_array(ram, ARRAY >> 12), Ok(vec![]));
    }

    fn word(ram: &GuestRam, port: u32) -> &AtomicU32 {
        ram.atomic_u32(ARRAY + 4 * port as u64).unwrap()
    }

    /// The guest's side, as Linux's events_fifo.c consumes a control block:
    /// take READY, the lowest set priority first, from its own copy of HEAD
    /// (or the block's when it has none), unlinking with cmpxchg; an event
    /// pending and unmasked is handled (and its PENDING cleared).
    struct Guest {
        cb: u64,
        heads: [u32; NR_QUEUES],
    }

    impl Guest {
        fn new(cb: u64) -> Self {
            Self { cb, heads: [0; NR_QUEUES] }
        }

        fn consume(&mut self, ram: &GuestRam) -> Vec<u32> {
            let ready_word = ram.atomic_u32(self.cb + CB_READY).unwrap();
            let mut handled = Vec::new();
            let mut ready = ready_word.swap(0, SeqCst);
            while ready != 0 {
                let q = ready.trailing_zeros() as usize;
                let mut head = self.heads[q];
                if head == 0 {
                    head = ram.atomic_u32(self.cb + CB_HEAD + 4 * q as u64).unwrap().load(SeqCst);
                }
                let port = head;
                let w = word(ram, port);
                let mut seen = w.load(SeqCst);
                let next = loop {
                    match w.compare_exchange(seen, seen & !(LINKED | LINK_MASK), SeqCst, SeqCst) {
                        Ok(_) => break seen & LINK_MASK,
                        Err(now) => seen = now,
                    }
                };
                if next == 0 {
                    ready &= !(1 << q);
                }
                let now = w.load(SeqCst);
                if now & PENDING != 0 && now & MASKED == 0 {
                    w.fetch_and(!PENDING, SeqCst);
                    handled.push(port);
                }
                self.heads[q] = next;
                ready |= ready_word.swap(0, SeqCst);
            }
            handled
        }
    }

    fn upcall(ram: &GuestRam, vi: u64) -> bool {
        ram.atomic_u8(vi + VI_UPCALL_PENDING).unwrap().swap(0, SeqCst) != 0
    }

    #[test]
    fn events_come_out_by_priority_then_in_raise_order() {
        let (ram, mut ev) = setup();
        fifo_on(&ram, &mut ev);
        let ports: Vec<u32> = (0..6).map(|_| ev.alloc(PortState::Ipi, 0).unwrap()).collect();
        ev.fifo_set_priority(ports[4], 2).unwrap();
        ev.fifo_set_priority(ports[5], 2).unwrap();
        ev.fifo_set_priority(ports[0], 12).unwrap();
        for &p in [5, 1, 0, 3, 4, 2].iter().map(|&i| &ports[i]) {
            assert_eq!(ev.raise(&ram, p), Some(0));
        }
        assert_eq!(ev.raise(&ram, ports[1]), None, "already pending and queued");
        let cb = |off: u64| ram.atomic_u32(CB0 + off).unwrap().load(SeqCst);
        assert_eq!(cb(CB_READY), 1 << 2 | 1 << 7 | 1 << 12);
        assert_eq!(cb(CB_HEAD + 4 * 2), ports[5]);
        assert_eq!(cb(CB_HEAD + 4 * 7), ports[1]);
        assert_eq!(word(&ram, ports[1]).load(SeqCst), PENDING | LINKED | ports[3]);
        assert!(upcall(&ram, SI), "vCPU 0's upcall");
        assert!(!upcall(&ram, SI + 64));
        let mut guest = Guest::new(CB0);
        let order: Vec<u32> = [5, 4, 1, 3, 2, 0].iter().map(|&i| ports[i]).collect();
        assert_eq!(guest.consume(&ram), order);
        assert_eq!(cb(CB_READY), 0);
        // The queues are empty now: the next event becomes HEAD again.
        assert_eq!(ev.raise(&ram, ports[3]), Some(0));
        assert_eq!(cb(CB_READY), 1 << 7);
        assert!(upcall(&ram, SI));
        assert_eq!(guest.consume(&ram), vec![ports[3]]);
    }

    #[test]
    fn a_masked_event_waits_for_its_unmask() {
        let (ram, mut ev) = setup();
        fifo_on(&ram, &mut ev);
        let p = ev.alloc(PortState::Ipi, 1).unwrap();
        word(&ram, p).store(MASKED, SeqCst);
        assert_eq!(ev.raise(&ram, p), Some(1), "pending (pollers look) though masked");
        assert!(ev.is_pending(&ram, p) && ev.is_masked(&ram, p));
        assert_eq!(word(&ram, p).load(SeqCst), PENDING | MASKED, "not linked");
        assert!(!upcall(&ram, SI + 64));
        assert_eq!(ev.unmask(&ram, p), Some(1));
        assert_eq!(word(&ram, p).load(SeqCst), PENDING | LINKED);
        assert!(upcall(&ram, SI + 64));
        assert_eq!(Guest::new(CB1).consume(&ram), vec![p]);
        assert_eq!(ev.unmask(&ram, p), None, "nothing pending");
    }

    #[test]
    fn a_new_event_links_behind_the_tail_until_the_guest_takes_it() {
        let (ram, mut ev) = setup();
        fifo_on(&ram, &mut ev);
        let a = ev.alloc(PortState::Ipi, 0).unwrap();
        let b = ev.alloc(PortState::Ipi, 0).unwrap();
        let c = ev.alloc(PortState::Ipi, 0).unwrap();
        ev.raise(&ram, a);
        let mut guest = Guest::new(CB0);
        assert_eq!(guest.consume(&ram), vec![a]);
        // a was the tail but is unlinked: b starts the queue afresh (HEAD),
        // c links behind b.
        ev.raise(&ram, b);
        ev.raise(&ram, c);
        assert_eq!(word(&ram, a).load(SeqCst) & LINK_MASK, 0, "nothing linked to a consumed event");
        assert_eq!(word(&ram, b).load(SeqCst), PENDING | LINKED | c);
        assert_eq!(guest.consume(&ram), vec![b, c]);
    }

    #[test]
    fn a_port_moved_to_another_vcpu_leaves_its_old_queue_empty() {
        let (ram, mut ev) = setup();
        fifo_on(&ram, &mut ev);
        let moved = ev.alloc(PortState::Unbound { remote: 0 }, 0).unwrap();
        let stays = ev.alloc(PortState::Unbound { remote: 0 }, 0).unwrap();
        ev.raise(&ram, moved);
        assert_eq!(Guest::new(CB0).consume(&ram), vec![moved]);
        ev.set_vcpu(moved, 1).unwrap();
        assert_eq!(ev.raise(&ram, moved), Some(1));
        assert!(upcall(&ram, SI + 64));
        // vCPU 0's queue must not still end at `moved`: `stays` is its HEAD.
        assert_eq!(ev.raise(&ram, stays), Some(0));
        assert_eq!(ram.atomic_u32(CB0 + CB_HEAD + 4 * 7).unwrap().load(SeqCst), stays);
        assert_eq!(word(&ram, moved).load(SeqCst) & LINK_MASK, 0);
        assert_eq!(Guest::new(CB1).consume(&ram), vec![moved]);
        assert_eq!(Guest::new(CB0).consume(&ram), vec![stays]);
    }

    #[test]
    fn ports_bound_before_init_control_keep_their_event() {
        let (ram, mut ev) = setup();
        let early = ev.alloc(PortState::Ipi, 0).unwrap();
        let quiet = ev.alloc(PortState::Ipi, 0).unwrap();
        ram.atomic_u64(SI + crate::xen::evtchn::SI_PENDING).unwrap().fetch_or(1 << early, SeqCst);
        ev.fifo_init_control(&ram, 0, CB0 >> 12, 0).unwrap();
        assert_eq!(ev.max_ports(), NR_CHANNELS);
        assert!(!ev.is_pending(&ram, early), "no event array yet");
        assert!(ev.is_masked(&ram, early), "a port without a word is masked");
        // A raise with no array page is kept for the page too.
        let other = ev.alloc(PortState::Ipi, 0).unwrap();
        assert_eq!(ev.raise(&ram, other), None);
        assert_eq!(ev.fifo_expand_array(&ram, ARRAY >> 12), Ok(vec![0, 0]));
        assert!(ev.is_pending(&ram, early) && !ev.is_pending(&ram, quiet) && ev.is_pending(&ram, other));
        assert_eq!(Guest::new(CB0).consume(&ram), vec![early, other]);
    }

    #[test]
    fn init_control_expand_array_and_set_priority_refuse_as_xen_does() {
        let (ram, mut ev) = setup();
        let p = ev.alloc(PortState::Ipi, 0).unwrap();
        assert_eq!(ev.fifo_set_priority(p, 3), Err(FifoError::NotActive), "2-level: -ENOSYS");
        assert_eq!(ev.fifo_set_priority(999, 3), Err(FifoError::NoPort));
        assert_eq!(ev.fifo_expand_array(&ram, ARRAY >> 12), Err(FifoError::NotActive));
        assert_eq!(ev.fifo_init_control(&ram, 2, CB0 >> 12, 0), Err(FifoError::NoVcpu));
        assert_eq!(ev.fifo_init_control(&ram, 0, CB0 >> 12, 4096 - 71), Err(FifoError::Invalid));
        assert_eq!(ev.fifo_init_control(&ram, 0, CB0 >> 12, 2), Err(FifoError::Misaligned));
        assert_eq!(ev.fifo_init_control(&ram, 0, 1 << 40, 0), Err(FifoError::Invalid), "not RAM");
        assert_eq!(ev.fifo_init_control(&ram, 0, u64::MAX, 0), Err(FifoError::Invalid));
        assert!(!ev.fifo_active(), "a failed first init_control leaves 2-level on");
        ev.fifo_init_control(&ram, 0, CB0 >> 12, 4096 - 72).unwrap();
        assert_eq!(ev.fifo_init_control(&ram, 0, CB0 >> 12, 0), Err(FifoError::Invalid), "twice");
        assert_eq!(ev.fifo_set_priority(p, 16), Err(FifoError::Invalid));
        ev.fifo_set_priority(p, 15).unwrap();
        assert_eq!(ev.fifo_priority(p), Some(15));
        assert_eq!(ev.fifo_expand_array(&ram, 1 << 40), Err(FifoError::Invalid));
        for _ in 0..MAX_ARRAY_PAGES {
            ev.fifo_expand_array(&ram, ARRAY >> 12).unwrap();
        }
        assert_eq!(ev.fifo_expand_array(&ram, ARRAY >> 12), Err(FifoError::Full));
        // Past the 2-level limit, up to 1 << 17 ports.
        for _ in 0..5000 {
            ev.alloc(PortState::Ipi, 0).unwrap();
        }
        assert!(ev.get(5000).is_some());
    }

    #[test]
    fn a_closed_port_is_not_reused_while_still_queued() {
        let (ram, mut ev) = setup();
        fifo_on(&ram, &mut ev);
        let p = ev.alloc(PortState::Ipi, 0).unwrap();
        ev.fifo_set_priority(p, 1).unwrap();
        ev.raise(&ram, p);
        ev.close(&ram, p).unwrap();
        assert_eq!(word(&ram, p).load(SeqCst), LINKED, "PENDING cleared, still linked");
        let q = ev.alloc(PortState::Ipi, 0).unwrap();
        assert_ne!(q, p, "busy until the guest unlinks it");
        assert_eq!(Guest::new(CB0).consume(&ram), Vec::<u32>::new(), "a closed port's event is skipped");
        ev.close(&ram, q).unwrap();
        assert_eq!(ev.alloc(PortState::Ipi, 0), Ok(p));
        assert_eq!(ev.fifo_priority(p), Some(PRIORITY_DEFAULT), "a reused port starts at the default priority");
    }

    #[test]
    fn reset_closes_everything_and_goes_back_to_two_level() {
        let (ram, mut ev) = setup();
        fifo_on(&ram, &mut ev);
        for _ in 0..3 {
            ev.alloc(PortState::Ipi, 0).unwrap();
        }
        ev.reset(&ram);
        assert!(!ev.fifo_active());
        assert_eq!(ev.max_ports(), crate::xen::evtchn::NR_PORTS);
        assert!((1..4).all(|p| ev.get(p).is_none()));
    }

    #[test]
    fn linking_settles_against_a_guest_changing_the_tail_word() {
        // A guest vCPU on another thread keeps masking and unmasking the
        // tail with cmpxchg (refusing to unmask while BUSY, as Linux does)
        // while the host links new events behind it: every link lands, and
        // no mask change of the guest is lost.
        let (ram, mut ev) = setup();
        fifo_on(&ram, &mut ev);
        let tail = ev.alloc(PortState::Ipi, 0).unwrap();
        ev.raise(&ram, tail);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guest = {
            let (ram, stop) = (ram.clone(), stop.clone());
            std::thread::spawn(move || {
                let w = word(&ram, tail);
                let mut flips = 0u64;
                while !stop.load(SeqCst) {
                    let seen = w.load(SeqCst);
                    if seen & MASKED == 0 {
                        w.fetch_or(MASKED, SeqCst);
                        flips += 1;
                    } else if seen & BUSY == 0
                        && w.compare_exchange(seen, seen & !MASKED, SeqCst, SeqCst).is_ok()
                    {
                        flips += 1;
                    }
                }
                flips
            })
        };
        for _ in 0..2000 {
            let p = ev.alloc(PortState::Ipi, 0).unwrap();
            ev.raise(&ram, p);
            assert_eq!(word(&ram, tail).load(SeqCst) & (LINK_MASK | LINKED | BUSY), LINKED | p);
            // Make `tail` the queue's tail again for the next round.
            ev.close(&ram, p).unwrap();
            word(&ram, p).store(0, SeqCst);
            ev.fifo.as_mut().unwrap().vcpus[0].tails[PRIORITY_DEFAULT as usize] = tail;
        }
        stop.store(true, SeqCst);
        let flips = guest.join().unwrap();
        assert_eq!(word(&ram, tail).load(SeqCst) & MASKED != 0, flips % 2 == 1, "{flips} flips");
    }
}
