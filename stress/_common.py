"""What the ``sage-queue stress`` and ``sage-queue faults`` CLIs share: the common options and the backend loop."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Optional

from sage_queue import QueueDescriptor

from .backends import SEGMENT_BACKENDS, backends_for, descriptor_factory, unavailable_reason
from .core import Verdict

__all__ = ["harness_parser", "run_per_backend"]


def harness_parser(prog: str, description: Optional[str], *, producers: int, consumers: int) -> argparse.ArgumentParser:
    """A parser with the options every harness CLI has: --backend, -p/--producers, -c/--consumers, --maxsize."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--backend", default="shm", choices=[*SEGMENT_BACKENDS, "all"])
    parser.add_argument("-p", "--producers", type=int, default=producers)
    parser.add_argument("-c", "--consumers", type=int, default=consumers)
    parser.add_argument("--maxsize", type=int, default=0)
    return parser


def run_per_backend(
    args: argparse.Namespace, prefix: str, run_one: Callable[[Callable[[], QueueDescriptor]], Verdict]
) -> int:
    """Run ``run_one(descriptor_factory)`` for each backend ``args.backend`` names; print each summary.

    A backend that cannot be used here is reported as skipped. Returns the exit status: 1 if
    any run failed, else 0. ``args`` must carry ``backend``, ``maxsize`` and ``capacity``.
    """
    status = 0
    for backend in backends_for(args.backend):
        reason = unavailable_reason(backend)
        if reason:
            print(f"{backend}: skipped ({reason})")
            continue
        result = run_one(descriptor_factory(backend, maxsize=args.maxsize, capacity_bytes=args.capacity, prefix=prefix))
        print(f"{backend}: {result.summary()}")
        status |= 0 if result.ok else 1
    return status
