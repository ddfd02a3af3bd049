/* exceptions: our own GDT, IDT and TSS in long mode, and every way into the
 * IDT the hypervisor must get right: faults with and without error codes,
 * CR2, traps, software interrupts, gate DPL, interrupt vs trap gates, an IST
 * stack, ring 3 and back through IRETQ and SYSCALL, a #DF from a fault during
 * delivery, and page faults in a row. */
#include "common/lib.h"

struct frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error, rip, cs, rflags, rsp, ss;
};

struct tss {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3, iomap;
} __attribute__((packed));

struct gate { uint16_t off0, sel; uint8_t ist, type; uint16_t off1; uint32_t off2, zero; };

static struct gate idt[256] __attribute__((aligned(16)));
static struct tss tss __attribute__((aligned(16)));
static uint8_t rsp0_stack[8192] __attribute__((aligned(16)));
static uint8_t ist1_stack[4096] __attribute__((aligned(16)));
static uint8_t ist2_stack[4096] __attribute__((aligned(16)));
static uint8_t user_stack[4096] __attribute__((aligned(16)));
static uint64_t pdpt1_pd[512] __attribute__((aligned(4096)));
static uint64_t pt[512] __attribute__((aligned(4096)));
static uint8_t pages[3][4096] __attribute__((aligned(4096)));

extern char isr0[], isr1[], isr2[], isr3[], isr4[], isr5[], isr6[], isr7[], isr8[], isr9[], isr10[], isr11[],
    isr12[], isr13[], isr14[], isr15[], isr16[], isr17[], isr18[], isr19[], isr20[], isr21[], isr64[], isr65[],
    isr128[], isr129[];
extern char syscall_entry[], user_entry[], user_after_syscall[], user_fault_insn[], user_after_fault[],
    user_gp_insn[], user_after_gp[];
extern uint64_t boot_pdpt[];

/* What the last exception looked like. */
static volatile struct {
    uint64_t count, vector, error, rip, cs, ss, rsp, rflags, cr2, frame_at;
    uint64_t handler_rflags;
} last;
static volatile uint64_t resume_rip;     /* where to continue after a fault */
static volatile uint64_t kernel_resume_rsp, kernel_resume_rip;
static volatile uint64_t sys_nr, sys_rcx, sys_r11, sys_flags, sys_cs, sys_ss;
volatile uint16_t user_cs_after_sysret;
volatile long user_hypercall_result;

static void set_gate(int vec, void *handler, int dpl, int ist, int trap)
{
    uint64_t a = (uint64_t)(uintptr_t)handler;
    idt[vec] = (struct gate){ (uint16_t)a, KERNEL_CS, (uint8_t)ist,
                              (uint8_t)(0x80 | (dpl << 5) | (trap ? 0xf : 0xe)), (uint16_t)(a >> 16),
                              (uint32_t)(a >> 32), 0 };
}

static volatile uint64_t user_resume[2];
static volatile int user_resume_n, user_pf_ok, user_gp_ok;

static int in_rsp0(uint64_t p)
{
    return p >= (uint64_t)(uintptr_t)rsp0_stack && p < (uint64_t)(uintptr_t)rsp0_stack + sizeof(rsp0_stack);
}

void isr_handler(struct frame *f)
{
    uint64_t fl;
    asm volatile("pushfq; pop %0" : "=r"(fl));
    last.count++;
    last.vector = f->vector;
    last.error = f->error;
    last.rip = f->rip;
    last.cs = f->cs;
    last.ss = f->ss;
    last.rsp = f->rsp;
    last.rflags = f->rflags;
    last.cr2 = read_cr2();
    last.frame_at = (uint64_t)(uintptr_t)f;
    last.handler_rflags = fl;
    if (f->vector == 0x80) {
        /* From ring 3 back to the kernel: rewrite the frame. */
        f->rip = kernel_resume_rip;
        f->cs = KERNEL_CS;
        f->ss = KERNEL_DS;
        f->rsp = kernel_resume_rsp;
        f->rflags = 0x2;
        return;
    }
    if ((f->cs & 3) == 3) {
        /* Ring-3 faults: check where we are, continue at the next step. */
        if (f->vector == 14)
            user_pf_ok = f->error == 5 && read_cr2() == 0x40002000 && f->rip == (uint64_t)(uintptr_t)user_fault_insn &&
                         f->ss == USER_DS && in_rsp0((uint64_t)(uintptr_t)f);
        if (f->vector == 13)
            user_gp_ok = f->error == 0x81 * 8 + 2 && f->rip == (uint64_t)(uintptr_t)user_gp_insn;
        if (user_resume_n < 2)
            f->rip = user_resume[user_resume_n++];
        return;
    }
    if (resume_rip) {
        f->rip = resume_rip;
        resume_rip = 0;
    }
}

