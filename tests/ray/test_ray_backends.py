"""ray_actor and ray_queue on a real Ray instance: sharing by name, races, death, restart, threads, close.

Every test uses the session's Ray (conftest.py); queues are destroyed by the test (the leak guard
fails the session otherwise). Waits are bounded by timeouts; no test depends on a tight clock.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest
import ray
from ray_support import actor_of, check_no_leaked_actors, leaked_actors, open_handle

from sage_queue import (
    IncompatibleQueue,
    QueueClosed,
    QueueDescriptor,
    QueueDestroyed,
    QueueNotFound,
    resolve_descriptor,
)
from sage_queue.backends._ray import QueueActorLost

BOTH = ["ray_actor", "ray_queue"]


def _desc(queue_type: str, address: str, maxsize: int = 0, **metadata: Any) -> QueueDescriptor:
    return QueueDescriptor.create(queue_type, f"t_{uuid.uuid4().hex[:12]}", maxsize, address=address, **metadata)


# -- Ray tasks and actors as producers and consumers (RAY2) ------------------------------------------


@ray.remote(num_cpus=0)
def produce(desc_json: str, start: int, count: int) -> int:
    q = resolve_descriptor(desc_json)
    for i in range(start, start + count):
        q.put(i, timeout=30)
    q.close()
    return count


@ray.remote(num_cpus=0)
class Consumer:
    def __init__(self, desc_json: str) -> None:
        self.q = resolve_descriptor(desc_json)

    def take(self, count: int) -> list[Any]:
        return [self.q.get(timeout=30) for _ in range(count)]


@ray.remote(num_cpus=0)
class Producer:
    def __init__(self, desc_json: str) -> None:
        self.q = resolve_descriptor(desc_json)

    def put(self, items: list[Any]) -> int:
        for item in items:
            self.q.put(item, timeout=30)
        return len(items)


@pytest.mark.spec("RAY2")
@pytest.mark.timeout(90)
@pytest.mark.parametrize("queue_type", BOTH)
def test_tasks_and_actors_share_the_queue(queue_type: str, ray_address: str, made: list[Any]) -> None:
    desc = _desc(queue_type, ray_address, maxsize=5)  # bounded: producers must wait for the consumers
    q = open_handle(made, desc)
    consumer = Consumer.remote(desc.to_json())
    producer = Producer.remote(desc.to_json())
    try:
        taken = consumer.take.remote(40)  # blocks in the actor until the items come
        done = [produce.remote(desc.to_json(), 0, 20), producer.put.remote(list(range(100, 120)))]
        assert ray.get(done, timeout=60) == [20, 20]
        got = ray.get(taken, timeout=60)
    finally:
        ray.kill(consumer)
        ray.kill(producer)
    assert sorted(got) == list(range(20)) + list(range(100, 120))
    assert [x for x in got if x < 100] == list(range(20)), "a task's items out of order (Q3)"
    assert q.qsize() == 0


@pytest.mark.spec("RAY5")
@pytest.mark.timeout(90)
def test_blocked_get_never_blocks_puts_from_other_actors(ray_address: str, made: list[Any]) -> None:
    """SAGE's "distributed queue deadlock": a get waiting inside a synchronous actor stopped every put.

    Several gets (from a Ray actor and from this driver) wait on the empty queue before any put;
    puts from two other actors must still go through, and every get must return. Checked to fail
    (the puts time out) with _QueueActor run at max_concurrency=1, i.e. one call at a time.
    """
    desc = _desc("ray_actor", ray_address)
    q = open_handle(made, desc)
    consumer = Consumer.remote(desc.to_json())
    producers = [Producer.remote(desc.to_json()) for _ in range(2)]
    try:
        taken = consumer.take.remote(3)
        local: list[Any] = []
        waiter = threading.Thread(target=lambda: local.append(q.get(timeout=30)))
        waiter.start()
        time.sleep(0.5)  # the gets are parked in the actor
        assert ray.get([p.put.remote([f"p{i}-a", f"p{i}-b"]) for i, p in enumerate(producers)], timeout=20) == [2, 2]
        got = ray.get(taken, timeout=20)
        waiter.join(20)
        assert not waiter.is_alive()
    finally:
        for a in [consumer, *producers]:
            ray.kill(a)
    assert sorted(got + local) == ["p0-a", "p0-b", "p1-a", "p1-b"]


# -- race-free creation (RAY3) ----------------------------------------------------------------------


@ray.remote(num_cpus=0)
def resolve_and_put(desc_json: str, barrier_name: str) -> int:
    # Each task runs in its own worker process; they resolve as close to together as a barrier allows.
    barrier = ray.get_actor(barrier_name)
    ray.get(barrier.arrive.remote())
    while not ray.get(barrier.go.remote()):
        time.sleep(0.005)
    q = resolve_descriptor(desc_json)
    q.put(os.getpid())
    return os.getpid()


@ray.remote(num_cpus=0)
class Barrier:
    def __init__(self, n: int) -> None:
        self.n = n
        self.arrived = 0

    def arrive(self) -> None:
        self.arrived += 1

    def go(self) -> bool:
        return self.arrived >= self.n


@pytest.mark.spec("RAY3")
@pytest.mark.timeout(90)
@pytest.mark.parametrize("queue_type", BOTH)
def test_concurrent_resolve_makes_one_queue(queue_type: str, ray_address: str, made: list[Any]) -> None:
    desc = _desc(queue_type, ray_address)
    n = 4
    barrier_name = f"barrier_{uuid.uuid4().hex[:8]}"
    barrier = Barrier.options(name=barrier_name).remote(n)
    try:
        pids = ray.get([resolve_and_put.remote(desc.to_json(), barrier_name) for _ in range(n)], timeout=60)
    finally:
        ray.kill(barrier)
    q = open_handle(made, desc)
    got = [q.get(timeout=5) for _ in range(n)]
    assert sorted(got) == sorted(pids), "every resolver reached the same queue"
    ours = [a for a in leaked_actors() if a.endswith(f":{desc.queue_id}")]
    assert len(ours) == 1, f"racing resolvers made {ours}"


@pytest.mark.spec("RAY3")
@pytest.mark.parametrize("queue_type", BOTH)
def test_other_maxsize_is_incompatible(queue_type: str, ray_address: str, made: list[Any]) -> None:
    desc = _desc(queue_type, ray_address, maxsize=3)
    open_handle(made, desc)
    other = QueueDescriptor.create(queue_type, desc.queue_id, 4, address=ray_address)
    with pytest.raises(IncompatibleQueue, match="maxsize 3"):
        resolve_descriptor(other)


# -- destroy, death, restart (RAY8-RAY10) ---------------------------------------------------------------


@pytest.mark.spec("RAY8", "E13", "RAY12")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("queue_type", BOTH)
def test_destroy_kills_the_actor_and_reaches_every_handle(queue_type: str, ray_address: str) -> None:
    desc = _desc(queue_type, ray_address)
    a, b, c = (resolve_descriptor(desc) for _ in range(3))
    a.put("x")
    outcome: list[BaseException] = []

    def blocked() -> None:
        try:
            c.get()  # the queue is empty by then: b took "x"
        except BaseException as exc:
            outcome.append(exc)

    assert b.get(timeout=5) == "x"
    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.3)
    a.destroy()
    t.join(5)
    assert not t.is_alive(), "a blocked get was not woken by destroy()"
    assert len(outcome) == 1 and isinstance(outcome[0], QueueDestroyed), outcome
    with pytest.raises(QueueDestroyed):
        b.qsize()  # the actor is dead: the tombstone tells destroyed from died
    with pytest.raises(QueueDestroyed):
        b.destroy()
    assert not [x for x in leaked_actors() if x.endswith(f":{desc.queue_id}")], "destroy() left the actor alive"
    fresh = resolve_descriptor(desc)  # a new, empty queue under the same name (Q24)
    try:
        assert fresh.qsize() == 0
        fresh.put(1)
        assert fresh.get(timeout=5) == 1
    finally:
        fresh.destroy()


@pytest.mark.spec("RAY9", "E17")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("queue_type", BOTH)
def test_killed_actor_fails_fast_with_a_clear_error(queue_type: str, ray_address: str, made: list[Any]) -> None:
    q = open_handle(made, _desc(queue_type, ray_address))
    q.put("lost")
    outcome: list[BaseException] = []

    def blocked() -> None:
        try:
            q.get()
            q.get()
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.3)
    ray.kill(actor_of(q), no_restart=True)  # not destroy(): a crash, as the kill-actor fault does
    t.join(10)
    assert not t.is_alive(), "a blocked get hung on a dead actor"
    assert len(outcome) == 1 and isinstance(outcome[0], QueueActorLost), outcome
    assert not isinstance(outcome[0], QueueDestroyed)
    for call in (q.qsize, lambda: q.put(1), lambda: q.get(timeout=10)):
        t0 = time.monotonic()
        with pytest.raises(QueueActorLost, match="died"):
            call()
        assert time.monotonic() - t0 < 5.0, "a call on a dead actor must fail fast, not wait out its timeout"


@pytest.mark.spec("RAY9")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("queue_type", BOTH)
def test_kill_under_load_ends_every_caller(queue_type: str, ray_address: str, made: list[Any]) -> None:
    """The kill-actor fault in small: 4 producers and 4 consumers blocked without timeouts on a queue
    of 4; after the kill every one of them ends with QueueActorLost, none hangs."""
    q = open_handle(made, _desc(queue_type, ray_address, maxsize=4))
    outcomes: list[BaseException] = []
    moved = Counter[str]()

    def loop(kind: str) -> None:
        try:
            while True:
                if kind == "put":
                    q.put(kind)
                else:
                    q.get()
                moved[kind] += 1
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=loop, args=(k,)) for k in ("put", "get") * 4]
    for t in threads:
        t.start()
    time.sleep(0.5)
    ray.kill(actor_of(q), no_restart=True)
    for t in threads:
        t.join(15)
    assert not any(t.is_alive() for t in threads), "callers hung on a killed actor"
    assert moved["put"] > 0 and moved["get"] > 0, f"no load before the kill: {moved}"
    assert len(outcomes) == 8 and all(isinstance(e, QueueActorLost) for e in outcomes), outcomes


@pytest.mark.spec("RAY10")
@pytest.mark.timeout(90)
def test_restart_loses_items_loudly(ray_address: str, made: list[Any]) -> None:
    desc = _desc("ray_actor", ray_address, maxsize=7, max_restarts=1)
    q = open_handle(made, desc)
    other = open_handle(made, desc)
    q.put_many(["a", "b", "c"])
    ray.kill(actor_of(q), no_restart=False)  # Ray restarts it (max_restarts=1)
    deadline = time.monotonic() + 30
    errors: list[str] = []
    while True:
        # ray.kill returns before the actor is dead: the old incarnation may still answer (3 items); calls
        # in flight at the death fail ("died"); then the first call meets the new incarnation.
        try:
            depth = q.qsize()
            assert depth == 3, f"a restart lost items silently: qsize() {depth} without an error ({errors})"
        except QueueActorLost as exc:
            errors.append(str(exc))
            if "new, empty incarnation" in str(exc):
                break
        assert time.monotonic() < deadline, errors
        time.sleep(0.1)
    try:
        assert q.qsize() == 0, "a restarted actor starts empty"
    except QueueActorLost as exc:
        raise AssertionError(f"{errors} then {exc}") from exc
    assert q.stats().puts == 0
    with pytest.raises(QueueActorLost, match="new, empty incarnation"):
        other.get_nowait()  # every handle hears of it once
    other.put("c")
    assert q.get(timeout=5) == "c"
    assert q.maxsize == 7 and not q.full()


# -- threads, close, signals (Q6, Q23, RAY7) --------------------------------------------------------------


@pytest.mark.spec("Q6", "RAY5")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("queue_type", BOTH)
def test_64_threads_on_one_handle(queue_type: str, ray_address: str, made: list[Any]) -> None:
    q = open_handle(made, _desc(queue_type, ray_address, maxsize=8))
    producers, consumers, per = 32, 32, 6
    got: list[list[Any]] = [[] for _ in range(consumers)]
    errors: list[BaseException] = []

    def produce_items(p: int) -> None:
        try:
            for i in range(per):
                q.put((p, i), timeout=60)
        except BaseException as exc:
            errors.append(exc)

    def consume(c: int) -> None:
        try:
            for _ in range(per):
                got[c].append(q.get(timeout=60))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce_items, args=(p,)) for p in range(producers)]
    threads += [threading.Thread(target=consume, args=(c,)) for c in range(consumers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not any(t.is_alive() for t in threads), "threads stuck on one handle"
    assert not errors, errors[:3]
    flat = [x for g in got for x in g]
    assert Counter(flat) == Counter((p, i) for p in range(producers) for i in range(per))
    for g in got:  # per-producer order, seen by each consumer (Q3)
        for p in range(producers):
            mine = [i for (pp, i) in g if pp == p]
            assert mine == sorted(mine)


@pytest.mark.spec("Q23", "RAY7")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("queue_type", BOTH)
def test_close_from_signal_handler_in_the_blocked_thread(queue_type: str, ray_address: str, made: list[Any]) -> None:
    """The kit's signal test without its fork (a Ray connection does not survive fork, RAY11)."""
    assert threading.current_thread() is threading.main_thread()
    get_q = open_handle(made, _desc(queue_type, ray_address))
    put_q = open_handle(made, _desc(queue_type, ray_address, maxsize=1))
    put_q.put("full")
    for what, q, call in (("get", get_q, get_q.get), ("put", put_q, lambda: put_q.put("blocked"))):
        times: dict[str, float] = {}

        def handler(signum: int, frame: Any, q: Any = q, times: dict[str, float] = times) -> None:
            q.close()
            times["closed"] = time.monotonic()

        previous = signal.signal(signal.SIGUSR1, handler)
        sender = threading.Timer(
            0.3,
            lambda times=times: (
                times.__setitem__("sent", time.monotonic()),
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1),
            ),
        )
        sender.start()
        try:
            with pytest.raises(QueueClosed) as info:
                call()
        finally:
            sender.join()
            signal.signal(signal.SIGUSR1, previous)
        ended = time.monotonic()
        assert type(info.value) is QueueClosed, f"{what}: own close() must be plain QueueClosed"
        assert "closed" in times, f"{what}: the handler never ran"
        assert ended - times["sent"] < 1.0, f"{what}: QueueClosed {ended - times['sent']:.2f}s after the signal"


