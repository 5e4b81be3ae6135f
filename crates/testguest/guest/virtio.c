/*
 * virtio: a minimal interrupt-driven virtio-mmio driver (virtio 1.2 §2.7 split virtqueues, §4.2
 * MMIO transport) that drives every device named by a `virtio_mmio.device=` entry of the command
 * line and checks what it gets back. Entered by PVH (entry.S maps [0, 4 GiB), the MMIO gap
 * uncached).
 *
 * Interrupts: its own IDT (exceptions as in rt.c, one gate per IOAPIC pin at VEC_BASE + gsi, the
 * LAPIC timer, the spurious vector), the 8259 PICs and LVT LINT0 masked, the LAPIC enabled, one
 * IOAPIC redirection entry per device GSI (edge, fixed, physical destination APIC id 0). The
 * handler reads InterruptStatus, writes InterruptACK, records how far each of the device's used
 * rings had got (the driver consumes used entries only up to there, as a driver that runs off
 * its interrupt would) and writes EOI. Waits are `cli; check; sti; hlt` loops woken by the device
 * or the LAPIC timer (10 ms), bounded by WAIT_MS: a lost interrupt FAILs a check, never hangs.
 *
 * Expectations from the command line (see README.md):
 *   tg.nblk=<n> tg.ncon=<n>                 how many block / console devices to expect
 *   tg.nnet=<n>                             how many net devices (none when absent)
 *   tg.blk<i>=<sectors>:<fnv1a32 of the first 8 sectors, hex>   per block device, in MMIO order
 *   tg.blk<i>ro=1                           block device <i> is read-only
 *   tg.net<i>=<mac>,<ip>,<gateway ip>,<udp port>,<reply|blocked>  per net device: its MAC and
 *                                           address, the peer that answers ARP for the gateway
 *                                           and echoes UDP to <udp port> XOR 0x5a (reply), or
 *                                           drops it (blocked)
 *
 * For snapshot/restore tests (crates/vmm/tests/snapshot.rs), optionally:
 *   tg.con_first=1     check the console devices before the block devices: the guest then waits
 *                      for the host's greeting (after `con0.guest_open`) before any disk I/O,
 *                      a point to snapshot at where everything else still lies ahead
 *   tg.wait_ms=<n>     how long a wait for a completion lasts (default WAIT_MS): the host may
 *                      hold the guest at a wait for longer (snapshot, restore, clones)
 *   tg.clone=1         after `host_first`: receive one byte v, write it over CLONE_PAGES pages
 *                      (filled with CLONE_FILL at startup, so a snapshot holds that), print
 *                      "TG info clone wrote=<v>", receive one more byte (the host's go, once all
 *                      clones have written), check the pages hold only v: `clone.isolation`
 */
#include "tg.h"

/* ---- platform ---- */
#define LAPIC_ADDR 0xfee00000ULL
#define LAPIC_ID 0x20
#define LAPIC_TPR 0x80
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define IOAPIC_ADDR 0xfec00000ULL
#define IOAPIC_PINS 24

#define VEC_BASE 0x30 /* device on IOAPIC pin g: vector VEC_BASE + g */
#define VEC_TIMER 0x4e
#define VEC_SPURIOUS 0x4f
#define IDT_ENTRIES 0x50
#define TIMER_COUNT 10000000 /* KVM's LAPIC counts at 1 GHz: 10 ms with divide-by-1 */
#define WAIT_MS 5000      /* for a completion */
#define WAIT_MS_LOST 200  /* once an interrupt was lost: report, do not crawl */
#define CLONE_PAGES 16    /* tg.clone=1: the pages each clone overwrites */
#define CLONE_FILL 0x11   /* what they hold before */

/* ---- virtio-mmio registers (§4.2.2) ---- */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC 0x080
#define R_QUEUE_DRIVER 0x090
#define R_QUEUE_DEVICE 0x0a0
#define R_CONFIG_GENERATION 0x0fc
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_FAILED 0x80

#define F_VERSION_1 (1ULL << 32)
#define INT_USED_RING 1

#define TYPE_NET 1
#define TYPE_BLOCK 2
#define TYPE_CONSOLE 3

#define BLK_F_RO (1ULL << 5)
#define BLK_F_FLUSH (1ULL << 9)
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_ID_BYTES 20
#define BLK_CHECK_SECTORS 8 /* tg.blk<i>'s checksum covers these */
#define BLK_WRITE_SECTORS 4 /* the pattern goes to the last ones of a writable disk */

#define CON_F_MULTIPORT (1ULL << 1)
#define CON_DEVICE_READY 0
#define CON_DEVICE_ADD 1
#define CON_PORT_READY 3
#define CON_PORT_OPEN 6
#define CON_PORT_NAME 7
#define CON_Q_RX 0
#define CON_Q_TX 1
#define CON_Q_CTRL_RX 2
#define CON_Q_CTRL_TX 3
#define CON_CTRL_BUFS 4
#define CON_CTRL_BUF 64
#define CON_RX_BUFS 8
#define CON_RX_BUF 512
#define CON_XOR 0x5a        /* what the host test's echo does to every byte */
#define CON_GREETING "microcell host says hello\n" /* the host's first bytes (src/lib.rs) */
#define CON_ROUND2_LEN 6000 /* more than all CON_RX_BUFS buffers: the device must wait for reposts */

#define NET_F_MAC (1ULL << 5)
#define NET_F_CTRL_VQ (1ULL << 17)
#define NET_F_MQ (1ULL << 22)
#define NET_Q_RX 0
#define NET_Q_TX 1
#define NET_HDR 12          /* struct virtio_net_hdr_v1 (VERSION_1: num_buffers always there) */
#define NET_MTU_FRAME 1514  /* the largest frame a receive buffer must hold (no FCS) */
#define NET_RX_BUFS 10      /* 5 as one descriptor, 5 as two: 15 of the 16 descriptors */
#define NET_RX_ONE 5        /* buffers 0..4: one descriptor each, 2048 bytes */
#define NET_RX_BUF 2048
#define NET_RX_DATA 1526    /* the second descriptor of a two-descriptor buffer (frame + 12) */
#define NET_TX_QSZ 64       /* NET_BATCH frames in flight, half of them as two descriptors */
#define NET_TX_SLOT 128     /* bytes per transmit buffer: header at +0, frame at +12 or +32 */
#define NET_TX_SLOTS 34     /* NET_BATCH, then the ARP reply's and the other frames' */
#define NET_SLOT_ARP NET_BATCH
#define NET_SLOT_SEND (NET_BATCH + 1)
#define NET_BATCH 32        /* src/lib.rs VIRTIO_NET_BATCH */
#define NET_GUEST_PORT 40000 /* src/lib.rs VIRTIO_NET_GUEST_UDP_PORT */
#define NET_PING "microcell net ping"
#define NET_BATCH_PREFIX "microcell net batch " /* then two decimal digits */
#define NET_BLOCKED_MS 500  /* expect=blocked: no reply within this long */

/* ---- split virtqueues (§2.7) ---- */
#define QSZ 16     /* entries of a queue, unless its driver asks for more (vq.size) */
#define QSZ_MAX 64 /* what still fits the one-page layout: desc 0x000, avail 0x800, used 0xc00 */
_Static_assert(NET_TX_QSZ <= QSZ_MAX && NET_BATCH / 2 * 3 + 4 <= NET_TX_QSZ, "net transmit descriptors");
#define D_NEXT 1
#define D_WRITE 2

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};
struct avail {
    uint16_t flags, idx, ring[]; /* vq.size entries (no VIRTIO_F_EVENT_IDX: nothing after them) */
};
struct used_elem {
    uint32_t id, len;
};
struct used {
    uint16_t flags, idx;
    struct used_elem ring[]; /* vq.size entries */
};

struct vq {
    unsigned index;
    uint16_t size;          /* QSZ, or what the driver set before init_device (<= QSZ_MAX) */
    volatile struct desc *desc;
    volatile struct avail *avail;
    volatile struct used *used;
    uint16_t avail_idx;     /* published to the device */
    uint16_t last_used;     /* consumed by the driver */
    volatile uint16_t seen; /* used->idx as the interrupt handler last read it */
};

#define MAX_DEVICES 8
#define MAX_QUEUES 4

struct vdev {
    char name[8]; /* blk0, con0 */
    uint64_t base;
    unsigned gsi, type, index; /* index: among devices of its type */
    uint64_t offered;
    int nq;
    struct vq q[MAX_QUEUES];
    const char *broken; /* the check after which nothing more is tried */
    /* Interrupt accounting (the handler writes these). */
    volatile uint32_t irqs, irqs_used, irqs_empty;
    uint32_t lost;      /* completions only found after WAIT_MS, with no interrupt for them */
    uint32_t completions;
};

static struct vdev devs[MAX_DEVICES];
static int ndevs;
static struct vdev *by_gsi[IOAPIC_PINS];
static volatile uint32_t ticks, stray_irqs;
static int timer_ok;
static int lost_any; /* an interrupt was lost: the path is broken, wait WAIT_MS_LOST from now on */
static uint32_t wait_ms = WAIT_MS; /* tg.wait_ms */
static int clone_mode;             /* tg.clone=1 */
static uint64_t clone_pages;       /* CLONE_PAGES pages, CLONE_FILL until the host's byte */
static uint64_t heap; /* bump allocator of zeroed pages above the image */
static char name_buf[48];

extern char __image_end[];

/* ---- small helpers ---- */
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
static inline void pause(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}
static void fill(uint64_t addr, uint64_t n, uint8_t v)
{
    void *p = phys(addr);
    __asm__ volatile("rep stosb" : "+D"(p), "+c"(n) : "a"(v) : "memory");
}
static void zero(uint64_t addr, uint64_t n) { fill(addr, n, 0); }
static void copy(uint64_t dst, uint64_t src, uint64_t n)
{
    void *d = phys(dst), *s = phys(src);
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
}
static uint64_t alloc_pages(uint64_t n)
{
    uint64_t a = heap;
    heap += n * 4096;
    zero(a, n * 4096);
    return a;
}

static inline uint32_t lapic_rd(unsigned r) { return *(volatile uint32_t *)phys(LAPIC_ADDR + r); }
static inline void lapic_wr(unsigned r, uint32_t v) { *(volatile uint32_t *)phys(LAPIC_ADDR + r) = v; }
static uint32_t ioapic_rd(unsigned r)
{
    *(volatile uint32_t *)phys(IOAPIC_ADDR) = r;
    return *(volatile uint32_t *)phys(IOAPIC_ADDR + 0x10);
}
static void ioapic_wr(unsigned r, uint32_t v)
{
    *(volatile uint32_t *)phys(IOAPIC_ADDR) = r;
    *(volatile uint32_t *)phys(IOAPIC_ADDR + 0x10) = v;
}

static inline uint32_t rd(const struct vdev *d, unsigned off) { return *(volatile uint32_t *)phys(d->base + off); }
static inline void wr(const struct vdev *d, unsigned off, uint32_t v) { *(volatile uint32_t *)phys(d->base + off) = v; }

