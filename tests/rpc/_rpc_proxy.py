"""A loopback TCP proxy for the rpc tests: forwards bytes, and cuts every connection on demand.

Real sockets (no mock): clients connect to the proxy's port, the proxy connects to the server.
``cut()`` resets every live connection at once (SO_LINGER 0 then close: the peers see a reset),
so replies and requests in flight are lost, as on a broken network path.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading


class CuttingProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._lock = threading.Lock()
        self._stop = False
        self.cuts = 0
        self._thread = threading.Thread(target=self._run, name="rpc-test-proxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        while not self._stop:
            for key, _ in sel.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    client, _ = self.listener.accept()
                    try:
                        upstream = socket.create_connection(self.target, timeout=2)
                    except OSError:
                        client.close()
                        continue
                    with self._lock:
                        self._pairs[client] = upstream
                        self._pairs[upstream] = client
                    sel.register(client, selectors.EVENT_READ)
                    sel.register(upstream, selectors.EVENT_READ)
                    continue
                with self._lock:
                    peer = self._pairs.get(sock)
                if peer is None:  # cut meanwhile
                    self._forget(sel, sock)
                    continue
                try:
                    data = sock.recv(65536)
                    if data:
                        peer.sendall(data)
                        continue
                except OSError:
                    pass
                self._drop(sel, sock)
            with self._lock:
                live = set(self._pairs)
            for key in list(sel.get_map().values()):
                s = key.fileobj
                if s is not self.listener and s not in live:
                    self._forget(sel, s)  # type: ignore[arg-type]
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()

    def _forget(self, sel: selectors.BaseSelector, sock: socket.socket) -> None:
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _drop(self, sel: selectors.BaseSelector, sock: socket.socket) -> None:
        with self._lock:
            peer = self._pairs.pop(sock, None)
            if peer is not None:
                self._pairs.pop(peer, None)
        self._forget(sel, sock)
        if peer is not None:
            self._forget(sel, peer)

    def cut(self) -> None:
        """Reset every live connection (both sides)."""
        with self._lock:
            socks = list(self._pairs)
            self._pairs.clear()
            self.cuts += 1
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.listener.close()
