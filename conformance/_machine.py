"""A Hypothesis state machine that drives a queue against a model (a bounded deque).

Single-threaded, so every outcome is determined: each operation's result is
predicted from the model, and after every step ``qsize``/``empty``/``full`` must
equal the model's (spec Q16: exact when no operation is in progress).
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from .samples import describe_difference

__all__ = ["build_machine", "item_strategy"]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.binary(max_size=12),
)
item_strategy = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=4), children, max_size=3),
    ),
    max_leaves=8,
)
"""Items whose type and equality must survive the trip (True vs 1, tuple vs list, -0.0 vs 0.0)."""


def _expect_same(put: Any, got: Any) -> None:
    problem = describe_difference(put, got)
    assert problem is None, f"item fidelity (Q4): {problem}"


def build_machine(
    make: Callable[[int], Any], batch: bool, time_scale: float, release: Callable[[Any], None] | None = None
) -> type[RuleBasedStateMachine]:
    """A state-machine class for queues made by ``make(maxsize)``; batch rules only if ``batch``.

    ``release(q)`` (if given) runs after each example, so examples do not pile up queues.
    """
    short = 0.005 * time_scale

    class QueueMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.q: Any = None
            self.maxsize = 0
            self.model: deque[Any] = deque()

        @initialize(maxsize=st.sampled_from([0, 1, 2, 5]))
        def make_queue(self, maxsize: int) -> None:
            self.maxsize = maxsize
            self.q = make(maxsize)

        def room(self, n: int = 1) -> bool:
            return self.maxsize == 0 or len(self.model) + n <= self.maxsize

        @rule(item=item_strategy)
        def put_nowait(self, item: Any) -> None:
            if self.room():
                self.q.put_nowait(item)
                self.model.append(item)
            else:
                with pytest.raises(queue.Full):
                    self.q.put_nowait(item)

        @rule(item=item_strategy)
        def put_with_timeout(self, item: Any) -> None:
            if self.room():
                self.q.put(item, timeout=short)
                self.model.append(item)
            else:
                with pytest.raises(queue.Full):
                    self.q.put(item, timeout=short)

        @rule()
        def get_nowait(self) -> None:
            if self.model:
                _expect_same(self.model.popleft(), self.q.get_nowait())
            else:
                with pytest.raises(queue.Empty):
                    self.q.get_nowait()

        @rule()
        def get_with_timeout(self) -> None:
            if self.model:
                _expect_same(self.model.popleft(), self.q.get(timeout=short))
            else:
                with pytest.raises(queue.Empty):
                    self.q.get(timeout=short)

        @rule(item=item_strategy)
        def put_not_blocking_ignores_timeout(self, item: Any) -> None:
            if self.room():
                self.q.put(item, block=False, timeout=-1)
                self.model.append(item)
            else:
                with pytest.raises(queue.Full):
                    self.q.put(item, block=False, timeout=-1)

        def teardown(self) -> None:
            if self.q is not None and release is not None:
                release(self.q)

        @invariant()
        def sizes_match_model(self) -> None:
            if self.q is None:
                return
            depth = len(self.model)
            assert self.q.qsize() == depth, f"qsize() is {self.q.qsize()}, the queue holds {depth} items"
            assert self.q.empty() == (depth == 0), f"empty() is {self.q.empty()} with {depth} items"
            expect_full = 0 < self.maxsize <= depth
            assert self.q.full() == expect_full, (
                f"full() is {self.q.full()} with {depth} items and maxsize {self.maxsize}"
            )

    if not batch:
        return QueueMachine

    class BatchQueueMachine(QueueMachine):
        @rule(items=st.lists(item_strategy, max_size=4))
        def put_many_not_blocking(self, items: list[Any]) -> None:
            if not items:
                self.q.put_many(items, block=False)
            elif 0 < self.maxsize < len(items):
                with pytest.raises(ValueError):
                    self.q.put_many(items, block=False)
            elif self.room(len(items)):
                self.q.put_many(items, block=False)
                self.model.extend(items)
            else:
                with pytest.raises(queue.Full):
                    self.q.put_many(items, block=False)

        @precondition(lambda self: self.q is not None)
        @rule(max_items=st.integers(min_value=1, max_value=5))
        def get_many_not_blocking(self, max_items: int) -> None:
            if not self.model:
                with pytest.raises(queue.Empty):
                    self.q.get_many(max_items, block=False)
                return
            got = self.q.get_many(max_items, block=False)
            assert isinstance(got, list), f"get_many returned a {type(got).__name__}, not a list"
            assert 1 <= len(got) <= min(max_items, len(self.model)), (
                f"get_many({max_items}) returned {len(got)} items with {len(self.model)} queued"
            )
            for item in got:
                _expect_same(self.model.popleft(), item)

    return BatchQueueMachine
