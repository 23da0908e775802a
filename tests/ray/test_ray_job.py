"""where="ray" stages (spec/job.md JOB13): each replica a Ray task that resolves its queues from JSON,
supervised without blocking, reported with a cause when it dies, restarted or failed fast, and
cancelled at teardown; queues touched by Ray workers are ray_actor (JOB8). One Ray per session
(conftest.py), whose leak guard fails the run on any sage-queue actor left alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from _helpers import pid_alive, recorded_pids, wait_for_a_worker
from _job_stages import N, collect, fail_on_3, numbers, slow_numbers, square, square_with_pid
from ray_support import leaked_actors

from sage_queue import QueueDescriptor
from sage_queue.backends._ray import full_name, namespace_of
from sage_queue.job import Job, JobFailed, JobManager, JobResult, QueueSpec, Stage


def _actor_names(manager: JobManager) -> set[str]:
    return {
        f"{namespace_of(dict(d.metadata))}/{full_name(d.queue_type, dict(d.metadata))}"
        for d in manager.descriptors.values()
        if d.queue_type in ("ray_actor", "ray_queue")
    }


def _check_nothing_left(manager: JobManager) -> None:
    """The job's queue actors are gone and every Ray task of the job has ended (JOB1, JOB13)."""
    names = _actor_names(manager)
    assert names, "the job had no Ray queue"
    deadline = time.monotonic() + 10  # ray.kill returns before the actor is gone
    while names & set(leaked_actors()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not names & set(leaked_actors()), "a queue actor of the job outlived it"
    refs = [w.ref for w in manager.workers() if w.ref is not None]
    assert refs
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
    assert len(ready) == len(refs), "a Ray task of the job is still running"


@pytest.mark.spec("JOB13", "JOB8", "JOB15")
@pytest.mark.timeout(180)
def test_ray_stage_between_process_and_thread_stages(ray_address: str) -> None:
    job = Job(
        queues={"a": QueueSpec("auto", maxsize=16), "b": QueueSpec("auto", maxsize=16), "c": "auto"},
        stages=[
            Stage("src", numbers, output="a", where="process"),
            Stage("square", square, input="a", output="b", where="ray", replicas=2),
            Stage("relay", "_job_stages:square", input="b", output="c", where="process"),
            Stage("sink", collect, input="c", where="thread"),
        ],
        name="ray-pipeline",
    )
    manager = JobManager(job)
    try:
        result = manager.run(timeout=150)
    finally:
        manager.teardown()
    assert sorted(result.results["sink"][0]) == sorted(x**4 for x in range(N))
    assert result.queue_types == {"a": "ray_actor", "b": "ray_actor", "c": "sage"}
    assert "Ray worker" in manager.choices["a"].reason
    # The descriptors name the manager's cluster, so the spawned processes joined it (RAY1).
    assert all(d.metadata["address"] == ray_address for n, d in manager.descriptors.items() if n != "c")
    squares = [e for e in result.exits if e.stage == "square"]
    assert len(squares) == 2 and all(e.ok and e.pid is None for e in squares)
    assert result.stages["square"].items_in == N and result.stages["square"].items_out == N
    _check_nothing_left(manager)


@pytest.mark.spec("JOB13", "JOB10")
@pytest.mark.timeout(180)
def test_ray_worker_exception_fails_fast_with_its_traceback(ray_address: str) -> None:
    job = Job(
        queues={"a": QueueSpec("auto", maxsize=8), "b": QueueSpec("auto", maxsize=8)},
        stages=[
            Stage("src", numbers, output="a", where="thread"),
            Stage("mid", fail_on_3, input="a", output="b", where="ray"),
            Stage("sink", collect, input="b", where="thread"),
        ],
    )
    manager = JobManager(job)
    with pytest.raises(JobFailed, match=r"worker mid\[0\] \(ray\) raised ValueError: bad item 3") as info:
        manager.run(timeout=150)
    assert "Traceback" in next(e.detail for e in info.value.exits if not e.ok)
    _check_nothing_left(manager)


class _Watch:
    """A thread sink that shows the test what it has received so far (pid of the Ray worker included)."""

    def __init__(self) -> None:
        self.items: list[list[int]] = []
        self.lock = threading.Lock()

    def __call__(self, items: Iterator[list[int]]) -> list[list[int]]:
        for item in items:
            with self.lock:
                self.items.append(item)
        with self.lock:
            return list(self.items)

    def wait_for(self, n: int, timeout: float = 90) -> list[list[int]]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if len(self.items) >= n:
                    return list(self.items)
            assert time.monotonic() < deadline, f"only {len(self.items)} items after {timeout} s"
            time.sleep(0.05)


def _kill_by_sigkill(manager: JobManager, seen: list[list[int]]) -> str:
    os.kill(seen[-1][0], signal.SIGKILL)  # the Ray worker process running the task
    return "Ray worker died"


def _kill_by_cancel(manager: JobManager, seen: list[list[int]]) -> str:
    mid = next(w for w in manager.workers() if w.stage == "mid" and w.running)
    ray.cancel(mid.ref, force=True)
    return "Ray task cancelled"


KILLS: dict[str, Callable[[JobManager, list[list[int]]], str]] = {
    "sigkill": _kill_by_sigkill,
    "cancel": _kill_by_cancel,
}


@pytest.mark.spec("JOB13", "JOB10", "JOB1")
@pytest.mark.timeout(240)
@pytest.mark.parametrize("policy", ["fail_fast", "restart"])
@pytest.mark.parametrize("kill", sorted(KILLS))
def test_ray_worker_killed(ray_address: str, kill: str, policy: str) -> None:
    watch = _Watch()
    job = Job(
        queues={"a": QueueSpec("auto", maxsize=4), "b": QueueSpec("auto", maxsize=4)},
        stages=[
            Stage("src", slow_numbers, output="a", where="process"),
            Stage("mid", square_with_pid, input="a", output="b", where="ray"),
            Stage("sink", watch, input="b", where="thread"),
        ],
        policy=policy,  # type: ignore[arg-type]
    )
    manager = JobManager(job)
    outcome: Any
    manager.start()
    try:
        seen = watch.wait_for(10)
        cause = KILLS[kill](manager, seen)
        try:
            outcome = manager.wait(timeout=150)
        except JobFailed as exc:
            outcome = exc
    finally:
        manager.teardown()
    _check_nothing_left(manager)
    if policy == "fail_fast":
        assert isinstance(outcome, JobFailed)
        assert f"worker mid[0] (ray) {cause}" in str(outcome) and "job stopped: fail_fast" in str(outcome)
        assert [(e.stage, e.cause.startswith(cause)) for e in outcome.exits if not e.ok] == [("mid", True)]
        return
    assert isinstance(outcome, JobResult), outcome
    got = outcome.results["sink"][0]
    values = [x for _, x in got]
    # At-most-once (JOB10): nothing duplicated or invented; at most the item the dead worker held lost.
    assert len(values) == len(set(values)) and set(values) <= {x * x for x in range(N)}
    assert len(values) >= N - 1, len(values)
    assert len({pid for pid, _ in got}) >= 2  # a second Ray worker process did the rest
    mids = [e for e in outcome.exits if e.stage == "mid"]
    assert [(e.attempt, e.ok) for e in mids] == [(0, False), (1, True)] and mids[0].cause.startswith(cause)
    assert outcome.restarts == 1


@pytest.mark.spec("JOB17", "JOB13")
@pytest.mark.timeout(180)
def test_ray_stage_gets_its_args(ray_address: str) -> None:
    job = Job(
        queues={"a": QueueSpec("auto", maxsize=8), "b": QueueSpec("auto", maxsize=8)},
        stages=[
            Stage("src", numbers, output="a", where="thread"),
            Stage(
                "mid",
                "_ray_job_more_stages:scale_and_tag",
                input="a",
                output="b",
                where="ray",
                args={"factor": 3, "tag": ("r", {"k": [1, None]})},
            ),
            Stage("sink", collect, input="b", where="thread"),
        ],
    )
    manager = JobManager(job)
    result = manager.run(timeout=150)
    got = result.results["sink"][0]
    assert [x for x, _, _ in got] == [3 * x for x in range(N)]
    assert all(tag == ["r", {"k": [1, None]}] for _, tag, _ in got)  # the JSON copy: the tuple is a list
    assert {pid for _, _, pid in got} != {os.getpid()}  # it ran in a Ray worker
    _check_nothing_left(manager)


@pytest.mark.spec("JOB19", "JOB1")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("when", ["mid-stream", "while-joining-ray"])
@pytest.mark.parametrize("where", ["process", "host:localhost"])
def test_teardown_of_a_process_that_joined_ray_is_quiet_and_prompt(
    ray_address: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], when: str, where: str
) -> None:
    # A process stage on a ray_actor queue calls ray.init, which gives SIGTERM Ray's failure
    # handler: before JOB19 the teardown's SIGTERM printed "*** SIGTERM received ..." and a stack
    # dump to stderr (a process worker inherits this test's file descriptor 2: capfd sees it; a
    # host worker's stderr is read by the manager), and the worker ended by exit code 1 (Ray's
    # Python handler's SystemExit), not by the signal.
    got = [0]

    def sink(items: Iterator[int]) -> int:
        for _ in items:
            got[0] += 1
        return got[0]

    job = Job(
        queues={"a": QueueSpec("ray_actor", maxsize=8)},
        stages=[
            Stage(
                "src",
                "_ray_job_more_stages:endless_with_pid",
                output="a",
                where=where,
                args={"pid_dir": str(tmp_path)},
            ),
            Stage("sink", sink, input="a", where="thread"),
        ],
    )
    manager = JobManager(job)
    capfd.readouterr()
    manager.start()
    try:
        worker = manager._workers[0]
        # Kept: teardown closes the Process, not its Popen (whose returncode stays).
        popen = worker.process._popen if where == "process" else worker.popen
        deadline = time.monotonic() + 120
        if when == "mid-stream":  # its queue resolved (Ray joined), items flowing
            while got[0] < 20:
                assert time.monotonic() < deadline, "no items from the worker"
                time.sleep(0.05)
        # else: started, still joining Ray (best effort: a new process takes ~1 s to get there)
    finally:
        manager.teardown()
    err = capfd.readouterr().err + "\n".join(worker.stderr_tail)
    assert "SIGTERM received" not in err and "logging.cc" not in err, err[-3000:]
    # The SIGTERM ended it, no SIGKILL was needed (a host worker may see its stdin end first: 70).
    assert popen.returncode in ((-signal.SIGTERM,) if where == "process" else (-signal.SIGTERM, 70))
    assert not any(pid_alive(pid) for pid in recorded_pids(tmp_path))
    names = _actor_names(manager)
    deadline = time.monotonic() + 10
    while names & set(leaked_actors()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not names & set(leaked_actors()), "the job's queue actor outlived it"


_MANAGER = textwrap.dedent("""
    import sys
    from sage_queue.job import Job, JobManager, QueueSpec, Stage
    if __name__ == "__main__":
        job = Job(queues={{"a": QueueSpec("ray_actor", maxsize=8)}},
                  stages=[Stage("src", "_ray_job_more_stages:endless_with_pid", output="a", where="process",
                                args={{"pid_dir": {pid_dir!r}}}),
                          Stage("sink", "_job_stages:collect", input="a", where="thread")],
                  name={name!r})
        manager = JobManager(job)
        try:
            manager.run()
        finally:
            print(";".join(d.to_json() for d in manager.descriptors.values()), flush=True)
""")


@pytest.mark.spec("JOB19", "JOB1")
@pytest.mark.timeout(180)
def test_manager_that_joined_ray_in_run_takes_sigterm_quietly(ray_address: str, tmp_path: Path) -> None:
    # The manager joins Ray inside run() (its ray_actor queue; $RAY_ADDRESS: this session's Ray).
    # Before, ray.init's handlers then had SIGTERM: a stack dump and SystemExit(15) in the manager.
    script = tmp_path / "manager.py"
    script.write_text(_MANAGER.format(pid_dir=str(tmp_path), name=f"quiet-{os.getpid()}"))
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        wait_for_a_worker(proc, tmp_path, time.monotonic() + 120)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "SIGTERM received" not in err and "logging.cc" not in err, err[-3000:]
    assert "KeyboardInterrupt: SIGTERM" in err, err[-3000:]  # run()'s own handler, not Ray's SystemExit
    assert not any(pid_alive(pid) for pid in recorded_pids(tmp_path))
    descs = [QueueDescriptor.from_json(t) for t in out.strip().splitlines()[-1].split(";")]
    names = {f"{namespace_of(dict(d.metadata))}/{full_name(d.queue_type, dict(d.metadata))}" for d in descs}
    assert len(names) == 1
    deadline = time.monotonic() + 10
    while names & set(leaked_actors()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not names & set(leaked_actors()), "the job's queue actor outlived it"
