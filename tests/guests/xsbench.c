/* xsbench: xenstore round trips from inside the guest, for benches/.
 *
 * Speaks the xenstore ring protocol directly (io/xs_wire.h): the ring page
 * from HVM_PARAM_STORE_PFN, the port from HVM_PARAM_STORE_EVTCHN. Each
 * request is written to the request ring, the port is kicked with
 * EVTCHNOP_send, and the guest waits for the whole reply:
 *   - "poll": spinning on rsp_prod;
 *   - "block": SCHEDOP_poll on the store port (blocks until the port is
 *     pending; no upcall handler needed), re-checking the ring after
 *     clearing the port's pending bit in shared_info.
 * N writes then N reads of data/bench (relative to the domain's home) in
 * poll mode, then N reads in block mode. "n=N" on the command line sets N.
 * Prints "BENCH key value" lines: per-op cycles (min, p50, p99, max) and the
 * total cycles of each phase. */
#include "common/xen.h"

#define HYPERVISOR_memory_op 12
#define HYPERVISOR_hvm_op 34
#define XENMEM_add_to_physmap 7
#define EVTCHNOP_send 4
#define HVMOP_get_param 1
#define HVM_PARAM_STORE_PFN 1
#define HVM_PARAM_STORE_EVTCHN 2
#define XS_READ 2
#define XS_WRITE 11
#define XS_ERROR 16
#define RING 1024
#define MAX_SAMPLES 4096

struct xs_ring {
    char req[RING];
    char rsp[RING];
    volatile uint32_t req_cons, req_prod, rsp_cons, rsp_prod;
};
struct xs_hdr { uint32_t type, req_id, tx_id, len; };

static struct { uint8_t vcpu_info[32 * 64]; uint64_t pending[64]; uint64_t mask[64]; } shinfo __attribute__((aligned(4096)));
static struct xs_ring *ring;
static uint32_t port;
static uint32_t next_id = 1;
static int block_mode;
static uint64_t sleeps;
static int64_t samples[MAX_SAMPLES];
static char reply[4096 + 1];

static long hvm_get(uint32_t index)
{
    struct { uint16_t domid; uint16_t pad; uint32_t index; uint64_t value; } p = { 0x7ff0, 0, index, 0 };
    long r = hypercall(HYPERVISOR_hvm_op, HVMOP_get_param, (long)&p, 0, 0, 0);
    return r == 0 ? (long)p.value : -1;
}

static void ring_write(const void *data, uint32_t len)
{
    const char *d = data;
    while (len) {
        uint32_t prod = ring->req_prod;
        while (prod - ring->req_cons >= RING) asm volatile("pause" ::: "memory");
        uint32_t space = RING - (prod - ring->req_cons);
        uint32_t n = len < space ? len : space;
        for (uint32_t i = 0; i < n; i++) ring->req[(prod + i) & (RING - 1)] = d[i];
        asm volatile("" ::: "memory"); /* data before the index (x86 keeps stores in order) */
        ring->req_prod = prod + n;
        d += n;
        len -= n;
    }
}

static uint32_t rsp_avail(void) { return ring->rsp_prod - ring->rsp_cons; }

/* Wait until `want` bytes of response are in the ring. */
static void wait_for(uint32_t want)
{
    if (!block_mode) {
        while (rsp_avail() < want) asm volatile("pause" ::: "memory");
        return;
    }
    for (;;) {
        __atomic_and_fetch(&shinfo.pending[port / 64], ~(1ULL << (port % 64)), __ATOMIC_SEQ_CST);
        if (rsp_avail() >= want) return;
        struct { uint32_t *ports; uint32_t n; uint32_t pad; uint64_t timeout; } pl = { &port, 1, 0, 0 };
        hypercall(HYPERVISOR_sched_op, SCHEDOP_poll, (long)&pl, 0, 0, 0);
        sleeps++;
    }
}

static void ring_read(void *out, uint32_t len)
{
    char *o = out;
    wait_for(len);
    uint32_t cons = ring->rsp_cons;
    asm volatile("" ::: "memory");
    for (uint32_t i = 0; i < len; i++) o[i] = ring->rsp[(cons + i) & (RING - 1)];
    asm volatile("" ::: "memory");
    ring->rsp_cons = cons + len;
}

/* One request and its reply; returns the reply's type (reply[] holds the
 * payload, NUL-terminated). */