uint64_t syscall_handler(uint64_t nr, uint64_t rcx, uint64_t r11, uint64_t flags)
{
    sys_nr = nr;
    sys_rcx = rcx;
    sys_r11 = r11;
    sys_flags = flags;
    sys_cs = read_cs();
    sys_ss = read_ss();
    return 0;
}

/* Run `insn` (asm text) expecting an exception, continue at label 9. */
#define EXPECT_FAULT(insn, ...)                                                                   \
    do {                                                                                          \
        uint64_t _start;                                                                          \
        asm volatile("lea 8f(%%rip), %%rax; mov %%rax, %0; lea 9f(%%rip), %%rax; mov %%rax, %1\n" \
                     "8: " insn "\n9:"                                                           \
                     : "=m"(_start), "=m"(resume_rip)::"rax", "rbx", "rcx", "rdx", "memory" __VA_ARGS__); \
        fault_at = _start;                                                                        \
    } while (0)

static uint64_t fault_at;

static void setup_tables(void)
{
    /* TSS descriptor at 0x30 (16 bytes). */
    uint64_t base = (uint64_t)(uintptr_t)&tss, limit = sizeof(tss) - 1;
    gdt64[6] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) | ((base >> 24 & 0xff) << 56);
    gdt64[7] = base >> 32;
    tss.rsp[0] = (uint64_t)(uintptr_t)(rsp0_stack + sizeof(rsp0_stack));
    tss.ist[0] = (uint64_t)(uintptr_t)(ist1_stack + sizeof(ist1_stack));
    tss.ist[1] = (uint64_t)(uintptr_t)(ist2_stack + sizeof(ist2_stack));
    tss.iomap = sizeof(tss);
    asm volatile("ltr %w0" :: "r"(TSS_SEL));

    void *h[22] = { isr0, isr1, isr2, isr3, isr4, isr5, isr6, isr7, isr8, isr9, isr10,
                    isr11, isr12, isr13, isr14, isr15, isr16, isr17, isr18, isr19, isr20, isr21 };
    for (int v = 0; v < 22; v++)
        set_gate(v, h[v], 0, 0, 0);
    set_gate(3, isr3, 3, 1, 1);   /* INT3: usable from ring 3, IST 1, trap gate */
    set_gate(8, isr8, 0, 2, 0);   /* #DF on IST 2 */
    set_gate(0x40, isr64, 0, 0, 1);  /* trap gate */
    set_gate(0x41, isr65, 0, 0, 0);  /* interrupt gate */
    set_gate(0x80, isr128, 3, 0, 0); /* ring 3 may call it */
    set_gate(0x81, isr129, 0, 0, 0); /* ring 3 may not */
    struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
    asm volatile("lidt %0" :: "m"(idtr));

    /* 0x40000000: a page table of our own. PT[0] absent, PT[1] read-only,
     * PT[2] supervisor-only, PT[3] user read/write. */
    boot_pdpt[1] = (uint64_t)(uintptr_t)pdpt1_pd | 7;
    pdpt1_pd[0] = (uint64_t)(uintptr_t)pt | 7;
    pt[1] = (uint64_t)(uintptr_t)pages[0] | 0x1 | 0x4;
    pt[2] = (uint64_t)(uintptr_t)pages[1] | 0x1 | 0x2;
    pt[3] = (uint64_t)(uintptr_t)pages[2] | 0x7;
    asm volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");

    /* SYSCALL: kernel CS 0x08 / SS 0x10, SYSRET base 0x18; mask IF, DF, TF. */
    wrmsr(0xc0000080, rdmsr(0xc0000080) | 1);
    wrmsr(0xc0000081, ((uint64_t)0x18 << 48) | ((uint64_t)KERNEL_CS << 32));
    wrmsr(0xc0000082, (uint64_t)(uintptr_t)syscall_entry);
    wrmsr(0xc0000084, 0x700);
}

static int in_stack(uint64_t p, const uint8_t *stack, uint64_t size)
{
    return p >= (uint64_t)(uintptr_t)stack && p < (uint64_t)(uintptr_t)stack + size;
}

