/* smc: code rewritten through another virtual mapping of its page is what
 * runs next, as Linux's text_poke writes kernel text through a temporary
 * alias. Unicorn lets stores to pages without translated code skip its
 * code check; pvhvm gives that fast path to executable pages too (stores
 * to Linux's .data and .bss) and must take it back from every alias when a
 * page gets code. The set_timer_op calls end the engine's run (where the
 * host lets stores through), so each case checks a different order of
 * store, end of run and translation. Also prints the cost of a store
 * stream to an executable page and to the same page through its alias. */
#include "common/lib.h"

#define HYPERVISOR_set_timer_op 15
#define PAGE 4096
#define ALIAS_BASE (1UL << 30) /* pdpt[1]: past the 1 GiB the boot code maps */

/* pml4[256]: the same mappings again in the upper half, where 64-bit
 * kernels run and Unicorn no longer re-protects a new block's page itself. */
#define UPPER_HALF 0xffff800000000000UL

extern uint64_t boot_pml4[512], boot_pdpt[512];
static uint64_t alias_pd[512] __attribute__((aligned(PAGE)));
static volatile uint8_t code[9][PAGE] __attribute__((aligned(PAGE)));
static volatile uint8_t data[64][PAGE] __attribute__((aligned(PAGE)));
static uintptr_t region; /* the 2 MiB region of code[] */

static volatile uint8_t *alias(volatile void *p) { return (volatile uint8_t *)(ALIAS_BASE + ((uintptr_t)p - region)); }
static volatile uint8_t *upper(volatile void *p) { return (volatile uint8_t *)(UPPER_HALF + (uintptr_t)p); }

/* The host's run ends here: the next store starts a new run. */
static void end_run(void) { hypercall(HYPERVISOR_set_timer_op, 0, 0, 0, 0, 0); }

/* mov eax, imm32 ; ret */
static void put_return(volatile uint8_t *at, uint32_t value)
{
    at[0] = 0xb8;
    for (int i = 0; i < 4; i++)
        at[1 + i] = value >> (8 * i);
    at[5] = 0xc3;
}

static uint32_t call(volatile void *at) { return ((uint32_t(*)(void))(uintptr_t)at)(); }

int guest_main(uint32_t start_info)
{
    (void)start_info;
    region = (uintptr_t)code & ~0x1fffffUL;
    check((uintptr_t)&code[8][PAGE - 1] < region + 0x400000, "code[] within the alias");
    for (int i = 0; i < 512; i++)
        alias_pd[i] = (region + ((uint64_t)i << 21)) | 0x87;
    boot_pdpt[1] = (uintptr_t)alias_pd | 7;
    boot_pml4[256] = boot_pml4[0];
    asm volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");

    /* 1. Same address: written, run, rewritten, run. */
    put_return(code[0], 1);
    check(call(code[0]) == 1, "same address: first code runs");
    put_return(code[0], 2);
    check(call(code[0]) == 2, "same address: rewritten code runs");

    /* 2. The alias is written while the page has no code, the run ends
     * (the alias's entry gets the fast path), the page is translated
     * through the other address, then rewritten through the alias. */
    put_return(alias(code[1]), 10);
    end_run();
    check(call(code[1]) == 10, "alias: code written before translation runs");
    put_return(alias(code[1]), 11);
    check(call(code[1]) == 11, "alias: rewritten after translation, same run");
    end_run();
    put_return(alias(code[1]), 12);
    check(call(code[1]) == 12, "alias: rewritten after translation, next run");

    /* 3. A stream of stores through the alias first (its offset becomes
     * known, so stores there get the fast path within the run), then code. */
    for (int i = 0; i < PAGE; i++)
        alias(code[2])[i] = 0xcc;
    end_run();
    for (int i = 0; i < PAGE; i++)
        alias(code[3])[i] = 0x90;
    put_return(alias(code[3]) + PAGE - 6, 20);
    check(call(code[3]) == 20, "alias: a page of NOPs then the code runs");
    put_return(alias(code[3]) + PAGE - 6, 21);
    check(call(code[3]) == 21, "alias: its end rewritten runs");
    alias(code[3])[5] = 0xc3; /* mov eax, 0x90909090 ; ret */
    alias(code[3])[0] = 0xb8;
    check(call(code[3]) == 0x90909090, "alias: its start rewritten runs");

    /* 4. One instruction across two pages, its second half rewritten
     * through the alias (the block's second page is code too). */
    volatile uint8_t *across = code[5] - 3; /* b8 xx xx | xx xx c3 */
    put_return(across, 0x11223344);
    end_run();
    check(call(across) == 0x11223344, "across pages: first code runs");
    alias(code[5])[0] = 0x55; /* byte 2 of the immediate */
    check(call(across) == 0x11553344, "across pages: second page rewritten through the alias runs");
    end_run();
    alias(code[5])[1] = 0x66;
    check(call(across) == 0x66553344, "across pages: rewritten after a run ends");

    /* 5. In the upper half: a page written while it has no code (its
     * entry gets the fast path), then run and rewritten at one address;
     * then a second block on that page. */
    volatile uint8_t *up = upper(code[6]);
    for (int i = 0; i < PAGE; i++)
        up[i] = 0x90;
    end_run();
    put_return(up + PAGE - 6, 30);
    check(call(up) == 30, "upper half: a page of NOPs then the code runs");
    put_return(up + PAGE - 6, 31);
    check(call(up) == 31, "upper half: rewritten in the same run");
    end_run();
    put_return(up + PAGE - 6, 32);
    check(call(up) == 32, "upper half: rewritten in the next run");
    put_return(up + 64, 33);
    check(call(up + 64) == 33, "upper half: a second block on the page runs");
    put_return(up + 64, 34);
    check(call(up + 64) == 34, "upper half: the second block rewritten runs");

    /* 6. Store streams to executable pages (every page here is), timed. */
    uint64_t t0 = rdtsc();
    for (int round = 0; round < 4; round++)
        for (int i = 0; i < 64 * PAGE; i += 8)
            *(volatile uint64_t *)&data[0][i] = i;
    uint64_t t1 = rdtsc();
    for (int round = 0; round < 4; round++)
        for (int i = 0; i < 64 * PAGE; i += 8)
            *(volatile uint64_t *)alias(&data[0][i]) = i;
    uint64_t t2 = rdtsc();
    check(data[63][PAGE - 8] == ((63 * PAGE + PAGE - 8) & 0xff), "the stores landed");
    printk("store stream: %lu TSC ticks per store direct, %lu through the alias\n",
           (t1 - t0) / (4 * 64 * PAGE / 8), (t2 - t1) / (4 * 64 * PAGE / 8));
    return verdict();
}
