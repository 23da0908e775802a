"""The error types and when each is raised (spec/errors.md E1-E12)."""

from __future__ import annotations

import math
import os
import pickle
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _helpers import local_meta
from hypothesis import given
from hypothesis import strategies as st

import sage_queue
from sage_queue import (
    QUEUE_STUB_MAPPING,
    BackendUnavailable,
    DescriptorError,
    IncompatibleQueue,
    InvalidMetadata,
    MalformedDescriptor,
    QueueClosed,
    QueueDescriptor,
    QueueExists,
    QueueNotFound,
    SageQueueError,
    UnknownQueueType,
    UnsupportedVersion,
    create_descriptor_from_existing_queue,
    get_local_queue,
    register_queue_implementation,
    resolve_descriptor,
    unregister_queue_implementation,
)
from sage_queue.backends.local import LocalQueueStub, destroy_local_queue
from sage_queue.metadata import MetadataField

CROSS_PROCESS_TYPES = [t for t in ("shm", "sage") if QUEUE_STUB_MAPPING.available(t)]


@pytest.fixture
def q() -> Iterator[LocalQueueStub]:
    handle = get_local_queue(maxsize=2)
    yield handle
    destroy_local_queue(handle.descriptor.queue_id)


# -- the hierarchy ---------------------------------------------------------------------------------

HIERARCHY: list[tuple[type[Exception], tuple[type[BaseException], ...]]] = [
    (DescriptorError, (SageQueueError, ValueError)),
    (MalformedDescriptor, (DescriptorError,)),
    (UnknownQueueType, (DescriptorError,)),
    (InvalidMetadata, (DescriptorError,)),
    (UnsupportedVersion, (DescriptorError,)),
    (QueueNotFound, (SageQueueError, LookupError)),
    (QueueExists, (SageQueueError, FileExistsError)),
    (IncompatibleQueue, (SageQueueError,)),
    (QueueClosed, (SageQueueError,)),
    (BackendUnavailable, (SageQueueError, ImportError)),
]


@pytest.mark.spec("E5", "E6", "E7", "E8", "E9", "E10")
@pytest.mark.parametrize(("cls", "bases"), HIERARCHY, ids=[c.__name__ for c, _ in HIERARCHY])
def test_hierarchy_and_reexport(cls: type[Exception], bases: tuple[type[BaseException], ...]) -> None:
    for base in bases:
        assert issubclass(cls, base)
    assert issubclass(cls, SageQueueError)
    assert getattr(sage_queue, cls.__name__) is cls
    assert getattr(sage_queue.errors, cls.__name__) is cls
    assert cls.__name__ in sage_queue.__all__


def _instances() -> list[Exception]:
    return [
        DescriptorError("d"),
        MalformedDescriptor("m"),
        UnknownQueueType("u"),
        InvalidMetadata("i"),
        UnsupportedVersion("v"),
        QueueNotFound("nf"),
        QueueExists("ex"),
        IncompatibleQueue("inc"),
        QueueClosed("closed"),
        BackendUnavailable("ray_queue", "module ray", "pip install sage-queue[ray]"),
        SageQueueError("base"),
    ]


@pytest.mark.spec("E5", "E6", "E7", "E8", "E9", "E10")
@pytest.mark.parametrize("error", _instances(), ids=lambda e: type(e).__name__)
def test_errors_pickle(error: Exception) -> None:
    for protocol in (0, pickle.HIGHEST_PROTOCOL):
        copy = pickle.loads(pickle.dumps(error, protocol=protocol))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
    if isinstance(error, BackendUnavailable):
        copy = pickle.loads(pickle.dumps(error))
        assert isinstance(copy, BackendUnavailable)
        assert (copy.queue_type, copy.missing, copy.hint) == (error.queue_type, error.missing, error.hint)


# -- E1, E2: the standard library's Empty and Full -------------------------------------------------


