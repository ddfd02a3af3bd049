//! Event channels, 2-level ABI (event_channel.h): the port table, where the
//! pending/mask bitmaps (shared_info) and each vCPU's selector and upcall
//! flag (vcpu_info) live, and the host's notifications. Once the guest
//! calls EVTCHNOP_init_control the FIFO ABI (evtchn_fifo.rs) is active
//! instead: every place a port's pending or masked state is set, tested or
//! cleared asks `fifo` first.
//!
//! Domain 0 is the host: ports whose remote end is domain 0 belong to device
//! models. A guest send on one is queued for the host; the host raises the
//! guest's end with `raise`.
//!
//! Locking: the domain keeps one `EventChannels` behind its port lock
//! (`SharedState::evtchn`). The bits themselves are guest memory that the
//! guest's vCPUs update with LOCK'd instructions, so they are only ever
//! changed here with atomic operations (test-and-set, test-and-clear), in
//! the order Xen's `evtchn_2l_set_pending`/`evtchn_2l_unmask` use.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::abi::Width;
use super::evtchn_fifo::{self, Fifo};
use crate::memory::GuestRam;
use crate::snapshot::{invalid, Dec, Enc, SnapshotError};
use std::sync::Arc;

/// Ports a 64-bit guest can name under the 2-level ABI (64 words of 64 bits).
pub const NR_PORTS: u32 = 64 * 64;
/// A 32-bit guest's 2-level ABI: 32 words of 32 bits.
pub const NR_PORTS_32: u32 = 32 * 32;
pub const DOMID_HOST: u16 = 0;
/// vcpu_info slots in shared_info (MAX_VIRT_CPUS); later vCPUs must
/// register theirs.
pub const SHARED_INFO_VCPUS: u32 = 32;

// shared_info offsets (xen.h): the event words are xen_ulong_t, so a 32-bit
// guest's are 32 words of 4 bytes and its mask array starts earlier.
pub const SI_PENDING: u64 = 2048;
pub const SI_MASK: u64 = 2560;
pub const SI_MASK_32: u64 = 2048 + 32 * 4;
pub const VCPU_INFO_SIZE: u64 = 64;
// vcpu_info offsets (the selector is a xen_ulong_t after two bytes of flags).
pub const VI_UPCALL_PENDING: u64 = 0;
pub const VI_UPCALL_MASK: u64 = 1;
pub const VI_PENDING_SEL: u64 = 8;
pub const VI_PENDING_SEL_32: u64 = 4;
pub const VI_TIME: u64 = 32;

/// Where the 2-level bits live in one shared_info layout (Xen latches a
/// domain's layout from the mode of its vCPU at the calls that set it up:
/// `has_32bit_shinfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShinfoLayout {
    pub width: Width,
}

impl ShinfoLayout {
    pub fn nr_ports(self) -> u32 {
        match self.width {
            Width::Bits64 => NR_PORTS,
            Width::Bits32 => NR_PORTS_32,
        }
    }
    fn bits(self) -> u32 {
        self.width.ulong() as u32 * 8
    }
    pub fn pending(self) -> u64 {
        SI_PENDING
    }
    pub fn mask(self) -> u64 {
        match self.width {
            Width::Bits64 => SI_MASK,
            Width::Bits32 => SI_MASK_32,
        }
    }
    /// The selector's offset and size in a vcpu_info.
    pub fn pending_sel(self) -> (u64, u64) {
        match self.width {
            Width::Bits64 => (VI_PENDING_SEL, 8),
            Width::Bits32 => (VI_PENDING_SEL_32, 4),
        }
    }
}

