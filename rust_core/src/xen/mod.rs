//! Xen's domain-wide state: shared_info, per-vCPU Xen state (vcpu_info,
//! timers, upcall vector, runstate), event channels, HVM parameters, the
//! memory map, the hypervisor console and the hypercall log.

pub mod evtchn;
pub mod gnttab;
pub mod time;

use std::collections::VecDeque;
use std::sync::Arc;

use crate::hypercall::HypercallLog;
use crate::lapic::Lapic;
use crate::memory::GuestRam;
use evtchn::{EventBits, EventChannels, PortState, DOMID_HOST};
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

/// What the host's console output buffer may hold before old output is dropped.
pub const CONSOLE_OUT_CAP: usize = 16 << 20;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeriodicTimer {
    pub period_ns: u64,
    pub next_ns: u64,
}

/// RUNSTATE_* (vcpu.h).
pub const RUNSTATE_RUNNING: u32 = 0;
pub const RUNSTATE_BLOCKED: u32 = 2;

#[derive(Debug, Clone)]
pub struct VcpuXen {
    /// vcpu_info registered with VCPUOP_register_vcpu_info (guest-physical).
    pub vcpu_info: Option<u64>,
    /// HVMOP_set_evtchn_upcall_vector.
    pub upcall_vector: Option<u8>,
    pub singleshot_ns: Option<u64>,
    pub periodic: Option<PeriodicTimer>,
    /// Guest-virtual addresses given by VCPUOP_register_{runstate,vcpu_time}_memory_area.
    pub runstate_area: Option<u64>,
    pub time_area: Option<u64>,
    pub runstate: u32,
    pub runstate_entry_ns: u64,
    pub runstate_time: [u64; 4],
    pub lapic: Lapic,
    pub online: bool,
}

impl VcpuXen {
    pub fn new(id: u32) -> Self {
        Self {
            vcpu_info: None,
            upcall_vector: None,
            singleshot_ns: None,
            periodic: None,
            runstate_area: None,
            time_area: None,
            runstate: RUNSTATE_RUNNING,
            runstate_entry_ns: 0,
            runstate_time: [0; 4],
            lapic: Lapic::new(id),
            online: id == 0,
        }
    }

