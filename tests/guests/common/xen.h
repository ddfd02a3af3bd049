/* The Xen pieces several test guests share: shared_info and vcpu_info as
 * xen.h lays them out, the pvclock read as Linux reads it, the 2-level event
 * channel scan, an IDT gate, and "key=N" from the PVH command line. */
#pragma once
#include "lib.h"

#define HYPERVISOR_event_channel_op 32

struct vcpu_time_info { uint32_t version, pad0; uint64_t tsc_timestamp, system_time; uint32_t mul; int8_t shift; uint8_t flags, pad1[2]; };
struct vcpu_info { uint8_t upcall_pending, upcall_mask, pad[6]; uint64_t pending_sel; uint64_t cr2, pad2; struct vcpu_time_info time; };
struct shared_info { struct vcpu_info vcpu_info[32]; uint64_t pending[64]; uint64_t mask[64]; uint32_t wc_version, wc_sec, wc_nsec, wc_sec_hi; };

/* System time (ns) at TSC value `tsc`, from vcpu_info's pvclock. */
uint64_t pvclock_ns(const volatile struct vcpu_time_info *t, uint64_t tsc);

/* Clear vcpu_info's pending flags and call `fn` for every pending unmasked
 * port, clearing its pending bit first (what an upcall handler does). */
void evtchn_scan(struct shared_info *s, int vcpu, void (*fn)(uint32_t port));

static inline long evtchn(int cmd, void *arg) { return hypercall(HYPERVISOR_event_channel_op, cmd, (long)arg, 0, 0, 0); }

/* A 64-bit interrupt gate (DPL `dpl`) in a 512-quadword IDT. */
void set_gate64(uint64_t *idt, int vector, void *handler, int dpl);

/* "key=N" from the PVH command line (hvm_start_info.cmdline_paddr @24). */
uint64_t cmdline_arg(uint32_t start_info, const char *key, uint64_t dflt);
