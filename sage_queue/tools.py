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
is dead (``SegmentInfo.orphan``), its backend could describe it, it does not say its pid
list is incomplete, and it is older than ``--min-age`` seconds (a segment whose creator
is still writing its header has no pid yet).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Optional

from . import _segment, monitor
from ._segment import SegmentInfo
from .descriptor import QueueDescriptor
from .errors import DescriptorError

__all__ = ["ls_main", "gc_main", "inspect_main", "describe", "collect_orphans", "SEGMENT_MODULES"]

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
    live = [pid for pid in info.attached_pids if _segment.pid_alive(pid)]
    if live:
        return f"live pids {live}"
    if not info.orphan:
        return "not an orphan"
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
    """``sage-queue gc [--kind K] [--dry-run] [--min-age S]``: remove orphans (every recorded pid dead)."""
    parser = argparse.ArgumentParser(
        prog="sage-queue gc", description="Remove shared-memory queues whose recorded processes are all dead."
    )
    parser.add_argument("--kind", choices=sorted(SEGMENT_MODULES))
    parser.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    parser.add_argument("--min-age", type=float, default=2.0, help="never remove segments younger than this (s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also say why each kept segment is kept")
    args = parser.parse_args(argv)
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
    verb = "would remove" if args.dry_run else "removed"
    for info in removed:
        print(f"{verb} {info.kind}:{info.name} (pids {list(info.attached_pids) or 'none'} all dead)")
    print(f"{verb} {len(removed)} orphan segment(s)")
    return 0


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
