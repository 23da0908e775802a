"""examples/: each of the seed's scenarios runs as a user would run it, in a subprocess, and cleans up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sage_queue.registry import unavailable_reason

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
needs_sage = pytest.mark.skipif(unavailable_reason("sage") is not None, reason=f"sage: {unavailable_reason('sage')}")


def _segments() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _run(*args: str) -> str:
    before = _segments()
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=EXAMPLES.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Nothing left behind in /dev/shm by the example (ids are random, so any new entry of
    # these types would be the example's).
    new = {s for s in _segments() - before if s.startswith(("sage_", "shm_", "sageq-sage_", "sageq-shm_"))}
    assert not new, new
    return proc.stdout


@pytest.mark.timeout(180)
@pytest.mark.parametrize("queue_type", [pytest.param("sage", marks=needs_sage), "shm"])
def test_scenario1_cross_process(queue_type: str) -> None:
    report = json.loads(_run("scenario1_cross_process.py", queue_type).strip().splitlines()[-1])
    assert report["queue_type"] == queue_type and report["items"] == 10
    assert report["child_pid"] != report["parent_pid"]


@pytest.mark.spec("JOB8")
@pytest.mark.timeout(180)
def test_scenario2_adaptive() -> None:
    out = _run("scenario2_adaptive.py")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["thread", "->", "thread", "local"]
    assert "rpc" in lines[4].split() and "gpu-node-7" in lines[4]
    assert lines[-1].startswith("round trip through ") and lines[-1].endswith("5 items ok")


@needs_sage
@pytest.mark.spec("JOB1")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("types", [[], ["input=shm", "processing=sage", "output=auto"]])
def test_scenario3_job(types: list[str]) -> None:
    out = _run("scenario3_job.py", *types)
    total = next(line for line in out.splitlines() if line.startswith("total = "))
    got, expected = total.split()[2], total.split("expected ")[1].split(")")[0]
    assert got == expected
    if types:
        assert "queue input      shm" in out


@pytest.mark.timeout(60)
def test_scenario3_rejects_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "scenario3_job.py"), "nope=sage"], capture_output=True, text=True, timeout=50
    )
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.skipif(unavailable_reason("rpc") is not None, reason=f"rpc: {unavailable_reason('rpc')}")
@pytest.mark.timeout(180)
def test_heterogeneous_pipeline_without_ray() -> None:
    # With Ray: tests/ray/test_ray_demo.py (that run starts a Ray instance).
    out = _run("heterogeneous_pipeline.py", "--no-ray")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["queue", "raw", "rpc"] and "another host (edge)" in lines[0]
    same_host = "sage" if unavailable_reason("sage") is None else "shm"
    assert lines[1].split()[:3] == ["queue", "parsed", same_host]
    assert lines[-1].startswith(f"500 items, sum of squares {sum(n * n for n in range(500))};")
