"""``sage-queue demo`` with Ray: the ray rows of part 1 and the main job's ray_actor hop on a Ray worker.

The demo starts its own local Ray instance (not this session's), so it runs in a subprocess; every
process it starts, Ray's included, inherits a token in its environment, and none may outlive it
(a Ray actor lives in a Ray worker process, so "no process left" covers "no actor left" too).
Helpers are test_demo.py's (tests/ is on the path: its conftest.py is loaded first).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_demo import SCENARIOS, TOKEN_VAR, _start, assert_nothing_left, check_job_table, run_demo, scenario_rows

from sage_queue.demo import QUICK_ITEMS
from sage_queue.registry import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason("rpc") is not None, reason="the main job's rpc hop needs pyzmq")


@pytest.mark.timeout(300)
def test_demo_with_ray_runs_every_row_and_the_three_types_in_one_job() -> None:
    result, _ = run_demo("--quick", "--explain", timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    rows = scenario_rows(out)
    for queue_type in ("ray_queue", "ray_actor"):
        assert [rows[(queue_type, s)][0] for s in SCENARIOS] == ["ok"] * 3, out
        assert "child pid" in " ".join(rows[(queue_type, "1 cross-process")])
        assert "tasks on Ray workers" in " ".join(rows[(queue_type, "3 job pipeline")])
    check_job_table(out, {"raw": "rpc", "parsed": "ray_actor", "enriched": "sage"}, QUICK_ITEMS)
    assert "parse: a Ray worker" in out and "a process on host 'edge'" in out
    assert "parsed: ray_actor: an end is a Ray worker" in out  # --explain
    assert "everything ok" in out.splitlines()[-1]


@pytest.mark.timeout(180)
def test_ctrl_c_with_ray_running_tears_down_ray_too() -> None:
    """SIGINT to the demo's process group mid-job, as a terminal's Ctrl-C: the job's Ray worker, its
    actor queue, the processes that joined Ray and the local Ray instance itself are all gone."""
    token = uuid.uuid4().hex
    proc = _start("--skip-scenarios", "--items", "20000", token=token)
    assert proc.stdout is not None
    try:
        seen = ""
        while " 10%" not in seen:
            chunk = proc.stdout.read(1)
            assert chunk, f"the demo ended before the job ran: {proc.wait()}"
            seen += chunk
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, (proc.returncode, seen + out, err[-2000:])
    assert "interrupted (SIGINT)" in err
    assert " 100%" not in seen + out and "main job ok" not in out  # stopped mid-way, not finished
    assert_nothing_left(token, proc.pid)


@pytest.mark.timeout(180)
def test_heterogeneous_pipeline_example_with_ray() -> None:
    token = uuid.uuid4().hex
    example = Path(__file__).resolve().parents[2] / "examples" / "heterogeneous_pipeline.py"
    proc = subprocess.Popen(
        [sys.executable, str(example)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, TOKEN_VAR: token},
    )
    try:
        out, err = proc.communicate(timeout=170)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out + err[-3000:]
    types = {line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith("queue ")}
    assert types == {"raw": "rpc", "parsed": "ray_actor", "enriched": "sage"}, out
    assert f"500 items, sum of squares {sum(n * n for n in range(500))};" in out
    assert_nothing_left(token, proc.pid)
