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

import argparse
import errno
import importlib
import json
import math
import os
import re
import secrets
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Optional, TextIO, Union

from ._segment import pid_alive
from .descriptor import QueueDescriptor
from .errors import (
    BackendUnavailable,
    DescriptorError,
    QueueDestroyed,
    QueueNotFound,
    QueuePermissionError,
)
from .log import get_logger
from .protocol import STATS, QueueStats
from .registry import type_schema
from .resolve import resolve_descriptor

if TYPE_CHECKING:
    import http.server

__all__ = [
    "JobEntry",
    "QueueSample",
    "Sampler",
    "Source",
    "jobs_dir",
    "metrics_main",
    "publish_job",
    "read_job",
    "render_openmetrics",
    "running_jobs",
    "sample_queue",
    "sources",
    "stale_jobs",
    "stale_temp_files",
    "top_main",
    "unpublish_job",
]

log = get_logger(__name__)

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
    consumers: Mapping[str, int] = field(default_factory=dict)
    """Queue name -> number of consumer workers, for the queues whose publisher said."""


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


def _pid_namespace() -> Optional[str]:
    """This process's pid namespace (``pid:[inode]``, Linux), in which its pids mean something; None if unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _alive(pid: int, pid_start: Optional[int]) -> bool:
    """Whether process ``pid`` runs (a zombie does not: ``_segment.pid_alive``) and, when ``pid_start`` is
    known, is the one started then."""
    if not pid_alive(pid):
        return False
    if pid_start is None:
        return True
    now = _start_time(pid)
    return now is None or now == pid_start


def publish_job(
    name: str,
    descriptors: Mapping[str, QueueDescriptor],
    *,
    pid: Optional[int] = None,
    consumers: Optional[Mapping[str, int]] = None,
) -> Path:
    """Publish job ``name`` and its queues' descriptors; return the registry file's path.

    ``pid`` is the job's process (default: this one); the entry counts as running while it
    lives. ``consumers`` optionally says how many consumer workers read each queue (shown by
    ``sage-queue top``). The file appears whole (written aside, then renamed) with mode 0600. Raises
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
        "consumers": {str(k): int(v) for k, v in (consumers or {}).items()},
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
    log.info(
        "published job %s (pid %d, %d queues) at %s",
        name,
        pid,
        len(queues),
        final,
        extra={"job": name, "pid": pid, "path": str(final)},
    )
    return final


def read_job(path: Union[str, Path]) -> JobEntry:
    """The entry in registry file ``path``.

    Raises QueuePermissionError when the file is not ours, not a regular file or
    group/world-writable; FileNotFoundError when it is gone; ValueError when it is not a
    job file of this format.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO named like a job file would block the open until a writer came (top, metrics
        # and gc hung on it); it opens at once, and is refused below as not a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | _O_NOFOLLOW)
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
        consumers = data.get("consumers") or {}
        if not isinstance(consumers, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in consumers.values()
        ):
            raise ValueError("bad consumers")
        if not isinstance(name, str) or isinstance(pid, bool) or not isinstance(pid, int):
            raise ValueError("bad name or pid")
        if not isinstance(started, (int, float)) or not isinstance(queues, dict):
            raise ValueError("bad start time or queues")
        if pid_start is not None and not isinstance(pid_start, int):
            raise ValueError("bad pid_start")
        texts = {str(k): json.dumps(v) for k, v in queues.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a job file: {exc}") from None
    return JobEntry(name, pid, float(started), texts, path, pid_start, {str(k): v for k, v in consumers.items()})


def running_jobs(name: Optional[str] = None, *, refused: Optional[list[str]] = None) -> list[JobEntry]:
    """The published jobs whose process is alive (all, or those named ``name``), oldest first.

    A stale entry (its process dead, or its pid reused by a younger process) is removed.
    An entry that cannot be trusted or read is skipped, never removed: its reason is
    appended to ``refused`` when a list is given (and logged at WARNING). Raises
    QueuePermissionError when the registry directory itself is not trusted.
    """
    found, _ = _scan_registry(refused, remove_stale=True)
    return [e for e in found if name is None or e.name == name]


def stale_jobs(*, remove: bool = False) -> list[JobEntry]:
    """The published entries whose process is dead (or whose pid was reused): what a manager killed
    by SIGKILL left behind. ``remove=True`` removes them (``sage-queue gc``); untrusted or
    unreadable entries are neither returned nor removed."""
    _, stale = _scan_registry(None, remove_stale=remove)
    return stale


STALE_TEMP_AGE_S = 3600.0
"""A half-written job file (``.tmp-*.json``) this old is a publisher's that died before renaming it."""


