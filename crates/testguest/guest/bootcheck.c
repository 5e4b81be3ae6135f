/*
 * bootcheck: checks docs/boot-contract.md the way Linux reads it and reports each check on COM1.
 * One program, three ways in (entry.S): PVH (bootcheck.pvh.elf), Linux 64-bit from an ELF
 * (bootcheck.elf) and Linux 64-bit from a bzImage (bootcheck.bzimage).
 */
#include "tg.h"

/* docs/boot-contract.md */
#define GDT_ADDR 0x500
#define GDT_LIMIT 31
#define IDT_ADDR 0x520
#define START_INFO_ADDR 0x6000
#define MODLIST_ADDR 0x6040
#define MEMMAP_ADDR 0x6080
#define ZERO_PAGE_ADDR 0x7000
#define BOOT_STACK 0x8ff0
#define PML4_ADDR 0x9000
#define PDPT_ADDR 0xa000
#define PD_ADDR 0xb000
#define CMDLINE_ADDR 0x20000
#define CMDLINE_MAX 4096 /* with the NUL */
#define MPTABLE_ADDR 0x9fc00
#define LOW_RAM_END 0x9fc00
#define KERNEL_ADDR 0x100000
#define MMIO_GAP 0xd0000000ULL
#define HIGH_RAM 0x100000000ULL
#define IOAPIC_ADDR 0xfec00000
#define LAPIC_ADDR 0xfee00000
#define GIB (1ULL << 30)

#define GDT_NULL 0
#define GDT_CODE64 0x00af9b000000ffffULL
#define GDT_CODE32 0x00cf9b000000ffffULL
#define GDT_DATA 0x00cf93000000ffffULL
#define GDT_TSS 0x008f8b000000ffffULL

#define CR0_PE (1ULL << 0)
#define CR0_ET (1ULL << 4)
#define CR0_PG (1ULL << 31)
#define CR4_PAE (1ULL << 5)
#define EFER_LME (1ULL << 8)
#define EFER_LMA (1ULL << 10)

/* Setup header values of bootcheck.bzimage (TG_* come from build.rs, which writes the header). */
#define LOADED_HIGH 0x01
#define XLF_KERNEL_64 0x0001

extern char __image_end[]; /* guest.ld: end of .bss, page aligned */

/* Zero page (struct boot_params) offsets, as in Linux's arch/x86/include/uapi/asm/bootparam.h. */
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE 0x0c4
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_SENTINEL 0x1ef
#define BP_SETUP_SECTS 0x1f1
#define BP_BOOT_FLAG 0x1fe
#define BP_HEADER 0x202
#define BP_VERSION 0x206
#define BP_KERNEL_VERSION 0x20e
#define BP_TYPE_OF_LOADER 0x210
#define BP_LOADFLAGS 0x211
#define BP_CODE32_START 0x214
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21c
#define BP_CMD_LINE_PTR 0x228
#define BP_XLOADFLAGS 0x236
#define BP_CMDLINE_SIZE 0x238
#define BP_INIT_SIZE 0x260
#define BP_E820_TABLE 0x2d0
#define E820_MAX_ENTRIES_ZEROPAGE 128

struct __attribute__((packed)) e820_entry {
    uint64_t addr, size;
    uint32_t type;
};

/* Xen's arch-x86/hvm/start_info.h */
#define HVM_START_MAGIC 0x336ec578
struct hvm_start_info {
    uint32_t magic, version, flags, nr_modules;
    uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    uint32_t memmap_entries, reserved;
};
struct hvm_modlist_entry {
    uint64_t paddr, size, cmdline_paddr, reserved;
};
struct hvm_memmap_table_entry {
    uint64_t addr, size;
    uint32_t type, reserved;
};

static uint8_t rd8(uint64_t a) { return *(volatile uint8_t *)phys(a); }
static uint16_t rd16(uint64_t a) { return *(volatile uint16_t *)phys(a); }
static uint32_t rd32(uint64_t a) { return *(volatile uint32_t *)phys(a); }
static uint64_t rd64(uint64_t a) { return *(volatile uint64_t *)phys(a); }
static uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return (uint64_t)hi << 32 | lo;
}

