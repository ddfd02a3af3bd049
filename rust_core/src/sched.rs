//! The scheduling policy, apart from the machinery so that it can be tested
//! without a guest: which vCPU runs next, for how long, and what the domain
//! does when none can run.
//!
//! A domain's vCPUs share one host thread and one engine (cpu.rs), so they
//! run in turn: round-robin over the runnable ones, each for `VCPU_SLICE`
//! while others wait, for as long as it likes when it is the only one.
//! A slice also ends when its vCPU halts or blocks, and early when another
//! vCPU wakes (an IPI, an event, its timer, VCPUOP_up). A vCPU that has just
//! woken from a wait is boosted, as in Xen's credit scheduler: it runs
//! before the others that were already runnable, so it sees its interrupt
//! about as soon as it would on parallel hardware (and the sender of an
//! IPI usually waits for the answer anyway: Linux's smp_call_function spins).

use std::time::Duration;

/// How long one vCPU runs while others are runnable. Short enough that a
/// vCPU spinning on another (a lock holder, a csd lock) loses at most this
/// much per round; long enough that the switch (a register reload and a
/// TLB refill, a few microseconds) stays a small fraction.
pub const VCPU_SLICE: Duration = Duration::from_millis(1);

/// What the scheduler needs to know of one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// Up, and not waiting for anything.
    pub runnable: bool,
    /// Woken from a wait since it last ran: goes first.
    pub boosted: bool,
    /// Its earliest timer or poll timeout (system time), while it waits.
    pub deadline: Option<u64>,
    /// Nothing can ever wake it: down, waiting for a start-up IPI, or
    /// halted with interrupts off (only another vCPU's INIT/NMI could).
    pub stuck: bool,
}

/// What the domain does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Run this vCPU; `alone` if no other vCPU is runnable.
    Run { vcpu: u32, alone: bool },
    /// Every vCPU waits: sleep until the earliest deadline (None: until
    /// the host has something).
    Wait { deadline: Option<u64> },
    /// Nothing can ever run again.
    Hung,
}

#[derive(Debug, Default)]
pub struct RoundRobin {
    last: Option<u32>,
}

impl RoundRobin {
    /// The next decision: the first boosted runnable vCPU after the last
    /// one run, else the first runnable one.
    pub fn next(&mut self, views: &[View]) -> Next {
        let n = views.len() as u32;
        let start = self.last.map_or(0, |l| l + 1);
        let runnable: Vec<u32> = (0..n).map(|k| (start + k) % n).filter(|&v| views[v as usize].runnable).collect();
        let boosted = runnable.iter().copied().find(|&v| views[v as usize].boosted);
        if let Some(vcpu) = boosted.or(runnable.first().copied()) {
            self.last = Some(vcpu);
            return Next::Run { vcpu, alone: runnable.len() == 1 };
        }
        if views.iter().all(|v| v.stuck) {
            return Next::Hung;
        }
        Next::Wait { deadline: views.iter().filter(|v| !v.stuck).filter_map(|v| v.deadline).min() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> View {
        View { runnable: true, boosted: false, deadline: None, stuck: false }
    }
    fn woken() -> View {
        View { boosted: true, ..run() }
    }
    fn wait(deadline: Option<u64>) -> View {
        View { runnable: false, boosted: false, deadline, stuck: false }
    }
    fn stuck() -> View {
        View { runnable: false, boosted: false, deadline: None, stuck: true }
    }

    #[test]
    fn round_robin_over_the_runnable() {
        let mut rr = RoundRobin::default();
        let views = [run(), wait(None), run(), run()];
        let picks: Vec<Next> = (0..4).map(|_| rr.next(&views)).collect();
        let ids: Vec<u32> = picks
            .iter()
            .map(|p| match p {
                Next::Run { vcpu, alone: false } => *vcpu,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, vec![0, 2, 3, 0]);
        assert_eq!(rr.next(&[wait(None), run()]), Next::Run { vcpu: 1, alone: true });
    }

    #[test]
    fn a_woken_vcpu_goes_before_those_already_runnable() {
        let mut rr = RoundRobin::default();
        assert_eq!(rr.next(&[run(), run(), run(), woken()]), Next::Run { vcpu: 3, alone: false });
        // Then the round robin goes on from it.
        assert_eq!(rr.next(&[run(), run(), run(), run()]), Next::Run { vcpu: 0, alone: false });
        assert_eq!(rr.next(&[run(), woken(), run(), woken()]), Next::Run { vcpu: 1, alone: false });
        assert_eq!(rr.next(&[run(), run(), run(), woken()]), Next::Run { vcpu: 3, alone: false });
    }

    #[test]
    fn idle_waits_for_the_earliest_deadline_of_those_that_can_wake() {
        let mut rr = RoundRobin::default();
        assert_eq!(rr.next(&[wait(Some(50)), wait(Some(20)), stuck()]), Next::Wait { deadline: Some(20) });
        assert_eq!(rr.next(&[wait(None), stuck()]), Next::Wait { deadline: None });
        assert_eq!(rr.next(&[stuck(), stuck()]), Next::Hung);
        assert_eq!(rr.next(&[stuck(), run()]), Next::Run { vcpu: 1, alone: true });
    }
}
