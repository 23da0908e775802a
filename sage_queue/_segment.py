"""Named POSIX shared-memory segments, shared by the ``shm`` and ``sage`` backends.

One room for everything about the segment *file*: the name rules, exclusive
create versus attach, mode 0600, mapping, unlinking and listing. What lives
inside the segment (header, locks, ring) is each backend's own business.

Why not ``multiprocessing.shared_memory``: on Python < 3.13 every process that
attaches registers the segment with its ``resource_tracker``, which unlinks it
when that process exits (bpo-38119), destroying the queue under everyone else's
feet. We call ``_posixshmem`` (the same C functions, no tracker) directly, so a
segment is unlinked only by ``destroy()`` or ``sage-queue gc``.

Trust (spec/segments.md SEG1-SEG3): /dev/shm is world-writable, and items are
unpickled from the segment, so whoever can write it can run code in our consumers.
A segment is created with ``O_CREAT | O_EXCL`` and mode 0600, and an existing one is
opened with ``O_NOFOLLOW`` and then checked with ``fstat`` *on the opened descriptor*
(what we check is what we map): it must be a regular file owned by our effective uid
with no group/other permission bit, else ``QueuePermissionError``. Then only processes
of our own uid (or root) can have written it, and they can run code as us anyway.

Names: a user name matches ``[A-Za-z0-9_.-]{1,200}``; the segment is
``/sageq-<kind>-<name>`` (``/dev/shm/sageq-<kind>-<name>`` on Linux), so the
library's segments are recognisable and never collide across backends.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

from .errors import (
    BackendUnavailable,
    IncompatibleQueue,
    InvalidMetadata,
    QueueExists,
    QueueNotFound,
    QueuePermissionError,
)
from .metadata import check_segment_name

__all__ = [
    "SEGMENT_PREFIX",
    "SHM_DIR",
    "Segment",
    "SegmentInfo",
    "check_name",
    "check_trusted",
    "list_segments",
    "open_trusted",
    "pid_alive",
    "segment_path",
]

SEGMENT_PREFIX = "sageq-"
SHM_DIR = "/dev/shm"
"""Where Linux shows POSIX shared memory as files; absent on macOS (listing unsupported there)."""
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_ATTACH_WAIT_S = 2.0
"""How long an attacher waits for a concurrent creator to size the segment."""


def check_name(name: object) -> Optional[str]:
    """Error text for a bad user segment name, None if good (the descriptor's rule, D10)."""
    return check_segment_name(name)


def posix_name(kind: str, name: str) -> str:
    return f"/{SEGMENT_PREFIX}{kind}-{name}"


def segment_path(kind: str, name: str) -> str:
    """The file under /dev/shm that backs segment ``name`` of ``kind`` (Linux)."""
    return os.path.join(SHM_DIR, posix_name(kind, name)[1:])


def _posixshmem() -> Any:
    try:
        import _posixshmem
    except ImportError as exc:  # pragma: no cover - Windows
        raise BackendUnavailable("shm", "POSIX shared memory (_posixshmem)", "use Linux or macOS") from exc
    return _posixshmem


class Segment:
    """A mapped named segment. ``created`` tells whether this call made it."""

    def __init__(
        self, kind: str, name: str, buf: mmap.mmap, size: int, created: bool, file_id: tuple[int, int] = (0, 0)
    ) -> None:
        self.kind = kind
        self.name = name
        self.buf = buf
        self.size = size
        self.created = created
        self.file_id = file_id
        """``(st_dev, st_ino)`` of the file mapped: a later open by path is the same file iff it matches."""

    @classmethod
    def open(cls, kind: str, name: str, size: int, *, create: bool, exclusive: bool = False) -> Segment:
        """Create (``create=True``) or attach to segment ``name``.

        * ``create=True``: make a new zero-filled segment of ``size`` bytes, mode
          0600, or attach to an existing one (``exclusive=True``: QueueExists instead).
        * ``create=False``: attach only; QueueNotFound if there is none.

        ``size`` is ignored when attaching: the existing segment's size is used.
        """
        problem = check_name(name)
        if problem:
            raise InvalidMetadata(f"segment name {name!r} {problem}")
        shm = _posixshmem()
        pname = posix_name(kind, name)
        fd = -1
        created = False
        if create:
            try:
                # O_EXCL: never adopt a file somebody else placed under our name (SEG2).
                fd = shm.shm_open(pname, os.O_CREAT | os.O_EXCL | os.O_RDWR | _O_NOFOLLOW, mode=0o600)
                created = True
            except FileExistsError:
                if exclusive:
                    raise QueueExists(f"{kind} queue {name!r} already exists") from None
            except PermissionError as exc:
                raise _refused(kind, name, f"cannot create it ({exc.strerror})") from None
        if fd < 0:
            fd = _open_existing(shm, kind, name)
        try:
            if created:
                os.ftruncate(fd, size)
            else:
                size = _wait_for_size(fd, kind, name)
            buf = mmap.mmap(fd, size)
            st = os.fstat(fd)
        except BaseException:
            if created:
                _unlink_quietly(pname)
            raise
        finally:
            os.close(fd)
        return cls(kind, name, buf, size, created, (st.st_dev, st.st_ino))

    def close(self) -> None:
        """Unmap (idempotent). Raises BufferError while a memoryview of ``buf`` is alive."""
        if not self.buf.closed:
            self.buf.close()

    def unlink(self) -> bool:
        """Remove the name (the memory lives until every process unmaps it). True if it existed."""
        return _unlink_quietly(posix_name(self.kind, self.name))


def _refused(kind: str, name: str, why: str) -> QueuePermissionError:
    return QueuePermissionError(
        f"{kind} queue {name!r} (segment {segment_path(kind, name)}) may not be attached: {why}; "
        "only a segment owned by this user with mode 0600 is trusted (spec/segments.md SEG1-SEG3)"
    )


def check_trusted(fd: int, kind: str, name: str) -> os.stat_result:
    """fstat the opened ``fd`` and refuse it unless SEG1 holds; return the stat.

    On the descriptor, not the path: what we check is what we map (no TOCTOU).
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise _refused(kind, name, f"not a regular file (mode {stat.filemode(st.st_mode)})")
    if st.st_uid != os.geteuid():
        raise _refused(kind, name, f"owned by uid {st.st_uid}, not by this process's effective uid {os.geteuid()}")
    if st.st_mode & 0o077:
        raise _refused(kind, name, f"mode {st.st_mode & 0o777:04o} lets group/others in (must be 0600)")
    return st


def _open_existing(shm: Any, kind: str, name: str) -> int:
    """Open an existing segment read-write (O_NOFOLLOW) and check who may have written it (SEG1-SEG3)."""
    pname = posix_name(kind, name)
    try:
        fd: int = shm.shm_open(pname, os.O_RDWR | _O_NOFOLLOW, mode=0o600)
    except FileNotFoundError:
        raise QueueNotFound(f"no {kind} queue named {name!r} on this host (segment {pname} does not exist)") from None
    except PermissionError as exc:  # another user's segment we may not open
        raise _refused(kind, name, f"cannot open it ({exc.strerror})") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink: never follow one out of /dev/shm
            raise _refused(kind, name, "it is a symbolic link") from None
        # A directory planted under our name (glibc's shm_open turns EISDIR into EINVAL).
        if exc.errno in (errno.EISDIR, errno.EINVAL) and os.path.isdir(segment_path(kind, name)):
            raise _refused(kind, name, "it is a directory") from None
        raise
    return _trusted_or_closed(fd, kind, name)


def open_trusted(path: str, kind: str, name: str) -> int:
    """``os.open(path, O_RDWR)`` of a file of segment ``name`` (the segment itself, or a lock
    file), refused like the segment unless it is ours with mode 0600 (SEG1-SEG3).

    FileNotFoundError propagates (the caller knows what a missing file means).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | _O_NOFOLLOW)
    except PermissionError as exc:
        raise _refused(kind, name, f"cannot open {path} ({exc.strerror})") from None
    except IsADirectoryError:
        raise _refused(kind, name, f"{path} is a directory") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refused(kind, name, f"{path} is a symbolic link") from None
        raise
    return _trusted_or_closed(fd, kind, name)


