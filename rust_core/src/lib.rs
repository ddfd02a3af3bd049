//! pvhvm's core: a Xen hypervisor for PVH guests on Unicorn, in user space.
//! Python (`pvhvm`) builds domains and runs device models; this crate owns
//! guest RAM, the vCPUs and everything on the per-instruction and
//! per-hypercall path. docs/architecture.md has the module map.

pub mod abi;
pub mod cpu;
pub mod cpuid;
pub mod debug;
pub mod domain;
pub mod exit;
pub mod hypercall;
pub mod hypercall_log;
pub mod interrupts;
pub mod lapic;
pub mod layout;
pub mod memory;
pub mod mmu;
pub mod profile;
mod py;
pub mod sched;
pub mod snapshot;
pub mod ticker;
pub mod uc;
pub mod unicorn_gaps;
pub mod vcpu;
pub mod waker;
pub mod xen;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The first domain needs Unicorn's self-test and its CPUID table, about
    // 25 ms of engines run once per process: done now, on another thread,
    // while Python goes on importing (both are behind a OnceLock; the
    // first Vm waits for them if they are not done).
    std::thread::Builder::new().name("pvhvm-warm-up".into()).spawn(|| {
        let _ = unicorn_gaps::layout();
        cpuid::warm_up();
    })?;
    py::register(m)
}
