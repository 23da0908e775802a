"""A loopback TCP proxy that faults connections on demand: the network between rpc clients and a server.

Real sockets, no mock: clients connect to the proxy's port (``address``), the proxy connects each
of them to the target and forwards the bytes both ways. Its *mode* can be switched at any time,
from any thread (:meth:`Proxy.set_mode`):

``pass``
    forward everything at once;
``reset``
    reset every live connection (``SO_LINGER`` 0 then close: the peers see RST, and whatever was
    in flight or buffered is lost), and every new one as soon as it is accepted;
``blackhole``
    keep the connections (and accept new ones) but move nothing: what peers send waits in the
    proxy and the kernel's buffers, as on a partition that heals; it arrives when the mode leaves
    ``blackhole``, unless a reset drops it first;
``delay``
    forward every chunk ``delay`` seconds after it was read (order kept per direction);
``slow``
    forward at most ``rate`` bytes per second per direction of each connection.

:meth:`Proxy.cut` resets every live connection once without changing the mode.

One thread runs every connection (``selectors``); every socket is non-blocking. Invariant: only
that thread touches sockets and the connection table; other threads change ``_mode`` (under
``_lock``) or queue a request (``_requests``) and wake it through a socket pair. What a direction
has read and not yet written is bounded (``MAX_BUFFERED``): above it, the proxy stops reading
that side, so a slow or stuck peer pushes back on the sender as a real link does.
"""

from __future__ import annotations

import collections
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["Proxy", "MODES"]

MODES = ("pass", "reset", "blackhole", "delay", "slow")
"""The modes :meth:`Proxy.set_mode` accepts."""
CHUNK = 65536
"""Most bytes read from a socket at once."""
MAX_BUFFERED = 1 << 20
"""Bytes one direction may hold before the proxy stops reading its sender."""
TICK = 0.02
"""Longest wait of the proxy's loop (how late a throttled or delayed chunk may leave)."""
_RST = struct.pack("ii", 1, 0)


@dataclass
class _Direction:
    """Bytes read from ``src``, waiting to be written to ``dst``: (due time, data) chunks in order."""

    src: socket.socket
    dst: socket.socket
    chunks: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    buffered: int = 0
    eof: bool = False
    """``src`` closed its side: once ``chunks`` is written, the connection closes."""
    allowance: float = 0.0
    """Bytes ``slow`` mode may still write (refilled at ``rate`` per second, capped at one second's worth)."""
    refilled: float = field(default_factory=time.monotonic)


@dataclass
class _Connection:
    client: socket.socket
    upstream: socket.socket
    up: _Direction
    down: _Direction

    @classmethod
    def make(cls, client: socket.socket, upstream: socket.socket) -> _Connection:
        return cls(client, upstream, _Direction(client, upstream), _Direction(upstream, client))