def _trusted_or_closed(fd: int, kind: str, name: str) -> int:
    """``fd`` if :func:`check_trusted` accepts its file; else the fd is closed and the refusal raised."""
    try:
        check_trusted(fd, kind, name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _wait_for_size(fd: int, kind: str, name: str) -> int:
    # A creator opens then ftruncates: an attacher may see the file at size 0 for a moment.
    deadline = time.monotonic() + _ATTACH_WAIT_S
    while True:
        size = os.fstat(fd).st_size
        if size > 0:
            return size
        if time.monotonic() >= deadline:
            raise IncompatibleQueue(f"{kind} queue {name!r} exists but was never initialised (size 0)")
        time.sleep(0.001)


def _unlink_quietly(pname: str) -> bool:
    try:
        _posixshmem().shm_unlink(pname)
    except FileNotFoundError:
        return False
    return True


def unlink(kind: str, name: str) -> bool:
    """Unlink segment ``name`` of ``kind`` if it exists."""
    return _unlink_quietly(posix_name(kind, name))


def list_segments(kind: Optional[str] = None) -> Iterator[tuple[str, str]]:
    """``(kind, name)`` of every segment of this library on the host (Linux only)."""
    if not os.path.isdir(SHM_DIR):
        raise OSError(f"listing shared memory needs {SHM_DIR} (not available on {sys.platform})")
    for entry in sorted(os.listdir(SHM_DIR)):
        if not entry.startswith(SEGMENT_PREFIX):
            continue
        entry_kind, sep, name = entry[len(SEGMENT_PREFIX) :].partition("-")
        if sep and (kind is None or entry_kind == kind):
            yield entry_kind, name


_PID_MAX = 0x3FFFFFFF
"""Linux caps pids at 2**22 (PID_MAX_LIMIT); anything above is not a pid (and overflows kill())."""


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie (it may belong to another user).

    A zombie (dead, not yet reaped: under an init that never reaps, one stays for ever) is dead here:
    it holds no mapping, no lock, and runs nothing, as the C core's ``sr_pid_alive`` says too."""
    if not 0 < pid <= _PID_MAX:  # a pid read from a corrupt header: no such process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (kill(pid, 0) is all there is), or gone meanwhile
        return True
    return state not in (b"Z", b"X")


@dataclass(frozen=True)
class SegmentInfo:
    """What ``sage-queue ls`` shows of one segment; each segment backend's
    ``describe_segment(name) -> SegmentInfo`` fills it from its own header."""

    kind: str
    """Backend that owns the segment (``shm``, ``sage``)."""
    name: str
    """The user-visible name (``metadata["shm_name"]``)."""
    size: int
    """Bytes mapped."""
    depth: Optional[int]
    """Items in the queue, or None if the header could not be read consistently."""
    attached_pids: tuple[int, ...]
    """Processes that have the queue open (as recorded in the header)."""
    creator_pid: Optional[int] = None
    """Process that created the segment."""
    format_version: Optional[int] = None
    """Layout version found in the header."""
    note: str = ""
    """Anything odd (bad magic, destroyed flag set...)."""

    @property
    def orphan(self) -> bool:
        """True when no recorded process is alive: ``sage-queue gc`` may remove it."""
        return not any(pid_alive(pid) for pid in self.attached_pids)
