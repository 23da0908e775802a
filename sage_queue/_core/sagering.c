/*
 * sagering.c -- the `sage` ring (layout and protocol summary in sagering.h,
 * rationale in DESIGN.md).  Conventions used throughout:
 *
 *   - every atomic names its memory_order; release/acquire sites say what they
 *     pair with;
 *   - the 16-byte cursors change only through cas128(), a full barrier
 *     (__sync builtin: lock cmpxchg16b on x86-64, LDAXP/STLXP or CASPAL on
 *     aarch64), so every cursor CAS is seq_cst;
 *   - only the owner of a claim writes into the ring; helpers change only
 *     cursors and claim-entry states, whose values never repeat.
 */
#define _GNU_SOURCE
#include "sagering.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SPIN_LIMIT 2000u            /* pause-polls before yielding (ping-pong latency) */
#define YIELD_LIMIT 200u            /* then sched_yield-polls: lets a peer on our core run */
#define SPIN_MIN 32u                /* the adaptive spin budget never drops below this */
#define WAIT_SLICE_NS 100000000ll   /* futex sleeps re-check close/destroy this often */
#define DEFAULT_GRACE_NS 50000000ull /* a claim stalled this long gets its owner checked */
#define NOT_READY_SLEEP_NS 200000ll  /* poll period while a live writer finishes a record */
#define ENTRY_WAIT_NS 50000ll       /* sleep of a thread waiting for one of its handle's claim entries */
#define SR_MAX_IDX (SR_MAX_BLOCKS * SR_BLOCK_ENTRIES) /* the largest claim idx a cursor may name */

/* Test hooks: a test that includes this file defines SR_TEST_HOOK(point) to run code at a
 * chosen step (to widen a race window deterministically); compiled out otherwise. */
#ifndef SR_TEST_HOOK
#define SR_TEST_HOOK(point) ((void)0)
#endif

typedef unsigned __int128 u128;

/* ---- small helpers ----------------------------------------------------------------- */

static inline u128 mk128(uint64_t pos, uint64_t meta) { return ((u128)meta << 64) | pos; }
static inline uint64_t lo64(u128 v) { return (uint64_t)v; }
static inline uint64_t hi64(u128 v) { return (uint64_t)(v >> 64); }
/* Fields of a T/H cursor snapshot: {pos, items << 32 | claim idx}. */
static inline uint32_t cur_idx(u128 c) { return (uint32_t)(hi64(c) & 0xffffffffull); }
static inline uint64_t cur_items(u128 c) { return hi64(c) >> 32; }
static inline uint64_t mk_meta(uint64_t items, uint32_t idx) { return ((items & 0xffffffffull) << 32) | idx; }
/* Fields of a record's state word: its own position | SR_REC_* (low 4 bits). */
static inline uint64_t rs_pos(uint64_t s) { return s & ~(uint64_t)(SR_ALIGN - 1); }
static inline uint32_t rs_state(uint64_t s) { return (uint32_t)(s & (SR_ALIGN - 1)); }

/* Full-barrier 16-byte CAS (seq_cst). */
static inline int cas128(sr_cursor *c, u128 expected, u128 desired) {
    return __sync_bool_compare_and_swap((u128 *)(void *)c, expected, desired);
}

/* A consistent {pos, meta} of T or H: every CAS on them moves pos forward, so two
 * equal reads of pos around the read of meta bracket no CAS. */
static inline u128 snap_cursor(sr_cursor *c) {
    for (;;) {
        /* acquire: pairs with the full-barrier CAS that wrote the value */
        uint64_t p1 = atomic_load_explicit(&c->pos, memory_order_acquire);
        uint64_t m = atomic_load_explicit(&c->meta, memory_order_acquire);
        uint64_t p2 = atomic_load_explicit(&c->pos, memory_order_acquire);
        if (p1 == p2) return mk128(p1, m);
    }
}

/* The free cursor's meta changes without its pos (busy/not busy), so a snapshot may pair
 * a pos with the meta of the same pos epoch but another moment; callers only use it as
 * the expected value of a CAS (which then fails) or to see "busy", which is safe (see
 * sweep()). */
static inline u128 snap_free(sr_cursor *c) { return snap_cursor(c); } /* same reads, weaker promise */

static inline uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

static void sleep_ns(int64_t ns) {
    struct timespec ts = {ns / 1000000000ll, ns % 1000000000ll};
    nanosleep(&ts, NULL);
}

typedef struct rec_hdr {
    _Atomic uint64_t state; /* pos | SR_REC_*: written last with release */
    _Atomic uint64_t info;  /* len:32 | items:24 | flags:8 */
} rec_hdr;
_Static_assert(sizeof(rec_hdr) == SR_REC_HEADER, "record header size");

/* The record header at `pos`.  The offset is masked to SR_ALIGN so that even a position
 * read from a corrupt cursor or entry addresses 16 bytes inside the ring (capacity is a
 * multiple of SR_LINE); callers report such a position as broken (pos_sane()). */
static inline rec_hdr *rec_at(const sr_handle *h, uint64_t pos) {
    return (rec_hdr *)(void *)(h->ring + (pos % h->capacity & ~(uint64_t)(SR_ALIGN - 1)));
}
static inline uint64_t mk_info(uint64_t len, uint64_t items, uint64_t flags) {
    return (len & 0xffffffffull) | ((items & 0xffffffull) << 32) | ((flags & 0xffull) << 56);
}
static inline uint64_t info_len(uint64_t i) { return i & 0xffffffffull; }
static inline uint64_t info_items(uint64_t i) { return (i >> 32) & 0xffffffull; }
static inline uint32_t info_flags(uint64_t i) { return (uint32_t)(i >> 56); }

static inline sr_block *block_at(sr_header *hdr, uint32_t b) {
    return (sr_block *)(void *)((uint8_t *)hdr + SR_BLOCKS_OFFSET + (uint64_t)b * SR_BLOCK_SIZE);
}
/* Claim idx: 1-based over all blocks' entries; 0 = none.  Callers check
 * 0 < idx <= SR_MAX_IDX first (an idx comes from a cursor in shared memory). */
static inline sr_entry *entry_at(sr_header *hdr, uint32_t idx) {
    uint32_t i = idx - 1;
    return &block_at(hdr, i / SR_BLOCK_ENTRIES)->entries[i % SR_BLOCK_ENTRIES];
}
static inline uint32_t idx_of(const sr_handle *h, uint32_t e) {
    return h->block_index * SR_BLOCK_ENTRIES + e + 1;
}

static inline uint64_t st_seq(uint64_t s) { return s >> 8; }
static inline uint32_t st_kind(uint64_t s) { return (uint32_t)(s >> 4) & 0xf; }
static inline uint32_t st_phase(uint64_t s) { return (uint32_t)s & 0xf; }
static inline uint64_t mk_state(uint64_t seq, uint32_t kind, uint32_t phase) {
    return (seq << 8) | ((uint64_t)kind << 4) | phase;
}

/* ---- futex ------------------------------------------------------------------------ */

