"""SIGKILL producers and consumers mid-operation; check what the survivors see.

Bookkeeping (so that every claim is checkable after the fact):

* A worker is a *slot* (producer or consumer ``0..n-1``) run by successive
  *incarnations*; a killed incarnation is replaced by the next one.
* A producer incarnation puts ``(slot, incarnation, seq, payload, crc32)`` for
  ``seq = 0, 1, ...`` and, after each ``put`` returns, appends ``seq`` to its own log
  file with one ``os.write`` (which a SIGKILL cannot tear). So an item is *acked* iff
  logged; the only item of an incarnation that may be in the queue without being acked
  is ``seq = len(acked)`` of a killed incarnation (killed between commit and log).
* A consumer incarnation appends each item it got to its own log (one ``os.write`` per
  ``get``/``get_many``) before the next ``get``. An item got but not logged is lost;
  that can only happen to a killed consumer, for at most the items of its one
  in-flight call.

Verdict: no deadlock (every phase finishes within its time), no corrupt item, no
item logged twice, nothing invented (every item got was acked, or is the in-flight
item of a killed producer), per-producer order within each consumer incarnation, and
``lost <= consumer_kills * batch``, where lost = acked but never got.

Workers start from a ``forkserver`` (fast respawns, and a child holds nothing but the
descriptor's JSON text: the server never touched the queue).

Failing fast: only the harness's own SIGKILLs are expected deaths. A worker that exits
on its own (an exception, ``os._exit``, a signal nobody sent) stops the run at once,
and the verdict names it (role, slot.incarnation, pid), its exit code or signal and the
tail of its stderr. Every wait of the drain phase is bounded by ``drain_timeout``; a
phase that does not finish in time names each worker still running, how many items it
had logged and its Python stack (see :mod:`stress.core`, whose supervision helpers
this module shares).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import shutil
import signal
import struct
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from sage_queue import QueueDescriptor, resolve_descriptor
from stress.core import (
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

__all__ = ["FaultResult", "run_faults"]

_ACK = struct.Struct("<Q")
_GOT = struct.Struct("<IIQI")  # producer slot, producer incarnation, seq, checksum ok (1) / corrupt (0)

_PUT_SLICE = 0.5
"""A producer's put waits at most this long before checking that its parent is alive and retrying."""

_SIGKILL_REAP_SECONDS = 10.0
"""How long a SIGKILLed worker may take to be reaped before the run calls it stuck (uninterruptible sleep)."""


@dataclass
class FaultResult(Verdict):
    """Verdict of one fault-injection run; ``ok`` and ``problems`` say it, the counts show it."""

    kills: int = 0
    producer_kills: int = 0
    consumer_kills: int = 0
    acked: int = 0
    got: int = 0
    lost: int = 0
    lost_bound: int = 0
    in_flight_delivered: int = 0
    duplicated: int = 0
    invented: int = 0
    corrupt: int = 0
    out_of_order: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def counts(self) -> str:
        return (
            f"{self.kills} SIGKILLs ({self.producer_kills} producers, {self.consumer_kills} consumers) in "
            f"{self.seconds:.1f} s; {self.acked} items acked, {self.got} got, {self.lost} lost "
            f"(bound {self.lost_bound}), {self.in_flight_delivered} unacked in-flight items delivered, "
            f"{self.duplicated} duplicated, {self.invented} invented, {self.corrupt} corrupt, "
            f"{self.out_of_order} out of order"
        )


