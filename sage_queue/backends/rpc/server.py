"""``RPCQueueServer``: many named queues behind one ZeroMQ ROUTER socket (spec/backends/rpc.md).

Design: one thread runs an event loop that owns every piece of state (queues, waiters, client
records): no lock is needed because nothing else touches them (``status()`` from another thread
reads only integers, whole). The loop never blocks on a queue: a ``get`` on an empty queue (a
``put`` on a full one) becomes a *waiter* parked on the queue, answered when an item (room)
arrives or when its deadline, kept in a heap, passes. So a blocked client costs a dict entry, and
never delays another client's request.

Exactly-once: each client channel numbers its requests; the server keeps, per channel, the last
seq and the last reply until the next request (seq + 1) acknowledges it. A retransmission of the
current seq is answered from that record (or with ``pending`` while it is parked); an older seq is
a replay and is dropped. A get's items stay *held* in the record until acknowledged, so a channel
closed before it saw its reply (``cancel``) gets them put back at the head of the queue.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Optional

import zmq

from .store import Store
from .wire import (
    REPLY_MAGIC,
    REQUEST_MAGIC,
    BadFrame,
    Sealer,
    default_key_path,
    generate_key_file,
    load_key,
    msgpack_module,
)

__all__ = ["RPCQueueServer", "ServerProcess", "local_service", "main"]

log = logging.getLogger("sage_queue.rpc.server")

DEFAULT_MAX_FRAME = 64 << 20
REPLAY_WINDOW_S = 60.0
"""A request whose timestamp is further than this from the server's clock is dropped (RPC5)."""
CLIENT_EXPIRY_S = 2 * REPLAY_WINDOW_S
PARKED_SILENCE_S = 6.0
"""A parked request whose client has been silent this long (3 missed heartbeats, client.HEARTBEAT_S)
is unparked, so that no item is handed to a client that is gone; if the client was alive after all,
its next retransmission parks the request again (it had had no effect)."""
"""A client record idle this long is forgotten: any frame of it is older than the window by then."""
_TICK_S = 0.2
"""Longest poll: the loop checks its stop flag at least this often (so 5 wake-ups a second idle)."""
_TICK_MS = math.ceil(_TICK_S * 1000)
_NOBLOCK = int(zmq.NOBLOCK)
_send = zmq.backend.Socket.send
"""The socket's own send, not pyzmq's Python wrapper of it (which only adds the DRAFT routing_id and
group arguments, unused here): ~0.16 us less per call, two calls per reply."""
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_RCVTIMEO = int(zmq.RCVTIMEO)
"""Plain ints: pyzmq's enum flags cost an enum operation per use, on the path of every message."""


@dataclass(slots=True)  # slots: attribute access on the path of every request
class _Waiter:
    client: _Client
    seq: int
    op: str  # "get" | "put"
    queue: _Queue
    deadline: Optional[float]
    max_items: int = 0
    items: list[bytes] = field(default_factory=list)
    done: bool = False
    body: list[Any] = field(default_factory=list)
    """The request itself, to park it again after an unparking for silence (PARKED_SILENCE_S)."""


@dataclass(slots=True)
class _Queue:
    name: str
    uid: bytes
    maxsize: int
    items: deque[tuple[int, bytes]] = field(default_factory=deque)
    """(position, payload); positions grow at the tail, shrink at the head (durable row keys)."""
    next_pos: int = 0
    getters: deque[_Waiter] = field(default_factory=deque)
    putters: deque[_Waiter] = field(default_factory=deque)
    puts: int = 0
    gets: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    waits: int = 0

    def room(self, n: int) -> bool:
        return self.maxsize == 0 or len(self.items) + n <= self.maxsize


@dataclass(slots=True)
class _Client:
    client_id: bytes
    route: bytes = b""
    seq: int = 0
    reply: Optional[list[Any]] = None
    pending: Optional[_Waiter] = None
    held: Optional[tuple[str, bytes, list[tuple[int, bytes]]]] = None
    """A get's items (queue name, uid, items) kept until the next request acknowledges them."""
    last_seen: float = 0.0
    unparked: Optional[tuple[list[Any], Optional[float]]] = None
    """(request, deadline) of the current request, unparked for silence: executed again if retransmitted."""