static void futex_wait(_Atomic uint32_t *word, uint32_t seen, int64_t ns) {
    struct timespec ts = {ns / 1000000000ll, ns % 1000000000ll};
    /* Shared (not PRIVATE) futex: waiters live in other processes.  A relative
     * timeout of FUTEX_WAIT is measured on CLOCK_MONOTONIC. */
    syscall(SYS_futex, (uint32_t *)(void *)word, FUTEX_WAIT, seen, &ts, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *word) {
    syscall(SYS_futex, (uint32_t *)(void *)word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Wake sleepers of `w` if any armed it.  The caller published its change (commit,
 * consume) before; the seq_cst fence orders that store before the load of `armed` and
 * pairs with the fence in WAIT_LOOP: either the sleeper's re-check sees the change, or
 * we see it armed.  Only the first waker after an arming pays the system call: the
 * exchange disarms, so a stream of puts to a sleeping consumer costs one wake. */
static void wake_if_waiting(sr_waitword *w) {
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&w->armed, memory_order_relaxed) != 0 &&
        atomic_exchange_explicit(&w->armed, 0, memory_order_acq_rel) != 0) {
        /* release: a woken sleeper's acquire load of seq sees our published change */
        atomic_fetch_add_explicit(&w->seq, 1, memory_order_release);
        futex_wake_all(&w->seq);
    }
}

/* ---- bounds checks (spec E15) ------------------------------------------------------------
 *
 * Every index, offset and length read from the segment is checked before it is used to
 * address memory or to bound a loop: a corrupt or hostile segment must give an error, not
 * a crash or a hang.  A failed check marks the queue broken in its header (every handle of
 * every process then fails with SR_BROKEN) and wakes every sleeper so that they see it.
 * Checks that could fail on a stale (racy) read re-check the cursor they depend on first:
 * only a value that cannot come from a legal interleaving is called corrupt. */

static sr_status mark_broken(sr_handle *h, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static sr_status mark_broken(sr_handle *h, const char *fmt, ...) {
    int expect = 0;
    if (atomic_compare_exchange_strong_explicit(&h->why_set, &expect, 1, memory_order_acq_rel, memory_order_relaxed)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(h->broken_why, sizeof h->broken_why, fmt, ap);
        va_end(ap);
    }
    /* release: pairs with the acquire loads in broken() */
    atomic_store_explicit(&h->hdr->config.broken, 1, memory_order_release);
    atomic_fetch_add_explicit(&h->hdr->data.seq, 1, memory_order_release);
    atomic_fetch_add_explicit(&h->hdr->space.seq, 1, memory_order_release);
    futex_wake_all(&h->hdr->data.seq);
    futex_wake_all(&h->hdr->space.seq);
    return SR_BROKEN;
}

static inline int broken(const sr_handle *h) {
    return atomic_load_explicit(&h->hdr->config.broken, memory_order_acquire) != 0;
}

/* A cursor position and claim idx a cursor may hold. */
static inline int cursor_sane(u128 c) { return lo64(c) % SR_ALIGN == 0 && cur_idx(c) <= SR_MAX_IDX; }

/* The header of a record at `pos` in state `rs` is within bounds: its length covers the
 * header, is SR_ALIGN-aligned and ends at or before the end of the lap (records never
 * wrap); it holds no more items than it has SR_ALIGN units (every item takes at least
 * one); a padding record fills the lap and holds no item; a committed one holds one item
 * whose slack (bytes after the payload, < SR_ALIGN) fits.  Copies, clears and cursor
 * moves use only lengths that passed this. */
static int record_sane(const sr_handle *h, uint64_t pos, uint64_t info, uint32_t rs) {
    uint64_t len = info_len(info), items = info_items(info), room = h->capacity - pos % h->capacity;
    if (pos % SR_ALIGN != 0 || len < SR_REC_HEADER || len % SR_ALIGN != 0 || len > room) return 0;
    if (items > len / SR_ALIGN) return 0;
    if (rs == SR_REC_PADDING) return items == 0 && len == room;
    if (rs == SR_REC_COMMITTED) return items == 1 && (info_flags(info) >> 4) <= len - SR_REC_HEADER;
    return 1;
}

/* ---- process liveness ------------------------------------------------------------------ */

/* Start time (field 22 of /proc/pid/stat) and state letter; 0 if unreadable. */
static uint64_t read_proc_stat(uint32_t pid, char *state) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may contain spaces and ')' */
    if (!p) return 0;
    p += 2;
    if (state) *state = *p;
    /* fields after ')' start at field 3 (state); start time is field 22 */
    for (int field = 3; field < 22 && *p; p++)
        if (*p == ' ') field++;
    return strtoull(p, NULL, 10);
}

uint64_t sr_process_start_time(uint32_t pid) { return read_proc_stat(pid, NULL); }

int sr_pid_alive(uint32_t pid, uint64_t start_time) {
    if (pid == 0) return 0;
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH) return 0;
    char state = '?';
    uint64_t st = read_proc_stat(pid, &state);
    if (st == 0) return kill((pid_t)pid, 0) == 0 || errno == EPERM; /* no /proc: trust kill */
    if (state == 'Z' || state == 'X') return 0;    /* killed, not yet reaped by its parent */
    if (start_time != 0 && st != start_time) return 0; /* the pid was reused */
    return 1;
}

static int block_owner_alive(sr_header *hdr, uint32_t b) {
    sr_block *blk = block_at(hdr, b);
    /* acquire: pairs with the release store of pid in take_block() */
    uint32_t pid = atomic_load_explicit(&blk->pid, memory_order_acquire);
    /* acquire: pairs with take_block()'s stores; read after pid (see there) */
    uint64_t st = atomic_load_explicit(&blk->start_time, memory_order_acquire);
    return sr_pid_alive(pid, st);
}

/* ---- init, validate, open ------------------------------------------------------------ */

uint64_t sr_round_capacity(uint64_t capacity) { return round_up(capacity, SR_LINE); }

uint64_t sr_segment_size(uint64_t capacity) { return SR_DATA_OFFSET + sr_round_capacity(capacity); }

uint64_t sr_record_size(uint64_t payload) { return round_up(SR_REC_HEADER + payload, SR_ALIGN); }

sr_status sr_init(void *base, uint64_t size, uint64_t capacity, uint64_t maxsize, uint32_t pid) {
    capacity = sr_round_capacity(capacity);
    if (capacity < SR_MIN_CAPACITY || capacity > SR_MAX_CAPACITY || size < sr_segment_size(capacity))
        return SR_INVALID;
    sr_header *hdr = base;
    hdr->config.version = SR_VERSION;
    hdr->config.header_size = SR_DATA_OFFSET;
    hdr->config.capacity = capacity;
    hdr->config.maxsize = maxsize;
    hdr->config.creator_pid = pid;
    /* The segment is fresh (zero-filled by ftruncate): cursors, blocks and ring are
     * already zero.  release: pairs with sr_validate()'s acquire of magic, so an
     * attacher that sees the magic sees the configuration. */
    atomic_store_explicit(&hdr->config.magic, SR_MAGIC, memory_order_release);
    return SR_OK;
}

sr_status sr_validate(const void *base, uint64_t size, char *err, size_t errlen) {
    const sr_header *hdr = base;
    char dummy[8];
    if (!err) {
        err = dummy;
        errlen = sizeof dummy;
    }
    if (size < SR_DATA_OFFSET) {
        snprintf(err, errlen, "segment is %llu bytes, smaller than the %u-byte header",
                 (unsigned long long)size, SR_DATA_OFFSET);
        return SR_BAD_LAYOUT;
    }
    /* acquire: pairs with sr_init()'s release store of magic */
    uint64_t magic = atomic_load_explicit(&((sr_header *)(void *)hdr)->config.magic, memory_order_acquire);
    if (magic != SR_MAGIC) {
        snprintf(err, errlen, "bad magic 0x%016llx (expected 0x%016llx): not a sage ring",
                 (unsigned long long)magic, (unsigned long long)SR_MAGIC);
        return SR_BAD_LAYOUT;
    }
    if (hdr->config.version != SR_VERSION) {
        snprintf(err, errlen, "layout version %u, this library reads version %u", hdr->config.version,
                 SR_VERSION);
        return SR_BAD_LAYOUT;
    }
    if (hdr->config.header_size != SR_DATA_OFFSET) {
        snprintf(err, errlen, "header size %u, expected %u", hdr->config.header_size, SR_DATA_OFFSET);
        return SR_BAD_LAYOUT;
    }
    uint64_t cap = hdr->config.capacity;
    if (cap < SR_MIN_CAPACITY || cap > SR_MAX_CAPACITY || cap % SR_LINE != 0) {
        snprintf(err, errlen, "capacity %llu out of range", (unsigned long long)cap);
        return SR_BAD_LAYOUT;
    }
    if (size < SR_DATA_OFFSET + cap) {
        snprintf(err, errlen, "segment is %llu bytes, capacity %llu needs %llu", (unsigned long long)size,
                 (unsigned long long)cap, (unsigned long long)(SR_DATA_OFFSET + cap));
        return SR_BAD_LAYOUT;
    }
    return SR_OK;
}

/* A dead block may be reused once nothing in the queue can still refer to it. */
static int block_reclaimable(sr_header *hdr, uint32_t b) {
    u128 t = snap_cursor(&hdr->tail), hd = snap_cursor(&hdr->head), f = snap_free(&hdr->free);
    uint64_t free_pos = lo64(f);
    if (hi64(f) == (uint64_t)b + 1) return 0; /* it holds the sweeper's cursor */
    for (uint32_t e = 0; e < SR_BLOCK_ENTRIES; e++) {
        uint32_t idx = b * SR_BLOCK_ENTRIES + e + 1;
        if ((hi64(t) & 0xffffffffull) == idx || (hi64(hd) & 0xffffffffull) == idx) return 0;
        sr_entry *en = &block_at(hdr, b)->entries[e];
        uint64_t s = atomic_load_explicit(&en->state, memory_order_acquire);
        uint32_t ph = st_phase(s);
        if (ph == SR_PH_CLAIMED) {
            uint64_t end = atomic_load_explicit(&en->pos, memory_order_relaxed) +
                           atomic_load_explicit(&en->len, memory_order_relaxed);
            if (end > free_pos) return 0; /* its records are not all swept yet */
        }
        /* IDLE, ABANDONED (taken over), ANNOUNCED and unreferenced (its CAS failed) */
    }
    return 1;
}

