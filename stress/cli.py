"""``sage-queue stress``: P producer processes x C consumer processes; ledger check."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .backends import SEGMENT_BACKENDS, backends_for, descriptor_factory, unavailable_reason
from .core import run_stress


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sage-queue stress", description=__doc__)
    parser.add_argument("--backend", default="shm", choices=[*SEGMENT_BACKENDS, "all"])
    parser.add_argument("-p", "--producers", type=int, default=4)
    parser.add_argument("-c", "--consumers", type=int, default=4)
    parser.add_argument("-n", "--items", type=int, default=100_000, help="total items (split among producers)")
    parser.add_argument("--payload", type=int, default=32, help="payload bytes per item")
    parser.add_argument("--batch", type=int, default=1, help="put_many/get_many batch size (1 = put/get)")
    parser.add_argument("--maxsize", type=int, default=0)
    parser.add_argument("--capacity", type=int, default=None, help="capacity_bytes of the queue")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds the whole run may take; a child that dies stops it at once")
    args = parser.parse_args(argv)
    status = 0
    for backend in backends_for(args.backend):
        reason = unavailable_reason(backend)
        if reason:
            print(f"{backend}: skipped ({reason})")
            continue
        result = run_stress(
            descriptor_factory(backend, maxsize=args.maxsize, capacity_bytes=args.capacity, prefix="stress"),
            producers=args.producers, consumers=args.consumers,
            items_per_producer=max(1, args.items // args.producers), payload_bytes=args.payload,
            batch=args.batch, timeout=args.timeout,
        )
        print(f"{backend}: {result.summary()}")
        status |= 0 if result.ok else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
