"""Fault injection: run a named scenario (fault_injection/scenarios/) on any target, judge the history.

The harness is :mod:`stress.runner` (workers, supervision, drain); the verdict is
:func:`stress.checker.check` against the backend's promise (:data:`stress.checker.PROMISES`).
This module only joins a scenario name to a target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from sage_queue import QueueDescriptor
from stress.checker import promise_for
from stress.core import ChildHook
from stress.runner import RunResult, Target, run

from .scenarios import get_scenario

__all__ = ["run_faults", "run_scenario"]


def run_scenario(
    target: Target, scenario: str, *, faults: Optional[int] = None, soak: bool = False, **options: Any
) -> RunResult:
    """Run scenario ``scenario`` (a registered name) on ``target``; ``options`` go to :func:`stress.runner.run`.

    ``faults`` None: the scenario's short default, or its soak default with ``soak``.
    """
    chosen = get_scenario(scenario)
    if faults is None:
        faults = chosen.soak_faults if soak else chosen.faults
    return run(target, scenario=chosen, faults=faults, **options)


def run_faults(
    descriptor_factory: Callable[[], QueueDescriptor],
    *,
    scenario: str = "kill-any",
    producers: int = 2,
    consumers: int = 2,
    kills: int = 50,
    batch: int = 1,
    seed: int = 0,
    drain_timeout: float = 60.0,
    stall_timeout: float = 30.0,
    worker_hook: Optional[ChildHook] = None,
) -> RunResult:
    """``kills`` faults of ``scenario`` on a queue from ``descriptor_factory`` (a registered type)."""
    queue_type = descriptor_factory().queue_type
    target = Target(
        queue_type, "descriptor", promise_for(queue_type), make_descriptor=descriptor_factory, batch=batch > 1
    )
    return run_scenario(
        target,
        scenario,
        faults=kills,
        producers=producers,
        consumers=consumers,
        batch=batch,
        seed=seed,
        drain_timeout=drain_timeout,
        stall_timeout=stall_timeout,
        hook=worker_hook,
    )
