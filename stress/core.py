"""P producers x C consumers over one descriptor, in real processes; a full ledger check.

Every item is ``(producer_id, seq, payload, crc32(payload))``. Producers put
``seq = 0..n-1`` in order; consumers verify the checksum and write what they got to a
file of their own, read by the parent at the end. Once every producer has finished the
parent puts one ``None`` sentinel per consumer: FIFO puts them behind every item, so a
consumer that gets one knows the queue held nothing older. Checks:

* multiset equality: every ``(producer_id, seq)`` got exactly once (nothing lost,
  duplicated or invented);
* no corrupt item (checksum);
* per-producer order: within each consumer, each producer's seqs increase (Q3 seen
  from any one consumer; across consumers there is no common clock to compare).

Children are started with ``spawn`` and get nothing but the descriptor's JSON text.

Failing fast: the parent supervises its children instead of joining them one by one.
As soon as any child exits abnormally (non-zero exit code, killed by a signal, an
exception) the run stops, the other children are killed, and the verdict names the
dead child (role, index, pid), its exit code or signal and the tail of its stderr
(each child's stderr goes to a file of its own). A run that does not finish by its
deadline names every child still running, with a Python stack dump of each
(:mod:`faulthandler` on ``SIGUSR1``). Every blocking call the harness makes, in the
parent and in the children, has a timeout bounded by the run's deadline.
"""

from __future__ import annotations

import array
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import queue
import shutil
import signal
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from sage_queue import QueueDescriptor, resolve_descriptor
from sage_queue._timeout import Deadline

__all__ = ["StressResult", "Verdict", "run_stress", "make_payload", "ChildHook"]

ChildHook = Callable[[str, int, int], None]
"""``hook(role, index, done)``, called in a child after each put/get call with the count of
items that child has put/got so far (``role`` is ``"producer"`` or ``"consumer"``). It must
be picklable (a module-level function or a :func:`functools.partial` of one). Meant for
tests of the harness itself: a hook that raises, exits or hangs plays a broken backend."""

POLL_SECONDS = 0.2
"""Longest single wait of the parent: how late it may notice a child that died or a deadline
that passed while it was trying to put a sentinel."""

STACK_DUMP_WAIT = 0.5
"""How long the parent waits for stuck children to write their stack dumps."""

SEQ_BITS = 40
"""An item key is ``producer_id << SEQ_BITS | seq`` (a compact u64 in the consumers' ledgers)."""


def make_payload(producer_id: int, seq: int, size: int) -> bytes:
    """Deterministic payload bytes for one item (different for every item)."""
    stem = f"{producer_id}:{seq}|".encode()
    return (stem * (size // len(stem) + 1))[:size]


class Verdict:
    """What every harness result shares: ``problems`` says what went wrong, ``ok`` is the verdict.

    A subclass (a dataclass) declares ``problems`` as a field and says in :meth:`counts` what
    the run did; :meth:`summary` is the one line the CLIs print.
    """

    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> str:
        raise NotImplementedError

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED: " + "; ".join(self.problems)
        return f"{self.counts()}: {verdict}"


@dataclass
class StressResult(Verdict):
    """The ledger check of one stress run; ``ok`` is the verdict, ``problems`` says why not."""

    producers: int
    consumers: int
    produced: int
    consumed: int
    seconds: float
    lost: list[tuple[int, int]] = field(default_factory=list)
    duplicated: list[tuple[int, int]] = field(default_factory=list)
    invented: list[tuple[int, int]] = field(default_factory=list)
    corrupt: int = 0
    out_of_order: int = 0
    problems: list[str] = field(default_factory=list)

    def counts(self) -> str:
        rate = self.consumed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.producers}x{self.consumers} processes, {self.produced} items put, {self.consumed} got "
            f"in {self.seconds:.2f} s ({rate:,.0f} items/s)"
        )


# -- child supervision (shared with fault_injection.core) ---------------------------------


