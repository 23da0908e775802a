"""``sage-queue stress``: P producer processes x C consumer processes; ledger check."""

from __future__ import annotations

import sys
from typing import Optional

from ._common import harness_parser, run_per_backend
from .core import run_stress


def main(argv: Optional[list[str]] = None) -> int:
    parser = harness_parser("sage-queue stress", __doc__, producers=4, consumers=4)
    parser.add_argument("-n", "--items", type=int, default=100_000, help="total items (split among producers)")
    parser.add_argument("--payload", type=int, default=32, help="payload bytes per item")
    parser.add_argument("--batch", type=int, default=1, help="put_many/get_many batch size (1 = put/get)")
    parser.add_argument("--capacity", type=int, default=None, help="capacity_bytes of the queue")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds the whole run may take; a child that dies stops it at once")
    args = parser.parse_args(argv)
    return run_per_backend(args, "stress", lambda factory: run_stress(
        factory, producers=args.producers, consumers=args.consumers,
        items_per_producer=max(1, args.items // args.producers), payload_bytes=args.payload,
        batch=args.batch, timeout=args.timeout,
    ))


if __name__ == "__main__":
    sys.exit(main())
