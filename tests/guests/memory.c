/* memory: XENMEM as an HVM guest of Xen sees it, 64-bit and 32-bit (compat
 * layouts: 32-bit handles, xen_ulong_t and xen_pfn_t). The memory map and
 * reservation counts; giving gfns back (decrease_reservation) and what such
 * a gfn is until populated again (reads all ones, writes dropped, hypercalls
 * naming it fail); populate_physmap and increase_reservation; exchange; the
 * checks of xen/common/memory.c: the reservation ops report how many
 * extents they did (0 for a bad order, domain, flag or list, a partial count
 * when an extent fails), the others an errno. Then shared_info placed by
 * add_to_physmap, read at this build's offsets (32- or 64-bit event words);
 * Xen's pages at frames far beyond RAM, up to the p2m's limit. */
#include "common/xen.h"

#define HYPERVISOR_memory_op 12
#define HYPERVISOR_vcpu_op 24
#define VCPUOP_register_vcpu_info 10
#define XENMEM_increase_reservation 0
#define XENMEM_decrease_reservation 1
#define XENMEM_current_reservation 3
#define XENMEM_maximum_reservation 4
#define XENMEM_populate_physmap 6
#define XENMEM_add_to_physmap 7
#define XENMEM_memory_map 9
#define XENMEM_exchange 11
#define XENMEM_maximum_gpfn 14
#define MEMOP_EXTENT_SHIFT 6
#define XENMEMF_address_bits(x) (x)
#define XENMEMF_exact_node(n) ((((n) + 1) << 8) | (1 << 17))
#define XENMAPSPACE_shared_info 0
#define XENMAPSPACE_grant_table 1
#define EVTCHNOP_send 4
#define EVTCHNOP_alloc_unbound 6
#define EVTCHNOP_bind_ipi 7
#define EVTCHNOP_unmask 9
#define DOMID_SELF 0x7ff0
#define EFAULT 14
#define ENXIO 6
#define EBUSY 16
#define EINVAL 22
#define EPERM 1
#define ESRCH 3
#define DOMU_MAX_ORDER 9 /* x86's CONFIG_DOMU_MAX_ORDER (PAGETABLE_ORDER) */
#define UNMAPPED 0x40000000UL /* above the 1 GiB the boot code maps (and RAM) */
#define PAGE 4096

struct reservation {
    unsigned long *extent_start; /* XEN_GUEST_HANDLE(xen_pfn_t) */
    unsigned long nr_extents;    /* xen_ulong_t */
    unsigned int extent_order, mem_flags;
    uint16_t domid;
};
struct exchange { struct reservation in, out; unsigned long nr_exchanged; };
#ifdef __x86_64__
_Static_assert(sizeof(struct reservation) == 32 && sizeof(struct exchange) == 72, "native layouts");
#else
_Static_assert(sizeof(struct reservation) == 20 && sizeof(struct exchange) == 44, "compat layouts");
#endif

static struct shared_info shinfo __attribute__((aligned(PAGE)));
/* Pages to give back and take again; pool[8] starts a 2-page-aligned pair. */
static volatile uint8_t pool[12][PAGE] __attribute__((aligned(4 * PAGE)));
#define A pool[0]
#define B pool[1]
#define C pool[2]
#define D pool[3]
#define E pool[8]
#define F pool[9]

static unsigned long gfn_of(volatile void *p) { return (uintptr_t)p >> 12; }

static long memop(unsigned long cmd, void *arg) { return hypercall(HYPERVISOR_memory_op, (long)cmd, (long)arg, 0, 0, 0); }

static long reserve(unsigned long cmd, unsigned long *list, unsigned long nr, unsigned order, unsigned flags, uint16_t domid)
{
    struct reservation r = { list, nr, order, flags, domid };
    return memop(cmd, &r);
}

static long domain_query(unsigned long cmd, uint16_t domid)
{
    struct { uint16_t domid; } d = { domid };
    return memop(cmd, &d);
}

static long current_pages(void) { return domain_query(XENMEM_current_reservation, DOMID_SELF); }

static void fill(volatile uint8_t *p, uint8_t seed)
{
    for (int i = 0; i < PAGE; i++) p[i] = (uint8_t)(seed + i * 7);
}

