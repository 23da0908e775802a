"""``sage_queue.monitor``: the job registry, sampling, OpenMetrics text, ``sage-queue top`` and ``metrics``."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import registered_queue_type
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as prometheus_text

from sage_queue import (
    QueueClosed,
    QueueDescriptor,
    QueueNotFound,
    QueuePermissionError,
    _segment,
    cli,
    get_local_queue,
    monitor,
    register_queue_implementation,
    resolve_descriptor,
    unregister_queue_implementation,
)
from sage_queue.backends import local, sage, shm
from sage_queue.job import Job, JobManager, QueueSpec, Stage
from sage_queue.metadata import BUILTIN_SCHEMAS
from sage_queue.monitor import (
    Sampler,
    Source,
    jobs_dir,
    publish_job,
    read_job,
    render_openmetrics,
    running_jobs,
    sample_queue,
    unpublish_job,
)

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private registry: XDG_RUNTIME_DIR points at a fresh directory (0700, as a runtime dir is)."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    yield runtime / "sage-queue" / "jobs"


def _descs() -> dict[str, QueueDescriptor]:
    return {
        "input": QueueDescriptor.create_shm_queue("monitor-reg-in", maxsize=4),
        "output": QueueDescriptor.create_rpc_queue("127.0.0.1", 5555, name="out"),
    }


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True
    )


# -- the job registry ------------------------------------------------------------------------------


def test_publish_then_running_jobs_then_unpublish(registry: Path) -> None:
    descs = _descs()
    path = publish_job("etl", descs)
    assert path.parent == registry
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(registry).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(registry.parent).st_mode) == 0o700
    assert [p.name for p in registry.iterdir() if p.name.startswith(".tmp-")] == []  # written aside, renamed
    [entry] = running_jobs()
    assert (entry.name, entry.pid, entry.path) == ("etl", os.getpid(), path)
    assert {k: QueueDescriptor.from_json(v) for k, v in entry.descriptors.items()} == descs
    assert running_jobs("etl") == [entry] and running_jobs("other") == []
    assert unpublish_job(path) == 1
    assert running_jobs() == []
    assert unpublish_job(path) == 0  # idempotent


def test_unpublish_by_name_removes_every_entry_of_that_name(registry: Path) -> None:
    publish_job("twice", _descs())
    publish_job("twice", _descs())
    keep = publish_job("other job/with odd:chars", _descs())
    assert len(running_jobs("twice")) == 2
    assert unpublish_job("twice") == 2
    assert [e.path for e in running_jobs()] == [keep]
    assert running_jobs()[0].name == "other job/with odd:chars"


def test_unpublish_refuses_a_path_outside_the_registry(registry: Path, tmp_path: Path) -> None:
    publish_job("x", _descs())
    stray = tmp_path / "x.json"
    stray.write_text("{}")
    with pytest.raises(ValueError, match="not a job file of the registry"):
        unpublish_job(stray)
    assert stray.exists()


def test_bad_arguments(registry: Path) -> None:
    with pytest.raises(ValueError):
        publish_job("", _descs())
    with pytest.raises(TypeError, match="QueueDescriptor"):
        publish_job("j", {"q": {"queue_type": "local"}})  # type: ignore[dict-item]


def test_an_entry_of_a_dead_process_is_skipped_and_removed(registry: Path) -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(child.stdout)
    path = publish_job("dead", _descs(), pid=dead_pid)
    live = publish_job("live", _descs())
    assert [e.name for e in running_jobs()] == ["live"]
    assert not path.exists() and live.exists()


def test_a_reused_pid_is_not_taken_for_the_job(registry: Path) -> None:
    # The pid lives, but its process started at another time than the one that published.
    path = publish_job("reused", _descs())
    data = json.loads(path.read_text())
    assert isinstance(data["pid_start"], int)  # Linux: read from /proc
    data["pid_start"] += 1
    path.write_text(json.dumps(data))
    assert running_jobs() == []
    assert not path.exists()


@pytest.mark.timeout(60)
def test_a_job_published_by_another_process_is_seen_until_it_is_killed(registry: Path) -> None:
    child = _child(
        """
        import sys
        from sage_queue import QueueDescriptor
        from sage_queue.monitor import publish_job
        print(publish_job("child-job", {"q": QueueDescriptor.create_shm_queue("monitor-child-q")}), flush=True)
        sys.stdin.read()  # until the parent kills us
        """
    )
    try:
        assert child.stdout is not None
        path = Path(child.stdout.readline().strip())
        [entry] = running_jobs()
        assert (entry.name, entry.pid, entry.path) == ("child-job", child.pid, path)
    finally:
        child.kill()
        child.wait(30)
        child.stdin.close()  # type: ignore[union-attr]
        child.stdout.close()  # type: ignore[union-attr]
    assert running_jobs() == []  # SIGKILL: no teardown ran, the stale entry goes on the next look
    assert not path.exists()


# -- trust -----------------------------------------------------------------------------------------


def test_a_group_writable_file_is_refused_reported_and_kept(registry: Path) -> None:
    path = publish_job("planted", _descs())
    os.chmod(path, 0o620)
    with pytest.raises(QueuePermissionError, match="group/others write"):
        read_job(path)
    refused: list[str] = []
    assert running_jobs(refused=refused) == []
    assert len(refused) == 1 and str(path) in refused[0]
    assert path.exists()  # never removed: not ours to judge


def test_a_symlink_is_refused(registry: Path, tmp_path: Path) -> None:
    publish_job("real", _descs())
    target = tmp_path / "elsewhere.json"
    target.write_text(read_job(next(registry.glob("*.json"))).path.read_text())
    link = registry / "link-1-00000000.json"
    link.symlink_to(target)
    with pytest.raises(QueuePermissionError, match="symbolic link"):
        read_job(link)
    refused: list[str] = []
    assert [e.name for e in running_jobs(refused=refused)] == ["real"]
    assert refused and "symbolic link" in refused[0]


@needs_root
def test_another_users_file_is_refused(registry: Path) -> None:
    path = publish_job("theirs", _descs())
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(QueuePermissionError, match="owned by uid 65534"):
        read_job(path)
    assert running_jobs() == []
    assert path.exists()


def test_an_open_registry_directory_is_refused(registry: Path) -> None:
    publish_job("x", _descs())
    os.chmod(registry, 0o777)
    with pytest.raises(QueuePermissionError, match="lets group/others in"):
        running_jobs()
    with pytest.raises(QueuePermissionError):
        publish_job("y", _descs())
    os.chmod(registry, 0o700)
    assert [e.name for e in running_jobs()] == ["x"]


@needs_root
def test_a_registry_root_planted_by_another_user_is_refused(registry: Path) -> None:
    root = registry.parent
    root.mkdir(mode=0o700)
    os.chown(root, NOBODY, NOBODY)
    with pytest.raises(QueuePermissionError, match="owned by uid 65534"):
        publish_job("x", _descs())
    assert not registry.exists()


def test_a_malformed_file_is_reported(registry: Path) -> None:
    publish_job("good", _descs())
    bad = registry / "bad-1-00000000.json"
    fd = os.open(bad, os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b'{"version": 1, "name": 3}')
    os.close(fd)
    with pytest.raises(ValueError, match="not a job file"):
        read_job(bad)
    refused: list[str] = []
    assert [e.name for e in running_jobs(refused=refused)] == ["good"]
    assert refused and "not a job file" in refused[0]


@pytest.mark.spec("JOB16")
def test_a_fifo_named_like_a_job_file_blocks_no_reader(registry: Path) -> None:
    # Opening a FIFO for reading waits for a writer: top, metrics and gc hung on one (found by
    # attacking the monitor); it is now refused as not a regular file, at once.
    publish_job("good", _descs())
    fifo = registry / "fifo-1-00000000.json"
    os.mkfifo(fifo, 0o600)
    for argv in (["top", "--once"], ["metrics"], ["gc", "--kind", "job", "--dry-run"]):
        done = subprocess.run(
            [sys.executable, "-m", "sage_queue.cli", *argv], capture_output=True, text=True, timeout=30
        )
        assert "not a regular file" in done.stderr or argv[0] == "gc", (argv, done.stderr)
        assert done.returncode == 0, (argv, done.stderr)
    with pytest.raises(QueuePermissionError, match="not a regular file"):
        read_job(fifo)
    assert fifo.exists()  # refused, never removed


@pytest.mark.spec("JOB16")
def test_an_entry_of_a_zombie_is_stale(registry: Path) -> None:
    # A manager killed and not yet reaped (its parent never waits, or an init that never reaps)
    # runs nothing: its entry is stale, as for a dead pid.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        path = publish_job("zombie", _descs(), pid=child.pid)
        assert [e.name for e in running_jobs()] == ["zombie"]
        child.kill()
        deadline = time.monotonic() + 30
        while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert running_jobs() == [] and not path.exists()
    finally:
        child.kill()
        child.wait()


@pytest.mark.spec("JOB16")
def test_top_and_metrics_over_a_hostile_registry(registry: Path) -> None:
    # An entry naming a live process that is no job (pid 1, its real start time) with queues that do
    # not exist, a truncated file, garbage, and (as root) a file of another user: each seen for what
    # it is, nothing attached to a file not ours, nothing created, no crash. (A guard: it held.)
    name = f"hostile-{uuid.uuid4().hex[:8]}"
    path = publish_job("notajob", {"q": QueueDescriptor.create_sage_queue(name=name, maxsize=4)}, pid=1)
    data = json.loads(path.read_text())
    data["queues"]["bad"] = 5
    path.write_text(json.dumps(data))
    for bad, content in (("trunc", b'{"version": 1, "name": "x", "pid'), ("garbage", b"\x00\xff\xfe")):
        fd = os.open(registry / f"{bad}-1-00000000.json", os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, content)
        os.close(fd)
    theirs = registry / "theirs-1-00000000.json"
    theirs.write_text(path.read_text())
    theirs.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(theirs, NOBODY, NOBODY)
    else:
        theirs.chmod(0o666)  # group/others may write it: refused the same way
    for argv in (["top", "--once"], ["metrics"]):
        done = subprocess.run(
            [sys.executable, "-m", "sage_queue.cli", *argv], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        skipped = [line for line in done.stderr.splitlines() if "skipped:" in line]
        assert len(skipped) == 3, done.stderr
        assert any("trunc" in x and "not a job file" in x for x in skipped)
        assert any("garbage" in x and "not a job file" in x for x in skipped)
        assert any("theirs" in x and "not trusted" in x for x in skipped)
        if argv[0] == "top":
            rows = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith("notajob")}
            assert set(rows) == {"q", "bad"} and " gone " in rows["q"] and " error " in rows["bad"], done.stdout
        else:
            assert 'sage_queue_up{job="notajob",queue="q",type="sage"} 0' in done.stdout
    assert not os.path.exists(f"/dev/shm/sageq-sage-{name}")  # looking created nothing


def test_no_registry_yet_means_no_job(registry: Path) -> None:
    assert jobs_dir(create=False) is None
    assert running_jobs() == []
    assert unpublish_job("nothing") == 0
    assert not registry.parent.exists()  # looking creates nothing


def test_without_xdg_runtime_dir_the_registry_is_under_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert monitor._registry_root() == Path(f"/tmp/sage-queue-{os.geteuid()}")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")  # not an absolute directory: ignored
    assert monitor._registry_root() == Path(f"/tmp/sage-queue-{os.geteuid()}")


# -- sampling --------------------------------------------------------------------------------------


@pytest.fixture
def queues() -> Iterator[list[Any]]:
    """Handles a test creates; each queue destroyed (or its handle closed) afterwards."""
    made: list[Any] = []
    yield made
    for q in made:
        try:
            q.destroy()
        except (QueueClosed, QueueNotFound):
            q.close()


def _sage(queues: list[Any], **kw: Any) -> Any:
    q = resolve_descriptor(QueueDescriptor.create_sage_queue(name=f"mon-{uuid.uuid4().hex[:10]}", **kw))
    queues.append(q)
    return q


def _shm(queues: list[Any], **kw: Any) -> Any:
    q = resolve_descriptor(QueueDescriptor.create_shm_queue(f"mon-{uuid.uuid4().hex[:10]}", **kw))
    queues.append(q)
    return q


def _src(q: Any, job: str | None = "j", name: str = "q") -> Source:
    return Source(job, name, q.descriptor.to_json())


@pytest.mark.parametrize("kind", ["shm", "sage"])
def test_looking_at_a_missing_segment_queue_creates_nothing(kind: str) -> None:
    name = f"mon-missing-{uuid.uuid4().hex[:10]}"
    desc = (
        QueueDescriptor.create_shm_queue(name)
        if kind == "shm"
        else QueueDescriptor.create_sage_queue(name=name)  # create=True in the descriptor: the job's intent
    )
    sample = sample_queue(Source("j", "q", desc.to_json()))
    assert sample.state == monitor.GONE and sample.stats is None
    assert name in sample.detail
    assert not os.path.exists(_segment.segment_path(kind, name))


def test_looking_at_a_missing_local_queue_creates_nothing() -> None:
    desc = QueueDescriptor.create_local_queue(maxsize=3)
    before = local.live_queue_ids()
    sample = sample_queue(Source(None, desc.queue_id, desc.to_json()))
    assert sample.state == monitor.GONE
    assert local.live_queue_ids() == before
    other = QueueDescriptor.from_dict({**desc.to_dict(), "metadata": {"maxsize": 3, "owner_pid": 1}})
    assert sample_queue(Source(None, "x", other.to_json())).state == monitor.GONE  # another process's


def test_a_destroyed_queue_shows_as_gone(queues: list[Any]) -> None:
    q = _sage(queues)
    assert sample_queue(_src(q)).state == monitor.OK
    resolve_descriptor(q.descriptor).destroy()
    sample = sample_queue(_src(q))
    assert sample.state == monitor.GONE
    assert not os.path.exists(_segment.segment_path("sage", q.descriptor.metadata["shm_name"]))


@pytest.mark.parametrize("make", [_sage, _shm])
def test_rates_and_stalls_between_two_samples(queues: list[Any], make: Any) -> None:
    q = make(queues, maxsize=100)
    sampler = Sampler()
    [first] = sampler.sample([_src(q)])
    assert first.stats is not None and first.puts_per_s is None and first.stalled is None  # one sample: no rate
    q.put_many(list(range(5)))
    [second] = sampler.sample([_src(q)])
    dt = second.time - first.time
    assert second.puts_per_s is not None and second.gets_per_s == 0.0
    assert second.puts_per_s * dt == pytest.approx(5)
    assert second.stalled is True  # 5 items waited, nobody got one
    q.get()
    q.get()
    [third] = sampler.sample([_src(q)])
    assert third.gets_per_s is not None and third.gets_per_s * (third.time - second.time) == pytest.approx(2)
    assert third.stalled is False
    for _ in range(3):
        q.get()
    sampler.sample([_src(q)])
    [empty] = sampler.sample([_src(q)])
    assert empty.stats is not None and empty.stats.depth == 0 and empty.stalled is False  # empty is not stalled


def test_a_queue_recreated_under_the_same_name_gets_no_rate(queues: list[Any]) -> None:
    q = _sage(queues)
    q.put_many([1, 2, 3])
    sampler = Sampler()
    sampler.sample([_src(q)])
    resolve_descriptor(q.descriptor).destroy()
    again = resolve_descriptor(q.descriptor)  # same name, counters from 0
    queues.append(again)
    [sample] = sampler.sample([_src(again)])
    assert sample.state == monitor.OK and sample.puts_per_s is None and sample.stalled is None


def test_a_type_without_stats_and_a_type_that_cannot_be_looked_at(queues: list[Any]) -> None:
    class NoStats(shm.SharedMemoryQueueStub):
        capabilities = shm.SharedMemoryQueueStub.capabilities - {"stats"}

    with registered_queue_type("nostats", NoStats) as name:
        unregister_queue_implementation(name)
        register_queue_implementation(name, NoStats, metadata=BUILTIN_SCHEMAS["shm"])
        q = resolve_descriptor(QueueDescriptor.create(name, f"mon-{uuid.uuid4().hex[:10]}"))
        queues.append(q)
        assert sample_queue(_src(q)).state == monitor.NO_STATS

    class Plain(local.LocalQueueStub):  # no 'create' key: resolving might create the queue
        pass

    with registered_queue_type("plain", Plain) as name:
        desc = QueueDescriptor.from_dict({"queue_type": name, "queue_id": "p", "metadata": {"owner_pid": os.getpid()}})
        sample = sample_queue(Source(None, "p", desc.to_json()))
        assert sample.state == monitor.UNAVAILABLE and "without possibly creating" in sample.detail
        assert "p" not in local.live_queue_ids()


def test_a_bad_descriptor_is_an_error_row() -> None:
    [sample] = Sampler().sample([Source(None, "?", "{not json")])
    assert sample.state == monitor.ERROR and "MalformedDescriptor" in sample.detail


# -- OpenMetrics -----------------------------------------------------------------------------------


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_openmetrics_text_parses_and_leaves_unknown_fields_out(queues: list[Any]) -> None:
    sq = _sage(queues)
    sq.put_many([b"x" * 10, "y"])
    lq = get_local_queue()
    queues.append(lq)
    lq.put(1)
    gone = QueueDescriptor.create_shm_queue(f"mon-gone-{uuid.uuid4().hex[:8]}")
    samples = Sampler().sample(
        [_src(sq, "etl", "in"), _src(lq, "etl", "mid"), Source(None, gone.queue_id, gone.to_json())]
    )
    text = render_openmetrics(samples)
    assert text.endswith("# EOF\n")
    fams = _families(text)
    assert fams["sage_queue_puts"].type == "counter" and fams["sage_queue_depth"].type == "gauge"

    def values(family: str) -> dict[tuple[str, ...], float]:
        return {(s.labels.get("job", ""), s.labels["queue"], s.labels["type"]): s.value for s in fams[family].samples}

    assert values("sage_queue_puts") == {("etl", "in", "sage"): 2, ("etl", "mid", "local"): 1}
    assert values("sage_queue_depth") == {("etl", "in", "sage"): 2, ("etl", "mid", "local"): 1}
    assert values("sage_queue_up") == {
        ("etl", "in", "sage"): 1,
        ("etl", "mid", "local"): 1,
        ("", gone.queue_id, "shm"): 0,
    }
    # local counts no bytes: absent, not 0; both count errors (sage: undecodable items, SAGE7), none here
    assert set(values("sage_queue_bytes_in")) == {("etl", "in", "sage")}
    assert values("sage_queue_errors") == {("etl", "in", "sage"): 0, ("etl", "mid", "local"): 0}
    assert [s.name for s in fams["sage_queue_puts"].samples] == ["sage_queue_puts_total"] * 2
    # the Prometheus 0.0.4 flavour parses with that format's parser
    prom = {f.name: f for f in prometheus_text(render_openmetrics(samples, openmetrics=False))}
    assert prom["sage_queue_puts"].type == "counter"  # the parser names a counter family without _total
    assert [s.value for s in prom["sage_queue_puts"].samples] == [2, 1]
    assert "# EOF" not in render_openmetrics(samples, openmetrics=False)


def test_label_values_are_escaped_and_same_named_jobs_get_a_pid_label(queues: list[Any]) -> None:
    q = _sage(queues)
    odd = 'a "job"\\with\nnewline'
    samples = Sampler().sample(
        [Source(odd, "q", q.descriptor.to_json(), pid=1), Source(odd, "q", q.descriptor.to_json(), pid=2)]
    )
    fams = _families(render_openmetrics(samples))
    labels = [s.labels for s in fams["sage_queue_depth"].samples]
    assert labels == [
        {"job": odd, "queue": "q", "type": "sage", "pid": "1"},
        {"job": odd, "queue": "q", "type": "sage", "pid": "2"},
    ]


# -- sage-queue top and metrics, against a real job process -----------------------------------------

JOB_SCRIPT = """
import sys
from sage_queue import QueueDescriptor, resolve_descriptor
from sage_queue.monitor import publish_job, unpublish_job

