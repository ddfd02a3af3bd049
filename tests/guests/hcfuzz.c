/*
 * hcfuzz: random hypercalls with random and hostile arguments, from every
 * vCPU, for fuzz/hypercalls.py (docs/fuzzing.md). Command line:
 *   seed=N count=N irq=0|1 every=N mem=MiB
 * `count` calls on vCPU 0 (the others go on until it is done); a progress
 * line "HCFUZZ n=... errors=..." every `every` of them. With irq=1 event
 * upcalls arrive on a callback vector (IF=1); with irq=0 the guest runs
 * with IF=0 (NMIs still come).
 *
 * Arguments: small ints, -1 and friends, huge values, pointers into the
 * scratch arena (at and across page ends), unmapped, non-canonical and
 * kernel-half pointers, frame numbers in free RAM, past RAM and huge;
 * structures the calls read are arena words of the same kinds.
 *
 * Left out, because they legitimately end the domain or block it for good
 * (docs/fuzzing.md has the same list):
 *   SCHEDOP_shutdown (any reason), VCPUOP_down of vCPU 0 (the last vCPU up
 *   powers off), SCHEDOP_block without a timer (it is always preceded by a
 *   near set_timer_op, and becomes a poll once the guest's event delivery
 *   may have been moved), SCHEDOP_poll without a timeout or with one more
 *   than 2 ms ahead, SCHEDOP_watchdog with a nonzero timeout (Xen would
 *   kill the domain when it expires), SCHEDOP_remote_shutdown of itself.
 * The guest's own memory (code, data, stacks, IDT, page tables; the image
 * is linked high, see build.py) is never handed out as a pointer or frame:
 * values that would land there become arena pointers or free frames, so
 * hypercall output cannot make the guest corrupt itself.
 */
#include "common/lib.h"
#include "common/xen.h"

#define HYPERVISOR_set_timer_op 15
#define HYPERVISOR_memory_op 12
#define HYPERVISOR_grant_table_op 20
#define HYPERVISOR_vm_assist 21
#define HYPERVISOR_vcpu_op 24
#define HYPERVISOR_hvm_op 34
#define SCHEDOP_block 1
#define SCHEDOP_remote_shutdown 4
#define SCHEDOP_shutdown_code 5
#define SCHEDOP_watchdog 6
#define VCPUOP_initialise 0
#define VCPUOP_up 1
#define VCPUOP_down 2
#define VCPUOP_is_up 3
#define VCPUOP_register_vcpu_info 10
#define XENMEM_add_to_physmap 7
#define XENMAPSPACE_shared_info 0
#define EVTCHNOP_bind_virq 1
#define EVTCHNOP_unmask 9
#define HVMOP_set_param 0
#define HVMOP_get_param 1
#define HVMOP_set_evtchn_upcall_vector 23
#define HVM_PARAM_CALLBACK_IRQ 0
#define HVM_PARAM_STORE_PFN 1
#define HVM_PARAM_CONSOLE_PFN 17
#define VIRQ_TIMER 0
#define UPCALL_VECTOR 0xf3
#define DOMID_SELF 0x7ff0

#define MAX_CPUS 8
#define STACK_SIZE 16384
#define ARENA_SIZE (256 * 1024)
#define PAGE 4096UL

struct vcpu_hvm_context {
    uint32_t mode, pad;
    union {
        struct { uint64_t rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, rip, rflags, cr0, cr3, cr4, efer; } x86_64;
        struct {
            uint32_t eax, ecx, edx, ebx, esp, ebp, esi, edi, eip, eflags, cr0, cr3, cr4, pad1;
            uint64_t efer;
            uint32_t cs_base, ds_base, ss_base, es_base, tr_base;
            uint32_t cs_limit, ds_limit, ss_limit, es_limit, tr_limit;
            uint16_t cs_ar, ds_ar, ss_ar, es_ar, tr_ar, pad2[3];
        } __attribute__((packed)) x86_32;
        uint8_t raw[120];
    };
};

