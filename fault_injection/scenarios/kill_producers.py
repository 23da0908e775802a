"""kill-producers: SIGKILL random producers at random moments (inside put, holding a claim or lock)."""

from __future__ import annotations

from stress.runner import FaultContext, Scenario

from . import scenario
from ._kills import kill_randomly


@scenario
class KillProducers(Scenario):
    name = "kill-producers"
    description = "SIGKILL a random producer every 5-40 ms, respawn it; consumers must see no loss or corruption"
    faults = 15

    def inject(self, ctx: FaultContext) -> None:
        kill_randomly(ctx, "producer")
