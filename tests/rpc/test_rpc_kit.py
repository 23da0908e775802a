"""The conformance kit against the rpc backend, the server in another process."""

from __future__ import annotations

import pytest

import conformance
from conformance.target import Target, registered_target
from sage_queue.backends.rpc.server import ServerProcess


class TestRpcKit(conformance.QueueConformance):
    """Every capability the rpc backend declares (cross_process, cross_host, picklable_handle, batch,
    close, stats); the queues are made by the kit's own factory for registered types."""

    @pytest.fixture
    def queue_target(self, rpc_server: ServerProcess, rpc_key_file: str) -> Target:
        host, port = rpc_server.address
        target = registered_target("rpc", {"host": host, "port": port, "key_file": rpc_key_file})
        assert target.capabilities == {"cross_process", "cross_host", "picklable_handle", "batch", "close", "stats"}
        return target
