"""``sage-queue demo`` (``make demo``): the seed's scenarios with real processes, as a table.

The demo is run the way a user runs it, in its own process; the failure path is checked
in-process with a deliberately broken backend registered for the occasion.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from _helpers import registered_queue_type

from sage_queue import QUEUE_STUB_MAPPING
from sage_queue.backends.local import LocalQueueStub, live_queue_ids
from sage_queue.demo import all_types, choose_descriptor
from sage_queue.demo import main as demo_main

SCENARIOS = ("1 cross-process", "2 adaptive", "3 job pipeline")
SHM_DIR = Path("/dev/shm")


def _demo_segments() -> set[str]:
    return {p.name for p in SHM_DIR.glob("sageq-*-demo-*")} if SHM_DIR.is_dir() else set()


def _rows(table: str) -> dict[tuple[str, str], list[str]]:
    """``(backend, scenario) -> cells`` from the printed table (columns split on 2+ spaces)."""
    rows: dict[tuple[str, str], list[str]] = {}
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("backend")) + 2
    for line in lines[start:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[(cells[0], cells[1])] = cells[2:]
    return rows


@pytest.mark.timeout(120)
def test_demo_runs_every_available_backend_with_real_processes() -> None:
    before = _demo_segments()
    out = subprocess.run([sys.executable, "-m", "sage_queue.cli", "demo"], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = _rows(out.stdout)
    available = [t for t in all_types() if QUEUE_STUB_MAPPING.available(t)]
    assert "local" in available
    for queue_type in all_types():
        if queue_type in available:
            for scenario in SCENARIOS:
                result, items, seconds, *_detail = rows[(queue_type, scenario)]
                assert result == "ok", (queue_type, scenario, result)
                assert int(items) > 0 and seconds.endswith("s")
        else:
            assert rows[(queue_type, "all")][0].startswith("skipped: "), rows[(queue_type, "all")]
    # local: the child holding the JSON must get QueueNotFound, and threads share the queue.
    assert "QueueNotFound" in " ".join(rows[("local", "1 cross-process")])
    for queue_type in available:
        if queue_type != "local":  # every other built-in type crosses processes: real children did the work
            assert "child pid" in " ".join(rows[(queue_type, "1 cross-process")])
            assert "worker processes" in " ".join(rows[(queue_type, "3 job pipeline")])
    cross = [t for t in available if t != "local"]
    if len(cross) >= 2:
        assert any(b.startswith("mixed(") and r[0] == "ok" for (b, _), r in rows.items())
    assert "without failure" in out.stdout and "FAILED" not in out.stdout
    assert _demo_segments() == before, "the demo left shared-memory segments behind"


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
    status = demo_main(["--backends", f"local,{broken_type}", "--wait", "0.5"])
    table = capsys.readouterr().out
    assert status == 1
    rows = _rows(table)
    assert [rows[("local", s)][0] for s in SCENARIOS] == ["ok"] * 3
    for scenario in SCENARIOS:
        assert rows[(broken_type, scenario)][0].startswith("FAILED: "), rows[(broken_type, scenario)]
    assert "FAILED" in table.splitlines()[-1]
    assert live_queue_ids() == before, "queues of the failed scenarios were not destroyed"


@pytest.mark.timeout(60)
def test_demo_skips_what_is_not_registered(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_main(["--backends", "no_such_type"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows[("no_such_type", "all")][0] == "skipped: not registered"


def test_adaptive_choice_follows_the_environment() -> None:
    # With Ray running in this process (this worker may host the session's Ray tests) the choice is
    # ray_queue; otherwise the best shared-memory type, else local.
    ray_running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    order = ("ray_queue",) if ray_running else ("sage", "shm", "local")
    expected = next(t for t in order if QUEUE_STUB_MAPPING.available(t))
    assert choose_descriptor(maxsize=5).queue_type == expected
    assert choose_descriptor(maxsize=5, allowed=frozenset({"local"})).queue_type == "local"
    assert choose_descriptor(maxsize=5, allowed=frozenset({"local"})).metadata["owner_pid"] == os.getpid()
