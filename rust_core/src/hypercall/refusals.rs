//! What Xen 4.19 answers an unprivileged x86 PVH domU for the hypercalls and
//! sub-ops pvhvm does not carry out: the toolstack's and the hardware
//! domain's calls (domctl, sysctl, platform_op, hypfs, dm_op, privileged
//! memory_op, hvm_op and sched_op sub-ops) are refused with the errno Xen's
//! default XSM policy gives, after the argument checks Xen makes first; calls
//! an HVM guest cannot reach at all are -ENOSYS. docs/hypercalls.md is the
//! table this module answers by; tests/test_refusals.py holds the two
//! together. Also here: the few sub-ops whose whole answer for a domU is a
//! constant (HVMOP_get_time's clock aside).
//!
//! Domains, as a domU sees them here: itself and domain 0 (the toolstack
//! pvhvm plays) exist; every other id is -ESRCH.

use super::{Call, HcResult, DOMID_SELF};
use crate::abi::{errno, hc, Width};

const E2BIG: i64 = 7;
const EACCES: i64 = 13;

/// Hypercall numbers an HVM guest reaches beyond the ones dispatch names.
pub const PLATFORM_OP: u64 = 7;
pub const MMUEXT_OP: u64 = 26;
pub const XENPMU_OP: u64 = 40;
pub const DM_OP: u64 = 41;
pub const HYPFS_OP: u64 = 42;
/// __HYPERVISOR_arch_1 on x86.
pub const PAGING_DOMCTL_CONT: u64 = 49;

/// The interface versions Xen 4.19 checks before anything else.
const DOMCTL_INTERFACE_VERSION: u32 = 0x17;
const SYSCTL_INTERFACE_VERSION: u32 = 0x15;
const XENPF_INTERFACE_VERSION: u32 = 0x0300_0001;
/// sizeof(struct xen_domctl), (struct xen_sysctl), (struct xen_platform_op):
/// a copy that faults anywhere in them is -EFAULT.
const DOMCTL_SIZE: usize = 144;
const SYSCTL_SIZE: usize = 136;
const PLATFORM_OP_SIZE: usize = 136;
const XEN_DOMCTL_SHADOW_OP: u32 = 10;

const DOMID_IO: u16 = 0x7FF1;
const DOMID_XEN: u16 = 0x7FF2;
/// struct xen_dm_op_buf entries dm_op copies at most.
const DMOP_MAX_BUFS: u64 = 2;

/// Whom a domid names, for Xen's rcu_lock_domain_by_id() family.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dom {
    Me,
    Other,
}

impl Call<'_> {
    /// rcu_lock_domain_by_id(): DOMID_SELF is not an id here.
    fn domain_by_id(&self, domid: u16) -> Result<Dom, i64> {
        if domid as u32 == self.dom.domid {
            Ok(Dom::Me)
        } else if domid == 0 {
            Ok(Dom::Other)
        } else {
            Err(errno::ESRCH)
        }
    }

    /// rcu_lock_domain_by_any_id(): DOMID_SELF names the caller.
    fn domain_by_any_id(&self, domid: u16) -> Result<Dom, i64> {
        if domid == DOMID_SELF {
            Ok(Dom::Me)
        } else {
            self.domain_by_id(domid)
        }
    }

    /// rcu_lock_remote_domain_by_id(): the caller itself is -EPERM.
    fn remote_domain_by_id(&self, domid: u16) -> Result<(), i64> {
        match self.domain_by_id(domid)? {
            Dom::Me => Err(errno::EPERM),
            Dom::Other => Ok(()),
        }
    }

    /// Whether this call uses the 32-bit (compat) layouts.
    fn compat(&self) -> bool {
        self.guest.width == Width::Bits32
    }

    /// copy_from_guest of a whole structure: -EFAULT if any byte is unmapped.
    fn read_struct(&self, va: u64, len: usize) -> Result<Vec<u8>, i64> {
        let mut b = vec![0u8; len];
        self.guest.read(va, &mut b)?;
        Ok(b)
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap_or([0; 4]))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or([0; 8]))
}

