/* Entry points for the events guest: the upcall vector, the way back from
 * ring 3 (INT 0x80), and the ring-3 spin loops. */
    .text
    .globl upcall_entry
upcall_entry:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    movq 72(%rsp), %rdi         /* interrupted RIP */
    movq 80(%rsp), %rsi         /* interrupted CS */
    cld
    call upcall_handler
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
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

