#include "xen.h"

uint64_t pvclock_ns(const volatile struct vcpu_time_info *t, uint64_t tsc)
{
    uint32_t v;
    uint64_t ns;
    do {
        v = t->version;
        asm volatile("" ::: "memory");
        int64_t d = (int64_t)(tsc - t->tsc_timestamp);
        uint64_t ad = d < 0 ? -d : d;
        ad = t->shift >= 0 ? ad << t->shift : ad >> -t->shift;
        /* (ad * mul) >> 32 in 64-bit arithmetic: split ad at bit 32. */
        uint64_t scaled = (ad >> 32) * t->mul + (((ad & 0xffffffffu) * t->mul) >> 32);
        ns = d < 0 ? t->system_time - scaled : t->system_time + scaled;
        asm volatile("" ::: "memory");
    } while ((v & 1) || v != t->version);
    return ns;
}

void evtchn_scan(struct shared_info *s, int vcpu, void (*fn)(uint32_t port))
{
    struct vcpu_info *vi = &s->vcpu_info[vcpu];
    while (vi->upcall_pending) {
        vi->upcall_pending = 0;
        unsigned long sel = __atomic_exchange_n(&vi->pending_sel, 0, __ATOMIC_SEQ_CST);
        while (sel) {
            int w = __builtin_ctzl(sel);
            sel &= sel - 1;
            unsigned long bits = s->pending[w] & ~s->mask[w];
            while (bits) {
                int b = __builtin_ctzl(bits);
                bits &= bits - 1;
                __atomic_and_fetch(&s->pending[w], ~(1UL << b), __ATOMIC_SEQ_CST);
                fn((uint32_t)(w * EVTCHN_WORD_BITS + b));
            }
        }
    }
}

void set_gate64(uint64_t *idt, int v, void *h, int dpl)
{
    uint64_t a = (uint64_t)(uintptr_t)h;
    idt[2 * v] = (a & 0xffff) | ((uint64_t)KERNEL_CS << 16) | ((uint64_t)(0x8e | (dpl << 5)) << 40) | ((a >> 16 & 0xffff) << 48);
    idt[2 * v + 1] = a >> 32;
}

void set_gate32(uint64_t *idt, int v, void *h, int dpl)
{
    uint32_t a = (uint32_t)(uintptr_t)h;
    idt[v] = (a & 0xffff) | ((uint64_t)KERNEL_CS << 16) | ((uint64_t)(0x8e | (dpl << 5)) << 40) | ((uint64_t)(a >> 16) << 48);
}

uint64_t cmdline_arg(uint32_t start_info, const char *key, uint64_t dflt)
{
    const char *line = (const char *)(uintptr_t)*(uint64_t *)(uintptr_t)(start_info + 24);
    __SIZE_TYPE__ klen = strlen(key);
    for (const char *s = line; s && *s; s++) {
        if ((s == line || s[-1] == ' ') && memcmp(s, key, klen) == 0 && s[klen] == '=') {
            uint64_t v = 0;
            for (s += klen + 1; *s >= '0' && *s <= '9'; s++) v = v * 10 + (*s - '0');
            return v;
        }
    }
    return dflt;
}
