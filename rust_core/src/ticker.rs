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
//!
//! The ticker thread has to be given a CPU at the deadline, and on a busy
//! host it waits for one while the vCPU spins on its own (measured: 3.6 ms
//! on the runqueue, the vCPU thread running all along, its guest's timer
//! that much late). So the deadline also reaches the vCPU's own
//! thread, as an alarm: a POSIX timer whose signal the kernel delivers to
//! that thread, on the CPU it runs on, `ALARM_GRACE_NS` after the deadline
//! (a thread on time has kicked by then, and the alarm is moved to the next
//! deadline before it goes off). Its handler does what the thread would,
//! with the same rules (raise the flag; outside user space, or a stale one,
//! stop the engine; again every `RESEND` until the kick is taken). It needs
//! no lock: it interrupts the vCPU's own thread (nothing else of that
//! thread runs meanwhile) and acts only inside `Ticker::run`. A deadline
//! that passed outside a run is seen by `run` and `take`.

use std::cell::Cell;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use unicorn_engine::uc_engine;

/// How often a kick that has not been taken yet is sent again (or looked
/// at again, in user space).
const RESEND: Duration = Duration::from_micros(200);
/// `KickFlags::deadline_ns` when nothing is armed.
const NO_DEADLINE: u64 = u64::MAX;
/// `KickFlags::alarm_held_cpu` when the alarm has not held a kick back.
const NOT_HELD: u64 = u64::MAX;
/// `KickFlags::alarm_timer` when there is none.
const NO_TIMER: usize = usize::MAX;
/// The alarm goes off this long after the deadline: by then the ticker
/// thread has normally kicked, the vCPU has armed its next deadline and the
/// alarm has been set again before going off. So there is a signal only
/// when the thread is late.
const ALARM_GRACE_NS: u64 = 200_000;
/// An alarm is kept for a deadline this close to its own: every slice
/// computes the same deadline again from the guest clock, a few ns apart,
/// and a syscall each time is not worth those ns.
const ALARM_SLACK_NS: u64 = 10_000;
/// The alarm's signal: a real-time one, above those glibc keeps. If the
/// process already handles it, there are no alarms (the thread still kicks).
const ALARM_SIGNAL_ABOVE_SIGRTMIN: c_int = 5;
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

/// What the vCPU's block hook and its alarm share with the ticker, lock-free.
pub struct KickFlags {
    /// A kick is pending (set with `Line::pending`, or by the alarm alone).
    pub kick: AtomicBool,
    /// The vCPU runs lower-half code, where only its block hook may stop it.
    pub in_user_space: AtomicBool,
    /// Lower-half blocks started (written by the vCPU's hook only).
    pub user_blocks: AtomicU64,
    /// The armed deadline as the alarm sees it (CLOCK_MONOTONIC ns), until
    /// a kick for it is raised.
    deadline_ns: AtomicU64,
    /// The engine, for the alarm's stops (null when there is none).
    engine: AtomicPtr<uc_engine>,
    /// The alarm stopped the engine during the current run.
    alarm_stopped: AtomicBool,
    /// The alarm's POSIX timer (a kernel timer id), the thread it signals,
    /// and when it was last set to go off (CLOCK_MONOTONIC ns; 0: never).
    alarm_timer: AtomicUsize,
    alarm_tid: AtomicI32,
    alarm_at: AtomicU64,
    /// (vCPU thread CPU ns, lower-half blocks) when the alarm first found
    /// the kick held back for user space (`NOT_HELD`: not yet).
    alarm_held_cpu: AtomicU64,
    alarm_held_blocks: AtomicU64,
}

impl KickFlags {
    fn new() -> Self {
        Self {
            kick: AtomicBool::new(false),
            in_user_space: AtomicBool::new(false),
            user_blocks: AtomicU64::new(0),
            deadline_ns: AtomicU64::new(NO_DEADLINE),
            engine: AtomicPtr::new(std::ptr::null_mut()),
            alarm_stopped: AtomicBool::new(false),
            alarm_timer: AtomicUsize::new(NO_TIMER),
            alarm_tid: AtomicI32::new(0),
            alarm_at: AtomicU64::new(0),
            alarm_held_cpu: AtomicU64::new(NOT_HELD),
            alarm_held_blocks: AtomicU64::new(0),
        }
    }

