"""More stage functions of tests/ray/test_ray_job.py (per-stage args, JOB17; a process stage that
joins Ray, for the teardown's SIGTERM): Ray workers and spawned worker processes import them by
``module:name`` (this directory is on their path, conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def scale_and_tag(items: Iterator[int], factor: int, tag: Any) -> Iterator[list[Any]]:
    for x in items:
        yield [x * factor, tag, os.getpid()]


def endless_with_pid(pid_dir: str) -> Iterator[int]:
    """Writes ``pid-<its pid>`` into ``pid_dir`` (by then its queues are resolved), then never ends."""
    (Path(pid_dir) / f"pid-{os.getpid()}").write_text("")
    i = 0
    while True:
        i += 1
        yield i
