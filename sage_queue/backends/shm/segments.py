"""``describe_segment`` / ``remove_segment``: what ``sage-queue ls``, ``gc`` and ``inspect``
(sage_queue/tools.py) ask of the ``shm`` backend. They read the header from outside,
without attaching to the queue (no pid recorded, no lock taken, nothing modified).
"""

from __future__ import annotations

import os

from ... import _segment
from ..._segment import Segment, SegmentInfo
from .layout import (
    BROKEN,
    C_WORD_OFFSET,
    DATA_OFFSET,
    DESTROYED,
    FIXED,
    LAYOUT_VERSION,
    MAGIC,
    MASK32,
    MIN_CAPACITY_BYTES,
    P_WORD_OFFSET,
    PID_OVERFLOW_OFFSET,
    PID_TABLE_OFFSET,
    PIDS,
    SEGMENT_KIND,
    U32,
    U64,
)
from .locks import OFD, lock_path

__all__ = ["describe_segment", "remove_segment"]


def describe_segment(name: str) -> SegmentInfo:
    """What ``sage-queue ls`` shows of segment ``name``; never modifies it, never registers a pid.

    Reads without taking the queue's locks (a stopped process may hold them): the
    depth comes from the two commit words, which are always consistent. A segment
    that another user could have written is refused (QueuePermissionError, SEG6).
    """
    seg = Segment.open(SEGMENT_KIND, name, 0, create=False)
    try:
        buf = seg.buf
        if seg.size < DATA_OFFSET + MIN_CAPACITY_BYTES:
            return SegmentInfo(SEGMENT_KIND, name, seg.size, None, (), note="too small to be an shm queue")
        magic, version, _hsize, capacity, _maxsize, _instance, creator, state = FIXED.unpack_from(buf, 0)
        if magic == b"\0" * 8:
            return SegmentInfo(
                SEGMENT_KIND,
                name,
                seg.size,
                None,
                (),
                creator_pid=creator or None,
                note="uninitialised (its creator died while creating it, or is creating it now)",
            )
        if magic != MAGIC:
            return SegmentInfo(SEGMENT_KIND, name, seg.size, None, (), note=f"not an shm queue (magic {magic!r})")
        if version != LAYOUT_VERSION:
            return SegmentInfo(
                SEGMENT_KIND,
                name,
                seg.size,
                None,
                (),
                creator_pid=creator,
                format_version=version,
                note=f"layout version {version}; this library reads {LAYOUT_VERSION}",
            )
        gets = U64.unpack_from(buf, C_WORD_OFFSET)[0] >> 32
        puts = U64.unpack_from(buf, P_WORD_OFFSET)[0] >> 32
        depth: int | None = (puts - gets) & MASK32
        pids = tuple(p for p in PIDS.unpack_from(buf, PID_TABLE_OFFSET) if p)
        notes = []
        if state & DESTROYED:
            notes.append("destroyed, still mapped by some process")
        if state & BROKEN or (depth or 0) > capacity // 8:
            notes.append("broken: its shared state failed a consistency check")
            depth = None
        if U32.unpack_from(buf, PID_OVERFLOW_OFFSET)[0]:
            notes.append("pid table overflowed: the attached pids are incomplete")
        return SegmentInfo(
            SEGMENT_KIND,
            name,
            seg.size,
            depth,
            pids,
            creator_pid=creator,
            format_version=version,
            note="; ".join(notes),
        )
    finally:
        seg.close()


def remove_segment(name: str) -> bool:
    """Unlink segment ``name`` (and its sidecar lock file where there is one); True if it existed."""
    removed = _segment.unlink(SEGMENT_KIND, name)
    if not OFD:
        try:
            os.unlink(lock_path(name))
        except FileNotFoundError:
            pass
    return removed
