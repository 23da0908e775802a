"""The ``local`` backend's own behaviour: one queue per queue_id in one process (R7, R8), destroy,
adoption of ``queue.Queue``, close waking waiters, task tracking, stats, batches, pickling.

The generic ``QueueLike`` contract (Q*) is the conformance kit's job; this file checks what is
specific to ``local`` and the places where the front (``QueueStub``) meets it.
"""

from __future__ import annotations

import collections
import gc
import json
import multiprocessing
import os
import pickle
import queue
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sage_queue import (
    IncompatibleQueue,
    InvalidMetadata,
    QueueClosed,
    QueueDescriptor,
    QueueDestroyed,
    QueueLike,
    QueueNotFound,
    QueueStats,
    create_descriptor_from_existing_queue,
    get_local_queue,
    resolve_descriptor,
)
from sage_queue.backends.local import LocalQueueStub, destroy_local_queue, live_queue_ids

WAKEUP_S = 1.0  # Q23/Q24: a blocked call raises QueueClosed within 1 s


@pytest.fixture
def q() -> Iterator[LocalQueueStub]:
    handle = resolve_descriptor(QueueDescriptor.create_local_queue(maxsize=0, queue_id=f"t-{uuid.uuid4().hex}"))
    yield handle
    destroy_local_queue(handle.descriptor.queue_id)


