"""The one checker (stress.checker) can fail: fed histories with each kind of fault, it gives the right verdict.

Histories are written by hand as the workers would log them (stress.history), so every
rule is checked on both sides: the clean history passes, the faulty one names its fault.
"""

from __future__ import annotations

from typing import Optional

import pytest

from stress.checker import CONTRACT, NO_PROMISE, PROMISES, CheckReport, Promise, check
from stress.history import FAIL, GET, INVOKE, OK, PUT, TIMEOUT, HistoryLog, Op, Tag, read_history

T = 0.5  # every call's timeout


def put(p: str, t: float, tags: list[Tag], kind: int = OK, took: float = 0.001) -> list[Op]:
    return [Op(p, INVOKE, PUT, t, T, tuple(tags)), Op(p, kind, PUT, t + took, T)]


def get(c: str, t: float, tags: list[Tag], took: float = 0.001, corrupt: int = 0, asked: int = 1) -> list[Op]:
    return [Op(c, INVOKE, GET, t, T, asked=asked), Op(c, OK, GET, t + took, T, tuple(tags), corrupt=corrupt)]


def producer(n: int, slot: int = 0, inc: int = 0) -> list[Op]:
    name = f"p{slot}.{inc}"
    return [op for s in range(n) for op in put(name, s * 0.01, [(slot, inc, s)])]


def consumer(tags: list[Tag], name: str = "c0.0") -> list[Op]:
    return [op for i, tag in enumerate(tags) for op in get(name, 1 + i * 0.01, [tag])]


def judge(
    history: dict[str, list[Op]],
    promise: Promise = CONTRACT,
    killed: Optional[set[str]] = None,
    deadlock: bool = False,
    end: Optional[float] = None,
    queue_kills: tuple[float, ...] = (),
) -> CheckReport:
    return check(
        history,
        promise,
        killed=frozenset(killed or ()),
        queue_kills=queue_kills,
        deadlock=deadlock,
        end=end,
        seed=7,
    )


ALL = [(0, 0, s) for s in range(3)]


def test_a_clean_history_passes_with_its_counts() -> None:
    report = judge({"p0.0": producer(3), "c0.0": consumer(ALL)})
    assert report.ok and report.verdict == "OK", report.problems
    assert (report.acked, report.got, report.lost, report.seed) == (3, 3, 0, 7)
    assert report.latency_ms["get"]["p50"] == pytest.approx(1.0) and report.throughput > 0


@pytest.mark.parametrize(
    ("got", "count", "problem"),
    [
        ([(0, 0, 0), (0, 0, 2)], "lost", "1 acked items lost, more than the 0 allowed"),
        ([(0, 0, 0), (0, 0, 1), (0, 0, 1), (0, 0, 2)], "duplicated", "1 items delivered more than once"),
        ([*ALL, (5, 0, 0)], "unexpected", "1 unexpected items"),
        ([(0, 0, 1), (0, 0, 0), (0, 0, 2)], "out_of_order", "1 items out of per-producer order"),
    ],
)
def test_each_fault_breaks_the_promise(got: list[Tag], count: str, problem: str) -> None:
    report = judge({"p0.0": producer(3), "c0.0": consumer(got)})
    assert getattr(report, count) == 1
    assert not report.ok and report.verdict == "BROKEN"
    assert any(problem in p for p in report.problems), report.problems


def test_a_corrupt_item_breaks_the_promise() -> None:
    history = {"p0.0": producer(1), "c0.0": get("c0.0", 1.0, [(0, 0, 0)], corrupt=1)}
    report = judge(history)
    assert report.corrupt == 1 and any("corrupt" in p for p in report.problems)


def test_an_item_of_a_timed_out_put_is_unexpected() -> None:
    # A put that timed out put nothing (queue contract): delivering its item is inventing one.
    history = {"p0.0": put("p0.0", 0.0, [(0, 0, 0)], kind=TIMEOUT), "c0.0": consumer([(0, 0, 0)])}
    report = judge(history)
    assert (report.refused, report.unexpected) == (1, 1) and not report.ok


