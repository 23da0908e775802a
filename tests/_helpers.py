"""Helpers shared by several test files (imported as ``from _helpers import ...``).

``tests/`` is not a package: pytest's default ``prepend`` import mode puts this folder on
``sys.path`` for every test module in it, in the controller and in each xdist worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sage_queue import (
    QueueClosed,
    QueueDescriptor,
    QueueNotFound,
    register_queue_implementation,
    resolve_descriptor,
    unregister_queue_implementation,
)


def local_meta(**extra: Any) -> dict[str, Any]:
    """Metadata of a valid local descriptor: the required owner_pid (this process) plus ``extra``."""
    return {"owner_pid": os.getpid(), **extra}


@contextmanager
def sage_queues(prefix: str = "t", **defaults: Any) -> Iterator[Callable[..., Any]]:
    """``make(**kw)`` -> a handle on a new sage queue; every queue made is destroyed on exit.

    ``kw`` overrides ``defaults``; a queue gets a unique ``<prefix>-<hex>`` name unless
    ``name`` is given. A queue a test already destroyed is only closed.
    """
    made: list[Any] = []

    def make(**kw: Any) -> Any:
        options = {"name": f"{prefix}-{uuid.uuid4().hex[:12]}", **defaults, **kw}
        q = resolve_descriptor(QueueDescriptor.create_sage_queue(**options))
        made.append(q)
        return q

    try:
        yield make
    finally:
        for q in made:
            try:
                resolve_descriptor(q.descriptor).destroy()
            except (QueueClosed, QueueNotFound):
                pass
            q.close()


@contextmanager
def registered_queue_type(prefix: str, implementation: type) -> Iterator[str]:
    """A fresh queue type ``<prefix>_<hex>`` registered to ``implementation`` inside the with block."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    register_queue_implementation(name, implementation)
    try:
        yield name
    finally:
        unregister_queue_implementation(name)


def fail_in(role: str, index: int, after: int, how: str, hook_role: str, hook_index: int, done: int) -> None:
    """Harness child hook (``functools.partial`` of the first four): the ``index``-th ``role`` fails ``how``
    once it has handled ``after`` items; under fault injection, every incarnation of that slot does.

    ``how``: ``exit`` (``os._exit(3)``), ``raise`` (a ValueError), ``sigkill`` (itself), ``hang`` (in ``_hang``).
    """
    if (hook_role, hook_index) != (role, index) or done < after:
        return
    if how == "exit":
        os._exit(3)
    if how == "raise":
        raise ValueError("injected by the test")
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "hang":
        _hang()


def _hang() -> None:
    time.sleep(3600)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def queue_gone(desc: QueueDescriptor) -> bool:
    """True when the queue no longer exists: resolving its descriptor without ``create`` finds nothing
    (a ``local`` queue: there is none of that id in this process)."""
    if desc.queue_type == "local":
        from sage_queue.backends.local import destroy_local_queue

        return not destroy_local_queue(desc.queue_id)
    meta = dict(desc.metadata, create=False)
    try:
        handle = resolve_descriptor(QueueDescriptor(desc.queue_id, desc.queue_type, meta))
    except QueueNotFound:
        return True
    handle.close()
    return False


def recorded_pids(pid_dir: Path) -> list[int]:
    """The pids the job test stages (tests/_job_stages.py) recorded as ``pid-<pid>`` files in ``pid_dir``."""
    return [int(p.name[4:]) for p in pid_dir.glob("pid-*")]


def wait_for_a_worker(proc: subprocess.Popen[str], pid_dir: Path, deadline: float, poll: float = 0.05) -> list[int]:
    """Until a worker of the manager process ``proc`` recorded its pid in ``pid_dir`` (by ``deadline``, on
    the monotonic clock, and while the manager runs); the pids recorded by then."""
    while not (pids := recorded_pids(pid_dir)):
        assert time.monotonic() < deadline, "the worker never started"
        assert proc.poll() is None, "the manager ended early"
        time.sleep(poll)
    return pids
