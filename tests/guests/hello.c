/* hello: the smallest PVH guest. Prints a greeting and what it was handed in
 * hvm_start_info (command line, memory map, modules), then powers off. */
#include "common/lib.h"

struct hvm_start_info {
    uint32_t magic, version, flags, nr_modules;
    uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    uint32_t memmap_entries, reserved;
};
struct hvm_modlist_entry { uint64_t paddr, size, cmdline_paddr, reserved; };
struct hvm_memmap_table_entry { uint64_t addr, size; uint32_t type, reserved; };

int guest_main(uint32_t start_info)
{
    const struct hvm_start_info *si = (const void *)(uintptr_t)start_info;
    print("Hello from a PVH guest on pvhvm!\n");
    if (si->magic != 0x336ec578) {
        printk("bad start_info magic %x\n", si->magic);
        return SHUTDOWN_crash;
    }
    printk("start_info: version %u at %x\n", si->version, start_info);
    printk("cmdline: [%s]\n", si->cmdline_paddr ? (const char *)(uintptr_t)si->cmdline_paddr : "");
    const struct hvm_memmap_table_entry *mm = (const void *)(uintptr_t)si->memmap_paddr;
    for (uint32_t i = 0; i < si->memmap_entries; i++)
        printk("memmap: %lx %lx %u\n", mm[i].addr, mm[i].size, mm[i].type);
    const struct hvm_modlist_entry *ml = (const void *)(uintptr_t)si->modlist_paddr;
    for (uint32_t i = 0; i < si->nr_modules; i++) {
        const uint8_t *b = (const void *)(uintptr_t)ml[i].paddr;
        uint64_t sum = 0;
        for (uint64_t j = 0; j < ml[i].size; j++) sum = sum * 31 + b[j];
        printk("module %u: paddr %lx size %lu hash %lx\n", i, ml[i].paddr, ml[i].size, sum);
    }
    return SHUTDOWN_poweroff;
}
