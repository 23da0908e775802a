"""``sage-queue demo`` (``make demo``): the seed's three scenarios on every backend, then a job across
heterogeneous queues, measured per queue.

Part 1, for every queue type this installation can provide (``QUEUE_STUB_MAPPING.available``):

1. **cross-process** — this process creates two queues and starts an unrelated process
   (``subprocess``) that receives nothing but the descriptors' JSON on its stdin; the child
   resolves them and echoes every item back. A type without the ``cross_process`` capability
   (``local``) must make that child fail with ``QueueNotFound``; a thread of this process then
   shows that the same JSON works where the queue lives.
2. **adaptive** — the seed's "choose the queue type by environment" code path: one function
   picks a descriptor, the code after it is the same whatever the type.
3. **job pipeline** — the library's :class:`~sage_queue.job.JobManager` runs
   numbers -> square -> increment -> collect over three queues of the type, with the two
   transforms in worker processes (Ray workers for the Ray types, threads for ``local``).

Part 2, the main job: ``source -> [raw] -> parse -> [parsed] -> enrich -> [enriched] -> sink``, run by
the library's JobManager with real workers: the source is a process on host "edge" (this machine,
started through ``HostSpec()`` as a second host would be through ssh), parse a Ray worker, enrich
a process, the sink a thread of this process. Every queue is ``"auto"``: the JobManager picks rpc
(an end on another host; on a loopback server it starts), ray_actor (an end is a Ray worker) and
sage (two processes of this host); without Ray or rpc the hop runs on shm/sage, the reason printed.
Items carry their own timestamps (``time.monotonic()`` is one clock for every process of a Linux
host): each stage stamps when it asks for an item, when it gets it and when it hands it on, and
the sink turns the stamps into items, items/s, p50/p99 latency and transfer time per queue and end
to end, with a progress display (a tqdm bar on a terminal, a plain line otherwise).

Services: a local Ray instance (when Ray is installed, needed and not ``--no-ray``) and, for part 1,
an rpc server on loopback (the rpc backend's ``local_service``) live as long as the run. Every
queue is destroyed, every child and worker stopped, the servers stopped and Ray shut down before
``main`` returns, also on Ctrl-C (exit status 130) or SIGTERM (143); the exit status is 1 if anything
failed, each failure listed with its cause.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from types import FrameType
from typing import Any, Optional, TextIO

from .descriptor import QueueDescriptor
from .errors import BackendUnavailable, QueueNotFound
from .job import HostSpec, Job, JobFailed, JobManager, QueueSpec, Stage, StageFn, choose_queue_type
from .protocol import CROSS_PROCESS
from .registry import QUEUE_STUB_MAPPING, unavailable_reason
from .resolve import create_descriptor_from_existing_queue, get_local_queue, resolve_descriptor

__all__ = ["main", "choose_descriptor", "all_types", "JobStats", "run_main_job"]

WAIT_S = 10.0
"""Longest any single get/put/child of the demo may wait: a broken backend fails, never hangs."""
ECHO_ITEMS = 200
PIPELINE_ITEMS = 100
SMALL_MAXSIZE = 16
"""Smaller than the item counts, so that producers really block on full queues."""
JOB_ITEMS = 1000
"""Items of the main job by default (``--items``); ``--quick`` runs QUICK_ITEMS."""
QUICK_ITEMS = 200
JOB_MAXSIZE = 64
PAYLOAD_BYTES = 256
_NO_RAY_NOTE = "Ray not started (--no-ray)"


# -- descriptors -----------------------------------------------------------------------------------


def _set_wait(seconds: float) -> None:
    global WAIT_S
    if not seconds > 0:
        raise SystemExit(f"sage-queue demo: --wait must be > 0, got {seconds}")
    WAIT_S = seconds


def _name(role: str) -> str:
    return f"demo-{os.getpid()}-{uuid.uuid4().hex[:8]}-{role}"


_SERVICE_METADATA: dict[str, dict[str, Any]] = {}
"""queue_type -> the metadata that reaches the throw-away service the demo started for it (rpc: a server)."""


def make_descriptor(queue_type: str, role: str, maxsize: int = SMALL_MAXSIZE) -> QueueDescriptor:
    """A descriptor of a new queue of ``queue_type`` (any registered type) through the generic factory."""
    return QueueDescriptor.create(queue_type, _name(role), maxsize, **_SERVICE_METADATA.get(queue_type, {}))


def _start_service(stack: ExitStack, queue_type: str) -> None:
    """Start the service a backend needs, if it names one (``local_service``, see stub.py), for the whole run."""
    service = getattr(QUEUE_STUB_MAPPING[queue_type], "local_service", None)
    if service is not None and queue_type not in _SERVICE_METADATA:
        _SERVICE_METADATA[queue_type] = dict(stack.enter_context(service()))
        stack.callback(_SERVICE_METADATA.pop, queue_type, None)


def all_types() -> list[str]:
    """Every registered queue type, built-in ones first (the registry's order)."""
    return list(QUEUE_STUB_MAPPING)


def crosses_processes(queue_type: str) -> bool:
    return CROSS_PROCESS in getattr(QUEUE_STUB_MAPPING[queue_type], "capabilities", ())


def _is_ray_type(queue_type: str) -> bool:
    return queue_type in ("ray_queue", "ray_actor")


def choose_descriptor(maxsize: int, allowed: Optional[frozenset[str]] = None) -> QueueDescriptor:
    """Scenario 2, the seed's selection: Ray if it is running, else shared memory, else local.

    ``allowed`` restricts the choice (the demo uses it to walk every type through the same code).
    Ray is looked up in ``sys.modules``, never imported: a program that has not started Ray has
    not imported it.
    """

    def ok(queue_type: str) -> bool:
        return (allowed is None or queue_type in allowed) and QUEUE_STUB_MAPPING.available(queue_type)

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and ok("ray_queue"):
        return make_descriptor("ray_queue", "adaptive", maxsize)
    for queue_type in ("sage", "shm"):  # sage: the high-performance ring; shm: the pure-Python one
        if ok(queue_type):
            return make_descriptor(queue_type, "adaptive", maxsize)
    if ok("local"):
        return make_descriptor("local", "adaptive", maxsize)
    if allowed:
        (only,) = allowed
        return make_descriptor(only, "adaptive", maxsize)
    raise BackendUnavailable("local", "every backend", "reinstall sage-queue")


# -- services: a local Ray for the run -------------------------------------------------------------


@contextmanager
def _local_ray() -> Iterator[str]:
    """A local Ray instance for the whole run; processes started meanwhile join it via RAY_ADDRESS.

    ``address="local"``: always a new instance, never a cluster that ``ray start`` or the
    user's RAY_ADDRESS names (the demo kills its queues' actors with the instance), on 127.0.0.1
    only (``start_local``, spec RAY16). If Ray is
    already initialised in this process (the demo called from a program that uses Ray), that
    instance is used and left running.
    """
    import logging

    from .backends._ray import LOOPBACK_ENV, ray, start_local

    if ray.is_initialized():
        yield str(ray.get_runtime_context().gcs_address)
        return
    previous = {name: os.environ.get(name) for name in ("RAY_ADDRESS", "RAY_LOGGER_LEVEL", LOOPBACK_ENV)}
    # Ray's start-up notices are not the demo's output: logging_level here, and RAY_LOGGER_LEVEL for
    # the processes that join this instance (their ray.init is the backend's, with Ray's default level).
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
    try:
        # Inside the try: an interrupt during start-up still shuts down what was started.
        # start_local: on 127.0.0.1 only (RAY16); it sets LOOPBACK_ENV, put back below like RAY_ADDRESS.
        address = start_local(
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            num_cpus=max(2, os.cpu_count() or 2),
        )
        os.environ["RAY_ADDRESS"] = address
        yield address
    finally:
        try:
            ray.shutdown()  # the instance's processes and every actor in it
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


class _Tracker:
    """Every handle scenarios 1 and 2 resolve, so that each queue is destroyed exactly once at the end."""

    def __init__(self) -> None:
        self.handles: dict[str, Any] = {}

    def resolve(self, desc: QueueDescriptor) -> Any:
        handle = resolve_descriptor(desc)
        self.handles.setdefault(desc.queue_id, handle)
        return handle

    def destroy_all(self) -> None:
        for handle in self.handles.values():
            try:
                if not handle.closed:
                    handle.destroy()
            except Exception as exc:  # cleanup goes on for the other queues; the error is shown
                print(f"sage-queue demo: could not destroy {handle!r}: {exc}", file=sys.stderr)
        self.handles.clear()


# -- scenario 1's children -------------------------------------------------------------------------


class _Children:
    """Child processes that hold nothing but descriptor JSON; all are reaped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, role: str, payload: dict[str, Any]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sage_queue.demo", "--child", role, "--wait", str(WAIT_S)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        assert proc.stdin is not None
        # One line of JSON; stdin stays open so that communicate() can close it later.
        proc.stdin.write(json.dumps(payload) + "\n")
        proc.stdin.flush()
        return proc

    @staticmethod
    def result(proc: subprocess.Popen[str]) -> dict[str, Any]:
        out, err = proc.communicate(timeout=WAIT_S * 2)
        if proc.returncode != 0 or not out.strip():
            last = err.strip().splitlines()[-1] if err.strip() else "no output"
            raise RuntimeError(f"child exited {proc.returncode}: {last}")
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return report

    def reap(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=WAIT_S)
            except (OSError, ValueError, subprocess.TimeoutExpired):  # already drained, or stuck in D state
                pass
        self.procs.clear()


def echo_loop(inbox: Any, outbox: Any, count: int) -> int:
    """Take ``count`` items from ``inbox`` and put each back on ``outbox`` wrapped with who saw it."""
    for _ in range(count):
        item = inbox.get(timeout=WAIT_S)
        outbox.put({"echo": item, "by": os.getpid()}, timeout=WAIT_S)
    return count


def _child_main(role: str) -> int:
    """Entry point of a child: descriptors arrive as JSON on stdin, a JSON report leaves on stdout."""
    payload = json.loads(sys.stdin.readline())
    handles: list[Any] = []

    def connect(json_desc: str) -> Any:  # the seed's process B, line for line
        received_desc = QueueDescriptor.from_json(json_desc)
        handles.append(resolve_descriptor(received_desc))
        return handles[-1]

    try:
        if role != "echo":
            raise ValueError(f"unknown child role {role!r}")
        handled = echo_loop(connect(payload["inbox"]), connect(payload["outbox"]), payload["count"])
    except QueueNotFound as exc:
        print(json.dumps({"error": "QueueNotFound", "message": str(exc)}))
        return 0
    finally:
        for handle in handles:
            handle.close()  # close, not destroy: the queues belong to the parent
    print(json.dumps({"handled": handled, "pid": os.getpid()}))
    return 0


# -- part 1: the seed's scenarios ------------------------------------------------------------------


@dataclass
class Outcome:
    items: int
    detail: str = ""


def scenario_cross_process(queue_type: str, tracker: _Tracker, children: _Children) -> Outcome:
    if queue_type == "local":
        # The seed's own lines: a queue, then its descriptor by create_descriptor_from_existing_queue.
        inbox_handle = get_local_queue(maxsize=SMALL_MAXSIZE)
        tracker.handles[inbox_handle.descriptor.queue_id] = inbox_handle
        inbox = create_descriptor_from_existing_queue(inbox_handle, "local", maxsize=SMALL_MAXSIZE)
    else:
        inbox = make_descriptor(queue_type, "inbox")
        inbox_handle = tracker.resolve(inbox)
    outbox = make_descriptor(queue_type, "outbox")
    outbox_handle = tracker.resolve(outbox)
    payload = {"inbox": inbox.to_json(), "outbox": outbox.to_json(), "count": ECHO_ITEMS}
    if not crosses_processes(queue_type):
        report = children.result(children.start("echo", payload))
        if report.get("error") != "QueueNotFound":
            raise AssertionError(f"a {queue_type} queue resolved in another process: {report}")
        # Same JSON, a thread of this process: that is where a local queue lives.
        echoer = threading.Thread(
            target=echo_loop,
            args=(resolve_descriptor(inbox.to_json()), resolve_descriptor(outbox.to_json()), ECHO_ITEMS),
            daemon=True,
        )
        echoer.start()
        far_pid = os.getpid()
        detail = "child: QueueNotFound (single-process); a thread shares it"
        proc = None
    else:
        proc = children.start("echo", payload)
        far_pid = proc.pid
        detail = f"child pid {proc.pid} resolved the JSON"
    items = [{"n": n, "blob": bytes([n % 256]) * (n % 50)} for n in range(ECHO_ITEMS)]
    feeder_error: list[BaseException] = []

    def feed() -> None:
        try:
            for item in items:
                inbox_handle.put(item, timeout=WAIT_S)
        except BaseException as exc:  # the replies then run short; the error is the cause shown
            feeder_error.append(exc)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        replies = [outbox_handle.get(timeout=WAIT_S) for _ in items]
    except queue.Empty:
        if feeder_error:
            raise feeder_error[0] from None
        raise
    feeder.join(WAIT_S)
    if [r["echo"] for r in replies] != items:
        raise AssertionError("the echoed items differ from the items sent (lost, reordered or altered)")
    if {r["by"] for r in replies} != {far_pid}:
        raise AssertionError(f"replies came from {sorted({r['by'] for r in replies})}, expected {far_pid}")
    if proc is not None:
        report = children.result(proc)
        if report.get("handled") != ECHO_ITEMS:
            raise AssertionError(f"child report: {report}")
    return Outcome(items=2 * ECHO_ITEMS, detail=detail)


def scenario_adaptive(queue_type: str, tracker: _Tracker, children: _Children) -> Outcome:
    desc = choose_descriptor(maxsize=100, allowed=frozenset({queue_type}))
    # From here on the code is the same whatever was chosen.
    q = tracker.resolve(desc)
    data: list[Any] = [None, 0, -1.5, "text ✓", b"\x00raw", {"nested": [1, (2, 3)], "set": {4}}, list(range(1000))]
    for item in data:
        q.put(item)
    result = [q.get(timeout=WAIT_S) for _ in data]
    same = all(a == b and type(a) is type(b) for a, b in zip(result, data, strict=False))
    if not same or len(result) != len(data) or not q.empty():
        raise AssertionError(f"got back {result!r:.200}")
    return Outcome(items=len(data), detail=f"picked {desc.queue_type}")


# Scenario 3's stage functions: module level, so that worker processes import them by name.
def numbers() -> Iterable[int]:
    return range(PIPELINE_ITEMS)


def square(items: Iterator[int]) -> Iterator[int]:
    for x in items:
        yield x * x


def increment(items: Iterator[int]) -> Iterator[int]:
    for x in items:
        yield x + 1


def collect(items: Iterator[int]) -> list[int]:
    return list(items)


def _job_failure(exc: JobFailed) -> str:
    """One line: the first failed worker's cause, else the manager's message."""
    bad = [e for e in exc.exits if not e.ok]
    if bad:
        return f"worker {bad[0].stage}[{bad[0].replica}] {bad[0].cause}"
    return str(exc).splitlines()[0]


def scenario_pipeline(queue_type: str, tracker: _Tracker, children: _Children) -> Outcome:
    """The seed's scenario 3 with the library's JobManager: three queues of ``queue_type``."""
    spec = QueueSpec(queue_type, SMALL_MAXSIZE, _SERVICE_METADATA.get(queue_type, {}))
    where = "thread"
    if crosses_processes(queue_type):
        where = "ray" if _is_ray_type(queue_type) else "process"
    job = Job(
        queues={"input": spec, "processing": spec, "output": spec},
        stages=[
            Stage("numbers", numbers, output="input", where="thread"),
            # By reference: a worker imports the function (``__main__`` is not this module in a worker).
            Stage("square", "sage_queue.demo:square", input="input", output="processing", where=where),
            Stage("increment", "sage_queue.demo:increment", input="processing", output="output", where=where),
            Stage("collect", collect, input="output", where="thread"),
        ],
    )
    try:
        result = JobManager(job).run(timeout=3 * WAIT_S)
    except JobFailed as exc:
        raise RuntimeError(_job_failure(exc)) from None
    out = result.results["collect"][0]
    if out != [n * n + 1 for n in range(PIPELINE_ITEMS)]:
        raise AssertionError(f"pipeline output differs: {out[:10]}...")
    pids = [str(e.pid) for e in result.exits if e.stage in ("square", "increment") and e.pid is not None]
    if where == "process":
        detail = f"JobManager: 2 worker processes (pids {', '.join(pids)})"
    else:
        detail = f"JobManager: 2 worker {'threads' if where == 'thread' else 'tasks on Ray workers'}"
    return Outcome(items=3 * PIPELINE_ITEMS, detail=detail)


@dataclass
class Row:
    backend: str
    scenario: str
    result: str
    items: str = "-"
    seconds: str = "-"
    detail: str = ""
    failed: bool = field(default=False, repr=False)


@contextmanager
def _resources() -> Iterator[tuple[_Tracker, _Children]]:
    tracker, children = _Tracker(), _Children()
    try:
        yield tracker, children
    finally:
        try:
            children.reap()  # first: a child may still hold a queue
        finally:
            tracker.destroy_all()


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, (queue.Empty, queue.Full)):
        return f"no progress within {WAIT_S:g}s (items lost or a peer stuck)"
    return " ".join(str(exc).split())  # one line, whatever the exception says


def _run(backend: str, scenario: str, body: Callable[[_Tracker, _Children], Outcome]) -> Row:
    started = time.perf_counter()
    try:
        with _resources() as (tracker, children):
            outcome = body(tracker, children)
    except BackendUnavailable as exc:  # the module imports but its dependency does not (e.g. an unbuilt C core)
        return Row(backend, scenario, "skipped", detail=f"{exc.missing} ({exc.hint})"[:160])
    except Exception as exc:
        return Row(
            backend,
            scenario,
            "FAILED",
            seconds=f"{time.perf_counter() - started:.2f}s",
            detail=f"{type(exc).__name__}: {_one_line(exc)}"[:200],
            failed=True,
        )
    return Row(backend, scenario, "ok", str(outcome.items), f"{time.perf_counter() - started:.2f}s", outcome.detail)


def run_scenarios(types: list[str], services: ExitStack, ray_note: Optional[str]) -> list[Row]:
    """Part 1: every scenario on every type (``ray_note``: why Ray types are skipped, None if Ray runs)."""
    rows: list[Row] = []
    for queue_type in types:
        reason = unavailable_reason(queue_type)
        if reason is None and ray_note is not None and _is_ray_type(queue_type):
            reason = ray_note
        if reason is not None:
            rows.append(Row(queue_type, "all", "skipped", detail=reason[:160]))
            continue
        try:
            _start_service(services, queue_type)
        except Exception as exc:
            message = f"its service did not start: {type(exc).__name__}: {_one_line(exc)}"
            rows.append(Row(queue_type, "all", "FAILED", detail=message[:200], failed=True))
            continue
        rows.append(_run(queue_type, "1 cross-process", partial(scenario_cross_process, queue_type)))
        rows.append(_run(queue_type, "2 adaptive", partial(scenario_adaptive, queue_type)))
        rows.append(_run(queue_type, "3 job pipeline", partial(scenario_pipeline, queue_type)))
    return rows


def format_table(rows: list[Row]) -> str:
    header = Row("backend", "scenario", "result", "items", "time", "detail")
    cols = ("backend", "scenario", "result", "items", "seconds", "detail")
    widths = {c: max(len(getattr(r, c)) for r in [header, *rows]) for c in cols[:-1]}
    lines = []
    for n, row in enumerate([header, *rows]):
        cells = [getattr(row, c).ljust(widths[c]) for c in cols[:-1]] + [row.detail]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * widths[c] for c in cols[:-1]) + "  ------")
    return "\n".join(lines)


# -- part 2: the main job --------------------------------------------------------------------------
#
# Every item is a dict {"seq", "body", "crc", "t"}; "t" is its list of time.monotonic() stamps
# (one clock for every process of a Linux host), three per queue, appended as the item travels:
#
#     t[3k]      put    the producer hands the item to queue k (just before its put)
#     t[3k + 1]  ready  the consumer asked queue k for its next item (its previous put had returned)
#     t[3k + 2]  got    the consumer's get returned the item
#
# put -> got is the item's latency through queue k, time spent queued behind other items included;
# max(put, ready) -> got is the queue's own part: the transfer once both ends were at the queue.


def _body(seq: int) -> bytes:
    """The payload of item ``seq``: derived from ``seq`` so that the sink can check it without a copy."""
    return hashlib.blake2b(seq.to_bytes(8, "little"), digest_size=32).digest() * (PAYLOAD_BYTES // 32)


def job_source(items: int) -> Iterator[dict[str, Any]]:
    """Stage "source": ``items`` items (the stage's args, JOB17), each stamped just before its put."""
    for seq in range(items):
        body = _body(seq)
        yield {"seq": seq, "body": body, "crc": zlib.crc32(body), "t": [time.monotonic()]}


def _stamped(items: Iterator[dict[str, Any]], work: Callable[[dict[str, Any]], None]) -> Iterator[dict[str, Any]]:
    """A transform's loop with its stamps: ready and got for the input queue, put for the output queue."""
    ready = time.monotonic()
    for item in items:
        got = time.monotonic()
        work(item)
        item["t"] += [ready, got, time.monotonic()]
        yield item  # the manager puts it; the generator resumes once that put returned
        ready = time.monotonic()


def _check_crc(item: dict[str, Any]) -> None:
    if zlib.crc32(item["body"]) != item["crc"]:
        raise ValueError(f"item {item['seq']}: body does not match its checksum (corrupted in transit)")


def _add_digest(item: dict[str, Any]) -> None:
    item["digest"] = hashlib.sha256(item["body"]).hexdigest()[:16]


def job_parse(items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Stage "parse" (a Ray worker): check the checksum the source wrote."""
    return _stamped(items, _check_crc)


def job_enrich(items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Stage "enrich" (a process): add a digest of the body."""
    return _stamped(items, _add_digest)


@dataclass(frozen=True)
class Hop:
    """One queue of the main job: its name, the type it runs on, its two ends, why this type."""

    queue: str
    queue_type: str
    producer: str
    consumer: str
    note: str = ""


def _percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty list."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(p * len(sorted_values)) - 1))]


@dataclass
class QueueFigures:
    """One row of the main job's table (times in seconds; NaN where there were no items)."""

    name: str
    queue_type: str
    between: str
    items: int
    throughput: float  # items / (last get - first get): the rate while the consumer was busy
    p50_s: float  # put -> got
    p99_s: float
    transfer_p50_s: float  # max(put, ready) -> got; NaN for the end-to-end row


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 0


class _Progress:
    """A tqdm bar on a terminal (stderr), else one plain line of percentages on ``out``.

    ``update`` is called by the sink's thread only; ``close`` by the main thread after the
    job ended (the sink thread is gone by then), so neither needs a lock.
    """

    def __init__(self, total: int, label: str, out: TextIO) -> None:
        self.total, self.out, self.done = total, out, 0
        self._bar: Any = None
        self._next_pct = 10
        if sys.stderr.isatty() and _columns(sys.stderr) > 0:  # a terminal of width 0 would show no bar
            try:
                from tqdm import tqdm  # type: ignore[import-untyped]  # optional extra (progress)
            except ImportError:  # tqdm comes with sage-queue[harness]: the plain line instead
                pass
            else:
                self._bar = tqdm(total=total, desc=label, unit="item", leave=False, file=sys.stderr)
        if self._bar is None:
            print(f"  {label}:", end="", file=out, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        while self._next_pct <= 100 and self.done * 100 >= self._next_pct * self.total:
            print(f" {self._next_pct}%", end="", file=self.out, flush=True)
            self._next_pct += 10

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=self.out, flush=True)


class JobStats:
    """The main job's sink: checks every item, keeps its stamps, feeds the progress display.

    ``consume`` runs in the sink's thread; the main thread reads the figures only after the job
    ended (``JobManager.run`` returned: the thread is gone), so nothing here is shared while written.
    Stamps are kept in ``array('d')`` (8 bytes each): a million items cost tens of MB, not hundreds.
    """

    MIN_STEADY = 20
    """Fewest items put after start-up for the percentiles to leave the start-up items out."""

    def __init__(self, total: int, hops: list[Hop], progress: Optional[_Progress] = None) -> None:
        self.total, self.hops, self.progress = total, hops, progress
        self.put = [array("d") for _ in hops]
        self.ready = [array("d") for _ in hops]
        self.got = [array("d") for _ in hops]
        self.seen = bytearray(total)

    def consume(self, items: Iterator[dict[str, Any]]) -> int:
        """The sink stage's function: check each item, record its stamps; the count received."""
        ready = time.monotonic()
        for item in items:
            got = time.monotonic()
            seq = item["seq"]
            if not 0 <= seq < self.total or self.seen[seq]:
                raise ValueError(f"item {seq}: {'duplicated' if 0 <= seq < self.total else 'never sent'}")
            body = _body(seq)
            if item["body"] != body or item.get("digest") != hashlib.sha256(body).hexdigest()[:16]:
                raise ValueError(f"item {seq}: body or digest altered on the way")
            self.seen[seq] = 1
            t = [*item["t"], ready, got]
            if len(t) != 3 * len(self.hops):
                raise ValueError(f"item {seq}: {len(t)} stamps, expected {3 * len(self.hops)}")
            for k in range(len(self.hops)):
                self.put[k].append(t[3 * k])
                self.ready[k].append(t[3 * k + 1])
                self.got[k].append(t[3 * k + 2])
            if self.progress is not None:
                self.progress.update()
            ready = time.monotonic()
        return self.received

    @property
    def received(self) -> int:
        return len(self.got[-1]) if self.got else 0

    def startup(self) -> tuple[float, list[int]]:
        """(seconds from the first put until every stage had asked for its first item, the items put
        after that). Items put earlier waited for a worker to start (a Ray worker, a spawned process):
        they are counted, but left out of the percentiles when at least MIN_STEADY items remain."""
        if not self.received:
            return math.nan, []
        up = max(min(r) for r in self.ready)
        first = min(self.put[0])
        steady = [i for i, t in enumerate(self.put[0]) if t >= up]
        return max(0.0, up - first), steady if len(steady) >= self.MIN_STEADY else list(range(self.received))

    def figures(self) -> list[QueueFigures]:
        """One row per queue, then the end-to-end row (type ``""``)."""
        _, steady = self.startup()
        rows = []
        for k, h in enumerate(self.hops):
            latency = [self.got[k][i] - self.put[k][i] for i in steady]
            transfer = [self.got[k][i] - max(self.put[k][i], self.ready[k][i]) for i in steady]
            between = f"{h.producer} -> {h.consumer}"
            rows.append(self._figures(h.queue, h.queue_type, between, k, steady, latency, transfer))
        end_to_end = [self.got[-1][i] - self.put[0][i] for i in steady]
        between = f"{self.hops[0].producer} -> {self.hops[-1].consumer}"
        rows.append(self._figures("end-to-end", "", between, len(self.hops) - 1, steady, end_to_end, []))
        return rows

    def _figures(
        self,
        name: str,
        queue_type: str,
        between: str,
        k: int,
        steady: list[int],
        latency: list[float],
        transfer: list[float],
    ) -> QueueFigures:
        """Items: all of them; items/s and percentiles: over ``steady`` (see :meth:`startup`)."""
        if not steady:
            return QueueFigures(name, queue_type, between, 0, math.nan, math.nan, math.nan, math.nan)
        got = [self.got[k][i] for i in steady]
        span = max(got) - min(got)
        lat = sorted(latency)
        return QueueFigures(
            name,
            queue_type,
            between,
            len(self.got[k]),
            len(got) / span if span > 0 else math.nan,
            _percentile(lat, 0.50),
            _percentile(lat, 0.99),
            _percentile(sorted(transfer), 0.50) if transfer else math.nan,
        )


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.3f}"


def format_job_table(figures: list[QueueFigures]) -> str:
    head = ("queue", "type", "between", "items", "items/s", "p50 ms", "p99 ms", "transfer p50 ms")
    cells = [head] + [
        (
            f.name,
            f.queue_type or "-",
            f.between,
            str(f.items),
            "-" if math.isnan(f.throughput) else f"{f.throughput:,.0f}",
            _ms(f.p50_s),
            _ms(f.p99_s),
            _ms(f.transfer_p50_s),
        )
        for f in figures
    ]
    widths = [max(len(row[c]) for row in cells) for c in range(len(head))]

    def line(row: tuple[str, ...]) -> str:
        # Names left, numbers right.
        return "  ".join(v.rjust(w) if c >= 3 else v.ljust(w) for c, (v, w) in enumerate(zip(row, widths, strict=True)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


EDGE_HOST = "edge"
"""The main job's source runs on host "edge": this machine, reached through an empty launcher
(``HostSpec()``), so that the job has the hop a second machine would have, over rpc."""


@dataclass(frozen=True)
class Plan:
    """Where each stage of the main job runs, and the queue between each two (``"auto"``: the JobManager picks)."""

    where: dict[str, str]
    queues: dict[str, str]
    notes: dict[str, str]  # queue -> why it is not what the full demo uses (a backend missing here)

    def hops(self) -> list[Hop]:
        order = list(self.where)
        hops = []
        for k, name in enumerate(self.queues):
            producer, consumer = order[k], order[k + 1]
            queue_type = self.queues[name]
            if queue_type == "auto":
                queue_type = choose_queue_type(self.where[producer], self.where[consumer])
            hops.append(Hop(name, queue_type, producer, consumer, self.notes.get(name, "")))
        return hops


def plan_main_job(ray_note: Optional[str], rpc_note: Optional[str]) -> Plan:
    """source (host "edge") -> raw -> parse (a Ray worker) -> parsed -> enrich (a process) -> enriched -> sink
    (a thread of the demo): every queue "auto", so the JobManager picks rpc, ray_actor and sage.

    ``ray_note``/``rpc_note``: why Ray / rpc cannot run here (None when they can); the stage then runs
    in a process and its queue is declared shm or sage instead, with the reason kept as a note.
    """
    where = {"source": f"host:{EDGE_HOST}", "parse": "ray", "enrich": "process", "sink": "thread"}
    queues = {"raw": "auto", "parsed": "auto", "enriched": "auto"}
    notes: dict[str, str] = {}
    same_host = [t for t in ("shm", "sage") if unavailable_reason(t) is None]
    if rpc_note is not None:
        where["source"] = "process"
        queues["raw"] = same_host[0]
        notes["raw"] = f"instead of rpc: {rpc_note}"
    if ray_note is not None:
        where["parse"] = "process"
        queues["parsed"] = same_host[0]
        notes["parsed"] = f"instead of ray_actor: {ray_note}"
    return Plan(where, queues, notes)


@dataclass
class MainJobReport:
    hops: list[Hop]
    stats: JobStats
    seconds: float
    choices: dict[str, str]  # queue -> "type: reason" (JobManager.choices)
    workers: list[str]  # "stage: where (pid N)"
    error: Optional[str] = None


_KIND = {"thread": "a thread of the demo", "process": "a process", "ray": "a Ray worker"}


def run_main_job(items: int, plan: Plan, out: TextIO) -> MainJobReport:
    """Part 2: source -> parse -> enrich -> sink as ``plan`` says, with a progress display on ``out``."""
    hops = plan.hops()
    progress = _Progress(items, "main job", out)
    stats = JobStats(items, hops, progress)
    fns: dict[str, StageFn] = {
        "source": "sage_queue.demo:job_source",
        "parse": "sage_queue.demo:job_parse",
        "enrich": "sage_queue.demo:job_enrich",
        "sink": stats.consume,
    }
    names = list(plan.where)
    queue_names = list(plan.queues)
    stages = [
        Stage(
            name,
            fns[name],
            input=queue_names[k - 1] if k > 0 else None,
            output=queue_names[k] if k < len(queue_names) else None,
            where=plan.where[name],
            args={"items": items} if name == "source" else {},  # JOB17: the source's item count
        )
        for k, name in enumerate(names)
    ]
    job = Job(
        queues={name: QueueSpec(queue_type, JOB_MAXSIZE) for name, queue_type in plan.queues.items()},
        stages=stages,
        name=f"sage-queue-demo-{os.getpid()}",
    )
    manager = JobManager(job, hosts={EDGE_HOST: HostSpec()})
    started = time.monotonic()
    error: Optional[str] = None
    # Start-up (spawned workers, a Ray worker) plus a floor of 100 items/s on the slowest hop.
    timeout = 6 * WAIT_S + items / 100
    try:
        result = manager.run(timeout=timeout)
        if result.results["sink"] != [items]:
            error = f"the sink received {result.results['sink']} items, expected {items}"
    except JobFailed as exc:
        error = _job_failure(exc)
    except Exception as exc:  # the job did not start (a queue could not be created...): torn down by run()
        error = f"{type(exc).__name__}: {_one_line(exc)}"
    finally:
        progress.close()
    seconds = time.monotonic() - started
    if error is None and stats.received != items:
        error = f"{items - stats.received} items never reached the sink"
    # The types the manager really used (an "auto" queue is what it picked).
    hops = [replace(h, queue_type=manager.choices[h.queue].queue_type) for h in hops if h.queue in manager.choices]
    stats.hops = hops or stats.hops
    choices = {name: f"{c.queue_type}: {c.reason}" for name, c in manager.choices.items()}
    workers = []
    for w in manager.workers():
        kind = _KIND.get(w.where, f"a process on host {w.where[5:]!r} (this machine, launched without ssh)")
        workers.append(f"{w.stage}: {kind}" + (f", pid {w.pid}" if w.pid is not None else ""))
    return MainJobReport(stats.hops, stats, seconds, choices, workers, error)


# -- main ------------------------------------------------------------------------------------------


class _Signals:
    """SIGINT and SIGTERM raise KeyboardInterrupt once; a second one during teardown is ignored
    (teardown must finish: queues, workers, the server and Ray). Main thread only."""

    def __init__(self) -> None:
        self.interrupted: Optional[str] = None  # the signal's name, once one came
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.interrupted is not None:
            return
        self.interrupted = signal.Signals(signum).name
        raise KeyboardInterrupt(self.interrupted)

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextmanager
def _quiet_library_logs() -> Iterator[None]:
    """The library's warnings (a worker that ended badly...) are in the demo's own report; without
    a handler of the caller's, logging's last resort would print them a second time on stderr."""
    import logging

    logger = logging.getLogger("sage_queue")
    if logger.handlers or logging.getLogger().handlers:
        yield
        return
    null = logging.NullHandler()
    logger.addHandler(null)
    try:
        yield
    finally:
        logger.removeHandler(null)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sage-queue demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated queue types: part 1 only, on these types (default: every registered type, then part 2)",
    )
    parser.add_argument(
        "--items",
        type=int,
        default=None,
        help=f"items through the main job (default {JOB_ITEMS}; --quick: {QUICK_ITEMS})",
    )
    parser.add_argument("--quick", action="store_true", help=f"a small run: {QUICK_ITEMS} items through the main job")
    parser.add_argument("--explain", action="store_true", help="print why each queue of the main job has its type")
    parser.add_argument("--no-ray", action="store_true", help="do not start Ray (its types skipped, its hop replaced)")
    parser.add_argument("--skip-scenarios", action="store_true", help="run the main job only")
    parser.add_argument("--skip-job", action="store_true", help="run the seed's scenarios only")
    parser.add_argument(
        "--wait",
        type=float,
        default=WAIT_S,
        help=f"longest single wait in seconds before a scenario fails (default {WAIT_S:g})",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _set_wait(args.wait)
    if args.child:
        return _child_main(args.child)
    items = args.items if args.items is not None else (QUICK_ITEMS if args.quick else JOB_ITEMS)
    if items < 1:
        parser.error(f"--items must be >= 1, got {items}")
    out = sys.stdout
    started = time.monotonic()
    with _Signals() as signals, _quiet_library_logs():
        try:
            return _main(args, items, out, started)
        except KeyboardInterrupt as exc:
            # The signal: ours, or the JobManager's own SIGTERM handler's (KeyboardInterrupt("SIGTERM")).
            name = signals.interrupted or (str(exc) if str(exc) in ("SIGINT", "SIGTERM") else "SIGINT")
            print(
                f"\nsage-queue demo: interrupted ({name}); every queue it created is destroyed, every worker and "
                "child stopped, its rpc servers and Ray shut down",
                file=sys.stderr,
                flush=True,
            )
            return 128 + signal.Signals[name].value  # as a shell reports death by that signal: 130, 143


def _main(args: argparse.Namespace, items: int, out: TextIO, started: float) -> int:
    types = all_types() if args.backends is None else [t.strip() for t in args.backends.split(",") if t.strip()]
    run_scenarios_ = not args.skip_scenarios
    run_job = not args.skip_job and (args.backends is None or args.skip_scenarios)
    failures: list[str] = []
    with ExitStack() as services:  # unwound last: the job's and the scenarios' queues are gone by then
        ray_note = _NO_RAY_NOTE if args.no_ray else unavailable_reason("ray_actor")
        needs_ray = run_job or (run_scenarios_ and any(_is_ray_type(t) for t in types))
        intro = []
        if ray_note is None and not needs_ray:
            ray_note = "Ray not started (not needed for what runs)"
        elif ray_note is None:
            t0 = time.monotonic()
            try:
                services.enter_context(_local_ray())
                intro.append(f"a local Ray started in {time.monotonic() - t0:.1f}s")
            except Exception as exc:
                ray_note = f"Ray did not start: {type(exc).__name__}: {_one_line(exc)}"
                failures.append(ray_note)
        if ray_note is not None:
            intro.append(ray_note)
        rpc_note = unavailable_reason("rpc")
        picked = choose_descriptor(maxsize=1)  # a descriptor only: nothing exists until it is resolved
        print(f"sage-queue demo: {'; '.join(intro)}; scenario 2 here picks {picked.queue_type!r}", file=out)

        if run_scenarios_:
            print(f"\nPart 1: the seed's three scenarios on {', '.join(types)}\n", file=out, flush=True)
            rows = run_scenarios(types, services, ray_note)
            print(format_table(rows), file=out)
            failures += [f"{r.backend} / {r.scenario}: FAILED: {r.detail}" for r in rows if r.failed]
            print(f"{sum(not r.failed for r in rows)} of {len(rows)} rows without failure", file=out)

        if run_job:
            plan = plan_main_job(ray_note, rpc_note)
            chain = " -> ".join(f"{h.producer} -> [{h.queue}]" for h in plan.hops()) + " -> sink"
            print(f"\nPart 2: the main job, {items} items of {PAYLOAD_BYTES} bytes: {chain}", file=out, flush=True)
            report = run_main_job(items, plan, out)
            print(f"  workers: {'; '.join(report.workers)}", file=out)
            print("\n" + format_job_table(report.stats.figures()), file=out)
            startup, steady = report.stats.startup()
            print(
                f"\nitems/s, p50, p99: over the {len(steady)} items put once every stage was up (start-up: "
                f"{startup:.1f}s); items/s: from the queue's first get to its last (the slowest stage sets it);\n"
                "p50/p99: put -> get, time queued behind slower hops included; "
                "transfer: from when both ends were at the queue to the get",
                file=out,
            )
            for name, note in plan.notes.items():
                print(f"note: {name} {note}", file=out)
            if args.explain:
                print("\nwhy each queue has its type (JobManager.choices):", file=out)
                for name, why in report.choices.items():
                    print(f"  {name}: {why}", file=out)
            if report.error is not None:
                failures.append(f"main job: {report.error}")
            else:
                print(
                    f"main job ok: {items} items in {report.seconds:.1f}s, none lost, duplicated or altered", file=out
                )
    # Services are stopped here (Ray shut down, the rpc server stopped).
    elapsed = time.monotonic() - started
    if failures:
        print(f"\nsage-queue demo: {len(failures)} FAILED in {elapsed:.1f}s:", file=out)
        for failure in failures:
            print(f"  {failure}", file=out)
        return 1
    print(f"\nsage-queue demo: everything ok in {elapsed:.1f}s; every queue, worker and service is gone", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