/* ---- reporting helpers ---- */
static void check_eq(const char *check, uint64_t got, uint64_t want)
{
    if (got == want)
        return ok(check);
    fail_begin(check);
    puts_serial("got ");
    put_hex(got);
    puts_serial(", want ");
    put_hex(want);
    fail_end();
}
static void check_bits(const char *check, uint64_t got, uint64_t bits)
{
    if ((got & bits) == bits)
        return ok(check);
    fail_begin(check);
    put_hex(got);
    puts_serial(" lacks bits ");
    put_hex(bits & ~got);
    fail_end();
}
/* A failing multi-part check: "<what> <got> (want <want>)" */
static void fail_val(const char *check, const char *what, uint64_t got, uint64_t want)
{
    fail_begin(check);
    puts_serial(what);
    putc_serial(' ');
    put_hex(got);
    puts_serial(" (want ");
    put_hex(want);
    puts_serial(")");
    fail_end();
}

/* ---- expectations from the command line: tg.mem=<MiB> tg.cpus=<n> tg.initrd=<size>:<fnv>|none */
static char cmdline[CMDLINE_MAX];
static struct {
    int mem_ok, cpus_ok, initrd_ok, initrd_none;
    uint64_t mem, cpus, initrd_size;
    uint32_t initrd_fnv;
} want;

static void parse_expectations(void)
{
    const char *v;
    if ((v = cmdline_param(cmdline, "tg.mem")) && parse_u64(v, &want.mem, 0))
        want.mem_ok = 1, want.mem <<= 20;
    if ((v = cmdline_param(cmdline, "tg.cpus")) && parse_u64(v, &want.cpus, 0))
        want.cpus_ok = 1;
    if ((v = cmdline_param(cmdline, "tg.initrd"))) {
        const char *e;
        uint64_t h;
        if (v[0] == 'n' && v[1] == 'o' && v[2] == 'n' && v[3] == 'e')
            want.initrd_ok = want.initrd_none = 1;
        else if (parse_u64(v, &want.initrd_size, &e) && *e == ':') {
            /* the checksum is exactly 8 hex digits without 0x: prepend one for parse_u64 */
            char hex[11] = {'0', 'x'};
            int i = 0;
            for (; i < 8 && e[1 + i] && e[1 + i] != ' '; i++)
                hex[2 + i] = e[1 + i];
            const char *hex_end;
            if (i == 8 && (e[9] == 0 || e[9] == ' ') && parse_u64(hex, &h, &hex_end) && hex_end == hex + 10)
                want.initrd_ok = 1, want.initrd_fnv = (uint32_t)h;
        }
    }
    if (want.mem_ok && want.cpus_ok && want.initrd_ok)
        return ok("cmdline.params");
    fail_begin("cmdline.params");
    puts_serial("missing or malformed:");
    if (!want.mem_ok)
        puts_serial(" tg.mem");
    if (!want.cpus_ok)
        puts_serial(" tg.cpus");
    if (!want.initrd_ok)
        puts_serial(" tg.initrd");
    fail_end();
}

/* Reads the command line at addr (as the boot info gives it), prints "TG cmdline ...". */
static uint64_t read_cmdline(const char *check, uint64_t addr)
{
    uint64_t len = 0;
    if (addr == 0 || addr + CMDLINE_MAX > 4 * GIB) {
        fail_val(check, "command line address", addr, CMDLINE_ADDR);
    } else {
        while (len < CMDLINE_MAX && (cmdline[len] = (char)rd8(addr + len)) != 0)
            len++;
        if (len == CMDLINE_MAX) {
            cmdline[--len] = 0;
            fail(check, "no NUL within 4096 bytes");
        } else if (addr != CMDLINE_ADDR) {
            fail_val(check, "command line address", addr, CMDLINE_ADDR);
        } else {
            ok(check);
        }
    }
    puts_serial("TG cmdline ");
    puts_serial(cmdline);
    putc_serial('\n');
    return len;
}

/* ---- memory map: exactly these RAM entries (contract "Guest physical memory") ---- */
static int expected_ram(uint64_t e[3][2])
{
    uint64_t low_end = want.mem < MMIO_GAP ? want.mem : MMIO_GAP;
    e[0][0] = 0, e[0][1] = LOW_RAM_END;
    e[1][0] = KERNEL_ADDR, e[1][1] = low_end - KERNEL_ADDR;
    if (want.mem <= MMIO_GAP)
        return 2;
    e[2][0] = HIGH_RAM, e[2][1] = want.mem - MMIO_GAP;
    return 3;
}

