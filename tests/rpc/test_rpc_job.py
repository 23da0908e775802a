"""host:NAME stages (spec/job.md JOB14): workers started through a launcher, queues on the rpc server
the manager starts itself. Every machine runs them with a local launcher (``[]``) under a host name
that is not this host's, so the rpc path is taken; where network namespaces can be made, they run
for real on a second "host": a namespace joined to this one by a veth pair (``ip netns exec``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import pid_alive, wait_for_a_worker
from _job_stages import N, collect, fail_on_3, noisy_square, numbers, slow_numbers, square, square_where

from sage_queue.job import HostSpec, Job, JobFailed, JobManager, QueueSpec, Stage

TESTS = Path(__file__).resolve().parent.parent
"""Holds _job_stages.py, which host workers import by ``module:name``."""
ALIAS = "localhost-alias"  # a host name that is not "localhost": queues touching it are rpc


def _local_host() -> HostSpec:
    return HostSpec(launcher=[], env={"PYTHONPATH": str(TESTS)})


def _port_free(address: tuple[str, int]) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError:
            return False
    return True


def _pipeline(host: str, src: object = numbers, mid: object = square, policy: str = "fail_fast") -> Job:
    return Job(
        queues={"a": QueueSpec("auto", maxsize=8), "b": QueueSpec("auto", maxsize=8)},
        stages=[
            Stage("src", src, output="a", where="process"),  # type: ignore[arg-type]
            Stage("mid", mid, input="a", output="b", where=f"host:{host}"),  # type: ignore[arg-type]
            Stage("sink", collect, input="b", where="thread"),
        ],
        policy=policy,  # type: ignore[arg-type]
        name=f"rpc-job-{uuid.uuid4().hex[:6]}",
    )


def _check_torn_down(manager: JobManager, rpc_address: tuple[str, int], rpc_dir: str, pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while any(map(pid_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(pid_alive, pids)), "a worker outlived the job"
    assert multiprocessing.active_children() == []
    assert _port_free(rpc_address), "the job's rpc server still holds its port"
    assert not os.path.exists(rpc_dir), "the job's rpc key file was left behind"
    assert manager._rpc_server is None


@pytest.mark.spec("JOB14", "JOB8", "JOB15")
@pytest.mark.timeout(120)
def test_host_stage_with_a_local_launcher() -> None:
    manager = JobManager(_pipeline(ALIAS, mid=noisy_square), hosts={ALIAS: _local_host()})
    manager.start()
    try:
        assert manager.rpc_address is not None and manager._rpc_dir is not None
        rpc_address, rpc_dir = manager.rpc_address, manager._rpc_dir
        key = manager._rpc_key_hex
        assert key is not None
        # The key is in no descriptor (RPC4): the manager's name its file, the worker's a variable.
        assert all(key not in d.to_json() for d in manager.descriptors.values())
        assert '"key_env"' in (manager._worker_json("a", remote=True) or "")
        result = manager.wait(timeout=100)
        pids = [w.pid for w in manager.workers() if w.pid is not None]
    finally:
        manager.teardown()
    assert sorted(result.results["sink"][0]) == [x * x for x in range(N)]
    assert result.queue_types == {"a": "rpc", "b": "rpc"}
    assert "localhost-alias" in manager.choices["a"].reason
    mid = next(e for e in result.exits if e.stage == "mid")
    assert mid.ok and mid.pid is not None and mid.pid != os.getpid()
    # Per-stage counts came back with each worker's result (JOB15).
    counts = {s: (c.items_in, c.items_out, c.unreported) for s, c in result.stages.items()}
    assert counts == {"src": (0, N, 0), "mid": (N, N, 0), "sink": (N, 0, 0)}
    _check_torn_down(manager, rpc_address, rpc_dir, pids)


@pytest.mark.spec("JOB14", "JOB10")
@pytest.mark.timeout(120)
def test_host_worker_exception_is_reported_with_its_traceback() -> None:
    manager = JobManager(_pipeline(ALIAS, mid=fail_on_3), hosts={ALIAS: _local_host()})
    with pytest.raises(JobFailed, match=r"worker mid\[0\] \(pid \d+\) raised ValueError: bad item 3") as info:
        manager.run(timeout=100)
    dead = next(e for e in info.value.exits if not e.ok)
    assert "Traceback" in dead.detail and (dead.items_in, dead.items_out) == (4, 3)  # 0..3 taken, 0..2 passed


@pytest.mark.spec("JOB14")
def test_unknown_host_is_refused_before_anything_starts() -> None:
    manager = JobManager(_pipeline("gpu7"))
    with pytest.raises(ValueError, match=r"host 'gpu7', which JobManager\(hosts=\.\.\.\) does not describe"):
        manager.run(timeout=30)
    assert manager.descriptors == {} and manager._workers == [] and manager._rpc_server is None


@pytest.mark.spec("JOB14")
def test_hosts_reaching_this_one_at_different_addresses_are_refused() -> None:
    job = Job(
        queues={"a": "auto", "b": "auto"},
        stages=[
            Stage("src", numbers, output="a", where="host:one"),
            Stage("mid", square, input="a", output="b", where="host:two"),
            Stage("sink", collect, input="b"),
        ],
    )
    hosts = {"one": HostSpec(address="127.0.0.1"), "two": HostSpec(address="127.0.0.2")}
    manager = JobManager(job, hosts=hosts)
    with pytest.raises(ValueError, match=r"different addresses \['127.0.0.1', '127.0.0.2'\]"):
        manager.run(timeout=30)
    assert manager.descriptors == {} and manager._workers == [] and manager._rpc_server is None


def _kill_mid_when_flowing(manager: JobManager) -> int:
    """SIGKILL the running mid worker once it has passed items on; its pid."""
    deadline = time.monotonic() + 60
    while (s := manager.stats()["b"]) is None or s.puts < 10:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    mid = next(w for w in manager.workers() if w.stage == "mid" and w.running)
    assert mid.pid is not None and mid.pid != os.getpid()
    os.kill(mid.pid, signal.SIGKILL)
    return mid.pid


def _run_with_a_kill(job: Job, hosts: dict[str, HostSpec]) -> tuple[JobManager, object, int, list[int]]:
    manager = JobManager(job, hosts=hosts)
    manager.start()
    assert manager.rpc_address is not None and manager._rpc_dir is not None
    rpc_address, rpc_dir = manager.rpc_address, manager._rpc_dir
    outcome: object
    try:
        killed = _kill_mid_when_flowing(manager)
        try:
            outcome = manager.wait(timeout=100)
        except JobFailed as exc:
            outcome = exc
        pids = [w.pid for w in manager.workers() if w.pid is not None]
    finally:
        manager.teardown()
    _check_torn_down(manager, rpc_address, rpc_dir, pids)
    return manager, outcome, killed, pids


@pytest.mark.spec("JOB14", "JOB10", "JOB1")
@pytest.mark.timeout(150)
def test_host_worker_sigkilled_fails_fast() -> None:
    _, outcome, killed, _ = _run_with_a_kill(_pipeline(ALIAS, src=slow_numbers), {ALIAS: _local_host()})
    assert isinstance(outcome, JobFailed)
    assert f"worker mid[0] (pid {killed}) killed by SIGKILL; job stopped: fail_fast" in str(outcome)
    assert [(e.stage, e.cause) for e in outcome.exits if not e.ok] == [("mid", "killed by SIGKILL")]


@pytest.mark.spec("JOB14", "JOB10")
@pytest.mark.timeout(150)
def test_host_worker_sigkilled_is_restarted() -> None:
    job = _pipeline(ALIAS, src=slow_numbers, policy="restart")
    _, result, killed, _ = _run_with_a_kill(job, {ALIAS: _local_host()})
    assert not isinstance(result, JobFailed), result
    got = result.results["sink"][0]  # type: ignore[attr-defined]
    # At-most-once (JOB10): nothing duplicated or invented; at most the item the dead worker held lost.
    assert len(got) == len(set(got)) and set(got) <= {x * x for x in range(N)}
    assert len(got) >= N - 1, len(got)
    mids = [(e.attempt, e.pid, e.cause) for e in result.exits if e.stage == "mid"]  # type: ignore[attr-defined]
    assert mids[0] == (0, killed, "killed by SIGKILL") and mids[1][0] == 1 and mids[1][2] == "ok"


# -- a second host: a network namespace joined by a veth pair ---------------------------------------


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def other_host() -> Iterator[tuple[str, HostSpec]]:
    """(namespace, HostSpec reaching it): a namespace with a veth pair to this one, removed after."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2): cannot make network namespaces")
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root (CAP_NET_ADMIN)")
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"sqj{tag}", f"vj{tag}", f"vq{tag}"
    octet = int(tag[:2], 16) % 250 + 1
    made_ns = made_link = False
    try:
        for step in (
            ("netns", "add", ns),
            ("link", "add", here, "type", "veth", "peer", "name", there),
            ("link", "set", there, "netns", ns),
            ("addr", "add", f"10.215.{octet}.1/30", "dev", here),
            ("link", "set", here, "up"),
            ("-n", ns, "addr", "add", f"10.215.{octet}.2/30", "dev", there),
            ("-n", ns, "link", "set", there, "up"),
            ("-n", ns, "link", "set", "lo", "up"),
        ):
            out = _ip(*step)
            if out.returncode != 0:
                pytest.skip(f"cannot make a network namespace pair here (`ip {' '.join(step)}`: {out.stderr.strip()})")
            made_ns = made_ns or step[:2] == ("netns", "add")
            made_link = made_link or step[:2] == ("link", "add")
        yield (
            ns,
            HostSpec(launcher=["ip", "netns", "exec", ns], address=f"10.215.{octet}.1", env={"PYTHONPATH": str(TESTS)}),
        )
    finally:
        if made_link:
            _ip("link", "del", here)  # removes both ends
        if made_ns:
            _ip("netns", "del", ns)


