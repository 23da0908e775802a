"""Which queue types exist, their metadata schema, and which class implements each (spec R3-R5).

A queue type is registered with two things: its metadata schema (a
:class:`~sage_queue.metadata.QueueTypeSchema`, enough to parse and validate its
descriptors) and its implementation target (a class, a ``"module:Class"`` path
imported on first use, or nothing yet). Parsing needs only the schema, so a
descriptor of any registered type parses with none of the transports installed
(D13); only resolving imports the backend.

This module imports ``errors`` and ``metadata`` and nothing else of the package:
``descriptor`` imports it, never the other way round; ``resolve`` imports both.

Third-party types register with :func:`register_queue_implementation` or through the
``sage_queue.backends`` entry-point group, read once, the first time a type is not
found among the registered ones. An entry point names either a
:class:`~sage_queue.metadata.QueueTypeSchema` whose ``target`` is the implementation
(parsing then never imports the backend), or, as before, the class itself (which
then validates its own metadata with ``validate_metadata``).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from .errors import BackendUnavailable, UnknownQueueType
from .metadata import BUILTIN_SCHEMAS, MetadataField, QueueTypeSchema

__all__ = [
    "QUEUE_STUB_MAPPING",
    "ENTRY_POINT_GROUP",
    "register_queue_implementation",
    "unregister_queue_implementation",
    "backend_class",
    "canonical_type",
    "type_schema",
    "validate_metadata",
    "new_metadata",
    "unavailable_reason",
]

ENTRY_POINT_GROUP = "sage_queue.backends"

# Built-in backends: queue_type -> "module:Class", or None while the backend is
# planned but not yet shipped (resolving then raises BackendUnavailable; parsing works).
_BUILTIN_TARGETS: dict[str, Optional[str]] = {
    "local": "sage_queue.backends.local:LocalQueueStub",
    "shm": "sage_queue.backends.shm:SharedMemoryQueueStub",
    "sage": "sage_queue.backends.sage:SAGEQueueStub",
    "ray_queue": "sage_queue.backends.ray_queue:RayQueueStub",
    "ray_actor": "sage_queue.backends.ray_actor:RayActorQueueStub",
    "rpc": "sage_queue.backends.rpc.client:RPCQueueStub",
}
_ALIASES = {"sage_queue": "sage"}
_PLANNED_HINT = "not shipped in this release of sage-queue; use local, shm or sage"

_Target = Union[str, type, None]
SchemaLike = Union[QueueTypeSchema, Sequence[MetadataField]]


@dataclass
class _Entry:
    """One registered type. ``schema`` None: the implementation class validates (legacy, R4).

    ``from_entry_point``: ``target`` is an entry point's value not yet loaded, which may name a
    schema or a class; it is loaded on the first parse or resolve of the type.
    """

    target: _Target
    schema: Optional[QueueTypeSchema]
    from_entry_point: bool = False


class _BackendRegistry(MutableMapping[str, type]):
    """``queue_type -> class``, importing dotted-path targets lazily and thread-safely.

    Invariant: ``_entries`` is read and written only under ``_lock`` (an RLock: loading an
    entry point may import a module that registers another type).
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {
            name: _Entry(target, BUILTIN_SCHEMAS[name]) for name, target in _BUILTIN_TARGETS.items()
        }
        self._lock = threading.RLock()
        self._entry_points_loaded = False

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib.metadata import entry_points  # lazy: ~10 ms, and only needed for an unknown type

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name not in self._entries:  # a built-in type is never taken over by an entry point
                self._entries[ep.name] = _Entry(ep.value, None, from_entry_point=True)

    def _entry(self, queue_type: str) -> _Entry:
        """The entry of ``queue_type`` with any entry point loaded; KeyError if unregistered."""
        with self._lock:
            if queue_type not in self._entries:
                self._load_entry_points()
            entry = self._entries[queue_type]
            if entry.from_entry_point:
                assert isinstance(entry.target, str)
                obj = _import_target(queue_type, entry.target)  # BackendUnavailable
                if isinstance(obj, QueueTypeSchema):
                    entry = _Entry(obj.target, obj)
                elif isinstance(obj, type):
                    entry = _Entry(obj, None)
                else:
                    raise BackendUnavailable(
                        queue_type, f"{entry.target} is neither a class nor a QueueTypeSchema", "fix the entry point"
                    )
                self._entries[queue_type] = entry
            return entry

    def __getitem__(self, queue_type: str) -> type:
        with self._lock:
            entry = self._entry(queue_type)  # KeyError for unknown types, as a Mapping should
            target = entry.target
            if target is None:
                if queue_type in _BUILTIN_TARGETS:
                    raise BackendUnavailable(queue_type, f"the {queue_type} backend", _PLANNED_HINT)
                raise BackendUnavailable(
                    queue_type,
                    "an implementation (the type is registered by name and schema only)",
                    "install the package that implements it",
                )
            if isinstance(target, str):
                obj = _import_target(queue_type, target)
                if not isinstance(obj, type):
                    raise BackendUnavailable(queue_type, f"{target} is not a class", "fix the registration")
                entry.target = target = obj
            return target

    def __setitem__(self, queue_type: str, cls: type) -> None:
        # A class set directly carries its own rules (validate_metadata), as R4 has always said.
        with self._lock:
            self._entries[queue_type] = _Entry(cls, None)

    def __delitem__(self, queue_type: str) -> None:
        with self._lock:
            del self._entries[queue_type]

    def __contains__(self, queue_type: object) -> bool:
        with self._lock:
            if queue_type not in self._entries:
                self._load_entry_points()
            return queue_type in self._entries

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            self._load_entry_points()
            return iter(list(self._entries))

    def __len__(self) -> int:
        with self._lock:
            self._load_entry_points()
            return len(self._entries)

    def available(self, queue_type: str) -> bool:
        """True if the type is registered and its class imports."""
        return unavailable_reason(queue_type) is None


