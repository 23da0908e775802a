"""The ``shm`` handle: attach, the put/get protocol, waiting, close and destroy.

Two-lock queue (layout in ``layout.py``, locks in ``locks.py``). ``tail`` and ``head``
are byte offsets in the ring; the item count is ``puts - gets`` (mod 2**32), and the used
bytes are ``tail - head`` (mod capacity), or the whole ring when that is 0 and the count
is not. Each side owns one 8-byte commit word and publishes a whole operation with one
aligned store of it (``layout.commit_word``):

* a producer (holding the producer lock) reads the C word, writes its records into
  free space, then stores the new P word (the commit);
* a consumer (holding the consumer lock) reads the P word, copies its records out,
  then stores the new C word (the commit); only then may producers reuse the bytes.

Crash consistency follows: a process killed before its commit store leaves the queue
exactly as it was (what it wrote is free space nobody reads); killed after it, the
operation is complete. Statistics are bumped after the commit and may miss the one
operation of a killed process. Reading the other side's word without its lock is safe
because it only ever moves forward, and a stale value is conservative (less data seen,
less room seen); that needs x86 TSO, elsewhere both sides share one lock (locks.py).

Nothing read from the segment is trusted to be in range (spec/segments.md SEG7): every
locked section checks the two commit words against the layout invariants, and a get
checks every record length against the used bytes left, before using them. A failed
check sets the BROKEN state bit (under the lock held, so it never races destroy(), which
holds both) and raises QueueBroken; every handle's next operation sees the bit. Loops
over shared state are bounded by the checked count.

Sleeping: a waiter that found no item (room) under its lock keeps the other side's
commit word it read there, polls that word briefly (SPIN_POLLS reads: a busy peer usually
commits within microseconds, which saves both sides a system call), then announces
itself under its lock (waiter count + 1, and the count half of that word as the *sleep
epoch*), unlocks, re-reads the word and, if unchanged, sleeps in ``FUTEX_WAIT`` on its
count half (the kernel returns at once if it moved). It withdraws the announcement in
its next locked section. The other side commits, unlocks (a system call: a full
barrier), then reads the waiter count, and calls ``FUTEX_WAKE`` (all) if it is not 0 and
the sleep epoch differs from the last epoch woken, which it records. So either the
waiter sees the commit or the waker sees the waiter, and a busy producer pays one
wake-up call per sleep of its consumer, not one per item. Sleeps are capped at
WAIT_SLICE_S: a waiter re-checks closed/destroyed/broken and survives a waker killed
between commit and wake. Without futex (not Linux) a waiter polls the word with a
backoff growing to BACKOFF_MAX_S.

Hooks (the front, sage_queue/stub.py, owns argument checks, timeouts and close):
``_check_open`` adds the state word (destroyed, broken) to the front's closed check;
``_put``/``_get`` hold the one-record fast path (one locked attempt, nothing to wait
for) and fall back to ``_put_records``/``_take``, the general protocol (batches, wraps,
waiting), which ``_put_many``/``_get_many`` call directly. Every commit word is built
by ``layout.commit_word``.

Threads: threads sharing one handle share its descriptor, hence its kernel locks, so a
``threading.Lock`` per side and handle is taken first (lock order everywhere:
``_process_lock`` -> thread locks -> kernel locks). A thread lock is also what keeps
``close()`` from unmapping the buffer under an operation: every access to the mapping
happens with a thread lock held, or tolerates the ValueError of a closed mmap.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import queue
import secrets
import threading
import time
import weakref
from typing import Any, ClassVar, NoReturn, Optional

from ... import _segment
from ..._segment import Segment, pid_alive
from ..._timeout import Deadline
from ...descriptor import QueueDescriptor
from ...errors import IncompatibleQueue, QueueBroken, QueueClosed, QueueDestroyed, QueueNotFound
from ...protocol import BATCH, CLOSE, CROSS_PROCESS, PICKLABLE_HANDLE, STATS, QueueStats
from ...stub import CLOSE_WAKEUP_S, QueueStub
from .futex import FUTEX, WAKE_ALL
from .layout import (
    BROKEN,
    C_WORD_OFFSET,
    CAPACITY_OFFSET,
    DATA_OFFSET,
    DESTROYED,
    FIXED,
    GET_ERRORS_OFFSET,
    GET_SEQ_OFFSET,
    GET_SLEEP_EPOCH_OFFSET,
    GET_STATS_OFFSET,
    GET_WAITERS_OFFSET,
    GET_WOKEN_OFFSET,
    INSTANCE_OFFSET,
    LAYOUT_VERSION,
    MAGIC,
    MAGIC_OFFSET,
    MASK32,
    MAXSIZE_OFFSET,
    P_WORD_OFFSET,
    PID_OVERFLOW_OFFSET,
    PID_TABLE_OFFSET,
    PIDS,
    PUT_SEQ_OFFSET,
    PUT_SLEEP_EPOCH_OFFSET,
    PUT_STATS_OFFSET,
    PUT_WAITERS_OFFSET,
    PUT_WOKEN_OFFSET,
    RECORD_HEADER,
    SEGMENT_KIND,
    STATE_OFFSET,
    STATS3,
    U32,
    U64,
    WAITS_IN_STATS,
    commit_word,
    record_size,
    store32,
    store64,
    validate,
)
from .locks import CONSUMER, OFD, PRODUCER, SIDE_LOCKS, TWO_LOCKS, lock_path, os_lock, os_unlock

__all__ = ["SharedMemoryQueueStub"]

WAIT_SLICE_S = 0.25
"""Longest single sleep: bounds the reaction to close/destroy and to a waker killed before waking."""
SPIN_POLLS = 50
"""Reads of the other side's commit word before announcing a sleep (a few microseconds)."""
BACKOFF_MIN_S = 50e-6
BACKOFF_MAX_S = 0.005
"""Polling backoff where there is no futex."""
_ATTACH_RETRIES = 5
_INIT_WAIT_S = 2.0
"""How long an attacher waits for a concurrent creator to write the magic word."""
_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
# Bound once: hot paths call these without an attribute lookup.
_unpack_u32 = U32.unpack_from
_unpack_u64 = U64.unpack_from
_pack_u64_into = U64.pack_into