@pytest.mark.spec("RAY11")
@pytest.mark.timeout(60)
def test_forked_child_gets_queue_not_found(ray_address: str, made: list[Any]) -> None:
    q = open_handle(made, _desc("ray_actor", ray_address))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            signal.alarm(20)  # a hang here would be the bug: die instead
            try:
                q.put(1)
            except QueueNotFound:
                try:
                    resolve_descriptor(q.descriptor)
                except QueueNotFound:
                    code = 0
        finally:
            os.write(w, bytes([code]))
            os._exit(code)
    os.close(w)
    try:
        status = os.read(r, 1)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert status == b"\x00", "in a forked child, an inherited handle and resolve must raise QueueNotFound"
    q.put("parent still works")
    assert q.get(timeout=5) == "parent still works"


# -- the leak guard (RAY12) ------------------------------------------------------------------------------


@pytest.mark.spec("RAY12")
def test_leak_guard_fails_on_a_live_queue_actor(ray_address: str) -> None:
    """The session's guard (ray_support.check_no_leaked_actors) fails, naming the actor, and kills it."""
    desc = _desc("ray_queue", ray_address)
    q = resolve_descriptor(desc)
    with pytest.raises(pytest.fail.Exception, match=f"leak guard: .*:{desc.queue_id}"):
        check_no_leaked_actors(grace=0.5)
    assert not any(x.endswith(f":{desc.queue_id}") for x in leaked_actors()), "the guard did not kill it"
    with pytest.raises(QueueActorLost):  # killed by the guard, not destroyed
        q.qsize()
    check_no_leaked_actors(grace=0.5)  # nothing of ours left: passes


