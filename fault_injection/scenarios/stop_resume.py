"""stop-resume: SIGSTOP a random worker for a while, then SIGCONT it; nobody is killed, so nothing may be lost.

The others keep calling with their timeouts meanwhile: a call that returns later than its
timeout (+ slack) is an overrun, which breaks the promise of a backend whose waits are
bounded (sage: lock-free, SAGE9) and is only noted for one whose lock waits are not (shm,
SHM11: "a holder stopped by SIGSTOP ... stalls its side until it resumes").
"""

from __future__ import annotations

from stress.runner import FaultContext, Scenario

from . import scenario

STOP_SECONDS = (0.3, 1.2)
"""How long one stop lasts, drawn uniformly (a soak run does many more of them)."""


@scenario
class StopResume(Scenario):
    name = "stop-resume"
    description = "SIGSTOP a random worker for 0.3-1.2 s, then SIGCONT; no loss, calls keep their timeouts"
    faults = 3
    soak_faults = 200

    def inject(self, ctx: FaultContext) -> None:
        while ctx.faults_done < ctx.faults:
            ctx.sleep(ctx.rng.uniform(0.05, 0.2))
            victim = ctx.rng.choice(ctx.workers())
            ctx.wait_ready([victim])
            ctx.stop(victim)
            ctx.sleep(ctx.rng.uniform(*STOP_SECONDS))
            ctx.resume(victim)
