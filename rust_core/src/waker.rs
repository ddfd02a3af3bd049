//! Bringing the domain's run loop back from other threads, and the one
//! place it sleeps.
//!
//! When every vCPU is idle the run loop waits here, in Rust, for the
//! earliest timer deadline, for a host file descriptor (Python's event
//! loop: its terminal, sockets, network) or for a signal from another
//! thread (a device model raising a guest port, Python asking for
//! attention). Signals go through an eventfd; if a vCPU is running
//! instead, the signal also kicks it (`ticker::Kicker`), so the run loop
//! sees the news at the next block boundary.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::OnceLock;
use std::time::Duration;

use crate::ticker::Kicker;

pub struct Waker {
    fd: OwnedFd,
    kicker: OnceLock<Kicker>,
    /// The host asked `run()` to return.
    host_attention: AtomicBool,
}

/// How an idle wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Signalled,
    HostReady,
    TimedOut,
}

impl Waker {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: a fresh descriptor we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            kicker: OnceLock::new(),
            host_attention: AtomicBool::new(false),
        })
    }

    /// The kicker of the engine the vCPUs run on (set once, at build).
    pub fn set_kicker(&self, kicker: Kicker) {
        let _ = self.kicker.set(kicker);
    }

    /// An event was raised that may wake or interrupt a vCPU: the run loop
    /// looks at every vCPU's wait again.
    pub fn wake_vcpus(&self) {
        self.signal();
    }

    /// The host wants `run()` to return soon.
    pub fn wake_host(&self) {
        self.host_attention.store(true, SeqCst);
        self.signal();
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to our eventfd; EAGAIN (counter full) is harmless.
        unsafe { libc::write(self.fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
        if let Some(k) = self.kicker.get() {
            k.kick();
        }
    }

    pub fn take_host_attention(&self) -> bool {
        self.host_attention.swap(false, SeqCst)
    }

    pub fn host_wants_attention(&self) -> bool {
        self.host_attention.load(SeqCst)
    }

    fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes from our non-blocking eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
    }

    /// Sleep until signalled, `host_fd` is readable, or `timeout` passes
    /// (`None`: no limit). Nanosecond resolution (ppoll), so a timer is not
    /// rounded up to the next millisecond.
    pub fn wait(&self, host_fd: Option<RawFd>, timeout: Option<Duration>) -> Wait {
        precise_timers();
        let mut fds = [
            libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: host_fd.unwrap_or(-1), events: libc::POLLIN, revents: 0 },
        ];
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: two valid pollfds (a negative fd is ignored by poll).
        let n = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, tsp, std::ptr::null()) };
        if n <= 0 {
            return if n == 0 { Wait::TimedOut } else { Wait::Signalled };
        }
        if fds[0].revents != 0 {
            self.drain();
        }
        if fds[1].revents != 0 {
            Wait::HostReady
        } else {
            Wait::Signalled
        }
    }
}

/// Ask the kernel to wake this thread at its timeouts, not up to 50 µs
/// later (the default timer slack, which a guest's timers would see as
/// lateness). Once per thread.
pub fn precise_timers() {
    thread_local!(static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    DONE.with(|d| {
        if !d.replace(true) {
            // SAFETY: plain prctl on the calling thread.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn waits_for_a_signal_a_host_fd_or_the_timeout() {
        let w = std::sync::Arc::new(Waker::new().unwrap());
        let t0 = Instant::now();
        assert_eq!(w.wait(None, Some(Duration::from_micros(1500))), Wait::TimedOut);
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_micros(1500) && waited < Duration::from_millis(50), "{waited:?}");

        let w2 = w.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            w2.wake_vcpus();
        });
        assert_eq!(w.wait(None, Some(Duration::from_secs(10))), Wait::Signalled);
        t.join().unwrap();
        assert!(!w.host_wants_attention());
        w.wake_host();
        assert!(w.host_wants_attention() && w.take_host_attention());
        assert!(!w.take_host_attention());

        let mut p = [0i32; 2];
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        assert_eq!(unsafe { libc::write(p[1], b"x".as_ptr() as *const libc::c_void, 1) }, 1);
        assert_eq!(w.wait(Some(p[0]), None), Wait::HostReady);
        unsafe {
            libc::close(p[0]);
            libc::close(p[1]);
        }
    }
}
