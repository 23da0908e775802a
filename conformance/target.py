"""What the kit judges: a factory ``factory(maxsize) -> QueueLike`` and what it declares.

Optional attributes on the factory (function or object):

``capabilities``    set of capability names (``sage_queue.KNOWN_CAPABILITIES``); absent = core only
``known_failures``  ``{test id: reason}``; those tests run as *strict* xfail, so a fixed bug
                    makes the run fail until the declaration is removed
``time_scale``      float >= 1 stretching every timing tolerance (slow transports)
``cleanup()``       called after each test
``sharing``         how a handle reaches another process (``cross_process`` tests): ``"descriptor"`` (the
                    default: a fresh interpreter resolves ``handle.descriptor``), ``"fork"`` (a forked
                    ``multiprocessing`` child inherits the handle), ``"spawn"``/``"forkserver"`` (the handle
                    is pickled through that ``multiprocessing`` context), or ``"hook"``
``share(handle)``   with ``attach(token)``: the hook (``sharing`` may then be omitted). ``share`` runs in the
                    test process and returns a picklable token; a fresh interpreter imports ``attach`` (so
                    it must be a module-level function) and calls it to get a handle on the same queue

A registered queue type (``local``, ``shm``, ``sage``, entry-point backends) becomes a
factory through :func:`registered_target`: each queue is a fresh descriptor from the generic
``QueueDescriptor.create(queue_type, name, maxsize, **metadata)`` with a unique name, resolved;
cleanup destroys every queue the test made. A type whose schema requires more metadata than its
creation hook fills in is given it through ``registered_target(queue_type, metadata)``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import math
import os
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "Target",
    "TargetError",
    "load_target",
    "registered_target",
    "builtin_types",
    "registered_types",
    "SHARING_KINDS",
]

SHARING_KINDS = ("descriptor", "fork", "spawn", "forkserver", "hook")
"""How a target's handle reaches another process; see the module docstring."""


class TargetError(Exception):
    """The target cannot be judged: it does not import, or declares something invalid."""


