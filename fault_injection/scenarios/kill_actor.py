"""kill-actor: ``ray.kill`` the Ray actor that holds the queue, under load (ray_actor, ray_queue).

The descriptors carry the address of the cluster this process is connected to (so workers join
it, RAY1) and, for ``ray_actor``, ``max_restarts=-1`` (Ray restarts it after each kill, RAY10).
Each fault: ``ray.kill(actor, no_restart=False)`` at a random moment of the traffic, then the
scenario's own handle calls ``qsize()`` until it raises ``QueueActorLost``: from then on the old
incarnation is surely dead, which is recorded with :meth:`FaultContext.queue_lost` (the checker
allows the loss of acked items whose put was invoked before that moment, and of nothing put
later); it waits for the new incarnation to answer before the next kill.

``ray_queue`` (and ``ray_actor`` with ``max_restarts`` 0) cannot restart: the first kill ends the
queue for good (RAY9). The scenario then watches the workers fail for a moment (each call must
raise ``QueueActorLost`` at once: a hang or an overrun breaks the promise) and ends the run
without a drain (:meth:`FaultContext.end_without_drain`): one fault, whatever ``--faults`` says.

The promise judged (stress/checker.py: RAY9, RAY10, RAY14): items got ⊆ items put, nothing
twice, per-producer order, no call past its timeout + 2 s (+ slack), and only items in the actor at
a kill lost. Workers log ``QueueActorLost`` as a failed call and go on (the promise's survivable errors).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any, Optional

from stress.runner import FaultContext, Scenario, Service, Target

from . import scenario

UP_SECONDS = (0.3, 1.0)
"""Traffic between two kills."""
GONE_WATCH_SECONDS = 1.0
"""After a kill that ends the queue: how long the workers keep calling (and failing) before the run ends."""
DEATH_SECONDS = 30.0
"""How long a killed actor may take to be reported dead (or restarted) before the run calls it stuck."""


@scenario
class KillActor(Scenario):
    name = "kill-actor"
    description = "ray.kill the queue's Ray actor under load (ray_actor restarts empty; ray_queue ends the run)"
    faults = 3
    soak_faults = 100
    modes = ("descriptor",)
    types = ("ray_actor", "ray_queue")
    restarts = True
    """ray_actor: ``max_restarts=-1`` (False: 0, the queue ends at the first kill as ray_queue's does)."""

    def applies_to(self, target: Target) -> bool:
        return target.mode == "descriptor" and target.name in ("ray_actor", "ray_queue")

    def setup(self, target: Target, stack: ExitStack) -> Optional[Service]:
        # The cluster of this process (the harness's service for Ray's types: its address, so that the
        # workers join it, RAY1), plus the restarts this scenario asks of ray_actor.
        metadata: dict[str, Any] = dict(stack.enter_context(target.service())) if target.service else {}
        if target.name == "ray_actor":
            metadata["max_restarts"] = -1 if self.restarts else 0
        return Service(metadata)

    def inject(self, ctx: FaultContext) -> None:
        import ray

        from sage_queue import resolve_descriptor
        from sage_queue.backends._ray import full_name, namespace_of

        descriptor = ctx.descriptor
        assert descriptor is not None
        metadata = descriptor.metadata
        restarts = descriptor.queue_type == "ray_actor" and metadata.get("max_restarts", 0) != 0
        name, namespace = full_name(descriptor.queue_type, metadata), namespace_of(metadata)
        probe = resolve_descriptor(descriptor)  # the scenario's own handle: it sees each death
        try:
            ctx.wait_ready(ctx.workers())
            while ctx.faults_done < ctx.faults:
                ctx.sleep(ctx.rng.uniform(*UP_SECONDS))
                ray.kill(ray.get_actor(name, namespace=namespace), no_restart=not restarts)
                dead_by = self._wait(ctx, probe, dead=True)
                ctx.queue_lost(dead_by, f"ray.kill {name}")
                if not restarts:
                    ctx.sleep(GONE_WATCH_SECONDS)  # every worker call now fails at once (RAY9)
                    ctx.end_without_drain(f"{descriptor.queue_type}'s actor was killed and does not restart (RAY9)")
                    return
                self._wait(ctx, probe, dead=False)  # the new, empty incarnation answers (RAY10)
        finally:
            probe.close()

    @staticmethod
    def _wait(ctx: FaultContext, probe: Any, dead: bool) -> float:
        """Poll ``probe.qsize()`` until it raises QueueActorLost (``dead``) or answers; returns when."""
        from sage_queue import QueueActorLost, QueueConnectionError

        end = time.monotonic() + DEATH_SECONDS
        while True:
            try:
                probe.qsize()
                if not dead:
                    return time.monotonic()
            except QueueActorLost:
                if dead:
                    return time.monotonic()  # taken after the raise: the old incarnation is gone by now
            except QueueConnectionError:  # alive but not answering yet (E16): keep asking
                pass
            if time.monotonic() > end:
                state = "seen dead" if dead else "back after its restart"
                raise RuntimeError(f"the queue's actor was not {state} within {DEATH_SECONDS} s")
            ctx.sleep(0.01)