def _payload(slot: int, incarnation: int, seq: int, size: int) -> bytes:
    stem = f"{slot}.{incarnation}.{seq}|".encode()
    return (stem * (size // len(stem) + 1))[:size]


def _log_path(workdir: str, role: str, slot: int, incarnation: int) -> str:
    return os.path.join(workdir, f"{role}-{slot}-{incarnation}.log")


def producer_main(
    descriptor_json: str, workdir: str, slot: int, incarnation: int, payload_bytes: int, hook: Optional[ChildHook]
) -> None:
    """A producer incarnation: put until the stop file appears, logging each acked seq."""
    q = resolve_descriptor(descriptor_json)
    fd = os.open(_log_path(workdir, "p", slot, incarnation), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    stop = os.path.join(workdir, "stop")
    parent = os.getppid()
    seq = 0
    while not (seq % 32 == 0 and os.path.exists(stop)):
        payload = _payload(slot, incarnation, seq, payload_bytes)
        # Bounded waits: a put that times out put nothing (spec), so retrying the same item is
        # exact; between tries, an orphaned producer (its parent gave up) leaves.
        while True:
            try:
                q.put((slot, incarnation, seq, payload, zlib.crc32(payload)), timeout=_PUT_SLICE)
                break
            except queue.Full:
                if os.getppid() != parent:
                    return
        os.write(fd, _ACK.pack(seq))
        seq += 1
        if hook is not None:
            hook("producer", slot, seq)
    os.close(fd)
    q.close()


def consumer_main(
    descriptor_json: str, workdir: str, slot: int, incarnation: int, batch: int, handback_timeout: float,
    hook: Optional[ChildHook],
) -> None:
    """A consumer incarnation: get until a ``None`` sentinel, logging every item before the next get."""
    q = resolve_descriptor(descriptor_json)
    fd = os.open(_log_path(workdir, "c", slot, incarnation), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    parent = os.getppid()
    done = 0
    while True:
        try:
            items = q.get_many(batch, timeout=0.5) if batch > 1 else [q.get(timeout=0.5)]
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        records = []
        sentinels = 0
        for item in items:
            if item is None:
                sentinels += 1
                continue
            p_slot, p_inc, seq, payload, crc = item
            good = zlib.crc32(payload) == crc and payload == _payload(p_slot, p_inc, seq, len(payload))
            records.append(_GOT.pack(p_slot, p_inc, seq, int(good)))
        if records:
            os.write(fd, b"".join(records))
        done += len(records)
        if hook is not None:
            hook("consumer", slot, done)
        if sentinels:
            if sentinels > 1:
                # Sentinels exist only in the drain phase, which drain_timeout bounds: so does this put.
                q.put_many([None] * (sentinels - 1), timeout=handback_timeout)
            break
    os.close(fd)
    q.close()


class _Worker:
    def __init__(self, role: str, slot: int) -> None:
        self.role = role
        self.slot = slot
        self.incarnation = -1
        self.process: Any = None
        self.stderr_path = ""
        self.killed: set[int] = set()

    def as_child(self) -> Child:
        """The current incarnation, for the shared supervision helpers."""
        role = "producer" if self.role == "p" else "consumer"
        return Child(role, self.slot, self.process, self.stderr_path, self.incarnation)


def _read(path: str, record: struct.Struct) -> list[tuple[Any, ...]]:
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    usable = len(data) - len(data) % record.size  # cannot happen (one write per record) but never misparse
    return [record.unpack_from(data, i) for i in range(0, usable, record.size)]


def run_faults(
    descriptor_factory: Callable[[], QueueDescriptor],
    *,
    producers: int = 2,
    consumers: int = 2,
    kills: int = 50,
    batch: int = 1,
    payload_bytes: int = 48,
    kill_interval: tuple[float, float] = (0.005, 0.04),
    drain_timeout: float = 60.0,
    stall_timeout: float = 30.0,
    seed: int = 0,
    worker_hook: Optional[ChildHook] = None,
) -> FaultResult:
    """SIGKILL ``kills`` random workers (each after it started working), then drain and check.

    ``batch > 1`` makes consumers use ``get_many(batch)`` (the loss bound grows with it).
    ``drain_timeout`` bounds the end phase: a run that cannot stop its producers, deliver the
    sentinels and finish its consumers in that time is reported with the workers still
    running. ``stall_timeout`` bounds the kill phase's wait for a worker ready to kill (one
    whose queue handle is open). A worker that dies on its own stops the run at once (see the
    module docstring). ``worker_hook``: see :data:`stress.core.ChildHook` (index = slot).
    """
    rng = random.Random(seed)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fault_injection.core", "sage_queue"])
    descriptor = descriptor_factory()
    handle = resolve_descriptor(descriptor)
    text = descriptor.to_json()
    workdir = tempfile.mkdtemp(prefix="sageq-faults-")
    workers = [_Worker("p", i) for i in range(producers)] + [_Worker("c", i) for i in range(consumers)]
    result = FaultResult()
    start = time.monotonic()

    def spawn(worker: _Worker) -> None:
        worker.incarnation += 1
        if worker.role == "p":
            args: tuple[Any, ...] = (text, workdir, worker.slot, worker.incarnation, payload_bytes, worker_hook)
            target: Callable[..., None] = producer_main
        else:
            args = (text, workdir, worker.slot, worker.incarnation, batch, drain_timeout, worker_hook)
            target = consumer_main
        worker.stderr_path = os.path.join(workdir, f"{worker.role}-{worker.slot}-{worker.incarnation}.stderr")
        worker.process = ctx.Process(target=child_main, args=(worker.stderr_path, target, args), daemon=True)
        worker.process.start()

    def logged(child: Child) -> str:
        role = "p" if child.role == "producer" else "c"
        record = _ACK if role == "p" else _GOT
        assert child.incarnation is not None
        return f"{len(_read(_log_path(workdir, role, child.index, child.incarnation), record))} items logged"

    def children() -> list[Child]:
        return [w.as_child() for w in workers if w.process is not None]

    def fail_if_dead(when: str) -> bool:
        # The current incarnation of every worker is never one we killed (a kill is followed by
        # a respawn at once), so any abnormal exit seen here is a death on its own.
        dead = abnormal_exits(children())
        result.problems.extend(f"{death_report(c)} ({when})" for c in dead)
        return bool(dead)

    def wait_until_exited(role: str, end: float, phase: str) -> bool:
        """Wait for every ``role`` worker to exit; False (and the verdict says why) if one failed or time ran out."""
        waited = [w for w in workers if w.role == role]
        while any(w.process.exitcode is None for w in waited):
            if fail_if_dead(phase):
                return False
            left = end - time.monotonic()
            if left <= 0:
                result.problems.append(f"{phase}: not finished within {drain_timeout} s (deadlock?)")
                result.problems.extend(stuck_reports(children(), progress=logged))
                return False
            wait_for_any(children(), min(left, POLL_SECONDS))
        return not fail_if_dead(phase)

    try:
        for worker in workers:
            spawn(worker)
        last_kill = time.monotonic()
        while result.kills < kills:
            wait_for_any(children(), rng.uniform(*kill_interval))  # wakes early if a worker exits
            if fail_if_dead("during the kill phase"):
                return result
            early = [w for w in workers if w.process.exitcode == 0]  # no worker leaves before the drain
            if early:
                result.problems.extend(f"{w.as_child().name} exited early with code 0" for w in early)
                return result
            victim = rng.choice(workers)
            log = _log_path(workdir, victim.role, victim.slot, victim.incarnation)
            # Kill only a worker that is working (its log exists once its handle is open).
            if not os.path.exists(log):
                if time.monotonic() - last_kill > stall_timeout:
                    result.problems.append(f"no worker ready to kill for {stall_timeout} s (stuck starting up?)")
                    result.problems.extend(stuck_reports(children(), progress=logged))
                    return result
                continue
            os.kill(victim.process.pid, signal.SIGKILL)
            victim.process.join(_SIGKILL_REAP_SECONDS)
            if victim.process.exitcode is None:
                result.problems.append(
                    f"{victim.as_child().name} still alive {_SIGKILL_REAP_SECONDS} s after SIGKILL"
                )
                return result
            victim.killed.add(victim.incarnation)
            result.kills += 1
            if victim.role == "p":
                result.producer_kills += 1
            else:
                result.consumer_kills += 1
            spawn(victim)
            last_kill = time.monotonic()
        # Drain: stop producers, then one sentinel per consumer behind every item.
        end = time.monotonic() + drain_timeout
        open(os.path.join(workdir, "stop"), "wb").close()
        if not wait_until_exited("p", end, "stopping the producers"):
            return result
        sentinels_put = 0
        while sentinels_put < consumers:
            if fail_if_dead("while putting the sentinels"):
                return result
            left = end - time.monotonic()
            if left <= 0:
                result.problems.append(
                    f"only {sentinels_put}/{consumers} sentinels put within {drain_timeout} s (deadlock?)"
                )
                result.problems.extend(stuck_reports(children(), progress=logged))
                return result
            try:
                handle.put(None, timeout=min(left, POLL_SECONDS))
                sentinels_put += 1
            except queue.Full:
                pass
        if not wait_until_exited("c", end, "draining the consumers"):
            return result
        result.seconds = time.monotonic() - start
        _check(result, workers, workdir, batch)
        return result
    finally:
        if not result.seconds:
            result.seconds = time.monotonic() - start
        stop_children(children())
        try:
            handle.destroy()
        except Exception:
            handle.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _check(result: FaultResult, workers: list[_Worker], workdir: str, batch: int) -> None:
    acked: dict[tuple[int, int], int] = {}  # (slot, incarnation) -> number of acked seqs (0..n-1)
    killed_producers: set[tuple[int, int]] = set()
    for worker in workers:
        if worker.role != "p":
            continue
        for inc in range(worker.incarnation + 1):
            seqs = [s for (s,) in _read(_log_path(workdir, "p", worker.slot, inc), _ACK)]
            if seqs != list(range(len(seqs))):
                result.problems.append(f"producer {worker.slot}.{inc} log is not 0..n-1")
            acked[(worker.slot, inc)] = len(seqs)
            if inc in worker.killed:
                killed_producers.add((worker.slot, inc))
    result.acked = sum(acked.values())
    got: Counter[tuple[int, int, int]] = Counter()
    for worker in workers:
        if worker.role != "c":
            continue
        for inc in range(worker.incarnation + 1):
            last: dict[tuple[int, int], int] = {}
            for p_slot, p_inc, seq, good in _read(_log_path(workdir, "c", worker.slot, inc), _GOT):
                result.corrupt += not good
                got[(p_slot, p_inc, seq)] += 1
                if last.get((p_slot, p_inc), -1) >= seq:
                    result.out_of_order += 1
                last[(p_slot, p_inc)] = seq
    result.got = sum(got.values())
    result.duplicated = sum(n - 1 for n in got.values() if n > 1)
    for p_slot, p_inc, seq in got:
        n_acked = acked.get((p_slot, p_inc))
        if n_acked is not None and seq < n_acked:
            continue
        if (p_slot, p_inc) in killed_producers and seq == n_acked:
            result.in_flight_delivered += 1  # put committed, producer killed before logging it
            continue
        result.invented += 1
    result.lost = sum(1 for key, n in acked.items() for seq in range(n) if (key[0], key[1], seq) not in got)
    result.lost_bound = result.consumer_kills * batch
    if result.corrupt:
        result.problems.append(f"{result.corrupt} corrupt items")
    if result.duplicated:
        result.problems.append(f"{result.duplicated} duplicated items")
    if result.invented:
        result.problems.append(f"{result.invented} invented items")
    if result.out_of_order:
        result.problems.append(f"{result.out_of_order} items out of per-producer order")
    if result.lost > result.lost_bound:
        result.problems.append(
            f"{result.lost} items lost, more than the {result.lost_bound} in flight of killed consumers"
        )
