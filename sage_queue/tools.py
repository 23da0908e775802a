"""``sage-queue ls``, ``gc`` and ``inspect``: this library's shared-memory segments, seen from outside.

Each segment backend module (``sage_queue.backends.shm``, whose functions live in
``sage_queue/backends/shm/segments.py``, and ``sage_queue.backends.sage``) provides
``describe_segment(name) -> SegmentInfo``, which reads the segment's header
without attaching to the queue (no pid recorded, nothing modified). These commands list
``/dev/shm/sageq-<kind>-<name>`` (Linux), ask the owning backend to describe each, and
print or act on the result.

``inspect DESCRIPTOR_JSON`` works for every queue type, with no transport installed; with
``--stats`` it also attaches to the queue the way ``sage-queue top`` does (never creating it)
and shows its ``stats()``, or that it is gone.

``gc`` removes a segment only when it is an *orphan*: every pid recorded in its header
is dead (a zombie, dead but never reaped, counts as dead), its backend could describe it, it does not say its pid
list is incomplete, and it is older than ``--min-age`` seconds (a segment whose creator
is still writing its header has no pid yet).

``gc`` also removes what a job manager killed by SIGKILL leaves behind (spec/job.md JOB20):
its key directory ``$TMPDIR/sageq-job-*`` once the owner record in it says that its manager
is dead, and its stale entry in the job registry (``sage_queue.monitor.stale_jobs``). Its
shm/sage queues are orphans once its workers are gone (they exit within about a second of
their manager, JOB1). Only directories of our uid, mode 0700, not symbolic links, with an
owner record that is ours are judged by that record; anything else is left alone.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Optional

from . import _segment, monitor
from ._segment import SegmentInfo
from .descriptor import QueueDescriptor
from .errors import DescriptorError, QueuePermissionError
from .job import JOB_DIR_OWNER, JOB_DIR_PREFIX

__all__ = [
    "ls_main",
    "gc_main",
    "inspect_main",
    "describe",
    "collect_orphans",
    "collect_job_dirs",
    "job_dirs",
    "JobDirInfo",
    "SEGMENT_MODULES",
]

SEGMENT_MODULES = {"shm": "sage_queue.backends.shm", "sage": "sage_queue.backends.sage"}
"""Segment kind -> module providing ``describe_segment`` (and optionally ``remove_segment``)."""

_INCOMPLETE = "incomplete"
"""Word a backend puts in ``SegmentInfo.note`` when its pid list may miss live processes."""


def _backend_module(kind: str) -> Any:
    target = SEGMENT_MODULES.get(kind)
    if target is None:
        raise LookupError(f"no backend owns segments of kind {kind!r} (known: {', '.join(SEGMENT_MODULES)})")
    return importlib.import_module(target)


def describe(kind: str, name: str) -> SegmentInfo:
    """The backend's description of segment ``name``; a bare record with a note if it cannot give one."""
    try:
        module = _backend_module(kind)
        describe_segment: Callable[[str], SegmentInfo] = module.describe_segment
    except (ImportError, LookupError, AttributeError) as exc:
        return SegmentInfo(kind, name, _file_size(kind, name), None, (), note=f"cannot describe: {exc}")
    try:
        return describe_segment(name)
    except Exception as exc:  # vanished, unreadable, not ours: show it, never crash the listing
        return SegmentInfo(kind, name, _file_size(kind, name), None, (), note=f"cannot describe: {exc}")


def _file_size(kind: str, name: str) -> int:
    try:
        return os.stat(_segment.segment_path(kind, name)).st_size
    except OSError:
        return 0


def _age(kind: str, name: str) -> float:
    try:
        return time.time() - os.stat(_segment.segment_path(kind, name)).st_mtime
    except OSError:
        return 0.0


def _all_segments(kind: Optional[str]) -> list[SegmentInfo]:
    return [describe(k, n) for k, n in _segment.list_segments(kind)]


def _removable(info: SegmentInfo, min_age: float) -> Optional[str]:
    """Why ``info`` must be kept, or None if gc may remove it."""
    if info.note.startswith("cannot describe"):
        return info.note
    if _INCOMPLETE in info.note:
        return "its pid list is incomplete"
    live = [pid for pid in info.attached_pids if _segment.pid_alive(pid)]  # a zombie is dead there
    if live:
        return f"live pids {live}"
    age = _age(info.kind, info.name)
    if age < min_age:
        return f"younger than {min_age} s ({age:.1f} s): its creator may still be initialising it"
    return None


