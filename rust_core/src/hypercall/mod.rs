//! Hypercall dispatch: one module per hypercall family, one switch here.
//! Every call is counted and, when tracing is on, recorded with its
//! sub-operation, arguments and result. Python is not on this path: a call
//! that needs the outside world sets an exit in its `Effects`.

mod console_io;
mod event_channel_op;
mod grant_table_op;
mod hvm_op;
mod memory_op;
mod misc;
mod refusals;
mod reservation;
mod sched_op;
mod vcpu_op;
mod xen_version;

#[cfg(test)]
mod tests;

pub use vcpu_op::MAX_PERIOD_NS;

use crate::abi::{errno, hc, Width};
use crate::exit::ExitReason;
use crate::hypercall_log::TraceEntry;
use crate::memory::GuestRam;
use crate::mmu::{self, PagingState};
use crate::unicorn_gaps::CpuState;
use crate::vcpu::Vcpu;
use crate::xen::DomainState;

/// A hypercall result: `Ok` value for RAX, or a positive errno (RAX = -errno).
pub type HcResult = Result<i64, i64>;

/// DOMID_SELF (xen.h): "the calling domain" wherever a domid is asked for.
pub const DOMID_SELF: u16 = 0x7FF0;

/// The guest as one hypercall sees it: its RAM through the caller's page tables.
pub struct Guest<'a> {
    pub ram: &'a GuestRam,
    pub paging: PagingState,
    /// The ABI of this call: the layout of every structure it passes.
    pub width: Width,
}

impl Guest<'_> {
    /// A `xen_ulong_t` / `xen_pfn_t` (4 or 8 bytes by the call's ABI).
    pub fn read_ulong(&self, va: u64) -> Result<u64, i64> {
        match self.width {
            Width::Bits64 => self.read_u64(va),
            Width::Bits32 => self.read_u32(va).map(u64::from),
        }
    }

    /// A `xen_ulong_t` / `xen_pfn_t` out; -EINVAL if it does not fit 32 bits.
    pub fn write_ulong(&self, va: u64, v: u64) -> Result<(), i64> {
        match self.width {
            Width::Bits64 => self.write(va, &v.to_le_bytes()),
            Width::Bits32 => self.write_u32(va, u32::try_from(v).map_err(|_| errno::EINVAL)?),
        }
    }

    /// A `XEN_GUEST_HANDLE` field: a guest-linear pointer.
    pub fn read_handle(&self, va: u64) -> Result<u64, i64> {
        self.read_ulong(va)
    }

    /// Element `i` of an array of `xen_ulong_t`/`xen_pfn_t` at `base`.
    pub fn ulong_at(&self, base: u64, i: u64) -> u64 {
        base.wrapping_add(i.wrapping_mul(self.width.ulong()))
    }

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
        let va = self.linear(va, buf.len())?;
        let mut m = self.ram;
        mmu::read_linear(&mut m, &self.paging, va, buf, false).map_err(|_| errno::EFAULT)
    }

    pub fn write(&self, va: u64, data: &[u8]) -> Result<(), i64> {
        let va = self.linear(va, data.len())?;
        let mut m = self.ram;
        mmu::write_linear(&mut m, &self.paging, va, data, false).map_err(|_| errno::EFAULT)
    }

    /// A 32-bit caller's pointers are 32 bits: one that runs past 4 GiB
    /// would wrap on the CPU, and Xen's compat handles refuse it.
    fn linear(&self, va: u64, len: usize) -> Result<u64, i64> {
        match self.width {
            Width::Bits64 => Ok(va),
            Width::Bits32 if va.checked_add(len as u64).is_some_and(|end| end <= 1 << 32) => Ok(va),
            Width::Bits32 => Err(errno::EFAULT),
        }
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

/// What the vCPU loop must do after a call, besides going on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    /// Return this exit to the host.
    pub exit: Option<ExitReason>,
    /// The caller blocks or polls (its `Vcpu::activity` says which).
    pub block: bool,
    /// The caller's runstate/time areas changed: write them now.
    pub refresh_areas: bool,
    /// Pages were placed outside RAM: the engine maps them first.
    pub remap: bool,
    /// A timer changed or an event was raised for the caller: look again
    /// (re-arm the ticker, deliver an interrupt) before the guest goes on.
    pub recheck: bool,
    /// Another vCPU may have something to do now (an event, an IPI, it was
    /// brought up), or the caller yields: end the caller's slice.
    pub woke_other: bool,
    /// Continue the call (Xen's hypercall continuation): the guest executes
    /// the same hypercall again, these replacing its leading arguments.
    pub restart: Option<Vec<u64>>,
}

