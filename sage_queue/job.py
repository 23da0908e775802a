"""Jobs: stages of workers joined by queues, started, supervised and torn down (spec/job.md).

    >>> from sage_queue.job import Job, JobManager, Stage
    >>> job = Job(
    ...     queues={"input": "auto", "output": "auto"},
    ...     stages=[Stage("numbers", "mypkg.steps:numbers", output="input", where="process"),
    ...             Stage("square", "mypkg.steps:square", input="input", output="output", where="process"),
    ...             Stage("total", "mypkg.steps:total", input="output", where="thread")])
    >>> JobManager(job).run().results["total"]        # doctest: +SKIP

A stage function has one of three shapes, chosen by the queues the stage is wired to:
a *source* (output only) is ``fn() -> Iterable``, a *transform* (input and output) is
``fn(items: Iterator) -> Iterable``, a *sink* (input only) is ``fn(items: Iterator) -> result``
(a JSON value when the stage runs in a process). The manager owns end-of-stream (JOB3-JOB5):
a stage function never sees the marker, it sees its input iterator end.

Importing this module imports no backend; queues are created with the generic
``QueueDescriptor.create`` and resolved with ``resolve_descriptor``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue as stdqueue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal, Optional, Union, overload

from .descriptor import QueueDescriptor
from .errors import QueueClosed
from .protocol import CROSS_PROCESS, STATS, QueueStats
from .registry import backend_class, canonical_type, unavailable_reason
from .resolve import resolve_descriptor

__all__ = [
    "EOS",
    "EndOfStream",
    "Job",
    "JobFailed",
    "JobManager",
    "JobResult",
    "QueueChoice",
    "QueueSpec",
    "Stage",
    "WorkerExit",
    "WorkerInfo",
    "choose_queue_type",
    "queue_stats",
]

log = logging.getLogger(__name__)

Where = str
"""Where a stage runs: ``"thread"`` (a thread of the manager's process), ``"process"`` (a
process on this host), ``"ray"`` (a Ray worker) or ``"host:NAME"`` (a process on host NAME)."""

AUTO = "auto"
_POLL_S = 0.05  # the supervisor's tick; it bounds reaction time, never correctness
_STOP_POLL_S = 0.2  # how often a thread worker blocked on a queue looks at its stop flag
_GRACE_S = 3.0  # SIGTERM -> SIGKILL grace for worker processes at teardown
_PARENT_POLL_S = 0.5  # how often a worker process checks that its manager is alive
_ORPHAN_EXIT = 70  # exit status of a worker process whose manager is gone


# -- end of stream ---------------------------------------------------------------------------------


class EndOfStream:
    """The end-of-stream marker (JOB3). One instance per process (:data:`EOS`); it pickles to it."""

    _instance: Optional[EndOfStream] = None

    def __new__(cls) -> EndOfStream:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __reduce__(self) -> tuple[type[EndOfStream], tuple[()]]:
        return (EndOfStream, ())

    def __repr__(self) -> str:
        return "EOS"


EOS = EndOfStream()


def is_eos(item: Any) -> bool:
    return isinstance(item, EndOfStream)


# -- choosing a queue type -------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueChoice:
    """The queue type picked for two ends, and why (one sentence)."""

    queue_type: str
    reason: str


def _host(where: Where) -> Optional[str]:
    return where[5:] if where.startswith("host:") else None


def _check_where(where: Where) -> None:
    if where not in ("thread", "process", "ray") and not (where.startswith("host:") and len(where) > 5):
        raise ValueError(f"where must be 'thread', 'process', 'ray' or 'host:NAME', got {where!r}")


def _same_host_type() -> QueueChoice:
    why = unavailable_reason("sage")
    if why is None:
        return QueueChoice("sage", "both ends on this host in different processes: sage (shared-memory ring)")
    return QueueChoice("shm", f"both ends on this host in different processes; sage unavailable ({why}): shm")


@overload
def choose_queue_type(
    producer_where: Where,
    consumer_where: Where,
    *,
    override: Optional[str] = ...,
    local_host: str = ...,
    explain: Literal[False] = ...,
) -> str: ...


@overload
def choose_queue_type(
    producer_where: Where,
    consumer_where: Where,
    *,
    override: Optional[str] = ...,
    local_host: str = ...,
    explain: Literal[True],
) -> QueueChoice: ...


def choose_queue_type(
    producer_where: Where,
    consumer_where: Where,
    *,
    override: Optional[str] = None,
    local_host: str = "localhost",
    explain: bool = False,
) -> Union[str, QueueChoice]:
    """The queue type for a producer and a consumer running where they say (JOB8).

    Same process (both ``"thread"``): ``local``. Same host, different processes: ``sage``
    (``shm`` where the sage C core is unavailable). Either end a Ray worker, both on this
    host: ``ray_actor``. An end on another host (``"host:NAME"`` with NAME not
    ``local_host``): ``rpc``. ``override`` wins (it is only checked to be a known type).
    ``explain=True`` returns a :class:`QueueChoice` with the reason instead of the name.
    """
    _check_where(producer_where)
    _check_where(consumer_where)
    choice: QueueChoice
    if override is not None and override != AUTO:
        choice = QueueChoice(canonical_type(override), f"override: {override} asked for explicitly")
    else:
        hosts = {_host(w) for w in (producer_where, consumer_where)} - {None, local_host}
        if hosts:
            choice = QueueChoice(
                "rpc",
                f"an end runs on another host ({', '.join(sorted(h for h in hosts if h))}): "
                "rpc (a sage-queue server reachable by both)",
            )
        elif "ray" in (producer_where, consumer_where):
            why = unavailable_reason("ray_actor")
            note = "" if why is None else f"; not resolvable here: {why}"
            base = "an end is a Ray worker: ray_actor (reachable from any Ray worker)"
            choice = QueueChoice("ray_actor", base + note)
        elif producer_where == consumer_where == "thread":
            choice = QueueChoice("local", "both ends are threads of one process: local (queue.Queue)")
        else:
            choice = _same_host_type()
    return choice if explain else choice.queue_type


def _choose_for_many(producers: Sequence[Where], consumers: Sequence[Where]) -> QueueChoice:
    """The type for a queue with several ends: the most general of the pairwise choices."""
    order = ["local", "shm", "sage", "ray_actor", "rpc"]
    best: Optional[QueueChoice] = None
    for p in producers or ["thread"]:  # the manager itself is a thread-end (it writes EOS)
        for c in consumers or ["thread"]:
            choice = choose_queue_type(p, c, explain=True)
            if best is None or order.index(choice.queue_type) > order.index(best.queue_type):
                best = choice
    # The manager writes the end-of-stream markers, so a queue between two threads of a
    # process is local, but any queue touched by a process needs a cross-process type.
    assert best is not None
    return best


# -- declaring a job -------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueSpec:
    """A queue of a job: its type (``"auto"`` lets :func:`choose_queue_type` pick), maxsize, metadata."""

    queue_type: str = AUTO
    maxsize: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)


StageFn = Union[str, Callable[..., Any]]


@dataclass(frozen=True)
class Stage:
    """A stage: ``replicas`` workers running ``fn`` (a callable or ``"module:name"``), reading
    ``input`` and writing ``output`` (queue names of the job; at least one of the two)."""

    name: str
    fn: StageFn
    input: Optional[str] = None
    output: Optional[str] = None
    where: Where = "thread"
    replicas: int = 1

    def __post_init__(self) -> None:
        _check_where(self.where)
        if self.input is None and self.output is None:
            raise ValueError(f"stage {self.name!r} has neither input nor output")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"stage {self.name!r}: replicas must be an int >= 1, got {self.replicas!r}")


Policy = Literal["fail_fast", "restart"]


@dataclass(frozen=True)
class Job:
    """Stages and the queues between them; ``policy`` says what a dead worker causes (JOB10)."""

    queues: Mapping[str, Union[str, QueueSpec, QueueDescriptor]]
    stages: Sequence[Stage]
    policy: Policy = "fail_fast"
    max_restarts: int = 3
    start_method: str = "spawn"

    def __post_init__(self) -> None:
        if self.policy not in ("fail_fast", "restart"):
            raise ValueError(f"policy must be 'fail_fast' or 'restart', got {self.policy!r}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for stage in self.stages:
            for q in (stage.input, stage.output):
                if q is not None and q not in self.queues:
                    raise ValueError(f"stage {stage.name!r} names queue {q!r}, which the job does not declare")
            if stage.where == "ray" or _host(stage.where) is not None:
                raise NotImplementedError(
                    f"stage {stage.name!r}: where={stage.where!r} workers are not started by this JobManager yet "
                    "(thread and process are); run them yourself with the job's descriptors"
                )


# -- outcome ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerExit:
    """How one worker ended: ``cause`` is ``"ok"``, ``"exit code N"``, ``"killed by SIGKILL"`` or
    ``"raised ExcType: message"``; ``detail`` holds a traceback when there is one."""

    stage: str
    replica: int
    attempt: int
    pid: Optional[int]
    ok: bool
    cause: str
    detail: str = ""


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as :meth:`JobManager.workers` sees it; ``pid`` is None for a thread."""

    stage: str
    replica: int
    attempt: int
    where: Where
    pid: Optional[int]
    running: bool