    /// The alarm went off during a run (in its signal handler, on the vCPU's
    /// thread: only atomics, the clock, `timer_settime` and `uc_emu_stop`).
    fn alarm_went_off(&self) {
        let now = monotonic_ns();
        let deadline = self.deadline_ns.load(Ordering::SeqCst);
        if deadline != NO_DEADLINE {
            if now < deadline {
                // Set for another deadline (a resend, say): this one's is to come.
                self.set_alarm(deadline + ALARM_GRACE_NS);
                return;
            }
            self.deadline_ns.store(NO_DEADLINE, Ordering::SeqCst);
            self.kick.store(true, Ordering::SeqCst);
        }
        // As `Line::stop_engine` decides, the same way round: the flag is up
        // before where the vCPU is gets read.
        if !self.kick.load(Ordering::SeqCst) {
            return;
        }
        if self.in_user_space.load(Ordering::SeqCst) {
            if !self.user_space_is_stale() {
                // The block hook takes the kick; look again in case it cannot.
                self.set_alarm(now + RESEND.as_nanos() as u64);
                return;
            }
            self.in_user_space.store(false, Ordering::SeqCst);
        }
        let engine = self.engine.load(Ordering::SeqCst);
        if !engine.is_null() {
            // SAFETY: inside `Ticker::run` the engine is alive and running.
            unsafe { unicorn_engine::uc_emu_stop(engine) };
            self.alarm_stopped.store(true, Ordering::SeqCst);
        }
        // A stop just before `uc_emu_start` is cleared by it.
        self.set_alarm(now + RESEND.as_nanos() as u64);
    }

    /// `Line::user_space_is_stale`, for the alarm (on the vCPU's thread).
    fn user_space_is_stale(&self) -> bool {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: plain clock read into a local.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        let cpu = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        let blocks = self.user_blocks.load(Ordering::SeqCst);
        let held = self.alarm_held_cpu.load(Ordering::SeqCst);
        if held != NOT_HELD && blocks == self.alarm_held_blocks.load(Ordering::SeqCst) {
            return cpu.saturating_sub(held) >= STALE_USER_SPACE_NS;
        }
        self.alarm_held_cpu.store(cpu, Ordering::SeqCst);
        self.alarm_held_blocks.store(blocks, Ordering::SeqCst);
        false
    }

