"""What ``ray_queue`` and ``ray_actor`` share: importing Ray, joining a cluster, naming actors, errors.

Importing this module imports Ray; without Ray it raises :class:`BackendUnavailable` with the
install hint (the registry imports the backends only at resolve, so descriptors of both types
parse without Ray, spec D13).

Cluster connection (spec/backends/ray.md RAY1): if Ray is initialised in this process, that
cluster is used; otherwise ``ray.init(address=metadata["address"] or $RAY_ADDRESS)``; with neither,
``ray.init(address="local")`` starts a local instance that lives as long as this process, and
``RAY_ADDRESS`` is set to it so that processes started afterwards join it.

Loopback only (RAY16): an instance this library starts (:func:`start_local`: the embedded one, and
the demo's, the tests', the benchmarks') listens and advertises on 127.0.0.1 only. Ray on Linux
takes as a node's address the machine's outward one (the source address of its route towards
8.8.8.8), and rewrites a 127.0.0.1 it is given (``_node_ip_address``, an address to join) into that
one, unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which Ray reads once, when it is imported. So
:func:`start_local` sets that variable in this process's environment (Ray's processes and the
processes started afterwards inherit it, as they inherit ``RAY_ADDRESS``), and every ``ray.init``
here runs with Ray's copy of it read again from the environment (:func:`ray_init`). Joining a cluster
someone else started changes nothing else.

Destroyed versus died (RAY8): ``destroy()`` writes a tombstone ``<namespace>/<name> -> actor id``
into the cluster's key-value store before it kills the actor, so that another handle whose call
fails with ``RayActorError`` can tell ``QueueDestroyed`` (E13) from an actor that died for another
reason (:class:`QueueActorLost`). Keyed by the actor id, so a queue created again under the same
name is not taken for destroyed.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

from ..descriptor import QueueDescriptor
from ..errors import BackendUnavailable, QueueActorLost, QueueDestroyed, QueueNotFound, QueuePermissionError

try:
    import ray
    import ray._private.ray_constants as _ray_constants
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
    from ray.experimental import internal_kv
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess with ray blocked
    raise BackendUnavailable(
        "ray_queue/ray_actor", f"the ray package ({_exc})", "pip install sage-queue[ray]"
    ) from _exc

__all__ = [
    "ray",
    "GetTimeoutError",
    "RayActorError",
    "QueueActorLost",
    "DEFAULT_NAMESPACE",
    "connect",
    "namespace_of",
    "actor_options",
    "mark_destroyed",
    "was_destroyed",
    "died",
    "ACTOR_NAME_PREFIX",
    "LOOPBACK",
    "LOOPBACK_ENV",
    "start_local",
    "ray_init",
    "check_not_forked",
    "wait_ref",
]

DEFAULT_NAMESPACE = "sage_queue"
"""The Ray namespace of a queue whose descriptor names none (RAY2): a fixed one, not the job's
anonymous namespace, so that every driver connected to the cluster reaches the same actor."""

ACTOR_NAME_PREFIX = "sageq:"
"""Every actor of this library is named ``sageq:<type>:<actor_name>`` (RAY2): the prefix lets a
leak guard or an operator list them (``ray list actors``) without confusing them with others."""

_KV_NAMESPACE = "sage_queue"
_connect_lock = threading.Lock()
_inherited_connection = False
"""True in a child forked from a process connected to Ray: that connection cannot be used (any Ray
call, ``ray.shutdown()`` included, hangs there), and ``ray.init`` refuses since Ray looks initialised."""


def _after_fork_in_child() -> None:
    global _inherited_connection, _connect_lock
    _connect_lock = threading.Lock()  # another thread of the parent may have held it at fork time
    _inherited_connection = _inherited_connection or ray.is_initialized()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_not_forked(queue_type: str, name: str) -> None:
    """QueueNotFound in a forked child of a Ray driver (RAY11): fail at once where Ray would hang."""
    if _inherited_connection:
        raise QueueNotFound(
            f"{queue_type} queue {name!r} cannot be reached from this process: it was forked from a "
            "process connected to Ray, and a Ray connection does not survive fork; start processes "
            "with spawn or as subprocesses (they connect through the descriptor's address)"
        )


def connect(queue_type: str, metadata: dict[str, Any]) -> None:
    """Join the cluster the descriptor names (RAY1); no-op when Ray is already initialised here."""
    check_not_forked(queue_type, str(metadata.get("actor_name")))
    with _connect_lock:
        if ray.is_initialized():
            return
        # "local" rather than None: ray.init(address=None) would join the latest cluster that `ray start`
        # left on this machine (/tmp/ray/ray_current_cluster), whoever started it.
        address: str = metadata.get("address") or os.environ.get("RAY_ADDRESS") or "local"
        # log_to_driver=False: actor prints are not this process's business; the dashboard is not
        # needed by a queue and costs a second and a process.
        if address == "local":
            # The embedded instance, on 127.0.0.1 only (RAY16): processes this one starts from now on
            # (subprocess, spawn) inherit RAY_ADDRESS and LOOPBACK_ENV, and so join it, and reach the
            # same queues from the same descriptors (RAY1).
            local = start_local(include_dashboard=False, log_to_driver=False)
            os.environ.setdefault("RAY_ADDRESS", local)
        else:
            _check_reachable(queue_type, metadata, address)
            try:
                ray_init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError) as exc:  # Ray's own words, kept as the cause
                raise QueueNotFound(
                    f"{queue_type} {metadata.get('actor_name')!r}: could not join the Ray cluster at {address} "
                    f"({exc}). A cluster with token authentication (Ray's default for a local instance) "
                    "needs RAY_AUTH_MODE=token and its token (~/.ray/auth_token) in the joining process"
                ) from exc


def naming_the_cluster(descriptor: QueueDescriptor) -> QueueDescriptor:
    """``descriptor`` with ``address`` set to the cluster this process joined, when it named none (RAY1).

    A handle's descriptor is what users hand to other processes: resolved from ``$RAY_ADDRESS`` or an
    embedded instance, it would send an unrelated process (that inherited neither) to a new, empty
    local instance and a new, empty queue of the same name."""
    if descriptor.metadata.get("address"):
        return descriptor
    address = str(ray.get_runtime_context().gcs_address)
    return dataclasses.replace(descriptor, metadata={**descriptor.metadata, "address": address})


CONNECT_PROBE_S = 10.0
"""How long resolve waits for a TCP connection to a named cluster's GCS before QueueNotFound (RAY1)."""


