"""ray_actor with a stopped actor: its worker process SIGSTOPped (as a debugger, an overloaded host or
a paused container would), then SIGCONTed. Calls must not report a put that took effect as Full,
lose an item, or overrun their timeout by more than the documented grace (spec RAY13, E16).

The actor's pid comes from the actor itself (``__ray_call__``); every stop is undone in a finally.
ray_queue under the same attack: test_ray_queue_on_a_stopped_actor here, the rest in
test_ray_queue_stopped.py (RAY15).
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import ray
from ray_support import (
    SLACK,
    actor_of,
    actor_pid,
    check_64_threads_through_a_stop,
    check_close_from_a_signal_handler,
    drain,
    open_handle,
    stopped,
    timed,
)

from sage_queue import (
    QueueClosed,
    QueueConnectionError,
    QueueDescriptor,
    QueueDestroyed,
)
from sage_queue.backends import ray_actor as ray_actor_backend

GRACE = ray_actor_backend._GRACE_S


def _desc(queue_type: str, address: str, maxsize: int = 0) -> QueueDescriptor:
    return QueueDescriptor.create(queue_type, f"t_{uuid.uuid4().hex[:12]}", maxsize, address=address)


def _parked(h: Any) -> int:
    """How many calls wait inside the ray_actor actor now."""
    n: int = ray.get(actor_of(h).__ray_call__.remote(lambda self: len(self.waiting)), timeout=30)
    return n


def _dropped(h: Any) -> int:
    """How many waiters the ray_actor actor dropped as silent (their handle sent no heartbeat)."""
    n: int = ray.get(actor_of(h).__ray_call__.remote(lambda self: self.dropped), timeout=30)
    return n


def _wait_parked(h: Any, n: int) -> None:
    end = time.monotonic() + 30
    while _parked(h) < n:
        assert time.monotonic() < end, f"fewer than {n} calls parked in the actor after 30 s"
        time.sleep(0.02)


def _park_64(call: Callable[[], Any], watch: Any) -> tuple[list[threading.Thread], list[Any]]:
    """64 threads, each adding what ``call()`` returns to the list returned; returns once 64 calls wait
    in the actor (as another handle, ``watch``, sees)."""
    results: list[Any] = []
    lock = threading.Lock()

    def park() -> None:
        result = call()
        with lock:
            results.append(result)

    threads = [threading.Thread(target=park) for _ in range(64)]
    for t in threads:
        t.start()
    _wait_parked(watch, 64)
    return threads, results


def _drain(q: Any) -> list[Any]:
    return drain(q, batch=True)


@pytest.mark.spec("RAY13", "E16")
@pytest.mark.timeout(120)
def test_calls_on_a_stopped_actor_raise_connection_error_and_do_nothing(ray_address: str, made: list[Any]) -> None:
    """Old code: the put raised queue.Full 2.5 s after a 0.5 s timeout, and was enqueued on resume."""
    q = open_handle(made, _desc("ray_actor", ray_address, maxsize=3))
    q.put("kept")
    pid = actor_pid(q)
    calls = {
        "put": lambda: q.put("late put", timeout=0.5),
        "get": lambda: q.get(timeout=0.5),
        "put_many": lambda: q.put_many(["late a", "late b"], timeout=0.3),
        "get_many": lambda: q.get_many(5, timeout=0.3),
        "put_nowait": lambda: q.put_nowait("late nowait"),
    }
    outcomes: dict[str, tuple[BaseException | None, float]] = {}
    with stopped(pid):
        for name, call in calls.items():
            outcomes[name] = timed(call)
    for name, (exc, elapsed) in outcomes.items():
        assert isinstance(exc, QueueConnectionError), f"{name} on a stopped actor: {exc!r}, not QueueConnectionError"
        assert not isinstance(exc, queue.Full | queue.Empty)
        assert elapsed < 0.5 + GRACE + SLACK, f"{name} took {elapsed:.2f} s (timeout <= 0.5, grace {GRACE})"
    time.sleep(1.0)  # late answers, if any, reach the handle (a get's items go back to the head)
    # One node, one clock: every call above started in the actor past its expiry and was refused.
    assert _drain(q) == ["kept"], "a call abandoned by its caller took effect when the actor resumed"
    q.put("after")
    assert q.get(timeout=5) == "after"
    assert q.stats().depth == 0


@pytest.mark.spec("RAY13")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["get", "put"])
def test_stop_while_a_call_is_parked(kind: str, ray_address: str, made: list[Any]) -> None:
    """A get parked on an empty queue (a put on a full one) when the actor stops; meanwhile another
    handle's put (get) is sent, which the actor receives on resume. The parked call's caller has
    given up by then: it raised QueueConnectionError (old code: Empty/Full), and the item is neither
    lost nor duplicated."""
    desc = _desc("ray_actor", ray_address, maxsize=1)
    q, other = open_handle(made, desc), open_handle(made, desc)
    if kind == "put":
        q.put("first")
    outcome: list[tuple[BaseException | None, float]] = []
    call = (lambda: q.get(timeout=1.0)) if kind == "get" else (lambda: q.put("parked put", timeout=1.0))
    t = threading.Thread(target=lambda: outcome.append(timed(call)))
    t.start()
    _wait_parked(q, 1)
    pid = actor_pid(q)
    late: list[Any] = []
    with stopped(pid):
        # The other handle's call reaches the actor only on resume; its own timeout outlasts the stop.
        mover = threading.Thread(
            target=lambda: late.append(other.put("x", timeout=30) if kind == "get" else other.get(timeout=30))
        )
        mover.start()
        t.join(1.0 + GRACE + SLACK + 5)
    mover.join(30)
    assert not t.is_alive() and not mover.is_alive()
    exc, elapsed = outcome[0]
    assert isinstance(exc, QueueConnectionError), f"parked {kind}: {exc!r}"
    assert elapsed < 1.0 + GRACE + SLACK, f"parked {kind} took {elapsed:.2f} s"
    time.sleep(1.0)
    if kind == "get":
        assert late == [None]
        assert _drain(q) == ["x"], "the item put on resume was given to the abandoned get, or lost"
    else:
        assert late == ["first"]
        assert _drain(q) == [], "the abandoned put took effect on resume"
    q.put("works")
    assert other.get(timeout=5) == "works"


@pytest.mark.spec("RAY13")
@pytest.mark.timeout(120)
def test_a_short_stop_is_only_a_delay(ray_address: str, made: list[Any]) -> None:
    """A stop shorter than the callers' timeouts changes nothing: the parked get and the put sent
    during the stop both succeed on resume (the expiry never refuses a call its caller still waits for)."""
    q = open_handle(made, _desc("ray_actor", ray_address))
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=20)))
    t.start()
    _wait_parked(q, 1)
    put_errors: list[BaseException] = []

    def put() -> None:
        try:
            q.put("during", timeout=20)
        except BaseException as exc:
            put_errors.append(exc)

    with stopped(actor_pid(q)):
        p = threading.Thread(target=put)
        p.start()
        time.sleep(1.0)
    p.join(20)
    t.join(20)
    assert not put_errors and got == ["during"]
    assert q.qsize() == 0


@pytest.mark.spec("RAY13", "Q6")
@pytest.mark.timeout(180)
def test_64_threads_through_a_stop(ray_address: str, made: list[Any]) -> None:
    """32 producers and 32 consumers on one handle (maxsize 8, timeouts 0.5 s); the actor is stopped
    for 3.5 s in the middle. Nothing that raised Full is in the queue or was got; nothing is lost or
    duplicated; no call overruns timeout + grace; calls caught by the stop raise
    QueueConnectionError (old code: none did, they raised Full/Empty)."""
    q = open_handle(made, _desc("ray_actor", ray_address, maxsize=8))
    check_64_threads_through_a_stop(q, grace=GRACE, slack=SLACK, settle=1.0, batch=True)


@pytest.mark.spec("RAY13")
@pytest.mark.timeout(60)
def test_an_actor_clock_ahead_is_corrected_not_refused(ray_address: str, made: list[Any]) -> None:
    """The handle's offset estimate made 100 s wrong (as an actor clock 100 s ahead of it would): the
    actor refuses the first call before its caller's deadline, the handle corrects the estimate and
    makes the call again; nothing fails, nothing is done twice."""
    q = open_handle(made, _desc("ray_actor", ray_address))
    q._skew -= 100.0
    q.put("a", timeout=10)
    assert abs(q._skew) < 5.0, "the estimate was not corrected"
    q._skew -= 100.0
    assert q.get(timeout=10) == "a"
    assert q.qsize() == 0 and q.stats().puts == 1


@pytest.mark.spec("RAY13")
@pytest.mark.timeout(60)
def test_a_late_get_gives_its_item_back_to_the_head(ray_address: str, made: list[Any]) -> None:
    """Without the expiry's protection (the handle's estimate puts the actor's clock 1000 s ahead, as an
    actor clock behind it would), a get abandoned on a stopped actor is executed on resume and takes
    the head item: the handle puts it back at the head when the late answer arrives."""
    q = open_handle(made, _desc("ray_actor", ray_address))
    q.put_many([1, 2, 3])
    q._skew += 1000.0
    with stopped(actor_pid(q)):
        exc, _ = timed(lambda: q.get(timeout=0.3))
    assert isinstance(exc, QueueConnectionError), repr(exc)
    end = time.monotonic() + 20
    while q.stats().gets != 0:  # the late get ran (gets 1), then its item came back (gets 0)
        assert time.monotonic() < end, f"the late get's item was not given back: {q.stats()}"
        time.sleep(0.05)
    assert _drain(q) == [1, 2, 3]


@pytest.mark.spec("RAY7", "RAY13")
@pytest.mark.timeout(60)
def test_close_from_a_signal_handler_while_the_actor_is_stopped(ray_address: str, made: list[Any]) -> None:
    """A get parked (no timeout) on a stopped actor; a signal handler in the blocked thread closes the
    handle: QueueClosed within the close wake-up plus the grace (the cancel is not answered), and an
    item put after the actor resumes is not lost to the abandoned get."""
    desc = _desc("ray_actor", ray_address)
    q, other = open_handle(made, desc), open_handle(made, desc)
    check_close_from_a_signal_handler(
        q, other, before_stop=lambda: _wait_parked(other, 1), after_stop=lambda: None, grace=GRACE, settle=0.0
    )


@pytest.mark.spec("RAY13", "E16")
@pytest.mark.timeout(90)
def test_calls_that_do_not_wait_on_a_stopped_actor(ray_address: str, made: list[Any]) -> None:
    """qsize, stats, task_done hung (ray.get without a bound) on a stopped actor, and close() did not
    wake them: now QueueConnectionError after the grace, QueueClosed on close; destroy() kills it."""
    desc = _desc("ray_actor", ray_address)
    q, other = open_handle(made, desc), open_handle(made, desc)
    q.put("a")
    parked: list[tuple[BaseException | None, float]] = []
    waiter = threading.Thread(target=lambda: parked.append(timed(lambda: other.put_many(["b"] * 3, timeout=None))))
    pid = actor_pid(q)
    with stopped(pid):
        for name, call in (("qsize", q.qsize), ("stats", q.stats), ("task_done", q.task_done)):
            exc, elapsed = timed(call)
            assert isinstance(exc, QueueConnectionError), f"{name}: {exc!r}"
            assert elapsed < GRACE + SLACK, f"{name} took {elapsed:.2f} s"
        closer = threading.Timer(0.3, q.close)
        closer.start()
        exc, elapsed = timed(q.qsize)
        closer.join()
        assert type(exc) is QueueClosed and elapsed < 0.3 + 0.1 + SLACK, (exc, elapsed)
    assert other.qsize() == 1 and other.stats().puts == 1  # the actor resumed, unharmed
    q2 = open_handle(made, desc)
    with stopped(pid):
        waiter.start()
        time.sleep(0.5)
        exc, elapsed = timed(q2.destroy)  # its answer never comes: the actor is killed anyway
        assert exc is None and elapsed < GRACE + SLACK + 5, (exc, elapsed)
        waiter.join(30)
    assert parked and isinstance(parked[0][0], QueueDestroyed), parked
    with pytest.raises(QueueDestroyed):
        other.qsize()


@pytest.mark.spec("RAY5")
@pytest.mark.timeout(90)
def test_live_callers_parked_long_are_not_dropped(ray_address: str, made: list[Any]) -> None:
    """64 threads of one live handle parked in get (no timeout) for twice the stale time: the handle's
    heartbeats keep them parked (the actor counts one wait each, no re-park), and each gets an item."""
    desc = _desc("ray_actor", ray_address)
    q, other = open_handle(made, desc), open_handle(made, desc)
    threads, got = _park_64(lambda: q.get(timeout=60), other)
    time.sleep(2 * ray_actor_backend._STALE_S)
    other.put_many(list(range(64)))
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert sorted(got) == list(range(64))
    assert _dropped(other) == 0, "live waiters were dropped as silent"


_PARK_AND_REPORT = """
import sys
from sage_queue import resolve_descriptor
q = resolve_descriptor(sys.argv[1])
print("got", q.get(timeout=60), flush=True)
"""


@pytest.mark.spec("RAY5")
@pytest.mark.timeout(120)
def test_a_stopped_caller_parked_in_get_is_dropped_then_parks_again(ray_address: str, made: list[Any]) -> None:
    """A process parked in get is SIGSTOPped for longer than _STALE_S: an item put meanwhile is not
    handed to it (it might be dead) but stays in the queue; resumed, it parks again unseen by its
    user and gets the next item."""
    desc = _desc("ray_actor", ray_address)
    q = open_handle(made, desc)
    child = subprocess.Popen(
        [sys.executable, "-c", _PARK_AND_REPORT, desc.to_json()],
        env={**os.environ, "RAY_ADDRESS": ray_address},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_parked(q, 1)
        with stopped(child.pid):
            time.sleep(ray_actor_backend._STALE_S + 1.0)
            q.put("while stopped")
            assert q.get(timeout=10) == "while stopped", "the item went to the stopped process's get"
        end = time.monotonic() + 30
        while _parked(q) < 1:  # the child's call came back "gone" and was made again
            assert child.poll() is None and time.monotonic() < end, child.communicate(timeout=10)
            time.sleep(0.05)
        q.put("after")
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
        child.wait(30)
    assert child.returncode == 0 and out.split() == ["got", "after"], (out, err[-2000:])
    assert q.qsize() == 0


@pytest.mark.spec("RAY7", "RAY13")
@pytest.mark.timeout(90)
def test_close_with_64_threads_parked_on_a_stopped_actor(ray_address: str, made: list[Any]) -> None:
    """64 threads of one handle parked in get (no timeout), the actor stopped, the handle closed from
    another thread: every thread raises QueueClosed within the grace; after the actor resumes, items
    put by another handle are all there (none handed to the abandoned gets, or they were given back)."""
    desc = _desc("ray_actor", ray_address)
    q, other = open_handle(made, desc), open_handle(made, desc)
    threads, outcomes = _park_64(lambda: timed(q.get), other)
    with stopped(actor_pid(q)):
        closed_at = time.monotonic()
        q.close()
        for t in threads:
            t.join(max(0.1, closed_at + 0.1 + GRACE + SLACK + 10 - time.monotonic()))
        ended = time.monotonic()
    assert not any(t.is_alive() for t in threads), "threads stuck after close() on a stopped actor"
    assert len(outcomes) == 64 and all(type(exc) is QueueClosed for exc, _ in outcomes), outcomes[:3]
    assert ended - closed_at < 0.1 + GRACE + SLACK, f"the last thread took {ended - closed_at:.2f} s"
    other.put_many(list(range(64)))
    time.sleep(1.0)
    assert sorted(_drain(other)) == list(range(64)), "items went to gets abandoned by close()"
    assert _parked(other) == 0


_PARK_IN_CHILD = """
import sys
from sage_queue import resolve_descriptor
q = resolve_descriptor(sys.argv[1])
q.get(timeout=None if sys.argv[2] == "None" else float(sys.argv[2]))
print("the child got an item", flush=True)
"""


@pytest.mark.spec("RAY5")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("timeout", ["None", "60"])
def test_a_killed_process_parked_in_get_takes_no_later_item(timeout: str, ray_address: str, made: list[Any]) -> None:
    """A process (its own Ray driver, resolving the descriptor from JSON) parks a get and is SIGKILLed.
    Ray does not cancel its call: the old actor handed the next item to the dead waiter, and it was
    lost. Now the waiter, silent for _STALE_S, is dropped when the item arrives."""
    desc = _desc("ray_actor", ray_address)
    q = open_handle(made, desc)
    child = subprocess.Popen(
        [sys.executable, "-c", _PARK_IN_CHILD, desc.to_json(), timeout],
        env={**os.environ, "RAY_ADDRESS": ray_address},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        _wait_parked(q, 1)
    finally:
        child.kill()
        out, _ = child.communicate(timeout=30)
    assert "got an item" not in out
    assert _parked(q) == 1, "the dead process's get is no longer parked: Ray cancelled it (then this test is moot)"
    time.sleep(ray_actor_backend._STALE_S + 1.0)  # its handle's heartbeats have stopped
    q.put("x")
    assert q.get(timeout=10) == "x", "the item went to the get of a killed process"
    assert _parked(q) == 0, "the dead process's waiter is still parked"
    assert _dropped(q) == 1


@pytest.mark.spec("E16", "RAY15")
@pytest.mark.timeout(120)
def test_ray_queue_on_a_stopped_actor(ray_address: str, made: list[Any]) -> None:
    q = open_handle(made, _desc("ray_queue", ray_address))
    q.put(1)
    with stopped(actor_pid(q)):
        put = timed(lambda: q.put(2, timeout=0.5))
        get = timed(lambda: q.get(timeout=0.5))
    time.sleep(1.0)
    rest = drain(q)  # ray_queue has no get_many (no "batch")
    assert 1 in rest, f"the item taken by the abandoned get was lost: {rest}"
    assert rest in ([1], [1, 2]), rest
    for name, (exc, elapsed) in (("put", put), ("get", get)):
        assert isinstance(exc, QueueConnectionError), f"{name}: {exc!r}"
        assert elapsed < 0.5 + GRACE + SLACK, f"{name} took {elapsed:.2f} s"
