"""kill-any: SIGKILL random producers and consumers alike (the original ``sage-queue faults`` run)."""

from __future__ import annotations

from stress.runner import FaultContext, Scenario

from . import scenario
from ._kills import kill_randomly


@scenario
class KillAny(Scenario):
    name = "kill-any"
    description = "SIGKILL a random producer or consumer every 5-40 ms, respawn it"
    faults = 15

    def inject(self, ctx: FaultContext) -> None:
        kill_randomly(ctx, None)
