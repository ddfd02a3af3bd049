//! XENMEM reservation ops (memory.h): a guest gives RAM pages back
//! (decrease_reservation), takes them again (populate_physmap,
//! increase_reservation) or trades them (exchange). This is what Linux's
//! balloon driver calls; Xen's common/memory.c is the model for the checks,
//! the errnos and the partial results.
//!
//! Pages given back are released to the host at once (`GuestRam::give_back`:
//! RSS falls) and are no frame of the domain until populated again: every
//! hypercall, grant and page walk that names one fails, and the engine maps
//! an all-ones, write-ignoring hole there, which is what an HVM guest meets
//! at an empty p2m entry on Xen. Populating maps the host pages back, zeroed.
//!
//! Results are counts of extents done, as Xen's: a bad argument, another
//! domain or a failing extent ends the call with what was done so far (0
//! if nothing). Long calls are continued as Xen does: the done count goes
//! into the command's high bits and the guest re-executes the hypercall.

use super::{Call, Guest, HcResult};
use crate::abi::{errno, Width};
use crate::layout::{self, PAGE_SIZE};
use crate::xen::Remap;

pub const INCREASE_RESERVATION: u64 = 0;
pub const DECREASE_RESERVATION: u64 = 1;
pub const POPULATE_PHYSMAP: u64 = 6;
pub const EXCHANGE: u64 = 11;

/// The start extent of a continued call lives above the command (MEMOP_EXTENT_SHIFT).
pub const EXTENT_SHIFT: u32 = 6;
/// Largest extent order a domU may use (Xen's default `domu_max_order`).
pub const DOMU_MAX_ORDER: u32 = 9;
/// Extents done before the call is continued (Xen checks for preemption
/// between extents; a fixed budget keeps the run loop responsive).
const EXTENTS_PER_CALL: u64 = 4096;
/// XENMEMF_address_bits: the low byte of mem_flags.
const ADDRESS_BITS_MASK: u32 = 0xff;
/// XENMEMF_exact_node_request: only the hardware domain may insist on a
/// NUMA node (Xen's propagate_node).
const EXACT_NODE_REQUEST: u32 = 1 << 17;

/// struct xen_memory_reservation { XEN_GUEST_HANDLE(xen_pfn_t) extent_start;
/// xen_ulong_t nr_extents; unsigned int extent_order; unsigned int mem_flags;
/// domid_t domid; }
#[derive(Debug, Clone, Copy)]
pub struct Reservation {
    pub extent_start: u64,
    pub nr_extents: u64,
    pub extent_order: u32,
    pub mem_flags: u32,
    pub domid: u16,
}

impl Reservation {
    pub fn size(w: Width) -> u64 {
        w.align(2 * w.ulong() + 10, w.ulong())
    }

    pub fn read(g: &Guest, at: u64) -> Result<Self, i64> {
        let n = g.width.ulong();
        Ok(Self {
            extent_start: g.read_handle(at)?,
            nr_extents: g.read_ulong(at + n)?,
            extent_order: g.read_u32(at + 2 * n)?,
            mem_flags: g.read_u32(at + 2 * n + 4)?,
            domid: g.read_u16(at + 2 * n + 8)?,
        })
    }

    fn extent(&self, g: &Guest, i: u64) -> Option<u64> {
        g.read_ulong(g.ulong_at(self.extent_start, i)).ok()
    }
}

/// increase_reservation, decrease_reservation, populate_physmap.
pub fn adjust(c: &mut Call, op: u64, start: u64, arg: u64) -> HcResult {
    let done = start as i64;
    let Ok(r) = Reservation::read(&c.guest, arg) else { return Ok(done) };
    if r.nr_extents > u64::from(u32::MAX >> EXTENT_SHIFT) || start >= r.nr_extents {
        return Ok(done);
    }
    let address_bits = r.mem_flags & ADDRESS_BITS_MASK;
    if op != DECREASE_RESERVATION && address_bits != 0 && address_bits <= 12 {
        return Ok(done);
    }
    if c.check_self(r.domid).is_err() || r.mem_flags & EXACT_NODE_REQUEST != 0 {
        return Ok(done);
    }
    if r.extent_order > DOMU_MAX_ORDER {
        return Ok(done);
    }
    let end = r.nr_extents.min(start + EXTENTS_PER_CALL);
    let mut i = start;
    while i < end {
        let ok = match op {
            DECREASE_RESERVATION => r.extent(&c.guest, i).is_some_and(|gfn| give_back(c, gfn, r.extent_order)),
            POPULATE_PHYSMAP => r.extent(&c.guest, i).is_some_and(|gfn| populate(c, gfn, r.extent_order)),
            // An auto-translated guest's increase_reservation allocates
            // pages but maps them nowhere (Xen tells only a PV guest their
            // frames): they only count.
            _ => {
                let fits = c.dom.populated_pages() + (1 << r.extent_order) <= c.dom.max_pages;
                if fits {
                    c.dom.unmapped_pages += 1 << r.extent_order;
                }
                fits
            }
        };
        if !ok {
            break;
        }
        i += 1;
    }
    if i == end && end < r.nr_extents {
        c.effects.restart = Some(vec![(op & ((1 << EXTENT_SHIFT) - 1)) | end << EXTENT_SHIFT]);
    }
    Ok(i as i64)
}

