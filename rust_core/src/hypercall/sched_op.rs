//! HYPERVISOR_sched_op (sched.h): yield, block, shutdown, poll.

use super::{Call, HcResult};
use crate::abi::{errno, schedop};
use crate::exit::ExitReason;
use crate::vcpu::{xen_deadline, Activity};

pub fn call(c: &mut Call, args: [u64; 5]) -> HcResult {
    let [cmd, arg, ..] = args;
    match cmd {
        schedop::YIELD => {
            // Let the other vCPUs run before this one goes on.
            c.effects.woke_other = true;
            Ok(0)
        }
        schedop::BLOCK => {
            // Wait for an event: return at once if one is already waiting.
            if !c.dom.ports().upcall_pending(&c.dom.ram, c.vcpu) {
                c.me().activity = Activity::Blocked;
                c.effects.block = true;
            }
            Ok(0)
        }
        schedop::SHUTDOWN => {
            // struct sched_shutdown { unsigned int reason; }
            let reason = c.guest.read_u32(arg)?;
            if reason > schedop::SHUTDOWN_MAX {
                return Err(errno::EINVAL);
            }
            if reason == schedop::SHUTDOWN_SUSPEND {
                // The toolstack saves the domain now; its restore answers here.
                c.dom.suspended_vcpu = Some(c.vcpu);
            }
            c.exit_with(ExitReason::Shutdown { reason });
            Ok(0)
        }
        schedop::SHUTDOWN_CODE => {
            let reason = c.guest.read_u32(arg)?;
            c.dom.shutdown_code = Some(reason);
            Ok(0)
        }
        schedop::POLL => {
            // struct sched_poll { XEN_GUEST_HANDLE(evtchn_port_t) ports; unsigned int nr_ports; uint64_t timeout; }
            let w = c.width();
            let ports_va = c.guest.read_handle(arg)?;
            let nr_ports = c.guest.read_u32(arg + w.ulong())?;
            let timeout = c.guest.read_u64(arg + w.align(w.ulong() + 4, 8))?;
            if nr_ports > schedop::POLL_MAX_PORTS {
                return Err(errno::EINVAL);
            }
            let mut ports = Vec::with_capacity(nr_ports as usize);
            let max_ports = c.dom.ports().max_ports();
            for i in 0..nr_ports as u64 {
                let port = c.guest.read_u32(ports_va.wrapping_add(4 * i))?;
                if port >= max_ports {
                    return Err(errno::EINVAL);
                }
                ports.push(port);
            }
            let ev = c.dom.ports();
            let ready = ev.upcall_pending(&c.dom.ram, c.vcpu) || ports.iter().any(|&p| ev.is_pending(&c.dom.ram, p));
            drop(ev);
            if !ready {
                // Sleep until one of the ports is pending (masked or not),
                // an event upcall, or the timeout (absolute system time).
                let me = c.me();
                me.activity = Activity::Polling { ports };
                me.poll_deadline = (timeout != 0).then(|| xen_deadline(timeout));
                c.effects.block = true;
            }
            Ok(0)
        }
        schedop::REMOTE_SHUTDOWN | schedop::PIN_OVERRIDE => super::refusals::sched_op(c, cmd, arg),
        schedop::WATCHDOG => Err(errno::ENOSYS),
        _ => Err(errno::ENOSYS),
    }
}
