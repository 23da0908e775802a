"""kill-consumers: SIGKILL random consumers at random moments (inside get, holding a claim or lock)."""

from __future__ import annotations

from stress.runner import FaultContext, Scenario

from . import scenario
from ._kills import kill_randomly


@scenario
class KillConsumers(Scenario):
    name = "kill-consumers"
    description = "SIGKILL a random consumer every 5-40 ms, respawn it; loss <= the killed gets' batches"
    faults = 15

    def inject(self, ctx: FaultContext) -> None:
        kill_randomly(ctx, "consumer")