def test_a_call_past_its_timeout_is_an_overrun() -> None:
    slow = put("p0.0", 0.0, [(0, 0, 0)], took=T + 2.5)  # timeout 0.5 + default slack 2.0 < 3.0
    report = judge({"p0.0": slow, "c0.0": consumer([(0, 0, 0)])})
    assert report.overruns == 1 and any("later than their timeout" in p for p in report.problems)
    # shm's lock waits are not bounded by the timeout (SHM11): the same history is noted, not broken.
    shm = judge({"p0.0": slow, "c0.0": consumer([(0, 0, 0)])}, PROMISES["shm"])
    assert shm.ok and shm.overruns == 1 and shm.notes


def test_a_killed_get_may_lose_its_batch_and_no_more() -> None:
    in_flight = [Op("c0.0", INVOKE, GET, 2.0, T, asked=2)]  # killed inside get_many(2)
    two_lost = {"p0.0": producer(4), "c0.0": consumer([(0, 0, 0), (0, 0, 1)]) + in_flight}
    report = judge(two_lost, killed={"c0.0"})
    assert report.ok and (report.lost, report.lost_bound) == (2, 2), report.problems
    three_lost = {"p0.0": producer(4), "c0.0": consumer([(0, 0, 0)]) + in_flight}
    report = judge(three_lost, killed={"c0.0"})
    assert not report.ok and (report.lost, report.lost_bound) == (3, 2)
    # A promise of no loss at all (e.g. an exactly-once backend) refuses even the batch.
    strict = Promise("strict", (), loss_per_killed_get=False)
    assert not judge(two_lost, strict, killed={"c0.0"}).ok


def test_a_killed_producers_put_in_flight_may_or_may_not_be_delivered() -> None:
    in_flight = [*producer(2), Op("p0.0", INVOKE, PUT, 1.0, T, ((0, 0, 2),))]
    for got in (ALL, ALL[:2]):
        report = judge({"p0.0": in_flight, "c0.0": consumer(got)}, killed={"p0.0"})
        assert report.ok, report.problems
    # The same history from a producer nobody killed: its call never completed, which is a harness error.
    assert not judge({"p0.0": in_flight, "c0.0": consumer(ALL)}).ok


def test_a_failed_put_is_indeterminate() -> None:
    history = {"p0.0": put("p0.0", 0.0, [(0, 0, 0)], kind=FAIL), "c0.0": consumer([])}
    report = judge(history)
    assert report.ok and report.indeterminate == 1


def test_a_deadlock_breaks_every_promise_and_counts_stuck_calls() -> None:
    stuck = [*consumer([(0, 0, 0)]), Op("c0.0", INVOKE, GET, 2.0, T, asked=1)]
    report = judge({"p0.0": producer(3), "c0.0": stuck}, deadlock=True, end=20.0)
    assert report.deadlock and report.stuck == 1 and report.lost == 2
    assert any("did not finish" in p for p in report.problems)
    assert any("never returned" in p for p in report.problems)


def test_no_promise_counts_but_never_breaks() -> None:
    report = judge({"p0.0": producer(3), "c0.0": consumer([(0, 0, 0)])}, NO_PROMISE)
    assert report.lost == 2 and report.ok and report.verdict == "no promise" and report.notes