/// Hypercalls dispatch has no family module for: Xen's answer to a domU.
pub fn call(c: &mut Call, nr: u64, args: [u64; 5]) -> HcResult {
    let [a0, a1, a2, a3, _] = args;
    match nr {
        // do_platform_op: copy, interface version, then XSM_PRIV.
        PLATFORM_OP => {
            let op = c.read_struct(a0, PLATFORM_OP_SIZE)?;
            if u32_at(&op, 4) != XENPF_INTERFACE_VERSION {
                return Err(EACCES);
            }
            Err(errno::EPERM)
        }
        // do_sysctl: copy, interface version, then XSM_PRIV.
        hc::SYSCTL => {
            let op = c.read_struct(a0, SYSCTL_SIZE)?;
            if u32_at(&op, 4) != SYSCTL_INTERFACE_VERSION {
                return Err(EACCES);
            }
            Err(errno::EPERM)
        }
        hc::DOMCTL => domctl(c, a0),
        // do_paging_domctl_cont: only a continued shadow_op is accepted.
        PAGING_DOMCTL_CONT => {
            let op = c.read_struct(a0, DOMCTL_SIZE)?;
            if u32_at(&op, 4) != DOMCTL_INTERFACE_VERSION || u32_at(&op, 0) != XEN_DOMCTL_SHADOW_OP {
                return Err(errno::EOPNOTSUPP);
            }
            c.domain_by_id(u16_at(&op, 8))?;
            Err(errno::EPERM)
        }
        // do_mmuext_op(uops, count, pdone, foreigndom): the page owner must
        // be a PV domain, which no domain is to an HVM caller.
        MMUEXT_OP => {
            let foreign = a3 as u16;
            if foreign as u32 == c.dom.domid {
                // get_pg_owner() will not take the caller's own id.
                return Err(errno::ESRCH);
            }
            if !matches!(foreign, DOMID_SELF | DOMID_IO | DOMID_XEN) {
                c.domain_by_id(foreign)?;
            }
            Err(errno::EINVAL)
        }
        // do_xenpmu_op: off unless vpmu is enabled, and never with a vLAPIC.
        XENPMU_OP => Err(errno::EOPNOTSUPP),
        // do_dm_op(domid, nr_bufs, bufs): a device model works on another
        // domain, and a domU is nobody's device model (XSM_DM_PRIV).
        DM_OP => {
            if a1 & 0xffff_ffff > DMOP_MAX_BUFS {
                return Err(E2BIG);
            }
            let nr_bufs = (a1 & 0xffff_ffff) as usize;
            // struct xen_dm_op_buf { XEN_GUEST_HANDLE(void) h; xen_ulong_t size; }
            c.read_struct(a2, 2 * c.guest.width.ulong() as usize * nr_bufs)?;
            c.remote_domain_by_id(a0 as u16)?;
            Err(errno::EPERM)
        }
        // do_hypfs_op: XSM_PRIV before anything is read.
        HYPFS_OP => Err(errno::EPERM),
        // Not in the HVM hypercall table, or compiled out (kexec, argo,
        // tmem, xsm_op without XSM, physdev_op without pirqs).
        _ => Err(errno::ENOSYS),
    }
}

/// do_domctl: copy, interface version, the target domain, then XSM: every
/// domctl is the control domain's (getdomaininfo also the xenstore domain's,
/// the passthrough ones a device model's), never a plain domU's.
fn domctl(c: &mut Call, arg: u64) -> HcResult {
    const CREATEDOMAIN: u32 = 1;
    const ASSIGN_DEVICE: u32 = 37;
    const TEST_ASSIGN_DEVICE: u32 = 45;
    const DEASSIGN_DEVICE: u32 = 47;
    const VM_EVENT_OP: u32 = 56;
    const DOMID_INVALID: u16 = 0x7FF4;
    let op = c.read_struct(arg, DOMCTL_SIZE)?;
    if u32_at(&op, 4) != DOMCTL_INTERFACE_VERSION {
        return Err(EACCES);
    }
    let (cmd, domain) = (u32_at(&op, 0), u16_at(&op, 8));
    let needs_domain = match cmd {
        CREATEDOMAIN => false,
        ASSIGN_DEVICE | DEASSIGN_DEVICE if domain == DOMID_IO => false,
        ASSIGN_DEVICE | DEASSIGN_DEVICE if domain == DOMID_INVALID => return Err(errno::ESRCH),
        TEST_ASSIGN_DEVICE | VM_EVENT_OP if domain == DOMID_INVALID => false,
        _ => true,
    };
    if needs_domain {
        c.domain_by_id(domain)?;
    }
    Err(errno::EPERM)
}

