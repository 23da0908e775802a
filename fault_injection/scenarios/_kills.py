"""What the kill scenarios share: SIGKILL a random working worker of some roles, again and again."""

from __future__ import annotations

from typing import Optional

from stress.runner import FaultContext

KILL_INTERVAL = (0.005, 0.04)
"""Seconds between two kills, drawn uniformly: short, so that kills land inside put/get calls, and
with a small ring (the CLI's default capacity wraps often) inside claims and while locks are held."""


def kill_randomly(ctx: FaultContext, role: Optional[str]) -> None:
    """``ctx.faults`` SIGKILLs, each of a random worker of ``role`` (None: any) that is working."""
    while ctx.faults_done < ctx.faults:
        ctx.sleep(ctx.rng.uniform(*KILL_INTERVAL))
        victim = ctx.rng.choice(ctx.workers(role))
        if not ctx.ready(victim):  # only a worker that has opened the queue: a kill must hit queue work
            ctx.wait_ready([victim])
            continue
        ctx.kill(victim)
