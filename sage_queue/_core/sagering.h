/*
 * sagering.h -- layout and flat C ABI of the `sage` ring: a lock-free MPMC
 * queue of variable-length records in a named shared-memory segment.
 *
 * Why this shape (long form in DESIGN.md next to this file):
 *
 *   Records are claimed Aeron-style: a producer claims `need` bytes by one CAS
 *   on the tail cursor, writes its record, then publishes the record's state
 *   word with release.  Consumers claim a committed record by one CAS on the
 *   head cursor, copy it out, clear it and publish CONSUMED.  Space is given
 *   back to producers by the `free` cursor, which sweeps CONSUMED records in
 *   order.  No mutex on the put/get path: a producer never waits for another
 *   producer, a consumer never waits for another consumer; a consumer can only
 *   wait for the record at the head to be committed (as in Aeron).
 *
 *   Every claim must name its claimer so that a SIGKILLed claimer can be told
 *   from a slow one.  A 64-bit cursor cannot hold a position, an item count
 *   and an identity, so the cursors are 128-bit words {pos, items<<32 | idx}
 *   changed only by a 16-byte CAS: `idx` names the *claim entry* (in the
 *   participant blocks below) whose owner made the last claim.  Before its
 *   CAS the claimer *announces* the claim in its entry (pos, len, items);
 *   whoever moves a cursor away from {.., idx} first *confirms* that entry
 *   (ANNOUNCED -> CLAIMED, a CAS tagged with the entry's sequence number), so
 *   every successful claim is recorded as CLAIMED before the cursor forgets
 *   it, and an announce whose CAS failed is never confirmed.  A claim entry
 *   lives in a block owned by one process (pid + start time): a dead owner is
 *   detected, its CLAIMED entry taken over by one CAS (CLAIMED -> ABANDONED),
 *   and the new owner finishes the record as ABANDONED (skipped, counted).
 *
 *   Only a record's owner ever writes into the ring; everyone else changes
 *   only cursors and claim entries, whose values never repeat (64-bit byte
 *   positions, 56-bit entry sequence numbers).  That is what makes the
 *   protocol ABA-free without clearing tricks on the payload.
 *
 * Segment (all offsets from the segment start; each line is 64 bytes):
 *
 *   0      +-----------------------------------------------------------+
 *          | line 0  magic, version, capacity, maxsize, flags, creator |
 *   64     | line 1  tail cursor T {pos, items<<32|idx}   (producers)  |
 *   128    | line 2  head cursor H {pos, items<<32|idx}   (consumers)  |
 *   192    | line 3  free cursor F {pos, owner idx}       (sweepers)   |
 *   256    | line 4  data futex word + waiter count  (consumers sleep) |
 *   320    | line 5  space futex word + waiter count (producers sleep) |
 *   384    | line 6  shared counters: abandoned, retired stats         |
 *   4096   +-----------------------------------------------------------+
 *          | SR_MAX_BLOCKS participant blocks, SR_BLOCK_SIZE each:     |
 *          |   line 0: owner pid, start time, this block's stats       |
 *          |   SR_BLOCK_ENTRIES claim entries, one line each           |
 *   DATA   +-----------------------------------------------------------+
 *          | ring: capacity bytes, records at 16-byte aligned offsets  |
 *          +-----------------------------------------------------------+
 *
 * Record (at ring offset pos % capacity, 16-byte aligned, len bytes total):
 *
 *   0      +--------------------------------------------+
 *          | state: pos | SR_REC_* (low 4 bits)         |  written last, release
 *   8      | info:  len:32 | items:24 | flags:8         |
 *   16     +--------------------------------------------+
 *          | payload (len - 16 bytes, zero padded)      |
 *          +--------------------------------------------+
 *
 *   A record's state word carries its own full position, so a stale reader
 *   can never mistake an older lap's record for the current one.  Free ring
 *   space is zero at every 16-aligned word (every place a state word can be):
 *   consumers clear the payload they read, the free-cursor sweeper clears the
 *   state word, so a record whose producer has not yet committed always reads
 *   as state 0.  (Info words, never 16-aligned, are left as they were.)
 */
/*
 * Multi-part record (format flag 2, written and read by the Python binding only: a pickle
 * with out-of-band buffers, all in one record's payload):
 *
 *   0                      +-----------------------------------+
 *                          | u32 n (parts)  | u32 0 (reserved) |
 *   SR_PARTS_TABLE_OFFSET  +-----------------------------------+
 *                          | u64 length of part 0 .. n-1       |  n entries
 *   sr_parts_data_offset(n)+-----------------------------------+
 *                          | part 0 (the pickle), part 1 ...   |  back to back, unaligned
 *                          +-----------------------------------+
 *
 *   A reader checks the whole table against the payload length before it copies anything.
 */
