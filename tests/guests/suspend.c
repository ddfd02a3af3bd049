/* suspend: a guest that asks to be suspended, as Linux does for `xl save`
 * (SCHEDOP_shutdown with SHUTDOWN_suspend), and checks what it finds when
 * the call returns. Prints "SUSPEND-GUEST start n=<counter>" (a value taken
 * from the TSC, so each boot has its own), fills some pages with a pattern
 * made from it, suspends, then prints "SUSPEND-GUEST resumed rc=<rc>" and
 * checks: rc is 1 (the suspend was cancelled: go on in the same domain, as
 * a toolstack's resume says), the counter and the pattern are intact, and
 * Xen's system time did not go backwards across the suspend. */
#include "common/xen.h"

#define HYPERVISOR_memory_op 12
#define XENMEM_add_to_physmap 7
#define XENMAPSPACE_shared_info 0
#define DOMID_SELF 0x7ff0
#define SHUTDOWN_suspend 2
#define SUSPEND_CANCELLED 1
#define PAGE 4096
#define PATTERN_PAGES 16

static struct shared_info shinfo __attribute__((aligned(PAGE)));
static volatile uint64_t counter;
static volatile uint64_t pattern[PATTERN_PAGES * PAGE / 8] __attribute__((aligned(PAGE)));

static uint64_t now_ns(void) { return pvclock_ns(&shinfo.vcpu_info[0].time, rdtsc()); }

/* A different word at every index, all of them following from `seed`. */
static uint64_t pattern_word(uint64_t seed, uint64_t i) { return (seed ^ i) * 0x9e3779b97f4a7c15ULL + i; }

int guest_main(uint32_t start_info)
{
    (void)start_info;
    struct { uint16_t domid, size; uint32_t space; unsigned long idx, gpfn; } xatp = {
        DOMID_SELF, 0, XENMAPSPACE_shared_info, 0, (uintptr_t)&shinfo >> 12 };
    if (hypercall(HYPERVISOR_memory_op, XENMEM_add_to_physmap, (long)&xatp, 0, 0, 0) != 0) {
        check(0, "shared_info placed (for the system time)");
        return verdict();
    }
    uint64_t n = rdtsc() | 1; /* never 0, so an RAM image of zeros cannot pass */
    counter = n;
    for (uint64_t i = 0; i < sizeof(pattern) / 8; i++)
        pattern[i] = pattern_word(n, i);
    printk("SUSPEND-GUEST start n=%lu\n", n);

    uint64_t before = now_ns();
    uint32_t reason = SHUTDOWN_suspend;
    long rc = hypercall(HYPERVISOR_sched_op, SCHEDOP_shutdown, (long)&reason, 0, 0, 0);
    uint64_t after = now_ns();
    printk("SUSPEND-GUEST resumed rc=%ld\n", (int64_t)rc);

    check(rc == SUSPEND_CANCELLED, "SCHEDOP_shutdown(suspend) returned %ld (1: cancelled, go on)", (int64_t)rc);
    check(counter == n, "the counter is intact (n=%lu, now %lu)", n, counter);
    uint64_t bad = 0;
    for (uint64_t i = 0; i < sizeof(pattern) / 8; i++)
        bad += pattern[i] != pattern_word(n, i);
    check(bad == 0, "the %d-page pattern is intact (%lu words differ)", PATTERN_PAGES, bad);
    check(after >= before, "system time did not go backwards (%lu ns before the suspend, %lu after)", before, after);
    return verdict();
}