@dataclass
class JobResult:
    """``results[stage]``: the sink's return value per replica (a list); ``exits``: every worker's end."""

    results: dict[str, list[Any]]
    exits: list[WorkerExit]
    queue_types: dict[str, str]
    restarts: int


class JobFailed(RuntimeError):
    """The job stopped before its end (a worker died under ``fail_fast``, restarts ran out, or the
    manager's timeout). ``exits`` lists every worker's end so far; everything was torn down."""

    def __init__(self, message: str, exits: Sequence[WorkerExit]) -> None:
        super().__init__(message)
        self.exits = list(exits)


# -- the worker side -------------------------------------------------------------------------------


def _fn_ref(fn: StageFn) -> str:
    if isinstance(fn, str):
        return fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        raise ValueError(f"a process stage needs a module-level function, got {fn!r}")
    return f"{module}:{qualname}"


def _load_fn(ref: str) -> Callable[..., Any]:
    module_name, _, attr = ref.partition(":")
    if not attr:
        raise ValueError(f"a stage function must be 'module:name', got {ref!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref} is not callable")
    return obj  # type: ignore[no-any-return]


def _items(q: Any, stop: Optional[threading.Event]) -> Iterator[Any]:
    """Items of ``q`` up to (not including) the first end-of-stream marker (JOB4)."""
    while True:
        if stop is None:
            item = q.get()
        else:  # a thread cannot be killed: it looks at its stop flag between bounded waits
            try:
                item = q.get(timeout=_STOP_POLL_S)
            except stdqueue.Empty:
                if stop.is_set():
                    raise QueueClosed("the job is stopping") from None
                continue
        if is_eos(item):
            return
        yield item


