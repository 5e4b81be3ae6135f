/*
 * hello, halt, spin, triplefault: the smallest guests, 32-bit code as PVH enters it (flat
 * segments, paging off), no stack, no C. Assembled once per guest with -DTG_<NAME>; each is
 * linked with pvh_note.S, which names pvh_entry.
 */
#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)
#define LSR_THRE 0x20

        .code32
        .text
        .globl pvh_entry
pvh_entry:
#if defined(TG_HELLO)
        /* The start-latency benchmark times the VM's first serial exit, so the first port access
         * is this THR write, without the LSR poll (the UART is idle at reset). A port above 0xff
         * needs DX, hence the two register loads before it. */
        mov $COM1, %dx
        mov $'H', %al
        out %al, (%dx)
        mov $msg + 1, %esi
#else
        mov $msg, %esi
#endif
        cld
        /* print the NUL-terminated string at esi, polling LSR.THRE before each byte */
1:      lodsb
        test %al, %al
        jz 3f
        mov %al, %bl
        mov $COM1_LSR, %dx
2:      in (%dx), %al
        test $LSR_THRE, %al
        jz 2b
        mov $COM1, %dx
        mov %bl, %al
        out %al, (%dx)
        jmp 1b
3:
#if defined(TG_HELLO)
        mov $0xfe, %al
        out %al, $0x64          /* i8042 reset: the VMM ends the VM with reason "reset" */
#elif defined(TG_SPIN)
        cli
4:      jmp 4b                  /* busy forever: stop() must kick a running vCPU */
#elif defined(TG_TRIPLEFAULT)
        lidt null_idt           /* limit 0: #UD -> #GP -> #DF all miss the IDT: triple fault */
        ud2
#endif
        /* halt (and where the above did not end the VM: a machine without i8042, say) */
5:      cli
        hlt
        jmp 5b

        .section .rodata
msg:
#if defined(TG_HELLO)
        .asciz "Hello from a microcell test guest\n"
#elif defined(TG_HALT)
        .asciz "TG halt\n"
#elif defined(TG_SPIN)
        .asciz "TG spin\n"
#elif defined(TG_TRIPLEFAULT)
        .asciz "TG triplefault\n"
        .balign 8
null_idt:
        .word 0                 /* limit */
        .long 0                 /* base */
#else
#error "define one of TG_HELLO, TG_HALT, TG_SPIN, TG_TRIPLEFAULT"
#endif

        .section .note.GNU-stack, "", @progbits
