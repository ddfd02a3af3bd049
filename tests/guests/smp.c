/* smp: several vCPUs as a PVH kernel drives them (any number from 2).
 *
 *  1. bring-up: vCPU 1 by INIT + STARTUP into a real-mode trampoline
 *     (smp_tramp.S), vCPUs 2.. by VCPUOP_initialise + VCPUOP_up; each on
 *     its own stack, with the guest's GDT and IDT, its per-CPU data at GS
 *     base; each checks CPUID 0x40000004 EBX and its APIC ID (LAPIC and
 *     CPUID 1); vCPU 3 registers its own vcpu_info. The errnos of vcpu_op
 *     (EEXIST, EINVAL, ENOENT) and VCPUOP_is_up.
 *  2. IPIs both ways: event-channel IPIs 0 -> k and k -> 0, LAPIC fixed IPIs
 *     0 -> k and k -> 0, broadcasts (all but self, all including self), a
 *     logical destination. Then interrupts sent to a vCPU running with
 *     IF=0: a LAPIC IPI and an event upcall must be taken in the first
 *     "sti; nop; cli" window, an NMI at once.
 *  3. per-vCPU one-shot timers on VIRQ_TIMER, slept on with HLT or
 *     SCHEDOP_block; a timer waking a vCPU while all the others compute.
 *  4. an interdomain loopback port moved to vCPU 2 with EVTCHNOP_bind_vcpu.
 *  5. a LOCK'd counter that every vCPU increments.
 *  6. a ticket spinlock handed between vCPUs, guarding a plain counter; the
 *     TSC and the pvclock read under it never go backwards.
 *  7. VCPUOP_down / VCPUOP_up of a running vCPU (interrupts sent meanwhile
 *     wait for it), and of a vCPU by itself.
 *  8. INIT + STARTUP again of a vCPU that has run (CPU hotplug).
 *
 * With "bench=N" on the command line it measures instead, after steps 1
 * and 2: N round trips of an IPI from vCPU 0 to vCPU 1 and back, through
 * event channels and through the LAPIC (vCPU 0 waits in HLT), printed as
 * "BENCH key value" lines in TSC cycles.
 *
 * Only vCPU 0 calls check() (the runtime's counters are not atomic): the
 * others leave what they saw in their per-CPU data for it. */
#include "common/xen.h"

#define HYPERVISOR_memory_op 12
#define HYPERVISOR_vcpu_op 24
#define HYPERVISOR_hvm_op 34
#define XENMEM_add_to_physmap 7
#define HVMOP_set_param 0
#define SCHEDOP_block 1
#define DOMID_SELF 0x7ff0

#define VCPUOP_initialise 0
#define VCPUOP_up 1
#define VCPUOP_down 2
#define VCPUOP_is_up 3
#define VCPUOP_set_singleshot_timer 8
#define VCPUOP_register_vcpu_info 10

#define EVTCHNOP_bind_interdomain 0
#define EVTCHNOP_bind_virq 1
#define EVTCHNOP_send 4
#define EVTCHNOP_status 5
#define EVTCHNOP_alloc_unbound 6
#define EVTCHNOP_bind_ipi 7
#define EVTCHNOP_bind_vcpu 8
#define EVTCHNOP_unmask 9
#define VIRQ_TIMER 0

#define ENOENT 2
#define EEXIST 17
#define EINVAL 22

#define MAX_CPUS 64
#define TRACK_PORTS 512
#define STACK_SIZE 16384
#define TRAMP_BASE 0x8000

/* Vectors. */
#define TO0_VECTOR_BASE 0x40 /* LAPIC IPI k -> 0 on vector 0x40 + k */
#define KICK_VECTOR 0xe0     /* "look at your mailbox" */
#define IPI_VECTOR 0xe1      /* LAPIC IPI 0 -> k */
#define BCAST_VECTOR 0xe2    /* all excluding self */
#define ALL_VECTOR 0xe3      /* all including self */
#define LOGICAL_VECTOR 0xe4  /* logical destination, flat model */
#define WINDOW_VECTOR 0xe5   /* sent while the target has IF=0 */
#define NMI_VECTOR 2
#define UPCALL_VECTOR 0xf3   /* HVM_PARAM_CALLBACK_IRQ */

#define LAPIC 0xfee00000UL
#define LAPIC_ID 0x20
#define LAPIC_EOI 0xb0
#define LAPIC_LDR 0xd0
#define LAPIC_SVR 0xf0
#define LAPIC_IRR 0x200
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define MSR_GS_BASE 0xc0000101

struct frame {
    uint64_t r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax, vec, err, rip, cs, rflags, rsp, ss;
};

/* What each vCPU keeps; %gs:0 is its id. */
struct percpu {
    uint64_t id;
    struct vcpu_info *vi;
    /* bring-up */
    volatile uint32_t online, cpuid_id, cpuid_apic, lapic_id, gs_ok, time_ok;
    volatile uint64_t entry_rsp;
    volatile int64_t reg_vi_rc;
    /* the mailbox */
    void (*volatile fn)(int);
    volatile uint32_t cmd_seq, done_seq;
    /* interrupts seen, by vector and by port */
    volatile uint64_t hits[256];
    volatile uint32_t port_hits[TRACK_PORTS];
    volatile uint64_t upcalls, foreign, apic_mismatch, gs_mismatch;
    /* IPI senders' results */
    volatile int64_t send_rc;
    /* timers */
    volatile uint32_t timer_port, timer_fired;
    volatile int64_t bind_rc, bind_again_rc, other_timer_rc, set_rc;
    volatile uint64_t deadline, fired_at;
    /* counters */
    volatile uint64_t seen_first, seen_last;
    volatile int64_t down_rc;
    volatile uint32_t before_down, after_down;
    /* interrupt windows */
    volatile uint32_t win_ready, win_irr, win_lapic, win_pending, win_evt, win_nmi;
} __attribute__((aligned(64)));

static struct percpu pcpu[MAX_CPUS];
static uint8_t stacks[MAX_CPUS][STACK_SIZE] __attribute__((aligned(16)));
static struct shared_info shinfo __attribute__((aligned(4096)));
/* vcpu_info areas registered with VCPUOP_register_vcpu_info: 64 a page. */
static struct vcpu_info vinfo_page[MAX_CPUS] __attribute__((aligned(4096)));
static uint64_t idt[512] __attribute__((aligned(16)));
static uint64_t lapic_pd[512] __attribute__((aligned(4096)));
/* Which vCPU each port was bound to (the guest's own bookkeeping: a vCPU
 * handles only its own ports, as Linux's per-CPU event masks do). */
static volatile uint8_t port_cpu[4096];
static int ncpus;
static volatile uint64_t exceptions_seen;

extern char isr_stubs[], ap_entry64[], tramp_start[], tramp_end[], tramp_count[];
extern uint64_t boot_pml4[], boot_pdpt[];
volatile uint32_t ap_boot_id;
volatile uint64_t ap_boot_stack;

/* -- small things ---------------------------------------------------------- */

