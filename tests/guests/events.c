/* events: shared_info, event channels and timers as a Linux PVH guest uses
 * them: the callback vector (HVM_PARAM_CALLBACK_IRQ), VIRQ_TIMER from a
 * one-shot timer, IPIs, masking, HLT and SCHEDOP_block/poll waking on time,
 * and preemption: a timer still arrives while the vCPU spins with interrupts
 * on, in ring 0 and in ring 3. The pvclock is read as Linux reads it.
 * Built 32-bit too (build.py's GUESTS32): the same checks but for the SYSCALL
 * stress and the upper-half alias, which are long mode's. */
#include "common/xen.h"

#define HYPERVISOR_memory_op 12
#define HYPERVISOR_set_timer_op 15
#define HYPERVISOR_vcpu_op 24
#define HYPERVISOR_hvm_op 34
#define XENMEM_add_to_physmap 7
#define XENMEM_memory_map 9
#define VCPUOP_set_singleshot_timer 8
#define VCPUOP_stop_singleshot_timer 9
#define VCPUOP_register_runstate_memory_area 5
#define EVTCHNOP_bind_virq 1
#define EVTCHNOP_close 3
#define EVTCHNOP_send 4
#define EVTCHNOP_bind_ipi 7
#define EVTCHNOP_unmask 9
#define EVTCHNOP_status 5
#define HVMOP_set_param 0
#define HVMOP_get_param 1
#define SCHEDOP_block 1
#define UPCALL_VECTOR 0xf3


static struct shared_info shinfo __attribute__((aligned(4096)));
#ifdef __x86_64__
static uint64_t idt[512] __attribute__((aligned(16)));
static struct { uint32_t r0; uint64_t rsp0, rsp1, rsp2, r1, ist[7], r2; uint16_t r3, iomap; } __attribute__((packed)) tss;
#else
static struct { uint32_t link, esp0, ss0, esp1, ss1, esp2, ss2, cr3, eip, eflags, gpr[8], seg[6], ldt; uint16_t trap, iomap; } tss;
_Static_assert(sizeof(tss) == 104, "32-bit TSS is 104 bytes");
#endif
static uint8_t kstack[8192] __attribute__((aligned(16)));
static uint8_t ustack[4096] __attribute__((aligned(16)));
static struct { int state; uint64_t entry, time[4]; } runstate;

volatile uint64_t upcalls_seen, timer_events, ipi_events, upcall_from_user;
volatile unsigned long back_rip, back_rsp;
volatile uint64_t last_upcall_ns;
static uint32_t timer_port, ipi_port;
extern char upcall_entry[], ret_from_user[], user_spin[], user_stress[], stress_syscall_entry[], stress_sysenter_entry[];
volatile uint64_t user_incs, kernel_syscalls, rearm_ns;
volatile uint64_t upper_upcalls, upper_incs;
#ifdef __x86_64__
extern uint64_t boot_pml4[];

/* The identity map again in the upper half (PML4 slot 256), where a kernel
 * runs. These run at that alias (their data accesses are RIP-relative). */
#define UPPER_ALIAS 0xffff800000000000ULL
static void __attribute__((noinline)) upper_spin(uint64_t before) { while (upcalls_seen == before) {} }
static void __attribute__((noinline)) upper_count(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        asm volatile("incq %0" : "+m"(upper_incs));
}
#define AT_UPPER(fn) ((void (*)(uint64_t))((uintptr_t)(fn) + UPPER_ALIAS))
#endif

static uint64_t now_ns(void) { return pvclock_ns(&shinfo.vcpu_info[0].time, rdtsc()); }


static long set_timer(uint64_t deadline)
{
    struct { uint64_t timeout; uint32_t flags; } t = { deadline, 1 };
    return hypercall(HYPERVISOR_vcpu_op, VCPUOP_set_singleshot_timer, 0, (long)&t, 0, 0);
}

static long set_timer_op(uint64_t deadline)
{
#ifdef __x86_64__
    return hypercall(HYPERVISOR_set_timer_op, (long)deadline, 0, 0, 0, 0);
#else
    return hypercall(HYPERVISOR_set_timer_op, (long)(uint32_t)deadline, (long)(uint32_t)(deadline >> 32), 0, 0, 0);
#endif
}

static void on_port(uint32_t port)
{
    if (port == timer_port) timer_events++;
    if (port == ipi_port) ipi_events++;
}

