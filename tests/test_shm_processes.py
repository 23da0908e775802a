"""``shm`` under many processes and under SIGKILL (spec/backends/shm.md SHM10-SHM13).

Uses the generic harnesses (stress/, fault_injection/) with real processes; the bigger
runs are marked ``slow`` (``make soak``).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from fault_injection import run_faults
from sage_queue import QueueDescriptor, resolve_descriptor
from sage_queue.backends import shm
from sage_queue.backends.shm import handle as shm_handle
from sage_queue.backends.shm import layout
from stress import run_stress
from stress.backends import descriptor_factory


def soak(test: Any) -> Any:
    """Long runs: only under ``make soak`` (SAGE_SOAK=1), never in ``make test``."""
    test = pytest.mark.timeout(900)(test)
    test = pytest.mark.skipif(not os.environ.get("SAGE_SOAK"), reason="soak run: set SAGE_SOAK=1 (make soak)")(test)
    return pytest.mark.slow(test)


@pytest.fixture
def desc() -> Iterator[QueueDescriptor]:
    d = QueueDescriptor.create_shm_queue(f"tp-{uuid.uuid4().hex[:12]}", capacity_bytes=64 * 1024)
    yield d
    shm.remove_segment(d.metadata["shm_name"])


@pytest.mark.spec("SHM10")
@pytest.mark.timeout(120)
def test_4_producer_x_4_consumer_processes_100k_items() -> None:
    result = run_stress(
        descriptor_factory("shm", capacity_bytes=256 * 1024, prefix="t4x4"),
        producers=4,
        consumers=4,
        items_per_producer=25_000,
        timeout=100,
    )
    assert result.ok, result.summary()
    assert result.consumed == 100_000


@pytest.mark.spec("SHM10")
@pytest.mark.timeout(120)
def test_batches_from_several_processes_small_ring_and_maxsize() -> None:
    result = run_stress(
        descriptor_factory("shm", capacity_bytes=4096, maxsize=50, prefix="tbatch"),
        producers=3,
        consumers=2,
        items_per_producer=3_000,
        batch=16,
        timeout=100,
    )
    assert result.ok, result.summary()


def _put_batches(text: str, tag: int, batches: int, size: int) -> None:
    q = resolve_descriptor(text)
    for b in range(batches):
        q.put_many([(tag, b, i) for i in range(size)])
    q.close()


@pytest.mark.spec("SHM10")
def test_put_many_is_contiguous_across_processes(desc: QueueDescriptor) -> None:
    q = resolve_descriptor(desc)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_put_batches, args=(desc.to_json(), tag, 40, 20)) for tag in range(3)]
    try:
        for p in procs:
            p.start()
        got = [q.get(timeout=30) for _ in range(3 * 40 * 20)]
    finally:
        for p in procs:
            p.join(30)
        q.destroy()
    assert all(p.exitcode == 0 for p in procs)
    for start in range(0, len(got), 20):
        run = got[start : start + 20]
        assert {(t, b) for t, b, _ in run} == {run[0][:2]}, f"batch split at {start}: {run}"
        assert [i for _, _, i in run] == list(range(20))


@pytest.mark.spec("SHM11", "SHM12")
@pytest.mark.timeout(120)
def test_50_sigkills_of_producers_and_consumers_mid_operation() -> None:
    result = run_faults(
        descriptor_factory("shm", capacity_bytes=16 * 1024, prefix="tfault"),
        producers=2,
        consumers=2,
        kills=50,
        seed=os.getpid(),
        drain_timeout=60,
    )
    assert result.ok, result.summary()
    assert result.kills == 50 and result.producer_kills and result.consumer_kills
    assert result.got > 0


@pytest.mark.spec("SHM11", "SHM12")
@pytest.mark.timeout(120)
def test_sigkills_with_get_many_and_a_tiny_ring() -> None:
    result = run_faults(
        descriptor_factory("shm", capacity_bytes=1024, maxsize=8, prefix="tfault"),
        producers=2,
        consumers=2,
        kills=30,
        batch=4,
        seed=os.getpid() + 1,
        drain_timeout=60,
    )
    assert result.ok, result.summary()


def _hold_lock_then_wait(text: str, side: int, half_put: bool, ready: Any) -> None:
    q = resolve_descriptor(text)
    q._acquire(side)
    if half_put:
        # A producer killed between writing its record and its commit store.
        buf = q._buf
        tail = (layout.U64.unpack_from(buf, layout.P_WORD_OFFSET)[0] & layout.MASK32) << 3
        buf[shm.DATA_OFFSET + tail : shm.DATA_OFFSET + tail + 16] = b"\xff" * 16
    ready.set()
    time.sleep(60)


@pytest.mark.spec("SHM11")
@pytest.mark.parametrize(("side", "half_put"), [(shm.PRODUCER, True), (shm.CONSUMER, False)])
def test_killed_lock_holder_leaves_the_queue_unlocked_and_intact(
    desc: QueueDescriptor, side: int, half_put: bool
) -> None:
    q = resolve_descriptor(desc)
    q.put("before")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock_then_wait, args=(desc.to_json(), side, half_put, ready))
    holder.start()
    got: list[Any] = []
    done = threading.Event()

    def operate() -> None:
        if side == shm.PRODUCER:
            q.put("after")
        else:
            got.append(q.get())
        done.set()

    worker = threading.Thread(target=operate, daemon=True)
    try:
        assert ready.wait(30)
        worker.start()
        time.sleep(0.3)
        assert not done.is_set(), "the lock was not really held"
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        assert done.wait(5), "the kernel did not release the dead holder's lock"
        if side == shm.PRODUCER:
            assert q.get(timeout=5) == "before"
            assert q.get(timeout=5) == "after"
        else:
            assert got == ["before"]
        q.put("later")
        assert q.get(timeout=5) == "later"
        assert q.qsize() == 0
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join(5)
        worker.join(5)
        q.destroy()


@contextmanager
def _spawned(target: Callable[..., None], *args: Any) -> Iterator[tuple[Any, Any]]:
    """A ``spawn`` child running ``target(*args, out)``; yields ``(child, out)``, kills the child on exit if alive."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, out))
    child.start()
    try:
        yield child, out
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)


