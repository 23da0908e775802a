/*
 * C tests of the sage ring, run under AddressSanitizer + UBSan by tests/test_core_c.py:
 *
 *   gcc -std=c11 -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all -mcx16 \
 *       -I sage_queue/_core sage_queue/_core/tests/test_sagering.c -lpthread
 *
 * The ring source is included so that the tests can reach its static helpers (to
 * stage a claimer that "died" at a chosen step).  A dead participant is simulated by
 * a handle whose block carries the pid of a process that has exited and been reaped.
 */
/* Test hooks (see SR_TEST_HOOK in sagering.c): a test sets `hook` to run its code at
 * a chosen step of the core, widening a race window to a certainty. */
static void (*hook)(int point);
#define SR_TEST_HOOK(point) \
    do {                    \
        if (hook) hook(point); \
    } while (0)

#include "../sagering.c"

#include <assert.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>

static int failures = 0;
#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            if (++failures > 20) abort();                                           \
        }                                                                           \
    } while (0)

typedef struct {
    void *base;
    uint64_t size;
} seg_t;

static seg_t new_segment(uint64_t capacity, uint64_t maxsize) {
    seg_t s;
    s.size = sr_segment_size(capacity);
    s.base = mmap(NULL, s.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert(s.base != MAP_FAILED);
    assert(sr_init(s.base, s.size, capacity, maxsize, (uint32_t)getpid()) == SR_OK);
    return s;
}

static void free_segment(seg_t s) { munmap(s.base, s.size); }

static uint32_t dead_pid(void) {
    pid_t p = fork();
    if (p == 0) _exit(0);
    waitpid(p, NULL, 0);
    return (uint32_t)p;
}

static sr_status put1(sr_handle *h, const void *data, uint64_t n, int64_t timeout) {
    sr_claim c;
    sr_status st = sr_put_begin(h, &n, 1, 0, timeout, &c);
    if (st != SR_OK) return st;
    memcpy(sr_put_record(h, &c, n), data, n);
    return sr_put_commit_one(h, &c, n);
}

static sr_status get1(sr_handle *h, void *out, uint64_t *n, int64_t timeout) {
    sr_claim c;
    sr_status st = sr_get_begin(h, timeout, &c);
    if (st != SR_OK) return st;
    memcpy(out, c.data, c.data_len);
    *n = c.data_len;
    return sr_get_end(h, &c);
}

/* ---- fixtures ------------------------------------------------------------------------ */

/* The queue's depth; UINT64_MAX if sr_depth() found the cursors corrupt. */
static uint64_t depth(const sr_handle *h) {
    uint64_t d;
    return sr_depth(h, &d) == SR_OK ? d : UINT64_MAX;
}

/* A handle of this process on the segment. */
static void open_here(sr_handle *h, seg_t s) { CHECK(sr_open(h, s.base, s.size, (uint32_t)getpid()) == SR_OK); }

static void close_handle(sr_handle *h) {
    sr_close(h);
    sr_detach(h);
}

/* A fresh ring and one handle on it. */
typedef struct {
    seg_t s;
    sr_handle h;
} ring_fixture;

static void ring_setup(ring_fixture *r, uint64_t capacity, uint64_t maxsize) {
    r->s = new_segment(capacity, maxsize);
    open_here(&r->h, r->s);
}

static void ring_teardown(ring_fixture *r) {
    close_handle(&r->h);
    free_segment(r->s);
}

/* A fresh ring, a live handle whose stalls are checked after 1 ms (not the default grace)
 * and a handle whose owner "died" (see open_as_dead). */
typedef struct {
    seg_t s;
    sr_handle live, dead;
} dead_fixture;

static void open_as_dead(sr_handle *h, seg_t s);

static void dead_setup(dead_fixture *f, uint64_t capacity) {
    f->s = new_segment(capacity, 0);
    open_here(&f->live, f->s);
    f->live.grace_ns = 1000000;
    open_as_dead(&f->dead, f->s);
}

/* The live handle puts one 200-byte record and the dead one claims it for reading (and,
 * being dead, never ends that claim unless the test stages more of its steps). */
static void dead_reader_claims_one(dead_fixture *f, sr_claim *c) {
    char buf[200] = {0};
    CHECK(put1(&f->live, buf, 200, 0) == SR_OK);
    CHECK(sr_get_begin(&f->dead, 0, c) == SR_OK);
}

/* The dead handle is left as a dead process leaves it: never closed. */
static void dead_teardown(dead_fixture *f) {
    close_handle(&f->live);
    free_segment(f->s);
}

static uint64_t abandoned_count(sr_handle *h) {
    sr_stats st;
    sr_read_stats(h, &st);
    return st.abandoned;
}

/* Put 200-byte records until the ring refuses, then take as many back; returns how many. */
static int fill_then_drain(sr_handle *h) {
    char buf[200] = {0}, out[256];
    uint64_t n;
    int puts = 0;
    while (put1(h, buf, 200, 0) == SR_OK) puts++;
    for (int i = 0; i < puts; i++) CHECK(get1(h, out, &n, 0) == SR_OK);
    return puts;
}

/* `rounds` times: put `len` bytes (waiting up to `put_timeout`), then take one record. */
static void put_get_rounds(sr_handle *h, uint64_t len, int rounds, int64_t put_timeout) {
    char buf[256] = {0}, out[256];
    uint64_t n;
    for (int i = 0; i < rounds; i++) {
        CHECK(put1(h, buf, len, put_timeout) == SR_OK);
        CHECK(get1(h, out, &n, 0) == SR_OK);
    }
}

/* Only poll (timeout 0) a put of 200 bytes or a get into `out`, until it stops reporting
 * WOULD_BLOCK or 2 s pass. */
static sr_status poll_until_not_blocked(sr_handle *h, int put, char *out, uint64_t *n) {
    char buf[200] = {0};
    sr_status st = SR_WOULD_BLOCK;
    int64_t t0 = now_ns();
    while (st == SR_WOULD_BLOCK && now_ns() - t0 < 2000000000ll) {
        st = put ? put1(h, buf, 200, 0) : get1(h, out, n, 0);
        if (st == SR_WOULD_BLOCK) sleep_ns(100000);
    }
    return st;
}

/* ---- single-thread basics ----------------------------------------------------------- */

static void test_basic_and_wrap(void) {
    ring_fixture r;
    ring_setup(&r, 8192, 0);
    sr_handle *h = &r.h;
    char err[200];
    CHECK(sr_validate(r.s.base, r.s.size, err, sizeof err) == SR_OK);
    char buf[4096], out[4096];
    uint64_t n;
    CHECK(get1(h, out, &n, 0) == SR_WOULD_BLOCK);
    /* many laps with sizes that do not divide the capacity: padding at every lap end */
    for (int i = 0; i < 20000; i++) {
        uint64_t len = (uint64_t)(i * 37 % 1500);
        for (uint64_t k = 0; k < len; k++) buf[k] = (char)(i + (int)k);
        CHECK(put1(h, buf, len, 0) == SR_OK);
        if (i % 3 == 2) { /* keep a few in flight so records straddle lap ends */
            for (int j = 0; j < 3; j++) {
                CHECK(get1(h, out, &n, 0) == SR_OK);
            }
        }
    }
    while (get1(h, out, &n, 0) == SR_OK) {
    }
    CHECK(depth(h) == 0);
    /* a full ring refuses, an impossible record is TOO_BIG, a timeout is a timeout */
    int count = 0;
    while (put1(h, buf, 200, 0) == SR_OK) count++;
    CHECK(count > 30 && count < 8192 / 200);
    int64_t t0 = now_ns();
    CHECK(put1(h, buf, 200, 50000000) == SR_TIMEOUT);
    CHECK(now_ns() - t0 >= 50000000);
    CHECK(put1(h, buf, 9000, 0) == SR_TOO_BIG);
    /* double commit / double end return their own error */
    while (get1(h, out, &n, 0) == SR_OK) {
    }
    sr_claim c;
    uint64_t ten = 10;
    CHECK(sr_put_begin(h, &ten, 1, 0, 0, &c) == SR_OK);
    CHECK(sr_put_commit_one(h, &c, 10) == SR_OK);
    CHECK(sr_put_commit_one(h, &c, 10) == SR_ALREADY_DONE);
    CHECK(sr_put_abort(h, &c) == SR_ALREADY_DONE);
    CHECK(sr_get_begin(h, 0, &c) == SR_OK);
    CHECK(sr_get_end(h, &c) == SR_OK);
    CHECK(sr_get_end(h, &c) == SR_ALREADY_DONE);
    /* abort: the record is skipped and counted */
    CHECK(sr_put_begin(h, &ten, 1, 0, 0, &c) == SR_OK);
    CHECK(sr_put_abort(h, &c) == SR_OK);
    CHECK(get1(h, out, &n, 0) == SR_WOULD_BLOCK);
    sr_stats st;
    sr_read_stats(h, &st);
    CHECK(st.abandoned == 1);
    CHECK(depth(h) == 0);
    ring_teardown(&r);
}

static void test_copy_out_clear(void) {
    ring_fixture r;
    ring_setup(&r, 1 << 20, 0);
    sr_handle *h = &r.h;
    uint64_t n = 300001; /* several clearing chunks and a partial one */
    uint8_t *src = malloc(n), *dst = malloc(n);
    for (uint64_t i = 0; i < n; i++) src[i] = (uint8_t)(i * 7 + 1);
    CHECK(put1(h, src, n, 0) == SR_OK);
    sr_claim c;
    CHECK(sr_get_begin(h, 0, &c) == SR_OK);
    uint8_t *payload = c.data;
    uint64_t len = c.len;
    sr_copy_out_clear(&c, dst);
    CHECK(memcmp(src, dst, n) == 0);
    CHECK(sr_get_end(h, &c) == SR_OK);
    int dirty = 0;
    for (uint64_t i = 0; i < len - SR_REC_HEADER; i++) dirty |= payload[i];
    CHECK(dirty == 0); /* consumed space is all zero */
    CHECK(put1(h, src, 10, 0) == SR_OK);
    CHECK(get1(h, dst, &n, 0) == SR_OK && n == 10 && memcmp(src, dst, 10) == 0);
    free(src);
    free(dst);
    ring_teardown(&r);
}

static void test_validate_names_bad_value(void) {
    seg_t s = new_segment(4096, 0);
    char err[200];
    ((sr_header *)s.base)->config.version = 99;
    CHECK(sr_validate(s.base, s.size, err, sizeof err) == SR_BAD_LAYOUT);
    CHECK(strstr(err, "99") != NULL);
    ((sr_header *)s.base)->config.version = SR_VERSION;
    atomic_store(&((sr_header *)s.base)->config.magic, 42);
    CHECK(sr_validate(s.base, s.size, err, sizeof err) == SR_BAD_LAYOUT);
    CHECK(strstr(err, "magic") != NULL);
    free_segment(s);
}

static void test_maxsize_and_batch(void) {
    ring_fixture r;
    ring_setup(&r, 1 << 16, 5);
    sr_handle *h = &r.h;
    char buf[64] = {0}, out[64];
    uint64_t n, sizes[6] = {1, 2, 3, 4, 5, 6};
    sr_claim c;
    CHECK(sr_put_begin(h, sizes, 6, 0, 0, &c) == SR_TOO_BIG); /* more than maxsize */
    CHECK(sr_put_begin(h, sizes, 3, 0, 0, &c) == SR_OK);
    for (int i = 0; i < 3; i++) {
        memset(sr_put_record(h, &c, sizes[i]), 'a' + i, sizes[i]);
        CHECK(sr_put_commit_one(h, &c, sizes[i]) == SR_OK);
    }
    CHECK(sr_put_begin(h, sizes, 3, 0, 0, &c) == SR_WOULD_BLOCK); /* 3 + 3 > 5 */
    CHECK(put1(h, buf, 8, 0) == SR_OK);
    CHECK(put1(h, buf, 8, 0) == SR_OK);
    CHECK(put1(h, buf, 8, 0) == SR_WOULD_BLOCK);
    CHECK(depth(h) == 5);
    for (int i = 0; i < 3; i++) {
        CHECK(get1(h, out, &n, 0) == SR_OK);
        CHECK(n == sizes[i] && out[0] == 'a' + i);
    }
    CHECK(depth(h) == 2);
    ring_teardown(&r);
}

/* ---- MPMC threads: nothing lost, duplicated or reordered per producer -------------------- */

#define PRODUCERS 4
#define CONSUMERS 4
#define PER_PRODUCER 50000

typedef struct {
    seg_t seg;
    int id;
    _Atomic uint64_t *seen; /* per (producer, seq) counts */
    _Atomic long *consumed;
} worker_arg;

static void *producer(void *p) {
    worker_arg *a = p;
    sr_handle h;
    assert(sr_open(&h, a->seg.base, a->seg.size, (uint32_t)getpid()) == SR_OK);
    for (uint32_t i = 0; i < PER_PRODUCER;) {
        uint32_t msg[8] = {(uint32_t)a->id, i, i * 2654435761u};
        if (i % 97 == 0 && i + 3 <= PER_PRODUCER) { /* a batch of 3 */
            uint64_t sizes[3] = {12, 12, 12};
            sr_claim c;
            if (sr_put_begin(&h, sizes, 3, 0, -1, &c) != SR_OK) abort();
            for (uint32_t k = 0; k < 3; k++) {
                uint32_t m[3] = {(uint32_t)a->id, i + k, (i + k) * 2654435761u};
                memcpy(sr_put_record(&h, &c, 12), m, 12);
                sr_put_commit_one(&h, &c, 12);
            }
            i += 3;
        } else {
            if (put1(&h, msg, 12 + (i % 5) * 4, -1) != SR_OK) abort();
            i++;
        }
    }
    close_handle(&h);
    return NULL;
}

static void *consumer(void *p) {
    worker_arg *a = p;
    sr_handle h;
    assert(sr_open(&h, a->seg.base, a->seg.size, (uint32_t)getpid()) == SR_OK);
    int64_t last[PRODUCERS];
    for (int i = 0; i < PRODUCERS; i++) last[i] = -1;
    for (;;) {
        if (atomic_load(a->consumed) >= (long)PRODUCERS * PER_PRODUCER) break;
        uint32_t m[16];
        uint64_t n;
        sr_status st = get1(&h, m, &n, 20000000);
        if (st == SR_TIMEOUT) continue;
        if (st != SR_OK) abort();
        if (n < 12 || m[0] >= PRODUCERS || m[2] != m[1] * 2654435761u) {
            fprintf(stderr, "corrupt item\n");
            failures++;
            continue;
        }
        if ((int64_t)m[1] <= last[m[0]]) {
            fprintf(stderr, "order broken: producer %u item %u after %lld\n", m[0], m[1], (long long)last[m[0]]);
            failures++;
        }
        last[m[0]] = m[1];
        atomic_fetch_add(&a->seen[m[0] * PER_PRODUCER + m[1]], 1);
        atomic_fetch_add(a->consumed, 1);
    }
    close_handle(&h);
    return NULL;
}

static void test_mpmc_threads(uint64_t capacity, uint64_t maxsize) {
    seg_t s = new_segment(capacity, maxsize);
    _Atomic uint64_t *seen = calloc(PRODUCERS * PER_PRODUCER, sizeof *seen);
    _Atomic long consumed = 0;
    pthread_t th[PRODUCERS + CONSUMERS];
    worker_arg args[PRODUCERS + CONSUMERS];
    for (int i = 0; i < PRODUCERS + CONSUMERS; i++) {
        args[i] = (worker_arg){s, i < PRODUCERS ? i : i - PRODUCERS, seen, &consumed};
        pthread_create(&th[i], NULL, i < PRODUCERS ? producer : consumer, &args[i]);
    }
    for (int i = 0; i < PRODUCERS + CONSUMERS; i++) pthread_join(th[i], NULL);
    long missing = 0, dup = 0;
    for (long i = 0; i < PRODUCERS * PER_PRODUCER; i++) {
        if (seen[i] == 0) missing++;
        if (seen[i] > 1) dup++;
    }
    CHECK(missing == 0);
    CHECK(dup == 0);
    sr_handle h;
    open_here(&h, s);
    CHECK(depth(&h) == 0);
    sr_stats st;
    sr_read_stats(&h, &st);
    CHECK(st.puts == PRODUCERS * PER_PRODUCER && st.gets == PRODUCERS * PER_PRODUCER && st.abandoned == 0);
    close_handle(&h);
    free(seen);
    free_segment(s);
}

/* ---- dead participants ---------------------------------------------------------------- */

/* A handle that looks like it belongs to a dead process. */
static void open_as_dead(sr_handle *h, seg_t s) {
    open_here(h, s);
    atomic_store(&h->block->pid, dead_pid());
    atomic_store(&h->block->start_time, 0);
}

static void test_dead_producer_after_claim(void) {
    dead_fixture f;
    dead_setup(&f, 4096);
    sr_handle *live = &f.live, *dead = &f.dead;
    char out[256];
    uint64_t n, sz = 20;
    CHECK(put1(live, "before", 6, 0) == SR_OK);
    sr_claim c;
    CHECK(sr_put_begin(dead, &sz, 1, 0, 0, &c) == SR_OK); /* claimed, never committed */
    CHECK(put1(live, "after", 5, 0) == SR_OK);
    CHECK(get1(live, out, &n, 0) == SR_OK && n == 6);
    /* the head is stuck on the dead claim until the grace passes and a waiter reaps it */
    CHECK(get1(live, out, &n, 0) == SR_WOULD_BLOCK);
    CHECK(get1(live, out, &n, 500000000) == SR_OK);
    CHECK(n == 5 && memcmp(out, "after", 5) == 0);
    CHECK(abandoned_count(live) == 1);
    CHECK(depth(live) == 0);
    put_get_rounds(live, 100, 1000, 0); /* the ring keeps working over many laps */
    dead_teardown(&f);
}

static void test_dead_producer_unconfirmed_announce(void) {
    /* killed between its cursor CAS and confirming its own entry, with nobody moving T */
    dead_fixture f;
    dead_setup(&f, 4096);
    sr_handle *live = &f.live, *dead = &f.dead;
    sr_header *hdr = dead->hdr;
    sr_entry *en = &dead->block->entries[0];
    atomic_fetch_and(&dead->free_entries, ~1u);
    u128 t = snap_cursor(&hdr->tail);
    uint64_t len = sr_record_size(30);
    announce(en, SR_KIND_PUT, lo64(t), len, 1, 0);
    CHECK(cas128(&hdr->tail, t, mk128(lo64(t) + len, (1ull << 32) | idx_of(dead, 0))));
    CHECK(st_phase(atomic_load(&en->state)) == SR_PH_ANNOUNCED);
    char out[64];
    uint64_t n;
    CHECK(get1(live, out, &n, 300000000) == SR_TIMEOUT); /* reaped, then truly empty */
    CHECK(abandoned_count(live) == 1);
    CHECK(depth(live) == 0);
    CHECK(put1(live, "x", 1, 0) == SR_OK);
    CHECK(get1(live, out, &n, 0) == SR_OK && n == 1);
    dead_teardown(&f);
}

static void test_dead_producer_mid_batch(void) {
    dead_fixture f;
    dead_setup(&f, 8192);
    sr_handle *live = &f.live, *dead = &f.dead;
    uint64_t sizes[4] = {10, 20, 30, 40};
    sr_claim c;
    CHECK(sr_put_begin(dead, sizes, 4, 0, 0, &c) == SR_OK);
    for (int i = 0; i < 2; i++) { /* two of four published, then "killed" */
        memset(sr_put_record(dead, &c, sizes[i]), 'a' + i, sizes[i]);
        sr_put_commit_one(dead, &c, sizes[i]);
    }
    CHECK(put1(live, "tail", 4, 0) == SR_OK);
    char out[64];
    uint64_t n;
    CHECK(get1(live, out, &n, 0) == SR_OK && n == 10 && out[0] == 'a');
    CHECK(get1(live, out, &n, 0) == SR_OK && n == 20 && out[0] == 'b');
    CHECK(get1(live, out, &n, 500000000) == SR_OK && n == 4 && memcmp(out, "tail", 4) == 0);
    CHECK(abandoned_count(live) == 2);
    CHECK(depth(live) == 0);
    dead_teardown(&f);
}

/* The reaper read a dead producer's entry, then (before its liveness check) the producer
 * published two more records and died with one left: the reaper must abandon only that
 * one.  With the values of its first look it marked ABANDONED over records 1 and 2, which
 * were published (items lost, counted as 3 abandoned).  The hook runs the producer's
 * commits inside the reaper's window. */
static struct {
    sr_handle *dead;
    sr_claim *c;
    const uint64_t *sizes;
    int fired;
} late_commit;

static void commit_two_more(int point) {
    if (point != 1 || late_commit.fired) return;
    late_commit.fired = 1;
    for (int i = 1; i < 3; i++) {
        memset(sr_put_record(late_commit.dead, late_commit.c, late_commit.sizes[i]), 'a' + i, late_commit.sizes[i]);
        sr_put_commit_one(late_commit.dead, late_commit.c, late_commit.sizes[i]);
    }
}

static void test_reaper_rereads_the_claim_it_won(void) {
    dead_fixture f;
    dead_setup(&f, 8192);
    sr_handle *live = &f.live, *dead = &f.dead;
    uint64_t sizes[4] = {10, 20, 30, 40};
    sr_claim c;
    CHECK(sr_put_begin(dead, sizes, 4, 0, 0, &c) == SR_OK);
    memset(sr_put_record(dead, &c, sizes[0]), 'a', sizes[0]);
    sr_put_commit_one(dead, &c, sizes[0]);
    char out[64];
    uint64_t n;
    CHECK(get1(live, out, &n, 0) == SR_OK && n == 10 && out[0] == 'a');
    late_commit.dead = dead;
    late_commit.c = &c;
    late_commit.sizes = sizes;
    late_commit.fired = 0;
    hook = commit_two_more;
    /* blocked at record 1: the stall makes the live handle reap, and the hook fires */
    CHECK(get1(live, out, &n, 500000000) == SR_OK && n == 20 && out[0] == 'b');
    hook = NULL;
    CHECK(late_commit.fired);
    CHECK(get1(live, out, &n, 0) == SR_OK && n == 30 && out[0] == 'c');
    CHECK(get1(live, out, &n, 300000000) == SR_TIMEOUT);
    CHECK(abandoned_count(live) == 1);
    CHECK(depth(live) == 0);
    dead_teardown(&f);
}

/* Two attachers must never own one participant block.  Attacher A takes a dead owner's
 * block; in the window between its pid CAS and its start-time store, attacher B looks.
 * B used to read A's (live) pid with the dead owner's start time, call it "pid reused"
 * and take the block too.  The hook runs B's attach inside A's window. */
static struct {
    seg_t s;
    sr_handle b;
    sr_status b_status;
    int fired;
} window_attach;

static void attach_in_window(int point) {
    if (point != 2 || window_attach.fired) return;
    window_attach.fired = 1;
    window_attach.b_status = sr_open(&window_attach.b, window_attach.s.base, window_attach.s.size, (uint32_t)getpid());
}

static void test_no_two_owners_of_one_block(void) {
    seg_t s = new_segment(4096, 0);
    sr_handle hs[SR_MAX_BLOCKS], a;
    for (uint32_t i = 0; i < SR_MAX_BLOCKS; i++) CHECK(sr_open(&hs[i], s.base, s.size, (uint32_t)getpid()) == SR_OK);
    /* block 5's owner died: a pid that is gone, with some start time of its own */
    atomic_store(&hs[5].block->pid, dead_pid());
    atomic_store(&hs[5].block->start_time, 12345);
    window_attach.s = s;
    window_attach.fired = 0;
    hook = attach_in_window;
    CHECK(sr_open(&a, s.base, s.size, (uint32_t)getpid()) == SR_OK);
    hook = NULL;
    CHECK(window_attach.fired);
    CHECK(a.block_index == 5);
    CHECK(window_attach.b_status == SR_NO_BLOCK); /* was SR_OK with b.block_index == 5 */
    free_segment(s);
}

/* Corrupt cursors, entries and record headers never make the core read or write outside
 * the segment (AddressSanitizer watches: the segment is the exact mapping) or loop forever:
 * each gives SR_BROKEN (the queue marked, for every handle) or a plain result. */
static void test_corruption_is_contained(void) {
    for (int round = 0; round < 12; round++) {
        ring_fixture r;
        ring_setup(&r, 4096, 0);
        sr_handle *h = &r.h;
        h->grace_ns = 0;
        char buf[300] = {0}, out[4096];
        uint64_t n;
        for (int i = 0; i < 5; i++) CHECK(put1(h, buf, 100 + 40 * (uint64_t)i, 0) == SR_OK);
        CHECK(get1(h, out, &n, 0) == SR_OK);
        sr_header *hdr = h->hdr;
        rec_hdr *head_rec = rec_at(h, atomic_load(&hdr->head.pos));
        switch (round) {
        case 0: atomic_store(&head_rec->info, mk_info(1u << 28, 1, 0)); break;   /* 256 MiB record */
        case 1: atomic_store(&head_rec->info, mk_info(8, 1, 0)); break;          /* shorter than a header */
        case 2: atomic_store(&head_rec->info, mk_info(4096, 1, 0)); break;       /* crosses the ring's end */
        case 3: atomic_store(&hdr->tail.meta, ((uint64_t)5 << 32) | 60000u); break; /* claim idx out of range */
        case 4: atomic_store(&hdr->head.meta, ((uint64_t)900 << 32)); break;     /* head items > tail items */
        case 5: atomic_store(&hdr->head.pos, atomic_load(&hdr->head.pos) + 8); break; /* unaligned head */
        case 6: atomic_store(&hdr->free.pos, atomic_load(&hdr->tail.pos) + 4096); break; /* F past T */
        case 7: atomic_store(&hdr->free.meta, 999); break;                       /* F held by no block */
        case 8: atomic_store(&head_rec->state, atomic_load(&hdr->head.pos) | SR_REC_CONSUMED); break;
        case 9: break; /* control: no corruption, nothing is broken */
        case 10: { /* a dead producer's claim entry blocking the head, with lying values */
            sr_handle d;
            open_as_dead(&d, r.s);
            uint64_t sz = 50;
            sr_claim c;
            CHECK(sr_put_begin(&d, &sz, 1, 0, 0, &c) == SR_OK);
            sr_entry *en = &d.block->entries[c.entry];
            atomic_store(&en->len, 1u << 30);
            atomic_store(&en->progress, 7);
            break;
        }
        default: { /* a consumed record at F claiming to be longer than what H passed */
            rec_hdr *fr = rec_at(h, atomic_load(&hdr->free.pos));
            atomic_store(&fr->info, mk_info(2048, 1, 0));
            atomic_store(&fr->state, atomic_load(&hdr->free.pos) | SR_REC_CONSUMED);
            break;
        }
        }
        sr_status last = SR_OK;
        for (int op = 0; op < 40 && last != SR_BROKEN; op++) {
            last = (op % 2) ? put1(h, buf, 200, 2000000) : get1(h, out, &n, 2000000);
            if (last == SR_OK && op % 2 == 0) CHECK(n <= sizeof out);
            CHECK(last == SR_OK || last == SR_TIMEOUT || last == SR_WOULD_BLOCK || last == SR_BROKEN);
        }
        uint64_t d;
        if (sr_depth(h, &d) != SR_OK) sr_mark_broken(h, "depth"); /* as the binding does */
        if (round != 9) CHECK(broken(h));
        if (round == 9) CHECK(!broken(h));
        if (broken(h)) {
            CHECK(sr_broken_reason(h) != NULL);
            CHECK(put1(h, buf, 10, 0) == SR_BROKEN); /* every later operation says so */
        }
        ring_teardown(&r);
    }
}

/* Seeded random corruption of a live ring, under AddressSanitizer: the segment is heap
 * memory here (ASan's redzones surround it), so any access outside it fails the test,
 * and every operation has a short timeout, so a loop over shared state that does not end
 * hangs the test (tests/test_core_c.py kills it).  Words of the cursors, the owner lines
 * and claim entries of the first blocks, and record headers are overwritten at random;
 * a dead producer's unfinished claim is left in flight in half of the rounds, so that the
 * reaper reads corrupt entries too.  SAGE_SOAK=1 runs 50 times more rounds. */
static uint64_t rng_state;
static uint64_t rnd(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static uint64_t mutate_word(uint64_t w) {
    switch (rnd() % 6) {
    case 0: return rnd();
    case 1: return w ^ (1ull << (rnd() % 64));
    case 2: return w + (uint64_t)((int64_t)(rnd() % 129) - 64);
    case 3: return 0;
    case 4: return 1ull << (20 + rnd() % 44);
    default: return w | 0xffffffffull;
    }
}

static void test_random_corruption_under_asan(void) {
    const char *soak = getenv("SAGE_SOAK");
    int rounds = soak && strcmp(soak, "1") == 0 ? 20000 : 400;
    for (int round = 0; round < rounds; round++) {
        rng_state = 0x9e3779b97f4a7c15ull * (uint64_t)(round + 1);
        uint64_t cap = (rnd() % 2) ? 1024 : 4096;
        seg_t s;
        s.size = sr_segment_size(cap);
        CHECK(posix_memalign(&s.base, 4096, s.size) == 0);
        memset(s.base, 0, s.size);
        CHECK(sr_init(s.base, s.size, cap, (rnd() % 3) ? 0 : 20, (uint32_t)getpid()) == SR_OK);
        sr_handle h, d;
        open_here(&h, s);
        h.grace_ns = 0;
        char buf[400] = {0}, out[4096];
        uint64_t n;
        for (int i = (int)(rnd() % 20); i > 0; i--) {
            if (rnd() % 3) (void)put1(&h, buf, rnd() % 300, 0);
            else (void)get1(&h, out, &n, 0);
        }
        if (rnd() % 2) { /* a dead producer's claim, not committed */
            open_as_dead(&d, s);
            uint64_t sizes[3] = {rnd() % 100, rnd() % 100, rnd() % 100};
            sr_claim c;
            if (sr_put_begin(&d, sizes, 1 + (uint32_t)(rnd() % 3), 0, 0, &c) == SR_OK && rnd() % 2) {
                memset(sr_put_record(&d, &c, sizes[0]), 7, sizes[0]);
                sr_put_commit_one(&d, &c, sizes[0]);
            }
        }
        for (int k = 1 + (int)(rnd() % 3); k > 0; k--) {
            uint64_t off;
            switch (rnd() % 5) {
            case 0: off = SR_TAIL_OFFSET + 64 * (rnd() % 3) + 8 * (rnd() % 2); break; /* T, H, F */
            case 1: off = SR_SHARED_OFFSET + 8 * (rnd() % 6); break;
            case 2: off = SR_BLOCKS_OFFSET + SR_BLOCK_SIZE * (rnd() % 2) + 8 * (rnd() % 7); break;
            case 3: off = SR_BLOCKS_OFFSET + SR_BLOCK_SIZE * (rnd() % 2) + SR_LINE * (1 + rnd() % 3) + 8 * (rnd() % 6); break;
            default: off = SR_DATA_OFFSET + 16 * (rnd() % (cap / 16)) + 8 * (rnd() % 2); break;
            }
            uint64_t *w = (uint64_t *)(void *)((uint8_t *)s.base + off);
            *w = mutate_word(*w);
        }
        for (int op = 0; op < 30 && !broken(&h); op++) {
            sr_status st = (rnd() % 2) ? put1(&h, buf, rnd() % 400, rnd() % 2 ? 0 : 300000)
                                       : get1(&h, out, &n, rnd() % 2 ? 0 : 300000);
            CHECK(st == SR_OK || st == SR_WOULD_BLOCK || st == SR_TIMEOUT || st == SR_BROKEN || st == SR_TOO_BIG);
            uint64_t dd;
            (void)sr_depth(&h, &dd);
        }
        /* close and detach are safe whatever the segment says (the detach waits only for
         * this process's own entries) */
        close_handle(&h);
        free(s.base);
    }
}

/* More threads than claim entries on one handle: all finish (none spins for an entry that
 * a sleeping waiter holds), producers and consumers, blocking. */
#define CROWD 48
#define CROWD_ITEMS 2000
static void *crowd_thread(void *p) {
    sr_handle *h = ((void **)p)[0];
    intptr_t i = (intptr_t)((void **)p)[1];
    char buf[32] = {0}, out[64];
    uint64_t n;
    for (int k = 0; k < CROWD_ITEMS; k++) {
        sr_status st = (i % 2) ? put1(h, buf, 8 + (uint64_t)(k % 20), -1) : get1(h, out, &n, -1);
        if (st != SR_OK) return (void *)1;
    }
    return NULL;
}

static void test_more_threads_than_entries(void) {
    ring_fixture r;
    ring_setup(&r, 2048, 0);
    pthread_t th[CROWD];
    void *args[CROWD][2];
    for (intptr_t i = 0; i < CROWD; i++) {
        args[i][0] = &r.h;
        args[i][1] = (void *)i;
        pthread_create(&th[i], NULL, crowd_thread, args[i]);
    }
    for (int i = 0; i < CROWD; i++) {
        void *res;
        pthread_join(th[i], &res);
        CHECK(res == NULL);
    }
    CHECK(depth(&r.h) == 0);
    ring_teardown(&r);
}

static void test_dead_consumer_mid_read(void) {
    dead_fixture f;
    dead_setup(&f, 2048);
    sr_handle *live = &f.live;
    char buf[256] = {0};
    sr_claim c;
    dead_reader_claims_one(&f, &c); /* claimed the record, never ends */
    /* fill the ring: producers then need the dead reader's space back */
    int puts = fill_then_drain(live);
    CHECK(put1(live, buf, 200, 0) == SR_WOULD_BLOCK || puts < 9);
    put_get_rounds(live, 200, 20, 500000000); /* blocking puts reap the dead reader and go on */
    CHECK(abandoned_count(live) == 1);
    dead_teardown(&f);
}

static void test_dead_consumer_before_its_sweep(void) {
    dead_fixture f;
    dead_setup(&f, 2048);
    sr_handle *live = &f.live, *dead = &f.dead;
    /* the dead handle reads the record to the end, publishes CONSUMED, finishes its
     * entry, and dies before sweeping: no claim names the record any more */
    sr_claim c;
    dead_reader_claims_one(&f, &c);
    memset(c.data, 0, c.len - SR_REC_HEADER);
    atomic_store(&rec_at(dead, c.rec_pos)->state, c.rec_pos | SR_REC_CONSUMED);
    finish_entry(&dead->block->entries[c.entry]);
    fill_then_drain(live);
    /* every later record was swept by its reader, but F waits at the dead reader's record
     * only until a blocked producer reaps */
    put_get_rounds(live, 200, 20, 500000000);
    dead_teardown(&f);
}

/* Everyone only polls (timeout 0; the same holds for timeouts shorter than the grace):
 * the stall is timed per handle across calls, so polling alone reaps a dead claim.  With
 * a per-call clock, no call ever waited the grace and the head stayed stuck for good. */
static void test_pollers_reap_a_dead_producer(void) {
    dead_fixture f;
    dead_setup(&f, 4096);
    sr_handle *live = &f.live, *dead = &f.dead;
    char out[64];
    uint64_t n = 0, sz = 20;
    sr_claim c;
    CHECK(sr_put_begin(dead, &sz, 1, 0, 0, &c) == SR_OK); /* claimed, never committed */
    CHECK(put1(live, "after", 5, 0) == SR_OK);
    sr_status st = poll_until_not_blocked(live, 0, out, &n);
    CHECK(st == SR_OK && n == 5 && memcmp(out, "after", 5) == 0);
    CHECK(abandoned_count(live) == 1);
    CHECK(depth(live) == 0);
    dead_teardown(&f);
}

static void test_polling_producers_reap_a_dead_reader(void) {
    dead_fixture f;
    dead_setup(&f, 2048);
    sr_handle *live = &f.live;
    sr_claim c;
    dead_reader_claims_one(&f, &c); /* claimed the record at F, never ends */
    fill_then_drain(live);
    /* full: only the dead reader's record holds the space; producers poll without waiting */
    CHECK(poll_until_not_blocked(live, 1, NULL, NULL) == SR_OK);
    CHECK(abandoned_count(live) == 1);
    dead_teardown(&f);
}

/* A wait continued with sr_*_wait (the binding's slices between signal checks) is one
 * wait: counted once, and it does not spin again. */
static void test_resumed_wait_counts_once(void) {
    ring_fixture r;
    ring_setup(&r, 4096, 1);
    sr_handle *h = &r.h;
    sr_claim c;
    sr_stats st;
    CHECK(sr_get_begin(h, 5000000, &c) == SR_TIMEOUT);
    for (int i = 0; i < 3; i++) CHECK(sr_get_wait(h, 5000000, &c) == SR_TIMEOUT);
    sr_read_stats(h, &st);
    CHECK(st.waits == 1);
    CHECK(put1(h, "x", 1, 0) == SR_OK);
    uint64_t one = 1;
    CHECK(sr_put_begin(h, &one, 1, 0, 5000000, &c) == SR_TIMEOUT); /* maxsize 1: full */
    int64_t t0 = now_ns();
    CHECK(sr_put_wait(h, &one, 1, 0, 5000000, &c) == SR_TIMEOUT);
    CHECK(now_ns() - t0 < 1000000000ll);
    sr_read_stats(h, &st);
    CHECK(st.waits == 2);
    char out[8];
    uint64_t n;
    CHECK(sr_get_wait(h, 0, &c) == SR_OK); /* a resumed call still takes what is there */
    CHECK(sr_get_end(h, &c) == SR_OK);
    CHECK(get1(h, out, &n, 0) == SR_WOULD_BLOCK);
    ring_teardown(&r);
}

static void test_dead_sweeper_holding_free(void) {
    dead_fixture f;
    dead_setup(&f, 2048);
    sr_handle *live = &f.live, *dead = &f.dead;
    /* the dead handle reads the record and dies inside sweep(), holding F */
    sr_claim c;
    dead_reader_claims_one(&f, &c);
    rec_hdr *r = rec_at(dead, c.rec_pos);
    memset(c.data, 0, c.len - SR_REC_HEADER);
    atomic_store(&r->state, c.rec_pos | SR_REC_CONSUMED);
    u128 free_cursor = snap_free(&dead->hdr->free);
    CHECK(cas128(&dead->hdr->free, free_cursor, mk128(lo64(free_cursor), dead->block_index + 1)));
    put_get_rounds(live, 200, 40, 500000000);
    dead_teardown(&f);
}

static void test_blocks_reclaimed(void) {
    seg_t s = new_segment(4096, 0);
    sr_handle hs[SR_MAX_BLOCKS], extra;
    for (uint32_t i = 0; i < SR_MAX_BLOCKS; i++) CHECK(sr_open(&hs[i], s.base, s.size, (uint32_t)getpid()) == SR_OK);
    CHECK(sr_open(&extra, s.base, s.size, (uint32_t)getpid()) == SR_NO_BLOCK);
    atomic_store(&hs[7].block->pid, dead_pid()); /* its owner "died" idle */
    CHECK(sr_open(&extra, s.base, s.size, (uint32_t)getpid()) == SR_OK);
    CHECK(extra.block_index == 7);
    free_segment(s);
}

/* ---- stats `errors`: per block, summed, kept when a block is retired ------------------- */

static uint64_t errors_seen(sr_handle *h) {
    sr_stats st;
    sr_read_stats(h, &st);
    return st.errors;
}

static void test_errors_counted_and_retired(void) {
    seg_t s = new_segment(4096, 0);
    sr_handle a, b, c;
    open_here(&a, s);
    open_here(&b, s);
    CHECK(errors_seen(&b) == 0);
    sr_note_error(&a);
    sr_note_error(&a);
    sr_note_error(&b);
    CHECK(errors_seen(&a) == 3 && errors_seen(&b) == 3); /* queue-wide: every block summed */
    close_handle(&a);                                     /* a's block is retired into the shared line */
    CHECK(errors_seen(&b) == 3);
    uint32_t b_index = b.block_index;
    atomic_store(&b.block->pid, dead_pid()); /* b's owner "died": its block is reclaimed by c */
    atomic_store(&b.block->start_time, 0);
    uint32_t n = 0;
    do { /* take free blocks until c lands on b's dead one (free blocks may be taken first) */
        open_here(&c, s);
    } while (c.block_index != b_index && ++n < SR_MAX_BLOCKS);
    CHECK(c.block_index == b_index);
    CHECK(errors_seen(&c) == 3); /* retired on reclaim, not lost, not counted twice */
    sr_stats st;
    sr_read_stats(&c, &st);
    CHECK(st.puts == 0 && st.gets == 0 && st.abandoned == 0); /* errors is its own counter */
    free_segment(s);
}

/* ---- close wakes a blocked waiter ----------------------------------------------------- */

static void *blocked_get(void *p) {
    sr_handle *h = p;
    sr_claim c;
    return (void *)(intptr_t)sr_get_begin(h, -1, &c);
}

static void test_close_wakes(void) {
    ring_fixture r;
    ring_setup(&r, 4096, 0);
    sr_handle *h = &r.h;
    pthread_t th;
    pthread_create(&th, NULL, blocked_get, h);
    sleep_ns(50000000);
    int64_t t0 = now_ns();
    sr_close(h);
    void *res;
    pthread_join(th, &res);
    CHECK((sr_status)(intptr_t)res == SR_CLOSED);
    CHECK(now_ns() - t0 < 200000000);
    sr_detach(h); /* closed above */
    free_segment(r.s);
}

int main(void) {
    test_basic_and_wrap();
    test_copy_out_clear();
    test_validate_names_bad_value();
    test_maxsize_and_batch();
    test_mpmc_threads(1 << 12, 0);  /* tiny ring: constant wrap-around and full waits */
    test_mpmc_threads(1 << 20, 7);  /* item bound */
    test_dead_producer_after_claim();
    test_dead_producer_unconfirmed_announce();
    test_dead_producer_mid_batch();
    test_reaper_rereads_the_claim_it_won();
    test_no_two_owners_of_one_block();
    test_corruption_is_contained();
    test_random_corruption_under_asan();
    test_more_threads_than_entries();
    test_dead_consumer_mid_read();
    test_dead_consumer_before_its_sweep();
    test_dead_sweeper_holding_free();
    test_resumed_wait_counts_once();
    test_pollers_reap_a_dead_producer();
    test_polling_producers_reap_a_dead_reader();
    test_blocks_reclaimed();
    test_errors_counted_and_retired();
    test_close_wakes();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all sagering C tests passed\n");
    return 0;
}
