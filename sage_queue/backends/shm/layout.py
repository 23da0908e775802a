"""The ``shm`` segment layout: offsets, record format, and the stores that publish words.

One segment ``/dev/shm/sageq-shm-<name>`` (mode 0600, spec/segments.md)::

    0                 DATA_OFFSET (4096)                    DATA_OFFSET + capacity
    +-----------------+-----------------------------------------------+
    | header          | data ring: records end to end, wrapping round |
    +-----------------+-----------------------------------------------+

    header (native byte order, every word naturally aligned)
    off  size  field
      0     8  magic          b"SAGEQSHM", written last by the creator: usable once set
      8     4  version        LAYOUT_VERSION
     12     4  header_size    DATA_OFFSET
     16     8  capacity       bytes in the data ring (multiple of 8, <= 4 GiB)
     24     8  maxsize        item bound, 0 = bounded by bytes only
     32     8  instance       random u64 naming this incarnation of the name
     40     4  creator_pid
     44     4  state          bit 0 DESTROYED (destroy() ran), bit 1 BROKEN (a bounds check failed)
     48     4  pid_overflow   1 if some process could not be recorded in the pid table
    ---- producer line (written only under the producer lock) ----
     64     8  P word         (puts mod 2**32) << 32 | tail / 8     THE PRODUCER COMMIT WORD
     72     4  put_sleep_epoch  the gets count the last announced putter saw before sleeping
     76     4  put_waiters    putters announced asleep (a hint: may over-count after a kill)
     80    24  puts_wraps, -, put_waits   u64 statistics: puts = puts_wraps << 32 | P's count half
    104     8  put_woken      1 << 32 | the last getter sleep epoch a producer woke (0 = none yet)
    ---- consumer line (written only under the consumer lock) ----
    128     8  C word         (gets mod 2**32) << 32 | head / 8     THE CONSUMER COMMIT WORD
    136     4  get_sleep_epoch
    140     4  get_waiters
    144    24  gets_wraps, get_errors, get_waits   (get_errors: items got that did not unpickle)
    168     8  get_woken
    ---- ----
    320  1024  pid table      PID_SLOTS u32 pids of processes with the queue open (0 = free)

    record (at ring offset ``tail``, 8-aligned; the payload may wrap round the end)
    +------------+--------------------------+-----------+
    | u64 length | pickled payload (length) | pad to 8  |
    +------------+--------------------------+-----------+
    the length word never wraps (8-aligned in a ring whose size is a multiple of 8)

Invariants every reader checks (spec/backends/shm.md SHM15; a violation is QueueBroken):
``tail < capacity``, ``head < capacity``; the item count ``puts - gets (mod 2**32)`` is
at most ``used / 8`` and at most ``maxsize`` when that is > 0; ``count == 0`` iff the ring
is empty (``tail == head``); each record fits in the used bytes that remain, and the
records of ``count`` items end exactly at ``tail``.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

from ...errors import IncompatibleQueue

SEGMENT_KIND = "shm"
LAYOUT_VERSION = 1
MAGIC = b"SAGEQSHM"
DEFAULT_CAPACITY_BYTES = 1 << 20
"""Data ring size when the descriptor does not say (1 MiB)."""
MIN_CAPACITY_BYTES = 64
MAX_CAPACITY_BYTES = 1 << 32
"""Ring offsets are stored in 8-byte units in 32 bits."""
RECORD_HEADER = 8
"""Bytes of the length word in front of every record; records are padded to 8."""

MAGIC_OFFSET = 0  # 8s  magic, written last by the creator
VERSION_OFFSET = 8  # u32 LAYOUT_VERSION
HEADER_SIZE_OFFSET = 12  # u32 DATA_OFFSET
CAPACITY_OFFSET = 16  # u64 ring bytes
MAXSIZE_OFFSET = 24  # u64 item bound (0 = bytes only)
INSTANCE_OFFSET = 32  # u64 random id of this incarnation
CREATOR_PID_OFFSET = 40  # u32
STATE_OFFSET = 44  # u32 DESTROYED | BROKEN bits, only ever set
PID_OVERFLOW_OFFSET = 48  # u32 1 = the pid table is incomplete
P_WORD_OFFSET = 64  # u64 producer commit word
PUT_SLEEP_EPOCH_OFFSET = 72  # u32
PUT_WAITERS_OFFSET = 76  # u32
PUT_STATS_OFFSET = 80  # u64 puts_wraps, u64 pad (free), u64 put_waits
PUT_WOKEN_OFFSET = 104  # u64 1 << 32 | last consumer sleep epoch producers woke (0: none yet)
C_WORD_OFFSET = 128  # u64 consumer commit word
GET_SLEEP_EPOCH_OFFSET = 136  # u32
GET_WAITERS_OFFSET = 140  # u32
GET_STATS_OFFSET = 144  # u64 gets_wraps, u64 get_errors, u64 get_waits
GET_WOKEN_OFFSET = 168  # u64, as PUT_WOKEN_OFFSET
PID_TABLE_OFFSET = 320  # PID_SLOTS x u32
PID_SLOTS = 256
DATA_OFFSET = 4096  # first byte of the ring
WAITS_IN_STATS = 16  # offset of the waits counter inside a stats block
ERRORS_IN_STATS = 8  # offset of the errors counter inside the consumer's stats block
GET_ERRORS_OFFSET = GET_STATS_OFFSET + ERRORS_IN_STATS
"""u64 ``stats().errors``: items removed by a get/get_many whose unpickling raised (SHM9).

