"""Ray instances this library starts listen and advertise on 127.0.0.1 only (RAY16).

The machine's rule: network on loopback only. Ray on Linux otherwise takes the machine's outward
address (the source of its route towards 8.8.8.8) as a node's address, advertises it, binds its
gRPC servers on every address (``::``) and connects its processes to each other through it.

What is checked, on the session's instance (started as every instance of this library is,
``sage_queue.backends._ray.start_local``) and on the embedded default (RAY1, in a subprocess):
the GCS address and every node's ``NodeManagerAddress`` are 127.0.0.1, a Ray worker sees
127.0.0.1 as its node's address, a plain Python process (no sage_queue) joins by ``RAY_ADDRESS``,
and every TCP socket of the processes involved (this process and its descendants: GCS, raylet,
agents, workers, the joining child), listening or connected, is on a loopback address —
read from ``/proc/net/tcp{,6}`` and ``/proc/<pid>/fd`` (Linux).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import ray
from ray_support import open_handle

from sage_queue import QueueDescriptor, resolve_descriptor

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp (Linux)")

_LISTEN = "0A"  # the TCP state LISTEN in /proc/net/tcp


def descendants(root: int) -> set[int]:
    """``root`` and every process below it (Ray's GCS, raylet and agents are children of the driver
    that started them; workers are children of the raylet)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _address(field: str, family: socket.AddressFamily) -> tuple[str, int]:
    """``0100007F:1F90`` (tcp) or 32 hex digits:port (tcp6): each 32-bit word in host (little-endian) order."""
    hexip, hexport = field.split(":")
    raw = bytes.fromhex(hexip)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, raw), int(hexport, 16)


class Sock(NamedTuple):
    pid: int
    command: str
    listening: bool
    local: tuple[str, int]
    remote: tuple[str, int]


