/*
 * _sage_core.c -- CPython binding of the sage ring (sagering.h).
 *
 * One type, `Ring`, wrapping one sr_handle on a segment that Python mapped
 * (sage_queue/_segment.py owns naming, mode 0600 and unlinking).  The ring
 * holds a buffer export of the mmap for its whole life, so the mapping cannot
 * vanish under a C pointer.  Serialisation stays in Python except the byte
 * copies; records carry a 4-bit format flag chosen by the caller.
 *
 * GIL: every operation first tries without waiting, holding the GIL; only if it
 * would block does it release the GIL and wait (spin, then futex), in slices of at most
 * 100 ms between which it runs signal handlers (Ctrl-C ends a blocked get).  Copies of
 * 64 KiB or more are done with the GIL released.  The first try never waits for a
 * claim entry either (sr_*_try): a holder may need the GIL to finish.  `close()` marks
 * the handle closed and wakes its waiters; the participant block is given back at once,
 * or by the last operation in flight when it ends (see "Lifecycle" below).  Errors: a
 * destroyed queue raises QueueDestroyed, a failed bounds check QueueBroken (E13, E15).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "sagering.h"

#define BIG_COPY 65536u
#define SIGNAL_SLICE_NS 100000000ll /* a blocked call runs signal handlers at least this often */

static PyObject *Full, *Empty, *QueueClosed, *QueueDestroyed, *QueueBroken, *pickle_loads, *pickle_dumps,
    *str_buffers;

/* Record format flags (4 bits in each record), exported to sage_queue/backends/sage.py as
 * FLAG_PICKLE etc.: one definition. */
enum { FMT_PICKLE = 0, FMT_BYTES = 1, FMT_PARTS = 2, FMT_RAW = 3 };

/* Multi-part record (FMT_PARTS: a pickle with out-of-band buffers): layout drawn in
 * sagering.h (SR_PARTS_*). */
#define PARTS_COUNT_OFFSET SR_PARTS_COUNT_OFFSET
#define PARTS_TABLE_OFFSET SR_PARTS_TABLE_OFFSET
#define parts_data_offset sr_parts_data_offset

/* Fields of the 9-tuple Ring.stats() returns, in order. */
enum { STAT_PUTS, STAT_GETS, STAT_BYTES_IN, STAT_BYTES_OUT, STAT_WAITS, STAT_ABANDONED, STAT_DEPTH,
       STAT_CAPACITY, STAT_ERRORS, STAT_COUNT };

/*
 * Lifecycle.  Every method runs with the GIL held except where it releases it to wait or
 * copy, so `in_flight`, `closed` and `detached` are only touched under the GIL.  An
 * operation counts itself in flight from its closed-check to its end; close() marks the
 * handle closed, wakes its waiters and, if nothing is in flight, gives the participant
 * block back at once; otherwise the last operation to leave does it.  close() never waits
 * for an operation: one may be the caller itself, interrupted by a signal handler that
 * closes the queue (it then raises QueueClosed as soon as the handler returns).
 */
typedef struct {
    PyObject_HEAD
    sr_handle h;
    Py_buffer view;
    int has_view;
    int opened;
    int closed;   /* close() ran (or the handle was abandoned after fork) */
    int detached; /* the participant block was given back and the view released */
    long in_flight; /* operations between their closed-check and their end */
    PyObject *pending_type, *pending_value, *pending_tb; /* get_many: the error of an item not yet reported */
} RingObject;

static PyObject *raise_broken(RingObject *self) {
    const char *why = sr_broken_reason(&self->h);
    PyErr_Format(QueueBroken, "sage queue is broken: %s", why ? why : "(no reason recorded)");
    return NULL;
}

static int check_open(RingObject *self) {
    if (self->closed || !self->opened) {
        PyErr_SetString(QueueClosed, "sage queue handle is closed");
        return -1;
    }
    if (atomic_load_explicit(&self->h.hdr->config.destroyed, memory_order_acquire)) {
        PyErr_SetString(QueueDestroyed, "sage queue was destroyed (through another handle)");
        return -1;
    }
    if (sr_broken_reason(&self->h)) {
        raise_broken(self);
        return -1;
    }
    return 0;
}

/* timeout: None -> -1 (forever), float seconds -> ns (>= 0). */
static int parse_timeout(PyObject *obj, int64_t *ns) {
    if (obj == Py_None) {
        *ns = -1;
        return 0;
    }
    double s = PyFloat_AsDouble(obj);
    if (s == -1.0 && PyErr_Occurred()) return -1;
    if (s < 0) {
        PyErr_SetString(PyExc_ValueError, "timeout must be >= 0 or None");
        return -1;
    }
    *ns = s > 9e9 ? -1 : (int64_t)(s * 1e9);
    return 0;
}

/* Map a failed status to an exception; returns NULL. */
static PyObject *raise_status(RingObject *self, sr_status st, int put) {
    if (st == SR_BROKEN) return raise_broken(self);
    switch (st) {
    case SR_WOULD_BLOCK:
    case SR_TIMEOUT:
        PyErr_SetNone(put ? Full : Empty);
        break;
    case SR_CLOSED:
        PyErr_SetString(QueueClosed, "sage queue handle is closed");
        break;
    case SR_DESTROYED:
        PyErr_SetString(QueueDestroyed, "sage queue was destroyed (through another handle)");
        break;
    case SR_BROKEN:
        PyErr_SetString(QueueBroken, "sage queue is broken: a value read from shared memory failed its bounds check");
        break;
    case SR_INTERRUPTED:
        break; /* a signal handler raised: its exception is the one to report */
    case SR_TOO_BIG:
        PyErr_SetString(PyExc_ValueError, "the item (or batch) can never fit in this queue "
                                          "(larger than capacity_bytes, or more items than maxsize)");
        break;
    default:
        PyErr_Format(PyExc_RuntimeError, "sage ring error %d", (int)st);
    }
    return NULL;
}