#ifndef SAGERING_H
#define SAGERING_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define SR_MAGIC 0x53414745524e4731ull /* "SAGERNG1" */
#define SR_VERSION 1u
#define SR_LINE 64u
#define SR_ALIGN 16u                /* record alignment; 4 low bits of a position are free */
#define SR_REC_HEADER 16u           /* bytes of a record header */
#define SR_MAX_BLOCKS 64u           /* handles attached at once, all processes together */
#define SR_BLOCK_ENTRIES 16u        /* concurrent operations per handle (threads) */
#define SR_MIN_CAPACITY 1024u
#define SR_MAX_CAPACITY (1ull << 31) /* record length is a 32-bit field */
#define SR_MAX_BATCH ((1u << 24) - 1u) /* items field of a record header */

/* ---- segment offsets ------------------------------------------------------------ */
#define SR_CONFIG_OFFSET 0u    /* line 0: immutable after init (except flags) */
#define SR_TAIL_OFFSET 64u     /* line 1: producers' cursor */
#define SR_HEAD_OFFSET 128u    /* line 2: consumers' cursor */
#define SR_FREE_OFFSET 192u    /* line 3: the sweeper's cursor */
#define SR_DATAWAIT_OFFSET 256u  /* line 4: consumers sleep here */
#define SR_SPACEWAIT_OFFSET 320u /* line 5: producers sleep here */
#define SR_SHARED_OFFSET 384u  /* line 6: rarely written shared counters */
#define SR_BLOCKS_OFFSET 4096u /* participant blocks */
#define SR_BLOCK_SIZE ((1u + SR_BLOCK_ENTRIES) * SR_LINE)
#define SR_DATA_OFFSET (SR_BLOCKS_OFFSET + SR_MAX_BLOCKS * SR_BLOCK_SIZE)

/* ---- multi-part record payload (see the drawing above) ---------------------------- */
#define SR_PARTS_COUNT_OFFSET 0u /* u32: number of parts */
#define SR_PARTS_TABLE_OFFSET 8u /* u64 lengths, one per part */
static inline uint64_t sr_parts_data_offset(uint64_t n) { return SR_PARTS_TABLE_OFFSET + 8u * n; }

/* ---- record states (low 4 bits of a record's state word) -------------------------- */
enum sr_rec_state {
    SR_REC_EMPTY = 0,     /* cleared space, or claimed and not yet committed */
    SR_REC_COMMITTED = 1, /* payload readable */
    SR_REC_PADDING = 2,   /* filler to the end of the lap, no item */
    SR_REC_ABANDONED = 3, /* writer died (or aborted): skipped, `items` counted lost */
    SR_REC_CONSUMED = 4,  /* read and payload cleared; the sweeper may reclaim it */
};

/* ---- claim entries -------------------------------------------------------------- */
enum sr_phase {
    SR_PH_IDLE = 0,
    SR_PH_ANNOUNCED = 1, /* about to CAS a cursor with this claim */
    SR_PH_CLAIMED = 2,   /* the CAS succeeded (confirmed by the owner or a helper) */
    SR_PH_ABANDONED = 3, /* owner dead; a survivor took the claim over */
};
enum sr_kind { SR_KIND_PUT = 1, SR_KIND_GET = 2, SR_KIND_SWEEP = 3 };

/* ---- status codes of the C ABI ---------------------------------------------------- */
typedef enum sr_status {
    SR_OK = 0,
    SR_WOULD_BLOCK = 1,   /* full (put) / empty (get), nothing changed */
    SR_TIMEOUT = 2,       /* the wait ran out, nothing changed */
    SR_CLOSED = 3,        /* this handle was closed */
    SR_DESTROYED = 4,     /* the queue was destroyed */
    SR_TOO_BIG = 5,       /* the record can never fit */
    SR_BAD_LAYOUT = 6,    /* validate(): not a ring of this version */
    SR_NO_BLOCK = 7,      /* all participant blocks in use by live processes */
    SR_ALREADY_DONE = 8,  /* commit/abort/end called twice on one claim */
    SR_INVALID = 9,       /* bad argument */
    SR_INTERRUPTED = 10,  /* not returned by the core: the Python binding's "a signal handler raised" */
    SR_BROKEN = 11,       /* a value read from the segment failed its bounds check: queue marked broken */
    SR_BUSY = 12,         /* sr_*_try only: every claim entry of this handle is held by another thread */
} sr_status;

