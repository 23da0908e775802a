"""The ``QueueLike`` contract, capability names and the ``stats()`` record.

The normative text is ``spec/queue-contract.md``; this module is its typed form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

__all__ = [
    "QueueLike",
    "CROSS_PROCESS",
    "CROSS_HOST",
    "PICKLABLE_HANDLE",
    "BATCH",
    "TASK_DONE",
    "CLOSE",
    "STATS",
    "APPROXIMATE_QSIZE",
    "KNOWN_CAPABILITIES",
    "QueueStats",
]


@runtime_checkable
class QueueLike(Protocol):
    """What every queue handle offers; ``queue.Queue`` itself satisfies it (spec Q1).

    Blocking and timeouts are exactly those of :class:`queue.Queue`:
    ``timeout=None`` blocks forever, a negative timeout raises ``ValueError``,
    ``block=False`` ignores ``timeout``; emptiness and fullness raise the
    standard library's :class:`queue.Empty` and :class:`queue.Full`.
    """

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None: ...

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any: ...

    def put_nowait(self, item: Any) -> None: ...

    def get_nowait(self) -> Any: ...

    def empty(self) -> bool: ...

    def full(self) -> bool: ...

    def qsize(self) -> int: ...


# Capability names (spec Q40-Q49). A backend declares the set it supports in its
# ``capabilities`` class attribute; anything not declared is not promised.
CROSS_PROCESS = "cross_process"
"""Handles resolve from the descriptor in another process on the same host (spawn, subprocess)."""
CROSS_HOST = "cross_host"
"""Handles resolve from the descriptor on another host."""
PICKLABLE_HANDLE = "picklable_handle"
"""A handle pickles to its descriptor and unpickles into a live handle where it can resolve."""
BATCH = "batch"
"""``put_many`` / ``get_many`` exist with the semantics of spec Q30-Q33."""
TASK_DONE = "task_done"
"""``task_done`` / ``join`` exist with ``queue.Queue`` semantics."""
CLOSE = "close"
"""``close()`` / ``destroy()`` / ``closed`` and the context-manager protocol (spec Q20-Q26)."""
STATS = "stats"
"""``stats()`` returns a :class:`QueueStats`."""
APPROXIMATE_QSIZE = "approximate_qsize"
"""``qsize``/``empty``/``full`` may lag concurrent operations (bounded by spec Q14)."""

KNOWN_CAPABILITIES = frozenset(
    {CROSS_PROCESS, CROSS_HOST, PICKLABLE_HANDLE, BATCH, TASK_DONE, CLOSE, STATS, APPROXIMATE_QSIZE}
)


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of one queue's counters (capability ``stats``).

    Counters are per queue (shared by every handle, in every process) where the
    backend can keep them so, else per handle: ``scope`` says which.
    A field the backend cannot know is ``None``.
    """

    scope: str
    """``"queue"`` when counters are shared by all handles of the queue, ``"handle"`` otherwise."""
    puts: int
    """Items successfully enqueued."""
    gets: int
    """Items successfully dequeued."""
    depth: int
    """Items in the queue when the snapshot was taken (approximate under concurrency)."""
    bytes_in: Optional[int] = None
    """Payload bytes enqueued (after serialisation), if the backend serialises."""
    bytes_out: Optional[int] = None
    """Payload bytes dequeued (after serialisation), if the backend serialises."""
    waits: Optional[int] = None
    """Times a put or get had to block (sleep) because the queue was full or empty."""
    abandoned: Optional[int] = None
    """Records abandoned because their writer or reader died mid-operation (items lost)."""
    capacity_bytes: Optional[int] = None
    """Size of the byte ring, for byte-capacity backends."""
    errors: Optional[int] = None
    """Operations that failed for a reason other than Empty, Full or a closed queue (an undecodable
    item, a rejected frame, a corrupt record), if the backend counts them."""
