"""The kit is itself tested: it must fail every deliberately broken backend, and pass the ground truth.

Each broken backend (tests/kit/broken.py) is run through the CLI in a subprocess
(``python -m conformance tests.kit.broken:make_<name> -k <its clause tests>``); the
exit status must be 1 and the JSON report must show a failure of a test expected to
catch that bug, not some unrelated one. The ground truth, ``queue.Queue``, must pass
the whole kit; the local backend's full run is in tests/test_conformance_builtin.py.
The three ways in (CLI, ``pytest -p conformance``, subclassing) are each exercised.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

import pytest

from .broken import BROKEN, Broken

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed(?:, (\d+) skipped)?$")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def run_cli(
    *args: str, tmp_path: Path, timeout: float = 100, env: Optional[dict[str, str]] = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "conformance", *args, "--report", str(report)],
        cwd=ROOT,
        env=_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    data = json.loads(report.read_text()) if report.exists() else {}
    return done, data


def _summary(stdout: str) -> tuple[int, int, int]:
    last = stdout.strip().splitlines()[-1]
    m = SUMMARY.match(last)
    assert m, f"the last line is not the summary: {last!r}"
    return int(m[1]), int(m[2]), int(m[3] or 0)


def _failed_tests(report: dict[str, Any]) -> set[str]:
    return {r["test"].split("[")[0] for t in report["targets"] for r in t["results"] if r["outcome"] == "fail"}


@pytest.mark.timeout(110)
@pytest.mark.parametrize("broken", BROKEN, ids=[b.name for b in BROKEN])
def test_kit_fails_broken_backend(broken: Broken, tmp_path: Path) -> None:
    done, report = run_cli(f"tests.kit.broken:make_{broken.name}", "-k", broken.select, tmp_path=tmp_path)
    assert done.returncode == 1, (
        f"the kit let {broken.name} ({broken.rule}) through: exit {done.returncode}\n{done.stdout[-3000:]}"
        f"\n{done.stderr[-2000:]}"
    )
    failed = _failed_tests(report)
    assert failed & set(broken.expected), (
        f"{broken.name} ({broken.rule}) failed {sorted(failed)}, none of the tests meant to catch it "
        f"{list(broken.expected)}\n{done.stdout[-3000:]}"
    )
    if broken.exclusive:
        assert failed <= set(broken.expected), (
            f"{broken.name} ({broken.rule}) also failed {sorted(failed - set(broken.expected))}: the bug should be "
            f"caught by {list(broken.expected)} only\n{done.stdout[-3000:]}"
        )
    assert broken.shows in done.stdout, (
        f"{broken.name}: the failure does not explain itself (no {broken.shows!r} in the output)\n{done.stdout[-3000:]}"
    )
    failed_rows = [r for t in report["targets"] for r in t["results"] if r["outcome"] == "fail"]
    _, n_failed, _ = _summary(done.stdout)
    assert n_failed == len(failed_rows) >= 1


def test_at_least_twelve_broken_backends() -> None:
    assert len(BROKEN) >= 12
    assert len({b.name for b in BROKEN}) == len(BROKEN)


@pytest.mark.timeout(110)
def test_kit_passes_stdlib_queue(tmp_path: Path) -> None:
    """Ground truth: queue.Queue passes the whole kit (core contract + task_done)."""
    done, report = run_cli("tests.kit.targets:stdlib_queue", tmp_path=tmp_path)
    assert done.returncode == 0, f"queue.Queue failed the kit:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    passed, failed, skipped = _summary(done.stdout)
    assert failed == 0 and passed >= 25, done.stdout[-2000:]
    rows = report["targets"][0]["results"]
    assert report["exit_status"] == 0 and len(rows) == passed + skipped
    by_test = {r["test"]: r for r in rows}
    assert by_test["test_task_done_and_join"]["outcome"] == "pass"
    assert by_test["test_stats"]["outcome"] == "skip" and "stats" in by_test["test_stats"]["reason"]
    # The table: one row per test, starting with its clause ids.
    assert re.search(r"^Q9,Q12,E3\s+test_negative_timeout\s+pass$", done.stdout, re.M), done.stdout[-3000:]


@pytest.mark.timeout(110)
def test_cli_backend_local_and_all(tmp_path: Path) -> None:
    # As on a machine without Ray (a sitecustomize blocks the import): the Ray types are skipped with
    # the reason, not failed, and every other built-in type runs (rpc with a throw-away server).
    no_ray = tmp_path / "no_ray"
    no_ray.mkdir()
    (no_ray / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(no_ray), env["PYTHONPATH"]])
    done, report = run_cli("--backend", "all", "-k", "Q28 or Q2 or Q8", tmp_path=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    labels = [t["target"] for t in report["targets"]]
    assert {"--backend local", "--backend shm", "--backend rpc"} <= set(labels), labels
    assert any("ray_queue" in note and "unavailable" in note for note in report["notes"]), report["notes"]
    bad, _ = run_cli("--backend", "ray_queue", tmp_path=tmp_path, env=env)
    assert bad.returncode == 2 and "unavailable" in bad.stderr


@pytest.mark.timeout(60)
def test_known_failures_are_strict_xfail(tmp_path: Path) -> None:
    # A declared known failure turns the failure into xfail: exit 0 ...
    done, report = run_cli("tests.kit.targets:bools_known", "-k", "test_item_fidelity", tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    outcomes = {r["test"]: r["outcome"] for r in report["targets"][0]["results"]}
    assert outcomes["test_item_fidelity"] == "xfail"
    # ... and a stale declaration (the test passes) fails the run.
    stale, report = run_cli("tests.kit.targets:stale_known", "-k", "test_item_fidelity", tmp_path=tmp_path)
    assert stale.returncode == 1, stale.stdout[-3000:]
    assert "test_item_fidelity" in _failed_tests(report)


@pytest.mark.timeout(60)
def test_pytest_plugin_way_in(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "pytest", "-p", "conformance", "-q", "-p", "no:cacheprovider", "-k", "fifo"]
    good = subprocess.run(
        [*base, "--queue-factory", "tests.kit.targets:stdlib_queue"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-2000:]
    assert re.search(r"\b2 passed\b", good.stdout), good.stdout[-2000:]  # the two FIFO tests
    bad = subprocess.run(
        [*base, "--queue-factory", "tests.kit.broken:make_reorder_after_7"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert "test_fifo_one_producer FAILED" in bad.stdout or "FAILED" in bad.stdout


@pytest.mark.timeout(60)
def test_subclass_way_in(tmp_path: Path) -> None:
    suite = tmp_path / "test_mine.py"
    suite.write_text(
        textwrap.dedent("""
        import pytest

        import conformance
        from tests.kit.broken import make_bools_become_ints
        from tests.kit.targets import stdlib_queue

        class TestGood(conformance.QueueConformance):
            factory = staticmethod(stdlib_queue)

        class TestBroken(conformance.QueueConformance):
            factory = staticmethod(make_bools_become_ints)

        class TestOverriddenFixture(conformance.QueueConformance):
            factory = staticmethod(stdlib_queue)

            @pytest.fixture
            def make_queue(self):
                return make_bools_become_ints
    """)
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(suite),
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "test_item_fidelity",
            "--rootdir",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    assert "FAILED test_mine.py::TestBroken::test_item_fidelity " in done.stdout, done.stdout[-3000:]
    assert "TestGood::test_item_fidelity " not in done.stdout.split("short test summary")[-1]
    assert "FAILED test_mine.py::TestOverriddenFixture::test_item_fidelity " in done.stdout, done.stdout[-3000:]
    assert re.search(r"\b2 failed, 4 passed\b", done.stdout), done.stdout[-2000:]


def test_list_clauses() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "conformance", "--list-clauses"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert re.match(r"Q9\s+MUST\s+.*test_negative_timeout", rows["Q9"]), rows.get("Q9")
    assert "test_threads_share_one_handle" in rows["Q6"]
    assert all(re.fullmatch(r"[A-Z]+[0-9]+", key) for key in rows), sorted(rows)[:5]
