/* vmgenid: the VM Generation ID as an OS finds it. From hvm_start_info's
 * RSDP through the XSDT and the FADT to the DSDT, the ACPI device whose
 * _HID/_CID is "VM_Gen_Counter" or "VMGENCTR" (what Linux's vmgenid driver
 * matches) and its ADDR package (low, high 32 bits of the ID's address);
 * the ID must lie in a reserved range of the memory map. Prints
 * "VMGENID <32 hex digits>", then polls the ID (sleeping in SCHEDOP_poll
 * between reads) and prints it again each time it changes; after the third
 * change it gives its verdict. Every table and AML byte is bounds-checked:
 * the guest trusts nothing it is handed. */
#include "common/xen.h"

#define HYPERVISOR_memory_op 12
#define XENMEM_add_to_physmap 7
#define XENMAPSPACE_shared_info 0
#define DOMID_SELF 0x7ff0
#define E820_RESERVED 2
#define MAPPED (1ULL << 30) /* what common/boot.S maps */
#define PAGE 4096
#define ID_SIZE 16
#define CHANGES_WANTED 3
#define POLL_NS 5000000ULL       /* between two looks at the ID */
#define GIVE_UP_NS 60000000000ULL

struct hvm_start_info {
    uint32_t magic, version, flags, nr_modules;
    uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    uint32_t memmap_entries, reserved;
};
struct hvm_memmap_table_entry { uint64_t addr, size; uint32_t type, reserved; };

static struct shared_info shinfo __attribute__((aligned(PAGE)));

static uint64_t now_ns(void) { return pvclock_ns(&shinfo.vcpu_info[0].time, rdtsc()); }

/* [addr, addr + len) lies in what the boot code mapped. */
static int mapped(uint64_t addr, uint64_t len) { return len <= MAPPED && addr <= MAPPED - len; }

static uint32_t le32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t le64(const uint8_t *p) { return le32(p) | (uint64_t)le32(p + 4) << 32; }

static int sums_to_zero(const uint8_t *p, uint32_t n)
{
    uint8_t s = 0;
    while (n--) s += *p++;
    return s == 0;
}

/* A system description table at `paddr` with signature `sig`: its header
 * and length checked, its checksum checked (a check line), else NULL. */
static const uint8_t *table(uint64_t paddr, const char *sig, uint32_t *len)
{
    if (!mapped(paddr, 36)) {
        check(0, "%s at %lx lies outside mapped memory", sig, paddr);
        return 0;
    }
    const uint8_t *t = (const uint8_t *)(uintptr_t)paddr;
    *len = le32(t + 4);
    if (memcmp(t, sig, 4) != 0 || *len < 36 || *len > (1u << 20) || !mapped(paddr, *len)) {
        check(0, "%s at %lx: bad signature or length %u", sig, paddr, *len);
        return 0;
    }
    check(sums_to_zero(t, *len), "%s at %lx (%u bytes): checksum", sig, paddr, *len);
    return t;
}

static const uint8_t *find_dsdt(const struct hvm_start_info *si, uint32_t *len)
{
    uint64_t rp = si->rsdp_paddr;
    if (!mapped(rp, 36) || memcmp((const void *)(uintptr_t)rp, "RSD PTR ", 8) != 0) {
        check(0, "RSDP at rsdp_paddr %lx", rp);
        return 0;
    }
    const uint8_t *rsdp = (const uint8_t *)(uintptr_t)rp;
    uint32_t rsdp_len = le32(rsdp + 20);
    int ok = rsdp[15] >= 2 && rsdp_len >= 36 && mapped(rp, rsdp_len);
    check(ok && sums_to_zero(rsdp, 20) && sums_to_zero(rsdp, rsdp_len), "RSDP at %lx: revision %u, checksums", rp, rsdp[15]);
    if (!ok) return 0;

    uint32_t xsdt_len;
    const uint8_t *xsdt = table(le64(rsdp + 24), "XSDT", &xsdt_len);
    if (!xsdt) return 0;
    const uint8_t *fadt = 0;
    uint32_t fadt_len = 0;
    for (uint32_t off = 36; off + 8 <= xsdt_len && !fadt; off += 8) {
        uint64_t entry = le64(xsdt + off);
        if (mapped(entry, 4) && memcmp((const void *)(uintptr_t)entry, "FACP", 4) == 0)
            fadt = table(entry, "FACP", &fadt_len);
    }
    if (!fadt) {
        check(0, "the XSDT lists a FADT");
        return 0;
    }
    /* X_DSDT (offset 140) when the FADT has it, else the 32-bit DSDT (40). */
    uint64_t dsdt = fadt_len >= 148 ? le64(fadt + 140) : 0;
    if (!dsdt && fadt_len >= 44) dsdt = le32(fadt + 40);
    return table(dsdt, "DSDT", len);
}

