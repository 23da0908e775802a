"""``python -m conformance`` / ``sage-queue conformance``: run the kit, print the clause table.

    python -m conformance mypkg.queues:make_queue         # a factory(maxsize) -> QueueLike
    python -m conformance --backend local                  # a registered queue type
    python -m conformance --backend all --report out.json  # every registered type that is available
    python -m conformance --list-clauses                   # the clause <-> test table
    python -m conformance --scorecard --scorecard-dir docs # every registered type and every anchor:
                                                           # docs/scorecard.md and docs/scorecard.json

Exit status 0 if and only if no test failed. The last line of output is the
summary ``N passed, N failed, N skipped`` (known failures, run as strict xfail,
count as skipped and are listed above it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["main"]

_OUTCOMES = ("pass", "fail", "skip", "xfail")
_RESTARTS = 3
"""How many times a target's run continues after pytest stopped with an internal error."""


@dataclass
class _Row:
    nodeid: str
    test: str
    clauses: list[str]
    outcome: str = "pass"
    reason: str = ""
    duration: float = 0.0
    phases: set[str] = field(default_factory=set)


@dataclass
class _Collector:
    """A pytest plugin object: one row per test, from the reports (works under xdist too)."""

    rows: dict[str, _Row] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.errors.append(f"collection of {report.nodeid or 'the suite'} failed:\n{report.longreprtext}")

    def pytest_runtest_logreport(self, report: Any) -> None:
        from ._clauses import clauses_of
        from .suite import QueueConformance

        test = report.nodeid.rsplit("::", 1)[-1]
        row = self.rows.get(report.nodeid)
        if row is None:
            func = getattr(QueueConformance, test.split("[", 1)[0], None)
            row = self.rows[report.nodeid] = _Row(report.nodeid, test, list(clauses_of(func)))
        row.duration += report.duration
        row.phases.add(report.when)
        if row.outcome == "fail":
            return
        if report.failed:
            row.outcome = "fail"
            row.reason = _first_line(getattr(report, "longreprtext", "") or "failed", report)
        elif hasattr(report, "wasxfail") and report.skipped:
            row.outcome, row.reason = "xfail", str(report.wasxfail)
            detail = _first_line(getattr(report, "longreprtext", "") or "", report)
            core = detail.removeprefix("AssertionError: ")
            if core and core not in row.reason:
                row.reason += f": {detail}"
        elif report.skipped:
            row.outcome = "skip"
            longrepr = report.longrepr
            row.reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
            row.reason = row.reason.removeprefix("Skipped: ")


def _definition_order(row: _Row) -> int:
    """Rows in the order the kit defines its tests (xdist reports them in completion order)."""
    import inspect

    from .suite import QueueConformance

    func = getattr(QueueConformance, row.test.split("[", 1)[0], None)
    try:
        line = inspect.getsourcelines(func)[1] if func is not None else 1 << 30
    except (OSError, TypeError):
        line = 1 << 30
    return line


