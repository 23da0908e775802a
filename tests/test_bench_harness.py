"""``sage-queue bench`` runs every scenario end to end, and its floor verdicts follow the numbers.

Not timed: message counts are tiny and no assertion is about speed (speed is shown by
the benchmark's own output, BENCHMARKS.md). What is checked is that each code path runs
in real spawned processes, that the results carry every number a floor needs, and that
a floor's met / NOT met is computed from its number, on both sides of its limit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stress.backends import unavailable_reason
from stress.bench import floors_for, main

TINY = [
    "-n",
    "300",
    "--batch-messages",
    "300",
    "--repeat",
    "1",
    "--rounds",
    "20",
    "--large",
    "4",
    "--idle",
    "0.1",
    "--wakes",
    "3",
    "--rss",
    "--rss-messages",
    "2000",
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["shm", "sage"])
def test_every_scenario_runs_and_each_floor_is_judged(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if unavailable_reason(backend):
        pytest.skip(f"{backend}: {unavailable_reason(backend)}")
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["--backend", backend, *TINY, "--json", str(report), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    out = json.loads(report.read_text())["backends"][backend]

    assert set(out["single"]["msgs_per_s"]) >= {backend, "mp.Queue", "faster-fifo"}
    assert set(out["batch"]["msgs_per_s"]) == {backend, "faster-fifo"}
    assert {"p50_us", "p99_us"} <= set(out["pingpong"]["faster-fifo"])
    assert out["large"]["memcpy_cache_hot_mb_per_s"] > 0 and out["large"]["memcpy_streaming_mb_per_s"] > 0
    assert out["idle"][backend]["cpu_percent"] >= 0
    assert out["rss"]["messages"] == 2000 and out["rss"]["batch"] == 100
    assert len(out["rss"]["vm_rss_bytes"]) == 10 and len(out["rss"]["rss_anon_bytes"]) == 10

    floors = floors_for(backend)
    assert len(out["floors"]) == len(floors) > 0
    for floor, verdict in zip(floors, out["floors"], strict=True):
        assert verdict["value"] is not None, verdict  # every scenario ran, so every floor has its number
        expected = verdict["value"] >= floor.limit if floor.higher_is_better else verdict["value"] <= floor.limit
        assert verdict["met"] is expected
        assert floor.line(verdict) in printed


def _results(single: float, cpu: float) -> dict[str, Any]:
    return {
        "single": {"msgs_per_s": {"shm": single, "mp.Queue": 100.0, "faster-fifo": 100.0}},
        "idle": {"shm": {"cpu_percent": cpu}},
    }


def test_a_floor_is_met_at_its_limit_and_not_below() -> None:
    ratio, cpu = floors_for("shm")
    assert ratio.judge(_results(100.0, 1.0))["met"] is True
    missed = ratio.judge(_results(80.0, 1.0))
    assert missed["met"] is False
    assert ratio.line(missed).endswith("0.80x -> NOT met (short by 0.20x, 20% below the floor)")
    assert cpu.judge(_results(100.0, 4.9))["met"] is True
    assert cpu.line(cpu.judge(_results(100.0, 7.0))).endswith("7.00% -> NOT met (over by 2.00 percentage points)")


def test_a_floor_whose_scenario_did_not_run_says_so() -> None:
    for floor in floors_for("sage"):
        verdict = floor.judge({})
        assert verdict["met"] is None
        assert floor.line(verdict).endswith("not measured in this run (scenario skipped)")


def test_the_plot_has_one_panel_per_measured_scenario(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from stress.plot import _series, plot_results

    results = {
        "backends": {
            "shm": {
                "single": {"msgs_per_s": {"shm": 5.0, "mp.Queue": 1.0}, "runs": {}},
                "pingpong": {"shm": {"p50_us": 9.0}, "faster-fifo": {"p50_us": 20.0}, "runs": {}},
            },
            "sage": {"single": {"msgs_per_s": {"sage": 7.0, "mp.Queue": 2.0}}},
            "rpc": {"skipped": "no server"},
        }
    }
    assert _series(results, "single", "msgs_per_s") == {"shm": 5.0, "mp.Queue": 1.0, "sage": 7.0}
    assert _series(results, "pingpong", "p50_us") == {"shm": 9.0, "faster-fifo": 20.0}
    out = tmp_path / "p.png"
    assert plot_results(results, str(out)) == 2
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot_results({"backends": {}}, str(tmp_path / "none.png")) == 0
