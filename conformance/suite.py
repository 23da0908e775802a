"""``QueueConformance``: the executable form of ``spec/queue-contract.md``.

A generic base class (pytest does not collect it: its name does not start with
``Test``) fed by a factory. Subclass it with ``factory = staticmethod(make)`` or
run it through ``python -m conformance`` / ``pytest -p conformance``. Every test
names its clauses with ``@clause``; tests needing a capability the target does
not declare are skipped with the reason.

Rules the kit keeps so that a broken backend fails instead of hanging the run:
every call that may block runs with a bound (a timeout argument, or a helper
thread joined with a limit); every child process is joined or killed.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Optional

import pytest

from . import _children
from ._clauses import clause, clauses_of, required_capabilities, requires
from ._isolation import CAN_ISOLATE, describe_threads, run_isolated
from .samples import (
    Undecodable,
    UndecodableItemError,
    UserRecord,
    describe_difference,
    large_items,
    sample_items,
)
from .target import Target

__all__ = ["QueueConformance", "kit_clause_map"]

TIMEOUT_SLACK_S = 0.25
"""Q8: a timed-out call returns within timeout + this (x time_scale)."""
NO_WAIT_S = 0.1
"""Q10: a non-blocking call returns within this (x time_scale): far below any timeout the kit passes it."""
CLOCK_EPS_S = 0.001
"""Float rounding allowed on the lower bound of a timeout; a wait is never shorter than timeout."""
CLOSE_WAKEUP_S = 1.0
"""Q23/Q24: a blocked call on a closed handle or destroyed queue raises within this (x time_scale)."""
MANY_PRODUCERS, MANY_CONSUMERS, MANY_PER_PRODUCER = 40, 32, 60
"""test_many_threads_one_handle: 72 threads on one handle (a backend was seen to deadlock past 16)."""


@dataclass
class _Outcome:
    finished: bool
    value: Any = None
    error: Optional[BaseException] = None
    elapsed: float = 0.0


class _Call:
    """Run ``fn`` in a daemon thread, so the kit can watch a call block and bound how long it waits."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._outcome = _Outcome(False)
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="kit-call")
        self._thread.start()

    def _run(self) -> None:
        self._started = time.monotonic()  # the call's own time, not the thread's start-up
        try:
            value = self._fn()
        except BaseException as exc:  # reported to the test, which judges it
            self._outcome.error = exc
        else:
            self._outcome.value = value
        self._outcome.elapsed = time.monotonic() - self._started
        self._outcome.finished = True

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait(self, limit: float) -> _Outcome:
        self._thread.join(limit)
        return self._outcome


def _call(fn: Callable[[], Any], limit: float) -> _Outcome:
    return _Call(fn).wait(limit)


def _raises(outcome: _Outcome, exc_type: type[BaseException] | tuple[type[BaseException], ...], what: str) -> None:
    assert outcome.finished, f"{what}: did not return within the limit (it blocked)"
    assert outcome.error is not None, f"{what}: returned {outcome.value!r} instead of raising {exc_type}"
    assert isinstance(outcome.error, exc_type), (
        f"{what}: raised {type(outcome.error).__module__}.{type(outcome.error).__name__}"
        f"({outcome.error}) instead of {exc_type}"
    )


def _returned(outcome: _Outcome, what: str) -> Any:
    assert outcome.finished, f"{what}: did not return within the limit (it blocked)"
    if outcome.error is not None:
        raise AssertionError(f"{what}: raised {type(outcome.error).__name__}: {outcome.error}") from outcome.error
    return outcome.value


