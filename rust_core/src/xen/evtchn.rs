//! Event channels, 2-level ABI (event_channel.h): the port table and the
//! pending/mask bitmaps in shared_info, the selector and upcall flag in
//! vcpu_info. FIFO is not offered (EVTCHNOP_init_control fails, and Linux
//! falls back to 2-level).
//!
//! Domain 0 is the host: ports whose remote end is domain 0 belong to device
//! models in Python. A guest send on one becomes a notification for the host;
//! the host raises the guest end with `raise`.

use crate::memory::GuestRam;

/// Ports a 64-bit guest can name under the 2-level ABI (64 words of 64 bits).
pub const NR_PORTS: u32 = 64 * 64;
pub const DOMID_HOST: u16 = 0;

// shared_info offsets (xen.h, x86-64 layout).
const SI_PENDING: u64 = 2048;
const SI_MASK: u64 = 2560;
// vcpu_info offsets.
pub const VI_UPCALL_PENDING: u64 = 0;
pub const VI_UPCALL_MASK: u64 = 1;
pub const VI_PENDING_SEL: u64 = 8;

pub const VIRQ_TIMER: u32 = 0;
pub const VIRQ_DEBUG: u32 = 1;
pub const VIRQ_CONSOLE: u32 = 2;
pub const NR_VIRQS: u32 = 24;
/// VIRQs bound per vCPU (the rest are global and live on vCPU 0).
pub fn virq_is_per_vcpu(virq: u32) -> bool {
    matches!(virq, 0 | 1 | 6 | 7 | 8 | 12)
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

#[derive(Debug)]
pub struct EventChannels {
    ports: Vec<Port>,
    domid: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvtchnError {
    Invalid,
    NoSpace,
    Busy,
}

impl EventChannels {
    pub fn new(domid: u16) -> Self {
        // Port 0 is never valid.
        Self { ports: vec![Port { state: PortState::Free, vcpu: 0 }; 1], domid }
    }

    pub fn domid(&self) -> u16 {
        self.domid
    }

    pub fn get(&self, port: u32) -> Option<Port> {
        self.ports.get(port as usize).copied().filter(|p| port != 0 && p.state != PortState::Free)
    }

    pub fn alloc(&mut self, state: PortState, vcpu: u32) -> Result<u32, EvtchnError> {
        let free = (1..self.ports.len()).find(|&i| self.ports[i].state == PortState::Free);
        let port = match free {
            Some(p) => p,
            None if (self.ports.len() as u32) < NR_PORTS => {
                self.ports.push(Port { state: PortState::Free, vcpu: 0 });
                self.ports.len() - 1
            }
            None => return Err(EvtchnError::NoSpace),
        };
        self.ports[port] = Port { state, vcpu };
        Ok(port as u32)
    }

    pub fn close(&mut self, port: u32) -> Result<PortState, EvtchnError> {
        let p = self.get(port).ok_or(EvtchnError::Invalid)?;
        // A loopback interdomain peer goes back to unbound.
        if let PortState::Interdomain { remote, remote_port } = p.state {
            if remote == self.domid && remote_port != port {
                if let Some(peer) = self.ports.get_mut(remote_port as usize) {
                    peer.state = PortState::Unbound { remote: self.domid };
                }
            }
        }
        self.ports[port as usize].state = PortState::Free;
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
}

/// Bitmap access to shared_info and vcpu_info in guest RAM. All of it is
/// bounds-checked by `GuestRam`; a shared_info that is not RAM simply does
/// nothing (the hypercall that placed it already refused that).
pub struct EventBits<'a> {
    pub ram: &'a GuestRam,
    pub shared_info: u64,
}

fn word_gpa(base: u64, port: u32) -> (u64, u64) {
    (base + (port as u64 / 64) * 8, 1u64 << (port % 64))
}

impl EventBits<'_> {
    fn read_u64(&self, gpa: u64) -> u64 {
        self.ram.slice(gpa, 8).map(|s| u64::from_le_bytes(s.try_into().unwrap())).unwrap_or(0)
    }
    fn write_u64(&self, gpa: u64, v: u64) {
        if let Ok(s) = self.ram.slice_mut(gpa, 8) {
            s.copy_from_slice(&v.to_le_bytes());
        }
    }

    pub fn is_pending(&self, port: u32) -> bool {
        let (gpa, bit) = word_gpa(self.shared_info + SI_PENDING, port);
        self.read_u64(gpa) & bit != 0
    }

    pub fn is_masked(&self, port: u32) -> bool {
        let (gpa, bit) = word_gpa(self.shared_info + SI_MASK, port);
        self.read_u64(gpa) & bit != 0
    }

    pub fn clear_mask(&self, port: u32) {
        let (gpa, bit) = word_gpa(self.shared_info + SI_MASK, port);
        self.write_u64(gpa, self.read_u64(gpa) & !bit);
    }

    pub fn clear_pending(&self, port: u32) {
        let (gpa, bit) = word_gpa(self.shared_info + SI_PENDING, port);
        self.write_u64(gpa, self.read_u64(gpa) & !bit);
    }

    /// Set the port pending; unless masked, flag its word in the vCPU's
    /// selector and set upcall_pending. Returns whether an upcall is now due.
    pub fn raise(&self, port: u32, vcpu_info: Option<u64>) -> bool {
        let (gpa, bit) = word_gpa(self.shared_info + SI_PENDING, port);
        let w = self.read_u64(gpa);
        if w & bit != 0 {
            return false;
        }
        self.write_u64(gpa, w | bit);
        if self.is_masked(port) {
            return false;
        }
        self.select(port, vcpu_info)
    }

    /// After an unmask: deliver what became visible.
    pub fn unmask(&self, port: u32, vcpu_info: Option<u64>) -> bool {
        self.clear_mask(port);
        self.is_pending(port) && self.select(port, vcpu_info)
    }

    fn select(&self, port: u32, vcpu_info: Option<u64>) -> bool {
        let Some(vi) = vcpu_info else { return false };
        let sel = self.read_u64(vi + VI_PENDING_SEL);
        let sbit = 1u64 << (port / 64);
        if sel & sbit == 0 {
            self.write_u64(vi + VI_PENDING_SEL, sel | sbit);
        }
        if let Ok(b) = self.ram.slice_mut(vi + VI_UPCALL_PENDING, 1) {
            b[0] = 1;
        }
        true
    }
}

pub fn upcall_pending(ram: &GuestRam, vcpu_info: u64) -> bool {
    ram.slice(vcpu_info + VI_UPCALL_PENDING, 1).map(|b| b[0] != 0).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_allocation_and_close() {
        let mut ev = EventChannels::new(1);
        let a = ev.alloc(PortState::Virq(VIRQ_TIMER), 0).unwrap();
        let b = ev.alloc(PortState::Ipi, 0).unwrap();
        assert_eq!((a, b), (1, 2));
        assert_eq!(ev.find_virq(VIRQ_TIMER, 0), Some(1));
        ev.close(a).unwrap();
        assert!(ev.get(a).is_none());
        assert_eq!(ev.alloc(PortState::Unbound { remote: 0 }, 0).unwrap(), 1);
        assert_eq!(ev.host_ports(), vec![(1, PortState::Unbound { remote: 0 })]);
        assert_eq!(ev.close(0), Err(EvtchnError::Invalid));
        assert_eq!(ev.close(4095), Err(EvtchnError::Invalid));
    }

    #[test]
    fn runs_out_of_ports() {
        let mut ev = EventChannels::new(1);
        for _ in 1..NR_PORTS {
            ev.alloc(PortState::Ipi, 0).unwrap();
        }
        assert_eq!(ev.alloc(PortState::Ipi, 0), Err(EvtchnError::NoSpace));
    }

    #[test]
    fn raise_sets_bits_in_guest_memory() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let bits = EventBits { ram: &ram, shared_info: 0x10000 };
        let vi = 0x10000; // vcpu_info[0] is at the start of shared_info
        assert!(bits.raise(70, Some(vi)));
        assert!(bits.is_pending(70));
        assert_eq!(ram.slice(vi + VI_PENDING_SEL, 8).unwrap()[0], 0b10);
        assert!(upcall_pending(&ram, vi));
        // Raising again is a no-op; a masked port stays quiet until unmasked.
        assert!(!bits.raise(70, Some(vi)));
        ram.slice_mut(vi, 1).unwrap()[0] = 0;
        ram.slice_mut(0x10000 + SI_MASK, 8).unwrap()[0] = 1 << 3;
        assert!(!bits.raise(3, Some(vi)));
        assert!(!upcall_pending(&ram, vi));
        assert!(bits.unmask(3, Some(vi)));
        assert!(upcall_pending(&ram, vi));
    }
}
