/* far_timer: arms one timer (or a poll timeout) as far ahead as its command
 * line says and waits for it, as a confused or hostile guest may. Xen takes
 * any 64-bit deadline; the host must neither crash nor outwait its own
 * timeout.
 *   ahead_ms=N  the deadline N ms from now (saturating), or
 *   at=N        at system time N ns (1: in the past; up to 2^64-1)
 *   wait=0      HLT with interrupts on, woken by the timer's upcall
 *   wait=1      SCHEDOP_block (interrupts off: it returns when the upcall is pending)
 *   wait=2      SCHEDOP_poll on the timer's port, the deadline its timeout (no timer armed)
 *   via=0       VCPUOP_set_singleshot_timer, via=1 set_timer_op, via=2 no
 *               deadline at all (no timer; a poll without a timeout)
 *   spin_ms=N   run N ms first (the host's idle waits then start at another phase)
 * Prints "waiting" before the wait and "woke after N ms" after, then powers off. */
#include "common/xen.h"

#define HYPERVISOR_memory_op 12
#define HYPERVISOR_set_timer_op 15
#define HYPERVISOR_vcpu_op 24
#define HYPERVISOR_hvm_op 34
#define XENMEM_add_to_physmap 7
#define VCPUOP_set_singleshot_timer 8
#define EVTCHNOP_bind_virq 1
#define EVTCHNOP_unmask 9
#define HVMOP_set_param 0
#define SCHEDOP_block 1
#define UPCALL_VECTOR 0xf3

/* Not static: wake_isr names it. */
struct shared_info shinfo __attribute__((aligned(4096)));
static uint64_t idt[512] __attribute__((aligned(16)));
static uint32_t timer_port;

/* The upcall only has to end the HLT: clear vcpu_info[0].evtchn_upcall_pending
 * (shared_info's first byte), or the vector would come again at once. */
extern char wake_isr[];
asm(".text\n.globl wake_isr\nwake_isr:\n    movb $0, shinfo(%rip)\n    iretq\n");

static uint64_t now_ns(void) { return pvclock_ns(&shinfo.vcpu_info[0].time, rdtsc()); }

static int timer_pending(void)
{
    return shinfo.pending[timer_port / EVTCHN_WORD_BITS] >> (timer_port % EVTCHN_WORD_BITS) & 1;
}

static long arm(int via, uint64_t deadline)
{
    if (via == 1)
        return hypercall(HYPERVISOR_set_timer_op, (long)deadline, 0, 0, 0, 0);
    struct { uint64_t timeout; uint32_t flags; } t = { deadline, 0 };
    return hypercall(HYPERVISOR_vcpu_op, VCPUOP_set_singleshot_timer, 0, (long)&t, 0, 0);
}

int guest_main(uint32_t start_info)
{
    struct { uint16_t domid, size; uint32_t space; unsigned long idx, gpfn; } xatp = { 0x7ff0, 0, 0, 0, (uintptr_t)&shinfo >> 12 };
    if (hypercall(HYPERVISOR_memory_op, XENMEM_add_to_physmap, (long)&xatp, 0, 0, 0) != 0) {
        print("FAIL: shared_info\n");
        return SHUTDOWN_crash;
    }
    set_gate64(idt, UPCALL_VECTOR, wake_isr, 0);
    struct { uint16_t l; uint64_t b; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
    asm volatile("lidt %0" :: "m"(idtr));
    struct { uint16_t domid; uint16_t pad; uint32_t index; uint64_t value; } p = { 0x7ff0, 0, 0, (2ULL << 56) | UPCALL_VECTOR };
    struct { uint32_t virq, vcpu, port; } bv = { 0, 0, 0 };
    if (hypercall(HYPERVISOR_hvm_op, HVMOP_set_param, (long)&p, 0, 0, 0) != 0 || evtchn(EVTCHNOP_bind_virq, &bv) != 0) {
        print("FAIL: callback vector or VIRQ_TIMER\n");
        return SHUTDOWN_crash;
    }
    timer_port = bv.port;
    evtchn(EVTCHNOP_unmask, &timer_port);

    uint64_t wait = cmdline_arg(start_info, "wait", 0), via = cmdline_arg(start_info, "via", 0);
    uint64_t spin_until = now_ns() + cmdline_arg(start_info, "spin_ms", 0) * 1000000;
    while (now_ns() < spin_until) {}
    uint64_t ahead_ms = cmdline_arg(start_info, "ahead_ms", 0), t0 = now_ns();
    uint64_t deadline = cmdline_arg(start_info, "at", 0);
    if (via == 2) {
        deadline = 0;
    } else if (deadline == 0) {
        uint64_t ahead = ahead_ms > ~0ULL / 1000000 ? ~0ULL : ahead_ms * 1000000;
        deadline = t0 > ~0ULL - ahead ? ~0ULL : t0 + ahead;
    }
    printk("waiting: wait=%lu via=%lu deadline %lu (now %lu)\n", wait, via, deadline, t0);
    if (wait == 2) {
        struct { uint32_t *ports; uint32_t n; uint64_t timeout; } pl = { &timer_port, 1, deadline };
        long r = hypercall(HYPERVISOR_sched_op, SCHEDOP_poll, (long)&pl, 0, 0, 0);
        if (r != 0) printk("FAIL: poll gave %d\n", (int)r);
    } else {
        long r = via == 2 ? 0 : arm((int)via, deadline);
        if (r != 0) printk("FAIL: arming the timer gave %d\n", (int)r);
        if (wait == 1) {
            while (!timer_pending()) hypercall(HYPERVISOR_sched_op, SCHEDOP_block, 0, 0, 0, 0);
        } else {
            while (!timer_pending()) asm volatile("sti; hlt; cli");
        }
    }
    printk("woke after %lu ms\n", (now_ns() - t0) / 1000000);
    return SHUTDOWN_poweroff;
}
