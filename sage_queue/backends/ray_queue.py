"""``ray_queue``: a ``ray.util.queue.Queue`` whose actor is named, so every resolve reaches it.

SAGE created a new ``ray.util.queue.Queue`` on every resolve, so nobody shared it. Here the
queue's actor is Ray's own ``_QueueActor`` (created through ``ray.util.queue.Queue`` with
``actor_options``), named ``sageq:ray_queue:<actor_name>`` in a namespace, created race-free
with ``get_if_exists``; a handle is a ``ray.util.queue.Queue`` wrapping that actor.

What the contract asks that ``ray.util.queue.Queue`` lacks, and how (spec/backends/ray.md RAY6):

* the common case first: every ``put``/``get`` first calls the actor's ``put_nowait``/``get_nowait``
  (plain methods: no ``wait_for``, no timer, no task in the actor), which succeeds whenever the
  call need not wait; on an unbounded queue a ``put`` never waits, so that is its only call;
* blocking with a timeout, and close: when the first attempt finds the queue full (empty), the
  actor's ``get(timeout)``/``put(timeout)`` are called with timeouts of at most ``_SLICE_S`` and
  repeated until the caller's deadline or close. The actor waits with ``asyncio.wait_for``, which
  never consumes an item it then abandons, so a slice that ends is harmless; the handle sees
  close() at the end of the current slice. This is long polling: an idle blocked call costs one
  actor call per _SLICE_S. ray_actor does not poll.
* items travel as ``pickle.dumps`` bytes, as in every cross-process backend: Ray's own serialiser
  would turn a ``bytearray`` into ``bytes`` (Q4) and fail inside the actor on an unpicklable item;
* ``block=False`` uses ``put_nowait``/``get_nowait`` (``wait_for`` with a zero timeout cancels
  a ready ``put`` before it runs in Python 3.11);
* destroy: a tombstone, then ``ray.kill`` (RAY8); errors: the same mapping as ray_actor;
* ``stats()`` per handle (``scope="handle"``): the items and pickled bytes this handle put and
  got, the calls of it that had to wait (their first attempt found the queue full or empty),
  the items it could not pickle or unpickle; ``depth`` is the actor's ``qsize``;
* not provided (capabilities not declared): ``batch``, ``task_done``.
"""

from __future__ import annotations

import asyncio
import pickle
import queue
import threading
import time
from typing import Any, ClassVar, Optional

from ..descriptor import QueueDescriptor
from ..errors import IncompatibleQueue, QueueClosed, QueueDestroyed, QueueNotFound
from ..protocol import CLOSE, CROSS_HOST, CROSS_PROCESS, PICKLABLE_HANDLE, STATS, QueueStats
from ..stub import QueueStub
from . import _ray
from ._ray import GetTimeoutError, QueueActorLost, RayActorError, ray

__all__ = ["RayQueueStub"]

_SLICE_S = 0.2
"""Longest single wait inside the actor: a close() is seen within this plus one round trip."""
_ANSWER_S = 10.0
"""A slice's answer should come within _SLICE_S plus a round trip; past this the actor is stuck."""