static void copy_maybe_nogil(void *dst, const void *src, size_t n) {
    if (n >= BIG_COPY) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(dst, src, n);
        Py_END_ALLOW_THREADS
    } else {
        memcpy(dst, src, n);
    }
}

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

/* The next slice of a wait that ends at `deadline` (< 0: never); 0 when it has ended. */
static int64_t next_slice(int64_t deadline) {
    if (deadline < 0) return SIGNAL_SLICE_NS;
    int64_t left = deadline - mono_ns();
    if (left <= 0) return 0;
    return left < SIGNAL_SLICE_NS ? left : SIGNAL_SLICE_NS;
}

/* What a put asks room for; a get passes none.  `flags` is the claim's format flag
 * (batches set each record's own flag before committing it). */
typedef struct {
    const uint64_t *sizes;
    uint32_t count, flags;
} put_request;

/* One claim attempt waiting at most `wait_ns`.  `resume` continues the wait an earlier
 * attempt began (sr_*_wait: counted as one wait, no second spin). */
static sr_status try_claim(RingObject *self, const put_request *put, int resume, int64_t wait_ns, sr_claim *c) {
    if (!put) return resume ? sr_get_wait(&self->h, wait_ns, c) : sr_get_begin(&self->h, wait_ns, c);
    return resume ? sr_put_wait(&self->h, put->sizes, put->count, put->flags, wait_ns, c)
                  : sr_put_begin(&self->h, put->sizes, put->count, put->flags, wait_ns, c);
}

/* The first attempt, with the GIL held: never waits, not even for a claim entry. */
static sr_status first_try(RingObject *self, const put_request *put, sr_claim *c) {
    return put ? sr_put_try(&self->h, put->sizes, put->count, put->flags, c) : sr_get_try(&self->h, c);
}

/* Claim room for a put (or a record to get when `put` is NULL), first without waiting
 * (GIL held), then waiting with the GIL released in slices of at most SIGNAL_SLICE_NS,
 * running signal handlers between them: a handler that raises (KeyboardInterrupt, a test
 * timeout) ends the wait, as it ends a blocked queue.Queue.get.  One uninterrupted wait
 * in C could not be ended by any signal.  SR_BUSY (every claim entry of this handle held
 * by other threads, which may need the GIL to finish their copies) also continues without
 * the GIL, even for a call that must not wait for the queue: it waits for an entry only. */
static sr_status claim(RingObject *self, const put_request *put, int64_t timeout, sr_claim *c) {
    sr_status st = first_try(self, put, c);
    if (st != SR_BUSY && (st != SR_WOULD_BLOCK || timeout == 0)) return st;
    if (timeout == 0) { /* busy: one attempt that may wait for an entry, not for the queue */
        Py_BEGIN_ALLOW_THREADS
        st = try_claim(self, put, 0, 0, c);
        Py_END_ALLOW_THREADS
        return st;
    }
    int64_t deadline = timeout < 0 ? -1 : mono_ns() + timeout;
    for (int resume = 0;; resume = 1) {
        int64_t slice = next_slice(deadline);
        if (slice == 0) return SR_TIMEOUT;
        Py_BEGIN_ALLOW_THREADS
        st = try_claim(self, put, resume, slice, c);
        Py_END_ALLOW_THREADS
        if (st != SR_TIMEOUT) return st;
        if (PyErr_CheckSignals() < 0) return SR_INTERRUPTED;
    }
}

/* ---- Ring(buffer, create, capacity, maxsize, pid) ------------------------------------ */

static int Ring_init(RingObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"buffer", "create", "capacity", "maxsize", "pid", NULL};
    PyObject *buf;
    int create;
    unsigned long long capacity, maxsize;
    unsigned int pid;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OpKKI", kwlist, &buf, &create, &capacity, &maxsize, &pid))
        return -1;
    if (self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "Ring already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    self->has_view = 1;
    uint64_t size = (uint64_t)self->view.len;
    if (create) {
        if (sr_init(self->view.buf, size, capacity, maxsize, pid) != SR_OK) {
            PyErr_Format(PyExc_ValueError, "cannot initialise a ring of capacity %llu in %llu bytes",
                         capacity, (unsigned long long)size);
            return -1;
        }
    }
    char err[200];
    if (sr_validate(self->view.buf, size, err, sizeof err) != SR_OK) {
        PyErr_SetString(PyExc_ValueError, err);
        return -1;
    }
    sr_status st = sr_open(&self->h, self->view.buf, size, pid);
    if (st == SR_NO_BLOCK) {
        PyErr_Format(PyExc_RuntimeError, "all %u participant slots of this sage queue are held by live handles",
                     SR_MAX_BLOCKS);
        return -1;
    }
    if (st != SR_OK) {
        PyErr_Format(PyExc_ValueError, "cannot attach to the sage ring (status %d)", (int)st);
        return -1;
    }
    self->opened = 1;
    return 0;
}

static void release_view(RingObject *self) {
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
}

/* Give the participant block back and release the view (once; GIL held, nothing in flight). */
static void detach(RingObject *self) {
    if (self->detached) return;
    self->detached = 1;
    if (self->opened) {
        Py_BEGIN_ALLOW_THREADS
        sr_detach(&self->h);
        Py_END_ALLOW_THREADS
    }
    release_view(self);
}

