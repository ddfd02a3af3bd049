//! Counters, the recent calls and the trace of hypercalls: a leaf module
//! that the dispatcher writes and the domain state keeps.

use std::collections::VecDeque;

use crate::abi::hc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEntry {
    pub vcpu: u32,
    pub nr: u64,
    pub args: [u64; 5],
    pub result: i64,
    /// Guest system time (ns since the domain started) at the call.
    pub time_ns: u64,
}

pub struct HypercallLog {
    pub counts: [u64; hc::TABLE_SIZE],
    pub tracing: bool,
    trace: VecDeque<TraceEntry>,
    pub dropped: u64,
    /// The last calls of each vCPU, kept always for crash reports.
    recent: Vec<VecDeque<TraceEntry>>,
}

const TRACE_CAP: usize = 1 << 16;
const RECENT_CAP: usize = 32;

impl HypercallLog {
    pub fn new(nr_vcpus: u32) -> Self {
        Self {
            counts: [0; hc::TABLE_SIZE],
            tracing: false,
            trace: VecDeque::new(),
            dropped: 0,
            recent: (0..nr_vcpus).map(|_| VecDeque::with_capacity(RECENT_CAP)).collect(),
        }
    }

    pub fn record(&mut self, e: TraceEntry) {
        self.counts[(e.nr as usize).min(hc::TABLE_SIZE - 1)] += 1;
        if let Some(recent) = self.recent.get_mut(e.vcpu as usize) {
            if recent.len() == RECENT_CAP {
                recent.pop_front();
            }
            recent.push_back(e);
        }
        if self.tracing {
            if self.trace.len() == TRACE_CAP {
                self.trace.pop_front();
                self.dropped += 1;
            }
            self.trace.push_back(e);
        }
    }

    pub fn take_trace(&mut self) -> Vec<TraceEntry> {
        self.trace.drain(..).collect()
    }

    /// The last calls of every vCPU, oldest first.
    pub fn recent(&self) -> Vec<TraceEntry> {
        let mut all: Vec<TraceEntry> = self.recent.iter().flatten().copied().collect();
        all.sort_by_key(|e| e.time_ns);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(vcpu: u32, nr: u64, time_ns: u64) -> TraceEntry {
        TraceEntry { vcpu, nr, args: [0; 5], result: 0, time_ns }
    }

    #[test]
    fn counts_recent_per_vcpu_and_trace() {
        let mut log = HypercallLog::new(2);
        for i in 0..80 {
            log.record(entry(i % 2, 17, i as u64));
        }
        log.record(entry(1, 999, 100));
        assert_eq!(log.counts[17], 80);
        assert_eq!(log.counts[hc::TABLE_SIZE - 1], 1);
        let recent = log.recent();
        assert_eq!(recent.len(), 2 * RECENT_CAP);
        assert!(recent.windows(2).all(|w| w[0].time_ns <= w[1].time_ns));
        assert!(log.take_trace().is_empty(), "tracing was off");
        log.tracing = true;
        log.record(entry(0, 24, 101));
        assert_eq!(log.take_trace(), vec![entry(0, 24, 101)]);
    }
}
