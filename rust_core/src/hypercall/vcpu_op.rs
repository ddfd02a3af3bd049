//! HYPERVISOR_vcpu_op (vcpu.h) and set_timer_op: vcpu_info placement, the
//! runstate and time areas, one-shot and periodic timers.

use super::{Call, HcResult};
use crate::abi::errno;
use crate::xen::evtchn::VI_UPCALL_PENDING;
use crate::xen::PeriodicTimer;

const UP: u64 = 1;
const IS_UP: u64 = 3;
const GET_RUNSTATE_INFO: u64 = 4;
const REGISTER_RUNSTATE_MEMORY_AREA: u64 = 5;
const SET_PERIODIC_TIMER: u64 = 6;
const STOP_PERIODIC_TIMER: u64 = 7;
const SET_SINGLESHOT_TIMER: u64 = 8;
const STOP_SINGLESHOT_TIMER: u64 = 9;
const REGISTER_VCPU_INFO: u64 = 10;
const REGISTER_VCPU_TIME_MEMORY_AREA: u64 = 13;
const INITIALISE: u64 = 0;

/// VCPU_SSHOTTMR_future: fail with -ETIME if the deadline has passed.
const SSHOTTMR_FUTURE: u32 = 1;
const MIN_PERIOD_NS: u64 = 1_000_000;

pub fn call(c: &mut Call, args: [u64; 5]) -> HcResult {
    let [cmd, vcpuid, arg, ..] = args;
    let v = vcpuid as u32;
    if v as usize >= c.xen.vcpus.len() || vcpuid > u32::MAX as u64 {
        return Err(errno::ENOENT);
    }
    let own = v == c.vcpu;
    match cmd {
        IS_UP => Ok(c.xen.vcpus[v as usize].online as i64),
        // Secondary vCPU bring-up arrives with SMP.
        INITIALISE | UP => Err(if c.xen.vcpus[v as usize].online { errno::EINVAL } else { errno::ENOSYS }),
        REGISTER_VCPU_INFO => {
            // struct vcpu_register_vcpu_info { uint64_t mfn; uint32_t offset; uint32_t rsvd; }
            let mfn = c.guest.read_u64(arg)?;
            let offset = c.guest.read_u32(arg + 8)? as u64;
            if offset + 64 > 4096 || c.xen.vcpus[v as usize].vcpu_info.is_some() {
                return Err(errno::EINVAL);
            }
            let gpa = mfn.checked_mul(4096).ok_or(errno::EINVAL)? + offset;
            let Ok(dst) = c.xen.ram.slice_mut(gpa, 64) else { return Err(errno::EINVAL) };
            // Carry over what the old location held (pending flags, time).
            let old = c.xen.vcpu_info_gpa(v).and_then(|o| c.xen.ram.slice(o, 64).ok().map(|s| s.to_vec()));
            match old {
                Some(o) => dst.copy_from_slice(&o),
                None => dst.fill(0),
            }
            c.xen.vcpus[v as usize].vcpu_info = Some(gpa);
            c.xen.update_vcpu_time(v);
            Ok(0)
        }
        REGISTER_RUNSTATE_MEMORY_AREA | REGISTER_VCPU_TIME_MEMORY_AREA => {
            let addr = c.guest.read_u64(arg)?;
            let x = &mut c.xen.vcpus[v as usize];
            let area = if cmd == REGISTER_RUNSTATE_MEMORY_AREA { &mut x.runstate_area } else { &mut x.time_area };
            *area = (addr != 0).then_some(addr);
            // The vCPU loop writes the areas from the guest's own page tables.
            c.refresh_areas = true;
            Ok(0)
        }
        GET_RUNSTATE_INFO => {
            let info = c.xen.vcpus[v as usize].runstate_info(c.xen.system_time_ns());
            c.guest.write(arg, &info)?;
            Ok(0)
        }
        SET_SINGLESHOT_TIMER => {
            if !own {
                return Err(errno::EINVAL);
            }
            // struct vcpu_set_singleshot_timer { uint64_t timeout_abs_ns; uint32_t flags; }
            let deadline = c.guest.read_u64(arg)?;
            let flags = c.guest.read_u32(arg + 8)?;
            if flags & SSHOTTMR_FUTURE != 0 && deadline < c.xen.system_time_ns() {
                return Err(errno::ETIME);
            }
            c.xen.vcpus[v as usize].singleshot_ns = Some(deadline);
            c.recheck = true;
            Ok(0)
        }
        STOP_SINGLESHOT_TIMER => {
            if !own {
                return Err(errno::EINVAL);
            }
            c.xen.vcpus[v as usize].singleshot_ns = None;
            Ok(0)
        }
        SET_PERIODIC_TIMER => {
            let period_ns = c.guest.read_u64(arg)?;
            if period_ns < MIN_PERIOD_NS {
                return Err(errno::EINVAL);
            }
            let next_ns = c.xen.system_time_ns() + period_ns;
            c.xen.vcpus[v as usize].periodic = Some(PeriodicTimer { period_ns, next_ns });
            c.recheck = true;
            Ok(0)
        }
        STOP_PERIODIC_TIMER => {
            c.xen.vcpus[v as usize].periodic = None;
            Ok(0)
        }
        _ => Err(errno::ENOSYS),
    }
}

/// set_timer_op(timeout): a one-shot timer at absolute system time; 0 stops it.
pub fn set_timer_op(c: &mut Call, args: [u64; 5]) -> HcResult {
    let x = &mut c.xen.vcpus[c.vcpu as usize];
    x.singleshot_ns = (args[0] != 0).then_some(args[0]);
    c.recheck = true;
    Ok(0)
}

/// Whether vCPU `v` has an event upcall waiting (for block and poll).
pub fn upcall_waiting(c: &Call, v: u32) -> bool {
    c.xen
        .vcpu_info_gpa(v)
        .and_then(|vi| c.xen.ram.slice(vi + VI_UPCALL_PENDING, 1).ok())
        .map(|b| b[0] != 0)
        .unwrap_or(false)
}
