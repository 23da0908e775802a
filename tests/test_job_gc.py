"""What a job manager killed by SIGKILL leaves behind, and ``sage-queue gc`` removing it (spec/job.md JOB20).

The manager is a real process killed by a real SIGKILL; the trust checks use a real second uid
(``nobody``, 65534), so the tests that change owners are skipped unless the suite runs as root.
Every test works in a private ``$TMPDIR`` and a private job registry, so gc's job half never
touches another run's directories; its segment half is the host-wide orphan rule (SHM5).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import pid_alive, queue_gone, wait_for_a_worker

from sage_queue import QueueDescriptor, resolve_descriptor
from sage_queue.job import JOB_DIR_OWNER, Job, JobManager, QueueSpec, Stage
from sage_queue.monitor import _start_time, running_jobs
from sage_queue.registry import unavailable_reason
from sage_queue.tools import EMPTY_JOB_DIR_AGE_S, gc_main, job_dirs

TESTS = Path(__file__).resolve().parent
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user (uid 65534) needs root")
needs_sage = pytest.mark.skipif(unavailable_reason("sage") is not None, reason=f"sage: {unavailable_reason('sage')}")
needs_rpc = pytest.mark.skipif(unavailable_reason("rpc") is not None, reason=f"rpc: {unavailable_reason('rpc')}")


# One xdist worker for every test that runs a real gc (see tests/test_tools.py): with --min-age 0 it
# removes any orphan segment, also the queue another test's killed manager left on purpose (seen: the
# spawn and forkserver cases of the SIGKILLed-manager test removed each other's sage queue).
pytestmark = pytest.mark.xdist_group("gc")


@pytest.fixture
def private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private ``$TMPDIR`` (returned) and job registry, for this process and the ones it starts.

    Short, directly in the system's temporary directory, not under ``tmp_path``: a forkserver's socket
    lives in ``$TMPDIR/pymp-*/listener-*``, and under xdist ``tmp_path`` made that longer than an
    AF_UNIX path may be (the manager's forkserver failed: "AF_UNIX path too long")."""
    tmp = Path(tempfile.mkdtemp(prefix="sqgc-"))  # 0700
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads $TMPDIR again
    try:
        yield tmp
    finally:
        monkeypatch.setattr(tempfile, "tempdir", None)
        shutil.rmtree(tmp, ignore_errors=True)