struct percpu {
    uint64_t rng;
    volatile uint64_t calls, errors, interrupts, nmis;
    volatile uint32_t online;
    volatile uint32_t timer_port;
} __attribute__((aligned(64)));

static struct percpu pcpu[MAX_CPUS];
static uint8_t stacks[MAX_CPUS][STACK_SIZE] __attribute__((aligned(16)));
static struct shared_info shinfo __attribute__((aligned(4096)));
#ifdef __x86_64__
static uint64_t idt[512] __attribute__((aligned(16)));
struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idt_ptr = { sizeof(idt) - 1, 0 };
#endif
/* What hypercalls may scribble on: the RAM right after the image. */
static uint8_t *arena;

extern char isr_stubs[], ap_entry[];
extern char __image_start[] __asm__("_start32");
extern char _end_of_image[]; /* common/guest.ld */

static int ncpus = 1, irq_mode;
static uint64_t total, every = 2048, mem_bytes;
static volatile int stop_fuzzing;
/* A call may have moved or closed what delivers the timer's event (on any
 * vCPU): SCHEDOP_block could then sleep for good, polls replace it. */
static volatile int events_moved;
static uint64_t crit_lo, crit_hi, free_lo_pfn, free_hi_pfn;
/* The xenstore and console ring pages (HVM params): garbage written there
 * is input to the host's ring readers. */
static uint64_t ring_pages[2];
static struct vcpu_time_info clock; /* a copy: the fuzz may move vcpu_info */
static volatile uint64_t bad_printed, unexpected_exceptions;

/* Xen's errno values (public/errno.h). */
static const uint8_t xen_errnos[] = {
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19, 21, 22, 23, 24, 28, 30, 31, 33, 34, 35,
    36, 37, 38, 39, 61, 62, 74, 75, 84, 85, 88, 90, 95, 98, 99, 105, 106, 107, 110, 111,
};

static int valid_result(long r)
{
    if (r >= 0)
        return 1;
    for (unsigned i = 0; i < sizeof(xen_errnos); i++)
        if (r == -(long)xen_errnos[i])
            return 1;
    return 0;
}

static int vector_has_error_code(unsigned long v)
{
    return v == 8 || (v >= 10 && v <= 14) || v == 17 || v == 21 || v == 29 || v == 30;
}

/* -- randomness -------------------------------------------------------------- */

