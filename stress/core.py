"""Supervision of harness children, shared by every harness (stress, faults, bench).

Failing fast: the parent supervises its children instead of joining them one by one.
As soon as any child exits abnormally (non-zero exit code, killed by a signal nobody
sent, an exception) the run stops, the other children are killed, and the verdict names
the dead child (role, index, pid), its exit code or signal and the tail of its stderr
(each child's stderr goes to a file of its own). A run that does not finish by its
deadline names every child still running, with a Python stack dump of each
(:mod:`faulthandler` on ``SIGUSR1``).

The runner itself (targets, workers, the history, scenarios) is :mod:`stress.runner`.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "Verdict",
    "make_payload",
    "ChildHook",
    "Child",
    "child_main",
    "describe_exit",
    "death_report",
    "stuck_reports",
    "abnormal_exits",
    "wait_for_any",
    "stop_children",
    "POLL_SECONDS",
]

ChildHook = Callable[[str, int, int], None]
"""``hook(role, index, done)``, called in a child after each put/get call with the count of
items that child has put/got so far (``role`` is ``"producer"`` or ``"consumer"``). It must
be picklable (a module-level function or a :func:`functools.partial` of one). Meant for
tests of the harness itself: a hook that raises, exits or hangs plays a broken backend."""

POLL_SECONDS = 0.2
"""Longest single wait of the parent: how late it may notice a child that died or a deadline
that passed while it was trying to put a sentinel."""

STACK_DUMP_WAIT = 0.5
"""How long the parent waits for stuck children to write their stack dumps."""


def make_payload(producer_id: int, seq: int, size: int) -> bytes:
    """Deterministic payload bytes for one item (different for every item)."""
    stem = f"{producer_id}:{seq}|".encode()
    return (stem * (size // len(stem) + 1))[:size]


class Verdict:
    """What every harness result shares: ``problems`` says what went wrong, ``ok`` is the verdict.

    A subclass (a dataclass) declares ``problems`` as a field and says in :meth:`counts` what
    the run did; :meth:`summary` is the one line the CLIs print.
    """

    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> str:
        raise NotImplementedError

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED: " + "; ".join(self.problems)
        return f"{self.counts()}: {verdict}"


# -- child supervision (shared with fault_injection.core) ---------------------------------


def child_main(stderr_path: str, target: Callable[..., None], args: tuple[Any, ...]) -> None:
    """Entry point of every harness child: stderr to a file of its own, stacks on SIGUSR1, then ``target``.

    ``dup2`` (not just rebinding ``sys.stderr``) so that C-level writes, the traceback
    multiprocessing prints for an uncaught exception, and faulthandler dumps all land in
    the file the parent reads when it explains a failure.
    """
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    # A forked child inherits the parent's sys.stderr, which may be no file at all (pytest's capture):
    # rebind it to fd 2, for faulthandler (needs a fileno) and for the traceback of an uncaught exception.
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    target(*args)


@dataclass(eq=False)
class Child:
    """One child process of a harness, with what is needed to explain its fate."""

    role: str
    index: int
    process: Any
    stderr_path: str
    incarnation: Optional[int] = None

    @property
    def name(self) -> str:
        which = f"{self.index}" if self.incarnation is None else f"{self.index}.{self.incarnation}"
        return f"{self.role} {which} (pid {self.process.pid})"


def describe_exit(exitcode: Optional[int]) -> str:
    """``exit code 3``, ``killed by SIGKILL``, or ``still running``."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _read_text(path: str, offset: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def stderr_tail(path: str, max_lines: int = 8) -> str:
    """The last lines a child wrote to stderr, joined by `` | `` (one line for a verdict)."""
    lines = [line.rstrip() for line in _read_text(path).splitlines() if line.strip()]
    return " | ".join(lines[-max_lines:])


def death_report(child: Child) -> str:
    """``consumer 1 (pid 4242) died: exit code 3; stderr: ...`` for a verdict."""
    report = f"{child.name} died: {describe_exit(child.process.exitcode)}"
    tail = stderr_tail(child.stderr_path)
    return f"{report}; stderr: {tail}" if tail else report


def stuck_reports(
    children: list[Child], max_frames: int = 4, progress: Optional[Callable[[Child], str]] = None
) -> list[str]:
    """Ask every live child for its Python stack (SIGUSR1) and describe where each one is stuck.

    ``progress(child)``, if given, adds what the child had done (e.g. items logged).
    """
    live = [c for c in children if c.process.is_alive()]
    offsets = {}
    for child in live:
        offsets[child] = os.path.getsize(child.stderr_path) if os.path.exists(child.stderr_path) else 0
        try:
            os.kill(child.process.pid, signal.SIGUSR1)
        except ProcessLookupError:  # died in between: its exit code says why
            pass
    if live:
        time.sleep(STACK_DUMP_WAIT)
    reports = []
    for child in live:
        dump = _read_text(child.stderr_path, offsets[child])
        # faulthandler lists the innermost frame first: the first frames say where it waits.
        frames = [line.strip() for line in dump.splitlines() if line.strip().startswith("File ")]
        where = " < ".join(frames[:max_frames]) if frames else "no stack dump (still starting up?)"
        done = f" ({progress(child)})" if progress is not None else ""
        reports.append(f"{child.name} still running{done}, at: {where}")
    return reports


def abnormal_exits(children: list[Child]) -> list[Child]:
    """Children that have exited with a non-zero code or by a signal."""
    return [c for c in children if c.process.exitcode not in (None, 0)]


def wait_for_any(children: list[Child], timeout: float) -> None:
    """Block until one of the live ``children`` exits, or ``timeout`` seconds pass."""
    live = [c for c in children if c.process.pid is not None and c.process.exitcode is None]
    sentinels = [c.process.sentinel for c in live]
    if any(s is None for s in sentinels):  # a thread worker: no sentinel to wait on, poll
        time.sleep(max(0.0, min(timeout, 0.02)))
    elif sentinels:
        multiprocessing.connection.wait(sentinels, timeout=max(0.0, timeout))
    else:
        time.sleep(0)


def stop_children(children: list[Child], join_timeout: float = 5.0) -> None:
    """SIGKILL every live child, then reap each one (bounded); children never started are skipped."""
    started = [c for c in children if c.process.pid is not None]
    for child in started:
        if child.process.is_alive():
            child.process.kill()
    for child in started:
        child.process.join(join_timeout)
