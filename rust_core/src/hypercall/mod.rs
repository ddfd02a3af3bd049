//! Hypercall dispatch: one module per hypercall family, one switch here.
//! Every call is counted and, when tracing is on, recorded with its
//! sub-operation, arguments and result. Python is not on this path: a call
//! that needs the outside world returns a `VcpuExit` with its result.

mod console_io;
mod event_channel_op;
mod grant_table_op;
mod hvm_op;
mod memory_op;
mod misc;
mod sched_op;
mod vcpu_op;
mod xen_version;

use std::collections::VecDeque;

use crate::abi::{errno, hc};
use crate::memory::GuestRam;
use crate::mmu::{self, PagingState};
use crate::vcpu::VcpuExit;
pub use crate::xen::XenState;

/// A hypercall result: `Ok` value for RAX, or a positive errno (RAX = -errno).
pub type HcResult = Result<i64, i64>;

/// DOMID_SELF (xen.h): "the calling domain" wherever a domid is asked for.
pub const DOMID_SELF: u16 = 0x7FF0;

impl Call<'_> {
    /// A domid argument must name the caller.
    pub fn check_self(&self, domid: u16) -> Result<(), i64> {
        if domid == DOMID_SELF || domid as u32 == self.xen.domid {
            Ok(())
        } else {
            Err(errno::ESRCH)
        }
    }

    /// Ask the run loop to return `exit` after this call.
    pub fn exit_with(&mut self, exit: VcpuExit) {
        self.exit = Some(exit);
    }
}

/// The guest as one hypercall sees it: its RAM through its current page tables.
pub struct Guest<'a> {
    pub ram: &'a GuestRam,
    pub paging: PagingState,
}

impl Guest<'_> {
    pub fn write_u32(&self, va: u64, v: u32) -> Result<(), i64> {
        self.write(va, &v.to_le_bytes())
    }

    pub fn read_u16(&self, va: u64) -> Result<u16, i64> {
        let mut b = [0u8; 2];
        self.read(va, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Copy from a guest-linear buffer; -EFAULT if any page is not mapped.
    pub fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), i64> {
        let mut m = self.ram;
        mmu::read_linear(&mut m, &self.paging, va, buf, false).map_err(|_| errno::EFAULT)
    }

    pub fn write(&self, va: u64, data: &[u8]) -> Result<(), i64> {
        let mut m = self.ram;
        mmu::write_linear(&mut m, &self.paging, va, data, false).map_err(|_| errno::EFAULT)
    }

    pub fn read_u32(&self, va: u64) -> Result<u32, i64> {
        let mut b = [0u8; 4];
        self.read(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn read_u64(&self, va: u64) -> Result<u64, i64> {
        let mut b = [0u8; 8];
        self.read(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEntry {
    pub vcpu: u32,
    pub nr: u64,
    pub args: [u64; 5],
    pub result: i64,
    /// Guest system time (ns since the domain started) at the call.
    pub time_ns: u64,
}

/// Counters and the trace of hypercalls.
pub struct HypercallLog {
    pub counts: [u64; hc::TABLE_SIZE],
    pub tracing: bool,
    trace: VecDeque<TraceEntry>,
    pub dropped: u64,
    /// The last calls, kept always for crash reports.
    recent: VecDeque<TraceEntry>,
}

const TRACE_CAP: usize = 1 << 16;
const RECENT_CAP: usize = 32;

impl Default for HypercallLog {
    fn default() -> Self {
        Self {
            counts: [0; hc::TABLE_SIZE],
            tracing: false,
            trace: VecDeque::new(),
            dropped: 0,
            recent: VecDeque::with_capacity(RECENT_CAP),
        }
    }
}

impl HypercallLog {
    pub fn record(&mut self, e: TraceEntry) {
        self.counts[(e.nr as usize).min(hc::TABLE_SIZE - 1)] += 1;
        if self.recent.len() == RECENT_CAP {
            self.recent.pop_front();
        }
        self.recent.push_back(e);
        if self.tracing {
            if self.trace.len() == TRACE_CAP {
                self.trace.pop_front();
                self.dropped += 1;
            }
            self.trace.push_back(e);
        }
    }

    pub fn take_trace(&mut self) -> Vec<TraceEntry> {
        self.trace.drain(..).collect()
    }

    pub fn recent(&self) -> Vec<TraceEntry> {
        self.recent.iter().copied().collect()
    }
}

/// What the vCPU does after a hypercall.
pub struct Outcome {
    pub rax: u64,
    pub exit: Option<VcpuExit>,
    pub refresh_areas: bool,
    pub remap: bool,
    pub recheck: bool,
}

/// Per-call context handed to each family's handler.
pub struct Call<'a> {
    pub guest: Guest<'a>,
    pub xen: &'a mut XenState,
    pub vcpu: u32,
    /// Set by a handler whose call must return to the host loop.
    pub exit: Option<VcpuExit>,
    /// The runstate/time areas changed: the vCPU writes them after the call.
    pub refresh_areas: bool,
    /// Pages were placed outside RAM: the vCPUs map them before going on.
    pub remap: bool,
    /// A timer changed or an event was raised for this vCPU: the run loop
    /// must look again (re-arm its ticker, deliver an interrupt) before the
    /// guest goes on.
    pub recheck: bool,
}

pub fn dispatch(
    ram: &GuestRam,
    paging: PagingState,
    xen: &mut XenState,
    vcpu: u32,
    cpl: u8,
    nr: u64,
    args: [u64; 5],
) -> Outcome {
    let mut call = Call { guest: Guest { ram, paging }, xen, vcpu, exit: None, refresh_areas: false, remap: false, recheck: false };
    let result: HcResult = if cpl != 0 {
        // Xen refuses hypercalls from HVM user mode.
        Err(errno::EPERM)
    } else {
        match nr {
            hc::XEN_VERSION => xen_version::call(&mut call, args),
            hc::CONSOLE_IO => console_io::call(&mut call, args),
            hc::SCHED_OP => sched_op::call(&mut call, args),
            hc::MEMORY_OP => memory_op::call(&mut call, args),
            hc::HVM_OP => hvm_op::call(&mut call, args),
            hc::VCPU_OP => vcpu_op::call(&mut call, args),
            hc::SET_TIMER_OP => vcpu_op::set_timer_op(&mut call, args),
            hc::EVENT_CHANNEL_OP => event_channel_op::call(&mut call, args),
            hc::GRANT_TABLE_OP => grant_table_op::call(&mut call, args),
            hc::VM_ASSIST => misc::vm_assist(&mut call, args),
            _ => Err(errno::ENOSYS),
        }
    };
    let ret = match result {
        Ok(v) => v,
        Err(e) => -e,
    };
    let time_ns = call.xen.system_time_ns();
    call.xen.log.record(TraceEntry { vcpu, nr, args, result: ret, time_ns });
    Outcome { rax: ret as u64, exit: call.exit, refresh_areas: call.refresh_areas, remap: call.remap, recheck: call.recheck }
}
