/*
 * lmwatch rig guest workload: allocate N MiB, rewrite it at R MiB/s, verify it.
 *
 * Parameters come from the kernel command line (/proc/cmdline):
 *   lmw.mib=N       MiB of memory to allocate and stamp (default 16)
 *   lmw.rate=R      MiB/s of pages to rewrite (0 = idle: stamp once, only verify)
 *   lmw.selftest=S  after S seconds, flip one bit in one page (proves bad= works)
 *   lmw.mode=M      how pages are chosen: seq (default) sweeps them in order and
 *                   wraps around; random picks each written page uniformly at
 *                   random over the N MiB (xorshift64*), at the same R MiB/s
 *
 * Every 4 KiB page carries a stamp: its index and its generation (how many times
 * it was written), plus a checksum of both, at several offsets in the page.  The
 * expected generation of every page is kept in a separate table.  Before a page is
 * rewritten, and once a second for all pages, the stamp is checked; a mismatch
 * (a write lost by the migration, or the self-test's flipped bit) increments bad
 * and the page is repaired so that one loss is counted once.
 *
 * Once a second a heartbeat goes to stdout (the serial console):
 *   hb n=<seconds> gen=<passes> bad=<pages found wrong> w=<pages written> mib=N rate=R mode=M
 * gen is 1 + w / pages: full sweeps in seq mode, pages-worth of writes in random mode.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)
#define MAGIC 0x6c6d77617463680aULL /* "lmwatch\n" */

static uint64_t mix(uint64_t idx, uint64_t gen) {
    uint64_t x = idx * 0x9E3779B97F4A7C15ULL ^ (gen + 0x632BE59BD9B4E019ULL);
    x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ULL; x ^= x >> 27;
    return x ^ MAGIC;
}

/* offsets (in 64-bit words) that carry the stamp: start, middle, end + spread */
static const unsigned slots[] = {0, 1, 2, 64, 128, 192, 256, 320, 384, 448, 509, 510, 511};
#define NSLOTS (sizeof(slots) / sizeof(slots[0]))

static void stamp(uint64_t *p, uint64_t idx, uint64_t gen) {
    uint64_t h = mix(idx, gen);
    p[0] = MAGIC ^ idx;
    p[1] = gen;
    for (unsigned i = 2; i < NSLOTS; i++) p[slots[i]] = h + slots[i];
}