    /// Set the alarm to go off at `at_ns` (CLOCK_MONOTONIC).
    fn set_alarm(&self, at_ns: u64) {
        let timer = self.alarm_timer.load(Ordering::SeqCst);
        if timer == NO_TIMER {
            return;
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: a timer this ticker created and has not deleted.
        if unsafe { libc::timer_settime(timer as libc::timer_t, libc::TIMER_ABSTIME, &spec, std::ptr::null_mut()) } == 0 {
            self.alarm_at.store(at_ns, Ordering::SeqCst);
        }
    }
}

thread_local! {
    /// The flags of the ticker whose run this thread is in (`Ticker::run`),
    /// for the alarm's handler; null outside runs.
    static IN_RUN: Cell<*const KickFlags> = const { Cell::new(std::ptr::null()) };
    /// This thread's kernel id (0 until asked).
    static THREAD_ID: Cell<libc::pid_t> = const { Cell::new(0) };
}

extern "C" fn on_alarm_signal(_signal: c_int) {
    // SAFETY: errno is this thread's; the interrupted code gets it back.
    let errno = unsafe { *libc::__errno_location() };
    let flags = IN_RUN.with(|r| r.get());
    if !flags.is_null() {
        // SAFETY: set only for the length of a run, while the ticker lives.
        unsafe { (*flags).alarm_went_off() };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The alarm's signal with its handler installed, or `None` if the process
/// already uses that signal.
fn alarm_signal() -> Option<c_int> {
    static INSTALL: Once = Once::new();
    static SIGNAL: AtomicI32 = AtomicI32::new(0);
    INSTALL.call_once(|| {
        let signal = libc::SIGRTMIN() + ALARM_SIGNAL_ABOVE_SIGRTMIN;
        // SAFETY: sigaction with zeroed, then filled, structures.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut old) != 0 || old.sa_sigaction != libc::SIG_DFL {
                return;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_alarm_signal as extern "C" fn(c_int) as libc::sighandler_t;
            // Interrupted system calls of the vCPU's thread go on.
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) == 0 {
                SIGNAL.store(signal, Ordering::SeqCst);
            }
        }
    });
    Some(SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: plain clock read into a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn this_thread_id() -> libc::pid_t {
    THREAD_ID.with(|t| {
        if t.get() == 0 {
            // SAFETY: no preconditions.
            t.set(unsafe { libc::gettid() });
        }
        t.get()
    })
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
            KickFlags::new(),
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
                        s.2.deadline_ns.store(NO_DEADLINE, Ordering::SeqCst);
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
        self.shared.2.engine.store(engine, Ordering::SeqCst);
    }

    pub fn kicker(&self) -> Kicker {
        Kicker { shared: self.shared.clone() }
    }

    /// Kick at `when` (replacing any earlier request). Called on the thread
    /// that runs the engine: its alarm is set for the same time.
    pub fn arm(&self, when: Option<Instant>) {
        let flags = &self.shared.2;
        let now = monotonic_ns();
        let at = when.map_or(NO_DEADLINE, |w| now.saturating_add(w.saturating_duration_since(Instant::now()).as_nanos() as u64));
        let mut g = lock(&self.shared);
        flags.deadline_ns.store(at, Ordering::SeqCst);
        if g.deadline != when {
            g.deadline = when;
            drop(g);
            self.shared.1.notify_one();
        } else {
            drop(g);
        }
        if at == NO_DEADLINE || !self.alarm_for_this_thread() {
            return;
        }
        let alarm = at.saturating_add(ALARM_GRACE_NS);
        let set = flags.alarm_at.load(Ordering::SeqCst);
        if set <= now || set.abs_diff(alarm) > ALARM_SLACK_NS {
            flags.set_alarm(alarm);
        }
    }

    /// Whether this thread has an alarm: the first time it arms, a POSIX
    /// timer is made to signal it (again if another thread ran the engine).
    fn alarm_for_this_thread(&self) -> bool {
        let flags = &self.shared.2;
        let tid = this_thread_id();
        if flags.alarm_tid.load(Ordering::SeqCst) == tid {
            return flags.alarm_timer.load(Ordering::SeqCst) != NO_TIMER;
        }
        let old = flags.alarm_timer.swap(NO_TIMER, Ordering::SeqCst);
        if old != NO_TIMER {
            // SAFETY: our timer, no longer reachable through the flags.
            unsafe { libc::timer_delete(old as libc::timer_t) };
        }
        flags.alarm_tid.store(tid, Ordering::SeqCst);
        flags.alarm_at.store(0, Ordering::SeqCst);
        let Some(signal) = alarm_signal() else { return false };
        // SAFETY: zeroed C structures filled in; the timer id is written by
        // the kernel.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            let mut event: libc::sigevent = std::mem::zeroed();
            event.sigev_notify = libc::SIGEV_THREAD_ID;
            event.sigev_signo = signal;
            event.sigev_notify_thread_id = tid;
            let mut timer: libc::timer_t = std::ptr::null_mut();
            if libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) != 0 {
                return false;
            }
            flags.alarm_timer.store(timer as usize, Ordering::SeqCst);
        }
        true
    }

    /// The flags the vCPU's block hook reads and writes.
    pub fn flags(&self) -> *const KickFlags {
        &self.shared.2
    }

    /// Take the pending kick; returns whether there was one. A deadline
    /// that has passed is one, whether the thread, the alarm or neither has
    /// seen it yet.
    pub fn take(&self) -> bool {
        let flags = &self.shared.2;
        let mut g = lock(&self.shared);
        let flagged = flags.kick.swap(false, Ordering::SeqCst);
        g.held_since = None;
        flags.alarm_held_cpu.store(NOT_HELD, Ordering::SeqCst);
        let due = g.deadline.is_some_and(|d| Instant::now() >= d);
        if due {
            g.deadline = None;
            flags.deadline_ns.store(NO_DEADLINE, Ordering::SeqCst);
        }
        std::mem::take(&mut g.pending) | flagged | due
    }

