/* fifo: the FIFO event channel ABI as Linux's events_fifo.c uses it:
 * EVTCHNOP_init_control (and its errnos), expand_array, set_priority, a port
 * bound under 2-level carried over, events consumed from the control block
 * by priority then in raise order (unlinking with LOCK CMPXCHG), masking
 * and EVTCHNOP_unmask, VIRQ_TIMER and SCHEDOP_poll, ports past the 2-level
 * limit, and EVTCHNOP_reset back to 2-level. */
#include "common/xen.h"

#define HYPERVISOR_memory_op 12
#define HYPERVISOR_vcpu_op 24
#define HYPERVISOR_hvm_op 34
#define XENMEM_add_to_physmap 7
#define VCPUOP_set_singleshot_timer 8
#define HVMOP_set_param 0
#define EVTCHNOP_bind_virq 1
#define EVTCHNOP_close 3
#define EVTCHNOP_send 4
#define EVTCHNOP_status 5
#define EVTCHNOP_bind_ipi 7
#define EVTCHNOP_unmask 9
#define EVTCHNOP_reset 10
#define EVTCHNOP_init_control 11
#define EVTCHNOP_expand_array 12
#define EVTCHNOP_set_priority 13
#define UPCALL_VECTOR 0xf3

/* event_channel.h, FIFO ABI */
#define FIFO_PENDING (1u << 31)
#define FIFO_MASKED (1u << 30)
#define FIFO_LINKED (1u << 29)
#define FIFO_BUSY (1u << 28)
#define FIFO_LINK_MASK ((1u << 17) - 1)
#define NR_QUEUES 16
#define WORDS_PER_PAGE 1024
#define ARRAY_PAGES 5 /* ports up to 5119: past the 2-level 4096 */

struct control_block { uint32_t ready, rsvd, head[NR_QUEUES]; };
struct init_control { uint64_t control_gfn; uint32_t offset, vcpu; uint8_t link_bits, pad[7]; };

static struct shared_info shinfo __attribute__((aligned(4096)));
static uint8_t cb_page[4096] __attribute__((aligned(4096)));
static uint32_t array[ARRAY_PAGES][WORDS_PER_PAGE] __attribute__((aligned(4096)));
static uint64_t idt[512] __attribute__((aligned(16)));
static struct control_block *cb;
static uint32_t local_head[NR_QUEUES];
static int array_pages;

#define SEEN_MAX 64
volatile uint32_t seen[SEEN_MAX];
volatile int nr_seen;
volatile uint64_t upcalls;

extern char upcall_entry[];

static volatile uint32_t *word(uint32_t port) { return &array[port / WORDS_PER_PAGE][port % WORDS_PER_PAGE]; }

static uint64_t now_ns(void) { return pvclock_ns(&shinfo.vcpu_info[0].time, rdtsc()); }

/* Clear LINKED and LINK with cmpxchg (Xen may link onto it meanwhile);
 * returns the next port of the queue. */