static void retire_block_stats(sr_header *hdr, sr_block *blk) {
    for (int i = 0; i < SR_STAT_COUNT; i++) {
        uint64_t v = atomic_exchange_explicit(&blk->stats[i], 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&hdr->shared.retired[i], v, memory_order_relaxed);
    }
}

static sr_status take_block(sr_handle *h) {
    sr_header *hdr = h->hdr;
    uint64_t start = sr_process_start_time(h->pid);
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t b = 0; b < SR_MAX_BLOCKS; b++) {
            sr_block *blk = block_at(hdr, b);
            /* acquire: pairs with the release store of pid below (or in sr_detach()) */
            uint32_t owner = atomic_load_explicit(&blk->pid, memory_order_acquire);
            if (owner != 0) {
                if (pass == 0) continue;
                uint64_t owner_start = atomic_load_explicit(&blk->start_time, memory_order_acquire);
                if (sr_pid_alive(owner, owner_start) || !block_reclaimable(hdr, b)) continue;
                /* Clear the dead owner's start time before taking its pid.  Between our
                 * pid CAS and our start-time store, another attacher must read our pid
                 * with start time 0 ("unknown": judged by the pid alone, alive), never our
                 * pid with the dead owner's start time ("pid reused": dead), or it takes
                 * the block too and two processes own one block.  A CAS: if another
                 * attacher took the block first, it changed the start time we judged by,
                 * and we leave the block alone.  acq_rel: pairs with the acquire load
                 * above in that other attacher. */
                if (!atomic_compare_exchange_strong_explicit(&blk->start_time, &owner_start, 0, memory_order_acq_rel,
                                                             memory_order_acquire))
                    continue;
            }
            /* acq_rel: acquire the previous owner's entries; the pid we install is
             * read with acquire by block_owner_alive() */
            if (!atomic_compare_exchange_strong_explicit(&blk->pid, &owner, h->pid, memory_order_acq_rel,
                                                         memory_order_relaxed))
                continue;
            SR_TEST_HOOK(2); /* between taking the pid and recording our start time */
            if (owner != 0) retire_block_stats(hdr, blk);
            atomic_store_explicit(&blk->start_time, start, memory_order_release);
            h->block = blk;
            h->block_index = b;
            return SR_OK;
        }
    }
    return SR_NO_BLOCK;
}

sr_status sr_open(sr_handle *h, void *base, uint64_t size, uint32_t pid) {
    sr_status st = sr_validate(base, size, NULL, 0);
    if (st != SR_OK) return st;
    memset(h, 0, sizeof *h);
    h->hdr = base;
    h->ring = (uint8_t *)base + SR_DATA_OFFSET;
    h->capacity = h->hdr->config.capacity;
    h->maxsize = h->hdr->config.maxsize;
    h->pid = pid;
    h->grace_ns = DEFAULT_GRACE_NS;
    atomic_store_explicit(&h->stall_key, UINT64_MAX, memory_order_relaxed); /* no stall seen yet */
    atomic_store_explicit(&h->spin_budget, SPIN_LIMIT, memory_order_relaxed);
    atomic_store_explicit(&h->free_entries, (1u << SR_BLOCK_ENTRIES) - 1u, memory_order_relaxed);
    return take_block(h);
}

void sr_close(sr_handle *h) {
    atomic_store_explicit(&h->closed, 1, memory_order_seq_cst);
    atomic_fetch_add_explicit(&h->hdr->data.seq, 1, memory_order_release);
    atomic_fetch_add_explicit(&h->hdr->space.seq, 1, memory_order_release);
    futex_wake_all(&h->hdr->data.seq);
    futex_wake_all(&h->hdr->space.seq);
}

sr_status sr_destroy(sr_handle *h) {
    /* release: pairs with the acquire loads in destroyed() */
    uint32_t was = atomic_exchange_explicit(&h->hdr->config.destroyed, 1, memory_order_acq_rel);
    sr_close(h);
    return was ? SR_DESTROYED : SR_OK;
}

void sr_mark_broken(sr_handle *h, const char *why) { mark_broken(h, "%s", why); }

const char *sr_broken_reason(const sr_handle *h) {
    if (!broken(h)) return NULL;
    if (atomic_load_explicit(&h->why_set, memory_order_acquire)) return h->broken_why;
    return "a bounds check of another handle failed (the segment is corrupt, or was written by an incompatible "
           "or hostile process)";
}

void sr_detach(sr_handle *h) {
    if (!h->block) return;
    /* in-flight operations of other threads hold entries; wait for them (they give
     * up promptly: sr_close() ran before and woke them) */
    while (atomic_load_explicit(&h->free_entries, memory_order_acquire) != (1u << SR_BLOCK_ENTRIES) - 1u)
        sleep_ns(1000000);
    retire_block_stats(h->hdr, h->block);
    /* 0 = unknown: the next owner's pid must not be judged by our start time in the
     * moment between its CAS of pid and its store of start_time */
    atomic_store_explicit(&h->block->start_time, 0, memory_order_relaxed);
    /* release: our entries' final states are visible to the next owner's acquire CAS */
    atomic_store_explicit(&h->block->pid, 0, memory_order_release);
    h->block = NULL;
}

static inline int destroyed(const sr_handle *h) {
    return atomic_load_explicit(&h->hdr->config.destroyed, memory_order_acquire) != 0;
}
static inline int closed(const sr_handle *h) { return atomic_load_explicit(&h->closed, memory_order_acquire); }

/* ---- claim entries ------------------------------------------------------------------ */

/* Take one of this handle's 16 entries (process-private bitmap), or -1 if all are held.
 *
 * An entry is held only from just before a claim's announce to the end of its commit or
 * copy-out, never while a call waits for items or room: a call takes one when it has
 * something to claim and gives it back before it sleeps.  So blocked calls never starve
 * others of entries, and a thread that finds all 16 held waits for holders that are
 * copying, never for holders that wait on the queue (spec Q6: any number of threads). */
static int try_acquire_entry(sr_handle *h) {
    uint32_t bits = atomic_load_explicit(&h->free_entries, memory_order_relaxed);
    while (bits) {
        uint32_t e = (uint32_t)__builtin_ctz(bits);
        if (atomic_compare_exchange_weak_explicit(&h->free_entries, &bits, bits & ~(1u << e), memory_order_acquire,
                                                  memory_order_relaxed))
            return (int)e;
    }
    return -1;
}

static void release_entry(sr_handle *h, uint32_t e);

/* Take an entry for the claim `c` unless it holds one.  `wait_ns` < 0: wait as long as it
 * takes (the holders are copying a claimed record, which needs no one else); 0: do not
 * wait (the Python binding's first try holds the GIL, which a holder may need to finish:
 * it must not wait there); > 0: wait at most that long.  SR_OK, SR_BUSY, or SR_CLOSED. */
static sr_status take_entry(sr_handle *h, sr_claim *c, int64_t wait_ns) {
    if (c->has_entry) return SR_OK;
    int64_t until = wait_ns > 0 ? now_ns() + wait_ns : 0;
    for (uint32_t tries = 0;; tries++) {
        int e = try_acquire_entry(h);
        if (e >= 0) {
            c->entry = (uint32_t)e;
            c->has_entry = 1;
            return SR_OK;
        }
        if (closed(h)) return SR_CLOSED;
        if (wait_ns == 0 || (wait_ns > 0 && now_ns() >= until)) return SR_BUSY;
        if (tries < YIELD_LIMIT) sched_yield();
        else sleep_ns(ENTRY_WAIT_NS);
    }
}

/* Give the claim's entry back if it holds one (a call about to wait, or done). */
static void drop_entry(sr_handle *h, sr_claim *c) {
    if (!c->has_entry) return;
    c->has_entry = 0;
    release_entry(h, c->entry);
}

static void release_entry(sr_handle *h, uint32_t e) {
    atomic_fetch_or_explicit(&h->free_entries, 1u << e, memory_order_release);
}

