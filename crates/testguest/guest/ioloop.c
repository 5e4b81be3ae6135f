/* ioloop: a guest whose every loop iteration exits to the VMM, for restore latency ("restore to
 * first instruction": a clone's first exit comes within a few instructions of its restore).
 * Entered by PVH (entry.S maps [0, 4 GiB) first).
 *
 * Command line (all optional, decimal or 0x-hex):
 *   tg.pages=<n>  write 0xa5 to the first byte of each of n 4 KiB pages from 16 MiB first (as
 *                 memtouch does), then print "TG touched <n>"
 *   tg.every=<n>  iterations per tick (default 256); each iteration is one port read (the UART's
 *                 scratch register), so one exit
 *   tg.ticks=<n>  reset after tick n (default 0: loop forever)
 * Each tick prints "TG tick <k>" (k counts from 1 since boot), so clones restored from one
 * snapshot all print the same next tick.
 */
#include "tg.h"

#define TOUCH_START (16ULL << 20)
#define PAGE 4096
#define COM1_SCR 0x3ff

static uint64_t param(const char *cmdline, const char *key, uint64_t dflt)
{
    const char *v = cmdline_param(cmdline, key);
    uint64_t n;
    if (!v)
        return dflt;
    if (!parse_u64(v, &n, 0))
        fail("ioloop", "bad tg.pages/tg.every/tg.ticks");
    return n;
}

void tg_main(void)
{
    install_idt();
    /* hvm_start_info (at ebx) .cmdline_paddr */
    const char *cmdline = phys(*(volatile uint64_t *)phys(boot_state.gpr[RBX] + 24));
    uint64_t pages = param(cmdline, "tg.pages", 0);
    uint64_t every = param(cmdline, "tg.every", 256);
    uint64_t ticks = param(cmdline, "tg.ticks", 0);
    if (every == 0)
        every = 1;
    for (uint64_t i = 0; i < pages; i++)
        *(volatile uint8_t *)phys(TOUCH_START + i * PAGE) = 0xa5;
    puts_serial("TG touched ");
    put_dec(pages);
    putc_serial('\n');
    for (uint64_t tick = 1;; tick++) {
        for (uint64_t i = 0; i < every; i++)
            (void)inb(COM1_SCR);
        puts_serial("TG tick ");
        put_dec(tick);
        putc_serial('\n');
        if (tick == ticks)
            reset();
    }
}
