"""``ray_actor``: a queue held by this library's own async Ray actor, one named actor per queue.

The actor (:class:`_QueueActor`) keeps the items as pickled ``bytes`` in a deque and does all
the waiting itself, on its asyncio loop: a ``get`` on an empty queue is one coroutine parked on
an :class:`asyncio.Event`, so it never stops a ``put`` from another caller (SAGE's "distributed
queue deadlock" came from a blocking ``get`` inside a synchronous actor). A handle is a thin
client: one actor call per operation (``put_many``/``get_many`` included), pickling on the
caller's side so that the actor never unpickles a user's object (Q4, Q18).

Waiting, timeouts and close, client side (spec/backends/ray.md RAY5, RAY7, RAY13)::

    every blocking call carries a key (handle id, request number), the caller's timeout and
    its expiry: the caller's deadline plus _EXPIRE_S, in the actor's clock (time.time() plus
    the handle's estimate of the actor's clock offset, _skew);
    the actor waits at most that long (from when it starts the call) and answers TIMEOUT;
    it refuses (EXPIRED, nothing done) a call that starts, or wakes, past its expiry;
    the client waits on the one ObjectRef until its own deadline, in local slices of
    _SLICE_S so that close() (any thread, or a signal handler in the waiting thread) is
    seen promptly; at its deadline or on close it sends cancel(key) and takes the actor's
    answer, which is then immediate: CANCELLED (nothing done) or the result (the call won
    the race: its item is returned, never dropped);
    no answer within _GRACE_S of that (a stopped or starved actor): the outcome is unknown,
    QueueConnectionError (QueueClosed on close); a get's late answer gives its items back.
    Since _EXPIRE_S < _GRACE_S, a call that starts in the actor after its caller gave up is
    refused: its outcome is unknown to the caller, but in fact nothing (clocks permitting).

Dead callers (RAY5): Ray does not cancel an actor call whose caller died, so a get parked by a
process that was killed would take the next item and lose it in a reply nobody reads. A handle
whose call has waited _BEAT_S sends alive(handle id) every _BEAT_S (one per handle, however many
of its calls wait); the actor drops, unexecuted (GONE), a waiter whose handle it has not heard
from for _STALE_S when the waiter wakes, before it could take anything; a live caller that gets
GONE (it was stopped, or its heartbeats were late) makes the call again with the time left.

The actor's state is changed only by coroutines on its one event-loop thread, between awaits,
so each method's check-then-act is atomic without a lock (invariant of _QueueActor).
"""

from __future__ import annotations

import itertools
import math
import pickle
import queue
import struct
import time
import uuid
from collections import deque
from typing import Any, ClassVar, Optional

from ..descriptor import QueueDescriptor
from ..errors import IncompatibleQueue, QueueClosed, QueueConnectionError, QueueDestroyed, QueueNotFound
from ..protocol import BATCH, CLOSE, CROSS_HOST, CROSS_PROCESS, PICKLABLE_HANDLE, STATS, TASK_DONE, QueueStats
from ..stub import QueueStub
from . import _ray
from ._ray import GetTimeoutError, QueueActorLost, RayActorError, ray

__all__ = ["RayActorQueueStub", "QueueActorLost"]

_SLICE_S = 0.1
"""Local wait slice of a blocked client: close() is seen within this (CLOSE_WAKEUP_S is 0.5 s)."""
_GRACE_S = 2.0
"""How long a client waits past its deadline for the actor's answer to cancel(key), then gives up
(QueueConnectionError). One round trip, ~2 ms on a quiet host; but a live actor starved of CPU answers
late: measured on 2 cores with 64 threads calling get(timeout=0.05) on one handle, the answer came
past the deadline by p50 0.03 / p99 0.10 s with no other load, p99 1.9 s with 2 busy processes and
p99 2.8 s (max 3.0 s) with 4. A shorter grace would turn such load into errors of unknown outcome;
2 s is also rpc's bound (RPC9)."""
_EXPIRE_S = 1.0
"""A call is refused by the actor when it starts (or wakes) this long past its caller's deadline:
before the caller gives up (_GRACE_S), so that an abandoned call does nothing, with 1 s left for
the error of the handle's clock-offset estimate (the same clock on one node)."""
_BEAT_S = 1.0
"""A handle with a call waiting tells the actor it is alive this often (one call per handle)."""
_STALE_S = 3.0
"""A waiter whose handle was silent this long is dropped when it wakes (three heartbeats missed: a
dead caller's get takes only items that arrive within this of its death)."""
_START_S = 60.0
"""How long resolve waits for the queue's actor to answer (a new one may need a worker process started)."""
_RESOLVE_RETRY_S = 5.0
"""How long resolve retries while the name still points at an actor that is going away."""

