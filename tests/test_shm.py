"""The ``shm`` backend in real processes: attach from JSON, crashes, lifecycle, bad input.

The generic contract is the conformance kit's job (tests/test_conformance_builtin.py);
these tests check what spec/backends/shm.md adds.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import queue
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sage_queue import (
    IncompatibleQueue,
    QueueClosed,
    QueueDescriptor,
    QueueDestroyed,
    QueueNotFound,
    _segment,
    resolve_descriptor,
)
from sage_queue.backends import shm

pytestmark = pytest.mark.timeout(60)

MakeDesc = Callable[..., QueueDescriptor]


@pytest.fixture
def make_desc() -> Iterator[MakeDesc]:
    """New uniquely named shm descriptors; every segment made is removed afterwards."""
    names: list[str] = []

    def make(**kwargs: Any) -> QueueDescriptor:
        name = f"t-{uuid.uuid4().hex[:12]}"
        names.append(name)
        return QueueDescriptor.create_shm_queue(name, **kwargs)

    yield make
    for name in names:
        shm.remove_segment(name)


def _python(code: str, stdin: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], input=stdin, capture_output=True, text=True, timeout=timeout
    )


# -- attaching --------------------------------------------------------------------------


@pytest.mark.spec("SHM1")
def test_subprocess_with_only_the_json_reaches_the_queue(make_desc: MakeDesc) -> None:
    desc = make_desc(maxsize=10)
    q = resolve_descriptor(desc)
    try:
        q.put({"from": "parent", "n": [1, 2, 3]})
        child = _python(
            """
            import sys
            from sage_queue import resolve_descriptor
            q = resolve_descriptor(sys.stdin.read())
            item = q.get(timeout=10)
            q.put(("echo", item))
            q.close()
            """,
            desc.to_json(),
        )
        assert child.returncode == 0, child.stderr
        assert q.get(timeout=5) == ("echo", {"from": "parent", "n": [1, 2, 3]})
        assert q.qsize() == 0
    finally:
        q.destroy()


@pytest.mark.spec("SHM1")
def test_create_false_on_missing_name_is_queue_not_found(make_desc: MakeDesc) -> None:
    desc = make_desc(create=False)
    with pytest.raises(QueueNotFound, match="does not exist"):
        resolve_descriptor(desc)
    assert not os.path.exists(_segment.segment_path("shm", desc.metadata["shm_name"]))


@pytest.mark.spec("SHM1")
def test_create_false_attaches_to_an_existing_queue_and_segment_is_0600(make_desc: MakeDesc) -> None:
    desc = make_desc()
    owner = resolve_descriptor(desc)
    try:
        path = _segment.segment_path("shm", desc.metadata["shm_name"])
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        attach = QueueDescriptor.create_shm_queue(desc.metadata["shm_name"], create=False)
        other = resolve_descriptor(attach)
        other.put("x")
        assert owner.get(timeout=1) == "x"
        other.close()
    finally:
        owner.destroy()


@pytest.mark.spec("SHM4")
@pytest.mark.parametrize(
    ("change", "message"),
    [({"capacity_bytes": 4096}, "capacity_bytes 1048576, descriptor says 4096"), ({"maxsize": 7}, "maxsize 0")],
)
def test_attach_with_other_parameters_is_incompatible(
    make_desc: MakeDesc, change: dict[str, int], message: str
) -> None:
    desc = make_desc()
    owner = resolve_descriptor(desc)
    try:
        other = QueueDescriptor.create_shm_queue(desc.metadata["shm_name"], **change)
        with pytest.raises(IncompatibleQueue, match=message):
            resolve_descriptor(other)
    finally:
        owner.destroy()


@pytest.mark.spec("SHM4")
def test_foreign_segment_and_other_layout_version_are_refused(make_desc: MakeDesc) -> None:
    desc = make_desc(capacity_bytes=4096)
    name = desc.metadata["shm_name"]
    seg = _segment.Segment.open("shm", name, 4096 + 4096, create=True)
    try:
        seg.buf[0:8] = b"NOTOURS!"
        with pytest.raises(IncompatibleQueue, match="not an shm queue"):
            resolve_descriptor(desc)
        seg.buf[0:8] = shm.MAGIC
        struct.pack_into("I", seg.buf, shm.VERSION_OFFSET, 99)
        with pytest.raises(IncompatibleQueue, match="layout version 99"):
            resolve_descriptor(desc)
    finally:
        seg.close()
        seg.unlink()


@pytest.mark.spec("SHM4")
@pytest.mark.timeout(20)
def test_segment_whose_creator_died_before_the_magic_is_refused_not_hung(make_desc: MakeDesc) -> None:
    desc = make_desc(capacity_bytes=4096)
    seg = _segment.Segment.open("shm", desc.metadata["shm_name"], 4096 + 4096, create=True)
    try:
        start = time.monotonic()
        with pytest.raises(IncompatibleQueue, match="never finished"):
            resolve_descriptor(desc)
        assert time.monotonic() - start < 5
    finally:
        seg.close()
        seg.unlink()


# -- lifecycle ------------------------------------------------------------------------------


def _attach_put_exit(text: str) -> None:
    q = resolve_descriptor(text)
    q.put("left by a child")
    # no close(): the interpreter exits with the handle open, as a crashing worker would


@pytest.mark.spec("SHM2")
def test_spawn_child_exit_does_not_unlink_the_segment(make_desc: MakeDesc) -> None:
    desc = make_desc()
    q = resolve_descriptor(desc)
    try:
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=_attach_put_exit, args=(desc.to_json(),))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        time.sleep(0.2)  # a resource_tracker would unlink right after the child's exit
        assert os.path.exists(_segment.segment_path("shm", desc.metadata["shm_name"]))
        fresh = resolve_descriptor(QueueDescriptor.create_shm_queue(desc.metadata["shm_name"], create=False))
        assert fresh.get(timeout=1) == "left by a child"
        fresh.close()
    finally:
        q.destroy()


@pytest.mark.spec("SHM3", "E13")
def test_destroy_unlinks_and_closes_every_other_handle(make_desc: MakeDesc) -> None:
    desc = make_desc()
    a, b = resolve_descriptor(desc), resolve_descriptor(desc)
    a.put(1)
    errors: list[BaseException] = []

    def blocked_get() -> None:
        try:
            b.get()  # gets the 1, then blocks on the empty queue
            b.get()
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=blocked_get)
    waiter.start()
    time.sleep(0.2)
    start = time.monotonic()
    a.destroy()
    waiter.join(2)
    assert not waiter.is_alive()
    assert time.monotonic() - start < 1.0
    assert len(errors) == 1 and type(errors[0]) is QueueDestroyed  # the woken call (E13)
    assert not os.path.exists(_segment.segment_path("shm", desc.metadata["shm_name"]))
    with pytest.raises(QueueDestroyed):
        b.put(2)
    assert b.closed  # it found the queue gone: closed itself
    with pytest.raises(QueueDestroyed):
        b.destroy()  # already destroyed by a
    with pytest.raises(QueueDestroyed):
        a.qsize()  # destroyed through this very handle: still QueueDestroyed, not plain QueueClosed
    again = resolve_descriptor(desc)  # create=true: a new, empty queue under the same name
    assert again.qsize() == 0
    again.destroy()


def _destroy_from_other_process(text: str) -> None:
    resolve_descriptor(text).destroy()


@pytest.mark.spec("SHM3")
def test_destroy_in_another_process_wakes_a_blocked_getter(make_desc: MakeDesc) -> None:
    desc = make_desc()
    q = resolve_descriptor(desc)
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_destroy_from_other_process, args=(desc.to_json(),))
    child.start()
    try:
        with pytest.raises(QueueClosed, match="destroyed"):
            q.get(timeout=30)
    finally:
        child.join(30)
    assert child.exitcode == 0
    q.close()


@pytest.mark.spec("SHM5")
def test_pid_table_records_processes_once_and_clears_on_close(make_desc: MakeDesc) -> None:
    desc = make_desc()
    name = desc.metadata["shm_name"]
    a, b = resolve_descriptor(desc), resolve_descriptor(desc)
    try:
        info = shm.describe_segment(name)
        assert info.attached_pids == (os.getpid(),)
        assert info.creator_pid == os.getpid() and info.format_version == shm.LAYOUT_VERSION
        b.put("x")
        assert shm.describe_segment(name).depth == 1
        b.close()
        assert shm.describe_segment(name).attached_pids == (os.getpid(),)  # a is still open
        child = _python(
            """
            import os, sys
            from sage_queue import resolve_descriptor
            from sage_queue.backends import shm
            q = resolve_descriptor(sys.stdin.read())
            print(sorted(shm.describe_segment(q.descriptor.metadata["shm_name"]).attached_pids))
            print(os.getpid())
            os._exit(0)  # dies without closing: its pid stays recorded, and dead
            """,
            desc.to_json(),
        )
        assert child.returncode == 0, child.stderr
        listed, child_pid = child.stdout.split("\n")[:2]
        assert json.loads(listed) == sorted([os.getpid(), int(child_pid)])
        info = shm.describe_segment(name)
        assert int(child_pid) in info.attached_pids and not info.orphan  # we are alive
    finally:
        a.destroy()


def _put_from_fork(q: Any) -> None:
    q.put(("forked", os.getpid()))


@pytest.mark.spec("SHM5")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_uses_the_inherited_handle_and_records_itself(make_desc: MakeDesc) -> None:
    desc = make_desc()
    q = resolve_descriptor(desc)
    try:
        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=_put_from_fork, args=(q,))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        tag, pid = q.get(timeout=5)
        assert tag == "forked" and pid == child.pid
        assert child.pid in shm.describe_segment(desc.metadata["shm_name"]).attached_pids
    finally:
        q.destroy()


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.spec("SHM6")
def test_item_larger_than_capacity_is_value_error_at_once(make_desc: MakeDesc) -> None:
    q = resolve_descriptor(make_desc(capacity_bytes=4096))
    try:
        q.put("small")
        start = time.monotonic()
        with pytest.raises(ValueError, match="capacity_bytes"):
            q.put(b"x" * 5000)  # blocking put: still refused at once
        with pytest.raises(ValueError, match="capacity_bytes"):
            q.put_many([b"x" * 1500] * 3)
        assert time.monotonic() - start < 0.5
        assert q.qsize() == 1 and q.get_nowait() == "small"
        q.put(b"y" * (4096 - 8 - 64))  # fits with its header: accepted
        assert len(q.get_nowait()) == 4096 - 8 - 64
    finally:
        q.destroy()


@pytest.mark.spec("SHM6")
def test_unpicklable_item_raises_the_pickling_error_and_changes_nothing(make_desc: MakeDesc) -> None:
    q = resolve_descriptor(make_desc(maxsize=5))
    try:
        q.put(1)
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            q.put(lambda: None)
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            q.put_many([2, threading.Lock(), 3])
        assert q.qsize() == 1 and q.stats().puts == 1
        assert q.get_nowait() == 1
        with pytest.raises(queue.Empty):
            q.get_nowait()
    finally:
        q.destroy()


@pytest.mark.spec("SHM7")
def test_bytes_bound_and_maxsize_both_block(make_desc: MakeDesc) -> None:
    q = resolve_descriptor(make_desc(capacity_bytes=1024, maxsize=3))
    try:
        for i in range(3):
            q.put(i)
        with pytest.raises(queue.Full):
            q.put(3, timeout=0.05)  # maxsize
        assert [q.get_nowait() for _ in range(3)] == [0, 1, 2]
        q.put(b"a" * 600)
        with pytest.raises(queue.Full):
            q.put(b"b" * 600, timeout=0.05)  # bytes
        with pytest.raises(ValueError, match="maxsize"):
            q.put_many([1, 2, 3, 4])
        assert q.get_nowait() == b"a" * 600
        # wrap-around: records cross the end of the ring many times, order kept
        for i in range(200):
            q.put(bytes([i % 256]) * (i % 300))
            assert q.get_nowait() == bytes([i % 256]) * (i % 300)
    finally:
        q.destroy()


@pytest.mark.spec("SHM8")
def test_get_removes_the_item_before_unpickling(make_desc: MakeDesc, monkeypatch: pytest.MonkeyPatch) -> None:
    # A class living in a module that only this process has: the child cannot unpickle it.
    module = types.ModuleType("sageq_only_in_the_parent")
    exec("class Local:\n    pass\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    desc = make_desc()
    q = resolve_descriptor(desc)
    try:
        q.put(module.Local())
        child = _python(
            """
            import sys
            from sage_queue import resolve_descriptor
            q = resolve_descriptor(sys.stdin.read())
            try:
                q.get(timeout=10)
            except ModuleNotFoundError as exc:
                print("error", exc.name)
            print(q.qsize())
            """,
            desc.to_json(),
        )
        assert child.returncode == 0, child.stderr
        assert child.stdout.split() == ["error", "sageq_only_in_the_parent", "0"]  # the item is gone
    finally:
        q.destroy()


@pytest.mark.spec("SHM9")
def test_stats_are_queue_wide_across_processes(make_desc: MakeDesc) -> None:
    desc = make_desc()
    q = resolve_descriptor(desc)
    try:
        q.put_many([1, 2, 3])
        child = _python(
            """
            import sys
            from sage_queue import resolve_descriptor
            q = resolve_descriptor(sys.stdin.read())
            q.get(); q.put("c")
            q.close()
            """,
            desc.to_json(),
        )
        assert child.returncode == 0, child.stderr
        stats = q.stats()
        assert (stats.scope, stats.puts, stats.gets, stats.depth) == ("queue", 4, 1, 3)
        assert stats.depth == q.qsize() and stats.capacity_bytes == shm.DEFAULT_CAPACITY_BYTES
        assert stats.bytes_in is None and stats.abandoned is None
    finally:
        q.destroy()


@pytest.mark.spec("SHM10")
@pytest.mark.parametrize("shared_handle", [True, False])
def test_threads_with_shared_or_own_handles_lose_nothing(make_desc: MakeDesc, shared_handle: bool) -> None:
    desc = make_desc(capacity_bytes=2048)  # small ring: wraps and waits on both sides
    main = resolve_descriptor(desc)
    handles = [main if shared_handle else resolve_descriptor(desc) for _ in range(6)]
    per_producer = 2000
    got: list[list[tuple[int, int]]] = [[] for _ in range(3)]

    def produce(h: Any, tag: int) -> None:
        for seq in range(per_producer):
            h.put((tag, seq))

    def consume(h: Any, out: list[tuple[int, int]]) -> None:
        while True:
            item = h.get(timeout=10)
            if item is None:
                return
            out.append(item)

    producers = [threading.Thread(target=produce, args=(handles[i], i)) for i in range(3)]
    consumers = [threading.Thread(target=consume, args=(handles[3 + i], got[i])) for i in range(3)]
    try:
        for t in producers + consumers:
            t.start()
        for t in producers:
            t.join(30)
        for _ in consumers:
            main.put(None)
        for t in consumers:
            t.join(30)
        assert not any(t.is_alive() for t in producers + consumers)
        everything = sorted(item for out in got for item in out)
        assert everything == sorted((tag, seq) for tag in range(3) for seq in range(per_producer))
        for out in got:  # per-producer order as each consumer saw it
            for tag in range(3):
                seqs = [seq for t, seq in out if t == tag]
                assert seqs == sorted(seqs)
    finally:
        for h in set(handles) - {main}:
            h.close()
        main.destroy()


def test_close_under_busy_threads_raises_only_queue_closed(make_desc: MakeDesc) -> None:
    """close() while threads put/get/spin on the handle: each ends with QueueClosed, never a
    ValueError from a buffer unmapped under it, and no item is lost to the close."""
    desc = make_desc(capacity_bytes=1024)
    q = resolve_descriptor(desc)
    observer = resolve_descriptor(desc)
    outcomes: list[BaseException] = []
    taken: list[int] = []
    put_ok: list[int] = []

    def producer(tag: int) -> None:
        try:
            for seq in range(10**9):
                q.put(tag * 10**6 + seq)
                put_ok.append(tag * 10**6 + seq)
        except BaseException as exc:
            outcomes.append(exc)

    def consumer() -> None:
        try:
            while True:
                taken.append(q.get())
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=producer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=consumer) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)
        q.close()
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads)
        assert len(outcomes) == 4 and all(isinstance(e, QueueClosed) for e in outcomes), outcomes
        leftovers = []
        while True:
            try:
                leftovers.append(observer.get_nowait())
            except queue.Empty:
                break
        # Every put that returned was got by a consumer or is still queued (a put interrupted
        # by the close may or may not have landed: it is allowed among the leftovers).
        assert set(put_ok) <= set(taken) | set(leftovers)
        assert len(set(taken)) == len(taken)
    finally:
        observer.destroy()
