"""``sage-queue demo``: the seed issue's three usage scenarios, run as working code.

For every queue type this installation can provide (``QUEUE_STUB_MAPPING.available``) it runs:

1. **cross-process** — this process creates two queues and their descriptors and starts an
   unrelated process (``subprocess``) that receives nothing but the descriptors' JSON on its
   stdin; the child resolves them and echoes every item back, so items flow both ways. A type
   without the ``cross_process`` capability (``local``) must make that child fail with
   ``QueueNotFound``; the same JSON is then shown to work for a thread of this process.
2. **adaptive** — the seed's "choose the queue type by environment" code path: one function
   picks a descriptor, one function uses it, whatever the type.
3. **job pipeline** — a small ``JobManager`` builds ``{"input", "processing", "output"}``
   descriptors and hands them to two workers (processes where the type crosses processes,
   threads otherwise) that square and increment a stream of numbers.

A ``mixed`` row runs scenario 3 with a different cross-process type per queue, as in the seed.
Unavailable types are listed as skipped with the reason. Every queue is destroyed and every
child process reaped before ``main`` returns; the exit status is 1 if any scenario failed.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

from .descriptor import QueueDescriptor
from .errors import BackendUnavailable, QueueNotFound
from .protocol import CROSS_PROCESS
from .registry import QUEUE_STUB_MAPPING, unavailable_reason
from .resolve import create_descriptor_from_existing_queue, get_local_queue, resolve_descriptor

__all__ = ["main", "choose_descriptor", "JobManager"]

WAIT_S = 10.0
"""Longest any single get/put/child of the demo may wait: a broken backend fails, never hangs."""
ECHO_ITEMS = 200
PIPELINE_ITEMS = 100
SMALL_MAXSIZE = 16
"""Smaller than the item counts, so that producers really block on full queues."""
_STOP = "__stop__"


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


class _Tracker:
    """Every handle the demo resolves, so that each queue is destroyed exactly once at the end."""

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


# -- children --------------------------------------------------------------------------------------


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


_STAGES: dict[str, Callable[[int], int]] = {"square": lambda x: x * x, "increment": lambda x: x + 1}


def stage_loop(source: Any, sink: Any, stage: str) -> int:
    """A pipeline worker: apply ``stage`` to every item until the stop marker, then pass it on."""
    work = _STAGES[stage]
    handled = 0
    while True:
        item = source.get(timeout=WAIT_S)
        if item == _STOP:
            sink.put(_STOP, timeout=WAIT_S)
            return handled
        sink.put(work(item), timeout=WAIT_S)
        handled += 1


def _child_main(role: str) -> int:
    """Entry point of a child: descriptors arrive as JSON on stdin, a JSON report leaves on stdout."""
    payload = json.loads(sys.stdin.readline())

    handles: list[Any] = []

    def connect(json_desc: str) -> Any:  # the seed's process B, line for line
        received_desc = QueueDescriptor.from_json(json_desc)
        handles.append(resolve_descriptor(received_desc))
        return handles[-1]

    try:
        if role == "echo":
            handled = echo_loop(connect(payload["inbox"]), connect(payload["outbox"]), payload["count"])
        elif role == "stage":
            handled = stage_loop(connect(payload["source"]), connect(payload["sink"]), payload["stage"])
        else:
            raise ValueError(f"unknown child role {role!r}")
    except QueueNotFound as exc:
        print(json.dumps({"error": "QueueNotFound", "message": str(exc)}))
        return 0
    finally:
        for handle in handles:
            handle.close()  # close, not destroy: the queues belong to the parent
    print(json.dumps({"handled": handled, "pid": os.getpid()}))
    return 0


# -- scenarios -------------------------------------------------------------------------------------


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
    detail = ""
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
    feeder = threading.Thread(target=lambda: [inbox_handle.put(item, timeout=WAIT_S) for item in items], daemon=True)
    feeder.start()
    replies = [outbox_handle.get(timeout=WAIT_S) for _ in items]
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


class JobManager:
    """The seed's scenario 3: builds the topology, hands the descriptors to workers, feeds and drains it."""

    def __init__(self, types: dict[str, str], tracker: _Tracker) -> None:
        self.job_queues = {role: make_descriptor(queue_type, role) for role, queue_type in types.items()}
        self.handles = {role: tracker.resolve(desc) for role, desc in self.job_queues.items()}

    def topology(self) -> dict[str, str]:
        """What a worker receives: JSON text only."""
        return {role: desc.to_json() for role, desc in self.job_queues.items()}

    def run(self, numbers: list[int], start_worker: Callable[[str, str, str], None]) -> list[int]:
        wiring = self.topology()
        start_worker(wiring["input"], wiring["processing"], "square")
        start_worker(wiring["processing"], wiring["output"], "increment")
        feeder = threading.Thread(target=self._feed, args=(numbers,), daemon=True)
        feeder.start()
        out: list[int] = []
        while (item := self.handles["output"].get(timeout=WAIT_S)) != _STOP:
            out.append(item)
        feeder.join(WAIT_S)
        return out

    def _feed(self, numbers: list[int]) -> None:
        for n in [*numbers, _STOP]:
            self.handles["input"].put(n, timeout=WAIT_S)


