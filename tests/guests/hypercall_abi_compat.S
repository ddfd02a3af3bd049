/* hypercall_abi's way into compat mode (64-bit builds only): a hypercall
 * made from a 32-bit code segment of a long-mode guest takes the 32-bit
 * ABI, as Xen picks the ABI per call from the vCPU's mode (hvm_hypercall).
 *
 *   long compat_call(unsigned nr, uint32_t a1, uint32_t a2, uint32_t a3)
 *
 * runs VMCALL in the 32-bit code segment COMPAT_CS with EAX = nr, EBX = a1,
 * ECX = a2, EDX = a3, the upper halves of RAX and RBX holding garbage that a
 * 64-bit reading would trip on, and returns EAX sign-extended. */
#ifdef __x86_64__
#define COMPAT_CS 0x30  /* gdt64's TSS slot, unused by this guest */
    .text
    .globl compat_call
compat_call:
    pushq %rbx
    pushq %rbp
    movq %rsp, %rbp
    movabsq $0x5a5a000000000000, %r11
    movl %edi, %eax
    orq %r11, %rax
    movl %esi, %ebx
    orq %r11, %rbx
    xchgl %ecx, %edx              /* ECX = a2, EDX = a3 */
    movq %r11, %rsi               /* 64-bit argument registers: garbage */
    movq %r11, %rdi
    pushq $COMPAT_CS
    leaq 1f(%rip), %r11
    pushq %r11
    lretq
    .code32
1:  vmcall
    ljmp $0x08, $2f
    .code64
2:  movq %rbp, %rsp
    popq %rbp
    popq %rbx
    movslq %eax, %rax
    ret
#endif
