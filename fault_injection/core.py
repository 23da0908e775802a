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
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import signal
import struct
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sage_queue import QueueDescriptor, resolve_descriptor

__all__ = ["FaultResult", "run_faults"]

_ACK = struct.Struct("<Q")
_GOT = struct.Struct("<IIQI")  # producer slot, producer incarnation, seq, checksum ok (1) / corrupt (0)


@dataclass
class FaultResult:
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

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED: " + "; ".join(self.problems)
        return (
            f"{self.kills} SIGKILLs ({self.producer_kills} producers, {self.consumer_kills} consumers) in "
            f"{self.seconds:.1f} s; {self.acked} items acked, {self.got} got, {self.lost} lost "
            f"(bound {self.lost_bound}), {self.in_flight_delivered} unacked in-flight items delivered, "
            f"{self.duplicated} duplicated, {self.invented} invented, {self.corrupt} corrupt, "
            f"{self.out_of_order} out of order: {verdict}"
        )


def _payload(slot: int, incarnation: int, seq: int, size: int) -> bytes:
    stem = f"{slot}.{incarnation}.{seq}|".encode()
    return (stem * (size // len(stem) + 1))[:size]


def _log_path(workdir: str, role: str, slot: int, incarnation: int) -> str:
    return os.path.join(workdir, f"{role}-{slot}-{incarnation}.log")


def producer_main(descriptor_json: str, workdir: str, slot: int, incarnation: int, payload_bytes: int) -> None:
    """A producer incarnation: put until the stop file appears, logging each acked seq."""
    q = resolve_descriptor(descriptor_json)
    fd = os.open(_log_path(workdir, "p", slot, incarnation), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    stop = os.path.join(workdir, "stop")
    seq = 0
    while not (seq % 32 == 0 and os.path.exists(stop)):
        payload = _payload(slot, incarnation, seq, payload_bytes)
        q.put((slot, incarnation, seq, payload, zlib.crc32(payload)))
        os.write(fd, _ACK.pack(seq))
        seq += 1
    os.close(fd)
    q.close()


def consumer_main(descriptor_json: str, workdir: str, slot: int, incarnation: int, batch: int) -> None:
    """A consumer incarnation: get until a ``None`` sentinel, logging every item before the next get."""
    q = resolve_descriptor(descriptor_json)
    fd = os.open(_log_path(workdir, "c", slot, incarnation), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    parent = os.getppid()
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
        if sentinels:
            if sentinels > 1:
                q.put_many([None] * (sentinels - 1))
            break
    os.close(fd)
    q.close()


class _Worker:
    def __init__(self, role: str, slot: int) -> None:
        self.role = role
        self.slot = slot
        self.incarnation = -1
        self.process: Any = None
        self.killed: set[int] = set()


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
    seed: int = 0,
) -> FaultResult:
    """SIGKILL ``kills`` random workers (each after it started working), then drain and check.

    ``batch > 1`` makes consumers use ``get_many(batch)`` (the loss bound grows with it).
    ``drain_timeout`` bounds the end phase: a run that cannot stop its producers, deliver the
    sentinels and finish its consumers in that time is reported as a deadlock.
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
            args: tuple[Any, ...] = (text, workdir, worker.slot, worker.incarnation, payload_bytes)
            target: Callable[..., None] = producer_main
        else:
            args = (text, workdir, worker.slot, worker.incarnation, batch)
            target = consumer_main
        worker.process = ctx.Process(target=target, args=args, daemon=True)
        worker.process.start()

    try:
        for worker in workers:
            spawn(worker)
        while result.kills < kills:
            time.sleep(rng.uniform(*kill_interval))
            victim = rng.choice(workers)
            log = _log_path(workdir, victim.role, victim.slot, victim.incarnation)
            # Kill only a worker that is working (its log exists once its handle is open).
            if not os.path.exists(log) or not victim.process.is_alive():
                if victim.process.exitcode not in (None, 0):
                    code = victim.process.exitcode
                    result.problems.append(f"worker {victim.role}{victim.slot} died on its own: exit code {code}")
                    return result
                continue
            os.kill(victim.process.pid, signal.SIGKILL)
            victim.process.join(10)
            victim.killed.add(victim.incarnation)
            result.kills += 1
            if victim.role == "p":
                result.producer_kills += 1
            else:
                result.consumer_kills += 1
            spawn(victim)
        # Drain: stop producers, then one sentinel per consumer behind every item.
        end = time.monotonic() + drain_timeout
        open(os.path.join(workdir, "stop"), "wb").close()
        for worker in workers:
            if worker.role == "p":
                worker.process.join(max(0.0, end - time.monotonic()))
        if any(w.process.is_alive() for w in workers if w.role == "p"):
            result.problems.append(f"producers did not stop within {drain_timeout} s (deadlock?)")
            return result
        try:
            for _ in range(consumers):
                handle.put(None, timeout=max(0.1, end - time.monotonic()))
        except queue.Full:
            result.problems.append("could not put the sentinels (deadlock?)")
            return result
        for worker in workers:
            if worker.role == "c":
                worker.process.join(max(0.0, end - time.monotonic()))
        if any(w.process.is_alive() for w in workers if w.role == "c"):
            result.problems.append(f"consumers did not finish within {drain_timeout} s (deadlock?)")
            return result
        bad = [(w.role, w.slot, w.process.exitcode) for w in workers if w.process.exitcode != 0]
        if bad:
            result.problems.append(f"workers exited with errors: {bad}")
        result.seconds = time.monotonic() - start
        _check(result, workers, workdir, batch)
        return result
    finally:
        for worker in workers:
            if worker.process is not None and worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)
        try:
            handle.destroy()
        except Exception:
            handle.close()
        for entry in os.listdir(workdir):
            os.unlink(os.path.join(workdir, entry))
        os.rmdir(workdir)


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
