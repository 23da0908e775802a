"""``sage_queue.monitor``: the job registry, sampling, OpenMetrics text, ``sage-queue top`` and ``metrics``."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
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
    get_local_queue,
    monitor,
    register_queue_implementation,
    resolve_descriptor,
    unregister_queue_implementation,
)
from sage_queue.backends import local, shm
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
    # local counts no bytes and no errors: absent, not 0; sage counts bytes
    assert set(values("sage_queue_bytes_in")) == {("etl", "in", "sage")}
    assert "sage_queue_errors" not in fams or ("etl", "mid", "local") not in values("sage_queue_errors")
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
