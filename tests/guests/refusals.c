/* refusals: issue every hypercall and sub-op a PVH domU can name, with
 * harmless arguments (its own domid, current interface versions, zeroed or
 * invalid buffers, unknown vCPUs), and print what each got:
 *     R <hypercall> <sub-op or -> <result>
 * tests/test_refusals.py compares the lines with docs/hypercalls.md. A call
 * that would hurt the guest (SCHEDOP_block: nothing would wake it) is not
 * made and printed as "S <hypercall> <sub-op>". */
#include "common/lib.h"

#define UNMAPPED 0x40000000UL /* above the 1 GiB the boot code maps */
#define DOMID_SELF 0x7FF0
#define DOMCTL_VERSION 0x17
#define SYSCTL_VERSION 0x15
#define XENPF_VERSION 0x03000001

static uint8_t page[4096] __attribute__((aligned(4096)));
static uint16_t me;
static int rows;

static void row(unsigned nr, long sub, long ret)
{
    if (sub < 0)
        printk("R %u - %ld\n", nr, ret);
    else
        printk("R %u %ld %ld\n", nr, sub, ret);
    rows++;
}

static void fill(int byte) { memset(page, byte, sizeof(page)); }
static void put16(unsigned off, uint16_t v) { memcpy(page + off, &v, 2); }
static void put32(unsigned off, uint32_t v) { memcpy(page + off, &v, 4); }
static void put64(unsigned off, uint64_t v) { memcpy(page + off, &v, 8); }
static long P(void) { return (long)page; }

/* struct xen_domctl / xen_sysctl / xen_platform_op: cmd, interface_version, (domain). */
static long control(unsigned nr, uint32_t cmd, uint32_t version)
{
    fill(0);
    put32(0, cmd);
    put32(4, version);
    put16(8, me);
    return hypercall(nr, P(), 0, 0, 0, 0);
}

static void unreachable(void)
{
    static const unsigned nrs[] = { 0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 14, 16, 19, 22, 23, 25, 27, 28, 30, 31,
                                    37, 38, 39, 43, 44, 45, 46, 47, 48, 50, 55, 63 };
    for (unsigned i = 0; i < sizeof(nrs) / sizeof(nrs[0]); i++) {
        fill(0);
        row(nrs[i], -1, hypercall(nrs[i], P(), 0, 0, 0, 0));
    }
    fill(0);
    row(13, -1, hypercall(13, P(), 0, 0, 0, 0));                 /* multicall, no entries */
    row(15, -1, hypercall(15, 0, 0, 0, 0, 0));                   /* set_timer_op: stop */
    row(26, -1, hypercall(26, P(), 0, 0, DOMID_SELF, 0));        /* mmuext_op, no ops */
    row(49, -1, control(49, 10, DOMCTL_VERSION));                /* paging_domctl_cont(shadow_op) */
}

static void xen_version(void)
{
    for (long sub = 0; sub <= 10; sub++) {
        fill(0);
        /* pagesize takes a null handle */
        row(17, sub, hypercall(17, sub, sub == 7 ? 0 : P(), 0, 0, 0));
    }
    row(18, 0, hypercall(18, 0, 0, P(), 0, 0)); /* console write, 0 bytes */
    row(18, 1, hypercall(18, 1, 0, P(), 0, 0)); /* console read, 0 bytes */
    row(21, 0, hypercall(21, 0, 99, 0, 0, 0));  /* vm_assist: no type 99 */
    row(21, 1, hypercall(21, 1, 99, 0, 0, 0));
}

static void memory_op(void)
{
    for (long sub = 0; sub <= 31; sub++) {
        fill(0);
        switch (sub) {
        case 3: case 4: case 14: case 26: put16(0, DOMID_SELF); break; /* xen_memory_domain, vnuma */
        case 16: case 17: put16(32, DOMID_SELF); break;                 /* xen_pod_target */
        case 21: put16(2, me); break;                                   /* xen_mem_access_op */
        case 24: put16(24, me); break;                                  /* xen_memory_reservation */
        case 28: put16(0, me); break;                                   /* xen_mem_acquire_resource */
        }
        row(12, sub, hypercall(12, sub, P(), 0, 0, 0));
    }
}

