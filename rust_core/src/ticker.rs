//! Preemption: at a deadline (or when a host thread asks through a
//! `Kicker`) a helper thread stops the running vCPU. Exactly: the stop must
//! land before an instruction, never inside one.
//!
//! * In kernel space (upper-half addresses) it calls `uc_emu_stop` from its
//!   own thread. That is exact because the vCPU's engines run without
//!   Unicorn's exit check after every memory access
//!   (`unicorn_gaps::set_exit_checks`): the request is seen at the start of
//!   the next translated block. (With the checks on it tore instructions:
//!   docs/unicorn.md, "Stopping the engine".) A RIP written by a hook must be forgotten
//!   for it (`unicorn_gaps::forget_pc_write`).
//! * In user space (the lower half) a pending stop is not harmless: the
//!   SYSCALL helper then skips our hook and retires the instruction as a
//!   no-op. There a block hook, run at the start of every lower-half block,
//!   polls the flag and stops the engine itself, before the block runs.
//!
//! Which of the two applies is decided Dekker-style with the vCPU: the hook
//! publishes "in user space" before it reads the flag, the thread raises the
//! flag before it reads where the vCPU is (both sequentially consistent),
//! so at least one of them sees the other. Kernel code, most of what Linux
//! runs at boot, thus pays no per-block call: that was about 14% of the
//! boot when every block had the hook.
//!
//! "In user space" goes stale if lower-half code jumps to the upper half
//! without a stop in between (Linux's PVH entry does, once): then no hook
//! runs and the flag is never seen. The thread notices that the vCPU's
//! thread keeps using CPU time while no lower-half block starts, and stops
//! it itself (a thread merely descheduled inside a user block uses none).
//!
//! Unicorn's `uc_emu_start` clears a stop requested just before it, so a
//! stop can be lost in that window: while a kick is pending and the vCPU
//! runs, the thread repeats the stop every `RESEND`. Stops are sent under
//! one mutex that the vCPU takes around `uc_emu_start`, so none is sent
//! into a run after the vCPU has taken the kick, or once the engine is gone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use unicorn_engine::uc_engine;

/// How often a kick that has not been taken yet is sent again (or looked
/// at again, in user space).
const RESEND: Duration = Duration::from_micros(200);
/// vCPU thread CPU time without a lower-half block after which "in user
/// space" is stale: far more than any single block takes.
const STALE_USER_SPACE_NS: u64 = 1_000_000;

struct Line {
    /// The engine to stop; null before the vCPU registers it and after drop.
    engine: *mut uc_engine,
    /// Inside `uc_emu_start`, where a stop is exact.
    running: bool,
    /// A kick the vCPU has not taken yet.
    pending: bool,
    /// A stop was sent during the current run.
    stopped: bool,
    deadline: Option<Instant>,
    quit: bool,
    /// The thread running the engine (for its CPU clock), while running.
    vcpu_thread: Option<libc::pthread_t>,
    /// (vCPU thread CPU ns, lower-half blocks) when the pending kick was
    /// first held back for user space.
    held_since: Option<(u64, u64)>,
}

// SAFETY: the engine pointer is only used for `uc_emu_stop` (which only
// stores to the engine's request flags), only under the mutex, and the vCPU
// clears it under the same mutex before the engine is closed.
unsafe impl Send for Line {}

/// What the vCPU's block hook shares with the ticker, lock-free.
#[derive(Default)]
pub struct KickFlags {
    /// A kick is pending (mirrors `Line::pending`).
    pub kick: AtomicBool,
    /// The vCPU runs lower-half code, where only its block hook may stop it.
    pub in_user_space: AtomicBool,
    /// Lower-half blocks started (written by the vCPU's hook only).
    pub user_blocks: AtomicU64,
}

impl Line {
    fn kick(&mut self, flags: &KickFlags) {
        self.pending = true;
        flags.kick.store(true, Ordering::SeqCst);
        self.stop_engine(flags);
    }

    fn stop_engine(&mut self, flags: &KickFlags) {
        if self.running && flags.in_user_space.load(Ordering::SeqCst) && self.user_space_is_stale(flags) {
            flags.in_user_space.store(false, Ordering::SeqCst);
        }
        if self.running && !self.engine.is_null() && !flags.in_user_space.load(Ordering::SeqCst) {
            // SAFETY: see `unsafe impl Send for Line`.
            unsafe { unicorn_engine::uc_emu_stop(self.engine) };
            self.stopped = true;
        }
    }
}

impl Line {
    /// Whether the vCPU, said to be in user space, has been running other
    /// code since the kick was first held back (see the module comment).
    fn user_space_is_stale(&mut self, flags: &KickFlags) -> bool {
        let Some(cpu) = self.vcpu_thread.and_then(thread_cpu_ns) else {
            return false;
        };
        let blocks = flags.user_blocks.load(Ordering::SeqCst);
        match self.held_since {
            Some((cpu0, blocks0)) if blocks == blocks0 => cpu.saturating_sub(cpu0) >= STALE_USER_SPACE_NS,
            _ => {
                self.held_since = Some((cpu, blocks));
                false
            }
        }
    }
}

