/* memtouch: dirties tg.pages=<n> pages from 16 MiB (snapshot and density measurements), prints
 * "TG touched <n>" and halts. Entered by PVH (entry.S maps [0, 4 GiB) first). */
#include "tg.h"

#define TOUCH_START (16ULL << 20)
#define PAGE 4096

void tg_main(void)
{
    install_idt();
    /* hvm_start_info (at ebx) .cmdline_paddr */
    const char *cmdline = phys(*(volatile uint64_t *)phys(boot_state.gpr[RBX] + 24));
    const char *v = cmdline_param(cmdline, "tg.pages");
    uint64_t n = 0;
    if (!v || !parse_u64(v, &n, 0))
        fail("memtouch", "no tg.pages=<n> on the command line");
    /* One non-zero byte per page, so that the page is private and not all zeros afterwards. */
    for (uint64_t i = 0; i < n; i++)
        *(volatile uint8_t *)phys(TOUCH_START + i * PAGE) = 0xa5;
    puts_serial("TG touched ");
    put_dec(n);
    putc_serial('\n');
    halt_forever();
}
