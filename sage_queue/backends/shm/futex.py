"""``FUTEX_WAIT``/``FUTEX_WAKE`` on a u32 in the shared mapping, through ``ctypes`` (Linux).

Shared (not ``FUTEX_PRIVATE``) futexes: the kernel keys them by the page's inode and
offset, so processes that map the segment at different addresses meet on the same word.
Elsewhere (or with ``SAGE_QUEUE_SHM_NO_FUTEX`` set) ``FUTEX`` is None and waiters poll.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Optional

__all__ = ["FUTEX", "WAKE_ALL", "Futex"]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98, "i686": 240, "i386": 240, "ppc64le": 221, "s390x": 238}
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
WAKE_ALL = 0x7FFFFFFF


class Futex:
    """The two futex operations the queue needs, on raw addresses inside the mapping."""

    def __init__(self, number: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._syscall.argtypes = [
            ctypes.c_long,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_uint,
        ]
        self._number = number

    def wait(self, address: int, expected: int, timeout: float) -> None:
        """Sleep while the word at ``address`` equals ``expected``, at most ``timeout`` s (GIL released)."""
        seconds = int(timeout)
        spec = _Timespec(seconds, int((timeout - seconds) * 1e9))
        # Return values do not matter: EAGAIN (word moved), ETIMEDOUT, EINTR (a signal: its
        # Python handler runs when we return), EFAULT (handle closed under us) all mean
        # "re-check", which the caller does.
        self._syscall(self._number, address, _FUTEX_WAIT, expected & 0xFFFFFFFF, ctypes.addressof(spec), None, 0)

    def wake(self, address: int, count: int) -> None:
        self._syscall(self._number, address, _FUTEX_WAKE, min(count, WAKE_ALL), None, None, 0)


def _load() -> Optional[Futex]:
    if not sys.platform.startswith("linux") or os.environ.get("SAGE_QUEUE_SHM_NO_FUTEX"):
        return None
    number = _SYS_FUTEX.get(platform.machine())
    if number is None:
        return None
    try:
        return Futex(number)
    except (OSError, AttributeError):
        return None


FUTEX = _load()