def child_main(stderr_path: str, target: Callable[..., None], args: tuple[Any, ...]) -> None:
    """Entry point of every harness child: stderr to a file of its own, stacks on SIGUSR1, then ``target``.

    ``dup2`` (not just rebinding ``sys.stderr``) so that C-level writes, the traceback
    multiprocessing prints for an uncaught exception, and faulthandler dumps all land in
    the file the parent reads when it explains a failure.
    """
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    target(*args)


@dataclass(eq=False)
class Child:
    """One child process of a harness, with what is needed to explain its fate."""

    role: str
    index: int
    process: Any
    stderr_path: str
    incarnation: Optional[int] = None

    @property
    def name(self) -> str:
        which = f"{self.index}" if self.incarnation is None else f"{self.index}.{self.incarnation}"
        return f"{self.role} {which} (pid {self.process.pid})"


def describe_exit(exitcode: Optional[int]) -> str:
    """``exit code 3``, ``killed by SIGKILL``, or ``still running``."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _read_text(path: str, offset: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def stderr_tail(path: str, max_lines: int = 8) -> str:
    """The last lines a child wrote to stderr, joined by `` | `` (one line for a verdict)."""
    lines = [line.rstrip() for line in _read_text(path).splitlines() if line.strip()]
    return " | ".join(lines[-max_lines:])


def death_report(child: Child) -> str:
    """``consumer 1 (pid 4242) died: exit code 3; stderr: ...`` for a verdict."""
    report = f"{child.name} died: {describe_exit(child.process.exitcode)}"
    tail = stderr_tail(child.stderr_path)
    return f"{report}; stderr: {tail}" if tail else report


def stuck_reports(
    children: list[Child], max_frames: int = 4, progress: Optional[Callable[[Child], str]] = None
) -> list[str]:
    """Ask every live child for its Python stack (SIGUSR1) and describe where each one is stuck.

    ``progress(child)``, if given, adds what the child had done (e.g. items logged).
    """
    live = [c for c in children if c.process.is_alive()]
    offsets = {}
    for child in live:
        offsets[child] = os.path.getsize(child.stderr_path) if os.path.exists(child.stderr_path) else 0
        try:
            os.kill(child.process.pid, signal.SIGUSR1)
        except ProcessLookupError:  # died in between: its exit code says why
            pass
    if live:
        time.sleep(STACK_DUMP_WAIT)
    reports = []
    for child in live:
        dump = _read_text(child.stderr_path, offsets[child])
        # faulthandler lists the innermost frame first: the first frames say where it waits.
        frames = [line.strip() for line in dump.splitlines() if line.strip().startswith("File ")]
        where = " < ".join(frames[:max_frames]) if frames else "no stack dump (still starting up?)"
        done = f" ({progress(child)})" if progress is not None else ""
        reports.append(f"{child.name} still running{done}, at: {where}")
    return reports


def abnormal_exits(children: list[Child]) -> list[Child]:
    """Children that have exited with a non-zero code or by a signal."""
    return [c for c in children if c.process.exitcode not in (None, 0)]


def wait_for_any(children: list[Child], timeout: float) -> None:
    """Block until one of the live ``children`` exits, or ``timeout`` seconds pass."""
    sentinels = [c.process.sentinel for c in children if c.process.pid is not None and c.process.exitcode is None]
    if sentinels:
        multiprocessing.connection.wait(sentinels, timeout=max(0.0, timeout))
    else:
        time.sleep(0)


def stop_children(children: list[Child], join_timeout: float = 5.0) -> None:
    """SIGKILL every live child, then reap each one (bounded); children never started are skipped."""
    started = [c for c in children if c.process.pid is not None]
    for child in started:
        if child.process.is_alive():
            child.process.kill()
    for child in started:
        child.process.join(join_timeout)


# -- the stress children -------------------------------------------------------------------


def _time_left(deadline: Deadline, doing: str) -> float:
    left = deadline.remaining()
    assert left is not None  # the children's deadlines are never "forever"
    if left <= 0:
        raise TimeoutError(f"the run's deadline passed while {doing}")
    return left


def _producer(
    descriptor_json: str, producer_id: int, count: int, payload_bytes: int, batch: int,
    budget: float, hook: Optional[ChildHook],
) -> None:
    deadline = Deadline(budget)
    q = resolve_descriptor(descriptor_json)
    try:
        if batch > 1:
            for start in range(0, count, batch):
                items = []
                for seq in range(start, min(count, start + batch)):
                    payload = make_payload(producer_id, seq, payload_bytes)
                    items.append((producer_id, seq, payload, zlib.crc32(payload)))
                q.put_many(items, timeout=_time_left(deadline, "putting"))
                if hook is not None:
                    hook("producer", producer_id, start + len(items))
        else:
            for seq in range(count):
                payload = make_payload(producer_id, seq, payload_bytes)
                q.put((producer_id, seq, payload, zlib.crc32(payload)), timeout=_time_left(deadline, "putting"))
                if hook is not None:
                    hook("producer", producer_id, seq + 1)
    finally:
        q.close()


def _consumer(
    descriptor_json: str, consumer_id: int, ledger_path: str, batch: int, budget: float, hook: Optional[ChildHook]
) -> None:
    deadline = Deadline(budget)
    q = resolve_descriptor(descriptor_json)
    keys = array.array("Q")
    corrupt = 0
    parent = os.getppid()
    try:
        while True:
            wait = min(1.0, _time_left(deadline, "waiting for items"))
            try:
                items = q.get_many(batch, timeout=wait) if batch > 1 else [q.get(timeout=wait)]
            except queue.Empty:
                if os.getppid() != parent:  # orphaned: the parent gave up on us
                    return
                continue
            sentinels = 0
            for item in items:
                if item is None:
                    sentinels += 1  # sentinels come after every item (FIFO)
                    continue
                producer_id, seq, payload, crc = item
                if zlib.crc32(payload) != crc or payload != make_payload(producer_id, seq, len(payload)):
                    corrupt += 1
                keys.append(producer_id << SEQ_BITS | seq)
            if hook is not None:
                hook("consumer", consumer_id, len(keys))
            if sentinels:
                if sentinels > 1:  # a batch took other consumers' sentinels too: hand them back
                    q.put_many([None] * (sentinels - 1), timeout=_time_left(deadline, "handing back sentinels"))
                break
    finally:
        q.close()
        with open(ledger_path, "wb") as ledger:
            ledger.write(corrupt.to_bytes(8, "little"))
            keys.tofile(ledger)


def _read_ledger(path: str) -> tuple[int, array.array[int]]:
    keys = array.array("Q")
    with open(path, "rb") as ledger:
        corrupt = int.from_bytes(ledger.read(8), "little")
        data = ledger.read()
    keys.frombytes(data)
    return corrupt, keys


def run_stress(
    descriptor_factory: Callable[[], QueueDescriptor],
    *,
    producers: int = 4,
    consumers: int = 4,
    items_per_producer: int = 1000,
    payload_bytes: int = 32,
    batch: int = 1,
    timeout: float = 120.0,
    start_method: str = "spawn",
    child_hook: Optional[ChildHook] = None,
) -> StressResult:
    """Run one stress round on a new queue from ``descriptor_factory``; destroy it afterwards.

    ``batch > 1`` uses ``put_many``/``get_many`` of that size (the backend must declare
    ``batch``). ``timeout`` bounds the whole run: a run that does not finish in time is
    reported with every child still running and its stack. A child that exits abnormally
    stops the run at once (see the module docstring). ``child_hook``: see :data:`ChildHook`.
    """
    descriptor = descriptor_factory()
    handle = resolve_descriptor(descriptor)
    text = descriptor.to_json()
    ctx: Any = multiprocessing.get_context(start_method)
    workdir = tempfile.mkdtemp(prefix="sageq-stress-")
    ledgers = [os.path.join(workdir, f"consumer-{i}.bin") for i in range(consumers)]
    result = StressResult(producers, consumers, producers * items_per_producer, 0, 0.0)
    start = time.monotonic()
    deadline = start + timeout

    def child(role: str, index: int, target: Callable[..., None], args: tuple[Any, ...]) -> Child:
        stderr_path = os.path.join(workdir, f"{role}-{index}.stderr")
        process = ctx.Process(target=child_main, args=(stderr_path, target, args), daemon=True)
        return Child(role, index, process, stderr_path)

    consumer_children = [
        child("consumer", i, _consumer, (text, i, path, batch, timeout, child_hook)) for i, path in enumerate(ledgers)
    ]
    producer_children = [
        child("producer", i, _producer, (text, i, items_per_producer, payload_bytes, batch, timeout, child_hook))
        for i in range(producers)
    ]
    children = consumer_children + producer_children
    try:
        for c in children:
            c.process.start()
        sentinels_left = consumers
        # Supervision loop. Invariant: every wait below is at most POLL_SECONDS or until a child
        # exits, so a dead child or a passed deadline is noticed within POLL_SECONDS.
        while True:
            dead = abnormal_exits(children)
            if dead:
                result.problems.extend(death_report(c) for c in dead)
                return result
            left = deadline - time.monotonic()
            producers_done = all(c.process.exitcode == 0 for c in producer_children)
            if producers_done and sentinels_left and left > 0:
                # One sentinel per consumer, behind every item (FIFO), once every producer is done.
                try:
                    handle.put(None, timeout=min(POLL_SECONDS, left))
                    sentinels_left -= 1
                except queue.Full:
                    pass
                continue
            if all(c.process.exitcode is not None for c in children):
                break
            if left <= 0:
                stuck = f"not finished after {timeout} s (deadlock?)"
                if producers_done:
                    stuck += f"; {consumers - sentinels_left}/{consumers} sentinels put"
                result.problems.append(stuck)
                result.problems.extend(stuck_reports(children))
                return result
            wait_for_any(children, min(left, POLL_SECONDS))
        result.seconds = time.monotonic() - start
        _check(result, [_read_ledger(path) for path in ledgers], items_per_producer)
        return result
    finally:
        if not result.seconds:
            result.seconds = time.monotonic() - start
        stop_children(children)
        try:
            handle.destroy()
        except Exception:  # already destroyed or closed by the code under test: report, don't mask
            handle.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _check(result: StressResult, ledgers: list[tuple[int, array.array[int]]], per_producer: int) -> None:
    mask = (1 << SEQ_BITS) - 1
    seen: Counter[int] = Counter()
    for corrupt, keys in ledgers:
        result.corrupt += corrupt
        seen.update(keys)
        last: dict[int, int] = {}
        for key in keys:
            producer_id, seq = key >> SEQ_BITS, key & mask
            if last.get(producer_id, -1) >= seq:
                result.out_of_order += 1
            last[producer_id] = seq
    result.consumed = sum(seen.values())
    expected = {pid << SEQ_BITS | seq for pid in range(result.producers) for seq in range(per_producer)}
    result.lost = sorted((k >> SEQ_BITS, k & mask) for k in expected - seen.keys())
    result.invented = sorted((k >> SEQ_BITS, k & mask) for k in seen.keys() - expected)
    result.duplicated = sorted((k >> SEQ_BITS, k & mask) for k, n in seen.items() if n > 1)
    for name in ("lost", "invented", "duplicated"):
        items = getattr(result, name)
        if items:
            result.problems.append(f"{len(items)} items {name} (first: {items[:3]})")
    if result.corrupt:
        result.problems.append(f"{result.corrupt} corrupt items (checksum)")
    if result.out_of_order:
        result.problems.append(f"{result.out_of_order} items out of per-producer order")
