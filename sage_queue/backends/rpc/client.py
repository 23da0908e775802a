"""``RPCQueueStub``: a handle on a queue of an rpc server (spec/backends/rpc.md).

Channels. A handle owns a private ZeroMQ context and a pool of *channels*: a DEALER socket with its
own random client id and request counter. A call takes an idle channel (or makes one), does one
request-reply exchange on it, and gives it back; so any number of threads share a handle, each
call having a channel to itself (zmq sockets are not thread-safe; a channel is used by one thread
at a time, which the pool guarantees), and the pool never holds more channels than there were
concurrent calls.

Exchange (Lazy Pirate). A request is sent with the channel's next seq; the caller then polls its
socket in short slices (checking the handle's closed flag between them) for the matching reply.
With no word from the server for RESEND_S, the socket is dropped and reconnected and the same
request (same seq) sent again; the server answers a retransmission from its record (or ``pending``
while the request is parked there), so nothing executes twice. ``pending`` answers also serve as
a heartbeat: a call gives up with QueueConnectionError only when the server has been silent for
``retry_timeout`` (or, for a timed call, past its timeout plus GRACE_S).

Invariant of the pool: ``_idle``, ``_busy``, ``_ctx`` and ``_ctx_done`` change only under
``_lock``; a channel is either in ``_idle`` or owned by exactly one running call; the context is
terminated exactly once, by whoever sees ``closed`` with no call running (close(), or the last call
to finish after it).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, ClassVar, NoReturn, Optional

import zmq

from ...descriptor import QueueDescriptor
from ...errors import IncompatibleQueue, QueueClosed, QueueConnectionError, QueueDestroyed, QueueNotFound
from ...protocol import BATCH, CLOSE, CROSS_HOST, CROSS_PROCESS, PICKLABLE_HANDLE, STATS, QueueStats
from ...stub import QueueStub
from .server import local_service
from .wire import (
    HEADER_SIZE,
    MAC_SIZE,
    NO_INSTANCE,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    BadFrame,
    Sealer,
    load_key,
    serializer,
)

__all__ = ["RPCQueueStub"]

RESEND_S = 0.5
"""With no word from the server for this long, reconnect and retransmit."""
HEARTBEAT_S = 2.0
"""While the server holds a request (``pending``), retransmit this often to learn it is alive."""
GRACE_S = 2.0
"""A timed call raises QueueConnectionError at the latest this long after its timeout."""
SLICE_S = 0.1
"""Poll slice: a call notices close() (or a signal handler's) within this."""
_OVERHEAD = 256
DEFAULT_CONNECT_TIMEOUT_S = 10.0
"""metadata ``connect_timeout`` when absent: how long resolve waits for the server."""
DEFAULT_RETRY_TIMEOUT_S = 30.0
"""metadata ``retry_timeout`` when absent: server silence after which a call gives up."""
_NOBLOCK = int(zmq.NOBLOCK)
"""A plain int: pyzmq's enum flag costs an enum operation per send."""

_forks = 0
"""How many times this process is a fork away from the one it started as: a handle compares it with
the value it saw when it made its context (cheaper than os.getpid(), a system call, on every call)."""


def _after_fork_in_child() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Channel:
    __slots__ = ("client_id", "instance", "sealer", "seq", "sock")

    def __init__(self, sock: zmq.Socket[bytes], instance: bytes, key: bytes) -> None:
        self.sock = sock
        self.client_id = os.urandom(16)
        self.seq = 0
        self.instance = instance
        self.sealer = Sealer(key)  # its own: a channel is used by one thread at a time


class RPCQueueStub(QueueStub):
    """A handle on queue ``metadata["name"]`` of the server at ``host:port``."""

    queue_type: ClassVar[str] = "rpc"
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {CROSS_PROCESS, CROSS_HOST, PICKLABLE_HANDLE, BATCH, CLOSE, STATS}
    )
    local_service = staticmethod(local_service)
    """The service this backend needs, for tools (demo, kit): a throw-away server; see stub.py."""

    def __init__(self, descriptor: QueueDescriptor) -> None:
        super().__init__(descriptor)
        m = descriptor.metadata
        host = str(m["host"])
        self._endpoint = f"tcp://[{host}]:{m['port']}" if ":" in host else f"tcp://{host}:{m['port']}"
        self._ipv6 = ":" in host
        self._name = str(m["name"])
        self._key = load_key(m.get("key_file"), m.get("key_env"))
        self._dumps, self._loads = serializer(str(m.get("serializer", "pickle")))
        self._retry_timeout = float(m.get("retry_timeout", DEFAULT_RETRY_TIMEOUT_S))
        self._lock = threading.Lock()
        self._forks = _forks
        self._maxsize = int(m["maxsize"])
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._ctx_done = False
        self._idle: list[_Channel] = []
        self._busy = 0
        self._instance = NO_INSTANCE
        """The server instance last greeted (shared by new channels); written under _lock."""
        self._max_frame = 0
        self._server_durable = False
        self._uid = b""
        self._open_instance = NO_INSTANCE
        try:
            self._open(float(m.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT_S)))
            if m.get("durable", False) and not self._server_durable:
                raise IncompatibleQueue(
                    f"rpc queue {self._name!r}: the descriptor asks for durable=true but the server at "
                    f"{self._endpoint} keeps queues in memory (start it with --data-dir)"
                )
        except BaseException:
            self.close()
            raise

    # -- channels ----------------------------------------------------------------------------

    def _new_socket(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(SLICE_S * 1000))
        if self._ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(self._endpoint)
        return sock

    def _take(self) -> _Channel:
        if _forks != self._forks:
            # A forked child must not touch the parent's context (libzmq forbids it), nor wait for a lock
            # another thread of the parent held at fork time: start afresh (the child's first call).
            self._lock = threading.Lock()
            with self._lock:
                self._forks = _forks
                self._ctx = zmq.Context()
                self._ctx_done = False
                self._idle = []
                self._busy = 0
        with self._lock:
            if self._closed:
                self._raise_closed()
            self._busy += 1
            ch = self._idle.pop() if self._idle else None
            instance = self._instance
        if ch is None:
            try:
                ch = _Channel(self._new_socket(), instance, self._key)
            except BaseException:
                self._give(None)
                raise
        return ch

    def _give(self, ch: Optional[_Channel], dead: bool = False) -> None:
        to_close: list[_Channel] = []
        term = False
        with self._lock:
            self._busy -= 1
            if ch is not None:
                if dead or self._closed:
                    to_close.append(ch)
                else:
                    self._idle.append(ch)
            if self._closed:
                to_close += self._idle
                self._idle = []
                term = self._busy == 0 and not self._ctx_done
                self._ctx_done = self._ctx_done or term
        for c in to_close:
            c.sock.close()
        if term:
            self._ctx.term()

    def _close(self) -> None:
        # May run in a signal handler that interrupted a call of this very thread, maybe inside _take
        # or _give holding _lock: never wait long for it; that call cleans up when it gives back.
        if self._forks != _forks:
            return  # a forked child's copy of a handle it never used: the parent's sockets are not ours
        if not self._lock.acquire(timeout=0.5):
            return
        try:
            idle, self._idle = self._idle, []
            term = self._busy == 0 and not self._ctx_done
            self._ctx_done = self._ctx_done or term
        finally:
            self._lock.release()
        for c in idle:
            c.sock.close()
        if term:
            self._ctx.term()

    def _raise_closed(self) -> NoReturn:
        if self._destroyed:
            raise QueueDestroyed(f"rpc queue {self._name!r} was destroyed")
        raise QueueClosed(f"rpc queue handle {self._name!r} is closed")

    # -- one exchange ------------------------------------------------------------------------

    def _send(self, ch: _Channel, seq: int, body: list[Any]) -> None:
        if ch.instance == NO_INSTANCE:
            body, seq = ["hello"], 0  # greet first; the request follows the answer
        frame = ch.sealer.seal(REQUEST_MAGIC, ch.client_id, seq, time.time(), ch.instance, body)
        try:
            ch.sock.send(frame, _NOBLOCK)
        except zmq.Again:  # nothing connected and nothing queued: the next resend tries again
            pass

    def _exchange(self, ch: _Channel, body: list[Any], wait: Optional[float], give_up: float) -> list[Any]:
        """Send ``body`` as the channel's next request; return the server's answer (see module doc)."""
        ch.seq += 1
        seq = ch.seq
        start = time.monotonic()
        end = None if wait is None else start + wait + min(give_up, GRACE_S)
        last_heard = start
        self._send(ch, seq, body)
        resend_at = start + RESEND_S
        while True:
            if self._closed:
                self._abandon(ch, seq)
                self._raise_closed()
            now = time.monotonic()
            if now - last_heard > give_up or (end is not None and now > end):
                # The server may still execute the request later (it was only stopped or slow): the
                # cancel, queued behind it, makes it unpark the request or put a get's items back at
                # the head, so a call that gave up never takes items with it (RPC9, RPC13).
                self._abandon(ch, seq)
                raise QueueConnectionError(
                    f"rpc server {self._endpoint} did not answer within {give_up:g} s (request {body[0]!r}); "
                    "it is down, unreachable, or does not share our key"
                )
            if now >= resend_at:
                if now - last_heard >= RESEND_S:  # silence: a new connection (Lazy Pirate)
                    ch.sock.close()
                    ch.sock = self._new_socket()
                self._send(ch, seq, body)
                resend_at = now + RESEND_S
            try:
                # One blocking receive of at most SLICE_S (the socket's RCVTIMEO), GIL released: cheaper
                # than a poll then a receive, and a signal handler runs within it (pyzmq retries on EINTR).
                frame = ch.sock.recv()
            except zmq.Again:
                continue
            # One frame per turn of the loop: close() and the deadlines are checked between frames.
            try:
                client_id, got_seq, _, _, reply = ch.sealer.open(frame, REPLY_MAGIC, 1 << 62)
            except BadFrame:
                continue  # not from our server (or damaged): ignore it
            if client_id != ch.client_id:
                continue
            if got_seq == 0 and reply[0] == "ok" and len(reply) == 4:  # the answer to a hello
                last_heard = time.monotonic()
                ch.instance = bytes(reply[1])
                with self._lock:
                    self._instance = ch.instance
                    self._max_frame = int(reply[2])
                    self._server_durable = bool(reply[3])
                self._send(ch, seq, body)
                resend_at = last_heard + RESEND_S
                continue
            if got_seq != seq:
                continue  # a late answer to an earlier request of this channel
            last_heard = time.monotonic()
            if reply[0] == "pending":
                resend_at = last_heard + HEARTBEAT_S
                continue
            if reply[0] == "stale":  # the server restarted: greet the new instance, then retransmit
                ch.instance = NO_INSTANCE
                self._send(ch, seq, body)
                resend_at = last_heard + RESEND_S
                continue
            answer: list[Any] = reply
            return answer

    def _abandon(self, ch: _Channel, seq: int) -> None:
        """Tell the server this channel gives request ``seq`` up (closed): unpark it or return its items."""
        if ch.instance == NO_INSTANCE:
            return
        frame = ch.sealer.seal(REQUEST_MAGIC, ch.client_id, seq, time.time(), ch.instance, ["cancel"])
        try:
            ch.sock.setsockopt(zmq.LINGER, 500)  # let the cancel leave before the socket closes
            ch.sock.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _request(self, body: list[Any], wait: Optional[float]) -> list[Any]:
        """One operation on this handle's queue: an exchange, reopening after a server restart."""
        ch = self._take()
        dead = False
        try:
            for _ in range(3):
                uid = self._uid  # one attribute read: atomic, no lock needed (written under _lock)
                reply = self._exchange(ch, [body[0], self._name, uid, *body[1:]], wait, self._retry_timeout)
                if reply[0] == "err" and reply[1] == "gone" and ch.instance != self._open_instance:
                    # The server restarted without its state (not durable): the queue is new and empty.
                    self._open_on(ch, self._retry_timeout)
                    continue
                return self._check(reply)
            return self._check(reply)  # a third "gone" in a row: the queue is really gone
        except QueueConnectionError:
            dead = True
            raise
        finally:
            self._give(ch, dead)

    def _check(self, reply: list[Any]) -> list[Any]:
        if reply[0] == "err":
            kind, text = reply[1], str(reply[2])
            if kind == "gone":
                self._destroyed = True
                self.close()
                raise QueueDestroyed(f"rpc queue {self._name!r}: {text}")
            if kind == "notfound":
                raise QueueNotFound(f"rpc queue {self._name!r} at {self._endpoint}: {text}")
            if kind == "incompatible":
                raise IncompatibleQueue(f"rpc queue at {self._endpoint}: {text}")
            raise ValueError(text)
        if reply[0] == "cancelled":
            self._raise_closed()
        return reply

    def _open(self, connect_timeout: float) -> None:
        ch = self._take()
        dead = False
        try:
            self._open_on(ch, connect_timeout)
        except QueueConnectionError as exc:
            dead = True
            raise QueueNotFound(f"rpc queue {self._name!r}: {exc}") from exc
        finally:
            self._give(ch, dead)

    def _open_on(self, ch: _Channel, give_up: float) -> None:
        m = self._descriptor.metadata
        body = ["open", self._name, int(m["maxsize"]), bool(m.get("create", True))]
        reply = self._check(self._exchange(ch, body, 0.0, give_up))
        with self._lock:
            self._uid = bytes(reply[1])
            self._open_instance = ch.instance

    # -- hooks ---------------------------------------------------------------------------------

    def _encode(self, items: list[Any]) -> list[bytes]:
        out = [self._dumps(item) for item in items]  # the serialiser's own error propagates (Q18)
        size = sum(map(len, out)) + 8 * len(out) + MAC_SIZE + HEADER_SIZE + _OVERHEAD
        if self._max_frame and size > self._max_frame:
            raise ValueError(f"{len(out)} item(s) of {size} bytes exceed the server's max frame of {self._max_frame}")
        maxsize = self._maxsize
        if 0 < maxsize < len(out):
            raise ValueError(f"{len(out)} items can never fit maxsize {maxsize}")
        return out

    def _put(self, item: Any, timeout: Optional[float]) -> None:
        reply = self._request(["put", self._encode([item]), timeout], timeout)
        if reply[0] == "full":
            raise queue.Full

    def _put_many(self, items: list[Any], timeout: Optional[float]) -> None:
        reply = self._request(["put", self._encode(items), timeout], timeout)
        if reply[0] == "full":
            raise queue.Full

    def _get(self, timeout: Optional[float]) -> Any:
        reply = self._request(["get", 1, timeout], timeout)
        if reply[0] == "empty":
            raise queue.Empty
        return self._loads(reply[1][0])  # an undecodable item is lost alone (Q34)

    def _get_many(self, max_items: int, timeout: Optional[float]) -> list[Any]:
        reply = self._request(["get", max_items, timeout], timeout)
        if reply[0] == "empty":
            raise queue.Empty
        data: list[bytes] = reply[1]
        out = []
        for i, d in enumerate(data):
            try:
                out.append(self._loads(d))
            except Exception:
                # Q34: the bad item is lost alone. Items after it go back to the head; the bad one too if
                # good items come before it (they are returned now, the next call meets it).
                back = data[i + 1 :] if i == 0 else data[i:]
                if back:
                    self._request(["unget", back], 0.0)
                if i == 0:
                    raise
                return out
        return out

    def _qsize(self) -> int:
        return int(self._request(["qsize"], 0.0)[1])

    def _destroy(self) -> None:
        self._request(["destroy"], 0.0)

    def _stats(self) -> QueueStats:
        _, puts, gets, depth, b_in, b_out, waits = self._request(["stats"], 0.0)
        return QueueStats(scope="queue", puts=puts, gets=gets, depth=depth, bytes_in=b_in, bytes_out=b_out, waits=waits)

    def server_status(self) -> dict[str, Any]:
        """The server's own counters: clients, queues, items, bytes, requests, rejected frames by reason."""
        self._check_open()
        ch = self._take()
        try:
            reply = self._check(self._exchange(ch, ["status"], 0.0, self._retry_timeout))
        finally:
            self._give(ch)
        status: dict[str, Any] = dict(reply[1])
        return status
