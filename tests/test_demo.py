"""``sage-queue demo`` (``make demo``): the seed's scenarios and the main job, run as a user runs them.

The demo runs in its own process, with Ray disabled here (``--no-ray``): the Ray-enabled run lives
in tests/ray/test_ray_demo.py. What must hold after every run, also one interrupted by SIGINT: no
process the demo started is alive (every one inherits a token in its environment, so re-parented
orphans are found too) and no shared-memory segment created by the demo's process remains.
The failure paths are checked in-process with a deliberately broken backend.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any, Optional

import pytest
from _helpers import registered_queue_type

from sage_queue import QUEUE_STUB_MAPPING, _segment
from sage_queue.backends.local import LocalQueueStub, live_queue_ids
from sage_queue.demo import QUICK_ITEMS, Hop, JobStats, Plan, _body, all_types, choose_descriptor, run_main_job
from sage_queue.demo import main as demo_main
from sage_queue.registry import unavailable_reason
from sage_queue.tools import describe

SCENARIOS = ("1 cross-process", "2 adaptive", "3 job pipeline")
TOKEN_VAR = "SAGE_QUEUE_DEMO_TEST_TOKEN"


# -- running the demo and looking for what it left ---------------------------------------------------


def _start(*args: str, token: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sage_queue.cli", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, TOKEN_VAR: token},
        start_new_session=True,  # its own process group: a group SIGINT is a terminal's Ctrl-C
    )


def _processes_with(token: str) -> list[str]:
    """``pid cmdline`` of every live (non-zombie) process carrying the token."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry} {cmdline[:120]}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _segments_created_by(pid: int) -> list[str]:
    return [f"{kind}:{name}" for kind, name in _segment.list_segments(None) if describe(kind, name).creator_pid == pid]