/// memory_op sub-ops the memory_op module does not carry out.
pub fn memory_op(c: &mut Call, cmd: u64, arg: u64) -> HcResult {
    const MACHINE_MEMORY_MAP: u64 = 10;
    const MACHPHYS_MAPPING: u64 = 12;
    const SET_POD_TARGET: u64 = 16;
    const GET_POD_TARGET: u64 = 17;
    const GET_SHARING_FREED_PAGES: u64 = 18;
    const GET_SHARING_SHARED_PAGES: u64 = 19;
    const ACCESS_OP: u64 = 21;
    const CLAIM_PAGES: u64 = 24;
    const GET_VNUMAINFO: u64 = 26;
    const RESERVED_DEVICE_MEMORY_MAP: u64 = 27;
    const ACQUIRE_RESOURCE: u64 = 28;
    const MEMOP_EXTENT_SHIFT: u32 = 6;
    /// XENMEM_RDM_ALL: the only flag of get_reserved_device_memory.
    const RDM_ALL: u32 = 1;
    let start_extent = cmd >> MEMOP_EXTENT_SHIFT;
    match cmd & 0x3f {
        // hvm_memory_op: there is no M2P window in an HVM guest.
        MACHPHYS_MAPPING => Err(errno::ENOSYS),
        // The host's memory map is the hardware domain's (XSM_PRIV first).
        MACHINE_MEMORY_MAP => Err(errno::EPERM),
        SET_POD_TARGET | GET_POD_TARGET => {
            // struct xen_pod_target { u64 target_pages, tot_pages, pod_cache_pages, pod_entries; domid_t domid; }
            // (36 bytes with 32-bit alignment)
            let t = c.read_struct(arg, if c.compat() { 36 } else { 40 })?;
            c.domain_by_any_id(u16_at(&t, 32))?;
            Err(errno::EPERM)
        }
        // Counters of memory sharing, which is compiled out: nothing shared.
        GET_SHARING_FREED_PAGES | GET_SHARING_SHARED_PAGES => Ok(0),
        ACCESS_OP => {
            // struct xen_mem_access_op { u8 op, access; domid_t domid; u32 nr; u64 pfn;
            //                            handle pfn_list, access_list; }
            let op = c.read_struct(arg, 16 + 2 * c.guest.width.ulong() as usize)?;
            c.remote_domain_by_id(u16_at(&op, 2))?;
            Err(errno::EPERM)
        }
        CLAIM_PAGES => {
            if start_extent != 0 {
                return Err(errno::EINVAL);
            }
            // struct xen_memory_reservation { handle extent_start; xen_ulong_t nr_extents;
            //                                 u32 extent_order, mem_flags; domid_t domid; }
            let w = c.guest.width.ulong() as usize;
            let r = c.read_struct(arg, if c.compat() { 20 } else { 32 })?;
            let extent_start = if c.compat() { u32_at(&r, 0) as u64 } else { u64_at(&r, 0) };
            if extent_start != 0 || u32_at(&r, 2 * w) != 0 || u32_at(&r, 2 * w + 4) != 0 {
                return Err(errno::EINVAL);
            }
            // Xen says -EINVAL, not -ESRCH, for an unknown domain here.
            c.domain_by_id(u16_at(&r, 2 * w + 8)).map_err(|_| errno::EINVAL)?;
            Err(errno::EPERM)
        }
        GET_VNUMAINFO => {
            if start_extent != 0 {
                return Err(errno::EINVAL);
            }
            // struct xen_vnuma_topology_info { domid_t domid; u16 pad; ... } (40 bytes)
            let t = c.read_struct(arg, 40)?;
            if u16_at(&t, 2) != 0 {
                return Err(errno::EINVAL);
            }
            c.domain_by_any_id(u16_at(&t, 0))?;
            // No domain here is given a virtual NUMA topology.
            Err(errno::EOPNOTSUPP)
        }
        RESERVED_DEVICE_MEMORY_MAP => {
            if start_extent != 0 {
                return Err(errno::EINVAL);
            }
            // struct xen_reserved_device_memory_map { u32 flags; u32 nr_entries; handle buffer; union dev; }
            let m = c.read_struct(arg, if c.compat() { 16 } else { 24 })?;
            if u32_at(&m, 0) & !RDM_ALL != 0 {
                return Err(errno::EINVAL);
            }
            // No device is passed through and the host has no RMRRs to show.
            c.guest.write_u32(arg + 4, 0)?;
            Ok(0)
        }
        ACQUIRE_RESOURCE => {
            // struct xen_mem_acquire_resource { domid_t domid; u16 type; u32 id; u32 nr_frames;
            //                                   u32 pad; u64 frame; handle frame_list; }
            let r = c.read_struct(arg, 24 + c.guest.width.ulong() as usize)?;
            let (nr_frames, frame) = (u32_at(&r, 8) as u64, u64_at(&r, 16));
            if u32_at(&r, 12) != 0 || frame >> 32 != 0 || (frame + nr_frames) >> 32 != 0 {
                return Err(errno::EINVAL);
            }
            // Resources (ioreq pages, grant frames) are mapped by a device
            // model or the toolstack, of another domain.
            c.remote_domain_by_id(u16_at(&r, 0))?;
            Err(errno::EPERM)
        }
        _ => Err(errno::ENOSYS),
    }
}

