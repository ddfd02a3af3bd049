/* The shared runtime of pvhvm's test guests: hypercalls by each entry path,
 * console output through console_io, checks and the verdict line. */
#include "lib.h"

enum hc_path hc_path = HC_VMCALL;
uint8_t hypercall_page[4096] __attribute__((aligned(4096)));
static int nfail, npass;

__SIZE_TYPE__ strlen(const char *s) { __SIZE_TYPE__ n = 0; while (s[n]) n++; return n; }
void *memset(void *d, int c, __SIZE_TYPE__ n) { uint8_t *p = d; while (n--) *p++ = (uint8_t)c; return d; }
void *memcpy(void *d, const void *s, __SIZE_TYPE__ n) { uint8_t *p = d; const uint8_t *q = s; while (n--) *p++ = *q++; return d; }
int memcmp(const void *a, const void *b, __SIZE_TYPE__ n)
{
    const uint8_t *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q) return *p - *q;
    return 0;
}

#ifdef __x86_64__
long hypercall(unsigned nr, long a1, long a2, long a3, long a4, long a5)
{
    long ret;
    register long r10 asm("r10") = a4;
    register long r8 asm("r8") = a5;
    switch (hc_path) {
    case HC_VMMCALL:
        asm volatile("vmmcall" : "=a"(ret), "+D"(a1), "+S"(a2), "+d"(a3), "+r"(r10), "+r"(r8)
                     : "a"(nr) : "memory");
        break;
    case HC_PAGE: {
        void *stub = hypercall_page + nr * 32;
        asm volatile("call *%[stub]" : "=a"(ret), "+D"(a1), "+S"(a2), "+d"(a3), "+r"(r10), "+r"(r8)
                     : [stub] "r"(stub), "a"(nr) : "memory", "rcx", "r11");
        break;
    }
    default:
        asm volatile("vmcall" : "=a"(ret), "+D"(a1), "+S"(a2), "+d"(a3), "+r"(r10), "+r"(r8)
                     : "a"(nr) : "memory");
    }
    return ret;
}
#else
long hypercall(unsigned nr, long a1, long a2, long a3, long a4, long a5)
{
    long ret;
    switch (hc_path) {
    case HC_VMMCALL:
        asm volatile("vmmcall" : "=a"(ret), "+b"(a1), "+c"(a2), "+d"(a3), "+S"(a4), "+D"(a5)
                     : "a"(nr) : "memory");
        break;
    case HC_PAGE: {
        /* Six registers carry the call; the stub's address goes in memory. */
        void *stub = hypercall_page + nr * 32;
        asm volatile("call *%[stub]" : "=a"(ret), "+b"(a1), "+c"(a2), "+d"(a3), "+S"(a4), "+D"(a5)
                     : [stub] "m"(stub), "a"(nr) : "memory");
        break;
    }
    default:
        asm volatile("vmcall" : "=a"(ret), "+b"(a1), "+c"(a2), "+d"(a3), "+S"(a4), "+D"(a5)
                     : "a"(nr) : "memory");
    }
    return ret;
}

int (*exception_handler)(struct exc_frame *f);

void guest_exception(struct exc_frame *f)
{
    if (exception_handler && exception_handler(f))
        return;
    uint32_t cr2;
    asm volatile("mov %%cr2, %0" : "=r"(cr2));
    printk("EXCEPTION vector %u error %x at eip %x (cs %x) cr2 %x\n", f->vector, f->error, f->eip, f->cs, cr2);
    guest_exit(SHUTDOWN_crash);
}

/* 64-bit division for -m32 (there is no 32-bit libgcc here): shift and subtract. */
static uint64_t udivmod64(uint64_t n, uint64_t d, uint64_t *rem)
{
    uint64_t q = 0, r = 0;
    if (d == 0) {
        *rem = 0;
        return ~0ULL;
    }
    for (int i = 63; i >= 0; i--) {
        r = (r << 1) | ((n >> i) & 1);
        if (r >= d) { r -= d; q |= 1ULL << i; }
    }
    *rem = r;
    return q;
}
uint64_t __udivdi3(uint64_t n, uint64_t d);
uint64_t __umoddi3(uint64_t n, uint64_t d);
int64_t __divdi3(int64_t n, int64_t d);
int64_t __moddi3(int64_t n, int64_t d);
uint64_t __udivdi3(uint64_t n, uint64_t d) { uint64_t r; return udivmod64(n, d, &r); }
uint64_t __umoddi3(uint64_t n, uint64_t d) { uint64_t r; udivmod64(n, d, &r); return r; }
int64_t __divdi3(int64_t n, int64_t d)
{
    uint64_t r, q = udivmod64(n < 0 ? -(uint64_t)n : (uint64_t)n, d < 0 ? -(uint64_t)d : (uint64_t)d, &r);
    return (n < 0) != (d < 0) ? -(int64_t)q : (int64_t)q;
}
int64_t __moddi3(int64_t n, int64_t d)
{
    uint64_t r;
    udivmod64(n < 0 ? -(uint64_t)n : (uint64_t)n, d < 0 ? -(uint64_t)d : (uint64_t)d, &r);
    return n < 0 ? -(int64_t)r : (int64_t)r;
}
#endif

