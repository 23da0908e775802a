"""Descriptor factories for the harnesses: one fresh, uniquely named queue per call."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Optional

from sage_queue import QueueDescriptor
from sage_queue.registry import QUEUE_STUB_MAPPING

__all__ = ["SEGMENT_BACKENDS", "descriptor_factory", "unavailable_reason", "backends_for"]

SEGMENT_BACKENDS = ("shm", "sage")
"""Cross-process backends the harnesses know how to name."""


def descriptor_factory(
    backend: str, *, maxsize: int = 0, capacity_bytes: Optional[int] = None, prefix: str = "harness"
) -> Callable[[], QueueDescriptor]:
    """A zero-argument callable making a new descriptor of ``backend`` each time it is called."""

    def make() -> QueueDescriptor:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        if backend == "shm":
            return QueueDescriptor.create_shm_queue(name, maxsize=maxsize, capacity_bytes=capacity_bytes)
        if backend == "sage":
            return QueueDescriptor.create_sage_queue(maxsize=maxsize, name=name, capacity_bytes=capacity_bytes)
        raise ValueError(f"no harness descriptor factory for backend {backend!r}; known: {SEGMENT_BACKENDS}")

    return make


def unavailable_reason(backend: str) -> Optional[str]:
    """None if ``backend`` can be used here, else why not (missing module, failed import...)."""
    if backend not in SEGMENT_BACKENDS:
        return f"unknown harness backend {backend!r} (known: {', '.join(SEGMENT_BACKENDS)})"
    try:
        QUEUE_STUB_MAPPING[backend]
    except Exception as exc:  # BackendUnavailable, ImportError from a half-written module...
        return f"{type(exc).__name__}: {exc}"
    return None


def backends_for(choice: str) -> list[str]:
    """``all`` -> every known backend, else ``[choice]``."""
    return list(SEGMENT_BACKENDS) if choice == "all" else [choice]
