"""A corrupt or hostile ``sage`` segment gives documented errors, never a crash or a hang (E15).

A child process creates rings, puts and gets a little, then overwrites words of the live
segment at random (seeded): the configuration line, the three cursors, the wait words,
participant blocks and their claim entries, and record headers (state and info words).
Then it keeps operating on the queue through the handles it had, through new handles, and
read-only (``describe_segment``). Each call must either work or raise one of the
documented errors: ``QueueBroken`` (a bounds check failed; the queue is then broken for
every handle), ``IncompatibleQueue`` (a new handle found the configuration line changed),
``QueueClosed``/``QueueNotFound`` (the destroyed flag was hit), ``queue.Empty``/
``queue.Full``, or ``TypeError`` from ``get_bytes`` (a record's format flag was hit,
SAGE5). The child runs in its own process so that a segfault is a failed test (the exit
status names the signal) and a hang is one too (the parent's timeout), not the end of
the test run. The child prints each seed before running it, so a failure names the seed
that reproduces it.

Payload bytes are never corrupted: without a checksum no ring can tell a changed payload
from a real one. A record length changed to another in-bounds value can still shift what
a ``get`` returns; the child counts such items (``undetected``) and prints the count, the
limit of bounds checking that ``spec/backends/sage.md`` (SAGE15) states.

``SAGE_SOAK=1`` runs many more seeds (``make soak``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("sage_queue._sage_core", reason="the sage C core is not built")

from sage_queue import _segment

SOAK = os.environ.get("SAGE_SOAK") == "1"
SEEDS = 5000 if SOAK else 60
TIMEOUT_S = 1500 if SOAK else 90

_CHILD = textwrap.dedent(
    r'''
    import faulthandler, mmap, os, queue, random, struct, sys
    from sage_queue import QueueDescriptor, resolve_descriptor
    from sage_queue.errors import IncompatibleQueue, QueueBroken, QueueClosed, QueueNotFound
    from sage_queue import _segment, _sage_core as core
    from sage_queue.backends.sage import describe_segment

    ALLOWED = (QueueBroken, IncompatibleQueue, QueueClosed, QueueNotFound, queue.Empty, queue.Full)
    first, count = int(sys.argv[1]), int(sys.argv[2])
    prefix = f"fz{os.getpid()}"
    undetected = broken = 0

    def item(n):
        return bytes([n % 251]) * n

    def genuine(data):
        return isinstance(data, bytes) and data == item(len(data))

    def mutate(rng, word):
        how = rng.randrange(6)
        if how == 0:
            return rng.getrandbits(64)
        if how == 1:
            return word ^ (1 << rng.randrange(64))
        if how == 2:
            return (word + rng.choice((-64, -16, -1, 1, 8, 16, 64, 4096))) % (1 << 64)
        if how == 3:
            return 0
        if how == 4:
            return 1 << rng.randrange(20, 64)
        return word | 0xFFFFFFFF

    def targets(rng, cap, seg_size):
        """Offsets of 8-byte words of metadata (never payload bytes)."""
        blocks, bsize, line = core.BLOCKS_OFFSET, core.BLOCK_SIZE, core.LINE
        kind = rng.randrange(6)
        if kind == 0:   # configuration line (capacity, maxsize, flags ...)
            return rng.randrange(0, 48, 8)
        if kind == 1:   # cursors T, H, F: pos or meta
            return rng.choice((core.TAIL_OFFSET, core.HEAD_OFFSET, core.FREE_OFFSET)) + rng.choice((0, 8))
        if kind == 2:   # wait words and shared counters
            return rng.randrange(256, 448, 8)
        if kind == 3:   # a participant block's owner line
            return blocks + rng.randrange(3) * bsize + rng.randrange(0, 56, 8)
        if kind == 4:   # a claim entry: state, pos, len, items, progress, next
            return blocks + rng.randrange(3) * bsize + line * (1 + rng.randrange(4)) + rng.randrange(0, 48, 8)
        # a record header: state or info word at a 16-aligned ring offset
        return core.DATA_OFFSET + rng.randrange(0, cap, 16) + rng.choice((0, 8))

    def run_ops(rng, handles, name, attach_only):
        global undetected
        for _ in range(rng.randrange(10, 40)):
            q = rng.choice(handles)
            op = rng.randrange(9)
            try:
                if op <= 2:
                    q.put_bytes(item(rng.randrange(0, 300)), timeout=rng.choice((0, 0.005)))
                elif op <= 5:
                    got = q.get_bytes(timeout=rng.choice((0, 0.005)))
                    if not genuine(got):
                        undetected += 1
                elif op == 6:
                    q.put_many_bytes([item(rng.randrange(0, 100)) for _ in range(rng.randrange(1, 5))], timeout=0)
                elif op == 7:
                    q.qsize()
                    q.stats()
                else:
                    describe_segment(name)
                    handles.append(resolve_descriptor(attach_only))
            except TypeError as exc:  # get_bytes on a record whose format flag was hit
                assert "pickled item" in str(exc), exc
            except ALLOWED:
                pass

    for seed in range(first, first + count):
        print("seed", seed, flush=True)
        faulthandler.dump_traceback_later(20, exit=True)  # a hang names its Python stack, then exits 1
        rng = random.Random(seed)
        name = f"{prefix}-{seed}"
        cap = rng.choice((1024, 4096, 65536))
        maxsize = rng.choice((0, 0, 40))
        desc = QueueDescriptor.create_sage_queue(name=name, capacity_bytes=cap, maxsize=maxsize)
        attach_only = QueueDescriptor.create_sage_queue(name=name, capacity_bytes=cap, maxsize=maxsize, create=False)
        q = resolve_descriptor(desc)
        q2 = resolve_descriptor(desc)
        handles = [q, q2]
        try:
            for h in handles:
                h._ring.set_grace(0.001)  # reap at once: the reaper reads entries too
            for _ in range(rng.randrange(0, 30)):
                try:
                    if rng.random() < 0.6:
                        rng.choice(handles).put_bytes(item(rng.randrange(0, 300)), timeout=0)
                    else:
                        rng.choice(handles).get_bytes(timeout=0)
                except (queue.Empty, queue.Full):
                    pass
            with open(_segment.segment_path("sage", name), "r+b") as f:
                mm = mmap.mmap(f.fileno(), 0)
                for _ in range(rng.randrange(1, 4)):
                    off = targets(rng, cap, len(mm))
                    (word,) = struct.unpack_from("<Q", mm, off)
                    struct.pack_into("<Q", mm, off, mutate(rng, word))
                mm.close()
            run_ops(rng, handles, name, attach_only)
            try:
                q.qsize()
            except QueueBroken:
                broken += 1
            except ALLOWED:
                pass
        finally:
            for h in handles:
                h.close()
            _segment.unlink("sage", name)
    print(f"done: {count} seeds, {broken} broken, {undetected} undetected", flush=True)
    '''
)


def _leftovers(pid: int) -> list[str]:
    return [name for kind, name in _segment.list_segments("sage") if name.startswith(f"fz{pid}-")]


@pytest.mark.spec("E15", "SAGE15")
@pytest.mark.timeout(TIMEOUT_S + 30)
def test_random_corruption_never_crashes_or_hangs(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with out.open("w") as sink:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, "0", str(SEEDS)], stdout=sink, stderr=subprocess.STDOUT)
        try:
            rc = child.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            rc = None
    for name in _leftovers(child.pid):  # a crashed child leaves its last ring
        _segment.unlink("sage", name)
    text = out.read_text()
    lines = text.splitlines()
    last_seed = next((line for line in reversed(lines) if line.startswith("seed ")), "no seed started")
    assert rc is not None, f"hung (killed after {TIMEOUT_S} s) at {last_seed}:\n{text[-3000:]}"
    how = f"signal {-rc}" if rc < 0 else f"exit {rc}"
    assert rc == 0, f"child failed with {how} at {last_seed}:\n{text[-3000:]}"
    assert lines and lines[-1].startswith(f"done: {SEEDS} seeds"), text[-3000:]
    print(lines[-1])
