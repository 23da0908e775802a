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

A stage runs where it says: ``"thread"``, ``"process"`` (spawned here), ``"ray"`` (a Ray task,
JOB13) or ``"host:NAME"`` (a process started on host NAME through ``JobManager(job,
hosts={"NAME": HostSpec(launcher=["ssh", "NAME"], address="10.0.0.1")})``, JOB14; its queues are
rpc, on a server the manager starts). Every worker but a thread gets JSON only: its queues'
descriptors, its function as ``"module:name"`` and the stage's keyword arguments
(``Stage(..., args={"n": 10})``: ``fn(**args)``, ``fn(items, **args)``; JOB17).

Importing this module imports no backend (nor Ray, nor pyzmq); queues are created with the
generic ``QueueDescriptor.create`` and resolved with ``resolve_descriptor``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue as stdqueue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal, Optional, Union, overload

from .descriptor import QueueDescriptor
from .errors import QueueClosed
from .protocol import CROSS_PROCESS, STATS, QueueStats
from .registry import backend_class, canonical_type, type_schema, unavailable_reason
from .resolve import resolve_descriptor

__all__ = [
    "EOS",
    "EndOfStream",
    "HostSpec",
    "Job",
    "JobFailed",
    "JobManager",
    "JobResult",
    "QueueChoice",
    "QueueSpec",
    "Stage",
    "StageCounts",
    "WorkerExit",
    "WorkerInfo",
    "choose_main",
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


def _choose_for_many(
    producers: Sequence[Where], consumers: Sequence[Where], pick: Callable[[Where, Where], QueueChoice]
) -> QueueChoice:
    """The type for a queue with several ends: the most general of the pairwise choices."""
    order = ["local", "shm", "sage", "ray_actor", "rpc"]
    best: Optional[QueueChoice] = None
    for p in producers or ["thread"]:  # the manager itself is a thread-end (it writes EOS)
        for c in consumers or ["thread"]:
            choice = pick(p, c)
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
    ``input`` and writing ``output`` (queue names of the job; at least one of the two).
    ``args``: keyword arguments for ``fn`` in every worker, a JSON object (JOB17): each worker gets
    its JSON copy (a tuple arrives as a list), wherever it runs."""

    name: str
    fn: StageFn
    input: Optional[str] = None
    output: Optional[str] = None
    where: Where = "thread"
    replicas: int = 1
    args: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_where(self.where)
        if self.input is None and self.output is None:
            raise ValueError(f"stage {self.name!r} has neither input nor output")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"stage {self.name!r}: replicas must be an int >= 1, got {self.replicas!r}")
        _args_json(self.name, self.args)  # refused here, before any job starts, not in a worker
        if isinstance(self.fn, str):
            module, _, attr = self.fn.partition(":")
            if not module or not attr or not all(p.isidentifier() for p in (*module.split("."), *attr.split("."))):
                raise ValueError(f"stage {self.name!r}: fn must be 'module:name' (a dotted path), got {self.fn!r}")
        elif not callable(self.fn):
            raise TypeError(
                f"stage {self.name!r}: fn must be a callable or 'module:name', got {type(self.fn).__name__}"
            )


def _args_json(stage: str, args: Any) -> str:
    """``args`` as the JSON text its workers get (JOB17); TypeError/ValueError naming the stage."""
    if not isinstance(args, Mapping):
        raise TypeError(f"stage {stage!r}: args must be a mapping of keyword arguments, got {type(args).__name__}")
    bad = [k for k in args if not isinstance(k, str)]
    if bad:
        raise TypeError(f"stage {stage!r}: args keys must be str (keyword names), got {bad[0]!r}")
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and another host's decoder may refuse them.
        return json.dumps(dict(args), allow_nan=False)
    except TypeError as exc:
        raise TypeError(f"stage {stage!r}: args must be JSON-serialisable: {exc}") from None
    except ValueError as exc:  # a NaN or an infinity, or a circular reference
        raise ValueError(f"stage {stage!r}: args must be JSON-serialisable: {exc}") from None


Policy = Literal["fail_fast", "restart"]


@dataclass(frozen=True)
class Job:
    """Stages and the queues between them; ``policy`` says what a dead worker causes (JOB10).
    ``name`` names the job for monitoring (``sage-queue top``); None: one is made up at start."""

    queues: Mapping[str, Union[str, QueueSpec, QueueDescriptor]]
    stages: Sequence[Stage]
    policy: Policy = "fail_fast"
    max_restarts: int = 3
    start_method: str = "spawn"
    name: Optional[str] = None

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


@dataclass(frozen=True)
class HostSpec:
    """How the manager starts a worker on another host, and how that host reaches this one (JOB14).

    ``launcher``: the argv prefix that runs a command there (``["ssh", "gpu7"]``,
    ``["ip", "netns", "exec", "ns-b"]``; ``[]`` runs it here); ``python`` is appended, then
    ``-m sage_queue.job worker``. ``address``: the address of *this* host as that host reaches
    it; the rpc server the manager starts for the job's rpc queues binds it. ``env``: extra
    environment variables for the launcher process (``ssh`` does not forward them; ``ip netns
    exec`` and ``[]`` do).
    """

    launcher: Sequence[str] = ()
    address: str = "127.0.0.1"
    python: str = sys.executable
    env: Mapping[str, str] = field(default_factory=dict)


# -- outcome ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerExit:
    """How one worker ended: ``cause`` is ``"ok"``, ``"exit code N"``, ``"killed by SIGKILL"``,
    ``"raised ExcType: message"`` or, for a Ray worker, ``"Ray worker died: ..."``, ``"Ray task
    cancelled"``, ``"Ray task failed: ..."``; ``detail`` holds a traceback (or a host worker's last
    stderr lines) when there is one. ``items_in``/``items_out``: items the worker took from its
    input and put into its output, as it reported them when it ended (None: it could not, e.g.
    killed; JOB15)."""

    stage: str
    replica: int
    attempt: int
    pid: Optional[int]
    ok: bool
    cause: str
    detail: str = ""
    items_in: Optional[int] = None
    items_out: Optional[int] = None


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as :meth:`JobManager.workers` sees it; ``pid`` is None for a thread and a Ray
    task (a host worker's is its pid on that host, once it said so); ``ref`` is a Ray worker's
    ``ObjectRef`` (``ray.cancel(ref, force=True)`` kills it), else None."""

    stage: str
    replica: int
    attempt: int
    where: Where
    pid: Optional[int]
    running: bool
    ref: Any = None