def scenario_pipeline(types: dict[str, str], tracker: _Tracker, children: _Children) -> Outcome:
    manager = JobManager(types, tracker)
    in_processes = all(crosses_processes(t) for t in types.values())
    workers: list[threading.Thread] = []
    procs: list[subprocess.Popen[str]] = []

    def start_worker(source: str, sink: str, stage: str) -> None:
        if in_processes:
            procs.append(children.start("stage", {"source": source, "sink": sink, "stage": stage}))
        else:
            worker = threading.Thread(
                target=stage_loop, args=(resolve_descriptor(source), resolve_descriptor(sink), stage), daemon=True
            )
            worker.start()
            workers.append(worker)

    numbers = list(range(PIPELINE_ITEMS))
    out = manager.run(numbers, start_worker)
    if out != [n * n + 1 for n in numbers]:
        raise AssertionError(f"pipeline output differs: {out[:10]}...")
    for proc in procs:
        report = children.result(proc)
        if report.get("handled") != PIPELINE_ITEMS:
            raise AssertionError(f"worker report: {report}")
    for worker in workers:
        worker.join(WAIT_S)
    where = f"2 worker processes (pids {', '.join(str(p.pid) for p in procs)})" if procs else "2 worker threads"
    return Outcome(items=3 * PIPELINE_ITEMS, detail=where)


# -- the table -------------------------------------------------------------------------------------


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


def _run(backend: str, scenario: str, body: Callable[[_Tracker, _Children], Outcome]) -> Row:
    started = time.perf_counter()
    try:
        with _resources() as (tracker, children):
            outcome = body(tracker, children)
    except BackendUnavailable as exc:  # the module imports but its dependency does not (e.g. an unbuilt C core)
        return Row(backend, scenario, f"skipped: {exc.missing} ({exc.hint})"[:120])
    except Exception as exc:
        if isinstance(exc, (queue.Empty, queue.Full)):
            message = f"no progress within {WAIT_S:g}s (items lost or a peer stuck)"
        else:
            message = " ".join(str(exc).split())  # one line, whatever the exception says
        return Row(
            backend,
            scenario,
            f"FAILED: {type(exc).__name__}: {message}"[:120],
            seconds=f"{time.perf_counter() - started:.2f}s",
            failed=True,
        )
    return Row(backend, scenario, "ok", str(outcome.items), f"{time.perf_counter() - started:.2f}s", outcome.detail)


def run_all(types: list[str]) -> list[Row]:
    with ExitStack() as services:  # stopped after every row, mixed pipelines included
        return _run_all(types, services)


def _run_all(types: list[str], services: ExitStack) -> list[Row]:
    rows: list[Row] = []
    cross: list[str] = []
    for queue_type in types:
        reason = unavailable_reason(queue_type)
        if reason is not None:
            rows.append(Row(queue_type, "all", f"skipped: {reason}"[:120]))
            continue
        try:
            _start_service(services, queue_type)
        except Exception as exc:
            rows.append(
                Row(
                    queue_type,
                    "all",
                    f"FAILED: its service did not start: {type(exc).__name__}: {exc}"[:120],
                    failed=True,
                )
            )
            continue
        if crosses_processes(queue_type):
            cross.append(queue_type)
        same_type = {"input": queue_type, "processing": queue_type, "output": queue_type}
        rows.append(_run(queue_type, "1 cross-process", partial(scenario_cross_process, queue_type)))
        rows.append(_run(queue_type, "2 adaptive", partial(scenario_adaptive, queue_type)))
        rows.append(_run(queue_type, "3 job pipeline", partial(scenario_pipeline, same_type)))
    if len(cross) >= 2:
        mixed = {"input": cross[0], "processing": cross[1], "output": cross[0]}
        label = "mixed(" + ",".join(mixed.values()) + ")"
        rows.append(_run(label, "3 job pipeline", partial(scenario_pipeline, mixed)))
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


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sage-queue demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends", default=None, help="comma-separated queue types to run (default: every registered type)"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=WAIT_S,
        help=f"longest single wait in seconds before a scenario fails (default {WAIT_S:g})",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _set_wait(args.wait)
    if args.child:
        return _child_main(args.child)
    types = all_types() if args.backends is None else [t.strip() for t in args.backends.split(",") if t.strip()]
    picked = choose_descriptor(maxsize=1)  # a descriptor only: nothing exists until it is resolved
    print(f"sage-queue demo: scenario 2 in this environment picks {picked.queue_type!r}; running {', '.join(types)}\n")
    started = time.perf_counter()
    rows = run_all(types)
    print(format_table(rows))
    failed = [r for r in rows if r.failed]
    print(
        f"\n{len(rows) - len(failed)} of {len(rows)} rows without failure in {time.perf_counter() - started:.1f}s"
        + (f"; {len(failed)} FAILED" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