def _check_reachable(queue_type: str, metadata: dict[str, Any], address: str) -> None:
    """QueueNotFound unless something accepts a TCP connection at the cluster's ``host:port``.

    Ray's own join retries a dead address for minutes (a stale descriptor of a cluster that is gone, a
    typo): one TCP connect first makes that a prompt, documented error. ``ray://`` (Ray Client) and
    addresses that are not ``host:port`` are left to Ray."""
    if "://" in address:
        return
    host, _, port_text = address.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        return
    try:
        socket.create_connection((host.strip("[]"), port), timeout=CONNECT_PROBE_S).close()
    except OSError as exc:
        raise QueueNotFound(
            f"{queue_type} {metadata.get('actor_name')!r}: no Ray cluster answers at {address} "
            f"({exc.strerror or type(exc).__name__}); is it running, and is this its address?"
        ) from None
    if _is_loopback(address):
        # A driver runs what its cluster sends it (objects are unpickled here, and Ray's token, if this
        # process has one, goes to the cluster): joining another user's cluster on this machine, named by
        # a descriptor that user wrote, would run their code as us. On loopback we can tell whose it is.
        owners = _listener_uids(port)
        strangers = sorted(uid for uid in owners if uid != os.geteuid())
        if strangers:
            raise QueuePermissionError(
                f"{queue_type} {metadata.get('actor_name')!r}: the Ray cluster at {address} belongs to uid "
                f"{strangers[0]}, not to us (uid {os.geteuid()}); this library joins only our own clusters"
            )


def _listener_uids(port: int) -> set[int]:
    """Owners (uids) of the TCP sockets listening on ``port`` in this network namespace (Linux /proc; else
    empty: nothing known, nothing refused)."""
    uids: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid ...; st 0A is LISTEN
            if len(fields) > 7 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                uids.add(int(fields[7]))
    return uids


