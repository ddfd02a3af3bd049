//! Grant tables (grant_table.h), versions 1 and 2: where the guest's grant
//! entries live, and the backend's access to granted pages with Xen's checks.
//!
//! The guest writes entries into frames it placed with XENMEM_add_to_physmap.
//! A device model (Python, domain 0) reads or writes a granted page only if
//! the entry permits access to domain 0, is not read-only for a write, and
//! the range lies within the page (or the v2 sub-page window). While an
//! access or mapping is in progress the entry carries GTF_reading /
//! GTF_writing, so the guest sees the page in use and cannot revoke it.

use std::collections::HashMap;
use std::sync::atomic::Ordering::SeqCst;

use crate::memory::GuestRam;

pub const GTF_TYPE_MASK: u16 = 3;
pub const GTF_PERMIT_ACCESS: u16 = 1;
pub const GTF_READONLY: u16 = 1 << 2;
pub const GTF_READING: u16 = 1 << 3;
pub const GTF_WRITING: u16 = 1 << 4;
pub const GTF_SUB_PAGE: u16 = 1 << 8;

/// Grant frames a domU may use (Xen's default gnttab_max_frames).
pub const MAX_FRAMES: u32 = 64;
const PAGE: u64 = 4096;

/// Why a backend access was refused, as GNTST_* (grant_table.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantError {
    /// GNTST_bad_gntref: past the table, or in a frame the guest never placed.
    BadRef,
    /// GNTST_permission_denied: not permitted, another domain's, or read-only.
    PermissionDenied,
    /// GNTST_bad_page: the granted frame is not the guest's RAM.
    BadPage,
    /// GNTST_bad_copy_arg: offset/length outside the page or sub-page window.
    BadCopyArg,
    /// GNTST_general_error: no table yet.
    General,
}

impl GrantError {
    pub fn status(self) -> i16 {
        match self {
            GrantError::General => -1,
            GrantError::BadRef => -4,
            GrantError::PermissionDenied => -9,
            GrantError::BadPage => -10,
            GrantError::BadCopyArg => -11,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GrantError::General => "GNTST_general_error",
            GrantError::BadRef => "GNTST_bad_gntref",
            GrantError::PermissionDenied => "GNTST_permission_denied",
            GrantError::BadPage => "GNTST_bad_page",
            GrantError::BadCopyArg => "GNTST_bad_copy_arg",
        }
    }
}

/// A checked grant: the guest-physical range the backend may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub gpa: u64,
    pub len: u64,
    pub writable: bool,
}

#[derive(Debug, Default)]
pub struct GrantTable {
    pub version: u32,
    /// Shared frames by index (guest-physical), as placed by the guest.
    pub frames: Vec<Option<u64>>,
    /// v2 status frames by index.
    pub status_frames: Vec<Option<u64>>,
    /// Backend mappings in force: gref -> (readers, writers).
    mapped: HashMap<u32, (u32, u32)>,
}

impl GrantTable {
    pub fn new() -> Self {
        Self { version: 1, ..Default::default() }
    }

    /// Version and frames, and which grants backends had mapped (not the
    /// mappings: their owners make them again after a restore).
    pub fn encode(&self, e: &mut crate::snapshot::Enc) {
        e.u32(self.version);
        for frames in [&self.frames, &self.status_frames] {
            e.len(frames.len());
            for &f in frames.iter() {
                e.opt_u64(f);
            }
        }
        let mut grefs: Vec<u32> = self.mapped.keys().copied().collect();
        grefs.sort_unstable();
        e.len(grefs.len());
        for g in grefs {
            e.u32(g);
        }
    }

