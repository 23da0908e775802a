"""The kit's isolation of deadlock-prone tests (conformance/_isolation.py), tested directly.

A body run by ``run_isolated`` must be judged whatever it does: pass, fail with its own
message, deadlock with the GIL released (the watchdog thread reports the stacks), or
hold the GIL for ever (faulthandler reports them) — always within the limit plus a few
seconds, never leaving a process behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

import pytest

from conformance import _isolation
from conformance._isolation import run_isolated

pytestmark = pytest.mark.skipif(not _isolation.CAN_ISOLATE, reason="needs os.fork")


def _children() -> set[int]:
    with open(f"/proc/self/task/{os.getpid()}/children") as fh:
        return {int(p) for p in fh.read().split()}


def test_a_passing_body_passes() -> None:
    before = _children()
    run_isolated(lambda: None, 5.0, "nothing")
    assert _children() == before, "the child was not reaped"


def test_a_failing_body_reports_its_own_message() -> None:
    def body() -> None:
        raise AssertionError("lost 3 items")

    with pytest.raises(AssertionError, match=r"^lost 3 items") as info:
        run_isolated(body, 5.0, "failing")
    assert "in the child process" in str(info.value)


def test_a_deadlock_that_releases_the_gil_is_reported_by_the_watchdog() -> None:
    def body() -> None:
        lock = threading.Lock()
        lock.acquire()
        threading.Thread(target=lock.acquire, name="waits-for-ever", daemon=True).start()
        lock.acquire()  # the main thread too

    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_isolated(body, 1.0, "self-deadlock", progress=lambda: "at step 2")
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert "still running after 1s" in text and "at step 2" in text, text
    assert "waits-for-ever" in text and "MainThread" in text, text
    assert elapsed < 1.0 + 5.0, f"took {elapsed:.1f}s"


def test_a_thread_holding_the_gil_for_ever_is_reported_by_faulthandler() -> None:
    def body() -> None:
        libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.sleep(3600)  # through PyDLL: the GIL stays held, no other thread runs Python

    before = _children()
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_isolated(body, 1.0, "GIL held")
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert "holds the GIL for ever" in text, text
    assert "in body" in text, f"the GIL holder's frame is not named: {text}"
    assert elapsed < 1.0 + _isolation._FAULTHANDLER_AFTER_S + _isolation._KILL_AFTER_S + 2.0, f"took {elapsed:.1f}s"
    assert _children() == before, "the child was not reaped"


def test_without_fork_a_thread_is_joined_with_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_isolation, "CAN_ISOLATE", False)
    release = threading.Event()

    def body() -> None:
        release.wait(30)

    try:
        with pytest.raises(AssertionError, match="still running after 1s"):
            run_isolated(body, 1.0, "in a thread")
    finally:
        release.set()

    def raises() -> None:
        raise ValueError("own error")

    with pytest.raises(ValueError, match="own error"):
        run_isolated(raises, 5.0, "raises")
