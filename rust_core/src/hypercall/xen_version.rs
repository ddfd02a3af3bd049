//! HYPERVISOR_xen_version (version.h).

use super::{Call, HcResult};
use crate::abi::{errno, xenfeat, xenver};
use crate::cpuid::{XEN_MAJOR, XEN_MINOR};

pub const EXTRAVERSION: &str = ".0-pvhvm";
/// As Xen lists them (arch_get_xen_caps) on a host that runs HVM guests only.
pub const CAPABILITIES: &str = "hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64 ";
/// What platform_parameters reports as virt_start to an HVM guest: Xen
/// (4.19) gives HYPERVISOR_VIRT_START to PV guests only.
const HVM_VIRT_START: u64 = 0;
/// XENVER_commandline's answer to a domU (XSM's default policy).
const DENIED: &str = "<denied>";

/// The XENFEAT bits of submap 0 that Xen 4.19 gives an HVM/PVH domU
/// (translated, not direct-mapped, no pirqs, not the hardware domain).
pub fn features() -> u32 {
    [
        xenfeat::WRITABLE_PAGE_TABLES,
        xenfeat::AUTO_TRANSLATED_PHYSMAP,
        xenfeat::HVM_CALLBACK_VECTOR,
        xenfeat::HVM_SAFE_PVCLOCK,
        xenfeat::MEMORY_OP_VNODE_SUPPORTED,
        xenfeat::NOT_DIRECT_MAPPED,
        xenfeat::RUNSTATE_PHYS_AREA,
        xenfeat::VCPU_TIME_PHYS_AREA,
        xenfeat::DM_MSIX_ALL_WRITES,
    ]
    .iter()
    .fold(0, |m, b| m | (1 << b))
}

/// A NUL-padded fixed-size string field.
fn fixed(s: &str, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let n = s.len().min(len - 1);
    v[..n].copy_from_slice(&s.as_bytes()[..n]);
    v
}

pub fn call(c: &mut Call, args: [u64; 5]) -> HcResult {
    let [cmd, arg, ..] = args;
    match cmd {
        xenver::VERSION => Ok(((XEN_MAJOR << 16) | XEN_MINOR) as i64),
        xenver::EXTRAVERSION => c.guest.write(arg, &fixed(EXTRAVERSION, 16)).map(|_| 0),
        xenver::COMPILE_INFO => {
            // compiler[64], compile_by[16], compile_domain[32], compile_date[32]
            let mut v = fixed(concat!("rustc (pvhvm ", env!("CARGO_PKG_VERSION"), ")"), 64);
            v.extend(fixed("pvhvm", 16));
            v.extend(fixed("localdomain", 32));
            v.extend(fixed("", 32));
            c.guest.write(arg, &v).map(|_| 0)
        }
        xenver::CAPABILITIES => c.guest.write(arg, &fixed(CAPABILITIES, 1024)).map(|_| 0),
        xenver::CHANGESET => c.guest.write(arg, &fixed("pvhvm", 64)).map(|_| 0),
        // struct xen_platform_parameters { xen_ulong_t virt_start; }
        xenver::PLATFORM_PARAMETERS => c.guest.write_ulong(arg, HVM_VIRT_START).map(|_| 0),
        xenver::GET_FEATURES => {
            // struct xen_feature_info { uint32_t submap_idx; uint32_t submap; }
            let idx = c.guest.read_u32(arg)?;
            let submap = match idx {
                0 => features(),
                _ => return Err(errno::EINVAL),
            };
            c.guest.write(arg + 4, &submap.to_le_bytes()).map(|_| 0)
        }
        // Xen takes no buffer here.
        xenver::PAGESIZE => if arg == 0 { Ok(4096) } else { Err(errno::EINVAL) },
        xenver::GUEST_HANDLE => {
            let uuid = c.dom.uuid;
            c.guest.write(arg, &uuid).map(|_| 0)
        }
        // Xen's default policy keeps its command line from domUs: the call
        // succeeds with "<denied>" (NUL included) in place of it.
        xenver::COMMANDLINE => c.guest.write(arg, &fixed(DENIED, DENIED.len() + 1)).map(|_| 0),
        // ... and refuses the build id outright.
        xenver::BUILD_ID => Err(errno::EPERM),
        _ => Err(errno::ENOSYS),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn feature_bits() {
        let f = super::features();
        assert_eq!(f & (1 << 8), 1 << 8, "hvm_callback_vector");
        assert_eq!(f & (1 << 9), 1 << 9, "hvm_safe_pvclock");
        assert_eq!(f & (1 << 3), 0, "not supervisor_mode_kernel");
        assert_eq!(f & (1 << 15), 0, "linux_rsdp_unrestricted is the kernel's to declare, not Xen's");
        assert_eq!(f, 0x1d2305, "what Xen 4.19 gives a PVH domU");
    }

    #[test]
    fn fixed_strings_are_terminated() {
        let v = super::fixed("0123456789abcdefXYZ", 16);
        assert_eq!(v.len(), 16);
        assert_eq!(v[15], 0);
    }
}