def collect_orphans(kind: Optional[str] = None, *, min_age: float = 2.0, dry_run: bool = False) -> list[SegmentInfo]:
    """Remove (unless ``dry_run``) every orphan segment; return the ones removed (or removable)."""
    removed = []
    for info in _all_segments(kind):
        if _removable(info, min_age) is not None:
            continue
        if not dry_run:
            module = _backend_module(info.kind)
            remove = getattr(module, "remove_segment", None)
            if remove is not None:
                remove(info.name)
            else:
                _segment.unlink(info.kind, info.name)
        removed.append(info)
    return removed


# -- a killed manager's key directory (JOB20) ----------------------------------------------------------

EMPTY_JOB_DIR_AGE_S = 3600.0
"""A key directory with no owner record is removed only when it is empty (its manager died between
making it and writing the record, microseconds) and untouched for this long; otherwise it is kept."""
_OWNER_TMP = "." + JOB_DIR_OWNER + ".tmp"
_MAX_OWNER_BYTES = 4096


@dataclass(frozen=True)
class JobDirInfo:
    """A job manager's key directory as ``sage-queue gc`` judges it."""

    path: str
    owner_pid: Optional[int]
    """The manager's pid from the owner record; None when there is no trusted record."""
    kept: Optional[str]
    """Why gc leaves it alone; None when it may be removed."""
    why: str = ""
    """Why it may be removed (when ``kept`` is None)."""


def _read_owner(dir_fd: int) -> Optional[tuple[int, Optional[int], Optional[str]]]:
    """(pid, start time, pid namespace) from the owner record in the directory ``dir_fd``; None when it has none;
    ValueError (naming the fault) when the record is not trusted or not one."""
    try:
        fd = os.open(JOB_DIR_OWNER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError("its owner record is a symbolic link") from None
        raise ValueError(f"its owner record cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        # Checked on the opened descriptor: what is checked is what is read.
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("its owner record is not a regular file")
        if st.st_uid != os.geteuid():
            raise ValueError(f"its owner record is owned by uid {st.st_uid}")
        if st.st_mode & 0o022:
            raise ValueError(f"its owner record has mode {st.st_mode & 0o777:04o} (group/others may write it)")
        raw = f.read(_MAX_OWNER_BYTES + 1)
    try:
        if len(raw) > _MAX_OWNER_BYTES:
            raise ValueError("too long")
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ValueError("not a version-1 owner record")
        pid, start = data["pid"], data.get("pid_start")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ValueError(f"bad pid {pid!r}")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int)):
            raise ValueError(f"bad pid_start {start!r}")
        namespace = data.get("pid_ns")
        if namespace is not None and not isinstance(namespace, str):
            raise ValueError(f"bad pid_ns {namespace!r}")
    except (KeyError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"its owner record is corrupt ({exc})") from None
    return pid, start, namespace


def _judge_job_dir(base: str, base_fd: int, name: str) -> JobDirInfo:
    path = os.path.join(base, name)
    try:
        st = os.stat(name, dir_fd=base_fd, follow_symlinks=False)
    except FileNotFoundError:
        return JobDirInfo(path, None, "gone meanwhile")
    if not stat.S_ISDIR(st.st_mode):
        return JobDirInfo(path, None, "not a directory (a symbolic link?): not a job manager's")
    if st.st_uid != os.geteuid():
        return JobDirInfo(path, None, f"owned by uid {st.st_uid}, not by us: never touched")
    if stat.S_IMODE(st.st_mode) != 0o700:
        return JobDirInfo(path, None, f"mode {stat.S_IMODE(st.st_mode):04o}, not 0700: not a job manager's")
    try:
        dir_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=base_fd)
    except OSError as exc:
        return JobDirInfo(path, None, f"cannot open it ({exc.strerror})")
    try:
        if (os.fstat(dir_fd).st_ino, os.fstat(dir_fd).st_dev) != (st.st_ino, st.st_dev):
            return JobDirInfo(path, None, "replaced while looked at")
        try:
            owner = _read_owner(dir_fd)
        except ValueError as exc:
            return JobDirInfo(path, None, f"{exc}: the owner decides")
        entries = set(os.listdir(dir_fd))
    finally:
        os.close(dir_fd)
    if owner is None:
        age = time.time() - st.st_mtime
        if entries <= {_OWNER_TMP} and age >= EMPTY_JOB_DIR_AGE_S:
            return JobDirInfo(path, None, None, f"empty, no owner record, untouched for {age:.0f} s")
        return JobDirInfo(
            path,
            None,
            "no owner record (made by a sage-queue older than JOB20, or its manager is making it): "
            "remove it by hand once no job uses it",
        )
    pid, start, namespace = owner
    ours = monitor._pid_namespace()
    if namespace is not None and ours is not None and namespace != ours:
        # A $TMPDIR shared with a container: the pid is another namespace's, it says nothing here.
        return JobDirInfo(
            path, pid, f"made in another pid namespace ({namespace}, ours {ours}): its pid means nothing here"
        )
    if monitor._alive(pid, start):
        return JobDirInfo(path, pid, f"its manager (pid {pid}) is alive")
    return JobDirInfo(path, pid, None, f"its manager (pid {pid}) is gone")


