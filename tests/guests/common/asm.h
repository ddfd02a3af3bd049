/* Assembly the test guests share (included by their .S files). */

/* Save and restore the registers the SysV ABI lets a C call clobber
 * (an interrupt entry calls C with these saved: 9 quadwords). */
.macro PUSH_CALLER_SAVED
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
.endm

.macro POP_CALLER_SAVED
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
.endm

/* After loading gdt64 (common/boot.S): the kernel data segment in DS, ES
 * and SS, null FS and GS. */
.macro LOAD_KERNEL_DATA_SEGMENTS
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
.endm

/* From 32-bit protected mode: PAE, CR3 = boot_pml4 (common/boot.S's
 * identity map), EFER.LME, then paging on (PG | WP | PE). The far jump to
 * a 64-bit code segment that follows is the caller's. */
.macro ENABLE_LONG_MODE_PAGING
    movl %cr4, %eax
    orl $0x20, %eax                 /* PAE */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80010001, %eax           /* PG | WP | PE */
    movl %eax, %cr0
.endm
