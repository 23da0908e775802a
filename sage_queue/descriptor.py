"""``QueueDescriptor``: the small, versioned, serialisable name of a queue (spec/descriptor.md).

A descriptor is validated when it is built and when it is parsed; one that exists
has passed validation, so resolving it can only fail for reasons of reachability
(QueueNotFound, BackendUnavailable), never a KeyError from deep inside a backend.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from . import registry
from .errors import MalformedDescriptor, UnsupportedVersion
from .metadata import MAXSIZE_MAX, MetadataField, QueueTypeSchema, is_kind, non_negative, positive

# MetadataField, non_negative and positive live in .metadata; they are re-exported here for
# code written before the schema left this module.
__all__ = [
    "DESCRIPTOR_VERSION",
    "MAXSIZE_MAX",
    "QueueDescriptor",
    "MetadataField",
    "QueueTypeSchema",
    "DescriptorLike",
    "non_negative",
    "positive",
]

DESCRIPTOR_VERSION = 1
"""The descriptor format version this library writes and reads (spec D2)."""

_FIELDS = ("version", "queue_id", "queue_type", "metadata", "created_timestamp")
_QUEUE_ID_RE = re.compile(r"[^\x00-\x1f\x7f]{1,255}")


def _json_normal(queue_type: str, metadata: Any) -> dict[str, Any]:
    """A deep copy of ``metadata`` made only of JSON types (tuples become lists)."""
    if not isinstance(metadata, Mapping):
        raise MalformedDescriptor(f"metadata must be a JSON object, got {type(metadata).__name__}")
    for key in metadata:
        if not isinstance(key, str):
            raise MalformedDescriptor(f"metadata keys must be strings, got {key!r}")
    try:
        text = json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise MalformedDescriptor(f"{queue_type} metadata is not JSON-serialisable: {exc}") from None
    result: dict[str, Any] = json.loads(text)
    return result


def _refuse(self: Any, *args: Any, **kwargs: Any) -> None:
    raise TypeError("descriptor metadata is immutable; build a new descriptor instead")


class FrozenMetadata(dict):  # type: ignore[type-arg]
    """A descriptor's metadata: a real ``dict`` (JSON-serialisable as is) that refuses mutation (D9).

    Nested objects are FrozenMetadata and nested arrays FrozenList, so no part of a
    descriptor can change after validation. Copies are plain ``dict``/``list``.
    """

    __setitem__ = __delitem__ = __ior__ = _refuse  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __copy__(self) -> dict[str, Any]:
        return _thaw(self)  # type: ignore[no-any-return]

    def __deepcopy__(self, memo: Any) -> dict[str, Any]:
        return _thaw(self)  # type: ignore[no-any-return]

    def __reduce__(self) -> Any:
        return (dict, (_thaw(self),))


class FrozenList(list):  # type: ignore[type-arg]
    """An array inside descriptor metadata: a real ``list`` that refuses mutation."""

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse  # type: ignore[assignment]
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __copy__(self) -> list[Any]:
        return _thaw(self)  # type: ignore[no-any-return]

    def __deepcopy__(self, memo: Any) -> list[Any]:
        return _thaw(self)  # type: ignore[no-any-return]

    def __reduce__(self) -> Any:
        return (list, (_thaw(self),))


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return FrozenMetadata({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return FrozenList(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class QueueDescriptor:
    """A serialisable description of a queue; ``resolve_descriptor`` turns it into a handle.

    Equality is by value; descriptors hash by their canonical JSON. Build one with
    a ``create_*`` factory, :meth:`from_dict` or :meth:`from_json`.
    """

    queue_id: str
    queue_type: str
    metadata: dict[str, Any] = field(default_factory=dict)
    created_timestamp: Optional[float] = None
    version: int = DESCRIPTOR_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise MalformedDescriptor(f"version must be an int, got {self.version!r}")
        if self.version != DESCRIPTOR_VERSION:
            raise UnsupportedVersion(
                f"descriptor format version {self.version} is not supported: this library reads "
                f"version {DESCRIPTOR_VERSION} (upgrade sage-queue to read newer descriptors)"
            )
        if not isinstance(self.queue_id, str) or not _QUEUE_ID_RE.fullmatch(self.queue_id):
            raise MalformedDescriptor(f"queue_id must be a string of 1-255 printable characters, got {self.queue_id!r}")
        if not isinstance(self.queue_type, str):
            raise MalformedDescriptor(f"queue_type must be a string, got {self.queue_type!r}")
        ts = self.created_timestamp
        if ts is not None:
            if not is_kind(ts, float) or ts < 0:
                raise MalformedDescriptor(f"created_timestamp must be a finite number >= 0 or null, got {ts!r}")
            object.__setattr__(self, "created_timestamp", float(ts))
        queue_type = registry.canonical_type(self.queue_type)  # raises UnknownQueueType
        object.__setattr__(self, "queue_type", queue_type)
        metadata = _json_normal(queue_type, self.metadata)
        # The type's schema, never its backend: parsing works with no transport installed (D13).
        metadata = registry.validate_metadata(queue_type, metadata)
        object.__setattr__(self, "metadata", _freeze(metadata))

    def __eq__(self, other: object) -> bool:
        # By canonical JSON, not by the dataclass's field-wise ==: 1 == 1.0 == True in Python
        # but they are different JSON values, and equal descriptors must have equal JSON (D12)
        # and equal hashes (D9).
        if not isinstance(other, QueueDescriptor):
            return NotImplemented
        return self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    # -- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``from_dict(d.to_dict()) == d``."""
        return {
            "version": self.version,
            "queue_id": self.queue_id,
            "queue_type": self.queue_type,
            "metadata": json.loads(json.dumps(self.metadata)),
            "created_timestamp": self.created_timestamp,
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace); ``from_json(d.to_json()) == d``."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> QueueDescriptor:
        """Build and validate a descriptor from its dict form; raises DescriptorError subclasses."""
        if not isinstance(data, Mapping):
            raise MalformedDescriptor(f"a descriptor must be a JSON object, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in _FIELDS)
        if unknown:
            raise MalformedDescriptor(f"unknown descriptor fields {unknown}; known: {list(_FIELDS)}")
        for key in ("queue_id", "queue_type"):
            if key not in data:
                raise MalformedDescriptor(f"descriptor has no {key!r}")
        metadata = data.get("metadata")
        return cls(
            queue_id=data["queue_id"],
            queue_type=data["queue_type"],
            metadata={} if metadata is None else metadata,
            created_timestamp=data.get("created_timestamp"),
            version=data.get("version", DESCRIPTOR_VERSION),
        )

    @classmethod
    def from_json(cls, text: Union[str, bytes, bytearray]) -> QueueDescriptor:
        """Parse :meth:`to_json` output (any JSON object of the same shape)."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise MalformedDescriptor(f"from_json takes str or bytes, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
            raise MalformedDescriptor(f"descriptor is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def parse(cls, value: DescriptorLike) -> QueueDescriptor:
        """Accept a descriptor, its dict form or its JSON text."""
        if isinstance(value, QueueDescriptor):
            return value
        if isinstance(value, (str, bytes, bytearray)):
            return cls.from_json(value)
        return cls.from_dict(value)

    def __reduce__(self) -> tuple[Callable[..., QueueDescriptor], tuple[dict[str, Any]]]:
        # Unpickling re-validates (and version-checks) like from_dict does.
        return (QueueDescriptor.from_dict, (self.to_dict(),))

    # -- factories (spec D20-D22) ---------------------------------------------------------

    @classmethod
    def create(cls, queue_type: str, name: Optional[str] = None, maxsize: int = 0, **metadata: Any) -> QueueDescriptor:
        """A descriptor of a new queue of any registered type (spec D22).

        ``name`` becomes the queue_id (and the type's name key, e.g. ``shm_name``); None
        generates ``<type>_<16 hex digits>``. ``maxsize`` and ``metadata`` are validated
        against the type's schema (InvalidMetadata). Nothing is created until the
        descriptor is resolved, and no backend is imported.
        """
        queue_type = registry.canonical_type(queue_type)
        if name is None:
            schema = registry.type_schema(queue_type)
            name_key = None if schema is None else schema.name_key
            # A name given only as the type's own key (create("shm", shm_name="jobs")) is the name.
            given = metadata.get(name_key) if name_key is not None else None
            name = given if isinstance(given, str) else _new_id(queue_type)
        return cls(
            queue_id=name,
            queue_type=queue_type,
            metadata=registry.new_metadata(queue_type, name, maxsize, metadata),
            created_timestamp=time.time(),
        )

    # The seed's named factories: thin wrappers of create(), keyword-compatible with the seed.

    @classmethod
    def create_local_queue(cls, maxsize: int = 0, queue_id: Optional[str] = None) -> QueueDescriptor:
        """An in-process ``queue.Queue``, shared by queue_id inside this process only."""
        return cls.create("local", queue_id, maxsize)

    @classmethod
    def create_shm_queue(
        cls,
        name: str,
        maxsize: int = 0,
        capacity_bytes: Optional[int] = None,
        create: bool = True,
    ) -> QueueDescriptor:
        """A pure-Python shared-memory queue named ``name``, attachable from any local process.

        ``create=True`` creates the segment on first resolve or attaches to an
        existing one; ``create=False`` only attaches (QueueNotFound if absent).
        """
        return cls.create("shm", name, maxsize, create=create, **_given(capacity_bytes=capacity_bytes))

    @classmethod
    def create_sage_queue(
        cls,
        maxsize: int = 0,
        name: Optional[str] = None,
        capacity_bytes: Optional[int] = None,
        create: bool = True,
    ) -> QueueDescriptor:
        """The lock-free C11 shared-memory ring; same naming rules as ``create_shm_queue``."""
        return cls.create("sage", name, maxsize, create=create, **_given(capacity_bytes=capacity_bytes))

    @classmethod
    def create_ray_queue(cls, maxsize: int = 0, name: Optional[str] = None) -> QueueDescriptor:
        """A ``ray.util.queue.Queue`` shared by name across a Ray cluster."""
        return cls.create("ray_queue", name, maxsize)

    @classmethod
    def create_ray_actor_queue(cls, actor_name: str, maxsize: int = 0) -> QueueDescriptor:
        """A queue held by this library's own named Ray actor."""
        return cls.create("ray_actor", actor_name, maxsize)

    @classmethod
    def create_rpc_queue(cls, host: str, port: int, name: Optional[str] = None, maxsize: int = 0) -> QueueDescriptor:
        """A queue served over ZeroMQ by ``sage-queue serve`` at ``host:port``.

        Other rpc metadata (``key_file`` or ``key_env``, ``serializer``, ``durable``...; spec/backends/rpc.md)
        goes through ``QueueDescriptor.create("rpc", name, maxsize, host=..., port=..., **metadata)``.
        """
        return cls.create("rpc", name, maxsize, host=host, port=port)


DescriptorLike = Union[QueueDescriptor, Mapping[str, Any], str, bytes, bytearray]


def _given(**kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that are not None (a seed factory's "use the default")."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"