class RayQueueStub(QueueStub):
    """A handle on a named ``ray.util.queue.Queue`` (see the module docstring)."""

    queue_type: ClassVar[str] = "ray_queue"
    survives_fork: ClassVar[bool] = False  # a Ray connection does not survive os.fork (RAY11)
    capabilities: ClassVar[frozenset[str]] = frozenset({CROSS_PROCESS, CROSS_HOST, PICKLABLE_HANDLE, CLOSE, STATS})

    def __init__(self, descriptor: QueueDescriptor) -> None:
        from ray.util.queue import Queue

        super().__init__(descriptor)
        self._md = dict(descriptor.metadata)
        # This handle's counters (stats(), scope "handle"): changed only under _count_lock, since
        # threads share a handle and += is not atomic.
        self._count_lock = threading.Lock()
        self._puts = self._gets = self._bytes_in = self._bytes_out = self._waits = self._errors = 0
        _ray.connect(self.queue_type, self._md)
        maxsize = int(self._md.get("maxsize", 0))
        self._queue = Queue(maxsize, actor_options=_ray.actor_options(self.queue_type, self._md))
        queue_actor: Any = self._queue.actor  # Any: ray's stubs do not know the actor's methods
        self._actor = queue_actor
        try:
            # __ray_call__ runs a function on the actor instance: the only way to read the maxsize of
            # a queue that another process created (ray's _QueueActor has no getter for it).
            actual: int = ray.get(self._actor.__ray_call__.remote(lambda actor: actor.maxsize), timeout=60)
        except RayActorError as exc:
            raise self._died(exc) from None
        except GetTimeoutError:
            raise QueueNotFound(f"ray_queue {self._md['actor_name']!r}: its actor did not start within 60 s") from None
        if actual != maxsize:
            raise IncompatibleQueue(
                f"ray_queue {self._md['actor_name']!r} has maxsize {actual}, descriptor says {maxsize}"
            )

    def _check_open(self) -> None:
        super()._check_open()
        _ray.check_not_forked(self.queue_type, self._md["actor_name"])

    def _died(self, exc: BaseException) -> Exception:
        return _ray.died(self.queue_type, self._md, self._actor, exc)

    def _closed_error(self) -> QueueClosed:
        if self._destroyed:
            return QueueDestroyed(f"ray_queue {self._md['actor_name']!r} was destroyed")
        return QueueClosed(f"ray_queue handle {self._md['actor_name']!r} is closed")

    def _ask(self, ref: Any) -> Any:
        try:
            return ray.get(ref, timeout=_ANSWER_S)
        except RayActorError as exc:
            raise self._died(exc) from None
        except GetTimeoutError:
            raise QueueActorLost(f"the actor of ray_queue {self._md['actor_name']!r} does not answer") from None

    def _sliced(self, method: str, until: Optional[float], timed_out: type[Exception], *args: Any) -> Any:
        """Call ``method(*args, timeout=slice)`` until it succeeds, the deadline ``until`` (monotonic)
        passes or the handle closes."""
        while True:
            remaining = _SLICE_S if until is None else min(_SLICE_S, until - time.monotonic())
            if remaining > 0:
                try:
                    # timeout positional: a keyword argument costs Ray's call path more
                    return self._ask(getattr(self._actor, method).remote(*args, remaining))
                except timed_out:  # ray.util.queue's Empty/Full subclass the standard ones
                    pass
            if self._closed:
                raise self._closed_error()
            if until is not None and time.monotonic() >= until:
                raise timed_out

    # -- hooks ---------------------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._count_lock:
            for name, delta in deltas.items():
                setattr(self, f"_{name}", getattr(self, f"_{name}") + delta)

    def _put(self, item: Any, timeout: Optional[float]) -> None:
        try:
            blob = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)  # Q18: the serialiser's own error
        except Exception:
            self._count(errors=1)
            raise
        until = None if timeout is None else time.monotonic() + timeout  # the first attempt counts
        try:
            # First (and on an unbounded queue only) attempt: the actor's plain put_nowait.
            self._ask(self._actor.put_nowait.remote(blob))
        except asyncio.QueueFull:
            if timeout == 0:
                raise queue.Full from None
            self._count(waits=1)
            self._sliced("put", until, queue.Full, blob)
        self._count(puts=1, bytes_in=len(blob))

    def _get(self, timeout: Optional[float]) -> Any:
        until = None if timeout is None else time.monotonic() + timeout  # the first attempt counts
        try:
            blob = self._ask(self._actor.get_nowait.remote())
        except asyncio.QueueEmpty:
            if timeout == 0:
                raise queue.Empty from None
            self._count(waits=1)
            blob = self._sliced("get", until, queue.Empty)
        self._count(gets=1, bytes_out=len(blob))
        try:
            # An undecodable item raises its own error here, once; it is the only item lost.
            return pickle.loads(blob)
        except Exception:
            self._count(errors=1)
            raise

    def _stats(self) -> QueueStats:
        depth = self._qsize()
        with self._count_lock:
            return QueueStats(
                scope="handle",
                puts=self._puts,
                gets=self._gets,
                depth=depth,
                bytes_in=self._bytes_in,
                bytes_out=self._bytes_out,
                waits=self._waits,
                errors=self._errors,
            )

    def _qsize(self) -> int:
        n: int = self._ask(self._actor.qsize.remote())
        return n

    def _destroy(self) -> None:
        # Whether another handle destroyed it already: the actor is dead then, and the tombstone says why.
        self._ask(self._actor.qsize.remote())
        _ray.mark_destroyed(self.queue_type, self._md, self._actor)
        ray.kill(self._actor, no_restart=True)