def job_dirs(tmpdir: Optional[str] = None) -> list[JobDirInfo]:
    """Every ``sageq-job-*`` entry of ``tmpdir`` (default: ``$TMPDIR``, where managers make them), judged."""
    base = tempfile.gettempdir() if tmpdir is None else tmpdir
    try:
        base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        names = sorted(n for n in os.listdir(base_fd) if n.startswith(JOB_DIR_PREFIX))
        return [_judge_job_dir(base, base_fd, n) for n in names]
    finally:
        os.close(base_fd)


def collect_job_dirs(tmpdir: Optional[str] = None, *, dry_run: bool = False) -> list[JobDirInfo]:
    """Remove (unless ``dry_run``) the key directories of dead managers; return them."""
    removed = []
    for info in job_dirs(tmpdir):
        if info.kept is not None:
            continue
        if not dry_run:
            # Ours, 0700, in a directory where (sticky $TMPDIR) only we may rename it: nobody else can
            # swap it; rmtree never follows a symbolic link inside it.
            try:
                shutil.rmtree(info.path)
            except FileNotFoundError:
                continue
        removed.append(info)
    return removed


def _format_table(infos: list[SegmentInfo]) -> str:
    rows = [("KIND", "NAME", "SIZE", "DEPTH", "PIDS (* = alive)", "CREATOR", "VER", "NOTE")]
    for info in infos:
        pids = ",".join(f"{p}{'*' if _segment.pid_alive(p) else ''}" for p in info.attached_pids) or "-"
        rows.append(
            (
                info.kind,
                info.name,
                str(info.size),
                "?" if info.depth is None else str(info.depth),
                pids,
                str(info.creator_pid or "-"),
                str(info.format_version or "-"),
                info.note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)) + "  " + row[-1]
        for row in rows
    ).rstrip()


def _info_dict(info: SegmentInfo) -> dict[str, Any]:
    data = asdict(info)
    data["attached_pids"] = list(info.attached_pids)
    data["orphan"] = info.orphan
    return data