/* entries: addr/size/type of entry i read by the caller's accessor */
static void check_memmap(const char *check, uint64_t n, void (*get)(uint64_t, uint64_t *, uint64_t *, uint32_t *))
{
    uint64_t e[3][2];
    if (!want.mem_ok)
        return fail(check, "no tg.mem on the command line");
    uint64_t nwant = (uint64_t)expected_ram(e);
    if (n != nwant)
        return fail_val(check, "entries", n, nwant);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t addr, size;
        uint32_t type;
        get(i, &addr, &size, &type);
        if (addr != e[i][0] || size != e[i][1] || type != 1) {
            fail_begin(check);
            puts_serial("entry ");
            put_dec(i);
            puts_serial(" is ");
            put_hex(addr);
            puts_serial("+");
            put_hex(size);
            puts_serial(" type ");
            put_dec(type);
            puts_serial(", want ");
            put_hex(e[i][0]);
            puts_serial("+");
            put_hex(e[i][1]);
            puts_serial(" type 1");
            fail_end();
            return;
        }
    }
    ok(check);
}

/* ---- initrd: where the boot info says it is, its size and FNV-1a 32 ---- */
static void check_initrd(const char *check, uint64_t addr, uint64_t size)
{
    if (!want.initrd_ok || !want.mem_ok) {
        fail(check, "no tg.initrd or tg.mem on the command line");
        return fail("initrd.checksum", "no tg.initrd or tg.mem on the command line");
    }
    if (want.initrd_none) {
        if (addr || size)
            return fail_val(check, "initrd present at", addr, 0);
        ok(check);
        return ok("initrd.checksum");
    }
    uint64_t limit = want.mem < MMIO_GAP ? want.mem : MMIO_GAP;
    if (size != want.initrd_size)
        fail_val(check, "size", size, want.initrd_size);
    else if (addr & 0xfff)
        fail_val(check, "not page aligned: address", addr, (limit - size) & ~0xfffULL);
    else if (addr < (uint64_t)(uintptr_t)__image_end || addr + size > limit)
        fail_val(check, "outside [kernel end, min(mem, 0xd0000000)): address", addr, (limit - size) & ~0xfffULL);
    else if (limit - (addr + size) >= 4096)
        fail_val(check, "not at the top of low RAM: address", addr, (limit - size) & ~0xfffULL);
    else
        ok(check);
    if (addr + size > limit || addr < KERNEL_ADDR) /* not RAM we may read */
        return fail("initrd.checksum", "initrd not readable");
    uint32_t h = fnv1a32(phys(addr), size);
    if (h == want.initrd_fnv)
        return ok("initrd.checksum");
    fail_val("initrd.checksum", "fnv1a32", h, want.initrd_fnv);
}

/* ---- GDT in memory and as loaded ---- */
static void check_gdt(const char *prefix_gdtr, const char *prefix_gdt, uint64_t code)
{
    const struct boot_state *b = &boot_state;
    if (b->gdtr.base != GDT_ADDR)
        fail_val(prefix_gdtr, "base", b->gdtr.base, GDT_ADDR);
    else if (b->gdtr.limit != GDT_LIMIT)
        fail_val(prefix_gdtr, "limit", b->gdtr.limit, GDT_LIMIT);
    else
        ok(prefix_gdtr);
    const uint64_t want_gdt[4] = {GDT_NULL, code, GDT_DATA, GDT_TSS};
    for (int i = 0; i < 4; i++)
        if (rd64(GDT_ADDR + 8 * i) != want_gdt[i]) {
            fail_begin(prefix_gdt);
            puts_serial("entry ");
            put_dec((uint64_t)i);
            puts_serial(" is ");
            put_hex(rd64(GDT_ADDR + 8 * i));
            puts_serial(", want ");
            put_hex(want_gdt[i]);
            fail_end();
            return;
        }
    ok(prefix_gdt);
}

static void check_segments(const char *check, int linux64)
{
    const struct boot_state *b = &boot_state;
    /* PVH names CS, DS, ES, SS; the Linux 64-bit entry also FS and GS */
    uint16_t got[6] = {b->cs, b->ds, b->es, b->ss, b->fs, b->gs};
    static const char *names[6] = {"cs", "ds", "es", "ss", "fs", "gs"};
    for (int i = 0; i < (linux64 ? 6 : 4); i++) {
        uint16_t w = i == 0 ? 0x08 : 0x10;
        if (got[i] != w)
            return fail_val(check, names[i], got[i], w);
    }
    ok(check);
}