def stale_temp_files(*, remove: bool = False, min_age: float = STALE_TEMP_AGE_S) -> list[Path]:
    """The registry's half-written job files (``.tmp-*.json``, regular files of ours) untouched for
    ``min_age`` seconds: a publisher killed between writing and renaming one (a rename takes
    microseconds). ``remove=True`` removes them (``sage-queue gc``)."""
    directory = jobs_dir(create=False)
    if directory is None:
        return []
    found = []
    now = time.time()
    for path in sorted(directory.glob(".tmp-*.json")):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or now - st.st_mtime < min_age:
            continue
        if remove and not _unlink(path):
            continue
        found.append(path)
    return found


def _scan_registry(refused: Optional[list[str]], *, remove_stale: bool) -> tuple[list[JobEntry], list[JobEntry]]:
    """(live entries oldest first, stale entries); the stale ones removed when ``remove_stale``."""
    directory = jobs_dir(create=False)
    if directory is None:
        return [], []
    found, stale = [], []
    for path in sorted(directory.glob("*.json")):
        if path.name.startswith(".tmp-"):
            continue
        try:
            entry = read_job(path)
        except FileNotFoundError:  # unpublished meanwhile
            continue
        except (QueuePermissionError, ValueError, OSError) as exc:
            log.warning("job registry: skipped %s: %s", path, exc, extra={"path": str(path)})
            if refused is not None:
                refused.append(str(exc))
            continue
        if not _alive(entry.pid, entry.pid_start):
            if remove_stale:
                log.info(
                    "job registry: removing stale entry %s (pid %d is gone)",
                    path,
                    entry.pid,
                    extra={"job": entry.name, "pid": entry.pid, "path": str(path)},
                )
                _unlink(path)
            stale.append(entry)
            continue
        found.append(entry)
    found.sort(key=lambda e: (e.started, e.name))
    return found, stale


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
            log.info("unpublished job entry %s", path, extra={"path": str(path)})
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
        log.info("unpublished job %s (%d entries)", path_or_name, count, extra={"job": path_or_name})
    return count


# -- sampling --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A queue to watch: its job (None for a descriptor given directly), its name and descriptor JSON."""

    job: Optional[str]
    queue: str
    descriptor: str
    consumers: Optional[int] = None
    """Consumer workers reading the queue, when its job published the number."""
    pid: Optional[int] = None
    """The job's process (None for a descriptor given directly)."""


OK, GONE, NO_STATS, UNAVAILABLE, ERROR = "ok", "gone", "no stats", "unavailable", "error"
SAMPLE_TIMEOUT_S = 2.0
"""The longest a sample waits for a network backend's server (its connect and retry timeouts)."""


@dataclass(frozen=True)
class QueueSample:
    """One look at one queue. ``stats`` is None unless ``state`` is ``"ok"``.

    ``state``: ``ok``; ``gone`` (the queue does not exist, or was destroyed); ``no stats``
    (its backend does not declare the capability); ``unavailable`` (its backend cannot be
    loaded, or looking would create the queue); ``error`` (anything else; see ``detail``).
    Rates and ``stalled`` compare with the previous sample of the same queue
    (:class:`Sampler`); they are None for a first sample, across a restart of the counters,
    and for counters kept per handle (``scope == "handle"``: a monitor's own handle saw nothing).
    """

    source: Source
    queue_type: str
    time: float
    """``time.monotonic()`` when the sample was taken."""
    state: str
    stats: Optional[QueueStats] = None
    detail: str = ""
    puts_per_s: Optional[float] = None
    gets_per_s: Optional[float] = None
    stalled: Optional[bool] = None
    """True when items waited (depth > 0) and no get happened since the previous sample."""


def _queue_type(text: str) -> str:
    try:
        value = json.loads(text).get("queue_type", "?")
    except (ValueError, AttributeError):
        return "?"
    return str(value)


