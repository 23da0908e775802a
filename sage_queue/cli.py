"""``sage-queue``: one command in front of the library, the kit and the harnesses.

Each subcommand is a ``main(argv) -> int`` in its own module, imported only when
that subcommand runs (so ``sage-queue ls`` never imports Ray).

Global options, before the command: ``--log-level LEVEL`` shows the library's log records of
that level and above on stderr, ``--log-json`` as JSON lines (``sage_queue.log``). Without
them the library says nothing: only the commands' own output and errors are printed.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Optional

from .log import configure_logging

# subcommand -> ("module:function", one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sage_queue.demo:main", "the seed's scenarios on every backend, then one job over rpc, ray_actor, sage"),
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
    lines = ["usage: sage-queue [--log-level LEVEL] [--log-json] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += [
        "",
        "global options:",
        "  --log-level LEVEL  show the library's log records from LEVEL up (DEBUG, INFO, WARNING, ERROR)",
        "  --log-json         write them as JSON lines ({ts, level, logger, msg, ...}); implies --log-level WARNING",
        "",
        "sage-queue COMMAND --help shows a command's own options.",
    ]
    return "\n".join(lines)


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _global_options(args: list[str]) -> tuple[Optional[str], bool, list[str]]:
    """``(log level or None, json, the rest)`` from the options before the command; ValueError if bad."""
    level: Optional[str] = None
    as_json = False
    while args and args[0].startswith("--log"):
        option = args.pop(0)
        if option == "--log-json":
            as_json = True
        elif option == "--log-level" or option.startswith("--log-level="):
            value = option.partition("=")[2] if "=" in option else (args.pop(0) if args else "")
            if value.upper() not in _LEVELS:
                raise ValueError(f"--log-level needs one of {', '.join(_LEVELS)}, got {value!r}")
            level = value.upper()
        else:
            raise ValueError(f"unknown global option {option!r}")
    return level, as_json, args


def _load(target: str) -> Callable[[list[str]], int]:
    module_name, _, func = target.partition(":")
    module = importlib.import_module(module_name)
    entry: Callable[[list[str]], int] = getattr(module, func)
    return entry


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        level, as_json, args = _global_options(args)
    except ValueError as exc:
        print(f"sage-queue: {exc}\n\n{_usage()}", file=sys.stderr)
        return 2
    if level is not None or as_json:  # without them nothing is configured: the library stays quiet
        configure_logging(level or "WARNING", json=as_json)
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