static int check(const uint64_t *p, uint64_t idx, uint64_t gen) {
    if (p[0] != (MAGIC ^ idx) || p[1] != gen) return 0;
    uint64_t h = mix(idx, gen);
    for (unsigned i = 2; i < NSLOTS; i++)
        if (p[slots[i]] != h + slots[i]) return 0;
    return 1;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* the value of key=word on the command line (copied into out), or dflt */
static const char *word_param(const char *cmdline, const char *key, const char *dflt,
                              char *out, size_t outlen) {
    const char *p = cmdline;
    size_t kl = strlen(key);
    while ((p = strstr(p, key)) != NULL) {
        if ((p == cmdline || p[-1] == ' ') && p[kl] == '=') {
            size_t n = strcspn(p + kl + 1, " \t\n");
            if (n >= outlen) n = outlen - 1;
            memcpy(out, p + kl + 1, n);
            out[n] = 0;
            return out;
        }
        p += kl;
    }
    return dflt;
}

/* xorshift64* (Vigna): fast, full period over non-zero states */
static uint64_t xorshift64s(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
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

int main(int argc, char **argv) {
    char cmdline[4096] = "";
    FILE *f = fopen(argc > 1 ? argv[1] : "/proc/cmdline", "r");
    if (f) { size_t n = fread(cmdline, 1, sizeof(cmdline) - 1, f); cmdline[n] = 0; fclose(f); }
    long mib = param(cmdline, "lmw.mib", 16);
    long rate = param(cmdline, "lmw.rate", 0);
    long selftest = param(cmdline, "lmw.selftest", 0);
    char modebuf[16];
    const char *mode = word_param(cmdline, "lmw.mode", "seq", modebuf, sizeof(modebuf));
    int random_mode = strcmp(mode, "random") == 0;
    if (!random_mode) mode = "seq";   /* anything else: the default */
    if (mib < 1) mib = 1;
    if (rate < 0) rate = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);

    uint64_t npages = (uint64_t)mib * (1024 * 1024 / PAGE);
    uint8_t *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    uint64_t *expect = calloc(npages, sizeof(uint64_t));
    if (mem == MAP_FAILED || !expect) { printf("lmw: cannot allocate %ld MiB\n", mib); return 1; }
    /* fill every page with non-constant junk so no page migrates as a zero page */
    for (uint64_t i = 0; i < npages; i++) {
        uint64_t *p = (uint64_t *)(mem + i * PAGE);
        for (unsigned w = 0; w < WORDS; w++) p[w] = mix(i, w + 1000003);
        expect[i] = 1;
        stamp(p, i, 1);
    }
    printf("lmw: ready mib=%ld rate=%ld selftest=%ld mode=%s pages=%llu\n", mib, rate, selftest,
           mode, (unsigned long long)npages);

    uint64_t bad = 0, written = 0, cursor = 0, passes = 1, hb = 0;
    uint64_t rng = 0x9E3779B97F4A7C15ULL ^ (uint64_t)npages;  /* never 0 */
    int flipped = 0;
    const double tick = 0.01;                       /* 100 write slices a second */
    double per_tick = (double)rate * (1024 * 1024 / PAGE) * tick, credit = 0;
    double start = now(), next_tick = start, next_hb = start + 1;

    for (;;) {
        double t = now();
        if (rate > 0 && t >= next_tick) {
            /* catch up at most 1 s of backlog (after a pause the guest would burst) */
            long ticks = (long)((t - next_tick) / tick) + 1;
            if (ticks > 100) ticks = 100;
            credit += per_tick * ticks;
            next_tick += ticks * tick;
            if (next_tick < t - 1) next_tick = t;
            while (credit >= 1) {
                if (random_mode) cursor = xorshift64s(&rng) % npages;
                uint64_t *p = (uint64_t *)(mem + cursor * PAGE);
                if (!check(p, cursor, expect[cursor])) {
                    bad++;
                    printf("lmw: BAD page=%llu want_gen=%llu got_idx=%llx got_gen=%llu (before write)\n",
                           (unsigned long long)cursor, (unsigned long long)expect[cursor],
                           (unsigned long long)(p[0] ^ MAGIC), (unsigned long long)p[1]);
                }
                expect[cursor]++;
                stamp(p, cursor, expect[cursor]);
                written++;
                credit -= 1;
                if (random_mode) {
                    passes = 1 + written / npages;
                } else if (++cursor == npages) {
                    cursor = 0;
                    passes++;
                }
            }
        }
        if (selftest > 0 && !flipped && t - start >= selftest) {
            uint64_t victim = npages / 2;
            ((volatile uint8_t *)mem)[victim * PAGE + 8 + 2] ^= 0x04;  /* one bit of the generation word */
            flipped = 1;
            printf("lmw: selftest flipped a bit in page %llu\n", (unsigned long long)victim);
        }
        if (t >= next_hb) {
            /* full verification sweep (reads only: does not dirty memory) */
            for (uint64_t i = 0; i < npages; i++) {
                uint64_t *p = (uint64_t *)(mem + i * PAGE);
                if (!check(p, i, expect[i])) {
                    bad++;
                    printf("lmw: BAD page=%llu want_gen=%llu got_idx=%llx got_gen=%llu\n",
                           (unsigned long long)i, (unsigned long long)expect[i],
                           (unsigned long long)(p[0] ^ MAGIC), (unsigned long long)p[1]);
                    stamp(p, i, expect[i]);  /* repair: count each loss once */
                }
            }
            hb++;
            printf("hb n=%llu gen=%llu bad=%llu w=%llu mib=%ld rate=%ld mode=%s\n",
                   (unsigned long long)hb, (unsigned long long)passes, (unsigned long long)bad,
                   (unsigned long long)written, mib, rate, mode);
            next_hb += 1;
            if (next_hb < t) next_hb = t + 1;       /* after a long pause: no burst of beats */
        }
        double sleep_until = rate > 0 ? next_tick : next_hb;
        if (sleep_until > next_hb) sleep_until = next_hb;
        double d = sleep_until - now();
        if (d > 0) { struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)}; nanosleep(&ts, NULL); }
    }
}
