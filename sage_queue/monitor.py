"""Watching running jobs' queues: the job registry, sampling, ``sage-queue top`` and ``metrics``.

The job registry
----------------
A :class:`~sage_queue.job.JobManager` publishes its queues' descriptors when it starts
(:func:`publish_job`) and removes them at teardown (:func:`unpublish_job`), so that tools
in other processes can find them (:func:`running_jobs`). One JSON file per job, in a
per-user directory: ``$XDG_RUNTIME_DIR/sage-queue/jobs`` when that variable names a
directory, else ``/tmp/sage-queue-<uid>/jobs``.

Trust: the files say which queues a tool attaches to, and attaching to a segment unpickles
what is in it, so a file another user could have written is never used. Like a segment
(``sage_queue/_segment.py``, spec/segments.md SEG1-SEG3), the directories are made with mode
0700 and must be ours with no group/other bit; a file is written 0600 and, when read,
opened with ``O_NOFOLLOW`` and checked on the opened descriptor: a regular file owned by our
effective uid, not group/world-writable, else :class:`~sage_queue.errors.QueuePermissionError`.
A file is written to a temporary name and renamed, so a reader sees a whole file or none.

An entry whose process is dead (its pid gone, or reused by a process started later) is
stale: :func:`running_jobs` skips and removes it, so a killed job's entry does not linger.

Importing this module imports no backend: queues are resolved when they are sampled.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ._segment import pid_alive
from .descriptor import QueueDescriptor
from .errors import QueuePermissionError

__all__ = [
    "JobEntry",
    "jobs_dir",
    "publish_job",
    "read_job",
    "running_jobs",
    "unpublish_job",
]

log = logging.getLogger(__name__)

REGISTRY_VERSION = 1
"""Format version of a job file; a file of another version is refused (reported, not removed)."""
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


# -- the job registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobEntry:
    """One published job, as :func:`running_jobs` reads it."""

    name: str
    """The job's name, as given to :func:`publish_job` (several jobs may share one)."""
    pid: int
    """The process that runs the job (the JobManager's)."""
    started: float
    """When the job was published (Unix time, seconds)."""
    descriptors: Mapping[str, str]
    """Queue name -> the queue's descriptor as JSON text (parsed when the queue is sampled, so that
    a queue of a type unknown here does not hide the job's other queues)."""
    path: Path
    """The registry file; :func:`unpublish_job` accepts it."""
    pid_start: Optional[int] = None
    """The process's start time in clock ticks since boot (Linux), so that a reused pid is not
    taken for the job's process; None where unknown."""


def _refuse(path: Union[str, Path], why: str) -> QueuePermissionError:
    return QueuePermissionError(
        f"job registry entry {path} is not trusted: {why}; only files and directories owned by this user "
        "without group/other write permission are read (a job file says which queues to attach to)"
    )


def _registry_root() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return Path(runtime) / "sage-queue"
    return Path("/tmp") / f"sage-queue-{os.geteuid()}"


def _check_dir(path: Path) -> None:
    """Refuse ``path`` unless it is a real directory of ours with no group/other permission."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "not a directory (or a symbolic link)")
    if st.st_uid != os.geteuid():
        raise _refuse(path, f"owned by uid {st.st_uid}, not by this process's effective uid {os.geteuid()}")
    if st.st_mode & 0o077:
        raise _refuse(path, f"mode {st.st_mode & 0o777:04o} lets group/others in (must be 0700)")


def jobs_dir(create: bool = True) -> Optional[Path]:
    """The registry directory, checked (QueuePermissionError if it is not trusted).

    ``create=False`` returns None when it does not exist yet (nobody published a job).
    """
    root = _registry_root()
    jobs = root / "jobs"
    for path in (root, jobs):
        if create:
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
        elif not os.path.lexists(path):
            return None
        _check_dir(path)
    return jobs


def _start_time(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    fields = text[text.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22, starttime
    except (IndexError, ValueError):
        return None


def _alive(pid: int, pid_start: Optional[int]) -> bool:
    if not pid_alive(pid):
        return False
    if pid_start is None:
        return True
    now = _start_time(pid)
    return now is None or now == pid_start


def publish_job(name: str, descriptors: Mapping[str, QueueDescriptor], *, pid: Optional[int] = None) -> Path:
    """Publish job ``name`` and its queues' descriptors; return the registry file's path.

    ``pid`` is the job's process (default: this one); the entry counts as running while it
    lives. The file appears whole (written aside, then renamed) with mode 0600. Raises
    QueuePermissionError when the registry directory is not trusted, ValueError for an
    empty name, TypeError when a value is not a QueueDescriptor.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a job name must be a non-empty string, got {name!r}")
    queues: dict[str, Any] = {}
    for queue_name, desc in descriptors.items():
        if not isinstance(desc, QueueDescriptor):
            raise TypeError(f"queue {queue_name!r}: expected a QueueDescriptor, got {type(desc).__name__}")
        queues[str(queue_name)] = desc.to_dict()
    pid = os.getpid() if pid is None else int(pid)
    record = {
        "version": REGISTRY_VERSION,
        "name": name,
        "pid": pid,
        "pid_start": _start_time(pid),
        "started": time.time(),
        "queues": queues,
    }
    directory = jobs_dir(create=True)
    assert directory is not None
    final = directory / f"{_SAFE.sub('_', name)[:80]}-{pid}-{secrets.token_hex(4)}.json"
    # mkstemp: O_EXCL, mode 0600, in the same directory so that the rename is atomic.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    log.info("published job %s (pid %d, %d queues) at %s", name, pid, len(queues), final)
    return final


