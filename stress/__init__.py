"""Stress and benchmark harnesses, generic over any cross-process queue descriptor.

* :func:`run_stress` — P producer processes x C consumer processes; checks that nothing
  is lost, duplicated, invented or corrupted, and per-producer order (``sage-queue stress``).
* :mod:`stress.bench` — throughput/latency against anchors measured in the same run
  (``sage-queue bench``).
"""

from __future__ import annotations

from .core import StressResult, run_stress

__all__ = ["StressResult", "run_stress"]