/* Segment header, line by line.  Cursors are 16-byte words {pos, meta}. */
typedef struct sr_cursor {
    _Alignas(16) _Atomic uint64_t pos; /* byte position, 16-aligned, never wraps (2^64 bytes) */
    _Atomic uint64_t meta;             /* T, H: items << 32 | claim idx; F: owner idx */
} sr_cursor;

typedef struct sr_config {
    _Atomic uint64_t magic;     /* SR_MAGIC, written last by the creator (release) */
    uint32_t version;           /* SR_VERSION */
    uint32_t header_size;       /* SR_DATA_OFFSET */
    uint64_t capacity;          /* ring bytes, multiple of SR_LINE */
    uint64_t maxsize;           /* items; 0 = bounded by bytes only */
    uint32_t creator_pid;
    _Atomic uint32_t destroyed; /* 1 once destroy() ran: every handle raises QueueDestroyed */
    _Atomic uint32_t broken;    /* 1 once a bounds check failed (E15): every handle raises QueueBroken */
    uint8_t pad_[SR_LINE - 44];
} sr_config;

typedef struct sr_waitword {
    _Atomic uint32_t seq;     /* futex word: bumped by a waker when someone waits */
    _Atomic uint32_t armed;   /* 1 while someone may sleep on seq: the next waker wakes all */
    uint8_t pad_[SR_LINE - 8];
} sr_waitword;

/* Indexes of a block's (and the retired) counters.  SR_STAT_ERRORS (items got that the
 * binding could not decode, see sr_note_error) took the last zero padding word of the
 * block's line 0 and of the shared line without a version change: a ring made by an older
 * release has zeros there, and an older release's handle neither writes nor reads it (nor
 * retires it when it reclaims a dead block: the count then stays in that block, counted
 * once by newer readers). */
enum sr_stat_index {
    SR_STAT_PUTS,
    SR_STAT_GETS,
    SR_STAT_BYTES_IN,
    SR_STAT_BYTES_OUT,
    SR_STAT_WAITS,
    SR_STAT_ERRORS,
    SR_STAT_COUNT
};

typedef struct sr_stats {
    uint64_t puts, gets, bytes_in, bytes_out, waits, abandoned, errors;
} sr_stats;

typedef struct sr_shared {
    _Atomic uint64_t abandoned;     /* items lost to dead claimers or aborts */
    _Atomic uint64_t retired[SR_STAT_COUNT]; /* sr_stat_index counters of closed/dead blocks */
    uint8_t pad_[SR_LINE - 8 - 8 * SR_STAT_COUNT];
} sr_shared;

typedef struct sr_header {
    sr_config config;
    sr_cursor tail;
    uint8_t pad1_[SR_LINE - sizeof(sr_cursor)];
    sr_cursor head;
    uint8_t pad2_[SR_LINE - sizeof(sr_cursor)];
    sr_cursor free;
    uint8_t pad3_[SR_LINE - sizeof(sr_cursor)];
    sr_waitword data;
    sr_waitword space;
    sr_shared shared;
} sr_header;

typedef struct sr_entry {
    _Atomic uint64_t state;     /* seq << 8 | kind << 4 | phase; owner writes, helpers CAS */
    _Atomic uint64_t pos;       /* first byte of the claim */
    _Atomic uint64_t len;       /* bytes claimed (padding included) */
    _Atomic uint64_t items;     /* items in the claim */
    _Atomic uint64_t progress;  /* puts: j << 40 | offset of record j (records < j published) */
    _Atomic uint64_t next;      /* puts: offset of record j+1 */
    uint8_t pad_[SR_LINE - 48];
} sr_entry;

typedef struct sr_block {
    _Atomic uint32_t pid;       /* owner process, 0 = free */
    uint32_t pad0_;
    _Atomic uint64_t start_time; /* owner's start time (clock ticks since boot): pid reuse guard */
    _Atomic uint64_t stats[SR_STAT_COUNT]; /* sr_stat_index counters; the owner writes (relaxed adds) */
    sr_entry entries[SR_BLOCK_ENTRIES];     /* line 0 above is exactly full: no padding */
} sr_block;