/* Announce a claim in our entry before the cursor CAS.  Seqlock-style write: a new
 * sequence number with phase IDLE first, then the fields, then ANNOUNCED, so a
 * helper that read fields of this announce sees a changed state word on re-check. */
static void announce(sr_entry *en, uint32_t kind, uint64_t pos, uint64_t len, uint64_t items, uint64_t pad) {
    uint64_t seq = st_seq(atomic_load_explicit(&en->state, memory_order_relaxed)) + 1; /* we own it */
    atomic_store_explicit(&en->state, mk_state(seq, kind, SR_PH_IDLE), memory_order_relaxed);
    atomic_thread_fence(memory_order_release); /* pairs with the acquire fence in read_entry() */
    atomic_store_explicit(&en->pos, pos, memory_order_relaxed);
    atomic_store_explicit(&en->len, len, memory_order_relaxed);
    atomic_store_explicit(&en->items, items, memory_order_relaxed);
    atomic_store_explicit(&en->progress, pad, memory_order_relaxed); /* record 0 at offset pad */
    atomic_store_explicit(&en->next, pad, memory_order_relaxed);
    /* release: pairs with read_entry()'s acquire load of state */
    atomic_store_explicit(&en->state, mk_state(seq, kind, SR_PH_ANNOUNCED), memory_order_release);
}

/* A consistent read of another participant's entry; returns its state word, or 0
 * (never a valid announced state) if it changed under us. */
static uint64_t read_entry(sr_entry *en, uint64_t *pos, uint64_t *len, uint64_t *items, uint64_t *progress,
                           uint64_t *next) {
    uint64_t s = atomic_load_explicit(&en->state, memory_order_acquire); /* pairs with announce() */
    *pos = atomic_load_explicit(&en->pos, memory_order_relaxed);
    *len = atomic_load_explicit(&en->len, memory_order_relaxed);
    *items = atomic_load_explicit(&en->items, memory_order_relaxed);
    *progress = atomic_load_explicit(&en->progress, memory_order_relaxed);
    *next = atomic_load_explicit(&en->next, memory_order_relaxed);
    atomic_thread_fence(memory_order_acquire); /* pairs with announce()'s release fence */
    return atomic_load_explicit(&en->state, memory_order_relaxed) == s ? s : 0;
}

/* Before moving cursor T or H away from {cursor_pos, idx}, record idx's claim as
 * CLAIMED: the claim that produced cursor_pos is the entry's announce of `kind`
 * ending exactly there (its owner announces nothing newer before confirming). */
static void confirm(sr_header *hdr, uint32_t idx, uint64_t cursor_pos, uint32_t kind) {
    if (idx == 0 || idx > SR_MAX_IDX) return; /* callers checked the cursor: cursor_sane() */
    sr_entry *en = entry_at(hdr, idx);
    uint64_t pos, len, items, progress, next;
    uint64_t s = read_entry(en, &pos, &len, &items, &progress, &next);
    if (s == 0 || st_phase(s) != SR_PH_ANNOUNCED || st_kind(s) != kind || pos + len != cursor_pos) return;
    /* acq_rel CAS, tagged by seq: fails harmlessly if the owner confirmed first */
    atomic_compare_exchange_strong_explicit(&en->state, &s, mk_state(st_seq(s), kind, SR_PH_CLAIMED),
                                            memory_order_acq_rel, memory_order_relaxed);
}

/* Our own CAS succeeded: confirm our announce (a helper may have done it). */
static void confirm_own(sr_entry *en) {
    uint64_t s = atomic_load_explicit(&en->state, memory_order_relaxed);
    if (st_phase(s) == SR_PH_ANNOUNCED)
        atomic_compare_exchange_strong_explicit(&en->state, &s, mk_state(st_seq(s), st_kind(s), SR_PH_CLAIMED),
                                                memory_order_acq_rel, memory_order_relaxed);
}

/* Operation over: back to IDLE (same seq).  release: pairs with the acquire loads of
 * reapers, which then see every record write of the claim. */
static void finish_entry(sr_entry *en) {
    uint64_t s = atomic_load_explicit(&en->state, memory_order_relaxed);
    atomic_store_explicit(&en->state, mk_state(st_seq(s), st_kind(s), SR_PH_IDLE), memory_order_release);
}

/* ---- producer ------------------------------------------------------------------------ */

/* Write a non-item record (padding, abandoned) in space we own. */
static void write_marker(sr_handle *h, uint64_t pos, uint64_t len, uint64_t items, uint32_t state) {
    rec_hdr *r = rec_at(h, pos);
    atomic_store_explicit(&r->info, mk_info(len, items, 0), memory_order_relaxed);
    /* release: pairs with the consumer's acquire load of the state word */
    atomic_store_explicit(&r->state, pos | state, memory_order_release);
}

/* Items between H and T, read H first then T: both only grow, so a consistent queue always
 * gives T.items >= H.items and at most one item per SR_ALIGN bytes between them.  Anything
 * else is corruption, reported as SR_BROKEN (not marked: sr_depth() serves inspect(),
 * which never modifies a segment).  Two snapshots, no loop: never spins on a bad header. */
static sr_status depth_of(sr_header *hdr, uint64_t *depth) {
    u128 hd = snap_cursor(&hdr->head);
    u128 t = snap_cursor(&hdr->tail);
    uint32_t d = (uint32_t)(cur_items(t) - cur_items(hd));
    if (lo64(t) < lo64(hd) || d > (lo64(t) - lo64(hd)) / SR_ALIGN) return SR_BROKEN;
    *depth = d;
    return SR_OK;
}

/* One attempt to claim `total` bytes of records holding `items` items. */
static sr_status try_put_claim(sr_handle *h, uint64_t total, uint64_t items, sr_claim *c) {
    sr_header *hdr = h->hdr;
    for (;;) {
        u128 t = snap_cursor(&hdr->tail);
        if (!cursor_sane(t))
            return mark_broken(h, "tail cursor {pos %llu, idx %u}: unaligned or idx beyond %u",
                               (unsigned long long)lo64(t), cur_idx(t), SR_MAX_IDX);
        uint64_t p = lo64(t), titems = cur_items(t);
        uint32_t prev = cur_idx(t);
        uint64_t off = p % h->capacity;
        uint64_t pad = off + total > h->capacity ? h->capacity - off : 0;
        uint64_t need = pad + total, claim_items = items;
        if (need > h->capacity) { /* cannot fit from here in one piece: claim the padding alone */
            need = pad;
            claim_items = 0;
        }
        /* The other side's cursor is cached: F only moves forward, so a stale value only
         * under-estimates the room; re-read it when the cached one says "full".  acquire:
         * pairs with the release store below (another thread of this handle), which
         * follows that thread's acquire of F: the sweeper's clearing happens-before us. */
        uint64_t free_pos = atomic_load_explicit(&h->free_cache, memory_order_acquire);
        if (free_pos > p || p + need - free_pos > h->capacity) {
            /* acquire: pairs with the sweeper's CAS that published F after clearing */
            free_pos = atomic_load_explicit(&hdr->free.pos, memory_order_acquire);
            /* F read after T: F <= H <= T and T <= F + capacity hold for any legal
             * interleaving, except that T may have moved on since our snapshot */
            if (free_pos > p || p - free_pos > h->capacity) {
                if (snap_cursor(&hdr->tail) != t) continue; /* stale view */
                return mark_broken(h, "free cursor %llu and tail cursor %llu are more than the capacity %llu apart",
                                   (unsigned long long)free_pos, (unsigned long long)p,
                                   (unsigned long long)h->capacity);
            }
            atomic_store_explicit(&h->free_cache, free_pos, memory_order_release);
            if (p + need - free_pos > h->capacity) {
                if (snap_cursor(&hdr->tail) != t) continue; /* stale view */
                drop_entry(h, c);
                return SR_WOULD_BLOCK;
            }
        }
        if (h->maxsize && claim_items) {
            uint64_t hitems = atomic_load_explicit(&hdr->head.meta, memory_order_acquire) >> 32;
            uint32_t depth = (uint32_t)(titems - hitems);
            if (depth > 0x7fffffffu) { /* H read after a newer T: stale snapshot, or corrupt */
                uint64_t d;
                if (depth_of(hdr, &d) != SR_OK)
                    return mark_broken(h, "head items %llu ahead of tail items %llu",
                                       (unsigned long long)hitems, (unsigned long long)titems);
                continue;
            }
            if ((uint64_t)depth + claim_items > h->maxsize) {
                if (snap_cursor(&hdr->tail) != t) continue;
                drop_entry(h, c);
                return SR_WOULD_BLOCK;
            }
        }
        sr_status st = take_entry(h, c, c->entry_wait);
        if (st != SR_OK) return st;
        sr_entry *en = &h->block->entries[c->entry];
        announce(en, SR_KIND_PUT, p, need, claim_items, pad);
        confirm(hdr, prev, p, SR_KIND_PUT);
        u128 next = mk128(p + need, mk_meta(titems + claim_items, idx_of(h, c->entry)));
        if (!cas128(&hdr->tail, t, next)) continue;
        confirm_own(en);
        if (claim_items == 0 && items != 0) { /* padding-only claim: finish it, then retry */
            write_marker(h, p, pad, 0, SR_REC_PADDING);
            finish_entry(en);
            /* a consumer asleep at the head must skip this padding and give its room
             * back before our retry can fit: wake it now, not at its next wait slice
             * (puts that wrapped took up to 100 ms; tests/test_sage_regressions.py) */
            wake_if_waiting(&hdr->data);
            continue;
        }
        if (pad) write_marker(h, p, pad, 0, SR_REC_PADDING);
        c->pos = p;
        c->len = need;
        c->next = pad;
        c->written = 0;
        return SR_OK;
    }
}

