//! Guest RAM: one anonymous host mapping, owned here, mapped into Unicorn and
//! shown to Python zero-copy. Guest-physical layout: RAM from 0 up to the
//! MMIO hole, the rest above 4 GiB (`layout`).
//!
//! Every access from the host side goes through `slice`/`slice_mut`, which
//! bound-check the guest-physical range: the guest is untrusted.

use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8};

use crate::layout;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    #[error("guest-physical range {gpa:#x}+{len:#x} is not RAM")]
    OutOfRange { gpa: u64, len: u64 },
    #[error("cannot allocate {0} bytes of guest RAM")]
    Alloc(u64),
    #[error("guest-physical address {0:#x} is not naturally aligned for an atomic access")]
    Misaligned(u64),
}

/// One contiguous piece of guest-physical RAM and where it sits in the host buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    pub gpa: u64,
    pub len: u64,
    pub host_offset: u64,
}

/// Read and write guest-physical memory. Implemented by `GuestRam` and by
/// plain vectors in tests, so the page walk is testable without Unicorn.
pub trait PhysMem {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;
    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError>;

    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read_phys(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn write_u64(&mut self, gpa: u64, v: u64) -> Result<(), MemError> {
        self.write_phys(gpa, &v.to_le_bytes())
    }
    fn read_u32(&self, gpa: u64) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read_phys(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn write_u32(&mut self, gpa: u64, v: u32) -> Result<(), MemError> {
        self.write_phys(gpa, &v.to_le_bytes())
    }
}

pub struct GuestRam {
    base: *mut u8,
    size: u64,
    regions: Vec<RamRegion>,
    /// Xen-owned pages the guest placed outside RAM (grant frames in the
    /// guest's unpopulated space): guest-physical page -> host page.
    overlays: std::sync::Mutex<Vec<(u64, usize)>>,
    /// Overlay pages taken back from the guest (released to the host, kept
    /// mapped in this process until drop: the engine may still point at
    /// one until its remap). Reused first by `add_overlay`.
    retired: std::sync::Mutex<Vec<usize>>,
    /// RAM pages the guest gave back (XENMEM_decrease_reservation), one
    /// bit per page of the host buffer: no host access reaches them until
    /// they are populated again, and their host memory is released.
    given_back: Vec<AtomicU64>,
    given_back_pages: AtomicU64,
    /// The buffer is a private mapping of a file (a save file, a fork's
    /// shared image): a page dropped with MADV_DONTNEED reads as the file
    /// again, not as zeros.
    file_backed: std::sync::atomic::AtomicBool,
}

// The buffer is plain memory; the vCPU and Python may touch it from different
// threads exactly as a guest and a device model do on real hardware.
unsafe impl Send for GuestRam {}
unsafe impl Sync for GuestRam {}

impl GuestRam {
    pub fn new(size: u64) -> Result<Self, MemError> {
        if size == 0 || !size.is_multiple_of(layout::PAGE_SIZE) || size > layout::MAX_RAM {
            return Err(MemError::Alloc(size));
        }
        // MAP_NORESERVE: a 1 GiB guest costs only the pages it touches.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemError::Alloc(size));
        }
        // Huge pages where the host allows them (THP "madvise" mode):
        // loading a kernel then faults in 2 MiB at a time (writing the
        // Debian guest's 46 MiB took 58 ms, 26 ms with them), and the
        // engine's accesses to RAM miss the host's TLB less.
        unsafe { libc::madvise(p, size as usize, libc::MADV_HUGEPAGE) };
        Ok(Self::at(p as *mut u8, size, false))
    }

    /// RAM that starts as the `size` bytes of file `fd` at `offset`, mapped
    /// privately: pages are read from the file (its page cache, shared by
    /// every domain mapping it) until the guest writes them, copy-on-write.
    /// Restore and fork use it; `offset` must be page-aligned.
    pub fn from_file(fd: i32, offset: u64, size: u64) -> Result<Self, MemError> {
        if size == 0 || !size.is_multiple_of(layout::PAGE_SIZE) || size > layout::MAX_RAM {
            return Err(MemError::Alloc(size));
        }
        let p = unsafe { map_file(std::ptr::null_mut(), fd, offset, size, 0) };
        if p == libc::MAP_FAILED {
            return Err(MemError::Alloc(size));
        }
        Ok(Self::at(p as *mut u8, size, true))
    }

    fn at(base: *mut u8, size: u64, file_backed: bool) -> Self {
        let pages = size / layout::PAGE_SIZE;
        Self {
            base,
            size,
            regions: layout::ram_regions(size),
            overlays: Default::default(),
            retired: Default::default(),
            given_back: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            given_back_pages: AtomicU64::new(0),
            file_backed: file_backed.into(),
        }
    }

    /// Put the file's bytes (`write_image`'s copy of this RAM) under the
    /// buffer in place, at the same host address: Unicorn's mappings,
    /// Python's views and grant mappings stay valid, and the pages become
    /// shared copy-on-write with every other mapping of the file (a fork's
    /// parent and children). Only between runs, with the contents equal.
    pub fn rebase_on_file(&self, fd: i32, offset: u64) -> Result<(), MemError> {
        let p = unsafe { map_file(self.base, fd, offset, self.size, libc::MAP_FIXED) };
        if p == libc::MAP_FAILED {
            return Err(MemError::Alloc(self.size));
        }
        self.file_backed.store(true, SeqCst);
        Ok(())
    }

    /// Write the buffer to `fd` at `offset` (the file already that long,
    /// so pages of zeros stay holes): every page that is not all zeros.
    /// Returns the runs written as (first page, pages) and the CRC-32 of
    /// their bytes in order.
    pub fn write_image(&self, fd: i32, offset: u64) -> std::io::Result<(Vec<(u64, u64)>, u32)> {
        let page = layout::PAGE_SIZE as usize;
        let buf = unsafe { std::slice::from_raw_parts(self.base, self.size as usize) };
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut crc = crc32fast::Hasher::new();
        for (i, p) in buf.chunks_exact(page).enumerate() {
            let i = i as u64;
            if self.page_given_back(i) || is_zero(p) {
                continue;
            }
            crc.update(p);
            match runs.last_mut() {
                Some((first, n)) if *first + *n == i => *n += 1,
                _ => runs.push((i, 1)),
            }
        }
        for &(first, n) in &runs {
            let start = (first * layout::PAGE_SIZE) as usize;
            write_all_at(fd, &buf[start..start + (n * layout::PAGE_SIZE) as usize], offset + first * layout::PAGE_SIZE)?;
        }
        Ok((runs, crc.finalize()))
    }

    /// CRC-32 of the pages `runs` names (as `write_image` returned them),
    /// read through the buffer. None if a run lies outside it.
    pub fn crc_of(&self, runs: &[(u64, u64)]) -> Option<u32> {
        let pages = self.size / layout::PAGE_SIZE;
        let buf = unsafe { std::slice::from_raw_parts(self.base, self.size as usize) };
        let mut crc = crc32fast::Hasher::new();
        for &(first, n) in runs {
            let end = first.checked_add(n).filter(|&e| e <= pages)?;
            crc.update(&buf[(first * layout::PAGE_SIZE) as usize..(end * layout::PAGE_SIZE) as usize]);
        }
        Some(crc.finalize())
    }

    /// The given-back bitmap, one bit per page of the buffer.
    pub fn given_back_bitmap(&self) -> Vec<u64> {
        self.given_back.iter().map(|w| w.load(SeqCst)).collect()
    }

    /// Mark the pages set in `bitmap` (as `given_back_bitmap` returned it)
    /// given back, their memory released. Returns their guest-physical
    /// addresses, for the engine's holes. Errors if it does not fit.
    pub fn restore_given_back(&self, bitmap: &[u64]) -> Result<Vec<u64>, MemError> {
        if bitmap.len() != self.given_back.len() {
            return Err(MemError::OutOfRange { gpa: 0, len: bitmap.len() as u64 * 64 * layout::PAGE_SIZE });
        }
        let mut gpas = Vec::new();
        for (w, &bits) in bitmap.iter().enumerate() {
            for b in 0..64u64 {
                if bits & (1 << b) == 0 {
                    continue;
                }
                let off = (w as u64 * 64 + b) * layout::PAGE_SIZE;
                let r = self.regions.iter().find(|r| off >= r.host_offset && off < r.host_offset + r.len);
                let Some(r) = r else { return Err(MemError::OutOfRange { gpa: off, len: layout::PAGE_SIZE }) };
                let gpa = r.gpa + (off - r.host_offset);
                self.give_back(gpa).ok_or(MemError::OutOfRange { gpa, len: layout::PAGE_SIZE })?;
                gpas.push(gpa);
            }
        }
        Ok(gpas)
    }

    /// Overlay pages with their contents (grant frames placed outside RAM).
    pub fn overlay_pages(&self) -> Vec<(u64, Vec<u8>)> {
        let ov = self.overlays.lock().unwrap();
        ov.iter()
            .map(|&(gpa, p)| (gpa, unsafe { std::slice::from_raw_parts(p as *const u8, layout::PAGE_SIZE as usize) }.to_vec()))
            .collect()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    pub fn host_ptr(&self) -> *mut u8 {
        self.base
    }

    /// Host offset of `[gpa, gpa+len)` if the whole range is RAM in one region.
    #[inline]
    pub fn offset_of(&self, gpa: u64, len: u64) -> Option<u64> {
        for r in &self.regions {
            if gpa >= r.gpa {
                let off = gpa - r.gpa;
                if off < r.len && len <= r.len - off {
                    return Some(r.host_offset + off);
                }
            }
        }
        None
    }

    /// Host address of `[gpa, gpa+len)`: populated RAM, or within one overlay page.
    fn host_addr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        if let Some(off) = self.offset_of(gpa, len) {
            if self.given_back_pages.load(Relaxed) != 0 && self.any_given_back(off, len) {
                return None;
            }
            return Some(unsafe { self.base.add(off as usize) });
        }
        let page = gpa & !(layout::PAGE_SIZE - 1);
        let within = gpa - page;
        if len > layout::PAGE_SIZE - within {
            return None;
        }
        let ov = self.overlays.lock().unwrap();
        ov.iter().find(|(g, _)| *g == page).map(|&(_, p)| unsafe { (p as *mut u8).add(within as usize) })
    }

    pub fn slice(&self, gpa: u64, len: u64) -> Result<&[u8], MemError> {
        let p = self.host_addr(gpa, len).ok_or(MemError::OutOfRange { gpa, len })?;
        Ok(unsafe { std::slice::from_raw_parts(p, len as usize) })
    }

    #[allow(clippy::mut_from_ref)]
    pub fn slice_mut(&self, gpa: u64, len: u64) -> Result<&mut [u8], MemError> {
        let p = self.host_addr(gpa, len).ok_or(MemError::OutOfRange { gpa, len })?;
        Ok(unsafe { std::slice::from_raw_parts_mut(p, len as usize) })
    }

    /// The guest word at `gpa` as an atomic. The guest updates event
    /// bitmaps, selectors and grant flags with LOCK'd instructions; the host
    /// side must update them with atomic operations too, never by reading
    /// and writing back (a bit the guest set in between would be lost).
    pub fn atomic_u64(&self, gpa: u64) -> Result<&AtomicU64, MemError> {
        self.atomic::<AtomicU64>(gpa)
    }

    pub fn atomic_u32(&self, gpa: u64) -> Result<&AtomicU32, MemError> {
        self.atomic::<AtomicU32>(gpa)
    }

    pub fn atomic_u16(&self, gpa: u64) -> Result<&AtomicU16, MemError> {
        self.atomic::<AtomicU16>(gpa)
    }

    pub fn atomic_u8(&self, gpa: u64) -> Result<&AtomicU8, MemError> {
        self.atomic::<AtomicU8>(gpa)
    }

    fn atomic<T>(&self, gpa: u64) -> Result<&T, MemError> {
        let size = std::mem::size_of::<T>() as u64;
        if !gpa.is_multiple_of(size) {
            return Err(MemError::Misaligned(gpa));
        }
        let p = self.host_addr(gpa, size).ok_or(MemError::OutOfRange { gpa, len: size })?;
        // SAFETY: in bounds (checked above), naturally aligned (host pages
        // are page-aligned, so host alignment follows guest alignment), and
        // the atomic types have the layout of the plain integers.
        Ok(unsafe { &*(p as *const T) })
    }

    /// Populated RAM (not given back).
    pub fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.offset_of(gpa, len).is_some_and(|off| !self.any_given_back(off, len))
    }