static int holds(volatile uint8_t *p, uint8_t seed)
{
    for (int i = 0; i < PAGE; i++)
        if (p[i] != (uint8_t)(seed + i * 7)) return 0;
    return 1;
}

static int all_zero(volatile uint8_t *p)
{
    for (int i = 0; i < PAGE; i++)
        if (p[i]) return 0;
    return 1;
}

/* A gfn given back: reads of every width are all ones (sampled offsets). */
static int reads_all_ones(volatile uint8_t *p)
{
    static const int at[] = { 0, 1, 7, 8, 100, 2048, 4088, 4092 };
    for (unsigned i = 0; i < sizeof(at) / sizeof(at[0]); i++) {
        if (p[at[i]] != 0xff || p[at[i] + 3] != 0xff) return 0;
        if (*(volatile uint32_t *)(p + at[i]) != 0xffffffffu) return 0;
        if (*(volatile uint16_t *)(p + at[i] + 2) != 0xffff) return 0;
    }
#ifdef __x86_64__
    if (*(volatile uint64_t *)(p + 8) != ~0ULL) return 0;
#endif
    return 1;
}

static uint64_t ram_top; /* end of the highest RAM entry of the memory map */

static void memory_map_and_counts(void)
{
    struct { uint32_t addr_lo, addr_hi, size_lo, size_hi, type; } e820[32];
    struct { uint32_t nr; void *buf; } mm = { 32, e820 };
    long r = memop(XENMEM_memory_map, &mm);
    check(r == 0 && mm.nr >= 2 && mm.nr <= 32, "memory_map: %d, %u entries", (int)r, mm.nr);
    uint64_t ram = 0;
    for (uint32_t i = 0; i < mm.nr && i < 32; i++) {
        uint64_t a = ((uint64_t)e820[i].addr_hi << 32) | e820[i].addr_lo, n = ((uint64_t)e820[i].size_hi << 32) | e820[i].size_lo;
        if (e820[i].type == 1) {
            ram += n;
            if (a + n > ram_top) ram_top = a + n;
        }
    }
    check(ram_top > 0x100000 && ram_top < UNMAPPED, "RAM ends at %lx (%lu KiB of RAM)", ram_top, ram >> 10);
    mm.nr = 32;
    mm.buf = (void *)UNMAPPED;
    check(memop(XENMEM_memory_map, &mm) == -EFAULT, "memory_map into an unmapped buffer gives -EFAULT");

    long cur = current_pages(), max = domain_query(XENMEM_maximum_reservation, DOMID_SELF);
    long gmax = domain_query(XENMEM_maximum_gpfn, DOMID_SELF);
    check(cur > 0 && (uint64_t)cur * PAGE >= ram && cur <= max, "current_reservation %d pages (RAM %lu), maximum %d",
          (int)cur, ram >> 12, (int)max);
    check(gmax >= 0 && (uint64_t)gmax >= (ram_top >> 12) - 1, "maximum_gpfn %x covers RAM", (unsigned)gmax);
    check(domain_query(XENMEM_current_reservation, 5) == -ESRCH && domain_query(XENMEM_maximum_gpfn, 5) == -ESRCH,
          "counts of a domain that does not exist: -ESRCH");
    check(memop(XENMEM_current_reservation, (void *)UNMAPPED) == -EFAULT, "current_reservation with an unmapped argument: -EFAULT");
    check(domain_query(XENMEM_maximum_reservation | (1 << MEMOP_EXTENT_SHIFT), DOMID_SELF) == -EINVAL &&
          domain_query(XENMEM_maximum_gpfn | (2 << MEMOP_EXTENT_SHIFT), DOMID_SELF) == -EINVAL,
          "counts with a start extent in the command: -EINVAL");
}

