"""The anchors as kit-style factories, for ``--backend stress.anchors:mp_queue`` (and ``:faster_fifo_queue``).

They go through the ``MODULE:ATTR`` path like any user's factory: workers are forked by
``multiprocess`` and inherit the queue object. Neither promises anything about a process
killed mid-operation, so each carries ``harness_promise = NO_PROMISE``: the checker counts
(deadlocks, lost, duplicated, corrupt) and never fails the run on them.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from .checker import NO_PROMISE

__all__ = ["mp_queue", "faster_fifo_queue"]

FASTER_FIFO_BYTES = 64 * 1024
"""faster-fifo's ring size: the harness's default ``capacity_bytes`` for our backends, so both wrap as often."""


def mp_queue(maxsize: int = 0) -> Any:
    """A ``multiprocessing.Queue`` (fork context: the harness forks its workers)."""
    return multiprocessing.get_context("fork").Queue(maxsize)


def faster_fifo_queue(maxsize: int = 0) -> Any:
    """A ``faster_fifo.Queue`` of :data:`FASTER_FIFO_BYTES` (its size is in bytes; ``maxsize`` is not used)."""
    import faster_fifo

    return faster_fifo.Queue(max_size_bytes=FASTER_FIFO_BYTES)


mp_queue.harness_promise = NO_PROMISE  # type: ignore[attr-defined]
mp_queue.harness_processes = "multiprocessing"  # type: ignore[attr-defined]  # its feeder thread is flushed at exit
faster_fifo_queue.harness_promise = NO_PROMISE  # type: ignore[attr-defined]
