"""The anchors: the queues people already use, as kit factories (``python -m conformance conformance.anchors:NAME``).

Each factory declares the capabilities its queue honestly has and how its handles reach
another process (``sharing``, see ``conformance/target.py``); none declares
``known_failures``: every quirk must show up as a failure the kit finds. They are plain
``factory(maxsize) -> queue`` callables with attributes, so other harnesses (the stress
harness's ``MODULE:ATTR`` targets) can import them too. :data:`ANCHORS` lists them, in the
scorecard's order, and :func:`unavailable_reason` says why one cannot run here.

``multiprocessing`` queues are made in the ``spawn`` context and reach children through it
(pickled while spawning), the portable way; ``faster_fifo`` likewise (``faster_fifo_reduction``
registers its pickling). Ray's queue is an actor: its handle reaches a fresh interpreter
through the hook (``share`` gives the cluster address and the pickled handle, ``attach``
connects and unpickles).
"""

from __future__ import annotations

import atexit
import importlib.util
import multiprocessing
import queue
from collections.abc import Callable
from typing import Any, Optional

__all__ = [
    "ANCHORS",
    "mp_queue",
    "mp_joinable_queue",
    "mp_simple_queue",
    "faster_fifo",
    "ray_util_queue",
    "queue_queue",
    "unavailable_reason",
]

_CTX = multiprocessing.get_context("spawn")

FASTER_FIFO_BYTES = 1 << 20
"""faster-fifo's ring size in bytes (the kit's largest item is 200 KiB)."""


def _declare(factory: Callable[[int], Any], capabilities: set[str], sharing: Optional[str] = None) -> None:
    factory.capabilities = frozenset(capabilities)  # type: ignore[attr-defined]
    if sharing is not None:
        factory.sharing = sharing  # type: ignore[attr-defined]


def queue_queue(maxsize: int = 0) -> Any:
    """``queue.Queue``: the ground truth of the contract (threads of one process)."""
    return queue.Queue(maxsize)


def mp_queue(maxsize: int = 0) -> Any:
    """``multiprocessing.Queue`` (spawn context). ``qsize()`` counts items whose feeder-thread write may
    still be pending, so it is declared approximate."""
    return _CTX.Queue(maxsize)


def mp_joinable_queue(maxsize: int = 0) -> Any:
    """``multiprocessing.JoinableQueue`` (spawn context): ``mp_queue`` plus ``task_done``/``join``."""
    return _CTX.JoinableQueue(maxsize)


def mp_simple_queue(maxsize: int = 0) -> Any:
    """``multiprocessing.SimpleQueue`` (spawn context). It has no bound, no timeouts and no ``qsize``:
    ``maxsize`` cannot be given to it, and the kit shows what that breaks."""
    return _CTX.SimpleQueue()


def faster_fifo(maxsize: int = 0) -> Any:
    """``faster_fifo.Queue`` with a ring of :data:`FASTER_FIFO_BYTES` and ``maxsize`` messages.

    Its ``put_many``/``get_many`` take other arguments than the contract's batch clauses
    (``get_many(block, timeout, max_messages_to_get)``), so ``batch`` is not declared. Its
    ``maxsize=0`` means "no message fits", not "unbounded": the factory maps the contract's 0 to
    faster-fifo's own default bound (10**9 messages), as a user who knows would.
    """
    import faster_fifo as ff
    import faster_fifo_reduction  # type: ignore[import-untyped]  # noqa: F401  (registers the pickling that spawn needs)

    return ff.Queue(max_size_bytes=FASTER_FIFO_BYTES, maxsize=maxsize if maxsize > 0 else 10**9)


# -- Ray ----------------------------------------------------------------------------------------

_ray_started = False
_ray_actors: list[Any] = []


def _ray() -> Any:
    """Ray, started once in this process (2 CPUs, no dashboard) and shut down at exit.

    The cluster ``$RAY_ADDRESS`` names if set; else a new instance, started as sage-queue starts its
    own: on 127.0.0.1 only (``start_local``, spec RAY16; plain ``ray.init`` takes this machine's
    outward address), never the latest ``ray start`` cluster of the machine."""
    global _ray_started
    import os

    from sage_queue.backends._ray import ray, ray_init, start_local

    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if os.environ.get("RAY_ADDRESS"):
            ray_init(**options)
        else:
            start_local(num_cpus=2, **options)
        if not _ray_started:
            _ray_started = True
            atexit.register(ray.shutdown)
    return ray


def ray_util_queue(maxsize: int = 0) -> Any:
    """``ray.util.queue.Queue``: an actor holding a ``asyncio.Queue``; each call is a remote call."""
    _ray()
    from ray.util.queue import Queue

    q = Queue(maxsize)
    _ray_actors.append(q)
    return q


def _ray_cleanup() -> None:
    """Kill every queue actor the test made (an actor outlives its handle otherwise)."""
    actors, _ray_actors[:] = list(_ray_actors), []
    if not actors:
        return
    ray = _ray()
    for q in actors:
        try:
            ray.kill(q.actor)
        except Exception:  # already dead: nothing to release
            pass


def _ray_share(handle: Any) -> Any:
    ray = _ray()
    from ray import cloudpickle

    return ray.get_runtime_context().gcs_address, cloudpickle.dumps(handle)  # type: ignore[no-untyped-call]


def _ray_attach(token: Any) -> Any:
    from ray import cloudpickle

    from sage_queue.backends._ray import ray, ray_init

    address, blob = token
    if not ray.is_initialized():
        # ray_init: Ray takes RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (inherited from the parent that started a
        # loopback instance) as the environment has it now, so 127.0.0.1:port is joined as named.
        ray_init(address=address, log_to_driver=False, configure_logging=False)
    return cloudpickle.loads(blob)


_declare(queue_queue, {"task_done"})
_declare(mp_queue, {"cross_process", "approximate_qsize"}, "spawn")
_declare(mp_joinable_queue, {"cross_process", "approximate_qsize", "task_done"}, "spawn")
_declare(mp_simple_queue, {"cross_process"}, "spawn")
_declare(faster_fifo, {"cross_process"}, "spawn")
_declare(ray_util_queue, {"cross_process"})
ray_util_queue.share = _ray_share  # type: ignore[attr-defined]
ray_util_queue.attach = _ray_attach  # type: ignore[attr-defined]
ray_util_queue.cleanup = _ray_cleanup  # type: ignore[attr-defined]
ray_util_queue.time_scale = 4.0  # type: ignore[attr-defined]  # every call is a remote call to an actor

ANCHORS: dict[str, Callable[[int], Any]] = {
    "queue_queue": queue_queue,
    "mp_queue": mp_queue,
    "mp_joinable_queue": mp_joinable_queue,
    "mp_simple_queue": mp_simple_queue,
    "faster_fifo": faster_fifo,
    "ray_util_queue": ray_util_queue,
}
"""name -> factory; ``conformance.anchors:NAME`` is the kit target."""

_NEEDS = {"faster_fifo": ("faster_fifo", "faster_fifo_reduction"), "ray_util_queue": ("ray",)}


def unavailable_reason(name: str) -> Optional[str]:
    """Why the anchor ``name`` cannot run here (a module it needs is not installed), or None."""
    for module in _NEEDS.get(name, ()):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install {module.replace('_reduction', '')})"
    return None
