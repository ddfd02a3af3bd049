//! CPUID as the guest sees it: the feature set Unicorn's TCG really
//! implements (read once from Unicorn itself), the hypervisor bit, and Xen's
//! leaves at 0x40000000 (xen/include/public/arch-x86/cpuid.h).

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::lapic::apic_id_of;
use crate::mmu::PHYS_ADDR_BITS;
use crate::uc::{Engine, Reg};

pub const XEN_CPUID_BASE: u32 = 0x4000_0000;
pub const XEN_HYPERCALL_MSR: u32 = 0x4000_0000;
pub const XEN_MAJOR: u32 = 4;
pub const XEN_MINOR: u32 = 19;

// Leaf 0x40000004 EAX flags.
const XEN_HVM_CPUID_VCPU_ID_PRESENT: u32 = 1 << 3;
const XEN_HVM_CPUID_DOMID_PRESENT: u32 = 1 << 4;
/// HVMOP_set_evtchn_upcall_vector is available (Xen 4.17 and later always
/// say so): Linux then takes events through a vector per vCPU.
const XEN_HVM_CPUID_UPCALL_VECTOR: u32 = 1 << 6;

/// IA32_ARCH_CAPABILITIES, enumerated by CPUID.7.0:EDX bit 29.
pub const MSR_ARCH_CAPABILITIES: u32 = 0x10a;
// CPUID.7.0:EDX: IBRS/IBPB (SPEC_CTRL and PRED_CMD exist), STIBP,
// ARCH_CAPABILITIES.
const CPUID7_EDX_IBRSB: u32 = 1 << 26;
const CPUID7_EDX_STIBP: u32 = 1 << 27;
const CPUID7_EDX_ARCH_CAPS: u32 = 1 << 29;
// CPUID.7.2:EDX: BHI_CTRL (SPEC_CTRL.BHI_DIS_S exists).
const CPUID7_2_EDX_BHI_CTRL: u32 = 1 << 4;

// ARCH_CAPABILITIES bits (Xen's public arch-x86/cpufeatureset.h names them
// for the guest policy; Intel SDM vol. 4 "IA32_ARCH_CAPABILITIES").
const ARCH_CAPS_RDCL_NO: u64 = 1 << 0;
const ARCH_CAPS_EIBRS: u64 = 1 << 1;
const ARCH_CAPS_SKIP_L1DFL: u64 = 1 << 3;
const ARCH_CAPS_SSB_NO: u64 = 1 << 4;
const ARCH_CAPS_MDS_NO: u64 = 1 << 5;
const ARCH_CAPS_IF_PSCHANGE_MC_NO: u64 = 1 << 6;
const ARCH_CAPS_TAA_NO: u64 = 1 << 8;
const ARCH_CAPS_SBDR_SSDP_NO: u64 = 1 << 13;
const ARCH_CAPS_FBSDP_NO: u64 = 1 << 14;
const ARCH_CAPS_PSDP_NO: u64 = 1 << 15;
const ARCH_CAPS_BHI_NO: u64 = 1 << 20;
const ARCH_CAPS_PBRSB_NO: u64 = 1 << 24;
const ARCH_CAPS_GDS_NO: u64 = 1 << 26;
const ARCH_CAPS_RFDS_NO: u64 = 1 << 27;
const ARCH_CAPS_ITS_NO: u64 = 1 << 62;

/// What the vCPU says of itself in ARCH_CAPABILITIES: immune to every
/// transient-execution leak that has a "no" bit, with enhanced IBRS. True
/// of TCG: it executes nothing speculatively, keeps no fill or store
/// buffers, predictors or RSB a guest could train or sample, and a guest's
/// VERW, IBPB or return thunk would not touch the host's anyway. With these
/// bits Linux turns off the mitigations that cost it on every kernel entry
/// and exit (VERW, PTI, retpolines, L1D flushes, return thunks), as it does
/// under Xen on hardware that enumerates them. No TSX_CTRL, RSBA, RRSBA or
/// FB_CLEAR: those announce controls or flaws the vCPU does not have.
pub const ARCH_CAPABILITIES: u64 = ARCH_CAPS_RDCL_NO
    | ARCH_CAPS_EIBRS
    | ARCH_CAPS_SKIP_L1DFL
    | ARCH_CAPS_SSB_NO
    | ARCH_CAPS_MDS_NO
    | ARCH_CAPS_IF_PSCHANGE_MC_NO
    | ARCH_CAPS_TAA_NO
    | ARCH_CAPS_SBDR_SSDP_NO
    | ARCH_CAPS_FBSDP_NO
    | ARCH_CAPS_PSDP_NO
    | ARCH_CAPS_BHI_NO
    | ARCH_CAPS_PBRSB_NO
    | ARCH_CAPS_GDS_NO
    | ARCH_CAPS_RFDS_NO
    | ARCH_CAPS_ITS_NO;