/// One bit of a guest's event word, reached atomically (the guest updates
/// the same words with LOCK'd instructions).
enum Bit<'r> {
    In64(&'r AtomicU64, u64),
    In32(&'r AtomicU32, u32),
}

impl<'r> Bit<'r> {
    fn at(ram: &'r GuestRam, width: Width, array: u64, n: u32) -> Option<Self> {
        Some(match width {
            Width::Bits64 => Bit::In64(ram.atomic_u64(array + (n as u64 / 64) * 8).ok()?, 1 << (n % 64)),
            Width::Bits32 => Bit::In32(ram.atomic_u32(array + (n as u64 / 32) * 4).ok()?, 1 << (n % 32)),
        })
    }
    fn test(&self) -> bool {
        match self {
            Bit::In64(w, b) => w.load(SeqCst) & b != 0,
            Bit::In32(w, b) => w.load(SeqCst) & b != 0,
        }
    }
    /// Set; returns whether it was already set.
    fn set(&self) -> bool {
        match self {
            Bit::In64(w, b) => w.fetch_or(*b, SeqCst) & b != 0,
            Bit::In32(w, b) => w.fetch_or(*b, SeqCst) & b != 0,
        }
    }
    /// Clear; returns whether it was set.
    fn clear(&self) -> bool {
        match self {
            Bit::In64(w, b) => w.fetch_and(!*b, SeqCst) & b != 0,
            Bit::In32(w, b) => w.fetch_and(!*b, SeqCst) & b != 0,
        }
    }
}

pub const VIRQ_TIMER: u32 = 0;
pub const VIRQ_DEBUG: u32 = 1;
pub const VIRQ_CONSOLE: u32 = 2;
pub const NR_VIRQS: u32 = 24;
/// VIRQs bound per vCPU: TIMER, DEBUG, XENOPROF, XENPMU (Xen's
/// `get_virq_type`); the rest are global and bound on vCPU 0.
pub fn virq_is_per_vcpu(virq: u32) -> bool {
    matches!(virq, 0 | 1 | 7 | 13)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    Free,
    /// Allocated, waiting for `remote` to bind.
    Unbound { remote: u16 },
    /// Connected to `remote_port` of `remote` (domain 0: a host device model).
    Interdomain { remote: u16, remote_port: u32 },
    Virq(u32),
    Ipi,
}

#[derive(Debug, Clone, Copy)]
pub struct Port {
    pub state: PortState,
    /// The vCPU notified when this port is raised.
    pub vcpu: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvtchnError {
    Invalid,
    NoSpace,
    Busy,
}

/// Where a guest send went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Raised a port of this domain; `Some(vcpu)` if it became pending and
    /// that vCPU may need waking.
    Local(Option<u32>),
    /// Queued for the host (a device model's port).
    Host,
    /// Unbound, or bound to a domain that does not exist: dropped, as Xen does.
    Dropped,
}

#[derive(Debug)]
pub struct EventChannels {
    ports: Vec<Port>,
    domid: u16,
    /// Where shared_info (and so the bitmaps) is, once the guest placed it.
    shared_info: Option<u64>,
    /// Its layout (64-bit until a 32-bit vCPU sets it up).
    layout: ShinfoLayout,
    /// vcpu_info registered by VCPUOP_register_vcpu_info, per vCPU.
    vcpu_info: Vec<Option<u64>>,
    /// Guest ports the guest notified and the host has not collected.
    host_notifications: VecDeque<u32>,
    /// The FIFO ABI's state, once the guest chose it.
    pub(super) fifo: Option<Fifo>,
}

impl EventChannels {
    pub fn new(domid: u16, nr_vcpus: u32) -> Self {
        Self {
            // Port 0 is never valid.
            ports: vec![Port { state: PortState::Free, vcpu: 0 }; 1],
            domid,
            shared_info: None,
            layout: ShinfoLayout { width: Width::Bits64 },
            vcpu_info: vec![None; nr_vcpus as usize],
            host_notifications: VecDeque::new(),
            fifo: None,
        }
    }

    pub fn encode(&self, e: &mut Enc) {
        e.len(self.ports.len());
        for p in &self.ports {
            match p.state {
                PortState::Free => e.u8(0),
                PortState::Unbound { remote } => {
                    e.u8(1);
                    e.u16(remote);
                }
                PortState::Interdomain { remote, remote_port } => {
                    e.u8(2);
                    e.u16(remote);
                    e.u32(remote_port);
                }
                PortState::Virq(v) => {
                    e.u8(3);
                    e.u32(v);
                }
                PortState::Ipi => e.u8(4),
            }
            e.u32(p.vcpu);
        }
        e.opt_u64(self.shared_info);
        e.bool(self.layout.width == Width::Bits32);
        for &v in &self.vcpu_info {
            e.opt_u64(v);
        }
        e.len(self.host_notifications.len());
        for &p in &self.host_notifications {
            e.u32(p);
        }
        match &self.fifo {
            None => e.bool(false),
            Some(f) => {
                e.bool(true);
                f.encode(e);
            }
        }
    }

    /// A save's event channels for domain `domid` (a fork's own id:
    /// a port bound to the old id's own ports is bound to the new one's).
    pub fn decode(
        ram: &Arc<GuestRam>,
        domid: u16,
        old_domid: u16,
        nr_vcpus: u32,
        d: &mut Dec,
    ) -> Result<Self, SnapshotError> {
        let mut ev = EventChannels::new(domid, nr_vcpus);
        let n = d.len(evtchn_fifo::NR_CHANNELS as usize, 5)?;
        if n == 0 {
            return Err(invalid("no port 0"));
        }
        ev.ports.clear();
        let own = |r: u16| if r == old_domid { domid } else { r };
        for i in 0..n {
            let state = match d.u8()? {
                0 => PortState::Free,
                1 => PortState::Unbound { remote: own(d.u16()?) },
                2 => {
                    let (remote, remote_port) = (own(d.u16()?), d.u32()?);
                    if remote_port as usize >= n {
                        return Err(invalid(format!("port {i} bound to port {remote_port}")));
                    }
                    PortState::Interdomain { remote, remote_port }
                }
                3 => PortState::Virq(d.u32()?),
                4 => PortState::Ipi,
                s => return Err(invalid(format!("port {i} in state {s}"))),
            };
            let vcpu = d.u32()?;
            if vcpu >= nr_vcpus || (i == 0 && state != PortState::Free) {
                return Err(invalid(format!("port {i} on vCPU {vcpu}")));
            }
            ev.ports.push(Port { state, vcpu });
        }
        ev.shared_info = d.opt_u64()?;
        if ev.shared_info.is_some_and(|gpa| !gpa.is_multiple_of(4096) || !ram.is_ram(gpa, 4096)) {
            return Err(invalid("shared_info outside RAM"));
        }
        ev.layout = ShinfoLayout { width: if d.bool()? { Width::Bits32 } else { Width::Bits64 } };
        for v in ev.vcpu_info.iter_mut() {
            *v = d.opt_u64()?;
            if v.is_some_and(|gpa| !ram.is_ram(gpa, VCPU_INFO_SIZE)) {
                return Err(invalid("a vcpu_info outside RAM"));
            }
        }
        for _ in 0..d.len(n, 4)? {
            ev.host_notifications.push_back(d.u32()?);
        }
        if d.bool()? {
            ev.fifo = Some(Fifo::decode(ram.clone(), nr_vcpus, d)?);
        }
        if ev.ports.len() as u32 > ev.max_ports() {
            return Err(invalid(format!("{} ports where the event ABI has {}", ev.ports.len(), ev.max_ports())));
        }
        Ok(ev)
    }

    pub fn domid(&self) -> u16 {
        self.domid
    }

    pub fn nr_vcpus(&self) -> u32 {
        self.vcpu_info.len() as u32
    }

    pub fn get(&self, port: u32) -> Option<Port> {
        self.ports.get(port as usize).copied().filter(|p| port != 0 && p.state != PortState::Free)
    }

    pub fn alloc(&mut self, state: PortState, vcpu: u32) -> Result<u32, EvtchnError> {
        // A closed port still on a FIFO queue is busy until the guest unlinks it.
        let busy = |i: usize| self.fifo.as_ref().is_some_and(|f| f.is_linked(i as u32));
        let free = (1..self.ports.len()).find(|&i| self.ports[i].state == PortState::Free && !busy(i));
        let port = match free {
            Some(p) => p,
            None if (self.ports.len() as u32) < self.max_ports() => {
                self.ports.push(Port { state: PortState::Free, vcpu: 0 });
                self.ports.len() - 1
            }
            None => return Err(EvtchnError::NoSpace),
        };
        self.ports[port] = Port { state, vcpu };
        if let Some(fifo) = &mut self.fifo {
            fifo.init_port(port as u32);
        }
        Ok(port as u32)
    }

    /// Ports the active ABI can name.
    pub fn max_ports(&self) -> u32 {
        if self.fifo.is_some() {
            evtchn_fifo::NR_CHANNELS
        } else {
            self.layout.nr_ports()
        }
    }

    /// Close `port`. Its pending bit is cleared (in `ram`, if shared_info
    /// is placed), as Xen's evtchn_free does: the port number is reused by
    /// the next bind, which must not find an old event on it (Linux binds
    /// its spinlock-kick IPI with a handler that BUG()s if it ever runs).
    pub fn close(&mut self, ram: &GuestRam, port: u32) -> Result<PortState, EvtchnError> {
        let p = self.get(port).ok_or(EvtchnError::Invalid)?;
        if let Some(fifo) = &mut self.fifo {
            fifo.clear_pending(port);
        } else if let Some(pending) = self.bit(ram, self.layout.pending(), port) {
            pending.clear();
        }
        // A loopback interdomain peer goes back to unbound.
        if let PortState::Interdomain { remote, remote_port } = p.state {
            if remote == self.domid && remote_port != port {
                if let Some(peer) = self.ports.get_mut(remote_port as usize) {
                    peer.state = PortState::Unbound { remote: self.domid };
                }
            }
        }
        self.ports[port as usize] = Port { state: PortState::Free, vcpu: 0 };
        self.host_notifications.retain(|&p| p != port);
        Ok(p.state)
    }

    pub fn set_state(&mut self, port: u32, state: PortState) -> Result<(), EvtchnError> {
        self.get(port).ok_or(EvtchnError::Invalid)?;
        self.ports[port as usize].state = state;
        Ok(())
    }

    pub fn set_vcpu(&mut self, port: u32, vcpu: u32) -> Result<(), EvtchnError> {
        self.get(port).ok_or(EvtchnError::Invalid)?;
        self.ports[port as usize].vcpu = vcpu;
        Ok(())
    }

    pub fn find_virq(&self, virq: u32, vcpu: u32) -> Option<u32> {
        (1..self.ports.len() as u32)
            .find(|&i| self.ports[i as usize].state == PortState::Virq(virq) && self.ports[i as usize].vcpu == vcpu)
    }

    /// Ports whose far end is the host (for device models).
    pub fn host_ports(&self) -> Vec<(u32, PortState)> {
        (1..self.ports.len() as u32)
            .filter_map(|i| {
                let s = self.ports[i as usize].state;
                match s {
                    PortState::Unbound { remote: DOMID_HOST } | PortState::Interdomain { remote: DOMID_HOST, .. } => {
                        Some((i, s))
                    }
                    _ => None,
                }
            })
            .collect()
    }

    // -- where the bits live ------------------------------------------------

    pub fn shared_info(&self) -> Option<u64> {
        self.shared_info
    }

    pub fn set_shared_info(&mut self, gpa: Option<u64>) {
        self.shared_info = gpa;
    }

    pub fn layout(&self) -> ShinfoLayout {
        self.layout
    }

    /// Latch the shared_info layout; returns whether it changed.
    pub fn set_layout(&mut self, layout: ShinfoLayout) -> bool {
        std::mem::replace(&mut self.layout, layout) != layout
    }

    /// Where vCPU `v`'s vcpu_info lives: registered, or its slot in shared_info.
    pub fn vcpu_info(&self, v: u32) -> Option<u64> {
        let registered = *self.vcpu_info.get(v as usize)?;
        registered.or_else(|| {
            self.shared_info.filter(|_| v < SHARED_INFO_VCPUS).map(|si| si + VCPU_INFO_SIZE * v as u64)
        })
    }

    pub fn vcpu_info_registered(&self, v: u32) -> bool {
        self.vcpu_info.get(v as usize).is_some_and(|r| r.is_some())
    }

    pub fn register_vcpu_info(&mut self, v: u32, gpa: u64) {
        if let Some(slot) = self.vcpu_info.get_mut(v as usize) {
            *slot = Some(gpa);
        }
    }

    // -- the 2-level bits ---------------------------------------------------

    fn bit<'r>(&self, ram: &'r GuestRam, array: u64, port: u32) -> Option<Bit<'r>> {
        if port >= self.layout.nr_ports() {
            return None;
        }
        Bit::at(ram, self.layout.width, self.shared_info? + array, port)
    }

    pub fn is_pending(&self, ram: &GuestRam, port: u32) -> bool {
        if let Some(fifo) = &self.fifo {
            return fifo.is_pending(port);
        }
        self.bit(ram, self.layout.pending(), port).is_some_and(|b| b.test())
    }

    pub fn is_masked(&self, ram: &GuestRam, port: u32) -> bool {
        if let Some(fifo) = &self.fifo {
            return fifo.is_masked(port);
        }
        self.bit(ram, self.layout.mask(), port).is_some_and(|b| b.test())
    }

    /// Whether vCPU `v` has an event upcall waiting.
    pub fn upcall_pending(&self, ram: &GuestRam, v: u32) -> bool {
        self.vcpu_info(v)
            .and_then(|vi| ram.atomic_u8(vi + VI_UPCALL_PENDING).ok())
            .is_some_and(|b| b.load(SeqCst) != 0)
    }

    /// Flag `port`'s word in vCPU `v`'s selector; if that was news, set its
    /// upcall flag. Returns whether the upcall became pending.
    fn mark(&self, ram: &GuestRam, port: u32, v: u32) -> bool {
        let Some(vi) = self.vcpu_info(v) else { return false };
        let (sel, _) = self.layout.pending_sel();
        let Some(word) = Bit::at(ram, self.layout.width, vi + sel, port / self.layout.bits()) else { return false };
        if word.set() {
            return false;
        }
        ram.atomic_u8(vi + VI_UPCALL_PENDING).is_ok_and(|u| u.swap(1, SeqCst) == 0)
    }

    /// Set `port` pending (Xen's evtchn_2l_set_pending). Returns the port's
    /// vCPU if the port became pending: an unmasked port may have made its
    /// upcall due, and a vCPU polling the port must look again.
    pub fn raise(&mut self, ram: &GuestRam, port: u32) -> Option<u32> {
        let p = self.get(port)?;
        if self.fifo.is_some() {
            let vcpu_info = self.vcpu_info(p.vcpu);
            let raised = self.fifo.as_mut()?.set_pending(port, p.vcpu, vcpu_info);
            return (raised.newly_pending || raised.upcall).then_some(p.vcpu);
        }
        if self.bit(ram, self.layout.pending(), port)?.set() {
            return None;
        }
        if !self.is_masked(ram, port) {
            self.mark(ram, port, p.vcpu);
        }
        Some(p.vcpu)
    }

    /// Clear `port`'s mask; deliver it if it was pending (evtchn_2l_unmask).
    /// Returns the vCPU whose upcall became pending.
    pub fn unmask(&mut self, ram: &GuestRam, port: u32) -> Option<u32> {
        let p = self.get(port)?;
        if self.fifo.is_some() {
            let vcpu_info = self.vcpu_info(p.vcpu);
            return self.fifo.as_mut()?.unmask(port, p.vcpu, vcpu_info).then_some(p.vcpu);
        }
        let was_masked = self.bit(ram, self.layout.mask(), port)?.clear();
        (was_masked && self.is_pending(ram, port) && self.mark(ram, port, p.vcpu)).then_some(p.vcpu)
    }

    /// EVTCHNOP_send from the guest.
    pub fn guest_send(&mut self, ram: &GuestRam, port: u32) -> Result<Sent, EvtchnError> {
        let p = self.get(port).ok_or(EvtchnError::Invalid)?;
        Ok(match p.state {
            PortState::Virq(_) | PortState::Ipi => Sent::Local(self.raise(ram, port)),
            PortState::Interdomain { remote, remote_port } if remote == self.domid => {
                Sent::Local(self.raise(ram, remote_port))
            }
            PortState::Interdomain { remote: DOMID_HOST, .. } => {
                if !self.host_notifications.contains(&port) {
                    self.host_notifications.push_back(port);
                }
                Sent::Host
            }
            _ => Sent::Dropped,
        })
    }

    pub fn take_host_notifications(&mut self) -> Vec<u32> {
        self.host_notifications.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SI: u64 = 0x10000;

    fn setup() -> (GuestRam, EventChannels) {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut ev = EventChannels::new(1, 2);
        ev.set_shared_info(Some(SI));
        (ram, ev)
    }

    #[test]
    fn port_allocation_and_close() {
        let (ram, mut ev) = setup();
        let a = ev.alloc(PortState::Virq(VIRQ_TIMER), 0).unwrap();
        let b = ev.alloc(PortState::Ipi, 0).unwrap();
        assert_eq!((a, b), (1, 2));
        assert_eq!(ev.find_virq(VIRQ_TIMER, 0), Some(1));
        ev.raise(&ram, a);
        ev.close(&ram, a).unwrap();
        assert!(ev.get(a).is_none());
        assert_eq!(ev.alloc(PortState::Unbound { remote: 0 }, 0).unwrap(), 1);
        assert!(!ev.is_pending(&ram, 1), "a reused port starts with no event on it");
        assert_eq!(ev.host_ports(), vec![(1, PortState::Unbound { remote: 0 })]);
        assert_eq!(ev.close(&ram, 0), Err(EvtchnError::Invalid));
        assert_eq!(ev.close(&ram, 4095), Err(EvtchnError::Invalid));
    }

    #[test]
    fn runs_out_of_ports() {
        let mut ev = EventChannels::new(1, 1);
        for _ in 1..NR_PORTS {
            ev.alloc(PortState::Ipi, 0).unwrap();
        }
        assert_eq!(ev.alloc(PortState::Ipi, 0), Err(EvtchnError::NoSpace));
    }

    #[test]
    fn raise_sets_bits_of_the_ports_vcpu() {
        let (ram, mut ev) = setup();
        for _ in 0..70 {
            ev.alloc(PortState::Ipi, 1).unwrap();
        }
        let vi1 = SI + VCPU_INFO_SIZE; // vCPU 1's slot in shared_info
        assert_eq!(ev.raise(&ram, 70), Some(1));
        assert!(ev.is_pending(&ram, 70));
        assert_eq!(ram.slice(vi1 + VI_PENDING_SEL, 8).unwrap()[0], 0b10);
        assert!(ev.upcall_pending(&ram, 1));
        assert!(!ev.upcall_pending(&ram, 0));
        // Raising again is a no-op; a masked port stays quiet until unmasked.
        assert_eq!(ev.raise(&ram, 70), None);
        ram.slice_mut(vi1, 1).unwrap()[0] = 0;
        ram.slice_mut(vi1 + VI_PENDING_SEL, 8).unwrap().fill(0);
        ram.slice_mut(SI + SI_MASK, 8).unwrap()[0] = 1 << 3;
        assert_eq!(ev.raise(&ram, 3), Some(1), "pending even when masked (pollers look)");
        assert!(!ev.upcall_pending(&ram, 1));
        assert_eq!(ev.unmask(&ram, 3), Some(1));
        assert!(ev.upcall_pending(&ram, 1));
        assert_eq!(ev.unmask(&ram, 3), None, "already unmasked");
    }

    #[test]
    fn registered_vcpu_info_and_the_32_slot_limit() {
        let mut ev = EventChannels::new(1, 40);
        assert_eq!(ev.vcpu_info(0), None, "no shared_info yet");
        ev.set_shared_info(Some(SI));
        assert_eq!(ev.vcpu_info(31), Some(SI + 31 * 64));
        assert_eq!(ev.vcpu_info(32), None);
        ev.register_vcpu_info(32, 0x20040);
        assert_eq!(ev.vcpu_info(32), Some(0x20040));
        assert_eq!(ev.vcpu_info(40), None);
    }

    #[test]
    fn bits_are_set_atomically_against_a_concurrent_guest() {
        // Another thread plays a guest vCPU setting pending bits in the same
        // words with LOCK OR while the host raises the other ports: a
        // read-then-write on either side would lose bits.
        let (ram, mut ev) = setup();
        for _ in 1..NR_PORTS {
            ev.alloc(PortState::Ipi, 0).unwrap();
        }
        let ram = std::sync::Arc::new(ram);
        let guest = {
            let ram = ram.clone();
            std::thread::spawn(move || {
                for port in (0..NR_PORTS as u64).step_by(2) {
                    ram.atomic_u64(SI + SI_PENDING + (port / 64) * 8).unwrap().fetch_or(1 << (port % 64), SeqCst);
                }
            })
        };
        for port in (1..NR_PORTS).step_by(2) {
            assert_eq!(ev.raise(&ram, port), Some(0));
        }
        guest.join().unwrap();
        for w in 0..64 {
            assert_eq!(ram.atomic_u64(SI + SI_PENDING + w * 8).unwrap().load(SeqCst), u64::MAX, "word {w}");
        }
    }

    #[test]
    fn sends_go_local_to_the_host_or_nowhere() {
        let (ram, mut ev) = setup();
        let ipi = ev.alloc(PortState::Ipi, 1).unwrap();
        let host = ev.alloc(PortState::Interdomain { remote: DOMID_HOST, remote_port: 0 }, 0).unwrap();
        let unbound = ev.alloc(PortState::Unbound { remote: 5 }, 0).unwrap();
        assert_eq!(ev.guest_send(&ram, ipi), Ok(Sent::Local(Some(1))));
        assert_eq!(ev.guest_send(&ram, host), Ok(Sent::Host));
        assert_eq!(ev.guest_send(&ram, host), Ok(Sent::Host));
        assert_eq!(ev.take_host_notifications(), vec![host]);
        assert_eq!(ev.guest_send(&ram, unbound), Ok(Sent::Dropped));
        assert_eq!(ev.guest_send(&ram, 999), Err(EvtchnError::Invalid));
    }
}
