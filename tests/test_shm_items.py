"""``shm`` items: an undecodable item costs only itself (SHM8), and huge maxsize values (SHM7)."""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sage_queue import QueueDescriptor, resolve_descriptor

pytestmark = pytest.mark.timeout(60)


class Undecodable(Exception):
    pass


def _explode(tag: str) -> None:
    raise Undecodable(tag)


class BadItem:
    """Pickles fine; unpickling it raises Undecodable (as a class the getter cannot import would)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return (_explode, (self.tag,))


@pytest.fixture
def make() -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def new(**kw: Any) -> Any:
        q = resolve_descriptor(QueueDescriptor.create_shm_queue(f"t-items-{uuid.uuid4().hex[:12]}", **kw))
        made.append(q)
        return q

    yield new
    for q in made:
        try:
            resolve_descriptor(q.descriptor).destroy()
        except Exception:
            pass
        q.close()


@pytest.mark.spec("SHM8")
def test_get_many_returns_the_items_before_an_undecodable_one_and_loses_only_it(make: Callable[..., Any]) -> None:
    q = make()
    q.put_many(["a", "b", BadItem("bad"), "c", "d"])
    assert q.get_many(10, timeout=5) == ["a", "b"]  # the good ones before it
    assert q.qsize() == 3  # the bad one is still at the head
    with pytest.raises(Undecodable, match="bad"):
        q.get_many(10, timeout=5)  # taken alone: removed, its error raised
    assert q.get_many(10, timeout=5) == ["c", "d"]  # nothing after it was lost
    assert q.qsize() == 0
    st = q.stats()
    assert (st.puts, st.gets) == (5, 5)


@pytest.mark.spec("SHM8")
def test_get_removes_an_undecodable_item_and_keeps_the_rest(make: Callable[..., Any]) -> None:
    q = make()
    q.put(BadItem("first"))
    q.put("after")
    with pytest.raises(Undecodable, match="first"):
        q.get(timeout=5)
    assert q.get(timeout=5) == "after"


@pytest.mark.spec("SHM8")
def test_an_item_wrapping_round_the_ring_end_decodes_in_get_many(make: Callable[..., Any]) -> None:
    q = make(capacity_bytes=256)
    for round_ in range(20):  # the records walk round the ring, some of them split by its end
        items = [f"{round_}-{i}-" + "x" * (round_ % 13) for i in range(3)]
        q.put_many(items)
        assert q.get_many(10, timeout=5) == items


@pytest.mark.spec("SHM7")
@pytest.mark.parametrize("maxsize", [2**31 - 1, 2**32, 2**32 + 1, 2**63 - 1])
def test_any_maxsize_that_passes_validation_works(make: Callable[..., Any], maxsize: int) -> None:
    q = make(maxsize=maxsize, capacity_bytes=1024)
    assert q.maxsize == maxsize
    q.put_many(list(range(5)))
    q.put("x", timeout=1)
    assert q.get_many(10, timeout=5) == [0, 1, 2, 3, 4, "x"]
    again = resolve_descriptor(q.descriptor)  # attaching compares the header's maxsize
    again.put(pickle.dumps(1))
    assert q.get(timeout=5) == pickle.dumps(1)
    again.close()