/// Whether the vCPU presents itself free of speculation flaws (the
/// default). `PVHVM_CPU_AFFECTED=1` in the environment brings back the
/// plain Haswell that Linux treats as affected by all of them, for
/// measuring what the mitigations cost (benches/bench_cpu.py).
pub fn unaffected() -> bool {
    static UNAFFECTED: OnceLock<bool> = OnceLock::new();
    *UNAFFECTED.get_or_init(|| std::env::var("PVHVM_CPU_AFFECTED").map_or(true, |v| v.is_empty() || v == "0"))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Leaves whose answer depends on ECX.
fn has_subleaves(leaf: u32) -> bool {
    matches!(leaf, 4 | 7 | 0xb | 0xd | 0xf | 0x10 | 0x12 | 0x14 | 0x17 | 0x18 | 0x8000_001d)
}

/// Read Unicorn's CPUID table now (it is read once per process).
pub fn warm_up() {
    native_table();
}

/// What Unicorn's own CPUID returns for the default CPU model, per (leaf, subleaf).
fn native_table() -> &'static HashMap<(u32, u32), Cpuid> {
    static TABLE: OnceLock<HashMap<(u32, u32), Cpuid>> = OnceLock::new();
    TABLE.get_or_init(|| read_native().unwrap_or_default())
}

fn read_native() -> Result<HashMap<(u32, u32), Cpuid>, String> {
    let mut eng = Engine::new_x86_64().map_err(|e| e.to_string())?;
    let mut ram = vec![0u8; 0x2000];
    ram[0x1000..0x1003].copy_from_slice(&[0x0f, 0xa2, 0xf4]); // cpuid; hlt
    unsafe { eng.map_ptr(0, ram.len() as u64, ram.as_mut_ptr()) }.map_err(|e| e.to_string())?;
    let mut run = |leaf: u32, sub: u32| -> Cpuid {
        eng.write(Reg::RAX, leaf as u64);
        eng.write(Reg::RCX, sub as u64);
        eng.start(0x1000, 0);
        Cpuid {
            eax: eng.read(Reg::RAX) as u32,
            ebx: eng.read(Reg::RBX) as u32,
            ecx: eng.read(Reg::RCX) as u32,
            edx: eng.read(Reg::RDX) as u32,
        }
    };
    let mut t = HashMap::new();
    for base in [0u32, 0x8000_0000] {
        let max = run(base, 0).eax.clamp(base, base + 0x40);
        for leaf in base..=max {
            let subs = if has_subleaves(leaf) { 0..8 } else { 0..1 };
            for sub in subs {
                t.insert((leaf, sub), run(leaf, sub));
            }
        }
    }
    Ok(t)
}

/// The CPUID policy of a domain, answered for one vCPU at a time.
#[derive(Debug, Clone)]
pub struct CpuidPolicy {
    pub vcpu_id: u32,
    pub domid: u32,
    pub nr_vcpus: u32,
}