/* PkgLength at p (ACPI 6.3 §20.2.4): its bytes (0 if they run past end),
 * the value (which counts those bytes) in *value. */
static int pkg_length(const uint8_t *p, const uint8_t *end, uint32_t *value)
{
    if (p >= end) return 0;
    int follow = p[0] >> 6;
    if (end - p < 1 + follow) return 0;
    if (!follow) {
        *value = p[0] & 0x3f;
        return 1;
    }
    uint32_t v = p[0] & 0x0f;
    for (int i = 0; i < follow; i++) v |= (uint32_t)p[1 + i] << (4 + 8 * i);
    *value = v;
    return 1 + follow;
}

/* An AML integer constant at p: its bytes (0 if none, or past end). */
static int aml_integer(const uint8_t *p, const uint8_t *end, uint64_t *v)
{
    static const uint8_t sizes[] = { [0x0a] = 1, [0x0b] = 2, [0x0c] = 4, [0x0e] = 8 };
    if (p >= end) return 0;
    if (p[0] == 0x00 || p[0] == 0x01) { *v = p[0]; return 1; } /* ZeroOp, OneOp */
    if (p[0] == 0xff) { *v = ~0ULL; return 1; }                 /* OnesOp */
    if (p[0] >= sizeof(sizes) || !sizes[p[0]] || end - p < 1 + sizes[p[0]]) return 0;
    *v = 0;
    for (int i = sizes[p[0]]; i > 0; i--) *v = *v << 8 | p[i];
    return 1 + sizes[p[0]];
}

static int upper(int c) { return c >= 'a' && c <= 'z' ? c - 32 : c; }

/* A String (StringPrefix ... NullChar) at p in [p, end) equal to `id`,
 * case aside: ACPICA upper-cases _HID and _CID strings before drivers
 * compare them. */
static int string_is(const uint8_t *p, const uint8_t *end, const char *id)
{
    if (p >= end || *p++ != 0x0d) return 0;
    for (; *id; id++, p++)
        if (p >= end || upper(*p) != *id) return 0;
    return p < end && *p == 0;
}

/* The first Device (ExtOpPrefix DeviceOp PkgLength NameSeg ...) in the
 * AML whose body holds one of the IDs the vmgenid driver matches; its
 * body in [*body, *body_end). */
static int find_device(const uint8_t *aml, const uint8_t *end, const uint8_t **body, const uint8_t **body_end)
{
    for (const uint8_t *p = aml; p + 2 <= end; p++) {
        if (p[0] != 0x5b || p[1] != 0x82) continue;
        uint32_t len;
        int n = pkg_length(p + 2, end, &len);
        if (!n || len < (uint32_t)n + 4 || len > (uint32_t)(end - (p + 2))) continue;
        const uint8_t *b = p + 2 + n, *e = p + 2 + len;
        for (const uint8_t *s = b + 4; s < e; s++) {
            if (string_is(s, e, "VM_GEN_COUNTER") || string_is(s, e, "VMGENCTR")) {
                printk("device %c%c%c%c at DSDT offset %u\n", b[0], b[1], b[2], b[3], (unsigned)(p - aml) + 36);
                *body = b;
                *body_end = e;
                return 1;
            }
        }
    }
    return 0;
}

/* Name (ADDR, Package () {low, high}) in [body, end): the ID's address. */
static int find_addr(const uint8_t *body, const uint8_t *end, uint64_t *addr)
{
    for (const uint8_t *p = body; p + 6 <= end; p++) {
        if (p[0] != 0x08 || memcmp(p + 1, "ADDR", 4) != 0 || p[5] != 0x12) continue;
        uint32_t len;
        int n = pkg_length(p + 6, end, &len);
        if (!n || len < (uint32_t)n + 1 || len > (uint32_t)(end - (p + 6))) return 0;
        const uint8_t *q = p + 6 + n, *pkg_end = p + 6 + len;
        uint64_t low, high;
        int a, b;
        if (*q++ != 2 || !(a = aml_integer(q, pkg_end, &low)) || !(b = aml_integer(q + a, pkg_end, &high)))
            return 0;
        if (low >> 32 || high >> 32) return 0;
        *addr = high << 32 | low;
        return 1;
    }
    return 0;
}

