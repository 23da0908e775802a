"""The ``sage`` backend's own behaviour (spec/backends/sage.md), with real processes.

The generic QueueLike contract is the conformance kit's job (``python -m conformance
--backend sage``); this file checks what is specific to the C ring: the segment's
name and lifecycle, attaching from an unrelated process, the raw and out-of-band
modes, the statistics, many producers and consumers in separate processes, and
processes SIGKILLed in the middle of their operations.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import queue
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sage_queue import (
    IncompatibleQueue,
    QueueClosed,
    QueueDescriptor,
    QueueNotFound,
    resolve_descriptor,
)
from sage_queue._segment import segment_path

pytest.importorskip("sage_queue._sage_core", reason="the sage C core is not built")

from _helpers import sage_queues

from sage_queue.backends.sage import SAGEQueueStub, describe_segment

FORK = multiprocessing.get_context("fork")


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make() -> Iterator[Any]:
    """make(**kw) -> a handle on a new sage queue; every queue is destroyed afterwards."""
    with sage_queues() as factory:
        yield factory


# -- segment and lifecycle ---------------------------------------------------------------


@pytest.mark.spec("SAGE1")
def test_segment_name_mode_and_unlink(make: Any) -> None:
    q = make(capacity_bytes=1 << 16)
    path = segment_path("sage", q.descriptor.metadata["shm_name"])
    assert os.path.exists(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    other = resolve_descriptor(q.descriptor)
    other.close()
    assert os.path.exists(path), "closing a handle must not unlink the segment"
    q.put("x")
    q.destroy()
    assert not os.path.exists(path), "destroy() unlinks the segment"


@pytest.mark.spec("SAGE2")
def test_destroy_closes_other_handles_and_recreates(make: Any) -> None:
    q = make()
    other = resolve_descriptor(q.descriptor)
    q.put(1)
    q.destroy()
    with pytest.raises(QueueClosed):
        other.get_nowait()
    other.close()
    again = resolve_descriptor(q.descriptor)
    try:
        assert again.qsize() == 0
    finally:
        again.destroy()


@pytest.mark.spec("SAGE2")
def test_attach_only_and_incompatible(make: Any) -> None:
    name = _name()
    with pytest.raises(QueueNotFound):
        resolve_descriptor(QueueDescriptor.create_sage_queue(name=name, create=False))
    q = make(name=name, capacity_bytes=1 << 16, maxsize=3)
    with pytest.raises(IncompatibleQueue, match="capacity_bytes"):
        resolve_descriptor(QueueDescriptor.create_sage_queue(name=name, capacity_bytes=1 << 17, maxsize=3))
    attached = resolve_descriptor(
        QueueDescriptor.create_sage_queue(name=name, capacity_bytes=1 << 16, maxsize=3, create=False)
    )
    q.put("hello")
    assert attached.get(timeout=1) == "hello"
    attached.close()


@pytest.mark.spec("SAGE3")
def test_descriptor_validation_does_not_load_the_core() -> None:
    code = textwrap.dedent(
        """
        import sys
        from sage_queue import QueueDescriptor
        d = QueueDescriptor.create_sage_queue(name="lazy-check", capacity_bytes=4096)
        QueueDescriptor.from_json(d.to_json())
        print("loaded" if "sage_queue._sage_core" in sys.modules else "lazy")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy"


