"""``local``: an in-process ``queue.Queue``, shared by queue_id inside one process.

State object + thin handles: the process-wide registry maps a queue_id to one
``_LocalState`` (the ``queue.Queue`` plus counters and a destroyed flag); every
handle resolved from a descriptor with that queue_id shares it. The state is held
until ``destroy()`` (or ``destroy_local_queue``) removes it: a queue, like a named
shared-memory segment, lives until it is destroyed, so items are never dropped
because the last handle happened to be garbage-collected.

Blocking uses the wrapped queue's own ``mutex``/``not_empty``/``not_full`` (the
attributes ``queue.Queue`` documents in its source) so that code using the
adopted ``queue.Queue`` directly and code using handles see one queue. Closing a
handle ``notify_all``s both conditions: waiters of other handles wake, see that
they are still open, and wait again.

A forked child inherits a copy of the registry and of every handle, not the
queues themselves (R8): its registry starts empty, and an inherited handle raises
QueueNotFound instead of silently using the child's private copy.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from ..descriptor import QueueDescriptor
from ..errors import IncompatibleQueue, InvalidMetadata, QueueClosed, QueueDestroyed, QueueNotFound
from ..protocol import BATCH, CLOSE, PICKLABLE_HANDLE, STATS, TASK_DONE, QueueStats
from ..stub import QueueStub

__all__ = ["LocalQueueStub", "live_queue_ids", "destroy_local_queue"]


@dataclass
class _LocalState:
    """One local queue. Counters and ``destroyed`` are written only under ``queue.mutex``."""

    queue: queue.Queue[Any]
    pid: int = field(default_factory=os.getpid)
    """The process the queue lives in; a forked child inherits a copy it must not use (R8)."""
    puts: int = 0
    gets: int = 0
    waits: int = 0
    destroyed: bool = False


_registry: dict[str, _LocalState] = {}
_registry_lock = threading.Lock()


def _not_here(queue_id: str, owner: int) -> QueueNotFound:
    return QueueNotFound(
        f"local queue {queue_id!r} lives in process {owner}, not in this one "
        f"({os.getpid()}): local queues are reachable only inside their own process; "
        "use shm, sage, ray_queue, ray_actor or rpc to cross processes"
    )


def _after_fork_in_child() -> None:
    # The parent's queues are not this process's (R8): forget them, and replace a lock that
    # another thread of the parent may have held at fork time (it would stay held forever).
    global _registry_lock
    _registry_lock = threading.Lock()
    _registry.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def live_queue_ids() -> list[str]:
    """The queue_ids of the local queues that exist in this process (for tests and ``ls``)."""
    with _registry_lock:
        return sorted(_registry)


def destroy_local_queue(queue_id: str) -> bool:
    """Destroy the local queue ``queue_id`` if it exists; True if it did."""
    with _registry_lock:
        state = _registry.pop(queue_id, None)
    if state is None:
        return False
    _mark_destroyed(state)
    return True


def _mark_destroyed(state: _LocalState) -> None:
    with state.queue.mutex:
        state.destroyed = True
        state.queue.not_empty.notify_all()
        state.queue.not_full.notify_all()
        state.queue.all_tasks_done.notify_all()


def _check_plain_fifo(q: Any) -> None:
    if not isinstance(q, queue.Queue):
        raise TypeError(f"a local queue must be a queue.Queue, not {type(q).__name__}")
    cls = type(q)
    if cls._get is not queue.Queue._get or cls._put is not queue.Queue._put:
        raise TypeError(f"{cls.__name__} reorders items; the local backend only adopts FIFO queue.Queue objects")


class LocalQueueStub(QueueStub):
    """A handle on an in-process queue (see the module docstring)."""

    queue_type: ClassVar[str] = "local"
    capabilities: ClassVar[frozenset[str]] = frozenset({PICKLABLE_HANDLE, BATCH, TASK_DONE, CLOSE, STATS})
    # The metadata schema is sage_queue.metadata.BUILTIN_SCHEMAS["local"]: parsing never imports this module.

    def __init__(self, descriptor: QueueDescriptor) -> None:
        super().__init__(descriptor)
        owner = descriptor.metadata["owner_pid"]
        if owner != os.getpid():
            raise _not_here(descriptor.queue_id, owner)
        maxsize = descriptor.metadata["maxsize"]
        with _registry_lock:
            state = _registry.get(descriptor.queue_id)
            if state is None:
                state = _registry[descriptor.queue_id] = _LocalState(queue.Queue(maxsize))
        if state.queue.maxsize != maxsize:
            raise IncompatibleQueue(
                f"local queue {descriptor.queue_id!r} has maxsize {state.queue.maxsize}, descriptor says {maxsize}"
            )
        self._state = state
        self._q = state.queue

    @classmethod
    def adopt(cls, q: Any, **metadata: Any) -> QueueDescriptor:
        """Register an existing ``queue.Queue`` under a new queue_id and return its descriptor."""
        _check_plain_fifo(q)
        if "owner_pid" in metadata:
            raise InvalidMetadata("owner_pid is set by adopt (this process), not by the caller")
        maxsize = metadata.pop("maxsize", q.maxsize)
        if maxsize != q.maxsize:
            raise InvalidMetadata(f"maxsize={maxsize!r} disagrees with the queue's maxsize {q.maxsize}")
        desc = QueueDescriptor.create_local_queue(maxsize=q.maxsize)
        if metadata:
            desc = QueueDescriptor(desc.queue_id, "local", {**metadata, **desc.metadata}, desc.created_timestamp)
        with _registry_lock:
            _registry[desc.queue_id] = _LocalState(q)
        return desc

    # -- waiting ------------------------------------------------------------------

    def _check_open(self) -> None:
        """The front's check before every operation, plus: QueueNotFound in a forked child.

        A forked child's inherited handle would reach a private copy of the queue. Checked
        here, before any lock is taken, since a lock held by another thread at fork time
        stays held in the child.
        """
        super()._check_open()
        if self._state.pid != os.getpid():
            raise _not_here(self._descriptor.queue_id, self._state.pid)

    def _raise_if_closed(self) -> None:
        """QueueClosed after this handle's own close(), QueueDestroyed once the queue is gone (E13).

        Called with ``queue.mutex`` held, under which ``_state.destroyed`` is written.
        """
        if self._closed and not self._destroyed:
            raise QueueClosed(f"local queue handle {self._descriptor.queue_id!r} is closed")
        if self._closed or self._state.destroyed:
            raise QueueDestroyed(f"local queue {self._descriptor.queue_id!r} was destroyed")

    def _wait_until(
        self, cond: threading.Condition, ready: Callable[[], bool], timeout: Optional[float], exc: type[Exception]
    ) -> None:
        """Wait on ``cond`` (its lock held) until ``ready()``; raise ``exc`` when the timeout runs out."""
        end = None if timeout is None else time.monotonic() + timeout
        waited = False
        while True:
            self._raise_if_closed()
            if ready():
                return
            if end is None:
                remaining = None
            else:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise exc
            if not waited:
                waited = True
                self._state.waits += 1
            cond.wait(remaining)

    # -- hooks --------------------------------------------------------------------

    def _put(self, item: Any, timeout: Optional[float]) -> None:
        q = self._q
        with q.not_full:
            self._wait_until(q.not_full, lambda: not 0 < q.maxsize <= q._qsize(), timeout, queue.Full)
            self._enqueue([item])

    def _put_many(self, items: list[Any], timeout: Optional[float]) -> None:
        q = self._q
        n = len(items)
        if 0 < q.maxsize < n:
            raise ValueError(f"a batch of {n} items can never fit in a queue of maxsize {q.maxsize}")
        with q.not_full:
            self._wait_until(q.not_full, lambda: not 0 < q.maxsize < q._qsize() + n, timeout, queue.Full)
            self._enqueue(items)

    def _enqueue(self, items: list[Any]) -> None:
        q = self._q
        for item in items:
            q._put(item)
        q.unfinished_tasks += len(items)
        self._state.puts += len(items)
        q.not_empty.notify(len(items))

    def _get(self, timeout: Optional[float]) -> Any:
        return self._dequeue(1, timeout)[0]

    def _get_many(self, max_items: int, timeout: Optional[float]) -> list[Any]:
        return self._dequeue(max_items, timeout)

    def _dequeue(self, max_items: int, timeout: Optional[float]) -> list[Any]:
        q = self._q
        with q.not_empty:
            self._wait_until(q.not_empty, lambda: q._qsize() > 0, timeout, queue.Empty)
            count = min(max_items, q._qsize())
            items = [q._get() for _ in range(count)]
            self._state.gets += count
            q.not_full.notify(count)
            return items

    def _qsize(self) -> int:
        with self._q.mutex:
            self._raise_if_closed()
            return self._q._qsize()

    def _close(self) -> None:
        if self._state.pid != os.getpid():
            return  # a forked child's copy: nobody waits on it, and its mutex may be held for ever
        with self._q.mutex:
            self._q.not_empty.notify_all()
            self._q.not_full.notify_all()
            self._q.all_tasks_done.notify_all()

    def _destroy(self) -> None:
        with self._q.mutex:
            self._raise_if_closed()  # destroyed already, through another handle (Q24)
        with _registry_lock:
            if _registry.get(self._descriptor.queue_id) is self._state:
                del _registry[self._descriptor.queue_id]
        _mark_destroyed(self._state)

    def _stats(self) -> QueueStats:
        with self._q.mutex:
            self._raise_if_closed()
            return QueueStats(
                scope="queue",
                puts=self._state.puts,
                gets=self._state.gets,
                depth=self._q._qsize(),
                waits=self._state.waits,
                # Known, not invented: nothing is serialised or framed, so no put or get can fail for
                # a reason other than Empty, Full or a closed queue (the ``errors`` of QueueStats).
                errors=0,
            )

    # -- task tracking (capability "task_done") ----------------------------------------

    def task_done(self) -> None:
        """As :meth:`queue.Queue.task_done`; ValueError if called more times than items were put."""
        self._check_open()
        with self._q.mutex:
            self._raise_if_closed()
        self._q.task_done()

    def join(self) -> None:
        """As :meth:`queue.Queue.join`: block until every item put has been marked done.

        Raises QueueClosed if this handle is closed or the queue destroyed while it waits
        (``_close`` and ``_mark_destroyed`` notify ``all_tasks_done``, which shares ``mutex``).
        """
        self._check_open()
        q = self._q
        with q.all_tasks_done:
            while True:
                self._raise_if_closed()
                if not q.unfinished_tasks:
                    return
                q.all_tasks_done.wait()
