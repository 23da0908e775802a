"""Code that runs in the kit's child processes, and :class:`Child`, the parent's view of one.

A child reaches the queue under test through a *source* (see ``conformance/sharing.py``):
the descriptor's JSON text (a ``subprocess`` child: a fresh interpreter), ``hook:`` and a
pickled ``(attach, token)`` pair from the target's ``share()`` (also a fresh interpreter),
or the handle object itself, wrapped in :class:`Inherited`, passed to a ``multiprocessing``
child (inherited by ``fork``, pickled through ``spawn``/``forkserver``). It reports through
its exit status, its stdout/stderr (files the parent reads) or the queue under test itself.
Every wait has a timeout, so a broken backend makes a child fail, never hang.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

__all__ = ["echo_child", "run_child", "main", "DONE_TAG", "STOP_TAG", "Child", "Inherited", "open_source"]

HOOK_PREFIX = "hook:"
"""A source string ``hook:<base64 pickle of (attach, token)>``: the child calls ``attach(token)``."""


@dataclass(frozen=True)
class Inherited:
    """A handle handed to a ``multiprocessing`` child as an argument (inherited or pickled by its context)."""

    handle: Any


Source = Union[str, Inherited]


def open_source(source: Source) -> Any:
    """A handle on the queue ``source`` names, in this (child) process."""
    if isinstance(source, Inherited):
        return source.handle
    if source.startswith(HOOK_PREFIX):
        attach, token = pickle.loads(base64.b64decode(source[len(HOOK_PREFIX) :]))
        return attach(token)
    from sage_queue import resolve_descriptor

    return resolve_descriptor(source)


def _close(handle: Any) -> None:
    """Close a child's handle if it has ``close`` (for multiprocessing.Queue this also flushes its feeder)."""
    close = getattr(handle, "close", None)
    if callable(close):
        close()


DONE_TAG = "kit-child-done"
STOP_TAG = "kit-stop"
_CHILD_WAIT_S = 20.0


def echo_child(source: Source, expected_count: int, wait_s: float = _CHILD_WAIT_S) -> None:
    """Get ``expected_count`` items, check them against the kit's samples, put each one back,
    then put ``(DONE_TAG, pid)``. Exit status 0 = every item arrived intact and in order."""
    from .samples import describe_difference, large_items, sample_items

    expected = (sample_items() + large_items())[:expected_count]
    problems: list[str] = []
    handle = open_source(source)
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
    print("got", flush=True)  # the parent starts getting the echoes only now (they share one queue)
    for item in got:
        handle.put(item, timeout=wait_s)
    handle.put((DONE_TAG, os.getpid()), timeout=wait_s)
    _close(handle)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)


def _produce(source: Source, tag: str, count: int) -> None:
    handle = open_source(source)
    for seq in range(count):
        handle.put((tag, seq), timeout=_CHILD_WAIT_S)
    _close(handle)


def _consume(source: Source) -> None:
    """Get until a STOP_TAG item; print what was got (JSON, one line) on stdout."""
    handle = open_source(source)
    got: list[Any] = []
    while True:
        item = handle.get(timeout=_CHILD_WAIT_S)
        if isinstance(item, tuple) and item[:1] == (STOP_TAG,):
            break
        got.append(item)
    _close(handle)
    print(json.dumps(got), flush=True)


def _churn(source: Source) -> None:
    """Put and get in a loop until killed; says ``ready`` once it has done both once."""
    handle = open_source(source)
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


def _outlive_destroy(source: Source) -> None:
    """Two handles; say ``ready`` with a get() blocked on the first; print (JSON) how that get ended and how
    an operation on the second ended once the parent destroyed the queue."""
    import threading

    blocked, other = open_source(source), open_source(source)
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


def _timed_get(source: Source, timeout_s: str) -> None:
    """Say ``ready``, then one ``get(timeout=timeout_s)``; print (JSON, one line) how it ended: ``["item", x]``
    for a str item, else ``[exception type, message]`` (the parent stops and resumes this process meanwhile)."""
    handle = open_source(source)
    print("ready", flush=True)
    try:
        outcome = ["item", handle.get(timeout=float(timeout_s))]
    except Exception as exc:  # reported to the parent, which judges it
        outcome = [type(exc).__name__, str(exc)[:500]]
    _close(handle)
    print(json.dumps(outcome, default=repr), flush=True)


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