/* close() -> True if the handle let go of the segment now, False if an operation still in
 * flight (another thread's, or the caller's own under a signal handler) will when it ends. */
static PyObject *Ring_close(RingObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!self->closed) {
        self->closed = 1;
        if (self->opened) sr_close(&self->h); /* wakes waiters: they see the flag and leave */
    }
    if (self->in_flight == 0) detach(self);
    return PyBool_FromLong(self->detached);
}

static void Ring_dealloc(RingObject *self) {
    /* nothing can be in flight: every operation holds a reference to self */
    if (self->opened && !self->closed) {
        self->closed = 1;
        sr_close(&self->h);
    }
    if (self->opened && !self->detached) {
        self->detached = 1;
        sr_detach(&self->h);
    }
    release_view(self);
    Py_XDECREF(self->pending_type);
    Py_XDECREF(self->pending_value);
    Py_XDECREF(self->pending_tb);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Forget the handle without touching the shared block (a forked child's copy). */
static PyObject *Ring_abandon(RingObject *self, PyObject *Py_UNUSED(ignored)) {
    self->closed = 1;
    self->detached = 1;
    release_view(self);
    Py_RETURN_NONE;
}

/* destroy(): mark the queue destroyed for every handle (and close this one in the core);
 * QueueDestroyed if it was destroyed already. */
static PyObject *Ring_destroy(RingObject *self, PyObject *Py_UNUSED(ignored)) {
    if (self->closed || !self->opened) { /* a broken queue can still be destroyed */
        PyErr_SetString(QueueClosed, "sage queue handle is closed");
        return NULL;
    }
    if (sr_destroy(&self->h) == SR_DESTROYED) {
        PyErr_SetString(QueueDestroyed, "sage queue was destroyed already");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* An operation enters (checks the handle is open, counts itself in flight) and leaves
 * (the last one out of a closed handle detaches it).  GIL held for both. */
static int enter(RingObject *self) {
    if (check_open(self) < 0) return -1;
    self->in_flight++;
    return 0;
}

static void leave(RingObject *self) {
    if (--self->in_flight == 0 && self->closed) detach(self);
}

#define ENTER(self)                                  \
    do {                                             \
        if (enter(self) < 0) return NULL;            \
    } while (0)
#define LEAVE(self) leave(self)

/* The METH_FASTCALL methods take a fixed number of positional arguments. */
static int check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char *usage) {
    if (nargs == want) return 0;
    PyErr_SetString(PyExc_TypeError, usage);
    return -1;
}

/* A format-flag argument (put's flags, get's parts_flag). */
static int parse_flag(PyObject *obj, long *flag) {
    *flag = PyLong_AsLong(obj);
    return *flag == -1 && PyErr_Occurred() ? -1 : 0;
}

static int parse_max_items(PyObject *obj, Py_ssize_t *max_items) {
    *max_items = PyLong_AsSsize_t(obj);
    return *max_items == -1 && PyErr_Occurred() ? -1 : 0;
}

/* ---- puts ---------------------------------------------------------------------------- */

/* Copies the records of a held claim into the ring and commits each one. */
typedef void (*record_writer)(RingObject *self, sr_claim *c, const void *ctx);

/* Claim room for `put` and let `write` fill and commit it.  The handle counts as in flight
 * meanwhile, so close() waits for the copy before giving the participant block back.
 * Returns None, or NULL with the exception set; the caller owns (and releases) the data. */
static PyObject *put_claimed(RingObject *self, const put_request *put, int64_t timeout, record_writer write,
                             const void *ctx) {
    ENTER(self);
    sr_claim c;
    sr_status st = claim(self, put, timeout, &c);
    if (st == SR_OK) write(self, &c, ctx);
    PyObject *out = st == SR_OK ? Py_NewRef(Py_None) : raise_status(self, st, 1); /* before LEAVE may detach */
    LEAVE(self);
    return out;
}

/* Export a buffer of each item of `seq` (from *got on); *got counts the exports to release. */
static int get_buffers(PyObject *seq, Py_ssize_t n, Py_buffer *bufs, int buf_flags, Py_ssize_t *got) {
    for (; *got < n; ++*got) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, *got), &bufs[*got], buf_flags) < 0) return -1;
    }
    return 0;
}

/* Release the first `got` exports and the array (NULL allowed). */
static void release_buffers(Py_buffer *bufs, Py_ssize_t got) {
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&bufs[i]);
    PyMem_Free(bufs);
}

static void write_one(RingObject *self, sr_claim *c, const void *ctx) {
    const Py_buffer *b = ctx;
    uint64_t size = (uint64_t)b->len;
    copy_maybe_nogil(sr_put_record(&self->h, c, size), b->buf, (size_t)size);
    sr_put_commit_one(&self->h, c, size);
}

/* put(data, flags, timeout): one record holding the bytes of `data`. */
static PyObject *Ring_put(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long flags;
    int64_t timeout;
    if (check_nargs(nargs, 3, "put(data, flags, timeout)") < 0 || parse_flag(args[1], &flags) < 0 ||
        parse_timeout(args[2], &timeout) < 0)
        return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0) return NULL;
    uint64_t size = (uint64_t)b.len;
    put_request put = {&size, 1, (uint32_t)flags};
    PyObject *out = put_claimed(self, &put, timeout, write_one, &b);
    PyBuffer_Release(&b);
    return out;
}

/* The n parts of one multi-part record, `size` bytes with its table. */
typedef struct {
    Py_ssize_t n;
    Py_buffer *bufs;
    uint64_t size;
} parts_record;

