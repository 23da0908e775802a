"""Helpers shared by the tests in tests/ray/ (imported as a top-level module: this directory has no
``__init__.py``, since a package named ``ray`` would shadow Ray itself)."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import ray

from sage_queue import QueueActorLost, QueueClosed, QueueConnectionError, QueueDescriptor, resolve_descriptor


def leaked_actors() -> list[str]:
    """``namespace/name`` of every live actor of this library (prefix ``sageq:``) in the cluster."""
    from sage_queue.backends._ray import ACTOR_NAME_PREFIX

    found = ray.util.list_named_actors(all_namespaces=True)
    return sorted(f"{a['namespace']}/{a['name']}" for a in found if a["name"].startswith(ACTOR_NAME_PREFIX))


def kill_actors(names: list[str]) -> None:
    for full in names:
        namespace, name = full.split("/", 1)
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:  # gone meanwhile
            pass


def check_no_leaked_actors(grace: float = 3.0) -> None:
    """The leak guard: fail (pytest.fail) naming every ``sageq:`` actor still alive after ``grace``
    seconds (``ray.kill`` returns before the actor is gone), after killing them."""
    end = time.monotonic() + grace
    left = leaked_actors()
    while left and time.monotonic() < end:
        time.sleep(0.1)
        left = leaked_actors()
    kill_actors(left)
    if left:
        pytest.fail(f"leak guard: {len(left)} sage-queue actor(s) left alive by the tests: {left}")


# -- Handles, actors and stops shared by test_ray_backends.py, test_ray_stopped.py and
# test_ray_queue_stopped.py ---------------------------------------------------------------------


SLACK = 1.5
"""Scheduling on a loaded 2-core machine, on top of a documented bound (timeout + grace)."""


def destroy_at_end() -> Iterator[list[Any]]:
    """The body of the ``made`` fixture (conftest.py): the handles a test opens (``open_handle``); each
    queue still alive at the end is destroyed (nothing left for the leak guard)."""
    handles: list[Any] = []
    yield handles
    for h in handles:
        try:
            if h.closed:
                h = resolve_descriptor(h.descriptor)
            h.destroy()
        except (QueueClosed, QueueActorLost):  # destroyed by the test, or its actor killed
            pass


def open_handle(made: list[Any], desc: QueueDescriptor) -> Any:
    h = resolve_descriptor(desc)
    made.append(h)
    return h


def actor_of(h: Any) -> Any:
    """The Ray actor behind a ray_actor or ray_queue handle."""
    from sage_queue.backends._ray import full_name, namespace_of

    md = dict(h.descriptor.metadata)
    return ray.get_actor(full_name(h.descriptor.queue_type, md), namespace=namespace_of(md))


def actor_pid(h: Any) -> int:
    """The pid of the actor's worker process, asked of the actor itself (``__ray_call__``)."""
    pid: int = ray.get(actor_of(h).__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    assert pid != os.getpid()
    return pid


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """``pid`` SIGSTOPped for the block; SIGCONTed in a finally, whatever happened."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # killed meanwhile (destroy)
            pass


def timed(call: Callable[[], object]) -> tuple[BaseException | None, float]:
    """What ``call()`` raised (None if nothing) and how long it took."""
    t0 = time.monotonic()
    try:
        call()
    except BaseException as exc:
        return exc, time.monotonic() - t0
    return None, time.monotonic() - t0


def drain(q: Any, *, batch: bool = False) -> list[Any]:
    """Every item got until a get waits 1 s in vain; ``batch``: by get_many (ray_actor), else by get
    (ray_queue has no "batch" capability)."""
    out: list[Any] = []
    while True:
        try:
            if batch:
                out.extend(q.get_many(1000, timeout=1.0))
            else:
                out.append(q.get(timeout=1.0))
        except queue.Empty:
            return out


def check_64_threads_through_a_stop(q: Any, *, grace: float, slack: float, settle: float, batch: bool) -> None:
    """32 producers and 32 consumers on ``q`` (timeouts 0.5 s); its actor is stopped for 3.5 s in the
    middle. Nothing that raised Full is in the queue or was got; nothing is lost or duplicated; no call
    overruns timeout + ``grace`` + ``slack``; some calls caught by the stop raise QueueConnectionError,
    no call raises anything else but Full/Empty. ``settle``: the wait for late answers before the
    drain (``batch``: see ``drain``)."""
    stop = threading.Event()
    lock = threading.Lock()
    put_ok: list[tuple[int, int]] = []
    put_full: list[tuple[int, int]] = []
    put_unknown: list[tuple[int, int]] = []
    got: list[tuple[int, int]] = []
    errors: Counter[str] = Counter()
    overruns: list[float] = []

    def record(elapsed: float, timeout: float) -> None:
        if elapsed > timeout + grace + slack:
            with lock:
                overruns.append(elapsed)

    def produce(p: int) -> None:
        i = 0
        while not stop.is_set():
            item = (p, i)
            i += 1
            exc, elapsed = timed(lambda item=item: q.put(item, timeout=0.5))
            record(elapsed, 0.5)
            with lock:
                if exc is None:
                    put_ok.append(item)
                elif isinstance(exc, queue.Full):
                    put_full.append(item)
                elif isinstance(exc, QueueConnectionError):
                    put_unknown.append(item)
                    errors["put: QueueConnectionError"] += 1
                else:
                    errors[f"put: {exc!r}"] += 1

    def consume() -> None:
        while not stop.is_set():
            box: list[Any] = []
            exc, elapsed = timed(lambda box=box: box.append(q.get(timeout=0.5)))
            record(elapsed, 0.5)
            with lock:
                if exc is None:
                    got.append(box[0])
                elif isinstance(exc, QueueConnectionError):
                    errors["get: QueueConnectionError"] += 1
                elif not isinstance(exc, queue.Empty):
                    errors[f"get: {exc!r}"] += 1

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(32)]
    threads += [threading.Thread(target=consume) for _ in range(32)]
    pid = actor_pid(q)
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        with stopped(pid):
            time.sleep(3.5)
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads), "threads stuck on one handle"
    unexpected = {k: v for k, v in errors.items() if "QueueConnectionError" not in k}
    assert not unexpected, unexpected
    assert errors["put: QueueConnectionError"] + errors["get: QueueConnectionError"] > 0, (
        f"no call caught by a 3.5 s stop raised QueueConnectionError: {errors}"
    )
    assert not overruns, f"{len(overruns)} calls overran timeout + grace, the longest {max(overruns):.2f} s"
    time.sleep(settle)  # late answers of abandoned gets give their items back
    rest = drain(q, batch=batch)
    seen = got + rest
    dup = [x for x, n in Counter(seen).items() if n > 1]
    assert not dup, f"items delivered twice: {dup[:5]}"
    assert not set(put_full) & set(seen), "a put that raised queue.Full took effect"
    assert set(put_ok) <= set(seen), f"lost: {sorted(set(put_ok) - set(seen))[:5]}"
    assert set(seen) <= set(put_ok) | set(put_unknown), "an item nobody put came out"
    assert len(put_ok) > 64 and len(got) > 64, f"hardly any load: {len(put_ok)} puts, {len(got)} gets"
    q.put("after")
    assert q.get(timeout=5) == "after"


def check_close_from_a_signal_handler(
    q: Any,
    other: Any,
    *,
    before_stop: Callable[[], None],
    after_stop: Callable[[], None],
    grace: float,
    settle: float,
) -> None:
    """``q.get()`` (no timeout) in this, the main thread; another thread calls ``before_stop()`` (until
    the get waits), SIGSTOPs the actor, calls ``after_stop()``, then sends SIGUSR1 to this thread, whose
    handler closes ``q``: the get raises QueueClosed within 0.1 s + ``grace`` (+ SLACK) of the close. After
    SIGCONT (and ``settle`` seconds for an abandoned call to run out in the actor), an item put through
    ``other`` is not lost to the abandoned get."""
    assert threading.current_thread() is threading.main_thread()
    times: dict[str, float] = {}

    def handler(signum: int, frame: Any) -> None:
        q.close()
        times["closed"] = time.monotonic()

    previous = signal.signal(signal.SIGUSR1, handler)
    pid = actor_pid(q)
    main = threading.main_thread().ident or 0

    def stop_then_signal() -> None:
        try:
            before_stop()
            os.kill(pid, signal.SIGSTOP)
            times["stopped"] = time.monotonic()
            after_stop()
        finally:  # whatever happened, unblock the main thread
            signal.pthread_kill(main, signal.SIGUSR1)

    sender = threading.Thread(target=stop_then_signal)
    try:
        sender.start()
        exc, _ = timed(q.get)
        ended = time.monotonic()
    finally:
        sender.join(30)
        os.kill(pid, signal.SIGCONT)
        signal.signal(signal.SIGUSR1, previous)
    assert type(exc) is QueueClosed, repr(exc)
    assert "closed" in times and ended - times["closed"] < 0.1 + grace + SLACK, times
    time.sleep(settle)
    other.put("x")
    assert other.get(timeout=10) == "x", "the item went to the get abandoned by close()"
    assert other.qsize() == 0
