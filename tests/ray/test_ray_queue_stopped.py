"""ray_queue with a stopped actor: Ray's ``_QueueActor`` worker process SIGSTOPped (as a debugger, an
overloaded host or a paused container would), then SIGCONTed (spec RAY15, E16).

Before RAY15 every call waited 10 s for an answer whatever its timeout, then raised QueueActorLost
for an actor that was alive, and the get it abandoned ran when the actor resumed: its item was lost.
Each test here failed on that code (checked by running them against it).

The actor's pid comes from the actor itself (``__ray_call__``); every stop is undone in a finally.
``ray_queue`` has no ``batch`` capability, so ``get_many`` is not part of these tests.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections import Counter
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
    QueueConnectionError,
    QueueDescriptor,
)

GRACE = 2.0
"""RAY15's grace (ray_queue._GRACE_S; a literal so that this file also runs against older code)."""


def _desc(address: str, maxsize: int = 0) -> QueueDescriptor:
    return QueueDescriptor.create("ray_queue", f"t_{uuid.uuid4().hex[:12]}", maxsize, address=address)


@pytest.mark.spec("RAY15", "E16")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("maxsize", [0, 3])
def test_every_call_on_a_stopped_actor_raises_connection_error_in_time(
    maxsize: int, ray_address: str, made: list[Any]
) -> None:
    """put (timeout), put_nowait, get (timeout), get_nowait, qsize on a stopped actor: each raises
    QueueConnectionError (not Full/Empty/QueueActorLost) within its timeout + grace; after SIGCONT
    the items the abandoned gets took are back at the head, the abandoned puts landed at most once."""
    q = open_handle(made, _desc(ray_address, maxsize))
    q.put("a")
    q.put("b")
    outcomes: dict[str, tuple[BaseException | None, float, float]] = {}
    with stopped(actor_pid(q)):
        for name, timeout, call in (
            ("put", 0.3, lambda: q.put("c", timeout=0.3)),
            ("put_nowait", 0.0, lambda: q.put_nowait("d")),
            ("get", 0.3, lambda: q.get(timeout=0.3)),
            ("get_nowait", 0.0, lambda: q.get_nowait()),
            ("qsize", 0.0, lambda: q.qsize()),
        ):
            exc, elapsed = timed(call)
            outcomes[name] = (exc, elapsed, timeout)
    time.sleep(1.5)  # the actor runs the abandoned calls; the gets' items come back
    rest = drain(q)
    for name, (exc, elapsed, timeout) in outcomes.items():
        assert isinstance(exc, QueueConnectionError), f"{name}: {exc!r}"
        assert elapsed < timeout + GRACE + SLACK, f"{name} took {elapsed:.2f} s"
        assert elapsed >= timeout + GRACE - 0.3, f"{name} gave up after {elapsed:.2f} s, before its grace"
    # Each late item goes back to the head: the two come back first, in either order.
    assert sorted(rest[:2]) == ["a", "b"], f"an item taken by an abandoned get was lost or moved: {rest}"
    assert Counter(rest)["c"] <= 1 and Counter(rest)["d"] <= 1, rest
    assert set(rest) <= {"a", "b", "c", "d"}, rest
    if maxsize == 0:  # nothing stops an unbounded put: both abandoned puts landed on resume
        assert rest[2:] == ["c", "d"], rest
    q.put("after")
    assert q.get(timeout=10) == "after"
    assert q.qsize() == 0


@pytest.mark.spec("RAY15")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("waited", [False, True], ids=["no-waiter-yet", "loop-bound"])
def test_a_late_item_goes_back_even_over_maxsize(waited: bool, ray_address: str, made: list[Any]) -> None:
    """maxsize 1, full with "a": a get abandoned on the stopped actor takes "a" when it resumes; a put
    of "b" from another handle fills the queue meanwhile; "a" still goes back (the queue holds 2 items
    for a while) and puts wait until it is below maxsize again; nothing is lost. ``waited``: a get
    waited in the actor before, which binds its asyncio.Queue to the event loop, so the give-back
    goes through the loop (call_soon_threadsafe) rather than straight into the deque."""
    desc = _desc(ray_address, maxsize=1)
    q, other = open_handle(made, desc), open_handle(made, desc)
    if waited:
        with pytest.raises(queue.Empty):
            q.get(timeout=0.3)
    bound = ray.get(actor_of(q).__ray_call__.remote(lambda self: self.queue._loop is not None), timeout=30)
    assert bound is waited, "the asyncio.Queue's loop binding is not what this case is about"
    q.put("a")
    with stopped(actor_pid(q)):
        exc, _ = timed(lambda: q.get(timeout=0.2))
    assert isinstance(exc, QueueConnectionError), repr(exc)
    # Take the race out: once "a" is out (taken by the late get), "b" goes in; then "a" comes back.
    other.put("b", timeout=10)
    end = time.monotonic() + 10
    while other.qsize() < 2:
        assert time.monotonic() < end, f"the late get's item did not come back: qsize {other.qsize()}"
        time.sleep(0.05)
    with pytest.raises(queue.Full):
        other.put("c", timeout=0.3)  # 2 items in a queue of maxsize 1: full until below maxsize
    assert drain(other) == ["a", "b"]
    other.put("c", timeout=5)
    assert other.get(timeout=5) == "c"


@pytest.mark.spec("RAY15", "Q6")
@pytest.mark.timeout(180)
def test_64_threads_through_a_stop(ray_address: str, made: list[Any]) -> None:
    """32 producers and 32 consumers on one handle (maxsize 8, timeouts 0.5 s); the actor is stopped
    for 3.5 s in the middle. Nothing that raised Full is in the queue or was got; nothing is lost or
    duplicated; no call overruns timeout + grace; calls caught by the stop raise
    QueueConnectionError, never QueueActorLost."""
    q = open_handle(made, _desc(ray_address, maxsize=8))
    check_64_threads_through_a_stop(q, grace=GRACE, slack=SLACK, settle=1.5, batch=False)


@pytest.mark.spec("RAY7", "RAY15")
@pytest.mark.timeout(60)
def test_close_from_a_signal_handler_while_the_actor_is_stopped(ray_address: str, made: list[Any]) -> None:
    """A get (no timeout) blocked on a stopped actor; a signal handler in the blocked thread closes the
    handle: QueueClosed within a local slice plus the grace of the close; the queue works after SIGCONT
    and an item put then is not lost to the abandoned get."""
    desc = _desc(ray_address)
    q, other = open_handle(made, desc), open_handle(made, desc)
    check_close_from_a_signal_handler(
        q,
        other,
        before_stop=lambda: time.sleep(0.5),  # the get found the queue empty and waits in its slices
        after_stop=lambda: time.sleep(0.5),  # the slice in flight now is one the actor will not answer
        grace=GRACE,
        settle=1.0,  # the abandoned slice runs out in the actor
    )