class RPCQueueServer:
    """Serve named queues on ``tcp://host:port`` (port 0: any free port; see :attr:`address`).

    ``key`` (bytes, >= 32) or ``key_file``: the shared MAC key; neither: the default key file, created
    0600 if absent (:attr:`generated_key_file` then names it). ``data_dir``: durable queues in
    SQLite there. Run it with :meth:`start` (a thread of this process), :meth:`serve_forever`
    (this thread, until :meth:`stop`), :meth:`spawn` (a child process) or ``sage-queue serve``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        key: Optional[bytes] = None,
        key_file: Optional[str] = None,
        data_dir: Optional[str] = None,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.generated_key_file: Optional[str] = None
        if key is None:
            path = key_file if key_file is not None else str(default_key_path())
            if not os.path.exists(path):
                self.generated_key_file = str(generate_key_file(path)[0])
            key = load_key(key_file=path)
        self._key = key
        self._sealer = Sealer(key)  # used by the loop's thread only
        self.max_frame = max_frame
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._store = Store(data_dir) if data_dir is not None else None
        self.instance = os.urandom(16) if self._store is None else self._store.instance(os.urandom(16))
        self._queues: dict[str, _Queue] = {}
        self._clients: dict[bytes, _Client] = {}
        self._timers: list[tuple[float, int, _Waiter]] = []
        self._timer_seq = 0
        self.counters: dict[str, int] = {
            "requests": 0,
            "rejected_auth": 0,
            "rejected_malformed": 0,
            "rejected_oversized": 0,
            "rejected_replay": 0,
            "rejected_stale": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "internal_errors": 0,
        }
        if self._store is not None:
            self._load()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # libzmq drops the connection of a peer sending a message above this; between max_frame and
        # it, the loop sees the frame and counts it as oversized.
        self._sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_frame + 4096)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        try:
            if port == 0:
                port = self._sock.bind_to_random_port(f"tcp://{host}", min_port=20000, max_port=60000, max_tries=200)
            else:
                self._sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError:
            self._sock.close()
            self._ctx.term()
            if self._store is not None:
                self._store.close()
            raise
        self.address = (host, port)

    # -- running ---------------------------------------------------------------------------

    def start(self) -> RPCQueueServer:
        """Serve in a daemon thread of this process; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="sage-queue-rpc-server", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving (from any thread) and release the socket and the store; idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> RPCQueueServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self) -> dict[str, Any]:
        """Server-level counters: clients, queues, items, bytes, rejected frames (RPC15)."""
        out: dict[str, Any] = dict(self.counters)
        out["clients"] = len(self._clients)
        out["queues"] = len(self._queues)
        out["items"] = sum(len(q.items) for q in list(self._queues.values()))
        out["durable"] = self._store is not None
        return out

    def serve_forever(self, parent_pid: Optional[int] = None) -> None:
        """Run the loop in this thread until :meth:`stop` (or a signal handler calling it).

        ``parent_pid``: also stop when this process stops being our parent (a spawned server
        never outlives the process that spawned it, even one killed with SIGKILL).
        """
        # One blocking receive per wake-up (RCVTIMEO, GIL released), not a poll then a receive: on the
        # path of every request. The timeout is changed only when the next timer asks for it. After a
        # message the loop comes straight back to that receive, which returns at once if another one
        # is queued: no readiness check (getsockopt EVENTS, a poll of the socket's mailbox, ~1 us) per
        # message, and the timers get their turn between any two messages.
        sock = self._sock
        recv = sock.recv
        on_message = self._on_message
        timeout_ms = -2
        last_sweep = time.monotonic()
        try:
            while not self._stop.is_set():
                ms = _TICK_MS
                if self._timers:
                    ms = math.ceil(max(0.0, min(_TICK_S, self._timers[0][0] - time.monotonic())) * 1000)
                if ms != timeout_ms:
                    sock.setsockopt(_RCVTIMEO, ms)
                    timeout_ms = ms
                try:
                    route = recv()
                except zmq.Again:
                    route = None
                if route is not None:
                    # A ROUTER message is the peer's routing id, then at least one frame (libzmq delivers a
                    # message whole, so it is there). A client sends one frame; ``more`` (read from the
                    # message itself: cheaper than getsockopt RCVMORE) tells of any other, which is read
                    # and dropped here, so the next message's routing id is never taken for a frame.
                    frame = recv(_NOBLOCK, copy=False)
                    if frame.more:
                        self._drop_rest()
                    else:
                        try:
                            on_message(route, frame)
                        except Exception:
                            self._failed()
                if self._timers:
                    self._expire(time.monotonic())
                if time.monotonic() - last_sweep > 1.0:
                    last_sweep = time.monotonic()
                    if parent_pid is not None and os.getppid() != parent_pid:
                        log.info("parent %d is gone: stopping", parent_pid)
                        break
                    self._sweep_clients()
        finally:
            self._sock.close(0)
            self._ctx.term()
            if self._store is not None:
                self._store.close()

    # -- messages --------------------------------------------------------------------------

    def _failed(self) -> None:
        """A message raised: a bug or a store failure costs that request (no answer: the client
        retries and gives up with QueueConnectionError), never the server."""
        log.exception("request failed")
        self.counters["internal_errors"] += 1
        if self._store is not None and self._store.db.in_transaction:
            self._store.db.rollback()

    def _drop_rest(self) -> None:
        """The rest of a message of more than one frame (after the routing id): read and dropped."""
        self.counters["rejected_malformed"] += 1
        more = True
        while more:
            try:
                more = self._sock.recv(_NOBLOCK, copy=False).more
            except zmq.Again:  # cannot happen (a message is delivered whole); never a reason to stop serving
                return

    def _on_message(self, route: bytes, frame: zmq.Frame) -> None:
        try:
            client_id, seq, ts, instance, body = self._sealer.open(frame.buffer, REQUEST_MAGIC, self.max_frame)
        except BadFrame as exc:
            self.counters[f"rejected_{exc.reason}"] += 1
            return
        if abs(ts - time.time()) > REPLAY_WINDOW_S:
            self.counters["rejected_stale"] += 1
            return
        counters = self.counters
        counters["requests"] += 1
        counters["bytes_in"] += len(frame)
        op = body[0]
        if op == "hello":
            self._send(route, client_id, seq, ["ok", self.instance, self.max_frame, self._store is not None])
            return
        if instance != self.instance:
            # Not for this server instance (it restarted without its state): the client says hello
            # again and retransmits. Never executed, so replays from before a restart are harmless.
            self._send(route, client_id, seq, ["stale"])
            return
        client = self._clients.get(client_id)
        if client is None:
            client = self._clients[client_id] = _Client(client_id)
        client.last_seen = time.monotonic()
        if op == "cancel":
            # The client gave request ``seq`` up. It may retry this cancel (RPC9: until it is answered),
            # and it may arrive before the request itself (a new connection overtakes one that held it):
            # ``seq`` above the record's makes a tombstone, so the request is never executed.
            if seq >= client.seq:
                client.route = route
                self._cancel(client, seq)
                self._send(route, client_id, seq, ["ok"])
            return
        if seq < client.seq or (
            seq == client.seq and client.reply is None and client.pending is None and client.unparked is None
        ):
            self.counters["rejected_replay"] += 1
            return
        client.route = route
        if seq == client.seq:  # a retransmission
            if client.pending is not None:
                self._send(route, client_id, seq, ["pending"])
            elif client.reply is not None:
                self._send(route, client_id, seq, client.reply)
            elif client.unparked is not None:  # alive after all: park it again, with the time it has left
                again, deadline = client.unparked
                client.unparked = None
                again[4] = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._execute(client, again)
            return
        if client.pending is not None:  # a new request while the old one waits: the old one is abandoned
            self._cancel(client, client.seq)
        client.seq = seq
        client.reply = None
        client.unparked = None
        client.held = None  # acknowledged
        try:
            if self._store is not None or not self._fast(client, body):
                self._execute(client, body)
        except (ValueError, TypeError, IndexError):  # an authenticated but ill-formed request
            self.counters["rejected_malformed"] += 1
            self._finish(client, None, ["err", "value", "malformed request"])

    def _send(self, route: bytes, client_id: bytes, seq: int, body: list[Any]) -> None:
        frame = self._sealer.seal(REPLY_MAGIC, client_id, seq, time.time(), self.instance, body)
        self.counters["bytes_out"] += len(frame)
        try:
            # Two sends rather than send_multipart: the same message, less Python per reply.
            _send(self._sock, route, _SNDMORE_NOBLOCK)
            _send(self._sock, frame, _NOBLOCK)
        except zmq.ZMQError:  # the peer is gone: it will retransmit and get the stored reply
            pass

    def _finish(
        self,
        client: _Client,
        waiter: Optional[_Waiter],
        reply: list[Any],
        held: Optional[tuple[str, bytes, list[tuple[int, bytes]]]] = None,
    ) -> None:
        """Record ``reply`` as the answer to the client's current request and send it."""
        if waiter is not None:
            waiter.done = True
        client.pending = None
        client.reply = reply
        client.held = held
        self._send(client.route, client.client_id, client.seq, reply)

    # -- operations ------------------------------------------------------------------------

    def _queue(self, name: Any, uid: Any) -> Optional[_Queue]:
        q = self._queues.get(name)
        return q if q is not None and q.uid == uid else None

    def _fast(self, client: _Client, body: list[Any]) -> bool:
        """The common requests, in memory (not durable), with fewer layers than :meth:`_execute`: a put
        of one item with room and no putter parked, a get of one item with an item there and no getter
        parked. Same checks, effect, counters and reply as :meth:`_execute`, which handles every other
        case (False: nothing was done). Raises what _execute raises for an ill-formed request."""
        if len(body) != 5 and (len(body) != 6 or _late(body[5])):
            return False
        op = body[0]
        q = self._queues.get(body[1])
        if q is None or q.uid != body[2]:
            return False
        if body[4] is not None:
            _timeout(body[4])  # validated as _execute does, even when there is no need to wait
        if op == "put":
            items = body[3]
            if type(items) is not list or len(items) != 1 or q.putters:
                return False
            data = items[0]
            if type(data) is not bytes or (q.maxsize and len(q.items) >= q.maxsize):
                return False
            q.items.append((q.next_pos, data))
            q.next_pos += 1
            q.puts += 1
            q.bytes_in += len(data)
            self._finish(client, None, ["ok"])
            if q.getters:
                self._pump(q)
            return True
        if op == "get":
            if body[3] != 1 or type(body[3]) is not int or not q.items or q.getters:
                return False
            taken = q.items.popleft()
            q.gets += 1
            q.bytes_out += len(taken[1])
            self._finish(client, None, ["ok", [taken[1]]], (q.name, q.uid, [taken]))
            if q.putters:
                self._pump(q)
            return True
        return False

    def _execute(self, client: _Client, body: list[Any]) -> None:
        op, args = body[0], body[1:]
        if op == "open":
            name, maxsize, create = str(args[0]), int(args[1]), bool(args[2])
            if maxsize < 0:
                raise ValueError("maxsize < 0")
            q = self._queues.get(name)
            if q is None:
                if not create:
                    return self._commit(client, ["err", "notfound", f"no queue {name!r} on this server"])
                q = self._queues[name] = _Queue(name, os.urandom(8), maxsize)
                if self._store is not None:
                    self._store.begin()
                    self._store.create_queue(name, q.uid, maxsize)
                    return self._commit(client, ["ok", q.uid], in_txn=True)
            elif q.maxsize != maxsize:
                return self._commit(
                    client,
                    ["err", "incompatible", f"queue {name!r} has maxsize {q.maxsize}, the descriptor says {maxsize}"],
                )
            return self._commit(client, ["ok", q.uid])
        if op == "status":
            return self._commit(client, ["ok", self.status()])
        q = self._queue(args[0], args[1])
        if q is None:
            return self._commit(client, ["err", "gone", f"queue {args[0]!r} was destroyed"])
        if op == "put":
            items = args[2]
            if not isinstance(items, list) or not all(isinstance(i, bytes) for i in items) or not items:
                raise ValueError
            if 0 < q.maxsize < len(items):
                return self._commit(client, ["err", "value", f"{len(items)} items can never fit maxsize {q.maxsize}"])
            timeout = _timeout(args[3])
            left = _left(args)
            if left is not None and left <= 0:
                return self._commit(client, ["late"])
            if not q.putters and q.room(len(items)):
                self._do_put(client, None, q, items)
                return self._pump(q)
            if timeout == 0:
                return self._commit(client, ["full"])
            deadline = _deadline(timeout, left)
            self._park(_Waiter(client, client.seq, "put", q, deadline, items=items, body=body), q.putters)
        elif op == "get":
            max_items = int(args[2])
            if max_items < 1:
                raise ValueError
            timeout = _timeout(args[3])
            left = _left(args)
            if left is not None and left <= 0:
                return self._commit(client, ["late"])
            if q.items and not q.getters:
                self._do_get(client, None, q, max_items)
                return self._pump(q)
            if timeout == 0:
                return self._commit(client, ["empty"])
            self._park(
                _Waiter(client, client.seq, "get", q, _deadline(timeout, left), max_items=max_items, body=body),
                q.getters,
            )
        elif op == "unget":  # items a client could not decode after them: back to the head (Q34)
            items = args[2]
            if not isinstance(items, list) or not all(isinstance(i, bytes) for i in items):
                raise ValueError
            if self._store is not None:
                self._store.begin()
            self._requeue(q, items)
            q.gets -= len(items)
            self._commit(client, ["ok"], in_txn=self._store is not None)
            self._pump(q)
        elif op == "qsize":
            self._commit(client, ["ok", len(q.items)])
        elif op == "stats":
            self._commit(client, ["ok", q.puts, q.gets, len(q.items), q.bytes_in, q.bytes_out, q.waits])
        elif op == "destroy":
            del self._queues[q.name]
            if self._store is not None:
                self._store.begin()
                self._store.drop_queue(q.name)
            for w in list(q.getters) + list(q.putters):
                if not w.done:
                    self._finish(w.client, w, ["err", "gone", f"queue {q.name!r} was destroyed"])
            self._commit(client, ["ok"], in_txn=self._store is not None)
        else:
            raise ValueError

    def _commit(
        self,
        client: _Client,
        reply: list[Any],
        in_txn: bool = False,
        held: Optional[tuple[str, bytes, list[tuple[int, bytes]]]] = None,
        waiter: Optional[_Waiter] = None,
    ) -> None:
        """Persist the client's record (with any mutation already in the open transaction), then reply."""
        if self._store is not None:
            msgpack = msgpack_module()
            if not in_txn:
                self._store.begin()
            self._store.client(
                client.client_id,
                client.seq,
                msgpack.packb(reply, use_bin_type=True),
                None if held is None else held[0],
                None if held is None else msgpack.packb([held[1], held[2]], use_bin_type=True),
            )
            self._store.commit()
        self._finish(client, waiter, reply, held)

    def _park(self, waiter: _Waiter, line: deque[_Waiter]) -> None:
        waiter.queue.waits += 1
        line.append(waiter)
        waiter.client.pending = waiter
        if waiter.deadline is not None:
            self._timer_seq += 1
            heapq.heappush(self._timers, (waiter.deadline, self._timer_seq, waiter))

    def _do_put(self, client: _Client, waiter: Optional[_Waiter], q: _Queue, items: list[bytes]) -> None:
        added = []
        for data in items:
            added.append((q.next_pos, data))
            q.next_pos += 1
        q.items.extend(added)
        q.puts += len(items)
        q.bytes_in += sum(len(d) for d in items)
        if self._store is not None:
            self._store.begin()
            self._store.add_items(q.name, added)
            self._store.counters(q.name, q.puts, q.gets, q.bytes_in, q.bytes_out)
        self._commit(client, ["ok"], in_txn=self._store is not None, waiter=waiter)

    def _do_get(self, client: _Client, waiter: Optional[_Waiter], q: _Queue, max_items: int) -> None:
        taken = [q.items.popleft() for _ in range(min(max_items, len(q.items)))]
        q.gets += len(taken)
        q.bytes_out += sum(len(d) for _, d in taken)
        if self._store is not None:
            self._store.begin()
            self._store.remove_items(q.name, [p for p, _ in taken])
            self._store.counters(q.name, q.puts, q.gets, q.bytes_in, q.bytes_out)
        self._commit(
            client,
            ["ok", [d for _, d in taken]],
            in_txn=self._store is not None,
            held=(q.name, q.uid, taken),
            waiter=waiter,
        )

    def _pump(self, q: _Queue) -> None:
        """Answer parked waiters of ``q`` while they can proceed (a loop, not a recursion)."""
        progress = True
        while progress and self._queues.get(q.name) is q:
            progress = False
            while q.getters and q.items:
                w = q.getters.popleft()
                if not w.done:
                    self._do_get(w.client, w, q, w.max_items)
                    progress = True
            # FIFO: the head putter goes first even if a smaller batch behind it would fit (no starvation).
            while q.putters:
                w = q.putters[0]
                if w.done:
                    q.putters.popleft()
                    continue
                if not q.room(len(w.items)):
                    break
                q.putters.popleft()
                self._do_put(w.client, w, q, w.items)
                progress = True

    def _expire(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, w = heapq.heappop(self._timers)
            if w.done:
                continue
            self._remove_waiter(w)
            self._commit(w.client, ["empty" if w.op == "get" else "full"], waiter=w)
            if w.op == "put":  # a smaller batch behind a timed-out big one may fit now
                self._pump(w.queue)

    def _remove_waiter(self, w: _Waiter) -> None:
        w.done = True
        line = w.queue.getters if w.op == "get" else w.queue.putters
        try:
            line.remove(w)
        except ValueError:
            pass
        if w.client.pending is w:
            w.client.pending = None

    def _cancel(self, client: _Client, seq: int) -> None:
        """The client gave request ``seq`` up (its call raised QueueConnectionError, or its handle was
        closed): unpark it, or put a get's items back at the head; afterwards the record answers the
        request "cancelled", so a copy of it still in the network never executes (RPC9, RPC12)."""
        w = client.pending
        if w is not None:
            self._remove_waiter(w)
            if w.op == "put":  # a smaller batch behind it may fit now
                self._pump(w.queue)
        if seq > client.seq:
            # The request has not arrived (held in the network, or lost): a tombstone. The client sent it
            # only after the answer to seq - 1 arrived, which this therefore acknowledges.
            client.seq = seq
            client.held = None
            client.reply = None
        held, client.held = client.held, None
        q = None if held is None else self._queue(held[0], held[1])
        if client.reply is None or held is not None or w is not None:
            client.reply = ["cancelled"]
        client.unparked = None
        if self._store is not None:
            self._store.begin()
        if held is not None and q is not None:
            taken = held[2]
            self._return(q, taken)
            q.gets -= len(taken)
            q.bytes_out -= sum(len(d) for _, d in taken)
            if self._store is not None:
                self._store.counters(q.name, q.puts, q.gets, q.bytes_in, q.bytes_out)
        if self._store is not None:
            reply = None if client.reply is None else msgpack_module().packb(client.reply, use_bin_type=True)
            self._store.client(client.client_id, client.seq, reply, None, None)
            self._store.commit()
        if q is not None:
            self._pump(q)

    def _return(self, q: _Queue, taken: list[tuple[int, bytes]]) -> None:
        """Put a cancelled get's items back where they were: before every item put after them (inside
        the caller's open transaction, if durable). Not simply at the head: two abandoned gets whose
        cancels arrive in the other order must not swap their items (Q3).

        Invariant: ``q.items`` is in ascending position order (puts append above every position, put-backs
        go below the head). The returned items are merged, by their original positions, with the prefix
        of the queue below the largest of them, and that merged run is renumbered just below the first
        item above it, so positions stay unique (a put-back may have reused one)."""
        top = max(p for p, _ in taken)
        prefix: list[tuple[int, bytes]] = []
        while q.items and q.items[0][0] <= top:
            prefix.append(q.items.popleft())
        merged = sorted(taken + prefix, key=lambda item: item[0])
        above = q.items[0][0] if q.items else q.next_pos
        back = [(above - len(merged) + i, d) for i, (_, d) in enumerate(merged)]
        q.items.extendleft(reversed(back))
        if self._store is not None:
            self._store.remove_items(q.name, [p for p, _ in prefix])
            self._store.add_items(q.name, back)

    def _requeue(self, q: _Queue, items: list[bytes]) -> None:
        """Put ``items`` back at the head of ``q`` (inside the caller's open transaction, if durable)."""
        head = q.items[0][0] if q.items else q.next_pos
        back = [(head - len(items) + i, d) for i, d in enumerate(items)]
        q.items.extendleft(reversed(back))
        if self._store is not None:
            self._store.add_items(q.name, back)

    def _sweep_clients(self) -> None:
        now = time.monotonic()
        for c in list(self._clients.values()):
            w = c.pending
            if w is not None and now - c.last_seen > PARKED_SILENCE_S:
                self._remove_waiter(w)
                c.unparked = (w.body, w.deadline)
                if w.op == "put":
                    self._pump(w.queue)
        old = [c for c in self._clients.values() if c.pending is None and now - c.last_seen > CLIENT_EXPIRY_S]
        for c in old:
            del self._clients[c.client_id]
        if old and self._store is not None:
            self._store.begin()
            self._store.forget_clients([c.client_id for c in old])
            self._store.commit()

    def _load(self) -> None:
        msgpack = msgpack_module()
        assert self._store is not None
        for name, uid, maxsize, puts, gets, b_in, b_out, items in self._store.load_queues():
            q = _Queue(
                name,
                uid,
                maxsize,
                deque(items),
                (items[-1][0] + 1) if items else 0,
                puts=puts,
                gets=gets,
                bytes_in=b_in,
                bytes_out=b_out,
            )
            self._queues[name] = q
        now = time.monotonic()
        for client_id, seq, reply, held, held_items in self._store.load_clients():
            c = _Client(client_id, seq=seq, last_seen=now)
            c.reply = None if reply is None else msgpack.unpackb(reply, raw=False)
            if held is not None and held_items is not None:
                uid, taken = msgpack.unpackb(held_items, raw=False)
                c.held = (held, uid, [(int(p), bytes(d)) for p, d in taken])
            self._clients[client_id] = c

    # -- a child process -------------------------------------------------------------------

    @classmethod
    def spawn(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        key_file: str,
        data_dir: Optional[str] = None,
        max_frame: Optional[int] = None,
        timeout: float = 20.0,
    ) -> ServerProcess:
        """Start ``sage-queue serve`` in a child process; returns once it listens."""
        cmd = [
            sys.executable,
            "-m",
            "sage_queue.backends.rpc.server",
            "--host",
            host,
            "--port",
            str(port),
            "--key-file",
            key_file,
            "--exit-with-parent",
            str(os.getpid()),
        ]
        if data_dir is not None:
            cmd += ["--data-dir", data_dir]
        if max_frame is not None:
            cmd += ["--max-frame", str(max_frame)]
        return ServerProcess(cmd, timeout)


class ServerProcess:
    """A server in a child process: ``address``, ``stop()`` (SIGTERM, then SIGKILL), ``kill()``."""

    def __init__(self, cmd: Sequence[str], timeout: float) -> None:
        self.proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line or line.startswith("listening on tcp://"):
                break
        if not line.startswith("listening on tcp://"):
            self.kill()
            raise RuntimeError(f"rpc server did not start: {' '.join(cmd)} (exit {self.proc.poll()})")
        host, _, port = line.strip()[len("listening on tcp://") :].rpartition(":")
        self.address = (host, int(port))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self._reap()

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self._reap()

    def _reap(self) -> int:
        code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _timeout(value: Any) -> Optional[float]:
    """A request's timeout: None or a number >= 0 (inf = None); ValueError otherwise (even authenticated
    peers never put a NaN into the timer heap)."""
    if value is None:
        return None
    seconds = float(value)
    if math.isnan(seconds) or seconds < 0:
        raise ValueError("bad timeout")
    return None if math.isinf(seconds) else seconds


@contextlib.contextmanager
def local_service(data_dir: Optional[str] = None) -> Iterator[dict[str, Any]]:
    """A throw-away server for tools that need "the service this backend needs" (the kit's
    ``--backend rpc``, the demo): a new key in a temporary 0600 file, a server in a child process on
    a free loopback port; yields the metadata a descriptor needs to reach it (``host``, ``port``,
    ``key_file``); stops the server and removes the key on exit."""
    with tempfile.TemporaryDirectory(prefix="sageq-rpc-") as tmp:
        key_file = os.path.join(tmp, "rpc.key")
        generate_key_file(key_file)
        server = RPCQueueServer.spawn(key_file=key_file, data_dir=data_dir)
        try:
            host, port = server.address
            yield {"host": host, "port": port, "key_file": key_file}
        finally:
            server.stop()


def _deadline(timeout: Optional[float], left: Optional[float] = None) -> Optional[float]:
    """When a parked request is answered empty/full: its timeout from now, or sooner if its client gives
    up before that (``left``, RPC9)."""
    if left is not None:
        timeout = left if timeout is None else min(timeout, left)
    return None if timeout is None else time.monotonic() + timeout


def _late(value: Any) -> bool:
    """A put/get's last field: the time (server clock) after which its client no longer takes an answer."""
    return value is not None and time.time() >= float(value)


def _left(args: list[Any]) -> Optional[float]:
    """Seconds until a put/get request's client gives up (its optional last field), or None."""
    if len(args) < 5 or args[4] is None:
        return None
    left = float(args[4]) - time.time()
    if math.isnan(left):
        raise ValueError("bad deadline")
    return left


def main(argv: Optional[list[str]] = None) -> int:
    """``sage-queue serve``: run a server in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="sage-queue serve", description="serve rpc queues over ZeroMQ")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port; 0 picks a free one (printed)")
    parser.add_argument(
        "--key-file", default=None, help=f"shared key file (hex); created 0600 if absent (default {default_key_path()})"
    )
    parser.add_argument("--data-dir", default=None, help="keep queues durably in SQLite (WAL) in this directory")
    parser.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME, help="largest request in bytes")
    parser.add_argument(
        "--exit-with-parent",
        type=int,
        default=None,
        metavar="PID",
        help="stop when process PID is no longer our parent",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        server = RPCQueueServer(
            args.host, args.port, key_file=args.key_file, data_dir=args.data_dir, max_frame=args.max_frame
        )
    except (OSError, zmq.ZMQError) as exc:
        print(f"sage-queue serve: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # QueuePermissionError: a bad key file
        print(f"sage-queue serve: {exc}", file=sys.stderr)
        return 1
    if server.generated_key_file is not None:
        print(f"generated key file {server.generated_key_file}", flush=True)

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        log.info("signal %d: stopping", signum)
        server.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    host, port = server.address
    print(f"listening on tcp://{host}:{port}", flush=True)
    log.info("serving on tcp://%s:%d (durable=%s)", host, port, args.data_dir is not None)
    server.serve_forever(parent_pid=args.exit_with_parent)
    log.info("stopped: %s", server.status())
    return 0


if __name__ == "__main__":
    sys.exit(main())