static void grant_table_op(void)
{
    /* Zeroed: domain 0 is not the caller (-ESRCH), version 0 is no version. */
    for (long sub = 0; sub <= 15; sub++) {
        fill(0);
        row(20, sub, hypercall(20, sub, P(), 1, 0, 0));
    }
}

static void vcpu_op(void)
{
    for (long sub = 0; sub <= 15; sub++) {
        fill(0);
        row(24, sub, hypercall(24, sub, 0xffff, P(), 0, 0)); /* no vCPU 0xffff */
    }
}

static void sched_op(void)
{
    for (long sub = 0; sub <= 7; sub++) {
        long arg = P();
        fill(0xff);
        switch (sub) {
        case 0: arg = 0; break;                             /* yield */
        case 1: printk("S 29 1\n"); continue;               /* block: nothing would wake us */
        case 4: fill(0); put16(0, me); break;               /* remote_shutdown of itself */
        case 5: case 6: case 7: arg = UNMAPPED; break;      /* shutdown_code, watchdog, pin_override */
        }
        row(29, sub, hypercall(29, sub, arg, 0, 0, 0));    /* shutdown: reason ~0; poll: ~0 ports */
    }
}

static void event_channel_op(void)
{
    /* All ones: no such port, vCPU or domain. */
    for (long sub = 0; sub <= 15; sub++) {
        fill(0xff);
        row(32, sub, hypercall(32, sub, P(), 0, 0, 0));
    }
}

static void physdev_op(void)
{
    for (long sub = 0; sub <= 31; sub++) {
        fill(0);
        row(33, sub, hypercall(33, sub, P(), 0, 0, 0));
    }
}

static void hvm_op(void)
{
    for (long sub = 0; sub <= 27; sub++) {
        long arg = P();
        fill(0);
        switch (sub) {
        case 0: case 1: case 23: fill(0xff); break;   /* no domain 0xffff, no vCPU ~0 */
        case 5: case 24: arg = 0; break;              /* flush_tlbs, guest_request_vm_event: null */
        case 9: put16(0, DOMID_SELF); break;          /* pagetable_dying */
        }
        row(34, sub, hypercall(34, sub, arg, 0, 0, 0));
    }
}

static void privileged(void)
{
    for (uint32_t cmd = 0; cmd <= 31; cmd++)
        row(35, cmd, control(35, cmd, SYSCTL_VERSION));
    for (uint32_t cmd = 0; cmd <= 90; cmd++)
        row(36, cmd, control(36, cmd, DOMCTL_VERSION));
    for (uint32_t cmd = 1000; cmd <= 1003; cmd++)
        row(36, cmd, control(36, cmd, DOMCTL_VERSION));
    for (uint32_t cmd = 0; cmd <= 70; cmd++)
        row(7, cmd, control(7, cmd, XENPF_VERSION));
    for (long sub = 0; sub <= 7; sub++) {
        fill(0);
        row(40, sub, hypercall(40, sub, P(), 0, 0, 0));
    }
    for (long sub = 0; sub <= 20; sub++) {
        /* one buffer {handle, size} holding struct xen_dm_op { uint32_t op; ... } */
        fill(0);
        put64(0, (uint64_t)page + 64);
        put64(8, 256);
        put32(64, sub);
        row(41, sub, hypercall(41, me, 1, P(), 0, 0));
    }
    for (long sub = 0; sub <= 2; sub++)
        row(42, sub, hypercall(42, sub, 0, 0, 0, 0));
}

int guest_main(uint32_t start_info)
{
    (void)start_info;
    uint32_t a, b, c, d;
    cpuid(0x40000004, &a, &b, &c, &d);
    check(a & (1 << 4), "CPUID 0x40000004 gives the domid");
    me = c;
    printk("domid %u\n", (unsigned)me);
    unreachable();
    xen_version();
    memory_op();
    grant_table_op();
    vcpu_op();
    sched_op();
    event_channel_op();
    physdev_op();
    hvm_op();
    privileged();
    check(hypercall(17, 0, 0, 0, 0, 0) == ((4 << 16) | 19), "still alive and answered after %d calls", rows);
    return verdict();
}