def _first_line(text: str, report: Any) -> str:
    """The assertion message of a failure, in one line."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("E "):
            return stripped[1:].strip()[:160]
    phase = "" if report.when == "call" else f" (in {report.when})"
    return (text.strip().splitlines() or ["failed"])[-1][:160] + phase


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Run the sage-queue conformance kit against a queue factory or a registered queue type.",
    )
    p.add_argument("targets", nargs="*", metavar="MODULE:ATTR", help="factory(maxsize) -> QueueLike")
    p.add_argument(
        "--backend", action="append", default=[], metavar="TYPE", help="a registered queue type, or 'all' (repeatable)"
    )
    p.add_argument("--report", metavar="PATH", help="write a JSON report here")
    p.add_argument("--list-clauses", action="store_true", help="print the clause <-> kit test table and exit")
    p.add_argument("--spec", metavar="DIR", help="the spec directory for --list-clauses (default: ./spec of the kit)")
    p.add_argument("-k", metavar="EXPR", help="only tests matching EXPR (names or clause ids), as in pytest")
    p.add_argument("-x", "--exitfirst", action="store_true", help="stop at the first failure")
    p.add_argument("-n", metavar="N", help="run in N processes (pytest-xdist)")
    p.add_argument("--hypothesis-profile", metavar="NAME", default="ci", help="ci (default), dev or thorough")
    p.add_argument("-v", "--verbose", action="store_true", help="show pytest's own output in full")
    p.add_argument(
        "--scorecard",
        action="store_true",
        help="run every registered queue type and every anchor (conformance.anchors) and write the "
        "clause-by-clause table (scorecard.md, scorecard.json) to --scorecard-dir",
    )
    p.add_argument("--scorecard-dir", metavar="DIR", default="docs", help="where --scorecard writes (default: docs)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.list_clauses:
        return _list_clauses(args.spec)
    if args.scorecard:
        if args.targets or args.backend:
            print(
                "conformance: --scorecard chooses its own targets (every registered type and every anchor)",
                file=sys.stderr,
            )
            return 2
        from .scorecard import run_scorecard

        return run_scorecard(args)
    return _run(args)


# -- --list-clauses -------------------------------------------------------------------------


def _list_clauses(spec: Optional[str]) -> int:
    from ._clauses import default_spec_dir, parse_spec
    from .suite import kit_clause_map

    spec_dir = Path(spec) if spec else default_spec_dir()
    if spec_dir is None or not spec_dir.is_dir():
        print("conformance: no spec directory found; pass --spec DIR", file=sys.stderr)
        return 2
    tests = kit_clause_map()
    for c in parse_spec(spec_dir):
        text = c.text if len(c.text) <= 70 else c.text[:67] + "..."
        names = ", ".join(tests.get(c.id, [])) or "(no kit test)"
        print(f"{c.id:<7} {c.level:<8} {text:<70}  {names}")
    return 0


# -- running the kit --------------------------------------------------------------------------


def _select_targets(args: argparse.Namespace) -> tuple[list[tuple[str, list[str]]], list[str], Optional[str]]:
    """(label, pytest options) per target; notes on unavailable types; a usage error, if any."""
    from .target import TargetError, load_target, registered_target, registered_types

    runs: list[tuple[str, list[str]]] = []
    notes: list[str] = []
    for spec in args.targets:
        try:
            load_target(spec)
        except TargetError as exc:
            return [], [], str(exc)
        runs.append((spec, ["--queue-factory", spec]))
    for backend in args.backend:
        types = registered_types() if backend == "all" else [backend]
        for queue_type in types:
            try:
                registered_target(queue_type)
            except TargetError as exc:
                if backend != "all":
                    return [], [], str(exc)
                notes.append(f"skipped --backend {queue_type}: {exc}")
                continue
            runs.append((f"--backend {queue_type}", ["--queue-backend", queue_type]))
    if not runs and not notes:
        return [], [], "nothing to run: give MODULE:ATTR or --backend TYPE|all (see --help)"
    return runs, notes, None


def passthrough_options(args: argparse.Namespace) -> list[str]:
    """The pytest options every target's run gets from the command line."""
    # The CLI imported the kit before pytest started, so pytest cannot rewrite it: say nothing about that.
    passthrough = ["--hypothesis-profile", args.hypothesis_profile, "-W", "ignore::pytest.PytestAssertRewriteWarning"]
    if args.k:
        passthrough += ["-k", args.k]
    if args.exitfirst:
        passthrough.append("-x")
    if args.n:
        passthrough += ["-n", args.n]
    passthrough += [] if args.verbose else ["-q", "--no-header", "--tb=short", "-p", "no:cacheprovider"]
    return passthrough


