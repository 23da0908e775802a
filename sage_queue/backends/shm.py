"""``shm``: a pure-Python MPMC queue living in a named POSIX shared-memory segment.

Any process on the host that holds the descriptor (a ``subprocess`` given only the
JSON, a ``spawn`` child, a Ray worker) resolves it to a handle on the same queue.
Standard library only: ``mmap`` + ``struct`` for the segment, ``fcntl`` record locks,
and (Linux) a ``futex`` on a shared word through ``ctypes`` for sleeping. The normative
text is ``spec/backends/shm.md``; this docstring is the design.

Segment layout (one segment ``/dev/shm/sageq-shm-<name>``, mode 0600)::

    0      4096                                                   4096 + capacity
    +------+------------------------------------------------------+
    |header| data ring: records laid end to end, wrapping around  |
    +------+------------------------------------------------------+

    header (native byte order, every word naturally aligned)
      0  magic        b"SAGEQSHM", written last by the creator: usable once set
      8  version      LAYOUT_VERSION
     12  header_size  DATA_OFFSET
     16  capacity     bytes in the data ring (multiple of 8, <= 4 GiB)
     24  maxsize      item bound, 0 = bounded by bytes only
     32  instance     random u64 naming this incarnation of the name (attach race check)
     40  creator_pid
     44  destroyed    1 once destroy() ran: every handle raises QueueClosed
     48  pid_overflow 1 if some process could not be recorded in the pid table
    -- producer line (written only by producers, under the producer lock) --
     64  P word       (puts mod 2**32) << 32 | tail / 8   THE PRODUCER COMMIT WORD
     72  put_sleep_epoch  the gets count the last announced putter saw before sleeping
     76  put_waiters  putters that announced they sleep (a hint: may over-count after a kill)
     80  puts_wraps, -, put_waits    u64 statistics: puts = puts_wraps << 32 | P's count half
    104  get_woken    u64 1 << 32 | the last getter sleep epoch a producer woke (0 = none yet)
    -- consumer line (written only by consumers, under the consumer lock) --
    128  C word       (gets mod 2**32) << 32 | head / 8   THE CONSUMER COMMIT WORD
    136  get_sleep_epoch
    140  get_waiters
    144  gets_wraps, -, get_waits
    168  put_woken    u64, likewise
    320  pid table    PID_SLOTS u32 pids of processes with the queue open (0 = free)

    record (at ring byte offset ``tail``, 8-aligned; the payload may wrap around the end)
      u64 length | pickled payload | pad to 8

Two-lock queue. ``tail`` and ``head`` are byte offsets in the ring; the item count is
``puts - gets`` (mod 2**32), and the used bytes are ``tail - head`` (mod capacity), or
the whole ring when that is 0 and the count is not. Each side owns one 8-byte word and
publishes a whole operation with one aligned store of it:

* a producer (holding the producer lock) reads the C word, writes its records into
  free space, then stores the new P word (the commit);
* a consumer (holding the consumer lock) reads the P word, copies its records out,
  then stores the new C word (the commit); only then may producers reuse the bytes.

Crash consistency follows: a process killed before its commit store leaves the queue
exactly as it was (what it wrote is free space nobody reads); killed after it, the
operation is complete. Statistics are bumped after the commit and may miss the one
operation of a killed process. Reading the other side's word without its lock is safe
because it only ever moves forward, and a stale value is conservative (less data seen,
less room seen). That needs stores to become visible in program order (x86 TSO); on
other CPUs (``_TWO_LOCKS`` false) producers and consumers share one lock, whose system
calls order everything.

Locks: on a descriptor each handle opens on the segment file, producers take ``flock``
and consumers an open-file-description record lock (``F_OFD_SETLKW``, Linux >= 3.15) on
byte 1. Both kinds belong to the open file description, so two handles (even in one
process) exclude each other, and the kernel releases them when the holder dies, whatever
it was doing; on Linux the two kinds never interact. Threads sharing one handle share its
descriptor, so a ``threading.Lock`` per side and handle is taken first. A forked child
reopens its descriptor (``os.register_at_fork``) so it never shares a lock with its
parent. With one lock (other CPUs, macOS) both sides take the flock; on macOS it is taken
on a sidecar lock file.

Sleeping: a waiter that found no item (room) under its lock keeps the other side's
commit word it read there, polls that word briefly (SPIN_POLLS reads: a busy peer usually
commits within microseconds, which saves both sides a system call), then announces
itself under its lock (waiter count + 1, and the count half of that word as the *sleep
epoch*), unlocks, re-reads the word and, if unchanged, sleeps in ``FUTEX_WAIT`` on its
count half (the kernel returns at once if it moved). It withdraws the announcement in
its next locked section. The other side commits, unlocks (a system call: a full
barrier), then reads the waiter count, and calls ``FUTEX_WAKE`` (all) if it is not 0 and
the sleep epoch differs from the last epoch woken, which it records. So either the
waiter sees the commit or the waker sees the waiter, and a busy producer pays one
wake-up call per sleep of its consumer, not one per item. Sleeps are capped at
WAIT_SLICE_S: a waiter re-checks ``closed``/``destroyed`` and survives a waker killed
between commit and wake. Without futex (not Linux) a waiter polls the word with a
backoff growing to BACKOFF_MAX_S.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import platform
import queue
import secrets
import struct
import sys
import tempfile
import threading
import time
import weakref
from typing import Any, ClassVar, Optional

from .. import _segment
from .._segment import Segment, SegmentInfo, pid_alive
from .._timeout import Deadline, normalize_timeout
from ..descriptor import MetadataField, QueueDescriptor
from ..errors import BackendUnavailable, IncompatibleQueue, QueueClosed, QueueNotFound
from ..protocol import BATCH, CLOSE, CROSS_PROCESS, PICKLABLE_HANDLE, STATS, QueueStats
from ..stub import QueueStub

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SharedMemoryQueueStub", "describe_segment", "remove_segment",
    "DEFAULT_CAPACITY_BYTES", "LAYOUT_VERSION", "SEGMENT_KIND",
]

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

# -- header offsets (see the module docstring) ------------------------------------------
MAGIC_OFFSET = 0
VERSION_OFFSET = 8
CAPACITY_OFFSET = 16
MAXSIZE_OFFSET = 24
INSTANCE_OFFSET = 32
CREATOR_PID_OFFSET = 40
DESTROYED_OFFSET = 44
PID_OVERFLOW_OFFSET = 48
P_WORD_OFFSET = 64
PUT_SLEEP_EPOCH_OFFSET = 72
PUT_WAITERS_OFFSET = 76
PUT_STATS_OFFSET = 80       # u64 puts_wraps (puts // 2**32), pad, u64 put_waits
PUT_WOKEN_OFFSET = 104      # u64 1 << 32 | last consumer sleep epoch producers woke (0: none yet)
C_WORD_OFFSET = 128
GET_SLEEP_EPOCH_OFFSET = 136
GET_WAITERS_OFFSET = 140
GET_STATS_OFFSET = 144      # u64 gets_wraps, pad, u64 get_waits
GET_WOKEN_OFFSET = 168      # u64, as PUT_WOKEN_OFFSET
_HIGH_HALF = 4 if sys.byteorder == "little" else 0
PUT_SEQ_OFFSET = P_WORD_OFFSET + _HIGH_HALF
"""The futex word getters sleep on: the puts half of the P word, which every put changes."""
GET_SEQ_OFFSET = C_WORD_OFFSET + _HIGH_HALF
"""The futex word putters sleep on: the gets half of the C word."""
PID_TABLE_OFFSET = 320
PID_SLOTS = 256
DATA_OFFSET = 4096
assert PID_TABLE_OFFSET + 4 * PID_SLOTS <= DATA_OFFSET

_U32 = struct.Struct("I")
_U64 = struct.Struct("Q")
_STATS3 = struct.Struct("3Q")
_FIXED = struct.Struct("8sIIQQQII")  # magic, version, header_size, capacity, maxsize, instance, creator, destroyed
_PIDS = struct.Struct(f"{PID_SLOTS}I")
assert _FIXED.size == PID_OVERFLOW_OFFSET
_MASK32 = 0xFFFFFFFF


# Stores to shared words. NOT Struct.pack_into: it zero-fills the field before writing
# it, so another process (or a SIGKILL in between) could see the zeros. Slice assignment
# of the packed bytes is one memcpy, which for 4 and 8 aligned bytes writes the whole
# word at once (glibc copies 4..15 bytes with two possibly overlapping word moves,
# each carrying final values).
def _store32(buf: Any, offset: int, value: int) -> None:
    buf[offset:offset + 4] = _U32.pack(value)


def _store64(buf: Any, offset: int, value: int) -> None:
    buf[offset:offset + 8] = _U64.pack(value)

WAIT_SLICE_S = 0.25
"""Longest single sleep: bounds the reaction to close/destroy and to a waker killed before waking."""
SPIN_POLLS = 50
"""Reads of the other side's commit word before announcing a sleep (a few microseconds)."""
BACKOFF_MIN_S = 50e-6
BACKOFF_MAX_S = 0.005
"""Polling backoff where there is no futex."""
_ATTACH_RETRIES = 5
_INIT_WAIT_S = 2.0
"""How long an attacher waits for a concurrent creator to write the magic word."""
_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL

