//! HYPERVISOR_sched_op (sched.h): yield, block, shutdown, poll.

use super::{Call, HcResult};
use crate::abi::{errno, schedop, EVTCHN_2L_NR_CHANNELS};
use crate::vcpu::VcpuExit;

pub fn call(c: &mut Call, args: [u64; 5]) -> HcResult {
    let [cmd, arg, ..] = args;
    match cmd {
        schedop::YIELD => Ok(0),
        schedop::BLOCK => {
            // Wait for an event: return at once if one is already waiting.
            if !super::vcpu_op::upcall_waiting(c, c.vcpu) {
                let deadline_ns = c.xen.vcpus[c.vcpu as usize].next_deadline();
                c.exit = Some(VcpuExit::Idle { deadline_ns });
            }
            Ok(0)
        }
        schedop::SHUTDOWN => {
            // struct sched_shutdown { unsigned int reason; }
            let reason = c.guest.read_u32(arg)?;
            if reason > schedop::SHUTDOWN_MAX {
                return Err(errno::EINVAL);
            }
            c.exit = Some(VcpuExit::Shutdown { reason });
            Ok(0)
        }
        schedop::SHUTDOWN_CODE => {
            let reason = c.guest.read_u32(arg)?;
            c.xen.shutdown_code = Some(reason);
            Ok(0)
        }
        schedop::POLL => {
            // struct sched_poll { evtchn_port_t *ports; unsigned int nr_ports; uint64_t timeout; }
            let ports = c.guest.read_u64(arg)?;
            let nr_ports = c.guest.read_u32(arg + 8)?;
            let timeout = c.guest.read_u64(arg + 16)?;
            if nr_ports > schedop::POLL_MAX_PORTS {
                return Err(errno::EINVAL);
            }
            let mut any_pending = false;
            for i in 0..nr_ports as u64 {
                let port = c.guest.read_u32(ports.wrapping_add(4 * i))?;
                if port >= EVTCHN_2L_NR_CHANNELS {
                    return Err(errno::EINVAL);
                }
                any_pending |= c.xen.is_pending(port);
            }
            if !any_pending {
                // Sleep until an event, the timeout or the vCPU's timer.
                let timer = c.xen.vcpus[c.vcpu as usize].next_deadline();
                let deadline_ns = match ((timeout != 0).then_some(timeout), timer) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                c.exit = Some(VcpuExit::Idle { deadline_ns });
            }
            Ok(0)
        }
        schedop::REMOTE_SHUTDOWN | schedop::PIN_OVERRIDE => Err(errno::EPERM),
        schedop::WATCHDOG => Err(errno::ENOSYS),
        _ => Err(errno::ENOSYS),
    }
}
