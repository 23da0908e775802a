"""``sage``: SAGE's high-performance queue, built as meant: a lock-free MPMC ring in C11.

The ring lives in a named POSIX shared-memory segment (``/dev/shm/sageq-sage-<name>``,
mode 0600, created and unlinked through :mod:`sage_queue._segment`), so any process on
the host that holds the descriptor attaches to it. The C core
(``sage_queue/_core/sagering.c``, exposed as ``sage_queue._sage_core``) does the claims,
copies, blocking (bounded spin, then a futex on a shared word) and the recovery from
processes killed mid-operation; this module only serialises items and maps the segment.
The protocol is argued in ``sagering.h`` and ``sage_queue/_core/DESIGN.md``; the
normative text is ``spec/backends/sage.md``.

Item encoding (a 4-bit flag stored in each record, chosen here):

* ``bytes`` objects travel as their bytes, unpickled (one copy in, one copy out);
* everything else is pickled with protocol 5; out-of-band buffers (a large numpy array,
  a ``PickleBuffer``) are gathered into the same record next to the pickle, so they are
  copied once into the ring and once out (into a ``bytearray`` the unpickled object uses);
* :meth:`SAGEQueueStub.put_bytes` / :meth:`~SAGEQueueStub.get_bytes` are the raw mode:
  any bytes-like object in, ``bytes`` out, no pickling at all.

The C core is imported on first use only, so validating a ``sage`` descriptor never
loads it; a missing or unbuildable extension raises ``BackendUnavailable``.
"""

from __future__ import annotations

import importlib
import os
import pickle
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from .. import _segment
from .._timeout import normalize_timeout
from ..descriptor import QueueDescriptor
from ..errors import BackendUnavailable, IncompatibleQueue, QueueNotFound
from ..protocol import APPROXIMATE_QSIZE, BATCH, CLOSE, CROSS_PROCESS, PICKLABLE_HANDLE, STATS, QueueStats
from ..stub import QueueStub

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["SAGEQueueStub", "describe_segment", "remove_segment", "DEFAULT_CAPACITY_BYTES", "SEGMENT_KIND"]

SEGMENT_KIND = "sage"
DEFAULT_CAPACITY_BYTES = 16 << 20
"""Ring size when the descriptor does not say (16 MiB; tmpfs pages are only used once touched)."""
MIN_CAPACITY_BYTES = 1024
MAX_CAPACITY_BYTES = 1 << 31
"""A record's length is a 32-bit field."""

# Record format flags (4 bits, see the module docstring): defined once, in the C core, and
# bound here when the core is loaded (_core()); validating a descriptor never loads it (SAGE3).
FLAG_PICKLE: int
FLAG_BYTES: int
FLAG_PARTS: int
FLAG_RAW: int

_ATTACH_RETRIES = 50
_PICKLE_PROTOCOL = 5

_dumps = pickle.dumps
_NO_BUFFERS = frozenset({str, int, float, bool, type(None), complex})
_INBAND_FIRST = _NO_BUFFERS | {tuple, list, dict, set, frozenset}
_OOB_MIN = 1 << 16
"""A container pickled to at least this many bytes is pickled again with out-of-band buffers."""

_core_module: Any = None
_core_lock = threading.Lock()


def _core() -> Any:
    """The C extension, imported on first use (BackendUnavailable if it cannot load)."""
    global _core_module
    if _core_module is None:
        with _core_lock:
            if _core_module is None:
                try:
                    _sage_core = importlib.import_module("sage_queue._sage_core")
                except ImportError as exc:
                    raise BackendUnavailable(
                        "sage",
                        f"the C core sage_queue._sage_core ({exc})",
                        "build it with 'pip install .' or 'python setup.py build_ext --inplace'; "
                        "a C11 compiler is needed (apt-get install gcc python3-dev)",
                    ) from exc
                global FLAG_PICKLE, FLAG_BYTES, FLAG_PARTS, FLAG_RAW
                FLAG_PICKLE, FLAG_BYTES = _sage_core.FLAG_PICKLE, _sage_core.FLAG_BYTES
                FLAG_PARTS, FLAG_RAW = _sage_core.FLAG_PARTS, _sage_core.FLAG_RAW
                _core_module = _sage_core
    return _core_module


