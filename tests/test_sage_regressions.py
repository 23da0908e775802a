"""Regression tests for hangs of the ``sage`` ring, one per bug found (newest last).

Each test names what it broke and fails on the core from before its fix.

* Polling callers never reaped (SAGE11). The stall clock that decides when to check a
  blocking claim's owner for death was per call: a call had to wait the whole grace
  (50 ms) by itself, after its spin-and-yield phase, before anyone looked. Callers that
  only poll (``get_nowait``/``put_nowait``, or timeouts shorter than the grace) never
  did, so one process killed mid-``put`` (or mid-``get``) stalled such a queue for
  good, with no CPU used. The clock is now per handle and across calls
  (``note_blocked()`` in ``sagering.c``), and also ticks during the sched_yield phase,
  which on a loaded machine can outlast a whole timeout by itself (covered by the C
  tests ``test_pollers_reap_*`` in ``sage_queue/_core/tests/test_sagering.c``).

* Blocked calls ignored signals. A ``get``/``put`` without timeout waited in C with the
  GIL released and never came back to the interpreter, so no Python signal handler ran:
  Ctrl-C did nothing, and pytest-timeout (signal method) could not end a test stuck in
  one, which then hung the whole run. The binding now waits in slices of at most 100 ms
  and runs signal handlers between them (``claim_put``/``claim_get`` in
  ``_sage_core.c``); a handler that raises ends the call with its exception.

The processes are real and unrelated (``subprocess`` with only the descriptor's JSON).
The kill must land inside the victim's operation: the victim is stopped (SIGSTOP, and
waited for until it really is stopped) at a few delays after it was given work, the
queue is checked to show the operation unfinished, and only then is it SIGKILLed.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _helpers import sage_queues

from sage_queue import QueueDescriptor, resolve_descriptor

pytest.importorskip("sage_queue._sage_core", reason="the sage C core is not built")

BIG = 32 << 20
"""Item size: copying it takes milliseconds, a window wide enough to stop the copier in."""
RING = 48 << 20
"""Capacity: one BIG record fits, a second one only once the first is given back."""
RECOVERY_S = 3.0
"""Polling budget for the recovery; the fixed core needs about one grace (50 ms)."""

# The children work until stopped and killed by the test; orphaned (the test process
# itself killed), they notice within a second and leave.
_PRODUCER = textwrap.dedent(
    """
    import os, queue, sys
    from sage_queue import resolve_descriptor
    q = resolve_descriptor(sys.argv[1])
    big = bytes(int(sys.argv[2]))
    parent = os.getppid()
    q.put_bytes(b"ready")
    while os.getppid() == parent:
        try:
            q.put_bytes(big, timeout=1.0)
        except queue.Full:
            pass
    """
)

_CONSUMER = textwrap.dedent(
    """
    import os, queue, sys
    from sage_queue import resolve_descriptor
    q = resolve_descriptor(sys.argv[1])
    parent = os.getppid()
    print("ready", flush=True)
    while os.getppid() == parent:
        try:
            q.get_bytes(timeout=1.0)
        except queue.Empty:
            pass
    """
)

STOP_DELAYS_S = (0.0, 0.0005, 0.001, 0.002, 0.003, 0.005)
"""How long after making the victim run to stop it: cycled, so that some stop lands mid-copy."""
STOP_TRIES = 120


@pytest.fixture
def make() -> Iterator[Callable[[], Any]]:
    """make() -> a handle on a new sage ring of RING bytes; destroyed afterwards."""
    with sage_queues(prefix="t-reg", capacity_bytes=RING) as factory:
        yield factory


def _spawn(code: str, q: Any, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, q.descriptor.to_json(), *args], stdout=subprocess.PIPE, text=True
    )


def _kill(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.kill()  # SIGKILL works on a stopped process too
    child.wait(10)
    assert child.stdout is not None
    child.stdout.close()


def _stop(child: subprocess.Popen[str]) -> None:
    """SIGSTOP the child and return once it is really stopped (not merely signalled)."""
    os.kill(child.pid, signal.SIGSTOP)
    _, status = os.waitpid(child.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the child ended instead of stopping (status {status:#x})"


def _poll_until(attempt: Callable[[], bool]) -> float:
    """Call attempt() every millisecond until it returns True; seconds it took (inf if never)."""
    start = time.monotonic()
    while time.monotonic() - start < RECOVERY_S:
        if attempt():
            return time.monotonic() - start
        time.sleep(0.001)
    return float("inf")


def _producer_killed_mid_put(q: Any) -> bool:
    """Leave a claim of a dead producer at the head; False if no stop landed inside a put."""
    child = _spawn(_PRODUCER, q, str(BIG))
    try:
        assert q.get(timeout=30) == b"ready"
        for attempt in range(STOP_TRIES):
            assert len(q.get(timeout=30)) == BIG  # makes room: the child claims its next record
            time.sleep(STOP_DELAYS_S[attempt % len(STOP_DELAYS_S)])
            _stop(child)
            while q.qsize():  # only the stopped child puts: a claim it has not committed stays
                try:
                    assert len(q.get_nowait()) == BIG
                except queue.Empty:
                    return True  # the head is claimed and not committed: stopped inside a put
            os.kill(child.pid, signal.SIGCONT)
        return False
    finally:
        _kill(child)


def _consumer_killed_mid_get(q: Any) -> bool:
    """Leave a claim of a dead consumer at the free cursor; False if no stop landed inside a get."""
    child = _spawn(_CONSUMER, q)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        big = bytes(BIG)
        for attempt in range(STOP_TRIES):
            q.put_bytes(big, timeout=30)
            time.sleep(STOP_DELAYS_S[attempt % len(STOP_DELAYS_S)])
            _stop(child)
            stats = q.stats()
            # claimed by the consumer = put - depth; a get counts itself only at its very end
            if stats.puts - stats.depth > stats.gets:
                return True  # stopped inside a get
            os.kill(child.pid, signal.SIGCONT)
            deadline = time.monotonic() + 30
            while q.stats().gets < stats.puts and time.monotonic() < deadline:
                time.sleep(0.001)
        return False
    finally:
        _kill(child)


@pytest.mark.spec("SAGE11", "SAGE12")
@pytest.mark.timeout(90)
@pytest.mark.parametrize("poll", ["get_nowait", "get_short_timeout"])
def test_polling_consumers_reap_a_producer_killed_mid_put(make: Callable[[], Any], poll: str) -> None:
    q = make()
    assert _producer_killed_mid_put(q), f"no stop landed inside a put in {STOP_TRIES} tries"

    def one_poll() -> bool:
        try:
            q.get_nowait() if poll == "get_nowait" else q.get(timeout=0.01)
        except queue.Empty:
            return bool(q.stats().abandoned)
        raise AssertionError("the dead producer's item was delivered")

    took = _poll_until(one_poll)
    assert took < RECOVERY_S, f"polling with {poll} never reaped the dead producer's claim (queue stalled)"
    q.put("probe")
    assert q.get(timeout=5) == "probe"
    stats = q.stats()
    assert stats.abandoned == 1 and stats.depth == 0, stats


@pytest.mark.spec("SAGE11", "SAGE12")
@pytest.mark.timeout(90)
def test_polling_producers_reap_a_consumer_killed_mid_get(make: Callable[[], Any]) -> None:
    q = make()
    assert _consumer_killed_mid_get(q), f"no stop landed inside a get in {STOP_TRIES} tries"
    big = bytes(BIG)

    def one_poll() -> bool:
        try:
            q.put_nowait(big)  # fits only once the dead reader's record is given back
        except queue.Full:
            return False
        return True

    took = _poll_until(one_poll)
    assert took < RECOVERY_S, "polling with put_nowait never reaped the dead consumer's claim (queue stalled)"
    assert q.get(timeout=5) == big
    stats = q.stats()
    assert stats.abandoned == 1 and stats.depth == 0, stats


_BLOCKED_CALL = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from sage_queue import resolve_descriptor

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    q = resolve_descriptor(sys.argv[1])
    if sys.argv[2] == "put":
        q.put("fills maxsize 1")
    signal.signal(signal.SIGUSR1, handler)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    start = time.monotonic()
    try:
        q.get() if sys.argv[2] == "get" else q.put("never fits")
    except Interrupted:
        print("interrupted after %.2f s" % (time.monotonic() - start), flush=True)
    q.close()
    """
)


