"""Fixtures of the rpc tests: a key file and a server in a child process (stopped, port freed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


@pytest.fixture(scope="session")
def rpc_durable_server(rpc_key_file: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One durable server (SQLite in a temporary --data-dir) in a child process for the session."""
    server = RPCQueueServer.spawn(key_file=rpc_key_file, data_dir=str(tmp_path_factory.mktemp("rpcdata")))
    try:
        yield server
    finally:
        server.stop()


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture(scope="session")
def remote_host(rpc_key_file: str) -> Iterator[tuple[ServerProcess, str] | str]:
    """A second "host" for the kit's cross_host test: a network namespace joined to this one by a
    veth pair, and a server bound to this side's veth address. Yields (server, remote python
    command), or the reason it cannot be made here (then the kit's cross_host test skips)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        yield "cross_host needs network namespaces: `ip` and root (CAP_NET_ADMIN)"
        return
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"sqk{tag}", f"vk{tag}", f"vn{tag}"
    octet = int(tag[:2], 16) % 250 + 1
    made_ns = made_link = False
    server = None
    try:
        for step in (
            ("netns", "add", ns),
            ("link", "add", here, "type", "veth", "peer", "name", there),
            ("link", "set", there, "netns", ns),
            ("addr", "add", f"10.214.{octet}.1/30", "dev", here),
            ("link", "set", here, "up"),
            ("-n", ns, "addr", "add", f"10.214.{octet}.2/30", "dev", there),
            ("-n", ns, "link", "set", there, "up"),
            ("-n", ns, "link", "set", "lo", "up"),
        ):
            out = _ip(*step)
            if out.returncode != 0:
                yield f"cannot make a network namespace pair here (`ip {' '.join(step)}`: {out.stderr.strip()})"
                return
            made_ns = made_ns or step[:2] == ("netns", "add")
            made_link = made_link or step[:2] == ("link", "add")
        server = RPCQueueServer.spawn(host=f"10.214.{octet}.1", key_file=rpc_key_file)
        yield server, f"ip netns exec {ns} {sys.executable}"
    finally:
        if server is not None:
            server.stop()
        if made_link:
            _ip("link", "del", here)  # removes both ends
        if made_ns:
            _ip("netns", "del", ns)


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
            "rpc",
            name or f"t_{uuid.uuid4().hex[:12]}",
            maxsize,
            host=host,
            port=port,
            key_file=self.key_file,
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
