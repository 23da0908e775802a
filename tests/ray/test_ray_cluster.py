"""Plain Python processes joining a Ray cluster by address; lifetime; Ray missing (RAY1, RAY4, RAY6).

``head_node`` starts a separate head with ``ray start --head`` on 127.0.0.1, in its own
``--temp-dir`` (so that no other process on this shared machine finds it as "the latest
cluster"), and stops it by killing exactly the processes that belong to that temp dir and their
descendants (never ``ray stop``, which would stop every Ray instance of this user).
``--node-ip-address=127.0.0.1`` alone is not enough: ``ray start`` rewrites it into the machine's
outward address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the machine's rule: loopback only),
and the processes that join it need that variable too (the session's fixture leaves it set, RAY16).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_ray_loopback import not_on_loopback, tcp_sockets

from sage_queue import QueueDescriptor, resolve_descriptor
from sage_queue.backends._ray import LOOPBACK_ENV

RAY_BIN = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_of(marker: str) -> set[int]:
    """Processes whose command line mentions ``marker``, and all their descendants."""
    parent: dict[int, int] = {}
    roots: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                parent[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if marker.encode() in cmd:
            roots.add(int(entry))
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def _stop(marker: str) -> None:
    # SIGTERM first (Ray's processes clean up their sockets), SIGKILL for what is still there after 1 s.
    for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        pids = _pids_of(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while _pids_of(marker) and time.monotonic() < end:
            time.sleep(0.1)
        if not _pids_of(marker):
            return


@pytest.fixture(scope="module")
def head(ray_address: str) -> Iterator[tuple[str, str]]:
    """``(host:port, temp dir)`` of a separate single-node cluster started with ``ray start --head``."""
    temp_dir = tempfile.mkdtemp(prefix="sqr", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    cmd = [
        str(RAY_BIN),
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[LOOPBACK_ENV] = "0"  # else ray start rewrites --node-ip-address=127.0.0.1 (see the module docstring)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, f"ray start failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        _stop(temp_dir)
        left = _pids_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"the head node left processes running: {sorted(left)}"


@pytest.fixture(scope="module")
def head_node(head: tuple[str, str]) -> str:
    """``host:port`` of the separate head (``head``)."""
    return head[0]


_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from sage_queue import resolve_descriptor
    desc, action = sys.argv[1], sys.argv[2]
    q = resolve_descriptor(desc)
    import ray
    out = {"address": ray.get_runtime_context().gcs_address}
    if action == "put":
        for i in range(5):
            q.put(("child", i))
        q.put(bytearray(b"ba"))
    elif action == "get":
        out["items"] = [repr(q.get(timeout=30)) for _ in range(6)]
    elif action == "put_one_and_exit":
        q.put("left behind")
    elif action == "destroy":
        q.destroy()
    print(json.dumps(out))
    """
)


def _child(desc: QueueDescriptor, action: str, env_address: Any = None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if env_address is not None:
        env["RAY_ADDRESS"] = env_address
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, desc.to_json(), action], env=env, capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == 0, f"child {action} failed: {proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.spec("RAY1", "RAY2", "RAY6", "RAY16")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("queue_type", ["ray_actor", "ray_queue"])
def test_plain_processes_reach_one_queue_by_address(queue_type: str, head_node: str) -> None:
    """One process finds the cluster through $RAY_ADDRESS, the other through the descriptor's address.

    (The kit's cross-process tests cover children joining by the descriptor's address too, on the
    session's instance; this one is a separately started head node, as a deployment has.)"""
    name = f"t_{uuid.uuid4().hex[:12]}"
    no_address = QueueDescriptor.create(queue_type, name, 10)
    with_address = QueueDescriptor.create(queue_type, name, 10, address=head_node)
    try:
        put = _child(no_address, "put", env_address=head_node)
        got = _child(with_address, "get")
        # the address as named: Ray did not rewrite 127.0.0.1 into the outward address (RAY16)
        assert put["address"] == head_node and got["address"] == head_node, (put, got)
        assert got["items"] == [repr(("child", i)) for i in range(5)] + ["bytearray(b'ba')"]
    finally:
        _child(with_address, "destroy")