_open_handles: weakref.WeakSet[SAGEQueueStub] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child must not act with its parent's participant block: drop the copies
    # and attach anew under the child's pid.
    global _core_lock
    _core_lock = threading.Lock()
    for handle in list(_open_handles):
        handle._reattach_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SAGEQueueStub(QueueStub):
    """A handle on a ``sage`` ring (see the module docstring and ``spec/backends/sage.md``).

    ``put``/``get`` follow ``queue.Queue`` exactly; a blocked call spins briefly, then
    sleeps on a futex (no CPU while it sleeps), and raises ``QueueClosed`` within 0.1 s
    when this handle is closed (even by a signal handler that interrupted the call), or
    ``QueueDestroyed`` when the queue is destroyed through another handle. A segment
    found corrupt (a bounds check failed) raises ``QueueBroken`` on every handle. Any
    number of threads may share one handle. ``qsize()`` counts items whose
    put has claimed its room, including a put still copying (capability
    ``approximate_qsize``); it reflects every completed put and get.
    """

    queue_type: ClassVar[str] = "sage"
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {CROSS_PROCESS, PICKLABLE_HANDLE, BATCH, STATS, CLOSE, APPROXIMATE_QSIZE}
    )

    def __init__(self, descriptor: QueueDescriptor) -> None:
        super().__init__(descriptor)
        core = _core()
        meta = descriptor.metadata
        self._name: str = meta["shm_name"]
        self._want_maxsize: int = meta["maxsize"]
        self._want_capacity: int = core.round_capacity(meta["capacity_bytes"])
        self._segment: Optional[_segment.Segment] = None
        self._ring: Any = None
        self._attach(core, create=bool(meta["create"]))
        _open_handles.add(self)

    # -- attach -------------------------------------------------------------------------

    def _attach(self, core: Any, create: bool) -> None:
        size = core.segment_size(self._want_capacity)
        for _ in range(_ATTACH_RETRIES):
            seg = _segment.Segment.open(SEGMENT_KIND, self._name, size, create=create)
            try:
                ring = self._open_ring(core, seg)
            except _Retry:
                seg.close()
                time.sleep(0.002)
                continue
            except BaseException:
                seg.close()
                if seg.created:
                    seg.unlink()
                raise
            self._segment, self._ring = seg, ring
            return
        raise QueueNotFound(f"sage queue {self._name!r} kept being destroyed while attaching")

    def _open_ring(self, core: Any, seg: _segment.Segment) -> Any:
        if not seg.created:
            self._wait_initialised(core, seg)
            info = core.inspect(seg.buf)
            if "error" in info:
                raise IncompatibleQueue(f"sage queue {self._name!r}: {info['error']}")
            if info["destroyed"]:
                raise _Retry
            if info["capacity"] != self._want_capacity or info["maxsize"] != self._want_maxsize:
                raise IncompatibleQueue(
                    f"sage queue {self._name!r} has capacity_bytes={info['capacity']}, maxsize={info['maxsize']}; "
                    f"the descriptor says capacity_bytes={self._want_capacity}, maxsize={self._want_maxsize}"
                )
        try:
            return core.Ring(seg.buf, seg.created, self._want_capacity, self._want_maxsize, os.getpid())
        except ValueError as exc:
            raise IncompatibleQueue(f"sage queue {self._name!r}: {exc}") from None
        except RuntimeError as exc:
            raise IncompatibleQueue(f"sage queue {self._name!r}: {exc}") from None

    @staticmethod
    def _wait_initialised(core: Any, seg: _segment.Segment) -> None:
        # The creator ftruncates, then writes the header, the magic last: wait while the
        # magic is still 0; a wrong one is not a ring of ours (IncompatibleQueue at once).
        deadline = time.monotonic() + 2.0
        while core.inspect(seg.buf).get("initialising") and time.monotonic() < deadline:
            time.sleep(0.001)

    def _reattach_after_fork(self) -> None:
        if self._ring is None or self._closed:
            return
        self._ring.abandon()
        assert self._segment is not None
        self._ring = _core().Ring(self._segment.buf, False, self._want_capacity, self._want_maxsize, os.getpid())

    # -- the hooks ------------------------------------------------------------------------
    # The front (QueueStub) checks arguments and the closed flag, then calls these; the C
    # core checks the queue's destroyed and broken flags on every call.

    def _put(self, item: Any, timeout: Optional[float]) -> None:
        ring = self._ring
        kind = type(item)
        if kind is bytes:
            ring.put(item, FLAG_BYTES, timeout)
            return
        if kind in _INBAND_FIRST:
            # Plain values and containers: pickling without a buffer callback is cheaper,
            # and only a big result can hide an out-of-band buffer worth a second pass.
            data = _dumps(item, _PICKLE_PROTOCOL)
            if kind in _NO_BUFFERS or len(data) < _OOB_MIN:
                ring.put(data, FLAG_PICKLE, timeout)
                return
        buffers: list[pickle.PickleBuffer] = []
        data = _dumps(item, _PICKLE_PROTOCOL, buffer_callback=buffers.append)
        if buffers:
            ring.put_parts([data, *buffers], FLAG_PARTS, timeout)
        else:
            ring.put(data, FLAG_PICKLE, timeout)

    def _get(self, timeout: Optional[float]) -> Any:
        return self._ring.get_item(timeout)

    def _put_many(self, items: list[Any], timeout: Optional[float]) -> None:
        if 0 < self.maxsize < len(items):
            raise ValueError(f"a batch of {len(items)} items can never fit in a queue of maxsize {self.maxsize}")
        # one contiguous claim; each item pickled in-band (bytes objects raw) by the core
        self._ring.put_items(items, timeout)

    def _get_many(self, max_items: int, timeout: Optional[float]) -> list[Any]:
        # An item that fails to unpickle after good ones: the good ones are returned, its
        # error is raised by this handle's next get-type call (SAGE14).
        items: list[Any] = self._ring.get_items(max_items, timeout)
        return items

    def _qsize(self) -> int:
        return int(self._ring.depth())

    def _stats(self) -> QueueStats:
        puts, gets, bytes_in, bytes_out, waits, abandoned, depth, capacity, errors = self._ring.stats()
        return QueueStats(
            scope="queue",
            puts=puts,
            gets=gets,
            depth=depth,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            waits=waits,
            abandoned=abandoned,
            capacity_bytes=capacity,
            errors=errors,
        )

    def _close(self) -> None:
        ring, seg = self._ring, self._segment
        # The ring lets go of the mapping at once, or (an operation still in flight: another
        # thread's, or this thread's own when a signal handler closes the queue) when that
        # operation ends; the mapping is then unmapped with this object.
        released = ring.close() if ring is not None else True
        if seg is not None and released:
            seg.close()

    def _destroy(self) -> None:
        self._ring.destroy()
        assert self._segment is not None
        self._segment.unlink()

    # -- raw mode -----------------------------------------------------------------------------

    def put_bytes(self, data: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Put the bytes of ``data`` (any bytes-like object) without pickling; blocks like :meth:`put`.

        Another handle's :meth:`get` returns them as ``bytes``.
        """
        seconds = normalize_timeout(block, timeout)
        self._check_open()
        self._ring.put(data, FLAG_RAW, seconds)

    def get_bytes(self, block: bool = True, timeout: Optional[float] = None) -> bytes:
        """Like :meth:`get`; the item must have been put as bytes (``put_bytes`` or a ``bytes`` item).

        Raises ``TypeError`` (and the item is consumed) if the oldest item was pickled.
        """
        seconds = normalize_timeout(block, timeout)
        self._check_open()
        record = self._ring.get(seconds, FLAG_PARTS)
        if record[0] not in (FLAG_BYTES, FLAG_RAW):
            raise TypeError("get_bytes() found a pickled item; use get()")
        data: bytes = record[1]
        return data

    def put_many_bytes(self, datas: Iterable[Any], block: bool = True, timeout: Optional[float] = None) -> None:
        """``put_many`` in raw mode: every element is a bytes-like object, none is pickled."""
        seconds = normalize_timeout(block, timeout)
        batch = list(datas)
        self._check_open()
        if batch:
            self._ring.put_many(batch, bytes([FLAG_RAW]) * len(batch), seconds)


def __getattr__(name: str) -> Any:
    # FLAG_* are the C core's constants, bound by _core(); reading one from outside before
    # any handle exists loads the core (PEP 562 module __getattr__).
    if name in ("FLAG_PICKLE", "FLAG_BYTES", "FLAG_PARTS", "FLAG_RAW"):
        return getattr(_core(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Retry(Exception):
    """The segment was destroyed while attaching: open the name again."""


def describe_segment(name: str) -> _segment.SegmentInfo:
    """What ``sage-queue ls`` shows of segment ``name``; never attaches, never modifies it."""
    core = _core()
    seg = _segment.Segment.open(SEGMENT_KIND, name, 0, create=False)
    try:
        info = core.inspect(seg.buf)
        if "error" in info:
            return _segment.SegmentInfo(SEGMENT_KIND, name, seg.size, None, (), note=info["error"])
        notes = []
        if info["destroyed"]:
            notes.append("destroyed, still mapped by some process")
        if info["broken"] or info["depth"] is None:
            notes.append("broken: corrupt header (spec E15)")
        depth = info["depth"]
        return _segment.SegmentInfo(
            SEGMENT_KIND,
            name,
            seg.size,
            None if depth is None else int(depth),
            tuple(info["pids"]),
            creator_pid=int(info["creator_pid"]),
            format_version=int(info["version"]),
            note="; ".join(notes),
        )
    finally:
        seg.close()


def remove_segment(name: str) -> bool:
    """Unlink segment ``name`` (``sage-queue gc``); True if it existed."""
    return _segment.unlink(SEGMENT_KIND, name)
