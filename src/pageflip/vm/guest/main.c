/*
 * pfguest: pageflip's bare-metal test guest, a memory workload that measures its own pauses.
 *
 * Command line (space separated key=value, all optional; unknown keys are ignored):
 *   mb=N (64) MiB to fill, rate=R (0) MiB/s of distinct pages to rewrite, hb=MS (100, >= 10)
 *   heartbeat period, seed=S (1), tick_us=U (5000, 100..10000) LAPIC timer period.
 * Output and serial input: see README.md. The workload runs in ring 3; ring 0 only sets up
 * and serves a few "system calls" made with UD2 (boot.S). Why: on a PVM host (software KVM)
 * guest ring 0 is emulated (slow) while ring 3 runs natively, and ring-3 port I/O, "int $n"
 * and port I/O after SYSCALL all fault there.
 */
#include <stdint.h>

#define PAGE 4096UL
#define WPP (PAGE / 8)
#define MIB (1024UL * 1024UL)
#define COM1 0x3f8
#define PMTMR 0x608                 /* ACPI PM timer (PIIX4 PM base 0x600), 24-bit */
#define PMTMR_HZ 3579545ULL
#define META_BASE (8UL << 20)       /* gen[]: one uint32 per buffer page, 8..16 MiB */
#define BUF_MIN (16UL << 20)        /* the buffer uses RAM above 16 MiB */
#define MAX_PAGES ((BUF_MIN - META_BASE) / 4)
#define MAX_GIB 64                  /* identity map limit, keep in sync with boot.S */
#define LAPIC 0xfee00000UL
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TMICT 0x380
#define LAPIC_TMCCT 0x390
#define LAPIC_TDCR 0x3e0
#define TIMER_VECTOR 0x20
#define LVT_MASKED (1U << 16)
#define LVT_PERIODIC (1U << 17)
#define POLL_US 10000               /* serial input is polled at most this often */
/* Each tick costs the host ~70-80 us of CPU on a PVM host (emulated ring 0, a wake-up):
 * 1000 us ticks keep an idle guest at ~9 % of a core, 5000 us at ~4 % (README.md). */
#define DEFAULT_TICK_US 5000
/* The loop gaps longer than 1.5 ticks, the latest GAP_RING of them, for the G request: a
 * host that maps guest time to its own (with the line's now=) tells which one spans the
 * moment it paused the guest, apart from stalls at any other time. */
#define GAP_RING 1024
static uint64_t gap_len[GAP_RING], gap_end[GAP_RING];

/* ------------------------------------------------------------ both rings */
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* ------------------------------------------------------------ ring 0 */
struct hvm_start_info {
    uint32_t magic, version, flags, nr_modules;
    uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    uint32_t memmap_entries, reserved;
};
struct hvm_memmap_entry {
    uint64_t addr, size;
    uint32_t type, reserved;
};

extern uint64_t start_info_ptr;
extern uint64_t tss_desc[2];
extern uint64_t pdpt[512], pds[MAX_GIB * 512];
extern uint32_t serial_burst;
extern char kstack_top[];
extern void isr_timer(void), isr_spurious(void);
extern void exc0(void), exc1(void), exc2(void), exc3(void), exc4(void), exc5(void),
    exc6(void), exc7(void), exc8(void), exc9(void), exc10(void), exc11(void), exc12(void),
    exc13(void), exc14(void), exc15(void), exc16(void), exc17(void), exc18(void),
    exc19(void), exc20(void), exc21(void);

static struct {
    uint64_t lo, hi;
} idt[256] __attribute__((aligned(16)));
static struct {
    uint32_t r0;
    uint64_t rsp0, rsp1, rsp2, r1, ist[7], r2;
    uint16_t r3, iopb;
} __attribute__((packed)) tss __attribute__((aligned(16)));

#define MAXSEG 16
static char cmdline[1024];
static struct {
    uint64_t addr, size;
} ram[MAXSEG];
static int nram;

static inline void outb(uint16_t p, uint8_t v) { __asm__ volatile("outb %0,%1" ::"a"(v), "Nd"(p)); }
static inline uint8_t inb(uint16_t p)
{
    uint8_t v;
    __asm__ volatile("inb %1,%0" : "=a"(v) : "Nd"(p));
    return v;
}
static inline void lapic_w(uint32_t reg, uint32_t v) { *(volatile uint32_t *)(LAPIC + reg) = v; }

