"""The fault-injection harness's check can fail: hand-written logs with each fault are reported.

And the harness fails fast: its own SIGKILLs are expected, but a worker that dies on its
own stops the run within seconds, naming the worker; a drain that cannot finish names the
workers still running with their stacks. Real ``forkserver`` processes on a real ``shm``
queue; the faults are played by worker hooks (module-level functions here).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest
from _helpers import fail_in

from fault_injection.core import _ACK, _GOT, FaultResult, _check, _log_path, _Worker, run_faults
from stress.backends import descriptor_factory

FAIL_FAST_SECONDS = 10.0
"""A run that fails fast reports well within this; without fail-fast these runs take far longer."""


def _write(path: str, records: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(b"".join(records))


def _scenario(
    tmp: Path, acked: int, got: list[tuple[int, int, int, int]], killed_producer: bool = False, consumer_kills: int = 0
) -> FaultResult:
    producer, consumer = _Worker("p", 0), _Worker("c", 0)
    producer.incarnation = consumer.incarnation = 0
    if killed_producer:
        producer.killed.add(0)
    _write(_log_path(str(tmp), "p", 0, 0), [_ACK.pack(s) for s in range(acked)])
    _write(_log_path(str(tmp), "c", 0, 0), [_GOT.pack(*g) for g in got])
    result = FaultResult(consumer_kills=consumer_kills)
    _check(result, [producer, consumer], str(tmp), batch=1)
    return result


def test_clean_logs_pass(tmp_path: Path) -> None:
    result = _scenario(tmp_path, 3, [(0, 0, 0, 1), (0, 0, 1, 1), (0, 0, 2, 1)])
    assert result.ok, result.problems
    assert (result.acked, result.got, result.lost) == (3, 3, 0)


def test_in_flight_item_of_a_killed_producer_is_allowed(tmp_path: Path) -> None:
    result = _scenario(tmp_path, 2, [(0, 0, 0, 1), (0, 0, 1, 1), (0, 0, 2, 1)], killed_producer=True)
    assert result.ok, result.problems
    assert result.in_flight_delivered == 1


def test_unacked_item_of_a_live_producer_is_invented(tmp_path: Path) -> None:
    result = _scenario(tmp_path, 2, [(0, 0, 0, 1), (0, 0, 1, 1), (0, 0, 2, 1)])
    assert not result.ok and result.invented == 1


@pytest.mark.parametrize(
    ("got", "kills", "problem"),
    [
        ([(0, 0, 0, 1), (0, 0, 2, 1)], 0, "lost, more than"),
        ([(0, 0, 0, 1), (0, 0, 1, 1), (0, 0, 1, 1), (0, 0, 2, 1)], 0, "duplicated"),
        ([(0, 0, 1, 1), (0, 0, 0, 1), (0, 0, 2, 1)], 0, "out of per-producer order"),
        ([(0, 0, 0, 1), (0, 0, 1, 0), (0, 0, 2, 1)], 0, "corrupt"),
    ],
)
def test_faults_are_reported(tmp_path: Path, got: list[tuple[int, int, int, int]], kills: int, problem: str) -> None:
    result = _scenario(tmp_path, 3, got, consumer_kills=kills)
    assert not result.ok
    assert any(problem in p for p in result.problems), result.problems


def test_one_loss_per_consumer_kill_is_within_the_bound(tmp_path: Path) -> None:
    result = _scenario(tmp_path, 3, [(0, 0, 0, 1), (0, 0, 2, 1)], consumer_kills=1)
    assert result.ok, result.problems
    assert result.lost == 1 and result.lost_bound == 1
    assert os.path.exists(_log_path(str(tmp_path), "p", 0, 0))


# -- fail fast, with real processes ----------------------------------------------------------


def _run(hook: functools.partial[None], *, kills: int, drain_timeout: float = 60.0) -> tuple[FaultResult, float]:
    start = time.monotonic()
    result = run_faults(
        descriptor_factory("shm", capacity_bytes=4096, prefix="tfaultfast"),
        producers=2, consumers=2, kills=kills, drain_timeout=drain_timeout, worker_hook=hook,
    )
    return result, time.monotonic() - start


@pytest.mark.timeout(30)
def test_a_consumer_exiting_on_its_own_fails_fast() -> None:
    # 2000 kills would take about a minute: the run must stop at the first unexpected death.
    result, seconds = _run(functools.partial(fail_in, "consumer", 0, 20, "exit"), kills=2000)
    assert seconds < FAIL_FAST_SECONDS, result.summary()
    assert result.kills < 2000
    [problem] = result.problems
    assert problem.startswith("consumer 0.") and "(pid " in problem and "died: exit code 3" in problem, problem


@pytest.mark.timeout(30)
def test_a_producer_raising_fails_fast_with_its_traceback() -> None:
    result, seconds = _run(functools.partial(fail_in, "producer", 1, 5, "raise"), kills=2000)
    assert seconds < FAIL_FAST_SECONDS, result.summary()
    [problem] = result.problems
    assert problem.startswith("producer 1.") and "died: exit code 1" in problem, problem
    assert "ValueError: injected by the test" in problem  # its stderr, captured


@pytest.mark.timeout(30)
def test_a_consumer_stuck_in_the_drain_is_named_with_its_stack() -> None:
    result, seconds = _run(functools.partial(fail_in, "consumer", 1, 0, "hang"), kills=5, drain_timeout=2.0)
    assert seconds < FAIL_FAST_SECONDS, result.summary()
    assert "not finished within 2.0 s" in result.problems[0], result.problems
    stuck = [p for p in result.problems if p.startswith("consumer 1.")]
    assert len(stuck) == 1 and "still running" in stuck[0] and "items logged" in stuck[0], result.problems
    assert "in _hang" in stuck[0]  # faulthandler's dump says where it waits