static void write_parts(RingObject *self, sr_claim *c, const void *ctx) {
    const parts_record *p = ctx;
    uint8_t *dst = sr_put_record(&self->h, c, p->size);
    uint32_t hdr[2] = {(uint32_t)p->n, 0};
    memcpy(dst + PARTS_COUNT_OFFSET, hdr, PARTS_TABLE_OFFSET);
    uint64_t off = parts_data_offset((uint64_t)p->n);
    for (Py_ssize_t i = 0; i < p->n; i++) {
        uint64_t len = (uint64_t)p->bufs[i].len;
        memcpy(dst + PARTS_TABLE_OFFSET + 8 * (uint64_t)i, &len, 8);
        copy_maybe_nogil(dst + off, p->bufs[i].buf, (size_t)len);
        off += len;
    }
    sr_put_commit_one(&self->h, c, p->size);
}

/* put_parts(parts, flags, timeout): one record [u32 n][u32 0][u64 len]*n + parts (pickle 5
 * out-of-band: the main pickle then each buffer, each copied once into the ring). */
static PyObject *Ring_put_parts(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long flags;
    int64_t timeout;
    if (check_nargs(nargs, 3, "put_parts(parts, flags, timeout)") < 0 || parse_flag(args[1], &flags) < 0 ||
        parse_timeout(args[2], &timeout) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "parts must be a sequence");
    if (!seq) return NULL;
    parts_record rec = {PySequence_Fast_GET_SIZE(seq), NULL, 0};
    put_request put = {&rec.size, 1, (uint32_t)flags}; /* reads rec.size once it is summed */
    rec.bufs = PyMem_Calloc((size_t)rec.n + 1, sizeof(Py_buffer));
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    if (!rec.bufs) {
        PyErr_NoMemory();
        goto out;
    }
    if (get_buffers(seq, rec.n, rec.bufs, PyBUF_ANY_CONTIGUOUS, &got) < 0) goto out;
    rec.size = parts_data_offset((uint64_t)rec.n);
    for (Py_ssize_t i = 0; i < rec.n; i++) rec.size += (uint64_t)rec.bufs[i].len;
    result = put_claimed(self, &put, timeout, write_parts, &rec);
out:
    release_buffers(rec.bufs, got);
    Py_DECREF(seq);
    return result;
}

/* Records put in one contiguous claim (spec Q30); one allocation holds the three arrays,
 * freed with PyMem_Free(sizes). */
typedef struct {
    Py_ssize_t n;
    uint64_t *sizes;
    const void **srcs;
    uint8_t *flags; /* each record's own format flag (0..15) */
} put_batch;

static int batch_alloc(put_batch *b, Py_ssize_t n) {
    size_t count = (size_t)n + 1;
    uint8_t *mem = PyMem_Calloc(count, sizeof(uint64_t) + sizeof(void *) + 1);
    if (!mem) return -1;
    b->n = n;
    b->sizes = (uint64_t *)(void *)mem;
    b->srcs = (const void **)(void *)(mem + count * sizeof(uint64_t));
    b->flags = mem + count * (sizeof(uint64_t) + sizeof(void *));
    return 0;
}

static int check_batch_len(Py_ssize_t n) {
    if (n > 0 && (uint64_t)n <= SR_MAX_BATCH) return 0;
    PyErr_SetString(PyExc_ValueError, "a batch holds 1 to 16777215 items");
    return -1;
}

/* The claim's flag is per record: set it before each commit. */
static void write_batch(RingObject *self, sr_claim *c, const void *ctx) {
    const put_batch *b = ctx;
    for (Py_ssize_t i = 0; i < b->n; i++) {
        c->flags = b->flags[i];
        memcpy(sr_put_record(&self->h, c, b->sizes[i]), b->srcs[i], (size_t)b->sizes[i]);
        sr_put_commit_one(&self->h, c, b->sizes[i]);
    }
}

static PyObject *put_batch_claimed(RingObject *self, const put_batch *b, int64_t timeout) {
    put_request put = {b->sizes, (uint32_t)b->n, 0};
    return put_claimed(self, &put, timeout, write_batch, b);
}

/* put_many(datas, flags_bytes, timeout): len(datas) records in one contiguous claim. */
static PyObject *Ring_put_many(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t timeout;
    if (check_nargs(nargs, 3, "put_many(datas, flags, timeout)") < 0 || parse_timeout(args[2], &timeout) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "datas must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), got = 0;
    PyObject *result = NULL;
    Py_buffer fl = {0};
    int has_fl = 0;
    Py_buffer *bufs = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    put_batch b = {0};
    if (!bufs || batch_alloc(&b, n) < 0) {
        PyErr_NoMemory();
        goto out;
    }
    if (PyObject_GetBuffer(args[1], &fl, PyBUF_SIMPLE) < 0) goto out;
    has_fl = 1;
    if (fl.len != n) {
        PyErr_SetString(PyExc_ValueError, "one flag byte per item");
        goto out;
    }
    if (check_batch_len(n) < 0 || get_buffers(seq, n, bufs, PyBUF_SIMPLE, &got) < 0) goto out;
    for (Py_ssize_t i = 0; i < n; i++) {
        b.sizes[i] = (uint64_t)bufs[i].len;
        b.srcs[i] = bufs[i].buf;
        b.flags[i] = ((const uint8_t *)fl.buf)[i] & 0xf;
    }
    result = put_batch_claimed(self, &b, timeout);
out:
    release_buffers(bufs, got);
    if (has_fl) PyBuffer_Release(&fl);
    PyMem_Free(b.sizes);
    Py_DECREF(seq);
    return result;
}

/* Pickle every item of `seq` (protocol 5, in band) into datas[*got...]; bytes objects
 * travel raw.  *got counts the references datas holds. */
static int pickle_items(PyObject *seq, put_batch *b, PyObject **datas, Py_ssize_t *got) {
    PyObject *protocol = PyLong_FromLong(5);
    if (!protocol) return -1;
    for (; *got < b->n; ++*got) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, *got), *data;
        if (PyBytes_CheckExact(item)) {
            Py_INCREF(item);
            data = item;
            b->flags[*got] = FMT_BYTES;
        } else {
            PyObject *a[2] = {item, protocol};
            data = PyObject_Vectorcall(pickle_dumps, a, 2, NULL);
            if (!data) break;
            b->flags[*got] = FMT_PICKLE;
        }
        datas[*got] = data; /* keeps srcs[*got] alive */
        b->sizes[*got] = (uint64_t)PyBytes_GET_SIZE(data);
        b->srcs[*got] = PyBytes_AS_STRING(data);
    }
    Py_DECREF(protocol);
    return *got < b->n ? -1 : 0;
}