@dataclass(frozen=True)
class StageCounts:
    """Items through one stage, summed over its workers' reports (JOB15). ``unreported``: worker
    ends that carried no counts (killed workers): their items are not in the sums."""

    stage: str
    where: Where
    workers: int
    items_in: int
    items_out: int
    unreported: int


@dataclass
class JobResult:
    """``results[stage]``: the sink's return value per replica (a list); ``exits``: every worker's end;
    ``stages[stage]``: items in and out per stage (JOB15)."""

    results: dict[str, list[Any]]
    exits: list[WorkerExit]
    queue_types: dict[str, str]
    restarts: int
    stages: dict[str, StageCounts] = field(default_factory=dict)


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
    # No qualname: a callable instance or a partial; a method bound to an instance: its worker would
    # import the plain function and call it without the instance. Refused before anything is made.
    bound = getattr(fn, "__self__", None)
    if not module or not qualname or "<" in qualname or not (bound is None or isinstance(bound, type)):
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


class _Counts:
    """Items one worker took (markers excluded) and put; written by that worker only."""

    __slots__ = ("items_in", "items_out")

    def __init__(self) -> None:
        self.items_in = 0
        self.items_out = 0


def _items(q: Any, stop: Optional[threading.Event], counts: _Counts) -> Iterator[Any]:
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
        counts.items_in += 1
        yield item


def _put(q: Any, item: Any, stop: Optional[threading.Event], counts: _Counts) -> None:
    if stop is None:
        q.put(item)
    else:
        while True:
            try:
                q.put(item, timeout=_STOP_POLL_S)
                break
            except stdqueue.Full:
                if stop.is_set():
                    raise QueueClosed("the job is stopping") from None
    counts.items_out += 1


def _run_stage(
    fn: Callable[..., Any],
    source: Any,
    sink: Any,
    stop: Optional[threading.Event],
    counts: _Counts,
    kwargs: Mapping[str, Any],
) -> Any:
    """Run one worker's function between its handles, with the stage's ``args`` as keyword
    arguments (JOB17); the sink's result, else None."""
    if source is None:
        for item in fn(**kwargs):
            _put(sink, item, stop, counts)
        return None
    items = _items(source, stop, counts)
    if sink is None:
        return fn(items, **kwargs)
    for item in fn(items, **kwargs):
        _put(sink, item, stop, counts)
    return None


_RAY_TYPES = frozenset({"ray_actor", "ray_queue"})


def _hold_sigterm(payload: Mapping[str, Any]) -> bool:
    """In a worker process about to join Ray through its queues: block SIGTERM until they are
    resolved (:func:`_default_sigterm`); True when it did. Call before the process starts a thread
    (threads inherit the mask: Ray's, started by ``ray.init``, then never take a SIGTERM)."""
    try:
        descriptors = [QueueDescriptor.from_json(payload[k]) for k in ("input", "output") if payload[k]]
        types = {canonical_type(d.queue_type) for d in descriptors}
    except Exception:  # a bad descriptor or type: resolving it reports the error to the manager
        return False
    if not types & _RAY_TYPES:
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    return True


