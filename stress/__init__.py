"""Stress and benchmark harnesses, generic over any queue (a registered type or a ``MODULE:ATTR`` factory).

* :func:`stress.runner.run` — the one harness: P producers x C consumers, an optional fault
  scenario, an operation history judged by :func:`stress.checker.check` (``sage-queue stress``,
  ``sage-queue faults``);
* :mod:`stress.bench` — throughput/latency against anchors measured in the same run
  (``sage-queue bench``).
"""

from __future__ import annotations

from .runner import RunResult, run, run_stress

__all__ = ["RunResult", "run", "run_stress"]
