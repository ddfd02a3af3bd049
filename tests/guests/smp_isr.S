/*
 * SMP guest: one 16-byte entry stub per vector (isr_stubs + 16 * vector),
 * each pushing a zero error code where the CPU pushes none, then the
 * vector, and a common path that saves the caller-saved registers and
 * calls isr_dispatch(frame) (struct frame in smp.c).
 */
#include "common/asm.h"
    .macro STUB
    .p2align 4
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .endm

    .text
    .p2align 4
    .globl isr_stubs
isr_stubs:
    vec = 0
    .rept 256
    STUB
    vec = vec + 1
    .endr

isr_common:
    PUSH_CALLER_SAVED
    movq %rsp, %rdi
    cld
    call isr_dispatch
    POP_CALLER_SAVED
    addq $16, %rsp
    iretq