def read_job(path: Union[str, Path]) -> JobEntry:
    """The entry in registry file ``path``.

    Raises QueuePermissionError when the file is not ours, not a regular file or
    group/world-writable; FileNotFoundError when it is gone; ValueError when it is not a
    job file of this format.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | _O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(path, "it is a symbolic link") from None
        if isinstance(exc, PermissionError):
            raise _refuse(path, f"cannot open it ({exc.strerror})") from None
        raise
    with os.fdopen(fd, "rb") as f:
        # Checked on the opened descriptor: what we check is what we read (no TOCTOU).
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, "not a regular file")
        if st.st_uid != os.geteuid():
            raise _refuse(path, f"owned by uid {st.st_uid}, not by this process's effective uid {os.geteuid()}")
        if st.st_mode & 0o022:
            raise _refuse(path, f"mode {st.st_mode & 0o777:04o} lets group/others write it")
        raw = f.read()
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != REGISTRY_VERSION:
            raise ValueError(f"not a version-{REGISTRY_VERSION} job file")
        name, pid, started, queues = data["name"], data["pid"], data["started"], data["queues"]
        pid_start = data.get("pid_start")
        if not isinstance(name, str) or isinstance(pid, bool) or not isinstance(pid, int):
            raise ValueError("bad name or pid")
        if not isinstance(started, (int, float)) or not isinstance(queues, dict):
            raise ValueError("bad start time or queues")
        if pid_start is not None and not isinstance(pid_start, int):
            raise ValueError("bad pid_start")
        texts = {str(k): json.dumps(v) for k, v in queues.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a job file: {exc}") from None
    return JobEntry(name, pid, float(started), texts, path, pid_start)


def running_jobs(name: Optional[str] = None, *, refused: Optional[list[str]] = None) -> list[JobEntry]:
    """The published jobs whose process is alive (all, or those named ``name``), oldest first.

    A stale entry (its process dead, or its pid reused by a younger process) is removed.
    An entry that cannot be trusted or read is skipped, never removed: its reason is
    appended to ``refused`` when a list is given (and logged at WARNING). Raises
    QueuePermissionError when the registry directory itself is not trusted.
    """
    directory = jobs_dir(create=False)
    if directory is None:
        return []
    found = []
    for path in sorted(directory.glob("*.json")):
        if path.name.startswith(".tmp-"):
            continue
        try:
            entry = read_job(path)
        except FileNotFoundError:  # unpublished meanwhile
            continue
        except (QueuePermissionError, ValueError, OSError) as exc:
            log.warning("job registry: skipped %s: %s", path, exc)
            if refused is not None:
                refused.append(str(exc))
            continue
        if not _alive(entry.pid, entry.pid_start):
            log.info("job registry: removing stale entry %s (pid %d is gone)", path, entry.pid)
            _unlink(path)
            continue
        if name is None or entry.name == name:
            found.append(entry)
    found.sort(key=lambda e: (e.started, e.name))
    return found


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def unpublish_job(path_or_name: Union[str, os.PathLike[str]]) -> int:
    """Remove a published job; return how many entries were removed (0 if none: idempotent).

    A path (``os.PathLike``, as :func:`publish_job` returns) removes that entry; it must be in
    the registry directory (ValueError otherwise). A ``str`` is a job name: every entry
    published under that name is removed, whichever process published it.
    """
    directory = jobs_dir(create=False)
    if directory is None:
        return 0
    if isinstance(path_or_name, os.PathLike):
        path = Path(path_or_name)
        if path.parent.resolve() != directory.resolve() or path.suffix != ".json":
            raise ValueError(f"{path} is not a job file of the registry {directory}")
        removed = _unlink(path)
        if removed:
            log.info("unpublished job entry %s", path)
        return int(removed)
    count = 0
    for path in sorted(directory.glob("*.json")):
        try:
            entry = read_job(path)
        except (QueuePermissionError, ValueError, OSError):
            continue
        if entry.name == path_or_name and _unlink(path):
            count += 1
    if count:
        log.info("unpublished job %s (%d entries)", path_or_name, count)
    return count
