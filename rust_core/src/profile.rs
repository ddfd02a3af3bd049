//! The guest profiler: where the wall time of a domain goes, sampled.
//!
//! No per-block or per-instruction hook: the ticker already stops the
//! running vCPU at deadlines (ticker.rs), and a profiled domain adds one
//! every `interval`. At each tick the slice loop records the running vCPU's
//! instruction pointer, CPL, code width and a frame-pointer chain. Ticks
//! that pass while no vCPU runs are recorded too, with a weight: as idle
//! (the core waits for a guest timer) or as host (Python runs the device
//! models between two `run()`s). So the samples add up to the wall time
//! since the profile began.
//!
//! `Milestones` are kept whether or not a profile runs (a few compares):
//! the first guest instruction, hypercall and user-space block, which
//! Python's phase timeline (profile.py) places beside what it sees on the
//! consoles.

/// Frames followed from the frame pointer at most, after the sampled IP.
pub const MAX_FRAMES: usize = 32;
/// The rates a profile may sample at, per second.
pub const MIN_HZ: u32 = 1;
pub const MAX_HZ: u32 = 20_000;
/// Samples held until Python takes them (about 17 minutes at 1 kHz); the
/// ticks past it are counted as dropped.
pub const MAX_SAMPLES: usize = 1_000_000;
/// A frame is at most this far above the one it called (a kernel stack is
/// 16 KiB; a user stack frame this large would be rare).
const MAX_FRAME_SIZE: u64 = 1 << 20;

/// The host's monotonic clock (CLOCK_MONOTONIC, Python's time.monotonic_ns).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Where the host thread was at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Running a vCPU (the sample says which and where).
    Guest = 0,
    /// Every vCPU halted or blocked: the core waited for a timer.
    Idle = 1,
    /// Between runs: Python servicing devices, or waiting on host sources.
    Host = 2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// When it was taken (monotonic ns).
    pub t_ns: u64,
    /// The ticks it stands for (several when the thread was off the guest).
    pub weight: u32,
    pub place: Place,
    pub vcpu: u32,
    pub cpl: u8,
    /// Code width: 16, 32 or 64 (0 off the guest).
    pub bits: u8,
    /// The linear address of the next instruction.
    pub ip: u64,
    /// Return addresses found through the frame pointer, innermost first.
    pub frames: Vec<u64>,
}

/// The first moments of a domain's life, as monotonic ns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Milestones {
    pub first_instruction: Option<u64>,
    pub first_hypercall: Option<u64>,
    pub first_user_instruction: Option<u64>,
}

impl Milestones {
    pub fn instruction(&mut self) {
        self.first_instruction.get_or_insert_with(monotonic_ns);
    }

    pub fn hypercall(&mut self) {
        self.first_hypercall.get_or_insert_with(monotonic_ns);
    }

    pub fn user_instruction(&mut self) {
        self.first_user_instruction.get_or_insert_with(monotonic_ns);
    }
}

pub struct Profiler {
    interval_ns: u64,
    /// The next tick not yet accounted for.
    next_tick: u64,
    samples: Vec<Sample>,
    pub dropped: u64,
}

impl Profiler {
    pub fn new(hz: u32) -> Result<Self, String> {
        if !(MIN_HZ..=MAX_HZ).contains(&hz) {
            return Err(format!("a profile samples {MIN_HZ} to {MAX_HZ} times a second, not {hz}"));
        }
        let interval_ns = 1_000_000_000 / hz as u64;
        Ok(Self { interval_ns, next_tick: monotonic_ns() + interval_ns, samples: Vec::new(), dropped: 0 })
    }

