//! Why `Domain::run` returned: the exits the host loop acts on. A leaf
//! module: hypercall handlers and hooks produce exit reasons, the vCPU loop
//! and the domain pass them on, and nothing here depends on either.

/// What the host is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// SCHEDOP_shutdown (or an ACPI power-off / PC reset) with this SHUTDOWN_* reason.
    Shutdown { reason: u32 },
    /// The guest wrote to the hypervisor console; drain it and run again.
    ConsoleOutput,
    /// The guest notified ports whose far end is the host (device models).
    Notify,
    /// The host's time slice ended, or a host thread kicked the domain.
    Kicked,
    /// A host file descriptor the domain watches while it idles is ready.
    HostIo,
    /// Every vCPU waits for an event and no timer is armed: only the host
    /// (a device model, the console, xenstore) can wake the domain.
    Idle,
    /// Nothing can ever wake the domain (every vCPU halted with interrupts
    /// off, or down).
    Hung { why: String },
    /// A fault while delivering #DF: the processor shut down.
    TripleFault { chain: Vec<u8> },
    /// A vCPU stopped for the debugger (debug.rs) with its next
    /// instruction at `address` (linear).
    Debug { stop: crate::debug::DebugStop, address: u64 },
    /// The emulator could not go on (unmapped physical memory, a mode we
    /// do not deliver in …).
    Error { message: String },
}

/// An exit and the vCPU it came from (`None` for the domain as a whole:
/// idle, host I/O, the host's time slice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub vcpu: Option<u32>,
    pub reason: ExitReason,
}

impl Exit {
    pub fn of(vcpu: u32, reason: ExitReason) -> Self {
        Self { vcpu: Some(vcpu), reason }
    }

    pub fn domain(reason: ExitReason) -> Self {
        Self { vcpu: None, reason }
    }
}
