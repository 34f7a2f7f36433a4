/*
 * lmwatch rig guest disk workload: write stamped blocks to /dev/vda at a set rate
 * for a bounded time, check them, then exit (init prints the disk's checksum).
 *
 * Parameters come from the kernel command line (/proc/cmdline):
 *   lmw.dkrate=K      KiB/s of 4 KiB blocks to write (default 256; 0: do not run)
 *   lmw.dksecs=T      seconds to write for (default 60), then verify and exit
 *   lmw.dkmib=M       MiB at the start of the disk to write into (default: all of it)
 *   lmw.dkselftest=S  after S seconds, write one block with one wrong bit that the
 *                     expected-generation table does not know about (proves that
 *                     diskbad= catches a bad block)
 *
 * Blocks are written in order, wrapping around. Every written 4 KiB block carries
 * its index and generation and a pattern derived from both in all of its 512 words
 * (word 0 = MAGIC ^ index, word 1 = generation, word w = mix(index, gen) + w), so a
 * block from the wrong place, an old generation or a changed bit is caught. The
 * generation each block must have is kept in memory. Before a block is rewritten
 * it is read back and checked; at the end every written block is. Reads and
 * writes use O_DIRECT: they reach the disk (the hypervisor's copy sees them), not
 * the guest's page cache.
 *
 * Output on the serial console:
 *   dk n=<seconds> w=<blocks written> blocks=<distinct blocks> diskbad=<bad blocks>  (1/s)
 *   dk done n=<s> w=<written> blocks=<distinct> diskbad=<bad blocks after the final check>
 * A bad block is counted once and rewritten correctly.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096UL
#define WORDS (BLOCK / 8)
#define MAGIC 0x6c6d776469736b0aULL /* "lmwdisk\n" */

static uint64_t mix(uint64_t idx, uint64_t gen) {
    uint64_t x = idx * 0x9E3779B97F4A7C15ULL ^ (gen + 0x632BE59BD9B4E019ULL);
    x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ULL; x ^= x >> 27;
    return x ^ MAGIC;
}

static void fill(uint64_t *p, uint64_t idx, uint64_t gen) {
    uint64_t h = mix(idx, gen);
    p[0] = MAGIC ^ idx;
    p[1] = gen;
    for (unsigned w = 2; w < WORDS; w++) p[w] = h + w;
}