_TSO = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_OFD = sys.platform.startswith("linux") and fcntl is not None and hasattr(fcntl, "F_OFD_SETLKW")
_TWO_LOCKS = _TSO and _OFD
"""Producers and consumers lock separately (see the module docstring); else one lock."""
PRODUCER, CONSUMER = 0, 1 if _TWO_LOCKS else 0
"""Lock byte of each side."""


# -- futex (Linux) -----------------------------------------------------------------------

class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98, "i686": 240, "i386": 240, "ppc64le": 221, "s390x": 238}
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_WAKE_ALL = 0x7FFFFFFF


class _Futex:
    """``FUTEX_WAIT``/``FUTEX_WAKE`` on a u32 in a shared mapping (shared, not PRIVATE, futexes)."""

    def __init__(self, number: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._syscall.argtypes = [
            ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint,
        ]
        self._number = number

    def wait(self, address: int, expected: int, timeout: float) -> None:
        """Sleep while the word at ``address`` equals ``expected``, at most ``timeout`` s (GIL released)."""
        seconds = int(timeout)
        spec = _Timespec(seconds, int((timeout - seconds) * 1e9))
        # Return values do not matter: EAGAIN (word moved), ETIMEDOUT, EINTR, EFAULT (handle
        # closed under us) all mean "re-check under the lock", which the caller does.
        self._syscall(self._number, address, _FUTEX_WAIT, expected, ctypes.addressof(spec), None, 0)

    def wake(self, address: int, count: int) -> None:
        self._syscall(self._number, address, _FUTEX_WAKE, min(count, _WAKE_ALL), None, None, 0)


def _load_futex() -> Optional[_Futex]:
    if not sys.platform.startswith("linux") or os.environ.get("SAGE_QUEUE_SHM_NO_FUTEX"):
        return None
    number = _SYS_FUTEX.get(platform.machine())
    if number is None:
        return None
    try:
        return _Futex(number)
    except (OSError, AttributeError):
        return None


_FUTEX = _load_futex()


# -- locks ------------------------------------------------------------------------------

_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux: type, whence, start, len, pid
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 0)
_LOCK_REQ: list[bytes] = []
_UNLOCK_REQ: list[bytes] = []
if _OFD:
    _LOCK_REQ = [_FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, side, 1, 0) for side in (0, 1)]
    _UNLOCK_REQ = [_FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, side, 1, 0) for side in (0, 1)]


def _lock_path(name: str) -> str:
    """The file whose open file description carries the locks."""
    if _OFD:
        return _segment.segment_path(SEGMENT_KIND, name)
    # No OFD locks (macOS): POSIX shm descriptors support neither record locks nor pread
    # there, so flock a sidecar file.
    return os.path.join(tempfile.gettempdir(), f"{_segment.SEGMENT_PREFIX}{SEGMENT_KIND}-{name}.lock")