/* CPUID leaf base+2 names the MSR; writing the page's address to it makes
 * the hypervisor fill the page with hypercall stubs. */
int setup_hypercall_page(void)
{
    uint32_t a, b, c, d;
    cpuid(0x40000000, &a, &b, &c, &d);
    if (b != 0x566e6558 || c != 0x65584d4d || d != 0x4d4d566e) /* "XenVMMXenVMM" */
        return -1;
    cpuid(0x40000002, &a, &b, &c, &d);
    wrmsr(b, (uint64_t)(uintptr_t)hypercall_page);
    return a >= 1 && hypercall_page[0] == 0xb8 ? 0 : -2;
}

static void console_write(const char *s, uint64_t n)
{
    enum hc_path saved = hc_path;
    hc_path = HC_VMCALL;
    hypercall(HYPERVISOR_console_io, CONSOLEIO_write, (long)n, (long)s, 0, 0);
    hc_path = saved;
}

void print(const char *s) { console_write(s, strlen(s)); }

static char *fmt_num(char *p, uint64_t v, int base, int neg)
{
    char tmp[24];
    int n = 0;
    do { tmp[n++] = "0123456789abcdef"[v % base]; v /= base; } while (v);
    if (neg) *p++ = '-';
    while (n) *p++ = tmp[--n];
    return p;
}

static void vformat(char *out, uint64_t cap, const char *fmt, va_list ap)
{
    char *p = out, *end = out + cap - 24;
    for (; *fmt && p < end; fmt++) {
        if (*fmt != '%') { *p++ = *fmt; continue; }
        int lng = 0;
        fmt++;
        while (*fmt == 'l') { lng = 1; fmt++; }
        switch (*fmt) {
        case 'd': { int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int); p = fmt_num(p, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, v < 0); break; }
        case 'u': { uint64_t v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned); p = fmt_num(p, v, 10, 0); break; }
        case 'x': { uint64_t v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned); *p++ = '0'; *p++ = 'x'; p = fmt_num(p, v, 16, 0); break; }
        case 's': { const char *s = va_arg(ap, const char *); while (*s && p < end) *p++ = *s++; break; }
        case 'c': *p++ = (char)va_arg(ap, int); break;
        default: *p++ = *fmt;
        }
    }
    *p = 0;
}

void printk(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vformat(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    print(buf);
}

void check(int cond, const char *what, ...)
{
    char buf[400];
    va_list ap;
    va_start(ap, what);
    vformat(buf, sizeof(buf), what, ap);
    va_end(ap);
    if (cond) npass++; else nfail++;
    printk("%s - %s\n", cond ? "ok" : "FAIL", buf);
}

int failures(void) { return nfail; }

int verdict(void)
{
    if (nfail)
        printk("VERDICT: FAIL (%d of %d checks failed)\n", nfail, nfail + npass);
    else
        printk("VERDICT: PASS (%d checks)\n", npass);
    return nfail ? SHUTDOWN_crash : SHUTDOWN_poweroff;
}

void guest_exit(int reason)
{
    uint32_t r = (uint32_t)reason;
    hc_path = HC_VMCALL;
    hypercall(HYPERVISOR_sched_op, SCHEDOP_shutdown, (long)&r, 0, 0, 0);
    for (;;) asm volatile("cli; hlt");
}

void sort_i64(int64_t *a, int n)
{
    for (int gap = n / 2; gap > 0; gap /= 2)
        for (int i = gap; i < n; i++) {
            int64_t v = a[i];
            int j = i;
            for (; j >= gap && a[j - gap] > v; j -= gap) a[j] = a[j - gap];
            a[j] = v;
        }
}

void bench_report(const char *name, int64_t *samples, int n)
{
    sort_i64(samples, n);
    printk("BENCH %s_n %d\n", name, n);
    printk("BENCH %s_min %ld\n", name, samples[0]);
    printk("BENCH %s_p50 %ld\n", name, samples[(n - 1) / 2]);
    printk("BENCH %s_p99 %ld\n", name, samples[(99 * n + 99) / 100 - 1]); /* nearest rank */
    printk("BENCH %s_max %ld\n", name, samples[n - 1]);
}