/// hvm_op sub-ops the hvm_op module does not carry out.
pub fn hvm_op(c: &mut Call, op: u64, arg: u64) -> HcResult {
    const PAGETABLE_DYING: u64 = 9;
    const GET_TIME: u64 = 10;
    const XENTRACE: u64 = 11;
    const GUEST_REQUEST_VM_EVENT: u64 = 24;
    const ALTP2M: u64 = 25;
    const TRACE_EXTRA_BYTES: u16 = 7 * 4;
    const TRC_SUBCLS_SHIFT: u32 = 12;
    match op {
        PAGETABLE_DYING => {
            // struct xen_hvm_pagetable_dying { domid_t domid; u16 pad[3]; u64 gpa; }
            let a = c.read_struct(arg, 16)?;
            match c.domain_by_any_id(u16_at(&a, 0))? {
                Dom::Other => Err(errno::EOPNOTSUPP),
                // A hint for shadow paging only; with HAP there is nothing to drop.
                Dom::Me => Err(errno::EINVAL),
            }
        }
        GET_TIME => {
            // struct xen_hvm_get_time { u64 now; }: Xen's system time.
            let now = c.dom.system_time_ns();
            c.guest.write(arg, &now.to_le_bytes())?;
            Ok(0)
        }
        XENTRACE => {
            // struct xen_hvm_xentrace { u16 event, extra_bytes; u8 extra[28]; }
            let t = c.read_struct(arg, 4 + TRACE_EXTRA_BYTES as usize)?;
            let (event, extra) = (u16_at(&t, 0) as u32, u16_at(&t, 2));
            if extra % 4 != 0 || extra > TRACE_EXTRA_BYTES || event >> TRC_SUBCLS_SHIFT != 0 {
                return Err(errno::EINVAL);
            }
            // Accepted; nobody is tracing.
            Ok(0)
        }
        // Accepted with a null handle; no monitor listens.
        GUEST_REQUEST_VM_EVENT => if arg == 0 { Ok(0) } else { Err(errno::EINVAL) },
        // altp2m is off unless Xen boots with altp2m=1.
        ALTP2M => Err(errno::EOPNOTSUPP),
        _ => Err(errno::ENOSYS),
    }
}

