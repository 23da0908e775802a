"""Stage functions of the job tests on Ray and rpc hosts (tests/ray/test_ray_job.py,
tests/rpc/test_rpc_job.py), in a module of their own, without pytest: Ray workers, spawned worker
processes and host workers import them by ``module:name`` (tests/ray/conftest.py and the rpc tests
put this directory on their path)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

N = 200


def numbers() -> range:
    return range(N)


def slow_numbers() -> Iterator[int]:
    for i in range(N):
        time.sleep(0.01)  # paces the stream so that a test's kill lands mid-way
        yield i


def square(items: Iterator[int]) -> Iterator[int]:
    for x in items:
        yield x * x


def square_with_pid(items: Iterator[int]) -> Iterator[list[int]]:
    """[pid of this worker, x * x]: the test learns which process to kill from the stream."""
    pid = os.getpid()
    for x in items:
        yield [pid, x * x]


def collect(items: Iterator[Any]) -> list[Any]:
    return list(items)


def netns() -> str:
    """The network namespace of this process (``net:[inode]``): tells which "host" ran a stage."""
    return os.readlink("/proc/self/ns/net")


def square_where(items: Iterator[int]) -> Iterator[list[Any]]:
    here = netns()
    for x in items:
        yield [here, x * x]


def noisy_square(items: Iterator[int]) -> Iterator[int]:
    print("a stage may print: this must not corrupt the worker protocol", flush=True)
    yield from square(items)


def fail_on_3(items: Iterator[int]) -> Iterator[int]:
    for x in items:
        if x == 3:
            raise ValueError("bad item 3")
        yield x


def forever_with_pid() -> Iterator[int]:
    """A source that never ends; it writes a file named after its pid first."""
    from pathlib import Path

    (Path(os.environ["SAGE_JOB_TEST_DIR"]) / f"pid-{os.getpid()}").write_text("")
    while True:
        yield 1


def count(items: Iterator[Any]) -> int:
    return sum(1 for _ in items)
