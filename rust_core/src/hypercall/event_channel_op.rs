//! HYPERVISOR_event_channel_op (event_channel.h), both ABIs: the FIFO
//! operations (init_control, expand_array, set_priority) are in
//! xen/evtchn_fifo.rs, and pending/mask state goes through the ABI the guest
//! chose. Every operation takes the port lock (`DomainState::ports`) for its
//! length.

use super::{Call, HcResult, DOMID_SELF};
use crate::abi::errno;
use crate::xen::evtchn::{virq_is_per_vcpu, EvtchnError, PortState, Sent, NR_VIRQS};
use crate::xen::evtchn_fifo::FifoError;

const BIND_INTERDOMAIN: u64 = 0;
const BIND_VIRQ: u64 = 1;
const CLOSE: u64 = 3;
const SEND: u64 = 4;
const STATUS: u64 = 5;
const ALLOC_UNBOUND: u64 = 6;
const BIND_IPI: u64 = 7;
const BIND_VCPU: u64 = 8;
const UNMASK: u64 = 9;
const RESET: u64 = 10;
const INIT_CONTROL: u64 = 11;
const EXPAND_ARRAY: u64 = 12;
const SET_PRIORITY: u64 = 13;

// EVTCHNSTAT_*
const STAT_CLOSED: u32 = 0;
const STAT_UNBOUND: u32 = 1;
const STAT_INTERDOMAIN: u32 = 2;
const STAT_VIRQ: u32 = 4;
const STAT_IPI: u32 = 5;

fn map_err(e: EvtchnError) -> i64 {
    match e {
        EvtchnError::Invalid => errno::EINVAL,
        EvtchnError::NoSpace => errno::ENOSPC,
        EvtchnError::Busy => errno::EBUSY,
    }
}

fn fifo_err(e: FifoError) -> i64 {
    match e {
        FifoError::NoVcpu => errno::ENOENT,
        FifoError::Invalid | FifoError::NoPort => errno::EINVAL,
        FifoError::Misaligned => errno::ENXIO,
        FifoError::Full => errno::ENOSPC,
        FifoError::NotActive => errno::ENOSYS,
    }
}