_MODES: dict[str, Callable[..., None]] = {
    "echo": lambda src, n: echo_child(src, int(n)),
    "produce": lambda src, tag, n: _produce(src, tag, int(n)),
    "consume": _consume,
    "churn": _churn,
    "outlive_destroy": _outlive_destroy,
    "timed_get": _timed_get,
}


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``python -c 'from conformance._children import main; main()' MODE ARGS...``."""
    args = sys.argv[1:] if argv is None else argv
    mode, rest = args[0], args[1:]
    if mode == "resolve":
        _try_resolve(rest[0], rest[1] if len(rest) > 1 else "")
    elif mode in _MODES:
        _MODES[mode](*rest)
    else:
        raise SystemExit(f"unknown child mode {mode!r}")


def mp_entry(source: Source, mode: str, args: tuple[str, ...], out_path: str, err_path: str) -> None:
    """A ``multiprocessing`` child: run ``mode`` with stdout/stderr going to the parent's files."""
    with (
        open(out_path, "w", buffering=1, encoding="utf-8") as out,
        open(err_path, "w", buffering=1, encoding="utf-8") as err,
    ):
        sys.stdout, sys.stderr = out, err
        try:
            _MODES[mode](source, *args)
        except SystemExit:
            raise
        except BaseException:
            traceback.print_exc(file=err)
            err.flush()
            raise SystemExit(1) from None
        finally:
            out.flush()


class Child:
    """A child process running one of the modes above, seen from the parent: a ``subprocess`` or a
    ``multiprocessing`` process, with stdout and stderr in files (so reading never blocks)."""

    def __init__(self, proc: Any, out_path: str, err_path: str) -> None:
        self._proc = proc
        self._out_path, self._err_path = out_path, err_path
        self._mp = not isinstance(proc, subprocess.Popen)

    @classmethod
    def start(cls, source: Source, mode: str, *args: str, context: Optional[str] = None) -> Child:
        """``context`` None: a fresh interpreter (``source`` is a string); else a ``multiprocessing`` context
        name (``fork``, ``spawn``, ``forkserver``) and ``source`` may be an :class:`Inherited` handle."""
        out_fd, out_path = tempfile.mkstemp(prefix="kit-child-", suffix=".out")
        err_fd, err_path = tempfile.mkstemp(prefix="kit-child-", suffix=".err")
        try:
            if context is None:
                assert isinstance(source, str), "a fresh interpreter needs a descriptor or a hook token"
                with os.fdopen(out_fd, "w") as out, os.fdopen(err_fd, "w") as err:
                    out_fd = err_fd = -1
                    proc: Any = subprocess.Popen(
                        child_command(mode, source, *args), stdout=out, stderr=err, text=True, env=child_env()
                    )
            else:
                os.close(out_fd)
                os.close(err_fd)
                out_fd = err_fd = -1
                import multiprocessing

                ctx: Any = multiprocessing.get_context(context)
                proc = ctx.Process(target=mp_entry, args=(source, mode, tuple(args), out_path, err_path), daemon=True)
                proc.start()
        except BaseException:
            for fd in (out_fd, err_fd):
                if fd >= 0:
                    os.close(fd)
            for path in (out_path, err_path):
                os.unlink(path)
            raise
        return cls(proc, out_path, err_path)

    @property
    def pid(self) -> int:
        return int(self._proc.pid)

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.exitcode if self._mp else self._proc.poll()  # type: ignore[no-any-return]

    def wait(self, timeout: float) -> Optional[int]:
        """The exit status, or None if the child still runs after ``timeout`` s."""
        if self._mp:
            self._proc.join(timeout)
        else:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        return self.returncode

    def _read(self, path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stdout(self) -> str:
        return self._read(self._out_path)

    def stderr(self) -> str:
        return self._read(self._err_path)

    def readline(self, index: int, timeout: float) -> Optional[str]:
        """The ``index``-th complete line of stdout (without its newline), or None if there is none within
        ``timeout`` s or the child exited without writing it."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.stdout().split("\n")[:-1]  # the last part is incomplete (or empty)
            if len(lines) > index:
                return lines[index]
            if self.returncode is not None and len(self.stdout().split("\n")[:-1]) <= index:
                return None
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)

    def kill(self) -> None:
        if self.returncode is None:
            self._proc.kill()
        self.wait(10.0)

    def stop(self, grace: float = 5.0) -> None:
        """Wait up to ``grace`` s, then kill; remove the output files: no child outlives its test."""
        if self.wait(grace) is None:
            self.kill()
        if self._mp and self.returncode is not None:
            self._proc.close()
        for path in (self._out_path, self._err_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


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