static void kputc(char c)
{
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
        ;
    outb(COM1, (uint8_t)c);
}
static void kputs(const char *s)
{
    while (*s)
        kputc(*s++);
}
/* The decimal digits of v into b, last digit first; returns how many. */
static int digits(char b[24], uint64_t v)
{
    int i = 0;
    do {
        b[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return i;
}
static void kputu(uint64_t v)
{
    char b[24];
    for (int i = digits(b, v); i;)
        kputc(b[--i]);
}
static void kputhex(uint64_t v)
{
    kputs("0x");
    for (int i = 60; i >= 0; i -= 4)
        kputc("0123456789abcdef"[(v >> i) & 15]);
}

/* Identity-map [lo, hi) with 2 MiB pages (below MAX_GIB GiB; the rest is left out). */
static void map_range(uint64_t lo, uint64_t hi, uint64_t flags)
{
    if (hi > ((uint64_t)MAX_GIB << 30))
        hi = (uint64_t)MAX_GIB << 30;
    for (uint64_t a = lo & ~((2UL << 20) - 1); a < hi; a += 2UL << 20) {
        uint64_t gib = a >> 30;
        if (!(pdpt[gib] & 1))
            pdpt[gib] = (uint64_t)&pds[gib * 512] | 0x7;
        pds[a >> 21] = a | flags;
    }
}
#define MAP_RAM 0x87UL   /* P | RW | US | PS */
#define MAP_MMIO 0x9bUL  /* P | RW | PWT | PCD | PS, ring 0 only */

static void set_gate(int v, void (*f)(void))
{
    uint64_t a = (uint64_t)f;
    idt[v].lo = (a & 0xffff) | (0x08UL << 16) | (0x8eUL << 40) | ((a >> 16) & 0xffff) << 48;
    idt[v].hi = a >> 32;
}

void kinit(void)
{
    struct hvm_start_info *si = (struct hvm_start_info *)start_info_ptr;
    map_range((uint64_t)si, (uint64_t)si + sizeof(*si), MAP_RAM);
    if (si && si->magic == 0x336ec578) {
        if (si->cmdline_paddr) {
            map_range(si->cmdline_paddr, si->cmdline_paddr + sizeof(cmdline), MAP_RAM);
            const char *c = (const char *)si->cmdline_paddr;
            int i = 0;
            while (c[i] && i < (int)sizeof(cmdline) - 1) {
                cmdline[i] = c[i];
                i++;
            }
            cmdline[i] = 0;
        }
        if (si->version >= 1 && si->memmap_paddr) {
            uint64_t n = si->memmap_entries;
            map_range(si->memmap_paddr, si->memmap_paddr + n * sizeof(struct hvm_memmap_entry),
                      MAP_RAM);
            struct hvm_memmap_entry *e = (struct hvm_memmap_entry *)si->memmap_paddr;
            for (uint64_t i = 0; i < n && nram < MAXSEG; i++)
                if (e[i].type == 1) {
                    ram[nram].addr = e[i].addr;
                    ram[nram].size = e[i].size;
                    nram++;
                }
        }
    }
    for (int r = 0; r < nram; r++)
        map_range(ram[r].addr, ram[r].addr + ram[r].size, MAP_RAM);
    map_range(LAPIC, LAPIC + 4096, MAP_MMIO);
    uint64_t cr3;
    __asm__ volatile("mov %%cr3,%0; mov %0,%%cr3" : "=r"(cr3)::"memory");
    /* TSS: rsp0 for exceptions and interrupts from ring 3 */
    tss.rsp0 = (uint64_t)kstack_top;
    tss.iopb = sizeof(tss);
    uint64_t b = (uint64_t)&tss, lim = sizeof(tss) - 1;
    tss_desc[0] = (lim & 0xffff) | ((b & 0xffffff) << 16) | (0x89UL << 40) |
                  ((lim >> 16) & 0xf) << 48 | ((b >> 24) & 0xff) << 56;
    tss_desc[1] = b >> 32;
    __asm__ volatile("ltr %w0" ::"r"(0x28));
    /* IDT */
    void (*exc[22])(void) = {exc0,  exc1,  exc2,  exc3,  exc4,  exc5,  exc6,  exc7,
                             exc8,  exc9,  exc10, exc11, exc12, exc13, exc14, exc15,
                             exc16, exc17, exc18, exc19, exc20, exc21};
    for (int i = 0; i < 256; i++)
        set_gate(i, i < 22 ? exc[i] : isr_spurious);
    set_gate(TIMER_VECTOR, isr_timer);
    struct {
        uint16_t lim;
        uint64_t base;
    } __attribute__((packed)) d = {sizeof(idt) - 1, (uint64_t)idt};
    __asm__ volatile("lidt %0" ::"m"(d));
    /* UART: enable and clear the FIFOs; with a FIFO (IIR bits 7:6 set) one LSR.THRE poll
     * covers 16 bytes, otherwise one byte */
    outb(COM1 + 2, 0x07);
    if ((inb(COM1 + 2) & 0xc0) == 0xc0)
        serial_burst = 16;
    /* mask the legacy PICs; enable the LAPIC; its timer counts down from 2^32-1, masked,
     * until ring 3 has measured its rate and starts it periodic */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    lapic_w(LAPIC_SVR, 0x1ff);                            /* enable, spurious vector 0xff */
    lapic_w(LAPIC_TDCR, 0xb);                             /* divide by 1 */
    lapic_w(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);  /* one-shot, masked */
    lapic_w(LAPIC_TMICT, 0xffffffffU);
}

void kfault(uint64_t *f)
{
    uint64_t cr2;
    __asm__ volatile("mov %%cr2,%0" : "=r"(cr2));
    lapic_w(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);  /* boot.S halts after this */
    lapic_w(LAPIC_TMICT, 0);
    kputs("\nGUEST-EXCEPTION vec=");
    kputu(f[0]);
    kputs(" err=");
    kputhex(f[1]);
    kputs(" rip=");
    kputhex(f[2]);
    kputs(" cr2=");
    kputhex(cr2);
    kputs("\n");
}

/* ------------------------------------------------------------ ring 3: system calls */
static inline uint64_t sys(uint64_t nr, uint64_t a, uint64_t b)
{
    __asm__ volatile("ud2" : "+a"(nr), "+D"(a), "+S"(b) : : "rcx", "rdx", "memory", "cc");
    return nr;
}
static inline void sleep_tick(void) { sys(0, 0, 0); }
static inline uint8_t uinb(uint16_t p) { return (uint8_t)sys(2, p, 0); }
static inline uint32_t uinl(uint16_t p) { return (uint32_t)sys(3, p, 0); }
static inline uint32_t ulapic_r(uint32_t reg) { return (uint32_t)sys(6, reg, 0); }
static inline void ulapic_w(uint32_t reg, uint32_t v) { sys(7, reg, v); }

/* line-buffered console output: one system call per line. Each byte is a port write, which
 * a VMM serves with an exit (~20 us on a PVM host): a 50-byte line written at once is an
 * iteration of 1-2 ms, a floor under every pause the loop measures. So a heartbeat is paced
 * as an interrupt-driven UART driver would send it: queued (tx_defer), then one FIFO burst
 * per loop iteration (tx_step). Anything else is written at once, after what is queued. */
#define TX_BURST 16
static char obuf[256];
static int olen;
static char txq[1024];
static int txlen, txpos, tx_defer;
static void tx_drain(void)
{
    if (txpos < txlen)
        sys(4, (uint64_t)(txq + txpos), (uint64_t)(txlen - txpos));
    txlen = txpos = 0;
}
static void tx_step(void)
{
    if (txpos == txlen)
        return;
    int n = txlen - txpos < TX_BURST ? txlen - txpos : TX_BURST;
    sys(4, (uint64_t)(txq + txpos), (uint64_t)n);
    txpos += n;
    if (txpos == txlen)
        txlen = txpos = 0;
}
static void uflush(void)
{
    if (tx_defer && olen) {
        if (txlen + olen > (int)sizeof(txq))
            tx_drain();  /* the queue falls behind (heartbeats faster than it drains) */
        for (int i = 0; i < olen; i++)
            txq[txlen++] = obuf[i];
    } else if (olen) {
        tx_drain();
        sys(4, (uint64_t)obuf, (uint64_t)olen);
    }
    olen = 0;
}
static void uputc(char c)
{
    if (olen == (int)sizeof(obuf))
        uflush();
    obuf[olen++] = c;
    if (c == '\n')
        uflush();
}
static void uputs(const char *s)
{
    while (*s)
        uputc(*s++);
}
static void uputu(uint64_t v)
{
    char b[24];
    for (int i = digits(b, v); i;)
        uputc(b[--i]);
}
static void ukv(const char *key, uint64_t v)  /* " key=value" */
{
    uputc(' ');
    uputs(key);
    uputc('=');
    uputu(v);
}

/* Stop for good: no more timer interrupts, then cli; hlt in ring 0. */
static void __attribute__((noreturn)) halt_forever(void)
{
    ulapic_w(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
    ulapic_w(LAPIC_TMICT, 0);
    for (;;)
        sys(5, 0, 0);
}

/* ------------------------------------------------------------ ring 3: time */
static uint64_t tsc_khz = 1, lapic_khz = 1000000;
static uint64_t tsc_last, clk;

/* Guest time in TSC cycles: never goes backwards, even if the TSC does (a vCPU restored
 * on another host sees that host's TSC; a jump forward shows as a pause). */
static uint64_t clock_cyc(void)
{
    uint64_t t = rdtsc();
    if (t > tsc_last)
        clk += t - tsc_last;
    tsc_last = t;
    return clk;
}
static uint64_t cyc_us(uint64_t c) { return c / tsc_khz * 1000 + c % tsc_khz * 1000 / tsc_khz; }
static uint64_t now_us(void) { return cyc_us(clock_cyc()); }

/* ~100 ms against the ACPI PM timer: the TSC rate, and the LAPIC timer's (1 GHz under
 * KVM, divide by 1; used as such when measured within 2 %). */
static void calibrate(void)
{
    uint32_t p0 = uinl(PMTMR) & 0xffffff;
    uint64_t t0 = rdtsc();
    uint32_t l0 = ulapic_r(LAPIC_TMCCT);
    uint32_t p, elapsed;
    do {
        p = uinl(PMTMR) & 0xffffff;
        elapsed = (p - p0) & 0xffffff;
    } while (elapsed < PMTMR_HZ / 10);
    uint64_t t1 = rdtsc();
    uint32_t l1 = ulapic_r(LAPIC_TMCCT);
    tsc_khz = (t1 - t0) * PMTMR_HZ / elapsed / 1000;
    if (!tsc_khz)
        tsc_khz = 1;
    uint64_t lk = (uint64_t)(l0 - l1) * tsc_khz / (t1 - t0 ? t1 - t0 : 1);
    if (lk && (lk < 980000 || lk > 1020000))
        lapic_khz = lk;
    tsc_last = rdtsc();
}

/* ------------------------------------------------------------ ring 3: the workload */
static uint64_t seed = 1;
static inline uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x ? x : 1;
}
static inline uint64_t base_word(uint64_t page, uint64_t i) { return mix(seed ^ (page * WPP + i)); }
static inline uint64_t head_word(uint64_t page, uint32_t g)
{
    return mix((seed * 0x5851f42d4c957f2dULL) ^ (page << 32) ^ g);
}

static uint64_t cmd_u64(const char *key, uint64_t def)
{
    for (const char *p = cmdline; *p; p++) {
        if (p != cmdline && p[-1] != ' ')
            continue;
        const char *k = key, *q = p;
        while (*k && *q == *k) {
            k++;
            q++;
        }
        if (*k || *q != '=')
            continue;
        q++;
        if (*q < '0' || *q > '9')
            return def;
        uint64_t v = 0;
        while (*q >= '0' && *q <= '9')
            v = v * 10 + (uint64_t)(*q++ - '0');
        return v;
    }
    return def;
}

/* the buffer: physical segments of RAM above 16 MiB */
static struct {
    uint64_t base, pages;
} seg[MAXSEG];
static int nseg;
static uint64_t npages;
static uint32_t *const gen = (uint32_t *)META_BASE;

static void __attribute__((noreturn)) fail(const char *what, uint64_t mb)
{
    uputs("PFGUEST-ERROR ");
    uputs(what);
    ukv("mb", mb);
    ukv("pages", npages);
    uputc('\n');
    halt_forever();
}

static void layout(uint64_t mb)
{
    uint64_t want = mb * (MIB / PAGE);
    if (want > MAX_PAGES)
        fail("mb too large for the generation counters (at most 8192 MiB):", mb);
    int meta = 0;
    for (int r = 0; r < nram; r++)
        meta |= ram[r].addr <= META_BASE && ram[r].addr + ram[r].size >= BUF_MIN;
    if (!meta)
        fail("no RAM at 8..16 MiB for the generation counters:", mb);
    for (int r = 0; r < nram && npages < want; r++) {
        uint64_t a = ram[r].addr, e = ram[r].addr + ram[r].size;
        if (a < BUF_MIN)
            a = BUF_MIN;
        if (e > ((uint64_t)MAX_GIB << 30))
            e = (uint64_t)MAX_GIB << 30;
        a = (a + PAGE - 1) & ~(PAGE - 1);
        e &= ~(PAGE - 1);
        if (e <= a)
            continue;
        uint64_t n = (e - a) / PAGE;
        if (n > want - npages)
            n = want - npages;
        seg[nseg].base = a;
        seg[nseg].pages = n;
        nseg++;
        npages += n;
    }
    if (npages < want)
        fail("not enough RAM above 16 MiB:", mb);
}

static void fill(void)
{
    uint64_t p = 0;
    for (int s = 0; s < nseg; s++)
        for (uint64_t i = 0; i < seg[s].pages; i++, p++) {
            uint64_t *w = (uint64_t *)(seg[s].base + i * PAGE);
            gen[p] = 0;
            w[0] = head_word(p, 0);
            for (uint64_t j = 1; j < WPP; j++)
                w[j] = base_word(p, j);
        }
}

static uint64_t verify(void)
{
    uint64_t bad = 0, p = 0;
    for (int s = 0; s < nseg; s++)
        for (uint64_t i = 0; i < seg[s].pages; i++, p++) {
            uint64_t *w = (uint64_t *)(seg[s].base + i * PAGE);
            int ok = w[0] == head_word(p, gen[p]);
            for (uint64_t j = 1; ok && j < WPP; j++)
                ok = w[j] == base_word(p, j);
            bad += !ok;
        }
    return bad;
}

/* the rewriting cursor: page number, segment, page within the segment */
static uint64_t cursor, cur_seg, cur_page;

static void rewrite(uint64_t n)
{
    for (uint64_t k = 0; k < n; k++) {
        uint32_t g = ++gen[cursor];
        *(volatile uint64_t *)(seg[cur_seg].base + cur_page * PAGE) = head_word(cursor, g);
        cursor++;
        if (++cur_page == seg[cur_seg].pages) {
            cur_page = 0;
            if (++cur_seg == (uint64_t)nseg)
                cur_seg = cursor = 0;
        }
    }
}

void umain(void)
{
    uint64_t mb = cmd_u64("mb", 64);
    uint64_t rate = cmd_u64("rate", 0);
    uint64_t hb = cmd_u64("hb", 100);
    uint64_t tick_us = cmd_u64("tick_us", DEFAULT_TICK_US);
    seed = cmd_u64("seed", 1);
    if (hb < 10)
        hb = 10;
    if (tick_us < 100)
        tick_us = 100;
    if (tick_us > 10000)
        tick_us = 10000;
    calibrate();
    uputs("PFGUEST start");
    ukv("mb", mb);
    ukv("rate", rate);
    ukv("hb", hb);
    ukv("tick_us", tick_us);
    ukv("tsc_khz", tsc_khz);
    ukv("ramsegs", (uint64_t)nram);
    uputc('\n');

    layout(mb);
    uint64_t t0 = now_us();
    fill();
    uint64_t ready = now_us();
    uputs("READY");
    ukv("mb", mb);
    ukv("pages", npages);
    ukv("fill_ms", (ready - t0) / 1000);
    uputc('\n');
    ulapic_w(LAPIC_LVT_TIMER, LVT_PERIODIC | TIMER_VECTOR);
    ulapic_w(LAPIC_TMICT, (uint32_t)(tick_us * lapic_khz / 1000));

    /* times in microseconds of guest time (clock_cyc), gaps in TSC cycles. An iteration
     * that answers a request (V, P, G) starts the gap over once its answer is printed: a
     * long line goes out through many port writes (a GAPS line of a few hundred bytes took
     * 18 ms on a PVM host), which is the guest's own work, not a pause; it would otherwise
     * show as the largest gap of the next P. */
    uint64_t dirtied = 0, hbn = 0, credit = 0, iters = 0;
    uint64_t now = now_us(), dirty_t = now, next_hb = now + hb * 1000, next_poll = now;
    uint64_t last_hb_t = now, last_hb_dirtied = 0;
    uint64_t prev = clock_cyc(), hb_gap = 0, p_gap = 0, p_gap_at = 0;
    uint64_t big_gap = tick_us * tsc_khz * 3 / 2000, gaps = 0;
    int64_t pending_rate = -1, pending_gaps = -1;
    for (;;) {
        /* the pause measurement: the gap since the previous iteration began */
        uint64_t c = clock_cyc(), gap = c - prev;
        prev = c;
        iters++;
        if (gap > hb_gap)
            hb_gap = gap;
        if (gap > p_gap) {
            p_gap = gap;
            p_gap_at = hbn;
        }
        if (gap > big_gap) {
            gap_len[gaps % GAP_RING] = gap;
            gap_end[gaps % GAP_RING] = c;
            gaps++;
        }
        now = cyc_us(c);
        if (rate > 0 && npages) {
            /* page-microseconds of credit; never more than 0.5 s of debt at once */
            uint64_t dt = now - dirty_t;
            if (dt > 500000)
                dt = 500000;
            credit += rate * (MIB / PAGE) * dt;
            uint64_t n = credit / 1000000;
            credit -= n * 1000000;
            rewrite(n);
            dirtied += n;
        }
        dirty_t = now;
        if (now >= next_hb) {
            uint64_t dt = now - last_hb_t;
            uint64_t r = dt ? (dirtied - last_hb_dirtied) * 1000000 / dt / (MIB / PAGE) : 0;
            tx_defer = 1;
            uputs("HB");
            ukv("n", ++hbn);
            ukv("t", (now - ready) / 1000);
            ukv("dirtied", dirtied);
            ukv("rate", r);
            ukv("gap_us", cyc_us(hb_gap));
            uputc('\n');
            tx_defer = 0;
            hb_gap = 0;
            last_hb_t = now;
            last_hb_dirtied = dirtied;
            next_hb += hb * 1000;
            if (next_hb < now)
                next_hb = now + hb * 1000;
        }
        tx_step();
        if (now >= next_poll) {
            next_poll = now + POLL_US;
            while (uinb(COM1 + 5) & 1) {
                char ch = (char)uinb(COM1);
                if (pending_rate >= 0 && ch >= '0' && ch <= '9') {
                    pending_rate = pending_rate * 10 + (ch - '0');
                    continue;
                }
                if (pending_gaps >= 0 && ch >= '0' && ch <= '9') {
                    pending_gaps = pending_gaps * 10 + (ch - '0');
                    continue;
                }
                if (pending_gaps >= 0) {  /* G<ms>: the gaps that ended in the last ms */
                    uint64_t c_now = clock_cyc(), back = (uint64_t)pending_gaps * tsc_khz;
                    uint64_t since = c_now > back && pending_gaps ? c_now - back : 0;
                    uint64_t first = gaps > GAP_RING ? gaps - GAP_RING : 0, k = 0;
                    while (first < gaps && gap_end[first % GAP_RING] < since)
                        first++;
                    pending_gaps = -1;
                    uputs("GAPS");
                    ukv("n", gaps);
                    ukv("k", gaps - first);
                    for (uint64_t i = first; i < gaps; i++) {
                        k++;
                        uputs(" g");
                        uputu(k);
                        uputc('=');
                        uputu(cyc_us(gap_len[i % GAP_RING]));
                        uputs(" e");
                        uputu(k);
                        uputc('=');
                        uputu(cyc_us(gap_end[i % GAP_RING]) - ready);
                    }
                    ukv("now", now_us() - ready);  /* last: the line ends right after it */
                    uputc('\n');
                    prev = clock_cyc();  /* printing the answer is no pause (see below) */
                    if (ch == ';')
                        continue;
                }
                if (pending_rate >= 0) {  /* ';' or any other non-digit ends R<digits> */
                    rate = (uint64_t)pending_rate;
                    pending_rate = -1;
                    credit = 0;
                    uputs("RATE ");
                    uputu(rate);
                    uputc('\n');
                    if (ch == ';')
                        continue;
                }
                if (ch == 'V') {
                    uint64_t v0 = now_us();
                    uint64_t bad = verify();
                    uputs("VERIFY");
                    ukv("bad", bad);
                    ukv("pages", npages);
                    ukv("ms", (now_us() - v0) / 1000);
                    uputc('\n');
                    dirty_t = now_us();   /* no debt for the time spent verifying */
                    prev = clock_cyc();   /* and no gap */
                } else if (ch == 'P') {
                    uputs("PAUSE");
                    ukv("max_us", cyc_us(p_gap));
                    ukv("at_n", p_gap_at);
                    ukv("tick_us", tick_us);
                    ukv("iters", iters);
                    uputc('\n');
                    p_gap = 0;
                    p_gap_at = hbn;
                    iters = 0;
                    prev = clock_cyc();
                } else if (ch == 'G') {
                    pending_gaps = 0;
                } else if (ch == 'R') {
                    pending_rate = 0;
                } else if (ch == 'Q') {
                    uputs("BYE\n");
                    halt_forever();
                }
            }
        }
        sleep_tick();
    }
}