/// Whether the guest frame `gfn` may be given back: populated RAM that is
/// not one of Xen's pages in the guest's frames.
fn removable(c: &Call, gpa: u64) -> bool {
    if !c.dom.ram.is_ram(gpa, PAGE_SIZE) {
        return c.dom.extra_frames.contains(&gpa);
    }
    if c.dom.ports().shared_info() == Some(gpa) {
        return false;
    }
    let gt = c.dom.grants();
    !gt.frames.iter().chain(gt.status_frames.iter()).any(|f| *f == Some(gpa))
}

fn extent_range(gfn: u64, order: u32) -> Option<(u64, u64)> {
    let pages = 1u64 << order;
    let gpa = gfn.checked_mul(PAGE_SIZE)?;
    gpa.checked_add(pages * PAGE_SIZE)?;
    Some((gpa, pages))
}

/// Give back one extent; each page must be populated (Xen stops at the
/// first that is not, having removed the pages before it).
fn give_back(c: &mut Call, gfn: u64, order: u32) -> bool {
    let Some((gpa, pages)) = extent_range(gfn, order) else { return false };
    for p in 0..pages {
        let page = gpa + p * PAGE_SIZE;
        if !removable(c, page) {
            return false;
        }
        if c.dom.extra_frames.remove(&page) {
            c.dom.ram.retire_overlay(page);
        } else {
            c.dom.ram.give_back(page);
        }
        c.dom.pending_remaps.push(Remap::Hole { gpa: page, len: PAGE_SIZE });
        c.effects.remap = true;
    }
    true
}

/// Populate one extent (naturally aligned) within the domain's limit. A
/// page that is already populated gets a fresh one, as on Xen (which also
/// counts it again: it does not here, the old page is gone).
fn populate(c: &mut Call, gfn: u64, order: u32) -> bool {
    let Some((gpa, pages)) = extent_range(gfn, order) else { return false };
    if gfn & (pages - 1) != 0 {
        return false;
    }
    let frame = |p: u64| gpa + p * PAGE_SIZE;
    // Frames the domain has no page at: given back, or never had (above
    // its RAM, outside the MMIO hole, up to what the engine maps).
    let beyond_ram = |c: &Call, page: u64| {
        !c.dom.ram.is_ram(page, PAGE_SIZE)
            && !c.dom.ram.is_given_back(page)
            && !c.dom.extra_frames.contains(&page)
            && !(layout::MMIO_HOLE_START..layout::HIGH_RAM_START).contains(&page)
            && page < layout::GUEST_PHYS_END
            && c.dom.ram.slice(page, PAGE_SIZE).is_err()
    };
    let new_pages = (0..pages).filter(|&p| c.dom.ram.is_given_back(frame(p)) || beyond_ram(c, frame(p))).count() as u64;
    let usable = (0..pages).all(|p| {
        let page = frame(p);
        c.dom.ram.is_given_back(page) || removable(c, page) || beyond_ram(c, page)
    });
    if !usable || c.dom.populated_pages() + new_pages > c.dom.max_pages {
        return false;
    }
    for p in 0..pages {
        let page = frame(p);
        if beyond_ram(c, page) {
            // A host page of its own (Xen's p2m grows to take it).
            let Ok(host) = c.dom.ram.add_overlay(page) else { return false };
            c.dom.extra_frames.insert(page);
            c.dom.pending_remaps.push(Remap::Overlay { gpa: page, host: host as usize });
            c.effects.remap = true;
            continue;
        }
        match c.dom.ram.repopulate(page) {
            Some(host) => {
                c.dom.pending_remaps.push(Remap::Ram { gpa: page, len: PAGE_SIZE, host: host as usize });
                c.effects.remap = true;
            }
            // Already populated: a fresh page in its place.
            None => {
                if let Ok(s) = c.dom.ram.slice_mut(page, PAGE_SIZE) {
                    s.fill(0);
                }
            }
        }
    }
    true
}