/* put_items(items, timeout): pickle every item (bytes objects travel raw) and put them
 * all in one contiguous claim (spec Q30: atomic, contiguous, in order).  A batch never
 * uses out-of-band buffers: each record is one in-band pickle. */
static PyObject *Ring_put_items(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t timeout;
    if (check_nargs(nargs, 2, "put_items(items, timeout)") < 0 || parse_timeout(args[1], &timeout) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "items must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), got = 0;
    PyObject *result = NULL;
    PyObject **datas = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    put_batch b = {0};
    if (!datas || batch_alloc(&b, n) < 0) {
        PyErr_NoMemory();
        goto out;
    }
    if (check_batch_len(n) < 0 || pickle_items(seq, &b, datas, &got) < 0) goto out;
    result = put_batch_claimed(self, &b, timeout);
out:
    for (Py_ssize_t i = 0; i < got; i++) Py_DECREF(datas[i]);
    PyMem_Free(datas);
    PyMem_Free(b.sizes);
    Py_DECREF(seq);
    return result;
}

/* ---- gets ---------------------------------------------------------------------------- */

/* A new bytes (the main pickle) or bytearray (an out-of-band buffer: the unpickler may
 * hand it out writable) holding a copy of `len` ring bytes. */
static PyObject *copy_part(int as_bytearray, const uint8_t *src, uint64_t len) {
    PyObject *part = as_bytearray ? PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)len)
                                  : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    if (part) copy_maybe_nogil(as_bytearray ? PyByteArray_AS_STRING(part) : PyBytes_AS_STRING(part), src, (size_t)len);
    return part;
}

/* (flags, bytes, [bytearray, ...]) from a multi-part record; its table is checked
 * against the record's length before anything is allocated or copied (a lying table
 * marks the queue broken and raises QueueBroken; it is never read past). */
static PyObject *take_parts(RingObject *self, const sr_claim *c) {
    const uint8_t *src = c->data;
    uint64_t n = c->data_len;
    uint32_t count;
    memcpy(&count, src + PARTS_COUNT_OFFSET, 4);
    uint64_t off = parts_data_offset(count); /* < 2^36: no overflow */
    if (count == 0 || off > n) goto corrupt;
    for (uint32_t i = 0; i < count; i++) { /* check the whole table first */
        uint64_t len;
        memcpy(&len, src + PARTS_TABLE_OFFSET + 8u * i, 8);
        if (len > n - off) goto corrupt;
        off += len;
    }
    PyObject *main = NULL, *list = PyList_New(count - 1);
    if (!list) return NULL;
    off = parts_data_offset(count);
    for (uint32_t i = 0; i < count; i++) {
        uint64_t len;
        memcpy(&len, src + PARTS_TABLE_OFFSET + 8u * i, 8);
        PyObject *part = copy_part(i > 0, src + off, len);
        if (!part) {
            Py_XDECREF(main);
            Py_DECREF(list);
            return NULL;
        }
        if (i == 0)
            main = part;
        else
            PyList_SET_ITEM(list, i - 1, part);
        off += len;
    }
    return Py_BuildValue("(kNN)", (unsigned long)c->flags, main, list);
corrupt:;
    char why[120];
    snprintf(why, sizeof why, "multi-part record at position %llu: its table of %u parts exceeds its %llu bytes",
             (unsigned long long)c->rec_pos, count, (unsigned long long)n);
    sr_mark_broken(&self->h, why);
    return raise_broken(self);
}

/* Copy a claimed record out: (flags, bytes) or, for multi-part records, (flags, bytes,
 * [bytearray, ...]).  Ends the claim in every case (a copy that fails loses the item). */
static PyObject *take_record(RingObject *self, sr_claim *c, int parts_flag) {
    PyObject *out = NULL;
    uint64_t n = c->data_len;
    if ((int)c->flags == parts_flag && n >= PARTS_TABLE_OFFSET) {
        out = take_parts(self, c);
        sr_get_end(&self->h, c);
        return out;
    }
    PyObject *data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (data) {
        if (n >= BIG_COPY) { /* copy and clear in one cached pass, without the GIL */
            char *dst = PyBytes_AS_STRING(data);
            Py_BEGIN_ALLOW_THREADS
            sr_copy_out_clear(c, dst);
            Py_END_ALLOW_THREADS
        } else {
            memcpy(PyBytes_AS_STRING(data), c->data, (size_t)n);
        }
        out = Py_BuildValue("(kN)", (unsigned long)c->flags, data);
    }
    sr_get_end(&self->h, c);
    return out;
}

/* Unpickle a FMT_PICKLE record straight from the ring through a memoryview (no
 * intermediate bytes object): the view is released before the claim ends, and pickle
 * copies whatever it keeps. */