/* ================================ PVH ================================ */
static void memmap_get(uint64_t i, uint64_t *addr, uint64_t *size, uint32_t *type)
{
    const struct hvm_start_info *si = phys(boot_state.gpr[RBX]);
    const struct hvm_memmap_table_entry *m = phys(si->memmap_paddr);
    *addr = m[i].addr, *size = m[i].size, *type = m[i].type;
}

static void check_pvh(void)
{
    const struct boot_state *b = &boot_state;
    const struct hvm_start_info *si = phys(b->gpr[RBX]); /* as Linux reads it: from ebx */

    check_eq("pvh.cr0", b->cr0, CR0_PE | CR0_ET);
    check_eq("pvh.cr4", b->cr4, 0);
    check_eq("pvh.efer", b->efer, 0);
    check_eq("pvh.eflags", b->rflags, 0x2);
    check_eq("pvh.ebx", b->gpr[RBX], START_INFO_ADDR);
    check_segments("pvh.segments", 0);
    check_gdt("pvh.gdtr", "pvh.gdt", GDT_CODE32);

    check_eq("pvh.start_info.magic", si->magic, HVM_START_MAGIC);
    check_eq("pvh.start_info.version", si->version, 1);
    check_eq("pvh.start_info.cmdline_paddr", si->cmdline_paddr, CMDLINE_ADDR);
    check_eq("pvh.start_info.memmap_paddr", si->memmap_paddr, MEMMAP_ADDR);
    if (!si->memmap_paddr || si->memmap_paddr >= (1ULL << 32))
        fail("pvh.memmap", "no memory map");
    else
        check_memmap("pvh.memmap", si->memmap_entries, memmap_get);

    /* modules: the initrd as module 0 */
    uint64_t addr = 0, size = 0;
    if (!want.initrd_ok)
        fail("pvh.modules", "no tg.initrd on the command line");
    else if (si->nr_modules != (want.initrd_none ? 0u : 1u))
        fail_val("pvh.modules", "nr_modules", si->nr_modules, want.initrd_none ? 0 : 1);
    else if (si->nr_modules && si->modlist_paddr != MODLIST_ADDR)
        fail_val("pvh.modules", "modlist_paddr", si->modlist_paddr, MODLIST_ADDR);
    else
        ok("pvh.modules");
    if (si->nr_modules && si->modlist_paddr && si->modlist_paddr < (1ULL << 32)) {
        const struct hvm_modlist_entry *m = phys(si->modlist_paddr);
        addr = m->paddr, size = m->size;
    }
    check_initrd("pvh.initrd", addr, size);
}

/* ============================ Linux 64-bit ============================ */
/* Walks the page tables at cr3 for va: returns the physical address, or ~0 if not mapped
 * present+writable (the guest writes its .bss and the page tables themselves). */
static uint64_t translate(uint64_t cr3, uint64_t va)
{
    const uint64_t addr_mask = 0x000ffffffffff000ULL;
    uint64_t table = cr3 & addr_mask;
    for (int level = 3; level >= 0; level--) {
        int shift = 12 + 9 * level;
        uint64_t e = rd64(table + 8 * ((va >> shift) & 511));
        if ((e & 3) != 3)
            return ~0ULL;
        if (level == 0 || (level <= 2 && (e & 0x80))) { /* 4K, or a 2M/1G page (PS) */
            uint64_t page = (e & addr_mask) & ~((1ULL << shift) - 1);
            return page | (va & ((1ULL << shift) - 1));
        }
        table = e & addr_mask;
    }
    return ~0ULL;
}

/* Done before bootcheck changes any page table (map_above_1g); reported later. */
static const char *pt_layout_err, *idmap_err;
static uint64_t idmap_bad_va;

