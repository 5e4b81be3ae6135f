/* The PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY = 18, name "Xen"): its presence is what makes a VMM
 * (or QEMU) use the PVH entry, a 32-bit physical address. Linked only into the *.pvh.elf images. */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4                 /* n_namesz: "Xen\0" */
        .long 4                 /* n_descsz */
        .long 18                /* n_type: XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long pvh_entry

        .section .note.GNU-stack, "", @progbits