@pytest.mark.spec("RAY16")
@pytest.mark.timeout(120)
def test_ray_start_head_on_loopback_listens_advertises_and_connects_there(head: tuple[str, str]) -> None:
    """The head (``ray start --head --node-ip-address=127.0.0.1``, with the variable) and a plain driver
    joining it: the node's address is 127.0.0.1 and every TCP socket of the head's processes is on loopback."""
    address, temp_dir = head
    plain = (
        "import json, ray; ray.init(log_to_driver=False); "
        "print(json.dumps([ray.get_runtime_context().gcs_address, [n['NodeManagerAddress'] for n in ray.nodes()]]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ADDRESS=address, **{LOOPBACK_ENV: "0"})
    proc = subprocess.run([sys.executable, "-c", plain], env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [address, ["127.0.0.1"]]
    pids = _pids_of(temp_dir)
    sockets = tcp_sockets(pids)
    port = int(address.rsplit(":", 1)[1])
    assert any(s.listening and s.local[1] == port for s in sockets), sockets  # the GCS, seen
    assert not_on_loopback(pids) == []


@pytest.mark.spec("RAY4")
@pytest.mark.timeout(180)
def test_lifetime_detached_outlives_its_creator_non_detached_does_not(head_node: str) -> None:
    name = f"t_{uuid.uuid4().hex[:12]}"
    detached = QueueDescriptor.create("ray_actor", f"{name}_d", 0, address=head_node)
    owned = QueueDescriptor.create("ray_actor", f"{name}_o", 0, address=head_node, lifetime="non_detached")
    _child(detached, "put_one_and_exit")
    _child(owned, "put_one_and_exit")
    try:
        script = textwrap.dedent(
            f"""
            import json, queue
            from sage_queue import resolve_descriptor
            d = resolve_descriptor({detached.to_json()!r})
            o = resolve_descriptor({owned.to_json()!r})
            out = [d.get(timeout=10), o.qsize()]
            o.destroy()
            print(json.dumps(out))
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=90,
            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        # the detached queue kept its item after its creator exited; the owned one died with it (a new, empty one)
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["left behind", 0]
    finally:
        _child(detached, "destroy")


@pytest.mark.spec("RAY1")
def test_without_ray_parse_works_and_resolve_names_the_install(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["ray"] = None  # "import ray" raises ImportError, as where it is not installed
        from sage_queue import BackendUnavailable, QueueDescriptor, resolve_descriptor
        extra = {"ray_actor": {"max_restarts": 2}, "ray_queue": {}}
        for t in ("ray_actor", "ray_queue"):
            d = QueueDescriptor.from_json(QueueDescriptor.create(t, "n", 3, namespace="x", **extra[t]).to_json())
            try:
                resolve_descriptor(d)
            except BackendUnavailable as exc:
                assert "pip install sage-queue[ray]" in str(exc), str(exc)
                print(t, "ok")
            else:
                raise SystemExit(t + ": resolved without ray")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ray_actor", "ok", "ray_queue", "ok"]


@pytest.mark.spec("RAY4")
def test_the_queue_actor_reserves_no_cpu(ray_address: str) -> None:
    """The session has 2 CPUs; 4 queues must all start (a queue holding a CPU would block the 3rd)."""
    handles = [
        resolve_descriptor(QueueDescriptor.create("ray_actor", f"t_{uuid.uuid4().hex[:12]}", 0, address=ray_address))
        for _ in range(4)
    ]
    try:
        for h in handles:
            h.put(1)
            assert h.get(timeout=5) == 1
    finally:
        for h in handles:
            h.destroy()


@pytest.mark.spec("D10", "RAY4", "RAY10")
@pytest.mark.parametrize(
    ("queue_type", "metadata", "problem"),
    [
        ("ray_actor", {"lifetime": "forever"}, "lifetime"),
        ("ray_queue", {"lifetime": None}, "lifetime"),
        ("ray_actor", {"address": ""}, "address"),
        ("ray_queue", {"namespace": ""}, "namespace"),
        ("ray_actor", {"max_restarts": -2}, "max_restarts"),
        ("ray_actor", {"max_restarts": True}, "max_restarts"),
        ("ray_actor", {"max_restarts": 1.5}, "max_restarts"),
    ],
)
def test_bad_ray_metadata_is_refused_when_described(queue_type: str, metadata: dict[str, Any], problem: str) -> None:
    from sage_queue import InvalidMetadata

    with pytest.raises(InvalidMetadata, match=problem):
        QueueDescriptor.create(queue_type, "n", 0, **metadata)


def test_ray_metadata_keeps_only_what_was_given() -> None:
    d = QueueDescriptor.create("ray_actor", "n", 2, lifetime="non_detached", max_restarts=-1, address="h:1")
    assert dict(d.metadata) == {
        "actor_name": "n",
        "maxsize": 2,
        "lifetime": "non_detached",
        "max_restarts": -1,
        "address": "h:1",
    }
    assert dict(QueueDescriptor.create_ray_queue(3, "q").metadata) == {"actor_name": "q", "maxsize": 3}


@pytest.mark.spec("RAY1")
@pytest.mark.timeout(120)
def test_embedded_default_starts_a_local_instance_its_children_join() -> None:
    """No address, no RAY_ADDRESS, Ray not initialised: resolve starts a local instance, and a
    subprocess started afterwards, holding only the JSON, reaches the same queue through it."""
    script = textwrap.dedent(
        """
        import os, subprocess, sys
        import ray
        from sage_queue import QueueDescriptor, resolve_descriptor
        assert not ray.is_initialized() and "RAY_ADDRESS" not in os.environ
        d = QueueDescriptor.create("ray_actor", "embedded", 0)
        q = resolve_descriptor(d)
        q.put("from parent")
        child = ("import sys; from sage_queue import resolve_descriptor as r; q = r(sys.argv[1]); "
                 "assert q.get(timeout=20) == 'from parent'; q.put('from child')")
        out = subprocess.run([sys.executable, "-c", child, d.to_json()], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        print(q.get(timeout=10), ray.get_runtime_context().gcs_address == os.environ["RAY_ADDRESS"])
        q.destroy()
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["from", "child", "True"]