    /// Whether the page of host offset `off` was given back.
    fn page_given_back(&self, page: u64) -> bool {
        self.given_back[(page / 64) as usize].load(SeqCst) & (1 << (page % 64)) != 0
    }

    fn any_given_back(&self, off: u64, len: u64) -> bool {
        let first = off / layout::PAGE_SIZE;
        let last = (off + len.max(1) - 1) / layout::PAGE_SIZE;
        (first..=last).any(|p| self.page_given_back(p))
    }

    /// The page at `gpa` is RAM of this domain that the guest gave back.
    pub fn is_given_back(&self, gpa: u64) -> bool {
        self.offset_of(gpa & !(layout::PAGE_SIZE - 1), layout::PAGE_SIZE)
            .is_some_and(|off| self.page_given_back(off / layout::PAGE_SIZE))
    }

    /// RAM pages given back and not populated again.
    pub fn given_back_pages(&self) -> u64 {
        self.given_back_pages.load(SeqCst)
    }

    /// Take the populated RAM page at `gpa` away from the guest and give
    /// its memory back to the host (MADV_DONTNEED: RSS falls, and the page
    /// reads as zeros when it is populated again, as a scrubbed page does).
    /// Returns the page's host address, or None if it is not populated RAM.
    pub fn give_back(&self, gpa: u64) -> Option<*mut u8> {
        let off = self.offset_of(gpa, layout::PAGE_SIZE).filter(|_| gpa.is_multiple_of(layout::PAGE_SIZE))?;
        let page = off / layout::PAGE_SIZE;
        let bit = 1u64 << (page % 64);
        if self.given_back[(page / 64) as usize].fetch_or(bit, SeqCst) & bit != 0 {
            return None;
        }
        self.given_back_pages.fetch_add(1, SeqCst);
        let host = unsafe { self.base.add(off as usize) };
        unsafe { libc::madvise(host as *mut libc::c_void, layout::PAGE_SIZE as usize, libc::MADV_DONTNEED) };
        Some(host)
    }

