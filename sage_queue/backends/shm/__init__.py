"""``shm``: a pure-Python MPMC queue living in a named POSIX shared-memory segment.

Any process on the host that holds the descriptor (a ``subprocess`` given only the
JSON, a ``spawn`` child, a Ray worker) resolves it to a handle on the same queue.
Standard library only: ``mmap`` + ``struct`` for the segment, ``fcntl`` locks, and
(Linux) a ``futex`` on a shared word through ``ctypes`` for sleeping. The normative text
is ``spec/backends/shm.md`` (and spec/segments.md for who may attach). The parts:

* ``layout``   the segment and record format: diagram, offsets, the commit-word store;
* ``futex``    sleeping and waking on a shared word;
* ``locks``    the producer and consumer kernel locks (robust to a dead holder);
* ``handle``   :class:`SharedMemoryQueueStub`: attach, put/get protocol, close, destroy;
* ``segments`` ``describe_segment`` / ``remove_segment`` for ``sage-queue ls``/``gc``.
"""

from __future__ import annotations

from .handle import SharedMemoryQueueStub
from .layout import (
    C_WORD_OFFSET,
    DATA_OFFSET,
    DEFAULT_CAPACITY_BYTES,
    LAYOUT_VERSION,
    MAGIC,
    MAX_CAPACITY_BYTES,
    MIN_CAPACITY_BYTES,
    P_WORD_OFFSET,
    PID_OVERFLOW_OFFSET,
    SEGMENT_KIND,
    STATE_OFFSET,
    VERSION_OFFSET,
)
from .locks import CONSUMER, PRODUCER
from .segments import describe_segment, remove_segment

__all__ = [
    "SharedMemoryQueueStub",
    "describe_segment",
    "remove_segment",
    "DEFAULT_CAPACITY_BYTES",
    "LAYOUT_VERSION",
    "SEGMENT_KIND",
    "C_WORD_OFFSET",
    "CONSUMER",
    "DATA_OFFSET",
    "MAGIC",
    "MAX_CAPACITY_BYTES",
    "MIN_CAPACITY_BYTES",
    "P_WORD_OFFSET",
    "PID_OVERFLOW_OFFSET",
    "PRODUCER",
    "STATE_OFFSET",
    "VERSION_OFFSET",
]