def _gc(args: list[str]) -> str:
    """``sage-queue gc ARGS`` in a process of its own (the private $TMPDIR and registry inherited)."""
    done = subprocess.run(
        [sys.executable, "-m", "sage_queue.cli", "gc", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# -- a manager killed by SIGKILL ---------------------------------------------------------------------

_MANAGER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from sage_queue.job import Job, JobManager, QueueSpec, Stage
    if __name__ == "__main__":
        job = Job(queues={{"a": QueueSpec("sage", maxsize=4), "r": QueueSpec("rpc", maxsize=4)}},
                  stages=[Stage("src", "_job_stages:forever_with_pid", output="a", where="process"),
                          Stage("mid", "_job_stages:square", input="a", output="r", where="process"),
                          Stage("sink", "_job_stages:count", input="r", where="process")],
                  name="killed-job", start_method={start_method!r})
        manager = JobManager(job)
        manager.start()
        print(json.dumps([manager._rpc_dir, {{n: d.to_json() for n, d in manager.descriptors.items()}}]), flush=True)
        manager.wait()
""")


@needs_sage
@needs_rpc
@pytest.mark.spec("JOB20", "JOB1", "JOB14")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_gc_removes_what_a_sigkilled_manager_left(private: Path, tmp_path: Path, start_method: str) -> None:
    # forkserver: the workers' parent is the fork server, which stayed alive as long as they did
    # (each holds the fd whose end it waits for), so they never saw their manager gone (JOB1).
    script = tmp_path / "manager.py"
    script.write_text(_MANAGER.format(tests=str(TESTS), start_method=start_method))
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = dict(os.environ, SAGE_JOB_TEST_DIR=str(pid_dir))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    descs: list[QueueDescriptor] = []
    worker_pids: list[int] = []
    rpc_dir = None
    try:
        assert proc.stdout is not None
        rpc_dir, texts = json.loads(proc.stdout.readline())
        descs = [QueueDescriptor.from_json(t) for t in texts.values()]
        sage = QueueDescriptor.from_json(texts["a"])
        assert rpc_dir is not None and Path(rpc_dir).parent == private
        owner = json.loads((Path(rpc_dir) / JOB_DIR_OWNER).read_text())
        assert owner == {
            "version": 1,
            "pid": proc.pid,
            "pid_start": _start_time(proc.pid),
            "pid_ns": os.readlink("/proc/self/ns/pid"),
        }
        assert (Path(rpc_dir) / JOB_DIR_OWNER).stat().st_mode & 0o777 == 0o600
        worker_pids = wait_for_a_worker(proc, pid_dir, time.monotonic() + 90)
        (entry,) = running_jobs("killed-job")
        # Alive: gc keeps everything of the job.
        out = _gc(["--kind", "job", "-v"])
        assert f"kept job dir {rpc_dir}: its manager (pid {proc.pid}) is alive" in out
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(map(pid_alive, worker_pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(pid_alive, worker_pids)), "a worker outlived its manager"
        # What JOB1/JOB14 say is left: the key directory, the registry entry, the sage queue.
        assert os.path.isdir(rpc_dir) and entry.path.exists() and not queue_gone(sage)
        shm_name = sage.metadata["shm_name"]
        out = _gc(["--dry-run", "--min-age", "0"])
        assert f"would remove job dir {rpc_dir} (its manager (pid {proc.pid}) is gone)" in out
        assert f"would remove job entry {entry.path}" in out
        assert f"would remove sage:{shm_name} " in out
        assert os.path.isdir(rpc_dir) and entry.path.exists() and not queue_gone(sage)  # a dry run
        out = _gc(["--min-age", "0"])
        assert f"removed job dir {rpc_dir} " in out and f"removed sage:{shm_name} " in out
        assert not os.path.lexists(rpc_dir) and not entry.path.exists() and queue_gone(sage)
        # (forkserver: multiprocessing's own pymp-* directory of the killed manager stays; not ours)
        assert not [p for p in private.iterdir() if p.name.startswith("sageq-")]
        out = _gc(["--dry-run", "--min-age", "0"])  # nothing of the job is left to remove
        assert rpc_dir not in out and shm_name not in out and str(entry.path) not in out
    finally:  # leave nothing behind, whatever failed above
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in worker_pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for d in descs:
            if d.queue_type != "rpc" and not queue_gone(d):
                resolve_descriptor(d).destroy()
        if rpc_dir is not None:
            subprocess.run(["rm", "-rf", rpc_dir], check=False)


# -- a live manager's directory is kept, its owner record is its own ------------------------------


def _ten() -> range:
    return range(10)


def _collect(items: Iterator[int]) -> list[int]:
    return list(items)


@needs_rpc
@pytest.mark.spec("JOB20")
@pytest.mark.timeout(60)
def test_a_live_managers_key_directory_is_kept(private: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = Job(
        queues={"r": QueueSpec("rpc", maxsize=4)},
        stages=[Stage("src", _ten, output="r"), Stage("sink", _collect, input="r")],
    )
    manager = JobManager(job).start()
    try:
        assert manager._rpc_dir is not None
        key_dir = manager._rpc_dir
        assert sorted(os.listdir(key_dir)) == [JOB_DIR_OWNER, "rpc.key"]
        assert gc_main(["--kind", "job", "-v"]) == 0
        out = capsys.readouterr().out
        assert f"kept job dir {key_dir}: its manager (pid {os.getpid()}) is alive" in out
        assert "removed 0 job key directory(ies)" in out
        assert os.path.isdir(key_dir)
        assert manager.wait(timeout=30).results["sink"] == [list(range(10))]
    finally:
        manager.teardown()
    assert not os.path.lexists(key_dir)


# -- what gc must never touch ----------------------------------------------------------------------


def _key_dir(tmp: Path, name: str, owner: object = None, mode: int = 0o700) -> Path:
    d = tmp / f"sageq-job-{name}"
    d.mkdir(mode=0o700)
    (d / "rpc.key").write_text("secret")
    if owner is not None:
        fd = os.open(d / JOB_DIR_OWNER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(owner if isinstance(owner, str) else json.dumps(owner))
    d.chmod(mode)
    return d


def _record(pid: int, start: object = None) -> dict[str, object]:
    return {"version": 1, "pid": pid, "pid_start": start}


@needs_root
@pytest.mark.spec("JOB20")
@pytest.mark.timeout(60)
def test_gc_removes_only_our_dead_managers_directories(private: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = _dead_pid()
    me = os.getpid()
    removable = {
        "dead": _key_dir(private, "dead", _record(dead)),
        "dead-here": _key_dir(private, "dead-here", {**_record(dead), "pid_ns": os.readlink("/proc/self/ns/pid")}),
        # Our pid with another start time: the pid was reused, its manager is gone.
        "reused": _key_dir(private, "reused", _record(me, (_start_time(me) or 0) + 12345)),
    }
    empty_old = private / "sageq-job-empty-old"
    empty_old.mkdir(mode=0o700)
    old = time.time() - EMPTY_JOB_DIR_AGE_S - 60
    os.utime(empty_old, (old, old))
    removable["empty-old"] = empty_old
    kept = {
        "alive": (_key_dir(private, "alive", _record(me, _start_time(me))), "is alive"),
        "mode": (_key_dir(private, "mode", _record(dead), mode=0o755), "mode 0755, not 0700"),
        "corrupt": (_key_dir(private, "corrupt", '{"version": 1, "pid": '), "owner record is corrupt"),
        "badpid": (_key_dir(private, "badpid", _record(0)), "owner record is corrupt"),
        "version": (_key_dir(private, "version", {"version": 2, "pid": dead}), "owner record is corrupt"),
        "norecord": (_key_dir(private, "norecord"), "no owner record"),
        # A $TMPDIR shared with a container: that pid is another namespace's (dead here or not).
        "otherns": (
            _key_dir(private, "otherns", {**_record(dead), "pid_ns": "pid:[1]"}),
            "made in another pid namespace (pid:[1]",
        ),
        "badns": (_key_dir(private, "badns", {**_record(dead), "pid_ns": 7}), "owner record is corrupt"),
    }
    empty_young = private / "sageq-job-empty-young"
    empty_young.mkdir(mode=0o700)
    kept["empty-young"] = (empty_young, "no owner record")
    # Another user's directory, and ours with another user's record: never judged by that record.
    theirs = _key_dir(private, "theirs", _record(dead))
    os.chown(theirs / JOB_DIR_OWNER, NOBODY, NOBODY)
    os.chown(theirs, NOBODY, NOBODY)
    kept["theirs"] = (theirs, f"owned by uid {NOBODY}")
    planted = _key_dir(private, "planted", _record(dead))
    os.chown(planted / JOB_DIR_OWNER, NOBODY, NOBODY)
    kept["planted"] = (planted, f"owner record is owned by uid {NOBODY}")
    loose = _key_dir(private, "loose", _record(dead))
    (loose / JOB_DIR_OWNER).chmod(0o622)
    kept["loose"] = (loose, "mode 0622 (group/others may write it)")
    # A symbolic link named like a key directory, to a directory gc would remove: not followed.
    target = private / "elsewhere"
    target.mkdir(mode=0o700)
    (target / JOB_DIR_OWNER).write_text(json.dumps(_record(dead)))
    (target / JOB_DIR_OWNER).chmod(0o600)
    (private / "sageq-job-link").symlink_to(target)
    kept["link"] = (private / "sageq-job-link", "not a directory (a symbolic link?)")
    # A record that is a symbolic link to a record gc would trust: not followed.
    linked = _key_dir(private, "linkedrecord")
    (linked / JOB_DIR_OWNER).symlink_to(target / JOB_DIR_OWNER)
    kept["linkedrecord"] = (linked, "owner record is a symbolic link")

    assert gc_main(["--kind", "job", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for d in removable.values():
        assert f"would remove job dir {d} (" in out
    assert len([line for line in out.splitlines() if line.startswith("would remove job dir")]) == len(removable)
    assert all(d.is_dir() for d in removable.values())  # a dry run
    assert gc_main(["--kind", "job", "-v"]) == 0
    out = capsys.readouterr().out
    for d, why in kept.values():
        line = next((x for x in out.splitlines() if x.startswith(f"kept job dir {d}: ")), "")
        assert why in line, (d, out)
        assert os.path.lexists(d)
    assert not any(os.path.lexists(d) for d in removable.values())
    assert f"removed {len(removable)} job key directory(ies)" in out
    assert (target / JOB_DIR_OWNER).exists() and (theirs / "rpc.key").exists()
    assert sorted(i.path for i in job_dirs() if i.kept is None) == []


@pytest.mark.spec("JOB20")
@pytest.mark.timeout(60)
def test_gc_kind_limits_what_it_looks_at(private: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _key_dir(private, "dead", _record(_dead_pid()))
    assert gc_main(["--kind", "shm", "--dry-run", "--min-age", "3600"]) == 0
    out = capsys.readouterr().out
    assert "job dir" not in out and "job key director" not in out and d.is_dir()
    assert gc_main(["--kind", "job"]) == 0
    out = capsys.readouterr().out
    assert "orphan segment" not in out and f"removed job dir {d} (" in out and not d.exists()


_ATTACHED = textwrap.dedent("""
    import sys, time
    from sage_queue import QueueDescriptor, resolve_descriptor
    q = resolve_descriptor(QueueDescriptor.create_shm_queue({name!r}, capacity_bytes=4096))
    q.put("left behind")
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.mark.spec("JOB20")
@pytest.mark.timeout(60)
def test_a_zombie_holds_no_queue(private: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A worker killed after its manager died is re-parented; an init that never reaps (some
    # containers' pid 1) leaves it a zombie for good. It is dead: its queue is an orphan.
    name = f"t-zombie-{os.getpid()}-{time.monotonic_ns()}"
    desc = QueueDescriptor.create_shm_queue(name, capacity_bytes=4096)
    child = subprocess.Popen([sys.executable, "-c", _ATTACHED.format(name=name)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pid_alive(child.pid):  # until it is a zombie: dead, and not reaped (no wait() yet)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert os.path.exists(f"/proc/{child.pid}")  # still there, as a zombie
        assert gc_main(["--kind", "shm", "--min-age", "0", "-v"]) == 0
        out = capsys.readouterr().out
        assert f"removed shm:{name} (pids [{child.pid}] all dead)" in out
        assert queue_gone(desc)
    finally:
        child.kill()
        child.wait()
        if not queue_gone(desc):
            resolve_descriptor(desc).destroy()


@pytest.mark.spec("JOB20")
@pytest.mark.timeout(60)
def test_gc_removes_half_written_registry_entries_of_dead_publishers(
    private: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A manager killed between writing its job file aside and renaming it leaves a .tmp-*.json that
    # monitors skip: before, nothing ever removed it.
    from sage_queue.monitor import jobs_dir

    directory = jobs_dir(create=True)
    assert directory is not None
    old, young = directory / ".tmp-old.json", directory / ".tmp-young.json"
    for path in (old, young):
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b'{"version": 1, "na')
        os.close(fd)
    past = time.time() - 3700
    os.utime(old, (past, past))
    assert gc_main(["--kind", "job", "--dry-run"]) == 0
    assert f"would remove job entry {old} (half-written" in capsys.readouterr().out and old.exists()
    assert gc_main(["--kind", "job"]) == 0
    out = capsys.readouterr().out
    assert f"removed job entry {old} (half-written" in out and str(young) not in out
    assert not old.exists() and young.exists()  # a young one may be a publisher's at work