static void give_back_and_populate(void)
{
    long cur0 = current_pages();
    for (int i = 0; i < 12; i++) fill(pool[i], (uint8_t)(i * 31 + 1));

    /* Text where a hypercall will be pointed once A is given back: should
     * it get through after all, the console shows it. */
    memcpy((void *)(A + 16), "LEAKED FROM A GIVEN-BACK GFN\n", 29);
    unsigned long list[4] = { gfn_of(A) };
    long r = reserve(XENMEM_decrease_reservation, list, 1, 0, 0, DOMID_SELF);
    check(r == 1 && current_pages() == cur0 - 1, "decrease_reservation of one gfn: %d, one page fewer", (int)r);
    check(reads_all_ones(A), "a gfn given back reads as all ones (%x)", *(volatile uint32_t *)A);
    A[5] = 0x12;
    *(volatile uint32_t *)(A + 64) = 0x12345678;
    check(reads_all_ones(A), "and writes to it are dropped (%x %x)", *(volatile uint32_t *)(A + 4), *(volatile uint32_t *)(A + 64));
    check(hypercall(HYPERVISOR_console_io, CONSOLEIO_write, 29, (long)(A + 16), 0, 0) == -EFAULT &&
          hypercall(HYPERVISOR_xen_version, XENVER_extraversion, (long)(A + 32), 0, 0, 0) == -EFAULT,
          "hypercall buffers in it: -EFAULT");
    check(holds(B, 31 + 1), "its neighbour is untouched");
    r = reserve(XENMEM_decrease_reservation, list, 1, 0, 0, DOMID_SELF);
    check(r == 0, "giving it back twice does nothing (%d)", (int)r);

    /* Partial success: B is done, A fails, C is not reached. */
    list[0] = gfn_of(B); list[1] = gfn_of(A); list[2] = gfn_of(C);
    r = reserve(XENMEM_decrease_reservation, list, 3, 0, 0, DOMID_SELF);
    check(r == 1 && current_pages() == cur0 - 2, "decrease [B, A (gone), C] stops after 1 (%d)", (int)r);
    check(reads_all_ones(B) && holds(C, 2 * 31 + 1), "B given back, C kept");

    list[0] = gfn_of(A); list[1] = gfn_of(B);
    r = reserve(XENMEM_populate_physmap, list, 2, 0, 0, DOMID_SELF);
    check(r == 2 && current_pages() == cur0, "populate_physmap [A, B]: %d, back to %d pages", (int)r, (int)cur0);
    check(all_zero(A) && all_zero(B), "populated gfns read zero");
    fill(A, 77);
    check(holds(A, 77), "and hold what is written");
    check(list[0] == gfn_of(A) && list[1] == gfn_of(B), "the extent list is left as it was");

    /* An order-1 extent: two gfns at once. */
    list[0] = gfn_of(E);
    r = reserve(XENMEM_decrease_reservation, list, 1, 1, 0, DOMID_SELF);
    check(r == 1 && current_pages() == cur0 - 2 && reads_all_ones(E) && reads_all_ones(F),
          "decrease of an order-1 extent gives back 2 pages (%d)", (int)r);
    r = reserve(XENMEM_populate_physmap, list, 1, 1, 0, DOMID_SELF);
    check(r == 1 && current_pages() == cur0 && all_zero(E) && all_zero(F), "populate of an order-1 extent (%d)", (int)r);

    /* The start extent in the command's upper bits (a continuation). */
    list[0] = gfn_of(D); list[1] = gfn_of(C);
    r = reserve(XENMEM_decrease_reservation | (1 << MEMOP_EXTENT_SHIFT), list, 2, 0, 0, DOMID_SELF);
    check(r == 2 && holds(D, 3 * 31 + 1) && reads_all_ones(C), "a start extent of 1 skips the first (%d)", (int)r);
    r = reserve(XENMEM_decrease_reservation | (5 << MEMOP_EXTENT_SHIFT), list, 2, 0, 0, DOMID_SELF);
    check(r == 5 && holds(D, 3 * 31 + 1), "a start extent past the end is returned as it is (%d)", (int)r);
    list[0] = gfn_of(C);
    check(reserve(XENMEM_populate_physmap, list, 1, 0, 0, DOMID_SELF) == 1 && all_zero(C), "C populated again");
}