def ls_main(argv: Optional[list[str]] = None) -> int:
    """``sage-queue ls [--kind K] [--json]``: one line per segment of this library on the host."""
    parser = argparse.ArgumentParser(prog="sage-queue ls", description="List this library's shared-memory queues.")
    parser.add_argument("--kind", choices=sorted(SEGMENT_MODULES), help="only segments of this backend")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        infos = _all_segments(args.kind)
    except OSError as exc:
        print(f"sage-queue ls: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([_info_dict(i) for i in infos], indent=2))
    elif infos:
        print(_format_table(infos))
    else:
        print("no sage-queue segments on this host")
    return 0


def gc_main(argv: Optional[list[str]] = None) -> int:
    """``sage-queue gc [--kind K] [--dry-run] [--min-age S]``: remove orphans (every recorded pid dead)
    and what dead job managers left behind (key directories, registry entries: JOB20)."""
    parser = argparse.ArgumentParser(
        prog="sage-queue gc",
        description="Remove shared-memory queues whose recorded processes are all dead, and the key directories "
        "($TMPDIR/sageq-job-*) and job registry entries of job managers that are dead.",
    )
    parser.add_argument(
        "--kind", choices=[*sorted(SEGMENT_MODULES), "job"], help="only segments of this backend, or only job leftovers"
    )
    parser.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    parser.add_argument("--min-age", type=float, default=2.0, help="never remove segments younger than this (s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also say why each kept segment is kept")
    args = parser.parse_args(argv)
    verb = "would remove" if args.dry_run else "removed"
    if args.kind != "job":
        try:
            if args.verbose:
                for info in _all_segments(args.kind):
                    reason = _removable(info, args.min_age)
                    if reason is not None:
                        print(f"kept {info.kind}:{info.name}: {reason}")
            removed = collect_orphans(args.kind, min_age=args.min_age, dry_run=args.dry_run)
        except OSError as exc:
            print(f"sage-queue gc: {exc}", file=sys.stderr)
            return 2
        for info in removed:
            print(f"{verb} {info.kind}:{info.name} (pids {list(info.attached_pids) or 'none'} all dead)")
        print(f"{verb} {len(removed)} orphan segment(s)")
    if args.kind in (None, "job"):
        return _gc_jobs(verb, dry_run=args.dry_run, verbose=args.verbose)
    return 0


def _gc_jobs(verb: str, *, dry_run: bool, verbose: bool) -> int:
    """The job half of gc: dead managers' key directories, then stale registry entries."""
    status = 0
    try:
        if verbose:
            for info in job_dirs():
                if info.kept is not None:
                    print(f"kept job dir {info.path}: {info.kept}")
        dirs = collect_job_dirs(dry_run=dry_run)
    except OSError as exc:
        print(f"sage-queue gc: {tempfile.gettempdir()}: {exc}", file=sys.stderr)
        dirs, status = [], 2
    for info in dirs:
        print(f"{verb} job dir {info.path} ({info.why})")
    try:
        entries = monitor.stale_jobs(remove=not dry_run)
        partial = monitor.stale_temp_files(remove=not dry_run)
    except (QueuePermissionError, OSError) as exc:  # an untrusted registry: said, and left alone
        print(f"sage-queue gc: job registry skipped: {exc}", file=sys.stderr)
        entries, partial, status = [], [], 2
    for entry in entries:
        print(f"{verb} job entry {entry.path} (job {entry.name!r}: its manager, pid {entry.pid}, is gone)")
    for path in partial:
        print(f"{verb} job entry {path} (half-written by a publisher that died, untouched for an hour)")
    print(
        f"{verb} {len(dirs)} job key directory(ies) and {len(entries) + len(partial)} job registry "
        "entry(ies) of dead managers"
    )
    return status


def inspect_main(argv: Optional[list[str]] = None) -> int:
    """``sage-queue inspect DESCRIPTOR_JSON | KIND:NAME``: a descriptor, and its segment's header if it has one."""
    parser = argparse.ArgumentParser(
        prog="sage-queue inspect", description="Show a descriptor (JSON text) or a named segment (KIND:NAME)."
    )
    parser.add_argument("target", help="descriptor JSON text, @FILE holding it, or KIND:NAME (e.g. shm:jobs)")
    parser.add_argument(
        "--stats",
        action="store_true",
        help="also attach to the queue (never creating it) and show its stats(); needs a descriptor",
    )
    args = parser.parse_args(argv)
    target = args.target
    if target.startswith("@"):
        with open(target[1:], encoding="utf-8") as f:
            target = f.read()
    out: dict[str, Any] = {}
    status = 0
    if target.lstrip().startswith("{"):
        try:
            desc = QueueDescriptor.from_json(target)
        except DescriptorError as exc:
            print(f"sage-queue inspect: invalid descriptor: {exc}", file=sys.stderr)
            return 2
        out["descriptor"] = desc.to_dict()
        if args.stats:
            sample = monitor.sample_queue(monitor.Source(None, desc.queue_id, target))
            out["state"] = sample.state
            if sample.detail:
                out["detail"] = sample.detail
            out["stats"] = None if sample.stats is None else asdict(sample.stats)
            status = 1 if sample.state in (monitor.GONE, monitor.ERROR) else 0
        kind, name = desc.queue_type, desc.metadata.get("shm_name")
        if kind not in SEGMENT_MODULES or not isinstance(name, str):
            print(json.dumps(out, indent=2))
            return status
    else:
        if args.stats:
            print("sage-queue inspect: --stats needs the queue's descriptor, not KIND:NAME", file=sys.stderr)
            return 2
        kind, sep, name = target.partition(":")
        if not sep or kind not in SEGMENT_MODULES or _segment.check_name(name):
            print(
                f"sage-queue inspect: expected descriptor JSON or KIND:NAME with KIND in {sorted(SEGMENT_MODULES)}",
                file=sys.stderr,
            )
            return 2
    if not os.path.exists(_segment.segment_path(kind, name)):
        out["segment"] = None
        out["note"] = f"no {kind} segment named {name!r} on this host"
        print(json.dumps(out, indent=2))
        return 1
    out["segment"] = _info_dict(describe(kind, name))
    print(json.dumps(out, indent=2))
    return status