# Producers hold ``flock`` on the whole file; consumers an OFD record lock on byte 1 (one
# lock kind per side: on Linux flock and record locks never interact, and two sides on two
# lock lists of the inode contend less in the kernel than two records on one list: a
# lock/unlock pair measured 0.66-0.88 us against 1.2 us). With one lock (_TWO_LOCKS false)
# both sides take the flock. Hot paths call ``_LOCK_CALL[side](fd, _LOCK_ARG[side])`` and
# ``_LOCK_CALL[side](fd, _UNLOCK_ARG[side])`` directly, without a wrapper frame.
_flock: Any = getattr(fcntl, "flock", None)
_LOCK_EX: int = getattr(fcntl, "LOCK_EX", 0)
_LOCK_UN: int = getattr(fcntl, "LOCK_UN", 0)
_fcntl_call: Any = getattr(fcntl, "fcntl", None)


def _ofd_call(fd: int, request: bytes) -> None:
    _fcntl_call(fd, _F_OFD_SETLKW, request)


_LOCK_CALL: Any = (_flock, _ofd_call if _TWO_LOCKS else _flock)
_LOCK_ARG: Any = (getattr(fcntl, "LOCK_EX", 0), _LOCK_REQ[1] if _TWO_LOCKS else getattr(fcntl, "LOCK_EX", 0))
_UNLOCK_ARG: Any = (getattr(fcntl, "LOCK_UN", 0), _UNLOCK_REQ[1] if _TWO_LOCKS else getattr(fcntl, "LOCK_UN", 0))


def _os_lock(fd: int, side: int) -> None:
    """Take the kernel lock of ``side`` on ``fd`` (blocking; the GIL is released while waiting)."""
    if _flock is None:  # pragma: no cover - Windows
        raise BackendUnavailable("shm", "fcntl", "the shm backend needs a POSIX system (Linux, macOS)")
    _LOCK_CALL[side](fd, _LOCK_ARG[side])


def _os_unlock(fd: int, side: int) -> None:
    _LOCK_CALL[side](fd, _UNLOCK_ARG[side])


# -- per-process bookkeeping --------------------------------------------------------------

_process_lock = threading.Lock()
_registrations: dict[tuple[str, int], int] = {}
"""(name, instance) -> open handles in this process; our pid is in the table while > 0."""
_open_handles: weakref.WeakSet[SharedMemoryQueueStub] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child shares the parent's lock descriptors (one open file description): were the
    # parent killed holding a lock, our copy would keep it held. Reopen, and record our pid.
    global _process_lock
    _process_lock = threading.Lock()
    _registrations.clear()
    for handle in list(_open_handles):
        handle._reopen_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)



def _record_size(payload_len: int) -> int:
    return RECORD_HEADER + ((payload_len + 7) & ~7)


class _Retry(Exception):
    """The segment vanished or was replaced while attaching."""