    /// Populate a given-back page again, zeroed. Returns its host address,
    /// or None if `gpa` is not a given-back RAM page.
    pub fn repopulate(&self, gpa: u64) -> Option<*mut u8> {
        let off = self.offset_of(gpa, layout::PAGE_SIZE).filter(|_| gpa.is_multiple_of(layout::PAGE_SIZE))?;
        let page = off / layout::PAGE_SIZE;
        if !self.page_given_back(page) {
            return None;
        }
        let host = unsafe { self.base.add(off as usize) };
        // Whatever a host view wrote there meanwhile is not the guest's.
        unsafe { libc::madvise(host as *mut libc::c_void, layout::PAGE_SIZE as usize, libc::MADV_DONTNEED) };
        if self.file_backed.load(SeqCst) {
            // Dropped, the page reads as the file again: scrub it.
            unsafe { std::ptr::write_bytes(host, 0, layout::PAGE_SIZE as usize) };
        }
        let bit = 1u64 << (page % 64);
        self.given_back[(page / 64) as usize].fetch_and(!bit, SeqCst);
        self.given_back_pages.fetch_sub(1, SeqCst);
        Some(host)
    }

    /// Back the page at `gpa` (not RAM) with a fresh zeroed host page, or
    /// return the one already there. The caller maps it into the vCPUs.
    pub fn add_overlay(&self, gpa: u64) -> Result<*mut u8, MemError> {
        let page = gpa & !(layout::PAGE_SIZE - 1);
        let mut ov = self.overlays.lock().unwrap();
        if let Some(&(_, p)) = ov.iter().find(|(g, _)| *g == page) {
            return Ok(p as *mut u8);
        }
        if let Some(p) = self.retired.lock().unwrap().pop() {
            ov.push((page, p));
            return Ok(p as *mut u8);
        }
        if ov.len() >= MAX_OVERLAYS {
            return Err(MemError::Alloc(layout::PAGE_SIZE));
        }
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                layout::PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemError::Alloc(layout::PAGE_SIZE));
        }
        ov.push((page, p as usize));
        Ok(p as *mut u8)
    }

    /// Drop an overlay (after the vCPUs unmapped it). Returns whether one was there.
    pub fn remove_overlay(&self, gpa: u64) -> bool {
        let page = gpa & !(layout::PAGE_SIZE - 1);
        let mut ov = self.overlays.lock().unwrap();
        let Some(i) = ov.iter().position(|(g, _)| *g == page) else { return false };
        let (_, p) = ov.remove(i);
        unsafe { libc::munmap(p as *mut libc::c_void, layout::PAGE_SIZE as usize) };
        true
    }

    /// Take an overlay page away from the guest: no host access reaches it
    /// and its memory goes back to the host, but it stays mapped here (see
    /// `retired`). Returns whether one was there.
    pub fn retire_overlay(&self, gpa: u64) -> bool {
        let page = gpa & !(layout::PAGE_SIZE - 1);
        let mut ov = self.overlays.lock().unwrap();
        let Some(i) = ov.iter().position(|(g, _)| *g == page) else { return false };
        let (_, p) = ov.remove(i);
        unsafe { libc::madvise(p as *mut libc::c_void, layout::PAGE_SIZE as usize, libc::MADV_DONTNEED) };
        self.retired.lock().unwrap().push(p);
        true
    }

    /// The whole host buffer (Python's zero-copy view, in host-offset order).
    #[allow(clippy::mut_from_ref)]
    pub fn as_host_slice(&self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.base, self.size as usize) }
    }
}