def _attach_only(desc: QueueDescriptor) -> tuple[Optional[QueueDescriptor], str]:
    """``desc`` changed so that resolving it never creates the queue, or (None, why) if no such change exists.

    A type whose schema has a ``create`` key (shm, sage, rpc) gets ``create=False``. A
    ``local`` queue is reachable only in its own process and is looked up there first. A Ray
    queue is looked up by name in the cluster first, its tombstone read (never starting a
    cluster to look); Ray has no attach-only call, so a queue destroyed between that look and
    the attach can still be made again, empty: the window is one round trip.
    """
    schema = type_schema(desc.queue_type)
    keys = set() if schema is None else {f.name for f in schema.fields}
    if "create" in keys:
        metadata = {**desc.metadata, "create": False}
        # A monitor must not sit for a network backend's default waits (rpc: 10 s to connect,
        # 30 s of silence) on every refresh when a server is down: it says so sooner.
        for key in ("connect_timeout", "retry_timeout"):
            if key in keys:
                metadata[key] = min(float(metadata.get(key, SAMPLE_TIMEOUT_S)), SAMPLE_TIMEOUT_S)
        data = desc.to_dict()
        data["metadata"] = metadata
        return QueueDescriptor.from_dict(data), ""
    if desc.queue_type == "local":
        if desc.metadata.get("owner_pid") != os.getpid():
            return desc, ""  # resolving raises QueueNotFound: nothing is created in another process
        local = importlib.import_module("sage_queue.backends.local")
        if desc.queue_id in local.live_queue_ids():
            return desc, ""
        raise QueueNotFound(f"local queue {desc.queue_id!r} does not exist in this process")
    if desc.queue_type in ("ray_queue", "ray_actor"):
        _ray_exists(desc)
        return desc, ""
    return None, f"a {desc.queue_type} queue cannot be looked at without possibly creating it"


def _ray_exists(desc: QueueDescriptor) -> None:
    """QueueNotFound unless the queue's named actor exists; never starts a Ray instance to look."""
    rayb = importlib.import_module("sage_queue.backends._ray")  # BackendUnavailable without Ray
    md = dict(desc.metadata)
    if not rayb.ray.is_initialized() and not (md.get("address") or os.environ.get("RAY_ADDRESS")):
        raise BackendUnavailable(
            desc.queue_type, "a Ray cluster to look in", "set RAY_ADDRESS (or the descriptor's address)"
        )
    rayb.connect(desc.queue_type, md)
    try:
        actor = rayb.ray.get_actor(rayb.full_name(desc.queue_type, md), namespace=rayb.namespace_of(md))
    except ValueError:  # Ray's answer for "no actor of that name"
        raise QueueNotFound(f"{desc.queue_type} queue {md.get('actor_name')!r}: no such actor") from None
    # Destroyed but its name not yet released: resolving now would wait for the name and create a
    # new actor under it (RAY3), so the tombstone destroy() wrote is read first (RAY8).
    if rayb.was_destroyed(desc.queue_type, md, actor):
        raise QueueDestroyed(f"{desc.queue_type} queue {md.get('actor_name')!r} was destroyed")


def sample_queue(source: Source) -> QueueSample:
    """Look at one queue: attach without creating it, take ``stats()``, close the handle."""
    now = time.monotonic()
    queue_type = _queue_type(source.descriptor)
    try:
        desc, why = _attach_only(QueueDescriptor.from_json(source.descriptor))
        if desc is None:
            return QueueSample(source, queue_type, now, UNAVAILABLE, detail=why)
        queue_type = desc.queue_type
        handle = resolve_descriptor(desc)
        try:
            if STATS not in getattr(handle, "capabilities", frozenset()):
                return QueueSample(source, queue_type, now, NO_STATS, detail=f"{queue_type} keeps no statistics")
            stats: QueueStats = handle.stats()
        finally:
            handle.close()  # close, never destroy: the queue is the job's
    except (QueueNotFound, QueueDestroyed) as exc:
        return QueueSample(source, queue_type, now, GONE, detail=str(exc))
    except BackendUnavailable as exc:
        return QueueSample(source, queue_type, now, UNAVAILABLE, detail=str(exc))
    except Exception as exc:  # QueueBroken, a refused key, a connection error...: a row, never a crash
        log.info(
            "sampling %s/%s failed: %s",
            source.job,
            source.queue,
            exc,
            extra={"job": source.job, "queue": source.queue, "queue_type": queue_type},
        )
        return QueueSample(source, queue_type, now, ERROR, detail=f"{type(exc).__name__}: {exc}")
    return QueueSample(source, queue_type, now, OK, stats=stats)


