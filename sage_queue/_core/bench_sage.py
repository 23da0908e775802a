"""Benchmark of the ``sage`` backend against multiprocessing.Queue and faster-fifo, one run.

    .venv/bin/python sage_queue/_core/bench_sage.py [--quick]

A stand-alone driver (the shared ``stress/bench.py`` harness did not exist when this
was written): every scenario runs producer and consumer in separate processes (fork),
and every ratio is between numbers measured in this same run on this machine.
Scenarios are those of issue 5's floors:

* single-item put/get of ``("x"*64, 12345, 3.14)``, 1 producer -> 1 consumer;
* put_many/get_many of 100 of the same message;
* ping-pong round trip over two queues between two processes (p50, p99);
* 1 MiB ``bytes`` payloads, against the single-process memcpy bandwidth;
* the consumer's RSS over 10M messages (batches of 100).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

MSG = ("x" * 64, 12345, 3.14)
FORK = multiprocessing.get_context("fork")


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


# -- queue adapters: (make, put, get, put_many, get_many, close) -------------------------------


def sage_queue(capacity: int = 64 << 20) -> Any:
    from sage_queue import QueueDescriptor, resolve_descriptor

    return resolve_descriptor(
        QueueDescriptor.create_sage_queue(name=f"bench-{uuid.uuid4().hex[:10]}", capacity_bytes=capacity)
    )


def ff_queue(capacity: int = 64 << 20) -> Any:
    import faster_fifo

    return faster_fifo.Queue(max_size_bytes=capacity)


def mp_queue(capacity: int = 0) -> Any:
    return FORK.Queue()


def _reopen(q: Any) -> Any:
    # in a forked child, a sage handle is re-attached by the at-fork hook; the others are inherited
    return q


def _time_transfer(q: Any, produce: Callable[[Any], None], consume: Callable[[Any], int]) -> float:
    child = FORK.Process(target=produce, args=(q,))
    child.start()
    try:
        t0 = time.perf_counter()
        consume(q)
        elapsed = time.perf_counter() - t0
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()
    return elapsed


def bench_single(kind: str, n: int) -> float:
    q = {"sage": sage_queue, "faster-fifo": ff_queue, "mp.Queue": mp_queue}[kind]()

    def produce(q: Any) -> None:
        put = q.put
        for _ in range(n):
            put(MSG)

    def consume(q: Any) -> int:
        get = q.get
        for _ in range(n):
            get()
        return n

    try:
        return n / _time_transfer(q, produce, consume)
    finally:
        _dispose(q)


def bench_batch(kind: str, n: int, batch: int = 100) -> float:
    q = {"sage": sage_queue, "faster-fifo": ff_queue}[kind]()
    items = [MSG] * batch

    def produce(q: Any) -> None:
        for _ in range(n // batch):
            q.put_many(items)

    def consume(q: Any) -> int:
        got = 0
        if kind == "sage":
            while got < n:
                got += len(q.get_many(batch))
        else:
            while got < n:
                got += len(q.get_many(max_messages_to_get=batch))
        return got

    try:
        return n / _time_transfer(q, produce, consume)
    finally:
        _dispose(q)


def _echo(requests: Any, replies: Any, n: int) -> None:
    for _ in range(n):
        replies.put(requests.get())


def bench_pingpong(kind: str, n: int) -> tuple[float, float]:
    make = {"sage": sage_queue, "faster-fifo": ff_queue, "mp.Queue": mp_queue}[kind]
    requests, replies = make(), make()
    child = FORK.Process(target=_echo, args=(requests, replies, n + 100))
    child.start()
    samples = []
    try:
        for i in range(n + 100):
            t0 = time.perf_counter_ns()
            requests.put(MSG)
            replies.get()
            if i >= 100:  # warm-up
                samples.append(time.perf_counter_ns() - t0)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
        _dispose(requests)
        _dispose(replies)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


def memcpy_bandwidth(size: int = 1 << 20, rounds: int = 2000, span: int = 1 << 20) -> float:
    """Bytes/s of a single-process copy of `size` bytes (ctypes.memmove), best of 3.

    The destination walks through `span` bytes: span == size is the cache-hot copy of
    one buffer; a span of 64 MiB (like a ring) streams through memory.
    """
    import ctypes

    src, dst = bytearray(os.urandom(size)), bytearray(span)
    s = (ctypes.c_char * size).from_buffer(src)
    base = ctypes.addressof((ctypes.c_char * span).from_buffer(dst))
    slots = span // size
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(rounds):
            ctypes.memmove(base + (i % slots) * size, s, size)
        best = max(best, size * rounds / (time.perf_counter() - t0))
    return best


def bench_large(kind: str, n: int, size: int = 1 << 20) -> float:
    q = {"sage": lambda: sage_queue(32 << 20), "faster-fifo": lambda: ff_queue(32 << 20)}[kind]()
    payload = os.urandom(size)

    def produce(q: Any) -> None:
        for _ in range(n):
            q.put(payload)

    def consume(q: Any) -> int:
        for _ in range(n):
            q.get()
        return n

    try:
        return n * size / _time_transfer(q, produce, consume)
    finally:
        _dispose(q)


def _rss_consumer(q: Any, n: int, batch: int, conn: Any) -> None:
    got, marks = 0, []
    next_mark = n // 10
    while got < n:
        got += len(q.get_many(batch))
        if got >= next_mark:
            marks.append(_rss_kib())
            next_mark += n // 10
    conn.send(marks)


def bench_rss(n: int, batch: int = 100) -> list[int]:
    q = sage_queue(4 << 20)  # small ring: its pages are all touched within the first 10%
    parent, child_end = FORK.Pipe()
    consumer = FORK.Process(target=_rss_consumer, args=(q, n, batch, child_end))
    consumer.start()
    try:
        items = [MSG] * batch
        for _ in range(n // batch):
            q.put_many(items)
        marks: list[int] = parent.recv()
    finally:
        consumer.join(60)
        _dispose(q)
    return marks


def _dispose(q: Any) -> None:
    if hasattr(q, "destroy"):
        q.destroy()
    elif hasattr(q, "close"):
        q.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    args = ap.parse_args(argv)
    scale = 0.1 if args.quick else 1.0
    n_single = int(300_000 * scale)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, pid {os.getpid()}")
    print(f"\n== single-item put/get, 1 producer process -> 1 consumer process, {n_single} x {MSG!r}")
    single = {k: bench_single(k, n_single) for k in ("sage", "faster-fifo", "mp.Queue")}
    for k, v in single.items():
        print(f"  {k:12s} {v:12,.0f} msg/s")
    print(f"  sage / mp.Queue    = {single['sage'] / single['mp.Queue']:.2f}x   (floor 5x)")
    print(f"  sage / faster-fifo = {single['sage'] / single['faster-fifo']:.2f}x   (floor 3x)")

    n_batch = int(2_000_000 * scale)
    print(f"\n== put_many/get_many of 100, {n_batch} messages")
    batch = {k: bench_batch(k, n_batch) for k in ("sage", "faster-fifo")}
    for k, v in batch.items():
        print(f"  {k:12s} {v:12,.0f} msg/s")
    print(f"  sage / faster-fifo = {batch['sage'] / batch['faster-fifo']:.2f}x   (floor 5x)")

    n_pp = int(50_000 * scale)
    print(f"\n== ping-pong round trip (two queues, two processes), {n_pp} round trips")
    for k in ("sage", "faster-fifo", "mp.Queue"):
        p50, p99 = bench_pingpong(k, n_pp if k != "mp.Queue" else n_pp // 5)
        print(f"  {k:12s} p50 {p50:8.1f} us   p99 {p99:8.1f} us" + ("   (floor p50 <= 10 us)" if k == "sage" else ""))

    n_large = int(3000 * scale)
    bw = memcpy_bandwidth()
    bw_stream = memcpy_bandwidth(span=64 << 20)
    print(f"\n== 1 MiB bytes payloads, {n_large} payloads; single-process memcpy of 1 MiB: "
          f"{bw / 1e9:.2f} GB/s cache-hot (one buffer), {bw_stream / 1e9:.2f} GB/s streaming (64 MiB span)")
    for k in ("sage", "faster-fifo"):
        v = bench_large(k, n_large)
        extra = (f"   = {v / bw * 100:.0f}% of cache-hot memcpy (floor 40%), {v / bw_stream * 100:.0f}% of streaming"
                 if k == "sage" else "")
        print(f"  {k:12s} {v / 1e9:8.2f} GB/s{extra}")

    n_rss = int(10_000_000 * scale)
    marks = bench_rss(n_rss)
    print(f"\n== consumer RSS over {n_rss:,} messages (get_many of 100), KiB at each 10%:")
    print("  " + " ".join(str(m) for m in marks))
    print(f"  growth after the first 10%: {marks[-1] - marks[0]} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
