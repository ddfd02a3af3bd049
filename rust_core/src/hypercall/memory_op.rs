//! HYPERVISOR_memory_op (memory.h): the memory map, reservation queries, and
//! placing Xen's pages (shared_info, grant frames) at guest-chosen frames.

use super::{reservation, Call, HcResult};
use crate::abi::errno;
use crate::layout;
use crate::xen::Remap;

const MEMOP_CMD_MASK: u64 = 0x3f;
const MAXIMUM_RAM_PAGE: u64 = 2;
const CURRENT_RESERVATION: u64 = 3;
const MAXIMUM_RESERVATION: u64 = 4;
const ADD_TO_PHYSMAP: u64 = 7;
const MEMORY_MAP: u64 = 9;
const MAXIMUM_GPFN: u64 = 14;
const REMOVE_FROM_PHYSMAP: u64 = 15;

const SPACE_SHARED_INFO: u32 = 0;
const SPACE_GRANT_TABLE: u32 = 1;
/// XENMAPIDX_grant_table_status: the index names a v2 status frame.
const IDX_GRANT_STATUS: u64 = 1 << 31;
use crate::xen::gnttab::MAX_FRAMES as MAX_GRANT_FRAMES;

pub fn call(c: &mut Call, args: [u64; 5]) -> HcResult {
    let [cmd, arg, ..] = args;
    match cmd & MEMOP_CMD_MASK {
        MAXIMUM_RAM_PAGE => {
            let top = c.dom.ram.regions().iter().map(|r| r.gpa + r.len).max().unwrap_or(0);
            Ok((top >> 12) as i64 - 1)
        }
        // Counts take no start extent (only the long ops are continued).
        CURRENT_RESERVATION | MAXIMUM_RESERVATION | MAXIMUM_GPFN if cmd >> reservation::EXTENT_SHIFT != 0 => {
            Err(errno::EINVAL)
        }
        CURRENT_RESERVATION => {
            c.check_self(c.guest.read_u16(arg)?)?;
            Ok(c.dom.populated_pages() as i64)
        }
        MAXIMUM_RESERVATION => {
            c.check_self(c.guest.read_u16(arg)?)?;
            Ok(c.dom.max_pages as i64)
        }
        MAXIMUM_GPFN => {
            c.check_self(c.guest.read_u16(arg)?)?;
            Ok(reservation::maximum_gpfn(c) as i64)
        }
        op @ (reservation::INCREASE_RESERVATION | reservation::DECREASE_RESERVATION | reservation::POPULATE_PHYSMAP) => {
            reservation::adjust(c, op, cmd >> reservation::EXTENT_SHIFT, arg)
        }
        reservation::EXCHANGE => reservation::exchange(c, arg),
        MEMORY_MAP => {
            // struct xen_memory_map { unsigned int nr_entries; XEN_GUEST_HANDLE(void) buffer; }
            let nr = c.guest.read_u32(arg)? as usize;
            let buffer = c.guest.read_handle(arg + c.width().ulong())?;
            let n = nr.min(c.dom.memory_map.len());
            let mut bytes = Vec::with_capacity(n * 20);
            for &(addr, size, kind) in &c.dom.memory_map[..n] {
                // struct e820entry is packed: 20 bytes.
                bytes.extend_from_slice(&addr.to_le_bytes());
                bytes.extend_from_slice(&size.to_le_bytes());
                bytes.extend_from_slice(&kind.to_le_bytes());
            }
            c.guest.write(buffer, &bytes)?;
            c.guest.write_u32(arg, n as u32)?;
            Ok(0)
        }
        ADD_TO_PHYSMAP => add_to_physmap(c, arg),
        REMOVE_FROM_PHYSMAP => {
            // struct xen_remove_from_physmap { domid_t domid; xen_pfn_t gpfn; }
            c.check_self(c.guest.read_u16(arg)?)?;
            let gpa = c.guest.read_ulong(arg + c.width().ulong())? << 12;
            {
                let mut ev = c.dom.ports();
                if ev.shared_info() == Some(gpa) {
                    ev.set_shared_info(None);
                }
            }
            let mut gt = c.dom.grants();
            let gt = &mut *gt;
            for f in gt.frames.iter_mut().chain(gt.status_frames.iter_mut()) {
                if *f == Some(gpa) {
                    *f = None;
                }
            }
            Ok(0)
        }
        _ => super::refusals::memory_op(c, cmd, arg),
    }
}

