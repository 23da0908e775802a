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
"""

from __future__ import annotations

import array
import multiprocessing
import os
import queue
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sage_queue import QueueDescriptor, resolve_descriptor

__all__ = ["StressResult", "run_stress", "make_payload"]

SEQ_BITS = 40
"""An item key is ``producer_id << SEQ_BITS | seq`` (a compact u64 in the consumers' ledgers)."""


def make_payload(producer_id: int, seq: int, size: int) -> bytes:
    """Deterministic payload bytes for one item (different for every item)."""
    stem = f"{producer_id}:{seq}|".encode()
    return (stem * (size // len(stem) + 1))[:size]


@dataclass
class StressResult:
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

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED: " + "; ".join(self.problems)
        rate = self.consumed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.producers}x{self.consumers} processes, {self.produced} items put, {self.consumed} got "
            f"in {self.seconds:.2f} s ({rate:,.0f} items/s): {verdict}"
        )


def _producer(descriptor_json: str, producer_id: int, count: int, payload_bytes: int, batch: int) -> None:
    q = resolve_descriptor(descriptor_json)
    try:
        if batch > 1:
            for start in range(0, count, batch):
                items = []
                for seq in range(start, min(count, start + batch)):
                    payload = make_payload(producer_id, seq, payload_bytes)
                    items.append((producer_id, seq, payload, zlib.crc32(payload)))
                q.put_many(items)
        else:
            for seq in range(count):
                payload = make_payload(producer_id, seq, payload_bytes)
                q.put((producer_id, seq, payload, zlib.crc32(payload)))
    finally:
        q.close()


def _consumer(descriptor_json: str, ledger_path: str, batch: int) -> None:
    q = resolve_descriptor(descriptor_json)
    keys = array.array("Q")
    corrupt = 0
    parent = os.getppid()
    try:
        while True:
            try:
                items = q.get_many(batch, timeout=1.0) if batch > 1 else [q.get(timeout=1.0)]
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
            if sentinels:
                if sentinels > 1:  # a batch took other consumers' sentinels too: hand them back
                    q.put_many([None] * (sentinels - 1))
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


def _stop(processes: list[Any]) -> None:
    for proc in processes:
        if proc.is_alive():
            proc.kill()
    for proc in processes:
        proc.join(5)


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
) -> StressResult:
    """Run one stress round on a new queue from ``descriptor_factory``; destroy it afterwards.

    ``batch > 1`` uses ``put_many``/``get_many`` of that size (the backend must declare
    ``batch``). ``timeout`` bounds the whole run: a run that does not finish in time is
    reported as a deadlock (the children are killed).
    """
    descriptor = descriptor_factory()
    handle = resolve_descriptor(descriptor)
    text = descriptor.to_json()
    ctx: Any = multiprocessing.get_context(start_method)
    workdir = tempfile.mkdtemp(prefix="sageq-stress-")
    ledgers = [os.path.join(workdir, f"consumer-{i}.bin") for i in range(consumers)]
    consumer_procs = [ctx.Process(target=_consumer, args=(text, path, batch), daemon=True) for path in ledgers]
    producer_procs = [
        ctx.Process(target=_producer, args=(text, pid, items_per_producer, payload_bytes, batch), daemon=True)
        for pid in range(producers)
    ]
    result = StressResult(producers, consumers, producers * items_per_producer, 0, 0.0)
    start = time.monotonic()
    deadline = start + timeout
    try:
        for proc in consumer_procs + producer_procs:
            proc.start()
        for proc in producer_procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        if any(proc.is_alive() for proc in producer_procs):
            result.problems.append(f"producers still running after {timeout} s (deadlock?)")
            return result
        failed = [proc.exitcode for proc in producer_procs if proc.exitcode != 0]
        if failed:
            result.problems.append(f"producer exit codes {failed}")
        for _ in consumer_procs:
            handle.put(None, timeout=max(0.1, deadline - time.monotonic()))
        for proc in consumer_procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        result.seconds = time.monotonic() - start
        if any(proc.is_alive() for proc in consumer_procs):
            result.problems.append(f"consumers still running after {timeout} s (deadlock?)")
            return result
        failed = [proc.exitcode for proc in consumer_procs if proc.exitcode != 0]
        if failed:
            result.problems.append(f"consumer exit codes {failed}")
            return result
        _check(result, [_read_ledger(path) for path in ledgers], items_per_producer)
        return result
    except queue.Full:
        result.problems.append("could not put the sentinels in time (deadlock?)")
        return result
    finally:
        _stop(consumer_procs + producer_procs)
        try:
            handle.destroy()
        except Exception:  # already destroyed or closed by the code under test: report, don't mask
            handle.close()
        for path in ledgers:
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir(workdir)


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