static PyObject *loads_in_place(const sr_claim *c) {
    PyObject *view = PyMemoryView_FromMemory((char *)c->data, (Py_ssize_t)c->data_len, PyBUF_READ);
    if (!view) return NULL;
    PyObject *out = PyObject_CallOneArg(pickle_loads, view);
    if (Py_REFCNT(view) != 1) {
        /* something kept the view (or a buffer of it, which references it): the ring
         * memory would outlive the claim.  Never happens with the stdlib unpickler;
         * refuse rather than hand out memory about to be reused. */
        Py_CLEAR(out);
        PyObject *r = PyObject_CallMethod(view, "release", NULL);
        Py_XDECREF(r);
        PyErr_Clear();
        PyErr_SetString(PyExc_RuntimeError, "the unpickler kept a reference to the ring");
    }
    Py_DECREF(view);
    return out;
}

/* After an unpickling call of take_item returned NULL (the claim is ended: the item has
 * left the queue): count the item in stats `errors` if it raised an Exception, the item's
 * own fault (an error of its pickle, SAGE7).  A KeyboardInterrupt (or another
 * BaseException) is not counted, as in shm.  Returns NULL for the caller to return. */
static PyObject *undecodable(RingObject *self) {
    if (PyErr_ExceptionMatches(PyExc_Exception)) sr_note_error(&self->h);
    return NULL;
}

/* Decode a claimed record into the item itself, then end the claim.  `parts_flag` is
 * unused (items always mark multi-part records FMT_PARTS): it gives take_item the
 * signature of take_record so that both serve get_one/get_batch.  An item that fails to
 * decode is counted once (undecodable), here, whether get or get_many met it: the
 * error get_batch keeps for the next call (raise_pending) is not counted again. */
static PyObject *take_item(RingObject *self, sr_claim *c, int parts_flag) {
    (void)parts_flag;
    if (c->flags == FMT_PICKLE) {
        PyObject *out = loads_in_place(c);
        sr_get_end(&self->h, c);
        return out ? out : undecodable(self);
    }
    PyObject *rec = take_record(self, c, FMT_PARTS);
    if (!rec) return NULL;
    PyObject *out;
    if (c->flags == FMT_PARTS) {
        PyObject *args[2] = {PyTuple_GET_ITEM(rec, 1), PyTuple_GET_ITEM(rec, 2)};
        PyObject *kwnames = PyTuple_Pack(1, str_buffers);
        out = kwnames ? PyObject_Vectorcall(pickle_loads, args, 1, kwnames) : NULL;
        Py_XDECREF(kwnames);
        if (!out) undecodable(self);
    } else {
        out = PyTuple_GET_ITEM(rec, 1);
        Py_INCREF(out);
    }
    Py_DECREF(rec);
    return out;
}

/* take_item or take_record: takes a claimed record out and ends the claim. */
typedef PyObject *(*record_taker)(RingObject *self, sr_claim *c, int parts_flag);

/* get_many keeps the error of an item that failed to decode after good ones (see
 * get_batch); the next get-type call of this handle raises it (and returns nothing else). */
static int raise_pending(RingObject *self) {
    if (!self->pending_type) return 0;
    PyErr_Restore(self->pending_type, self->pending_value, self->pending_tb);
    self->pending_type = self->pending_value = self->pending_tb = NULL;
    return -1;
}

static PyObject *get_one(RingObject *self, int64_t timeout, record_taker take, int parts_flag) {
    ENTER(self);
    PyObject *out = NULL;
    if (raise_pending(self) == 0) {
        sr_claim c;
        sr_status st = claim(self, NULL, timeout, &c);
        out = st == SR_OK ? take(self, &c, parts_flag) : raise_status(self, st, 0);
    }
    LEAVE(self);
    return out;
}

/* Wait for one record, then take what is there without waiting, up to max_items.  An item
 * that fails to decode is the only one lost: if good items were taken before it, they are
 * returned and its error is kept for the next get-type call (raise_pending); if it is the
 * first, its error is raised now. */
static PyObject *get_batch(RingObject *self, Py_ssize_t max_items, int64_t timeout, record_taker take,
                           int parts_flag) {
    if (max_items < 1) {
        PyErr_SetString(PyExc_ValueError, "max_items must be >= 1");
        return NULL;
    }
    ENTER(self);
    if (raise_pending(self) < 0) {
        LEAVE(self);
        return NULL;
    }
    PyObject *list = PyList_New(0);
    sr_claim c;
    sr_status st = list ? claim(self, NULL, timeout, &c) : SR_INVALID;
    if (st != SR_OK) {
        PyObject *out = list ? raise_status(self, st, 0) : NULL;
        Py_XDECREF(list);
        LEAVE(self);
        return out;
    }
    for (Py_ssize_t i = 0;; i++) {
        PyObject *rec = take(self, &c, parts_flag); /* ends the claim whatever happens */
        if (!rec || PyList_Append(list, rec) < 0) {
            Py_XDECREF(rec);
            if (i == 0) {
                Py_CLEAR(list);
            } else {
                PyErr_Fetch(&self->pending_type, &self->pending_value, &self->pending_tb);
            }
            break;
        }
        Py_DECREF(rec);
        /* no waiting, and no waiting for a claim entry either: the GIL is held */
        if (i + 1 >= max_items || sr_get_try(&self->h, &c) != SR_OK) break;
    }
    LEAVE(self);
    return list;
}

/* get_item(timeout) -> the oldest item, decoded */
static PyObject *Ring_get_item(RingObject *self, PyObject *arg) {
    int64_t timeout;
    if (parse_timeout(arg, &timeout) < 0) return NULL;
    return get_one(self, timeout, take_item, FMT_PARTS);
}