def _with_rates(sample: QueueSample, previous: Optional[QueueSample]) -> QueueSample:
    cur, old = sample.stats, None if previous is None else previous.stats
    if cur is None or old is None or cur.scope != "queue" or old.scope != "queue":
        return sample
    dt = sample.time - previous.time  # type: ignore[union-attr]
    if dt <= 0 or cur.puts < old.puts or cur.gets < old.gets:  # counters restarted: a new queue
        return sample
    return QueueSample(
        sample.source,
        sample.queue_type,
        sample.time,
        sample.state,
        cur,
        sample.detail,
        (cur.puts - old.puts) / dt,
        (cur.gets - old.gets) / dt,
        cur.depth > 0 and cur.gets == old.gets,
    )


def sources(
    job: Optional[str] = None, descriptors: Sequence[str] = (), *, refused: Optional[list[str]] = None
) -> list[Source]:
    """The queues to watch: each descriptor JSON given, else the queues of the running jobs (named ``job``)."""
    if descriptors:
        out = []
        for text in descriptors:
            try:
                queue = QueueDescriptor.from_json(text).queue_id
            except DescriptorError:
                queue = "?"  # reported as an error when sampled
            out.append(Source(None, queue, text))
        return out
    return [
        Source(entry.name, queue, text, entry.consumers.get(queue), entry.pid)
        for entry in running_jobs(job, refused=refused)
        for queue, text in entry.descriptors.items()
    ]


class Sampler:
    """Samples queues repeatedly and computes rates and stalls between consecutive samples.

    Each :meth:`sample` resolves every queue anew and closes its handle again, so a monitor
    holds nothing open between samples (a job's teardown never waits for it). Not thread-safe.
    """

    def __init__(self) -> None:
        self._previous: dict[tuple[Optional[str], str, str], QueueSample] = {}

    def sample(self, watch: Iterable[Source]) -> list[QueueSample]:
        out = []
        seen = {}
        for source in watch:
            key = (source.job, source.queue, source.descriptor)
            sample = _with_rates(sample_queue(source), self._previous.get(key))
            seen[key] = sample
            out.append(sample)
        self._previous = seen  # queues no longer watched are forgotten
        return out


# -- OpenMetrics / Prometheus text -------------------------------------------------------------------


def _field(name: str) -> Callable[[QueueSample], Optional[float]]:
    def value(sample: QueueSample) -> Optional[float]:
        return None if sample.stats is None else getattr(sample.stats, name)

    return value


# (family, kind, help, value of a sample or None); counters' samples are named family + "_total".
_FAMILIES: tuple[tuple[str, str, str, Callable[[QueueSample], Optional[float]]], ...] = (
    (
        "sage_queue_up",
        "gauge",
        "1 if the queue could be sampled, 0 if it is gone or unreachable",
        lambda s: float(s.state in (OK, NO_STATS)),
    ),
    ("sage_queue_puts", "counter", "Items successfully enqueued", _field("puts")),
    ("sage_queue_gets", "counter", "Items successfully dequeued", _field("gets")),
    ("sage_queue_depth", "gauge", "Items in the queue", _field("depth")),
    (
        "sage_queue_bytes",
        "gauge",
        "Payload bytes in the queue (enqueued minus dequeued)",
        lambda s: _queued_bytes(s.stats),
    ),
    ("sage_queue_bytes_in", "counter", "Payload bytes enqueued", _field("bytes_in")),
    ("sage_queue_bytes_out", "counter", "Payload bytes dequeued", _field("bytes_out")),
    ("sage_queue_capacity_bytes", "gauge", "Size of the byte ring", _field("capacity_bytes")),
    ("sage_queue_waits", "counter", "Puts or gets that had to block", _field("waits")),
    (
        "sage_queue_errors",
        "counter",
        "Operations failed for a reason other than Empty, Full or closed",
        _field("errors"),
    ),
    ("sage_queue_abandoned", "counter", "Records abandoned by a dead writer or reader", _field("abandoned")),
    (
        "sage_queue_stalled",
        "gauge",
        "1 if items waited and nothing was got since the previous sample",
        lambda s: None if s.stalled is None else float(s.stalled),
    ),
)


