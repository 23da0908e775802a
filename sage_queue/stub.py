"""The common front of every built-in backend: argument checks, close, pickling.

A backend subclasses :class:`QueueStub` and implements a handful of hooks. The
front owns everything that must behave the same on every transport:

* ``block``/``timeout`` are validated and normalised here (:func:`normalize_timeout`)
  before any hook runs, so a bad timeout never half-performs an operation;
* ``close()`` is idempotent and thread-safe; every public operation checks the
  closed flag first and raises :class:`~sage_queue.errors.QueueClosed`;
* a handle pickles to its descriptor and unpickles by resolving it again.

Hook invariant (what a backend may assume and must guarantee)::

    _put(item, timeout)   timeout is None (wait forever) or a float >= 0 (0 = do not wait).
                          Enqueue item or raise queue.Full when the wait runs out.
                          Raise QueueClosed if the handle is closed or the queue destroyed
                          while waiting (waking within CLOSE_WAKEUP_S).  Either the item
                          is enqueued exactly once or it is not enqueued at all.
    _get(timeout)         Same timeout rules; return the oldest item or raise queue.Empty.
    _qsize()              Current depth; exact unless the class declares approximate_qsize.
    _close()              Release this handle's resources, wake this handle's waiters.
                          Called at most once, with the closed flag already set.
    _destroy()            Remove the underlying queue for everyone.  Called before _close().
    _put_many/_get_many   Optional (capability "batch"); same timeout rules as _put/_get.

Optional class attributes for tools (the demo, the kit's ``--backend TYPE``)::

    survives_fork         False when a handle (or the connection under it) is unusable in a
                          forked child (Ray): the kit then runs no test body in a forked child.


    local_service()       A context manager that starts a throw-away instance of the service
                          this backend needs (rpc: a server) and yields the metadata that a
                          descriptor needs to reach it (host, port, key_file...); it stops the
                          service on exit. Backends that need nothing (local, shm, sage) omit it.

The hooks are called without any lock held by the front: thread safety of one
handle is the backend's job, because only it knows which of its words are shared.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Optional

from ._timeout import normalize_timeout
from .descriptor import QueueDescriptor
from .errors import QueueBroken, QueueClosed, QueueDestroyed
from .metadata import BUILTIN_SCHEMAS, MetadataField
from .protocol import QueueStats
from .resolve import resolve_descriptor

__all__ = ["QueueStub", "CLOSE_WAKEUP_S"]

CLOSE_WAKEUP_S = 0.5
"""A call blocked on a handle that another thread closes raises QueueClosed within this time."""


class QueueStub:
    """Base class of the built-in handles (see the module docstring for the hook contract)."""

    queue_type: ClassVar[str] = ""
    capabilities: ClassVar[frozenset[str]] = frozenset()
    metadata_fields: ClassVar[tuple[MetadataField, ...]] = ()

    def __init__(self, descriptor: QueueDescriptor) -> None:
        self._descriptor = descriptor
        self._closed = False
        self._destroyed = False
        """Set (before ``_closed``) when this handle saw its queue destroyed: by its own destroy(),
        or by a destroy() that found the queue gone. Later calls then raise QueueDestroyed (E13)."""
        self._close_lock = threading.Lock()

    # -- metadata -----------------------------------------------------------------

    @classmethod
    def validate_metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        """Check ``metadata``; return it with defaults filled. Unknown keys are kept (D7).

        Used only when a class is registered without a schema (R4): the built-in types are
        validated by their schema in ``sage_queue.metadata`` without importing any backend.
        A subclass's own :attr:`metadata_fields` win; otherwise the schema of its
        ``queue_type``, so that a subclass of a built-in handle registered under a new
        name validates like its base. Raises InvalidMetadata.
        """
        out = dict(metadata)
        schema = BUILTIN_SCHEMAS.get(cls.queue_type)
        fields = cls.metadata_fields or (() if schema is None else schema.fields)
        for f in fields:
            f.apply(cls.queue_type, out)
        return out

    @classmethod
    def new_metadata(cls, queue_id: str, maxsize: int, metadata: dict[str, Any]) -> dict[str, Any]:
        """The metadata ``QueueDescriptor.create`` gives a new queue of a type registered with this
        class and no schema (D22): that of the built-in type this class implements, if any."""
        schema = BUILTIN_SCHEMAS.get(cls.queue_type)
        if schema is None:
            return {"maxsize": maxsize, **metadata}
        return schema.new_metadata(queue_id, maxsize, metadata)

    # -- identity -------------------------------------------------------------------

    @property
    def descriptor(self) -> QueueDescriptor:
        """The descriptor this handle was resolved from; resolving it again reaches the same queue."""
        return self._descriptor

    @property
    def maxsize(self) -> int:
        """Maximum number of items (0 = unbounded), as in ``queue.Queue.maxsize``."""
        return int(self._descriptor.metadata.get("maxsize", 0))

    @property
    def closed(self) -> bool:
        """True once :meth:`close` (or :meth:`destroy`) was called on this handle."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self._descriptor.queue_type}:{self._descriptor.queue_id!r} {state}>"

    # -- the QueueLike operations ---------------------------------------------------

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Put ``item`` into the queue, exactly like :meth:`queue.Queue.put`.

        ``block=True, timeout=None`` waits until there is room; a positive
        ``timeout`` waits at most that long then raises :class:`queue.Full`;
        ``block=False`` (or ``timeout=0``) raises ``queue.Full`` at once if full.
        A negative timeout raises ``ValueError`` before anything happens.
        """
        seconds = normalize_timeout(block, timeout)
        self._check_open()
        self._put(item, seconds)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Remove and return the oldest item, exactly like :meth:`queue.Queue.get`."""
        seconds = normalize_timeout(block, timeout)
        self._check_open()
        return self._get(seconds)

    def put_nowait(self, item: Any) -> None:
        """``put(item, block=False)``."""
        self.put(item, block=False)

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(block=False)

    def qsize(self) -> int:
        """Number of items in the queue (approximate if the backend says so)."""
        self._check_open()
        return self._qsize()

    def empty(self) -> bool:
        """``qsize() == 0``."""
        return self.qsize() == 0

    def full(self) -> bool:
        """``0 < maxsize <= qsize()``."""
        depth = self.qsize()  # first: it raises QueueClosed on a closed handle, even when maxsize is 0 (Q21)
        return 0 < self.maxsize <= depth

    # -- batch (capability "batch") ---------------------------------------------------

    def put_many(self, items: Iterable[Any], block: bool = True, timeout: Optional[float] = None) -> None:
        """Put all ``items`` atomically and contiguously, or none of them (spec Q30-Q31).

        Waits until there is room for every item; raises ``queue.Full`` if the
        wait runs out, and ``ValueError`` at once if the batch could never fit.
        """
        seconds = normalize_timeout(block, timeout)
        batch = list(items)
        self._check_open()
        if batch:
            self._put_many(batch, seconds)

    def get_many(self, max_items: int, block: bool = True, timeout: Optional[float] = None) -> list[Any]:
        """Wait for at least one item, then return up to ``max_items`` oldest items (spec Q32-Q33).

        Raises ``queue.Empty`` if nothing arrives in time; never waits for a
        second item once the first is there.
        """
        seconds = normalize_timeout(block, timeout)
        if isinstance(max_items, bool) or not isinstance(max_items, int):
            raise TypeError(f"max_items must be an int, not {type(max_items).__name__}")
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self._check_open()
        return self._get_many(max_items, seconds)

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Close this handle (idempotent). The queue itself lives on for other handles."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._close()

    def destroy(self) -> None:
        """Remove the queue itself for every handle in every process, then close this handle.

        Works on a broken queue (E15): removing it is the remedy for one.
        """
        try:
            self._check_open()
        except QueueBroken:
            pass
        try:
            self._destroy()
        except QueueDestroyed:  # destroyed already, through another handle: this one is done too
            self._destroyed = True
            self.close()
            raise
        except QueueClosed:  # this handle was closed by another thread meanwhile
            self.close()
            raise
        self._destroyed = True
        self.close()

    def stats(self) -> QueueStats:
        """A snapshot of the queue's counters (capability ``stats``)."""
        self._check_open()
        return self._stats()

    def __enter__(self) -> QueueStub:
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        # A handle travels as its descriptor: the receiver resolves it again (spec Q27).
        return (resolve_descriptor, (self._descriptor.to_dict(),))

    # -- helpers and hooks -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            if self._destroyed:  # a second destroy(), or any call after one (E13)
                raise QueueDestroyed(f"{self._descriptor.queue_type} queue {self._descriptor.queue_id!r} was destroyed")
            raise QueueClosed(f"{self._descriptor.queue_type} queue handle {self._descriptor.queue_id!r} is closed")

    def _put(self, item: Any, timeout: Optional[float]) -> None:
        raise NotImplementedError

    def _get(self, timeout: Optional[float]) -> Any:
        raise NotImplementedError

    def _qsize(self) -> int:
        raise NotImplementedError

    def _close(self) -> None:
        """Release per-handle resources; default: nothing to release."""

    def _destroy(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot destroy its queue")

    def _put_many(self, items: list[Any], timeout: Optional[float]) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no batch operations")

    def _get_many(self, max_items: int, timeout: Optional[float]) -> list[Any]:
        raise NotImplementedError(f"{type(self).__name__} has no batch operations")

    def _stats(self) -> QueueStats:
        raise NotImplementedError(f"{type(self).__name__} keeps no statistics")