@dataclass
class Target:
    """A factory plus its declarations, validated."""

    name: str
    factory: Callable[[int], Any]
    capabilities: frozenset[str] = frozenset()
    known_failures: Mapping[str, str] = field(default_factory=dict)
    time_scale: float = 1.0
    cleanup: Optional[Callable[[], None]] = None
    sharing: str = "descriptor"
    share: Optional[Callable[[Any], Any]] = None
    attach: Optional[Callable[[Any], Any]] = None
    survives_fork: bool = True
    """False when a handle (or the connection under it, e.g. a Ray driver's) is unusable in a forked
    child: the kit then runs its deadlock-prone bodies in a thread (see conformance/_isolation.py)."""

    @classmethod
    def from_factory(cls, factory: Callable[[int], Any], name: Optional[str] = None) -> Target:
        from sage_queue import KNOWN_CAPABILITIES

        if not callable(factory):
            raise TargetError(f"the factory must be callable, got {type(factory).__name__}")
        label = name or getattr(factory, "__qualname__", None) or repr(factory)
        caps_raw = getattr(factory, "capabilities", None)
        caps = frozenset() if caps_raw is None else frozenset(caps_raw)
        if not all(isinstance(c, str) for c in caps):
            raise TargetError(f"{label}: capabilities must be strings, got {sorted(map(repr, caps))}")
        unknown = sorted(caps - KNOWN_CAPABILITIES)
        if unknown:
            raise TargetError(f"{label}: unknown capabilities {unknown}; the kit knows {sorted(KNOWN_CAPABILITIES)}")
        known = getattr(factory, "known_failures", None) or {}
        if not isinstance(known, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in known.items()
        ):
            raise TargetError(f"{label}: known_failures must map test ids (str) to reasons (str)")
        scale = getattr(factory, "time_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 1:
            raise TargetError(f"{label}: time_scale must be a finite number >= 1, got {scale!r}")
        cleanup = getattr(factory, "cleanup", None)
        if cleanup is not None and not callable(cleanup):
            raise TargetError(f"{label}: cleanup must be callable")
        sharing, share, attach = _sharing_of(factory, label)
        survives_fork = getattr(factory, "survives_fork", True)
        if not isinstance(survives_fork, bool):
            raise TargetError(f"{label}: survives_fork must be a bool, got {survives_fork!r}")
        return cls(label, factory, caps, dict(known), float(scale), cleanup, sharing, share, attach, survives_fork)

    def has(self, capability: str) -> bool:
        return capability in self.capabilities


def _sharing_of(factory: Any, label: str) -> tuple[str, Optional[Callable[[Any], Any]], Optional[Callable[[Any], Any]]]:
    import multiprocessing

    sharing = getattr(factory, "sharing", None)
    share, attach = getattr(factory, "share", None), getattr(factory, "attach", None)
    if (share is None) != (attach is None):
        raise TargetError(f"{label}: share() and attach() go together; the target defines only one")
    if share is not None:
        if not callable(share) or not callable(attach):
            raise TargetError(f"{label}: share and attach must be callable")
        if sharing not in (None, "hook"):
            raise TargetError(f"{label}: defines share()/attach() but declares sharing={sharing!r}")
        sharing = "hook"
    sharing = "descriptor" if sharing is None else sharing
    if sharing not in SHARING_KINDS:
        raise TargetError(f"{label}: sharing must be one of {list(SHARING_KINDS)}, got {sharing!r}")
    if sharing == "hook" and share is None:
        raise TargetError(f"{label}: sharing='hook' needs share(handle) -> token and attach(token) -> handle")
    if sharing in ("fork", "spawn", "forkserver") and sharing not in multiprocessing.get_all_start_methods():
        raise TargetError(f"{label}: sharing={sharing!r}, a start method this platform does not have")
    return sharing, share, attach


def load_target(spec: str) -> Target:
    """``"package.module:attr"`` -> Target. The current directory is importable, as with ``python -m``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(f"expected MODULE:ATTR (e.g. mypkg.queues:make_queue), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name) or os.getcwd() in sys.path:
            raise TargetError(f"cannot import {module_name}: {exc}") from exc
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc2:
            raise TargetError(f"cannot import {module_name}: {exc2}") from exc2
    except ImportError as exc:
        raise TargetError(f"cannot import {module_name}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"{module_name} has no attribute {attr!r}") from None
    return Target.from_factory(obj, name=spec)


class _RegisteredFactory:
    """``factory(maxsize)`` for a registered queue type; see the module docstring."""

    def __init__(self, queue_type: str, cls: type, metadata: Optional[Mapping[str, Any]] = None) -> None:
        self.queue_type = queue_type
        self.capabilities = frozenset(getattr(cls, "capabilities", frozenset()))
        self.survives_fork = bool(getattr(cls, "survives_fork", True))
        self._metadata = dict(metadata or {})
        self._made: list[Any] = []

    def describe(self, maxsize: int) -> Any:
        from sage_queue import QueueDescriptor

        unique = f"kit_{self.queue_type}_{uuid.uuid4().hex[:12]}"
        return QueueDescriptor.create(self.queue_type, unique, maxsize, **self._metadata)

    def __call__(self, maxsize: int) -> Any:
        from sage_queue import resolve_descriptor

        handle = resolve_descriptor(self.describe(maxsize))
        self._made.append(handle)
        return handle

    def cleanup(self) -> None:
        """Destroy every queue made (re-resolving it if the test closed its handle)."""
        from sage_queue import QueueClosed, QueueNotFound, resolve_descriptor

        made, self._made = self._made, []
        for handle in made:
            try:
                if handle.closed:
                    # Reattach only to a queue that still exists: never create one just to destroy it.
                    desc = handle.descriptor.to_dict()
                    if "create" in desc["metadata"]:
                        desc["metadata"]["create"] = False
                    handle = resolve_descriptor(desc)
                handle.destroy()
            except (QueueClosed, QueueNotFound):
                pass


def registered_types() -> list[str]:
    """Every registered queue type, in the registry's order (built-in first, then entry-point and
    runtime registrations), available here or not."""
    from sage_queue import QUEUE_STUB_MAPPING

    return list(QUEUE_STUB_MAPPING)


def builtin_types() -> list[str]:
    """The registered types that ship with sage-queue (available here or not)."""
    from sage_queue.metadata import BUILTIN_SCHEMAS

    return [t for t in registered_types() if t in BUILTIN_SCHEMAS]


def registered_target(queue_type: str, metadata: Optional[Mapping[str, Any]] = None) -> Target:
    """A Target for a registered type; TargetError (with the reason) if its backend is unavailable.

    ``metadata`` is passed to every ``QueueDescriptor.create`` (for types that require keys their
    schema cannot fill in); it is checked once here, so a bad value fails before any test runs.
    """
    from sage_queue import QueueDescriptor, registry

    if queue_type not in registry.QUEUE_STUB_MAPPING:
        raise TargetError(f"no queue type {queue_type!r} is registered; registered: {registered_types()}")
    reason = registry.unavailable_reason(queue_type)
    if reason is not None:
        raise TargetError(f"queue type {queue_type!r} is unavailable: {reason}")
    cls = registry.backend_class(queue_type)
    metadata = dict(metadata or {})
    local_service = getattr(cls, "local_service", None)
    if local_service is not None and not metadata:
        # The backend needs a service (rpc: a server) and the caller named none: a throw-away
        # one for this kit run (sage_queue/stub.py), stopped when the process exits.
        services = contextlib.ExitStack()
        try:
            metadata.update(services.enter_context(local_service()))
        except Exception as exc:
            raise TargetError(f"the service a {queue_type} queue needs did not start: {exc}") from exc
        atexit.register(services.close)
    try:
        QueueDescriptor.create(queue_type, maxsize=1, **metadata)
    except ValueError as exc:  # DescriptorError: required metadata missing or out of range
        raise TargetError(f"cannot describe a {queue_type} queue: {exc}") from exc
    factory = _RegisteredFactory(queue_type, cls, metadata)
    return Target.from_factory(factory, name=f"--backend {queue_type}")