static uint32_t xs_request(uint32_t type, const char *a, uint32_t alen, const char *b, uint32_t blen, uint32_t *rlen)
{
    struct xs_hdr h = { type, next_id++, 0, alen + blen };
    ring_write(&h, sizeof(h));
    ring_write(a, alen);
    if (blen) ring_write(b, blen);
    hypercall(HYPERVISOR_event_channel_op, EVTCHNOP_send, (long)&port, 0, 0, 0);
    struct xs_hdr r;
    ring_read(&r, sizeof(r));
    if (r.len > 4096) r.len = 4096;
    ring_read(reply, r.len);
    reply[r.len] = 0;
    *rlen = r.len;
    if (r.req_id != h.req_id) return ~0u;
    return r.type;
}


static void report(const char *name, int n, uint64_t total)
{
    printk("BENCH %s_total_cycles %lu\n", name, total);
    printk("BENCH %s_n %d\n", name, n);
    char key[64];
    uint64_t len = strlen(name);
    memcpy(key, name, len);
    memcpy(key + len, "_cycles", 8);
    bench_report(key, samples, n);
}


static const char PATH[] = "data/bench";

static int fmt_value(char *buf, int i)
{
    /* "value-<i>", padded to 16 bytes: a small node, as drivers write. */
    char tmp[12];
    int n = 0, len = 0;
    do { tmp[n++] = '0' + i % 10; i /= 10; } while (i);
    memcpy(buf, "value-", 6);
    len = 6;
    while (n) buf[len++] = tmp[--n];
    while (len < 16) buf[len++] = '.';
    return len;
}

int guest_main(uint32_t start_info)
{
    uint64_t n64 = cmdline_arg(start_info, "n", 1000);
    int n = n64 < 1 ? 1 : n64 > MAX_SAMPLES ? MAX_SAMPLES : (int)n64;

    long pfn = hvm_get(HVM_PARAM_STORE_PFN), evt = hvm_get(HVM_PARAM_STORE_EVTCHN);
    check(pfn > 0 && evt > 0, "store ring at pfn %lx, port %ld", pfn, evt);
    ring = (struct xs_ring *)(uintptr_t)(pfn << 12);
    port = (uint32_t)evt;
    struct { uint16_t domid, size; uint32_t space; uint64_t idx, gpfn; } xatp = { 0x7ff0, 0, 0, 0, (uint64_t)(uintptr_t)&shinfo >> 12 };
    check(hypercall(HYPERVISOR_memory_op, XENMEM_add_to_physmap, (long)&xatp, 0, 0, 0) == 0, "shared_info placed");

    char value[32];
    uint32_t rlen;
    int errors = 0;
    /* Warm up (and create the node). */
    for (int i = 0; i < 10; i++) {
        int vl = fmt_value(value, i);
        errors += xs_request(XS_WRITE, PATH, sizeof(PATH), value, vl, &rlen) != XS_WRITE;
        errors += xs_request(XS_READ, PATH, sizeof(PATH), 0, 0, &rlen) != XS_READ;
    }

    uint64_t t0 = rdtsc();
    for (int i = 0; i < n; i++) {
        int vl = fmt_value(value, i);
        uint64_t a = rdtsc();
        errors += xs_request(XS_WRITE, PATH, sizeof(PATH), value, vl, &rlen) != XS_WRITE;
        samples[i] = (int64_t)(rdtsc() - a);
    }
    report("xs_write_poll", n, rdtsc() - t0);
    check(errors == 0, "every write answered OK (%d errors)", errors);

    t0 = rdtsc();
    for (int i = 0; i < n; i++) {
        uint64_t a = rdtsc();
        errors += xs_request(XS_READ, PATH, sizeof(PATH), 0, 0, &rlen) != XS_READ;
        samples[i] = (int64_t)(rdtsc() - a);
    }
    report("xs_read_poll", n, rdtsc() - t0);
    int vl = fmt_value(value, n - 1);
    check(errors == 0 && rlen == (uint32_t)vl && memcmp(reply, value, vl) == 0, "reads give the last value written (%s)", reply);

    block_mode = 1;
    t0 = rdtsc();
    for (int i = 0; i < n; i++) {
        uint64_t a = rdtsc();
        errors += xs_request(XS_READ, PATH, sizeof(PATH), 0, 0, &rlen) != XS_READ;
        samples[i] = (int64_t)(rdtsc() - a);
    }
    report("xs_read_block", n, rdtsc() - t0);
    printk("BENCH xs_block_sleeps %lu\n", sleeps);
    check(errors == 0, "every read answered in block mode (%d errors)", errors);
    return verdict();
}