static int in_reserved_range(const struct hvm_start_info *si, uint64_t addr, uint64_t len)
{
    uint64_t n = si->memmap_entries;
    if (n > 128 || !mapped(si->memmap_paddr, n * sizeof(struct hvm_memmap_table_entry))) return 0;
    const struct hvm_memmap_table_entry *mm = (const void *)(uintptr_t)si->memmap_paddr;
    for (uint64_t i = 0; i < n; i++)
        if (mm[i].type == E820_RESERVED && addr >= mm[i].addr && len <= mm[i].size && addr - mm[i].addr <= mm[i].size - len)
            return 1;
    return 0;
}

/* The host may change the ID between any two of our loads: read it until
 * two reads in a row agree, so a half-old, half-new ID is never taken. */
static void read_id(const volatile uint8_t *src, uint8_t id[ID_SIZE])
{
    uint8_t again[ID_SIZE];
    do {
        for (int i = 0; i < ID_SIZE; i++) id[i] = src[i];
        for (int i = 0; i < ID_SIZE; i++) again[i] = src[i];
    } while (memcmp(id, again, ID_SIZE) != 0);
}

static int all_zero(const uint8_t id[ID_SIZE])
{
    for (int i = 0; i < ID_SIZE; i++)
        if (id[i]) return 0;
    return 1;
}

static void print_id(const uint8_t id[ID_SIZE])
{
    char line[sizeof("VMGENID ") + 2 * ID_SIZE + 1] = "VMGENID ";
    char *p = line + 8;
    for (int i = 0; i < ID_SIZE; i++) {
        *p++ = "0123456789abcdef"[id[i] >> 4];
        *p++ = "0123456789abcdef"[id[i] & 15];
    }
    *p++ = '\n';
    *p = 0;
    print(line);
}

int guest_main(uint32_t start_info)
{
    const struct hvm_start_info *si = (const void *)(uintptr_t)start_info;
    if (si->magic != 0x336ec578) {
        printk("FAIL - start_info magic %x\n", si->magic);
        return SHUTDOWN_crash;
    }
    uint32_t dsdt_len;
    const uint8_t *dsdt = find_dsdt(si, &dsdt_len);
    const uint8_t *body = 0, *body_end = 0;
    int found = dsdt && find_device(dsdt + 36, dsdt + dsdt_len, &body, &body_end);
    check(found, "a VM generation ID device (_HID/_CID VM_GEN_COUNTER or VMGENCTR) in the DSDT");
    uint64_t addr = 0;
    int have_addr = found && find_addr(body, body_end, &addr);
    check(have_addr, "its ADDR: a package of two 32-bit integers (%lx)", addr);
    if (!have_addr)
        return verdict();
    check(addr % 8 == 0, "the ID is 8-byte aligned (%lx)", addr);
    check(in_reserved_range(si, addr, ID_SIZE), "the ID lies in a reserved range of the memory map (%lx)", addr);
    if (!mapped(addr, ID_SIZE)) {
        check(0, "the ID at %lx is in mapped memory", addr);
        return verdict();
    }
    const volatile uint8_t *src = (const volatile uint8_t *)(uintptr_t)addr;
    uint8_t seen[ID_SIZE], now[ID_SIZE];
    read_id(src, seen);
    print_id(seen);
    check(!all_zero(seen), "the ID is not all zero");

    struct { uint16_t domid, size; uint32_t space; unsigned long idx, gpfn; } xatp = {
        DOMID_SELF, 0, XENMAPSPACE_shared_info, 0, (uintptr_t)&shinfo >> 12 };
    if (hypercall(HYPERVISOR_memory_op, XENMEM_add_to_physmap, (long)&xatp, 0, 0, 0) != 0) {
        check(0, "shared_info placed (for the time to sleep by)");
        return verdict();
    }
    int changes = 0;
    uint64_t give_up = now_ns() + GIVE_UP_NS;
    while (changes < CHANGES_WANTED && now_ns() < give_up) {
        /* No ports: SCHEDOP_poll just sleeps until the timeout (absolute
         * system time), or until an upcall is pending, so none may be. */
        shinfo.vcpu_info[0].upcall_pending = 0;
        struct { uint32_t *ports; uint32_t n; uint64_t timeout; } poll = { 0, 0, now_ns() + POLL_NS };
        hypercall(HYPERVISOR_sched_op, SCHEDOP_poll, (long)&poll, 0, 0, 0);
        read_id(src, now);
        if (memcmp(now, seen, ID_SIZE) == 0) continue;
        print_id(now);
        changes++;
        check(!all_zero(now), "new ID %d is not all zero", changes);
        memcpy(seen, now, ID_SIZE);
    }
    check(changes == CHANGES_WANTED, "the ID changed %d times (of %d) within %lu s", changes, CHANGES_WANTED,
          GIVE_UP_NS / 1000000000);
    return verdict();
}
