//! HYPERVISOR_hvm_op (hvm/hvm_op.h): HVM parameters and the per-vCPU upcall vector.

use super::{Call, HcResult};
use crate::abi::errno;
use crate::xen::hvm_param;

const SET_PARAM: u64 = 0;
const GET_PARAM: u64 = 1;
const SET_EVTCHN_UPCALL_VECTOR: u64 = 23;

/// Parameters a guest may set on itself; the rest belong to the toolstack.
fn guest_may_set(index: usize) -> bool {
    index == hvm_param::CALLBACK_IRQ
}

pub fn call(c: &mut Call, args: [u64; 5]) -> HcResult {
    let [op, arg, ..] = args;
    match op {
        SET_PARAM | GET_PARAM => {
            // struct xen_hvm_param { domid_t domid; uint32_t index; uint64_t value; }
            c.check_self(c.guest.read_u16(arg)?)?;
            let index = c.guest.read_u32(arg + 4)? as usize;
            if index >= hvm_param::NR {
                return Err(errno::EINVAL);
            }
            if op == GET_PARAM {
                let v = c.dom.hvm_params[index];
                c.guest.write(arg + 8, &v.to_le_bytes())?;
                return Ok(0);
            }
            if !guest_may_set(index) {
                return Err(errno::EPERM);
            }
            let v = c.guest.read_u64(arg + 8)?;
            if index == hvm_param::CALLBACK_IRQ {
                // Only "type 2: vector" callbacks exist for a PVH domain.
                let kind = v >> 56;
                if v != 0 && (kind != 2 || (v & 0xff) < 0x10) {
                    return Err(errno::EINVAL);
                }
            }
            c.dom.hvm_params[index] = v;
            if index == hvm_param::CALLBACK_IRQ {
                // One of the first calls of a PV-aware guest: where Xen
                // samples its mode for the shared_info layout.
                c.dom.latch_shinfo_width(c.width());
            }
            c.effects.recheck = true;
            Ok(0)
        }
        SET_EVTCHN_UPCALL_VECTOR => {
            // struct xen_hvm_evtchn_upcall_vector { uint32_t vcpu; uint8_t vector; }
            let vcpu = c.guest.read_u32(arg)?;
            let mut b = [0u8; 1];
            c.guest.read(arg + 4, &mut b)?;
            if b[0] < 0x10 {
                return Err(errno::EINVAL);
            }
            let x = c.vcpus.get_mut(vcpu as usize).ok_or(errno::ENOENT)?;
            x.upcall_vector = Some(b[0]);
            Ok(0)
        }
        _ => super::refusals::hvm_op(c, op, arg),
    }
}
