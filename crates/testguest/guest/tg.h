/* Shared by the test guests' C and asm (entry.S) parts. Freestanding: no libc. */
#ifndef TG_H
#define TG_H

/* Which entry a guest came in through (boot_state.kind), decided by the entry symbol used. */
#define ENTRY_PVH 1
#define ENTRY_LINUX64 2
#define ENTRY_BZIMAGE 3

/* Offsets in struct boot_state, for entry.S (checked against the struct below). */
#define BS_KIND 0
#define BS_GPR 8 /* 16 x u64 in x86 encoding order: rax rcx rdx rbx rsp rbp rsi rdi r8..r15 */
#define BS_RFLAGS 136
#define BS_CR0 144
#define BS_CR3 152
#define BS_CR4 160
#define BS_EFER 168
#define BS_CS 176
#define BS_DS 178
#define BS_ES 180
#define BS_FS 182
#define BS_GS 184
#define BS_SS 186
#define BS_GDTR 188 /* sgdt: u16 limit + base (u32 stored in 32-bit mode, u64 in 64-bit mode) */
#define BS_IDTR 198
#define BS_SIZE 208

#define STACK_SIZE 16384

#ifndef __ASSEMBLER__
#include <stddef.h>
#include <stdint.h>

enum gpr { RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8, R9, R10, R11, R12, R13, R14, R15 };

struct __attribute__((packed)) dtr {
    uint16_t limit;
    uint64_t base;
};

/* What the entry stub recorded before running anything else (lives in .data, see entry.S). */
struct __attribute__((packed)) boot_state {
    uint64_t kind;
    uint64_t gpr[16];
    uint64_t rflags, cr0, cr3, cr4, efer;
    uint16_t cs, ds, es, fs, gs, ss;
    struct dtr gdtr, idtr;
};
_Static_assert(offsetof(struct boot_state, rflags) == BS_RFLAGS, "boot_state layout");
_Static_assert(offsetof(struct boot_state, cs) == BS_CS, "boot_state layout");
_Static_assert(offsetof(struct boot_state, gdtr) == BS_GDTR, "boot_state layout");
_Static_assert(offsetof(struct boot_state, idtr) == BS_IDTR, "boot_state layout");
_Static_assert(sizeof(struct boot_state) == BS_SIZE, "boot_state layout");

extern struct boot_state boot_state;
extern uint64_t pt_pd[4][512]; /* entry.S: the page directories for [0, 4 GiB) */

/* Each guest's C main, called by entry.S in 64-bit mode with the 4 GiB identity map in place. */
void tg_main(void);
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);

/* rt.c: serial output, reporting, reset, command line, small helpers. */
void putc_serial(char c);
void puts_serial(const char *s);
void put_dec(uint64_t v);
void put_hex(uint64_t v);
__attribute__((noreturn)) void reset(void);
__attribute__((noreturn)) void halt_forever(void);
void ok(const char *check);
void fail_begin(const char *check); /* prints "TG FAIL <check>: "; the caller adds the detail */
void fail_end(void);                /* ends the FAIL line */
void fail(const char *check, const char *detail);
void report_done(void);
const char *cmdline_param(const char *cmdline, const char *key); /* value after "key=" or 0 */
int parse_u64(const char *s, uint64_t *out, const char **end);  /* decimal or 0x-hex */
void map_above_1g(uint64_t *pdpt); /* point pdpt[1..3] at pt_pd[1..3]: [1, 4) GiB identity */
uint32_t fnv1a32(const uint8_t *p, uint64_t n);
void install_idt(void);               /* report CPU exceptions (rt.c) instead of triple faulting */
/* The same with a caller's table of `entries` (>= 32) gates, for guests that take interrupts: the
 * exception gates 0..31 are filled in and the table loaded; set the others with idt_set_gate. */
void install_idt_table(uint64_t (*table)[2], unsigned entries);
void idt_set_gate(uint64_t (*table)[2], unsigned vector, uint64_t handler); /* 64-bit interrupt gate */
void tg_exception(const uint64_t *frame);

/* Physical memory is identity-mapped: the address as a pointer (laundered through asm so that gcc
 * does not reason about, and warn on, accesses through constant addresses). */
static inline void *phys(uint64_t a)
{
    void *p;
    __asm__("" : "=r"(p) : "0"(a));
    return p;
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint64_t read_cr3(void)
{
    uint64_t v;
    __asm__ volatile("mov %%cr3, %0" : "=r"(v));
    return v;
}
static inline void write_cr3(uint64_t v) { __asm__ volatile("mov %0, %%cr3" : : "r"(v) : "memory"); }
static inline void cpuid(uint32_t leaf, uint32_t r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(0));
}
#endif /* __ASSEMBLER__ */
#endif /* TG_H */
