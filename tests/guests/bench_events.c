/* bench_events: event channel and timer latency for benches/.
 *
 * Sets up shared_info, the callback vector and VIRQ_TIMER as events.c does,
 * then measures:
 *   - IPI send-to-upcall: RDTSC just before EVTCHNOP_send on a self-IPI port
 *     (interrupts on) to RDTSC on entry to the upcall handler, in cycles;
 *   - timer lateness: VCPUOP_set_singleshot_timer for now + 1 ms and + 10 ms,
 *     waiting with "sti; hlt" and by spinning with interrupts on; the pvclock
 *     time of the upcall minus the requested deadline, in ns (signed: a
 *     negative value is a timer that fired early).
 * Sample counts come from the command line: "ipi=N t1=N t10=N" (defaults
 * below). Prints "BENCH key value" lines (min, p50, p99, max of each). */
#include "common/xen.h"

#define HYPERVISOR_memory_op 12
#define HYPERVISOR_vcpu_op 24
#define HYPERVISOR_hvm_op 34
#define XENMEM_add_to_physmap 7
#define VCPUOP_set_singleshot_timer 8
#define EVTCHNOP_bind_virq 1
#define EVTCHNOP_send 4
#define EVTCHNOP_bind_ipi 7
#define EVTCHNOP_unmask 9
#define HVMOP_set_param 0
#define UPCALL_VECTOR 0xf3
#define MAX_SAMPLES 4096


static struct shared_info shinfo __attribute__((aligned(4096)));
static uint64_t idt[512] __attribute__((aligned(16)));
static uint32_t timer_port, ipi_port;
volatile uint64_t timer_events, ipi_events, upcall_tsc, timer_tsc;
static int64_t samples[MAX_SAMPLES];

/* The upcall vector: save the caller-saved registers, call the handler. */
asm(".globl upcall_entry\n"
    "upcall_entry:\n"
    "  push %rax; push %rcx; push %rdx; push %rsi; push %rdi\n"
    "  push %r8; push %r9; push %r10; push %r11\n"
    "  cld\n"
    "  call upcall_handler\n"
    "  pop %r11; pop %r10; pop %r9; pop %r8\n"
    "  pop %rdi; pop %rsi; pop %rdx; pop %rcx; pop %rax\n"
    "  iretq\n");
extern char upcall_entry[];

static uint64_t tsc_to_ns(uint64_t tsc) { return pvclock_ns(&shinfo.vcpu_info[0].time, tsc); }
static uint64_t now_ns(void) { return tsc_to_ns(rdtsc()); }

static uint64_t upcall_at;

static void on_port(uint32_t port)
{
    if (port == timer_port) { timer_tsc = upcall_at; timer_events++; }
    if (port == ipi_port) { upcall_tsc = upcall_at; ipi_events++; }
}

void upcall_handler(void)
{
    upcall_at = rdtsc();
    evtchn_scan(&shinfo, 0, on_port);
}

static long set_timer(uint64_t deadline)
{
    struct { uint64_t timeout; uint32_t flags; } t = { deadline, 0 };
    return hypercall(HYPERVISOR_vcpu_op, VCPUOP_set_singleshot_timer, 0, (long)&t, 0, 0);
}





static int clamp(uint64_t n) { return n < 1 ? 1 : n > MAX_SAMPLES ? MAX_SAMPLES : (int)n; }

/* Timer lateness: arm the one-shot timer for now + `delta_ns`, wait by
 * halting or spinning with interrupts on, and record the pvclock time of
 * the upcall minus the deadline. */
static void timer_bench(const char *name, uint64_t delta_ns, int halt, int n)
{
    for (int i = 0; i < n; i++) {
        uint64_t before = timer_events;
        uint64_t deadline = now_ns() + delta_ns;
        set_timer(deadline);
        if (halt) {
            while (timer_events == before) asm volatile("sti; hlt; cli" ::: "memory");
        } else {
            asm volatile("sti" ::: "memory");
            while (timer_events == before) asm volatile("pause" ::: "memory");
            asm volatile("cli" ::: "memory");
        }
        samples[i] = (int64_t)(tsc_to_ns(timer_tsc) - deadline);
    }
    bench_report(name, samples, n);
}

int guest_main(uint32_t start_info)
{
    int n_ipi = clamp(cmdline_arg(start_info, "ipi", 2000));
    int n_t1 = clamp(cmdline_arg(start_info, "t1", 200));
    int n_t10 = clamp(cmdline_arg(start_info, "t10", 30));

    set_gate64(idt, UPCALL_VECTOR, upcall_entry, 0);
    struct { uint16_t l; uint64_t b; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
    asm volatile("lidt %0" :: "m"(idtr));

    struct { uint16_t domid, size; uint32_t space; uint64_t idx, gpfn; } xatp = { 0x7ff0, 0, 0, 0, (uint64_t)(uintptr_t)&shinfo >> 12 };
    check(hypercall(HYPERVISOR_memory_op, XENMEM_add_to_physmap, (long)&xatp, 0, 0, 0) == 0, "shared_info placed");
    struct vcpu_time_info *t = &shinfo.vcpu_info[0].time;
    check(t->mul != 0, "pvclock filled in");
    /* The TSC frequency the pvclock implies is 2^32 * 1e9 / (mul * 2^shift). */
    printk("BENCH pvclock_mul %u\n", t->mul);
    printk("BENCH pvclock_shift %d\n", (int)t->shift);

    struct { uint16_t domid; uint16_t pad; uint32_t index; uint64_t value; } p = { 0x7ff0, 0, 0, (2ULL << 56) | UPCALL_VECTOR };
    check(hypercall(HYPERVISOR_hvm_op, HVMOP_set_param, (long)&p, 0, 0, 0) == 0, "callback vector set");
    struct { uint32_t virq, vcpu, port; } bv = { 0, 0, 0 };
    check(evtchn(EVTCHNOP_bind_virq, &bv) == 0, "VIRQ_TIMER bound");
    timer_port = bv.port;
    struct { uint32_t vcpu, port; } bi = { 0, 0 };
    check(evtchn(EVTCHNOP_bind_ipi, &bi) == 0, "IPI bound");
    ipi_port = bi.port;
    check(evtchn(EVTCHNOP_unmask, &timer_port) == 0 && evtchn(EVTCHNOP_unmask, &ipi_port) == 0, "ports unmasked");

    /* IPI to ourselves with interrupts on: delivered on return from the send. */
    asm volatile("sti" ::: "memory");
    for (int i = 0; i < 100; i++) evtchn(EVTCHNOP_send, &ipi_port); /* warm up */
    int missed = 0;
    for (int i = 0; i < n_ipi; i++) {
        uint64_t before = ipi_events;
        uint64_t t0 = rdtsc();
        evtchn(EVTCHNOP_send, &ipi_port);
        while (ipi_events == before) {
            missed++;
            asm volatile("pause" ::: "memory");
        }
        samples[i] = (int64_t)(upcall_tsc - t0);
    }
    asm volatile("cli" ::: "memory");
    check(missed == 0, "every IPI arrived on return from the send (%d spins)", missed);
    bench_report("ipi_cycles", samples, n_ipi);

    timer_bench("timer_1ms_halt_ns", 1000000, 1, n_t1);
    timer_bench("timer_1ms_spin_ns", 1000000, 0, n_t1);
    timer_bench("timer_10ms_halt_ns", 10000000, 1, n_t10);
    timer_bench("timer_10ms_spin_ns", 10000000, 0, n_t10);
    return verdict();
}