void upcall_handler(unsigned long rip, unsigned long cs);
void upcall_handler(unsigned long rip, unsigned long cs)
{
    last_upcall_ns = now_ns();
    if ((cs & 3) == 3) upcall_from_user++;
#ifdef __x86_64__
    if (rip >= UPPER_ALIAS) upper_upcalls++;
#else
    (void)rip;
#endif
    evtchn_scan(&shinfo, 0, on_port);
    if (rearm_ns) set_timer(now_ns() + rearm_ns);
    upcalls_seen++;
}


/* Run `entry` in ring 3 with IF=1 and %rbx = `arg`, until it comes back
 * through INT 0x80 (`ret_from_user`). */
#ifdef __x86_64__
static void ring3_call(char *entry, uint64_t arg)
{
    asm volatile(
        "lea 1f(%%rip), %%rax; mov %%rax, back_rip(%%rip); mov %%rsp, back_rsp(%%rip)\n"
        "mov %[arg], %%rbx\n"
        "pushq $0x23; pushq %[ursp]; pushq $0x202; pushq $0x2b; pushq %[entry]\n"
        "iretq\n1:\n"
        :: [arg] "r"(arg), [ursp] "r"((uint64_t)(uintptr_t)(ustack + sizeof(ustack))), [entry] "r"(entry)
        : "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory");
}
#else
/* 32-bit: DS/ES become the user data segment first (an IRET to ring 3
 * would null the kernel's); `ret_from_user` restores them. */
static void ring3_call(char *entry, uint32_t arg)
{
    asm volatile(
        "movl $1f, back_rip; movl %%esp, back_rsp\n"
        "movl %[arg], %%ebx\n"
        "movw $0x23, %%ax; movw %%ax, %%ds; movw %%ax, %%es\n"
        "pushl $0x23; pushl %[ursp]; pushl $0x202; pushl $0x1b; pushl %[entry]\n"
        "iret\n1:\n"
        :: [arg] "g"(arg), [ursp] "i"(ustack + sizeof(ustack)), [entry] "S"(entry)
        : "eax", "ebx", "ecx", "edx", "memory"); /* ring 3 and the way back keep ESI, EDI, EBP */
}
#endif

static void setup(void)
{
#ifdef __x86_64__
    uint64_t base = (uint64_t)(uintptr_t)&tss, limit = sizeof(tss) - 1;
    gdt64[6] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) | ((base >> 24 & 0xff) << 56);
    gdt64[7] = base >> 32;
    tss.rsp0 = (uint64_t)(uintptr_t)(kstack + sizeof(kstack));
    tss.iomap = sizeof(tss);
    asm volatile("ltr %w0" :: "r"(TSS_SEL));
    set_gate64(idt, UPCALL_VECTOR, upcall_entry, 0);
    set_gate64(idt, 0x80, ret_from_user, 3);
    struct { uint16_t l; uint64_t b; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
    asm volatile("lidt %0" :: "m"(idtr));
#else
    /* Our own 32-bit TSS: ring 3's interrupts switch to kstack. */
    uint32_t base = (uint32_t)(uintptr_t)&tss, limit = sizeof(tss) - 1;
    gdt32[6] = (limit & 0xffff) | ((uint64_t)(base & 0xffffff) << 16) | (0x89ULL << 40) | ((uint64_t)(base >> 24) << 56);
    tss.esp0 = (uint32_t)(uintptr_t)(kstack + sizeof(kstack));
    tss.ss0 = KERNEL_DS;
    tss.iomap = sizeof(tss);
    asm volatile("ltr %w0" :: "r"(TSS_SEL));
    set_gate32(idt32, UPCALL_VECTOR, upcall_entry, 0); /* the runtime's IDT, already loaded */
    set_gate32(idt32, 0x80, ret_from_user, 3);
#endif
}

/* Ring 3 entering the kernel back to back (the entry set up by the
 * caller) under a 50 us re-armed timer: every increment and every entry
 * counted once, and the timer taken in ring 3. */
static void ring3_stress(const char *what, const char *entries)
{
    enum { ROUNDS = 5000 };
    uint64_t user_upcalls = upcall_from_user;
    rearm_ns = 50000;
    set_timer(now_ns() + rearm_ns);
    ring3_call(user_stress, ROUNDS);
    rearm_ns = 0;
    asm volatile("sti");
    for (volatile int i = 0; i < 200000; i++) {} /* let the last re-armed timer fire */
    asm volatile("cli");
    user_upcalls = upcall_from_user - user_upcalls;
    check(user_incs == ROUNDS && kernel_syscalls == ROUNDS, "ring-3 %s exact under preemption: %lu increments, %lu %s of %d",
          what, user_incs, kernel_syscalls, entries, ROUNDS);
    check(user_upcalls >= 5, "the stress was preempted in ring 3 (%lu timer upcalls there)", user_upcalls);
}