job, prefix = sys.argv[1], sys.argv[2]
queues = {
    "input": resolve_descriptor(QueueDescriptor.create_sage_queue(name=prefix + "-in", maxsize=100)),
    "output": resolve_descriptor(QueueDescriptor.create_shm_queue(prefix + "-out", maxsize=100)),
}
queues["input"].put_many(list(range(3)))
path = publish_job(job, {k: q.descriptor for k, q in queues.items()}, consumers={"input": 2})
print("ready", flush=True)
try:
    for line in sys.stdin:  # commands from the test: "destroy NAME", "put NAME N", "get NAME N"
        verb, name, *rest = line.split()
        if verb == "destroy":
            queues.pop(name).destroy()
        elif verb == "put":
            queues[name].put_many(list(range(int(rest[0]))))
        elif verb == "get":
            for _ in range(int(rest[0])):
                queues[name].get(timeout=10)
        print("done", flush=True)
finally:
    unpublish_job(path)
    for q in queues.values():
        q.destroy()
"""


class JobProcess:
    def __init__(self, name: str) -> None:
        self.name = name
        self.prefix = f"mon-job-{uuid.uuid4().hex[:10]}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", JOB_SCRIPT, name, self.prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.readline() == "ready"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        assert self.readline() == "done"

    def segments(self) -> list[tuple[str, str]]:
        return [("sage", self.prefix + "-in"), ("shm", self.prefix + "-out")]

    def stop(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.proc.stdout.close()
        for kind, name in self.segments():  # the job destroys them; a failed test must not leak them
            _segment.unlink(kind, name)


@pytest.fixture
def job(registry: Path) -> Iterator[JobProcess]:
    j = JobProcess(f"job-{uuid.uuid4().hex[:6]}")
    try:
        yield j
    finally:
        j.stop()


def _sage_queue_cmd(*args: str, env_dir: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("sage-queue")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sage_queue.cli"]
    env = {**os.environ, "XDG_RUNTIME_DIR": str(env_dir)}
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([*command, *args], stderr=subprocess.PIPE, text=True, timeout=60, env=env, **kw)


def _rows(text: str) -> dict[str, list[str]]:
    """queue name -> cells of its row in the last table of ``top`` output."""
    tables = text.split("sage-queue top")
    rows = {}
    for line in tables[-1].splitlines()[2:]:
        cells = line.split()
        if len(cells) >= 10:
            rows[cells[1]] = cells
    return rows


def test_top_once_shows_a_running_jobs_queues(job: JobProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["top", "--once"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["input"][:5] == [job.name, "input", "sage", "ok", "3"]
    assert rows["input"][7] == "2"  # consumers, as the job published them
    assert rows["output"][:5] == [job.name, "output", "shm", "ok", "0"]
    # the monitor closed what it opened: no pid of ours left in the segment's header
    info = sage.describe_segment(job.prefix + "-in")
    assert os.getpid() not in info.attached_pids and job.proc.pid in info.attached_pids


def test_top_follows_rates_stalls_and_a_queue_that_goes(job: JobProcess, capsys: pytest.CaptureFixture[str]) -> None:
    sampler = Sampler()
    watch = monitor.sources(job.name)
    sampler.sample(watch)
    job.command("put input 4")
    samples = {s.source.queue: s for s in sampler.sample(watch)}
    assert samples["input"].stats is not None and samples["input"].stats.depth == 7
    assert samples["input"].stalled is True and samples["output"].stalled is False
    job.command("get input 7")
    samples = {s.source.queue: s for s in sampler.sample(watch)}
    assert samples["input"].stalled is False
    gets = samples["input"].gets_per_s
    assert gets is not None and gets > 0
    job.command("destroy output")
    assert cli.main(["top", "--once", "--job", job.name]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["output"][3] == "gone" and rows["input"][3] == "ok"
    assert not os.path.exists(_segment.segment_path("shm", job.prefix + "-out"))  # looking did not create it


@pytest.mark.timeout(90)
def test_top_in_a_subprocess(job: JobProcess, registry: Path) -> None:
    out = _sage_queue_cmd(
        "top", "--job", job.name, "--iterations", "2", "--interval", "0.2", env_dir=registry.parent.parent
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("sage-queue top") == 2
    assert "\x1b[" not in out.stdout  # not a terminal: plain lines
    rows = _rows(out.stdout)
    assert rows["input"][:7] == [job.name, "input", "sage", "ok", "3", "0.0", "0.0"]
    assert rows["input"][8] == "STALLED"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("columns", [0, 60])  # 0: a pseudo-terminal nobody sized (the width is unknown)
def test_top_redraws_in_place_on_a_terminal(job: JobProcess, registry: Path, columns: int) -> None:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    try:
        out = _sage_queue_cmd(
            "top", "--iterations", "2", "--interval", "0.1", env_dir=registry.parent.parent, stdout=follower
        )
        os.close(follower)
        follower = -1
        chunks = []
        while select.select([leader], [], [], 1.0)[0]:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the other end is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    text = b"".join(chunks).decode()
    assert out.returncode == 0, out.stderr
    assert text.count("\x1b[H\x1b[2J") == 2  # each frame redrawn from the top
    assert text.startswith("\x1b[?25l") and text.rstrip().endswith("\x1b[?25h")  # cursor hidden, then restored
    assert "input" in text and "output" in text
    if columns:  # lines cut to the width: a wrapped line would spoil the redraw
        plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
        assert max(len(line) for line in plain.splitlines()) <= columns


def test_top_with_descriptors_and_without_any_job(
    registry: Path, queues: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["top", "--once"]) == 0
    assert "no running sage-queue job" in capsys.readouterr().out
    assert cli.main(["top", "--once", "--job", "nope"]) == 1
    assert "no running job named 'nope'" in capsys.readouterr().err
    q = _sage(queues)
    q.put(1)
    assert cli.main(["top", "--once", q.descriptor.to_json()]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows[q.descriptor.queue_id][:5] == ["-", q.descriptor.queue_id, "sage", "ok", "1"]
    with pytest.raises(SystemExit) as info:
        cli.main(["top", "--interval", "0"])
    assert info.value.code == 2


def test_metrics_to_stdout_and_to_a_file(job: JobProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["metrics", "--job", job.name]) == 0
    fams = _families(capsys.readouterr().out)
    depth = {s.labels["queue"]: s.value for s in fams["sage_queue_depth"].samples}
    assert depth == {"input": 3, "output": 0}
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "sage_queue.prom"
    assert cli.main(["metrics", "--file", str(target)]) == 0
    assert capsys.readouterr().out == ""
    fams = _families(target.read_text())
    assert {s.labels["job"] for s in fams["sage_queue_puts"].samples} == {job.name}
    assert [p.name for p in target.parent.iterdir()] == ["sage_queue.prom"]  # the temporary file was renamed
    assert cli.main(["metrics", "--job", "nope"]) == 1


def test_metrics_without_a_job(registry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["metrics"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "# EOF\n" and "nothing to export" in captured.err
    assert list(text_string_to_metric_families(captured.out)) == []


@pytest.mark.timeout(90)
def test_metrics_served_over_http_until_sigterm(job: JobProcess, registry: Path) -> None:
    script = Path(sys.executable).with_name("sage-queue")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sage_queue.cli"]
    env = {**os.environ, "XDG_RUNTIME_DIR": str(registry.parent.parent)}
    server = subprocess.Popen(
        [*command, "metrics", "--serve", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
        assert match, line
        url = f"http://127.0.0.1:{match.group(1)}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            body = response.read().decode()
        fams = _families(body)
        assert {s.labels["queue"]: s.value for s in fams["sage_queue_depth"].samples} == {"input": 3, "output": 0}
        job.command("get input 1")
        with urllib.request.urlopen(url, timeout=30) as response:  # a second scrape samples afresh
            fams = _families(response.read().decode())
        assert {s.labels["queue"]: s.value for s in fams["sage_queue_gets"].samples}["input"] == 1
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=30)
        assert info.value.code == 404
        info.value.close()
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        assert server.stderr is not None and server.stderr.read() == ""  # quiet: no request log
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
        for stream in (server.stdout, server.stderr):
            if stream is not None:
                stream.close()


# -- a real JobManager publishes itself --------------------------------------------------------------

_release = threading.Event()


def _numbers() -> list[int]:
    return list(range(5))


def _held_sink(items: Iterator[int]) -> int:
    _release.wait(30)  # holds the items in the queue until the test has looked
    return sum(items)


@pytest.mark.timeout(90)
def test_top_and_metrics_see_a_real_jobmanager(registry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = f"real-{uuid.uuid4().hex[:6]}"
    job = Job(
        name=name,
        queues={"numbers": QueueSpec("sage", maxsize=10)},
        stages=[Stage("src", _numbers, output="numbers"), Stage("sink", _held_sink, input="numbers")],
    )
    _release.clear()
    manager = JobManager(job)
    try:
        manager.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the source puts its 5 items (and the manager the EOS marker)
            stats = manager.stats()["numbers"]
            if stats is not None and stats.puts >= 5:
                break
            time.sleep(0.02)
        assert cli.main(["top", "--once", "--job", name]) == 0
        row = _rows(capsys.readouterr().out)["numbers"]
        assert row[:4] == [name, "numbers", "sage", "ok"] and int(row[4]) >= 5 and row[7] == "1"
        assert cli.main(["metrics", "--job", name]) == 0
        fams = _families(capsys.readouterr().out)
        [puts] = fams["sage_queue_puts"].samples
        assert puts.value >= 5
        _release.set()
        result = manager.wait(60)
        assert result.results["sink"] == [10]
    finally:
        _release.set()
        manager.teardown()
    assert running_jobs(name) == []  # teardown unpublished it
    assert cli.main(["top", "--once", "--job", name]) == 1


@pytest.mark.timeout(90)
def test_top_stops_when_the_watched_job_ends(job: JobProcess, registry: Path) -> None:
    script = Path(sys.executable).with_name("sage-queue")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sage_queue.cli"]
    env = {**os.environ, "XDG_RUNTIME_DIR": str(registry.parent.parent)}
    top = subprocess.Popen(
        [*command, "top", "--job", job.name, "--interval", "0.1", "--iterations", "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert top.stdout is not None
        assert top.stdout.readline().startswith("sage-queue top")  # it is watching
        job.stop()  # the job tears down: unpublished, queues destroyed
        rest, err = top.communicate(timeout=30)
        assert top.returncode == 0, err
        assert rest.rstrip().endswith("the watched job(s) ended")
    finally:
        if top.poll() is None:
            top.kill()
            top.communicate(timeout=30)
