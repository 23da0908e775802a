"""``rpc``: queues served over ZeroMQ by an ``RPCQueueServer`` (spec/backends/rpc.md).

``wire`` (framing, keys, serializers) needs no pyzmq; ``client``
(``RPCQueueStub``) and ``server`` (``RPCQueueServer``, ``sage-queue serve``) import it: import
them by their module, on first use, so that ``import sage_queue`` never imports zmq.
"""

from __future__ import annotations

from ...errors import QueueConnectionError  # its error, defined with the others (spec E16)

__all__ = ["QueueConnectionError"]