/// CPU time a thread has used, in ns.
fn thread_cpu_ns(thread: libc::pthread_t) -> Option<u64> {
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `thread` is the vCPU thread, alive while `running` (it clears
    // `vcpu_thread` under the same lock before it could exit).
    unsafe {
        if libc::pthread_getcpuclockid(thread, &mut clock) != 0 || libc::clock_gettime(clock, &mut ts) != 0 {
            return None;
        }
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

type Shared = Arc<(Mutex<Line>, Condvar, KickFlags)>;

fn lock(s: &Shared) -> MutexGuard<'_, Line> {
    s.0.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Ticker {
    shared: Shared,
    thread: Option<JoinHandle<()>>,
}

/// A handle other threads may keep to stop the vCPU soon.
#[derive(Clone)]
pub struct Kicker {
    shared: Shared,
}

impl Kicker {
    pub fn kick(&self) {
        lock(&self.shared).kick(&self.shared.2);
        self.shared.1.notify_one();
    }
}

impl Ticker {
    pub fn new() -> Self {
        let shared: Shared = Arc::new((
            Mutex::new(Line {
                engine: std::ptr::null_mut(),
                running: false,
                pending: false,
                stopped: false,
                deadline: None,
                quit: false,
                vcpu_thread: None,
                held_since: None,
            }),
            Condvar::new(),
            KickFlags::default(),
        ));
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pvhvm-ticker".into())
            .spawn(move || {
                crate::waker::precise_timers();
                let mut g = lock(&s);
                loop {
                    if g.quit {
                        return;
                    }
                    let now = Instant::now();
                    if g.deadline.is_some_and(|d| now >= d) {
                        g.deadline = None;
                        g.kick(&s.2);
                    } else if g.pending {
                        g.stop_engine(&s.2);
                    }
                    let resend = (g.pending && g.running).then(|| now + RESEND);
                    let wake = match (g.deadline, resend) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    g = match wake {
                        None => s.1.wait(g).unwrap_or_else(|e| e.into_inner()),
                        Some(w) => {
                            let d = w.saturating_duration_since(Instant::now());
                            s.1.wait_timeout(g, d).unwrap_or_else(|e| e.into_inner()).0
                        }
                    };
                }
            })
            .expect("spawn ticker thread");
        Self { shared, thread: Some(thread) }
    }

    /// The engine kicks stop (null to forget it before it is closed).
    pub fn set_engine(&self, engine: *mut uc_engine) {
        lock(&self.shared).engine = engine;
    }

    pub fn kicker(&self) -> Kicker {
        Kicker { shared: self.shared.clone() }
    }

    /// Kick at `when` (replacing any earlier request).
    pub fn arm(&self, when: Option<Instant>) {
        let mut g = lock(&self.shared);
        if g.deadline != when {
            g.deadline = when;
            drop(g);
            self.shared.1.notify_one();
        }
    }

    /// The flags the vCPU's block hook reads and writes.
    pub fn flags(&self) -> *const KickFlags {
        &self.shared.2
    }

    /// Take the pending kick; returns whether there was one.
    pub fn take(&self) -> bool {
        let mut g = lock(&self.shared);
        self.shared.2.kick.store(false, Ordering::SeqCst);
        g.held_since = None;
        std::mem::take(&mut g.pending)
    }

    /// Run `f` (one `uc_emu_start` from `rip`) as a run that kicks may
    /// stop, unless a kick is already pending (then `None`: take it first).
    /// Returns what `f` returned and whether a stop was sent meanwhile.
    pub fn run<T>(&self, rip: u64, f: impl FnOnce() -> T) -> Option<(T, bool)> {
        {
            let mut g = lock(&self.shared);
            if g.pending {
                return None;
            }
            g.running = true;
            g.stopped = false;
            // SAFETY: no preconditions.
            g.vcpu_thread = Some(unsafe { libc::pthread_self() });
            self.shared.2.in_user_space.store(is_user_space(rip), Ordering::SeqCst);
        }
        let r = f();
        let mut g = lock(&self.shared);
        g.running = false;
        g.vcpu_thread = None;
        Some((r, std::mem::take(&mut g.stopped)))
    }
}

/// The lower half of the canonical address space, where the block hook
/// (not the ticker thread) stops the vCPU.
pub const USER_SPACE_END: u64 = 0x7fff_ffff_ffff_ffff;

pub fn is_user_space(rip: u64) -> bool {
    rip <= USER_SPACE_END
}

impl Default for Ticker {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        {
            let mut g = lock(&self.shared);
            g.quit = true;
            g.engine = std::ptr::null_mut();
        }
        self.shared.1.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kicks_at_the_deadline_and_on_request() {
        let t = Ticker::new();
        assert!(!t.take());
        t.arm(Some(Instant::now() + Duration::from_millis(5)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(t.take());
        assert!(!t.take());
        t.arm(Some(Instant::now() + Duration::from_secs(60)));
        t.arm(None);
        t.kicker().kick();
        // A pending kick keeps the vCPU from starting until it is taken.
        assert!(t.run(0, || ()).is_none());
        assert!(t.take());
        assert_eq!(t.run(0, || 7), Some((7, false)));
    }
}
