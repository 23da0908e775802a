"""What the ``sage-queue stress`` and ``sage-queue faults`` CLIs share: options, targets, the table, the report."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterator
from typing import Any, Optional

from .backends import backends_for, unavailable_reason
from .runner import RunResult, Target, target_for

__all__ = ["harness_parser", "targets", "print_table", "finish"]


def harness_parser(
    prog: str, description: Optional[str], *, producers: int, consumers: int, capacity: Optional[int]
) -> argparse.ArgumentParser:
    """A parser with the options every harness CLI has."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--backend",
        default="shm",
        help="a registered type, 'all', or MODULE:ATTR (a kit-style factory(maxsize) -> queue)",
    )
    parser.add_argument("-p", "--producers", type=int, default=producers)
    parser.add_argument("-c", "--consumers", type=int, default=consumers)
    parser.add_argument("--maxsize", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1, help="put_many/get_many batch size (1 = put/get)")
    parser.add_argument("--capacity", type=int, default=capacity, help="capacity_bytes of the queue")
    parser.add_argument("--threads", action="store_true", help="workers are threads (in-process backends)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (every run prints its seed)")
    parser.add_argument("--report", metavar="OUT.json", help="write every run's verdict, counts and seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    return parser


def targets(args: argparse.Namespace, prefix: str) -> Iterator[tuple[str, Optional[Target], Optional[str]]]:
    """(name, target, None) for each backend ``--backend`` names, or (name, None, why it is skipped)."""
    names = [args.backend] if ":" in args.backend else backends_for(args.backend)
    for name in names:
        reason = None if ":" in name else unavailable_reason(name)
        if reason and not (args.threads and "one process" in reason):
            yield name, None, reason
            continue
        try:
            yield (
                name,
                target_for(
                    name, maxsize=args.maxsize, capacity_bytes=args.capacity, threads=args.threads, prefix=prefix
                ),
                None,
            )
        except Exception as exc:  # a bad MODULE:ATTR or metadata: say so, as a skip with its reason
            yield name, None, f"{type(exc).__name__}: {exc}"


def seed_for(args: argparse.Namespace) -> int:
    return args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)


_COLUMNS = (
    "backend",
    "scenario",
    "seed",
    "faults",
    "acked",
    "got",
    "lost/bound",
    "dup",
    "unexp",
    "corrupt",
    "order",
    "overrun",
    "stuck",
    "deadlock",
    "get p99 ms",
    "items/s",
    "verdict",
)


def _row(result: RunResult) -> list[str]:
    r = result.report
    if r is None:
        return [
            result.target,
            result.scenario,
            str(result.seed),
            str(max(result.faults, result.kills + result.stops)),
            *["-"] * 12,
            result.verdict,
        ]
    p99 = r.latency_ms.get("get", {}).get("p99")
    return [
        result.target,
        result.scenario,
        str(result.seed),
        str(max(result.faults, result.kills + result.stops)),
        str(r.acked),
        str(r.got),
        f"{r.lost}/{r.lost_bound}",
        str(r.duplicated),
        str(r.unexpected),
        str(r.corrupt),
        str(r.out_of_order),
        str(r.overruns),
        str(r.stuck),
        "yes" if r.deadlock else "no",
        "-" if p99 is None else f"{p99:.2f}",
        f"{r.throughput:,.0f}",
        result.verdict,
    ]


def print_table(results: list[RunResult], write: Callable[[str], None] = print) -> None:
    """The final table: one row per run, columns aligned."""
    rows = [list(_COLUMNS), *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for n, row in enumerate(rows):
        write(
            "  ".join(
                cell.rjust(w) if n and i >= 2 and i < len(row) - 1 else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )


def finish(results: list[RunResult], skipped: dict[str, str], report_path: Optional[str]) -> int:
    """Print the table, write the report; exit status 1 if any judged promise is broken, else 0."""
    if results:
        print()
        print_table(results)
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})")
    status = 1 if any(r.problems and r.verdict != "no promise" for r in results) else 0
    if report_path:
        out: dict[str, Any] = {
            "verdict": "BROKEN" if status else "OK",
            "runs": [r.to_json() for r in results],
            "skipped": skipped,
        }
        with open(report_path, "w") as f:
            json.dump(out, f, indent=2)
    return status
