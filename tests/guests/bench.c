/* bench: timing loops for benches/. Measures with RDTSC inside the guest
 * (the host converts cycles to ns): hypercall round trips by each entry path,
 * then a compute loop of known length. Prints "BENCH key value" lines. */
#include "common/lib.h"

#define N_CALLS 20000
#define N_LOOP 50000000UL

extern void compute_loop(uint64_t n);
asm(".globl compute_loop\n"
    "compute_loop:\n"      /* 4 instructions per iteration */
    "1: add %rdi, %rax\n"
    "   xor %rdx, %rax\n"
    "   dec %rdi\n"
    "   jnz 1b\n"
    "   ret\n");

int guest_main(uint32_t start_info)
{
    (void)start_info;
    setup_hypercall_page();
    static const char *const names[] = { "vmcall", "vmmcall", "page" };
    for (int p = HC_VMCALL; p <= HC_PAGE; p++) {
        hc_path = p;
        for (int i = 0; i < 1000; i++) hypercall(HYPERVISOR_xen_version, XENVER_version, 0, 0, 0, 0);
        uint64_t t0 = rdtsc();
        for (int i = 0; i < N_CALLS; i++) hypercall(HYPERVISOR_xen_version, XENVER_version, 0, 0, 0, 0);
        uint64_t t1 = rdtsc();
        printk("BENCH hypercall_cycles_%s %lu\n", names[p], (t1 - t0) / N_CALLS);
    }
    hc_path = HC_VMCALL;
    printk("BENCH loop_insns %lu\n", N_LOOP * 4);
    uint64_t t0 = rdtsc();
    compute_loop(N_LOOP);
    uint64_t t1 = rdtsc();
    printk("BENCH loop_cycles %lu\n", t1 - t0);
    return SHUTDOWN_poweroff;
}