def _put(q: Any, item: Any, stop: Optional[threading.Event]) -> None:
    if stop is None:
        q.put(item)
        return
    while True:
        try:
            q.put(item, timeout=_STOP_POLL_S)
            return
        except stdqueue.Full:
            if stop.is_set():
                raise QueueClosed("the job is stopping") from None


def _run_stage(fn: Callable[..., Any], source: Any, sink: Any, stop: Optional[threading.Event]) -> Any:
    """Run one worker's function between its handles; the sink's result, else None."""
    if source is None:
        for item in fn():
            _put(sink, item, stop)
        return None
    items = _items(source, stop)
    if sink is None:
        return fn(items)
    for item in fn(items):
        _put(sink, item, stop)
    return None


def _watch_parent(parent: int) -> None:
    """Exit this worker process soon after the manager's process is gone, however it died (JOB1).

    Polled rather than PR_SET_PDEATHSIG: that fires when the *thread* that started us
    exits, and a manager may start workers from a thread that ends before the job does.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(_ORPHAN_EXIT)

    threading.Thread(target=watch, name="sage-job-parent-watch", daemon=True).start()


def _worker_process_main(payload_json: str, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a worker process: it receives JSON only (descriptors and a function path)."""
    payload = json.loads(payload_json)
    handles: list[Any] = []
    _watch_parent(os.getppid())

    def open_(text: Optional[str]) -> Any:
        if text is None:
            return None
        handles.append(resolve_descriptor(QueueDescriptor.from_json(text)))
        return handles[-1]

    try:
        try:
            result = _run_stage(_load_fn(payload["fn"]), open_(payload["input"]), open_(payload["output"]), None)
            message = {"ok": True, "result": result}
        except BaseException as exc:  # reported to the manager, then the process exits with 1
            message = {"ok": False, "cause": f"raised {type(exc).__name__}: {exc}", "detail": traceback.format_exc()}
        try:
            text = json.dumps(message)
        except (TypeError, ValueError) as exc:
            text = json.dumps({"ok": False, "cause": f"result is not JSON-serialisable: {exc}", "detail": ""})
        conn.send_bytes(text.encode())
    finally:
        for handle in handles:
            handle.close()  # close, never destroy: the queues belong to the manager
        conn.close()
    if not message["ok"]:
        os._exit(1)