@pytest.mark.spec("SAGE3")
def test_missing_core_is_backend_unavailable() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["sage_queue._sage_core"] = None  # as if the extension were not built
        from sage_queue import BackendUnavailable, QueueDescriptor, resolve_descriptor
        d = QueueDescriptor.create_sage_queue(name="never-created")
        try:
            resolve_descriptor(d)
        except BackendUnavailable as exc:
            print("unavailable:", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "unavailable:" in out.stdout and "build" in out.stdout
    assert not os.path.exists(segment_path("sage", "never-created"))


@pytest.mark.spec("SAGE4")
def test_describe_segment(make: Any) -> None:
    q = make(capacity_bytes=1 << 16, maxsize=10)
    q.put_many([1, 2, 3])
    info = describe_segment(q.descriptor.metadata["shm_name"])
    assert info.kind == "sage"
    assert info.depth == 3
    assert os.getpid() in info.attached_pids
    assert info.creator_pid == os.getpid()
    assert not info.orphan


# -- item formats ----------------------------------------------------------------------------


@pytest.mark.spec("SAGE5")
def test_raw_bytes_mode(make: Any) -> None:
    q = make()
    q.put_bytes(bytearray(b"abc"))
    q.put_bytes(memoryview(b"defg"))
    q.put_many_bytes([b"1", b"22"])
    assert q.get_bytes() == b"abc"
    assert q.get() == b"defg"  # raw records read back as bytes through get() too
    assert q.get_many(5) == [b"1", b"22"]
    q.put({"pickled": True})
    with pytest.raises(TypeError, match="pickled"):
        q.get_bytes()


@pytest.mark.spec("SAGE6")
def test_out_of_band_buffers_land_in_one_bytearray(make: Any) -> None:
    np = pytest.importorskip("numpy")
    q = make(capacity_bytes=32 << 20)
    array = np.arange(2_000_000, dtype=np.float64)  # 16 MB: travels out of band
    q.put({"a": array, "tag": "x"})
    got = q.get(timeout=5)
    assert got["tag"] == "x"
    assert np.array_equal(got["a"], array)
    # copied once out of the ring straight into the buffer the array uses
    base = got["a"]
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, bytearray)
    data = os.urandom(1 << 20)
    q.put(data)
    assert q.get(timeout=5) == data


@pytest.mark.spec("SAGE7")
def test_stats_counts_bytes_waits(make: Any) -> None:
    q = make(maxsize=1)
    q.put(b"12345")
    with pytest.raises(queue.Full):
        q.put(b"x", timeout=0.05)
    s = q.stats()
    assert (s.puts, s.gets, s.depth) == (1, 0, 1)
    assert s.bytes_in == 5 and s.waits == 1 and s.abandoned == 0
    assert s.capacity_bytes == q.descriptor.metadata["capacity_bytes"]
    assert q.get() == b"12345"
    s = q.stats()
    assert (s.gets, s.bytes_out, s.depth) == (1, 5, 0)