def assert_nothing_left(token: str, demo_pid: int) -> None:
    # Processes get a few seconds to finish exiting (Ray's are told to stop, not waited for one by one).
    deadline = time.monotonic() + 15
    while (left := _processes_with(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the demo still alive: {left}"
    assert not _segments_created_by(demo_pid), "segments the demo created are left"


def run_demo(*args: str, timeout: float = 150) -> tuple[subprocess.CompletedProcess[str], int]:
    token = uuid.uuid4().hex
    proc = _start(*args, token=token)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert_nothing_left(token, proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


# -- reading its output --------------------------------------------------------------------------------


def _block(text: str, header: str) -> list[str]:
    """The lines of the table whose header line starts with ``header``, up to the first blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 2
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line)
    return block


def scenario_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """``(backend, scenario) -> cells`` from part 1's table (columns split on 2+ spaces)."""
    rows = {}
    for line in _block(text, "backend "):
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 3:
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def job_rows(text: str) -> dict[str, list[str]]:
    """``queue -> [type, between, items, items/s, p50, p99, transfer]`` from part 2's table."""
    return {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in _block(text, "queue "))}


def no_ray_types() -> dict[str, str]:
    """The main job's queue types with --no-ray: the Ray hop on a same-host type (rpc's too if it is missing)."""
    same_host = next(t for t in ("shm", "sage") if unavailable_reason(t) is None)
    sage_or_shm = "sage" if unavailable_reason("sage") is None else "shm"
    return {
        "raw": "rpc" if unavailable_reason("rpc") is None else same_host,
        "parsed": same_host,
        "enriched": sage_or_shm,
    }


def check_job_table(text: str, types: dict[str, str], items: int) -> None:
    rows = job_rows(text)
    assert list(rows) == [*types, "end-to-end"], rows
    for name, (queue_type, between, count, rate, p50, p99, transfer) in rows.items():
        assert queue_type == types.get(name, "-"), (name, queue_type)
        assert " -> " in between
        assert int(count) == items, (name, count)
        assert float(rate.replace(",", "")) > 0
        assert 0 <= float(p50) <= float(p99), (name, p50, p99)
        if name != "end-to-end":
            assert 0 <= float(transfer) <= float(p99) + 1e-3, (name, transfer)
    assert f"main job ok: {items} items" in text


# -- the demo, whole -------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_demo_runs_every_backend_and_the_main_job_and_leaves_nothing() -> None:
    result, _ = run_demo("--quick", "--no-ray", "--explain")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    rows = scenario_rows(out)
    available = [t for t in all_types() if QUEUE_STUB_MAPPING.available(t)]
    assert "local" in available
    for queue_type in all_types():
        if queue_type in available and queue_type not in ("ray_queue", "ray_actor"):
            for scenario in SCENARIOS:
                result_cell, items, seconds, *_detail = rows[(queue_type, scenario)]
                assert result_cell == "ok", (queue_type, scenario, rows[(queue_type, scenario)])
                assert int(items) > 0 and seconds.endswith("s")
        elif queue_type in available:
            assert rows[(queue_type, "all")] == ["skipped", "-", "-", "Ray not started (--no-ray)"]
        else:
            assert rows[(queue_type, "all")][0] == "skipped", rows[(queue_type, "all")]
    # local: the child holding the JSON must get QueueNotFound, and threads share the queue.
    assert "QueueNotFound" in " ".join(rows[("local", "1 cross-process")])
    assert "2 worker threads" in " ".join(rows[("local", "3 job pipeline")])
    for queue_type in ("shm", "sage", "rpc"):
        if queue_type in available:  # real children did the work
            assert "child pid" in " ".join(rows[(queue_type, "1 cross-process")])
            assert "JobManager: 2 worker processes" in " ".join(rows[(queue_type, "3 job pipeline")])
    # Part 2 without Ray: the ray_actor hop is replaced by a same-host type, and the reason is printed.
    rpc_ok = unavailable_reason("rpc") is None
    check_job_table(out, no_ray_types(), QUICK_ITEMS)
    assert "note: parsed instead of ray_actor: Ray not started (--no-ray)" in out
    assert "raw: rpc: an end runs on another host (edge)" in out or not rpc_ok  # --explain: the choices
    assert "everything ok" in out.splitlines()[-1] and "FAILED" not in out
    assert result.stderr == "", result.stderr  # quiet: nothing but the report


@pytest.mark.timeout(120)
def test_items_option_sets_the_main_job_size() -> None:
    result, _ = run_demo("--skip-scenarios", "--no-ray", "--items", "37")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Part 1" not in result.stdout
    rows = job_rows(result.stdout)
    assert [int(r[2]) for r in rows.values()] == [37] * 4
    assert " 100%" in result.stdout  # the plain progress line (stdout is not a terminal)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", ["pid", "group", "sigterm"])
def test_sigint_mid_job_tears_everything_down(target: str) -> None:
    """SIGINT to the demo alone, or to its process group as a terminal's Ctrl-C does (its workers, its
    rpc server and its host worker get it too), or SIGTERM to the demo: exit 128 + the signal's number,
    and nothing is left running or mapped."""
    token = uuid.uuid4().hex
    proc = _start("--skip-scenarios", "--no-ray", "--items", "50000", token=token)
    assert proc.stdout is not None
    try:
        seen = ""
        while " 10%" not in seen:  # the job is running: workers up, items flowing through every queue
            chunk = proc.stdout.read(1)
            assert chunk, (
                f"the demo ended before the job ran: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}"
            )
            seen += chunk
        if target == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM if target == "sigterm" else signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    sig = signal.SIGTERM if target == "sigterm" else signal.SIGINT
    assert proc.returncode == 128 + sig, (proc.returncode, seen + out, err)
    assert f"interrupted ({sig.name})" in err
    assert " 100%" not in seen + out
    assert_nothing_left(token, proc.pid)


# -- failure paths, in-process -----------------------------------------------------------------------


class _DropsEveryOtherPut(LocalQueueStub):
    """A backend with a bug: it loses every second item put. The demo must catch it."""

    def __init__(self, descriptor: Any) -> None:
        super().__init__(descriptor)
        self._puts = 0

    def _put(self, item: Any, timeout: Optional[float]) -> None:
        self._puts += 1
        if self._puts % 2:
            super()._put(item, timeout)


@pytest.fixture
def broken_type() -> Iterator[str]:
    with registered_queue_type("broken", _DropsEveryOtherPut) as name:
        yield name


@pytest.mark.timeout(60)
def test_demo_fails_loudly_on_a_broken_backend_and_still_cleans_up(
    broken_type: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = live_queue_ids()
    status = demo_main(["--backends", f"local,{broken_type}", "--wait", "0.5", "--no-ray", "--skip-job"])
    out = capsys.readouterr().out
    assert status == 1
    rows = scenario_rows(out)
    assert [rows[("local", s)][0] for s in SCENARIOS] == ["ok"] * 3
    for scenario in SCENARIOS:
        assert rows[(broken_type, scenario)][0] == "FAILED", rows[(broken_type, scenario)]
        assert rows[(broken_type, scenario)][-1], "a failed row names its cause"
    assert "1 FAILED" not in out and "3 FAILED" in out  # the summary counts and lists every failure
    assert out.rstrip().splitlines()[-1].startswith(f"  {broken_type} / 3 job pipeline: FAILED")
    assert live_queue_ids() == before, "queues of the failed scenarios were not destroyed"


@pytest.mark.timeout(60)
def test_demo_skips_what_is_not_registered(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_main(["--backends", "no_such_type", "--no-ray", "--skip-job"]) == 0
    rows = scenario_rows(capsys.readouterr().out)
    assert rows[("no_such_type", "all")] == ["skipped", "-", "-", "not registered"]


def test_bad_item_count_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        demo_main(["--items", "0"])
    assert exc.value.code == 2 and "--items must be >= 1" in capsys.readouterr().err


def test_adaptive_choice_follows_the_environment() -> None:
    # With Ray running in this process (this worker may host the session's Ray tests) the choice is
    # ray_queue; otherwise the best shared-memory type, else local.
    ray_running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    order = ("ray_queue",) if ray_running else ("sage", "shm", "local")
    expected = next(t for t in order if QUEUE_STUB_MAPPING.available(t))
    assert choose_descriptor(maxsize=5).queue_type == expected
    assert choose_descriptor(maxsize=5, allowed=frozenset({"local"})).queue_type == "local"
    assert choose_descriptor(maxsize=5, allowed=frozenset({"local"})).metadata["owner_pid"] == os.getpid()


# -- the sink's arithmetic and checks ------------------------------------------------------------------

HOPS = [Hop("a", "sage", "source", "mid"), Hop("b", "rpc", "mid", "sink")]


def _item(seq: int, t0: float, **extra: Any) -> dict[str, Any]:
    """An item as the last transform hands it on: stamps put a, ready a, got a, put b."""
    import hashlib

    body = _body(seq)
    return {
        "seq": seq,
        "body": body,
        "digest": hashlib.sha256(body).hexdigest()[:16],
        "t": [t0, t0, t0 + 0.001 * (seq + 1), t0 + 0.001 * (seq + 1)],
        **extra,
    }


def test_job_stats_figures_from_stamps() -> None:
    stats = JobStats(40, HOPS)
    t0 = time.monotonic()
    assert stats.consume(iter([_item(seq, t0) for seq in range(40)])) == 40
    a, b, end = stats.figures()
    assert (a.name, a.queue_type, a.between, a.items) == ("a", "sage", "source -> mid", 40)
    # Queue a: item seq took (seq + 1) ms from put to get, its consumer waiting from the start.
    assert a.p50_s == pytest.approx(0.020) and a.p99_s == pytest.approx(0.040)
    assert a.transfer_p50_s == pytest.approx(0.020)
    assert a.throughput == pytest.approx(40 / 0.039)
    assert end.items == 40 and end.queue_type == "" and end.p99_s >= b.p99_s


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"seq": 3}, "duplicated"),
        ({"seq": 99}, "never sent"),
        ({"body": b"x" * 256}, "altered"),
        ({"digest": "0" * 16}, "altered"),
    ],
)
def test_job_stats_refuses_a_lost_duplicated_or_altered_item(bad: dict[str, Any], message: str) -> None:
    t0 = time.monotonic()
    items = [_item(seq, t0) for seq in range(5)]
    items[4].update(bad)
    with pytest.raises(ValueError, match=message):
        JobStats(5, HOPS).consume(iter(items))