static void bad_arguments(void)
{
    long cur0 = current_pages();
    unsigned long list[2] = { gfn_of(D), gfn_of(D) + 1 };
    static const struct { const char *what; unsigned long cmd; unsigned long nr; unsigned order, flags; uint16_t domid; } bad[] = {
        { "decrease, order above DOMU_MAX_ORDER", XENMEM_decrease_reservation, 1, DOMU_MAX_ORDER + 1, 0, DOMID_SELF },
        { "populate, order above DOMU_MAX_ORDER", XENMEM_populate_physmap, 1, DOMU_MAX_ORDER + 1, 0, DOMID_SELF },
        { "increase, order above DOMU_MAX_ORDER", XENMEM_increase_reservation, 1, DOMU_MAX_ORDER + 1, 0, DOMID_SELF },
        { "decrease, order 40", XENMEM_decrease_reservation, 1, 40, 0, DOMID_SELF },
        { "decrease, another domain", XENMEM_decrease_reservation, 1, 0, 0, 5 },
        { "populate, another domain", XENMEM_populate_physmap, 1, 0, 0, 5 },
        { "decrease, nr_extents too big for a continuation", XENMEM_decrease_reservation, (~0u >> MEMOP_EXTENT_SHIFT) + 1, 0, 0, DOMID_SELF },
        { "populate, address_bits 12", XENMEM_populate_physmap, 1, 0, XENMEMF_address_bits(12), DOMID_SELF },
        { "populate, an exact node for a domU", XENMEM_populate_physmap, 1, 0, XENMEMF_exact_node(0), DOMID_SELF },
        { "increase, an exact node for a domU", XENMEM_increase_reservation, 1, 0, XENMEMF_exact_node(0), DOMID_SELF },
    };
    for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        long r = reserve(bad[i].cmd, list, bad[i].nr, bad[i].order, bad[i].flags, bad[i].domid);
        check(r == 0 && current_pages() == cur0 && holds(D, 3 * 31 + 1), "%s: 0 extents done (%d)", bad[i].what, (int)r);
    }
    long r = reserve(XENMEM_decrease_reservation, (unsigned long *)UNMAPPED, 1, 0, 0, DOMID_SELF);
    check(r == 0, "decrease with an unmapped extent list: 0 (%d)", (int)r);
    r = memop(XENMEM_decrease_reservation, (void *)UNMAPPED);
    check(r == 0, "decrease with an unmapped argument: 0 (%d)", (int)r);
    list[0] = UNMAPPED >> 12;
    r = reserve(XENMEM_decrease_reservation, list, 1, 0, 0, DOMID_SELF);
    check(r == 0, "decrease of a gfn that never had memory: 0 (%d)", (int)r);
    r = reserve(XENMEM_decrease_reservation, list, 0, 0, 0, DOMID_SELF);
    check(r == 0, "decrease of no extents: 0 (%d)", (int)r);
    check(current_pages() == cur0, "none of that changed the reservation");
}

/* Up to the maximum: increase_reservation takes pages without placing them
 * (a translated guest's), populate_physmap then runs out part way. */
static void up_to_the_maximum(void)
{
    long cur0 = current_pages(), max = domain_query(XENMEM_maximum_reservation, DOMID_SELF);
    unsigned long list[4] = { gfn_of(A), gfn_of(B) };
    fill(A, 5); fill(B, 6);
    long r = reserve(XENMEM_decrease_reservation, list, 2, 0, 0, DOMID_SELF);
    long room = max - current_pages();
    check(r == 2 && room >= 2 && room <= 65536, "room below the maximum after giving 2 back: %d pages", (int)room);
    if (room < 2 || room > 65536)
        return;
    r = reserve(XENMEM_increase_reservation, 0, (unsigned long)room - 1, 0, 0, DOMID_SELF);
    check(r == room - 1 && current_pages() == max - 1, "increase_reservation by %d: %d", (int)room - 1, (int)r);
    r = reserve(XENMEM_populate_physmap, list, 2, 0, 0, DOMID_SELF);
    check(r == 1 && current_pages() == max, "populate [A, B] with room for one: 1 (%d)", (int)r);
    check(all_zero(A) && reads_all_ones(B), "A populated, B still given back");
    r = reserve(XENMEM_increase_reservation, 0, 1, 0, 0, DOMID_SELF);
    check(r == 0 && current_pages() == max, "increase at the maximum: 0 (%d)", (int)r);

    /* A gfn outside the memory map takes memory as well as any. */
    list[0] = gfn_of(D);
    check(reserve(XENMEM_decrease_reservation, list, 1, 0, 0, DOMID_SELF) == 1, "D given back");
    unsigned long hole = (ram_top >> 12) + 64;
    volatile uint8_t *h = (volatile uint8_t *)(uintptr_t)(hole << 12);
    check(reads_all_ones(h), "gfn %x above RAM, never populated, reads as all ones", (unsigned)hole);
    list[0] = hole;
    r = reserve(XENMEM_populate_physmap, list, 1, 0, 0, DOMID_SELF);
    long gmax = domain_query(XENMEM_maximum_gpfn, DOMID_SELF);
    check(r == 1 && all_zero(h) && gmax >= (long)hole, "populate of gfn %x above RAM: %d, maximum_gpfn %x",
          (unsigned)hole, (int)r, (unsigned)gmax);
    fill(h, 9);
    check(holds(h, 9), "and it holds what is written");
    r = reserve(XENMEM_decrease_reservation, list, 1, 0, 0, DOMID_SELF);
    check(r == 1 && reads_all_ones(h), "given back again (%d)", (int)r);
    list[0] = gfn_of(B);
    check(reserve(XENMEM_populate_physmap, list, 1, 0, 0, DOMID_SELF) == 1 && all_zero(B), "B populated");
    check(current_pages() == max, "at the maximum (%d of %d; was %d)", (int)current_pages(), (int)max, (int)cur0);
}

