//! Preemption without tearing: a helper thread only raises an atomic flag at
//! a deadline (or when the host asks); the vCPU's block hook sees the flag at
//! the next translated block and stops the engine from inside, which is exact
//! (unicorn.md, "Preemption"). Nothing here ever touches the engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

#[derive(Default)]
struct Shared {
    deadline: Option<Instant>,
    quit: bool,
}

pub struct Ticker {
    kick: Arc<AtomicBool>,
    state: Arc<(Mutex<Shared>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

/// A handle other threads may keep to stop the vCPU at its next block.
#[derive(Clone)]
pub struct Kicker {
    kick: Arc<AtomicBool>,
}

impl Kicker {
    pub fn kick(&self) {
        self.kick.store(true, Ordering::Release);
    }
}

impl Ticker {
    pub fn new() -> Self {
        let kick = Arc::new(AtomicBool::new(false));
        let state = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let (k, s) = (kick.clone(), state.clone());
        let thread = std::thread::Builder::new()
            .name("pvhvm-ticker".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut g = lock.lock().unwrap();
                loop {
                    if g.quit {
                        return;
                    }
                    match g.deadline {
                        None => g = cv.wait(g).unwrap(),
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                g.deadline = None;
                                k.store(true, Ordering::Release);
                            } else {
                                g = cv.wait_timeout(g, d - now).unwrap().0;
                            }
                        }
                    }
                }
            })
            .expect("spawn ticker thread");
        Self { kick, state, thread: Some(thread) }
    }

    /// The flag the block hook polls.
    pub fn flag(&self) -> *const AtomicBool {
        Arc::as_ptr(&self.kick)
    }

    pub fn kicker(&self) -> Kicker {
        Kicker { kick: self.kick.clone() }
    }

    /// Raise the flag at `when` (replacing any earlier request).
    pub fn arm(&self, when: Option<Instant>) {
        let (lock, cv) = &*self.state;
        let mut g = lock.lock().unwrap();
        if g.deadline != when {
            g.deadline = when;
            cv.notify_one();
        }
    }

    /// Clear the flag; returns whether it was set.
    pub fn take(&self) -> bool {
        self.kick.swap(false, Ordering::AcqRel)
    }
}

impl Default for Ticker {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.state;
            lock.lock().unwrap().quit = true;
            cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn raises_the_flag_at_the_deadline() {
        let t = Ticker::new();
        assert!(!t.take());
        t.arm(Some(Instant::now() + Duration::from_millis(5)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(t.take());
        assert!(!t.take());
        t.arm(Some(Instant::now() + Duration::from_secs(60)));
        t.arm(None);
        t.kicker().kick();
        assert!(t.take());
    }
}
