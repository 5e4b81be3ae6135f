/* Runtime shared by the C guests: serial output, the report format, reset, command line parsing. */
#include "tg.h"

#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)
#define LSR_THRE 0x20
#define I8042_CMD 0x64

/* gcc may emit calls to these even with -ffreestanding. */
void *memset(void *d, int c, size_t n)
{
    uint8_t *p = d;
    while (n--)
        *p++ = (uint8_t)c;
    return d;
}
void *memcpy(void *d, const void *s, size_t n)
{
    uint8_t *p = d;
    const uint8_t *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

void putc_serial(char c)
{
    while (!(inb(COM1_LSR) & LSR_THRE))
        ;
    outb(COM1, (uint8_t)c);
}
void puts_serial(const char *s)
{
    while (*s)
        putc_serial(*s++);
}
void put_dec(uint64_t v)
{
    char buf[24];
    int i = 0;
    do
        buf[i++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    while (i)
        putc_serial(buf[--i]);
}
void put_hex(uint64_t v)
{
    int shift = 60;
    puts_serial("0x");
    while (shift > 0 && !(v >> shift))
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        putc_serial("0123456789abcdef"[(v >> shift) & 0xf]);
}

void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}
void reset(void)
{
    outb(I8042_CMD, 0xfe); /* the VMM ends the VM here with reason "reset" */
    halt_forever();        /* a machine without an i8042 (QEMU microvm) just stops here */
}

static unsigned passed, failed;
void ok(const char *check)
{
    passed++;
    puts_serial("TG ok ");
    puts_serial(check);
    putc_serial('\n');
}
void fail_begin(const char *check)
{
    failed++;
    puts_serial("TG FAIL ");
    puts_serial(check);
    puts_serial(": ");
}
void fail_end(void) { putc_serial('\n'); }
void fail(const char *check, const char *detail)
{
    fail_begin(check);
    puts_serial(detail);
    fail_end();
}
void report_done(void)
{
    puts_serial("TG done pass=");
    put_dec(passed);
    puts_serial(" fail=");
    put_dec(failed);
    putc_serial('\n');
}

/* Parameters are space-separated "key=value" words, as Linux splits them (no quoting needed). */
const char *cmdline_param(const char *s, const char *key)
{
    while (*s) {
        while (*s == ' ')
            s++;
        const char *k = key, *w = s;
        while (*k && *w == *k)
            k++, w++;
        if (!*k && *w == '=')
            return w + 1;
        while (*s && *s != ' ')
            s++;
    }
    return 0;
}
int parse_u64(const char *s, uint64_t *out, const char **end)
{
    uint64_t v = 0;
    int base = 10, digits = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        base = 16, s += 2;
    for (;; s++, digits++) {
        int d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = *s - 'A' + 10;
        else
            break;
        v = v * (uint64_t)base + (uint64_t)d;
    }
    *out = v;
    if (end)
        *end = s;
    return digits > 0;
}

uint32_t fnv1a32(const uint8_t *p, uint64_t n)
{
    uint32_t h = 0x811c9dc5;
    while (n--) {
        h ^= *p++;
        h *= 0x01000193;
    }
    return h;
}

/* [1, 4) GiB identity through the page directories entry.S assembles (the PVH entry maps all 4 GiB
 * itself; on the Linux 64-bit entries the VMM maps only [0, 1 GiB), and the LAPIC, an initrd
 * above 1 GiB or memtouch's pages need more). */
void map_above_1g(uint64_t *pdpt)
{
    for (int g = 1; g < 4; g++)
        pdpt[g] = (uint64_t)(uintptr_t)pt_pd[g] | 3; /* present, writable */
    write_cr3(read_cr3());                           /* flush the TLB */
}

/* ---- exceptions: report instead of a silent triple fault ---- */
extern char exc_stubs[];
static uint64_t idt[32][2];

void idt_set_gate(uint64_t (*table)[2], unsigned vector, uint64_t handler)
{
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    table[vector][0] = (handler & 0xffff) | ((uint64_t)cs << 16) | (0x8eULL << 40) /* present int gate */
                       | ((handler >> 16 & 0xffff) << 48);
    table[vector][1] = handler >> 32;
}

void install_idt_table(uint64_t (*table)[2], unsigned entries)
{
    for (unsigned v = 0; v < 32; v++)
        idt_set_gate(table, v, (uint64_t)(uintptr_t)exc_stubs + 16 * (uint64_t)v);
    struct dtr d = {(uint16_t)(16 * entries - 1), (uint64_t)(uintptr_t)table};
    __asm__ volatile("lidt %0" : : "m"(d));
}

void install_idt(void) { install_idt_table(idt, 32); }

void tg_exception(const uint64_t *f)
{
    uint64_t cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    fail_begin("exception");
    puts_serial("vector ");
    put_dec(f[0]);
    puts_serial(" error ");
    put_hex(f[1]);
    puts_serial(" rip ");
    put_hex(f[2]);
    puts_serial(" cr2 ");
    put_hex(cr2);
    fail_end();
    report_done();
    reset();
}