impl PhysMem for GuestRam {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        buf.copy_from_slice(self.slice(gpa, buf.len() as u64)?);
        Ok(())
    }
    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.slice_mut(gpa, data.len() as u64)?.copy_from_slice(data);
        Ok(())
    }
}

/// Shared references write too: guest RAM is shared memory by nature.
impl PhysMem for &GuestRam {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        buf.copy_from_slice((**self).slice(gpa, buf.len() as u64)?);
        Ok(())
    }
    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        (**self).slice_mut(gpa, data.len() as u64)?.copy_from_slice(data);
        Ok(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size as usize) };
        for &(_, p) in self.overlays.lock().unwrap().iter() {
            unsafe { libc::munmap(p as *mut libc::c_void, layout::PAGE_SIZE as usize) };
        }
        for &p in self.retired.lock().unwrap().iter() {
            unsafe { libc::munmap(p as *mut libc::c_void, layout::PAGE_SIZE as usize) };
        }
    }
}

/// Xen pages a guest may place outside RAM (grant frames and status frames).
pub const MAX_OVERLAYS: usize = 256;

/// mmap `size` bytes of `fd` at `offset` privately, read-write (at `addr`
/// with `extra` = MAP_FIXED).
unsafe fn map_file(addr: *mut u8, fd: i32, offset: u64, size: u64, extra: i32) -> *mut libc::c_void {
    if !offset.is_multiple_of(layout::PAGE_SIZE) || offset > i64::MAX as u64 {
        return libc::MAP_FAILED;
    }
    libc::mmap(
        addr as *mut libc::c_void,
        size as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_NORESERVE | extra,
        fd,
        offset as libc::off_t,
    )
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

fn write_all_at(fd: i32, mut data: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = unsafe { libc::pwrite(fd, data.as_ptr() as *const libc::c_void, data.len(), offset as libc::off_t) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        data = &data[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

/// A flat vector as guest-physical memory from 0, for unit tests.
impl PhysMem for Vec<u8> {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let len = buf.len() as u64;
        let end = gpa.checked_add(len).filter(|e| *e <= self.len() as u64);
        end.ok_or(MemError::OutOfRange { gpa, len })?;
        buf.copy_from_slice(&self[gpa as usize..(gpa + len) as usize]);
        Ok(())
    }
    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let len = data.len() as u64;
        let end = gpa.checked_add(len).filter(|e| *e <= self.len() as u64);
        end.ok_or(MemError::OutOfRange { gpa, len })?;
        self[gpa as usize..(gpa + len) as usize].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        let ram = GuestRam::new(64 << 20).unwrap();
        assert_eq!(ram.regions(), &[RamRegion { gpa: 0, len: 64 << 20, host_offset: 0 }]);
        assert!(ram.slice(0, 64 << 20).is_ok());
        assert!(ram.slice((64 << 20) - 1, 2).is_err());
        assert!(ram.slice(u64::MAX, 2).is_err());
    }

    #[test]
    fn large_guest_splits_around_the_hole() {
        let size = layout::MMIO_HOLE_START + (256 << 20);
        let ram = GuestRam::new(size).unwrap();
        assert_eq!(ram.regions().len(), 2);
        let hi = ram.regions()[1];
        assert_eq!(hi.gpa, 4 << 30);
        assert_eq!(hi.host_offset, layout::MMIO_HOLE_START);
        assert!(ram.slice(layout::MMIO_HOLE_START, 1).is_err());
        ram.slice_mut(4 << 30, 4).unwrap().copy_from_slice(b"high");
        assert_eq!(&ram.as_host_slice()[layout::MMIO_HOLE_START as usize..][..4], b"high");
        // A range may not straddle two regions.
        assert!(ram.slice(layout::MMIO_HOLE_START - 2, 4).is_err());
    }

    #[test]
    fn overlays_back_pages_outside_ram() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let gpa = 0x1_0000_0000u64;
        assert!(ram.slice(gpa, 8).is_err());
        let p = ram.add_overlay(gpa + 0x10).unwrap();
        assert_eq!(ram.add_overlay(gpa).unwrap(), p);
        ram.slice_mut(gpa + 8, 4).unwrap().copy_from_slice(b"gnt!");
        assert_eq!(unsafe { std::slice::from_raw_parts(p.add(8), 4) }, b"gnt!");
        assert!(ram.slice(gpa + 4090, 8).is_err(), "no read past the overlay page");
        assert!(!ram.is_ram(gpa, 1));
        assert!(ram.remove_overlay(gpa));
        assert!(ram.slice(gpa, 8).is_err());
    }

    #[test]
    fn atomics_are_bounded_and_aligned() {
        use std::sync::atomic::Ordering;
        let ram = GuestRam::new(1 << 20).unwrap();
        ram.atomic_u64(0x1000).unwrap().fetch_or(1 << 5, Ordering::SeqCst);
        assert_eq!(ram.slice(0x1000, 1).unwrap()[0], 1 << 5);
        assert_eq!(ram.atomic_u64(0x1004).err(), Some(MemError::Misaligned(0x1004)));
        assert!(ram.atomic_u64((1 << 20) - 4).is_err());
        assert!(ram.atomic_u16(0x1001).is_err());
        assert!(ram.atomic_u8((1 << 20) - 1).is_ok());
        assert!(ram.atomic_u8(1 << 20).is_err());
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(GuestRam::new(0).is_err());
        assert!(GuestRam::new(4097).is_err());
        assert!(GuestRam::new(layout::MAX_RAM + layout::PAGE_SIZE).is_err());
    }

    #[test]
    fn vec_physmem_bounds() {
        let mut v = vec![0u8; 16];
        v.write_u64(8, 0x1122334455667788).unwrap();
        assert_eq!(v.read_u64(8).unwrap(), 0x1122334455667788);
        assert!(v.read_u64(9).is_err());
        assert!(v.write_u64(u64::MAX - 2, 1).is_err());
    }
}