_Static_assert(sizeof(sr_config) == SR_LINE, "config is one line");
_Static_assert(sizeof(sr_cursor) == 16, "a cursor is one 16-byte CAS word");
_Static_assert(offsetof(sr_header, tail) == SR_TAIL_OFFSET, "tail line");
_Static_assert(offsetof(sr_header, head) == SR_HEAD_OFFSET, "head line");
_Static_assert(offsetof(sr_header, free) == SR_FREE_OFFSET, "free line");
_Static_assert(offsetof(sr_header, data) == SR_DATAWAIT_OFFSET, "data wait line");
_Static_assert(offsetof(sr_header, space) == SR_SPACEWAIT_OFFSET, "space wait line");
_Static_assert(offsetof(sr_header, shared) == SR_SHARED_OFFSET, "shared line");
_Static_assert(sizeof(sr_header) <= SR_BLOCKS_OFFSET, "header fits before the blocks");
_Static_assert(sizeof(sr_entry) == SR_LINE, "one claim entry per line");
_Static_assert(sizeof(sr_block) == SR_BLOCK_SIZE, "block size");
_Static_assert(offsetof(sr_block, entries) == SR_LINE, "a block's owner line is one line");
_Static_assert(sizeof(sr_shared) == SR_LINE, "the shared counters are one line");
_Static_assert(SR_DATA_OFFSET % 4096u == 0, "ring starts on a page");
_Static_assert(SR_MAX_BLOCKS * SR_BLOCK_ENTRIES < 65535u, "claim idx fits 16 bits");

/* ---- the flat C ABI ------------------------------------------------------------- */

/* A process-private handle on a mapped ring.  One per Python handle. */
typedef struct sr_handle {
    sr_header *hdr;
    uint8_t *ring;            /* hdr + SR_DATA_OFFSET */
    uint64_t capacity;
    uint64_t maxsize;
    sr_block *block;          /* this handle's participant block */
    uint32_t block_index;
    uint32_t pid;
    _Atomic uint32_t free_entries; /* bitmap of this block's idle entries (process-private) */
    _Atomic int closed;       /* set by sr_close(): waiters give up */
    uint64_t grace_ns;        /* stall time before checking a claimer for death */
    _Atomic uint64_t free_cache; /* last F.pos seen by this handle's producers (never ahead of F) */
    _Atomic uint64_t stall_key;  /* H.pos + F.pos where this handle last found the queue blocked */
    _Atomic int64_t stall_since; /* since when (CLOCK_MONOTONIC ns) it has found it blocked there */
    _Atomic uint32_t spin_budget; /* pause-polls a blocked call makes before yielding (adaptive) */
    _Atomic int why_set;      /* broken_why was written (first failed check of this handle only) */
    char broken_why[160];     /* what this handle's bounds check found (empty: found by another handle) */
} sr_handle;

/* An in-progress claim: filled by *_begin, consumed by *_commit / *_end. */
typedef struct sr_claim {
    uint64_t pos;      /* first record's position */
    uint64_t len;      /* bytes claimed, padding included */
    uint32_t entry;    /* claim entry index within the block */
    uint32_t items;
    uint32_t flags;    /* record flags (puts: given; gets: read) */
    uint32_t done;     /* set by commit/end/abort: a second call returns SR_ALREADY_DONE */
    uint8_t *data;     /* payload of the (first) record */
    uint64_t data_len; /* payload bytes (gets: as written by the producer) */
    uint64_t rec_pos;  /* position of the record being read (gets) */
    uint64_t next;     /* puts of several records: offset of the next record to write */
    uint32_t written;  /* puts of several records: records committed so far */
    uint32_t cleared;  /* gets: the caller zeroed the payload itself (sr_copy_out_clear) */
    uint32_t has_entry; /* `entry` is held by this claim (taken just before the announce) */
    int64_t entry_wait; /* how long begin may wait for a free entry (see take_entry) */
} sr_claim;

/* Size of a segment holding a ring of `capacity` bytes (capacity rounded up to SR_LINE). */
uint64_t sr_segment_size(uint64_t capacity);
/* Round a requested capacity to what the ring will use. */
uint64_t sr_round_capacity(uint64_t capacity);

/* Initialise a zero-filled segment of sr_segment_size(capacity) bytes (creator only). */
sr_status sr_init(void *base, uint64_t size, uint64_t capacity, uint64_t maxsize, uint32_t pid);

/* Check a mapped segment: writes a message naming the bad value into err (if non-NULL). */
sr_status sr_validate(const void *base, uint64_t size, char *err, size_t errlen);

/* Attach: take a participant block (reclaiming one of a dead process if needed). */
sr_status sr_open(sr_handle *h, void *base, uint64_t size, uint32_t pid);

/* Give the block back (after waiting for this handle's in-flight operations). */
void sr_detach(sr_handle *h);

/* Mark this handle closed and wake every waiter (they re-check their own flags). */
void sr_close(sr_handle *h);

/* Mark the queue destroyed for every handle, and wake everyone; SR_DESTROYED if it was
 * destroyed already (by any handle), SR_OK otherwise.  Closes this handle either way. */
