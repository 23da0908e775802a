"""Scenario 3: a job declared as stages and the queues between them; the JobManager does the rest.

    python examples/scenario3_job.py                                  # every queue "auto"
    python examples/scenario3_job.py input=sage processing=shm output=auto

numbers (a process) -> input -> square (2 processes) -> processing -> add_one (a process)
-> output -> total (a thread of this process). The manager creates the queues, gives each
worker only its own descriptors as JSON, ends every stream with end-of-stream markers,
restarts a worker that dies (policy "restart"), and destroys everything at the end, also
on Ctrl-C.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from sage_queue.job import Job, JobManager, Stage

COUNT = 1000


# Stage functions live at module level: worker processes import them by "module:name".
def numbers() -> Iterable[int]:
    return range(COUNT)


def square(items: Iterator[int]) -> Iterator[int]:
    for x in items:
        yield x * x


def add_one(items: Iterator[int]) -> Iterator[int]:
    for x in items:
        yield x + 1


def total(items: Iterator[int]) -> int:
    return sum(items)


def main(argv: list[str]) -> int:
    types = {"input": "auto", "processing": "auto", "output": "auto"}
    for arg in argv:
        name, _, queue_type = arg.partition("=")
        if name not in types or not queue_type:
            print(f"usage: {sys.argv[0]} [input|processing|output=TYPE ...]", file=sys.stderr)
            return 2
        types[name] = queue_type
    job = Job(
        queues=types,
        stages=[
            Stage("numbers", numbers, output="input", where="process"),
            Stage("square", square, input="input", output="processing", where="process", replicas=2),
            Stage("add_one", add_one, input="processing", output="output", where="process"),
            Stage("total", total, input="output", where="thread"),
        ],
        policy="restart",
        max_restarts=2,
    )
    manager = JobManager(job)
    started = time.monotonic()
    result = manager.run(timeout=120)
    for name, choice in manager.choices.items():
        print(f"queue {name:<10} {choice.queue_type:<6} {choice.reason}")
    expected = sum(x * x + 1 for x in range(COUNT))
    print(
        f"total = {result.results['total'][0]} (expected {expected}), "
        f"{len(result.exits)} workers, {result.restarts} restarts, {time.monotonic() - started:.2f} s"
    )
    return 0 if result.results["total"] == [expected] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