@pytest.mark.spec("SAGE13")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["get", "put"])
def test_a_blocked_call_runs_signal_handlers(call: str) -> None:
    # in a child: on a core without the fix the call never returns, and a test blocked in
    # it could not be ended by pytest-timeout either
    name = f"t-reg-{uuid.uuid4().hex[:12]}"
    q = resolve_descriptor(QueueDescriptor.create_sage_queue(name=name, maxsize=1))
    try:
        try:
            out = subprocess.run(
                [sys.executable, "-c", _BLOCKED_CALL, q.descriptor.to_json(), call],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"a blocked {call}() ignored a signal whose handler raises (still blocked after 20 s)")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("interrupted after"), out.stdout
        seconds = float(out.stdout.split()[2])
        assert seconds < 2.0, out.stdout  # the signal came at 0.2 s; slices are 0.1 s
        assert q.qsize() == (1 if call == "put" else 0)  # nothing half-done
    finally:
        q.destroy()


@pytest.mark.spec("SAGE5")
@pytest.mark.timeout(30)
def test_put_on_a_closed_ring_releases_the_callers_buffer(make: Callable[[], Any]) -> None:
    # The binding once took the caller's buffer before checking that the handle was open,
    # and never gave it back: the bytearray could not be resized afterwards (BufferError).
    from sage_queue.backends.sage import FLAG_RAW
    from sage_queue.errors import QueueClosed

    q = make()
    ring = q._ring
    data = bytearray(b"payload")
    q.close()
    with pytest.raises(QueueClosed):
        ring.put(data, FLAG_RAW, 0.0)
    data.extend(b"-still resizable")
    assert data == bytearray(b"payload-still resizable")