sr_status sr_destroy(sr_handle *h);

/* Mark the queue broken (spec E15) for every handle, e.g. when the caller finds a record's
 * own content out of bounds, and wake everyone.  `why` is kept for this handle's errors. */
void sr_mark_broken(sr_handle *h, const char *why);

/* NULL if the queue is not marked broken; else what this handle found (or a general note
 * when another handle or process marked it). */
const char *sr_broken_reason(const sr_handle *h);

/* Bytes a record with `payload` bytes occupies. */
uint64_t sr_record_size(uint64_t payload);

/*
 * Producer side.  sr_put_begin claims room for `count` records whose payload
 * sizes are `sizes[0..count)` (one item each), waiting up to timeout_ns
 * (< 0: forever, 0: not at all).  Then, for each record in order,
 * sr_put_record() returns where to write its payload and sr_put_commit_one()
 * publishes it.  sr_put_abort() turns the not yet committed rest into an
 * ABANDONED record (counted lost).  `flags` (8 bits) is stored in every record.
 */
sr_status sr_put_begin(sr_handle *h, const uint64_t *sizes, uint32_t count, uint32_t flags,
                       int64_t timeout_ns, sr_claim *c);
uint8_t *sr_put_record(sr_handle *h, sr_claim *c, uint64_t size);
sr_status sr_put_commit_one(sr_handle *h, sr_claim *c, uint64_t size);
sr_status sr_put_abort(sr_handle *h, sr_claim *c);

/*
 * Waiting in slices.  A caller that must run code in the middle of one long wait (the
 * Python binding runs signal handlers at least every 100 ms, so that Ctrl-C or a test
 * timeout can end a blocked call) waits with sr_put_begin/sr_get_begin for the first
 * slice and continues with these for the next ones: same arguments and results, but a
 * continued wait neither spins again nor counts as another wait (stats `waits`).
 */
sr_status sr_put_wait(sr_handle *h, const uint64_t *sizes, uint32_t count, uint32_t flags, int64_t timeout_ns,
                      sr_claim *c);
sr_status sr_get_wait(sr_handle *h, int64_t timeout_ns, sr_claim *c);

/*
 * One attempt that never waits, not even for one of the handle's claim entries: SR_BUSY
 * when all SR_BLOCK_ENTRIES are held by other threads of this handle.  For a caller that
 * holds a lock the entries' holders may need to finish (the Python binding's first try
 * runs with the GIL held): on SR_BUSY it lets go of that lock and continues with
 * sr_*_begin or sr_*_wait, which wait for an entry.  Other results as sr_*_begin with a
 * zero timeout.
 */
sr_status sr_put_try(sr_handle *h, const uint64_t *sizes, uint32_t count, uint32_t flags, sr_claim *c);
sr_status sr_get_try(sr_handle *h, sr_claim *c);

/*
 * Consumer side.  sr_get_begin claims the oldest committed record (skipping
 * padding and abandoned records), waiting up to timeout_ns; c->data and
 * c->data_len point at its payload in the ring.  sr_get_end clears it and
 * gives the space back.  The payload stays valid between the two calls only.
 */
sr_status sr_get_begin(sr_handle *h, int64_t timeout_ns, sr_claim *c);
sr_status sr_get_end(sr_handle *h, sr_claim *c);

/* Copy the claimed payload to dst and zero it in the ring, chunk by chunk so that each
 * chunk is still in cache when it is cleared (one pass instead of copy-then-memset).
 * sr_get_end() then skips its own clearing. */
void sr_copy_out_clear(sr_claim *c, void *dst);

/* Items in the queue (claimed puts minus claimed gets: in-flight puts count) into *depth;
 * SR_BROKEN (the queue is not marked: this also serves read-only inspection) if the cursors
 * cannot describe a queue (head ahead of tail, more items than SR_ALIGN units between them). */
sr_status sr_depth(const sr_handle *h, uint64_t *depth);

/* Queue-wide counters: retired blocks plus every attached block. */
void sr_read_stats(const sr_handle *h, sr_stats *out);

/* Count one item this handle took (its claim ended: the item left the queue) that the
 * caller could not decode, e.g. an unpickling error (stats `errors`, spec SAGE7).  A relaxed
 * add to this handle's block, like the other per-block counters; never fails. */
void sr_note_error(sr_handle *h);

/* Block/liveness helpers exposed for `sage-queue ls`/tests. */
uint32_t sr_attached_pids(const void *base, uint32_t *pids, uint32_t max);
int sr_pid_alive(uint32_t pid, uint64_t start_time);
uint64_t sr_process_start_time(uint32_t pid);

#endif /* SAGERING_H */
