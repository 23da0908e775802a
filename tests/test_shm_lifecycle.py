"""``shm`` destroy versus close (E13), many threads on one handle, close from a signal handler."""

from __future__ import annotations

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

from sage_queue import QueueClosed, QueueDescriptor, QueueDestroyed, resolve_descriptor
from sage_queue.backends import shm

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def desc() -> Iterator[QueueDescriptor]:
    d = QueueDescriptor.create_shm_queue(f"t-life-{uuid.uuid4().hex[:12]}", capacity_bytes=4096)
    yield d
    shm.remove_segment(d.metadata["shm_name"])


OPERATIONS: dict[str, Callable[[Any], Any]] = {
    "put": lambda q: q.put(1, timeout=1),
    "put_nowait": lambda q: q.put_nowait(1),
    "get": lambda q: q.get(timeout=1),
    "get_nowait": lambda q: q.get_nowait(),
    "put_many": lambda q: q.put_many([1, 2], timeout=1),
    "get_many": lambda q: q.get_many(5, timeout=1),
    "qsize": lambda q: q.qsize(),
    "stats": lambda q: q.stats(),
    "destroy": lambda q: q.destroy(),
}


@pytest.mark.spec("E13", "SHM3")
@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_an_operation_after_another_handle_destroyed_the_queue_raises_queue_destroyed(
    desc: QueueDescriptor, op: str
) -> None:
    victim, killer = resolve_descriptor(desc), resolve_descriptor(desc)
    victim.put("x")
    killer.destroy()
    with pytest.raises(QueueDestroyed, match="destroyed"):
        OPERATIONS[op](victim)
    with pytest.raises(QueueDestroyed):  # and on every later call
        victim.qsize()
    victim.close()


@pytest.mark.spec("E13", "E9")
@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_an_operation_after_this_handles_own_close_raises_plain_queue_closed(desc: QueueDescriptor, op: str) -> None:
    q, other = resolve_descriptor(desc), resolve_descriptor(desc)
    q.close()
    with pytest.raises(QueueClosed) as info:
        OPERATIONS[op](q)
    assert type(info.value) is QueueClosed
    assert other.qsize() == 0  # the queue itself lives on
    other.destroy()


