"""Which class implements which ``queue_type``, and ``resolve_descriptor`` (spec R1-R6).

``QUEUE_STUB_MAPPING`` maps a queue type to its implementation class. Built-in
backends are registered by dotted path and imported on first use, so that
``import sage_queue`` never imports Ray, pyzmq or the C core. Third-party
backends register by :func:`register_queue_implementation` or through the
``sage_queue.backends`` entry-point group (``name = "pkg.module:Class"``), which
is read once, the first time a type is not found among the registered ones.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator, MutableMapping
from typing import Any, Optional, Union

from .errors import BackendUnavailable, UnknownQueueType

__all__ = [
    "QUEUE_STUB_MAPPING",
    "ENTRY_POINT_GROUP",
    "register_queue_implementation",
    "unregister_queue_implementation",
    "backend_class",
    "canonical_type",
    "resolve_descriptor",
    "create_descriptor_from_existing_queue",
    "get_local_queue",
]

ENTRY_POINT_GROUP = "sage_queue.backends"

# Built-in backends: queue_type -> "module:Class", or None while the backend is
# planned but not yet shipped (its factory then raises BackendUnavailable).
_BUILTIN_TARGETS: dict[str, Optional[str]] = {
    "local": "sage_queue.backends.local:LocalQueueStub",
    "shm": "sage_queue.backends.shm:SharedMemoryQueueStub",
    "sage": "sage_queue.backends.sage:SAGEQueueStub",
    "ray_actor": None,
    "ray_queue": None,
    "rpc": None,
}
_ALIASES = {"sage_queue": "sage"}
_PLANNED_HINT = "not shipped in this release of sage-queue; use local, shm or sage"

_Target = Union[str, type, None]


class _BackendRegistry(MutableMapping[str, type]):
    """``queue_type -> class``, importing dotted-path targets lazily and thread-safely."""

    def __init__(self) -> None:
        self._targets: dict[str, _Target] = dict(_BUILTIN_TARGETS)
        self._lock = threading.RLock()
        self._entry_points_loaded = False

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self._targets.setdefault(ep.name, ep.value)

    def __getitem__(self, queue_type: str) -> type:
        with self._lock:
            if queue_type not in self._targets:
                self._load_entry_points()
            target = self._targets[queue_type]  # KeyError for unknown types, as a Mapping should
            if target is None:
                raise BackendUnavailable(queue_type, f"the {queue_type} backend", _PLANNED_HINT)
            if isinstance(target, str):
                target = _import_target(queue_type, target)
                self._targets[queue_type] = target
            return target

    def __setitem__(self, queue_type: str, cls: type) -> None:
        with self._lock:
            self._targets[queue_type] = cls

    def __delitem__(self, queue_type: str) -> None:
        with self._lock:
            del self._targets[queue_type]

    def __contains__(self, queue_type: object) -> bool:
        with self._lock:
            if queue_type not in self._targets:
                self._load_entry_points()
            return queue_type in self._targets

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            self._load_entry_points()
            return iter(list(self._targets))

    def __len__(self) -> int:
        with self._lock:
            self._load_entry_points()
            return len(self._targets)

    def available(self, queue_type: str) -> bool:
        """True if the type is registered and its class imports."""
        try:
            self[queue_type]
        except (KeyError, BackendUnavailable):
            return False
        return True


def _import_target(queue_type: str, target: str) -> type:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(queue_type, f"module {module_name} ({exc})", "pip install sage-queue[all]") from exc
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise BackendUnavailable(queue_type, f"{target} is not a class", "fix the entry point")
    return cls


QUEUE_STUB_MAPPING = _BackendRegistry()
"""``queue_type -> implementation class``; see the module docstring."""


def canonical_type(queue_type: str) -> str:
    """The registered name for ``queue_type`` (``sage_queue`` -> ``sage``); UnknownQueueType if none."""
    name = _ALIASES.get(queue_type, queue_type)
    if name not in QUEUE_STUB_MAPPING:
        known = ", ".join(sorted(QUEUE_STUB_MAPPING))
        raise UnknownQueueType(f"unknown queue_type {queue_type!r}; registered types: {known}")
    return name


def backend_class(queue_type: str) -> type:
    """The class for a (canonical) queue type; BackendUnavailable if it cannot be imported."""
    try:
        return QUEUE_STUB_MAPPING[canonical_type(queue_type)]
    except KeyError:  # unregistered between the two look-ups
        raise UnknownQueueType(f"unknown queue_type {queue_type!r}") from None


def register_queue_implementation(queue_type: str, cls: Union[type, str], *, replace: bool = False) -> None:
    """Register ``cls`` (or a ``"module:Class"`` path) for ``queue_type``.

    ``cls(descriptor)`` must return a QueueLike handle; if the class has a
    ``validate_metadata(dict) -> dict`` classmethod, descriptors of this type are
    checked with it. Re-registering an existing type needs ``replace=True``.
    """
    if not isinstance(queue_type, str) or not queue_type:
        raise ValueError("queue_type must be a non-empty string")
    if queue_type in _ALIASES:
        raise ValueError(f"{queue_type!r} is an alias of {_ALIASES[queue_type]!r}")
    if not isinstance(cls, (type, str)):
        raise TypeError(f"cls must be a class or a 'module:Class' string, not {type(cls).__name__}")
    with QUEUE_STUB_MAPPING._lock:
        if queue_type in QUEUE_STUB_MAPPING and not replace:
            raise ValueError(f"queue_type {queue_type!r} is already registered (pass replace=True)")
        QUEUE_STUB_MAPPING._targets[queue_type] = cls


def unregister_queue_implementation(queue_type: str) -> None:
    """Remove a registration (built-ins included); KeyError if absent."""
    del QUEUE_STUB_MAPPING[queue_type]


def resolve_descriptor(descriptor: Any) -> Any:
    """Turn a descriptor (object, dict or JSON text) into a live handle on its queue.

    Raises a DescriptorError subclass for bad input, QueueNotFound when the queue
    cannot be reached from this process, BackendUnavailable when the backend's
    dependencies are missing.
    """
    from .descriptor import QueueDescriptor

    desc = QueueDescriptor.parse(descriptor)
    return backend_class(desc.queue_type)(desc)


def create_descriptor_from_existing_queue(queue: Any, queue_type: str, **metadata: Any) -> Any:
    """The descriptor of an existing queue.

    * a handle of this library (anything with a ``descriptor``): its descriptor,
      after checking that ``queue_type`` and any ``metadata`` given agree with it;
    * a plain ``queue.Queue`` with ``queue_type="local"``: the queue is registered
      in this process's local registry under a new queue_id and its descriptor returned.
    """
    from .descriptor import QueueDescriptor
    from .errors import InvalidMetadata

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
    return adopt(queue, **metadata)


def get_local_queue(maxsize: int = 0) -> Any:
    """A new in-process queue handle (``local`` backend) with its own descriptor."""
    from .descriptor import QueueDescriptor

    return resolve_descriptor(QueueDescriptor.create_local_queue(maxsize=maxsize))
