"""The stress harness's ledger check can fail: fed ledgers with each kind of fault, it says so."""

from __future__ import annotations

import array

import pytest

from stress.core import SEQ_BITS, StressResult, _check, make_payload


def _key(producer: int, seq: int) -> int:
    return producer << SEQ_BITS | seq


def _ledger(keys: list[tuple[int, int]], corrupt: int = 0) -> tuple[int, array.array[int]]:
    return corrupt, array.array("Q", [_key(p, s) for p, s in keys])


def _result() -> StressResult:
    return StressResult(producers=2, consumers=2, produced=6, consumed=0, seconds=1.0)


def test_a_perfect_ledger_passes() -> None:
    result = _result()
    _check(result, [_ledger([(0, 0), (1, 0), (0, 1)]), _ledger([(1, 1), (0, 2), (1, 2)])], per_producer=3)
    assert result.ok, result.problems
    assert result.consumed == 6


@pytest.mark.parametrize(
    ("ledgers", "problem"),
    [
        ([_ledger([(0, 0), (0, 1), (0, 2)]), _ledger([(1, 0), (1, 1)])], "1 items lost"),
        ([_ledger([(0, 0), (0, 1), (0, 2), (1, 0)]), _ledger([(1, 0), (1, 1), (1, 2)])], "1 items duplicated"),
        ([_ledger([(0, 0), (0, 1), (0, 2), (5, 0)]), _ledger([(1, 0), (1, 1), (1, 2)])], "1 items invented"),
        ([_ledger([(0, 1), (0, 0), (0, 2)]), _ledger([(1, 0), (1, 1), (1, 2)])], "out of per-producer order"),
        ([_ledger([(0, 0), (0, 1), (0, 2)], corrupt=2), _ledger([(1, 0), (1, 1), (1, 2)])], "2 corrupt"),
    ],
)
def test_each_fault_is_reported(ledgers: list[tuple[int, array.array[int]]], problem: str) -> None:
    result = _result()
    _check(result, ledgers, per_producer=3)
    assert not result.ok
    assert any(problem in p for p in result.problems), result.problems


def test_payloads_differ_per_item() -> None:
    assert make_payload(1, 2, 32) != make_payload(2, 1, 32)
    assert len(make_payload(3, 4, 100)) == 100