pub fn call(c: &mut Call, args: [u64; 5]) -> HcResult {
    let [cmd, arg, ..] = args;
    let nr_vcpus = c.vcpus.len() as u32;
    match cmd {
        BIND_VIRQ => {
            // struct evtchn_bind_virq { uint32_t virq; uint32_t vcpu; evtchn_port_t port; }
            let virq = c.guest.read_u32(arg)?;
            let vcpu = c.guest.read_u32(arg + 4)?;
            if virq >= NR_VIRQS || (!virq_is_per_vcpu(virq) && vcpu != 0) {
                return Err(errno::EINVAL);
            }
            if vcpu >= nr_vcpus {
                return Err(errno::ENOENT);
            }
            let port = {
                let mut ev = c.dom.ports();
                if ev.find_virq(virq, vcpu).is_some() {
                    return Err(errno::EEXIST);
                }
                ev.alloc(PortState::Virq(virq), vcpu).map_err(map_err)?
            };
            c.guest.write_u32(arg + 8, port)?;
            Ok(0)
        }
        BIND_IPI => {
            // struct evtchn_bind_ipi { uint32_t vcpu; evtchn_port_t port; }
            let vcpu = c.guest.read_u32(arg)?;
            if vcpu >= nr_vcpus {
                return Err(errno::ENOENT);
            }
            let port = c.dom.ports().alloc(PortState::Ipi, vcpu).map_err(map_err)?;
            c.guest.write_u32(arg + 4, port)?;
            Ok(0)
        }
        ALLOC_UNBOUND => {
            // struct evtchn_alloc_unbound { domid_t dom, remote_dom; evtchn_port_t port; }
            c.check_self(c.guest.read_u16(arg)?)?;
            let mut remote = c.guest.read_u16(arg + 2)?;
            if remote == DOMID_SELF {
                remote = c.dom.domid as u16;
            }
            let port = c.dom.ports().alloc(PortState::Unbound { remote }, 0).map_err(map_err)?;
            c.guest.write_u32(arg + 4, port)?;
            Ok(0)
        }
        BIND_INTERDOMAIN => {
            // struct evtchn_bind_interdomain { domid_t remote_dom; evtchn_port_t remote_port; evtchn_port_t local_port; }
            let mut remote = c.guest.read_u16(arg)?;
            let remote_port = c.guest.read_u32(arg + 4)?;
            if remote == DOMID_SELF {
                remote = c.dom.domid as u16;
            }
            if remote as u32 != c.dom.domid {
                // Host-side ports are bound by the host, not by the guest.
                return Err(errno::EINVAL);
            }
            let local = {
                let mut ev = c.dom.ports();
                let peer = ev.get(remote_port).ok_or(errno::EINVAL)?;
                if peer.state != (PortState::Unbound { remote }) {
                    return Err(errno::EINVAL);
                }
                let local = ev.alloc(PortState::Interdomain { remote, remote_port }, 0).map_err(map_err)?;
                ev.set_state(remote_port, PortState::Interdomain { remote, remote_port: local }).map_err(map_err)?;
                local
            };
            c.guest.write_u32(arg + 8, local)?;
            Ok(0)
        }
        CLOSE => {
            let port = c.guest.read_u32(arg)?;
            c.dom.ports().close(&c.dom.ram, port).map_err(map_err)?;
            Ok(0)
        }
        SEND => {
            let port = c.guest.read_u32(arg)?;
            let sent = c.dom.ports().guest_send(&c.dom.ram, port).map_err(map_err)?;
            match sent {
                Sent::Local(target) => c.notified(target),
                Sent::Host => c.exit_with(crate::exit::ExitReason::Notify),
                Sent::Dropped => {}
            }
            Ok(0)
        }
        STATUS => {
            // struct evtchn_status { domid_t dom; evtchn_port_t port; uint32_t status; uint32_t vcpu; union {...} u; }
            c.check_self(c.guest.read_u16(arg)?)?;
            let port = c.guest.read_u32(arg + 4)?;
            let mut out = [0u8; 16];
            let (found, max_ports) = {
                let ev = c.dom.ports();
                (ev.get(port), ev.max_ports())
            };
            let (status, vcpu) = match found {
                None if port < max_ports => (STAT_CLOSED, 0),
                None => return Err(errno::EINVAL),
                Some(p) => {
                    let s = match p.state {
                        PortState::Unbound { remote } => {
                            out[8..10].copy_from_slice(&remote.to_le_bytes());
                            STAT_UNBOUND
                        }
                        PortState::Interdomain { remote, remote_port } => {
                            out[8..10].copy_from_slice(&remote.to_le_bytes());
                            out[12..16].copy_from_slice(&remote_port.to_le_bytes());
                            STAT_INTERDOMAIN
                        }
                        PortState::Virq(v) => {
                            out[8..12].copy_from_slice(&v.to_le_bytes());
                            STAT_VIRQ
                        }
                        PortState::Ipi => STAT_IPI,
                        PortState::Free => STAT_CLOSED,
                    };
                    (s, p.vcpu)
                }
            };
            out[0..4].copy_from_slice(&status.to_le_bytes());
            out[4..8].copy_from_slice(&vcpu.to_le_bytes());
            c.guest.write(arg + 8, &out)?;
            Ok(0)
        }
        BIND_VCPU => {
            // struct evtchn_bind_vcpu { evtchn_port_t port; uint32_t vcpu; }
            let port = c.guest.read_u32(arg)?;
            let vcpu = c.guest.read_u32(arg + 4)?;
            if vcpu >= nr_vcpus {
                return Err(errno::ENOENT);
            }
            let mut ev = c.dom.ports();
            let p = ev.get(port).ok_or(errno::EINVAL)?;
            match p.state {
                // Per-vCPU VIRQs and IPIs stay on the vCPU they were bound for.
                PortState::Virq(v) if virq_is_per_vcpu(v) => return Err(errno::EINVAL),
                PortState::Ipi => return Err(errno::EINVAL),
                _ => {}
            }
            ev.set_vcpu(port, vcpu).map_err(map_err)?;
            Ok(0)
        }
        UNMASK => {
            let port = c.guest.read_u32(arg)?;
            let target = {
                let mut ev = c.dom.ports();
                ev.get(port).ok_or(errno::EINVAL)?;
                ev.unmask(&c.dom.ram, port)
            };
            c.notified(target);
            Ok(0)
        }
        RESET => {
            // struct evtchn_reset { domid_t dom; }
            c.check_self(c.guest.read_u16(arg)?)?;
            c.dom.ports().reset(&c.dom.ram);
            Ok(0)
        }
        INIT_CONTROL => {
            // struct evtchn_init_control { uint64_t control_gfn; uint32_t offset;
            //   uint32_t vcpu; uint8_t link_bits (OUT); uint8_t _pad[7]; }
            let gfn = c.guest.read_u64(arg)?;
            let offset = c.guest.read_u32(arg + 8)?;
            let vcpu = c.guest.read_u32(arg + 12)?;
            let ram = c.dom.ram.clone();
            c.dom.ports().fifo_init_control(&ram, vcpu, gfn, offset).map_err(fifo_err)?;
            c.guest.write(arg + 16, &[crate::xen::evtchn_fifo::LINK_BITS as u8])?;
            Ok(0)
        }
        EXPAND_ARRAY => {
            // struct evtchn_expand_array { uint64_t array_gfn; }
            let gfn = c.guest.read_u64(arg)?;
            let woken = c.dom.ports().fifo_expand_array(&c.dom.ram, gfn).map_err(|e| match e {
                FifoError::NotActive => errno::EOPNOTSUPP,
                e => fifo_err(e),
            })?;
            for v in woken {
                c.notified(Some(v));
            }
            Ok(0)
        }
        SET_PRIORITY => {
            // struct evtchn_set_priority { evtchn_port_t port; uint32_t priority; }
            let port = c.guest.read_u32(arg)?;
            let priority = c.guest.read_u32(arg + 4)?;
            c.dom.ports().fifo_set_priority(port, priority).map_err(fifo_err)?;
            Ok(0)
        }
        _ => Err(errno::ENOSYS),
    }
}
