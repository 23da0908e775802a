"""Well-behaved targets for the meta-tests: the ground truth, and known_failures declarations."""

from __future__ import annotations

import queue
from typing import Any

from .broken import BoolsBecomeInts


def stdlib_queue(maxsize: int) -> queue.Queue[Any]:
    """The ground truth: ``queue.Queue`` itself (which also has task_done/join)."""
    return queue.Queue(maxsize)


stdlib_queue.capabilities = frozenset({"task_done"})  # type: ignore[attr-defined]


def bools_known(maxsize: int) -> Any:
    """A broken backend that declares its bug: the kit runs that test as strict xfail."""
    return BoolsBecomeInts(maxsize)


bools_known.known_failures = {"test_item_fidelity": "bools come back as ints"}  # type: ignore[attr-defined]


def stale_known(maxsize: int) -> queue.Queue[Any]:
    """A correct queue with a stale known_failures entry: strict xfail makes the run fail."""
    return queue.Queue(maxsize)


stale_known.known_failures = {"test_item_fidelity": "was fixed long ago"}  # type: ignore[attr-defined]
