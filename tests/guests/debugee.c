/* debugee: a target for the GDB stub (tests/test_gdbstub.py). A known
 * function, `tick`, called in a loop adds to a global counter; the guest
 * checks the total for the rounds it made and powers off. The number of
 * rounds is `rounds` (command line "rounds=N", default 200), read again at
 * every round so that a debugger may end the loop by writing it. */
#include "common/xen.h"

volatile uint64_t counter;
volatile uint64_t rounds;

__attribute__((noinline)) void tick(uint64_t step)
{
    counter += step;
    __asm__ volatile("" ::: "memory");
}

int guest_main(uint32_t start_info)
{
    rounds = cmdline_arg(start_info, "rounds", 200);
    print("debugee: counting\n");
    uint64_t i;
    for (i = 1; i <= rounds; i++)
        tick(i);
    i--;
    check(counter == i * (i + 1) / 2, "counter %lu after %lu rounds", counter, i);
    printk("debugee: counter %lu after %lu rounds\n", counter, i);
    return failures() ? SHUTDOWN_crash : SHUTDOWN_poweroff;
}
