"""One job across three kinds of queue: rpc, ray_actor and sage (the main job of ``sage-queue demo``).

    python examples/heterogeneous_pipeline.py            # parse on a Ray worker (a local Ray)
    python examples/heterogeneous_pipeline.py --no-ray   # parse in a process (no Ray needed)

source (a process on host "edge") -> raw -> parse (a Ray worker) -> parsed -> enrich (a process)
-> enriched -> total (a thread of this process). Every queue is "auto": the JobManager picks rpc
for the hop from another host (on a server it starts), ray_actor next to the Ray worker, sage
between two processes of this host. "edge" is this machine here (``HostSpec()`` launches the
worker locally); ``HostSpec(["ssh", "edge"], address=MY_IP)`` would make it a real second host.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from sage_queue.job import HostSpec, Job, JobManager, Stage
from sage_queue.registry import unavailable_reason

COUNT = 500
# Workers (processes, the host worker, the Ray worker) import stage functions by "module:name":
# this file's module name, and its directory on their path (set before Ray starts: its workers inherit it).
HERE, MODULE = os.path.dirname(os.path.abspath(__file__)), "heterogeneous_pipeline"
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)


def source() -> Iterator[dict[str, Any]]:
    for n in range(COUNT):
        yield {"n": n, "sent": time.monotonic()}  # one clock for every process of this host


def parse(items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        yield {**item, "square": item["n"] ** 2}


def enrich(items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        yield {**item, "label": f"#{item['n']}"}


def total(items: Iterator[dict[str, Any]]) -> dict[str, float]:
    latencies, squares = [], 0
    for item in items:
        latencies.append(time.monotonic() - item["sent"])
        squares += item["square"]
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3  # noqa: E731
    return {"items": len(latencies), "sum": squares, "p50_ms": p(0.50), "p99_ms": p(0.99)}


def main(argv: list[str]) -> int:
    use_ray = "--no-ray" not in argv and unavailable_reason("ray_actor") is None
    if use_ray:  # a local Ray, quiet (processes that join it too); else the JobManager starts one itself
        # start_local: as the library starts its own, on 127.0.0.1 only (ray.init alone would take this
        # machine's outward address); it leaves RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment,
        # which the job's processes inherit and need to join it at 127.0.0.1.
        from sage_queue.backends._ray import ray, start_local

        os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
        start_local(include_dashboard=False, log_to_driver=False, logging_level="error")
    job = Job(
        queues={"raw": "auto", "parsed": "auto", "enriched": "auto"},
        stages=[
            Stage("source", f"{MODULE}:source", output="raw", where="host:edge"),
            Stage("parse", f"{MODULE}:parse", input="raw", output="parsed", where="ray" if use_ray else "process"),
            Stage("enrich", f"{MODULE}:enrich", input="parsed", output="enriched", where="process"),
            Stage("total", total, input="enriched", where="thread"),
        ],
    )
    manager = JobManager(job, hosts={"edge": HostSpec()})
    try:
        result = manager.run(timeout=120)  # tears everything down on every exit path, Ctrl-C too
    finally:
        if use_ray:
            ray.shutdown()
    for name, choice in manager.choices.items():
        print(f"queue {name:<9} {choice.queue_type:<10} {choice.reason}")
    summary = result.results["total"][0]
    print(
        f"{summary['items']} items, sum of squares {summary['sum']}; end to end (workers' start-up included): "
        f"p50 {summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms"
    )
    return 0 if summary["items"] == COUNT and summary["sum"] == sum(n * n for n in range(COUNT)) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
