"""sage_queue.job: JobManager, end-of-stream, choose_queue_type, recovery, stats (spec/job.md).

Worker processes are real (spawn); the stage functions below are module-level so that a
spawned worker imports them from this module by ``module:name``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import pid_alive, queue_gone, recorded_pids, wait_for_a_worker

from sage_queue import QueueDescriptor, resolve_descriptor
from sage_queue.errors import UnknownQueueType
from sage_queue.job import (
    EOS,
    EndOfStream,
    HostSpec,
    Job,
    JobFailed,
    JobManager,
    QueueChoice,
    QueueSpec,
    Stage,
    choose_queue_type,
    queue_stats,
)
from sage_queue.protocol import QueueStats
from sage_queue.registry import unavailable_reason

N = 200
ROOT = Path(__file__).resolve().parents[1]

# -- stage functions (module level: spawned workers import them) -------------------------------


def numbers() -> range:
    return range(N)


def square(items: Iterator[int]) -> Iterator[int]:
    for x in items:
        yield x * x


def collect(items: Iterator[Any]) -> list[Any]:
    return list(items)


def count(items: Iterator[Any]) -> int:
    return sum(1 for _ in items)


def tagged_numbers() -> Iterator[list[int]]:
    # Each replica tags its items with its pid, so the sink can check every producer's stream.
    pid = os.getpid()
    return ([pid, i] for i in range(N))


def die_once(items: Iterator[int]) -> Iterator[int]:
    """SIGKILLs its own process the first time (a flag file says whether it already did)."""
    flag = Path(os.environ["SAGE_JOB_TEST_DIR"]) / "died"
    if not flag.exists():
        flag.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    yield from square(items)


def count_then_die_once(items: Iterator[int]) -> int:
    """Takes every item and the marker, then SIGKILLs its own process the first time."""
    n = sum(1 for _ in items)
    flag = Path(os.environ["SAGE_JOB_TEST_DIR"]) / "died-after-eos"
    if not flag.exists():
        flag.write_text(str(n))
        os.kill(os.getpid(), signal.SIGKILL)
    return n


def always_die(items: Iterator[int]) -> Iterator[int]:
    os.kill(os.getpid(), signal.SIGKILL)
    yield from items


def raise_value_error(items: Iterator[int]) -> Iterator[int]:
    for x in items:
        if x == 3:
            raise ValueError("bad item 3")
        yield x


def exit_3(items: Iterator[int]) -> Iterator[int]:
    os._exit(3)
    yield from items


# -- helpers -----------------------------------------------------------------------------------


def _segments() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


needs_sage = pytest.mark.skipif(unavailable_reason("sage") is not None, reason=f"sage: {unavailable_reason('sage')}")


# -- lifecycle, JSON-only workers, teardown ----------------------------------------------------


@needs_sage
@pytest.mark.spec("JOB1", "JOB2", "JOB4")
@pytest.mark.timeout(120)
def test_process_pipeline_runs_and_tears_down() -> None:
    job = Job(
        queues={"input": "auto", "processing": QueueSpec("sage", maxsize=8), "output": "auto"},
        stages=[
            Stage("numbers", numbers, output="input", where="process"),
            Stage("square", "test_job:square", input="input", output="processing", where="process", replicas=2),
            Stage("relay", square.__module__ + ":collect", input="processing", where="process"),
        ],
    )
    manager = JobManager(job)
    result = manager.run(timeout=100)
    assert sorted(result.results["relay"][0]) == sorted(x * x for x in range(N))
    # "output" is wired to no stage: only the manager touches it, so "auto" makes it local.
    assert result.queue_types == {"input": "sage", "processing": "sage", "output": "local"}
    assert [e.ok for e in result.exits] == [True] * 4 and all(e.pid for e in result.exits)
    # Every queue destroyed, every worker process gone.
    assert all(queue_gone(d) for d in manager.descriptors.values())
    assert multiprocessing.active_children() == []
    assert all(not pid_alive(e.pid) for e in result.exits if e.pid)


@pytest.mark.spec("JOB2")
def test_process_stage_needs_a_module_level_function() -> None:
    job = Job(queues={"q": "shm"}, stages=[Stage("s", lambda: [1], output="q", where="process")])
    manager = JobManager(job)
    with pytest.raises(ValueError, match="module-level function"):
        manager.run(timeout=30)
    assert all(queue_gone(d) for d in manager.descriptors.values())


@pytest.mark.spec("JOB8")
def test_local_queue_between_processes_is_refused_before_start() -> None:
    job = Job(queues={"q": "local"}, stages=[Stage("s", numbers, output="q", where="process")])
    manager = JobManager(job)
    with pytest.raises(ValueError, match=r"queue 'q' is declared 'local', which cannot cross processes"):
        manager.run(timeout=30)
    assert manager.descriptors == {} and manager._workers == []


# -- end-of-stream -----------------------------------------------------------------------------


def test_eos_pickles_to_the_one_instance() -> None:
    assert pickle.loads(pickle.dumps(EOS)) is EOS
    assert EndOfStream() is EOS


@pytest.mark.spec("JOB3", "JOB4")
@pytest.mark.timeout(120)
def test_many_producers_many_consumers_threads() -> None:
    # 3 producers -> 4 transforms -> 3 sinks: every item exactly once, every worker ends,
    # per-producer order kept within each consumer (FIFO queue).
    job = Job(
        queues={"a": QueueSpec("local", maxsize=5), "b": QueueSpec("local", maxsize=5)},
        stages=[
            Stage("src", tagged_numbers, output="a", replicas=3),
            Stage("mid", square_pairs, input="a", output="b", replicas=4),
            Stage("sink", collect, input="b", replicas=3),
        ],
    )
    result = JobManager(job).run(timeout=100)
    got = [tuple(item) for part in result.results["sink"] for item in part]
    assert len(result.results["sink"]) == 3
    assert len(got) == 3 * N
    assert Counter(i for _, i in got) == Counter({i: 3 for i in range(N)})  # nothing lost or duplicated
    assert len({pid for pid, _ in got}) == 1  # threads share the manager's pid


def square_pairs(items: Iterator[Any]) -> Iterator[Any]:
    for pid, i in items:
        yield (pid, i * 1)  # a transform: unpacks each item, so a marker reaching it would fail


@needs_sage
@pytest.mark.spec("JOB4")
@pytest.mark.timeout(120)
def test_many_producers_many_consumers_processes() -> None:
    job = Job(
        queues={"a": QueueSpec("auto", maxsize=16)},
        stages=[
            Stage("src", tagged_numbers, output="a", where="process", replicas=2),
            Stage("sink", collect, input="a", where="process", replicas=2),
        ],
    )
    result = JobManager(job).run(timeout=100)
    got = [tuple(item) for part in result.results["sink"] for item in part]
    assert Counter(got) == Counter({(pid, i): 1 for pid in {p for p, _ in got} for i in range(N)})
    assert len({p for p, _ in got}) == 2
    for part in result.results["sink"]:  # each producer's items in order within a consumer
        for pid in {p for p, _ in part}:
            seq = [i for p, i in part if p == pid]
            assert seq == sorted(seq)


@pytest.mark.spec("JOB4")
@pytest.mark.timeout(60)
def test_queue_without_producers_ends_at_once() -> None:
    result = JobManager(Job(queues={"q": "local"}, stages=[Stage("sink", count, input="q", replicas=2)])).run(30)
    assert result.results["sink"] == [0, 0]


# -- choosing queue types ----------------------------------------------------------------------


@pytest.mark.spec("JOB8")
def test_choose_queue_type_table() -> None:
    same_host = "sage" if unavailable_reason("sage") is None else "shm"
    assert choose_queue_type("thread", "thread") == "local"
    assert choose_queue_type("thread", "process") == same_host
    assert choose_queue_type("process", "process") == same_host
    assert choose_queue_type("ray", "process") == "ray_actor"
    assert choose_queue_type("process", "host:gpu7") == "rpc"
    assert choose_queue_type("process", "host:localhost") == same_host
    assert choose_queue_type("host:a", "host:a", local_host="a") == same_host
    assert choose_queue_type("thread", "thread", override="shm") == "shm"
    choice = choose_queue_type("process", "host:gpu7", explain=True)
    assert isinstance(choice, QueueChoice) and choice.queue_type == "rpc" and "gpu7" in choice.reason
    assert "override" in choose_queue_type("thread", "thread", override="rpc", explain=True).reason
    with pytest.raises(ValueError, match="where must be"):
        choose_queue_type("thread", "gpu")
    with pytest.raises(UnknownQueueType):
        choose_queue_type("thread", "thread", override="nope")


@pytest.mark.spec("JOB8")
@pytest.mark.timeout(60)
def test_auto_queue_is_most_general_choice_and_explained() -> None:
    job = Job(
        queues={"t": "auto", "p": "auto"},
        stages=[
            Stage("a", numbers, output="t"),
            Stage("b", square, input="t", output="p"),
            Stage("c", count, input="p", where="thread"),
        ],
    )
    manager = JobManager(job)
    result = manager.run(timeout=30)
    assert result.queue_types == {"t": "local", "p": "local"}
    assert "threads" in manager.choices["t"].reason
    assert result.results["c"] == [N]


# -- recovery ----------------------------------------------------------------------------------


def _kill_job(policy: str, fn: Any, max_restarts: int = 3) -> Job:
    return Job(
        queues={"a": QueueSpec("auto", maxsize=8), "b": QueueSpec("auto", maxsize=8)},
        stages=[
            Stage("src", numbers, output="a", where="process"),
            Stage("mid", fn, input="a", output="b", where="process"),
            Stage("sink", collect, input="b", where="thread"),
        ],
        policy=policy,  # type: ignore[arg-type]
        max_restarts=max_restarts,
    )


@needs_sage
@pytest.mark.spec("JOB10", "JOB1")
@pytest.mark.timeout(120)
def test_sigkilled_worker_fails_fast_with_its_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_JOB_TEST_DIR", str(tmp_path))
    manager = JobManager(_kill_job("fail_fast", die_once))
    cause = r"worker mid\[0\] \(pid \d+\) killed by SIGKILL; job stopped: fail_fast"
    with pytest.raises(JobFailed, match=cause) as info:
        manager.run(timeout=100)
    dead = [e for e in info.value.exits if not e.ok]
    assert [(e.stage, e.cause) for e in dead] == [("mid", "killed by SIGKILL")]
    assert dead[0].pid == int((tmp_path / "died").read_text())
    assert all(queue_gone(d) for d in manager.descriptors.values())
    assert multiprocessing.active_children() == []


@needs_sage
@pytest.mark.spec("JOB10", "JOB5")
@pytest.mark.timeout(120)
def test_sigkilled_worker_is_restarted_on_the_same_queues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_JOB_TEST_DIR", str(tmp_path))
    result = JobManager(_kill_job("restart", die_once)).run(timeout=100)
    # It died before taking an item, so nothing is lost.
    assert sorted(result.results["sink"][0]) == [x * x for x in range(N)]
    assert result.restarts == 1
    mids = [e for e in result.exits if e.stage == "mid"]
    assert [(e.attempt, e.ok, e.cause) for e in mids] == [(0, False, "killed by SIGKILL"), (1, True, "ok")]


@needs_sage
@pytest.mark.spec("JOB5", "JOB10")
@pytest.mark.timeout(120)
def test_consumer_killed_after_its_marker_gets_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first sink takes all items and its marker, then dies: the restarted sink must get a
    # marker of its own (JOB5), else it would block forever and the job would hit its timeout.
    monkeypatch.setenv("SAGE_JOB_TEST_DIR", str(tmp_path))
    job = Job(
        queues={"a": QueueSpec("auto", maxsize=N + 1)},
        stages=[
            Stage("src", numbers, output="a", where="process"),
            Stage("sink", count_then_die_once, input="a", where="process"),
        ],
        policy="restart",
    )
    result = JobManager(job).run(timeout=60)
    assert (tmp_path / "died-after-eos").read_text() == str(N)  # the first one had everything
    assert result.results["sink"] == [0]  # its replacement found only the extra marker
    assert [e.cause for e in result.exits if e.stage == "sink"] == ["killed by SIGKILL", "ok"]


@needs_sage
@pytest.mark.spec("JOB10")
@pytest.mark.timeout(120)
def test_restart_limit_then_fails() -> None:
    with pytest.raises(JobFailed, match=r"restart limit reached \(2 restarts\)") as info:
        JobManager(_kill_job("restart", always_die, max_restarts=2)).run(timeout=100)
    assert [e.cause for e in info.value.exits if e.stage == "mid"] == ["killed by SIGKILL"] * 3


@needs_sage
@pytest.mark.spec("JOB10")
@pytest.mark.timeout(120)
def test_exit_code_and_exception_causes() -> None:
    with pytest.raises(JobFailed, match=r"exit code 3"):
        JobManager(_kill_job("fail_fast", exit_3)).run(timeout=100)
    with pytest.raises(JobFailed, match=r"raised ValueError: bad item 3") as info:
        JobManager(_kill_job("fail_fast", raise_value_error)).run(timeout=100)
    assert "Traceback" in next(e.detail for e in info.value.exits if not e.ok)


@pytest.mark.spec("JOB10", "JOB1")
@pytest.mark.timeout(60)
def test_thread_worker_failure_stops_the_others() -> None:
    # The sink blocks in get; the failing transform ends the job; teardown must wake the sink.
    job = Job(
        queues={"a": QueueSpec("local", maxsize=2), "b": "local"},
        stages=[
            Stage("src", numbers, output="a"),
            Stage("mid", raise_value_error, input="a", output="b"),
            Stage("sink", count, input="b"),
        ],
    )
    manager = JobManager(job)
    with pytest.raises(JobFailed, match="bad item 3"):
        manager.run(timeout=30)
    assert all(w.thread is not None and not w.thread.is_alive() for w in manager._workers)


@pytest.mark.spec("JOB11")
@pytest.mark.timeout(60)
def test_manager_timeout_tears_down() -> None:
    # No stage writes "a" except a source that never ends: the job cannot finish.
    job = Job(
        queues={"a": QueueSpec("local", maxsize=1)},
        stages=[Stage("src", forever, output="a"), Stage("sink", count, input="a")],
    )
    manager = JobManager(job)
    with pytest.raises(JobFailed, match=r"not finished after 1\.0 s"):
        manager.run(timeout=1.0)
    assert all(w.thread is not None and not w.thread.is_alive() for w in manager._workers)


def forever() -> Iterator[int]:
    while True:
        yield 1


# -- interruption of the manager (in a subprocess) -----------------------------------------------

_INTERRUPTED = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from sage_queue import QueueDescriptor
    from sage_queue.job import Job, JobManager, QueueSpec, Stage
    if __name__ == "__main__":
        qa = QueueDescriptor.create({qtype!r}, maxsize=4)
        qb = QueueDescriptor.create({qtype!r}, maxsize=4)
        print(json.dumps([qa.to_json(), qb.to_json()]), flush=True)
        job = Job(queues={{"a": qa, "b": qb}},
                  stages=[Stage("src", "test_job:forever_with_pid", output="a", where="process"),
                          Stage("sink", "test_job:count", input="a", where="process")])
        JobManager(job).run()
""")


