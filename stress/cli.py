"""``sage-queue stress``: P producers x C consumers on any queue; the history is judged by the checker."""

from __future__ import annotations

import sys
from typing import Optional

from ._common import finish, harness_parser, seed_for, targets
from .runner import RunResult, run


def main(argv: Optional[list[str]] = None) -> int:
    parser = harness_parser("sage-queue stress", __doc__, producers=4, consumers=4, capacity=None)
    parser.add_argument("-n", "--items", type=int, default=100_000, help="total items (split among producers)")
    parser.add_argument("--payload", type=int, default=32, help="payload bytes per item")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds the put phase and the drain may take")
    args = parser.parse_args(argv)
    results: list[RunResult] = []
    skipped: dict[str, str] = {}
    for name, target, reason in targets(args, "stress"):
        if target is None:
            skipped[name] = reason or ""
            continue
        seed = seed_for(args)
        print(f"{name}: stress, seed {seed}", flush=True)
        result = run(
            target,
            producers=args.producers,
            consumers=args.consumers,
            items_per_producer=max(1, args.items // args.producers),
            payload_bytes=args.payload,
            batch=args.batch,
            timeout=args.timeout,
            drain_timeout=args.timeout,
            seed=seed,
            progress=False if args.no_progress else None,
        )
        print(f"{name}: {result.summary()}", flush=True)
        results.append(result)
    return finish(results, skipped, args.report)


if __name__ == "__main__":
    sys.exit(main())
