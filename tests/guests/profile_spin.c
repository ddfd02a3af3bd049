/* profile_spin: spends its time in known functions, for the guest profiler
 * (tests/test_profile.py). guest_main -> spin_outer -> spin_inner, which
 * counts for a while; then guest_main -> spin_other counts a quarter as
 * long. Built with frame pointers and without sibling calls (build.py's
 * GUEST_FLAGS), so a sample in spin_inner unwinds to spin_outer and
 * guest_main. */
#include "common/lib.h"

#define SPIN_ROUNDS 12000000UL

volatile unsigned long spin_count;
volatile unsigned long spin_ticks;

__attribute__((noinline)) void spin_tick(void)
{
    spin_ticks++;
}

/* Not a leaf (GCC sets up no frame in a leaf, whatever the flags say). */
__attribute__((noinline)) void spin_inner(unsigned long rounds)
{
    for (unsigned long i = 0; i < rounds; i++) {
        spin_count++;
        if ((i & 0xfffff) == 0)
            spin_tick();
    }
}

__attribute__((noinline)) void spin_outer(unsigned long rounds)
{
    spin_inner(rounds);
    asm volatile("" ::: "memory"); /* keep the frame: no tail call */
}

__attribute__((noinline)) void spin_other(unsigned long rounds)
{
    for (unsigned long i = 0; i < rounds; i++)
        spin_count--;
}

int guest_main(uint32_t start_info)
{
    (void)start_info;
    printk("profile_spin: spinning\n");
    spin_outer(SPIN_ROUNDS);
    spin_other(SPIN_ROUNDS / 4);
    check(spin_count == SPIN_ROUNDS - SPIN_ROUNDS / 4, "spin count %lu", spin_count);
    return verdict();
}