@pytest.fixture
def bounded() -> Iterator[LocalQueueStub]:
    handle = get_local_queue(maxsize=2)
    yield handle
    destroy_local_queue(handle.descriptor.queue_id)


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``call`` in a daemon thread; the dict gets ``result`` or ``error`` and ``at`` (monotonic)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = call()
        except BaseException as exc:  # the test inspects whatever it raised
            box["error"] = exc
        box["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _wait_blocked(thread: threading.Thread) -> None:
    """Give ``thread`` time to reach its wait (it cannot signal that it is blocked)."""
    time.sleep(0.1)
    assert thread.is_alive(), "the call returned instead of blocking"


def _assert_woken_with_queue_closed(
    waiter: Any, blocked_call: str, wake: Callable[[], None], expected: type[QueueClosed] = QueueClosed
) -> None:
    """Block ``waiter`` (a handle on a maxsize=1 queue) in ``blocked_call``, then run ``wake``:
    the blocked call must raise exactly ``expected`` within WAKEUP_S (Q23/Q24, E13)."""
    if blocked_call != "get":
        waiter.put("fills the queue")  # put now blocks; join waits for its task_done
    call = {"get": waiter.get, "put": lambda: waiter.put("more"), "join": waiter.join}[blocked_call]
    thread, box = _in_thread(call)
    _wait_blocked(thread)
    woken_at = time.monotonic()
    wake()
    thread.join(5)
    assert not thread.is_alive()
    assert type(box.get("error")) is expected, box
    assert box["at"] - woken_at < WAKEUP_S


# -- basics ----------------------------------------------------------------------------------------


@pytest.mark.spec("R1")
def test_handle_is_queue_like_and_fifo(q: LocalQueueStub) -> None:
    assert isinstance(q, QueueLike)
    assert isinstance(queue.Queue(), QueueLike)
    items: list[Any] = [None, 0, "", [], {"k": [1, 2]}, b"x" * 100_000, object()]
    for item in items:
        q.put(item)
    got = [q.get_nowait() for _ in items]
    assert all(a is b for a, b in zip(got, items, strict=True))  # in-process: the very same objects (Q4 allows it)
    with pytest.raises(queue.Empty):
        q.get_nowait()


def test_unpicklable_items_pass_in_process(q: LocalQueueStub) -> None:
    # local never serialises, so a lambda (which pickle refuses) is a fine item here.
    item = lambda: 42  # noqa: E731
    q.put(item)
    assert q.get_nowait() is item


# -- R7 one queue per queue_id, alive until destroy ------------------------------------------------


@pytest.mark.spec("R7")
def test_resolving_twice_gives_the_same_queue(q: LocalQueueStub) -> None:
    other = resolve_descriptor(q.descriptor.to_json())
    assert other is not q
    q.put("a")
    other.put("b")
    assert other.qsize() == q.qsize() == 2
    assert [other.get_nowait(), q.get_nowait()] == ["a", "b"]
    other.close()


@pytest.mark.spec("R7")
def test_queue_outlives_its_handles_until_destroy() -> None:
    desc = QueueDescriptor.create_local_queue(maxsize=5)
    handle = resolve_descriptor(desc)
    handle.put("kept")
    handle.close()
    del handle
    gc.collect()
    assert desc.queue_id in live_queue_ids()
    again = resolve_descriptor(desc)
    assert again.get_nowait() == "kept"
    again.destroy()
    assert desc.queue_id not in live_queue_ids()


@pytest.mark.spec("R7")
def test_threads_share_a_queue_through_its_descriptor(q: LocalQueueStub) -> None:
    text = q.descriptor.to_json()
    per_thread = 200

    def produce(tag: int) -> None:
        handle = resolve_descriptor(text)
        for n in range(per_thread):
            handle.put((tag, n))
        handle.close()

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    got = [q.get(timeout=5) for _ in range(4 * per_thread)]
    for thread in threads:
        thread.join(5)
    assert sorted(got) == sorted((t, n) for t in range(4) for n in range(per_thread))
    for tag in range(4):  # FIFO per producer
        assert [n for t, n in got if t == tag] == list(range(per_thread))


@pytest.mark.spec("R7", "R2")
def test_same_queue_id_other_maxsize_is_incompatible(bounded: LocalQueueStub) -> None:
    desc = bounded.descriptor
    with pytest.raises(IncompatibleQueue, match="maxsize"):
        resolve_descriptor(
            {"queue_id": desc.queue_id, "queue_type": "local", "metadata": {"maxsize": 3, "owner_pid": os.getpid()}}
        )


# -- R8 another process gets QueueNotFound ---------------------------------------------------------


def _resolve_in_spawned_child(text: str, out: Any) -> None:
    import sage_queue

    try:
        sage_queue.resolve_descriptor(text)
    except sage_queue.QueueNotFound as exc:
        out.put(("QueueNotFound", str(exc)))
    except BaseException as exc:
        out.put((type(exc).__name__, str(exc)))
    else:
        out.put(("resolved", ""))


def _check_not_found_message(message: str, queue_id: str) -> None:
    assert queue_id in message
    assert "local queues are reachable only inside their own process" in message
    for cross_process_type in ("shm", "sage", "ray_queue", "ray_actor", "rpc"):
        assert cross_process_type in message


@pytest.mark.spec("R8", "E6")
@pytest.mark.timeout(60)
def test_spawned_child_gets_queue_not_found(q: LocalQueueStub) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_resolve_in_spawned_child, args=(q.descriptor.to_json(), out))
    child.start()
    try:
        kind, message = out.get(timeout=45)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
        out.close()
        out.join_thread()
    assert kind == "QueueNotFound", message
    _check_not_found_message(message, q.descriptor.queue_id)


@pytest.mark.spec("R8", "E6")
@pytest.mark.timeout(60)
def test_subprocess_with_only_the_json_gets_queue_not_found(q: LocalQueueStub) -> None:
    script = textwrap.dedent(
        """
        import sys, pickle
        import sage_queue
        text = sys.stdin.read()
        try:
            sage_queue.resolve_descriptor(text)
        except sage_queue.QueueNotFound as exc:
            print("QueueNotFound:" + str(exc))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], input=q.descriptor.to_json(), capture_output=True, text=True, timeout=50
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("QueueNotFound:"), out.stdout
    _check_not_found_message(out.stdout, q.descriptor.queue_id)


@pytest.mark.spec("R8", "E6")
@pytest.mark.timeout(60)
def test_pickled_handle_does_not_resolve_in_another_process(q: LocalQueueStub) -> None:
    blob = pickle.dumps(q)
    script = textwrap.dedent(
        """
        import sys, pickle
        import sage_queue
        try:
            pickle.loads(sys.stdin.buffer.read())
        except sage_queue.QueueNotFound as exc:
            print("QueueNotFound:" + str(exc))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], input=blob, capture_output=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().startswith("QueueNotFound:")


