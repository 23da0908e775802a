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

An actor that lives but does not answer (its process stopped, or starved of CPU; RAY15)::

    every answer is awaited in local slices of _LOCAL_S (ray.get with a timeout on the one
    ObjectRef: no remote call), so a close() from any thread or from a signal handler in the
    waiting thread is seen between two slices;
    a call with a deadline waits for each answer until that deadline plus _GRACE_S (a call that
    need not wait, qsize: from its start); close() shortens that to _GRACE_S from when it is seen
    (an answer that comes meanwhile is still taken: a put that landed is not reported as closed);
    no answer by then: QueueConnectionError (QueueClosed if closed), outcome unknown. Ray's actor
    takes no deadline, so an abandoned put (put_nowait or a put slice) may still land when the
    actor resumes; an abandoned get (get_nowait or a get slice) may still take an item then: the
    ObjectRef keeps a done-callback that puts such an item back at the head of the actor's
    asyncio.Queue (_give_back_later), so a get that gave up loses nothing while this process lives;
    calls with no deadline wait for their answer until close() (then _GRACE_S, as above).
"""

from __future__ import annotations

import asyncio
import pickle
import queue
import threading
import time
from typing import Any, ClassVar, Optional

from .._timeout import stalled
from ..descriptor import QueueDescriptor
from ..errors import IncompatibleQueue, QueueClosed, QueueConnectionError, QueueDestroyed, QueueNotFound
from ..protocol import CLOSE, CROSS_HOST, CROSS_PROCESS, PICKLABLE_HANDLE, STATS, QueueStats
from ..stub import QueueStub
from . import _ray
from ._ray import GetTimeoutError, RayActorError, ray

__all__ = ["RayQueueStub"]

_SLICE_S = 0.2
"""Longest single wait inside the actor: a close() is seen within this plus one round trip."""
_LOCAL_S = 0.1
"""Local wait on an answer (ray.get with this timeout): close() is seen within it, even from a signal
handler in the waiting thread, which Python runs only between two such waits."""
_GRACE_S = 2.0
"""How long past its deadline a call waits for the actor's answer, then gives up (QueueConnectionError):
ray_actor's grace (RAY13), measured there: a live actor starved of CPU on 2 cores answered late by
up to 2.8 s under load; shorter would turn load into errors of unknown outcome."""


def _unget_in_actor(blob: bytes) -> Any:
    """The function (run in ray.util.queue's actor by ``__ray_call__``) that puts a late get's item back
    at the head of the actor's ``asyncio.Queue``. Built here, not at module level, so that cloudpickle
    sends it by value: the actor's worker needs no sage_queue.

    ``__ray_call__`` runs in a thread of its own, not on the actor's event loop, so the change is made
    on the loop (``call_soon_threadsafe``) when the queue has one; ``asyncio.Queue`` binds its loop
    when a call first waits on it, so without one no getter waits and a deque append, atomic under
    the GIL, is enough (a getter that starts waiting at that very moment misses the wake-up and
    takes the item at its next slice, <= _SLICE_S later). The item goes in even when the queue is
    full (it was in the queue before the get took it): the queue then holds maxsize + 1 items for a
    while, and puts wait until gets bring it below maxsize.
    """

    def unget(actor: Any) -> None:
        q = actor.queue

        def put_back() -> None:
            q._queue.appendleft(blob)
            q._unfinished_tasks += 1
            q._finished.clear()
            q._wakeup_next(q._getters)

        loop = getattr(q, "_loop", None)
        if loop is None:
            put_back()
        else:
            loop.call_soon_threadsafe(put_back)

    return unget


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
        self._descriptor = _ray.naming_the_cluster(descriptor)  # its JSON reaches this queue from anywhere (RAY1)
        self._md = dict(self._descriptor.metadata)
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

    def _ask(self, ref: Any, until: Optional[float], method: str) -> Any:
        """The answer of one actor call, awaited until ``until`` (monotonic; None: no bound) plus
        _GRACE_S, in local slices (RAY7, RAY15); see the module docstring."""
        turn = time.monotonic()
        try:
            return ray.get(ref, timeout=_LOCAL_S)  # the common case: a live actor answers in ~1 ms
        except GetTimeoutError:
            pass
        except RayActorError as exc:
            raise self._died(exc) from None
        limit = None if until is None else until + _GRACE_S
        step = _LOCAL_S
        closed_seen = False
        while True:
            # Time this process did not run (stopped, starved) is not the actor's silence: the answer may
            # be waiting, unread. The give-up time moves by it, so a resumed call reads first (Q38).
            now = time.monotonic()
            if limit is not None:
                limit += stalled(turn, step, now)
            turn = now
            if self._closed and not closed_seen:
                closed_seen = True  # from now on the answer has _GRACE_S, however long the call had
                grace_end = now + _GRACE_S
                limit = grace_end if limit is None else min(limit, grace_end)
            step = _LOCAL_S if limit is None else min(_LOCAL_S, limit - now)
            if step <= 0:
                break
            try:
                return ray.get(ref, timeout=step)
            except GetTimeoutError:
                pass
            except RayActorError as exc:
                raise self._died(exc) from None
        # No answer in time: the actor lives (Ray would have said RayActorError) but is stopped or
        # starved. The call may still run when it resumes: a get's item then goes back to the head.
        if method.startswith("get"):
            self._give_back_later(ref)
        if self._closed:
            raise self._closed_error()
        effect = {"put": "may still be enqueued", "get": "may still take an item, which is then put back at the head"}
        raise QueueConnectionError(
            f"the Ray actor of ray_queue {self._md['actor_name']!r} did not answer a {method} within "
            f"{_GRACE_S:.0f} s of the call's deadline (stopped or overloaded): the {method} "
            + effect.get(method[:3], "was not answered")
        )

    def _give_back_later(self, ref: Any) -> None:
        """A get's answer that came too late for its caller: its item goes back to the head of the queue."""
        actor = self._actor

        def done(fut: Any) -> None:
            try:
                blob = fut.result()
            except Exception:  # Empty (it took nothing), or the actor died: nothing to give back
                return
            if type(blob) is bytes:
                actor.__ray_call__.remote(_unget_in_actor(blob))  # fire and forget: Ray runs it anyway

        ref.future().add_done_callback(done)

    def _sliced(self, method: str, until: Optional[float], timed_out: type[Exception], *args: Any) -> Any:
        """Call ``method(*args, timeout=slice)`` until it succeeds, the deadline ``until`` (monotonic)
        passes or the handle closes."""
        while True:
            remaining = _SLICE_S if until is None else min(_SLICE_S, until - time.monotonic())
            if remaining > 0:
                try:
                    # timeout positional: a keyword argument costs Ray's call path more
                    return self._ask(getattr(self._actor, method).remote(*args, remaining), until, method)
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
            self._ask(self._actor.put_nowait.remote(blob), until, "put")
        except asyncio.QueueFull:
            if timeout == 0:
                raise queue.Full from None
            self._count(waits=1)
            self._sliced("put", until, queue.Full, blob)
        self._count(puts=1, bytes_in=len(blob))

    def _get(self, timeout: Optional[float]) -> Any:
        until = None if timeout is None else time.monotonic() + timeout  # the first attempt counts
        try:
            blob = self._ask(self._actor.get_nowait.remote(), until, "get")
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
        n: int = self._ask(self._actor.qsize.remote(), time.monotonic(), "qsize")
        return n

    def _destroy(self) -> None:
        # Whether another handle destroyed it already: the actor is dead then, and the tombstone says why.
        try:
            self._ask(self._actor.qsize.remote(), time.monotonic(), "qsize")
        except QueueConnectionError:
            pass  # alive but not answering (stopped): kill it all the same, as ray_actor does (RAY13)
        _ray.mark_destroyed(self.queue_type, self._md, self._actor)
        ray.kill(self._actor, no_restart=True)
