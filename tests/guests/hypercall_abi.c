/* hypercall_abi: the three ways into the hypervisor (VMCALL, VMMCALL, the
 * hypercall page) agree; bad numbers and bad buffers get Xen's errnos. Built
 * 32-bit too; the 64-bit build also calls from compat mode (32-bit ABI). */
#include "common/lib.h"

#define ENOSYS 38
#define EFAULT 14
#define EINVAL 22
#define UNMAPPED 0x40000000UL /* above the 1 GiB the boot code maps */

static uint8_t two_pages[8192] __attribute__((aligned(4096)));
static const char *const path_name[] = { "vmcall", "vmmcall", "page" };

struct sched_poll { uint32_t *ports; uint32_t nr_ports; uint64_t timeout; };

#ifdef __x86_64__
long compat_call(unsigned nr, uint32_t a1, uint32_t a2, uint32_t a3); /* hypercall_abi_compat.S */

/* A long-mode guest in a 32-bit code segment: Xen takes the 32-bit ABI
 * for that call (EBX, ECX, EDX; the upper register halves ignored). */
static void compat_mode_calls(void)
{
    gdt64[6] = 0x00cf9b000000ffffULL; /* 32-bit ring-0 code at 0x30 */
    long r = compat_call(HYPERVISOR_xen_version, XENVER_version, 0, 0);
    check(r == ((4 << 16) | 19), "xen_version from compat mode (%x)", (unsigned)r);
    static char extra[16];
    static const char native[16];
    memset(extra, 0x55, sizeof(extra));
    r = compat_call(HYPERVISOR_xen_version, XENVER_extraversion, (uint32_t)(uintptr_t)extra, 0);
    hypercall(HYPERVISOR_xen_version, XENVER_extraversion, (long)native, 0, 0, 0);
    check(r == 0 && memcmp(extra, native, 16) == 0, "extraversion by ECX from compat mode [%s] (%d)", extra, (int)r);
    static const char msg[] = "console write from compat mode\n";
    r = compat_call(HYPERVISOR_console_io, CONSOLEIO_write, sizeof(msg) - 1, (uint32_t)(uintptr_t)msg);
    check(r == 0, "console_io write from compat mode (%d)", (int)r);
    r = compat_call(61, 0, 0, 0);
    check(r == -ENOSYS, "unknown hypercall from compat mode: -ENOSYS (%d)", (int)r);
    r = hypercall(HYPERVISOR_xen_version, XENVER_version, 0, 0, 0, 0);
    check(r == ((4 << 16) | 19), "and the 64-bit ABI again once back in long mode");
}
#endif

#ifndef __x86_64__
/* Exceptions through the 32-bit runtime's IDT: #UD, and #PF where there is
 * paging (what reads of memory that is not there give is the memory guest's). */
static volatile int faults;
static volatile uint32_t fault_cr2, fault_error, fault_vector;

static int skip_faulting_insn(struct exc_frame *f)
{
    uint32_t cr2;
    asm volatile("mov %%cr2, %0" : "=r"(cr2));
    fault_vector = f->vector;
    fault_error = f->error;
    fault_cr2 = cr2;
    faults++;
    f->eip += 2; /* ud2, movl (%eax), %eax */
    return f->vector == 6 || f->vector == 14;
}

static void exceptions_32(void)
{
    exception_handler = skip_faulting_insn;
    asm volatile("ud2");
    check(faults == 1 && fault_vector == 6, "#UD through a 32-bit gate (vector %u)", fault_vector);
#if defined(BOOT32_PSE) || defined(BOOT32_PAE)
    uint32_t v = UNMAPPED;
    asm volatile("movl (%%eax), %%eax" : "+a"(v) :: "memory");
    check(faults == 2 && fault_vector == 14 && fault_cr2 == UNMAPPED && fault_error == 0,
          "#PF reading an unmapped address (cr2 %x, error %x)", fault_cr2, fault_error);
#endif
    exception_handler = 0;
}
#endif