def _queued_bytes(stats: Optional[QueueStats]) -> Optional[int]:
    if stats is None or stats.scope != "queue" or stats.bytes_in is None or stats.bytes_out is None:
        return None
    return max(0, stats.bytes_in - stats.bytes_out)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(sample: QueueSample, with_pid: bool) -> str:
    pairs = [] if sample.source.job is None else [("job", sample.source.job)]
    pairs += [("queue", sample.source.queue), ("type", sample.queue_type)]
    if with_pid:
        pairs.append(("pid", str(sample.source.pid)))
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and math.isfinite(value)):
        return str(int(value))
    return repr(float(value))


def render_openmetrics(samples: Iterable[QueueSample], *, openmetrics: bool = True) -> str:
    """The samples as OpenMetrics text (``openmetrics=False``: Prometheus text format 0.0.4).

    One family per field; a field that is None (unknown to the backend, or the queue not
    sampled) is left out, never written as 0. Labels: ``job`` (absent for a queue given by
    its descriptor), ``queue``, ``type``, and ``pid`` for jobs running twice under one name.
    OpenMetrics text ends with ``# EOF``.
    """
    samples = list(samples)
    # Two running jobs of one name would give two series the same labels (which a scraper
    # rejects): their samples get a ``pid`` label as well.
    keys = [(s.source.job, s.source.queue, s.queue_type) for s in samples]
    clash = {k for k in keys if keys.count(k) > 1}
    lines = []
    for family, kind, text, value_of in _FAMILIES:
        rows = []
        for s in samples:
            value = value_of(s)
            if value is None:
                continue
            rows.append((_labels(s, (s.source.job, s.source.queue, s.queue_type) in clash), value))
        if not rows:
            continue
        name = family + "_total" if kind == "counter" else family
        type_name = family if openmetrics else name
        lines.append(f"# TYPE {type_name} {kind}")
        lines.append(f"# HELP {type_name} {text}.")
        lines += [f"{name}{labels} {_number(value)}" for labels, value in rows]
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# -- sage-queue metrics ----------------------------------------------------------------------------


def _read_descriptor_args(values: Sequence[str]) -> list[str]:
    """DESCRIPTOR_JSON arguments: JSON text, or @FILE holding it (as ``sage-queue inspect``)."""
    out = []
    for value in values:
        if value.startswith("@"):
            with open(value[1:], encoding="utf-8") as f:
                value = f.read()
        out.append(value.strip())
    return out