impl CpuidPolicy {
    pub fn query(&self, leaf: u32, subleaf: u32) -> Cpuid {
        let native = native_table();
        let sub = if has_subleaves(leaf) { subleaf } else { 0 };
        let n = native.get(&(leaf, sub)).copied();
        match leaf {
            0 => {
                let mut r = n.unwrap_or_default();
                r.eax = r.eax.min(0xd);
                r
            }
            1 => {
                let mut r = n.unwrap_or_default();
                r.ecx |= 1 << 31; // hypervisor present
                // Not offered: MONITOR/MWAIT, VMX, x2APIC, TSC deadline, AVX, RDRAND: none
                // of them is something this vCPU can back.
                r.ecx &= !((1 << 3) | (1 << 5) | (1 << 21) | (1 << 24) | (1 << 28) | (1 << 30));
                // Initial APIC id and one logical processor per package:
                // each vCPU is a package of its own (no SMT, no cores to
                // share caches with), as the MADT lists them.
                r.ebx = (r.ebx & 0x0000_ffff) | (apic_id_of(self.vcpu_id) << 24) | (1 << 16);
                r.edx &= !(1 << 28); // HTT
                r
            }
            4 => {
                // Deterministic cache parameters: one core, one thread per cache.
                let mut r = n.unwrap_or_default();
                r.eax &= 0x3fff;
                r
            }
            // No extended topology leaves: Linux then takes the topology
            // from leaf 1 and the MADT, where each vCPU is one package.
            0xb | 0x1f => Cpuid::default(),
            7 => {
                let mut r = n.unwrap_or_default();
                // No LA57 (the page walk is 4-level), no PKU, no AVX2 family.
                r.ecx &= !((1 << 16) | (1 << 3) | (1 << 4));
                r.ebx &= !((1 << 5) | (1 << 16) | (1 << 17) | (1 << 28) | (1 << 30) | (1 << 31));
                if sub == 0 && unaffected() {
                    // ARCH_CAPABILITIES (answered by cpu.rs's RDMSR sites);
                    // enhanced IBRS implies SPEC_CTRL.IBRS and STIBP exist.
                    // Their MSRs take writes and do nothing, which is all
                    // IBRS and IBPB mean to a CPU with no predictors.
                    r.edx |= CPUID7_EDX_ARCH_CAPS | CPUID7_EDX_IBRSB | CPUID7_EDX_STIBP;
                    r.eax = r.eax.max(2);
                }
                if sub == 2 && unaffected() {
                    // Linux (6.1.y too) assumes any eIBRS part, and any guest,
                    // open to branch history injection whatever BHI_NO says,
                    // and clears the history in a loop on every syscall
                    // unless BHI_DIS_S can be set once: offer that control.
                    r.edx |= CPUID7_2_EDX_BHI_CTRL;
                }
                r
            }
            0x8000_0008 => {
                let mut r = n.unwrap_or_default();
                r.eax = PHYS_ADDR_BITS | (48 << 8);
                r
            }
            0x4000_0000 => Cpuid {
                eax: XEN_CPUID_BASE + 4,
                ebx: u32::from_le_bytes(*b"XenV"),
                ecx: u32::from_le_bytes(*b"MMXe"),
                edx: u32::from_le_bytes(*b"nVMM"),
            },
            0x4000_0001 => Cpuid { eax: (XEN_MAJOR << 16) | XEN_MINOR, ..Default::default() },
            0x4000_0002 => Cpuid { eax: 1, ebx: XEN_HYPERCALL_MSR, ..Default::default() },
            0x4000_0003 => Cpuid::default(),
            0x4000_0004 => Cpuid {
                eax: XEN_HVM_CPUID_VCPU_ID_PRESENT | XEN_HVM_CPUID_DOMID_PRESENT | XEN_HVM_CPUID_UPCALL_VECTOR,
                ebx: self.vcpu_id,
                ecx: self.domid,
                edx: 0,
            },
            // Other hypervisors' ranges (0x40000100 …) are empty.
            0x4000_0005..=0x4fff_ffff => Cpuid::default(),
            _ => n.unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xen_leaves() {
        let p = CpuidPolicy { vcpu_id: 2, domid: 7, nr_vcpus: 4 };
        let sig = p.query(0x4000_0000, 0);
        let mut s = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            s.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&s, b"XenVMMXenVMM");
        assert!(sig.eax >= 0x4000_0002);
        assert_eq!(p.query(0x4000_0001, 0).eax, (4 << 16) | 19);
        assert_eq!(p.query(0x4000_0002, 0).ebx, 0x4000_0000);
        let f = p.query(0x4000_0004, 0);
        assert_eq!((f.ebx, f.ecx), (2, 7));
        assert_eq!(p.query(1, 0).ebx >> 24, 4, "APIC ID is twice the vCPU id, as Xen gives it");
        assert_eq!(p.query(0xb, 0), Cpuid::default());
        assert_eq!(p.query(0x4000_0100, 0), Cpuid::default());
    }

    #[test]
    fn arch_capabilities_enumerated() {
        let p = CpuidPolicy { vcpu_id: 0, domid: 1, nr_vcpus: 1 };
        let l7 = p.query(7, 0);
        assert_ne!(l7.edx & (1 << 29), 0, "ARCH_CAPABILITIES");
        assert_ne!(l7.edx & (1 << 26), 0, "IBRS/IBPB with enhanced IBRS");
        assert_eq!(p.query(7, 1).edx & (1 << 29), 0, "only in subleaf 0");
        assert!(p.query(7, 0).eax >= 2, "subleaf 2 is enumerated");
        assert_ne!(p.query(7, 2).edx & (1 << 4), 0, "BHI_CTRL");
        // RDCL_NO, MDS_NO, TAA_NO, PSCHANGE_MC_NO; never TSX_CTRL (7) or RSBA (2).
        for bit in [0, 5, 6, 8] {
            assert_ne!(ARCH_CAPABILITIES & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(ARCH_CAPABILITIES & ((1 << 2) | (1 << 7)), 0);
    }

    #[test]
    fn native_features_with_hypervisor_bit() {
        let p = CpuidPolicy { vcpu_id: 0, domid: 1, nr_vcpus: 1 };
        let l1 = p.query(1, 0);
        assert_ne!(l1.ecx & (1 << 31), 0);
        assert_eq!(l1.ecx & (1 << 28), 0, "no AVX");
        // Long mode, NX and SYSCALL are real on Unicorn's x86-64.
        let e = p.query(0x8000_0001, 0);
        assert_ne!(e.edx & (1 << 29), 0);
        assert_ne!(e.edx & (1 << 20), 0);
        assert_ne!(e.edx & (1 << 11), 0);
        assert!(p.query(0, 0).eax >= 1);
    }
}
