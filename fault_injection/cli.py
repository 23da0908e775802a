"""``sage-queue faults``: run named fault scenarios (``--list``) on any queue; the checker judges each history."""

from __future__ import annotations

import sys
from typing import Optional

from stress._common import finish, harness_parser, seed_for, targets
from stress.runner import RunResult

from .core import run_scenario
from .scenarios import all_scenarios


def main(argv: Optional[list[str]] = None) -> int:
    parser = harness_parser("sage-queue faults", __doc__, producers=2, consumers=2, capacity=64 * 1024)
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--scenario", default="kill-any", help="a scenario name, or 'all'")
    parser.add_argument(
        "-k",
        "--faults",
        "--kills",
        type=int,
        default=None,
        help="faults per run (default: the scenario's short count, or its soak count)",
    )
    parser.add_argument("--soak", action="store_true", help="the scenarios' long fault counts")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds the end phase may take before the workers still running are reported",
    )
    parser.add_argument(
        "--stall-timeout", type=float, default=30.0, help="seconds a scenario may wait for a worker ready to be hit"
    )
    args = parser.parse_args(argv)
    known = all_scenarios()
    if args.list:
        for name, s in known.items():
            modes = "registered types, MODULE:ATTR factories" if "object" in s.modes else ", ".join(s.modes)
            if s.types:
                modes = ", ".join(s.types)
            print(f"{name:18} {s.description}\n{'':18} applies to: {modes}; {s.faults} faults ({s.soak_faults} soak)")
        return 0
    names = list(known) if args.scenario == "all" else [args.scenario]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r} (known: {', '.join(known)})")
    results: list[RunResult] = []
    skipped: dict[str, str] = {}
    for name, target, reason in targets(args, "faults"):
        if target is None:
            skipped[name] = reason or ""
            continue
        for scenario in names:
            if not known[scenario].applies_to(target):
                skipped[f"{name} {scenario}"] = f"does not apply to {name} ({target.mode} workers)"
                continue
            seed = seed_for(args)
            print(f"{name}: {scenario}, seed {seed}", flush=True)
            result = run_scenario(
                target,
                scenario,
                faults=args.faults,
                soak=args.soak,
                producers=args.producers,
                consumers=args.consumers,
                batch=args.batch,
                seed=seed,
                drain_timeout=args.drain_timeout,
                stall_timeout=args.stall_timeout,
                progress=False if args.no_progress else None,
            )
            print(f"{name}: {result.summary()}", flush=True)
            results.append(result)
    return finish(results, skipped, args.report)


if __name__ == "__main__":
    sys.exit(main())