class Proxy:
    """A faulting TCP proxy in front of ``target`` (host, port), listening on ``host``:``port`` (0: a free port).

    ``with Proxy(target) as proxy:`` or :meth:`start` / :meth:`stop`. Counters: ``accepted``,
    ``resets`` (connections reset), ``cuts`` (:meth:`cut` calls and switches to ``reset``),
    ``forwarded`` (bytes written to either side).
    """

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target[0], int(target[1]))
        self._listener = socket.create_server((host, port))
        self._listener.setblocking(False)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._mode = "pass"
        self._delay = 0.0
        self._rate = 0
        self._requests: collections.deque[tuple[str, threading.Event]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: dict[socket.socket, _Connection] = {}
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.accepted = 0
        self.resets = 0
        self.cuts = 0
        self.forwarded = 0

    # -- control (any thread) ----------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    def start(self) -> Proxy:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"fault-proxy:{self.address[1]}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop forwarding and close every socket (idempotent)."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._close_all()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_mode(self, mode: str, *, delay: float = 0.0, rate: int = 0, wait: float = 2.0) -> None:
        """Switch to ``mode`` (see the module docstring); ``delay`` seconds for ``delay``, ``rate`` bytes/s
        for ``slow``. Switching to ``reset`` returns once the live connections are reset (within ``wait``)."""
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r} (known: {', '.join(MODES)})")
        if mode == "delay" and not delay > 0:
            raise ValueError("delay mode needs delay > 0 seconds")
        if mode == "slow" and not rate > 0:
            raise ValueError("slow mode needs rate > 0 bytes per second")
        with self._lock:
            self._mode, self._delay, self._rate = mode, float(delay), int(rate)
        # Returns once the loop has taken the new mode (and, for reset, reset the live connections).
        self._request("reset" if mode == "reset" else "mode", wait)

    def cut(self, wait: float = 2.0) -> None:
        """Reset every live connection now (both sides see RST); the mode stays as it is."""
        self._request("reset", wait)

    def connections(self) -> int:
        """Live connection pairs (read without the loop's lock: a snapshot)."""
        return len(self._conns) // 2

    def _request(self, what: str, wait: float) -> None:
        done = threading.Event()
        self._requests.append((what, done))
        self._wake()
        if self._thread is not None and self._thread.is_alive():
            done.wait(wait)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed (stopped)
            pass

    # -- the loop (the proxy's thread only) -----------------------------------------------------

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        sel.register(self._listener, selectors.EVENT_READ)
        try:
            while not self._stopping:
                with self._lock:
                    mode, delay, rate = self._mode, self._delay, self._rate
                while self._requests:
                    what, done = self._requests.popleft()
                    if what == "reset":
                        self._reset_all(sel)
                        self.cuts += 1
                    done.set()  # after the mode read above: the caller's mode is the one in force
                now = time.monotonic()
                self._interest(sel, mode)
                for key, _ in sel.select(self._next_wait(mode, now)):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                    elif sock is self._listener:
                        with self._lock:  # the mode now, not at the top of the turn: a client that
                            current = self._mode  # connects right after set_mode() meets the new mode
                        self._accept(sel, current)
                    elif sock in self._conns:
                        self._read(sel, sock, mode, delay)
                if mode != "blackhole":
                    self._flush(sel, mode, rate)
        finally:
            for _, done in self._requests:
                done.set()
            sel.close()
            self._close_all()

    def _next_wait(self, mode: str, now: float) -> float:
        if mode == "blackhole":
            return 0.1
        due = [d.chunks[0][0] for c in self._unique() for d in (c.up, c.down) if d.chunks]
        if not due:
            return 0.1
        wait = min(due) - now
        # Due already: held back by a full kernel buffer or by slow mode's allowance; poll, never spin.
        return min(TICK, wait) if wait > 0 else 0.002

    def _unique(self) -> list[_Connection]:
        return list({id(c): c for c in self._conns.values()}.values())

    def _interest(self, sel: selectors.BaseSelector, mode: str) -> None:
        """Read a side unless in blackhole or its direction holds too much; no write interest (flushed each turn)."""
        for conn in self._unique():
            for d in (conn.up, conn.down):
                want = mode != "blackhole" and not d.eof and d.buffered < MAX_BUFFERED
                registered = d.src in sel.get_map()
                if want and not registered:
                    sel.register(d.src, selectors.EVENT_READ)
                elif not want and registered:
                    sel.unregister(d.src)

    def _accept(self, sel: selectors.BaseSelector, mode: str) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.accepted += 1
            if mode == "reset":
                self._rst(client)
                self.resets += 1
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2.0)
            except OSError:  # the server is down: the client sees its connection reset, as without a proxy
                self._rst(client)
                continue
            for s in (client, upstream):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection.make(client, upstream)
            self._conns[client] = conn
            self._conns[upstream] = conn

    def _read(self, sel: selectors.BaseSelector, sock: socket.socket, mode: str, delay: float) -> None:
        conn = self._conns[sock]
        d = conn.up if sock is conn.client else conn.down
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the peer: pass the reset on
            self._drop(sel, conn, rst=True)
            return
        if not data:
            d.eof = True
            return
        due = time.monotonic() + (delay if mode == "delay" else 0.0)
        d.chunks.append((due, data))
        d.buffered += len(data)

    def _flush(self, sel: selectors.BaseSelector, mode: str, rate: int) -> None:
        now = time.monotonic()
        for conn in self._unique():
            for d in (conn.up, conn.down):
                if not self._flush_one(d, mode, rate, now):
                    self._drop(sel, conn, rst=True)
                    break
                if d.eof and not d.chunks:
                    self._drop(sel, conn, rst=False)
                    break

    def _flush_one(self, d: _Direction, mode: str, rate: int, now: float) -> bool:
        """Write what is due of ``d``; False if the destination is gone."""
        if mode == "slow":
            d.allowance = min(float(rate), d.allowance + (now - d.refilled) * rate)
        d.refilled = now
        while d.chunks and d.chunks[0][0] <= now:
            due, data = d.chunks[0]
            budget = len(data) if mode != "slow" else int(d.allowance)
            if budget <= 0:
                return True
            try:
                sent = d.dst.send(data[:budget])
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            self.forwarded += sent
            d.buffered -= sent
            if mode == "slow":
                d.allowance -= sent
            if sent < len(data):
                d.chunks[0] = (due, data[sent:])
                if mode != "slow":
                    return True  # the kernel's buffer is full: try again next turn
            else:
                d.chunks.popleft()
        return True

    def _reset_all(self, sel: selectors.BaseSelector) -> None:
        for conn in self._unique():
            self._drop(sel, conn, rst=True)

    def _drop(self, sel: selectors.BaseSelector, conn: _Connection, rst: bool) -> None:
        for s in (conn.client, conn.upstream):
            if self._conns.pop(s, None) is None:
                continue
            if s in sel.get_map():
                sel.unregister(s)
            if rst:
                self._rst(s)
            else:
                s.close()
        if rst:
            self.resets += 1

    @staticmethod
    def _rst(s: socket.socket) -> None:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        except OSError:
            pass
        s.close()

    def _close_all(self) -> None:
        for s in list(self._conns):
            self._conns.pop(s, None)
            self._rst(s)
        for s in (self._listener, self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass

    def stats(self) -> dict[str, Any]:
        """Counters and the current mode (for reports)."""
        return {
            "mode": self._mode,
            "accepted": self.accepted,
            "resets": self.resets,
            "cuts": self.cuts,
            "forwarded": self.forwarded,
        }
