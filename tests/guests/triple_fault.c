/* triple_fault: an IDT that cannot deliver anything. INT3 finds no gate (#GP),
 * the #GP finds no gate (#DF), the #DF finds none: the vCPU shuts down. */
#include "common/lib.h"

int guest_main(uint32_t start_info)
{
    (void)start_info;
    struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idtr = { 0, 0 };
    print("loading an empty IDT and raising #BP\n");
    asm volatile("lidt %0; int3" :: "m"(idtr));
    print("still alive: the triple fault did not happen\n");
    return SHUTDOWN_crash;
}