    /// struct vcpu_runstate_info { int state; uint64_t state_entry_time;
    /// uint64_t time[4]; } as of system time `now`.
    pub fn runstate_info(&self, now: u64) -> [u8; 48] {
        let mut time = self.runstate_time;
        time[self.runstate as usize] += now.saturating_sub(self.runstate_entry_ns);
        let mut b = [0u8; 48];
        b[0..4].copy_from_slice(&self.runstate.to_le_bytes());
        b[8..16].copy_from_slice(&self.runstate_entry_ns.to_le_bytes());
        for (i, t) in time.iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&t.to_le_bytes());
        }
        b
    }

    /// The earliest timer deadline of this vCPU.
    pub fn next_deadline(&self) -> Option<u64> {
        match (self.singleshot_ns, self.periodic.map(|p| p.next_ns)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

pub struct XenState {
    pub domid: u32,
    pub uuid: [u8; 16],
    pub ram: Arc<GuestRam>,
    pub clock: Clock,
    pub console_out: Vec<u8>,
    pub console_in: VecDeque<u8>,
    pub log: HypercallLog,
    pub shutdown_code: Option<u32>,
    pub shared_info: Option<u64>,
    pub vcpus: Vec<VcpuXen>,
    pub evtchn: EventChannels,
    pub hvm_params: [u64; hvm_param::NR],
    /// E820 map for XENMEM_memory_map: (addr, size, type).
    pub memory_map: Vec<(u64, u64, u32)>,
    /// Guest ports the guest has notified and the host has not collected.
    pub host_notifications: VecDeque<u32>,
    pub vm_assist: u64,
    pub gnttab: gnttab::GrantTable,
    /// Overlay pages (guest-physical, host address) the vCPUs must map.
    pub pending_maps: Vec<(u64, usize)>,
}

impl XenState {
    pub fn new(domid: u32, uuid: [u8; 16], ram: Arc<GuestRam>, nr_vcpus: u32) -> Self {
        Self {
            domid,
            uuid,
            ram,
            clock: Clock::new(),
            console_out: Vec::new(),
            console_in: VecDeque::new(),
            log: HypercallLog::default(),
            shutdown_code: None,
            shared_info: None,
            vcpus: (0..nr_vcpus).map(VcpuXen::new).collect(),
            evtchn: EventChannels::new(domid as u16),
            hvm_params: [0; hvm_param::NR],
            memory_map: Vec::new(),
            host_notifications: VecDeque::new(),
            vm_assist: 0,
            gnttab: gnttab::GrantTable::new(),
            pending_maps: Vec::new(),
        }
    }

    /// Xen system time in ns.
    pub fn system_time_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Where vCPU `v`'s vcpu_info lives: registered, or its slot in shared_info.
    pub fn vcpu_info_gpa(&self, v: u32) -> Option<u64> {
        let x = self.vcpus.get(v as usize)?;
        x.vcpu_info.or_else(|| self.shared_info.filter(|_| v < 32).map(|si| si + 64 * v as u64))
    }

    fn bits(&self) -> Option<EventBits<'_>> {
        self.shared_info.map(|si| EventBits { ram: &self.ram, shared_info: si })
    }

    /// Raise a local port (pending bit, selector, upcall flag).
    pub fn raise(&mut self, port: u32) -> bool {
        let Some(p) = self.evtchn.get(port) else { return false };
        let vi = self.vcpu_info_gpa(p.vcpu);
        self.bits().map(|b| b.raise(port, vi)).unwrap_or(false)
    }

    pub fn unmask(&mut self, port: u32) -> bool {
        let vcpu = self.evtchn.get(port).map(|p| p.vcpu).unwrap_or(0);
        let vi = self.vcpu_info_gpa(vcpu);
        self.bits().map(|b| b.unmask(port, vi)).unwrap_or(false)
    }

    pub fn is_pending(&self, port: u32) -> bool {
        self.bits().map(|b| b.is_pending(port)).unwrap_or(false)
    }

    /// EVTCHNOP_send from the guest. Returns true if the host must be told.
    pub fn guest_send(&mut self, port: u32) -> Result<bool, ()> {
        let p = self.evtchn.get(port).ok_or(())?;
        match p.state {
            PortState::Virq(_) | PortState::Ipi => {
                self.raise(port);
                Ok(false)
            }
            PortState::Interdomain { remote, remote_port } if remote as u32 == self.domid => {
                self.raise(remote_port);
                Ok(false)
            }
            PortState::Interdomain { remote: DOMID_HOST, .. } => {
                if !self.host_notifications.contains(&port) {
                    self.host_notifications.push_back(port);
                }
                Ok(true)
            }
            // Unbound, or bound to a domain that does not exist: dropped.
            _ => Ok(false),
        }
    }

    /// Raise VIRQ `virq` on vCPU `v`, if the guest bound it.
    pub fn raise_virq(&mut self, virq: u32, v: u32) -> bool {
        match self.evtchn.find_virq(virq, v) {
            Some(port) => self.raise(port),
            None => false,
        }
    }

    /// Fire vCPU `v`'s timers that are due at `now`.
    pub fn fire_timers(&mut self, v: u32, now: u64) {
        let Some(x) = self.vcpus.get_mut(v as usize) else { return };
        let mut fire = false;
        if let Some(d) = x.singleshot_ns {
            if d <= now {
                x.singleshot_ns = None;
                fire = true;
            }
        }
        if let Some(p) = x.periodic.as_mut() {
            if p.next_ns <= now {
                fire = true;
                let missed = (now - p.next_ns) / p.period_ns + 1;
                p.next_ns += missed * p.period_ns;
            }
        }
        if fire {
            self.raise_virq(evtchn::VIRQ_TIMER, v);
        }
    }

    /// Refresh the pvclock in vCPU `v`'s vcpu_info (version odd while writing).
    pub fn update_vcpu_time(&mut self, v: u32) -> Option<[u8; 32]> {
        let vi = self.vcpu_info_gpa(v)?;
        let body = self.clock.time_info();
        write_time_info(&self.ram, vi + 32, &body);
        Some(body)
    }

    /// Put shared_info at guest-physical `gpa` (a RAM page), with the wall clock.
    pub fn place_shared_info(&mut self, gpa: u64) -> bool {
        let Ok(page) = self.ram.slice_mut(gpa, 4096) else { return false };
        match self.shared_info {
            Some(old) if old != gpa => {
                // Move the live contents, as the page is Xen's, not the frame's.
                if let Ok(o) = self.ram.slice(old, 4096) {
                    let copy = o.to_vec();
                    page.copy_from_slice(&copy);
                }
            }
            Some(_) => {}
            None => {
                page.fill(0);
                // Every port masked until the guest unmasks it, as Xen starts them.
                page[2560..3072].fill(0xff);
            }
        }
        self.shared_info = Some(gpa);
        let wall = self.clock.boot_wall;
        let sec = wall.as_secs();
        let p = self.ram.slice_mut(gpa, 4096).expect("checked");
        let ver = u32::from_le_bytes(p[3072..3076].try_into().unwrap()).wrapping_add(1) | 1;
        p[3072..3076].copy_from_slice(&ver.to_le_bytes());
        p[3076..3080].copy_from_slice(&(sec as u32).to_le_bytes());
        p[3080..3084].copy_from_slice(&wall.subsec_nanos().to_le_bytes());
        p[3084..3088].copy_from_slice(&((sec >> 32) as u32).to_le_bytes());
        p[3072..3076].copy_from_slice(&ver.wrapping_add(1).to_le_bytes());
        for v in 0..self.vcpus.len() as u32 {
            self.update_vcpu_time(v);
        }
        true
    }

    pub fn console_write(&mut self, data: &[u8]) {
        if self.console_out.len() < CONSOLE_OUT_CAP {
            self.console_out.extend_from_slice(data);
        }
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
