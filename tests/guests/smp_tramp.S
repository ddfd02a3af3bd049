/*
 * SMP guest: the real-mode trampoline a start-up IPI enters, and the 64-bit
 * entry points of the application processors.
 *
 * The BSP copies tramp_start..tramp_end to TRAMP_BASE (0x8000) and sends
 * STARTUP with vector 8: the AP starts in real mode at CS = 0x800, IP = 0.
 * It counts its entry (tramp_count, in the copy), loads the trampoline's
 * GDT, goes to 32-bit protected mode, turns on PAE, EFER.LME and paging
 * with the BSP's page tables (boot_pml4), far-jumps to a 64-bit code
 * segment and leaves for ap_sipi_entry64 with the id and stack the BSP put
 * in ap_boot_id / ap_boot_stack.
 */
#include "common/asm.h"
#define TRAMP_BASE 0x8000
#define T(x) (TRAMP_BASE + (x) - tramp_start)

    .section .rodata
    .p2align 4
    .globl tramp_start, tramp_end, tramp_count
    .code16
tramp_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lock incw (tramp_count - tramp_start)
    lgdtl (tramp_gdtr - tramp_start)
    movl %cr0, %eax
    orl $1, %eax                    /* PE */
    movl %eax, %cr0
    ljmpl $0x08, $T(tramp32)

    .code32
tramp32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    ENABLE_LONG_MODE_PAGING
    ljmp $0x18, $T(tramp64)

    .code64
tramp64:
    movabsq $ap_sipi_entry64, %rax
    jmp *%rax

    .p2align 3
tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff        /* 0x08 code, 32-bit */
    .quad 0x00cf92000000ffff        /* 0x10 data */
    .quad 0x00af9a000000ffff        /* 0x18 code, 64-bit */
tramp_gdtr:
    .word tramp_gdtr - tramp_gdt - 1
    .long T(tramp_gdt)
tramp_count:
    .word 0
tramp_end:

    .text
/* From the trampoline: id and stack from the BSP's mailbox. */
    .globl ap_sipi_entry64
ap_sipi_entry64:
    movl ap_boot_id(%rip), %edi
    movq ap_boot_stack(%rip), %rsp
    /* fall through */

/* From VCPUOP_initialise (64-bit mode, flat segments, no GDT or IDT):
 * %rdi = the vCPU id, %rsp = its stack. Load the guest's GDT, reload every
 * segment from it, then ap_main(id). */
    .globl ap_entry64
ap_entry64:
    lgdt gdt64_ptr(%rip)
    LOAD_KERNEL_DATA_SEGMENTS
    pushq $0x08
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:  xorl %ebp, %ebp
    call ap_main
2:  cli
    hlt
    jmp 2b