@pytest.mark.spec("JOB14", "JOB8")
@pytest.mark.timeout(150)
def test_host_stage_on_another_network_namespace(other_host: tuple[str, HostSpec]) -> None:
    _, spec = other_host
    manager = JobManager(_pipeline("nsb", mid=square_where), hosts={"nsb": spec})
    manager.start()
    try:
        assert manager.rpc_address is not None and manager.rpc_address[0] == spec.address
        rpc_address, rpc_dir = manager.rpc_address, manager._rpc_dir
        assert rpc_dir is not None
        result = manager.wait(timeout=120)
        pids = [w.pid for w in manager.workers() if w.pid is not None]
    finally:
        manager.teardown()
    got = result.results["sink"][0]
    assert sorted(x for _, x in got) == [x * x for x in range(N)]
    where = {w for w, _ in got}
    assert len(where) == 1 and where != {os.readlink("/proc/self/ns/net")}  # it ran on the other "host"
    assert result.queue_types == {"a": "rpc", "b": "rpc"}
    _check_torn_down(manager, rpc_address, rpc_dir, pids)


@pytest.mark.spec("JOB14", "JOB10")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("policy", ["fail_fast", "restart"])
def test_worker_on_another_network_namespace_sigkilled(other_host: tuple[str, HostSpec], policy: str) -> None:
    _, spec = other_host
    _, outcome, killed, _ = _run_with_a_kill(_pipeline("nsb", src=slow_numbers, policy=policy), {"nsb": spec})
    if policy == "fail_fast":
        assert isinstance(outcome, JobFailed)
        assert f"worker mid[0] (pid {killed}) killed by SIGKILL" in str(outcome)
    else:
        assert not isinstance(outcome, JobFailed), outcome
        got = outcome.results["sink"][0]  # type: ignore[attr-defined]
        assert len(got) == len(set(got)) and set(got) <= {x * x for x in range(N)} and len(got) >= N - 1
        assert [e.cause for e in outcome.exits if e.stage == "mid"] == ["killed by SIGKILL", "ok"]  # type: ignore[attr-defined]


