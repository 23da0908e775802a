"""The conformance kit against ray_actor and ray_queue, on this session's Ray instance.

Descriptors carry the session's address, so the kit's subprocess and spawn children connect to
the same cluster (Q41). A Ray connection cannot be used in a forked child (RAY11), and the backends
say so (``survives_fork = False``): the kit runs its deadlock-prone bodies in a thread instead
(64 threads on one handle) and skips the one that needs a forked main thread (close() from a signal
handler), which test_ray_backends.py checks without fork.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import settings
from ray_support import kill_actors

import conformance
from conformance.target import Target
from sage_queue import QueueClosed, QueueDescriptor, registry, resolve_descriptor

STATE_MACHINE_EXAMPLES = 6
"""Each state-machine example makes a queue, which is a new actor (a worker process, ~0.2 s here)."""


class RayFactory:
    """``factory(maxsize)``: a new queue named ``kit_<hex>`` on the session's cluster.

    Like conformance.target's factory for registered types, but its cleanup never re-resolves a
    closed handle (that would create an actor only to destroy it): it kills a leftover actor by name.
    """

    def __init__(self, queue_type: str, address: str) -> None:
        self.queue_type = queue_type
        self.address = address
        self.capabilities = registry.backend_class(queue_type).capabilities
        self.survives_fork = registry.backend_class(queue_type).survives_fork
        self.time_scale = 2.0  # every call is an actor round trip, on 2 shared cores
        self._made: list[Any] = []

    def __call__(self, maxsize: int) -> Any:
        name = f"kit_{uuid.uuid4().hex[:12]}"
        handle = resolve_descriptor(QueueDescriptor.create(self.queue_type, name, maxsize, address=self.address))
        self._made.append(handle)
        return handle

    def cleanup(self) -> None:
        from sage_queue.backends._ray import full_name, namespace_of

        made, self._made = self._made, []
        for handle in made:
            if not handle.closed:
                try:
                    handle.destroy()
                    continue
                except QueueClosed:  # destroyed through another handle
                    continue
            md = dict(handle.descriptor.metadata)
            kill_actors([f"{namespace_of(md)}/{full_name(self.queue_type, md)}"])


class _RayKit(conformance.QueueConformance):
    queue_type = ""

    @pytest.fixture
    def queue_target(self, ray_address: str) -> Target:
        return Target.from_factory(RayFactory(self.queue_type, ray_address), name=f"{self.queue_type} on Ray")

    @conformance.clause("Q3", "Q4", "Q10", "Q14", "Q16")
    def test_state_machine(self) -> None:
        previous = settings.default
        settings.register_profile("_ray_kit", settings(previous, max_examples=STATE_MACHINE_EXAMPLES))
        settings.load_profile("_ray_kit")
        try:
            super().test_state_machine()
        finally:
            settings.register_profile("_ray_kit_restore", previous)
            settings.load_profile("_ray_kit_restore")


class TestRayActorKit(_RayKit):
    queue_type = "ray_actor"


class TestRayQueueKit(_RayKit):
    queue_type = "ray_queue"
