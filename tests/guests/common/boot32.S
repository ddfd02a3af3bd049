/*
 * PVH entry for pvhvm's 32-bit test guests: the guest stays in 32-bit
 * protected mode. One of three builds (build.py passes the -D):
 *   BOOT32_NOPAGING  paging off, linear = physical
 *   BOOT32_PSE       2-level paging, 4 MiB PSE pages
 *   BOOT32_PAE       PAE paging, 2 MiB pages
 * The paged builds identity-map the first 1 GiB (user-accessible) and
 * nothing above, as common/boot.S does for the 64-bit guests. idt32 holds
 * 32-bit gates for the exceptions (guest_exception() in common/lib.c).
 * EBX = hvm_start_info; guest_main(start_info) is called cdecl.
 */
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
    lgdt gdt32_ptr
    ljmp $0x08, $1f
1:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movl $boot_stack_top, %esp

#if defined(BOOT32_PSE)
    /* pd[i] = i * 4 MiB (P | RW | US | PS), i < 256 */
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $22, %eax
    orl $0x87, %eax
    movl %eax, boot_pd(,%ecx,4)
    incl %ecx
    cmpl $256, %ecx
    jne 2b
    movl %cr4, %eax
    orl $0x10, %eax                 /* PSE */
    movl %eax, %cr4
    movl $boot_pd, %eax
    movl %eax, %cr3
    movl %cr0, %eax
    orl $0x80010001, %eax           /* PG | WP | PE */
    movl %eax, %cr0
#elif defined(BOOT32_PAE)
    /* A PDPTE holds only P (and cache bits): RW/US live in the lower levels. */
    movl $boot_pd, %eax
    orl $1, %eax
    movl %eax, boot_pdpt
    /* pd[i] = i * 2 MiB (P | RW | US | PS), i < 512 */
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x87, %eax
    movl %eax, boot_pd(,%ecx,8)
    movl $0, boot_pd+4(,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jne 2b
    movl %cr4, %eax
    orl $0x20, %eax                 /* PAE */
    movl %eax, %cr4
    movl $boot_pdpt, %eax
    movl %eax, %cr3
    movl %cr0, %eax
    orl $0x80010001, %eax           /* PG | WP | PE */
    movl %eax, %cr0
#elif !defined(BOOT32_NOPAGING)
#error "build with one of BOOT32_NOPAGING, BOOT32_PSE, BOOT32_PAE"
#endif

    /* The exception vectors 0-31 to exc_stubs; guests add their own gates. */
    xorl %ecx, %ecx
4:  movl %ecx, %eax
    shll $4, %eax
    addl $exc_stubs, %eax
    movl %eax, %edx
    andl $0xffff, %eax
    orl $0x00080000, %eax           /* selector 0x08 */
    andl $0xffff0000, %edx
    orl $0x8e00, %edx               /* P, DPL 0, 32-bit interrupt gate */
    movl %eax, idt32(,%ecx,8)
    movl %edx, idt32+4(,%ecx,8)
    incl %ecx
    cmpl $32, %ecx
    jne 4b
    lidt idt32_ptr

    subl $12, %esp                  /* 16-byte aligned at the call */
    pushl start_info_pa
    call guest_main
    addl $16, %esp
    subl $12, %esp
    pushl %eax
    call guest_exit
3:  hlt
    jmp 3b

/* One 16-byte stub per exception vector: push a zero error code where the
 * CPU pushes none, then the vector; guest_exception() gets the frame. */
    .align 16
exc_stubs:
    .set vec, 0
    .rept 32
    .align 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    pushl $vec
    .else
    pushl $0
    pushl $vec
    .endif
    jmp exc_common
    .set vec, vec + 1
    .endr

exc_common:
    pushal
    cld
    pushl %esp                      /* struct exc_frame * */
    call guest_exception
    addl $4, %esp
    popal
    addl $8, %esp                   /* vector, error code */
    iret

    .section .data
    .align 16
    .globl gdt32
gdt32:
    .quad 0                         /* 0x00 */
    .quad 0x00cf9b000000ffff        /* 0x08 kernel code, 32-bit */
    .quad 0x00cf93000000ffff        /* 0x10 kernel data */
    .quad 0x00cffb000000ffff        /* 0x18 user code, 32-bit (| 3 = 0x1b) */
    .quad 0x00cff3000000ffff        /* 0x20 user data (| 3 = 0x23) */
    .quad 0                         /* 0x28 unused (64-bit user code in boot.S) */
    .quad 0                         /* 0x30 TSS, filled in by guests that need one */
gdt32_end:
    .globl gdt32_ptr
gdt32_ptr:
    .word gdt32_end - gdt32 - 1
    .long gdt32

    .globl idt32_ptr
idt32_ptr:
    .word 256 * 8 - 1
    .long idt32

    .globl start_info_pa
start_info_pa:
    .long 0

    .section .bss
    .align 4096
    .globl boot_pd, boot_pdpt
boot_pd:   .skip 4096
boot_pdpt: .skip 32                 /* PAE: CR3 needs 32-byte alignment */
    .align 16
    .globl idt32
idt32:     .skip 256 * 8
    .align 16
boot_stack: .skip 16384
boot_stack_top:
