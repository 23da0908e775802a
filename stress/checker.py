"""One checker for every harness run, in the spirit of Jepsen's total-queue checker.

Input: the history (:mod:`stress.history`) of every worker, the set of workers the
harness SIGKILLed, and the backend's :class:`Promise`. Output: a :class:`CheckReport`
whose ``problems`` are the broken promises (the verdict) and whose counts say what
happened even when nothing was promised (the anchors).

Definitions (every item has a unique tag, see :mod:`stress.history`):

* *acked*: the item's ``put`` returned (``invoke put`` followed by ``ok put``);
* *indeterminate*: its ``put`` was in flight when the producer was killed, or failed
  with an exception other than ``Full``: it may or may not be in the queue;
* *refused*: its ``put`` timed out (``Full``): it was not put (queue contract);
* *got*: returned by a ``get``/``get_many`` whose ``ok get`` was logged;
* **lost** = acked and never got; **duplicated** = got more than once; **unexpected** =
  got but never offered, or refused; **out of order** = within one consumer, one
  producer incarnation's seqs not increasing (Q3); **corrupt** = checksum mismatch;
  **overrun** = a call that returned later than its timeout + ``slack`` seconds.

The loss a promise allows is counted from the history, not estimated: each ``invoke get``
of a killed worker with no completion may lose up to the items it asked for (its whole
``get_many`` batch: SHM12, SAGE12), because the items it took died with it. When what holds
the queue is killed with its contents (a Ray actor: RAY9, RAY10), the scenario records when it
was seen dead (``queue_kills``): an acked item whose put was invoked before such a time and that
was never got may have been in the queue then, so its loss is allowed (``lost_at_kill``); an item
whose put was invoked after the last such time went to the new, empty queue and must be got.

A call that failed (``fail``) with an error the promise declares survivable (rpc:
``QueueConnectionError``, E16; Ray: ``QueueActorLost``, E17) got nothing and put its items at
most once (indeterminate); the worker logged it and went on.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .history import FAIL, INVOKE, OK, PUT, TIMEOUT, Op, Tag

__all__ = ["Promise", "PROMISES", "CONTRACT", "NO_PROMISE", "promise_for", "register_promise", "CheckReport", "check"]

DEFAULT_SLACK = 2.0
"""Seconds a call may return after its timeout before it counts as an overrun (a loaded 2-core box
deschedules processes for hundreds of milliseconds; a real overrun is a wait that ignores the timeout)."""


@dataclass(frozen=True)
class Promise:
    """What a backend promises under the harness's faults, with the spec clauses it comes from."""

    name: str
    clauses: tuple[str, ...]
    """The spec clause ids (spec/backends/<type>.md) this promise encodes."""
    loss_per_killed_get: bool = True
    """True: a worker killed inside ``get``/``get_many`` may lose the items that call took (its batch).
    False: nothing may be lost even then."""
    duplicates: bool = False
    """True if delivering an item twice is allowed (at-least-once backends)."""
    order: bool = True
    """Per-producer order within each consumer (Q3)."""
    bounded_waits: bool = True
    """False if a call may wait past its timeout (shm: lock waits are not bounded, SHM11): overruns are noted."""
    judged: bool = True
    """False: nothing promised (an anchor): the report counts, the verdict is always 'no promise'."""
    survivable: tuple[str, ...] = ()
    """Names of error classes a call may raise with the queue still usable (rpc: ``QueueConnectionError``
    when a cut outlasts the retry deadline): a worker logs the call as failed and goes on. Any other
    error ends the worker, which fails the run."""
    slack: float = 0.0
    """Seconds a call may legitimately take past its timeout (rpc: a timed call raises at the latest
    2 s after it, RPC9), added to the checker's own slack for load."""
    loss_at_queue_kill: bool = False
    """True: killing what holds the queue (a Ray actor) loses the items in it (RAY9, RAY10): acked items
    put before it was seen dead may be lost; later ones may not."""


CONTRACT = Promise("queue contract (the default for a MODULE:ATTR factory)", ("Q3",))
"""What a user's factory is held to: nothing lost but the batch of a killed get, no duplicate, order."""
NO_PROMISE = Promise("none (counted, not judged)", (), judged=False)

PROMISES: dict[str, Promise] = {
    # spec/backends/shm.md SHM10 (no loss/dup/corruption, per-producer order), SHM11 ("Waiting for a
    # lock is not bounded by `timeout`"; SIGKILL never leaves it locked), SHM12 ("a consumer killed
    # inside get/get_many after its commit store loses the items that call took ... Nothing else is lost").
    "shm": Promise("shm: SHM10-SHM12", ("SHM10", "SHM11", "SHM12"), bounded_waits=False),
    # spec/backends/sage.md SAGE9 (no lock; no loss/dup/corruption, order), SAGE11 (a SIGKILL never
    # stalls the ring), SAGE12 ("a consumer killed inside get/get_many loses the record it had claimed
    # and not yet returned ... Nothing else is lost, nothing is delivered twice").
    "sage": Promise("sage: SAGE9, SAGE11, SAGE12", ("SAGE9", "SAGE11", "SAGE12")),
    "local": Promise("local: queue contract (threads only)", ("Q3",)),
    # spec/backends/rpc.md RPC10 (exactly once under retries: a retransmitted put enqueued once, a
    # retransmitted get returns the same items), RPC9 (a timed call raises QueueConnectionError at the
    # latest 2 s after its timeout; E16: it executed at most once, a get that gave up takes nothing),
    # RPC14 (durable: SIGKILL + restart loses no acked put, redelivers no acked get), RPC17 (cut
    # connections), RPC18 (durable server SIGKILLed under load), RPC19 (a client killed inside get loses
    # at most that call's items).
    "rpc": Promise(
        "rpc: RPC9, RPC10, RPC14, RPC17-RPC19",
        ("RPC9", "RPC10", "RPC14", "RPC17", "RPC18", "RPC19"),
        survivable=("QueueConnectionError",),
        slack=2.0,
    ),
    # spec/backends/ray.md RAY9 (a killed actor takes its items; every call fails fast with QueueActorLost),
    # RAY10 (a restarted ray_actor is empty, each handle raises once then works), RAY5 (a call raises at
    # the latest 2 s after its deadline when the actor does not answer its cancel; E16, RAY13), RAY14 (what
    # a kill under load may lose, and what it may not).
    "ray_actor": Promise(
        "ray_actor: RAY5, RAY9, RAY10, RAY13, RAY14",
        ("RAY5", "RAY9", "RAY10", "RAY13", "RAY14"),
        survivable=("QueueActorLost", "QueueConnectionError"),
        slack=2.0,
        loss_at_queue_kill=True,
    ),
    "ray_queue": Promise(
        "ray_queue: RAY9, RAY14",
        ("RAY9", "RAY14"),
        survivable=("QueueActorLost", "QueueConnectionError"),
        slack=2.0,
        loss_at_queue_kill=True,
    ),
}
"""Per backend type. Other backends add theirs with :func:`register_promise` (see fault_injection/README.md)."""


def register_promise(queue_type: str, promise: Promise) -> None:
    """Declare what ``queue_type`` promises under faults (its spec page's clauses)."""
    PROMISES[queue_type] = promise


def promise_for(backend: str, factory: Any = None) -> Promise:
    """The registered type's promise; for a factory, its ``harness_promise`` attribute, else :data:`CONTRACT`."""
    if factory is not None:
        promise = getattr(factory, "harness_promise", None)
        return promise if isinstance(promise, Promise) else CONTRACT
    return PROMISES.get(backend, CONTRACT)


@dataclass
class CheckReport:
    """Counts and verdict of one run. ``problems``: broken promises; ``notes``: seen and permitted."""

    promise: str
    seed: Optional[int] = None
    kills: int = 0
    stops: int = 0
    attempted: int = 0
    acked: int = 0
    indeterminate: int = 0
    indeterminate_delivered: int = 0
    refused: int = 0
    got: int = 0
    lost: int = 0
    lost_bound: int = 0
    lost_at_kill: int = 0
    """Lost items whose put was invoked before a kill of the queue's holder (allowed by the promise, and
    counted in ``lost_bound``, when it has ``loss_at_queue_kill``)."""
    failed: int = 0
    """Calls that failed with an error (survivable ones: the worker went on)."""
    queue_kills: int = 0
    duplicated: int = 0
    unexpected: int = 0
    corrupt: int = 0
    out_of_order: int = 0
    overruns: int = 0
    stuck: int = 0
    """Calls still in flight, past their timeout + slack, when a deadlocked run was stopped (never returned)."""
    deadlock: bool = False
    seconds: float = 0.0
    throughput: float = 0.0
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    judged: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        if not self.judged:
            return "no promise"
        return "OK" if self.ok else "BROKEN"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdict"] = self.verdict
        return out

    def counts(self) -> str:
        return (
            f"{self.acked} acked, {self.got} got, {self.lost} lost (bound {self.lost_bound}), "
            f"{self.failed} failed calls, "
            f"{self.duplicated} duplicated, {self.unexpected} unexpected, {self.corrupt} corrupt, "
            f"{self.out_of_order} out of order, {self.overruns} overruns, {self.stuck} stuck calls"
            f"{', DEADLOCK' if self.deadlock else ''}; {self.throughput:,.0f} items/s"
        )


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)

    def pick(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * 1e3

    return {"p50": pick(0.5), "p99": pick(0.99), "max": values[-1] * 1e3, "n": float(len(values))}


def _tag(t: Tag) -> str:
    return f"p{t[0]}.{t[1]}#{t[2]}"


def check(
    history: Mapping[str, list[Op]],
    promise: Promise,
    *,
    killed: frozenset[str] = frozenset(),
    queue_kills: tuple[float, ...] = (),
    slack: float = DEFAULT_SLACK,
    deadlock: bool = False,
    seed: Optional[int] = None,
    end: Optional[float] = None,
) -> CheckReport:
    """Judge ``history`` (process -> its events, in order) against ``promise``; see the module docstring.

    ``killed``: the processes the harness SIGKILLed (only their calls in flight may have lost
    items). ``queue_kills``: when the queue's holder was seen dead after each kill of it (monotonic;
    see the module docstring). ``slack``: on top of the promise's own :attr:`Promise.slack`.
    ``deadlock``: the run's end phase did not finish (then whatever was not got counts
    as lost, and the deadlock itself breaks every promise). ``end``: when the run was stopped
    (``time.monotonic()``): a call of a live worker still in flight then, past its timeout + slack,
    is *stuck* (a wait that ignored its timeout).
    """
    report = CheckReport(promise.name, seed=seed, deadlock=deadlock, judged=promise.judged)
    report.queue_kills = len(queue_kills)
    slack += promise.slack
    offered: dict[Tag, str] = {}  # tag -> "acked" | "indeterminate" | "refused" | "in flight"
    put_invoked: dict[Tag, float] = {}  # tag -> when its (last) put was invoked
    got: Counter[Tag] = Counter()
    durations: dict[str, list[float]] = defaultdict(list)
    order_breaks: list[str] = []
    overruns: list[str] = []
    first = last = None
    for process, ops in history.items():
        pending: Optional[Op] = None  # the invoke waiting for its completion (a worker is sequential)
        last_seq: dict[tuple[int, int], int] = {}
        for op in ops:
            first = op.time if first is None else min(first, op.time)
            last = op.time if last is None else max(last, op.time)
            if op.kind == INVOKE:
                pending = op
                if op.op == PUT:
                    for t in op.items:
                        offered[t] = "in flight"
                        put_invoked[t] = op.time
                continue
            if pending is None or pending.op != op.op:
                report.problems.append(f"{process}: malformed history ({op} without its invoke)")
                continue
            invoke, pending = pending, None
            took = op.time - invoke.time
            if op.timeout is not None and took > op.timeout + slack:
                overruns.append(
                    f"{process} {'put' if op.op == PUT else 'get'} took {took:.2f} s (timeout {op.timeout:g} s)"
                )
            if op.kind == OK:
                durations["put" if op.op == PUT else "get"].append(took)
            elif op.kind == FAIL:
                report.failed += 1
            if op.op == PUT:
                state = {OK: "acked", TIMEOUT: "refused", FAIL: "indeterminate"}[op.kind]
                for t in invoke.items:
                    offered[t] = state
            elif op.kind == OK:
                got.update(op.items)
                report.corrupt += op.corrupt
                for t in op.items:
                    producer = (t[0], t[1])
                    if last_seq.get(producer, -1) >= t[2]:
                        report.out_of_order += 1
                        order_breaks.append(f"{process} got {_tag(t)} after seq {last_seq[producer]}")
                    last_seq[producer] = max(last_seq.get(producer, -1), t[2])
        if pending is not None:
            if process in killed:
                if pending.op == PUT:
                    for t in pending.items:
                        offered[t] = "indeterminate"
                elif promise.loss_per_killed_get:
                    report.lost_bound += pending.asked
            elif not deadlock:
                report.problems.append(f"{process}: a call never completed and the worker was not killed")
            elif end is not None and pending.timeout is not None and end - pending.time > pending.timeout + slack:
                report.stuck += 1
                overruns.append(
                    f"{process} {'put' if pending.op == PUT else 'get'} never returned "
                    f"({end - pending.time:.1f} s, timeout {pending.timeout:g} s)"
                )
    states = Counter(offered.values())
    report.attempted = len(offered)
    report.acked = states["acked"]
    report.indeterminate = states["indeterminate"] + states["in flight"]
    report.refused = states["refused"]
    report.got = sum(got.values())
    lost = [t for t, s in offered.items() if s == "acked" and t not in got]
    last_kill = max(queue_kills, default=None)
    report.lost_at_kill = sum(1 for t in lost if last_kill is not None and put_invoked[t] < last_kill)
    if promise.loss_at_queue_kill:
        report.lost_bound += report.lost_at_kill
    dups = [t for t, n in got.items() if n > 1]
    unexpected = [t for t in got if offered.get(t) in (None, "refused")]
    report.indeterminate_delivered = sum(1 for t in got if offered.get(t) in ("indeterminate", "in flight"))
    report.lost, report.duplicated, report.unexpected = len(lost), len(dups), len(unexpected)
    report.overruns = len(overruns) - report.stuck
    report.examples = {
        name: sorted(_tag(t) for t in items)[:5]
        for name, items in (("lost", lost), ("duplicated", dups), ("unexpected", unexpected))
        if items
    }
    if order_breaks:
        report.examples["out_of_order"] = order_breaks[:5]
    if overruns:
        report.examples["overruns"] = overruns[:5]
    report.latency_ms = {name: _percentiles(values) for name, values in durations.items()}
    if first is not None and last is not None and last > first:
        report.seconds = last - first
        report.throughput = report.got / report.seconds
    _judge(report, promise)
    return report


def _judge(report: CheckReport, promise: Promise) -> None:
    broken: list[str] = []
    if report.deadlock:
        broken.append("the run did not finish (deadlock or stall)")
    if report.lost > report.lost_bound:
        allowed = ["items taken by calls in flight in killed workers"] if promise.loss_per_killed_get else []
        if promise.loss_at_queue_kill:
            allowed.append("items in the queue when its holder was killed")
        why = f" ({', or '.join(allowed)})" if allowed and report.lost_bound else ""
        broken.append(f"{report.lost} acked items lost, more than the {report.lost_bound} allowed{why}")
    if report.duplicated and not promise.duplicates:
        broken.append(f"{report.duplicated} items delivered more than once")
    if report.unexpected:
        broken.append(f"{report.unexpected} unexpected items (never put, or refused by a timed-out put)")
    if report.corrupt:
        broken.append(f"{report.corrupt} corrupt items (checksum)")
    if report.out_of_order and promise.order:
        broken.append(f"{report.out_of_order} items out of per-producer order")
    if report.stuck:
        broken.append(f"{report.stuck} calls never returned, long past their timeout")
    if report.overruns:
        (broken if promise.bounded_waits else report.notes).append(
            f"{report.overruns} calls returned later than their timeout + slack"
        )
    if promise.judged:
        report.problems.extend(broken)
    else:
        report.notes.extend(broken)


def median(values: list[float]) -> float:
    """The median, 0.0 for none (for tables)."""
    return statistics.median(values) if values else 0.0