    /// How long until the next tick (for the ticker's deadline).
    pub fn next_tick_in(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.next_tick.saturating_sub(monotonic_ns()))
    }

    /// Ticks that passed by `now` and were not accounted for yet; they are now.
    pub fn due(&mut self, now: u64) -> u32 {
        if now < self.next_tick {
            return 0;
        }
        let n = (now - self.next_tick) / self.interval_ns + 1;
        self.next_tick += n * self.interval_ns;
        n.min(u32::MAX as u64) as u32
    }

    /// Ticks spent off the guest, up to now.
    pub fn off_guest(&mut self, place: Place) {
        let now = monotonic_ns();
        let weight = self.due(now);
        if weight > 0 {
            self.push(Sample { t_ns: now, weight, place, vcpu: 0, cpl: 0, bits: 0, ip: 0, frames: Vec::new() });
        }
    }

    pub fn push(&mut self, s: Sample) {
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(s);
        } else {
            self.dropped += s.weight as u64;
        }
    }

    pub fn take(&mut self) -> Vec<Sample> {
        std::mem::take(&mut self.samples)
    }
}

/// Follow the frame-pointer chain from `bp`: each frame holds the caller's
/// frame pointer and, above it, the return address. A kernel built without
/// frame pointers uses the register for anything, so a link is kept only
/// if it looks real: the chain climbs the stack in small steps and every
/// return address follows a CALL. `read` reads guest-linear memory.
pub fn unwind(read: impl Fn(u64, &mut [u8]) -> bool, mut bp: u64, bits: u8) -> Vec<u64> {
    let word = if bits == 64 { 8u64 } else { 4 };
    let mut frames = Vec::new();
    while frames.len() < MAX_FRAMES && bp != 0 && bp.is_multiple_of(word) {
        let mut link = [0u8; 16];
        let link = &mut link[..2 * word as usize];
        if !read(bp, link) {
            break;
        }
        let (next, ret) = if word == 8 {
            (u64::from_le_bytes(link[..8].try_into().unwrap()), u64::from_le_bytes(link[8..].try_into().unwrap()))
        } else {
            (u32::from_le_bytes(link[..4].try_into().unwrap()) as u64, u32::from_le_bytes(link[4..].try_into().unwrap()) as u64)
        };
        if ret == 0 || !follows_call(&read, ret) {
            break;
        }
        frames.push(ret);
        if next <= bp || next - bp > MAX_FRAME_SIZE {
            break;
        }
        bp = next;
    }
    frames
}

