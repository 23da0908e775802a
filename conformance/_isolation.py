"""Running a kit test body where a deadlock cannot hang the run: a forked child with a hard deadline.

Some contract violations are hangs, not wrong answers: a handle that deadlocks once
enough threads share it, or a ``close()`` from a signal handler that never returns.
A hang inside the test process is unrecoverable when the stuck thread holds the GIL
(no other thread, pytest-timeout's included, runs again), and unkillable when it is
the main thread itself. So the body runs in a ``fork``ed child that the parent can
kill, with three layers of deadline:

1. the body's own bounded joins, which name the stuck threads (the best message);
2. a watchdog thread in the child: at ``limit`` it writes the Python stacks of every
   thread, grouped by stack and named, and ``os._exit``s (a main thread stuck in a
   lock, a futex wait or a signal handler);
3. ``faulthandler.dump_traceback_later(exit=True)``: a C thread that needs no GIL, so
   it dumps the stacks and exits even when a thread holds the GIL for ever; and the
   parent SIGKILLs the child if even that does not end it.

``fork`` rather than a fresh interpreter, so that any target works (an in-process
``queue.Queue`` factory, a subclass's ``factory``, a registered type): the child has
the parent's factory. Queues of a ``cross_process`` target are made by the parent
and resolved in the child from their descriptor, so that the target's own cleanup
(in the parent) destroys them even when the child had to be killed; other targets'
queues are made in the child and die with it.

Without ``os.fork`` (Windows) the body runs in a daemon thread joined with the limit:
a deadlock that releases the GIL still fails the test, one that holds it cannot be
recovered from in-process (documented in ``conformance/README.md``).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from typing import IO, Any, Optional

__all__ = ["run_isolated", "describe_threads", "CAN_ISOLATE"]

CAN_ISOLATE = hasattr(os, "fork")
"""Whether bodies run in a killable child (POSIX) rather than a thread of this process."""

_FAULTHANDLER_AFTER_S = 3.0
"""Layer 3 fires this long after the watchdog (layer 2) should have: only if the GIL is held."""
_KILL_AFTER_S = 5.0
"""The parent SIGKILLs the child this long after layer 3 should have ended it."""
_WATCHDOG_NAME = "kit-watchdog"
_MAX_REPORT_CHARS = 8000
_FRAMES_SHOWN = 8


def describe_threads(threads: Optional[Iterable[threading.Thread]] = None, frames_per_stack: int = 8) -> str:
    """Stacks of ``threads`` (default: every thread but the watchdog), identical stacks grouped.

    ``N thread(s) [name, name, ...] at:`` followed by the innermost ``frames_per_stack``
    frames, so that 60 threads stuck in one place read as one entry.
    """
    frames = sys._current_frames()
    chosen = list(threading.enumerate() if threads is None else threads)
    groups: dict[str, list[str]] = {}
    for thread in chosen:
        if thread.name == _WATCHDOG_NAME or thread.ident is None:
            continue
        frame = frames.get(thread.ident)
        stack = "".join(traceback.format_stack(frame)[-frames_per_stack:]) if frame is not None else "  (no frame)\n"
        groups.setdefault(stack, []).append(thread.name)
    parts = []
    for stack, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)" if len(names) > 12 else "")
        parts.append(f"{len(names)} thread(s) [{shown}] at:\n{stack}")
    return "\n".join(parts)


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_REPORT_CHARS else text[:_MAX_REPORT_CHARS] + "\n... (clipped)"


def _write_result(out: IO[bytes], ok: bool, message: str) -> None:
    out.seek(0)
    out.truncate()
    out.write(json.dumps({"ok": ok, "message": message}).encode())
    out.flush()


def _child(
    body: Callable[[], None],
    limit: float,
    what: str,
    result: IO[bytes],
    stacks: IO[bytes],
    progress: Optional[Callable[[], str]],
) -> None:
    """In the forked child: run ``body`` under layers 2 and 3, report through ``result``, never return."""
    code = 2
    try:
        # The parent's fault handlers and alarm are not ours; pytest's capture fds are inherited, fine.
        faulthandler.dump_traceback_later(limit + _FAULTHANDLER_AFTER_S, exit=True, file=stacks)
        done = threading.Event()
        report_lock = threading.Lock()  # the body's result and the watchdog's verdict: whoever comes first

        def watchdog() -> None:
            if done.wait(limit):
                return
            with report_lock:
                state = f" {progress()}." if progress is not None else ""
                _write_result(
                    result,
                    False,
                    _clip(
                        f"{what}: still running after {limit:.0f}s: deadlock or livelock.{state} "
                        f"Threads of the child process:\n{describe_threads()}"
                    ),
                )
                os._exit(3)

        threading.Thread(target=watchdog, name=_WATCHDOG_NAME, daemon=True).start()
        try:
            body()
        except BaseException as exc:  # reported to the parent, which fails the test with it
            tb = "".join(traceback.format_exception(exc)[-6:])
            text = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
            with report_lock:
                done.set()
                _write_result(result, False, _clip(f"{text}\n\n(in the child process)\n{tb}"))
        else:
            with report_lock:
                done.set()
                _write_result(result, True, "")
        code = 0
    finally:
        os._exit(code)


def group_faulthandler_dump(text: str) -> str:
    """faulthandler's per-thread blocks, identical stacks grouped, the rarest first.

    With one thread holding the GIL for ever and dozens waiting for it, the holder is the
    thread whose stack differs from the crowd's, so it comes first.
    """
    groups: dict[str, list[str]] = {}
    for block in text.strip().split("\n\n"):
        lines = [line for line in block.strip().splitlines() if not line.startswith("Timeout (")]
        if not lines:
            continue
        header, frames = lines[0], "\n".join(lines[1 : _FRAMES_SHOWN + 1])
        if len(lines) > _FRAMES_SHOWN + 1:
            frames += f"\n  ... ({len(lines) - 1 - _FRAMES_SHOWN} outer frames)"
        words = header.split()
        ident = words[words.index("thread") + 1] if "thread" in words else (words[1] if len(words) > 1 else header)
        groups.setdefault(frames, []).append(ident)
    parts = []
    for frames, idents in sorted(groups.items(), key=lambda kv: len(kv[1])):
        shown = ", ".join(idents[:4]) + (f", ... ({len(idents) - 4} more)" if len(idents) > 4 else "")
        parts.append(f"{len(idents)} thread(s) [{shown}] at (innermost first):\n{frames}")
    return "\n".join(parts)


def _read(handle: IO[bytes]) -> str:
    handle.seek(0)
    return handle.read().decode(errors="replace")


def run_isolated(
    body: Callable[[], None],
    limit: float,
    what: str,
    progress: Optional[Callable[[], str]] = None,
    fork: bool = True,
) -> None:
    """Run ``body`` where a hang is survivable; raise AssertionError with its failure or the stuck stacks.

    ``limit``: seconds the body may take in all. The call returns within about
    ``limit + 8`` s whatever the body does. ``progress()``, called in the child when the
    watchdog fires, says how far the body got (it must not block). ``fork=False``: run in a
    thread as without ``os.fork`` (for handles that do not survive a fork, e.g. a Ray driver's).
    """
    if not CAN_ISOLATE or not fork:
        _run_in_thread(body, limit, what, progress)
        return
    with tempfile.TemporaryFile() as result, tempfile.TemporaryFile() as stacks:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # else the child's os._exit-free copy of the buffers could print twice
        with warnings.catch_warnings():
            # Python >= 3.12 warns that forking a threaded process may deadlock the child: the child
            # runs only the body and the kit's own threads (locks it inherits are the risk the
            # watchdog covers), and a run with -W error must not turn the warning into a failure.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            _child(body, limit, what, result, stacks, progress)
        deadline = time.monotonic() + limit + _FAULTHANDLER_AFTER_S + _KILL_AFTER_S
        status: Optional[int] = None
        while status is None:
            waited, raw = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                status = raw
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                status = os.waitpid(pid, 0)[1]
            else:
                time.sleep(0.02)
        text = _read(result)
        if text:
            outcome: dict[str, Any] = json.loads(text)
            if outcome["ok"]:
                return
            raise AssertionError(outcome["message"])
        dumped = group_faulthandler_dump(_read(stacks))
        how = (
            f"killed by signal {os.WTERMSIG(status)}"
            if os.WIFSIGNALED(status)
            else f"exit status {os.WEXITSTATUS(status)}"
        )
        raise AssertionError(
            _clip(
                f"{what}: the child process did not report within {limit:.0f}s, and neither the test's own checks "
                f"nor the kit's watchdog thread could run: a thread holds the GIL for ever ({how}). "
                f"Stacks at the deadline (faulthandler; the odd one out, "
                f"listed first, is usually the GIL holder):\n{dumped or '(none written)'}"
            )
        )


def _run_in_thread(body: Callable[[], None], limit: float, what: str, progress: Optional[Callable[[], str]]) -> None:
    failure: list[BaseException] = []

    def run() -> None:
        try:
            body()
        except BaseException as exc:  # judged below
            failure.append(exc)

    thread = threading.Thread(target=run, name="kit-isolated-body", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        state = f" {progress()}." if progress is not None else ""
        raise AssertionError(
            _clip(
                f"{what}: still running after {limit:.0f}s: deadlock or livelock.{state} "
                f"(No os.fork here, so the stuck threads stay behind as daemons.)\n"
                f"{describe_threads()}"
            )
        )
    if failure:
        raise failure[0]