def _blocked_get_cpu(text: str, seconds: float, out: Any) -> None:
    q = resolve_descriptor(text)
    cpu0, wall0 = time.process_time(), time.monotonic()
    try:
        q.get(timeout=seconds)
    except queue.Empty:
        pass
    out.put((time.process_time() - cpu0, time.monotonic() - wall0))
    q.close()


def _blocked_put_cpu(text: str, seconds: float, out: Any) -> None:
    q = resolve_descriptor(text)
    q.put("fills it")
    cpu0, wall0 = time.process_time(), time.monotonic()
    try:
        q.put("no room", timeout=seconds)
    except queue.Full:
        pass
    out.put((time.process_time() - cpu0, time.monotonic() - wall0))
    q.close()


@pytest.mark.spec("SHM13")
@pytest.mark.parametrize("waiter", [_blocked_get_cpu, _blocked_put_cpu])
def test_blocked_waiter_uses_under_5_percent_of_a_core(waiter: Any) -> None:
    d = QueueDescriptor.create_shm_queue(f"tcpu-{uuid.uuid4().hex[:12]}", maxsize=1)
    q = resolve_descriptor(d)
    try:
        with _spawned(waiter, d.to_json(), 1.5) as (child, out):
            cpu, wall = out.get(timeout=30)
            child.join(10)
    finally:
        q.destroy()
    assert wall >= 1.5
    assert cpu / wall < 0.05, f"blocked waiter used {100 * cpu / wall:.1f}% of a core"


def _timed_gets(text: str, count: int, out: Any) -> None:
    shm_handle.WAIT_SLICE_S = 5.0  # a missed wake-up now costs seconds, not a fraction of the 0.25 s cap
    q = resolve_descriptor(text)
    latencies = []
    for _ in range(count):
        sent = q.get(timeout=20)
        latencies.append(time.monotonic() - sent)
    out.put(latencies)
    q.close()


@pytest.mark.spec("SHM13")
def test_blocked_getter_is_woken_by_the_put_not_by_its_sleep_cap(desc: QueueDescriptor) -> None:
    # A missed wake-up is not a hang (sleeps are capped at WAIT_SLICE_S) but a latency of up
    # to the cap; the child raises its cap to 5 s so that any missed wake-up shows.
    q = resolve_descriptor(desc)
    try:
        with _spawned(_timed_gets, desc.to_json(), 7) as (child, out):
            time.sleep(1.0)  # the child is asleep in get by now
            for _ in range(7):
                q.put(time.monotonic())  # monotonic time is system-wide on Linux
                time.sleep(0.05)
            latencies = sorted(out.get(timeout=30))
            child.join(10)
    finally:
        q.destroy()
    assert latencies[-1] < 1.0, f"wake-up latencies (s): {latencies}"


@soak
def test_soak_1000_sigkills() -> None:
    result = run_faults(
        descriptor_factory("shm", capacity_bytes=8 * 1024, prefix="soak"),
        producers=3,
        consumers=3,
        kills=1000,
        seed=12345,
        drain_timeout=120,
    )
    assert result.ok, result.summary()


@soak
def test_soak_stress_8x8_one_million() -> None:
    result = run_stress(
        descriptor_factory("shm", capacity_bytes=1 << 20, prefix="soak"),
        producers=8,
        consumers=8,
        items_per_producer=125_000,
        timeout=800,
    )
    assert result.ok, result.summary()
