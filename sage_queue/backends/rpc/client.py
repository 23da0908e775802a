"""``RPCQueueStub``: a handle on a queue of an rpc server (spec/backends/rpc.md).

Channels. A handle owns a private ZeroMQ context and a pool of *channels*: a DEALER socket with its
own random client id and request counter. A call takes an idle channel (or makes one), does one
request-reply exchange on it, and gives it back; so any number of threads share a handle, each
call having a channel to itself (zmq sockets are not thread-safe; a channel is used by one thread
at a time, which the pool guarantees), and the pool never holds more channels than there were
concurrent calls.

Exchange (Lazy Pirate). A request is sent with the channel's next seq; the caller then polls its
socket in short slices (checking the handle's closed flag between them) for the matching reply.
With no word from the server for RESEND_S, the same request (same seq) is sent again on the same
socket; only a longer silence drops the socket and connects a new one, after RECONNECT_S, then
twice as long each time up to RECONNECT_MAX_S (a slow link needs a round trip plus a ZMTP
handshake: reconnecting sooner would never let a connection live long enough to answer). The
server answers a retransmission from its record (or ``pending`` while the request is parked
there), so nothing executes twice. ``pending`` answers also serve as a heartbeat: a call gives up
with QueueConnectionError only when the server has been silent for ``retry_timeout`` (or, for a
timed call, past its timeout plus GRACE_S).

A get that gives up takes nothing (RPC9). Three mechanisms, for the ways its request can still
take items after the call raised: (1) a timed put/get carries the time, on the server's clock (its
offset measured at the hello, erring late), after which its call takes no answer, less
LATE_MARGIN_S: a copy arriving later (held by a partition, a stopped server) is answered ``late``
and never executed; (2) a get the server did execute (its answer was lost) leaves its channel
*owed* "fetch" in ``_fetch``: the handle's next get retransmits that request on it, gets the
recorded answer and returns those items first (what it did not ask for waits in ``_kept`` for the
next gets), so they come before anything newer (Q3); (3) a put that gives up, a call closed, and at
close() the fetch channels and the kept items, are settled by a settler thread (started only while
some channel is owed): it retransmits ``cancel`` (or ``unget`` for kept items) with backoff until
the server answers; an answered channel goes back to the pool. The server answers a cancel that
overtook its request with a tombstone, so the request never executes. After close() the settler
tries for at most CLOSE_SETTLE_S more; what is not answered by then (the server unreachable) is
lost, as with a killed consumer (RPC12).

Invariant of the pool: ``_idle``, ``_owed``, ``_fetch``, ``_kept``, ``_settler``, ``_busy``, ``_ctx``
and ``_ctx_done`` change only under ``_lock``; a channel is either in ``_idle``, ``_owed`` or
``_fetch``, or owned by exactly one thread (a running call, or the settler, which counts in
``_busy`` while it runs); the context is terminated exactly once, by whoever sees ``closed`` with
nothing running (close(), or the last call or settler to finish after it).
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from typing import Any, ClassVar, NoReturn, Optional

import zmq

from ..._timeout import stalled
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
"""With no word from the server for this long, retransmit (on the same socket)."""
RECONNECT_S = 2.0
"""With no word from the server for this long, drop the socket and connect a new one..."""
RECONNECT_MAX_S = 8.0
"""...then twice as long after each new connection, up to this."""
RESEND_MAX_BYTES = 1 << 20
"""A request larger than this is retransmitted only on a new connection (never queued twice on one)."""
LATE_MARGIN_S = 0.5
"""A timed put/get must reach the server this long before its call gives up, or it is not executed: the
time for the answer to come back."""
CLOSE_SETTLE_S = 0.5
"""After close(), how long the settler still tries to deliver owed cancels."""
OWED_GIVE_UP_S = 600.0
"""An owed cancel unanswered this long is given up (the channel record expires on the server anyway)."""
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
_send = zmq.backend.Socket.send
"""The socket's own send, not pyzmq's Python wrapper of it (which only adds the DRAFT routing_id and
group arguments, unused here): ~0.16 us less per request."""
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
    __slots__ = ("client_id", "instance", "owed", "owed_body", "owed_since", "sealer", "seq", "sock")

    def __init__(self, sock: zmq.Socket[bytes], instance: bytes, key: bytes) -> None:
        self.sock = sock
        self.client_id = os.urandom(16)
        self.seq = 0
        self.instance = instance
        self.sealer = Sealer(key)  # its own: a channel is used by one thread at a time
        self.owed = ""
        """Its request ``seq`` was given up and is not settled: "fetch" (a get: the handle's next get
        retransmits it and returns its answer), "cancel" (the settler unparks it, or has its items put
        back), "unget" (request ``seq`` puts back items the handle kept, at close)."""
        self.owed_body: list[Any] = []
        """The request to retransmit ("fetch", "unget")."""
        self.owed_since = 0.0


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
        self._owed: list[_Channel] = []
        self._owed_n = 0
        """Channels owed, in _owed or the settler's hands (under _lock; read without it as a hint)."""
        self._settled = threading.Condition(self._lock)
        """Notified when _owed_n falls."""
        self._settler: Optional[threading.Thread] = None
        self._fetch: list[_Channel] = []
        """Channels of given-up gets, for the next gets to resume (module doc; under _lock)."""
        self._kept: collections.deque[list[bytes]] = collections.deque()
        """Items a resumed get had taken beyond what its resumer asked: the next gets return them first
        (under _lock)."""
        self._busy = 0
        self._instance = NO_INSTANCE
        """The server instance last greeted (shared by new channels); written under _lock."""
        self._max_frame = 0
        self._server_durable = False
        self._offset = 0.0
        """The server's clock minus ours (seconds, plus a trip out), measured at the last hello; under _lock."""
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
            self._settled = threading.Condition(self._lock)
            with self._lock:
                self._forks = _forks
                self._ctx = zmq.Context()
                self._ctx_done = False
                self._idle = []
                self._owed = []
                self._owed_n = 0
                self._settler = None
                self._kept = collections.deque()
                self._fetch = []
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
            if ch is not None and not ch.owed and not dead and not self._closed:  # the common case
                self._idle.append(ch)
                return
            if ch is not None:
                if ch.owed == "fetch" and self._closed:
                    ch.owed = "cancel"  # closed: its items go back to the queue (RPC12)
                if ch.owed == "fetch":
                    self._fetch.append(ch)
                elif ch.owed:  # the settler delivers its cancel (a bounded last try if closed)
                    self._owed.append(ch)
                    self._owed_n += 1
                    self._start_settler()
                elif dead or self._closed:
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
            for ch in self._fetch:  # given-up gets no get will resume: cancelled (RPC12)
                ch.owed = "cancel"
                self._owed.append(ch)
                self._owed_n += 1
            self._fetch = []
            if self._kept or self._owed:
                self._start_settler()  # it puts the kept items back (and counts as busy: no term yet)
            term = self._busy == 0 and not self._ctx_done
            self._ctx_done = self._ctx_done or term
            settler = self._settler
        finally:
            self._lock.release()
        for c in idle:
            c.sock.close()
        if term:
            self._ctx.term()
        if settler is not None and settler is not threading.current_thread():
            # Its bounded last try at the owed cancels (we hold no lock it needs: acquired above).
            settler.join(CLOSE_SETTLE_S + 0.5)

    def _raise_closed(self) -> NoReturn:
        if self._destroyed:
            raise QueueDestroyed(f"rpc queue {self._name!r} was destroyed")
        raise QueueClosed(f"rpc queue handle {self._name!r} is closed")

    # -- one exchange ------------------------------------------------------------------------

    def _send(self, ch: _Channel, seq: int, body: list[Any]) -> int:
        """Send ``body`` as request ``seq`` (a hello first if the server is not greeted); its size."""
        if ch.instance == NO_INSTANCE:
            body, seq = ["hello"], 0  # greet first; the request follows the answer
        frame = ch.sealer.seal(REQUEST_MAGIC, ch.client_id, seq, time.time(), ch.instance, body)
        try:
            _send(ch.sock, frame, _NOBLOCK)
        except zmq.Again:  # nothing connected and nothing queued: the next resend tries again
            pass
        return len(frame)

    def _exchange(
        self,
        ch: _Channel,
        body: list[Any],
        wait: Optional[float],
        give_up: float,
        stamp: bool = False,
        resume: bool = False,
    ) -> list[Any]:
        """Send ``body`` as the channel's next request; return the server's answer (see module doc).

        ``stamp`` (a timed put/get): append the time, on the server's clock, after which this call takes
        no answer, less LATE_MARGIN_S; a copy of the request that reaches the server
        later (held by a partition) is answered ``late`` and never executed (RPC9). ``resume``: retransmit
        the channel's current request (a given-up get, module doc) instead of a new one."""
        if not resume:
            ch.seq += 1
        seq = ch.seq
        start = time.monotonic()
        end = None if wait is None else start + wait + min(give_up, GRACE_S)
        if stamp and end is not None:
            body = [*body, time.time() + self._offset + (end - start) - LATE_MARGIN_S]
        sent = start
        last_heard = start
        quiet_from = start
        """Since when the server's silence counts: its last word, or when a new connection began, or
        (parked) when the next heartbeat is due."""
        reconnect_after = RECONNECT_S
        big = self._send(ch, seq, body) > RESEND_MAX_BYTES
        resend_at = start + RESEND_S
        turn = start
        while True:
            if self._closed:
                self._abandon(ch, body)
                self._raise_closed()
            now = time.monotonic()
            # A turn lasts at most SLICE_S plus a frame's handling. Much longer: this process did not run
            # (stopped, starved), which is not the server's silence (Q38): the answer may be in the socket,
            # unread. Every clock of this call moves by the pause, so the next receive reads it first.
            paused = stalled(turn, SLICE_S, now)
            if paused:
                last_heard += paused
                quiet_from += paused
                resend_at += paused
                if end is not None:
                    end += paused
            turn = now
            if now - last_heard > give_up or (end is not None and now > end):
                # The server may still execute the request later (it was only stopped or slow, or a
                # partition held the request or the answer): the channel is owed (module doc), so a
                # call that gave up never takes items with it (RPC9).
                self._abandon(ch, body)
                raise QueueConnectionError(
                    f"rpc server {self._endpoint} did not answer within {give_up:g} s (request {body[0]!r}); "
                    "it is down, unreachable, or does not share our key"
                )
            if now >= resend_at:
                if now - quiet_from >= reconnect_after:  # a long silence: a new connection (Lazy Pirate)
                    ch.sock.close()
                    ch.sock = self._new_socket()
                    quiet_from = now
                    reconnect_after = min(2 * reconnect_after, RECONNECT_MAX_S)
                    self._send(ch, seq, body)
                elif not big:  # on the same socket: a slow link's answer may be on its way
                    self._send(ch, seq, body)
                sent = now
                resend_at = now + RESEND_S
            try:
                # One blocking receive of at most SLICE_S (the socket's RCVTIMEO), GIL released: cheaper
                # than a poll then a receive, and a signal handler runs within it (pyzmq retries on EINTR).
                frame = ch.sock.recv()
            except zmq.Again:
                continue
            # One frame per turn of the loop: close() and the deadlines are checked between frames.
            try:
                client_id, got_seq, server_time, _, reply = ch.sealer.open(frame, REPLY_MAGIC, 1 << 62)
            except BadFrame:
                continue  # not from our server (or damaged): ignore it
            if client_id != ch.client_id:
                continue
            if got_seq == seq and reply[0] == "ok":
                # The common case first: this request's answer (seq >= 1 here, so never a hello's answer).
                return reply
            if got_seq == 0 and reply[0] == "ok" and len(reply) == 4:  # the answer to a hello
                last_heard = quiet_from = time.monotonic()
                reconnect_after = RECONNECT_S
                ch.instance = bytes(reply[1])
                with self._lock:
                    # The server's clock when it answered, minus ours when we sent: the offset plus the trip
                    # out, never less than the offset, so a deadline on the server's clock errs late (the
                    # cancel covers that) rather than refusing requests the call still waits for.
                    self._offset = server_time - (time.time() - (last_heard - sent))
                    self._instance = ch.instance
                    self._max_frame = int(reply[2])
                    self._server_durable = bool(reply[3])
                big = self._send(ch, seq, body) > RESEND_MAX_BYTES
                sent = last_heard
                resend_at = last_heard + RESEND_S
                continue
            if got_seq != seq:
                continue  # a late answer to an earlier request of this channel
            last_heard = quiet_from = time.monotonic()
            reconnect_after = RECONNECT_S
            if reply[0] == "pending":
                resend_at = quiet_from = last_heard + HEARTBEAT_S
                continue
            if reply[0] == "stale":  # the server restarted: greet the new instance, then retransmit
                ch.instance = NO_INSTANCE
                big = self._send(ch, seq, body) > RESEND_MAX_BYTES
                resend_at = last_heard + RESEND_S
                continue
            if reply[0] == "late" and not resume:  # reached the server too late for us: not executed
                raise QueueConnectionError(
                    f"rpc server {self._endpoint}: request {body[0]!r} arrived too late to be answered in time"
                )
            answer: list[Any] = reply
            return answer

    def _abandon(self, ch: _Channel, body: list[Any]) -> None:
        """This channel gives its current request up: it is owed until settled (module doc)."""
        if ch.instance == NO_INSTANCE:
            return  # never greeted: no request of it reached this server
        ch.owed_since = time.monotonic()
        if body[0] == "get" and not self._closed:
            ch.owed, ch.owed_body = "fetch", body  # the next get resumes it: its answer, never a second take
        else:
            ch.owed = "cancel"
            self._send_cancel(ch)

    def _send_cancel(self, ch: _Channel) -> None:
        frame = ch.sealer.seal(REQUEST_MAGIC, ch.client_id, ch.seq, time.time(), ch.instance, ["cancel"])
        try:
            ch.sock.send(frame, _NOBLOCK)
        except zmq.ZMQError:
            pass

    def _start_settler(self) -> None:
        """Under _lock: make sure the settler runs."""
        if self._settler is None:
            self._busy += 1  # the settler's, given back when it ends
            self._settler = threading.Thread(target=self._settle, name="sage-queue-rpc-settle", daemon=True)
            self._settler.start()

    def _settle_answer(self, ch: _Channel) -> Optional[list[Any]]:
        """Read what the channel's socket holds; the answer that settles it (module doc), or None."""
        while True:
            try:
                frame = ch.sock.recv(_NOBLOCK)
            except zmq.ZMQError:
                return None
            try:
                client_id, got_seq, _, _, reply = ch.sealer.open(frame, REPLY_MAGIC, 1 << 62)
            except BadFrame:
                continue
            if client_id != ch.client_id or got_seq != ch.seq or not reply:
                continue
            if reply[0] == "stale":  # a server restarted without its state: the request died with it
                return reply
            if ch.owed == "cancel":
                # ["ok"]: the cancel's answer (or a put's, which holds nothing); "cancelled": the record of a
                # cancelled request. A get's late ["ok", items] is not: the cancel puts those items back.
                if reply == ["ok"] or reply[0] == "cancelled":
                    return reply
                continue
            if reply[0] != "pending":  # unget: done, or the queue is gone (and its items with it)
                return reply

    def _settle(self) -> None:
        """The settler thread: settle the owed channels (module doc), then end.

        It owns the channels it took out of ``_owed`` (and of ``_kept`` at close); it counts in
        ``_busy`` (set by whoever started it), so the context outlives its sockets."""
        mine: list[_Channel] = []
        due: dict[int, tuple[float, float]] = {}  # id(channel) -> (next resend, its interval)
        closed_at: Optional[float] = None
        poller = zmq.Poller()
        try:
            while True:
                now = time.monotonic()
                with self._lock:
                    if self._closed:
                        if closed_at is None:
                            closed_at = now
                        while self._kept:  # items kept for gets that will not come: back to the queue
                            items = self._kept.popleft()
                            ch = _Channel(self._new_socket(), self._instance, self._key)
                            ch.seq = 1
                            ch.owed, ch.owed_since = "unget", now
                            ch.owed_body = ["unget", self._name, self._uid, items]
                            self._owed.append(ch)
                            self._owed_n += 1
                    for ch in self._owed:
                        mine.append(ch)
                        poller.register(ch.sock, zmq.POLLIN)
                        due[id(ch)] = (now, RESEND_S)
                    self._owed = []
                    if not mine:
                        self._settler = None
                        return
                if closed_at is not None and now - closed_at > CLOSE_SETTLE_S:
                    return  # what is still owed is lost (RPC12)
                ready = dict(poller.poll(int(SLICE_S * 1000)))
                now = time.monotonic()
                keep = []
                for ch in mine:
                    answer = self._settle_answer(ch) if ch.sock in ready else None
                    if answer is not None:
                        poller.unregister(ch.sock)
                        self._settled_one(ch, answer)
                        continue
                    if now - ch.owed_since > OWED_GIVE_UP_S:
                        poller.unregister(ch.sock)
                        ch.sock.close()
                        self._settled_one(None, [])
                        continue
                    at, every = due[id(ch)]
                    if now >= at:
                        if every >= RECONNECT_S:  # a long silence: a new connection, as in _exchange
                            poller.unregister(ch.sock)
                            ch.sock.close()
                            ch.sock = self._new_socket()
                            poller.register(ch.sock, zmq.POLLIN)
                        if ch.owed == "cancel":
                            self._send_cancel(ch)
                        else:
                            self._send(ch, ch.seq, ch.owed_body)
                        due[id(ch)] = (now + every, min(2 * every, RECONNECT_MAX_S))
                    keep.append(ch)
                mine = keep
        finally:
            leftover: list[_Channel] = []
            with self._lock:
                # Only while it is still *the* settler: once it set _settler to None, a channel owed since
                # belongs to the next settler.
                if self._settler is threading.current_thread():
                    self._settler = None
                    leftover, self._owed = self._owed, []
                self._owed_n -= len(mine) + len(leftover)
                self._settled.notify_all()
            for ch in mine + leftover:
                ch.sock.close()
            self._give(None)

    def _settled_one(self, ch: Optional[_Channel], answer: list[Any]) -> None:
        """A channel is settled: usable again (its next request acknowledges the record), or closed."""
        with self._lock:
            self._owed_n -= 1
            self._settled.notify_all()
            if ch is None:
                return
            ch.owed = ""
            if answer[0] != "stale" and not self._closed and self._forks == _forks:
                self._idle.append(ch)
                return
        ch.sock.close()

    def _take_kept(self, max_items: int) -> Optional[list[Any]]:
        """The reply a get would have had, from the items kept for it (module doc), or None."""
        with self._lock:
            if not self._kept or self._closed:
                return None
            items = self._kept[0]
            out, rest = items[:max_items], items[max_items:]
            if rest:
                self._kept[0] = rest
            else:
                self._kept.popleft()
        return ["ok", out]

    def _take_fetch(self) -> Optional[_Channel]:
        """A channel of a given-up get for this get to resume (counted busy), or None."""
        with self._lock:
            if not self._fetch or self._closed:
                return None
            self._busy += 1
            return self._fetch.pop(0)

    def _request(self, op: str, args: tuple[Any, ...], wait: Optional[float]) -> list[Any]:
        """One operation ``op`` on this handle's queue: an exchange, reopening after a server restart."""
        resumed = None
        if op == "get" and (self._kept or self._fetch):
            # Order (Q3): what a given-up get of this handle took comes before anything newer.
            kept = self._take_kept(int(args[0]))
            if kept is not None:
                return kept
            resumed = self._take_fetch()
        ch = self._take() if resumed is None else resumed
        dead = False
        try:
            if resumed is not None:
                ch.owed = ""
                reply = self._exchange(ch, ch.owed_body, wait, self._retry_timeout, resume=True)
                if reply[0] == "ok" and len(reply) == 2 and reply[1]:
                    items = list(reply[1])
                    if len(items) > int(args[0]):
                        with self._lock:
                            self._kept.append(items[int(args[0]) :])
                    return ["ok", items[: int(args[0])]]
                # It took nothing ("empty", "late", "cancelled", an error): this get goes ahead on it.
            for _ in range(3):
                # self._uid: one attribute read, atomic, no lock needed (written under _lock).
                reply = self._exchange(ch, [op, self._name, self._uid, *args], wait, self._retry_timeout, True)
                if reply[0] == "ok":
                    return reply
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
        data = self._dumps(item)  # the serialiser's own error propagates (Q18)
        if self._max_frame and len(data) + 8 + MAC_SIZE + HEADER_SIZE + _OVERHEAD > self._max_frame:
            self._encode([item])  # raises the ValueError that says why
        reply = self._request("put", ([data], timeout), timeout)
        if reply[0] == "full":
            raise queue.Full

    def _put_many(self, items: list[Any], timeout: Optional[float]) -> None:
        reply = self._request("put", (self._encode(items), timeout), timeout)
        if reply[0] == "full":
            raise queue.Full

    def _get(self, timeout: Optional[float]) -> Any:
        reply = self._request("get", (1, timeout), timeout)
        if reply[0] == "empty":
            raise queue.Empty
        return self._loads(reply[1][0])  # an undecodable item is lost alone (Q34)

    def _get_many(self, max_items: int, timeout: Optional[float]) -> list[Any]:
        reply = self._request("get", (max_items, timeout), timeout)
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
                    self._request("unget", (back,), 0.0)
                if i == 0:
                    raise
                return out
        return out

    def _qsize(self) -> int:
        return int(self._request("qsize", (), 0.0)[1])

    def _destroy(self) -> None:
        self._request("destroy", (), 0.0)

    def _stats(self) -> QueueStats:
        _, puts, gets, depth, b_in, b_out, waits = self._request("stats", (), 0.0)
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
