"""``sage_queue.monitor``: the job registry, sampling, OpenMetrics text, ``sage-queue top`` and ``metrics``."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sage_queue import QueueDescriptor, QueuePermissionError, monitor
from sage_queue.monitor import jobs_dir, publish_job, read_job, running_jobs, unpublish_job

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
