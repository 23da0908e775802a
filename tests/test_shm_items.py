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


def _payload_for_record(size: int) -> bytes:
    """A bytes item whose record (length word + pickle + padding) takes exactly ``size`` bytes."""
    for k in range(size):
        if 8 + ((len(pickle.dumps(b"x" * k, pickle.HIGHEST_PROTOCOL)) + 7) & ~7) == size:
            return b"x" * k
    raise AssertionError(size)


@pytest.mark.spec("SHM8", "SHM10")
@pytest.mark.parametrize("how", ["get", "get_many"])
@pytest.mark.parametrize("first", [56, 48, 40])
@pytest.mark.parametrize("second", [b"", b"ab", b"z" * 20])
def test_records_split_at_every_place_by_the_ring_end(
    make: Callable[..., Any], how: str, first: int, second: bytes
) -> None:
    # capacity 64, empty: a first record of 56 bytes puts the next length word in the ring's
    # last 8 bytes and its payload at offset 0; 48 and 40 split the payload itself.
    q = make(capacity_bytes=64)
    filler = _payload_for_record(first)
    q.put(filler)
    assert q.get(timeout=5) == filler
    q.put(second)
    if how == "get":
        assert q.get(timeout=5) == second
    else:
        assert q.get_many(5, timeout=5) == [second]
    # The exact bytes copied out (unpickling ignores trailing bytes, so compare the record).
    q.put(filler)
    q.get(timeout=5)
    q.put(second)
    assert q._take(1, 5.0, False) == [pickle.dumps(second, pickle.HIGHEST_PROTOCOL)]
    q.put(filler[: first // 4])  # and the ring goes on from wherever that left it
    assert q.get_many(5, timeout=5) == [filler[: first // 4]]
