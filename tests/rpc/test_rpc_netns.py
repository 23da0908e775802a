"""Two hosts: the server in one network namespace, the clients in another, joined by a veth pair.

The namespaces and the veth pair are made and removed by the test; it is skipped (saying why)
where the machine cannot make them (no ``ip``, not root, no CAP_NET_ADMIN, a kernel without netns).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from sage_queue import QueueDescriptor, QueueNotFound, resolve_descriptor

TIMEOUT = 60


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str, str]]:
    """(server namespace, client namespace, server address)."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2): cannot make network namespaces")
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root (CAP_NET_ADMIN)")
    tag = uuid.uuid4().hex[:6]
    srv, cli = f"sqs{tag}", f"sqc{tag}"
    made: list[str] = []
    try:
        for ns in (srv, cli):
            out = _ip("netns", "add", ns)
            if out.returncode != 0:
                pytest.skip(f"cannot make a network namespace here: {out.stderr.strip()}")
            made.append(ns)
        octet = int(tag[:2], 16) % 250 + 1
        steps = [
            ("link", "add", f"vs{tag}", "type", "veth", "peer", "name", f"vc{tag}"),
            ("link", "set", f"vs{tag}", "netns", srv),
            ("link", "set", f"vc{tag}", "netns", cli),
            ("-n", srv, "addr", "add", f"10.213.{octet}.1/30", "dev", f"vs{tag}"),
            ("-n", cli, "addr", "add", f"10.213.{octet}.2/30", "dev", f"vc{tag}"),
            ("-n", srv, "link", "set", f"vs{tag}", "up"),
            ("-n", cli, "link", "set", f"vc{tag}", "up"),
            ("-n", srv, "link", "set", "lo", "up"),
            ("-n", cli, "link", "set", "lo", "up"),
        ]
        for step in steps:
            out = _ip(*step)
            if out.returncode != 0:
                pytest.skip(f"cannot set up the veth pair (`ip {' '.join(step)}`): {out.stderr.strip()}")
        yield srv, cli, f"10.213.{octet}.1"
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            _ip("netns", "del", ns)


CLIENT = """
import sys, json
from sage_queue import resolve_descriptor
q = resolve_descriptor(sys.stdin.readline())
role = sys.argv[1]
if role == "produce":
    q.put_many([("item", i) for i in range(100)])
    for i in range(100, 200):
        q.put(("item", i))
    q.put(None)
else:
    got = []
    while True:
        item = q.get(timeout=30)
        if item is None:
            break
        got.append(item[1])
    print(json.dumps(got))
q.close()
"""


@pytest.mark.spec("RPC1", "RPC3")
@pytest.mark.timeout(120)
def test_server_and_clients_on_two_hosts(two_hosts: tuple[str, str, str], rpc_key_file: str) -> None:
    srv_ns, cli_ns, address = two_hosts
    server = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            srv_ns,
            sys.executable,
            "-m",
            "sage_queue.backends.rpc.server",
            "--host",
            address,
            "--port",
            "0",
            "--key-file",
            rpc_key_file,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().strip()
        assert line.startswith(f"listening on tcp://{address}:"), line
        port = int(line.rsplit(":", 1)[1])
        desc = QueueDescriptor.create("rpc", "two-hosts", host=address, port=port, key_file=rpc_key_file)
        # The server is another host: not reachable from this namespace, only from the client one.
        with pytest.raises(QueueNotFound):
            resolve_descriptor(
                QueueDescriptor.create(
                    "rpc", "two-hosts", host=address, port=port, key_file=rpc_key_file, connect_timeout=0.5
                )
            )
        clients = [
            subprocess.Popen(
                ["ip", "netns", "exec", cli_ns, sys.executable, "-c", CLIENT, role],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for role in ("consume", "produce")
        ]
        for c in clients:  # both get the descriptor before either is waited for
            assert c.stdin is not None
            c.stdin.write(desc.to_json() + "\n")
            c.stdin.close()
            c.stdin = None  # communicate() must not touch it again
        outs = []
        for c in clients:
            try:
                outs.append(c.communicate(timeout=TIMEOUT))
            finally:
                if c.poll() is None:
                    c.kill()
                    c.wait()
        for c, (_, err) in zip(clients, outs, strict=True):
            assert c.returncode == 0, err[-2000:]
        assert json.loads(outs[0][0]) == list(range(200))  # all of them, in order (one producer)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