/// Per-call context handed to each family's handler.
pub struct Call<'a> {
    pub guest: Guest<'a>,
    pub dom: &'a mut DomainState,
    /// Every vCPU of the domain, the caller's included.
    pub vcpus: &'a mut Vec<Vcpu>,
    /// The power-on register state (for VCPUOP_initialise).
    pub pristine: &'a CpuState,
    /// The calling vCPU.
    pub vcpu: u32,
    pub cpl: u8,
    pub effects: Effects,
}

impl<'a> Call<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ram: &'a GuestRam,
        paging: PagingState,
        width: Width,
        dom: &'a mut DomainState,
        vcpus: &'a mut Vec<Vcpu>,
        pristine: &'a CpuState,
        vcpu: u32,
        cpl: u8,
    ) -> Self {
        Self { guest: Guest { ram, paging, width }, dom, vcpus, pristine, vcpu, cpl, effects: Effects::default() }
    }

    /// The ABI of this call.
    pub fn width(&self) -> Width {
        self.guest.width
    }

    /// The calling vCPU.
    pub fn me(&mut self) -> &mut Vcpu {
        &mut self.vcpus[self.vcpu as usize]
    }

    /// A domid argument must name the caller.
    pub fn check_self(&self, domid: u16) -> Result<(), i64> {
        if domid == DOMID_SELF || domid as u32 == self.dom.domid {
            Ok(())
        } else {
            Err(errno::ESRCH)
        }
    }

    /// Ask the run loop to return `exit` after this call.
    pub fn exit_with(&mut self, exit: ExitReason) {
        self.effects.exit = Some(exit);
    }

    /// An event became pending for vCPU `target` (from `EventChannels::raise`).
    pub fn notified(&mut self, target: Option<u32>) {
        match target {
            Some(v) if v == self.vcpu => self.effects.recheck = true,
            Some(_) => self.effects.woke_other = true,
            None => {}
        }
    }
}

/// Run one hypercall; returns RAX.
pub fn dispatch(c: &mut Call, nr: u64, args: [u64; 5]) -> u64 {
    let result: HcResult = if c.cpl != 0 {
        // Xen refuses hypercalls from HVM user mode.
        Err(errno::EPERM)
    } else {
        match nr {
            hc::XEN_VERSION => xen_version::call(c, args),
            hc::CONSOLE_IO => console_io::call(c, args),
            hc::SCHED_OP => sched_op::call(c, args),
            hc::MEMORY_OP => memory_op::call(c, args),
            hc::HVM_OP => hvm_op::call(c, args),
            hc::VCPU_OP => vcpu_op::call(c, args),
            hc::SET_TIMER_OP => vcpu_op::set_timer_op(c, args),
            hc::EVENT_CHANNEL_OP => event_channel_op::call(c, args),
            hc::GRANT_TABLE_OP => grant_table_op::call(c, args),
            hc::VM_ASSIST => misc::vm_assist(c, args),
            _ => refusals::call(c, nr, args),
        }
    };
    let ret = match result {
        Ok(v) => v,
        Err(e) => -e,
    };
    let time_ns = c.dom.system_time_ns();
    c.dom.log.record(TraceEntry { vcpu: c.vcpu, nr, args, result: ret, time_ns });
    ret as u64
}
