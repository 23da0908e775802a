"""``stats().errors`` on ``shm`` and ``sage``: the items a get/get_many removed and could not
decode, counted once per item, per queue (SHM9, SAGE7; Q34 for what happens to the item).

Every check reads the counter through a second handle in another process (``spawn``, given
only the descriptor's JSON), and the items are consumed in both directions: by this process
(the child reads the count) and by the child (this process reads the count).
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sage_queue import QueueDescriptor, resolve_descriptor

pytestmark = pytest.mark.timeout(90)

CHILD_TIMEOUT_S = 60.0


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


def _new_descriptor(backend: str) -> QueueDescriptor:
    name = f"t-errs-{uuid.uuid4().hex[:12]}"
    if backend == "shm":
        return QueueDescriptor.create_shm_queue(name)
    return QueueDescriptor.create_sage_queue(name=name, capacity_bytes=64 * 1024)


@pytest.fixture(params=["shm", "sage"])
def q(request: pytest.FixtureRequest) -> Iterator[Any]:
    handle = resolve_descriptor(_new_descriptor(request.param))
    yield handle
    try:
        handle.destroy()
    finally:
        handle.close()


def _drain(take: Callable[[], list[Any]], want: int) -> tuple[list[Any], int]:
    """Call ``take`` until ``want`` good items came back: (the items, how many calls raised Undecodable)."""
    got: list[Any] = []
    raised = 0
    for _ in range(want + 10):  # bounded: each call returns at least one item or raises
        if len(got) >= want:
            break
        try:
            got += take()
        except Undecodable:
            raised += 1
    return got, raised


def _consume_both_ways(handle: Any, prefix: str) -> tuple[list[Any], int]:
    """put good, bad, good and take with get_many; again and take with get. Returns (items, errors raised)."""
    handle.put_many([f"{prefix}1", BadItem(f"{prefix}-many"), f"{prefix}2"])
    got, raised = _drain(lambda: handle.get_many(10, timeout=5), 2)
    for item in (f"{prefix}3", BadItem(f"{prefix}-one"), f"{prefix}4"):
        handle.put(item)
    more, raised_more = _drain(lambda: [handle.get(timeout=5)], 2)
    return got + more, raised + raised_more


def _child(descriptor_json: str, consume: bool, out: Any) -> None:
    """In a spawned process: attach through the JSON alone; optionally consume; send the stats."""
    handle = resolve_descriptor(QueueDescriptor.from_json(descriptor_json))
    try:
        got, raised = _consume_both_ways(handle, "child") if consume else ([], 0)
        s = handle.stats()
        out.send((got, raised, s.errors, s.puts, s.gets, s.depth))
    finally:
        handle.close()


def _in_child(handle: Any, consume: bool) -> tuple[list[Any], int, Any, int, int, int]:
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(handle.descriptor.to_json(), consume, sender))
    child.start()
    try:
        sender.close()
        assert receiver.poll(CHILD_TIMEOUT_S), "the child sent nothing"
        result: tuple[list[Any], int, Any, int, int, int] = receiver.recv()
        child.join(CHILD_TIMEOUT_S)
        assert child.exitcode == 0, f"child exit code {child.exitcode}"
        return result
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
        receiver.close()


@pytest.mark.spec("SHM9", "SAGE7")
def test_errors_counts_each_undecodable_item_once_for_every_handle_in_every_process(q: Any) -> None:
    assert q.stats().errors == 0

    # This process meets two undecodable items (one through get_many, one through get).
    got, raised = _consume_both_ways(q, "here")
    assert got == ["here1", "here2", "here3", "here4"]  # Q34: only the bad items are lost
    assert raised == 2
    mine = q.stats()
    assert (mine.errors, mine.puts, mine.gets, mine.depth) == (2, 6, 6, 0)
    _, _, errors, puts, gets, depth = _in_child(q, consume=False)
    assert (errors, puts, gets, depth) == (2, 6, 6, 0), "another process's handle sees this one's count"

    # The other process meets two more; this handle sees them (the child's handle is closed by now).
    got, raised, errors, puts, gets, depth = _in_child(q, consume=True)
    assert got == ["child1", "child2", "child3", "child4"]
    assert raised == 2
    assert (errors, puts, gets, depth) == (4, 12, 12, 0)
    after = q.stats()
    assert (after.errors, after.puts, after.gets, after.depth) == (4, 12, 12, 0)


@pytest.mark.spec("SHM9", "SAGE7")
def test_errors_does_not_count_good_items_failed_puts_or_empty_gets(q: Any) -> None:
    q.put_many(["a", "b"])
    assert q.get_many(10, timeout=5) == ["a", "b"]
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)
    with pytest.raises(TypeError):
        q.put(threading.Lock())  # cannot be pickled: refused on put, never an item (Q18)
    assert q.stats().errors == 0
    q.put(BadItem("alone"))
    with pytest.raises(Undecodable):
        q.get_many(10, timeout=5)  # the bad item first in the batch: raised at once
    assert q.stats().errors == 1


@pytest.mark.spec("SAGE7", "SAGE5")
def test_sage_get_bytes_on_a_pickled_item_is_not_a_decode_error() -> None:
    handle = resolve_descriptor(_new_descriptor("sage"))
    try:
        handle.put(["pickled"])
        with pytest.raises(TypeError):
            handle.get_bytes(timeout=5)  # consumed (SAGE5), but nothing failed to decode
        assert (handle.stats().errors, handle.qsize()) == (0, 0)
    finally:
        handle.destroy()
        handle.close()


def _drain_child(descriptor_json: str, out: Any) -> None:
    """In a spawned process: take until the queue stays empty, alternating get_many and get."""
    handle = resolve_descriptor(QueueDescriptor.from_json(descriptor_json))
    good = raised = 0
    try:
        for call in range(100_000):  # bounded; ends at the first Empty
            try:
                good += len(handle.get_many(3, timeout=0.5)) if call % 2 else int(handle.get(timeout=0.5) is not None)
            except Undecodable:
                raised += 1
            except queue.Empty:
                break
        out.send((good, raised))
    finally:
        handle.close()


@pytest.mark.spec("SHM9", "SAGE7", "SHM10", "SAGE9")
def test_errors_is_exact_with_several_consumer_processes(q: Any) -> None:
    items: list[Any] = [BadItem(f"bad{i}") if i % 4 == 1 else i for i in range(240)]
    q.put_many(items[:120])
    q.put_many(items[120:])
    bad = sum(isinstance(item, BadItem) for item in items)
    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(3)]
    children = [ctx.Process(target=_drain_child, args=(q.descriptor.to_json(), w)) for _, w in pipes]
    for child in children:
        child.start()
    try:
        results = []
        for receiver, sender in pipes:
            sender.close()
            assert receiver.poll(CHILD_TIMEOUT_S), "a child sent nothing"
            results.append(receiver.recv())
        for child in children:
            child.join(CHILD_TIMEOUT_S)
            assert child.exitcode == 0
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
                child.join(5)
        for receiver, _ in pipes:
            receiver.close()
    assert sum(good for good, _ in results) == len(items) - bad  # Q34: nothing else lost
    assert sum(raised for _, raised in results) == bad
    s = q.stats()
    assert (s.errors, s.gets, s.depth) == (bad, len(items), 0)