def forever_with_pid() -> Iterator[int]:
    (Path(os.environ["SAGE_JOB_TEST_DIR"]) / f"pid-{os.getpid()}").write_text("")
    return forever()


def _leave_nothing(pids: list[int], descs: list[QueueDescriptor]) -> None:
    """SIGKILL each live pid, destroy each queue not gone: after a failed test, nothing left behind."""
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    for d in descs:
        if not queue_gone(d):
            resolve_descriptor(d).destroy()


@needs_sage
@pytest.mark.spec("JOB1")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_interrupted_manager_tears_down(tmp_path: Path, signum: int) -> None:
    script = tmp_path / "job_main.py"
    script.write_text(_INTERRUPTED.format(tests=str(ROOT / "tests"), qtype="sage"))
    env = dict(os.environ, SAGE_JOB_TEST_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    descs: list[QueueDescriptor] = []
    worker_pids: list[int] = []
    try:
        assert proc.stdout is not None
        descs = [QueueDescriptor.from_json(t) for t in json.loads(proc.stdout.readline())]
        deadline = time.monotonic() + 90
        wait_for_a_worker(proc, tmp_path, deadline, poll=0.1)
        worker_pids = recorded_pids(tmp_path)
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
        assert code != 0  # interrupted, not finished
        deadline = time.monotonic() + 10
        while any(map(pid_alive, worker_pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(pid_alive, worker_pids))  # for SIGKILL: the worker saw its manager gone
        if signum == signal.SIGKILL:  # nothing ran in the manager: the queues are still there
            assert not any(queue_gone(d) for d in descs)
        else:
            assert all(queue_gone(d) for d in descs)
    finally:  # leave nothing behind, whatever failed above
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _leave_nothing(worker_pids, descs)


def stubborn_forever(pid_dir: str) -> Iterator[int]:
    """Writes ``pid-<pid>``, then never ends; a SIGTERM only writes ``sigterm-<pid>`` (so the
    manager's teardown waits its grace for this worker, then SIGKILLs it)."""

    def on_sigterm(signum: int, frame: object) -> None:
        (Path(pid_dir) / f"sigterm-{os.getpid()}").write_text("")

    signal.signal(signal.SIGTERM, on_sigterm)
    (Path(pid_dir) / f"pid-{os.getpid()}").write_text("")
    return forever()


_INTERRUPTED_TWICE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from sage_queue import QueueDescriptor
    from sage_queue.job import Job, JobManager, QueueSpec, Stage
    if __name__ == "__main__":
        qa = QueueDescriptor.create("sage", maxsize=4)
        qb = QueueDescriptor.create("sage", maxsize=4)
        print(json.dumps([qa.to_json(), qb.to_json()]), flush=True)
        job = Job(queues={{"a": qa, "b": qb}},
                  stages=[Stage("src", "test_job:stubborn_forever", output="a", where="process",
                                args={{"pid_dir": {pid_dir!r}}}),
                          Stage("relay", "test_job:square", input="a", output="b", where="process"),
                          Stage("sink", "test_job:count", input="b", where="process")])
        JobManager(job).run()
""")


@needs_sage
@pytest.mark.spec("JOB18", "JOB1")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_second_signal_during_teardown_does_not_interrupt_it(tmp_path: Path, second: int) -> None:
    # The first SIGTERM starts the teardown; the source worker ignores the SIGTERM it gets, so the
    # teardown sits in its 3 s grace when the second signal comes: it must still end every worker
    # and destroy every queue. (Before JOB18 the second signal's KeyboardInterrupt broke out of the
    # teardown: the manager then hung in multiprocessing's exit join on the stubborn worker.)
    script = tmp_path / "job_main.py"
    script.write_text(_INTERRUPTED_TWICE.format(tests=str(ROOT / "tests"), pid_dir=str(tmp_path)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    descs: list[QueueDescriptor] = []
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        descs = [QueueDescriptor.from_json(t) for t in json.loads(proc.stdout.readline())]
        deadline = time.monotonic() + 90
        wait_for_a_worker(proc, tmp_path, deadline)
        proc.send_signal(signal.SIGTERM)
        while not list(tmp_path.glob("sigterm-*")):  # the teardown has begun stopping workers
            assert time.monotonic() < deadline, "the worker never got the teardown's SIGTERM"
            time.sleep(0.01)
        proc.send_signal(second)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0, err  # interrupted, not finished
        # The first interrupt is what run() ended on; the second was held, then dropped.
        ends = [line for line in err.splitlines() if line.startswith("KeyboardInterrupt")]
        assert ends == ["KeyboardInterrupt: SIGTERM"] and "During handling" not in err, err
        pids = recorded_pids(tmp_path)
        assert not any(map(pid_alive, pids)), "a worker outlived the teardown"
        assert all(queue_gone(d) for d in descs)
        assert not [s for s in _segments() for d in descs if d.queue_id in s]
    finally:  # leave nothing behind, whatever failed above
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _leave_nothing(recorded_pids(tmp_path), descs)


@needs_sage
@pytest.mark.spec("JOB18")
@pytest.mark.timeout(60)
def test_signal_held_during_teardown_is_delivered_once_it_is_complete(tmp_path: Path) -> None:
    # In this (main) thread: a SIGINT sent while teardown() waits for a worker that ignores SIGTERM
    # comes out of teardown() as KeyboardInterrupt only after every worker and queue is gone.
    job = Job(
        queues={"a": QueueSpec("sage", maxsize=4)},
        stages=[
            Stage("src", stubborn_forever, output="a", where="process", args={"pid_dir": str(tmp_path)}),
            Stage("sink", count, input="a", where="process"),
        ],
    )
    manager = JobManager(job).start()

    def interrupt_when_the_teardown_signals_the_worker() -> None:
        deadline = time.monotonic() + 50
        while not list(tmp_path.glob("sigterm-*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    try:
        deadline = time.monotonic() + 50
        while not list(tmp_path.glob("pid-*")):
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.05)
        sender = threading.Thread(target=interrupt_when_the_teardown_signals_the_worker)
        sender.start()
        with pytest.raises(KeyboardInterrupt):
            manager.teardown()
        sender.join()
        assert list(tmp_path.glob("sigterm-*"))  # the SIGINT came during the teardown
        assert signal.getsignal(signal.SIGINT) is previous  # the handler found was put back
        assert all(not w.running for w in manager.workers())
        assert not any(pid_alive(pid) for pid in recorded_pids(tmp_path))
        assert all(queue_gone(d) for d in manager.descriptors.values())
    finally:
        manager.teardown()


# -- stats --------------------------------------------------------------------------------------


class _NoStats:
    capabilities = frozenset({"close"})


@pytest.mark.spec("JOB12")
@pytest.mark.timeout(60)
def test_stats_where_declared_none_otherwise() -> None:
    assert queue_stats(_NoStats()) is None
    job = Job(queues={"a": QueueSpec("local", maxsize=N + 1)}, stages=[Stage("src", numbers, output="a")])
    manager = JobManager(job)
    manager.start()
    try:
        manager.wait(timeout=30)  # the source ended; no consumer, so no marker either
        stats = manager.stats()
        assert set(stats) == {"a"}
        assert isinstance(stats["a"], QueueStats) and stats["a"].puts == N and stats["a"].depth == N
    finally:
        manager.teardown()
    assert queue_gone(manager.descriptors["a"])


# -- heterogeneous queues: sage, rpc and shm in one job ---------------------------------------------


def identity(items: Iterator[Any]) -> Iterator[Any]:
    yield from items


needs_rpc = pytest.mark.skipif(unavailable_reason("rpc") is not None, reason=f"rpc: {unavailable_reason('rpc')}")


@needs_sage
@needs_rpc
@pytest.mark.spec("JOB1", "JOB2", "JOB12")
@pytest.mark.timeout(180)
def test_heterogeneous_job_with_rpc_and_forkserver(tmp_path: Path) -> None:
    from sage_queue import RPCQueueServer
    from sage_queue.backends.rpc.wire import generate_key_file

    key_file = str(tmp_path / "rpc.key")
    generate_key_file(key_file)
    with RPCQueueServer(key_file=key_file) as server:
        host, port = server.address
        job = Job(
            queues={
                "a": QueueSpec("sage", maxsize=16),
                "b": QueueSpec("rpc", maxsize=16, metadata={"host": host, "port": port, "key_file": key_file}),
                "c": QueueSpec("shm", maxsize=16),
            },
            stages=[
                Stage("src", numbers, output="a", where="process"),
                Stage("square", square, input="a", output="b", where="process", replicas=2),
                Stage("relay", identity, input="b", output="c", where="process"),
                Stage("sink", collect, input="c", where="thread"),
            ],
            start_method="forkserver",
        )
        manager = JobManager(job)
        manager.start()
        try:
            result = manager.wait(timeout=150)
            stats = manager.stats()
        finally:
            manager.teardown()
        assert sorted(result.results["sink"][0]) == [x * x for x in range(N)]
        assert result.queue_types == {"a": "sage", "b": "rpc", "c": "shm"}
        # N items plus one marker per consumer went through each queue (JOB4, JOB12).
        for name, consumers in (("a", 2), ("b", 1), ("c", 1)):
            s = stats[name]
            assert s is not None and s.puts == N + consumers and s.gets == N + consumers, (name, s)
        assert server.status()["queues"] == 0  # the rpc queue was destroyed too
    assert all(queue_gone(d) for n, d in manager.descriptors.items() if n != "b")


def slow_numbers() -> Iterator[int]:
    for i in range(N):
        time.sleep(0.01)  # paces the stream so that the test's kill lands mid-way
        yield i


@needs_sage
@pytest.mark.spec("JOB10")
@pytest.mark.timeout(180)
def test_worker_sigkilled_from_outside_mid_stream_is_restarted() -> None:
    job = Job(
        queues={"a": QueueSpec("sage", maxsize=4), "b": QueueSpec("sage", maxsize=4)},
        stages=[
            Stage("src", slow_numbers, output="a", where="process"),
            Stage("mid", square, input="a", output="b", where="process"),
            Stage("sink", collect, input="b", where="thread"),
        ],
        policy="restart",
    )
    manager = JobManager(job)
    manager.start()
    try:
        stats = manager.stats()
        deadline = time.monotonic() + 60
        while (s := manager.stats()["b"]) is not None and s.puts < 10:  # mid has passed items on
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        mid = next(w for w in manager.workers() if w.stage == "mid")
        assert mid.pid is not None and mid.running
        os.kill(mid.pid, signal.SIGKILL)
        result = manager.wait(timeout=150)
    finally:
        manager.teardown()
    got = result.results["sink"][0]
    assert len(got) == len(set(got)) and set(got) <= {x * x for x in range(N)}  # nothing duplicated or invented
    assert len(got) >= N - 2, len(got)  # at most the item(s) the dead worker held are lost
    mids = [e for e in result.exits if e.stage == "mid"]
    assert [(e.pid, e.cause) for e in mids] == [(mid.pid, "killed by SIGKILL"), (mids[1].pid, "ok")]
    assert [w.attempt for w in manager.workers() if w.stage == "mid"] == [0, 1]


def take_two_then_die(items: Iterator[int]) -> int:
    """Takes two items, then SIGKILLs its process, leaving a full queue behind it."""
    next(items), next(items)
    time.sleep(2)  # meanwhile src refills "a" and ends, and the manager owes "a" its marker
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


@needs_sage
@pytest.mark.spec("JOB10")
@pytest.mark.timeout(120)
def test_dead_consumer_of_a_full_queue_does_not_block_the_manager() -> None:
    # src fills "a" (maxsize 2) and ends; the manager must put the marker into a full queue
    # whose only consumer dies: it must still notice the death and fail fast, not block in put.
    job = Job(
        queues={"a": QueueSpec("sage", maxsize=2)},
        stages=[
            Stage("src", numbers_short, output="a", where="process"),
            Stage("sink", take_two_then_die, input="a", where="process"),
        ],
    )
    with pytest.raises(JobFailed, match=r"sink\[0\] \(pid \d+\) killed by SIGKILL"):
        JobManager(job).run(timeout=100)


def numbers_short() -> range:
    return range(4)


@pytest.mark.spec("JOB8")
@pytest.mark.timeout(60)
def test_choose_from_the_command_line() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sage_queue.job", "choose", *args], capture_output=True, text=True, timeout=50
        )

    explained = run("process", "host:gpu1", "--explain")
    assert explained.returncode == 0 and explained.stdout.startswith("rpc: ") and "gpu1" in explained.stdout
    assert run("thread", "thread").stdout.strip() == "local"
    assert run("thread", "thread", "--override", "shm").stdout.strip() == "shm"
    bad = run("thread", "nowhere")
    assert bad.returncode == 2 and "where must be" in bad.stderr


@pytest.mark.spec("JOB8")
@pytest.mark.timeout(60)
def test_choose_through_the_sage_queue_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from sage_queue.cli import main as cli_main

    assert cli_main(["choose", "process", "host:gpu1", "--explain"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rpc: ") and "gpu1" in out
    assert cli_main(["choose", "thread", "thread", "--override", "shm"]) == 0
    assert capsys.readouterr().out.strip() == "shm"
    assert cli_main(["choose", "thread", "nowhere"]) == 2
    assert "where must be" in capsys.readouterr().err


# -- per-stage counters -------------------------------------------------------------------------


def keep_even(items: Iterator[int]) -> Iterator[int]:
    return (x for x in items if x % 2 == 0)


@pytest.mark.spec("JOB15")
@pytest.mark.timeout(60)
def test_stage_counts_come_back_with_the_result() -> None:
    job = Job(
        queues={"a": QueueSpec("local", maxsize=8), "b": QueueSpec("local", maxsize=8)},
        stages=[
            Stage("src", numbers, output="a"),
            Stage("even", keep_even, input="a", output="b", replicas=2),
            Stage("sink", count, input="b"),
        ],
        name="counts",
    )
    result = JobManager(job).run(timeout=30)
    assert result.results["sink"] == [N // 2]
    stages = {s: (c.workers, c.items_in, c.items_out, c.unreported) for s, c in result.stages.items()}
    assert stages == {"src": (1, 0, N, 0), "even": (2, N, N // 2, 0), "sink": (1, N // 2, 0, 0)}
    even = [e for e in result.exits if e.stage == "even"]
    assert sum(e.items_in or 0 for e in even) == N  # each replica reported its own share


# -- recovery under repeated kills (JOB10's at-most-once, checked on the items) ------------------------


def paced_numbers() -> Iterator[int]:
    for i in range(2 * N):
        time.sleep(0.005)  # a stream that lasts ~2 s, so that the kills land while it flows
        yield i


@needs_sage
@pytest.mark.spec("JOB10", "JOB5")
@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", [7, 2024])
def test_transforms_sigkilled_repeatedly_lose_at_most_their_items_in_flight(seed: int) -> None:
    import random

    rng = random.Random(seed)
    job = Job(
        queues={"a": QueueSpec("sage", maxsize=4), "b": QueueSpec("sage", maxsize=4)},
        stages=[
            Stage("src", paced_numbers, output="a", where="process"),
            Stage("mid", square, input="a", output="b", where="process", replicas=2),
            Stage("sink", collect, input="b", where="thread"),
        ],
        policy="restart",
        max_restarts=50,
    )
    manager = JobManager(job)
    killed: list[int] = []
    done = threading.Event()

    def killer() -> None:
        # Seeded: which replica and when. Only transforms: a restarted source would run again from
        # its start, and a restarted sink would forget what it had collected (spec JOB10).
        while not done.is_set() and len(killed) < 8:
            done.wait(rng.uniform(0.1, 0.4))
            running = [w for w in manager.workers() if w.stage == "mid" and w.running and w.pid is not None]
            if running and not done.is_set():
                victim = rng.choice(running)
                assert victim.pid is not None
                try:
                    os.kill(victim.pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended meanwhile
                    continue
                killed.append(victim.pid)

    manager.start()
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = manager.wait(timeout=200)
    finally:
        done.set()
        thread.join(10)
        manager.teardown()
    got = result.results["sink"][0]
    produced = {x * x for x in range(2 * N)}
    assert len(got) == len(set(got)), "an item was delivered twice"
    assert set(got) <= produced, "an item that was never produced"
    dead = [e for e in result.exits if not e.ok]
    assert all(e.stage == "mid" and e.cause == "killed by SIGKILL" for e in dead)
    assert {e.pid for e in dead} <= set(killed) and result.restarts == len(dead) >= 1
    # Each dead transform held at most one item: taken from "a", its square not yet in "b".
    assert len(produced) - len(got) <= len(dead), (len(produced) - len(got), len(dead))
    assert all(not pid_alive(p) for p in killed) and multiprocessing.active_children() == []


# -- monitoring: the running job is published -------------------------------------------------------


@pytest.fixture
def private_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return runtime


@pytest.mark.spec("JOB16")
@pytest.mark.timeout(60)
def test_running_job_is_published_then_unpublished(private_registry: Path) -> None:
    from sage_queue.monitor import running_jobs

    job = Job(
        queues={"a": QueueSpec("local", maxsize=N + 1), "b": "local"},
        stages=[Stage("src", numbers, output="a"), Stage("sink", count, input="a", replicas=2)],
        name="published-job",
    )
    manager = JobManager(job)
    manager.start()
    try:
        (entry,) = running_jobs("published-job")
        assert entry.pid == os.getpid()
        assert {q: QueueDescriptor.from_json(t) for q, t in entry.descriptors.items()} == manager.descriptors
        assert dict(entry.consumers) == {"a": 2, "b": 0}
        result = manager.wait(timeout=30)
    finally:
        manager.teardown()
    assert sum(result.results["sink"]) == N
    assert running_jobs("published-job") == [] and running_jobs() == []


@pytest.mark.spec("JOB16")
@pytest.mark.timeout(60)
def test_failed_job_is_unpublished_and_an_untrusted_registry_does_not_stop_a_job(
    private_registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sage_queue.monitor import running_jobs

    failing = Job(
        queues={"a": QueueSpec("local", maxsize=2), "b": "local"},
        stages=[Stage("src", numbers, output="a"), Stage("mid", raise_value_error, input="a", output="b")],
        name="failing-job",
    )
    with pytest.raises(JobFailed, match="bad item 3"):
        JobManager(failing).run(timeout=30)
    assert running_jobs() == []
    (private_registry / "sage-queue").chmod(0o777)  # group/others may write: the registry is not trusted
    job = Job(queues={"a": "local"}, stages=[Stage("src", numbers, output="a"), Stage("sink", count, input="a")])
    assert JobManager(job).run(timeout=30).results["sink"] == [N]
    assert "publishing job" in caplog.text


# -- per-stage keyword arguments (JOB17) ---------------------------------------------------------


def numbers_between(start: int, stop: int, step: int = 1) -> range:
    return range(start, stop, step)


def scale_and_tag(items: Iterator[int], factor: int, tag: Any) -> Iterator[list[Any]]:
    for x in items:
        yield [x * factor, tag, os.getpid()]


def collect_with(items: Iterator[Any], label: str, pair: Any) -> list[Any]:
    return [label, pair, list(items)]


@needs_sage
@pytest.mark.spec("JOB17", "JOB2", "JOB14")
@pytest.mark.timeout(120)
def test_stage_args_reach_process_host_and_thread_workers() -> None:
    # A source in a process, a transform on host "localhost" (the local launcher), a sink thread:
    # each gets its own stage's args, as JSON (the tuples arrive as lists, in the thread too).
    job = Job(
        queues={"a": QueueSpec("auto", maxsize=8), "b": QueueSpec("auto", maxsize=8)},
        stages=[
            Stage("src", numbers_between, output="a", where="process", args={"start": 5, "stop": 25, "step": 2}),
            Stage(
                "mid",
                scale_and_tag,
                input="a",
                output="b",
                where="host:localhost",
                args={"factor": 3, "tag": ("h", {"k": [1, None, True]})},
            ),
            Stage("sink", collect_with, input="b", where="thread", args={"label": "t", "pair": (1, 2.5)}),
        ],
    )
    hosts = {"localhost": HostSpec(launcher=[], env={"PYTHONPATH": str(ROOT / "tests")})}
    manager = JobManager(job, hosts=hosts)
    result = manager.run(timeout=100)
    label, pair, got = result.results["sink"][0]
    assert (label, pair) == ("t", [1, 2.5])
    assert [x for x, _, _ in got] == [3 * x for x in range(5, 25, 2)]
    assert all(tag == ["h", {"k": [1, None, True]}] for _, tag, _ in got)
    mid_pid = next(e.pid for e in result.exits if e.stage == "mid")
    assert {pid for _, _, pid in got} == {mid_pid} and mid_pid != os.getpid()  # ran in the host worker
    assert all(queue_gone(d) for d in manager.descriptors.values())


@pytest.mark.spec("JOB17")
@pytest.mark.timeout(60)
def test_stage_args_missing_one_is_the_workers_error() -> None:
    # The function's own TypeError, reported as any exception of a stage (JOB10), from a process.
    job = Job(
        queues={"a": "shm"}, stages=[Stage("src", numbers_between, output="a", where="process", args={"start": 1})]
    )
    with pytest.raises(JobFailed, match=r"worker src\[0\] .* raised TypeError: .*'stop'"):
        JobManager(job).run(timeout=50)


@pytest.mark.spec("JOB17")
@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ([("start", 1)], TypeError, "args must be a mapping of keyword arguments, got list"),
        ({1: 2}, TypeError, "args keys must be str"),
        ({"x": object()}, TypeError, "args must be JSON-serialisable: Object of type object"),
        ({"x": {1, 2}}, TypeError, "args must be JSON-serialisable: Object of type set"),
        ({"x": float("nan")}, ValueError, "args must be JSON-serialisable: Out of range float"),
        ({"x": float("inf")}, ValueError, "args must be JSON-serialisable"),
    ],
)
def test_stage_args_are_checked_when_the_stage_is_made(args: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=rf"stage 'src': {message}"):
        Stage("src", numbers_between, output="a", args=args)


@pytest.mark.spec("JOB17")
def test_stage_args_circular_reference_is_refused() -> None:
    circular: dict[str, Any] = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match=r"stage 'src': args must be JSON-serialisable: Circular reference"):
        Stage("src", numbers_between, output="a", args={"x": circular})
    # A Stage with args still hashes (args are left out of the hash) and compares by value.
    a = Stage("src", numbers_between, output="a", args={"start": 1, "stop": 2})
    assert hash(a) == hash(Stage("src", numbers_between, output="a"))
    assert a == Stage("src", numbers_between, output="a", args={"start": 1, "stop": 2})