/// SCHEDOP_remote_shutdown and SCHEDOP_pin_override.
pub fn sched_op(c: &mut Call, cmd: u64, arg: u64) -> HcResult {
    const REMOTE_SHUTDOWN: u64 = 4;
    const PIN_OVERRIDE: u64 = 7;
    match cmd {
        REMOTE_SHUTDOWN => {
            // struct sched_remote_shutdown { domid_t domain_id; unsigned int reason; }
            let s = c.read_struct(arg, 8)?;
            c.domain_by_id(u16_at(&s, 0))?;
            // Only the domain's device model may (XSM_DM_PRIV).
            Err(errno::EPERM)
        }
        // The hardware domain's, before its argument is read.
        PIN_OVERRIDE => Err(errno::EPERM),
        _ => Err(errno::ENOSYS),
    }
}

/// hvm_grant_table_op: the grant ops an HVM guest may not use at all are
/// -ENOSYS before anything else (the count included).
pub fn grant_table_op_filtered(cmd: u64) -> Option<i64> {
    const DUMP_TABLE: u64 = 3;
    const TRANSFER: u64 = 4;
    const UNMAP_AND_REPLACE: u64 = 7;
    const CACHE_FLUSH: u64 = 12;
    match cmd {
        DUMP_TABLE | TRANSFER | UNMAP_AND_REPLACE | CACHE_FLUSH => Some(errno::ENOSYS),
        c if c > CACHE_FLUSH => Some(errno::ENOSYS),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cpu::Cpu;
    use crate::hypercall::dispatch;
    use crate::memory::GuestRam;
    use crate::mmu::PagingState;
    use crate::vcpu::Vcpu;
    use crate::waker::Waker;
    use crate::xen::{DomainState, SharedState};

    const ARG: u64 = 0x1000;
    /// Past the end of the test domain's RAM: every read there faults.
    const UNMAPPED: u64 = 0x7000_0000;

    struct Fixture {
        cpu: Cpu,
        dom: DomainState,
        vcpus: Vec<Vcpu>,
        width: Width,
    }

    fn fixture() -> Fixture {
        let ram = Arc::new(GuestRam::new(16 << 20).unwrap());
        let cpu = Cpu::new(ram.clone(), 1, 1).unwrap();
        let shared = Arc::new(SharedState::new(ram, 1, 1, Waker::new().unwrap()));
        let dom = DomainState::new(1, [7; 16], shared, 1);
        let vcpus = vec![Vcpu::new(0, cpu.power_on_state().unwrap())];
        Fixture { cpu, dom, vcpus, width: Width::Bits64 }
    }

    impl Fixture {
        fn call(&mut self, nr: u64, args: &[u64]) -> i64 {
            let ram = self.dom.ram.clone();
            let mut a = [0u64; 5];
            a[..args.len()].copy_from_slice(args);
            let paging_off = PagingState { cr0: 1, cr3: 0, cr4: 0, efer: 0 };
            let mut c = Call::new(&ram, paging_off, self.width, &mut self.dom, &mut self.vcpus, self.cpu.pristine(), 0, 0);
            dispatch(&mut c, nr, a) as i64
        }

        fn put(&self, bytes: &[u8]) {
            let buf = self.dom.ram.slice_mut(ARG, 256).unwrap();
            buf.fill(0);
            buf[..bytes.len()].copy_from_slice(bytes);
        }
    }

    fn control_op(cmd: u32, version: u32, domain: u16) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(cmd.to_le_bytes());
        v.extend(version.to_le_bytes());
        v.extend(domain.to_le_bytes());
        v
    }

    #[test]
    fn domctl_checks_in_xens_order() {
        let mut f = fixture();
        assert_eq!(f.call(hc::DOMCTL, &[UNMAPPED]), -errno::EFAULT);
        f.put(&control_op(5, 0x16, 1));
        assert_eq!(f.call(hc::DOMCTL, &[ARG]), -EACCES, "an old interface version");
        f.put(&control_op(5, DOMCTL_INTERFACE_VERSION, 9));
        assert_eq!(f.call(hc::DOMCTL, &[ARG]), -errno::ESRCH, "no domain 9");
        f.put(&control_op(5, DOMCTL_INTERFACE_VERSION, DOMID_SELF));
        assert_eq!(f.call(hc::DOMCTL, &[ARG]), -errno::ESRCH, "DOMID_SELF is no domain to domctl");
        f.put(&control_op(5, DOMCTL_INTERFACE_VERSION, 1));
        assert_eq!(f.call(hc::DOMCTL, &[ARG]), -errno::EPERM);
        f.put(&control_op(1, DOMCTL_INTERFACE_VERSION, 9));
        assert_eq!(f.call(hc::DOMCTL, &[ARG]), -errno::EPERM, "createdomain names no domain");
    }

    #[test]
    fn sysctl_and_platform_op() {
        let mut f = fixture();
        f.put(&control_op(3, SYSCTL_INTERFACE_VERSION, 0));
        assert_eq!(f.call(hc::SYSCTL, &[ARG]), -errno::EPERM);
        f.put(&control_op(3, 0, 0));
        assert_eq!(f.call(hc::SYSCTL, &[ARG]), -EACCES);
        f.put(&control_op(50, XENPF_INTERFACE_VERSION, 0));
        assert_eq!(f.call(PLATFORM_OP, &[ARG]), -errno::EPERM);
        assert_eq!(f.call(PLATFORM_OP, &[UNMAPPED]), -errno::EFAULT);
    }

    #[test]
    fn dm_op_and_friends() {
        let mut f = fixture();
        assert_eq!(f.call(DM_OP, &[1, 3, ARG]), -E2BIG);
        assert_eq!(f.call(DM_OP, &[1, 1, UNMAPPED]), -errno::EFAULT);
        assert_eq!(f.call(DM_OP, &[9, 0, 0]), -errno::ESRCH);
        assert_eq!(f.call(DM_OP, &[1, 0, 0]), -errno::EPERM, "a domU is not its own device model");
        assert_eq!(f.call(HYPFS_OP, &[0, 0, 0, 0, 0]), -errno::EPERM);
        assert_eq!(f.call(XENPMU_OP, &[0, ARG]), -errno::EOPNOTSUPP);
        assert_eq!(f.call(MMUEXT_OP, &[ARG, 0, 0, DOMID_SELF as u64]), -errno::EINVAL);
        assert_eq!(f.call(MMUEXT_OP, &[ARG, 0, 0, 1]), -errno::ESRCH);
        assert_eq!(f.call(37, &[0, 0]), -errno::ENOSYS, "kexec_op is PV only");
        assert_eq!(f.call(hc::PHYSDEV_OP, &[13, ARG]), -errno::ENOSYS, "no pirqs in a PVH domU");
    }

    #[test]
    fn memory_op_refusals() {
        let mut f = fixture();
        assert_eq!(f.call(hc::MEMORY_OP, &[10, ARG]), -errno::EPERM);
        assert_eq!(f.call(hc::MEMORY_OP, &[12, ARG]), -errno::ENOSYS);
        let mut r = vec![0u8; 32];
        r[24..26].copy_from_slice(&1u16.to_le_bytes());
        f.put(&r);
        assert_eq!(f.call(hc::MEMORY_OP, &[24, ARG]), -errno::EPERM, "claim_pages");
        assert_eq!(f.call(hc::MEMORY_OP, &[24 | (1 << 6), ARG]), -errno::EINVAL, "a start extent");
        r[16] = 1;
        f.put(&r);
        assert_eq!(f.call(hc::MEMORY_OP, &[24, ARG]), -errno::EINVAL, "an extent order");
        r[16] = 0;
        r[24..26].copy_from_slice(&9u16.to_le_bytes());
        f.put(&r);
        assert_eq!(f.call(hc::MEMORY_OP, &[24, ARG]), -errno::EINVAL, "unknown domain");
        f.put(&[0, 0, 1, 0]);
        assert_eq!(f.call(hc::MEMORY_OP, &[21, ARG]), -errno::EPERM, "access_op on itself");
        f.put(&[0, 0, 9, 0]);
        assert_eq!(f.call(hc::MEMORY_OP, &[21, ARG]), -errno::ESRCH);
        f.put(&0x7ff0u16.to_le_bytes());
        assert_eq!(f.call(hc::MEMORY_OP, &[26, ARG]), -errno::EOPNOTSUPP, "no vNUMA");
        f.put(&1u16.to_le_bytes());
        assert_eq!(f.call(hc::MEMORY_OP, &[28, ARG]), -errno::EPERM, "acquire_resource of itself");
        f.put(&[0xff; 8]);
        assert_eq!(f.call(hc::MEMORY_OP, &[27, ARG]), -errno::EINVAL, "unknown rdm flags");
        f.put(&[0; 8]);
        assert_eq!(f.call(hc::MEMORY_OP, &[27, ARG]), 0);
        assert_eq!(f.call(hc::MEMORY_OP, &[18, 0]), 0);
        let mut pod = vec![0u8; 40];
        pod[32..34].copy_from_slice(&0x7ff0u16.to_le_bytes());
        f.put(&pod);
        assert_eq!(f.call(hc::MEMORY_OP, &[17, ARG]), -errno::EPERM);
    }

    #[test]
    fn compat_layouts() {
        let mut f = fixture();
        f.width = Width::Bits32;
        // xen_memory_reservation: 20 bytes, domid at 16.
        let mut r = vec![0u8; 20];
        r[16..18].copy_from_slice(&1u16.to_le_bytes());
        f.put(&r);
        assert_eq!(f.call(hc::MEMORY_OP, &[24, ARG]), -errno::EPERM, "claim_pages");
        r[16..18].copy_from_slice(&9u16.to_le_bytes());
        f.put(&r);
        assert_eq!(f.call(hc::MEMORY_OP, &[24, ARG]), -errno::EINVAL, "claim_pages of no domain");
        // xen_pod_target: domid at 32 either way.
        let mut pod = vec![0u8; 36];
        pod[32..34].copy_from_slice(&9u16.to_le_bytes());
        f.put(&pod);
        assert_eq!(f.call(hc::MEMORY_OP, &[16, ARG]), -errno::ESRCH);
        // A 32-bit struct may end where RAM ends: only its own bytes are read.
        let end = (16 << 20) - 20;
        f.dom.ram.slice_mut(end, 20).unwrap().fill(0);
        f.dom.ram.slice_mut(end + 16, 2).unwrap().copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(f.call(hc::MEMORY_OP, &[24, end]), -errno::EPERM);
        assert_eq!(f.call(DM_OP, &[1, 2, (16 << 20) - 16]), -errno::EPERM, "two 8-byte compat bufs");
        f.width = Width::Bits64;
        assert_eq!(f.call(hc::MEMORY_OP, &[24, end]), -errno::EFAULT, "the native struct is 32 bytes");
    }

    #[test]
    fn hvm_and_sched_op() {
        let mut f = fixture();
        f.put(&0x7ff0u16.to_le_bytes());
        assert_eq!(f.call(hc::HVM_OP, &[9, ARG]), -errno::EINVAL, "pagetable_dying with HAP");
        f.put(&0u16.to_le_bytes());
        assert_eq!(f.call(hc::HVM_OP, &[9, ARG]), -errno::EOPNOTSUPP, "pagetable_dying of another");
        assert_eq!(f.call(hc::HVM_OP, &[10, ARG]), 0);
        f.put(&[0x00, 0x10, 0, 0]);
        assert_eq!(f.call(hc::HVM_OP, &[11, ARG]), -errno::EINVAL, "a trace class");
        assert_eq!(f.call(hc::HVM_OP, &[24, 0]), 0);
        assert_eq!(f.call(hc::HVM_OP, &[25, ARG]), -errno::EOPNOTSUPP);
        assert_eq!(f.call(hc::HVM_OP, &[2, ARG]), -errno::ENOSYS, "moved to dm_op");
        f.put(&1u16.to_le_bytes());
        assert_eq!(f.call(hc::SCHED_OP, &[4, ARG]), -errno::EPERM);
        f.put(&9u16.to_le_bytes());
        assert_eq!(f.call(hc::SCHED_OP, &[4, ARG]), -errno::ESRCH);
        assert_eq!(f.call(hc::SCHED_OP, &[7, UNMAPPED]), -errno::EPERM);
    }

    #[test]
    fn grant_ops_hvm_may_not_use() {
        let mut f = fixture();
        assert_eq!(f.call(hc::GRANT_TABLE_OP, &[4, ARG, 0]), -errno::ENOSYS, "before the count");
        assert_eq!(f.call(hc::GRANT_TABLE_OP, &[12, ARG, 1]), -errno::ENOSYS);
    }
}