static int good(const uint64_t *p, uint64_t idx, uint64_t gen) {
    if (p[0] != (MAGIC ^ idx) || p[1] != gen) return 0;
    uint64_t h = mix(idx, gen);
    for (unsigned w = 2; w < WORDS; w++)
        if (p[w] != h + w) return 0;
    return 1;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long param(const char *cmdline, const char *key, long dflt) {
    const char *p = cmdline;
    size_t kl = strlen(key);
    while ((p = strstr(p, key)) != NULL) {
        if ((p == cmdline || p[-1] == ' ') && p[kl] == '=') return strtol(p + kl + 1, NULL, 10);
        p += kl;
    }
    return dflt;
}

static int fd;
static uint64_t *buf;
static uint64_t bad;

/* read block i back and compare with generation gen; count and repair a bad one */
static void check_block(uint64_t i, uint64_t gen, const char *when) {
    if (pread(fd, buf, BLOCK, (off_t)(i * BLOCK)) != (ssize_t)BLOCK) {
        printf("lmw: disk read of block %llu failed\n", (unsigned long long)i);
        bad++;
        return;
    }
    if (!good(buf, i, gen)) {
        bad++;
        printf("lmw: DISKBAD block=%llu want_gen=%llu got_idx=%llx got_gen=%llu (%s)\n",
               (unsigned long long)i, (unsigned long long)gen,
               (unsigned long long)(buf[0] ^ MAGIC), (unsigned long long)buf[1], when);
        fill(buf, i, gen);
        if (pwrite(fd, buf, BLOCK, (off_t)(i * BLOCK)) != (ssize_t)BLOCK)
            printf("lmw: disk repair of block %llu failed\n", (unsigned long long)i);
    }
}

int main(int argc, char **argv) {
    char cmdline[4096] = "";
    FILE *f = fopen(argc > 1 ? argv[1] : "/proc/cmdline", "r");
    if (f) { size_t n = fread(cmdline, 1, sizeof(cmdline) - 1, f); cmdline[n] = 0; fclose(f); }
    long rate = param(cmdline, "lmw.dkrate", 256);
    long secs = param(cmdline, "lmw.dksecs", 60);
    long mib = param(cmdline, "lmw.dkmib", 0);
    long selftest = param(cmdline, "lmw.dkselftest", 0);
    const char *dev = argc > 2 ? argv[2] : "/dev/vda";
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (rate <= 0) { printf("lmw: disk writer off\n"); return 0; }

    fd = open(dev, O_RDWR | O_DIRECT | O_SYNC);
    if (fd < 0) { printf("lmw: cannot open %s\n", dev); return 1; }
    off_t size = lseek(fd, 0, SEEK_END);
    uint64_t nblocks = (uint64_t)size / BLOCK;
    if (mib > 0 && (uint64_t)mib * 256 < nblocks) nblocks = (uint64_t)mib * 256;
    uint32_t *expect = calloc(nblocks ? nblocks : 1, sizeof(uint32_t));
    if (nblocks == 0 || !expect || posix_memalign((void **)&buf, BLOCK, BLOCK)) {
        printf("lmw: disk writer cannot start (blocks=%llu)\n", (unsigned long long)nblocks);
        return 1;
    }
    printf("lmw: disk ready dev=%s blocks=%llu rate=%ldKiB/s secs=%ld selftest=%ld\n", dev,
           (unsigned long long)nblocks, rate, secs, selftest);

    const double tick = 0.01;
    double per_tick = (double)rate * 1024 / BLOCK * tick, credit = 0;
    double start = now(), next_tick = start, next_hb = start + 1;
    uint64_t written = 0, distinct = 0, cursor = 0, hb = 0;
    int flipped = 0;
    while (now() - start < secs) {
        double t = now();
        if (t >= next_tick) {
            long ticks = (long)((t - next_tick) / tick) + 1;
            if (ticks > 100) ticks = 100;  /* after a pause: at most 1 s of backlog */
            credit += per_tick * ticks;
            next_tick += ticks * tick;
            if (next_tick < t - 1) next_tick = t;
            while (credit >= 1) {
                if (expect[cursor]) check_block(cursor, expect[cursor], "before write");
                else distinct++;
                expect[cursor]++;
                fill(buf, cursor, expect[cursor]);
                if (pwrite(fd, buf, BLOCK, (off_t)(cursor * BLOCK)) != (ssize_t)BLOCK)
                    printf("lmw: disk write of block %llu failed\n", (unsigned long long)cursor);
                written++;
                credit -= 1;
                if (++cursor == nblocks) cursor = 0;
            }
        }
        if (selftest > 0 && !flipped && t - start >= selftest && distinct > 0) {
            uint64_t victim = 0;  /* block 0 is written first */
            fill(buf, victim, expect[victim]);
            ((uint8_t *)buf)[BLOCK / 2] ^= 0x04;
            if (pwrite(fd, buf, BLOCK, (off_t)(victim * BLOCK)) != (ssize_t)BLOCK)
                printf("lmw: disk selftest write failed\n");
            flipped = 1;
            printf("lmw: disk selftest flipped a bit in block %llu\n", (unsigned long long)victim);
        }
        if (t >= next_hb) {
            hb++;
            printf("dk n=%llu w=%llu blocks=%llu diskbad=%llu\n", (unsigned long long)hb,
                   (unsigned long long)written, (unsigned long long)distinct,
                   (unsigned long long)bad);
            next_hb += 1;
            if (next_hb < t) next_hb = t + 1;
        }
        double d = (next_tick < next_hb ? next_tick : next_hb) - now();
        if (d > 0) { struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)}; nanosleep(&ts, NULL); }
    }
    for (uint64_t i = 0; i < nblocks; i++)
        if (expect[i]) check_block(i, expect[i], "final check");
    fsync(fd);
    close(fd);
    printf("dk done n=%llu w=%llu blocks=%llu diskbad=%llu\n", (unsigned long long)hb,
           (unsigned long long)written, (unsigned long long)distinct, (unsigned long long)bad);
    return 0;
}