# -- processes ---------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    from sage_queue import resolve_descriptor
    q = resolve_descriptor(sys.argv[1])
    for i in range(int(sys.argv[2])):
        q.put(("child", i, b"x" * (i % 300)))
    q.put_many([("batch", i) for i in range(50)])
    reply = resolve_descriptor(sys.argv[3])
    print(reply.get(timeout=10))
    q.close()
    """
)


@pytest.mark.spec("SAGE8")
@pytest.mark.timeout(60)
def test_subprocess_with_only_the_json(make: Any) -> None:
    q = make(capacity_bytes=8192)  # small: the child's 2000 records go around many laps
    replies = make()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, q.descriptor.to_json(), "2000", replies.descriptor.to_json()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        got = [q.get(timeout=10) for _ in range(2050)]
        replies.put("reply")
        out, _ = child.communicate(timeout=30)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0
    assert out.strip() == "reply"
    assert got[:2000] == [("child", i, b"x" * (i % 300)) for i in range(2000)]
    assert got[2000:] == [("batch", i) for i in range(50)]


def _producer(desc: str, pid_index: int, count: int, batch: int) -> None:
    q = resolve_descriptor(desc)
    pack = struct.Struct("<II").pack
    for start in range(0, count, batch):
        q.put_many_bytes([pack(pid_index, i) for i in range(start, min(count, start + batch))])
    q.close()


def _consumer(desc: str, total: int, out_path: str, counter: Any) -> None:
    q = resolve_descriptor(desc)
    chunks = []
    while True:
        with counter.get_lock():
            if counter.value >= total:
                break
        try:
            got = q.get_many(512, timeout=0.05)
        except queue.Empty:
            continue
        with counter.get_lock():
            counter.value += len(got)
        chunks.append(b"".join(got))
    Path(out_path).write_bytes(b"".join(chunks))
    q.close()


@pytest.mark.spec("SAGE9")
@pytest.mark.timeout(120)
def test_four_by_four_processes_one_million_items(make: Any, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    producers, consumers, per_producer = 4, 4, 250_000
    total = producers * per_producer
    q = make(capacity_bytes=1 << 20)
    desc = q.descriptor.to_json()
    counter = FORK.Value("q", 0)
    outs = [str(tmp_path / f"c{i}.bin") for i in range(consumers)]
    procs = [FORK.Process(target=_consumer, args=(desc, total, outs[i], counter)) for i in range(consumers)]
    procs += [FORK.Process(target=_producer, args=(desc, p, per_producer, 100)) for p in range(producers)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(100)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    seen = np.zeros((producers, per_producer), dtype=np.int64)
    for path in outs:
        items = np.frombuffer(Path(path).read_bytes(), dtype=np.uint32).reshape(-1, 2)
        for pid in range(producers):
            seqs = items[items[:, 0] == pid, 1]
            assert np.all(np.diff(seqs.astype(np.int64)) > 0), "per-producer order broken in one consumer"
        np.add.at(seen, (items[:, 0], items[:, 1]), 1)
    assert int(seen.min()) == 1 and int(seen.max()) == 1, "items lost or duplicated"
    stats = q.stats()
    assert stats.puts == total and stats.gets == total and stats.depth == 0 and stats.abandoned == 0


# -- SIGKILL -------------------------------------------------------------------------------------

_ITEM = struct.Struct("<IIQ")  # incarnation, seq, checksum


def _item(incarnation: int, seq: int) -> bytes:
    body = _ITEM.pack(incarnation, seq, (incarnation * 1_000_003 + seq) * 2654435761 % (1 << 64))
    return body + bytes([seq % 251]) * (seq % 97)  # variable length: records of many sizes


def _kill_producer(desc: str, incarnation: int) -> None:
    q = resolve_descriptor(desc)
    for seq in range(10**9):
        q.put(_item(incarnation, seq))


def _kill_consumer(desc: str, log_path: str) -> None:
    # every item is recorded (one unbuffered write) before the next get: a SIGKILL loses
    # at most the item of the get in progress
    q = resolve_descriptor(desc)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    while True:
        try:
            data = q.get(timeout=0.05)
        except queue.Empty:
            continue
        os.write(fd, struct.pack("<I", len(data)) + data)


def _read_log(path: Path) -> list[bytes]:
    raw = path.read_bytes() if path.exists() else b""
    out, pos = [], 0
    while pos + 4 <= len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            break  # killed in the middle of its own log write: not a queue item
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def run_kill_storm(desc: QueueDescriptor, kills: int, tmp_path: Path, seed: int) -> dict[str, int]:
    """2 producers + 2 consumers; SIGKILL a random one `kills` times, restarting it; then verify."""
    rng = random.Random(seed)
    text = desc.to_json()
    incarnation = 0
    logs: list[Path] = []

    def start_producer() -> Any:
        nonlocal incarnation
        incarnation += 1
        p = FORK.Process(target=_kill_producer, args=(text, incarnation), daemon=True)
        p.start()
        return p

    def start_consumer() -> Any:
        log = tmp_path / f"log{len(logs)}.bin"
        logs.append(log)
        p = FORK.Process(target=_kill_consumer, args=(text, str(log)), daemon=True)
        p.start()
        return p

    producers = [start_producer(), start_producer()]
    consumers = [start_consumer(), start_consumer()]
    killed = {"producer": 0, "consumer": 0}
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.002, 0.03))
            side = rng.choice(("producer", "consumer"))
            pool = producers if side == "producer" else consumers
            i = rng.randrange(len(pool))
            os.kill(pool[i].pid, signal.SIGKILL)
            pool[i].join()
            killed[side] += 1
            pool[i] = start_producer() if side == "producer" else start_consumer()
        for p in producers:  # stop producing, then let the consumers drain
            os.kill(p.pid, signal.SIGKILL)
            p.join()
        killed["producer"] += len(producers)
        q = resolve_descriptor(desc)
        try:
            deadline = time.monotonic() + 30
            while q.qsize() and time.monotonic() < deadline:
                time.sleep(0.05)
            # the queue still works end to end (no deadlock, nothing stuck at the head)
            q.put(b"final-probe")
            time.sleep(0.3)
            stats = q.stats()
        finally:
            q.close()
    finally:
        for p in producers + consumers:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join()
    received: dict[int, list[int]] = {}
    corrupt = dup = 0
    seen: set[tuple[int, int]] = set()
    probe = 0
    for log in logs:
        last: dict[int, int] = {}
        for data in _read_log(log):
            if data == b"final-probe":
                probe += 1
                continue
            inc, seq, check = _ITEM.unpack_from(data)
            if data != _item(inc, seq) or check != (inc * 1_000_003 + seq) * 2654435761 % (1 << 64):
                corrupt += 1
                continue
            if (inc, seq) in seen:
                dup += 1
            seen.add((inc, seq))
            assert seq > last.get(inc, -1), f"order of producer {inc} broken within one consumer"
            last[inc] = seq
            received.setdefault(inc, []).append(seq)
    gaps = sum(max(seqs) + 1 - len(set(seqs)) for seqs in received.values())
    return {
        "corrupt": corrupt,
        "duplicates": dup,
        "gaps": gaps,
        "probe": probe,
        "items": len(seen),
        "consumer_kills": killed["consumer"],
        "producer_kills": killed["producer"],
        "abandoned": stats.abandoned or 0,
        "depth_after": stats.depth,
    }


def _check_storm(result: dict[str, int]) -> None:
    assert result["corrupt"] == 0, result
    assert result["duplicates"] == 0, result
    assert result["probe"] == 1, f"the queue stopped delivering after the kills: {result}"
    # a killed consumer loses at most the item it was getting; a killed producer only the item
    # it was putting, which is its last (so it leaves no gap)
    assert result["gaps"] <= result["consumer_kills"], result
    assert result["abandoned"] <= result["consumer_kills"] + result["producer_kills"], result
    assert result["depth_after"] == 0, result
    assert result["items"] > 1000, result


@pytest.mark.spec("SAGE11", "SAGE12")
@pytest.mark.timeout(120)
def test_sigkill_storm_100_kills(make: Any, tmp_path: Path) -> None:
    q = make(capacity_bytes=1 << 14)  # 16 KiB: many laps during the storm
    q.close()
    result = run_kill_storm(q.descriptor, kills=100, tmp_path=tmp_path, seed=5)
    print(json.dumps(result))
    _check_storm(result)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SAGE_SOAK"), reason="soak run: make soak (SAGE_SOAK=1)")
@pytest.mark.spec("SAGE11", "SAGE12")
@pytest.mark.timeout(1800)
def test_sigkill_soak_1000_kills(make: Any, tmp_path: Path) -> None:
    q = make(capacity_bytes=1 << 14)
    q.close()
    result = run_kill_storm(
        q.descriptor, kills=int(os.environ.get("SAGE_SOAK_KILLS", "1000")), tmp_path=tmp_path, seed=int(time.time())
    )
    print(json.dumps(result))
    _check_storm(result)


@pytest.mark.spec("SAGE12")
@pytest.mark.timeout(60)
def test_killed_mid_put_of_a_huge_item_is_abandoned(make: Any) -> None:
    # a 64 MiB copy takes long enough that the kill lands between claim and commit
    q = make(capacity_bytes=128 << 20)
    other = resolve_descriptor(q.descriptor)
    code = textwrap.dedent(
        """
        import sys
        from sage_queue import resolve_descriptor
        q = resolve_descriptor(sys.argv[1])
        q.put(b"before")
        big = bytes(64 << 20)
        print("ready", flush=True)
        while True:
            q.put_bytes(big)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code, q.descriptor.to_json()], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert other.get(timeout=10) == b"before"
        assert other.get(timeout=10) == bytes(64 << 20)  # room again: the child starts its next copy
        time.sleep(0.002)
        child.kill()
        child.wait()
    finally:
        child.kill()
        child.wait()
    drained = 0
    while True:
        try:
            item = q.get(timeout=1.0)
        except queue.Empty:
            break
        assert item == bytes(64 << 20)
        drained += 1
    q.put("still works")
    assert other.get(timeout=2) == "still works"
    s = q.stats()
    assert s.depth == 0 and s.abandoned <= 1, s
    other.close()


@pytest.mark.spec("SAGE13")
@pytest.mark.timeout(60)
def test_blocked_waiter_sleeps(make: Any) -> None:
    q = make()
    code = textwrap.dedent(
        """
        import sys, time, queue, resource
        from sage_queue import resolve_descriptor
        q = resolve_descriptor(sys.argv[1])
        t0 = time.monotonic(); r0 = resource.getrusage(resource.RUSAGE_SELF)
        try:
            q.get(timeout=1.0)
        except queue.Empty:
            pass
        r1 = resource.getrusage(resource.RUSAGE_SELF); wall = time.monotonic() - t0
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        print(wall, cpu)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, q.descriptor.to_json()], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    wall, cpu = map(float, out.stdout.split())
    assert 1.0 <= wall < 1.5
    assert cpu < 0.05 * wall, f"a blocked get used {cpu:.3f}s of CPU in {wall:.2f}s"


def test_pickles_to_descriptor(make: Any) -> None:
    q = make()
    clone = pickle.loads(pickle.dumps(q))
    try:
        assert isinstance(clone, SAGEQueueStub)
        q.put(42)
        assert clone.get(timeout=1) == 42
    finally:
        clone.close()