static void exchange(void)
{
    long cur0 = current_pages();
    unsigned long in[2] = { gfn_of(A), UNMAPPED >> 12 }, out[2] = { gfn_of(A), gfn_of(B) };
    struct exchange x = { { in, 1, 0, 0, DOMID_SELF }, { out, 1, 0, 0, DOMID_SELF }, 0 };
    fill(A, 42);
    long r = memop(XENMEM_exchange, &x);
    check(r == 0 && x.nr_exchanged == 1 && all_zero(A) && current_pages() == cur0,
          "exchange of A for a new page at A: %d, %lu done", (int)r, (uint64_t)x.nr_exchanged);

    fill(A, 43);
    x.nr_exchanged = 1;
    check(memop(XENMEM_exchange, &x) == 0 && holds(A, 43), "nr_exchanged already complete: 0, nothing done");
    x.nr_exchanged = 0;
    x.in.extent_order = x.out.extent_order = DOMU_MAX_ORDER + 1;
    r = memop(XENMEM_exchange, &x);
    check(r == -EPERM && holds(A, 43), "order above DOMU_MAX_ORDER: -EPERM (%d)", (int)r);
    x.in.extent_order = 0;
    x.out.extent_order = 1;
    r = memop(XENMEM_exchange, &x);
    check(r == -EINVAL && x.nr_exchanged == 0 && holds(A, 43), "in and out of different sizes: -EINVAL (%d)", (int)r);
    x.out.extent_order = 0;
    x.out.domid = 5;
    r = memop(XENMEM_exchange, &x);
    check(r == -EINVAL && holds(A, 43), "in and out for different domains: -EINVAL (%d)", (int)r);
    x.in.domid = x.out.domid = 5;
    r = memop(XENMEM_exchange, &x);
    check(r == -ESRCH && holds(A, 43), "for a domain that does not exist: -ESRCH (%d)", (int)r);
    x.in.domid = x.out.domid = DOMID_SELF;
    x.nr_exchanged = 2;
    r = memop(XENMEM_exchange, &x);
    check(r == -EINVAL && holds(A, 43), "nr_exchanged past the end: -EINVAL (%d)", (int)r);
    r = memop(XENMEM_exchange, (void *)UNMAPPED);
    check(r == -EFAULT, "an unmapped argument: -EFAULT (%d)", (int)r);

    /* Partial: A is exchanged, then the gfn that never had memory fails. */
    x.nr_exchanged = 0;
    x.in.nr_extents = x.out.nr_extents = 2;
    fill(B, 44);
    r = memop(XENMEM_exchange, &x);
#ifdef __x86_64__
    int reported = x.nr_exchanged == 1;
#else
    /* Xen's compat_memory_op leaves on the native call's error before it
     * copies nr_exchanged back: a 32-bit guest is not told (A was done). */
    int reported = 1;
#endif
    check(r == -EINVAL && reported && all_zero(A) && holds(B, 44) && current_pages() == cur0,
          "exchange [A, a gfn without memory]: -EINVAL, A exchanged, nr_exchanged %lu (%d)", (uint64_t)x.nr_exchanged, (int)r);
}

/* shared_info at a gfn of ours; its fields where this build's xen.h puts
 * them, checked by raw offset too. */