/* Bounded spin, then a futex sleep on `w`; returns SR_TIMEOUT/CLOSED/DESTROYED or SR_OK
 * (meaning: try again).  `*spins` counts polls of this operation. */
static sr_status pause_or_sleep(sr_handle *h, sr_waitword *w, int64_t deadline, uint32_t *spins, uint32_t seen) {
    if (closed(h)) return SR_CLOSED;
    if (destroyed(h)) return SR_DESTROYED;
    if (broken(h)) return SR_BROKEN;
    int64_t now = now_ns();
    if (deadline >= 0 && now >= deadline) return SR_TIMEOUT;
    if (*spins < SPIN_LIMIT) {
        (*spins)++;
        cpu_relax();
        return SR_OK;
    }
    if (*spins < SPIN_LIMIT + YIELD_LIMIT) {
        /* on a busy machine the process we wait for may share our core: give it the core
         * rather than burn our slice (each yield is a cheap system call, not a sleep) */
        (*spins)++;
        sched_yield();
        return SR_OK;
    }
    int64_t slice = WAIT_SLICE_NS;
    if (deadline >= 0 && deadline - now < slice) slice = deadline - now;
    futex_wait(&w->seq, seen, slice);
    return SR_OK;
}

static void count_wait(sr_handle *h) {
    atomic_fetch_add_explicit(&h->block->stats[SR_STAT_WAITS], 1, memory_order_relaxed);
}

static void reap(sr_handle *h); /* below */

/* Reap once this handle has found the queue blocked at the same place for the grace.
 * The stall is timed per handle and across calls, not per call: callers that only poll
 * (get_nowait, or timeouts shorter than the grace) must add up too, or a claim of a dead
 * process at the head stalls for good a queue whose users all poll; a per-call clock
 * never reached the grace for them (tests/test_sage_regressions.py).  The place is
 * H.pos + F.pos: both only grow, so the sum moves whenever a record is got or given
 * back, and stays put while a claim blocks consumers (H) or producers (F; a full
 * maxsize also waits for H).  Threads of one handle race on the two fields harmlessly:
 * the worst case is one spare reap. */
static void note_blocked(sr_handle *h) {
    sr_header *hdr = h->hdr;
    /* acquire: pairs with the full-barrier CASes that move H and F */
    uint64_t hp = atomic_load_explicit(&hdr->head.pos, memory_order_acquire);
    uint64_t fp = atomic_load_explicit(&hdr->free.pos, memory_order_acquire);
    uint64_t key = hp + fp;
    int64_t now = now_ns();
    if (atomic_load_explicit(&h->stall_key, memory_order_relaxed) != key) {
        atomic_store_explicit(&h->stall_since, now, memory_order_relaxed);
        atomic_store_explicit(&h->stall_key, key, memory_order_relaxed);
        return;
    }
    if (now - atomic_load_explicit(&h->stall_since, memory_order_relaxed) <= (int64_t)h->grace_ns) return;
    atomic_store_explicit(&h->stall_since, now, memory_order_relaxed); /* at most one reap per grace */
    /* Nothing claimed, nothing left to sweep, nobody sweeping: nothing to reap (an idle
     * queue polled by many handles stays cheap).  A torn read of the four words can
     * only come from cursors that moved, i.e. from progress; the next grace looks again. */
    if (atomic_load_explicit(&hdr->tail.pos, memory_order_acquire) == hp && fp == hp &&
        atomic_load_explicit(&hdr->free.meta, memory_order_acquire) == 0)
        return;
    reap(h);
}

/* Adaptive spinning (in the spirit of glibc's adaptive mutexes): spinning pays only when
 * the peer we wait for runs on another core at the same time.  A blocked call that
 * succeeded while spinning doubles this handle's budget (up to SPIN_LIMIT); one that
 * succeeded only once it yielded its core halves it (down to SPIN_MIN): the peer needed
 * our core, so the spin was a wasted slice.  A success after a futex sleep says nothing
 * about the peer (the queue was idle) and leaves it.  Process-private word; threads of
 * one handle race on it harmlessly (a lost update is one more or one less halving). */
static void adapt_spin(sr_handle *h, uint32_t spins) {
    uint32_t budget = atomic_load_explicit(&h->spin_budget, memory_order_relaxed);
    if (spins < SPIN_LIMIT) {
        budget = budget * 2 > SPIN_LIMIT ? SPIN_LIMIT : budget * 2;
    } else if (spins < SPIN_LIMIT + YIELD_LIMIT) {
        budget = budget / 2 < SPIN_MIN ? SPIN_MIN : budget / 2;
    } else {
        return;
    }
    atomic_store_explicit(&h->spin_budget, budget, memory_order_relaxed);
}

/* One claim attempt: SR_OK, SR_WOULD_BLOCK, or a final status. */
typedef sr_status (*attempt_fn)(sr_handle *h, void *ctx);

/* Try `attempt` until it stops saying SR_WOULD_BLOCK or the deadline (0: one try, < 0:
 * never) passes: bounded spin, then register as a sleeper on w, run `attempt` once more,
 * sleep if it still would block.  Every blocked call notes the stall (note_blocked: a
 * clock read and two loads) at its first failure, then at every sched_yield and every
 * sleep slice; that is also what reaps claims of dead processes.  Not only per slice: on
 * a loaded machine the 200 yields alone can take a second (each gives the core to every
 * runnable peer), and a call whose timeout ran out among them never reaped.  A resumed
 * wait (sr_*_wait) neither spins again nor counts another wait. */
static sr_status wait_loop(sr_handle *h, sr_waitword *w, attempt_fn attempt, void *ctx, int64_t deadline,
                           int resume) {
    /* the spin phase is the last spin_budget polls before SPIN_LIMIT (see adapt_spin) */
    uint32_t spins = resume ? SPIN_LIMIT + YIELD_LIMIT
                            : SPIN_LIMIT - atomic_load_explicit(&h->spin_budget, memory_order_relaxed);
    int counted = resume, noted = 0;
    sr_status result;
    for (;;) {
        result = attempt(h, ctx);
        if (result != SR_WOULD_BLOCK) break;
        if (!noted || spins >= SPIN_LIMIT) {
            noted = 1;
            note_blocked(h);
        }
        if (deadline == 0) break;
        if (!counted) { /* this operation blocks */
            counted = 1;
            count_wait(h);
        }
        uint32_t seen = 0;
        if (spins >= SPIN_LIMIT + YIELD_LIMIT) {
            /* acquire: pairs with the release bump in wake_if_waiting() */
            seen = atomic_load_explicit(&w->seq, memory_order_acquire);
            atomic_store_explicit(&w->armed, 1, memory_order_seq_cst);
            atomic_thread_fence(memory_order_seq_cst); /* pairs with wake_if_waiting()'s fence */
            result = attempt(h, ctx);
            if (result != SR_WOULD_BLOCK) break; /* a stale arming costs one spare wake */
        }
        sr_status p = pause_or_sleep(h, w, deadline, &spins, seen);
        if (p != SR_OK) {
            result = p;
            break;
        }
    }
    if (result == SR_OK && counted && !resume) adapt_spin(h, spins);
    return result;
}

