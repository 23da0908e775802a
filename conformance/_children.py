"""Code that runs in the kit's child processes (``spawn`` children and ``subprocess`` children).

A child receives nothing but the descriptor's JSON text (and, for the pickle
check, the pickled handle) and reports through its exit status and stderr, or
through the queue under test itself. Every wait has a timeout, so a broken
backend makes a child fail, never hang.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import queue
import subprocess
import sys
import time
from typing import Any, Optional

__all__ = ["echo_child", "run_child", "main", "DONE_TAG", "STOP_TAG"]

DONE_TAG = "kit-child-done"
STOP_TAG = "kit-stop"
_CHILD_WAIT_S = 20.0


def echo_child(desc_json: str, expected_count: int, wait_s: float = _CHILD_WAIT_S) -> None:
    """Get ``expected_count`` items, check them against the kit's samples, put each one back,
    then put ``(DONE_TAG, pid)``. Exit status 0 = every item arrived intact and in order."""
    from sage_queue import resolve_descriptor

    from .samples import describe_difference, large_items, sample_items

    expected = (sample_items() + large_items())[:expected_count]
    problems: list[str] = []
    handle = resolve_descriptor(desc_json)
    got: list[Any] = []
    try:
        for _ in range(expected_count):
            got.append(handle.get(timeout=wait_s))
    except queue.Empty:
        problems.append(f"child got only {len(got)} of {expected_count} items within {wait_s}s")
    for i, (want, item) in enumerate(zip(expected, got, strict=False)):
        problem = describe_difference(want, item, f"item {i}")
        if problem:
            problems.append(f"in the child: {problem}")
    for item in got:
        handle.put(item, timeout=wait_s)
    handle.put((DONE_TAG, os.getpid()), timeout=wait_s)
    if hasattr(handle, "close"):
        handle.close()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)


def _produce(desc_json: str, tag: str, count: int) -> None:
    from sage_queue import resolve_descriptor

    handle = resolve_descriptor(desc_json)
    for seq in range(count):
        handle.put((tag, seq), timeout=_CHILD_WAIT_S)
    handle.close()


def _consume(desc_json: str) -> None:
    """Get until a STOP_TAG item; print what was got (JSON, one line) on stdout."""
    from sage_queue import resolve_descriptor

    handle = resolve_descriptor(desc_json)
    got: list[Any] = []
    while True:
        item = handle.get(timeout=_CHILD_WAIT_S)
        if isinstance(item, tuple) and item[:1] == (STOP_TAG,):
            break
        got.append(item)
    handle.close()
    print(json.dumps(got))


def _churn(desc_json: str) -> None:
    """Put and get in a loop until killed; says ``ready`` once it has done both once."""
    from sage_queue import resolve_descriptor

    handle = resolve_descriptor(desc_json)
    seq = 0
    announced = False
    while True:
        handle.put(("churn", seq), timeout=_CHILD_WAIT_S)
        seq += 1
        try:
            handle.get(timeout=0.05)
        except queue.Empty:
            pass
        if not announced:
            print("ready", flush=True)
            announced = True


def _outlive_destroy(desc_json: str) -> None:
    """Two handles; say ``ready`` with a get() blocked on the first; print (JSON) how that get ended and how
    an operation on the second ended once the parent destroyed the queue."""
    import threading

    from sage_queue import resolve_descriptor

    blocked, other = resolve_descriptor(desc_json), resolve_descriptor(desc_json)
    outcome: dict[str, Any] = {}

    def wait() -> None:
        start = time.monotonic()
        try:
            blocked.get(timeout=_CHILD_WAIT_S)
            outcome["woken"] = "returned an item"
        except Exception as exc:  # reported to the parent, which judges it
            outcome["woken"] = type(exc).__name__
        outcome["blocked_for"] = time.monotonic() - start

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    print("ready", flush=True)
    waiter.join(_CHILD_WAIT_S + 5)
    try:
        other.qsize()
        outcome["next_op"] = "returned"
    except Exception as exc:  # reported to the parent
        outcome["next_op"] = type(exc).__name__
    print(json.dumps(outcome), flush=True)


def _try_resolve(desc_json: str, pickled_b64: str) -> None:
    """Print, for the JSON and (if given) the pickled handle, the outcome of resolving it here."""
    from sage_queue import resolve_descriptor

    outcomes: dict[str, str] = {}
    attempts: list[tuple[str, Any]] = [("json", lambda: resolve_descriptor(desc_json))]
    if pickled_b64:
        attempts.append(("pickle", lambda: pickle.loads(base64.b64decode(pickled_b64))))
    for label, attempt in attempts:
        try:
            attempt()
            outcomes[label] = "resolved"
        except Exception as exc:  # reported to the parent, which judges it
            outcomes[label] = type(exc).__name__
    print(json.dumps(outcomes))


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``python -c 'from conformance._children import main; main()' MODE ARGS...``."""
    args = sys.argv[1:] if argv is None else argv
    mode, rest = args[0], args[1:]
    if mode == "echo":
        echo_child(rest[0], int(rest[1]))
    elif mode == "produce":
        _produce(rest[0], rest[1], int(rest[2]))
    elif mode == "consume":
        _consume(rest[0])
    elif mode == "churn":
        _churn(rest[0])
    elif mode == "outlive_destroy":
        _outlive_destroy(rest[0])
    elif mode == "resolve":
        _try_resolve(rest[0], rest[1] if len(rest) > 1 else "")
    else:
        raise SystemExit(f"unknown child mode {mode!r}")


def child_command(mode: str, *args: str) -> list[str]:
    return [sys.executable, "-c", "from conformance._children import main; main()", mode, *args]


def child_env() -> dict[str, str]:
    """The parent's import path, as ``spawn`` would pass it: the child imports what the parent can."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def run_child(mode: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a subprocess child to completion (killed after ``timeout`` s; the caller sees rc != 0)."""
    try:
        return subprocess.run(
            child_command(mode, *args), capture_output=True, text=True, timeout=timeout, env=child_env()
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return subprocess.CompletedProcess(exc.cmd, -9, out, err + f"\n(child killed after {timeout}s)")


def start_child(mode: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        child_command(mode, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
    )


def stop_child(proc: subprocess.Popen[str], grace: float = 5.0) -> None:
    """Wait up to ``grace`` s, then kill: no child outlives its test."""
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
