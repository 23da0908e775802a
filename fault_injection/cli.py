"""``sage-queue faults``: SIGKILL producers/consumers mid-operation; check the invariants."""

from __future__ import annotations

import sys
from typing import Optional

from stress._common import harness_parser, run_per_backend

from .core import run_faults


def main(argv: Optional[list[str]] = None) -> int:
    parser = harness_parser("sage-queue faults", __doc__, producers=2, consumers=2)
    parser.add_argument("-k", "--kills", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1, help="consumers use get_many(batch) when > 1")
    parser.add_argument("--capacity", type=int, default=64 * 1024, help="capacity_bytes (small: wraps often)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds the end phase may take before the workers still running are reported")
    parser.add_argument("--stall-timeout", type=float, default=30.0,
                        help="seconds the kill phase may wait for a worker ready to kill")
    args = parser.parse_args(argv)
    return run_per_backend(args, "faults", lambda factory: run_faults(
        factory, producers=args.producers, consumers=args.consumers, kills=args.kills, batch=args.batch,
        seed=args.seed, drain_timeout=args.drain_timeout, stall_timeout=args.stall_timeout,
    ))


if __name__ == "__main__":
    sys.exit(main())