# -- per-process bookkeeping --------------------------------------------------------------

_process_lock = threading.Lock()
_registrations: dict[tuple[str, int], int] = {}
"""(name, instance) -> open handles in this process; our pid is in the table while > 0."""
_open_handles: weakref.WeakSet[SharedMemoryQueueStub] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child shares the parent's lock descriptors (one open file description): were the
    # parent killed holding a lock, our copy would keep it held. Reopen, and record our pid.
    global _process_lock
    _process_lock = threading.Lock()
    _registrations.clear()
    for handle in list(_open_handles):
        handle._reopen_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Retry(Exception):
    """The segment vanished or was replaced while attaching."""


def _thread_locks() -> tuple[threading.Lock, threading.Lock]:
    return (threading.Lock(), threading.Lock()) if TWO_LOCKS else (threading.Lock(),) * 2


class SharedMemoryQueueStub(QueueStub):
    """A handle on a named shared-memory queue (see the module docstring and spec/backends/shm.md)."""

    queue_type: ClassVar[str] = "shm"
    capabilities: ClassVar[frozenset[str]] = frozenset({CROSS_PROCESS, PICKLABLE_HANDLE, CLOSE, BATCH, STATS})

    def __init__(self, descriptor: QueueDescriptor) -> None:
        super().__init__(descriptor)
        meta = descriptor.metadata
        self._name: str = meta["shm_name"]
        self._want_maxsize: int = meta["maxsize"]
        self._want_capacity: int = (meta["capacity_bytes"] + 7) & ~7
        self._thread_locks = _thread_locks()
        self._lock_fd = -1
        self._segment: Optional[Segment] = None
        self._gone = False
        """True once this handle saw (or did) destroy(): later calls raise QueueDestroyed."""
        for _ in range(_ATTACH_RETRIES):
            try:
                self._attach(create=bool(meta["create"]))
                break
            except _Retry:
                continue
        else:
            raise QueueNotFound(f"shm queue {self._name!r} kept disappearing while attaching (destroyed concurrently)")
        _open_handles.add(self)

    # -- attach -----------------------------------------------------------------------

    def _attach(self, create: bool) -> None:
        seg = Segment.open(SEGMENT_KIND, self._name, DATA_OFFSET + self._want_capacity, create=create)
        try:
            if seg.created:
                self._initialise(seg)
            else:
                self._wait_initialised(seg)
            validate(seg.buf, seg.size, self._name, self._want_capacity, self._want_maxsize)
            if U32.unpack_from(seg.buf, STATE_OFFSET)[0] & DESTROYED:
                raise _Retry
            instance = U64.unpack_from(seg.buf, INSTANCE_OFFSET)[0]
            lock_fd = self._open_lock_fd(seg.file_id)
        except BaseException:
            # A segment we created but never marked usable is ours alone: do not leave it behind.
            abandoned = seg.created and seg.buf[MAGIC_OFFSET : MAGIC_OFFSET + 8] != MAGIC
            seg.close()
            if abandoned:
                seg.unlink()
            raise
        self._segment = seg
        self._buf = seg.buf
        self._lock_fd = lock_fd
        self._file_id = seg.file_id
        self._instance = instance
        # Cached once, checked against the descriptor in _check_layout: later writes to the
        # header's copies cannot change the bounds this handle enforces.
        self._capacity: int = U64.unpack_from(seg.buf, CAPACITY_OFFSET)[0]
        self._maxsize_bound: int = U64.unpack_from(seg.buf, MAXSIZE_OFFSET)[0]
        base = ctypes.c_char.from_buffer(seg.buf)
        self._base_address = ctypes.addressof(base)
        del base  # keep the address only: a live export would make mmap.close() fail
        self._register_pid()

    def _initialise(self, seg: Segment) -> None:
        # The segment is zero-filled by ftruncate (both commit words 0 = empty); write the
        # fixed fields, then the magic last: attachers use the segment only once it is set.
        FIXED.pack_into(
            seg.buf,
            0,
            b"\0" * 8,
            LAYOUT_VERSION,
            DATA_OFFSET,
            self._want_capacity,
            self._want_maxsize,
            secrets.randbits(64),
            os.getpid(),
            0,
        )
        if not OFD:
            os.close(os.open(lock_path(self._name), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        seg.buf[MAGIC_OFFSET : MAGIC_OFFSET + 8] = MAGIC

    def _wait_initialised(self, seg: Segment) -> None:
        deadline = time.monotonic() + _INIT_WAIT_S
        while seg.size >= DATA_OFFSET and seg.buf[MAGIC_OFFSET : MAGIC_OFFSET + 8] == b"\0" * 8:
            if time.monotonic() >= deadline:
                raise IncompatibleQueue(
                    f"shm queue {self._name!r} exists but its creator never finished initialising it "
                    "(creator died?); `sage-queue gc` removes it"
                )
            time.sleep(0.001)

    def _open_lock_fd(self, file_id: tuple[int, int]) -> int:
        """Open this handle's own descriptor for the locks (refused like the segment: SEG1)."""
        try:
            fd = _segment.open_trusted(lock_path(self._name), SEGMENT_KIND, self._name)
        except FileNotFoundError:
            raise _Retry from None
        if OFD:
            # The name may have been destroyed and re-created between mapping and opening:
            # make sure the file we lock is the segment we mapped.
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != file_id:
                os.close(fd)
                raise _Retry
        return fd

    def _reopen_after_fork(self) -> None:
        if self._closed or self._lock_fd < 0:
            return
        self._thread_locks = _thread_locks()
        old, self._lock_fd = self._lock_fd, -1
        os.close(old)
        try:
            self._lock_fd = self._open_lock_fd(self._file_id)
        except (OSError, _Retry):  # destroyed (or replaced) meanwhile: unusable in the child
            self._closed = True
            return
        self._register_pid()

    # -- state: closed, destroyed, broken --------------------------------------------------

    def _check_open(self) -> None:
        """The front's closed check, then the queue's state word (destroyed, broken).

        Run by the front before every operation. A handle that finds its queue destroyed
        closes itself (its mapping is of an unlinked file: nothing more to do with it) and
        raises QueueDestroyed, now and on every later call (E13).
        """
        if self._closed:
            if self._gone:
                raise self._closed_error()
            super()._check_open()
        try:
            state = _unpack_u32(self._buf, STATE_OFFSET)[0]
        except ValueError:  # unmapped by a close() in another thread since the check above
            super()._check_open()
            raise
        if state:
            if state & DESTROYED:
                self._gone = True
                self.close()
            self._raise_state(state)

    def _raise_state(self, state: int) -> NoReturn:
        if state & DESTROYED:
            self._gone = True
            raise QueueDestroyed(f"shm queue {self._name!r} was destroyed")
        raise QueueBroken(
            f"shm queue {self._name!r} is broken: its shared state failed a consistency check "
            "(corrupt or hostile segment); destroy it and create a new one"
        )

    def _break(self, why: str) -> NoReturn:
        """With a side lock held: mark the queue broken for every handle, raise QueueBroken.

        Under a lock because destroy() sets its bit holding both: the two read-modify-writes
        of the state word never interleave.
        """
        buf = self._buf
        store32(buf, STATE_OFFSET, U32.unpack_from(buf, STATE_OFFSET)[0] | BROKEN)
        self._wake(PUT_SEQ_OFFSET, WAKE_ALL)
        self._wake(GET_SEQ_OFFSET, WAKE_ALL)
        raise QueueBroken(f"shm queue {self._name!r} is broken: {why}")

    def _closed_error(self) -> QueueClosed:
        if self._gone:  # closed because the queue was destroyed (E13)
            return QueueDestroyed(f"shm queue {self._name!r} was destroyed")
        return QueueClosed(f"shm queue handle {self._name!r} is closed")

    def _closed_in_operation(self, thread_lock: threading.Lock) -> QueueClosed:
        """An operation holding ``thread_lock`` found the handle closed: finish a close()
        that could not release the resources (see _release_resources), then report it."""
        thread_lock.release()
        try:
            self._release_resources()
        finally:
            thread_lock.acquire()  # the caller's ``finally`` releases it
        return self._closed_error()

    # -- locking (the slow paths; hot paths inline the same calls) -------------------------

    def _acquire(self, side: int) -> None:
        """Take ``side``'s thread lock then its kernel lock; raise QueueClosed if closed."""
        lock = self._thread_locks[side]
        lock.acquire()
        try:
            if self._closed:  # close() may have released the descriptor and the mapping
                raise self._closed_error()
            os_lock(self._lock_fd, side)
        except BaseException:
            lock.release()
            raise

    def _release(self, side: int) -> None:
        try:
            os_unlock(self._lock_fd, side)
        finally:
            self._thread_locks[side].release()

    # -- pid table (under the producer lock) -----------------------------------------------

    def _register_pid(self) -> None:
        key = (self._name, self._instance)
        with _process_lock:
            count = _registrations.get(key, 0)
            _registrations[key] = count + 1
            if count:
                return
            self._acquire(PRODUCER)
            try:
                self._write_pid_slot(os.getpid())
            finally:
                self._release(PRODUCER)

    def _write_pid_slot(self, pid: int) -> None:
        pids = PIDS.unpack_from(self._buf, PID_TABLE_OFFSET)
        if pid in pids:
            return
        free = [i for i, p in enumerate(pids) if p == 0] or [i for i, p in enumerate(pids) if not pid_alive(p)]
        if free:
            store32(self._buf, PID_TABLE_OFFSET + 4 * free[0], pid)
        else:
            store32(self._buf, PID_OVERFLOW_OFFSET, 1)

    def _clear_pid_slot(self) -> None:
        pid = os.getpid()
        for i, p in enumerate(PIDS.unpack_from(self._buf, PID_TABLE_OFFSET)):
            if p == pid:
                store32(self._buf, PID_TABLE_OFFSET + 4 * i, 0)

    # -- waiting -----------------------------------------------------------------------

    def _wait(self, side: int, deadline: Deadline, seen: int) -> bool:
        """Called without locks after ``side`` found no room/item: return when worth retrying.

        Polls the other side's commit word briefly, then announces itself (waiter count,
        and the other side's count it saw as the sleep epoch) and sleeps on that word (see
        "Sleeping" in the module docstring). Returns True if it announced itself: the caller
        withdraws the announcement in its next locked section (saving a lock round trip).
        """
        buf = self._buf
        other_word = C_WORD_OFFSET if side == PRODUCER else P_WORD_OFFSET
        seq_offset, waiters_offset, epoch_offset, stats_offset = (
            (GET_SEQ_OFFSET, PUT_WAITERS_OFFSET, PUT_SLEEP_EPOCH_OFFSET, PUT_STATS_OFFSET)
            if side == PRODUCER
            else (PUT_SEQ_OFFSET, GET_WAITERS_OFFSET, GET_SLEEP_EPOCH_OFFSET, GET_STATS_OFFSET)
        )
        unpack_from = U64.unpack_from
        # ``seen`` is the other side's word as the caller read it under its lock when it found
        # no item/room; a word read later could already include the commit we wait for, and
        # sleeping on it would miss that commit's wake-up.
        try:
            for _ in range(SPIN_POLLS):
                if unpack_from(buf, other_word)[0] != seen:
                    return False
        except ValueError:  # another thread closed the handle (unmapped): the caller raises QueueClosed
            return False
        if deadline.expired():
            return False
        self._acquire(side)
        try:
            state = U32.unpack_from(buf, STATE_OFFSET)[0]
            if state:
                self._raise_state(state)
            store32(buf, waiters_offset, U32.unpack_from(buf, waiters_offset)[0] + 1)
            store32(buf, epoch_offset, seen >> 32)
            waits = stats_offset + WAITS_IN_STATS
            store64(buf, waits, U64.unpack_from(buf, waits)[0] + 1)
        finally:
            self._release(side)  # a system call: the announcement is visible before the read below
        try:
            if unpack_from(buf, other_word)[0] == seen:  # nothing committed since we looked
                self._sleep(seq_offset, seen >> 32, deadline)
        except ValueError:  # closed under us (see above)
            pass
        return True

    def _withdraw(self, waiters_offset: int) -> None:
        """Under the side's lock: undo one announcement of ``_wait``."""
        store32(self._buf, waiters_offset, max(0, U32.unpack_from(self._buf, waiters_offset)[0] - 1))

    def _wake_sleepers(self, waiters_offset: int, epoch_offset: int, woken_offset: int, seq_offset: int) -> None:
        """After our commit and unlock: wake the other side's sleepers, once per sleep epoch.

        Sleepers announced since the last wake carry a new epoch (the count they saw); a
        wake for an epoch already woken would find them awake already, so it is skipped:
        a busy producer does not pay a system call per item while its consumer wakes up.
        """
        buf = self._buf
        if U32.unpack_from(buf, waiters_offset)[0]:
            # The woken word is u64 ``1 << 32 | epoch``, so its initial 0 matches no epoch.
            woken = 1 << 32 | U32.unpack_from(buf, epoch_offset)[0]
            if woken != U64.unpack_from(buf, woken_offset)[0]:
                store64(buf, woken_offset, woken)
                self._wake(seq_offset, WAKE_ALL)

    def _sleep(self, seq_offset: int, seen: int, deadline: Deadline) -> None:
        """Sleep until the word at ``seq_offset`` moves from ``seen``, WAIT_SLICE_S passes or the deadline."""
        remaining = deadline.remaining()
        slice_s = WAIT_SLICE_S if remaining is None else min(WAIT_SLICE_S, remaining)
        if slice_s <= 0:
            return
        if FUTEX is not None:
            FUTEX.wait(self._base_address + seq_offset, seen, slice_s)
            return
        end = time.monotonic() + slice_s
        pause = BACKOFF_MIN_S
        while time.monotonic() < end:
            if self._closed or U32.unpack_from(self._buf, seq_offset)[0] != seen:  # ValueError if unmapped
                return
            time.sleep(pause)
            pause = min(pause * 2, BACKOFF_MAX_S)

    def _wake(self, seq_offset: int, count: int) -> None:
        if FUTEX is not None:
            FUTEX.wake(self._base_address + seq_offset, count)

    # -- hooks: put ----------------------------------------------------------------------

    def _put(self, item: Any, timeout: Optional[float]) -> None:
        """One item, pickled outside any lock (its errors change nothing, Q18).

        The hook holds the fast path: one locked attempt at one record that fits without
        wrapping, no waiting (see _get). Anything else goes to ``_put_records``, the
        general protocol. The checks are _put_records' (SHM15), written out once more for
        speed: keep them in step.
        """
        payload = pickle.dumps(item, _PICKLE_PROTOCOL)
        length = len(payload)
        size = RECORD_HEADER + ((length + 7) & ~7)
        capacity = self._capacity
        if size > capacity:
            raise ValueError(
                f"item pickles to {length} bytes ({size} with its record header); "
                f"the shm queue {self._name!r} holds at most {capacity} (capacity_bytes)"
            )
        buf = self._buf
        thread_lock = self._thread_locks[PRODUCER]
        done = False
        thread_lock.acquire()
        try:
            if not self._closed:
                lock_call, lock_arg, unlock_arg = SIDE_LOCKS[PRODUCER]
                fd = self._lock_fd
                lock_call(fd, *lock_arg)
                try:
                    p_word = _unpack_u64(buf, P_WORD_OFFSET)[0]
                    c_word = _unpack_u64(buf, C_WORD_OFFSET)[0]  # stale is conservative
                    puts, tail = p_word >> 32, (p_word & MASK32) << 3
                    head = (c_word & MASK32) << 3
                    count = (puts - (c_word >> 32)) & MASK32
                    used = (tail - head) % capacity if (tail != head or not count) else capacity
                    maxsize = self._maxsize_bound
                    if (
                        tail + size <= capacity
                        and head < capacity
                        and used + size <= capacity
                        and count << 3 <= used
                        and (count or not used)
                        and not 0 < maxsize <= count
                    ):
                        _pack_u64_into(buf, DATA_OFFSET + tail, length)  # free space: not yet visible
                        start = DATA_OFFSET + tail + RECORD_HEADER
                        buf[start : start + length] = payload
                        # Commit: one aligned 8-byte store publishes the record.
                        buf[P_WORD_OFFSET : P_WORD_OFFSET + 8] = commit_word(puts + 1, (tail + size) % capacity)
                        if puts == MASK32:  # the 32-bit count wrapped: keep the 64-bit statistic
                            store64(buf, PUT_STATS_OFFSET, _unpack_u64(buf, PUT_STATS_OFFSET)[0] + 1)
                        done = True
                finally:
                    lock_call(fd, *unlock_arg)
                if done and _unpack_u32(buf, GET_WAITERS_OFFSET)[0]:  # as in _put_records
                    self._wake_sleepers(GET_WAITERS_OFFSET, GET_SLEEP_EPOCH_OFFSET, PUT_WOKEN_OFFSET, PUT_SEQ_OFFSET)
        finally:
            thread_lock.release()
        if not done:  # no room, a wrap, or something wrong: _put_records waits or says so
            self._put_records((payload,), size, timeout)

    def _put_many(self, items: list[Any], timeout: Optional[float]) -> None:
        payloads = [pickle.dumps(item, _PICKLE_PROTOCOL) for item in items]
        size = sum(record_size(len(p)) for p in payloads)
        if size > self._capacity:
            raise ValueError(
                f"a batch of {len(items)} items needs {size} bytes; the shm queue {self._name!r} holds at most "
                f"{self._capacity} (capacity_bytes)"
            )
        if 0 < self._maxsize_bound < len(items):
            raise ValueError(f"a batch of {len(items)} items can never fit in a queue of maxsize {self._maxsize_bound}")
        self._put_records(payloads, size, timeout)

    def _put_records(self, payloads: Any, size: int, timeout: Optional[float]) -> None:
        # Hot path: helpers are inlined (each Python call costs about as much as a system call).
        buf = self._buf
        capacity = self._capacity
        maxsize = self._maxsize_bound
        unpack_u64 = _unpack_u64
        thread_lock = self._thread_locks[PRODUCER]
        lock_call, lock_arg, unlock_arg = SIDE_LOCKS[PRODUCER]
        n = len(payloads)
        deadline: Optional[Deadline] = None
        announced = committed = False
        while True:
            thread_lock.acquire()
            try:
                if self._closed:  # close() may have released the descriptor and the mapping
                    raise self._closed_in_operation(thread_lock)
                fd = self._lock_fd
                lock_call(fd, *lock_arg)
                try:
                    if announced:
                        self._withdraw(PUT_WAITERS_OFFSET)
                        announced = False
                    p_word = unpack_u64(buf, P_WORD_OFFSET)[0]
                    c_word = unpack_u64(buf, C_WORD_OFFSET)[0]  # stale is conservative
                    puts, tail = p_word >> 32, (p_word & MASK32) << 3
                    head = (c_word & MASK32) << 3
                    count = (puts - (c_word >> 32)) & MASK32
                    used = (tail - head) % capacity if (tail != head or not count) else capacity
                    if (
                        tail >= capacity
                        or head >= capacity
                        or count << 3 > used
                        or (used and not count)
                        or (0 < maxsize < count)
                    ):
                        self._break(f"producer saw tail {tail}, head {head}, count {count} in a {capacity}-byte ring")
                    if used + size <= capacity and not 0 < maxsize < count + n:
                        pos = tail
                        for payload in payloads:
                            pos = self._write_record(pos, payload)
                        # Commit: one aligned 8-byte store publishes every record above.
                        buf[P_WORD_OFFSET : P_WORD_OFFSET + 8] = commit_word(puts + n, pos)
                        if puts + n > MASK32:  # the 32-bit count wrapped: keep the 64-bit statistic
                            store64(buf, PUT_STATS_OFFSET, unpack_u64(buf, PUT_STATS_OFFSET)[0] + 1)
                        committed = True
                    else:
                        state = U32.unpack_from(buf, STATE_OFFSET)[0]  # woken by destroy()?
                        if state:
                            self._raise_state(state)
                finally:
                    lock_call(fd, *unlock_arg)
                # After the kernel unlock (a full barrier): a getter that announced itself before
                # our commit is seen here; one that announces later sees the commit (module
                # docstring). Still under the thread lock, so close() cannot unmap the buffer.
                if committed and _unpack_u32(buf, GET_WAITERS_OFFSET)[0]:
                    self._wake_sleepers(GET_WAITERS_OFFSET, GET_SLEEP_EPOCH_OFFSET, PUT_WOKEN_OFFSET, PUT_SEQ_OFFSET)
            finally:
                thread_lock.release()
            if committed:
                return
            if deadline is None:
                deadline = Deadline(timeout)
            if deadline.expired():
                raise queue.Full
            announced = self._wait(PRODUCER, deadline, c_word)

    def _write_record(self, pos: int, payload: bytes) -> int:
        """Copy one record in at ring offset ``pos``; return the offset after it."""
        buf = self._buf
        capacity = self._capacity
        length = len(payload)
        U64.pack_into(buf, DATA_OFFSET + pos, length)  # 8-aligned, so never split by the wrap
        start = pos + RECORD_HEADER
        if start == capacity:
            start = 0
        end = start + length
        if end <= capacity:
            buf[DATA_OFFSET + start : DATA_OFFSET + end] = payload
        else:
            first = capacity - start
            view = memoryview(payload)
            buf[DATA_OFFSET + start : DATA_OFFSET + capacity] = view[:first]
            buf[DATA_OFFSET : DATA_OFFSET + length - first] = view[first:]
        return (pos + record_size(length)) % capacity

    # -- hooks: get ----------------------------------------------------------------------

    def _get(self, timeout: Optional[float]) -> Any:
        """One item, unpickled after the commit outside the lock (an undecodable item is gone, SHM8).

        The hook holds the fast path: one locked attempt at one record that does not wrap,
        with no waiting and no list, which is what a busy consumer does nearly every time
        (about 0.3 us less than the general loop, a tenth of a get). Anything else (an empty
        queue, a wrapped record, a closed handle) goes to ``_take``, the general protocol.
        The checks are _take's (SHM15), written out once more for speed: keep them in step.
        """
        buf = self._buf
        capacity = self._capacity
        thread_lock = self._thread_locks[CONSUMER]
        data = None
        thread_lock.acquire()
        try:
            if not self._closed:
                lock_call, lock_arg, unlock_arg = SIDE_LOCKS[CONSUMER]
                fd = self._lock_fd
                lock_call(fd, *lock_arg)
                try:
                    c_word = _unpack_u64(buf, C_WORD_OFFSET)[0]
                    p_word = _unpack_u64(buf, P_WORD_OFFSET)[0]  # stale is conservative
                    gets, head = c_word >> 32, (c_word & MASK32) << 3
                    tail = (p_word & MASK32) << 3
                    count = ((p_word >> 32) - gets) & MASK32
                    used = (tail - head) % capacity if (tail != head or not count) else capacity
                    if (
                        count
                        and tail < capacity
                        and head < capacity
                        and count << 3 <= used
                        and not (0 < self._maxsize_bound < count)
                    ):
                        at = DATA_OFFSET + head
                        length = _unpack_u64(buf, at)[0]
                        rsize = RECORD_HEADER + ((length + 7) & ~7)
                        pos = head + rsize
                        if rsize <= used and pos <= capacity and (count > 1 or rsize == used):
                            data = buf[at + RECORD_HEADER : at + RECORD_HEADER + length]
                            # Commit: from this store on, producers may reuse the bytes copied out.
                            buf[C_WORD_OFFSET : C_WORD_OFFSET + 8] = commit_word(gets + 1, pos % capacity)
                            if gets == MASK32:
                                store64(buf, GET_STATS_OFFSET, _unpack_u64(buf, GET_STATS_OFFSET)[0] + 1)
                finally:
                    lock_call(fd, *unlock_arg)
                if data is not None and _unpack_u32(buf, PUT_WAITERS_OFFSET)[0]:  # as in _take
                    self._wake_sleepers(PUT_WAITERS_OFFSET, PUT_SLEEP_EPOCH_OFFSET, GET_WOKEN_OFFSET, GET_SEQ_OFFSET)
        finally:
            thread_lock.release()
        if data is None:  # nothing taken: _take waits, or finds what is wrong and says so
            data = self._take(1, timeout, False)[0]
        try:
            return pickle.loads(data)
        except Exception:
            self._count_undecodable()
            raise

    def _count_undecodable(self) -> None:
        """Count in ``stats().errors`` an item a ``get`` removed and could not unpickle.

        ``get`` unpickles after its commit, outside the lock (SHM8), so the count takes the
        consumer lock once more: the errors word, like every consumer-line word, is written
        only under that lock (layout.GET_ERRORS_OFFSET). A handle closed in between, or a
        kill before the store, misses this one count (as SHM12 allows for statistics).
        """
        try:
            self._acquire(CONSUMER)
        except QueueClosed:
            return
        try:
            store64(self._buf, GET_ERRORS_OFFSET, _unpack_u64(self._buf, GET_ERRORS_OFFSET)[0] + 1)
        finally:
            self._release(CONSUMER)

    def _get_many(self, max_items: int, timeout: Optional[float]) -> list[Any]:
        return self._take(max_items, timeout, True)

    def _take(self, max_items: int, timeout: Optional[float], decode: bool) -> list[Any]:
        """Take up to ``max_items`` records: their payloads, or (``decode``) their items.

        With ``decode`` the records are unpickled under the consumer lock, before the
        commit, so that an undecodable record costs only itself (SHM8): the items before
        it are returned and it stays at the head; taken alone, it is removed and its error
        raised. A BaseException while unpickling (KeyboardInterrupt) commits nothing.
        """
        # Hot path: helpers inlined, as in _put_records.
        buf = self._buf
        capacity = self._capacity
        maxsize = self._maxsize_bound
        unpack_u64 = _unpack_u64
        thread_lock = self._thread_locks[CONSUMER]
        lock_call, lock_arg, unlock_arg = SIDE_LOCKS[CONSUMER]
        deadline: Optional[Deadline] = None
        announced = committed = False
        out: list[Any] = []
        error: Optional[Exception] = None
        while True:
            thread_lock.acquire()
            try:
                if self._closed:
                    raise self._closed_in_operation(thread_lock)
                fd = self._lock_fd
                lock_call(fd, *lock_arg)
                try:
                    if announced:
                        self._withdraw(GET_WAITERS_OFFSET)
                        announced = False
                    c_word = unpack_u64(buf, C_WORD_OFFSET)[0]
                    p_word = unpack_u64(buf, P_WORD_OFFSET)[0]  # stale is conservative
                    gets, head = c_word >> 32, (c_word & MASK32) << 3
                    tail = (p_word & MASK32) << 3
                    count = ((p_word >> 32) - gets) & MASK32
                    used = (tail - head) % capacity if (tail != head or not count) else capacity
                    if (
                        tail >= capacity
                        or head >= capacity
                        or count << 3 > used
                        or (used and not count)
                        or (0 < maxsize < count)
                    ):
                        self._break(f"consumer saw tail {tail}, head {head}, count {count} in a {capacity}-byte ring")
                    if count:
                        taken = count if count < max_items else max_items
                        pos, left = head, used
                        for i in range(taken):
                            at = DATA_OFFSET + pos
                            length = unpack_u64(buf, at)[0]
                            rsize = RECORD_HEADER + ((length + 7) & ~7)
                            if rsize > left:
                                self._break(f"record at {pos} claims {length} bytes, only {left} are in use")
                            if pos + rsize <= capacity:  # the record does not wrap (the common case)
                                data = buf[at + RECORD_HEADER : at + RECORD_HEADER + length]
                            else:
                                start = pos + RECORD_HEADER
                                if start == capacity:
                                    start = 0
                                end = start + length
                                if end <= capacity:  # only the length word was before the end
                                    data = buf[DATA_OFFSET + start : DATA_OFFSET + end]
                                else:
                                    data = (
                                        buf[DATA_OFFSET + start : DATA_OFFSET + capacity]
                                        + buf[DATA_OFFSET : DATA_OFFSET + end - capacity]
                                    )
                            if decode:
                                try:
                                    data = pickle.loads(data)
                                except Exception as exc:
                                    if i:  # return the good ones; this record stays at the head
                                        taken = i
                                        break
                                    error, taken = exc, 1  # alone: removed, its error raised (SHM8)
                                    pos = (pos + rsize) % capacity
                                    break
                            out.append(data)
                            left -= rsize
                            pos = (pos + rsize) % capacity
                        else:
                            if taken == count and left:
                                self._break(f"{count} records end {left} bytes before the tail")
                        # Commit: from this store on, producers may reuse the bytes copied out.
                        buf[C_WORD_OFFSET : C_WORD_OFFSET + 8] = commit_word(gets + taken, pos)
                        if gets + taken > MASK32:
                            store64(buf, GET_STATS_OFFSET, unpack_u64(buf, GET_STATS_OFFSET)[0] + 1)
                        if error is not None:  # the undecodable record this commit removed (stats().errors)
                            store64(buf, GET_ERRORS_OFFSET, unpack_u64(buf, GET_ERRORS_OFFSET)[0] + 1)
                        committed = True
                    else:
                        state = U32.unpack_from(buf, STATE_OFFSET)[0]  # woken by destroy()?
                        if state:
                            self._raise_state(state)
                finally:
                    lock_call(fd, *unlock_arg)
                if committed and _unpack_u32(buf, PUT_WAITERS_OFFSET)[0]:  # as in _put_records
                    # Freed bytes may let several producers in (or none, if the first needs more).
                    self._wake_sleepers(PUT_WAITERS_OFFSET, PUT_SLEEP_EPOCH_OFFSET, GET_WOKEN_OFFSET, GET_SEQ_OFFSET)
            finally:
                thread_lock.release()
            if committed:
                if error is not None:
                    raise error
                return out
            if deadline is None:
                deadline = Deadline(timeout)
            if deadline.expired():
                raise queue.Empty
            announced = self._wait(CONSUMER, deadline, p_word)

    # -- hooks: the rest ------------------------------------------------------------------

    def _qsize(self) -> int:
        with self._thread_locks[CONSUMER]:  # keeps close() from unmapping under us
            if self._closed:
                raise self._closed_error()
            return self._depth()

    def _depth(self) -> int:
        """Under the consumer thread lock: the item count, bounds-checked."""
        # C before P: gets only trail puts, so the difference is a real depth.
        gets = U64.unpack_from(self._buf, C_WORD_OFFSET)[0] >> 32
        depth: int = ((U64.unpack_from(self._buf, P_WORD_OFFSET)[0] >> 32) - gets) & MASK32
        if depth > self._capacity >> 3:
            os_lock(self._lock_fd, CONSUMER)
            try:
                self._break(f"depth {depth} cannot fit in a {self._capacity}-byte ring")
            finally:
                os_unlock(self._lock_fd, CONSUMER)
        return depth

    def _stats(self) -> QueueStats:
        with self._thread_locks[CONSUMER]:
            if self._closed:
                raise self._closed_error()
            depth = self._depth()
            gets_wraps, errors, get_waits = STATS3.unpack_from(self._buf, GET_STATS_OFFSET)
            puts_wraps, _, put_waits = STATS3.unpack_from(self._buf, PUT_STATS_OFFSET)
            gets = gets_wraps << 32 | U64.unpack_from(self._buf, C_WORD_OFFSET)[0] >> 32
            puts = puts_wraps << 32 | U64.unpack_from(self._buf, P_WORD_OFFSET)[0] >> 32
        return QueueStats(
            scope="queue",
            puts=puts,
            gets=gets,
            depth=depth,
            waits=put_waits + get_waits,
            abandoned=None,
            capacity_bytes=self._capacity,
            errors=errors,
        )

    @property
    def capacity_bytes(self) -> int:
        """Bytes in the data ring (``metadata["capacity_bytes"]`` rounded up to a multiple of 8)."""
        return self._capacity

    def _destroy(self) -> None:
        self._acquire(PRODUCER)
        try:
            if CONSUMER != PRODUCER:
                self._acquire(CONSUMER)
            try:
                state = U32.unpack_from(self._buf, STATE_OFFSET)[0]
                if state & DESTROYED:  # another handle destroyed it first
                    raise QueueDestroyed(f"shm queue {self._name!r} was already destroyed")
                store32(self._buf, STATE_OFFSET, state | DESTROYED)
                self._gone = True
                # Unlink under both locks: no operation is half done, and nobody can attach to
                # this incarnation once the bit is set (attachers check it).
                _segment.unlink(SEGMENT_KIND, self._name)
                if not OFD:
                    try:
                        os.unlink(lock_path(self._name))
                    except FileNotFoundError:
                        pass
            finally:
                if CONSUMER != PRODUCER:
                    self._release(CONSUMER)
        finally:
            self._release(PRODUCER)
        self._wake(PUT_SEQ_OFFSET, WAKE_ALL)
        self._wake(GET_SEQ_OFFSET, WAKE_ALL)

    def _close(self) -> None:
        _open_handles.discard(self)
        if self._segment is None:
            return
        # This handle's sleepers re-check `closed` within WAIT_SLICE_S; wake them now instead.
        # (Sleepers of other handles wake too, find nothing changed, and sleep again.)
        self._wake(PUT_SEQ_OFFSET, WAKE_ALL)
        self._wake(GET_SEQ_OFFSET, WAKE_ALL)
        self._release_resources()

    def _release_resources(self) -> None:
        """Give back the pid slot, the descriptor and the mapping, once no operation uses them.

        Each thread lock is waited for at most CLOSE_WAKEUP_S: close() may run in a signal
        handler that interrupted this very thread inside a locked section (its lock would
        never be released while we wait). Then the resources are left to the operation in
        progress, which releases them when it next finds the closed flag
        (``_closed_in_operation``), or to garbage collection (``__del__``).
        """
        if not _process_lock.acquire(timeout=CLOSE_WAKEUP_S):
            return
        try:
            producer_lock, consumer_lock = self._thread_locks
            if not producer_lock.acquire(timeout=CLOSE_WAKEUP_S):
                return
            try:
                if consumer_lock is not producer_lock and not consumer_lock.acquire(timeout=CLOSE_WAKEUP_S):
                    return
                try:
                    # Both held: no operation of this handle is in the buffer.
                    segment, self._segment = self._segment, None
                    if segment is None:
                        return
                    key = (self._name, self._instance)
                    remaining = _registrations.get(key, 0) - 1
                    if remaining > 0:
                        _registrations[key] = remaining
                    else:
                        _registrations.pop(key, None)
                    if self._lock_fd >= 0:
                        try:
                            if remaining <= 0:
                                os_lock(self._lock_fd, PRODUCER)
                                try:
                                    self._clear_pid_slot()
                                finally:
                                    os_unlock(self._lock_fd, PRODUCER)
                        finally:
                            os.close(self._lock_fd)
                            self._lock_fd = -1
                    segment.close()
                finally:
                    if consumer_lock is not producer_lock:
                        consumer_lock.release()
            finally:
                producer_lock.release()
        finally:
            _process_lock.release()

    def __del__(self) -> None:
        # A handle dropped without close(): give back its pid slot and descriptor.
        if getattr(self, "_segment", None) is not None:
            try:
                if not self._closed:
                    self.close()
                else:
                    self._release_resources()
            except Exception:  # interpreter shutdown: modules may be half torn down
                pass
