/* The upcall vector's entry for the fifo guest. */
#include "common/asm.h"
    .text
    .globl upcall_entry
upcall_entry:
    PUSH_CALLER_SAVED
    cld
    call upcall_handler
    POP_CALLER_SAVED
    iretq
