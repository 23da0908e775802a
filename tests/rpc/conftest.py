"""Fixtures of the rpc tests: a key file and a server in a child process (stopped, port freed)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("zmq", reason="the rpc backend needs pyzmq (pip install sage-queue[rpc])")

from sage_queue import QueueDescriptor, resolve_descriptor
from sage_queue.backends.rpc.server import RPCQueueServer, ServerProcess
from sage_queue.backends.rpc.wire import generate_key_file


@pytest.fixture(scope="session")
def rpc_key_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("rpckey") / "rpc.key"
    generate_key_file(str(path))
    return str(path)


@pytest.fixture(scope="session")
def rpc_server(rpc_key_file: str) -> Iterator[ServerProcess]:
    """One non-durable server in a child process for the whole session."""
    server = RPCQueueServer.spawn(key_file=rpc_key_file)
    try:
        yield server
    finally:
        server.stop()


class RpcFactory:
    """``factory(maxsize)`` making fresh queues on a server; cleanup destroys them."""

    def __init__(self, address: tuple[str, int], key_file: str, **metadata: Any) -> None:
        self.address = address
        self.key_file = key_file
        self.metadata = metadata
        self.made: list[Any] = []

    def describe(self, maxsize: int = 0, name: str | None = None, **extra: Any) -> QueueDescriptor:
        host, port = self.address
        return QueueDescriptor.create(
            "rpc", name or f"t_{uuid.uuid4().hex[:12]}", maxsize, host=host, port=port, key_file=self.key_file,
            **{**self.metadata, **extra},
        )

    def __call__(self, maxsize: int = 0, **extra: Any) -> Any:
        handle = resolve_descriptor(self.describe(maxsize, **extra))
        self.made.append(handle)
        return handle

    def cleanup(self) -> None:
        made, self.made = self.made, []
        for h in made:
            try:
                if h.closed:
                    d = h.descriptor.to_dict()
                    d["metadata"]["create"] = False
                    h = resolve_descriptor(d)
                h.destroy()
            except Exception:  # QueueClosed/QueueDestroyed/QueueNotFound: gone already
                pass


@pytest.fixture
def rpc(rpc_server: ServerProcess, rpc_key_file: str) -> Iterator[RpcFactory]:
    factory = RpcFactory(rpc_server.address, rpc_key_file)
    try:
        yield factory
    finally:
        factory.cleanup()
