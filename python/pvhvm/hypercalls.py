"""Names for Xen hypercall numbers and sub-operations (xen.h and friends),
for traces and crash reports."""

from __future__ import annotations

NAMES = {
    0: "set_trap_table", 1: "mmu_update", 2: "set_gdt", 3: "stack_switch", 4: "set_callbacks",
    5: "fpu_taskswitch", 6: "sched_op_compat", 7: "platform_op", 8: "set_debugreg", 9: "get_debugreg",
    10: "update_descriptor", 12: "memory_op", 13: "multicall", 14: "update_va_mapping",
    15: "set_timer_op", 16: "event_channel_op_compat", 17: "xen_version", 18: "console_io",
    19: "physdev_op_compat", 20: "grant_table_op", 21: "vm_assist", 22: "update_va_mapping_otherdomain",
    23: "iret", 24: "vcpu_op", 25: "set_segment_base", 26: "mmuext_op", 27: "xsm_op", 28: "nmi_op",
    29: "sched_op", 30: "callback_op", 31: "xenoprof_op", 32: "event_channel_op", 33: "physdev_op",
    34: "hvm_op", 35: "sysctl", 36: "domctl", 37: "kexec_op", 38: "tmem_op", 39: "argo_op",
    40: "xenpmu_op", 41: "dm_op", 42: "hypfs_op",
}

SUBOPS = {
    17: {0: "version", 1: "extraversion", 2: "compile_info", 3: "capabilities", 4: "changeset",
         5: "platform_parameters", 6: "get_features", 7: "pagesize", 8: "guest_handle", 9: "commandline",
         10: "build_id"},
    18: {0: "write", 1: "read"},
    29: {0: "yield", 1: "block", 2: "shutdown", 3: "poll", 4: "remote_shutdown", 5: "shutdown_code",
         6: "watchdog", 7: "pin_override"},
    12: {0: "increase_reservation", 1: "decrease_reservation", 2: "maximum_ram_page", 3: "current_reservation",
         4: "maximum_reservation", 5: "machphys_mfn_list", 6: "populate_physmap", 7: "add_to_physmap",
         9: "memory_map", 10: "machine_memory_map", 11: "exchange", 12: "machphys_mapping", 13: "set_memory_map",
         14: "maximum_gpfn", 15: "remove_from_physmap", 16: "set_pod_target", 17: "get_pod_target",
         18: "get_sharing_freed_pages", 19: "get_sharing_shared_pages", 20: "paging_op", 21: "access_op",
         22: "sharing_op", 23: "add_to_physmap_batch", 24: "claim_pages", 25: "machphys_compat_mfn_list",
         26: "get_vnumainfo", 27: "reserved_device_memory_map", 28: "acquire_resource"},
    24: {0: "initialise", 1: "up", 2: "down", 3: "is_up", 4: "get_runstate_info", 5: "register_runstate_memory_area",
         6: "set_periodic_timer", 7: "stop_periodic_timer", 8: "set_singleshot_timer", 9: "stop_singleshot_timer",
         10: "register_vcpu_info", 11: "send_nmi", 12: "get_physid", 13: "register_vcpu_time_memory_area"},
    32: {0: "bind_interdomain", 1: "bind_virq", 2: "bind_pirq", 3: "close", 4: "send", 5: "status",
         6: "alloc_unbound", 7: "bind_ipi", 8: "bind_vcpu", 9: "unmask", 10: "reset", 11: "init_control",
         12: "expand_array", 13: "set_priority"},
    34: {0: "set_param", 1: "get_param", 2: "set_pci_intx_level", 3: "set_isa_irq_level", 4: "set_pci_link_route",
         5: "flush_tlbs", 9: "pagetable_dying", 10: "get_time", 11: "xentrace", 12: "set_mem_access",
         13: "get_mem_access", 15: "get_mem_type", 23: "set_evtchn_upcall_vector", 24: "guest_request_vm_event",
         25: "altp2m"},
    20: {0: "map_grant_ref", 1: "unmap_grant_ref", 2: "setup_table", 3: "dump_table", 4: "transfer", 5: "copy",
         6: "query_size", 7: "unmap_and_replace", 8: "set_version", 9: "get_status_frames", 10: "get_version"},
}

ERRNO = {1: "EPERM", 2: "ENOENT", 3: "ESRCH", 7: "E2BIG", 11: "EAGAIN", 12: "ENOMEM", 13: "EACCES",
         14: "EFAULT", 16: "EBUSY", 17: "EEXIST", 19: "ENODEV", 22: "EINVAL", 28: "ENOSPC", 38: "ENOSYS",
         61: "ENODATA", 95: "EOPNOTSUPP"}

MULTIPLEXED = set(SUBOPS) | {21, 33}


def name(nr: int) -> str:
    return NAMES.get(nr, f"hypercall_{nr}")


def describe(nr: int, args: tuple[int, ...], result: int) -> str:
    """One trace line: `xen_version(version, 0x0, 0x0) = 0x40013`, `console_io(write, 0xd, 0x...) = 0`."""
    parts: list[str] = []
    rest = list(args)
    if nr in MULTIPLEXED:
        op = rest.pop(0)
        parts.append(SUBOPS.get(nr, {}).get(op, str(op)))
        rest = rest[:2]
    else:
        rest = rest[:3]
    parts += [f"{a:#x}" for a in rest]
    res = f"-{ERRNO.get(-result, -result)}" if result < 0 else f"{result:#x}"
    return f"{name(nr)}({', '.join(parts)}) = {res}"