@pytest.mark.spec("RAY5")
def test_timeout_and_queue_full(ray_address: str, made: list[Any]) -> None:
    q = open_handle(made, _desc("ray_actor", ray_address, maxsize=2))
    q.put_many([1, 2])
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    with pytest.raises(ValueError, match="never fit"):
        q.put_many([1, 2, 3])
    assert q.get_many(5) == [1, 2]
    assert q.stats().waits == 1


@pytest.mark.spec("RAY6", "Q36", "Q37")
@pytest.mark.timeout(90)
def test_ray_queue_stats_count_what_this_handle_did(ray_address: str, made: list[Any]) -> None:
    """ray_queue's stats() are per handle (scope "handle"): items and pickled bytes it put and got,
    its calls that had to wait, the items it could not pickle or unpickle; depth is the actor's."""
    desc = _desc("ray_queue", ray_address, maxsize=2)
    a, b = open_handle(made, desc), open_handle(made, desc)
    a.put("x")
    a.put(b"yy")
    s = a.stats()
    assert s.scope == "handle"
    assert (s.puts, s.gets, s.depth, s.waits, s.errors) == (2, 0, 2, 0, 0)
    assert s.bytes_in == len(pickle.dumps("x", protocol=pickle.HIGHEST_PROTOCOL)) + len(
        pickle.dumps(b"yy", protocol=pickle.HIGHEST_PROTOCOL)
    )
    assert s.bytes_out == 0
    with pytest.raises(queue.Full):  # the queue is full: this put had to wait, and put nothing
        b.put("z", timeout=0.2)
    assert b.get(timeout=10) == "x"  # an item was there: no wait
    sb = b.stats()
    assert (sb.puts, sb.gets, sb.depth, sb.waits, sb.errors) == (0, 1, 1, 1, 0)
    assert sb.bytes_in == 0 and sb.bytes_out == len(pickle.dumps("x", protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(TypeError):  # an unpicklable item: pickle's own error, counted, nothing put
        a.put(threading.Lock())
    ray.get(actor_of(a).put_nowait.remote(b"not a pickle"))  # an undecodable item, behind b"yy"
    assert b.get(timeout=10) == b"yy"
    with pytest.raises(pickle.UnpicklingError):
        b.get(timeout=10)
    sa, sb = a.stats(), b.stats()
    assert (sa.puts, sa.errors, sa.depth) == (2, 1, 0)
    assert (sb.gets, sb.errors, sb.waits, sb.depth) == (3, 1, 1, 0)  # the undecodable item left the queue
    with pytest.raises(queue.Empty):  # empty: a wait, no get
        b.get(timeout=0.2)
    assert (b.stats().gets, b.stats().waits) == (3, 2)