static void walk_vmm_page_tables(void)
{
    uint64_t cr3 = boot_state.cr3;
    /* The layout the contract gives: PML4 0x9000 -> PDPT 0xa000 -> PD 0xb000, 2 MiB pages. */
    if ((cr3 & ~0xfffULL) != PML4_ADDR)
        pt_layout_err = "CR3 is not 0x9000";
    else if ((rd64(PML4_ADDR) & 0x000ffffffffff000ULL) != PDPT_ADDR)
        pt_layout_err = "PML4[0] does not point to 0xa000";
    else if ((rd64(PDPT_ADDR) & 0x000ffffffffff000ULL) != PD_ADDR)
        pt_layout_err = "PDPT[0] does not point to 0xb000";
    else
        for (int i = 0; i < 512; i++)
            if (!(rd64(PD_ADDR + 8 * i) & 0x80))
                pt_layout_err = "a PD entry in [0, 1 GiB) is not a 2 MiB page";
    /* Everything bootcheck relies on before it maps more itself lies in [0, 1 GiB): the boot data
     * (GDT, zero page, stack, command line, MP table), this image, an initrd below 1 GiB. Walk
     * every 2 MiB of it, and the ends of this image and of the boot data pages. */
    const uint64_t extra[] = {GDT_ADDR,     ZERO_PAGE_ADDR,   BOOT_STACK - 8,
                              CMDLINE_ADDR + CMDLINE_MAX - 1, MPTABLE_ADDR + 0x3ff,
                              (uint64_t)(uintptr_t)__image_end - 1};
    for (uint64_t va = 0; va < GIB && !idmap_err; va += 2 << 20)
        if (translate(cr3, va) != va || translate(cr3, va + (2 << 20) - 1) != va + (2 << 20) - 1)
            idmap_err = "not identity-mapped (present, writable): ", idmap_bad_va = va;
    for (unsigned i = 0; i < sizeof(extra) / sizeof(extra[0]) && !idmap_err; i++)
        if (translate(cr3, extra[i]) != extra[i])
            idmap_err = "not identity-mapped (present, writable): ", idmap_bad_va = extra[i];
}

static void e820_get(uint64_t i, uint64_t *addr, uint64_t *size, uint32_t *type)
{
    struct e820_entry e;
    memcpy(&e, phys(ZERO_PAGE_ADDR + BP_E820_TABLE + 20 * i), sizeof(e));
    *addr = e.addr, *size = e.size, *type = e.type;
}

