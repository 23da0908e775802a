"""The kit judges queues without sage-queue descriptors (issue 13): the anchors, reduced form.

The full run of every anchor is the scorecard (``sage-queue conformance --scorecard``, ``make kit``);
here only what proves the mechanism: the cross-process tests run (not skip) for
``multiprocessing.Queue`` and faster-fifo, whose handles reach children through a
``multiprocessing`` context (``sharing``), and pass; the kit finds a real quirk of an anchor on
its own; a target's sharing declaration is validated.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conformance import Target, TargetError
from conformance.scorecard import clause_cells, clean_reason, render_markdown

ROOT = Path(__file__).resolve().parents[1]
CROSS = "test_cross_process_spawn or test_processes_no_loss or test_cross_process_subprocess"


def _kit(tmp_path: Path, *args: str, timeout: float = 150) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("PYTEST_CURRENT_TEST", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    report = tmp_path / "kit.json"
    done = subprocess.run(
        [sys.executable, "-m", "conformance", *args, "--report", str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert report.exists(), f"no report; exit {done.returncode}: {done.stdout[-2000:]} {done.stderr[-2000:]}"
    data: dict[str, Any] = json.loads(report.read_text())
    return data


def _outcomes(data: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {t["target"]: {r["test"]: r["outcome"] for r in t["results"]} for t in data["targets"]}


@pytest.mark.timeout(170)
def test_cross_process_tests_run_for_mp_queue_and_faster_fifo(tmp_path: Path) -> None:
    targets = ["conformance.anchors:mp_queue"]
    if importlib.util.find_spec("faster_fifo") is not None:
        targets.append("conformance.anchors:faster_fifo")
    outcomes = _outcomes(_kit(tmp_path, *targets, "-k", CROSS))
    for target in targets:
        got = outcomes[target]
        assert got.get("test_cross_process_spawn") == "pass", f"{target}: {got}"
        assert got.get("test_processes_no_loss") == "pass", f"{target}: {got}"
        # A fresh interpreter cannot reach a multiprocessing queue: said, not failed.
        assert got.get("test_cross_process_subprocess") == "skip", f"{target}: {got}"
    if len(targets) == 1:
        pytest.skip("faster_fifo is not installed: only multiprocessing.Queue checked")


@pytest.mark.timeout(120)
def test_kit_finds_simple_queue_quirks(tmp_path: Path) -> None:
    """multiprocessing.SimpleQueue has no timeouts: the cross-process tests fail (not skip) on it."""
    got = _outcomes(_kit(tmp_path, "conformance.anchors:mp_simple_queue", "-k", "test_cross_process_spawn"))
    assert got["conformance.anchors:mp_simple_queue"]["test_cross_process_spawn"] == "fail"


def _factory(**attrs: Any) -> Any:
    def make(maxsize: int) -> Any:
        import queue

        return queue.Queue(maxsize)

    for key, value in attrs.items():
        setattr(make, key, value)
    return make


def _attach(token: Any) -> Any:
    return token


def test_sharing_declarations() -> None:
    assert Target.from_factory(_factory()).sharing == "descriptor"
    assert Target.from_factory(_factory(sharing="spawn")).sharing == "spawn"
    hooked = Target.from_factory(_factory(share=lambda h: h, attach=_attach))
    assert hooked.sharing == "hook" and hooked.attach is _attach
    for bad in (
        {"sharing": "telepathy"},
        {"sharing": "hook"},
        {"share": lambda h: h},
        {"sharing": "fork", "share": lambda h: h, "attach": _attach},
        {"share": 1, "attach": 2},
    ):
        with pytest.raises(TargetError):
            Target.from_factory(_factory(**bad))


def test_scorecard_cells_and_markdown() -> None:
    results = [
        {"test": "a", "clauses": ["Q1", "Q2"], "outcome": "pass", "reason": ""},
        {"test": "b", "clauses": ["Q2"], "outcome": "fail", "reason": "AssertionError: lost | an item"},
        {"test": "c", "clauses": ["Q3"], "outcome": "skip", "reason": "capability batch not declared"},
        {"test": "d", "clauses": ["Q13"], "outcome": "xfail", "reason": "SHOULD"},
    ]
    cells = clause_cells(results)
    assert {cid: c["outcome"] for cid, c in cells.items()} == {"Q1": "pass", "Q2": "fail", "Q3": "skip", "Q13": "xfail"}
    card = {
        "command": "x",
        "generated": "today",
        "python": "3",
        "platform": "p",
        "clause_order": ["Q1", "Q2", "Q3", "Q13"],
        "clause_levels": {"Q1": "MUST"},
        "targets": [
            {
                "target": "t",
                "kind": "anchor",
                "available": True,
                "reason": "",
                "broken_run": False,
                "seconds": 1.0,
                "errors": [],
                "results": results,
                "clauses": cells,
            },
            {"target": "u", "kind": "backend", "available": False, "reason": "not here"},
        ],
    }
    md = render_markdown(card)
    assert "| `t` | anchor | Q2 | 1 | 1 | 1 s |" in md
    assert "| Q2 |  | **FAIL** |" in md
    assert "lost \\| an item" in md and "not run here: not here" in md


def test_scorecard_reasons_do_not_churn() -> None:
    assert clean_reason("\x1b[36mray::put()\x1b[39m <lock at 0x7f51457f2880>") == "ray::put() <lock at 0x...>"


def test_scorecard_refuses_explicit_targets() -> None:
    from conformance.cli import main

    assert main(["--scorecard", "--backend", "local"]) == 2