def _write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it: a reader (a textfile
    collector) sees the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".sage-queue-metrics-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # metrics are for the collector to read
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def serve_metrics(
    port: int, watch: Callable[[], list[Source]], *, openmetrics: bool = True, host: str = "127.0.0.1"
) -> http.server.ThreadingHTTPServer:
    """An HTTP server (not yet serving: call ``serve_forever``) answering ``GET /metrics`` with a fresh sample
    of ``watch()``'s queues. Binds ``host`` (loopback unless told otherwise); port 0 picks a free port."""
    # Imported here: http.server brings http.client, email and ssl (~40 ms), which top, the job
    # registry and a JobManager publishing itself never need.
    import http.server

    sampler = Sampler()
    lock = threading.Lock()  # one scrape samples at a time: the Sampler keeps the previous samples
    content_type = OPENMETRICS_CONTENT_TYPE if openmetrics else PROMETHEUS_CONTENT_TYPE

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/metrics/"):
                self.send_error(404, "only /metrics is served")
                return
            try:
                with lock:
                    body = render_openmetrics(sampler.sample(watch()), openmetrics=openmetrics).encode()
            except Exception as exc:  # a registry refused, say: the scraper sees a 500, the server lives on
                log.warning("metrics: sampling failed: %s", exc)
                self.send_error(500, f"sampling failed: {exc}")
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet by default: the logging module decides
            log.debug("metrics: %s - %s", self.address_string(), format % args)

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def _until_signalled(server: http.server.ThreadingHTTPServer) -> None:
    """Serve in a thread until SIGINT or SIGTERM, then stop and close the server."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        stop.set()

    # Signal handlers can only be set from the main thread; elsewhere the caller's process ends it.
    in_main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM) if in_main else ()
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    thread = threading.Thread(target=server.serve_forever, name="sage-queue-metrics", daemon=True)
    thread.start()
    try:
        while not stop.wait(0.2):  # a bounded wait: the handler runs in this thread between waits
            if not thread.is_alive():
                break
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    """The arguments naming what ``metrics`` and ``top`` watch: descriptors, or ``--job NAME``."""
    parser.add_argument("descriptors", nargs="*", metavar="DESCRIPTOR_JSON", help="descriptor JSON text or @FILE")
    parser.add_argument("--job", metavar="NAME", help="only the queues of the running job(s) of this name")


def _check_source_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.job is not None and args.descriptors:
        parser.error("give --job NAME or descriptors, not both")


def _report_sources(command: str, refused: list[str], job: Optional[str], *, found: bool) -> bool:
    """Tells on stderr each source skipped (``refused``), and that no job named ``job`` runs when
    ``--job`` found nothing: True then (the command exits with status 1)."""
    for why in refused:
        print(f"sage-queue {command}: skipped: {why}", file=sys.stderr)
    if not found and job is not None:
        print(f"sage-queue {command}: no running job named {job!r}", file=sys.stderr)
        return True
    return False


def metrics_main(argv: Optional[list[str]] = None) -> int:
    """``sage-queue metrics [--job NAME | DESCRIPTOR_JSON ...] [--file PATH | --serve PORT]``."""
    parser = argparse.ArgumentParser(
        prog="sage-queue metrics",
        description="Export the stats of running jobs' queues (or of the queues given by descriptor) as "
        "OpenMetrics text: on stdout, into a file, or served over HTTP on 127.0.0.1.",
    )
    _add_source_args(parser)
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--file", metavar="PATH", help="write the text to PATH (atomically) instead of stdout")
    out.add_argument(
        "--serve", metavar="PORT", type=int, help="serve GET /metrics on 127.0.0.1:PORT until SIGINT/SIGTERM"
    )
    parser.add_argument(
        "--format",
        choices=("openmetrics", "prometheus"),
        default="openmetrics",
        help="OpenMetrics 1.0 (default) or Prometheus text format 0.0.4 (node_exporter's textfile collector)",
    )
    args = parser.parse_args(argv)
    _check_source_args(parser, args)
    if args.serve is not None and not 0 <= args.serve <= 65535:
        parser.error(f"--serve PORT must be in 0..65535, got {args.serve}")
    openmetrics = args.format == "openmetrics"
    try:
        descriptors = _read_descriptor_args(args.descriptors)
    except OSError as exc:
        print(f"sage-queue metrics: {exc}", file=sys.stderr)
        return 2
    refused: list[str] = []

    def watch() -> list[Source]:
        return sources(args.job, descriptors, refused=refused)

    if args.serve is not None:
        try:
            server = serve_metrics(args.serve, watch, openmetrics=openmetrics)
        except OSError as exc:
            print(f"sage-queue metrics: cannot listen on 127.0.0.1:{args.serve}: {exc}", file=sys.stderr)
            return 2
        port = server.server_address[1]
        print(f"serving {args.format} metrics on http://127.0.0.1:{port}/metrics (Ctrl-C stops)", flush=True)
        _until_signalled(server)
        return 0
    try:
        watched = watch()
    except QueuePermissionError as exc:
        print(f"sage-queue metrics: {exc}", file=sys.stderr)
        return 2
    if _report_sources("metrics", refused, args.job, found=bool(watched)):
        return 1
    if not watched:
        print("sage-queue metrics: no running job and no descriptor given: nothing to export", file=sys.stderr)
    text = render_openmetrics(Sampler().sample(watched), openmetrics=openmetrics)
    if args.file:
        try:
            _write_atomically(args.file, text)
        except OSError as exc:
            print(f"sage-queue metrics: cannot write {args.file}: {exc}", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    return 0


# -- sage-queue top --------------------------------------------------------------------------------

_COLUMNS = ("JOB", "QUEUE", "TYPE", "STATE", "DEPTH", "PUTS/S", "GETS/S", "CONS", "STALLED", "ERRORS")
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen: the frame is redrawn in place
_HIDE_CURSOR, _SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "STALLED" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_table(samples: Sequence[QueueSample], *, width: Optional[int] = None) -> str:
    """The ``top`` table: one row per sample (``-`` where a value is unknown); lines cut at ``width``."""
    rows = [_COLUMNS]
    notes = []
    for s in samples:
        st = s.stats
        rows.append(
            (
                s.source.job or "-",
                s.source.queue,
                s.queue_type,
                s.state,
                _cell(None if st is None else st.depth),
                _cell(s.puts_per_s),
                _cell(s.gets_per_s),
                _cell(s.source.consumers),
                _cell(s.stalled),
                _cell(None if st is None else st.errors),
            )
        )
        notes.append(s.detail if s.state != OK else "")
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for i, row in enumerate(rows):
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        if i and notes[i - 1]:
            line += f"  ({notes[i - 1]})"
        lines.append(line if width is None else line[:width])
    return "\n".join(lines)


def _terminal_width(stream: TextIO) -> Optional[int]:
    """Columns of the terminal (lines longer than that would wrap and spoil the redraw); None if unknown."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return None
    return columns if columns > 0 else None  # a pseudo-terminal nobody sized says 0


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def top_main(argv: Optional[list[str]] = None, *, out: Optional[TextIO] = None) -> int:
    """``sage-queue top [--job NAME] [DESCRIPTOR_JSON ...] [--interval S] [--once] [--iterations N]``."""
    parser = argparse.ArgumentParser(
        prog="sage-queue top",
        description="Watch the queues of running jobs (or the queues given by descriptor) live: depth, rates, "
        "consumers, stalls. Redraws in place on a terminal, prints one table per interval otherwise.",
    )
    _add_source_args(parser)
    parser.add_argument("--interval", type=_positive_float, default=1.0, metavar="S", help="seconds between samples")
    parser.add_argument("--once", action="store_true", help="print one sample and exit (rates need two: shown as -)")
    parser.add_argument("--iterations", type=_positive_int, metavar="N", help="stop after N samples")
    args = parser.parse_args(argv)
    _check_source_args(parser, args)
    stream = sys.stdout if out is None else out
    try:
        descriptors = _read_descriptor_args(args.descriptors)
        refused: list[str] = []
        watch = sources(args.job, descriptors, refused=refused)
    except (OSError, QueuePermissionError) as exc:
        print(f"sage-queue top: {exc}", file=sys.stderr)
        return 2
    if _report_sources("top", refused, args.job, found=bool(watch)):
        return 1
    if not watch:
        directory = _registry_root() / "jobs"
        print(f"no running sage-queue job (running jobs publish their queues in {directory})", file=stream)
        return 0
    iterations = 1 if args.once else args.iterations
    tty = stream.isatty()
    previous_term: Any = None
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:

        def on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
            raise KeyboardInterrupt("SIGTERM")

        previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    sampler = Sampler()
    done = 0
    try:
        if tty:
            stream.write(_HIDE_CURSOR)
        while True:
            samples = sampler.sample(watch)
            width = _terminal_width(stream) if tty else None
            title = f"sage-queue top  {time.strftime('%H:%M:%S')}  every {args.interval:g} s  {len(samples)} queue(s)"
            frame = title + "\n" + format_table(samples, width=width)
            stream.write(_CLEAR + frame + "\n" if tty else frame + "\n\n")
            stream.flush()
            done += 1
            if iterations is not None and done >= iterations:
                break
            time.sleep(args.interval)
            if not descriptors:  # jobs come and go: look at the registry again
                watch = sources(args.job)
                if not watch:
                    stream.write("the watched job(s) ended\n" if args.job else "no running sage-queue job left\n")
                    break
    except KeyboardInterrupt:
        pass
    finally:
        if tty:
            stream.write(_SHOW_CURSOR)
            stream.flush()
        if in_main:
            signal.signal(signal.SIGTERM, previous_term)
    return 0