static void check_linux64(uint64_t cmdline_len)
{
    const struct boot_state *b = &boot_state;
    const uint64_t zp = ZERO_PAGE_ADDR;

    check_bits("linux64.cr0", b->cr0, CR0_PE | CR0_PG);
    check_bits("linux64.cr4", b->cr4, CR4_PAE);
    check_bits("linux64.efer", b->efer, EFER_LME | EFER_LMA);
    check_eq("linux64.cr3", b->cr3, PML4_ADDR);
    if (pt_layout_err)
        fail("linux64.page_tables", pt_layout_err);
    else
        ok("linux64.page_tables");
    if (idmap_err) {
        fail_begin("linux64.identity_map");
        puts_serial(idmap_err);
        put_hex(idmap_bad_va);
        fail_end();
    } else {
        ok("linux64.identity_map");
    }
    check_gdt("linux64.gdtr", "linux64.gdt", GDT_CODE64);
    check_segments("linux64.segments", 1);
    check_eq("linux64.rsi", b->gpr[RSI], ZERO_PAGE_ADDR);
    if (b->gpr[RSP] != BOOT_STACK)
        fail_val("linux64.rsp", "rsp", b->gpr[RSP], BOOT_STACK);
    else if (b->gpr[RBP] != BOOT_STACK)
        fail_val("linux64.rsp", "rbp", b->gpr[RBP], BOOT_STACK);
    else
        ok("linux64.rsp");
    check_eq("linux64.rflags", b->rflags, 0x2);
    static const char *gpr_names[16] = {"rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                                        "r8",  "r9",  "r10", "r11", "r12", "r13", "r14", "r15"};
    int gprs_ok = 1;
    for (int r = 0; r < 16 && gprs_ok; r++)
        if (r != RSP && r != RBP && r != RSI && b->gpr[r] != 0)
            gprs_ok = 0, fail_val("linux64.gprs", gpr_names[r], b->gpr[r], 0);
    if (gprs_ok)
        ok("linux64.gprs");

    /* Zero page, read as Linux does (the ext_* fields hold bits 32..63). */
    check_eq("linux64.zero_page.header", rd32(zp + BP_HEADER), 0x53726448); /* "HdrS" */
    check_eq("linux64.zero_page.boot_flag", rd16(zp + BP_BOOT_FLAG), 0xaa55);
    check_eq("linux64.zero_page.type_of_loader", rd8(zp + BP_TYPE_OF_LOADER), 0xff);
    /* Linux's sanitize_boot_params() wipes fields of a zero page whose sentinel is not 0. */
    check_eq("linux64.zero_page.sentinel", rd8(zp + BP_SENTINEL), 0);
    check_eq("linux64.zero_page.cmd_line_ptr",
             rd32(zp + BP_CMD_LINE_PTR) | (uint64_t)rd32(zp + BP_EXT_CMD_LINE_PTR) << 32, CMDLINE_ADDR);
    check_eq("linux64.zero_page.cmdline_size", rd32(zp + BP_CMDLINE_SIZE), cmdline_len);
    uint8_t n = rd8(zp + BP_E820_ENTRIES);
    if (n > E820_MAX_ENTRIES_ZEROPAGE)
        fail_val("linux64.e820", "e820_entries", n, E820_MAX_ENTRIES_ZEROPAGE);
    else
        check_memmap("linux64.e820", n, e820_get);
    check_initrd("linux64.initrd",
                 rd32(zp + BP_RAMDISK_IMAGE) | (uint64_t)rd32(zp + BP_EXT_RAMDISK_IMAGE) << 32,
                 rd32(zp + BP_RAMDISK_SIZE) | (uint64_t)rd32(zp + BP_EXT_RAMDISK_SIZE) << 32);

    if (b->kind != ENTRY_BZIMAGE)
        return;
    /* The setup header the VMM copied in from bootcheck.bzimage (build.rs wrote it). */
    uint64_t init_size = (uint64_t)(uintptr_t)__image_end - KERNEL_ADDR;
    if (rd8(zp + BP_SETUP_SECTS) != TG_SETUP_SECTS)
        fail_val("bzimage.setup_header", "setup_sects", rd8(zp + BP_SETUP_SECTS), TG_SETUP_SECTS);
    else if (rd16(zp + BP_VERSION) != TG_BOOT_VERSION)
        fail_val("bzimage.setup_header", "version", rd16(zp + BP_VERSION), TG_BOOT_VERSION);
    else if (rd16(zp + BP_KERNEL_VERSION) != 0)
        fail_val("bzimage.setup_header", "kernel_version", rd16(zp + BP_KERNEL_VERSION), 0);
    else if (!(rd8(zp + BP_LOADFLAGS) & LOADED_HIGH))
        fail_val("bzimage.setup_header", "loadflags", rd8(zp + BP_LOADFLAGS), LOADED_HIGH);
    else if (!(rd16(zp + BP_XLOADFLAGS) & XLF_KERNEL_64))
        fail_val("bzimage.setup_header", "xloadflags", rd16(zp + BP_XLOADFLAGS), XLF_KERNEL_64);
    else if (rd32(zp + BP_CODE32_START) != KERNEL_ADDR)
        fail_val("bzimage.setup_header", "code32_start", rd32(zp + BP_CODE32_START), KERNEL_ADDR);
    else if (rd32(zp + BP_INIT_SIZE) != init_size)
        fail_val("bzimage.setup_header", "init_size", rd32(zp + BP_INIT_SIZE), init_size);
    else
        ok("bzimage.setup_header");
}

/* ============================ Both entries ============================ */
static void check_cpuid(void)
{
    uint32_t r[4];
    cpuid(1, r);
    check_bits("cpuid.hypervisor", r[2], 1u << 31);
    check_eq("cpuid.apic_id", r[1] >> 24, 0); /* we run on vCPU 0 */
    if (!want.cpus_ok)
        fail("cpuid.cpu_count", "no tg.cpus on the command line");
    else
        check_eq("cpuid.cpu_count", (r[1] >> 16) & 0xff, want.cpus);
    cpuid(0x40000000, r);
    const char *sig = "KVMKVMKVM\0\0\0";
    uint32_t w[3];
    memcpy(w, sig, 12);
    if (r[1] == w[0] && r[2] == w[1] && r[3] == w[2])
        return ok("cpuid.kvm_signature");
    fail_begin("cpuid.kvm_signature");
    puts_serial("leaf 0x40000000 ebx ecx edx = ");
    put_hex(r[1]);
    putc_serial(' ');
    put_hex(r[2]);
    putc_serial(' ');
    put_hex(r[3]);
    fail_end();
}

static void check_lapic(void)
{
    /* Linux reads the base from IA32_APIC_BASE: enabled (bit 11), BSP (bit 8), at 0xfee00000. */
    uint64_t base = rdmsr(0x1b);
    if ((base & ~0xfffULL) != LAPIC_ADDR)
        fail_val("lapic.base", "IA32_APIC_BASE", base, LAPIC_ADDR | 0x900);
    else
        check_bits("lapic.base", base, 0x900);
    /* LVT LINT0 (0x350) delivery mode ExtINT (7), LINT1 (0x360) NMI (4): bits 10:8. */
    uint32_t lint0 = rd32(LAPIC_ADDR + 0x350), lint1 = rd32(LAPIC_ADDR + 0x360);
    if (((lint0 >> 8) & 7) != 7)
        fail_val("lapic.lint0", "LVT LINT0", lint0, 0x700);
    else
        ok("lapic.lint0");
    if (((lint1 >> 8) & 7) != 4)
        fail_val("lapic.lint1", "LVT LINT1", lint1, 0x400);
    else
        ok("lapic.lint1");
}

static uint8_t sum8(uint64_t a, uint64_t n)
{
    uint8_t s = 0;
    while (n--)
        s = (uint8_t)(s + rd8(a++));
    return s;
}

/* MP table, read the way Linux's arch/x86/kernel/mpparse.c does. */
static void check_mptable(void)
{
    const uint64_t mpf = MPTABLE_ADDR;
    uint64_t cfg = mpf + 16;
    const char *err = 0;
    if (rd32(mpf) != 0x5f504d5f) /* "_MP_" */
        err = "no _MP_ signature at 0x9fc00";
    else if (rd8(mpf + 8) != 1)
        err = "length is not 1 (16 bytes)";
    else if (sum8(mpf, 16) != 0)
        err = "checksum";
    else if (rd8(mpf + 9) != 1 && rd8(mpf + 9) != 4)
        err = "specification is not 1 or 4";
    else if (rd8(mpf + 11) != 0)
        err = "feature1 != 0 (a default configuration, no table)";
    else if (rd32(mpf + 4) != cfg)
        err = "physptr is not right after the floating pointer (0x9fc10)";
    if (err)
        return fail("mptable.floating", err);
    ok("mptable.floating");

    uint16_t len = rd16(cfg + 4);
    if (rd32(cfg) != 0x504d4350) /* "PCMP" */
        err = "no PCMP signature";
    else if (len < 44 || cfg + len > 0xa0000)
        err = "length does not fit below 0xa0000";
    else if (sum8(cfg, len) != 0)
        err = "checksum";
    else if (rd8(cfg + 6) != 1 && rd8(cfg + 6) != 4)
        err = "spec is not 1 or 4";
    else if (rd32(cfg + 36) != LAPIC_ADDR)
        err = "local APIC address is not 0xfee00000";
    if (err)
        return fail("mptable.config", err);
    ok("mptable.config");

    /* Walk the entries: 0 processor (20 bytes), 1 bus, 2 IOAPIC, 3 I/O interrupt, 4 local
     * interrupt (8 bytes each). */
    uint64_t ncpu = 0, cpus_seen = 0, nioapic = 0, bsps = 0, irqs_seen = 0;
    uint64_t ioapic_id = ~0ULL, ioapic_flags = 0, ioapic_addr = 0;
    int isa_bus = -1, cpu_err = 0;
    const char *irq_err = 0;
    uint64_t p = cfg + 44, end = cfg + len;
    while (p < end) {
        uint8_t type = rd8(p);
        if (type == 0) {
            uint8_t id = rd8(p + 1), flags = rd8(p + 3);
            ncpu++;
            if (id >= 64 || (cpus_seen >> id & 1) || !(flags & 1))
                cpu_err = 1; /* out of range, twice, or disabled */
            else
                cpus_seen |= 1ULL << id;
            if (flags & 2)
                bsps++, cpu_err |= id != 0;
            p += 20;
            continue;
        }
        if (type == 1) {
            if (rd8(p + 2) == 'I' && rd8(p + 3) == 'S' && rd8(p + 4) == 'A' && rd8(p + 5) == ' ')
                isa_bus = rd8(p + 1);
        } else if (type == 2) {
            nioapic++;
            ioapic_id = rd8(p + 1), ioapic_flags = rd8(p + 3), ioapic_addr = rd32(p + 4);
        } else if (type == 3) {
            uint8_t bus = rd8(p + 4), irq = rd8(p + 5), dst = rd8(p + 6);
            if (isa_bus >= 0 && bus == isa_bus && irq < 24) {
                irqs_seen |= 1u << irq;
                if (dst != ioapic_id)
                    irq_err = "an ISA IRQ entry is not routed to the IOAPIC";
            }
        } else if (type != 4) {
            return fail("mptable.config", "unknown entry type");
        }
        p += 8;
    }

    if (!want.cpus_ok)
        fail("mptable.cpus", "no tg.cpus on the command line");
    else if (ncpu != want.cpus)
        fail_val("mptable.cpus", "processor entries", ncpu, want.cpus);
    else if (cpu_err || bsps != 1 || cpus_seen != (want.cpus >= 64 ? ~0ULL : (1ULL << want.cpus) - 1))
        fail("mptable.cpus", "APIC ids are not 0..n-1 once each, enabled, with the BSP flag on id 0 only");
    else
        ok("mptable.cpus");

    if (nioapic != 1)
        fail_val("mptable.ioapic", "IOAPIC entries", nioapic, 1);
    else if (want.cpus_ok && ioapic_id != want.cpus)
        fail_val("mptable.ioapic", "id", ioapic_id, want.cpus);
    else if (!(ioapic_flags & 1))
        fail("mptable.ioapic", "not enabled");
    else if (ioapic_addr != IOAPIC_ADDR)
        fail_val("mptable.ioapic", "address", ioapic_addr, IOAPIC_ADDR);
    else
        ok("mptable.ioapic");

    if (isa_bus < 0)
        fail("mptable.bus", "no ISA bus entry");
    else
        ok("mptable.bus");

    if (irq_err)
        fail("mptable.irqs", irq_err);
    else if (irqs_seen != 0xffffff)
        fail_val("mptable.irqs", "IOAPIC pins 0-23 with an entry (bitmap)", irqs_seen, 0xffffff);
    else
        ok("mptable.irqs");
}

static void check_common(void)
{
    const struct boot_state *b = &boot_state;
    /* The contract: IDTR = 0x520 with one empty entry (limit 7), so an early exception triple-faults. */
    if (b->idtr.base != IDT_ADDR)
        fail_val("idtr", "base", b->idtr.base, IDT_ADDR);
    else
        check_eq("idtr", b->idtr.limit, 7);
    check_cpuid();
    check_lapic();
    check_mptable();
    /* Unassigned ports read 0xff (COM2 and COM3 receive registers: no device there). */
    uint8_t com2 = inb(0x2f8), com3 = inb(0x3e8);
    if (com2 != 0xff)
        fail_val("pio.unassigned", "inb(0x2f8)", com2, 0xff);
    else
        check_eq("pio.unassigned", com3, 0xff);
}

void tg_main(void)
{
    const struct boot_state *b = &boot_state;
    static const char *names[] = {"?", "pvh", "linux64", "bzimage"};
    puts_serial("TG begin bootcheck entry=");
    puts_serial(names[b->kind <= 3 ? b->kind : 0]);
    putc_serial('\n');
    install_idt();

    uint64_t cmdline_len;
    if (b->kind == ENTRY_PVH) {
        const struct hvm_start_info *si = phys(b->gpr[RBX]);
        cmdline_len = read_cmdline("cmdline", si->magic == HVM_START_MAGIC ? si->cmdline_paddr : 0);
        parse_expectations();
        check_pvh();
    } else {
        /* Check the VMM's identity map before relying on more than it, then map [1, 4) GiB
         * (LAPIC, initrd above 1 GiB) in our own page directories through its PDPT. */
        walk_vmm_page_tables();
        map_above_1g(phys(rd64((b->cr3 & ~0xfffULL)) & 0x000ffffffffff000ULL));
        uint64_t zp = ZERO_PAGE_ADDR;
        cmdline_len = read_cmdline("cmdline", rd32(zp + BP_CMD_LINE_PTR) | (uint64_t)rd32(zp + BP_EXT_CMD_LINE_PTR) << 32);
        parse_expectations();
        check_linux64(cmdline_len);
    }
    check_common();
    report_done();
    reset();
}