static int64_t deadline_of(int64_t timeout_ns) {
    if (timeout_ns < 0) return -1;
    if (timeout_ns == 0) return 0;
    return now_ns() + timeout_ns;
}

/* What a put attempt claims (the context of try_put_claim under wait_loop). */
typedef struct {
    uint64_t total, items;
    sr_claim *c;
} put_attempt;

static sr_status put_attempt_fn(sr_handle *h, void *ctx) {
    put_attempt *a = ctx;
    return try_put_claim(h, a->total, a->items, a->c);
}

/* `entry_wait`: how long to wait for a free claim entry (see take_entry). */
static sr_status put_begin(sr_handle *h, const uint64_t *sizes, uint32_t count, uint32_t flags, int64_t timeout_ns,
                           int resume, int64_t entry_wait, sr_claim *c) {
    if (count == 0 || count > SR_MAX_BATCH || flags > 0xf) return SR_INVALID;
    uint64_t total = 0;
    for (uint32_t i = 0; i < count; i++) {
        total += sr_record_size(sizes[i]);
        if (total > h->capacity) return SR_TOO_BIG;
    }
    if (h->maxsize && count > h->maxsize) return SR_TOO_BIG;
    memset(c, 0, sizeof *c);
    c->done = 1; /* until a claim is made */
    if (closed(h)) return SR_CLOSED;
    if (destroyed(h)) return SR_DESTROYED;
    if (broken(h)) return SR_BROKEN;
    c->items = count;
    c->flags = flags;
    c->entry_wait = entry_wait;
    put_attempt a = {total, count, c};
    sr_status st = wait_loop(h, &h->hdr->space, put_attempt_fn, &a, deadline_of(timeout_ns), resume);
    if (st == SR_WOULD_BLOCK && timeout_ns != 0) st = SR_TIMEOUT;
    if (st != SR_OK) {
        drop_entry(h, c);
        return st;
    }
    c->done = 0;
    return SR_OK;
}

sr_status sr_put_begin(sr_handle *h, const uint64_t *sizes, uint32_t count, uint32_t flags, int64_t timeout_ns,
                       sr_claim *c) {
    return put_begin(h, sizes, count, flags, timeout_ns, 0, -1, c);
}

sr_status sr_put_wait(sr_handle *h, const uint64_t *sizes, uint32_t count, uint32_t flags, int64_t timeout_ns,
                      sr_claim *c) {
    return put_begin(h, sizes, count, flags, timeout_ns, 1, -1, c);
}

sr_status sr_put_try(sr_handle *h, const uint64_t *sizes, uint32_t count, uint32_t flags, sr_claim *c) {
    return put_begin(h, sizes, count, flags, 0, 0, 0, c);
}

uint8_t *sr_put_record(sr_handle *h, sr_claim *c, uint64_t size) {
    (void)size;
    return h->ring + (c->pos + c->next) % h->capacity + SR_REC_HEADER;
}

static void put_done(sr_handle *h, sr_claim *c) {
    finish_entry(&h->block->entries[c->entry]);
    drop_entry(h, c);
    c->done = 1;
    wake_if_waiting(&h->hdr->data);
}

sr_status sr_put_commit_one(sr_handle *h, sr_claim *c, uint64_t size) {
    if (c->done || c->written >= c->items) return SR_ALREADY_DONE;
    sr_entry *en = &h->block->entries[c->entry];
    uint64_t rpos = c->pos + c->next, rsz = sr_record_size(size);
    rec_hdr *r = rec_at(h, rpos);
    /* progress before the commit: a reaper that finds the claim's owner dead learns
     * which record may be the first uncommitted one (see abandon_put()). */
    atomic_store_explicit(&en->progress, ((uint64_t)c->written << 40) | c->next, memory_order_relaxed);
    atomic_store_explicit(&en->next, c->next + rsz, memory_order_relaxed);
    uint64_t slack = rsz - SR_REC_HEADER - size; /* < SR_ALIGN: the exact size is recoverable */
    atomic_store_explicit(&r->info, mk_info(rsz, 1, (slack << 4) | c->flags), memory_order_relaxed);
    /* release: the payload and info happen-before a consumer's acquire of the state */
    atomic_store_explicit(&r->state, rpos | SR_REC_COMMITTED, memory_order_release);
    atomic_fetch_add_explicit(&h->block->stats[SR_STAT_PUTS], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->block->stats[SR_STAT_BYTES_IN], size, memory_order_relaxed);
    c->written++;
    c->next += rsz;
    if (c->written == c->items) put_done(h, c);
    return SR_OK;
}

sr_status sr_put_abort(sr_handle *h, sr_claim *c) {
    if (c->done) return SR_ALREADY_DONE;
    uint64_t rpos = c->pos + c->next, lost = c->items - c->written;
    write_marker(h, rpos, c->len - c->next, lost, SR_REC_ABANDONED);
    atomic_fetch_add_explicit(&h->hdr->shared.abandoned, lost, memory_order_relaxed);
    put_done(h, c);
    return SR_OK;
}

/* ---- consumer ------------------------------------------------------------------------- */

/* Clear a record's payload, publish CONSUMED, then let the sweeper run. */
static void sweep(sr_handle *h);

static void consume_record(sr_handle *h, uint64_t pos, uint64_t len) {
    rec_hdr *r = rec_at(h, pos);
    if (len > SR_REC_HEADER) memset((uint8_t *)r + SR_REC_HEADER, 0, len - SR_REC_HEADER);
    /* release: the cleared payload happens-before the sweeper's acquire of CONSUMED */
    atomic_store_explicit(&r->state, pos | SR_REC_CONSUMED, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst); /* pairs with sweep()'s CAS: one of us sees the other */
    sweep(h);
}

/* One attempt to claim the record at the head: SR_OK with an item, or WOULD_BLOCK. */
static sr_status try_get_claim(sr_handle *h, sr_claim *c) {
    sr_header *hdr = h->hdr;
    for (;;) {
        u128 hd = snap_cursor(&hdr->head);
        if (!cursor_sane(hd))
            return mark_broken(h, "head cursor {pos %llu, idx %u}: unaligned or idx beyond %u",
                               (unsigned long long)lo64(hd), cur_idx(hd), SR_MAX_IDX);
        uint64_t r = lo64(hd), hitems = cur_items(hd);
        uint32_t prev = cur_idx(hd);
        rec_hdr *rec = rec_at(h, r);
        /* acquire: pairs with the producer's release store of the state word */
        uint64_t s = atomic_load_explicit(&rec->state, memory_order_acquire);
        uint32_t rs = rs_state(s);
        if (rs_pos(s) != r || (rs != SR_REC_COMMITTED && rs != SR_REC_PADDING && rs != SR_REC_ABANDONED)) {
            if (snap_cursor(&hdr->head) != hd) continue;
            /* a record at the head that says it was consumed (or is in no known state)
             * would never change: nobody but its reader writes a consumed record */
            if (rs_pos(s) == r && rs != SR_REC_EMPTY)
                return mark_broken(h, "record at the head (position %llu) is in state %u", (unsigned long long)r, rs);
            drop_entry(h, c);
            return SR_WOULD_BLOCK; /* empty, or the head record is still being written */
        }
        uint64_t info = atomic_load_explicit(&rec->info, memory_order_relaxed);
        if (!record_sane(h, r, info, rs)) {
            /* the record may have been taken, consumed and reused under us: only a head
             * that still names it makes its header trustworthy (nobody else writes it) */
            if (snap_cursor(&hdr->head) != hd) continue;
            return mark_broken(h, "record at position %llu (state %u): length %llu, %llu items, flags 0x%x "
                               "out of bounds for a ring of %llu bytes", (unsigned long long)r, rs,
                               (unsigned long long)info_len(info), (unsigned long long)info_items(info),
                               info_flags(info), (unsigned long long)h->capacity);
        }
        uint64_t len = info_len(info), items = info_items(info);
        sr_status st = take_entry(h, c, c->entry_wait);
        if (st != SR_OK) return st;
        sr_entry *en = &h->block->entries[c->entry];
        announce(en, SR_KIND_GET, r, len, items, 0);
        confirm(hdr, prev, r, SR_KIND_GET);
        u128 next = mk128(r + len, mk_meta(hitems + items, idx_of(h, c->entry)));
        if (!cas128(&hdr->head, hd, next)) continue;
        confirm_own(en);
        if (rs != SR_REC_COMMITTED) { /* padding or abandoned: nothing to return */
            consume_record(h, r, len);
            finish_entry(en);
            wake_if_waiting(&hdr->space);
            continue;
        }
        c->rec_pos = r;
        c->pos = r;
        c->len = len;
        c->items = 1;
        c->flags = info_flags(info) & 0xf;
        c->data = (uint8_t *)rec + SR_REC_HEADER;
        c->data_len = len - SR_REC_HEADER - (info_flags(info) >> 4);
        return SR_OK;
    }
}

