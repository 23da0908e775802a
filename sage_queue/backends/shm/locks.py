"""The two kernel locks of an ``shm`` queue, held on each handle's own open file description.

Producers take ``flock`` on the segment file; consumers an open-file-description record
lock (``F_OFD_SETLKW``, Linux >= 3.15) on byte 1. Both kinds belong to the open file
description, so two handles (even in one process) exclude each other, and the kernel
releases them when the holder dies, whatever it was doing; on Linux the two kinds never
interact, and two lock lists of the inode contend less in the kernel than two records on
one list (a lock/unlock pair measured 0.66-0.88 us against 1.2 us).

Unlocked reads of the other side's commit word are only safe where stores become
visible in program order (x86 TSO). Elsewhere (``TWO_LOCKS`` false) both sides take the
flock, whose system calls order everything; on macOS (no OFD locks, and shm descriptors
take no locks) the flock is taken on a sidecar file.

Hot paths unpack ``SIDE_LOCKS[side]`` into ``call, lock, unlock`` and call
``call(fd, *lock)`` / ``call(fd, *unlock)`` directly, without a wrapper frame.
"""

from __future__ import annotations

import os
import platform
import struct
import sys
import tempfile
from typing import Any

from ... import _segment
from ...errors import BackendUnavailable
from .layout import SEGMENT_KIND

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CONSUMER",
    "OFD",
    "PRODUCER",
    "SIDE_LOCKS",
    "TWO_LOCKS",
    "lock_path",
    "os_lock",
    "os_unlock",
]

_TSO = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
OFD = sys.platform.startswith("linux") and fcntl is not None and hasattr(fcntl, "F_OFD_SETLKW")
TWO_LOCKS = _TSO and OFD
"""Producers and consumers lock separately; else one lock for both."""
PRODUCER, CONSUMER = 0, 1 if TWO_LOCKS else 0
"""Lock byte (and index into the per-handle thread locks) of each side."""

_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux: type, whence, start, len, pid
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 0)
_LOCK_REQ = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 1, 1, 0) if OFD else b""
_UNLOCK_REQ = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 1, 1, 0) if OFD else b""

_flock: Any = getattr(fcntl, "flock", None)
_LOCK_EX: int = getattr(fcntl, "LOCK_EX", 0)
_LOCK_UN: int = getattr(fcntl, "LOCK_UN", 0)
_fcntl_call: Any = getattr(fcntl, "fcntl", None)

# Per side: (call, lock args, unlock args), used as ``call(fd, *args)``: the C function is
# called directly, without a Python wrapper frame (flock(fd, LOCK_EX) or
# fcntl(fd, F_OFD_SETLKW, struct flock)).
SIDE_LOCKS: Any = (
    (_flock, (_LOCK_EX,), (_LOCK_UN,)),
    (_fcntl_call, (_F_OFD_SETLKW, _LOCK_REQ), (_F_OFD_SETLKW, _UNLOCK_REQ))
    if TWO_LOCKS
    else (_flock, (_LOCK_EX,), (_LOCK_UN,)),
)


def lock_path(name: str) -> str:
    """The file whose open file description carries the locks."""
    if OFD:
        return _segment.segment_path(SEGMENT_KIND, name)
    # No OFD locks (macOS): POSIX shm descriptors support neither record locks nor pread
    # there, so flock a sidecar file.
    return os.path.join(tempfile.gettempdir(), f"{_segment.SEGMENT_PREFIX}{SEGMENT_KIND}-{name}.lock")


def os_lock(fd: int, side: int) -> None:
    """Take the kernel lock of ``side`` on ``fd`` (blocking; the GIL is released while waiting)."""
    if _flock is None:  # pragma: no cover - Windows
        raise BackendUnavailable("shm", "fcntl", "the shm backend needs a POSIX system (Linux, macOS)")
    call, lock, _ = SIDE_LOCKS[side]
    call(fd, *lock)


def os_unlock(fd: int, side: int) -> None:
    call, _, unlock = SIDE_LOCKS[side]
    call(fd, *unlock)
