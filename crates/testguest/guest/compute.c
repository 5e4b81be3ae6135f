/*
 * compute: a deterministic computation in steps, for snapshot/restore tests. Entered by PVH
 * (entry.S maps [0, 4 GiB) first).
 *
 * Command line: tg.seed=<n> tg.pages=<n> tg.steps=<n> [tg.rounds=<n>] (decimal or 0x-hex).
 *
 * 1. Fills the first COMPUTE_WORDS words of each of tg.pages 4 KiB pages from 16 MiB with an
 *    xorshift64 sequence seeded from tg.seed, and writes a marker page (tg.seed and its
 *    complement, then the page filled with the seed's low byte) right below them.
 * 2. Step i = 1..tg.steps: tg.rounds times, folds every filled word of every page into the
 *    running value `acc`; then rewrites the words of COMPUTE_WINDOW pages (a window that moves
 *    by COMPUTE_WINDOW pages per step) from their old value and acc; prints "TG step <i>".
 *    So each step reads all the pages, depends on every earlier step, and writes a few pages.
 * 3. Checks the marker page is as it wrote it, folds it in, prints "TG result <hex>" and resets.
 *
 * src/lib.rs (`compute_expected`) is the same computation in Rust. All pages are touched in
 * step 1 (a full snapshot holds them); a step dirties only its window (plus stack and data), so
 * an incremental snapshot between two steps is small.
 */
#include "tg.h"

#define REGION (16ULL << 20)
#define PAGE 4096
#define COMPUTE_WORDS 8  /* words used per page */
#define COMPUTE_WINDOW 2 /* pages written per step */
#define MARKER (REGION - PAGE)

static uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static uint64_t param(const char *cmdline, const char *key, uint64_t dflt, int *bad)
{
    const char *v = cmdline_param(cmdline, key);
    uint64_t n;
    if (!v)
        return dflt;
    if (!parse_u64(v, &n, 0)) {
        *bad = 1;
        return dflt;
    }
    return n;
}

void tg_main(void)
{
    install_idt();
    /* hvm_start_info (at ebx) .cmdline_paddr */
    const char *cmdline = phys(*(volatile uint64_t *)phys(boot_state.gpr[RBX] + 24));
    int bad = 0;
    uint64_t seed = param(cmdline, "tg.seed", 1, &bad);
    uint64_t pages = param(cmdline, "tg.pages", 64, &bad);
    uint64_t steps = param(cmdline, "tg.steps", 8, &bad);
    uint64_t rounds = param(cmdline, "tg.rounds", 1, &bad);
    if (bad || pages == 0 || pages > 4096) {
        fail("compute", "bad tg.seed/tg.pages/tg.steps/tg.rounds (pages 1..4096)");
        report_done();
        reset();
    }
    puts_serial("TG compute seed=");
    put_hex(seed);
    puts_serial(" pages=");
    put_dec(pages);
    puts_serial(" steps=");
    put_dec(steps);
    puts_serial(" rounds=");
    put_dec(rounds);
    putc_serial('\n');

    volatile uint64_t *mem = phys(REGION);
    volatile uint64_t *marker = phys(MARKER);
    uint64_t s = seed ^ 0x9e3779b97f4a7c15ULL;
    if (!s)
        s = 1;
    for (uint64_t p = 0; p < pages; p++)
        for (int k = 0; k < COMPUTE_WORDS; k++)
            mem[p * (PAGE / 8) + k] = xorshift64(&s);
    marker[0] = seed;
    marker[1] = ~seed;
    uint64_t fill = 0x0101010101010101ULL * (seed & 0xff);
    for (int k = 2; k < PAGE / 8; k++)
        marker[k] = fill;

    uint64_t acc = seed;
    for (uint64_t i = 1; i <= steps; i++) {
        for (uint64_t r = 0; r < rounds; r++)
            for (uint64_t p = 0; p < pages; p++)
                for (int k = 0; k < COMPUTE_WORDS; k++) {
                    acc = (acc ^ mem[p * (PAGE / 8) + k]) * 0x100000001b3ULL;
                    acc ^= acc >> 29;
                }
        for (uint64_t j = 0; j < COMPUTE_WINDOW; j++) {
            uint64_t p = ((i - 1) * COMPUTE_WINDOW + j) % pages;
            for (int k = 0; k < COMPUTE_WORDS; k++) {
                volatile uint64_t *w = &mem[p * (PAGE / 8) + k];
                *w = *w * 6364136223846793005ULL + acc + (uint64_t)k;
            }
        }
        puts_serial("TG step ");
        put_dec(i);
        putc_serial('\n');
    }

    /* The marker page: still what this run wrote (a clone sees its own memory only). */
    int marker_ok = marker[0] == seed && marker[1] == ~seed;
    for (int k = 2; k < PAGE / 8; k++)
        marker_ok &= marker[k] == fill;
    if (!marker_ok) {
        fail("compute.marker", "the marker page changed");
        report_done();
        reset();
    }
    acc = (acc ^ marker[0]) * 0x100000001b3ULL;
    puts_serial("TG result ");
    put_hex(acc);
    putc_serial('\n');
    reset();
}
