//! A domain: guest RAM, Xen's domain-wide state and the vCPUs, owned together.

use std::sync::Arc;

use crate::memory::GuestRam;
use crate::vcpu::{Vcpu, VcpuExit};
use crate::xen::XenState;

pub struct Domain {
    // Drop order: vCPUs (and their engines) before the state they point to.
    pub vcpus: Vec<Vcpu>,
    pub xen: Box<XenState>,
    pub ram: Arc<GuestRam>,
}

impl Domain {
    pub fn new(memory_bytes: u64, domid: u32, uuid: [u8; 16]) -> Result<Self, String> {
        let ram = Arc::new(GuestRam::new(memory_bytes).map_err(|e| e.to_string())?);
        let mut xen = Box::new(XenState::new(domid, uuid, ram.clone(), 1));
        let xen_ptr: *mut XenState = &mut *xen;
        let vcpu = Vcpu::new(0, ram.clone(), xen_ptr, domid)?;
        Ok(Self { vcpus: vec![vcpu], xen, ram })
    }

    pub fn run(&mut self) -> VcpuExit {
        self.vcpus[0].run()
    }
}
