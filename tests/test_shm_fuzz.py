"""Seeded fuzzing of a live ``shm`` segment (spec/segments.md SEG7, spec/backends/shm.md SHM15, E12, E15).

A child process makes queues, runs random operations on two handles, and between
operations overwrites words of the header and record length words with random or
extreme values. Every operation must then work, or raise a documented error: Empty,
Full, QueueBroken (and from then on QueueBroken on both handles), QueueDestroyed (the
state word hit), or an unpickling error raised by ``pickle.loads`` on bytes read within
bounds (an in-range corruption cannot be told from data, SEG7). Never IndexError,
struct.error, MemoryError, OverflowError, a crash or a hang: the child runs under a
timeout. Short by default; ``SAGE_SOAK=1`` runs many more seeds and rounds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(600)

SOAK = bool(os.environ.get("SAGE_SOAK"))
SEEDS = range(40) if SOAK else range(3)
ROUNDS = 200 if SOAK else 25

CHILD = textwrap.dedent(
    r"""
    import os, pickle, queue, random, sys, traceback, uuid
    from sage_queue import QueueBroken, QueueClosed, QueueDescriptor, QueueDestroyed, resolve_descriptor
    from sage_queue.errors import IncompatibleQueue
    from sage_queue.backends import shm
    from sage_queue.backends.shm import layout as L

    seed, rounds = int(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    HEADER_WORDS = [  # (offset, size) of every header field a peer could scribble on
        (L.CAPACITY_OFFSET, 8), (L.MAXSIZE_OFFSET, 8), (L.INSTANCE_OFFSET, 8), (L.CREATOR_PID_OFFSET, 4),
        (L.STATE_OFFSET, 4), (L.PID_OVERFLOW_OFFSET, 4), (L.P_WORD_OFFSET, 8), (L.P_WORD_OFFSET, 4),
        (L.P_WORD_OFFSET + 4, 4), (L.PUT_SLEEP_EPOCH_OFFSET, 4), (L.PUT_WAITERS_OFFSET, 4),
        (L.PUT_STATS_OFFSET, 8), (L.PUT_STATS_OFFSET + 16, 8), (L.PUT_WOKEN_OFFSET, 8), (L.C_WORD_OFFSET, 8),
        (L.C_WORD_OFFSET, 4), (L.C_WORD_OFFSET + 4, 4), (L.GET_SLEEP_EPOCH_OFFSET, 4),
        (L.GET_WAITERS_OFFSET, 4), (L.GET_STATS_OFFSET, 8), (L.GET_STATS_OFFSET + 16, 8),
        (L.GET_WOKEN_OFFSET, 8), (L.PID_TABLE_OFFSET, 4), (L.PID_TABLE_OFFSET + 4, 4),
    ]

    def value(size):
        top = (1 << (8 * size)) - 1
        return rng.choice([0, 1, 7, 8, top, top - 7, top >> 1, rng.randrange(top + 1), rng.randrange(1 << 12)])

    def corrupt(buf, capacity):
        if rng.random() < 0.6:
            offset, size = rng.choice(HEADER_WORDS)
            if offset == L.STATE_OFFSET and rng.random() < 0.7:
                return "skip"  # the state word is a terminal switch: hit it less often
        else:  # a record length word: at the head, at the tail, or anywhere 8-aligned in the ring
            head = (L.U64.unpack_from(buf, L.C_WORD_OFFSET)[0] & L.MASK32) << 3
            tail = (L.U64.unpack_from(buf, L.P_WORD_OFFSET)[0] & L.MASK32) << 3
            pos = rng.choice([head, tail, rng.randrange(0, capacity, 8)])
            offset, size = L.DATA_OFFSET + (pos % capacity), 8
        new = value(size)
        buf[offset:offset + size] = new.to_bytes(size, sys.byteorder)
        return f"{offset}:{size}={new:#x}"

    def unpickling_error(exc):
        # Raised by pickle.loads on bytes the queue read within bounds (SEG7: in-range
        # corruption is data); the innermost frame is the library's pickle.loads call.
        tb = traceback.extract_tb(exc.__traceback__)
        return bool(tb) and "pickle.loads(" in (tb[-1].line or "")

    def op(q, other):
        kind = rng.randrange(9)
        if kind == 0:
            q.put(("i", rng.randrange(1 << 30), b"x" * rng.randrange(40)), timeout=0.01)
        elif kind == 1:
            q.put_nowait(rng.randrange(1000))
        elif kind == 2:
            q.put_many([rng.randrange(1000) for _ in range(rng.randrange(1, 5))], timeout=0.01)
        elif kind == 3:
            q.get(timeout=0.01)
        elif kind == 4:
            q.get_nowait()
        elif kind == 5:
            q.get_many(rng.randrange(1, 8), timeout=0.01)
        elif kind == 6:
            q.qsize()
        elif kind == 7:
            q.stats()
        else:
            shm.describe_segment(q.descriptor.metadata["shm_name"])

    outcomes = {}
    for r in range(rounds):
        name = f"t-fuzz-{seed}-{r}-{uuid.uuid4().hex[:6]}"
        desc = QueueDescriptor.create_shm_queue(name, capacity_bytes=rng.choice([128, 256, 1024]),
                                                maxsize=rng.choice([0, 0, 3, 50]))
        a, b = resolve_descriptor(desc), resolve_descriptor(desc)
        buf, capacity = a._buf, a.capacity_bytes
        broken = False
        try:
            for step in range(60):
                if rng.random() < 0.15:
                    what = corrupt(buf, capacity)
                q = a if rng.random() < 0.5 else b
                try:
                    op(q, b if q is a else a)
                    outcome = "ok"
                except (queue.Empty, queue.Full):
                    outcome = "empty/full"
                except QueueBroken:
                    outcome = "broken"
                    broken = True
                except ValueError as exc:
                    if "can never fit" not in str(exc):  # a batch longer than maxsize (SHM6)
                        raise
                    outcome = "batch refused"
                except QueueDestroyed:
                    outcome = "destroyed"
                    break
                except QueueClosed:
                    outcome = "closed"  # a handle that saw QueueDestroyed closed itself
                    break
                except Exception as exc:
                    if not unpickling_error(exc):
                        print(f"seed {seed} round {r} step {step}: undocumented {type(exc).__name__}: {exc}")
                        traceback.print_exc()
                        sys.exit(1)
                    outcome = "unpickling error"
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if broken:
                    # Marked in the header: every handle, every operation, from now on.
                    for h in (a, b):
                        for check in (h.qsize, lambda: h.put(1, timeout=0.01), lambda: h.get(timeout=0.01)):
                            try:
                                check()
                            except (QueueBroken, QueueDestroyed):
                                continue
                            print(f"seed {seed} round {r}: a broken queue accepted an operation")
                            sys.exit(1)
                    break
            for h in (a, b):
                try:
                    h.close()
                except QueueClosed:
                    pass
        finally:
            shm.remove_segment(name)
    print("outcomes", sorted(outcomes.items()))
    """
)


@pytest.mark.spec("SEG7", "SHM15", "E12", "E15")
@pytest.mark.parametrize("seed", SEEDS)
def test_a_corrupted_segment_gives_documented_errors_never_a_crash_or_hang(seed: int) -> None:
    try:
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(seed), str(ROUNDS)],
            capture_output=True,
            text=True,
            timeout=1200 if SOAK else 120,
        )
    except subprocess.TimeoutExpired as exc:  # run() killed the child
        pytest.fail(f"seed {seed}: the fuzzed queue hung; output so far: {exc.stdout!r} {exc.stderr!r}")
    assert child.returncode == 0, f"seed {seed}:\n{child.stdout}\n{child.stderr}"
    assert "broken" in child.stdout  # the corruption was seen at least once (the test bites)