static inline uint64_t this_cpu(void)
{
    uint64_t id;
    asm volatile("mov %%gs:0, %0" : "=r"(id));
    return id;
}
static inline uint32_t lapic_read(uint32_t reg) { return *(volatile uint32_t *)(LAPIC + reg); }
static inline void lapic_write(uint32_t reg, uint32_t v) { *(volatile uint32_t *)(LAPIC + reg) = v; }
static void send_ipi(uint32_t apic_id, uint32_t icr_lo)
{
    lapic_write(LAPIC_ICR_HI, apic_id << 24);
    lapic_write(LAPIC_ICR_LO, icr_lo);
}
static inline void cpu_relax(void) { asm volatile("pause" ::: "memory"); }

static uint64_t now_on(int cpu) { return pvclock_ns(&pcpu[cpu].vi->time, rdtsc()); }
static uint64_t now(void) { return now_on((int)this_cpu()); }

static long vcpu_op(int cmd, int vcpu, void *arg) { return hypercall(HYPERVISOR_vcpu_op, cmd, vcpu, (long)arg, 0, 0); }
static void yield(void) { hypercall(HYPERVISOR_sched_op, SCHEDOP_yield, 0, 0, 0, 0); }

/* Wait up to `ms` milliseconds of system time for `cond`, giving the
 * engine to the other vCPUs meanwhile. Its value: whether cond held. */
#define WAIT_UNTIL(cond, ms)                                              \
    ({                                                                    \
        uint64_t _end = now() + (uint64_t)(ms) * 1000000ULL;              \
        int _ok;                                                          \
        while (!(_ok = !!(cond)) && now() < _end) yield();                \
        _ok;                                                              \
    })
static void settle(int ms) { uint64_t end = now() + (uint64_t)ms * 1000000ULL; while (now() < end) yield(); }

static long set_timer(uint64_t deadline)
{
    struct { uint64_t timeout; uint32_t flags; } t = { deadline, 1 };
    return vcpu_op(VCPUOP_set_singleshot_timer, (int)this_cpu(), &t);
}

static uint32_t bind_ipi(int vcpu)
{
    struct { uint32_t vcpu, port; } b = { (uint32_t)vcpu, 0 };
    long r = evtchn(EVTCHNOP_bind_ipi, &b);
    return r == 0 ? b.port : 0;
}

static long unmask(uint32_t port) { return evtchn(EVTCHNOP_unmask, &port); }
static long send(uint32_t port) { return evtchn(EVTCHNOP_send, &port); }

/* -- interrupts ------------------------------------------------------------ */

static uint32_t evt_from0[MAX_CPUS], evt_to0[MAX_CPUS];
static volatile int bench_pong; /* vCPU 1 answers IPIs from vCPU 0 */

static void handle_port(int cpu, uint32_t port)
{
    struct percpu *p = &pcpu[cpu];
    if (bench_pong && cpu == 1 && port == evt_from0[1]) send(evt_to0[1]);
    if (port < TRACK_PORTS) p->port_hits[port]++;
    if (port == p->timer_port && p->timer_port) {
        p->fired_at = now_on(cpu);
        p->timer_fired++;
    }
}

/* The upcall: this vCPU's selector words, its own pending unmasked ports. */
static void upcall(int cpu)
{
    struct percpu *p = &pcpu[cpu];
    struct vcpu_info *vi = p->vi;
    p->upcalls++;
    while (__atomic_load_n(&vi->upcall_pending, __ATOMIC_SEQ_CST)) {
        __atomic_store_n(&vi->upcall_pending, 0, __ATOMIC_SEQ_CST);
        uint64_t sel = __atomic_exchange_n(&vi->pending_sel, 0, __ATOMIC_SEQ_CST);
        while (sel) {
            int w = __builtin_ctzll(sel);
            sel &= sel - 1;
            uint64_t bits = __atomic_load_n(&shinfo.pending[w], __ATOMIC_SEQ_CST) & ~shinfo.mask[w];
            while (bits) {
                int b = __builtin_ctzll(bits);
                bits &= bits - 1;
                uint32_t port = (uint32_t)(w * 64 + b);
                if (port_cpu[port] != cpu) {
                    p->foreign++;
                    continue;
                }
                __atomic_and_fetch(&shinfo.pending[w], ~(1ULL << b), __ATOMIC_SEQ_CST);
                handle_port(cpu, port);
            }
        }
    }
}

void isr_dispatch(struct frame *f)
{
    int cpu = (int)this_cpu();
    struct percpu *p = &pcpu[cpu];
    if (f->vec == NMI_VECTOR) {
        p->hits[NMI_VECTOR]++;
        return;
    }
    if (f->vec < 32) {
        __atomic_add_fetch(&exceptions_seen, 1, __ATOMIC_SEQ_CST);
        printk("FAIL - vCPU %d: exception %lu (error %lx) at rip %lx, cr2 %lx\n", cpu, f->vec, f->err, f->rip,
               read_cr2());
        if (cpu == 0) {
            check(0, "vCPU 0 took no exception");
            guest_exit(verdict());
        }
        for (;;) asm volatile("cli; hlt");
    }
    p->hits[f->vec]++;
    if (bench_pong && cpu == 1 && f->vec == IPI_VECTOR) send_ipi(0, TO0_VECTOR_BASE + 1);
    if ((lapic_read(LAPIC_ID) >> 24) != 2u * cpu) p->apic_mismatch++;
    if (f->vec == UPCALL_VECTOR) upcall(cpu);
    lapic_write(LAPIC_EOI, 0);
}

