/*
 * Entry stubs of bootcheck and memtouch. Three ways in, one 64-bit C main (tg_main):
 *   pvh_entry      32-bit, paging off (PVH; named by the note in pvh_note.S)
 *   linux64_entry  64-bit (Linux 64-bit boot protocol, ELF e_entry)
 *   bzimage_entry  64-bit, at image offset 0x200 (Linux 64-bit boot protocol, bzImage)
 * Each first records the entry state into boot_state (in .data, so zeroing .bss keeps it), then
 * zeroes .bss (the loaders copy only the file: .bss memory is whatever was there) and calls
 * tg_main. The page tables for [0, 4 GiB) are built at assembly time (.data below), not by a loop.
 */
#include "tg.h"

#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define CR0_PE 0x1
#define CR0_PG 0x80000000
#define CR4_PAE 0x20
#define PTE_P 0x1
#define PTE_RW 0x2
#define PTE_PWT 0x8
#define PTE_PCD 0x10
#define PTE_PS 0x80
#define MMIO_GAP 0xd0000000 /* [0xd000_0000, 4 GiB): devices, LAPIC: mapped uncached */

/* Zero .bss (C statics only: page tables are in .data, the stack in .noinit), 4 bytes a store.
 * Valid in 32- and 64-bit code. Kept short: under PVM (the KVM of our CI hosts) these early
 * loops run at roughly a microsecond per instruction. */
.macro ZERO_BSS
        mov $__bss_start, %edi
        mov $__bss_end, %ecx
        xor %eax, %eax
        jmp 2f
1:      mov %eax, (%edi)
        add $4, %edi
2:      cmp %ecx, %edi
        jb 1b
.endm


/* ---------------------------------------------------------------------------------------------
 * The image's first 0x200 bytes (0x100000): in a bzImage, offset 0 is the 32-bit entry
 * (code32_start) a 16-bit setup would jump to, offset 0x200 the 64-bit entry. We only support the
 * latter; anything arriving at offset 0 stops. guest.ld puts .head.text first and asserts where
 * bzimage_entry ends up. */
        .section .head.text, "ax"
        .code32
        .globl startup_32
startup_32:
        cli
1:      hlt
        jmp 1b

        .org 0x200
        .code64
        .globl bzimage_entry
bzimage_entry:
        mov %rax, boot_state+BS_GPR+0*8(%rip)   /* first: rax is one of the checked registers */
        mov $ENTRY_BZIMAGE, %eax
        jmp save64

/* --------------------------------------------------------------------------------------------- */
        .text
        .code64
        .globl linux64_entry
linux64_entry:
        mov %rax, boot_state+BS_GPR+0*8(%rip)
        mov $ENTRY_LINUX64, %eax
save64:
        /* Nothing so far changed flags or any register but rax. */
        mov %rax, boot_state+BS_KIND(%rip)
        mov %rcx, boot_state+BS_GPR+1*8(%rip)
        mov %rdx, boot_state+BS_GPR+2*8(%rip)
        mov %rbx, boot_state+BS_GPR+3*8(%rip)
        mov %rsp, boot_state+BS_GPR+4*8(%rip)
        mov %rbp, boot_state+BS_GPR+5*8(%rip)
        mov %rsi, boot_state+BS_GPR+6*8(%rip)
        mov %rdi, boot_state+BS_GPR+7*8(%rip)
        mov %r8, boot_state+BS_GPR+8*8(%rip)
        mov %r9, boot_state+BS_GPR+9*8(%rip)
        mov %r10, boot_state+BS_GPR+10*8(%rip)
        mov %r11, boot_state+BS_GPR+11*8(%rip)
        mov %r12, boot_state+BS_GPR+12*8(%rip)
        mov %r13, boot_state+BS_GPR+13*8(%rip)
        mov %r14, boot_state+BS_GPR+14*8(%rip)
        mov %r15, boot_state+BS_GPR+15*8(%rip)
        lea stack_top(%rip), %rsp               /* our own stack: do not write the VMM's */
        pushfq
        popq boot_state+BS_RFLAGS(%rip)
        mov %cr0, %rax
        mov %rax, boot_state+BS_CR0(%rip)
        mov %cr3, %rax
        mov %rax, boot_state+BS_CR3(%rip)
        mov %cr4, %rax
        mov %rax, boot_state+BS_CR4(%rip)
        mov $MSR_EFER, %ecx
        rdmsr
        mov %eax, boot_state+BS_EFER(%rip)
        mov %edx, boot_state+BS_EFER+4(%rip)
        mov %cs, boot_state+BS_CS(%rip)
        mov %ds, boot_state+BS_DS(%rip)
        mov %es, boot_state+BS_ES(%rip)
        mov %fs, boot_state+BS_FS(%rip)
        mov %gs, boot_state+BS_GS(%rip)
        mov %ss, boot_state+BS_SS(%rip)
        sgdt boot_state+BS_GDTR(%rip)
        sidt boot_state+BS_IDTR(%rip)
        ZERO_BSS
        call tg_main
        jmp halt_forever

