/* diskbench: raw block device throughput from inside a guest, for
 * benches/bench_disk.py (busybox has no fio, and its dd reports no rate).
 *
 *     diskbench DEV SEQ_MIB RAND_SECONDS [RAND_MAX_READS]
 *
 * Three phases on DEV, all with O_DIRECT (the guest's page cache is not
 * what is measured), timed with CLOCK_MONOTONIC:
 *
 *   seq_write  SEQ_MIB MiB of zeros in 1 MiB writes from offset 0, as
 *              `dd if=/dev/zero of=DEV bs=1M count=SEQ_MIB oflag=direct`
 *              (no flush inside the timing);
 *   seq_read   the same range back in 1 MiB reads (dd iflag=direct);
 *   randread   4 KiB preads at 4 KiB-aligned offsets spread over the whole
 *              device, one at a time (queue depth 1), for RAND_SECONDS or
 *              RAND_MAX_READS reads, whichever comes first. The offsets
 *              come from a fixed-seed xorshift generator, so every run and
 *              every hypervisor reads the same sequence;
 *   flush      last, an fdatasync of the device (a cache flush request
 *              to the backend), timed as flush_ms. It comes last so that
 *              a backend that mishandles flushes costs only this number.
 *
 * Prints one "RESULT <name> <value>" line per number and "DISKBENCH-DONE"
 * at the end; "DISKBENCH-FAIL <why>" and exit status 1 on any error.
 * Built with `gcc -static -O2` (the initramfs has no libc).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024L * 1024L)
#define BLOCK 4096L

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fail(const char *what)
{
    printf("DISKBENCH-FAIL %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s DEV SEQ_MIB RAND_SECONDS [RAND_MAX_READS]\n", argv[0]);
        return 2;
    }
    const char *dev = argv[1];
    long seq_mib = atol(argv[2]);
    double rand_secs = atof(argv[3]);
    long rand_max = argc > 4 ? atol(argv[4]) : 0;

    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0)
        fail("open");
    uint64_t size = 0;
    struct stat st;
    if (fstat(fd, &st) < 0)
        fail("fstat");
    if (S_ISREG(st.st_mode)) /* a file on the host: the tests run it so */
        size = st.st_size;
    else if (ioctl(fd, BLKGETSIZE64, &size) < 0)
        fail("BLKGETSIZE64");
    if (size < BLOCK) {
        errno = EINVAL;
        fail("the device is smaller than one block");
    }
    printf("RESULT device_mib %llu\n", (unsigned long long)(size / MIB));
    if ((uint64_t)seq_mib * MIB > size) {
        errno = ENOSPC;
        fail("SEQ_MIB is larger than the device");
    }

    char *buf;
    if (posix_memalign((void **)&buf, BLOCK, MIB))
        fail("posix_memalign");
    memset(buf, 0, MIB);

    /* sequential write */
    double t0 = now();
    for (long i = 0; i < seq_mib; i++)
        if (pwrite(fd, buf, MIB, i * MIB) != MIB)
            fail("pwrite");
    double t1 = now();
    printf("RESULT seq_write_mbs %.3f\n", seq_mib * (double)MIB / 1e6 / (t1 - t0));
    printf("RESULT seq_write_s %.6f\n", t1 - t0);
    fflush(stdout);

    /* sequential read */
    t0 = now();
    for (long i = 0; i < seq_mib; i++)
        if (pread(fd, buf, MIB, i * MIB) != MIB)
            fail("pread (sequential)");
    t1 = now();
    printf("RESULT seq_read_mbs %.3f\n", seq_mib * (double)MIB / 1e6 / (t1 - t0));
    printf("RESULT seq_read_s %.6f\n", t1 - t0);
    fflush(stdout);

    /* 4 KiB random reads, queue depth 1 */
    uint64_t blocks = size / BLOCK, seed = 0x9e3779b97f4a7c15ULL;
    long n = 0;
    t0 = now();
    double end = t0 + rand_secs, t = t0;
    while (t < end && (!rand_max || n < rand_max)) {
        off_t off = (off_t)(xorshift64(&seed) % blocks) * BLOCK;
        if (pread(fd, buf, BLOCK, off) != BLOCK)
            fail("pread (random)");
        n++;
        if ((n & 15) == 0 || rand_max)
            t = now();
    }
    t = now();
    printf("RESULT randread_iops %.1f\n", n / (t - t0));
    printf("RESULT randread_reads %ld\n", n);
    printf("RESULT randread_s %.6f\n", t - t0);
    fflush(stdout);

    /* flush */
    t0 = now();
    if (fdatasync(fd) < 0)
        fail("fdatasync");
    printf("RESULT flush_ms %.3f\n", (now() - t0) * 1e3);
    close(fd);
    printf("DISKBENCH-DONE\n");
    fflush(stdout);
    return 0;
}
