/*
 * hcfuzz guest: one 16-byte entry stub per vector (isr_stubs + 16 * vector)
 * calling hcfuzz_isr(vector, rip) with the caller-saved registers saved.
 * 64-bit: every vector has a gate (a zero error code is pushed where the
 * CPU pushes none). 32-bit: only the NMI and vectors 32-255 come here;
 * common/boot32.S's stubs keep the other exceptions.
 */
#include "common/asm.h"

    .text
#ifdef __x86_64__
    .macro STUB
    .p2align 4
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .endm

isr_common:
    PUSH_CALLER_SAVED
    movq 72(%rsp), %rdi             /* vector */
    movq 88(%rsp), %rsi             /* rip */
    cld
    call hcfuzz_isr
    POP_CALLER_SAVED
    addq $16, %rsp
    iretq
#else
    .macro STUB
    .p2align 4
    pushl $vec
    jmp isr_common
    .endm

isr_common:
    pushal
    cld
    movl 32(%esp), %eax             /* vector */
    movl 36(%esp), %edx             /* eip */
    subl $4, %esp                   /* 16-byte aligned at the call */
    pushl %edx
    pushl %eax
    call hcfuzz_isr
    addl $12, %esp
    popal
    addl $4, %esp
    iret
#endif

/* The table: STUB, as this width defines it, for every vector. */
    .p2align 4
    .globl isr_stubs
isr_stubs:
    vec = 0
    .rept 256
    STUB
    vec = vec + 1
    .endr

/* Secondary vCPUs start here (VCPUOP_initialise): segments and the IDT as
 * vCPU 0 has them, then ap_main(id) on the stack the context gave. */
#ifdef __x86_64__
    .globl ap_entry
ap_entry:
    lgdt gdt64_ptr(%rip)
    LOAD_KERNEL_DATA_SEGMENTS
    pushq $0x08
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:  lidt idt_ptr(%rip)
    xorl %ebp, %ebp
    call ap_main
2:  cli
    hlt
    jmp 2b
#else
    .globl ap_entry
ap_entry:
    lgdt gdt32_ptr
    ljmp $0x08, $1f
1:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    lidt idt32_ptr
    subl $12, %esp
    pushl %edi                      /* the id, from the context's EDI */
    call ap_main
2:  cli
    hlt
    jmp 2b
#endif
