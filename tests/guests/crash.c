/* crash: dies on purpose in a known chain of functions, for the crash
 * debugging tools (Domain.context, Domain.dump_core; tests/test_crashdbg.py).
 *
 * guest_main -> crash_level_one -> crash_level_two -> crash_here, which
 * makes SCHEDOP_shutdown(SHUTDOWN_crash) itself, so the vCPU's RIP stays in
 * crash_here. Built with frame pointers and without sibling calls (build.py's
 * GUEST_FLAGS): every caller keeps its frame on the stack.
 *
 * crash_here leaves a stale code address in its frame (crash_decoy + 5),
 * which only a scan of the stack finds: a guess. Before crashing the guest
 * gives back crash_given_back (filled with 0xaa first): a hole in a core.
 *
 * 64-bit, with a second vCPU: it is started with VCPUOP_initialise and
 * spins in crash_secondary_spin, so a core dump has two threads. */
#include "common/lib.h"

#define HYPERVISOR_memory_op 12
#define HYPERVISOR_vcpu_op 24
#define XENMEM_decrease_reservation 1
#define DOMID_SELF 0x7ff0
#define VCPUOP_initialise 0
#define VCPUOP_up 1

/* What the debugger reads back from the core: set at run time, so it is
 * in RAM and not only in the ELF's data. */
volatile uint64_t crash_marker;
volatile uint32_t crash_secondary_spins;
volatile uint8_t crash_given_back[4096] __attribute__((aligned(4096)));

__attribute__((noinline)) void crash_decoy(void)
{
    asm volatile("nop; nop; nop; nop; nop; nop; nop; nop");
}

/* struct xen_memory_reservation (memory.h), native layout. */
struct reservation {
    unsigned long *extent_start;
    unsigned long nr_extents;
    unsigned int extent_order, mem_flags;
    uint16_t domid;
};

static void give_back_page(void)
{
    memset((void *)crash_given_back, 0xaa, sizeof(crash_given_back));
    unsigned long gfn = (uintptr_t)crash_given_back >> 12;
    struct reservation r = { &gfn, 1, 0, 0, DOMID_SELF };
    long done = hypercall(HYPERVISOR_memory_op, XENMEM_decrease_reservation, (long)&r, 0, 0, 0);
    printk("gave back %d page\n", (int)done);
}

__attribute__((noinline)) void crash_here(uint32_t depth)
{
    uint32_t reason = SHUTDOWN_crash;
    volatile uintptr_t stale = (uintptr_t)crash_decoy + 5;
    (void)stale;
    crash_marker = 0xc0ffee000000ULL + depth;
    printk("crashing in crash_here (depth %u)\n", depth);
#ifdef __x86_64__
    asm volatile("vmcall" :: "a"(HYPERVISOR_sched_op), "D"((long)SCHEDOP_shutdown), "S"(&reason) : "memory");
#else
    asm volatile("vmcall" :: "a"(HYPERVISOR_sched_op), "b"((long)SCHEDOP_shutdown), "c"(&reason) : "memory");
#endif
    for (;;) asm volatile("cli; hlt");
}

__attribute__((noinline)) void crash_level_two(uint32_t depth)
{
    crash_here(depth + 1);
    asm volatile("" ::: "memory");
}

__attribute__((noinline)) void crash_level_one(uint32_t depth)
{
    crash_level_two(depth + 1);
    asm volatile("" ::: "memory");
}

#ifdef __x86_64__
struct vcpu_hvm_context {
    uint32_t mode, pad;
    union {
        struct { uint64_t rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, rip, rflags, cr0, cr3, cr4, efer; } x86_64;
        uint8_t raw[120];
    };
};

extern uint64_t boot_pml4[];
static uint8_t secondary_stack[8192] __attribute__((aligned(16)));

__attribute__((noinline)) void crash_secondary_spin(uint64_t id)
{
    (void)id;
    for (;;) {
        __atomic_add_fetch(&crash_secondary_spins, 1, __ATOMIC_SEQ_CST);
        asm volatile("pause");
    }
}

/* vCPU 1 into crash_secondary_spin, if the domain has one. */
static void start_secondary(void)
{
    struct vcpu_hvm_context ctx;
    memset(&ctx, 0, sizeof(ctx));
    ctx.mode = 1; /* VCPU_HVM_MODE_64B */
    ctx.x86_64.rip = (uint64_t)(uintptr_t)crash_secondary_spin;
    /* As if called: a zero return address (the end of the chain), rbp 0. */
    ctx.x86_64.rsp = (uint64_t)(uintptr_t)(secondary_stack + sizeof(secondary_stack) - 8);
    ctx.x86_64.rdi = 1;
    ctx.x86_64.rflags = 0x2;
    ctx.x86_64.cr0 = 0x80010033;
    ctx.x86_64.cr3 = (uint64_t)(uintptr_t)boot_pml4;
    ctx.x86_64.cr4 = 0x20;
    ctx.x86_64.efer = 0x500;
    if (hypercall(HYPERVISOR_vcpu_op, VCPUOP_initialise, 1, (long)&ctx, 0, 0) != 0) {
        print("one vCPU\n");
        return;
    }
    hypercall(HYPERVISOR_vcpu_op, VCPUOP_up, 1, 0, 0, 0);
    for (long i = 0; i < 100000000 && crash_secondary_spins == 0; i++) asm volatile("pause");
    printk("vCPU 1 spinning (%u)\n", crash_secondary_spins);
}
#endif

int guest_main(uint32_t start_info)
{
    (void)start_info;
#ifdef __x86_64__
    start_secondary();
#endif
    give_back_page();
    crash_level_one(1);
    print("still alive: the crash did not happen\n");
    return SHUTDOWN_poweroff;
}