/* "<dev>.<what>" in a static buffer: check names are printed before the next one is made. */
static const char *cname(const struct vdev *d, const char *what)
{
    char *p = name_buf;
    for (const char *s = d->name; *s;)
        *p++ = *s++;
    *p++ = '.';
    while (*what && p < name_buf + sizeof(name_buf) - 1)
        *p++ = *what++;
    *p = 0;
    return name_buf;
}

static void fail_val2(const char *check, const char *what, uint64_t got, uint64_t want)
{
    fail_begin(check);
    puts_serial(what);
    puts_serial(" = ");
    put_hex(got);
    puts_serial(", want ");
    put_hex(want);
    fail_end();
}

/* A device check that cannot run because an earlier one left the device unusable. */
static int skipped(struct vdev *d, const char *what)
{
    if (!d->broken)
        return 0;
    fail_begin(cname(d, what));
    puts_serial("not run: ");
    puts_serial(d->broken);
    puts_serial(" failed");
    fail_end();
    return 1;
}

/* ---- interrupts ---- */
struct interrupt_frame;

static void device_irq(unsigned gsi)
{
    struct vdev *d = by_gsi[gsi];
    if (!d) {
        stray_irqs++;
    } else {
        uint32_t st = rd(d, R_INTERRUPT_STATUS);
        if (st)
            wr(d, R_INTERRUPT_ACK, st);
        d->irqs++;
        if (st & INT_USED_RING)
            d->irqs_used++;
        if (!st)
            d->irqs_empty++;
        /* After the ACK: a completion the device adds after this read raises a new interrupt. */
        mb();
        for (int i = 0; i < d->nq; i++)
            if (d->q[i].used)
                d->q[i].seen = d->q[i].used->idx;
    }
    lapic_wr(LAPIC_EOI, 0);
}

#define IRQ_HANDLER(g)                                                                             \
    __attribute__((interrupt)) static void irq_##g(struct interrupt_frame *f)                      \
    {                                                                                              \
        (void)f;                                                                                   \
        device_irq(g);                                                                             \
    }
IRQ_HANDLER(0) IRQ_HANDLER(1) IRQ_HANDLER(2) IRQ_HANDLER(3) IRQ_HANDLER(4) IRQ_HANDLER(5)
IRQ_HANDLER(6) IRQ_HANDLER(7) IRQ_HANDLER(8) IRQ_HANDLER(9) IRQ_HANDLER(10) IRQ_HANDLER(11)
IRQ_HANDLER(12) IRQ_HANDLER(13) IRQ_HANDLER(14) IRQ_HANDLER(15) IRQ_HANDLER(16) IRQ_HANDLER(17)
IRQ_HANDLER(18) IRQ_HANDLER(19) IRQ_HANDLER(20) IRQ_HANDLER(21) IRQ_HANDLER(22) IRQ_HANDLER(23)

static void (*const irq_handlers[IOAPIC_PINS])(struct interrupt_frame *) = {
    irq_0,  irq_1,  irq_2,  irq_3,  irq_4,  irq_5,  irq_6,  irq_7,  irq_8,  irq_9,  irq_10, irq_11,
    irq_12, irq_13, irq_14, irq_15, irq_16, irq_17, irq_18, irq_19, irq_20, irq_21, irq_22, irq_23};

__attribute__((interrupt)) static void irq_timer(struct interrupt_frame *f)
{
    (void)f;
    ticks++;
    lapic_wr(LAPIC_EOI, 0);
}

__attribute__((interrupt)) static void irq_spurious(struct interrupt_frame *f)
{
    (void)f; /* no EOI for the spurious vector */
}

static uint64_t idt[IDT_ENTRIES][2];

