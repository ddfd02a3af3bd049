//! HYPERVISOR_grant_table_op (grant_table.h), the guest's side: sizes and
//! versions. Frames are placed with XENMEM_add_to_physmap (memory_op.rs).

use super::{Call, HcResult};
use crate::abi::errno;
use super::memory_op::MAX_GRANT_FRAMES;

const QUERY_SIZE: u64 = 6;
const SET_VERSION: u64 = 8;
const GET_VERSION: u64 = 10;

pub fn call(c: &mut Call, args: [u64; 5]) -> HcResult {
    let [cmd, uop, count, ..] = args;
    if count != 1 {
        return Err(errno::EINVAL);
    }
    match cmd {
        QUERY_SIZE => {
            // struct gnttab_query_size { domid_t dom; uint32_t nr_frames; uint32_t max_nr_frames; int16_t status; }
            c.check_self(c.guest.read_u16(uop)?)?;
            let nr = c.xen.grant_frames.iter().filter(|f| f.is_some()).count() as u32;
            let mut out = [0u8; 10];
            out[0..4].copy_from_slice(&nr.max(1).to_le_bytes());
            out[4..8].copy_from_slice(&MAX_GRANT_FRAMES.to_le_bytes());
            c.guest.write(uop + 4, &out)?;
            Ok(0)
        }
        SET_VERSION => {
            let v = c.guest.read_u32(uop)?;
            match v {
                1 => {
                    c.xen.grant_version = 1;
                    Ok(0)
                }
                2 => Err(errno::EOPNOTSUPP),
                _ => Err(errno::EINVAL),
            }
        }
        GET_VERSION => {
            // struct gnttab_get_version { domid_t dom; uint16_t pad; uint32_t version; }
            c.check_self(c.guest.read_u16(uop)?)?;
            let v = c.xen.grant_version;
            c.guest.write_u32(uop + 4, v)?;
            Ok(0)
        }
        _ => Err(errno::ENOSYS),
    }
}