def tcp_sockets(pids: set[int]) -> list[Sock]:
    """Every TCP socket (IPv4 and IPv6) the processes ``pids`` hold."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone meanwhile
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found = []
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 here
            continue
        for line in lines:
            fields = line.split()
            pid = owner.get(fields[9])  # the socket's inode
            if pid is None:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read().split(b"\0")[0].decode(errors="replace")
            except OSError:
                command = "?"
            local, remote = _address(fields[1], family), _address(fields[2], family)
            found.append(Sock(pid, command, fields[3] == _LISTEN, local, remote))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1, an IPv6 socket's view of 127.0.0.1
    return ip.is_loopback


def not_on_loopback(pids: set[int]) -> list[Sock]:
    """The TCP sockets of ``pids`` that are not loopback-only: a listening socket bound to anything but
    a loopback address (the wildcards 0.0.0.0 and :: included: they accept on every address), or a
    connection with either end elsewhere."""
    return [
        s
        for s in tcp_sockets(pids)
        if not is_loopback(s.local[0]) or (not s.listening and not is_loopback(s.remote[0]))
    ]


@ray.remote
def _node_address_seen_by_a_worker() -> str:
    return str(ray.util.get_node_ip_address())


@ray.remote(num_cpus=0)
class _Echo:
    def echo(self, x: int) -> int:
        return x


@pytest.mark.spec("RAY16")
@pytest.mark.timeout(60)
def test_the_session_instance_listens_advertises_and_connects_on_loopback_only(ray_address: str) -> None:
    assert ray_address.rsplit(":", 1)[0] == "127.0.0.1", ray_address
    nodes = ray.nodes()
    assert nodes and {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}, nodes
    assert ray.get(_node_address_seen_by_a_worker.remote(), timeout=30) == "127.0.0.1"
    # A queue and an actor: their worker processes and the connections to them exist while we look.
    name = f"t_{uuid.uuid4().hex[:12]}"
    q = resolve_descriptor(QueueDescriptor.create("ray_actor", name, 0))
    echo = _Echo.remote()  # type: ignore[attr-defined]
    try:
        q.put("x")
        assert q.get(timeout=10) == "x"
        assert ray.get(echo.echo.remote(7), timeout=30) == 7
        pids = descendants(os.getpid())
        sockets = tcp_sockets(pids)
        # Not vacuous: the GCS listens, and this driver is connected to it.
        port = int(ray_address.rsplit(":", 1)[1])
        assert any(s.listening and s.local[1] == port for s in sockets), sockets
        assert any(not s.listening and s.remote[1] == port for s in sockets if s.pid == os.getpid()), sockets
        assert not_on_loopback(pids) == []
    finally:
        ray.kill(echo)
        q.destroy()


_EMBEDDED = textwrap.dedent(
    """
    import json, os, subprocess, sys
    import ray
    from sage_queue import QueueDescriptor, resolve_descriptor
    from test_ray_loopback import descendants, not_on_loopback, tcp_sockets
    assert not ray.is_initialized() and "RAY_ADDRESS" not in os.environ
    q = resolve_descriptor(QueueDescriptor.create("ray_actor", "loopback", 0))  # RAY1: starts a local instance
    q.put("from parent")
    # A plain Ray driver (no sage_queue), started afterwards, joining by the RAY_ADDRESS it inherits.
    # (alarm: a join that retries a wrong address forever ends, and this script reports it.)
    plain = subprocess.Popen(
        [sys.executable, "-c", "import signal; signal.alarm(60); import ray, sys; ray.init(log_to_driver=False); "
         "print(ray.get_runtime_context().gcs_address, ray.nodes()[0]['NodeManagerAddress'], flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    joined = plain.stdout.readline().split()
    # A sage_queue process, started afterwards, holding only the descriptor.
    child = ("import sys; from sage_queue import resolve_descriptor as r; q = r(sys.argv[1]); "
             "assert q.get(timeout=20) == 'from parent'; q.put('from child')")
    d = QueueDescriptor.create("ray_actor", "loopback", 0).to_json()
    out = subprocess.run([sys.executable, "-c", child, d], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    pids = descendants(os.getpid())
    report = {
        "gcs": ray.get_runtime_context().gcs_address,
        "env": os.environ["RAY_ADDRESS"],
        "nodes": sorted({n["NodeManagerAddress"] for n in ray.nodes()}),
        "plain": joined,
        "from_child": q.get(timeout=10),
        "sockets": len(tcp_sockets(pids)),
        "plain_sockets": len(tcp_sockets({plain.pid})),
        "bad": not_on_loopback(pids),
    }
    plain.stdin.close()
    plain.wait(timeout=60)
    q.destroy()
    print(json.dumps(report))
    """
)


@pytest.mark.spec("RAY1", "RAY16")
@pytest.mark.timeout(150)
def test_the_embedded_instance_is_loopback_only_and_a_plain_process_joins_it() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _EMBEDDED], capture_output=True, text=True, timeout=140, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["gcs"].startswith("127.0.0.1:") and report["env"] == report["gcs"], report
    assert report["nodes"] == ["127.0.0.1"], report
    assert report["plain"] == [report["gcs"], "127.0.0.1"], report
    assert report["from_child"] == "from child"
    assert report["sockets"] > 0 and report["plain_sockets"] > 0, report  # the check saw them
    assert report["bad"] == [], report


@pytest.mark.spec("RAY16")
def test_the_check_sees_a_socket_off_loopback() -> None:
    """``not_on_loopback`` is not vacuous: a socket of this process listening on every address is reported."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        bad = not_on_loopback({os.getpid()})
        assert any(b.listening and b.local == ("0.0.0.0", port) for b in bad), bad
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        mine = [b for b in tcp_sockets({os.getpid()}) if b.local == ("127.0.0.1", port)]
        assert len(mine) == 1 and mine[0].listening, mine
        assert mine[0] not in not_on_loopback({os.getpid()})


_UNRELATED = (
    "import signal, sys; signal.alarm(60); from sage_queue import resolve_descriptor; "
    "q = resolve_descriptor(sys.argv[1]); print(q.get(timeout=20), flush=True); q.close()"
)


@pytest.mark.spec("RAY1", "RAY16")
@pytest.mark.timeout(120)
def test_an_unrelated_process_joins_by_the_descriptors_loopback_address(ray_address: str, made: list[Any]) -> None:
    """A process that inherited nothing from us (no RAY_ADDRESS, not Ray's loopback switch), given a
    descriptor that names our instance by ``127.0.0.1:port``, reaches the queue. Before, Ray rewrote the
    address into the machine's outward one, where a loopback-only instance does not listen, and the
    child retried that for ever (found by attacking: its resolve never returned).

    ``named``: the descriptor names the address; else it names none (this process found the cluster by
    RAY_ADDRESS) and the handle's ``descriptor`` must name it (RAY1): before, its JSON sent an unrelated
    process to a new local instance and a new, empty queue of the same name."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    for named in (True, False):
        address = {"address": ray_address} if named else {}
        q = open_handle(made, QueueDescriptor.create("ray_actor", f"t_{uuid.uuid4().hex[:12]}", 0, **address))
        assert q.descriptor.metadata["address"] == ray_address
        assert resolve_descriptor(q.descriptor.to_json()).descriptor == q.descriptor
        q.put("to an unrelated process")
        out = subprocess.run(
            [sys.executable, "-c", _UNRELATED, q.descriptor.to_json()],
            capture_output=True,
            text=True,
            timeout=90,
            env=env,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip().splitlines()[-1] == "to an unrelated process"


_DEAD = (
    "import sys, time; from sage_queue import QueueNotFound, resolve_descriptor; t = time.monotonic()\n"
    "try:\n    resolve_descriptor(sys.argv[1])\nexcept QueueNotFound as exc:\n"
    "    print(round(time.monotonic() - t, 1), exc, flush=True)\n"
)


@pytest.mark.spec("RAY1")
@pytest.mark.timeout(120)
def test_a_descriptor_naming_a_cluster_that_is_gone_raises_queue_not_found_promptly() -> None:
    """Before, resolve never returned (Ray's join retried the dead address for minutes; killed after 200 s)."""
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        desc = QueueDescriptor.create("ray_actor", "gone", 0, address=f"127.0.0.1:{port}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = subprocess.run(
            [sys.executable, "-c", _DEAD, desc.to_json()], capture_output=True, text=True, timeout=90, env=env
        )
    assert out.returncode == 0, out.stderr[-3000:]
    seconds, _, message = out.stdout.strip().partition(" ")
    assert f"127.0.0.1:{port}" in message
    assert float(seconds) < 30, out.stdout


_JOIN = (
    "import sys; from sage_queue import QueuePermissionError, resolve_descriptor\n"
    "try:\n    resolve_descriptor(sys.argv[1])\n"
    "except QueuePermissionError as exc:\n    print('refused:', exc, flush=True)\n"
)


@pytest.mark.spec("RAY1")
@pytest.mark.timeout(90)
@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user (uid 65534) needs root")
def test_a_descriptor_naming_another_users_listener_on_loopback_is_refused() -> None:
    """A descriptor written by another user, naming *their* listener on this machine's loopback: joining it
    as a Ray driver would unpickle what it sends (their code, run as us). Refused before Ray is asked to join.
    The listener is a plain socket of a process that became uid 65534 (forked: /root is not theirs to exec)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the other user's process
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            os.write(write_end, str(listener.getsockname()[1]).encode())
            os.close(write_end)
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        port = int(os.read(read_end, 64))
        desc = QueueDescriptor.create("ray_actor", "theirs", 0, address=f"127.0.0.1:{port}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = subprocess.run(
            [sys.executable, "-c", _JOIN, desc.to_json()], capture_output=True, text=True, timeout=60, env=env
        )
    finally:
        os.close(read_end)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("refused:") and "uid 65534" in out.stdout, out.stdout + out.stderr[-2000:]