/* --------------------------------------------------------------------------------------------- */
        .code32
        .globl pvh_entry
pvh_entry:
        mov %eax, boot_state+BS_GPR+0*8
        mov %ebx, boot_state+BS_GPR+3*8         /* hvm_start_info */
        mov $stack_top, %esp                    /* PVH gives no stack */
        pushfl
        popl boot_state+BS_RFLAGS
        movl $ENTRY_PVH, boot_state+BS_KIND
        mov %cr0, %eax
        mov %eax, boot_state+BS_CR0
        mov %cr3, %eax
        mov %eax, boot_state+BS_CR3
        mov %cr4, %eax
        mov %eax, boot_state+BS_CR4
        mov $MSR_EFER, %ecx
        rdmsr
        mov %eax, boot_state+BS_EFER
        mov %edx, boot_state+BS_EFER+4
        mov %cs, boot_state+BS_CS
        mov %ds, boot_state+BS_DS
        mov %es, boot_state+BS_ES
        mov %fs, boot_state+BS_FS
        mov %gs, boot_state+BS_GS
        mov %ss, boot_state+BS_SS
        sgdt boot_state+BS_GDTR
        sidt boot_state+BS_IDTR
        ZERO_BSS
        /* Long mode: PAE, CR3, EFER.LME, then paging; our own GDT for a 64-bit CS (the PVH GDT
         * only has a 32-bit one). */
        mov %cr4, %eax
        or $CR4_PAE, %eax
        mov %eax, %cr4
        mov $pt_pml4, %eax
        mov %eax, %cr3
        mov $MSR_EFER, %ecx
        rdmsr
        or $EFER_LME, %eax
        wrmsr
        lgdt gdt64_ptr
        mov %cr0, %eax
        or $(CR0_PG | CR0_PE), %eax
        mov %eax, %cr0
        ljmp $0x08, $1f
        .code64
1:      mov $0x10, %eax
        mov %eax, %ds
        mov %eax, %es
        mov %eax, %ss
        mov %eax, %fs
        mov %eax, %gs
        call tg_main
        jmp halt_forever

/* --------------------------------------------------------------------------------------------- */
/* Exceptions (after install_idt in rt.c): one 16-byte stub per vector 0..31 pushes a dummy error
 * code where the CPU pushes none, then the vector, and calls tg_exception(frame), which reports
 * and resets (a bare triple fault would say nothing about what went wrong). */
        .altmacro
.macro EXC_STUB v
        .balign 16
        .if !((\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30))
        pushq $0
        .endif
        pushq $\v
        jmp exc_common
.endm
        .balign 16
        .globl exc_stubs
exc_stubs:
        .set vec, 0
        .rept 32
        EXC_STUB %vec
        .set vec, vec + 1
        .endr
exc_common:
        mov %rsp, %rdi          /* -> vector, error code, rip, cs, rflags, rsp, ss */
        and $-16, %rsp
        call tg_exception
        jmp halt_forever

/* --------------------------------------------------------------------------------------------- */
        .section .rodata
        .balign 8
gdt64:  .quad 0
        .quad 0x00af9b000000ffff        /* 0x08: 64-bit code */
        .quad 0x00cf93000000ffff        /* 0x10: data */
gdt64_ptr:
        .word gdt64_ptr - gdt64 - 1
        .long gdt64

        .data
        .balign 8
        .globl boot_state
boot_state:
        .fill BS_SIZE, 1, 0

/* Identity map of [0, 4 GiB) with 2 MiB pages, the MMIO gap [0xd000_0000, 4 GiB) uncached (the
 * LAPIC page is read through it). The PVH entry loads it as is; the Linux 64-bit entries keep the
 * VMM's map of [0, 1 GiB) and hang pt_pd[1..3] into its PDPT (map_above_1g in rt.c). */
        .balign 4096
        .globl pt_pml4, pt_pdpt, pt_pd
pt_pml4:
        .quad pt_pdpt + PTE_P + PTE_RW
        .fill 511, 8, 0
pt_pdpt:
        .quad pt_pd + 0 * 4096 + PTE_P + PTE_RW
        .quad pt_pd + 1 * 4096 + PTE_P + PTE_RW
        .quad pt_pd + 2 * 4096 + PTE_P + PTE_RW
        .quad pt_pd + 3 * 4096 + PTE_P + PTE_RW
        .fill 508, 8, 0
pt_pd:
        .set page, 0
        .rept MMIO_GAP >> 21
        .quad (page << 21) + PTE_P + PTE_RW + PTE_PS
        .set page, page + 1
        .endr
        .rept 2048 - (MMIO_GAP >> 21)
        .quad (page << 21) + PTE_P + PTE_RW + PTE_PS + PTE_PCD + PTE_PWT
        .set page, page + 1
        .endr

        /* Not zeroed, not in the file. */
        .section .noinit, "aw", @nobits
        .balign 16
stack:   .skip STACK_SIZE
stack_top:

        .section .note.GNU-stack, "", @progbits
