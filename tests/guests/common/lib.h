/* pvhvm test guests: the little runtime they share. */
#pragma once
#include <stdarg.h>
#include <stdint.h>

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS 0x23
#define USER_CS 0x2b   /* 64-bit; common/boot32.S has no such segment */
#define USER_CS32 0x1b
#define TSS_SEL 0x30

/* Xen ABI numbers (xen.h, sched.h, version.h). */
#define HYPERVISOR_xen_version 17
#define HYPERVISOR_console_io 18
#define HYPERVISOR_sched_op 29
#define CONSOLEIO_write 0
#define CONSOLEIO_read 1
#define SCHEDOP_yield 0
#define SCHEDOP_shutdown 2
#define SCHEDOP_poll 3
#define SHUTDOWN_poweroff 0
#define SHUTDOWN_crash 3
#define XENVER_version 0
#define XENVER_extraversion 1
#define XENVER_get_features 6
#define XENVER_pagesize 7

enum hc_path { HC_VMCALL, HC_VMMCALL, HC_PAGE };
extern enum hc_path hc_path;
extern uint8_t hypercall_page[4096];
extern uint32_t start_info_pa;
#ifdef __x86_64__
extern uint64_t gdt64[];
#else
extern uint64_t gdt32[];
extern uint64_t idt32[256]; /* loaded by common/boot32.S, exceptions filled in */
/* What common/boot32.S's exception stubs hand guest_exception(): PUSHAL's
 * registers, the vector, the error code (0 if the CPU gave none), then the
 * CPU's frame. */
struct exc_frame {
    uint32_t edi, esi, ebp, esp_at_pushal, ebx, edx, ecx, eax;
    uint32_t vector, error, eip, cs, eflags;
};
/* If set and it returns nonzero, the exception is handled (it may move
 * eip); otherwise guest_exception() reports it and crashes the domain. */
extern int (*exception_handler)(struct exc_frame *f);
void guest_exception(struct exc_frame *f);
#endif

/* By the ABI of the mode the guest runs in: 64-bit RDI, RSI, RDX, R10, R8;
 * 32-bit EBX, ECX, EDX, ESI, EDI (longs and pointers are then 32 bits). */
long hypercall(unsigned nr, long a1, long a2, long a3, long a4, long a5);
int setup_hypercall_page(void);
void print(const char *s);
/* %d %u %x %s %c; with l, %ld takes an int64_t and %lu/%lx a uint64_t
 * whatever the width of long. */
void printk(const char *fmt, ...);
void check(int cond, const char *what, ...);
int failures(void);
int verdict(void); /* prints VERDICT, returns the shutdown reason */
void guest_exit(int reason) __attribute__((noreturn));
__SIZE_TYPE__ strlen(const char *s);
void *memset(void *d, int c, __SIZE_TYPE__ n);
void *memcpy(void *d, const void *s, __SIZE_TYPE__ n);
int memcmp(const void *a, const void *b, __SIZE_TYPE__ n);
void sort_i64(int64_t *a, int n); /* ascending, in place (benchmark samples) */
/* "BENCH <name>_{n,min,p50,p99,max} value" lines of samples[0..n) (sorted in place). */
void bench_report(const char *name, int64_t *samples, int n);

static inline void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    asm volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static inline unsigned long read_cr2(void) { unsigned long v; asm volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline unsigned long read_cr0(void) { unsigned long v; asm volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline uint64_t rdtsc(void) { uint32_t lo, hi; asm volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((uint64_t)hi << 32) | lo; }
static inline void wrmsr(uint32_t msr, uint64_t v) { asm volatile("wrmsr" :: "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32))); }
static inline uint64_t rdmsr(uint32_t msr) { uint32_t lo, hi; asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr)); return ((uint64_t)hi << 32) | lo; }
static inline uint16_t read_cs(void) { uint16_t v; asm volatile("mov %%cs, %0" : "=r"(v)); return v; }
static inline uint16_t read_ss(void) { uint16_t v; asm volatile("mov %%ss, %0" : "=r"(v)); return v; }
static inline unsigned long read_rflags(void) { unsigned long v; asm volatile("pushf; pop %0" : "=r"(v)); return v; }