def _import_target(queue_type: str, target: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except BackendUnavailable:
        raise  # the backend said itself what is missing and how to install it
    except ImportError as exc:
        raise BackendUnavailable(queue_type, f"module {module_name} ({exc})", "pip install sage-queue[all]") from exc
    obj = getattr(module, attr, None) if attr else None
    if obj is None:
        raise BackendUnavailable(queue_type, f"{target} names nothing", "fix the registration")
    return obj


QUEUE_STUB_MAPPING = _BackendRegistry()
"""``queue_type -> implementation class``; see the module docstring."""


def canonical_type(queue_type: str) -> str:
    """The registered name for ``queue_type`` (``sage_queue`` -> ``sage``); UnknownQueueType if none."""
    name = _ALIASES.get(queue_type, queue_type)
    if name not in QUEUE_STUB_MAPPING:
        known = ", ".join(sorted(QUEUE_STUB_MAPPING))
        raise UnknownQueueType(f"unknown queue_type {queue_type!r}; registered types: {known}")
    return name


def _entry_for_parsing(queue_type: str) -> _Entry:
    try:
        return QUEUE_STUB_MAPPING._entry(canonical_type(queue_type))
    except KeyError:  # unregistered between the two look-ups
        raise UnknownQueueType(f"unknown queue_type {queue_type!r}") from None
    except BackendUnavailable as exc:  # an entry point that does not load: no schema to check with
        raise UnknownQueueType(
            f"queue_type {queue_type!r} comes from an entry point that cannot be loaded here, so its "
            f"metadata cannot be validated: {exc}"
        ) from exc


def type_schema(queue_type: str) -> Optional[QueueTypeSchema]:
    """The schema of a registered type; None if its class validates its own metadata (R4).

    Never imports a backend's transport; UnknownQueueType for an unregistered type.
    """
    return _entry_for_parsing(queue_type).schema


def validate_metadata(queue_type: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` of a (canonical) type checked and completed (D10); raises DescriptorError only.

    A type registered with a schema is checked against it without importing its backend. A
    type registered with a class alone is checked by the class's ``validate_metadata`` (if
    any); that class must then be imported, and if it cannot be, the type cannot be parsed
    here: UnknownQueueType, chained to the BackendUnavailable (D13).
    """
    entry = _entry_for_parsing(queue_type)
    if entry.schema is not None:
        return entry.schema.validate(queue_type, metadata)
    validate = getattr(_legacy_class(queue_type), "validate_metadata", None)
    if validate is None:
        return metadata
    result: dict[str, Any] = validate(metadata)
    return result


def new_metadata(queue_type: str, queue_id: str, maxsize: int, metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata the generic factory gives a new descriptor of ``queue_type`` (D22), unvalidated.

    From the type's schema; for a type registered with a class alone, from the class's
    ``new_metadata(queue_id, maxsize, metadata)`` classmethod if it has one.
    """
    schema = type_schema(queue_type)
    if schema is not None:
        return schema.new_metadata(queue_id, maxsize, metadata)
    hook = getattr(_legacy_class(queue_type), "new_metadata", None)
    if hook is not None:
        result: dict[str, Any] = hook(queue_id, maxsize, metadata)
        return result
    return {"maxsize": maxsize, **metadata}


def _legacy_class(queue_type: str) -> type:
    """The class of a type registered without a schema, which holds its metadata rules (R4)."""
    try:
        return QUEUE_STUB_MAPPING[queue_type]
    except KeyError:
        raise UnknownQueueType(f"unknown queue_type {queue_type!r}") from None
    except BackendUnavailable as exc:
        raise UnknownQueueType(
            f"queue_type {queue_type!r} is registered without a metadata schema and its class cannot be "
            f"imported here, so its metadata cannot be validated ({exc}); register it with metadata=..."
        ) from exc


def backend_class(queue_type: str) -> type:
    """The class for a queue type; BackendUnavailable if it cannot be imported (resolve only)."""
    try:
        return QUEUE_STUB_MAPPING[canonical_type(queue_type)]
    except KeyError:  # unregistered between the two look-ups
        raise UnknownQueueType(f"unknown queue_type {queue_type!r}") from None


def unavailable_reason(queue_type: str) -> Optional[str]:
    """None if queues of ``queue_type`` can be resolved here, else why not (one line)."""
    try:
        backend_class(queue_type)
    except UnknownQueueType:
        return "not registered"
    except BackendUnavailable as exc:
        if exc.missing == f"the {queue_type} backend":  # planned, not shipped yet
            return f"{queue_type} is {exc.hint.split(';')[0]}"
        return f"{exc.missing} ({exc.hint})"
    return None


def register_queue_implementation(
    queue_type: str, cls: Union[type, str, None], *, metadata: Optional[SchemaLike] = None, replace: bool = False
) -> None:
    """Register a queue type: its implementation ``cls`` and its metadata schema.

    ``cls`` is a class, a ``"module:Class"`` path (imported at the first resolve), or None
    for a type known by name only (its descriptors parse; resolving them raises
    BackendUnavailable). ``metadata`` is a :class:`QueueTypeSchema` or a sequence of
    :class:`MetadataField`; without it, the class's ``validate_metadata(dict) -> dict``
    classmethod (if any) checks descriptors, which imports the class at parse time.
    ``cls(descriptor)`` must return a QueueLike handle. Re-registering a type needs ``replace=True``.
    """
    if not isinstance(queue_type, str) or not queue_type:
        raise ValueError("queue_type must be a non-empty string")
    if queue_type in _ALIASES:
        raise ValueError(f"{queue_type!r} is an alias of {_ALIASES[queue_type]!r}")
    if cls is not None and not isinstance(cls, (type, str)):
        raise TypeError(f"cls must be a class, a 'module:Class' string or None, not {type(cls).__name__}")
    schema: Optional[QueueTypeSchema]
    if metadata is None:
        schema = None
    elif isinstance(metadata, QueueTypeSchema):
        schema = metadata
    elif isinstance(metadata, Sequence) and all(isinstance(f, MetadataField) for f in metadata):
        schema = QueueTypeSchema(fields=tuple(metadata))
    else:
        raise TypeError("metadata must be a QueueTypeSchema or a sequence of MetadataField")
    if cls is None and schema is None:
        raise ValueError("a type registered without a class needs its metadata schema")
    with QUEUE_STUB_MAPPING._lock:
        if queue_type in QUEUE_STUB_MAPPING and not replace:
            raise ValueError(f"queue_type {queue_type!r} is already registered (pass replace=True)")
        QUEUE_STUB_MAPPING._entries[queue_type] = _Entry(cls, schema)


def unregister_queue_implementation(queue_type: str) -> None:
    """Remove a registration (built-ins included); KeyError if absent."""
    del QUEUE_STUB_MAPPING[queue_type]