def _default_sigterm(held: bool) -> None:
    """Once a worker process's queues are resolved: SIGTERM ends it at once and silently (JOB19).

    ``ray.init`` (a Ray queue's resolve joins the cluster) replaces SIGTERM's action with Ray's
    failure handler, which prints a stack dump to stderr ("*** SIGTERM received ...") before
    exiting: the teardown's SIGTERM would print one per such worker. Setting SIG_DFL puts the
    kernel's action back (the process ends, killed by SIGTERM, like any other worker); a SIGTERM
    that came while it was held (``held``: during ``ray.init``) takes effect on the unblock.
    The stage function, called after this, may still set a handler of its own.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if held:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _work(payload: Mapping[str, Any], held: Optional[bool] = None) -> dict[str, Any]:
    """One out-of-process worker's life (process, host or Ray): resolve its queues from the
    payload's JSON, run the stage, close (never destroy) its handles; the result message.
    ``held``: None in a Ray task (Ray owns that process's signals), else whether the worker
    process holds SIGTERM (:func:`_hold_sigterm`) until its queues are resolved."""
    handles: list[Any] = []
    counts = _Counts()

    def open_(text: Optional[str]) -> Any:
        if text is None:
            return None
        handles.append(resolve_descriptor(QueueDescriptor.from_json(text)))
        return handles[-1]

    try:
        try:
            try:
                source, sink = open_(payload["input"]), open_(payload["output"])
            finally:
                if held is not None:
                    _default_sigterm(held)
            result = _run_stage(_load_fn(payload["fn"]), source, sink, None, counts, payload.get("args") or {})
            message: dict[str, Any] = {"ok": True, "result": result}
        except BaseException as exc:  # reported to the manager
            message = {"ok": False, "cause": f"raised {type(exc).__name__}: {exc}", "detail": traceback.format_exc()}
    finally:
        for handle in handles:
            handle.close()  # close, never destroy: the queues belong to the manager
    message["items_in"], message["items_out"] = counts.items_in, counts.items_out
    return message


def _encode(message: Mapping[str, Any]) -> str:
    try:
        return json.dumps(message)
    except (TypeError, ValueError) as exc:
        return json.dumps(
            {
                "ok": False,
                "cause": f"result is not JSON-serialisable: {exc}",
                "detail": "",
                "items_in": message.get("items_in"),
                "items_out": message.get("items_out"),
            }
        )


def _watch_parent(parent: int, manager: tuple[int, Optional[int]]) -> None:
    """Exit this worker process soon after the manager's process is gone, however it died (JOB1).

    ``manager``: its pid and start time (``sage_queue.monitor._start_time``). Under ``spawn`` the
    manager is the parent; under ``forkserver`` the parent is the fork server, which outlives a
    manager killed by SIGKILL as long as any worker lives (each worker holds the fd whose end it
    waits for): so the manager itself is watched too, told from a later process of its pid by its
    start time. Polled rather than PR_SET_PDEATHSIG: that fires when the *thread* that started us
    exits, and a manager may start workers from a thread that ends before the job does.
    """
    from .monitor import _alive

    pid, start = manager

    def watch() -> None:
        while os.getppid() == parent and _alive(pid, start):
            time.sleep(_PARENT_POLL_S)
        os._exit(_ORPHAN_EXIT)

    threading.Thread(target=watch, name="sage-job-parent-watch", daemon=True).start()


def _worker_process_main(
    payload_json: str, conn: multiprocessing.connection.Connection, manager: tuple[int, Optional[int]]
) -> None:
    """Entry point of a worker process: it receives JSON only (descriptors and a function path), and
    its manager's pid and start time (:func:`_watch_parent`)."""
    payload = json.loads(payload_json)
    held = _hold_sigterm(payload)  # before the watch thread starts: it inherits the mask
    _watch_parent(os.getppid(), manager)
    try:
        message = _work(payload, held)
        conn.send_bytes(_encode(message).encode())
    finally:
        conn.close()
    if not message["ok"]:
        os._exit(1)


def _ray_task_main(payload_json: str) -> str:
    """Body of a Ray worker (JOB13): JSON in (descriptors, function reference), JSON out."""
    return _encode(_work(json.loads(payload_json)))


def _host_worker_main() -> int:
    """``python -m sage_queue.job worker``: a worker on another host (the protocol of JOB14).

    stdin: one line, the payload JSON; then stdin stays open, and its end (the manager, or the
    ssh carrying it, is gone) makes the worker exit with status 70 at once. stdout: JSON lines,
    ``{"event": "started", "pid": P}`` first, the result message last; the stage's own prints go
    to stderr (file descriptor 1 is pointed there), so they cannot corrupt the protocol.
    """
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    line = sys.stdin.buffer.readline()
    if not line:
        return _ORPHAN_EXIT
    payload = json.loads(line)
    # The rpc key travels here, never in a descriptor (RPC4): the descriptors name the variable.
    os.environ.update({str(k): str(v) for k, v in payload.get("env", {}).items()})
    proto.write(json.dumps({"event": "started", "pid": os.getpid()}) + "\n")
    proto.flush()

    def watch_stdin() -> None:
        while os.read(0, 4096):
            pass
        os._exit(_ORPHAN_EXIT)

    held = _hold_sigterm(payload)  # before the watch thread starts: it inherits the mask
    threading.Thread(target=watch_stdin, name="sage-job-stdin-watch", daemon=True).start()
    message = _work(payload, held)
    proto.write(_encode(message) + "\n")
    proto.flush()
    return 0 if message["ok"] else 1


# -- the manager -----------------------------------------------------------------------------------


@dataclass
class _Worker:
    stage: Stage
    replica: int
    attempt: int
    process: Any = None  # multiprocessing.Process
    conn: Optional[multiprocessing.connection.Connection] = None
    thread: Optional[threading.Thread] = None
    popen: Optional[subprocess.Popen[bytes]] = None  # a host worker (its launcher)
    readers: list[threading.Thread] = field(default_factory=list)
    remote_pid: Optional[int] = None  # a host worker's pid, as it reported it
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    ray_ref: Any = None  # a Ray worker's ObjectRef
    counts: _Counts = field(default_factory=_Counts)  # a thread worker's counts
    outcome: Optional[dict[str, Any]] = None  # set by a thread worker when it ends
    message: Optional[dict[str, Any]] = None  # a process or host worker's result message, once read
    ended: Optional[WorkerExit] = None
    result: Any = None

    @property
    def pid(self) -> Optional[int]:
        if self.process is not None:
            pid: Optional[int] = self.process.pid
            return pid
        if self.popen is not None:
            return self.remote_pid if self.remote_pid is not None else self.popen.pid
        return None


def _check_timeout(timeout: Optional[float]) -> None:
    """The manager's timeout (JOB11): None, or a number of seconds >= 0 (infinity: none)."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__}")
    if not timeout >= 0:  # NaN too: it compares false with every deadline, the job would never time out
        raise ValueError(f"timeout must be >= 0 seconds (or None), got {timeout!r}")


def _continue(pid: int) -> None:
    """SIGCONT after the teardown's SIGTERM: a stopped worker (SIGSTOP, a debugger's stop) takes its
    SIGTERM now instead of holding it pending until the SIGKILL of the grace (JOB1)."""
    try:
        os.kill(pid, signal.SIGCONT)
    except (ProcessLookupError, PermissionError):  # gone (or reaped) meanwhile
        pass


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


class _TornDown(Exception):
    """start() found the job torn down by another thread: it makes nothing more."""


class _SignalsHeld:
    """Holds SIGTERM and SIGINT while the manager tears down in the main thread (JOB18), and while
    start() makes a queue or starts a worker, until it is recorded (JOB1).

    A Python signal handler runs in the main thread between bytecodes; the KeyboardInterrupt
    of a second Ctrl-C or SIGTERM raised in the middle of the teardown would leave workers
    running and queues not destroyed. Here each such signal is only recorded; on exit the
    handlers found on entry are put back (a handler set meanwhile, ray.init's, stays) and the
    first recorded signal is raised again, so
    it reaches them once the teardown is complete (a KeyboardInterrupt then, say). A handler
    that was not set from Python (``signal.getsignal`` is None) cannot be put back: SIG_DFL.
    Outside the main thread nothing is held (no handler could be set; none runs there).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.pending: list[int] = []

    def _record(self, signum: int, frame: Optional[FrameType]) -> None:
        self.pending.append(signum)

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            # A handler set meanwhile (ray.init's SIGTERM handler, joining Ray in start()) is left in
            # place: run() finds it there and puts it back at its end (JOB19).
            if signal.getsignal(signum) == self._record:
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self.previous.clear()

    def __enter__(self) -> _SignalsHeld:
        if threading.current_thread() is threading.main_thread():
            try:
                for signum in self.SIGNALS:
                    self.previous[signum] = signal.signal(signum, self._record)
            except BaseException:  # interrupted between the two: nothing left half-set
                self._restore()
                raise
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], *rest: object) -> None:
        self._restore()
        if self.pending and exc_type is None:
            signal.raise_signal(self.pending[0])  # its handler runs as this returns