@pytest.mark.spec("E1")
def test_empty_is_the_standard_class(q: LocalQueueStub) -> None:
    for call in (q.get_nowait, lambda: q.get(timeout=0.01), lambda: q.get(block=False), lambda: q.get_many(3, False)):
        with pytest.raises(queue.Empty) as info:
            call()
        assert type(info.value) is queue.Empty


@pytest.mark.spec("E2")
def test_full_is_the_standard_class(q: LocalQueueStub) -> None:
    q.put_many([1, 2])
    calls: list[Callable[[], None]] = [
        lambda: q.put_nowait(3),
        lambda: q.put(3, timeout=0.01),
        lambda: q.put_many([3], block=False),
    ]
    for call in calls:
        with pytest.raises(queue.Full) as info:
            call()
        assert type(info.value) is queue.Full
    assert q.qsize() == 2


# -- E3, E4: ValueError and TypeError --------------------------------------------------------------


@pytest.mark.spec("E3")
@pytest.mark.parametrize("timeout", [-1, -0.001, float("nan"), -math.inf])
def test_negative_or_nan_timeout_is_value_error(q: LocalQueueStub, timeout: float) -> None:
    q.put("x")
    with pytest.raises(ValueError):
        q.get(timeout=timeout)
    with pytest.raises(ValueError):
        q.put("y", timeout=timeout)
    with pytest.raises(ValueError):
        q.get_many(1, timeout=timeout)
    assert q.qsize() == 1
    q.put("z", block=False, timeout=timeout)  # block=False ignores the timeout (Q10)


@pytest.mark.spec("E3")
def test_other_value_errors(q: LocalQueueStub) -> None:
    with pytest.raises(ValueError):
        q.put_many([1, 2, 3])  # can never fit in maxsize 2
    with pytest.raises(ValueError):
        q.get_many(0)
    with pytest.raises(ValueError):
        q.task_done()  # nothing was put
    assert q.empty()


@pytest.mark.spec("E4")
@pytest.mark.parametrize("timeout", ["1", b"1", [1], True, 1j])
def test_timeout_of_the_wrong_type_is_type_error(q: LocalQueueStub, timeout: Any) -> None:
    with pytest.raises(TypeError):
        q.put("x", timeout=timeout)
    with pytest.raises(TypeError):
        q.get(timeout=timeout)
    assert q.empty()


@pytest.mark.spec("E4")
def test_type_errors_of_max_items_and_describe(q: LocalQueueStub) -> None:
    q.put(1)
    with pytest.raises(TypeError):
        q.get_many(1.0)  # type: ignore[arg-type]
    assert q.qsize() == 1
    with pytest.raises(TypeError):
        create_descriptor_from_existing_queue(object(), "local")


# -- E5 DescriptorError is raised at build/parse time only -----------------------------------------


@pytest.mark.spec("E5")
@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("{", MalformedDescriptor),
        ({"queue_id": "q"}, MalformedDescriptor),
        ({"queue_id": "q", "queue_type": "nope"}, UnknownQueueType),
        ({"queue_id": "q", "queue_type": "local", "metadata": {"maxsize": -1}}, InvalidMetadata),
        ({"queue_id": "q", "queue_type": "local", "metadata": {"maxsize": 1}}, InvalidMetadata),  # no owner_pid
        ({"queue_id": "q", "queue_type": "local", "version": 7, "metadata": {"owner_pid": 1}}, UnsupportedVersion),
    ],
)
def test_descriptor_errors_are_value_errors(bad: Any, error: type[DescriptorError]) -> None:
    with pytest.raises(error):
        QueueDescriptor.parse(bad)
    with pytest.raises(ValueError):  # code written for plain ValueError catches them
        resolve_descriptor(bad)


# -- E6 .. E10 -------------------------------------------------------------------------------------


@pytest.mark.spec("E6")
def test_queue_not_found_is_a_lookup_error() -> None:
    desc = QueueDescriptor(f"e6-{uuid.uuid4().hex}", "local", {"owner_pid": os.getpid() + 1})
    with pytest.raises(LookupError):
        resolve_descriptor(desc)


