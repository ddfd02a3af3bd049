//! What a debugger (the GDB stub, python/pvhvm/gdbstub.py) asks of the run
//! loop: code breakpoints, a one-instruction step per vCPU, vCPUs held
//! still while another steps. Pure bookkeeping; domain.rs acts on it and
//! cpu.rs puts the breakpoints on the engine (Unicorn's exits: the
//! instruction at the address is not executed, and no guest byte changes).

use std::collections::BTreeSet;

/// Breakpoints a debugger may set at once (gdb sets a handful; the cap
/// bounds what a client can make the core hold).
pub const MAX_BREAKPOINTS: usize = 4096;

/// Why a vCPU stopped for the debugger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugStop {
    /// It reached a breakpoint (before executing the instruction there).
    Breakpoint,
    /// It executed the one instruction it was asked to step (or could not
    /// run at all: halted, blocked or down).
    Step,
}

impl DebugStop {
    pub fn name(self) -> &'static str {
        match self {
            DebugStop::Breakpoint => "breakpoint",
            DebugStop::Step => "step",
        }
    }
}

#[derive(Debug, Default)]
pub struct Debugger {
    /// Linear addresses of the breakpoints asked for.
    pub breakpoints: BTreeSet<u64>,
    /// vCPUs asked to execute one instruction and stop (bit per vCPU).
    steps: u64,
    /// vCPUs the scheduler leaves alone (bit per vCPU).
    frozen: u64,
    /// The address each vCPU last stopped at for the debugger: resuming
    /// there executes the instruction rather than stopping again.
    resume_over: Vec<Option<u64>>,
}

impl Debugger {
    pub fn new(nr_vcpus: u32) -> Self {
        Self { resume_over: vec![None; nr_vcpus as usize], ..Default::default() }
    }

    pub fn set_breakpoints(&mut self, addrs: &[u64]) -> Result<(), String> {
        let set: BTreeSet<u64> = addrs.iter().copied().collect();
        if set.len() > MAX_BREAKPOINTS {
            return Err(format!("at most {MAX_BREAKPOINTS} breakpoints, not {}", set.len()));
        }
        self.breakpoints = set;
        Ok(())
    }

    pub fn request_step(&mut self, vcpu: usize, on: bool) {
        if vcpu < 64 {
            if on {
                self.steps |= 1 << vcpu;
            } else {
                self.steps &= !(1 << vcpu);
            }
        }
    }

    pub fn stepping(&self, vcpu: usize) -> bool {
        vcpu < 64 && self.steps & (1 << vcpu) != 0
    }

    pub fn any_step(&self) -> bool {
        self.steps != 0
    }

    pub fn set_frozen(&mut self, vcpus: &[usize]) {
        self.frozen = vcpus.iter().filter(|&&v| v < 64).fold(0, |m, &v| m | 1 << v);
    }

    pub fn frozen(&self, vcpu: usize) -> bool {
        vcpu < 64 && self.frozen & (1 << vcpu) != 0
    }

    /// vCPU `vcpu` stopped for the debugger at `address`: its step (if
    /// any) is done, and resuming there goes past the breakpoint.
    pub fn stopped(&mut self, vcpu: usize, address: u64) {
        self.request_step(vcpu, false);
        if let Some(slot) = self.resume_over.get_mut(vcpu) {
            *slot = Some(address);
        }
    }

    /// Whether vCPU `vcpu`, about to run at `ip`, must first execute the
    /// instruction at a breakpoint there (it stopped there, or steps it).
    /// Asked once per start: the note of where it stopped is used up.
    pub fn go_over(&mut self, vcpu: usize, ip: u64) -> bool {
        let stopped_here = self.resume_over.get_mut(vcpu).and_then(|s| s.take()) == Some(ip);
        self.breakpoints.contains(&ip) && (stopped_here || self.stepping(vcpu))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_goes_over_the_breakpoint_it_stopped_at_once() {
        let mut d = Debugger::new(2);
        d.set_breakpoints(&[0x1000, 0x2000]).unwrap();
        assert!(!d.go_over(0, 0x1000), "never stopped there: it stops");
        d.stopped(0, 0x1000);
        assert!(!d.go_over(1, 0x1000), "another vCPU stops there");
        assert!(d.go_over(0, 0x1000));
        assert!(!d.go_over(0, 0x1000), "the next time round it stops again");
        d.request_step(1, true);
        assert!(d.go_over(1, 0x2000), "a step executes the instruction at a breakpoint");
        assert!(!d.go_over(1, 0x3000));
        d.stopped(1, 0x3000);
        assert!(!d.stepping(1));
    }

    #[test]
    fn frozen_steps_and_limits() {
        let mut d = Debugger::new(70);
        d.set_frozen(&[1, 3, 200]);
        assert!(d.frozen(1) && d.frozen(3) && !d.frozen(0) && !d.frozen(200));
        d.request_step(100, true);
        assert!(!d.any_step());
        let many: Vec<u64> = (0..MAX_BREAKPOINTS as u64 + 1).collect();
        assert!(d.set_breakpoints(&many).is_err());
        assert!(d.breakpoints.is_empty());
    }
}