/// struct xen_memory_exchange { struct xen_memory_reservation in, out;
/// xen_ulong_t nr_exchanged; }: give back `in`'s extents and populate
/// `out`'s, chunk by chunk, with the count of input extents done written back.
pub fn exchange(c: &mut Call, arg: u64) -> HcResult {
    let w = c.width();
    let size = Reservation::size(w);
    let input = Reservation::read(&c.guest, arg)?;
    let output = Reservation::read(&c.guest, arg + size)?;
    let nr_at = arg + 2 * size;
    let exchanged = c.guest.read_ulong(nr_at)?;
    if input.extent_order.max(output.extent_order) > DOMU_MAX_ORDER {
        return Err(errno::EPERM);
    }
    let bits = w.ulong() * 8;
    let fits = |n: u64, order: u32| n <= (u64::MAX >> (64 - bits)) >> order;
    if exchanged > input.nr_extents
        || input.domid != output.domid
        || !fits(input.nr_extents, input.extent_order)
        || !fits(output.nr_extents, output.extent_order)
        || input.nr_extents << input.extent_order != output.nr_extents << output.extent_order
    {
        return Err(errno::EINVAL);
    }
    if exchanged == input.nr_extents {
        return Ok(0);
    }
    c.check_self(input.domid)?;
    // A chunk is the larger extent: 2^in_chunk input extents for one output
    // extent, or one input extent for 2^out_chunk output extents.
    let (in_chunk, out_chunk) = if input.extent_order <= output.extent_order {
        (output.extent_order - input.extent_order, 0)
    } else {
        (0, input.extent_order - output.extent_order)
    };
    let chunks = input.nr_extents >> in_chunk;
    let mut rc = Ok(0);
    let mut chunk = exchanged >> in_chunk;
    while chunk < chunks {
        let ins: Option<Vec<u64>> = (0..1u64 << in_chunk).map(|k| input.extent(&c.guest, (chunk << in_chunk) + k)).collect();
        let outs: Option<Vec<u64>> = (0..1u64 << out_chunk).map(|k| output.extent(&c.guest, (chunk << out_chunk) + k)).collect();
        let (Some(ins), Some(outs)) = (ins, outs) else {
            rc = Err(errno::EFAULT);
            break;
        };
        // Every input page must be there before any is taken (Xen steals
        // the whole chunk first and puts it back on failure).
        let all_in = ins.iter().all(|&gfn| {
            extent_range(gfn, input.extent_order)
                .is_some_and(|(gpa, pages)| (0..pages).all(|p| removable(c, gpa + p * PAGE_SIZE)))
        });
        let outs_ok = outs.iter().all(|&gfn| {
            extent_range(gfn, output.extent_order).is_some_and(|(gpa, pages)| {
                gfn & (pages - 1) == 0
                    && (0..pages).all(|p| {
                        let page = gpa + p * PAGE_SIZE;
                        c.dom.ram.is_given_back(page) || c.dom.ram.is_ram(page, PAGE_SIZE)
                    })
            })
        });
        if !all_in || !outs_ok {
            rc = Err(errno::EINVAL);
            break;
        }
        for &gfn in &ins {
            give_back(c, gfn, input.extent_order);
        }
        for &gfn in &outs {
            populate(c, gfn, output.extent_order);
        }
        chunk += 1;
    }
    let done = if rc.is_ok() { input.nr_extents } else { chunk << in_chunk };
    c.guest.write_ulong(nr_at, done)?;
    rc
}

/// XENMEM_maximum_gpfn: the highest frame the guest's physical map holds
/// (RAM, or one of Xen's pages placed above it).
pub fn maximum_gpfn(c: &Call) -> u64 {
    let ram_top = c.dom.ram.regions().iter().map(|r| r.gpa + r.len).max().unwrap_or(PAGE_SIZE);
    let shared = c.dom.ports().shared_info().map(|g| g + PAGE_SIZE);
    let extra = c.dom.extra_frames.last().map(|g| g + PAGE_SIZE);
    let gt = c.dom.grants();
    let placed = gt.frames.iter().chain(gt.status_frames.iter()).flatten().map(|g| g + PAGE_SIZE);
    (placed.chain(shared).chain(extra).fold(ram_top, u64::max) >> 12) - 1
}