/// Whether the bytes before `ret` end with a CALL: E8 rel32, or FF /2 with
/// a register, a displacement of 8 or 32 bits, or a SIB byte (prefixes sit
/// before the opcode and do not matter).
fn follows_call(read: &impl Fn(u64, &mut [u8]) -> bool, ret: u64) -> bool {
    let mut b = [0u8; 7];
    let Some(start) = ret.checked_sub(7) else { return false };
    if !read(start, &mut b) {
        return false;
    }
    let at = |back: usize| b[7 - back];
    let reg_is_2 = |modrm: u8| (modrm >> 3) & 7 == 2;
    at(5) == 0xe8
        || (at(2) == 0xff && at(1) & 0xf8 == 0xd0) // call reg
        || (at(3) == 0xff && reg_is_2(at(2)) && (at(2) >> 6 == 1 || at(2) & 0xc7 == 0x04)) // disp8, or SIB
        || (at(4) == 0xff && reg_is_2(at(3)) && at(3) >> 6 == 1 && at(3) & 7 == 4) // SIB + disp8
        || (at(6) == 0xff && reg_is_2(at(5)) && (at(5) >> 6 == 2 || at(5) & 0xc7 == 0x05)) // disp32, RIP-relative
        || (at(7) == 0xff && reg_is_2(at(6)) && at(6) >> 6 == 2 && at(6) & 7 == 4) // SIB + disp32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little guest memory: a stack at 0x8000 and code at 0x1000.
    fn memory(words: &[(u64, u64)], code: &[(u64, &[u8])]) -> impl Fn(u64, &mut [u8]) -> bool {
        let mut mem = vec![0u8; 0x10000];
        for &(at, v) in words {
            mem[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
        }
        for &(at, bytes) in code {
            mem[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        }
        move |va: u64, buf: &mut [u8]| {
            let end = va as usize + buf.len();
            if end > mem.len() {
                return false;
            }
            buf.copy_from_slice(&mem[va as usize..end]);
            true
        }
    }

    #[test]
    fn follows_a_chain_of_calls() {
        // Two frames, each returning after a `call rel32`, then a zero link.
        let code: &[(u64, &[u8])] = &[(0x1000, &[0xe8, 1, 2, 3, 4]), (0x1100, &[0xff, 0xd0])];
        let read = memory(&[(0x8000, 0x8040), (0x8008, 0x1005), (0x8040, 0), (0x8048, 0x1102)], code);
        assert_eq!(unwind(&read, 0x8000, 64), vec![0x1005, 0x1102]);
    }

    #[test]
    fn stops_where_the_chain_stops_looking_real() {
        // A return address not after a call: nothing is kept.
        let read = memory(&[(0x8000, 0x8040), (0x8008, 0x1005)], &[(0x1000, &[0x90; 5])]);
        assert!(unwind(&read, 0x8000, 64).is_empty());
        // A chain going down the stack, or misaligned, or outside memory: one frame at most.
        let code: &[(u64, &[u8])] = &[(0x1000, &[0xe8, 0, 0, 0, 0])];
        let down = memory(&[(0x8000, 0x7000), (0x8008, 0x1005)], code);
        assert_eq!(unwind(&down, 0x8000, 64), vec![0x1005]);
        assert!(unwind(&down, 0x8001, 64).is_empty());
        assert!(unwind(&down, 0xfff8, 64).is_empty());
        assert!(unwind(&down, 0, 64).is_empty());
    }

    #[test]
    fn a_loop_in_the_chain_ends() {
        let code: &[(u64, &[u8])] = &[(0x1000, &[0xe8, 0, 0, 0, 0])];
        let read = memory(&[(0x8000, 0x8000), (0x8008, 0x1005)], code);
        assert_eq!(unwind(&read, 0x8000, 64), vec![0x1005]);
    }

    #[test]
    fn thirty_two_bit_frames_are_words_of_four() {
        let mut stack = vec![(0x8000u64, 0u64)];
        // [0x8000] = 0x8020 (next), [0x8004] = 0x1005 (ret), as two u32s in one u64.
        stack[0].1 = 0x8020 | (0x1005 << 32);
        let read = memory(&stack, &[(0x1000, &[0xe8, 0, 0, 0, 0])]);
        assert_eq!(unwind(&read, 0x8000, 32), vec![0x1005]);
    }

    #[test]
    fn indirect_calls_are_recognised() {
        for (code, len) in [
            (&[0xff, 0x15, 0, 0, 0, 0][..], 6),  // call [rip+disp32]
            (&[0xff, 0x50, 0x08][..], 3),        // call [rax+8]
            (&[0xff, 0x14, 0x24][..], 3),        // call [rsp]
            (&[0xff, 0x54, 0x24, 0x08][..], 4),  // call [rsp+8]
            (&[0x41, 0xff, 0xd3][..], 3),        // call r11
            (&[0xff, 0x94, 0x24, 0, 1, 0, 0][..], 7), // call [rsp+0x100]
        ] {
            let read = memory(&[], &[(0x1000, code)]);
            assert!(follows_call(&read, 0x1000 + len), "{code:x?}");
        }
        let read = memory(&[], &[(0x1000, &[0xff, 0xe0])]); // jmp rax
        assert!(!follows_call(&read, 0x1002));
    }

    #[test]
    fn ticks_are_counted_once() {
        let mut p = Profiler::new(1000).unwrap();
        let t = p.next_tick;
        assert_eq!(p.due(t - 1), 0);
        assert_eq!(p.due(t), 1);
        assert_eq!(p.due(t), 0);
        assert_eq!(p.due(t + 3_500_000), 3);
        assert!(Profiler::new(0).is_err() && Profiler::new(MAX_HZ + 1).is_err());
    }

    #[test]
    fn samples_past_the_cap_are_dropped_and_counted() {
        let mut p = Profiler::new(1000).unwrap();
        let s = Sample { t_ns: 0, weight: 2, place: Place::Idle, vcpu: 0, cpl: 0, bits: 0, ip: 0, frames: vec![] };
        p.samples = vec![s.clone(); MAX_SAMPLES];
        p.push(s);
        assert_eq!((p.samples.len(), p.dropped), (MAX_SAMPLES, 2));
    }
}
