"""Descriptor factories for the harnesses: one fresh, uniquely named queue per call.

Every list of backends here comes from the registry (issue 8 §2): a harness drives producer
and consumer *processes*, so it takes every registered type except those whose class is
importable here and does not declare ``cross_process`` (``local``). Types that cannot be
used here stay in the list and are reported as skipped with the reason. Descriptors come
from the generic ``QueueDescriptor.create``, so a third-party type needs no code here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Optional

from sage_queue import QueueDescriptor
from sage_queue.protocol import CROSS_PROCESS
from sage_queue.registry import QUEUE_STUB_MAPPING, backend_class
from sage_queue.registry import unavailable_reason as _registry_unavailable_reason

__all__ = [
    "HARNESS_BACKENDS",
    "SEGMENT_BACKENDS",
    "harness_backends",
    "descriptor_factory",
    "unavailable_reason",
    "backends_for",
    "harness_service",
]

RAY_TYPES = ("ray_actor", "ray_queue")
"""Types whose queues live on a Ray cluster that the harness's workers must join (see :func:`harness_service`)."""


def _in_process_only(queue_type: str) -> bool:
    if _registry_unavailable_reason(queue_type) is not None:
        return False  # cannot tell without its class: listed, then skipped with the reason
    return CROSS_PROCESS not in getattr(backend_class(queue_type), "capabilities", ())


def harness_backends() -> tuple[str, ...]:
    """The registered types a cross-process harness can name, in the registry's order."""
    return tuple(t for t in QUEUE_STUB_MAPPING if not _in_process_only(t))


HARNESS_BACKENDS = harness_backends()
"""The ``--backend`` choices of the harnesses, read from the registry when this module is imported."""
SEGMENT_BACKENDS = HARNESS_BACKENDS
"""The former name (stress/_common.py and stress/bench.py use it for their ``--backend`` choices)."""


def descriptor_factory(
    backend: str,
    *,
    maxsize: int = 0,
    capacity_bytes: Optional[int] = None,
    prefix: str = "harness",
    check: bool = True,
) -> Callable[..., QueueDescriptor]:
    """A callable making a new descriptor of ``backend`` each time it is called.

    ``capacity_bytes`` None leaves the type's default (and adds no key to types without one).
    ``make(**metadata)`` adds the keys of the service the run started (rpc: ``host``, ``port``,
    ``key_file``). ``check``: describe one queue now, so bad arguments fail here rather than in a
    child; False for a type whose required keys only its service gives (rpc).
    """
    metadata: dict[str, Any] = {} if capacity_bytes is None else {"capacity_bytes": capacity_bytes}
    if check:
        QueueDescriptor.create(backend, maxsize=maxsize, **metadata)  # bad arguments fail here, not in a child

    def make(**service: Any) -> QueueDescriptor:
        return QueueDescriptor.create(backend, f"{prefix}-{uuid.uuid4().hex[:12]}", maxsize, **metadata, **service)

    return make


def unavailable_reason(backend: str) -> Optional[str]:
    """None if a harness can drive ``backend`` here, else why not (missing module, failed import...)."""
    if backend not in QUEUE_STUB_MAPPING:
        return f"unknown harness backend {backend!r} (known: {', '.join(harness_backends())})"
    reason = _registry_unavailable_reason(backend)
    if reason is None and _in_process_only(backend):
        return f"{backend} queues live in one process (no {CROSS_PROCESS} capability)"
    return reason


def backends_for(choice: str) -> list[str]:
    """``all`` -> every harness backend, else ``[choice]``."""
    return list(harness_backends()) if choice == "all" else [choice]


@contextmanager
def _ray_cluster(queue_type: str) -> Iterator[dict[str, Any]]:
    """The Ray cluster this process is connected to (connecting as RAY1 says when it is not yet): its address
    goes into every descriptor of the run, so the harness's workers join it. Without it a worker resolves
    through ``RAY_ADDRESS`` as its fork server saw it, which a fork server started before Ray (or a Ray
    started by ``ray.init()`` without setting ``RAY_ADDRESS``) does not have: each worker would then start
    a Ray of its own and reach a queue of its own. Nothing to stop: the cluster outlives the run."""
    import ray

    from sage_queue.backends import _ray

    _ray.connect(queue_type, {"actor_name": "harness"})
    yield {"address": str(ray.get_runtime_context().gcs_address)}


def harness_service(backend: str) -> Optional[Callable[[], AbstractContextManager[Mapping[str, Any]]]]:
    """What a run of ``backend`` must start (its class's ``local_service``: rpc's throw-away server) or join
    (Ray's types: the cluster of this process), as a context manager yielding descriptor metadata; None for
    a type that needs nothing (shm, sage)."""
    service = getattr(backend_class(backend), "local_service", None)
    if service is not None:
        return service  # type: ignore[no-any-return]
    if backend in RAY_TYPES:
        return lambda: _ray_cluster(backend)
    return None
