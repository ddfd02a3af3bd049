/*
 * PVH entry for pvhvm's test guests: 32-bit flat protected mode, paging off,
 * EBX = hvm_start_info. Map the first 1 GiB with 2 MiB pages (user-accessible,
 * so ring-3 tests can run anywhere), enter long mode, call guest_main().
 */
#include "common/asm.h"
#define XEN_ELFNOTE_PHYS32_ENTRY 18

    .section .note.Xen, "a", @note
    .align 4
    .long 4, 4, XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .long _start32

    .section .text.boot, "ax"
    .code32
    .globl _start32
_start32:
    cli
    movl %ebx, start_info_pa

    /* pml4[0] -> pdpt, pdpt[0] -> pd, pd[i] = i * 2 MiB (P | RW | US | PS) */
    movl $boot_pdpt, %eax
    orl $7, %eax
    movl %eax, boot_pml4
    movl $boot_pd, %eax
    orl $7, %eax
    movl %eax, boot_pdpt
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x87, %eax
    movl %eax, boot_pd(,%ecx,8)
    movl $0, boot_pd+4(,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jne 1b

    ENABLE_LONG_MODE_PAGING
    lgdt gdt64_ptr
    ljmp $0x08, $start64

    .code64
start64:
    LOAD_KERNEL_DATA_SEGMENTS
    leaq boot_stack_top(%rip), %rsp
    movl start_info_pa(%rip), %edi
    call guest_main
    movl %eax, %edi
    call guest_exit
2:  hlt
    jmp 2b

    .section .data
    .align 16
    .globl gdt64
gdt64:
    .quad 0                         /* 0x00 */
    .quad 0x00af9b000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf93000000ffff        /* 0x10 kernel data */
    .quad 0x00cffb000000ffff        /* 0x18 user code, 32-bit (SYSRET's STAR base) */
    .quad 0x00cff3000000ffff        /* 0x20 user data (| 3 = 0x23) */
    .quad 0x00affb000000ffff        /* 0x28 user code, 64-bit (| 3 = 0x2b) */
    .quad 0, 0                      /* 0x30 TSS, filled in by guests that need one */
    .quad 0, 0
gdt64_end:
    .globl gdt64_ptr
gdt64_ptr:
    .word gdt64_end - gdt64 - 1
    .quad gdt64

    .globl start_info_pa
start_info_pa:
    .long 0

    .section .bss
    .align 4096
    .globl boot_pml4, boot_pdpt, boot_pd
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd:   .skip 4096
boot_stack: .skip 16384
boot_stack_top:
