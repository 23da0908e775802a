"""Deliberately broken backends: each breaks one rule of spec/queue-contract.md that a user would notice.

Each is a thin wrapper (a ``queue.Queue`` subclass or a ``LocalQueueStub`` subclass)
exposed as a factory ``make_<name>(maxsize)``; ``BROKEN`` lists them with the kit
tests expected to catch them. tests/kit/test_meta.py runs the kit against every one
and requires a failure of an expected test. The interesting ones are the subtle ones:
a bug that shows only past 7 items, once in 1000 items, under contention, when full,
for bools, for nested tuples, for items above 64 KiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import pickle
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from sage_queue import QueueClosed, QueueDescriptor, QueueDestroyed
from sage_queue.backends.local import LocalQueueStub

LOCAL_CAPS = set(LocalQueueStub.capabilities)


# -- order, loss, duplication ---------------------------------------------------------------


class ReorderAfterSeven(queue.Queue):  # type: ignore[type-arg]
    """FIFO until 7 items are queued; from then on a new item jumps ahead of the last one."""

    def _put(self, item: Any) -> None:
        if len(self.queue) >= 7:
            self.queue.insert(len(self.queue) - 1, item)
        else:
            self.queue.append(item)


class DropsOneInThousand(queue.Queue):  # type: ignore[type-arg]
    """Every 1000th put returns normally but the item is never enqueued."""

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._puts = 0

    def _put(self, item: Any) -> None:
        self._puts += 1
        if self._puts % 1000 != 0:
            self.queue.append(item)


class DuplicatesUnderContention(queue.Queue):  # type: ignore[type-arg]
    """When two gets overlap, now and then the head item is delivered to both (a retried dequeue)."""

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._active_getters = 0
        self._rng = random.Random(7)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        self._active_getters += 1
        try:
            return super().get(block, timeout)
        finally:
            self._active_getters -= 1

    def _get(self) -> Any:
        item = self.queue.popleft()
        if self._active_getters > 1 and self._rng.random() < 0.02:
            self.queue.appendleft(item)
        return item


class NotThreadSafe(queue.Queue):  # type: ignore[type-arg]
    """A lock-free 'fast path' for get: read the head slot, copy it out, then advance, without the lock.

    The copy releases the GIL (as a C extension copying out of shared memory would), so two
    getters can read the same slot before either advances: one item twice, another lost.
    """

    def _peek(self) -> Any:
        item = self.queue[0]
        time.sleep(0)  # the GIL-released copy
        return item

    def _advance(self) -> None:
        if self.queue:
            self.queue.popleft()

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        valid = timeout is None or (isinstance(timeout, (int, float)) and timeout >= 0)
        if valid and self.queue:
            item = self._peek()
            self._advance()
            if self.maxsize > 0:  # wake a producer blocked on a full queue
                with self.not_full:
                    self.not_full.notify()
            return item
        return super().get(block, timeout)


def _hold_the_gil_for_ever() -> None:
    # A call through ctypes.PyDLL keeps the GIL (as a C extension that blocks without
    # Py_BEGIN_ALLOW_THREADS does): no other thread of the process runs Python again.
    libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.sleep(3600)


class HoldsTheGilPast16Threads(queue.Queue):  # type: ignore[type-arg]
    """Correct for up to 16 threads; the 17th thread to use the queue deadlocks holding the GIL
    (a fixed per-thread table in a C extension, full, waited on without releasing the GIL)."""

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._threads: set[int] = set()
        self._threads_lock = threading.Lock()

    def _enter(self) -> None:
        with self._threads_lock:
            self._threads.add(threading.get_ident())
            crowded = len(self._threads) > 16
        if crowded:
            _hold_the_gil_for_ever()

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        self._enter()
        super().put(item, block, timeout)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        self._enter()
        return super().get(block, timeout)


# -- bounds and sizes ------------------------------------------------------------------------


class QsizeOffByOneWhenFull(queue.Queue):  # type: ignore[type-arg]
    """qsize() says maxsize - 1 when the queue is full (full() itself is right)."""

    def qsize(self) -> int:
        n = super().qsize()
        return n - 1 if 0 < self.maxsize <= n else n


class BoundIgnoredAbove64(queue.Queue):  # type: ignore[type-arg]
    """A maxsize above 64 is silently treated as unbounded."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize if maxsize <= 64 else 0)


