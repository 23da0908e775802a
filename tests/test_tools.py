"""``sage-queue ls``, ``gc`` and ``inspect`` on real segments and real (dead and live) processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sage_queue import QueueDescriptor, _segment, resolve_descriptor
from sage_queue.backends import shm
from sage_queue.backends.shm import layout
from sage_queue.tools import gc_main, inspect_main, ls_main

# xdist_group "gc": a real gc (--min-age 0) removes every orphan segment of the machine, so the tests
# that make orphans on purpose and run gc (this file, test_job_gc.py) run in one worker, one at a time.
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm"),
    pytest.mark.xdist_group("gc"),
]


@pytest.fixture
def names() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for name in made:
        shm.remove_segment(name)


def _new_name(names: list[str]) -> str:
    name = f"tools-{uuid.uuid4().hex[:12]}"
    names.append(name)
    return name


def _orphan(name: str) -> int:
    """A queue created (2 items in it) by a process that then dies without closing or destroying it."""
    code = textwrap.dedent(
        """
        import os, sys
        from sage_queue import QueueDescriptor, resolve_descriptor
        q = resolve_descriptor(QueueDescriptor.create_shm_queue(sys.argv[1]))
        q.put(1); q.put(2)
        print(os.getpid(), flush=True)
        os._exit(0)  # like a crash: no close(), so its pid stays in the table
        """
    )
    child = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, timeout=30)
    assert child.returncode == 0, child.stderr
    return int(child.stdout)


def _run(main: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().out


@pytest.mark.spec("SHM5")
def test_ls_lists_our_queue_with_pids_and_depth(names: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    name = _new_name(names)
    q = resolve_descriptor(QueueDescriptor.create_shm_queue(name))
    try:
        q.put_many(["a", "b", "c"])
        code, out = _run(ls_main, ["--kind", "shm", "--json"], capsys)
        assert code == 0
        rows = {row["name"]: row for row in json.loads(out)}
        row = rows[name]
        assert (row["kind"], row["depth"], row["attached_pids"], row["orphan"]) == ("shm", 3, [os.getpid()], False)
        assert row["creator_pid"] == os.getpid() and row["format_version"] == shm.LAYOUT_VERSION
        code, out = _run(ls_main, ["--kind", "shm"], capsys)
        line = next(line for line in out.splitlines() if name in line)
        assert f"{os.getpid()}*" in line and " 3 " in line
    finally:
        q.destroy()


@pytest.mark.spec("SHM5")
def test_gc_removes_an_orphan_and_keeps_a_live_queue(names: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    dead_name, live_name = _new_name(names), _new_name(names)
    dead_pid = _orphan(dead_name)
    live = resolve_descriptor(QueueDescriptor.create_shm_queue(live_name))
    try:
        info = shm.describe_segment(dead_name)
        assert info.attached_pids == (dead_pid,) and info.depth == 2 and info.orphan
        code, out = _run(gc_main, ["--kind", "shm", "--min-age", "0", "--dry-run"], capsys)
        assert code == 0 and f"would remove shm:{dead_name}" in out
        assert os.path.exists(_segment.segment_path("shm", dead_name))  # dry run
        code, out = _run(gc_main, ["--kind", "shm", "--min-age", "0", "-v"], capsys)
        assert code == 0
        assert f"removed shm:{dead_name}" in out
        assert f"kept shm:{live_name}: live pids [{os.getpid()}]" in out
        assert not os.path.exists(_segment.segment_path("shm", dead_name))
        assert os.path.exists(_segment.segment_path("shm", live_name))
        live.put("still works")
        assert live.get(timeout=1) == "still works"
    finally:
        live.destroy()


def test_gc_keeps_young_orphans_and_incomplete_pid_lists(names: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    young = _new_name(names)
    _orphan(young)
    _, out = _run(gc_main, ["--kind", "shm", "--min-age", "3600", "-v"], capsys)
    assert f"kept shm:{young}: younger than" in out
    assert os.path.exists(_segment.segment_path("shm", young))
    # A pid table that overflowed may miss live processes: never an orphan.
    seg = _segment.Segment.open("shm", young, 0, create=False)
    try:
        layout.store32(seg.buf, layout.PID_OVERFLOW_OFFSET, 1)
    finally:
        seg.close()
    _, out = _run(gc_main, ["--kind", "shm", "--min-age", "0", "-v"], capsys)
    assert f"kept shm:{young}: its pid list is incomplete" in out
    assert os.path.exists(_segment.segment_path("shm", young))


def test_gc_removes_a_segment_whose_creator_died_before_initialising_it(
    names: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    name = _new_name(names)
    seg = _segment.Segment.open("shm", name, 8192, create=True)  # zero-filled: no magic, no pids
    seg.close()
    info = shm.describe_segment(name)
    assert info.depth is None and "uninitialised" in info.note
    _, out = _run(gc_main, ["--kind", "shm", "--min-age", "0"], capsys)
    assert f"removed shm:{name}" in out


def test_inspect_by_name_and_by_descriptor(names: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    name = _new_name(names)
    desc = QueueDescriptor.create_shm_queue(name, maxsize=4)
    q = resolve_descriptor(desc)
    try:
        q.put("x")
        code, out = _run(inspect_main, [f"shm:{name}"], capsys)
        assert code == 0
        data: dict[str, Any] = json.loads(out)
        assert data["segment"]["depth"] == 1 and data["segment"]["attached_pids"] == [os.getpid()]
        code, out = _run(inspect_main, [desc.to_json()], capsys)
        data = json.loads(out)
        assert code == 0 and data["descriptor"]["metadata"]["maxsize"] == 4 and data["segment"]["depth"] == 1
    finally:
        q.destroy()
    code, out = _run(inspect_main, [f"shm:{name}"], capsys)
    assert code == 1 and "no shm segment" in out
    assert inspect_main(["nonsense"]) == 2
    assert inspect_main(['{"queue_type": "shm"}']) == 2


def test_cli_ls_runs_as_a_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sage_queue.cli", "ls", "--kind", "shm"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("KIND") or proc.stdout.startswith("no sage-queue segments")


def test_inspect_stats_attaches_without_creating(names: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    name = _new_name(names)
    desc = QueueDescriptor.create_shm_queue(name, maxsize=4)
    code, out = _run(inspect_main, ["--stats", desc.to_json()], capsys)
    data: dict[str, Any] = json.loads(out)
    assert code == 1 and data["state"] == "gone" and data["stats"] is None
    assert not os.path.exists(_segment.segment_path("shm", name))  # looking created nothing
    q = resolve_descriptor(desc)
    local = resolve_descriptor(QueueDescriptor.create_local_queue())
    try:
        q.put_many(["a", "b"])
        q.get()
        code, out = _run(inspect_main, ["--stats", desc.to_json()], capsys)
        data = json.loads(out)
        assert code == 0 and data["state"] == "ok"
        assert (data["stats"]["puts"], data["stats"]["gets"], data["stats"]["depth"]) == (2, 1, 1)
        assert data["segment"]["depth"] == 1  # the header read agrees with stats()
        local.put(1)
        code, out = _run(inspect_main, ["--stats", local.descriptor.to_json()], capsys)
        data = json.loads(out)
        assert code == 0 and data["stats"]["depth"] == 1 and data["stats"]["errors"] == 0
    finally:
        q.destroy()
        local.destroy()
    assert inspect_main(["--stats", f"shm:{name}"]) == 2


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="a zombie is told from /proc/PID/stat (Linux)")
def test_a_zombie_is_not_alive(names: list[str]) -> None:
    """A process that died and was never reaped (this machine's pid 1 never reaps orphans) holds no
    mapping and no lock: pid_alive says dead, so gc removes its queue and shm reuses its pid slot.
    Before, ``_segment.pid_alive`` said alive (``kill(pid, 0)`` succeeds on a zombie)."""
    name = f"zombie-{uuid.uuid4().hex[:8]}"
    names.append(name)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: attach, then die without closing
        os.close(read_end)
        try:
            q = resolve_descriptor(QueueDescriptor.create_shm_queue(name))  # kept open: dies attached
            q.put("left by a zombie")
        finally:
            os.write(write_end, b"x")
            os._exit(0)
    os.close(write_end)
    try:
        assert os.read(read_end, 1) == b"x"
        deadline = time.monotonic() + 10
        while _segment.pid_alive(pid):  # becomes a zombie: we do not reap it yet
            assert time.monotonic() < deadline, "pid_alive still says a dead, unreaped child is alive"
            time.sleep(0.01)
        os.kill(pid, 0)  # still a process table entry: a zombie, not gone
        info = shm.describe_segment(name)
        assert pid in info.attached_pids and info.orphan
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
