"""From descriptor to live handle: ``resolve_descriptor`` and the seed's helpers (spec R1, R2, R6, R9).

The only place that imports a backend: ``descriptor`` parses with the registry's
schemas alone, and this module asks the registry for the implementation class.
It is therefore the only source of ``BackendUnavailable`` (spec D13, E10).
"""

from __future__ import annotations

from typing import Any

from .descriptor import DescriptorLike, QueueDescriptor
from .errors import BackendUnavailable, InvalidMetadata, UnknownQueueType
from .registry import backend_class, canonical_type

__all__ = ["resolve_descriptor", "create_descriptor_from_existing_queue", "get_local_queue"]


def resolve_descriptor(descriptor: DescriptorLike) -> Any:
    """Turn a descriptor (object, dict or JSON text) into a live handle on its queue.

    Raises a DescriptorError subclass for bad input, QueueNotFound when the queue
    cannot be reached from this process, BackendUnavailable when the backend's
    dependencies are missing or the backend is not shipped.
    """
    try:
        desc = QueueDescriptor.parse(descriptor)
    except UnknownQueueType as exc:
        # A type whose rules live in a class that cannot be imported here cannot be parsed
        # (UnknownQueueType), but for a caller who wants a handle the missing backend is the news.
        if isinstance(exc.__cause__, BackendUnavailable):
            raise exc.__cause__ from None
        raise
    return backend_class(desc.queue_type)(desc)


def create_descriptor_from_existing_queue(queue: Any, queue_type: str, **metadata: Any) -> QueueDescriptor:
    """The descriptor of an existing queue.

    * a handle of this library (anything with a ``descriptor``): its descriptor,
      after checking that ``queue_type`` and any ``metadata`` given agree with it;
    * a plain ``queue.Queue`` with ``queue_type="local"``: the queue is registered
      in this process's local registry under a new queue_id and its descriptor returned.
    """
    queue_type = canonical_type(queue_type)
    existing = getattr(queue, "descriptor", None)
    if isinstance(existing, QueueDescriptor):
        if existing.queue_type != queue_type:
            raise InvalidMetadata(f"queue is a {existing.queue_type} queue, not {queue_type}")
        for key, value in metadata.items():
            if existing.metadata.get(key) != value:
                raise InvalidMetadata(
                    f"metadata[{key!r}]={value!r} disagrees with the queue's {existing.metadata.get(key)!r}"
                )
        return existing
    adopt = getattr(backend_class(queue_type), "adopt", None)
    if adopt is None:
        raise TypeError(f"cannot describe a {type(queue).__name__} as a {queue_type} queue")
    desc: QueueDescriptor = adopt(queue, **metadata)
    return desc


def get_local_queue(maxsize: int = 0) -> Any:
    """A new in-process queue handle (``local`` backend) with its own descriptor."""
    return resolve_descriptor(QueueDescriptor.create_local_queue(maxsize=maxsize))