static uint64_t next(struct percpu *p)
{
    /* splitmix64 */
    uint64_t z = (p->rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint32_t below(struct percpu *p, uint32_t n) { return (uint32_t)next(p) % n; }

static uint64_t now_ns(void) { return pvclock_ns(&clock, rdtsc()); }

/* Never the guest's own memory: a pointer there becomes an arena pointer, a
 * frame number there a free frame (a 32-bit caller's values are 32 bits). */
static unsigned long sanitize(struct percpu *p, uint64_t v)
{
    unsigned long u = (unsigned long)v;
    uint64_t arena_lo = (uint64_t)(uintptr_t)arena, arena_hi = arena_lo + ARENA_SIZE;
    if (u + 0x10000 >= crit_lo && u < crit_hi && !(u >= arena_lo && u < arena_hi))
        return (unsigned long)(arena_lo + below(p, ARENA_SIZE));
    /* Frames: from the 2 MiB-aligned block below the guest, as an extent
     * of order 9 (a domU's largest) starting there would reach it. */
    if (u >= ((crit_lo >> 12) & ~0x1ffULL) && u < (crit_hi >> 12) + 1)
        return (unsigned long)(free_lo_pfn + below(p, (uint32_t)(free_hi_pfn - free_lo_pfn)));
    return u;
}

/* A pointer somewhere in the arena, often right at or just before a page end. */
static unsigned long arena_ptr(struct percpu *p)
{
    uint64_t base = (uint64_t)(uintptr_t)arena;
    uint32_t off = below(p, ARENA_SIZE);
    if (below(p, 2))
        off = (off & ~0xfffu) + 4096 - (1u << below(p, 6)) * below(p, 3);
    if (off >= ARENA_SIZE)
        off = ARENA_SIZE - 1;
    return (unsigned long)(base + off);
}

/* [addr, addr + len) lies in the arena (no wrap-around: addr may be ~0). */
static int in_arena(unsigned long addr, unsigned long len)
{
    unsigned long lo = (unsigned long)(uintptr_t)arena;
    return addr >= lo && len <= ARENA_SIZE && addr - lo <= ARENA_SIZE - len;
}

static unsigned long hostile(struct percpu *p)
{
    uint64_t v;
    switch (below(p, 13)) {
    case 0: case 1: v = below(p, 16); break;                           /* small ints */
    case 2: {
        static const uint64_t odd[] = { ~0ULL, 0xffffffffULL, 0x7fffffffULL, 0x80000000ULL, 0xffff, 0x10000,
                                        0x7fff, 0x8000, 0x7ff0, 0x7ff1, 0x7ff2, ~1ULL, ~0xfffULL };
        v = odd[below(p, sizeof(odd) / sizeof(odd[0]))];
        break;
    }
    case 3: v = 1ULL << below(p, 64); break;                            /* huge */
    case 4: v = next(p); break;
    case 5: case 6: v = arena_ptr(p); break;
    case 7: {                                                           /* unmapped and non-canonical */
        static const uint64_t bad[] = { 0x40000000ULL, 0x3ffff000ULL, 0x3fffffffULL, 0x800000000000ULL, 0x7ffffffff000ULL,
                                        0x7fffffffffffULL, 0x8000000000000000ULL, 0xffff800000000000ULL,
                                        0xffffffff80000000ULL, 0xfffffffffffff000ULL, 0xfffffffffffffff8ULL,
                                        0xc0000000ULL, 0xfee00000ULL, 0xfffff000ULL };
        v = bad[below(p, sizeof(bad) / sizeof(bad[0]))] + below(p, 3) * 8;
        break;
    }
    case 8: v = mem_bytes - 8 * below(p, 4) - PAGE * below(p, 2); break; /* the end of RAM */
    case 9: v = free_lo_pfn + below(p, (uint32_t)(free_hi_pfn - free_lo_pfn)); break; /* free frames */
    case 10: {                                                          /* frames past RAM and huge */
        static const uint64_t pfns[] = { 0xfeff0, 0xfefff, 0xfee00, 0x100000, 0xfffff, (1ULL << 40) - 1,
                                         (1ULL << 52) - 1, 1ULL << 52, 0x7fffffff };
        v = pfns[below(p, sizeof(pfns) / sizeof(pfns[0]))] + below(p, 2);
        break;
    }
    case 11:                                                            /* the xenstore and console rings */
        v = ring_pages[below(p, 2)] + (below(p, 2) ? below(p, 4096) : 4096 - 8 * below(p, 4));
        break;
    default: v = (uint32_t)next(p); break;
    }
    return sanitize(p, v);
}

/* A fresh buffer of hostile words in the arena (a quarter of them starting
 * just before a page end, so that the structure crosses it); its address. */
static unsigned long fill_buffer(struct percpu *p)
{
    uint32_t off = below(p, ARENA_SIZE - 2048) & ~(uint32_t)(sizeof(long) - 1);
    if (below(p, 4) == 0)
        off = (off | 0xfff) + 1 - 8 * (1 + below(p, 4));
    unsigned long *b = (unsigned long *)((uintptr_t)arena + off);
    /* Two thirds small numbers (eight of them from one random draw: the
     * guest's time goes into making arguments, it runs under TCG). */
    int n = 8 + below(p, 40);
    uint64_t bits = 0;
    for (int i = 0; i < n; i++) {
        if ((i & 7) == 0)
            bits = next(p);
        uint32_t c = (uint32_t)(bits >> (8 * (i & 7))) & 0xff;
        b[i] = c < 170 ? (c & 7) : hostile(p);
    }
    return (unsigned long)(uintptr_t)b;
}

static unsigned long arg(struct percpu *p)
{
    return below(p, 2) ? fill_buffer(p) : hostile(p);
}

/* -- the calls --------------------------------------------------------------- */

static const struct { uint8_t nr, subops; } families[] = {
    { 12, 32 }, { 15, 0 }, { 17, 12 }, { 18, 3 }, { 20, 16 }, { 21, 4 }, { 24, 16 }, { 29, 8 }, { 32, 16 },
    { 34, 40 }, { 33, 32 }, { 27, 4 }, { 36, 4 }, { 35, 4 },
};

static void irq_on(void) { if (irq_mode) asm volatile("sti"); }

static long vcpu_op(int cmd, int vcpu, void *a) { return hypercall(HYPERVISOR_vcpu_op, cmd, vcpu, (long)a, 0, 0); }

static long set_timer(uint64_t deadline)
{
#ifdef __x86_64__
    return hypercall(HYPERVISOR_set_timer_op, (long)deadline, 0, 0, 0, 0);
#else
    return hypercall(HYPERVISOR_set_timer_op, (long)(uint32_t)deadline, (long)(uint32_t)(deadline >> 32), 0, 0, 0);
#endif
}

static char ping_line[64];
static int ping_len;
static uint32_t pongs[16];
static volatile int npongs;

/* Console input read by vCPU 0 (its fuzz reads included): "PING n" lines
 * from the host are answered at the next progress line. */
static void console_input(const char *s, long n)
{
    for (long i = 0; i < n; i++) {
        char c = s[i];
        if (c == '\n' || c == '\r') {
            ping_line[ping_len] = 0;
            if (ping_len > 5 && memcmp(ping_line, "PING ", 5) == 0 && npongs < 16) {
                uint32_t v = 0;
                for (const char *q = ping_line + 5; *q >= '0' && *q <= '9'; q++) v = v * 10 + (uint32_t)(*q - '0');
                pongs[npongs++] = v;
            }
            ping_len = 0;
        } else if (ping_len < (int)sizeof(ping_line) - 1) {
            ping_line[ping_len++] = c;
        }
    }
}

static int moves_events(unsigned nr, uint32_t sub)
{
    switch (nr) {
    case HYPERVISOR_memory_op: return sub == 7 || sub == 1 || sub == 15 || sub == 11 || sub == 6;
    case HYPERVISOR_vcpu_op: return sub == VCPUOP_register_vcpu_info;
    case HYPERVISOR_event_channel_op: return sub == 3 || sub >= 8;
    case HYPERVISOR_hvm_op: return sub == 0 || sub == 23;
    default: return 0;
    }
}

static void one_call(struct percpu *p, int id)
{
    unsigned nr;
    unsigned long a[5];
    uint32_t pick = below(p, 100);
    int fam = -1;
    if (pick < 88) {
        fam = (int)below(p, sizeof(families) / sizeof(families[0]));
        nr = families[fam].nr;
    } else if (pick < 97) {
        nr = below(p, 64);
    } else {
        static const uint32_t odd[] = { 64, 65, 127, 255, 0x7fffffff, 0x80000000, 0xffffffff, 0xfffffffe };
        nr = odd[below(p, 8)];
    }
    for (int i = 0; i < 5; i++)
        a[i] = arg(p);
    if (fam >= 0 && families[fam].subops && below(p, 10))
        a[0] = below(p, families[fam].subops);
    if (nr == HYPERVISOR_vcpu_op && below(p, 4))
        a[1] = below(p, (uint32_t)ncpus + 2);

    /* Xen takes sub-ops as int: the exclusions look at the low 32 bits. */
    uint32_t sub = (uint32_t)a[0];
    int blocking = 0;
    switch (nr) {
    case HYPERVISOR_sched_op:
        if (sub == SCHEDOP_shutdown)
            a[0] = sub = SCHEDOP_shutdown_code;
        if (sub == SCHEDOP_block) {
            if (events_moved || !irq_mode) {
                a[0] = sub = SCHEDOP_poll;
            } else {
                /* IF=0 from the timer to the block: the upcall cannot be
                 * taken (and cleared) in between. */
                asm volatile("cli");
                set_timer(now_ns() + below(p, 1000000));
                blocking = 1;
                break;
            }
        }
        if (sub == SCHEDOP_poll) {
            /* struct sched_poll { handle ports; unsigned nr_ports; uint64_t timeout; } */
            unsigned long *s = (unsigned long *)fill_buffer(p);
            uint32_t *ports = (uint32_t *)fill_buffer(p);
            for (int i = 0; i < 8; i++) ports[i] = below(p, 3) ? below(p, 64) : (uint32_t)hostile(p);
            s[0] = below(p, 8) ? (unsigned long)(uintptr_t)ports : hostile(p);
            uint32_t *nports = (uint32_t *)&s[1];
            nports[0] = below(p, 4) ? below(p, 9) : (uint32_t)hostile(p);
            nports[1] = 0;
            uint64_t deadline = below(p, 4) ? now_ns() + below(p, 2000000) : 1 + below(p, 1000); /* never 0, never far */
            memcpy((char *)s + (sizeof(long) == 8 ? 16 : 8), &deadline, 8);
            a[1] = below(p, 16) ? (unsigned long)(uintptr_t)s : (below(p, 2) ? 0x40000000UL : ~0UL - 7);
        }
        if (sub == SCHEDOP_watchdog) {
            /* struct sched_watchdog { uint32_t id; uint32_t timeout; }: timeout 0 only */
            uint32_t *w = (uint32_t *)fill_buffer(p);
            w[1] = 0;
            a[1] = (unsigned long)(uintptr_t)w;
        }
        if (sub == SCHEDOP_remote_shutdown) {
            /* struct sched_remote_shutdown { domid_t domid; unsigned reason; }: never itself */
            uint16_t *r = (uint16_t *)fill_buffer(p);
            if (r[0] == DOMID_SELF || r[0] == 1 || r[0] == 0)
                r[0] = 0x7ff3;
            a[1] = (unsigned long)(uintptr_t)r;
        }
        break;
    case HYPERVISOR_hvm_op:
        /* An upcall on a vector the CPU pushes an error code for would
         * unbalance the guest's frame: those vectors are replaced (the
         * refusals under 0x10 stay). */
        if (sub == HVMOP_set_evtchn_upcall_vector && in_arena(a[1], 8)) {
            uint8_t *v = (uint8_t *)(uintptr_t)a[1] + 4;
            if (*v >= 0x10 && vector_has_error_code(*v))
                *v = UPCALL_VECTOR;
        }
        if (sub == HVMOP_set_param && in_arena(a[1], 16)) {
            uint32_t *index = (uint32_t *)((uintptr_t)a[1] + 4);
            uint8_t *value = (uint8_t *)((uintptr_t)a[1] + 8);
            if (*index == HVM_PARAM_CALLBACK_IRQ && value[7] == 2 && (value[0] < 0x10 || vector_has_error_code(value[0])))
                value[0] = UPCALL_VECTOR;
        }
        break;
    case HYPERVISOR_vcpu_op:
        if (sub == VCPUOP_down && (a[1] & 0xffffffff) == 0)
            a[1] = id ? (unsigned long)id : 1;
        break;
    case HYPERVISOR_console_io:
        /* Output stays short with a readable buffer (the host keeps it);
         * only vCPU 0 may read (the host's PINGs are its input). */
        if (sub == CONSOLEIO_write && (a[1] & 0xffffffff) > 256 && a[2] < mem_bytes)
            a[1] &= 0xff;
        if (sub == CONSOLEIO_read && id != 0)
            a[1] = 0;
        if (sub == CONSOLEIO_read && a[2] < mem_bytes && !in_arena(a[2], 1))
            a[2] = arena_ptr(p); /* what it reads is looked at for PINGs */
        break;
    default:
        break;
    }

    long r;
    if (nr == HYPERVISOR_set_timer_op && below(p, 2))
        r = set_timer(below(p, 2) ? now_ns() + below(p, 3000000) : ((uint64_t)a[0] << 32 | a[1]));
    else
        r = hypercall(nr, (long)a[0], (long)a[1], (long)a[2], (long)a[3], (long)a[4]);
    if (blocking)
        irq_on();
    p->calls++;
    if (!valid_result(r)) {
        p->errors++;
        if (bad_printed++ < 20)
            printk("\nHCFUZZ bad-result vcpu=%d nr=%u a1=%lx a2=%lx a3=%lx ret=%ld\n", id, nr, (uint64_t)a[0],
                   (uint64_t)a[1], (uint64_t)a[2], (int64_t)r);
    }
    if (r >= 0 && moves_events(nr, sub))
        events_moved = 1;
    if (nr == HYPERVISOR_console_io && sub == CONSOLEIO_read && r > 0 && id == 0 && in_arena(a[2], (unsigned long)r))
        console_input((const char *)(uintptr_t)a[2], r);
}

/* -- interrupts ---------------------------------------------------------------- */

static int my_id(void)
{
    uintptr_t sp = (uintptr_t)__builtin_frame_address(0);
    for (int k = 1; k < MAX_CPUS; k++)
        if (sp >= (uintptr_t)stacks[k] && sp < (uintptr_t)stacks[k] + STACK_SIZE)
            return k;
    return 0;
}

static void ignore_port(uint32_t port) { (void)port; }

void hcfuzz_isr(unsigned long vector, unsigned long rip)
{
    int id = my_id();
    if (vector == 2) {
        pcpu[id].nmis++;
        return;
    }
    /* 0x10 and up may be an upcall vector the fuzz chose (Xen takes any
     * from 0x10): those the CPU gives no error code are upcalls. */
    if (vector < 0x10 || vector_has_error_code(vector)) {
        unexpected_exceptions++;
        printk("\nHCFUZZ exception vector=%lu rip=%lx vcpu=%d\n", (uint64_t)vector, (uint64_t)rip, id);
        guest_exit(SHUTDOWN_crash);
    }
    pcpu[id].interrupts++;
    evtchn_scan(&shinfo, id, ignore_port);
}

#ifndef __x86_64__
static int on_exception(struct exc_frame *f)
{
    if (f->vector == 2) {
        pcpu[my_id()].nmis++;
        return 1;
    }
    if (f->vector >= 0x10 && !vector_has_error_code(f->vector)) {
        hcfuzz_isr(f->vector, f->eip); /* an upcall vector the fuzz chose */
        return 1;
    }
    return 0;
}
#endif


/* -- per vCPU ------------------------------------------------------------------ */

static void vcpu_setup(int id)
{
    struct percpu *p = &pcpu[id];
    uint32_t b[3] = { VIRQ_TIMER, (uint32_t)id, 0 };
    if (evtchn(EVTCHNOP_bind_virq, b) == 0) {
        p->timer_port = b[2];
        evtchn(EVTCHNOP_unmask, &b[2]);
    }
    p->online = 1;
    irq_on();
}

void ap_main(int id)
{
    struct percpu *p = &pcpu[id];
    vcpu_setup(id);
    while (!stop_fuzzing)
        one_call(p, id);
    asm volatile("cli");
    for (;;)
        asm volatile("hlt");
}

static int bring_up(int k)
{
    struct vcpu_hvm_context ctx;
    memset(&ctx, 0, sizeof(ctx));
#ifdef __x86_64__
    ctx.mode = 1;
    ctx.x86_64.rip = (uint64_t)(uintptr_t)ap_entry;
    ctx.x86_64.rsp = (uint64_t)(uintptr_t)(stacks[k] + STACK_SIZE);
    ctx.x86_64.rdi = (uint64_t)k;
    ctx.x86_64.rflags = 0x2;
    ctx.x86_64.cr0 = read_cr0();
    unsigned long cr3, cr4;
    asm volatile("mov %%cr3, %0; mov %%cr4, %1" : "=r"(cr3), "=r"(cr4));
    ctx.x86_64.cr3 = cr3;
    ctx.x86_64.cr4 = cr4;
    ctx.x86_64.efer = 0x500;
#else
    ctx.mode = 0;
    ctx.x86_32.eip = (uint32_t)(uintptr_t)ap_entry;
    ctx.x86_32.esp = (uint32_t)(uintptr_t)(stacks[k] + STACK_SIZE);
    ctx.x86_32.edi = (uint32_t)k;
    ctx.x86_32.eflags = 0x2;
    unsigned long cr3, cr4;
    asm volatile("mov %%cr3, %0; mov %%cr4, %1" : "=r"(cr3), "=r"(cr4));
    ctx.x86_32.cr0 = (uint32_t)read_cr0();
    ctx.x86_32.cr3 = (uint32_t)cr3;
    ctx.x86_32.cr4 = (uint32_t)cr4;
    ctx.x86_32.cs_limit = ctx.x86_32.ds_limit = ctx.x86_32.ss_limit = ctx.x86_32.es_limit = 0xfffff;
    ctx.x86_32.tr_limit = 0x67;
    ctx.x86_32.cs_ar = 0xc9b;
    ctx.x86_32.ds_ar = ctx.x86_32.ss_ar = ctx.x86_32.es_ar = 0xc93;
    ctx.x86_32.tr_ar = 0x8b;
#endif
    long r = vcpu_op(VCPUOP_initialise, k, &ctx);
    if (r == 0)
        r = vcpu_op(VCPUOP_up, k, 0);
    return (int)r;
}

static void progress(const char *what)
{
    uint64_t n = 0, errors = 0, irqs = 0, nmis = 0;
    for (int k = 0; k < ncpus; k++) {
        n += pcpu[k].calls;
        errors += pcpu[k].errors;
        irqs += pcpu[k].interrupts;
        nmis += pcpu[k].nmis;
    }
    char buf[256];
    long got = hypercall(HYPERVISOR_console_io, CONSOLEIO_read, sizeof(buf), (long)buf, 0, 0);
    if (got > 0)
        console_input(buf, got);
    for (int i = 0; i < npongs; i++)
        printk("\nPONG %u\n", pongs[i]);
    npongs = 0;
    printk("\nHCFUZZ %sn=%lu errors=%lu vcpu0=%lu irqs=%lu nmis=%lu\n", what, n, errors, (uint64_t)pcpu[0].calls, irqs,
           nmis);
}

/* Hypercall output may have left stale words in the arena that a later
 * call's structure would follow: nothing in it points at the guest. */
static void sanitize_arena(struct percpu *p)
{
    unsigned long *w = (unsigned long *)arena;
    for (unsigned i = 0; i < ARENA_SIZE / sizeof(long); i++)
        w[i] = sanitize(p, w[i]);
    if (sizeof(long) == 8) {
        uint32_t *h = (uint32_t *)arena; /* 32-bit fields of 64-bit structures */
        for (unsigned i = 0; i < ARENA_SIZE / 4; i++)
            h[i] = (uint32_t)sanitize(p, h[i]);
    }
}

int guest_main(uint32_t start_info)
{
    uint64_t seed = cmdline_arg(start_info, "seed", 1);
    total = cmdline_arg(start_info, "count", 100000);
    every = cmdline_arg(start_info, "every", 2048);
    irq_mode = (int)cmdline_arg(start_info, "irq", 1);
    mem_bytes = cmdline_arg(start_info, "mem", 64) << 20;
    if (every == 0)
        every = 2048;

    crit_lo = (uint64_t)(uintptr_t)__image_start & ~0xfffULL;
    arena = (uint8_t *)(((uintptr_t)_end_of_image + 0xfff) & ~(uintptr_t)0xfff);
    memset(arena, 0, ARENA_SIZE);
    crit_hi = (uint64_t)(uintptr_t)arena + ARENA_SIZE;
    free_lo_pfn = (crit_hi >> 12) + 16;
    free_hi_pfn = mem_bytes >> 12;
    check(free_hi_pfn > free_lo_pfn + 64, "RAM has room after the arena (%lx)", crit_hi);
    if (failures())
        return verdict();

    for (int k = 0; k < MAX_CPUS; k++)
        pcpu[k].rng = seed * 0x100000001b3ULL + (uint64_t)k * 0x9e3779b97f4a7c15ULL + 1;

#ifdef __x86_64__
    for (int v = 0; v < 256; v++)
        set_gate64(idt, v, isr_stubs + 16 * v, 0);
    idt_ptr.base = (uint64_t)(uintptr_t)idt;
    asm volatile("lidt %0" :: "m"(idt_ptr));
#else
    exception_handler = on_exception;
    set_gate32(idt32, 2, isr_stubs + 16 * 2, 0);
    for (int v = 32; v < 256; v++)
        set_gate32(idt32, v, isr_stubs + 16 * v, 0);
#endif

    /* shared_info on our page, a copy of the clock, the upcall vector. */
    struct { uint16_t domid, size; uint32_t space; unsigned long idx, gpfn; } xatp =
        { DOMID_SELF, 0, XENMAPSPACE_shared_info, 0, (unsigned long)((uintptr_t)&shinfo >> 12) };
    long r = hypercall(HYPERVISOR_memory_op, XENMEM_add_to_physmap, (long)&xatp, 0, 0, 0);
    check(r == 0, "shared_info mapped (%ld)", r);
    set_timer(1);
    clock = shinfo.vcpu_info[0].time;
    if (irq_mode) {
        struct { uint16_t domid, pad; uint32_t index; uint64_t value; } __attribute__((aligned(4))) hp =
            { DOMID_SELF, 0, HVM_PARAM_CALLBACK_IRQ, (2ULL << 56) | UPCALL_VECTOR };
        r = hypercall(HYPERVISOR_hvm_op, HVMOP_set_param, (long)&hp, 0, 0, 0);
        check(r == 0, "callback vector set (%ld)", r);
    }
    static const uint32_t ring_params[2] = { HVM_PARAM_STORE_PFN, HVM_PARAM_CONSOLE_PFN };
    for (int i = 0; i < 2; i++) {
        struct { uint16_t domid, pad; uint32_t index; uint64_t value; } __attribute__((aligned(4))) hp =
            { DOMID_SELF, 0, ring_params[i], 0 };
        r = hypercall(HYPERVISOR_hvm_op, HVMOP_get_param, (long)&hp, 0, 0, 0);
        ring_pages[i] = r == 0 ? hp.value << 12 : 0;
    }
    check(ring_pages[0] && ring_pages[1], "the ring pages (%lx %lx)", ring_pages[0], ring_pages[1]);
    while (ncpus < MAX_CPUS && vcpu_op(VCPUOP_is_up, ncpus, 0) >= 0)
        ncpus++;
    vcpu_setup(0);
    for (int k = 1; k < ncpus; k++)
        check(bring_up(k) == 0, "vCPU %d brought up", k);
    printk("HCFUZZ start seed=%lu count=%lu vcpus=%d irq=%d arch=%d\n", seed, total, ncpus, irq_mode,
           (int)(8 * sizeof(long)));
    if (failures())
        return verdict();

    struct percpu *p = &pcpu[0];
    uint64_t countdown = every;
    while (p->calls < total) {
        one_call(p, 0);
        if (--countdown == 0) {
            countdown = every;
            /* vCPUs the fuzz took down come back; stale arena words go. */
            for (int k = 1; k < ncpus; k++)
                vcpu_op(VCPUOP_up, k, 0);
            sanitize_arena(p);
            progress("");
        }
    }
    stop_fuzzing = 1;
    for (int k = 1; k < ncpus; k++)
        vcpu_op(VCPUOP_up, k, 0);
    progress("done ");
    uint64_t errors = 0;
    for (int k = 0; k < ncpus; k++)
        errors += pcpu[k].errors;
    check(errors == 0, "every result a Xen errno or a value (%lu not)", errors);
    check(unexpected_exceptions == 0, "no unexpected exception");
    return verdict();
}