int guest_main(uint32_t start_info)
{
    setup();

    struct { uint16_t domid, size; uint32_t space; unsigned long idx, gpfn; } xatp = { 0x7ff0, 0, 0, 0, (uintptr_t)&shinfo >> 12 };
    long r = hypercall(HYPERVISOR_memory_op, XENMEM_add_to_physmap, (long)&xatp, 0, 0, 0);
    check(r == 0, "shared_info placed with add_to_physmap (%d)", (int)r);
    check(shinfo.vcpu_info[0].time.mul != 0 && !(shinfo.vcpu_info[0].time.version & 1), "pvclock filled in (mul %x, shift %d)",
          shinfo.vcpu_info[0].time.mul, shinfo.vcpu_info[0].time.shift);
    uint64_t sec = ((uint64_t)SHINFO_WC_SEC_HI(&shinfo) << 32) | shinfo.wc_sec;
    check(sec > 1700000000ULL, "wallclock in shared_info (%lu)", sec);
    uint64_t t0 = now_ns();
    for (volatile int i = 0; i < 2000000; i++) {}
    uint64_t t1 = now_ns();
    check(t1 > t0, "system time advances (%lu ns over a busy loop)", t1 - t0);

    struct { uint32_t nr; void *buf; } mm;
    uint8_t e820[20 * 16];
    mm.nr = 16; mm.buf = e820;
    r = hypercall(HYPERVISOR_memory_op, XENMEM_memory_map, (long)&mm, 0, 0, 0);
    check(r == 0 && mm.nr >= 3, "XENMEM_memory_map gives %u entries", mm.nr);

    /* Callback vector and the two ports. */
    struct { uint16_t domid; uint16_t pad; uint32_t index; uint64_t value; } p = { 0x7ff0, 0, 0, (2ULL << 56) | UPCALL_VECTOR };
    check(hypercall(HYPERVISOR_hvm_op, HVMOP_set_param, (long)&p, 0, 0, 0) == 0, "callback vector set");
    p.index = 18; p.value = 0;
    r = hypercall(HYPERVISOR_hvm_op, HVMOP_get_param, (long)&p, 0, 0, 0);
    check(r == 0 && p.value != 0, "CONSOLE_EVTCHN readable (%lu)", p.value);
    p.index = 17; p.value = 1;
    check(hypercall(HYPERVISOR_hvm_op, HVMOP_set_param, (long)&p, 0, 0, 0) == -1, "toolstack params are read-only");
    struct { uint32_t virq, vcpu, port; } bv = { 0, 0, 0 };
    r = evtchn(EVTCHNOP_bind_virq, &bv);
    check(r == 0 && bv.port != 0, "VIRQ_TIMER bound to port %u", bv.port);
    timer_port = bv.port;
    check(evtchn(EVTCHNOP_bind_virq, &bv) == -17, "binding it twice gives -EEXIST");
    struct { uint32_t vcpu, port; } bi = { 0, 0 };
    r = evtchn(EVTCHNOP_bind_ipi, &bi);
    check(r == 0 && bi.port != 0 && bi.port != timer_port, "IPI bound to port %u", bi.port);
    ipi_port = bi.port;
    check(evtchn(EVTCHNOP_unmask, &timer_port) == 0 && evtchn(EVTCHNOP_unmask, &ipi_port) == 0, "ports unmasked");

    struct { uint64_t addr; } rs = { (uint64_t)(uintptr_t)&runstate };
    check(hypercall(HYPERVISOR_vcpu_op, VCPUOP_register_runstate_memory_area, 0, (long)&rs, 0, 0) == 0 &&
          runstate.state == 0, "runstate area registered (running)");

    /* An IPI to ourselves: held while IF=0, delivered once interrupts are on
     * (an interrupt window, which the hypervisor has to notice by itself). */
    asm volatile("cli");
    evtchn(EVTCHNOP_send, &ipi_port);
    for (volatile int i = 0; i < 100000; i++) {}
    check(ipi_events == 0, "nothing delivered with IF=0");
    asm volatile("sti");
    for (volatile int i = 0; i < 2000000 && ipi_events == 0; i++) {}
    asm volatile("cli");
    check(ipi_events == 1, "IPI delivered once IF=1 (%lu)", ipi_events);
    /* With interrupts on, a send is delivered before the next instruction. */
    asm volatile("sti");
    evtchn(EVTCHNOP_send, &ipi_port);
    uint64_t seen_at_once = ipi_events;
    asm volatile("cli");
    check(seen_at_once == 2, "IPI with IF=1 delivered on return from the send (%lu)", seen_at_once);

    /* A masked port stays pending until unmasked. */
    shinfo.mask[ipi_port / EVTCHN_WORD_BITS] |= 1UL << (ipi_port % EVTCHN_WORD_BITS);
    asm volatile("sti");
    evtchn(EVTCHNOP_send, &ipi_port);
    for (volatile int i = 0; i < 200000; i++) {}
    asm volatile("cli");
    check(ipi_events == 2 && (shinfo.pending[ipi_port / EVTCHN_WORD_BITS] >> (ipi_port % EVTCHN_WORD_BITS) & 1), "masked port: pending, no upcall");
    asm volatile("sti");
    evtchn(EVTCHNOP_unmask, &ipi_port);
    uint64_t after_unmask = ipi_events;
    asm volatile("cli");
    check(after_unmask == 3, "unmask delivers it (%lu)", after_unmask);

    /* A timer in the past, VCPU_SSHOTTMR_future or not: Xen 4.18 and later
     * ignore the flag and fire it at once. */
    uint64_t fired = timer_events;
    check(set_timer(now_ns() - 1000) == 0, "past deadline accepted (flags ignored, as Xen 4.18+)");
    while (timer_events == fired) asm volatile("sti; hlt; cli");
    check(timer_events == fired + 1, "and it fires at once");

    /* HLT wakes on the timer. */
    uint64_t before = timer_events, deadline = now_ns() + 20000000;
    set_timer(deadline);
    while (timer_events == before) asm volatile("sti; hlt; cli");
    uint64_t late = last_upcall_ns - deadline;
    check(last_upcall_ns >= deadline && late < 4000000, "HLT woke by the timer, %lu us late", late / 1000);
    check(runstate.time[2] > 0, "runstate counted blocked time (%lu ns)", runstate.time[2]);
    /* vcpu_runstate_info: uint64_t aligned to 8 natively, to 4 in the 32-bit ABI. */
    int running_at = sizeof(long) == 8 ? 16 : 12;
    uint64_t running;
    memcpy(&running, (uint8_t *)&runstate + running_at, sizeof(running));
    check(running > 0 && runstate.entry > 0 && runstate.entry <= now_ns(), "runstate running time at offset %d (%lu ns)",
          running_at, running);

    /* SCHEDOP_block wakes on the timer too. */
    before = timer_events; deadline = now_ns() + 15000000;
    set_timer(deadline);
    asm volatile("sti");
    while (timer_events == before) hypercall(HYPERVISOR_sched_op, SCHEDOP_block, 0, 0, 0, 0);
    asm volatile("cli");
    check(last_upcall_ns >= deadline, "SCHEDOP_block woke by the timer");

    /* set_timer_op: the deadline in one register, or from a 32-bit guest its
     * halves in EBX and ECX. One 2^32 ns later than the one that fires must
     * not fire as that one; 0 stops it. */
    before = timer_events; deadline = now_ns() + 10000000;
    r = set_timer_op(deadline);
    while (timer_events == before) asm volatile("sti; hlt; cli");
    check(r == 0 && last_upcall_ns >= deadline, "set_timer_op: fired at its deadline (%d)", (int)r);
    before = timer_events; deadline = now_ns() + 10000000;
    r = set_timer_op(deadline + (1ULL << 32));
    uint64_t until = deadline + 20000000;
    asm volatile("sti");
    while (now_ns() < until) {}
    asm volatile("cli");
    check(r == 0 && timer_events == before, "set_timer_op: a deadline 2^32 ns on does not fire 2^32 ns early");
    check(set_timer_op(0) == 0, "set_timer_op(0) stops it");

    /* SCHEDOP_poll on a quiet port returns at its timeout. */
    uint32_t quiet = ipi_port;
    struct { uint32_t *ports; uint32_t n; uint64_t timeout; } pl = { &quiet, 1, now_ns() + 10000000 };
    uint64_t t = now_ns();
    r = hypercall(HYPERVISOR_sched_op, SCHEDOP_poll, (long)&pl, 0, 0, 0);
    check(r == 0 && now_ns() - t >= 9000000, "poll slept until its timeout (%lu us)", (now_ns() - t) / 1000);

    /* Preemption: spin in ring 0 with IF=1; the timer must still arrive. */
    before = upcalls_seen; deadline = now_ns() + 10000000;
    set_timer(deadline);
    asm volatile("sti");
    while (upcalls_seen == before) {}
    asm volatile("cli");
    late = last_upcall_ns - deadline;
    check(late < 4000000, "ring-0 spin preempted by the timer, %lu us late", late / 1000);

    /* And in ring 3. */
    before = upcalls_seen; deadline = now_ns() + 10000000;
    set_timer(deadline);
    ring3_call(user_spin, before);
    late = last_upcall_ns - deadline;
    check(upcall_from_user >= 1 && late < 4000000, "ring-3 spin preempted by the timer, %lu us late", late / 1000);

#ifndef __x86_64__
    /* 32-bit: ring 3 making back-to-back SYSENTERs (whose entry runs with
     * IF=0 until its STI; SYSEXIT back) gets its timer, and preemption is
     * exact: no increment twice, no SYSENTER lost. Asked for by sysenter=1
     * on the command line (tests/test_guests32.py runs it on its own: a
     * SYSENTER that never arrives spins in ring 3 until the host's timeout). */
    if (cmdline_arg(start_info, "sysenter", 0)) {
        wrmsr(0x174, KERNEL_CS);                                                  /* SYSENTER_CS */
        wrmsr(0x175, (uint32_t)(uintptr_t)(kstack + sizeof(kstack)));             /* SYSENTER_ESP */
        wrmsr(0x176, (uint32_t)(uintptr_t)stress_sysenter_entry);                 /* SYSENTER_EIP */
        ring3_stress("SYSENTER stress", "sysenters");
    } else {
        print("(the SYSENTER stress runs with sysenter=1)\n");
    }
#else
    /* Ring 3 making back-to-back SYSCALLs (whose entry runs with IF=0)
     * still gets its timer, and preemption there is exact: no increment
     * runs twice, no SYSCALL is lost. */
    wrmsr(0xc0000080, rdmsr(0xc0000080) | 1);                                  /* EFER.SCE */
    wrmsr(0xc0000081, ((uint64_t)0x18 << 48) | ((uint64_t)KERNEL_CS << 32));   /* STAR */
    wrmsr(0xc0000082, (uint64_t)(uintptr_t)stress_syscall_entry);              /* LSTAR */
    wrmsr(0xc0000084, 0x700);                                                  /* FMASK: TF, IF, DF */
    ring3_stress("stress", "syscalls");

    /* Ring 0 in the upper half, as a kernel runs: preempted too. */
    boot_pml4[256] = boot_pml4[0];
    asm volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
    before = upcalls_seen; deadline = now_ns() + 10000000;
    set_timer(deadline);
    asm volatile("sti");
    AT_UPPER(upper_spin)(before);
    asm volatile("cli");
    late = last_upcall_ns - deadline;
    /* (Later than the others: entered from the lower half without a stop,
     * the host first waits for 1 ms of vCPU thread CPU time to be sure.) */
    check(upper_upcalls >= 1 && late < 10000000, "upper-half ring-0 spin preempted by the timer, %lu us late",
          late / 1000);
    /* And exactly: a timer every 50 us stops the vCPU hundreds of times in
     * a loop of read-modify-writes; none may run twice or be lost. The
     * loop goes on, a round at a time, until 20 timers came in it (how
     * many rounds that takes depends on the host's speed). */
    enum { UPPER_ROUNDS = 4000000 };
    uint64_t upper_before = upper_upcalls, upper_done = 0;
    rearm_ns = 50000;
    set_timer(now_ns() + rearm_ns);
    asm volatile("sti");
    do {
        AT_UPPER(upper_count)(UPPER_ROUNDS);
        upper_done += UPPER_ROUNDS;
    } while (upper_upcalls - upper_before < 20 && upper_done < 25 * (uint64_t)UPPER_ROUNDS);
    asm volatile("cli");
    rearm_ns = 0;
    check(upper_incs == upper_done && upper_upcalls - upper_before >= 20,
          "upper-half increments exact under preemption: %lu of %lu, %lu timer upcalls there", upper_incs,
          upper_done, upper_upcalls - upper_before);
#endif

    check(evtchn(EVTCHNOP_close, &ipi_port) == 0, "close a port");
    struct { uint16_t dom, pad; uint32_t port, status, vcpu, u[2]; } st = { 0x7ff0, 0, ipi_port, 9, 9, {0, 0} };
    check(evtchn(EVTCHNOP_status, &st) == 0 && st.status == 0, "closed port reports EVTCHNSTAT_closed");
    uint32_t bad = 4096;
    check(evtchn(EVTCHNOP_send, &bad) == -22, "send on a port out of range gives -EINVAL");
    return verdict();
}
