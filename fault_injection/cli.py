"""``sage-queue faults``: SIGKILL producers/consumers mid-operation; check the invariants."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from stress.backends import SEGMENT_BACKENDS, backends_for, descriptor_factory, unavailable_reason

from .core import run_faults


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sage-queue faults", description=__doc__)
    parser.add_argument("--backend", default="shm", choices=[*SEGMENT_BACKENDS, "all"])
    parser.add_argument("-k", "--kills", type=int, default=100)
    parser.add_argument("-p", "--producers", type=int, default=2)
    parser.add_argument("-c", "--consumers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="consumers use get_many(batch) when > 1")
    parser.add_argument("--capacity", type=int, default=64 * 1024, help="capacity_bytes (small: wraps often)")
    parser.add_argument("--maxsize", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds the end phase may take before the workers still running are reported")
    parser.add_argument("--stall-timeout", type=float, default=30.0,
                        help="seconds the kill phase may wait for a worker ready to kill")
    args = parser.parse_args(argv)
    status = 0
    for backend in backends_for(args.backend):
        reason = unavailable_reason(backend)
        if reason:
            print(f"{backend}: skipped ({reason})")
            continue
        result = run_faults(
            descriptor_factory(backend, maxsize=args.maxsize, capacity_bytes=args.capacity, prefix="faults"),
            producers=args.producers, consumers=args.consumers, kills=args.kills, batch=args.batch,
            seed=args.seed, drain_timeout=args.drain_timeout, stall_timeout=args.stall_timeout,
        )
        print(f"{backend}: {result.summary()}")
        status |= 0 if result.ok else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
