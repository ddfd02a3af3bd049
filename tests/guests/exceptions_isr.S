/* Interrupt and SYSCALL entry points for the exceptions guest. Each ISR stub
 * pushes a dummy error code when the CPU does not, then its vector, saves the
 * general registers and calls isr_handler(struct frame *). */

.macro ISR vec, has_err=0
    .globl isr\vec
isr\vec:
    .if \has_err == 0
    pushq $0
    .endif
    pushq $\vec
    jmp isr_common
.endm

    .text
ISR 0
ISR 1
ISR 2
ISR 3
ISR 4
ISR 5
ISR 6
ISR 7
ISR 8, 1
ISR 9
ISR 10, 1
ISR 11, 1
ISR 12, 1
ISR 13, 1
ISR 14, 1
ISR 15
ISR 16
ISR 17, 1
ISR 18
ISR 19
ISR 20
ISR 21, 1
ISR 64
ISR 65
ISR 128
ISR 129

isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call isr_handler
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

/* SYSCALL lands here in ring 0 on the user's stack. */
    .globl syscall_entry
syscall_entry:
    movq %rsp, syscall_user_rsp(%rip)
    leaq syscall_stack_top(%rip), %rsp
    pushq %rcx
    pushq %r11
    movq %rcx, %rsi
    movq %r11, %rdx
    movq %rax, %rdi
    pushfq
    popq %rcx
    call syscall_handler
    popq %r11
    popq %rcx
    movq syscall_user_rsp(%rip), %rsp
    sysretq

/* Ring-3 code: a SYSCALL, a hypercall attempt, a supervisor-page read, an
 * INT through a DPL-0 gate, then INT 0x80 back to the kernel. */
    .globl user_entry, user_after_syscall, user_fault_insn, user_after_fault, user_gp_insn, user_after_gp
user_entry:
    movq $42, %rax
    syscall
user_after_syscall:
    movw %cs, %ax
    movw %ax, user_cs_after_sysret(%rip)
    movq $17, %rax                  /* xen_version(XENVER_version) from ring 3 */
    xorl %edi, %edi
    vmcall
    movq %rax, user_hypercall_result(%rip)
user_fault_insn:
    movq 0x40002000, %rbx           /* supervisor-only page: #PF (P|U) */
user_after_fault:
user_gp_insn:
    int $0x81                       /* gate DPL 0: #GP(0x81 * 8 + 2) */
user_after_gp:
    int $0x80                       /* back to the kernel */
1:  jmp 1b

    .bss
    .align 16
syscall_user_rsp: .quad 0
    .skip 4096
syscall_stack_top:
