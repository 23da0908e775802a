"""Every error sage-queue raises on purpose, in one place (see ``spec/errors.md``).

Emptiness and fullness are *not* here: they are the standard library's
:class:`queue.Empty` and :class:`queue.Full`, so code written against
``queue.Queue`` keeps working unchanged.

Hierarchy::

    SageQueueError
    ├── DescriptorError (ValueError)         bad descriptor, caught before any queue exists
    │   ├── MalformedDescriptor             not JSON / not a mapping / wrong field types
    │   ├── UnknownQueueType                queue_type not registered
    │   ├── InvalidMetadata                 a metadata value missing or out of range
    │   └── UnsupportedVersion              descriptor format newer than this library
    ├── QueueNotFound (LookupError)          the descriptor is valid, the queue is not reachable
    ├── QueueExists (FileExistsError)        exclusive create of a name already in use
    ├── IncompatibleQueue                    the named queue has another layout/version
    ├── QueuePermissionError (PermissionError) the named queue belongs to another user, or others may write it
    ├── QueueBroken                          the queue's shared state failed a consistency check
    │   └── QueueActorLost                  the Ray actor holding the queue died or restarted: items gone
    ├── QueueConnectionError (ConnectionError) a network backend's server stopped answering
    ├── QueueClosed                          this handle was closed
    │   └── QueueDestroyed                  the queue itself was destroyed (through any handle)
    └── BackendUnavailable (ImportError)     an optional dependency of a backend is missing
"""

from __future__ import annotations

__all__ = [
    "SageQueueError",
    "DescriptorError",
    "MalformedDescriptor",
    "UnknownQueueType",
    "InvalidMetadata",
    "UnsupportedVersion",
    "QueueNotFound",
    "QueueExists",
    "IncompatibleQueue",
    "QueuePermissionError",
    "QueueBroken",
    "QueueActorLost",
    "QueueConnectionError",
    "QueueClosed",
    "QueueDestroyed",
    "BackendUnavailable",
]


class SageQueueError(Exception):
    """Base class of every error this library defines."""


class DescriptorError(SageQueueError, ValueError):
    """A descriptor (or its JSON/dict form) is not acceptable.

    Raised when a descriptor is built and when one is parsed, never later:
    a descriptor that exists has passed validation.
    """


class MalformedDescriptor(DescriptorError):
    """The input is not a descriptor at all: bad JSON, not a mapping, a field of the wrong type."""


class UnknownQueueType(DescriptorError):
    """``queue_type`` names no registered backend."""


class InvalidMetadata(DescriptorError):
    """A metadata key required by the queue type is missing, or a value is out of range."""


class UnsupportedVersion(DescriptorError):
    """The descriptor's format ``version`` is newer (or older) than this library understands."""


class QueueNotFound(SageQueueError, LookupError):
    """The descriptor is valid but the queue it names cannot be reached from this process."""


class QueueExists(SageQueueError, FileExistsError):
    """An exclusive create found a queue already living under that name."""


class IncompatibleQueue(SageQueueError):
    """A queue exists under that name but its layout, version or parameters differ."""


class QueuePermissionError(SageQueueError, PermissionError):
    """The named queue exists but may not be attached by this process.

    Raised when a shared-memory segment is owned by another user, is readable or
    writable by group/others, or cannot be opened for lack of permission: its
    contents could have been written by someone else, and items are unpickled
    from it (spec SEG1-SEG3).
    """


class QueueBroken(SageQueueError):
    """The queue's shared state failed a consistency check (corrupt or hostile memory).

    A bound, index or length read from shared memory was out of range. The queue
    is marked broken: every later operation on it, from any handle, raises this
    too. Nothing more can be taken from it safely; destroy it and create a new one.
    """


class QueueConnectionError(SageQueueError, ConnectionError):
    """A network backend's server (or a Ray queue's live actor) stopped answering within the deadline.

    The outcome of the call that raises it is unknown, but it executed at most once: a put
    may or may not have been enqueued (so it is never reported as ``queue.Full``); a get's
    item is not lost: rpc keeps it for this handle's channel and puts it back at the head of
    the queue when the handle is closed (RPC9, RPC13); ray_actor puts a late answer's items
    back at the head when it arrives (RAY13).
    At resolve time an unreachable server is QueueNotFound.
    """


class QueueActorLost(QueueBroken):
    """The Ray actor holding the queue died (killed, its node lost) or restarted (spec RAY9-RAY10).

    Its items are gone, as after corruption. Raised at once by every call on a handle of the
    dead actor (never a hang); after a restart (``max_restarts``) each handle raises it once,
    then works on the new, empty queue.
    """


class QueueClosed(SageQueueError):
    """This handle was closed; no further operation is possible on it.

    Subclass :class:`QueueDestroyed` says the queue itself was destroyed
    (through this or any other handle); ``except QueueClosed`` catches both.
    """


class QueueDestroyed(QueueClosed):
    """The queue was destroyed (through any handle, in any process); it is gone for everyone."""


class BackendUnavailable(SageQueueError, ImportError):
    """A backend needs an optional dependency that is not installed or cannot load.

    The message names the missing piece and how to install it.
    """

    def __init__(self, queue_type: str, missing: str, hint: str) -> None:
        self.queue_type = queue_type
        self.missing = missing
        self.hint = hint
        super().__init__(f"queue type {queue_type!r} is unavailable: {missing} ({hint})")

    def __reduce__(self) -> tuple[type[BackendUnavailable], tuple[str, str, str]]:
        return (type(self), (self.queue_type, self.missing, self.hint))