static uint32_t clear_linked(volatile uint32_t *w)
{
    uint32_t old = *w, new;
    do {
        new = old & ~(FIFO_LINKED | FIFO_LINK_MASK);
    } while (!__atomic_compare_exchange_n(w, &old, new, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return old & FIFO_LINK_MASK;
}

/* One event off queue q, as Linux's consume_one_event. */
static void consume_one(int q, uint32_t *ready)
{
    uint32_t port = local_head[q];
    if (port == 0)
        port = __atomic_load_n(&cb->head[q], __ATOMIC_SEQ_CST);
    if (port == 0 || port >= (uint32_t)array_pages * WORDS_PER_PAGE) {
        check(0, "queue %d has a HEAD in the array (%u)", q, port);
        *ready &= ~(1u << q);
        return;
    }
    volatile uint32_t *w = word(port);
    uint32_t next = clear_linked(w);
    if (next == 0)
        *ready &= ~(1u << q);
    uint32_t now = *w;
    if ((now & FIFO_PENDING) && !(now & FIFO_MASKED)) {
        __atomic_and_fetch(w, ~FIFO_PENDING, __ATOMIC_SEQ_CST);
        if (nr_seen < SEEN_MAX)
            seen[nr_seen] = port;
        nr_seen++;
    }
    local_head[q] = next;
}

void upcall_handler(void)
{
    upcalls++;
    shinfo.vcpu_info[0].upcall_pending = 0;
    uint32_t ready = __atomic_exchange_n(&cb->ready, 0, __ATOMIC_SEQ_CST);
    while (ready) {
        consume_one(__builtin_ctz(ready), &ready);
        ready |= __atomic_exchange_n(&cb->ready, 0, __ATOMIC_SEQ_CST);
    }
}

/* Linux's unmask: clear MASKED unless BUSY; if pending, ask Xen. */
static void unmask(uint32_t port)
{
    volatile uint32_t *w = word(port);
    uint32_t old = *w;
    for (;;) {
        if (!(old & FIFO_MASKED))
            return;
        if (old & FIFO_PENDING)
            break;
        old &= ~FIFO_BUSY;
        if (__atomic_compare_exchange_n(w, &old, old & ~FIFO_MASKED, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return;
    }
    evtchn(EVTCHNOP_unmask, &port);
}

static void mask(uint32_t port) { __atomic_or_fetch(word(port), FIFO_MASKED, __ATOMIC_SEQ_CST); }

static long expand(void)
{
    uint64_t gfn = (uint64_t)(uintptr_t)array[array_pages] >> 12;
    for (int i = 0; i < WORDS_PER_PAGE; i++)
        array[array_pages][i] = FIFO_MASKED; /* as Linux initialises a page */
    long r = evtchn(EVTCHNOP_expand_array, &gfn);
    if (r == 0)
        array_pages++;
    return r;
}

static uint32_t bind_ipi(void)
{
    struct { uint32_t vcpu, port; } bi = { 0, 0 };
    long r = evtchn(EVTCHNOP_bind_ipi, &bi);
    return r == 0 ? bi.port : 0;
}

static long set_priority(uint32_t port, uint32_t prio)
{
    struct { uint32_t port, priority; } sp = { port, prio };
    return evtchn(EVTCHNOP_set_priority, &sp);
}

static long init_control(uint64_t gfn, uint32_t offset, uint32_t vcpu, uint8_t *link_bits)
{
    struct init_control ic = { gfn, offset, vcpu, 0, {0} };
    long r = evtchn(EVTCHNOP_init_control, &ic);
    if (link_bits)
        *link_bits = ic.link_bits;
    return r;
}

static void send(uint32_t port) { evtchn(EVTCHNOP_send, &port); }

/* Let the pending upcall in (IF=1 for a moment). */
static void window(void)
{
    asm volatile("sti");
    for (volatile int i = 0; i < 20000; i++) {}
    asm volatile("cli");
}

int guest_main(uint32_t start_info)
{
    (void)start_info;
    set_gate64(idt, UPCALL_VECTOR, upcall_entry, 0);
    struct { uint16_t l; uint64_t b; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
    asm volatile("lidt %0" :: "m"(idtr));
    struct { uint16_t domid, size; uint32_t space; uint64_t idx, gpfn; } xatp = { 0x7ff0, 0, 0, 0, (uint64_t)(uintptr_t)&shinfo >> 12 };
    check(hypercall(HYPERVISOR_memory_op, XENMEM_add_to_physmap, (long)&xatp, 0, 0, 0) == 0, "shared_info placed");
    struct { uint16_t domid; uint16_t pad; uint32_t index; uint64_t value; } p = { 0x7ff0, 0, 0, (2ULL << 56) | UPCALL_VECTOR };
    check(hypercall(HYPERVISOR_hvm_op, HVMOP_set_param, (long)&p, 0, 0, 0) == 0, "callback vector set");

    /* Under 2-level: no priorities, no array. A port raised now (masked,
     * as every 2-level port starts) must survive the switch. */
    uint32_t early = bind_ipi();
    check(set_priority(early, 3) == -38, "set_priority under 2-level gives -ENOSYS");
    uint64_t gfn0 = (uint64_t)(uintptr_t)array[0] >> 12;
    check(evtchn(EVTCHNOP_expand_array, &gfn0) == -95, "expand_array before init_control gives -EOPNOTSUPP");
    /* Masked, as a guest masks a port it is not ready for (Xen starts
     * shared_info cleared: every port unmasked). */
    shinfo.mask[early / 64] |= 1UL << (early % 64);
    send(early);
    check(shinfo.pending[early / 64] >> (early % 64) & 1, "port %u pending under 2-level", early);

    /* init_control: Xen's checks, then success. */
    uint64_t cb_gfn = (uint64_t)(uintptr_t)cb_page >> 12;
    uint8_t link_bits = 0;
    check(init_control(cb_gfn, 0, 1, 0) == -2, "init_control for a vCPU that does not exist: -ENOENT");
    check(init_control(cb_gfn, 4096 - 64, 0, 0) == -22, "a control block across the page end: -EINVAL");
    check(init_control(cb_gfn, 2, 0, 0) == -6, "a misaligned control block: -ENXIO");
    check(init_control(1ULL << 40, 0, 0, 0) == -22, "a frame that is not RAM: -EINVAL");
    long r = init_control(cb_gfn, 0x100, 0, &link_bits);
    check(r == 0 && link_bits == 17, "init_control (%d, link_bits %u)", (int)r, link_bits);
    cb = (struct control_block *)(cb_page + 0x100);
    check(init_control(cb_gfn, 0, 0, 0) == -22, "init_control twice: -EINVAL");

    /* The first array page: the early event is raised again, masked. */
    check(expand() == 0, "expand_array: page 1");
    check(*word(early) == (FIFO_PENDING | FIFO_MASKED), "early port carried over pending (word %x)", *word(early));
    asm volatile("sti");
    unmask(early);
    asm volatile("cli");
    check(nr_seen == 1 && seen[0] == early && upcalls == 1, "unmasked, it arrives (%d events)", nr_seen);

    /* Six IPIs at three priorities, sent with IF=0 in a mixed order, come
     * out by priority, then in the order sent. */
    uint32_t port[6];
    static const uint32_t prio[6] = { 12, 7, 7, 7, 2, 2 };
    for (int i = 0; i < 6; i++) {
        port[i] = bind_ipi();
        if (prio[i] != 7)
            check(set_priority(port[i], prio[i]) == 0, "port %u at priority %u", port[i], prio[i]);
        unmask(port[i]);
    }
    check(set_priority(port[0], 16) == -22, "priority 16 gives -EINVAL");
    check(set_priority(9999, 1) == -22, "set_priority on a closed port gives -EINVAL");
    static const int order_sent[6] = { 5, 1, 0, 3, 4, 2 };
    static const int order_expected[6] = { 5, 4, 1, 3, 2, 0 };
    nr_seen = 0;
    for (int i = 0; i < 6; i++)
        send(port[order_sent[i]]);
    check(cb->ready == ((1u << 2) | (1u << 7) | (1u << 12)), "READY for queues 2, 7, 12 (%x)", cb->ready);
    check((*word(port[1]) & (FIFO_LINKED | FIFO_LINK_MASK)) == (FIFO_LINKED | port[3]), "port %u linked to %u",
          port[1], port[3]);
    window();
    int in_order = nr_seen == 6;
    for (int i = 0; i < 6 && in_order; i++)
        in_order = seen[i] == port[order_expected[i]];
    check(in_order, "6 events by priority, then in raise order (%d seen: %u %u %u %u %u %u)", nr_seen, seen[0],
          seen[1], seen[2], seen[3], seen[4], seen[5]);

    /* Masked: pending, not linked, no upcall; unmask links and delivers. */
    mask(port[2]);
    uint64_t before = upcalls;
    nr_seen = 0;
    send(port[2]);
    window();
    check(upcalls == before && *word(port[2]) == (FIFO_PENDING | FIFO_MASKED), "masked: pending, unlinked (%x)",
          *word(port[2]));
    asm volatile("sti");
    unmask(port[2]);
    asm volatile("cli");
    check(nr_seen == 1 && seen[0] == port[2], "EVTCHNOP_unmask delivers it");

    /* SCHEDOP_poll sees a pending masked port at once. */
    mask(port[3]);
    send(port[3]);
    struct { uint32_t *ports; uint32_t n; uint64_t timeout; } pl = { &port[3], 1, now_ns() + 2000000000ULL };
    uint64_t t = now_ns();
    check(hypercall(HYPERVISOR_sched_op, SCHEDOP_poll, (long)&pl, 0, 0, 0) == 0 && now_ns() - t < 1000000000ULL,
          "poll returns at once for a pending port");
    __atomic_and_fetch(word(port[3]), ~FIFO_PENDING, __ATOMIC_SEQ_CST);
    unmask(port[3]);

    /* VIRQ_TIMER through the FIFO queues, waking HLT. */
    struct { uint32_t virq, vcpu, port; } bv = { 0, 0, 0 };
    r = evtchn(EVTCHNOP_bind_virq, &bv);
    check(r == 0, "VIRQ_TIMER on port %u", bv.port);
    unmask(bv.port);
    nr_seen = 0;
    struct { uint64_t timeout; uint32_t flags; } tm = { now_ns() + 5000000, 0 };
    hypercall(HYPERVISOR_vcpu_op, VCPUOP_set_singleshot_timer, 0, (long)&tm, 0, 0);
    for (int i = 0; i < 100 && nr_seen == 0; i++)
        asm volatile("sti; hlt; cli");
    check(nr_seen == 1 && seen[0] == bv.port, "the timer's event woke HLT");

    /* Ports past the 2-level limit of 4096. */
    for (int i = 1; i < ARRAY_PAGES; i++)
        check(expand() == 0, "expand_array: page %d", i + 1);
    uint32_t high = 0, n = 0;
    while ((high = bind_ipi()) != 0 && high < 4100)
        n++;
    check(high == 4100, "%u more ports bound, the last %u", n, high);
    unmask(high);
    nr_seen = 0;
    send(high);
    window();
    check(nr_seen == 1 && seen[0] == high, "an event on port %u arrives", high);
    struct { uint16_t dom, pad; uint32_t port, status, vcpu, u[2]; } st = { 0x7ff0, 0, 5000, 9, 9, {0, 0} };
    check(evtchn(EVTCHNOP_status, &st) == 0 && st.status == 0, "port 5000: EVTCHNSTAT_closed");
    st.port = 1u << 17;
    check(evtchn(EVTCHNOP_status, &st) == -22, "port 1 << 17: -EINVAL");
    check(evtchn(EVTCHNOP_close, &high) == 0, "close port %u", high);

    /* Reset: every port closed, 2-level again. */
    uint16_t self = 0x7ff0;
    check(evtchn(EVTCHNOP_reset, &self) == 0, "EVTCHNOP_reset");
    check(set_priority(port[0], 1) == -22 && bind_ipi() == 1, "every port closed (port 1 is free again)");
    check(set_priority(1, 1) == -38, "and 2-level again (set_priority: -ENOSYS)");
    return verdict();
}