# -- the manager -----------------------------------------------------------------------------------


@dataclass
class _Worker:
    stage: Stage
    replica: int
    attempt: int
    process: Any = None  # multiprocessing.Process
    conn: Optional[multiprocessing.connection.Connection] = None
    thread: Optional[threading.Thread] = None
    outcome: Optional[dict[str, Any]] = None  # set by a thread worker when it ends
    message: Optional[dict[str, Any]] = None  # a process worker's result message, once read
    ended: Optional[WorkerExit] = None
    result: Any = None


def _signal_cause(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def queue_stats(handle: Any) -> Optional[QueueStats]:
    """``handle.stats()`` where the backend declares the ``stats`` capability, else None (JOB12)."""
    if STATS in getattr(handle, "capabilities", frozenset()):
        stats: QueueStats = handle.stats()
        return stats
    return None


class JobManager:
    """Creates a job's queues, runs its workers, delivers end-of-stream, recovers or fails, tears down.

    Use :meth:`run` (which tears down on every exit path, JOB1) or the context manager with
    :meth:`start` / :meth:`wait`. The manager's thread supervises; workers never block it.
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        self.descriptors: dict[str, QueueDescriptor] = {}
        self.choices: dict[str, QueueChoice] = {}
        self._handles: dict[str, Any] = {}
        self._workers: list[_Worker] = []
        self._exits: list[WorkerExit] = []
        self._restarts = 0
        self._eos_sent: dict[str, int] = {}  # queue -> markers put so far
        self._stop = threading.Event()
        self._torn_down = False
        self._ctx: Any = multiprocessing.get_context(job.start_method)

    # -- setup ----------------------------------------------------------------------------------

    def _producers(self, q: str) -> list[Stage]:
        return [s for s in self.job.stages if s.output == q]

    def _consumers(self, q: str) -> list[Stage]:
        return [s for s in self.job.stages if s.input == q]

    def _descriptor(self, name: str, spec: Union[str, QueueSpec, QueueDescriptor]) -> QueueDescriptor:
        if isinstance(spec, QueueDescriptor):
            self.choices[name] = QueueChoice(spec.queue_type, "given as a descriptor")
            return spec
        if isinstance(spec, str):
            spec = QueueSpec(spec)
        if spec.queue_type in (AUTO, None):
            choice = _choose_for_many(
                [s.where for s in self._producers(name)], [s.where for s in self._consumers(name)]
            )
        else:
            choice = QueueChoice(spec.queue_type, "declared by the job")
            ends = [s for s in (*self._producers(name), *self._consumers(name)) if s.where != "thread"]
            if ends and CROSS_PROCESS not in getattr(backend_class(choice.queue_type), "capabilities", ()):
                raise ValueError(
                    f"queue {name!r} is declared {choice.queue_type!r}, which cannot cross processes, but stage "
                    f"{ends[0].name!r} runs in a {ends[0].where}; declare it 'auto' or a cross-process type"
                )
        self.choices[name] = choice
        return QueueDescriptor.create(choice.queue_type, None, spec.maxsize, **dict(spec.metadata))

    def start(self) -> JobManager:
        """Create every queue, then start every worker."""
        try:
            for name, spec in self.job.queues.items():
                desc = self._descriptor(name, spec)
                self._handles[name] = resolve_descriptor(desc)  # creates it; the manager owns it
                self.descriptors[name] = desc
                self._eos_sent[name] = 0
                log.info("queue %s: %s (%s)", name, desc.queue_type, self.choices[name].reason)
            for stage in self.job.stages:
                for replica in range(stage.replicas):
                    self._start_worker(stage, replica, 0)
        except BaseException:
            self.teardown()
            raise
        return self

    def _start_worker(self, stage: Stage, replica: int, attempt: int) -> _Worker:
        w = _Worker(stage, replica, attempt)
        in_json = self.descriptors[stage.input].to_json() if stage.input else None
        out_json = self.descriptors[stage.output].to_json() if stage.output else None
        if stage.where == "process":
            # Only what this worker needs, as JSON (JOB2); the pipe carries its result back.
            payload = json.dumps({"fn": _fn_ref(stage.fn), "input": in_json, "output": out_json})
            parent_conn, child_conn = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(
                target=_worker_process_main,
                args=(payload, child_conn),
                name=f"sage-job-{stage.name}-{replica}",
                daemon=True,
            )
            proc.start()
            child_conn.close()
            w.process, w.conn = proc, parent_conn
        else:
            fn = _load_fn(stage.fn) if isinstance(stage.fn, str) else stage.fn
            w.thread = threading.Thread(
                target=self._thread_main,
                args=(w, fn, in_json, out_json),
                name=f"sage-job-{stage.name}-{replica}",
                daemon=True,
            )
            w.thread.start()
        self._workers.append(w)
        log.info("started %s[%d] attempt %d (%s)", stage.name, replica, attempt, stage.where)
        return w

    def _thread_main(self, w: _Worker, fn: Callable[..., Any], in_json: Optional[str], out_json: Optional[str]) -> None:
        handles = [resolve_descriptor(j) if j is not None else None for j in (in_json, out_json)]
        try:
            w.outcome = {"ok": True, "result": _run_stage(fn, handles[0], handles[1], self._stop)}
        except BaseException as exc:  # reported by the supervisor
            w.outcome = {"ok": False, "cause": f"raised {type(exc).__name__}: {exc}", "detail": traceback.format_exc()}
        finally:
            for h in handles:
                if h is not None:
                    h.close()

    # -- supervision ----------------------------------------------------------------------------

    @staticmethod
    def _read_message(w: _Worker) -> None:
        """Take the worker's one result message from its pipe if it is there (kept in ``w.message``)."""
        assert w.conn is not None
        if w.message is None and not w.conn.closed and w.conn.poll():
            try:
                w.message = json.loads(w.conn.recv_bytes())
            except (EOFError, OSError, ValueError):  # died before (or while) sending it
                w.conn.close()

    def _poll(self, w: _Worker) -> Optional[WorkerExit]:
        """The worker's end if it has ended (its result stored), else None."""
        message: Optional[dict[str, Any]]
        if w.thread is not None:
            if w.thread.is_alive() or w.outcome is None:
                return None
            message, pid = w.outcome, None
        else:
            proc = w.process
            self._read_message(w)
            if proc.is_alive():
                if w.message is None:
                    return None
                proc.join(_GRACE_S)  # it sent its result and is closing its handles
                if proc.exitcode is None:
                    return None
            else:
                self._read_message(w)  # sent just before it exited: still in the pipe
            message, pid = w.message, proc.pid
            if message is None or (proc.exitcode != 0 and message.get("ok")):
                message = {
                    "ok": False,
                    "cause": _signal_cause(proc.exitcode),
                    "detail": "" if message is None else message.get("detail", ""),
                }
            assert w.conn is not None
            w.conn.close()
        assert message is not None
        ok = bool(message["ok"])
        w.result = message.get("result")
        return WorkerExit(
            w.stage.name, w.replica, w.attempt, pid, ok, "ok" if ok else message["cause"], message.get("detail", "")
        )

    def _finished(self, stage: Stage) -> bool:
        """Every replica of ``stage`` has ended well (a replica's last attempt counts)."""
        done = {w.replica for w in self._workers if w.stage is stage and w.ended is not None and w.ended.ok}
        return len(done) == stage.replicas

    def _deliver_eos(self) -> None:
        """JOB4: once every producer of a queue has ended well, one marker per consumer worker.

        Markers are put after the last item of every producer has been put (those puts
        returned before the producer ended), so in a FIFO queue every consumer gets every
        item before a marker; each consumer stops at its first marker, so C markers stop C
        consumers whichever takes which. A consumer restarted after the markers went out
        gets one more (JOB5): an extra marker is harmless, a missing one would hang.
        """
        for name, handle in self._handles.items():
            producers = self._producers(name)
            if not all(self._finished(s) for s in producers):
                continue
            live_consumers = sum(s.replicas for s in self._consumers(name))
            restarted = sum(1 for w in self._workers if w.stage.input == name and w.attempt > 0)
            want = live_consumers + restarted
            while self._eos_sent[name] < want:
                # Bounded wait: on a full queue whose consumer just died, a blocking put would
                # stop the supervisor forever; the next tick retries after recovering workers.
                try:
                    handle.put(EOS, timeout=_POLL_S)
                except stdqueue.Full:
                    break
                self._eos_sent[name] += 1

    def wait(self, timeout: Optional[float] = None) -> JobResult:
        """Supervise until every worker ended well; JobFailed otherwise (after tearing down)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._deliver_eos()
        while True:
            for w in list(self._workers):
                if w.ended is not None:
                    continue
                ended = self._poll(w)
                if ended is None:
                    continue
                w.ended = ended
                self._exits.append(ended)
                if ended.ok:
                    continue
                log.warning("worker %s[%d] ended: %s", ended.stage, ended.replica, ended.cause)
                self._recover(w, ended)
            self._deliver_eos()
            if all(self._finished(s) for s in self.job.stages):
                break
            if deadline is not None and time.monotonic() >= deadline:
                self.teardown()
                raise JobFailed(f"job not finished after {timeout} s (the manager's timeout)", self._exits)
            time.sleep(_POLL_S)
        results: dict[str, list[Any]] = {}
        for stage in self.job.stages:
            if stage.output is None:
                last = {w.replica: w.result for w in self._workers if w.stage is stage and w.ended and w.ended.ok}
                results[stage.name] = [last[r] for r in sorted(last)]
        return JobResult(
            results, list(self._exits), {n: d.queue_type for n, d in self.descriptors.items()}, self._restarts
        )

    def _recover(self, w: _Worker, ended: WorkerExit) -> None:
        if self.job.policy == "restart" and self._restarts < self.job.max_restarts:
            self._restarts += 1
            # The new worker re-resolves the same descriptors: same queues, new handles.
            self._start_worker(w.stage, w.replica, w.attempt + 1)
            return
        why = (
            "fail_fast"
            if self.job.policy == "fail_fast"
            else f"restart limit reached ({self.job.max_restarts} restarts)"
        )
        message = f"worker {ended.stage}[{ended.replica}] (pid {ended.pid}) {ended.cause}; job stopped: {why}" + (
            f"\n{ended.detail}" if ended.detail else ""
        )
        self.teardown()
        raise JobFailed(message, self._exits)

    def run(self, timeout: Optional[float] = None) -> JobResult:
        """Start, wait and tear down (also on KeyboardInterrupt, and SIGTERM in the main thread: JOB1)."""
        previous: Any = None
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:

            def on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
                raise KeyboardInterrupt("SIGTERM")

            previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            self.start()
            return self.wait(timeout)
        finally:
            try:
                self.teardown()
            finally:
                if in_main:
                    signal.signal(signal.SIGTERM, previous)

    # -- monitoring and teardown ----------------------------------------------------------------

    def workers(self) -> list[WorkerInfo]:
        """Every worker started so far (restarted ones included), in start order."""
        return [
            WorkerInfo(
                w.stage.name,
                w.replica,
                w.attempt,
                w.stage.where,
                w.process.pid if w.process is not None else None,
                w.ended is None
                and (w.thread.is_alive() if w.thread is not None else w.process is not None and w.process.is_alive()),
            )
            for w in self._workers
        ]

    def stats(self) -> dict[str, Optional[QueueStats]]:
        """Each queue's ``stats()``, None where its backend does not declare ``stats`` (JOB12)."""
        return {name: queue_stats(h) for name, h in self._handles.items()}

    def teardown(self) -> None:
        """Stop every worker, then destroy every queue. Idempotent; never raises for a worker."""
        if self._torn_down:
            return
        self._torn_down = True
        self._stop.set()
        procs = [w.process for w in self._workers if w.process is not None]
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + _GRACE_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        for w in self._workers:
            if w.conn is not None:
                w.conn.close()
        # Destroying wakes any thread worker still blocked in a backend's get/put (E13);
        # the others see the stop flag within _STOP_POLL_S.
        for name, handle in self._handles.items():
            try:
                if hasattr(handle, "destroy"):
                    handle.destroy()
                else:
                    handle.close()
            except Exception:  # one queue's failure must not leak the others
                log.exception("destroying queue %s", name)
        for w in self._workers:
            if w.thread is not None:
                w.thread.join(_GRACE_S)
        for w in self._workers:
            if w.process is not None:
                w.process.close()
                w.process = None

    def __enter__(self) -> JobManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


# -- command line: python -m sage_queue.job choose PRODUCER CONSUMER [--explain] --------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m sage_queue.job choose thread process --explain``: the type, and why (JOB8)."""
    parser = argparse.ArgumentParser(prog="python -m sage_queue.job", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    choose = sub.add_parser("choose", help="pick a queue type from where the two ends run")
    choose.add_argument("producer", help="thread | process | ray | host:NAME")
    choose.add_argument("consumer", help="thread | process | ray | host:NAME")
    choose.add_argument("--override", default=None, help="a queue type that wins over the choice")
    choose.add_argument("--local-host", default="localhost", help="the name of this host in host:NAME")
    choose.add_argument("--explain", action="store_true", help="print why as well")
    args = parser.parse_args(argv)
    try:
        choice = choose_queue_type(
            args.producer, args.consumer, override=args.override, local_host=args.local_host, explain=True
        )
    except ValueError as exc:  # a bad where, an unknown type (UnknownQueueType is a ValueError)
        parser.error(str(exc))
    print(f"{choice.queue_type}: {choice.reason}" if args.explain else choice.queue_type)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