# -- blocking, timeouts, exception types --------------------------------------------------------


class TimeoutEarly(queue.Queue):  # type: ignore[type-arg]
    """A timed wait gives up after 70 % of its timeout."""

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        return super().get(block, timeout * 0.7 if block and timeout and timeout > 0 else timeout)

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        super().put(item, block, timeout * 0.7 if block and timeout and timeout > 0 else timeout)


class TimeoutRaisesTimeoutError(queue.Queue):  # type: ignore[type-arg]
    """A timed wait that runs out raises TimeoutError; the non-blocking forms still raise Empty/Full."""

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        try:
            return super().get(block, timeout)
        except queue.Empty:
            if block and timeout:
                raise TimeoutError("get timed out") from None
            raise

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        try:
            super().put(item, block, timeout)
        except queue.Full:
            if block and timeout:
                raise TimeoutError("put timed out") from None
            raise


class NegativeTimeoutIgnored(queue.Queue):  # type: ignore[type-arg]
    """A negative timeout is treated as 0 instead of raising ValueError."""

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        return super().get(block, 0 if timeout is not None and timeout < 0 else timeout)

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        super().put(item, block, 0 if timeout is not None and timeout < 0 else timeout)


class NonBlockingHonoursTimeout(queue.Queue):  # type: ignore[type-arg]
    """block=False with a positive timeout waits for that timeout, instead of returning at once."""

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        if not block and timeout and timeout > 0:
            return super().get(True, timeout)
        return super().get(block, timeout)

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        if not block and timeout and timeout > 0:
            return super().put(item, True, timeout)
        return super().put(item, block, timeout)


class LateEnqueueOnTimeout(queue.Queue):  # type: ignore[type-arg]
    """A put that times out raises Full, but leaves its item in the queue anyway."""

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        try:
            super().put(item, block, timeout)
        except queue.Full:
            if block and timeout:
                with self.mutex:
                    self.queue.append(item)
            raise


# -- item fidelity ---------------------------------------------------------------------------------


def _nested_tuples_to_lists(value: Any, depth: int = 0) -> Any:
    if isinstance(value, (list, tuple)):
        inner = [_nested_tuples_to_lists(v, depth + 1) for v in value]
        return inner if depth > 0 or isinstance(value, list) else tuple(inner)
    if isinstance(value, dict):
        return {k: _nested_tuples_to_lists(v, depth + 1) for k, v in value.items()}
    return value


class NestedTuplesBecomeLists(queue.Queue):  # type: ignore[type-arg]
    """A JSON-ish transport: a top-level tuple survives, tuples inside containers come back as lists."""

    def _put(self, item: Any) -> None:
        self.queue.append(_nested_tuples_to_lists(item))


