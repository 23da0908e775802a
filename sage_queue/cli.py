"""``sage-queue``: one command in front of the library, the kit and the harnesses.

Each subcommand is a ``main(argv) -> int`` in its own module, imported only when
that subcommand runs (so ``sage-queue ls`` never imports Ray).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Optional

# subcommand -> ("module:function", one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sage_queue.demo:main", "run the seed's scenarios with real processes on every available backend"),
    "conformance": ("conformance.cli:main", "run the conformance kit against a backend (see --help)"),
    "bench": ("stress.bench:main", "benchmark a backend against multiprocessing.Queue and faster-fifo"),
    "stress": ("stress.cli:main", "many producers x consumers; check nothing lost, duplicated or reordered"),
    "faults": ("fault_injection.cli:main", "SIGKILL producers/consumers mid-operation; check invariants"),
    "ls": ("sage_queue.tools:ls_main", "list this library's shared-memory queues with owner pids and depth"),
    "gc": ("sage_queue.tools:gc_main", "remove shared-memory queues whose processes are all dead"),
    "inspect": ("sage_queue.tools:inspect_main", "show a descriptor (JSON) or a named segment's header"),
    "serve": ("sage_queue.backends.rpc.server:main", "serve rpc queues over ZeroMQ (authenticated)"),
    "choose": ("sage_queue.job:choose_main", "pick a queue type from where producer and consumer run (--explain)"),
    "top": ("sage_queue.monitor:top_main", "watch the queues of running jobs live (depth, rates, stalls)"),
    "metrics": ("sage_queue.monitor:metrics_main", "export queue stats as Prometheus/OpenMetrics text"),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: sage-queue COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "sage-queue COMMAND --help shows a command's own options."]
    return "\n".join(lines)


def _load(target: str) -> Callable[[list[str]], int]:
    module_name, _, func = target.partition(":")
    module = importlib.import_module(module_name)
    entry: Callable[[list[str]], int] = getattr(module, func)
    return entry


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"sage-queue: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = SUBCOMMANDS[command]
    try:
        entry = _load(target)
    except (ImportError, AttributeError) as exc:
        print(f"sage-queue {command}: not available in this installation ({exc})", file=sys.stderr)
        return 2
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