static uint32_t shared_info_layout(void)
{
    const int wide = sizeof(unsigned long) == 8;
    struct { uint16_t domid, size; uint32_t space; unsigned long idx, gpfn; } xatp = { DOMID_SELF, 0, XENMAPSPACE_shared_info, 0, gfn_of(&shinfo) };
    long r = memop(XENMEM_add_to_physmap, &xatp);
    check(r == 0, "shared_info placed with add_to_physmap (%d)", (int)r);
    const volatile uint8_t *raw = (const volatile uint8_t *)&shinfo;
    uint32_t wc_sec = *(const volatile uint32_t *)(raw + (wide ? 3076 : 2308));
    check(wc_sec > 1700000000u && wc_sec == shinfo.wc_sec, "wc_sec at offset %d (%u)", wide ? 3076 : 2308, wc_sec);
    const volatile struct vcpu_time_info *t = (const volatile void *)(raw + 32);
    check(t->mul != 0 && !(t->version & 1) && t->system_time > 0, "vcpu_info[0].time at offset 32 (mul %x)", t->mul);

    /* A port above 31 tells the widths apart. No callback is set, so the
     * raise only marks the port, the selector and upcall_pending. */
    uint32_t port = 0;
    for (int i = 0; i < 40; i++) {
        struct { uint16_t dom, remote; uint32_t port; } au = { DOMID_SELF, DOMID_SELF, 0 };
        if (evtchn(EVTCHNOP_alloc_unbound, &au) != 0) break;
    }
    struct { uint32_t vcpu, port; } bi = { 0, 0 };
    r = evtchn(EVTCHNOP_bind_ipi, &bi);
    port = bi.port;
    check(r == 0 && port >= 40, "IPI bound to port %u", port);
    unsigned bits = wide ? 64 : 32;
    check(evtchn(EVTCHNOP_unmask, &port) == 0, "port unmasked");
    r = evtchn(EVTCHNOP_send, &port);
    /* The pending bitmap is the same bytes in either width; the selector's
     * bit (port / width) and place (offset 4 or 8) tell them apart. */
    int pending = (raw[2048 + port / 8] >> (port % 8)) & 1;
    unsigned long sel = wide ? *(const volatile unsigned long *)(raw + 8) : *(const volatile uint32_t *)(raw + 4);
    uint32_t beside = *(const volatile uint32_t *)(raw + (wide ? 4 : 8)); /* padding, or (32-bit) cr2 */
    check(r == 0 && pending && raw[0] == 1, "send: port %u pending (%d), upcall_pending set (%d), mask %d (%d)", port, pending,
          raw[0], (raw[2048 + bits * bits / 8 + port / 8] >> (port % 8)) & 1, (int)r);
    check((sel >> (port / bits)) & 1, "selector bit %u set in the %u-bit word at offset %u (%lx)", port / bits, bits, bits / 8,
          (uint64_t)sel);
    check(beside == 0, "nothing at the other width's selector place (%x)", beside);
    check(shinfo.vcpu_info[0].pending_sel == sel && (shinfo.pending[port / EVTCHN_WORD_BITS] >> (port % EVTCHN_WORD_BITS) & 1),
          "the same through struct shared_info");
    unsigned long mask_off = 2048 + bits * bits / 8;
    check(mask_off == (uintptr_t)&shinfo.mask[0] - (uintptr_t)&shinfo, "evtchn_mask at offset %lu", (uint64_t)mask_off);
    return port;
}

/* vcpu_info moved out of shared_info (VCPUOP_register_vcpu_info): aligned to
 * the event word (4 bytes for a 32-bit guest, 8 natively), within a page,
 * once; Xen copies it over and marks every selector bit pending. */
static uint8_t vi_page[PAGE] __attribute__((aligned(PAGE)));

