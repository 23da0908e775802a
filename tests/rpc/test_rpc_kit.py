"""The conformance kit against the rpc backend, the server in another process.

When network namespaces can be made here, the server listens on one end of a veth pair and the
kit's cross_host test (Q42) runs its remote child in the other namespace, a second host as far as
the network goes; otherwise the server is on loopback and that one test skips, saying why.
"""

from __future__ import annotations

import pytest

import conformance
from conformance.target import Target, registered_target
from sage_queue.backends.rpc.server import ServerProcess


class TestRpcKit(conformance.QueueConformance):
    """Every capability the rpc backend declares (cross_process, cross_host, picklable_handle, batch,
    close, stats); the queues are made by the kit's own factory for registered types."""

    @pytest.fixture
    def queue_target(
        self,
        rpc_server: ServerProcess,
        rpc_key_file: str,
        remote_host: tuple[ServerProcess, str] | str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> Target:
        server = rpc_server
        if isinstance(remote_host, tuple):
            server, remote_python = remote_host
            monkeypatch.setenv("CONFORMANCE_REMOTE_PYTHON", remote_python)
        host, port = server.address
        target = registered_target("rpc", {"host": host, "port": port, "key_file": rpc_key_file})
        assert target.capabilities == {"cross_process", "cross_host", "picklable_handle", "batch", "close", "stats"}
        return target


class TestRpcKitDurable(conformance.QueueConformance):
    """The kit again against a durable server (--data-dir): every operation goes through SQLite."""

    @pytest.fixture
    def queue_target(self, rpc_durable_server: ServerProcess, rpc_key_file: str) -> Target:
        host, port = rpc_durable_server.address
        return registered_target("rpc", {"host": host, "port": port, "key_file": rpc_key_file, "durable": True})
