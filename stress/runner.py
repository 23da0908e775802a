"""The one harness: P producers x C consumers on any queue, an optional fault scenario, a history, the checker.

Targets (:class:`Target`): a registered backend type (workers are processes started by a
``forkserver`` that get nothing but the descriptor's JSON text), a user's ``MODULE:ATTR``
factory ``factory(maxsize) -> queue`` as the kit takes it (workers are forked by the
``multiprocess`` package and inherit the queue object, so the factory may be a closure or
a lambda), or any queue with ``threads=True`` (workers are threads of this process: for
in-process backends such as ``local``; no fault scenario applies to threads).

A run: start the workers; let the scenario inject its faults (:class:`Scenario`, see
fault_injection/README.md) or, without one, let the producers put their counts; drain (stop
the producers, then one ``None`` sentinel per consumer behind every item, FIFO); read every
worker's history (:mod:`stress.history`) and judge it (:func:`stress.checker.check`) against
the backend's promise.

Bookkeeping: a worker is a *slot* run by successive *incarnations* (a killed one is replaced
by the next); a producer incarnation puts ``(slot, incarnation, seq, payload, crc32)``.
Only the harness's own SIGKILLs are expected deaths: a worker that dies on its own stops the
run at once and the verdict names it (:mod:`stress.core`). Every wait is bounded: the end
phase by ``drain_timeout`` (a deadlock is reported with every worker still running and its
stack, and the history is still checked, so an anchor that deadlocks still gets its counts).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

from sage_queue import QueueDescriptor, resolve_descriptor

from .checker import CheckReport, Promise, check, promise_for
from .core import (
    POLL_SECONDS,
    Child,
    ChildHook,
    Verdict,
    abnormal_exits,
    child_main,
    death_report,
    stop_children,
    stuck_reports,
    wait_for_any,
)
from .history import FAIL, GET, HEADER, OK, PUT, TAG, TIMEOUT, HistoryLog, Op, process_name, read_history

__all__ = ["Target", "Service", "RunResult", "Scenario", "FaultContext", "Worker", "run", "run_stress", "target_for"]

PUT_SLICE = 0.5
"""A producer's put waits at most this long (then: timeout logged, abort/orphan checked, same items retried)."""
GET_SLICE = 0.5
"""A consumer's get waits at most this long (then: timeout logged, abort/orphan checked)."""
SIGKILL_REAP_SECONDS = 10.0
"""How long a SIGKILLed worker may take to be reaped before the run calls it stuck."""
SPARE_SENTINEL_EVERY = 1.0
"""While consumers still run in the drain, a spare sentinel is put this often if the queue is empty."""
FAILED_CALL_PAUSE = 0.02
"""A worker pauses this long after a call failed with an error its promise declares survivable (an actor
that is gone fails every call at once: the pause keeps such a loop from eating a core)."""