static void load_idt(void)
{
    struct { uint16_t l; uint64_t b; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
    asm volatile("lidt %0" :: "m"(idtr));
}

/* -- the application processors ------------------------------------------- */

static void ap_loop(int id)
{
    struct percpu *p = &pcpu[id];
    for (;;) {
        asm volatile("cli");
        while (p->cmd_seq == p->done_seq) asm volatile("sti; hlt; cli" ::: "memory");
        uint32_t seq = p->cmd_seq;
        void (*fn)(int) = p->fn;
        asm volatile("sti");
        fn(id);
        if (this_cpu() != (uint64_t)id) p->gs_mismatch++;
        __atomic_store_n(&p->done_seq, seq, __ATOMIC_SEQ_CST);
    }
}

void ap_main(int id)
{
    struct percpu *p = &pcpu[id];
    uint64_t rsp;
    asm volatile("mov %%rsp, %0" : "=r"(rsp));
    p->entry_rsp = rsp;
    load_idt();
    wrmsr(MSR_GS_BASE, (uint64_t)(uintptr_t)p);
    p->gs_ok = rdmsr(MSR_GS_BASE) == (uint64_t)(uintptr_t)p && this_cpu() == (uint64_t)id;
    uint32_t a, b, c, d;
    cpuid(0x40000004, &a, &b, &c, &d);
    p->cpuid_id = (a & (1 << 3)) ? b : 0xffffffff;
    cpuid(1, &a, &b, &c, &d);
    p->cpuid_apic = b >> 24;
    p->lapic_id = lapic_read(LAPIC_ID) >> 24;
    lapic_write(LAPIC_SVR, 0x1ff);
    lapic_write(LAPIC_LDR, id < 8 ? (1u << id) << 24 : 0); /* flat model, one bit each */
    /* vCPU 3 (and any past shared_info's 32 slots) registers a vcpu_info of its own. */
    p->reg_vi_rc = -1000;
    if (id == 3 || id >= 32) {
        struct { uint64_t mfn; uint32_t offset, rsvd; } r = {
            (uint64_t)(uintptr_t)&vinfo_page[id] >> 12, (uint32_t)((uintptr_t)&vinfo_page[id] & 0xfff), 0 };
        p->reg_vi_rc = vcpu_op(VCPUOP_register_vcpu_info, id, &r);
        if (p->reg_vi_rc == 0) p->vi = &vinfo_page[id];
    }
    p->time_ok = p->vi && p->vi->time.mul != 0 && !(p->vi->time.version & 1);
    __atomic_store_n(&p->online, 1, __ATOMIC_SEQ_CST);
    ap_loop(id);
}

/* Run fn(k) on vCPU k: post it in k's mailbox and kick k with an IPI. */
static void run_on(int k, void (*fn)(int))
{
    struct percpu *p = &pcpu[k];
    p->fn = fn;
    __atomic_add_fetch(&p->cmd_seq, 1, __ATOMIC_SEQ_CST);
    send_ipi(2 * k, KICK_VECTOR);
}
static int done(int k) { return pcpu[k].done_seq == pcpu[k].cmd_seq; }
static int all_done(void)
{
    for (int k = 1; k < ncpus; k++)
        if (!done(k)) return 0;
    return 1;
}
/* fn on every vCPU, vCPU 0 included; back when all have finished. */
static int run_everywhere(void (*fn)(int), int timeout_ms)
{
    for (int k = 1; k < ncpus; k++) run_on(k, fn);
    fn(0);
    return WAIT_UNTIL(all_done(), timeout_ms);
}

/* Every vCPU waits here until all have arrived (a fresh counter per use). */
static void start_together(volatile uint32_t *arrived)
{
    __atomic_add_fetch(arrived, 1, __ATOMIC_SEQ_CST);
    while (*arrived < (uint32_t)ncpus) yield();
}

/* -- 1. bring-up ----------------------------------------------------------- */

/* struct vcpu_hvm_context (hvm/hvm_vcpu.h), the 64-bit member of its union. */
struct vcpu_hvm_context {
    uint32_t mode, pad;
    union {
        struct { uint64_t rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, rip, rflags, cr0, cr3, cr4, efer; } x86_64;
        uint8_t raw[120];
    };
};

static void bring_up(void)
{
    long r;
    printk("bring-up: %d vCPUs\n", ncpus);
    check(vcpu_op(VCPUOP_is_up, 0, 0) == 1, "VCPUOP_is_up(0) = 1");
    int down = 1;
    for (int k = 1; k < ncpus; k++) down &= vcpu_op(VCPUOP_is_up, k, 0) == 0;
    check(down, "vCPUs 1..%d down at boot (is_up 0)", ncpus - 1);
    r = vcpu_op(VCPUOP_is_up, ncpus, 0);
    check(r == -ENOENT, "VCPUOP_is_up(%d), past the last vCPU: -ENOENT (%ld)", ncpus, r);
    r = vcpu_op(VCPUOP_up, 1, 0);
    check(r == -EINVAL, "VCPUOP_up on a never-initialised vCPU 1: -EINVAL (%ld)", r);
    r = vcpu_op(VCPUOP_is_up, 1, 0);
    check(r == 0, "... and it stays down (%ld)", r);

    /* vCPU 1: INIT, INIT de-assert, STARTUP twice (as Linux does). */
    uint64_t len = (uint64_t)(tramp_end - tramp_start);
    memcpy((void *)TRAMP_BASE, tramp_start, len);
    volatile uint16_t *count = (volatile uint16_t *)(TRAMP_BASE + (tramp_count - tramp_start));
    ap_boot_id = 1;
    ap_boot_stack = (uint64_t)(uintptr_t)(stacks[1] + STACK_SIZE);
    send_ipi(2, 0xc500);                 /* INIT, level assert */
    send_ipi(2, 0x8500);                 /* INIT, level de-assert */
    send_ipi(2, 0x0600 | (TRAMP_BASE >> 12));
    int up = WAIT_UNTIL(pcpu[1].online, 2000);
    send_ipi(2, 0x0600 | (TRAMP_BASE >> 12)); /* ignored: vCPU 1 is running */
    settle(5);
    check(up, "vCPU 1 up through INIT + STARTUP and the real-mode trampoline");
    check(*count == 1, "trampoline entered once for two STARTUPs (%u)", *count);
    r = vcpu_op(VCPUOP_is_up, 1, 0);
    check(r == 1, "VCPUOP_is_up(1) = 1 after STARTUP (%ld)", r);

    /* vCPUs 2..: VCPUOP_initialise + VCPUOP_up. */
    if (ncpus > 2) {
        int last = ncpus - 1;
        r = vcpu_op(VCPUOP_up, last, 0);
        check(r == -EINVAL, "VCPUOP_up on never-initialised vCPU %d: -EINVAL (%ld)", last, r);
        int init_ok = 1, still_down = 1;
        for (int k = 2; k < ncpus; k++) {
            struct vcpu_hvm_context ctx;
            memset(&ctx, 0, sizeof(ctx));
            ctx.mode = 1; /* VCPU_HVM_MODE_64B */
            ctx.x86_64.rip = (uint64_t)(uintptr_t)ap_entry64;
            ctx.x86_64.rsp = (uint64_t)(uintptr_t)(stacks[k] + STACK_SIZE);
            ctx.x86_64.rdi = (uint64_t)k;
            ctx.x86_64.rflags = 0x2;
            ctx.x86_64.cr0 = 0x80010033; /* PG | WP | NE | ET | MP | PE */
            ctx.x86_64.cr3 = (uint64_t)(uintptr_t)boot_pml4;
            ctx.x86_64.cr4 = 0x20;       /* PAE */
            ctx.x86_64.efer = 0x500;     /* LME | LMA */
            r = vcpu_op(VCPUOP_initialise, k, &ctx);
            if (r != 0) { printk("VCPUOP_initialise(%d) = %ld\n", k, r); init_ok = 0; }
            if (vcpu_op(VCPUOP_is_up, k, 0) != 0) still_down = 0;
        }
        check(init_ok, "VCPUOP_initialise of vCPUs 2..%d (64-bit context)", last);
        check(still_down, "initialised but not yet up: is_up 0");
        r = vcpu_op(VCPUOP_initialise, 2, &(struct vcpu_hvm_context){ .mode = 1 });
        check(r == -EEXIST, "VCPUOP_initialise of an initialised vCPU 2: -EEXIST (%ld)", r);
        int up_ok = 1;
        for (int k = 2; k < ncpus; k++) up_ok &= vcpu_op(VCPUOP_up, k, 0) == 0;
        check(up_ok, "VCPUOP_up of vCPUs 2..%d", last);
        int all = 1;
        for (int k = 2; k < ncpus; k++) all &= WAIT_UNTIL(pcpu[k].online, 2000);
        check(all, "vCPUs 2..%d reported in", last);
    } else {
        printk("(only 2 vCPUs: VCPUOP_initialise bring-up and its checks need 3)\n");
    }
    r = vcpu_op(VCPUOP_initialise, 1, &(struct vcpu_hvm_context){ .mode = 1 });
    check(r == -EEXIST, "VCPUOP_initialise of vCPU 1, started by STARTUP: -EEXIST (%ld)", r);
    r = vcpu_op(VCPUOP_initialise, 0, &(struct vcpu_hvm_context){ .mode = 1 });
    check(r == -EEXIST, "VCPUOP_initialise of vCPU 0: -EEXIST (%ld)", r);
    r = vcpu_op(VCPUOP_up, 1, 0);
    check(r == 0, "VCPUOP_up of a running vCPU: 0 (%ld)", r);
    int isup = 1;
    for (int k = 0; k < ncpus; k++) isup &= vcpu_op(VCPUOP_is_up, k, 0) == 1;
    check(isup, "every vCPU is_up 1");

    for (int k = 1; k < ncpus; k++) {
        struct percpu *p = &pcpu[k];
        uint64_t lo = (uint64_t)(uintptr_t)stacks[k], hi = lo + STACK_SIZE;
        check(p->online && p->cpuid_id == (uint32_t)k && p->lapic_id == 2u * k && p->cpuid_apic == 2u * k,
              "vCPU %d: CPUID 0x40000004 EBX %u, LAPIC ID %u, CPUID 1 APIC ID %u", k, p->cpuid_id, p->lapic_id,
              p->cpuid_apic);
        check(p->entry_rsp > lo && p->entry_rsp <= hi && p->gs_ok && p->time_ok,
              "vCPU %d: on its own stack (%lx), GS base set, pvclock filled in", k, p->entry_rsp);
        if (k == 3 || k >= 32)
            check(p->reg_vi_rc == 0, "vCPU %d: VCPUOP_register_vcpu_info of its own (%ld)", k, p->reg_vi_rc);
    }
}

/* -- 2. IPIs --------------------------------------------------------------- */

static void send_evt_to0(int id) { pcpu[id].send_rc = send(evt_to0[id]); }
static void send_lapic_to0(int id) { send_ipi(0, TO0_VECTOR_BASE + id); }

static int port_total(uint32_t port)
{
    int n = 0;
    for (int c = 0; c < ncpus; c++) n += pcpu[c].port_hits[port];
    return n;
}

static void ipis(void)
{
    /* Event channel IPIs 0 -> k (ports bound for k by vCPU 0). */
    int bound = 1;
    for (int k = 1; k < ncpus; k++) {
        uint32_t port = bind_ipi(k);
        bound &= port != 0 && port < TRACK_PORTS;
        port_cpu[port] = (uint8_t)k;
        evt_from0[k] = port;
        bound &= unmask(port) == 0;
        port = bind_ipi(0);
        bound &= port != 0 && port < TRACK_PORTS;
        port_cpu[port] = 0;
        evt_to0[k] = port;
        bound &= unmask(port) == 0;
    }
    check(bound, "IPI ports bound both ways for every vCPU and unmasked");
    int sent = 1;
    for (int k = 1; k < ncpus; k++) sent &= send(evt_from0[k]) == 0;
    int got = WAIT_UNTIL(({ int a = 1; for (int k = 1; k < ncpus; k++) a &= pcpu[k].port_hits[evt_from0[k]] >= 1; a; }), 2000);
    settle(5);
    int exact = got && sent;
    for (int k = 1; k < ncpus; k++) {
        if (pcpu[k].port_hits[evt_from0[k]] != 1 || port_total(evt_from0[k]) != 1) {
            printk("  vCPU %d: port %u seen %u times by it, %d in all\n", k, evt_from0[k],
                   pcpu[k].port_hits[evt_from0[k]], port_total(evt_from0[k]));
            exact = 0;
        }
    }
    check(exact, "event-channel IPI 0 -> k: each vCPU took its own once");

    /* k -> 0, all at once. */
    int ran = run_everywhere(send_evt_to0, 2000) ;
    got = WAIT_UNTIL(({ int a = 1; for (int k = 1; k < ncpus; k++) a &= pcpu[0].port_hits[evt_to0[k]] >= 1; a; }), 2000);
    settle(5);
    exact = ran && got;
    for (int k = 1; k < ncpus; k++) {
        if (pcpu[k].send_rc != 0 || pcpu[0].port_hits[evt_to0[k]] != 1 || port_total(evt_to0[k]) != 1) {
            printk("  from vCPU %d: send %ld, port %u seen %u times on vCPU 0\n", k, pcpu[k].send_rc, evt_to0[k],
                   pcpu[0].port_hits[evt_to0[k]]);
            exact = 0;
        }
    }
    check(exact, "event-channel IPI k -> 0: vCPU 0 took each vCPU's once");

    /* LAPIC fixed IPIs, physical destination, 0 -> k. */
    for (int k = 1; k < ncpus; k++) send_ipi(2 * k, IPI_VECTOR);
    got = WAIT_UNTIL(({ int a = 1; for (int k = 1; k < ncpus; k++) a &= pcpu[k].hits[IPI_VECTOR] >= 1; a; }), 2000);
    settle(5);
    exact = got && pcpu[0].hits[IPI_VECTOR] == 0;
    for (int k = 1; k < ncpus; k++) exact &= pcpu[k].hits[IPI_VECTOR] == 1;
    check(exact, "LAPIC fixed IPI 0 -> k (physical destination 2k): each vCPU once, none on vCPU 0");

    /* k -> 0, vector 0x40 + k, all at once. */
    ran = run_everywhere(send_lapic_to0, 2000);
    got = WAIT_UNTIL(({ int a = 1; for (int k = 1; k < ncpus; k++) a &= pcpu[0].hits[TO0_VECTOR_BASE + k] >= 1; a; }), 2000);
    settle(5);
    exact = ran && got;
    for (int k = 1; k < ncpus; k++) {
        exact &= pcpu[0].hits[TO0_VECTOR_BASE + k] == 1;
        for (int c = 1; c < ncpus; c++) exact &= pcpu[c].hits[TO0_VECTOR_BASE + k] == 0;
    }
    check(exact, "LAPIC fixed IPI k -> 0 (vector 0x40 + k): vCPU 0 took each once");

    /* Broadcast, all excluding self. */
    lapic_write(LAPIC_ICR_HI, 0);
    lapic_write(LAPIC_ICR_LO, (3 << 18) | BCAST_VECTOR);
    got = WAIT_UNTIL(({ int a = 1; for (int k = 1; k < ncpus; k++) a &= pcpu[k].hits[BCAST_VECTOR] >= 1; a; }), 2000);
    settle(10);
    exact = got && pcpu[0].hits[BCAST_VECTOR] == 0;
    for (int k = 1; k < ncpus; k++) exact &= pcpu[k].hits[BCAST_VECTOR] == 1;
    check(exact, "LAPIC broadcast to all but self: every other vCPU once, not vCPU 0");

    /* All including self. */
    lapic_write(LAPIC_ICR_LO, (2 << 18) | ALL_VECTOR);
    got = WAIT_UNTIL(({ int a = 1; for (int k = 0; k < ncpus; k++) a &= pcpu[k].hits[ALL_VECTOR] >= 1; a; }), 2000);
    settle(10);
    exact = got;
    for (int k = 0; k < ncpus; k++) exact &= pcpu[k].hits[ALL_VECTOR] == 1;
    check(exact, "LAPIC broadcast to all including self: every vCPU once");

    /* Logical destination, flat model (LDR bit k for vCPU k < 8): the odd ones. */
    int nl = ncpus < 8 ? ncpus : 8;
    uint32_t mda = 0xaa & ((1u << nl) - 1);
    lapic_write(LAPIC_ICR_HI, mda << 24);
    lapic_write(LAPIC_ICR_LO, (1 << 11) | LOGICAL_VECTOR);
    got = WAIT_UNTIL(({ int a = 1; for (int k = 1; k < nl; k += 2) a &= pcpu[k].hits[LOGICAL_VECTOR] >= 1; a; }), 2000);
    settle(10);
    exact = got;
    for (int k = 0; k < ncpus; k++) exact &= pcpu[k].hits[LOGICAL_VECTOR] == (k < nl && (k & 1) ? 1u : 0u);
    check(exact, "LAPIC fixed IPI, logical destination %x: the odd vCPUs below 8 once, no other", mda);
}

/* -- 2b. interrupts that arrive while the target has IF=0 -------------------- */

static int irr_has(uint8_t v) { return (lapic_read(LAPIC_IRR + (v / 32) * 0x10) >> (v % 32)) & 1; }

/* On x86 a maskable interrupt pending while IF=0 is taken at the first
 * instruction boundary after STI's one-instruction shadow: in
 * "sti; nop; cli" it is taken after the NOP, before the CLI. An NMI is
 * taken whatever IF says. */
static void window_task(int id)
{
    struct percpu *p = &pcpu[id];
    uint64_t end;

    /* (Waiting with SCHEDOP_yield, not PAUSE: vCPU 0 visits the vCPUs in
     * turn, and would need a whole round of slices per vCPU otherwise.) */
    asm volatile("cli");
    p->win_ready = 1; /* vCPU 0 sends a LAPIC fixed IPI now */
    end = now() + 2000000000ULL;
    while (!irr_has(WINDOW_VECTOR) && now() < end) yield();
    p->win_irr = irr_has(WINDOW_VECTOR);
    uint64_t before = p->hits[WINDOW_VECTOR];
    asm volatile("sti; nop; cli" ::: "memory");
    p->win_lapic = (uint32_t)(p->hits[WINDOW_VECTOR] - before);
    asm volatile("sti");

    asm volatile("cli");
    p->win_ready = 2; /* vCPU 0 sends an event-channel IPI now */
    end = now() + 2000000000ULL;
    while (!p->vi->upcall_pending && now() < end) yield();
    p->win_pending = p->vi->upcall_pending;
    before = p->upcalls;
    asm volatile("sti; nop; cli" ::: "memory");
    p->win_evt = (uint32_t)(p->upcalls - before);
    asm volatile("sti");

    asm volatile("cli");
    before = p->hits[NMI_VECTOR];
    p->win_ready = 3; /* vCPU 0 sends an NMI now */
    end = now() + 2000000000ULL;
    while (p->hits[NMI_VECTOR] == before && now() < end) yield();
    p->win_nmi = (uint32_t)(p->hits[NMI_VECTOR] - before);
    asm volatile("sti");
    /* Whatever the window missed arrives now. */
    end = now() + 20000000ULL;
    while (now() < end) yield();
}

static void windows(void)
{
    for (int k = 1; k < ncpus; k++) run_on(k, window_task);
    int ok = 1;
    for (int k = 1; k < ncpus; k++) {
        ok &= WAIT_UNTIL(pcpu[k].win_ready == 1, 2000);
        send_ipi(2 * k, WINDOW_VECTOR);
    }
    for (int k = 1; k < ncpus; k++) {
        ok &= WAIT_UNTIL(pcpu[k].win_ready == 2, 3000);
        send(evt_from0[k]);
    }
    for (int k = 1; k < ncpus; k++) {
        ok &= WAIT_UNTIL(pcpu[k].win_ready == 3, 3000);
        send_ipi(2 * k, 0x400); /* NMI, physical destination */
    }
    ok &= WAIT_UNTIL(all_done(), 5000);
    check(ok, "vCPUs with IF=0 went through the three windows");
    for (int k = 1; k < ncpus; k++) {
        struct percpu *p = &pcpu[k];
        check(p->win_nmi == 1, "vCPU %d: an NMI IPI taken with IF=0 (%u)", k, p->win_nmi);
        check(p->win_irr && p->win_lapic == 1,
              "vCPU %d: a LAPIC IPI pending with IF=0 (IRR %u) taken in sti; nop; cli (%u)", k, p->win_irr,
              p->win_lapic);
        check(p->win_pending && p->win_evt == 1,
              "vCPU %d: an event upcall pending with IF=0 (%u) taken in sti; nop; cli (%u)", k, p->win_pending,
              p->win_evt);
        check(p->hits[WINDOW_VECTOR] == 1 && p->port_hits[evt_from0[k]] == 2,
              "vCPU %d: each taken once in the end (%lu, %u)", k, p->hits[WINDOW_VECTOR], p->port_hits[evt_from0[k]]);
    }
}

/* -- 3. per-vCPU timers ----------------------------------------------------- */

static void timer_task(int id)
{
    struct percpu *p = &pcpu[id];
    struct { uint32_t virq, vcpu, port; } bv = { VIRQ_TIMER, (uint32_t)id, 0 };
    p->bind_rc = evtchn(EVTCHNOP_bind_virq, &bv);
    if (p->bind_rc != 0 || bv.port >= TRACK_PORTS) return;
    port_cpu[bv.port] = (uint8_t)id;
    p->timer_port = bv.port;
    p->bind_again_rc = evtchn(EVTCHNOP_bind_virq, &bv);
    unmask(p->timer_port);
    /* Another vCPU's timer is not ours to set. */
    struct { uint64_t timeout; uint32_t flags; } t = { now() + 1000000000ULL, 0 };
    p->other_timer_rc = vcpu_op(VCPUOP_set_singleshot_timer, (id + 1) % ncpus, &t);

    p->deadline = now() + (5 + 2 * (id % 8)) * 1000000ULL;
    p->set_rc = set_timer(p->deadline);
    asm volatile("cli");
    while (!p->timer_fired) {
        if (id & 1) {
            /* SCHEDOP_block with IF=0 returns once an upcall is pending;
             * STI then takes it (after the one-instruction shadow). */
            long ret;
            asm volatile("vmcall" : "=a"(ret) : "a"(HYPERVISOR_sched_op), "D"((long)SCHEDOP_block), "S"(0L)
                         : "memory");
            asm volatile("sti; nop; nop; cli" ::: "memory");
        } else {
            asm volatile("sti; hlt; cli" ::: "memory");
        }
    }
    asm volatile("sti");
}

static void timers(void)
{
    int ran = run_everywhere(timer_task, 3000);
    check(ran, "every vCPU came back from its timer sleep");
    for (int k = 0; k < ncpus; k++) {
        struct percpu *p = &pcpu[k];
        int others = p->timer_port ? port_total(p->timer_port) - (int)p->port_hits[p->timer_port] : -1;
        check(p->bind_rc == 0 && p->bind_again_rc == -EEXIST && p->set_rc == 0 && p->other_timer_rc == -EINVAL,
              "vCPU %d: VIRQ_TIMER bound (port %u; twice: %ld), timer set, another's timer: %ld", k, p->timer_port,
              p->bind_again_rc, p->other_timer_rc);
        uint64_t late = p->fired_at - p->deadline;
        check(p->timer_fired == 1 && others == 0 && p->fired_at >= p->deadline && late < 100000000,
              "vCPU %d: its timer woke it (%s) on itself only, %lu us after its deadline", k,
              k & 1 ? "SCHEDOP_block" : "HLT", p->fired_at >= p->deadline ? late / 1000 : 0);
    }
}

/* A vCPU's timer wakes it while every other vCPU computes (no hypercall,
 * no HLT): the scheduler has to take the engine from them for it. */
static volatile int busy_stop;
static void busy_task(int id)
{
    (void)id;
    while (!busy_stop) cpu_relax();
}
static void sleeper_task(int id)
{
    struct percpu *p = &pcpu[id];
    p->timer_fired = 0;
    p->deadline = now() + 10000000ULL;
    p->set_rc = set_timer(p->deadline);
    asm volatile("cli");
    while (!p->timer_fired) asm volatile("sti; hlt; cli" ::: "memory");
    asm volatile("sti");
}

static void timer_among_busy(void)
{
    struct percpu *p = &pcpu[1];
    busy_stop = 0;
    for (int k = 2; k < ncpus; k++) run_on(k, busy_task);
    run_on(1, sleeper_task);
    uint64_t end = now() + 2000000000ULL;
    while (!done(1) && now() < end) cpu_relax(); /* vCPU 0 computes too */
    int woke = done(1);
    busy_stop = 1;
    WAIT_UNTIL(all_done(), 2000);
    uint64_t late = p->fired_at - p->deadline;
    /* (A round of 1 ms slices is enough; the bound leaves room for a busy host.) */
    uint64_t bound = 100000000ULL;
    check(woke && p->set_rc == 0 && p->timer_fired == 1 && p->fired_at >= p->deadline && late < bound,
          "vCPU 1's timer woke it from HLT while the %d others computed, %lu us late", ncpus - 1,
          p->fired_at >= p->deadline ? late / 1000 : 0);
}

/* -- 4. an event moved to vCPU 2 -------------------------------------------- */

static void bound_to_2(void)
{
    if (ncpus < 3) {
        printk("(only %d vCPUs: EVTCHNOP_bind_vcpu to vCPU 2 needs 3)\n", ncpus);
        return;
    }
    struct { uint16_t dom, remote; uint32_t port; } au = { DOMID_SELF, DOMID_SELF, 0 };
    long r = evtchn(EVTCHNOP_alloc_unbound, &au);
    struct { uint16_t remote_dom, pad; uint32_t remote_port, local_port; } bi = { DOMID_SELF, 0, au.port, 0 };
    long r2 = r == 0 ? evtchn(EVTCHNOP_bind_interdomain, &bi) : -1;
    uint32_t a = au.port, b = bi.local_port;
    check(r == 0 && r2 == 0 && a && b && a != b && a < TRACK_PORTS && b < TRACK_PORTS,
          "loopback pair: alloc_unbound %u, bind_interdomain %u", a, b);
    if (r || r2) return;
    port_cpu[a] = 2;
    port_cpu[b] = 0;
    struct { uint32_t port, vcpu; } bvc = { a, 2 };
    r = evtchn(EVTCHNOP_bind_vcpu, &bvc);
    check(r == 0, "EVTCHNOP_bind_vcpu(port %u, vCPU 2) (%ld)", a, r);
    struct { uint16_t dom, pad; uint32_t port, status, vcpu, u[2]; } st = { DOMID_SELF, 0, a, 99, 99, { 0, 0 } };
    r = evtchn(EVTCHNOP_status, &st);
    check(r == 0 && st.status == 2 && st.vcpu == 2, "EVTCHNOP_status: interdomain (%u) on vCPU %u", st.status, st.vcpu);
    bvc.port = evt_from0[1]; bvc.vcpu = 2;
    check(evtchn(EVTCHNOP_bind_vcpu, &bvc) == -EINVAL, "bind_vcpu of an IPI port: -EINVAL");
    bvc.port = pcpu[0].timer_port; bvc.vcpu = 2;
    check(evtchn(EVTCHNOP_bind_vcpu, &bvc) == -EINVAL, "bind_vcpu of a VIRQ_TIMER port: -EINVAL");
    unmask(a);
    unmask(b);

    uint64_t before[MAX_CPUS];
    settle(5);
    for (int k = 0; k < ncpus; k++) before[k] = pcpu[k].upcalls;
    r = send(b); /* raises a, on vCPU 2 */
    int got = WAIT_UNTIL(pcpu[2].port_hits[a] >= 1, 2000);
    settle(10);
    int others = 0;
    for (int k = 0; k < ncpus; k++)
        if (k != 2 && pcpu[k].upcalls != before[k]) {
            printk("  vCPU %d took %lu upcalls\n", k, pcpu[k].upcalls - before[k]);
            others++;
        }
    check(r == 0 && got && pcpu[2].port_hits[a] == 1 && pcpu[2].upcalls == before[2] + 1 && others == 0,
          "send from vCPU 0 on the peer: one upcall on vCPU 2 (port %u x%u), none on the %d others", a,
          pcpu[2].port_hits[a], ncpus - 1);
}

/* -- 5. a LOCK'd counter ---------------------------------------------------- */

#define LOCKED_TOTAL 4000000ULL
static volatile uint64_t locked_counter;
static volatile uint32_t locked_arrived, spin_arrived;

static void locked_task(int id)
{
    struct percpu *p = &pcpu[id];
    uint64_t n = LOCKED_TOTAL / ncpus + (id == 0 ? LOCKED_TOTAL % ncpus : 0);
    start_together(&locked_arrived);
    p->seen_first = locked_counter;
    for (uint64_t i = 0; i < n; i++) {
        asm volatile("lock incq %0" : "+m"(locked_counter));
        if ((i & 0xffff) == 0 && this_cpu() != (uint64_t)id) p->gs_mismatch++;
    }
    p->seen_last = locked_counter;
}

static void locked(void)
{
    uint64_t t0 = now();
    int ran = run_everywhere(locked_task, 20000);
    uint64_t t1 = now();
    /* Another vCPU incremented while this one was at it. */
    int overlapped = 0;
    for (int k = 0; k < ncpus; k++) {
        uint64_t own = LOCKED_TOTAL / ncpus + (k == 0 ? LOCKED_TOTAL % ncpus : 0);
        if (pcpu[k].seen_last - pcpu[k].seen_first > own) overlapped++;
    }
    check(ran && locked_counter == LOCKED_TOTAL, "lock incq from %d vCPUs: %lu of %lu (%lu ms)", ncpus,
          locked_counter, LOCKED_TOTAL, (t1 - t0) / 1000000);
    check(overlapped >= 1, "the vCPUs' increments interleaved (%d saw others' increments)", overlapped);
}

/* -- 6. a ticket spinlock ---------------------------------------------------- */

/* Acquisitions per vCPU: 8000 in all, at least 250 each. */
#define SPIN_ROUNDS (ncpus <= 32 ? 8000 / ncpus : 250)
static struct { volatile uint32_t next, owner; } ticket;
static volatile uint64_t plain_counter, handovers, waits_spun;
static volatile int last_holder = -1;
/* The clocks, read under the lock: time must not go backwards from one
 * vCPU to the next (Linux's check_tsc_warp, for the TSC and the pvclock). */
static volatile uint64_t last_tsc, last_ns, tsc_warps, ns_warps, max_ns_warp;

static void spin_lock(void)
{
    uint32_t me = __atomic_fetch_add(&ticket.next, 1, __ATOMIC_SEQ_CST);
    uint64_t spins = 0;
    while (__atomic_load_n(&ticket.owner, __ATOMIC_ACQUIRE) != me) {
        cpu_relax();
        /* A paravirtual lock would wait for a kick; give the holder (or the
         * next in line) the engine now and then. */
        if (++spins % 256 == 0) yield();
    }
    if (spins) __atomic_add_fetch(&waits_spun, 1, __ATOMIC_RELAXED);
}
static void spin_unlock(void) { __atomic_store_n(&ticket.owner, ticket.owner + 1, __ATOMIC_RELEASE); }

static void spin_task(int id)
{
    start_together(&spin_arrived);
    for (int i = 0; i < SPIN_ROUNDS; i++) {
        spin_lock();
        if (last_holder != id) {
            handovers++;
            last_holder = id;
        }
        uint64_t tsc = rdtsc(), ns = pvclock_ns(&pcpu[id].vi->time, tsc);
        if (tsc < last_tsc) tsc_warps++;
        if (ns < last_ns) {
            ns_warps++;
            if (last_ns - ns > max_ns_warp) max_ns_warp = last_ns - ns;
        }
        last_tsc = tsc;
        last_ns = ns;
        /* A plain read-modify-write, slow enough to be preempted in. */
        uint64_t v = plain_counter;
        for (volatile int j = 0; j < 200; j++) {}
        plain_counter = v + 1;
        spin_unlock();
        for (volatile int j = 0; j < 100; j++) {}
    }
    if (this_cpu() != (uint64_t)id) pcpu[id].gs_mismatch++;
}

static void spinlock(void)
{
    uint64_t t0 = now();
    int ran = run_everywhere(spin_task, 30000);
    uint64_t t1 = now();
    uint64_t want = (uint64_t)SPIN_ROUNDS * ncpus;
    check(ran && plain_counter == want && ticket.next == want && ticket.owner == want,
          "ticket spinlock: plain counter %lu of %lu, tickets %u/%u (%lu ms)", plain_counter, want, ticket.owner,
          ticket.next, (t1 - t0) / 1000000);
    check(handovers >= (uint64_t)ncpus && waits_spun > 0, "the lock changed hands %lu times, %lu waits", handovers,
          waits_spun);
    check(tsc_warps == 0, "TSC read under the lock never went backwards between vCPUs (%lu warps)", tsc_warps);
    check(ns_warps == 0, "each vCPU's pvclock under the lock never went backwards between vCPUs (%lu warps, up to %lu ns)",
          ns_warps, max_ns_warp);
}

/* -- 7. VCPUOP_down and VCPUOP_up ------------------------------------------- */

static volatile uint64_t spin_count;
static volatile int spin_stop;

static void count_task(int id)
{
    (void)id;
    while (!spin_stop) spin_count++;
}

static void self_down_task(int id)
{
    struct percpu *p = &pcpu[id];
    p->before_down = 1;
    p->down_rc = vcpu_op(VCPUOP_down, id, 0);
    p->after_down = 1;
}

static void down_up(void)
{
    int last = ncpus - 1;
    run_on(last, count_task);
    int counting = WAIT_UNTIL(spin_count > 10000, 2000);
    long r = vcpu_op(VCPUOP_down, last, 0);
    long isup = vcpu_op(VCPUOP_is_up, last, 0);
    uint64_t c1 = spin_count;
    settle(30);
    uint64_t c2 = spin_count;
    check(counting && r == 0 && isup == 0 && c1 == c2,
          "VCPUOP_down of running vCPU %d: is_up %ld, its counter stopped (%lu, 30 ms later %lu)", last, isup, c1, c2);
    /* Interrupts sent to a down vCPU wait for it. */
    struct percpu *lp = &pcpu[last];
    uint64_t ipis0 = lp->hits[IPI_VECTOR];
    uint32_t evts0 = lp->port_hits[evt_from0[last]];
    send_ipi(2 * last, IPI_VECTOR);
    send(evt_from0[last]);
    settle(20);
    check(lp->hits[IPI_VECTOR] == ipis0 && lp->port_hits[evt_from0[last]] == evts0 && spin_count == c2,
          "a LAPIC IPI and an event sent to the down vCPU %d: not taken while it is down", last);
    r = vcpu_op(VCPUOP_up, last, 0);
    isup = vcpu_op(VCPUOP_is_up, last, 0);
    int again = WAIT_UNTIL(spin_count > c2 + 1000, 2000);
    check(r == 0 && isup == 1 && again, "VCPUOP_up: is_up %ld, counting again where it stopped (%lu)", isup,
          spin_count);
    int took = WAIT_UNTIL(lp->hits[IPI_VECTOR] == ipis0 + 1 && lp->port_hits[evt_from0[last]] == evts0 + 1, 2000);
    check(took, "... and it took the LAPIC IPI (%lu) and the event (%u) sent while it was down",
          lp->hits[IPI_VECTOR] - ipis0, lp->port_hits[evt_from0[last]] - evts0);
    spin_stop = 1;
    check(WAIT_UNTIL(done(last), 2000), "vCPU %d finished its loop", last);

    /* A vCPU that takes itself down. */
    struct percpu *p = &pcpu[1];
    run_on(1, self_down_task);
    int stopped = WAIT_UNTIL(p->before_down && vcpu_op(VCPUOP_is_up, 1, 0) == 0, 2000);
    settle(10);
    check(stopped && !p->after_down, "vCPU 1 took itself down with VCPUOP_down: is_up 0, stopped in the call");
    r = vcpu_op(VCPUOP_up, 1, 0);
    int back = WAIT_UNTIL(p->after_down && done(1), 2000);
    check(r == 0 && back && p->down_rc == 0, "VCPUOP_up: it returned 0 from its VCPUOP_down and went on (%ld)",
          p->down_rc);
}

/* -- 8. INIT and STARTUP again (CPU hotplug, as Linux does it) --------------- */

static volatile uint32_t hello_from;
static void hello_task(int id) { hello_from = (uint32_t)id; }

static void reinit(void)
{
    volatile uint16_t *count = (volatile uint16_t *)(TRAMP_BASE + (tramp_count - tramp_start));
    struct percpu *p = &pcpu[1];
    uint16_t entered = *count;
    p->online = 0;
    p->cpuid_id = p->lapic_id = p->gs_ok = 0;
    ap_boot_id = 1;
    ap_boot_stack = (uint64_t)(uintptr_t)(stacks[1] + STACK_SIZE);
    send_ipi(2, 0xc500); /* INIT */
    send_ipi(2, 0x8500);
    long isup = vcpu_op(VCPUOP_is_up, 1, 0);
    settle(5);
    check(isup == 0 && !p->online, "INIT of the idle vCPU 1: is_up %ld", isup);
    p->cmd_seq = p->done_seq = 0;
    send_ipi(2, 0x0600 | (TRAMP_BASE >> 12));
    int up = WAIT_UNTIL(p->online, 2000);
    check(up && *count == entered + 1 && vcpu_op(VCPUOP_is_up, 1, 0) == 1,
          "STARTUP again: vCPU 1 back through the trampoline (entries %u)", *count);
    check(p->cpuid_id == 1 && p->lapic_id == 2 && p->gs_ok, "vCPU 1 after its restart: CPUID id %u, LAPIC ID %u",
          p->cpuid_id, p->lapic_id);
    hello_from = 99;
    run_on(1, hello_task);
    int ran = WAIT_UNTIL(done(1), 2000);
    check(ran && hello_from == 1, "vCPU 1 runs work again after its restart (%u)", hello_from);
}

/* -- vCPU 0 ------------------------------------------------------------------ */

static void setup_bsp(void)
{
    /* The LAPIC page: a 2 MiB uncached page at 0xfee00000, pdpt[3]. */
    lapic_pd[(LAPIC - 0xc0000000UL) >> 21] = LAPIC | 0x9b; /* P RW PWT PCD PS */
    boot_pdpt[3] = (uint64_t)(uintptr_t)lapic_pd | 3;
    asm volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
    for (int v = 0; v < 256; v++) set_gate64(idt, v, isr_stubs + 16 * v, 0);
    load_idt();
    pcpu[0].id = 0;
    wrmsr(MSR_GS_BASE, (uint64_t)(uintptr_t)&pcpu[0]);
    lapic_write(LAPIC_SVR, 0x1ff);
    lapic_write(LAPIC_LDR, 1u << 24);
}

/* -- bench: IPI round trips between vCPU 0 and vCPU 1 ------------------------ */

/* vCPU 0 sends, halts until the answer, and counts TSC cycles. */
static void round_trips(int n, int lapic, int64_t *samples)
{
    volatile uint64_t *answers = lapic ? &pcpu[0].hits[TO0_VECTOR_BASE + 1] : (volatile uint64_t *)0;
    for (int i = 0; i < n; i++) {
        uint64_t before = lapic ? *answers : pcpu[0].port_hits[evt_to0[1]];
        uint64_t t0 = rdtsc();
        if (lapic)
            send_ipi(2, IPI_VECTOR);
        else
            send(evt_from0[1]);
        asm volatile("cli");
        while ((lapic ? *answers : pcpu[0].port_hits[evt_to0[1]]) == before) asm volatile("sti; hlt; cli" ::: "memory");
        asm volatile("sti");
        samples[i] = (int64_t)(rdtsc() - t0);
    }
}

static int64_t bench_samples[4096];

static void bench(int n)
{
    if (n > 4096) n = 4096;
    bench_pong = 1;
    round_trips(n, 0, bench_samples);
    bench_report("ipi_rtt_evtchn_cycles", bench_samples, n);
    round_trips(n, 1, bench_samples);
    bench_report("ipi_rtt_lapic_cycles", bench_samples, n);
    bench_pong = 0;
    check(1, "%d IPI round trips each way", n);
}

int guest_main(uint32_t start_info)
{
    for (int k = 0; k < MAX_CPUS; k++) {
        pcpu[k].id = (uint64_t)k;
        pcpu[k].vi = k < 32 ? &shinfo.vcpu_info[k] : 0;
    }
    setup_bsp();
    check(this_cpu() == 0 && (lapic_read(LAPIC_ID) >> 24) == 0, "vCPU 0: GS base per-CPU data, LAPIC ID 0");

    struct { uint16_t domid, size; uint32_t space; uint64_t idx, gpfn; } xatp = {
        DOMID_SELF, 0, 0, 0, (uint64_t)(uintptr_t)&shinfo >> 12 };
    long r = hypercall(HYPERVISOR_memory_op, XENMEM_add_to_physmap, (long)&xatp, 0, 0, 0);
    check(r == 0 && shinfo.vcpu_info[0].time.mul != 0, "shared_info placed, pvclock filled in (%ld)", r);
    struct { uint16_t domid, pad; uint32_t index; uint64_t value; } p = { DOMID_SELF, 0, 0, (2ULL << 56) | UPCALL_VECTOR };
    check(hypercall(HYPERVISOR_hvm_op, HVMOP_set_param, (long)&p, 0, 0, 0) == 0, "callback vector %x set", UPCALL_VECTOR);
    asm volatile("sti");

    for (ncpus = 0; ncpus < 256; ncpus++)
        if (vcpu_op(VCPUOP_is_up, ncpus, 0) == -ENOENT) break;
    if (ncpus > MAX_CPUS) ncpus = MAX_CPUS;
    if (ncpus < 2) {
        check(0, "the smp guest needs 2 vCPUs or more (has %d)", ncpus);
        return verdict();
    }

    bring_up();
    if (failures()) {
        printk("bring-up failed: stopping here\n");
        return verdict();
    }
    ipis();
    int n_bench = (int)cmdline_arg(start_info, "bench", 0);
    if (n_bench > 0) {
        bench(n_bench);
        return verdict();
    }
    windows();
    timers();
    timer_among_busy();
    bound_to_2();
    locked();
    spinlock();
    down_up();
    reinit();

    uint64_t mismatch = 0, gsbad = 0;
    for (int k = 0; k < ncpus; k++) {
        mismatch += pcpu[k].apic_mismatch;
        gsbad += pcpu[k].gs_mismatch;
    }
    check(mismatch == 0, "every interrupt handler read its own vCPU's LAPIC ID (%lu mismatches)", mismatch);
    check(gsbad == 0, "GS base stayed each vCPU's own across switches (%lu mismatches)", gsbad);
    check(exceptions_seen == 0, "no vCPU took an exception (%lu)", exceptions_seen);
    return verdict();
}
