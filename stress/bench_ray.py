"""Ray backends against raw ``ray.util.queue.Queue``, in one run on one Ray instance (issue 12 floors).

    python -m stress.bench_ray [--items N] [--batch B] [--rounds R]

Prints, for each of raw ``ray.util.queue.Queue``, ``ray_queue`` and ``ray_actor``: per-item
put+get round trips per second (one put then one get, from one driver thread, best of R interleaved rounds,
so that the machine's other load shows as little as possible), the ratio to raw in the same run,
and ``ray_actor``'s put_many/get_many items per second. Floors (issue 12): per-item ratio >= 1.0,
batch >= 50 000 items/s. Exit status 1 if a floor is missed.

What dominates: every per-item operation is one actor call (task submission, the actor's asyncio
loop, the reply: ~1 ms on one host); pickling a small item is microseconds. Batching amortises
the call: use put_many/get_many for throughput.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

PER_ITEM_RATIO_FLOOR = 1.0
BATCH_FLOOR = 50_000.0


def _rate(n: int, fn: Callable[[], None], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=500, help="put+get pairs per round (default 500)")
    parser.add_argument("--batch", type=int, default=1000, help="items per put_many/get_many (default 1000)")
    parser.add_argument("--batches", type=int, default=50, help="batches per round (default 50)")
    # 15: with 5 rounds of 500 on this shared 2-core machine, one lucky raw round moved the ratio by 0.2
    parser.add_argument("--rounds", type=int, default=15, help="rounds, interleaved; the best is kept (default 15)")
    args = parser.parse_args(argv)

    from ray.util.queue import Queue

    from sage_queue import QueueDescriptor, resolve_descriptor
    from sage_queue.backends._ray import ray, start_local

    # A new instance, on 127.0.0.1 only, as the library starts its own (RAY16).
    start_local(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        n = args.items
        item = {"id": 1, "payload": "x" * 64}

        raw = Queue()
        raw_actor: Any = raw.actor  # Any: ray's stubs do not know the actor's methods
        ray.get(raw_actor.qsize.remote())  # started

        def raw_pairs() -> None:
            for _ in range(n):
                raw.put(item)
                raw.get()

        handles: dict[str, Any] = {
            t: resolve_descriptor(QueueDescriptor.create(t, f"bench_{uuid.uuid4().hex[:8]}", 0))
            for t in ("ray_queue", "ray_actor")
        }

        def pairs(q: Any) -> Callable[[], None]:
            def run() -> None:
                for _ in range(n):
                    q.put(item)
                    q.get()

            return run

        runs = {"raw ray.util.queue.Queue": raw_pairs, **{t: pairs(q) for t, q in handles.items()}}
        rates = {name: 0.0 for name in runs}
        for _ in range(args.rounds):  # interleaved, so that every contender meets the same background load
            for name, fn in runs.items():
                rates[name] = max(rates[name], _rate(n, fn, 1))
        raw_rate = rates["raw ray.util.queue.Queue"]

        batch = [item] * args.batch
        actor_q = handles["ray_actor"]

        def batches() -> None:
            for _ in range(args.batches):
                actor_q.put_many(batch)
                got = 0
                while got < len(batch):
                    got += len(actor_q.get_many(len(batch)))

        batch_rate = _rate(args.batch * args.batches, batches, args.rounds)

        print(f"per-item put+get pairs/s (best of {args.rounds} x {n}), one driver thread:")
        for name, rate in rates.items():
            print(f"  {name:28s} {rate:10.0f} /s   ratio to raw {rate / raw_rate:5.2f}")
        print(f"ray_actor put_many+get_many, batches of {args.batch}: {batch_rate:10.0f} items/s")
        ok = True
        for t in handles:
            if rates[t] / raw_rate < PER_ITEM_RATIO_FLOOR:
                print(f"FLOOR MISSED: {t} per-item ratio {rates[t] / raw_rate:.2f} < {PER_ITEM_RATIO_FLOOR}")
                ok = False
        if batch_rate < BATCH_FLOOR:
            print(f"FLOOR MISSED: batch {batch_rate:.0f} items/s < {BATCH_FLOOR:.0f}")
            ok = False
        for q in handles.values():
            q.destroy()
        ray.kill(raw_actor)
        return 0 if ok else 1
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