@pytest.mark.spec("D10", "R8", "Q43")
@pytest.mark.timeout(60)
def test_subprocess_given_a_descriptor_without_owner_pid_makes_no_queue(q: LocalQueueStub) -> None:
    # Strip owner_pid from a live queue's JSON: the child must refuse it rather than silently make
    # a second, empty queue of its own under the same queue_id.
    data = q.descriptor.to_dict()
    del data["metadata"]["owner_pid"]
    script = textwrap.dedent(
        """
        import json, sys
        import sage_queue
        from sage_queue.backends.local import live_queue_ids
        try:
            sage_queue.resolve_descriptor(sys.stdin.read())
        except sage_queue.InvalidMetadata as exc:
            print(json.dumps(["InvalidMetadata", str(exc), live_queue_ids()]))
        else:
            print(json.dumps(["resolved", "", live_queue_ids()]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(data), capture_output=True, text=True, timeout=50
    )
    assert out.returncode == 0, out.stderr
    kind, message, child_queues = json.loads(out.stdout)
    assert kind == "InvalidMetadata", out.stdout
    assert "owner_pid" in message
    assert child_queues == []
    with pytest.raises(InvalidMetadata, match="owner_pid"):  # and the same here, in the owner
        resolve_descriptor(data)


@pytest.mark.spec("R8")
def test_owner_pid_of_another_process_is_refused_here_too() -> None:
    desc = QueueDescriptor(f"t-{uuid.uuid4().hex}", "local", {"owner_pid": os.getpid() + 1})
    before = live_queue_ids()
    with pytest.raises(QueueNotFound):
        resolve_descriptor(desc)
    assert live_queue_ids() == before


def _use_inherited_handle(handle: LocalQueueStub) -> None:
    try:
        handle.put("from the forked child")
    except QueueNotFound as exc:
        os._exit(0 if "local queues are reachable only inside their own process" in str(exc) else 3)
    except BaseException:
        os._exit(2)
    os._exit(1)  # the put went into the child's private copy: silently lost for the parent


def _new_queue_after_fork() -> None:
    try:
        handle = get_local_queue()
        handle.put(1)
        os._exit(0 if handle.get_nowait() == 1 else 1)
    except BaseException:
        os._exit(2)


def _run_forked(target: Callable[..., None], *args: Any) -> int:
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join(20)
    if child.is_alive():
        child.kill()
        child.join()
        return -1
    assert child.exitcode is not None
    return child.exitcode


@pytest.mark.spec("R8")
@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX")
def test_forked_child_cannot_use_an_inherited_handle(q: LocalQueueStub) -> None:
    # With the fork start method a handle is inherited, not pickled, so it never goes through
    # resolve; using it must not silently put into the child's copy of the queue (Q43).
    assert _run_forked(_use_inherited_handle, q) == 0
    assert q.empty()


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX")
def test_forked_child_has_a_working_registry_even_if_its_lock_was_held() -> None:
    from sage_queue.backends import local

    with local._registry_lock:  # another thread of the parent holds it at fork time
        status = _run_forked(_new_queue_after_fork)
    assert status == 0, "the child hung or failed on the registry lock it inherited"


# -- pickling in-process (Q27) ---------------------------------------------------------------------


def test_pickled_handle_resolves_in_process(q: LocalQueueStub) -> None:
    q.put("before")
    clone = pickle.loads(pickle.dumps(q))
    assert isinstance(clone, LocalQueueStub) and clone is not q
    assert clone.descriptor == q.descriptor
    assert clone.get_nowait() == "before"
    clone.put("after")
    assert q.get_nowait() == "after"
    assert len(pickle.dumps(q)) < 1000  # only the descriptor travels


# -- close -----------------------------------------------------------------------------------------


def test_close_is_idempotent_and_per_handle(q: LocalQueueStub) -> None:
    other = resolve_descriptor(q.descriptor)
    q.put(1)
    other.close()
    other.close()
    assert other.closed and not q.closed
    for operation in (
        lambda: other.put(2),
        other.get,
        other.get_nowait,
        lambda: other.put_nowait(2),
        other.qsize,
        other.empty,
        other.full,
        lambda: other.put_many([1]),
        lambda: other.get_many(1),
        other.stats,
        other.task_done,
        other.join,
        other.destroy,
        other.__enter__,
    ):
        with pytest.raises(QueueClosed) as info:
            operation()
        assert type(info.value) is QueueClosed  # closed by its own close(): not QueueDestroyed (E13)
    assert q.get_nowait() == 1  # the queue and its items are untouched


def test_with_block_closes_without_destroying(q: LocalQueueStub) -> None:
    with resolve_descriptor(q.descriptor) as inner:
        assert isinstance(inner, LocalQueueStub)
        inner.put("x")
    assert inner.closed
    assert q.get_nowait() == "x"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("blocked_call", ["get", "put", "join"])
def test_close_wakes_a_blocked_call(blocked_call: str) -> None:
    handle = get_local_queue(maxsize=1)
    try:
        _assert_woken_with_queue_closed(handle, blocked_call, handle.close)
    finally:
        destroy_local_queue(handle.descriptor.queue_id)


@pytest.mark.timeout(20)
def test_close_of_one_handle_does_not_wake_another_handles_waiter(q: LocalQueueStub) -> None:
    other = resolve_descriptor(q.descriptor)
    thread, box = _in_thread(lambda: q.get(timeout=3))
    _wait_blocked(thread)
    other.close()
    time.sleep(0.2)
    assert thread.is_alive(), f"the waiter of an open handle gave up: {box}"
    other2 = resolve_descriptor(q.descriptor)
    other2.put("delivered")
    thread.join(5)
    assert box.get("result") == "delivered"


# -- destroy ---------------------------------------------------------------------------------------


@pytest.mark.spec("R7", "E13")
def test_destroy_removes_the_queue_for_every_handle() -> None:
    desc = QueueDescriptor.create_local_queue(maxsize=3)
    first, second = resolve_descriptor(desc), resolve_descriptor(desc)
    first.put("discarded")
    first.destroy()
    assert first.closed
    assert desc.queue_id not in live_queue_ids()
    # Destroyed through another handle: QueueDestroyed (a QueueClosed), on every operation (E13).
    for operation in (
        second.get_nowait,
        lambda: second.put(1),
        second.qsize,
        second.empty,
        second.full,
        second.stats,
        second.task_done,
        second.join,
        lambda: second.get_many(2),
        lambda: second.put_many([1]),
    ):
        with pytest.raises(QueueDestroyed):
            operation()
    with pytest.raises(QueueDestroyed):
        second.destroy()  # a second destroy(), through another handle
    assert second.closed
    with pytest.raises(QueueDestroyed):
        second.get_nowait()  # and the handle it closed keeps saying why
    with pytest.raises(QueueDestroyed):
        first.destroy()  # a second destroy() through the destroying handle
    with pytest.raises(QueueDestroyed):
        first.put(1)
    fresh = resolve_descriptor(desc)  # the descriptor allows creation: a new, empty queue
    try:
        assert fresh.empty()
        fresh.put("new")
        with pytest.raises(QueueDestroyed):
            second.get_nowait()  # the old handle stays on the destroyed queue
    finally:
        fresh.destroy()


@pytest.mark.spec("E13")
def test_own_close_wins_over_a_later_destroy() -> None:
    desc = QueueDescriptor.create_local_queue()
    closed, destroyer = resolve_descriptor(desc), resolve_descriptor(desc)
    closed.close()
    destroyer.destroy()
    with pytest.raises(QueueClosed) as info:
        closed.put(1)
    assert type(info.value) is QueueClosed  # this handle's own close() is the reason it cannot be used


@pytest.mark.spec("E13")
@pytest.mark.timeout(20)
@pytest.mark.parametrize("blocked_call", ["get", "put", "join"])
def test_destroy_wakes_waiters_of_other_handles(blocked_call: str) -> None:
    desc = QueueDescriptor.create_local_queue(maxsize=1)
    waiter, destroyer = resolve_descriptor(desc), resolve_descriptor(desc)
    _assert_woken_with_queue_closed(waiter, blocked_call, destroyer.destroy, QueueDestroyed)


@pytest.mark.spec("R7")
def test_destroyed_queues_leave_nothing_behind() -> None:
    import weakref

    before = live_queue_ids()
    states = []
    for n in range(500):
        handle = get_local_queue(maxsize=n % 3)
        handle.put(bytearray(1000))
        states.append(weakref.ref(handle._state))
        handle.destroy()
    del handle
    gc.collect()
    assert live_queue_ids() == before
    assert all(ref() is None for ref in states), "a destroyed queue is still referenced"


@pytest.mark.spec("Q24", "E9")
def test_destroy_through_a_stale_handle_is_queue_closed() -> None:
    desc = QueueDescriptor.create_local_queue(maxsize=3)
    first, stale = resolve_descriptor(desc), resolve_descriptor(desc)
    first.destroy()
    with pytest.raises(QueueClosed):
        stale.destroy()  # the queue is gone already: a second destroy is not silently a no-op
    assert desc.queue_id not in live_queue_ids()
    fresh = resolve_descriptor(desc)  # a new queue under the same queue_id
    try:
        fresh.put("kept")
        with pytest.raises(QueueClosed):
            stale.destroy()  # ... which a handle of the old queue must not take down
        assert desc.queue_id in live_queue_ids()
        assert fresh.get_nowait() == "kept"
    finally:
        fresh.destroy()
    with pytest.raises(QueueClosed):
        fresh.destroy()  # destroy closes the destroying handle; once more is QueueClosed too


def test_destroy_local_queue_by_id() -> None:
    handle = get_local_queue()
    queue_id = handle.descriptor.queue_id
    assert destroy_local_queue(queue_id) is True
    assert destroy_local_queue(queue_id) is False
    with pytest.raises(QueueClosed):
        handle.put(1)


# -- adoption of an existing queue.Queue (R6) ------------------------------------------------------


@pytest.mark.spec("R6")
@pytest.mark.timeout(20)
def test_adopted_queue_and_handles_block_and_wake_each_other() -> None:
    raw: queue.Queue[Any] = queue.Queue(maxsize=1)
    desc = create_descriptor_from_existing_queue(raw, "local")
    handle = resolve_descriptor(desc)
    try:
        thread, box = _in_thread(lambda: raw.get(timeout=5))  # a plain user of the queue.Queue
        _wait_blocked(thread)
        handle.put("from handle")
        thread.join(5)
        assert box.get("result") == "from handle"
        raw.put("fills")
        thread, box = _in_thread(lambda: handle.put("waits for room", timeout=5))
        _wait_blocked(thread)
        assert raw.get_nowait() == "fills"
        thread.join(5)
        assert "error" not in box
        assert handle.get_nowait() == "waits for room"
    finally:
        handle.destroy()


# -- task tracking ---------------------------------------------------------------------------------


@pytest.mark.spec("E3")
@pytest.mark.timeout(20)
def test_task_done_and_join(q: LocalQueueStub) -> None:
    other = resolve_descriptor(q.descriptor)
    q.put_many(["a", "b"])
    q.put("c")
    thread, box = _in_thread(q.join)
    _wait_blocked(thread)
    for _ in range(3):
        other.get_nowait()
    other.task_done()
    other.task_done()
    time.sleep(0.05)
    assert thread.is_alive(), "join returned before every item was done"
    other.task_done()
    thread.join(5)
    assert not thread.is_alive() and "error" not in box
    with pytest.raises(ValueError):
        other.task_done()
    q.join()  # nothing outstanding: returns at once


# -- stats -----------------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_stats_are_per_queue_and_count_items(bounded: LocalQueueStub) -> None:
    other = resolve_descriptor(bounded.descriptor)
    start = bounded.stats()
    assert isinstance(start, QueueStats)
    assert (start.scope, start.puts, start.gets, start.depth, start.waits) == ("queue", 0, 0, 0, 0)
    bounded.put_many([1, 2])
    other.get_many(5)
    bounded.put(3)
    bounded.put(4)
    thread, _ = _in_thread(lambda: bounded.put(5, timeout=5))
    _wait_blocked(thread)
    with pytest.raises(queue.Full):
        other.put(6, timeout=0.05)  # timed out: counts as a wait, not a put
    assert other.get(timeout=1) == 3
    thread.join(5)
    stats = other.stats()
    assert stats == bounded.stats()
    assert (stats.puts, stats.gets, stats.depth) == (5, 3, 2)
    assert stats.puts - stats.gets == stats.depth == other.qsize()
    assert stats.waits == 2
    with pytest.raises(AttributeError):
        stats.puts = 0  # type: ignore[misc,unused-ignore]


# -- batches ---------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_put_many_is_contiguous_under_concurrent_producers() -> None:
    handle = get_local_queue(maxsize=16)
    producers, batches, size = 4, 50, 5
    try:

        def produce(tag: int) -> None:
            for b in range(batches):
                handle.put_many([(tag, b, i) for i in range(size)], timeout=10)

        threads = [threading.Thread(target=produce, args=(t,), daemon=True) for t in range(producers)]
        for thread in threads:
            thread.start()
        got: list[Any] = []
        while len(got) < producers * batches * size:
            got.extend(handle.get_many(7, timeout=10))
        for thread in threads:
            thread.join(5)
        for start in range(0, len(got), size):
            chunk = got[start : start + size]
            tags = {(t, b) for t, b, _ in chunk}
            assert len(tags) == 1, f"a batch was interleaved: {chunk}"
            assert [i for *_, i in chunk] == list(range(size))
    finally:
        handle.destroy()


@pytest.mark.spec("E3")
def test_batch_that_cannot_fit_or_wait_enqueues_nothing(bounded: LocalQueueStub) -> None:
    with pytest.raises(ValueError, match="never fit"):
        bounded.put_many([1, 2, 3])
    assert bounded.empty()
    bounded.put("one")
    with pytest.raises(queue.Full):
        bounded.put_many(["x", "y"], block=False)
    with pytest.raises(queue.Full):
        bounded.put_many(["x", "y"], timeout=0.05)
    assert bounded.qsize() == 1
    bounded.put_many([])  # an empty batch is a no-op, even on a full queue
    bounded.put_many(iter(["two"]))
    assert bounded.get_many(10) == ["one", "two"]


@pytest.mark.spec("E3", "E4")
def test_get_many_arguments(q: LocalQueueStub) -> None:
    q.put_many(range(5))
    assert q.get_many(2) == [0, 1]
    with pytest.raises(ValueError):
        q.get_many(0)
    with pytest.raises(TypeError):
        q.get_many("2")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        q.get_many(True)
    assert q.qsize() == 3
    assert q.get_many(100, timeout=0) == [2, 3, 4]
    started = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get_many(3, timeout=0.1)
    assert time.monotonic() - started >= 0.1


@pytest.mark.timeout(20)
def test_get_many_does_not_wait_for_a_second_item(q: LocalQueueStub) -> None:
    thread, box = _in_thread(lambda: q.get_many(10, timeout=5))
    _wait_blocked(thread)
    q.put("only")
    thread.join(5)
    assert box.get("result") == ["only"]


# -- a model-based check: local against a plain deque ---------------------------------------------------------


class LocalAgainstModel(RuleBasedStateMachine):
    """Non-blocking operations on several handles of one local queue, checked against a deque.

    The model also keeps the counters that ``stats()`` and ``task_done()`` must agree with.
    """

    def __init__(self) -> None:
        super().__init__()
        self.maxsize = 3
        self.desc = QueueDescriptor.create_local_queue(maxsize=self.maxsize)
        self.handles = [resolve_descriptor(self.desc)]
        self.items: collections.deque[int] = collections.deque()
        self.puts = self.gets = self.unfinished = 0
        self.counter = 0

    def _handle(self, index: int) -> Any:
        return self.handles[index % len(self.handles)]

    @rule()
    def open_another_handle(self) -> None:
        self.handles.append(resolve_descriptor(self.desc.to_json()))

    @rule(index=st.integers(0, 5))
    def close_a_handle(self, index: int) -> None:
        if len(self.handles) > 1:
            self.handles.pop(index % len(self.handles)).close()

    @rule(index=st.integers(0, 5), count=st.integers(1, 4))
    def put_many(self, index: int, count: int) -> None:
        batch = list(range(self.counter, self.counter + count))
        self.counter += count
        handle = self._handle(index)
        if count > self.maxsize:
            with pytest.raises(ValueError):
                handle.put_many(batch, block=False)
        elif len(self.items) + count > self.maxsize:
            with pytest.raises(queue.Full):
                handle.put_many(batch, block=False)
        else:
            handle.put_many(batch, block=False)
            self.items.extend(batch)
            self.puts += count
            self.unfinished += count

    @rule(index=st.integers(0, 5))
    def put_nowait(self, index: int) -> None:
        self.put_many(index, 1)

    @rule(index=st.integers(0, 5), max_items=st.integers(1, 4))
    def get_many(self, index: int, max_items: int) -> None:
        handle = self._handle(index)
        if not self.items:
            with pytest.raises(queue.Empty):
                handle.get_many(max_items, block=False)
            return
        expected = [self.items.popleft() for _ in range(min(max_items, len(self.items)))]
        assert handle.get_many(max_items, block=False) == expected
        self.gets += len(expected)

    @rule(index=st.integers(0, 5))
    def get_nowait(self, index: int) -> None:
        handle = self._handle(index)
        if not self.items:
            with pytest.raises(queue.Empty):
                handle.get_nowait()
            return
        assert handle.get_nowait() == self.items.popleft()
        self.gets += 1

    @rule(index=st.integers(0, 5))
    def task_done(self, index: int) -> None:
        if self.unfinished:
            self._handle(index).task_done()
            self.unfinished -= 1
        else:
            with pytest.raises(ValueError):
                self._handle(index).task_done()

    @invariant()
    def sizes_and_stats_agree(self) -> None:
        handle = self.handles[-1]
        assert handle.qsize() == len(self.items)
        assert handle.empty() == (not self.items)
        assert handle.full() == (len(self.items) >= self.maxsize)
        stats = handle.stats()
        assert (stats.puts, stats.gets, stats.depth) == (self.puts, self.gets, len(self.items))

    def teardown(self) -> None:
        destroy_local_queue(self.desc.queue_id)


TestLocalAgainstModel = LocalAgainstModel.TestCase
TestLocalAgainstModel.settings = settings(stateful_step_count=30, deadline=None)