    /// Run `f` (one `uc_emu_start` from `rip`) as a run that kicks may
    /// stop, unless a kick is already pending or the deadline has passed
    /// (then `None`: take it first). Returns what `f` returned and whether
    /// a stop was sent meanwhile.
    pub fn run<T>(&self, rip: u64, f: impl FnOnce() -> T) -> Option<(T, bool)> {
        let flags = &self.shared.2;
        // Before the alarm may act: it reads both.
        flags.in_user_space.store(is_user_space(rip), Ordering::SeqCst);
        flags.alarm_stopped.store(false, Ordering::SeqCst);
        IN_RUN.with(|r| r.set(flags));
        {
            let mut g = lock(&self.shared);
            // An alarm that went off before IN_RUN was set did nothing.
            if g.pending || flags.kick.load(Ordering::SeqCst) || g.deadline.is_some_and(|d| Instant::now() >= d) {
                IN_RUN.with(|r| r.set(std::ptr::null()));
                return None;
            }
            g.running = true;
            g.stopped = false;
            // SAFETY: no preconditions.
            g.vcpu_thread = Some(unsafe { libc::pthread_self() });
        }
        let r = f();
        IN_RUN.with(|r| r.set(std::ptr::null()));
        let mut g = lock(&self.shared);
        g.running = false;
        g.vcpu_thread = None;
        let stopped = std::mem::take(&mut g.stopped) | flags.alarm_stopped.load(Ordering::SeqCst);
        Some((r, stopped))
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
        let flags = &self.shared.2;
        flags.engine.store(std::ptr::null_mut(), Ordering::SeqCst);
        let timer = flags.alarm_timer.swap(NO_TIMER, Ordering::SeqCst);
        if timer != NO_TIMER {
            // SAFETY: our timer. A signal of it still queued finds no run.
            unsafe { libc::timer_delete(timer as libc::timer_t) };
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
    use crate::memory::GuestRam;
    use crate::uc::Engine;
    use std::os::unix::thread::JoinHandleExt;

    const KERNEL_RIP: u64 = 0xffff_ffff_8100_0000;
    const CODE: u64 = 0x1000;

    /// The ticker thread gets a CPU only when this thread leaves it one: both
    /// on this thread's CPU, the ticker thread SCHED_IDLE. As on a host whose
    /// other CPUs are busy. Undone (for this thread) on drop.
    struct StarvedTicker {
        affinity: libc::cpu_set_t,
    }

    impl StarvedTicker {
        fn new(t: &Ticker) -> Self {
            let ticker = t.thread.as_ref().unwrap().as_pthread_t() as libc::pthread_t;
            let size = std::mem::size_of::<libc::cpu_set_t>();
            // SAFETY: plain scheduling calls on this thread and the ticker's.
            unsafe {
                let mut affinity: libc::cpu_set_t = std::mem::zeroed();
                assert_eq!(libc::sched_getaffinity(0, size, &mut affinity), 0);
                let mut one: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(libc::sched_getcpu() as usize, &mut one);
                assert_eq!(libc::sched_setaffinity(0, size, &one), 0);
                assert_eq!(libc::pthread_setaffinity_np(ticker, size, &one), 0);
                let idle = libc::sched_param { sched_priority: 0 };
                assert_eq!(libc::pthread_setschedparam(ticker, libc::SCHED_IDLE, &idle), 0);
                Self { affinity }
            }
        }
    }

    impl Drop for StarvedTicker {
        fn drop(&mut self) {
            // SAFETY: as in `new`.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.affinity) };
        }
    }

    /// Time this thread waited for a CPU so far (ns), as the kernel counts it.
    fn runqueue_ns() -> u64 {
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
        s.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// How late after `deadline` it is now, less the time this thread spent
    /// waiting for a CPU since `runqueue_before` (no preemption is earlier
    /// than the host gives the vCPU a CPU).
    /// An engine on 1 MiB of RAM with `jmp .` at CODE, the ticker's to stop.
    fn spinning_engine(t: &Ticker) -> (GuestRam, Engine) {
        let ram = GuestRam::new(1 << 20).unwrap();
        ram.slice_mut(CODE, 2).unwrap().copy_from_slice(&[0xeb, 0xfe]); // jmp .
        let mut engine = Engine::new_x86_64().unwrap();
        unsafe { engine.map_ptr(0, 1 << 20, ram.host_ptr()) }.unwrap();
        t.set_engine(engine.raw());
        (ram, engine)
    }

    fn late_of_ours(deadline: Instant, runqueue_before: u64) -> Duration {
        let late = Instant::now().saturating_duration_since(deadline);
        late.saturating_sub(Duration::from_nanos(runqueue_ns() - runqueue_before))
    }

    #[test]
    fn the_alarm_stops_kernel_code_while_the_ticker_thread_waits_for_a_cpu() {
        let t = Ticker::new();
        let (_ram, mut engine) = spinning_engine(&t);
        let starved = StarvedTicker::new(&t);
        for _ in 0..5 {
            let runqueue = runqueue_ns();
            let deadline = Instant::now() + Duration::from_millis(3);
            t.arm(Some(deadline));
            let (err, stopped) = t.run(KERNEL_RIP, || engine.start(CODE, 0)).expect("no kick pending");
            let late = late_of_ours(deadline, runqueue);
            assert_eq!(err, unicorn_engine::uc_error::OK);
            assert!(stopped, "a stop was sent");
            assert!(t.take(), "and the kick is there to take");
            assert!(late < Duration::from_millis(1), "stopped {late:?} after the deadline");
            assert_eq!(engine.read(crate::uc::Reg::RIP), CODE, "between two instructions");
        }
        drop(starved);
        t.set_engine(std::ptr::null_mut());
    }

    #[test]
    fn in_user_space_the_alarm_only_raises_the_flag() {
        let t = Ticker::new();
        let flags = unsafe { &*t.flags() };
        let starved = StarvedTicker::new(&t);
        for _ in 0..5 {
            let runqueue = runqueue_ns();
            let deadline = Instant::now() + Duration::from_millis(3);
            t.arm(Some(deadline));
            // What the block hook does: look at the flag before each block.
            let give_up = deadline + Duration::from_secs(5);
            let (seen, stopped) = t
                .run(0x40_0000, || {
                    while !flags.kick.load(Ordering::SeqCst) && Instant::now() < give_up {
                        std::hint::spin_loop();
                    }
                    late_of_ours(deadline, runqueue)
                })
                .expect("no kick pending");
            assert!(!stopped, "no stop sent in user space");
            assert!(t.take());
            assert!(seen < Duration::from_millis(1), "flag raised {seen:?} after the deadline");
        }
        drop(starved);
    }

    #[test]
    fn the_alarm_sees_through_a_stale_user_space() {
        // Kernel code entered from user space without a stop (no lower-half
        // block starts any more): the alarm stops it once the vCPU thread
        // has run 1 ms of CPU time past the kick without one.
        let t = Ticker::new();
        let (_ram, mut engine) = spinning_engine(&t);
        let starved = StarvedTicker::new(&t);
        for _ in 0..3 {
            let runqueue = runqueue_ns();
            let deadline = Instant::now() + Duration::from_millis(3);
            t.arm(Some(deadline));
            let (_, stopped) = t.run(0x40_0000, || engine.start(CODE, 0)).expect("no kick pending");
            let late = late_of_ours(deadline, runqueue);
            assert!(stopped && t.take());
            assert!(late < Duration::from_millis(3), "stopped {late:?} after the deadline");
        }
        drop(starved);
        t.set_engine(std::ptr::null_mut());
    }

    #[test]
    fn a_deadline_passed_outside_a_run_is_a_kick() {
        let t = Ticker::new();
        let starved = StarvedTicker::new(&t);
        let deadline = Instant::now() + Duration::from_millis(2);
        t.arm(Some(deadline));
        // Busy, so that the ticker thread does not get the CPU meanwhile.
        while Instant::now() < deadline + Duration::from_millis(1) {
            std::hint::spin_loop();
        }
        assert!(t.run(KERNEL_RIP, || ()).is_none(), "no run past the deadline");
        assert!(t.take());
        assert!(!t.take(), "once");
        drop(starved);
    }

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