def advisory(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A test of a SHOULD clause: a miss is reported as xfail with its reason, not as a failure."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AssertionError as exc:
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            pytest.xfail(f"SHOULD clause not met (advisory): {first_line}")

    return run


def _started_threads(target: Callable[[int], None], count: int) -> list[threading.Thread]:
    """``count`` started daemon threads running ``target(0)`` .. ``target(count - 1)``."""
    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads


class _SwitchInterval:
    """Make the interpreter switch threads often, so unsynchronised read-modify-write races show."""

    def __init__(self, seconds: float = 1e-5) -> None:
        self._seconds = seconds
        self._saved = sys.getswitchinterval()

    def __enter__(self) -> None:
        sys.setswitchinterval(self._seconds)

    def __exit__(self, *exc: object) -> None:
        sys.setswitchinterval(self._saved)


def _drain(q: Any, limit: int = 100_000) -> list[Any]:
    got: list[Any] = []
    for _ in range(limit):
        try:
            got.append(q.get_nowait())
        except queue.Empty:
            return got
    raise AssertionError(f"the queue still returned items after {limit} get_nowait calls")


def _expect_same(put: Any, got: Any, where: str = "item") -> None:
    problem = describe_difference(put, got, where)
    assert problem is None, f"item fidelity (Q4): {problem}"


def _check_producer_order(consumed: dict[str, list[Any]]) -> None:
    """Each consumer must see each producer's items in increasing sequence (Q3)."""
    for consumer, items in consumed.items():
        last: dict[Any, int] = {}
        for item in items:
            producer, seq = item[0], item[1]
            if producer in last and seq <= last[producer]:
                raise AssertionError(
                    f"per-producer FIFO (Q3): consumer {consumer} got {producer}'s item {seq} after item "
                    f"{last[producer]}"
                )
            last[producer] = seq


def _check_multiset(put: list[Any], got: list[Any]) -> None:
    """Nothing lost, duplicated or invented (Q5); the message names a few of each."""
    want, have = Counter(put), Counter(got)
    lost = want - have
    extra = have - want
    dup = [x for x, n in extra.items() if want.get(x)]
    invented = [x for x in extra if not want.get(x)]
    problems = []
    if lost:
        problems.append(f"{sum(lost.values())} item(s) lost, e.g. {sorted(lost, key=repr)[:5]}")
    if dup:
        problems.append(f"{len(dup)} item(s) duplicated, e.g. {sorted(dup, key=repr)[:5]}")
    if invented:
        problems.append(f"{len(invented)} item(s) invented, e.g. {sorted(invented, key=repr)[:5]}")
    assert not problems, "no loss/duplication (Q5): " + "; ".join(problems)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """``exc`` is a ``kind``, or was raised from (or while handling) one."""
    link: Optional[BaseException] = exc
    for _ in range(10):
        if link is None:
            return False
        if isinstance(link, kind):
            return True
        link = link.__cause__ or link.__context__
    return False


def _open_fds() -> Optional[set[str]]:
    try:
        return set(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _descriptor_names(q: Any) -> Optional[list[str]]:
    """The strings a queue's resources may be named after (queue_id, string metadata), or None without a descriptor."""
    desc = getattr(q, "descriptor", None)
    if desc is None:
        return None
    names = [desc.queue_id, *(v for v in desc.metadata.values() if isinstance(v, str) and len(v) >= 4)]
    return [n for n in names if n]


def _child_pids() -> set[int]:
    pids: set[int] = set()
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as fh:
                pids.update(int(p) for p in fh.read().split())
    except OSError:
        pass
    return pids


class QueueConformance:
    """The conformance kit as a test class. Set ``factory`` in a subclass (or pass ``--queue-factory``).

    Overridable fixtures: ``queue_target`` (the :class:`~conformance.target.Target`),
    ``make_queue`` (``make(maxsize) -> handle``). Helper: :meth:`open_handle`.
    """

    factory: ClassVar[Optional[Callable[[int], Any]]] = None

    # The per-test state set by the autouse fixture below.
    target: Target
    ts: float

    # -- fixtures -------------------------------------------------------------------------

    @pytest.fixture
    def queue_target(self, request: pytest.FixtureRequest) -> Target:
        """The target under test: this class's ``factory``, else the ``--queue-factory``/``--queue-backend``."""
        factory = type(self).factory
        if factory is not None:
            return Target.from_factory(factory, name=type(self).__qualname__)
        from .plugin import target_from_config

        target = target_from_config(request.config)
        if target is None:
            pytest.fail(
                f"{type(self).__name__} has no factory: set `factory = staticmethod(make)` or run "
                "with `pytest -p conformance --queue-factory MODULE:ATTR`"
            )
        return target

    @pytest.fixture(autouse=True)
    def _kit_test(self, request: pytest.FixtureRequest, queue_target: Target) -> Iterator[None]:
        self.target = queue_target
        self.ts = queue_target.time_scale
        self._extra_handles: list[Any] = []
        self._make_queue: Callable[[int], Any] = request.getfixturevalue("make_queue")
        node = request.node
        for test_id in (node.name, getattr(node, "originalname", node.name)):
            reason = queue_target.known_failures.get(test_id)
            if reason is not None:
                request.applymarker(pytest.mark.xfail(strict=True, reason=f"known failure: {reason}"))
                break
        missing = [c for c in required_capabilities(request.function) if not queue_target.has(c)]
        if missing:
            pytest.skip(f"capability {', '.join(missing)} not declared by the target")
        try:
            yield
        finally:
            for handle in self._extra_handles:
                close = getattr(handle, "close", None)
                if close is not None:
                    try:
                        close()
                    except Exception:  # a broken handle must not hide the test's own result
                        pass
            if queue_target.cleanup is not None:
                queue_target.cleanup()

    @pytest.fixture
    def make_queue(self, queue_target: Target) -> Callable[[int], Any]:
        """``make(maxsize)``: a new queue. Every kit test makes its queues through this fixture."""
        return queue_target.factory

    # -- helpers ---------------------------------------------------------------------------

    def make(self, maxsize: int = 0) -> Any:
        return self._make_queue(maxsize)

    def descriptor_of(self, q: Any) -> Any:
        """The handle's ``descriptor`` (a ``QueueDescriptor``), or None if it has none."""
        from sage_queue import QueueDescriptor

        desc = getattr(q, "descriptor", None)
        return desc if isinstance(desc, QueueDescriptor) else None

    def open_handle(self, q: Any) -> Any:
        """Another handle on ``q``'s queue, resolved from its descriptor; skips if it has none.

        Handles opened here are closed after the test.
        """
        from sage_queue import resolve_descriptor

        desc = self.descriptor_of(q)
        if desc is None:
            pytest.skip("the target's queues have no `descriptor`, so the kit cannot open a second handle")
        handle = resolve_descriptor(desc)
        self._extra_handles.append(handle)
        return handle

    def need_descriptor(self, q: Any) -> Any:
        desc = self.descriptor_of(q)
        if desc is None:
            pytest.fail(
                "the target declares a capability that needs handles with a `descriptor` attribute "
                "(or, for cross_process, a `sharing` other than 'descriptor': see conformance/target.py)"
            )
        return desc

    def start_child(self, q: Any, mode: str, *args: str, context: Optional[str] = None) -> _children.Child:
        """A child process running ``mode`` on ``q``'s queue, reached the way the target declares (``sharing``).

        ``context`` None: the target's own way (a ``subprocess`` child for a descriptor or a hook);
        ``"spawn"``: a ``multiprocessing`` child (spawn for a descriptor or a hook, else the target's context).
        """
        sharing = self.target.sharing
        source: _children.Source
        if sharing == "descriptor":
            source = self.need_descriptor(q).to_json()
        elif sharing == "hook":
            assert self.target.share is not None and self.target.attach is not None
            token = self.target.share(q)
            source = _children.HOOK_PREFIX + base64.b64encode(pickle.dumps((self.target.attach, token))).decode()
        else:
            return _children.Child.start(_children.Inherited(q), mode, *args, context=sharing)
        return _children.Child.start(source, mode, *args, context=context)

    def _forks(self) -> bool:
        """Whether deadlock-prone bodies run in a forked child (else in a thread of this process)."""
        return self.target.sharing != "hook" and self.target.survives_fork

    def isolated_handles(self, maxsizes: list[int]) -> Callable[[], list[Any]]:
        """For a body run by :func:`~conformance._isolation.run_isolated`: what the child calls to get one
        handle per entry of ``maxsizes``.

        A ``cross_process`` target's queues are made here, in the test process, and resolved from their
        descriptors in the child, so that the target's cleanup destroys them even when the child had to
        be killed. Other targets' queues are made in the child and die with it.
        """
        if not self._forks():
            made = [self.make(m) for m in maxsizes]  # the body runs in a thread here (see run_isolated(fork=))
            return lambda: made
        if self.target.has("cross_process") and self.target.sharing != "descriptor":
            # Made here too (so cleanup() reaches them); the forked child inherits these very handles.
            made = [self.make(m) for m in maxsizes]
            return lambda: made
        if self.target.has("cross_process"):
            descs = [self.need_descriptor(self.make(m)).to_json() for m in maxsizes]

            def attach() -> list[Any]:
                from sage_queue import resolve_descriptor

                return [resolve_descriptor(d) for d in descs]

            return attach
        return lambda: [self.make(m) for m in maxsizes]

    # ======================================================================================
    # 1. Operations
    # ======================================================================================

    @clause("Q1")
    def test_interface(self) -> None:
        from sage_queue import QueueLike

        q = self.make(3)
        assert isinstance(q, QueueLike), f"{type(q).__name__} is not a sage_queue.QueueLike"
        expected = {
            "put": ["item", "block", "timeout"],
            "get": ["block", "timeout"],
            "put_nowait": ["item"],
            "get_nowait": [],
            "empty": [],
            "full": [],
            "qsize": [],
        }
        for name, params in expected.items():
            method = getattr(q, name)
            sig = inspect.signature(method)
            names = [
                p
                for p in sig.parameters
                if sig.parameters[p].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            ]
            assert names[: len(params)] == params, f"{name}{sig}: expected parameters {params}"
            if name in ("put", "get"):
                assert sig.parameters["block"].default is True, f"{name}: block must default to True"
                assert sig.parameters["timeout"].default is None, f"{name}: timeout must default to None"

    @clause("Q2")
    def test_put_then_get(self) -> None:
        q = self.make()
        q.put("first")
        assert q.qsize() == 1, "an item put must be in the queue when put returns"
        got = _returned(_call(lambda: q.get(timeout=1.0 * self.ts), 2.0 * self.ts), "get in another thread")
        _expect_same("first", got)
        if self.descriptor_of(q) is not None:
            other = self.open_handle(q)
            q.put("second")
            assert other.qsize() == 1, f"another handle sees qsize {other.qsize()} after a put returned (Q2)"
            _expect_same("second", other.get_nowait())

    @clause("Q3")
    def test_fifo_one_producer(self) -> None:
        q = self.make()
        items = [("fifo", i) for i in range(300)]
        for item in items:
            q.put(item)
        got = [q.get(timeout=1.0 * self.ts) for _ in items]
        for i, (want, have) in enumerate(zip(items, got, strict=False)):
            assert want == have, f"FIFO (Q3): position {i} returned {have!r}, expected {want!r}"

    @clause("Q3", "Q7")
    def test_fifo_through_bounded_queue(self) -> None:
        """Producer thread and consumer through a queue of 10: strict FIFO while both block in turn."""
        q = self.make(10)
        items = list(range(500))

        def produce() -> None:
            for item in items:
                q.put(item, timeout=5.0 * self.ts)

        producer = _Call(produce)
        got = [q.get(timeout=5.0 * self.ts) for _ in items]
        _returned(producer.wait(5.0 * self.ts), "the producer")
        first = next((i for i, (a, b) in enumerate(zip(got, items, strict=True)) if a != b), None)
        assert got == items, f"FIFO (Q3): first difference at position {first}"

    @clause("Q4")
    def test_item_fidelity(self) -> None:
        q = self.make()
        items = sample_items()
        for item in items:
            q.put(item)
        for i, want in enumerate(items):
            _expect_same(want, q.get(timeout=1.0 * self.ts), f"sample {i}")
        assert q.empty(), "the queue returned more items than were put"

    @clause("Q4")
    def test_item_fidelity_large(self) -> None:
        q = self.make()
        for i, want in enumerate(large_items()):
            q.put(want, timeout=5.0 * self.ts)
            try:
                got = q.get(timeout=2.0 * self.ts)
            except queue.Empty:
                raise AssertionError(f"large item {i} ({len(repr(want))} chars) was put but never came back") from None
            _expect_same(want, got, f"large item {i}")

    @clause("Q5")
    def test_no_loss_one_thread(self) -> None:
        """Bursts of puts and gets: every item comes back exactly once, in order."""
        q = self.make()
        put: list[Any] = []
        got: list[Any] = []
        seq = 0
        for burst in range(60):
            for _ in range(25 + burst % 7):
                q.put(("one", seq))
                put.append(("one", seq))
                seq += 1
            for _ in range(20 + burst % 11):
                try:
                    got.append(q.get_nowait())
                except queue.Empty:
                    break
        got += _drain(q)
        _check_multiset(put, got)
        assert got == put, "FIFO (Q3) broken in a single thread"

    def _producers_consumers(self, put_handles: list[Any], get_handles: list[Any], per_producer: int) -> None:
        """P producers x C consumers (threads); tagged items; multiset and per-producer order."""
        limit = 10.0 * self.ts
        n_prod, n_cons = len(put_handles), len(get_handles)
        stop = (_children.STOP_TAG, "threads")
        consumed: dict[str, list[Any]] = {f"c{i}": [] for i in range(n_cons)}
        errors: list[str] = []

        def produce(index: int) -> None:
            handle = put_handles[index]
            try:
                for seq in range(per_producer):
                    handle.put((f"p{index}", seq), timeout=limit)
            except BaseException as exc:
                errors.append(f"producer {index}: {type(exc).__name__}: {exc}")

        def consume(index: int) -> None:
            handle, out = get_handles[index], consumed[f"c{index}"]
            try:
                while True:
                    item = handle.get(timeout=limit)
                    if item == stop:
                        return
                    out.append(item)
            except BaseException as exc:
                errors.append(f"consumer {index}: {type(exc).__name__}: {exc}")

        with _SwitchInterval():
            consumers = _started_threads(consume, n_cons)
            producers = _started_threads(produce, n_prod)
            for t in producers:
                t.join(limit * 2)
            assert not any(t.is_alive() for t in producers), f"producers still blocked after {limit * 2}s: {errors}"
            for _ in consumers:
                put_handles[0].put(stop, timeout=limit)
            for t in consumers:
                t.join(limit * 2)
            assert not any(t.is_alive() for t in consumers), f"consumers still blocked: {errors}"
        assert not errors, f"threads failed: {errors}"
        expected = [(f"p{i}", s) for i in range(n_prod) for s in range(per_producer)]
        _check_multiset(expected, [x for items in consumed.values() for x in items])
        _check_producer_order(consumed)

    @clause("Q3", "Q5", "Q6")
    def test_threads_share_one_handle(self) -> None:
        q = self.make(16)
        self._producers_consumers([q] * 4, [q] * 3, per_producer=500)

    @clause("Q3", "Q5", "Q6")
    def test_threads_contend(self) -> None:
        """Many producers fill, then many consumers drain at once: every get races other gets."""
        q = self.make()
        n_prod, n_cons, per_producer = 4, 4, 250
        fill_done = threading.Event()
        go = threading.Event()
        consumed: dict[str, list[Any]] = {f"c{i}": [] for i in range(n_cons)}
        errors: list[str] = []

        def produce(index: int) -> None:
            try:
                go.wait(5.0)
                for seq in range(per_producer):
                    q.put((f"p{index}", seq), timeout=10.0 * self.ts)
            except BaseException as exc:
                errors.append(f"producer {index}: {exc!r}")

        def consume(index: int) -> None:
            out = consumed[f"c{index}"]
            try:
                # Start draining once the producers are done (or after 2 s, for a byte-bounded queue).
                fill_done.wait(2.0 * self.ts)
                while True:
                    try:
                        out.append(q.get(timeout=0.2 * self.ts))
                    except queue.Empty:
                        if fill_done.is_set():
                            return
            except BaseException as exc:
                errors.append(f"consumer {index}: {exc!r}")

        with _SwitchInterval():
            producers = _started_threads(produce, n_prod)
            consumers = _started_threads(consume, n_cons)
            go.set()
            for t in producers:
                t.join(20.0 * self.ts)
            fill_done.set()
            for t in consumers:
                t.join(20.0 * self.ts)
        assert not any(t.is_alive() for t in producers + consumers), f"threads still blocked: {errors}"
        assert not errors, f"threads failed: {errors}"
        expected = [(f"p{i}", s) for i in range(n_prod) for s in range(per_producer)]
        _check_multiset(expected, [x for items in consumed.values() for x in items])
        _check_producer_order(consumed)

    @clause("Q3", "Q5")
    def test_threads_with_own_handles(self) -> None:
        q = self.make(16)
        handles = [q] + [self.open_handle(q) for _ in range(3)]
        self._producers_consumers(handles[:2] + handles[2:3], handles[1:], per_producer=300)

    @clause("Q3", "Q5", "Q6")
    def test_many_threads_one_handle(self) -> None:
        """72 threads (40 producers, 32 consumers) on ONE handle of a queue of 8, mixing blocking, timed and
        non-blocking calls: nothing lost or duplicated, per-producer order, and no deadlock.

        Runs in a forked child with a hard deadline (conformance/_isolation.py): a handle that deadlocks
        while holding the GIL cannot hang the run; the failure names the stuck threads and their stacks.
        """
        attach = self.isolated_handles([8])
        limit = 20.0 * self.ts
        total = MANY_PRODUCERS + MANY_CONSUMERS
        # A hook target's handles are tied to something a forked child does not inherit (a connection, a
        # Ray driver): its body runs in a thread here, as without os.fork.
        run_isolated(
            lambda: self._many_threads(attach()[0], budget=0.8 * limit),
            limit,
            f"{total} threads sharing one handle",
            fork=self._forks(),
        )

    def _many_threads(self, q: Any, budget: float) -> None:
        deadline = time.monotonic() + budget
        stop = (_children.STOP_TAG, "many")
        modes = ("blocking", "timed", "nowait")  # thread i uses modes[i % 3], producers and consumers alike
        consumed: dict[str, list[Any]] = {f"consumer-{i}": [] for i in range(MANY_CONSUMERS)}
        errors: list[str] = []

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        def put_one(mode: str, item: Any) -> None:
            while True:
                try:
                    if mode == "blocking":
                        q.put(item)
                    elif mode == "timed":
                        q.put(item, timeout=0.2)
                    else:
                        q.put_nowait(item)
                    return
                except queue.Full:  # Q12: not enqueued, so putting the same item again keeps Q3
                    if not left():
                        raise AssertionError("no room for an item until the deadline") from None
                    if mode == "nowait":
                        time.sleep(0.001)

        def produce(index: int) -> None:
            try:
                for seq in range(MANY_PER_PRODUCER):
                    put_one(modes[index % 3], (f"p{index}", seq))
            except BaseException as exc:
                errors.append(f"producer-{index}: {type(exc).__name__}: {exc}")

        def consume(index: int) -> None:
            out, mode = consumed[f"consumer-{index}"], modes[index % 3]
            try:
                while True:
                    try:
                        item = (
                            q.get()
                            if mode == "blocking"
                            else (q.get(timeout=0.2) if mode == "timed" else q.get_nowait())
                        )
                    except queue.Empty:
                        if not left():
                            raise AssertionError("no item (nor the stop item) until the deadline") from None
                        if mode == "nowait":
                            time.sleep(0.001)
                        continue
                    if item == stop:
                        return
                    out.append(item)
            except BaseException as exc:
                errors.append(f"consumer-{index}: {type(exc).__name__}: {exc}")

        def started(role: str, fn: Callable[[int], None], count: int) -> list[threading.Thread]:
            threads = [
                threading.Thread(target=fn, args=(i,), daemon=True, name=f"{role}-{i}-{modes[i % 3]}")
                for i in range(count)
            ]
            for t in threads:
                t.start()
            return threads

        def stuck(threads: list[threading.Thread], phase: str) -> None:
            alive = [t for t in threads if t.is_alive()]
            if alive:
                raise AssertionError(
                    f"{len(alive)} thread(s) still blocked {phase}, {budget:.0f}s after the start: the handle "
                    f"deadlocked with {MANY_PRODUCERS + MANY_CONSUMERS} threads (Q6): "
                    f"{', '.join(t.name for t in alive[:20])}\nerrors so far: {errors[:5]}\n"
                    f"{describe_threads()}"
                )

        # No close() at the end: the handle belongs to a child that exits (a stuck handle's close could
        # hang and hide this message); a cross_process target's queue is destroyed by the parent's cleanup.
        consumers = started("consumer", consume, MANY_CONSUMERS)
        producers = started("producer", produce, MANY_PRODUCERS)
        for t in producers:
            t.join(left())
        stuck(producers, "putting")
        for _ in consumers:  # after every item: FIFO hands each consumer its stop item last
            try:
                q.put(stop, timeout=left())
            except queue.Full:
                stuck(consumers, "(the stop items found no room)")
                raise AssertionError("the stop items found no room until the deadline") from None
        for t in consumers:
            t.join(left())
        stuck(consumers, "getting")
        assert not errors, f"threads failed: {errors[:10]}"
        expected = [(f"p{i}", s) for i in range(MANY_PRODUCERS) for s in range(MANY_PER_PRODUCER)]
        _check_multiset(expected, [x for items in consumed.values() for x in items])
        _check_producer_order(consumed)

    # ======================================================================================
    # 2. Blocking and timeouts
    # ======================================================================================

    def _assert_blocks_until(self, blocking: Callable[[], Any], trigger: Callable[[], Any], what: str) -> Any:
        """CPython-test_queue style: the call must still be blocked after a while, and return once
        ``trigger`` runs."""
        call = _Call(blocking)
        time.sleep(0.1 * self.ts)
        assert call.alive(), f"{what}: returned before it could (outcome: {call.wait(0)!r})"
        trigger()
        return _returned(call.wait(2.0 * self.ts), f"{what}, after it was released")

    @clause("Q7", "Q12")
    def test_get_blocks_until_put(self) -> None:
        q = self.make()
        got = self._assert_blocks_until(q.get, lambda: q.put("wake"), "get() on an empty queue")
        _expect_same("wake", got)
        assert q.empty(), "the released get must have removed the item"

    @clause("Q7", "Q12", "Q14")
    def test_put_blocks_until_get(self) -> None:
        q = self.make(2)
        q.put("a")
        q.put("b")
        got: list[Any] = []
        self._assert_blocks_until(lambda: q.put("c"), lambda: got.append(q.get()), "put() on a full queue")
        got += _drain(q)
        assert got == ["a", "b", "c"], f"after a released put the queue yielded {got!r}"

    @clause("Q8", "Q11", "E1")
    def test_get_timeout(self) -> None:
        q = self.make()
        timeout = 0.2
        outcome = _call(lambda: q.get(timeout=timeout), timeout + 5.0 * self.ts)
        _raises(outcome, queue.Empty, f"get(timeout={timeout}) on an empty queue")
        self._check_elapsed(outcome.elapsed, timeout, "get")

    @clause("Q8", "Q11", "Q12", "E2")
    def test_put_timeout(self) -> None:
        q = self.make(1)
        q.put("only")
        timeout = 0.2
        outcome = _call(lambda: q.put("extra", timeout=timeout), timeout + 5.0 * self.ts)
        _raises(outcome, queue.Full, f"put(timeout={timeout}) on a full queue")
        self._check_elapsed(outcome.elapsed, timeout, "put")
        assert _drain(q) == ["only"], "a put that timed out must not have enqueued its item (Q12)"

    def _check_elapsed(self, elapsed: float, timeout: float, what: str) -> None:
        assert elapsed >= timeout - CLOCK_EPS_S, (
            f"{what}(timeout={timeout}) gave up after {elapsed:.3f}s, before its timeout (Q8)"
        )
        bound = timeout + TIMEOUT_SLACK_S * self.ts
        assert elapsed <= bound, f"{what}(timeout={timeout}) took {elapsed:.3f}s, more than {bound:.3f}s (Q8)"

    @clause("Q8")
    def test_timeout_released_in_time(self) -> None:
        q = self.make(1)
        got = self._assert_blocks_until(
            lambda: q.get(timeout=3.0 * self.ts), lambda: q.put("in time"), "get(timeout=3) on an empty queue"
        )
        _expect_same("in time", got)
        q.put("fill")
        self._assert_blocks_until(lambda: q.put("late", timeout=3.0 * self.ts), q.get, "put(timeout=3) on a full queue")
        assert _drain(q) == ["late"]

    @clause("Q9", "Q12", "E3")
    def test_negative_timeout(self) -> None:
        for state, before in (("empty", []), ("partly full", ["x"]), ("full", ["x", "y"])):
            q = self.make(2)
            for item in before:
                q.put(item)
            _raises(_call(partial(q.get, timeout=-1), 2.0 * self.ts), ValueError, f"get(timeout=-1), {state}")
            _raises(_call(partial(q.put, "z", timeout=-0.5), 2.0 * self.ts), ValueError, f"put(timeout=-0.5), {state}")
            assert _drain(q) == before, f"a call refused with ValueError changed a {state} queue (Q9, Q12)"

    @clause("Q9", "Q12", "E4")
    def test_non_number_timeout(self) -> None:
        q = self.make(2)
        q.put("x")
        for bad in ("1", [1], object()):
            _raises(_call(partial(q.get, timeout=bad), 2.0 * self.ts), TypeError, f"get(timeout={bad!r})")
            _raises(_call(partial(q.put, "y", timeout=bad), 2.0 * self.ts), TypeError, f"put(timeout={bad!r})")
        assert _drain(q) == ["x"], "a call refused with TypeError changed the queue (Q9, Q12)"

    @advisory
    @clause("Q19")
    def test_nan_timeout(self) -> None:
        # Only states where the call would not wait: a backend that checks NaN up front passes, and one
        # that does not (queue.Queue) fails here instead of spinning forever in a wait(nan).
        q = self.make(2)
        q.put("x")
        _raises(_call(lambda: q.get(timeout=math.nan), 2.0 * self.ts), ValueError, "get(timeout=nan), non-empty")
        _raises(_call(lambda: q.put("z", timeout=math.nan), 2.0 * self.ts), ValueError, "put(timeout=nan), room")
        assert _drain(q) == ["x"], "a call refused with ValueError changed the queue"

    @clause("Q10", "Q11")
    def test_nonblocking_never_waits(self) -> None:
        q = self.make(1)
        quick = NO_WAIT_S * self.ts
        checks: list[tuple[str, Callable[[], Any], type[Exception]]] = [
            ("get(block=False, timeout=0.5) on empty", lambda: q.get(block=False, timeout=0.5), queue.Empty),
            ("get(block=False, timeout=-1) on empty", lambda: q.get(block=False, timeout=-1), queue.Empty),
            ("get(timeout=0) on empty", lambda: q.get(timeout=0), queue.Empty),
            ("get_nowait() on empty", q.get_nowait, queue.Empty),
        ]
        for what, fn, exc in checks:
            outcome = _call(fn, 2.0 + quick)
            _raises(outcome, exc, what)
            assert outcome.elapsed <= quick, f"{what} waited {outcome.elapsed:.3f}s (Q10: never waits)"
        q.put_nowait("one")
        checks = [
            ("put(block=False, timeout=0.5) on full", lambda: q.put("x", block=False, timeout=0.5), queue.Full),
            ("put(block=False, timeout=-1) on full", lambda: q.put("x", block=False, timeout=-1), queue.Full),
            ("put(timeout=0) on full", lambda: q.put("x", timeout=0), queue.Full),
            ("put_nowait() on full", lambda: q.put_nowait("x"), queue.Full),
        ]
        for what, fn, exc in checks:
            outcome = _call(fn, 2.0 + quick)
            _raises(outcome, exc, what)
            assert outcome.elapsed <= quick, f"{what} waited {outcome.elapsed:.3f}s (Q10: never waits)"
        assert q.get(block=False, timeout=-1) == "one", "get(block=False, timeout=-1) must ignore the timeout"
        q.put("two", block=False, timeout=-1)
        assert q.get_nowait() == "two"
        assert q.empty()

    @clause("Q12")
    def test_failed_calls_change_nothing(self) -> None:
        q = self.make(3)
        for item in ("a", "b", "c"):
            q.put(item)
        attempts: list[Callable[[], Any]] = [
            partial(q.put_nowait, "d"),
            partial(q.put, "d", timeout=0.05),
            partial(q.put, "d", block=False),
        ]
        for attempt in attempts:
            with pytest.raises(queue.Full):
                attempt()
        assert q.qsize() == 3, f"failed puts changed qsize to {q.qsize()}"
        assert _drain(q) == ["a", "b", "c"], "a failed put changed the queue"
        for attempt in (q.get_nowait, lambda: q.get(timeout=0.05)):
            with pytest.raises(queue.Empty):
                attempt()
        q.put("e")
        assert _drain(q) == ["e"], "after failed gets the queue must hold exactly what was put"

    @advisory
    @clause("Q13")
    def test_waiter_sleeps(self) -> None:
        q = self.make()
        wait = 0.6
        cpu0, wall0 = time.process_time(), time.monotonic()
        outcome = _call(lambda: q.get(timeout=wait), wait + 5.0 * self.ts)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        _raises(outcome, queue.Empty, "get(timeout=0.6)")
        # The spec says under 5 % of a core; 10 % leaves room for this process's own bookkeeping.
        assert cpu <= 0.10 * wall, f"a blocked get used {cpu:.3f}s of CPU in {wall:.3f}s: it spins (Q13)"

    # ======================================================================================
    # 3. Bounds and sizes
    # ======================================================================================

    @pytest.mark.parametrize("maxsize", [1, 5, 100])
    @clause("Q14", "Q16")
    def test_maxsize_bound(self, maxsize: int) -> None:
        q = self.make(maxsize)
        for i in range(maxsize):
            assert not q.full(), f"full() is true with {i} of {maxsize} items"
            q.put_nowait(i)
        assert q.full(), f"full() is false with maxsize={maxsize} items"
        assert q.qsize() == maxsize, f"qsize() is {q.qsize()} with {maxsize} items"
        with pytest.raises(queue.Full):
            q.put_nowait("over")
        with pytest.raises(queue.Full):
            q.put("over", timeout=0.02)
        assert q.qsize() == maxsize, f"a refused put changed qsize to {q.qsize()}"
        assert q.get_nowait() == 0
        assert not q.full(), "full() is still true after a get"
        q.put_nowait("last")
        assert _drain(q) == [*range(1, maxsize), "last"]

    @clause("Q14")
    def test_unbounded(self) -> None:
        q = self.make(0)
        for i in range(500):
            q.put_nowait(i)
        assert not q.full(), "full() must be false when maxsize is 0"
        assert q.qsize() == 500
        assert _drain(q) == list(range(500))

    @clause("Q15")
    def test_item_that_can_never_fit(self) -> None:
        q = self.make()
        desc = self.descriptor_of(q)
        capacity = None if desc is None else desc.metadata.get("capacity_bytes")
        if not isinstance(capacity, int):
            pytest.skip("the target's descriptors have no metadata['capacity_bytes'] (not a byte-capacity backend)")
        q.put("before")
        huge = b"\x00" * (capacity + 1)
        for what, fn in (("put(huge)", lambda: q.put(huge)), ("put(huge, block=False)", lambda: q.put_nowait(huge))):
            outcome = _call(fn, 2.0 * self.ts)
            _raises(outcome, ValueError, f"{what} with capacity_bytes={capacity}")
        assert _drain(q) == ["before"], "a refused oversized item changed the queue"

    @clause("Q16")
    def test_sizes_exact(self) -> None:
        q = self.make(4)
        depth = 0

        def check() -> None:
            assert q.qsize() == depth, f"qsize() is {q.qsize()}, the queue holds {depth}"
            assert q.empty() == (depth == 0), f"empty() is {q.empty()} with {depth} items"
            assert q.full() == (depth == 4), f"full() is {q.full()} with {depth} of 4 items"

        check()
        for step in "++++-+--+---++--":
            if step == "+":
                q.put_nowait(step)
                depth += 1
            else:
                q.get_nowait()
                depth -= 1
            check()

    @clause("Q17")
    def test_qsize_sees_other_threads(self) -> None:
        q = self.make()
        _returned(_call(lambda: [q.put(i) for i in range(7)], 5.0 * self.ts), "puts in another thread")
        self._eventually_qsize(q, 7)
        _returned(_call(lambda: [q.get(timeout=1.0) for _ in range(3)], 5.0 * self.ts), "gets in another thread")
        self._eventually_qsize(q, 4)

    def _eventually_qsize(self, q: Any, expected: int) -> None:
        deadline = time.monotonic() + (1.0 * self.ts if self.target.has("approximate_qsize") else 0.0)
        while True:
            size = q.qsize()
            if size == expected:
                break
            if time.monotonic() >= deadline:
                raise AssertionError(f"qsize() is {size} after operations that leave {expected} items (Q17)")
            time.sleep(0.01)
        assert q.empty() == (expected == 0)

    @requires("cross_process")
    @clause("Q18", "E11")
    def test_unpicklable_item(self) -> None:
        q = self.make()
        q.put("before")
        for bad in (threading.Lock(), lambda: None):
            outcome = _call(partial(q.put, bad, timeout=1.0), 3.0 * self.ts)
            _raises(outcome, (pickle.PicklingError, TypeError, AttributeError), f"put({bad!r})")
        assert _drain(q) == ["before"], "a put of an unpicklable item changed the queue"

    @clause("Q34", "Q5", "Q18")
    def test_undecodable_item_loses_only_itself(self) -> None:
        """An item that pickles but whose unpickling raises: the get (or get_many) that meets it raises that
        error, every good item around it still arrives once and in order, and the queue stays usable.

        Proposed as its own clause (Q5 with Q18's failure on the consumer side); skipped for a backend that
        passes items by reference (the very object put comes back), since nothing is decoded there.
        """
        q = self.make()
        probe = UserRecord("identity-probe", [])
        q.put(probe)
        if q.get(timeout=1.0 * self.ts) is probe:
            pytest.skip("the target passes items by reference (get returned the very object put): nothing to decode")
        wait = 1.0 * self.ts
        self._through_undecodable(
            q, "get", lambda: [q.get(timeout=wait)], [("good", 0), Undecodable("alone"), ("good", 1)]
        )
        if self.target.has("batch"):
            # The bad item last in, first in and inside a batch of get_many(4).
            for bad_at in (3, 4, 5):
                items: list[Any] = [("good", i) for i in range(10)]
                items.insert(bad_at, Undecodable(f"at {bad_at}"))
                self._through_undecodable(
                    q, f"get_many(4), bad item at {bad_at}", lambda: q.get_many(4, timeout=wait), items
                )
        q.put("after")
        assert _drain(q) == ["after"], "the queue is not usable after an undecodable item"

    def _through_undecodable(self, q: Any, how: str, take: Callable[[], list[Any]], items: list[Any]) -> None:
        good = [x for x in items if not isinstance(x, Undecodable)]
        got: list[Any] = []
        errors: list[BaseException] = []
        for item in items:
            try:
                q.put(item, timeout=1.0 * self.ts)
            except Exception as exc:
                # A backend that checks the round trip on put may refuse the item there (as Q18 does for
                # an item that cannot be pickled): the error surfaced and nothing was enqueued; fine.
                if not (isinstance(item, Undecodable) and _caused_by(exc, UndecodableItemError)):
                    raise
                errors.append(exc)
        for _ in range(len(items) + 2):  # bounded: one call per item is enough, plus one to see it empty
            if len(got) >= len(good) and errors:
                break  # all there is to get; what may be left over is checked by qsize() below
            try:
                got += take()
            except queue.Empty:
                break
            except Exception as exc:  # judged below
                errors.append(exc)
        lost = [x for x in good if x not in got]
        assert got == good, (
            f"{how}: put {items!r}, got {got!r} (lost {lost!r}): only the undecodable item may be lost (Q5)"
        )
        assert errors, f"{how}: the undecodable item vanished without an error: its decode error must surface"
        for error in errors:
            assert _caused_by(error, UndecodableItemError), (
                f"{how} raised {type(error).__name__}: {error}, which is not (nor is caused by) the item's own "
                f"decode error UndecodableItemError"
            )
        assert len(errors) == 1, f"{how}: one undecodable item raised {len(errors)} errors: {errors!r}"
        assert q.qsize() == 0, f"{how}: qsize() is {q.qsize()} after everything was got"

    # ======================================================================================
    # 4. Handles, close and destroy
    # ======================================================================================

    @requires("close")
    @clause("Q20")
    def test_close_is_idempotent(self) -> None:
        q = self.make()
        other = self.open_handle(q)
        q.put("kept")
        assert q.closed is False
        closers = [_Call(q.close) for _ in range(4)]
        for closer in closers:
            _returned(closer.wait(2.0 * self.ts), "close() racing other close() calls")
        q.close()
        assert q.closed is True, "closed must be true after close()"
        assert other.get(timeout=1.0 * self.ts) == "kept", "close() must not remove the queue or its items"

    @requires("close")
    @clause("Q21", "E9")
    def test_closed_handle_raises(self) -> None:
        from sage_queue import QueueClosed

        q = self.make(2)
        q.close()
        ops: dict[str, Callable[[], Any]] = {
            "put": lambda: q.put(1),
            "get": lambda: q.get(timeout=0.1),
            "put_nowait": lambda: q.put_nowait(1),
            "get_nowait": q.get_nowait,
            "qsize": q.qsize,
            "empty": q.empty,
            "full": q.full,
            "destroy": q.destroy,
            "with": lambda: q.__enter__(),
        }
        if self.target.has("batch"):
            ops["put_many"] = lambda: q.put_many([1])
            ops["get_many"] = lambda: q.get_many(1, timeout=0.1)
        if self.target.has("stats"):
            ops["stats"] = q.stats
        if self.target.has("task_done"):
            ops["task_done"] = q.task_done
            ops["join"] = q.join
        for name, op in ops.items():
            _raises(_call(op, 2.0 * self.ts), QueueClosed, f"{name} on a closed handle")

    @requires("close")
    @clause("Q22")
    def test_close_leaves_other_handles(self) -> None:
        q = self.make()
        other = self.open_handle(q)
        q.put("a")
        q.put("b")
        q.close()
        assert not other.closed
        assert other.qsize() == 2, f"closing one handle changed what another sees: qsize {other.qsize()}"
        other.put("c")
        assert _drain(other) == ["a", "b", "c"]

    @requires("close")
    @clause("Q23")
    def test_close_wakes_blocked_calls(self) -> None:
        from sage_queue import QueueClosed

        q = self.make(1)
        getter = _Call(q.get)
        time.sleep(0.1 * self.ts)
        assert getter.alive(), "get() on an empty queue returned at once"
        q.close()
        _raises(getter.wait(1.0 * self.ts + 0.5), QueueClosed, "get() blocked on a handle closed by another thread")
        q2 = self.open_handle(q)
        q2.put("full")
        putter = _Call(lambda: q2.put("blocked"))
        time.sleep(0.1 * self.ts)
        assert putter.alive(), "put() on a full queue returned at once"
        q2.close()
        _raises(putter.wait(1.0 * self.ts + 0.5), QueueClosed, "put() blocked on a handle closed by another thread")

    @requires("close")
    @clause("Q23")
    def test_close_from_signal_handler(self) -> None:
        """A signal handler (in the main thread) closes the handle while the main thread is blocked in get()
        on an empty queue, then in put() on a full one: close() returns, the blocked call raises QueueClosed
        within the Q23 bound. The handler runs only once the blocked call lets the interpreter run signal
        handlers, and re-enters the handle from the thread that is blocked in it.

        Runs in a forked child (its forking thread is its main thread, where Python runs handlers), so that
        a close() that never returns, or a wait that never runs handlers, fails the test instead of hanging it.
        """
        if not (CAN_ISOLATE and hasattr(signal, "pthread_kill")):
            pytest.skip("needs os.fork and signal.pthread_kill (POSIX) to run a main thread that may hang")
        if not self._forks():
            pytest.skip(
                "runs in a forked child, and this target's handles do not survive a fork (a hook target's "
                "are not assumed to; others say so with survives_fork = False)"
            )
        attach = self.isolated_handles([1, 1])
        bound = CLOSE_WAKEUP_S * self.ts + 0.5
        steps: list[str] = []
        run_isolated(
            lambda: self._close_from_signal(attach(), bound, steps),
            2 * (bound + 1.0) + 4.0 * self.ts,
            "close() from a signal handler",
            progress=lambda: "; ".join(steps),
        )

    def _close_from_signal(self, handles: list[Any], bound: float, steps: list[str]) -> None:
        from sage_queue import QueueClosed

        get_q, put_q = handles
        put_q.put("full", timeout=1.0 * self.ts)
        cases: list[tuple[str, Any, Callable[[], Any]]] = [
            ("get() on an empty queue", get_q, get_q.get),
            ("put() on a full queue", put_q, lambda: put_q.put("blocked")),
        ]
        assert threading.current_thread() is threading.main_thread(), "the body must run in the main thread"
        main = threading.get_ident()
        for what, q, blocked in cases:
            t0 = time.monotonic()
            times: dict[str, float] = {}

            def handler(signum: int, frame: Any, q: Any = q, times: dict[str, float] = times) -> None:
                times["handler"] = time.monotonic()
                q.close()
                times["closed"] = time.monotonic()

            def send(times: dict[str, float] = times) -> None:
                times["sent"] = time.monotonic()
                signal.pthread_kill(main, signal.SIGUSR1)

            steps.append(f"{what}: blocking")
            previous = signal.signal(signal.SIGUSR1, handler)
            sender = threading.Timer(0.2 * self.ts, send)
            sender.start()
            outcome: Optional[BaseException] = None
            try:
                blocked()
            except BaseException as exc:  # judged below, once the handler is uninstalled
                outcome = exc
            finally:
                sender.cancel()
                sender.join()  # a signal still to come would meet the default action: death
                signal.signal(signal.SIGUSR1, previous)
            ended = time.monotonic()
            steps.append(f"{what}: ended after {ended - t0:.2f}s with {outcome!r}, {sorted(times)}")
            assert "sent" in times, f"{what} returned before the signal was sent ({outcome!r}): it did not block"
            assert "closed" in times, (
                f"{what}: the call ended ({outcome!r}) but the handler "
                f"{'never ran' if 'handler' not in times else 'did not finish close()'}"
            )
            assert isinstance(outcome, QueueClosed), (
                f"{what}, on a handle closed by a signal handler, ended with {outcome!r} instead of QueueClosed (Q23)"
            )
            late = ended - times["sent"]
            assert late <= bound, (
                f"{what} raised QueueClosed {late:.2f}s after the signal that closed its handle, more than "
                f"{bound:.2f}s (Q23); the handler ran after {times['handler'] - times['sent']:.2f}s"
            )

    @requires("close")
    @clause("Q24")
    def test_destroy(self) -> None:
        from sage_queue import QueueClosed, QueueNotFound, resolve_descriptor

        q = self.make(1)
        desc = self.need_descriptor(q)
        other, blocked_handle = self.open_handle(q), self.open_handle(q)
        q.put("doomed")
        assert other.qsize() == 1
        waiter = _Call(lambda: blocked_handle.put("blocked"))  # the queue is full: this put waits
        time.sleep(0.1 * self.ts)
        assert waiter.alive(), "a put on a full queue returned at once"
        q.destroy()
        assert q.closed, "destroy() must close the destroying handle"
        _raises(
            waiter.wait(1.0 * self.ts + 0.5), (QueueClosed, QueueNotFound), "a put blocked when the queue was destroyed"
        )
        _raises(_call(other.qsize, 2.0), (QueueClosed, QueueNotFound), "qsize() on another handle after destroy()")
        creatable = desc.metadata.get("create", True)
        if creatable:
            again = resolve_descriptor(desc)
            self._extra_handles.append(again)
            assert again.qsize() == 0, "resolving a destroyed queue's descriptor must give a new, empty queue"
        else:
            with pytest.raises(QueueNotFound):
                resolve_descriptor(desc)

    @requires("close")
    @clause("E13", "E9", "Q24")
    def test_destroyed_is_not_closed(self) -> None:
        """destroy() through one handle: another handle's next operation, a call blocked on a third, and a
        second destroy() raise QueueDestroyed (a QueueClosed); a handle closed by its own close() raises plain
        QueueClosed."""
        from sage_queue import QueueClosed, QueueDestroyed

        q = self.make(1)
        self.need_descriptor(q)
        other, blocked_handle, again, mine = (self.open_handle(q) for _ in range(4))
        assert issubclass(QueueDestroyed, QueueClosed), "E9: QueueDestroyed must be a QueueClosed"
        mine.close()
        closed = _call(mine.get_nowait, 2.0 * self.ts)
        _raises(closed, QueueClosed, "get_nowait() on a handle closed by its own close()")
        assert not isinstance(closed.error, QueueDestroyed), (
            f"a handle closed by its own close() raised {type(closed.error).__name__}, not plain QueueClosed (E13)"
        )
        q.put("doomed")
        waiter = _Call(lambda: blocked_handle.put("blocked"))  # the queue is full: this put waits
        time.sleep(0.1 * self.ts)
        assert waiter.alive(), "a put on a full queue returned at once"
        q.destroy()
        _raises(
            waiter.wait(CLOSE_WAKEUP_S * self.ts + 0.5),
            QueueDestroyed,
            "a put blocked when another handle destroyed the queue (E13)",
        )
        for name, op in (
            ("qsize", other.qsize),
            ("get_nowait", other.get_nowait),
            ("put", lambda: other.put("late", timeout=0.1)),
        ):
            _raises(_call(op, 2.0 * self.ts), QueueDestroyed, f"{name}() on another handle after destroy() (E13)")
        _raises(_call(again.destroy, 2.0 * self.ts), QueueDestroyed, "a second destroy(), through another handle (E13)")

    @requires("close", "cross_process")
    @clause("E13", "Q24")
    def test_destroyed_in_another_process(self) -> None:
        """destroy() here: in another process, a get() blocked on a handle of the queue and the next operation
        on another handle raise QueueDestroyed (E13: "through any handle, in any process")."""
        q = self.make(1)
        child = self.start_child(q, "outlive_destroy")
        try:
            line = child.readline(0, 20.0 * self.ts)
            assert line == "ready", f"the child did not start: {line!r}; stderr: {child.stderr()[-2000:]}"
            time.sleep(0.2 * self.ts)  # its get() is blocked by now (or soon: destroy must wake it either way)
            q.destroy()
            report = child.readline(1, 30.0 * self.ts)
            assert report, f"the child did not report; stderr: {child.stderr()[-2000:]}"
        finally:
            child.stop(grace=5.0)
        outcome = json.loads(report)
        assert outcome.get("woken") == "QueueDestroyed", (
            f"a get() blocked in another process when the queue was destroyed ended with {outcome.get('woken')} "
            f"after {outcome.get('blocked_for', 0):.2f}s, not QueueDestroyed (E13)"
        )
        bound = 0.2 * self.ts + CLOSE_WAKEUP_S * self.ts + 0.5
        assert outcome["blocked_for"] <= bound + 1.0 * self.ts, (
            f"the blocked get() in another process was woken {outcome['blocked_for']:.2f}s after it started, "
            f"more than {bound:.2f}s after the destroy (Q24)"
        )
        assert outcome.get("next_op") == "QueueDestroyed", (
            f"qsize() in another process after destroy() ended with {outcome.get('next_op')}, not QueueDestroyed (E13)"
        )

    @requires("close")
    @clause("Q25")
    def test_context_manager(self) -> None:
        q = self.make()
        other = self.open_handle(q)
        with q as entered:
            assert entered is q, "with handle as x: x must be the handle itself"
            q.put("kept")
        assert q.closed, "leaving the with block must close the handle"
        assert other.get(timeout=1.0 * self.ts) == "kept", "leaving the with block must not destroy the queue"

    @requires("close")
    @clause("Q26")
    def test_no_resources_left(self) -> None:
        threads0, fds0, shm0, kids0 = set(threading.enumerate()), _open_fds(), _shm_entries(), _child_pids()
        q = self.make(4)
        other = self.open_handle(q)
        # Other processes (a parallel test run) may create /dev/shm entries meanwhile: when the queue
        # has a descriptor, only entries named after it (its queue_id or a string in its metadata) count.
        names = _descriptor_names(q)
        q.put(b"x" * 1000)
        assert other.get(timeout=1.0 * self.ts) == b"x" * 1000
        other.close()
        q.destroy()
        deadline = time.monotonic() + 1.0 * self.ts
        while True:
            threads = {t for t in set(threading.enumerate()) - threads0 if t.is_alive()}
            fds = None if fds0 is None else (_open_fds() or set()) - fds0
            shm = {e for e in _shm_entries() - shm0 if names is None or any(n in e for n in names)}
            kids = _child_pids() - kids0
            if not (threads or fds or shm or kids) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert not threads, f"threads left after close+destroy: {sorted(t.name for t in threads)}"
        assert not fds, f"file descriptors left after close+destroy: {sorted(fds or ())}"
        assert not shm, f"/dev/shm entries left after close+destroy: {sorted(shm)}"
        assert not kids, f"child processes left after close+destroy: {sorted(kids)}"

    @requires("picklable_handle")
    @clause("Q27")
    def test_pickled_handle(self) -> None:
        q = self.make()
        if self.target.sharing == "descriptor":
            self.need_descriptor(q)
        marker = b"kit-marker-" + os.urandom(8).hex().encode()
        q.put(marker)
        blob = pickle.dumps(q)
        assert marker not in blob, "a pickled handle must carry only the descriptor, not the queue's items"
        copy = pickle.loads(blob)
        self._extra_handles.append(copy)
        assert not getattr(copy, "closed", False), "an unpickled handle must be open"
        assert copy.get(timeout=1.0 * self.ts) == marker, "the unpickled handle is not on the same queue"
        copy.put("back")
        assert q.get(timeout=1.0 * self.ts) == "back"

    @clause("Q28")
    def test_descriptor_round_trips(self) -> None:
        from sage_queue import QueueDescriptor, resolve_descriptor

        q = self.make()
        desc = self.descriptor_of(q)
        if desc is None:
            pytest.skip("the target's queues have no `descriptor` (not a sage_queue handle)")
        forms = {
            "descriptor": desc,
            "from_json(to_json())": QueueDescriptor.from_json(desc.to_json()),
            "pickle": pickle.loads(pickle.dumps(desc)),
            "from_dict(to_dict())": QueueDescriptor.from_dict(desc.to_dict()),
            "JSON text": desc.to_json(),
        }
        for label, form in forms.items():
            if isinstance(form, QueueDescriptor):
                assert form == desc, f"{label} changed the descriptor"
            handle = resolve_descriptor(form)
            self._extra_handles.append(handle)
            q.put(("to", label))
            assert handle.get(timeout=1.0 * self.ts) == ("to", label), f"{label} resolved to a different queue"
            handle.put(("from", label))
            assert q.get(timeout=1.0 * self.ts) == ("from", label), f"{label} resolved to a different queue"

    @clause("Q43", "Q27")
    def test_other_process_cannot_reach(self) -> None:
        if self.target.has("cross_process"):
            pytest.skip("the target declares cross_process (checked by test_cross_process_*)")
        q = self.make()
        desc = self.descriptor_of(q)
        if desc is None:
            pytest.skip("the target's queues have no `descriptor` (not a sage_queue handle)")
        pickled = base64.b64encode(pickle.dumps(q)).decode() if self.target.has("picklable_handle") else ""
        done = _children.run_child("resolve", desc.to_json(), pickled, timeout=30.0 * self.ts)
        assert done.returncode == 0, f"the child failed: {done.stderr[-2000:]}"
        outcomes = json.loads(done.stdout.strip().splitlines()[-1])
        for label, outcome in outcomes.items():
            assert outcome == "QueueNotFound", (
                f"resolving the {label} form in another process gave {outcome}; a queue without cross_process "
                "must raise QueueNotFound there, never silently create another queue (Q43)"
            )

    # ======================================================================================
    # 5. Batches
    # ======================================================================================

    @requires("batch")
    @clause("Q30")
    def test_put_many_contiguous(self) -> None:
        q = self.make()
        errors: list[str] = []

        def produce(tag: str) -> None:
            try:
                for b in range(40):
                    q.put_many([(tag, b, i) for i in range(5)], timeout=5.0)
            except BaseException as exc:
                errors.append(f"{tag}: {exc!r}")

        with _SwitchInterval():
            threads = [threading.Thread(target=produce, args=(f"t{i}",), daemon=True) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10.0 * self.ts)
        assert not errors, errors
        got = _drain(q)
        assert len(got) == 3 * 40 * 5, f"{len(got)} items, expected {3 * 40 * 5}"
        for start in range(0, len(got), 5):
            chunk = got[start : start + 5]
            tag, b = chunk[0][0], chunk[0][1]
            assert chunk == [(tag, b, i) for i in range(5)], f"batch {tag}/{b} is not contiguous: {chunk}"

    @requires("batch")
    @clause("Q30")
    def test_put_many_all_or_nothing(self) -> None:
        q = self.make(5)
        q.put_many(["a", "b", "c"])
        for label, fn in (
            ("put_many(block=False)", lambda: q.put_many(["x", "y", "z"], block=False)),
            ("put_many(timeout=0.1)", lambda: q.put_many(["x", "y", "z"], timeout=0.1)),
        ):
            outcome = _call(fn, 2.0 * self.ts + 0.1)
            _raises(outcome, queue.Full, f"{label} with room for 2 of 3")
            assert q.qsize() == 3, f"{label} enqueued part of a batch: qsize {q.qsize()}"
        q.put_many(["d", "e"])
        q.put_many([], block=False)  # an empty batch is a no-op, even on a full queue
        got: list[Any] = []
        self._assert_blocks_until(
            lambda: q.put_many(["f", "g"]), lambda: got.extend([q.get(), q.get()]), "put_many(2) on a full queue"
        )
        got += _drain(q)
        assert got == ["a", "b", "c", "d", "e", "f", "g"], got

    @requires("batch")
    @clause("Q31")
    def test_batch_that_can_never_fit(self) -> None:
        q = self.make(3)
        q.put("before")
        outcome = _call(lambda: q.put_many([1, 2, 3, 4]), 2.0 * self.ts)
        _raises(outcome, ValueError, "put_many of 4 items into a queue of maxsize 3")
        assert _drain(q) == ["before"]

    @requires("batch")
    @clause("Q32")
    def test_get_many(self) -> None:
        q = self.make()
        q.put_many(list(range(5)))
        first = q.get_many(3)
        assert first == [0, 1, 2], f"get_many(3) returned {first!r}"
        outcome = _call(lambda: q.get_many(10), 2.0 * self.ts)
        rest = _returned(outcome, "get_many(10) with 2 items queued")
        assert outcome.elapsed < 0.5 * self.ts, "get_many must not wait for more items once one is there"
        assert rest and rest == [3, 4][: len(rest)], f"get_many(10) returned {rest!r}"
        _drain(q)
        timed = _call(lambda: q.get_many(2, timeout=0.15), 5.0 * self.ts)
        _raises(timed, queue.Empty, "get_many(timeout=0.15) on an empty queue")
        self._check_elapsed(timed.elapsed, 0.15, "get_many")
        got = self._assert_blocks_until(lambda: q.get_many(4), lambda: q.put("late"), "get_many on an empty queue")
        assert got == ["late"]

    @requires("batch")
    @clause("Q33")
    def test_get_many_bad_arguments(self) -> None:
        q = self.make()
        q.put_many(["a", "b"])
        for bad in (0, -1):
            with pytest.raises(ValueError):
                q.get_many(bad, block=False)
        for wrong_type in (1.5, "2", None):
            with pytest.raises(TypeError):
                q.get_many(wrong_type, block=False)
        assert _drain(q) == ["a", "b"], "a refused get_many removed items"

    # ======================================================================================
    # 6. Task tracking and statistics
    # ======================================================================================

    @requires("task_done")
    @clause("Q35")
    def test_task_done_and_join(self) -> None:
        q = self.make()
        q.put(1)
        q.put(2)
        joiner = _Call(q.join)
        time.sleep(0.1 * self.ts)
        assert joiner.alive(), "join() returned with unfinished tasks"
        q.get()
        q.get()
        q.task_done()
        time.sleep(0.05 * self.ts)
        assert joiner.alive(), "join() returned before every task was done"
        q.task_done()
        _returned(joiner.wait(2.0 * self.ts), "join() after every task_done")
        with pytest.raises(ValueError):
            q.task_done()

    @requires("stats")
    @clause("Q36")
    def test_stats(self) -> None:
        from sage_queue import QueueStats

        q = self.make()
        for i in range(3):
            q.put(i)
        q.get()
        s = q.stats()
        assert isinstance(s, QueueStats), f"stats() returned a {type(s).__name__}"
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.puts = 0  # type: ignore[misc]
        assert (s.puts, s.gets, s.depth) == (3, 1, 2), f"stats puts/gets/depth {(s.puts, s.gets, s.depth)} != (3, 1, 2)"
        assert s.depth == q.qsize()
        q.put(3)
        q.get()
        s2 = q.stats()
        assert s2.puts == s.puts + 1 and s2.gets == s.gets + 1, f"counters did not grow by one: {s} -> {s2}"
        assert s2.puts - s2.gets == s2.depth == q.qsize()
        if self.target.has("batch"):
            q.put_many(["a", "b", "c"])
            got = q.get_many(2)
            s3 = q.stats()
            assert (s3.puts - s2.puts, s3.gets - s2.gets) == (3, len(got)), (
                f"stats must count items, not calls: put_many(3) and get_many -> {len(got)} items gave {s2} -> {s3}"
            )

    @requires("stats")
    @clause("Q37")
    def test_stats_shape(self) -> None:
        from sage_queue import QueueStats

        q = self.make()
        snaps: list[QueueStats] = []

        def snap() -> None:
            s = q.stats()
            assert isinstance(s, QueueStats), f"stats() returned a {type(s).__name__}"
            assert s.scope in ("queue", "handle"), f"stats().scope is {s.scope!r}, not 'queue' or 'handle'"
            for f in dataclasses.fields(s):
                if f.name == "scope":
                    continue
                value = getattr(s, f.name)
                if value is None and f.name not in ("puts", "gets", "depth"):
                    continue
                assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, (
                    f"stats().{f.name} is {value!r}: it must be a non-negative int"
                    + ("" if f.name in ("puts", "gets", "depth") else " or None (unknown to the backend)")
                )
            snaps.append(s)

        snap()
        q.put(1)
        snap()
        q.put("two")
        q.get()
        snap()
        q.get()
        snap()
        for f in dataclasses.fields(QueueStats):
            known = [getattr(s, f.name) is not None for s in snaps]
            assert all(known) or not any(known), (
                f"stats().{f.name} is None in some snapshots and not in others: {[getattr(s, f.name) for s in snaps]}"
            )
        counters = ("puts", "gets", "bytes_in", "bytes_out", "waits", "abandoned", "errors")
        for before, after in itertools.pairwise(snaps):
            for name in counters:
                a, b = getattr(before, name), getattr(after, name)
                assert a is None or b >= a, f"stats().{name} went down from {a} to {b}: counters never decrease"
        first, after_put, after_get = snaps[0], snaps[1], snaps[2]
        if first.bytes_in is not None and after_put.bytes_in is not None:
            assert after_put.bytes_in > first.bytes_in, f"put(1) left bytes_in at {first.bytes_in}"
        if after_put.bytes_out is not None and after_get.bytes_out is not None:
            assert after_get.bytes_out > after_put.bytes_out, f"get() left bytes_out at {after_put.bytes_out}"

    # ======================================================================================
    # 7. Capabilities, processes, hosts
    # ======================================================================================

    @clause("Q40")
    def test_capabilities_declared(self) -> None:
        from sage_queue import KNOWN_CAPABILITIES

        caps = self.target.capabilities
        assert caps <= KNOWN_CAPABILITIES, f"unknown capabilities {sorted(caps - KNOWN_CAPABILITIES)}"
        q = self.make()
        needs = {
            "batch": ("put_many", "get_many"),
            "task_done": ("task_done", "join"),
            "close": ("close", "destroy", "closed", "__enter__", "__exit__"),
            "stats": ("stats",),
            "cross_process": ("descriptor",) if self.target.sharing == "descriptor" else (),
            "cross_host": ("descriptor",),
            "picklable_handle": ("descriptor", "__reduce__") if self.target.sharing == "descriptor" else (),
        }
        for cap in sorted(caps):
            for attr in needs.get(cap, ()):
                assert hasattr(q, attr), f"the target declares {cap!r} but its queue has no {attr!r}"

    def _echo_through_child(self, q: Any, context: Optional[str]) -> None:
        """Put the samples, let a child echo them back, check both directions and the order.

        The items coming back are got while the child runs: a child may only be able to exit once
        what it put has been read (multiprocessing.Queue's feeder thread flushes into a pipe at exit).
        """
        items = sample_items() + large_items()
        limit = 30.0 * self.ts
        child = self.start_child(q, "echo", str(len(items)), context=context)
        try:
            feeder = _Call(lambda: [q.put(item, timeout=20.0 * self.ts) for item in items])
            # Getting here before the child has got every item would race it for them.
            said = child.readline(0, limit)
            collector = _Call(lambda: [q.get(timeout=limit) for _ in range(len(items) + 1)])
            status = child.wait(limit)
            got = collector.wait(limit if said == "got" else 0.5)
            err_lines = [line for line in child.stderr().splitlines() if line.strip()]
        finally:
            child.stop(grace=0)  # removes its output files: read above
        # The child's last words first (the kit's report shows one line), then the rest of its stderr.
        detail = (
            f"{err_lines[-1] if err_lines else '(nothing on stderr)'}\n" + "\n".join(err_lines[-40:])
            if status is not None
            else "(killed: still running after its limit)"
        )
        _returned(feeder.wait(5.0 * self.ts), "putting the samples for the child")
        assert status == 0, f"the child reported (exit {status}): {detail}"
        back = _returned(got, "getting the items the child echoed")
        for i, (want, item) in enumerate(zip(items, back, strict=False)):
            _expect_same(want, item, f"item {i} echoed by the child")
        done = back[-1]
        assert isinstance(done, tuple) and done[0] == _children.DONE_TAG, f"the child's last item is {done!r}"
        assert q.empty(), "more items came back than the child put"

    @requires("cross_process")
    @clause("Q41", "Q4", "Q3")
    def test_cross_process_subprocess(self) -> None:
        """A fresh interpreter (not a multiprocessing child) reaches the queue: by descriptor or the hook."""
        if self.target.sharing not in ("descriptor", "hook"):
            pytest.skip(
                f"the target shares handles through multiprocessing (sharing={self.target.sharing!r}): "
                "a fresh interpreter cannot reach them (checked by test_cross_process_spawn)"
            )
        self._echo_through_child(self.make(), None)

    @requires("cross_process")
    @clause("Q41", "Q4")
    def test_cross_process_spawn(self) -> None:
        """A multiprocessing child reaches the queue: spawned with the descriptor or the hook's token, or
        through the target's own context (sharing fork/spawn/forkserver)."""
        self._echo_through_child(self.make(), "spawn")

    @requires("cross_process")
    @clause("Q5", "Q3", "Q41")
    def test_processes_no_loss(self) -> None:
        """A producer process, a consumer process, and a producer and a consumer thread here."""
        q = self.make(32)
        per_producer = 400
        limit = 30.0 * self.ts
        producer = self.start_child(q, "produce", "child", str(per_producer))
        consumer = self.start_child(q, "consume")
        mine: list[Any] = []
        try:
            local_producer = _Call(lambda: [q.put(("parent", s), timeout=limit) for s in range(per_producer)])

            def consume_here() -> None:
                while True:
                    item = q.get(timeout=limit)
                    if isinstance(item, tuple) and item[:1] == (_children.STOP_TAG,):
                        return
                    mine.append(item)

            local_consumer = _Call(consume_here)
            _returned(local_producer.wait(limit), "the parent's producer")
            assert producer.wait(limit) == 0, f"the producer child failed: {producer.stderr()[-2000:]}"
            for _ in range(2):
                q.put((_children.STOP_TAG, "procs"), timeout=limit)
            status = consumer.wait(limit)
            assert status == 0, f"the consumer child failed (exit {status}): {consumer.stderr()[-2000:]}"
            out = consumer.stdout()
            _returned(local_consumer.wait(limit), "the parent's consumer")
        finally:
            for proc in (producer, consumer):
                proc.stop(grace=0)
        theirs = [tuple(x) for x in json.loads(out.strip().splitlines()[-1])]
        expected = [(tag, s) for tag in ("parent", "child") for s in range(per_producer)]
        _check_multiset(expected, mine + theirs)
        _check_producer_order({"parent": mine, "child process": theirs})

    @requires("cross_host")
    @clause("Q42")
    def test_cross_host(self) -> None:
        remote = os.environ.get("CONFORMANCE_REMOTE_PYTHON")
        if not remote:
            pytest.skip("cross_host needs a second host: set CONFORMANCE_REMOTE_PYTHON='ssh HOST python3'")
        import shlex
        import subprocess

        q = self.make()
        desc = self.need_descriptor(q)
        items = sample_items()
        for item in items:
            q.put(item)
        cmd = [
            *shlex.split(remote),
            "-c",
            "from conformance._children import main; main()",
            "echo",
            desc.to_json(),
            str(len(items)),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60.0 * self.ts)
        assert done.returncode == 0, f"the remote child failed: {done.stderr[-2000:]}"
        back = [q.get(timeout=5.0 * self.ts) for _ in range(len(items) + 1)]
        for i, (want, got) in enumerate(zip(items, back, strict=False)):
            _expect_same(want, got, f"item {i} echoed by the remote child")

    @requires("cross_process")
    @clause("Q44")
    def test_killed_process_leaves_queue_usable(self) -> None:

        q = self.make(8)
        child = self.start_child(q, "churn")
        try:
            line = child.readline(0, 20.0 * self.ts)
            assert line == "ready", f"the churn child did not start: {line!r}; stderr: {child.stderr()[-2000:]}"
            time.sleep(0.2)
            child.kill()  # SIGKILL, mid put/get
        finally:
            child.stop(grace=0)
        leftovers = _returned(_call(lambda: _drain(q), 5.0 * self.ts), "draining after the kill")
        garbage = [x for x in leftovers if not (isinstance(x, tuple) and x[0] == "churn")]
        assert not garbage, f"items nobody put are in the queue after the kill: {garbage[:5]}"
        items = [("after", i) for i in range(20)]
        moved = _returned(
            _call(lambda: [(q.put(x, timeout=2.0), q.get(timeout=2.0))[1] for x in items], 10.0 * self.ts),
            "put/get after a process using the queue was killed",
        )
        assert moved == items, "the queue lost or reordered items after a process using it was killed"
        assert q.qsize() == 0 and q.empty()

    @requires("cross_process")
    @clause("Q38", "Q5")
    def test_a_caller_stopped_past_its_timeout_ends_its_call_normally(self) -> None:
        # A consumer process is stopped (SIGSTOP: a debugger, a paused container, a thrashing host)
        # inside get(timeout=1), an item is put meanwhile, and it is resumed well past its timeout
        # (and past the 2 s grace the network backends give a silent peer). Its get must end as if
        # it had run throughout: the item (or Empty with the item still in the queue), never an
        # error blaming a peer that was never silent, and the item neither lost nor delivered twice.
        # If the child is not yet inside get when it is stopped, the outcome must be the same.
        q = self.make()
        child = self.start_child(q, "timed_get", "1.0")
        stopped = False
        try:
            line = child.readline(0, 20.0 * self.ts)
            assert line == "ready", f"the child did not start: {line!r}; stderr: {child.stderr()[-2000:]}"
            time.sleep(0.5)  # into its get, most likely
            os.kill(child.pid, signal.SIGSTOP)
            stopped = True
            q.put("for-the-stopped-caller", timeout=5.0 * self.ts)
            time.sleep(5.0)
            os.kill(child.pid, signal.SIGCONT)
            stopped = False
            line = child.readline(1, 30.0 * self.ts)
            assert line is not None, f"the resumed child did not end its get; stderr: {child.stderr()[-2000:]}"
        finally:
            if stopped:
                os.kill(child.pid, signal.SIGCONT)
            child.stop(grace=10.0 * self.ts)
        outcome = json.loads(line)
        left = _returned(_call(lambda: _drain(q), 5.0 * self.ts), "draining after the stopped caller")
        if outcome[0] == "item":
            assert outcome[1] == "for-the-stopped-caller" and left == [], (
                f"the resumed get returned {outcome[1]!r}; the queue then held {left!r}"
            )
        else:
            assert outcome[0] == "Empty", (
                f"a get whose process was stopped past its timeout, then resumed, raised {outcome[0]}: "
                f"{outcome[1]} (the queue's side never stopped answering)"
            )
            assert left == ["for-the-stopped-caller"], f"after the resumed get raised Empty the queue held {left!r}"

    # ======================================================================================
    # State machine
    # ======================================================================================

    @clause("Q3", "Q4", "Q10", "Q14", "Q16")
    def test_state_machine(self) -> None:
        from hypothesis import settings
        from hypothesis.stateful import run_state_machine_as_test

        from ._machine import build_machine

        def release(q: Any) -> None:
            if self.target.has("close"):
                q.destroy()

        machine = build_machine(self.make, self.target.has("batch"), self.ts, release)
        # Every example makes a queue: destroyed after the example when the target can (close),
        # else by the target's cleanup() after the test.
        run_state_machine_as_test(machine, settings=settings(settings(), stateful_step_count=25, deadline=None))


def kit_clause_map() -> dict[str, list[str]]:
    """clause id -> names of the kit tests tagged with it."""
    out: dict[str, list[str]] = {}
    for name in sorted(dir(QueueConformance)):
        if name.startswith("test_"):
            for cid in clauses_of(getattr(QueueConformance, name)):
                out.setdefault(cid, []).append(name)
    return out
