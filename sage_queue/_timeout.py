"""Timeout arguments, normalised once at the front door (spec Q5-Q8).

All deadlines are taken from :func:`time.monotonic`, never the wall clock, so a
clock step (NTP, suspend) can neither shorten nor stretch a wait.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Optional

__all__ = ["normalize_timeout", "Deadline", "STALL_S", "stalled"]


def normalize_timeout(block: bool, timeout: Optional[float]) -> Optional[float]:
    """Turn ``(block, timeout)`` into seconds to wait: ``None`` forever, ``0.0`` not at all.

    Mirrors :class:`queue.Queue`: ``block=False`` ignores ``timeout`` entirely;
    with ``block=True`` a negative or NaN timeout is a ``ValueError``, a
    non-number a ``TypeError``; a timeout longer than the platform can wait
    (``threading.TIMEOUT_MAX``, infinity included) means forever.
    """
    if not block:
        return 0.0
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"'timeout' must be a number or None, not {type(timeout).__name__}")
    try:
        seconds = float(timeout)
    except OverflowError:  # an int beyond the range of a float
        seconds = math.inf if timeout > 0 else -math.inf
    if math.isnan(seconds) or seconds < 0:
        raise ValueError("'timeout' must be a non-negative number")
    if seconds > threading.TIMEOUT_MAX:
        # Longer than the platform can wait (about 292 years; inf too): the same as forever. Passing
        # it on would make Condition.wait raise OverflowError, which is no documented error (E12).
        return None
    return seconds


class Deadline:
    """A point on the monotonic clock; ``remaining()`` is recomputed at every call."""

    __slots__ = ("_end",)

    def __init__(self, timeout: Optional[float]) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    @property
    def forever(self) -> bool:
        return self._end is None

    def remaining(self) -> Optional[float]:
        """Seconds left (never negative), or ``None`` for a wait without end."""
        if self._end is None:
            return None
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end


STALL_S = 1.0
"""A wait that returned this much later than it asked for: this process did not run meanwhile."""


def stalled(since: float, asked: float, now: float) -> float:
    """Seconds this process did not run in a wait for an answer (Q38).

    ``since``: :func:`time.monotonic` when the previous wait ended (or the call began); ``asked``: how
    long this wait asked to block at most; ``now``: when it returned. A wait that returned more than
    :data:`STALL_S` late means the process was stopped (SIGSTOP, a debugger, a paused container) or not
    scheduled: the peer's answer may have come meanwhile, unread. A caller adds the result to its give-up
    time, so that a resumed call first reads what came instead of blaming a peer that was never silent.
    Short hiccups (scheduling, a GC pause) are not counted: the grace of a give-up time covers them."""
    late = now - since - asked
    return late if late > STALL_S else 0.0