def payload_for(slot: int, incarnation: int, seq: int, size: int) -> bytes:
    """Deterministic payload bytes, different for every item."""
    stem = f"{slot}.{incarnation}.{seq}|".encode()
    return (stem * (size // len(stem) + 1))[:size]


# -- targets -------------------------------------------------------------------------------


@dataclass
class Service:
    """What a run started for its queue to live on (rpc: a server), and what a scenario faults.

    ``metadata`` goes into every descriptor of the run (rpc: ``host``, ``port``, ``key_file``);
    ``control`` holds the objects a scenario started to fault the service (a proxy, a server
    process), by name. :meth:`Scenario.setup` returns one; without it the run starts the
    backend's own ``local_service()`` (sage_queue/stub.py), if it names one.
    """

    metadata: dict[str, Any] = field(default_factory=dict)
    control: dict[str, Any] = field(default_factory=dict)


@dataclass
class Target:
    """What a run drives: how to make a queue, how workers reach it, and its promise."""

    name: str
    mode: str
    """``descriptor`` (registered type: forkserver workers get the JSON), ``object`` (a factory's queue,
    inherited by ``multiprocess`` fork workers) or ``thread`` (workers are threads)."""
    promise: Promise
    make_descriptor: Optional[Callable[..., QueueDescriptor]] = None
    """``make_descriptor(**service_metadata)``: a new descriptor (called with no argument when the run
    has no service metadata, so any zero-argument factory fits)."""
    factory: Optional[Callable[[int], Any]] = None
    batch: bool = True
    """Whether the queue has put_many/get_many."""
    maxsize: int = 0
    processes: str = "multiprocess"
    """For ``object`` mode: the package whose ``fork`` context starts the workers. A factory may say
    ``harness_processes = "multiprocessing"`` (the stdlib) when its queue relies on the stdlib's process
    machinery (``multiprocessing.Queue`` flushes its feeder thread at a stdlib process's exit only)."""
    service: Optional[Callable[[], AbstractContextManager[Mapping[str, Any]]]] = None
    """What the queues need (:func:`stress.backends.harness_service`): the backend's ``local_service``
    (sage_queue/stub.py; rpc: a server), or the Ray cluster to join; :func:`run` enters it for the run
    (unless the scenario brings its own) and leaves it after the queue is destroyed."""

    def open(self, metadata: Optional[Mapping[str, Any]] = None) -> tuple[Any, Any, Callable[[], None]]:
        """(what a worker gets, the parent's handle, teardown); ``metadata``: the run's service metadata."""
        if self.make_descriptor is not None:
            descriptor = self.make_descriptor(**metadata) if metadata else self.make_descriptor()
            handle = resolve_descriptor(descriptor)

            def teardown() -> None:
                for attempt in range(2):
                    try:
                        handle.destroy()
                        return
                    except Exception as exc:  # already destroyed or closed by the code under test: don't mask
                        # A survivable error (a restarted actor's first call: RAY10) leaves the queue there:
                        # once more, or it would outlive the run.
                        if attempt or not is_survivable(exc, self.promise.survivable):
                            handle.close()
                            return

            return (descriptor.to_json() if self.mode == "descriptor" else handle), handle, teardown
        assert self.factory is not None
        q = self.factory(self.maxsize)
        return q, q, lambda: getattr(q, "close", lambda: None)()


def target_for(
    spec: str, *, maxsize: int = 0, capacity_bytes: Optional[int] = None, threads: bool = False, prefix: str = "harness"
) -> Target:
    """``TYPE`` (registered backend) or ``MODULE:ATTR`` (a kit-style factory) -> Target."""
    if ":" in spec:
        from conformance.target import load_target

        loaded = load_target(spec)
        return Target(
            spec,
            "thread" if threads else "object",
            promise_for(spec, loaded.factory),
            factory=loaded.factory,
            batch=loaded.has("batch"),
            maxsize=maxsize,
            processes=str(getattr(loaded.factory, "harness_processes", "multiprocess")),
        )
    from sage_queue.registry import backend_class

    from .backends import descriptor_factory, harness_service

    cls = backend_class(spec)
    caps = getattr(cls, "capabilities", ())
    service = harness_service(spec)
    return Target(
        spec,
        "thread" if threads else "descriptor",
        promise_for(spec),
        make_descriptor=descriptor_factory(
            spec,
            maxsize=maxsize,
            capacity_bytes=capacity_bytes,
            prefix=prefix,
            check=getattr(cls, "local_service", None) is None,
        ),
        batch="batch" in caps,
        maxsize=maxsize,
        service=service,
    )


# -- workers (module level: forkserver children import them) ---------------------------------


def _open_queue(endpoint: Any, env: Optional[dict[str, str]] = None) -> tuple[Any, bool]:
    """(queue, close it when done): a descriptor's JSON is resolved here, an object is used as is.

    ``env``: the harness's environment when it started this worker, applied first. A forkserver child
    inherits the environment of the fork server as it was when the server started, which may be
    before the harness connected to a service that set variables its clients need (Ray sets
    ``RAY_AUTH_MODE=token``: without it a worker cannot join the harness's cluster)."""
    if env:
        os.environ.update(env)
    if isinstance(endpoint, str):
        return resolve_descriptor(endpoint), True
    return endpoint, False


def _give_up(parent: int, abort: str) -> bool:
    """A worker leaves when the run aborted (abort file) or it was orphaned.

    ``parent`` is ``os.getppid()`` read when the worker started: for a forkserver child that is
    the fork server (which exits with the harness), not the harness, so compare with that.
    """
    return os.path.exists(abort) or os.getppid() != parent


def is_survivable(exc: BaseException, survivable: tuple[str, ...]) -> bool:
    """True if ``exc`` is (a subclass of) an error class named in ``survivable`` (:attr:`Promise.survivable`)."""
    return any(cls.__name__ in survivable for cls in type(exc).__mro__)


def producer_main(
    endpoint: Any,
    workdir: str,
    slot: int,
    incarnation: int,
    count: Optional[int],
    payload_bytes: int,
    batch: int,
    hook: Optional[ChildHook],
    survivable: tuple[str, ...] = (),
    env: Optional[dict[str, str]] = None,
) -> None:
    """Put ``count`` items (None: until the stop file appears), logging every call (invoke, then completion).

    A call failing with a ``survivable`` error (its promise says the queue may raise it and stay
    usable, e.g. rpc's QueueConnectionError) is logged as failed (its items indeterminate: put at
    most once) and the producer goes on with new items; any other error ends the worker (and the run).
    """
    parent = os.getppid()
    q, owned = _open_queue(endpoint, env)
    log = HistoryLog(os.path.join(workdir, f"p-{slot}-{incarnation}.log"))
    stop, abort = os.path.join(workdir, "stop"), os.path.join(workdir, "abort")
    seq = 0
    failed = False
    try:
        while count is None or seq < count:
            if count is None and (seq % 32 == 0 or failed) and os.path.exists(stop):
                break
            failed = False
            n = batch if count is None else min(batch, count - seq)
            tags = [(slot, incarnation, s) for s in range(seq, seq + n)]
            items = []
            for s in range(seq, seq + n):
                payload = payload_for(slot, incarnation, s, payload_bytes)
                items.append((slot, incarnation, s, payload, zlib.crc32(payload)))
            # A put that times out put nothing (queue contract), so retrying the same items is exact.
            # A put that failed may have put them: never retried (new seqs follow), so no duplicate is ours.
            while True:
                log.invoke_put(tags, PUT_SLICE)
                try:
                    if batch > 1:
                        q.put_many(items, timeout=PUT_SLICE)
                    else:
                        q.put(items[0], timeout=PUT_SLICE)
                except queue.Full:
                    log.complete(TIMEOUT, PUT, PUT_SLICE)
                    if _give_up(parent, abort):
                        return
                    continue
                except BaseException as exc:
                    log.complete(FAIL, PUT, PUT_SLICE)
                    if not is_survivable(exc, survivable):
                        raise
                    failed = True
                    if _give_up(parent, abort):
                        return
                    time.sleep(FAILED_CALL_PAUSE)
                    break
                log.complete(OK, PUT, PUT_SLICE)
                break
            seq += n
            if hook is not None:
                hook("producer", slot, seq)
    finally:
        log.close()
        if owned:
            q.close()


def consumer_main(
    endpoint: Any,
    workdir: str,
    slot: int,
    incarnation: int,
    batch: int,
    handback_timeout: float,
    hook: Optional[ChildHook],
    survivable: tuple[str, ...] = (),
    env: Optional[dict[str, str]] = None,
) -> None:
    """Get until a ``None`` sentinel, logging every call; the items got are checked against their checksum.

    A get failing with a ``survivable`` error is logged as failed (it got nothing) and the consumer
    goes on; any other error ends the worker (and the run).
    """
    parent = os.getppid()
    q, owned = _open_queue(endpoint, env)
    log = HistoryLog(os.path.join(workdir, f"c-{slot}-{incarnation}.log"))
    abort = os.path.join(workdir, "abort")
    done = 0
    try:
        while True:
            log.invoke_get(batch, GET_SLICE)
            try:
                items = q.get_many(batch, timeout=GET_SLICE) if batch > 1 else [q.get(timeout=GET_SLICE)]
            except queue.Empty:
                log.complete(TIMEOUT, GET, GET_SLICE)
                if _give_up(parent, abort):
                    return
                continue
            except BaseException as exc:
                log.complete(FAIL, GET, GET_SLICE)
                if not is_survivable(exc, survivable):
                    raise
                if _give_up(parent, abort):
                    return
                time.sleep(FAILED_CALL_PAUSE)
                continue
            got = []
            sentinels = 0
            for item in items:
                if item is None:
                    sentinels += 1  # sentinels come after every item (FIFO)
                    continue
                p_slot, p_inc, seq, payload, crc = item
                good = zlib.crc32(payload) == crc and payload == payload_for(p_slot, p_inc, seq, len(payload))
                got.append((p_slot, p_inc, seq, good))
            log.ok_get(got, GET_SLICE)
            done += len(got)
            if hook is not None:
                hook("consumer", slot, done)
            if sentinels:
                if sentinels > 1:  # a batch took other consumers' sentinels too: hand them back
                    _hand_back(q, sentinels - 1, handback_timeout, survivable)
                return
    finally:
        log.close()
        if owned:
            q.close()


def _hand_back(q: Any, sentinels: int, timeout: float, survivable: tuple[str, ...]) -> None:
    """Put ``sentinels`` back for the other consumers; a survivable failure is retried (a second copy
    of a sentinel is harmless: every consumer stops at its first)."""
    end = time.monotonic() + timeout
    while True:
        try:
            q.put_many([None] * sentinels, timeout=max(0.0, end - time.monotonic()))
            return
        except BaseException as exc:
            if not is_survivable(exc, survivable) or time.monotonic() > end:
                raise
            time.sleep(FAILED_CALL_PAUSE)


class _ThreadProcess:
    """A thread dressed as a process for the supervision helpers (no pid, no signals)."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], stderr_path: str) -> None:
        self.exitcode: Optional[int] = None
        self.pid: Optional[int] = None
        self.sentinel: Any = None
        self._stderr_path = stderr_path
        self._thread = threading.Thread(target=self._main, args=(target, args), daemon=True)

    def _main(self, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            target(*args)
            self.exitcode = 0
        except BaseException:
            with open(self._stderr_path, "a") as f:
                f.write(traceback.format_exc())
            self.exitcode = 1

    def start(self) -> None:
        self.pid = os.getpid()
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def kill(self) -> None:
        pass  # a thread cannot be killed: it leaves when it sees the abort file

    def join(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)


# -- the run ---------------------------------------------------------------------------------


class Worker:
    """One slot; ``incarnation`` is the current one. What a scenario kills, stops and respawns."""

    def __init__(self, role: str, slot: int) -> None:
        self.role = role
        self.slot = slot
        self.incarnation = -1
        self.process: Any = None
        self.stderr_path = ""
        self.stopped = False

    @property
    def name(self) -> str:
        return process_name(self.role, self.slot, self.incarnation)

    @property
    def log_path(self) -> str:
        return os.path.join(os.path.dirname(self.stderr_path), f"{self.role[0]}-{self.slot}-{self.incarnation}.log")

    def as_child(self) -> Child:
        return Child(self.role, self.slot, self.process, self.stderr_path, self.incarnation)


class _Abort(Exception):
    """A worker died on its own (or the scenario stalled): the problems are in the result already."""


class Scenario:
    """A named fault scenario; see fault_injection/README.md. Subclasses set the fields and :meth:`inject`."""

    name = ""
    description = ""
    modes: tuple[str, ...] = ("descriptor", "object")
    """Target modes it applies to (no signal reaches a thread worker)."""
    types: tuple[str, ...] = ()
    """The queue types it is meant for, as ``--list`` shows them (empty: any; :meth:`applies_to` decides)."""
    faults = 20
    """Default number of faults of a short run (``--faults``)."""
    soak_faults = 2000
    """Default number of faults of a soak run (``make soak``)."""

    def applies_to(self, target: Target) -> bool:
        return target.mode in self.modes

    def setup(self, target: Target, stack: ExitStack) -> Optional[Service]:
        """Before the run's queue is made: start what the faults need and return the run's :class:`Service`
        (its metadata goes into the descriptor; its control objects reach :meth:`inject` as ``ctx.service``).
        Register every stop on ``stack``: it is closed after the queue is destroyed. None (the default):
        the run starts the backend's own ``local_service()``, if it names one."""
        return None

    def inject(self, ctx: FaultContext) -> None:
        raise NotImplementedError


class FaultContext:
    """What a scenario gets: the workers, a seeded rng, and kill / stop / resume / respawn / sleep."""

    def __init__(self, run: _Run, faults: int, rng: random.Random) -> None:
        self._run = run
        self.faults = faults
        """How many faults this run asks for (kills, stops...)."""
        self.rng = rng
        """Seeded (the run's seed): use it for every random choice so a failure can be replayed."""
        self.faults_done = 0
        """Faults injected so far (kills and stops count themselves; see :meth:`count_fault`)."""

    @property
    def service(self) -> Service:
        """The run's service: the metadata every descriptor carries and what :meth:`Scenario.setup`
        started to fault (``ctx.service.control["proxy"]``...); empty for a backend that needs none."""
        return self._run.service

    @property
    def descriptor(self) -> Optional[QueueDescriptor]:
        """The descriptor of the run's queue (a registered type), None for a factory's queue."""
        descriptor = getattr(self._run.handle, "descriptor", None)
        return descriptor if isinstance(descriptor, QueueDescriptor) else None

    def queue_lost(self, dead_by: float, what: str = "", count: bool = True) -> None:
        """Record that what holds the queue (a Ray actor, a server without a store) was killed with its items,
        and was seen dead at ``dead_by`` (``time.monotonic()``, taken after the death was observed).

        The checker then allows the loss of every acked item whose put was invoked before ``dead_by``
        and that was not got (it may have been in the queue then), if the promise says such a kill loses
        the queue's contents (:attr:`stress.checker.Promise.loss_at_queue_kill`); an item put later is
        never allowed lost."""
        self._run.queue_kills.append(dead_by)
        if count:
            self.count_fault(what or "queue killed")

    def end_without_drain(self, why: str) -> None:
        """The queue is gone for good (an actor that does not restart): when :meth:`Scenario.inject` returns,
        the workers are told to leave instead of being drained, and the history is judged as it is."""
        self._run.gone = why

    def count_fault(self, what: str = "") -> None:
        """Count one fault (advances the progress bar); kill() and stop() call it unless told not to."""
        self.faults_done += 1
        self._run.result.faults += 1
        self._run.report_fault(what)

    def workers(self, role: Optional[str] = None) -> list[Worker]:
        """Current workers (``"producer"``, ``"consumer"`` or all)."""
        return [w for w in self._run.workers if role is None or w.role == role]

    def ready(self, worker: Worker) -> bool:
        """True once the worker's current incarnation has opened the queue and its log (it is working)."""
        return os.path.exists(worker.log_path)

    def wait_ready(self, workers: list[Worker]) -> None:
        """Wait (bounded by the run's stall timeout) until every one of ``workers`` is working."""
        end = time.monotonic() + self._run.stall_timeout
        while not all(self.ready(w) for w in workers):
            if time.monotonic() > end:
                self._run.result.problems.append(
                    f"no worker ready within {self._run.stall_timeout} s (stuck starting up?)"
                )
                self._run.result.problems.extend(stuck_reports(self._run.children(), progress=self._run.logged))
                raise _Abort
            self.sleep(0.01)

    def sleep(self, seconds: float) -> None:
        """Sleep; wakes early and aborts the run if a worker dies on its own."""
        end = time.monotonic() + seconds
        while True:
            self._run.fail_if_dead("during the fault phase")
            left = end - time.monotonic()
            if left <= 0:
                return
            wait_for_any(self._run.children(), min(left, POLL_SECONDS))

    def kill(self, worker: Worker, respawn: bool = True, count: bool = True) -> None:
        """SIGKILL the worker's current incarnation (recorded: its calls in flight may lose items), then respawn it.

        ``count=False``: not one fault of its own (a scenario that kills many at once counts the round).
        """
        self._signal(worker, signal.SIGKILL)
        worker.process.join(SIGKILL_REAP_SECONDS)
        if worker.process.exitcode is None:
            self._run.result.problems.append(f"{worker.name} still alive {SIGKILL_REAP_SECONDS} s after SIGKILL")
            raise _Abort
        self._run.killed.add(worker.name)
        self._run.result.kills += 1
        if worker.role == "producer":
            self._run.result.producer_kills += 1
        else:
            self._run.result.consumer_kills += 1
        if count:
            self.count_fault(f"kill {worker.name}")
        if respawn:
            self.respawn(worker)

    def respawn(self, worker: Worker) -> None:
        """Start the worker's next incarnation (after a kill with ``respawn=False``)."""
        self._run.spawn(worker)

    def stop(self, worker: Worker, count: bool = True) -> None:
        """SIGSTOP the worker (resume it with :meth:`resume`; the run resumes every stopped worker at the end)."""
        self._signal(worker, signal.SIGSTOP)
        worker.stopped = True
        self._run.result.stops += 1
        if count:
            self.count_fault(f"stop {worker.name}")

    def resume(self, worker: Worker) -> None:
        self._signal(worker, signal.SIGCONT)
        worker.stopped = False

    def _signal(self, worker: Worker, sig: int) -> None:
        try:
            os.kill(worker.process.pid, sig)
        except ProcessLookupError:  # reaped already: it exited on its own, which the verdict must say
            self._run.fail_if_dead(f"sending {signal.Signals(sig).name}")
            self._run.result.problems.append(f"{worker.name} vanished before {signal.Signals(sig).name}")
            raise _Abort from None


@dataclass
class RunResult(Verdict):
    """One run: the harness's own problems (deaths, stalls) plus the checker's report and its verdict."""

    target: str
    scenario: str
    seed: int
    report: Optional[CheckReport] = None
    faults: int = 0
    """Faults injected (every kind: kills, stops, cuts, server or actor kills)."""
    kills: int = 0
    producer_kills: int = 0
    consumer_kills: int = 0
    stops: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def got(self) -> int:
        """Items got (delivered), 0 if the history was not checked."""
        return self.report.got if self.report else 0

    @property
    def produced(self) -> int:
        return self.report.acked if self.report else 0

    @property
    def consumed(self) -> int:
        return self.report.got if self.report else 0

    @property
    def verdict(self) -> str:
        # An unjudged run (an anchor: nothing promised) is "no promise" whether or not it happened to go
        # well: "OK" would read as a verdict on a queue that promised nothing. A run with no report at all
        # (the harness aborted it) is BROKEN.
        if self.report is not None and not self.report.judged:
            return "no promise"
        return "BROKEN" if self.problems else "OK"

    def counts(self) -> str:
        faults = f"{self.kills} kills, {self.stops} stops, " if self.kills or self.stops else ""
        if self.faults and not faults:
            faults = f"{self.faults} faults, "
        body = self.report.counts() if self.report else "no history checked"
        return f"{self.scenario} seed={self.seed}: {faults}{self.seconds:.1f} s; {body}"

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "scenario": self.scenario,
            "seed": self.seed,
            "verdict": self.verdict,
            "ok": self.ok,
            "faults": self.faults,
            "kills": self.kills,
            "stops": self.stops,
            "seconds": self.seconds,
            "problems": self.problems,
            "report": self.report.to_json() if self.report else None,
        }


class _Run:
    def __init__(
        self,
        target: Target,
        endpoint: Any,
        workdir: str,
        result: RunResult,
        *,
        producers: int,
        consumers: int,
        items_per_producer: Optional[int],
        batch: int,
        payload_bytes: int,
        drain_timeout: float,
        stall_timeout: float,
        hook: Optional[ChildHook],
        progress: Optional[Callable[..., None]],
    ) -> None:
        self.target, self.endpoint, self.workdir, self.result = target, endpoint, workdir, result
        self.count, self.batch, self.payload_bytes = items_per_producer, batch, payload_bytes
        self.drain_timeout, self.stall_timeout, self.hook = drain_timeout, stall_timeout, hook
        self.progress: Optional[Callable[..., None]] = progress
        self.shown = 0
        self.workers = [Worker("producer", i) for i in range(producers)] + [
            Worker("consumer", i) for i in range(consumers)
        ]
        self.killed: set[str] = set()
        self.queue_kills: list[float] = []
        """Times by which the queue's holder was seen dead (:meth:`FaultContext.queue_lost`)."""
        self.gone: Optional[str] = None
        """Set by :meth:`FaultContext.end_without_drain`: why the run ends without a drain."""
        self.service = Service()
        self.handle: Any = None
        self.faulting = False
        """True during a scenario's fault phase, when every worker must stay up until the drain."""
        if target.mode == "descriptor":
            self.ctx: Any = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(["stress.runner", "sage_queue"])
        elif target.mode == "object" and target.processes == "multiprocessing":
            self.ctx = multiprocessing.get_context("fork")
        elif target.mode == "object":
            import multiprocess  # type: ignore[import-untyped]  # dill pickling; fork inherits the queue object

            self.ctx = multiprocess.get_context("fork")
        else:
            self.ctx = None

    def report_fault(self, what: str) -> None:
        if self.progress is not None:
            self.progress(what)

    def spawn(self, worker: Worker) -> None:
        worker.incarnation += 1
        worker.stopped = False
        worker.stderr_path = os.path.join(self.workdir, f"{worker.role[0]}-{worker.slot}-{worker.incarnation}.stderr")
        args: tuple[Any, ...]
        env = dict(os.environ) if self.target.mode == "descriptor" else None  # see _open_queue
        if worker.role == "producer":
            target: Callable[..., None] = producer_main
            batch = self.batch if self.target.batch else 1
            args = (
                self.endpoint,
                self.workdir,
                worker.slot,
                worker.incarnation,
                self.count,
                self.payload_bytes,
                batch,
                self.hook,
                self.target.promise.survivable,
                env,
            )
        else:
            target = consumer_main
            batch = self.batch if self.target.batch else 1
            args = (
                self.endpoint,
                self.workdir,
                worker.slot,
                worker.incarnation,
                batch,
                self.drain_timeout,
                self.hook,
                self.target.promise.survivable,
                env,
            )
        if self.ctx is None:
            worker.process = _ThreadProcess(target, args, worker.stderr_path)
        else:
            worker.process = self.ctx.Process(target=child_main, args=(worker.stderr_path, target, args), daemon=True)
        worker.process.start()

    def children(self) -> list[Child]:
        return [w.as_child() for w in self.workers if w.process is not None]

    def logged(self, child: Child) -> str:
        role = "p" if child.role == "producer" else "c"
        path = os.path.join(self.workdir, f"{role}-{child.index}-{child.incarnation}.log")
        return f"{os.path.getsize(path) if os.path.exists(path) else 0} log bytes"

    def fail_if_dead(self, when: str) -> None:
        # The current incarnation is never one we killed (a kill respawns at once, or the scenario
        # respawns before sleeping), so an abnormal exit here is a death on its own.
        dead = [
            c
            for c in abnormal_exits(self.children())
            if process_name(c.role, c.index, c.incarnation or 0) not in self.killed
        ]
        if dead:
            self.result.problems.extend(f"{death_report(c)} ({when})" for c in dead)
            raise _Abort
        if self.faulting:  # no worker leaves before the drain: one that did gave up on its own
            early = [w for w in self.workers if w.process is not None and w.process.exitcode == 0]
            if early:
                self.result.problems.extend(f"{w.as_child().name} exited early with code 0 ({when})" for w in early)
                raise _Abort

    def show_puts(self) -> None:
        """Advance an item progress bar by the puts logged since the last call (estimated from log sizes)."""
        if self.progress is None or self.count is None:
            return
        batch = self.batch if self.target.batch else 1
        per_call = 2 * HEADER.size + batch * TAG.size  # invoke put with its tags + ok put (a retry adds more)
        logged = sum(
            os.path.getsize(w.log_path)
            for w in self.workers
            if w.role == "producer" and w.process is not None and os.path.exists(w.log_path)
        )
        done = logged // per_call * batch
        if done > self.shown:
            self.progress("", done - self.shown)
            self.shown = done

    def wait_exited(self, role: str, end: float, phase: str, idle: Optional[Callable[[], None]] = None) -> bool:
        """Wait until every ``role`` worker exited; ``idle()`` is called about every SPARE_SENTINEL_EVERY s."""
        waited = [w for w in self.workers if w.role == role]
        next_idle = time.monotonic() + SPARE_SENTINEL_EVERY
        while any(w.process.exitcode is None for w in waited):
            self.show_puts()
            self.fail_if_dead(phase)
            left = end - time.monotonic()
            if left <= 0:
                self.result.problems.append(f"{phase}: not finished within {self.drain_timeout} s (deadlock?)")
                self.result.problems.extend(stuck_reports(self.children(), progress=self.logged))
                return False
            if idle is not None and time.monotonic() >= next_idle:
                idle()
                next_idle = time.monotonic() + SPARE_SENTINEL_EVERY
            wait_for_any(self.children(), min(left, POLL_SECONDS))
        self.fail_if_dead(phase)
        return True

    def drain(self, handle: Any) -> bool:
        """Stop the producers, one sentinel per consumer, wait for the consumers. False: a deadlock."""
        for w in self.workers:
            if w.stopped:
                FaultContext(self, 0, random.Random()).resume(w)
        end = time.monotonic() + self.drain_timeout
        open(os.path.join(self.workdir, "stop"), "wb").close()
        if not self.wait_exited("producer", end, "stopping the producers"):
            return False
        consumers = sum(1 for w in self.workers if w.role == "consumer")
        put = 0
        while put < consumers:
            self.fail_if_dead("while putting the sentinels")
            left = end - time.monotonic()
            if left <= 0:
                self.result.problems.append(
                    f"only {put}/{consumers} sentinels put within {self.drain_timeout} s (deadlock?)"
                )
                self.result.problems.extend(stuck_reports(self.children(), progress=self.logged))
                return False
            try:
                handle.put(None, timeout=min(left, POLL_SECONDS))
                put += 1
            except queue.Full:
                pass
            except Exception as exc:  # a put that failed may have put it: a spare sentinel is harmless
                if not is_survivable(exc, self.target.promise.survivable):
                    raise
                time.sleep(FAILED_CALL_PAUSE)

        def spare() -> None:
            # A consumer killed while its get was parked in a server (rpc: until RPC2's 6 s of silence)
            # may be handed a sentinel and die with it, as with any item its call took (RPC19): while
            # consumers still wait on an empty queue, one more sentinel (a spare one is harmless).
            try:
                if handle.qsize() == 0:
                    handle.put(None, timeout=POLL_SECONDS)
            except Exception:  # no qsize (some anchors), Full, or a survivable error: try again later
                pass

        return self.wait_exited("consumer", end, "draining the consumers", idle=spare)

    def leave(self) -> bool:
        """The queue is gone (:meth:`FaultContext.end_without_drain`): every worker leaves at its next call."""
        for w in self.workers:
            if w.stopped:
                FaultContext(self, 0, random.Random()).resume(w)
        open(os.path.join(self.workdir, "stop"), "wb").close()
        open(os.path.join(self.workdir, "abort"), "wb").close()
        end = time.monotonic() + self.drain_timeout
        return self.wait_exited("producer", end, "stopping the producers") and self.wait_exited(
            "consumer", end, "stopping the consumers"
        )

    def history(self) -> dict[str, list[Op]]:
        out = {}
        for w in self.workers:
            for inc in range(w.incarnation + 1):
                name = process_name(w.role, w.slot, inc)
                out[name] = read_history(os.path.join(self.workdir, f"{w.role[0]}-{w.slot}-{inc}.log"), name)
        return out


@contextmanager
def _progress_bar(
    total: int, label: str, enabled: Optional[bool], unit: str = "fault"
) -> Iterator[Optional[Callable[..., None]]]:
    """A tqdm bar on stderr when it is a terminal (or ``enabled`` forces it); None otherwise."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]  # optional extra (progress)
    except ImportError:
        enabled = False
    if not enabled or total <= 0:
        yield None
        return
    bar = tqdm(total=total, desc=label, unit=unit, leave=False, file=sys.stderr)

    def step(what: str, n: int = 1) -> None:
        if what:
            bar.set_postfix_str(what, refresh=False)
        bar.update(min(n, total - bar.n))

    try:
        yield step
    finally:
        bar.close()


def run(
    target: Target,
    *,
    scenario: Optional[Scenario] = None,
    faults: Optional[int] = None,
    producers: int = 2,
    consumers: int = 2,
    items_per_producer: Optional[int] = None,
    batch: int = 1,
    payload_bytes: int = 48,
    seed: Optional[int] = None,
    drain_timeout: float = 60.0,
    stall_timeout: float = 30.0,
    timeout: float = 300.0,
    hook: Optional[ChildHook] = None,
    progress: Optional[bool] = None,
) -> RunResult:
    """One run on a new queue of ``target``; the queue is destroyed (closed) afterwards.

    Without a scenario, producers put ``items_per_producer`` each (the stress run; ``timeout``
    bounds the put phase). With one, producers put until the drain and the scenario injects
    ``faults`` faults (default: its :attr:`Scenario.faults`). ``seed`` None draws one; the
    result carries it. ``hook``: see :data:`stress.core.ChildHook` (index = slot).
    """
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    name = scenario.name if scenario is not None else "stress"
    result = RunResult(target.name, name, seed)
    if scenario is not None and not scenario.applies_to(target):
        result.problems.append(f"scenario {scenario.name} does not apply to {target.name} ({target.mode} workers)")
        return result
    if scenario is None and items_per_producer is None:
        raise ValueError("a run without a scenario needs items_per_producer")
    services = ExitStack()
    try:
        service = scenario.setup(target, services) if scenario is not None else None
        if service is None:
            # The backend's own service (rpc: a throw-away server) for this run, stopped after the queue.
            service = Service(dict(services.enter_context(target.service()))) if target.service else Service()
        endpoint, handle, teardown = target.open(service.metadata)
    except BaseException:
        services.close()
        raise
    workdir = tempfile.mkdtemp(prefix="sageq-harness-")
    r = _Run(
        target,
        endpoint,
        workdir,
        result,
        producers=producers,
        consumers=consumers,
        items_per_producer=None if scenario is not None else items_per_producer,
        batch=batch,
        payload_bytes=payload_bytes,
        drain_timeout=drain_timeout,
        stall_timeout=stall_timeout,
        hook=hook,
        progress=None,
    )
    r.service, r.handle = service, handle
    start = time.monotonic()
    drained = False
    try:
        if scenario is not None:
            total, unit = (faults if faults is not None else scenario.faults), "fault"
        else:
            total, unit = producers * (items_per_producer or 0), "item"
        with _progress_bar(total, f"{target.name} {name}", progress, unit) as bar:
            r.progress = bar
            for w in r.workers:
                r.spawn(w)
            if scenario is not None:
                ctx = FaultContext(r, total, random.Random(seed))
                r.faulting = True
                scenario.inject(ctx)
                r.faulting = False
            else:
                if not r.wait_exited("producer", start + timeout, f"putting {items_per_producer} items per producer"):
                    return result
        # The queue gone for good (end_without_drain): nothing to drain, the workers just leave.
        drained = r.leave() if r.gone is not None else r.drain(handle)
    except _Abort:
        return result
    finally:
        result.seconds = time.monotonic() - start
        open(os.path.join(workdir, "abort"), "wb").close()  # threads and orphans leave on their next timeout
        for w in r.workers:
            if w.stopped and w.process is not None and w.process.exitcode is None:
                os.kill(w.process.pid, signal.SIGCONT)
        stopped_at = time.monotonic()
        stop_children(r.children())  # deadlocked workers too: their queue is about to be destroyed
        deadlocked = not drained and any("deadlock" in p for p in result.problems)
        if drained or deadlocked:
            # A deadlocked run is still checked (an anchor's counts), its deadlock being the verdict.
            result.report = check(
                r.history(),
                target.promise,
                killed=frozenset(r.killed),
                queue_kills=tuple(r.queue_kills),
                deadlock=deadlocked,
                seed=seed,
                end=stopped_at,
            )
            result.report.kills, result.report.stops = result.kills, result.stops
            if drained:
                result.problems.extend(result.report.problems)
            if r.gone is not None:
                result.report.notes.append(f"not drained: {r.gone}")
        try:
            teardown()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            services.close()  # after the queue is destroyed: the service it lived on
    return result


def run_stress(
    descriptor_factory: Callable[[], QueueDescriptor],
    *,
    producers: int = 4,
    consumers: int = 4,
    items_per_producer: int = 1000,
    payload_bytes: int = 32,
    batch: int = 1,
    timeout: float = 120.0,
    child_hook: Optional[ChildHook] = None,
    seed: Optional[int] = None,
) -> RunResult:
    """The stress run (no faults) on a queue from ``descriptor_factory`` (see :func:`run`)."""
    probe = descriptor_factory()
    target = Target(
        probe.queue_type,
        "descriptor",
        promise_for(probe.queue_type),
        make_descriptor=descriptor_factory,
        batch=batch > 1,
    )
    return run(
        target,
        producers=producers,
        consumers=consumers,
        items_per_producer=items_per_producer,
        batch=batch,
        payload_bytes=payload_bytes,
        timeout=timeout,
        drain_timeout=timeout,
        hook=child_hook,
        seed=seed,
    )
