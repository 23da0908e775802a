"""Stage functions of tests/ray/test_ray_job.py, in a module of their own: Ray workers and spawned
worker processes import them by ``module:name`` (this directory is on their path, conftest.py)."""

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


def fail_on_3(items: Iterator[int]) -> Iterator[int]:
    for x in items:
        if x == 3:
            raise ValueError("bad item 3")
        yield x