class SharedMemoryQueueStub(QueueStub):
    """A handle on a named shared-memory queue (see the module docstring and spec/backends/shm.md)."""

    queue_type: ClassVar[str] = "shm"
    capabilities: ClassVar[frozenset[str]] = frozenset({CROSS_PROCESS, PICKLABLE_HANDLE, CLOSE, BATCH, STATS})
    metadata_fields: ClassVar[tuple[MetadataField, ...]] = _segment.segment_metadata_fields(
        default_capacity=DEFAULT_CAPACITY_BYTES, min_capacity=MIN_CAPACITY_BYTES,
        max_capacity=MAX_CAPACITY_BYTES, capacity_doc="bytes in the data ring",
    )

    def __init__(self, descriptor: QueueDescriptor) -> None:
        super().__init__(descriptor)
        meta = descriptor.metadata
        self._name: str = meta["shm_name"]
        self._want_maxsize: int = meta["maxsize"]
        self._want_capacity: int = (meta["capacity_bytes"] + 7) & ~7
        # One thread lock per side: threads of this handle share its descriptor, hence its
        # OFD locks, so they must exclude each other before asking the kernel.
        self._thread_locks = (threading.Lock(), threading.Lock()) if _TWO_LOCKS else (threading.Lock(),) * 2
        self._lock_fd = -1
        self._segment: Optional[Segment] = None
        for _ in range(_ATTACH_RETRIES):
            try:
                self._attach(create=bool(meta["create"]))
                break
            except _Retry:
                continue
        else:
            raise QueueNotFound(f"shm queue {self._name!r} kept disappearing while attaching (destroyed concurrently)")
        _open_handles.add(self)

    # -- attach -----------------------------------------------------------------------

    def _attach(self, create: bool) -> None:
        seg = Segment.open(SEGMENT_KIND, self._name, DATA_OFFSET + self._want_capacity, create=create)
        try:
            if seg.created:
                self._initialise(seg)
            else:
                self._wait_initialised(seg)
            self._check_layout(seg)
            if _U32.unpack_from(seg.buf, DESTROYED_OFFSET)[0]:
                raise _Retry
            instance = _U64.unpack_from(seg.buf, INSTANCE_OFFSET)[0]
            lock_fd = self._open_lock_fd(seg.file_id)
        except BaseException:
            # A segment we created but never marked usable is ours alone: do not leave it behind.
            abandoned = seg.created and seg.buf[MAGIC_OFFSET:MAGIC_OFFSET + 8] != MAGIC
            seg.close()
            if abandoned:
                seg.unlink()
            raise
        self._segment = seg
        self._buf = seg.buf
        self._lock_fd = lock_fd
        self._file_id = seg.file_id
        self._instance = instance
        self._capacity: int = _U64.unpack_from(seg.buf, CAPACITY_OFFSET)[0]
        self._maxsize_bound: int = _U64.unpack_from(seg.buf, MAXSIZE_OFFSET)[0]
        base = ctypes.c_char.from_buffer(seg.buf)
        self._base_address = ctypes.addressof(base)
        del base  # keep the address only: a live export would make mmap.close() fail
        self._register_pid()

    def _initialise(self, seg: Segment) -> None:
        # The segment is zero-filled by ftruncate (both commit words 0 = empty); write the
        # fixed fields, then the magic last: attachers use the segment only once it is set.
        _FIXED.pack_into(
            seg.buf, 0, b"\0" * 8, LAYOUT_VERSION, DATA_OFFSET, self._want_capacity, self._want_maxsize,
            secrets.randbits(64), os.getpid(), 0,
        )
        if not _OFD:
            os.close(os.open(_lock_path(self._name), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        seg.buf[MAGIC_OFFSET:MAGIC_OFFSET + 8] = MAGIC

    def _wait_initialised(self, seg: Segment) -> None:
        deadline = time.monotonic() + _INIT_WAIT_S
        while seg.size >= DATA_OFFSET and seg.buf[MAGIC_OFFSET:MAGIC_OFFSET + 8] == b"\0" * 8:
            if time.monotonic() >= deadline:
                raise IncompatibleQueue(
                    f"shm queue {self._name!r} exists but its creator never finished initialising it "
                    "(creator died?); `sage-queue gc` removes it"
                )
            time.sleep(0.001)

    def _check_layout(self, seg: Segment) -> None:
        if seg.size < DATA_OFFSET + MIN_CAPACITY_BYTES:
            raise IncompatibleQueue(f"segment {self._name!r} is {seg.size} bytes: too small to be an shm queue")
        magic, version, header_size, capacity, maxsize = _FIXED.unpack_from(seg.buf, 0)[:5]
        if magic != MAGIC:
            raise IncompatibleQueue(f"segment {self._name!r} is not an shm queue (magic {magic!r}, expected {MAGIC!r})")
        if version != LAYOUT_VERSION or header_size != DATA_OFFSET:
            raise IncompatibleQueue(
                f"shm queue {self._name!r} has layout version {version} (header {header_size} bytes); "
                f"this library reads layout version {LAYOUT_VERSION}"
            )
        if seg.size < DATA_OFFSET + capacity:
            raise IncompatibleQueue(f"shm queue {self._name!r}: a segment of {seg.size} bytes cannot hold {capacity}")
        if capacity != self._want_capacity:
            raise IncompatibleQueue(
                f"shm queue {self._name!r} has capacity_bytes {capacity}, descriptor says {self._want_capacity}"
            )
        if maxsize != self._want_maxsize:
            raise IncompatibleQueue(
                f"shm queue {self._name!r} has maxsize {maxsize}, descriptor says {self._want_maxsize}"
            )

    def _open_lock_fd(self, file_id: tuple[int, int]) -> int:
        """Open this handle's own descriptor for the locks (refused like the segment: SEG1)."""
        try:
            fd = _segment.open_trusted(_lock_path(self._name), SEGMENT_KIND, self._name)
        except FileNotFoundError:
            raise _Retry from None
        if _OFD:
            # The name may have been destroyed and re-created between mapping and opening:
            # make sure the file we lock is the segment we mapped.
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != file_id:
                os.close(fd)
                raise _Retry
        return fd

    def _reopen_after_fork(self) -> None:
        if self._closed or self._lock_fd < 0:
            return
        self._thread_locks = (threading.Lock(), threading.Lock()) if _TWO_LOCKS else (threading.Lock(),) * 2
        old, self._lock_fd = self._lock_fd, -1
        os.close(old)
        try:
            self._lock_fd = self._open_lock_fd(self._file_id)
        except (OSError, _Retry):  # destroyed (or replaced) meanwhile: unusable in the child
            self._closed = True
            return
        self._register_pid()

    # -- locking -----------------------------------------------------------------------

    def _acquire(self, side: int) -> None:
        """Take ``side``'s thread lock then its kernel lock; raise QueueClosed if closed."""
        lock = self._thread_locks[side]
        lock.acquire()
        try:
            if self._closed:  # close() may have released the descriptor and the mapping
                raise QueueClosed(f"shm queue handle {self._name!r} is closed")
            _os_lock(self._lock_fd, side)
        except BaseException:
            lock.release()
            raise

    def _release(self, side: int) -> None:
        try:
            _os_unlock(self._lock_fd, side)
        finally:
            self._thread_locks[side].release()

    def _check_destroyed(self) -> None:
        if _U32.unpack_from(self._buf, DESTROYED_OFFSET)[0]:
            raise QueueClosed(f"shm queue {self._name!r} was destroyed")

    # -- pid table (under the producer lock) -----------------------------------------------

    def _register_pid(self) -> None:
        key = (self._name, self._instance)
        with _process_lock:
            count = _registrations.get(key, 0)
            _registrations[key] = count + 1
            if count:
                return
            self._acquire(PRODUCER)
            try:
                self._write_pid_slot(os.getpid())
            finally:
                self._release(PRODUCER)

    def _write_pid_slot(self, pid: int) -> None:
        pids = _PIDS.unpack_from(self._buf, PID_TABLE_OFFSET)
        if pid in pids:
            return
        free = [i for i, p in enumerate(pids) if p == 0] or [i for i, p in enumerate(pids) if not pid_alive(p)]
        if free:
            _store32(self._buf, PID_TABLE_OFFSET + 4 * free[0], pid)
        else:
            _store32(self._buf, PID_OVERFLOW_OFFSET, 1)

    def _clear_pid_slot(self) -> None:
        pid = os.getpid()
        for i, p in enumerate(_PIDS.unpack_from(self._buf, PID_TABLE_OFFSET)):
            if p == pid:
                _store32(self._buf, PID_TABLE_OFFSET + 4 * i, 0)

    # -- waiting -----------------------------------------------------------------------

    def _wait(self, side: int, deadline: Deadline, seen: int) -> bool:
        """Called without locks after ``side`` found no room/item: return when worth retrying.

        Polls the other side's commit word briefly, then announces itself (waiter count,
        and the other side's count it saw as the sleep epoch) and sleeps on that word (see
        "Sleeping" in the module docstring). Returns True if it announced itself: the caller
        withdraws the announcement in its next locked section (saving a lock round trip).
        """
        buf = self._buf
        other_word = C_WORD_OFFSET if side == PRODUCER else P_WORD_OFFSET
        seq_offset, waiters_offset, epoch_offset, stats_offset = (
            (GET_SEQ_OFFSET, PUT_WAITERS_OFFSET, PUT_SLEEP_EPOCH_OFFSET, PUT_STATS_OFFSET + 16) if side == PRODUCER
            else (PUT_SEQ_OFFSET, GET_WAITERS_OFFSET, GET_SLEEP_EPOCH_OFFSET, GET_STATS_OFFSET + 16)
        )
        unpack_from = _U64.unpack_from
        # ``seen`` is the other side's word as the caller read it under its lock when it found
        # no item/room; a word read later could already include the commit we wait for, and
        # sleeping on it would miss that commit's wake-up.
        try:
            for _ in range(SPIN_POLLS):
                if unpack_from(buf, other_word)[0] != seen:
                    return False
        except ValueError:  # another thread closed the handle (unmapped): the caller raises QueueClosed
            return False
        if deadline.expired():
            return False
        self._acquire(side)
        try:
            self._check_destroyed()
            _store32(buf, waiters_offset, _U32.unpack_from(buf, waiters_offset)[0] + 1)
            _store32(buf, epoch_offset, seen >> 32)
            _store64(buf, stats_offset, _U64.unpack_from(buf, stats_offset)[0] + 1)
        finally:
            self._release(side)  # a system call: the announcement is visible before the read below
        try:
            if unpack_from(buf, other_word)[0] == seen:  # nothing committed since we looked
                self._sleep(seq_offset, seen >> 32, deadline)
        except ValueError:  # closed under us (see above)
            pass
        return True

    def _withdraw(self, waiters_offset: int) -> None:
        """Under the side's lock: undo one announcement of ``_wait``."""
        _store32(self._buf, waiters_offset, max(0, _U32.unpack_from(self._buf, waiters_offset)[0] - 1))

    def _wake_sleepers(self, waiters_offset: int, epoch_offset: int, woken_offset: int, seq_offset: int) -> None:
        """After our commit and unlock: wake the other side's sleepers, once per sleep epoch.

        Sleepers announced since the last wake carry a new epoch (the count they saw); a
        wake for an epoch already woken would find them awake already, so it is skipped:
        a busy producer does not pay a system call per item while its consumer wakes up.
        """
        buf = self._buf
        if _U32.unpack_from(buf, waiters_offset)[0]:
            # The woken word is u64 ``1 << 32 | epoch``, so its initial 0 matches no epoch.
            woken = 1 << 32 | _U32.unpack_from(buf, epoch_offset)[0]
            if woken != _U64.unpack_from(buf, woken_offset)[0]:
                _store64(buf, woken_offset, woken)
                self._wake(seq_offset, _WAKE_ALL)

    def _sleep(self, seq_offset: int, seen: int, deadline: Deadline) -> None:
        """Sleep until the word at ``seq_offset`` moves from ``seen``, WAIT_SLICE_S passes or the deadline."""
        remaining = deadline.remaining()
        slice_s = WAIT_SLICE_S if remaining is None else min(WAIT_SLICE_S, remaining)
        if slice_s <= 0:
            return
        if _FUTEX is not None:
            _FUTEX.wait(self._base_address + seq_offset, seen, slice_s)
            return
        end = time.monotonic() + slice_s
        pause = BACKOFF_MIN_S
        while time.monotonic() < end:
            if self._closed or _U32.unpack_from(self._buf, seq_offset)[0] != seen:  # ValueError if unmapped
                return
            time.sleep(pause)
            pause = min(pause * 2, BACKOFF_MAX_S)

    def _wake(self, seq_offset: int, count: int) -> None:
        if _FUTEX is not None:
            _FUTEX.wake(self._base_address + seq_offset, count)

    # -- hooks: put ----------------------------------------------------------------------

    # put/get: the front's checks in the same order (timeout, then closed), then one attempt
    # inlined for the common case (one record that does not wrap, room/item available).
    # Anything else (a wrap, a wait, a batch) goes through _put_records/_take, which hold
    # the general protocol. In a pure-Python queue the hot path is counted in calls.
    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        seconds = None if block is True and timeout is None else normalize_timeout(block, timeout)
        if self._closed:
            self._check_open()
        payload = pickle.dumps(item, _PICKLE_PROTOCOL)  # its errors leave the queue unchanged (Q18)
        length = len(payload)
        size = RECORD_HEADER + ((length + 7) & ~7)
        capacity = self._capacity
        if size > capacity:
            self._refuse_item(length, size)
        buf = self._buf
        unpack_u64 = _U64.unpack_from
        done = False
        thread_lock = self._thread_locks[PRODUCER]
        thread_lock.acquire()
        try:
            if self._closed:  # close() may have released the descriptor and the mapping
                raise QueueClosed(f"shm queue handle {self._name!r} is closed")
            fd = self._lock_fd
            _flock(fd, _LOCK_EX)
            try:
                if _U32.unpack_from(buf, DESTROYED_OFFSET)[0]:
                    raise QueueClosed(f"shm queue {self._name!r} was destroyed")
                p_word = unpack_u64(buf, P_WORD_OFFSET)[0]
                c_word = unpack_u64(buf, C_WORD_OFFSET)[0]  # stale is conservative
                tail = (p_word & _MASK32) << 3
                head = (c_word & _MASK32) << 3
                puts = p_word >> 32
                count = (puts - (c_word >> 32)) & _MASK32
                used = (tail - head) % capacity if (tail != head or not count) else capacity
                if used + size <= capacity and tail + size <= capacity and not 0 < self._maxsize_bound <= count:
                    _U64.pack_into(buf, DATA_OFFSET + tail, length)  # free space: not yet visible
                    start = DATA_OFFSET + tail + RECORD_HEADER
                    buf[start:start + length] = payload
                    tail += size
                    # Commit: one aligned 8-byte store publishes the record.
                    buf[P_WORD_OFFSET:P_WORD_OFFSET + 8] = _U64.pack(
                        ((puts + 1) & _MASK32) << 32 | (0 if tail == capacity else tail) >> 3
                    )
                    if puts == _MASK32:  # the 32-bit count wrapped: keep the 64-bit statistic
                        _store64(buf, PUT_STATS_OFFSET, unpack_u64(buf, PUT_STATS_OFFSET)[0] + 1)
                    done = True
            finally:
                _flock(fd, _LOCK_UN)
            # After the kernel unlock (see _put_records), before the thread lock's release
            # (which keeps close() from unmapping the buffer under us).
            if done and _U32.unpack_from(buf, GET_WAITERS_OFFSET)[0]:
                self._wake_sleepers(GET_WAITERS_OFFSET, GET_SLEEP_EPOCH_OFFSET, PUT_WOKEN_OFFSET, PUT_SEQ_OFFSET)
        finally:
            thread_lock.release()
        if not done:
            self._put_records((payload,), size, seconds)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        seconds = None if block is True and timeout is None else normalize_timeout(block, timeout)
        if self._closed:
            self._check_open()
        buf = self._buf
        unpack_u64 = _U64.unpack_from
        data = None
        thread_lock = self._thread_locks[CONSUMER]
        thread_lock.acquire()
        try:
            if self._closed:
                raise QueueClosed(f"shm queue handle {self._name!r} is closed")
            fd = self._lock_fd
            consumer_lock = _LOCK_CALL[CONSUMER]
            consumer_lock(fd, _LOCK_ARG[CONSUMER])
            try:
                if _U32.unpack_from(buf, DESTROYED_OFFSET)[0]:
                    raise QueueClosed(f"shm queue {self._name!r} was destroyed")
                c_word = unpack_u64(buf, C_WORD_OFFSET)[0]
                gets = c_word >> 32
                if ((unpack_u64(buf, P_WORD_OFFSET)[0] >> 32) - gets) & _MASK32:  # stale is conservative
                    head = (c_word & _MASK32) << 3
                    length = unpack_u64(buf, DATA_OFFSET + head)[0]
                    end = head + RECORD_HEADER + length
                    capacity = self._capacity
                    if end <= capacity:
                        data = buf[DATA_OFFSET + head + RECORD_HEADER:DATA_OFFSET + end]
                        head = (head + RECORD_HEADER + ((length + 7) & ~7)) % capacity
                        # Commit: from this store on, producers may reuse the bytes copied out.
                        buf[C_WORD_OFFSET:C_WORD_OFFSET + 8] = _U64.pack(((gets + 1) & _MASK32) << 32 | head >> 3)
                        if gets == _MASK32:
                            _store64(buf, GET_STATS_OFFSET, unpack_u64(buf, GET_STATS_OFFSET)[0] + 1)
            finally:
                _LOCK_CALL[CONSUMER](fd, _UNLOCK_ARG[CONSUMER])
            if data is not None and _U32.unpack_from(buf, PUT_WAITERS_OFFSET)[0]:  # as in put()
                self._wake_sleepers(PUT_WAITERS_OFFSET, PUT_SLEEP_EPOCH_OFFSET, GET_WOKEN_OFFSET, GET_SEQ_OFFSET)
        finally:
            thread_lock.release()
        if data is None:
            return pickle.loads(self._take(1, seconds)[0])
        return pickle.loads(data)

    def _refuse_item(self, length: int, size: int) -> None:
        raise ValueError(
            f"item pickles to {length} bytes ({size} with its record header); "
            f"the shm queue {self._name!r} holds at most {self._capacity} (capacity_bytes)"
        )

    def _put(self, item: Any, timeout: Optional[float]) -> None:
        payload = pickle.dumps(item, protocol=_PICKLE_PROTOCOL)  # its errors leave the queue unchanged (Q18)
        size = _record_size(len(payload))
        if size > self._capacity:
            raise ValueError(
                f"item pickles to {len(payload)} bytes ({size} with its record header); "
                f"the shm queue {self._name!r} holds at most {self._capacity} (capacity_bytes)"
            )
        self._put_records((payload,), size, timeout)

    def _put_many(self, items: list[Any], timeout: Optional[float]) -> None:
        payloads = [pickle.dumps(item, protocol=_PICKLE_PROTOCOL) for item in items]
        size = sum(_record_size(len(p)) for p in payloads)
        if size > self._capacity:
            raise ValueError(
                f"a batch of {len(items)} items needs {size} bytes; the shm queue {self._name!r} holds at most "
                f"{self._capacity} (capacity_bytes)"
            )
        if 0 < self._maxsize_bound < len(items):
            raise ValueError(
                f"a batch of {len(items)} items can never fit in a queue of maxsize {self._maxsize_bound}"
            )
        self._put_records(payloads, size, timeout)

    def _put_records(self, payloads: Any, size: int, timeout: Optional[float]) -> None:
        # Hot path: helpers are inlined (each Python call costs about as much as a system call).
        buf = self._buf
        capacity = self._capacity
        maxsize = self._maxsize_bound
        unpack_u64, unpack_u32, pack_u64 = _U64.unpack_from, _U32.unpack_from, _U64.pack
        thread_lock = self._thread_locks[PRODUCER]
        lock_call, lock_arg, unlock_arg = _LOCK_CALL[PRODUCER], _LOCK_ARG[PRODUCER], _UNLOCK_ARG[PRODUCER]
        n = len(payloads)
        deadline: Optional[Deadline] = None
        announced = committed = False
        while True:
            thread_lock.acquire()
            try:
                if self._closed:  # close() may have released the descriptor and the mapping
                    raise QueueClosed(f"shm queue handle {self._name!r} is closed")
                fd = self._lock_fd
                lock_call(fd, lock_arg)
                try:
                    if announced:
                        self._withdraw(PUT_WAITERS_OFFSET)
                        announced = False
                    if unpack_u32(buf, DESTROYED_OFFSET)[0]:
                        raise QueueClosed(f"shm queue {self._name!r} was destroyed")
                    p_word = unpack_u64(buf, P_WORD_OFFSET)[0]
                    c_word = unpack_u64(buf, C_WORD_OFFSET)[0]  # stale is conservative
                    puts, tail = p_word >> 32, (p_word & _MASK32) << 3
                    count = (puts - (c_word >> 32)) & _MASK32
                    head = (c_word & _MASK32) << 3
                    used = (tail - head) % capacity if (tail != head or not count) else capacity
                    if used + size <= capacity and not 0 < maxsize < count + n:
                        if n == 1 and tail + size <= capacity:  # the common case inlined
                            payload = payloads[0]
                            _U64.pack_into(buf, DATA_OFFSET + tail, len(payload))  # free space: not yet visible
                            start = DATA_OFFSET + tail + RECORD_HEADER
                            buf[start:start + len(payload)] = payload
                            pos = (tail + size) % capacity
                        else:
                            pos = tail
                            for payload in payloads:
                                pos = self._write_record(pos, payload)
                        # Commit: one aligned 8-byte store publishes every record above.
                        buf[P_WORD_OFFSET:P_WORD_OFFSET + 8] = pack_u64(((puts + n) & _MASK32) << 32 | pos >> 3)
                        if puts + n > _MASK32:  # the 32-bit count wrapped: keep the 64-bit statistic
                            _store64(buf, PUT_STATS_OFFSET, unpack_u64(buf, PUT_STATS_OFFSET)[0] + 1)
                        committed = True
                finally:
                    lock_call(fd, unlock_arg)
                # After the kernel unlock (a full barrier): a getter that announced itself before
                # our commit is seen here; one that announces later sees the commit (module
                # docstring). Still under the thread lock, so close() cannot unmap the buffer.
                if committed and unpack_u32(buf, GET_WAITERS_OFFSET)[0]:
                    self._wake_sleepers(GET_WAITERS_OFFSET, GET_SLEEP_EPOCH_OFFSET, PUT_WOKEN_OFFSET, PUT_SEQ_OFFSET)
            finally:
                thread_lock.release()
            if committed:
                return
            if deadline is None:
                deadline = Deadline(timeout)
            if deadline.expired():
                raise queue.Full
            announced = self._wait(PRODUCER, deadline, c_word)

    def _write_record(self, pos: int, payload: bytes) -> int:
        """Copy one record in at ring offset ``pos``; return the offset after it."""
        buf = self._buf
        capacity = self._capacity
        length = len(payload)
        _U64.pack_into(buf, DATA_OFFSET + pos, length)  # 8-aligned, so never split by the wrap
        start = pos + RECORD_HEADER
        if start == capacity:
            start = 0
        end = start + length
        if end <= capacity:
            buf[DATA_OFFSET + start:DATA_OFFSET + end] = payload
        else:
            first = capacity - start
            view = memoryview(payload)
            buf[DATA_OFFSET + start:DATA_OFFSET + capacity] = view[:first]
            buf[DATA_OFFSET:DATA_OFFSET + length - first] = view[first:]
        return (pos + _record_size(length)) % capacity

    # -- hooks: get ----------------------------------------------------------------------

    def _get(self, timeout: Optional[float]) -> Any:
        return pickle.loads(self._take(1, timeout)[0])

    def _get_many(self, max_items: int, timeout: Optional[float]) -> list[Any]:
        return [pickle.loads(payload) for payload in self._take(max_items, timeout)]

    def _take(self, max_items: int, timeout: Optional[float]) -> list[bytes]:
        # Hot path: helpers inlined, as in _put_records.
        buf = self._buf
        capacity = self._capacity
        unpack_u64, unpack_u32, pack_u64 = _U64.unpack_from, _U32.unpack_from, _U64.pack
        thread_lock = self._thread_locks[CONSUMER]
        lock_call, lock_arg, unlock_arg = _LOCK_CALL[CONSUMER], _LOCK_ARG[CONSUMER], _UNLOCK_ARG[CONSUMER]
        deadline: Optional[Deadline] = None
        announced = committed = False
        payloads: list[bytes] = []
        while True:
            thread_lock.acquire()
            try:
                if self._closed:
                    raise QueueClosed(f"shm queue handle {self._name!r} is closed")
                fd = self._lock_fd
                lock_call(fd, lock_arg)
                try:
                    if announced:
                        self._withdraw(GET_WAITERS_OFFSET)
                        announced = False
                    if unpack_u32(buf, DESTROYED_OFFSET)[0]:
                        raise QueueClosed(f"shm queue {self._name!r} was destroyed")
                    c_word = unpack_u64(buf, C_WORD_OFFSET)[0]
                    p_word = unpack_u64(buf, P_WORD_OFFSET)[0]  # stale is conservative
                    gets, head = c_word >> 32, (c_word & _MASK32) << 3
                    count = ((p_word >> 32) - gets) & _MASK32
                    if count:
                        taken = min(max_items, count)
                        pos = head
                        for _ in range(taken):
                            length = unpack_u64(buf, DATA_OFFSET + pos)[0]
                            start = pos + RECORD_HEADER
                            if start == capacity:
                                start = 0
                            end = start + length
                            if end <= capacity:
                                payloads.append(buf[DATA_OFFSET + start:DATA_OFFSET + end])
                            else:
                                payloads.append(
                                    buf[DATA_OFFSET + start:DATA_OFFSET + capacity]
                                    + buf[DATA_OFFSET:DATA_OFFSET + end - capacity]
                                )
                            pos = (pos + RECORD_HEADER + ((length + 7) & ~7)) % capacity
                        # Commit: from this store on, producers may reuse the bytes copied out.
                        buf[C_WORD_OFFSET:C_WORD_OFFSET + 8] = pack_u64(((gets + taken) & _MASK32) << 32 | pos >> 3)
                        if gets + taken > _MASK32:
                            _store64(buf, GET_STATS_OFFSET, unpack_u64(buf, GET_STATS_OFFSET)[0] + 1)
                        committed = True
                finally:
                    lock_call(fd, unlock_arg)
                if committed and unpack_u32(buf, PUT_WAITERS_OFFSET)[0]:  # as in _put_records
                    # Freed bytes may let several producers in (or none, if the first needs more).
                    self._wake_sleepers(PUT_WAITERS_OFFSET, PUT_SLEEP_EPOCH_OFFSET, GET_WOKEN_OFFSET, GET_SEQ_OFFSET)
            finally:
                thread_lock.release()
            if committed:
                return payloads
            if deadline is None:
                deadline = Deadline(timeout)
            if deadline.expired():
                raise queue.Empty
            announced = self._wait(CONSUMER, deadline, p_word)

    # -- hooks: the rest ------------------------------------------------------------------

    def _depth(self) -> int:
        # C before P: gets only trail puts, so the difference is never negative.
        gets: int = _U64.unpack_from(self._buf, C_WORD_OFFSET)[0] >> 32
        puts: int = _U64.unpack_from(self._buf, P_WORD_OFFSET)[0] >> 32
        return (puts - gets) & _MASK32

    def _qsize(self) -> int:
        with self._thread_locks[CONSUMER]:  # keeps close() from unmapping under us
            if self._closed:
                raise QueueClosed(f"shm queue handle {self._name!r} is closed")
            self._check_destroyed()
            return self._depth()

    def _stats(self) -> QueueStats:
        with self._thread_locks[CONSUMER]:
            if self._closed:
                raise QueueClosed(f"shm queue handle {self._name!r} is closed")
            self._check_destroyed()
            gets_wraps, _, get_waits = _STATS3.unpack_from(self._buf, GET_STATS_OFFSET)
            puts_wraps, _, put_waits = _STATS3.unpack_from(self._buf, PUT_STATS_OFFSET)
            gets = gets_wraps << 32 | _U64.unpack_from(self._buf, C_WORD_OFFSET)[0] >> 32
            puts = puts_wraps << 32 | _U64.unpack_from(self._buf, P_WORD_OFFSET)[0] >> 32
            depth = (puts - gets) & _MASK32
        return QueueStats(
            scope="queue", puts=puts, gets=gets, depth=depth,
            waits=put_waits + get_waits, abandoned=None, capacity_bytes=self._capacity,
        )

    @property
    def capacity_bytes(self) -> int:
        """Bytes in the data ring (``metadata["capacity_bytes"]`` rounded up to a multiple of 8)."""
        return self._capacity

    def _destroy(self) -> None:
        self._acquire(PRODUCER)
        try:
            if CONSUMER != PRODUCER:
                self._acquire(CONSUMER)
            try:
                if _U32.unpack_from(self._buf, DESTROYED_OFFSET)[0]:
                    return  # another handle destroyed it first: nothing left to do but close
                _store32(self._buf, DESTROYED_OFFSET, 1)
                # Unlink under both locks: no operation is half done, and nobody can attach to
                # this incarnation once the flag is set (attachers check it).
                remove_segment(self._name)
            finally:
                if CONSUMER != PRODUCER:
                    self._release(CONSUMER)
        finally:
            self._release(PRODUCER)
        self._wake(PUT_SEQ_OFFSET, _WAKE_ALL)
        self._wake(GET_SEQ_OFFSET, _WAKE_ALL)

    def _close(self) -> None:
        _open_handles.discard(self)
        if self._segment is None:
            return
        # This handle's sleepers re-check `closed` within WAIT_SLICE_S; wake them now instead.
        # (Sleepers of other handles wake too, find nothing changed, and sleep again.)
        self._wake(PUT_SEQ_OFFSET, _WAKE_ALL)
        self._wake(GET_SEQ_OFFSET, _WAKE_ALL)
        # Lock order everywhere: _process_lock -> thread locks -> kernel locks.
        with _process_lock:
            key = (self._name, self._instance)
            remaining = _registrations.get(key, 0) - 1
            if remaining > 0:
                _registrations[key] = remaining
            else:
                _registrations.pop(key, None)
            producer_lock, consumer_lock = self._thread_locks
            with producer_lock:  # once both are held, no operation of this handle is in the buffer
                with consumer_lock if consumer_lock is not producer_lock else _NO_LOCK:
                    if self._lock_fd >= 0:
                        try:
                            if remaining <= 0:
                                _os_lock(self._lock_fd, PRODUCER)
                                try:
                                    self._clear_pid_slot()
                                finally:
                                    _os_unlock(self._lock_fd, PRODUCER)
                        finally:
                            os.close(self._lock_fd)
                            self._lock_fd = -1
                    segment, self._segment = self._segment, None
                    if segment is not None:
                        segment.close()

    def __del__(self) -> None:
        # A handle dropped without close(): give back its pid slot and descriptor.
        if not getattr(self, "_closed", True) and getattr(self, "_segment", None) is not None:
            try:
                self.close()
            except Exception:  # interpreter shutdown: modules may be half torn down
                pass


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- ls / gc / inspect ------------------------------------------------------------------

def describe_segment(name: str) -> SegmentInfo:
    """What ``sage-queue ls`` shows of segment ``name``; never modifies it, never registers a pid.

    Reads without taking the queue's locks (a stopped process may hold them): the
    depth comes from the two commit words, which are always consistent.
    """
    seg = Segment.open(SEGMENT_KIND, name, 0, create=False)
    try:
        buf = seg.buf
        if seg.size < DATA_OFFSET + MIN_CAPACITY_BYTES:
            return SegmentInfo(SEGMENT_KIND, name, seg.size, None, (), note="too small to be an shm queue")
        magic, version, _hsize, _cap, _maxsize, _instance, creator, destroyed = _FIXED.unpack_from(buf, 0)
        if magic == b"\0" * 8:
            return SegmentInfo(
                SEGMENT_KIND, name, seg.size, None, (), creator_pid=creator or None,
                note="uninitialised (its creator died while creating it, or is creating it now)",
            )
        if magic != MAGIC:
            return SegmentInfo(SEGMENT_KIND, name, seg.size, None, (), note=f"not an shm queue (magic {magic!r})")
        if version != LAYOUT_VERSION:
            return SegmentInfo(
                SEGMENT_KIND, name, seg.size, None, (), creator_pid=creator, format_version=version,
                note=f"layout version {version}; this library reads {LAYOUT_VERSION}",
            )
        gets = _U64.unpack_from(buf, C_WORD_OFFSET)[0] >> 32
        puts = _U64.unpack_from(buf, P_WORD_OFFSET)[0] >> 32
        pids = tuple(p for p in _PIDS.unpack_from(buf, PID_TABLE_OFFSET) if p)
        notes = []
        if destroyed:
            notes.append("destroyed, still mapped by some process")
        if _U32.unpack_from(buf, PID_OVERFLOW_OFFSET)[0]:
            notes.append("pid table overflowed: the attached pids are incomplete")
        return SegmentInfo(
            SEGMENT_KIND, name, seg.size, (puts - gets) & _MASK32, pids, creator_pid=creator,
            format_version=version, note="; ".join(notes),
        )
    finally:
        seg.close()


def remove_segment(name: str) -> bool:
    """Unlink segment ``name`` (and its sidecar lock file where there is one); True if it existed."""
    removed = _segment.unlink(SEGMENT_KIND, name)
    if not _OFD:
        _remove_quietly(_lock_path(name))
    return removed