static void ring3_trip(void)
{
    uint64_t before = last.count;
    user_resume[0] = (uint64_t)(uintptr_t)user_after_fault;
    user_resume[1] = (uint64_t)(uintptr_t)user_after_gp;
    user_resume_n = 0;
    /* IRETQ into ring 3 with DF set (SYSCALL's FMASK must clear it). */
    asm volatile(
        "lea 1f(%%rip), %%rax; mov %%rax, %[krip]; mov %%rsp, %[krsp]\n"
        "pushq $0x23; pushq %[ursp]; pushq $0x402; pushq $0x2b; pushq %[uentry]\n"
        "iretq\n"
        "1:\n"
        : [krip] "=m"(kernel_resume_rip), [krsp] "=m"(kernel_resume_rsp)
        : [ursp] "r"((uint64_t)(uintptr_t)(user_stack + sizeof(user_stack))), [uentry] "r"(user_entry)
        : "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory");
    asm volatile("cld");
    check(sys_nr == 42, "SYSCALL reached LSTAR with RAX intact (%lu)", sys_nr);
    check(sys_cs == KERNEL_CS && sys_ss == KERNEL_DS, "SYSCALL loaded CS/SS from STAR (%x/%x)",
          (unsigned)sys_cs, (unsigned)sys_ss);
    check(sys_rcx == (uint64_t)(uintptr_t)user_after_syscall, "RCX holds the return RIP (%lx)", sys_rcx);
    check((sys_r11 & 0x400) && !(sys_flags & 0x400), "R11 kept user RFLAGS, FMASK cleared DF (%lx, %lx)", sys_r11,
          sys_flags);
    check(user_cs_after_sysret == USER_CS, "SYSRETQ returned to ring 3 (cs %x)", user_cs_after_sysret);
    check(user_hypercall_result == -1, "a hypercall from ring 3 gives -EPERM (%d)", (int)user_hypercall_result);
    check(user_pf_ok, "#PF from ring 3 on the TSS.RSP0 stack: error P|U, CR2, SS, RIP");
    check(user_gp_ok, "INT through a DPL-0 gate from ring 3 gives #GP(vector*8+2)");
    check(last.count == before + 3, "three exceptions taken in ring 3 (%lu)", last.count - before);
}

int guest_main(uint32_t start_info)
{
    (void)start_info;
    setup_tables();
    print("exceptions: tables loaded\n");

    EXPECT_FAULT("ud2");
    check(last.vector == 6 && last.rip == fault_at, "#UD at the ud2 (%lx, rip %lx)", last.vector, last.rip);

    EXPECT_FAULT("xor %%ecx, %%ecx; div %%ecx");
    check(last.vector == 0 && last.rip == fault_at + 2, "#DE at the div (rip %lx)", last.rip);

    EXPECT_FAULT("mov $0x1230, %%ax; mov %%ax, %%ds");
    check(last.vector == 13 && last.error == 0x1230, "#GP(0x1230) from a selector past the GDT (%lx, %lx)",
          last.vector, last.error);
    asm volatile("mov %0, %%ds" :: "r"(KERNEL_DS));

    EXPECT_FAULT("movabs $0x8000000000000000, %%rbx; mov (%%rbx), %%rax");
    check(last.vector == 13 && last.error == 0, "#GP(0) from a non-canonical address (%lx)", last.vector);

    EXPECT_FAULT("mov 0x40000010, %%rax");
    check(last.vector == 14 && last.error == 0 && last.cr2 == 0x40000010,
          "#PF not-present: error %lx, cr2 %lx", last.error, last.cr2);

    EXPECT_FAULT("movq $1, 0x40001008");
    check(last.vector == 14 && last.error == 3 && last.cr2 == 0x40001008,
          "#PF write-protect: error %lx, cr2 %lx", last.error, last.cr2);
    check((read_cr0() & 0x10000) != 0, "CR0.WP is set");

    /* Five page faults in a row stay page faults. */
    uint64_t c0 = last.count;
    int all_pf = 1;
    for (int i = 0; i < 5; i++) {
        EXPECT_FAULT("mov 0x40000020, %%rax");
        all_pf &= last.vector == 14;
    }
    check(all_pf && last.count == c0 + 5, "five #PF in a row, each delivered as #PF");

    EXPECT_FAULT("int3");
    check(last.vector == 3 && last.rip == fault_at + 1, "INT3 traps with RIP after it (%lx)", last.rip);
    check(in_stack(last.frame_at, ist1_stack, sizeof(ist1_stack)), "INT3 ran on its IST stack (%lx)", last.frame_at);
    check(((uint64_t)(uintptr_t)&((struct frame *)(uintptr_t)last.frame_at)->ss + 8) % 16 == 0,
          "frame top is 16-byte aligned");

    asm volatile("sti");
    EXPECT_FAULT("int $0x40");
    check(last.vector == 0x40 && (last.handler_rflags & 0x200), "trap gate keeps IF (%lx)", last.handler_rflags);
    EXPECT_FAULT("int $0x41");
    check(last.vector == 0x41 && !(last.handler_rflags & 0x200) && (last.rflags & 0x200),
          "interrupt gate clears IF, frame keeps it (%lx)", last.handler_rflags);
    asm volatile("cli");

    /* A #PF whose gate is not present: #NP during delivery of #PF makes #DF. */
    idt[14].type &= 0x7f;
    EXPECT_FAULT("mov 0x40000030, %%rax");
    idt[14].type |= 0x80;
    check(last.vector == 8 && last.error == 0, "#PF + #NP during delivery = #DF (%lx)", last.vector);
    check(in_stack(last.frame_at, ist2_stack, sizeof(ist2_stack)), "#DF ran on its IST stack");

    ring3_trip();
    return verdict();
}