LOOPBACK = "127.0.0.1"
"""The only address of an instance this library starts (RAY16): the machine's rule is network on loopback only."""

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for clusters of several hosts: "0" makes Ray take 127.0.0.1 as this node's address and
keep a 127.0.0.1 it is told to join as it is (else it rewrites both into the machine's outward address)."""


def ray_init(**options: Any) -> None:
    """``ray.init(**options)``, with Ray's copy of LOOPBACK_ENV read from the environment as it is now.

    Ray reads the variable once, into ``ray_constants.ENABLE_RAY_CLUSTER``, when it is imported; this
    process (or the fork server it was forked from) may have imported Ray before its environment got
    the variable (:func:`start_local` sets it). With a stale copy, a process told to join
    ``127.0.0.1:port`` would try the outward address instead, where a loopback-only instance does
    not listen (and Ray retries that forever). Ray's copy is put back afterwards: nothing else changes.
    """
    before = _ray_constants.ENABLE_RAY_CLUSTER
    value = os.environ.get(LOOPBACK_ENV)  # read as Ray reads it (ray._common.utils.env_bool)
    enabled = not _ray_constants.IS_WINDOWS_OR_OSX if value is None else value.lower() in ("true", "1")
    if _is_loopback(options.get("address")):
        # Told to join 127.0.0.1:port: whatever this process's environment says, Ray must not rewrite it
        # into the outward address (a loopback-only instance does not listen there, and Ray retries that
        # for ever): an unrelated process given a descriptor naming our instance joins it (RAY1, RAY16).
        enabled = False
    _ray_constants.ENABLE_RAY_CLUSTER = enabled
    try:
        ray.init(**options)
    finally:
        _ray_constants.ENABLE_RAY_CLUSTER = before


def _is_loopback(address: Any) -> bool:
    """Whether a ``ray.init`` address (``host:port``, ``ray://host:port``) names this machine's loopback."""
    if not isinstance(address, str) or address in ("", "local", "auto"):
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


def start_local(**options: Any) -> str:
    """Start a new Ray instance owned by this process, on 127.0.0.1 only (RAY16); its address ``127.0.0.1:port``.

    ``options``: further ``ray.init`` keywords (``num_cpus``, ``include_dashboard``, ``logging_level``...).
    Sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in this process's environment and leaves it there
    (unless the start fails): Ray's processes (GCS, raylet, agents, workers) inherit it at the start,
    and a process started afterwards needs it to join the instance by its address (Ray would
    otherwise rewrite 127.0.0.1 into the outward address, where nothing listens). The caller that
    shuts the instance down may put the variable back. Does not set ``RAY_ADDRESS`` (:func:`connect` does).
    """
    before = os.environ.get(LOOPBACK_ENV)
    os.environ[LOOPBACK_ENV] = "0"
    try:
        # _node_ip_address: the node's address, given and not guessed; ray_init keeps Ray from rewriting it.
        ray_init(address="local", _node_ip_address=LOOPBACK, **options)
    except BaseException:
        if before is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = before
        raise
    return str(ray.get_runtime_context().gcs_address)


def namespace_of(metadata: dict[str, Any]) -> str:
    ns: str = metadata.get("namespace") or DEFAULT_NAMESPACE
    return ns


def full_name(queue_type: str, metadata: dict[str, Any]) -> str:
    return f"{ACTOR_NAME_PREFIX}{queue_type}:{metadata['actor_name']}"


def actor_options(queue_type: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """``.options(...)`` for creating-or-getting the queue's named actor, race-free (RAY3)."""
    opts: dict[str, Any] = {
        "name": full_name(queue_type, metadata),
        "namespace": namespace_of(metadata),
        # get_if_exists: the GCS registers a name once; a concurrent creator gets the winner's actor.
        "get_if_exists": True,
        "lifetime": None if metadata.get("lifetime") == "non_detached" else "detached",
        "num_cpus": 0,  # a queue holds no compute: never wait for a free CPU to start it
    }
    return opts


def _tomb_key(queue_type: str, metadata: dict[str, Any]) -> bytes:
    return f"destroyed/{namespace_of(metadata)}/{full_name(queue_type, metadata)}".encode()


def actor_id(actor: Any) -> str:
    # ActorHandle._actor_id is the only way to the id from outside the actor (ray 2.x).
    return str(actor._actor_id.hex())


def mark_destroyed(queue_type: str, metadata: dict[str, Any], actor: Any) -> None:
    internal_kv._internal_kv_put(_tomb_key(queue_type, metadata), actor_id(actor).encode(), namespace=_KV_NAMESPACE)


def was_destroyed(queue_type: str, metadata: dict[str, Any], actor: Any) -> bool:
    try:
        value = internal_kv._internal_kv_get(_tomb_key(queue_type, metadata), namespace=_KV_NAMESPACE)
    except Exception:  # the GCS itself unreachable: we cannot know, so not "destroyed"
        return False
    return value is not None and value.decode() == actor_id(actor)


def died(queue_type: str, metadata: dict[str, Any], actor: Any, exc: BaseException) -> Exception:
    """The error for a call whose actor is dead: QueueDestroyed if destroy() killed it, else QueueActorLost."""
    name = f"{queue_type} queue {metadata['actor_name']!r}"
    if was_destroyed(queue_type, metadata, actor):
        return QueueDestroyed(f"{name} was destroyed")
    first = str(exc).strip().splitlines()
    why = first[-1] if first else type(exc).__name__
    if isinstance(exc, ActorUnavailableError):  # restarting, or its node unreachable for now
        return QueueActorLost(
            f"the Ray actor of {name} is unavailable (restarting or unreachable): the call may or may not "
            f"have taken effect, and a restart loses its items ({why})"
        )
    return QueueActorLost(f"the Ray actor of {name} died; its items are lost ({why})")


def wait_ref(ref: Any, until: Optional[float], should_stop: Callable[[], bool], slice_s: float) -> Any:
    """``ray.get(ref)`` waited in slices of ``slice_s`` so that ``should_stop()`` is seen promptly.

    Returns the value; raises :class:`GetTimeoutError` at ``until`` (monotonic) or as soon as
    ``should_stop()`` is true at a slice boundary. The slices are local waits on one ObjectRef
    (no call to the actor); they exist so that a ``close()`` (from another thread or a signal
    handler, which runs between slices) wakes the call without any lock or remote call.
    """
    while True:
        remaining = None if until is None else until - time.monotonic()
        step = slice_s if remaining is None else max(0.0, min(slice_s, remaining))
        try:
            return ray.get(ref, timeout=step)
        except GetTimeoutError:
            if should_stop() or (until is not None and time.monotonic() >= until):
                raise