/* get_items(max_items, timeout) -> [item, ...]: wait for one, then take what is there. */
static PyObject *Ring_get_items(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t max_items;
    int64_t timeout;
    if (check_nargs(nargs, 2, "get_items(max_items, timeout)") < 0 || parse_max_items(args[0], &max_items) < 0 ||
        parse_timeout(args[1], &timeout) < 0)
        return NULL;
    return get_batch(self, max_items, timeout, take_item, FMT_PARTS);
}

/* get(timeout, parts_flag) -> (flags, bytes) | (flags, bytes, [bytearray]) */
static PyObject *Ring_get(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t timeout;
    long parts_flag;
    if (check_nargs(nargs, 2, "get(timeout, parts_flag)") < 0 || parse_timeout(args[0], &timeout) < 0 ||
        parse_flag(args[1], &parts_flag) < 0)
        return NULL;
    return get_one(self, timeout, take_record, (int)parts_flag);
}

/* The depth, or -1 with QueueBroken set (and the queue marked) if the cursors are corrupt. */
static int depth_or_broken(RingObject *self, uint64_t *depth) {
    if (sr_depth(&self->h, depth) == SR_OK) return 0;
    sr_mark_broken(&self->h, "the head cursor is ahead of the tail cursor, or counts more items than fit between them");
    raise_broken(self);
    return -1;
}