    /// A save's grant table, on `ram` as restored. The grants backends had
    /// mapped lose their in-use flags, as if unmapped: the backends map
    /// what they still use again, and the guest can end the rest.
    pub fn decode(ram: &GuestRam, d: &mut crate::snapshot::Dec) -> Result<Self, crate::snapshot::SnapshotError> {
        let version = d.u32()?;
        if !(1..=2).contains(&version) {
            return Err(crate::snapshot::invalid(format!("grant table version {version}")));
        }
        let frames = |d: &mut crate::snapshot::Dec| -> Result<Vec<Option<u64>>, crate::snapshot::SnapshotError> {
            let n = d.len(MAX_FRAMES as usize, 9)?;
            (0..n)
                .map(|_| {
                    let f = d.opt_u64()?;
                    if f.is_some_and(|gpa| !gpa.is_multiple_of(PAGE)) {
                        return Err(crate::snapshot::invalid("a grant frame not on a page"));
                    }
                    Ok(f)
                })
                .collect()
        };
        let frames_ = frames(d)?;
        let status_frames = frames(d)?;
        let table = Self { version, frames: frames_, status_frames, mapped: HashMap::new() };
        let n = d.len(1 << 20, 4)?;
        for _ in 0..n {
            // A gref the restored table does not hold is nothing to release.
            let _ = table.release(ram, d.u32()?);
        }
        Ok(table)
    }

    fn entry_size(&self) -> u64 {
        if self.version == 2 {
            16
        } else {
            8
        }
    }

    /// Entries the placed frames hold.
    pub fn nr_entries(&self) -> u32 {
        self.frames.len() as u32 * (PAGE / self.entry_size()) as u32
    }

    /// Status frames needed for the shared frames in v2 (2 bytes an entry).
    pub fn nr_status_frames(&self) -> u32 {
        (self.nr_entries() * 2).div_ceil(PAGE as u32)
    }

    pub fn in_use(&self) -> bool {
        !self.mapped.is_empty()
    }

    fn entry_gpa(&self, gref: u32) -> Result<u64, GrantError> {
        let per = PAGE / self.entry_size();
        let frame = (gref as u64 / per) as usize;
        let base = self.frames.get(frame).copied().flatten().ok_or(GrantError::BadRef)?;
        Ok(base + (gref as u64 % per) * self.entry_size())
    }

    /// Where the reading/writing flags of `gref` live: the entry's flags in
    /// v1, its status word in v2.
    fn flags_gpa(&self, gref: u32) -> Result<u64, GrantError> {
        if self.version == 2 {
            let per = PAGE / 2;
            let frame = (gref as u64 / per) as usize;
            let base = self.status_frames.get(frame).copied().flatten().ok_or(GrantError::BadRef)?;
            Ok(base + (gref as u64 % per) * 2)
        } else {
            self.entry_gpa(gref)
        }
    }

    fn read_u16(ram: &GuestRam, gpa: u64) -> Result<u16, GrantError> {
        ram.slice(gpa, 2).map(|s| u16::from_le_bytes([s[0], s[1]])).map_err(|_| GrantError::BadRef)
    }

    /// Whether an entry's flags and domid let `backend` access it.
    fn permits(flags: u16, domid: u16, backend: u16, write: bool) -> Result<(), GrantError> {
        if flags & GTF_TYPE_MASK != GTF_PERMIT_ACCESS || domid != backend {
            return Err(GrantError::PermissionDenied);
        }
        if write && flags & GTF_READONLY != 0 {
            return Err(GrantError::PermissionDenied);
        }
        Ok(())
    }

    /// Mark `gref` in use (GTF_reading, and GTF_writing for a write) if it
    /// still lets `backend` in, in one step the guest cannot get between:
    /// the guest revokes a grant with a compare-and-swap that fails while
    /// the in-use flags are set, so they are set here with a compare-and-swap
    /// that fails if the guest revoked or changed the entry meanwhile (as
    /// Xen's `_set_status_v1/v2` do).
    fn acquire(&self, ram: &GuestRam, gref: u32, backend: u16, write: bool) -> Result<(), GrantError> {
        let e = self.entry_gpa(gref)?;
        let in_use = if write { GTF_READING | GTF_WRITING } else { GTF_READING };
        if self.version == 1 {
            // flags (u16) and domid (u16) are one 32-bit word.
            let word = ram.atomic_u32(e).map_err(|_| GrantError::BadRef)?;
            let mut cur = word.load(SeqCst);
            loop {
                Self::permits(cur as u16, (cur >> 16) as u16, backend, write)?;
                match word.compare_exchange(cur, cur | in_use as u32, SeqCst, SeqCst) {
                    Ok(_) => return Ok(()),
                    Err(now) => cur = now,
                }
            }
        }
        // v2: the in-use flags live in the status frame: set them, then
        // look at the entry again and back out if the guest revoked it.
        let status = ram.atomic_u16(self.flags_gpa(gref)?).map_err(|_| GrantError::BadRef)?;
        let read_entry = || -> Result<(u16, u16), GrantError> { Ok((Self::read_u16(ram, e)?, Self::read_u16(ram, e + 2)?)) };
        let (flags, domid) = read_entry()?;
        Self::permits(flags, domid, backend, write)?;
        let before = status.fetch_or(in_use, SeqCst);
        let (flags, domid) = read_entry()?;
        if let Err(err) = Self::permits(flags, domid, backend, write) {
            status.fetch_and(!(in_use & !before), SeqCst);
            return Err(err);
        }
        Ok(())
    }