fn add_to_physmap(c: &mut Call, arg: u64) -> HcResult {
    // struct xen_add_to_physmap { domid_t domid; uint16_t size; unsigned int space;
    //                             xen_ulong_t idx; xen_pfn_t gpfn; }
    c.check_self(c.guest.read_u16(arg)?)?;
    let space = c.guest.read_u32(arg + 4)?;
    let n = c.width().ulong();
    let idx = c.guest.read_ulong(arg + 8)?;
    let gpfn = c.guest.read_ulong(arg + 8 + n)?;
    if gpfn >= layout::P2M_PHYS_END >> layout::PAGE_SHIFT {
        // Beyond Xen's p2m: ept_set_entry refuses the frame with -EINVAL
        // (on AMD, p2m-pt's walk with -ENOENT), and nothing is placed.
        return Err(errno::EINVAL);
    }
    let gpa = gpfn << 12;
    if matches!(space, SPACE_SHARED_INFO | SPACE_GRANT_TABLE) && c.dom.ram.is_given_back(gpa) {
        // Xen's page replaces whatever the frame held, a given-back frame
        // too (Linux puts grant frames on ballooned pages): here Xen's
        // pages live in the guest's frame, so it is populated again.
        if let Some(host) = c.dom.ram.repopulate(gpa) {
            c.dom.pending_remaps.push(Remap::Ram { gpa, len: 4096, host: host as usize });
            c.effects.remap = true;
        }
    }
    match space {
        SPACE_SHARED_INFO => {
            // shared_info replaces a RAM frame the guest chose (Linux gives one).
            if idx != 0 || !c.dom.ram.is_ram(gpa, 4096) {
                return Err(errno::EINVAL);
            }
            c.dom.latch_shinfo_width(c.width());
            c.dom.place_shared_info(gpa);
            // Every vCPU's vcpu_info may have moved with it.
            c.effects.recheck = true;
            Ok(0)
        }
        SPACE_GRANT_TABLE => {
            let status = idx & IDX_GRANT_STATUS != 0;
            let idx = idx & !IDX_GRANT_STATUS;
            if status && c.dom.grants().version != 2 {
                return Err(errno::EINVAL);
            }
            if idx >= MAX_GRANT_FRAMES as u64 {
                return Err(errno::EINVAL);
            }
            // A RAM frame is used in place; a frame in the guest's unpopulated
            // space (Linux's usual choice) gets a host page mapped there.
            if !c.dom.ram.is_ram(gpa, 4096) && c.dom.ram.slice(gpa, 4096).is_err() {
                if (layout::MMIO_HOLE_START..layout::HIGH_RAM_START).contains(&gpa) {
                    return Err(errno::EINVAL);
                }
                let host = c.dom.ram.add_overlay(gpa).map_err(|_| errno::ENOMEM)?;
                c.dom.pending_remaps.push(Remap::Overlay { gpa, host: host as usize });
                c.effects.remap = true;
            }
            let i = idx as usize;
            let mut gt = c.dom.grants();
            let frames = if status { &mut gt.status_frames } else { &mut gt.frames };
            if frames.len() <= i {
                frames.resize(i + 1, None);
            }
            if frames[i].is_none() {
                // A fresh grant frame holds no grants.
                c.dom.ram.slice_mut(gpa, 4096).map_err(|_| errno::EINVAL)?.fill(0);
            }
            frames[i] = Some(gpa);
            Ok(0)
        }
        _ => Err(errno::EINVAL),
    }
}
