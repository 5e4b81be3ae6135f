/*
 * The setup area of bootcheck.bzimage: boot sector + setup header, laid out as in Linux's
 * arch/x86/boot/header.S (offsets in Documentation/arch/x86/boot.rst). build.rs assembles it
 * to a flat (TG_SETUP_SECTS + 1) * 512 bytes, passing the sizes of the protected-mode image
 * (TG_SYSSIZE, TG_INIT_SIZE), and appends the protected-mode image (bootcheck.elf, flat).
 * Only the Linux 64-bit entry (xloadflags XLF_KERNEL_64: protected-mode image + 0x200) is supported.
 */
        .code16
        .text
        .globl _start
_start:
        .org 0x1f1
setup_sects:            .byte TG_SETUP_SECTS
root_flags:             .word 0
syssize:                .long TG_SYSSIZE        /* protected-mode image, 16-byte units */
ram_size:               .word 0
vid_mode:               .word 0
root_dev:               .word 0
boot_flag:              .word 0xaa55
        .org 0x200
jump:                   .byte 0xeb, start_of_setup - 1f  /* jmp short: real-mode entry */
1:
header:                 .ascii "HdrS"
version:                .word TG_BOOT_VERSION
realmode_swtch:         .long 0
start_sys_seg:          .word 0x1000            /* obsolete */
kernel_version:         .word 0                 /* 0: not a Linux kernel (no version string) */
type_of_loader:         .byte 0
loadflags:              .byte 0x01              /* LOADED_HIGH: protected-mode image at 1 MiB */
setup_move_size:        .word 0x8000
code32_start:           .long 0x100000
ramdisk_image:          .long 0
ramdisk_size:           .long 0
bootsect_kludge:        .long 0
heap_end_ptr:           .word 0
ext_loader_ver:         .byte 0
ext_loader_type:        .byte 0
cmd_line_ptr:           .long 0
initrd_addr_max:        .long 0x7fffffff
kernel_alignment:       .long 0x200000
relocatable_kernel:     .byte 0                 /* runs only at 0x100000 */
min_alignment:          .byte 21
xloadflags:             .word 0x0001            /* XLF_KERNEL_64 */
cmdline_size:           .long 4095              /* longest command line we take, without NUL */
hardware_subarch:       .long 0
hardware_subarch_data:  .quad 0
payload_offset:         .long 0
payload_length:         .long 0
setup_data:             .quad 0
pref_address:           .quad 0x100000
init_size:              .long TG_INIT_SIZE      /* bytes needed from 1 MiB, .bss included */
handover_offset:        .long 0
        .org 0x268                              /* end of the 2.12 header */

/* A 16-bit loader (a BIOS-style boot, e.g. QEMU's -kernel) enters here in real mode with
 * DS = start of the setup area: say so in the report format and stop. */
start_of_setup:
        cld
        mov $real_mode_msg, %si
2:      lodsb
        test %al, %al
        jz 4f
        mov %al, %bl
        mov $0x3fd, %dx
3:      in (%dx), %al
        test $0x20, %al
        jz 3b
        mov $0x3f8, %dx
        mov %bl, %al
        out %al, (%dx)
        jmp 2b
4:      mov $0xfe, %al
        out %al, $0x64
5:      cli
        hlt
        jmp 5b
real_mode_msg:
        .ascii "TG begin bootcheck entry=bzimage\n"
        .ascii "TG FAIL bzimage.entry: entered at the 16-bit setup code; only the 64-bit entry (+0x200) is supported\n"
        .asciz "TG done pass=0 fail=1\n"

        .org (TG_SETUP_SECTS + 1) * 512