# -- the manager killed: its host workers and its rpc server go too -----------------------------------

_MANAGER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {here!r})
    from sage_queue.job import HostSpec, Job, JobManager, QueueSpec, Stage
    if __name__ == "__main__":
        job = Job(queues={{"a": QueueSpec("auto", maxsize=4)}},
                  stages=[Stage("src", "_job_stages:forever_with_pid", output="a", where="host:alias"),
                          Stage("sink", "_job_stages:count", input="a", where="thread")])
        manager = JobManager(job, hosts={{"alias": HostSpec(launcher=[], env={{"PYTHONPATH": {here!r}}})}})
        manager.start()
        print(json.dumps([manager.rpc_address, manager._rpc_dir]), flush=True)
        manager.wait()
""")


@pytest.mark.spec("JOB1", "JOB14")
@pytest.mark.timeout(120)
def test_manager_sigkilled_takes_its_host_workers_and_rpc_server_along(tmp_path: Path) -> None:
    script = tmp_path / "manager.py"
    script.write_text(_MANAGER.format(here=str(TESTS)))
    env = dict(os.environ, SAGE_JOB_TEST_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    worker_pids: list[int] = []
    rpc_dir = None
    try:
        assert proc.stdout is not None
        (host, port), rpc_dir = json.loads(proc.stdout.readline())
        worker_pids = wait_for_a_worker(proc, tmp_path, time.monotonic() + 60)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while (any(map(pid_alive, worker_pids)) or not _port_free((host, port))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(pid_alive, worker_pids)), "a host worker outlived its manager (its stdin ended)"
        assert _port_free((host, port)), "the job's rpc server outlived its manager"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in worker_pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if rpc_dir is not None:  # nothing ran in the killed manager to remove its key directory
            shutil.rmtree(rpc_dir, ignore_errors=True)