def test_the_log_format_round_trips_and_ignores_a_torn_tail(tmp_path: object) -> None:
    path = f"{tmp_path}/c.log"
    log = HistoryLog(path)
    log.invoke_get(2, T)
    log.ok_get([(0, 1, 2, True), (0, 1, 3, False)], T)
    log.invoke_put([(1, 0, 9)], None)
    log.complete(OK, PUT, None)
    log.close()
    with open(path, "ab") as f:
        f.write(b"\x01\x01")  # half a header
    ops = read_history(path, "c0.0")
    assert [(o.kind, o.op) for o in ops] == [(INVOKE, GET), (OK, GET), (INVOKE, PUT), (OK, PUT)]
    assert ops[0].asked == 2 and ops[1].items == ((0, 1, 2), (0, 1, 3)) and ops[1].corrupt == 1
    assert ops[2].items == ((1, 0, 9),) and ops[2].timeout is None and ops[0].timeout == T


# -- a kill of what holds the queue (a Ray actor: RAY9, RAY10, RAY14) ------------------------------

FOUR = [(0, 0, s) for s in range(4)]  # producer(4) invokes their puts at 0.00, 0.01, 0.02, 0.03


@pytest.mark.spec("RAY14")
def test_a_queue_kill_allows_the_loss_of_items_put_before_it_and_of_nothing_put_later() -> None:
    ray = PROMISES["ray_actor"]
    # Seen dead at 0.015: items 0 and 1 were put before (they may have been in the actor), 2 and 3 after.
    before_lost = judge({"p0.0": producer(4), "c0.0": consumer(FOUR[2:])}, ray, queue_kills=(0.015,))
    assert before_lost.ok, before_lost.problems
    assert (before_lost.lost, before_lost.lost_at_kill, before_lost.lost_bound, before_lost.queue_kills) == (2, 2, 2, 1)
    # An item put after the kill went to the new, empty incarnation: losing it breaks the promise.
    after_lost = judge({"p0.0": producer(4), "c0.0": consumer(FOUR[:2])}, ray, queue_kills=(0.015,))
    assert not after_lost.ok and (after_lost.lost, after_lost.lost_at_kill) == (2, 0)
    assert any("2 acked items lost, more than the 0 allowed" in p for p in after_lost.problems), after_lost.problems
    # Several kills: the loss allowed is that of items put before the last one seen.
    two_kills = judge({"p0.0": producer(4), "c0.0": consumer(FOUR[3:])}, ray, queue_kills=(0.005, 0.025))
    assert two_kills.ok and two_kills.lost == 3
    # No kill recorded: the same loss breaks the promise; and a promise without loss_at_queue_kill (rpc,
    # durable) never allows it.
    assert not judge({"p0.0": producer(4), "c0.0": consumer(FOUR[2:])}, ray).ok
    rpc = judge({"p0.0": producer(4), "c0.0": consumer(FOUR[2:])}, PROMISES["rpc"], queue_kills=(0.015,))
    assert not rpc.ok and rpc.lost_at_kill == 2 and rpc.lost_bound == 0


@pytest.mark.spec("RAY14")
def test_a_queue_kill_excuses_no_duplicate_no_disorder_and_no_invented_item() -> None:
    ray = PROMISES["ray_actor"]
    for got, count in (
        ([FOUR[1], FOUR[1]], "duplicated"),
        ([FOUR[2], FOUR[1]], "out_of_order"),
        ([FOUR[2], (9, 0, 0)], "unexpected"),
    ):
        report = judge({"p0.0": producer(4), "c0.0": consumer(got)}, ray, queue_kills=(0.025,))
        assert getattr(report, count) == 1 and not report.ok, (count, report.problems)


def test_survivable_failures_are_counted_and_rpc_calls_may_take_their_grace() -> None:
    failed_get = [Op("c0.0", INVOKE, GET, 2.0, T, asked=1), Op("c0.0", FAIL, GET, 5.5, T)]  # took nothing
    history = {"p0.0": producer(3), "c0.0": consumer(ALL) + failed_get}
    rpc = judge(history, PROMISES["rpc"])
    assert rpc.ok and rpc.failed == 1, rpc.problems  # 3.5 s: within 0.5 s + 2 s grace (RPC9) + 2 s slack
    assert judge(history).overruns == 1  # the plain contract has no grace