static void setup_interrupts(void)
{
    install_idt_table(idt, IDT_ENTRIES);
    for (unsigned g = 0; g < IOAPIC_PINS; g++)
        idt_set_gate(idt, VEC_BASE + g, (uint64_t)(uintptr_t)irq_handlers[g]);
    idt_set_gate(idt, VEC_TIMER, (uint64_t)(uintptr_t)irq_timer);
    idt_set_gate(idt, VEC_SPURIOUS, (uint64_t)(uintptr_t)irq_spurious);

    /* The 8259s: KVM resets them unmasked and LINT0 is ExtINT (the contract), so a device GSI
     * below 16 would also arrive through them, at vector 0 + irq. Mask both, and LINT0. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);

    uint32_t id = lapic_rd(LAPIC_ID) >> 24;
    lapic_wr(LAPIC_TPR, 0);
    lapic_wr(LAPIC_LVT_LINT0, 0x10700); /* masked ExtINT */
    lapic_wr(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
    if (id != 0)
        fail_val2("lapic.enable", "APIC id", id, 0);
    else if ((lapic_rd(LAPIC_SVR) & 0x1ff) != (0x100 | VEC_SPURIOUS))
        fail_val2("lapic.enable", "SVR", lapic_rd(LAPIC_SVR), 0x100 | VEC_SPURIOUS);
    else
        ok("lapic.enable");

    /* IOAPIC: version register (index 1) bits 23:16 = last redirection entry. */
    uint32_t ver = ioapic_rd(1);
    if (((ver >> 16) & 0xff) != IOAPIC_PINS - 1)
        fail_val2("ioapic.version", "max redirection entry", (ver >> 16) & 0xff, IOAPIC_PINS - 1);
    else
        ok("ioapic.version");

    /* Periodic LAPIC timer: wakes the waits below, so that their time bound holds even when a
     * device interrupt never comes. Check it ticks before relying on it (bounded by the TSC). */
    lapic_wr(LAPIC_TIMER_DIV, 0xb); /* divide by 1 */
    lapic_wr(LAPIC_LVT_TIMER, (1u << 17) | VEC_TIMER);
    lapic_wr(LAPIC_TIMER_INIT, TIMER_COUNT);
    sti();
    uint64_t t0 = rdtsc();
    while (ticks < 2 && rdtsc() - t0 < 20000000000ULL)
        pause();
    timer_ok = ticks >= 2;
    if (timer_ok)
        ok("lapic.timer");
    else
        fail("lapic.timer", "the LAPIC timer did not tick twice in 2e10 TSC cycles; waits poll");
}

/* Routes device d's GSI to VEC_BASE + gsi on APIC id 0: edge, active high, fixed, unmasked. */
static void route_irq(struct vdev *d)
{
    unsigned r = 0x10 + 2 * d->gsi;
    uint32_t lo = VEC_BASE + d->gsi;
    ioapic_wr(r + 1, 0u << 24); /* destination APIC id 0 */
    ioapic_wr(r, lo);
    uint32_t back = ioapic_rd(r) & 0x1ffff & ~(1u << 12); /* not the delivery status bit */
    if (back != lo)
        fail_val2(cname(d, "ioapic_route"), "redirection entry", back, lo);
    else
        ok(cname(d, "ioapic_route"));
}

static int expired(uint64_t t0, uint32_t k0, uint32_t ms)
{
    if (timer_ok)
        return ticks - k0 > ms / 10;
    return rdtsc() - t0 > (uint64_t)ms * 4000000; /* ~4 GHz at most */
}

static const char WAIT_QUIET[] = "nothing came in time";

/* Waits until the interrupt handler has seen a used entry of q that the driver has not consumed,
 * at most until `ms` after (t0, k0) (rdtsc, ticks). 0: it has; otherwise why not. A completion
 * that is only found when the time is up (its interrupt never came) is counted in d->lost and
 * handed over anyway, except in a quiet wait (one meant to run out: it returns WAIT_QUIET). */
static const char *wait_used_until(struct vdev *d, struct vq *q, uint64_t t0, uint32_t k0, uint32_t ms, int quiet)
{
    for (;;) {
        cli();
        if (q->seen != q->last_used) {
            sti();
            return 0;
        }
        if (expired(t0, k0, ms)) {
            if (quiet) {
                sti();
                return WAIT_QUIET;
            }
            uint16_t idx = q->used->idx;
            if (idx != q->last_used) {
                d->lost++;
                lost_any = 1;
                q->seen = idx;
                sti();
                return 0;
            }
            sti();
            return lost_any ? "no completion (after a lost interrupt)" : "no completion within tg.wait_ms (5 s)";
        }
        if (timer_ok)
            sti_hlt(); /* sti's one-instruction shadow: no interrupt slips in before the hlt */
        else
            sti(), pause();
    }
}

/* How long a wait for a completion lasts from now on. */
static uint32_t wait_limit(void) { return lost_any ? WAIT_MS_LOST : wait_ms; }

static const char *wait_used(struct vdev *d, struct vq *q)
{
    return wait_used_until(d, q, rdtsc(), ticks, wait_limit(), 0);
}

/* Takes the next used entry the interrupt handler has seen. */
static int pop_used(struct vdev *d, struct vq *q, uint32_t *id, uint32_t *len)
{
    if (q->seen == q->last_used)
        return 0;
    barrier();
    volatile struct used_elem *e = &q->used->ring[q->last_used % q->size];
    *id = e->id;
    *len = e->len;
    q->last_used++;
    d->completions++;
    return 1;
}

static void set_desc(struct vq *q, unsigned i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    q->desc[i].addr = addr;
    q->desc[i].len = len;
    q->desc[i].flags = flags;
    q->desc[i].next = next;
}

/* Makes chain `head` available (without notifying). */
static void submit(struct vq *q, uint16_t head)
{
    q->avail->ring[q->avail_idx % q->size] = head;
    barrier();
    q->avail->idx = ++q->avail_idx;
}

static void notify(struct vdev *d, struct vq *q)
{
    mb(); /* ring writes before the notification (virtio_wmb) */
    wr(d, R_QUEUE_NOTIFY, q->index);
}

/* ---- device initialization (§3.1.1) ---- */

/* How many queues d has, of which the driver sets up the first nq: a virtio-net device also has
 * a control queue when it offers VIRTIO_NET_F_CTRL_VQ, and two per queue pair with
 * VIRTIO_NET_F_MQ (§5.1.2), used or not. */
static unsigned device_queues(struct vdev *d, unsigned nq)
{
    if (d->type != TYPE_NET)
        return nq;
    unsigned pairs = 1;
    if (d->offered & NET_F_MQ)
        pairs = *(volatile uint16_t *)phys(d->base + R_CONFIG + 8); /* max_virtqueue_pairs */
    return 2 * pairs + !!(d->offered & NET_F_CTRL_VQ);
}

/* Resets d, negotiates features (VERSION_1 plus `wanted` where offered) and sets up nq queues of
 * QSZ entries (or d->q[i].size where the caller set one). Returns the accepted features; sets
 * d->broken on a failure. */
static uint64_t init_device(struct vdev *d, unsigned want_type, uint64_t wanted, int nq)
{
    const char *check = cname(d, "transport");
    uint32_t magic = rd(d, R_MAGIC), version = rd(d, R_VERSION), type = rd(d, R_DEVICE_ID);
    if (magic != 0x74726976)
        fail_val2(check, "MagicValue", magic, 0x74726976);
    else if (version != 2)
        fail_val2(check, "Version", version, 2);
    else if (type != want_type)
        fail_val2(check, "DeviceID", type, want_type);
    else
        ok(check);
    if (magic != 0x74726976 || version != 2 || type != want_type) {
        d->broken = "transport";
        return 0;
    }

    wr(d, R_STATUS, 0);
    if (rd(d, R_STATUS) != 0) {
        fail_val2(cname(d, "reset"), "Status after writing 0", rd(d, R_STATUS), 0);
        d->broken = "reset";
        return 0;
    }
    ok(cname(d, "reset"));
    wr(d, R_STATUS, S_ACKNOWLEDGE);
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    wr(d, R_DEVICE_FEATURES_SEL, 0);
    uint64_t offered = rd(d, R_DEVICE_FEATURES);
    wr(d, R_DEVICE_FEATURES_SEL, 1);
    offered |= (uint64_t)rd(d, R_DEVICE_FEATURES) << 32;
    d->offered = offered;
    uint64_t accept = offered & (F_VERSION_1 | wanted);
    wr(d, R_DRIVER_FEATURES_SEL, 0);
    wr(d, R_DRIVER_FEATURES, (uint32_t)accept);
    wr(d, R_DRIVER_FEATURES_SEL, 1);
    wr(d, R_DRIVER_FEATURES, (uint32_t)(accept >> 32));
    if (!(offered & F_VERSION_1)) {
        fail_val2(cname(d, "features"), "device features", offered, offered | F_VERSION_1);
        d->broken = "features";
        return 0;
    }
    ok(cname(d, "version_1"));
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    uint32_t st = rd(d, R_STATUS);
    if (!(st & S_FEATURES_OK)) {
        fail_val2(cname(d, "features_ok"), "Status after FEATURES_OK", st, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        d->broken = "features_ok";
        return 0;
    }
    ok(cname(d, "features_ok"));

    const char *qerr = 0;
    uint64_t qerr_val = 0;
    for (int i = 0; i < nq && !qerr; i++) {
        struct vq *q = &d->q[i];
        uint64_t page = alloc_pages(1);
        if (!q->size)
            q->size = QSZ;
        q->index = (unsigned)i;
        q->desc = phys(page);
        q->avail = phys(page + 0x800);
        q->used = phys(page + 0xc00);
        wr(d, R_QUEUE_SEL, (uint32_t)i);
        uint32_t max = rd(d, R_QUEUE_NUM_MAX);
        if (rd(d, R_QUEUE_READY) != 0)
            qerr = "QueueReady before setup is not 0 on queue ", qerr_val = (uint64_t)i;
        else if (max < q->size)
            qerr = "QueueNumMax too small on queue ", qerr_val = (uint64_t)i;
        if (qerr)
            break;
        wr(d, R_QUEUE_NUM, q->size);
        wr(d, R_QUEUE_DESC, (uint32_t)page);
        wr(d, R_QUEUE_DESC + 4, (uint32_t)(page >> 32));
        wr(d, R_QUEUE_DRIVER, (uint32_t)(page + 0x800));
        wr(d, R_QUEUE_DRIVER + 4, (uint32_t)((page + 0x800) >> 32));
        wr(d, R_QUEUE_DEVICE, (uint32_t)(page + 0xc00));
        wr(d, R_QUEUE_DEVICE + 4, (uint32_t)((page + 0xc00) >> 32));
        wr(d, R_QUEUE_READY, 1);
        if (rd(d, R_QUEUE_READY) != 1)
            qerr = "QueueReady does not read back 1 on queue ", qerr_val = (uint64_t)i;
        d->nq = i + 1;
    }
    /* The queue after the last one the device has must not exist (QueueNumMax 0). */
    unsigned last = device_queues(d, (unsigned)nq);
    wr(d, R_QUEUE_SEL, last);
    if (!qerr && rd(d, R_QUEUE_NUM_MAX) != 0)
        qerr = "QueueNumMax is not 0 for the queue after the last, queue ", qerr_val = last;
    if (qerr) {
        fail_begin(cname(d, "queues"));
        puts_serial(qerr);
        put_dec(qerr_val);
        fail_end();
        d->broken = "queues";
        return 0;
    }
    ok(cname(d, "queues"));

    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    st = rd(d, R_STATUS);
    if (st != (S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)) {
        fail_val2(cname(d, "driver_ok"), "Status", st, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        d->broken = "driver_ok";
        return 0;
    }
    ok(cname(d, "driver_ok"));
    return accept;
}

/* Reads a config field of 4 or 8 bytes at `off`, 32 bits at a time, consistent across the
 * generation counter (§4.2.2.2). */
static uint64_t config_rd(struct vdev *d, unsigned off, int bytes)
{
    uint32_t gen;
    uint64_t v;
    do {
        gen = rd(d, R_CONFIG_GENERATION);
        v = rd(d, R_CONFIG + off);
        if (bytes == 8)
            v |= (uint64_t)rd(d, R_CONFIG + off + 4) << 32;
    } while (gen != rd(d, R_CONFIG_GENERATION));
    return v;
}

/* ---- command line ---- */
static const char *cmdline;

/* `tg.<key><n><suffix>=` value, e.g. tg.blk0, tg.blk1ro. */
static const char *param_n(const char *key, unsigned n, const char *suffix)
{
    char k[32], *p = k;
    for (const char *s = "tg."; *s;)
        *p++ = *s++;
    while (*key)
        *p++ = *key++;
    *p++ = (char)('0' + n % 10);
    while (*suffix)
        *p++ = *suffix++;
    *p = 0;
    return cmdline_param(cmdline, k);
}

static int parse_hex32(const char *s, uint32_t *out)
{
    uint32_t v = 0;
    int n = 0;
    for (; n < 8; n++, s++) {
        int d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (*s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else
            return 0;
        v = v << 4 | (uint32_t)d;
    }
    *out = v;
    return *s == 0 || *s == ' ';
}

/* Every `virtio_mmio.device=<size>[KMG]@<base>:<irq>` word, in order (Linux's format). */
static void find_devices(void)
{
    static const char key[] = "virtio_mmio.device=";
    const char *s = cmdline;
    int bad = 0;
    while (*s) {
        while (*s == ' ')
            s++;
        const char *k = key, *w = s;
        while (*k && *w == *k)
            k++, w++;
        if (!*k) {
            uint64_t size, base, gsi;
            const char *e;
            int good = parse_u64(w, &size, &e);
            if (good && (*e == 'K' || *e == 'k'))
                size <<= 10, e++;
            else if (good && (*e == 'M' || *e == 'm'))
                size <<= 20, e++;
            good = good && *e == '@' && parse_u64(e + 1, &base, &e) && *e == ':' && parse_u64(e + 1, &gsi, &e) &&
                   (*e == ' ' || *e == 0) && size >= 0x200 && gsi < IOAPIC_PINS && ndevs < MAX_DEVICES;
            if (good) {
                struct vdev *d = &devs[ndevs++];
                d->base = base, d->gsi = (unsigned)gsi;
            } else {
                bad = 1;
            }
        }
        while (*s && *s != ' ')
            s++;
    }
    if (bad)
        fail("virtio.cmdline", "a virtio_mmio.device entry is malformed, or more than 8");
    else if (ndevs == 0)
        fail("virtio.cmdline", "no virtio_mmio.device entries");
    else
        ok("virtio.cmdline");
}

/* ---- virtio-blk ---- */
struct blk {
    uint64_t hdr;  /* request header (16 bytes) + status byte at +16 */
    uint64_t data; /* 2 pages */
    int ro;
};

static uint8_t blk_pattern(uint64_t sector, unsigned i)
{
    /* Also in src/lib.rs (blk_pattern): the host test looks for it in the image. */
    return (uint8_t)((i * 7) ^ (sector * 29) ^ 0xc3);
}

/* One request: header, `len` bytes of data at blk->data in `nsplit` descriptors, status. Returns
 * the status byte (or -1 when the device did not complete it: d->broken is set), the used length
 * in *used_len. */
static int blk_request(struct vdev *d, struct blk *b, const char *what, uint32_t type, uint64_t sector,
                       uint32_t len, unsigned nsplit, uint32_t *used_len)
{
    struct vq *q = &d->q[0];
    *(volatile uint32_t *)phys(b->hdr) = type;
    *(volatile uint32_t *)phys(b->hdr + 4) = 0;
    *(volatile uint64_t *)phys(b->hdr + 8) = sector;
    *(volatile uint8_t *)phys(b->hdr + 16) = 0xff;
    uint16_t dir = (type == BLK_T_OUT) ? 0 : D_WRITE;
    unsigned n = 0;
    set_desc(q, n, b->hdr, 16, D_NEXT, (uint16_t)(n + 1)), n++;
    for (unsigned i = 0; len && i < nsplit; i++)
        set_desc(q, n, b->data + i * (len / nsplit), len / nsplit, dir | D_NEXT, (uint16_t)(n + 1)), n++;
    set_desc(q, n, b->hdr + 16, 1, D_WRITE, 0);
    submit(q, 0);
    notify(d, q);
    const char *err = wait_used(d, q);
    uint32_t id = 0;
    if (!err && !pop_used(d, q, &id, used_len))
        err = "used ring empty";
    if (err) {
        fail(cname(d, what), err);
        d->broken = what;
        return -1;
    }
    if (id != 0) {
        fail_val2(cname(d, what), "used id", id, 0);
        d->broken = what;
        return -1;
    }
    return *(volatile uint8_t *)phys(b->hdr + 16);
}

/* A request whose status must be `want`; prints the FAIL if not. */
static int blk_expect(struct vdev *d, struct blk *b, const char *what, uint32_t type, uint64_t sector,
                      uint32_t len, unsigned nsplit, int want, uint32_t want_used)
{
    uint32_t used = 0;
    int st = blk_request(d, b, what, type, sector, len, nsplit, &used);
    if (st < 0)
        return 0;
    if (st != want) {
        fail_val2(cname(d, what), "status", (uint64_t)st, (uint64_t)want);
        return 0;
    }
    if (used != want_used) {
        fail_val2(cname(d, what), "used length", used, want_used);
        return 0;
    }
    return 1;
}

static void blk_batch(struct vdev *d, struct blk *b, int have, uint32_t want_fnv)
{
    enum { N = 4, SECTORS = BLK_CHECK_SECTORS / N };
    const char *check = cname(d, "batch");
    struct vq *q = &d->q[0];
    const uint32_t len = SECTORS * 512;
    zero(b->data, N * len);
    for (unsigned r = 0; r < N; r++) {
        uint64_t hdr = b->hdr + 32 + r * 32; /* header at +0, status at +16 */
        *(volatile uint32_t *)phys(hdr) = BLK_T_IN;
        *(volatile uint32_t *)phys(hdr + 4) = 0;
        *(volatile uint64_t *)phys(hdr + 8) = r * SECTORS;
        *(volatile uint8_t *)phys(hdr + 16) = 0xff;
        unsigned h = 3 * r;
        set_desc(q, h, hdr, 16, D_NEXT, (uint16_t)(h + 1));
        set_desc(q, h + 1, b->data + r * len, len, D_WRITE | D_NEXT, (uint16_t)(h + 2));
        set_desc(q, h + 2, hdr + 16, 1, D_WRITE, 0);
        submit(q, (uint16_t)h);
    }
    notify(d, q);
    unsigned done = 0, seen_mask = 0;
    const char *err = 0;
    while (done < N && !err) {
        err = wait_used(d, q);
        uint32_t id, n;
        while (!err && pop_used(d, q, &id, &n)) {
            unsigned r = id / 3;
            if (id % 3 || r >= N || (seen_mask & 1u << r))
                err = "a used id that is not an outstanding request head";
            else if (n != len + 1)
                err = "used length is not data + status";
            else if (*(volatile uint8_t *)phys(b->hdr + 32 + r * 32 + 16) != BLK_S_OK)
                err = "status is not OK";
            seen_mask |= 1u << r, done++;
        }
    }
    if (err) {
        fail_begin(check);
        puts_serial(err);
        puts_serial(" (");
        put_dec(done);
        puts_serial(" of 4 completed)");
        fail_end();
        d->broken = "batch";
        return;
    }
    uint32_t h = fnv1a32(phys(b->data), N * len);
    if (have && h != want_fnv)
        fail_val2(check, "FNV-1a of the first 8 sectors", h, want_fnv);
    else
        ok(check);
}

/* Resets the live device, checks the reset took (Status, QueueReady, InterruptStatus read 0), sets
 * it up again on a fresh queue and reads the first sectors once more: what a driver that is
 * reloaded (or a kexec'd kernel) does. */
static void blk_reinit(struct vdev *d, struct blk *b, int have, uint32_t want_fnv)
{
    const char *check = cname(d, "reinit");
    struct vq *q = &d->q[0];
    wr(d, R_STATUS, 0);
    wr(d, R_QUEUE_SEL, 0);
    uint32_t st = rd(d, R_STATUS), ready = rd(d, R_QUEUE_READY), isr = rd(d, R_INTERRUPT_STATUS);
    if (st != 0 || ready != 0 || isr != 0) {
        fail_begin(check);
        puts_serial("after reset: Status ");
        put_hex(st);
        puts_serial(" QueueReady ");
        put_hex(ready);
        puts_serial(" InterruptStatus ");
        put_hex(isr);
        puts_serial(", want all 0");
        fail_end();
        d->broken = "reinit";
        return;
    }
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    wr(d, R_DRIVER_FEATURES_SEL, 0);
    wr(d, R_DRIVER_FEATURES, (uint32_t)(d->offered & (BLK_F_RO | BLK_F_FLUSH)));
    wr(d, R_DRIVER_FEATURES_SEL, 1);
    wr(d, R_DRIVER_FEATURES, (uint32_t)(F_VERSION_1 >> 32));
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    uint64_t page = alloc_pages(1);
    cli(); /* the interrupt handler reads q */
    q->desc = phys(page);
    q->avail = phys(page + 0x800);
    q->used = phys(page + 0xc00);
    q->avail_idx = q->last_used = q->seen = 0;
    sti();
    wr(d, R_QUEUE_NUM, q->size);
    wr(d, R_QUEUE_DESC, (uint32_t)page);
    wr(d, R_QUEUE_DESC + 4, (uint32_t)(page >> 32));
    wr(d, R_QUEUE_DRIVER, (uint32_t)(page + 0x800));
    wr(d, R_QUEUE_DRIVER + 4, (uint32_t)((page + 0x800) >> 32));
    wr(d, R_QUEUE_DEVICE, (uint32_t)(page + 0xc00));
    wr(d, R_QUEUE_DEVICE + 4, (uint32_t)((page + 0xc00) >> 32));
    wr(d, R_QUEUE_READY, 1);
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    st = rd(d, R_STATUS);
    if (st != (S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)) {
        fail_val2(check, "Status after setting up again", st, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        d->broken = "reinit";
        return;
    }
    const uint32_t len = BLK_CHECK_SECTORS * 512;
    zero(b->data, len);
    if (blk_expect(d, b, "reinit", BLK_T_IN, 0, len, 1, BLK_S_OK, len + 1)) {
        uint32_t h = fnv1a32(phys(b->data), len);
        if (have && h != want_fnv)
            fail_val2(cname(d, "reinit"), "FNV-1a of the first 8 sectors", h, want_fnv);
        else
            ok(cname(d, "reinit"));
    }
}

static void blk_checks(struct vdev *d)
{
    struct blk b = {alloc_pages(1), alloc_pages(2), 0};
    uint64_t accepted = init_device(d, TYPE_BLOCK, BLK_F_RO | BLK_F_FLUSH, 1);

    /* Expectations: tg.blk<i>=<sectors>:<fnv>, tg.blk<i>ro=1. */
    uint64_t want_sectors = 0;
    uint32_t want_fnv = 0;
    const char *e, *v = param_n("blk", d->index, "");
    int have = v && parse_u64(v, &want_sectors, &e) && *e == ':' && parse_hex32(e + 1, &want_fnv);
    const char *ro = param_n("blk", d->index, "ro");
    b.ro = ro && ro[0] == '1';

    if (!skipped(d, "features")) {
        if (!(d->offered & BLK_F_FLUSH))
            fail_val2(cname(d, "features"), "VIRTIO_BLK_F_FLUSH offered", 0, 1);
        else if (!!(d->offered & BLK_F_RO) != b.ro)
            fail_val2(cname(d, "features"), "VIRTIO_BLK_F_RO offered", !!(d->offered & BLK_F_RO), (uint64_t)b.ro);
        else if (!!(accepted & BLK_F_RO) != b.ro)
            fail_val2(cname(d, "features"), "VIRTIO_BLK_F_RO accepted", !!(accepted & BLK_F_RO), (uint64_t)b.ro);
        else
            ok(cname(d, "features"));
    }

    uint64_t cap = 0;
    if (!skipped(d, "capacity")) {
        cap = config_rd(d, 0, 8);
        if (!have)
            fail(cname(d, "capacity"), "no tg.blk<i>=<sectors>:<fnv1a32> on the command line");
        else if (cap != want_sectors)
            fail_val2(cname(d, "capacity"), "capacity (sectors)", cap, want_sectors);
        else
            ok(cname(d, "capacity"));
    }

    /* The first sectors, in two data descriptors, against the host's checksum. */
    const uint32_t check_len = BLK_CHECK_SECTORS * 512;
    if (!skipped(d, "read")) {
        zero(b.data, check_len);
        if (blk_expect(d, &b, "read", BLK_T_IN, 0, check_len, 2, BLK_S_OK, check_len + 1)) {
            uint32_t h = fnv1a32(phys(b.data), check_len);
            if (!have)
                fail(cname(d, "read"), "no tg.blk<i>=<sectors>:<fnv1a32> on the command line");
            else if (h != want_fnv)
                fail_val2(cname(d, "read"), "FNV-1a of the first 8 sectors", h, want_fnv);
            else
                ok(cname(d, "read"));
        }
    }

    /* The same sectors as 4 requests of 2 sectors made available at once, one notification (as
     * Linux queues them): every one completes, in any order, each into its own buffer. */
    if (!skipped(d, "batch"))
        blk_batch(d, &b, have, want_fnv);

    if (!b.ro) {
        /* The last BLK_WRITE_SECTORS sectors: write, flush, read back. */
        const uint32_t wlen = BLK_WRITE_SECTORS * 512;
        uint64_t first = cap - BLK_WRITE_SECTORS;
        if (!skipped(d, "write")) {
            for (unsigned s = 0; s < BLK_WRITE_SECTORS; s++)
                for (unsigned i = 0; i < 512; i++)
                    *(uint8_t *)phys(b.data + s * 512 + i) = blk_pattern(first + s, i);
            if (cap < BLK_CHECK_SECTORS + BLK_WRITE_SECTORS)
                fail_val2(cname(d, "write"), "capacity", cap, BLK_CHECK_SECTORS + BLK_WRITE_SECTORS),
                    d->broken = "write";
            else if (blk_expect(d, &b, "write", BLK_T_OUT, first, wlen, 1, BLK_S_OK, 1))
                ok(cname(d, "write"));
        }
        if (!skipped(d, "flush") && blk_expect(d, &b, "flush", BLK_T_FLUSH, 0, 0, 0, BLK_S_OK, 1))
            ok(cname(d, "flush"));
        if (!skipped(d, "readback")) {
            zero(b.data, wlen);
            if (blk_expect(d, &b, "readback", BLK_T_IN, first, wlen, 4, BLK_S_OK, wlen + 1)) {
                uint64_t bad = ~0ULL;
                for (unsigned s = 0; s < BLK_WRITE_SECTORS && bad == ~0ULL; s++)
                    for (unsigned i = 0; i < 512; i++)
                        if (*(uint8_t *)phys(b.data + s * 512 + i) != blk_pattern(first + s, i)) {
                            bad = s * 512 + i;
                            break;
                        }
                if (bad != ~0ULL)
                    fail_val2(cname(d, "readback"), "first differing byte", bad, ~0ULL);
                else
                    ok(cname(d, "readback"));
            }
        }
    } else {
        /* A write to a read-only disk fails, and changes nothing. */
        if (!skipped(d, "ro_write")) {
            for (unsigned i = 0; i < 512; i++)
                *(uint8_t *)phys(b.data + i) = (uint8_t)~i;
            if (blk_expect(d, &b, "ro_write", BLK_T_OUT, 0, 512, 1, BLK_S_IOERR, 1))
                ok(cname(d, "ro_write"));
        }
        if (!skipped(d, "ro_unchanged")) {
            zero(b.data, check_len);
            if (blk_expect(d, &b, "ro_unchanged", BLK_T_IN, 0, check_len, 1, BLK_S_OK, check_len + 1)) {
                uint32_t h = fnv1a32(phys(b.data), check_len);
                if (have && h != want_fnv)
                    fail_val2(cname(d, "ro_unchanged"), "FNV-1a of the first 8 sectors", h, want_fnv);
                else
                    ok(cname(d, "ro_unchanged"));
            }
        }
    }

    if (!skipped(d, "get_id")) {
        zero(b.data, 64);
        if (blk_expect(d, &b, "get_id", BLK_T_GET_ID, 0, BLK_ID_BYTES, 1, BLK_S_OK, BLK_ID_BYTES + 1)) {
            char want[BLK_ID_BYTES] = "microcell-vd";
            want[12] = (char)('0' + d->index);
            const char *got = phys(b.data);
            int same = 1;
            for (int i = 0; i < BLK_ID_BYTES; i++)
                same &= got[i] == want[i];
            if (same) {
                ok(cname(d, "get_id"));
            } else {
                fail_begin(cname(d, "get_id"));
                puts_serial("got \"");
                for (int i = 0; i < BLK_ID_BYTES && got[i]; i++)
                    putc_serial(got[i] >= ' ' && got[i] < 127 ? got[i] : '?');
                puts_serial("\", want \"");
                puts_serial(want);
                puts_serial("\"");
                fail_end();
            }
        }
    }

    /* Past the end: one sector at `capacity`, and two straddling it. */
    if (!skipped(d, "read_past_end")) {
        if (blk_expect(d, &b, "read_past_end", BLK_T_IN, cap, 512, 1, BLK_S_IOERR, 1) &&
            blk_expect(d, &b, "read_past_end", BLK_T_IN, cap - 1, 1024, 1, BLK_S_IOERR, 1))
            ok(cname(d, "read_past_end"));
    }

    if (!skipped(d, "reinit"))
        blk_reinit(d, &b, have, want_fnv);
}

/* ---- virtio-console ---- */
struct con {
    uint64_t ctrl_rx; /* CON_CTRL_BUFS x CON_CTRL_BUF */
    uint64_t ctrl_tx;
    uint64_t rx;      /* CON_RX_BUFS x CON_RX_BUF */
    uint64_t tx;      /* 2 pages */
    uint64_t got;     /* reassembly, 2 pages */
};

static const char *con_send_ctrl(struct vdev *d, struct con *c, uint32_t id, uint16_t event, uint16_t value)
{
    struct vq *q = &d->q[CON_Q_CTRL_TX];
    *(volatile uint32_t *)phys(c->ctrl_tx) = id;
    *(volatile uint16_t *)phys(c->ctrl_tx + 4) = event;
    *(volatile uint16_t *)phys(c->ctrl_tx + 6) = value;
    set_desc(q, 0, c->ctrl_tx, 8, 0, 0);
    submit(q, 0);
    notify(d, q);
    uint32_t uid, len;
    const char *err = wait_used(d, q);
    if (!err && !pop_used(d, q, &uid, &len))
        err = "control transmit not completed";
    return err;
}

/* The next control message from the device: copied to msg (<= CON_CTRL_BUF), its buffer
 * posted again. */
static const char *con_recv_ctrl(struct vdev *d, struct con *c, uint8_t *msg, uint32_t *len)
{
    struct vq *q = &d->q[CON_Q_CTRL_RX];
    uint32_t id;
    const char *err = wait_used(d, q);
    if (err)
        return err;
    if (!pop_used(d, q, &id, len))
        return "control receive ring empty";
    if (id >= CON_CTRL_BUFS || *len > CON_CTRL_BUF || *len < 8)
        return "bad control receive completion (id or length)";
    copy((uint64_t)(uintptr_t)msg, c->ctrl_rx + id * CON_CTRL_BUF, *len);
    submit(q, (uint16_t)id);
    notify(d, q);
    return 0;
}

static uint32_t le32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* Expects the control message (id 0, event, value); extra (if any) must follow. */
static int con_expect_ctrl(struct vdev *d, struct con *c, const char *what, uint16_t event, uint16_t value,
                           const char *extra)
{
    uint8_t msg[CON_CTRL_BUF];
    uint32_t len = 0;
    const char *err = con_recv_ctrl(d, c, msg, &len);
    const char *check = cname(d, what);
    if (err) {
        fail(check, err);
        d->broken = what;
        return 0;
    }
    uint32_t n = 0;
    while (extra && extra[n])
        n++;
    int same = len == 8 + n;
    for (uint32_t i = 0; same && i < n; i++)
        same = msg[8 + i] == (uint8_t)extra[i];
    if (le16(msg + 4) != event)
        fail_val2(check, "event", le16(msg + 4), event);
    else if (le32(msg) != 0)
        fail_val2(check, "port id", le32(msg), 0);
    else if (le16(msg + 6) != value)
        fail_val2(check, "value", le16(msg + 6), value);
    else if (!same)
        fail_val2(check, "message length (or name differs)", len, 8 + n);
    else
        return ok(check), 1;
    d->broken = what;
    return 0;
}

/* Receives exactly `len` bytes on port 0 into c->got, posting each receive buffer again as soon
 * as it is emptied. Returns 0 or why not (*got: how far it came); *bufs: buffers used. */
static const char *con_recv(struct vdev *d, struct con *c, uint32_t len, uint32_t *got, uint32_t *bufs)
{
    struct vq *rx = &d->q[CON_Q_RX];
    const char *err = 0;
    uint32_t id, n;
    *got = *bufs = 0;
    zero(c->got, 8192);
    while (*got < len && !err) {
        err = wait_used(d, rx);
        int reposted = 0;
        while (!err && pop_used(d, rx, &id, &n)) {
            ++*bufs;
            if (id >= CON_RX_BUFS || n > CON_RX_BUF || n == 0)
                err = "bad receive completion (id or length)";
            else if (*got + n > len)
                err = "more bytes than expected";
            else
                copy(c->got + *got, c->rx + id * CON_RX_BUF, n), *got += n;
            submit(rx, (uint16_t)id);
            reposted = 1;
        }
        if (reposted)
            notify(d, rx);
    }
    return err;
}

static void fail_recv(const char *check, const char *err, uint32_t got, uint32_t len)
{
    fail_begin(check);
    puts_serial("receive: ");
    puts_serial(err);
    puts_serial(" after ");
    put_dec(got);
    puts_serial(" of ");
    put_dec(len);
    puts_serial(" bytes");
    fail_end();
}

/* Compares c->got with `want` XOR `x`; prints the FAIL at the first difference. */
static int con_compare(const char *check, struct con *c, uint64_t want, uint32_t len, uint8_t x)
{
    for (uint32_t i = 0; i < len; i++) {
        uint8_t w = *(uint8_t *)phys(want + i) ^ x, b = *(uint8_t *)phys(c->got + i);
        if (b != w) {
            fail_begin(check);
            puts_serial("byte ");
            put_dec(i);
            puts_serial(" = ");
            put_hex(b);
            puts_serial(", want ");
            put_hex(w);
            fail_end();
            return 0;
        }
    }
    return 1;
}

/* One echo round on port 0: sends `len` bytes (from c->tx, as `nsplit` descriptors), receives
 * them back XOR CON_XOR, reposting receive buffers as it goes. */
static void con_echo(struct vdev *d, struct con *c, const char *what, uint32_t len, unsigned nsplit,
                     unsigned min_bufs)
{
    const char *check = cname(d, what);
    struct vq *tx = &d->q[CON_Q_TX];
    uint32_t part = len / nsplit;
    for (unsigned i = 0; i < nsplit; i++)
        set_desc(tx, i, c->tx + i * part, i + 1 < nsplit ? part : len - i * part, i + 1 < nsplit ? D_NEXT : 0,
                 (uint16_t)(i + 1));
    submit(tx, 0);
    notify(d, tx);
    uint32_t id, n;
    const char *err = wait_used(d, tx);
    if (!err && !pop_used(d, tx, &id, &n))
        err = "transmit not completed";
    if (err) {
        fail_begin(check);
        puts_serial("transmit: ");
        puts_serial(err);
        fail_end();
        d->broken = what;
        return;
    }
    uint32_t got, bufs;
    err = con_recv(d, c, len, &got, &bufs);
    if (err) {
        fail_recv(check, err, got, len);
        d->broken = what;
        return;
    }
    if (!con_compare(check, c, c->tx, len, CON_XOR))
        return;
    if (bufs < min_bufs) {
        fail_val2(check, "receive buffers used", bufs, min_bufs);
        return;
    }
    puts_serial("TG info ");
    puts_serial(check);
    puts_serial(" bytes=");
    put_dec(len);
    puts_serial(" rx_buffers=");
    put_dec(bufs);
    putc_serial('\n');
    ok(check);
}

/* The offset of the first byte in [addr, addr + n) that is not v, or n (n > 0). One `repe scasb`
 * rather than a loop: loops are slow under PVM. */
static uint64_t scan_not(uint64_t addr, uint64_t n, uint8_t v)
{
    void *p = phys(addr);
    uint64_t left = n;
    uint8_t all;
    __asm__ volatile("repe scasb" : "+D"(p), "+c"(left), "=@ccz"(all) : "a"(v) : "memory");
    return all ? n : n - left - 1;
}

/* tg.clone=1: one byte from the host over the clone pages, then the host's go, then the pages
 * must hold that byte only: another VM's write (shared memory) or the snapshot's content showing
 * through would differ. */
static void con_clone(struct vdev *d, struct con *c)
{
    const char *what = "clone";
    const uint64_t size = CLONE_PAGES * 4096;
    uint32_t got, bufs;
    const char *err = con_recv(d, c, 1, &got, &bufs);
    if (err) {
        fail_recv(cname(d, what), err, got, 1), d->broken = what;
        return;
    }
    uint8_t v = *(volatile uint8_t *)phys(c->got);
    uint64_t bad = scan_not(clone_pages, size, CLONE_FILL);
    if (bad != size) {
        fail_val2(cname(d, what), "before the write, the first byte that is not CLONE_FILL: offset", bad, size);
        d->broken = what;
        return;
    }
    void *p = phys(clone_pages);
    uint64_t n = size;
    __asm__ volatile("rep stosb" : "+D"(p), "+c"(n) : "a"(v) : "memory");
    puts_serial("TG info clone wrote=");
    put_hex(v);
    putc_serial('\n');
    err = con_recv(d, c, 1, &got, &bufs);
    if (err) {
        fail_recv(cname(d, what), err, got, 1), d->broken = what;
        return;
    }
    bad = scan_not(clone_pages, size, v);
    if (bad != size) {
        fail_begin(cname(d, what));
        puts_serial("byte ");
        put_dec(bad);
        puts_serial(" = ");
        put_hex(*(volatile uint8_t *)phys(clone_pages + bad));
        puts_serial(", want ");
        put_hex(v);
        puts_serial(" (what this VM wrote)");
        fail_end();
        return;
    }
    ok(cname(d, what));
}

static void con_checks(struct vdev *d)
{
    struct con c = {alloc_pages(1), alloc_pages(1), alloc_pages(1), alloc_pages(2), alloc_pages(2)};
    uint64_t accepted = init_device(d, TYPE_CONSOLE, CON_F_MULTIPORT, 4);
    if (!skipped(d, "features")) {
        if (!(accepted & CON_F_MULTIPORT))
            fail_val2(cname(d, "features"), "VIRTIO_CONSOLE_F_MULTIPORT offered", 0, 1);
        else
            ok(cname(d, "features"));
    }
    if (!skipped(d, "config")) {
        uint64_t ports = config_rd(d, 4, 4);
        if (ports != 1)
            fail_val2(cname(d, "config"), "max_nr_ports", ports, 1);
        else
            ok(cname(d, "config"));
    }

    /* Control: receive buffers first, then DEVICE_READY (§5.3.6.1). Linux sends it with the id
     * VIRTIO_CONSOLE_BAD_ID. */
    if (!skipped(d, "device_add")) {
        struct vq *q = &d->q[CON_Q_CTRL_RX];
        for (unsigned i = 0; i < CON_CTRL_BUFS; i++) {
            set_desc(q, i, c.ctrl_rx + i * CON_CTRL_BUF, CON_CTRL_BUF, D_WRITE, 0);
            submit(q, (uint16_t)i);
        }
        notify(d, q);
        const char *err = con_send_ctrl(d, &c, 0xffffffff, CON_DEVICE_READY, 1);
        if (err) {
            fail_begin(cname(d, "device_add"));
            puts_serial("DEVICE_READY: ");
            puts_serial(err);
            fail_end();
            d->broken = "device_add";
        } else {
            con_expect_ctrl(d, &c, "device_add", CON_DEVICE_ADD, 0, 0);
        }
    }

    /* The port: its receive buffers, PORT_READY; the device names it and opens it. */
    if (!skipped(d, "port_name")) {
        struct vq *q = &d->q[CON_Q_RX];
        for (unsigned i = 0; i < CON_RX_BUFS; i++) {
            set_desc(q, i, c.rx + i * CON_RX_BUF, CON_RX_BUF, D_WRITE, 0);
            submit(q, (uint16_t)i);
        }
        notify(d, q);
        const char *err = con_send_ctrl(d, &c, 0, CON_PORT_READY, 1);
        if (err) {
            fail_begin(cname(d, "port_name"));
            puts_serial("PORT_READY: ");
            puts_serial(err);
            fail_end();
            d->broken = "port_name";
        } else {
            con_expect_ctrl(d, &c, "port_name", CON_PORT_NAME, 1, "agent");
        }
    }
    if (!skipped(d, "port_open"))
        con_expect_ctrl(d, &c, "port_open", CON_PORT_OPEN, 1, 0);
    if (!skipped(d, "guest_open")) {
        /* As Linux does when a program opens the port. */
        const char *err = con_send_ctrl(d, &c, 0, CON_PORT_OPEN, 1);
        if (err) {
            fail_begin(cname(d, "guest_open"));
            puts_serial("PORT_OPEN: ");
            puts_serial(err);
            fail_end();
            d->broken = "guest_open";
        } else {
            ok(cname(d, "guest_open"));
        }
    }

    /* The host wrote CON_GREETING as soon as the VM started, long before this driver had a
     * receive buffer: the device kept it in the socket until the buffers came. */
    if (!skipped(d, "host_first")) {
        uint32_t got, bufs, len = sizeof(CON_GREETING) - 1;
        const char *err = con_recv(d, &c, len, &got, &bufs);
        if (err)
            fail_recv(cname(d, "host_first"), err, got, len), d->broken = "host_first";
        else if (con_compare(cname(d, "host_first"), &c, (uint64_t)(uintptr_t)CON_GREETING, len, 0))
            ok(cname(d, "host_first"));
    }
    if (clone_mode && !skipped(d, "clone"))
        con_clone(d, &c);

    /* Round 1: every byte value and "ping\n" (fits one receive buffer). */
    if (!skipped(d, "echo")) {
        for (unsigned i = 0; i < 256; i++)
            *(uint8_t *)phys(c.tx + i) = (uint8_t)i;
        copy(c.tx + 256, (uint64_t)(uintptr_t) "ping\n", 5);
        con_echo(d, &c, "echo", 261, 1, 1);
    }
    /* Round 2: larger than one receive buffer, and than all of them together (the device stops
     * reading the host socket until buffers come back), sent as two descriptors. */
    if (!skipped(d, "echo_multi")) {
        for (unsigned i = 0; i < CON_ROUND2_LEN; i++)
            *(uint8_t *)phys(c.tx + i) = (uint8_t)(i * 131 + (i >> 8) + 1);
        con_echo(d, &c, "echo_multi", CON_ROUND2_LEN, 2, (CON_ROUND2_LEN + CON_RX_BUF - 1) / CON_RX_BUF);
    }
}

/* ---- virtio-net ---- */
struct net {
    uint8_t mac[6], ip[4], gw[4], gw_mac[6]; /* tg.net<i>; gw_mac from the ARP check */
    uint16_t port;
    int reply;          /* expect=reply (else blocked) */
    uint64_t rx;        /* NET_RX_BUFS x NET_RX_BUF */
    uint64_t rx_hdr;    /* the header descriptors of the two-descriptor buffers, 16 bytes apart */
    uint64_t tx;        /* NET_TX_SLOTS x NET_TX_SLOT */
    uint64_t frame;     /* the received frame being looked at, copied out of its buffer */
    uint64_t build;     /* the frame being made, copied into its transmit slot */
    uint32_t rx_posted; /* receive buffers the device has, by buffer */
    uint64_t tx_busy;   /* transmit chains the device has, by head descriptor */
    uint16_t ip_id;
    uint32_t rx_frames, rx_ignored, rx_reposted, tx_frames, arp_answered, num_buffers_unset;
};

/* What a received frame is to the waits below. */
enum { NET_OTHER, NET_ARP_ASKED, NET_ARP_GW, NET_UDP };

static const uint8_t MAC_BROADCAST[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
static const uint8_t MAC_ZERO[6];

static void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8), p[1] = (uint8_t)v; } /* big endian */
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static int same(const void *a, const void *b, unsigned n)
{
    const uint8_t *x = a, *y = b;
    while (n--)
        if (*x++ != *y++)
            return 0;
    return 1;
}

/* The Internet checksum (RFC 1071) of n bytes (n even): 0 over a header that has a right one. */
static uint16_t ip_sum(const uint8_t *p, unsigned n)
{
    uint32_t s = 0;
    for (unsigned i = 0; i < n; i += 2)
        s += get16(p + i);
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

static void put_mac(const uint8_t *m)
{
    for (int i = 0; i < 6; i++) {
        if (i)
            putc_serial(':');
        putc_serial("0123456789abcdef"[m[i] >> 4]);
        putc_serial("0123456789abcdef"[m[i] & 15]);
    }
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* tg.net<i>=<mac>,<ip>,<gateway ip>,<udp port>,<reply|blocked> */
static int parse_net(const char *s, struct net *n)
{
    for (int i = 0; i < 6; i++) {
        if (i && *s++ != ':')
            return 0;
        int hi = hex_digit(s[0]), lo = hi < 0 ? -1 : hex_digit(s[1]);
        if (lo < 0)
            return 0;
        n->mac[i] = (uint8_t)(hi << 4 | lo), s += 2;
    }
    for (int k = 0; k < 2; k++) {
        uint8_t *ip = k ? n->gw : n->ip;
        for (int i = 0; i < 4; i++) {
            uint64_t v;
            if (*s++ != (i ? '.' : ','))
                return 0;
            if (!parse_u64(s, &v, &s) || v > 255)
                return 0;
            ip[i] = (uint8_t)v;
        }
    }
    uint64_t port;
    if (*s++ != ',' || !parse_u64(s, &port, &s) || port == 0 || port > 0xffff || *s++ != ',')
        return 0;
    n->port = (uint16_t)port;
    const char *w = s[0] == 'r' ? "reply" : "blocked";
    while (*w && *s == *w)
        s++, w++;
    n->reply = s[-1] == 'y';
    return !*w && (*s == ' ' || *s == 0);
}

/* Receive buffer b: one 2048-byte descriptor (b < NET_RX_ONE), or a 12-byte header descriptor
 * chained to a NET_RX_DATA one, the two apart in memory. */
static uint16_t net_rx_head(unsigned b) { return (uint16_t)(b < NET_RX_ONE ? b : NET_RX_ONE + 2 * (b - NET_RX_ONE)); }
static int net_rx_buf(uint32_t head)
{
    if (head < NET_RX_ONE)
        return (int)head;
    if (head < NET_RX_ONE + 2 * (NET_RX_BUFS - NET_RX_ONE) && (head - NET_RX_ONE) % 2 == 0)
        return (int)(NET_RX_ONE + (head - NET_RX_ONE) / 2);
    return -1;
}
static uint64_t net_rx_hdr(struct net *n, unsigned b)
{
    return b < NET_RX_ONE ? n->rx + b * NET_RX_BUF : n->rx_hdr + b * 16;
}
static uint64_t net_rx_data(struct net *n, unsigned b)
{
    return b < NET_RX_ONE ? n->rx + b * NET_RX_BUF + NET_HDR : n->rx + b * NET_RX_BUF;
}

/* Makes receive buffer b available (without notifying). Its header is poisoned, so that a device
 * that does not write one is caught, except num_buffers: 0 there is counted, not failed (§5.1.6.4
 * wants 1 without VIRTIO_NET_F_MRG_RXBUF, but QEMU 7.2 and older vhost-net leave it unwritten,
 * and Linux ignores it then). */
static void net_rx_post(struct vdev *d, struct net *n, unsigned b)
{
    struct vq *q = &d->q[NET_Q_RX];
    uint16_t h = net_rx_head(b);
    fill(net_rx_hdr(n, b), NET_HDR - 2, 0xff);
    zero(net_rx_hdr(n, b) + NET_HDR - 2, 2);
    if (b < NET_RX_ONE) {
        set_desc(q, h, n->rx + b * NET_RX_BUF, NET_RX_BUF, D_WRITE, 0);
    } else {
        set_desc(q, h, net_rx_hdr(n, b), NET_HDR, D_WRITE | D_NEXT, (uint16_t)(h + 1));
        set_desc(q, h + 1, net_rx_data(n, b), NET_RX_DATA, D_WRITE, 0);
    }
    n->rx_posted |= 1u << b;
    submit(q, h);
}

/* Transmit slot s: batch frame s (s < NET_BATCH; odd ones as two descriptors, so three
 * descriptors per pair), then NET_SLOT_ARP and NET_SLOT_SEND with two descriptors each. The
 * frame follows the header (one descriptor) or lies apart from it (two). */
static uint16_t net_tx_head(unsigned s)
{
    return (uint16_t)(s < NET_BATCH ? 3 * (s / 2) + (s & 1) : 3 * NET_BATCH / 2 + 2 * (s - NET_BATCH));
}
static uint64_t net_tx_frame(struct net *n, unsigned s, int two)
{
    return n->tx + s * NET_TX_SLOT + (two ? 32 : NET_HDR);
}

/* Takes the transmit completions the interrupt handler has seen. 0 or what was wrong. */
static const char *net_tx_reap(struct vdev *d, struct net *n)
{
    uint32_t id, len;
    while (pop_used(d, &d->q[NET_Q_TX], &id, &len)) {
        if (id >= NET_TX_QSZ || !(n->tx_busy >> id & 1))
            return "a transmit used id that is not an outstanding chain head";
        n->tx_busy &= ~(1ULL << id);
    }
    return 0;
}

/* Waits until the device has completed every transmit chain whose head is in mask. */
static const char *net_tx_wait(struct vdev *d, struct net *n, uint64_t mask)
{
    const char *err = net_tx_reap(d, n);
    while (!err && (n->tx_busy & mask)) {
        err = wait_used(d, &d->q[NET_Q_TX]);
        if (!err)
            err = net_tx_reap(d, n);
    }
    return err;
}

/* Sends the frame at n->build (len bytes) from slot s behind a zero header, as one descriptor or
 * two; notifies unless the caller gathers several under one notification. */
static const char *net_send(struct vdev *d, struct net *n, unsigned s, int two, uint32_t len, int kick)
{
    struct vq *q = &d->q[NET_Q_TX];
    uint16_t h = net_tx_head(s);
    const char *err = net_tx_wait(d, n, 1ULL << h); /* the slot's last frame is gone */
    if (err)
        return err;
    uint64_t hdr = n->tx + s * NET_TX_SLOT;
    zero(hdr, NET_HDR);
    copy(net_tx_frame(n, s, two), n->build, len);
    if (two) {
        set_desc(q, h, hdr, NET_HDR, D_NEXT, (uint16_t)(h + 1));
        set_desc(q, h + 1, net_tx_frame(n, s, 1), len, 0, 0);
    } else {
        set_desc(q, h, hdr, NET_HDR + len, 0, 0);
    }
    n->tx_busy |= 1ULL << h;
    n->tx_frames++;
    submit(q, h);
    if (kick)
        notify(d, q);
    return 0;
}

static void net_eth(uint8_t *f, const uint8_t *dst, const uint8_t *src, uint16_t type)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    put16(f + 12, type);
}

/* An ARP packet from the guest (RFC 826, Ethernet/IPv4) at n->build; returns its length. */
static uint32_t net_arp_frame(struct net *n, const uint8_t *eth_dst, uint16_t op, const uint8_t *tha,
                              const uint8_t *tpa)
{
    uint8_t *f = phys(n->build), *a = f + 14;
    net_eth(f, eth_dst, n->mac, 0x0806);
    put16(a, 1);
    put16(a + 2, 0x0800);
    a[4] = 6, a[5] = 4;
    put16(a + 6, op);
    memcpy(a + 8, n->mac, 6);
    memcpy(a + 14, n->ip, 4);
    memcpy(a + 18, tha, 6);
    memcpy(a + 24, tpa, 4);
    return 14 + 28;
}

/* An IPv4/UDP datagram guest:NET_GUEST_PORT -> gateway:port at n->build (TTL 64, no UDP
 * checksum); returns its length. */
static uint32_t net_udp_frame(struct net *n, const void *payload, uint32_t plen)
{
    uint8_t *f = phys(n->build), *ip = f + 14, *u = ip + 20;
    net_eth(f, n->gw_mac, n->mac, 0x0800);
    ip[0] = 0x45, ip[1] = 0;
    put16(ip + 2, 20 + 8 + plen);
    put16(ip + 4, n->ip_id++);
    put16(ip + 6, 0);
    ip[8] = 64, ip[9] = 17;
    put16(ip + 10, 0);
    memcpy(ip + 12, n->ip, 4);
    memcpy(ip + 16, n->gw, 4);
    put16(ip + 10, ip_sum(ip, 20));
    put16(u, NET_GUEST_PORT);
    put16(u + 2, n->port);
    put16(u + 4, 8 + plen);
    put16(u + 6, 0);
    memcpy(u + 8, payload, plen);
    return 14 + 20 + 8 + plen;
}

/* The next received frame, copied to n->frame (*len bytes, without the virtio header, which is
 * checked); its buffer goes back to the device at once. Waits at most until `ms` after (t0, k0);
 * quiet as in wait_used_until. */
static const char *net_recv(struct vdev *d, struct net *n, uint64_t t0, uint32_t k0, uint32_t ms, int quiet,
                            uint32_t *len)
{
    struct vq *q = &d->q[NET_Q_RX];
    uint32_t id, used;
    const char *err = wait_used_until(d, q, t0, k0, ms, quiet);
    if (!err)
        err = net_tx_reap(d, n); /* by the way: transmit slots free again */
    if (err)
        return err;
    if (!pop_used(d, q, &id, &used))
        return "receive used ring empty";
    int b = net_rx_buf(id);
    if (b < 0 || !(n->rx_posted >> b & 1))
        return "a receive used id that is not a posted buffer's head";
    n->rx_posted &= ~(1u << b);
    if (used < NET_HDR + 14 || used > NET_HDR + NET_MTU_FRAME)
        return "receive used length is not a 12-byte header and an Ethernet frame (14..1514 bytes)";
    const volatile uint8_t *h = phys(net_rx_hdr(n, (unsigned)b));
    if (h[0] != 0 || h[1] != 0) /* flags, gso_type: no offloads were negotiated */
        return "receive header flags or gso_type not 0";
    uint16_t num_buffers = (uint16_t)(h[10] | h[11] << 8);
    if (num_buffers == 0)
        n->num_buffers_unset++;
    else if (num_buffers != 1)
        return "receive header num_buffers is not 1";
    *len = used - NET_HDR;
    copy(n->frame, net_rx_data(n, (unsigned)b), *len);
    net_rx_post(d, n, (unsigned)b);
    notify(d, q);
    n->rx_frames++, n->rx_reposted++;
    return 0;
}

/* Looks at the frame in n->frame: answers an ARP request for the guest's address (a peer such as
 * passt or slirp asks before it sends), and says what it is: the gateway's ARP reply (its MAC
 * noted), a UDP datagram gateway:port -> guest:NET_GUEST_PORT (*payload, *plen), or NET_OTHER
 * (another protocol, address or MAC: a driver drops those). */
static const char *net_input(struct vdev *d, struct net *n, uint32_t len, int *kind, const uint8_t **payload,
                             uint32_t *plen)
{
    const uint8_t *f = phys(n->frame);
    *kind = NET_OTHER;
    if (!same(f, n->mac, 6) && !same(f, MAC_BROADCAST, 6))
        return 0;
    uint16_t type = get16(f + 12);
    const uint8_t *a = f + 14;
    if (type == 0x0806 && len >= 14 + 28 && get16(a) == 1 && get16(a + 2) == 0x0800 && a[4] == 6 && a[5] == 4) {
        uint16_t op = get16(a + 6);
        if (op == 1 && same(a + 24, n->ip, 4)) {
            uint8_t sha[6], spa[4];
            memcpy(sha, a + 8, 6);
            memcpy(spa, a + 14, 4);
            uint32_t flen = net_arp_frame(n, sha, 2, sha, spa);
            n->arp_answered++;
            *kind = NET_ARP_ASKED;
            return net_send(d, n, NET_SLOT_ARP, 1, flen, 1);
        }
        if (op == 2 && same(a + 14, n->gw, 4) && same(a + 24, n->ip, 4)) {
            memcpy(n->gw_mac, a + 8, 6);
            *kind = NET_ARP_GW;
        }
        return 0;
    }
    const uint8_t *ip = f + 14;
    if (type != 0x0800 || len < 14 + 20 + 8 || ip[0] >> 4 != 4 || ip[9] != 17)
        return 0;
    uint32_t ihl = (ip[0] & 15) * 4u, tot = get16(ip + 2);
    if (ihl < 20 || tot < ihl + 8 || 14 + tot > len || (get16(ip + 6) & 0x3fff)) /* no fragments */
        return 0;
    const uint8_t *u = ip + ihl;
    if (!same(ip + 12, n->gw, 4) || !same(ip + 16, n->ip, 4) || get16(u) != n->port || get16(u + 2) != NET_GUEST_PORT)
        return 0;
    if (ip_sum(ip, ihl) != 0)
        return "a datagram from the gateway has a wrong IPv4 header checksum";
    if (get16(u + 4) < 8 || get16(u + 4) > tot - ihl)
        return "a datagram from the gateway has a wrong UDP length";
    *kind = NET_UDP;
    *payload = u + 8;
    *plen = get16(u + 4) - 8u;
    return 0;
}

/* Receives until a frame of kind `want` comes (0), answering ARP requests and dropping other
 * frames, for at most ms (quiet as in wait_used_until). */
static const char *net_wait(struct vdev *d, struct net *n, int want, uint32_t ms, int quiet, const uint8_t **payload,
                            uint32_t *plen)
{
    uint64_t t0 = rdtsc();
    uint32_t k0 = ticks;
    for (;;) {
        uint32_t len;
        int kind;
        const char *err = net_recv(d, n, t0, k0, ms, quiet, &len);
        if (!err)
            err = net_input(d, n, len, &kind, payload, plen);
        if (err || kind == want)
            return err;
        if (kind != NET_ARP_ASKED)
            n->rx_ignored++;
    }
}

static void net_fail(struct vdev *d, const char *what, const char *doing, const char *err)
{
    fail_begin(cname(d, what));
    puts_serial(doing);
    puts_serial(": ");
    puts_serial(err);
    fail_end();
    d->broken = what;
}

/* One datagram out (two descriptors), then its echo back, or (blocked) nothing back. */
static void net_udp(struct vdev *d, struct net *n)
{
    const char *check = cname(d, "udp");
    uint32_t plen = sizeof(NET_PING) - 1, got_len = 0;
    const uint8_t *got = 0;
    const char *err = net_send(d, n, NET_SLOT_SEND, 1, net_udp_frame(n, NET_PING, plen), 1);
    if (!err)
        err = net_tx_wait(d, n, ~0ULL);
    if (err) {
        net_fail(d, "udp", "transmit", err);
        return;
    }
    if (!n->reply) {
        err = net_wait(d, n, NET_UDP, NET_BLOCKED_MS, 1, &got, &got_len);
        if (err == WAIT_QUIET)
            ok(check);
        else if (err)
            net_fail(d, "udp", "receive", err);
        else
            fail(check, got_len == plen && got[0] == (uint8_t)(NET_PING[0] ^ CON_XOR)
                            ? "the echo came back (expect=blocked)"
                            : "a datagram came back from the gateway's port (expect=blocked)");
        return;
    }
    err = net_wait(d, n, NET_UDP, wait_limit(), 0, &got, &got_len);
    if (err) {
        net_fail(d, "udp", "waiting for the echo", err);
        return;
    }
    if (got_len != plen) {
        fail_val2(check, "echo payload bytes", got_len, plen);
        return;
    }
    for (uint32_t i = 0; i < plen; i++)
        if (got[i] != (uint8_t)(NET_PING[i] ^ CON_XOR)) {
            fail_begin(check);
            puts_serial("echo payload byte ");
            put_dec(i);
            puts_serial(" = ");
            put_hex(got[i]);
            puts_serial(", want ");
            put_hex((uint8_t)(NET_PING[i] ^ CON_XOR));
            fail_end();
            return;
        }
    ok(check);
}

/* NET_BATCH datagrams made available at once under one notification (even ones as one
 * descriptor, odd ones as two), their echoes back in any order, each once: more than the
 * receive buffers, so the device waits for them to be posted again. */
static void net_batch(struct vdev *d, struct net *n)
{
    const char *what = "udp_batch";
    const uint32_t plen = sizeof(NET_BATCH_PREFIX) - 1 + 2;
    char payload[sizeof(NET_BATCH_PREFIX) + 2];
    const char *err = 0;
    memcpy(payload, NET_BATCH_PREFIX, sizeof(NET_BATCH_PREFIX) - 1);
    uint64_t batch_heads = 0;
    for (unsigned i = 0; i < NET_BATCH && !err; i++) {
        payload[plen - 2] = (char)('0' + i / 10);
        payload[plen - 1] = (char)('0' + i % 10);
        err = net_send(d, n, i, i & 1, net_udp_frame(n, payload, plen), 0);
        batch_heads |= 1ULL << net_tx_head(i);
    }
    if (err) {
        net_fail(d, what, "transmit", err);
        return;
    }
    notify(d, &d->q[NET_Q_TX]);

    uint32_t seen = 0, replies = 0, reposted = n->rx_reposted;
    uint64_t t0 = rdtsc();
    uint32_t k0 = ticks, ms = wait_limit();
    while (replies < NET_BATCH && !err) {
        uint32_t len, got_len = 0;
        const uint8_t *got = 0;
        int kind;
        err = net_recv(d, n, t0, k0, ms, 0, &len);
        if (!err)
            err = net_input(d, n, len, &kind, &got, &got_len);
        if (err)
            break;
        if (kind != NET_UDP) {
            n->rx_ignored += kind != NET_ARP_ASKED;
            continue;
        }
        int good = got_len == plen;
        for (uint32_t i = 0; good && i < plen - 2; i++)
            good = got[i] == (uint8_t)(payload[i] ^ CON_XOR);
        unsigned hi = (got[plen - 2] ^ CON_XOR) - '0', lo = (got[plen - 1] ^ CON_XOR) - '0', k = hi * 10 + lo;
        if (!good || hi > 9 || lo > 9 || k >= NET_BATCH)
            err = "a datagram from the gateway that is no batch datagram's echo";
        else if (seen >> k & 1)
            err = "an echo came twice";
        else
            seen |= 1u << k, replies++;
    }
    const char *tx_err = net_tx_wait(d, n, batch_heads);
    unsigned sent = 0;
    for (unsigned i = 0; i < NET_BATCH; i++)
        sent += !(n->tx_busy >> net_tx_head(i) & 1);
    puts_serial("TG info ");
    puts_serial(d->name);
    puts_serial(" batch tx=");
    put_dec(sent);
    puts_serial(" rx=");
    put_dec(replies);
    puts_serial(" rx_buffers_reposted=");
    put_dec(n->rx_reposted - reposted);
    putc_serial('\n');
    if (err || tx_err) {
        fail_begin(cname(d, what));
        puts_serial(err ? "receive: " : "transmit: ");
        puts_serial(err ? err : tx_err);
        puts_serial(" (");
        put_dec(replies);
        puts_serial(" of 32 echoes, ");
        put_dec(sent);
        puts_serial(" of 32 sent)");
        fail_end();
        d->broken = what;
        return;
    }
    ok(cname(d, what));
}

static void net_checks(struct vdev *d)
{
    struct net n = {0};
    n.rx = alloc_pages(NET_RX_BUFS * NET_RX_BUF / 4096);
    n.rx_hdr = alloc_pages(1);
    n.tx = alloc_pages((NET_TX_SLOTS * NET_TX_SLOT + 4095) / 4096);
    n.frame = alloc_pages(1);
    n.build = n.frame + 2048;
    n.ip_id = 1;
    d->q[NET_Q_TX].size = NET_TX_QSZ; /* NET_BATCH frames in flight at once */
    init_device(d, TYPE_NET, NET_F_MAC, 2);
    const char *v = param_n("net", d->index, "");
    int have = v && parse_net(v, &n);

    if (!skipped(d, "features")) {
        if (!(d->offered & NET_F_MAC))
            fail_val2(cname(d, "features"), "VIRTIO_NET_F_MAC offered", 0, 1);
        else
            ok(cname(d, "features"));
    }
    if (!skipped(d, "mac")) {
        uint8_t mac[6];
        uint32_t gen;
        do { /* byte-wise: 8-bit fields take 8-bit accesses (§4.2.2.2) */
            gen = rd(d, R_CONFIG_GENERATION);
            for (int i = 0; i < 6; i++)
                mac[i] = *(volatile uint8_t *)phys(d->base + R_CONFIG + (unsigned)i);
        } while (gen != rd(d, R_CONFIG_GENERATION));
        if (!have) {
            fail(cname(d, "mac"), "no tg.net<i>=<mac>,<ip>,<gateway>,<udp port>,<reply|blocked> on the command line");
            d->broken = "mac";
        } else if (!same(mac, n.mac, 6)) {
            fail_begin(cname(d, "mac"));
            puts_serial("config space MAC ");
            put_mac(mac);
            puts_serial(", want ");
            put_mac(n.mac);
            fail_end();
        } else {
            ok(cname(d, "mac"));
        }
    }

    /* Receive buffers first (after DRIVER_OK: §3.1.1), then who-has gateway. */
    if (!skipped(d, "arp")) {
        for (unsigned b = 0; b < NET_RX_BUFS; b++)
            net_rx_post(d, &n, b);
        notify(d, &d->q[NET_Q_RX]);
        const uint8_t *unused;
        uint32_t unused_len;
        const char *err = net_send(d, &n, NET_SLOT_SEND, 0, net_arp_frame(&n, MAC_BROADCAST, 1, MAC_ZERO, n.gw), 1);
        if (!err)
            err = net_tx_wait(d, &n, ~0ULL);
        if (err) {
            net_fail(d, "arp", "transmit", err);
        } else if ((err = net_wait(d, &n, NET_ARP_GW, wait_limit(), 0, &unused, &unused_len)) != 0) {
            net_fail(d, "arp", "waiting for the gateway's ARP reply", err);
        } else {
            puts_serial("TG info ");
            puts_serial(d->name);
            puts_serial(" gateway_mac=");
            put_mac(n.gw_mac);
            putc_serial('\n');
            ok(cname(d, "arp"));
        }
    }
    if (!skipped(d, "udp"))
        net_udp(d, &n);
    if ((n.reply || !have) && !skipped(d, "udp_batch")) /* without tg.net<i>: "not run" */
        net_batch(d, &n);

    puts_serial("TG info ");
    puts_serial(d->name);
    puts_serial(" frames rx=");
    put_dec(n.rx_frames);
    puts_serial(" ignored=");
    put_dec(n.rx_ignored);
    puts_serial(" arp_answered=");
    put_dec(n.arp_answered);
    puts_serial(" tx=");
    put_dec(n.tx_frames);
    puts_serial(" num_buffers_unset=");
    put_dec(n.num_buffers_unset);
    putc_serial('\n');
}

/* ---- main ---- */
static void report_interrupts(struct vdev *d)
{
    puts_serial("TG info irq ");
    puts_serial(d->name);
    puts_serial(" gsi=");
    put_dec(d->gsi);
    puts_serial(" vector=");
    put_hex(VEC_BASE + d->gsi);
    puts_serial(" count=");
    put_dec(d->irqs);
    puts_serial(" used_ring=");
    put_dec(d->irqs_used);
    puts_serial(" empty=");
    put_dec(d->irqs_empty);
    puts_serial(" completions=");
    put_dec(d->completions);
    puts_serial(" lost=");
    put_dec(d->lost);
    putc_serial('\n');
    const char *check = cname(d, "interrupts");
    if (d->lost) {
        fail_begin(check);
        put_dec(d->lost);
        puts_serial(" completions came without an interrupt (found after 5 s)");
        fail_end();
    } else if (d->completions && !d->irqs_used) {
        fail(check, "no interrupt with the used-ring bit in InterruptStatus");
    } else {
        ok(check);
    }
}

void tg_main(void)
{
    install_idt();
    puts_serial("TG begin virtio entry=");
    puts_serial(boot_state.kind == ENTRY_PVH ? "pvh" : "linux64");
    putc_serial('\n');
    heap = ((uint64_t)(uintptr_t)__image_end + 0xfff) & ~0xfffULL;

    /* PVH: hvm_start_info (ebx) .cmdline_paddr; the Linux entries: the contract's address. */
    uint64_t cl = 0x20000;
    if (boot_state.kind == ENTRY_PVH)
        cl = *(volatile uint64_t *)phys(boot_state.gpr[RBX] + 24);
    cmdline = phys(cl);
    puts_serial("TG cmdline ");
    puts_serial(cmdline);
    putc_serial('\n');

    uint64_t n;
    const char *v = cmdline_param(cmdline, "tg.wait_ms");
    if (v && parse_u64(v, &n, 0) && n > 0 && n < 0x100000000ULL)
        wait_ms = (uint32_t)n;
    v = cmdline_param(cmdline, "tg.clone");
    clone_mode = v && v[0] == '1';
    v = cmdline_param(cmdline, "tg.con_first");
    int con_first = v && v[0] == '1';
    if (clone_mode) {
        clone_pages = alloc_pages(CLONE_PAGES);
        void *p = phys(clone_pages);
        uint64_t len = CLONE_PAGES * 4096;
        __asm__ volatile("rep stosb" : "+D"(p), "+c"(len) : "a"(CLONE_FILL) : "memory");
    }

    setup_interrupts();
    find_devices();

    /* Identify the devices and check them against tg.nblk / tg.ncon. */
    unsigned nblk = 0, ncon = 0, nnet = 0, nother = 0;
    for (int i = 0; i < ndevs; i++) {
        struct vdev *d = &devs[i];
        d->type = rd(d, R_DEVICE_ID);
        const char *prefix = d->type == TYPE_BLOCK     ? "blk"
                             : d->type == TYPE_CONSOLE ? "con"
                             : d->type == TYPE_NET     ? "net"
                                                       : "dev";
        d->index = d->type == TYPE_BLOCK     ? nblk++
                   : d->type == TYPE_CONSOLE ? ncon++
                   : d->type == TYPE_NET     ? nnet++
                                             : nother++;
        for (int k = 0; k < 3; k++)
            d->name[k] = prefix[k];
        d->name[3] = (char)('0' + d->index);
        by_gsi[d->gsi] = d;
    }
    uint64_t want_blk = 0, want_con = 0, want_net = 0; /* no tg.nnet: no net devices */
    const char *vb = cmdline_param(cmdline, "tg.nblk"), *vc = cmdline_param(cmdline, "tg.ncon"),
               *vn = cmdline_param(cmdline, "tg.nnet");
    if (!vb || !vc || !parse_u64(vb, &want_blk, 0) || !parse_u64(vc, &want_con, 0))
        fail("virtio.devices", "no tg.nblk=<n> tg.ncon=<n> on the command line");
    else if (vn && !parse_u64(vn, &want_net, 0))
        fail("virtio.devices", "tg.nnet=<n> is malformed");
    else if (nblk != want_blk)
        fail_val2("virtio.devices", "block devices", nblk, want_blk);
    else if (ncon != want_con)
        fail_val2("virtio.devices", "console devices", ncon, want_con);
    else if (nnet != want_net)
        fail_val2("virtio.devices", "net devices", nnet, want_net);
    else if (nother)
        fail_val2("virtio.devices", "devices of other types", nother, 0);
    else
        ok("virtio.devices");

    for (int i = 0; i < ndevs; i++)
        route_irq(&devs[i]);
    if (con_first)
        for (int i = 0; i < ndevs; i++)
            if (devs[i].type == TYPE_CONSOLE)
                con_checks(&devs[i]);
    for (int i = 0; i < ndevs; i++) {
        struct vdev *d = &devs[i];
        if (d->type == TYPE_BLOCK)
            blk_checks(d);
        else if (d->type == TYPE_CONSOLE && !con_first)
            con_checks(d);
        else if (d->type == TYPE_NET)
            net_checks(d);
    }
    for (int i = 0; i < ndevs; i++)
        if (devs[i].type == TYPE_BLOCK || devs[i].type == TYPE_CONSOLE || devs[i].type == TYPE_NET)
            report_interrupts(&devs[i]);
    puts_serial("TG info timer ticks=");
    put_dec(ticks);
    putc_serial('\n');
    if (stray_irqs)
        fail_val2("interrupts.stray", "interrupts on pins without a device", stray_irqs, 0);
    else
        ok("interrupts.stray");
    cli();
    report_done();
    reset();
}
