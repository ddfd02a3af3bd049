/* Entry points for the events guest: the upcall vector, the way back from
 * ring 3 (INT 0x80), and the ring-3 spin loops; 64-bit, or 32-bit for the
 * i386 builds. */
#include "common/asm.h"
    .text
#ifdef __x86_64__
    .globl upcall_entry
upcall_entry:
    PUSH_CALLER_SAVED
    movq 72(%rsp), %rdi         /* interrupted RIP */
    movq 80(%rsp), %rsi         /* interrupted CS */
    cld
    call upcall_handler
    POP_CALLER_SAVED
    iretq

    .globl ret_from_user
ret_from_user:
    movq back_rip(%rip), %rax
    movq %rax, 0(%rsp)
    movq $0x08, 8(%rsp)
    movq $0x2, 16(%rsp)
    movq back_rsp(%rip), %rax
    movq %rax, 24(%rsp)
    movq $0x10, 32(%rsp)
    iretq

/* Spin in ring 3 with IF=1 until the upcall handler sets `upcalls_seen`
 * past the count it had on entry (in %rbx), then go back to the kernel. */
    .globl user_spin
user_spin:
1:  cmpq upcalls_seen(%rip), %rbx
    je 1b
    int $0x80
2:  jmp 2b

/* Ring-3 stress for preemption: %rbx rounds of a read-modify-write on
 * memory, a few thousand instructions of other work (so that most stops
 * land in ring 3) and a SYSCALL, then back to the kernel. A stop that tore an instruction
 * would count an increment twice; one that lost a SYSCALL, a call short. */
    .globl user_stress
user_stress:
1:  incq user_incs(%rip)
    movq $200, %rcx
3:  .rept 16
    addq $1, %rdx
    .endr
    decq %rcx
    jnz 3b
    .rept 64
    addq $1, %rdx
    .endr
    movq $7, %rax
    syscall
    decq %rbx
    jnz 1b
    int $0x80
2:  jmp 2b

/* Its SYSCALL target: count, and straight back (user stack, IF masked). */
    .globl stress_syscall_entry
stress_syscall_entry:
    incq kernel_syscalls(%rip)
    sysretq

#else /* 32-bit protected mode */

    .globl upcall_entry
upcall_entry:
    pushl %eax
    pushl %ecx
    pushl %edx                  /* interrupted EIP at 12(%esp), CS at 16 */
    pushl 16(%esp)              /* cs */
    pushl 16(%esp)              /* eip (moved up by the push) */
    cld
    call upcall_handler
    addl $8, %esp
    popl %edx
    popl %ecx
    popl %eax
    iret

/* From ring 3 by INT 0x80: the kernel's segments, stack and return point. */
    .globl ret_from_user
ret_from_user:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movl back_rsp, %esp
    jmp *back_rip

    .globl user_spin
user_spin:
1:  cmpl upcalls_seen, %ebx
    je 1b
    int $0x80
2:  jmp 2b

#endif
