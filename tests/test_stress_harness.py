"""The stress run fails fast, and a healthy one passes the checker, in real processes and in threads.

A child that dies (exit code, exception, signal) stops the run within seconds, naming the
child; a stuck child is named with its stack. Real ``forkserver`` processes on a real ``shm``
queue; the faults are played by child hooks (module-level functions, which the children
import by name). The checker's own verdicts are tested in test_harness_checker.py.
"""

from __future__ import annotations

import functools
import signal
import time

import pytest
from _helpers import fail_in

from stress.backends import descriptor_factory
from stress.core import describe_exit, make_payload
from stress.runner import RunResult, run, run_stress, target_for

FAIL_FAST_SECONDS = 10.0
"""A run that fails fast reports well within this; the runs' own timeouts are far longer."""


def test_payloads_differ_per_item() -> None:
    assert make_payload(1, 2, 32) != make_payload(2, 1, 32)
    assert len(make_payload(3, 4, 100)) == 100


def test_exit_codes_are_described() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(None) == "still running"


# -- fail fast, with real processes ----------------------------------------------------------


def _run(hook: functools.partial[None], *, consumers: int = 2, timeout: float = 60.0) -> tuple[RunResult, float]:
    start = time.monotonic()
    result = run_stress(
        # A small ring: with a consumer gone, producers block on a full queue (the old deadlock).
        descriptor_factory("shm", capacity_bytes=4096, maxsize=16, prefix="tfailfast"),
        producers=2,
        consumers=consumers,
        items_per_producer=3000,
        timeout=timeout,
        child_hook=hook,
    )
    return result, time.monotonic() - start


@pytest.mark.timeout(30)
def test_a_healthy_run_passes_the_ledger_check() -> None:
    result = run_stress(
        descriptor_factory("shm", capacity_bytes=4096, prefix="tfailfast"),
        producers=2,
        consumers=2,
        items_per_producer=500,
        timeout=25,
    )
    assert result.ok, result.summary()
    assert result.consumed == result.produced == 1000
    assert result.report is not None and result.report.verdict == "OK"


@pytest.mark.timeout(30)
def test_threads_on_an_in_process_backend_pass_the_checker() -> None:
    result = run(target_for("local", threads=True), producers=3, consumers=2, items_per_producer=300, seed=5)
    assert result.ok, result.summary()
    assert result.consumed == 900 and result.seed == 5


@pytest.mark.timeout(30)
def test_the_only_consumer_exiting_fails_fast_with_its_exit_code() -> None:
    result, seconds = _run(functools.partial(fail_in, "consumer", 0, 10, "exit"), consumers=1)
    assert not result.ok
    assert seconds < FAIL_FAST_SECONDS, result.summary()
    [problem] = result.problems
    assert problem.startswith("consumer 0.0 (pid ") and "died: exit code 3" in problem, problem


@pytest.mark.timeout(30)
def test_a_producer_raising_fails_fast_with_its_traceback() -> None:
    result, seconds = _run(functools.partial(fail_in, "producer", 1, 5, "raise"))
    assert seconds < FAIL_FAST_SECONDS, result.summary()
    [problem] = result.problems
    assert problem.startswith("producer 1.0 (pid ") and "died: exit code 1" in problem, problem
    assert "ValueError: injected by the test" in problem  # its stderr, captured


@pytest.mark.timeout(30)
def test_a_consumer_killed_by_a_signal_is_named_with_the_signal() -> None:
    result, seconds = _run(functools.partial(fail_in, "consumer", 1, 10, "sigkill"))
    assert seconds < FAIL_FAST_SECONDS, result.summary()
    [problem] = result.problems
    assert problem.startswith("consumer 1.0 (pid ") and "killed by SIGKILL" in problem, problem


@pytest.mark.timeout(30)
def test_a_stuck_consumer_is_named_with_its_stack_at_the_deadline() -> None:
    result, seconds = _run(functools.partial(fail_in, "consumer", 1, 1, "hang"), timeout=2.0)
    assert 2.0 <= seconds < FAIL_FAST_SECONDS, result.summary()
    assert "not finished within 2.0 s" in result.problems[0], result.problems
    stuck = [p for p in result.problems if p.startswith("consumer 1.0 (pid ")]
    assert len(stuck) == 1 and "still running" in stuck[0], result.problems
    assert "in _hang" in stuck[0]  # faulthandler's dump says where it waits


@pytest.mark.timeout(30)
def test_a_progress_bar_only_when_asked_or_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    target = target_for("shm", capacity_bytes=4096, prefix="tbar")
    assert run(target, producers=1, consumers=1, items_per_producer=2000, progress=True).ok
    assert "shm stress" in capsys.readouterr().err  # tqdm's label, drawn on stderr
    assert run(target, producers=1, consumers=1, items_per_producer=200).ok  # stderr is no TTY here: no bar
    assert "shm stress" not in capsys.readouterr().err


def _closure_factory() -> object:
    import multiprocess  # type: ignore[import-untyped]

    ctx = multiprocess.get_context("fork")
    return lambda maxsize: ctx.Queue(maxsize)  # a closure: the harness never pickles it (fork inherits)


closure_factory = _closure_factory()


@pytest.mark.timeout(60)
def test_a_module_attr_closure_factory_runs_in_multiprocess_workers() -> None:
    pytest.importorskip("multiprocess")
    target = target_for(f"{__name__}:closure_factory")
    assert target.mode == "object" and target.processes == "multiprocess"
    assert target.promise.judged  # a user's factory is held to the queue contract by default
    result = run(target, producers=2, consumers=2, items_per_producer=300, seed=9)
    assert result.ok, result.summary()
    assert result.consumed == 600
