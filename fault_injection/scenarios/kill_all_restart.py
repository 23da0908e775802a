"""kill-all-restart: SIGKILL every producer and consumer at once; new processes attach and drain."""

from __future__ import annotations

from stress.runner import FaultContext, Scenario

from . import scenario


@scenario
class KillAllRestart(Scenario):
    name = "kill-all-restart"
    description = "SIGKILL every worker at once, start new ones that attach to the same queue; repeat"
    faults = 3
    soak_faults = 300

    def inject(self, ctx: FaultContext) -> None:
        while ctx.faults_done < ctx.faults:
            ctx.wait_ready(ctx.workers())
            ctx.sleep(ctx.rng.uniform(0.05, 0.3))
            everyone = ctx.workers()
            for worker in everyone:
                ctx.kill(worker, respawn=False, count=False)
            ctx.count_fault(f"kill all {len(everyone)}")
            for worker in everyone:
                ctx.respawn(worker)
