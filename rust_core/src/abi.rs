//! Xen ABI numbers used by the core, declared from Xen's public headers
//! (xen/include/public: xen.h, version.h, sched.h, features.h). Errno values
//! are Xen's, which on x86 equal Linux's.

/// Which of Xen's two x86 ABIs a hypercall is made in: chosen per call from
/// the vCPU's mode at that moment (Xen's `hvm_guest_x86_mode`), so a 64-bit
/// kernel's 32-bit code and a 32-bit guest both get the compat layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// 64-bit code: number in RAX, arguments in RDI, RSI, RDX, R10, R8.
    Bits64,
    /// Protected mode or compatibility mode: number in EAX, arguments in
    /// EBX, ECX, EDX, ESI, EDI; `xen_ulong_t`, `xen_pfn_t` and guest
    /// handles are 32 bits and `uint64_t` is 4-byte aligned in structures.
    Bits32,
}

impl Width {
    /// sizeof(xen_ulong_t), sizeof(xen_pfn_t), sizeof a guest handle.
    pub fn ulong(self) -> u64 {
        match self {
            Width::Bits64 => 8,
            Width::Bits32 => 4,
        }
    }

    /// Offset of a field that follows `end` and must be aligned to
    /// `align` bytes (8 for uint64_t, but only 4 in the 32-bit ABI).
    pub fn align(self, end: u64, align: u64) -> u64 {
        let a = if self == Width::Bits32 { align.min(4) } else { align };
        end.div_ceil(a) * a
    }
}

/// Hypercall numbers (xen.h).
pub mod hc {
    pub const SET_TIMER_OP: u64 = 15;
    pub const MEMORY_OP: u64 = 12;
    pub const XEN_VERSION: u64 = 17;
    pub const CONSOLE_IO: u64 = 18;
    pub const GRANT_TABLE_OP: u64 = 20;
    pub const VM_ASSIST: u64 = 21;
    pub const VCPU_OP: u64 = 24;
    pub const XSM_OP: u64 = 27;
    pub const SCHED_OP: u64 = 29;
    pub const EVENT_CHANNEL_OP: u64 = 32;
    pub const PHYSDEV_OP: u64 = 33;
    pub const HVM_OP: u64 = 34;
    pub const SYSCTL: u64 = 35;
    pub const DOMCTL: u64 = 36;
    /// Hypercalls are counted in a table this long; larger numbers share the last slot.
    pub const TABLE_SIZE: usize = 64;

    /// Whether the first argument selects a sub-operation (for the trace).
    pub fn is_multiplexed(nr: u64) -> bool {
        matches!(
            nr,
            MEMORY_OP | XEN_VERSION | CONSOLE_IO | GRANT_TABLE_OP | VM_ASSIST | VCPU_OP | SCHED_OP
                | EVENT_CHANNEL_OP | PHYSDEV_OP | HVM_OP
        )
    }
}

pub mod errno {
    pub const EPERM: i64 = 1;
    pub const ENOENT: i64 = 2;
    pub const ESRCH: i64 = 3;
    pub const ENXIO: i64 = 6;
    pub const ENOMEM: i64 = 12;
    pub const EFAULT: i64 = 14;
    pub const EBUSY: i64 = 16;
    pub const EEXIST: i64 = 17;
    pub const EINVAL: i64 = 22;
    pub const ENOSPC: i64 = 28;
    pub const ENOSYS: i64 = 38;
    pub const ETIME: i64 = 62;
    pub const EOPNOTSUPP: i64 = 95;
}

/// XENVER_* (version.h).
pub mod xenver {
    pub const VERSION: u64 = 0;
    pub const EXTRAVERSION: u64 = 1;
    pub const COMPILE_INFO: u64 = 2;
    pub const CAPABILITIES: u64 = 3;
    pub const CHANGESET: u64 = 4;
    pub const PLATFORM_PARAMETERS: u64 = 5;
    pub const GET_FEATURES: u64 = 6;
    pub const PAGESIZE: u64 = 7;
    pub const GUEST_HANDLE: u64 = 8;
    pub const COMMANDLINE: u64 = 9;
    pub const BUILD_ID: u64 = 10;
}

/// XENFEAT_* bit numbers (features.h).
pub mod xenfeat {
    pub const WRITABLE_PAGE_TABLES: u32 = 0;
    pub const AUTO_TRANSLATED_PHYSMAP: u32 = 2;
    pub const HVM_CALLBACK_VECTOR: u32 = 8;
    pub const HVM_SAFE_PVCLOCK: u32 = 9;
    pub const MEMORY_OP_VNODE_SUPPORTED: u32 = 13;
    pub const NOT_DIRECT_MAPPED: u32 = 16;
    pub const RUNSTATE_PHYS_AREA: u32 = 18;
    pub const VCPU_TIME_PHYS_AREA: u32 = 19;
    pub const DM_MSIX_ALL_WRITES: u32 = 20;
}

/// CONSOLEIO_* (xen.h).
pub mod consoleio {
    pub const WRITE: u64 = 0;
    pub const READ: u64 = 1;
}

/// SCHEDOP_* and SHUTDOWN_* (sched.h).
pub mod schedop {
    pub const YIELD: u64 = 0;
    pub const BLOCK: u64 = 1;
    pub const SHUTDOWN: u64 = 2;
    pub const POLL: u64 = 3;
    pub const REMOTE_SHUTDOWN: u64 = 4;
    pub const SHUTDOWN_CODE: u64 = 5;
    pub const WATCHDOG: u64 = 6;
    pub const PIN_OVERRIDE: u64 = 7;

    pub const SHUTDOWN_POWEROFF: u32 = 0;
    pub const SHUTDOWN_REBOOT: u32 = 1;
    pub const SHUTDOWN_SUSPEND: u32 = 2;
    pub const SHUTDOWN_CRASH: u32 = 3;
    pub const SHUTDOWN_WATCHDOG: u32 = 4;
    pub const SHUTDOWN_SOFT_RESET: u32 = 5;
    pub const SHUTDOWN_MAX: u32 = 5;

    /// The most ports one SCHEDOP_poll may name (Xen's limit).
    pub const POLL_MAX_PORTS: u32 = 128;
}

/// Event channel ports a 64-bit guest may name under the 2-level ABI.
pub const EVTCHN_2L_NR_CHANNELS: u32 = 64 * 64;