@pytest.mark.spec("E13", "SHM3")
def test_a_call_blocked_in_another_process_wakes_with_queue_destroyed(desc: QueueDescriptor) -> None:
    q = resolve_descriptor(desc)
    code = textwrap.dedent(
        """
        import sys, time
        from sage_queue import QueueDestroyed, resolve_descriptor
        q = resolve_descriptor(sys.stdin.readline())
        print("ready", flush=True)
        start = time.monotonic()
        try:
            q.get(timeout=30)
        except QueueDestroyed as exc:
            print("QueueDestroyed", round(time.monotonic() - start, 1), flush=True)
        except BaseException as exc:
            print("other", type(exc).__name__, exc, flush=True)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(desc.to_json() + "\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # let it block
        q.destroy()
        out, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert out.startswith("QueueDestroyed"), (out, err)


@pytest.mark.spec("SHM10")
@pytest.mark.timeout(180)
def test_64_threads_share_one_handle(desc: QueueDescriptor) -> None:
    # 32 producers and 32 consumers on ONE handle, blocking and nowait calls mixed, a ring
    # small enough that both sides wait: nothing lost, duplicated, or out of producer order.
    small = QueueDescriptor.create_shm_queue(desc.metadata["shm_name"], capacity_bytes=512, maxsize=8)
    q = resolve_descriptor(small)
    producers, consumers, per_producer = 32, 32, 150
    got: list[list[tuple[int, int]]] = [[] for _ in range(consumers)]
    errors: list[BaseException] = []
    done = threading.Event()

    def produce(p: int) -> None:
        try:
            for i in range(per_producer):
                if i % 3 == 0:
                    while True:
                        try:
                            q.put_nowait((p, i))
                            break
                        except queue.Full:
                            time.sleep(0.0005)
                else:
                    q.put((p, i), timeout=60)
        except BaseException as exc:
            errors.append(exc)

    def consume(c: int) -> None:
        try:
            while not done.is_set():
                try:
                    if c % 2:
                        got[c].append(q.get(timeout=0.05))
                    else:
                        got[c].append(q.get_nowait())
                except queue.Empty:
                    time.sleep(0.0002 if c % 2 == 0 else 0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    threads += [threading.Thread(target=consume, args=(c,)) for c in range(consumers)]
    for t in threads:
        t.start()
    for t in threads[:producers]:
        t.join(150)
    deadline = time.monotonic() + 60
    while sum(map(len, got)) < producers * per_producer and time.monotonic() < deadline and not errors:
        time.sleep(0.01)
    done.set()
    for t in threads:
        t.join(30)
    try:
        assert not errors, errors[:3]
        assert not any(t.is_alive() for t in threads)
        everything = sorted(item for part in got for item in part)
        assert everything == sorted((p, i) for p in range(producers) for i in range(per_producer))
        for part in got:  # each consumer saw each producer's items in order
            for p in range(producers):
                mine = [i for (pp, i) in part if pp == p]
                assert mine == sorted(mine)
        assert q.qsize() == 0
    finally:
        q.destroy()


@pytest.mark.spec("SHM13", "Q24")
@pytest.mark.parametrize("where", ["empty", "lock"])
def test_a_signal_handler_that_closes_the_queue_ends_a_blocked_get(desc: QueueDescriptor, where: str) -> None:
    # "empty": the get sleeps on an empty queue when SIGALRM arrives. "lock": the get waits
    # for the consumer lock, held for 2 s by another process, so the handler runs while this
    # thread holds the handle's consumer thread lock: close() must not wait for it forever,
    # and the get raises QueueClosed once it has the lock (lock waits are unbounded, SHM11).
    holder = None
    if where == "lock":
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(
                    """
                import sys, time
                from sage_queue import resolve_descriptor
                from sage_queue.backends.shm import CONSUMER
                q = resolve_descriptor(sys.stdin.readline())
                q._acquire(CONSUMER)
                print("holding", flush=True)
                time.sleep(2)  # then exits: the kernel releases the lock
                """
                ),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write(desc.to_json() + "\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "holding"
    code = textwrap.dedent(
        """
        import signal, sys, time
        from sage_queue import QueueClosed, resolve_descriptor
        q = resolve_descriptor(sys.stdin.readline())
        closed_at = []
        def handler(signum, frame):
            closed_at.append(time.monotonic())
            q.close()
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        try:
            q.get(timeout=20)
        except QueueClosed as exc:
            late = time.monotonic() - closed_at[0]
            print("QueueClosed" if type(exc) is QueueClosed else type(exc).__name__, f"{late:.2f}", flush=True)
        except BaseException as exc:
            print("other", type(exc).__name__, exc, flush=True)
        """
    )
    try:
        child = subprocess.run(
            [sys.executable, "-c", code], input=desc.to_json() + "\n", capture_output=True, text=True, timeout=30
        )
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    word, _, late = child.stdout.strip().partition(" ")
    assert word == "QueueClosed", (child.stdout, child.stderr)
    assert float(late) < 10.0  # promptly: not after the 20 s timeout (generous for a loaded box)
    resolve_descriptor(desc).destroy()


@pytest.mark.spec("E13", "SHM3")
def test_a_thread_blocked_on_a_handle_that_finds_the_queue_destroyed_gets_queue_destroyed(
    desc: QueueDescriptor,
) -> None:
    # Thread 1 sleeps in get on handle h; thread 2's next call on h finds the queue destroyed
    # (by another handle) and closes h: thread 1 must see QueueDestroyed, not plain QueueClosed.
    h, killer = resolve_descriptor(desc), resolve_descriptor(desc)
    seen: list[BaseException] = []

    def blocked() -> None:
        try:
            h.get(timeout=20)
        except BaseException as exc:
            seen.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.2)
    killer.destroy()
    with pytest.raises(QueueDestroyed):
        h.put_nowait(1)
    t.join(10)
    assert not t.is_alive()
    assert len(seen) == 1 and type(seen[0]) is QueueDestroyed, seen