int guest_main(uint32_t start_info)
{
    (void)start_info;
    check(setup_hypercall_page() == 0, "hypercall page filled after the MSR write");
    check(hypercall_page[0] == 0xb8 && hypercall_page[32] == 0xb8 && hypercall_page[33] == 1,
          "page holds mov $nr, %%eax stubs");

    long versions[3], unknown[3], unknown2[3];
    char extra[3][16];
    for (int p = HC_VMCALL; p <= HC_PAGE; p++) {
        hc_path = p;
        versions[p] = hypercall(HYPERVISOR_xen_version, XENVER_version, 0, 0, 0, 0);
        unknown[p] = hypercall(60, 1, 2, 3, 4, 5);
        unknown2[p] = hypercall(11, 0, 0, 0, 0, 0);
        memset(extra[p], 0x55, 16);
        hypercall(HYPERVISOR_xen_version, XENVER_extraversion, (long)extra[p], 0, 0, 0);
        check(unknown[p] == -ENOSYS && unknown2[p] == -ENOSYS, "%s: unknown hypercalls give -ENOSYS (%d, %d)",
              path_name[p], (int)unknown[p], (int)unknown2[p]);
    }
    hc_path = HC_VMCALL;
    check(versions[0] == ((4 << 16) | 19), "xen_version(version) = %x", (unsigned)versions[0]);
    check(versions[0] == versions[1] && versions[1] == versions[2], "same version by every path (%x %x %x)",
          (unsigned)versions[0], (unsigned)versions[1], (unsigned)versions[2]);
    check(memcmp(extra[0], extra[1], 16) == 0 && memcmp(extra[1], extra[2], 16) == 0,
          "same extraversion by every path [%s]", extra[0]);

    /* A buffer that straddles two pages. */
    char *straddle = (char *)two_pages + 4096 - 7;
    long r = hypercall(HYPERVISOR_xen_version, XENVER_extraversion, (long)straddle, 0, 0, 0);
    check(r == 0 && memcmp(straddle, extra[0], 16) == 0, "extraversion into a buffer crossing a page (%d)", (int)r);
    static const char msg[] = "console write across a page boundary\n";
    memcpy((char *)two_pages + 4096 - 10, msg, sizeof(msg) - 1);
    r = hypercall(HYPERVISOR_console_io, CONSOLEIO_write, sizeof(msg) - 1, (long)two_pages + 4096 - 10, 0, 0);
    check(r == 0, "console_io write from a buffer crossing a page (%d)", (int)r);

    /* Unmapped buffers: -EFAULT, whatever the path. */
    for (int p = HC_VMCALL; p <= HC_PAGE; p++) {
        hc_path = p;
        long a = hypercall(HYPERVISOR_xen_version, XENVER_extraversion, UNMAPPED, 0, 0, 0);
        long b = hypercall(HYPERVISOR_xen_version, XENVER_get_features, UNMAPPED + 0x123, 0, 0, 0);
        long c = hypercall(HYPERVISOR_console_io, CONSOLEIO_write, 16, UNMAPPED - 8, 0, 0);
        check(a == -EFAULT && b == -EFAULT && c == -EFAULT, "%s: unmapped buffers give -EFAULT (%d %d %d)",
              path_name[p], (int)a, (int)b, (int)c);
    }
    hc_path = HC_VMCALL;
#ifdef __x86_64__
    /* Non-canonical too. */
    r = hypercall(HYPERVISOR_xen_version, XENVER_extraversion, 0x0000800000000000L, 0, 0, 0);
    check(r == -EFAULT, "non-canonical buffer gives -EFAULT (%d)", (int)r);
#endif

    struct { uint32_t idx, map; } fi = { 0, 0 };
    r = hypercall(HYPERVISOR_xen_version, XENVER_get_features, (long)&fi, 0, 0, 0);
    check(r == 0 && (fi.map & (1 << 8)) && (fi.map & (1 << 9)) && (fi.map & (1 << 2)),
          "get_features: auto_translated, callback vector, safe pvclock (%x)", fi.map);
    fi.idx = 7;
    r = hypercall(HYPERVISOR_xen_version, XENVER_get_features, (long)&fi, 0, 0, 0);
    check(r == -EINVAL, "get_features of an unknown submap gives -EINVAL (%d)", (int)r);
    check(hypercall(HYPERVISOR_xen_version, XENVER_pagesize, 0, 0, 0, 0) == 4096, "pagesize is 4096");
    check(hypercall(HYPERVISOR_sched_op, SCHEDOP_yield, 0, 0, 0, 0) == 0, "sched_op yield");
    uint32_t bad_reason = 99;
    r = hypercall(HYPERVISOR_sched_op, SCHEDOP_shutdown, (long)&bad_reason, 0, 0, 0);
    check(r == -EINVAL, "shutdown with an unknown reason gives -EINVAL (%d)", (int)r);
    uint32_t ports[1] = { 1 };
    struct sched_poll poll = { ports, 200, 0 };
    r = hypercall(HYPERVISOR_sched_op, SCHEDOP_poll, (long)&poll, 0, 0, 0);
    check(r == -EINVAL, "poll of 200 ports gives -EINVAL (%d)", (int)r);
    poll.nr_ports = 1;
    poll.ports = (uint32_t *)UNMAPPED;
    r = hypercall(HYPERVISOR_sched_op, SCHEDOP_poll, (long)&poll, 0, 0, 0);
    check(r == -EFAULT, "poll with an unmapped port array gives -EFAULT (%d)", (int)r);
    r = hypercall(HYPERVISOR_sched_op, 77, 0, 0, 0, 0);
    check(r == -ENOSYS, "unknown sched_op gives -ENOSYS (%d)", (int)r);
#ifdef __x86_64__
    compat_mode_calls();
#else
    exceptions_32();
#endif
    return verdict();
}