    /// Check that `backend` may access `[offset, offset+len)` of `gref`.
    pub fn check(
        &self,
        ram: &GuestRam,
        gref: u32,
        backend: u16,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<Granted, GrantError> {
        if self.frames.is_empty() {
            return Err(GrantError::General);
        }
        if gref >= self.nr_entries() {
            return Err(GrantError::BadRef);
        }
        let e = self.entry_gpa(gref)?;
        let flags = Self::read_u16(ram, e)?;
        Self::permits(flags, Self::read_u16(ram, e + 2)?, backend, write)?;
        let entry = ram.slice(e, self.entry_size()).map_err(|_| GrantError::BadRef)?;
        let (frame, win_off, win_len) = if self.version == 2 {
            let frame = u64::from_le_bytes(entry[8..16].try_into().unwrap());
            if flags & GTF_SUB_PAGE != 0 {
                let off = u16::from_le_bytes([entry[4], entry[5]]) as u64;
                let len = u16::from_le_bytes([entry[6], entry[7]]) as u64;
                if off + len > PAGE {
                    return Err(GrantError::BadCopyArg);
                }
                (frame, off, len)
            } else {
                (frame, 0, PAGE)
            }
        } else {
            (u32::from_le_bytes(entry[4..8].try_into().unwrap()) as u64, 0, PAGE)
        };
        let end = offset.checked_add(len).ok_or(GrantError::BadCopyArg)?;
        if end > win_len {
            return Err(GrantError::BadCopyArg);
        }
        let gpa = frame.checked_mul(PAGE).ok_or(GrantError::BadPage)? + win_off + offset;
        // The granted frame must be the guest's own RAM.
        if !ram.is_ram(frame * PAGE, PAGE) {
            return Err(GrantError::BadPage);
        }
        Ok(Granted { gpa, len, writable: write })
    }

    /// Check, mark in use, and check again under the flags (the guest may
    /// have rewritten the entry between the first check and the acquire).
    fn begin(&self, ram: &GuestRam, gref: u32, backend: u16, offset: u64, len: u64, write: bool) -> Result<Granted, GrantError> {
        self.check(ram, gref, backend, offset, len, write)?;
        self.acquire(ram, gref, backend, write)?;
        self.check(ram, gref, backend, offset, len, write).inspect_err(|_| {
            let _ = self.release(ram, gref);
        })
    }

    /// Copy out of a granted page (GNTTABOP_copy with a guest source).
    pub fn read(&self, ram: &GuestRam, gref: u32, backend: u16, offset: u64, buf: &mut [u8]) -> Result<(), GrantError> {
        let g = self.begin(ram, gref, backend, offset, buf.len() as u64, false)?;
        let copied = ram.slice(g.gpa, g.len).map(|s| buf.copy_from_slice(s)).map_err(|_| GrantError::BadPage);
        self.release(ram, gref)?;
        copied
    }

    /// Copy into a granted page.
    pub fn write(&self, ram: &GuestRam, gref: u32, backend: u16, offset: u64, data: &[u8]) -> Result<(), GrantError> {
        let g = self.begin(ram, gref, backend, offset, data.len() as u64, true)?;
        let copied = ram.slice_mut(g.gpa, g.len).map(|s| s.copy_from_slice(data)).map_err(|_| GrantError::BadPage);
        self.release(ram, gref)?;
        copied
    }

    /// Map a whole granted page (or its sub-page window) for the backend.
    /// The in-use flags stay set until `unmap`.
    pub fn map(&mut self, ram: &GuestRam, gref: u32, backend: u16, write: bool) -> Result<Granted, GrantError> {
        if self.frames.is_empty() {
            return Err(GrantError::General);
        }
        let e = self.entry_gpa(gref)?;
        let window = if self.version == 2 && Self::read_u16(ram, e)? & GTF_SUB_PAGE != 0 {
            Self::read_u16(ram, e + 6)? as u64
        } else {
            PAGE
        };
        let g = self.begin(ram, gref, backend, 0, window, write)?;
        let m = self.mapped.entry(gref).or_default();
        if write {
            m.1 += 1;
        } else {
            m.0 += 1;
        }
        Ok(g)
    }

    pub fn unmap(&mut self, ram: &GuestRam, gref: u32, write: bool) -> Result<(), GrantError> {
        let m = self.mapped.get_mut(&gref).ok_or(GrantError::BadRef)?;
        if write {
            m.1 = m.1.saturating_sub(1);
        } else {
            m.0 = m.0.saturating_sub(1);
        }
        if *m == (0, 0) {
            self.mapped.remove(&gref);
        }
        self.release(ram, gref)
    }

    /// Clear the in-use flags an access set, unless mappings still hold them.
    fn release(&self, ram: &GuestRam, gref: u32) -> Result<(), GrantError> {
        let (readers, writers) = self.mapped.get(&gref).copied().unwrap_or((0, 0));
        let mut clear = 0;
        if writers == 0 {
            clear |= GTF_WRITING;
        }
        if readers == 0 && writers == 0 {
            clear |= GTF_READING;
        }
        let flags = ram.atomic_u16(self.flags_gpa(gref)?).map_err(|_| GrantError::BadRef)?;
        flags.fetch_and(!clear, SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(version: u32) -> (GuestRam, GrantTable) {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut gt = GrantTable::new();
        gt.version = version;
        gt.frames = vec![Some(0x10000)];
        if version == 2 {
            gt.status_frames = vec![Some(0x11000)];
        }
        (ram, gt)
    }

    fn v1_entry(ram: &GuestRam, gref: u64, flags: u16, domid: u16, frame: u32) {
        let s = ram.slice_mut(0x10000 + gref * 8, 8).unwrap();
        s[0..2].copy_from_slice(&flags.to_le_bytes());
        s[2..4].copy_from_slice(&domid.to_le_bytes());
        s[4..8].copy_from_slice(&frame.to_le_bytes());
    }

    #[test]
    fn v1_checks() {
        let (ram, gt) = setup(1);
        ram.slice_mut(0x20000, 4).unwrap().copy_from_slice(b"data");
        v1_entry(&ram, 3, GTF_PERMIT_ACCESS, 0, 0x20);
        v1_entry(&ram, 4, GTF_PERMIT_ACCESS | GTF_READONLY, 0, 0x20);
        v1_entry(&ram, 5, GTF_PERMIT_ACCESS, 7, 0x20);
        v1_entry(&ram, 6, GTF_PERMIT_ACCESS, 0, 0x1_0000); // beyond RAM
        let mut b = [0u8; 4];
        gt.read(&ram, 3, 0, 0, &mut b).unwrap();
        assert_eq!(&b, b"data");
        gt.write(&ram, 3, 0, 4092, b"tail").unwrap();
        assert_eq!(ram.slice(0x20ffc, 4).unwrap(), b"tail");
        assert_eq!(gt.write(&ram, 4, 0, 0, b"x"), Err(GrantError::PermissionDenied));
        assert!(gt.read(&ram, 4, 0, 0, &mut b).is_ok());
        assert_eq!(gt.read(&ram, 5, 0, 0, &mut b), Err(GrantError::PermissionDenied));
        assert_eq!(gt.read(&ram, 6, 0, 0, &mut b), Err(GrantError::BadPage));
        assert_eq!(gt.read(&ram, 7, 0, 0, &mut b), Err(GrantError::PermissionDenied));
        assert_eq!(gt.read(&ram, 3, 0, 4093, &mut b), Err(GrantError::BadCopyArg));
        assert_eq!(gt.read(&ram, 3, 0, u64::MAX, &mut b), Err(GrantError::BadCopyArg));
        assert_eq!(gt.read(&ram, 512, 0, 0, &mut b), Err(GrantError::BadRef));
        // Flags are clear again after the copies.
        assert_eq!(GrantTable::read_u16(&ram, 0x10000 + 3 * 8).unwrap(), GTF_PERMIT_ACCESS);
    }

    #[test]
    fn mapping_holds_the_flags() {
        let (ram, mut gt) = setup(1);
        v1_entry(&ram, 1, GTF_PERMIT_ACCESS, 0, 0x30);
        let g = gt.map(&ram, 1, 0, true).unwrap();
        assert_eq!((g.gpa, g.len), (0x30000, 4096));
        let flags = GrantTable::read_u16(&ram, 0x10008).unwrap();
        assert_eq!(flags & (GTF_READING | GTF_WRITING), GTF_READING | GTF_WRITING);
        // A copy while mapped keeps them set.
        gt.read(&ram, 1, 0, 0, &mut [0u8; 8]).unwrap();
        assert_ne!(GrantTable::read_u16(&ram, 0x10008).unwrap() & GTF_WRITING, 0);
        assert!(gt.in_use());
        gt.unmap(&ram, 1, true).unwrap();
        assert_eq!(GrantTable::read_u16(&ram, 0x10008).unwrap(), GTF_PERMIT_ACCESS);
        assert!(!gt.in_use());
        assert_eq!(gt.unmap(&ram, 1, true), Err(GrantError::BadRef));
    }

    #[test]
    fn a_revoked_or_changed_entry_is_not_acquired() {
        let (ram, gt) = setup(1);
        v1_entry(&ram, 2, GTF_PERMIT_ACCESS | GTF_READONLY, 0, 0x20);
        assert_eq!(gt.acquire(&ram, 2, 0, true), Err(GrantError::PermissionDenied));
        gt.acquire(&ram, 2, 0, false).unwrap();
        // The guest's revoke (cmpxchg flags -> 0 unless in use) now fails.
        let word = ram.atomic_u32(0x10000 + 2 * 8).unwrap();
        let permit = (GTF_PERMIT_ACCESS | GTF_READONLY) as u32;
        assert!(word.compare_exchange(permit, 0, SeqCst, SeqCst).is_err());
        gt.release(&ram, 2).unwrap();
        assert!(word.compare_exchange(permit, 0, SeqCst, SeqCst).is_ok());
        assert_eq!(gt.acquire(&ram, 2, 0, false), Err(GrantError::PermissionDenied));
    }

    #[test]
    fn v2_full_and_sub_page() {
        let (ram, mut gt) = setup(2);
        let e = |gref: u64, flags: u16, off: u16, len: u16, frame: u64| {
            let s = ram.slice_mut(0x10000 + gref * 16, 16).unwrap();
            s[0..2].copy_from_slice(&flags.to_le_bytes());
            s[2..4].copy_from_slice(&0u16.to_le_bytes());
            s[4..6].copy_from_slice(&off.to_le_bytes());
            s[6..8].copy_from_slice(&len.to_le_bytes());
            s[8..16].copy_from_slice(&frame.to_le_bytes());
        };
        e(2, GTF_PERMIT_ACCESS, 0, 0, 0x40);
        e(3, GTF_PERMIT_ACCESS | GTF_SUB_PAGE, 0x100, 0x20, 0x41);
        assert_eq!(gt.nr_entries(), 256);
        gt.write(&ram, 2, 0, 8, b"v2").unwrap();
        assert_eq!(ram.slice(0x40008, 2).unwrap(), b"v2");
        gt.write(&ram, 3, 0, 0x1e, b"ok").unwrap();
        assert_eq!(ram.slice(0x4111e, 2).unwrap(), b"ok");
        assert_eq!(gt.write(&ram, 3, 0, 0x1f, b"no"), Err(GrantError::BadCopyArg));
        let g = gt.map(&ram, 3, 0, false).unwrap();
        assert_eq!((g.gpa, g.len), (0x41100, 0x20));
        // v2 keeps the in-use flags in the status frame.
        assert_eq!(GrantTable::read_u16(&ram, 0x11000 + 3 * 2).unwrap(), GTF_READING);
        gt.unmap(&ram, 3, false).unwrap();
        assert_eq!(GrantTable::read_u16(&ram, 0x11000 + 3 * 2).unwrap(), 0);
        assert_eq!(gt.nr_status_frames(), 1);
    }
}
