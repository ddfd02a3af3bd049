/* grants: a frontend's side of grant tables, v1 then v2, for the host's
 * device-model API to check against (tests/test_grants.py, and
 * tests/test_guests32.py for the 32-bit builds). The guest grants
 * pages to domain 0, announces each phase on the console, and waits for the
 * host to write the phase number into page A through the grant. */
#include "common/lib.h"

#define HYPERVISOR_memory_op 12
#define HYPERVISOR_grant_table_op 20
#define XENMEM_add_to_physmap 7
#define GNTTABOP_query_size 6
#define GNTTABOP_set_version 8
#define GNTTABOP_get_version 10
#define GTF_permit_access 1
#define GTF_readonly (1 << 2)
#define GTF_sub_page (1 << 8)
#define XENMAPIDX_grant_table_status (1UL << 31)

static uint8_t table[4096] __attribute__((aligned(4096)));
static uint8_t status[4096] __attribute__((aligned(4096)));
static volatile uint8_t page_a[4096] __attribute__((aligned(4096)));
static volatile uint8_t page_b[4096] __attribute__((aligned(4096)));

struct v1 { uint16_t flags, domid; uint32_t frame; };
struct v2 { uint16_t flags, domid; uint16_t off, len; uint64_t frame; };

static long add_frame(void *page, unsigned long idx)
{
    struct { uint16_t domid, size; uint32_t space; unsigned long idx, gpfn; } x = { 0x7ff0, 0, 1, idx, (uintptr_t)page >> 12 };
    return hypercall(HYPERVISOR_memory_op, XENMEM_add_to_physmap, (long)&x, 0, 0, 0);
}

static void wait_for(uint8_t phase)
{
    while (page_a[0] != phase) asm volatile("pause");
}

static uint32_t pfn(volatile void *p) { return (uint32_t)((uintptr_t)p >> 12); }

int guest_main(uint32_t start_info)
{
    (void)start_info;
    struct { uint16_t dom; uint32_t nr, max; int16_t status; } qs = { 0x7ff0, 0, 0, 0 };
    long r = hypercall(HYPERVISOR_grant_table_op, GNTTABOP_query_size, (long)&qs, 1, 0, 0);
    check(r == 0 && qs.max >= 1, "query_size: %u of %u frames", qs.nr, qs.max);
    check(add_frame(table, 0) == 0, "grant frame 0 placed");
    check(add_frame(table, 9999) == -22, "a frame past the limit is refused");
    memcpy((void *)page_a, "pvhvm-grant-A", 14);
    memcpy((void *)page_b, "pvhvm-grant-B", 14);

    struct v1 *e1 = (struct v1 *)table;
    e1[8] = (struct v1){ 0, 0, pfn(page_a) };
    e1[9] = (struct v1){ 0, 0, pfn(page_b) };
    e1[10] = (struct v1){ 0, 5, pfn(page_a) };
    e1[11] = (struct v1){ 0, 0, pfn(page_a) };
    asm volatile("" ::: "memory");
    e1[8].flags = GTF_permit_access;
    e1[9].flags = GTF_permit_access | GTF_readonly;
    e1[10].flags = GTF_permit_access;
    printk("PHASE1 a=%x b=%x table=%x\n", pfn(page_a), pfn(page_b), pfn(table));
    wait_for(1);
    check(memcmp((const void *)(page_a + 100), "MAPD", 4) == 0, "host wrote through its mapping");
    check((e1[8].flags & ((1 << 3) | (1 << 4))) == 0, "entry idle again after unmap (%x)", e1[8].flags);

    /* Version 2: the table switches format; status flags move out. */
    struct { uint32_t version; } sv = { 2 };
    check(hypercall(HYPERVISOR_grant_table_op, GNTTABOP_set_version, (long)&sv, 1, 0, 0) == 0, "set_version(2)");
    struct { uint16_t dom, pad; uint32_t version; } gv = { 0x7ff0, 0, 0 };
    hypercall(HYPERVISOR_grant_table_op, GNTTABOP_get_version, (long)&gv, 1, 0, 0);
    check(gv.version == 2, "get_version says 2");
    check(add_frame(table, 0) == 0 && add_frame(status, XENMAPIDX_grant_table_status) == 0, "v2 shared and status frames placed");
    memset(table, 0, sizeof(table));
    struct v2 *e2 = (struct v2 *)table;
    e2[8] = (struct v2){ 0, 0, 0, 0, pfn(page_a) };
    e2[12] = (struct v2){ 0, 0, 0x200, 0x40, pfn(page_b) };
    asm volatile("" ::: "memory");
    e2[8].flags = GTF_permit_access;
    e2[12].flags = GTF_permit_access | GTF_sub_page;
    print("PHASE2\n");
    wait_for(2);
    check(page_b[0x23f] == 'x', "host wrote the last byte of the sub-page window");
    check(page_b[0x240] == 0, "and nothing past it");
    uint16_t *st = (uint16_t *)status;
    check(st[8] == 0, "v2 status word idle (%x)", st[8]);
    sv.version = 3;
    check(hypercall(HYPERVISOR_grant_table_op, GNTTABOP_set_version, (long)&sv, 1, 0, 0) == -22, "version 3 refused");
    return verdict();
}
