"""Fault injection, generic over any queue: named scenarios (``sage-queue faults --list``).

:func:`run_scenario` runs one scenario of :mod:`fault_injection.scenarios` (kill-producers,
kill-consumers, kill-any, stop-resume, kill-all-restart, ...) on a target; every run's
history is judged by the one checker (:mod:`stress.checker`) against the backend's promise.
See README.md here for how to add a scenario.
"""

from __future__ import annotations

from stress.runner import RunResult

from .core import run_faults, run_scenario

__all__ = ["RunResult", "run_faults", "run_scenario"]