def run_target(label: str, options: list[str], passthrough: list[str]) -> dict[str, Any]:
    """Run the kit on one target in this process; print its table; return its JSON report entry."""
    import pytest

    from .plugin import SUITE_PATH

    collector = _Collector()
    started = time.monotonic()
    for _attempt in range(_RESTARTS + 1):
        done = set(collector.rows)
        deselect = [arg for nodeid in sorted(done) for arg in ("--deselect", nodeid)]
        # The plugin module itself (not the package): it loads the same however `conformance` is installed.
        code = pytest.main(
            [str(SUITE_PATH), "-p", "conformance.plugin", *options, *passthrough, *deselect], plugins=[collector]
        )
        if int(code) != int(pytest.ExitCode.INTERNAL_ERROR) or set(collector.rows) == done:
            break
        # pytest itself broke while reporting a test (seen: CPython 3.11's "AST constructor recursion depth
        # mismatch" while formatting a traceback after a test hit deep recursion): that test is failed
        # below, and the tests it did not reach still run, in a new session.
        print(f"(pytest stopped with an internal error; running the {label} tests not reached yet)")
    for row in collector.rows.values():
        if "call" not in row.phases and row.outcome == "pass":
            row.outcome, row.reason = "fail", "pytest broke (internal error) while running or reporting this test"
    elapsed = time.monotonic() - started
    rows = list(collector.rows.values())
    counts = {o: sum(r.outcome == o for r in rows) for o in _OUTCOMES}
    broken = bool(collector.errors) or int(code) not in (0, 1, 5)
    if broken:
        counts["fail"] += 1
    _print_table(label, rows, collector.errors, int(code), counts, elapsed)
    arrival = {r.nodeid: i for i, r in enumerate(rows)}
    rows = sorted(rows, key=lambda r: (_definition_order(r), arrival[r.nodeid]))
    return {
        "target": label,
        "pytest_exit_code": int(code),
        "broken_run": broken,
        "seconds": round(elapsed, 3),
        "errors": collector.errors,
        "summary": counts,
        "results": [
            {
                "nodeid": r.nodeid,
                "test": r.test,
                "clauses": r.clauses,
                "outcome": r.outcome,
                "reason": r.reason,
                "duration": round(r.duration, 4),
            }
            for r in rows
        ],
    }


def _run(args: argparse.Namespace) -> int:
    runs, notes, error = _select_targets(args)
    if error:
        print(f"conformance: {error}", file=sys.stderr)
        return 2
    passthrough = passthrough_options(args)
    report: dict[str, Any] = {"targets": [], "notes": notes}
    totals = dict.fromkeys(_OUTCOMES, 0)
    broken_run = False
    for label, options in runs:
        entry = run_target(label, options, passthrough)
        broken_run = broken_run or entry["broken_run"]
        for o in _OUTCOMES:
            totals[o] += entry["summary"][o]
        report["targets"].append(entry)
    for note in notes:
        print(note)
    report["summary"] = totals
    failed = totals["fail"] > 0 or broken_run
    report["exit_status"] = 1 if failed else 0
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if totals["xfail"]:
        print(f"{totals['xfail']} xfailed: declared known failures or unmet SHOULD clauses (counted as skipped)")
    print(f"{totals['pass']} passed, {totals['fail']} failed, {totals['skip'] + totals['xfail']} skipped")
    return 1 if failed else 0


def _print_table(
    label: str, rows: list[_Row], errors: list[str], code: int, counts: dict[str, int], elapsed: float
) -> None:
    print()
    print(f"== conformance of {label}")
    for err in errors:
        print(err)
    if code not in (0, 1, 5):
        print(f"(pytest stopped with exit code {code})")
    if not rows:
        print("(no test selected)")
        return
    arrival = {r.nodeid: i for i, r in enumerate(rows)}
    rows = sorted(rows, key=lambda r: (_definition_order(r), arrival[r.nodeid]))
    width = max(len(r.test) for r in rows)
    cwidth = max(6, *(len(",".join(r.clauses)) for r in rows))
    print(f"{'clause':<{cwidth}}  {'test':<{width}}  result")
    for r in rows:
        result = r.outcome if not r.reason else f"{r.outcome}: {r.reason}"
        print(f"{','.join(r.clauses) or '-':<{cwidth}}  {r.test:<{width}}  {result}")
    print(
        f"-- {label}: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped, "
        f"{counts['xfail']} xfailed in {elapsed:.1f}s"
    )
