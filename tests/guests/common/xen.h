/* The Xen pieces several test guests share: shared_info and vcpu_info as
 * xen.h lays them out, the pvclock read as Linux reads it, the 2-level event
 * channel scan, an IDT gate, and "key=N" from the PVH command line.
 * xen_ulong_t fields are `unsigned long`, so built with -m32 these take the
 * 32-bit (compat) layout: 32-bit event words, 1024 ports. */
#pragma once
#include "lib.h"

#define HYPERVISOR_event_channel_op 32

struct vcpu_time_info { uint32_t version, pad0; uint64_t tsc_timestamp, system_time; uint32_t mul; int8_t shift; uint8_t flags, pad1[2]; };
#ifdef __x86_64__
#define ARCH_VCPU_PAD 1
#else
#define ARCH_VCPU_PAD 5
#endif
struct vcpu_info {
    uint8_t upcall_pending, upcall_mask;
    unsigned long pending_sel;
    unsigned long cr2, arch_pad[ARCH_VCPU_PAD];
    struct vcpu_time_info time;
};
#define EVTCHN_WORD_BITS (8 * sizeof(unsigned long))
struct shared_info {
    struct vcpu_info vcpu_info[32];
    unsigned long pending[EVTCHN_WORD_BITS];
    unsigned long mask[EVTCHN_WORD_BITS];
    uint32_t wc_version, wc_sec, wc_nsec;
#ifdef __x86_64__
    uint32_t wc_sec_hi;
#endif
    struct {
        unsigned long max_pfn, p2m_frame_list_list, nmi_reason, p2m_cr3, p2m_vaddr, p2m_generation;
#ifndef __x86_64__
        uint32_t wc_sec_hi; /* no room for it in the 32-bit generic part */
#endif
    } arch;
};
#ifdef __x86_64__
#define SHINFO_WC_SEC_HI(s) ((s)->wc_sec_hi)
#else
#define SHINFO_WC_SEC_HI(s) ((s)->arch.wc_sec_hi)
#endif
_Static_assert(sizeof(struct vcpu_time_info) == 32, "vcpu_time_info is 32 bytes");
_Static_assert(__builtin_offsetof(struct vcpu_info, pending_sel) == sizeof(unsigned long), "pending_sel at 8 (4 in 32-bit)");
_Static_assert(__builtin_offsetof(struct vcpu_info, time) == 32 && sizeof(struct vcpu_info) == 64, "vcpu_info is 64 bytes");
_Static_assert(__builtin_offsetof(struct shared_info, pending) == 2048, "evtchn_pending at 2048");
_Static_assert(__builtin_offsetof(struct shared_info, wc_version) == 2048 + 2 * 8 * sizeof(unsigned long) * sizeof(unsigned long),
               "wc_version at 3072 (2304 in 32-bit)");
#ifdef __x86_64__
_Static_assert(__builtin_offsetof(struct shared_info, wc_sec_hi) == 3084, "wc_sec_hi at 3084");
#else
_Static_assert(__builtin_offsetof(struct shared_info, arch.wc_sec_hi) == 2340, "arch.wc_sec_hi at 2340");
#endif

/* System time (ns) at TSC value `tsc`, from vcpu_info's pvclock. */
uint64_t pvclock_ns(const volatile struct vcpu_time_info *t, uint64_t tsc);

/* Clear vcpu_info's pending flags and call `fn` for every pending unmasked
 * port, clearing its pending bit first (what an upcall handler does). */
void evtchn_scan(struct shared_info *s, int vcpu, void (*fn)(uint32_t port));

static inline long evtchn(int cmd, void *arg) { return hypercall(HYPERVISOR_event_channel_op, cmd, (long)arg, 0, 0, 0); }

/* A 64-bit interrupt gate (DPL `dpl`) in a 512-quadword IDT. */
void set_gate64(uint64_t *idt, int vector, void *handler, int dpl);
/* A 32-bit interrupt gate (DPL `dpl`) in a 256-quadword IDT. */
void set_gate32(uint64_t *idt, int vector, void *handler, int dpl);

/* "key=N" from the PVH command line (hvm_start_info.cmdline_paddr @24). */
uint64_t cmdline_arg(uint32_t start_info, const char *key, uint64_t dflt);