def _bools_to_ints(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, list):
        return [_bools_to_ints(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_bools_to_ints(v) for v in value)
    if isinstance(value, dict):
        return {k: _bools_to_ints(v) for k, v in value.items()}
    return value


class BoolsBecomeInts(queue.Queue):  # type: ignore[type-arg]
    """True comes back as 1 and False as 0: equal, but not of the same type."""

    def _put(self, item: Any) -> None:
        self.queue.append(_bools_to_ints(item))


class DropsLargeItems(queue.Queue):  # type: ignore[type-arg]
    """An item whose pickle exceeds 64 KiB is accepted and silently discarded."""

    def _put(self, item: Any) -> None:
        if len(pickle.dumps(item)) <= 64 * 1024:
            self.queue.append(item)


# -- optional capabilities --------------------------------------------------------------------------


class ExtraTaskDoneIgnored(queue.Queue):  # type: ignore[type-arg]
    """task_done() called once too often is silently ignored instead of raising ValueError."""

    def task_done(self) -> None:
        with self.all_tasks_done:
            if self.unfinished_tasks > 0:
                self.unfinished_tasks -= 1
                if self.unfinished_tasks == 0:
                    self.all_tasks_done.notify_all()


class ForgetfulDescriptor(LocalQueueStub):
    """Its ``descriptor`` names a brand-new queue each time: the round trip reaches another queue."""

    @property
    def descriptor(self) -> QueueDescriptor:
        return QueueDescriptor.create_local_queue(maxsize=self.maxsize)


class CloseDiscardsItems(LocalQueueStub):
    """close() on one handle empties the queue for every handle (it 'frees its buffers')."""

    def _close(self) -> None:
        with self._q.mutex:
            self._q.queue.clear()
        super()._close()


class ClosedHandleStillCounts(LocalQueueStub):
    """qsize() (and so empty()/full()) keep working on a closed handle instead of raising QueueClosed."""

    def qsize(self) -> int:
        return self._q.qsize()


class PutManyPartial(LocalQueueStub):
    """put_many enqueues as many items as fit, then raises Full: not all-or-nothing."""

    def _put_many(self, items: list[Any], timeout: Optional[float]) -> None:
        for item in items:
            self._put(item, 0.0 if timeout is None else timeout)


class GetManyNewestFirst(LocalQueueStub):
    """get_many returns its batch newest first."""

    def _get_many(self, max_items: int, timeout: Optional[float]) -> list[Any]:
        return list(reversed(super()._get_many(max_items, timeout)))


class ThreadLocalQsize(queue.Queue):  # type: ignore[type-arg]
    """qsize() counts only the calling thread's puts and gets (a per-thread cached counter)."""

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._mine = threading.local()

    def _count(self, delta: int) -> None:
        self._mine.n = getattr(self._mine, "n", 0) + delta

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._count(1)

    def _get(self) -> Any:
        self._count(-1)
        return super()._get()

    def qsize(self) -> int:
        return max(0, getattr(self._mine, "n", 0))

    def empty(self) -> bool:
        return self.qsize() == 0


class CloseLeavesWaitersAsleep(LocalQueueStub):
    """close() does not wake this handle's blocked calls: they sleep until an item or room appears."""

    def _close(self) -> None:
        pass


class CloseWaitsForCallers(LocalQueueStub):
    """close() wakes the blocked calls, then waits until no put/get is in progress on the handle.

    From another thread that works (Q23 passes). From a signal handler that interrupted a
    blocked get in the same thread, the call in progress is the handler's own: close() waits
    for ever, and the blocked call never raises.
    """

    def __init__(self, descriptor: QueueDescriptor) -> None:
        super().__init__(descriptor)
        self._idle = threading.Condition()
        self._in_progress = 0

    def _tracked(self, call: Callable[[], Any]) -> Any:
        with self._idle:
            self._in_progress += 1
        try:
            return call()
        finally:
            with self._idle:
                self._in_progress -= 1
                self._idle.notify_all()

    def _put(self, item: Any, timeout: Optional[float]) -> None:
        self._tracked(lambda: super(CloseWaitsForCallers, self)._put(item, timeout))

    def _get(self, timeout: Optional[float]) -> Any:
        return self._tracked(lambda: super(CloseWaitsForCallers, self)._get(timeout))

    def _close(self) -> None:
        super()._close()
        with self._idle:
            while self._in_progress:
                self._idle.wait()


class _PicklingDeque(queue.Queue):  # type: ignore[type-arg]
    """Holds its items pickled, as a byte ring would; ``_get`` unpickles one."""

    def _put(self, item: Any) -> None:
        self.queue.append(pickle.dumps(item))

    def _get(self) -> Any:
        return pickle.loads(self.queue.popleft())


class PickledGetManyLosesBatch(LocalQueueStub):
    """Items are stored pickled (as across processes), and get_many decodes its batch item by item
    after taking it: an undecodable item loses every good item taken in the same batch. get() loses
    only the bad item. (The queue every handle shares is swapped for a pickling one when it is made.)"""

    def __init__(self, descriptor: QueueDescriptor) -> None:
        super().__init__(descriptor)
        if not isinstance(self._q, _PicklingDeque):
            self._state.queue = self._q = _PicklingDeque(self._q.maxsize)


class DestroyOnlyCloses(LocalQueueStub):
    """destroy() closes this handle but leaves the queue alive for every other handle."""

    def _destroy(self) -> None:
        pass


class LeaksAThread(LocalQueueStub):
    """Each handle starts a 'monitor' thread that nothing ever stops."""

    def __init__(self, descriptor: QueueDescriptor) -> None:
        super().__init__(descriptor)
        stop = threading.Event()
        self._monitor = threading.Thread(target=stop.wait, daemon=True, name="leaky-monitor")
        self._monitor.start()


class StatsCountCalls(LocalQueueStub):
    """stats() counts put_many/get_many calls, not the items they move."""

    def _put_many(self, items: list[Any], timeout: Optional[float]) -> None:
        super()._put_many(items, timeout)
        with self._q.mutex:
            self._state.puts -= len(items) - 1

    def _get_many(self, max_items: int, timeout: Optional[float]) -> list[Any]:
        got = super()._get_many(max_items, timeout)
        with self._q.mutex:
            self._state.gets -= len(got) - 1
        return got


class ClaimsCrossProcess(LocalQueueStub):
    """Declares cross_process, but is an in-process queue: another process cannot reach it."""


# -- the factories ------------------------------------------------------------------------------------


def _stdlib_factory(cls: type, capabilities: frozenset[str] = frozenset()) -> Callable[[int], Any]:
    def make(maxsize: int) -> Any:
        return cls(maxsize)

    make.capabilities = capabilities  # type: ignore[attr-defined]
    make.__qualname__ = make.__name__ = f"make_{cls.__name__}"
    return make


def _local_factory(cls: type, capabilities: set[str]) -> Callable[[int], Any]:
    made: list[Any] = []

    def make(maxsize: int) -> Any:
        handle = cls(QueueDescriptor.create_local_queue(maxsize=maxsize))
        made.append(handle)
        return handle

    def cleanup() -> None:
        from sage_queue.backends.local import destroy_local_queue

        while made:
            destroy_local_queue(made.pop()._descriptor.queue_id)

    make.capabilities = frozenset(capabilities)  # type: ignore[attr-defined]
    make.cleanup = cleanup  # type: ignore[attr-defined]
    make.__qualname__ = make.__name__ = f"make_{cls.__name__}"
    return make


_PUBLIC_OPS = (
    "put",
    "get",
    "put_nowait",
    "get_nowait",
    "qsize",
    "empty",
    "full",
    "put_many",
    "get_many",
    "destroy",
    "stats",
    "task_done",
    "join",
)


def _destroyed_as_plain_closed(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except QueueDestroyed as exc:
            raise QueueClosed(str(exc)) from None

    call.kit_plain_closed = True  # type: ignore[attr-defined]
    return call


def _destroyed_reports_plain_closed_factory() -> Callable[[int], Any]:
    """The local backend as before E13: a destroyed queue is reported as plain QueueClosed.

    The kit's other handles come from ``resolve_descriptor``, i.e. plain ``LocalQueueStub``s, so
    the bug has to be in that class: the first call of this factory patches it, in this process
    only (the meta-tests run each broken backend in its own ``python -m conformance`` process).
    """
    plain = _local_factory(LocalQueueStub, LOCAL_CAPS)

    def make(maxsize: int) -> Any:
        for name in _PUBLIC_OPS:
            method = getattr(LocalQueueStub, name)
            if not getattr(method, "kit_plain_closed", False):
                setattr(LocalQueueStub, name, _destroyed_as_plain_closed(method))
        return plain(maxsize)

    make.capabilities = plain.capabilities  # type: ignore[attr-defined]
    make.cleanup = plain.cleanup  # type: ignore[attr-defined]
    make.__qualname__ = make.__name__ = "make_destroyed_reports_plain_closed"
    return make


@dataclass(frozen=True)
class Broken:
    """A broken backend, the kit tests that must catch it, and a -k expression selecting them."""

    name: str
    factory: Callable[[int], Any]
    expected: tuple[str, ...]
    """Kit tests (function names) of which at least one must fail."""
    select: str
    """``-k`` expression: which kit tests the meta-test runs (keeps it fast)."""
    rule: str
    shows: str = ""
    """Text the run's output must contain: the failure explains itself (e.g. names the stuck frame)."""
    exclusive: bool = False
    """Every other selected test must pass: the bug is caught by the expected test, and only by it."""


BROKEN: list[Broken] = [
    Broken(
        "reorder_after_7",
        _stdlib_factory(ReorderAfterSeven),
        ("test_fifo_one_producer",),
        "test_fifo",
        "Q3 FIFO, only beyond 7 queued items",
    ),
    Broken(
        "drops_one_in_1000",
        _stdlib_factory(DropsOneInThousand),
        ("test_no_loss_one_thread", "test_threads_share_one_handle"),
        "Q5",
        "Q5 no loss",
    ),
    Broken(
        "duplicates_under_contention",
        _stdlib_factory(DuplicatesUnderContention),
        ("test_threads_share_one_handle", "test_threads_contend"),
        "Q6",
        "Q5/Q6 no duplication with many threads",
    ),
    Broken(
        "not_thread_safe",
        _stdlib_factory(NotThreadSafe),
        ("test_threads_contend", "test_threads_share_one_handle"),
        "test_threads_contend",
        "Q6 thread safety of one handle",
    ),
    Broken(
        "qsize_off_by_one_when_full",
        _stdlib_factory(QsizeOffByOneWhenFull),
        ("test_maxsize_bound", "test_sizes_exact"),
        "test_maxsize_bound or test_sizes_exact",
        "Q16 sizes exact",
    ),
    Broken(
        "bound_ignored_above_64",
        _stdlib_factory(BoundIgnoredAbove64),
        ("test_maxsize_bound",),
        "Q14",
        "Q14 maxsize bound",
    ),
    Broken(
        "timeout_early",
        _stdlib_factory(TimeoutEarly),
        ("test_get_timeout", "test_put_timeout"),
        "Q8",
        "Q8 waits the whole timeout",
    ),
    Broken(
        "timeout_raises_timeouterror",
        _stdlib_factory(TimeoutRaisesTimeoutError),
        ("test_get_timeout", "test_put_timeout"),
        "Q11",
        "Q11 queue.Empty / queue.Full only",
    ),
    Broken(
        "negative_timeout_ignored",
        _stdlib_factory(NegativeTimeoutIgnored),
        ("test_negative_timeout",),
        "Q9",
        "Q9 negative timeout -> ValueError",
    ),
    Broken(
        "nonblocking_waits",
        _stdlib_factory(NonBlockingHonoursTimeout),
        ("test_nonblocking_never_waits",),
        "Q10",
        "Q10 block=False never waits",
    ),
    Broken(
        "late_enqueue_on_timeout",
        _stdlib_factory(LateEnqueueOnTimeout),
        ("test_put_timeout", "test_failed_calls_change_nothing"),
        "Q12",
        "Q12 a failed put enqueues nothing",
    ),
    Broken(
        "nested_tuples_become_lists",
        _stdlib_factory(NestedTuplesBecomeLists),
        ("test_item_fidelity",),
        "test_item_fidelity",
        "Q4 fidelity of nested containers",
    ),
    Broken(
        "bools_become_ints",
        _stdlib_factory(BoolsBecomeInts),
        ("test_item_fidelity",),
        "test_item_fidelity",
        "Q4 same type, not just equal",
    ),
    Broken(
        "drops_large_items",
        _stdlib_factory(DropsLargeItems),
        ("test_item_fidelity_large",),
        "test_item_fidelity",
        "Q4 large items",
    ),
    Broken(
        "extra_task_done_ignored",
        _stdlib_factory(ExtraTaskDoneIgnored, frozenset({"task_done"})),
        ("test_task_done_and_join",),
        "Q35",
        "Q35 one task_done too many -> ValueError",
    ),
    Broken(
        "forgetful_descriptor",
        _local_factory(ForgetfulDescriptor, LOCAL_CAPS),
        ("test_descriptor_round_trips",),
        "Q28",
        "Q28 the descriptor reaches the same queue",
    ),
    Broken(
        "close_discards_items",
        _local_factory(CloseDiscardsItems, LOCAL_CAPS),
        ("test_close_leaves_other_handles", "test_close_is_idempotent", "test_context_manager"),
        "Q20 or Q22 or Q25",
        "Q22 closing a handle keeps the queue",
    ),
    Broken(
        "closed_handle_still_counts",
        _local_factory(ClosedHandleStillCounts, LOCAL_CAPS),
        ("test_closed_handle_raises",),
        "Q21",
        "Q21 every operation on a closed handle raises",
    ),
    Broken(
        "put_many_partial",
        _local_factory(PutManyPartial, LOCAL_CAPS),
        ("test_put_many_all_or_nothing",),
        "Q30",
        "Q30 put_many all or nothing",
    ),
    Broken(
        "get_many_newest_first",
        _local_factory(GetManyNewestFirst, LOCAL_CAPS),
        ("test_get_many", "test_state_machine"),
        "Q32",
        "Q32 get_many in FIFO order",
    ),
    Broken(
        "claims_cross_process",
        _local_factory(ClaimsCrossProcess, LOCAL_CAPS | {"cross_process"}),
        ("test_cross_process_subprocess",),
        "test_cross_process_subprocess",
        "Q41 a declared capability must hold",
    ),
    Broken(
        "qsize_per_thread",
        _stdlib_factory(ThreadLocalQsize),
        ("test_qsize_sees_other_threads",),
        "Q17",
        "Q17 qsize reflects other threads' operations",
    ),
    Broken(
        "close_leaves_waiters_asleep",
        _local_factory(CloseLeavesWaitersAsleep, LOCAL_CAPS),
        ("test_close_wakes_blocked_calls",),
        "Q23",
        "Q23 close releases blocked calls",
    ),
    Broken(
        "destroy_only_closes",
        _local_factory(DestroyOnlyCloses, LOCAL_CAPS),
        ("test_destroy",),
        "Q24",
        "Q24 destroy reaches every handle",
    ),
    Broken(
        "leaks_a_thread",
        _local_factory(LeaksAThread, LOCAL_CAPS),
        ("test_no_resources_left",),
        "Q26",
        "Q26 nothing left behind",
    ),
    Broken(
        "stats_count_calls",
        _local_factory(StatsCountCalls, LOCAL_CAPS),
        ("test_stats",),
        "Q36",
        "Q36 stats count items",
    ),
    Broken(
        "holds_the_gil_past_16_threads",
        _stdlib_factory(HoldsTheGilPast16Threads),
        ("test_many_threads_one_handle",),
        "Q6",
        "Q6 any number of threads on one handle, without hanging the kit",
        shows="in _hold_the_gil_for_ever",
        exclusive=True,
    ),
    Broken(
        "close_waits_for_callers",
        _local_factory(CloseWaitsForCallers, LOCAL_CAPS),
        ("test_close_from_signal_handler",),
        "Q20 or Q21 or Q22 or Q23 or Q24 or Q25",
        "Q23 close() from a signal handler releases the call",
        shows="in _close",
        exclusive=True,
    ),
    Broken(
        "pickled_get_many_loses_batch",
        _local_factory(PickledGetManyLosesBatch, LOCAL_CAPS),
        ("test_undecodable_item_loses_only_itself",),
        "Q4 or Q5 or Q18 or Q30 or Q32",
        "Q5 an undecodable item loses only itself",
        shows="only the undecodable item may be lost",
        exclusive=True,
    ),
    Broken(
        "destroyed_reports_plain_closed",
        _destroyed_reports_plain_closed_factory(),
        ("test_destroyed_is_not_closed",),
        "Q21 or Q24 or E13",
        "E13 QueueDestroyed after destroy through another handle",
        shows="instead of <class 'sage_queue.errors.QueueDestroyed'>",
        exclusive=True,
    ),
]

# Module-level names, so that the kit can be pointed at each: tests.kit.broken:make_<name>.
for _b in BROKEN:
    globals()[f"make_{_b.name}"] = _b.factory
