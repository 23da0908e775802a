"""The metadata schema of every queue type: fields, JSON types, ranges, defaults (spec D10).

A leaf module: it imports nothing of this package but ``errors``, and never a
backend, so a scheduler, a monitor or ``sage-queue inspect`` can parse, validate,
print and forward a descriptor of every known type with none of the transports
installed (spec D13). The registry stores one :class:`QueueTypeSchema` per type;
the built-in types' schemas are :data:`BUILTIN_SCHEMAS` below, which is also the
table printed in ``spec/descriptor.md`` and ``spec/descriptor.schema.json``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

from .errors import InvalidMetadata

__all__ = [
    "MAXSIZE_MAX",
    "check_segment_name",
    "MetadataField",
    "QueueTypeSchema",
    "BUILTIN_SCHEMAS",
    "non_negative",
    "positive",
    "in_range",
    "maxsize_field",
    "is_kind",
]

MAXSIZE_MAX = 2**63 - 1
"""Largest ``maxsize`` of every built-in type (spec D14). The sage and shm headers store it in an
unsigned 64-bit word (``uint64_t`` / struct ``Q``), where a larger value would wrap or fail deep
inside the backend; 2**63 - 1 also fits a signed 64-bit field, for transports that use one."""

_MISSING = object()


@dataclass(frozen=True)
class MetadataField:
    """One metadata key of a queue type: its JSON type, default and range check (spec D10)."""

    name: str
    kind: type
    """``int``, ``float``, ``str`` or ``bool``; ``bool`` is never accepted for ``int``."""
    required: bool = False
    default: Any = None
    """Filled in when the key is absent and not required; ``None`` leaves it absent."""
    check: Optional[Callable[[Any], Optional[str]]] = None
    """Returns an error text for a bad value, ``None`` for a good one."""
    doc: str = ""

    def apply(self, queue_type: str, metadata: dict[str, Any]) -> None:
        """Check ``metadata[self.name]`` in place (defaults filled in); InvalidMetadata names the key."""
        value = metadata.get(self.name, _MISSING)
        # null is a value of the wrong JSON type, not an absent key (D10; the schema agrees).
        if value is _MISSING:
            if self.required:
                raise InvalidMetadata(f"{queue_type} descriptor needs metadata[{self.name!r}] ({self.doc})")
            if self.default is not None:
                metadata[self.name] = self.default
            else:
                metadata.pop(self.name, None)
            return
        if not is_kind(value, self.kind):
            raise InvalidMetadata(
                f"{queue_type} metadata[{self.name!r}] must be {self.kind.__name__}, "
                f"got {type(value).__name__} {value!r}"
            )
        if self.kind is float:
            value = float(value)
            metadata[self.name] = value
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise InvalidMetadata(f"{queue_type} metadata[{self.name!r}]={value!r}: {problem}")


def is_kind(value: Any, kind: type) -> bool:
    """True if ``value`` is of JSON type ``kind`` (a bool is not an int; a float is finite)."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            return math.isfinite(value)
        except OverflowError:  # an int too large for a float is not a finite float
            return False
    return isinstance(value, kind)


def non_negative(value: Any) -> Optional[str]:
    return None if value >= 0 else "must be >= 0"


def positive(value: Any) -> Optional[str]:
    return None if value > 0 else "must be > 0"


def in_range(low: int, high: int) -> Callable[[Any], Optional[str]]:
    """A check accepting ``low <= value <= high``."""

    def check(value: Any) -> Optional[str]:
        return None if low <= value <= high else f"must be between {low} and {high}"

    return check


def maxsize_field(doc: str) -> MetadataField:
    """The ``maxsize`` key every built-in type has: an int in [0, MAXSIZE_MAX], default 0 (D14)."""
    return MetadataField("maxsize", int, default=0, check=in_range(0, MAXSIZE_MAX), doc=doc)


CreateHook = Callable[[str, dict[str, Any]], dict[str, Any]]
"""``(queue_id, metadata) -> metadata``: a type's own step of :meth:`QueueDescriptor.create`."""


@dataclass(frozen=True)
class QueueTypeSchema:
    """What the library knows about a queue type without importing its backend.

    ``fields`` validate metadata (D10; unknown keys are kept, D7). The rest serves the
    generic factory ``QueueDescriptor.create(queue_type, name=None, maxsize=0, **metadata)``
    (D22): the queue_id is ``name`` (or a new ``<type>_<hex>``); ``name_key``, if set, is
    the metadata key that repeats it (``shm_name``, ``actor_name``...); ``create_hook`` adds
    what only a creator can know (``local``: the creating process). ``target`` is used by
    entry points only: the ``"module:Class"`` implementing the type, imported at resolve.
    """

    fields: tuple[MetadataField, ...] = ()
    name_key: Optional[str] = None
    create_hook: Optional[CreateHook] = None
    target: Optional[str] = None
    doc: str = ""

    def validate(self, queue_type: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """``metadata`` checked against :attr:`fields`, with defaults filled in; InvalidMetadata."""
        out = dict(metadata)
        for f in self.fields:
            f.apply(queue_type, out)
        return out

    def new_metadata(self, queue_id: str, maxsize: int, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """The metadata of a new descriptor made by the generic factory (validated afterwards)."""
        out: dict[str, Any] = {"maxsize": maxsize, **metadata}
        if self.name_key is not None:
            out.setdefault(self.name_key, queue_id)
        if self.create_hook is not None:
            out = self.create_hook(queue_id, out)
        return out


def _local_create(queue_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
    # Only the creating process may resolve a local descriptor (R8, Q43).
    return {"owner_pid": os.getpid(), **metadata}


def check_segment_name(value: Any) -> Optional[str]:
    """Error text for a bad segment name (``shm``/``sage`` ``shm_name``), None if good.

    The one rule: descriptors are checked with it here, and ``sage_queue._segment`` checks
    every name it opens with it too.
    """
    if not isinstance(value, str) or not 1 <= len(value) <= 200 or not all(c in _NAME_CHARS for c in value):
        return "must match [A-Za-z0-9_.-]{1,200}"
    return None


_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def _segment_schema(default_capacity: int, min_capacity: int, max_capacity: int, capacity_doc: str) -> QueueTypeSchema:
    """``shm`` and ``sage`` share one table; only the ``capacity_bytes`` default and range differ."""
    return QueueTypeSchema(
        fields=(
            MetadataField("shm_name", str, required=True, check=check_segment_name, doc="segment name"),
            maxsize_field("maximum items, 0 = bounded by bytes"),
            MetadataField(
                "capacity_bytes",
                int,
                default=default_capacity,
                check=in_range(min_capacity, max_capacity),
                doc=capacity_doc,
            ),
            MetadataField("create", bool, default=True, doc="create on first resolve (true) or attach only (false)"),
        ),
        name_key="shm_name",
        doc="a named shared-memory segment on this host",
    )


def _non_empty(value: Any) -> Optional[str]:
    return None if value else "must not be empty"


def _one_of(*choices: str) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _lifetime(value: Any) -> Optional[str]:
    return None if value in ("detached", "non_detached") else "must be 'detached' or 'non_detached'"


# spec/backends/ray.md. No new key has a default filled in: a descriptor keeps only what was given.
_RAY_FIELDS = (
    MetadataField("actor_name", str, required=True, check=_non_empty, doc="name of the Ray actor holding the queue"),
    maxsize_field("maximum items, 0 = unbounded"),
    MetadataField("namespace", str, check=_non_empty, doc="Ray namespace of the actor (absent: 'sage_queue')"),
    MetadataField(
        "lifetime",
        str,
        check=_lifetime,
        doc="'detached' (absent: lives until destroyed) or 'non_detached' (dies with its creator)",
    ),
    MetadataField(
        "address", str, check=_non_empty, doc="Ray cluster to connect to (absent: $RAY_ADDRESS, else a local instance)"
    ),
)
_RAY_ACTOR_FIELDS = (
    *_RAY_FIELDS,
    MetadataField(
        "max_restarts",
        int,
        check=in_range(-1, 1000),
        doc="times Ray restarts a dead queue actor, empty (absent: 0; -1 = forever)",
    ),
)

BUILTIN_SCHEMAS: Mapping[str, QueueTypeSchema] = {
    "local": QueueTypeSchema(
        fields=(
            maxsize_field("maximum items, 0 = unbounded"),
            MetadataField(
                "owner_pid", int, required=True, check=positive, doc="pid of the only process that can resolve it"
            ),
        ),
        create_hook=_local_create,
        doc="an in-process queue.Queue",
    ),
    # Capacity numbers: sage_queue/backends/shm/layout.py (DEFAULT/MIN/MAX_CAPACITY_BYTES), restated so that
    # parsing does not import the backend; tests/test_schema.py checks that the two agree.
    "shm": _segment_schema(1 << 20, 64, 1 << 32, "bytes in the data ring"),
    # sage_queue/backends/sage.py: a record's length is a 32-bit field, hence 2**31.
    "sage": _segment_schema(16 << 20, 1024, 1 << 31, "bytes in the ring (rounded up to 64)"),
    "ray_queue": QueueTypeSchema(fields=_RAY_FIELDS, name_key="actor_name", doc="a ray.util.queue.Queue"),
    "ray_actor": QueueTypeSchema(fields=_RAY_ACTOR_FIELDS, name_key="actor_name", doc="this library's named Ray actor"),
    "rpc": QueueTypeSchema(
        fields=(
            MetadataField("host", str, required=True, check=_non_empty, doc="host of the sage-queue server"),
            MetadataField("port", int, required=True, check=in_range(0, 65535), doc="TCP port of the server"),
            MetadataField("name", str, required=True, check=_non_empty, doc="queue name on the server"),
            maxsize_field("maximum items, 0 = unbounded"),
            # spec/backends/rpc.md. No key has a default filled in (the client applies the defaults named
            # here): a descriptor keeps only what was given. The key itself never travels in a
            # descriptor, only where to find it (RPC4).
            MetadataField(
                "key_file",
                str,
                check=_non_empty,
                doc="path of the shared key file (hex, mode 0600); absent: the default key file",
            ),
            MetadataField(
                "key_env",
                str,
                check=_non_empty,
                doc="environment variable holding the shared key (hex); wins over key_file",
            ),
            MetadataField("create", bool, doc="create on first resolve (absent: true) or attach only (false)"),
            MetadataField(
                "serializer",
                str,
                check=_one_of("pickle", "json", "msgpack"),
                doc="how clients encode items (absent: pickle); the server never decodes them",
            ),
            MetadataField(
                "durable", bool, doc="true: the server must keep queues durably (--data-dir), else IncompatibleQueue"
            ),
            MetadataField(
                "connect_timeout",
                float,
                check=positive,
                doc="seconds resolve waits for the server, then QueueNotFound (absent: 10)",
            ),
            MetadataField(
                "retry_timeout",
                float,
                check=positive,
                doc="seconds of server silence before a call raises QueueConnectionError (absent: 30)",
            ),
        ),
        name_key="name",
        doc="a queue served over ZeroMQ by sage-queue serve",
    ),
}
"""Schema of each built-in queue type, by canonical name."""