# Attaching (create: false) to a missing segment: test_registry.py::
# test_valid_descriptor_of_a_missing_segment_is_not_found (tagged R2 and E6).


@pytest.mark.spec("E7")
def test_exclusive_create_of_a_taken_name() -> None:
    from sage_queue._segment import Segment

    name = f"e7-{uuid.uuid4().hex}"
    first = Segment.open("errtest", name, 4096, create=True, exclusive=True)
    try:
        with pytest.raises(QueueExists) as info:
            Segment.open("errtest", name, 4096, create=True, exclusive=True)
        assert isinstance(info.value, FileExistsError)
        assert name in str(info.value)
        second = Segment.open("errtest", name, 4096, create=True)  # non-exclusive: attaches
        assert not second.created
        second.close()
    finally:
        first.close()
        assert first.unlink()


@pytest.mark.spec("E8")
def test_incompatible_queue_names_the_differing_value(q: LocalQueueStub) -> None:
    desc = q.descriptor
    with pytest.raises(IncompatibleQueue) as info:
        resolve_descriptor(QueueDescriptor(desc.queue_id, "local", local_meta(maxsize=9)))
    assert "maxsize" in str(info.value) and "9" in str(info.value) and "2" in str(info.value)


@pytest.mark.spec("E9")
def test_queue_closed(q: LocalQueueStub) -> None:
    other = resolve_descriptor(q.descriptor)
    other.close()
    with pytest.raises(QueueClosed):
        other.put(1)
    survivor = resolve_descriptor(q.descriptor)
    q.destroy()
    with pytest.raises(QueueClosed):
        survivor.get_nowait()


@pytest.mark.spec("E10", "D20")
def test_backend_unavailable_for_a_type_known_by_name_only() -> None:
    # A type registered with its schema but no implementation (how a planned backend is
    # listed): its descriptors build and parse (D20), only resolving raises (E10).
    name = f"e10_planned_{uuid.uuid4().hex[:8]}"
    register_queue_implementation(name, None, metadata=[MetadataField("host", str, required=True)])
    try:
        desc = QueueDescriptor.create(name, host="example")
        assert QueueDescriptor.from_json(desc.to_json()) == desc
        with pytest.raises(BackendUnavailable) as info:
            resolve_descriptor(desc)
        assert isinstance(info.value, ImportError)
        assert name in str(info.value)
    finally:
        unregister_queue_implementation(name)


@pytest.mark.spec("E10")
def test_backend_unavailable_for_a_missing_dependency() -> None:
    name = f"e10_{uuid.uuid4().hex[:8]}"
    register_queue_implementation(name, "sage_queue_missing_dependency_xyz:Stub")
    try:
        with pytest.raises(BackendUnavailable) as info:
            resolve_descriptor({"queue_id": "q", "queue_type": name})
        message = str(info.value)
        assert "sage_queue_missing_dependency_xyz" in message  # the missing piece
        assert "pip install" in message  # and how to install it
        assert info.value.queue_type == name
    finally:
        unregister_queue_implementation(name)


# -- E11 the serialiser's own error ----------------------------------------------------------------


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise pickle.PicklingError("this object refuses to be pickled")


@pytest.mark.spec("E11")
def test_local_does_not_serialise(q: LocalQueueStub) -> None:
    item = _Unpicklable()
    q.put(item)
    assert q.get_nowait() is item


def _unpicklable_lambda() -> Any:
    return lambda: 1


