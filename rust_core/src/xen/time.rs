//! Xen system time and pvclock (xen.h `vcpu_time_info`).
//!
//! The guest reads the host TSC directly (Unicorn's RDTSC is not hooked), so
//! system time is derived from the same TSC: nanoseconds since the domain was
//! built = (tsc - tsc0) scaled by `mul`/`shift`, exactly as the guest computes
//! it from `vcpu_time_info`. Deadlines and the guest's clock cannot drift apart.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// XEN_PVCLOCK_TSC_STABLE_BIT: the TSC is synchronised and constant.
pub const PVCLOCK_TSC_STABLE: u8 = 1 << 0;

#[inline]
pub fn rdtsc() -> u64 {
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Host TSC frequency, measured once per boot of the host against the
/// monotonic clock and kept for the next processes (`tsc_hz_file`): the
/// measurement sleeps 25 ms, which every restore would otherwise pay.
pub fn tsc_hz() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(|| {
        let file = tsc_hz_file();
        if let Some(hz) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()).and_then(|t| t.trim().parse().ok()) {
            if plausible_hz(hz) {
                return hz;
            }
        }
        let hz = measure_tsc_hz();
        if let Some(f) = file {
            // Written whole under another name and renamed: a reader never
            // sees half a number. Failing to keep it only costs the next one.
            let tmp = f.with_extension(format!("{}.tmp", std::process::id()));
            if std::fs::create_dir_all(f.parent().unwrap_or(&f)).is_ok() && std::fs::write(&tmp, hz.to_string()).is_ok() {
                let _ = std::fs::rename(&tmp, &f);
            }
        }
        hz
    })
}

fn plausible_hz(hz: u64) -> bool {
    (10_000_000..=20_000_000_000).contains(&hz)
}

fn measure_tsc_hz() -> u64 {
    let t0 = Instant::now();
    let c0 = rdtsc();
    std::thread::sleep(Duration::from_millis(25));
    let c1 = rdtsc();
    let dt = t0.elapsed().as_nanos();
    ((c1 - c0) as u128 * 1_000_000_000 / dt.max(1)) as u64
}

/// Where this boot's measurement is kept: pvhvm's cache ($PVHVM_CACHE,
/// else $XDG_CACHE_HOME/pvhvm, else ~/.cache/pvhvm, as images.py), named by
/// the kernel's boot id, so a reboot (maybe on other hardware) measures again.
fn tsc_hz_file() -> Option<std::path::PathBuf> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let boot_id = boot_id.trim();
    if boot_id.is_empty() || !boot_id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return None;
    }
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    let dir = env("PVHVM_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("pvhvm")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/pvhvm")))?;
    Some(dir.join(format!("tsc-hz-{boot_id}")))
}

/// pvclock scale: ns = ((tsc_delta << shift or >> -shift) * mul) >> 32.
pub fn scale_for(hz: u64) -> (u32, i8) {
    let mut shift: i8 = 0;
    // Find shift so that 1e9 / (hz * 2^shift) lies in [0.5, 1).
    let mut num: u128 = 1_000_000_000;
    let mut den: u128 = hz as u128;
    while num >= den {
        den <<= 1;
        shift += 1;
    }
    while num * 2 < den {
        num <<= 1;
        shift -= 1;
    }
    let mul = ((num << 32) / den) as u32;
    (mul, shift)
}

pub fn scale_delta(delta: u64, mul: u32, shift: i8) -> u64 {
    let d = if shift >= 0 { delta << shift } else { delta >> (-shift) };
    ((d as u128 * mul as u128) >> 32) as u64
}

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub tsc0: u64,
    pub mul: u32,
    pub shift: i8,
    pub hz: u64,
    /// Wall-clock time (since the epoch) at system time 0.
    pub boot_wall: Duration,
    /// What the guest's TSC reads past the host's (RDTSC adds it, see
    /// `CpuState::set_tsc_offset`): 0, but for a restored domain, whose TSC
    /// goes on from where it was saved.
    pub guest_tsc_offset: u64,
}

impl Clock {
    pub fn new() -> Self {
        let hz = tsc_hz();
        let (mul, shift) = scale_for(hz);
        let boot_wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Self { tsc0: rdtsc(), mul, shift, hz, boot_wall, guest_tsc_offset: 0 }
    }

    /// The guest's TSC now.
    pub fn guest_tsc(&self) -> u64 {
        rdtsc().wrapping_add(self.guest_tsc_offset)
    }

    /// Go on from system time `ns` and guest TSC `guest_tsc` (a restored
    /// domain's): the guest sees no time pass while it was saved, so none
    /// of its timers or watchdogs jump; the wall clock is now's.
    pub fn resume_at(&mut self, ns: u64, guest_tsc: u64) {
        let ticks = (ns as u128 * self.hz as u128 / 1_000_000_000) as u64;
        let host = rdtsc();
        self.tsc0 = host.saturating_sub(ticks);
        self.guest_tsc_offset = guest_tsc.wrapping_sub(host);
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.boot_wall = wall.saturating_sub(Duration::from_nanos(ns));
    }

    /// System time (ns since the domain was built) at host TSC `tsc`.
    pub fn ns_at(&self, tsc: u64) -> u64 {
        scale_delta(tsc.saturating_sub(self.tsc0), self.mul, self.shift)
    }

    pub fn now_ns(&self) -> u64 {
        self.ns_at(rdtsc())
    }

    /// How far in the host's future system time `ns` lies.
    pub fn until(&self, ns: u64) -> Duration {
        Duration::from_nanos(ns.saturating_sub(self.now_ns()))
    }

    /// A `vcpu_time_info` body (32 bytes) for now, version left to the writer.
    pub fn time_info(&self) -> [u8; 32] {
        let tsc = rdtsc();
        let mut b = [0u8; 32];
        // The guest's TSC at that instant: it computes from its own reads.
        b[8..16].copy_from_slice(&tsc.wrapping_add(self.guest_tsc_offset).to_le_bytes());
        b[16..24].copy_from_slice(&self.ns_at(tsc).to_le_bytes());
        b[24..28].copy_from_slice(&self.mul.to_le_bytes());
        b[28] = self.shift as u8;
        b[29] = PVCLOCK_TSC_STABLE;
        b
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_matches_frequency() {
        for hz in [1_000_000_000u64, 2_100_000_000, 3_600_000_000, 800_000_000, 25_000_000, 10_000_000_000] {
            let (mul, shift) = scale_for(hz);
            // One second of ticks is one second of nanoseconds, within 1 ppm.
            let ns = scale_delta(hz, mul, shift);
            assert!((ns as i64 - 1_000_000_000).abs() < 1000, "{hz}: {ns}");
            assert!(mul >= 1 << 31, "mul uses its precision");
        }
    }

    #[test]
    fn clock_advances_with_the_host() {
        let c = Clock::new();
        let a = c.now_ns();
        std::thread::sleep(Duration::from_millis(20));
        let b = c.now_ns();
        assert!(b - a >= 19_000_000 && b - a < 200_000_000, "{}", b - a);
    }
}