static void vcpu_info_moved(uint32_t port)
{
    const int wide = sizeof(unsigned long) == 8;
    struct { uint64_t mfn; uint32_t offset, rsvd; } ri = { gfn_of(vi_page), PAGE - 32, 0 };
    long r = hypercall(HYPERVISOR_vcpu_op, VCPUOP_register_vcpu_info, 0, (long)&ri, 0, 0);
    check(r == -ENXIO, "vcpu_info across the end of its page: -ENXIO (%d)", (int)r);
    ri.offset = 4;
    r = hypercall(HYPERVISOR_vcpu_op, VCPUOP_register_vcpu_info, 0, (long)&ri, 0, 0);
    if (wide)
        check(r == -ENXIO, "at offset 4, misaligned for 64-bit event words: -ENXIO (%d)", (int)r);
    else
        check(r == 0, "at offset 4, aligned for 32-bit event words: registered (%d)", (int)r);
    if (r != 0) { /* (go on at an offset both widths take) */
        ri.offset = 64;
        r = hypercall(HYPERVISOR_vcpu_op, VCPUOP_register_vcpu_info, 0, (long)&ri, 0, 0);
        check(r == 0, "vcpu_info registered at offset %u (%d)", ri.offset, (int)r);
    }
    volatile uint8_t *vi = vi_page + ri.offset;
    volatile unsigned long *sel = (volatile unsigned long *)(vi + sizeof(unsigned long));
    uint32_t beside = *(volatile uint32_t *)(vi + (wide ? 4 : 8));
    check(vi[0] == 1 && *sel == ~0UL && beside == 0, "registration marks all pending: upcall_pending %u, selector %lx, beside it %x",
          vi[0], (uint64_t)*sel, beside);
    const volatile struct vcpu_time_info *t = (const volatile void *)(vi + 32);
    check(t->mul == shinfo.vcpu_info[0].time.mul && t->system_time > 0, "its time info is kept up (mul %x)", t->mul);
    r = hypercall(HYPERVISOR_vcpu_op, VCPUOP_register_vcpu_info, 0, (long)&ri, 0, 0);
    check(r == -EBUSY, "registering it again: -EBUSY (%d)", (int)r);

    vi[0] = 0;
    *sel = 0;
    __atomic_and_fetch(&shinfo.pending[port / EVTCHN_WORD_BITS], ~(1UL << (port % EVTCHN_WORD_BITS)), __ATOMIC_SEQ_CST);
    unsigned long old_sel = shinfo.vcpu_info[0].pending_sel;
    r = evtchn(EVTCHNOP_send, &port);
    check(r == 0 && vi[0] == 1 && *sel == 1UL << (port / EVTCHN_WORD_BITS) && shinfo.vcpu_info[0].pending_sel == old_sel,
          "a send marks the moved vcpu_info (selector %lx), not shared_info's", (uint64_t)*sel);
}

/* Xen's pages at frames far beyond RAM: Xen's p2m maps frames below 2^36
 * (48-bit guest-physical addresses) and refuses the rest with -EINVAL
 * (ept_set_entry), whatever the space; below that it places them, even
 * where no guest page table can reach. (A 32-bit guest's xen_pfn_t cannot
 * name a frame past the limit.) */
static void xen_pages_far_away(void)
{
    struct { uint16_t domid, size; uint32_t space; unsigned long idx, gpfn; } xatp = { DOMID_SELF, 0, 0, 0, 0 };
#ifdef __x86_64__
    static const unsigned long refused[] = { 1UL << 36, (1UL << 40) + 5, (1UL << 52) - 1, ~0UL >> 12, ~0UL };
    for (unsigned i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
        for (uint32_t space = XENMAPSPACE_shared_info; space <= XENMAPSPACE_grant_table; space++) {
            xatp.space = space;
            xatp.gpfn = refused[i];
            long r = memop(XENMEM_add_to_physmap, &xatp);
            check(r == -EINVAL, "space %u at frame %lx: -EINVAL (%d)", space, (uint64_t)refused[i], (int)r);
        }
    }
    static const unsigned long placed[] = { (1UL << 36) - 1, 17UL << 24 /* 68 GiB, past a domain's RAM */ };
#else
    static const unsigned long placed[] = { 0xffffffffUL, 17UL << 24 };
#endif
    xatp.space = XENMAPSPACE_grant_table;
    for (unsigned i = 0; i < sizeof(placed) / sizeof(placed[0]); i++) {
        xatp.idx = i;
        xatp.gpfn = placed[i];
        long r = memop(XENMEM_add_to_physmap, &xatp);
        check(r == 0, "grant frame %u placed at frame %lx (%d)", i, (uint64_t)placed[i], (int)r);
    }
}

int guest_main(uint32_t start_info)
{
    (void)start_info;
    printk("memory: %u-bit guest\n", (unsigned)(8 * sizeof(long)));
    memory_map_and_counts();
    give_back_and_populate();
    bad_arguments();
    exchange();
    up_to_the_maximum();
    vcpu_info_moved(shared_info_layout());
    xen_pages_far_away();
    return verdict();
}