# Answers of the actor: the result itself when the call succeeded (never a tuple: None, a list, an int,
# a dict), else a tuple (status, payload) with one of these statuses. A success is not wrapped: every
# extra object in a reply costs Ray serialisation time on the per-item path.
_OK = "ok"
_TIMEOUT = "timeout"
_EXPIRED = "expired"  # payload: the actor's time.time(); refused, nothing done
_CANCELLED = "cancelled"
_GONE = "gone"  # dropped, nothing done: its handle was silent for _STALE_S
_DESTROYED = "destroyed"
_RESTARTED = "restarted"
_NEVER_FITS = "never_fits"
_TOO_MANY = "too_many"

_HEADER = struct.Struct("<qqqdd")
"""The bytes form of a one-item put/get: incarnation id, handle id, request number, timeout (< 0: none),
expiry (the actor's time.time(); inf: none)."""


class _QueueActor:
    """The queue itself, inside a Ray actor (async: every method runs on one asyncio loop).

    Invariant: state is read and written only by this actor's coroutines, and every
    check-then-act below has no ``await`` between the check and the act. ``_changed`` is
    set (and replaced) on every change of ``items``, ``unfinished``, ``destroyed`` or a
    cancellation; a waiter takes the current event *before* it awaits, so no wake-up is missed.
    """

    def __init__(self, maxsize: int) -> None:
        import asyncio  # noqa: F401  (the actor runs in a Ray worker; asyncio is its loop)

        self.maxsize = maxsize
        self.items: deque[bytes] = deque()
        # A new one per incarnation: a restart is visible (RAY10). An int: the smallest thing to send per call.
        self.epoch = uuid.uuid4().int >> 65
        self.destroyed = False
        self.unfinished = 0
        self.puts = self.gets = self.waits = self.bytes_in = self.bytes_out = 0
        self.waiting: dict[tuple[int, int], bool] = {}  # key -> cancelled?
        # handle id -> [loop time it was last heard from, calls of it waiting]; only handles with waiters.
        self.seen: dict[int, list[Any]] = {}
        self.dropped = 0  # waiters dropped as silent (GONE): not in stats(), for whoever inspects the actor
        self._changed: Any = None

    # -- waiting ----------------------------------------------------------------------

    def _event(self) -> Any:
        import asyncio

        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        ev, self._changed = self._changed, None
        if ev is not None:
            ev.set()

    async def _wait(self, key: tuple[int, int], ready: Any, timeout: Optional[float], expire: float) -> str:
        """Wait until ``ready()``; the status. ``expire`` (time.time(); inf: none) is checked before
        ``ready()``, at the start and at every wake-up: a call that starts or wakes past it was (or is
        about to be) abandoned by its caller, so it does nothing (EXPIRED). The actor's own deadline
        is ``timeout`` from the start, or the expiry if that is sooner."""
        import asyncio

        if self.destroyed:
            return _DESTROYED
        if time.time() > expire:
            return _EXPIRED
        if ready():
            return _OK
        if timeout is not None and timeout <= 0:
            return _TIMEOUT
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + min(timeout, expire - time.time())
        self.waits += 1
        self.waiting[key] = False
        seen = self.seen.setdefault(key[0], [0.0, 0])
        seen[0] = loop.time()  # this call is a sign of life
        seen[1] += 1
        try:
            while True:
                if self.destroyed:
                    return _DESTROYED
                if self.waiting[key]:
                    return _CANCELLED
                if time.time() > expire:  # e.g. this process was stopped while the call waited
                    return _EXPIRED
                if loop.time() - seen[0] > _STALE_S:  # its caller is dead, or stopped: take nothing
                    self.dropped += 1
                    return _GONE
                if ready():
                    return _OK
                ev = self._event()
                if end is None:
                    await ev.wait()
                    continue
                remaining = end - loop.time()
                if remaining <= 0:
                    return _TIMEOUT
                try:
                    await asyncio.wait_for(ev.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
        finally:
            del self.waiting[key]
            seen[1] -= 1
            if seen[1] == 0:
                del self.seen[key[0]]

    # -- the operations (each returns its result, or (status, payload): see _OK) --------------------

    async def hello(self) -> tuple[int, int, float, str]:
        """Incarnation, maxsize, this actor's clock and node (the client's clock-offset estimate)."""
        return self.epoch, self.maxsize, time.time(), ray.get_runtime_context().get_node_id()

    def _refused(self, status: str) -> Any:
        return (status, time.time()) if status == _EXPIRED else (status, None)

    # put/get/join take one argument: a tuple (epoch, key, argument, timeout, expire), or for one item (put, get)
    # the bytes _HEADER + pickled item, and a get of one item answers the item's bytes. Every argument
    # and every container in a call or a reply costs tens of microseconds of Ray's own handling, and
    # bytes the least: that is what puts the per-item path level with raw ray.util.queue (RAY5).

    async def put(self, request: Any) -> Any:
        if type(request) is bytes:
            epoch, handle, number, t, expire = _HEADER.unpack_from(request)
            key, blobs, timeout = (handle, number), [request[_HEADER.size :]], (None if t < 0 else t)
        else:
            epoch, key, blobs, timeout, expire = request
        if epoch != self.epoch:
            return _RESTARTED, (self.epoch, time.time())
        n = len(blobs)
        if 0 < self.maxsize < n:
            return _NEVER_FITS, None
        status = await self._wait(key, lambda: not 0 < self.maxsize < len(self.items) + n, timeout, expire)
        if status != _OK:
            return self._refused(status)
        self.items.extend(blobs)
        self.puts += n
        self.unfinished += n
        self.bytes_in += sum(map(len, blobs))
        self._notify()
        return None

    async def get(self, request: Any) -> Any:
        single = type(request) is bytes
        if single:
            epoch, handle, number, t, expire = _HEADER.unpack_from(request)
            key, max_items, timeout = (handle, number), 1, (None if t < 0 else t)
        else:
            epoch, key, max_items, timeout, expire = request
        if epoch != self.epoch:
            return _RESTARTED, (self.epoch, time.time())
        status = await self._wait(key, lambda: len(self.items) > 0, timeout, expire)
        if status != _OK:
            return self._refused(status)
        if single:
            blob = self.items.popleft()
            self.gets += 1
            self.bytes_out += len(blob)
            self._notify()
            return blob
        out = [self.items.popleft() for _ in range(min(max_items, len(self.items)))]
        self.gets += len(out)
        self.bytes_out += sum(map(len, out))
        self._notify()
        return out

    async def unget(self, blobs: list[bytes]) -> None:
        """Put items a client could not hand out back at the head (undecodable item, lost answer)."""
        if self.destroyed:
            return
        self.items.extendleft(reversed(blobs))
        self.gets -= len(blobs)
        self.bytes_out -= sum(map(len, blobs))
        self._notify()

    async def alive(self, handle: int) -> None:
        """A heartbeat of a handle with a call waiting (see _STALE_S)."""
        import asyncio

        seen = self.seen.get(handle)
        if seen is not None:
            seen[0] = asyncio.get_running_loop().time()

    async def cancel(self, key: tuple[int, int]) -> None:
        if key in self.waiting:  # not waiting: it finished already, its answer stands
            self.waiting[key] = True
            self._notify()

    async def qsize(self, epoch: int) -> Any:
        if epoch != self.epoch:
            return _RESTARTED, (self.epoch, time.time())
        return (_DESTROYED, None) if self.destroyed else len(self.items)

    async def stats(self, epoch: int) -> Any:
        if epoch != self.epoch:
            return _RESTARTED, (self.epoch, time.time())
        if self.destroyed:
            return _DESTROYED, None
        return {
            "puts": self.puts,
            "gets": self.gets,
            "depth": len(self.items),
            "waits": self.waits,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }

    async def task_done(self, epoch: int) -> Any:
        if epoch != self.epoch:
            return _RESTARTED, (self.epoch, time.time())
        if self.destroyed:
            return _DESTROYED, None
        if self.unfinished <= 0:
            return _TOO_MANY, None
        self.unfinished -= 1
        if self.unfinished == 0:
            self._notify()
        return None

    async def join(self, request: tuple[int, tuple[int, int], None, Optional[float], float]) -> Any:
        epoch, key, _, timeout, expire = request
        if epoch != self.epoch:
            return _RESTARTED, (self.epoch, time.time())
        status = await self._wait(key, lambda: self.unfinished == 0, timeout, expire)
        return None if status == _OK else self._refused(status)

    async def destroy(self) -> bool:
        """Discard the items and wake every waiter with DESTROYED; False if destroyed already."""
        if self.destroyed:
            return False
        self.destroyed = True
        self.items.clear()
        self._notify()
        return True


_remote_class: Any = None


def _actor_class() -> Any:
    global _remote_class
    if _remote_class is None:
        # max_concurrency: every blocked get/put is a parked coroutine, not a thread; the default
        # of 1000 would make the 1001st concurrent caller wait behind them (a deadlock if it is a put).
        remote: Any = ray.remote  # Any: ray's overloads do not list max_concurrency
        _remote_class = remote(max_concurrency=100_000)(_QueueActor)
    return _remote_class


class RayActorQueueStub(QueueStub):
    """A handle on a queue held by this library's named async Ray actor (see the module docstring)."""

    queue_type: ClassVar[str] = "ray_actor"
    survives_fork: ClassVar[bool] = False  # a Ray connection does not survive os.fork (RAY11)
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {CROSS_PROCESS, CROSS_HOST, PICKLABLE_HANDLE, BATCH, TASK_DONE, CLOSE, STATS}
    )
    # The metadata schema is sage_queue.metadata.BUILTIN_SCHEMAS["ray_actor"].

    def __init__(self, descriptor: QueueDescriptor) -> None:
        super().__init__(descriptor)
        self._md = dict(descriptor.metadata)
        _ray.connect(self.queue_type, self._md)
        self._descriptor = _ray.naming_the_cluster(descriptor)  # its JSON reaches this queue from anywhere (RAY1)
        self._md = dict(self._descriptor.metadata)
        self._handle_id = uuid.uuid4().int >> 65
        self._last_beat = 0.0
        self._requests = itertools.count()
        maxsize = int(self._md.get("maxsize", 0))
        opts = _ray.actor_options(self.queue_type, self._md)
        if "max_restarts" in self._md:
            opts["max_restarts"] = self._md["max_restarts"]
        end = time.monotonic() + _RESOLVE_RETRY_S
        while True:
            # get_if_exists makes creation race-free (RAY3): the GCS registers the name once, and
            # every other creator, in any process, gets the winner's actor.
            self._actor = _actor_class().options(**opts).remote(maxsize)
            try:
                self._epoch, actual, actor_time, node = ray.get(self._actor.hello.remote(), timeout=_START_S)
                # The actor's clock minus ours, for the expiry of calls (RAY13): exactly 0 on one node (one
                # clock); across nodes, estimated low by the reply's travel time (so the actor sees a
                # deadline early by that much, which _EXPIRE_S absorbs; an actor clock found ahead is
                # corrected when it refuses a call before its deadline, see _wait_call).
                self._skew = 0.0 if node == ray.get_runtime_context().get_node_id() else actor_time - time.time()
                break
            except GetTimeoutError:
                raise QueueNotFound(
                    f"ray_actor queue {self._md['actor_name']!r}: its actor did not start within {_START_S:.0f} s"
                ) from None
            except RayActorError:
                # The name pointed at an actor that is being destroyed or died: its name is
                # released once the GCS has marked it dead; then a new one is created.
                if time.monotonic() >= end:
                    raise QueueActorLost(
                        f"ray_actor queue {self._md['actor_name']!r}: its actor keeps dying at creation"
                    ) from None
                time.sleep(0.05)
        if actual != maxsize:
            raise IncompatibleQueue(
                f"ray_actor queue {self._md['actor_name']!r} has maxsize {actual}, descriptor says {maxsize}"
            )

    # -- one call to the actor ----------------------------------------------------------

    def _closed_error(self) -> QueueClosed:
        if self._destroyed:
            return QueueDestroyed(f"ray_actor queue {self._md['actor_name']!r} was destroyed")
        return QueueClosed(f"ray_actor queue handle {self._md['actor_name']!r} is closed")

    def _check_open(self) -> None:
        super()._check_open()
        _ray.check_not_forked(self.queue_type, self._md["actor_name"])

    def _died(self, exc: BaseException) -> Exception:
        return _ray.died(self.queue_type, self._md, self._actor, exc)

    def _call(self, method: str, *args: Any) -> Any:
        """A call that does not wait inside the actor; its answer's payload."""
        return self._result(self._answer(getattr(self._actor, method).remote(self._epoch, *args), method), None)

    def _answer(self, ref: Any, method: str) -> Any:
        """The answer of a call that does not wait inside the actor, taken within _GRACE_S (RAY13): a
        stopped actor makes it QueueConnectionError (a task_done may or may not have counted), not a
        hang; a close() of this handle meanwhile, QueueClosed."""
        try:
            return _ray.wait_ref(ref, time.monotonic() + _GRACE_S, self._stop, _SLICE_S)
        except GetTimeoutError:
            if self._closed:
                raise self._closed_error() from None
            raise QueueConnectionError(
                f"the Ray actor of ray_actor queue {self._md['actor_name']!r} did not answer a {method} within "
                f"{_GRACE_S:.0f} s (stopped or overloaded)"
            ) from None
        except RayActorError as exc:
            raise self._died(exc) from None

    def _result(self, answer: Any, timed_out: Optional[type[Exception]]) -> Any:
        if type(answer) is not tuple:
            return answer
        status, payload = answer
        if status == _DESTROYED:
            raise QueueDestroyed(f"ray_actor queue {self._md['actor_name']!r} was destroyed")
        if status == _RESTARTED:
            self._epoch, actor_time = payload  # once: later calls work on the new, empty queue
            # The new incarnation may run on another node, another clock: an estimate as at resolve.
            self._skew = actor_time - time.time()
            raise QueueActorLost(
                f"the Ray actor of ray_actor queue {self._md['actor_name']!r} was restarted as a new, "
                "empty incarnation; the items it held were lost"
            )
        if status == _CANCELLED and self._closed:
            raise self._closed_error()
        if status in (_TIMEOUT, _CANCELLED, _EXPIRED, _GONE) and timed_out is not None:
            raise timed_out
        if status == _NEVER_FITS:
            raise ValueError(f"a batch larger than maxsize {self.maxsize} can never fit")
        if status == _TOO_MANY:
            raise ValueError("task_done() called more times than there were items")
        raise AssertionError(f"unexpected answer {status!r} from the queue actor")  # pragma: no cover

    def _wait_call(
        self, method: str, timeout: Optional[float], timed_out: type[Exception], arg: Any, single: bool = False
    ) -> Any:
        """A call that may wait inside the actor, with the protocol of the module docstring.

        ``single``: ``arg`` is one item's bytes (put) or unused (get), sent in the bytes form.
        """
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if until is None else max(0.0, until - time.monotonic())
            answer = self._wait_answer(method, left, until, arg, single)
            if (
                type(answer) is tuple
                and answer[0] in (_EXPIRED, _GONE)
                and (until is None or time.monotonic() < until)
                and not self._closed
            ):
                # Dropped before our deadline, having done nothing: make the call again with the time left.
                # EXPIRED: the actor's clock is ahead of our estimate, which is corrected. GONE: the actor
                # heard nothing from this handle for _STALE_S (this process, or the actor, was stopped).
                if answer[0] == _EXPIRED:
                    self._skew = answer[1] - time.time()
                continue
            return self._result(answer, timed_out)

    def _wait_answer(
        self,
        method: str,
        left: Optional[float],
        until: Optional[float],
        arg: Any,
        single: bool,
    ) -> Any:
        """Make one call and take its answer (cancelling it at ``until`` or on close); see _wait_call."""
        key = (self._handle_id, next(self._requests))
        expire = math.inf if left is None else time.time() + self._skew + left + _EXPIRE_S
        if single:
            header = _HEADER.pack(self._epoch, key[0], key[1], -1.0 if left is None else left, expire)
            request: Any = header + arg if arg is not None else header
        else:
            request = (self._epoch, key, arg, left, expire)
        ref = getattr(self._actor, method).remote(request)
        try:
            try:
                while True:
                    beat = time.monotonic() + _BEAT_S
                    try:
                        return _ray.wait_ref(ref, beat if until is None else min(until, beat), self._stop, _SLICE_S)
                    except GetTimeoutError:
                        if self._closed or (until is not None and time.monotonic() >= until):
                            raise
                    self._beat()
            except GetTimeoutError:
                # Out of time, or closed: let the actor drop the call, then take its answer.
                self._actor.cancel.remote(key)
                try:
                    return ray.get(ref, timeout=_GRACE_S)
                except GetTimeoutError:
                    pass
            # No answer to the call nor to its cancel: the actor is stopped or starved. If it runs the
            # call later, it refuses it (past its expiry) unless it had started it already; a get's items
            # then come back here and go back to the head of the queue.
            if method == "get":
                self._give_back_later(ref)
            if self._closed:
                raise self._closed_error() from None
            what = "taken an item" if method == "get" else "taken effect"
            raise QueueConnectionError(
                f"the Ray actor of ray_actor queue {self._md['actor_name']!r} answered neither a {method} nor "
                f"its cancellation within {_GRACE_S:.0f} s of the call's deadline (stopped or overloaded): the "
                f"{method} may or may not have {what}"
                + ("; an item it took is put back at the head of the queue" if method == "get" else "")
            ) from None
        except RayActorError as exc:
            raise self._died(exc) from None

    def _stop(self) -> bool:
        return self._closed

    def _beat(self) -> None:
        """Tell the actor this handle lives (RAY5): at most one heartbeat per _BEAT_S per handle."""
        now = time.monotonic()
        if now - self._last_beat >= _BEAT_S:  # racy between threads: at worst a duplicate, harmless
            self._last_beat = now
            self._actor.alive.remote(self._handle_id)  # its answer is never read

    def _give_back_later(self, ref: Any) -> None:
        """An answer that came too late for its caller: items it carries go back to the head."""
        actor = self._actor

        def done(fut: Any) -> None:
            try:
                answer = fut.result()
            except Exception:  # the actor died meanwhile: nothing to give back
                return
            if type(answer) is bytes:  # an item handed out (a get's success)
                actor.unget.remote([answer])
            elif type(answer) is list and answer:
                actor.unget.remote(answer)

        ref.future().add_done_callback(done)

    # -- hooks ----------------------------------------------------------------------------

    def _put(self, item: Any, timeout: Optional[float]) -> None:
        blob = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)  # Q18: the serialiser's own error
        self._wait_call("put", timeout, queue.Full, blob, single=True)

    def _put_many(self, items: list[Any], timeout: Optional[float]) -> None:
        if 0 < self.maxsize < len(items):
            raise ValueError(f"a batch of {len(items)} items can never fit in a queue of maxsize {self.maxsize}")
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        self._wait_call("put", timeout, queue.Full, blobs)

    def _get(self, timeout: Optional[float]) -> Any:
        blob: bytes = self._wait_call("get", timeout, queue.Empty, None, single=True)
        return pickle.loads(blob)  # an undecodable item raises its own error here, once; only it is lost

    def _get_many(self, max_items: int, timeout: Optional[float]) -> list[Any]:
        blobs: list[bytes] = self._wait_call("get", timeout, queue.Empty, max_items)
        out = []
        for i, blob in enumerate(blobs):
            try:
                out.append(pickle.loads(blob))
            except Exception:
                # An undecodable item: the items before it are returned; the rest go back to the
                # head (the bad one first only if good ones are returned now), so that the bad
                # item raises exactly once and every good one is delivered (as SHM8).
                rest = blobs[i + 1 :] if i == 0 else blobs[i:]
                if rest:
                    try:
                        self._answer(self._actor.unget.remote(rest), "unget")
                    except (QueueConnectionError, QueueClosed):
                        pass  # the call is sent: the actor puts them back when it runs it
                if i == 0:
                    raise
                return out
        return out

    def _qsize(self) -> int:
        n: int = self._call("qsize")
        return n

    def _stats(self) -> QueueStats:
        s = self._call("stats")
        return QueueStats(
            scope="queue",
            puts=s["puts"],
            gets=s["gets"],
            depth=s["depth"],
            waits=s["waits"],
            bytes_in=s["bytes_in"],
            bytes_out=s["bytes_out"],
        )

    def _close(self) -> None:
        """Nothing remote: a call blocked on this handle sees ``_closed`` within _SLICE_S and cancels itself."""

    def _destroy(self) -> None:
        try:
            first = _ray.wait_ref(self._actor.destroy.remote(), time.monotonic() + _GRACE_S, lambda: False, _SLICE_S)
        except GetTimeoutError:
            # Stopped or starved (RAY13): killing it is what destroy() asks; waiters in other processes
            # then fail on the dead actor and read the tombstone (QueueDestroyed), its items go with it.
            first = True
        except RayActorError as exc:
            raise self._died(exc) from None
        if not first:
            raise QueueDestroyed(f"ray_actor queue {self._md['actor_name']!r} was destroyed")
        # The tombstone before the kill: a handle whose call fails on the dead actor reads it (RAY8).
        _ray.mark_destroyed(self.queue_type, self._md, self._actor)
        ray.kill(self._actor, no_restart=True)

    # -- task tracking (capability "task_done") ----------------------------------------------

    def task_done(self) -> None:
        """As :meth:`queue.Queue.task_done` (counted in the actor); ValueError if called too often."""
        self._check_open()
        self._call("task_done")

    def join(self) -> None:
        """As :meth:`queue.Queue.join`; QueueClosed if this handle is closed while it waits."""
        self._check_open()
        self._wait_call("join", None, QueueClosed, None)