@pytest.mark.spec("E11")
@pytest.mark.parametrize("queue_type", CROSS_PROCESS_TYPES or ["shm"])
@pytest.mark.parametrize(
    "make_item", [_Unpicklable, _unpicklable_lambda, threading.Lock], ids=["reduce", "lambda", "lock"]
)
def test_serialising_backend_raises_the_serialisers_error(queue_type: str, make_item: Any) -> None:
    if queue_type not in CROSS_PROCESS_TYPES:
        pytest.skip(f"the {queue_type} backend does not import here")
    item = make_item()
    with pytest.raises(Exception) as what_pickle_says:  # whatever pickle raises is the oracle
        pickle.dumps(item)
    name = f"e11-{uuid.uuid4().hex}"
    handle = resolve_descriptor(QueueDescriptor(name, queue_type, {"shm_name": name, "capacity_bytes": 65536}))
    try:
        with pytest.raises(type(what_pickle_says.value)):
            handle.put(item)
        assert handle.empty()
    finally:
        handle.destroy()


# -- E12 nothing undocumented escapes --------------------------------------------------------------

_DOCUMENTED = (SageQueueError, queue.Empty, queue.Full, ValueError, TypeError)
_arguments = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.just([1]),
)
# Timeouts that never wait long: a valid timeout of 1e300 s is a real wait (forever, in effect).
_timeouts = st.one_of(
    st.floats(max_value=0.01), st.integers(-(10**400), 0), st.booleans(), st.text(max_size=2), st.just([0.0])
)
_operations = st.sampled_from(
    [
        "put",
        "get",
        "put_nowait",
        "get_nowait",
        "qsize",
        "empty",
        "full",
        "put_many",
        "get_many",
        "task_done",
        "stats",
        "close",
        "resolve_again",
    ]
)


@pytest.mark.spec("E12")
@pytest.mark.timeout(60)
@given(st.lists(st.tuples(_operations, _arguments, _timeouts), min_size=1, max_size=25))
def test_random_operations_raise_only_documented_errors(steps: list[tuple[str, Any, Any]]) -> None:
    handles = [get_local_queue(maxsize=2)]
    try:
        for name, first, second in steps:
            handle = handles[-1]
            call: Any
            if name in ("put", "put_many"):
                payload = [first] if name == "put_many" else first
                timeout = second
                call = lambda: getattr(handle, name)(payload, True, timeout)  # noqa: B023, E731
            elif name in ("get",):
                timeout = second
                call = lambda: handle.get(True, timeout)  # noqa: B023, E731
            elif name == "get_many":
                call = lambda: handle.get_many(first, False)  # noqa: B023, E731
            elif name == "put_nowait":
                call = lambda: handle.put_nowait(first)  # noqa: B023, E731
            elif name == "resolve_again":
                call = lambda: handles.append(resolve_descriptor(handles[0].descriptor.to_json()))  # noqa: E731
            else:
                call = getattr(handle, name)
            try:
                call()
            except _DOCUMENTED:
                pass
            except Exception as exc:  # pragma: no cover - the assertion explains
                raise AssertionError(f"{name} raised an undocumented {type(exc).__name__}: {exc}") from exc
    finally:
        destroy_local_queue(handles[0].descriptor.queue_id)


@pytest.mark.spec("E12", "E3", "Q19")
@pytest.mark.timeout(30)
@pytest.mark.parametrize("queue_type", ["local", *CROSS_PROCESS_TYPES])
@pytest.mark.parametrize("timeout", [1e300, 10**400, math.inf, float(2**62), threading.TIMEOUT_MAX])
def test_timeouts_beyond_the_platform_limit_mean_forever(queue_type: str, timeout: float) -> None:
    # queue.Queue raises OverflowError here; E12 allows no such thing.
    name = f"e12-{uuid.uuid4().hex}"
    metadata = local_meta() if queue_type == "local" else {"shm_name": name, "capacity_bytes": 65536}
    q = resolve_descriptor(QueueDescriptor(name, queue_type, metadata))
    try:
        q.put("there")
        assert q.get(timeout=timeout) == "there"
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append(q.get(timeout=timeout)), daemon=True)
        waiter.start()
        waiter.join(0.1)
        assert waiter.is_alive()
        q.put("later", timeout=timeout)
        waiter.join(5)
        assert got == ["later"]
        with pytest.raises(ValueError):
            q.get(timeout=-timeout)
    finally:
        q.destroy()