static PyObject *Ring_depth(RingObject *self, PyObject *Py_UNUSED(ignored)) {
    uint64_t depth;
    if (check_open(self) < 0 || depth_or_broken(self, &depth) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(depth);
}

static PyObject *Ring_stats(RingObject *self, PyObject *Py_UNUSED(ignored)) {
    uint64_t depth;
    if (check_open(self) < 0 || depth_or_broken(self, &depth) < 0) return NULL;
    sr_stats s;
    sr_read_stats(&self->h, &s);
    uint64_t v[STAT_COUNT];
    v[STAT_PUTS] = s.puts;
    v[STAT_GETS] = s.gets;
    v[STAT_BYTES_IN] = s.bytes_in;
    v[STAT_BYTES_OUT] = s.bytes_out;
    v[STAT_WAITS] = s.waits;
    v[STAT_ABANDONED] = s.abandoned;
    v[STAT_DEPTH] = depth;
    v[STAT_CAPACITY] = self->h.capacity;
    v[STAT_ERRORS] = s.errors;
    PyObject *out = PyTuple_New(STAT_COUNT);
    for (int i = 0; out && i < STAT_COUNT; i++) {
        PyObject *x = PyLong_FromUnsignedLongLong(v[i]);
        if (!x) {
            Py_CLEAR(out);
            break;
        }
        PyTuple_SET_ITEM(out, i, x);
    }
    return out;
}

static PyObject *Ring_set_grace(RingObject *self, PyObject *arg) {
    double s = PyFloat_AsDouble(arg);
    if (s == -1.0 && PyErr_Occurred()) return NULL;
    self->h.grace_ns = (uint64_t)(s * 1e9);
    Py_RETURN_NONE;
}

static PyMethodDef Ring_methods[] = {
    {"put", (PyCFunction)(void (*)(void))Ring_put, METH_FASTCALL, "put(data, flags, timeout)"},
    {"put_parts", (PyCFunction)(void (*)(void))Ring_put_parts, METH_FASTCALL, "put_parts(parts, flags, timeout)"},
    {"put_many", (PyCFunction)(void (*)(void))Ring_put_many, METH_FASTCALL, "put_many(datas, flags, timeout)"},
    {"get", (PyCFunction)(void (*)(void))Ring_get, METH_FASTCALL, "get(timeout, parts_flag)"},
    {"put_items", (PyCFunction)(void (*)(void))Ring_put_items, METH_FASTCALL, "put_items(items, timeout)"},
    {"get_item", (PyCFunction)Ring_get_item, METH_O, "get_item(timeout) -> the oldest item, decoded"},
    {"get_items", (PyCFunction)(void (*)(void))Ring_get_items, METH_FASTCALL,
     "get_items(max_items, timeout) -> [items]"},
    {"depth", (PyCFunction)Ring_depth, METH_NOARGS, "items in the queue"},
    {"stats", (PyCFunction)Ring_stats, METH_NOARGS,
     "(puts, gets, bytes_in, bytes_out, waits, abandoned, depth, capacity, errors)"},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "close this handle (idempotent)"},
    {"abandon", (PyCFunction)Ring_abandon, METH_NOARGS, "drop a forked copy without touching shared state"},
    {"destroy", (PyCFunction)Ring_destroy, METH_NOARGS, "mark the queue destroyed for every handle"},
    {"set_grace", (PyCFunction)Ring_set_grace, METH_O, "seconds a stalled claim waits before its owner is checked"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sage_queue._sage_core.Ring",
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_doc = "A handle on a sage ring mapped by the caller (see sagering.h).",
};

/* ---- module-level helpers ---------------------------------------------------------------- */

static PyObject *mod_segment_size(PyObject *m, PyObject *arg) {
    (void)m;
    unsigned long long cap = PyLong_AsUnsignedLongLong(arg);
    if (cap == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    return PyLong_FromUnsignedLongLong(sr_segment_size(cap));
}

static PyObject *mod_round_capacity(PyObject *m, PyObject *arg) {
    (void)m;
    unsigned long long cap = PyLong_AsUnsignedLongLong(arg);
    if (cap == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    return PyLong_FromUnsignedLongLong(sr_round_capacity(cap));
}

/* inspect(buffer) -> dict: what `sage-queue ls` shows, read without attaching. */
static PyObject *mod_inspect(PyObject *m, PyObject *arg) {
    (void)m;
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    char err[200] = "";
    PyObject *out = NULL;
    if (sr_validate(b.buf, (uint64_t)b.len, err, sizeof err) != SR_OK) {
        /* magic 0: a creator has not finished sr_init() yet (attachers wait for it);
         * anything else is not a ring of this version (attachers give up at once) */
        uint64_t magic = atomic_load_explicit(&((sr_header *)b.buf)->config.magic, memory_order_acquire);
        out = Py_BuildValue("{s:s,s:O}", "error", err, "initialising",
                            b.len >= (Py_ssize_t)sizeof(sr_config) && magic == 0 ? Py_True : Py_False);
    } else {
        const sr_header *hdr = b.buf;
        uint32_t pids[SR_MAX_BLOCKS];
        uint32_t n = sr_attached_pids(b.buf, pids, SR_MAX_BLOCKS);
        PyObject *plist = PyTuple_New(n);
        for (uint32_t i = 0; plist && i < n; i++) PyTuple_SET_ITEM(plist, i, PyLong_FromUnsignedLong(pids[i]));
        sr_handle tmp;
        memset(&tmp, 0, sizeof tmp);
        tmp.hdr = (sr_header *)b.buf;
        uint64_t depth = 0;
        /* read only: a corrupt pair of cursors gives depth None, and marks nothing */
        PyObject *pydepth = sr_depth(&tmp, &depth) == SR_OK ? PyLong_FromUnsignedLongLong(depth) : Py_NewRef(Py_None);
        out = Py_BuildValue("{s:K,s:K,s:N,s:I,s:I,s:i,s:i,s:N}", "capacity", (unsigned long long)hdr->config.capacity,
                            "maxsize", (unsigned long long)hdr->config.maxsize, "depth", pydepth,
                            "creator_pid", hdr->config.creator_pid, "version", hdr->config.version, "destroyed",
                            (int)atomic_load(&((sr_header *)b.buf)->config.destroyed), "broken",
                            (int)atomic_load(&((sr_header *)b.buf)->config.broken), "pids", plist);
    }
    PyBuffer_Release(&b);
    return out;
}

static PyMethodDef module_methods[] = {
    {"segment_size", mod_segment_size, METH_O, "segment bytes for a ring of this capacity"},
    {"round_capacity", mod_round_capacity, METH_O, "the capacity a ring will really use"},
    {"inspect", mod_inspect, METH_O, "header summary of a mapped segment"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_sage_core", "C11 core of the sage backend (see sagering.h)", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sage_core(void) {
    PyObject *queue = PyImport_ImportModule("queue");
    if (!queue) return NULL;
    Full = PyObject_GetAttrString(queue, "Full");
    Empty = PyObject_GetAttrString(queue, "Empty");
    Py_DECREF(queue);
    PyObject *errors = PyImport_ImportModule("sage_queue.errors");
    if (!errors) return NULL;
    QueueClosed = PyObject_GetAttrString(errors, "QueueClosed");
    QueueDestroyed = PyObject_GetAttrString(errors, "QueueDestroyed");
    QueueBroken = PyObject_GetAttrString(errors, "QueueBroken");
    Py_DECREF(errors);
    if (!Full || !Empty || !QueueClosed || !QueueDestroyed || !QueueBroken) return NULL;
    PyObject *pickle = PyImport_ImportModule("pickle");
    if (!pickle) return NULL;
    pickle_loads = PyObject_GetAttrString(pickle, "loads");
    pickle_dumps = PyObject_GetAttrString(pickle, "dumps");
    Py_DECREF(pickle);
    str_buffers = PyUnicode_InternFromString("buffers");
    if (!pickle_loads || !pickle_dumps || !str_buffers) return NULL;
    if (PyType_Ready(&RingType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) return NULL;
    PyModule_AddIntConstant(m, "DATA_OFFSET", SR_DATA_OFFSET);
    PyModule_AddIntConstant(m, "MIN_CAPACITY", SR_MIN_CAPACITY);
    PyModule_AddIntConstant(m, "MAX_BLOCKS", SR_MAX_BLOCKS);
    PyModule_AddObject(m, "MAX_CAPACITY", PyLong_FromUnsignedLongLong(SR_MAX_CAPACITY));
    PyModule_AddIntConstant(m, "BLOCK_ENTRIES", SR_BLOCK_ENTRIES);
    /* record format flags: the one definition sage.py uses */
    PyModule_AddIntConstant(m, "FLAG_PICKLE", FMT_PICKLE);
    PyModule_AddIntConstant(m, "FLAG_BYTES", FMT_BYTES);
    PyModule_AddIntConstant(m, "FLAG_PARTS", FMT_PARTS);
    PyModule_AddIntConstant(m, "FLAG_RAW", FMT_RAW);
    /* segment offsets, for tests that corrupt a segment on purpose */
    PyModule_AddIntConstant(m, "TAIL_OFFSET", SR_TAIL_OFFSET);
    PyModule_AddIntConstant(m, "HEAD_OFFSET", SR_HEAD_OFFSET);
    PyModule_AddIntConstant(m, "FREE_OFFSET", SR_FREE_OFFSET);
    PyModule_AddIntConstant(m, "BLOCKS_OFFSET", SR_BLOCKS_OFFSET);
    PyModule_AddIntConstant(m, "BLOCK_SIZE", SR_BLOCK_SIZE);
    PyModule_AddIntConstant(m, "LINE", SR_LINE);
    return m;
}
