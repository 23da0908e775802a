"""The fault-injection harness's check can fail: hand-written logs with each fault are reported."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fault_injection.core import _ACK, _GOT, FaultResult, _check, _log_path, _Worker


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