@pytest.mark.timeout(120)
def test_progress_is_a_bar_on_a_terminal_only() -> None:
    """On a terminal (a pty of 120 columns) the sink feeds a tqdm bar on stderr instead of the plain line."""
    pytest.importorskip("tqdm")
    import fcntl
    import pty
    import struct
    import termios

    token = uuid.uuid4().hex
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sage_queue.demo", "--skip-scenarios", "--no-ray", "--items", "3000"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, TOKEN_VAR: token},
        start_new_session=True,
    )
    os.close(slave)  # the child holds it: reading the master ends (EIO) once the child is gone
    data = b""
    try:
        while chunk := _read_pty(master):
            data += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.wait(timeout=60)
    text = data.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "main job:" in text and "/3000 [" in text and "item/s" in text  # tqdm's frames
    assert " 10% 20%" not in text  # not the plain line
    check_job_table(text.replace("\r\n", "\n"), no_ray_types(), 3000)
    assert_nothing_left(token, proc.pid)


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the child closed its side
        return b""


class _CorruptsEveryThirdBody(LocalQueueStub):
    """A backend with a bug: every third item's payload arrives with its first byte changed."""

    def __init__(self, descriptor: Any) -> None:
        super().__init__(descriptor)
        self._puts = 0

    def _put(self, item: Any, timeout: Optional[float]) -> None:
        self._puts += 1
        if isinstance(item, dict) and "body" in item and self._puts % 3 == 0:
            item = {**item, "body": bytes([item["body"][0] ^ 1]) + item["body"][1:]}
        super()._put(item, timeout)


@pytest.mark.timeout(60)
def test_main_job_reports_a_corrupting_queue_with_its_cause() -> None:
    import io

    before = live_queue_ids()
    with registered_queue_type("corrupt", _CorruptsEveryThirdBody) as corrupt:
        # Every stage a thread of this process: a type registered here only is reachable by them.
        plan = Plan(
            where={"source": "thread", "parse": "thread", "enrich": "thread", "sink": "thread"},
            queues={"raw": "local", "parsed": corrupt, "enriched": "local"},
            notes={},
        )
        report = run_main_job(50, plan, io.StringIO())
    assert report.error is not None and "altered on the way" in report.error, report.error
    assert report.error.startswith("worker sink[0] raised ValueError"), report.error
    assert live_queue_ids() == before, "the failed job's queues were not destroyed"