static sr_status get_attempt_fn(sr_handle *h, void *ctx) { return try_get_claim(h, ctx); }

static sr_status get_begin(sr_handle *h, int64_t timeout_ns, int resume, int64_t entry_wait, sr_claim *c) {
    memset(c, 0, sizeof *c);
    c->done = 1; /* until a claim is made */
    if (closed(h)) return SR_CLOSED;
    if (destroyed(h)) return SR_DESTROYED;
    if (broken(h)) return SR_BROKEN;
    c->entry_wait = entry_wait;
    sr_status st = wait_loop(h, &h->hdr->data, get_attempt_fn, c, deadline_of(timeout_ns), resume);
    if (st == SR_WOULD_BLOCK && timeout_ns != 0) st = SR_TIMEOUT;
    if (st != SR_OK) {
        drop_entry(h, c);
        return st;
    }
    c->done = 0;
    return SR_OK;
}

sr_status sr_get_begin(sr_handle *h, int64_t timeout_ns, sr_claim *c) { return get_begin(h, timeout_ns, 0, -1, c); }

sr_status sr_get_wait(sr_handle *h, int64_t timeout_ns, sr_claim *c) { return get_begin(h, timeout_ns, 1, -1, c); }

sr_status sr_get_try(sr_handle *h, sr_claim *c) { return get_begin(h, 0, 0, 0, c); }

#define CLEAR_CHUNK 16384u /* fits L1 with room: cleared while still cached */

void sr_copy_out_clear(sr_claim *c, void *dst) {
    uint8_t *src = c->data, *out = dst;
    uint64_t n = c->data_len;
    for (uint64_t off = 0; off < n; off += CLEAR_CHUNK) {
        uint64_t k = n - off < CLEAR_CHUNK ? n - off : CLEAR_CHUNK;
        memcpy(out + off, src + off, k);
        memset(src + off, 0, k);
    }
    /* the record's slack bytes (< SR_ALIGN) after the payload are already zero: only
     * a producer writes them, and it writes only the payload */
    c->cleared = 1;
}

sr_status sr_get_end(sr_handle *h, sr_claim *c) {
    if (c->done) return SR_ALREADY_DONE;
    if (c->cleared) {
        rec_hdr *r = rec_at(h, c->rec_pos);
        /* release: pairs with the sweeper's acquire of CONSUMED (payload cleared above) */
        atomic_store_explicit(&r->state, c->rec_pos | SR_REC_CONSUMED, memory_order_release);
        atomic_thread_fence(memory_order_seq_cst); /* pairs with sweep()'s CAS */
        sweep(h);
    } else {
        consume_record(h, c->rec_pos, c->len);
    }
    finish_entry(&h->block->entries[c->entry]);
    drop_entry(h, c);
    c->done = 1;
    atomic_fetch_add_explicit(&h->block->stats[SR_STAT_GETS], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->block->stats[SR_STAT_BYTES_OUT], c->data_len, memory_order_relaxed);
    wake_if_waiting(&h->hdr->space);
    return SR_OK;
}

/* ---- the sweeper: give CONSUMED records back to producers, in order ---------------------- */

/* Give back, in order, the CONSUMED records at F.  The length that moves F is checked
 * once F is ours (the record's header is then stable: nobody reuses space behind F): a
 * consistent queue has F + len <= H, since a record is consumed only after H passed it. */
static void sweep(sr_handle *h) {
    sr_header *hdr = h->hdr;
    uint64_t me = (uint64_t)h->block_index + 1;
    for (;;) {
        u128 f = snap_free(&hdr->free);
        if (hi64(f) != 0) return; /* another sweeper is at work; it re-checks after moving F */
        uint64_t fp = lo64(f);
        rec_hdr *rec = rec_at(h, fp);
        /* acquire: pairs with consume_record()'s release of CONSUMED */
        if (atomic_load_explicit(&rec->state, memory_order_acquire) != (fp | SR_REC_CONSUMED)) return;
        if (!cas128(&hdr->free, f, mk128(fp, me))) continue; /* F is ours while meta == me */
        /* Only the state word needs clearing: the info word sits at a position that is
         * never 16-aligned, so no later record can mistake it for a state word, and
         * keeping it lets a survivor finish this sweep if we die here (reap()). */
        uint64_t info = atomic_load_explicit(&rec->info, memory_order_relaxed), len = info_len(info);
        /* acquire: pairs with the CAS that moved H past this record (before its CONSUMED) */
        uint64_t hp = atomic_load_explicit(&hdr->head.pos, memory_order_acquire);
        if (!record_sane(h, fp, info, SR_REC_CONSUMED) || fp + len > hp) {
            cas128(&hdr->free, mk128(fp, me), mk128(fp, 0)); /* let go of F unchanged */
            mark_broken(h, "consumed record at the free cursor %llu has length %llu (head %llu, capacity %llu)",
                        (unsigned long long)fp, (unsigned long long)len, (unsigned long long)hp,
                        (unsigned long long)h->capacity);
            return;
        }
        atomic_store_explicit(&rec->state, 0, memory_order_relaxed);
        /* full barrier: the cleared state happens-before a producer's acquire of F.pos */
        cas128(&hdr->free, mk128(fp, me), mk128(fp + len, 0));
    }
}

/* ---- recovery from dead participants ----------------------------------------------------- */

/* Is the record at pos committed (or past that), as far as a dead writer is concerned? */
static int record_published(sr_handle *h, uint64_t pos) {
    uint64_t s = atomic_load_explicit(&rec_at(h, pos)->state, memory_order_acquire);
    if (rs_pos(s) == pos && rs_state(s) != SR_REC_EMPTY) return 1;
    /* read after the state: if F had passed pos, the record was published and swept */
    return atomic_load_explicit(&h->hdr->free.pos, memory_order_acquire) > pos;
}

/* A marker of `len` bytes at `pos` stays inside one lap of the ring. */
static int marker_fits(const sr_handle *h, uint64_t pos, uint64_t len) {
    return pos % SR_ALIGN == 0 && len % SR_ALIGN == 0 && len >= SR_REC_HEADER &&
           len <= h->capacity - pos % h->capacity;
}

/* We own a dead producer's claim (entry ABANDONED by our CAS; its values read after that
 * CAS, so final): mark its unpublished rest as ABANDONED.  The writer stored, before
 * committing record j, progress = (j, offset of j) and next = offset of record j+1;
 * records before j are published.  A claim that begins with padding (to the end of the
 * lap) announced progress = (0, padding length).  Every value comes from the dead
 * process's entry and is checked before it addresses the ring. */
static sr_status abandon_put(sr_handle *h, uint64_t pos, uint64_t len, uint64_t items, uint64_t progress,
                             uint64_t next) {
    uint64_t j = progress >> 40, off_j = progress & ((1ull << 40) - 1);
    if (pos % SR_ALIGN || len % SR_ALIGN || len > h->capacity || items > len / SR_ALIGN || j > items ||
        off_j % SR_ALIGN || off_j > len || next % SR_ALIGN || next < off_j || next > len)
        return mark_broken(h, "claim entry {pos %llu, len %llu, items %llu, record %llu at %llu, next %llu} "
                           "of a dead producer is out of bounds", (unsigned long long)pos, (unsigned long long)len,
                           (unsigned long long)items, (unsigned long long)j, (unsigned long long)off_j,
                           (unsigned long long)next);
    uint64_t end = pos + len, start, lost;
    if (off_j > 0 && j == 0 && !record_published(h, pos)) {
        /* not even the padding went out: write it (it fills the lap), then abandon the
         * records after it; one marker over both would wrap around the ring's end */
        if (!marker_fits(h, pos, off_j) || (pos + off_j) % h->capacity != 0)
            return mark_broken(h, "padding of %llu bytes at %llu does not end the lap", (unsigned long long)off_j,
                               (unsigned long long)pos);
        write_marker(h, pos, off_j, 0, SR_REC_PADDING);
        start = pos + off_j;
        lost = items;
    } else if (off_j + pos < end && record_published(h, pos + off_j)) {
        start = pos + next; /* record j went out, j+1 (if any) did not */
        lost = items > j ? items - j - 1 : 0;
    } else {
        start = pos + off_j;
        lost = items - j;
    }
    if (start >= end) return SR_OK; /* everything was published before the writer died */
    if (!marker_fits(h, start, end - start) || lost > (end - start) / SR_ALIGN)
        return mark_broken(h, "abandoned rest [%llu, %llu) of a dead producer's claim crosses the ring's end",
                           (unsigned long long)start, (unsigned long long)end);
    write_marker(h, start, end - start, lost, SR_REC_ABANDONED);
    atomic_fetch_add_explicit(&h->hdr->shared.abandoned, lost, memory_order_relaxed);
    return SR_OK;
}

