/* flood: a guest that floods its consoles, for the host's memory bounds.
 * Command line: hv_mib=N writes N MiB with console_io (`xl dmesg`) in
 * calls of piece=B bytes (a count larger than 64 KiB is continued by the
 * hypervisor); hvc_mib=M then writes M MiB through the PV console ring
 * (hvc0). Every line is numbered; each flood ends with a marker line
 * (FLOOD hv done after <bytes>, FLOOD hvc done), then the guest powers off. */
#include "common/xen.h"

#define HYPERVISOR_hvm_op 34
#define HVMOP_get_param 1
#define HVM_PARAM_CONSOLE_PFN 17
#define HVM_PARAM_CONSOLE_EVTCHN 18
#define EVTCHNOP_send 4

/* xen/include/public/io/console.h */
struct xencons_interface {
    char in[1024];
    char out[2048];
    uint32_t in_cons, in_prod;
    uint32_t out_cons, out_prod;
};
_Static_assert(__builtin_offsetof(struct xencons_interface, out_prod) == 3084, "out_prod at 3084");

#define LINE 64
#define DIGITS 8
static char text[1 << 20]; /* lines of LINE bytes: "<tag> <8-digit number>....\n" */

/* Fill text[] with lines numbered from `first`; returns the next number.
 * Once text[] holds `tag`'s lines only the numbers are written again (the
 * emulated byte loop is most of the flood's time). */
static uint64_t fill(const char *tag, uint64_t first)
{
    static const char *filled;
    int at_digits = (int)strlen(tag) + 1;
    for (uint64_t at = 0; at < sizeof(text); at += LINE, first++) {
        char *l = text + at;
        if (filled != tag) {
            memcpy(l, tag, at_digits - 1);
            l[at_digits - 1] = ' ';
            memset(l + at_digits + DIGITS, '.', LINE - 1 - at_digits - DIGITS);
            l[LINE - 1] = '\n';
        }
        uint64_t v = first;
        for (int d = DIGITS - 1; d >= 0; d--, v /= 10)
            l[at_digits + d] = '0' + v % 10;
    }
    filled = tag;
    return first;
}

static uint64_t param(uint32_t index)
{
    struct { uint16_t domid, pad; uint32_t index; uint64_t value; } p = { 0x7ff0, 0, index, 0 };
    long r = hypercall(HYPERVISOR_hvm_op, HVMOP_get_param, (long)&p, 0, 0, 0);
    return r == 0 ? p.value : 0;
}

/* Write `len` bytes to hvc0's ring, waiting for the backend to drain it. */
static void hvc_write(volatile struct xencons_interface *ring, uint32_t port, const char *s, uint64_t len)
{
    while (len) {
        uint32_t prod = ring->out_prod;
        uint32_t room = sizeof(ring->out) - (prod - ring->out_cons);
        if (room == 0) {
            /* The backend drains the ring when notified, before we go on. */
            evtchn(EVTCHNOP_send, &port);
            continue;
        }
        uint32_t n = room < len ? room : (uint32_t)len;
        for (uint32_t i = 0; i < n; i++)
            ring->out[(prod + i) % sizeof(ring->out)] = s[i];
        asm volatile("" ::: "memory"); /* the bytes before the index (x86 keeps store order) */
        ring->out_prod = prod + n;
        s += n;
        len -= n;
    }
    evtchn(EVTCHNOP_send, &port);
}

int guest_main(uint32_t start_info)
{
    uint64_t hv_bytes = cmdline_arg(start_info, "hv_mib", 0) << 20;
    uint64_t hvc_bytes = cmdline_arg(start_info, "hvc_mib", 0) << 20;
    uint64_t piece = cmdline_arg(start_info, "piece", sizeof(text));
    if (piece == 0 || piece > sizeof(text))
        piece = sizeof(text);

    uint64_t line = 0, done = 0;
    while (done < hv_bytes) {
        line = fill("hv", line);
        for (uint64_t at = 0; at < sizeof(text) && done < hv_bytes; at += piece) {
            uint64_t n = piece;
            if (n > sizeof(text) - at) n = sizeof(text) - at;
            if (n > hv_bytes - done) n = hv_bytes - done;
            long r = hypercall(HYPERVISOR_console_io, CONSOLEIO_write, (long)n, (long)(text + at), 0, 0);
            if (r != 0) {
                printk("\nconsole_io write failed: %d\n", (int)r);
                return SHUTDOWN_crash;
            }
            done += n;
        }
    }
    printk("FLOOD hv done after %lu bytes\n", done);

    if (hvc_bytes) {
        volatile struct xencons_interface *ring = (void *)(uintptr_t)(param(HVM_PARAM_CONSOLE_PFN) << 12);
        uint32_t port = (uint32_t)param(HVM_PARAM_CONSOLE_EVTCHN);
        line = 0;
        done = 0;
        while (done < hvc_bytes) {
            line = fill("hvc", line);
            uint64_t n = hvc_bytes - done < sizeof(text) ? hvc_bytes - done : sizeof(text);
            hvc_write(ring, port, text, n);
            done += n;
        }
        static char end[64];
        char *e = end;
        const char *m = "FLOOD hvc done\n";
        while (*m) *e++ = *m++;
        hvc_write(ring, port, end, e - end);
    }
    return SHUTDOWN_poweroff;
}
