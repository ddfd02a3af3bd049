//! HYPERVISOR_grant_table_op (grant_table.h), the guest's side: sizes,
//! versions and status frames. Frames are placed with XENMEM_add_to_physmap
//! (memory_op.rs); the backend's side lives in xen/gnttab.rs.

use super::{Call, HcResult};
use crate::abi::errno;
use crate::xen::gnttab::MAX_FRAMES;

const QUERY_SIZE: u64 = 6;
const SET_VERSION: u64 = 8;
const GET_STATUS_FRAMES: u64 = 9;
const GET_VERSION: u64 = 10;

pub fn call(c: &mut Call, args: [u64; 5]) -> HcResult {
    let [cmd, uop, count, ..] = args;
    if let Some(e) = super::refusals::grant_table_op_filtered(cmd) {
        return Err(e);
    }
    if count != 1 {
        return Err(errno::EINVAL);
    }
    match cmd {
        QUERY_SIZE => {
            // struct gnttab_query_size { domid_t dom; uint32_t nr_frames; uint32_t max_nr_frames; int16_t status; }
            c.check_self(c.guest.read_u16(uop)?)?;
            let nr = c.dom.grants().frames.len() as u32;
            let mut out = [0u8; 10];
            out[0..4].copy_from_slice(&nr.max(1).to_le_bytes());
            out[4..8].copy_from_slice(&MAX_FRAMES.to_le_bytes());
            c.guest.write(uop + 4, &out)?;
            Ok(0)
        }
        SET_VERSION => {
            // struct gnttab_set_version { uint32_t version; }
            let v = c.guest.read_u32(uop)?;
            if v != 1 && v != 2 {
                return Err(errno::EINVAL);
            }
            let mut gt = c.dom.grants();
            if v != gt.version {
                // Xen refuses to switch while the backend holds grants.
                if gt.in_use() {
                    return Err(errno::EBUSY);
                }
                gt.version = v;
                gt.status_frames.clear();
            }
            Ok(0)
        }
        GET_VERSION => {
            // struct gnttab_get_version { domid_t dom; uint16_t pad; uint32_t version; }
            c.check_self(c.guest.read_u16(uop)?)?;
            let v = c.dom.grants().version;
            c.guest.write_u32(uop + 4, v)?;
            Ok(0)
        }
        GET_STATUS_FRAMES => {
            // struct gnttab_get_status_frames { uint32_t nr_frames; domid_t dom; int16_t status;
            //                                   XEN_GUEST_HANDLE(uint64_t) frame_list; }
            let nr = c.guest.read_u32(uop)?;
            c.check_self(c.guest.read_u16(uop + 4)?)?;
            let list = c.guest.read_handle(uop + 8)?;
            let (status, gfns) = {
                let gt = c.dom.grants();
                if gt.version != 2 || nr > gt.nr_status_frames() {
                    (-1i16, Vec::new())
                } else {
                    let gfns: Vec<u8> =
                        gt.status_frames.iter().take(nr as usize).flat_map(|f| (f.unwrap_or(0) >> 12).to_le_bytes()).collect();
                    (0, gfns)
                }
            };
            if status == 0 {
                c.guest.write(list, &gfns)?;
            }
            c.guest.write(uop + 6, &status.to_le_bytes())?;
            Ok(0)
        }
        _ => Err(errno::ENOSYS),
    }
}