/* Take over claims of dead processes that block the head (an unpublished record) or the
 * sweeper (a record read by a dead consumer, or F held by a dead sweeper). */
static void reap(sr_handle *h) {
    sr_header *hdr = h->hdr;
    /* A reader may have died (or stalled) between publishing CONSUMED and sweeping it:
     * nothing names it any more, so whoever waits sweeps (found by the interleaving
     * model in tests/test_sage_interleavings.py). */
    sweep(h);
    u128 t = snap_cursor(&hdr->tail), hd = snap_cursor(&hdr->head);
    if (!cursor_sane(t) || !cursor_sane(hd)) {
        mark_broken(h, "cursor position unaligned or claim idx beyond %u (tail idx %u, head idx %u)", SR_MAX_IDX,
                    cur_idx(t), cur_idx(hd));
        return;
    }
    /* make sure the last claims are recorded as CLAIMED before looking for them */
    confirm(hdr, cur_idx(t), lo64(t), SR_KIND_PUT);
    confirm(hdr, cur_idx(hd), lo64(hd), SR_KIND_GET);
    uint64_t hp = lo64(hd);
    u128 f = snap_free(&hdr->free);
    uint64_t fp = lo64(f);
    if (hi64(f) > SR_MAX_BLOCKS) {
        mark_broken(h, "free cursor held by block %llu of %u", (unsigned long long)hi64(f), SR_MAX_BLOCKS);
        return;
    }
    if (hi64(f) != 0 && !block_owner_alive(hdr, (uint32_t)(hi64(f) - 1))) {
        /* the sweeper died holding F: take it over; re-clearing the header is idempotent
         * because F still names this record, so nobody can have reused its space */
        uint64_t me = (uint64_t)h->block_index + 1;
        if (cas128(&hdr->free, f, mk128(fp, me))) {
            rec_hdr *rec = rec_at(h, fp);
            uint64_t info = atomic_load_explicit(&rec->info, memory_order_relaxed), len = info_len(info);
            /* H read now, not the snapshot above: the record may have been read and its
             * sweep begun (and ended by death) after that snapshot.  acquire: pairs with
             * the CAS that moved H past it, which preceded its CONSUMED and the sweep */
            uint64_t hnow = atomic_load_explicit(&hdr->head.pos, memory_order_acquire);
            if (!record_sane(h, fp, info, SR_REC_CONSUMED) || fp + len > hnow) {
                cas128(&hdr->free, mk128(fp, me), mk128(fp, 0));
                mark_broken(h, "record at the free cursor %llu held by a dead sweeper has length %llu",
                            (unsigned long long)fp, (unsigned long long)len);
                return;
            }
            atomic_store_explicit(&rec->state, 0, memory_order_relaxed);
            cas128(&hdr->free, mk128(fp, me), mk128(fp + len, 0));
            sweep(h);
        }
    }
    for (uint32_t b = 0; b < SR_MAX_BLOCKS; b++) {
        sr_block *blk = block_at(hdr, b);
        if (atomic_load_explicit(&blk->pid, memory_order_acquire) == 0) continue;
        int alive = -1; /* checked lazily: /proc reads are not free */
        for (uint32_t e = 0; e < SR_BLOCK_ENTRIES; e++) {
            sr_entry *en = &blk->entries[e];
            uint64_t pos, len, items, progress, next;
            uint64_t s = read_entry(en, &pos, &len, &items, &progress, &next);
            if (s == 0 || st_phase(s) != SR_PH_CLAIMED) continue;
            int blocks_head = st_kind(s) == SR_KIND_PUT && pos <= hp && hp < pos + len;
            int blocks_free = st_kind(s) == SR_KIND_GET && pos == fp;
            if (!blocks_head && !blocks_free) continue;
            SR_TEST_HOOK(1); /* between the look at the entry and the liveness check */
            if (alive < 0) alive = block_owner_alive(hdr, b);
            if (alive) continue;
            /* one survivor wins the claim; the dead owner can write nothing more */
            if (!atomic_compare_exchange_strong_explicit(&en->state, &s,
                                                         mk_state(st_seq(s), st_kind(s), SR_PH_ABANDONED),
                                                         memory_order_acq_rel, memory_order_relaxed))
                continue;
            /* Read the claim again now that it is ours: its owner may have published
             * more records (moving progress/next) between our first look and its death,
             * and abandoning from the first look's values would overwrite a published
             * record (its item lost, its count a phantom in qsize).  The CAS matched the
             * same seq, so this is the same claim; the owner is dead, so these values
             * are final.  acquire (the CAS): pairs with the owner's release stores. */
            progress = atomic_load_explicit(&en->progress, memory_order_relaxed);
            next = atomic_load_explicit(&en->next, memory_order_relaxed);
            if (blocks_head) {
                if (abandon_put(h, pos, len, items, progress, next) != SR_OK) return;
            } else {
                rec_hdr *rec = rec_at(h, pos);
                uint64_t rs = atomic_load_explicit(&rec->state, memory_order_acquire);
                if (!marker_fits(h, pos, len)) {
                    mark_broken(h, "claim entry {pos %llu, len %llu} of a dead consumer is out of bounds",
                                (unsigned long long)pos, (unsigned long long)len);
                    return;
                }
                if (rs_state(rs) != SR_REC_CONSUMED) {
                    if (rs_state(rs) == SR_REC_COMMITTED)
                        atomic_fetch_add_explicit(&hdr->shared.abandoned, 1, memory_order_relaxed);
                    consume_record(h, pos, len);
                } else {
                    sweep(h);
                }
            }
        }
    }
    wake_if_waiting(&hdr->data);
    wake_if_waiting(&hdr->space);
}

/* ---- introspection ------------------------------------------------------------------------ */

sr_status sr_depth(const sr_handle *h, uint64_t *depth) { return depth_of(h->hdr, depth); }

void sr_read_stats(const sr_handle *h, sr_stats *out) {
    sr_header *hdr = h->hdr;
    uint64_t v[SR_STAT_COUNT];
    for (int i = 0; i < SR_STAT_COUNT; i++) v[i] = atomic_load_explicit(&hdr->shared.retired[i], memory_order_relaxed);
    for (uint32_t b = 0; b < SR_MAX_BLOCKS; b++) {
        sr_block *blk = block_at(hdr, b);
        if (atomic_load_explicit(&blk->pid, memory_order_relaxed) == 0) continue;
        for (int i = 0; i < SR_STAT_COUNT; i++) v[i] += atomic_load_explicit(&blk->stats[i], memory_order_relaxed);
    }
    out->puts = v[SR_STAT_PUTS];
    out->gets = v[SR_STAT_GETS];
    out->bytes_in = v[SR_STAT_BYTES_IN];
    out->bytes_out = v[SR_STAT_BYTES_OUT];
    out->waits = v[SR_STAT_WAITS];
    out->errors = v[SR_STAT_ERRORS];
    out->abandoned = atomic_load_explicit(&hdr->shared.abandoned, memory_order_relaxed);
}

void sr_note_error(sr_handle *h) {
    /* relaxed: a statistic; retire_block_stats moves it with the others on detach/reclaim */
    atomic_fetch_add_explicit(&h->block->stats[SR_STAT_ERRORS], 1, memory_order_relaxed);
}

uint32_t sr_attached_pids(const void *base, uint32_t *pids, uint32_t max) {
    sr_header *hdr = (sr_header *)(void *)base;
    uint32_t n = 0;
    for (uint32_t b = 0; b < SR_MAX_BLOCKS && n < max; b++) {
        uint32_t pid = atomic_load_explicit(&block_at(hdr, b)->pid, memory_order_relaxed);
        if (pid) pids[n++] = pid;
    }
    return n;
}