Same discipline as the other consumer-line statistics: written only under the consumer
lock (read-modify-write with ``store64``, so it wraps and never tears), after the commit
that removed the item, so a consumer killed between the two misses that one count
(SHM12). Readers (``stats()``) read it without the lock: a stale value is an older count.
The word was the zero padding of layout version 1 before it was a counter, and the
version did not change: a handle of an older release never writes it and does not
report it (its ``errors`` is None), so an old handle's undecodable items are not
counted; the zero in a segment created by an older release is a correct start.
"""

DESTROYED = 1
BROKEN = 2

_HIGH_HALF = 4 if sys.byteorder == "little" else 0
PUT_SEQ_OFFSET = P_WORD_OFFSET + _HIGH_HALF
"""The futex word getters sleep on: the puts half of the P word, which every put changes."""
GET_SEQ_OFFSET = C_WORD_OFFSET + _HIGH_HALF
"""The futex word putters sleep on: the gets half of the C word."""

U32 = struct.Struct("I")
U64 = struct.Struct("Q")
STATS3 = struct.Struct("3Q")
FIXED = struct.Struct("8sIIQQQII")  # magic .. state: the fields written once by the creator
PIDS = struct.Struct(f"{PID_SLOTS}I")
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF

assert FIXED.size == PID_OVERFLOW_OFFSET
assert P_WORD_OFFSET % 64 == 0 and C_WORD_OFFSET % 64 == 0, "each side's words on their own cache line"
assert GET_WOKEN_OFFSET + 8 <= PID_TABLE_OFFSET
assert GET_ERRORS_OFFSET % 8 == 0 and C_WORD_OFFSET < GET_ERRORS_OFFSET < C_WORD_OFFSET + 64, "on the consumer line"
assert PID_TABLE_OFFSET + 4 * PID_SLOTS <= DATA_OFFSET
assert DATA_OFFSET % 8 == 0 and MIN_CAPACITY_BYTES % 8 == 0
assert (MAX_CAPACITY_BYTES >> 3) - 1 <= MASK32, "a ring offset / 8 fits the low half of a commit word"


def validate(buf: Any, size: int, name: str, want_capacity: int, want_maxsize: int) -> None:
    """Check the fixed header of an initialised segment against the layout and the descriptor.

    Raises IncompatibleQueue naming the bad value (spec/backends/shm.md SHM4).
    """
    if size < DATA_OFFSET + MIN_CAPACITY_BYTES:
        raise IncompatibleQueue(f"segment {name!r} is {size} bytes: too small to be an shm queue")
    magic, version, header_size, capacity, maxsize = FIXED.unpack_from(buf, 0)[:5]
    if magic != MAGIC:
        raise IncompatibleQueue(f"segment {name!r} is not an shm queue (magic {magic!r}, expected {MAGIC!r})")
    if version != LAYOUT_VERSION or header_size != DATA_OFFSET:
        raise IncompatibleQueue(
            f"shm queue {name!r} has layout version {version} (header {header_size} bytes); "
            f"this library reads layout version {LAYOUT_VERSION}"
        )
    if size < DATA_OFFSET + capacity:
        raise IncompatibleQueue(f"shm queue {name!r}: a segment of {size} bytes cannot hold {capacity}")
    if capacity != want_capacity:
        raise IncompatibleQueue(f"shm queue {name!r} has capacity_bytes {capacity}, descriptor says {want_capacity}")
    if maxsize != want_maxsize:
        raise IncompatibleQueue(f"shm queue {name!r} has maxsize {maxsize}, descriptor says {want_maxsize}")


def record_size(payload_len: int) -> int:
    """Bytes a record of ``payload_len`` payload bytes takes in the ring."""
    return RECORD_HEADER + ((payload_len + 7) & ~7)


# Stores to shared words. NOT Struct.pack_into: it zero-fills the field before writing
# it, so another process (or a SIGKILL in between) could see the zeros. Slice assignment
# of the packed bytes is one memcpy, which for 4 and 8 aligned bytes writes the whole
# word at once (glibc copies 4..15 bytes with two possibly overlapping word moves,
# each carrying final values). Values are masked: a counter that wraps wraps, it never
# raises struct.error (a corrupt segment may hold any value).
def store32(buf: Any, offset: int, value: int) -> None:
    buf[offset : offset + 4] = U32.pack(value & MASK32)


def store64(buf: Any, offset: int, value: int) -> None:
    buf[offset : offset + 8] = U64.pack(value & MASK64)


def commit_word(count: int, offset: int) -> bytes:
    """The bytes of a commit word (P or C): ``count mod 2**32`` high, ``offset / 8`` low.

    Written with ``buf[word:word + 8] = commit_word(...)``: one aligned 8-byte store
    publishes a whole operation (see the handle's module docstring).
    """
    return U64.pack((count & MASK32) << 32 | offset >> 3)
