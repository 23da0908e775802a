"""sage-queue: one ``QueueLike`` contract, many transports, addressed by serialisable descriptors.

    >>> from sage_queue import QueueDescriptor, resolve_descriptor
    >>> q = resolve_descriptor(QueueDescriptor.create_local_queue(maxsize=10))
    >>> q.put("hello"); q.get()
    'hello'

Importing this package is cheap: backends that need Ray, pyzmq or the C core
import them only when a queue of their type is resolved.
"""

from __future__ import annotations

import logging as _logging
from typing import Any

from .descriptor import DESCRIPTOR_VERSION, QueueDescriptor
from .errors import (
    BackendUnavailable,
    DescriptorError,
    IncompatibleQueue,
    InvalidMetadata,
    MalformedDescriptor,
    QueueActorLost,
    QueueBroken,
    QueueClosed,
    QueueConnectionError,
    QueueDestroyed,
    QueueExists,
    QueueNotFound,
    QueuePermissionError,
    SageQueueError,
    UnknownQueueType,
    UnsupportedVersion,
)
from .metadata import MAXSIZE_MAX, MetadataField, QueueTypeSchema
from .protocol import KNOWN_CAPABILITIES, QueueLike, QueueStats
from .registry import QUEUE_STUB_MAPPING, register_queue_implementation, unregister_queue_implementation
from .resolve import create_descriptor_from_existing_queue, get_local_queue, resolve_descriptor
from .stub import QueueStub

# A library stays quiet unless the application configures logging (the logging HOWTO): without a
# handler on our logger, a warning would reach stderr through logging's "last resort" handler.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # RPCQueueServer needs pyzmq: imported on first use, so that `import sage_queue` stays light
    # (and left out of __all__, so that `from sage_queue import *` works without pyzmq).
    if name == "RPCQueueServer":
        from .backends.rpc.server import RPCQueueServer

        return RPCQueueServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DESCRIPTOR_VERSION",
    "KNOWN_CAPABILITIES",
    "MAXSIZE_MAX",
    "QUEUE_STUB_MAPPING",
    "BackendUnavailable",
    "DescriptorError",
    "IncompatibleQueue",
    "InvalidMetadata",
    "MalformedDescriptor",
    "MetadataField",
    "QueueActorLost",
    "QueueBroken",
    "QueueClosed",
    "QueueConnectionError",
    "QueueDestroyed",
    "QueueDescriptor",
    "QueueExists",
    "QueueLike",
    "QueueNotFound",
    "QueuePermissionError",
    "QueueStats",
    "QueueStub",
    "QueueTypeSchema",
    "SageQueueError",
    "UnknownQueueType",
    "UnsupportedVersion",
    "create_descriptor_from_existing_queue",
    "get_local_queue",
    "register_queue_implementation",
    "resolve_descriptor",
    "unregister_queue_implementation",
    "__version__",
]