_RPC_KEY_ENV = "SAGE_QUEUE_JOB_RPC_KEY"
"""The variable a host worker's rpc descriptors name (key_env) for the key of the manager's server."""

JOB_DIR_PREFIX = "sageq-job-"
"""A manager's key directory is ``$TMPDIR/sageq-job-*`` (mode 0700, JOB14)."""
JOB_DIR_OWNER = "owner.json"
"""The file in a key directory that names the manager's process (JOB20): ``{"version": 1, "pid": P,
"pid_start": T, "pid_ns": NS}``, T the process's start time in clock ticks since boot, NS its pid
namespace (``pid:[inode]``), in which P means something (each None where unknown)."""


def _record_owner(directory: str) -> None:
    """Write ``directory``'s owner record (JOB20): this process, told from a later one of the same pid
    by its start time (the job registry's rule, ``sage_queue.monitor``). Written aside and renamed:
    a reader sees the whole record or none."""
    # Imported here: monitoring must not weigh on importing the job module (nor on a job without rpc).
    from .monitor import _pid_namespace, _start_time

    pid = os.getpid()
    record = json.dumps({"version": 1, "pid": pid, "pid_start": _start_time(pid), "pid_ns": _pid_namespace()})
    tmp = os.path.join(directory, "." + JOB_DIR_OWNER + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(record)
    os.replace(tmp, os.path.join(directory, JOB_DIR_OWNER))


class JobManager:
    """Creates a job's queues, runs its workers, delivers end-of-stream, recovers or fails, tears down.

    Use :meth:`run` (which tears down on every exit path, JOB1) or the context manager with
    :meth:`start` / :meth:`wait`. The manager's thread supervises; workers never block it.
    ``hosts`` says how to start ``host:NAME`` stages (JOB14); ``local_host`` is the name of this
    host in ``host:NAME`` (such a stage needs no entry in ``hosts``: it runs with ``HostSpec()``).
    """

    def __init__(
        self, job: Job, *, hosts: Optional[Mapping[str, HostSpec]] = None, local_host: str = "localhost"
    ) -> None:
        self.job = job
        self.hosts: dict[str, HostSpec] = dict(hosts or {})
        self.local_host = local_host
        self.descriptors: dict[str, QueueDescriptor] = {}
        self.choices: dict[str, QueueChoice] = {}
        self.rpc_address: Optional[tuple[str, int]] = None
        """The address of the rpc server this manager started for the job (JOB14), else None."""
        self._handles: dict[str, Any] = {}
        self._workers: list[_Worker] = []
        self._exits: list[WorkerExit] = []
        self._restarts = 0
        self._eos_sent: dict[str, int] = {}  # queue -> markers put so far
        self._stop = threading.Event()
        self._torn_down = False  # set first thing by teardown(); the supervisor stops at it
        self._teardown_lock = threading.RLock()
        self._started = False  # start() ran (a manager runs once)
        self._thread_fns: dict[str, Callable[..., Any]] = {}  # thread stage -> its function, loaded by start()
        self._ctx: Any = multiprocessing.get_context(job.start_method)
        self._rpc_server: Any = None  # a ServerProcess
        self._rpc_dir: Optional[str] = None  # holds its key file
        self._rpc_key_hex: Optional[str] = None
        self._managed_rpc: set[str] = set()  # queues on the manager's server
        self._ray_remote: Any = None
        self._published: Optional[Any] = None

    # -- setup ----------------------------------------------------------------------------------

    def _producers(self, q: str) -> list[Stage]:
        return [s for s in self.job.stages if s.output == q]

    def _consumers(self, q: str) -> list[Stage]:
        return [s for s in self.job.stages if s.input == q]

    def _host_spec(self, stage: Stage) -> HostSpec:
        name = _host(stage.where)
        assert name is not None
        if name in self.hosts:
            return self.hosts[name]
        if name == self.local_host:
            return HostSpec()
        raise ValueError(
            f"stage {stage.name!r} runs on host {name!r}, which JobManager(hosts=...) does not describe "
            f"(known: {sorted(self.hosts) or 'none'})"
        )

    def _choose(self, name: str, spec: Union[str, QueueSpec]) -> QueueChoice:
        spec = QueueSpec(spec) if isinstance(spec, str) else spec
        if spec.queue_type in (AUTO, None):

            def pick(producer: Where, consumer: Where) -> QueueChoice:
                return choose_queue_type(producer, consumer, local_host=self.local_host, explain=True)

            return _choose_for_many(
                [s.where for s in self._producers(name)], [s.where for s in self._consumers(name)], pick
            )
        choice = QueueChoice(spec.queue_type, "declared by the job")
        ends = [s for s in (*self._producers(name), *self._consumers(name)) if s.where != "thread"]
        if ends and CROSS_PROCESS not in getattr(backend_class(choice.queue_type), "capabilities", ()):
            raise ValueError(
                f"queue {name!r} is declared {choice.queue_type!r}, which cannot cross processes, but stage "
                f"{ends[0].name!r} runs in a {ends[0].where}; declare it 'auto' or a cross-process type"
            )
        return choice

    def _rpc_metadata(self) -> dict[str, Any]:
        """host, port, key_file of the job's own rpc server, started on first need (JOB14).

        It binds the address the job's remote hosts reach this host at (127.0.0.1 when no
        stage runs on another host); it runs in a child process that exits with this one.
        """
        # Imported here: the rpc server needs pyzmq, which a job without rpc queues must not need.
        from .backends.rpc.server import RPCQueueServer
        from .backends.rpc.wire import generate_key_file

        if self._rpc_server is None:
            addresses = {self._host_spec(s).address for s in self.job.stages if _host(s.where) is not None}
            if len(addresses) > 1:
                raise ValueError(
                    f"the job's hosts reach this host at different addresses {sorted(addresses)}; the manager's "
                    "rpc server binds one: give the rpc queues as descriptors of a server you run"
                )
            address = addresses.pop() if addresses else "127.0.0.1"
            self._rpc_dir = tempfile.mkdtemp(prefix=JOB_DIR_PREFIX)  # mode 0700
            # Its owner first, before the key: a manager killed by SIGKILL cannot remove the
            # directory, and `sage-queue gc` removes it only once this record says its owner is dead.
            _record_owner(self._rpc_dir)
            key_file = os.path.join(self._rpc_dir, "rpc.key")
            self._rpc_key_hex = generate_key_file(key_file)[1].hex()
            self._rpc_server = RPCQueueServer.spawn(host=address, key_file=key_file)
            self.rpc_address = self._rpc_server.address
            log.info("rpc server for the job on tcp://%s:%d", *self._rpc_server.address)
        assert self.rpc_address is not None and self._rpc_dir is not None
        host, port = self.rpc_address
        return {"host": host, "port": port, "key_file": os.path.join(self._rpc_dir, "rpc.key")}

    def _descriptor(self, name: str, spec: Union[str, QueueSpec, QueueDescriptor]) -> QueueDescriptor:
        if isinstance(spec, QueueDescriptor):
            self.choices[name] = QueueChoice(spec.queue_type, "given as a descriptor")
            return spec
        choice = self.choices[name] = self._choose(name, spec)
        spec = QueueSpec(spec) if isinstance(spec, str) else spec
        metadata = dict(spec.metadata)
        queue_type = canonical_type(choice.queue_type)
        if queue_type == "rpc" and "port" not in metadata:
            metadata.update(self._rpc_metadata())
            self._managed_rpc.add(name)
        elif queue_type in ("ray_actor", "ray_queue") and "address" not in metadata:
            # The cluster the manager uses, named in the descriptor: a worker process joins it
            # through the descriptor (RAY1) instead of starting an instance of its own.
            metadata["address"] = self._ray_address()
        return QueueDescriptor.create(choice.queue_type, None, spec.maxsize, **metadata)

    def _publish(self) -> None:
        """Announce the running job to monitors (``sage-queue top``, ``sage-queue metrics``: JOB16)."""
        # Imported here: monitoring must not weigh on importing the job module.
        from .monitor import publish_job

        name = self.job.name or f"job-{os.getpid()}-{id(self):x}"
        consumers = {q: sum(s.replicas for s in self._consumers(q)) for q in self.descriptors}
        try:
            self._published = publish_job(name, dict(self.descriptors), pid=os.getpid(), consumers=consumers)
        except Exception:  # an untrusted registry directory, say: monitoring must never stop a job
            log.exception("publishing job %s for monitoring", name)

    def _unpublish(self) -> None:
        if self._published is None:
            return
        from .monitor import unpublish_job

        try:
            unpublish_job(self._published)
        except Exception:
            log.exception("unpublishing job %s", self._published)
        self._published = None

    @staticmethod
    def _identity() -> tuple[int, Optional[int]]:
        """This process's pid and start time: what a worker process watches (:func:`_watch_parent`)."""
        from .monitor import _start_time

        return os.getpid(), _start_time(os.getpid())

    def _first_start(self) -> None:
        """RuntimeError unless this is the manager's first start: a manager runs its job once (JOB1)."""
        if self._started:
            raise RuntimeError(
                "this JobManager has already run its job (a manager runs once: its queues are destroyed at "
                "teardown); make a new JobManager to run the job again"
            )
        self._started = True

    def start(self) -> JobManager:
        """Create every queue, then start every worker. RuntimeError, with nothing created or stopped,
        when the manager was started before (JOB1)."""
        self._first_start()
        try:
            for stage in self.job.stages:  # unknown hosts are refused before anything is created
                if _host(stage.where) is not None:
                    self._host_spec(stage)
            for name, spec in self.job.queues.items():  # every declared type checked (JOB8) before
                if not isinstance(spec, QueueDescriptor):  # any queue or rpc server exists
                    self._choose(name, spec)
            for stage in self.job.stages:  # a thread stage's function is imported here: its error
                if stage.where == "thread":  # comes before any queue exists (JOB2)
                    self._thread_fns[stage.name] = _load_fn(stage.fn) if isinstance(stage.fn, str) else stage.fn
                else:
                    _fn_ref(stage.fn)  # a lambda or a nested function, refused before anything exists
            for name, spec in self.job.queues.items():
                # Signals held (JOB18's holder) from making the queue to recording it, so that an
                # interrupt here cannot leave a queue that teardown does not know; the same around
                # each worker's start (_start_worker) and the registry entry.
                with self._recording():
                    desc = self._descriptor(name, spec)
                    self._handles[name] = resolve_descriptor(desc)  # creates it; the manager owns it
                    self.descriptors[name] = desc
                self._eos_sent[name] = 0
                log.info("queue %s: %s (%s)", name, desc.queue_type, self.choices[name].reason)
            with self._recording():
                self._publish()
            for stage in self.job.stages:
                for replica in range(stage.replicas):
                    self._start_worker(stage, replica, 0)
        except _TornDown:
            pass  # by another thread, which stopped what was made; the supervision says so (JobFailed)
        except BaseException:
            self.teardown()
            raise
        return self

    @contextlib.contextmanager
    def _recording(self) -> Iterator[None]:
        """Around making a queue, publishing or starting a worker, until it is recorded: signals held
        (an interrupt cannot leave something teardown does not know) and the teardown lock taken, so a
        teardown() from another thread comes wholly before (then _TornDown: nothing more is made) or
        after (then it stops and destroys this too) (JOB1)."""
        with _SignalsHeld(), self._teardown_lock:
            if self._torn_down:
                raise _TornDown
            yield

    def _worker_json(self, queue: Optional[str], remote: bool) -> Optional[str]:
        """The descriptor a worker gets for ``queue``; a host worker's rpc descriptors on the manager's
        server name the key by ``key_env`` (the key travels in the payload, RPC4), not the manager's file."""
        if queue is None:
            return None
        desc = self.descriptors[queue]
        meta = dict(desc.metadata)
        if remote and queue in self._managed_rpc:
            del meta["key_file"]
            meta["key_env"] = _RPC_KEY_ENV
        schema = type_schema(desc.queue_type)
        if schema is not None and any(f.name == "create" for f in schema.fields):
            # The manager made the queue before any worker starts: a worker only attaches (JOB2). A
            # thread worker still resolving when teardown destroyed the queue would otherwise make it
            # anew, and leave it behind.
            meta["create"] = False
        if meta != desc.metadata:
            desc = QueueDescriptor(desc.queue_id, desc.queue_type, meta, desc.created_timestamp)
        return desc.to_json()

    def _start_worker(self, stage: Stage, replica: int, attempt: int) -> _Worker:
        # Held from the start of the worker to its record in self._workers: an interrupt in between
        # would leave a worker that teardown does not know, running on after the job (JOB1).
        with self._recording():
            return self._start_worker_held(stage, replica, attempt)

    def _start_worker_held(self, stage: Stage, replica: int, attempt: int) -> _Worker:
        w = _Worker(stage, replica, attempt)
        remote = _host(stage.where) is not None
        in_json, out_json = self._worker_json(stage.input, remote), self._worker_json(stage.output, remote)
        if stage.where == "thread":
            fn = self._thread_fns[stage.name]
            # The JSON copy, as every other kind of worker gets it (JOB17): same values everywhere.
            kwargs = json.loads(_args_json(stage.name, stage.args))
            w.thread = threading.Thread(
                target=self._thread_main,
                args=(w, fn, in_json, out_json, kwargs),
                name=f"sage-job-{stage.name}-{replica}",
                daemon=True,
            )
            w.thread.start()
        else:
            # Only what this worker needs, as JSON (JOB2); the function by reference.
            payload: dict[str, Any] = {
                "fn": _fn_ref(stage.fn),
                "input": in_json,
                "output": out_json,
                "args": json.loads(_args_json(stage.name, stage.args)),
            }
            if stage.where == "process":
                parent_conn, child_conn = self._ctx.Pipe(duplex=False)
                proc = self._ctx.Process(
                    target=_worker_process_main,
                    args=(json.dumps(payload), child_conn, self._identity()),
                    name=f"sage-job-{stage.name}-{replica}",
                    daemon=True,
                )
                proc.start()
                child_conn.close()
                w.process, w.conn = proc, parent_conn
            elif stage.where == "ray":
                w.ray_ref = (
                    self._ray_task().options(name=f"sage-job-{stage.name}-{replica}").remote(json.dumps(payload))
                )
            else:
                self._start_host_worker(w, payload)
        self._workers.append(w)
        log.info("started %s[%d] attempt %d (%s)", stage.name, replica, attempt, stage.where)
        return w

    @staticmethod
    def _ray_address() -> str:
        """The address of the Ray cluster this process uses, connecting first if needed (RAY1)."""
        # Imported here: only a job with a Ray stage or queue needs Ray (importing this module never does).
        from .backends._ray import connect, ray

        connect("ray_actor", {})  # RAY1: the cluster this process uses, else $RAY_ADDRESS, else a local one
        return str(ray.get_runtime_context().gcs_address)

    def _ray_task(self) -> Any:
        """The Ray remote function of this manager's Ray workers (JOB13), connecting Ray if needed."""
        if self._ray_remote is None:
            from .backends._ray import ray

            self._ray_address()
            # max_retries=0: Ray must not re-run a dead worker behind the manager's back (that would
            # re-read items, and escape max_restarts); num_cpus=0: a stage waiting for a free CPU
            # while its neighbours wait for it would deadlock the pipeline.
            self._ray_remote = ray.remote(num_cpus=0, max_retries=0)(_ray_task_main)
        return self._ray_remote

    def _start_host_worker(self, w: _Worker, payload: dict[str, Any]) -> None:
        spec = self._host_spec(w.stage)
        if self._rpc_key_hex is not None and {w.stage.input, w.stage.output} & self._managed_rpc:
            payload["env"] = {_RPC_KEY_ENV: self._rpc_key_hex}
        argv = [*spec.launcher, spec.python, "-m", "sage_queue.job", "worker"]
        w.popen = popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **spec.env},
        )
        assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
        out, err = popen.stdout, popen.stderr

        def read_stdout() -> None:
            for raw in out:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    w.stderr_tail.append(raw.decode("utf-8", "replace").rstrip())
                    continue
                if isinstance(msg, dict) and msg.get("event") == "started":
                    w.remote_pid = int(msg["pid"])
                elif isinstance(msg, dict):
                    w.message = msg

        def read_stderr() -> None:
            for raw in err:
                w.stderr_tail.append(raw.decode("utf-8", "replace").rstrip())

        for target in (read_stdout, read_stderr):
            t = threading.Thread(target=target, name=f"sage-job-{w.stage.name}-{w.replica}-io", daemon=True)
            t.start()
            w.readers.append(t)
        try:
            # The payload, then stdin stays open: its end tells the worker that the manager is gone.
            popen.stdin.write((json.dumps(payload) + "\n").encode())
            popen.stdin.flush()
        except OSError:  # it died at once (bad launcher): the supervisor reports its exit
            pass

    def _thread_main(
        self,
        w: _Worker,
        fn: Callable[..., Any],
        in_json: Optional[str],
        out_json: Optional[str],
        kwargs: Mapping[str, Any],
    ) -> None:
        handles: list[Any] = []
        try:
            # Resolved inside the try: a queue that cannot be opened (no free slot, gone at teardown)
            # is this worker's failure, reported; escaping, it would leave the worker never seen ended.
            for j in (in_json, out_json):
                handles.append(None if j is None else resolve_descriptor(j))
            result = _run_stage(fn, handles[0], handles[1], self._stop, w.counts, kwargs)
            w.outcome = {"ok": True, "result": result}
        except BaseException as exc:  # reported by the supervisor
            w.outcome = {"ok": False, "cause": f"raised {type(exc).__name__}: {exc}", "detail": traceback.format_exc()}
        finally:
            for h in handles:
                if h is not None:
                    h.close()
            if w.outcome is not None:
                w.outcome["items_in"], w.outcome["items_out"] = w.counts.items_in, w.counts.items_out

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

    def _poll_process(self, w: _Worker) -> Optional[dict[str, Any]]:
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
        message = w.message
        if message is None or (proc.exitcode != 0 and message.get("ok")):
            message = {
                "ok": False,
                "cause": _signal_cause(proc.exitcode),
                "detail": "" if message is None else message.get("detail", ""),
            }
        assert w.conn is not None
        w.conn.close()
        return message

    def _poll_host(self, w: _Worker) -> Optional[dict[str, Any]]:
        assert w.popen is not None
        code = w.popen.poll()
        if code is None:
            return None
        for t in w.readers:  # the pipes reach their end once the process is gone
            t.join(_GRACE_S)
        message = w.message
        if message is None or (code != 0 and message.get("ok")):
            cause = _signal_cause(code)
            if code == _ORPHAN_EXIT:
                cause += " (it lost its manager: stdin closed)"
            message = {"ok": False, "cause": cause, "detail": "\n".join(w.stderr_tail)}
        elif not message.get("ok") and not message.get("detail"):
            message["detail"] = "\n".join(w.stderr_tail)
        return message

    def _poll_ray(self, w: _Worker) -> Optional[dict[str, Any]]:
        from .backends._ray import ray  # imported already: the task was started through it

        ready, _ = ray.wait([w.ray_ref], timeout=0)
        if not ready:
            return None
        try:
            message: dict[str, Any] = json.loads(ray.get(w.ray_ref))
            return message
        except ray.exceptions.TaskCancelledError:
            cause = "Ray task cancelled"
        except ray.exceptions.WorkerCrashedError as exc:
            cause = f"Ray worker died: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        except ray.exceptions.RayError as exc:
            first = str(exc).strip().splitlines()
            cause = f"Ray task failed: {type(exc).__name__}: {first[0] if first else ''}"
        return {"ok": False, "cause": cause, "detail": traceback.format_exc()}

    def _poll(self, w: _Worker) -> Optional[WorkerExit]:
        """The worker's end if it has ended (its result stored), else None."""
        message: Optional[dict[str, Any]]
        if w.thread is not None:
            message = None if w.thread.is_alive() else w.outcome
        elif w.process is not None:
            message = self._poll_process(w)
        elif w.popen is not None:
            message = self._poll_host(w)
        elif w.ray_ref is not None:
            message = self._poll_ray(w)
        else:  # a worker process whose object teardown closed: nothing left to look at
            message = None
        if message is None:
            return None
        ok = bool(message["ok"])
        w.result = message.get("result")
        return WorkerExit(
            w.stage.name,
            w.replica,
            w.attempt,
            w.pid,
            ok,
            "ok" if ok else message["cause"],
            message.get("detail", ""),
            message.get("items_in"),
            message.get("items_out"),
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
        """Supervise until every worker ended well; JobFailed otherwise (after tearing down).
        RuntimeError when the job was not started, or was torn down (JOB11)."""
        _check_timeout(timeout)
        if not self._started:
            raise RuntimeError("start() the job before waiting for it")
        if self._torn_down:
            raise RuntimeError("the job was torn down: there is nothing left to wait for")
        return self._supervise_until_done(timeout)

    def _supervise_until_done(self, timeout: Optional[float]) -> JobResult:
        """wait()'s loop; also run()'s, for which a teardown() from another thread, however early (even
        between its start() and this loop), ends the job with JobFailed, never wait()'s RuntimeError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._deliver_eos()
        except Exception:
            if not self._torn_down:  # see the loop below
                raise
        while True:
            try:
                self._supervise()
            except JobFailed:
                raise
            except Exception:
                # teardown() from another thread closes what this loop polls (a process object, a
                # pipe, a queue) under it: that is the job torn down, said below, not this error.
                if not self._torn_down:
                    raise
            if all(self._finished(s) for s in self.job.stages):
                break
            if self._torn_down:  # by another thread: it completes the teardown; run()'s waits for it
                raise JobFailed("job torn down (teardown() called from another thread) before it finished", self._exits)
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
            results,
            list(self._exits),
            {n: d.queue_type for n, d in self.descriptors.items()},
            self._restarts,
            self.stage_counts(),
        )

    def _supervise(self) -> None:
        """One tick: each worker's end taken in (a bad one recovered, JOB10), markers delivered (JOB4).
        Nothing is recovered or delivered once the job is torn down (by another thread)."""
        for w in list(self._workers):
            if self._torn_down:
                return
            if w.ended is not None:
                continue
            ended = self._poll(w)
            if ended is None:
                continue
            w.ended = ended
            self._exits.append(ended)
            if ended.ok or self._torn_down:  # a worker ended by the teardown is not recovered
                continue
            log.warning("worker %s[%d] ended: %s", ended.stage, ended.replica, ended.cause)
            self._recover(w, ended)
        if not self._torn_down:
            self._deliver_eos()

    def stage_counts(self) -> dict[str, StageCounts]:
        """Items in and out per stage over the workers that have ended so far (JOB15)."""
        out: dict[str, StageCounts] = {}
        for stage in self.job.stages:
            ends = [e for e in self._exits if e.stage == stage.name]
            known = [e for e in ends if e.items_in is not None and e.items_out is not None]
            out[stage.name] = StageCounts(
                stage.name,
                stage.where,
                len(ends),
                sum(e.items_in or 0 for e in known),
                sum(e.items_out or 0 for e in known),
                len(ends) - len(known),
            )
        return out

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
        where = f"pid {ended.pid}" if ended.pid is not None else w.stage.where
        message = f"worker {ended.stage}[{ended.replica}] ({where}) {ended.cause}; job stopped: {why}" + (
            f"\n{ended.detail}" if ended.detail else ""
        )
        self.teardown()
        raise JobFailed(message, self._exits)

    def run(self, timeout: Optional[float] = None) -> JobResult:
        """Start, wait and tear down (also on KeyboardInterrupt, and SIGTERM in the main thread: JOB1).
        RuntimeError, touching nothing, on a manager that was started before."""
        _check_timeout(timeout)  # before anything is made
        if self._started:  # before the try: its teardown would stop the job of an earlier start()
            self._first_start()
        previous: Any = None
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:

            def on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
                raise KeyboardInterrupt("SIGTERM")

            previous = signal.signal(signal.SIGTERM, on_sigterm)
        interrupted = False
        try:
            self.start()
            if in_main:
                # Joining Ray in start() (ray.init, for a Ray stage or queue) gave SIGTERM Ray's
                # handlers: a stack dump, then SystemExit. Ours goes back (re-set even when Python
                # still reports it: ray.init from a thread replaces it in C only); the handler Ray
                # set from Python is the one put back after the run (JOB19).
                found = signal.getsignal(signal.SIGTERM)
                if found is not on_sigterm and found is not None:
                    previous = found
                signal.signal(signal.SIGTERM, on_sigterm)
            return self._supervise_until_done(timeout)
        except BaseException:
            interrupted = True
            raise
        finally:
            try:
                self.teardown()
            except KeyboardInterrupt:
                # A signal that came during the teardown, delivered once it was complete (JOB18).
                # Already ending on an exception (the first interrupt, say): that one goes on.
                if not interrupted:
                    raise
            finally:
                if in_main:  # None: a handler not set from Python, which cannot be put back
                    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    # -- monitoring and teardown ----------------------------------------------------------------

    def _running(self, w: _Worker) -> bool:
        if w.ended is not None:
            return False
        if w.thread is not None:
            return w.thread.is_alive()
        if w.process is not None:
            return bool(w.process.is_alive())
        if w.popen is not None:
            return w.popen.poll() is None
        return w.ray_ref is not None  # not seen ended by the supervisor

    def workers(self) -> list[WorkerInfo]:
        """Every worker started so far (restarted ones included), in start order."""
        return [
            WorkerInfo(w.stage.name, w.replica, w.attempt, w.stage.where, w.pid, self._running(w), w.ray_ref)
            for w in self._workers
        ]

    def stats(self) -> dict[str, Optional[QueueStats]]:
        """Each queue's ``stats()``, None where its backend does not declare ``stats`` (JOB12)."""
        return {name: queue_stats(h) for name, h in self._handles.items()}

    def teardown(self) -> None:
        """Stop every worker, then destroy every queue, then stop the job's rpc server.
        Idempotent; never raises for a worker; called while another thread's teardown is under way, it
        returns once that one is complete. In the main thread, a SIGTERM or SIGINT that comes
        meanwhile is held until the teardown is complete, then delivered (JOB18)."""
        with _SignalsHeld(), self._teardown_lock:
            # Under the lock: a teardown() that finds another thread's under way waits for it, so
            # that whoever returns from it (run() included) returns with the job torn down (JOB1).
            if self._torn_down:
                return
            self._torn_down = True
            self._teardown()

    def _teardown(self) -> None:
        self._unpublish()  # monitors stop attaching before the queues go
        self._stop.set()
        self._stop_workers()
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
        if self._rpc_server is not None:
            self._rpc_server.stop()
            self._rpc_server = None
        if self._rpc_dir is not None:
            shutil.rmtree(self._rpc_dir, ignore_errors=True)
            self._rpc_dir = None

    def _stop_workers(self) -> None:
        """Processes and host launchers: SIGTERM, then SIGKILL after the grace (a host worker also
        sees its stdin end); Ray tasks: ``ray.cancel(force=True)``, which kills their worker process."""
        refs = [w.ray_ref for w in self._workers if w.ray_ref is not None and w.ended is None]
        if refs:
            from .backends._ray import ray

            for ref in refs:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # finished meanwhile, or Ray is going down: nothing left to stop
                    log.debug("ray.cancel", exc_info=True)
        procs = [w.process for w in self._workers if w.process is not None]
        popens = [w.popen for w in self._workers if w.popen is not None]
        for p in procs:
            if p.is_alive():
                p.terminate()
                _continue(p.pid)
        for pp in popens:
            if pp.stdin is not None:
                try:
                    pp.stdin.close()
                except OSError:  # broken pipe: it is gone already
                    pass
            if pp.poll() is None:
                pp.terminate()
                _continue(pp.pid)
        deadline = time.monotonic() + _GRACE_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        for pp in popens:
            try:
                pp.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pp.kill()
                pp.wait()
        for w in self._workers:
            for t in w.readers:
                t.join(_GRACE_S)
            if w.popen is not None:
                for f in (w.popen.stdout, w.popen.stderr):
                    if f is not None:
                        f.close()
            if w.conn is not None:
                w.conn.close()
        if refs:
            from .backends._ray import ray

            try:  # the cancelled tasks' workers are killed: wait until Ray says so
                ray.wait(refs, num_returns=len(refs), timeout=_GRACE_S)
            except Exception:
                log.debug("ray.wait at teardown", exc_info=True)

    def __enter__(self) -> JobManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


# -- command line: python -m sage_queue.job choose PRODUCER CONSUMER [--explain] | worker ----------


def _add_choose_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("producer", help="thread | process | ray | host:NAME")
    parser.add_argument("consumer", help="thread | process | ray | host:NAME")
    parser.add_argument("--override", default=None, help="a queue type that wins over the choice")
    parser.add_argument("--local-host", default="localhost", help="the name of this host in host:NAME")
    parser.add_argument("--explain", action="store_true", help="print why as well")


def _choose(args: argparse.Namespace, prog: str) -> int:
    try:
        choice = choose_queue_type(
            args.producer, args.consumer, override=args.override, local_host=args.local_host, explain=True
        )
    except ValueError as exc:  # a bad where, an unknown type (UnknownQueueType is a ValueError)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{choice.queue_type}: {choice.reason}" if args.explain else choice.queue_type)
    return 0


def choose_main(argv: Optional[Sequence[str]] = None) -> int:
    """``sage-queue choose PRODUCER CONSUMER [--override T] [--explain]``: the type, and why (JOB8)."""
    parser = argparse.ArgumentParser(prog="sage-queue choose", description=choose_main.__doc__)
    _add_choose_arguments(parser)
    return _choose(parser.parse_args(argv), parser.prog)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m sage_queue.job choose thread process --explain``: the type, and why (JOB8);
    ``python -m sage_queue.job worker``: a host worker (JOB14; payload JSON on stdin)."""
    parser = argparse.ArgumentParser(prog="python -m sage_queue.job", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_choose_arguments(sub.add_parser("choose", help="pick a queue type from where the two ends run"))
    sub.add_parser("worker", help="run one host worker: payload JSON on stdin, result JSON on stdout")
    args = parser.parse_args(argv)
    if args.command == "worker":
        return _host_worker_main()
    return _choose(args, "python -m sage_queue.job choose")


if __name__ == "__main__":
    # Run the module's importable copy, not this __main__ one: EOS unpickles to
    # sage_queue.job.EOS, which must be the class the worker's is_eos checks (JOB3).
    raise SystemExit(importlib.import_module("sage_queue.job").main())
